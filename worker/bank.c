#include "bank.h"

#include "build_info.h"
#include "fileio.h"
#include "prompts.h"
#include "status.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char MAGIC[8] = {'P', 'A', 'L', 'I', 'G', 'N', 'B', 'K'};
enum {
  FIXED_HEAD = 16, /* magic, version (u32 LE), header length (u32 LE) */
  DIGEST = 32,     /* SHA-256 at the end */
  DATA_ALIGN = 64, /* the header is padded with spaces so the data starts at a multiple of this */
  MAX_HEADER = 1 << 24,
};
static const char LETTERS[2] = {'A', 'E'}; /* sequence 2i and 2i+1 */

struct pa_bank {
  float *z; /* [2 n_items][n_layers][n_heads][head_dim] */
  int n_items, n_layers, n_heads, head_dim;
  int *items; /* [n_items] item numbers, bank order */
  /* what it was made from: checked against the key on save */
  char inventory[65], tokens[65], template_name[32];
  char weights[8]; /* pa_lm_weights of the model it was computed on */
  char *system, *prefix;
  bool lowercase;
  pa_bank_stats stats;
  int slice_first, slice_n; /* the sequences this process computed (all, unless sliced) */
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- SHA-256 through OpenSSL's EVP ---------------------------------------- */

/* Every libcrypto call goes through this: the call, the place, OpenSSL's message. */
#define SSL_CHECK(call)                                                                                                \
  do {                                                                                                                 \
    if (!(call))                                                                                                       \
      return ssl_error(#call, __LINE__);                                                                               \
  } while (0)

static int ssl_error(const char *call, int line) {
  char msg[256] = "no message";
  unsigned long e = ERR_get_error();
  if (e)
    ERR_error_string_n(e, msg, sizeof msg);
  return pa_error(PA_ENOMEM, "OpenSSL %s failed (bank.c:%d): %s", call, line, msg);
}

static void to_hex(const unsigned char md[DIGEST], char out[65]) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < DIGEST; i++) {
    out[2 * i] = digits[md[i] >> 4];
    out[2 * i + 1] = digits[md[i] & 15];
  }
  out[64] = '\0';
}

static int sha_begin(EVP_MD_CTX **c) {
  *c = EVP_MD_CTX_new();
  if (!*c)
    return ssl_error("EVP_MD_CTX_new()", __LINE__);
  if (!EVP_DigestInit_ex(*c, EVP_sha256(), NULL)) {
    EVP_MD_CTX_free(*c);
    *c = NULL;
    return ssl_error("EVP_DigestInit_ex(sha256)", __LINE__);
  }
  return PA_OK;
}

static int sha_update(EVP_MD_CTX *c, const void *p, size_t n) {
  SSL_CHECK(EVP_DigestUpdate(c, p, n));
  return PA_OK;
}

/* Finishes and frees c (also on failure). */
static int sha_end(EVP_MD_CTX *c, unsigned char md[DIGEST]) {
  unsigned int len = 0;
  const int ok = EVP_DigestFinal_ex(c, md, &len) && len == DIGEST;
  EVP_MD_CTX_free(c);
  return ok ? PA_OK : ssl_error("EVP_DigestFinal_ex", __LINE__);
}

static int sha_chunks(const pa_chunk *ch, size_t n, unsigned char md[DIGEST]) {
  EVP_MD_CTX *c;
  int rc = sha_begin(&c);
  for (size_t i = 0; !rc && i < n; i++)
    rc = sha_update(c, ch[i].data, ch[i].len);
  if (rc) {
    EVP_MD_CTX_free(c);
    return rc;
  }
  return sha_end(c, md);
}

