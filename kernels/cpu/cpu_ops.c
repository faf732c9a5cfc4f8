/* The CPU backend: OpenBLAS for every matrix product (attention included),
 * OpenMP across rows for the rest. This is the reference implementation.
 *
 * Results do not depend on the number of threads. OpenBLAS's own threading
 * splits a product by the thread count, and its edge kernels sum in another
 * order than its main one (1 against 2 threads: up to 58% of the elements of
 * a product differ in the last bits). So OpenBLAS runs single-threaded and
 * palign splits the work itself into pieces whose shape does not depend on
 * the thread count: products into blocks of MATMUL_ROWS x MATMUL_BLOCK outputs,
 * attention into (sequence, kv head, ATTN_ROWS query rows) pieces; which
 * thread computes a piece cannot change its value. */
#include "backend.h"
#include "cpu_internal.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static int n_threads = 0; /* 0 until set: all cores */

void pa_backend_set_threads(int n) {
  if (n <= 0)
    n = omp_get_num_procs();
  n_threads = n;
  omp_set_num_threads(n);
  openblas_set_num_threads(1); /* the threads are palign's (above) */
}

int pa_backend_threads(void) { return n_threads > 0 ? n_threads : omp_get_num_procs(); }

static void cpu_matmul(int M, int N, int K, const float *x, const float *w, float beta, float *y) {
  const int col_blocks = (N + MATMUL_BLOCK - 1) / MATMUL_BLOCK, row_blocks = (M + MATMUL_ROWS - 1) / MATMUL_ROWS;
  const int blocks = col_blocks * row_blocks;
#pragma omp parallel for schedule(dynamic) num_threads(pa_backend_threads()) if (blocks > 1)
  for (int b = 0; b < blocks; b++) {
    const int m0 = b / col_blocks * MATMUL_ROWS, n0 = b % col_blocks * MATMUL_BLOCK;
    const int m = M - m0 < MATMUL_ROWS ? M - m0 : MATMUL_ROWS, n = N - n0 < MATMUL_BLOCK ? N - n0 : MATMUL_BLOCK;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, K, 1.0f, x + (size_t)m0 * K, K, w + (size_t)n0 * K, K,
                beta, y + (size_t)m0 * N + n0, N);
  }
}

static void cpu_rmsnorm(int M, int D, const float *x, const float *w, float eps, float *y) {
#pragma omp parallel for schedule(static) if (M > 1)
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * D;
    float *ym = y + (size_t)m * D;
    double ss = 0;
    for (int i = 0; i < D; i++)
      ss += (double)xm[i] * xm[i];
    const float r = 1.0f / sqrtf((float)(ss / D) + eps);
    for (int i = 0; i < D; i++)
      ym[i] = w[i] * (xm[i] * r);
  }
}

