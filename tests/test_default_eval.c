/* palign's answers on the default model against Hugging Face transformers
 * given the same prompts (tests/golden/answers/, made by
 * tests/golden/make_answers_golden.py): subject 0 of Test-set.json, methods
 * none and p2, all 180 test items.
 *
 * Required: at least 98% of the argmax answers equal (the bar; in
 * practice all are), and every option probability within 1e-3 (the forward
 * pass agrees with transformers to 6e-5 in the logits; a softmax over five of
 * them cannot move more than a few times that). Labelled slow: about four
 * minutes on two cores. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval.h"
#include "forward.h"
#include "inventory.h"
#include "methods.h"
#include "model.h"
#include "status.h"
#include "testutil.h"

static pa_model *model;
static pa_lm *lm;
static pa_inventory *inv;
static pa_subjects *subjects;
static pa_evaluator *ev;

static int setup(void **s) {
  (void)s;
  const char *papi = test_papi_dir();
  int rc = pa_papi_load(papi, NULL, &inv, &subjects);
  if (!rc)
    rc = pa_model_open(test_default_model(), &model);
  if (!rc)
    rc = pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 4096}, &lm);
  if (!rc)
    rc = pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model), NULL, &ev);
  if (rc)
    fprintf(stderr, "%s\n", pa_errmsg());
  return rc ? -1 : 0;
}

static int teardown(void **s) {
  (void)s;
  pa_evaluator_destroy(ev);
  pa_lm_destroy(lm);
  pa_model_close(model);
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return 0;
}

static void check_method(const char *method) {
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  pa_pred preds[PA_MAX_ITEMS];
  float probs[PA_MAX_ITEMS * 5];
  const pa_method_ctx ctx = {.inv = inv, .ev = ev};
  pa_method_out out = {.preds = {preds}, .probs = {probs}};
  if (pa_method_find(method)->run(&ctx, pa_subjects_at(subjects, 0), test, n_test, &out))
    fail_msg("%s: %s", method, pa_errmsg());
  assert_int_equal(out.n[0], n_test);

  char path[512];
  snprintf(path, sizeof path, "%s/answers/subject0_%s.tsv", PALIGN_TEST_DATA, method);
  FILE *f = fopen(path, "r");
  if (!f)
    fail_msg("cannot open %s", path);
  char line[512];
  int n = 0, same = 0;
  double worst = 0;
  while (fgets(line, sizeof line, f)) {
    if (line[0] == '#' || line[0] == '\n')
      continue;
    int item, answer, n_tokens;
    double expected, p[5];
    if (sscanf(line, "%d %d %lf %lf %lf %lf %lf %lf %d", &item, &answer, &expected, &p[0], &p[1], &p[2], &p[3], &p[4],
               &n_tokens) != 9)
      fail_msg("%s: bad line '%s'", path, line);
    assert_true(n < n_test);
    assert_int_equal(preds[n].item, item);
    same += preds[n].answer == answer;
    for (int k = 0; k < 5; k++)
      worst = fmax(worst, fabs(probs[n * 5 + k] - p[k]));
    n++;
  }
  fclose(f);
  assert_int_equal(n, n_test);
  printf("%s: %d of %d answers equal (%.1f%%), max |p difference| %.2g\n", method, same, n, 100.0 * same / n, worst);
  assert_true(same * 100 >= 98 * n);
  assert_true(worst <= 1e-3);
}

static void test_none(void **s) { (void)s; check_method("none"); }
static void test_p2(void **s) { (void)s; check_method("p2"); }

int main(void) {
  test_default_model(); /* skip the whole file early when the model is absent */
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_none), cmocka_unit_test(test_p2)};
  return cmocka_run_group_tests(tests, setup, teardown);
}
