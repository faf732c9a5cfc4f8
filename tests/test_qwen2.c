/* The qwen2 architecture on a tiny random model: palign mkmodel --arch qwen2
 * writes it again here with the options of tests/golden/qwen2_tiny/cases.json,
 * in GGUF and in Hugging Face form, and the forward pass of both must give the
 * logits and head outputs that Hugging Face transformers' Qwen2ForCausalLM
 * computed on the same weights (make_qwen2_golden.py tiny; cross-checked
 * there against an own float64 Qwen2).
 *
 * Tolerance: 1e-5 absolute on logits (up to 0.6 in size here) and head
 * outputs. The golden's own float32 rounding is within 4e-7 of float64
 * (cases.json crosschecks), so the bound leaves a margin of 25x, and it still
 * sees the two mistakes a qwen2 loader can make: ignoring the Q/K/V biases
 * moves these logits by 0.76 to 1.1, treating the GGUF rows as interleaved
 * (llama's layout) by 2e-3 to 5e-3.
 *
 * Also: the loaded weights (biases present, GGUF rows not permuted), the
 * tokenizers of both forms on the cases' texts, and NFC, which Qwen2's
 * tokenizer.json applies and a GGUF file (as llama.cpp reads it) does not. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "forward.h"
#include "gguf.h"
#include "jsonfile.h"
#include "mkmodel.h"
#include "model.h"
#include "quant.h"
#include "status.h"
#include "testutil.h"
#include "tokenizer.h"

#define GOLDEN PALIGN_TEST_DATA "/qwen2_tiny/"
#define TOL    1e-5

static cJSON *golden;
static char gguf_path[300], hf_path[300];
static pa_mkmodel_opts opts;

static int num(const cJSON *o, const char *key) { return cJSON_GetObjectItem(o, key)->valueint; }

static int setup(void **s) {
  if (tu_setup(s) || pa_json_load(GOLDEN "cases.json", &golden)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  const cJSON *mk = cJSON_GetObjectItem(golden, "mkmodel");
  opts = pa_mkmodel_defaults();
  opts.arch = PA_MK_QWEN2;
  opts.n_layers = num(mk, "layers");
  opts.dim = num(mk, "dim");
  opts.n_heads = num(mk, "heads");
  opts.n_kv_heads = num(mk, "kv_heads");
  opts.ffn_dim = num(mk, "ffn");
  opts.seed = (uint64_t)num(mk, "seed");
  opts.rope_theta = (float)cJSON_GetObjectItem(mk, "rope_theta")->valuedouble;
  opts.norm_eps = (float)cJSON_GetObjectItem(mk, "norm_eps")->valuedouble;
  opts.tied = cJSON_IsTrue(cJSON_GetObjectItem(mk, "tied"));
  if (strcmp(cJSON_GetObjectItem(mk, "arch")->valuestring, "qwen2") ||
      pa_mkmodel_write_gguf(&opts, tu_path(gguf_path, sizeof gguf_path, "q.gguf")) ||
      pa_mkmodel_write_hf(&opts, tu_path(hf_path, sizeof hf_path, "q-hf"))) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  return 0;
}

static int teardown(void **s) {
  cJSON_Delete(golden);
  return tu_teardown(s);
}

static float *load_f32(const char *name, size_t n) {
  char path[512];
  snprintf(path, sizeof path, GOLDEN "%s", name);
  size_t len;
  float *v = (float *)tu_slurp(path, &len);
  if (len != n * sizeof(float))
    fail_msg("%s: %zu bytes, expected %zu", path, len, n * sizeof(float));
  return v;
}

static void compare(const char *what, const float *got, const float *want, size_t n) {
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < n; i++)
    if (fabs((double)got[i] - want[i]) > worst)
      worst = fabs((double)got[i] - want[i]), at = i;
  printf("  %-44s max |diff| %.3g\n", what, worst);
  if (!(worst <= TOL))
    fail_msg("%s: max |diff| %g at %zu (got %g, want %g) exceeds %g", what, worst, at, got[at], want[at], TOL);
}

static int32_t *case_ids(const cJSON *c, int *n) {
  const cJSON *ids = cJSON_GetObjectItem(c, "token_ids");
  *n = cJSON_GetArraySize(ids);
  int32_t *t = malloc((size_t)*n * sizeof *t);
  for (int i = 0; i < *n; i++)
    t[i] = cJSON_GetArrayItem(ids, i)->valueint;
  return t;
}

/* Every case, in pieces ending at each extra position, against the golden. */
static void check_forward(const char *path) {
  pa_model *m;
  pa_lm *lm;
  if (pa_model_open(path, &m) || pa_lm_create(m, &(pa_lm_opts){.n_threads = 2, .max_seq = 512}, &lm))
    fail_msg("%s: %s", path, pa_errmsg());
  const pa_model_config *c = pa_lm_config(lm);
  assert_string_equal(c->arch, "qwen2");
  assert_true(c->qkv_bias);
  const int V = c->vocab_size;
  assert_int_equal(V, num(golden, "vocab_size"));
  const size_t nh = (size_t)c->n_layers * c->n_heads * c->head_dim;
  const cJSON *st = cJSON_GetObjectItem(golden, "steering"), *pairs = cJSON_GetObjectItem(st, "pairs");
  float *deltas =
      load_f32(cJSON_GetObjectItem(st, "file")->valuestring, (size_t)cJSON_GetArraySize(pairs) * c->head_dim);
  float *steer = calloc(nh, sizeof *steer);
  for (int i = 0; i < cJSON_GetArraySize(pairs); i++) {
    const cJSON *p = cJSON_GetArrayItem(pairs, i);
    const int l = cJSON_GetArrayItem(p, 0)->valueint, h = cJSON_GetArrayItem(p, 1)->valueint;
    memcpy(steer + ((size_t)l * c->n_heads + h) * c->head_dim, deltas + (size_t)i * c->head_dim,
           (size_t)c->head_dim * sizeof(float));
  }
  float *logits = malloc((size_t)V * sizeof *logits), *heads = malloc(nh * sizeof *heads);
  const cJSON *cs;
  int n_cases = 0;
  cJSON_ArrayForEach(cs, cJSON_GetObjectItem(golden, "cases")) {
    int n;
    int32_t *tokens = case_ids(cs, &n);
    const char *name = cJSON_GetObjectItem(cs, "name")->valuestring;
    const bool steered = cJSON_IsObject(cJSON_GetObjectItem(cs, "steering"));
    pa_kv *kv;
    assert_int_equal(pa_kv_create(lm, n, &kv), PA_OK);
    const cJSON *extra = cJSON_GetObjectItem(cs, "extra_positions");
    const int n_extra = cJSON_GetArraySize(extra);
    int done = 0;
    for (int e = 0; e <= n_extra; e++) {
      const cJSON *x = e < n_extra ? cJSON_GetArrayItem(extra, e) : cs;
      const int upto = num(x, "position") + 1;
      pa_seq seq = {.tokens = tokens + done, .n_tokens = upto - done, .kv = kv};
      pa_batch b = {.seqs = &seq,
                    .n_seqs = 1,
                    .steer = steered ? steer : NULL,
                    .logits = logits,
                    .heads = e == n_extra ? heads : NULL};
      if (pa_lm_forward(lm, &b))
        fail_msg("%s: %s", name, pa_errmsg());
      done = upto;
      float *want = load_f32(cJSON_GetObjectItem(x, "logits_file")->valuestring, (size_t)V);
      char what[96];
      snprintf(what, sizeof what, "%s (%s): logits at %d", name, pa_model_format(m), upto - 1);
      compare(what, logits, want, (size_t)V);
      assert_int_equal(pa_argmax(logits, V), num(x, "top1"));
      free(want);
    }
    float *want = load_f32(cJSON_GetObjectItem(cs, "heads_file")->valuestring, nh);
    char what[96];
    snprintf(what, sizeof what, "%s (%s): head outputs", name, pa_model_format(m));
    compare(what, heads, want, nh);
    free(want);
    free(tokens);
    pa_kv_destroy(kv);
    n_cases++;
  }
  assert_int_equal(n_cases, 4);
  free(logits), free(heads), free(steer), free(deltas);
  pa_lm_destroy(lm);
  pa_model_close(m);
}

