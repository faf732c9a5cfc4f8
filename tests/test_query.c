/* `palign query` (store/query.h) on stores built by hand: a manifest and two
 * shards of SubjectResult records with known metrics. The summary must give
 * the means computed here by hand, the export one row per subject and
 * MethodRow, the subject view the right record, and verify must be clean on
 * a good store and name the shard and offset of every damaged record, which
 * summary then skips with a warning. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "palign.pb-c.h"
#include "status.h"
#include "store.h"
#include "testutil.h"
#include "tu_record.h"
#include "utf8.h"

/* ---- building messages (tu_record.h) ------------------------------------------ */

static Palign__MethodRow *row_all(const char *name, double x) { return tu_rec_row(name, (double[5]){x, x, x, x, x}); }

static Palign__Cost *cost(double seconds, int64_t tokens) {
  Palign__Cost *c = tu_rec_cost(seconds, tokens, 50);
  c->full_prompt_tokens = 4 * tokens;
  return c;
}

static Palign__PasChoice *choice(const char *variant, const char *protocol, int index, double alpha) {
  Palign__PasChoice *c = TU_NEW(Palign__PasChoice);
  palign__pas_choice__init(c);
  c->variant = (char *)variant, c->protocol = (char *)protocol, c->index = index, c->alpha = alpha;
  c->select_mae_sum = 4.5;
  return c;
}

/* A fitted PAS result choosing (grid 0, 2, 4) alpha_ref and alpha_hold for
 * pas, and pas_only's reference alpha at index only_index (-1: none). */
static Palign__PasResult *pas(int ref_index, int hold_index, int only_index) {
  static const double grid[3] = {0, 2, 4};
  Palign__PasResult *p = TU_NEW(Palign__PasResult);
  palign__pas_result__init(p);
  p->status = "fitted";
  p->run_seed = 7, p->n_layers = 4, p->heads_per_layer = 2, p->head_dim = 2, p->top_k = 1;
  p->n_alphas = 3;
  p->alphas = TU_ARRAY(double, 3);
  memcpy(p->alphas, grid, sizeof grid);
  p->n_heads = 1;
  p->heads = TU_ARRAY(Palign__PasHead *, 1);
  Palign__PasHead *h = p->heads[0] = TU_NEW(Palign__PasHead);
  palign__pas_head__init(h);
  h->layer = 3, h->head = 1, h->score = 0.875, h->val_acc = 0.75, h->sigma = 0.5;
  h->n_direction = 2;
  h->direction = TU_ARRAY(float, 2);
  h->direction[0] = 0.6f, h->direction[1] = 0.8f;
  p->n_chosen = 4;
  p->chosen = TU_ARRAY(Palign__PasChoice *, 4);
  p->chosen[0] = choice("pas", "reference", ref_index, grid[ref_index]);
  p->chosen[1] = choice("pas", "holdout", hold_index, grid[hold_index]);
  p->chosen[2] = choice("pas_only", "reference", only_index, only_index < 0 ? 0 : grid[only_index]);
  p->chosen[3] = choice("pas_only", "holdout", -1, 0);
  p->fit_seconds = 0.5;
  p->grid_cost = cost(2, 1000);
  return p;
}

static const char fingerprint[] = "abababababababababababababababababababababababababababababababab";

static Palign__SubjectResult *subject(const char *id, int64_t index, double seconds) {
  Palign__SubjectResult *r = tu_rec_subject(id, index, seconds, fingerprint, 7);
  r->rank = 1;
  r->host = "node1";
  r->finished_unix = 1700000000;
  return r;
}

/* The four subjects:
 *   s1  icl (A .5, C 1, E 1.5, N 0, O 2), pas (reference) all 1, pas (holdout) all .5, const3 all 1
 *   s2  icl (1.5, 1, .5, 1, 1),          pas (reference) all 2, pas (holdout) all 1,  const3 all 2
 *   s3  failed as a whole
 *   s4  icl (1, 1, 1, 2, O unknown),      pas failed,                                  const3 all 3
 * s1 and s2 in run1-rank1.pal, s3 and s4 in run1-rank2.pal. */
static Palign__SubjectResult *records[4];

static void make_records(void) {
  Palign__SubjectResult *s1 = subject("s1", 0, 10), *s2 = subject("s2", 1, 20), *s3 = subject("s3", 2, 1),
                        *s4 = subject("s4", 3, 6);
  Palign__MethodRow *icl1 = tu_rec_row("icl", (double[5]){0.5, 1, 1.5, 0, 2});
  /* s1's icl row carries its predictions */
  icl1->predictions = tu_rec_predictions(3, (int32_t[]){11, 12, 13}, (uint8_t[]){5, 4, 3}, (uint8_t[]){4, 4, 2}, NULL);

  tu_rec_set_methods(s1,
              (Palign__MethodResult *[]){
                  tu_rec_method("icl", (Palign__MethodRow *[]){icl1}, 1, cost(1, 100), NULL),
                  tu_rec_method("pas", (Palign__MethodRow *[]){row_all("pas (reference)", 1), row_all("pas (holdout)", 0.5)},
                         2, cost(3, 500), NULL),
                  tu_rec_method("const3", (Palign__MethodRow *[]){row_all("const3", 1)}, 1, cost(0, 0), NULL)},
              3);
  s1->pas = pas(1, 2, 0);
  tu_rec_set_methods(
      s2,
      (Palign__MethodResult *[]){
          tu_rec_method("icl", (Palign__MethodRow *[]){tu_rec_row("icl", (double[5]){1.5, 1, 0.5, 1, 1})}, 1, cost(2, 200), NULL),
          tu_rec_method("pas", (Palign__MethodRow *[]){row_all("pas (reference)", 2), row_all("pas (holdout)", 1)}, 2,
                 cost(5, 700), NULL),
          tu_rec_method("const3", (Palign__MethodRow *[]){row_all("const3", 2)}, 1, cost(0, 0), NULL)},
      3);
  s2->pas = pas(1, 0, -1);
  s3->failed = true;
  s3->error = "out of memory on the GPU";
  tu_rec_set_methods(
      s4,
      (Palign__MethodResult *[]){
          tu_rec_method("icl", (Palign__MethodRow *[]){tu_rec_row("icl", (double[5]){1, 1, 1, 2, NAN})}, 1, cost(3, 300), NULL),
          tu_rec_method("pas", NULL, 0, NULL, "probe diverged"),
          tu_rec_method("const3", (Palign__MethodRow *[]){row_all("const3", 3)}, 1, cost(0, 0), NULL)},
      3);
  records[0] = s1, records[1] = s2, records[2] = s3, records[3] = s4;
}

