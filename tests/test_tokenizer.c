/* The tokenizer on small committed tokenizers, against ids computed by
 * independent implementations (tests/golden/make_tokenizer_golden.py: Hugging
 * Face `tokenizers` for tokenizer.json, llama.cpp for GGUF), plus every kind
 * of malformed input, each of which must give a clear error naming the file
 * and never a crash. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cJSON.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"
#include "jsonfile.h"
#include "hfdir.h"
#include "status.h"
#include "testutil.h"
#include "tokenizer.h"

#define GOLDEN PALIGN_TEST_DATA "/tokenizer/"

static const char *tmp(const char *name) {
  static char p[4][300];
  static int k;
  k = (k + 1) % 4;
  tu_path(p[k], sizeof p[k], name);
  return p[k];
}

/* ---- golden cases ------------------------------------------------------- */

typedef struct {
  unsigned flags;
  char *text;
  size_t len;
  int32_t *ids;
  size_t n;
} gcase;

/* FLAGS HEXTEXT N ids... per line (make_tokenizer_golden.py). */
static size_t load_cases(const char *path, gcase **out) {
  FILE *f = fopen(path, "r");
  if (!f)
    fail_msg("cannot open %s", path);
  char *line = NULL;
  size_t cap = 0, n = 0;
  gcase *cs = NULL;
  while (getline(&line, &cap, f) > 0) {
    if (line[0] == '#')
      continue;
    cs = realloc(cs, (n + 1) * sizeof *cs);
    gcase *c = &cs[n++];
    char *save, *tok = strtok_r(line, " \n", &save);
    c->flags = (unsigned)atoi(tok);
    tok = strtok_r(NULL, " \n", &save);
    c->text = malloc(strlen(tok) / 2 + 1);
    c->len = tu_unhex(tok, c->text);
    c->text[c->len] = '\0';
    c->n = (size_t)atol(strtok_r(NULL, " \n", &save));
    c->ids = malloc((c->n + 1) * sizeof *c->ids);
    for (size_t i = 0; i < c->n; i++)
      c->ids[i] = atoi(strtok_r(NULL, " \n", &save));
  }
  free(line);
  fclose(f);
  *out = cs;
  return n;
}

static void free_cases(gcase *cs, size_t n) {
  for (size_t i = 0; i < n; i++) {
    free(cs[i].text);
    free(cs[i].ids);
  }
  free(cs);
}

static void expect_ids(const pa_tokenizer *t, const char *text, size_t len, unsigned flags, const int32_t *want,
                       size_t n_want, const char *what) {
  int32_t *ids;
  size_t n;
  int rc = pa_tokenizer_encode(t, text, len, flags, &ids, &n);
  if (rc)
    fail_msg("%s: %s", what, pa_errmsg());
  bool same = n == n_want && (n == 0 || memcmp(ids, want, n * sizeof *ids) == 0);
  if (!same) {
    fprintf(stderr, "%s: flags %u text '%.*s'\n  want", what, flags, (int)len, text);
    for (size_t i = 0; i < n_want; i++)
      fprintf(stderr, " %d", want[i]);
    fprintf(stderr, "\n  got ");
    for (size_t i = 0; i < n; i++)
      fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "\n");
  }
  free(ids);
  assert_true(same);
}

static void expect_roundtrip(const pa_tokenizer *t, const char *text, size_t len, unsigned enc_flags,
                             unsigned dec_flags) {
  int32_t *ids;
  size_t n, back_len;
  char *back;
  assert_int_equal(pa_tokenizer_encode(t, text, len, enc_flags, &ids, &n), PA_OK);
  assert_int_equal(pa_tokenizer_decode(t, ids, n, dec_flags, &back, &back_len), PA_OK);
  if (back_len != len || memcmp(back, text, len) != 0)
    fail_msg("decode(encode('%.*s')) = '%.*s'", (int)len, text, (int)back_len, back);
  assert_int_equal(back[back_len], '\0');
  free(back);
  free(ids);
}

/* Every golden case; round trips for the plain-text cases (flags 0), except
 * texts that start with a space when `skip_space_roundtrip` (Metaspace
 * "first"/"always" adds no prefix then, so the prefix is not recoverable),
 * and, for SentencePiece-style tokenizers, texts holding "▁" itself (it
 * decodes to a space, as in SentencePiece). */
static void check_golden(const pa_tokenizer *t, const char *golden, unsigned dec_flags, bool skip_space_roundtrip) {
  gcase *cs;
  size_t n = load_cases(golden, &cs);
  assert_true(n > 50);
  for (size_t i = 0; i < n; i++) {
    expect_ids(t, cs[i].text, cs[i].len, cs[i].flags, cs[i].ids, cs[i].n, golden);
    bool meta = pa_tokenizer_model_kind(t) != PA_TOK_BYTE_BPE && strstr(cs[i].text, "\xE2\x96\x81");
    if (cs[i].flags == 0 && !(skip_space_roundtrip && cs[i].text[0] == ' ') && !meta)
      expect_roundtrip(t, cs[i].text, cs[i].len, 0, dec_flags);
  }
  free_cases(cs, n);
}

