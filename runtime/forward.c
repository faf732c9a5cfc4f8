#define _DEFAULT_SOURCE /* madvise */
#include "forward.h"

#include "backend.h"
#include "lm_internal.h"
#include "status.h"

#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Called right after be->alloc returned NULL, so that be->error() is that
 * refusal's reason (backend.h: alloc), not an earlier failure's. */
int pa_backend_enomem(const pa_backend *be, const char *fmt, ...) {
  char what[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  const char *why = be->host_memory ? "" : be->error();
  return *why ? pa_error(PA_ENOMEM, "%s on the %s backend (%s)", what, be->name, why) : pa_error(PA_ENOMEM, "%s", what);
}

/* RoPE angles as Hugging Face computes them in float32, so long prompts
 * agree to the last bits that matter: inv_freq = 1 / theta^(2i/d), angle =
 * position * inv_freq, both rounded to float. */
static int rope_tables(pa_lm *lm) {
  const int half = lm->c.head_dim / 2;
  lm->cos_tab = malloc((size_t)lm->max_seq * half * sizeof(float));
  lm->sin_tab = malloc((size_t)lm->max_seq * half * sizeof(float));
  float *inv = malloc((size_t)half * sizeof(float));
  if (!lm->cos_tab || !lm->sin_tab || !inv) {
    free(inv), free(lm->cos_tab), free(lm->sin_tab);
    lm->cos_tab = lm->sin_tab = NULL; /* pa_lm_destroy releases them as the backend's */
    return pa_error(PA_ENOMEM, "no memory for RoPE tables of %d positions", lm->max_seq);
  }
  for (int i = 0; i < half; i++) {
    inv[i] = 1.0f / powf(lm->c.rope_theta, (float)(2 * i) / (float)lm->c.head_dim);
    if (lm->host_w.rope_freq_div) /* the loaded weights: on a device backend lm->w is not set yet */
      inv[i] /= lm->host_w.rope_freq_div[i];
  }
  for (int p = 0; p < lm->max_seq; p++)
    for (int i = 0; i < half; i++) {
      const float a = (float)p * inv[i];
      lm->cos_tab[(size_t)p * half + i] = cosf(a);
      lm->sin_tab[(size_t)p * half + i] = sinf(a);
    }
  free(inv);
  if (lm->be->host_memory)
    return PA_OK;
  const size_t bytes = (size_t)lm->max_seq * half * sizeof(float);
  float *c = lm->be->alloc(bytes), *s = lm->be->alloc(bytes);
  if (c && s) {
    lm->be->upload(c, lm->cos_tab, bytes);
    lm->be->upload(s, lm->sin_tab, bytes);
  }
  free(lm->cos_tab), free(lm->sin_tab);
  lm->cos_tab = c, lm->sin_tab = s;
  return c && s ? PA_OK : pa_backend_enomem(lm->be, "no memory for the RoPE tables of %d positions", lm->max_seq);
}

/* Where place_weights is in its two allocations. */
typedef struct {
  const pa_lm *lm;
  char *mats; /* bf16 or fp32 elements */
  float *vecs;
  size_t n_mats, n_vecs; /* elements placed so far (counted only, when mats is NULL) */
  float *chunk;          /* host buffer for the bf16 conversion, CONVERT_CHUNK elements */
} placer;

#define CONVERT_CHUNK ((size_t)1 << 20)

/* Gives the whole pages of [p, p + bytes) back to the system: the part of
 * the loaded fp32 arena a placed matrix came from, never read again (it is
 * freed whole once every tensor is placed), so that the host holds about
 * one copy of the model at any time while placing. */
static void drop_pages(const void *p, size_t bytes) {
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p, end = a + bytes;
  const uintptr_t first = (a + page - 1) / page * page, last = end / page * page;
  if (last > first)
    madvise((void *)first, last - first, MADV_DONTNEED);
}

/* Places a matrix of n elements (fp32 on the host) and returns where it is
 * in backend memory; when only counting, NULL. bf16 is converted a chunk at
 * a time through the host buffer, so no second host copy of the model. */
static const void *place_mat(placer *p, const float *src, size_t n) {
  const pa_backend *be = p->lm->be;
  const size_t esize = p->lm->bf16 ? sizeof(pa_bf16) : sizeof(float);
  char *dst = p->mats ? p->mats + p->n_mats * esize : NULL;
  p->n_mats += n;
  if (!dst)
    return NULL;
  if (!p->lm->bf16) {
    be->upload(dst, src, n * sizeof(float));
    drop_pages(src, n * sizeof(float));
    return dst;
  }
  pa_bf16 *tmp = (pa_bf16 *)p->chunk;
  for (size_t i0 = 0; i0 < n; i0 += CONVERT_CHUNK) {
    const size_t m = n - i0 < CONVERT_CHUNK ? n - i0 : CONVERT_CHUNK;
    for (size_t i = 0; i < m; i++)
      tmp[i] = pa_bf16_from_f32(src[i0 + i]);
    be->upload(dst + i0 * sizeof(pa_bf16), tmp, m * sizeof(pa_bf16));
    drop_pages(src + i0, m * sizeof(float)); /* as it goes: the bf16 copy grows as the fp32 one shrinks */
  }
  return dst;
}

static const float *place_vec(placer *p, const float *src, size_t n) {
  if (!src)
    return NULL;
  float *dst = p->vecs ? p->vecs + p->n_vecs : NULL;
  p->n_vecs += n;
  if (dst)
    p->lm->be->upload(dst, src, n * sizeof(float));
  return dst;
}

/* Every tensor of h through the placer: with p->mats NULL it only counts. */
static void place_all(placer *p, const pa_weights *h, lm_weights *w) {
  const pa_model_config *c = &p->lm->c;
  const size_t D = (size_t)c->dim, Q = (size_t)c->n_heads * c->head_dim, K = (size_t)c->n_kv_heads * c->head_dim;
  const size_t F = (size_t)c->ffn_dim, V = (size_t)c->vocab_size;
  w->tok_embd = place_mat(p, h->tok_embd, V * D);
  w->output = h->output == h->tok_embd ? w->tok_embd : place_mat(p, h->output, V * D);
  w->out_norm = place_vec(p, h->out_norm, D);
  for (int l = 0; l < c->n_layers; l++) {
    const pa_layer_weights *a = &h->layers[l];
    lm_layer *L = &w->layers[l];
    L->wq = place_mat(p, a->wq, Q * D), L->wk = place_mat(p, a->wk, K * D), L->wv = place_mat(p, a->wv, K * D);
    L->wo = place_mat(p, a->wo, D * Q);
    L->w_gate = place_mat(p, a->w_gate, F * D), L->w_up = place_mat(p, a->w_up, F * D);
    L->w_down = place_mat(p, a->w_down, D * F);
    L->attn_norm = place_vec(p, a->attn_norm, D), L->ffn_norm = place_vec(p, a->ffn_norm, D);
    L->bq = place_vec(p, a->bq, Q), L->bk = place_vec(p, a->bk, K), L->bv = place_vec(p, a->bv, K);
  }
}

/* The passes' view of the loaded weights: the loaded arrays themselves on a
 * host backend in fp32; otherwise two allocations of the backend's (the
 * matrices in the format asked for, the vectors), filled tensor by tensor,
 * and the host copy freed. */
static int place_weights(pa_lm *lm) {
  const pa_backend *be = lm->be;
  pa_weights *h = &lm->host_w;
  lm_weights *w = &lm->w;
  if (!(w->layers = calloc((size_t)lm->c.n_layers, sizeof *w->layers)))
    return pa_error(PA_ENOMEM, "no memory");
  placer p = {.lm = lm};
  if (be->host_memory && !lm->bf16) {
    w->tok_embd = h->tok_embd, w->output = h->output, w->out_norm = h->out_norm;
    for (int l = 0; l < lm->c.n_layers; l++) {
      const pa_layer_weights *a = &h->layers[l];
      w->layers[l] = (lm_layer){.wq = a->wq,
                                .wk = a->wk,
                                .wv = a->wv,
                                .wo = a->wo,
                                .w_gate = a->w_gate,
                                .w_up = a->w_up,
                                .w_down = a->w_down,
                                .attn_norm = a->attn_norm,
                                .ffn_norm = a->ffn_norm,
                                .bq = a->bq,
                                .bk = a->bk,
                                .bv = a->bv};
    }
    return PA_OK;
  }
  place_all(&p, h, w); /* counts */
  const size_t mat_bytes = p.n_mats * (lm->bf16 ? sizeof(pa_bf16) : sizeof(float));
  w->mats = be->alloc(mat_bytes);
  w->vecs = w->mats ? be->alloc(p.n_vecs * sizeof(float)) : NULL;
  if (!w->mats)
    return pa_backend_enomem(be, "%s: no memory for %.3g MB of %s weights", pa_model_path(lm->model), mat_bytes / 1e6,
                             pa_lm_weights(lm));
  if (!w->vecs)
    return pa_backend_enomem(be, "%s: no memory for the norms' and biases' %.3g MB", pa_model_path(lm->model),
                             p.n_vecs * sizeof(float) / 1e6);
  p.chunk = lm->bf16 ? malloc(CONVERT_CHUNK * sizeof(pa_bf16)) : NULL;
  if (lm->bf16 && !p.chunk)
    return pa_error(PA_ENOMEM, "%s: no memory for the bf16 conversion's buffer", pa_model_path(lm->model));
  p.mats = w->mats, p.vecs = w->vecs, p.n_mats = p.n_vecs = 0;
  place_all(&p, h, w);
  free(p.chunk);
  pa_weights_free(h);
  return PA_OK;
}

const char *pa_lm_weights(const pa_lm *lm) { return lm->bf16 ? "bf16" : "fp32"; }

int pa_weight_format_parse(const char *s) {
  if (!strcmp(s, "auto"))
    return PA_WEIGHTS_AUTO;
  if (!strcmp(s, "fp32"))
    return PA_WEIGHTS_FP32;
  if (!strcmp(s, "bf16"))
    return PA_WEIGHTS_BF16;
  return -1;
}

int pa_lm_create(const pa_model *m, const pa_lm_opts *o, pa_lm **out) {
  *out = NULL;
  pa_lm *lm = calloc(1, sizeof *lm);
  if (!lm)
    return pa_error(PA_ENOMEM, "no memory");
  lm->model = m;
  lm->c = *pa_model_config_get(m);
  lm->be = o && o->backend ? o->backend : pa_backend_cpu();
  pa_backend_set_threads(o ? o->n_threads : 0);
  lm->max_seq = o && o->max_seq > 0 ? o->max_seq : lm->c.max_seq;
  int rc = PA_OK;
  if (lm->max_seq > lm->c.max_seq)
    rc = pa_error(PA_EINVAL, "%s: %d positions asked for, the model's context is %d", pa_model_path(m), lm->max_seq,
                  lm->c.max_seq);
  const pa_weight_format wf = o ? o->weights : PA_WEIGHTS_AUTO;
  lm->bf16 = wf == PA_WEIGHTS_BF16 || (wf == PA_WEIGHTS_AUTO && !lm->be->host_memory);
  if (!rc)
    rc = pa_model_load_weights(m, &lm->host_w);
  if (!rc)
    rc = rope_tables(lm); /* before placing the weights: it reads the RoPE frequency divisors */
  if (!rc)
    rc = place_weights(lm);
  if (!rc)
    rc = lm_backend_status(lm->be, "placing the weights");
  if (rc) {
    pa_lm_destroy(lm);
    return rc;
  }
  *out = lm;
  return PA_OK;
}

static void scratch_free(const pa_backend *be, lm_scratch *s) {
  float *const dev[] = {s->x,    s->xb,           s->q,      s->z,    s->k, s->v, s->gate, s->up,
                        s->last, s->attn_scratch, s->logits, s->heads};
  for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
    be->release(dev[i]);
  be->release(s->pos);
  be->release(s->ids);
  be->release(s->last_row);
  if (!be->host_memory) {
    free(s->pos_h);
    free(s->ids_h);
  }
  free(s->heads_h);
  free(s->last_row_h);
  free(s->aseq);
  be->release(s->lu);
  memset(s, 0, sizeof *s);
}

void pa_lm_destroy(pa_lm *lm) {
  if (!lm)
    return;
  scratch_free(lm->be, &lm->s);
  lm->be->release(lm->sel);
  free(lm->sel_ids);
  pa_weights_free(&lm->host_w); /* still set when the passes read it, or when placing failed */
  lm->be->release(lm->w.mats);
  lm->be->release(lm->w.vecs);
  free(lm->w.layers);
  if (lm->be->host_memory) {
    free(lm->cos_tab);
    free(lm->sin_tab);
  } else {
    lm->be->release(lm->cos_tab);
    lm->be->release(lm->sin_tab);
    lm->be->release(lm->steer);
    lm->be->release(lm->lora);
  }
  free(lm);
}

const pa_model_config *pa_lm_config(const pa_lm *lm) { return &lm->c; }
double pa_lm_flops(const pa_lm *lm) { return lm->flops; }
int pa_lm_max_seq(const pa_lm *lm) { return lm->max_seq; }

int pa_kv_create(const pa_lm *lm, int capacity, pa_kv **out) {
  *out = NULL;
  if (capacity < 1 || capacity > lm->max_seq)
    return pa_error(PA_EINVAL, "a KV cache of %d tokens is outside 1..%d (%s)", capacity, lm->max_seq,
                    capacity < 1 ? "nothing to hold" : "longer than the model's context, or the limit asked for");
  pa_kv *kv = calloc(1, sizeof *kv);
  if (!kv)
    return pa_error(PA_ENOMEM, "no memory");
  kv->be = lm->be;
  kv->n_layers = lm->c.n_layers;
  kv->n_kv_heads = lm->c.n_kv_heads;
  kv->head_dim = lm->c.head_dim;
  kv->cap = capacity;
  const size_t n = (size_t)kv->n_layers * kv->n_kv_heads * capacity * kv->head_dim;
  kv->k = kv->be->alloc(n * sizeof(float));
  kv->v = kv->be->alloc(n * sizeof(float));
  if (!kv->k || !kv->v) {
    const int rc =
        pa_backend_enomem(kv->be, "no memory for a KV cache of %d tokens (%.3g MB)", capacity, 2 * n * 4 / 1e6);
    pa_kv_destroy(kv);
    return rc;
  }
  *out = kv;
  return PA_OK;
}

void pa_kv_destroy(pa_kv *kv) {
  if (!kv)
    return;
  kv->be->release(kv->k);
  kv->be->release(kv->v);
  free(kv);
}

void pa_kv_clear(pa_kv *kv) { kv->len = 0; }

void pa_kv_truncate(pa_kv *kv, int len) {
  if (len >= 0 && len < kv->len)
    kv->len = len;
}
int pa_kv_len(const pa_kv *kv) { return kv->len; }
int pa_kv_capacity(const pa_kv *kv) { return kv->cap; }

static int scratch_reserve(pa_lm *lm, int rows, int seqs) {
  lm_scratch *s = &lm->s;
  if (rows <= s->rows && seqs <= s->seqs)
    return PA_OK;
  const pa_model_config *c = &lm->c;
  rows = rows > s->rows ? rows : s->rows;
  seqs = seqs > s->seqs ? seqs : s->seqs;
  const size_t R = (size_t)rows, qd = (size_t)c->n_heads * c->head_dim, kd = (size_t)c->n_kv_heads * c->head_dim;
  const pa_backend *be = lm->be;
  scratch_free(be, s);
  s->x = be->alloc(R * c->dim * sizeof(float));
  s->xb = be->alloc(R * c->dim * sizeof(float));
  s->q = be->alloc(R * qd * sizeof(float));
  s->z = be->alloc(R * qd * sizeof(float));
  s->k = be->alloc(R * kd * sizeof(float));
  s->v = be->alloc(R * kd * sizeof(float));
  s->gate = be->alloc(R * c->ffn_dim * sizeof(float));
  s->up = be->alloc(R * c->ffn_dim * sizeof(float));
  s->last = be->alloc((size_t)seqs * c->dim * sizeof(float));
  s->pos = be->alloc(R * sizeof(int32_t));
  s->ids = be->alloc(R * sizeof(int32_t));
  s->pos_h = be->host_memory ? s->pos : malloc(R * sizeof(int32_t));
  s->ids_h = be->host_memory ? s->ids : malloc(R * sizeof(int32_t));
  s->logits = be->host_memory ? NULL : be->alloc((size_t)seqs * c->vocab_size * sizeof(float));
  const bool dev = !be->host_memory;
  s->heads = dev ? be->alloc((size_t)seqs * c->n_layers * qd * sizeof(float)) : NULL;
  s->heads_h = dev ? malloc((size_t)seqs * c->n_layers * qd * sizeof(float)) : NULL;
  s->last_row = dev ? be->alloc((size_t)seqs * sizeof(int32_t)) : NULL;
  s->last_row_h = dev ? malloc((size_t)seqs * sizeof(int32_t)) : NULL;
  s->aseq = malloc((size_t)seqs * sizeof *s->aseq);
  const bool placed = s->x && s->xb && s->q && s->z && s->k && s->v && s->gate && s->up && s->last && s->pos &&
                      s->ids && (!dev || (s->logits && s->heads && s->last_row));
  if (!placed || !s->pos_h || !s->ids_h || (dev && (!s->heads_h || !s->last_row_h)) || !s->aseq) {
    const int rc = !placed ? pa_backend_enomem(be, "no memory for the activations of %d tokens", rows)
                           : pa_error(PA_ENOMEM, "no host memory for the tables of %d tokens", rows);
    scratch_free(be, s);
    return rc;
  }
  s->rows = rows;
  s->seqs = seqs;
  return PA_OK;
}

static int check_batch(const pa_lm *lm, const pa_batch *b, int *rows) {
  const int P = b->prefix ? b->prefix->len : 0;
  *rows = 0;
  if (b->n_seqs < 1)
    return pa_error(PA_EINVAL, "a batch needs at least one sequence");
  if (b->lora) {
    int rc = pa_lora_check(b->lora, &lm->c);
    if (rc)
      return rc;
  }
  if (b->prefix && b->prefix->be != lm->be)
    return pa_error(PA_EINVAL, "the prefix cache belongs to another backend");
  for (int i = 0; i < b->n_seqs; i++) {
    const pa_seq *s = &b->seqs[i];
    if (s->n_tokens < 1 || !s->kv)
      return pa_error(PA_EINVAL, "sequence %d of the batch has no tokens or no cache", i);
    if (s->kv->be != lm->be)
      return pa_error(PA_EINVAL, "sequence %d: its cache belongs to another backend", i);
    for (int j = 0; j < i; j++) /* both would write its rows, and its length would grow twice */
      if (b->seqs[j].kv == s->kv)
        return pa_error(PA_EINVAL, "sequences %d and %d of the batch share one cache", j, i);
    if (s->kv->len + s->n_tokens > s->kv->cap)
      return pa_error(PA_EINVAL, "sequence %d: %d new tokens do not fit its cache (%d of %d used)", i, s->n_tokens,
                      s->kv->len, s->kv->cap);
    if (P + s->kv->len + s->n_tokens > lm->max_seq)
      return pa_error(PA_EINVAL, "sequence %d reaches position %d, beyond the %d this model was opened for", i,
                      P + s->kv->len + s->n_tokens, lm->max_seq);
    for (int j = 0; j < s->n_tokens; j++)
      if (s->tokens[j] < 0 || s->tokens[j] >= lm->c.vocab_size)
        return pa_error(PA_EINVAL, "sequence %d: token %d is outside the vocabulary (%d)", i, s->tokens[j],
                        lm->c.vocab_size);
    if (*rows > INT32_MAX - s->n_tokens)
      return pa_error(PA_EINVAL, "batch too large");
    *rows += s->n_tokens;
  }
  if (b->logit_ids && b->n_logit_ids < 1)
    return pa_error(PA_EINVAL, "a restricted output needs at least one token");
  for (int i = 0; b->logit_ids && i < b->n_logit_ids; i++)
    if (b->logit_ids[i] < 0 || b->logit_ids[i] >= lm->c.vocab_size)
      return pa_error(PA_EINVAL, "output token %d is outside the vocabulary (%d)", b->logit_ids[i], lm->c.vocab_size);
  return PA_OK;
}

/* The output matrix's rows of ids[0..n) gathered into lm->sel (unless they
 * already are): a restricted pass's product then reads n rows, in the same
 * format, and gives each the value the whole product would. */
static int select_output_rows(pa_lm *lm, const int32_t *ids, int n) {
  if (lm->sel && n == lm->n_sel && !memcmp(ids, lm->sel_ids, (size_t)n * sizeof *ids))
    return PA_OK;
  const size_t row = (size_t)lm->c.dim * (lm->bf16 ? sizeof(pa_bf16) : sizeof(float));
  if (n > lm->sel_cap) {
    lm->be->release(lm->sel);
    free(lm->sel_ids);
    lm->sel = NULL, lm->sel_ids = NULL, lm->sel_cap = lm->n_sel = 0;
    if (!(lm->sel = lm->be->alloc((size_t)n * row)))
      return pa_backend_enomem(lm->be, "no memory for %d output rows", n);
    if (!(lm->sel_ids = malloc((size_t)n * sizeof *lm->sel_ids)))
      return pa_error(PA_ENOMEM, "no memory for %d output rows' ids", n);
    lm->sel_cap = n;
  }
  for (int i = 0; i < n; i++)
    lm->be->copy2d((char *)lm->sel + i * row, row, (const char *)lm->w.output + (size_t)ids[i] * row, row, row, 1);
  memcpy(lm->sel_ids, ids, (size_t)n * sizeof *ids);
  lm->n_sel = n;
  return PA_OK;
}

/* z[r][h] += steer[l][h] for every row, skipping all-zero displacements. */
static void apply_steer(const pa_lm *lm, const float *steer, int l, int rows) {
  const int H = lm->c.n_heads, hd = lm->c.head_dim;
  for (int h = 0; h < H; h++) {
    const float *d = steer + ((size_t)l * H + h) * hd;
    bool any = false;
    for (int i = 0; i < hd && !any; i++)
      any = d[i] != 0.0f;
    if (!any)
      continue;
    for (int r = 0; r < rows; r++) {
      float *zr = lm->s.z + ((size_t)r * H + h) * hd;
      for (int i = 0; i < hd; i++)
        zr[i] += d[i];
    }
  }
}

/* y[rows][out] += scale * (x A^T) B^T for target t of layer l. */
static void lora_apply(pa_lm *lm, const pa_lora *lora, int l, pa_lora_target t, int rows, const float *x, float *y) {
  const pa_backend *be = lm->be;
  const int r = lora->rank, in = lora->in[t], out = lora->out[t];
  be->matmul(rows, r, in, x, pa_lora_a(lora, l, t), 0.0f, lm->s.lu);
  be->scale((size_t)rows * r, lora->scale, lm->s.lu);
  be->matmul(rows, out, r, lm->s.lu, pa_lora_b(lora, l, t), 1.0f, y);
  lm->flops += pa_matmul_flops(rows, r, in) + pa_matmul_flops(rows, out, r);
}

/* FLOPs of one layer's products and attention for this batch. */
static double layer_flops(const pa_lm *lm, const pa_batch *b, int rows) {
  const pa_model_config *c = &lm->c;
  const int qd = c->n_heads * c->head_dim, kd = c->n_kv_heads * c->head_dim;
  double f = pa_matmul_flops(rows, qd, c->dim) * 2 + pa_matmul_flops(rows, kd, c->dim) * 2 +
             pa_matmul_flops(rows, c->ffn_dim, c->dim) * 3;
  const int P = b->prefix ? b->prefix->len : 0;
  for (int i = 0; i < b->n_seqs; i++) { /* scores and the weighted sum: 4 hd flops per (query, key) pair */
    const double n = b->seqs[i].n_tokens, before = P + b->seqs[i].kv->len;
    f += 4.0 * c->n_heads * c->head_dim * (n * before + n * (n + 1) / 2);
  }
  return f;
}

int pa_lm_forward(pa_lm *lm, const pa_batch *b) {
  int rows, rc;
  if ((rc = check_batch(lm, b, &rows)) || (rc = scratch_reserve(lm, rows, b->n_seqs)))
    return rc;
  if (b->logits && b->logit_ids && (rc = select_output_rows(lm, b->logit_ids, b->n_logit_ids)))
    return rc;
  if (b->lora && (size_t)rows * b->lora->rank > lm->s.lu_cap) {
    lm->be->release(lm->s.lu);
    lm->s.lu_cap = 0;
    if (!(lm->s.lu = lm->be->alloc((size_t)rows * b->lora->rank * sizeof(float))))
      return pa_backend_enomem(lm->be, "no memory for the LoRA activations of %d tokens", rows);
    lm->s.lu_cap = (size_t)rows * b->lora->rank;
  }
  /* on a device backend the adapter is copied over for the pass, and a view
   * of it with the copy's arena gives its matrices' device addresses */
  const pa_lora *lora = b->lora;
  pa_lora on_device;
  if (lora && !lm->be->host_memory) {
    if (lora->n_floats > lm->lora_cap) {
      lm->be->release(lm->lora);
      lm->lora_cap = 0;
      if (!(lm->lora = lm->be->alloc(lora->n_floats * sizeof(float))))
        return pa_backend_enomem(lm->be, "no memory for a LoRA adapter");
      lm->lora_cap = lora->n_floats;
    }
    lm->be->upload(lm->lora, lora->arena, lora->n_floats * sizeof(float));
    on_device = *lora;
    on_device.arena = lm->lora;
    lora = &on_device;
  }
  lm->flops += layer_flops(lm, b, rows) * lm->c.n_layers;
  const pa_model_config *c = &lm->c;
  const pa_backend *be = lm->be;
  lm_scratch *s = &lm->s;
  const int D = c->dim, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim, F = c->ffn_dim;
  const int P = b->prefix ? b->prefix->len : 0;

  /* token ids, positions and each sequence's rows */
  for (int i = 0, row = 0; i < b->n_seqs; i++) {
    const pa_seq *q = &b->seqs[i];
    s->aseq[i] = (pa_attn_seq){.row0 = row, .n = q->n_tokens, .past = q->kv->len, .stride = q->kv->cap};
    for (int j = 0; j < q->n_tokens; j++, row++) {
      s->ids_h[row] = q->tokens[j];
      s->pos_h[row] = P + q->kv->len + j;
    }
  }
  if (!be->host_memory) {
    be->upload(s->ids, s->ids_h, (size_t)rows * sizeof *s->ids);
    be->upload(s->pos, s->pos_h, (size_t)rows * sizeof *s->pos);
  }
  if ((b->heads || b->logits) && !be->host_memory) { /* each sequence's last row: its heads and logits */
    for (int i = 0; i < b->n_seqs; i++)
      s->last_row_h[i] = s->aseq[i].row0 + s->aseq[i].n - 1;
    be->upload(s->last_row, s->last_row_h, (size_t)b->n_seqs * sizeof *s->last_row);
  }
  const size_t steer_floats = (size_t)c->n_layers * H * hd;
  if (b->steer && !be->host_memory) { /* the displacements, once per pass */
    if (!lm->steer && !(lm->steer = be->alloc(steer_floats * sizeof(float))))
      return pa_backend_enomem(be, "no memory for the steering displacements");
    be->upload(lm->steer, b->steer, steer_floats * sizeof(float));
  }
  pa_attn_args att = {
      .n_heads = H,
      .n_kv_heads = KV,
      .head_dim = hd,
      .q = s->q,
      .z = s->z,
      .prefix_len = P,
      .prefix_stride = b->prefix ? b->prefix->cap : 0,
      .seqs = s->aseq,
      .n_seqs = b->n_seqs,
      .k_new = s->k, /* the layer's new keys and values go into the caches with its attention call */
      .v_new = s->v,
  };
  const size_t need = be->attention_scratch(&att);
  if (need > s->attn || !s->attn_scratch) {
    be->release(s->attn_scratch);
    s->attn_scratch = be->alloc(need * sizeof(float));
    s->attn = s->attn_scratch ? need : 0;
    if (!s->attn_scratch)
      return pa_backend_enomem(be, "no memory for the attention's scratch (%.3g MB)", need * 4 / 1e6);
  }

  lm_embed(lm, rows, s->ids, lm->w.tok_embd, s->x);
  for (int l = 0; l < c->n_layers; l++) {
    if (l > 0 && b->poll && b->poll(b->poll_ctx))
      return lm_stopped(be, "the forward pass");
    const lm_layer *L = &lm->w.layers[l];
    be->rmsnorm(rows, D, s->x, L->attn_norm, c->norm_eps, s->xb);
    lm_matmul(lm, rows, H * hd, D, s->xb, L->wq, 0.0f, s->q);
    lm_matmul(lm, rows, KV * hd, D, s->xb, L->wk, 0.0f, s->k);
    lm_matmul(lm, rows, KV * hd, D, s->xb, L->wv, 0.0f, s->v);
    if (c->qkv_bias) {
      be->add_bias(rows, H * hd, L->bq, s->q);
      be->add_bias(rows, KV * hd, L->bk, s->k);
      be->add_bias(rows, KV * hd, L->bv, s->v);
    }
    if (lora) {
      lora_apply(lm, lora, l, PA_LORA_Q, rows, s->xb, s->q);
      lora_apply(lm, lora, l, PA_LORA_K, rows, s->xb, s->k);
      lora_apply(lm, lora, l, PA_LORA_V, rows, s->xb, s->v);
    }
    be->rope(rows, H, hd, s->pos, lm->cos_tab, lm->sin_tab, s->q);
    be->rope(rows, KV, hd, s->pos, lm->cos_tab, lm->sin_tab, s->k);
    const size_t layer_off = (size_t)l * KV * hd;
    for (int i = 0; i < b->n_seqs; i++) {
      s->aseq[i].k_own = b->seqs[i].kv->k + layer_off * b->seqs[i].kv->cap;
      s->aseq[i].v_own = b->seqs[i].kv->v + layer_off * b->seqs[i].kv->cap;
    }
    if (b->prefix) {
      att.k_prefix = b->prefix->k + layer_off * b->prefix->cap;
      att.v_prefix = b->prefix->v + layer_off * b->prefix->cap;
    }
    be->attention(&att, s->attn_scratch);
    if (b->steer && be->host_memory)
      apply_steer(lm, b->steer, l, rows);
    else if (b->steer) /* the same sums; a zero displacement adds zeros */
      be->add_bias(rows, H * hd, lm->steer + (size_t)l * H * hd, s->z);
    if (b->heads && be->host_memory) /* each sequence's last row */
      for (int i = 0; i < b->n_seqs; i++) {
        const int last = s->aseq[i].row0 + s->aseq[i].n - 1;
        memcpy(b->heads + ((size_t)i * c->n_layers + l) * H * hd, s->z + (size_t)last * H * hd,
               (size_t)H * hd * sizeof(float));
      }
    else if (b->heads) /* on a device, gathered in one call into the layer's slab, downloaded after the layers */
      be->embed(b->n_seqs, H * hd, s->last_row, s->z, s->heads + (size_t)l * b->n_seqs * H * hd);
    lm_matmul(lm, rows, D, H * hd, s->z, L->wo, 1.0f, s->x);
    if (lora)
      lora_apply(lm, lora, l, PA_LORA_O, rows, s->z, s->x);
    be->rmsnorm(rows, D, s->x, L->ffn_norm, c->norm_eps, s->xb);
    lm_matmul(lm, rows, F, D, s->xb, L->w_gate, 0.0f, s->gate);
    lm_matmul(lm, rows, F, D, s->xb, L->w_up, 0.0f, s->up);
    be->swiglu(rows, F, s->gate, s->up);
    lm_matmul(lm, rows, D, F, s->gate, L->w_down, 1.0f, s->x);
  }
  if (b->heads && !be->host_memory) {
    const size_t hb = (size_t)H * hd * sizeof(float);
    be->download(s->heads_h, s->heads, (size_t)b->n_seqs * c->n_layers * hb);
    for (int l = 0; l < c->n_layers; l++)
      for (int i = 0; i < b->n_seqs; i++)
        memcpy(b->heads + ((size_t)i * c->n_layers + l) * H * hd, s->heads_h + ((size_t)l * b->n_seqs + i) * H * hd,
               hb);
  }
  for (int i = 0; i < b->n_seqs; i++)
    b->seqs[i].kv->len += b->seqs[i].n_tokens;
  if (b->logits) {
    if (be->host_memory)
      for (int i = 0; i < b->n_seqs; i++) {
        const int last = s->aseq[i].row0 + s->aseq[i].n - 1;
        be->rmsnorm(1, D, s->x + (size_t)last * D, lm->w.out_norm, c->norm_eps, s->last + (size_t)i * D);
      }
    else { /* on a device, the last rows gathered (into xb, free by now) and normed in two calls, not one a sequence */
      be->embed(b->n_seqs, D, s->last_row, s->x, s->xb);
      be->rmsnorm(b->n_seqs, D, s->xb, lm->w.out_norm, c->norm_eps, s->last);
    }
    const int N = b->logit_ids ? b->n_logit_ids : c->vocab_size;
    float *logits = be->host_memory ? b->logits : s->logits;
    lm_matmul(lm, b->n_seqs, N, D, s->last, b->logit_ids ? lm->sel : lm->w.output, 0.0f, logits);
    if (!be->host_memory)
      be->download(b->logits, logits, (size_t)b->n_seqs * N * sizeof(float));
    lm->flops += pa_matmul_flops(b->n_seqs, N, D);
  }
  return lm_backend_status(be, "the forward pass");
}

int pa_argmax(const float *v, int n) {
  int best = 0;
  for (int i = 1; i < n; i++)
    if (v[i] > v[best])
      best = i;
  return best;
}

void pa_softmax_subset(const float *logits, const int32_t *ids, int n, double *p) {
  double mx = -INFINITY, sum = 0;
  for (int i = 0; i < n; i++)
    mx = logits[ids[i]] > mx ? logits[ids[i]] : mx;
  for (int i = 0; i < n; i++)
    sum += p[i] = exp(logits[ids[i]] - mx);
  for (int i = 0; i < n; i++)
    p[i] /= sum;
}

int pa_lm_generate(pa_lm *lm, const pa_kv *prefix, pa_kv *kv, const int32_t *prompt, int n_prompt, const pa_gen_opts *o,
                   int32_t **out, int *n_out) {
  *out = NULL;
  *n_out = 0;
  if (o->max_tokens < 0 || n_prompt < 1)
    return pa_error(PA_EINVAL, "generation needs a prompt and a non-negative token budget");
  int32_t *gen = malloc(((size_t)o->max_tokens + 1) * sizeof *gen);
  float *logits = malloc((size_t)lm->c.vocab_size * sizeof *logits);
  if (!gen || !logits) {
    free(gen);
    free(logits);
    return pa_error(PA_ENOMEM, "no memory");
  }
  pa_kv_clear(kv);
  pa_seq seq = {.tokens = prompt, .n_tokens = n_prompt, .kv = kv};
  pa_batch b = {.prefix = prefix, .seqs = &seq, .n_seqs = 1, .steer = o->steer, .lora = o->lora, .logits = logits};
  int n = 0, rc = PA_OK;
  while (n < o->max_tokens) {
    if ((rc = pa_lm_forward(lm, &b)))
      break;
    const int32_t next = pa_argmax(logits, lm->c.vocab_size);
    gen[n++] = next;
    bool stop = false;
    for (int i = 0; i < o->n_stop; i++)
      stop |= next == o->stop[i];
    if (stop || n == o->max_tokens)
      break;
    seq.tokens = &gen[n - 1];
    seq.n_tokens = 1;
  }
  free(logits);
  if (rc) {
    free(gen);
    return rc;
  }
  *out = gen;
  *n_out = n;
  return PA_OK;
}
