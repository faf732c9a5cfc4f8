// cuda_internal.cuh: what the CUDA backend's modules share, not for its
// users (they have cuda_backend.h). One stream, one cuBLAS handle for
// fp32 products and one for bf16, per process (cuda_backend.cu); the
// operations queue their work on that stream and return nothing, keeping
// the first failure's reason for status() (backend.h).
//
// The modules:
//   cuda_backend.cu         the device, its state and memory, status(), the operation table
//   cuda_staging.cu         uploads through a ring of pinned host memory
//   cuda_profile.cu         the device's time by operation (pa_cuda_profile)
//   cuda_matmul.cu          products by cuBLAS
//   cuda_rows.cu            elementwise and row operations, forward and backward
//   cuda_attention.cu       the inference attention's kernels and how a call is split among them
//   cuda_attention_train.cu the training attention, forward and backward
//   cuda_nccl.cu            collectives between the worker ranks' GPUs
//
// tests/cuda_emu builds each of them as C++ against an emulation of the
// CUDA runtime and cuBLAS, whose headers come first on its include path.
#pragma once

#include "cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stddef.h>

// Hidden from the library's users, who see cuda_backend.h's functions only
// (as when this was one file whose helpers were all its own).
#pragma GCC visibility push(hidden)

namespace palign_cuda {

// ---- the device in use (cuda_backend.cu) ----------------------------------------------

extern char last_error[256]; // the last failure's reason (pa_cuda_error)
extern bool op_failed;       // an operation failed since the last status() (its reason in last_error)
extern bool ready;           // a device is selected
extern int device_used;
extern int sm_count; // the device's multiprocessors
extern cudaStream_t stream;
extern cublasHandle_t blas;   // fp32 products: pedantic math, no TF32
extern cublasHandle_t blas16; // bf16 products: tensor cores, fp32 accumulation

constexpr int kBlock = 256;

inline unsigned blocks(size_t n) { return (unsigned)((n + kBlock - 1) / kBlock); }

// A kernel launch, and a kernel's dynamic shared memory, in two macros:
// tests/cuda_emu runs these files on the CPU with its own definitions of
// them (a C++ compiler has no <<< >>>).
#ifndef PA_LAUNCH
#define PA_LAUNCH(kernel, grid, block, shared) kernel<<<(grid), (block), (shared), stream>>>
#define PA_DYNAMIC_SHARED(type, name)          extern __shared__ __align__(128) type name[] // 32 for the matrix functions
#endif
// A loop nvcc unrolls whole, so that a small array indexed by its counter
// stays in registers (nothing for another compiler).
#ifdef __CUDACC__
#define PA_UNROLL _Pragma("unroll")
#else
#define PA_UNROLL
#endif

// A failure of an operation: the first one's reason is kept until status()
// reports it (the later ones usually follow from it).
__attribute__((format(printf, 1, 2))) void failed(const char *fmt, ...);
// false, the failure kept, where e (s) is not success; what names the call
bool check(cudaError_t e, const char *what);
bool check_blas(cublasStatus_t s, const char *what);
// Records a launch error; the operations return nothing, so it waits for status().
void launched(const char *what);

// The host waits for the stream only where it must: a download (its data),
// status() (its errors), a collective, and a staging chunk still being read
// (cuda_staging.cu). host_waits counts them (pa_cuda_host_waits), so the
// tests can hold a forward pass to one wait per download and one for its
// status.
extern unsigned long host_waits;
bool wait_stream(const char *what);

// A device buffer kept between calls (descriptors, the products' bf16 x),
// grown to hold what a call needs, never shrunk: growing frees the old
// one, which waits for the whole device. Every kept buffer is freed when
// the device changes.
struct kept_buffer {
  void *p;
  size_t cap;
  bool listed;       // on the kept buffers' list (from its first reserve on)
  kept_buffer *next; // the list's next
};
bool reserve(kept_buffer &b, size_t bytes, const char *what);

// The simple and training attention kernels keep a row's scores (one float
// a key) in dynamic shared memory, and the tensor cores' one its tiles for
// 4 heads: above 48 KB a kernel must be allowed more, up to the device's
// opt-in limit (227 KB on H100/H200: about 58,000 keys). Longer rows are
// refused (the operation fails, status() says so) rather than launched;
// `keys`, where not 0, says how many the refused row had. `which` names the
// kernel's allowance for the device in use.
enum { kShAttention, kShAttentionMma, kShAttentionMmaBf16, kShTrainFwd, kShTrainDq, kShKernels };
bool shared_for(const void *kernel, int which, size_t bytes, const char *what, int keys);

// ---- uploads (cuda_staging.cu) ----------------------------------------------------------

bool stage_open();  // false, and uploads waited for one by one, where pinned memory cannot be had
void stage_close(); // waits for the copies still reading the ring
// Queues a copy of bytes from host src to device dst; src may be reused at once.
void stage_copy(void *dst, const void *src, size_t bytes, const char *what);

// ---- the device's time by operation (cuda_profile.cu) ---------------------------------

extern bool profiling;
struct prof_span;
// A span begun (the profile on, none open, room in the pool); NULL otherwise.
prof_span *span_begin(const char *name, double flops, double bytes);
void span_end(prof_span *sp);
// The profile's name of an operation with a shape: formatted only while
// profiling (NULL otherwise), into a buffer the next call reuses.
__attribute__((format(printf, 1, 2))) const char *prof_name(const char *fmt, ...);
// On at selection when PALIGN_CUDA_PROFILE names a file; -1 with the reason in last_error.
int profile_from_env();
constexpr size_t kProfNameBytes = sizeof(pa_cuda_profile_row::name);

// An operation's span: from its construction to its end, while the profile
// is on, with its floating-point operations and the bytes it must move at
// least (cuda_backend.h's pa_cuda_profile_row). Spans do not nest: one
// begun inside another is not timed (the outer one holds its work).
class timed {
public:
  explicit timed(const char *name, double flops = 0.0, double bytes = 0.0) {
    if (profiling) // no call while the profile is off
      span_ = span_begin(name, flops, bytes);
  }
  ~timed() {
    if (span_)
      span_end(span_);
  }
  timed(const timed &) = delete;
  timed &operator=(const timed &) = delete;

private:
  prof_span *span_ = nullptr;
};

// ---- block reductions (the row operations, the attention kernels) -------------------------

// Block-wide sum of v (blockDim.x threads, a power of two; shared scratch
// of blockDim.x values), every thread's v added in the same tree each run.
template <class T> __device__ inline T block_sum(T v, T *red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const T r = red[0];
  __syncthreads();
  return r;
}

// The scores score[0..L) turned into exp(score - max) in place (the block's
// threads together; red: blockDim.x floats of shared scratch); returns their
// sum, and the max in *mx.
__device__ inline float softmax_unnormalised(float *score, int L, float *red, float *mx) {
  float m = -INFINITY;
  for (int t = threadIdx.x; t < L; t += blockDim.x)
    m = fmaxf(m, score[t]);
  red[threadIdx.x] = m;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  m = red[0];
  __syncthreads();
  float sum = 0;
  for (int t = threadIdx.x; t < L; t += blockDim.x)
    sum += score[t] = expf(score[t] - m);
  *mx = m;
  return block_sum(sum, red);
}

// ---- the operations, for the table in cuda_backend.cu ---------------------------------

// cuda_matmul.cu
void cu_matmul(int M, int N, int K, const float *x, const float *w, float beta, float *y);
void cu_matmul_nn(int M, int N, int K, const float *x, const float *w, float beta, float *y);
void cu_matmul_tn_acc(int M, int N, int K, const float *a, const float *b, float *g);
void cu_matmul_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y);
void cu_matmul_nn_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y);