/* The size of a record in a shard. */
static size_t record_size(int k) { return PA_STORE_RECORD_HEAD + palign__subject_result__get_packed_size(records[k]); }

/* Writes the store: the manifest lists `shards` (NULL: the two written). */
static void make_store(const char *store, const char *const *shards, int n_shards) {
  Palign__Settings st = PALIGN__SETTINGS__INIT;
  st.model_fingerprint = (char *)fingerprint;
  st.inventory_fingerprint = "cdcdcdcdcdcdcdcd";
  char *methods[] = {"icl", "pas", "const3"};
  st.methods = methods, st.n_methods = 3;
  st.mode = "logits";
  st.run_seed = 7;
  st.holdout_per_trait = 6;
  double alphas[] = {0, 2, 4};
  st.alphas = alphas, st.n_alphas = 3;
  Palign__RunRecord run = PALIGN__RUN_RECORD__INIT, *runs[] = {&run};
  run.started_unix = 1700000000, run.finished_unix = 1700000100, run.ranks = 3, run.git_revision = "abc1234";
  run.version = "0.1.0";
  Palign__Manifest m = PALIGN__MANIFEST__INIT;
  m.format = PA_STORE_FORMAT;
  m.settings = &st;
  char n1[64], n2[64];
  char *listed[8] = {(char *)pa_shard_name(1, 1, n1), (char *)pa_shard_name(1, 2, n2)};
  if (shards) {
    for (int i = 0; i < n_shards; i++)
      listed[i] = (char *)shards[i];
  } else {
    n_shards = 2;
  }
  m.shards = listed, m.n_shards = (size_t)n_shards;
  m.runs = runs, m.n_runs = 1;
  m.subjects_total = 5;
  assert_int_equal(pa_manifest_write(store, &m), 0);
  for (int rank = 1; rank <= 2; rank++) {
    pa_shard_writer *w;
    assert_int_equal(pa_shard_open(store, 1, rank, &w), 0);
    for (int k = 2 * (rank - 1); k < 2 * rank; k++)
      assert_int_equal(pa_shard_append(w, records[k]), 0);
    assert_int_equal(pa_shard_close(w), 0);
  }
}

static const char *store_path(const char *name) {
  static char buf[8][300];
  static int k;
  char *b = buf[k++ % 8];
  return tu_path(b, sizeof buf[0], name);
}

/* ---- running the CLI ---------------------------------------------------------- */

static char out[1 << 17], err[1 << 16];

/* Runs `palign ARGS`: stdout into `out`, stderr into `err`; returns the exit status. */
#define palign(...) tu_run(out, sizeof out, err, sizeof err, "timeout 60 " PALIGN_BINARY_DIR "/palign " __VA_ARGS__)

#define expect_out(w) tu_expect_in(out, w, "stdout")
#define expect_err(w) tu_expect_in(err, w, "stderr")

static const cJSON *row_named(const cJSON *summary, const char *name) {
  const cJSON *r;
  cJSON_ArrayForEach(r, cJSON_GetObjectItem(summary, "rows")) {
    if (!strcmp(cJSON_GetStringValue(cJSON_GetObjectItem(r, "name")), name))
      return r;
  }
  fail_msg("no row '%s' in the summary", name);
  return NULL;
}

static double num(const cJSON *o, const char *path) {
  char buf[128];
  snprintf(buf, sizeof buf, "%s", path);
  const cJSON *x = o;
  for (char *save = NULL, *k = strtok_r(buf, ".", &save); k; k = strtok_r(NULL, ".", &save))
    x = cJSON_GetObjectItem(x, k);
  if (!x)
    fail_msg("no %s", path);
  return cJSON_IsNull(x) ? NAN : cJSON_GetNumberValue(x);
}

#define TOL 1e-12

/* cmocka 1.1 compares floats only */
#define expect_near(a, b, tol) expect_near_at((a), (b), (tol), #a, __LINE__)
static void expect_near_at(double a, double b, double tol, const char *what, int line) {
  if (!(fabs(a - b) <= tol))
    fail_msg("line %d: %s = %.17g, expected %.17g", line, what, a, b);
}

/* ---- the tests ---------------------------------------------------------------- */

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  make_records();
  make_store(store_path("good"), NULL, 0);
  return 0;
}

