/* palign-worker end to end, as a user runs it: the built binaries under
 * mpirun on a tiny random model and the PAPI data.
 *
 *  - the records do not depend on the rank count, and they are what
 *    `palign eval` prints;
 *  - a job that loses a worker (SIGKILL) or is stopped (SIGTERM) resumes: a
 *    rerun stores every subject exactly once;
 *  - damaged records (a flipped byte, a truncated tail) are reported by
 *    `palign query`, skipped, and their subjects done again;
 *  - a store refuses a run with other settings and is left untouched;
 *  - bad flags fail with a message;
 *  - (`test_service soak`) a job killed at random moments over many rounds
 *    loses nothing and doubles nothing.
 *
 * Every child runs with PALIGN_TEST_OWNER=<this test's pid> in its
 * environment (mpirun hands it to the ranks): that is how a rank is found in
 * /proc and how leftovers are killed, never by name alone, since other jobs
 * on the machine may run palign-worker too. Every wait has a timeout. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cJSON.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "query.h"
#include "status.h"
#include "store.h"
#include "testutil.h"

#define WORKER   PALIGN_BINARY_DIR "/palign-worker"
#define PALIGN   PALIGN_BINARY_DIR "/palign"
#define CMD_WAIT 300.0 /* seconds any one command may take on a busy 2-core machine */

static char model[512], icl_model[512], papi[4096];
static char owner_env[64];

/* ---- processes ------------------------------------------------------------------- */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sleep_s(double s) {
  struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
  nanosleep(&ts, NULL);
}

static pid_t children[16]; /* started and not yet reaped */

static void track(pid_t pid, bool add) {
  for (int i = 0; i < 16; i++)
    if (add ? children[i] == 0 : children[i] == pid) {
      children[i] = add ? pid : 0;
      return;
    }
}

/* Starts argv[0] with stdout and stderr to log (replaced). */
static pid_t spawn(const char *log, char *const argv[]) {
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
      _exit(126);
    dup2(fd, 1), dup2(fd, 2);
    close(fd);
    setenv("PALIGN_TEST_OWNER", strchr(owner_env, '=') + 1, 1);
    execv(argv[0], argv);
    fprintf(stderr, "cannot run %s\n", argv[0]);
    _exit(127);
  }
  track(pid, true);
  return pid;
}

/* The exit status of pid (128 + the signal if killed), or -1 when it runs past
 * timeout seconds (then it is still running). */
static int wait_for(pid_t pid, double timeout) {
  const double t_end = now_s() + timeout;
  for (;;) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid) {
      track(pid, false);
      return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    }
    assert_true(r == 0);
    if (now_s() > t_end)
      return -1;
    sleep_s(0.02);
  }
}

/* Processes other than this one whose environment holds owner_env (a rank
 * whose mpirun is gone, too); with rank >= 0 only that MPI rank's. */
static int find_ours(int rank, pid_t *out, int max) {
  char want_rank[64];
  snprintf(want_rank, sizeof want_rank, "OMPI_COMM_WORLD_RANK=%d", rank);
  int n = 0;
  DIR *d = opendir("/proc");
  assert_non_null(d);
  for (struct dirent *e; (e = readdir(d)) && n < max;) {
    if (!isdigit((unsigned char)e->d_name[0]))
      continue;
    const pid_t pid = (pid_t)atol(e->d_name);
    if (pid == getpid())
      continue;
    char path[64], buf[1 << 15];
    snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
    FILE *f = fopen(path, "rb");
    if (!f)
      continue;
    const size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[len] = '\0';
    bool mine = false, ranked = rank < 0;
    for (size_t i = 0; i < len; i += strlen(buf + i) + 1) {
      mine |= !strcmp(buf + i, owner_env);
      ranked |= !strcmp(buf + i, want_rank);
    }
    if (mine && ranked)
      out[n++] = pid;
  }
  closedir(d);
  return n;
}

/* Whether pid is a palign-worker (not mpirun, not a shell). */
static bool is_worker(pid_t pid) {
  char path[64], comm[64] = "";
  snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
  FILE *f = fopen(path, "r");
  if (!f)
    return false;
  if (!fgets(comm, sizeof comm, f))
    comm[0] = '\0';
  fclose(f);
  return !strcmp(comm, "palign-worker\n");
}

/* Kills whatever this test started that still runs: the children, then any
 * process with our mark (ranks outlive mpirun when it is killed). */
static void kill_leftovers(void) {
  for (int i = 0; i < 16; i++)
    if (children[i] > 0) {
      kill(children[i], SIGKILL);
      waitpid(children[i], NULL, 0);
      children[i] = 0;
    }
  pid_t p[64];
  const int n = find_ours(-1, p, 64);
  for (int i = 0; i < n; i++)
    kill(p[i], SIGKILL);
}

static int teardown_test(void **state) {
  (void)state;
  kill_leftovers();
  return 0;
}

/* Runs argv to its end with output to log; fails the test if it hangs. */
static int run_argv(const char *log, char *const argv[]) {
  const pid_t pid = spawn(log, argv);
  const int rc = wait_for(pid, CMD_WAIT);
  if (rc < 0) {
    kill_leftovers();
    fail_msg("%s did not finish within %.0f s (log %s)", argv[0], CMD_WAIT, log);
  }
  return rc;
}

#define MAX_ARGS 64

typedef struct {
  char *v[MAX_ARGS + 1];
  int n;
} args;

static void add_arg(args *a, const char *s) {
  assert_true(a->n < MAX_ARGS);
  a->v[a->n++] = (char *)s;
  a->v[a->n] = NULL;
}

static void add_args(args *a, va_list ap) {
  for (const char *s; (s = va_arg(ap, const char *));)
    add_arg(a, s);
}

/* The command line of palign-worker on np ranks under mpirun (np 0: no
 * mpirun) with model m (NULL: the tiny model) and store, then the NULL-ended
 * rest. */
static void worker_argv(args *a, int np, const char *m, const char *store, va_list ap) {
  static char np_buf[16];
  a->n = 0;
  if (np > 0) {
    snprintf(np_buf, sizeof np_buf, "%d", np);
    add_arg(a, PALIGN_MPIEXEC);
    add_arg(a, "-np");
    add_arg(a, np_buf);
  }
  add_arg(a, WORKER);
  add_arg(a, "--model"), add_arg(a, m ? m : model);
  add_arg(a, "--papi"), add_arg(a, papi);
  add_arg(a, "--store"), add_arg(a, store);
  add_arg(a, "--threads"), add_arg(a, "1");
  add_args(a, ap);
}

static int worker(const char *log, int np, const char *m, const char *store, ...) {
  args a;
  va_list ap;
  va_start(ap, store);
  worker_argv(&a, np, m, store, ap);
  va_end(ap);
  return run_argv(log, a.v);
}

static pid_t worker_start(const char *log, int np, const char *store, ...) {
  args a;
  va_list ap;
  va_start(ap, store);
  worker_argv(&a, np, NULL, store, ap);
  va_end(ap);
  return spawn(log, a.v);
}

/* `palign ARGS...` (NULL-ended), output to log. */
static int palign(const char *log, ...) {
  args a = {.n = 0};
  add_arg(&a, PALIGN);
  va_list ap;
  va_start(ap, log);
  add_args(&a, ap);
  va_end(ap);
  return run_argv(log, a.v);
}

#define expect_in(file, what) tu_expect_file_has(file, what)

static const char *scratch(char buf[512], const char *name) { return tu_path(buf, 512, name); }

/* ---- the store as records ------------------------------------------------------------ */

typedef struct {
  char id[64];
  char shard[64];
  uint64_t offset, length;
  uint8_t *norm; /* the record packed without what legitimately varies */
  size_t n_norm;
} rec;

typedef struct {
  rec r[64];
  size_t n;
  size_t counts[6];
  size_t on_cpu_fp32; /* records saying the model ran on the CPU with fp32 weights */
} recs;

/* The record with what a rerun or another rank count may change cleared:
 * where and when it ran (rank, host, seconds, finished_unix, PAS
 * fit_seconds) and every Cost (tokens differ when a worker reuses a cached
 * prefix). Everything else must be reproduced bit for bit. */
static uint8_t *pack_normalised(const Palign__SubjectResult *r, size_t *n) {
  const size_t len = palign__subject_result__get_packed_size(r);
  uint8_t *buf = malloc(len ? len : 1);
  assert_non_null(buf);
  assert_int_equal(palign__subject_result__pack(r, buf), len);
  Palign__SubjectResult *c = palign__subject_result__unpack(NULL, len, buf);
  assert_non_null(c);
  free(buf);
  /* cleared in the copy, put back before it is freed */
  const int32_t rank = c->rank;
  char *host = c->host;
  const double seconds = c->seconds;
  const int64_t fin = c->finished_unix;
  c->rank = 0, c->host = (char *)protobuf_c_empty_string, c->seconds = 0, c->finished_unix = 0;
  Palign__Cost *costs[32];
  assert_true(c->n_methods <= 32);
  for (size_t j = 0; j < c->n_methods; j++)
    costs[j] = c->methods[j]->cost, c->methods[j]->cost = NULL;
  Palign__Cost *grid = NULL, *dref = NULL, *dtrain = NULL;
  double fit = 0;
  if (c->pas) {
    grid = c->pas->grid_cost, c->pas->grid_cost = NULL;
    fit = c->pas->fit_seconds, c->pas->fit_seconds = 0;
  }
  if (c->dpo) {
    dref = c->dpo->reference_cost, c->dpo->reference_cost = NULL;
    dtrain = c->dpo->train_cost, c->dpo->train_cost = NULL;
  }
  *n = palign__subject_result__get_packed_size(c);
  buf = malloc(*n ? *n : 1);
  assert_non_null(buf);
  assert_int_equal(palign__subject_result__pack(c, buf), *n);
  c->rank = rank, c->host = host, c->seconds = seconds, c->finished_unix = fin;
  for (size_t j = 0; j < c->n_methods; j++)
    c->methods[j]->cost = costs[j];
  if (c->pas)
    c->pas->grid_cost = grid, c->pas->fit_seconds = fit;
  if (c->dpo)
    c->dpo->reference_cost = dref, c->dpo->train_cost = dtrain;
  palign__subject_result__free_unpacked(c, NULL);
  return buf;
}

static int collect(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  recs *rs = ctx;
  if (info->status != PA_RECORD_OK)
    return 0;
  assert_true(rs->n < sizeof rs->r / sizeof *rs->r);
  rec *x = &rs->r[rs->n++];
  snprintf(x->id, sizeof x->id, "%s", r->subject_id);
  snprintf(x->shard, sizeof x->shard, "%s", info->shard);
  x->offset = info->offset, x->length = info->length;
  x->norm = pack_normalised(r, &x->n_norm);
  rs->on_cpu_fp32 += !strcmp(r->backend, "cpu") && !strcmp(r->weights, "fp32");
  return 0;
}

static void recs_free(recs *rs) {
  for (size_t i = 0; i < rs->n; i++)
    free(rs->r[i].norm);
  rs->n = 0;
}

static void read_store(const char *store, recs *rs) {
  memset(rs, 0, sizeof *rs);
  if (pa_store_read(store, collect, rs, rs->counts))
    fail_msg("reading %s: %s", store, pa_errmsg());
}

static size_t damaged(const recs *rs) {
  size_t n = 0;
  for (int k = 1; k < 6; k++)
    n += rs->counts[k];
  return n;
}

static const rec *find_rec(const recs *rs, const char *id) {
  for (size_t i = 0; i < rs->n; i++)
    if (!strcmp(rs->r[i].id, id))
      return &rs->r[i];
  return NULL;
}

static Palign__SubjectResult *unpack_rec(const rec *x) {
  Palign__SubjectResult *r = palign__subject_result__unpack(NULL, x->n_norm, x->norm);
  assert_non_null(r);
  return r;
}

/* The ids of the first n subjects of PAPI/Test-set.json, in file order. */
static void first_ids(size_t n, char ids[][64]) {
  char path[4200];
  snprintf(path, sizeof path, "%s/Test-set.json", papi);
  char *text = tu_slurp(path, NULL);
  cJSON *j = cJSON_Parse(text);
  free(text);
  assert_non_null(j);
  assert_true((size_t)cJSON_GetArraySize(j) >= n);
  for (size_t i = 0; i < n; i++) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(j, (int)i), "case");
    assert_non_null(c);
    if (cJSON_IsString(c))
      snprintf(ids[i], 64, "%s", c->valuestring);
    else
      snprintf(ids[i], 64, "%.0f", c->valuedouble);
  }
  cJSON_Delete(j);
}

/* The store holds exactly the first n subjects, each in one valid record,
 * and no damage beyond `allowed` damaged stretches. */
