/* The model description and weight layout: a GGUF file and the Hugging Face
 * directory holding the same weights (both written by mkmodel) must give the
 * same description, tokens and fp32 weights; broken models must fail at open
 * with a message naming the file and the problem. */
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
#include <unistd.h>

#include <cJSON.h>

#include "gguf.h"
#include "mkmodel.h"
#include "model.h"
#include "quant.h"
#include "status.h"
#include "testutil.h"
#include "tokenizer.h"

static pa_model *open_ok(const char *path) {
  pa_model *m = NULL;
  if (pa_model_open(path, &m))
    fail_msg("opening %s: %s", path, pa_errmsg());
  return m;
}

static void expect_open_fails(const char *path, const char *names, const char *what) {
  pa_model *m = (pa_model *)0x1;
  pa_error_clear();
  int rc = pa_model_open(path, &m);
  if (rc == PA_OK)
    fail_msg("%s opened, expected an error about '%s'", path, what);
  assert_null(m);
  if (!strstr(pa_errmsg(), names) || !strstr(pa_errmsg(), what))
    fail_msg("message '%s' should name '%s' and say '%s'", pa_errmsg(), names, what);
}

/* Same options in both formats: identical description, tokens and weights. */
static void check_formats_agree(pa_mkmodel_opts o) {
  char gguf[256], hf[256];
  tu_path(gguf, sizeof gguf, "m.gguf");
  tu_path(hf, sizeof hf, "hf");
  o.force = true;
  if (pa_mkmodel_write_gguf(&o, gguf) || pa_mkmodel_write_hf(&o, hf))
    fail_msg("mkmodel: %s", pa_errmsg());
  pa_model *a = open_ok(gguf), *b = open_ok(hf);
  assert_string_equal(pa_model_format(a), "gguf");
  assert_string_equal(pa_model_format(b), "safetensors");
  pa_model_config ca = *pa_model_config_get(a), cb = *pa_model_config_get(b);
  assert_int_equal(ca.n_layers, o.n_layers);
  assert_int_equal(ca.dim, o.dim);
  assert_int_equal(ca.n_heads, o.n_heads);
  assert_int_equal(ca.n_kv_heads, o.n_kv_heads);
  assert_int_equal(ca.tied_embeddings, o.tied);
  memset(ca.name, 0, sizeof ca.name); /* free text, allowed to differ */
  memset(cb.name, 0, sizeof cb.name);
  assert_memory_equal(&ca, &cb, sizeof ca);

  const char *texts[] = {"You worry about things..", "Option (A). Very Accurate", "<|im_start|>user\n12 345<|im_end|>"};
  for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
    int32_t *ia, *ib;
    size_t na, nb;
    assert_int_equal(pa_tokenizer_encode(pa_model_tokenizer(a), texts[i], strlen(texts[i]), PA_TOK_PARSE_SPECIAL, &ia, &na), PA_OK);
    assert_int_equal(pa_tokenizer_encode(pa_model_tokenizer(b), texts[i], strlen(texts[i]), PA_TOK_PARSE_SPECIAL, &ib, &nb), PA_OK);
    assert_int_equal(na, nb);
    assert_memory_equal(ia, ib, na * sizeof *ia);
    free(ia);
    free(ib);
  }

  pa_weights wa, wb;
  if (pa_model_load_weights(a, &wa) || pa_model_load_weights(b, &wb))
    fail_msg("loading weights: %s", pa_errmsg());
  assert_int_equal(wa.n_floats, wb.n_floats);
  assert_memory_equal(wa.arena, wb.arena, wa.n_floats * sizeof(float));
  assert_true(o.tied ? wa.output == wa.tok_embd : wa.output != wa.tok_embd);
  /* the arena is laid out the same way in both: spot-check the pointers */
  assert_int_equal(wa.layers[o.n_layers - 1].w_down - wa.arena, wb.layers[o.n_layers - 1].w_down - wb.arena);
  pa_weights_free(&wa);
  pa_weights_free(&wb);
  pa_weights_free(&wa); /* freeing twice is harmless */
  pa_model_close(a);
  pa_model_close(b);
}

