/* tokenizer.c: the tokenizer core shared by the GGUF and tokenizer.json
 * loaders: vocabulary and merge indexes, added-token matching, normalizer,
 * PCRE2 pre-tokenizer, the three BPE variants, and decoding.
 *
 * Encoding a text: (1) added tokens are cut out of it, leftmost-longest, as
 * Hugging Face's AddedVocabulary does; (2) each remaining fragment is
 * normalized (Prepend / Replace steps, spaces to "▁", the space prefix);
 * (3) the pre-tokenizer regexes cut it into pieces; (4) each piece is merged
 * by BPE independently. Merges never cross a piece, so steps (3) and (4)
 * decide everything about compatibility with the reference implementations.
 */
#include "tokenizer.h"

#include "status.h"
#include "utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* More ids than this is not a tokenizer but a corrupt file; it also keeps
 * every index below comfortably inside 32 bits. */
#define MAX_TOKENS (1 << 26)

typedef struct {
  uint32_t text_off, text_len; /* the vocabulary's spelling, in arena */
  uint32_t dec_off, dec_len;   /* the bytes it decodes to, in arena */
  float score;
  uint8_t type;
  uint8_t lstrip, rstrip;
} tok_entry;

typedef struct {
  uint32_t loff, llen, roff, rlen; /* in arena until resolved */
} merge_text;

typedef struct {
  uint64_t key; /* left id << 32 | right id; UINT64_MAX = empty */
  uint32_t rank;
  int32_t id; /* the merged token */
} pair_slot;

typedef struct {
  uint32_t hash;
  int32_t id; /* -1 = empty */
} text_slot;

typedef enum { NORM_PREPEND, NORM_REPLACE, NORM_NFC } norm_kind;

typedef struct {
  norm_kind kind;
  char *a, *b; /* PREPEND: a; REPLACE: a -> b; NFC: neither */
  size_t alen, blen;
} norm_step;

typedef struct {
  pcre2_code *re;
  pa_split_behavior behavior;
  bool invert;
} split_step;

struct pa_tokenizer {
  pa_tokenizer_model model;
  char *source;
  char *describe;
  bool finished;

  char *arena;
  size_t arena_len, arena_cap;
  tok_entry *toks;
  int32_t n, cap;

  merge_text *merges;
  size_t n_merges, merges_cap;

  norm_step *norms;
  size_t n_norms;
  split_step *splits;
  size_t n_splits;

  pa_tokenizer_opts o;
  bool strip_space; /* the encoder puts a space in front: PA_TOK_DECODE_STRIP_SPACE removes it */

  /* indexes built by finish */
  text_slot *tmap;
  uint32_t tmask;
  pair_slot *pmap;
  uint32_t pmask;
  int32_t byte_id[256];  /* byte-level: the token of byte b; otherwise <0xNN> */
  char byte_sym[256][2]; /* byte-level: GPT-2's symbol for byte b, UTF-8 (1 or 2 bytes) */
  uint8_t byte_sym_len[256];
  int16_t cp_byte[0x144]; /* the inverse map, -1 outside it */
  int32_t *added;         /* added tokens, by first byte then longest first */
  uint32_t added_start[257];
};

/* ---- small helpers ------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
  /* FNV-1a: token texts are short, and this is simple and good enough. */
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++)
    h = (h ^ (uint8_t)s[i]) * 16777619u;
  return h;
}

static uint32_t hash_pair(uint64_t key) { return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32); }

static uint32_t table_size(size_t n) {
  uint32_t s = 16;
  while (s < 2 * n)
    s <<= 1;
  return s;
}

static size_t utf8_put(uint32_t cp, char *out) {
  if (cp < 0x80) {
    out[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* Unicode White_Space, which is what Hugging Face (Rust's char::is_whitespace)
 * strips around lstrip/rstrip added tokens. */
static bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* GPT-2's byte-to-unicode map: printable bytes stand for themselves, the
 * other 68 are moved to U+0100.. in byte order, so every byte has a visible,
 * space-free code point. */
static uint32_t byte_to_cp(uint8_t b) {
  if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE))
    return b;
  uint32_t k = 0;
  for (uint32_t x = 0; x < b; x++)
    if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE)))
      k++;
  return 0x100 + k;
}

typedef struct {
  char *p;
  size_t len, cap;
} sbuf;

static int sbuf_reserve(sbuf *b, size_t extra) {
  if (b->len + extra + 1 <= b->cap)
    return PA_OK;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + extra + 1)
    cap *= 2;
  char *np = realloc(b->p, cap);
  if (!np)
    return PA_ENOMEM;
  b->p = np;
  b->cap = cap;
  return PA_OK;
}

static int sbuf_put(sbuf *b, const void *s, size_t n) {
  if (sbuf_reserve(b, n))
    return PA_ENOMEM;
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
  return PA_OK;
}

/* ---- building ------------------------------------------------------------ */

static int arena_put(pa_tokenizer *t, const char *s, size_t n, uint32_t *off) {
  if (n > UINT32_MAX || t->arena_len + n > UINT32_MAX)
    return pa_error(PA_EFORMAT, "%s: the vocabulary text exceeds 4 GiB", t->source);
  if (t->arena_len + n > t->arena_cap) {
    size_t cap = t->arena_cap ? t->arena_cap : 1 << 16;
    while (cap < t->arena_len + n)
      cap *= 2;
    char *np = realloc(t->arena, cap);
    if (!np)
      return pa_error(PA_ENOMEM, "%s: no memory for the vocabulary", t->source);
    t->arena = np;
    t->arena_cap = cap;
  }
  if (n)
    memcpy(t->arena + t->arena_len, s, n);
  *off = (uint32_t)t->arena_len;
  t->arena_len += n;
  return PA_OK;
}

int pa_tokenizer_build_new(pa_tokenizer_model model, const char *source, pa_tokenizer **out) {
  *out = NULL;
  if (model != PA_TOK_BYTE_BPE && model != PA_TOK_BPE && model != PA_TOK_SPM)
    return pa_error(PA_EINVAL, "%s: unknown tokenizer model %d", source, (int)model);
  pa_tokenizer *t = calloc(1, sizeof *t);
  if (!t)
    return pa_error(PA_ENOMEM, "%s: no memory", source);
  t->model = model;
  t->source = strdup(source ? source : "tokenizer");
  if (!t->source) {
    free(t);
    return pa_error(PA_ENOMEM, "%s: no memory", source);
  }
  *out = t;
  return PA_OK;
}

int pa_tokenizer_build_token(pa_tokenizer *t, const char *text, size_t len, float score, pa_token_type type) {
  assert(!t->finished);
  if (t->n >= MAX_TOKENS)
    return pa_error(PA_EFORMAT, "%s: more than %d tokens", t->source, MAX_TOKENS);
  if ((unsigned)type > PA_TOKEN_BYTE)
    return pa_error(PA_EFORMAT, "%s: token %d has the unknown type %d", t->source, t->n, (int)type);
  if (isnan(score))
    return pa_error(PA_EFORMAT, "%s: token %d has a score that is not a number", t->source, t->n);
  if (t->n == t->cap) {
    int32_t cap = t->cap ? 2 * t->cap : 1024;
    tok_entry *np = realloc(t->toks, (size_t)cap * sizeof *np);
    if (!np)
      return pa_error(PA_ENOMEM, "%s: no memory for the vocabulary", t->source);
    t->toks = np;
    t->cap = cap;
  }
  tok_entry *e = &t->toks[t->n];
  memset(e, 0, sizeof *e);
  int rc = arena_put(t, text, len, &e->text_off);
  if (rc)
    return rc;
  e->text_len = (uint32_t)len;
  e->score = score;
  e->type = (uint8_t)type;
  t->n++;
  return PA_OK;
}

