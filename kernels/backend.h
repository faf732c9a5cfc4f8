/* backend.h: the operation set of the transformer, behind one interface.
 *
 * Every backend (cpu/: C with OpenBLAS and OpenMP, the reference; cuda/:
 * cuBLAS and kernels, cuda_backend.h) provides the same operations on fp32
 * tensors (and bf16 weights, below) in its own memory (alloc, upload, download, release): the forward pass's,
 * and the backward passes training a low-rank adapter needs (runtime/train.h). Shapes are in the
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
 * the new tokens' keys and values being at k_own[past ..) and v_own[past ..):
 * written there by the call (pa_attn_args.k_new) or before it. */
typedef struct {
  int row0;     /* first row of q and z */
  int n;        /* new tokens */
  int past;     /* own keys cached before this call */
  float *k_own; /* [n_kv_heads][stride][head_dim] */
  float *v_own;
  int stride; /* positions per kv head in k_own/v_own (the cache capacity) */
} pa_attn_seq;

typedef struct {
  int n_heads, n_kv_heads, head_dim;
  const float *q;        /* [rows][n_heads * head_dim], RoPE applied */
  float *z;              /* [rows][n_heads * head_dim]: per-head outputs, before W_o */
  const float *k_prefix; /* [n_kv_heads][prefix_stride][head_dim], or NULL */
  const float *v_prefix;
  int prefix_len; /* keys every sequence sees first (0 if none) */
  int prefix_stride;
  const pa_attn_seq *seqs;
  int n_seqs;
  /* [rows][n_kv_heads * head_dim]: the new tokens' keys and values (RoPE
   * applied), row for row with q, which the call first writes into each
   * sequence's k_own and v_own at [past ..) (one pass over them all, where
   * a copy per sequence and head would cost a device a call each); NULL
   * when the caller has written them. */
  const float *k_new, *v_new;
} pa_attn_args;

/* Attention over a training batch, whose rows are a shared prefix and then
 * sequences, all in one set of activations (row-major [rows][heads * hd]):
 * rows [0, prefix_len) are the prefix, attending causally among themselves;
 * sequence i is rows [seq_row0[i], seq_row0[i] + seq_len[i]), laid after the
 * prefix and each other (sequence 0 from row prefix_len, each next where the
 * one before ends: the CUDA backend refuses another layout), and attends to
 * every prefix row and then causally to its own. So one forward and one
 * backward call cover the prefix, which is computed once for the batch, and
 * every sequence. */
typedef struct {
  int n_heads, n_kv_heads, head_dim;
  int prefix_len; /* 0 for none */
  int n_seqs;
  const int *seq_row0; /* [n_seqs] */
  const int *seq_len;  /* [n_seqs], each >= 1 */
  const float *q;      /* [rows][n_heads * head_dim], RoPE applied */
  const float *k, *v;  /* [rows][n_kv_heads * head_dim] */
  float *z;            /* [rows][n_heads * head_dim]: per-head outputs, before W_o */
  float *lse;          /* [rows][n_heads]: each softmax's log-sum-exp of the scaled scores (for backward) */
} pa_attn_train_args;

/* bf16 (bfloat16): the upper 16 bits of an IEEE fp32 value, 8 bits of
 * precision. The large weight matrices may be held so (pa_lm_opts.weights:
 * half the memory, and the GPU's tensor-core rate). A product with bf16
 * weights rounds the other operand to bf16 as well (to nearest, ties to
 * even: what __float2bfloat16_rn does on the GPU) and accumulates in fp32;
 * the product of two bf16 values is exact in fp32, so two backends differ
 * only in the order of the sums, as for fp32 products. */
typedef uint16_t pa_bf16;

static inline pa_bf16 pa_bf16_from_f32(float f) {
  union {
    float f;
    uint32_t u;
  } v = {.f = f};
  if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) /* NaN stays NaN (quiet), whatever its payload */
    return (pa_bf16)((v.u >> 16) | 0x40u);
  return (pa_bf16)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float pa_bf16_to_f32(pa_bf16 b) {
  union {
    uint32_t u;
    float f;
  } v = {.u = (uint32_t)b << 16};
  return v.f;
}

/* One AdamW step's constants (PyTorch's AdamW, decoupled weight decay; the
 * trainer makes them from its options and the step t = 1, 2, ...):
 *   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g g,
 *   w = w decay - lr (m / c1) / (sqrt(v / c2) + eps),
 * with the bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t and
 * decay = 1 - lr weight_decay. */
typedef struct {
  double beta1, beta2, c1, c2, lr, decay, eps;
} pa_adamw_step;

/* A group of processes whose devices exchange data directly (NCCL on the
 * GPU): made by pa_backend.group_join, with an id one member made and the
 * others received (over MPI). */