static void expect_complete(const recs *rs, size_t n, size_t allowed, const char *store) {
  char ids[64][64];
  assert_true(n <= 64);
  first_ids(n, ids);
  if (rs->counts[PA_RECORD_DUPLICATE])
    fail_msg("%s: %zu duplicate records", store, rs->counts[PA_RECORD_DUPLICATE]);
  if (damaged(rs) > allowed)
    fail_msg("%s: %zu damaged records, %zu expected", store, damaged(rs), allowed);
  if (rs->n != n)
    fail_msg("%s: %zu valid records, %zu subjects asked for", store, rs->n, n);
  for (size_t i = 0; i < n; i++) {
    size_t k = 0;
    for (size_t j = 0; j < rs->n; j++)
      k += !strcmp(rs->r[j].id, ids[i]);
    if (k != 1)
      fail_msg("%s: subject %s has %zu valid records, not 1", store, ids[i], k);
  }
}

/* Every record of a subject made with the same settings, in whatever run,
 * rank count or test, must be the same: the first seen is kept per tag. */
static struct {
  char tag[32], id[64];
  uint8_t *norm;
  size_t n;
} seen[128];
static size_t n_seen;

static void expect_same_as_before(const char *tag, const recs *rs, const char *store) {
  for (size_t i = 0; i < rs->n; i++) {
    const rec *x = &rs->r[i];
    size_t k = 0;
    while (k < n_seen && (strcmp(seen[k].tag, tag) || strcmp(seen[k].id, x->id)))
      k++;
    if (k == n_seen) {
      assert_true(n_seen < sizeof seen / sizeof *seen);
      snprintf(seen[k].tag, sizeof seen[k].tag, "%s", tag);
      snprintf(seen[k].id, sizeof seen[k].id, "%s", x->id);
      seen[k].norm = malloc(x->n_norm);
      assert_non_null(seen[k].norm);
      memcpy(seen[k].norm, x->norm, x->n_norm);
      seen[k].n = x->n_norm;
      n_seen++;
    } else if (seen[k].n != x->n_norm || memcmp(seen[k].norm, x->norm, x->n_norm)) {
      fail_msg("%s: subject %s (%s, %s offset %llu) differs from its record in an earlier run with the same settings",
               store, x->id, tag, x->shard, (unsigned long long)x->offset);
    }
  }
}

/* ---- comparing records ----------------------------------------------------------------- */

#define SAME(what, cond)                                                                                               \
  do {                                                                                                                 \
    if (!(cond))                                                                                                       \
      fail_msg("subject %s: %s differs (%s)", id, what, #cond);                                                        \
  } while (0)

static bool same_bytes(const void *a, size_t na, const void *b, size_t nb) {
  return na == nb && (na == 0 || memcmp(a, b, na) == 0);
}

static void same_preds(const char *id, const char *what, const Palign__Predictions *a, const Palign__Predictions *b) {
  SAME(what, (a == NULL) == (b == NULL));
  if (!a)
    return;
  SAME(what, same_bytes(a->items, a->n_items * sizeof *a->items, b->items, b->n_items * sizeof *b->items));
  SAME(what, same_bytes(a->truth.data, a->truth.len, b->truth.data, b->truth.len));
  SAME(what, same_bytes(a->answer.data, a->answer.len, b->answer.data, b->answer.len));
  SAME(what, same_bytes(a->expected, a->n_expected * sizeof(float), b->expected, b->n_expected * sizeof(float)));
  SAME(what, same_bytes(a->probs, a->n_probs * sizeof(float), b->probs, b->n_probs * sizeof(float)));
}

/* Field by field where a difference is worth naming, then every byte. */
static void same_record(const rec *xa, const rec *xb) {
  Palign__SubjectResult *a = unpack_rec(xa), *b = unpack_rec(xb);
  const char *id = xa->id;
  char what[160];
  SAME("subject_index", a->subject_index == b->subject_index);
  SAME("run_seed", a->run_seed == b->run_seed);
  SAME("model_fingerprint", !strcmp(a->model_fingerprint, b->model_fingerprint));
  SAME("failed", a->failed == b->failed);
  SAME("the number of methods", a->n_methods == b->n_methods);
  for (size_t j = 0; j < a->n_methods; j++) {
    const Palign__MethodResult *ma = a->methods[j], *mb = b->methods[j];
    snprintf(what, sizeof what, "method #%zu (%s)", j, ma->method);
    SAME(what, !strcmp(ma->method, mb->method) && ma->failed == mb->failed && ma->n_rows == mb->n_rows);
    for (size_t k = 0; k < ma->n_rows; k++) {
      snprintf(what, sizeof what, "row '%s' of %s", ma->rows[k]->name, ma->method);
      SAME(what, !strcmp(ma->rows[k]->name, mb->rows[k]->name));
      same_preds(id, what, ma->rows[k]->predictions, mb->rows[k]->predictions);
    }
  }
  SAME("DPO presence", (a->dpo == NULL) == (b->dpo == NULL));
  if (a->dpo) {
    SAME("DPO adapter", same_bytes(a->dpo->adapter, a->dpo->n_adapter * sizeof(float), b->dpo->adapter,
                                   b->dpo->n_adapter * sizeof(float)));
    SAME("DPO loss curve",
         same_bytes(a->dpo->loss, a->dpo->n_loss * sizeof(double), b->dpo->loss, b->dpo->n_loss * sizeof(double)));
  }
  SAME("PAS presence", (a->pas == NULL) == (b->pas == NULL));
  if (a->pas) {
    const Palign__PasResult *pa = a->pas, *pb = b->pas;
    SAME("PAS status", !strcmp(pa->status, pb->status));
    SAME("PAS head count", pa->n_heads == pb->n_heads);
    for (size_t h = 0; h < pa->n_heads; h++) {
      const Palign__PasHead *ha = pa->heads[h], *hb = pb->heads[h];
      snprintf(what, sizeof what, "PAS head #%zu", h);
      SAME(what, ha->layer == hb->layer && ha->head == hb->head);
      SAME(what, ha->score == hb->score && ha->train_acc == hb->train_acc && ha->val_acc == hb->val_acc);
      SAME(what, ha->sigma == hb->sigma);
      SAME(what,
           same_bytes(ha->direction, ha->n_direction * sizeof(float), hb->direction, hb->n_direction * sizeof(float)));
    }
    SAME("PAS alphas",
         same_bytes(pa->alphas, pa->n_alphas * sizeof(double), pb->alphas, pb->n_alphas * sizeof(double)));
    SAME("PAS chosen count", pa->n_chosen == pb->n_chosen);
    for (size_t c = 0; c < pa->n_chosen; c++) {
      snprintf(what, sizeof what, "PAS choice %s/%s", pa->chosen[c]->variant, pa->chosen[c]->protocol);
      SAME(what, !strcmp(pa->chosen[c]->variant, pb->chosen[c]->variant) &&
                     !strcmp(pa->chosen[c]->protocol, pb->chosen[c]->protocol));
      SAME(what, pa->chosen[c]->index == pb->chosen[c]->index && pa->chosen[c]->alpha == pb->chosen[c]->alpha);
    }
    SAME("PAS grid size", pa->n_grid == pb->n_grid);
    for (size_t g = 0; g < pa->n_grid; g++) {
      snprintf(what, sizeof what, "PAS grid #%zu", g);
      same_preds(id, what, pa->grid[g], pb->grid[g]);
    }
  }
  palign__subject_result__free_unpacked(a, NULL);
  palign__subject_result__free_unpacked(b, NULL);
  SAME("the rest of the record (metrics, PAS split, errors, ...)",
       same_bytes(xa->norm, xa->n_norm, xb->norm, xb->n_norm));
}

static void same_stores(const recs *a, const recs *b) {
  assert_int_equal(a->n, b->n);
  for (size_t i = 0; i < a->n; i++) {
    const rec *y = find_rec(b, a->r[i].id);
    if (!y)
      fail_msg("subject %s is in one store only", a->r[i].id);
    same_record(&a->r[i], y);
  }
}

/* Whether a double printed by cJSON reads back as x. cJSON 1.7.15 prints 15
 * significant digits and falls back to 17 only when the 15 read back further
 * than DBL_EPSILON (relative) from the value: a double may come back an ulp
 * or so off, never more. */
static bool json_double_is(const cJSON *j, double x) {
  if (!cJSON_IsNumber(j))
    return false;
  const double a = fabs(j->valuedouble), b = fabs(x);
  return fabs(j->valuedouble - x) <= 2 * DBL_EPSILON * (a > b ? a : b);
}

/* `palign eval --json`'s answers are the stored ones, for every row. expected
 * and p are floats printed as doubles: a double within an ulp of a float
 * converts back to exactly that float (float neighbours are 2^29 double ulps
 * apart), so those compare exactly after the (float) cast. Scores, sigmas and
 * alphas are doubles: json_double_is. */
static void same_as_eval(const recs *rs, const char *json_path, size_t n_subjects) {
  char *text = tu_slurp(json_path, NULL);
  cJSON *root = cJSON_Parse(text);
  free(text);
  assert_non_null(root);
  const cJSON *subjects = cJSON_GetObjectItemCaseSensitive(root, "subjects");
  assert_int_equal(cJSON_GetArraySize(subjects), n_subjects);
  const cJSON *js;
  cJSON_ArrayForEach(js, subjects) {
    const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(js, "id"));
    assert_non_null(id);
    const rec *x = find_rec(rs, id);
    if (!x)
      fail_msg("eval's subject %s is not in the store", id);
    Palign__SubjectResult *r = unpack_rec(x);
    size_t stored_rows = 0, json_rows = 0;
    for (size_t j = 0; j < r->n_methods; j++)
      stored_rows += r->methods[j]->n_rows;
    const cJSON *jm;
    cJSON_ArrayForEach(jm, cJSON_GetObjectItemCaseSensitive(js, "methods")) {
      const cJSON *items = cJSON_GetObjectItemCaseSensitive(jm, "items");
      if (!strcmp(jm->string, "dpo_training")) { /* the DPO training: its loss curve */
        assert_non_null(r->dpo);
        const cJSON *loss = cJSON_GetObjectItemCaseSensitive(jm, "loss");
        assert_int_equal(cJSON_GetArraySize(loss), r->dpo->n_loss);
        for (size_t k = 0; k < r->dpo->n_loss; k++)
          if (!json_double_is(cJSON_GetArrayItem(loss, (int)k), r->dpo->loss[k]))
            fail_msg("subject %s: DPO loss at step %zu differs between eval and the store", id, k);
        continue;
      }
      if (!items) { /* a PAS variant's fit: its chosen alphas and heads */
        assert_non_null(r->pas);
        for (int p = 0; p < 2; p++) {
          const cJSON *ja = cJSON_GetObjectItemCaseSensitive(jm, p ? "alpha_holdout" : "alpha_reference");
          assert_non_null(ja);
          const Palign__PasChoice *c = NULL;
          for (size_t k = 0; k < r->pas->n_chosen; k++)
            if (!strcmp(r->pas->chosen[k]->variant, jm->string) &&
                !strcmp(r->pas->chosen[k]->protocol, p ? "holdout" : "reference"))
              c = r->pas->chosen[k];
          if (!c || !json_double_is(ja, c->alpha))
            fail_msg("subject %s: %s %s alpha %g in eval, %g stored", id, jm->string, ja->string, ja->valuedouble,
                     c ? c->alpha : NAN);
        }
        const cJSON *heads = cJSON_GetObjectItemCaseSensitive(jm, "heads");
        assert_int_equal(cJSON_GetArraySize(heads), r->pas->n_heads);
        for (size_t h = 0; h < r->pas->n_heads; h++) {
          const cJSON *jh = cJSON_GetArrayItem(heads, (int)h);
          const Palign__PasHead *ph = r->pas->heads[h];
          const cJSON *sigma = cJSON_GetObjectItemCaseSensitive(jh, "sigma");
          if (cJSON_GetObjectItemCaseSensitive(jh, "layer")->valuedouble != ph->layer ||
              cJSON_GetObjectItemCaseSensitive(jh, "head")->valuedouble != ph->head ||
              !json_double_is(cJSON_GetObjectItemCaseSensitive(jh, "score"), ph->score) ||
              !json_double_is(sigma, ph->sigma))
            fail_msg("subject %s: %s head #%zu differs between eval and the store (sigma %.17g there, %.17g stored)",
                     id, jm->string, h, sigma ? sigma->valuedouble : NAN, ph->sigma);
        }
        continue;
      }
      json_rows++;
      const Palign__MethodRow *row = NULL;
      for (size_t j = 0; j < r->n_methods && !row; j++)
        for (size_t k = 0; k < r->methods[j]->n_rows && !row; k++)
          if (!strcmp(r->methods[j]->rows[k]->name, jm->string))
            row = r->methods[j]->rows[k];
      if (!row || !row->predictions)
        fail_msg("subject %s: eval's row '%s' is not stored", id, jm->string);
      const Palign__Predictions *pr = row->predictions;
      if ((size_t)cJSON_GetArraySize(items) != pr->n_items)
        fail_msg("subject %s, row %s: %d items in eval, %zu stored", id, jm->string, cJSON_GetArraySize(items),
                 pr->n_items);
      assert_int_equal(pr->truth.len, pr->n_items);
      assert_int_equal(pr->answer.len, pr->n_items);
      for (size_t i = 0; i < pr->n_items; i++) {
        const cJSON *it = cJSON_GetArrayItem(items, (int)i);
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(it, "expected"),
                    *p = cJSON_GetObjectItemCaseSensitive(it, "p");
        const float stored_e = i < pr->n_expected ? pr->expected[i] : NAN;
        bool ok = cJSON_GetObjectItemCaseSensitive(it, "item")->valuedouble == pr->items[i] &&
                  cJSON_GetObjectItemCaseSensitive(it, "truth")->valuedouble == pr->truth.data[i] &&
                  cJSON_GetObjectItemCaseSensitive(it, "answer")->valuedouble == pr->answer.data[i];
        ok &= e ? (float)e->valuedouble == stored_e : isnan(stored_e);
        if (p) {
          ok &= cJSON_GetArraySize(p) == 5 && pr->n_probs >= 5 * (i + 1);
          for (int k = 0; ok && k < 5; k++)
            ok &= (float)cJSON_GetArrayItem(p, k)->valuedouble == pr->probs[5 * i + (size_t)k];
        } else {
          ok &= pr->n_probs == 0 || isnan(pr->probs[5 * i]);
        }
        if (!ok)
          fail_msg("subject %s, row %s, item #%zu (%d): eval and the store differ", id, jm->string, i, pr->items[i]);
      }
    }
    if (json_rows != stored_rows)
      fail_msg("subject %s: %zu rows in eval, %zu stored", id, json_rows, stored_rows);
    palign__subject_result__free_unpacked(r, NULL);
  }
  cJSON_Delete(root);
}

