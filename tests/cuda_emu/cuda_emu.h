// cuda_emu.h: the part of the CUDA runtime, cuBLAS and cuda_bf16.h that
// the CUDA backend (kernels/cuda/*.cu) uses, carried out on the CPU. The
// tests build its modules a second time against it (tests/CMakeLists.txt:
// a .cc including each), so the CUDA backend's own code, its kernels and
// the host code around them, runs in every test run on machines without a
// GPU and is compared with the CPU backend by the gpu tests' own checks
// (docs/CUDA.md, "Without a GPU").
//
// What it models, and checks where a GPU would fail or misbehave:
//  - device memory: cudaMalloc returns host memory, 256-byte aligned as a
//    GPU's, filled with 0xFF bytes (NaN as floats: a read of memory nobody
//    wrote shows), registered as device memory. Copies check their
//    direction (a host pointer where the device's is wanted is an error,
//    and the other way round) and bounds, and so does a memset;
//    a kernel's pointer arguments must be device memory (or null); cuBLAS's
//    operands must be device memory holding every element the call reads or
//    writes through its leading dimensions. In a sanitizer build a kernel's
//    reads and writes past an allocation are caught by AddressSanitizer.
//  - kernels: every block of the grid in turn, every thread of a block a
//    fibre (cuda_emu.cc) that runs until it ends or reaches __syncthreads();
//    a barrier lets no thread on before every live thread of the block has
//    reached it, and between two barriers the threads run in a shuffled
//    order (seeded, so a run repeats), so that a read of another thread's
//    write that no barrier orders gives a wrong answer rather than a lucky
//    one. A __syncthreads() that some threads of a block never reach, a
//    block of over 1,024 threads, a grid beyond its limits and more dynamic
//    shared memory than the kernel was allowed (48 KiB unless
//    cudaFuncSetAttribute raised it, up to the H100's 227 KiB) are errors.
//    Dynamic shared memory (128-byte aligned) is filled with NaN at each
//    block's start; a
//    static __shared__ array is a static here and keeps what the last block
//    left (the backend's kernels write theirs whole before reading them).
//    A kernel's pointer arguments must all be device memory, used or not.
//  - one stream, run as late as CUDA allows: kernels, cuBLAS's products,
//    memsets, copies between device buffers and copies from pinned host memory
//    (cudaHostAlloc) are queued and run, in order, only when the host waits
//    for them (cudaStreamSynchronize; cudaEventSynchronize, up to the
//    event; a copy into pageable host memory; cudaFree; cudaFreeHost; an
//    NCCL collective, which runs at the call). A copy from pageable memory
//    takes its source when it is called (one of the ways CUDA's staging
//    may go). So a host that reuses pinned memory before the stream has
//    read it, or reads a result it did not wait for, sees the wrong data.
//    A kernel's fault shows when the host waits, as on a GPU; an event's
//    "not ready" is kept as the last error, as the runtime has been seen
//    to keep it. A timing event holds the host's clock when the stream
//    reached it (cudaEventElapsedTime: the emulation's own time, not a
//    GPU's).
//  - cuBLAS's column-major products through OpenBLAS (its sgemm, on fp32
//    copies of bf16 operands, which are exact), with cuBLAS's checks of the
//    arguments.
//  - the warp matrix functions (mma.h): m16n16k8 tf32 products, their sums
//    truncated as the tensor cores' are, their pointers' alignment and
//    leading dimensions checked.
//  - devices: one, or PALIGN_EMU_DEVICES (1 to 16) sharing the host's
//    memory; cudaSetDevice records which a process is on. A process's
//    device memory is PALIGN_EMU_MEMORY bytes (80 GiB unless set):
//    cudaMalloc refuses what would take its live allocations past it, and
//    cudaMemGetInfo tells what is left.
//  - NCCL's communicators and all-gather between processes on one machine
//    (nccl_emu.cc), refusing what NCCL would refuse or get wrong: two
//    members on one device, members disagreeing on the group's size or the
//    count, buffers outside device memory.
// What it cannot show: speed, a GPU running work sooner than the emulation
// does (legal, and harmless to code that waits), warp-level behaviour other than the matrix
// functions' (the backend uses no other), races inside a stretch between
// barriers finer than a whole thread's run, and cuBLAS's and the tensor
// cores' own order of sums.
//
// An error is returned as the real call would return it, and its detail is
// printed on standard error, since cudaGetErrorString has only the code.
#ifndef PALIGN_CUDA_EMU_H
#define PALIGN_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- the language ----------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __shared__ static // one block runs at a time: a static is the block's own
#define PA_LAUNCH(kernel, grid, block, shared) ::emu::launch(kernel, #kernel, (grid), (block), (shared), stream)
#define PA_DYNAMIC_SHARED(type, name) type *name = static_cast<type *>(::emu::dynamic_shared())

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

void __syncthreads();
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// Double arithmetic rounded as written, never fused (the result goes through memory, so that no
// compiler contracts a product and a sum into a fused multiply-add, as nvcc never does these).
inline double __dadd_rn(double a, double b) {
  volatile double r = a + b;
  return r;
}
inline double __dsub_rn(double a, double b) {
  volatile double r = a - b;
  return r;
}
inline double __dmul_rn(double a, double b) {
  volatile double r = a * b;
  return r;
}
inline double __ddiv_rn(double a, double b) {
  volatile double r = a / b;
  return r;
}
inline double __dsqrt_rn(double a) { return sqrt(a); }

