/* PAS on the CUDA backend against the CPU backend: a tiny random model and
 * the PAPI data (its 300 items, subject 0).
 *  - the activation bank computed on each: within 1e-4 of the largest value
 *    of the CPU's (the captured heads after a few layers in fp32);
 *  - one PAS fit per backend from the CPU's bank (the probes do not run on
 *    the model, so both fits are the same bits), then the alpha grid
 *    evaluated on each backend: every item's expected score within 1e-4, and
 *    the same answer wherever the CPU's two best options are more than 1e-3
 *    apart (closer than that, fp32 may order them either way).
 *  - the bank again with bf16 weights on both: within 2e-3 of the largest
 *    value (test_cuda_forward.c says why bf16 allows more than fp32);
 * Both fp32 unless said. Skips (exit 77) without a device.
 * `--quick` evaluates a grid of alphas 0 and 4 on the pas_only variant
 * alone (short prompts): the same comparison at a fraction of the cost, for
 * the CUDA emulation (cuda_emu/), which runs a GPU's threads one by one. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bank.h"
#include "cuda_backend.h"
#include "tu_cuda.h"
#include "eval.h"
#include "forward.h"
#include "inventory.h"
#include "mkmodel.h"
#include "model.h"
#include "pas.h"
#include "status.h"
#include "testutil.h"

static pa_model *model;
static pa_inventory *inv;
static pa_subjects *subjects;
static pa_lm *lm[2]; /* cpu, cuda */
static pa_bank *bank[2];
static pa_bank *bank16[2]; /* with bf16 weights */
static int quick;          /* --quick */

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  char p[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 23, o.max_seq = 4096; /* the ICL prompts of PAS's grid are over 2,048 tokens */
  const pa_backend *be[2] = {pa_backend_cpu(), pa_backend_cuda()};
  if (pa_papi_load(test_papi_dir(), NULL, &inv, &subjects) ||
      pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "m.gguf")) || pa_model_open(p, &model)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  for (int k = 0; k < 2; k++) {
    pa_lm *l16 = NULL;
    if (pa_lm_create(model,
                     &(pa_lm_opts){.n_threads = 2, .max_seq = 4096, .backend = be[k], .weights = PA_WEIGHTS_FP32},
                     &lm[k]) ||
        pa_bank_compute(lm[k], pa_model_tokenizer(model), pa_model_chat(model), inv, NULL, &bank[k]) ||
        pa_lm_create(model,
                     &(pa_lm_opts){.n_threads = 2, .max_seq = 4096, .backend = be[k], .weights = PA_WEIGHTS_BF16},
                     &l16) ||
        pa_bank_compute(l16, pa_model_tokenizer(model), pa_model_chat(model), inv, NULL, &bank16[k])) {
      fprintf(stderr, "%s: %s\n", be[k]->name, pa_errmsg());
      pa_lm_destroy(l16);
      return -1;
    }
    pa_lm_destroy(l16);
  }
  return 0;
}

static int teardown(void **s) {
  for (int k = 0; k < 2; k++)
    pa_bank_destroy(bank[k]), pa_bank_destroy(bank16[k]), pa_lm_destroy(lm[k]);
  pa_model_close(model);
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return tu_teardown(s);
}

static void compare_banks(pa_bank *const *bk, double tol) {
  const pa_pas_bank v = pa_bank_view(bk[0]);
  const size_t n = (size_t)2 * v.n_items * v.n_layers * v.n_heads * v.head_dim;
  const float *a = pa_bank_data(bk[0]), *b = pa_bank_data(bk[1]);
  double mx = 0, worst = 0;
  for (size_t i = 0; i < n; i++)
    mx = fabs(a[i]) > mx ? fabs(a[i]) : mx;
  for (size_t i = 0; i < n; i++) {
    const double d = fabs((double)a[i] - b[i]);
    if (!(d <= tol * mx))
      fail_msg("bank[%zu]: %.9g on the GPU, %.9g on the CPU (largest %.3g)", i, b[i], a[i], mx);
    worst = d > worst ? d : worst;
  }
  fprintf(stderr, "    bank of %zu floats: largest difference %.3g of %.3g\n", n, worst, mx);
}

