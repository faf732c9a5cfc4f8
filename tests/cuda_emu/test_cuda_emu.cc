// test_cuda_emu.cc: the CUDA emulation itself (cuda_emu.h). The gpu tests
// trust it to run the backend's kernels as a GPU would and to fail where a
// GPU would; here each of its promises is checked on kernels written to
// keep or to break it:
//  - threads and blocks get the indices of their grid, in 1, 2 and 3 dimensions;
//  - a barrier orders the writes before it for every thread after it, and a
//    read of another thread's write without one gives a wrong answer (the
//    shuffled order), the next thread's or the one before's, so a missing
//    barrier cannot pass by luck;
//  - a __syncthreads() that not every thread reaches fails the launch, and the
//    fault stays until the device is reset;
//  - a host pointer given to a kernel, a copy in the wrong direction or past
//    an allocation, a block of 1,025 threads, and dynamic shared memory over
//    what the kernel was allowed are refused; the device reports an H100
//    SXM's opt-in shared memory and 132 multiprocessors, and no other
//    attribute;
//  - device and dynamic shared memory start as NaN;
//  - the stream runs its work only when the host waits for it: a copy from
//    pinned memory reads it then, one into pinned memory writes it then, an
//    event is not ready before (and cudaGetLastError says so once), waiting
//    for an event runs the stream that far and no further; a copy from
//    pageable memory takes its source at the call, one into it runs the
//    queue first; cudaFree waits;
//  - cuBLAS's products, all four transpose combinations, with leading
//    dimensions larger than the rows and beta 0 over NaN, fp32 and bf16,
//    against a plain loop over the column-major definition, in double;
//    a leading dimension under the stored rows, and an operand reaching past
//    its allocation, are refused;
//  - cudaMalloc's pointers are 256-byte aligned, as CUDA's are (a warp
//    matrix tile at an allocation's start needs 32); the device's memory
//    (PALIGN_EMU_MEMORY=256M here) is what its allocations may take,
//    cudaMemGetInfo tells what they leave, and one past it is refused
//    without a fault;
//  - the warp matrix functions (mma.h): D = A B + C on m16n16k8 tf32 tiles,
//    all four layouts of A and B, C and D row- and column-major, leading
//    dimensions over the tile's, four warps of two blocks each on its own
//    tile, against a plain loop in double within the bound of truncated
//    fp32 sums; __float_to_tf32 rounds to nearest at 10 mantissa bits with
//    ties away from zero, in a kernel and on the host; mma_sync truncates
//    an operand not rounded to tf32, as the tensor cores do, keeps the
//    accumulator's fp32, and truncates its sums (3/4 of an ulp dropped);
//    an accumulator is spread over the warp, each of a tile's 256 elements
//    one lane's element, and fill_fragment reaches all of them; a tile at a
//    pointer not 32-byte aligned (4 or 16 bytes on), with a leading
//    dimension not a multiple of 4, or reaching past its device allocation
//    or the launch's dynamic shared memory is a fault that stays until the
//    device is reset, and one just inside works;
//  - the same for m16n16k16 bf16 tiles: D = A B + C in all four layouts of
//    A and B and both of C and D, within the bound of sixteen truncated
//    sums; their accumulator spreads its 256 elements over the warp too, in
//    another mapping than m16n16k8's; a bf16 tile 16 bytes off 32-byte
//    alignment, or with a leading dimension of 20 (40 bytes), is a fault;
//  - NCCL's all-gather between processes (nccl_emu.cc), each on a device of
//    its own: every member's values in their place, in place or not, twice
//    in a row, and the group's files gone after; two members on one device,
//    members that disagree on the group's size or on the count, a rank
//    outside the group, an id NCCL did not make, host memory, a recv too
//    small, send overlapping recv other than in place, and a destroyed
//    communicator are refused.
#include <dirent.h>
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

extern "C" {
#include <cmocka.h>
}

#include "cuda_emu.h"
#include "mma.h"
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

// out[t] = the value thread t + step wrote (salt + 3 (t + step), modulo the
// block), with or without a barrier between.
__global__ void k_neighbour(bool barrier, int salt, unsigned step, int *out) {
  __shared__ int sh[256];
  const unsigned t = threadIdx.x;
  sh[t] = salt + (int)t * 3;
  if (barrier)
    __syncthreads();
  out[t] = sh[(t + step) % blockDim.x];
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

namespace wmma = nvcuda::wmma;
using frag_acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// One 16x16 tile of D = A B + C, A 32x8 and B 8x32 in the layouts LA and
// LB, C and D 32x32 in lc: block i takes rows 16 i, its warp j columns 16 j.
template <class LA, class LB>
__device__ void mma_tile(const float *A, unsigned lda, const float *B, unsigned ldb, const float *C, float *D,
                         unsigned ldc, wmma::layout_t lc) {
  const unsigned i = blockIdx.x, j = threadIdx.x / 32;
  const bool a_rows = std::is_same_v<LA, wmma::row_major>, b_rows = std::is_same_v<LB, wmma::row_major>;
  const size_t c_at = lc == wmma::mem_row_major ? (size_t)16 * i * ldc + 16 * j : (size_t)16 * j * ldc + 16 * i;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> b;
  frag_acc c;
  wmma::load_matrix_sync(a, A + (a_rows ? (size_t)16 * i * lda : 16 * i), lda);
  wmma::load_matrix_sync(b, B + (b_rows ? 16 * j : (size_t)16 * j * ldb), ldb);
  wmma::load_matrix_sync(c, C + c_at, ldc, lc);
  wmma::mma_sync(c, a, b, c); // the accumulator in place, as kernels do
  wmma::store_matrix_sync(D + c_at, c, ldc, lc);
}

// mma_tile in the layouts a_col and b_col name (column-major when true).
__global__ void k_mma(bool a_col, bool b_col, const float *A, unsigned lda, const float *B, unsigned ldb,
                      const float *C, float *D, unsigned ldc, wmma::layout_t lc) {
  if (!a_col && !b_col)
    mma_tile<wmma::row_major, wmma::row_major>(A, lda, B, ldb, C, D, ldc, lc);
  else if (!a_col)
    mma_tile<wmma::row_major, wmma::col_major>(A, lda, B, ldb, C, D, ldc, lc);
  else if (!b_col)
    mma_tile<wmma::col_major, wmma::row_major>(A, lda, B, ldb, C, D, ldc, lc);
  else
    mma_tile<wmma::col_major, wmma::col_major>(A, lda, B, ldb, C, D, ldc, lc);
}

__global__ void k_tf32(const float *x, float *y) { y[threadIdx.x] = wmma::__float_to_tf32(x[threadIdx.x]); }

// Each lane numbers its accumulator elements lane * num_elements + e; warp
// w stores its tile row-major at out + 256 w. The block is two-dimensional:
// a thread's lane comes from its index in the block, x fastest.
__global__ void k_fragment_lanes(float *out) {
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x, lane = t % 32;
  frag_acc c;
  for (int e = 0; e < c.num_elements; e++)
    c.x[e] = (float)(lane * c.num_elements + e);
  wmma::store_matrix_sync(out + 256 * (t / 32), c, 16, wmma::mem_row_major);
}

__global__ void k_fill(float v, float *out, unsigned ldm) {
  frag_acc c;
  wmma::fill_fragment(c, v);
  wmma::store_matrix_sync(out, c, ldm, wmma::mem_col_major);
}

// out (16x16, row-major) = the 16x8 row-major tile at p next to 8 columns of
// zeros: the tile times an 8x16 identity, which eye holds.
__global__ void k_load_a(const float *p, unsigned ldm, const float *eye, float *out) {
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
  frag_acc c;
  wmma::fill_fragment(c, 0.0f);
  wmma::load_matrix_sync(a, p, ldm);
  wmma::load_matrix_sync(b, eye, 16);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}

// Dynamic shared memory of n floats holds 0, 1, ...; out (16x16, row-major)
// = the 16x16 tile at its float `at`, ldm 16.
__global__ void k_shared_tile(unsigned n, unsigned at, float *out) {
  PA_DYNAMIC_SHARED(float, sh);
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x)
    sh[i] = (float)i;
  __syncthreads();
  frag_acc c;
  wmma::load_matrix_sync(c, sh + at, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}

using frag_acc16 = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// D = A B + C on one m16n16k16 tile of bf16 operands: A and B 16x16 with
// leading dimension ld, in the layouts a_col and b_col name (column-major
// when true), C and D with ldc in lc.
template <class LA, class LB>
__device__ void mma16_tile(const __nv_bfloat16 *A, const __nv_bfloat16 *B, unsigned ld, const float *C, float *D,
                           unsigned ldc, wmma::layout_t lc) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LA> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LB> b;
  frag_acc16 c;
  wmma::load_matrix_sync(a, A, ld);
  wmma::load_matrix_sync(b, B, ld);
  wmma::load_matrix_sync(c, C, ldc, lc);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(D, c, ldc, lc);
}

