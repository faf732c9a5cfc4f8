#include "store.h"

#include "fileio.h"
#include "jsonfile.h"
#include "status.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

static const uint8_t MAGIC[4] = {'P', 'A', 'R', '1'};
#define MAX_MANIFEST (256ull << 20)

static void put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* zlib's crc32 takes a uInt length: feed it in pieces it can hold. */
static uint32_t crc_of(const uint8_t *p, size_t n) {
  uLong c = crc32(0L, Z_NULL, 0);
  while (n > 0) {
    const uInt step = n > (1u << 30) ? (1u << 30) : (uInt)n;
    c = crc32(c, p, step);
    p += step, n -= step;
  }
  return (uint32_t)c;
}

/* "a/b", malloc'd; NULL (with the message set) when out of memory. */
static char *join(const char *a, const char *b) {
  const size_t n = strlen(a) + strlen(b) + 2;
  char *p = malloc(n);
  if (!p) {
    pa_error(PA_ENOMEM, "%s/%s: no memory for the path", a, b);
    return NULL;
  }
  snprintf(p, n, "%s/%s", a, b);
  return p;
}

static int ensure_dir(const char *dir) {
  if (mkdir(dir, 0777) == 0 || errno == EEXIST) {
    struct stat sb;
    if (stat(dir, &sb) != 0)
      return pa_error(PA_EIO, "%s: cannot check the directory: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
      return pa_error(PA_EINVAL, "%s: exists and is not a directory", dir);
    return PA_OK;
  }
  return pa_error(PA_EIO, "%s: cannot create the directory: %s", dir, strerror(errno));
}

/* STORE and STORE/shards. */
static int ensure_store(const char *store) {
  int rc = ensure_dir(store);
  if (rc)
    return rc;
  char *shards = join(store, "shards");
  if (!shards)
    return PA_ENOMEM;
  rc = ensure_dir(shards);
  free(shards);
  return rc;
}

/* ---- the manifest --------------------------------------------------------- */

int pa_manifest_read(const char *store, Palign__Manifest **out) {
  *out = NULL;
  char *path = join(store, "manifest.pb");
  if (!path)
    return PA_ENOMEM;
  char *buf = NULL;
  size_t n = 0;
  int rc = pa_read_file(path, MAX_MANIFEST, &buf, &n);
  Palign__Manifest *m = NULL;
  if (!rc && !(m = palign__manifest__unpack(NULL, n, (const uint8_t *)buf)))
    rc = pa_error(PA_EFORMAT, "%s: not a palign manifest (protobuf does not unpack)", path);
  else if (!rc && m->format == 0)
    rc = pa_error(PA_EFORMAT, "%s: not a palign manifest (no format version)", path);
  else if (!rc && m->format > PA_STORE_FORMAT)
    rc = pa_error(PA_EUNSUPPORTED, "%s: store format %" PRIu32 " is newer than this palign reads (%d)", path, m->format,
                  PA_STORE_FORMAT);
  else if (!rc && m->format != PA_STORE_FORMAT)
    rc = pa_error(PA_EFORMAT, "%s: unknown store format %" PRIu32 " (this palign reads %d)", path, m->format,
                  PA_STORE_FORMAT);
  if (rc && m)
    palign__manifest__free_unpacked(m, NULL);
  else if (!rc)
    *out = m;
  free(buf);
  free(path);
  return rc;
}

int pa_manifest_write(const char *store, const Palign__Manifest *m) {
  int rc = ensure_store(store);
  if (rc)
    return rc;
  char *path = join(store, "manifest.pb");
  if (!path)
    return PA_ENOMEM;
  const size_t n = palign__manifest__get_packed_size(m);
  uint8_t *buf = malloc(n ? n : 1);
  if (!buf)
    rc = pa_error(PA_ENOMEM, "%s: no memory for %zu bytes", path, n);
  else if (palign__manifest__pack(m, buf) != n)
    rc = pa_error(PA_EINVAL, "%s: protobuf-c packed another size than it announced (%zu bytes)", path, n);
  else
    rc = pa_write_atomic(path, &(pa_chunk){buf, n}, 1);
  free(buf);
  free(path);
  return rc;
}

/* ---- comparing settings --------------------------------------------------- */

typedef struct {
  char s[1024];
  size_t n;
} text;

static void add(text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void add(text *t, const char *fmt, ...) {
  if (t->n >= sizeof t->s - 1)
    return;
  va_list ap;
  va_start(ap, fmt);
  const int k = vsnprintf(t->s + t->n, sizeof t->s - t->n, fmt, ap);
  va_end(ap);
  if (k > 0)
    t->n = t->n + (size_t)k < sizeof t->s ? t->n + (size_t)k : sizeof t->s - 1;
}

/* The message of pa_settings_compare: "name 'have' here, 'want' THERE",
 * one clause per field that differs. */
typedef struct {
  text t;
  size_t head;       /* where the clauses start */
  const char *there; /* where `want` is: "asked" */
} diffs;

static void field(diffs *d, const char *name) { add(&d->t, "%s%s ", d->t.n > d->head ? "; " : " ", name); }

/* Fingerprints are 64 hex digits: 16 tell two apart, unless they do not. */
static void diff_string(diffs *d, const char *name, const char *have, const char *want, bool abbreviate) {
  if (strcmp(have, want) == 0)
    return;
  const int keep = abbreviate && strncmp(have, want, 16) != 0 ? 16 : 1 << 20;
  field(d, name);
  add(&d->t, "'%.*s%s' here, '%.*s%s' %s", keep, have, (int)strlen(have) > keep ? ".." : "", keep, want,
      (int)strlen(want) > keep ? ".." : "", d->there);
}

static void diff_int(diffs *d, const char *name, long long have, long long want) {
  if (have == want)
    return;
  field(d, name);
  add(&d->t, "%lld here, %lld %s", have, want, d->there);
}

static void add_strings(text *t, char *const *v, size_t n) {
  if (n == 0)
    add(t, "none");
  for (size_t i = 0; i < n; i++)
    add(t, "%s%s", i ? "," : "", v[i]);
}

static void diff_strings(diffs *d, const char *name, char *const *have, size_t nh, char *const *want, size_t nw) {
  bool same = nh == nw;
  for (size_t i = 0; same && i < nh; i++)
    same = strcmp(have[i], want[i]) == 0;
  if (same)
    return;
  field(d, name);
  add(&d->t, "'");
  add_strings(&d->t, have, nh);
  add(&d->t, "' here, '");
  add_strings(&d->t, want, nw);
  add(&d->t, "' %s", d->there);
}

static void add_doubles(text *t, const double *v, size_t n, bool exact) {
  if (n == 0)
    add(t, "none");
  for (size_t i = 0; i < n; i++)
    add(t, exact ? "%s%.17g" : "%s%g", i ? "," : "", v[i]);
}

static void diff_doubles(diffs *d, const char *name, const double *have, size_t nh, const double *want, size_t nw) {
  bool same = nh == nw;
  for (size_t i = 0; same && i < nh; i++)
    same = have[i] == want[i];
  if (same)
    return;
  text a = {.n = 0}, b = {.n = 0}; /* %g may print two different grids alike: then every digit */
  add_doubles(&a, have, nh, false);
  add_doubles(&b, want, nw, false);
  const bool exact = strcmp(a.s, b.s) == 0;
  field(d, name);
  add(&d->t, "'");
  add_doubles(&d->t, have, nh, exact);
  add(&d->t, "' here, '");
  add_doubles(&d->t, want, nw, exact);
  add(&d->t, "' %s", d->there);
}

int pa_settings_check(const char *store, const Palign__Settings *have, const Palign__Settings *want) {
  char heading[512];
  snprintf(heading, sizeof heading, "%s: this store was made with other settings:", store);
  return pa_settings_compare(heading, "asked", have, want);
}

int pa_settings_compare(const char *heading, const char *there, const Palign__Settings *have,
                        const Palign__Settings *want) {
  static const Palign__Settings none = PALIGN__SETTINGS__INIT;
  const Palign__Settings *h = have ? have : &none, *w = want ? want : &none;
  diffs d = {.t.n = 0, .there = there};
  add(&d.t, "%s", heading);
  d.head = d.t.n;
  diff_string(&d, "model_fingerprint", h->model_fingerprint, w->model_fingerprint, true);
  diff_string(&d, "inventory_fingerprint", h->inventory_fingerprint, w->inventory_fingerprint, true);
  diff_strings(&d, "methods", h->methods, h->n_methods, w->methods, w->n_methods);
  diff_string(&d, "mode", h->mode, w->mode, false);
  if (h->run_seed != w->run_seed) { /* a u64 */
    field(&d, "run_seed");
    add(&d.t, "%" PRIu64 " here, %" PRIu64 " %s", h->run_seed, w->run_seed, there);
  }
  if (h->lowercase_items != w->lowercase_items) {
    field(&d, "lowercase_items");
    add(&d.t, "%s here, %s %s", h->lowercase_items ? "true" : "false", w->lowercase_items ? "true" : "false", there);
  }
  diff_int(&d, "holdout_per_trait", h->holdout_per_trait, w->holdout_per_trait);
  diff_doubles(&d, "alphas", h->alphas, h->n_alphas, w->alphas, w->n_alphas);
  diff_int(&d, "top_k", h->top_k, w->top_k);
  diff_string(&d, "subjects_file", h->subjects_file, w->subjects_file, false);
  /* the weight format: "" in a store from before it was recorded (fp32 then);
   * "" asked: not known yet (--weights auto, before the workers said) */
  if (w->weights[0])
    diff_string(&d, "weights", h->weights[0] ? h->weights : "fp32", w->weights, false);
  /* DPO's settings where both have them; one side without DPO is one difference */
  static const Palign__DpoSettings no_dpo = PALIGN__DPO_SETTINGS__INIT;
  const Palign__DpoSettings *hd = h->dpo ? h->dpo : &no_dpo, *wd = w->dpo ? w->dpo : &no_dpo;
  if (!h->dpo != !w->dpo) {
    field(&d, "dpo");
    add(&d.t, "%s here, %s %s", h->dpo ? "set" : "none", w->dpo ? "set" : "none", there);
    hd = wd; /* nothing more to compare */
  }
  diff_int(&d, "dpo.epochs", hd->epochs, wd->epochs);
  diff_int(&d, "dpo.batch", hd->batch, wd->batch);
  diff_int(&d, "dpo.rank", hd->rank, wd->rank);
  const struct {
    const char *name;
    double have, want;
  } dd[] = {{"dpo.lr", hd->lr, wd->lr},
            {"dpo.beta", hd->beta, wd->beta},
            {"dpo.alpha", hd->alpha, wd->alpha},
            {"dpo.weight_decay", hd->weight_decay, wd->weight_decay},
            {"dpo.adam_beta1", hd->adam_beta1, wd->adam_beta1},
            {"dpo.adam_beta2", hd->adam_beta2, wd->adam_beta2},
            {"dpo.adam_eps", hd->adam_eps, wd->adam_eps}};
  for (size_t i = 0; i < sizeof dd / sizeof dd[0]; i++)
    diff_doubles(&d, dd[i].name, &dd[i].have, 1, &dd[i].want, 1);
  diff_doubles(&d, "benchmark_delay", &h->benchmark_delay, 1, &w->benchmark_delay, 1);
  diff_doubles(&d, "benchmark_cv", &h->benchmark_cv, 1, &w->benchmark_cv, 1);
  return d.t.n == d.head ? PA_OK : pa_error(PA_EINVAL, "%s", d.t.s);
}

/* ---- writing ---------------------------------------------------------------- */

const char *pa_shard_name(int run, int rank, char buf[64]) {
  snprintf(buf, 64, "run%d-rank%d.pal", run, rank);
  return buf;
}

struct pa_shard_writer {
  int fd;
  char *dir, *path; /* STORE/shards and the part being written */
  int run, rank, part;
  uint64_t size, limit; /* bytes in this part; where the next part begins */
  uint8_t *buf;         /* the last record framed, reused */
  size_t cap;
  bool written; /* any byte appended */
};

const char *pa_shard_part_name(int run, int rank, int part, char buf[64]) {
  if (part <= 1)
    return pa_shard_name(run, rank, buf);
  snprintf(buf, 64, "run%d-rank%d.p%d.pal", run, rank, part);
  return buf;
}

/* (run, rank, part) of a shard file name; false for any other name. */
static bool parse_shard_name(const char *name, long key[3]) {
  int used = 0;
  key[2] = 1;
  if (sscanf(name, "run%ld-rank%ld.pal%n", &key[0], &key[1], &used) == 2 && used > 0 && !name[used])
    return true;
  used = 0;
  return sscanf(name, "run%ld-rank%ld.p%ld.pal%n", &key[0], &key[1], &key[2], &used) == 3 && used > 0 && !name[used] &&
         key[2] >= 2;
}

const char *pa_shard_part_base(const char *name, char buf[64]) {
  long k[3];
  if (parse_shard_name(name, k) && k[0] <= INT32_MAX && k[1] <= INT32_MAX)
    return pa_shard_name((int)k[0], (int)k[1], buf);
  snprintf(buf, 64, "%s", name);
  return buf;
}

/* A new part file: O_EXCL, then the directory synced so that it survives a crash. */
static int open_part(pa_shard_writer *w) {
  char name[64];
  char *path = join(w->dir, pa_shard_part_name(w->run, w->rank, w->part, name));
  if (!path)
    return PA_ENOMEM;
  /* a new file, never one another run left: a run appends only after its own records */
  const int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  int rc = PA_OK;
  if (fd < 0 && errno == EEXIST)
    rc = pa_error(PA_EIO, "%s: exists already (is another job writing to this store?)", path);
  else if (fd < 0)
    rc = pa_error(PA_EIO, "%s: cannot create: %s", path, strerror(errno));
  else
    rc = pa_sync_dir(w->dir);
  if (rc) {
    if (fd >= 0)
      close(fd);
    free(path);
    return rc;
  }
  free(w->path);
  w->path = path, w->fd = fd, w->size = 0;
  return PA_OK;
}

void pa_shard_set_limit(pa_shard_writer *w, uint64_t bytes) { w->limit = bytes ? bytes : PA_STORE_SHARD_BYTES; }

size_t pa_record_frame(const uint8_t *payload, uint32_t len, uint8_t *buf) {
  const uint32_t crc = crc_of(payload, len); /* before the head, which may overwrite an overlapping payload */
  if (len)
    memmove(buf + PA_STORE_RECORD_HEAD, payload, len);
  memcpy(buf, MAGIC, 4);
  put_u32(buf + 4, len);
  put_u32(buf + 8, crc);
  return PA_STORE_RECORD_HEAD + (size_t)len;
}

/* ---- a run's hold on the store ------------------------------------------- */

struct pa_store_guard {
  int fd;
};

int pa_store_lock(const char *store, pa_store_guard **out) {
  *out = NULL;
  int rc = ensure_store(store);
  char *path = rc ? NULL : join(store, "lock");
  if (rc || !path)
    return rc ? rc : PA_ENOMEM;
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) {
    rc = pa_error(PA_EIO, "%s: cannot open: %s", path, strerror(errno));
    free(path);
    return rc;
  }
  struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
  if (fcntl(fd, F_SETLK, &fl) != 0) {
    const int e = errno;
    struct flock who = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (e == EACCES || e == EAGAIN) {
      if (fcntl(fd, F_GETLK, &who) == 0 && who.l_type != F_UNLCK)
        rc = pa_error(PA_EINVAL,
                      "%s: another job (process %ld) is writing to this store; wait for it or use another store", store,
                      (long)who.l_pid);
      else
        rc = pa_error(PA_EINVAL, "%s: another job is writing to this store; wait for it or use another store", store);
    } else {
      rc = pa_error(PA_EIO, "%s: cannot lock: %s", path, strerror(e));
    }
    close(fd);
    free(path);
    return rc;
  }
  free(path);
  pa_store_guard *l = malloc(sizeof *l);
  if (!l) {
    close(fd);
    return pa_error(PA_ENOMEM, "%s: no memory", store);
  }
  l->fd = fd;
  *out = l;
  return PA_OK;
}

void pa_store_unlock(pa_store_guard *l) {
  if (!l)
    return;
  close(l->fd); /* closing drops the lock */
  free(l);
}

static int shard_names(const char *dir, char ***names, size_t *n);

int pa_store_next_run(const char *store, const Palign__Manifest *m, int *run) {
  long last = m ? (long)m->n_runs : 0;
  char *dir = join(store, "shards");
  if (!dir)
    return PA_ENOMEM;
  char **names = NULL;
  size_t n = 0;
  int rc = shard_names(dir, &names, &n);
  for (size_t i = 0; i < n; i++) {
    long r;
    if (sscanf(names[i], "run%ld-", &r) == 1 && r > last)
      last = r;
    free(names[i]);
  }
  free(names);
  free(dir);
  if (!rc && last >= INT32_MAX)
    rc = pa_error(PA_EFORMAT, "%s: run numbers are used up (%ld)", store, last);
  *run = rc ? 0 : (int)last + 1;
  return rc;
}

int pa_shard_open(const char *store, int run, int rank, pa_shard_writer **out) {
  *out = NULL;
  int rc = ensure_store(store);
  if (rc)
    return rc;
  pa_shard_writer *w = calloc(1, sizeof *w);
  if (!w || !(w->dir = join(store, "shards"))) {
    free(w);
    return pa_error(PA_ENOMEM, "%s: no memory for a shard", store);
  }
  w->fd = -1, w->run = run, w->rank = rank, w->part = 1, w->limit = PA_STORE_SHARD_BYTES;
  if ((rc = open_part(w))) {
    free(w->dir);
    free(w);
    return rc;
  }
  *out = w;
  return PA_OK;
}

int pa_shard_append(pa_shard_writer *w, const Palign__SubjectResult *r) {
  const size_t n = palign__subject_result__get_packed_size(r);
  if (n > PA_STORE_MAX_RECORD)
    return pa_error(PA_EINVAL, "%s: the record of subject '%s' is %zu bytes, over the limit of %u", w->path,
                    r->subject_id ? r->subject_id : "", n, PA_STORE_MAX_RECORD);
  const size_t total = PA_STORE_RECORD_HEAD + n;
  if (total > w->cap) {
    uint8_t *grown = realloc(w->buf, total);
    if (!grown)
      return pa_error(PA_ENOMEM, "%s: no memory for a record of %zu bytes", w->path, total);
    w->buf = grown, w->cap = total;
  }
  /* a full part is left as it is and the record begins the next one */
  if (w->size > 0 && w->size + total > w->limit) {
    const int old_fd = w->fd;
    w->part++;
    int rc = open_part(w);
    if (rc) {
      w->part--;
      return rc;
    }
    if (close(old_fd) != 0)
      return pa_error(PA_EIO, "%s: closing the previous part failed: %s", w->path, strerror(errno));
  }
  uint8_t *payload = w->buf + PA_STORE_RECORD_HEAD;
  if (palign__subject_result__pack(r, payload) != n)
    return pa_error(PA_EINVAL, "%s: protobuf-c packed another size than it announced (%zu bytes)", w->path, n);
  memcpy(w->buf, MAGIC, 4);
  put_u32(w->buf + 4, (uint32_t)n);
  put_u32(w->buf + 8, crc_of(payload, n));
  /* one write for the whole record: a short one happens only on a full disk
   * or a signal, and leaves a torn record that readers skip */
  w->written = true;
  for (size_t done = 0; done < total;) {
    const ssize_t k = write(w->fd, w->buf + done, total - done);
    if (k < 0 && errno == EINTR)
      continue;
    if (k <= 0)
      return pa_error(PA_EIO, "%s: write failed after %zu of %zu bytes: %s", w->path, done, total,
                      k < 0 ? strerror(errno) : "nothing written");
    done += (size_t)k;
    w->size += (uint64_t)k;
  }
  while (fsync(w->fd) != 0)
    if (errno != EINTR)
      return pa_error(PA_EIO, "%s: fsync failed: %s", w->path, strerror(errno));
  return PA_OK;
}

int pa_shard_close(pa_shard_writer *w) {
  if (!w)
    return PA_OK;
  int rc = PA_OK;
  if (close(w->fd) != 0)
    rc = pa_error(PA_EIO, "%s: close failed: %s", w->path, strerror(errno));
  free(w->buf);
  free(w->path);
  free(w->dir);
  free(w);
  return rc;
}

int pa_shard_discard(pa_shard_writer *w) {
  if (!w)
    return PA_OK;
  int rc = PA_OK;
  if (!w->written) {
    if (unlink(w->path) != 0)
      rc = pa_error(PA_EIO, "%s: cannot remove: %s", w->path, strerror(errno));
    char *slash = strrchr(w->path, '/');
    if (!rc && slash) {
      *slash = '\0';
      rc = pa_sync_dir(w->path);
      *slash = '/';
    }
  }
  const int crc = pa_shard_close(w);
  return rc ? rc : crc;
}

/* ---- reading ---------------------------------------------------------------- */

const char *pa_record_status_str(pa_record_status s) {
  switch (s) {
  case PA_RECORD_OK: return "ok";
  case PA_RECORD_TORN: return "torn";
  case PA_RECORD_CHECKSUM: return "checksum";
  case PA_RECORD_FRAME: return "frame";
  case PA_RECORD_PROTOBUF: return "protobuf";
  case PA_RECORD_DUPLICATE: return "duplicate";
  }
  return "unknown";
}

/* The subject ids seen so far: open addressing, at most half full. */
typedef struct {
  char **keys;
  uint64_t *hashes;
  size_t cap, n;
} idset;

static uint64_t hash_str(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++)
    h = (h ^ (uint8_t)*s) * 1099511628211ull;
  return h;
}

