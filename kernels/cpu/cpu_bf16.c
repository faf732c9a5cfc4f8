/* The CPU backend's products and lookups with bf16 weights (backend.h).
 *
 * Each output block is the one cpu_matmul computes (MATMUL_ROWS x
 * MATMUL_BLOCK, the whole reduction in one single-threaded SGEMM), taken
 * from operands made exact in fp32 first: the block's rows of x rounded to
 * bf16 and its part of w widened, in two buffers of the thread's. A
 * product of two bf16 values is exact in fp32, so this is the GPU's
 * arithmetic (a bf16 GEMM accumulating in fp32) up to the order of the sums,
 * and the result does not depend on the number of threads. A thread that
 * cannot get its buffers computes its blocks by pa_cpu_matmul_bf16_direct
 * (the same products, summed in order: slower, and not bit for bit sgemm's
 * sums), so the operations cannot fail; only then may a result's last bits
 * depend on the memory the machine had. */
#include "backend.h"
#include "cpu_internal.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static void round_rows(int m, int K, const float *x, float *out) {
  const size_t n = (size_t)m * K;
  for (size_t i = 0; i < n; i++)
    out[i] = pa_bf16_to_f32(pa_bf16_from_f32(x[i]));
}

/* rows [n0, n0 + n) of w[N][K] (transposed use), or its columns [n0, n0 + n)
 * of w[K][N], widened into out (n x K, or K x n, row-major) */
static void widen_block(bool nn, int N, int K, const pa_bf16 *w, int n0, int n, float *out) {
  if (!nn) {
    const pa_bf16 *src = w + (size_t)n0 * K;
    for (size_t i = 0; i < (size_t)n * K; i++)
      out[i] = pa_bf16_to_f32(src[i]);
    return;
  }
  for (int k = 0; k < K; k++)
    for (int j = 0; j < n; j++)
      out[(size_t)k * n + j] = pa_bf16_to_f32(w[(size_t)k * N + n0 + j]);
}

void pa_cpu_matmul_bf16_direct(bool nn, int M, int N, int K, const float *x, int ldx, const pa_bf16 *w, int ldw,
                               float beta, float *y, int ldy) {
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      float acc = 0;
      for (int k = 0; k < K; k++) {
        const pa_bf16 wk = nn ? w[(size_t)k * ldw + n] : w[(size_t)n * ldw + k];
        acc += pa_bf16_to_f32(pa_bf16_from_f32(x[(size_t)m * ldx + k])) * pa_bf16_to_f32(wk);
      }
      float *out = y + (size_t)m * ldy + n;
      *out = beta == 0.0f ? acc : beta * *out + acc; /* y is not read when beta is 0, as in SGEMM */
    }
}

static void matmul_bf16(bool nn, int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  if (M <= 0 || N <= 0)
    return;
  const int col_blocks = (N + MATMUL_BLOCK - 1) / MATMUL_BLOCK, row_blocks = (M + MATMUL_ROWS - 1) / MATMUL_ROWS;
  const int blocks = col_blocks * row_blocks;
  const size_t x_floats = (size_t)(M < MATMUL_ROWS ? M : MATMUL_ROWS) * K;
  const size_t w_floats = (size_t)(N < MATMUL_BLOCK ? N : MATMUL_BLOCK) * K;
#pragma omp parallel num_threads(pa_backend_threads()) if (blocks > 1)
  {
    float *xr = malloc((x_floats ? x_floats : 1) * sizeof(float));
    float *wf = malloc((w_floats ? w_floats : 1) * sizeof(float));
    int x_have = -1, w_have = -1; /* the blocks the buffers hold (blocks come row by row) */
#pragma omp for schedule(dynamic)
    for (int b = 0; b < blocks; b++) {
      const int m0 = b / col_blocks * MATMUL_ROWS, n0 = b % col_blocks * MATMUL_BLOCK;
      const int m = M - m0 < MATMUL_ROWS ? M - m0 : MATMUL_ROWS, n = N - n0 < MATMUL_BLOCK ? N - n0 : MATMUL_BLOCK;
      float *yb = y + (size_t)m0 * N + n0;
      if (!xr || !wf) {
        pa_cpu_matmul_bf16_direct(nn, m, n, K, x + (size_t)m0 * K, K, nn ? w + n0 : w + (size_t)n0 * K, nn ? N : K,
                                  beta, yb, N);
        continue;
      }
      if (x_have != m0)
        round_rows(m, K, x + (size_t)m0 * K, xr), x_have = m0;
      if (w_have != n0)
        widen_block(nn, N, K, w, n0, n, wf), w_have = n0;
      if (nn)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, K, 1.0f, xr, K, wf, n, beta, yb, N);
      else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, K, 1.0f, xr, K, wf, K, beta, yb, N);
    }
    free(xr);
    free(wf);
  }
}

void pa_cpu_matmul_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  matmul_bf16(false, M, N, K, x, w, beta, y);
}

void pa_cpu_matmul_nn_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  matmul_bf16(true, M, N, K, x, w, beta, y);
}

void pa_cpu_embed_bf16(int M, int D, const int32_t *ids, const pa_bf16 *table, float *y) {
  for (int m = 0; m < M; m++) {
    const pa_bf16 *row = table + (size_t)ids[m] * D;
    float *out = y + (size_t)m * D;
    for (int i = 0; i < D; i++)
      out[i] = pa_bf16_to_f32(row[i]);
  }
}