static void test_formats_agree_default(void **s) {
  (void)s;
  check_formats_agree(pa_mkmodel_defaults());
}

static void test_formats_agree_variants(void **s) {
  (void)s;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.tied = false, o.dtype = PA_F16, o.n_shards = 3, o.n_heads = 8, o.n_kv_heads = 2, o.dim = 128, o.seed = 7;
  check_formats_agree(o);
  o = pa_mkmodel_defaults();
  o.dtype = PA_BF16, o.n_heads = 2, o.n_kv_heads = 2, o.n_layers = 3, o.ffn_dim = 96;
  check_formats_agree(o);
}

/* Q rows of a GGUF really are permuted: the loaded wq differs from the raw
 * GGUF tensor but equals the safetensors one (checked above); here: the
 * loaded first row of head 0's second half is GGUF row 1. */
static void test_gguf_rows_unpermuted(void **s) {
  (void)s;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  char gguf[256];
  tu_path(gguf, sizeof gguf, "m.gguf");
  assert_int_equal(pa_mkmodel_write_gguf(&o, gguf), PA_OK);
  pa_model *m = open_ok(gguf);
  pa_weights w;
  assert_int_equal(pa_model_load_weights(m, &w), PA_OK);
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(gguf, &g), PA_OK);
  const pa_gguf_tensor *t = pa_gguf_find_tensor(g, "blk.0.attn_q.weight");
  const int hd = o.dim / o.n_heads;
  float *raw = malloc(t->nbytes);
  assert_int_equal(pa_dequantize(t->type, t->data, raw, t->ne[0] * t->ne[1]), PA_OK);
  assert_memory_equal(w.layers[0].wq + (size_t)(hd / 2) * o.dim, raw + (size_t)1 * o.dim, o.dim * sizeof(float));
  assert_memory_equal(w.layers[0].wq + (size_t)1 * o.dim, raw + (size_t)2 * o.dim, o.dim * sizeof(float));
  assert_memory_not_equal(w.layers[0].wq + (size_t)1 * o.dim, raw + (size_t)1 * o.dim, o.dim * sizeof(float));
  free(raw);
  pa_gguf_close(g);
  pa_weights_free(&w);
  pa_model_close(m);
}

/* Copies a GGUF, leaving out tensor `skip`, or giving tensor `alter` a new
 * type and/or reversed shape, and adding tensor `extra` (a 1-D F32 of
 * n_extra values; NULL: none). */
static void rewrite_gguf_adding(const char *src, const char *dst, const char *skip, const char *alter,
                                uint32_t new_type, bool transpose, const char *extra, const float *extra_data,
                                int n_extra) {
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(src, &g), PA_OK);
  pa_gguf_writer *w;
  assert_int_equal(pa_gguf_writer_create(&w), PA_OK);
  for (size_t i = 0; i < pa_gguf_n_kv(g); i++)
    assert_int_equal(pa_gguf_copy_kv(w, pa_gguf_kv_at(g, i)), PA_OK);
  for (size_t i = 0; i < pa_gguf_n_tensors(g); i++) {
    const pa_gguf_tensor *t = pa_gguf_tensor_at(g, i);
    char name[128];
    snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
    if (skip && !strcmp(name, skip))
      continue;
    uint64_t ne[4] = {t->ne[0], t->ne[1], t->ne[2], t->ne[3]};
    uint32_t type = t->type;
    if (alter && !strcmp(name, alter)) {
      if (new_type != UINT32_MAX)
        type = new_type;
      if (transpose)
        ne[0] = t->ne[1], ne[1] = t->ne[0];
    }
    assert_int_equal(pa_gguf_add_tensor(w, name, type, t->n_dims, ne, t->data), PA_OK);
  }
  if (extra)
    assert_int_equal(pa_gguf_add_tensor(w, extra, PA_F32, 1, (uint64_t[4]){(uint64_t)n_extra, 1, 1, 1}, extra_data),
                     PA_OK);
  assert_int_equal(pa_gguf_writer_write(w, dst), PA_OK);
  pa_gguf_writer_destroy(w);
  pa_gguf_close(g);
}