static pa_tokenizer *load_gguf(const char *path) {
  pa_gguf *g;
  pa_tokenizer *t;
  if (pa_gguf_open(path, &g))
    fail_msg("%s", pa_errmsg());
  if (pa_tokenizer_from_gguf(g, &t))
    fail_msg("%s", pa_errmsg());
  pa_gguf_close(g); /* the tokenizer keeps its own copy */
  return t;
}

static pa_tokenizer *load_json(const char *path, const char *config) {
  pa_tokenizer *t;
  if (pa_tokenizer_from_json(path, config, &t))
    fail_msg("%s", pa_errmsg());
  return t;
}

static void test_tiny_spm_gguf(void **s) {
  (void)s;
  pa_tokenizer *t = load_gguf(GOLDEN "tiny_spm.tok-gguf");
  assert_int_equal(pa_tokenizer_model_kind(t), PA_TOK_SPM);
  check_golden(t, GOLDEN "tiny_spm_gguf.txt", PA_TOK_DECODE_STRIP_SPACE, false);
  pa_tokenizer_destroy(t);
}

static void test_tiny_spm_json(void **s) {
  (void)s;
  pa_tokenizer *t = load_json(GOLDEN "tiny_spm.json", GOLDEN "tiny_spm_config.json");
  assert_int_equal(pa_tokenizer_model_kind(t), PA_TOK_BPE);
  check_golden(t, GOLDEN "tiny_spm_json.txt", PA_TOK_DECODE_STRIP_SPACE, false);
  pa_tokenizer_destroy(t);
}

static void test_tiny_mistral_json(void **s) {
  (void)s;
  pa_tokenizer *t = load_json(GOLDEN "tiny_mistral.json", NULL);
  check_golden(t, GOLDEN "tiny_mistral_json.txt", PA_TOK_DECODE_STRIP_SPACE, true);
  pa_tokenizer_destroy(t);
}

static void test_tiny_bl_gguf(void **s) {
  (void)s;
  pa_tokenizer *t = load_gguf(GOLDEN "tiny_bl.tok-gguf");
  assert_int_equal(pa_tokenizer_model_kind(t), PA_TOK_BYTE_BPE);
  check_golden(t, GOLDEN "tiny_bl_gguf.txt", 0, false);
  pa_tokenizer_destroy(t);
}

static void test_tiny_bl_json(void **s) {
  (void)s;
  pa_tokenizer *t = load_json(GOLDEN "tiny_bl.json", NULL);
  check_golden(t, GOLDEN "tiny_bl_json.txt", 0, false);
  /* with special tokens parsed and shown, byte-level text comes back whole */
  const char *x = "<|begin_of_text|>hi<|eot_id|> there";
  expect_roundtrip(t, x, strlen(x), PA_TOK_PARSE_SPECIAL, PA_TOK_DECODE_SPECIAL);
  pa_tokenizer_destroy(t);
}

/* variants.json: a base tokenizer.json with keys replaced, and the ids the
 * `tokenizers` library gives for each text. */
static void test_variants(void **s) {
  (void)s;
  cJSON *root;
  if (pa_json_load(GOLDEN "variants.json", &root))
    fail_msg("%s", pa_errmsg());
  const cJSON *v;
  int n_variants = 0;
  cJSON_ArrayForEach(v, cJSON_GetObjectItem(root, "variants")) {
    const char *name = cJSON_GetObjectItem(v, "name")->valuestring;
    char base[256];
    snprintf(base, sizeof base, GOLDEN "%s.json", cJSON_GetObjectItem(v, "base")->valuestring);
    cJSON *tj;
    assert_int_equal(pa_json_load(base, &tj), PA_OK);
    const cJSON *kv;
    cJSON_ArrayForEach(kv, cJSON_GetObjectItem(v, "patch")) {
      cJSON_ReplaceItemInObject(tj, kv->string, cJSON_Duplicate(kv, 1));
    }
    cJSON *model = cJSON_GetObjectItem(tj, "model");
    cJSON_ArrayForEach(kv, cJSON_GetObjectItem(v, "model_patch")) {
      cJSON_ReplaceItemInObject(model, kv->string, cJSON_Duplicate(kv, 1));
    }
    char *text = cJSON_PrintUnformatted(tj);
    tu_write_text(tmp("t.json"), text);
    free(text);
    cJSON_Delete(tj);
    pa_tokenizer *t;
    if (pa_tokenizer_from_json(tmp("t.json"), NULL, &t))
      fail_msg("variant %s: %s", name, pa_errmsg());
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(v, "cases")) {
      unsigned flags = (unsigned)cJSON_GetArrayItem(c, 0)->valueint;
      const char *x = cJSON_GetArrayItem(c, 1)->valuestring;
      const cJSON *ids = cJSON_GetArrayItem(c, 2);
      size_t n = (size_t)cJSON_GetArraySize(ids);
      int32_t *want = malloc((n + 1) * sizeof *want);
      for (size_t i = 0; i < n; i++)
        want[i] = cJSON_GetArrayItem(ids, (int)i)->valueint;
      expect_ids(t, x, strlen(x), flags, want, n, name);
      free(want);
    }
    pa_tokenizer_destroy(t);
    n_variants++;
  }
  assert_true(n_variants >= 10);
  cJSON_Delete(root);
}

