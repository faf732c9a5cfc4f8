#include "train.h"

#include "backend.h"
#include "lm_internal.h"
#include "status.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* What one layer's forward pass keeps for the backward pass ([R] = rows). */
typedef struct {
  float *x;                    /* [R][D] the residual stream into the layer */
  float *xb;                   /* [R][D] after the attention RMSNorm */
  float *q, *z;                /* [R][H*hd] queries (RoPE applied), head outputs */
  float *k, *v;                /* [R][KV*hd] keys (RoPE applied), values */
  float *lse;                  /* [R][H] attention's log-sum-exp */
  float *u[PA_LORA_N_TARGETS]; /* [R][rank] scale * (input . A^T) per target */
  float *xm;                   /* [R][D] the residual stream after attention */
  float *gate, *up;            /* [R][F] the MLP's two projections, before SwiGLU */
} layer_acts;

struct pa_trainer {
  pa_lm *lm;
  const pa_backend *be;
  pa_train_plan plan;
  layer_acts *layers;
  float *x_final; /* [R][D] the residual stream after the last layer */
  /* buffers shared by the passes: forward uses t1 (the MLP's normed input)
   * and t2 (its hidden activation), backward the rest and t1, t2 as dxb, dh */
  float *t1, *t2, *dx, *dq, *dz, *dk, *dv, *dgate, *dup, *du;
  float *last, *dlast; /* [max_seqs][D] normed last rows, their gradient */
  float *attn_scratch;
  size_t attn_floats;
  float *arena;
  size_t arena_floats;
  int32_t *ids, *pos, *out; /* [R], [R], [max_seqs][max_out] (host) */
  int *seq_row0, *seq_len;  /* [max_seqs] (host) */
  /* a device backend's: the ids and positions, the wanted logits' output
   * rows gathered [max_seqs][max_out][D], those logits and their gradient,
   * and copies of the adapter and the gradient (views with the copies'
   * arenas give their matrices there) */
  int32_t *d_ids, *d_pos;
  float *w_sel;   /* [seqs][n_out][dim]: the wanted output rows, gathered (fp32, backend memory) */
  int32_t *d_out; /* the wanted tokens where the gather reads them */
  float *d_logits, *d_dlogits, *d_lora, *d_grad;
  size_t lora_floats;
  pa_lora lora_view, grad_view;
  /* the adapter being optimised (pa_trainer_optimise): its gradient and
   * AdamW's moments in backend memory, and on a device its values too (a
   * host backend's are the adapter's own arena); views with those arenas */
  pa_lora *opt;
  pa_adamw_opts opt_o;
  float *opt_w, *opt_g, *opt_m, *opt_v;
  size_t opt_floats;
  pa_lora opt_view, opt_grad_view;
  int opt_steps;
  bool opt_grad_ready; /* a backward pass with it since the last step */
  /* the last forward pass */
  int rows, n_seqs, n_out;
  pa_attn_train_args attn;
  const pa_lora *lora, *lora_be; /* its adapter, and that adapter as the backend sees it */
  int (*poll)(void *ctx);        /* its batch's */
  void *poll_ctx;
  bool ready;
  double flops;
};

static size_t attn_scratch_floats(const pa_trainer *t, const pa_train_plan *p) {
  /* the worst case of the plan: the scratch grows with each of these */
  const pa_model_config *c = &t->lm->c;
  for (int i = 0; i < p->max_seqs; i++)
    t->seq_row0[i] = p->max_prefix + i * p->max_seq_len, t->seq_len[i] = p->max_seq_len;
  const pa_attn_train_args a = {.n_heads = c->n_heads,
                                .n_kv_heads = c->n_kv_heads,
                                .head_dim = c->head_dim,
                                .prefix_len = p->max_prefix,
                                .n_seqs = p->max_seqs,
                                .seq_row0 = t->seq_row0,
                                .seq_len = t->seq_len};
  return t->be->attention_train_scratch(&a);
}