int pa_tokenizer_build_added(pa_tokenizer *t, int32_t id, bool special, bool lstrip, bool rstrip) {
  assert(!t->finished);
  if (id < 0 || id >= t->n)
    return pa_error(PA_EFORMAT, "%s: added token id %d is outside the vocabulary (0..%d)", t->source, id, t->n - 1);
  tok_entry *e = &t->toks[id];
  if (e->text_len == 0)
    return pa_error(PA_EFORMAT, "%s: added token %d is empty", t->source, id);
  if (special) {
    if (e->type != PA_TOKEN_UNKNOWN)
      e->type = PA_TOKEN_CONTROL;
  } else {
    e->type = PA_TOKEN_USER_DEFINED;
  }
  e->lstrip = lstrip;
  e->rstrip = rstrip;
  return PA_OK;
}

int pa_tokenizer_build_merge(pa_tokenizer *t, const char *left, size_t llen, const char *right, size_t rlen) {
  assert(!t->finished);
  if (t->n_merges >= UINT32_MAX / 2)
    return pa_error(PA_EFORMAT, "%s: too many merges", t->source);
  if (t->n_merges == t->merges_cap) {
    size_t cap = t->merges_cap ? 2 * t->merges_cap : 1024;
    merge_text *np = realloc(t->merges, cap * sizeof *np);
    if (!np)
      return pa_error(PA_ENOMEM, "%s: no memory for the merges", t->source);
    t->merges = np;
    t->merges_cap = cap;
  }
  merge_text *m = &t->merges[t->n_merges];
  int rc = arena_put(t, left, llen, &m->loff);
  if (!rc)
    rc = arena_put(t, right, rlen, &m->roff);
  if (rc)
    return rc;
  m->llen = (uint32_t)llen;
  m->rlen = (uint32_t)rlen;
  t->n_merges++;
  return PA_OK;
}

static int add_norm(pa_tokenizer *t, norm_kind kind, const char *a, const char *b) {
  norm_step *np = realloc(t->norms, (t->n_norms + 1) * sizeof *np);
  if (!np)
    return pa_error(PA_ENOMEM, "%s: no memory", t->source);
  t->norms = np;
  norm_step *s = &t->norms[t->n_norms];
  memset(s, 0, sizeof *s);
  s->kind = kind;
  s->a = strdup(a);
  s->b = b ? strdup(b) : NULL;
  if (!s->a || (b && !s->b)) {
    free(s->a);
    free(s->b);
    return pa_error(PA_ENOMEM, "%s: no memory", t->source);
  }
  s->alen = strlen(a);
  s->blen = b ? strlen(b) : 0;
  t->n_norms++;
  return PA_OK;
}

int pa_tokenizer_build_prepend(pa_tokenizer *t, const char *s) {
  assert(!t->finished);
  return add_norm(t, NORM_PREPEND, s, NULL);
}

int pa_tokenizer_build_replace(pa_tokenizer *t, const char *from, const char *to) {
  assert(!t->finished);
  if (!*from)
    return pa_error(PA_EFORMAT, "%s: a Replace normalizer with an empty pattern", t->source);
  return add_norm(t, NORM_REPLACE, from, to);
}

int pa_tokenizer_build_nfc(pa_tokenizer *t) {
  assert(!t->finished);
  return add_norm(t, NORM_NFC, "", NULL);
}

/* Rewrites \s and \S to Unicode White_Space, which is what Oniguruma (Hugging
 * Face) and llama.cpp mean by them; PCRE2's \s under UCP leaves out U+0085.
 * Inside a character class, \s becomes the class's members; \S there stays
 * PCRE2's (no pattern in use has it). */
static char *rewrite_space_classes(const char *re) {
  static const char members[] = "\\t-\\r\\x{85}\\p{Z}";
  size_t n = strlen(re);
  char *out = malloc(n * 24 + 1);
  if (!out)
    return NULL;
  size_t o = 0;
  bool in_class = false;
  for (size_t i = 0; i < n; i++) {
    char c = re[i];
    if (c == '\\' && i + 1 < n) {
      char d = re[i + 1];
      if (d == 's' || (d == 'S' && !in_class)) {
        o += (size_t)sprintf(out + o, in_class ? "%s" : (d == 's' ? "[%s]" : "[^%s]"), members);
        i++;
        continue;
      }
      out[o++] = c;
      out[o++] = d;
      i++;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out[o++] = c;
      /* a ']' right after '[' or '[^' is a member, not the end */
      if (i + 1 < n && re[i + 1] == '^')
        out[o++] = re[++i];
      if (i + 1 < n && re[i + 1] == ']')
        out[o++] = re[++i];
      continue;
    }
    if (in_class && c == '[' && i + 1 < n && re[i + 1] == ':') {
      const char *end = strstr(re + i + 2, ":]");
      if (end) {
        size_t k = (size_t)(end - (re + i)) + 2;
        memcpy(out + o, re + i, k);
        o += k;
        i += k - 1;
        continue;
      }
    }
    if (in_class && c == ']')
      in_class = false;
    out[o++] = c;
  }
  out[o] = '\0';
  return out;
}

int pa_tokenizer_build_split(pa_tokenizer *t, const char *regex, pa_split_behavior b, bool invert) {
  assert(!t->finished);
  if ((unsigned)b > PA_SPLIT_CONTIGUOUS)
    return pa_error(PA_EINVAL, "%s: unknown split behaviour %d", t->source, (int)b);
  char *pat = rewrite_space_classes(regex);
  if (!pat)
    return pa_error(PA_ENOMEM, "%s: no memory", t->source);
  int err;
  PCRE2_SIZE erroff;
  pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &erroff, NULL);
  free(pat);
  if (!re) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    return pa_error(PA_EFORMAT, "%s: pre-tokenizer regex '%.200s' does not compile: %s (near offset %zu)", t->source,
                    regex, (const char *)msg, (size_t)erroff);
  }
  /* JIT is a speed-up only; without it (no JIT on this CPU) PCRE2 interprets. */
  (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
  split_step *np = realloc(t->splits, (t->n_splits + 1) * sizeof *np);
  if (!np) {
    pcre2_code_free(re);
    return pa_error(PA_ENOMEM, "%s: no memory", t->source);
  }
  t->splits = np;
  t->splits[t->n_splits++] = (split_step){.re = re, .behavior = b, .invert = invert};
  return PA_OK;
}

