/* The trainer (train.h) on tiny random models, llama and qwen2:
 *  - the whole LoRA gradient (every A and B entry of every layer and target)
 *    against central finite differences of the forward pass;
 *  - the forward pass against the inference forward pass (forward.h) with
 *    the same adapter, and a batch with a shared prefix against the same
 *    sequences written out whole;
 *  - no adapter gives the bits of an adapter with zero B; 1 and 2 threads
 *    give the same bits; bad batches are refused.
 *
 * Finite differences: L = sum c . logits with fixed random coefficients c
 * (any loss of these logits has the gradient the chain rule gives from
 * dL/dlogits, so this checks everything below them), perturbation h = 1e-2
 * on entries of size about 0.1 to 0.5; the forward pass is fp32, so the
 * difference quotient carries about 1e-7 * |L| / 2h of rounding. The bound
 * is 2e-3 relative to the largest gradient of the adapter (the measured
 * error is printed). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "lora.h"
#include "mkmodel.h"
#include "model.h"
#include "status.h"
#include "testutil.h"
#include "tu_fake_device.h"
#include "tu_train_compare.h"
#include "train.h"

#define FD_H   1e-2
#define FD_TOL 2e-3

static double loss(fixture *f) {
  float logits[6];
  if (pa_trainer_forward(f->tr, f->lora, &f->b, logits))
    fail_msg("%s", pa_errmsg());
  double l = 0;
  for (int i = 0; i < 6; i++)
    l += (double)f->coef[i] * logits[i];
  return l;
}

static void check_gradient(pa_mkmodel_arch arch) {
  fixture f;
  fixture_make(&f, arch, "fd.gguf");
  loss(&f);
  for (size_t i = 0; i < f.grad->n_floats; i++) /* what the gradient held is not read */
    f.grad->arena[i] = NAN;
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, f.grad), PA_OK);
  double scale = 0, worst = 0;
  for (size_t i = 0; i < f.grad->n_floats; i++)
    scale = fmax(scale, fabs(f.grad->arena[i]));
  assert_true(scale > 1e-3);
  int nonzero = 0;
  for (size_t i = 0; i < f.lora->n_floats; i++) {
    float *p = &f.lora->arena[i];
    const float keep = *p;
    *p = keep + (float)FD_H;
    const double up = loss(&f);
    *p = keep - (float)FD_H;
    const double down = loss(&f);
    *p = keep;
    const double fd = (up - down) / (2 * FD_H), err = fabs(fd - f.grad->arena[i]) / scale;
    worst = fmax(worst, err);
    nonzero += f.grad->arena[i] != 0;
    if (!(err <= FD_TOL))
      fail_msg("%s: adapter entry %zu: analytic %.7g, finite difference %.7g (relative %.3g)",
               pa_mkmodel_arch_name(arch), i, f.grad->arena[i], fd, err);
  }
  printf("  %s: %zu adapter entries, max relative error %.2g (largest gradient %.3g), %d nonzero\n",
         pa_mkmodel_arch_name(arch), f.lora->n_floats, worst, scale, nonzero);
  assert_true(nonzero > (int)f.lora->n_floats * 9 / 10);
  fixture_free(&f);
}

static void test_gradient_llama(void **s) {
  (void)s;
  check_gradient(PA_MK_LLAMA);
}

static void test_gradient_qwen2(void **s) {
  (void)s;
  check_gradient(PA_MK_QWEN2);
}

/* The trainer's logits are what the inference forward pass gives for each
 * sequence (prefix + own tokens) with the same adapter, and a batch with a
 * shared prefix equals its sequences written out whole, gradients included. */
