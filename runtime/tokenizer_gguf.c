/* tokenizer_gguf.c: a pa_tokenizer from the tokenizer.ggml.* keys of a GGUF
 * file, with llama.cpp's meaning of each key (llama-vocab.cpp), since
 * llama.cpp is what writes and reads these files. */
#include "tokenizer.h"

#include "status.h"

#include <stdio.h>
#include <string.h>

/* The pre-tokenizer regexes of GGUF's tokenizer.ggml.pre names, as llama.cpp
 * applies them: each regex cuts every piece the previous one left. */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define RE_LLAMA3                                                                                                      \
  "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "              \
  "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_QWEN2                                                                                                       \
  "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "                   \
  "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

typedef struct {
  const char *names; /* space-separated aliases */
  const char *regex[4];
  bool ignore_merges, add_bos;
} pre_preset;

static const pre_preset presets[] = {
    {"gpt2 mpt olmo", {RE_GPT2}, false, false},
    /* individual digits first (Hugging Face's Digits(individual_digits)),
     * then GPT-2's regex on the rest */
    {"smollm starcoder refact codeshell", {"\\p{N}", RE_GPT2}, false, false},
    {"llama-bpe llama3 llama-v3", {RE_LLAMA3}, true, true},
    {"qwen2 stablelm2", {RE_QWEN2}, false, false},
    /* llama.cpp's fallback for files that name no pre-tokenizer */
    {"default", {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}, false, false},
};

static const pre_preset *find_preset(const char *name) {
  for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++) {
    const char *p = presets[i].names;
    size_t n = strlen(name);
    while (*p) {
      size_t k = strcspn(p, " ");
      if (k == n && strncmp(p, name, n) == 0)
        return &presets[i];
      p += k;
      p += *p == ' ';
    }
  }
  return NULL;
}

/* An optional id key: *id is left alone when the key is absent. */
static int opt_id(const pa_gguf *g, const char *key, int32_t n, int32_t *id, bool lenient) {
  const pa_gguf_kv *kv = pa_gguf_find(g, key);
  if (!kv)
    return PA_OK;
  int64_t v;
  int rc = pa_gguf_get_int(g, key, lenient ? INT64_MIN : 0, lenient ? INT64_MAX : n - 1, &v);
  if (rc)
    return rc;
  /* llama.cpp ignores a padding id outside the vocabulary (some converted
   * Llama-3 files have one); palign does not use padding to compute. */
  *id = v >= 0 && v < n ? (int32_t)v : -1;
  return PA_OK;
}

static int opt_bool(const pa_gguf *g, const char *key, bool *v) {
  return pa_gguf_find(g, key) ? pa_gguf_get_bool(g, key, v) : PA_OK;
}