static void test_bank(void **s) {
  (void)s;
  compare_banks(bank, 1e-4);
}

static void test_bank_bf16(void **s) {
  (void)s;
  compare_banks(bank16, 2e-3);
}

static void test_fit_and_grid(void **s) {
  (void)s;
  const pa_subject *subj = pa_subjects_at(subjects, 0);
  const pa_pas_bank v = pa_bank_view(bank[0]);
  pa_pas_result r[2];
  memset(r, 0, sizeof r);
  static const double quick_alphas[] = {0, 4};
  const pa_pas_run_opts opts = {.run_seed = 1,
                                .n_threads = 2,
                                .alphas = quick ? quick_alphas : NULL,
                                .n_alphas = quick ? 2 : 0,
                                .variants = quick ? 1u << PA_PAS_VAR_ONLY : 0};
  for (int k = 0; k < 2; k++) {
    pa_evaluator *ev;
    if (pa_evaluator_create(lm[k], pa_model_tokenizer(model), pa_model_chat(model), NULL, &ev) ||
        pa_pas_run_subject(ev, inv, &v, subj, &opts, &r[k]))
      fail_msg("%s", pa_errmsg());
    pa_evaluator_destroy(ev);
  }
  assert_int_equal(r[0].status, PA_PAS_FITTED);
  assert_int_equal(r[1].status, PA_PAS_FITTED);
  assert_int_equal(r[0].fit.n_selected, r[1].fit.n_selected);
  const size_t per_variant = (size_t)r[0].n_alphas * r[0].n_items, rows = PA_PAS_N_VARIANTS * per_variant;
  int differ = 0, close = 0;
  double worst = 0;
  for (size_t i = quick ? PA_PAS_VAR_ONLY * per_variant : 0; i < rows; i++) {
    const double d = fabs((double)r[0].preds[i].expected - r[1].preds[i].expected);
    if (!(d <= 1e-4))
      fail_msg("grid row %zu: expected score %.7f on the GPU, %.7f on the CPU", i, r[1].preds[i].expected,
               r[0].preds[i].expected);
    worst = d > worst ? d : worst;
    const float *p = r[0].probs + i * 5;
    float best = 0, second = 0;
    for (int o = 0; o < 5; o++) {
      if (p[o] > best)
        second = best, best = p[o];
      else if (p[o] > second)
        second = p[o];
    }
    if (best - second > 1e-3f && r[0].preds[i].answer != r[1].preds[i].answer)
      fail_msg("grid row %zu: answer %d on the GPU, %d on the CPU (margin %.4f)", i, r[1].preds[i].answer,
               r[0].preds[i].answer, best - second);
    differ += r[0].preds[i].answer != r[1].preds[i].answer;
    close += best - second <= 1e-3f;
  }
  fprintf(stderr, "    grid of %zu answers: expected scores within %.3g; %d answers differ, all among %d near ties\n",
          quick ? per_variant : rows, worst, differ, close);
  pa_pas_result_free(&r[0]), pa_pas_result_free(&r[1]);
}

int main(int argc, char **argv) {
  quick = argc > 1 && !strcmp(argv[1], "--quick");
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  char path[4200];
  snprintf(path, sizeof path, "%s/Test-set.json", test_papi_dir());
  if (access(path, R_OK) != 0) {
    fprintf(stderr, "skipping: no PAPI data at %s\n", test_papi_dir());
    return 77;
  }
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_bank), cmocka_unit_test(test_bank_bf16),
                                     cmocka_unit_test(test_fit_and_grid)};
  return cmocka_run_group_tests(tests, setup, teardown);
}