int pa_trainer_create(pa_lm *lm, const pa_train_plan *plan, pa_trainer **out) {
  *out = NULL;
  pa_train_plan p = *plan;
  if (p.max_rows <= 0)
    p.max_rows = p.max_prefix + p.max_seqs * p.max_seq_len;
  if (p.max_prefix < 0 || p.max_seqs < 1 || p.max_seq_len < 1 || p.max_out < 1 || p.rank < 1 ||
      p.max_rows > p.max_prefix + p.max_seqs * p.max_seq_len || p.max_prefix + p.max_seq_len > lm->max_seq)
    return pa_error(PA_EINVAL,
                    "trainer: a plan of %d prefix tokens, %d sequences of up to %d tokens (%d rows, %d logits, rank "
                    "%d) is not possible for a model opened for %d positions",
                    p.max_prefix, p.max_seqs, p.max_seq_len, p.max_rows, p.max_out, p.rank, lm->max_seq);
  pa_trainer *t = calloc(1, sizeof *t);
  if (!t)
    return pa_error(PA_ENOMEM, "no memory");
  t->lm = lm;
  t->be = lm->be;
  t->plan = p;
  const pa_model_config *c = &lm->c;
  const size_t R = (size_t)p.max_rows, D = (size_t)c->dim, Q = (size_t)c->n_heads * c->head_dim,
               K = (size_t)c->n_kv_heads * c->head_dim, F = (size_t)c->ffn_dim, H = (size_t)c->n_heads,
               r = (size_t)p.rank, S = (size_t)p.max_seqs;
  const size_t per_layer = R * (3 * D + 2 * Q + 2 * K + H + PA_LORA_N_TARGETS * r + 2 * F);
  const size_t work = R * (D + D + F + D + Q + Q + K + K + F + F + r) + 2 * S * D;
  t->layers = calloc((size_t)c->n_layers, sizeof *t->layers);
  t->ids = malloc(R * sizeof *t->ids);
  t->pos = malloc(R * sizeof *t->pos);
  t->out = malloc(S * (size_t)p.max_out * sizeof *t->out);
  t->seq_row0 = malloc(S * sizeof *t->seq_row0);
  t->seq_len = malloc(S * sizeof *t->seq_len);
  int rc = PA_OK;
  if (!t->layers || !t->ids || !t->pos || !t->out || !t->seq_row0 || !t->seq_len) {
    rc = pa_error(PA_ENOMEM, "no memory");
    goto fail;
  }
  t->attn_floats = attn_scratch_floats(t, &p);
  t->arena_floats = per_layer * (size_t)c->n_layers + work + t->attn_floats;
  if (!(t->arena = t->be->alloc(t->arena_floats * sizeof *t->arena))) {
    rc = pa_backend_enomem(t->be, "trainer: no memory for %.3g MB of activations (%d rows)", t->arena_floats * 4 / 1e6,
                           p.max_rows);
    goto fail;
  }
  const size_t outs = S * (size_t)p.max_out;
  if (!(t->w_sel = t->be->alloc(outs * D * sizeof(float)))) {
    rc = pa_backend_enomem(t->be, "trainer: no memory for %zu output rows", outs);
    goto fail;
  }
  if (!t->be->host_memory) {
    t->d_ids = t->be->alloc(R * sizeof *t->d_ids);
    t->d_pos = t->be->alloc(R * sizeof *t->d_pos);
    t->d_out = t->be->alloc(outs * sizeof *t->d_out);
    t->d_logits = t->be->alloc(outs * sizeof(float));
    t->d_dlogits = t->be->alloc(outs * sizeof(float));
    if (!t->d_ids || !t->d_pos || !t->d_out || !t->d_logits || !t->d_dlogits) {
      rc = pa_backend_enomem(t->be, "trainer: no memory for its buffers");
      goto fail;
    }
  } else {
    t->d_ids = t->ids, t->d_pos = t->pos, t->d_out = t->out;
  }
  float *a = t->arena;
#define TAKE(ptr, n) (ptr = a, a += (n))
  for (int l = 0; l < c->n_layers; l++) {
    layer_acts *L = &t->layers[l];
    TAKE(L->x, R * D), TAKE(L->xb, R * D), TAKE(L->q, R * Q), TAKE(L->z, R * Q), TAKE(L->k, R * K);
    TAKE(L->v, R * K), TAKE(L->lse, R * H), TAKE(L->xm, R * D), TAKE(L->gate, R * F), TAKE(L->up, R * F);
    for (int i = 0; i < PA_LORA_N_TARGETS; i++)
      TAKE(L->u[i], R * r);
  }
  TAKE(t->x_final, R * D), TAKE(t->t1, R * D), TAKE(t->t2, R * F), TAKE(t->dx, R * D), TAKE(t->dq, R * Q);
  TAKE(t->dz, R * Q), TAKE(t->dk, R * K), TAKE(t->dv, R * K), TAKE(t->dgate, R * F), TAKE(t->dup, R * F);
  TAKE(t->du, R * r), TAKE(t->last, S * D), TAKE(t->dlast, S * D), TAKE(t->attn_scratch, t->attn_floats);
#undef TAKE
  *out = t;
  return PA_OK;
fail:
  pa_trainer_destroy(t);
  return rc;
}

