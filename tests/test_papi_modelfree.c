/* The model-free reference rows on the real PAPI data: all 300 subjects of
 * Test-set.json, all 180 test items. These are the numbers every evaluation
 * prints beside a model's, so they are pinned exactly (1e-9) as well as to the
 * two decimals the table shows.
 *
 * PAS.md quotes const3 = 3.80 and trait_mean = 2.86; the PAPI README quotes
 * 3.80 and 2.87. With PAS.md's metric (missing true answers are not scored)
 * the rows are 3.79 and 2.86. The published 3.80 comes from the reference
 * code's defect of scoring a missing answer (0) as an answer, and its 2.87
 * from that defect plus Python's round-half-to-even; both are reproduced here
 * by hand so the explanation in docs/EVALUATION.md stays checked. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "inventory.h"
#include "metrics.h"
#include "status.h"
#include "testutil.h"

/* Measured with this implementation (gcc, x86-64; every step is exact integer
 * arithmetic up to the final divisions and sums, so 1e-9 leaves room only
 * for summation order). Per trait in the enum order A C E N O. */
#define CONST3_A      0.70765935262994073
#define CONST3_C      0.71838095238095256
#define CONST3_E      0.75234126984127025
#define CONST3_N      0.72318720821661997
#define CONST3_O      0.89063492063492122
#define CONST3_CI_A   0.025349327873177101
#define CONST3_CI_C   0.029732698440517815
#define CONST3_CI_E   0.026304138669863534
#define CONST3_CI_N   0.027778050515040599
#define CONST3_CI_O   0.029227317211882348
#define CONST3_SUM    3.7922037037037049
#define CONST3_SUM_CI 0.11139375909875494
#define TM_A          0.59358527855586674
#define TM_C          0.50137566137566125
#define TM_E          0.58502380952380972
#define TM_N          0.5587745098039214
#define TM_O          0.61716931216931192
#define TM_CI_A       0.020849256614187288
#define TM_CI_C       0.02235395647940655
#define TM_CI_E       0.021268976414143274
#define TM_CI_N       0.020138271037026673
#define TM_CI_O       0.022590708407316955
#define TM_SUM        2.8559285714285707
#define TM_SUM_CI     0.067766840971628287
/* The keyed trait scores, from tests/golden/modelfree_keyed.py (an
 * independent computation from the raw files: Python's csv, json and
 * statistics; it agrees with palign's to 2e-15). */
#define CONST3_KMAE_A 0.13091612200435737
#define CONST3_KMAE_C 0.1572380952380954
#define CONST3_KMAE_E 0.15207142857142875
#define CONST3_KMAE_N 0.13796374105197648
#define CONST3_KMAE_O 0.1630582010582012
#define TM_KMAE_A     0.13590522875816993
#define TM_KMAE_C     0.13213227513227518
#define TM_KMAE_E     0.15226190476190496
#define TM_KMAE_N     0.1486889200124495
#define TM_KMAE_O     0.1911269841269842
#define TM_R_A        0.34772692308430087
#define TM_R_C        0.14996809379435386
#define TM_R_E        0.025884502004641746
#define TM_R_N        -0.06815786867986333
#define TM_R_O        0.37842795258406997

static pa_inventory *inv;
static pa_subjects *subs;
static const int *test_items;
static int n_test;
static pa_method_summary s_const3, s_trait_mean;

/* Like test_default_model(): absent data skips (77) unless the run requires it. */
static const char *papi_dir_or_skip(void) {
  const char *dir = test_papi_dir();
  const char *files[] = {"ipip_neo_300_items.csv", "mpi_300_split.json", "Test-set.json"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, files[i]);
    if (access(p, R_OK) != 0) {
      const char *req = getenv("PALIGN_REQUIRE_MODEL");
      bool required = req && !strcmp(req, "1");
      fprintf(stderr, "%sthe PAPI data %s is missing (set PALIGN_PAPI_DIR)\n", required ? "" : "skipping: ", p);
      exit(required ? 1 : 77);
    }
  }
  return dir;
}

static void summarise(int method, pa_method_summary *out) {
  size_t n = pa_subjects_count(subs);
  pa_subject_metrics *m = calloc(n, sizeof *m);
  pa_pred *preds = calloc((size_t)n_test, sizeof *preds);
  assert_non_null(m);
  assert_non_null(preds);
  for (size_t i = 0; i < n; i++) {
    const pa_subject *s = pa_subjects_at(subs, i);
    if (method == 0)
      pa_predict_const3(s, test_items, n_test, preds);
    else
      pa_predict_trait_mean(inv, s, test_items, n_test, preds);
    pa_metrics_subject(inv, preds, n_test, &m[i]);
  }
  pa_metrics_summarise(m, (int)n, out);
  free(preds);
  free(m);
}

