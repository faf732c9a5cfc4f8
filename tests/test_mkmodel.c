/* Tests for mkmodel.c, bpe_train.c and `palign mkmodel`: determinism, the
 * GGUF metadata and shapes, the Q/K row permutation, and that the GGUF and the
 * Hugging Face directory hold the same weights and the same tokenizer.
 * (tests/golden/make_safetensors_golden.py checks the same files with the
 * reference Python readers.) */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "bpe_train.h"
#include "jsonfile.h"
#include "gguf.h"
#include "hfdir.h"
#include "mkmodel.h"
#include "quant.h"
#include "safetensors.h"
#include "status.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "commands.h"
#include "testutil.h"

static bool exists(const char *path) { return access(path, F_OK) == 0; }

static bool same_file(const char *a, const char *b) {
  size_t la, lb;
  char *pa = tu_slurp(a, &la), *pb = tu_slurp(b, &lb);
  bool same = la == lb && memcmp(pa, pb, la) == 0;
  free(pa);
  free(pb);
  return same;
}

static void expect_msg(const char *what) {
  if (!strstr(pa_errmsg(), what))
    fail_msg("message '%s' should say '%s'", pa_errmsg(), what);
}

/* ---- options and the BPE trainer ------------------------------------------------------------ */

static void test_validate(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  assert_int_equal(pa_mkmodel_validate(&o), 0);
  assert_int_equal(o.n_layers, 2);
  assert_int_equal(o.dim, 64);
  assert_true(o.tied);
  static const struct {
    int field;
    int32_t value;
    const char *what;
  } bad[] = {
      {0, 0, "layers"},      {1, 63, "must divide dim"}, {2, 0, "heads"},  {2, 64, "must be even"}, {3, 3, "kv-heads"},
      {4, 0, "ffn"},         {5, -1, "merges"},          {6, 0, "shards"}, {6, 21, "shards"},       {7, 0, "max_seq"},
      {1, 65536 * 2, "dim"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    o = pa_mkmodel_defaults();
    int32_t *f[] = {&o.n_layers, &o.dim, &o.n_heads, &o.n_kv_heads, &o.ffn_dim, &o.n_merges, &o.n_shards, &o.max_seq};
    *f[bad[i].field] = bad[i].value;
    assert_int_equal(pa_mkmodel_validate(&o), PA_EINVAL);
    expect_msg(bad[i].what);
  }
  o = pa_mkmodel_defaults();
  o.dtype = PA_Q4_0;
  assert_int_equal(pa_mkmodel_validate(&o), PA_EINVAL);
  o = pa_mkmodel_defaults();
  o.norm_eps = 0;
  assert_int_equal(pa_mkmodel_validate(&o), PA_EINVAL);
  o = pa_mkmodel_defaults();
  o.dim = 65536;
  o.ffn_dim = 1 << 20;
  assert_int_equal(pa_mkmodel_validate(&o), PA_EINVAL);
  expect_msg("parameters");
  /* 21 shards for 20 tensors is refused above; untied adds lm_head */
  o = pa_mkmodel_defaults();
  o.tied = false;
  o.n_shards = 21;
  assert_int_equal(pa_mkmodel_validate(&o), 0);

  char p[600];
  o = pa_mkmodel_defaults();
  o.n_merges = 5000;
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "toomany.gguf")), PA_EINVAL);
  expect_msg("allows only");
  assert_false(exists(p));
}

