// cuda_backend.cu: the CUDA backend (cuda_backend.h): the device in use,
// its stream and cuBLAS handles, the failures kept for status(), device
// memory, the device buffers kept between calls and the kernels'
// shared-memory allowances (both the device's: a change of device frees
// and resets them), and the operation table the other modules' operations
// fill (cuda_internal.cuh lists them).
#include "cuda_internal.cuh"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace palign_cuda {

char last_error[256];
bool op_failed;
bool ready;
int device_used = -1;
int sm_count = 1;
cudaStream_t stream;
cublasHandle_t blas;
cublasHandle_t blas16;
unsigned long host_waits;

void failed(const char *fmt, ...) {
  if (!op_failed) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
  }
  op_failed = true;
}

bool check(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return true;
  failed("%s: %s", what, cudaGetErrorString(e));
  return false;
}

bool check_blas(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS)
    return true;
  failed("%s: %s", what, cublasGetStatusString(s));
  return false;
}

void launched(const char *what) { check(cudaGetLastError(), what); }

bool wait_stream(const char *what) {
  host_waits++;
  return check(cudaStreamSynchronize(stream), what);
}

namespace {

kept_buffer *kept; // every buffer reserve() was asked to grow

// What each kernel is allowed, for the device in use (shared_for).
size_t shared_set[kShKernels];
int shared_max; // the device's opt-in limit, bytes

// Every kept buffer freed: they belong to the device being left.
void release_kept_buffers() {
  for (kept_buffer *b = kept; b; b = b->next) {
    cudaFree(b->p);
    b->p = nullptr, b->cap = 0;
  }
}

// bytes as text in s (32 chars): "812 bytes", "3.4 kB", "18.2 MB", "79.6 GB" (powers of 1,000)
const char *size_text(size_t bytes, char *s) {
  const double b = (double)bytes;
  if (b < 1e3)
    snprintf(s, 32, "%zu bytes", bytes);
  else
    snprintf(s, 32, "%.1f %s", b < 1e6 ? b / 1e3 : b < 1e9 ? b / 1e6 : b / 1e9, b < 1e6 ? "kB" : b < 1e9 ? "MB" : "GB");
  return s;
}

// Why cudaMalloc refused bytes (e), into s: out of memory, the device's
// account (cudaMemGetInfo's, at the refusal); else the runtime's error. The
// refusal is not left for the next launch's check.
void refusal(cudaError_t e, size_t bytes, char *s, size_t n) {
  cudaGetLastError();
  size_t free_bytes, total_bytes;
  char want[32], have[32], all[32];
  if (e == cudaErrorMemoryAllocation && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess)
    snprintf(s, n, "device %d: %s asked for, %s free of its %s", device_used, size_text(bytes, want),
             size_text(free_bytes, have), size_text(total_bytes, all));
  else
    snprintf(s, n, "%s asked for: %s", size_text(bytes, want), cudaGetErrorString(e));
}

} // namespace

bool reserve(kept_buffer &b, size_t bytes, const char *what) {
  if (bytes <= b.cap)
    return true;
  if (!b.listed) {
    b.next = kept, b.listed = true;
    kept = &b;
  }
  cudaFree(b.p); // waits for the work that may still read it
  b.p = nullptr, b.cap = 0;
  const cudaError_t e = cudaMalloc(&b.p, bytes);
  if (e != cudaSuccess) {
    char why[160];
    refusal(e, bytes, why, sizeof why);
    if (e == cudaErrorMemoryAllocation)
      failed("%s: no memory (%s)", what, why);
    else
      failed("%s: %s", what, why);
    return false;
  }
  b.cap = bytes;
  return true;
}

bool shared_for(const void *kernel, int which, size_t bytes, const char *what, int keys) {
  if (bytes <= 48 << 10 || bytes <= shared_set[which])
    return true;
  if (bytes > (size_t)shared_max) {
    if (keys)
      failed("%s: the longest row's %d keys need %zu bytes of shared memory, the device allows %d", what, keys, bytes,
             shared_max);
    else
      failed("%s: %zu bytes of shared memory a block, the device allows %d", what, bytes, shared_max);
    return false;
  }
  if (!check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what))
    return false;
  shared_set[which] = bytes;
  return true;
}

namespace {

// An allocation's failure is its NULL (the caller reports it), not an
// operation's: it is not kept for status(); error() says why.
void *cu_alloc(size_t bytes) {
  void *p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
  if (e == cudaSuccess)
    return p;
  refusal(e, bytes, last_error, sizeof last_error);
  return nullptr;
}

void cu_release(void *p) {
  if (p)
    check(cudaFree(p), "free");
}

void cu_upload(void *dst, const void *src, size_t bytes) { stage_copy(dst, src, bytes, "upload"); }

void cu_download(void *dst, const void *src, size_t bytes) {
  {
    const timed t("download", 0.0, (double)bytes);
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), "download");
  }
  wait_stream("download");
}

void cu_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height) {
  if (!width || !height)
    return;
  const timed t("copy2d", 0.0, 2.0 * width * height);
  if (height == 1 || (dpitch == width && spitch == width)) // one block: no pitch limit (2^31 bytes for 2D copies)
    check(cudaMemcpyAsync(dst, src, width * height, cudaMemcpyDeviceToDevice, stream), "copy2d");
  else
    check(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToDevice, stream), "copy2d");
}

