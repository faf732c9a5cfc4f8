/* The forward pass's device path, run here: the CPU backend's operations
 * behind a backend that says its memory is not the host's, so the forward
 * pass takes the path it takes on a GPU (the weights placed tensor by
 * tensor into buffers of their own, in fp32 or bf16, the RoPE tables, caches and activations in "device"
 * buffers of their own, tokens and positions uploaded, new keys and values
 * stored by strided copies, steering as added displacements, heads and
 * logits downloaded) with the CPU's arithmetic (tu_fake_device.h). It must
 * give the CPU path's results bit for bit (tu_forward_compare.h), fail
 * a pass whose operations the device reports failed, and fail cleanly
 * wherever the device's memory runs out. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "tu_fake_device.h"
#include "tu_forward_compare.h"

static void test_llama(void **s) {
  (void)s;
  tu_check_forward("llama", tu_fake_device(), PA_WEIGHTS_FP32, 0);
}

static void test_qwen2(void **s) {
  (void)s;
  tu_check_forward("qwen2", tu_fake_device(), PA_WEIGHTS_FP32, 0);
  assert_int_equal(tu_fake_live, 0); /* every buffer of both models released */
}

/* bf16 weight matrices (converted as they are placed, the products and
 * lookups the bf16 ones): the device path and the host path the same bits */
static void test_bf16(void **s) {
  (void)s;
  tu_check_forward("llama", tu_fake_device(), PA_WEIGHTS_BF16, 0);
  tu_check_forward("qwen2", tu_fake_device(), PA_WEIGHTS_BF16, 0);
  assert_int_equal(tu_fake_live, 0);
}

/* Llama-3.1's RoPE scaling (frequency divisors the RoPE tables read, on
 * the host, before the weights go to the device): a Hugging Face directory
 * whose config asks for it. */
static void test_rope_scaled(void **s) {
  (void)s;
  char dir[300], cfg[400];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 29;
  tu_path(dir, sizeof dir, "llama31");
  if (pa_mkmodel_write_hf(&o, dir))
    fail_msg("%s", pa_errmsg());
  snprintf(cfg, sizeof cfg, "%s/config.json", dir);
  char *text = tu_slurp(cfg, NULL), *at = strstr(text, "\"rope_scaling\":"), *end = at;
  if (at)
    for (end = at + strlen("\"rope_scaling\":"); *end == ' ' || *end == '\t';)
      end++;
  if (!at || strncmp(end, "null", 4))
    fail_msg("no \"rope_scaling\": null in %s:\n%s", cfg, text);
  char patched[16384];
  snprintf(patched, sizeof patched,
           "%.*s\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
           "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 32}%s",
           (int)(at - text), text, end + 4);
  tu_write_text(cfg, patched);
  free(text);
  tu_check_forward_model("llama, llama3 rope scaling", dir, tu_fake_device(), PA_WEIGHTS_FP32, 0);
}

/* An operation the device reports failed (backend.h: status) fails the
 * pass, naming the backend and the reason, and the model opening when it
 * happens while the weights are placed; the next pass runs. */
static void test_device_failure(void **s) {
  (void)s;
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 31;
  pa_model *m = NULL;
  pa_lm *lm;
  if (pa_mkmodel_write_gguf(&o, tu_path(path, sizeof path, "fail.gguf")) || pa_model_open(path, &m))
    fail_msg("%s", pa_errmsg());
  const pa_lm_opts lo = {.n_threads = 2, .max_seq = 64, .backend = tu_fake_device()};
  tu_fake_fail = 1;
  assert_int_equal(pa_lm_create(m, &lo, &lm), PA_EIO);
  assert_null(lm);
  assert_non_null(strstr(pa_errmsg(), "placing the weights on the cpu-as-device backend: an operation failed"));
  assert_int_equal(pa_lm_create(m, &lo, &lm), PA_OK);
  pa_kv *kv;
  assert_int_equal(pa_kv_create(lm, 16, &kv), PA_OK);
  const int32_t t[3] = {1, 2, 3};
  float logits[2];
  const int32_t ids[2] = {4, 5};
  pa_seq seq = {.tokens = t, .n_tokens = 3, .kv = kv};
  const pa_batch b = {.seqs = &seq, .n_seqs = 1, .logits = logits, .logit_ids = ids, .n_logit_ids = 2};
  tu_fake_fail = 1;
  assert_int_equal(pa_lm_forward(lm, &b), PA_EIO);
  assert_non_null(strstr(pa_errmsg(), "the forward pass on the cpu-as-device backend"));
  pa_kv_clear(kv);
  assert_int_equal(pa_lm_forward(lm, &b), PA_OK);
  pa_kv_destroy(kv);
  pa_lm_destroy(lm);
  pa_model_close(m);
  assert_int_equal(tu_fake_live, 0);
}

/* One pass of 5 tokens with an adapter, steering, head capture and 3
 * restricted logits; opening the model and a KV cache first where lm is
 * NULL. *stage: how far it got (0 opening, 1 the cache, 2 the pass). */
typedef struct {
  pa_model *m;
  pa_lora *lora;
  float *steer, *heads;
} alloc_case;