static void test_bpe(void **state) {
  char u[4];
  assert_int_equal(pa_bpe_byte_to_unicode(' ', u), 2);
  assert_string_equal(u, "\xc4\xa0"); /* U+0120 'Ġ' */
  pa_bpe_byte_to_unicode('\n', u);
  assert_string_equal(u, "\xc4\x8a"); /* U+010A 'Ċ' */
  pa_bpe_byte_to_unicode(0, u);
  assert_string_equal(u, "\xc4\x80"); /* U+0100 */
  pa_bpe_byte_to_unicode(0xAD, u);
  assert_string_equal(u, "\xc5\x83"); /* U+0143, the last moved byte */
  assert_int_equal(pa_bpe_byte_to_unicode('a', u), 1);
  assert_string_equal(u, "a");
  pa_bpe_byte_to_unicode(0xE9, u);
  assert_string_equal(u, "\xc3\xa9"); /* Latin-1 bytes stand for themselves */
  char all[256][4];
  for (int b = 0; b < 256; b++) {
    pa_bpe_byte_to_unicode((uint8_t)b, all[b]);
    for (int c = 0; c < b; c++)
      assert_string_not_equal(all[b], all[c]);
  }

  /* the pieces Hugging Face's Digits(individual) + ByteLevel pre-tokenizer gives */
  const char *text = "Hello world's  test\n\nA 12ab !'s x\t\ty  ";
  static const char *const want[] = {"Hello", " world", "'s",  " ", " test", "\n", "\n", "A", " ", "1",
                                     "2",     "ab",     " !'", "s", " x",    "\t", "\t", "y", "  "};
  size_t len = strlen(text), pos = 0, k = 0;
  while (pos < len) {
    size_t end = pa_bpe_pretok_next(text, len, pos);
    assert_true(k < sizeof want / sizeof want[0]);
    assert_int_equal(end - pos, strlen(want[k]));
    assert_memory_equal(text + pos, want[k], end - pos);
    pos = end;
    k++;
  }
  assert_int_equal(k, sizeof want / sizeof want[0]);

  /* "a b" x3 first, then "Ġ ab" x2, then a tie between "Ġ c" and "c d":
   * "c" sorts before "Ġ" (0xC4 0xA0), so "c d" */
  pa_bpe_vocab *v;
  const char *t = "ab ab ab cd";
  assert_int_equal(pa_bpe_train(t, strlen(t), 4, &v), 0);
  assert_int_equal(pa_bpe_vocab_n_merges(v), 4);
  assert_string_equal(pa_bpe_vocab_merge(v, 0), "a b");
  assert_string_equal(pa_bpe_vocab_merge(v, 1), "\xc4\xa0 ab");
  assert_string_equal(pa_bpe_vocab_merge(v, 2), "c d");
  assert_string_equal(pa_bpe_vocab_merge(v, 3), "\xc4\xa0 cd");
  assert_null(pa_bpe_vocab_merge(v, 4));
  assert_int_equal(pa_bpe_vocab_n_tokens(v), 260);
  assert_string_equal(pa_bpe_vocab_token(v, 'a'), "a");
  assert_string_equal(pa_bpe_vocab_token(v, 256), "ab");
  assert_string_equal(pa_bpe_vocab_token(v, 259), "\u0120cd");
  pa_bpe_vocab_destroy(v);
  pa_bpe_vocab_destroy(NULL);
  assert_int_equal(pa_bpe_train(t, strlen(t), 5, &v), PA_EINVAL);
  assert_null(v);
  expect_msg("only 4 merges");

  /* a three-way tie at 4 ("a b", "Ġ a", "b c") goes to the smallest left token */
  t = "bc bc bc abc ab ab ab";
  assert_int_equal(pa_bpe_train(t, strlen(t), 5, &v), 0);
  static const char *const merges[] = {"a b", "\xc4\xa0 ab", "b c", "\xc4\xa0 bc", "\u0120ab c"};
  for (size_t i = 0; i < 5; i++)
    assert_string_equal(pa_bpe_vocab_merge(v, i), merges[i]);
  for (size_t i = 0; i < pa_bpe_vocab_n_tokens(v); i++)
    for (size_t j = 0; j < i; j++)
      assert_string_not_equal(pa_bpe_vocab_token(v, i), pa_bpe_vocab_token(v, j));
  assert_int_equal(pa_bpe_vocab_n_tokens(v), 256 + 5);
  pa_bpe_vocab_destroy(v);
}

/* ---- the written models ----------------------------------------------------------------------- */

static void test_determinism(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.dtype = PA_BF16;
  char a[600], b[600];
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(a, sizeof a, "det1.gguf")), 0);
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(b, sizeof b, "det2.gguf")), 0);
  assert_true(same_file(a, b));
  o.seed = 2;
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(b, sizeof b, "det3.gguf")), 0);
  assert_false(same_file(a, b));

  o.seed = 1;
  o.n_shards = 2;
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(a, sizeof a, "det1")), 0);
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(b, sizeof b, "det2")), 0);
  static const char *const files[] = {"config.json",
                                      "tokenizer.json",
                                      "tokenizer_config.json",
                                      "model.safetensors.index.json",
                                      "model-00001-of-00002.safetensors",
                                      "model-00002-of-00002.safetensors"};
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    char fa[700], fb[700];
    snprintf(fa, sizeof fa, "%s/%s", a, files[i]);
    snprintf(fb, sizeof fb, "%s/%s", b, files[i]);
    assert_true(same_file(fa, fb));
  }
  /* no temporary files left behind */
  DIR *d = opendir(a);
  struct dirent *e;
  size_t n = 0;
  while ((e = readdir(d)))
    if (e->d_name[0] != '.')
      n++, assert_null(strstr(e->d_name, ".tmp"));
  closedir(d);
  assert_int_equal(n, 6);
}

