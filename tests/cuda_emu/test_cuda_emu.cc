// test_cuda_emu.cc: the CUDA emulation itself (cuda_emu.h). The gpu tests
// trust it to run the backend's kernels as a GPU would and to fail where a
// GPU would; here each of its promises is checked on kernels written to
// keep or to break it:
//  - threads and blocks get the indices of their grid, in 1, 2 and 3 dimensions;
//  - a barrier orders the writes before it for every thread after it, and a
//    read of another thread's write without one gives a wrong answer (the
//    shuffled order), so a missing barrier cannot pass by luck;
//  - a __syncthreads() that not every thread reaches fails the launch, and the
//    fault stays until the device is reset;
//  - a host pointer given to a kernel, a copy in the wrong direction or past
//    an allocation, a block of 1,025 threads, and dynamic shared memory over
//    what the kernel was allowed are refused;
//  - device and dynamic shared memory start as NaN;
//  - cuBLAS's products, all four transpose combinations, with leading
//    dimensions larger than the rows and beta 0 over NaN, fp32 and bf16,
//    against a plain loop over the column-major definition, in double;
//    a leading dimension under the stored rows, and an operand reaching past
//    its allocation, are refused.
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include <cmocka.h>
}

#include "cuda_emu.h"
#include "rng.h"