static void test_forward_gguf(void **s) {
  (void)s;
  check_forward(gguf_path);
}

static void test_forward_hf(void **s) {
  (void)s;
  check_forward(hf_path);
}

/* Biases are in the arena, equal in both forms; qwen2 GGUF rows are not
 * permuted (the loaded wq is the stored tensor). */
static void test_weights(void **s) {
  (void)s;
  pa_model *a, *b;
  assert_int_equal(pa_model_open(gguf_path, &a), PA_OK);
  assert_int_equal(pa_model_open(hf_path, &b), PA_OK);
  pa_weights wa, wb;
  assert_int_equal(pa_model_load_weights(a, &wa), PA_OK);
  assert_int_equal(pa_model_load_weights(b, &wb), PA_OK);
  assert_int_equal(wa.n_floats, wb.n_floats);
  assert_memory_equal(wa.arena, wb.arena, wa.n_floats * sizeof(float));
  const pa_model_config *c = pa_model_config_get(a);
  const size_t q = (size_t)c->n_heads * c->head_dim, kv = (size_t)c->n_kv_heads * c->head_dim;
  for (int l = 0; l < c->n_layers; l++) {
    assert_non_null(wa.layers[l].bq);
    assert_non_null(wa.layers[l].bk);
    assert_non_null(wa.layers[l].bv);
    double mx = 0;
    for (size_t i = 0; i < kv; i++)
      mx = fmax(mx, fabs(wa.layers[l].bk[i]));
    assert_true(mx > 0.1); /* mkmodel's biases are in [-0.5, 0.5) */
  }
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(gguf_path, &g), PA_OK);
  const char *names[2] = {"blk.1.attn_q.weight", "blk.1.attn_q.bias"};
  const float *loaded[2] = {wa.layers[1].wq, wa.layers[1].bq};
  const size_t sizes[2] = {q * (size_t)c->dim, q};
  for (int i = 0; i < 2; i++) {
    const pa_gguf_tensor *t = pa_gguf_find_tensor(g, names[i]);
    assert_non_null(t);
    float *raw = malloc(sizes[i] * sizeof *raw);
    assert_int_equal(pa_dequantize(t->type, t->data, raw, sizes[i]), PA_OK);
    assert_memory_equal(loaded[i], raw, sizes[i] * sizeof *raw);
    free(raw);
  }
  pa_gguf_close(g);
  pa_weights_free(&wa);
  pa_weights_free(&wb);
  pa_model_close(a);
  pa_model_close(b);

  /* a llama model has no biases */
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(path, sizeof path, "llama.gguf")), PA_OK);
  pa_model *m;
  assert_int_equal(pa_model_open(path, &m), PA_OK);
  assert_false(pa_model_config_get(m)->qkv_bias);
  pa_weights w;
  assert_int_equal(pa_model_load_weights(m, &w), PA_OK);
  assert_null(w.layers[0].bq);
  pa_weights_free(&w);
  pa_model_close(m);
}