static void test_gguf_metadata(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.dtype = PA_F16;
  o.tied = false;
  o.n_layers = 3;
  o.dim = 48;
  o.n_heads = 6;
  o.n_kv_heads = 2;
  o.ffn_dim = 80;
  o.rope_theta = 100000.0f;
  char p[600];
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "meta.gguf")), 0);
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(p, &g), 0);
  pa_str s;
  assert_int_equal(pa_gguf_get_str(g, "general.architecture", &s), 0);
  assert_true(pa_str_eq(s, "llama"));
  assert_int_equal(pa_gguf_get_str(g, "tokenizer.ggml.model", &s), 0);
  assert_true(pa_str_eq(s, "gpt2"));
  assert_int_equal(pa_gguf_get_str(g, "tokenizer.ggml.pre", &s), 0);
  assert_true(pa_str_eq(s, "smollm"));
  assert_int_equal(pa_gguf_get_str(g, "tokenizer.chat_template", &s), 0);
  assert_true(pa_str_eq(s, pa_mkmodel_chat_template));
  static const struct {
    const char *key;
    int64_t want;
  } ints[] = {
      {"llama.block_count", 3},
      {"llama.context_length", 2048},
      {"llama.embedding_length", 48},
      {"llama.feed_forward_length", 80},
      {"llama.attention.head_count", 6},
      {"llama.attention.head_count_kv", 2},
      {"llama.rope.dimension_count", 8},
      {"tokenizer.ggml.bos_token_id", 1},
      {"tokenizer.ggml.eos_token_id", 2},
      {"tokenizer.ggml.unknown_token_id", 0},
      {"tokenizer.ggml.padding_token_id", 2},
      {"general.file_type", 1},
  };
  for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
    int64_t v;
    assert_int_equal(pa_gguf_get_int(g, ints[i].key, 0, INT64_MAX, &v), 0);
    if (v != ints[i].want)
      fail_msg("%s = %lld, expected %lld", ints[i].key, (long long)v, (long long)ints[i].want);
  }
  double f;
  assert_int_equal(pa_gguf_get_float(g, "llama.rope.freq_base", &f), 0);
  assert_true(f == 100000.0);
  assert_int_equal(pa_gguf_get_float(g, "llama.attention.layer_norm_rms_epsilon", &f), 0);
  assert_true((float)f == 1e-5f);
  bool bv = true;
  assert_int_equal(pa_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &bv), 0);
  assert_false(bv);

  int64_t vocab;
  assert_int_equal(pa_gguf_get_int(g, "llama.vocab_size", 1, INT32_MAX, &vocab), 0);
  const pa_gguf_kv *toks, *types, *merges;
  assert_int_equal(pa_gguf_get_arr(g, "tokenizer.ggml.tokens", PA_GGUF_STRING, &toks), 0);
  assert_int_equal(pa_gguf_get_arr(g, "tokenizer.ggml.token_type", PA_GGUF_INT32, &types), 0);
  assert_int_equal(pa_gguf_get_arr(g, "tokenizer.ggml.merges", PA_GGUF_STRING, &merges), 0);
  assert_int_equal(toks->n, (uint64_t)vocab);
  assert_int_equal(types->n, (uint64_t)vocab);
  assert_int_equal(merges->n, 300);
  assert_true(pa_str_eq(toks->strs[0], "<|endoftext|>"));
  assert_true(pa_str_eq(toks->strs[1], "<|im_start|>"));
  assert_true(pa_str_eq(toks->strs[2], "<|im_end|>"));
  assert_true(pa_str_eq(toks->strs[3 + ' '], "\xc4\xa0"));
  for (int64_t i = 0; i < vocab; i++)
    assert_int_equal(pa_gguf_kv_int(types, (uint64_t)i), i < 3 ? 3 : 1);
  /* every merge result is a token */
  for (uint64_t i = 0; i < merges->n; i++) {
    char joined[256];
    pa_str m = merges->strs[i];
    const char *sp = memchr(m.ptr, ' ', m.len);
    assert_non_null(sp);
    size_t l = (size_t)(sp - m.ptr), r = m.len - l - 1;
    memcpy(joined, m.ptr, l);
    memcpy(joined + l, sp + 1, r);
    joined[l + r] = '\0';
    bool found = false;
    for (uint64_t k = 3; k < toks->n && !found; k++)
      found = pa_str_eq(toks->strs[k], joined);
    assert_true(found);
  }

  /* shapes: GGUF lists the fastest dimension first */
  const uint64_t V = (uint64_t)vocab;
  static const struct {
    const char *name;
    uint32_t n_dims;
    uint64_t ne0, ne1;
    uint32_t type;
  } shapes[] = {
      {"token_embd.weight", 2, 48, 0, PA_F16},     {"blk.0.attn_norm.weight", 1, 48, 1, PA_F32},
      {"blk.2.attn_q.weight", 2, 48, 48, PA_F16},  {"blk.2.attn_k.weight", 2, 48, 16, PA_F16},
      {"blk.1.attn_v.weight", 2, 48, 16, PA_F16},  {"blk.1.attn_output.weight", 2, 48, 48, PA_F16},
      {"blk.0.ffn_norm.weight", 1, 48, 1, PA_F32}, {"blk.0.ffn_gate.weight", 2, 48, 80, PA_F16},
      {"blk.0.ffn_up.weight", 2, 48, 80, PA_F16},  {"blk.0.ffn_down.weight", 2, 80, 48, PA_F16},
      {"output_norm.weight", 1, 48, 1, PA_F32},    {"output.weight", 2, 48, 0, PA_F16},
  };
  assert_int_equal(pa_gguf_n_tensors(g), 2 + 9 * 3 + 1);
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const pa_gguf_tensor *t = pa_gguf_find_tensor(g, shapes[i].name);
    if (!t)
      fail_msg("%s is missing", shapes[i].name);
    assert_int_equal(t->n_dims, shapes[i].n_dims);
    assert_int_equal(t->ne[0], shapes[i].ne0);
    assert_int_equal(t->ne[1], shapes[i].ne1 ? shapes[i].ne1 : V);
    assert_int_equal(t->type, shapes[i].type);
  }
  assert_null(pa_gguf_find_tensor(g, "blk.3.attn_q.weight"));
  pa_gguf_close(g);

  /* tied: no output.weight */
  o = pa_mkmodel_defaults();
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "tied.gguf")), 0);
  assert_int_equal(pa_gguf_open(p, &g), 0);
  assert_null(pa_gguf_find_tensor(g, "output.weight"));
  assert_int_equal(pa_gguf_n_tensors(g), 2 + 9 * 2);
  pa_gguf_close(g);
}

