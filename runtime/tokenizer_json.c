/* tokenizer_json.c: a pa_tokenizer from a Hugging Face tokenizer.json (and
 * tokenizer_config.json), with the meaning the `tokenizers` library gives
 * each field. What palign does not implement is refused by name, so a model
 * is never tokenized approximately. */
#include "tokenizer.h"
#include "jsonfile.h"

#include "hfdir.h"
#include "status.h"

#include <cJSON.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ID ((1 << 26) - 1)

/* The regex ByteLevel(use_regex=true) applies: GPT-2's. */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

typedef struct {
  const char *path;
  pa_tokenizer *t;
  pa_tokenizer_opts *o;
  int n_pre;         /* pre-tokenizer steps seen so far, to place Metaspace and ByteLevel's prefix */
  const char **text; /* [n] every id's token, from model.vocab or added_tokens */
  int32_t n;
} ctx;

/* The id of a token by its text, before the tokenizer's index exists; only
 * for the handful of names in post_processor and tokenizer_config.json. */
static int32_t find_text(const ctx *c, const char *s) {
  for (int32_t i = 0; i < c->n; i++)
    if (!strcmp(c->text[i], s))
      return i;
  return -1;
}

static const char *jstr(const cJSON *obj, const char *key) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* A boolean field: PA_OK and *v = dflt when absent or null. */
static int jbool(const ctx *c, const cJSON *obj, const char *where, const char *key, bool dflt, bool *v) {
  const cJSON *x = cJSON_GetObjectItemCaseSensitive(obj, key);
  if (!x || cJSON_IsNull(x)) {
    *v = dflt;
    return PA_OK;
  }
  if (!cJSON_IsBool(x))
    return pa_error(PA_EFORMAT, "%s: %s.%s should be true or false", c->path, where, key);
  *v = cJSON_IsTrue(x);
  return PA_OK;
}

/* An id: a JSON number that is an integer in 0..MAX_ID. */
static bool jid(const cJSON *v, int32_t *id) {
  if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 || v->valuedouble > MAX_ID)
    return false;
  *id = (int32_t)v->valuedouble;
  return true;
}

/* "-1", "1.5" or "not a number", for messages about a bad id. */
static const char *id_text(const cJSON *v, char buf[32]) {
  if (!cJSON_IsNumber(v))
    return v ? "not a number" : "missing";
  snprintf(buf, 32, "%.17g", v->valuedouble);
  return buf;
}

/* ---- normalizer and pre-tokenizer --------------------------------------- */

static int normalizer(ctx *c, const cJSON *n) {
  if (!n || cJSON_IsNull(n))
    return PA_OK;
  const char *type = jstr(n, "type");
  if (!type)
    return pa_error(PA_EFORMAT, "%s: a normalizer without a \"type\"", c->path);
  if (!strcmp(type, "Sequence")) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *x;
    if (!cJSON_IsArray(list))
      return pa_error(PA_EFORMAT, "%s: normalizer Sequence without a \"normalizers\" list", c->path);
    cJSON_ArrayForEach(x, list) {
      int rc = normalizer(c, x);
      if (rc)
        return rc;
    }
    return PA_OK;
  }
  if (!strcmp(type, "Prepend")) {
    const char *s = jstr(n, "prepend");
    if (!s)
      return pa_error(PA_EFORMAT, "%s: normalizer Prepend without a \"prepend\" string", c->path);
    return pa_tokenizer_build_prepend(c->t, s);
  }
  if (!strcmp(type, "Replace")) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(n, "pattern");
    const char *from = jstr(pat, "String"), *to = jstr(n, "content");
    if (jstr(pat, "Regex"))
      return pa_error(PA_EUNSUPPORTED, "%s: normalizer Replace with a regex pattern is not supported", c->path);
    if (!from || !to)
      return pa_error(PA_EFORMAT, "%s: normalizer Replace needs pattern.String and content", c->path);
    return pa_tokenizer_build_replace(c->t, from, to);
  }
  if (!strcmp(type, "NFC"))
    return pa_tokenizer_build_nfc(c->t);
  return pa_error(PA_EUNSUPPORTED,
                  "%s: normalizer '%.60s' is not supported (palign has Sequence, Prepend, Replace, NFC)", c->path,
                  type);
}