static void test_matches_forward_and_whole_sequences(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "cmp.gguf");
  float logits[6];
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &f.b, logits), PA_OK);
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, f.grad), PA_OK);
  const int V = pa_lm_config(f.lm)->vocab_size;
  float *full = malloc((size_t)V * sizeof *full);
  int32_t whole[3][21];
  const int32_t *wt[3];
  int wn[3];
  for (int q = 0; q < 3; q++) {
    memcpy(whole[q], f.prefix, sizeof f.prefix);
    memcpy(whole[q] + 12, f.seq[q], (size_t)f.n_tokens[q] * sizeof(int32_t));
    wt[q] = whole[q], wn[q] = 12 + f.n_tokens[q];
    pa_kv *kv;
    assert_int_equal(pa_kv_create(f.lm, wn[q], &kv), PA_OK);
    pa_seq seq = {.tokens = whole[q], .n_tokens = wn[q], .kv = kv};
    assert_int_equal(pa_lm_forward(f.lm, &(pa_batch){.seqs = &seq, .n_seqs = 1, .lora = f.lora, .logits = full}),
                     PA_OK);
    for (int j = 0; j < 2; j++)
      assert_float_equal(logits[q * 2 + j], full[f.out[q * 2 + j]], 1e-5);
    pa_kv_destroy(kv);
  }
  free(full);
  /* no prefix, whole sequences */
  pa_lora *g2;
  assert_int_equal(pa_lora_create_like(f.lora, &g2), PA_OK);
  pa_train_batch b2 = {.tokens = wt, .n_tokens = wn, .n_seqs = 3, .out = f.out, .n_out = 2};
  float logits2[6];
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &b2, logits2), PA_OK);
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, g2), PA_OK);
  for (int i = 0; i < 6; i++)
    assert_float_equal(logits[i], logits2[i], 1e-5);
  double scale = 0, worst = 0;
  for (size_t i = 0; i < g2->n_floats; i++)
    scale = fmax(scale, fabs(g2->arena[i]));
  for (size_t i = 0; i < g2->n_floats; i++)
    worst = fmax(worst, fabs(g2->arena[i] - f.grad->arena[i]));
  printf("  shared prefix against whole sequences: gradients within %.2g (largest %.3g)\n", worst, scale);
  assert_true(worst <= 1e-5 * scale);
  pa_lora_destroy(g2);
  fixture_free(&f);
}

/* Without an adapter, the bits of an adapter whose B is zero (so DPO's
 * reference and its policy at step 0 agree exactly); 1 and 2 threads agree. */
static void test_bits(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "bits.gguf");
  float base[6], zero_b[6];
  assert_int_equal(pa_trainer_forward(f.tr, NULL, &f.b, base), PA_OK);
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, f.grad), PA_EINVAL); /* nothing to train */
  pa_lora_init(f.lora, 9);
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &f.b, zero_b), PA_OK);
  assert_memory_equal(base, zero_b, sizeof base);

  for (int l = 0; l < f.lora->n_layers; l++) /* B nonzero again */
    for (int i = 0; i < f.lora->out[0] * f.lora->rank; i++)
      pa_lora_b(f.lora, l, PA_LORA_Q)[i] = (float)(urand() - 0.5);
  float lg[2][6];
  pa_lora *g[2];
  for (int th = 0; th < 2; th++) {
    pa_backend_set_threads(th + 1);
    assert_int_equal(pa_lora_create_like(f.lora, &g[th]), PA_OK);
    assert_int_equal(pa_trainer_forward(f.tr, f.lora, &f.b, lg[th]), PA_OK);
    assert_int_equal(pa_trainer_backward(f.tr, f.coef, g[th]), PA_OK);
  }
  pa_backend_set_threads(2);
  assert_memory_equal(lg[0], lg[1], sizeof lg[0]);
  assert_memory_equal(g[0]->arena, g[1]->arena, g[0]->n_floats * sizeof(float));
  pa_lora_destroy(g[0]);
  pa_lora_destroy(g[1]);
  fixture_free(&f);
}

/* The trainer's device path (tu_fake_device.h: the CPU's operations behind a
 * backend posing as a device) against the CPU, weights in format wf. The
 * wanted logits and the gradient entering the last rows are products with
 * the gathered output rows there (fp32) and dot products in double on the
 * host, so the logits agree within 1e-6 and the gradients within 1e-5 of the
 * largest; every buffer is released. */