struct __nv_bfloat16 {
  uint16_t bits;
};
// Round to nearest, ties to even; a NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u)
    return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
  return __nv_bfloat16{(uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// ---- the runtime -----------------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
typedef struct emu_stream *cudaStream_t;
typedef struct emu_event *cudaEvent_t;
#define cudaEventDefault       0x00u
#define cudaEventDisableTiming 0x02u
#define cudaHostAllocDefault   0x00u

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);
cudaError_t cudaRuntimeGetVersion(int *v);
cudaError_t cudaDriverGetVersion(int *v);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaMalloc(void **p, size_t bytes);
template <class T> cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **)p, bytes); }
cudaError_t cudaFree(void *p);                                     // waits for the stream first, as CUDA's does
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes); // PALIGN_EMU_MEMORY's, less the live allocations
cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags); // pinned host memory
cudaError_t cudaFreeHost(void *p);                                 // waits for the stream first
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);
// cudaErrorNotReady until the stream has run up to it, which cudaGetLastError
// then returns too (as the runtime has been seen to)
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventSynchronize(cudaEvent_t e); // runs the stream up to the event
// ms between the times the stream reached start and end (the host's clock,
// as the emulation runs them): cudaErrorNotReady until both are complete,
// cudaErrorInvalidResourceHandle for one never recorded or made with
// cudaEventDisableTiming, as CUDA's
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s);
// queued on the stream as a copy between device buffers is; dst must be bytes of device memory
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s);
cudaError_t cudaFuncSetAttribute(const void *kernel, cudaFuncAttribute attr, int value);
cudaError_t
cudaDeviceReset(); // ends the device's state: allocations (pinned too), streams, events, handles, queued work, a fault
cudaError_t cudaGetLastError();
const char *cudaGetErrorString(cudaError_t e);

// ---- cuBLAS ----------------------------------------------------------------------------

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2 };
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68 };
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
typedef struct emu_blas *cublasHandle_t;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode);
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                            cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);

// ---- NCCL (nccl_emu.cc) -------------------------------------------------------------------

enum ncclResult_t {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
};
enum ncclDataType_t {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
};
#define NCCL_UNIQUE_ID_BYTES 128
struct ncclUniqueId {
  char internal[NCCL_UNIQUE_ID_BYTES];
};
typedef struct emu_nccl_comm *ncclComm_t;

ncclResult_t ncclGetUniqueId(ncclUniqueId *id);
ncclResult_t ncclCommInitRank(ncclComm_t *comm, int n, ncclUniqueId id, int rank);
ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t s);
ncclResult_t ncclCommCount(const ncclComm_t comm, int *count);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
const char *ncclGetErrorString(ncclResult_t r);

// ---- the emulation's parts, for one another ------------------------------------------------

namespace emu {

// Whether [p, p + bytes) lies inside one device allocation.
bool device_range(const void *p, size_t bytes);
// Whether s is the default stream or one created and not destroyed.
bool stream_valid(cudaStream_t s);
// A kernel's fault, which every later call returns, or cudaSuccess.
cudaError_t pending_fault();
// The device cudaSetDevice chose (0 until it is called).
int current_device();
// An error's detail, on standard error after "cuda emulation: ".
__attribute__((format(printf, 1, 2))) void report(const char *fmt, ...);
// Queues op on the stream, to run when the host next waits for it.
void enqueue(std::function<void()> op);
// Runs what the stream holds (the host waits for it); after a fault the
// rest is dropped, as a GPU's context drops it.
void run_queued();
// The same, as far as the first point at which reached() holds.
void run_until(const std::function<bool()> &reached);

} // namespace emu

// ---- launching a kernel ------------------------------------------------------------------

namespace emu {

// Whether a launch's configuration is one the device runs; records the
// launch error otherwise (or false after a fault).
bool launch_ok(const void *kernel, const char *name, dim3 grid, dim3 block, size_t shared, cudaStream_t s);
// Runs body(ctx) as every thread of every block of the grid (see the top).
void run_grid(const char *name, dim3 grid, dim3 block, size_t shared, void (*body)(void *), void *ctx);
// The launch's dynamic shared memory, for the block running.
void *dynamic_shared();
// Whether a kernel's pointer argument is device memory or null; records a
// launch error naming the kernel and the argument otherwise.
bool device_argument(const char *kernel, int index, const void *p);

template <class T> bool argument_ok(const char *kernel, int index, const T &v) {
  if constexpr (std::is_pointer_v<T>)
    return device_argument(kernel, index, (const void *)v);
  else
    return true;
}

template <class... P> struct launcher {
  void (*kernel)(P...);
  const char *name;
  dim3 grid, block;
  size_t shared;
  cudaStream_t stream;

  template <class... A> void operator()(A &&...a) const {
    static_assert(sizeof...(A) == sizeof...(P), "a kernel launch with the wrong number of arguments");
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    if (!launch_ok((const void *)kernel, name, grid, block, shared, stream) ||
        !check(args, std::index_sequence_for<P...>{}))
      return;
    enqueue([kernel = kernel, name = name, grid = grid, block = block, shared = shared, args] {
      auto body = [&] { std::apply(kernel, args); };
      run_grid(
          name, grid, block, shared, [](void *c) { (*static_cast<decltype(body) *>(c))(); }, &body);
    });
  }

  template <class Tuple, size_t... I> bool check(const Tuple &args, std::index_sequence<I...>) const {
    return (argument_ok(name, (int)I, std::get<I>(args)) && ...);
  }
};

template <class... P>
launcher<P...> launch(void (*kernel)(P...), const char *name, dim3 grid, dim3 block, size_t shared, cudaStream_t s) {
  return launcher<P...>{kernel, name, grid, block, shared, s};
}

} // namespace emu

#endif