static int build(const pa_gguf *g, pa_tokenizer **out) {
  const char *path = pa_gguf_path(g);
  pa_str model;
  int rc = pa_gguf_get_str(g, "tokenizer.ggml.model", &model);
  if (rc)
    return rc;
  pa_tokenizer_model kind;
  if (pa_str_eq(model, "gpt2"))
    kind = PA_TOK_BYTE_BPE;
  else if (pa_str_eq(model, "llama"))
    kind = PA_TOK_SPM;
  else
    return pa_error(PA_EUNSUPPORTED,
                    "%s: tokenizer.ggml.model '%.*s' is not supported (palign reads 'gpt2' and 'llama')", path,
                    (int)(model.len > 40 ? 40 : model.len), model.ptr);

  const pa_gguf_kv *tokens, *types = NULL, *scores = NULL, *merges = NULL;
  if ((rc = pa_gguf_get_arr(g, "tokenizer.ggml.tokens", PA_GGUF_STRING, &tokens)))
    return rc;
  if (tokens->n == 0)
    return pa_error(PA_EFORMAT, "%s: tokenizer.ggml.tokens is empty", path);
  if (tokens->n > (1u << 26))
    return pa_error(PA_EFORMAT, "%s: tokenizer.ggml.tokens has %llu entries, more than a vocabulary can", path,
                    (unsigned long long)tokens->n);
  int32_t n = (int32_t)tokens->n;
  if (pa_gguf_find(g, "tokenizer.ggml.token_type") &&
      (rc = pa_gguf_get_arr(g, "tokenizer.ggml.token_type", PA_GGUF_INT32, &types)))
    return rc;
  if ((kind == PA_TOK_SPM || pa_gguf_find(g, "tokenizer.ggml.scores")) &&
      (rc = pa_gguf_get_arr(g, "tokenizer.ggml.scores", PA_GGUF_FLOAT32, &scores)))
    return rc; /* SentencePiece merges by score: without scores there is no tokenizer */
  if (kind == PA_TOK_BYTE_BPE && (rc = pa_gguf_get_arr(g, "tokenizer.ggml.merges", PA_GGUF_STRING, &merges)))
    return rc;
  const struct {
    const char *key;
    const pa_gguf_kv *kv;
  } arrays[] = {{"tokenizer.ggml.token_type", types}, {"tokenizer.ggml.scores", scores}};
  for (size_t i = 0; i < 2; i++)
    if (arrays[i].kv && arrays[i].kv->n != tokens->n)
      return pa_error(PA_EFORMAT, "%s: %s has %llu entries but tokenizer.ggml.tokens has %llu", path, arrays[i].key,
                      (unsigned long long)arrays[i].kv->n, (unsigned long long)tokens->n);

  const pre_preset *pre = NULL;
  char pre_name[64] = "";
  if (kind == PA_TOK_BYTE_BPE) {
    pa_str p = {.ptr = "default", .len = 7};
    if (pa_gguf_find(g, "tokenizer.ggml.pre") && (rc = pa_gguf_get_str(g, "tokenizer.ggml.pre", &p)))
      return rc;
    snprintf(pre_name, sizeof pre_name, "%.*s", (int)(p.len > 60 ? 60 : p.len), p.ptr);
    pre = p.len < 60 ? find_preset(pre_name) : NULL;
    if (!pre)
      return pa_error(PA_EUNSUPPORTED,
                      "%s: tokenizer.ggml.pre '%s' is not a pre-tokenizer palign knows (it knows smollm, llama-bpe, "
                      "gpt2, qwen2, default and their aliases; see docs/TOKENIZER.md)",
                      path, pre_name);
  }

  if ((rc = pa_tokenizer_build_new(kind, path, out)))
    return rc;
  pa_tokenizer *t = *out;
  for (int32_t i = 0; i < n; i++) {
    int64_t ty = types ? pa_gguf_kv_int(types, (uint64_t)i) : PA_TOKEN_NORMAL;
    if (ty < PA_TOKEN_UNDEFINED || ty > PA_TOKEN_BYTE)
      return pa_error(PA_EFORMAT, "%s: tokenizer.ggml.token_type[%d] = %lld is not a token type (0..6)", path, i,
                      (long long)ty);
    float score = scores ? (float)pa_gguf_kv_float(scores, (uint64_t)i) : 0.0f;
    pa_str s = tokens->strs[i];
    if ((rc = pa_tokenizer_build_token(t, s.ptr, s.len, score, (pa_token_type)ty)))
      return rc;
  }
  for (uint64_t i = 0; merges && i < merges->n; i++) {
    pa_str m = merges->strs[i];
    /* split at the first space after the first character, as llama.cpp does */
    const char *sp = m.len > 1 ? memchr(m.ptr + 1, ' ', m.len - 1) : NULL;
    if (!sp)
      return pa_error(PA_EFORMAT, "%s: tokenizer.ggml.merges[%llu] '%.*s' is not two tokens separated by a space", path,
                      (unsigned long long)i, (int)(m.len > 60 ? 60 : m.len), m.ptr);
    size_t ll = (size_t)(sp - m.ptr);
    if ((rc = pa_tokenizer_build_merge(t, m.ptr, ll, sp + 1, m.len - ll - 1)))
      return rc;
  }

  pa_tokenizer_opts o = {.bos = -1, .eos = -1, .unk = -1, .pad = -1, .eot = -1};
  char describe[128];
  if (kind == PA_TOK_SPM) {
    /* SentencePiece's conventional ids, which llama.cpp assumes too */
    o.unk = n > 0 ? 0 : -1;
    o.bos = n > 1 ? 1 : -1;
    o.eos = n > 2 ? 2 : -1;
    o.add_bos = true;
    o.space_to_meta = true;
    o.prefix = PA_PREFIX_EACH;
    snprintf(describe, sizeof describe, "SentencePiece BPE (GGUF llama)");
  } else {
    for (int i = 0; i < 4 && pre->regex[i]; i++)
      if ((rc = pa_tokenizer_build_split(t, pre->regex[i], PA_SPLIT_ISOLATED, false)))
        return rc;
    o.ignore_merges = pre->ignore_merges;
    o.add_bos = pre->add_bos;
    o.drop_after_merges = true; /* as llama.cpp does */
    snprintf(describe, sizeof describe, "byte-level BPE (GGUF gpt2, pre-tokenizer %s)", pre_name);
  }
  bool add_space_prefix = o.prefix != PA_PREFIX_NONE;
  /* llama.cpp's byte-level BPE drops a byte with no token and never writes the
   * unknown id (checked, not used); its SentencePiece writes it */
  int32_t unused;
  if ((rc = opt_id(g, "tokenizer.ggml.bos_token_id", n, &o.bos, false)) ||
      (rc = opt_id(g, "tokenizer.ggml.eos_token_id", n, &o.eos, false)) ||
      (rc = opt_id(g, "tokenizer.ggml.unknown_token_id", n, kind == PA_TOK_SPM ? &o.unk : &unused, false)) ||
      (rc = opt_id(g, "tokenizer.ggml.padding_token_id", n, &o.pad, true)) ||
      (rc = opt_id(g, "tokenizer.ggml.eot_token_id", n, &o.eot, false)) ||
      (rc = opt_bool(g, "tokenizer.ggml.add_bos_token", &o.add_bos)) ||
      (rc = opt_bool(g, "tokenizer.ggml.add_eos_token", &o.add_eos)) ||
      (rc = opt_bool(g, "tokenizer.ggml.add_space_prefix", &add_space_prefix)))
    return rc;
  if (kind == PA_TOK_SPM) /* llama.cpp reads add_space_prefix for SentencePiece only */
    o.prefix = add_space_prefix ? PA_PREFIX_EACH : PA_PREFIX_NONE;
  o.describe = describe;
  return pa_tokenizer_build_finish(t, &o);
}

int pa_tokenizer_from_gguf(const pa_gguf *g, pa_tokenizer **out) {
  *out = NULL;
  pa_tokenizer *t = NULL;
  int rc = build(g, &t);
  if (rc) {
    pa_tokenizer_destroy(t);
    return rc;
  }
  *out = t;
  return PA_OK;
}
