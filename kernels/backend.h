/* backend.h: the operation set of the transformer, behind one interface.
 *
 * Every backend (cpu/ now: C with OpenBLAS and OpenMP; cuda/ later) provides
 * the same operations on fp32 tensors in its own memory. Shapes are in the
 * comments as [rows][cols], row-major; weights are [out][in] (PyTorch's
 * orientation). The CPU backend is the reference every other one is tested
 * against.
 *
 * Thread safety: the operations keep no state; calls may come from one
 * thread at a time per output buffer. Threading inside an operation is the
 * backend's business (pa_backend_set_threads).
 */
#ifndef PALIGN_BACKEND_H
#define PALIGN_BACKEND_H

#include <stddef.h>
#include <stdint.h>

/* One sequence's part of an attention call. The sequence's rows are
 * q[row0 .. row0+n) (its new tokens), and it attends causally to
 *   - the shared prefix's keys (all of them), then
 *   - its own cached keys k_own[0 .. past + j] for new token j,
 * where the caller has already written the new tokens' keys and values at
 * k_own[past ..) and v_own[past ..). */
typedef struct {
  int row0;           /* first row of q and z */
  int n;              /* new tokens */
  int past;           /* own keys cached before this call */
  const float *k_own; /* [n_kv_heads][stride][head_dim] */
  const float *v_own;
  int stride;         /* positions per kv head in k_own/v_own (the cache capacity) */
} pa_attn_seq;

typedef struct {
  int n_heads, n_kv_heads, head_dim;
  const float *q;       /* [rows][n_heads * head_dim], RoPE applied */
  float *z;             /* [rows][n_heads * head_dim]: per-head outputs, before W_o */
  const float *k_prefix; /* [n_kv_heads][prefix_stride][head_dim], or NULL */
  const float *v_prefix;
  int prefix_len;       /* keys every sequence sees first (0 if none) */
  int prefix_stride;
  const pa_attn_seq *seqs;
  int n_seqs;
} pa_attn_args;

typedef struct pa_backend {
  const char *name;
  /* y[M][N] = beta * y + x[M][K] . w[N][K]^T */
  void (*matmul)(int M, int N, int K, const float *x, const float *w, float beta, float *y);
  /* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, for M rows of D */
  void (*rmsnorm)(int M, int D, const float *x, const float *w, float eps, float *y);
  /* Rotate-half RoPE in place on M rows of n_heads heads: pair (i, i + hd/2)
   * of row m is rotated by the angle whose cos/sin are cos_tab[pos[m]][i]. */
  void (*rope)(int M, int n_heads, int head_dim, const int32_t *pos, const float *cos_tab, const float *sin_tab,
               float *x);
  /* gate[M][F] = silu(gate) * up */
  void (*swiglu)(int M, int F, float *gate, const float *up);
  /* y[m] = table[ids[m]] (rows of D) */
  void (*embed)(int M, int D, const int32_t *ids, const float *table, float *y);
  /* y[M][N] += x[M][N] (residual) */
  void (*add)(int M, int N, const float *x, float *y);
  /* y[m][n] += b[n] for M rows of N (a projection's bias) */
  void (*add_bias)(int M, int N, const float *b, float *y);
  /* Grouped-query causal softmax attention with scale 1/sqrt(head_dim).
   * scratch holds attention_scratch(a) floats (the caller owns it, so the
   * operation cannot fail). */
  size_t (*attention_scratch)(const pa_attn_args *a);
  void (*attention)(const pa_attn_args *a, float *scratch);
} pa_backend;

const pa_backend *pa_backend_cpu(void);

/* Threads the CPU backend uses (OpenBLAS and OpenMP); 0 = all cores. */
void pa_backend_set_threads(int n);
int pa_backend_threads(void);

#endif
