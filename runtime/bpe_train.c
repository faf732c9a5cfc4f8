#include "bpe_train.h"

#include "status.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pa_bpe_vocab {
  size_t n_tokens, cap_tokens;
  char **tokens;
  size_t n_merges;
  char **merges;
};

size_t pa_bpe_byte_to_unicode(uint8_t b, char out[4]) {
  /* Printable Latin-1 bytes stand for themselves; the other 68 (controls,
   * space, DEL, NBSP, soft hyphen) are moved, in byte order, to 256.. */
  unsigned cp;
  if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) {
    cp = b;
  } else {
    unsigned k = 0; /* how many moved bytes come before b */
    for (unsigned x = 0; x < b; x++)
      if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE))
        k++;
    cp = 256 + k;
  }
  if (cp < 0x80) {
    out[0] = (char)cp;
    out[1] = '\0';
    return 1;
  }
  out[0] = (char)(0xC0 | (cp >> 6));
  out[1] = (char)(0x80 | (cp & 0x3F));
  out[2] = '\0';
  return 2;
}

/* ---- pre-tokenizer ------------------------------------------------------------ */

static bool is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
static bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static bool is_letter(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80; }
static bool is_other(unsigned char c) { return !is_space(c) && !is_digit(c) && !is_letter(c); }

/* GPT-2's pattern, in the order its alternatives are tried:
 *   's|'t|'re|'ve|'m|'ll|'d | ?\p{L}+ | ?\p{N}+ | ?[^\s\p{L}\p{N}]+ | \s+(?!\S) | \s+
 * applied to the digit-free stretches between single digits. A stretch ends
 * at a digit, which is why trailing whitespace before a digit stays whole. */
size_t pa_bpe_pretok_next(const char *text, size_t len, size_t pos) {
  const unsigned char *s = (const unsigned char *)text;
  if (is_digit(s[pos]))
    return pos + 1;
  size_t end = pos; /* end of the digit-free stretch */
  while (end < len && !is_digit(s[end]))
    end++;
  size_t i = pos;
  if (s[i] == '\'' && i + 1 < end) {
    static const char *const contractions[] = {"re", "ve", "ll", "s", "t", "m", "d"};
    for (size_t k = 0; k < sizeof contractions / sizeof contractions[0]; k++) {
      size_t n = strlen(contractions[k]);
      if (i + 1 + n <= end && memcmp(s + i + 1, contractions[k], n) == 0)
        return i + 1 + n;
    }
  }
  size_t j = i + (s[i] == ' ' && i + 1 < end);
  if (is_letter(s[j])) {
    while (j < end && is_letter(s[j]))
      j++;
    return j;
  }
  if (is_other(s[j])) {
    while (j < end && is_other(s[j]))
      j++;
    return j;
  }
  j = i;
  while (j < end && is_space(s[j]))
    j++;
  /* \s+(?!\S): all of it at the stretch's end; else all but the last, which
   * then leads the next piece; a single space before text falls to \s+ */
  if (j == end || j - i == 1)
    return j;
  return j - 1;
}

/* ---- training ------------------------------------------------------------------- */

typedef struct {
  int32_t *sym;
  size_t n;
  int64_t count;
} word;

typedef struct {
  int32_t a, b;
  int64_t w;
} pair;

static int cmp_pair(const void *x, const void *y) {
  const pair *p = x, *q = y;
  if (p->a != q->a)
    return p->a < q->a ? -1 : 1;
  return p->b < q->b ? -1 : p->b > q->b;
}

typedef struct {
  const char *p;
  size_t n;
} piece;

static int cmp_piece(const void *x, const void *y) {
  const piece *p = x, *q = y;
  size_t n = p->n < q->n ? p->n : q->n;
  int c = memcmp(p->p, q->p, n);
  return c ? c : (p->n > q->n) - (p->n < q->n);
}

void pa_bpe_vocab_destroy(pa_bpe_vocab *v) {
  if (!v)
    return;
  for (size_t i = 0; i < v->n_tokens; i++)
    free(v->tokens[i]);
  for (size_t i = 0; i < v->n_merges; i++)
    free(v->merges[i]);
  free(v->tokens);
  free(v->merges);
  free(v);
}

/* The id of token s, adding it if new; -1 when out of memory. */
static int32_t intern(pa_bpe_vocab *v, char *s) {
  for (size_t i = 256; i < v->n_tokens; i++)
    if (strcmp(v->tokens[i], s) == 0) {
      free(s);
      return (int32_t)i;
    }
  if (v->n_tokens == v->cap_tokens) {
    size_t cap = v->cap_tokens * 2;
    char **t = realloc(v->tokens, cap * sizeof *t);
    if (!t) {
      free(s);
      return -1;
    }
    v->tokens = t;
    v->cap_tokens = cap;
  }
  v->tokens[v->n_tokens] = s;
  return (int32_t)v->n_tokens++;
}

/* Splits the text into pieces and gathers the distinct ones with counts. */
static int collect_words(const char *text, size_t len, word **out, size_t *n_out) {
  size_t n_pieces = 0;
  piece *pieces = malloc((len ? len : 1) * sizeof *pieces);
  if (!pieces)
    return pa_error(PA_ENOMEM, "BPE trainer: no memory");
  for (size_t pos = 0; pos < len;) {
    size_t end = pa_bpe_pretok_next(text, len, pos);
    pieces[n_pieces++] = (piece){text + pos, end - pos};
    pos = end;
  }
  qsort(pieces, n_pieces, sizeof *pieces, cmp_piece);
  word *words = calloc(n_pieces ? n_pieces : 1, sizeof *words);
  size_t n = 0;
  int rc = words ? PA_OK : pa_error(PA_ENOMEM, "BPE trainer: no memory");
  for (size_t i = 0; !rc && i < n_pieces; i++) {
    if (n && cmp_piece(&pieces[i], &pieces[i - 1]) == 0) {
      words[n - 1].count++;
      continue;
    }
    word *w = &words[n++];
    w->n = pieces[i].n;
    w->count = 1;
    if (!(w->sym = malloc(w->n * sizeof *w->sym)))
      rc = pa_error(PA_ENOMEM, "BPE trainer: no memory");
    for (size_t k = 0; !rc && k < w->n; k++)
      w->sym[k] = (unsigned char)pieces[i].p[k];
  }
  free(pieces);
  *out = words;
  *n_out = n;
  return rc;
}