/* A literal string as a PCRE2 pattern. */
static char *quote_regex(const char *s) {
  char *out = malloc(2 * strlen(s) + 1), *o = out;
  if (!out)
    return NULL;
  for (; *s; s++) {
    if (strchr("\\^$.|?*+()[]{}", *s))
      *o++ = '\\';
    *o++ = *s;
  }
  *o = '\0';
  return out;
}

static int pre_tokenizer(ctx *c, const cJSON *p) {
  if (!p || cJSON_IsNull(p))
    return PA_OK;
  const char *type = jstr(p, "type");
  if (!type)
    return pa_error(PA_EFORMAT, "%s: a pre_tokenizer without a \"type\"", c->path);
  int rc;
  if (!strcmp(type, "Sequence")) {
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *x;
    if (!cJSON_IsArray(list))
      return pa_error(PA_EFORMAT, "%s: pre_tokenizer Sequence without a \"pretokenizers\" list", c->path);
    cJSON_ArrayForEach(x, list) {
      if ((rc = pre_tokenizer(c, x)))
        return rc;
    }
    return PA_OK;
  }
  bool first = c->n_pre++ == 0;
  if (!strcmp(type, "ByteLevel")) {
    bool prefix = false, use_regex = false;
    if ((rc = jbool(c, p, "pre_tokenizer ByteLevel", "add_prefix_space", true, &prefix)) ||
        (rc = jbool(c, p, "pre_tokenizer ByteLevel", "use_regex", true, &use_regex)))
      return rc;
    if (prefix) {
      /* It adds a space to each piece reaching it; first in line, those are
       * the text fragments, which palign's prefix option covers. */
      if (!first)
        return pa_error(PA_EUNSUPPORTED,
                        "%s: ByteLevel with add_prefix_space after another pre-tokenizer is not supported", c->path);
      c->o->prefix = PA_PREFIX_ALWAYS;
    }
    return use_regex ? pa_tokenizer_build_split(c->t, RE_GPT2, PA_SPLIT_ISOLATED, false) : PA_OK;
  }
  if (!strcmp(type, "Split")) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
    const char *re = jstr(pat, "Regex"), *lit = jstr(pat, "String"), *beh = jstr(p, "behavior");
    static const char *const names[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    int b = -1;
    for (int i = 0; beh && i < 5; i++)
      if (!strcmp(beh, names[i]))
        b = i;
    if ((!re && !lit) || b < 0)
      return pa_error(PA_EFORMAT, "%s: pre_tokenizer Split needs pattern.Regex or pattern.String and a behavior",
                      c->path);
    bool invert = false;
    if ((rc = jbool(c, p, "pre_tokenizer Split", "invert", false, &invert)))
      return rc;
    char *q = re ? NULL : quote_regex(lit);
    if (!re && !q)
      return pa_error(PA_ENOMEM, "%s: no memory", c->path);
    rc = pa_tokenizer_build_split(c->t, re ? re : q, (pa_split_behavior)b, invert);
    free(q);
    return rc;
  }
  if (!strcmp(type, "Digits")) {
    bool each = false;
    if ((rc = jbool(c, p, "pre_tokenizer Digits", "individual_digits", false, &each)))
      return rc;
    return pa_tokenizer_build_split(c->t, each ? "\\p{N}" : "\\p{N}+", PA_SPLIT_ISOLATED, false);
  }
  if (!strcmp(type, "Metaspace")) {
    const char *rep = jstr(p, "replacement"), *scheme = jstr(p, "prepend_scheme");
    if (!rep || strcmp(rep, "\xE2\x96\x81"))
      return pa_error(PA_EUNSUPPORTED, "%s: Metaspace with a replacement other than U+2581 is not supported", c->path);
    if (!first)
      return pa_error(PA_EUNSUPPORTED, "%s: Metaspace after another pre-tokenizer is not supported", c->path);
    bool split = false, legacy_prefix = false;
    if ((rc = jbool(c, p, "pre_tokenizer Metaspace", "split", true, &split)) ||
        (rc = jbool(c, p, "pre_tokenizer Metaspace", "add_prefix_space", true, &legacy_prefix)))
      return rc;
    c->o->space_to_meta = true;
    if (!scheme)
      c->o->prefix = legacy_prefix ? PA_PREFIX_ALWAYS : PA_PREFIX_NONE;
    else if (!strcmp(scheme, "always"))
      c->o->prefix = PA_PREFIX_ALWAYS;
    else if (!strcmp(scheme, "first"))
      c->o->prefix = PA_PREFIX_FIRST;
    else if (!strcmp(scheme, "never"))
      c->o->prefix = PA_PREFIX_NONE;
    else
      return pa_error(PA_EFORMAT, "%s: Metaspace prepend_scheme '%.40s' is not always, first or never", c->path,
                      scheme);
    return split ? pa_tokenizer_build_split(c->t, "\xE2\x96\x81", PA_SPLIT_MERGED_WITH_NEXT, false) : PA_OK;
  }
  return pa_error(PA_EUNSUPPORTED,
                  "%s: pre_tokenizer '%.60s' is not supported (palign has Sequence, ByteLevel, Split, Digits, "
                  "Metaspace)",
                  c->path, type);
}