/* ---- the runs ----------------------------------------------------------------------- */

/* Waits (at most timeout s) until the store holds at least n valid records. */
static void wait_records(const char *store, size_t n, pid_t job, double timeout) {
  const double t_end = now_s() + timeout;
  for (;;) {
    size_t counts[6] = {0};
    if (pa_store_read(store, NULL, NULL, counts) == PA_OK && counts[PA_RECORD_OK] >= n)
      return;
    pa_error_clear();
    int st;
    if (waitpid(job, &st, WNOHANG) == job) {
      track(job, false);
      fail_msg("the job on %s ended (status %d) before %zu records were stored", store, st, n);
    }
    if (now_s() > t_end) {
      kill_leftovers();
      fail_msg("no %zu records in %s after %.0f s", n, store, timeout);
    }
    sleep_s(0.05);
  }
}

/* mpirun's end after something killed or stopped its job; no rank may stay. */
static int wait_job_end(pid_t job, const char *log) {
  int rc = wait_for(job, 60);
  if (rc < 0) {
    kill_leftovers();
    fail_msg("mpirun did not end within 60 s of losing its job (log %s)", log);
  }
  pid_t left[8];
  for (double t_end = now_s() + 10; find_ours(-1, left, 8) > 0;) {
    if (now_s() > t_end) {
      kill_leftovers();
      fail_msg("ranks outlived their mpirun (log %s)", log);
    }
    sleep_s(0.05);
  }
  return rc;
}

static Palign__Manifest *read_manifest(const char *store) {
  Palign__Manifest *m = NULL;
  if (pa_manifest_read(store, &m))
    fail_msg("%s", pa_errmsg());
  return m;
}

/* `palign query STORE verify` passes; a torn tail that a killed worker left
 * counts as a problem there (exit 1) but is never a lost or doubled subject:
 * with torn records, every problem line must be one. */
static void expect_verified(const char *store, const recs *rs, const char *log) {
  const int rc = palign(log, "query", store, "verify", NULL);
  char *text = tu_slurp(log, NULL);
  fprintf(stderr, "    palign query verify (exit %d): %s", rc, text);
  if (damaged(rs) == 0) {
    if (rc != 0)
      fail_msg("verify of %s exits %d:\n%s", store, rc, text);
  } else {
    assert_int_equal(damaged(rs), rs->counts[PA_RECORD_TORN]);
    assert_int_equal(rc, 1);
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
      if (strstr(line, " offset ") && !strstr(line, ": torn"))
        fail_msg("verify of %s: a problem other than a torn tail: %s", store, line);
  }
  free(text);
}

/* A 4-subject store made once (one process, no mpirun) and copied for
 * the tests that damage or refuse. */
static char base_store[512];

static void copy_base_store(const char *to) {
  if (!base_store[0]) { /* set once the store is known good */
    char log[512], base[512];
    scratch(base, "base");
    assert_int_equal(
        worker(scratch(log, "base.log"), 0, NULL, base, "--subjects", "4", "--methods", "none,pas_only", NULL), 0);
    recs rs;
    read_store(base, &rs);
    expect_complete(&rs, 4, 0, base);
    expect_same_as_before("none,pas_only", &rs, base);
    recs_free(&rs);
    snprintf(base_store, sizeof base_store, "%s", base);
  }
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", to, base_store, to);
  assert_int_equal(system(cmd), 0);
}

/* palign generate --store applies a subject's stored PAS intervention
 * (tiny model: its chosen alphas are whatever the grid gave): the variant
 * fitted, each protocol's alpha and the number of heads as the record holds
 * them (read here from its PasChoice fields), an alpha asked for, that
 * alpha changing the tokens generated, and the refusals: a variant not fitted, a subject not stored, another model,
 * PAPI data that is not there, --subject without --store. */
static void expect_generate_applies(const char *store, const char *id) {
  Palign__SubjectResult *r = NULL;
  assert_int_equal(pa_query_subject(store, id, &r), PA_OK);
  assert_non_null(r->pas);
  double alpha[2] = {NAN, NAN}; /* pas_only's: reference, holdout */
  for (size_t i = 0; i < r->pas->n_chosen; i++) {
    const Palign__PasChoice *c = r->pas->chosen[i];
    if (!strcmp(c->variant, "pas_only"))
      alpha[!strcmp(c->protocol, "holdout")] = c->alpha;
  }
  assert_false(isnan(alpha[0]) || isnan(alpha[1]));
  const size_t n_heads = r->pas->n_heads;
  assert_true(n_heads > 0);
  palign__subject_result__free_unpacked(r, NULL);

  char log[512], want[1200];
  const char *protocols[2] = {"reference", "holdout"};
  for (int k = 0; k < 2; k++) {
    assert_int_equal(palign(scratch(log, "generate.log"), "generate", "--model", model, "--store", store, "--subject",
                            id, "--protocol", protocols[k], "--prompt", "Hello", "--max-tokens", "2", "--threads", "1",
                            NULL),
                     0);
    snprintf(want, sizeof want, "subject %s, PAS pas_only, %s alpha %g, %zu heads", id, protocols[k], alpha[k],
             n_heads);
    expect_in(log, want);
  }
  assert_int_equal(palign(log, "generate", "--model", model, "--store", store, "--subject", id, "--alpha", "2.5",
                          "--prompt", "Hello", "--max-tokens", "2", "--threads", "1", NULL),
                   0);
  snprintf(want, sizeof want, "subject %s, PAS pas_only, holdout alpha 2.5, %zu heads\n", id, n_heads);
  expect_in(log, want);
  /* the steering reaches the tokens: the tiny model answers the chat
   * template's last token ("\n") again and again, also at alpha 30; at
   * alpha 300 its heads move it to another token. Alpha 0 is the plain
   * model's answer. */
  static char plain[256], at0[256], at300[256], err[4096];
  const char *gen = "'" PALIGN "' generate --model '%s' --prompt 'Tell me about yourself' --max-tokens 12 --threads 1";
  char cmd[2048];
  snprintf(cmd, sizeof cmd, gen, model);
  assert_int_equal(tu_run(plain, sizeof plain, err, sizeof err, "%s", cmd), 0);
  assert_int_equal(tu_run(at0, sizeof at0, err, sizeof err, "%s --store '%s' --subject %s --alpha 0", cmd, store, id),
                   0);
  assert_int_equal(
      tu_run(at300, sizeof at300, err, sizeof err, "%s --store '%s' --subject %s --alpha 300", cmd, store, id), 0);
  assert_string_equal(at0, plain);
  if (!strcmp(at300, plain))
    fail_msg("alpha 300 generates what the plain model does: '%s'", plain);

  assert_int_equal(palign(log, "generate", "--model", model, "--store", store, "--subject", id, "--variant", "pas",
                          "--prompt", "Hello", NULL),
                   1);
  snprintf(want, sizeof want, "%s: subject %s: the PAS variant pas was not fitted", store, id);
  expect_in(log, want);
  assert_int_equal(
      palign(log, "generate", "--model", model, "--store", store, "--subject", "1", "--prompt", "Hello", NULL), 1);
  snprintf(want, sizeof want, "subject 1 is not in store %s", store);
  expect_in(log, want);
  assert_int_equal(
      palign(log, "generate", "--model", icl_model, "--store", store, "--subject", id, "--prompt", "Hello", NULL), 1);
  snprintf(want, sizeof want, "%s: subject %s was fitted on model", store, id);
  expect_in(log, want);
  assert_int_equal(palign(log, "generate", "--model", model, "--store", store, "--subject", id, "--variant", "pas",
                          "--alpha", "1", "--papi", "/nonexistent", "--prompt", "Hello", NULL),
                   1);
  expect_in(log, "/nonexistent/ipip_neo_300_items.csv: cannot open");
  assert_int_equal(palign(log, "generate", "--model", model, "--subject", id, "--prompt", "Hello", NULL), 2);
  expect_in(log, "--store and --subject go together");
}

/* ---- the tests --------------------------------------------------------------------------- */

/* 1. The same records from 1 and 3 ranks, and the answers `palign eval` gives. */
static void test_rank_count_and_eval(void **state) {
  (void)state;
  char s1[512], s3[512], log[512], json[512], bank[512];
  scratch(s1, "np1"), scratch(s3, "np3");
  assert_int_equal(worker(scratch(log, "np1.log"), 1, NULL, s1, "--subjects", "6", "--methods", "none,pas_only", NULL),
                   0);
  assert_int_equal(worker(scratch(log, "np3.log"), 3, NULL, s3, "--subjects", "6", "--methods", "none,pas_only", NULL),
                   0);
  expect_in(log, "2 worker(s)");
  recs a, b;
  read_store(s1, &a);
  read_store(s3, &b);
  expect_complete(&a, 6, 0, s1);
  expect_complete(&b, 6, 0, s3);
  assert_int_equal(a.on_cpu_fp32, 6); /* each record says what the model ran on */
  same_stores(&a, &b);
  /* the 3-rank store really was written by two workers */
  bool rank[3] = {false};
  for (size_t i = 0; i < b.n; i++)
    rank[strstr(b.r[i].shard, "rank1") ? 1 : strstr(b.r[i].shard, "rank2") ? 2 : 0] = true;
  assert_true(rank[1] && rank[2] && !rank[0]);
  expect_same_as_before("none,pas_only", &a, s1);

  assert_int_equal(palign(scratch(log, "eval.log"), "eval", "--model", model, "--papi", papi, "--subjects", "6",
                          "--methods", "none,pas_only", "--threads", "1", "--bank", scratch(bank, "eval-bank.bin"),
                          "--json", scratch(json, "eval.json"), NULL),
                   0);
  same_as_eval(&a, json, 6);
  expect_generate_applies(s1, a.r[0].id);
  recs_free(&a), recs_free(&b);

  /* ICL and PAS with its prompt, on a smaller model (1 layer, dim 32, more
   * BPE merges): the ICL system prompt is long, and the tiny model above
   * spends 20 s a subject on it, this one 3 s */
  scratch(s1, "icl-np1"), scratch(s3, "icl-np2");
  assert_int_equal(
      worker(scratch(log, "icl-np1.log"), 1, icl_model, s1, "--subjects", "2", "--methods", "icl,pas", NULL), 0);
  assert_int_equal(
      worker(scratch(log, "icl-np2.log"), 2, icl_model, s3, "--subjects", "2", "--methods", "icl,pas", NULL), 0);
  read_store(s1, &a);
  read_store(s3, &b);
  expect_complete(&a, 2, 0, s1);
  expect_complete(&b, 2, 0, s3);
  same_stores(&a, &b);
  assert_int_equal(palign(scratch(log, "icl-eval.log"), "eval", "--model", icl_model, "--papi", papi, "--subjects", "2",
                          "--methods", "icl,pas", "--threads", "1", "--bank", scratch(bank, "icl-bank.bin"), "--json",
                          scratch(json, "icl-eval.json"), NULL),
                   0);
  same_as_eval(&a, json, 2);
  recs_free(&a), recs_free(&b);
}