static int teardown(void **s) {
  tu_rec_free();
  return tu_teardown(s);
}

static void test_summary_json(void **s) {
  (void)s;
  assert_int_equal(palign("query %s summary --json", store_path("good")), 0);
  cJSON *j = cJSON_Parse(out);
  if (!j)
    fail_msg("not JSON:\n%s", out);
  /* the row names, first-seen order */
  const char *names[] = {"icl", "pas (reference)", "pas (holdout)", "const3"};
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(j, "rows")), 4);
  for (int i = 0; i < 4; i++)
    assert_string_equal(
        cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "rows"), i), "name")),
        names[i]);
  /* icl: s1, s2, s4; O and the sum only where scored (s1, s2) */
  const cJSON *icl = row_named(j, "icl");
  assert_int_equal((int)num(icl, "subjects"), 3);
  expect_near(num(icl, "mae.A"), (0.5 + 1.5 + 1) / 3, TOL);
  expect_near(num(icl, "mae.C"), 1, TOL);
  expect_near(num(icl, "mae.E"), (1.5 + 0.5 + 1) / 3, TOL);
  expect_near(num(icl, "mae.N"), (0 + 1 + 2) / 3.0, TOL);
  expect_near(num(icl, "mae.O"), (2 + 1) / 2.0, TOL);
  expect_near(num(icl, "mae_sum"), (5 + 5) / 2.0, TOL);
  assert_int_equal((int)num(icl, "scored"), 10 + 10 + 8);
  assert_int_equal((int)num(icl, "unknown"), 2);
  const cJSON *ref = row_named(j, "pas (reference)"), *hold = row_named(j, "pas (holdout)");
  assert_int_equal((int)num(ref, "subjects"), 2);
  expect_near(num(ref, "mae.A"), 1.5, TOL);
  expect_near(num(ref, "mae_sum"), (5 + 10) / 2.0, TOL);
  expect_near(num(hold, "mae.O"), 0.75, TOL);
  expect_near(num(hold, "mae_sum"), (2.5 + 5) / 2.0, TOL);
  const cJSON *c3 = row_named(j, "const3");
  assert_int_equal((int)num(c3, "subjects"), 3);
  expect_near(num(c3, "mae.N"), 2, TOL);
  expect_near(num(c3, "mae_sum"), 10, TOL);
  /* counts */
  assert_int_equal((int)num(j, "subjects.stored"), 3);
  assert_int_equal((int)num(j, "subjects.failed"), 1);
  assert_int_equal((int)num(j, "subjects.total"), 5);
  expect_near(num(j, "subjects.seconds_per_subject"), (10 + 20 + 6) / 3.0, TOL);
  assert_int_equal((int)num(j, "records.ok"), 4);
  assert_int_equal((int)num(j, "records.skipped"), 0);
  assert_int_equal((int)num(j, "failures.subjects"), 1);
  assert_int_equal((int)num(j, "failures.methods"), 1);
  /* costs per method over the runs that did not fail */
  const cJSON *m;
  int seen = 0;
  cJSON_ArrayForEach(m, cJSON_GetObjectItem(j, "methods")) {
    const char *name = cJSON_GetStringValue(cJSON_GetObjectItem(m, "method"));
    if (!strcmp(name, "icl")) {
      assert_int_equal((int)num(m, "runs"), 3);
      expect_near(num(m, "seconds_per_subject"), 2, TOL);
      expect_near(num(m, "tokens_per_subject"), 200, TOL);
      seen++;
    } else if (!strcmp(name, "pas")) {
      assert_int_equal((int)num(m, "runs"), 2);
      assert_int_equal((int)num(m, "failed"), 1);
      expect_near(num(m, "seconds_per_subject"), 4, TOL);
      seen++;
    }
  }
  assert_int_equal(seen, 2);
  /* alpha choices: pas (reference) 2 twice; pas (holdout) 0 once, 4 once; pas_only (reference) 0 once, none once */
  assert_int_equal((int)num(j, "pas.fitted"), 2);
  const cJSON *chosen = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "pas"), "chosen");
  assert_int_equal(cJSON_GetArraySize(chosen), 4);
  const cJSON *c0 = cJSON_GetArrayItem(chosen, 0), *c1 = cJSON_GetArrayItem(chosen, 1),
              *c2 = cJSON_GetArrayItem(chosen, 2);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(c0, "protocol")), "reference");
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(c0, "alphas")), 1);
  expect_near(num(cJSON_GetArrayItem(cJSON_GetObjectItem(c0, "alphas"), 0), "alpha"), 2, 0);
  assert_int_equal((int)num(cJSON_GetArrayItem(cJSON_GetObjectItem(c0, "alphas"), 0), "count"), 2);
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(c1, "alphas")), 2);
  expect_near(num(cJSON_GetArrayItem(cJSON_GetObjectItem(c1, "alphas"), 0), "alpha"), 0, 0);
  expect_near(num(cJSON_GetArrayItem(cJSON_GetObjectItem(c1, "alphas"), 1), "alpha"), 4, 0);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(c2, "variant")), "pas_only");
  assert_int_equal((int)num(c2, "none"), 1);
  expect_near(num(j, "pas.fit_seconds_per_subject"), 0.5, TOL);
  expect_near(num(j, "pas.grid_tokens_per_subject"), 1000, TOL);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(
                          cJSON_GetObjectItem(cJSON_GetObjectItem(j, "manifest"), "settings"), "mode")),
                      "logits");
  cJSON_Delete(j);
  assert_string_equal(err, "");
}