static void device_path(pa_weight_format wf, pa_lora **g_dev, pa_lora **g_cpu) {
  tu_train_compare(tu_fake_device(), wf, 1e-6, 1e-5, g_dev, g_cpu);
  assert_int_equal(tu_fake_live, 0);
}

static void test_device_path(void **s) {
  (void)s;
  pa_lora *g, *g_cpu;
  device_path(PA_WEIGHTS_FP32, &g, &g_cpu);
  pa_lora_destroy(g), pa_lora_destroy(g_cpu);
}

/* With bf16 weights: the device path as above; and the gradient against
 * the fp32 one (the same adapter and batch), within 1e-2 of the largest:
 * bf16 keeps 8 bits of every weight and of every product's other operand,
 * a relative error of 2^-9 each, compounded through the layers and the
 * backward pass; a wrong transpose or a missed conversion is off by the
 * whole gradient. */
static void test_bf16(void **s) {
  (void)s;
  pa_lora *g16, *g16_cpu, *g32, *g32_cpu;
  device_path(PA_WEIGHTS_BF16, &g16, &g16_cpu);
  device_path(PA_WEIGHTS_FP32, &g32, &g32_cpu);
  double mx = 0, worst = 0;
  for (size_t i = 0; i < g32->n_floats; i++)
    mx = fmax(mx, fabs(g32_cpu->arena[i]));
  for (size_t i = 0; i < g32->n_floats; i++)
    worst = fmax(worst, fabs((double)g16_cpu->arena[i] - g32_cpu->arena[i]));
  fprintf(stderr, "    bf16 against fp32 weights: gradients within %.3g of the largest %.3g\n", worst, mx);
  assert_true(worst <= 1e-2 * mx);
  assert_true(worst > 0); /* the bf16 path did run */
  pa_lora_destroy(g16), pa_lora_destroy(g16_cpu), pa_lora_destroy(g32), pa_lora_destroy(g32_cpu);
}

/* A failure the device reports (backend.h: status) fails the pass that saw
 * it, and a failed forward pass leaves nothing for backward. */
static void test_device_failure(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "fail.gguf");
  pa_lm *lm;
  pa_trainer *tr;
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  if (pa_lm_create(f.m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = tu_fake_device()}, &lm) ||
      pa_trainer_create(lm, &plan, &tr))
    fail_msg("%s", pa_errmsg());
  float logits[6];
  tu_fake_fail = 1;
  assert_int_equal(pa_trainer_forward(tr, f.lora, &f.b, logits), PA_EIO);
  assert_non_null(strstr(pa_errmsg(), "the training forward pass on the cpu-as-device backend"));
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_EINVAL);
  assert_int_equal(pa_trainer_forward(tr, f.lora, &f.b, logits), PA_OK);
  tu_fake_fail = 1;
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_EIO);
  assert_non_null(strstr(pa_errmsg(), "the training backward pass"));
  pa_trainer_destroy(tr);
  pa_lm_destroy(lm);
  fixture_free(&f);
  assert_int_equal(tu_fake_live, 0);
}

/* Every allocation of the trainer on the device path refused in turn, the
 * k-th and all after it (tu_fake_allocs_left), the model already open:
 * making the trainer, its forward pass and its backward pass each fail
 * with PA_ENOMEM naming what it was for, the backend and its reason; once
 * allocations are allowed again, what is made trains as one that never
 * failed (the same logits and gradient, bits); every buffer is released. */