static void test_accessors(void **s) {
  (void)s;
  pa_tokenizer *t = load_json(GOLDEN "tiny_spm.json", GOLDEN "tiny_spm_config.json");
  assert_int_equal(pa_tokenizer_unk(t), 0);
  assert_int_equal(pa_tokenizer_bos(t), 1);
  assert_int_equal(pa_tokenizer_eos(t), 2);
  assert_int_equal(pa_tokenizer_pad(t), -1);
  assert_int_equal(pa_tokenizer_eot(t), -1);
  assert_true(pa_tokenizer_add_bos(t));
  assert_false(pa_tokenizer_add_eos(t));
  assert_int_equal(pa_tokenizer_find(t, "<s>"), 1);
  assert_int_equal(pa_tokenizer_find(t, "no such token"), -1);
  assert_true(pa_tokenizer_is_special(t, 1));
  assert_true(pa_tokenizer_is_special(t, 0));
  int32_t nl = pa_tokenizer_find(t, "<0x0A>");
  assert_true(nl > 2);
  assert_int_equal(pa_tokenizer_token_type(t, nl), PA_TOKEN_BYTE);
  assert_false(pa_tokenizer_is_special(t, nl));
  size_t len;
  const char *b = pa_tokenizer_token_bytes(t, nl, &len);
  assert_int_equal(len, 1);
  assert_int_equal(b[0], '\n');
  const char *p = pa_tokenizer_piece(t, nl, &len);
  assert_int_equal(len, 6);
  assert_memory_equal(p, "<0x0A>", 6);
  int32_t meta = pa_tokenizer_find(t, "\xE2\x96\x81");
  assert_true(meta > 0);
  b = pa_tokenizer_token_bytes(t, meta, &len);
  assert_int_equal(len, 1);
  assert_int_equal(b[0], ' ');
  int32_t n = pa_tokenizer_n_vocab(t);
  assert_null(pa_tokenizer_piece(t, n, &len));
  assert_null(pa_tokenizer_piece(t, -1, &len));
  assert_null(pa_tokenizer_token_bytes(t, n, &len));
  assert_int_equal(pa_tokenizer_token_type(t, n), PA_TOKEN_UNDEFINED);
  assert_non_null(strstr(pa_tokenizer_describe(t), "tokenizer.json"));
  /* decoding: special tokens only on request, bad ids refused */
  int32_t ids[] = {1, meta, nl, 2};
  char *text;
  assert_int_equal(pa_tokenizer_decode(t, ids, 4, 0, &text, &len), PA_OK);
  assert_string_equal(text, " \n");
  free(text);
  assert_int_equal(pa_tokenizer_decode(t, ids, 4, PA_TOK_DECODE_SPECIAL | PA_TOK_DECODE_STRIP_SPACE, &text, &len),
                   PA_OK);
  assert_string_equal(text, "<s> \n</s>");
  free(text);
  int32_t bad[] = {1, n};
  assert_int_equal(pa_tokenizer_decode(t, bad, 2, 0, &text, &len), PA_EINVAL);
  assert_null(text);
  assert_non_null(strstr(pa_errmsg(), "outside the vocabulary"));
  assert_int_equal(pa_tokenizer_decode(t, ids, 0, 0, &text, &len), PA_OK);
  assert_int_equal(len, 0);
  assert_string_equal(text, "");
  free(text);
  pa_tokenizer_destroy(t);

  t = load_gguf(GOLDEN "tiny_bl.tok-gguf");
  assert_int_equal(pa_tokenizer_bos(t), pa_tokenizer_find(t, "<|begin_of_text|>"));
  assert_int_equal(pa_tokenizer_eot(t), pa_tokenizer_find(t, "<|eot_id|>")); /* found by its name */
  assert_true(pa_tokenizer_add_bos(t));
  assert_non_null(strstr(pa_tokenizer_describe(t), "llama-bpe"));
  int32_t sp = pa_tokenizer_find(t, "\xC4\xA0"); /* "Ġ", GPT-2's space */
  assert_true(sp >= 0);
  b = pa_tokenizer_token_bytes(t, sp, &len);
  assert_int_equal(len, 1);
  assert_int_equal(b[0], ' ');
  pa_tokenizer_destroy(t);
  pa_tokenizer_destroy(NULL);
}

/* Invalid UTF-8: each bad byte is a piece of its own and becomes its byte
 * token, so the bytes come back unchanged. */
