/* tu_forward_compare.h: the forward pass of a tiny llama or qwen2 model
 * (palign mkmodel) on the CPU and on another backend, compared: a shared
 * prefix, a sequence continuing from 5 cached tokens and a new one of 9 in
 * one batch, steering on some heads and head capture, then 12 steps of
 * greedy generation, and a pass with a LoRA adapter (whole and restricted
 * to a few tokens' logits); a cache of the other backend must be refused.
 * Used by test_forward_device.c (a CPU backend posing as a device: the same bits)
 * and test_cuda_forward.c (the GPU). Include after testutil.h. */
#ifndef PALIGN_TU_FORWARD_COMPARE_H
#define PALIGN_TU_FORWARD_COMPARE_H

#include <math.h>

#include "backend.h"
#include "forward.h"
#include "lora.h"
#include "mkmodel.h"
#include "model.h"
#include "status.h"

static inline void expect_close(const char *what, const float *got, const float *want, size_t n, double tol) {
  double mx = 0, worst = 0;
  for (size_t i = 0; i < n; i++)
    mx = fabs(want[i]) > mx ? fabs(want[i]) : mx;
  for (size_t i = 0; i < n; i++) {
    const double d = fabs((double)got[i] - want[i]);
    if (!(d <= tol * mx))
      fail_msg("%s[%zu]: %.9g on the other backend, %.9g on the CPU (largest %.3g)", what, i, got[i], want[i], mx);
    worst = d > worst ? d : worst;
  }
  fprintf(stderr, "    %-28s largest difference %.3g of %.3g\n", what, worst, mx);
}

/* The model at path (named arch in messages) on the CPU and on backend
 * `other`, both with weights in format wf: the same batches, answers within
 * tol of the largest magnitude (0: the same bits). */