typedef struct pa_group pa_group;

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
  /* x[n] *= a */
  void (*scale)(size_t n, float a, float *x);

  /* ---- training (backward passes; weights are frozen, so only the
   * gradients of activations and of low-rank adapters are needed) ---- */
  /* y[M][N] = beta * y + x[M][K] . w[K][N] (w untransposed: dx = dy . W) */
  void (*matmul_nn)(int M, int N, int K, const float *x, const float *w, float beta, float *y);
  /* g[N][K] += a[M][N]^T . b[M][K] (a weight's gradient: dW += dy^T . x) */
  void (*matmul_tn_acc)(int M, int N, int K, const float *a, const float *b, float *g);
  /* dx[m] += the gradient of rmsnorm (as above, weight w fixed) at x for dy */
  void (*rmsnorm_backward)(int M, int D, const float *x, const float *w, float eps, const float *dy, float *dx);
  /* RoPE's transpose in place (the rotation by minus the angle): the gradient
   * of rope's input from that of its output */
  void (*rope_backward)(int M, int n_heads, int head_dim, const int32_t *pos, const float *cos_tab,
                        const float *sin_tab, float *dx);
  /* from swiglu's inputs gate, up [M][F] and the gradient dh of its output:
   * dgate = dh * up * silu'(gate), dup = dh * silu(gate) */
  void (*swiglu_backward)(int M, int F, const float *gate, const float *up, const float *dh, float *dgate, float *dup);
  /* pa_attn_train_args' attention, forward (z and lse) and backward (dq, dk,
   * dv written whole from dz), each with scratch of the size given. */
  size_t (*attention_train_scratch)(const pa_attn_train_args *a);
  void (*attention_train)(const pa_attn_train_args *a, float *scratch);
  void (*attention_backward)(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv,
                             float *scratch);
  /* pa_adamw_step's step on n parameters w, from their gradient g, with
   * their moments m and v (updated), all fp32: each element's arithmetic in
   * double, every operation rounded as written (no fused multiply-add), so
   * that every backend gives the CPU's bits */
  void (*adamw)(size_t n, const pa_adamw_step *s, float *w, const float *g, float *m, float *v);

  /* ---- bf16 weights (see pa_bf16): as matmul, matmul_nn and embed, with
   * the weight operand in bf16 and x rounded to bf16 ---- */
  /* y[M][N] = beta * y + bf16(x)[M][K] . w[N][K]^T */
  void (*matmul_bf16)(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y);
  /* y[M][N] = beta * y + bf16(x)[M][K] . w[K][N] */
  void (*matmul_nn_bf16)(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y);
  /* y[m] = table[ids[m]] widened to fp32 (rows of D) */
  void (*embed_bf16)(int M, int D, const int32_t *ids, const pa_bf16 *table, float *y);

  /* ---- memory: the tensors every operation takes live here ---- */
  void *(*alloc)(size_t bytes); /* NULL when out of memory; a device's error() then says why */
  void (*release)(void *p);     /* accepts NULL */
  /* host to backend memory and back; both return once the copy is done
   * (download after every operation queued before it) */
  void (*upload)(void *dst, const void *src_host, size_t bytes);
  void (*download)(void *dst_host, const void *src, size_t bytes);
  /* height rows of width bytes from src (rows spitch bytes apart) to dst
   * (dpitch apart), both in backend memory */
  void (*copy2d)(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height);
  /* bytes of backend memory at dst set to zero (a device's without a copy from the host) */
  void (*zero)(void *dst, size_t bytes);
  /* true when backend memory is host memory (then the tensors of the
   * model and the caller's buffers are used as they are) */
  int host_memory;

  /* ---- collectives between processes' devices; NULL where the backend
   * has none (the CPU's: MPI moves host memory). Each returns 0, or -1 with
   * the reason in error(). ---- */
  size_t group_id_bytes;     /* the size of a group's id */
  int (*group_id)(void *id); /* a new id (one member makes it, the others receive it) */
  /* joins the group of n members as member `rank` (collective: every member calls it with the same id) */
  int (*group_join)(const void *id, int n, int rank, pa_group **out);
  /* every member's count floats of send, in member order, into recv (n * count floats); backend memory */
  int (*group_allgather)(pa_group *g, const float *send, size_t count, float *recv);
  void (*group_leave)(pa_group *g); /* accepts NULL */
  /* the last error of this backend's, as text ("" if none) */
  const char *(*error)(void);
  /* 0 when every operation since the last call succeeded, else -1 with the
   * first failure's reason in error(); waits for the operations queued, and
   * forgets the failure. The operations return nothing, but a device's can
   * fail (a kernel that cannot start, an illegal address, a copy's error),
   * and then the results are garbage: the forward pass and the trainer ask
   * here at the end of each pass and fail it (PA_EIO). */
  int (*status)(void);
} pa_backend;

const pa_backend *pa_backend_cpu(void);

/* The backend `name` names: "cpu"; "cuda" (device `device` modulo the
 * devices visible; NULL and a message in err when there is none or palign
 * was built without it); "auto" (cuda where it can, else cpu; NULL and a
 * message when a GPU's driver is there but cannot serve). */
const pa_backend *pa_backend_named(const char *name, int device, char *err, size_t n);

/* The devices visible to backend be's kind (the GPUs for cuda, after
 * CUDA_VISIBLE_DEVICES); 0 for the CPU. */
int pa_backend_devices(const pa_backend *be);

/* Threads the CPU backend uses (OpenBLAS and OpenMP); 0 = all cores. */
void pa_backend_set_threads(int n);
int pa_backend_threads(void);

#endif