static void idset_free(idset *s) {
  for (size_t i = 0; i < s->cap; i++)
    free(s->keys[i]);
  free(s->keys);
  free(s->hashes);
  memset(s, 0, sizeof *s);
}

static int idset_grow(idset *s) {
  const size_t cap = s->cap ? 2 * s->cap : 1024;
  char **keys = calloc(cap, sizeof *keys);
  uint64_t *hashes = malloc(cap * sizeof *hashes);
  if (!keys || !hashes) {
    free(keys), free(hashes);
    return pa_error(PA_ENOMEM, "no memory for %zu subject ids", s->n);
  }
  for (size_t i = 0; i < s->cap; i++) {
    if (!s->keys[i])
      continue;
    size_t j = s->hashes[i] & (cap - 1);
    while (keys[j])
      j = (j + 1) & (cap - 1);
    keys[j] = s->keys[i], hashes[j] = s->hashes[i];
  }
  free(s->keys), free(s->hashes);
  s->keys = keys, s->hashes = hashes, s->cap = cap;
  return PA_OK;
}

/* 1 if id was added, 0 if it was there, or a negative code. */
static int idset_add(idset *s, const char *id) {
  if (2 * (s->n + 1) > s->cap) {
    int rc = idset_grow(s);
    if (rc)
      return rc;
  }
  const uint64_t h = hash_str(id);
  size_t j = h & (s->cap - 1);
  for (; s->keys[j]; j = (j + 1) & (s->cap - 1))
    if (s->hashes[j] == h && strcmp(s->keys[j], id) == 0)
      return 0;
  if (!(s->keys[j] = strdup(id)))
    return pa_error(PA_ENOMEM, "no memory for subject ids");
  s->hashes[j] = h;
  s->n++;
  return 1;
}