static void test_summary_text(void **s) {
  (void)s;
  assert_int_equal(palign("query %s summary", store_path("good")), 0);
  expect_out("settings  model abababababababab  methods icl,pas,const3  seed 7  mode logits");
  expect_out("runs      1 (ranks 3); the last: git abc1234");
  expect_out("subjects  3 stored, 1 failed, of 5");
  expect_out("3 subjects, logits mode");
  expect_out("MAE per trait on the 1..5 scale"); /* the table pa_metrics_print_table prints */
  expect_out("Keyed trait score (reverse-keyed answers as 6 - answer"); /* and pa_metrics_print_keyed's */
  /* icl: n 3, O C E A N = 1.500 1.000 1.000 1.000 1.000, sum 5.00 */
  expect_out("icl                 3  1.500  1.000  1.000  1.000  1.000   5.00");
  expect_out("pas (holdout)       2  0.750  0.750  0.750  0.750  0.750   3.75");
  expect_out("pas (reference)        2: 2");
  expect_out("pas (holdout)          0: 1 4: 1");
  expect_out("pas_only (reference)   0: 1 none: 1");
  expect_out("Time per subject: 12.00 s");
  expect_out("Failed subjects: 1");
  expect_out("s3: out of memory on the GPU");
  expect_out("Failed methods: 1");
  expect_out("s4 pas: probe diverged");
}

static void test_export(void **s) {
  (void)s;
  const char *good = store_path("good");
  assert_int_equal(palign("query %s export --format csv", good), 0);
  const char *expect = "subject_id,method,row,mae_A,mae_C,mae_E,mae_N,mae_O,mae_sum,n_scored,n_unknown,alpha,seconds\n"
                       "s1,icl,icl,0.5,1,1.5,0,2,5,10,0,,1\n"
                       "s1,pas,pas (reference),1,1,1,1,1,5,10,0,2,3\n"
                       "s1,pas,pas (holdout),0.5,0.5,0.5,0.5,0.5,2.5,10,0,4,3\n"
                       "s1,const3,const3,1,1,1,1,1,5,10,0,,0\n"
                       "s2,icl,icl,1.5,1,0.5,1,1,5,10,0,,2\n"
                       "s2,pas,pas (reference),2,2,2,2,2,10,10,0,2,5\n"
                       "s2,pas,pas (holdout),1,1,1,1,1,5,10,0,0,5\n"
                       "s2,const3,const3,2,2,2,2,2,10,10,0,,0\n"
                       "s4,icl,icl,1,1,1,2,,,8,2,,3\n"
                       "s4,const3,const3,3,3,3,3,3,15,10,0,,0\n";
  assert_string_equal(out, expect);
  /* --out: the same, into a file; the format defaults to csv */
  char path[300];
  tu_path(path, sizeof path, "export.csv");
  assert_int_equal(palign("query %s export --out %s", good, path), 0);
  assert_string_equal(out, "");
  expect_err("10 rows written to");
  char *text = tu_slurp(path, NULL);
  assert_string_equal(text, expect);
  free(text);
  /* through a link, the file it names is replaced, the link and the
   * file's permissions kept; a device (what /dev/stdout names) is refused,
   * not replaced by a file */
  char link[300];
  tu_path(link, sizeof link, "export-link.csv");
  assert_int_equal(chmod(path, 0640), 0);
  assert_int_equal(symlink(path, link), 0);
  assert_int_equal(palign("query %s export --format json --out %s", good, link), 0);
  struct stat st;
  assert_int_equal(lstat(link, &st), 0);
  assert_true(S_ISLNK(st.st_mode));
  assert_int_equal(stat(path, &st), 0);
  assert_int_equal(st.st_mode & 0777, 0640);
  text = tu_slurp(path, NULL);
  assert_int_equal(text[0], '[');
  free(text);
  char dev[300];
  tu_path(dev, sizeof dev, "to-null");
  assert_int_equal(symlink("/dev/null", dev), 0);
  assert_int_equal(palign("query %s export --out %s", good, dev), 1);
  expect_err("to-null: not a regular file");
  assert_int_equal(lstat(dev, &st), 0);
  assert_true(S_ISLNK(st.st_mode));
  /* a path inside the store, directly, new, or through a link, is refused:
   * the export would replace the manifest or a shard */
  char inside[300], into[300];
  size_t mlen, mlen_after;
  snprintf(inside, sizeof inside, "%s/manifest.pb", good);
  char *manifest = tu_slurp(inside, &mlen);
  assert_int_equal(palign("query %s export --out %s", good, inside), 1);
  expect_err("is inside the store");
  snprintf(inside, sizeof inside, "%s/shards/new.csv", good);
  assert_int_equal(palign("query %s export --out %s", good, inside), 1);
  assert_int_equal(access(inside, F_OK), -1);
  snprintf(inside, sizeof inside, "%s/shards/run1-rank1.pal", good);
  tu_path(into, sizeof into, "into-store.csv");
  assert_int_equal(symlink(inside, into), 0);
  assert_int_equal(palign("query %s export --out %s", good, into), 1);
  snprintf(inside, sizeof inside, "%s/manifest.pb", good);
  char *after = tu_slurp(inside, &mlen_after);
  assert_true(mlen == mlen_after && !memcmp(manifest, after, mlen));
  free(manifest), free(after);
  assert_int_equal(palign("query %s verify", good), 0);

  assert_int_equal(palign("query %s export --format json", good), 0);
  cJSON *j = cJSON_Parse(out);
  if (!j)
    fail_msg("not JSON:\n%s", out);
  assert_int_equal(cJSON_GetArraySize(j), 10);
  const cJSON *hold = cJSON_GetArrayItem(j, 2), *s4 = cJSON_GetArrayItem(j, 8);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(hold, "row")), "pas (holdout)");
  expect_near(num(hold, "alpha"), 4, 0);
  expect_near(num(hold, "mae_sum"), 2.5, 0);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(s4, "subject_id")), "s4");
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(s4, "mae_O")));
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(s4, "mae_sum")));
  assert_true(cJSON_IsNull(cJSON_GetObjectItem(s4, "alpha")));
  assert_int_equal((int)num(s4, "n_unknown"), 2);
  cJSON_Delete(j);

  /* records: every valid record whole, the failed s3 too, one JSON object a
   * line, the same object `subject --json` prints */
  assert_int_equal(palign("query %s export --format records --out %s", good, path), 0);
  expect_err("4 rows written to");
  text = tu_slurp(path, NULL);
  static const char *const ids[4] = {"s1", "s2", "s3", "s4"};
  int n = 0;
  for (char *save = NULL, *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save), n++) {
    assert_true(n < 4);
    cJSON *r = cJSON_Parse(line);
    if (!r)
      fail_msg("line %d is not JSON: %.200s", n + 1, line);
    assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(r, "subject_id")), ids[n]);
    char *printed = cJSON_PrintUnformatted(r);
    assert_int_equal(palign("query %s subject %s --json", good, ids[n]), 0);
    cJSON *sj = cJSON_Parse(out);
    assert_non_null(sj);
    char *want = cJSON_PrintUnformatted(sj);
    assert_string_equal(printed, want);
    cJSON_free(printed), cJSON_free(want);
    cJSON_Delete(sj), cJSON_Delete(r);
  }
  assert_int_equal(n, 4);
  free(text);
}

