/* The trainer (train.h) on tiny random models, llama and qwen2:
 *  - the whole LoRA gradient (every A and B entry of every layer and target)
 *    against central finite differences of the forward pass;
 *  - the forward pass against the inference forward pass (forward.h) with
 *    the same adapter, and a batch with a shared prefix against the same
 *    sequences written out whole;
 *  - no adapter gives the bits of an adapter with zero B; 1 and 2 threads
 *    give the same bits; bad batches are refused;
 *  - AdamW where the trainer runs gives the bits of the same steps by hand,
 *    and on the device path copies nothing of the adapter's size a step.
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

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cJSON.h>

#include "backend.h"
#include "forward.h"
#include "lora.h"
#include "mkmodel.h"
#include "model.h"
#include "status.h"
#include "testutil.h"
#include "jsonfile.h"
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

/* The fixture's model and a trainer of its plan on the CPU posing as a device. */
static void device_trainer(const fixture *f, pa_lm **lm, pa_trainer **tr) {
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  if (pa_lm_create(f->m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = tu_fake_device()}, lm) ||
      pa_trainer_create(*lm, &plan, tr))
    fail_msg("%s", pa_errmsg());
}

/* A failure the device reports (backend.h: status) fails the pass that saw
 * it, and a failed forward pass leaves nothing for backward. */
static void test_device_failure(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "fail.gguf");
  pa_lm *lm;
  pa_trainer *tr;
  device_trainer(&f, &lm, &tr);
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

/* The poll: asks to stop at call stop_at of it. */
static int stop_at, polls;
static int stop_poll(void *ctx) {
  (void)ctx;
  return ++polls == stop_at;
}

/* A stop asked between layers (pa_train_batch.poll; on this 2-layer model
 * the forward pass polls once, the backward pass once) ends the pass with
 * PA_ECANCELED on the device path; a stopped forward pass leaves nothing
 * for backward, a stopped backward pass nothing for another backward; a
 * device failure among what a stopped pass queued is said rather than
 * left for the next pass; and the trainer then trains as one never stopped
 * (the same logits and gradient, bits); every buffer is released. */
static void test_stopped_passes(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_QWEN2, "stop.gguf");
  pa_lm *lm;
  pa_trainer *tr;
  device_trainer(&f, &lm, &tr);
  float want[6], got[6];
  assert_int_equal(pa_trainer_forward(tr, f.lora, &f.b, want), PA_OK);
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_OK);
  float *grad = malloc(f.grad->n_floats * sizeof *grad);
  assert_non_null(grad);
  memcpy(grad, f.grad->arena, f.grad->n_floats * sizeof *grad);

  pa_train_batch b = f.b;
  b.poll = stop_poll;
  polls = 0, stop_at = 1; /* in the forward pass */
  assert_int_equal(pa_trainer_forward(tr, f.lora, &b, got), PA_ECANCELED);
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_EINVAL);
  polls = 0, stop_at = 2; /* in the backward pass */
  assert_int_equal(pa_trainer_forward(tr, f.lora, &b, got), PA_OK);
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_ECANCELED);
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_EINVAL);
  polls = 0, stop_at = 1, tu_fake_fail = 1; /* the device failed under a stopped pass */
  assert_int_equal(pa_trainer_forward(tr, f.lora, &b, got), PA_EIO);
  assert_non_null(strstr(pa_errmsg(), "the training forward pass on the cpu-as-device backend"));

  assert_int_equal(pa_trainer_forward(tr, f.lora, &f.b, got), PA_OK);
  assert_memory_equal(got, want, sizeof want);
  assert_int_equal(pa_trainer_backward(tr, f.coef, f.grad), PA_OK);
  assert_memory_equal(f.grad->arena, grad, f.grad->n_floats * sizeof *grad);
  free(grad);
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