static int32_t tmap_find(const pa_tokenizer *t, const char *s, size_t n) {
  if (!t->tmap)
    return -1;
  uint32_t h = hash_bytes(s, n);
  for (uint32_t i = h & t->tmask;; i = (i + 1) & t->tmask) {
    const text_slot *sl = &t->tmap[i];
    if (sl->id < 0)
      return -1;
    if (sl->hash == h) {
      const tok_entry *e = &t->toks[sl->id];
      if (e->text_len == n && memcmp(t->arena + e->text_off, s, n) == 0)
        return sl->id;
    }
  }
}

static int build_text_map(pa_tokenizer *t) {
  t->tmask = table_size((size_t)t->n) - 1;
  t->tmap = malloc(((size_t)t->tmask + 1) * sizeof *t->tmap);
  if (!t->tmap)
    return pa_error(PA_ENOMEM, "%s: no memory for the vocabulary index", t->source);
  for (uint32_t i = 0; i <= t->tmask; i++)
    t->tmap[i].id = -1;
  for (int32_t id = 0; id < t->n; id++) {
    const tok_entry *e = &t->toks[id];
    if (e->text_len == 0) /* nothing can be spelled as an empty token */
      continue;
    const char *s = t->arena + e->text_off;
    uint32_t h = hash_bytes(s, e->text_len);
    uint32_t i = h & t->tmask;
    for (;; i = (i + 1) & t->tmask) {
      text_slot *sl = &t->tmap[i];
      if (sl->id < 0)
        break;
      const tok_entry *f = &t->toks[sl->id];
      if (sl->hash == h && f->text_len == e->text_len && memcmp(t->arena + f->text_off, s, e->text_len) == 0)
        break;
    }
    if (t->tmap[i].id >= 0 && t->o.unique_texts)
      return pa_error(PA_EFORMAT, "%s: tokens %d and %d are both '%.*s'", t->source, t->tmap[i].id, id,
                      (int)(e->text_len > 100 ? 100 : e->text_len), s);
    /* later ids win, as in llama.cpp's token_to_id map */
    t->tmap[i] = (text_slot){.hash = h, .id = id};
  }
  return PA_OK;
}

static const pair_slot *pmap_find(const pa_tokenizer *t, int32_t a, int32_t b) {
  uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
  for (uint32_t i = hash_pair(key) & t->pmask;; i = (i + 1) & t->pmask) {
    const pair_slot *s = &t->pmap[i];
    if (s->key == key)
      return s;
    if (s->key == UINT64_MAX)
      return NULL;
  }
}

static int resolve_merges(pa_tokenizer *t) {
  t->pmask = table_size(t->n_merges) - 1;
  t->pmap = malloc(((size_t)t->pmask + 1) * sizeof *t->pmap);
  if (!t->pmap)
    return pa_error(PA_ENOMEM, "%s: no memory for the merges", t->source);
  for (uint32_t i = 0; i <= t->pmask; i++)
    t->pmap[i].key = UINT64_MAX;
  sbuf joined = {0};
  int rc = PA_OK;
  for (size_t r = 0; r < t->n_merges && !rc; r++) {
    const merge_text *m = &t->merges[r];
    const char *ls = t->arena + m->loff, *rs = t->arena + m->roff;
    int32_t a = tmap_find(t, ls, m->llen), b = tmap_find(t, rs, m->rlen);
    joined.len = 0;
    if (sbuf_put(&joined, ls, m->llen) || sbuf_put(&joined, rs, m->rlen)) {
      rc = pa_error(PA_ENOMEM, "%s: no memory", t->source);
      break;
    }
    int32_t c = tmap_find(t, joined.p, joined.len);
    const char *missing = a < 0 ? "left part" : b < 0 ? "right part" : c < 0 ? "joined result" : NULL;
    if (missing) {
      rc = pa_error(PA_EFORMAT, "%s: merge %zu ('%.*s' + '%.*s'): its %s is not a token of the vocabulary", t->source,
                    r, (int)(m->llen > 60 ? 60 : m->llen), ls, (int)(m->rlen > 60 ? 60 : m->rlen), rs, missing);
      break;
    }
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = hash_pair(key) & t->pmask;
    while (t->pmap[i].key != UINT64_MAX && t->pmap[i].key != key)
      i = (i + 1) & t->pmask;
    if (t->pmap[i].key == key) /* listed twice: the first (lower) rank counts, as in llama.cpp */
      continue;
    t->pmap[i] = (pair_slot){.key = key, .rank = (uint32_t)r, .id = c};
  }
  free(joined.p);
  return rc;
}

/* The byte a "<0xNN>" token stands for, or -1 if the text is not one. */
static int parse_byte_token(const char *s, size_t n) {
  if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
    return -1;
  int v = 0;
  for (int i = 3; i < 5; i++) {
    char c = s[i];
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                   : -1;
    if (d < 0)
      return -1;
    v = v * 16 + d;
  }
  return v;
}

/* The bytes each token decodes to, stored after the texts in the arena. */
static int build_decoded(pa_tokenizer *t) {
  sbuf d = {0};
  int rc = PA_OK;
  for (int32_t id = 0; id < t->n && !rc; id++) {
    tok_entry *e = &t->toks[id];
    /* The arena may move while we append, so copy the text out first. */
    d.len = 0;
    if (sbuf_put(&d, t->arena + e->text_off, e->text_len))
      return pa_error(PA_ENOMEM, "%s: no memory", t->source);
    const uint8_t *s = (const uint8_t *)d.p;
    size_t n = e->text_len;
    char tmp[8];
    sbuf out = {0};
    int byte;
    if (e->type == PA_TOKEN_CONTROL || e->type == PA_TOKEN_UNKNOWN || e->type == PA_TOKEN_USER_DEFINED) {
      rc = sbuf_put(&out, s, n);
    } else if (e->type == PA_TOKEN_BYTE && (byte = parse_byte_token((const char *)s, n)) >= 0) {
      tmp[0] = (char)byte;
      rc = sbuf_put(&out, tmp, 1);
    } else if (t->model == PA_TOK_BYTE_BPE) {
      for (size_t i = 0; i < n && !rc;) {
        uint32_t cp;
        size_t k = pa_utf8_valid(s + i, n - i, &cp);
        if (k == 0) { /* not UTF-8: the byte stands for itself */
          rc = sbuf_put(&out, s + i, 1);
          i++;
          continue;
        }
        int b = cp < 0x144 ? t->cp_byte[cp] : -1;
        if (b >= 0) {
          tmp[0] = (char)b;
          rc = sbuf_put(&out, tmp, 1);
        } else { /* a character outside GPT-2's map: keep it as written */
          rc = sbuf_put(&out, s + i, k);
        }
        i += k;
      }
    } else {
      for (size_t i = 0; i < n && !rc;) {
        if (i + 3 <= n && memcmp(s + i, "\xE2\x96\x81", 3) == 0) {
          rc = sbuf_put(&out, " ", 1);
          i += 3;
        } else {
          rc = sbuf_put(&out, s + i, 1);
          i++;
        }
      }
    }
    if (!rc)
      rc = arena_put(t, out.p ? out.p : "", out.len, &e->dec_off);
    e->dec_len = (uint32_t)out.len;
    free(out.p);
    if (rc && rc != PA_EFORMAT)
      rc = pa_error(PA_ENOMEM, "%s: no memory", t->source);
  }
  free(d.p);
  return rc;
}

typedef struct {
  uint8_t first;
  uint32_t len;
  int32_t id;
} added_key;