static inline void tu_check_forward_model(const char *arch, const char *path, const pa_backend *other,
                                          pa_weight_format wf, double tol) {
  pa_model *m;
  if (pa_model_open(path, &m))
    fail_msg("%s", pa_errmsg());
  pa_lm *lm[2];
  const pa_backend *be[2] = {pa_backend_cpu(), other};
  for (int k = 0; k < 2; k++)
    if (pa_lm_create(m, &(pa_lm_opts){.n_threads = 2, .max_seq = 256, .backend = be[k], .weights = wf}, &lm[k]))
      fail_msg("%s backend: %s", be[k]->name, pa_errmsg());
  assert_string_equal(pa_lm_weights(lm[0]), pa_lm_weights(lm[1]));
  const pa_model_config *c = pa_lm_config(lm[0]);
  const size_t V = (size_t)c->vocab_size, Hs = (size_t)c->n_layers * c->n_heads * c->head_dim;
  float *logits[2], *heads[2], *steer = calloc(Hs, sizeof *steer);
  assert_non_null(steer);
  for (size_t i = 0; i < Hs; i += 7) /* a few heads displaced, the rest zero */
    steer[i] = 0.25f * (float)((i / 7) % 5) - 0.5f;
  int32_t prefix_tok[19], a_tok[5], b_tok[9], more[3];
  for (int i = 0; i < 19; i++)
    prefix_tok[i] = (i * 37 + 5) % c->vocab_size;
  for (int i = 0; i < 5; i++)
    a_tok[i] = (i * 11 + 2) % c->vocab_size;
  for (int i = 0; i < 9; i++)
    b_tok[i] = (i * 13 + 7) % c->vocab_size;
  for (int i = 0; i < 3; i++)
    more[i] = (i * 17 + 1) % c->vocab_size;
  for (int k = 0; k < 2; k++) {
    logits[k] = calloc(2 * V, sizeof(float));
    heads[k] = calloc(2 * Hs, sizeof(float));
    pa_kv *pre = NULL, *a = NULL, *b = NULL;
    if (pa_kv_create(lm[k], 32, &pre) || pa_kv_create(lm[k], 64, &a) || pa_kv_create(lm[k], 64, &b))
      fail_msg("%s", pa_errmsg());
    pa_seq ps = {.tokens = prefix_tok, .n_tokens = 19, .kv = pre};
    assert_int_equal(pa_lm_forward(lm[k], &(pa_batch){.seqs = &ps, .n_seqs = 1}), PA_OK);
    /* a has 5 tokens cached first; then both in one batch over the prefix */
    pa_seq first = {.tokens = a_tok, .n_tokens = 5, .kv = a};
    assert_int_equal(pa_lm_forward(lm[k], &(pa_batch){.prefix = pre, .seqs = &first, .n_seqs = 1}), PA_OK);
    pa_seq two[2] = {{.tokens = more, .n_tokens = 3, .kv = a}, {.tokens = b_tok, .n_tokens = 9, .kv = b}};
    pa_batch batch = {.prefix = pre, .seqs = two, .n_seqs = 2, .steer = steer, .logits = logits[k], .heads = heads[k]};
    if (pa_lm_forward(lm[k], &batch))
      fail_msg("%s backend: %s", be[k]->name, pa_errmsg());
    pa_kv_destroy(pre), pa_kv_destroy(a), pa_kv_destroy(b);
  }
  char what[64];
  snprintf(what, sizeof what, "%s logits (%s)", arch, pa_lm_weights(lm[0]));
  expect_close(what, logits[1], logits[0], 2 * V, tol);
  for (int i = 0; i < 2; i++)
    assert_int_equal(pa_argmax(logits[1] + i * V, (int)V), pa_argmax(logits[0] + i * V, (int)V));
  snprintf(what, sizeof what, "%s heads, steered", arch);
  expect_close(what, heads[1], heads[0], 2 * Hs, tol);

  /* greedy generation: the same tokens */
  int32_t *gen[2];
  int n_gen[2];
  for (int k = 0; k < 2; k++) {
    pa_kv *kv;
    assert_int_equal(pa_kv_create(lm[k], 64, &kv), PA_OK);
    assert_int_equal(pa_lm_generate(lm[k], NULL, kv, b_tok, 9, &(pa_gen_opts){.max_tokens = 12}, &gen[k], &n_gen[k]),
                     PA_OK);
    pa_kv_destroy(kv);
  }
  assert_int_equal(n_gen[0], n_gen[1]);
  assert_memory_equal(gen[0], gen[1], (size_t)n_gen[0] * sizeof *gen[0]);

  /* a LoRA adapter (A random, B set too, so that it acts) on both */
  pa_lora *lora;
  assert_int_equal(pa_lora_create(c, 4, 2.0f, &lora), PA_OK);
  pa_lora_init(lora, 5);
  uint64_t rs = 77;
  for (int l = 0; l < c->n_layers; l++)
    for (int t = 0; t < PA_LORA_N_TARGETS; t++)
      for (int i = 0; i < lora->out[t] * lora->rank; i++)
        pa_lora_b(lora, l, (pa_lora_target)t)[i] = 0.1f * tu_frand(&rs);
  float *lora_logits[2];
  for (int k = 0; k < 2; k++) {
    lora_logits[k] = calloc(V, sizeof(float));
    pa_kv *lkv;
    assert_int_equal(pa_kv_create(lm[k], 16, &lkv), PA_OK);
    pa_seq ls = {.tokens = b_tok, .n_tokens = 9, .kv = lkv};
    if (pa_lm_forward(lm[k], &(pa_batch){.seqs = &ls, .n_seqs = 1, .lora = lora, .logits = lora_logits[k]}))
      fail_msg("%s backend, LoRA: %s", be[k]->name, pa_errmsg());
    pa_kv_destroy(lkv);
  }
  snprintf(what, sizeof what, "%s logits with LoRA", arch);
  expect_close(what, lora_logits[1], lora_logits[0], V, tol);
  /* the same pass restricted to four tokens' logits (one twice) */
  const int32_t few[4] = {(int32_t)V - 1, 2, 5, 2};
  float few_logits[2][4];
  for (int k = 0; k < 2; k++) {
    pa_kv *lkv;
    assert_int_equal(pa_kv_create(lm[k], 16, &lkv), PA_OK);
    pa_seq ls = {.tokens = b_tok, .n_tokens = 9, .kv = lkv};
    if (pa_lm_forward(lm[k], &(pa_batch){.seqs = &ls, .n_seqs = 1, .lora = lora, .logits = few_logits[k],
                                         .logit_ids = few, .n_logit_ids = 4}))
      fail_msg("%s backend, restricted logits: %s", be[k]->name, pa_errmsg());
    pa_kv_destroy(lkv);
  }
  snprintf(what, sizeof what, "%s 4 tokens' logits", arch);
  expect_close(what, few_logits[1], few_logits[0], 4, tol);
  assert_true(few_logits[1][1] == few_logits[1][3]);
  free(lora_logits[0]), free(lora_logits[1]);
  /* a cache of the other backend is refused, with a message */
  pa_kv *kv;
  assert_int_equal(pa_kv_create(lm[1], 16, &kv), PA_OK);
  pa_seq one = {.tokens = b_tok, .n_tokens = 3, .kv = kv};
  pa_kv *cpu_kv;
  assert_int_equal(pa_kv_create(lm[0], 16, &cpu_kv), PA_OK);
  one.kv = cpu_kv;
  assert_int_equal(pa_lm_forward(lm[1], &(pa_batch){.seqs = &one, .n_seqs = 1}), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "belongs to another backend"));
  pa_kv_destroy(kv), pa_kv_destroy(cpu_kv);
  pa_lora_destroy(lora);
  for (int k = 0; k < 2; k++) {
    free(logits[k]), free(heads[k]), free(gen[k]);
    pa_lm_destroy(lm[k]);
  }
  free(steer);
  pa_model_close(m);
}

/* The same for a tiny mkmodel GGUF of arch "llama" or "qwen2". */
static inline void tu_check_forward(const char *arch, const pa_backend *other, pa_weight_format wf, double tol) {
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 3, o.seed = 17;
  o.arch = strcmp(arch, "qwen2") ? PA_MK_LLAMA : PA_MK_QWEN2;
  o.force = true; /* written again for each weight format */
  snprintf(path, sizeof path, "%s/%s.gguf", tu_tmp, arch);
  if (pa_mkmodel_write_gguf(&o, path))
    fail_msg("%s", pa_errmsg());
  tu_check_forward_model(arch, path, other, wf, tol);
}

#endif