static void encode(const pa_model *m, const char *text, unsigned flags, int32_t **ids, size_t *n) {
  if (pa_tokenizer_encode(pa_model_tokenizer(m), text, strlen(text), flags, ids, n))
    fail_msg("%s", pa_errmsg());
}

/* The cases' texts give their token ids (those of Hugging Face tokenizers on
 * the tokenizer.json mkmodel wrote) in both forms; NFC only in the HF one. */
static void test_tokenizer(void **s) {
  (void)s;
  pa_model *form[2];
  assert_int_equal(pa_model_open(gguf_path, &form[0]), PA_OK);
  assert_int_equal(pa_model_open(hf_path, &form[1]), PA_OK);
  const cJSON *cs;
  int checked = 0;
  cJSON_ArrayForEach(cs, cJSON_GetObjectItem(golden, "cases")) {
    const cJSON *text = cJSON_GetObjectItem(cs, "text");
    if (!cJSON_IsString(text))
      continue;
    int n_want;
    int32_t *want = case_ids(cs, &n_want);
    for (int f = 0; f < 2; f++) {
      int32_t *ids;
      size_t n;
      encode(form[f], text->valuestring, PA_TOK_PARSE_SPECIAL, &ids, &n);
      assert_int_equal(n, (size_t)n_want);
      assert_memory_equal(ids, want, n * sizeof *ids);
      free(ids);
    }
    free(want);
    checked++;
  }
  assert_int_equal(checked, 2);

  const char *composed = "caf\xc3\xa9 \xe1\xba\xa0", *decomposed = "cafe\xcc\x81 A\xcc\xa3"; /* é, Ạ */
  int32_t *a, *b;
  size_t na, nb;
  encode(form[1], composed, 0, &a, &na);
  encode(form[1], decomposed, 0, &b, &nb);
  assert_int_equal(na, nb);
  assert_memory_equal(a, b, na * sizeof *a);
  free(b);
  encode(form[0], decomposed, 0, &b, &nb); /* GGUF: bytes as given */
  assert_true(na != nb || memcmp(a, b, na * sizeof *a) != 0);
  free(a), free(b);
  /* invalid UTF-8 passes NFC untouched: the bytes come back */
  const char bad[] = "e\xcc\x81\xff\xfe x";
  encode(form[1], bad, 0, &a, &na);
  char *back;
  size_t len;
  assert_int_equal(pa_tokenizer_decode(pa_model_tokenizer(form[1]), a, na, 0, &back, &len), PA_OK);
  assert_int_equal(len, strlen("\xc3\xa9\xff\xfe x"));
  assert_memory_equal(back, "\xc3\xa9\xff\xfe x", len);
  free(back), free(a);
  pa_model_close(form[0]);
  pa_model_close(form[1]);
}