static void release_optimiser(pa_trainer *t) {
  void *const bufs[] = {t->opt_w, t->opt_g, t->opt_m, t->opt_v};
  for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
    t->be->release(bufs[i]);
  t->opt_w = t->opt_g = t->opt_m = t->opt_v = NULL;
  t->opt_floats = 0;
  t->opt = NULL;
}

void pa_trainer_destroy(pa_trainer *t) {
  if (!t)
    return;
  t->be->release(t->arena);
  t->be->release(t->w_sel);
  if (!t->be->host_memory) {
    void *const dev[] = {t->d_ids, t->d_pos, t->d_out, t->d_logits, t->d_dlogits, t->d_lora, t->d_grad};
    for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
      t->be->release(dev[i]);
  }
  release_optimiser(t);
  free(t->layers);
  free(t->ids), free(t->pos), free(t->out), free(t->seq_row0), free(t->seq_len);
  free(t);
}

size_t pa_trainer_bytes(const pa_trainer *t) {
  return (t->arena_floats + (size_t)t->plan.max_seqs * t->plan.max_out * t->lm->c.dim) * sizeof(float) +
         (size_t)t->plan.max_rows * (sizeof *t->ids + sizeof *t->pos) +
         (size_t)t->plan.max_seqs * (2 * sizeof(int) + (size_t)t->plan.max_out * sizeof *t->out);
}

double pa_trainer_flops(const pa_trainer *t) { return t->flops; }

static int check_lora(const pa_trainer *t, const pa_lora *l) {
  int rc = pa_lora_check(l, &t->lm->c);
  if (rc)
    return pa_error_prefix(rc, "trainer: ");
  if (l->rank > t->plan.rank)
    return pa_error(PA_EINVAL, "trainer: LoRA rank %d, planned for %d", l->rank, t->plan.rank);
  return PA_OK;
}

/* n floats from src to dst, both in the backend's memory. */
static void copy_floats(const pa_trainer *t, float *dst, const float *src, size_t n) {
  if (t->be->host_memory)
    memcpy(dst, src, n * sizeof(float));
  else
    t->be->copy2d(dst, n * sizeof(float), src, n * sizeof(float), n * sizeof(float), 1);
}

/* The adapter l (host memory) as the backend sees it: itself on a host
 * backend, else a copy in *dev (grown as needed; uploaded when upload) and
 * a view of it. NULL when the device has no room. */
static const pa_lora *on_backend(pa_trainer *t, const pa_lora *l, float **dev, pa_lora *view, bool upload) {
  if (t->be->host_memory)
    return l;
  if (l->n_floats > t->lora_floats || !*dev) {
    t->be->release(t->d_lora), t->be->release(t->d_grad);
    t->d_lora = t->be->alloc(l->n_floats * sizeof(float));
    t->d_grad = t->be->alloc(l->n_floats * sizeof(float));
    t->lora_floats = t->d_lora && t->d_grad ? l->n_floats : 0;
    if (!t->lora_floats)
      return NULL;
  }
  if (upload)
    t->be->upload(*dev, l->arena, l->n_floats * sizeof(float));
  *view = *l;
  view->arena = *dev;
  return view;
}

/* y[R][out] += scale * (x A^T) B^T, keeping u = scale * x A^T. */
static void lora_forward(pa_trainer *t, const pa_lora *lo, int l, pa_lora_target tg, const float *x, float *u,
                         float *y) {
  const int R = t->rows, r = lo->rank, in = lo->in[tg], out = lo->out[tg];
  t->be->matmul(R, r, in, x, pa_lora_a(lo, l, tg), 0.0f, u);
  t->be->scale((size_t)R * r, lo->scale, u);
  t->be->matmul(R, out, r, u, pa_lora_b(lo, l, tg), 1.0f, y);
  t->flops += pa_matmul_flops(R, r, in) + pa_matmul_flops(R, out, r);
}