static void test_subject(void **s) {
  (void)s;
  const char *good = store_path("good");
  assert_int_equal(palign("query %s subject s1", good), 0);
  expect_out("subject   s1 (index 0)");
  expect_out("done by   rank 1 on node1, 10.00 s, finished 2023-11-14 22:13:20 UTC");
  expect_out("method    icl: 1.00 s, 100 tokens");
  /* O C E A N, sum */
  expect_out("icl                       2.000  1.000  1.500  0.500  0.000   5.000      10       0");
  expect_out("pas (holdout)");
  expect_out("PAS       fitted");
  expect_out("pas (holdout)          alpha 4 (grid index 2)");
  expect_out("pas_only (holdout)     nothing chosen");
  expect_out("    3     1   0.875   0.750       0.5");

  assert_int_equal(palign("query %s subject s4", good), 0);
  expect_out("method    pas FAILED: probe diverged");
  assert_int_equal(palign("query %s subject s3", good), 0);
  expect_out("FAILED    out of memory on the GPU");

  assert_int_equal(palign("query %s subject s1 --json", good), 0);
  cJSON *j = cJSON_Parse(out);
  if (!j)
    fail_msg("not JSON:\n%s", out);
  assert_string_equal(cJSON_GetStringValue(cJSON_GetObjectItem(j, "subject_id")), "s1");
  const cJSON *pred = cJSON_GetObjectItem(
      cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "methods"), 0), "rows"), 0),
      "predictions");
  assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(pred, "items")), 3);
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetArrayItem(cJSON_GetObjectItem(pred, "truth"), 0)), 5);
  assert_int_equal((int)cJSON_GetNumberValue(cJSON_GetArrayItem(cJSON_GetObjectItem(pred, "answer"), 2)), 2);
  const cJSON *head = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "pas"), "heads"), 0);
  expect_near(cJSON_GetNumberValue(cJSON_GetArrayItem(cJSON_GetObjectItem(head, "direction"), 1)), 0.8, 0);
  assert_int_equal((int)num(j, "pas.heads_per_layer"), 2);
  cJSON_Delete(j);

  assert_int_equal(palign("query %s subject nobody", good), 1);
  expect_err("nobody");
  expect_err(good);
}

static void test_verify_clean(void **s) {
  (void)s;
  assert_int_equal(palign("query %s verify", store_path("good")), 0);
  expect_out("4 records ok (3 subjects done, 1 failed) of 5 subjects, 2 shard files, 0 problems");
}

/* Copies the good store to `name` with the shell. */
static const char *copy_store(const char *name) {
  const char *dst = store_path(name);
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s'", dst, store_path("good"), dst);
  assert_int_equal(system(cmd), 0);
  return dst;
}