static void put_u32(unsigned char *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static bool host_little_endian(void) {
  const uint16_t one = 1;
  unsigned char b;
  memcpy(&b, &one, 1);
  return b == 1;
}

/* ---- fingerprints ----------------------------------------------------------- */

static int hash_file(EVP_MD_CTX *c, const char *path, unsigned char *buf, size_t cap) {
  uint64_t size;
  const int fd = pa_open_regular(path, &size);
  if (fd < 0)
    return fd;
  int rc = PA_OK;
  for (ssize_t n; !rc && (n = read(fd, buf, cap)) != 0;) {
    if (n < 0 && errno == EINTR)
      continue;
    rc = n < 0 ? pa_error(PA_EIO, "%s: read error while fingerprinting: %s", path, strerror(errno))
               : sha_update(c, buf, (size_t)n);
  }
  close(fd);
  return rc;
}

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static bool ends_with(const char *s, const char *suffix) {
  const size_t n = strlen(s), m = strlen(suffix);
  return n > m && !strcmp(s + n - m, suffix);
}

/* The *.safetensors names of dir, sorted; *names malloc'd (free each). */
static int safetensors_names(const char *dir, char ***names, size_t *n) {
  *names = NULL;
  *n = 0;
  DIR *d = opendir(dir);
  if (!d)
    return pa_error(PA_EIO, "%s: cannot list the directory: %s", dir, strerror(errno));
  size_t cap = 0;
  int rc = PA_OK;
  for (struct dirent *e; !rc && (e = readdir(d));) {
    if (!ends_with(e->d_name, ".safetensors"))
      continue;
    if (*n == cap) {
      cap = cap ? 2 * cap : 8;
      char **grown = realloc(*names, cap * sizeof *grown);
      if (!grown) {
        rc = pa_error(PA_ENOMEM, "no memory");
        break;
      }
      *names = grown;
    }
    if (!((*names)[*n] = strdup(e->d_name)))
      rc = pa_error(PA_ENOMEM, "no memory");
    else
      ++*n;
  }
  closedir(d);
  if (!rc && *n == 0)
    rc = pa_error(PA_ENOTFOUND, "%s: no *.safetensors file to fingerprint", dir);
  if (!rc)
    qsort(*names, *n, sizeof **names, cmp_names);
  return rc;
}

int pa_model_fingerprint(const char *model_path, char out[65]) {
  out[0] = '\0';
  struct stat st;
  if (stat(model_path, &st) != 0)
    return pa_error(errno == ENOENT ? PA_ENOTFOUND : PA_EIO, "%s: cannot fingerprint the model: %s", model_path,
                    strerror(errno));
  char **names = NULL;
  size_t n = 0;
  const size_t cap = (size_t)1 << 20;
  unsigned char *buf = malloc(cap);
  EVP_MD_CTX *c = NULL;
  int rc = buf ? sha_begin(&c) : pa_error(PA_ENOMEM, "no memory");
  if (!rc && S_ISDIR(st.st_mode)) {
    rc = safetensors_names(model_path, &names, &n);
    for (size_t i = 0; !rc && i < n; i++) {
      const size_t len = strlen(model_path) + strlen(names[i]) + 2;
      char *p = malloc(len);
      if (!p) {
        rc = pa_error(PA_ENOMEM, "no memory");
        break;
      }
      snprintf(p, len, "%s/%s", model_path, names[i]);
      rc = hash_file(c, p, buf, cap);
      free(p);
    }
  } else if (!rc) {
    rc = hash_file(c, model_path, buf, cap);
  }
  unsigned char md[DIGEST];
  if (!rc) {
    rc = sha_end(c, md);
    c = NULL;
  }
  if (!rc)
    to_hex(md, out);
  EVP_MD_CTX_free(c);
  for (size_t i = 0; i < n; i++)
    free(names[i]);
  free(names);
  free(buf);
  return rc;
}

/* The bank's items, malloc'd; PA_EINVAL when there are none. */
static int bank_items(const pa_inventory *inv, int **items, int *n) {
  *items = malloc(PA_MAX_ITEMS * sizeof **items);
  if (!*items)
    return pa_error(PA_ENOMEM, "no memory");
  *n = pa_pas_bank_items(inv, *items, PA_MAX_ITEMS);
  if (*n < 0)
    return *n;
  if (*n == 0)
    return pa_error(PA_EINVAL, "the inventory has no train items: the activation bank would be empty");
  return PA_OK;
}

static int inventory_fingerprint(const pa_inventory *inv, const int *items, int n, char out[65]) {
  EVP_MD_CTX *c;
  int rc = sha_begin(&c);
  for (int i = 0; !rc && i < n; i++) {
    const pa_item *it = pa_inventory_item(inv, items[i]);
    char num[16];
    snprintf(num, sizeof num, "%d\t", items[i]);
    if (!(rc = sha_update(c, num, strlen(num))) && !(rc = sha_update(c, it->text, strlen(it->text))))
      rc = sha_update(c, "\n", 1);
  }
  unsigned char md[DIGEST];
  if (rc) {
    EVP_MD_CTX_free(c);
    return rc;
  }
  if ((rc = sha_end(c, md)))
    return rc;
  to_hex(md, out);
  return PA_OK;
}

int pa_bank_inventory_fingerprint(const pa_inventory *inv, char out[65]) {
  int *items, n;
  int rc = bank_items(inv, &items, &n);
  if (!rc)
    rc = inventory_fingerprint(inv, items, n, out);
  free(items);
  return rc;
}

/* ---- the prompts ------------------------------------------------------------ */

typedef struct {
  const char *system, *prefix, *weights;
  bool lowercase;
} settings;

static settings resolve(const pa_bank_opts *o) {
  return (settings){.system = o && o->system ? o->system : PA_DEFAULT_SYSTEM,
                    .prefix = o && o->prefix ? o->prefix : PA_BANK_DEFAULT_PREFIX,
                    .weights = o && o->weights ? o->weights : "fp32",
                    .lowercase = o && o->lowercase};
}

typedef struct {
  int n_items;
  int *items;      /* [n_items] */
  int32_t **ids;   /* [2 n_items] token ids of each whole sequence */
  size_t *len;     /* [2 n_items] */
  char tokens[65]; /* fingerprint of all of them */
  char inventory[65];
} prompts;

static void prompts_free(prompts *p) {
  for (int s = 0; p->ids && s < 2 * p->n_items; s++)
    free(p->ids[s]);
  free(p->ids), free(p->len), free(p->items);
  memset(p, 0, sizeof *p);
}

/* The token a letter becomes right after the prefix, on its own: the one
 * token by which "prefix + letter" extends "prefix" (as eval.c reads answers). */
static int letter_token(const pa_tokenizer *tok, const char *prefix, char letter, int32_t *id) {
  int32_t *base = NULL, *ext = NULL;
  size_t nb = 0, ne = 0;
  const size_t plen = strlen(prefix);
  char *text = malloc(plen + 2);
  int rc = text ? pa_tokenizer_encode(tok, prefix, plen, 0, &base, &nb) : pa_error(PA_ENOMEM, "no memory");
  if (!rc) {
    memcpy(text, prefix, plen);
    text[plen] = letter, text[plen + 1] = '\0';
    rc = pa_tokenizer_encode(tok, text, plen + 1, 0, &ext, &ne);
  }
  if (!rc && (ne != nb + 1 || memcmp(base, ext, nb * sizeof *base) != 0))
    rc = pa_error(PA_EUNSUPPORTED,
                  "activation bank: after the prefix \"%s\" the letter %c is not one token of its own for this "
                  "tokenizer (choose another prefix)",
                  prefix, letter);
  if (!rc)
    *id = ext[ne - 1];
  free(text), free(base), free(ext);
  return rc;
}

/* Tokenizes every sequence whole and checks that each ends in its letter,
 * one token after the prompt that stops at the prefix. */
static int build_prompts(const pa_tokenizer *tok, const pa_chat_template *tmpl, const pa_inventory *inv,
                         const settings *st, prompts *p) {
  memset(p, 0, sizeof *p);
  int32_t letter_id[2];
  int rc = bank_items(inv, &p->items, &p->n_items);
  for (int k = 0; !rc && k < 2; k++)
    rc = letter_token(tok, st->prefix, LETTERS[k], &letter_id[k]);
  if (!rc)
    rc = inventory_fingerprint(inv, p->items, p->n_items, p->inventory);
  const int S = 2 * p->n_items;
  if (!rc) {
    p->ids = calloc((size_t)S, sizeof *p->ids);
    p->len = calloc((size_t)S, sizeof *p->len);
    if (!p->ids || !p->len)
      rc = pa_error(PA_ENOMEM, "no memory");
  }
  const size_t plen = strlen(st->prefix);
  char *assistant = malloc(plen + 2);
  if (!rc && !assistant)
    rc = pa_error(PA_ENOMEM, "no memory");
  EVP_MD_CTX *c = NULL;
  if (!rc)
    rc = sha_begin(&c);
  for (int i = 0; !rc && i < p->n_items; i++) {
    const pa_item *item = pa_inventory_item(inv, p->items[i]);
    char *q = pa_prompt_question(item, st->lowercase);
    int32_t *open = NULL; /* the prompt that stops at the prefix */
    size_t n_open = 0;
    rc = q ? pa_chat_tokenize(tmpl, tok, st->system, q, st->prefix, &open, &n_open) : PA_ENOMEM;
    for (int k = 0; !rc && k < 2; k++) {
      const int s = 2 * i + k;
      memcpy(assistant, st->prefix, plen);
      assistant[plen] = LETTERS[k], assistant[plen + 1] = '\0';
      if ((rc = pa_chat_tokenize(tmpl, tok, st->system, q, assistant, &p->ids[s], &p->len[s])))
        break;
      if (p->len[s] != n_open + 1 || memcmp(p->ids[s], open, n_open * sizeof *open) != 0 ||
          p->ids[s][n_open] != letter_id[k]) {
        rc = pa_error(PA_EUNSUPPORTED,
                      "activation bank: item %d: in the %s prompt, the answer letter %c is not one token (id %d) "
                      "after the prefix \"%s\" (%zu tokens with the letter, %zu without)",
                      p->items[i], pa_chat_template_name(tmpl), LETTERS[k], (int)letter_id[k], st->prefix, p->len[s],
                      n_open);
        break;
      }
      const uint32_t n32 = (uint32_t)p->len[s];
      unsigned char le[4];
      put_u32(le, n32);
      rc = sha_update(c, le, 4);
      for (size_t j = 0; !rc && j < p->len[s]; j++) {
        put_u32(le, (uint32_t)p->ids[s][j]);
        rc = sha_update(c, le, 4);
      }
    }
    free(open);
    free(q);
  }
  free(assistant);
  if (!rc) {
    unsigned char md[DIGEST];
    rc = sha_end(c, md);
    c = NULL;
    if (!rc)
      to_hex(md, p->tokens);
  }
  EVP_MD_CTX_free(c);
  if (rc)
    prompts_free(p);
  return rc;
}

/* ---- computing the bank ------------------------------------------------------ */

void pa_bank_destroy(pa_bank *b) {
  if (!b)
    return;
  free(b->z), free(b->items), free(b->system), free(b->prefix);
  free(b);
}

/* A bank of the given shape with its settings, data uninitialised. */
static int bank_new(int n_items, int L, int H, int hd, const char *system, const char *prefix, pa_bank **out) {
  *out = NULL;
  pa_bank *b = calloc(1, sizeof *b);
  if (!b)
    return pa_error(PA_ENOMEM, "no memory");
  b->n_items = n_items, b->n_layers = L, b->n_heads = H, b->head_dim = hd;
  b->slice_first = 0, b->slice_n = 2 * n_items;
  const size_t n = (size_t)2 * n_items * L * H * hd;
  b->z = malloc(n * sizeof *b->z);
  b->items = malloc((size_t)n_items * sizeof *b->items);
  b->system = strdup(system);
  b->prefix = strdup(prefix);
  if (!b->z || !b->items || !b->system || !b->prefix) {
    pa_bank_destroy(b);
    return pa_error(PA_ENOMEM, "no memory for an activation bank of %zu floats", n);
  }
  *out = b;
  return PA_OK;
}

int pa_bank_compute(pa_lm *lm, const pa_tokenizer *tok, const pa_chat_template *tmpl, const pa_inventory *inv,
                    const pa_bank_opts *o, pa_bank **out) {
  *out = NULL;
  const double t0 = now();
  const settings st = resolve(o);
  const int batch = o && o->batch > 0 ? o->batch : 32;
  const pa_model_config *c = pa_lm_config(lm);
  prompts p;
  int rc = build_prompts(tok, tmpl, inv, &st, &p);
  if (rc)
    return rc;
  const int S = 2 * p.n_items;

  /* the longest common token prefix, leaving every sequence at least one token */
  size_t common = p.len[0], longest = 0, shortest = p.len[0];
  long naive = 0;
  for (int s = 0; s < S; s++) {
    size_t k = 0;
    while (k < common && k < p.len[s] && p.ids[s][k] == p.ids[0][k])
      k++;
    common = k;
    longest = p.len[s] > longest ? p.len[s] : longest;
    shortest = p.len[s] < shortest ? p.len[s] : shortest;
    naive += (long)p.len[s];
  }
  if (common >= shortest)
    common = shortest - 1;
  if (o && o->no_share)
    common = 0;
  if (longest > (size_t)pa_lm_max_seq(lm))
    rc = pa_error(PA_EINVAL, "activation bank: a prompt has %zu tokens, more than the %d the model was opened for",
                  longest, pa_lm_max_seq(lm));

  pa_bank *b = NULL;
  if (!rc)
    rc = bank_new(p.n_items, c->n_layers, c->n_heads, c->head_dim, st.system, st.prefix, &b);
  pa_kv *pkv = NULL, **slot = NULL;
  const int n_slots = S < batch ? S : batch;
  pa_seq *seqs = malloc((size_t)n_slots * sizeof *seqs);
  if (!rc && (!seqs || !(slot = calloc((size_t)n_slots, sizeof *slot))))
    rc = pa_error(PA_ENOMEM, "no memory");
  if (!rc && common > 0) {
    if (!(rc = pa_kv_create(lm, (int)common, &pkv))) {
      pa_seq one = {.tokens = p.ids[0], .n_tokens = (int)common, .kv = pkv};
      rc = pa_lm_forward(lm, &(pa_batch){.seqs = &one, .n_seqs = 1});
    }
  }
  for (int i = 0; !rc && i < n_slots; i++)
    rc = pa_kv_create(lm, (int)(longest - common), &slot[i]);
  long continuation = 0;
  const size_t per_seq = (size_t)c->n_layers * c->n_heads * c->head_dim;
  /* An item's A and E sequences differ only in their last token, so each
   * question is computed once: question + A, then the cache is cut back by
   * one token and E follows. */
  bool pairs = !(o && o->no_share);
  for (int i = 0; pairs && i < p.n_items; i++)
    pairs = p.len[2 * i] == p.len[2 * i + 1] &&
            !memcmp(p.ids[2 * i], p.ids[2 * i + 1], (p.len[2 * i] - 1) * sizeof *p.ids[0]);
  float *heads = NULL;
  if (!rc && pairs && !(heads = malloc((size_t)n_slots * per_seq * sizeof *heads)))
    rc = pa_error(PA_ENOMEM, "no memory");
  const int step = pairs ? 2 : 1; /* sequences per slot */
  const int per_batch = step * n_slots, n_batches = (S + per_batch - 1) / per_batch;
  const int n_slices = o && o->n_slices > 1 ? o->n_slices : 1, slice = n_slices > 1 ? o->slice : 0;
  if (!rc && (slice < 0 || slice >= n_slices))
    rc = pa_error(PA_EINVAL, "activation bank: slice %d of %d", slice, n_slices);
  const int first_seq = (int)((long)n_batches * slice / n_slices) * per_batch;
  int end_seq = (int)((long)n_batches * (slice + 1) / n_slices) * per_batch;
  end_seq = end_seq < S ? end_seq : S;
  if (b) {
    b->slice_first = first_seq;
    b->slice_n = end_seq > first_seq ? end_seq - first_seq : 0;
  }
  for (int start = first_seq; !rc && start < end_seq; start += per_batch) {
    const int B = (S - start + step - 1) / step < n_slots ? (S - start + step - 1) / step : n_slots;
    for (int k = 0; k < B; k++) {
      const int s = start + step * k;
      pa_kv_clear(slot[k]);
      seqs[k] = (pa_seq){.tokens = p.ids[s] + common, .n_tokens = (int)(p.len[s] - common), .kv = slot[k]};
      continuation += (long)(p.len[s] - common);
    }
    if (!pairs) {
      /* pa_batch.heads is [n_seqs][L][H][hd]: the bank's own layout, so the batch writes in place */
      rc = pa_lm_forward(lm, &(pa_batch){.prefix = pkv, .seqs = seqs, .n_seqs = B, .heads = b->z + start * per_seq});
    } else {
      rc = pa_lm_forward(lm, &(pa_batch){.prefix = pkv, .seqs = seqs, .n_seqs = B, .heads = heads});
      for (int k = 0; !rc && k < B; k++) {
        memcpy(b->z + (size_t)(start + 2 * k) * per_seq, heads + (size_t)k * per_seq, per_seq * sizeof *heads);
        const int s = start + 2 * k + 1;
        pa_kv_truncate(slot[k], pa_kv_len(slot[k]) - 1);
        seqs[k] = (pa_seq){.tokens = p.ids[s] + p.len[s] - 1, .n_tokens = 1, .kv = slot[k]};
        continuation++;
      }
      if (!rc)
        rc = pa_lm_forward(lm, &(pa_batch){.prefix = pkv, .seqs = seqs, .n_seqs = B, .heads = heads});
      for (int k = 0; !rc && k < B; k++)
        memcpy(b->z + (size_t)(start + 2 * k + 1) * per_seq, heads + (size_t)k * per_seq, per_seq * sizeof *heads);
    }
    if (!rc && o && o->progress) {
      const int done = start + step * B - first_seq, total = end_seq - first_seq;
      if (o->progress(o->progress_ctx, done < total ? done : total, total))
        rc = pa_error(PA_ECANCELED, "activation bank: stopped after %d of %d sequences", done < total ? done : total,
                      total);
    }
  }
  free(heads);
  for (int i = 0; slot && i < n_slots; i++)
    pa_kv_destroy(slot[i]);
  free(slot), free(seqs);
  pa_kv_destroy(pkv);
  if (!rc) {
    memcpy(b->items, p.items, (size_t)p.n_items * sizeof *b->items);
    memcpy(b->inventory, p.inventory, sizeof b->inventory);
    memcpy(b->tokens, p.tokens, sizeof b->tokens);
    snprintf(b->template_name, sizeof b->template_name, "%s", pa_chat_template_name(tmpl));
    snprintf(b->weights, sizeof b->weights, "%s", pa_lm_weights(lm));
    b->lowercase = st.lowercase;
    b->stats = (pa_bank_stats){.prefix_tokens = (long)common,
                               .continuation_tokens = continuation,
                               .naive_tokens = naive,
                               .min_tokens = (int)shortest,
                               .max_tokens = (int)longest,
                               .batch = batch,
                               .seconds = now() - t0};
    *out = b;
  } else {
    pa_bank_destroy(b);
  }
  prompts_free(&p);
  return rc;
}

pa_pas_bank pa_bank_view(const pa_bank *b) {
  return (pa_pas_bank){
      .z = b->z, .n_items = b->n_items, .n_layers = b->n_layers, .n_heads = b->n_heads, .head_dim = b->head_dim};
}

const float *pa_bank_data(const pa_bank *b) { return b->z; }

const int *pa_bank_items(const pa_bank *b, int *n) {
  *n = b->n_items;
  return b->items;
}

const pa_bank_stats *pa_bank_stats_get(const pa_bank *b) { return &b->stats; }

void pa_bank_slice(const pa_bank *b, int *first, int *n) {
  *first = b->slice_first;
  *n = b->slice_n;
}

float *pa_bank_data_mut(pa_bank *b) { return b->z; }

void pa_bank_set_stats(pa_bank *b, const pa_bank_stats *st) { b->stats = *st; }

/* ---- the key ---------------------------------------------------------------- */

int pa_bank_key_make(const char model_fingerprint[65], const pa_model_config *c, const pa_tokenizer *tok,
                     const pa_chat_template *tmpl, const pa_inventory *inv, const pa_bank_opts *o, pa_bank_key *key) {
  memset(key, 0, sizeof *key);
  if (!model_fingerprint || strlen(model_fingerprint) != 64)
    return pa_error(PA_EINVAL, "activation bank key: the model fingerprint must be 64 hex digits");
  const settings st = resolve(o);
  prompts p;
  int rc = build_prompts(tok, tmpl, inv, &st, &p);
  if (rc)
    return rc;
  memcpy(key->model, model_fingerprint, 65);
  memcpy(key->inventory, p.inventory, 65);
  memcpy(key->tokens, p.tokens, 65);
  key->system = st.system;
  key->prefix = st.prefix;
  key->lowercase = st.lowercase;
  key->template_name = pa_chat_template_name(tmpl);
  key->weights = st.weights;
  key->n_items = p.n_items;
  key->n_layers = c->n_layers, key->n_heads = c->n_heads, key->head_dim = c->head_dim;
  prompts_free(&p);
  return PA_OK;
}

void pa_bank_file_name(const char model_fingerprint[65], const char *weights, char *buf, size_t n) {
  const bool bf16 = weights && !strcmp(weights, "bf16");
  snprintf(buf, n, "bank-%.16s%s.bin", model_fingerprint, bf16 ? "-bf16" : "");
}

/* The differences found so far between two keys, as a list for a message. */
typedef struct {
  char buf[700];
  int n;
  const char *a, *b; /* what the two sides are called: "file", "this run" */
} diffs;

static void addf(diffs *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void addf(diffs *d, const char *fmt, ...) {
  const size_t n = strlen(d->buf);
  if (d->n++ && n + 2 < sizeof d->buf)
    memcpy(d->buf + n, "; ", 3);
  const size_t m = strlen(d->buf);
  if (m + 1 >= sizeof d->buf)
    return; /* the list is long enough to act on; the rest is left out */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(d->buf + m, sizeof d->buf - m, fmt, ap);
  va_end(ap);
}

/* At most `width` (<= 24) bytes of s from byte `at`, non-printable ones as
 * '?', with "..." where s goes on either side. */
static void excerpt(const char *s, size_t at, size_t width, char out[40]) {
  size_t k = 0, i = at;
  if (at > 0)
    memcpy(out, "...", 3), k = 3;
  for (; s[i] && i < at + width; i++)
    out[k++] = s[i] >= 0x20 && s[i] < 0x7f ? s[i] : '?';
  if (s[i])
    memcpy(out + k, "...", 3), k += 3;
  out[k] = '\0';
}

/* Two strings around their first difference. */
static void diff_text(diffs *d, const char *field, const char *a, const char *b, bool say_where, size_t width) {
  if (!strcmp(a, b))
    return;
  size_t at = 0;
  while (a[at] && a[at] == b[at])
    at++;
  const size_t from = at > 8 ? at - 8 : 0;
  char ea[40], eb[40];
  excerpt(a, from, width, ea);
  excerpt(b, from, width, eb);
  if (say_where)
    addf(d, "%s differs at byte %zu (%s \"%s\", %s \"%s\")", field, at, d->a, ea, d->b, eb);
  else
    addf(d, "%s differs (%s %s, %s %s)", field, d->a, ea, d->b, eb);
}

static void diff_string(diffs *d, const char *field, const char *a, const char *b) {
  diff_text(d, field, a, b, true, 24);
}

static void diff_hash(diffs *d, const char *field, const char *a, const char *b) {
  diff_text(d, field, a, b, false, 16);
}

static void diff_int(diffs *d, const char *field, long a, long b) {
  if (a != b)
    addf(d, "%s differs (%s %ld, %s %ld)", field, d->a, a, d->b, b);
}

/* Every field in which key a differs from key b, listed into d; the count. */
static int key_diff(const pa_bank_key *a, const pa_bank_key *b, bool with_model, diffs *d) {
  if (with_model)
    diff_hash(d, "model fingerprint", a->model, b->model);
  diff_hash(d, "inventory (train items or their texts)", a->inventory, b->inventory);
  diff_int(d, "n_items", a->n_items, b->n_items);
  diff_int(d, "n_layers", a->n_layers, b->n_layers);
  diff_int(d, "n_heads", a->n_heads, b->n_heads);
  diff_int(d, "head_dim", a->head_dim, b->head_dim);
  diff_string(d, "system prompt", a->system, b->system);
  diff_string(d, "prefix", a->prefix, b->prefix);
  if (a->lowercase != b->lowercase)
    addf(d, "lowercase differs (%s %s, %s %s)", d->a, a->lowercase ? "true" : "false", d->b,
         b->lowercase ? "true" : "false");
  diff_string(d, "chat template", a->template_name, b->template_name);
  diff_string(d, "weight format", a->weights, b->weights);
  diff_hash(d, "prompt tokens (tokenizer, chat template or prompts)", a->tokens, b->tokens);
  return d->n;
}

static pa_bank_key key_of(const pa_bank *b) {
  pa_bank_key k = {.system = b->system,
                   .prefix = b->prefix,
                   .lowercase = b->lowercase,
                   .template_name = b->template_name,
                   .weights = b->weights,
                   .n_items = b->n_items,
                   .n_layers = b->n_layers,
                   .n_heads = b->n_heads,
                   .head_dim = b->head_dim};
  memcpy(k.inventory, b->inventory, 65);
  memcpy(k.tokens, b->tokens, 65);
  return k;
}

static bool key_complete(const pa_bank_key *k) {
  return k && k->system && k->prefix && k->template_name && k->weights && strlen(k->model) == 64 &&
         strlen(k->inventory) == 64 && strlen(k->tokens) == 64;
}

/* ---- the file ----------------------------------------------------------------- */

static cJSON *header_json(const pa_bank *b, const pa_bank_key *key, size_t data_bytes) {
  cJSON *h = cJSON_CreateObject(), *k = cJSON_CreateObject(), *d = cJSON_CreateObject(), *data = cJSON_CreateObject(),
        *made = cJSON_CreateObject();
  cJSON *items = cJSON_CreateIntArray(b->items, b->n_items);
  if (!h || !k || !d || !data || !made || !items) {
    cJSON_Delete(h), cJSON_Delete(k), cJSON_Delete(d), cJSON_Delete(data), cJSON_Delete(made), cJSON_Delete(items);
    return NULL;
  }
  cJSON_AddStringToObject(h, "format", "palign activation bank");
  cJSON_AddNumberToObject(h, "version", PA_BANK_FORMAT_VERSION);
  cJSON_AddItemToObject(h, "key", k);
  cJSON_AddStringToObject(k, "model_sha256", key->model);
  cJSON_AddStringToObject(k, "inventory_sha256", key->inventory);
  cJSON_AddStringToObject(k, "tokens_sha256", key->tokens);
  cJSON_AddStringToObject(k, "system", key->system);
  cJSON_AddStringToObject(k, "prefix", key->prefix);
  cJSON_AddBoolToObject(k, "lowercase", key->lowercase);
  cJSON_AddStringToObject(k, "chat_template", key->template_name);
  cJSON_AddStringToObject(k, "weights", key->weights);
  cJSON_AddItemToObject(h, "dims", d);
  cJSON_AddNumberToObject(d, "n_items", b->n_items);
  cJSON_AddNumberToObject(d, "n_sequences", 2 * b->n_items);
  cJSON_AddNumberToObject(d, "n_layers", b->n_layers);
  cJSON_AddNumberToObject(d, "n_heads", b->n_heads);
  cJSON_AddNumberToObject(d, "head_dim", b->head_dim);
  cJSON_AddItemToObject(h, "items", items);
  cJSON_AddItemToObject(h, "data", data);
  cJSON_AddStringToObject(data, "dtype", "float32");
  cJSON_AddStringToObject(data, "byte_order", "little-endian");
  cJSON_AddNumberToObject(data, "bytes", (double)data_bytes);
  cJSON_AddStringToObject(data, "layout",
                          "z[sequence][layer][head][dim]; sequence 2i is items[i] answered A, 2i+1 answered E; "
                          "z is the attention head's output before W_o at the answer letter");
  cJSON_AddItemToObject(h, "made", made);
  char date[32] = "unknown";
  const time_t t = time(NULL);
  struct tm tm;
  if (gmtime_r(&t, &tm))
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
  cJSON_AddStringToObject(made, "date", date);
  cJSON_AddStringToObject(made, "palign_version", pa_version);
  cJSON_AddStringToObject(made, "git_revision", pa_git_revision);
#if defined(__clang__)
  cJSON_AddStringToObject(made, "compiler", "clang " __clang_version__);
#elif defined(__GNUC__)
  cJSON_AddStringToObject(made, "compiler", "gcc " __VERSION__);
#endif
  cJSON_AddStringToObject(made, "openssl", OpenSSL_version(OPENSSL_VERSION));
  cJSON_AddNumberToObject(made, "seconds", b->stats.seconds);
  cJSON_AddNumberToObject(made, "batch", b->stats.batch);
  cJSON_AddNumberToObject(made, "prefix_tokens", (double)b->stats.prefix_tokens);
  cJSON_AddNumberToObject(made, "continuation_tokens", (double)b->stats.continuation_tokens);
  cJSON_AddNumberToObject(made, "naive_tokens", (double)b->stats.naive_tokens);
  cJSON_AddNumberToObject(made, "min_tokens", b->stats.min_tokens);
  cJSON_AddNumberToObject(made, "max_tokens", b->stats.max_tokens);
  return h;
}

int pa_bank_save(const pa_bank *b, const char *path, const pa_bank_key *key) {
  if (!key_complete(key))
    return pa_error(PA_EINVAL, "%s: cannot save the activation bank: the key is incomplete (use pa_bank_key_make)",
                    path);
  diffs d = {.a = "bank", .b = "key"};
  const pa_bank_key mine = key_of(b);
  if (key_diff(&mine, key, false, &d))
    return pa_error(PA_EINVAL, "%s: not saved: the key does not describe this activation bank: %s", path, d.buf);
  const size_t n_floats = (size_t)2 * b->n_items * b->n_layers * b->n_heads * b->head_dim;
  const size_t data_bytes = n_floats * sizeof(float);
  cJSON *h = header_json(b, key, data_bytes);
  char *json = h ? cJSON_PrintUnformatted(h) : NULL;
  cJSON_Delete(h);
  if (!json)
    return pa_error(PA_ENOMEM, "no memory for the activation bank's header");
  const size_t jlen = strlen(json);
  const size_t hlen = (FIXED_HEAD + jlen + DATA_ALIGN - 1) / DATA_ALIGN * DATA_ALIGN - FIXED_HEAD;
  char *header = malloc(hlen);
  float *swapped = NULL;
  int rc = header ? PA_OK : pa_error(PA_ENOMEM, "no memory");
  if (!rc && hlen > MAX_HEADER)
    rc = pa_error(PA_EINVAL, "%s: the activation bank's header would be %zu bytes: too large", path, hlen);
  if (!rc && !host_little_endian()) {
    if (!(swapped = malloc(data_bytes)))
      rc = pa_error(PA_ENOMEM, "no memory");
    for (size_t i = 0; !rc && i < n_floats; i++) {
      uint32_t u;
      memcpy(&u, b->z + i, 4);
      put_u32((unsigned char *)(swapped + i), u);
    }
  }
  unsigned char fixed[FIXED_HEAD], md[DIGEST];
  if (!rc) {
    memcpy(header, json, jlen);
    memset(header + jlen, ' ', hlen - jlen);
    memcpy(fixed, MAGIC, 8);
    put_u32(fixed + 8, PA_BANK_FORMAT_VERSION);
    put_u32(fixed + 12, (uint32_t)hlen);
  }
  pa_chunk ch[4] = {
      {fixed, FIXED_HEAD}, {header, hlen}, {swapped ? (const void *)swapped : b->z, data_bytes}, {md, DIGEST}};
  if (!rc)
    rc = sha_chunks(ch, 3, md);
  if (!rc)
    rc = pa_write_atomic(path, ch, 4);
  free(json), free(header), free(swapped);
  return rc;
}

static const cJSON *field(const cJSON *o, const char *name, int type) {
  const cJSON *f = cJSON_GetObjectItemCaseSensitive(o, name);
  return f && (f->type & 0xFF) & type ? f : NULL;
}

/* Parses and checks the header's structure into key and *items (malloc'd). */
static int parse_header(const char *path, const cJSON *h, pa_bank_key *key, size_t *data_bytes, int **items) {
  *items = NULL;
  const cJSON *k = field(h, "key", cJSON_Object), *d = field(h, "dims", cJSON_Object),
              *data = field(h, "data", cJSON_Object), *it = field(h, "items", cJSON_Array);
  const cJSON *version = field(h, "version", cJSON_Number), *fmt = field(h, "format", cJSON_String);
  if (!fmt || strcmp(fmt->valuestring, "palign activation bank") != 0 || !version || !k || !d || !data || !it)
    return pa_error(PA_EFORMAT, "%s: the activation bank's header lacks format, version, key, dims, items or data",
                    path);
  if (version->valuedouble != PA_BANK_FORMAT_VERSION)
    return pa_error(PA_EFORMAT, "%s: the header's version %g contradicts the file's version %d", path,
                    version->valuedouble, PA_BANK_FORMAT_VERSION);
  const char *hashes[3] = {"model_sha256", "inventory_sha256", "tokens_sha256"};
  char *dst[3] = {key->model, key->inventory, key->tokens};
  for (int i = 0; i < 3; i++) {
    const cJSON *s = field(k, hashes[i], cJSON_String);
    if (!s || strlen(s->valuestring) != 64)
      return pa_error(PA_EFORMAT, "%s: the header's key.%s is missing or not 64 hex digits", path, hashes[i]);
    memcpy(dst[i], s->valuestring, 65);
  }
  const cJSON *system = field(k, "system", cJSON_String), *prefix = field(k, "prefix", cJSON_String),
              *tmpl = field(k, "chat_template", cJSON_String), *lower = field(k, "lowercase", cJSON_True | cJSON_False);
  if (!system || !prefix || !tmpl || !lower)
    return pa_error(PA_EFORMAT, "%s: the header's key lacks system, prefix, chat_template or lowercase", path);
  key->system = system->valuestring, key->prefix = prefix->valuestring, key->template_name = tmpl->valuestring;
  key->lowercase = cJSON_IsTrue(lower);
  /* the weight format: files from before it was recorded were all computed on fp32 weights */
  const cJSON *weights = cJSON_GetObjectItemCaseSensitive(k, "weights");
  key->weights = "fp32";
  if (weights &&
      !(cJSON_IsString(weights) && (!strcmp(weights->valuestring, "fp32") || !strcmp(weights->valuestring, "bf16"))))
    return pa_error(PA_EFORMAT, "%s: the header's key.weights is neither \"fp32\" nor \"bf16\"", path);
  if (weights)
    key->weights = weights->valuestring;
  const char *dims[4] = {"n_items", "n_layers", "n_heads", "head_dim"};
  int *dv[4] = {&key->n_items, &key->n_layers, &key->n_heads, &key->head_dim};
  for (int i = 0; i < 4; i++) {
    const cJSON *v = field(d, dims[i], cJSON_Number);
    if (!v || v->valuedouble < 1 || v->valuedouble > 1e6 || v->valuedouble != (double)v->valueint)
      return pa_error(PA_EFORMAT, "%s: the header's dims.%s is missing or not a positive integer", path, dims[i]);
    *dv[i] = v->valueint;
  }
  const cJSON *bytes = field(data, "bytes", cJSON_Number);
  const double want = 2.0 * key->n_items * key->n_layers * key->n_heads * key->head_dim * sizeof(float);
  if (!bytes || bytes->valuedouble != want)
    return pa_error(PA_EFORMAT, "%s: the header's data.bytes does not match its dims (%.0f bytes expected)", path,
                    want);
  if (want > 1e15)
    return pa_error(PA_EFORMAT, "%s: the header's dims describe %.0f bytes of data: too large", path, want);
  *data_bytes = (size_t)want;
  if (cJSON_GetArraySize(it) != key->n_items)
    return pa_error(PA_EFORMAT, "%s: the header lists %d items for n_items = %d", path, cJSON_GetArraySize(it),
                    key->n_items);
  if (!(*items = malloc((size_t)key->n_items * sizeof **items)))
    return pa_error(PA_ENOMEM, "no memory");
  int i = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, it) {
    if (!cJSON_IsNumber(e) || e->valuedouble != (double)e->valueint)
      return pa_error(PA_EFORMAT, "%s: the header's items[%d] is not an item number", path, i);
    (*items)[i++] = e->valueint;
  }
  return PA_OK;
}

int pa_bank_load(const char *path, const pa_bank_key *key, pa_bank **out) {
  *out = NULL;
  if (!key_complete(key))
    return pa_error(PA_EINVAL, "%s: cannot check the cached activation bank: the key is incomplete", path);
  pa_mapped m;
  int rc = pa_map_file(path, 0, "an activation bank", &m);
  if (rc)
    return rc;
  const unsigned char *p = m.data;
  const uint64_t size = m.size;
  cJSON *h = NULL;
  char *text = NULL;
  int *items = NULL;
  pa_bank_key file = {0};
  size_t data_bytes = 0;
  uint32_t hlen = 0;
  if (size < 8 && (size == 0 || memcmp(p, MAGIC, size) == 0))
    rc = pa_error(PA_EFORMAT, "%s: truncated: %llu bytes, not even the magic", path, (unsigned long long)size);
  else if (memcmp(p, MAGIC, size < 8 ? size : 8) != 0)
    rc = pa_error(PA_EFORMAT, "%s: not a palign activation bank (it does not start with \"PALIGNBK\")", path);
  else if (size < FIXED_HEAD + DIGEST)
    rc = pa_error(PA_EFORMAT, "%s: truncated: %llu bytes", path, (unsigned long long)size);
  else if (get_u32(p + 8) != PA_BANK_FORMAT_VERSION)
    rc = pa_error(PA_EUNSUPPORTED,
                  "%s: activation bank file format version %u; this palign reads version %d (delete the file to "
                  "recompute the bank)",
                  path, get_u32(p + 8), PA_BANK_FORMAT_VERSION);
  else if ((hlen = get_u32(p + 12)) > MAX_HEADER || FIXED_HEAD + (uint64_t)hlen + DIGEST > size)
    rc = pa_error(PA_EFORMAT, "%s: truncated or corrupted: a %u-byte header does not fit in %llu bytes", path, hlen,
                  (unsigned long long)size);
  /* The header is read before the checksum is checked only to say what is
   * wrong (a truncated file, a damaged one); nothing in it is trusted unless
   * the checksum holds. */
  int hrc = PA_OK;
  char herr[512] = "";
  if (!rc && !(text = malloc((size_t)hlen + 1)))
    rc = pa_error(PA_ENOMEM, "no memory");
  if (!rc) {
    memcpy(text, p + FIXED_HEAD, hlen);
    text[hlen] = '\0';
    if (!(h = cJSON_ParseWithOpts(text, NULL, 1)))
      hrc = pa_error(PA_EFORMAT, "%s: the activation bank's header is not valid JSON", path);
    else
      hrc = parse_header(path, h, &file, &data_bytes, &items);
    if (hrc)
      snprintf(herr, sizeof herr, "%s", pa_errmsg());
  }
  const uint64_t want_size = FIXED_HEAD + (uint64_t)hlen + data_bytes + DIGEST;
  unsigned char md[DIGEST];
  bool sealed = false;
  if (!rc && !(rc = sha_chunks(&(pa_chunk){p, (size_t)(size - DIGEST)}, 1, md)))
    sealed = memcmp(md, p + size - DIGEST, DIGEST) == 0;
  if (!rc && !sealed) {
    if (!hrc && size != want_size)
      rc = pa_error(PA_EFORMAT, "%s: %s: %llu bytes, the header describes %llu", path,
                    size < want_size ? "truncated (or corrupted)" : "corrupted: trailing bytes",
                    (unsigned long long)size, (unsigned long long)want_size);
    else
      rc = pa_error(PA_EFORMAT, "%s: corrupted: its SHA-256 does not match its content%s", path,
                    hrc ? " (and its header does not parse)" : "");
  }
  if (!rc && hrc) /* sealed, yet inconsistent: not written by this palign */
    rc = pa_error(hrc, "%s", herr);
  if (!rc && size != want_size)
    rc = pa_error(PA_EFORMAT, "%s: %llu bytes, but the header describes %llu", path, (unsigned long long)size,
                  (unsigned long long)want_size);
  diffs d = {.a = "file", .b = "this run"};
  if (!rc && key_diff(&file, key, true, &d))
    rc = pa_error(PA_EINVAL,
                  "%s: refusing the cached activation bank, it was made for something else: %s. Delete the file or "
                  "use another cache path to recompute it",
                  path, d.buf);
  pa_bank *b = NULL;
  if (!rc)
    rc = bank_new(file.n_items, file.n_layers, file.n_heads, file.head_dim, file.system, file.prefix, &b);
  if (!rc) {
    const unsigned char *data = p + FIXED_HEAD + hlen;
    if (host_little_endian())
      memcpy(b->z, data, data_bytes);
    else
      for (size_t i = 0; i < data_bytes / 4; i++) {
        const uint32_t u = get_u32(data + 4 * i);
        memcpy(b->z + i, &u, 4);
      }
    memcpy(b->items, items, (size_t)file.n_items * sizeof *items);
    memcpy(b->inventory, file.inventory, 65);
    memcpy(b->tokens, file.tokens, 65);
    snprintf(b->template_name, sizeof b->template_name, "%s", file.template_name);
    snprintf(b->weights, sizeof b->weights, "%s", file.weights);
    b->lowercase = file.lowercase;
    const cJSON *made = field(h, "made", cJSON_Object);
    const cJSON *v;
    if ((v = field(made, "seconds", cJSON_Number)))
      b->stats.seconds = v->valuedouble;
    if ((v = field(made, "batch", cJSON_Number)))
      b->stats.batch = v->valueint;
    if ((v = field(made, "prefix_tokens", cJSON_Number)))
      b->stats.prefix_tokens = (long)v->valuedouble;
    if ((v = field(made, "continuation_tokens", cJSON_Number)))
      b->stats.continuation_tokens = (long)v->valuedouble;
    if ((v = field(made, "naive_tokens", cJSON_Number)))
      b->stats.naive_tokens = (long)v->valuedouble;
    if ((v = field(made, "min_tokens", cJSON_Number)))
      b->stats.min_tokens = v->valueint;
    if ((v = field(made, "max_tokens", cJSON_Number)))
      b->stats.max_tokens = v->valueint;
    *out = b;
  }
  cJSON_Delete(h);
  free(text), free(items);
  pa_unmap_file(&m);
  if (rc == PA_EFORMAT) { /* damaged: never overwritten silently, so say how to recover */
    char why[1024];
    snprintf(why, sizeof why, "%s", pa_errmsg());
    rc = pa_error(rc, "%s (the bank is a cache: delete the file and it is computed again)", why);
  }
  return rc;
}

int pa_bank_load_or_compute(const char *path, const pa_bank_key *key, pa_lm *lm, const pa_tokenizer *tok,
                            const pa_chat_template *tmpl, const pa_inventory *inv, const pa_bank_opts *o, pa_bank **out,
                            bool *loaded) {
  if (loaded)
    *loaded = false;
  int rc = pa_bank_load(path, key, out);
  if (rc != PA_ENOTFOUND) {
    if (!rc && loaded)
      *loaded = true;
    return rc;
  }
  pa_error_clear();
  if ((rc = pa_bank_compute(lm, tok, tmpl, inv, o, out)))
    return rc;
  if ((rc = pa_bank_save(*out, path, key))) {
    pa_bank_destroy(*out);
    *out = NULL;
  }
  return rc;
}