static void cpu_rope(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab,
                     float *x) {
  const int half = hd / 2;
#pragma omp parallel for schedule(static) if (M > 1)
  for (int m = 0; m < M; m++) {
    const float *c = cos_tab + (size_t)pos[m] * half, *s = sin_tab + (size_t)pos[m] * half;
    for (int h = 0; h < n_heads; h++) {
      float *v = x + ((size_t)m * n_heads + h) * hd;
      for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

static void cpu_swiglu(int M, int F, float *gate, const float *up) {
  const size_t n = (size_t)M * F;
#pragma omp parallel for schedule(static) if (n > 4096)
  for (size_t i = 0; i < n; i++) {
    const float g = gate[i];
    gate[i] = g / (1.0f + exp_approx(-g)) * up[i];
  }
}

static void cpu_embed(int M, int D, const int32_t *ids, const float *table, float *y) {
  for (int m = 0; m < M; m++)
    memcpy(y + (size_t)m * D, table + (size_t)ids[m] * D, (size_t)D * sizeof(float));
}

static void cpu_add(int M, int N, const float *x, float *y) {
  const size_t n = (size_t)M * N;
#pragma omp parallel for schedule(static) if (n > 4096)
  for (size_t i = 0; i < n; i++)
    y[i] += x[i];
}

static void cpu_add_bias(int M, int N, const float *b, float *y) {
#pragma omp parallel for schedule(static) if ((size_t)M * N > 4096)
  for (int m = 0; m < M; m++) {
    float *ym = y + (size_t)m * N;
    for (int n = 0; n < N; n++)
      ym[n] += b[n];
  }
}

/* Query rows [r0, r1) of one (sequence, key/value head) pair, where row
 * r = j * g + i is head i of the g query heads sharing that kv head at the
 * sequence's new token j; as matrix products:
 *   S = Q . [K_prefix; K_own]^T,  softmax per row (causal),  Z = S . [V_prefix; V_own]. */
static void attend_rows(const pa_attn_args *a, const pa_attn_seq *s, int kh, int r0, int r1, float *scratch) {
  const int hd = a->head_dim, g = a->n_heads / a->n_kv_heads, H = a->n_heads;
  const int R = r1 - r0, P = a->prefix_len, m = s->past + s->n, L = P + m;
  const float scale = 1.0f / sqrtf((float)hd);
  float *Q = scratch, *S = Q + (size_t)R * hd, *Z = S + (size_t)R * L;
  for (int r = r0; r < r1; r++)
    memcpy(Q + (size_t)(r - r0) * hd, a->q + ((size_t)(s->row0 + r / g) * H + (size_t)kh * g + r % g) * hd,
           (size_t)hd * sizeof(float));
  const float *ko = s->k_own + (size_t)kh * s->stride * hd, *vo = s->v_own + (size_t)kh * s->stride * hd;
  if (P > 0) {
    const float *kp = a->k_prefix + (size_t)kh * a->prefix_stride * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, P, hd, scale, Q, hd, kp, hd, 0.0f, S, L);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, m, hd, scale, Q, hd, ko, hd, 0.0f, S + P, L);
  for (int r = r0; r < r1; r++)
    pa_cpu_softmax(S + (size_t)(r - r0) * L, P + s->past + r / g + 1, L);
  if (P > 0) {
    const float *vp = a->v_prefix + (size_t)kh * a->prefix_stride * hd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, hd, P, 1.0f, S, L, vp, hd, 0.0f, Z, hd);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, hd, m, 1.0f, S + P, L, vo, hd, P > 0 ? 1.0f : 0.0f, Z, hd);
  for (int r = r0; r < r1; r++)
    memcpy(a->z + ((size_t)(s->row0 + r / g) * H + (size_t)kh * g + r % g) * hd, Z + (size_t)(r - r0) * hd,
           (size_t)hd * sizeof(float));
}

/* Query rows of sequence s per kv head, and the pieces they make. */
static int seq_rows(const pa_attn_args *a, const pa_attn_seq *s) { return s->n * (a->n_heads / a->n_kv_heads); }
static int seq_pieces(const pa_attn_args *a, const pa_attn_seq *s) {
  return a->n_kv_heads * ((seq_rows(a, s) + ATTN_ROWS - 1) / ATTN_ROWS);
}

static size_t max_piece_scratch(const pa_attn_args *a) {
  size_t mx = 0;
  for (int i = 0; i < a->n_seqs; i++) {
    const pa_attn_seq *s = &a->seqs[i];
    const size_t R = (size_t)(seq_rows(a, s) < ATTN_ROWS ? seq_rows(a, s) : ATTN_ROWS);
    const size_t need = R * (2 * (size_t)a->head_dim + (size_t)a->prefix_len + s->past + s->n);
    mx = need > mx ? need : mx;
  }
  return mx;
}

static size_t cpu_attention_scratch(const pa_attn_args *a) {
  return max_piece_scratch(a) * (size_t)pa_backend_threads();
}

/* The new tokens' keys and values into their sequences' caches. */
static void store_new(const pa_attn_args *a) {
  const int KV = a->n_kv_heads, hd = a->head_dim;
  for (int i = 0; i < a->n_seqs; i++) {
    const pa_attn_seq *s = &a->seqs[i];
    for (int h = 0; h < KV; h++)
      for (int j = 0; j < s->n; j++) {
        const size_t dst = ((size_t)h * s->stride + s->past + j) * hd, src = ((size_t)(s->row0 + j) * KV + h) * hd;
        memcpy(s->k_own + dst, a->k_new + src, (size_t)hd * sizeof(float));
        memcpy(s->v_own + dst, a->v_new + src, (size_t)hd * sizeof(float));
      }
  }
}

static void cpu_attention(const pa_attn_args *a, float *scratch) {
  if (a->k_new)
    store_new(a);
  int pieces = 0;
  for (int i = 0; i < a->n_seqs; i++)
    pieces += seq_pieces(a, &a->seqs[i]);
  const size_t per_thread = max_piece_scratch(a);
#pragma omp parallel num_threads(pa_backend_threads()) if (pieces > 1) /* the scratch holds that many */
  {
    float *mine = scratch + per_thread * (size_t)omp_get_thread_num();
    int seq = 0, first = 0; /* this thread's walk: the pieces before sequence seq */
#pragma omp for schedule(dynamic)
    for (int p = 0; p < pieces; p++) {
      if (p < first) /* OpenMP 5's dynamic schedule need not hand a thread its pieces in order (libomp does not) */
        seq = 0, first = 0;
      while (p >= first + seq_pieces(a, &a->seqs[seq]))
        first += seq_pieces(a, &a->seqs[seq++]);
      const pa_attn_seq *s = &a->seqs[seq];
      const int per_head = (seq_rows(a, s) + ATTN_ROWS - 1) / ATTN_ROWS, k = p - first;
      const int r0 = (k % per_head) * ATTN_ROWS, r1 = r0 + ATTN_ROWS < seq_rows(a, s) ? r0 + ATTN_ROWS : seq_rows(a, s);
      attend_rows(a, s, k / per_head, r0, r1, mine);
    }
  }
}

static void *cpu_alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }
static void cpu_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }
static void cpu_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height) {
  for (size_t r = 0; r < height; r++)
    memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
}