static void test_allocation_failures(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "allocs.gguf");
  pa_lm *lm;
  if (pa_lm_create(f.m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = tu_fake_device()}, &lm))
    fail_msg("%s", pa_errmsg());
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  pa_lora *want_grad, *grad;
  assert_int_equal(pa_lora_create_like(f.lora, &want_grad), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &grad), PA_OK);
  float want[6], got[6];
  pa_trainer *tr;
  assert_int_equal(pa_trainer_create(lm, &plan, &tr), PA_OK);
  assert_int_equal(pa_trainer_forward(tr, f.lora, &f.b, want), PA_OK);
  assert_int_equal(pa_trainer_backward(tr, f.coef, want_grad), PA_OK);
  pa_trainer_destroy(tr);
  const size_t live = tu_fake_live; /* the model's */
  int refused[3] = {0};
  for (long k = 0;; k++) {
    tr = NULL;
    tu_fake_allocs_left = k;
    int stage = 0, rc = pa_trainer_create(lm, &plan, &tr);
    if (!rc)
      stage = 1, rc = pa_trainer_forward(tr, f.lora, &f.b, got);
    if (!rc)
      stage = 2, rc = pa_trainer_backward(tr, f.coef, grad);
    tu_fake_allocs_left = -1;
    if (rc == PA_OK) {
      assert_memory_equal(got, want, sizeof want);
      assert_memory_equal(grad->arena, want_grad->arena, grad->n_floats * sizeof(float));
      pa_trainer_destroy(tr);
      printf("  %ld allocations; refused making the trainer %d times, in its forward pass %d, backward %d\n", k,
             refused[0], refused[1], refused[2]);
      break;
    }
    if (rc != PA_ENOMEM || !strstr(pa_errmsg(), "no memory for ") ||
        !strstr(pa_errmsg(), " on the cpu-as-device backend (an allocation refused (injected by the test))"))
      fail_msg("allocation %ld refused, stage %d: %s (%d)", k, stage, pa_errmsg(), rc);
    refused[stage]++;
    if (tr) { /* what is made goes on */
      assert_int_equal(pa_trainer_forward(tr, f.lora, &f.b, got), PA_OK);
      assert_int_equal(pa_trainer_backward(tr, f.coef, grad), PA_OK);
      assert_memory_equal(got, want, sizeof want);
      assert_memory_equal(grad->arena, want_grad->arena, grad->n_floats * sizeof(float));
    }
    pa_trainer_destroy(tr);
    assert_int_equal(tu_fake_live, live);
  }
  assert_true(refused[0] > 0 && refused[1] > 0);
  pa_lora_destroy(want_grad), pa_lora_destroy(grad);
  pa_lm_destroy(lm);
  fixture_free(&f);
  assert_int_equal(tu_fake_live, 0);
}

static void test_bad_batches(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_LLAMA, "bad.gguf");
  float logits[6];
  pa_train_batch b = f.b;
  b.n_seqs = 4;
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &b, logits), PA_EINVAL);
  b = f.b;
  int32_t bad[1] = {1 << 20};
  const int32_t *bt[3] = {bad, f.seq[1], f.seq[2]};
  int bn[3] = {1, 4, 1};
  b.tokens = bt, b.n_tokens = bn;
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &b, logits), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "vocabulary"));
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, f.grad), PA_EINVAL); /* the failed pass left nothing */
  pa_train_plan too_long = {.max_prefix = 200, .max_seqs = 1, .max_seq_len = 100, .max_out = 1, .rank = 4};
  pa_trainer *t = (pa_trainer *)1;
  assert_int_equal(pa_trainer_create(f.lm, &too_long, &t), PA_EINVAL);
  assert_null(t);
  pa_lora *big;
  assert_int_equal(pa_lora_create(pa_lm_config(f.lm), 8, 2.0f, &big), PA_OK);
  assert_int_equal(pa_trainer_forward(f.tr, big, &f.b, logits), PA_EINVAL); /* rank above the plan */
  pa_lora_destroy(big);
  assert_int_equal(pa_lora_create(pa_lm_config(f.lm), 0, 2.0f, &big), PA_EINVAL);
  fixture_free(&f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_gradient_llama),
      cmocka_unit_test(test_gradient_qwen2),
      cmocka_unit_test(test_matches_forward_and_whole_sequences),
      cmocka_unit_test(test_bits),
      cmocka_unit_test(test_device_path),
      cmocka_unit_test(test_bf16),
      cmocka_unit_test(test_device_failure),
      cmocka_unit_test(test_allocation_failures),
      cmocka_unit_test(test_bad_batches),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
