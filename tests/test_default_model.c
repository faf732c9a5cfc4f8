/* The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF): its description,
 * and every tensor dequantised bit-identically to gguf-py (the SHA-256 of each
 * tensor's fp32 values is in golden/default_model_tensors.tsv, made by
 * golden/make_quant_golden.py --model). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "model.h"
#include "testutil.h"
#include "quant.h"
#include "status.h"

static void sha256_hex(const void *p, size_t n, char out[65]) {
  unsigned char md[32];
  unsigned int len = 0;
  assert_int_equal(EVP_Digest(p, n, md, &len, EVP_sha256(), NULL), 1);
  for (int i = 0; i < 32; i++)
    snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void test_every_tensor_dequantises_exactly(void **s) {
  (void)s;
  pa_gguf *g;
  if (pa_gguf_open(test_default_model(), &g))
    fail_msg("%s", pa_errmsg());
  char golden[512];
  snprintf(golden, sizeof golden, "%s/default_model_tensors.tsv", PALIGN_TEST_DATA);
  FILE *f = fopen(golden, "r");
  assert_non_null(f);
  char line[512];
  size_t checked = 0;
  float *buf = NULL;
  size_t cap = 0;
  while (fgets(line, sizeof line, f)) {
    if (line[0] == '#')
      continue;
    char name[128], type[16], shape[64], hash[65];
    assert_int_equal(sscanf(line, "%127s %15s %63s %64s", name, type, shape, hash), 4);
    const pa_gguf_tensor *t = pa_gguf_find_tensor(g, name);
    if (!t)
      fail_msg("tensor %s missing", name);
    assert_string_equal(pa_dtype_name(t->type), type);
    const uint64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
    if (n > cap) {
      free(buf);
      buf = malloc(n * sizeof(float));
      cap = n;
    }
    assert_int_equal(pa_dequantize(t->type, t->data, buf, n), PA_OK);
    char got[65];
    sha256_hex(buf, n * sizeof(float), got);
    if (strcmp(got, hash) != 0)
      fail_msg("%s (%s): fp32 values differ from gguf-py's", name, type);
    checked++;
  }
  fclose(f);
  free(buf);
  assert_int_equal(checked, pa_gguf_n_tensors(g));
  pa_gguf_close(g);
}

static void test_description(void **s) {
  (void)s;
  pa_model *m;
  if (pa_model_open(test_default_model(), &m))
    fail_msg("%s", pa_errmsg());
  const pa_model_config *c = pa_model_config_get(m);
  assert_string_equal(c->arch, "llama");
  assert_int_equal(c->n_layers, 30);
  assert_int_equal(c->dim, 576);
  assert_int_equal(c->n_heads, 9);
  assert_int_equal(c->n_kv_heads, 3);
  assert_int_equal(c->head_dim, 64);
  assert_int_equal(c->ffn_dim, 1536);
  assert_int_equal(c->vocab_size, 49152);
  assert_int_equal(c->max_seq, 8192);
  assert_true(c->tied_embeddings);
  assert_true(c->rope_theta == 100000.0f);
  assert_true(c->norm_eps == 1e-5f);
  assert_int_equal(c->rope_scaling.kind, PA_ROPE_SCALING_NONE);
  assert_string_equal(pa_model_format(m), "gguf");
  assert_int_equal(pa_model_n_tensors(m), 272);
  pa_model_close(m);
}

/* The loaded layout: untouched tensors equal the file's, Q and K are the
 * file's rows un-interleaved per head. */
static void test_weights_layout(void **s) {
  (void)s;
  pa_model *m;
  if (pa_model_open(test_default_model(), &m))
    fail_msg("%s", pa_errmsg());
  pa_weights w;
  if (pa_model_load_weights(m, &w))
    fail_msg("%s", pa_errmsg());
  const pa_model_config *c = pa_model_config_get(m);
  assert_ptr_equal(w.output, w.tok_embd);
  assert_null(w.rope_freq_div);
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(test_default_model(), &g), PA_OK);
  const pa_gguf_tensor *t = pa_gguf_find_tensor(g, "blk.7.attn_k.weight");
  const int rows = c->n_kv_heads * c->head_dim, hd = c->head_dim;
  float *raw = malloc((size_t)rows * c->dim * sizeof(float));
  assert_int_equal(pa_dequantize(t->type, t->data, raw, (uint64_t)rows * c->dim), PA_OK);
  for (int h = 0; h < c->n_kv_heads; h++)
    for (int j = 0; j < hd; j++) {
      const int gguf_row = h * hd + (j < hd / 2 ? 2 * j : 2 * (j - hd / 2) + 1);
      assert_memory_equal(w.layers[7].wk + (size_t)(h * hd + j) * c->dim, raw + (size_t)gguf_row * c->dim,
                          c->dim * sizeof(float));
    }
  t = pa_gguf_find_tensor(g, "blk.29.ffn_down.weight");
  float *down = malloc((size_t)c->dim * c->ffn_dim * sizeof(float));
  assert_int_equal(pa_dequantize(t->type, t->data, down, (uint64_t)c->dim * c->ffn_dim), PA_OK);
  assert_memory_equal(w.layers[29].w_down, down, (size_t)c->dim * c->ffn_dim * sizeof(float));
  free(down);
  free(raw);
  pa_gguf_close(g);
  pa_weights_free(&w);
  pa_model_close(m);
}

int main(void) {
  test_default_model(); /* skip the whole file early when the model is absent */
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_every_tensor_dequantises_exactly),
      cmocka_unit_test(test_description),
      cmocka_unit_test(test_weights_layout),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