static void rewrite_gguf(const char *src, const char *dst, const char *skip, const char *alter, uint32_t new_type,
                         bool transpose) {
  rewrite_gguf_adding(src, dst, skip, alter, new_type, transpose, NULL, NULL, 0);
}

static void test_broken_gguf_models(void **s) {
  (void)s;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  char good[256], bad[256];
  tu_path(good, sizeof good, "good.gguf");
  tu_path(bad, sizeof bad, "bad.gguf");
  assert_int_equal(pa_mkmodel_write_gguf(&o, good), PA_OK);
  rewrite_gguf(good, bad, NULL, NULL, UINT32_MAX, false);
  pa_model_close(open_ok(bad)); /* the copy itself is fine */
  rewrite_gguf(good, bad, "blk.1.ffn_up.weight", NULL, UINT32_MAX, false);
  expect_open_fails(bad, bad, "tensor 'blk.1.ffn_up.weight' is missing");
  rewrite_gguf(good, bad, NULL, "blk.0.ffn_up.weight", UINT32_MAX, true);
  expect_open_fails(bad, bad, "'blk.0.ffn_up.weight' has shape [64, 128], the description needs [128, 64]");
  rewrite_gguf(good, bad, NULL, "blk.0.attn_v.weight", PA_I32, false);
  expect_open_fails(bad, bad, "type I32, which palign cannot dequantise");
  rewrite_gguf(good, bad, "token_embd.weight", NULL, UINT32_MAX, false);
  expect_open_fails(bad, bad, "'token_embd.weight' is missing");

  /* Llama-3.1's RoPE divisors as a tensor: all 1 loads (and is plain RoPE);
   * a 0, which RoPE would divide by, is refused naming the entry */
  const int half = o.dim / o.n_heads / 2;
  for (int broken = 0; broken < 2; broken++) {
    float div[64];
    for (int i = 0; i < half; i++)
      div[i] = broken && i == 2 ? 0.0f : 1.0f;
    rewrite_gguf_adding(good, bad, NULL, NULL, UINT32_MAX, false, "rope_freqs.weight", div, half);
    pa_model *m = open_ok(bad);
    pa_weights wt;
    if (!broken) {
      assert_int_equal(pa_model_load_weights(m, &wt), PA_OK);
      assert_non_null(wt.rope_freq_div);
      pa_weights_free(&wt);
    } else {
      assert_int_equal(pa_model_load_weights(m, &wt), PA_EFORMAT);
      tu_expect_in(pa_errmsg(), "rope_freqs.weight[2] = 0 is not a positive divisor", "the error");
    }
    pa_model_close(m);
  }
  expect_open_fails("/nonexistent/model.gguf", "/nonexistent/model.gguf", "no such file");
}

/* Replaces `from` with `to` in a text file (first occurrence, which must exist). */
static void edit_file(const char *path, const char *from, const char *to) {
  FILE *f = fopen(path, "r");
  assert_non_null(f);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *text = calloc((size_t)n + 1, 1);
  assert_int_equal(fread(text, 1, (size_t)n, f), (size_t)n);
  fclose(f);
  char *at = strstr(text, from);
  if (!at)
    fail_msg("'%s' not in %s", from, path);
  f = fopen(path, "w");
  fwrite(text, 1, (size_t)(at - text), f);
  fputs(to, f);
  fputs(at + strlen(from), f);
  fclose(f);
  free(text);
}

/* Sets config.json's `key` to the JSON text `value` (NULL: removes the key). */
static void edit_config(const char *path, const char *key, const char *value) {
  FILE *f = fopen(path, "r");
  assert_non_null(f);
  char text[8192];
  size_t n = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[n] = '\0';
  cJSON *root = cJSON_Parse(text);
  assert_non_null(root);
  cJSON_DeleteItemFromObjectCaseSensitive(root, key);
  if (value)
    cJSON_AddItemToObject(root, key, cJSON_Parse(value));
  char *out = cJSON_Print(root);
  tu_write_text(path, out);
  cJSON_free(out);
  cJSON_Delete(root);
}