/* By first byte, then longest first, so the first match found at a
 * position is the longest (Hugging Face's leftmost-longest rule). */
static int cmp_added(const void *pa, const void *pb) {
  const added_key *a = pa, *b = pb;
  if (a->first != b->first)
    return a->first < b->first ? -1 : 1;
  if (a->len != b->len)
    return a->len > b->len ? -1 : 1;
  return a->id < b->id ? -1 : 1;
}

static bool is_added_type(uint8_t type) {
  return type == PA_TOKEN_CONTROL || type == PA_TOKEN_UNKNOWN || type == PA_TOKEN_USER_DEFINED;
}

static int build_added_index(pa_tokenizer *t) {
  size_t k = 0;
  for (int32_t id = 0; id < t->n; id++)
    if (is_added_type(t->toks[id].type) && t->toks[id].text_len > 0)
      k++;
  t->added = malloc((k ? k : 1) * sizeof *t->added);
  added_key *keys = malloc((k ? k : 1) * sizeof *keys);
  if (!t->added || !keys) {
    free(keys);
    return pa_error(PA_ENOMEM, "%s: no memory", t->source);
  }
  k = 0;
  for (int32_t id = 0; id < t->n; id++) {
    const tok_entry *e = &t->toks[id];
    if (is_added_type(e->type) && e->text_len > 0)
      keys[k++] = (added_key){.first = (uint8_t)t->arena[e->text_off], .len = e->text_len, .id = id};
  }
  qsort(keys, k, sizeof *keys, cmp_added);
  for (size_t i = 0; i < k; i++)
    t->added[i] = keys[i].id;
  free(keys);
  size_t j = 0;
  for (int c = 0; c < 256; c++) {
    t->added_start[c] = (uint32_t)j;
    while (j < k && (uint8_t)t->arena[t->toks[t->added[j]].text_off] == c)
      j++;
  }
  t->added_start[256] = (uint32_t)j;
  return PA_OK;
}

static int check_special_id(const pa_tokenizer *t, const char *what, int32_t id) {
  if (id < -1 || id >= t->n)
    return pa_error(PA_EFORMAT, "%s: the %s token id %d is outside the vocabulary (0..%d)", t->source, what, id,
                    t->n - 1);
  return PA_OK;
}

int pa_tokenizer_build_finish(pa_tokenizer *t, const pa_tokenizer_opts *o) {
  assert(!t->finished);
  t->o = *o;
  t->o.describe = NULL;
  if (t->n == 0)
    return pa_error(PA_EFORMAT, "%s: the vocabulary is empty", t->source);
  int rc = check_special_id(t, "BOS", o->bos);
  if (!rc)
    rc = check_special_id(t, "EOS", o->eos);
  if (!rc)
    rc = check_special_id(t, "unknown", o->unk);
  if (!rc)
    rc = check_special_id(t, "padding", o->pad);
  if (!rc)
    rc = check_special_id(t, "end-of-turn", o->eot);
  if (rc)
    return rc;
  if (o->add_bos && o->bos < 0)
    return pa_error(PA_EFORMAT, "%s: BOS is to be added but there is no BOS token", t->source);
  if (o->add_eos && o->eos < 0)
    return pa_error(PA_EFORMAT, "%s: EOS is to be added but there is no EOS token", t->source);
  if (t->model == PA_TOK_BYTE_BPE && t->n_merges == 0)
    return pa_error(PA_EFORMAT, "%s: a byte-level BPE tokenizer without merges", t->source);
  for (int i = 0; i < 0x144; i++)
    t->cp_byte[i] = -1;
  for (int b = 0; b < 256; b++) {
    uint32_t cp = byte_to_cp((uint8_t)b);
    t->cp_byte[cp] = (int16_t)b;
    char u[4];
    size_t k = utf8_put(cp, u); /* cp < 0x144: at most 2 bytes */
    memcpy(t->byte_sym[b], u, k);
    t->byte_sym_len[b] = (uint8_t)k;
  }
  if ((rc = build_text_map(t)) || (rc = resolve_merges(t)) || (rc = build_decoded(t)) || (rc = build_added_index(t)))
    return rc;
  if (t->o.eot < 0) {
    /* Files rarely name their end-of-turn token; these are the chat formats'
     * (llama.cpp looks for the same texts). */
    static const char *const eot_names[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>"};
    for (size_t i = 0; i < sizeof eot_names / sizeof eot_names[0] && t->o.eot < 0; i++) {
      int32_t id = tmap_find(t, eot_names[i], strlen(eot_names[i]));
      if (id >= 0 && t->toks[id].type == PA_TOKEN_CONTROL)
        t->o.eot = id;
    }
  }
  for (int b = 0; b < 256; b++) {
    char s[8];
    size_t n;
    if (t->model == PA_TOK_BYTE_BPE)
      memcpy(s, t->byte_sym[b], n = t->byte_sym_len[b]);
    else
      n = (size_t)snprintf(s, sizeof s, "<0x%02X>", b);
    t->byte_id[b] = tmap_find(t, s, n);
  }
  char buf[160];
  if (o->describe)
    snprintf(buf, sizeof buf, "%s", o->describe);
  else
    snprintf(buf, sizeof buf, "%s",
             t->model == PA_TOK_BYTE_BPE ? "byte-level BPE"
             : t->model == PA_TOK_SPM    ? "SentencePiece BPE"
                                         : "BPE");
  t->describe = strdup(buf);
  if (!t->describe)
    return pa_error(PA_ENOMEM, "%s: no memory", t->source);
  /* A space prefix comes from the prefix option or from a Prepend
   * normalizer of a space or "▁" (Llama-2's tokenizer.json). */
  t->strip_space = t->o.prefix != PA_PREFIX_NONE;
  for (size_t i = 0; i < t->n_norms; i++)
    if (t->norms[i].kind == NORM_PREPEND && (!strcmp(t->norms[i].a, " ") || !strcmp(t->norms[i].a, "\xE2\x96\x81")))
      t->strip_space = true;
  /* The merge texts were only needed to resolve the merges. */
  free(t->merges);
  t->merges = NULL;
  t->n_merges = 0;
  t->finished = true;
  return PA_OK;
}

void pa_tokenizer_destroy(pa_tokenizer *t) {
  if (!t)
    return;
  for (size_t i = 0; i < t->n_norms; i++) {
    free(t->norms[i].a);
    free(t->norms[i].b);
  }
  for (size_t i = 0; i < t->n_splits; i++)
    pcre2_code_free(t->splits[i].re);
  free(t->norms);
  free(t->splits);
  free(t->merges);
  free(t->toks);
  free(t->arena);
  free(t->tmap);
  free(t->pmap);
  free(t->added);
  free(t->describe);
  free(t->source);
  free(t);
}

/* ---- encoding ------------------------------------------------------------ */

typedef struct {
  uint32_t off, len;
  bool raw; /* invalid UTF-8 bytes: no regex sees them */
} piece;

typedef struct {
  uint64_t key; /* priority << 32 | left symbol */
  uint32_t right, len;
  int32_t id;
} heap_ent;

typedef struct {
  sbuf norm, norm2, bl;
  piece *pcs, *pcs2;
  size_t npcs, npcs2, pcs_cap, pcs2_cap;
  pcre2_match_data *md;
  int32_t *sid;
  uint32_t *slen, *sprev, *snext;
  size_t sym_cap;
  heap_ent *heap;
  size_t nheap, heap_cap;
  int32_t *ids;
  size_t nids, ids_cap;
} enc;

static void enc_free(enc *e) {
  free(e->norm.p);
  free(e->norm2.p);
  free(e->bl.p);
  free(e->pcs);
  free(e->pcs2);
  pcre2_match_data_free(e->md);
  free(e->sid);
  free(e->slen);
  free(e->sprev);
  free(e->snext);
  free(e->heap);
  free(e->ids);
}

static int push_id(enc *e, int32_t id) {
  if (e->nids == e->ids_cap) {
    size_t cap = e->ids_cap ? 2 * e->ids_cap : 256;
    int32_t *np = realloc(e->ids, cap * sizeof *np);
    if (!np)
      return PA_ENOMEM;
    e->ids = np;
    e->ids_cap = cap;
  }
  e->ids[e->nids++] = id;
  return PA_OK;
}

static int push_piece(piece **arr, size_t *n, size_t *cap, piece p) {
  if (p.len == 0)
    return PA_OK;
  if (*n == *cap) {
    size_t c = *cap ? 2 * *cap : 64;
    piece *np = realloc(*arr, c * sizeof *np);
    if (!np)
      return PA_ENOMEM;
    *arr = np;
    *cap = c;
  }
  (*arr)[(*n)++] = p;
  return PA_OK;
}

static int heap_push(enc *e, heap_ent x) {
  if (e->nheap == e->heap_cap) {
    size_t cap = e->heap_cap ? 2 * e->heap_cap : 64;
    heap_ent *np = realloc(e->heap, cap * sizeof *np);
    if (!np)
      return PA_ENOMEM;
    e->heap = np;
    e->heap_cap = cap;
  }
  size_t i = e->nheap++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (e->heap[p].key <= x.key)
      break;
    e->heap[i] = e->heap[p];
    i = p;
  }
  e->heap[i] = x;
  return PA_OK;
}