/* Whether a whole record with a matching checksum starts at o; its payload
 * length in *len. */
static bool frame_at(const uint8_t *d, uint64_t n, uint64_t o, uint32_t *len) {
  if (n - o < PA_STORE_RECORD_HEAD || memcmp(d + o, MAGIC, 4) != 0)
    return false;
  const uint32_t l = get_u32(d + o + 4);
  if (l > PA_STORE_MAX_RECORD || l > n - o - PA_STORE_RECORD_HEAD)
    return false;
  if (crc_of(d + o + PA_STORE_RECORD_HEAD, l) != get_u32(d + o + 8))
    return false;
  *len = l;
  return true;
}

/* The first offset >= o where a whole record starts, or n. Each candidate
 * costs a checksum of its claimed length, taken from *budget: a shard
 * crafted with a plausible head every few bytes would otherwise cost time
 * quadratic in its size. With the budget spent, the rest counts as damaged. */
static uint64_t next_frame(const uint8_t *d, uint64_t n, uint64_t o, uint64_t *budget) {
  uint32_t len;
  while (o < n) {
    const uint8_t *p = memchr(d + o, MAGIC[0], (size_t)(n - o));
    if (!p)
      return n;
    o = (uint64_t)(p - d);
    if (n - o >= PA_STORE_RECORD_HEAD && memcmp(d + o, MAGIC, 4) == 0) {
      const uint64_t cost = get_u32(d + o + 4); /* frame_at checksums only plausible lengths */
      if (cost <= PA_STORE_MAX_RECORD && cost <= n - o - PA_STORE_RECORD_HEAD) {
        if (cost > *budget)
          return n;
        *budget -= cost;
      }
    }
    if (frame_at(d, n, o, &len))
      return o;
    o++;
  }
  return n;
}