/* GGUF tensor as fp32 in its stored row order. */
static float *gguf_f32(const pa_gguf_tensor *t) {
  uint64_t n = t->ne[0] * t->ne[1];
  float *v = malloc(n * sizeof *v);
  assert_non_null(v);
  assert_int_equal(pa_dequantize(t->type, t->data, v, n), 0);
  return v;
}

static float *st_f32(const pa_st_tensor *t) {
  float *v = malloc((t->n_elems ? t->n_elems : 1) * sizeof *v);
  assert_non_null(v);
  assert_int_equal(pa_st_tensor_to_f32(t, v), 0);
  return v;
}

static void test_qk_permutation(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults(); /* dim 64, 4 heads of 16, 2 kv heads */
  char gp[600], hp[600];
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(gp, sizeof gp, "perm.gguf")), 0);
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(hp, sizeof hp, "perm")), 0);
  pa_gguf *g;
  pa_hfdir *h;
  assert_int_equal(pa_gguf_open(gp, &g), 0);
  assert_int_equal(pa_hfdir_open(hp, &h), 0);
  const size_t dim = 64;
  static const struct {
    const char *gguf, *hf;
    size_t rows;
  } qk[] = {{"blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 64},
            {"blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 32}};
  for (size_t k = 0; k < 2; k++) {
    float *gw = gguf_f32(pa_gguf_find_tensor(g, qk[k].gguf));
    float *hw = st_f32(pa_hfdir_find_tensor(h, qk[k].hf));
    /* head_dim 16: HF row a*8 + b of a head is GGUF row 2b + a */
    static const size_t pairs[][2] = {{0, 0}, {1, 2}, {8, 1}, {9, 3}, {7, 14}, {15, 15}, {16 + 11, 16 + 7}};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
      assert_memory_equal(hw + pairs[i][0] * dim, gw + pairs[i][1] * dim, dim * sizeof(float));
    /* and the rows really moved: HF row 1 is not GGUF row 1 */
    assert_memory_not_equal(hw + 1 * dim, gw + 1 * dim, dim * sizeof(float));
    for (size_t r = 0; r < qk[k].rows; r++) {
      size_t head = r / 16, a = (r % 16) / 8, b = r % 8;
      assert_memory_equal(hw + r * dim, gw + (head * 16 + 2 * b + a) * dim, dim * sizeof(float));
    }
    free(gw);
    free(hw);
  }
  /* V is not permuted */
  float *gw = gguf_f32(pa_gguf_find_tensor(g, "blk.0.attn_v.weight"));
  float *hw = st_f32(pa_hfdir_find_tensor(h, "model.layers.0.self_attn.v_proj.weight"));
  assert_memory_equal(gw, hw, 32 * dim * sizeof(float));
  free(gw);
  free(hw);
  pa_hfdir_close(h);
  pa_gguf_close(g);
}

static const char *gguf_name(const char *hf, char *buf, size_t n) {
  static const struct {
    const char *hf, *gguf;
  } map[] = {
      {"input_layernorm", "attn_norm"}, {"self_attn.q_proj", "attn_q"},      {"self_attn.k_proj", "attn_k"},
      {"self_attn.v_proj", "attn_v"},   {"self_attn.o_proj", "attn_output"}, {"post_attention_layernorm", "ffn_norm"},
      {"mlp.gate_proj", "ffn_gate"},    {"mlp.up_proj", "ffn_up"},           {"mlp.down_proj", "ffn_down"}};
  if (strcmp(hf, "model.embed_tokens.weight") == 0)
    return "token_embd.weight";
  if (strcmp(hf, "model.norm.weight") == 0)
    return "output_norm.weight";
  if (strcmp(hf, "lm_head.weight") == 0)
    return "output.weight";
  int layer, used = 0;
  assert_int_equal(sscanf(hf, "model.layers.%d.%n", &layer, &used), 1);
  for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
    size_t l = strlen(map[i].hf);
    if (strncmp(hf + used, map[i].hf, l) == 0 && strcmp(hf + used + l, ".weight") == 0) {
      snprintf(buf, n, "blk.%d.%s.weight", layer, map[i].gguf);
      return buf;
    }
  }
  fail_msg("unexpected tensor %s", hf);
  return NULL;
}

/* The same options give the same fp32 weights in both formats, once the
 * Q/K permutation is undone. */
static void check_formats_agree(const pa_mkmodel_opts *o, const char *tag) {
  char gp[600], hp[600], name[64];
  snprintf(name, sizeof name, "agree_%s.gguf", tag);
  assert_int_equal(pa_mkmodel_write_gguf(o, tu_path(gp, sizeof gp, name)), 0);
  snprintf(name, sizeof name, "agree_%s", tag);
  assert_int_equal(pa_mkmodel_write_hf(o, tu_path(hp, sizeof hp, name)), 0);
  pa_gguf *g;
  pa_hfdir *h;
  assert_int_equal(pa_gguf_open(gp, &g), 0);
  assert_int_equal(pa_hfdir_open(hp, &h), 0);
  assert_int_equal(pa_gguf_n_tensors(g), pa_hfdir_n_tensors(h));
  assert_int_equal(pa_hfdir_n_tensors(h), 2 + 9 * (size_t)o->n_layers + (o->tied ? 0 : 1));
  const size_t hd = (size_t)(o->dim / o->n_heads);
  for (size_t i = 0; i < pa_hfdir_n_tensors(h); i++) {
    const pa_st_tensor *st = pa_hfdir_tensor_at(h, i);
    char buf[64];
    const pa_gguf_tensor *gt = pa_gguf_find_tensor(g, gguf_name(st->name, buf, sizeof buf));
    if (!gt)
      fail_msg("%s has no GGUF counterpart", st->name);
    assert_int_equal(st->dtype, o->dtype);
    assert_int_equal(gt->type, st->n_dims == 1 ? PA_F32 : o->dtype);
    assert_int_equal(gt->n_dims, st->n_dims);
    size_t rows = st->shape[0], cols = st->n_dims == 2 ? st->shape[1] : 1;
    assert_int_equal(gt->ne[0], st->n_dims == 2 ? cols : rows);
    assert_int_equal(gt->ne[st->n_dims == 2 ? 1 : 0], rows);
    float *hw = st_f32(st), *gw = gguf_f32(gt);
    bool permuted = strstr(st->name, "q_proj") || strstr(st->name, "k_proj");
    for (size_t r = 0; r < rows; r++) {
      size_t gr = permuted ? (r / hd) * hd + 2 * (r % (hd / 2)) + (r % hd) / (hd / 2) : r;
      if (memcmp(hw + r * cols, gw + gr * cols, cols * sizeof(float)) != 0)
        fail_msg("%s: row %zu differs between the formats", st->name, r);
    }
    /* the values look like the documented distributions */
    double sum = 0, sq = 0, lo = 1e9, hi = -1e9;
    for (size_t k = 0; k < rows * cols; k++) {
      sum += hw[k];
      sq += (double)hw[k] * hw[k];
      lo = hw[k] < lo ? hw[k] : lo;
      hi = hw[k] > hi ? hw[k] : hi;
    }
    double mean = sum / (double)(rows * cols), sd = sqrt(sq / (double)(rows * cols) - mean * mean);
    if (st->n_dims == 1)
      assert_true(lo >= 0.89 && hi <= 1.11);
    else if (rows * cols >= 1024)
      assert_true(sd > 0.015 && sd < 0.025 && mean > -0.005 && mean < 0.005);
    free(hw);
    free(gw);
  }

  /* config.json says what the GGUF says */
  const cJSON *c = pa_hfdir_config(h);
  int64_t v;
  static const struct {
    const char *json, *gguf;
  } keys[] = {{"num_hidden_layers", "llama.block_count"},
              {"hidden_size", "llama.embedding_length"},
              {"intermediate_size", "llama.feed_forward_length"},
              {"num_attention_heads", "llama.attention.head_count"},
              {"num_key_value_heads", "llama.attention.head_count_kv"},
              {"vocab_size", "llama.vocab_size"},
              {"max_position_embeddings", "llama.context_length"},
              {"head_dim", "llama.rope.dimension_count"}};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    assert_int_equal(pa_gguf_get_int(g, keys[i].gguf, 0, INT64_MAX, &v), 0);
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(c, keys[i].json);
    assert_true(cJSON_IsNumber(j));
    assert_int_equal((int64_t)j->valuedouble, v);
  }
  assert_true(cJSON_IsBool(cJSON_GetObjectItemCaseSensitive(c, "tie_word_embeddings")));
  assert_int_equal(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "tie_word_embeddings")), o->tied);
  assert_true((float)cJSON_GetObjectItemCaseSensitive(c, "rms_norm_eps")->valuedouble == o->norm_eps);
  assert_true((float)cJSON_GetObjectItemCaseSensitive(c, "rope_theta")->valuedouble == o->rope_theta);
  assert_string_equal(cJSON_GetObjectItemCaseSensitive(c, "model_type")->valuestring, "llama");
  assert_string_equal(cJSON_GetObjectItemCaseSensitive(c, "torch_dtype")->valuestring, o->dtype == PA_F32 ? "float32"
                                                                                       : o->dtype == PA_F16
                                                                                           ? "float16"
                                                                                           : "bfloat16");
  pa_hfdir_close(h);
  pa_gguf_close(g);
}