static heap_ent heap_pop(enc *e) {
  heap_ent top = e->heap[0], last = e->heap[--e->nheap];
  size_t i = 0, n = e->nheap;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= n)
      break;
    if (c + 1 < n && e->heap[c + 1].key < e->heap[c].key)
      c++;
    if (e->heap[c].key >= last.key)
      break;
    e->heap[i] = e->heap[c];
    i = c;
  }
  if (n)
    e->heap[i] = last;
  return top;
}

static int ensure_syms(enc *e, size_t n) {
  if (n <= e->sym_cap)
    return PA_OK;
  size_t cap = e->sym_cap ? e->sym_cap : 64;
  while (cap < n)
    cap *= 2;
  int32_t *a = realloc(e->sid, cap * sizeof *a);
  if (a)
    e->sid = a;
  uint32_t *b = realloc(e->slen, cap * sizeof *b);
  if (b)
    e->slen = b;
  uint32_t *c = realloc(e->sprev, cap * sizeof *c);
  if (c)
    e->sprev = c;
  uint32_t *d = realloc(e->snext, cap * sizeof *d);
  if (d)
    e->snext = d;
  if (!a || !b || !c || !d)
    return PA_ENOMEM;
  e->sym_cap = cap;
  return PA_OK;
}

#define NONE UINT32_MAX

/* Floats mapped to integers that sort the same way, reversed, so the heap
 * (a min-heap) pops the highest score first. */