/* Whether the bytes from o to the end are the start of a record a writer
 * did not finish: a (partial) magic and, where present, a plausible length
 * running past the end. */
static bool torn_at(const uint8_t *d, uint64_t n, uint64_t o) {
  const uint64_t rest = n - o;
  if (memcmp(d + o, MAGIC, rest < 4 ? (size_t)rest : 4) != 0)
    return false;
  if (rest < 8)
    return true;
  const uint32_t l = get_u32(d + o + 4);
  return l <= PA_STORE_MAX_RECORD && (uint64_t)l + PA_STORE_RECORD_HEAD > rest;
}

typedef struct {
  pa_store_visit visit;
  void *ctx;
  size_t *counts;
  idset seen;
} reader;

static int emit(reader *rd, pa_record_info *info, const Palign__SubjectResult *r) {
  if (rd->counts)
    rd->counts[info->status]++;
  return rd->visit ? rd->visit(rd->ctx, info, r) : 0;
}

static int emit_stretch(reader *rd, const char *shard, uint64_t o, uint64_t len, pa_record_status st) {
  pa_record_info info = {.shard = shard, .offset = o, .length = len, .status = st};
  return emit(rd, &info, NULL);
}

/* A record whose checksum holds, at o. */
static int read_record(reader *rd, const char *path, const char *shard, const uint8_t *d, uint64_t o, uint32_t len) {
  pa_record_info info = {.shard = shard, .offset = o, .length = PA_STORE_RECORD_HEAD + (uint64_t)len};
  Palign__SubjectResult *r = palign__subject_result__unpack(NULL, len, d + o + PA_STORE_RECORD_HEAD);
  if (!r) {
    info.status = PA_RECORD_PROTOBUF;
    return emit(rd, &info, NULL);
  }
  const char *id = r->subject_id ? r->subject_id : "";
  if (!*id) { /* every record names its subject: an empty message is not one */
    palign__subject_result__free_unpacked(r, NULL);
    info.status = PA_RECORD_PROTOBUF;
    return emit(rd, &info, NULL);
  }
  snprintf(info.subject_id, sizeof info.subject_id, "%s", id);
  int rc = idset_add(&rd->seen, id);
  if (rc < 0) {
    palign__subject_result__free_unpacked(r, NULL);
    return pa_error_prefix(rc, "%s: ", path);
  }
  info.status = rc == 1 ? PA_RECORD_OK : PA_RECORD_DUPLICATE;
  rc = emit(rd, &info, info.status == PA_RECORD_OK ? r : NULL);
  palign__subject_result__free_unpacked(r, NULL);
  return rc;
}