namespace {

cudaStream_t stream; // the launches' (PA_LAUNCH names it)

int reset(void **) {
  cudaDeviceReset();
  return cudaStreamCreate(&stream) == cudaSuccess ? 0 : -1;
}

template <class T> T *device(size_t n) {
  T *p = nullptr;
  assert_int_equal(cudaMalloc(&p, n * sizeof(T)), cudaSuccess);
  return p;
}

// ---- kernels -------------------------------------------------------------------------

__global__ void k_indices(unsigned *out) {
  const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  unsigned *o = out + ((size_t)block * blockDim.x * blockDim.y * blockDim.z + thread) * 6;
  o[0] = blockIdx.x, o[1] = blockIdx.y, o[2] = blockIdx.z;
  o[3] = threadIdx.x, o[4] = threadIdx.y, o[5] = threadIdx.z;
}

// out[t] = the value thread t + 1 wrote (salt + 3 (t + 1)), with or without a
// barrier between.
__global__ void k_neighbour(bool barrier, int salt, int *out) {
  __shared__ int sh[256];
  const unsigned t = threadIdx.x;
  sh[t] = salt + (int)t * 3;
  if (barrier)
    __syncthreads();
  out[t] = sh[(t + 1) % blockDim.x];
  if (!barrier) // every thread meets the same number of barriers
    __syncthreads();
}

__global__ void k_divergent(int *out) {
  if (threadIdx.x % 2)
    __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void k_copy(const float *x, float *y) { y[threadIdx.x] = x[threadIdx.x]; }

__global__ void k_shared_first(float *out) {
  PA_DYNAMIC_SHARED(float, sh);
  out[threadIdx.x] = sh[threadIdx.x]; // read before any write: NaN
}

// ---- tests ---------------------------------------------------------------------------

void test_indices(void **) {
  const dim3 grids[] = {dim3(3), dim3(2, 3), dim3(2, 2, 2)}, blocks[] = {dim3(5), dim3(4, 3), dim3(2, 3, 4)};
  for (int c = 0; c < 3; c++) {
    const dim3 g = grids[c], b = blocks[c];
    const size_t n = (size_t)g.x * g.y * g.z * b.x * b.y * b.z;
    unsigned *d = device<unsigned>(n * 6);
    PA_LAUNCH(k_indices, g, b, 0)(d);
    assert_int_equal(cudaGetLastError(), cudaSuccess);
    unsigned *h = (unsigned *)malloc(n * 6 * sizeof *h);
    assert_int_equal(cudaMemcpyAsync(h, d, n * 6 * sizeof *h, cudaMemcpyDeviceToHost, stream), cudaSuccess);
    size_t i = 0;
    for (unsigned bz = 0; bz < g.z; bz++)
      for (unsigned by = 0; by < g.y; by++)
        for (unsigned bx = 0; bx < g.x; bx++)
          for (unsigned tz = 0; tz < b.z; tz++)
            for (unsigned ty = 0; ty < b.y; ty++)
              for (unsigned tx = 0; tx < b.x; tx++, i++) {
                const unsigned want[6] = {bx, by, bz, tx, ty, tz};
                assert_memory_equal(h + i * 6, want, sizeof want);
              }
    free(h);
    cudaFree(d);
  }
}

void test_barrier_orders(void **) {
  int *d = device<int>(256), h[256];
  for (int barrier = 1; barrier >= 0; barrier--) {
    const int salt = 1000 * barrier; // what the launch before left in shared memory is not the answer
    PA_LAUNCH(k_neighbour, 1, 256, 0)(barrier == 1, salt, d);
    assert_int_equal(cudaGetLastError(), cudaSuccess);
    cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, stream);
    int wrong = 0;
    for (int t = 0; t < 256; t++)
      wrong += h[t] != salt + (t + 1) % 256 * 3;
    if (barrier)
      assert_int_equal(wrong, 0);
    else // without it, the threads that ran before their neighbour read its old value
      assert_true(wrong > 0);
    fprintf(stderr, "    %s a barrier: %d of 256 reads wrong\n", barrier ? "with" : "without", wrong);
  }
}

void test_divergent_barrier(void **) {
  int *d = device<int>(64);
  PA_LAUNCH(k_divergent, 1, 64, 0)(d);
  assert_int_equal(cudaGetLastError(), cudaErrorLaunchFailure);
  assert_int_equal(cudaStreamSynchronize(stream), cudaErrorLaunchFailure); // a fault stays
  assert_int_equal(cudaGetLastError(), cudaErrorLaunchFailure);
}

void test_refusals(void **) {
  float host[8] = {0}, *d = device<float>(8), *e = device<float>(8);
  // a host pointer as a kernel's argument: a GPU's illegal address, a fault
  PA_LAUNCH(k_copy, 1, 8, 0)(host, e);
  assert_int_equal(cudaGetLastError(), cudaErrorIllegalAddress);
  assert_int_equal(cudaMemcpyAsync(d, host, sizeof host, cudaMemcpyHostToDevice, stream), cudaErrorIllegalAddress);
  reset(nullptr);
  d = device<float>(8), e = device<float>(8);
  // copies: direction and bounds
  assert_int_equal(cudaMemcpyAsync(host, d, sizeof host, cudaMemcpyHostToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpyAsync(d, host, sizeof host, cudaMemcpyDeviceToHost, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpyAsync(d, host, sizeof host + 4, cudaMemcpyHostToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpyAsync(d + 1, e, sizeof host, cudaMemcpyDeviceToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpy2DAsync(d, 16, e, 16, 16, 3, cudaMemcpyDeviceToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpy2DAsync(d, 16, e, 16, 16, 2, cudaMemcpyDeviceToDevice, stream), cudaSuccess);
  assert_int_equal(cudaFree(d + 1), cudaErrorInvalidDevicePointer);
  // launch configurations
  PA_LAUNCH(k_copy, 1, 1025, 0)(d, e);
  assert_int_equal(cudaGetLastError(), cudaErrorInvalidConfiguration);
  PA_LAUNCH(k_copy, dim3(1, 65536), 1, 0)(d, e);
  assert_int_equal(cudaGetLastError(), cudaErrorInvalidConfiguration);
  // dynamic shared memory: 48 KiB unless raised, up to the device's limit
  PA_LAUNCH(k_shared_first, 1, 8, 64 << 10)(d);
  assert_int_equal(cudaGetLastError(), cudaErrorInvalidValue);
  assert_int_equal(cudaFuncSetAttribute((const void *)k_shared_first, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        64 << 10),
                   cudaSuccess);
  PA_LAUNCH(k_shared_first, 1, 8, 64 << 10)(d);
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  assert_int_equal(cudaFuncSetAttribute((const void *)k_shared_first, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        optin + 1),
                   cudaErrorInvalidValue);
}

void test_memory_starts_nan(void **) {
  float *d = device<float>(8), h[8];
  cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, stream);
  for (float v : h)
    assert_true(isnan(v));
  float *e = device<float>(8);
  PA_LAUNCH(k_shared_first, 1, 8, 8 * sizeof(float))(e);
  cudaMemcpyAsync(h, e, sizeof h, cudaMemcpyDeviceToHost, stream);
  for (float v : h)
    assert_true(isnan(v));
}

uint64_t rng = 0x853C49E6748FEA9Bull;
float uniform() { return (float)pa_uniform24(&rng) * 2 - 1; } // [-1, 1)

// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major, in double.
void reference(bool ta, bool tb, int m, int n, int k, float alpha, const float *A, int lda, const float *B, int ldb,
               float beta, const float *C0, float *C, int ldc) {
  for (int j = 0; j < n; j++)
    for (int i = 0; i < m; i++) {
      double s = 0;
      for (int p = 0; p < k; p++)
        s += (double)(ta ? A[p + (size_t)i * lda] : A[i + (size_t)p * lda]) *
             (tb ? B[j + (size_t)p * ldb] : B[p + (size_t)j * ldb]);
      C[i + (size_t)j * ldc] = (float)(alpha * s + (beta == 0 ? 0.0 : beta * C0[i + (size_t)j * ldc]));
    }
}

void check_gemm(cublasHandle_t h, bool bf16, bool ta, bool tb, float beta) {
  const int m = 7, n = 5, k = 9, pad = 3;
  const int lda = (ta ? k : m) + pad, ldb = (tb ? n : k) + pad, ldc = m + pad;
  const size_t na = (size_t)lda * (ta ? m : k), nb = (size_t)ldb * (tb ? k : n), nc = (size_t)ldc * n;
  float *A = (float *)malloc(na * 4), *B = (float *)malloc(nb * 4), *C0 = (float *)malloc(nc * 4);
  float *want = (float *)malloc(nc * 4), *got = (float *)malloc(nc * 4);
  __nv_bfloat16 *A16 = (__nv_bfloat16 *)malloc(na * 2), *B16 = (__nv_bfloat16 *)malloc(nb * 2);
  for (size_t i = 0; i < na; i++)
    A16[i] = __float2bfloat16_rn(uniform()), A[i] = bf16 ? __bfloat162float(A16[i]) : uniform();
  for (size_t i = 0; i < nb; i++)
    B16[i] = __float2bfloat16_rn(uniform()), B[i] = bf16 ? __bfloat162float(B16[i]) : uniform();
  for (size_t i = 0; i < nc; i++)
    C0[i] = beta == 0 ? NAN : uniform();
  const float alpha = 1.5f;
  reference(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C0, want, ldc);
  for (int j = 0; j < n; j++) // the padding rows are left as they were
    for (int i = m; i < ldc; i++)
      want[i + (size_t)j * ldc] = C0[i + (size_t)j * ldc];
  const size_t ea = bf16 ? 2 : 4;
  void *dA = device<char>(na * ea), *dB = device<char>(nb * ea);
  float *dC = device<float>(nc);
  cudaMemcpyAsync(dA, bf16 ? (const void *)A16 : A, na * ea, cudaMemcpyHostToDevice, stream);
  cudaMemcpyAsync(dB, bf16 ? (const void *)B16 : B, nb * ea, cudaMemcpyHostToDevice, stream);
  cudaMemcpyAsync(dC, C0, nc * 4, cudaMemcpyHostToDevice, stream);
  const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasStatus_t s =
      bf16 ? cublasGemmEx(h, oa, ob, m, n, k, &alpha, dA, CUDA_R_16BF, lda, dB, CUDA_R_16BF, ldb, &beta, dC,
                          CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
           : cublasSgemm(h, oa, ob, m, n, k, &alpha, (const float *)dA, lda, (const float *)dB, ldb, &beta, dC, ldc);
  assert_int_equal(s, CUBLAS_STATUS_SUCCESS);
  cudaMemcpyAsync(got, dC, nc * 4, cudaMemcpyDeviceToHost, stream);
  for (size_t i = 0; i < nc; i++) {
    // a reordered fp32 sum of k terms of magnitude below alpha: k eps alpha at worst, plus beta C's rounding
    if (!(fabsf(got[i] - want[i]) <= 1e-5f || (isnan(want[i]) && isnan(got[i]))))
      fail_msg("%s ta %d tb %d beta %g: C[%zu] = %.8g, want %.8g", bf16 ? "bf16" : "fp32", ta, tb, beta, i, got[i],
               want[i]);
  }
  cudaFree(dA), cudaFree(dB), cudaFree(dC);
  free(A), free(B), free(C0), free(want), free(got), free(A16), free(B16);
}

void test_gemm(void **) {
  cublasHandle_t h;
  assert_int_equal(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  assert_int_equal(cublasSetStream(h, stream), CUBLAS_STATUS_SUCCESS);
  for (int bf16 = 0; bf16 < 2; bf16++)
    for (int ta = 0; ta < 2; ta++)
      for (int tb = 0; tb < 2; tb++)
        for (float beta : {0.0f, 0.5f})
          check_gemm(h, bf16, ta, tb, beta);
  // refusals: a leading dimension under the stored rows; an operand past its allocation (a fault)
  float *a = device<float>(6 * 4), *b = device<float>(4 * 5), *c = device<float>(6 * 5);
  const float one = 1, zero = 0;
  assert_int_equal(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 6, 5, 4, &one, a, 5, b, 4, &zero, c, 6),
                   CUBLAS_STATUS_INVALID_VALUE);
  assert_int_equal(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 6, 5, 4, &one, a, 6, b, 4, &zero, c, 6),
                   CUBLAS_STATUS_SUCCESS);
  assert_int_equal(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 6, 5, 4, &one, a, 7, b, 4, &zero, c, 6),
                   CUBLAS_STATUS_EXECUTION_FAILED);
  assert_int_equal(cudaGetLastError(), cudaErrorIllegalAddress);
}

} // namespace

int main() {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup(test_indices, reset),
      cmocka_unit_test_setup(test_barrier_orders, reset),
      cmocka_unit_test_setup(test_divergent_barrier, reset),
      cmocka_unit_test_setup(test_refusals, reset),
      cmocka_unit_test_setup(test_memory_starts_nan, reset),
      cmocka_unit_test_setup(test_gemm, reset),
  };
  return cmocka_run_group_tests(tests, nullptr, nullptr);
}