static uint32_t score_key(float s) {
  uint32_t u;
  memcpy(&u, &s, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~u;
}

/* Queues the pair (l, r) if it can merge. Rank-based models ask the merge
 * table; SentencePiece asks whether the joined text is a token, and prefers
 * the highest score (llama.cpp's llm_tokenizer_spm). */
static int try_pair(const pa_tokenizer *t, enc *e, const char *s, uint32_t l, uint32_t r) {
  if (l == NONE || r == NONE)
    return PA_OK;
  if (t->model == PA_TOK_SPM) {
    int32_t id = tmap_find(t, s + l, e->slen[l] + e->slen[r]);
    if (id < 0)
      return PA_OK;
    uint8_t ty = t->toks[id].type;
    /* SentencePiece only ever produces normal and user-defined pieces;
     * "<s>" typed as text must not become the control token. */
    if (ty != PA_TOKEN_NORMAL && ty != PA_TOKEN_USER_DEFINED && ty != PA_TOKEN_UNDEFINED)
      return PA_OK;
    return heap_push(e, (heap_ent){.key = (uint64_t)score_key(t->toks[id].score) << 32 | l,
                                   .right = r,
                                   .len = e->slen[l] + e->slen[r],
                                   .id = id});
  }
  if (e->sid[l] < 0 || e->sid[r] < 0)
    return PA_OK;
  const pair_slot *p = pmap_find(t, e->sid[l], e->sid[r]);
  if (!p)
    return PA_OK;
  return heap_push(
      e, (heap_ent){.key = (uint64_t)p->rank << 32 | l, .right = r, .len = e->slen[l] + e->slen[r], .id = p->id});
}

/* Appends the symbol at offset `at` of length k with id. */
static void add_sym(enc *e, uint32_t *first, uint32_t *last, uint32_t at, uint32_t k, int32_t id) {
  if (*first == NONE)
    *first = at;
  e->sid[at] = id;
  e->slen[at] = k;
  e->sprev[at] = *last;
  e->snext[at] = NONE;
  if (*last != NONE)
    e->snext[*last] = at;
  *last = at;
}

/* BPE on one piece s[0..n): symbols are indexed by their byte offset, so
 * the heap's tie-break on the left index is "leftmost first". */
static int bpe_piece(const pa_tokenizer *t, enc *e, const char *s, uint32_t n) {
  if (t->o.ignore_merges) {
    int32_t whole = -1;
    if (t->model == PA_TOK_BYTE_BPE) {
      e->bl.len = 0;
      for (uint32_t i = 0; i < n; i++)
        if (sbuf_put(&e->bl, t->byte_sym[(uint8_t)s[i]], t->byte_sym_len[(uint8_t)s[i]]))
          return PA_ENOMEM;
      whole = tmap_find(t, e->bl.p, e->bl.len);
    } else {
      whole = tmap_find(t, s, n);
    }
    if (whole >= 0)
      return push_id(e, whole);
  }
  if (ensure_syms(e, n))
    return PA_ENOMEM;
  uint32_t first = NONE, last = NONE;
  for (uint32_t i = 0; i < n;) {
    uint32_t cp, k = 1;
    if (t->model == PA_TOK_BYTE_BPE) {
      int32_t id = t->byte_id[(uint8_t)s[i]];
      /* a byte with no token is unknown: dropped unless the model has an
       * unknown token, before the merges or after them (a symbol of id -1
       * merges with nothing) */
      if (id < 0)
        id = t->o.unk;
      if (id >= 0 || t->o.drop_after_merges)
        add_sym(e, &first, &last, i, 1, id);
    } else {
      k = (uint32_t)pa_utf8_valid((const uint8_t *)s + i, n - i, &cp);
      if (k == 0)
        k = 1;
      int32_t id = tmap_find(t, s + i, k);
      if (t->model == PA_TOK_SPM || id >= 0) {
        /* SentencePiece decides about unknown characters after merging */
        add_sym(e, &first, &last, i, k, id);
      } else {
        bool all = t->o.byte_fallback;
        for (uint32_t j = 0; j < k && all; j++)
          all = t->byte_id[(uint8_t)s[i + j]] >= 0;
        if (all) {
          for (uint32_t j = 0; j < k; j++)
            add_sym(e, &first, &last, i + j, 1, t->byte_id[(uint8_t)s[i + j]]);
        } else if (t->o.unk >= 0) {
          if (t->o.fuse_unk && last != NONE && e->sid[last] == t->o.unk)
            e->slen[last] += k;
          else
            add_sym(e, &first, &last, i, k, t->o.unk);
        }
      }
    }
    i += k;
  }
  if (first == NONE)
    return PA_OK;
  e->nheap = 0;
  for (uint32_t i = first; e->snext[i] != NONE; i = e->snext[i])
    if (try_pair(t, e, s, i, e->snext[i]))
      return PA_ENOMEM;
  while (e->nheap) {
    heap_ent h = heap_pop(e);
    uint32_t l = (uint32_t)(h.key & 0xFFFFFFFFu), r = h.right;
    /* stale if either side has changed since the pair was queued: a symbol
     * only ever grows by absorbing its right neighbour */
    if (e->snext[l] != r || e->slen[l] + e->slen[r] != h.len || e->slen[l] == 0 || e->slen[r] == 0)
      continue;
    e->sid[l] = h.id;
    e->slen[l] = h.len;
    e->slen[r] = 0;
    e->snext[l] = e->snext[r];
    if (e->snext[r] != NONE)
      e->sprev[e->snext[r]] = l;
    if (try_pair(t, e, s, e->sprev[l], l) || try_pair(t, e, s, l, e->snext[l]))
      return PA_ENOMEM;
  }
  for (uint32_t i = first; i != NONE; i = e->snext[i]) {
    int32_t id = e->sid[i];
    if (t->model == PA_TOK_SPM && id < 0) {
      /* a character outside the vocabulary: its bytes, else unknown */
      bool all = true;
      for (uint32_t j = 0; j < e->slen[i] && all; j++)
        all = t->byte_id[(uint8_t)s[i + j]] >= 0;
      if (all) {
        for (uint32_t j = 0; j < e->slen[i]; j++)
          if (push_id(e, t->byte_id[(uint8_t)s[i + j]]))
            return PA_ENOMEM;
        continue;
      }
      id = t->o.unk;
    }
    if (id >= 0 && push_id(e, id)) /* -1: a byte-level byte dropped after the merges, or SentencePiece's unknown */
      return PA_ENOMEM;
  }
  return PA_OK;
}

/* The pieces one regex step makes of one input piece, by Hugging Face's
 * SplitDelimiterBehavior rules: segments alternate between gaps and matches
 * (matches may also follow one another), and the behaviour decides which
 * are joined. */
typedef struct {
  enc *e;
  pa_split_behavior behavior;
  size_t first_out; /* the first output piece that belongs to this input piece */
  bool prev_match;  /* the previous segment was a match */
  uint32_t pending; /* MergedWithNext: the start of a match waiting for its gap */
} seg_state;

static int out_piece(enc *e, uint32_t off, uint32_t len) {
  return push_piece(&e->pcs2, &e->npcs2, &e->pcs2_cap, (piece){.off = off, .len = len, .raw = false});
}

static int emit_segment(seg_state *ss, uint32_t off, uint32_t len, bool is_match) {
  enc *e = ss->e;
  bool have_prev = e->npcs2 > ss->first_out;
  int rc = PA_OK;
  switch (ss->behavior) {
  case PA_SPLIT_ISOLATED: rc = out_piece(e, off, len); break;
  case PA_SPLIT_REMOVED:
    if (!is_match)
      rc = out_piece(e, off, len);
    break;
  case PA_SPLIT_MERGED_WITH_PREVIOUS:
    if (is_match && !ss->prev_match && have_prev)
      e->pcs2[e->npcs2 - 1].len += len;
    else
      rc = out_piece(e, off, len);
    break;
  case PA_SPLIT_MERGED_WITH_NEXT:
    if (is_match) {
      if (ss->pending != NONE) /* two matches in a row: the first stands alone */
        rc = out_piece(e, ss->pending, off - ss->pending);
      ss->pending = off;
    } else if (ss->pending != NONE) {
      rc = out_piece(e, ss->pending, off + len - ss->pending);
      ss->pending = NONE;
    } else {
      rc = out_piece(e, off, len);
    }
    break;
  case PA_SPLIT_CONTIGUOUS:
    if (is_match && ss->prev_match && have_prev)
      e->pcs2[e->npcs2 - 1].len += len;
    else
      rc = out_piece(e, off, len);
    break;
  }
  ss->prev_match = is_match;
  return rc;
}

/* Cuts each piece of e->pcs by one regex step into e->pcs2, then swaps. */
static int split_pieces(const pa_tokenizer *t, enc *e, const char *text, const split_step *st) {
  e->npcs2 = 0;
  if (!e->md || pcre2_get_ovector_count(e->md) < 1) {
    pcre2_match_data_free(e->md);
    e->md = pcre2_match_data_create(1, NULL);
    if (!e->md)
      return PA_ENOMEM;
  }
  pcre2_match_data *md = e->md;
  int rc = PA_OK;
  for (size_t pi = 0; pi < e->npcs && !rc; pi++) {
    piece p = e->pcs[pi];
    if (p.raw) {
      rc = push_piece(&e->pcs2, &e->npcs2, &e->pcs2_cap, p);
      continue;
    }
    seg_state ss = {.e = e, .behavior = st->behavior, .first_out = e->npcs2, .prev_match = false, .pending = NONE};
    const char *subj = text + p.off;
    size_t start = 0, gap = 0;
    uint32_t options = 0;
    while (!rc && start <= p.len) {
      int m = pcre2_match(st->re, (PCRE2_SPTR)subj, p.len, start, options | PCRE2_NO_UTF_CHECK, md, NULL);
      if (m == PCRE2_ERROR_NOMATCH) {
        if (!options)
          break;
        /* no non-empty match where the empty one was: step one character */
        uint32_t cp;
        size_t k = start < p.len ? pa_utf8_valid((const uint8_t *)subj + start, p.len - start, &cp) : 1;
        start += k ? k : 1;
        options = 0;
        continue;
      }
      if (m < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(m, msg, sizeof msg);
        rc = pa_error(PA_EINVAL, "%s: the pre-tokenizer regex failed on the input: %s", t->source, (const char *)msg);
        break;
      }
      PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
      size_t ms = ov[0], me = ov[1];
      if (me == ms) {
        /* an empty match: look for a non-empty one at the same place */
        options = PCRE2_NOTEMPTY_ATSTART | PCRE2_ANCHORED;
        start = ms;
        continue;
      }
      options = 0;
      if (ms > gap)
        rc = emit_segment(&ss, p.off + (uint32_t)gap, (uint32_t)(ms - gap), st->invert);
      if (!rc)
        rc = emit_segment(&ss, p.off + (uint32_t)ms, (uint32_t)(me - ms), !st->invert);
      gap = start = me;
    }
    if (!rc && gap < p.len)
      rc = emit_segment(&ss, p.off + (uint32_t)gap, (uint32_t)(p.len - gap), st->invert);
    if (!rc && ss.pending != NONE) /* a match at the very end joins nothing */
      rc = out_piece(e, ss.pending, p.off + p.len - ss.pending);
  }
  if (rc)
    return rc;
  piece *tmp = e->pcs;
  e->pcs = e->pcs2;
  e->pcs2 = tmp;
  size_t tc = e->pcs_cap;
  e->pcs_cap = e->pcs2_cap;
  e->pcs2_cap = tc;
  e->npcs = e->npcs2;
  return PA_OK;
}

static bool starts_with(const sbuf *b, const char *s, size_t n) { return b->len >= n && memcmp(b->p, s, n) == 0; }

/* Appends the NFC form of s[0..n) to out. Only valid UTF-8 is composed
 * (utf8proc refuses the rest, and no composition can span an invalid byte);
 * invalid bytes are copied as they are, as every other step treats them. */
static int nfc_append(sbuf *out, const char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    size_t j = i, k;
    uint32_t cp;
    while (j < n && (k = pa_utf8_valid((const uint8_t *)s + j, n - j, &cp)))
      j += k;
    if (j > i) {
      utf8proc_uint8_t *composed = NULL;
      const utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(j - i), &composed,
                                              UTF8PROC_STABLE | UTF8PROC_COMPOSE);
      if (m < 0) {
        free(composed);
        return m == UTF8PROC_ERROR_NOMEM ? PA_ENOMEM : PA_EINVAL;
      }
      const int rc = sbuf_put(out, (const char *)composed, (size_t)m);
      free(composed);
      if (rc)
        return rc;
    }
    if (j < n && sbuf_put(out, s + j, 1))
      return PA_ENOMEM;
    i = j + (j < n);
  }
  return PA_OK;
}