static int setup(void **state) {
  (void)state;
  const char *dir = papi_dir_or_skip();
  char p[4200];
  snprintf(p, sizeof p, "%s/Test-set.json", dir);
  if (pa_inventory_load(dir, &inv) || pa_subjects_load(p, inv, &subs)) {
    fprintf(stderr, "loading the PAPI data: %s\n", pa_errmsg());
    return -1;
  }
  test_items = pa_inventory_test(inv, &n_test);
  summarise(0, &s_const3);
  summarise(1, &s_trait_mean);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  pa_subjects_destroy(subs);
  pa_inventory_destroy(inv);
  return 0;
}

static void test_scope(void **state) {
  (void)state;
  assert_int_equal(pa_subjects_count(subs), 300);
  for (size_t i = 0; i < pa_subjects_count(subs); i++)
    if (!pa_subjects_at(subs, i)->usable)
      fail_msg("%s", pa_subjects_at(subs, i)->reason);
  assert_int_equal(n_test, 180);
  /* 300 x 180 cells, of which 35 test answers are missing and not scored. */
  assert_int_equal(s_const3.n_scored, 300 * 180 - 35);
  assert_int_equal(s_trait_mean.n_scored, 300 * 180 - 35);
  assert_int_equal(s_const3.n_unknown, 0);
  assert_int_equal(s_trait_mean.n_unknown, 0);
  assert_int_equal(s_const3.n_subjects, 300);
}

static void expect_near(double got, double want, const char *what) {
  if (!(fabs(got - want) <= 1e-9))
    fail_msg("%s = %.12f, expected %.12f", what, got, want);
}

static void expect_row(const pa_method_summary *s, const char *name, const double *mae, const double *ci, double sum,
                       double sum_ci) {
  char what[64];
  for (int t = 0; t < PA_N_TRAITS; t++) {
    snprintf(what, sizeof what, "%s MAE %c", name, pa_trait_letter((pa_trait)t));
    expect_near(s->mae[t], mae[t], what);
    snprintf(what, sizeof what, "%s CI %c", name, pa_trait_letter((pa_trait)t));
    expect_near(s->mae_ci[t], ci[t], what);
  }
  snprintf(what, sizeof what, "%s sum", name);
  expect_near(s->sum, sum, what);
  snprintf(what, sizeof what, "%s sum CI", name);
  expect_near(s->sum_ci, sum_ci, what);
  /* every subject has every trait scored, so the sum of means is the mean of sums */
  double total = 0;
  for (int t = 0; t < PA_N_TRAITS; t++)
    total += s->mae[t];
  expect_near(total, s->sum, "sum of the trait means");
}

/* Values measured with this implementation, in the enum order A C E N O. */
static void test_const3(void **state) {
  (void)state;
  const double mae[PA_N_TRAITS] = {CONST3_A, CONST3_C, CONST3_E, CONST3_N, CONST3_O};
  const double ci[PA_N_TRAITS] = {CONST3_CI_A, CONST3_CI_C, CONST3_CI_E, CONST3_CI_N, CONST3_CI_O};
  expect_row(&s_const3, "const3", mae, ci, CONST3_SUM, CONST3_SUM_CI);
  char two[16];
  snprintf(two, sizeof two, "%.2f", s_const3.sum);
  assert_string_equal(two, "3.79");
  const double kmae[PA_N_TRAITS] = {CONST3_KMAE_A, CONST3_KMAE_C, CONST3_KMAE_E, CONST3_KMAE_N, CONST3_KMAE_O};
  for (int t = 0; t < PA_N_TRAITS; t++) {
    assert_true(isnan(s_const3.keyed_r[t])); /* a constant prediction has no correlation */
    expect_near(s_const3.keyed_mae[t], kmae[t], "const3 keyed MAE");
  }
}

