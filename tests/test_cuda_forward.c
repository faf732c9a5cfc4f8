/* The forward pass on the CUDA backend against the CPU backend
 * (tu_forward_compare.h): tiny llama and qwen2 models (palign mkmodel), a
 * shared prefix, two sequences (one continuing from its cache), steering and
 * head capture, greedy generation and a pass with a LoRA adapter, with the
 * weights in fp32 and in bf16 on both. Skips (exit 77) without a device.
 *
 * Tolerances, of the largest magnitude of the CPU's, with the same argmax
 * and the same generated tokens:
 * - fp32: 1e-4 (fp32 through a few layers; every operation's own error is
 *   checked tighter in test_cuda_ops.c);
 * - bf16: 2e-3. Both backends round the same operands to bf16 and their
 *   products are exact, but a sum that differs in its last fp32 bit can round
 *   to the neighbouring bf16 value (a relative step of 2^-8) when it becomes
 *   the next product's input; such flips are rare (about one input in 2^15)
 *   and each moves an output by a small share of one term, so the layers
 *   add up to well under 2e-3, against the 1e-2 to 1e-1 that separates bf16
 *   from fp32 weights. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"
#include "tu_cuda.h"
#include "testutil.h"
#include "tu_forward_compare.h"

static void test_llama(void **s) {
  (void)s;
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_BF16, 2e-3);
}

static void test_qwen2(void **s) {
  (void)s;
  tu_check_forward("qwen2", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  tu_check_forward("qwen2", pa_backend_cuda(), PA_WEIGHTS_BF16, 2e-3);
}

/* The waits for the device in one forward pass of a model of n_layers: a
 * pass over a prefix (nothing downloaded: its status only) in *fill, and a
 * pass of two sequences with steering, head capture and logits (two
 * downloads and the status) in *batch; each measured on a second pass, the
 * first having grown the buffers. */
static void count_waits(int n_layers, unsigned long *fill, unsigned long *batch) {
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = n_layers, o.seed = 5, o.force = true;
  snprintf(path, sizeof path, "%s/waits-%d.gguf", tu_tmp, n_layers);
  pa_model *m;
  pa_lm *lm;
  if (pa_mkmodel_write_gguf(&o, path) || pa_model_open(path, &m) ||
      pa_lm_create(m, &(pa_lm_opts){.max_seq = 128, .backend = pa_backend_cuda(), .weights = PA_WEIGHTS_BF16}, &lm))
    fail_msg("%s", pa_errmsg());
  const pa_model_config *c = pa_lm_config(lm);
  const size_t V = (size_t)c->vocab_size, Hs = (size_t)c->n_layers * c->n_heads * c->head_dim;
  float *logits = calloc(2 * V, sizeof *logits), *heads = calloc(2 * Hs, sizeof *heads),
        *steer = calloc(Hs, sizeof *steer);
  assert_true(logits && heads && steer);
  int32_t tok[24];
  for (int i = 0; i < 24; i++)
    tok[i] = (i * 29 + 3) % c->vocab_size;
  for (int pass = 0; pass < 2; pass++) {
    pa_kv *pre, *a, *b;
    if (pa_kv_create(lm, 32, &pre) || pa_kv_create(lm, 32, &a) || pa_kv_create(lm, 32, &b))
      fail_msg("%s", pa_errmsg());
    unsigned long w = pa_cuda_host_waits();
    pa_seq ps = {.tokens = tok, .n_tokens = 20, .kv = pre};
    assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &ps, .n_seqs = 1}), PA_OK);
    *fill = pa_cuda_host_waits() - w;
    pa_seq two[2] = {{.tokens = tok + 1, .n_tokens = 4, .kv = a}, {.tokens = tok + 7, .n_tokens = 17, .kv = b}};
    w = pa_cuda_host_waits();
    pa_batch bt = {.prefix = pre, .seqs = two, .n_seqs = 2, .steer = steer, .logits = logits, .heads = heads};
    if (pa_lm_forward(lm, &bt))
      fail_msg("%s", pa_errmsg());
    *batch = pa_cuda_host_waits() - w;
    pa_kv_destroy(pre), pa_kv_destroy(a), pa_kv_destroy(b);
  }
  free(logits), free(heads), free(steer);
  pa_lm_destroy(lm);
  pa_model_close(m);
}

/* A forward pass waits for the device only for what it downloads and for
 * its status, whatever its depth: its uploads (tokens, positions, steering,
 * each layer's attention tables) are queued, not waited for. */
static void test_waits(void **s) {
  (void)s;
  for (int L = 2; L <= 6; L += 4) {
    unsigned long fill, batch;
    count_waits(L, &fill, &batch);
    fprintf(stderr, "    %d layers: %lu wait(s) filling a prefix, %lu for a batch with heads and logits\n", L, fill,
            batch);
    assert_int_equal(fill, 1);
    assert_int_equal(batch, 3);
  }
}

int main(void) {
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2),
                                     cmocka_unit_test(test_waits)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
