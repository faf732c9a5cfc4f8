/* The store's index, STORE/index.pb (index.h). */
#include "index.h"

#include "fileio.h"
#include "status.h"
#include "store.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define INDEX_FORMAT 1

static char *join(const char *a, const char *b) {
  const size_t n = strlen(a) + strlen(b) + 2;
  char *p = malloc(n);
  if (p)
    snprintf(p, n, "%s/%s", a, b);
  return p;
}

/* Size and modification time of STORE/shards/name; false when it cannot be read. */
static bool shard_stat(const char *store, const char *name, uint64_t *size, int64_t *mtime_ns) {
  char *dir = join(store, "shards"), *path = dir ? join(dir, name) : NULL;
  struct stat sb;
  const bool ok = path && stat(path, &sb) == 0;
  if (ok)
    *size = (uint64_t)sb.st_size, *mtime_ns = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;
  free(path), free(dir);
  return ok;
}

static void free_names(char **names, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(names[i]);
  free(names);
}

/* ---- building ----------------------------------------------------------------- */

typedef struct {
  char *id;
  uint32_t shard;
  uint64_t offset, length;
} entry;

typedef struct {
  char **names; /* the shards, reading order */
  size_t n_names;
  entry *e;
  size_t n, cap;
  int rc;
} build_ctx;

static int collect(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  build_ctx *c = ctx;
  if (info->status != PA_RECORD_OK || !r)
    return 0; /* damage and later duplicates: the readers skip them too */
  uint32_t k = 0;
  while (k < c->n_names && strcmp(c->names[k], info->shard))
    k++;
  if (k == c->n_names) /* a shard that appeared while we read: the index will not match it */
    return c->rc = pa_error(PA_EIO, "shard %s appeared while the index was built; build it again", info->shard);
  if (c->n == c->cap) {
    const size_t cap = c->cap ? 2 * c->cap : 1024;
    entry *grown = realloc(c->e, cap * sizeof *grown);
    if (!grown)
      return c->rc = pa_error(PA_ENOMEM, "no memory for the index");
    c->e = grown, c->cap = cap;
  }
  if (!(c->e[c->n].id = strdup(r->subject_id)))
    return c->rc = pa_error(PA_ENOMEM, "no memory for the index");
  c->e[c->n].shard = k, c->e[c->n].offset = info->offset, c->e[c->n].length = info->length;
  c->n++;
  return 0;
}

static int cmp_entry(const void *a, const void *b) { return strcmp(((const entry *)a)->id, ((const entry *)b)->id); }

int pa_index_build(const char *store, size_t *n_entries, uint64_t *bytes) {
  if (n_entries)
    *n_entries = 0;
  build_ctx c = {0};
  int rc = pa_store_shards(store, &c.names, &c.n_names);
  Palign__IndexShard *shards = NULL, **shard_p = NULL;
  if (!rc) {
    shards = calloc(c.n_names + 1, sizeof *shards);
    shard_p = calloc(c.n_names + 1, sizeof *shard_p);
    if (!shards || !shard_p)
      rc = pa_error(PA_ENOMEM, "no memory for the index");
  }
  /* the shards' sizes before the reading: a shard appended to meanwhile
   * then no longer matches, and the index is not used until rebuilt */
  for (size_t i = 0; !rc && i < c.n_names; i++) {
    palign__index_shard__init(&shards[i]);
    shards[i].name = c.names[i];
    if (!shard_stat(store, c.names[i], &shards[i].size, &shards[i].mtime_ns))
      rc = pa_error(PA_EIO, "%s/shards/%s: cannot read: %s", store, c.names[i], strerror(errno));
    shard_p[i] = &shards[i];
  }
  if (!rc)
    rc = pa_store_read(store, collect, &c, NULL);
  if (!rc)
    rc = c.rc;
  Palign__IndexEntry *entries = NULL, **entry_p = NULL;
  if (!rc) {
    if (c.n) /* c.e is NULL without records, which qsort may not take */
      qsort(c.e, c.n, sizeof *c.e, cmp_entry);
    entries = calloc(c.n + 1, sizeof *entries);
    entry_p = calloc(c.n + 1, sizeof *entry_p);
    if (!entries || !entry_p)
      rc = pa_error(PA_ENOMEM, "no memory for the index");
  }
  for (size_t i = 0; !rc && i < c.n; i++) {
    palign__index_entry__init(&entries[i]);
    entries[i].subject_id = c.e[i].id;
    entries[i].shard = c.e[i].shard, entries[i].offset = c.e[i].offset, entries[i].length = (uint32_t)c.e[i].length;
    entry_p[i] = &entries[i];
  }
  if (!rc) {
    Palign__StoreIndex ix = PALIGN__STORE_INDEX__INIT;
    ix.format = INDEX_FORMAT;
    ix.n_shards = c.n_names, ix.shards = shard_p;
    ix.n_entries = c.n, ix.entries = entry_p;
    const size_t len = palign__store_index__get_packed_size(&ix);
    uint8_t *buf = malloc(len ? len : 1);
    char *path = join(store, "index.pb");
    if (!buf || !path)
      rc = pa_error(PA_ENOMEM, "no memory for the index");
    else if (palign__store_index__pack(&ix, buf) != len)
      rc = pa_error(PA_EINVAL, "the index did not pack to its size");
    else
      rc = pa_write_atomic(path, &(pa_chunk){buf, len}, 1);
    if (!rc && n_entries)
      *n_entries = c.n;
    if (!rc && bytes)
      *bytes = len;
    free(buf), free(path);
  }
  for (size_t i = 0; i < c.n; i++)
    free(c.e[i].id);
  free(c.e), free(entries), free(entry_p), free(shards), free(shard_p);
  free_names(c.names, c.n_names);
  return rc;
}