static void test_formats_agree(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  check_formats_agree(&o, "f32");
  o.dtype = PA_F16;
  o.tied = false;
  o.seed = 99;
  check_formats_agree(&o, "f16");
  o = pa_mkmodel_defaults();
  o.dtype = PA_BF16;
  o.n_layers = 3;
  o.dim = 96;
  o.n_heads = 6;
  o.n_kv_heads = 3;
  o.ffn_dim = 40;
  o.n_shards = 5;
  o.norm_eps = 1e-6f;
  o.rope_theta = 500000.0f;
  check_formats_agree(&o, "bf16");
  o = pa_mkmodel_defaults();
  o.dim = 8;
  o.n_heads = 2;
  o.n_kv_heads = 1;
  o.n_merges = 0;
  o.n_layers = 1;
  check_formats_agree(&o, "small");
}

static void test_sharded(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.tied = false;
  char one[600], three[600];
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(one, sizeof one, "one")), 0);
  o.n_shards = 3;
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(three, sizeof three, "three")), 0);
  char p[700];
  snprintf(p, sizeof p, "%s/model.safetensors", one);
  assert_true(exists(p));
  snprintf(p, sizeof p, "%s/model.safetensors", three);
  assert_false(exists(p));
  for (int i = 1; i <= 3; i++) {
    snprintf(p, sizeof p, "%s/model-%05d-of-00003.safetensors", three, i);
    assert_true(exists(p));
  }
  pa_hfdir *h1, *h3;
  assert_int_equal(pa_hfdir_open(one, &h1), 0);
  assert_int_equal(pa_hfdir_open(three, &h3), 0);
  assert_int_equal(pa_hfdir_n_shards(h1), 1);
  assert_int_equal(pa_hfdir_n_shards(h3), 3);
  assert_int_equal(pa_hfdir_n_tensors(h1), pa_hfdir_n_tensors(h3));
  for (size_t i = 0; i < pa_hfdir_n_tensors(h1); i++) {
    const pa_st_tensor *a = pa_hfdir_tensor_at(h1, i);
    const pa_st_tensor *b = pa_hfdir_find_tensor(h3, a->name);
    assert_non_null(b);
    assert_int_equal(a->nbytes, b->nbytes);
    assert_memory_equal(a->data, b->data, a->nbytes);
  }
  /* every shard holds something */
  size_t per[3] = {0};
  for (size_t i = 0; i < pa_hfdir_n_tensors(h3); i++) {
    const char *f = pa_hfdir_tensor_at(h3, i)->file;
    per[strstr(f, "model-00001") ? 0 : strstr(f, "model-00002") ? 1 : 2]++;
  }
  assert_true(per[0] && per[1] && per[2]);
  assert_string_equal(pa_hfdir_chat_template(h3), pa_mkmodel_chat_template);
  assert_string_equal(pa_hfdir_bos_token(h3), "<|im_start|>");
  assert_string_equal(pa_hfdir_eos_token(h3), "<|im_end|>");
  pa_hfdir_close(h1);
  pa_hfdir_close(h3);
}