static void test_flipped_byte(void **s) {
  (void)s;
  const char *st = copy_store("flipped");
  char path[400], expect[200];
  snprintf(path, sizeof path, "%s/shards/run1-rank1.pal", st);
  size_t n;
  char *d = tu_slurp(path, &n);
  const size_t off = record_size(0); /* s2's record */
  assert_int_equal(n, off + record_size(1));
  d[off + PA_STORE_RECORD_HEAD + 3] ^= 0x40;
  tu_write(path, d, n);
  free(d);

  assert_int_equal(palign("query %s verify", st), 1);
  snprintf(expect, sizeof expect, "run1-rank1.pal offset %zu: checksum", off);
  expect_out(expect);
  expect_out("1 problem");
  /* the summary skips it with a warning and keeps the others */
  assert_int_equal(palign("query %s summary --json", st), 0);
  snprintf(expect, sizeof expect, "skipping damaged record: run1-rank1.pal offset %zu: checksum", off);
  expect_err(expect);
  expect_err("1 damaged record skipped");
  cJSON *j = cJSON_Parse(out);
  assert_non_null(j);
  assert_int_equal((int)num(row_named(j, "icl"), "subjects"), 2);
  expect_near(num(row_named(j, "icl"), "mae.A"), (0.5 + 1) / 2, TOL);
  assert_int_equal((int)num(j, "records.checksum"), 1);
  assert_int_equal((int)num(j, "records.skipped"), 1);
  cJSON_Delete(j);
  assert_int_equal(palign("query %s summary", st), 0);
  expect_out("2 stored, 1 failed");
  expect_out("1 damaged skipped");
  /* the subject whose record is damaged is not found, and says why */
  assert_int_equal(palign("query %s subject s2", st), 1);
  snprintf(expect, sizeof expect,
           "subject s2 is not in store %s, or its record is damaged: 1 damaged record skipped, which cannot say "
           "whose it is (the first: run1-rank1.pal offset %zu: checksum",
           st, off);
  expect_err(expect);
  assert_int_equal(palign("query %s export", st), 0);
  assert_null(strstr(out, "s2,"));
  assert_non_null(strstr(out, "s4,icl"));
  expect_err("run1-rank1.pal offset");
}

static void test_torn_end(void **s) {
  (void)s;
  const char *st = copy_store("torn");
  char path[400], expect[200];
  snprintf(path, sizeof path, "%s/shards/run1-rank2.pal", st);
  size_t n;
  char *d = tu_slurp(path, &n);
  const size_t off = record_size(2); /* s4's record, the last */
  assert_int_equal(n, off + record_size(3));
  tu_write(path, d, n - 7);
  free(d);

  assert_int_equal(palign("query %s verify", st), 1);
  snprintf(expect, sizeof expect, "run1-rank2.pal offset %zu: torn", off);
  expect_out(expect);
  assert_int_equal(palign("query %s summary --json", st), 0);
  expect_err(expect);
  cJSON *j = cJSON_Parse(out);
  assert_non_null(j);
  assert_int_equal((int)num(row_named(j, "icl"), "subjects"), 2);
  assert_int_equal((int)num(j, "subjects.stored"), 2);
  assert_int_equal((int)num(j, "subjects.failed"), 1);
  assert_int_equal((int)num(j, "records.torn"), 1);
  cJSON_Delete(j);
}

/* Shards the manifest does not list, listed ones missing, a record of another run. */
static void test_verify_manifest(void **s) {
  (void)s;
  const char *st = store_path("mixed");
  char n1[64];
  const char *listed[] = {pa_shard_name(1, 1, n1), "shards/run9-rank1.pal"};
  make_store(st, listed, 2);
  /* a record made with another seed and model */
  Palign__SubjectResult *r = subject("s5", 4, 1);
  r->run_seed = 8;
  r->model_fingerprint = "ffff";
  pa_shard_writer *w;
  assert_int_equal(pa_shard_open(st, 2, 1, &w), 0);
  assert_int_equal(pa_shard_append(w, r), 0);
  /* and a second record of s1: a duplicate */
  assert_int_equal(pa_shard_append(w, records[0]), 0);
  assert_int_equal(pa_shard_close(w), 0);
  /* and an empty one, as a run stopped between its shards and its manifest leaves */
  char empty[400];
  snprintf(empty, sizeof empty, "%s/shards/%s", st, pa_shard_name(3, 1, n1));
  tu_write_text(empty, "");

  assert_int_equal(palign("query %s verify", st), 1);
  expect_out("run1-rank2.pal: a shard file the manifest does not list\n");
  expect_out("run2-rank1.pal: a shard file the manifest does not list\n");
  expect_out("run3-rank1.pal: a shard file the manifest does not list (empty: left by a run stopped before it "
             "started, or a run's that is starting now; safe to delete while no run holds the store)");
  expect_out("run9-rank1.pal: listed in the manifest but missing");
  expect_out("run2-rank1.pal offset 0: subject s5 has model fingerprint 'ffff'");
  expect_out("subject s5 has run seed 8, the manifest's settings 7");
  char expect[200];
  snprintf(expect, sizeof expect, "run2-rank1.pal offset %zu: duplicate (subject s1)",
           PA_STORE_RECORD_HEAD + palign__subject_result__get_packed_size(r));
  expect_out(expect);
  expect_out("7 problems");

  /* a manifest that is not one */
  const char *bad = copy_store("badmanifest");
  char path[400];
  snprintf(path, sizeof path, "%s/manifest.pb", bad);
  tu_write_text(path, "\xff\xff\xff garbage");
  assert_int_equal(palign("query %s verify", bad), 1);
  expect_out("manifest.pb");
  assert_int_equal(palign("query %s summary", bad), 0);
  expect_err("manifest.pb");
  expect_out("manifest  none");
}

/* The index: written on demand; `subject` through it says what it says
 * without it; stale once the shards change (a byte flipped in place, its
 * time put back: the record check catches it; a new shard; a garbage
 * index), and then lookups read the shards. */