/* Walks one shard's bytes. Damage costs a forward search for the next whole
 * record; intact records cost their checksum only. */
static int read_shard(reader *rd, const char *path, const char *shard, const uint8_t *d, uint64_t n) {
  uint64_t o = 0, budget = 8 * n + (1u << 20); /* checksummed bytes the search for records may cost */
  int rc = PA_OK;
  while (!rc && o < n) {
    uint32_t len;
    if (frame_at(d, n, o, &len)) {
      rc = read_record(rd, path, shard, d, o, len);
      o += PA_STORE_RECORD_HEAD + (uint64_t)len;
      continue;
    }
    /* Damage: skip to the next whole record. A head with a plausible length
     * but a wrong checksum is reported as one record, though its length may
     * be the damaged part: resuming at the next whole record rather than at
     * its end keeps a wrong length from hiding records behind it. */
    const uint64_t v = next_frame(d, n, o + 1, &budget);
    pa_record_status st = PA_RECORD_FRAME;
    uint64_t end = o; /* of the damaged record, if it has a plausible length */
    if (n - o >= PA_STORE_RECORD_HEAD && memcmp(d + o, MAGIC, 4) == 0) {
      const uint32_t l = get_u32(d + o + 4);
      if (l <= PA_STORE_MAX_RECORD && l <= n - o - PA_STORE_RECORD_HEAD)
        st = PA_RECORD_CHECKSUM, end = o + PA_STORE_RECORD_HEAD + l;
    }
    uint64_t stop = v;
    if (v == n) { /* nothing whole follows: the shard may end in a record a killed writer left unfinished */
      uint64_t t = end;
      while (t < n && !torn_at(d, n, t))
        t++;
      stop = t;
    }
    if (stop > o && (rc = emit_stretch(rd, shard, o, stop - o, st)))
      break;
    if (stop < v) {
      rc = emit_stretch(rd, shard, stop, n - stop, PA_RECORD_TORN);
      break;
    }
    o = v;
  }
  return rc;
}