static void test_overwrite(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  char p[600], f[700];
  tu_path(p, sizeof p, "ow.gguf");
  assert_int_equal(pa_mkmodel_write_gguf(&o, p), 0);
  assert_int_equal(pa_mkmodel_write_gguf(&o, p), PA_EINVAL);
  expect_msg("already exists");
  o.force = true;
  assert_int_equal(pa_mkmodel_write_gguf(&o, p), 0);
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_tmp), PA_EINVAL);
  expect_msg("is a directory");

  o = pa_mkmodel_defaults();
  o.n_shards = 3;
  tu_path(p, sizeof p, "owdir");
  assert_int_equal(pa_mkmodel_write_hf(&o, p), 0);
  snprintf(f, sizeof f, "%s/README.md", p);
  FILE *fp = fopen(f, "w");
  fputs("mine\n", fp);
  fclose(fp);
  o.n_shards = 1;
  assert_int_equal(pa_mkmodel_write_hf(&o, p), PA_EINVAL);
  expect_msg("not empty");
  o.force = true;
  assert_int_equal(pa_mkmodel_write_hf(&o, p), 0);
  /* the old shards and index are gone (the loader would mix them in); other files stay */
  snprintf(f, sizeof f, "%s/model.safetensors.index.json", p);
  assert_false(exists(f));
  snprintf(f, sizeof f, "%s/model-00002-of-00003.safetensors", p);
  assert_false(exists(f));
  snprintf(f, sizeof f, "%s/README.md", p);
  assert_true(exists(f));
  pa_hfdir *h;
  assert_int_equal(pa_hfdir_open(p, &h), 0);
  assert_int_equal(pa_hfdir_n_shards(h), 1);
  pa_hfdir_close(h);

  o.force = false;
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(p, sizeof p, "ow.gguf")), PA_EINVAL);
  expect_msg("not a directory");
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(p, sizeof p, "no/such/parent")), PA_EIO);
  expect_msg("cannot create the directory");
}