/* From dy [R][out]: gB += dy^T u, du = scale dy B, gA += du^T x, dx += du A (dx may be NULL). */
static void lora_backward(pa_trainer *t, const pa_lora *lo, pa_lora *g, int l, pa_lora_target tg, const float *dy,
                          const float *x, const float *u, float *dx) {
  const int R = t->rows, r = lo->rank, in = lo->in[tg], out = lo->out[tg];
  const pa_backend *be = t->be;
  be->matmul_tn_acc(R, out, r, dy, u, pa_lora_b(g, l, tg));
  be->matmul_nn(R, r, out, dy, pa_lora_b(lo, l, tg), 0.0f, t->du);
  be->scale((size_t)R * r, lo->scale, t->du);
  be->matmul_tn_acc(R, r, in, t->du, x, pa_lora_a(g, l, tg));
  t->flops += pa_matmul_flops(R, out, r) * 2 + pa_matmul_flops(R, r, in);
  if (dx) {
    be->matmul_nn(R, in, r, t->du, pa_lora_a(lo, l, tg), 1.0f, dx);
    t->flops += pa_matmul_flops(R, in, r);
  }
}

/* (query, key) pairs of the batch's attention, per head. */
static double attn_pairs(const pa_attn_train_args *a) {
  const double P = a->prefix_len;
  double n = P * (P + 1) / 2;
  for (int i = 0; i < a->n_seqs; i++) {
    const double m = a->seq_len[i];
    n += m * P + m * (m + 1) / 2;
  }
  return n;
}

static int check_batch(const pa_trainer *t, const pa_train_batch *b, int *rows) {
  const pa_train_plan *p = &t->plan;
  if (b->n_prefix < 0 || b->n_prefix > p->max_prefix || b->n_seqs < 1 || b->n_seqs > p->max_seqs || b->n_out < 1 ||
      b->n_out > p->max_out)
    return pa_error(PA_EINVAL,
                    "trainer: a batch of %d prefix tokens, %d sequences and %d logits each is outside the plan",
                    b->n_prefix, b->n_seqs, b->n_out);
  const int V = t->lm->c.vocab_size;
  *rows = b->n_prefix;
  for (int i = 0; i < b->n_prefix; i++)
    if (b->prefix[i] < 0 || b->prefix[i] >= V)
      return pa_error(PA_EINVAL, "trainer: prefix token %d is outside the vocabulary", b->prefix[i]);
  for (int s = 0; s < b->n_seqs; s++) {
    if (b->n_tokens[s] < 1 || b->n_tokens[s] > p->max_seq_len)
      return pa_error(PA_EINVAL, "trainer: sequence %d has %d tokens (1..%d planned)", s, b->n_tokens[s],
                      p->max_seq_len);
    for (int j = 0; j < b->n_tokens[s]; j++)
      if (b->tokens[s][j] < 0 || b->tokens[s][j] >= V)
        return pa_error(PA_EINVAL, "trainer: sequence %d: token %d is outside the vocabulary", s, b->tokens[s][j]);
    for (int j = 0; j < b->n_out; j++)
      if (b->out[s * b->n_out + j] < 0 || b->out[s * b->n_out + j] >= V)
        return pa_error(PA_EINVAL, "trainer: sequence %d: wanted token %d is outside the vocabulary", s,
                        b->out[s * b->n_out + j]);
    *rows += b->n_tokens[s];
  }
  if (*rows > p->max_rows)
    return pa_error(PA_EINVAL, "trainer: a batch of %d rows, %d planned", *rows, p->max_rows);
  return PA_OK;
}

static bool stop_asked(const pa_trainer *t) { return t->poll && t->poll(t->poll_ctx); }