static int alloc_pass(const alloc_case *a, pa_lm **lm, pa_kv **kv, float *logits, int *stage) {
  const pa_lm_opts lo = {.n_threads = 2, .max_seq = 64, .backend = tu_fake_device()};
  int rc = PA_OK;
  *stage = 0;
  if (!*lm && (rc = pa_lm_create(a->m, &lo, lm)))
    return rc;
  *stage = 1;
  if (!*kv && (rc = pa_kv_create(*lm, 16, kv)))
    return rc;
  *stage = 2;
  pa_kv_clear(*kv);
  const int32_t t[5] = {1, 2, 3, 4, 5}, ids[3] = {4, 5, 6};
  pa_seq seq = {.tokens = t, .n_tokens = 5, .kv = *kv};
  return pa_lm_forward(*lm, &(pa_batch){.seqs = &seq,
                                        .n_seqs = 1,
                                        .lora = a->lora,
                                        .steer = a->steer,
                                        .heads = a->heads,
                                        .logits = logits,
                                        .logit_ids = ids,
                                        .n_logit_ids = 3});
}

/* Every allocation of the device path refused in turn, the k-th and all
 * after it (tu_fake_allocs_left), over opening the model (the weights, the
 * RoPE tables), a KV cache and a pass with an adapter, steering, head
 * capture and restricted logits: each fails with PA_ENOMEM naming what it
 * was for, the backend and its reason, and once allocations are allowed
 * again the same pass on what is open gives the logits of a run that never
 * failed; every buffer is released (in the sanitizer build: nothing leaks
 * or is freed twice). */
static void test_allocation_failures(void **s) {
  (void)s;
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 37;
  alloc_case a = {0};
  if (pa_mkmodel_write_gguf(&o, tu_path(path, sizeof path, "allocs.gguf")) || pa_model_open(path, &a.m))
    fail_msg("%s", pa_errmsg());
  const pa_model_config *c = pa_model_config_get(a.m);
  const size_t Hs = (size_t)c->n_layers * c->n_heads * c->head_dim;
  assert_int_equal(pa_lora_create(c, 4, 2.0f, &a.lora), PA_OK);
  pa_lora_init(a.lora, 5);
  a.steer = calloc(Hs, sizeof(float)), a.heads = calloc(Hs, sizeof(float));
  assert_true(a.steer && a.heads);
  a.steer[3] = 0.5f;
  float want[3], got[3];
  pa_lm *lm = NULL;
  pa_kv *kv = NULL;
  int stage, refused[3] = {0};
  assert_int_equal(alloc_pass(&a, &lm, &kv, want, &stage), PA_OK);
  pa_kv_destroy(kv), pa_lm_destroy(lm);
  for (long k = 0;; k++) {
    lm = NULL, kv = NULL;
    tu_fake_allocs_left = k;
    const int rc = alloc_pass(&a, &lm, &kv, got, &stage);
    tu_fake_allocs_left = -1;
    if (rc == PA_OK) { /* k allocations are all it takes */
      assert_memory_equal(got, want, sizeof want);
      pa_kv_destroy(kv), pa_lm_destroy(lm);
      printf("  %ld allocations; refused while opening %d times, for the cache %d, in the pass %d\n", k, refused[0],
             refused[1], refused[2]);
      break;
    }
    if (rc != PA_ENOMEM || !strstr(pa_errmsg(), "no memory for ") ||
        !strstr(pa_errmsg(), " on the cpu-as-device backend (an allocation refused (injected by the test))"))
      fail_msg("allocation %ld refused, stage %d: %s (%d)", k, stage, pa_errmsg(), rc);
    refused[stage]++;
    if (stage > 0) { /* what is open goes on */
      assert_int_equal(alloc_pass(&a, &lm, &kv, got, &stage), PA_OK);
      assert_memory_equal(got, want, sizeof want);
    }
    pa_kv_destroy(kv), pa_lm_destroy(lm);
    assert_int_equal(tu_fake_live, 0);
  }
  assert_true(refused[0] > 0 && refused[1] > 0 && refused[2] > 0);
  /* a buffer that must grow refused, after a pass had one: the pass after
   * it grows it again (nothing of the old one is freed twice) */
  lm = NULL, kv = NULL;
  assert_int_equal(alloc_pass(&a, &lm, &kv, got, &stage), PA_OK);
  const int32_t t[2] = {7, 8}, more[5] = {1, 2, 3, 4, 5};
  float five[5];
  pa_kv_clear(kv);
  pa_seq seq = {.tokens = t, .n_tokens = 2, .kv = kv};
  const pa_batch grown = {.seqs = &seq, .n_seqs = 1, .logits = five, .logit_ids = more, .n_logit_ids = 5};
  tu_fake_allocs_left = 0;
  assert_int_equal(pa_lm_forward(lm, &grown), PA_ENOMEM);
  tu_fake_allocs_left = -1;
  pa_kv_clear(kv);
  assert_int_equal(pa_lm_forward(lm, &grown), PA_OK);
  assert_int_equal(alloc_pass(&a, &lm, &kv, got, &stage), PA_OK);
  assert_memory_equal(got, want, sizeof want);
  pa_kv_destroy(kv), pa_lm_destroy(lm);
  free(a.steer), free(a.heads);
  pa_lora_destroy(a.lora);
  pa_model_close(a.m);
  assert_int_equal(tu_fake_live, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama),          cmocka_unit_test(test_qwen2),
                                     cmocka_unit_test(test_bf16),           cmocka_unit_test(test_rope_scaled),
                                     cmocka_unit_test(test_device_failure), cmocka_unit_test(test_allocation_failures)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
