// cuda_matmul.cu: the products, by cuBLAS: fp32 operands in pedantic math
// (no TF32), the CPU reference's precision; bf16 weights on the tensor
// cores with fp32 accumulation, x rounded to bf16 by a kernel first.
#include "cuda_internal.cuh"

namespace palign_cuda {
namespace {

__global__ void k_to_bf16(size_t n, const float *x, __nv_bfloat16 *y) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    y[i] = __float2bfloat16_rn(x[i]);
}

// The least bytes of y[M][N] = beta y + x[M][K] . w (w N x K or K x N) for
// the profile: x and w read once (elem bytes an element: 4, or 2 for bf16
// and x as rounded), y written, and read too where beta adds it.
double product_bytes(int M, int N, int K, double elem, float beta) {
  return elem * ((double)M * K + (double)N * K) + 4.0 * M * N * (beta != 0.0f ? 2 : 1);
}

// x rounded to bf16, the other operand of a bf16 product, in a buffer kept
// between calls (grown when a larger one comes). NULL on error.
kept_buffer xb16;

const __nv_bfloat16 *to_bf16(size_t n, const float *x, const char *what) {
  if (!reserve(xb16, n * sizeof(__nv_bfloat16), what))
    return nullptr;
  __nv_bfloat16 *y = (__nv_bfloat16 *)xb16.p;
  const timed t("bf16 rounding of x (products)", 0.0, 6.0 * n);
  PA_LAUNCH(k_to_bf16, blocks(n), kBlock, 0)(n, x, y);
  launched(what);
  return y;
}

// y[M][N] = beta y + bf16(x) . w with w [N][K] used transposed (nn false)
// or [K][N] as it is: column-major, y^T = w^T(as stored) . x^T.
void matmul_bf16(bool nn, int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y,
                 const char *what) {
  if (M <= 0 || N <= 0)
    return;
  const __nv_bfloat16 *xb = to_bf16((size_t)M * K, x, what);
  if (!xb)
    return;
  const float one = 1.0f;
  const timed t(prof_name("%s bf16 %dx%d", nn ? "matmul_nn" : "matmul", N, K), 2.0 * M * N * K,
                product_bytes(M, N, K, 2, beta));
  check_blas(cublasGemmEx(blas16, nn ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, CUDA_R_16BF,
                          nn ? N : K, xb, CUDA_R_16BF, K, &beta, y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT),
             what);
}

} // namespace

void cu_matmul(int M, int N, int K, const float *x, const float *w, float beta, float *y) {
  // row-major y[M][N] = x . w^T is column-major y^T = w^T(as stored) . x
  const float one = 1.0f;
  const timed t(prof_name("matmul fp32 %dx%d", N, K), 2.0 * M * N * K, product_bytes(M, N, K, 4, beta));
  check_blas(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, K, x, K, &beta, y, N), "matmul");
}

void cu_matmul_nn(int M, int N, int K, const float *x, const float *w, float beta, float *y) {
  const float one = 1.0f;
  const timed t(prof_name("matmul_nn fp32 %dx%d", N, K), 2.0 * M * N * K, product_bytes(M, N, K, 4, beta));
  check_blas(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, w, N, x, K, &beta, y, N), "matmul_nn");
}

void cu_matmul_tn_acc(int M, int N, int K, const float *a, const float *b, float *g) {
  // g[N][K] += a[M][N]^T . b[M][K]: column-major g^T (K x N) += b^T (K x M) . a (M x N)
  const float one = 1.0f;
  const timed t(prof_name("matmul_tn_acc fp32 %dx%d", N, K), 2.0 * M * N * K,
                4.0 * ((double)M * N + (double)M * K) + 8.0 * N * K);
  check_blas(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, &one, b, K, a, N, &one, g, K), "matmul_tn_acc");
}

void cu_matmul_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  matmul_bf16(false, M, N, K, x, w, beta, y, "matmul_bf16");
}

void cu_matmul_nn_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  matmul_bf16(true, M, N, K, x, w, beta, y, "matmul_nn_bf16");
}

} // namespace palign_cuda