static void test_index(void **s) {
  (void)s;
  const char *st = copy_store("indexed");
  static char want[sizeof out];
  char path[400], ipath[400];
  assert_int_equal(palign("query %s subject s2 --json", st), 0);
  memcpy(want, out, sizeof out);
  assert_int_equal(palign("query %s index", st), 0);
  expect_out("index.pb: 4 subjects");
  assert_int_equal(palign("query %s verify", st), 0);
  expect_out("index: current, 4 subjects");
  assert_int_equal(palign("query %s subject s2 --json", st), 0);
  assert_string_equal(out, want);
  assert_int_equal(palign("query %s subject nobody", st), 1);
  expect_err("subject nobody is not in store");

  /* s2's record damaged in place, the shard's time put back: the index
   * still looks current, the record check refuses it, the scan finds none */
  snprintf(path, sizeof path, "%s/shards/run1-rank1.pal", st);
  struct stat sb;
  assert_int_equal(stat(path, &sb), 0);
  size_t n;
  char *d = tu_slurp(path, &n);
  d[record_size(0) + PA_STORE_RECORD_HEAD + 3] ^= 0x40;
  tu_write(path, d, n);
  free(d);
  assert_int_equal(utimensat(AT_FDCWD, path, (struct timespec[]){sb.st_atim, sb.st_mtim}, 0), 0);
  assert_int_equal(palign("query %s verify", st), 1);
  expect_out("index: current");
  assert_int_equal(palign("query %s subject s2", st), 1);
  expect_err("subject s2 is not in store"); /* what the scan says, as without an index */
  assert_int_equal(palign("query %s subject s1 --json", st), 0); /* the others still through it */

  /* a shard more: stale, and lookups read the shards */
  assert_int_equal(palign("query %s index", st), 0);
  snprintf(path, sizeof path, "%s/shards/run2-rank1.pal", st);
  tu_write(path, "", 0);
  assert_int_equal(palign("query %s verify", st), 1);
  expect_out("index: stale");
  assert_int_equal(palign("query %s subject s1 --json", st), 0);
  /* a garbage index is not used either, and verify says what it is */
  snprintf(ipath, sizeof ipath, "%s/index.pb", st);
  tu_write_text(ipath, "not an index at all");
  assert_int_equal(palign("query %s verify", st), 1);
  expect_out("index: unreadable (damaged");
  assert_int_equal(palign("query %s subject s1 --json", st), 0);
  tu_expect_in(out, "\"subject_id\":", "subject --json");
  /* rebuilt: current again */
  assert_int_equal(palign("query %s index", st), 0);
  expect_out("index.pb: 3 subjects"); /* s2's record is damaged */

  /* a store without a readable record has an index too (an empty one) */
  const char *empty = store_path("index-empty");
  const char *none[] = {"run1-rank9.pal"};
  make_store(empty, none, 1);
  for (int rank = 1; rank <= 2; rank++) { /* the records make_store writes */
    snprintf(path, sizeof path, "%s/shards/run1-rank%d.pal", empty, rank);
    assert_int_equal(unlink(path), 0);
  }
  snprintf(path, sizeof path, "%s/shards/run1-rank9.pal", empty);
  tu_write(path, "", 0);
  assert_int_equal(palign("query %s index", empty), 0);
  expect_out("index.pb: 0 subjects");
  assert_int_equal(palign("query %s subject s1", empty), 1);
  expect_err("subject s1 is not in store");
}

/* The output is valid UTF-8 throughout (JSON must be). */
static void expect_utf8(const char *text, const char *what) {
  const size_t n = strlen(text);
  for (size_t i = 0, k; i < n; i += k) {
    uint32_t cp;
    if (!(k = pa_utf8_valid((const uint8_t *)text + i, n - i, &cp)))
      fail_msg("%s: byte %zu (0x%02x) is not UTF-8", what, i, (unsigned char)text[i]);
  }
}

/* Records palign does not write but a store may hold (another tool's, an
 * earlier palign's, subjects read before ids had to be UTF-8): a subject id
 * that is not UTF-8, one that begins with '-', a row name longer than the
 * summary keeps, counts whose sum is past an int. */
static void test_odd_records(void **s) {
  (void)s;
  static const char long_row[] = "a row name of seventy bytes, longer than the sixty-three kept: 0123456";
  const char *ids[4] = {"bad\xff\xfeid", "-5", "r3", "r4"};
  Palign__SubjectResult *odd[4], *kept[4];
  for (int k = 0; k < 4; k++) {
    odd[k] = subject(ids[k], k, 1);
    Palign__MethodRow *row = row_all(long_row, 0.5 * (k + 1));
    for (int t = 0; t < 5; t++)
      row->metrics->n_scored[t] = INT32_MAX;
    tu_rec_set_methods(
        odd[k], (Palign__MethodResult *[]){tu_rec_method("icl", (Palign__MethodRow *[]){row}, 1, cost(1, 10), NULL)},
        1);
  }
  memcpy(kept, records, sizeof kept);
  memcpy(records, odd, sizeof odd);
  const char *st = store_path("odd");
  make_store(st, NULL, 0);
  memcpy(records, kept, sizeof kept);

  /* JSON: the bytes that are not UTF-8 as U+FFFD */
  assert_int_equal(palign("query %s export --format json", st), 0);
  expect_utf8(out, "export --format json");
  expect_out("\"subject_id\":\"bad\xEF\xBF\xBD\xEF\xBF\xBDid\"");
  assert_int_equal(palign("query %s export --format records", st), 0);
  expect_utf8(out, "export --format records");
  assert_int_equal(palign("query %s subject r3 --json", st), 0);
  expect_utf8(out, "subject --json");
  /* the long row is one row of the summary, over the four subjects */
  assert_int_equal(palign("query %s summary --json", st), 0);
  expect_utf8(out, "summary --json");
  cJSON *j = cJSON_Parse(out);
  assert_non_null(j);
  int long_rows = 0;
  const cJSON *r;
  cJSON_ArrayForEach(r, cJSON_GetObjectItem(j, "rows")) {
    if (!strncmp(cJSON_GetStringValue(cJSON_GetObjectItem(r, "name")), long_row, 40)) {
      long_rows++;
      assert_int_equal((int)num(r, "subjects"), 4);
    }
  }
  cJSON_Delete(j);
  assert_int_equal(long_rows, 1);
  /* an id that begins with '-' after `--`; the counts summed past an int */
  assert_int_equal(palign("query %s subject -- -5", st), 0);
  expect_out("10737418235"); /* 5 x INT32_MAX scored */
  assert_int_equal(palign("query %s subject -5", st), 2);
  expect_err("unknown flag '-5'");
  assert_int_equal(palign("query %s subject --", st), 2);
  expect_err("subject -- needs an ID after it");
}