static void test_broken_hf_models(void **s) {
  (void)s;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.force = true;
  char dir[256], file[320];
  tu_path(dir, sizeof dir, "hf");
  snprintf(file, sizeof file, "%s/config.json", dir);

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  tu_write_text(file, "{\"model_type\": \"llama\", \"hidden_size\": ");
  expect_open_fails(dir, "config.json", "");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "hidden_size", NULL);
  expect_open_fails(dir, dir, "config.json has no 'hidden_size'");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "num_key_value_heads", "3");
  expect_open_fails(dir, dir, "4 query heads are not a multiple of 3 key/value heads");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "model_type", "\"gpt2\"");
  expect_open_fails(dir, dir, "model_type 'gpt2' is not a Llama-family model");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "num_hidden_layers", "3");
  expect_open_fails(dir, dir, "tensor 'model.layers.2.input_layernorm.weight' is missing");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "hidden_size", "1e9");
  expect_open_fails(dir, dir, "dim = 1000000000 is outside");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "tie_word_embeddings", "\"yes\"");
  expect_open_fails(dir, dir, "'tie_word_embeddings' must be true or false");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4}");
  expect_open_fails(dir, dir, "rope_scaling type 'yarn' is not supported");

  /* a factor of 0 would divide the low frequencies by 0 (GGUF's 0 means
   * "the divisors are in the file"; config.json has no such file) */
  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "rope_theta", "0.5"); /* frequencies growing, to infinity near 0 */
  expect_open_fails(dir, dir, "RoPE base 0.5 is not a number of at least 1");

  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 0.0}");
  expect_open_fails(dir, dir, "config.json rope_scaling factor 0 is below 1");

  o.n_shards = 2;
  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  snprintf(file, sizeof file, "%s/model-00002-of-00002.safetensors", dir);
  assert_int_equal(unlink(file), 0);
  expect_open_fails(dir, "model-00002-of-00002.safetensors", "");

  o.n_shards = 1;
  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  snprintf(file, sizeof file, "%s/tokenizer.json", dir);
  edit_file(file, "\"merges\"", "\"merges_gone\"");
  expect_open_fails(dir, "tokenizer.json", "merges");
}

/* Llama-3.1 RoPE scaling from config.json becomes frequency divisors: 1 for
 * wavelengths shorter than original_context/high_freq_factor, `factor` for
 * those longer than original_context/low_freq_factor, smoothly between. */
static void test_llama3_rope_scaling(void **s) {
  (void)s;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  char dir[256], file[320];
  tu_path(dir, sizeof dir, "hf");
  snprintf(file, sizeof file, "%s/config.json", dir);
  assert_int_equal(pa_mkmodel_write_hf(&o, dir), PA_OK);
  edit_config(file, "rope_scaling",
              "{\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
              "\"original_max_position_embeddings\": 8192}");
  pa_model *m = open_ok(dir);
  const pa_model_config *c = pa_model_config_get(m);
  assert_int_equal(c->rope_scaling.kind, PA_ROPE_SCALING_LLAMA3);
  assert_true(c->rope_scaling.factor == 8.0f);
  pa_weights w;
  assert_int_equal(pa_model_load_weights(m, &w), PA_OK);
  assert_non_null(w.rope_freq_div);
  const int half = c->head_dim / 2; /* 8: wavelengths 2*pi*10000^(i/8) from 6.3 to 19869 */
  assert_true(w.rope_freq_div[0] == 1.0f);
  assert_true(w.rope_freq_div[half - 1] == 8.0f);
  for (int i = 1; i < half; i++)
    assert_true(w.rope_freq_div[i] >= w.rope_freq_div[i - 1]);
  /* i = 6: wavelength 2*pi*10000^(6/8) = 6283.2, between 2048 and 8192:
   * smooth = (8192/6283.2 - 1) / 3 = 0.10127, divisor = 1/((1-smooth)/8 + smooth) */
  const double smooth = (8192.0 / (2 * 3.14159265358979 * pow(10000.0, 0.75)) - 1) / 3;
  assert_float_equal(w.rope_freq_div[6], 1 / ((1 - smooth) / 8 + smooth), 1e-4);
  pa_weights_free(&w);
  pa_model_close(m);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_formats_agree_default, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_formats_agree_variants, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_gguf_rows_unpermuted, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_broken_gguf_models, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_broken_hf_models, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_llama3_rope_scaling, tu_setup, tu_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