/* 2. A worker killed with SIGKILL: mpirun ends the job; a rerun finishes it. */
static void test_resume_after_kill(void **state) {
  (void)state;
  char store[512], log[512], vlog[512];
  scratch(store, "killed");
  scratch(log, "killed.log");
  const pid_t job = worker_start(log, 3, store, "--subjects", "8", "--chunk", "1", "--methods", "none,pas_only", NULL);
  wait_records(store, 1, job, CMD_WAIT);
  pid_t victim[4];
  const int n = find_ours(1, victim, 4);
  if (n != 1 || !is_worker(victim[0]))
    fail_msg("found %d processes of rank 1 (log %s)", n, log);
  assert_int_equal(kill(victim[0], SIGKILL), 0);
  const int rc = wait_job_end(job, log);
  fprintf(stderr, "    mpirun after SIGKILL of rank 1 (pid %d): exit %d\n", (int)victim[0], rc);
  assert_int_not_equal(rc, 0);

  recs rs;
  read_store(store, &rs);
  fprintf(stderr, "    stored before the rerun: %zu valid, %zu torn, %zu other damage\n", rs.n,
          rs.counts[PA_RECORD_TORN], damaged(&rs) - rs.counts[PA_RECORD_TORN]);
  assert_true(rs.n >= 1 && rs.n < 8);
  const size_t before = rs.n;
  recs_free(&rs);

  char rlog[512];
  assert_int_equal(worker(scratch(rlog, "killed-rerun.log"), 3, NULL, store, "--subjects", "8", "--chunk", "1",
                          "--methods", "none,pas_only", NULL),
                   0);
  char said[128];
  snprintf(said, sizeof said, "%zu already stored, %zu to do", before, 8 - before);
  expect_in(rlog, said);
  read_store(store, &rs);
  expect_complete(&rs, 8, rs.counts[PA_RECORD_TORN], store);
  expect_same_as_before("none,pas_only", &rs, store);
  expect_verified(store, &rs, scratch(vlog, "killed-verify.log"));
  recs_free(&rs);
}

/* 3. SIGTERM: to mpirun (Open MPI forwards it, then kills the ranks 1 s
 * later), then to every rank (as a batch system's scancel does); a rerun
 * completes the store. */
static void test_sigterm(void **state) {
  (void)state;
  char store[512], log[512], vlog[512];
  scratch(store, "termed");

  /* to mpirun */
  pid_t job = worker_start(scratch(log, "termed-1.log"), 3, store, "--subjects", "8", "--chunk", "1", "--methods",
                           "none,pas_only", NULL);
  wait_records(store, 1, job, CMD_WAIT);
  assert_int_equal(kill(job, SIGTERM), 0);
  int rc = wait_job_end(job, log);
  Palign__Manifest *m = read_manifest(store);
  assert_int_equal(m->n_runs, 1);
  const Palign__RunRecord *run = m->runs[0];
  fprintf(stderr, "    SIGTERM to mpirun: exit %d; the run is %s (finished_unix %lld, %lld done)\n", rc,
          run->interrupted ? "marked interrupted" : "not marked (the ranks were killed before rank 0 wrote it)",
          (long long)run->finished_unix, (long long)run->subjects_done);
  assert_int_not_equal(rc, 0);
  /* either rank 0 recorded the stop, or it never got to write the end of
   * the run; never a run that looks complete */
  if (run->interrupted) {
    assert_true(run->finished_unix > 0);
    expect_in(log, "stopped by signal 15");
  } else if (run->finished_unix != 0) {
    fail_msg("%s: the run stopped by SIGTERM is recorded as finished and not interrupted (log %s)", store, log);
  }
  palign__manifest__free_unpacked(m, NULL);
  recs rs;
  read_store(store, &rs);
  const size_t after_first = rs.n;
  assert_true(rs.n >= 1 && rs.n < 8);
  recs_free(&rs);

  /* to every rank: each stops within the layer in progress and exits 3 */
  job = worker_start(scratch(log, "termed-2.log"), 3, store, "--subjects", "8", "--chunk", "1", "--methods",
                     "none,pas_only", NULL);
  wait_records(store, after_first + 1, job, CMD_WAIT);
  pid_t ranks[8];
  const int n = find_ours(-1, ranks, 8);
  int n_workers = 0;
  for (int i = 0; i < n; i++)
    if (is_worker(ranks[i]))
      n_workers++, kill(ranks[i], SIGTERM);
  assert_int_equal(n_workers, 3);
  rc = wait_job_end(job, log);
  m = read_manifest(store);
  assert_int_equal(m->n_runs, 2);
  run = m->runs[1];
  fprintf(stderr, "    SIGTERM to the ranks: exit %d; the run is %s, %lld done\n", rc,
          run->interrupted ? "marked interrupted" : "NOT marked interrupted", (long long)run->subjects_done);
  assert_int_equal(rc, 3);
  assert_true(run->interrupted);
  assert_true(run->finished_unix > 0);
  expect_in(log, "stopped by signal 15; a rerun with the same store resumes");
  palign__manifest__free_unpacked(m, NULL);

  read_store(store, &rs);
  const size_t before = rs.n;
  recs_free(&rs);
  assert_true(before < 8);
  assert_int_equal(worker(scratch(log, "termed-3.log"), 3, NULL, store, "--subjects", "8", "--chunk", "1", "--methods",
                          "none,pas_only", NULL),
                   0);
  char said[128];
  snprintf(said, sizeof said, "%zu already stored, %zu to do", before, 8 - before);
  expect_in(log, said);
  m = read_manifest(store);
  assert_int_equal(m->n_runs, 3);
  assert_false(m->runs[2]->interrupted);
  assert_int_equal(m->runs[2]->subjects_done, 8 - before);
  palign__manifest__free_unpacked(m, NULL);
  read_store(store, &rs);
  expect_complete(&rs, 8, rs.counts[PA_RECORD_TORN], store);
  expect_same_as_before("none,pas_only", &rs, store);
  expect_verified(store, &rs, scratch(vlog, "termed-verify.log"));
  recs_free(&rs);
}

/* Damages `store`'s run1-rank0.pal (flip: one payload byte of its second
 * record; else its last record cut by 5 bytes), then checks what query says,
 * reruns and checks that only the damaged subject was done again. */
static void damage_and_repair(const char *name, bool flip) {
  char store[512], log[512], path[700];
  scratch(store, name);
  copy_base_store(store);
  recs rs;
  read_store(store, &rs);
  assert_int_equal(rs.n, 4);
  const rec *victim = flip ? &rs.r[1] : &rs.r[3];
  assert_string_equal(victim->shard, "run1-rank0.pal");
  char id[64], where[128];
  snprintf(id, sizeof id, "%s", victim->id);
  snprintf(where, sizeof where, "run1-rank0.pal offset %llu: %s", (unsigned long long)victim->offset,
           flip ? "checksum" : "torn");
  snprintf(path, sizeof path, "%s/shards/run1-rank0.pal", store);
  size_t len;
  char *bytes = tu_slurp(path, &len);
  assert_int_equal(len, rs.r[3].offset + rs.r[3].length);
  if (flip) {
    bytes[victim->offset + PA_STORE_RECORD_HEAD + (victim->length - PA_STORE_RECORD_HEAD) / 2] ^= 0x5a;
    tu_write(path, bytes, len);
  } else {
    assert_int_equal(truncate(path, (off_t)(len - 5)), 0);
  }
  free(bytes);
  recs_free(&rs);

  snprintf(log, sizeof log, "%s/%s-verify.log", tu_tmp, name);
  assert_int_equal(palign(log, "query", store, "verify", NULL), 1);
  expect_in(log, where);
  snprintf(log, sizeof log, "%s/%s-summary.log", tu_tmp, name);
  assert_int_equal(palign(log, "query", store, "summary", NULL), 0);
  expect_in(log, "skipping damaged record: run1-rank0.pal offset");
  expect_in(log, where);
  expect_in(log, "subjects  3 stored");

  snprintf(log, sizeof log, "%s/%s-rerun.log", tu_tmp, name);
  assert_int_equal(worker(log, 0, NULL, store, "--subjects", "4", "--methods", "none,pas_only", NULL), 0);
  expect_in(log, "3 already stored, 1 to do");
  expect_in(log, "1 damaged records skipped");
  read_store(store, &rs);
  expect_complete(&rs, 4, 1, store);
  assert_int_equal(rs.counts[flip ? PA_RECORD_CHECKSUM : PA_RECORD_TORN], 1);
  size_t in_new = 0;
  for (size_t i = 0; i < rs.n; i++)
    if (!strcmp(rs.r[i].shard, "run2-rank0.pal")) {
      in_new++;
      assert_string_equal(rs.r[i].id, id);
    }
  assert_int_equal(in_new, 1);
  /* the recomputed record is the one that was damaged, bit for bit */
  expect_same_as_before("none,pas_only", &rs, store);
  recs_free(&rs);
}

/* 4. A flipped byte in the middle of a shard and a truncated tail. */
static void test_damaged_shard(void **state) {
  (void)state;
  damage_and_repair("flipped", true);
  damage_and_repair("truncated", false);
}

/* Every file of a store, in name order, as one blob: "name\0size\0bytes". */
static char *snapshot(const char *store, size_t *n) {
  char cmd[1200], out[512];
  snprintf(cmd, sizeof cmd,
           "cd '%s' && find . -type f | LC_ALL=C sort | while read f; do echo \"$f\"; cat \"$f\"; done > '%s'", store,
           scratch(out, "snapshot.bin"));
  assert_int_equal(system(cmd), 0);
  return tu_slurp(out, n);
}

/* Fails unless the store's files are byte for byte those of before (n
 * bytes, as snapshot gives them). */
static void expect_unchanged(const char *store, const char *before, size_t n) {
  size_t m;
  char *after = snapshot(store, &m);
  assert_int_equal(m, n);
  assert_memory_equal(before, after, n);
  free(after);
}

/* 5. A run with another seed or other methods, or on a store another job
 * holds, is refused; nothing changes. */
static void test_settings_mismatch(void **state) {
  (void)state;
  char store[512], log[512];
  scratch(store, "mismatch");
  copy_base_store(store);
  size_t n0;
  char *before = snapshot(store, &n0);
  assert_int_equal(worker(scratch(log, "mismatch-seed.log"), 0, NULL, store, "--subjects", "4", "--methods",
                          "none,pas_only", "--seed", "2", NULL),
                   1);
  expect_in(log, "this store was made with other settings");
  expect_in(log, "run_seed 1 here, 2 asked");
  assert_int_equal(
      worker(scratch(log, "mismatch-methods.log"), 2, NULL, store, "--subjects", "4", "--methods", "none", NULL), 1);
  expect_in(log, "methods 'none,pas_only,const3,trait_mean' here, 'none,const3,trait_mean' asked");
  assert_int_equal(worker(scratch(log, "mismatch-weights.log"), 2, NULL, store, "--subjects", "4", "--methods",
                          "none,pas_only", "--weights", "bf16", NULL),
                   1);
  expect_in(log, "weights");
  expect_in(log, "'bf16' asked");
  /* a store another job holds (this process, here) is refused, naming it */
  pa_store_guard *guard = NULL;
  assert_int_equal(pa_store_lock(store, &guard), PA_OK);
  assert_int_equal(
      worker(scratch(log, "mismatch-busy.log"), 3, NULL, store, "--subjects", "4", "--methods", "none,pas_only", NULL),
      1);
  char busy[64];
  snprintf(busy, sizeof busy, "another job (process %ld) is writing to this store", (long)getpid());
  expect_in(log, busy);
  pa_store_unlock(guard);
  expect_unchanged(store, before, n0);
  free(before);
}

/* 6. Workers that cannot start while rank 0 can (an MPMD job whose workers
 * get a model or a PAPI directory that is not there): the job ends at once
 * with exit 1, each failing rank names its problem, rank 0 says why it
 * stopped, and the store is exactly as it was (no run in the manifest, no
 * shard left). */
static void test_workers_cannot_start(void **state) {
  (void)state;
  char store[512], log[512];
  scratch(store, "nostart");
  copy_base_store(store);
  size_t n0;
  char *before = snapshot(store, &n0);
  static const char *const bad[][2] = {{"--model", "/nonexistent/model.gguf"}, {"--papi", "/nonexistent/papi"}};
  for (int k = 0; k < 2; k++) {
    const bool bad_model = k == 0;
    args a = {.n = 0};
    add_arg(&a, PALIGN_MPIEXEC);
    for (int side = 0; side < 2; side++) { /* rank 0 as asked, then two workers with the bad flag */
      if (side)
        add_arg(&a, ":");
      add_arg(&a, "-np"), add_arg(&a, side ? "2" : "1");
      add_arg(&a, WORKER);
      add_arg(&a, "--model"), add_arg(&a, side && bad_model ? bad[0][1] : model);
      add_arg(&a, "--papi"), add_arg(&a, side && !bad_model ? bad[1][1] : papi);
      add_arg(&a, "--store"), add_arg(&a, store);
      add_arg(&a, "--threads"), add_arg(&a, "1");
      add_arg(&a, "--subjects"), add_arg(&a, "4");
      add_arg(&a, "--methods"), add_arg(&a, "none,pas_only");
    }
    assert_int_equal(run_argv(scratch(log, bad_model ? "nostart-model.log" : "nostart-papi.log"), a.v), 1);
    expect_in(log, "palign-worker: rank 1: ");
    expect_in(log, "palign-worker: rank 2: ");
    expect_in(log, bad[k][1]);
    expect_in(log, "another rank could not load the data"); /* a worker fingerprints its model with the data */
    expect_unchanged(store, before, n0);
  }
  free(before);
}

