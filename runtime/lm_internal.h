/* lm_internal.h: pa_lm and pa_kv as forward.c lays them out, for the other
 * parts of the runtime that run the same model over the same backend (the
 * trainer, train.c). Not an interface: nothing outside runtime/ includes it. */
#ifndef PALIGN_LM_INTERNAL_H
#define PALIGN_LM_INTERNAL_H

#include "backend.h"
#include "forward.h"
#include "model.h"
#include "status.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct pa_kv {
  const pa_backend *be; /* whose memory k and v are in */
  int n_layers, n_kv_heads, head_dim;
  int cap, len;
  float *k, *v; /* [n_layers][n_kv_heads][cap][head_dim] */
};

/* Activations for `rows` tokens; grown when a larger batch comes, never shrunk. */
typedef struct {
  int rows, seqs;
  size_t attn;      /* floats of attention scratch */
  float *x;         /* [rows][dim]: the residual stream */
  float *xb;        /* [rows][dim]: normalised */
  float *q, *z;     /* [rows][n_heads * head_dim] */
  float *k, *v;     /* [rows][n_kv_heads * head_dim] */
  float *gate, *up; /* [rows][ffn_dim] */
  float *last;      /* [seqs][dim]: final-normed last rows */
  float *attn_scratch;
  int32_t *pos, *ids;     /* [rows], backend memory */
  int32_t *pos_h, *ids_h; /* [rows], where they are made (the same arrays on a host backend) */
  float *logits;          /* [seqs][vocab] (backend memory; unused on a host backend) */
  /* a device's captured heads: [n_layers][seqs][n_heads * head_dim], each
   * layer's gathered from z by the rows in last_row (the embed op), and
   * reordered into pa_batch.heads' [seqs][n_layers] order in heads_h */
  float *heads, *heads_h;
  int32_t *last_row, *last_row_h; /* [seqs]: each sequence's last row (backend memory, host) */
  pa_attn_seq *aseq;      /* [seqs] */
  float *lu;              /* LoRA's low-rank activations, lu_cap floats ([rows][rank]) */
  size_t lu_cap;
} lm_scratch;

/* The model's weights as the passes use them, in the backend's memory: the
 * matrices in fp32 or in bf16 (pa_lm.bf16; then they are pa_bf16 arrays),
 * the vectors (norms, biases) in fp32. Shapes as in pa_layer_weights. */
typedef struct {
  const void *wq, *wk, *wv, *wo, *w_gate, *w_up, *w_down;
  const float *attn_norm, *ffn_norm, *bq, *bk, *bv; /* the biases NULL without qkv_bias */
} lm_layer;

typedef struct {
  const void *tok_embd, *output; /* the same pointer when tied */
  const float *out_norm;
  lm_layer *layers; /* [n_layers] */
  void *mats;       /* the backend allocations they live in; NULL when they */
  float *vecs;      /* are the loaded weights themselves (fp32 on the host) */
} lm_weights;

struct pa_lm {
  const pa_model *model;
  pa_model_config c;
  lm_weights w;      /* the weights the passes read */
  pa_weights host_w; /* the loaded weights (fp32, host memory), kept only while w points into them */
  bool bf16;         /* w's matrices are bf16 */
  const pa_backend *be;
  int max_seq;
  float *cos_tab, *sin_tab; /* [max_seq][head_dim / 2], backend memory */
  float *steer;             /* [n_layers][n_heads][head_dim], backend memory (a device backend's copy) */
  float *lora;              /* a device backend's copy of the pass's adapter, lora_cap floats */
  size_t lora_cap;
  lm_scratch s;
  /* the output matrix's rows of a restricted pass's tokens (pa_batch.logit_ids),
   * in the backend's memory and the matrices' format: [n_sel][dim] */
  void *sel;
  int32_t *sel_ids;
  int n_sel, sel_cap;
  double flops; /* floating-point operations of every pass so far (pa_lm_flops) */
};

/* Products and lookups with one of the model's matrices, in its precision. */
static inline void lm_matmul(const pa_lm *lm, int M, int N, int K, const float *x, const void *w, float beta,
                             float *y) {
  if (lm->bf16)
    lm->be->matmul_bf16(M, N, K, x, (const pa_bf16 *)w, beta, y);
  else
    lm->be->matmul(M, N, K, x, (const float *)w, beta, y);
}

static inline void lm_matmul_nn(const pa_lm *lm, int M, int N, int K, const float *x, const void *w, float beta,
                                float *y) {
  if (lm->bf16)
    lm->be->matmul_nn_bf16(M, N, K, x, (const pa_bf16 *)w, beta, y);
  else
    lm->be->matmul_nn(M, N, K, x, (const float *)w, beta, y);
}

static inline void lm_embed(const pa_lm *lm, int M, const int32_t *ids, const void *table, float *y) {
  if (lm->bf16)
    lm->be->embed_bf16(M, lm->c.dim, ids, (const pa_bf16 *)table, y);
  else
    lm->be->embed(M, lm->c.dim, ids, (const float *)table, y);
}

/* PA_OK, or PA_EIO naming what failed when one of the backend's operations
 * failed since the last check (backend.h: status): for the end of a pass. */
static inline int lm_backend_status(const pa_backend *be, const char *what) {
  if (be->status())
    return pa_error(PA_EIO, "%s on the %s backend: %s", what, be->name, be->error());
  return PA_OK;
}

/* A pass stopped on request (its poll): PA_ECANCELED, unless what it had
 * queued on a device failed, which is said rather than left for a later
 * pass to report as its own. */
static inline int lm_stopped(const pa_backend *be, const char *what) {
  const int rc = lm_backend_status(be, what);
  return rc ? rc : pa_error(PA_ECANCELED, "stopped on request");
}

/* FLOPs of a product y[M][N] (+)= x[M][K] . w: 2 M N K. */
static inline double pa_matmul_flops(int M, int N, int K) { return 2.0 * M * N * K; }

#endif