/* What a Hugging Face Qwen2 directory may say that palign cannot honour. */
static void test_refused_configs(void **s) {
  (void)s;
  char cfg_path[400];
  snprintf(cfg_path, sizeof cfg_path, "%s/config.json", hf_path);
  char *orig = tu_slurp(cfg_path, NULL);
  static const struct {
    const char *from, *to, *msg;
  } cases[] = {
      {"\"use_sliding_window\":\tfalse", "\"use_sliding_window\": true", "use_sliding_window"},
      {"\"use_sliding_window\":\tfalse", "\"use_sliding_window\": 1", "must be true or false"},
      {"\"model_type\":\t\"qwen2\"", "\"model_type\": \"qwen3\"", "qwen3"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char *at = strstr(orig, cases[i].from);
    if (!at)
      fail_msg("config.json has no %s", cases[i].from);
    size_t pre = (size_t)(at - orig);
    char *edited = malloc(strlen(orig) + strlen(cases[i].to) + 1);
    memcpy(edited, orig, pre);
    strcpy(edited + pre, cases[i].to);
    strcat(edited, at + strlen(cases[i].from));
    tu_write_text(cfg_path, edited);
    free(edited);
    pa_model *m = (pa_model *)1;
    assert_true(pa_model_open(hf_path, &m) < 0);
    assert_null(m);
    if (!strstr(pa_errmsg(), cases[i].msg) || !strstr(pa_errmsg(), "config.json"))
      fail_msg("case %zu: message '%s' should name config.json and '%s'", i, pa_errmsg(), cases[i].msg);
  }
  tu_write_text(cfg_path, orig);
  free(orig);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_forward_gguf), cmocka_unit_test(test_forward_hf),      cmocka_unit_test(test_weights),
      cmocka_unit_test(test_tokenizer),    cmocka_unit_test(test_refused_configs),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