/* ---- using it ------------------------------------------------------------------- */

pa_index_state pa_index_check(const char *store, Palign__StoreIndex **out) {
  *out = NULL;
  char *path = join(store, "index.pb");
  pa_mapped m = {0};
  const int mrc = path ? pa_map_file(path, 0, "nothing", &m) : PA_ENOMEM;
  free(path);
  pa_error_clear();
  if (mrc)
    return PA_INDEX_NONE;
  Palign__StoreIndex *ix = palign__store_index__unpack(NULL, m.size, m.data);
  pa_unmap_file(&m);
  bool readable = ix && ix->format == INDEX_FORMAT;
  for (size_t i = 0; readable && i < ix->n_entries; i++) /* well formed: in range and sorted */
    readable = ix->entries[i]->shard < ix->n_shards &&
               (i == 0 || strcmp(ix->entries[i - 1]->subject_id, ix->entries[i]->subject_id) < 0);
  if (!readable) {
    if (ix)
      palign__store_index__free_unpacked(ix, NULL);
    return PA_INDEX_UNREADABLE;
  }
  /* every shard file now, the same as when indexed */
  char **names = NULL;
  size_t n = 0;
  bool same = pa_store_shards(store, &names, &n) == PA_OK && n == ix->n_shards;
  pa_error_clear();
  for (size_t i = 0; same && i < n; i++) {
    uint64_t size;
    int64_t mtime;
    same = !strcmp(names[i], ix->shards[i]->name) && shard_stat(store, names[i], &size, &mtime) &&
           size == ix->shards[i]->size && mtime == ix->shards[i]->mtime_ns;
  }
  free_names(names, n);
  if (!same) {
    palign__store_index__free_unpacked(ix, NULL);
    return PA_INDEX_STALE;
  }
  *out = ix;
  return PA_INDEX_CURRENT;
}

int pa_index_lookup(const char *store, const char *id, Palign__SubjectResult **out, bool *used) {
  *out = NULL;
  *used = false;
  Palign__StoreIndex *ix;
  if (pa_index_check(store, &ix) != PA_INDEX_CURRENT)
    return PA_OK;
  size_t lo = 0, hi = ix->n_entries;
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    const int c = strcmp(ix->entries[mid]->subject_id, id);
    if (c == 0) {
      lo = mid;
      break;
    }
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  int rc = PA_OK;
  if (lo < ix->n_entries && !strcmp(ix->entries[lo]->subject_id, id)) {
    const Palign__IndexEntry *e = ix->entries[lo];
    Palign__SubjectResult *r = NULL;
    /* the record itself is checked (frame, checksum, id): anything wrong and
     * the caller reads the shards instead */
    if (pa_store_record_at(store, ix->shards[e->shard]->name, e->offset, e->length, &r) == PA_OK && r->subject_id &&
        !strcmp(r->subject_id, id)) {
      *out = r, *used = true;
    } else {
      if (r)
        palign__subject_result__free_unpacked(r, NULL);
      pa_error_clear();
    }
  }
  /* not in the index: the caller's scan says why (absent, or only damaged records) */
  palign__store_index__free_unpacked(ix, NULL);
  return rc;
}