static void test_invalid_utf8(void **s) {
  (void)s;
  static const char x[] = "ok \xff\xfe mid\xc3 (\xc3\x28) \xed\xa0\x80 surrogate \xf4\x90\x80\x80 end\x80";
  const char *files[][2] = {{GOLDEN "tiny_bl.json", NULL}, {GOLDEN "tiny_spm.json", NULL}};
  for (int i = 0; i < 2; i++) {
    pa_tokenizer *t = load_json(files[i][0], files[i][1]);
    expect_roundtrip(t, x, sizeof x - 1, 0, PA_TOK_DECODE_STRIP_SPACE);
    expect_roundtrip(t, x, sizeof x - 1, PA_TOK_PARSE_SPECIAL, PA_TOK_DECODE_STRIP_SPACE);
    /* NULs are bytes like any other */
    expect_roundtrip(t, "a\0b", 3, 0, PA_TOK_DECODE_STRIP_SPACE);
    pa_tokenizer_destroy(t);
  }
  pa_tokenizer *t = load_gguf(GOLDEN "tiny_spm.tok-gguf");
  expect_roundtrip(t, x, sizeof x - 1, 0, PA_TOK_DECODE_STRIP_SPACE);
  pa_tokenizer_destroy(t);
}

/* Long runs take the heap path of BPE and long regex matches; they must
 * stay fast and exact. */
static void test_long_runs(void **s) {
  (void)s;
  pa_tokenizer *t = load_gguf(GOLDEN "tiny_bl.tok-gguf");
  size_t n = 200000;
  char *x = malloc(n + 1);
  for (size_t i = 0; i < n; i++)
    x[i] = i < n / 2 ? 'a' : i < n - 10 ? ' ' : "hello\n\n\n x"[i - (n - 10)];
  x[n] = '\0';
  clock_t c0 = clock();
  expect_roundtrip(t, x, n, 0, 0);
  double secs = (double)(clock() - c0) / CLOCKS_PER_SEC;
  assert_true(secs < 5.0);
  free(x);
  pa_tokenizer_destroy(t);
}

/* ---- building by hand ----------------------------------------------------- */

static pa_tokenizer *tiny_built(pa_tokenizer_opts *o) {
  pa_tokenizer *t;
  assert_int_equal(pa_tokenizer_build_new(PA_TOK_BPE, "built", &t), PA_OK);
  const char *toks[] = {"<unk>", "a", "b", "ab", "<m>", "c"};
  for (int i = 0; i < 6; i++)
    assert_int_equal(
        pa_tokenizer_build_token(t, toks[i], strlen(toks[i]), 0, i == 0 ? PA_TOKEN_UNKNOWN : PA_TOKEN_NORMAL), PA_OK);
  assert_int_equal(pa_tokenizer_build_merge(t, "a", 1, "b", 1), PA_OK);
  assert_int_equal(pa_tokenizer_build_added(t, 4, false, true, true), PA_OK);
  assert_int_equal(pa_tokenizer_build_finish(t, o), PA_OK);
  return t;
}

static void test_builder(void **s) {
  (void)s;
  pa_tokenizer_opts o = {.bos = -1, .eos = -1, .unk = 0, .pad = -1, .eot = -1, .fuse_unk = true};
  pa_tokenizer *t = tiny_built(&o);
  /* user-defined added tokens match without PA_TOK_PARSE_SPECIAL and
   * swallow the whitespace around them (lstrip, rstrip); unknown
   * characters fuse into one <unk> */
  const int32_t want[] = {3, 4, 5, 0, 1};
  const char *x = "ab \t<m>\n c\xc3\xa9zza";
  expect_ids(t, x, strlen(x), 0, want, 5, "built");
  pa_tokenizer_destroy(t);

  pa_tokenizer *u;
  assert_int_equal(pa_tokenizer_build_new(PA_TOK_BPE, "built", &u), PA_OK);
  assert_int_equal(pa_tokenizer_build_finish(u, &o), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), "built: the vocabulary is empty"));
  pa_tokenizer_destroy(u);

  assert_int_equal(pa_tokenizer_build_new(PA_TOK_BYTE_BPE, "built", &u), PA_OK);
  assert_int_equal(pa_tokenizer_build_token(u, "a", 1, 0, (pa_token_type)9), PA_EFORMAT);
  assert_int_equal(pa_tokenizer_build_added(u, 3, true, false, false), PA_EFORMAT);
  assert_int_equal(pa_tokenizer_build_split(u, "(unclosed", PA_SPLIT_ISOLATED, false), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), "does not compile"));
  assert_int_equal(pa_tokenizer_build_replace(u, "", "x"), PA_EFORMAT);
  assert_int_equal(pa_tokenizer_build_token(u, "a", 1, 0, PA_TOKEN_NORMAL), PA_OK);
  pa_tokenizer_opts bad = o;
  bad.unk = -1;
  assert_int_equal(pa_tokenizer_build_finish(u, &bad), PA_EFORMAT); /* byte-level without merges */
  assert_non_null(strstr(pa_errmsg(), "without merges"));
  pa_tokenizer_destroy(u);

  assert_int_equal(pa_tokenizer_build_new(PA_TOK_BPE, "built", &u), PA_OK);
  assert_int_equal(pa_tokenizer_build_token(u, "a", 1, 0, PA_TOKEN_NORMAL), PA_OK);
  bad.bos = 5;
  assert_int_equal(pa_tokenizer_build_finish(u, &bad), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), "BOS token id 5"));
  pa_tokenizer_destroy(u);

  assert_int_equal(pa_tokenizer_build_new(PA_TOK_BPE, "built", &u), PA_OK);
  assert_int_equal(pa_tokenizer_build_token(u, "a", 1, 0, PA_TOKEN_NORMAL), PA_OK);
  bad.bos = -1;
  bad.add_bos = true;
  assert_int_equal(pa_tokenizer_build_finish(u, &bad), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), "no BOS token"));
  pa_tokenizer_destroy(u);
}