static bool is_shard_name(const char *s) {
  const size_t n = strlen(s);
  return n > 4 && strcmp(s + n - 4, ".pal") == 0;
}

/* Shards in the order they were written: by run, rank and part (numbers, not
 * text: run10 after run9); other *.pal names after them, by name. */
static int cmp_names(const void *a, const void *b) {
  const char *x = *(char *const *)a, *y = *(char *const *)b;
  long kx[3], ky[3];
  const bool px = parse_shard_name(x, kx), py = parse_shard_name(y, ky);
  if (px != py)
    return px ? -1 : 1;
  for (int i = 0; px && i < 3; i++)
    if (kx[i] != ky[i])
      return kx[i] < ky[i] ? -1 : 1;
  return strcmp(x, y);
}

/* The *.pal names under dir, sorted; none if dir does not exist. */
static int shard_names(const char *dir, char ***names, size_t *n) {
  *names = NULL;
  *n = 0;
  DIR *d = opendir(dir);
  if (!d)
    return errno == ENOENT ? PA_OK : pa_error(PA_EIO, "%s: cannot list the directory: %s", dir, strerror(errno));
  size_t cap = 0;
  int rc = PA_OK;
  errno = 0;
  for (struct dirent *e; !rc && (e = readdir(d)); errno = 0) {
    if (!is_shard_name(e->d_name))
      continue;
    if (*n == cap) {
      cap = cap ? 2 * cap : 16;
      char **grown = realloc(*names, cap * sizeof *grown);
      if (!grown) {
        rc = pa_error(PA_ENOMEM, "%s: no memory for the shard names", dir);
        break;
      }
      *names = grown;
    }
    if (!((*names)[*n] = strdup(e->d_name)))
      rc = pa_error(PA_ENOMEM, "%s: no memory for the shard names", dir);
    else
      ++*n;
  }
  if (!rc && errno)
    rc = pa_error(PA_EIO, "%s: cannot list the directory: %s", dir, strerror(errno));
  closedir(d);
  if (!rc && *n > 1)
    qsort(*names, *n, sizeof **names, cmp_names);
  return rc;
}