/* Normalizes text[0..len) into e->norm: the normalizer steps, spaces to
 * "▁", then the space prefix. at_start: the fragment begins the input. */
static int normalize(const pa_tokenizer *t, enc *e, const char *text, size_t len, bool at_start) {
  e->norm.len = 0;
  if (sbuf_put(&e->norm, text, len))
    return PA_ENOMEM;
  for (size_t i = 0; i < t->n_norms; i++) {
    const norm_step *st = &t->norms[i];
    e->norm2.len = 0;
    if (st->kind == NORM_PREPEND) {
      if (e->norm.len == 0)
        continue;
      if (sbuf_put(&e->norm2, st->a, st->alen) || sbuf_put(&e->norm2, e->norm.p, e->norm.len))
        return PA_ENOMEM;
    } else if (st->kind == NORM_NFC) {
      const int rc = nfc_append(&e->norm2, e->norm.p, e->norm.len);
      if (rc)
        return rc == PA_ENOMEM ? rc : pa_error(rc, "%s: Unicode normalisation (NFC) failed on the input", t->source);
    } else {
      for (size_t j = 0; j < e->norm.len;) {
        if (j + st->alen <= e->norm.len && memcmp(e->norm.p + j, st->a, st->alen) == 0) {
          if (sbuf_put(&e->norm2, st->b, st->blen))
            return PA_ENOMEM;
          j += st->alen;
        } else {
          if (sbuf_put(&e->norm2, e->norm.p + j, 1))
            return PA_ENOMEM;
          j++;
        }
      }
    }
    sbuf tmp = e->norm;
    e->norm = e->norm2;
    e->norm2 = tmp;
  }
  const char *sp = t->o.space_to_meta ? "\xE2\x96\x81" : " ";
  size_t spn = strlen(sp);
  if (t->o.space_to_meta) {
    e->norm2.len = 0;
    for (size_t j = 0; j < e->norm.len; j++)
      if (e->norm.p[j] == ' ' ? sbuf_put(&e->norm2, sp, spn) : sbuf_put(&e->norm2, e->norm.p + j, 1))
        return PA_ENOMEM;
    sbuf tmp = e->norm;
    e->norm = e->norm2;
    e->norm2 = tmp;
  }
  bool prefix = false;
  switch (t->o.prefix) {
  case PA_PREFIX_NONE: break;
  case PA_PREFIX_EACH: prefix = e->norm.len > 0; break;
  case PA_PREFIX_FIRST: prefix = at_start && e->norm.len > 0 && !starts_with(&e->norm, sp, spn); break;
  case PA_PREFIX_ALWAYS: prefix = e->norm.len > 0 && !starts_with(&e->norm, sp, spn); break;
  }
  if (prefix) {
    e->norm2.len = 0;
    if (sbuf_put(&e->norm2, sp, spn) || sbuf_put(&e->norm2, e->norm.p, e->norm.len))
      return PA_ENOMEM;
    sbuf tmp = e->norm;
    e->norm = e->norm2;
    e->norm2 = tmp;
  }
  return PA_OK;
}

static int encode_fragment(const pa_tokenizer *t, enc *e, const char *text, size_t len, bool at_start) {
  if (len == 0)
    return PA_OK;
  int rc = normalize(t, e, text, len, at_start);
  if (rc)
    return rc;
  if (e->norm.len > UINT32_MAX)
    return pa_error(PA_EINVAL, "%s: a text fragment longer than 4 GiB", t->source);
  const char *s = e->norm.p;
  uint32_t n = (uint32_t)e->norm.len;
  e->npcs = 0;
  if (t->n_splits == 0) {
    rc = push_piece(&e->pcs, &e->npcs, &e->pcs_cap, (piece){.off = 0, .len = n, .raw = false});
  } else {
    /* Invalid UTF-8 bytes are cut out first, one piece each, so the regexes
     * only ever see valid text (PCRE2 in UTF mode requires it). */
    uint32_t run = 0;
    for (uint32_t i = 0; i < n && !rc;) {
      uint32_t cp;
      size_t k = pa_utf8_valid((const uint8_t *)s + i, n - i, &cp);
      if (k) {
        i += (uint32_t)k;
        continue;
      }
      rc = push_piece(&e->pcs, &e->npcs, &e->pcs_cap, (piece){.off = run, .len = i - run, .raw = false});
      if (!rc)
        rc = push_piece(&e->pcs, &e->npcs, &e->pcs_cap, (piece){.off = i, .len = 1, .raw = true});
      run = ++i;
    }
    if (!rc)
      rc = push_piece(&e->pcs, &e->npcs, &e->pcs_cap, (piece){.off = run, .len = n - run, .raw = false});
    for (size_t i = 0; i < t->n_splits && !rc; i++)
      rc = split_pieces(t, e, s, &t->splits[i]);
  }
  for (size_t i = 0; i < e->npcs && !rc; i++)
    rc = bpe_piece(t, e, s + e->pcs[i].off, e->pcs[i].len);
  if (rc == PA_ENOMEM)
    return pa_error(PA_ENOMEM, "%s: no memory to encode", t->source);
  return rc;
}