static void test_trait_mean(void **state) {
  (void)state;
  const double mae[PA_N_TRAITS] = {TM_A, TM_C, TM_E, TM_N, TM_O};
  const double ci[PA_N_TRAITS] = {TM_CI_A, TM_CI_C, TM_CI_E, TM_CI_N, TM_CI_O};
  expect_row(&s_trait_mean, "trait_mean", mae, ci, TM_SUM, TM_SUM_CI);
  char two[16];
  snprintf(two, sizeof two, "%.2f", s_trait_mean.sum);
  assert_string_equal(two, "2.86");
  const double r[PA_N_TRAITS] = {TM_R_A, TM_R_C, TM_R_E, TM_R_N, TM_R_O};
  const double kmae[PA_N_TRAITS] = {TM_KMAE_A, TM_KMAE_C, TM_KMAE_E, TM_KMAE_N, TM_KMAE_O};
  for (int t = 0; t < PA_N_TRAITS; t++) {
    expect_near(s_trait_mean.keyed_r[t], r[t], "trait_mean keyed r");
    expect_near(s_trait_mean.keyed_mae[t], kmae[t], "trait_mean keyed MAE");
  }
}

static void test_table(void **state) {
  (void)state;
  const char *names[] = {"const3", "trait_mean"};
  pa_method_summary rows[] = {s_const3, s_trait_mean};
  pa_metrics_print_table(stdout, names, rows, 2);
  char buf[2048] = {0};
  FILE *f = fmemopen(buf, sizeof buf - 1, "w");
  assert_non_null(f);
  pa_metrics_print_table(f, names, rows, 2);
  fclose(f);
  const char *c3 = strstr(buf, "\nconst3 "), *tm = strstr(buf, "\ntrait_mean ");
  assert_non_null(c3);
  assert_non_null(tm);
  assert_non_null(strstr(c3, "3.79 ±"));
  assert_non_null(strstr(tm, "2.86 ±"));
  /* the keyed scores' table: O C E A N, |predicted - true| then r */
  pa_metrics_print_keyed(stdout, names, rows, 2);
  f = fmemopen(buf, sizeof buf - 1, "w");
  assert_non_null(f);
  pa_metrics_print_keyed(f, names, rows, 2);
  fclose(f);
  tu_expect_in(buf, "\nconst3       300  0.163  0.157  0.152  0.131  0.138  |     -     -     -     -     -\n",
               "the keyed table");
  tu_expect_in(buf, "\ntrait_mean   300  0.191  0.132  0.152  0.136  0.149  |  0.38  0.15  0.03  0.35 -0.07\n",
               "the keyed table");
}

/* The reference code's convention, recomputed by hand: a missing true answer
 * (0) is scored as if 0 were the answer, and trait_mean's mean is rounded
 * either half up or half to even (Python's round()). */
static double reference_sum(int method, bool half_even) {
  int ntrain;
  const int *train = pa_inventory_train(inv, &ntrain);
  double total = 0;
  size_t n = pa_subjects_count(subs);
  for (size_t i = 0; i < n; i++) {
    const pa_subject *s = pa_subjects_at(subs, i);
    int guess[PA_N_TRAITS];
    for (int t = 0; t < PA_N_TRAITS; t++) {
      int sum = 0, cnt = 0;
      for (int k = 0; k < ntrain; k++)
        if ((int)pa_inventory_item(inv, train[k])->trait == t && s->answers[train[k]])
          sum += s->answers[train[k]], cnt++;
      double mean = cnt ? (double)sum / cnt : 3;
      guess[t] = method == 0 ? 3 : (int)(half_even ? nearbyint(mean) : floor(mean + 0.5));
    }
    double err[PA_N_TRAITS] = {0};
    int cnt[PA_N_TRAITS] = {0};
    for (int k = 0; k < n_test; k++) {
      int t = (int)pa_inventory_item(inv, test_items[k])->trait;
      err[t] += abs(guess[t] - s->answers[test_items[k]]);
      cnt[t]++;
    }
    for (int t = 0; t < PA_N_TRAITS; t++)
      total += err[t] / cnt[t];
  }
  return total / (double)n;
}

static void test_published_numbers(void **state) {
  (void)state;
  char buf[16];
  snprintf(buf, sizeof buf, "%.2f", reference_sum(0, false));
  assert_string_equal(buf, "3.80"); /* PAS.md and the README */
  snprintf(buf, sizeof buf, "%.2f", reference_sum(1, false));
  assert_string_equal(buf, "2.86"); /* PAS.md */
  snprintf(buf, sizeof buf, "%.2f", reference_sum(1, true));
  assert_string_equal(buf, "2.87"); /* the README */
}

int main(void) {
  papi_dir_or_skip();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_scope),
      cmocka_unit_test(test_const3),
      cmocka_unit_test(test_trait_mean),
      cmocka_unit_test(test_table),
      cmocka_unit_test(test_published_numbers),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