int pa_store_shards(const char *store, char ***names, size_t *n) {
  char *dir = join(store, "shards");
  if (!dir)
    return PA_ENOMEM;
  const int rc = shard_names(dir, names, n);
  free(dir);
  return rc;
}

int pa_store_record_at(const char *store, const char *shard, uint64_t offset, uint64_t length,
                       Palign__SubjectResult **out) {
  *out = NULL;
  if (length < PA_STORE_RECORD_HEAD || length > PA_STORE_RECORD_HEAD + (uint64_t)PA_STORE_MAX_RECORD ||
      strchr(shard, '/') || !is_shard_name(shard))
    return pa_error(PA_EFORMAT, "%s: no record of %llu bytes in shard '%s'", store, (unsigned long long)length, shard);
  char *dir = join(store, "shards"), *path = dir ? join(dir, shard) : NULL;
  uint8_t *buf = path ? malloc(length) : NULL;
  int rc = buf ? PA_OK : pa_error(PA_ENOMEM, "%s: no memory for a record", store);
  uint64_t size;
  const int fd = rc ? -1 : pa_open_regular(path, &size);
  if (!rc && fd < 0)
    rc = fd;
  for (uint64_t done = 0; !rc && done < length;) {
    const ssize_t k = pread(fd, buf + done, length - done, (off_t)(offset + done));
    if (k < 0 && errno == EINTR)
      continue;
    if (k < 0)
      rc = pa_error(PA_EIO, "%s: read failed: %s", path, strerror(errno));
    else if (k == 0)
      rc = pa_error(PA_EFORMAT, "%s: no record at offset %llu (the file ends)", path, (unsigned long long)offset);
    done += k > 0 ? (uint64_t)k : 0;
  }
  if (fd >= 0)
    close(fd);
  uint32_t len;
  if (!rc && !(frame_at(buf, length, 0, &len) && PA_STORE_RECORD_HEAD + (uint64_t)len == length))
    rc = pa_error(PA_EFORMAT, "%s: no valid record at offset %llu", path, (unsigned long long)offset);
  if (!rc && !(*out = palign__subject_result__unpack(NULL, len, buf + PA_STORE_RECORD_HEAD)))
    rc = pa_error(PA_EFORMAT, "%s offset %llu: the record is not a SubjectResult", path, (unsigned long long)offset);
  free(buf), free(path), free(dir);
  return rc;
}