__global__ void k_mma16(bool a_col, bool b_col, const __nv_bfloat16 *A, const __nv_bfloat16 *B, unsigned ld,
                        const float *C, float *D, unsigned ldc, wmma::layout_t lc) {
  if (!a_col && !b_col)
    mma16_tile<wmma::row_major, wmma::row_major>(A, B, ld, C, D, ldc, lc);
  else if (!a_col)
    mma16_tile<wmma::row_major, wmma::col_major>(A, B, ld, C, D, ldc, lc);
  else if (!b_col)
    mma16_tile<wmma::col_major, wmma::row_major>(A, B, ld, C, D, ldc, lc);
  else
    mma16_tile<wmma::col_major, wmma::col_major>(A, B, ld, C, D, ldc, lc);
}

// k_fragment_lanes for the m16n16k16 accumulator, one warp.
__global__ void k_fragment_lanes16(float *out) {
  frag_acc16 c;
  for (int e = 0; e < c.num_elements; e++)
    c.x[e] = (float)(threadIdx.x * c.num_elements + e);
  wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
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

// Each thread reads the next thread's write and, in another launch, the one
// before's: in the threads' index order the first would be wrong and the
// second right (but thread 0's), so only a shuffled order makes both wrong
// without a barrier, about half of the reads.
void test_barrier_orders(void **) {
  int *d = device<int>(256), h[256];
  for (unsigned step : {1u, 255u})
    for (int barrier = 1; barrier >= 0; barrier--) {
      const int salt = 1000 * barrier + (int)step; // what the launch before left in shared memory is not the answer
      PA_LAUNCH(k_neighbour, 1, 256, 0)(barrier == 1, salt, step, d);
      assert_int_equal(cudaGetLastError(), cudaSuccess);
      cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, stream);
      int wrong = 0;
      for (unsigned t = 0; t < 256; t++)
        wrong += h[t] != salt + (int)((t + step) % 256) * 3;
      if (barrier)
        assert_int_equal(wrong, 0);
      else // without it, the threads that ran before their neighbour read its old value: about half
        assert_true(wrong > 64);
      fprintf(stderr, "    thread t reading t %s 1, %s a barrier: %d of 256 reads wrong\n", step == 1 ? "+" : "-",
              barrier ? "with" : "without", wrong);
    }
}