/* The most frequent pair; false if no word has two symbols left. */
static bool best_pair(const pa_bpe_vocab *v, const word *words, size_t n_words, pair *scratch, pair *best) {
  size_t n = 0;
  for (size_t i = 0; i < n_words; i++)
    for (size_t k = 0; k + 1 < words[i].n; k++)
      scratch[n++] = (pair){words[i].sym[k], words[i].sym[k + 1], words[i].count};
  if (n == 0)
    return false;
  qsort(scratch, n, sizeof *scratch, cmp_pair);
  bool have = false;
  for (size_t i = 0; i < n;) {
    pair p = scratch[i++];
    while (i < n && scratch[i].a == p.a && scratch[i].b == p.b)
      p.w += scratch[i++].w;
    int c = 0;
    if (have && p.w == best->w) {
      c = strcmp(v->tokens[p.a], v->tokens[best->a]);
      if (c == 0)
        c = strcmp(v->tokens[p.b], v->tokens[best->b]);
    }
    if (!have || p.w > best->w || (p.w == best->w && c < 0)) {
      *best = p;
      have = true;
    }
  }
  return true;
}

static void apply_merge(word *words, size_t n_words, pair p, int32_t id) {
  for (size_t i = 0; i < n_words; i++) {
    word *w = &words[i];
    size_t o = 0;
    for (size_t k = 0; k < w->n; k++) {
      if (k + 1 < w->n && w->sym[k] == p.a && w->sym[k + 1] == p.b) {
        w->sym[o++] = id;
        k++;
      } else {
        w->sym[o++] = w->sym[k];
      }
    }
    w->n = o;
  }
}

int pa_bpe_train(const char *text, size_t len, int32_t n_merges, pa_bpe_vocab **out) {
  *out = NULL;
  if (n_merges < 0)
    return pa_error(PA_EINVAL, "BPE trainer: %d merges requested", n_merges);
  pa_bpe_vocab *v = calloc(1, sizeof *v);
  word *words = NULL;
  size_t n_words = 0, n_syms = 0;
  pair *scratch = NULL;
  int rc = PA_OK;
  if (!v || !(v->tokens = malloc(512 * sizeof *v->tokens)) ||
      !(v->merges = malloc(((size_t)n_merges + 1) * sizeof *v->merges))) {
    rc = pa_error(PA_ENOMEM, "BPE trainer: no memory");
    goto done;
  }
  v->cap_tokens = 512;
  for (int b = 0; b < 256; b++) {
    char u[4];
    pa_bpe_byte_to_unicode((uint8_t)b, u);
    if (!(v->tokens[b] = strdup(u))) {
      rc = pa_error(PA_ENOMEM, "BPE trainer: no memory");
      goto done;
    }
    v->n_tokens++;
  }
  if ((rc = collect_words(text, len, &words, &n_words)))
    goto done;
  for (size_t i = 0; i < n_words; i++)
    n_syms += words[i].n;
  if (!(scratch = malloc((n_syms ? n_syms : 1) * sizeof *scratch))) {
    rc = pa_error(PA_ENOMEM, "BPE trainer: no memory");
    goto done;
  }
  while (v->n_merges < (size_t)n_merges) {
    pair p;
    if (!best_pair(v, words, n_words, scratch, &p)) {
      rc = pa_error(PA_EINVAL, "BPE trainer: the text allows only %zu merges, %d requested", v->n_merges, n_merges);
      goto done;
    }
    const char *l = v->tokens[p.a], *r = v->tokens[p.b];
    size_t ll = strlen(l), rl = strlen(r);
    char *joined = malloc(ll + rl + 1), *line = malloc(ll + rl + 2);
    if (!joined || !line) {
      free(joined);
      free(line);
      rc = pa_error(PA_ENOMEM, "BPE trainer: no memory");
      goto done;
    }
    snprintf(joined, ll + rl + 1, "%s%s", l, r);
    snprintf(line, ll + rl + 2, "%s %s", l, r);
    v->merges[v->n_merges++] = line;
    int32_t id = intern(v, joined);
    if (id < 0) {
      rc = pa_error(PA_ENOMEM, "BPE trainer: no memory");
      goto done;
    }
    apply_merge(words, n_words, p, id);
  }
done:
  for (size_t i = 0; i < n_words; i++)
    free(words[i].sym);
  free(words);
  free(scratch);
  if (rc) {
    pa_bpe_vocab_destroy(v);
    return rc;
  }
  *out = v;
  return PA_OK;
}

size_t pa_bpe_vocab_n_tokens(const pa_bpe_vocab *v) { return v->n_tokens; }
const char *pa_bpe_vocab_token(const pa_bpe_vocab *v, size_t i) { return i < v->n_tokens ? v->tokens[i] : NULL; }
size_t pa_bpe_vocab_n_merges(const pa_bpe_vocab *v) { return v->n_merges; }
const char *pa_bpe_vocab_merge(const pa_bpe_vocab *v, size_t i) { return i < v->n_merges ? v->merges[i] : NULL; }