/* Whether a ByteLevel pre-tokenizer appears anywhere: it decides the model. */
static bool has_byte_level(const cJSON *p) {
  if (!p || !cJSON_IsObject(p))
    return false;
  const char *type = jstr(p, "type");
  if (type && !strcmp(type, "ByteLevel"))
    return true;
  const cJSON *x;
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(p, "pretokenizers")) {
    if (has_byte_level(x))
      return true;
  }
  return false;
}

/* TemplateProcessing's "single": a special token before $A means BOS is
 * added, one after it EOS. */
static int post_processor(ctx *c, const cJSON *p) {
  if (!p || cJSON_IsNull(p))
    return PA_OK;
  const char *type = jstr(p, "type");
  if (!type)
    return pa_error(PA_EFORMAT, "%s: a post_processor without a \"type\"", c->path);
  if (!strcmp(type, "Sequence")) {
    const cJSON *x;
    cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(p, "processors")) {
      int rc = post_processor(c, x);
      if (rc)
        return rc;
    }
    return PA_OK;
  }
  if (!strcmp(type, "ByteLevel"))
    return PA_OK; /* it only adjusts offsets */
  if (strcmp(type, "TemplateProcessing"))
    return pa_error(PA_EUNSUPPORTED, "%s: post_processor '%.60s' is not supported", c->path, type);
  const cJSON *x;
  bool seen_a = false;
  cJSON_ArrayForEach(x, cJSON_GetObjectItemCaseSensitive(p, "single")) {
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(x, "SpecialToken");
    if (!sp) {
      seen_a = true;
      continue;
    }
    const char *name = jstr(sp, "id");
    int32_t id = name ? find_text(c, name) : -1;
    if (id < 0)
      return pa_error(PA_EFORMAT, "%s: post_processor adds the token '%.60s', which is not in the vocabulary", c->path,
                      name ? name : "(no id)");
    if (!seen_a) {
      c->o->add_bos = true;
      c->o->bos = id;
    } else {
      c->o->add_eos = true;
      c->o->eos = id;
    }
  }
  return PA_OK;
}

/* ---- the vocabulary -------------------------------------------------------- */

typedef struct {
  bool added, special, lstrip, rstrip;
} added_flags;