/* ---- malformed tokenizer.json --------------------------------------------- */

typedef struct {
  const char *json;
  int rc;
  const char *msg;
} bad_json;

#define V3 "\"vocab\":{\"a\":0,\"b\":1,\"ab\":2}"

static const bad_json bad_jsons[] = {
    {"{\"model\": ", PA_EFORMAT, "not valid JSON"},
    {"[1,2]", PA_EFORMAT, "not a JSON object"},
    {"{}", PA_EFORMAT, "\"model\" is missing"},
    {"{\"model\":{\"type\":\"Unigram\"," V3 "}}", PA_EUNSUPPORTED, "model type 'Unigram'"},
    {"{\"model\":{\"type\":\"BPE\"," V3 "}}", PA_EFORMAT, "model.merges is missing"},
    {"{\"model\":{\"type\":\"BPE\",\"merges\":[]}}", PA_EFORMAT, "model.vocab is missing"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{},\"merges\":[]}}", PA_EFORMAT, "model.vocab is empty"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[\"a c\"]}}", PA_EFORMAT, "is not a token"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[\"b a\"]}}", PA_EFORMAT, "joined result is not a token"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[\"ab\"]}}", PA_EFORMAT, "merges[0] 'ab' is not two tokens"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[\"a b c\"]}}", PA_EFORMAT, "not two tokens"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[[\"a\"]]}}", PA_EFORMAT, "neither"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[[\"a\",\"x\"]]}}", PA_EFORMAT, "right part is not a token"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":{}}}", PA_EFORMAT, "model.merges is not a list"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]}}", PA_EFORMAT,
     "model.vocab['a'] = -1 is not an id"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":1.5},\"merges\":[]}}", PA_EFORMAT, "model.vocab['a'] = 1.5"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":\"0\"},\"merges\":[]}}", PA_EFORMAT, "not a number"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":1e12},\"merges\":[]}}", PA_EFORMAT,
     "model.vocab['a'] = 1000000000000"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":0},\"merges\":[]}}", PA_EFORMAT,
     "gives the id 0 to both 'a' and 'b'"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"a\":1},\"merges\":[]}}", PA_EFORMAT,
     "tokens 0 and 1 are both 'a'"},
    {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":2},\"merges\":[]}}", PA_EFORMAT, "no token has the id 1"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]},\"added_tokens\":[{\"id\":1,\"content\":\"<x>\"}]}",
     PA_EFORMAT, "added token 1 is '<x>' but model.vocab has 'b'"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]},\"added_tokens\":[{\"id\":3}]}", PA_EFORMAT,
     "added token 3 has no content"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]},\"added_tokens\":[{\"content\":\"x\"}]}", PA_EFORMAT,
     "added_tokens[0] has the id missing"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]},\"added_tokens\":[{\"id\":3,\"content\":\"x\"},{\"id\":3,"
     "\"content\":\"x\"}]}",
     PA_EFORMAT, "lists the id 3 twice"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]},\"added_tokens\":[{\"id\":3,\"content\":\"x\",\"single_word\":"
     "true}]}",
     PA_EUNSUPPORTED, "single_word"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[],\"dropout\":0.1}}", PA_EUNSUPPORTED, "dropout"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[],\"continuing_subword_prefix\":\"##\"}}", PA_EUNSUPPORTED,
     "continuing_subword_prefix"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[],\"unk_token\":\"<unk>\"}}", PA_EFORMAT,
     "model.unk_token '<unk>' is not in the vocabulary"},
    {"{\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[],\"byte_fallback\":1}}", PA_EFORMAT,
     "model.byte_fallback should be true or false"},
    {"{\"normalizer\":{\"type\":\"NFKC\"},\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}", PA_EUNSUPPORTED,
     "normalizer 'NFKC'"},
    {"{\"normalizer\":{\"type\":\"Replace\",\"pattern\":{\"Regex\":\"x\"},\"content\":\"y\"},\"model\":{\"type\":"
     "\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EUNSUPPORTED, "regex pattern"},
    {"{\"pre_tokenizer\":{\"type\":\"Whitespace\"},\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}", PA_EUNSUPPORTED,
     "pre_tokenizer 'Whitespace'"},
    {"{\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(x\"},\"behavior\":\"Isolated\"},\"model\":{"
     "\"type\":\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EFORMAT, "does not compile"},
    {"{\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"x\"},\"behavior\":\"Sideways\"},\"model\":{"
     "\"type\":\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EFORMAT, "Split needs"},
    {"{\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Digits\"},{\"type\":\"Metaspace\","
     "\"replacement\":\"\xE2\x96\x81\"}]},\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EUNSUPPORTED, "Metaspace after another"},
    {"{\"pre_tokenizer\":{\"type\":\"Metaspace\",\"replacement\":\"_\"},\"model\":{\"type\":\"BPE\"," V3
     ",\"merges\":[]}}",
     PA_EUNSUPPORTED, "replacement other than U+2581"},
    {"{\"pre_tokenizer\":{\"type\":\"Metaspace\",\"replacement\":\"\xE2\x96\x81\",\"prepend_scheme\":\"sometimes\"},"
     "\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EFORMAT, "prepend_scheme 'sometimes'"},
    {"{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}", PA_EFORMAT,
     "byte-level BPE tokenizer without merges"},
    {"{\"post_processor\":{\"type\":\"RobertaProcessing\"},\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EUNSUPPORTED, "post_processor 'RobertaProcessing'"},
    {"{\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\"}}]},"
     "\"model\":{\"type\":\"BPE\"," V3 ",\"merges\":[]}}",
     PA_EFORMAT, "adds the token '<s>'"},
};

static void test_bad_json(void **s) {
  (void)s;
  const char *path = tmp("t.json");
  for (size_t i = 0; i < sizeof bad_jsons / sizeof bad_jsons[0]; i++) {
    tu_write_text(path, bad_jsons[i].json);
    pa_tokenizer *t = (pa_tokenizer *)&t; /* must be reset to NULL */
    pa_error_clear();
    int rc = pa_tokenizer_from_json(path, NULL, &t);
    if (rc != bad_jsons[i].rc || !strstr(pa_errmsg(), bad_jsons[i].msg) || !strstr(pa_errmsg(), path))
      fail_msg("case %zu: rc %d, message '%s'; want rc %d and '%s'", i, rc, pa_errmsg(), bad_jsons[i].rc,
               bad_jsons[i].msg);
    assert_null(t);
  }
  pa_tokenizer *t;
  assert_int_equal(pa_tokenizer_from_json(tmp("missing.json"), NULL, &t), PA_ENOTFOUND);
  assert_non_null(strstr(pa_errmsg(), "missing.json"));
  assert_null(t);
}

static void test_bad_config(void **s) {
  (void)s;
  const char *path = tmp("c.json");
  struct {
    const char *json, *msg;
  } cases[] = {
      {"{\"bos_token\": \"<nope>\"}", "bos_token '<nope>' is not a token"},
      {"{\"eos_token\": {\"content\": \"<nope>\"}}", "eos_token '<nope>' is not a token"},
      {"{\"pad_token\": 5}", "pad_token is neither a string"},
      {"{\"unk_token\": \"<nope>\"}", "unk_token '<nope>' is not a token"},
      {"{\"add_bos_token\": \"yes\"}", "add_bos_token should be true or false"},
      {"{\"add_eos_token\": true}", "EOS is to be added but there is no EOS token"},
      {"[]", "not a JSON object"},
      {"{", "not valid JSON"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tu_write_text(path, cases[i].json);
    pa_tokenizer *t;
    int rc = pa_tokenizer_from_json(GOLDEN "tiny_bl.json", path, &t);
    if (rc != PA_EFORMAT || !strstr(pa_errmsg(), cases[i].msg))
      fail_msg("config case %zu: rc %d, '%s'", i, rc, pa_errmsg());
    assert_null(t);
  }
  /* a null token and a good one are fine */
  tu_write_text(path, "{\"bos_token\": null, \"eos_token\": \"<|eot_id|>\", \"add_bos_token\": false}");
  pa_tokenizer *t = load_json(GOLDEN "tiny_bl.json", path);
  assert_int_equal(pa_tokenizer_eos(t), pa_tokenizer_find(t, "<|eot_id|>"));
  assert_false(pa_tokenizer_add_bos(t));
  pa_tokenizer_destroy(t);
  /* its unk_token is checked but is not what encoding writes for a piece
   * with no token: only tokenizer.json's model.unk_token is (Hugging Face) */
  tu_write_text(path, "{\"unk_token\": \"<|eot_id|>\"}");
  t = load_json(GOLDEN "tiny_bl.json", path);
  assert_int_equal(pa_tokenizer_unk(t), -1);
  pa_tokenizer_destroy(t);
}

/* ---- malformed GGUF tokenizers ---------------------------------------------- */

enum {
  G_NO_MODEL = 1,
  G_MODEL_BERT,
  G_NO_TOKENS,
  G_TOKENS_INT,
  G_NO_TOKENS_EMPTY,
  G_TYPES_SHORT,
  G_SCORES_SHORT,
  G_TYPE_9,
  G_NO_SCORES,
  G_SCORES_STR,
  G_BOS_RANGE,
  G_ADD_BOS_STR,
  G_GPT2_NO_MERGES,
  G_GPT2_MERGE_NOSPACE,
  G_GPT2_MERGE_UNKNOWN,
  G_GPT2_PRE_UNKNOWN,
  G_GPT2_PRE_INT,
  G_COUNT
};

/* GGUF files are written byte by byte here rather than with palign's own
 * writer, so these tests depend on nothing but the reader. */
typedef struct {
  uint8_t *p;
  size_t n, cap;
  uint64_t n_kv;
} gbuf;

static void gput(gbuf *b, const void *src, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 256;
    b->p = realloc(b->p, b->cap);
    assert_non_null(b->p);
  }
  if (n)
    memcpy(b->p + b->n, src, n);
  b->n += n;
}
static void gu32(gbuf *b, uint32_t v) { gput(b, &v, 4); }
static void gu64(gbuf *b, uint64_t v) { gput(b, &v, 8); }
static void gstr(gbuf *b, const char *s) {
  gu64(b, strlen(s));
  gput(b, s, strlen(s));
}
static void kv_head(gbuf *b, const char *key, uint32_t type) {
  gstr(b, key);
  gu32(b, type);
  b->n_kv++;
}
static void kv_str(gbuf *b, const char *key, const char *v) {
  kv_head(b, key, PA_GGUF_STRING);
  gstr(b, v);
}
static void kv_u32(gbuf *b, const char *key, uint32_t v) {
  kv_head(b, key, PA_GGUF_UINT32);
  gu32(b, v);
}
static void kv_arr(gbuf *b, const char *key, uint32_t elem, const void *v, size_t n) {
  kv_head(b, key, PA_GGUF_ARRAY);
  gu32(b, elem);
  gu64(b, n);
  for (size_t i = 0; i < n; i++) {
    if (elem == PA_GGUF_STRING)
      gstr(b, ((const char *const *)v)[i]);
    else
      gput(b, (const char *)v + 4 * i, 4);
  }
}

static void write_bad_gguf(const char *path, int which) {
  gbuf kv = {0};
  bool gpt2 = which >= G_GPT2_NO_MERGES;
  const char *spm[] = {"<unk>", "<s>", "</s>", "a", "b", "ab", "\xE2\x96\x81"};
  const char *bl[] = {"a", "b", "ab", "\xC4\xA0"};
  const char *const *toks = gpt2 ? bl : spm;
  size_t n = gpt2 ? 4 : 7;
  float scores[7] = {0, 0, 0, -1, -2, -3, -4};
  int32_t types[7] = {2, 3, 3, 1, 1, 1, 1};
  if (gpt2)
    types[0] = types[1] = types[2] = 1;
  if (which == G_TYPE_9)
    types[4] = 9;
  if (which != G_NO_MODEL)
    kv_str(&kv, "tokenizer.ggml.model", which == G_MODEL_BERT ? "bert" : gpt2 ? "gpt2" : "llama");
  if (which == G_TOKENS_INT)
    kv_arr(&kv, "tokenizer.ggml.tokens", PA_GGUF_INT32, types, n);
  else if (which == G_NO_TOKENS_EMPTY)
    kv_arr(&kv, "tokenizer.ggml.tokens", PA_GGUF_STRING, toks, 0);
  else if (which != G_NO_TOKENS)
    kv_arr(&kv, "tokenizer.ggml.tokens", PA_GGUF_STRING, toks, n);
  kv_arr(&kv, "tokenizer.ggml.token_type", PA_GGUF_INT32, types, which == G_TYPES_SHORT ? n - 1 : n);
  if (which == G_SCORES_STR)
    kv_arr(&kv, "tokenizer.ggml.scores", PA_GGUF_STRING, toks, n);
  else if (which != G_NO_SCORES && !gpt2)
    kv_arr(&kv, "tokenizer.ggml.scores", PA_GGUF_FLOAT32, scores, which == G_SCORES_SHORT ? n - 2 : n);
  if (which == G_BOS_RANGE)
    kv_u32(&kv, "tokenizer.ggml.bos_token_id", 7);
  if (which == G_ADD_BOS_STR)
    kv_str(&kv, "tokenizer.ggml.add_bos_token", "true");
  if (gpt2) {
    const char *m[] = {which == G_GPT2_MERGE_NOSPACE ? "ab" : which == G_GPT2_MERGE_UNKNOWN ? "a c" : "a b"};
    if (which != G_GPT2_NO_MERGES)
      kv_arr(&kv, "tokenizer.ggml.merges", PA_GGUF_STRING, m, 1);
    if (which == G_GPT2_PRE_UNKNOWN)
      kv_str(&kv, "tokenizer.ggml.pre", "martian");
    if (which == G_GPT2_PRE_INT)
      kv_u32(&kv, "tokenizer.ggml.pre", 3);
  }
  gbuf f = {0};
  gput(&f, "GGUF", 4);
  gu32(&f, 3);
  gu64(&f, 0); /* tensors */
  gu64(&f, kv.n_kv);
  gput(&f, kv.p, kv.n);
  while (f.n % PA_GGUF_DEFAULT_ALIGNMENT)
    gput(&f, "", 1);
  FILE *out = fopen(path, "wb");
  assert_non_null(out);
  assert_int_equal(fwrite(f.p, 1, f.n, out), f.n);
  fclose(out);
  free(kv.p);
  free(f.p);
}

static void test_bad_gguf(void **s) {
  (void)s;
  static const struct {
    int which, rc;
    const char *msg;
  } cases[] = {
      {G_NO_MODEL, PA_ENOTFOUND, "'tokenizer.ggml.model' is missing"},
      {G_MODEL_BERT, PA_EUNSUPPORTED, "tokenizer.ggml.model 'bert' is not supported"},
      {G_NO_TOKENS, PA_ENOTFOUND, "'tokenizer.ggml.tokens' is missing"},
      {G_TOKENS_INT, PA_EFORMAT, "'tokenizer.ggml.tokens' should be an array of"},
      {G_NO_TOKENS_EMPTY, PA_EFORMAT, "tokenizer.ggml.tokens is empty"},
      {G_TYPES_SHORT, PA_EFORMAT, "tokenizer.ggml.token_type has 6 entries but tokenizer.ggml.tokens has 7"},
      {G_SCORES_SHORT, PA_EFORMAT, "tokenizer.ggml.scores has 5 entries"},
      {G_TYPE_9, PA_EFORMAT, "token_type[4] = 9 is not a token type"},
      {G_NO_SCORES, PA_ENOTFOUND, "'tokenizer.ggml.scores' is missing"},
      {G_SCORES_STR, PA_EFORMAT, "'tokenizer.ggml.scores' should be an array of"},
      {G_BOS_RANGE, PA_EFORMAT, "'tokenizer.ggml.bos_token_id' = 7 is outside the range 0..6"},
      {G_ADD_BOS_STR, PA_EFORMAT, "'tokenizer.ggml.add_bos_token' should be a bool"},
      {G_GPT2_NO_MERGES, PA_ENOTFOUND, "'tokenizer.ggml.merges' is missing"},
      {G_GPT2_MERGE_NOSPACE, PA_EFORMAT, "merges[0] 'ab' is not two tokens"},
      {G_GPT2_MERGE_UNKNOWN, PA_EFORMAT, "right part is not a token"},
      {G_GPT2_PRE_UNKNOWN, PA_EUNSUPPORTED, "tokenizer.ggml.pre 'martian'"},
      {G_GPT2_PRE_INT, PA_EFORMAT, "'tokenizer.ggml.pre' should be a string"},
  };
  const char *path = tmp("t.gguf");
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    write_bad_gguf(path, cases[i].which);
    pa_gguf *g;
    if (pa_gguf_open(path, &g))
      fail_msg("case %zu: %s", i, pa_errmsg());
    pa_tokenizer *t = (pa_tokenizer *)&t;
    pa_error_clear();
    int rc = pa_tokenizer_from_gguf(g, &t);
    if (rc != cases[i].rc || !strstr(pa_errmsg(), cases[i].msg) || !strstr(pa_errmsg(), path))
      fail_msg("case %zu: rc %d, message '%s'; want rc %d and '%s'", i, rc, pa_errmsg(), cases[i].rc, cases[i].msg);
    assert_null(t);
    pa_gguf_close(g);
  }
  /* the same file without the fault is a working tokenizer */
  write_bad_gguf(path, 0);
  pa_tokenizer *t = load_gguf(path);
  const int32_t want[] = {1, 6, 5, 6, 4}; /* <s> ▁ ab ▁ b: "▁a", "b▁" and "▁b" are no tokens */
  expect_ids(t, "ab b", 4, PA_TOK_ADD_SPECIAL, want, 5, "small SPM");
  pa_tokenizer_destroy(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tiny_spm_gguf),     cmocka_unit_test(test_tiny_spm_json),
      cmocka_unit_test(test_tiny_mistral_json), cmocka_unit_test(test_tiny_bl_gguf),
      cmocka_unit_test(test_tiny_bl_json),      cmocka_unit_test(test_variants),
      cmocka_unit_test(test_accessors),         cmocka_unit_test(test_invalid_utf8),
      cmocka_unit_test(test_long_runs),         cmocka_unit_test(test_builder),
      cmocka_unit_test(test_bad_json),          cmocka_unit_test(test_bad_config),
      cmocka_unit_test(test_bad_gguf),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
