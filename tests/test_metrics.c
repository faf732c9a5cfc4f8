/* The metrics on cases small enough to compute by hand: per-subject MAE with
 * unknown predictions and missing truths, the summaries over subjects with
 * their 95% intervals, keyed scores and Pearson r (and where they are
 * undefined), the two model-free predictors, and the printed table. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "inventory.h"
#include "metrics.h"
#include "status.h"
#include "testutil.h"

/* 30 items, six per trait in the order O C E A N (items 1-6 are O, 7-12 C,
 * ...); odd items are keyed +, even items -. The first three of each trait
 * are train items, the last three test items. */
static pa_inventory *inv;

static const pa_trait trait_of_block[PA_N_TRAITS] = {PA_TRAIT_O, PA_TRAIT_C, PA_TRAIT_E, PA_TRAIT_A, PA_TRAIT_N};

static int item_of(pa_trait t, int k) { /* k-th (0..5) item of trait t */
  for (int b = 0; b < PA_N_TRAITS; b++)
    if (trait_of_block[b] == t)
      return 6 * b + k + 1;
  return -1;
}

static int setup(void **state) {
  if (tu_setup(state))
    return -1;
  char dir[256], csv[4096], split[1024];
  size_t n = 0;
  tu_cat(csv, sizeof csv, &n, "item,trait,keyed,text\n");
  for (int i = 1; i <= 30; i++)
    tu_cat(csv, sizeof csv, &n, "%d,%c,%c,Item %d.\n", i, pa_trait_letter(trait_of_block[(i - 1) / 6]),
           i % 2 ? '+' : '-', i);
  /* in every block of six items, the first three train and the last three test */
  int train[15], test[15], n_train = 0, n_test = 0;
  for (int i = 1; i <= 30; i++) {
    if ((i - 1) % 6 < 3)
      train[n_train++] = i;
    else
      test[n_test++] = i;
  }
  if (tu_split_json(split, sizeof split, train, n_train, test, n_test))
    return -1;
  tu_papi_dir(dir, sizeof dir, "papi", (tu_papi_files){.items = csv, .split = split});
  if (pa_inventory_load(dir, &inv)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  return 0;
}

static int teardown(void **state) {
  pa_inventory_destroy(inv);
  return tu_teardown(state);
}

static void near(double got, double want) {
  if (!(fabs(got - want) <= 1e-12))
    fail_msg("got %.15g, expected %.15g", got, want);
}

static pa_pred pred(int item, int truth, int answer) {
  return (pa_pred){.item = item, .truth = (uint8_t)truth, .answer = (uint8_t)answer, .expected = NAN};
}

static void test_subject(void **state) {
  (void)state;
  const int O1 = item_of(PA_TRAIT_O, 0), O2 = item_of(PA_TRAIT_O, 1), O3 = item_of(PA_TRAIT_O, 2),
            O4 = item_of(PA_TRAIT_O, 3);
  const int C1 = item_of(PA_TRAIT_C, 0), C2 = item_of(PA_TRAIT_C, 1), C3 = item_of(PA_TRAIT_C, 2);
  pa_pred p[] = {
      pred(O1, 3, 5), /* O+: error 2; keyed 5 vs 3 */
      pred(O2, 4, 2), /* O-: error 2; keyed 6-2 = 4 vs 6-4 = 2 */
      pred(O3, 3, 0), /* unknown prediction: counted, not scored */
      pred(O4, 0, 4), /* missing truth: not scored */
      pred(C1, 3, 3), /* C+: error 0 */
      pred(C2, 4, 1), /* C-: error 3; keyed 5 vs 2 */
      pred(C3, 1, 2), /* C+: error 1 */
      pred(C3, 0, 0), /* both missing: a missing truth, not an unknown */
  };
  pa_subject_metrics m;
  pa_metrics_subject(inv, p, (int)(sizeof p / sizeof p[0]), &m);
  near(m.mae[PA_TRAIT_O], 2.0);
  near(m.mae[PA_TRAIT_C], 4.0 / 3);
  assert_true(isnan(m.mae[PA_TRAIT_E]));
  assert_true(isnan(m.mae_sum)); /* E, A and N have nothing scored */
  assert_int_equal(m.n_scored[PA_TRAIT_O], 2);
  assert_int_equal(m.n_scored[PA_TRAIT_C], 3);
  assert_int_equal(m.n_scored[PA_TRAIT_E], 0);
  assert_int_equal(m.n_unknown[PA_TRAIT_O], 1);
  assert_int_equal(m.n_unknown[PA_TRAIT_C], 0);
  assert_int_equal(m.n_missing, 2);
  near(m.keyed_pred[PA_TRAIT_O], 4.5);
  near(m.keyed_true[PA_TRAIT_O], 2.5);
  near(m.keyed_pred[PA_TRAIT_C], (3 + 5 + 2) / 3.0);
  near(m.keyed_true[PA_TRAIT_C], (3 + 2 + 1) / 3.0);
  assert_true(isnan(m.keyed_pred[PA_TRAIT_N]) && isnan(m.keyed_true[PA_TRAIT_N]));

  /* every trait scored: the sum is defined */
  pa_pred q[PA_N_TRAITS];
  for (int t = 0; t < PA_N_TRAITS; t++)
    q[t] = pred(item_of((pa_trait)t, 4), 1 + t, 5); /* errors 4 3 2 1 0 for A C E N O */
  pa_metrics_subject(inv, q, PA_N_TRAITS, &m);
  near(m.mae[PA_TRAIT_A], 4);
  near(m.mae[PA_TRAIT_O], 0);
  near(m.mae_sum, 10);

  pa_metrics_subject(inv, NULL, 0, &m);
  assert_true(isnan(m.mae_sum));
  assert_int_equal(m.n_missing, 0);
}

static pa_subject_metrics with_mae(double o, double c, double e, double a, double n) {
  pa_subject_metrics m;
  memset(&m, 0, sizeof m);
  m.mae[PA_TRAIT_O] = o, m.mae[PA_TRAIT_C] = c, m.mae[PA_TRAIT_E] = e, m.mae[PA_TRAIT_A] = a, m.mae[PA_TRAIT_N] = n;
  m.mae_sum = o + c + e + a + n;
  for (int t = 0; t < PA_N_TRAITS; t++) {
    m.n_scored[t] = isnan(m.mae[t]) ? 0 : 3;
    m.keyed_pred[t] = m.keyed_true[t] = NAN;
  }
  return m;
}

static void test_summarise(void **state) {
  (void)state;
  pa_subject_metrics m[4] = {
      with_mae(1, 0.5, 0, 0, 0), with_mae(2, 0.5, 0, 0, 0), with_mae(4, 0.5, 0, 0, 0),
      with_mae(3, NAN, 1, 0, 0), /* C unscored: left out of C's mean and of the sum */
  };
  m[3].n_unknown[PA_TRAIT_C] = 3;
  pa_method_summary s;
  pa_metrics_summarise(m, 4, &s);
  assert_int_equal(s.n_subjects, 4);
  /* O over 1 2 4 3: mean 2.5, sample variance 5/3 */
  near(s.mae[PA_TRAIT_O], 2.5);
  near(s.mae_ci[PA_TRAIT_O], 1.96 * sqrt(5.0 / 3) / 2);
  /* C over three equal values: no spread */
  near(s.mae[PA_TRAIT_C], 0.5);
  near(s.mae_ci[PA_TRAIT_C], 0);
  near(s.mae[PA_TRAIT_E], 0.25);
  /* sums 1.5 2.5 4.5 over the first three: mean 17/6, deviations -4/3 -1/3 5/3, variance 21/9 */
  near(s.sum, 17.0 / 6);
  near(s.sum_ci, 1.96 * sqrt(21.0 / 9) / sqrt(3));
  assert_int_equal(s.n_scored, 4 * 15 - 3);
  assert_int_equal(s.n_unknown, 3);
  for (int t = 0; t < PA_N_TRAITS; t++) /* no keyed scores were given */
    assert_true(isnan(s.keyed_mae[t]) && isnan(s.keyed_r[t]));

  /* one subject: the mean is its value, the interval 0 */
  pa_metrics_summarise(m, 1, &s);
  near(s.mae[PA_TRAIT_O], 1);
  near(s.mae_ci[PA_TRAIT_O], 0);
  near(s.sum, 1.5);
  near(s.sum_ci, 0);
  /* none: nothing to average */
  pa_metrics_summarise(m, 0, &s);
  assert_int_equal(s.n_subjects, 0);
  assert_true(isnan(s.mae[PA_TRAIT_O]) && isnan(s.sum));
  near(s.sum_ci, 0);
  /* only the subject without C: C and the sum are undefined */
  pa_metrics_summarise(&m[3], 1, &s);
  assert_true(isnan(s.mae[PA_TRAIT_C]));
  assert_true(isnan(s.sum));
}

static void test_keyed_pearson(void **state) {
  (void)state;
  pa_subject_metrics m[3];
  const double x[3] = {1, 2, 3}, y[3] = {2, 4, 7};
  for (int i = 0; i < 3; i++) {
    m[i] = with_mae(1, 1, 1, 1, 1);
    for (int t = 0; t < PA_N_TRAITS; t++)
      m[i].keyed_pred[t] = m[i].keyed_true[t] = NAN;
    m[i].keyed_pred[PA_TRAIT_A] = x[i], m[i].keyed_true[PA_TRAIT_A] = y[i];
    m[i].keyed_pred[PA_TRAIT_C] = x[i], m[i].keyed_true[PA_TRAIT_C] = -y[i];
    m[i].keyed_pred[PA_TRAIT_E] = 3, m[i].keyed_true[PA_TRAIT_E] = y[i]; /* constant prediction */
    m[i].keyed_pred[PA_TRAIT_N] = x[i], m[i].keyed_true[PA_TRAIT_N] = 2 * x[i] + 1;
  }
  m[2].keyed_pred[PA_TRAIT_O] = 2, m[2].keyed_true[PA_TRAIT_O] = 5; /* one subject only */
  pa_method_summary s;
  pa_metrics_summarise(m, 3, &s);
  /* dx = -1 0 1, dy = -7/3 -1/3 8/3: sxy = 5, sxx = 2, syy = 114/9 */
  near(s.keyed_r[PA_TRAIT_A], 15 / sqrt(228));
  near(s.keyed_mae[PA_TRAIT_A], 7.0 / 3);
  near(s.keyed_r[PA_TRAIT_C], -15 / sqrt(228));
  assert_true(isnan(s.keyed_r[PA_TRAIT_E]));
  near(s.keyed_mae[PA_TRAIT_E], (1 + 1 + 4) / 3.0);
  near(s.keyed_r[PA_TRAIT_N], 1);
  assert_true(isnan(s.keyed_r[PA_TRAIT_O]));
  near(s.keyed_mae[PA_TRAIT_O], 3);
}

static pa_subject subject_with(const int *train_answers) {
  /* train_answers: three per trait, in the block order O C E A N */
  pa_subject s;
  memset(&s, 0, sizeof s);
  strcpy(s.id, "x");
  s.usable = true;
  for (int b = 0; b < PA_N_TRAITS; b++)
    for (int k = 0; k < 3; k++)
      s.answers[6 * b + k + 1] = (uint8_t)train_answers[3 * b + k];
  for (int b = 0; b < PA_N_TRAITS; b++)
    for (int k = 3; k < 6; k++)
      s.answers[6 * b + k + 1] = (uint8_t)(k - 1); /* test answers 2 3 4 */
  /* one missing test answer (O) */
  s.answers[6] = 0;
  return s;
}

static void test_predictors(void **state) {
  (void)state;
  const int train[15] = {
      4, 3, 0, /* O: mean 3.5 over the two known -> 4 (half up) */
      2, 3, 0, /* C: 2.5 -> 3 */
      5, 5, 4, /* E: 14/3 = 4.67 -> 5 */
      0, 0, 0, /* A: nothing known -> 3 */
      1, 2, 1, /* N: 4/3 = 1.33 -> 1 */
  };
  pa_subject s = subject_with(train);
  int n;
  const int *test = pa_inventory_test(inv, &n);
  assert_int_equal(n, 15);
  pa_pred p[15];
  pa_predict_const3(&s, test, n, p);
  for (int i = 0; i < n; i++) {
    assert_int_equal(p[i].item, test[i]);
    assert_int_equal(p[i].truth, s.answers[test[i]]);
    assert_int_equal(p[i].answer, 3);
    near(p[i].expected, 3);
  }
  pa_subject_metrics m;
  pa_metrics_subject(inv, p, n, &m);
  near(m.mae[PA_TRAIT_O], 1.0 / 2); /* truths 2 3 (4 missing) */
  near(m.mae[PA_TRAIT_C], 2.0 / 3); /* truths 2 3 4 */
  assert_int_equal(m.n_missing, 1);

  pa_predict_trait_mean(inv, &s, test, n, p);
  const int want[PA_N_TRAITS] = {
      [PA_TRAIT_O] = 4, [PA_TRAIT_C] = 3, [PA_TRAIT_E] = 5, [PA_TRAIT_A] = 3, [PA_TRAIT_N] = 1};
  for (int i = 0; i < n; i++) {
    pa_trait t = pa_inventory_item(inv, test[i])->trait;
    assert_int_equal(p[i].item, test[i]);
    assert_int_equal(p[i].truth, s.answers[test[i]]);
    assert_int_equal(p[i].answer, want[t]);
    near(p[i].expected, want[t]);
  }
  pa_metrics_subject(inv, p, n, &m);
  near(m.mae[PA_TRAIT_O], (2 + 1) / 2.0);
  near(m.mae[PA_TRAIT_C], (1 + 0 + 1) / 3.0);
  near(m.mae[PA_TRAIT_E], (3 + 2 + 1) / 3.0);
  near(m.mae[PA_TRAIT_A], (1 + 0 + 1) / 3.0);
  near(m.mae[PA_TRAIT_N], (1 + 2 + 3) / 3.0);

  /* a predictor asked for train items too sees the same truths */
  const int items[2] = {1, 2};
  pa_predict_trait_mean(inv, &s, items, 2, p);
  assert_int_equal(p[0].truth, 4);
  assert_int_equal(p[1].truth, 3);
  assert_int_equal(p[0].answer, 4);

  /* the test items themselves never feed trait_mean */
  pa_subject s2 = s;
  for (int i = 0; i < n; i++)
    s2.answers[test[i]] = 5;
  pa_predict_trait_mean(inv, &s2, test, n, p);
  for (int i = 0; i < n; i++)
    assert_int_equal(p[i].answer, want[pa_inventory_item(inv, test[i])->trait]);
}

static void test_table(void **state) {
  (void)state;
  pa_method_summary rows[3];
  memset(rows, 0, sizeof rows);
  const double mae[PA_N_TRAITS] = {
      [PA_TRAIT_O] = 0.891, [PA_TRAIT_C] = 0.718, [PA_TRAIT_E] = 0.752, [PA_TRAIT_A] = 0.708, [PA_TRAIT_N] = 0.723};
  const double mae1[PA_N_TRAITS] = {
      [PA_TRAIT_O] = 0.25, [PA_TRAIT_C] = 0.5, [PA_TRAIT_E] = 0.125, [PA_TRAIT_A] = 0.375, [PA_TRAIT_N] = 1};
  for (int t = 0; t < PA_N_TRAITS; t++)
    rows[0].mae[t] = mae[t], rows[1].mae[t] = mae1[t], rows[2].mae[t] = NAN;
  rows[0].n_subjects = 300, rows[0].sum = 3.7922, rows[0].sum_ci = 0.1114, rows[0].n_scored = 53965;
  rows[1].n_subjects = 12, rows[1].sum = 1.8961, rows[1].sum_ci = 0.05, rows[1].n_unknown = 17;
  rows[2].n_subjects = 0, rows[2].sum = NAN;
  const char *names[] = {"const3", "a_much_longer_name", "empty"};
  char buf[4096] = {0};
  FILE *f = fmemopen(buf, sizeof buf - 1, "w");
  assert_non_null(f);
  pa_metrics_print_table(f, names, rows, 3);
  fclose(f);
  printf("%s", buf);

  assert_non_null(strstr(buf, "O C E A N"));
  const char *hdr = strstr(buf, "\nmethod ");
  assert_non_null(hdr);
  hdr++;
  const char *o = strstr(hdr, " O "), *c = strstr(hdr, " C "), *e = strstr(hdr, " E "), *a = strstr(hdr, " A "),
             *n = strstr(hdr, " N ");
  assert_true(o && c && e && a && n && o < c && c < e && e < a && a < n);
  assert_non_null(strstr(hdr, "sum ± 95%"));
  assert_non_null(strstr(hdr, "unknown"));
  const char *r0 = strstr(buf, "\nconst3 "), *r1 = strstr(buf, "\na_much_longer_name "), *r2 = strstr(buf, "\nempty ");
  assert_true(r0 && r1 && r2);
  assert_non_null(strstr(r0, "300  0.891  0.718  0.752  0.708  0.723   3.79 ± 0.11    53965        0\n"));
  assert_non_null(strstr(r1, " 12  0.250  0.500  0.125  0.375  1.000   1.90 ± 0.05        0       17\n"));
  assert_non_null(strstr(r2, "  0      -      -      -      -      -             -        0        0\n"));
  /* aligned: the header and the rows with a sum have the same length, names padded to the longest */
  size_t lh = strcspn(hdr, "\n"), l0 = strcspn(r0 + 1, "\n"), l1 = strcspn(r1 + 1, "\n"), l2 = strcspn(r2 + 1, "\n");
  assert_int_equal(lh, l0);
  assert_int_equal(lh, l1);
  assert_int_equal(lh, l2 + 1); /* no "±" (two bytes, one column) in the empty row */
  assert_int_equal(strncmp(r0 + 1, "const3             ", 19), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_subject),    cmocka_unit_test(test_summarise), cmocka_unit_test(test_keyed_pearson),
      cmocka_unit_test(test_predictors), cmocka_unit_test(test_table),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
