/* bench_threads: whether a matrix product's bits depend on the thread count.
 *
 *   bench_threads
 *
 * For products of the default model's shapes (y[M][N] = x[M][K] . w[N][K]^T:
 * the attention and FFN projections and the logits, M tokens), prints how
 * many of the M x N outputs differ between 1 and 2 threads, for
 *  - openblas: a plain cblas_sgemm under OpenBLAS's own threading;
 *  - palign:   the CPU backend's matmul (kernels/cpu/cpu_ops.c), which must
 *              print 0 everywhere; the bench exits 1 otherwise. */
#include "backend.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

static size_t count_diff(const float *a, const float *b, size_t n) {
  size_t d = 0;
  for (size_t i = 0; i < n; i++)
    d += a[i] != b[i];
  return d;
}

int main(void) {
  static const int shapes[][3] = {{17, 576, 576},  {100, 576, 576},  {100, 1536, 576},
                                  {100, 576, 1536}, {512, 1536, 576}, {3, 49152, 576}};
  const pa_backend *be = pa_backend_cpu();
  int bad = 0;
  printf("%6s %6s %6s %12s %18s %18s\n", "M", "N", "K", "outputs", "openblas 1 vs 2", "palign 1 vs 2");
  for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
    const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
    const size_t n = (size_t)M * N;
    float *x = malloc((size_t)M * K * sizeof *x), *w = malloc((size_t)N * K * sizeof *w);
    float *y1 = malloc(n * sizeof *y1), *y2 = malloc(n * sizeof *y2);
    if (!x || !w || !y1 || !y2)
      return 1;
    unsigned long long r = 1;
    for (size_t i = 0; i < (size_t)M * K; i++)
      x[i] = (float)((r = r * 6364136223846793005ULL + 1442695040888963407ULL) >> 40) / (1 << 24) - 0.5f;
    for (size_t i = 0; i < (size_t)N * K; i++)
      w[i] = (float)((r = r * 6364136223846793005ULL + 1442695040888963407ULL) >> 40) / (1 << 24) - 0.5f;
    size_t d_blas, d_palign;
    openblas_set_num_threads(1);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x, K, w, K, 0.0f, y1, N);
    openblas_set_num_threads(2);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, x, K, w, K, 0.0f, y2, N);
    d_blas = count_diff(y1, y2, n);
    pa_backend_set_threads(1); /* OpenBLAS single-threaded again, palign's threads */
    be->matmul(M, N, K, x, w, 0.0f, y1);
    pa_backend_set_threads(2);
    be->matmul(M, N, K, x, w, 0.0f, y2);
    d_palign = count_diff(y1, y2, n);
    bad |= d_palign != 0;
    printf("%6d %6d %6d %12zu %10zu (%4.1f%%) %10zu (%4.1f%%)\n", M, N, K, n, d_blas, 100.0 * d_blas / n, d_palign,
           100.0 * d_palign / n);
    free(x), free(w), free(y1), free(y2);
  }
  return bad;
}