static int vocabulary(ctx *c, const cJSON *model, const cJSON *added_tokens, added_flags **flags) {
  const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab"), *x;
  if (!cJSON_IsObject(vocab))
    return pa_error(PA_EFORMAT, "%s: model.vocab is missing or not an object", c->path);
  if (added_tokens && !cJSON_IsNull(added_tokens) && !cJSON_IsArray(added_tokens))
    return pa_error(PA_EFORMAT, "%s: added_tokens is not a list", c->path);
  int32_t n = 0, id = 0;
  int rc;
  char buf[32];
  cJSON_ArrayForEach(x, vocab) {
    if (!jid(x, &id))
      return pa_error(PA_EFORMAT, "%s: model.vocab['%.60s'] = %s is not an id (an integer in 0..%d)", c->path,
                      x->string, id_text(x, buf), MAX_ID);
    if (id >= n)
      n = id + 1;
  }
  size_t k = 0;
  cJSON_ArrayForEach(x, added_tokens) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(x, "id");
    if (!jid(v, &id))
      return pa_error(PA_EFORMAT, "%s: added_tokens[%zu] has the id %s, not an integer in 0..%d", c->path, k,
                      id_text(v, buf), MAX_ID);
    if (id >= n)
      n = id + 1;
    k++;
  }
  if (n == 0)
    return pa_error(PA_EFORMAT, "%s: model.vocab is empty", c->path);
  c->text = calloc((size_t)n, sizeof *c->text);
  *flags = calloc((size_t)n, sizeof **flags);
  if (!c->text || !*flags)
    return pa_error(PA_ENOMEM, "%s: no memory for the vocabulary", c->path);
  c->n = n;
  cJSON_ArrayForEach(x, vocab) {
    id = (int32_t)x->valuedouble;
    if (c->text[id])
      return pa_error(PA_EFORMAT, "%s: model.vocab gives the id %d to both '%.60s' and '%.60s'", c->path, id,
                      c->text[id], x->string);
    c->text[id] = x->string;
  }
  cJSON_ArrayForEach(x, added_tokens) {
    id = (int32_t)cJSON_GetObjectItemCaseSensitive(x, "id")->valuedouble;
    const char *content = jstr(x, "content");
    if (!content || !*content)
      return pa_error(PA_EFORMAT, "%s: added token %d has no content", c->path, id);
    if (c->text[id] && strcmp(c->text[id], content))
      return pa_error(PA_EFORMAT, "%s: added token %d is '%.60s' but model.vocab has '%.60s' at that id", c->path, id,
                      content, c->text[id]);
    if ((*flags)[id].added)
      return pa_error(PA_EFORMAT, "%s: added_tokens lists the id %d twice", c->path, id);
    c->text[id] = content;
    added_flags *f = &(*flags)[id];
    bool single_word = false;
    f->added = true;
    if ((rc = jbool(c, x, "added_tokens[]", "special", false, &f->special)) ||
        (rc = jbool(c, x, "added_tokens[]", "lstrip", false, &f->lstrip)) ||
        (rc = jbool(c, x, "added_tokens[]", "rstrip", false, &f->rstrip)) ||
        (rc = jbool(c, x, "added_tokens[]", "single_word", false, &single_word)))
      return rc;
    if (single_word)
      return pa_error(PA_EUNSUPPORTED, "%s: added token '%.60s' is single_word, which palign does not support", c->path,
                      content);
  }
  for (int32_t i = 0; i < n; i++)
    if (!c->text[i])
      return pa_error(PA_EFORMAT, "%s: no token has the id %d (ids must run from 0 to %d without gaps)", c->path, i,
                      n - 1);
  return PA_OK;
}