/* tokenizer.json and the GGUF list the same tokens and merges; the golden
 * made by the tokenizers library agrees with this vocabulary. */
static void test_tokenizer_files(void **state) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  char gp[600], hp[600], p[700];
  assert_int_equal(pa_mkmodel_write_gguf(&o, tu_path(gp, sizeof gp, "tok.gguf")), 0);
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(hp, sizeof hp, "tok")), 0);
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(gp, &g), 0);
  const pa_gguf_kv *toks, *merges;
  assert_int_equal(pa_gguf_get_arr(g, "tokenizer.ggml.tokens", PA_GGUF_STRING, &toks), 0);
  assert_int_equal(pa_gguf_get_arr(g, "tokenizer.ggml.merges", PA_GGUF_STRING, &merges), 0);

  cJSON *tj;
  snprintf(p, sizeof p, "%s/tokenizer.json", hp);
  assert_int_equal(pa_json_load(p, &tj), 0);
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(tj, "model");
  assert_string_equal(cJSON_GetObjectItemCaseSensitive(model, "type")->valuestring, "BPE");
  assert_true(cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(model, "byte_fallback")));
  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
  assert_int_equal(cJSON_GetArraySize(vocab), toks->n);
  for (uint64_t i = 0; i < toks->n; i++) {
    char buf[256];
    snprintf(buf, sizeof buf, "%.*s", (int)toks->strs[i].len, toks->strs[i].ptr);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(vocab, buf);
    if (!cJSON_IsNumber(id) || id->valueint != (int)i)
      fail_msg("token %llu '%s' has another id in tokenizer.json", (unsigned long long)i, buf);
  }
  const cJSON *jm = cJSON_GetObjectItemCaseSensitive(model, "merges");
  assert_int_equal(cJSON_GetArraySize(jm), merges->n);
  uint64_t i = 0;
  for (const cJSON *m = jm->child; m; m = m->next, i++)
    assert_true(pa_str_eq(merges->strs[i], m->valuestring));
  const cJSON *added = cJSON_GetObjectItemCaseSensitive(tj, "added_tokens");
  assert_int_equal(cJSON_GetArraySize(added), 3);
  for (const cJSON *a = added->child; a; a = a->next) {
    int id = cJSON_GetObjectItemCaseSensitive(a, "id")->valueint;
    assert_true(pa_str_eq(toks->strs[id], cJSON_GetObjectItemCaseSensitive(a, "content")->valuestring));
    assert_true(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(a, "special")));
  }
  const cJSON *pre = cJSON_GetObjectItemCaseSensitive(tj, "pre_tokenizer");
  assert_string_equal(cJSON_GetObjectItemCaseSensitive(pre, "type")->valuestring, "Sequence");
  cJSON_Delete(tj);

  cJSON *golden;
  assert_int_equal(pa_json_load(PALIGN_TEST_DATA "/safetensors/mkmodel_encodings.json", &golden), 0);
  if ((uint64_t)cJSON_GetObjectItemCaseSensitive(golden, "vocab_size")->valueint != toks->n)
    fail_msg("mkmodel's default vocabulary changed: rerun tests/golden/make_safetensors_golden.py golden");
  i = 0;
  for (const cJSON *m = cJSON_GetObjectItemCaseSensitive(golden, "first_merges")->child; m; m = m->next, i++)
    assert_true(pa_str_eq(merges->strs[i], m->valuestring));
  /* every golden id is in range */
  for (const cJSON *e = cJSON_GetObjectItemCaseSensitive(golden, "encodings")->child; e; e = e->next)
    for (const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "ids")->child; id; id = id->next)
      assert_true(id->valueint >= 3 && (uint64_t)id->valueint < toks->n);
  cJSON_Delete(golden);
  pa_gguf_close(g);
}