/* The added token that starts at text[i], longest first, or -1. */
static int32_t match_added(const pa_tokenizer *t, const char *text, size_t len, size_t i, bool parse_special) {
  uint8_t c = (uint8_t)text[i];
  for (uint32_t j = t->added_start[c]; j < t->added_start[c + 1]; j++) {
    int32_t id = t->added[j];
    const tok_entry *e = &t->toks[id];
    if (!parse_special && e->type != PA_TOKEN_USER_DEFINED)
      continue;
    if (e->text_len <= len - i && memcmp(text + i, t->arena + e->text_off, e->text_len) == 0)
      return id;
  }
  return -1;
}

/* Whitespace around lstrip/rstrip added tokens: the length of the white
 * space run that ends at `end` (going back, not before `lo`) or starts at
 * `at` (going forward). */
static size_t ws_before(const char *s, size_t lo, size_t end) {
  size_t i = end;
  while (i > lo) {
    size_t j = i - 1;
    while (j > lo && ((uint8_t)s[j] & 0xC0) == 0x80 && i - j < 4)
      j--;
    uint32_t cp;
    size_t k = pa_utf8_valid((const uint8_t *)s + j, i - j, &cp);
    if (k != i - j || !is_white_space(cp))
      break;
    i = j;
  }
  return end - i;
}

static size_t ws_after(const char *s, size_t at, size_t len) {
  size_t i = at;
  while (i < len) {
    uint32_t cp;
    size_t k = pa_utf8_valid((const uint8_t *)s + i, len - i, &cp);
    if (!k || !is_white_space(cp))
      break;
    i += k;
  }
  return i - at;
}

int pa_tokenizer_encode(const pa_tokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                        size_t *n_ids) {
  *ids = NULL;
  *n_ids = 0;
  assert(t->finished);
  if (!text) /* only with len 0, per the contract; keeps pointer arithmetic defined */
    text = "";
  enc e = {0};
  int rc = PA_OK;
  if ((flags & PA_TOK_ADD_SPECIAL) && t->o.add_bos)
    rc = push_id(&e, t->o.bos);
  bool parse_special = flags & PA_TOK_PARSE_SPECIAL;
  size_t frag = 0;
  for (size_t i = 0; i < len && !rc;) {
    int32_t id = t->added_start[(uint8_t)text[i]] < t->added_start[(uint8_t)text[i] + 1]
                     ? match_added(t, text, len, i, parse_special)
                     : -1;
    if (id < 0) {
      i++;
      continue;
    }
    const tok_entry *te = &t->toks[id];
    size_t end = i;
    if (te->lstrip)
      end -= ws_before(text, frag, i);
    rc = encode_fragment(t, &e, text + frag, end - frag, frag == 0);
    if (!rc)
      rc = push_id(&e, id);
    i += te->text_len;
    if (te->rstrip)
      i += ws_after(text, i, len);
    frag = i;
  }
  if (!rc)
    rc = encode_fragment(t, &e, text + frag, len - frag, frag == 0);
  if (!rc && (flags & PA_TOK_ADD_SPECIAL) && t->o.add_eos)
    rc = push_id(&e, t->o.eos);
  if (!rc && !e.ids && push_id(&e, 0) == PA_OK)
    e.nids = 0; /* an empty result still gets an array the caller can free */
  if (rc) {
    enc_free(&e);
    return rc == PA_ENOMEM ? pa_error(PA_ENOMEM, "%s: no memory to encode", t->source) : rc;
  }
  *ids = e.ids;
  *n_ids = e.nids;
  e.ids = NULL;
  enc_free(&e);
  return PA_OK;
}

/* ---- decoding and the vocabulary ------------------------------------------ */

int pa_tokenizer_decode(const pa_tokenizer *t, const int32_t *ids, size_t n, unsigned flags, char **text, size_t *len) {
  *text = NULL;
  *len = 0;
  sbuf out = {0};
  if (sbuf_reserve(&out, 0))
    return pa_error(PA_ENOMEM, "%s: no memory to decode", t->source);
  out.p[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    if (ids[i] < 0 || ids[i] >= t->n) {
      free(out.p);
      return pa_error(PA_EINVAL, "%s: token id %d (at %zu) is outside the vocabulary (0..%d)", t->source, ids[i], i,
                      t->n - 1);
    }
    const tok_entry *e = &t->toks[ids[i]];
    if ((e->type == PA_TOKEN_CONTROL || e->type == PA_TOKEN_UNKNOWN) && !(flags & PA_TOK_DECODE_SPECIAL))
      continue;
    if (sbuf_put(&out, t->arena + e->dec_off, e->dec_len)) {
      free(out.p);
      return pa_error(PA_ENOMEM, "%s: no memory to decode", t->source);
    }
  }
  size_t skip = 0;
  if ((flags & PA_TOK_DECODE_STRIP_SPACE) && t->strip_space && out.len > 0 && out.p[0] == ' ')
    skip = 1;
  if (skip)
    memmove(out.p, out.p + skip, out.len - skip + 1);
  *text = out.p;
  *len = out.len - skip;
  return PA_OK;
}

int32_t pa_tokenizer_n_vocab(const pa_tokenizer *t) { return t->n; }
pa_tokenizer_model pa_tokenizer_model_kind(const pa_tokenizer *t) { return t->model; }
const char *pa_tokenizer_describe(const pa_tokenizer *t) { return t->describe ? t->describe : ""; }

const char *pa_tokenizer_piece(const pa_tokenizer *t, int32_t id, size_t *len) {
  if (id < 0 || id >= t->n)
    return NULL;
  *len = t->toks[id].text_len;
  return t->arena + t->toks[id].text_off;
}

const char *pa_tokenizer_token_bytes(const pa_tokenizer *t, int32_t id, size_t *len) {
  if (id < 0 || id >= t->n)
    return NULL;
  *len = t->toks[id].dec_len;
  return t->arena + t->toks[id].dec_off;
}

int32_t pa_tokenizer_find(const pa_tokenizer *t, const char *text) { return tmap_find(t, text, strlen(text)); }

pa_token_type pa_tokenizer_token_type(const pa_tokenizer *t, int32_t id) {
  return id < 0 || id >= t->n ? PA_TOKEN_UNDEFINED : (pa_token_type)t->toks[id].type;
}

bool pa_tokenizer_is_special(const pa_tokenizer *t, int32_t id) {
  pa_token_type ty = pa_tokenizer_token_type(t, id);
  return ty == PA_TOKEN_CONTROL || ty == PA_TOKEN_UNKNOWN;
}

int32_t pa_tokenizer_bos(const pa_tokenizer *t) { return t->o.bos; }
int32_t pa_tokenizer_eos(const pa_tokenizer *t) { return t->o.eos; }
int32_t pa_tokenizer_unk(const pa_tokenizer *t) { return t->o.unk; }
int32_t pa_tokenizer_pad(const pa_tokenizer *t) { return t->o.pad; }
int32_t pa_tokenizer_eot(const pa_tokenizer *t) { return t->o.eot; }
bool pa_tokenizer_add_bos(const pa_tokenizer *t) { return t->o.add_bos; }
bool pa_tokenizer_add_eos(const pa_tokenizer *t) { return t->o.add_eos; }