int pa_trainer_forward(pa_trainer *t, const pa_lora *lora, const pa_train_batch *b, float *logits) {
  int rows = 0, rc;
  t->ready = false;
  if ((rc = check_batch(t, b, &rows)) || (lora && (rc = check_lora(t, lora))))
    return rc;
  pa_lm *lm = t->lm;
  const pa_backend *be = t->be;
  const pa_model_config *c = &lm->c;
  const int D = c->dim, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim, F = c->ffn_dim, P = b->n_prefix;
  t->rows = rows, t->n_seqs = b->n_seqs, t->n_out = b->n_out;
  t->poll = b->poll, t->poll_ctx = b->poll_ctx;
  memcpy(t->out, b->out, (size_t)b->n_seqs * b->n_out * sizeof *t->out);
  for (int i = 0; i < P; i++)
    t->ids[i] = b->prefix[i], t->pos[i] = i;
  for (int s = 0, row = P; s < b->n_seqs; s++) {
    t->seq_row0[s] = row, t->seq_len[s] = b->n_tokens[s];
    for (int j = 0; j < b->n_tokens[s]; j++, row++)
      t->ids[row] = b->tokens[s][j], t->pos[row] = P + j;
  }
  if (!be->host_memory) {
    be->upload(t->d_ids, t->ids, (size_t)rows * sizeof *t->ids);
    be->upload(t->d_pos, t->pos, (size_t)rows * sizeof *t->pos);
  }
  const pa_lora *host_lora = lora;
  if (lora && t->opt) { /* the adapter being optimised: its values are the trainer's */
    if (lora != t->opt)
      return pa_error(PA_EINVAL, "trainer: it optimises another adapter; a forward pass takes that one or none");
    lora = &t->opt_view;
  } else if (lora && !(lora = on_backend(t, lora, &t->d_lora, &t->lora_view, true))) {
    return pa_backend_enomem(be, "trainer: no memory for the adapter");
  }
  t->lora = host_lora, t->lora_be = lora;
  t->attn = (pa_attn_train_args){.n_heads = H,
                                 .n_kv_heads = KV,
                                 .head_dim = hd,
                                 .prefix_len = P,
                                 .n_seqs = b->n_seqs,
                                 .seq_row0 = t->seq_row0,
                                 .seq_len = t->seq_len};
  if (be->attention_train_scratch(&t->attn) > t->attn_floats)
    return pa_error(PA_EINVAL, "trainer: the batch needs more attention scratch than its plan");

  lm_embed(lm, rows, t->d_ids, lm->w.tok_embd, t->layers[0].x);
  for (int l = 0; l < c->n_layers; l++) {
    if (l > 0 && stop_asked(t))
      return lm_stopped(be, "the training forward pass");
    const lm_layer *W = &lm->w.layers[l];
    layer_acts *A = &t->layers[l];
    float *next = l + 1 < c->n_layers ? t->layers[l + 1].x : t->x_final;
    be->rmsnorm(rows, D, A->x, W->attn_norm, c->norm_eps, A->xb);
    lm_matmul(lm, rows, H * hd, D, A->xb, W->wq, 0.0f, A->q);
    lm_matmul(lm, rows, KV * hd, D, A->xb, W->wk, 0.0f, A->k);
    lm_matmul(lm, rows, KV * hd, D, A->xb, W->wv, 0.0f, A->v);
    if (c->qkv_bias) {
      be->add_bias(rows, H * hd, W->bq, A->q);
      be->add_bias(rows, KV * hd, W->bk, A->k);
      be->add_bias(rows, KV * hd, W->bv, A->v);
    }
    if (lora) {
      lora_forward(t, lora, l, PA_LORA_Q, A->xb, A->u[PA_LORA_Q], A->q);
      lora_forward(t, lora, l, PA_LORA_K, A->xb, A->u[PA_LORA_K], A->k);
      lora_forward(t, lora, l, PA_LORA_V, A->xb, A->u[PA_LORA_V], A->v);
    }
    be->rope(rows, H, hd, t->d_pos, lm->cos_tab, lm->sin_tab, A->q);
    be->rope(rows, KV, hd, t->d_pos, lm->cos_tab, lm->sin_tab, A->k);
    t->attn.q = A->q, t->attn.k = A->k, t->attn.v = A->v, t->attn.z = A->z, t->attn.lse = A->lse;
    be->attention_train(&t->attn, t->attn_scratch);
    copy_floats(t, A->xm, A->x, (size_t)rows * D);
    lm_matmul(lm, rows, D, H * hd, A->z, W->wo, 1.0f, A->xm);
    if (lora)
      lora_forward(t, lora, l, PA_LORA_O, A->z, A->u[PA_LORA_O], A->xm);
    be->rmsnorm(rows, D, A->xm, W->ffn_norm, c->norm_eps, t->t1);
    lm_matmul(lm, rows, F, D, t->t1, W->w_gate, 0.0f, A->gate);
    lm_matmul(lm, rows, F, D, t->t1, W->w_up, 0.0f, A->up);
    copy_floats(t, t->t2, A->gate, (size_t)rows * F);
    be->swiglu(rows, F, t->t2, A->up);
    copy_floats(t, next, A->xm, (size_t)rows * D);
    lm_matmul(lm, rows, D, F, t->t2, W->w_down, 1.0f, next);
  }
  const double per_layer = pa_matmul_flops(rows, H * hd, D) * 2 + pa_matmul_flops(rows, KV * hd, D) * 2 +
                           pa_matmul_flops(rows, F, D) * 3 + 4.0 * H * hd * attn_pairs(&t->attn);
  t->flops += per_layer * c->n_layers;

  /* the wanted logits at each sequence's last token, from the wanted output
   * rows gathered in fp32 (kept for the backward pass): on the host as dot
   * products in double, on a device as one product per sequence */
  const int n_outs = b->n_seqs * b->n_out;
  if (!be->host_memory)
    be->upload(t->d_out, t->out, (size_t)n_outs * sizeof *t->out);
  lm_embed(lm, n_outs, t->d_out, lm->w.output, t->w_sel);
  for (int s = 0; s < b->n_seqs; s++) {
    const int last = t->seq_row0[s] + t->seq_len[s] - 1;
    float *h = t->last + (size_t)s * D;
    const float *ws = t->w_sel + (size_t)s * b->n_out * D;
    be->rmsnorm(1, D, t->x_final + (size_t)last * D, lm->w.out_norm, c->norm_eps, h);
    for (int j = 0; j < b->n_out && be->host_memory; j++) {
      double acc = 0;
      for (int i = 0; i < D; i++)
        acc += (double)h[i] * ws[(size_t)j * D + i];
      logits[s * b->n_out + j] = (float)acc;
    }
    if (!be->host_memory)
      be->matmul(1, b->n_out, D, h, ws, 0.0f, t->d_logits + (size_t)s * b->n_out);
  }
  if (!be->host_memory)
    be->download(logits, t->d_logits, (size_t)n_outs * sizeof *logits);
  t->flops += 2.0 * D * b->n_seqs * b->n_out;
  rc = lm_backend_status(be, "the training forward pass");
  t->ready = rc == PA_OK;
  return rc;
}

