/* lm_internal.h: pa_lm and pa_kv as forward.c lays them out, for the other
 * parts of the runtime that run the same model over the same backend (the
 * trainer, train.c). Not an interface: nothing outside runtime/ includes it. */
#ifndef PALIGN_LM_INTERNAL_H
#define PALIGN_LM_INTERNAL_H

#include "backend.h"
#include "forward.h"
#include "model.h"

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
  pa_attn_seq *aseq;  /* [seqs] */
  float *lu;          /* LoRA's low-rank activations, lu_cap floats ([rows][rank]) */
  size_t lu_cap;
} lm_scratch;

struct pa_lm {
  const pa_model *model;
  pa_model_config c;
  pa_weights w; /* the weights in the backend's memory (on a host backend, the loaded ones) */
  pa_weights host_w; /* the loaded weights, in host memory */
  const pa_backend *be;
  int max_seq;
  float *cos_tab, *sin_tab; /* [max_seq][head_dim / 2], backend memory */
  float *steer;             /* [n_layers][n_heads][head_dim], backend memory (a device backend's copy) */
  float *lora;              /* a device backend's copy of the pass's adapter, lora_cap floats */
  size_t lora_cap;
  lm_scratch s;
  double flops; /* floating-point operations of every pass so far (pa_lm_flops) */
};

/* FLOPs of a product y[M][N] (+)= x[M][K] . w: 2 M N K. */
static inline double pa_matmul_flops(int M, int N, int K) { return 2.0 * M * N * K; }

#endif