int pa_store_read(const char *store, pa_store_visit visit, void *ctx, size_t counts[6]) {
  if (counts)
    memset(counts, 0, 6 * sizeof *counts);
  struct stat sb;
  if (stat(store, &sb) != 0)
    return pa_error(errno == ENOENT ? PA_ENOTFOUND : PA_EIO, "%s: no store here: %s", store, strerror(errno));
  if (!S_ISDIR(sb.st_mode))
    return pa_error(PA_ENOTFOUND, "%s: no store here (not a directory)", store);
  char *dir = join(store, "shards");
  if (!dir)
    return PA_ENOMEM;
  char **names = NULL;
  size_t n = 0;
  int rc = shard_names(dir, &names, &n);
  reader rd = {.visit = visit, .ctx = ctx, .counts = counts};
  for (size_t i = 0; !rc && i < n; i++) {
    char *path = join(dir, names[i]);
    if (!path) {
      rc = PA_ENOMEM;
      break;
    }
    pa_mapped m = {0};
    rc = pa_map_file(path, 0, "nothing", &m);
    if (rc == PA_ENOTFOUND) /* removed while we read: an I/O problem, not a missing store */
      rc = PA_EIO;
    if (!rc)
      rc = read_shard(&rd, path, names[i], m.data, m.size);
    pa_unmap_file(&m);
    free(path);
  }
  idset_free(&rd.seen);
  for (size_t i = 0; i < n; i++)
    free(names[i]);
  free(names);
  free(dir);
  return rc;
}