/* 6b. Workers whose weights would be in different formats (an MPMD job:
 * one worker with --weights fp32, one with bf16; on GPUs --weights auto
 * with some workers on the CPU would do the same): one bank cannot be made
 * of their slices, so the job stops with exit 1 and says what to give,
 * and the store is as it was. */
static void test_mixed_weights(void **state) {
  (void)state;
  char store[512], log[512];
  scratch(store, "mixed");
  copy_base_store(store);
  size_t n0;
  char *before = snapshot(store, &n0);
  args a = {.n = 0};
  add_arg(&a, PALIGN_MPIEXEC);
  for (int side = 0; side < 3; side++) { /* rank 0, a worker in fp32, a worker in bf16 */
    if (side)
      add_arg(&a, ":");
    add_arg(&a, "-np"), add_arg(&a, "1");
    add_arg(&a, WORKER);
    add_arg(&a, "--model"), add_arg(&a, model);
    add_arg(&a, "--papi"), add_arg(&a, papi);
    add_arg(&a, "--store"), add_arg(&a, store);
    add_arg(&a, "--threads"), add_arg(&a, "1");
    add_arg(&a, "--subjects"), add_arg(&a, "4");
    add_arg(&a, "--methods"), add_arg(&a, "none,pas_only");
    if (side == 2)
      add_arg(&a, "--weights"), add_arg(&a, "bf16");
  }
  assert_int_equal(run_argv(scratch(log, "mixed.log"), a.v), 1);
  expect_in(log, "different formats");
  expect_in(log, "give --weights fp32 or --weights bf16");
  expect_unchanged(store, before, n0);
  free(before);
}

/* One side of an MPMD job: its model, PAPI directory and further flags
 * (NULL-ended), each side one rank. */
typedef struct {
  const char *model, *papi;
  const char *extra[8];
} side;

/* An MPMD job of rank 0 (sides[0]) and one worker (sides[1]) on store,
 * --subjects 4 --methods none,pas_only unless a side's flags say more. */
static int mpmd(const char *log, const char *store, const side sides[2]) {
  args a = {.n = 0};
  add_arg(&a, PALIGN_MPIEXEC);
  for (int k = 0; k < 2; k++) {
    if (k)
      add_arg(&a, ":");
    add_arg(&a, "-np"), add_arg(&a, "1");
    add_arg(&a, WORKER);
    add_arg(&a, "--model"), add_arg(&a, sides[k].model);
    add_arg(&a, "--papi"), add_arg(&a, sides[k].papi);
    add_arg(&a, "--store"), add_arg(&a, store);
    add_arg(&a, "--threads"), add_arg(&a, "1");
    add_arg(&a, "--subjects"), add_arg(&a, "4");
    bool methods = false;
    for (int i = 0; sides[k].extra[i]; i++)
      methods |= !strcmp(sides[k].extra[i], "--methods");
    if (!methods)
      add_arg(&a, "--methods"), add_arg(&a, "none,pas_only");
    for (int i = 0; sides[k].extra[i]; i++)
      add_arg(&a, sides[k].extra[i]);
  }
  return run_argv(log, a.v);
}

/* A copy of the PAPI data in dir whose Test-set.json lists its first two
 * subjects the other way round (swap) or gives the first subject another
 * answer to item 1 (otherwise): the same file name and count, other data. */
static void papi_changed(const char *dir, bool swap) {
  char cmd[6000], path[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", dir, papi, dir);
  assert_int_equal(system(cmd), 0);
  snprintf(path, sizeof path, "%s/Test-set.json", dir);
  size_t n;
  char *text = tu_slurp(path, &n);
  cJSON *subjects = cJSON_ParseWithLength(text, n);
  free(text);
  const int count = cJSON_GetArraySize(subjects);
  assert_true(count >= 2);
  if (swap) {
    cJSON *swapped = cJSON_CreateArray(), *first = cJSON_DetachItemFromArray(subjects, 0);
    cJSON_AddItemToArray(swapped, cJSON_DetachItemFromArray(subjects, 0));
    cJSON_AddItemToArray(swapped, first);
    while (cJSON_GetArraySize(subjects) > 0)
      cJSON_AddItemToArray(swapped, cJSON_DetachItemFromArray(subjects, 0));
    assert_int_equal(cJSON_GetArraySize(swapped), count);
    cJSON_Delete(subjects);
    subjects = swapped;
  } else {
    cJSON *i1 = cJSON_GetObjectItem(cJSON_GetArrayItem(subjects, 0), "i1");
    assert_true(cJSON_IsNumber(i1));
    cJSON_SetNumberValue(i1, i1->valueint == 5 ? 1 : i1->valueint + 1);
  }
  text = cJSON_PrintUnformatted(subjects);
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  assert_true(fputs(text, f) >= 0);
  assert_int_equal(fclose(f), 0);
  free(text);
  cJSON_Delete(subjects);
}

/* 6c. Ranks started otherwise than rank 0 (an MPMD command line; a node
 * whose cache holds another model file or another copy of the data, or
 * whose working directory puts the relative default store elsewhere):
 * every worker compares rank 0's settings, model and data with its own
 * before anything else, and rank 0 finds every worker's new shard in its
 * store before the manifest lists it, so the job stops with exit 1, the
 * rank that found it naming what differs, and the store is as it was.
 * Without it, a worker with another model would store rank 0's fingerprint
 * over its answers, one with other data other people or answers under the
 * positions handed out, one with another store its records where no
 * manifest lists them, and one whose methods need no model would wait for
 * ever in a collective the others never join. A bad flag on one rank
 * stops every rank with exit 2. */
static void test_ranks_disagree(void **state) {
  (void)state;
  char store[512], log[512], swapped[512], recoded[512], elsewhere[512];
  scratch(store, "disagree");
  copy_base_store(store);
  papi_changed(scratch(swapped, "papi-swapped"), true);
  papi_changed(scratch(recoded, "papi-recoded"), false);
  scratch(elsewhere, "disagree-elsewhere");
  size_t n0;
  char *before = snapshot(store, &n0);
  static const char load[] = "palign-worker: another rank could not load the data";
  static const char other_data[] = "rank 1: reads other data than rank 0 (the subjects in Test-set.json, their "
                                   "answers or descriptions, or the items: another copy of PAPI)";
  const struct {
    const char *name;
    side worker;
    int exit;
    const char *said[3];
  } cases[] = {
      {"seed",
       {model, papi, {"--seed", "4"}},
       1,
       {load, "rank 1: started otherwise than rank 0: run_seed 4 here, 1 on rank 0"}},
      {"methods",
       {model, papi, {"--methods", "const3"}},
       1,
       {load, "model_fingerprint 'none' here",
        "methods 'const3,trait_mean' here, 'none,pas_only,const3,trait_mean' on rank 0"}},
      {"model", {icl_model, papi, {NULL}}, 1, {load, "rank 1: started otherwise than rank 0: model_fingerprint '"}},
      {"subjects", {model, swapped, {NULL}}, 1, {load, other_data}},
      {"answers", {model, recoded, {NULL}}, 1, {load, other_data}},
      {"store",
       {model, papi, {"--store", elsewhere}},
       1,
       {"palign-worker: rank 1 made its shard run2-rank1.pal elsewhere than ", "its --store is another directory"}},
      {"flag",
       {model, papi, {"--methods", "none,pass"}},
       2,
       {"palign-worker: another rank was given a bad flag (see its message)", "unknown method 'pass'"}},
  };
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
    char name[64];
    snprintf(name, sizeof name, "disagree-%s.log", cases[c].name);
    const side sides[2] = {{model, papi, {NULL}}, cases[c].worker};
    assert_int_equal(mpmd(scratch(log, name), store, sides), cases[c].exit);
    for (int k = 0; k < 3 && cases[c].said[k]; k++)
      expect_in(log, cases[c].said[k]);
    expect_unchanged(store, before, n0);
  }
  free(before);
}

/* 6d. A store whose records this run cannot vouch for is refused, and left
 * as it was: records without the manifest that holds their settings (it
 * was deleted, or holds no settings), and records made with another model
 * or seed (a shard copied in by hand). */
static void test_store_unvouched(void **state) {
  (void)state;
  char store[512], log[512], bench[512], path[600];
  scratch(store, "unvouched");
  snprintf(path, sizeof path, "%s/manifest.pb", store);
  static const char no_settings[] = {0x08, 0x01}; /* the format, 1, and nothing else */
  for (int k = 0; k < 2; k++) {
    copy_base_store(store);
    if (k == 0) {
      assert_int_equal(unlink(path), 0);
    } else {
      FILE *f = fopen(path, "wb");
      assert_non_null(f);
      assert_int_equal(fwrite(no_settings, 1, sizeof no_settings, f), sizeof no_settings);
      assert_int_equal(fclose(f), 0);
    }
    size_t n0;
    char *before = snapshot(store, &n0);
    assert_int_equal(worker(scratch(log, k ? "unvouched-empty.log" : "unvouched-gone.log"), 0, NULL, store,
                            "--subjects", "4", "--methods", "none,pas_only", NULL),
                     1);
    expect_in(log, "/manifest.pb, with the settings they were made with, is missing or has none");
    expect_unchanged(store, before, n0);
    free(before);
  }
  /* a benchmark store's shard (model "none") among the base store's */
  copy_base_store(store);
  scratch(bench, "unvouched-bench");
  assert_int_equal(worker(scratch(log, "unvouched-bench.log"), 0, NULL, bench, "--subjects", "6", "--benchmark-delay",
                          "0.001", NULL),
                   0);
  char cmd[2000];
  snprintf(cmd, sizeof cmd, "cp '%s/shards/run1-rank0.pal' '%s/shards/run9-rank0.pal'", bench, store);
  assert_int_equal(system(cmd), 0);
  size_t n0;
  char *before = snapshot(store, &n0);
  assert_int_equal(worker(scratch(log, "unvouched-foreign.log"), 2, NULL, store, "--subjects", "6", "--methods",
                          "none,pas_only", NULL),
                   1);
  expect_in(log, "2 records were made with another model or seed than this run's (the first: subject ");
  expect_in(log, "in shards/run9-rank0.pal, model none, seed 1)");
  expect_unchanged(store, before, n0);
  free(before);
}

/* The stored metrics of the row `name` of r: mae[5] (A, C, E, N, O) and mae_sum. */
static void stored_metrics(const Palign__SubjectResult *r, const char *name, double mae[6]) {
  for (size_t j = 0; j < r->n_methods; j++)
    for (size_t k = 0; k < r->methods[j]->n_rows; k++) {
      const Palign__MethodRow *row = r->methods[j]->rows[k];
      if (strcmp(row->name, name))
        continue;
      assert_non_null(row->metrics);
      assert_int_equal(row->metrics->n_mae, 5);
      for (int t = 0; t < 5; t++)
        mae[t] = row->metrics->mae[t];
      mae[5] = row->metrics->mae_sum;
      return;
    }
  fail_msg("subject %s: no row '%s' stored", r->subject_id, name);
}

static bool same_double(double a, double b) { return a == b || (isnan(a) && isnan(b)); }

/* 7. `palign query export` prints numbers that read back as the stored
 * doubles (query.h: "Numbers are printed to round-trip"), as CSV and as JSON. */