int pa_trainer_backward(pa_trainer *t, const float *dlogits, pa_lora *grad) {
  if (!t->ready || !t->lora)
    return pa_error(PA_EINVAL, "trainer: backward needs a forward pass with an adapter first");
  const bool optimised = t->lora == t->opt;
  if (!grad && !optimised)
    return pa_error(PA_EINVAL, "trainer: backward needs a gradient to write, or the adapter being optimised");
  if (grad &&
      (grad->n_layers != t->lora->n_layers || grad->rank != t->lora->rank || grad->n_floats != t->lora->n_floats))
    return pa_error(PA_EINVAL, "trainer: the gradient's shape is not the adapter's");
  pa_lm *lm = t->lm;
  const pa_backend *be = t->be;
  const pa_model_config *c = &lm->c;
  const pa_lora *lo = t->lora_be, *host_grad = grad;
  /* where the sums go: the optimiser's gradient, the caller's (a host
   * backend), or a copy in the device's memory */
  if (optimised)
    grad = &t->opt_grad_view;
  else if (!be->host_memory && !(grad = (pa_lora *)on_backend(t, grad, &t->d_grad, &t->grad_view, false)))
    return pa_backend_enomem(be, "trainer: no memory for the gradient");
  t->opt_grad_ready = false;
  be->zero(grad->arena, grad->n_floats * sizeof(float)); /* lora_backward adds to it */
  const int R = t->rows, D = c->dim, H = c->n_heads, KV = c->n_kv_heads, hd = c->head_dim, F = c->ffn_dim;
  float *dxb = t->t1, *dh = t->t2;

  /* the loss's gradient into the last rows of the residual stream */
  be->zero(t->dx, (size_t)R * D * sizeof(float));
  if (!be->host_memory)
    be->upload(t->d_dlogits, dlogits, (size_t)t->n_seqs * t->n_out * sizeof *dlogits);
  for (int s = 0; s < t->n_seqs; s++) {
    float *g = t->dlast + (size_t)s * D;
    for (int i = 0; i < D && be->host_memory; i++) {
      double acc = 0;
      for (int j = 0; j < t->n_out; j++)
        acc += (double)dlogits[s * t->n_out + j] * t->w_sel[((size_t)s * t->n_out + j) * D + i];
      g[i] = (float)acc;
    }
    if (!be->host_memory) /* g = dlogits . the gathered output rows */
      be->matmul_nn(1, D, t->n_out, t->d_dlogits + (size_t)s * t->n_out, t->w_sel + (size_t)s * t->n_out * D, 0.0f, g);
    const int last = t->seq_row0[s] + t->seq_len[s] - 1;
    be->rmsnorm_backward(1, D, t->x_final + (size_t)last * D, lm->w.out_norm, c->norm_eps, g, t->dx + (size_t)last * D);
  }
  for (int l = c->n_layers - 1; l >= 0; l--) {
    if (l < c->n_layers - 1 && stop_asked(t)) {
      t->ready = false; /* the gradient is part-written */
      return lm_stopped(be, "the training backward pass");
    }
    const lm_layer *W = &lm->w.layers[l];
    layer_acts *A = &t->layers[l];
    t->attn.q = A->q, t->attn.k = A->k, t->attn.v = A->v, t->attn.z = A->z, t->attn.lse = A->lse;
    /* the MLP: x_next = xm + swiglu(xb2 Wg^T, xb2 Wu^T) Wd^T, xb2 = rmsnorm(xm) */
    lm_matmul_nn(lm, R, F, D, t->dx, W->w_down, 0.0f, dh);
    be->swiglu_backward(R, F, A->gate, A->up, dh, t->dgate, t->dup);
    lm_matmul_nn(lm, R, D, F, t->dgate, W->w_gate, 0.0f, dxb);
    lm_matmul_nn(lm, R, D, F, t->dup, W->w_up, 1.0f, dxb);
    be->rmsnorm_backward(R, D, A->xm, W->ffn_norm, c->norm_eps, dxb, t->dx); /* dx: now d xm */
    /* attention: xm = x + z Wo^T + lora_o(z) */
    lm_matmul_nn(lm, R, H * hd, D, t->dx, W->wo, 0.0f, t->dz);
    lora_backward(t, lo, grad, l, PA_LORA_O, t->dx, A->z, A->u[PA_LORA_O], t->dz);
    be->attention_backward(&t->attn, t->dz, t->dq, t->dk, t->dv, t->attn_scratch);
    be->rope_backward(R, H, hd, t->d_pos, lm->cos_tab, lm->sin_tab, t->dq);
    be->rope_backward(R, KV, hd, t->d_pos, lm->cos_tab, lm->sin_tab, t->dk);
    /* the projections: q, k, v = xb W^T + b + lora(xb); below layer 0 nothing trains */
    const bool below = l > 0;
    if (below) {
      lm_matmul_nn(lm, R, D, H * hd, t->dq, W->wq, 0.0f, dxb);
      lm_matmul_nn(lm, R, D, KV * hd, t->dk, W->wk, 1.0f, dxb);
      lm_matmul_nn(lm, R, D, KV * hd, t->dv, W->wv, 1.0f, dxb);
    }
    lora_backward(t, lo, grad, l, PA_LORA_Q, t->dq, A->xb, A->u[PA_LORA_Q], below ? dxb : NULL);
    lora_backward(t, lo, grad, l, PA_LORA_K, t->dk, A->xb, A->u[PA_LORA_K], below ? dxb : NULL);
    lora_backward(t, lo, grad, l, PA_LORA_V, t->dv, A->xb, A->u[PA_LORA_V], below ? dxb : NULL);
    if (below)
      be->rmsnorm_backward(R, D, A->x, W->attn_norm, c->norm_eps, dxb, t->dx); /* dx: now d x */
    t->flops += pa_matmul_flops(R, F, D) * 3 + pa_matmul_flops(R, H * hd, D) +
                (below ? pa_matmul_flops(R, D, H * hd) + 2 * pa_matmul_flops(R, D, KV * hd) : 0) +
                10.0 * H * hd * attn_pairs(&t->attn);
  }
  t->flops += 2.0 * D * t->n_seqs * t->n_out;
  if (host_grad && host_grad->arena != grad->arena)
    be->download(host_grad->arena, grad->arena, host_grad->n_floats * sizeof(float));
  const int rc = lm_backend_status(be, "the training backward pass");
  t->opt_grad_ready = optimised && rc == PA_OK;
  return rc;
}