static int merges(ctx *c, const cJSON *model) {
  const cJSON *list = cJSON_GetObjectItemCaseSensitive(model, "merges"), *x;
  if (!list)
    return pa_error(PA_EFORMAT, "%s: model.merges is missing (a BPE model needs its merges)", c->path);
  if (!cJSON_IsArray(list))
    return pa_error(PA_EFORMAT, "%s: model.merges is not a list", c->path);
  size_t i = 0;
  cJSON_ArrayForEach(x, list) {
    int rc;
    if (cJSON_IsString(x)) { /* "left right" */
      const char *s = x->valuestring, *sp = strchr(s, ' ');
      if (!sp || sp == s || strchr(sp + 1, ' ') || !sp[1])
        return pa_error(PA_EFORMAT, "%s: model.merges[%zu] '%.60s' is not two tokens separated by one space", c->path,
                        i, s);
      rc = pa_tokenizer_build_merge(c->t, s, (size_t)(sp - s), sp + 1, strlen(sp + 1));
    } else if (cJSON_IsArray(x) && cJSON_GetArraySize(x) == 2 && cJSON_IsString(cJSON_GetArrayItem(x, 0)) &&
               cJSON_IsString(cJSON_GetArrayItem(x, 1))) { /* ["left", "right"] */
      const char *l = cJSON_GetArrayItem(x, 0)->valuestring, *r = cJSON_GetArrayItem(x, 1)->valuestring;
      rc = pa_tokenizer_build_merge(c->t, l, strlen(l), r, strlen(r));
    } else {
      return pa_error(PA_EFORMAT, "%s: model.merges[%zu] is neither \"left right\" nor [left, right]", c->path, i);
    }
    if (rc)
      return rc;
    i++;
  }
  return PA_OK;
}

/* A token name in tokenizer_config.json: a string, {"content": ...} or null. */
static int config_token(ctx *c, const char *cpath, const cJSON *cfg, const char *key, int32_t *id) {
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
  if (!v || cJSON_IsNull(v))
    return PA_OK;
  const char *name = cJSON_IsString(v) ? v->valuestring : jstr(v, "content");
  if (!name)
    return pa_error(PA_EFORMAT, "%s: %s is neither a string nor {\"content\": ...}", cpath, key);
  *id = find_text(c, name);
  if (*id < 0)
    return pa_error(PA_EFORMAT, "%s: %s '%.60s' is not a token of %s", cpath, key, name, c->path);
  return PA_OK;
}

static int config(ctx *c, const char *cpath) {
  cJSON *cfg;
  int rc = pa_json_load(cpath, &cfg);
  if (rc)
    return rc;
  if (!cJSON_IsObject(cfg))
    rc = pa_error(PA_EFORMAT, "%s: not a JSON object", cpath);
  if (!rc)
    rc = config_token(c, cpath, cfg, "bos_token", &c->o->bos);
  if (!rc)
    rc = config_token(c, cpath, cfg, "eos_token", &c->o->eos);
  int32_t unk; /* checked, not used: only the model's unk_token changes encoding (Hugging Face) */
  if (!rc)
    rc = config_token(c, cpath, cfg, "unk_token", &unk);
  if (!rc)
    rc = config_token(c, cpath, cfg, "pad_token", &c->o->pad);
  ctx cc = *c;
  cc.path = cpath;
  if (!rc)
    rc = jbool(&cc, cfg, "tokenizer_config", "add_bos_token", c->o->add_bos, &c->o->add_bos);
  if (!rc)
    rc = jbool(&cc, cfg, "tokenizer_config", "add_eos_token", c->o->add_eos, &c->o->add_eos);
  cJSON_Delete(cfg);
  return rc;
}