static void test_usage_and_errors(void **s) {
  (void)s;
  const char *good = store_path("good");
  assert_int_equal(palign("--help"), 0);
  expect_out("query");
  assert_int_equal(palign("query --help"), 0);
  expect_out("usage: palign query STORE COMMAND");
  assert_int_equal(palign("query"), 2);
  expect_err("usage: palign query");
  assert_int_equal(palign("query %s", good), 2);
  expect_err("COMMAND is required");
  assert_int_equal(palign("query %s frobnicate", good), 2);
  expect_err("unknown command 'frobnicate'");
  assert_int_equal(palign("query %s summary --bogus", good), 2);
  expect_err("unknown flag '--bogus'");
  assert_int_equal(palign("query %s verify --json", good), 2);
  expect_err("'--json'");
  assert_int_equal(palign("query %s export --format xml", good), 2);
  expect_err("--format is csv, json or records, not 'xml'");
  assert_int_equal(palign("query %s export --out", good), 2);
  expect_err("--out needs a value");
  assert_int_equal(palign("query %s subject", good), 2);
  expect_err("subject needs an ID");
  assert_int_equal(palign("query %s subject a b", good), 2);
  expect_err("unexpected argument 'b'");

  char path[300];
  assert_int_equal(palign("query %s summary", tu_path(path, sizeof path, "absent")), 1);
  expect_err("absent: no such store");
  assert_int_equal(palign("query %s verify", path), 1);
  expect_err("absent");
  tu_write_text(tu_path(path, sizeof path, "plain.txt"), "hello");
  assert_int_equal(palign("query %s summary", path), 1);
  expect_err("plain.txt: not a store");
  assert_int_equal(palign("query %s subject s1", tu_tmp), 1);
  expect_err("not a store");
}

/* What was printed must have arrived: each command's stdout on a full
 * device is an error (exit 1, saying so), never a truncated file and exit
 * 0. And a FIFO planted in a store, where a shard, the manifest or the
 * index would be, is refused as "not a regular file", not waited on for
 * ever (`timeout` turns a wait into a failure). */
static void test_full_stdout_and_fifos(void **s) {
  (void)s;
  const char *good = store_path("good");
  static const char *const cmds[] = {"summary", "summary --json", "subject s1 --json", "verify", "export"};
  for (size_t k = 0; k < sizeof cmds / sizeof *cmds; k++) {
    assert_int_equal(palign("query %s %s >/dev/full", good, cmds[k]), 1);
    expect_err("the standard output"); /* with the reason where stdio kept it */
  }
  /* the index is only a shortcut: a lookup with a FIFO there reads the shards */
  static const char *const planted[] = {"shards/run9-rank1.pal", "manifest.pb", "index.pb"};
  static const char *const read_by[] = {"summary", "verify", "subject s1"};
  for (size_t k = 0; k < sizeof planted / sizeof *planted; k++) {
    const char *copy = store_path("with-fifo");
    char cmd[1000], fifo[400];
    snprintf(fifo, sizeof fifo, "%s/%s", copy, planted[k]);
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && cp -r '%s' '%s' && rm -f '%s' && mkfifo '%s'", copy, good, copy, fifo,
             fifo);
    assert_int_equal(system(cmd), 0);
    const int rc = palign("query %s %s", copy, read_by[k]), want = k == 2 ? 0 : 1;
    if (rc != want)
      fail_msg("query %s with a FIFO at %s: exit %d, not %d\n%s", read_by[k], planted[k], rc, want, err);
    if (k == 2) {
      expect_out("subject   s1");
      continue;
    }
    char said[1000]; /* verify lists its problems on stdout, the others say theirs on stderr */
    snprintf(said, sizeof said, "%s: not a regular file", fifo);
    if (!strstr(out, said))
      expect_err(said);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_summary_json),
      cmocka_unit_test(test_summary_text),
      cmocka_unit_test(test_export),
      cmocka_unit_test(test_subject),
      cmocka_unit_test(test_verify_clean),
      cmocka_unit_test(test_flipped_byte),
      cmocka_unit_test(test_torn_end),
      cmocka_unit_test(test_verify_manifest),
      cmocka_unit_test(test_index),
      cmocka_unit_test(test_odd_records),
      cmocka_unit_test(test_usage_and_errors),
      cmocka_unit_test(test_full_stdout_and_fifos),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