static void test_export_round_trips(void **state) {
  (void)state;
  static const char *const keys[6] = {"mae_A", "mae_C", "mae_E", "mae_N", "mae_O", "mae_sum"};
  char store[512], log[512], csv[512], json[512];
  scratch(store, "export");
  copy_base_store(store);
  recs rs;
  read_store(store, &rs);
  assert_int_equal(
      palign(scratch(log, "export.log"), "query", store, "export", "--out", scratch(csv, "export.csv"), NULL), 0);
  assert_int_equal(
      palign(log, "query", store, "export", "--format", "json", "--out", scratch(json, "export.json"), NULL), 0);
  int bad = 0, rows = 0;
  char first[512] = "";
  /* CSV: subject_id, method, row, mae_A .. mae_O, mae_sum, ...; no field here needs quotes */
  char *text = tu_slurp(csv, NULL);
  char *save = NULL;
  assert_non_null(strtok_r(text, "\n", &save)); /* the header */
  for (char *line; (line = strtok_r(NULL, "\n", &save));) {
    char *f[16] = {0};
    int n = 0;
    f[n++] = line;
    for (char *c = line; n < 16 && (c = strchr(c, ','));) /* not strtok: a NaN is an empty field */
      *c++ = '\0', f[n++] = c;
    assert_true(n >= 9);
    const rec *x = find_rec(&rs, f[0]);
    assert_non_null(x);
    Palign__SubjectResult *r = unpack_rec(x);
    double mae[6];
    stored_metrics(r, f[2], mae);
    for (int k = 0; k < 6; k++) {
      const double v = f[3 + k][0] ? strtod(f[3 + k], NULL) : NAN;
      if (!same_double(v, mae[k]) && bad++ == 0)
        snprintf(first, sizeof first, "CSV: subject %s, row %s, %s: %s printed, %.17g stored", f[0], f[2], keys[k],
                 f[3 + k], mae[k]);
    }
    rows++;
    palign__subject_result__free_unpacked(r, NULL);
  }
  free(text);
  assert_true(rows > 0);
  if (bad)
    fail_msg("%d numbers of %s do not read back as stored; the first: %s", bad, csv, first);

  text = tu_slurp(json, NULL);
  cJSON *root = cJSON_Parse(text);
  free(text);
  assert_non_null(root);
  assert_int_equal(cJSON_GetArraySize(root), rows);
  const cJSON *o;
  cJSON_ArrayForEach(o, root) {
    const char *id = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "subject_id"));
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "row"));
    assert_non_null(id), assert_non_null(name);
    const rec *x = find_rec(&rs, id);
    assert_non_null(x);
    Palign__SubjectResult *r = unpack_rec(x);
    double mae[6];
    stored_metrics(r, name, mae);
    for (int k = 0; k < 6; k++) {
      const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, keys[k]);
      assert_non_null(v);
      const double d = cJSON_IsNull(v) ? NAN : v->valuedouble;
      if (!same_double(d, mae[k]) && bad++ == 0)
        snprintf(first, sizeof first, "JSON: subject %s, row %s, %s: %.17g read back, %.17g stored", id, name, keys[k],
                 d, mae[k]);
    }
    palign__subject_result__free_unpacked(r, NULL);
  }
  cJSON_Delete(root);
  recs_free(&rs);
  if (bad)
    fail_msg("%d numbers of %s do not read back as stored (cJSON prints 15 digits when they come within "
             "DBL_EPSILON); the first: %s",
             bad, json, first);
}

/* 6. Bad flags. */
static void test_bad_flags(void **state) {
  (void)state;
  char store[512], log[512];
  scratch(store, "flags");
  args a = {.n = 0};
  add_arg(&a, WORKER);
  add_arg(&a, "--bogus");
  assert_int_equal(run_argv(scratch(log, "bogus.log"), a.v), 2);
  expect_in(log, "unexpected argument '--bogus'");
  a.n = 0;
  add_arg(&a, WORKER);
  add_arg(&a, "--threads");
  assert_int_equal(run_argv(log, a.v), 2);
  expect_in(log, "--threads needs a value");
  a.n = 0;
  add_arg(&a, WORKER);
  add_arg(&a, "--weights"), add_arg(&a, "fp16");
  assert_int_equal(run_argv(scratch(log, "weights.log"), a.v), 2);
  expect_in(log, "--weights is auto, fp32 or bf16, not 'fp16'");
  a.n = 0;
  add_arg(&a, WORKER);
  add_arg(&a, "--batch"), add_arg(&a, "0");
  assert_int_equal(run_argv(scratch(log, "batch.log"), a.v), 2);
  expect_in(log, "--batch must be an integer in 1..4096, not '0'");
  /* malformed values, on one rank and on two (every rank parses, one says) */
  static const char *const malformed[][3] = {
      {"--subjects", "0", "--subjects is all, N (at least 1) or A-B (A <= B), not '0'"},
      {"--subjects", "abc", "--subjects is all, N (at least 1) or A-B (A <= B), not 'abc'"},
      {"--subjects", "5-2", "--subjects is all, N (at least 1) or A-B (A <= B), not '5-2'"},
      {"--methods", "none,bogus", "--methods: unknown method 'bogus'"},
      {"--benchmark-delay", "1,", "--benchmark-delay is MEAN[,CV]"},
      {"--subjects", "-1", "--subjects is all, N (at least 1) or A-B (A <= B), not '-1'"},
  };
  for (size_t k = 0; k < sizeof malformed / sizeof *malformed; k++)
    for (int np = 0; np <= 2; np += 2) {
      char name[64];
      snprintf(name, sizeof name, "malformed-%zu-np%d.log", k, np);
      assert_int_equal(worker(scratch(log, name), np, NULL, store, malformed[k][0], malformed[k][1], NULL), 2);
      expect_in(log, malformed[k][2]);
    }
  /* a range beyond the subjects file is found once the data is read: exit 1, nothing made */
  assert_int_equal(
      worker(scratch(log, "beyond.log"), 0, NULL, store, "--subjects", "400-500", "--methods", "none", NULL), 1);
  expect_in(log, "--subjects '400-500' is not all, N or A-B within the 300 subjects");
  assert_int_equal(
      worker(scratch(log, "beyond-np2.log"), 2, NULL, store, "--subjects", "400-500", "--methods", "none", NULL), 1);
  expect_in(log, "--subjects '400-500' is not all, N or A-B within the 300 subjects");
  /* so is a holdout that leaves a trait nothing to report (36 test items a
   * trait): before the bank, not as every subject's failed PAS */
  assert_int_equal(worker(scratch(log, "holdout.log"), 2, icl_model, store, "--subjects", "2", "--methods", "pas_only",
                          "--holdout", "36", NULL),
                   1);
  expect_in(log, "--holdout 36: trait A has 36 test items; the holdout protocol needs 36 to choose alpha and one");
  /* no PAPI data where the default points (relative to the working directory): how to give it */
  char cwd[4096], *env = getenv("PALIGN_PAPI_DIR") ? strdup(getenv("PALIGN_PAPI_DIR")) : NULL;
  unsetenv("PALIGN_PAPI_DIR");
  assert_non_null(getcwd(cwd, sizeof cwd));
  assert_int_equal(chdir("/"), 0);
  a.n = 0;
  add_arg(&a, WORKER);
  add_arg(&a, "--store"), add_arg(&a, store), add_arg(&a, "--methods"), add_arg(&a, "none");
  const int rc = run_argv(scratch(log, "no-papi.log"), a.v);
  assert_int_equal(chdir(cwd), 0);
  if (env)
    setenv("PALIGN_PAPI_DIR", env, 1);
  free(env);
  assert_int_equal(rc, 1);
  expect_in(log, "no PAPI data at ../shared/papi (the default, relative to the working directory): give the folder "
                 "with --papi DIR or PALIGN_PAPI_DIR");
  struct stat sb;
  assert_int_not_equal(stat(store, &sb), 0);
}

/* 9. DPO through the service: -np 1 and -np 3 (two workers) store the same
 * adapters, loss curves and answers bit for bit, equal to palign eval's; a
 * rerun does nothing again; other DPO settings are refused with the store
 * unchanged; a bad DPO value exits 2 before anything is made; palign
 * generate --method dpo applies a stored adapter. */
static void test_dpo(void **state) {
  (void)state;
  char s1[512], s3[512], log[512], json[512], out[4096];
  scratch(s1, "dpo-np1"), scratch(s3, "dpo-np3");
  assert_int_equal(worker(scratch(log, "dpo-np1.log"), 1, icl_model, s1, "--subjects", "3", "--methods",
                          "none,dpo,dpo_icl", "--dpo-epochs", "2", NULL),
                   0);
  expect_in(log, "DPO per trained subject");
  assert_int_equal(worker(scratch(log, "dpo-np3.log"), 3, icl_model, s3, "--subjects", "3", "--methods",
                          "none,dpo,dpo_icl", "--dpo-epochs", "2", NULL),
                   0);
  recs a, b;
  read_store(s1, &a);
  read_store(s3, &b);
  expect_complete(&a, 3, 0, s1);
  expect_complete(&b, 3, 0, s3);
  same_stores(&a, &b);
  for (size_t i = 0; i < a.n; i++) {
    Palign__SubjectResult *r = unpack_rec(&a.r[i]);
    assert_non_null(r->dpo);
    assert_true(r->dpo->n_loss > 0 && fabs(r->dpo->loss[0] - 0.69314718055994530942) < 1e-12);
    assert_true(r->dpo->epoch_loss[1] < r->dpo->epoch_loss[0]);
    palign__subject_result__free_unpacked(r, NULL);
  }
  assert_int_equal(palign(scratch(log, "dpo-eval.log"), "eval", "--model", icl_model, "--papi", papi, "--subjects", "3",
                          "--methods", "none,dpo,dpo_icl", "--dpo-epochs", "2", "--threads", "1", "--json",
                          scratch(json, "dpo-eval.json"), NULL),
                   0);
  same_as_eval(&a, json, 3);
  recs_free(&a), recs_free(&b);

  /* resumed: nothing is done again */
  assert_int_equal(worker(scratch(log, "dpo-again.log"), 1, icl_model, s1, "--subjects", "3", "--methods",
                          "none,dpo,dpo_icl", "--dpo-epochs", "2", NULL),
                   0);
  expect_in(log, "3 already stored, 0 to do");
  /* other DPO settings: refused, the store unchanged */
  size_t n0;
  char *before = snapshot(s1, &n0);
  assert_int_equal(worker(scratch(log, "dpo-lr.log"), 1, icl_model, s1, "--subjects", "3", "--methods",
                          "none,dpo,dpo_icl", "--dpo-epochs", "2", "--dpo-lr", "0.01", NULL),
                   1);
  expect_in(log, "dpo.lr '0.001' here, '0.01' asked");
  /* bad DPO values: exit 2, nothing made */
  char fresh[512];
  scratch(fresh, "dpo-bad");
  static const char *const bad[][2] = {
      {"--dpo-rank", "0"}, {"--dpo-lr", "-1e-3"}, {"--dpo-beta", "0"}, {"--dpo-epochs", "0"}};
  static const char *const said[] = {"LoRA rank 0", "learning rate -0.001", "beta 0", "epochs 0"};
  for (int k = 0; k < 4; k++) {
    assert_int_equal(worker(scratch(log, "dpo-bad.log"), k % 2 ? 2 : 1, icl_model, fresh, "--subjects", "3",
                            "--methods", "dpo", bad[k][0], bad[k][1], NULL),
                     2);
    expect_in(log, said[k]);
    assert_int_equal(worker(scratch(log, "dpo-bad-s1.log"), 1, icl_model, s1, "--subjects", "3", "--methods",
                            "none,dpo,dpo_icl", "--dpo-epochs", "2", bad[k][0], bad[k][1], NULL),
                     2);
  }
  struct stat sb;
  assert_int_not_equal(stat(fresh, &sb), 0);
  expect_unchanged(s1, before, n0);
  free(before);

  /* an adapter larger than a store record may be is refused before any
   * subject: 64 layers of 128 (a rank's 1,024 values a layer, 256 KiB in
   * all) at rank 256 are 64 MiB, where a record holds 64 MiB with the rest
   * of the subject's results beside it */
  char deep[512];
  assert_int_equal(palign(scratch(log, "mkmodel-deep.log"), "mkmodel", scratch(deep, "deep.gguf"), "--layers", "64",
                          "--dim", "128", "--heads", "4", "--kv-heads", "4", "--ffn", "32", "--dtype", "f16", NULL),
                   0);
  assert_int_equal(worker(scratch(log, "dpo-deep.log"), 2, deep, fresh, "--subjects", "3", "--methods", "dpo",
                          "--dpo-rank", "256", NULL),
                   1);
  expect_in(log, "DPO's adapter at rank 256 is 64.0 MiB on this model: more than a store record holds beside the "
                 "rest of a subject's results (64 MiB in all); give --dpo-rank 240 or less");
  expect_in(log, "another rank could not start");
  Palign__Manifest *none = NULL;
  assert_int_equal(pa_manifest_read(fresh, &none), PA_ENOTFOUND); /* the run never started */
  pa_error_clear();

  /* the stored adapter answers (and changes the plain model's greedy answer or not: it runs) */
  snprintf(out, sizeof out, "%s", "");
  assert_int_equal(palign(scratch(log, "dpo-generate.log"), "generate", "--model", icl_model, "--store", s1,
                          "--subject", "172481", "--method", "dpo", "--prompt", "Hello", "--max-tokens", "4", NULL),
                   0);
  expect_in(log, "DPO adapter of rank 8");
  assert_int_equal(palign(scratch(log, "dpo-generate-bad.log"), "generate", "--model", icl_model, "--store", s1,
                          "--subject", "172481", "--method", "dpo", "--alpha", "2", "--prompt", "Hello", NULL),
                   2);
  expect_in(log, "--alpha is PAS's");
  assert_int_equal(
      palign(log, "generate", "--model", icl_model, "--store", s1, "--subject", "172481", "--prompt", "Hello", NULL),
      1);
  expect_in(log, "subject 172481 has no PAS result (the run's methods had neither pas nor pas_only)");
}

/* 10. The benchmark mode: no model, a delay per subject; the store says it
 * is a benchmark store, a real run on it is refused, a model method with
 * it is a bad flag, and the records' wall time is the delay. */