static int build(ctx *c, const cJSON *root, const char *config_path) {
  if (!cJSON_IsObject(root))
    return pa_error(PA_EFORMAT, "%s: not a JSON object", c->path);
  const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
  if (!cJSON_IsObject(model))
    return pa_error(PA_EFORMAT, "%s: \"model\" is missing or not an object", c->path);
  const char *type = jstr(model, "type");
  if (type ? strcmp(type, "BPE") != 0 : !cJSON_GetObjectItemCaseSensitive(model, "merges"))
    return pa_error(PA_EUNSUPPORTED, "%s: model type '%.40s' is not supported (palign reads BPE)", c->path,
                    type ? type : "(none)");
  const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(model, "dropout");
  if (dropout && !cJSON_IsNull(dropout) && !(cJSON_IsNumber(dropout) && dropout->valuedouble == 0))
    return pa_error(PA_EUNSUPPORTED, "%s: BPE dropout is not supported", c->path);
  const char *affix[] = {"continuing_subword_prefix", "end_of_word_suffix"};
  for (int i = 0; i < 2; i++) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(model, affix[i]);
    if (a && !cJSON_IsNull(a) && !(cJSON_IsString(a) && !*a->valuestring))
      return pa_error(PA_EUNSUPPORTED, "%s: BPE %s is not supported", c->path, affix[i]);
  }
  const cJSON *pre = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
  pa_tokenizer_model kind = has_byte_level(pre) ? PA_TOK_BYTE_BPE : PA_TOK_BPE;

  added_flags *flags = NULL;
  int rc = vocabulary(c, model, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), &flags);
  if (!rc)
    rc = pa_tokenizer_build_new(kind, c->path, &c->t);
  bool byte_fallback = false;
  const char *unk = jstr(model, "unk_token");
  if (!rc)
    rc = jbool(c, model, "model", "byte_fallback", false, &byte_fallback);
  for (int32_t i = 0; i < c->n && !rc; i++) {
    const char *s = c->text[i];
    size_t len = strlen(s);
    pa_token_type ty = PA_TOKEN_NORMAL;
    if (unk && !strcmp(s, unk))
      ty = PA_TOKEN_UNKNOWN;
    else if (flags[i].added)
      ty = flags[i].special ? PA_TOKEN_CONTROL : PA_TOKEN_USER_DEFINED;
    else if (byte_fallback && len == 6 && !strncmp(s, "<0x", 3) && s[5] == '>')
      ty = PA_TOKEN_BYTE;
    rc = pa_tokenizer_build_token(c->t, s, len, 0.0f, ty);
    if (!rc && flags[i].added)
      rc = pa_tokenizer_build_added(c->t, i, flags[i].special, flags[i].lstrip, flags[i].rstrip);
  }
  free(flags);
  if (rc)
    return rc;
  c->o->byte_fallback = byte_fallback;
  if ((rc = merges(c, model)) || (rc = jbool(c, model, "model", "ignore_merges", false, &c->o->ignore_merges)) ||
      (rc = jbool(c, model, "model", "fuse_unk", false, &c->o->fuse_unk)) ||
      (rc = normalizer(c, cJSON_GetObjectItemCaseSensitive(root, "normalizer"))) || (rc = pre_tokenizer(c, pre)) ||
      (rc = post_processor(c, cJSON_GetObjectItemCaseSensitive(root, "post_processor"))))
    return rc;
  if (unk && (c->o->unk = find_text(c, unk)) < 0)
    return pa_error(PA_EFORMAT, "%s: model.unk_token '%.60s' is not in the vocabulary", c->path, unk);
  if (config_path && (rc = config(c, config_path)))
    return rc;
  char describe[128];
  snprintf(describe, sizeof describe, "%s (tokenizer.json)",
           kind == PA_TOK_BYTE_BPE ? "byte-level BPE"
           : byte_fallback         ? "BPE with byte fallback"
                                   : "BPE");
  c->o->describe = describe;
  return pa_tokenizer_build_finish(c->t, c->o);
}

int pa_tokenizer_from_json(const char *tokenizer_json, const char *tokenizer_config_json_or_NULL, pa_tokenizer **out) {
  *out = NULL;
  cJSON *root;
  int rc = pa_json_load(tokenizer_json, &root);
  if (rc)
    return rc;
  pa_tokenizer_opts o = {.bos = -1, .eos = -1, .unk = -1, .pad = -1, .eot = -1, .unique_texts = true};
  ctx c = {.path = tokenizer_json, .o = &o};
  rc = build(&c, root, tokenizer_config_json_or_NULL);
  free(c.text); /* the strings belong to root */
  cJSON_Delete(root);
  if (rc) {
    pa_tokenizer_destroy(c.t);
    return rc;
  }
  *out = c.t;
  return PA_OK;
}