/* AdamW where the trainer runs, against the same steps by hand
 * (tu_optimise_compare: the same bits), on the CPU and on the device path;
 * there each of the three steps copies up only the batch's ids and
 * positions (26 rows), its wanted tokens and their logits' gradient (6
 * each), and down only the 6 logits: nothing of the adapter's size. */
static void test_optimiser(void **s) {
  (void)s;
  tu_optimise_compare(pa_backend_cpu(), PA_WEIGHTS_FP32, NULL, NULL, NULL);
  size_t moved[2];
  tu_optimise_compare(tu_fake_device(), PA_WEIGHTS_FP32, &tu_fake_uploaded, &tu_fake_downloaded, moved);
  printf("  the device path's three steps: %zu bytes up, %zu down\n", moved[0], moved[1]);
  assert_int_equal(moved[0], 3 * (26 * 2 * sizeof(int32_t) + 6 * sizeof(int32_t) + 6 * sizeof(float)));
  assert_int_equal(moved[1], 3 * 6 * sizeof(float));
  assert_int_equal(tu_fake_live, 0);
}

static float *json_floats(const cJSON *a, int n) {
  assert_int_equal(cJSON_GetArraySize(a), n);
  float *v = malloc((size_t)n * sizeof *v);
  assert_non_null(v);
  for (int i = 0; i < n; i++)
    v[i] = (float)cJSON_GetArrayItem(a, i)->valuedouble; /* float32 values, read back exactly */
  return v;
}

/* The CPU's adamw with pa_adamw_constants against PyTorch's AdamW
 * (tests/golden/adamw/, make_adamw_golden.py): two cases of options, six
 * steps each from the golden's gradients. PyTorch rounds every operation
 * to float32 where palign rounds each element's step once from double, so
 * they differ by a few float32 roundings a step, carried into the next
 * through w, m and v: each value is held to 3 t FLT_EPSILON (t the step;
 * one rounding is at most half that) of its own magnitude, plus, for w, of
 * the rate (a step's size is about lr whatever the gradient's magnitude, so
 * its rounding is about lr's) and, for m, of the gradient (PyTorch's lerp
 * rounds g - m, which is about g where the gradient turns and m is near
 * zero). */
static void test_adamw_against_pytorch(void **s) {
  (void)s;
  cJSON *root;
  assert_int_equal(pa_json_load(PALIGN_TEST_DATA "/adamw/cases.json", &root), PA_OK);
  const int n = cJSON_GetObjectItem(root, "n")->valueint;
  const cJSON *c;
  int cases = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
    const pa_adamw_opts o = {.lr = cJSON_GetObjectItem(c, "lr")->valuedouble,
                             .weight_decay = cJSON_GetObjectItem(c, "weight_decay")->valuedouble,
                             .beta1 = cJSON_GetObjectItem(c, "beta1")->valuedouble,
                             .beta2 = cJSON_GetObjectItem(c, "beta2")->valuedouble,
                             .eps = cJSON_GetObjectItem(c, "eps")->valuedouble};
    const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
    float *w = json_floats(cJSON_GetObjectItem(c, "w0"), n), *m = calloc((size_t)n, sizeof *m),
          *v = calloc((size_t)n, sizeof *v);
    assert_true(m && v);
    double worst[3] = {0};
    const cJSON *st;
    int t = 0;
    cJSON_ArrayForEach(st, cJSON_GetObjectItem(c, "steps")) {
      t++;
      float *g = json_floats(cJSON_GetObjectItem(st, "g"), n);
      const pa_adamw_step k = pa_adamw_constants(&o, t);
      pa_backend_cpu()->adamw((size_t)n, &k, w, g, m, v);
      const float *got[3] = {w, m, v};
      for (int q = 0; q < 3; q++) {
        const char *key = (const char *[]){"w", "m", "v"}[q];
        float *want = json_floats(cJSON_GetObjectItem(st, key), n);
        for (int i = 0; i < n; i++) {
          const double floor = q == 0 ? o.lr : q == 1 ? fabs(g[i]) : 0;
          const double unit = FLT_EPSILON * (fabs(want[i]) + floor), d = fabs((double)got[q][i] - want[i]);
          if (!(d <= 3 * t * unit))
            fail_msg("%s, step %d: %s[%d] %.9g, PyTorch %.9g", name, t, key, i, got[q][i], want[i]);
          worst[q] = d > 0 ? fmax(worst[q], d / unit / t) : worst[q];
        }
        free(want);
      }
      free(g);
    }
    assert_int_equal(t, 6);
    printf("  %s: %d steps of %d values, within %.2g, %.2g and %.2g FLT_EPSILON a step of PyTorch's w, m and v\n", name,
           t, n, worst[0], worst[1], worst[2]);
    free(w), free(m), free(v);
    cases++;
  }
  assert_int_equal(cases, 2);
  cJSON_Delete(root);
}