/* ---- the command ------------------------------------------------------------------------------ */

static int run_cli(int n, ...) {
  char *argv[32];
  va_list ap;
  va_start(ap, n);
  argv[0] = "mkmodel";
  for (int i = 0; i < n; i++)
    argv[i + 1] = va_arg(ap, char *);
  va_end(ap);
  argv[n + 1] = NULL;
  return cmd_mkmodel(n + 1, argv);
}

static void test_cli(void **state) {
  char g[600], d[600];
  tu_path(g, sizeof g, "cli.gguf");
  tu_path(d, sizeof d, "cli_dir");
  assert_int_equal(run_cli(0), 2);
  assert_int_equal(run_cli(1, "--help"), 0);
  assert_int_equal(run_cli(2, g, "--bogus"), 2);
  assert_int_equal(run_cli(3, g, "--layers", "x"), 2);
  assert_int_equal(run_cli(3, g, "--layers", "0"), 2);
  assert_int_equal(run_cli(2, g, "--layers"), 2);
  assert_int_equal(run_cli(3, g, "--dtype", "f64"), 2);
  assert_int_equal(run_cli(3, g, "--format", "onnx"), 2);
  assert_int_equal(run_cli(3, g, "--seed", "-1"), 2);
  assert_int_equal(run_cli(3, g, "--heads", "3"), 2);  /* does not divide 64 */
  assert_int_equal(run_cli(3, g, "--shards", "2"), 2); /* gguf has one file */
  assert_int_equal(run_cli(2, g, d), 2);
  assert_false(exists(g));

  /* --seed is decimal or hex, never octal */
  char s8[600], s10[600];
  assert_int_equal(run_cli(3, tu_path(s8, sizeof s8, "seed_a.gguf"), "--seed", "010"), 0);
  assert_int_equal(run_cli(2, tu_path(s10, sizeof s10, "seed_b.gguf"), "--seed=0xa"), 0);
  assert_true(same_file(s8, s10));
  assert_int_equal(run_cli(3, g, "--seed", " 5"), 2);
  assert_int_equal(run_cli(3, g, "--seed", "0x"), 2);

  assert_int_equal(run_cli(6, g, "--dtype=bf16", "--layers", "1", "--seed", "0x10"), 0);
  assert_int_equal(run_cli(1, g), 1); /* exists */
  assert_int_equal(run_cli(2, g, "--force"), 0);
  pa_gguf *gg;
  assert_int_equal(pa_gguf_open(g, &gg), 0);
  assert_int_equal(pa_gguf_n_tensors(gg), 2 + 9 * 2);
  pa_gguf_close(gg);

  assert_int_equal(run_cli(8, d, "--untied", "--shards", "3", "--merges", "50", "--kv-heads", "4"), 0);
  pa_hfdir *h;
  assert_int_equal(pa_hfdir_open(d, &h), 0);
  assert_int_equal(pa_hfdir_n_shards(h), 3);
  assert_non_null(pa_hfdir_find_tensor(h, "lm_head.weight"));
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(pa_hfdir_config(h), "vocab_size")->valueint, 3 + 256 + 50);
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(pa_hfdir_config(h), "num_key_value_heads")->valueint, 4);
  pa_hfdir_close(h);
  assert_int_equal(run_cli(1, d), 1); /* not empty */

  /* --format overrides the name */
  char x[600];
  assert_int_equal(run_cli(3, tu_path(x, sizeof x, "named.gguf"), "--format", "safetensors"), 0);
  struct stat sb;
  assert_int_equal(stat(x, &sb), 0);
  assert_true(S_ISDIR(sb.st_mode));
  assert_int_equal(run_cli(3, tu_path(x, sizeof x, "plain"), "--format", "gguf"), 0);
  assert_int_equal(stat(x, &sb), 0);
  assert_true(S_ISREG(sb.st_mode));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_validate),        cmocka_unit_test(test_bpe),
      cmocka_unit_test(test_determinism),     cmocka_unit_test(test_gguf_metadata),
      cmocka_unit_test(test_qk_permutation),  cmocka_unit_test(test_formats_agree),
      cmocka_unit_test(test_sharded),         cmocka_unit_test(test_overwrite),
      cmocka_unit_test(test_tokenizer_files), cmocka_unit_test(test_cli),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