static void test_benchmark_mode(void **state) {
  (void)state;
  char store[512], log[512];
  scratch(store, "bench");
  assert_int_equal(worker(scratch(log, "bench.log"), 3, NULL, store, "--subjects", "12", "--chunk", "2",
                          "--benchmark-delay", "0.05,0.5", NULL),
                   0);
  expect_in(log, "methods const3");
  expect_in(log, "per subject finished; per subject");
  expect_in(log, "BENCHMARK a benchmark store");
  recs rs;
  read_store(store, &rs);
  expect_complete(&rs, 12, 0, store);
  recs_free(&rs);
  double total = 0;
  char ids[12][64];
  first_ids(12, ids);
  for (int k = 0; k < 12; k++) {
    Palign__SubjectResult *r = NULL;
    if (pa_query_subject(store, ids[k], &r))
      fail_msg("%s", pa_errmsg());
    assert_true(r->seconds > 0.001 && r->seconds < 5);
    assert_int_equal(r->n_methods, 2); /* const3, trait_mean */
    total += r->seconds;
    palign__subject_result__free_unpacked(r, NULL);
  }
  fprintf(stderr, "    benchmark mode: 12 subjects slept %.3f s on average (0.05 asked)\n", total / 12);
  assert_true(total / 12 > 0.02 && total / 12 < 0.2);
  /* a real run on it is refused; a model method is a bad flag */
  assert_int_equal(
      worker(scratch(log, "bench-real.log"), 0, NULL, store, "--subjects", "12", "--methods", "const3", NULL), 1);
  expect_in(log, "benchmark_delay '0.05' here, '0' asked");
  assert_int_equal(worker(scratch(log, "bench-none.log"), 0, NULL, store, "--subjects", "12", "--benchmark-delay",
                          "0.05", "--methods", "none", NULL),
                   2);
  expect_in(log, "method none cannot go with it");
  assert_int_equal(
      worker(scratch(log, "bench-bad.log"), 0, NULL, store, "--subjects", "12", "--benchmark-delay", "-1", NULL), 2);
  expect_in(log, "--benchmark-delay is MEAN[,CV]");

  /* the time left counts down while a subject is in progress: 3 subjects of
   * 1.5 s each on one rank, a line every 0.25 s; between the first and the
   * second subject's end the estimate (1.5 s a subject, 2 left, less the
   * time since) falls, where one from the rate so far would grow */
  scratch(store, "bench-eta");
  assert_int_equal(worker(scratch(log, "bench-eta.log"), 0, NULL, store, "--subjects", "3", "--benchmark-delay",
                          "1.5,0", "--progress", "0.25", NULL),
                   0);
  char *text = tu_slurp(log, NULL);
  int lines = 0;
  double last = INFINITY;
  for (const char *at = strstr(text, " 1/3 subjects done"); at; at = strstr(at + 1, " 1/3 subjects done")) {
    const char *about = strstr(at, "; about "), *eol = strchr(at, '\n');
    double secs = 0;
    assert_true(about && eol && about < eol && sscanf(about, "; about %lf s left", &secs) == 1);
    if (secs > last)
      fail_msg("the time left grew from %.0f s to %.0f s while the second subject ran:\n%s", last, secs, text);
    last = secs, lines++;
  }
  assert_true(lines >= 3);
  assert_true(last <= 2);
  free(text);
}

/* 11. The soak: one store, SOAK_SUBJECTS subjects on 3 ranks, started over
 * and over and each time killed at a random moment by a random one of the
 * ways a job dies (SIGKILL or SIGTERM to a random worker, to rank 0, to
 * every rank; SIGTERM to mpirun, as scancel does); a store that becomes
 * complete is checked and started afresh. After every round: no record
 * lost, none doubled, no damage but torn tails, and every record equal to
 * the one an uninterrupted run stores. After the last round, a run with no
 * kill completes the store: every subject exactly once, `verify` clean
 * (torn tails aside), the same records as the uninterrupted run.
 *
 * PALIGN_SOAK_ROUNDS (default 8, as CI runs it), PALIGN_SOAK_SUBJECTS
 * (default 24, at most 64) and PALIGN_SOAK_SEED (default 1) set it; the long
 * run is `PALIGN_SOAK_ROUNDS=60 tests/test_service soak`. */
enum { SOAK_MAX = 64 };

static uint64_t soak_rng;

static double soak_uniform(void) { /* [0, 1) */
  soak_rng ^= soak_rng << 13, soak_rng ^= soak_rng >> 7, soak_rng ^= soak_rng << 17;
  return (double)(soak_rng >> 11) / 9007199254740992.0;
}

static long env_long(const char *name, long dflt, long lo, long hi) {
  const char *v = getenv(name);
  if (!v || !*v)
    return dflt;
  char *end;
  const long x = strtol(v, &end, 10);
  if (*end || x < lo || x > hi)
    fail_msg("%s=%s: expected an integer in %ld .. %ld", name, v, lo, hi);
  return x;
}

static const char *const soak_kinds[] = {"SIGKILL to a worker",  "SIGTERM to a worker", "SIGKILL to rank 0",
                                         "SIGTERM to rank 0",    "SIGTERM to mpirun",   "SIGTERM to every rank",
                                         "SIGKILL to every rank"};
enum { N_SOAK_KINDS = sizeof soak_kinds / sizeof *soak_kinds };

/* Sends kill `kind` to the job's ranks (np of them), once they are up;
 * returns false when the job ended first. */
static bool soak_kill(pid_t job, int np, int kind) {
  const int sig = kind == 0 || kind == 2 || kind == 6 ? SIGKILL : SIGTERM;
  if (kind == 4)
    return kill(job, SIGTERM) == 0;
  const int rank = kind <= 1 ? 1 + (int)(soak_uniform() * (np - 1)) : kind <= 3 ? 0 : -1;
  for (const double t_end = now_s() + CMD_WAIT;;) {
    pid_t p[8];
    int n = find_ours(rank, p, 8), n_workers = 0;
    for (int i = 0; i < n; i++)
      n_workers += is_worker(p[i]);
    if (n_workers == (rank < 0 ? np : 1)) {
      for (int i = 0; i < n; i++)
        if (is_worker(p[i]))
          kill(p[i], sig);
      return true;
    }
    int st;
    if (waitpid(job, &st, WNOHANG) == job) {
      track(job, false);
      return false;
    }
    if (now_s() > t_end) {
      kill_leftovers();
      fail_msg("the ranks of the soak job did not all start within %.0f s", CMD_WAIT);
    }
    sleep_s(0.01);
  }
}

/* What every round must leave: only torn tails as damage, no duplicate,
 * the records of `had` still there, every record the reference's. */
static void soak_check(const char *store, const recs *rs, const recs *ref, const recs *had, int round) {
  if (rs->counts[PA_RECORD_DUPLICATE])
    fail_msg("round %d: %s holds %zu duplicate records", round, store, rs->counts[PA_RECORD_DUPLICATE]);
  if (damaged(rs) != rs->counts[PA_RECORD_TORN])
    fail_msg("round %d: %s holds damage other than torn tails", round, store);
  for (size_t i = 0; i < had->n; i++)
    if (!find_rec(rs, had->r[i].id))
      fail_msg("round %d: subject %s was stored before this round and is gone from %s", round, had->r[i].id, store);
  for (size_t i = 0; i < rs->n; i++) {
    const rec *y = find_rec(ref, rs->r[i].id);
    if (!y)
      fail_msg("round %d: %s holds subject %s, which was not asked for", round, store, rs->r[i].id);
    same_record(y, &rs->r[i]);
  }
}

static void test_soak(void **state) {
  (void)state;
  const int rounds = (int)env_long("PALIGN_SOAK_ROUNDS", 8, 1, 100000);
  const int n_subjects = (int)env_long("PALIGN_SOAK_SUBJECTS", 24, 2, SOAK_MAX);
  soak_rng = (uint64_t)env_long("PALIGN_SOAK_SEED", 1, 1, LONG_MAX) * 0x9E3779B97F4A7C15ULL;
  const int np = 3;
  char n_arg[16], store[512], ref_store[512], log[512], vlog[512];
  snprintf(n_arg, sizeof n_arg, "%d", n_subjects);
  fprintf(stderr, "    soak: %d rounds, %d subjects, %d ranks, seed %ld\n", rounds, n_subjects, np,
          env_long("PALIGN_SOAK_SEED", 1, 1, LONG_MAX));
  const double t0 = now_s();

  recs ref, rs, had = {0};
  assert_int_equal(worker(scratch(log, "soak-ref.log"), np, NULL, scratch(ref_store, "soak-ref"), "--subjects", n_arg,
                          "--chunk", "1", "--methods", "none,pas_only", NULL),
                   0);
  read_store(ref_store, &ref);
  expect_complete(&ref, (size_t)n_subjects, 0, ref_store);

  int kills[N_SOAK_KINDS] = {0}, stores_done = 0, jobs_ended_first = 0;
  size_t torn = 0;
  scratch(store, "soak");
  for (int round = 1; round <= rounds; round++) {
    /* a random moment: after 0, 1 or 2 more records, plus up to 1.5 s */
    const size_t more = (size_t)(soak_uniform() * 3);
    const double extra = 1.5 * soak_uniform();
    const int kind = (int)(soak_uniform() * N_SOAK_KINDS);
    snprintf(log, sizeof log, "%s/soak-%d.log", tu_tmp, round);
    const pid_t job =
        worker_start(log, np, store, "--subjects", n_arg, "--chunk", "1", "--methods", "none,pas_only", NULL);
    int st;
    bool ended = false;
    if (more > 0) {
      const size_t want = had.n + more < (size_t)n_subjects ? had.n + more : (size_t)n_subjects;
      for (const double t_end = now_s() + CMD_WAIT;;) {
        size_t counts[6] = {0};
        if (pa_store_read(store, NULL, NULL, counts) == PA_OK && counts[PA_RECORD_OK] >= want)
          break;
        pa_error_clear();
        if (waitpid(job, &st, WNOHANG) == job) {
          track(job, false), ended = true;
          break;
        }
        if (now_s() > t_end) {
          kill_leftovers();
          fail_msg("round %d: no %zu records within %.0f s (log %s)", round, want, CMD_WAIT, log);
        }
        sleep_s(0.02);
      }
    }
    if (!ended) {
      sleep_s(extra);
      ended = !soak_kill(job, np, kind);
    }
    int rc = ended ? 0 : wait_job_end(job, log);
    if (ended) {
      jobs_ended_first++;
    } else {
      kills[kind]++;
      /* a job may finish between the moment and the kill: then it exits 0 */
      if (rc == 0)
        jobs_ended_first++;
    }
    read_store(store, &rs);
    soak_check(store, &rs, &ref, &had, round);
    torn += rs.counts[PA_RECORD_TORN];
    if (rs.n == (size_t)n_subjects) { /* complete: checked, then a fresh store */
      expect_complete(&rs, (size_t)n_subjects, rs.counts[PA_RECORD_TORN], store);
      snprintf(vlog, sizeof vlog, "%s/soak-verify-%d.log", tu_tmp, round);
      expect_verified(store, &rs, vlog);
      stores_done++;
      recs_free(&rs);
      tu_rm_rf(store);
    }
    recs_free(&had);
    if (access(store, F_OK) == 0)
      read_store(store, &had);
  }
  recs_free(&had);

  /* the last run, not killed, completes the store */
  assert_int_equal(worker(scratch(log, "soak-final.log"), np, NULL, store, "--subjects", n_arg, "--chunk", "1",
                          "--methods", "none,pas_only", NULL),
                   0);
  read_store(store, &rs);
  expect_complete(&rs, (size_t)n_subjects, rs.counts[PA_RECORD_TORN], store);
  same_stores(&ref, &rs);
  expect_verified(store, &rs, scratch(vlog, "soak-final-verify.log"));
  stores_done++;
  fprintf(stderr, "    soak: %d rounds in %.0f s; %d stores completed and checked, %zu torn tails seen; kills:", rounds,
          now_s() - t0, stores_done, torn);
  for (int k = 0; k < N_SOAK_KINDS; k++)
    fprintf(stderr, "%s %s %d", k ? "," : "", soak_kinds[k], kills[k]);
  fprintf(stderr, "; %d jobs ended before their kill\n", jobs_ended_first);
  recs_free(&rs), recs_free(&ref);
}

/* The prompt's token count `palign generate --stats` logged. */
static long prompt_tokens(const char *log) {
  char *text = tu_slurp(log, NULL);
  const char *at = strstr(text, "prompt ");
  long n = -1;
  assert_true(at && sscanf(at, "prompt %ld tokens", &n) == 1);
  free(text);
  return n;
}

/* 12. A run on a subjects file (PAPI's layout, other people): the worker
 * fits its subjects, and palign generate's pas variant builds the ICL prompt
 * from that file (the store's settings name it), not from Test-set.json, even
 * for an id both hold; it refuses another person under the subject's id
 * (Test-set.json's, or a file of the same relative name elsewhere), another
 * inventory, a file it cannot find (naming --subjects-file) and --system; a
 * method failing on a subject leaves it done, and the progress says so; a
 * damaged bank stops the next run before it starts, the store as it was. */