/* The optimiser's calls out of order, or with what it cannot take, are
 * refused (PA_EINVAL, saying what is wanted) and change nothing; its
 * buffers refused by the device fail pa_trainer_optimise with the device's
 * reason, and it works once they are allowed; on the device path, a
 * gradient asked for while optimising comes down as a plain trainer's, and
 * optimising again starts from the values the steps left. */
static void test_optimiser_refusals(void **s) {
  (void)s;
  fixture f;
  fixture_make(&f, PA_MK_LLAMA, "optrefused.gguf");
  pa_lm *dlm;
  pa_trainer *dt;
  const pa_train_plan plan = {.max_prefix = 21, .max_seqs = 3, .max_seq_len = 21, .max_out = 2, .rank = 4};
  if (pa_lm_create(f.m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = tu_fake_device()}, &dlm) ||
      pa_trainer_create(dlm, &plan, &dt))
    fail_msg("%s", pa_errmsg());
  float logits[6];
  const pa_adamw_opts o = {.lr = 1e-3, .weight_decay = 0.01, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
  /* nothing optimised yet */
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &f.b, logits), PA_OK);
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, NULL), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "a gradient to write, or the adapter being optimised"));
  assert_int_equal(pa_trainer_step(f.tr), PA_EINVAL);
  assert_int_equal(pa_trainer_adapter_sync(f.tr), PA_EINVAL);
  /* options AdamW cannot take */
  const pa_adamw_opts bad[] = {{.lr = NAN, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8},
                               {.lr = -1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8},
                               {.lr = 1, .weight_decay = INFINITY, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8},
                               {.lr = 1, .beta1 = 1, .beta2 = 0.999, .eps = 1e-8},
                               {.lr = 1, .beta1 = 0.9, .beta2 = -0.5, .eps = 1e-8},
                               {.lr = 1, .beta1 = 0.9, .beta2 = 0.999, .eps = 0}};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    assert_int_equal(pa_trainer_optimise(f.tr, f.lora, &bad[i]), PA_EINVAL);
    assert_non_null(strstr(pa_errmsg(), "trainer: AdamW with learning rate"));
  }
  pa_lora *big, *other;
  assert_int_equal(pa_lora_create(pa_lm_config(f.lm), 8, 2.0f, &big), PA_OK);
  assert_int_equal(pa_trainer_optimise(f.tr, big, &o), PA_EINVAL); /* rank above the plan */
  assert_int_equal(pa_trainer_step(f.tr), PA_EINVAL);
  /* optimising: out of order */
  assert_int_equal(pa_lora_create_like(f.lora, &other), PA_OK);
  assert_int_equal(pa_trainer_optimise(f.tr, f.lora, &o), PA_OK);
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, NULL), PA_EINVAL); /* the forward pass before is stale */
  assert_int_equal(pa_trainer_step(f.tr), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "a backward pass with the adapter since the last step"));
  assert_int_equal(pa_trainer_forward(f.tr, other, &f.b, logits), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "it optimises another adapter"));
  assert_int_equal(pa_trainer_forward(f.tr, NULL, &f.b, logits), PA_OK); /* the base model, as always */
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, NULL), PA_EINVAL);
  assert_int_equal(pa_trainer_forward(f.tr, f.lora, &f.b, logits), PA_OK);
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, NULL), PA_OK);
  assert_int_equal(pa_trainer_step(f.tr), PA_OK);
  assert_int_equal(pa_trainer_step(f.tr), PA_EINVAL);                   /* one step per backward pass */
  assert_int_equal(pa_trainer_backward(f.tr, f.coef, NULL), PA_EINVAL); /* the activations are the old values' */
  assert_int_equal(pa_trainer_steps(f.tr), 1);
  /* the device refusing the optimiser's buffers, each in turn */
  int refused = 0;
  for (long k = 0;; k++) {
    tu_fake_allocs_left = k;
    const int rc = pa_trainer_optimise(dt, f.lora, &o);
    tu_fake_allocs_left = -1;
    if (rc == PA_OK)
      break;
    if (rc != PA_ENOMEM || !strstr(pa_errmsg(), "trainer: no memory for the optimiser's ") ||
        !strstr(pa_errmsg(), "(an allocation refused (injected by the test))"))
      fail_msg("allocation %ld refused: %s (%d)", k, pa_errmsg(), rc);
    refused++;
    assert_int_equal(pa_trainer_step(dt), PA_EINVAL); /* nothing optimised */
  }
  assert_int_equal(refused, 4); /* the gradient, two moments, the values */
  /* optimising, a gradient asked for comes down too: the bits of a trainer
   * that is not optimising, on the same values; the step goes on from it */
  pa_trainer *plain;
  pa_lora *g_opt, *g_plain;
  assert_int_equal(pa_trainer_create(dlm, &plan, &plain), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &g_opt), PA_OK);
  assert_int_equal(pa_lora_create_like(f.lora, &g_plain), PA_OK);
  assert_int_equal(pa_trainer_forward(plain, f.lora, &f.b, logits), PA_OK);
  assert_int_equal(pa_trainer_backward(plain, f.coef, g_plain), PA_OK);
  assert_int_equal(pa_trainer_forward(dt, f.lora, &f.b, logits), PA_OK);
  assert_int_equal(pa_trainer_backward(dt, f.coef, g_opt), PA_OK);
  assert_memory_equal(g_opt->arena, g_plain->arena, g_opt->n_floats * sizeof(float));
  assert_int_equal(pa_trainer_optimise(dt, f.lora, &bad[0]), PA_EINVAL); /* refused: the optimising goes on */
  assert_int_equal(pa_trainer_step(dt), PA_OK);
  /* optimising again: the step taken comes down into the arena first (on a
   * device the arena was stale), and the steps count from 0 */
  const size_t bytes = f.lora->n_floats * sizeof(float);
  float *before = malloc(bytes), *after = malloc(bytes);
  assert_true(before && after);
  memcpy(before, f.lora->arena, bytes);
  assert_int_equal(pa_trainer_optimise(dt, f.lora, &o), PA_OK);
  assert_true(memcmp(before, f.lora->arena, bytes) != 0);
  assert_int_equal(pa_trainer_steps(dt), 0);
  memcpy(after, f.lora->arena, bytes);
  assert_int_equal(pa_trainer_adapter_sync(dt), PA_OK);
  assert_memory_equal(after, f.lora->arena, bytes);
  free(before), free(after);
  pa_lora_destroy(g_opt), pa_lora_destroy(g_plain);
  pa_trainer_destroy(plain);
  pa_lora_destroy(big), pa_lora_destroy(other);
  pa_trainer_destroy(dt);
  pa_lm_destroy(dlm);
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
      cmocka_unit_test(test_stopped_passes),
      cmocka_unit_test(test_allocation_failures),
      cmocka_unit_test(test_optimiser),
      cmocka_unit_test(test_adamw_against_pytorch),
      cmocka_unit_test(test_optimiser_refusals),
      cmocka_unit_test(test_bad_batches),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