void cu_zero(void *dst, size_t bytes) {
  if (!bytes)
    return;
  const timed t("zero", 0.0, (double)bytes);
  check(cudaMemsetAsync(dst, 0, bytes, stream), "zero");
}

const char *cu_error() { return last_error; }

int cu_status() {
  wait_stream("the queued operations");
  const bool f = op_failed;
  op_failed = false;
  return f ? -1 : 0;
}

const pa_backend cuda_backend = {
    "cuda",
    cu_matmul,
    cu_rmsnorm,
    cu_rope,
    cu_swiglu,
    cu_embed,
    cu_add,
    cu_add_bias,
    cu_attention_scratch,
    cu_attention,
    cu_scale,
    cu_matmul_nn,
    cu_matmul_tn_acc,
    cu_rmsnorm_backward,
    cu_rope_backward,
    cu_swiglu_backward,
    cu_attention_train_scratch,
    cu_attention_train,
    cu_attention_backward,
    cu_adamw,
    cu_matmul_bf16,
    cu_matmul_nn_bf16,
    cu_embed_bf16,
    cu_alloc,
    cu_release,
    cu_upload,
    cu_download,
    cu_copy2d,
    cu_zero,
    0, /* device memory */
#ifdef PALIGN_HAVE_NCCL
    kGroupIdBytes,
    cu_group_id,
    cu_group_join,
    cu_group_allgather,
    cu_group_leave,
#else
    0, /* no groups: the ranks exchange through MPI */
    nullptr,
    nullptr,
    nullptr,
    nullptr,
#endif
    cu_error,
    cu_status,
};

} // namespace
} // namespace palign_cuda

using namespace palign_cuda;

extern "C" {

int pa_cuda_devices(void) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess)
    return n;
  cudaGetLastError();
  if (e == cudaErrorNoDevice)
    return 0;
  /* the runtime loads the driver (libcuda.so.1) itself: when it is not
   * there, this is a machine without a GPU; when it is, the driver cannot
   * serve this runtime (older than the toolkit palign was built with, or a
   * broken install), and that must not pass for "no GPU" */
  void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (!driver) {
    snprintf(last_error, sizeof last_error, "no CUDA driver (libcuda.so.1 is not installed)");
    return 0;
  }
  dlclose(driver);
  int runtime = 0, have = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&have);
  snprintf(last_error, sizeof last_error,
           "the CUDA driver cannot be used: %s (driver for CUDA %d.%d, palign built with %d.%d)", cudaGetErrorString(e),
           have / 1000, have % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
  return -1;
}

int pa_cuda_select(int device) {
  const int n = pa_cuda_devices();
  if (n < 0)
    return -1;
  if (device < 0 || device >= n) {
    snprintf(last_error, sizeof last_error, "no CUDA device %d (%d visible)", device, n);
    return -1;
  }
  if (ready && device == device_used)
    return 0;
  const bool was_profiling = profiling;
  if (ready) {
    pa_cuda_profile(0); // the spans still in the pool counted
    stage_close();
    cublasDestroy(blas);
    cublasDestroy(blas16);
    cudaStreamDestroy(stream);
    release_kept_buffers();
    ready = false;
  }
  memset(shared_set, 0, sizeof shared_set); // a kernel's allowance is the device's
  // set and empty: as unset. Not mma_bf16: its outputs are not the CPU's fp32 attention, and a bank or a
  // store made with it would pass for one that is (bench_cuda and the tests choose it by pa_cuda_attention_kernel)
  const char *kernel = getenv("PALIGN_CUDA_ATTENTION");
  if (kernel && *kernel && (!strcmp(kernel, "mma_bf16") || pa_cuda_attention_kernel(kernel) != 0)) {
    snprintf(last_error, sizeof last_error, "PALIGN_CUDA_ATTENTION=%.64s: not one of mma, tiled, simple%s", kernel,
             strcmp(kernel, "mma_bf16") ? "" : " (mma_bf16, not the CPU's fp32 attention, is for bench_cuda)");
    return -1;
  }
  if (!check(cudaSetDevice(device), "cudaSetDevice") || !check(cudaStreamCreate(&stream), "cudaStreamCreate") ||
      !check(cudaDeviceGetAttribute(&shared_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute") ||
      !check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute"))
    return -1;
  if (!check_blas(cublasCreate(&blas), "cublasCreate") ||
      !check_blas(cublasSetStream(blas, stream), "cublasSetStream") ||
      !check_blas(cublasSetMathMode(blas, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode") || /* no TF32 */
      !check_blas(cublasCreate(&blas16), "cublasCreate") ||
      !check_blas(cublasSetStream(blas16, stream), "cublasSetStream"))
    return -1;
  stage_open(); // without it, uploads wait for their copies
  device_used = device, ready = true, op_failed = false;
  if (was_profiling && pa_cuda_profile(1) != 0)
    return -1;
  return profile_from_env();
}

const pa_backend *pa_backend_cuda(void) {
  if (!ready && pa_cuda_select(0) != 0)
    return nullptr;
  return &cuda_backend;
}

size_t pa_cuda_backend_bytes(void) { return sizeof(pa_backend); }

const char *pa_cuda_error(void) { return last_error; }

unsigned long pa_cuda_host_waits(void) { return host_waits; }

} // extern "C"