pa_adamw_step pa_adamw_constants(const pa_adamw_opts *o, int t) {
  return (pa_adamw_step){.beta1 = o->beta1,
                         .beta2 = o->beta2,
                         .c1 = 1 - pow(o->beta1, t),
                         .c2 = 1 - pow(o->beta2, t),
                         .lr = o->lr,
                         .decay = 1 - o->lr * o->weight_decay,
                         .eps = o->eps};
}

int pa_trainer_optimise(pa_trainer *t, pa_lora *adapter, const pa_adamw_opts *o) {
  int rc = check_lora(t, adapter);
  if (rc)
    return rc;
  if (!(o->lr >= 0 && isfinite(o->lr)) || !(o->weight_decay >= 0 && isfinite(o->weight_decay)) ||
      !(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1) || !(o->eps > 0 && isfinite(o->eps)))
    return pa_error(PA_EINVAL,
                    "trainer: AdamW with learning rate %g, weight decay %g, betas %g and %g, epsilon %g is not "
                    "possible (rate and decay finite and >= 0, betas in [0, 1), epsilon finite and > 0)",
                    o->lr, o->weight_decay, o->beta1, o->beta2, o->eps);
  /* the adapter optimised so far keeps its steps: on a device its values
   * come down first (whether it is this one, starting again from them, or
   * another, which may take its buffers) */
  if (t->opt && (rc = pa_trainer_adapter_sync(t)))
    return rc;
  const pa_backend *be = t->be;
  const size_t n = adapter->n_floats, bytes = n * sizeof(float);
  t->ready = false; /* a forward pass's adapter may have been this one, with other values */
  if (n > t->opt_floats) {
    release_optimiser(t);
    t->opt_g = be->alloc(bytes), t->opt_m = be->alloc(bytes), t->opt_v = be->alloc(bytes);
    t->opt_w = be->host_memory ? NULL : be->alloc(bytes);
    if (!t->opt_g || !t->opt_m || !t->opt_v || (!be->host_memory && !t->opt_w)) {
      rc = pa_backend_enomem(be, "trainer: no memory for the optimiser's %.3g MB",
                             (be->host_memory ? 3 : 4) * bytes / 1e6);
      release_optimiser(t);
      return rc;
    }
    t->opt_floats = n;
  }
  t->opt = adapter, t->opt_o = *o, t->opt_steps = 0, t->opt_grad_ready = false;
  t->opt_view = *adapter, t->opt_grad_view = *adapter;
  t->opt_grad_view.arena = t->opt_g;
  if (!be->host_memory) {
    t->opt_view.arena = t->opt_w;
    be->upload(t->opt_w, adapter->arena, bytes);
  }
  be->zero(t->opt_m, bytes);
  be->zero(t->opt_v, bytes);
  if ((rc = lm_backend_status(be, "the optimiser's start")))
    t->opt = NULL;
  return rc;
}

int pa_trainer_step(pa_trainer *t) {
  if (!t->opt)
    return pa_error(PA_EINVAL, "trainer: a step needs an adapter being optimised (pa_trainer_optimise)");
  if (!t->opt_grad_ready)
    return pa_error(PA_EINVAL, "trainer: a step needs a backward pass with the adapter since the last step");
  t->opt_grad_ready = false;
  t->ready = false; /* the activations are the old values' */
  const pa_adamw_step s = pa_adamw_constants(&t->opt_o, ++t->opt_steps);
  t->be->adamw(t->opt->n_floats, &s, t->opt_view.arena, t->opt_g, t->opt_m, t->opt_v);
  return lm_backend_status(t->be, "the optimiser's step");
}

int pa_trainer_adapter_sync(pa_trainer *t) {
  if (!t->opt)
    return pa_error(PA_EINVAL, "trainer: no adapter is being optimised");
  if (t->be->host_memory)
    return PA_OK;
  t->be->download(t->opt->arena, t->opt_w, t->opt->n_floats * sizeof(float));
  return lm_backend_status(t->be, "the adapter's download");
}

int pa_trainer_steps(const pa_trainer *t) { return t->opt_steps; }