static void test_subjects_file(void **state) {
  (void)state;
  char store[512], rel_store[512], log[512], file[512], testset[4200], cwd[4096], want[6000];
  /* zz1 answers as Test-set's second subject, and its first subject's id as its third */
  snprintf(testset, sizeof testset, "%s/Test-set.json", papi);
  char *text = tu_slurp(testset, NULL);
  cJSON *all = cJSON_Parse(text), *mine = cJSON_CreateArray();
  free(text);
  assert_true(all && mine && cJSON_GetArraySize(all) >= 3);
  const cJSON *case0 = cJSON_GetObjectItem(cJSON_GetArrayItem(all, 0), "case"); /* a number in PAPI's file */
  char id0[64];
  assert_true(cJSON_IsNumber(case0));
  snprintf(id0, sizeof id0, "%.0f", case0->valuedouble);
  cJSON *a = cJSON_Duplicate(cJSON_GetArrayItem(all, 1), 1), *b = cJSON_Duplicate(cJSON_GetArrayItem(all, 2), 1);
  cJSON_ReplaceItemInObject(a, "case", cJSON_CreateString("zz1"));
  cJSON_ReplaceItemInObject(b, "case", cJSON_Duplicate(case0, 1));
  cJSON_AddItemToArray(mine, a), cJSON_AddItemToArray(mine, b);
  char *json = cJSON_PrintUnformatted(mine);
  tu_write_text(scratch(file, "subjects.json"), json);
  free(json);
  cJSON_Delete(mine);

  /* p2 fails on them (a subjects file brings no P2 descriptions): their
   * records hold the other methods' rows, and they count as done */
  assert_int_equal(worker(scratch(log, "sf.log"), 2, icl_model, scratch(store, "sf"), "--methods", "icl,pas,p2",
                          "--subjects-file", file, "--alphas", "0,4", NULL),
                   0);
  expect_in(log, "2/2 subjects done (2 with a method failed), 0 failed, 0 left");
  expect_in(log, "subject zz1, method p2 failed");
  recs rs;
  read_store(store, &rs);
  assert_int_equal(rs.n, 2);
  assert_int_equal(damaged(&rs), 0);
  for (size_t i = 0; i < rs.n; i++)
    if (strcmp(rs.r[i].id, "zz1") && strcmp(rs.r[i].id, id0))
      fail_msg("%s: a record of subject %s, who is not in %s", store, rs.r[i].id, file);
  recs_free(&rs);
  const char *gen[] = {"generate", "--model", icl_model, "--store",  store,   "--variant", "pas",      "--max-tokens",
                       "1",        "--papi",  papi,      "--prompt", "Hello", "--stats",   "--subject"};
#define GENERATE(log, id, ...)                                                                                         \
  palign(log, gen[0], gen[1], gen[2], gen[3], gen[4], gen[5], gen[6], gen[7], gen[8], gen[9], gen[10], gen[11],        \
         gen[12], gen[13], gen[14], id, __VA_ARGS__)
  assert_int_equal(GENERATE(scratch(log, "sf-zz1.log"), "zz1", NULL), 0);
  /* --system with the ICL variant: refused with the flags, or once the record says it is the only one */
  assert_int_equal(GENERATE(scratch(log, "sf-system.log"), "zz1", "--system", "Be brief.", NULL), 2);
  expect_in(log, "--system does not go with the pas variant, whose system message is the subject's ICL prompt");
  assert_int_equal(palign(scratch(log, "sf-system-default.log"), "generate", "--model", icl_model, "--store", store,
                          "--subject", "zz1", "--papi", papi, "--system", "Be brief.", "--prompt", "Hello", NULL),
                   1);
  expect_in(log, "--system does not go with the pas variant (the subject's record has no pas_only)");
  char mine_log[512], theirs_log[512];
  assert_int_equal(GENERATE(scratch(log, "sf-id0.log"), id0, NULL), 0);
  assert_int_equal(GENERATE(scratch(mine_log, "sf-id0-mine.log"), id0, "--subjects-file", file, NULL), 0);
  assert_int_equal(prompt_tokens(log), prompt_tokens(mine_log));
  /* Test-set.json's person under that id is someone else: refused, whatever the path */
  assert_int_equal(GENERATE(scratch(theirs_log, "sf-id0-theirs.log"), id0, "--subjects-file", testset, NULL), 1);
  snprintf(want, sizeof want, "subject %s of %s is not the person %s holds under that id", id0, testset, store);
  expect_in(theirs_log, want);
  expect_in(theirs_log, "give the subjects file the store was fitted on with --subjects-file");
  /* nor is a PAPI whose inventory is not the store's (every item's text changed) */
  char papi2[512], from[4300], to[600];
  assert_int_equal(mkdir(scratch(papi2, "papi2"), 0755), 0);
  static const char *const same[] = {"Test-set.json", "mpi_300_split.json", "personality_prompt.json"};
  for (size_t i = 0; i < sizeof same / sizeof *same; i++) {
    snprintf(from, sizeof from, "%s/%s", papi, same[i]);
    snprintf(to, sizeof to, "%s/%s", papi2, same[i]);
    assert_int_equal(symlink(from, to), 0);
  }
  snprintf(from, sizeof from, "%s/ipip_neo_300_items.csv", papi);
  snprintf(to, sizeof to, "%s/ipip_neo_300_items.csv", papi2);
  char *csv = tu_slurp(from, NULL);
  for (char *c = csv; *c; c++) /* the texts' full stops at the ends of lines */
    if (c[0] == '.' && (c[1] == '\r' || c[1] == '\n'))
      *c = '!';
  tu_write_text(to, csv);
  free(csv);
  assert_int_equal(palign(scratch(log, "sf-papi2.log"), "generate", "--model", icl_model, "--store", store, "--subject",
                          "zz1", "--variant", "pas", "--papi", papi2, "--prompt", "Hello", NULL),
                   1);
  snprintf(want, sizeof want, "the PAPI inventory in %s is not the one %s was fitted on", papi2, store);
  expect_in(log, want);

  /* the file named relative to where the run started, generate run elsewhere */
  assert_non_null(getcwd(cwd, sizeof cwd));
  assert_int_equal(chdir(tu_tmp), 0);
  const int rc = worker(scratch(log, "sf-rel.log"), 0, icl_model, scratch(rel_store, "sf-rel"), "--methods",
                        "pas_only,p2", "--subjects-file", "subjects.json", "--subjects", "1", "--alphas", "0,4", NULL);
  assert_int_equal(chdir(cwd), 0);
  assert_int_equal(rc, 0);
  expect_in(log, "1/1 subjects done (1 with a method failed), 0 failed, 0 left"); /* one process: its own count */
  assert_int_equal(palign(scratch(log, "sf-rel-gen.log"), "generate", "--model", icl_model, "--store", rel_store,
                          "--subject", "zz1", "--variant", "pas", "--alpha", "1", "--papi", papi, "--prompt", "Hello",
                          NULL),
                   1);
  expect_in(log, "was fitted on the subjects of subjects.json (its settings), which cannot be read from here");
  expect_in(log, "give the file with --subjects-file");
  assert_int_equal(palign(scratch(log, "sf-rel-ok.log"), "generate", "--model", icl_model, "--store", rel_store,
                          "--subject", "zz1", "--variant", "pas", "--alpha", "1", "--papi", papi, "--prompt", "Hello",
                          "--max-tokens", "1", "--subjects-file", file, NULL),
                   0);
  /* another subjects.json where generate runs, its zz1 another person: refused */
  char other[512], other_file[600];
  assert_int_equal(mkdir(scratch(other, "elsewhere"), 0755), 0);
  cJSON *theirs = cJSON_CreateArray(), *c = cJSON_Duplicate(cJSON_GetArrayItem(all, 3), 1);
  cJSON_ReplaceItemInObject(c, "case", cJSON_CreateString("zz1"));
  cJSON_AddItemToArray(theirs, c);
  json = cJSON_PrintUnformatted(theirs);
  snprintf(other_file, sizeof other_file, "%s/subjects.json", other);
  tu_write_text(other_file, json);
  free(json);
  cJSON_Delete(theirs);
  assert_int_equal(chdir(other), 0);
  const int orc =
      palign(scratch(log, "sf-rel-other.log"), "generate", "--model", icl_model, "--store", rel_store, "--subject",
             "zz1", "--variant", "pas", "--alpha", "1", "--papi", papi, "--prompt", "Hello", NULL);
  assert_int_equal(chdir(cwd), 0);
  assert_int_equal(orc, 1);
  expect_in(log, "subject zz1 of subjects.json is not the person");
#undef GENERATE
  cJSON_Delete(all);

  /* a damaged bank in the store stops a run (never recomputed over it); the
   * message says how to recover, and the run's record why it stopped */
  DIR *dir = opendir(store);
  struct dirent *e;
  char bank[1024] = "";
  while (dir && (e = readdir(dir)))
    if (!strncmp(e->d_name, "bank-", 5))
      snprintf(bank, sizeof bank, "%s/%s", store, e->d_name);
  if (dir)
    closedir(dir);
  assert_true(bank[0]);
  size_t len;
  char *data = tu_slurp(bank, &len);
  data[len - 9] ^= 1;
  tu_write(bank, data, len);
  free(data);
  size_t n0;
  char *before = snapshot(store, &n0);
  for (int np = 0; np <= 2; np += 2) {
    assert_int_equal(worker(scratch(log, np ? "sf-bank-np2.log" : "sf-bank.log"), np, icl_model, store, "--methods",
                            "icl,pas,p2", "--subjects-file", file, "--alphas", "0,4", NULL),
                     1);
    expect_in(log, "corrupted: its SHA-256 does not match its content");
    expect_in(log, "the bank is a cache: delete the file and it is computed again");
    expect_unchanged(store, before, n0); /* no run listed, no shard made */
  }
  free(before);
}

/* ---- the group ----------------------------------------------------------------------- */

static int setup_group(void **state) {
  if (tu_setup(state))
    return -1;
  snprintf(owner_env, sizeof owner_env, "PALIGN_TEST_OWNER=%d", (int)getpid());
  snprintf(papi, sizeof papi, "%s", test_papi_dir());
  tu_path(model, sizeof model, "tiny.gguf");
  tu_path(icl_model, sizeof icl_model, "tiny-icl.gguf");
  char log[512];
  if (palign(scratch(log, "mkmodel.log"), "mkmodel", model, "--ctx", "4096", "--force", NULL) ||
      palign(log, "mkmodel", icl_model, "--ctx", "4096", "--layers", "1", "--merges", "800", "--dim", "32", "--heads",
             "2", "--kv-heads", "1", "--ffn", "64", "--force", NULL))
    return -1;
  return 0;
}

static int teardown_group(void **state) {
  kill_leftovers();
  for (size_t i = 0; i < n_seen; i++)
    free(seen[i].norm);
  return tu_teardown(state);
}

int main(int argc, char **argv) {
  char path[4200];
  snprintf(path, sizeof path, "%s/Test-set.json", test_papi_dir());
  if (access(path, R_OK) != 0) {
    fprintf(stderr, "skipping: no PAPI data at %s\n", test_papi_dir());
    return 77;
  }
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  setenv("OMPI_MCA_rmaps_base_oversubscribe", "1", 1);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_teardown(test_rank_count_and_eval, teardown_test),
      cmocka_unit_test_teardown(test_resume_after_kill, teardown_test),
      cmocka_unit_test_teardown(test_sigterm, teardown_test),
      cmocka_unit_test_teardown(test_damaged_shard, teardown_test),
      cmocka_unit_test_teardown(test_settings_mismatch, teardown_test),
      cmocka_unit_test_teardown(test_workers_cannot_start, teardown_test),
      cmocka_unit_test_teardown(test_mixed_weights, teardown_test),
      cmocka_unit_test_teardown(test_ranks_disagree, teardown_test),
      cmocka_unit_test_teardown(test_store_unvouched, teardown_test),
      cmocka_unit_test_teardown(test_bad_flags, teardown_test),
      cmocka_unit_test_teardown(test_export_round_trips, teardown_test),
      cmocka_unit_test_teardown(test_dpo, teardown_test),
      cmocka_unit_test_teardown(test_benchmark_mode, teardown_test),
      cmocka_unit_test_teardown(test_subjects_file, teardown_test),
  };
  const struct CMUnitTest soak[] = {cmocka_unit_test_teardown(test_soak, teardown_test)};
  if (argc > 1 && !strcmp(argv[1], "soak")) /* the soak test alone (test_soak in ctest) */
    return cmocka_run_group_tests(soak, setup_group, teardown_group);
  if (argc > 2 && !strcmp(argv[1], "only")) /* the tests whose names match a pattern (cmocka's * and ?) */
    cmocka_set_test_filter(argv[2]);
  else if (argc > 1) {
    fprintf(stderr, "usage: %s [soak | only PATTERN]\n", argv[0]);
    return 2;
  }
  return cmocka_run_group_tests(tests, setup_group, teardown_group);
}