// cuda_rows.cu
void cu_embed_bf16(int M, int D, const int32_t *ids, const pa_bf16 *table, float *y);
void cu_rmsnorm(int M, int D, const float *x, const float *w, float eps, float *y);
void cu_rope(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab, float *x);
void cu_swiglu(int M, int F, float *gate, const float *up);
void cu_embed(int M, int D, const int32_t *ids, const float *table, float *y);
void cu_add(int M, int N, const float *x, float *y);
void cu_add_bias(int M, int N, const float *b, float *y);
void cu_scale(size_t n, float a, float *x);
void cu_rmsnorm_backward(int M, int D, const float *x, const float *w, float eps, const float *dy, float *dx);
void cu_rope_backward(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab,
                      float *dx);
void cu_swiglu_backward(int M, int F, const float *gate, const float *up, const float *dh, float *dgate, float *dup);
void cu_adamw(size_t n, const pa_adamw_step *s, float *w, const float *g, float *m, float *v);

// cuda_attention.cu
size_t cu_attention_scratch(const pa_attn_args *a);
void cu_attention(const pa_attn_args *a, float *scratch);

// cuda_attention_train.cu
size_t cu_attention_train_scratch(const pa_attn_train_args *a);
void cu_attention_train(const pa_attn_train_args *a, float *scratch);
void cu_attention_backward(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv,
                           float *scratch);

// cuda_nccl.cu, where NCCL is (a build without it has no groups)
#ifdef PALIGN_HAVE_NCCL
constexpr size_t kGroupIdBytes = 128; // an ncclUniqueId's (cuda_nccl.cu checks)
int cu_group_id(void *id);
int cu_group_join(const void *id, int n, int rank, pa_group **out);
int cu_group_allgather(pa_group *g, const float *send, size_t count, float *recv);
void cu_group_leave(pa_group *g);
#endif

} // namespace palign_cuda

#pragma GCC visibility pop