static void cpu_zero(void *dst, size_t bytes) { memset(dst, 0, bytes); }

static const char *cpu_error(void) { return ""; } /* its operations cannot fail */
static int cpu_status(void) { return 0; }

static const pa_backend cpu_backend = {
    .name = "cpu",
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .embed = cpu_embed,
    .add = cpu_add,
    .add_bias = cpu_add_bias,
    .attention_scratch = cpu_attention_scratch,
    .attention = cpu_attention,
    .scale = pa_cpu_scale,
    .matmul_nn = pa_cpu_matmul_nn,
    .matmul_tn_acc = pa_cpu_matmul_tn_acc,
    .rmsnorm_backward = pa_cpu_rmsnorm_backward,
    .rope_backward = pa_cpu_rope_backward,
    .swiglu_backward = pa_cpu_swiglu_backward,
    .attention_train_scratch = pa_cpu_attention_train_scratch,
    .attention_train = pa_cpu_attention_train,
    .attention_backward = pa_cpu_attention_backward,
    .adamw = pa_cpu_adamw,
    .matmul_bf16 = pa_cpu_matmul_bf16,
    .matmul_nn_bf16 = pa_cpu_matmul_nn_bf16,
    .embed_bf16 = pa_cpu_embed_bf16,
    .alloc = cpu_alloc,
    .release = free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy2d = cpu_copy2d,
    .zero = cpu_zero,
    .host_memory = 1,
    .error = cpu_error,
    .status = cpu_status,
};

const pa_backend *pa_backend_cpu(void) {
  if (!n_threads) /* OpenBLAS single-threaded from the first use on */
    pa_backend_set_threads(0);
  return &cpu_backend;
}