void test_divergent_barrier(void **) {
  int *d = device<int>(64);
  PA_LAUNCH(k_divergent, 1, 64, 0)(d);
  assert_int_equal(cudaGetLastError(), cudaSuccess); // launched; it runs, and faults, when the host waits
  assert_int_equal(cudaStreamSynchronize(stream), cudaErrorLaunchFailure);
  assert_int_equal(cudaGetLastError(), cudaErrorLaunchFailure); // a fault stays, read or not
  assert_int_equal(cudaStreamSynchronize(stream), cudaErrorLaunchFailure);
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
  assert_int_equal(cudaMemcpyAsync(d, e, sizeof host, cudaMemcpyDeviceToHost, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpyAsync(host, d + 1, sizeof host, cudaMemcpyDeviceToHost, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpyAsync(d, host, sizeof host + 4, cudaMemcpyHostToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpyAsync(d + 1, e, sizeof host, cudaMemcpyDeviceToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpy2DAsync(d, 16, e, 16, 16, 3, cudaMemcpyDeviceToDevice, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemcpy2DAsync(d, 16, e, 16, 16, 2, cudaMemcpyDeviceToDevice, stream), cudaSuccess);
  assert_int_equal(cudaMemsetAsync(host, 0, sizeof host, stream), cudaErrorInvalidValue);
  assert_int_equal(cudaMemsetAsync(d + 1, 0, sizeof host, stream), cudaErrorInvalidValue);
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
  // the device is an H100 SXM's size: 227 KiB of shared memory a block at most, 132 multiprocessors
  int sms = 0;
  assert_int_equal(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  assert_int_equal(optin, 232448);
  assert_int_equal(sms, 132);
  assert_int_equal(cudaDeviceGetAttribute(&sms, (cudaDeviceAttr)1, 0), cudaErrorInvalidValue);
  cudaGetLastError();
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

__global__ void k_add_one(float *x) { x[threadIdx.x] += 1; }

// What the stream holds runs when the host waits for it, and not before:
// kernels, copies from and into pinned memory, products, memsets; a copy from
// pageable memory takes its source when called; events complete when the
// stream reaches them.
void test_stream_order(void **) {
  float *d = device<float>(8), *pin = nullptr, h[8];
  assert_int_equal(cudaHostAlloc((void **)&pin, 8 * sizeof(float), cudaHostAllocDefault), cudaSuccess);
  cudaEvent_t ev;
  assert_int_equal(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), cudaSuccess);
  assert_int_equal(cudaEventQuery(ev), cudaSuccess); // never recorded
  // from pinned memory: read when the stream runs, so a write after the call shows
  for (int i = 0; i < 8; i++)
    pin[i] = 1;
  cudaMemcpyAsync(d, pin, 8 * sizeof(float), cudaMemcpyHostToDevice, stream);
  PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  assert_int_equal(cudaEventRecord(ev, stream), cudaSuccess);
  assert_int_equal(cudaEventQuery(ev), cudaErrorNotReady);
  assert_int_equal(cudaGetLastError(), cudaErrorNotReady); // kept, as the runtime may keep it
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  for (int i = 0; i < 8; i++)
    pin[i] = 5;
  // into pinned memory: written when the stream runs
  cudaMemcpyAsync(pin, d, 8 * sizeof(float), cudaMemcpyDeviceToHost, stream);
  assert_true(pin[0] == 5 && pin[7] == 5);
  assert_int_equal(cudaEventSynchronize(ev), cudaSuccess); // the stream run up to the event, not past it
  assert_int_equal(cudaEventQuery(ev), cudaSuccess);
  assert_true(pin[0] == 5 && pin[7] == 5);
  assert_int_equal(cudaStreamSynchronize(stream), cudaSuccess);
  assert_true(pin[0] == 6 && pin[7] == 6);
  // from pageable memory: taken at the call; into it: done, the queue first, when the call returns
  for (int i = 0; i < 8; i++)
    h[i] = 2;
  cudaMemcpyAsync(d, h, sizeof h, cudaMemcpyHostToDevice, stream);
  PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  for (int i = 0; i < 8; i++)
    h[i] = 9;
  cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, stream);
  assert_true(h[0] == 3 && h[7] == 3);
  // cudaFree and cudaFreeHost wait for the stream; an event's record queued past its destruction is harmless
  PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  assert_int_equal(cudaEventRecord(ev, stream), cudaSuccess);
  cudaMemcpyAsync(pin, d, 8 * sizeof(float), cudaMemcpyDeviceToHost, stream);
  float *other = device<float>(1);
  assert_int_equal(cudaFree(other), cudaSuccess);
  assert_int_equal(cudaEventQuery(ev), cudaSuccess);
  assert_true(pin[0] == 4 && pin[7] == 4);
  assert_int_equal(cudaEventRecord(ev, stream), cudaSuccess);
  assert_int_equal(cudaEventDestroy(ev), cudaSuccess);
  PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  cudaMemcpyAsync(pin, d, 8 * sizeof(float), cudaMemcpyDeviceToHost, stream);
  assert_int_equal(cudaStreamSynchronize(stream), cudaSuccess);
  assert_true(pin[0] == 5 && pin[7] == 5);
  // a memset: queued, done in its place when the stream runs (after the kernel before it, before the one after)
  PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  cudaMemsetAsync(d + 2, 0, 4 * sizeof(float), stream);
  PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  cudaMemcpyAsync(pin, d, 8 * sizeof(float), cudaMemcpyDeviceToHost, stream);
  assert_true(pin[0] == 5 && pin[2] == 5);
  assert_int_equal(cudaStreamSynchronize(stream), cudaSuccess);
  assert_true(pin[0] == 7 && pin[1] == 7 && pin[2] == 1 && pin[5] == 1 && pin[6] == 7 && pin[7] == 7);
  assert_int_equal(cudaFreeHost(pin), cudaSuccess);
  assert_int_equal(cudaFreeHost(h), cudaErrorInvalidValue);
}

// Timing events: the ms between two events the stream has reached, in the
// order it reached them; refused for an event not yet complete, one never
// recorded and one made without timing, as CUDA refuses them.
void test_event_timing(void **) {
  float *d = device<float>(8);
  cudaEvent_t a, b, untimed;
  assert_int_equal(cudaEventCreateWithFlags(&a, cudaEventDefault), cudaSuccess);
  assert_int_equal(cudaEventCreateWithFlags(&b, cudaEventDefault), cudaSuccess);
  assert_int_equal(cudaEventCreateWithFlags(&untimed, cudaEventDisableTiming), cudaSuccess);
  float ms = -1;
  assert_int_equal(cudaEventElapsedTime(&ms, a, b), cudaErrorInvalidResourceHandle); // never recorded
  cudaGetLastError();
  assert_int_equal(cudaEventRecord(a, stream), cudaSuccess);
  for (int i = 0; i < 200; i++)
    PA_LAUNCH(k_add_one, 1, 8, 0)(d);
  assert_int_equal(cudaEventRecord(b, stream), cudaSuccess);
  assert_int_equal(cudaEventRecord(untimed, stream), cudaSuccess);
  assert_int_equal(cudaEventElapsedTime(&ms, a, b), cudaErrorNotReady);
  assert_int_equal(cudaGetLastError(), cudaErrorNotReady);
  assert_true(ms == -1);
  assert_int_equal(cudaStreamSynchronize(stream), cudaSuccess);
  assert_int_equal(cudaEventElapsedTime(&ms, a, b), cudaSuccess);
  assert_true(ms > 0 && ms < 60e3);
  float back = 1;
  assert_int_equal(cudaEventElapsedTime(&back, b, a), cudaSuccess);
  assert_true(back == -ms);
  assert_int_equal(cudaEventElapsedTime(&ms, a, untimed), cudaErrorInvalidResourceHandle);
  cudaGetLastError();
  for (cudaEvent_t e : {a, b, untimed})
    assert_int_equal(cudaEventDestroy(e), cudaSuccess);
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

void test_malloc_aligned(void **) {
  for (size_t bytes : {1, 4, 20, 100, 1000, 4096, 200000})
    for (int i = 0; i < 4; i++) {
      char *p = device<char>(bytes);
      if ((uintptr_t)p % 256)
        fail_msg("cudaMalloc(%zu bytes) returned %p, not 256-byte aligned", bytes, (void *)p);
    }
}

// The device's memory, PALIGN_EMU_MEMORY=256M (main sets it): cudaMemGetInfo
// tells what the live allocations leave; an allocation past it is refused
// (cudaErrorMemoryAllocation, the last error once) and is no fault, so the
// device goes on; a freed allocation's bytes come back.
void test_memory_limit(void **) {
  size_t free0, total, free1;
  assert_int_equal(cudaMemGetInfo(&free0, &total), cudaSuccess);
  assert_true(total == (size_t)256 << 20 && free0 == total);
  void *p = device<char>(1 << 20), *q = &free1;
  assert_int_equal(cudaMemGetInfo(&free1, &total), cudaSuccess);
  assert_true(free1 == free0 - (1 << 20));
  assert_int_equal(cudaMalloc(&q, free1 + 1), cudaErrorMemoryAllocation);
  assert_null(q);
  assert_int_equal(cudaGetLastError(), cudaErrorMemoryAllocation);
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  assert_int_equal(cudaMalloc(&q, free1), cudaSuccess); // all that is left
  assert_int_equal(cudaMemGetInfo(&free1, &total), cudaSuccess);
  assert_true(free1 == 0);
  assert_int_equal(cudaFree(q), cudaSuccess);
  assert_int_equal(cudaFree(p), cudaSuccess);
  assert_int_equal(cudaMemGetInfo(&free1, &total), cudaSuccess);
  assert_true(free1 == free0);
}

// One of k_mma's products D = A B + C, A 32x8, B 8x32, C and D 32x32, each
// stored in its layout with a leading dimension 4 floats over the length of
// its rows or columns (a multiple of 4, as the warp matrix functions want;
// every tile's start stays 32 bytes aligned): where an element is, and the
// launch.
struct mma_case {
  bool a_col, b_col, c_col;
  unsigned lda, ldb, ldc;
  size_t na, nb, nc; // floats, the padding of the last line included

  mma_case(bool a_col_, bool b_col_, bool c_col_) : a_col(a_col_), b_col(b_col_), c_col(c_col_) {
    lda = (a_col ? 32 : 8) + 4, ldb = (b_col ? 8 : 32) + 4, ldc = 32 + 4;
    na = (size_t)lda * (a_col ? 8 : 32), nb = (size_t)ldb * (b_col ? 32 : 8), nc = (size_t)ldc * 32;
  }
  size_t a(unsigned r, unsigned k) const { return a_col ? (size_t)k * lda + r : (size_t)r * lda + k; }
  size_t b(unsigned k, unsigned n) const { return b_col ? (size_t)n * ldb + k : (size_t)k * ldb + n; }
  size_t c(unsigned r, unsigned n) const { return c_col ? (size_t)n * ldc + r : (size_t)r * ldc + n; }

  // D from k_mma on two blocks of two warps; D's padding is left as
  // cudaMalloc filled it (NaN).
  void run(const float *A, const float *B, const float *C, float *D) const {
    float *dA = device<float>(na), *dB = device<float>(nb), *dC = device<float>(nc), *dD = device<float>(nc);
    cudaMemcpyAsync(dA, A, na * sizeof *A, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(dB, B, nb * sizeof *B, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(dC, C, nc * sizeof *C, cudaMemcpyHostToDevice, stream);
    const wmma::layout_t lc = c_col ? wmma::mem_col_major : wmma::mem_row_major;
    PA_LAUNCH(k_mma, 2, 64, 0)(a_col, b_col, dA, lda, dB, ldb, dC, dD, ldc, lc);
    assert_int_equal(cudaGetLastError(), cudaSuccess);
    assert_int_equal(cudaMemcpyAsync(D, dD, nc * sizeof *D, cudaMemcpyDeviceToHost, stream), cudaSuccess);
    cudaFree(dA), cudaFree(dB), cudaFree(dC), cudaFree(dD);
  }
};

float tf32_uniform() { return wmma::__float_to_tf32(uniform()); }

void test_mma(void **) {
  for (int a_col = 0; a_col < 2; a_col++)
    for (int b_col = 0; b_col < 2; b_col++)
      for (int c_col = 0; c_col < 2; c_col++) {
        const mma_case mc(a_col, b_col, c_col);
        float *A = (float *)malloc(mc.na * 4), *B = (float *)malloc(mc.nb * 4);
        float *C = (float *)malloc(mc.nc * 4), *D = (float *)malloc(mc.nc * 4);
        for (size_t i = 0; i < mc.na; i++)
          A[i] = tf32_uniform();
        for (size_t i = 0; i < mc.nb; i++)
          B[i] = tf32_uniform();
        for (size_t i = 0; i < mc.nc; i++) // the accumulator is fp32: its values need no rounding
          C[i] = uniform();
        mc.run(A, B, C, D);
        for (unsigned r = 0; r < 32; r++)
          for (unsigned n = 0; n < 32; n++) {
            double want = C[mc.c(r, n)], magnitude = fabs(want);
            for (unsigned k = 0; k < 8; k++) {
              const double p = (double)A[mc.a(r, k)] * B[mc.b(k, n)];
              want += p, magnitude += fabs(p);
            }
            // A product of two tf32 values is exact in fp32, so the only
            // error is the fp32 sum of 9 terms (C and 8 products), each of
            // the 8 sums truncated as the tensor cores do (under 2 u of it,
            // u = 2^-24): at most 16 u sum|term|.
            const double tol = 8 * 0x1p-23 * magnitude;
            const float got = D[mc.c(r, n)];
            if (!(fabs(got - want) <= tol))
              fail_msg("A %s B %s C %s: D(%u, %u) = %.9g, want %.9g within %.2g", a_col ? "col" : "row",
                       b_col ? "col" : "row", c_col ? "col" : "row", r, n, got, want, tol);
          }
        for (unsigned line = 0; line < 32; line++) // the padding is not written
          for (unsigned i = 32; i < mc.ldc; i++)
            assert_true(isnan(D[(size_t)line * mc.ldc + i]));
        free(A), free(B), free(C), free(D);
      }
}

float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

void test_tf32_rounding(void **) {
  // (x, what it rounds to): ties away from zero, a carry into the exponent,
  // the largest float past the largest tf32 and so to infinity
  const float cases[][2] = {
      {1 + 0x1p-11f, 1 + 0x1p-10f},       // a tie: away from zero, where to even would give 1
      {-(1 + 0x1p-11f), -(1 + 0x1p-10f)}, // and away from zero below it
      {1 + 0x1p-11f - 0x1p-23f, 1.0f},    // just under the tie
      {1 + 3 * 0x1p-11f, 1 + 0x1p-9f},    // a tie above an odd last bit
      {1 + 0x1p-10f, 1 + 0x1p-10f},       // a tf32 value stays
      {2 - 0x1p-23f, 2.0f},               // the carry reaches the exponent
      {0x1.ffdffep+127f, 0x1.ffcp+127f},  // under the largest tf32's tie: the largest tf32
      {0x1.ffep+127f, INFINITY},          // its tie
      {FLT_MAX, INFINITY},                // the largest float rounds up past every finite tf32
      {-FLT_MAX, -INFINITY},
      {INFINITY, INFINITY},
      {-INFINITY, -INFINITY},
      {0.0f, 0.0f},
      {-0.0f, -0.0f},
      {0x1.000002p-100f, 0x1p-100f}, // another exponent
  };
  const int nc = (int)(sizeof cases / sizeof cases[0]), nr = 256, n = nc + 1 + nr;
  float x[n], y[n];
  for (int i = 0; i < nc; i++)
    x[i] = cases[i][0];
  // a NaN whose payload would carry into the sign bit if it were rounded
  x[nc] = bits_float(0x7FFFFFFFu);
  for (int i = nc + 1; i < n; i++) { // random signs and mantissas, exponents -30 to 33, every other one a tie
    const uint32_t r = (uint32_t)pa_splitmix64(&rng), exponent = 127 - 30 + (r >> 23 & 63);
    x[i] = bits_float((r & 0x807FFFFFu) | exponent << 23);
    if (i % 2)
      x[i] = bits_float((float_bits(x[i]) & ~0x1FFFu) | 0x1000u);
  }
  float *dx = device<float>(n), *dy = device<float>(n);
  cudaMemcpyAsync(dx, x, sizeof x, cudaMemcpyHostToDevice, stream);
  PA_LAUNCH(k_tf32, 1, n, 0)(dx, dy);
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  cudaMemcpyAsync(y, dy, sizeof y, cudaMemcpyDeviceToHost, stream);
  for (int i = 0; i < n; i++) {
    const float host = wmma::__float_to_tf32(x[i]);
    if (!(float_bits(host) == float_bits(y[i]) || (isnan(host) && isnan(y[i]))))
      fail_msg("__float_to_tf32(%a): %a on the host, %a in a kernel", x[i], host, y[i]);
  }
  for (int i = 0; i < nc; i++)
    if (float_bits(y[i]) != float_bits(cases[i][1]))
      fail_msg("__float_to_tf32(%a) = %a, want %a", x[i], y[i], cases[i][1]);
  assert_true(isnan(y[nc]));
  for (int i = nc + 1; i < n; i++) { // nearest of the values with 10 mantissa bits, ties away from zero
    int e;
    frexpf(x[i], &e); // x = m 2^e, 0.5 <= |m| < 1: tf32's spacing there is 2^(e - 11)
    const double half = ldexp(1.0, e - 12), err = fabs((double)y[i] - x[i]);
    if ((float_bits(y[i]) & 0x1FFFu) || err > half || (err == half && fabsf(y[i]) < fabsf(x[i])))
      fail_msg("__float_to_tf32(%a) = %a", x[i], y[i]);
  }
}

void test_mma_truncates(void **) {
  // 1 + 3 2^-12 is no tf32 value: rounded it would be 1 + 2^-10, the
  // tensor cores read 1 of it
  const float odd = 1 + 3 * 0x1p-12f;
  const mma_case mc(false, false, false);
  float *A = (float *)calloc(mc.na, 4), *B = (float *)calloc(mc.nb, 4);
  float *C = (float *)calloc(mc.nc, 4), *D = (float *)malloc(mc.nc * 4);
  A[mc.a(0, 0)] = odd, A[mc.a(1, 0)] = 1, A[mc.a(2, 0)] = -odd;
  B[mc.b(0, 0)] = 1, B[mc.b(0, 1)] = odd;
  C[mc.c(3, 3)] = 1 + 0x1p-12f; // the accumulator keeps fp32's bits
  // 1 + 1.5 2^-24 is 3/4 of an ulp over 1: the sum truncated is 1 (rounded to nearest, 1 + 2^-23)
  A[mc.a(4, 1)] = 0x1.8p-24f, B[mc.b(1, 4)] = 1, C[mc.c(4, 4)] = 1;
  mc.run(A, B, C, D);
  for (unsigned r = 0; r < 32; r++)
    for (unsigned n = 0; n < 32; n++) {
      float want = 0;
      if (r < 3 && n < 2)
        want = r == 2 ? -1.0f : 1.0f; // -odd reads as -1: the magnitude is truncated
      if (r == 3 && n == 3)
        want = 1 + 0x1p-12f;
      if (r == 4 && n == 4)
        want = 1;
      if (float_bits(D[mc.c(r, n)]) != float_bits(want))
        fail_msg("D(%u, %u) = %a, want %a", r, n, D[mc.c(r, n)], want);
    }
  free(A), free(B), free(C), free(D);
}

void test_accumulator_lanes(void **) {
  assert_int_equal(frag_acc::num_elements * 32, 256);
  float *d = device<float>(512), h[512];
  PA_LAUNCH(k_fragment_lanes, 1, dim3(16, 4), 0)(d);
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, stream);
  for (int w = 0; w < 2; w++) { // each warp's tile holds each lane's each element once
    int seen[256] = {0};
    for (int i = 0; i < 256; i++) {
      const float v = h[256 * w + i];
      if (!(v >= 0 && v < 256 && v == (int)v))
        fail_msg("warp %d: tile element %d is %g, no lane's element", w, i, v);
      seen[(int)v]++;
    }
    for (int v = 0; v < 256; v++)
      if (seen[v] != 1)
        fail_msg("warp %d: lane %d's element %d is in the tile %d times", w, v / frag_acc::num_elements,
                 v % frag_acc::num_elements, seen[v]);
  }
  // fill_fragment then store: all 256 of a 16x16 tile, column-major with
  // leading dimension 20, and none of the padding
  float *f = device<float>(20 * 16), g[20 * 16];
  PA_LAUNCH(k_fill, 1, 32, 0)(2.5f, f, 20);
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  cudaMemcpyAsync(g, f, sizeof g, cudaMemcpyDeviceToHost, stream);
  for (int n = 0; n < 16; n++)
    for (int r = 0; r < 20; r++)
      if (r < 16 ? g[n * 20 + r] != 2.5f : !isnan(g[n * 20 + r]))
        fail_msg("column %d, row %d: %g", n, r, g[n * 20 + r]);
}

// An 8x16 identity, in device memory.
float *device_eye() {
  float h[8 * 16] = {0}, *d = device<float>(8 * 16);
  for (int k = 0; k < 8; k++)
    h[k * 16 + k] = 1;
  cudaMemcpyAsync(d, h, sizeof h, cudaMemcpyHostToDevice, stream);
  return d;
}

// k_load_a on the 16x8 tile at p, rows ldm apart: its error, which must
// stay (a fault); where it works, out must hold the tile, p's allocation
// starting at base and holding 0, 1, ... (device_counting).
cudaError_t load_a(const float *base, const float *p, unsigned ldm) {
  float *eye = device_eye(), *out = device<float>(256), h[256];
  PA_LAUNCH(k_load_a, 1, 32, 0)(p, ldm, eye, out);
  const cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    assert_int_equal(cudaGetLastError(), e); // a fault stays
    assert_int_equal(cudaStreamSynchronize(stream), e);
    return e;
  }
  cudaMemcpyAsync(h, out, sizeof h, cudaMemcpyDeviceToHost, stream);
  for (unsigned r = 0; r < 16; r++)
    for (unsigned n = 0; n < 16; n++) {
      const float want = n < 8 ? (float)(p - base + r * ldm + n) : 0.0f;
      if (h[r * 16 + n] != want)
        fail_msg("ldm %u: out(%u, %u) = %g, want %g", ldm, r, n, h[r * 16 + n], want);
    }
  cudaFree(eye), cudaFree(out);
  return e;
}

// n floats of device memory holding 0, 1, ... (small integers: tf32 values).
float *device_counting(size_t n) {
  float *h = (float *)malloc(n * sizeof *h), *d = device<float>(n);
  for (size_t i = 0; i < n; i++)
    h[i] = (float)i;
  cudaMemcpyAsync(d, h, n * sizeof *h, cudaMemcpyHostToDevice, stream);
  free(h);
  return d;
}

// k_shared_tile with n floats of dynamic shared memory: its error, which
// must stay; where it works, out must hold the tile at `at`.
cudaError_t shared_tile(unsigned n, unsigned at) {
  float *out = device<float>(256), h[256];
  PA_LAUNCH(k_shared_tile, 1, 64, n * sizeof(float))(n, at, out);
  const cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    assert_int_equal(cudaGetLastError(), e);
    return e;
  }
  cudaMemcpyAsync(h, out, sizeof h, cudaMemcpyDeviceToHost, stream);
  for (unsigned i = 0; i < 256; i++)
    if (h[i] != (float)(at + i))
      fail_msg("shared memory of %u floats, the tile at %u: element %u is %g", n, at, i, h[i]);
  cudaFree(out);
  return e;
}

// A 16x16 bf16 matrix's element (r, c) stored with leading dimension ld.
size_t at16(bool col, unsigned ld, unsigned r, unsigned c) { return col ? (size_t)c * ld + r : (size_t)r * ld + c; }

// k_mma16 on A and B (16 x ld bf16 values each) and C (16 x 20 floats): its
// error; D where it worked.
cudaError_t mma16(bool a_col, bool b_col, const __nv_bfloat16 *A, const __nv_bfloat16 *B, unsigned ld, const float *C,
                  float *D, bool c_col, size_t a_offset = 0) {
  const size_t n16 = 16 * (size_t)ld + 16;
  __nv_bfloat16 *dA = device<__nv_bfloat16>(n16), *dB = device<__nv_bfloat16>(n16);
  float *dC = device<float>(16 * 20), *dD = device<float>(16 * 20);
  cudaMemcpyAsync(dA + a_offset, A, 16 * ld * sizeof *A, cudaMemcpyHostToDevice, stream);
  cudaMemcpyAsync(dB, B, 16 * ld * sizeof *B, cudaMemcpyHostToDevice, stream);
  cudaMemcpyAsync(dC, C, 16 * 20 * sizeof *C, cudaMemcpyHostToDevice, stream);
  const wmma::layout_t lc = c_col ? wmma::mem_col_major : wmma::mem_row_major;
  PA_LAUNCH(k_mma16, 1, 32, 0)(a_col, b_col, dA + a_offset, dB, ld, dC, dD, 20, lc);
  const cudaError_t e = cudaStreamSynchronize(stream);
  if (e == cudaSuccess)
    cudaMemcpyAsync(D, dD, 16 * 20 * sizeof *D, cudaMemcpyDeviceToHost, stream);
  else
    assert_int_equal(cudaGetLastError(), e); // a fault stays
  cudaFree(dA), cudaFree(dB), cudaFree(dC), cudaFree(dD);
  return e;
}

void test_mma_bf16(void **) {
  const unsigned ld = 24; // 48 bytes: a multiple of 16
  __nv_bfloat16 A[16 * ld], B[16 * ld];
  float a[16][16], b[16][16], C[16 * 20], D[16 * 20];
  for (int a_col = 0; a_col < 2; a_col++)
    for (int b_col = 0; b_col < 2; b_col++)
      for (int c_col = 0; c_col < 2; c_col++) {
        for (unsigned r = 0; r < 16; r++)
          for (unsigned c = 0; c < 16; c++) {
            A[at16(a_col, ld, r, c)] = __float2bfloat16_rn(uniform()),
                                 a[r][c] = __bfloat162float(A[at16(a_col, ld, r, c)]);
            B[at16(b_col, ld, r, c)] = __float2bfloat16_rn(uniform()),
                                 b[r][c] = __bfloat162float(B[at16(b_col, ld, r, c)]);
          }
        for (float &c : C) // the accumulator is fp32
          c = uniform();
        assert_int_equal(mma16(a_col, b_col, A, B, ld, C, D, c_col), cudaSuccess);
        for (unsigned r = 0; r < 16; r++)
          for (unsigned n = 0; n < 16; n++) {
            const size_t c_at = c_col ? (size_t)n * 20 + r : (size_t)r * 20 + n;
            double want = C[c_at], magnitude = fabs(want);
            for (unsigned k = 0; k < 16; k++)
              want += (double)a[r][k] * b[k][n], magnitude += fabs((double)a[r][k] * b[k][n]);
            // a product of two bf16 values is exact in fp32; the 16 sums,
            // each truncated, lose under 2 u of it: at most 32 u sum|term|
            const double tol = 16 * 0x1p-23 * magnitude;
            if (!(fabs(D[c_at] - want) <= tol))
              fail_msg("A %s B %s C %s: D(%u, %u) = %.9g, want %.9g within %.2g", a_col ? "col" : "row",
                       b_col ? "col" : "row", c_col ? "col" : "row", r, n, D[c_at], want, tol);
          }
      }
  // the sums truncated: 1 + 1.5 2^-24 (3/4 of an ulp over 1) is 1, where rounded it would be 1 + 2^-23
  memset(A, 0, sizeof A), memset(B, 0, sizeof B), memset(C, 0, sizeof C);
  A[at16(false, ld, 4, 1)] = __float2bfloat16_rn(0x1.8p-24f), B[at16(false, ld, 1, 4)] = __float2bfloat16_rn(1);
  C[4 * 20 + 4] = 1;
  assert_int_equal(mma16(false, false, A, B, ld, C, D, false), cudaSuccess);
  if (D[4 * 20 + 4] != 1.0f)
    fail_msg("1 + 1.5 2^-24 summed to %a, want 1 (truncated)", D[4 * 20 + 4]);
}

void test_accumulator_lanes_bf16(void **) {
  float *d = device<float>(256), h[256], *d8 = device<float>(512), h8[512];
  PA_LAUNCH(k_fragment_lanes16, 1, 32, 0)(d);
  PA_LAUNCH(k_fragment_lanes, 1, 32, 0)(d8);
  assert_int_equal(cudaGetLastError(), cudaSuccess);
  cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, stream);
  cudaMemcpyAsync(h8, d8, 256 * sizeof *h8, cudaMemcpyDeviceToHost, stream);
  int seen[256] = {0}, same = 0;
  for (int i = 0; i < 256; i++) {
    if (!(h[i] >= 0 && h[i] < 256 && h[i] == (int)h[i]))
      fail_msg("tile element %d is %g, no lane's element", i, h[i]);
    seen[(int)h[i]]++;
    same += h[i] == h8[i];
  }
  for (int v = 0; v < 256; v++)
    if (seen[v] != 1)
      fail_msg("lane %d's element %d is in the tile %d times", v / 8, v % 8, seen[v]);
  // the two shapes' mappings differ: a kernel taking one for the other fails
  fprintf(stderr, "    %d of 256 elements where m16n16k8's accumulator has them\n", same);
  assert_true(same < 256);
}

void test_mma_refusals(void **) {
  // in an allocation of 16x8 floats and 8 more: at its start and 8 floats
  // (32 bytes) on, the tile fits; 1 float (4 bytes) on, it is misaligned
  float *d = device_counting(16 * 8 + 8);
  assert_int_equal(load_a(d, d, 8), cudaSuccess);
  assert_int_equal(load_a(d, d + 8, 8), cudaSuccess);
  assert_int_equal(load_a(d, d + 1, 8), cudaErrorMisalignedAddress);
  reset(nullptr);
  d = device_counting(16 * 8 + 8); // 16 bytes on: aligned for a float4, not for a tile
  assert_int_equal(load_a(d, d + 4, 8), cudaErrorMisalignedAddress);
  reset(nullptr);
  // a leading dimension of 10 floats: rows 40 bytes apart, not a multiple of 16
  d = device_counting(16 * 12);
  assert_int_equal(load_a(d, d, 12), cudaSuccess);
  assert_int_equal(load_a(d, d, 10), cudaErrorMisalignedAddress);
  reset(nullptr);
  // 16 rows 12 apart reach 15 x 12 + 8 = 188 floats: past 187, inside 188
  d = device_counting(187);
  assert_int_equal(load_a(d, d, 12), cudaErrorIllegalAddress);
  reset(nullptr);
  d = device_counting(188);
  assert_int_equal(load_a(d, d, 12), cudaSuccess);
  // dynamic shared memory: a 16x16 tile 8 floats on needs 264 of them
  assert_int_equal(shared_tile(264, 8), cudaSuccess);
  assert_int_equal(shared_tile(256, 0), cudaSuccess);
  assert_int_equal(shared_tile(263, 8), cudaErrorIllegalAddress);
  // bf16 tiles: 32 bytes (16 values) on, aligned; 16 bytes (8 values) on, not; a
  // leading dimension of 20 values (40 bytes) is not a multiple of 16 bytes
  reset(nullptr);
  __nv_bfloat16 A[16 * 24] = {}, B[16 * 24] = {};
  float C[16 * 20] = {}, D[16 * 20];
  assert_int_equal(mma16(false, false, A, B, 24, C, D, false, 16), cudaSuccess);
  assert_int_equal(mma16(false, false, A, B, 24, C, D, false, 8), cudaErrorMisalignedAddress);
  reset(nullptr);
  assert_int_equal(mma16(false, false, A, B, 20, C, D, false), cudaErrorMisalignedAddress);
}


// ---- NCCL between processes ------------------------------------------------------------------

char group_dir[] = "/tmp/palign-test-nccl-XXXXXX"; // TMPDIR while the tests run: the groups' files

// Whether the groups left nothing in group_dir.
bool groups_gone() {
  DIR *d = opendir(group_dir);
  bool empty = d != nullptr;
  while (const dirent *e = d ? readdir(d) : nullptr)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
      empty = false;
  if (d)
    closedir(d);
  return empty;
}

// Runs body(rank) in n forked processes; each one's exit status, 99 where it did not exit.
template <class F> std::vector<int> members(int n, F body) {
  fflush(stdout), fflush(stderr);
  std::vector<pid_t> pids;
  for (int r = 0; r < n; r++) {
    const pid_t p = fork();
    if (p == 0)
      _exit(body(r));
    pids.push_back(p);
  }
  std::vector<int> codes;
  for (pid_t p : pids) {
    int st = 0;
    codes.push_back(waitpid(p, &st, 0) == p && WIFEXITED(st) ? WEXITSTATUS(st) : 99);
  }
  return codes;
}

// Member `rank` of a group of n, on `device`: `gathers` all-gathers of `count`
// floats (rank's own, or count + rank where `uneven`), member r's value i of
// gather g being 1000 r + 100 g + i. 0 when every call worked and every
// value is in its place; 10 + the result where joining failed, 20 + it where
// a gather did, 1 for a wrong value.
int gather_member(const ncclUniqueId &id, int n, int rank, int device, size_t count, bool in_place, int gathers,
                  bool uneven = false) {
  if (cudaSetDevice(device) != cudaSuccess)
    return 2;
  ncclComm_t comm;
  ncclResult_t r = ncclCommInitRank(&comm, n, id, rank);
  if (r != ncclSuccess)
    return 10 + r;
  const size_t mine = uneven ? count + rank : count;
  float *recv = nullptr, *send = nullptr;
  if (cudaMalloc(&recv, mine * n * sizeof(float)) || cudaMalloc(&send, mine * sizeof(float)))
    return 3;
  float *from = in_place ? recv + mine * rank : send;
  int code = 0;
  std::vector<float> v(mine * n);
  for (int g = 0; g < gathers && !code; g++) {
    for (size_t i = 0; i < mine; i++)
      v[i] = (float)(1000 * rank + 100 * g + (int)i);
    cudaMemcpyAsync(from, v.data(), mine * sizeof(float), cudaMemcpyHostToDevice, stream);
    if ((r = ncclAllGather(from, recv, mine, ncclFloat, comm, stream)) != ncclSuccess) {
      code = 20 + r;
      break;
    }
    cudaMemcpyAsync(v.data(), recv, mine * n * sizeof(float), cudaMemcpyDeviceToHost, stream);
    for (int m = 0; m < n; m++)
      for (size_t i = 0; i < mine; i++)
        code |= v[m * mine + i] != (float)(1000 * m + 100 * g + (int)i);
  }
  ncclCommDestroy(comm);
  return code;
}

ncclUniqueId new_id() {
  ncclUniqueId id;
  assert_int_equal(ncclGetUniqueId(&id), ncclSuccess);
  return id;
}

void test_nccl_allgather(void **) {
  for (bool in_place : {false, true}) {
    const ncclUniqueId id = new_id();
    const std::vector<int> codes = members(3, [&](int r) { return gather_member(id, 3, r, r, 5, in_place, 2); });
    for (int c : codes)
      assert_int_equal(c, 0);
    assert_true(groups_gone());
  }
  const ncclUniqueId id = new_id(); // a group of one: no other process
  assert_int_equal(gather_member(id, 1, 0, 0, 7, false, 3), 0);
  assert_true(groups_gone());
}

void test_nccl_refusals(void **) {
  ncclUniqueId id = new_id();
  std::vector<int> codes = members(2, [&](int r) { return gather_member(id, 2, r, 1, 5, false, 1); });
  assert_int_equal(codes[0], 10 + ncclInvalidUsage); // both on device 1: NCCL's duplicate GPU
  assert_int_equal(codes[1], 10 + ncclInvalidUsage);
  id = new_id();
  codes = members(2, [&](int r) { return gather_member(id, 2 + r, r, r, 5, false, 1); });
  assert_int_equal(codes[0], 10 + ncclInvalidUsage); // a group of 2 and one of 3
  assert_int_equal(codes[1], 10 + ncclInvalidUsage);
  id = new_id();
  codes = members(2, [&](int r) { return gather_member(id, 2, r, r, 5, false, 1, true); });
  assert_int_equal(codes[0], 20 + ncclInvalidUsage); // 5 floats and 6
  assert_int_equal(codes[1], 20 + ncclInvalidUsage);
  assert_true(groups_gone());

  ncclComm_t comm;
  id = new_id();
  assert_int_equal(ncclCommInitRank(&comm, 1, id, 1), ncclInvalidArgument);
  ncclUniqueId forged = {};
  strcpy(forged.internal, "/tmp/somewhere");
  assert_int_equal(ncclCommInitRank(&comm, 1, forged, 0), ncclInvalidArgument);
  assert_int_equal(ncclCommInitRank(&comm, 1, id, 0), ncclSuccess);
  float *buf = device<float>(8), host[8] = {0};
  assert_int_equal(ncclAllGather(host, buf, 8, ncclFloat, comm, stream), ncclInvalidArgument);
  assert_int_equal(ncclAllGather(buf, host, 8, ncclFloat, comm, stream), ncclInvalidArgument);
  assert_int_equal(ncclAllGather(buf, buf, 9, ncclFloat, comm, stream), ncclInvalidArgument); // past recv
  assert_int_equal(ncclAllGather(buf + 1, buf, 4, ncclFloat, comm, stream), ncclInvalidArgument); // overlap
  assert_int_equal(ncclAllGather(buf, buf, 4, (ncclDataType_t)42, comm, stream), ncclInvalidArgument);
  assert_int_equal(ncclAllGather(buf, buf, 8, ncclFloat, comm, stream), ncclSuccess); // in place
  assert_int_equal(ncclCommDestroy(comm), ncclSuccess);
  assert_int_equal(ncclAllGather(buf, buf, 8, ncclFloat, comm, stream), ncclInvalidArgument);
  assert_int_equal(ncclCommDestroy(comm), ncclInvalidArgument);
  assert_true(groups_gone());
}

} // namespace

int main() {
  // NCCL's groups in a directory of the tests' own, on four emulated devices of 256 MiB (test_memory_limit)
  if (!mkdtemp(group_dir) || setenv("TMPDIR", group_dir, 1) || setenv("PALIGN_EMU_DEVICES", "4", 1) ||
      setenv("PALIGN_EMU_MEMORY", "256M", 1))
    return 1;
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup(test_indices, reset),
      cmocka_unit_test_setup(test_barrier_orders, reset),
      cmocka_unit_test_setup(test_divergent_barrier, reset),
      cmocka_unit_test_setup(test_refusals, reset),
      cmocka_unit_test_setup(test_memory_starts_nan, reset),
      cmocka_unit_test_setup(test_stream_order, reset),
      cmocka_unit_test_setup(test_event_timing, reset),
      cmocka_unit_test_setup(test_gemm, reset),
      cmocka_unit_test_setup(test_malloc_aligned, reset),
      cmocka_unit_test_setup(test_memory_limit, reset),
      cmocka_unit_test_setup(test_mma, reset),
      cmocka_unit_test_setup(test_tf32_rounding, reset),
      cmocka_unit_test_setup(test_mma_truncates, reset),
      cmocka_unit_test_setup(test_accumulator_lanes, reset),
      cmocka_unit_test_setup(test_mma_bf16, reset),
      cmocka_unit_test_setup(test_accumulator_lanes_bf16, reset),
      cmocka_unit_test_setup(test_mma_refusals, reset),
      cmocka_unit_test_setup(test_nccl_allgather, reset),
      cmocka_unit_test_setup(test_nccl_refusals, reset),
  };
  const int failed = cmocka_run_group_tests(tests, nullptr, nullptr);
  rmdir(group_dir);
  return failed;
}
