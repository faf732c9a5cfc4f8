// cuda_ops.cu: the CUDA backend (cuda_backend.h). One stream, one cuBLAS
// handle, per process; kernels sized by a fixed block and a grid over the
// elements or rows.
#include "cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#ifdef PALIGN_HAVE_NCCL
#include <nccl.h>
#endif

#include <algorithm>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

namespace {

char last_error[256];
bool op_failed; // an operation failed since the last status() (its reason in last_error)
bool ready;
int device_used = -1;
cudaStream_t stream;
cublasHandle_t blas;   // fp32 products: pedantic math, no TF32
cublasHandle_t blas16; // bf16 products: tensor cores, fp32 accumulation

constexpr int kBlock = 256;

// A kernel launch, and a kernel's dynamic shared memory, in two macros:
// tests/cuda_emu runs this file on the CPU with its own definitions of them
// (a C++ compiler has no <<< >>>).
#ifndef PA_LAUNCH
#define PA_LAUNCH(kernel, grid, block, shared) kernel<<<(grid), (block), (shared), stream>>>
#define PA_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[] // 32 for the matrix functions
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
__attribute__((format(printf, 1, 2))) void failed(const char *fmt, ...) {
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

// Records a launch error; the operations return nothing, so it waits for
// status() (backend.h).
void launched(const char *what) { check(cudaGetLastError(), what); }

unsigned blocks(size_t n) { return (unsigned)((n + kBlock - 1) / kBlock); }

// ---- the host's waits, and copies to the device through pinned memory -----------------
//
// The host waits for the stream only where it must: a download (its data),
// status() (its errors), a collective, and a staging chunk still being read
// (below). host_waits counts them (pa_cuda_host_waits), so the tests can
// hold a forward pass to one wait per download and one for its status.
unsigned long host_waits;

bool wait_stream(const char *what) {
  host_waits++;
  return check(cudaStreamSynchronize(stream), what);
}

// ---- the device's time by operation (pa_cuda_profile, PALIGN_CUDA_PROFILE) ---------------
//
// With the profile on, each operation's work on the stream lies between two
// timing events, a span, under a name: the operation's, and a product's
// weight shape (N x K) with it; an upload has a span for each copy it
// queues (a chunk of the staging ring), so that the host's copying into
// the ring is not the copy's time. The spans wait in a pool of kProfSpans;
// when it is full, and when the profile is read, the host waits for the
// last one and adds each span's time to its name's row, and the time from
// a span's end to the next one's start to the idle figure: the device
// waiting for the host's work and waits between operations (an operation's
// own launch, where the device waits for it, is in its span). So the
// profile costs two event records a span, and a wait for each kProfSpans
// of them (counted in host_waits). Spans do not nest; names beyond
// kProfRows share the last row.
#ifdef PA_PROF_SPANS
constexpr int kProfSpans = PA_PROF_SPANS;
#else
constexpr int kProfSpans = 4096;
#endif
constexpr int kProfRows = 64;

struct prof_span {
  cudaEvent_t begin, end;
  int row;
  double flops, bytes;
};
bool profiling;
bool prof_open_span;  // a span is open: an operation inside another is the outer one's
prof_span *prof_pool; // kProfSpans, their events made when the profile starts
int prof_used;
cudaEvent_t prof_last; // the last harvested span's end, where prof_have_last
bool prof_have_last;
pa_cuda_profile_row prof_rows[kProfRows];
int prof_n_rows;
double prof_idle_ms;
char prof_name_buf[sizeof prof_rows[0].name]; // a name being formatted (prof_name)

// The profile's name of an operation with a shape: formatted only while profiling.
__attribute__((format(printf, 1, 2))) const char *prof_name(const char *fmt, ...) {
  if (!profiling)
    return nullptr;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prof_name_buf, sizeof prof_name_buf, fmt, ap);
  va_end(ap);
  return prof_name_buf;
}

int prof_row(const char *name) {
  for (int r = 0; r < prof_n_rows; r++)
    if (!strcmp(prof_rows[r].name, name))
      return r;
  if (prof_n_rows == kProfRows)
    return kProfRows - 1;
  pa_cuda_profile_row *row = &prof_rows[prof_n_rows];
  snprintf(row->name, sizeof row->name, "%s", prof_n_rows == kProfRows - 1 ? "(other operations)" : name);
  return prof_n_rows++;
}

// The pool's spans into the rows, the host waiting for the last; false on
// an error (the pool's spans not yet counted then dropped).
bool prof_harvest() {
  if (!prof_used)
    return true;
  host_waits++;
  bool ok = check(cudaEventSynchronize(prof_pool[prof_used - 1].end), "profile");
  for (int i = 0; ok && i < prof_used; i++) {
    const prof_span &sp = prof_pool[i];
    float ms = 0.0f, gap = 0.0f;
    const bool after = i > 0 || prof_have_last;
    ok = check(cudaEventElapsedTime(&ms, sp.begin, sp.end), "profile") &&
         (!after || check(cudaEventElapsedTime(&gap, i > 0 ? prof_pool[i - 1].end : prof_last, sp.begin), "profile"));
    if (!ok)
      break;
    prof_rows[sp.row].spans++;
    prof_rows[sp.row].ms += ms;
    prof_rows[sp.row].flops += sp.flops;
    prof_rows[sp.row].bytes += sp.bytes;
    prof_idle_ms += gap > 0.0f ? gap : 0.0f;
  }
  if (!ok) {
    prof_used = 0, prof_have_last = false;
    return false;
  }
  // the last end stays, as the next span's predecessor; its old handle goes back to the pool
  const cudaEvent_t last = prof_pool[prof_used - 1].end;
  prof_pool[prof_used - 1].end = prof_last;
  prof_last = last, prof_have_last = true;
  prof_used = 0;
  return true;
}

void prof_close() {
  if (!prof_pool)
    return;
  for (int i = 0; i < kProfSpans; i++)
    for (cudaEvent_t e : {prof_pool[i].begin, prof_pool[i].end})
      if (e)
        cudaEventDestroy(e);
  if (prof_last)
    cudaEventDestroy(prof_last);
  cudaGetLastError(); // not left for the next launch's check
  free(prof_pool);
  prof_pool = nullptr, prof_last = nullptr, prof_used = 0, prof_have_last = false;
}

bool prof_open() {
  prof_pool = (prof_span *)calloc(kProfSpans, sizeof *prof_pool);
  if (!prof_pool) {
    snprintf(last_error, sizeof last_error, "profile: no host memory for %d spans", kProfSpans);
    return false;
  }
  bool ok = cudaEventCreateWithFlags(&prof_last, cudaEventDefault) == cudaSuccess;
  for (int i = 0; ok && i < kProfSpans; i++)
    ok = cudaEventCreateWithFlags(&prof_pool[i].begin, cudaEventDefault) == cudaSuccess &&
         cudaEventCreateWithFlags(&prof_pool[i].end, cudaEventDefault) == cudaSuccess;
  if (!ok) {
    snprintf(last_error, sizeof last_error, "profile: cannot make %d timing events: %s", 2 * kProfSpans + 1,
             cudaGetErrorString(cudaGetLastError()));
    prof_close();
    return false;
  }
  return true;
}

// An operation's span: from its construction to its end, while the profile
// is on, with its floating-point operations and the bytes it must move at
// least (cuda_backend.h's pa_cuda_profile_row). Spans do not nest: one
// begun inside another is not timed (the outer one holds its work).
class timed {
public:
  explicit timed(const char *name, double flops = 0.0, double bytes = 0.0) {
    if (!profiling || !name || prof_open_span || (prof_used == kProfSpans && !prof_harvest()))
      return;
    prof_span &sp = prof_pool[prof_used];
    sp.row = prof_row(name), sp.flops = flops, sp.bytes = bytes;
    if (!check(cudaEventRecord(sp.begin, stream), "profile"))
      return;
    span_ = &sp, prof_open_span = true;
  }
  ~timed() {
    if (!span_)
      return;
    prof_open_span = false;
    if (check(cudaEventRecord(span_->end, stream), "profile"))
      prof_used++;
  }
  timed(const timed &) = delete;
  timed &operator=(const timed &) = delete;

private:
  prof_span *span_ = nullptr;
};

// Every upload goes through a ring of pinned host memory: the source is
// copied into the ring and the copy to the device queued from there, so
// the caller may reuse the source at once and the host does not wait for
// the stream (a forward pass's tokens and each layer's attention tables
// are queued behind the work before them). The ring is kStageChunks chunks;
// leaving a chunk records an event (after all the work queued so far), and
// a chunk is written again only after its event: a wait only when the
// device is kStageChunks - 1 chunks' turns behind. An upload larger than a
// chunk goes through chunk by chunk. Where pinned memory cannot be had,
// uploads are pageable copies, each waited for. The tests' build makes the
// chunks small (PA_STAGE_CHUNK), so that a model's weights turn the ring
// onto chunks still being read.
#ifdef PA_STAGE_CHUNK
constexpr size_t kStageChunk = PA_STAGE_CHUNK;
#else
constexpr size_t kStageChunk = 4 << 20;
#endif
constexpr int kStageChunks = 4;
constexpr size_t kStageAlign = 256;   // each copy's start in a chunk
char *stage;                          // kStageChunks chunks of kStageChunk bytes, pinned; null without
cudaEvent_t stage_read[kStageChunks]; // recorded when the ring leaves the chunk: its copies are queued before it
int stage_at;                         // the chunk being filled
size_t stage_used;                    // its bytes taken

// The ring and its events (false, and no ring, where they cannot be had).
bool stage_open() {
  if (cudaHostAlloc((void **)&stage, kStageChunks * kStageChunk, cudaHostAllocDefault) != cudaSuccess) {
    cudaGetLastError();
    stage = nullptr;
    return false;
  }
  for (int c = 0; c < kStageChunks; c++)
    if (cudaEventCreateWithFlags(&stage_read[c], cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      while (c-- > 0)
        cudaEventDestroy(stage_read[c]);
      cudaFreeHost(stage);
      stage = nullptr;
      return false;
    }
  stage_at = 0, stage_used = 0;
  return true;
}

void stage_close() {
  if (!stage)
    return;
  cudaStreamSynchronize(stream); // the copies still reading it
  for (int c = 0; c < kStageChunks; c++)
    cudaEventDestroy(stage_read[c]);
  cudaFreeHost(stage);
  stage = nullptr;
}

// Moves the ring to its next chunk once the copies queued from it the last
// time round have read it (waiting for them if need be); false, the ring
// where it was, on an error.
bool stage_turn(const char *what) {
  const int next = (stage_at + 1) % kStageChunks;
  if (!check(cudaEventRecord(stage_read[stage_at], stream), what))
    return false;
  const cudaError_t e = cudaEventQuery(stage_read[next]);
  if (e == cudaErrorNotReady) {
    // no error, but the runtime may keep it as the last one, which the next launch's check would take for its own
    (void)cudaGetLastError();
    host_waits++;
    if (!check(cudaEventSynchronize(stage_read[next]), what))
      return false;
  } else if (!check(e, what)) {
    return false;
  }
  stage_at = next, stage_used = 0;
  return true;
}

// Queues a copy of bytes from host src to device dst; src may be reused at once.
void stage_copy(void *dst, const void *src, size_t bytes, const char *what) {
  if (!stage) {
    {
      const timed t(what, 0.0, (double)bytes);
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), what);
    }
    wait_stream(what); // the source may be reused on return
    return;
  }
  for (size_t off = 0; off < bytes;) {
    if (stage_used == kStageChunk && !stage_turn(what))
      return;
    const size_t n = bytes - off < kStageChunk - stage_used ? bytes - off : kStageChunk - stage_used;
    char *at = stage + (size_t)stage_at * kStageChunk + stage_used;
    memcpy(at, (const char *)src + off, n);
    const timed t(what, 0.0, (double)n); // the copy's time on the device, not the host's into the ring
    if (!check(cudaMemcpyAsync((char *)dst + off, at, n, cudaMemcpyHostToDevice, stream), what))
      return;
    off += n;
    stage_used += (n + kStageAlign - 1) / kStageAlign * kStageAlign;
    stage_used = stage_used < kStageChunk ? stage_used : kStageChunk;
  }
}

// ---- elementwise and row kernels ---------------------------------------------------

__global__ void k_rmsnorm(int D, const float *x, const float *w, float eps, float *y) {
  const float *xm = x + (size_t)blockIdx.x * D;
  float *ym = y + (size_t)blockIdx.x * D;
  __shared__ double part[kBlock];
  double ss = 0; // in double, as the CPU reference sums
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    ss += (double)xm[i] * xm[i];
  part[threadIdx.x] = ss;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  const float r = 1.0f / sqrtf((float)(part[0] / D) + eps);
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    ym[i] = w[i] * (xm[i] * r);
}

__global__ void k_rope(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab,
                       float *x, float sign) {
  const int half = hd / 2;
  const size_t n = (size_t)M * n_heads * half, t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n)
    return;
  const int i = (int)(t % half);
  const size_t mh = t / half; // m * n_heads + h
  const int m = (int)(mh / n_heads);
  const float c = cos_tab[(size_t)pos[m] * half + i], s = sign * sin_tab[(size_t)pos[m] * half + i];
  float *v = x + mh * hd;
  const float a = v[i], b = v[i + half];
  v[i] = a * c - b * s;
  v[i + half] = b * c + a * s;
}

__global__ void k_swiglu(size_t n, float *gate, const float *up) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void k_embed(int M, int D, const int32_t *ids, const float *table, float *y) {
  const size_t n = (size_t)M * D, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    y[i] = table[(size_t)ids[i / D] * D + i % D];
}

__global__ void k_embed_bf16(int M, int D, const int32_t *ids, const __nv_bfloat16 *table, float *y) {
  const size_t n = (size_t)M * D, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    y[i] = __bfloat162float(table[(size_t)ids[i / D] * D + i % D]);
}

__global__ void k_to_bf16(size_t n, const float *x, __nv_bfloat16 *y) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    y[i] = __float2bfloat16_rn(x[i]);
}

__global__ void k_add(size_t n, const float *x, float *y) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    y[i] += x[i];
}

__global__ void k_add_bias(size_t n, int N, const float *b, float *y) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    y[i] += b[i % N];
}

__global__ void k_scale(size_t n, float a, float *x) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n)
    x[i] *= a;
}

// ---- backward (a low-rank adapter's training) ------------------------------------------

__global__ void k_rmsnorm_backward(int D, const float *x, const float *w, float eps, const float *dy, float *dx) {
  const size_t off = (size_t)blockIdx.x * D;
  __shared__ double ss_part[kBlock], dot_part[kBlock];
  double ss = 0, dot = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    ss += (double)x[off + i] * x[off + i];
    dot += (double)w[i] * dy[off + i] * x[off + i];
  }
  ss_part[threadIdx.x] = ss, dot_part[threadIdx.x] = dot;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      ss_part[threadIdx.x] += ss_part[threadIdx.x + s], dot_part[threadIdx.x] += dot_part[threadIdx.x + s];
    __syncthreads();
  }
  const double r = 1.0 / sqrt((double)(float)(ss_part[0] / D) + (double)eps);
  const float a = (float)r, c = (float)(r * r * r * dot_part[0] / D);
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    dx[off + i] += a * w[i] * dy[off + i] - c * x[off + i];
}

__global__ void k_swiglu_backward(size_t n, const float *gate, const float *up, const float *dh, float *dgate,
                                  float *dup) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const float g = gate[i], sg = 1.0f / (1.0f + expf(-g));
    dgate[i] = dh[i] * up[i] * (sg * (1.0f + g * (1.0f - sg)));
    dup[i] = dh[i] * (g * sg);
  }
}

// ---- attention -----------------------------------------------------------------------

// Block-wide sum of v (blockDim.x threads, shared scratch of blockDim.x floats).
__device__ inline float block_sum(float v, float *red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float r = red[0];
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

// A query row of the call: its sequence's keys and values, where its own keys
// end (causal), and where q and z are.
struct row_desc {
  float *k_own, *v_own;
  int stride; // positions per kv head in k_own / v_own
  int n_own;  // own keys this row sees: past + j + 1
  int row;    // the row of q and z
};

// One block per (query row, head). The row's scores over its keys (the
// prefix's, then its own up to its position) go to shared memory, then the
// softmax (max, exponentials, sum: block reductions), then each thread
// computes output dimensions as sums over the keys.
__global__ void k_attention(int n_heads, int n_kv_heads, int hd, const float *q, float *z, const float *k_prefix,
                            const float *v_prefix, int prefix_len, int prefix_stride, const row_desc *rows) {
  PA_DYNAMIC_SHARED(float, sh); // [keys] scores, then [kBlock] for reductions
  const row_desc r = rows[blockIdx.x];
  const int h = blockIdx.y, kh = h / (n_heads / n_kv_heads), L = prefix_len + r.n_own;
  float *score = sh, *red = sh + L;
  const float *qh = q + ((size_t)r.row * n_heads + h) * hd;
  const float scale = rsqrtf((float)hd);
  const float *kp = k_prefix ? k_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *ko = r.k_own + (size_t)kh * r.stride * hd;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const float *k = j < prefix_len ? kp + (size_t)j * hd : ko + (size_t)(j - prefix_len) * hd;
    float s = 0;
    for (int d = 0; d < hd; d++)
      s += qh[d] * k[d];
    score[j] = s * scale;
  }
  __syncthreads();
  float mx;
  const float inv = 1.0f / softmax_unnormalised(score, L, red, &mx);
  const float *vp = v_prefix ? v_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *vo = r.v_own + (size_t)kh * r.stride * hd;
  float *zh = z + ((size_t)r.row * n_heads + h) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0;
    for (int j = 0; j < L; j++)
      acc += score[j] * (j < prefix_len ? vp[(size_t)j * hd + d] : vo[(size_t)(j - prefix_len) * hd + d]);
    zh[d] = acc * inv;
  }
}

// The tiled attention: a block takes kTileQ consecutive query rows of one
// sequence and one head, and walks their keys kTileK at a time, each key
// tile read once from global memory (coalesced, a key's head_dim floats
// contiguous) into shared memory for all its query rows, with the softmax
// kept online (a running max and sum per row, the partial outputs rescaled
// when the max grows). Its shared memory does not grow with the keys, so
// rows of any length run. The simple kernel above reads every key once per
// query row and head and keeps a row's scores in shared memory (at most
// about 58,000 keys on an H100); it stays as the baseline and for head
// dimensions over kTiledMaxHd. The tensor cores' kernel below takes these
// tiles and runs their products on the tensor cores; this one runs where
// it cannot (head dimensions not multiples of 8) or is asked to
// (pa_cuda_attention_kernel, as bench_cuda does to time the three).
constexpr int kTileQ = 16, kTileK = 32, kTiledThreads = 128, kTiledMaxHd = 128;
constexpr int kRowThreads = kTiledThreads / kTileQ;  // threads per query row in the value sums: 8
constexpr int kDimsPerThread = kTiledMaxHd / kRowThreads; // output dimensions per thread: 16

// Up to kTileQ consecutive query rows of one sequence: row first + i has
// n_own0 + i own keys (its past, then its sequence up to itself). A packed
// prefix's tile (k_attention_mma with own = 0) holds consecutive rows of
// any sequences, n_own0 0, k_own and v_own the prefix's (never read).
struct tile_desc {
  float *k_own, *v_own;
  int stride; // positions per kv head in k_own / v_own
  int n_own0; // own keys the tile's first row sees
  int n_rows; // 1 .. kTileQ
  int row;    // the first row of q and z
};

// Each new token's keys and values (a row of k_new, v_new) into its
// sequence's cache at its position: one block per tile of rows.
__global__ void k_store_new(int n_kv_heads, int hd, const float *k_new, const float *v_new, const tile_desc *tiles) {
  const tile_desc tl = tiles[blockIdx.x];
  const int width = n_kv_heads * hd;
  for (int i = 0; i < tl.n_rows; i++) {
    const int pos = tl.n_own0 - 1 + i;
    const float *kn = k_new + (size_t)(tl.row + i) * width, *vn = v_new + (size_t)(tl.row + i) * width;
    for (int t = threadIdx.x; t < width; t += blockDim.x) {
      const size_t dst = ((size_t)(t / hd) * tl.stride + pos) * hd + t % hd;
      tl.k_own[dst] = kn[t];
      tl.v_own[dst] = vn[t];
    }
  }
}

// Shared memory of k_attention_tiled, in floats, for head dimension hd: q
// [kTileQ][hd] (scaled), k [kTileK][hd + 1] (padded: the score threads read
// a column each), v [kTileK][hd], p [kTileQ][kTileK + 1], and per row the
// running max, the running sum and the tile's correction.
__host__ __device__ inline size_t tiled_shared_floats(int hd) {
  return (size_t)kTileQ * hd + (size_t)kTileK * (hd + 1) + (size_t)kTileK * hd + kTileQ * (kTileK + 1) + 3 * kTileQ;
}

__global__ void k_attention_tiled(int n_heads, int n_kv_heads, int hd, const float *q, float *z,
                                  const float *k_prefix, const float *v_prefix, int prefix_len, int prefix_stride,
                                  const tile_desc *tiles) {
  PA_DYNAMIC_SHARED(float, sh);
  const tile_desc tl = tiles[blockIdx.x];
  const int h = blockIdx.y, kh = h / (n_heads / n_kv_heads), tid = threadIdx.x;
  float *qs = sh, *ks = qs + kTileQ * hd, *vs = ks + kTileK * (hd + 1), *ps = vs + kTileK * hd;
  float *row_max = ps + kTileQ * (kTileK + 1), *row_sum = row_max + kTileQ, *row_corr = row_sum + kTileQ;
  const float scale = rsqrtf((float)hd);
  const float *kp = k_prefix ? k_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *vp = v_prefix ? v_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *ko = tl.k_own + (size_t)kh * tl.stride * hd, *vo = tl.v_own + (size_t)kh * tl.stride * hd;
  // the tile's last row sees the most keys
  const int keys = prefix_len + tl.n_own0 + tl.n_rows - 1;
  for (int e = tid; e < kTileQ * hd; e += kTiledThreads) {
    const int i = e / hd;
    qs[e] = i < tl.n_rows ? q[((size_t)(tl.row + i) * n_heads + h) * hd + e % hd] * scale : 0.0f;
  }
  if (tid < kTileQ)
    row_max[tid] = -INFINITY, row_sum[tid] = 0.0f;
  // the value sums: row i = tid / kRowThreads, dimensions d = tid % kRowThreads + kRowThreads * c
  const int vi = tid / kRowThreads, vd0 = tid % kRowThreads;
  float acc[kDimsPerThread]; // in registers: every loop over c is unrolled
  PA_UNROLL
  for (int c = 0; c < kDimsPerThread; c++)
    acc[c] = 0.0f;
  for (int t0 = 0; t0 < keys; t0 += kTileK) {
    for (int e = tid; e < kTileK * hd; e += kTiledThreads) {
      const int j = e / hd, d = e % hd, t = t0 + j;
      float kv = 0.0f, vv = 0.0f;
      if (t < keys) {
        const size_t at = (t < prefix_len ? (size_t)t : (size_t)(t - prefix_len)) * hd + d;
        kv = t < prefix_len ? kp[at] : ko[at];
        vv = t < prefix_len ? vp[at] : vo[at];
      }
      ks[j * (hd + 1) + d] = kv;
      vs[j * hd + d] = vv;
    }
    __syncthreads();
    // the scores: row i sees the keys t < prefix_len + n_own0 + i
    for (int e = tid; e < kTileQ * kTileK; e += kTiledThreads) {
      const int i = e / kTileK, j = e % kTileK, t = t0 + j;
      float sc = -INFINITY;
      if (i < tl.n_rows && t < prefix_len + tl.n_own0 + i) {
        sc = 0.0f;
        for (int d = 0; d < hd; d++)
          sc += qs[i * hd + d] * ks[j * (hd + 1) + d];
      }
      ps[i * (kTileK + 1) + j] = sc;
    }
    __syncthreads();
    // each row's new max, and how much its sums so far shrink by
    if (tid < kTileQ) {
      float m = row_max[tid];
      for (int j = 0; j < kTileK; j++)
        m = fmaxf(m, ps[tid * (kTileK + 1) + j]);
      // a row's first tile always holds a key it sees (key 0), so m is finite once the row has begun
      row_corr[tid] = m == -INFINITY ? 1.0f : expf(row_max[tid] - m);
      row_max[tid] = m;
    }
    __syncthreads();
    for (int e = tid; e < kTileQ * kTileK; e += kTiledThreads) {
      const int i = e / kTileK, j = e % kTileK;
      float *pe = &ps[i * (kTileK + 1) + j];
      *pe = *pe == -INFINITY ? 0.0f : expf(*pe - row_max[i]);
    }
    __syncthreads();
    if (tid < kTileQ) {
      float sum = 0.0f;
      for (int j = 0; j < kTileK; j++)
        sum += ps[tid * (kTileK + 1) + j];
      row_sum[tid] = row_sum[tid] * row_corr[tid] + sum;
    }
    const float corr = row_corr[vi];
    PA_UNROLL
    for (int c = 0; c < kDimsPerThread; c++) {
      const int d = vd0 + kRowThreads * c;
      if (d < hd) {
        float a = acc[c] * corr;
        for (int j = 0; j < kTileK; j++)
          a += ps[vi * (kTileK + 1) + j] * vs[j * hd + d];
        acc[c] = a;
      }
    }
    __syncthreads();
  }
  if (vi < tl.n_rows) {
    const float inv = 1.0f / row_sum[vi];
    float *zh = z + ((size_t)(tl.row + vi) * n_heads + h) * hd;
    PA_UNROLL
    for (int c = 0; c < kDimsPerThread; c++) {
      const int d = vd0 + kRowThreads * c;
      if (d < hd)
        zh[d] = acc[c] * inv;
    }
  }
}

// The tensor-core attention, the default: the tiled kernel's tiles (up to
// kTileQ query rows of a sequence, the keys kTileK at a time through shared
// memory, the softmax online) with both products, the scores Q K^T and the
// outputs P V, on the tensor cores through the warp matrix functions, in
// fp32 accumulators. The other kernels' arithmetic is one fp32 multiply-add
// per two shared-memory loads, bound by shared memory's bandwidth at a few
// TFLOP/s, where an 8B model's prefill products run at hundreds
// (docs/CUDA.md).
//
// A block takes a tile for up to kMmaMaxWarps query heads that share a kv
// head, a warp each, so that they share its key and value tiles (read from
// global memory once for all of them, and brought into the products'
// operands once: the splitting into tf32 parts, a few integer operations
// an element, would otherwise cost the warps more issue slots than their
// products). A warp computes its head's 16 x 32 scores, its rows' softmax
// (a lane a row), and its 16 x head_dim outputs, which stay in its
// accumulators from one key tile to the next, rescaled there by rows as the
// max grows: the row of each accumulator element is the GPU's own mapping,
// found once by loading a tile whose elements are their row numbers.
//
// The operands come in one of two ways (Ops, below): tf32 parts, fp32's
// precision and the default; or bf16, the CPU's attention on q, k and v
// rounded to bf16 (pa_cuda_attention_kernel("mma_bf16")), for bench_cuda
// to weigh against it.
constexpr int kMmaMaxHd = 128, kMmaMaxWarps = 4;
constexpr int kMmaOutBlocks = kMmaMaxHd / 16; // a warp's 16-column output blocks
constexpr int kScoreLd = kTileK + 4;          // a row of scores in shared memory

namespace wmma = nvcuda::wmma;

// The head dimension rounded up to the output blocks' 16 columns.
__host__ __device__ inline int round16(int hd) { return (hd + 15) / 16 * 16; }

// Warps (query heads) per block for `group` query heads per kv head.
__host__ __device__ inline int mma_warps(int group) { return group < kMmaMaxWarps ? group : kMmaMaxWarps; }

// x rounded to tf32 (10 mantissa bits; to nearest, ties away from zero, as
// cvt.rna.tf32.f32 rounds) as an fp32 value whose 13 low bits are zero, so
// that x - tf32_round(x) is exact: done on the bits, since the layout of
// what __float_to_tf32 returns is left unspecified.
__device__ inline float tf32_round(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  if ((u & 0x7F800000u) != 0x7F800000u) // Inf and NaN stay
    u = (u + 0x1000u) & 0xFFFFE000u;
  memcpy(&x, &u, sizeof x);
  return x;
}

// hi's elements x become tf32(x), and lo's tf32(x - tf32(x)).
template <class F> __device__ inline void split_tf32(F &hi, F &lo) {
  for (int i = 0; i < hi.num_elements; i++) {
    const float x = hi.x[i];
    hi.x[i] = tf32_round(x);
    lo.x[i] = tf32_round(x - hi.x[i]);
  }
}

// The tf32 operands: tf32 keeps 10 of fp32's 23 mantissa bits, which alone
// would move the outputs by about 1e-3 of their size. So every operand x is
// split in two tf32 values, hi = tf32(x) and lo = tf32(x - hi), and every
// product made of three m16n16k8 ones (lo hi + hi lo + hi hi; lo lo is
// under 2^-22 of it): within a few ulps of fp32, the CPU reference's
// precision, at three tensor-core products for one. k and v are split as
// they are loaded, q and p in each warp's fragments.
//
// Shared memory after the scores: q [warps][kTileQ][ld] (scaled), then k's
// and v's high and low parts [4][kTileK][ld]; the outputs pass through
// k's and v's place at the end.
struct mma_tf32 {
  using acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  using rows = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>; // q, p
  using keys = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>; // k^T
  using vals = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>; // v
  struct q_frag {
    rows hi, lo;
  };
  static constexpr int kDimStep = 8, kKeyStep = 8; // the products' k, over the head and over the keys

  // A row of q, k or v in shared memory, in floats: the head dimension
  // rounded up to 16 (v's extra columns are zeros), and 4 more so that rows
  // start in different banks. Every fragment's start is then 32-byte
  // aligned, as the warp matrix functions require.
  __host__ __device__ static int ld(int hd) { return round16(hd) + 4; }
  __host__ __device__ static size_t shared_bytes(int hd, int warps) {
    return (size_t)(warps * kTileQ + 4 * kTileK) * ld(hd) * sizeof(float);
  }
  // The scores' steps over the head dimension: a multiple of 8 (the host's choice).
  __device__ static int dim_steps(int hd) { return hd / kDimStep; }

  float *qs, *qw, *k_hi, *k_lo, *v_hi, *v_lo, *out;
  int ld_;
  float scale;
  rows p_hi[kTileK / kKeyStep], p_lo[kTileK / kKeyStep];

  __device__ mma_tf32(float *sh, int hd, int warps, int warp, float scale) : qs(sh), ld_(ld(hd)), scale(scale) {
    k_hi = qs + warps * kTileQ * ld_, k_lo = k_hi + kTileK * ld_, v_hi = k_lo + kTileK * ld_;
    v_lo = v_hi + kTileK * ld_;
    qw = qs + warp * kTileQ * ld_, out = k_hi + warp * kTileQ * ld_;
  }
  // q's row `row` of the block's warps x kTileQ, dimension d: scaled here, before it is split
  __device__ void put_q(int row, int d, float x) { qs[row * ld_ + d] = x * scale; }
  __device__ void put_kv(int j, int d, float kv, float vv) {
    k_hi[j * ld_ + d] = tf32_round(kv), k_lo[j * ld_ + d] = tf32_round(kv - k_hi[j * ld_ + d]);
    v_hi[j * ld_ + d] = tf32_round(vv), v_lo[j * ld_ + d] = tf32_round(vv - v_hi[j * ld_ + d]);
  }
  __device__ void load_q(q_frag &f, int step) const {
    wmma::load_matrix_sync(f.hi, qw + kDimStep * step, ld_);
    split_tf32(f.hi, f.lo);
  }
  // part = (the warp's q) (keys 16 kb to 16 kb + 15)^T over dimensions 8 step to 8 step + 7; part zero before
  __device__ void qk(acc &part, const q_frag &q, int kb, int step) const {
    keys kf_hi, kf_lo;
    wmma::load_matrix_sync(kf_hi, k_hi + 16 * kb * ld_ + kDimStep * step, ld_);
    wmma::load_matrix_sync(kf_lo, k_lo + 16 * kb * ld_ + kDimStep * step, ld_);
    mma_split(part, q.hi, q.lo, kf_hi, kf_lo);
  }
  __device__ void finish_scores(acc (&)[2]) const {} // q came scaled
  __device__ void put_p(int, int, float) {}          // p is read from the scores' place
  __device__ void load_p(const float *sw) {
    PA_UNROLL
    for (int step = 0; step < kTileK / kKeyStep; step++) {
      wmma::load_matrix_sync(p_hi[step], sw + kKeyStep * step, kScoreLd);
      split_tf32(p_hi[step], p_lo[step]);
    }
  }
  // part = p (keys 8 step to 8 step + 7) v (the same keys, columns 16 b to 16 b + 15); part zero before
  __device__ void pv(acc &part, int step, int b) const {
    vals vf_hi, vf_lo;
    wmma::load_matrix_sync(vf_hi, v_hi + kKeyStep * step * ld_ + 16 * b, ld_);
    wmma::load_matrix_sync(vf_lo, v_lo + kKeyStep * step * ld_ + 16 * b, ld_);
    mma_split(part, p_hi[step], p_lo[step], vf_hi, vf_lo);
  }

  // acc = a b (acc zero before) from the split parts, the small products first.
  template <class A, class B>
  __device__ static void mma_split(acc &c, const A &a_hi, const A &a_lo, const B &b_hi, const B &b_lo) {
    wmma::mma_sync(c, a_lo, b_hi, c);
    wmma::mma_sync(c, a_hi, b_lo, c);
    wmma::mma_sync(c, a_hi, b_hi, c);
  }
};

// The bf16 operands: q, k and v rounded to bf16 (to nearest, ties to even)
// as they are loaded, and m16n16k16 products. The product of two bf16
// values is exact in fp32, so the scores are those of the rounded q and k
// up to the order of the sums (scaled after, in fp32, so that q is the
// CPU's q rounded); p, in [0, 1], is split in two bf16 parts (hi =
// bf16(p), lo = bf16(p - hi): p within 2^-17 of itself), two products in
// place of one. So the outputs are the CPU's attention on q, k and v
// rounded to bf16, within its tolerance and 2^-17 of the largest |v|.
// Against the tf32 parts: one product for three in the scores and two for
// three in the outputs, at twice tf32's rate on the tensor cores, no
// splitting of k and v, and a quarter of the shared memory a key.
//
// Shared memory after the scores: q [warps][kTileQ][ld], k and v
// [kTileK][ld], and p's parts [2][warps][kTileQ][kPLd], all bf16; the
// outputs pass through its start at the end.
struct mma_bf16 {
  using acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using rows = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>; // q, p
  using keys = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>; // k^T
  using vals = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major>; // v
  using q_frag = rows;
  static constexpr int kDimStep = 16, kKeyStep = 16;
  static constexpr int kPLd = kTileK + 8; // a row of p's parts: 80 bytes

  // A row of q, k or v in shared memory, in bf16 values: the head
  // dimension rounded up to 16 (the extra columns zeros), and 8 more (16
  // bytes) so that rows start in different banks; fragments start 32-byte
  // aligned.
  __host__ __device__ static int ld(int hd) { return round16(hd) + 8; }
  __host__ __device__ static size_t operand_bytes(int hd, int warps) {
    return ((size_t)(warps * kTileQ + 2 * kTileK) * ld(hd) + 2 * (size_t)warps * kTileQ * kPLd) * sizeof(__nv_bfloat16);
  }
  __host__ __device__ static size_t shared_bytes(int hd, int warps) {
    const size_t outputs = (size_t)warps * kTileQ * (round16(hd) + 4) * sizeof(float);
    return operand_bytes(hd, warps) > outputs ? operand_bytes(hd, warps) : outputs;
  }
  // Every step over the head dimension rounded up to 16: q's and k's extra columns are zeros.
  __device__ static int dim_steps(int hd) { return round16(hd) / kDimStep; }

  __nv_bfloat16 *qs, *qw, *ks, *vs, *pw_hi, *pw_lo;
  float *out;
  int ld_;
  float scale;
  rows p_hi[kTileK / kKeyStep], p_lo[kTileK / kKeyStep];

  __device__ mma_bf16(float *sh, int hd, int warps, int warp, float scale)
      : qs((__nv_bfloat16 *)sh), ld_(ld(hd)), scale(scale) {
    ks = qs + warps * kTileQ * ld_, vs = ks + kTileK * ld_;
    pw_hi = vs + kTileK * ld_ + warp * kTileQ * kPLd, pw_lo = pw_hi + warps * kTileQ * kPLd;
    qw = qs + warp * kTileQ * ld_, out = sh + warp * kTileQ * (round16(hd) + 4);
  }
  // unscaled: the scores are scaled in fp32, so that q is the CPU's q rounded
  __device__ void put_q(int row, int d, float x) { qs[row * ld_ + d] = __float2bfloat16_rn(x); }
  __device__ void put_kv(int j, int d, float kv, float vv) {
    ks[j * ld_ + d] = __float2bfloat16_rn(kv);
    vs[j * ld_ + d] = __float2bfloat16_rn(vv);
  }
  __device__ void load_q(q_frag &f, int step) const { wmma::load_matrix_sync(f, qw + kDimStep * step, ld_); }
  __device__ void qk(acc &part, const q_frag &q, int kb, int step) const {
    keys kf;
    wmma::load_matrix_sync(kf, ks + 16 * kb * ld_ + kDimStep * step, ld_);
    wmma::mma_sync(part, q, kf, part);
  }
  __device__ void finish_scores(acc (&sc)[2]) const {
    for (int kb = 0; kb < 2; kb++)
      for (int e = 0; e < sc[kb].num_elements; e++)
        sc[kb].x[e] *= scale;
  }
  __device__ void put_p(int i, int j, float p) {
    const __nv_bfloat16 hi = __float2bfloat16_rn(p);
    pw_hi[i * kPLd + j] = hi, pw_lo[i * kPLd + j] = __float2bfloat16_rn(p - __bfloat162float(hi));
  }
  __device__ void load_p(const float *) {
    PA_UNROLL
    for (int step = 0; step < kTileK / kKeyStep; step++) {
      wmma::load_matrix_sync(p_hi[step], pw_hi + kKeyStep * step, kPLd);
      wmma::load_matrix_sync(p_lo[step], pw_lo + kKeyStep * step, kPLd);
    }
  }
  __device__ void pv(acc &part, int step, int b) const {
    vals vf;
    wmma::load_matrix_sync(vf, vs + kKeyStep * step * ld_ + 16 * b, ld_);
    wmma::mma_sync(part, p_lo[step], vf, part);
    wmma::mma_sync(part, p_hi[step], vf, part);
  }
};

// Shared memory of k_attention_mma<Ops>, in bytes: the scores
// [warps][kTileQ][kScoreLd] (then p), whose 4 columns past the keys hold
// the row's running max, sum and correction, then the operands' (Ops).
template <class Ops> __host__ __device__ inline size_t mma_shared_bytes(int hd, int warps) {
  return (size_t)warps * kTileQ * kScoreLd * sizeof(float) + Ops::shared_bytes(hd, warps);
}

// Grid: (tiles, kv heads x chunks of a kv head's query heads, splits),
// blocks of 32 mma_warps(n_heads / n_kv_heads) threads. Row i of a tile
// sees the prefix's keys and, with own = 1, its own n_own0 + i (own = 0:
// the prefix alone, for a packed prefix's tiles, below). With one split
// and part null a block walks all its tile's keys and writes z; otherwise
// split s takes the s-th share of the tile's key tiles and writes its
// rows' unnormalised outputs, max and sum into part, as share slot0 + s
// of the row's `slots`, for k_attention_combine (a share past the tile's
// keys writes a max of -Inf).
//
// The tensor cores' own sums are truncated (docs/CUDA.md), so no
// accumulator takes more than one step's products: each step's are added
// to the running sums (scores over the head dimension, outputs over the
// keys) in fp32, rounded to nearest.
template <class Ops>
__global__ void __launch_bounds__(32 * kMmaMaxWarps)
    k_attention_mma(int n_heads, int n_kv_heads, int hd, const float *q, float *z, const float *k_prefix,
                    const float *v_prefix, int prefix_len, int prefix_stride, const tile_desc *tiles, int own,
                    float *part, int slots, int slot0) {
  using acc = typename Ops::acc;
  PA_DYNAMIC_SHARED(float, sh);
  const tile_desc tl = tiles[blockIdx.x];
  const int group = n_heads / n_kv_heads, warps = (int)blockDim.x / 32, chunks = (group + warps - 1) / warps;
  const int kh = (int)blockIdx.y / chunks, head0 = kh * group + (int)blockIdx.y % chunks * warps;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nt = (int)blockDim.x;
  const int hd16 = round16(hd), n_blocks = hd16 / 16;
  // the last chunk of a group that warps do not divide has warps without a head: they only meet the barriers
  const int heads = head0 + warps <= (kh + 1) * group ? warps : (kh + 1) * group - head0;
  const bool live = warp < heads;
  float *ss = sh, *sw = ss + warp * kTileQ * kScoreLd, *operands = ss + warps * kTileQ * kScoreLd;
  Ops ops(operands, hd, warps, warp, rsqrtf((float)hd));
  // row i's running max, sum and correction: [i * kScoreLd] of these, past its scores
  float *row_max = sw + kTileK, *row_sum = sw + kTileK + 1, *row_corr = sw + kTileK + 2;
  const float *kp = k_prefix ? k_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *vp = v_prefix ? v_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *ko = tl.k_own + (size_t)kh * tl.stride * hd, *vo = tl.v_own + (size_t)kh * tl.stride * hd;
  const int own0 = own * tl.n_own0, grow = own;                // own keys of row i: own0 + grow i
  const int keys = prefix_len + own0 + grow * (tl.n_rows - 1); // the tile's last row sees the most
  // this split's keys: whole key tiles, the first split's beginning with key 0, which every row sees
  const int share = ((keys + kTileK - 1) / kTileK + (int)gridDim.z - 1) / (int)gridDim.z * kTileK;
  const int t_begin = (int)blockIdx.z * share, t_end = t_begin + share < keys ? t_begin + share : keys;
  for (int e = tid; e < warps * kTileQ * hd16; e += nt) {
    const int w = e / (kTileQ * hd16), i = e / hd16 % kTileQ, d = e % hd16;
    ops.put_q(w * kTileQ + i, d,
              w < heads && i < tl.n_rows && d < hd ? q[((size_t)(tl.row + i) * n_heads + head0 + w) * hd + d] : 0.0f);
  }
  // which of the 16 rows each of this lane's accumulator elements holds
  for (int e = tid; e < 16 * 16; e += nt)
    ss[e] = (float)(e / 16);
  __syncthreads(); // q's tile and the row numbers in place
  acc row_of;
  wmma::load_matrix_sync(row_of, ss, 16, wmma::mem_row_major);
  acc out[kMmaOutBlocks]; // blocks n_blocks and on unused
  PA_UNROLL
  for (int b = 0; b < kMmaOutBlocks; b++)
    wmma::fill_fragment(out[b], 0.0f);
  __syncthreads(); // row_of read before the rows' figures overwrite its tile
  if (live && lane < kTileQ)
    row_max[lane * kScoreLd] = -INFINITY, row_sum[lane * kScoreLd] = 0.0f;
  for (int t0 = t_begin; t0 < t_end; t0 += kTileK) {
    for (int e = tid; e < kTileK * hd16; e += nt) {
      const int j = e / hd16, d = e % hd16, t = t0 + j;
      float kv = 0.0f, vv = 0.0f;
      if (t < keys && d < hd) {
        const size_t at = (t < prefix_len ? (size_t)t : (size_t)(t - prefix_len)) * hd + d;
        kv = t < prefix_len ? kp[at] : ko[at];
        vv = t < prefix_len ? vp[at] : vo[at];
      }
      ops.put_kv(j, d, kv, vv);
    }
    __syncthreads(); // the key and value tiles in the products' operands
    if (live) { // the scores of this warp's head: keys 0-15 and 16-31 of the tile
      acc sc[2];
      wmma::fill_fragment(sc[0], 0.0f);
      wmma::fill_fragment(sc[1], 0.0f);
      for (int step = 0; step < Ops::dim_steps(hd); step++) {
        typename Ops::q_frag qf;
        ops.load_q(qf, step);
        PA_UNROLL
        for (int kb = 0; kb < 2; kb++) {
          acc part;
          wmma::fill_fragment(part, 0.0f);
          ops.qk(part, qf, kb, step);
          for (int e = 0; e < part.num_elements; e++)
            sc[kb].x[e] += part.x[e];
        }
      }
      ops.finish_scores(sc);
      wmma::store_matrix_sync(sw, sc[0], kScoreLd, wmma::mem_row_major);
      wmma::store_matrix_sync(sw + 16, sc[1], kScoreLd, wmma::mem_row_major);
    }
    __syncthreads(); // the scores stored
    // row i sees the keys t < prefix_len + own0 + grow i: its new max, and how much its sums so far shrink by
    if (live && lane < kTileQ) {
      const int i = lane, seen = i < tl.n_rows ? prefix_len + own0 + grow * i - t0 : 0;
      const float was = row_max[i * kScoreLd];
      float m = was;
      for (int j = 0; j < kTileK && j < seen; j++)
        m = fmaxf(m, sw[i * kScoreLd + j]);
      // a row's first tile holds a key it sees (key 0), so m is finite once the row has begun; a later share's
      // row may see none of its keys: m stays -Inf, and nothing is added
      row_corr[i * kScoreLd] = m == -INFINITY ? 1.0f : expf(was - m);
      row_max[i * kScoreLd] = m;
    }
    __syncthreads(); // the rows' maxima and corrections set
    if (live)
      for (int e = lane; e < kTileQ * kTileK; e += 32) {
        const int i = e / kTileK, j = e % kTileK;
        float *pe = &sw[i * kScoreLd + j];
        *pe = i < tl.n_rows && t0 + j < prefix_len + own0 + grow * i ? expf(*pe - row_max[i * kScoreLd]) : 0.0f;
        ops.put_p(i, j, *pe);
      }
    __syncthreads(); // the exponentials in the scores' place
    if (live) {
      if (lane < kTileQ) {
        float sum = 0.0f;
        for (int j = 0; j < kTileK; j++)
          sum += sw[lane * kScoreLd + j];
        row_sum[lane * kScoreLd] = row_sum[lane * kScoreLd] * row_corr[lane * kScoreLd] + sum;
      }
      // out = out corr + p v over the tile's keys, a step at a time: the rows' corrections for
      // this lane's elements, and p's steps, first
      float corr[acc::num_elements];
      for (int e = 0; e < acc::num_elements; e++)
        corr[e] = row_corr[(int)row_of.x[e] * kScoreLd];
      ops.load_p(sw);
      PA_UNROLL
      for (int b = 0; b < kMmaOutBlocks; b++)
        if (b < n_blocks) {
          PA_UNROLL
          for (int step = 0; step < kTileK / Ops::kKeyStep; step++) {
            acc part;
            wmma::fill_fragment(part, 0.0f);
            ops.pv(part, step, b);
            for (int e = 0; e < part.num_elements; e++)
              out[b].x[e] = (step == 0 ? out[b].x[e] * corr[e] : out[b].x[e]) + part.x[e];
          }
        }
    }
    __syncthreads(); // every warp done with the tile before the next one is loaded
  }
  // the outputs through shared memory (where the operands were; warps x 16 rows fit) to be divided and written
  const int ldo = hd16 + 4;
  if (live) {
    PA_UNROLL
    for (int b = 0; b < kMmaOutBlocks; b++)
      if (b < n_blocks)
        wmma::store_matrix_sync(ops.out + 16 * b, out[b], ldo, wmma::mem_row_major);
  }
  __syncthreads(); // the outputs stored
  if (live)
    for (int e = lane; e < kTileQ * hd; e += 32) {
      const int i = e / hd, d = e % hd;
      if (i >= tl.n_rows)
        continue;
      const size_t at = (size_t)(tl.row + i) * n_heads + head0 + warp; // the row's head
      if (!part)
        z[at * hd + d] = ops.out[i * ldo + d] * (1.0f / row_sum[i * kScoreLd]);
      else { // this split's share, [hd outputs, max, sum], for k_attention_combine
        float *share_of = part + (at * slots + slot0 + blockIdx.z) * (hd + 2);
        share_of[d] = ops.out[i * ldo + d];
        if (d == 0)
          share_of[hd] = row_max[i * kScoreLd], share_of[hd + 1] = row_sum[i * kScoreLd];
      }
    }
}

// z from the `slots` shares of k_attention_mma's walks (split keys, a
// packed prefix's two walks): a block per (tile, head), for the tile's
// rows. Each share's outputs and sum were taken against its own max:
// rescaled to the largest. Each walk's first share saw a key of the row's
// (key 0 of the prefix, or of its own), so the largest is finite, and a
// share that saw no key (max -Inf, sum and outputs 0) weighs e^-Inf = 0.
__global__ void k_attention_combine(int n_heads, int hd, int slots, const float *part, float *z,
                                    const tile_desc *tiles) {
  const tile_desc tl = tiles[blockIdx.x];
  for (int i = 0; i < tl.n_rows; i++) {
    const size_t at = (size_t)(tl.row + i) * n_heads + blockIdx.y;
    const float *shares = part + at * slots * (hd + 2);
    float m = -INFINITY, sum = 0.0f;
    for (int s = 0; s < slots; s++)
      m = fmaxf(m, shares[s * (hd + 2) + hd]);
    for (int s = 0; s < slots; s++)
      sum += expf(shares[s * (hd + 2) + hd] - m) * shares[s * (hd + 2) + hd + 1];
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float out = 0.0f;
      for (int s = 0; s < slots; s++)
        out += expf(shares[s * (hd + 2) + hd] - m) * shares[s * (hd + 2) + d];
      z[at * hd + d] = out / sum;
    }
  }
}

// The row descriptors of a call, in device memory kept between calls; the
// tiles' likewise.
row_desc *desc_dev;
size_t desc_cap;
tile_desc *tile_dev;
size_t tile_cap;

// ---- attention over a training batch (backend.h pa_attn_train_args) -----------------------
//
// Query row r sees the keys [0, n_prefix) and [own_start, r] (rows of k and
// v): a prefix row the prefix up to itself (n_prefix 0, own_start 0), a
// sequence's row the whole prefix and its sequence up to itself. Key row j
// is seen by the query rows [j, q_end) (its own segment from itself on)
// and, for a prefix key, by every sequence's rows too.
struct train_row {
  int n_prefix, own_start, q_end;
};

constexpr int kTrainBlock = 128; // threads of the key-gradient kernel; head_dim <= 2 * kTrainBlock

__device__ inline int train_key_row(const train_row &d, int t) {
  return t < d.n_prefix ? t : d.own_start + (t - d.n_prefix);
}

// Forward: one block per (query row, head), as k_attention, keeping each
// softmax's log-sum-exp.
__global__ void k_train_fwd(int H, int KV, int hd, const float *q, const float *k, const float *v, float *z, float *lse,
                            const train_row *rows) {
  PA_DYNAMIC_SHARED(float, sh);
  const int r = blockIdx.x, h = blockIdx.y, kh = h / (H / KV);
  const train_row d = rows[r];
  const int L = d.n_prefix + (r - d.own_start + 1);
  float *score = sh, *red = sh + L;
  const float *qh = q + ((size_t)r * H + h) * hd;
  const float scale = rsqrtf((float)hd);
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    const float *kr = k + ((size_t)train_key_row(d, t) * KV + kh) * hd;
    float s = 0;
    for (int i = 0; i < hd; i++)
      s += qh[i] * kr[i];
    score[t] = s * scale;
  }
  __syncthreads();
  float mx;
  const float sum = softmax_unnormalised(score, L, red, &mx);
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float acc = 0;
    for (int t = 0; t < L; t++)
      acc += score[t] * v[((size_t)train_key_row(d, t) * KV + kh) * hd + i];
    z[((size_t)r * H + h) * hd + i] = acc / sum;
  }
  if (threadIdx.x == 0)
    lse[(size_t)r * H + h] = mx + logf(sum);
}

// D[r][h] = dz . z, in double as the CPU sums it.
__global__ void k_train_rowdot(size_t n, int hd, const float *dz, const float *z, float *D) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n)
    return;
  double s = 0;
  for (int d = 0; d < hd; d++)
    s += (double)dz[i * hd + d] * z[i * hd + d];
  D[i] = (float)s;
}

// dQ: one block per (query row, head): dS over its keys into shared memory,
// then dq = scale sum_t dS_t k_t.
__global__ void k_train_dq(int H, int KV, int hd, const float *q, const float *k, const float *v, const float *dz,
                           const float *lse, const float *D, float *dq, const train_row *rows) {
  PA_DYNAMIC_SHARED(float, sh);
  const int r = blockIdx.x, h = blockIdx.y, kh = h / (H / KV);
  const train_row d = rows[r];
  const int L = d.n_prefix + (r - d.own_start + 1);
  const size_t at = (size_t)r * H + h;
  const float *qh = q + at * hd, *dzh = dz + at * hd;
  const float scale = rsqrtf((float)hd), l = lse[at], Dr = D[at];
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    const size_t kv = ((size_t)train_key_row(d, t) * KV + kh) * hd;
    float s = 0, dp = 0;
    for (int i = 0; i < hd; i++)
      s += qh[i] * k[kv + i], dp += dzh[i] * v[kv + i];
    const float p = expf(s * scale - l);
    sh[t] = p * (dp - Dr);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float acc = 0;
    for (int t = 0; t < L; t++)
      acc += sh[t] * k[((size_t)train_key_row(d, t) * KV + kh) * hd + i];
    dq[at * hd + i] = scale * acc;
  }
}

// dK, dV: one block per (key row, kv head), over every query row and head
// that sees it, in order (no atomics: the same sums every run).
__global__ void k_train_dkdv(int H, int KV, int hd, int prefix_len, int n_seqs, const int *seq_row0, const int *seq_len,
                             const float *q, const float *k, const float *v, const float *dz, const float *lse,
                             const float *D, float *dk, float *dv, const train_row *rows) {
  __shared__ float red[kTrainBlock];
  const int j = blockIdx.x, kh = blockIdx.y, g = H / KV, i0 = threadIdx.x, i1 = threadIdx.x + kTrainBlock;
  const float scale = rsqrtf((float)hd);
  const float *kj = k + ((size_t)j * KV + kh) * hd, *vj = v + ((size_t)j * KV + kh) * hd;
  float ak0 = 0, ak1 = 0, av0 = 0, av1 = 0;
  // the query rows: [j, q_end), then, for a prefix key, every sequence's rows
  const int n_ranges = j < prefix_len ? 1 + n_seqs : 1;
  for (int range = 0; range < n_ranges; range++) {
    const int r_begin = range == 0 ? j : seq_row0[range - 1];
    const int r_end = range == 0 ? rows[j].q_end : seq_row0[range - 1] + seq_len[range - 1];
    for (int r = r_begin; r < r_end; r++)
      for (int gi = 0; gi < g; gi++) {
        const size_t at = (size_t)r * H + (size_t)kh * g + gi;
        const float *qr = q + at * hd, *dzr = dz + at * hd;
        float s = 0, dp = 0;
        if (i0 < hd)
          s += qr[i0] * kj[i0], dp += dzr[i0] * vj[i0];
        if (i1 < hd)
          s += qr[i1] * kj[i1], dp += dzr[i1] * vj[i1];
        s = block_sum(s, red);
        dp = block_sum(dp, red);
        const float p = expf(s * scale - lse[at]), dS = p * (dp - D[at]);
        if (i0 < hd)
          ak0 += scale * dS * qr[i0], av0 += p * dzr[i0];
        if (i1 < hd)
          ak1 += scale * dS * qr[i1], av1 += p * dzr[i1];
      }
  }
  const size_t out = ((size_t)j * KV + kh) * hd;
  if (i0 < hd)
    dk[out + i0] = ak0, dv[out + i0] = av0;
  if (i1 < hd)
    dk[out + i1] = ak1, dv[out + i1] = av1;
}

// The rows' descriptors and the sequences' bounds, in device memory kept
// between calls: [rows] train_row, then seq_row0 [n_seqs], seq_len [n_seqs].
void *train_dev;
size_t train_cap;

int train_rows_of(const pa_attn_train_args *a) {
  int rows = a->prefix_len;
  for (int i = 0; i < a->n_seqs; i++)
    rows = a->seq_row0[i] + a->seq_len[i] > rows ? a->seq_row0[i] + a->seq_len[i] : rows;
  return rows;
}

// Uploads the descriptors; the longest key list in *max_keys. NULL on error.
const train_row *train_upload(const pa_attn_train_args *a, int rows, int *max_keys, const int **row0, const int **len) {
  const size_t bytes = (size_t)rows * sizeof(train_row) + 2 * (size_t)a->n_seqs * sizeof(int);
  if (bytes > train_cap) {
    cudaFree(train_dev);
    train_dev = nullptr, train_cap = 0;
    if (!check(cudaMalloc(&train_dev, bytes), "attention_train: descriptors"))
      return nullptr;
    train_cap = bytes;
  }
  char *host = (char *)malloc(bytes);
  if (!host) {
    failed("attention_train: no host memory for %d row descriptors", rows);
    return nullptr;
  }
  train_row *d = (train_row *)host;
  int *r0 = (int *)(d + rows), *ln = r0 + a->n_seqs;
  *max_keys = 0;
  for (int r = 0; r < rows; r++)
    d[r] = train_row{0, 0, 0};
  for (int r = 0; r < a->prefix_len; r++) {
    d[r] = train_row{0, 0, a->prefix_len};
    *max_keys = r + 1 > *max_keys ? r + 1 : *max_keys;
  }
  for (int i = 0; i < a->n_seqs; i++) {
    r0[i] = a->seq_row0[i], ln[i] = a->seq_len[i];
    for (int t = 0; t < a->seq_len[i]; t++) {
      const int r = a->seq_row0[i] + t;
      d[r] = train_row{a->prefix_len, a->seq_row0[i], a->seq_row0[i] + a->seq_len[i]};
      *max_keys = a->prefix_len + t + 1 > *max_keys ? a->prefix_len + t + 1 : *max_keys;
    }
  }
  stage_copy(train_dev, host, bytes, "attention_train: tables upload");
  free(host);
  *row0 = (const int *)((train_row *)train_dev + rows);
  *len = *row0 + a->n_seqs;
  return (const train_row *)train_dev;
}

// The simple and training attention kernels keep a row's scores (one float
// a key) in dynamic shared memory, and the tensor cores' one its tiles for
// 4 heads: above 48 KB a kernel must be allowed more, up to the device's
// opt-in limit (227 KB on H100/H200: about 58,000 keys). Longer rows are
// refused (the operation fails, status() says so) rather than launched;
// `keys`, where not 0, says how many the refused row had. What each kernel
// is allowed, for the device in use:
enum { kShAttention, kShAttentionMma, kShAttentionMmaBf16, kShTrainFwd, kShTrainDq, kShKernels };
size_t shared_set[kShKernels];
int shared_max; // the device's opt-in limit, bytes

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

// ---- the operations --------------------------------------------------------------------

// The least bytes of y[M][N] = beta y + x[M][K] . w (w N x K or K x N) for
// the profile: x and w read once (elem bytes an element: 4, or 2 for bf16
// and x as rounded), y written, and read too where beta adds it.
double product_bytes(int M, int N, int K, double elem, float beta) {
  return elem * ((double)M * K + (double)N * K) + 4.0 * M * N * (beta != 0.0f ? 2 : 1);
}

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

// x rounded to bf16, the other operand of a bf16 product, in a buffer kept
// between calls (grown when a larger one comes). NULL on error.
__nv_bfloat16 *xb16;
size_t xb16_cap;

const __nv_bfloat16 *to_bf16(size_t n, const float *x, const char *what) {
  if (n > xb16_cap) {
    cudaFree(xb16); // waits for the work that may still read it
    xb16 = nullptr, xb16_cap = 0;
    if (!check(cudaMalloc(&xb16, n * sizeof *xb16), what))
      return nullptr;
    xb16_cap = n;
  }
  const timed t("bf16 rounding of x (products)", 0.0, 6.0 * n);
  PA_LAUNCH(k_to_bf16, blocks(n), kBlock, 0)(n, x, xb16);
  launched(what);
  return xb16;
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

void cu_matmul_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  matmul_bf16(false, M, N, K, x, w, beta, y, "matmul_bf16");
}

void cu_matmul_nn_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y) {
  matmul_bf16(true, M, N, K, x, w, beta, y, "matmul_nn_bf16");
}

void cu_embed_bf16(int M, int D, const int32_t *ids, const pa_bf16 *table, float *y) {
  const size_t n = (size_t)M * D;
  if (!n)
    return;
  const timed t("embed bf16", 0.0, 4.0 * M + 6.0 * n);
  PA_LAUNCH(k_embed_bf16, blocks(n), kBlock, 0)(M, D, ids, (const __nv_bfloat16 *)table, y);
  launched("embed_bf16");
}

void cu_rmsnorm(int M, int D, const float *x, const float *w, float eps, float *y) {
  if (M <= 0)
    return;
  const timed t("rmsnorm", 0.0, 4.0 * (2.0 * M * D + D));
  PA_LAUNCH(k_rmsnorm, M, kBlock, 0)(D, x, w, eps, y);
  launched("rmsnorm");
}

// RoPE's least bytes: the M rows' heads read and written, each row's
// position and its cos and sin rows (hd / 2 each) read once.
double rope_bytes(int M, int n_heads, int hd) { return 8.0 * M * n_heads * hd + 4.0 * M * (hd + 1.0); }

void cu_rope(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab, float *x) {
  const size_t n = (size_t)M * n_heads * (hd / 2);
  if (!n)
    return;
  const timed t("rope", 0.0, rope_bytes(M, n_heads, hd));
  PA_LAUNCH(k_rope, blocks(n), kBlock, 0)(M, n_heads, hd, pos, cos_tab, sin_tab, x, 1.0f);
  launched("rope");
}

void cu_swiglu(int M, int F, float *gate, const float *up) {
  const size_t n = (size_t)M * F;
  if (!n)
    return;
  const timed t("swiglu", 0.0, 12.0 * n);
  PA_LAUNCH(k_swiglu, blocks(n), kBlock, 0)(n, gate, up);
  launched("swiglu");
}

void cu_embed(int M, int D, const int32_t *ids, const float *table, float *y) {
  const size_t n = (size_t)M * D;
  if (!n)
    return;
  const timed t("embed", 0.0, 4.0 * M + 8.0 * n);
  PA_LAUNCH(k_embed, blocks(n), kBlock, 0)(M, D, ids, table, y);
  launched("embed");
}

void cu_add(int M, int N, const float *x, float *y) {
  const size_t n = (size_t)M * N;
  if (!n)
    return;
  const timed t("add", 0.0, 12.0 * n);
  PA_LAUNCH(k_add, blocks(n), kBlock, 0)(n, x, y);
  launched("add");
}

void cu_add_bias(int M, int N, const float *b, float *y) {
  const size_t n = (size_t)M * N;
  if (!n)
    return;
  const timed t("add_bias", 0.0, 8.0 * n + 4.0 * N);
  PA_LAUNCH(k_add_bias, blocks(n), kBlock, 0)(n, N, b, y);
  launched("add_bias");
}

void cu_scale(size_t n, float a, float *x) {
  if (!n)
    return;
  const timed t("scale", 0.0, 8.0 * n);
  PA_LAUNCH(k_scale, blocks(n), kBlock, 0)(n, a, x);
  launched("scale");
}

void cu_rmsnorm_backward(int M, int D, const float *x, const float *w, float eps, const float *dy, float *dx) {
  if (M <= 0)
    return;
  const timed t("rmsnorm_backward", 0.0, 4.0 * (4.0 * M * D + D));
  PA_LAUNCH(k_rmsnorm_backward, M, kBlock, 0)(D, x, w, eps, dy, dx);
  launched("rmsnorm_backward");
}

void cu_rope_backward(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab,
                      float *dx) {
  const size_t n = (size_t)M * n_heads * (hd / 2);
  if (!n)
    return;
  const timed t("rope_backward", 0.0, rope_bytes(M, n_heads, hd));
  PA_LAUNCH(k_rope, blocks(n), kBlock, 0)(M, n_heads, hd, pos, cos_tab, sin_tab, dx, -1.0f); /* by minus the angle */
  launched("rope_backward");
}

void cu_swiglu_backward(int M, int F, const float *gate, const float *up, const float *dh, float *dgate, float *dup) {
  const size_t n = (size_t)M * F;
  if (!n)
    return;
  const timed t("swiglu_backward", 0.0, 20.0 * n);
  PA_LAUNCH(k_swiglu_backward, blocks(n), kBlock, 0)(n, gate, up, dh, dgate, dup);
  launched("swiglu_backward");
}

size_t cu_attention_train_scratch(const pa_attn_train_args *a) { return (size_t)train_rows_of(a) * a->n_heads; }

void cu_attention_train(const pa_attn_train_args *a, float *scratch) {
  const int rows = train_rows_of(a);
  int max_keys;
  const int *row0, *len;
  const train_row *d = rows ? train_upload(a, rows, &max_keys, &row0, &len) : nullptr;
  if (!d)
    return;
  const size_t shared = ((size_t)max_keys + kBlock) * sizeof(float);
  if (!shared_for((const void *)k_train_fwd, kShTrainFwd, shared, "attention_train", max_keys))
    return;
  const timed t("attention_train");
  PA_LAUNCH(k_train_fwd, dim3((unsigned)rows, (unsigned)a->n_heads), kBlock, shared)(
      a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->k, a->v, a->z, a->lse, d);
  launched("attention_train");
}

void cu_attention_backward(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv,
                           float *scratch) {
  const int rows = train_rows_of(a), hd = a->head_dim;
  if (hd > 2 * kTrainBlock) {
    failed("attention_backward: head_dim %d > %d", hd, 2 * kTrainBlock);
    return;
  }
  int max_keys;
  const int *row0, *len;
  const train_row *d = rows ? train_upload(a, rows, &max_keys, &row0, &len) : nullptr;
  if (!d)
    return;
  float *D = scratch; /* [rows][H] */
  const size_t n = (size_t)rows * a->n_heads;
  const timed t("attention_backward");
  PA_LAUNCH(k_train_rowdot, blocks(n), kBlock, 0)(n, hd, dz, a->z, D);
  const size_t shared = (size_t)max_keys * sizeof(float);
  if (!shared_for((const void *)k_train_dq, kShTrainDq, shared, "attention_backward", max_keys))
    return;
  PA_LAUNCH(k_train_dq, dim3((unsigned)rows, (unsigned)a->n_heads), kBlock, shared)(
      a->n_heads, a->n_kv_heads, hd, a->q, a->k, a->v, dz, a->lse, D, dq, d);
  PA_LAUNCH(k_train_dkdv, dim3((unsigned)rows, (unsigned)a->n_kv_heads), kTrainBlock, 0)(
      a->n_heads, a->n_kv_heads, hd, a->prefix_len, a->n_seqs, row0, len, a->q, a->k, a->v, dz, a->lse, D, dk, dv, d);
  launched("attention_backward");
}

// The attention kernels, in the order of preference: the tensor cores'
// with bf16 operands (head dimensions up to 128; only when a program asks), with
// tf32 parts (multiples of 8 up to 128), the tiled one (up to 128), the
// simple one (any). pa_cuda_attention_kernel chooses where to start, by
// default from PALIGN_CUDA_ATTENTION when the device is selected.
enum attention_kernel { kAttnMmaBf16, kAttnMma, kAttnTiled, kAttnSimple };
const char *const kAttentionNames[] = {"mma_bf16", "mma", "tiled", "simple"};
attention_kernel attention_first = kAttnMma;

attention_kernel attention_for(int hd) {
  if (attention_first == kAttnMmaBf16 && hd <= kMmaMaxHd)
    return kAttnMmaBf16;
  if (attention_first <= kAttnMma && hd % 8 == 0 && hd <= kMmaMaxHd)
    return kAttnMma;
  if (attention_first != kAttnSimple && hd <= kTiledMaxHd)
    return kAttnTiled;
  return kAttnSimple;
}

// The tiles of a packed prefix (below) into out where it is not null:
// kTileQ consecutive rows at a time of the runs the sequences make, laid
// one after another in q (a gap, or a sequence placed before the one it
// follows, starts a new run); their count. Their rows see the prefix alone.
size_t prefix_tiles_of(const pa_attn_args *a, tile_desc *out) {
  size_t t = 0;
  int begin = 0, end = 0; // the run so far
  for (int i = 0; i <= a->n_seqs; i++) {
    const pa_attn_seq *s = i < a->n_seqs ? &a->seqs[i] : nullptr;
    if (s && !s->n)
      continue;
    if (!s || s->row0 != end) {
      for (int r = begin; r < end; r += kTileQ, t++)
        if (out)
          out[t] = tile_desc{
              (float *)a->k_prefix, (float *)a->v_prefix, a->prefix_stride, 0, end - r < kTileQ ? end - r : kTileQ, r};
      if (!s)
        break;
      begin = s->row0;
    }
    end = s->row0 + s->n;
  }
  return t;
}

// A call's rows, its tiles (of up to kTileQ rows of a sequence), the most
// keys a row sees, and for a packed prefix its tiles and the most own keys.
struct attention_shape {
  size_t rows, tiles;
  size_t z_rows; // the rows of q and z the call reaches: up to the last row0 + n
  int max_keys;
  size_t prefix_tiles;
  int max_own;
};

attention_shape shape_of(const pa_attn_args *a) {
  attention_shape sh = {0, 0, 0, 0, 0, 0};
  for (int i = 0; i < a->n_seqs; i++) {
    const pa_attn_seq *s = &a->seqs[i];
    sh.rows += (size_t)s->n;
    sh.tiles += (size_t)(s->n + kTileQ - 1) / kTileQ;
    sh.z_rows = s->n && (size_t)s->row0 + s->n > sh.z_rows ? (size_t)s->row0 + s->n : sh.z_rows;
    const int own = s->n ? s->past + s->n : 0;
    sh.max_own = own > sh.max_own ? own : sh.max_own;
  }
  sh.max_keys = sh.rows ? a->prefix_len + sh.max_own : 0;
  sh.prefix_tiles = a->prefix_len > 0 ? prefix_tiles_of(a, nullptr) : 0;
  return sh;
}

// The tensor cores' kernel's threads a block (32 for each query head of a
// kv head it takes) and blocks a tile (the kv heads times the chunks of
// their query heads).
struct mma_grid {
  int threads, blocks_per_tile;
};

mma_grid mma_grid_of(const pa_attn_args *a) {
  const int group = a->n_heads / a->n_kv_heads, warps = mma_warps(group), chunks = (group + warps - 1) / warps;
  return {32 * warps, a->n_kv_heads * chunks};
}

// Splitting a row's keys across blocks, as flash-decoding does: where the
// tensor cores' kernel would make fewer blocks than the device has SMs (a
// decoding step of one sequence makes one per kv head, 8 of an H100's 132
// for Llama-3-8B), each block would walk its keys alone, a key tile after
// the other, on an otherwise idle device. Then up to kMaxSplits blocks
// take a share of each tile's key tiles (at least kMinSplitTiles each),
// and k_attention_combine merges their shares (kept in the call's
// scratch). pa_cuda_attention_splits sets a number instead (at most
// kMaxSplits too).
constexpr int kMaxSplits = 32, kMinSplitTiles = 4;
int sm_count = 1;     // the device's multiprocessors
int splits_asked = 0; // 0: by the rule above; n: n (1: never split)
int splits_last = 1;  // what the last call used

// The shares a call's rows take, before the keys limit them (what its
// scratch is sized for, so that a sequence's decoding steps, whose keys
// grow, do not grow it: growing frees the old buffer, which waits).
int attention_split_cap(const pa_attn_args *a, const attention_shape &sh) {
  const attention_kernel kernel = attention_for(a->head_dim);
  if (!sh.rows || (kernel != kAttnMma && kernel != kAttnMmaBf16) || a->n_kv_heads < 1 || a->n_heads < a->n_kv_heads)
    return 1;
  int n = splits_asked;
  if (!n) { // as many as leave no SM idle, and no more
    const size_t blocks = sh.tiles * mma_grid_of(a).blocks_per_tile;
    n = blocks >= (size_t)sm_count ? 1 : (int)((size_t)sm_count / blocks);
  }
  return n < kMaxSplits ? n : kMaxSplits;
}

// The shares: the cap, at most one a key tile (and by the backend's choice
// kMinSplitTiles), then as few as take the same key tiles a share, so
// that none of the longest tile's is empty.
int attention_splits(const pa_attn_args *a, const attention_shape &sh) {
  const int key_tiles = (sh.max_keys + kTileK - 1) / kTileK;
  const int least = splits_asked ? 1 : kMinSplitTiles;
  int n = attention_split_cap(a, sh);
  n = n < key_tiles / least ? n : key_tiles / least;
  if (n <= 1)
    return 1;
  const int per = (key_tiles + n - 1) / n;
  return (key_tiles + per - 1) / per;
}

// Packing the shared prefix, as cascade attention does: a sequence's tiles
// hold its own rows, so where the sequences have few rows each, each tile
// walks the whole prefix with most of its rows idle (a decoding step of
// 180 sequences after a 2,400-token prefix: 180 tiles of one row, 75 key
// tiles each). But every row sees all of the prefix: so its rows pack into
// tiles of kTileQ consecutive rows, whatever their sequences, which walk
// the prefix alone (12 tiles there), while the sequences' own tiles walk
// their own keys alone; k_attention_combine merges the two walks' shares
// (the prefix's first) as it merges split keys. Done with the tensor
// cores' kernel where it at least halves the tiles walking the prefix and
// the prefix has kMinSplitTiles key tiles or more (below that, the second
// walk, the combining and the shares' round trip through memory cost more
// than the key tiles saved); pa_cuda_attention_packing asks for always or
// never instead.
int packing_asked = 0; // 0: by the rule above; 1: wherever there is a prefix; 2: never
bool packed_last;      // whether the last call packed

bool attention_packed(const pa_attn_args *a, const attention_shape &sh) {
  const attention_kernel kernel = attention_for(a->head_dim);
  if (!sh.rows || a->prefix_len <= 0 || (kernel != kAttnMma && kernel != kAttnMmaBf16) || packing_asked == 2)
    return false;
  return packing_asked == 1 || (a->prefix_len >= kMinSplitTiles * kTileK && sh.prefix_tiles * 2 <= sh.tiles);
}

// The two walks of a packed call: the prefix's tiles over the prefix, the
// sequences' tiles over their own keys.
attention_shape prefix_walk(const attention_shape &sh, int prefix_len) {
  attention_shape w = sh;
  w.tiles = sh.prefix_tiles, w.max_keys = prefix_len;
  return w;
}

attention_shape own_walk(const attention_shape &sh) {
  attention_shape w = sh;
  w.max_keys = sh.max_own;
  return w;
}

// The shares: [z rows][heads][shares][head_dim + 2] floats, for split keys
// and for a packed prefix's two walks.
size_t cu_attention_scratch(const pa_attn_args *a) {
  const attention_shape sh = shape_of(a);
  const int n = attention_packed(a, sh)
                    ? attention_split_cap(a, prefix_walk(sh, a->prefix_len)) + attention_split_cap(a, own_walk(sh))
                    : attention_split_cap(a, sh);
  return n > 1 ? sh.z_rows * a->n_heads * n * (a->head_dim + 2) : 0;
}

// A device buffer kept between calls, grown to hold bytes.
bool reserve(void **buf, size_t *cap, size_t bytes, const char *what) {
  if (bytes <= *cap)
    return true;
  cudaFree(*buf);
  *buf = nullptr, *cap = 0;
  if (!check(cudaMalloc(buf, bytes), what))
    return false;
  *cap = bytes;
  return true;
}

// One walk of k_attention_mma<Ops> over n_tiles tiles (at least one):
// their rows see the prefix's first prefix_len keys, and (own) their own;
// in `splits` shares written into part as shares slot0 on of `slots` (part
// null: z itself). which: its shared_set entry; what: its name in a
// message and the profile's. False where the kernel cannot start (the
// failure kept for status()).
template <class Ops>
bool walk_attention_mma(const pa_attn_args *a, const tile_desc *tiles, size_t n_tiles, int prefix_len, bool own,
                        int splits, float *part, int slots, int slot0, int which, const char *what, double flops,
                        double bytes) {
  const mma_grid g = mma_grid_of(a);
  const size_t shared = mma_shared_bytes<Ops>(a->head_dim, g.threads / 32);
  const dim3 grid((unsigned)n_tiles, (unsigned)g.blocks_per_tile, (unsigned)splits);
  if (!shared_for((const void *)k_attention_mma<Ops>, which, shared, what, 0))
    return false;
  const timed t(what, flops, bytes);
  PA_LAUNCH(k_attention_mma<Ops>, grid, g.threads, shared)
  (a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->z, prefix_len ? a->k_prefix : nullptr,
   prefix_len ? a->v_prefix : nullptr, prefix_len, a->prefix_stride, tiles, own ? 1 : 0, part, slots, slot0);
  return true;
}

// The least bytes of an attention call's parts, for the profile: its
// rows' q (as many as their outputs z), the prefix's keys and values, the
// sequences' own (each once), and a row's shares of a split or packed
// walk (its outputs, max and sum in each).
struct attention_bytes {
  double q, prefix_kv, own_kv, share;
  double shares(int n) const { return n * share; }
};

// The shares of the call's rows in part (the call's scratch) into z.
void combine_attention(const pa_attn_args *a, const attention_shape &sh, int slots, float *part,
                       const attention_bytes &b) {
  const timed t("attention: shares combined", 0.0, b.shares(slots) + b.q);
  const dim3 tiles_heads((unsigned)sh.tiles, (unsigned)a->n_heads);
  PA_LAUNCH(k_attention_combine, tiles_heads, 128, 0)(a->n_heads, a->head_dim, slots, part, a->z, tile_dev);
}

// The tensor cores' attention on the tiles in tile_dev (the sequences',
// then where packed the prefix's): in one walk over all of each row's
// keys, split or not, or in the packed prefix's two walks; flops: the
// call's (the profile's figure), prefix_flops: its part over the prefix;
// b: its bytes.
template <class Ops>
void attention_mma(const pa_attn_args *a, const attention_shape &sh, float *part, int which, const char *what,
                   double flops, double prefix_flops, const attention_bytes &b) {
  packed_last = attention_packed(a, sh);
  if (!packed_last) {
    const int splits = attention_splits(a, sh);
    splits_last = splits;
    const double bytes = b.q + (splits > 1 ? b.shares(splits) : b.q) + b.prefix_kv + b.own_kv;
    if (walk_attention_mma<Ops>(a, tile_dev, sh.tiles, a->prefix_len, true, splits, splits > 1 ? part : nullptr, splits,
                                0, which, what, flops, bytes) &&
        splits > 1)
      combine_attention(a, sh, splits, part, b);
    return;
  }
  const int ps = attention_splits(a, prefix_walk(sh, a->prefix_len)), os = attention_splits(a, own_walk(sh));
  splits_last = ps + os;
  char name[sizeof prof_rows[0].name];
  snprintf(name, sizeof name, "%s: packed prefix", what);
  if (!walk_attention_mma<Ops>(a, tile_dev + sh.tiles, sh.prefix_tiles, a->prefix_len, false, ps, part, ps + os, 0,
                               which, name, prefix_flops, b.q + b.shares(ps) + b.prefix_kv))
    return;
  snprintf(name, sizeof name, "%s: own keys", what);
  if (walk_attention_mma<Ops>(a, tile_dev, sh.tiles, 0, true, os, part, ps + os, ps, which, name, flops - prefix_flops,
                              b.q + b.shares(os) + b.own_kv))
    combine_attention(a, sh, ps + os, part, b);
}

void cu_attention(const pa_attn_args *a, float *scratch) {
  const attention_shape sh = shape_of(a);
  const size_t n_rows = sh.rows, n_tiles = sh.tiles;
  const int max_keys = sh.max_keys;
  if (!n_rows)
    return;
  const attention_kernel kernel = attention_for(a->head_dim);
  const bool rows_used = kernel == kAttnSimple; // the others, and the new keys' store, take tiles
  const size_t all_tiles = n_tiles + (attention_packed(a, sh) ? sh.prefix_tiles : 0);
  // the sequences' tiles, a packed prefix's, then (for the simple kernel) the rows, staged: no wait
  tile_desc *host_tiles =
      (tile_desc *)malloc(all_tiles * sizeof(tile_desc) + (rows_used ? n_rows * sizeof(row_desc) : 0));
  if (!host_tiles) {
    failed("attention: no host memory for %zu tile descriptors", all_tiles);
    return;
  }
  row_desc *host_rows = (row_desc *)(host_tiles + all_tiles);
  size_t k = 0, t = 0;
  double seen = 0.0; // the keys the rows see, summed: the products' size
  const double kv_bytes = 8.0 * a->n_kv_heads * a->head_dim; // a position's keys and values
  attention_bytes b = {4.0 * n_rows * a->n_heads * a->head_dim, kv_bytes * a->prefix_len, 0.0,
                       4.0 * n_rows * a->n_heads * (a->head_dim + 2.0)};
  for (int i = 0; i < a->n_seqs; i++) {
    const pa_attn_seq *s = &a->seqs[i];
    seen += (double)s->n * (a->prefix_len + s->past) + 0.5 * s->n * (s->n + 1.0);
    b.own_kv += s->n ? kv_bytes * (s->past + s->n) : 0.0;
    for (int j = 0; rows_used && j < s->n; j++)
      host_rows[k++] = row_desc{s->k_own, s->v_own, s->stride, s->past + j + 1, s->row0 + j};
    for (int j = s->n > 0 ? (s->n - 1) / kTileQ * kTileQ : -1; j >= 0; j -= kTileQ) // the longest first: no tail
      host_tiles[t++] =
          tile_desc{s->k_own, s->v_own, s->stride, s->past + j + 1, s->n - j < kTileQ ? s->n - j : kTileQ, s->row0 + j};
  }
  if (all_tiles > n_tiles)
    prefix_tiles_of(a, host_tiles + n_tiles);
  const bool placed =
      reserve((void **)&tile_dev, &tile_cap, all_tiles * sizeof(tile_desc), "attention: tile descriptors") &&
      (!rows_used || reserve((void **)&desc_dev, &desc_cap, n_rows * sizeof(row_desc), "attention: row descriptors"));
  if (placed) {
    stage_copy(tile_dev, host_tiles, all_tiles * sizeof(tile_desc), "attention: tables upload");
    if (rows_used)
      stage_copy(desc_dev, host_rows, n_rows * sizeof(row_desc), "attention: tables upload");
  }
  free(host_tiles);
  if (!placed)
    return;
  const size_t shared = ((size_t)max_keys + kBlock) * sizeof(float);
  if (rows_used && !shared_for((const void *)k_attention, kShAttention, shared, "attention", max_keys))
    return;
  if (a->k_new) {
    const timed store("attention: new keys into the caches", 0.0, 2.0 * kv_bytes * n_rows);
    PA_LAUNCH(k_store_new, (unsigned)n_tiles, kBlock, 0)(a->n_kv_heads, a->head_dim, a->k_new, a->v_new, tile_dev);
  }
  // the scratch holds the shares (cu_attention_scratch)
  const double flops = 4.0 * a->n_heads * a->head_dim * seen,
               prefix_flops = 4.0 * a->n_heads * a->head_dim * (double)n_rows * a->prefix_len;
  splits_last = 1, packed_last = false;
  if (kernel == kAttnMma)
    attention_mma<mma_tf32>(a, sh, scratch, kShAttentionMma, "attention (tensor cores)", flops, prefix_flops, b);
  else if (kernel == kAttnMmaBf16)
    attention_mma<mma_bf16>(a, sh, scratch, kShAttentionMmaBf16, "attention (tensor cores, bf16)", flops, prefix_flops,
                            b);
  else if (kernel == kAttnTiled) {
    const timed tt("attention (tiled)", flops, 2.0 * b.q + b.prefix_kv + b.own_kv);
    PA_LAUNCH(k_attention_tiled, dim3((unsigned)n_tiles, (unsigned)a->n_heads), kTiledThreads,
              tiled_shared_floats(a->head_dim) * sizeof(float))(a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->z,
                                                                a->k_prefix, a->v_prefix, a->prefix_len,
                                                                a->prefix_stride, tile_dev);
  } else {
    const timed ts("attention (simple)", flops, 2.0 * b.q + b.prefix_kv + b.own_kv);
    PA_LAUNCH(k_attention, dim3((unsigned)n_rows, (unsigned)a->n_heads), kBlock, shared)(
        a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->z, a->k_prefix, a->v_prefix, a->prefix_len,
        a->prefix_stride, desc_dev);
  }
  launched("attention");
}

// An allocation's failure is its NULL (the caller reports it), not an
// operation's: it is not kept for status().
void *cu_alloc(size_t bytes) {
  void *p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
  if (e == cudaSuccess)
    return p;
  cudaGetLastError(); // not left for the next launch's check
  snprintf(last_error, sizeof last_error, "alloc of %zu bytes: %s", bytes, cudaGetErrorString(e));
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

// ---- collectives between the worker ranks' GPUs (NCCL) ------------------------------

#ifdef PALIGN_HAVE_NCCL
bool check_nccl(ncclResult_t r, const char *what) {
  if (r == ncclSuccess)
    return true;
  snprintf(last_error, sizeof last_error, "%s: %s", what, ncclGetErrorString(r));
  return false;
}

int cu_group_id(void *id) {
  ncclUniqueId u;
  if (!check_nccl(ncclGetUniqueId(&u), "ncclGetUniqueId"))
    return -1;
  memcpy(id, &u, sizeof u);
  return 0;
}

int cu_group_join(const void *id, int n, int rank, pa_group **out) {
  ncclUniqueId u;
  memcpy(&u, id, sizeof u);
  ncclComm_t comm;
  if (!check_nccl(ncclCommInitRank(&comm, n, u, rank), "ncclCommInitRank"))
    return -1;
  *out = (pa_group *)comm; // the group is NCCL's communicator itself
  return 0;
}

int cu_group_allgather(pa_group *g, const float *send, size_t count, float *recv) {
  int members = 0;
  if (!check_nccl(ncclCommCount((ncclComm_t)g, &members), "ncclCommCount"))
    return -1;
  {
    const timed t("NCCL all-gather", 0.0, 4.0 * count * members); // what each member receives
    if (!check_nccl(ncclAllGather(send, recv, count, ncclFloat, (ncclComm_t)g, stream), "ncclAllGather"))
      return -1;
  }
  if (!wait_stream("ncclAllGather"))
    return -1;
  return 0;
}

void cu_group_leave(pa_group *g) {
  if (g)
    ncclCommDestroy((ncclComm_t)g);
}
constexpr size_t kGroupIdBytes = sizeof(ncclUniqueId);
#else
constexpr size_t kGroupIdBytes = 0;
int (*const cu_group_id)(void *) = nullptr;
int (*const cu_group_join)(const void *, int, int, pa_group **) = nullptr;
int (*const cu_group_allgather)(pa_group *, const float *, size_t, float *) = nullptr;
void (*const cu_group_leave)(pa_group *) = nullptr;
#endif

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
    cu_matmul_bf16,
    cu_matmul_nn_bf16,
    cu_embed_bf16,
    cu_alloc,
    cu_release,
    cu_upload,
    cu_download,
    cu_copy2d,
    0, /* device memory */
    kGroupIdBytes,
    cu_group_id,
    cu_group_join,
    cu_group_allgather,
    cu_group_leave,
    cu_error,
    cu_status,
};

// PALIGN_CUDA_PROFILE's file ("-": standard error; "%p" in it: the
// process's id), the table appended to it at exit in one write, so that
// the ranks of a run on one machine sharing the file do not interleave
// their lines (across machines on a shared file system they may: "%p"
// gives each its own file).
char *profile_path;

constexpr size_t kProfilePathMax = 4000; // characters of PALIGN_CUDA_PROFILE: room for the pids of its "%p"s

void profile_at_exit() {
  char path[2 * kProfilePathMax + 16];
  size_t at = 0;
  for (const char *c = profile_path; *c; c++)
    if (c[0] == '%' && c[1] == 'p')
      at += (size_t)snprintf(path + at, sizeof path - at, "%d", (int)getpid()), c++;
    else
      path[at++] = *c;
  path[at] = '\0';
  char *text = nullptr;
  size_t len = 0;
  FILE *mem = open_memstream(&text, &len);
  if (!mem) {
    fprintf(stderr, "palign: PALIGN_CUDA_PROFILE: no memory for the table: %s\n", strerror(errno));
    return;
  }
  pa_cuda_profile_write(mem);
  fclose(mem);
  const int fd = strcmp(path, "-") ? open(path, O_WRONLY | O_APPEND | O_CREAT, 0644) : 2;
  if (fd < 0 || write(fd, text, len) != (ssize_t)len)
    fprintf(stderr, "palign: PALIGN_CUDA_PROFILE: cannot write %s: %s\n", path, strerror(errno));
  if (fd > 2)
    close(fd);
  free(text);
}

// The profile on when PALIGN_CUDA_PROFILE names a file (set and empty: as unset), once a process.
int profile_from_env() {
  const char *path = getenv("PALIGN_CUDA_PROFILE");
  if (!path || !*path || profile_path)
    return 0;
  if (strlen(path) > kProfilePathMax) {
    snprintf(last_error, sizeof last_error, "PALIGN_CUDA_PROFILE: a name of %zu characters (at most %zu)", strlen(path),
             kProfilePathMax);
    return -1;
  }
  if (pa_cuda_profile(1) != 0)
    return -1;
  if (!(profile_path = strdup(path)) || atexit(profile_at_exit) != 0) {
    snprintf(last_error, sizeof last_error, "PALIGN_CUDA_PROFILE: cannot arrange the report at exit");
    return -1;
  }
  return 0;
}

bool by_time(const pa_cuda_profile_row &a, const pa_cuda_profile_row &b) { return a.ms > b.ms; }

} // namespace

extern "C" {

int pa_cuda_profile(int on) {
  if (!on) {
    const bool ok = !profiling || prof_harvest(); // the spans still in the pool counted
    profiling = false;
    prof_close();
    return ok ? 0 : -1;
  }
  if (!ready) {
    snprintf(last_error, sizeof last_error, "profile: no CUDA device selected");
    return -1;
  }
  if (!prof_pool && !prof_open())
    return -1;
  prof_used = 0, prof_have_last = false; // spans of a profile before: not harvested, not counted
  memset(prof_rows, 0, sizeof prof_rows);
  prof_n_rows = 0, prof_idle_ms = 0.0, prof_open_span = false;
  profiling = true;
  return 0;
}

int pa_cuda_profile_read(const pa_cuda_profile_row **rows, double *idle_ms) {
  if (profiling && !prof_harvest())
    return -1;
  *rows = prof_rows;
  *idle_ms = prof_idle_ms;
  return prof_n_rows;
}

void pa_cuda_profile_write(FILE *f) {
  const pa_cuda_profile_row *rows;
  double idle_ms;
  const int n = pa_cuda_profile_read(&rows, &idle_ms);
  if (n < 0) {
    fprintf(f, "palign: CUDA profile (pid %d): %s\n", (int)getpid(), last_error);
    return;
  }
  pa_cuda_profile_row sorted[kProfRows];
  memcpy(sorted, rows, (size_t)n * sizeof *rows);
  std::sort(sorted, sorted + n, by_time);
  double ms = 0.0;
  unsigned long spans = 0;
  for (int r = 0; r < n; r++)
    ms += sorted[r].ms, spans += sorted[r].spans;
  fprintf(f, "palign: CUDA device time by operation (pid %d, device %d)\n", (int)getpid(), device_used);
  fprintf(f, "  %.1f ms in %lu spans; idle %.1f ms between them (the host's work and waits): busy %.1f%%\n", ms, spans,
          idle_ms, ms + idle_ms > 0.0 ? 100.0 * ms / (ms + idle_ms) : 0.0);
  fprintf(f, "  %-47s %9s %12s %7s %9s %9s\n", "operation (products: N x K)", "spans", "ms", "share", "TFLOP/s",
          "GB/s");
  for (int r = 0; r < n; r++) {
    const pa_cuda_profile_row *w = &sorted[r];
    fprintf(f, "  %-47s %9lu %12.3f %6.1f%%", w->name, w->spans, w->ms, ms > 0.0 ? 100.0 * w->ms / ms : 0.0);
    const double rate = w->flops > 0.0 && w->ms > 0.0 ? w->flops / (w->ms * 1e-3) * 1e-12 : 0.0,
                 gbs = w->bytes > 0.0 && w->ms > 0.0 ? w->bytes / (w->ms * 1e-3) * 1e-9 : 0.0;
    if (rate > 0.0)
      fprintf(f, rate >= 10.0 ? " %9.1f" : " %9.3f", rate);
    else if (gbs > 0.0)
      fprintf(f, " %9s", "");
    if (gbs > 0.0)
      fprintf(f, gbs >= 10.0 ? " %9.1f" : " %9.3f", gbs);
    fputc('\n', f);
  }
}

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
  snprintf(last_error, sizeof last_error, "the CUDA driver cannot be used: %s (driver for CUDA %d.%d, palign built with %d.%d)",
           cudaGetErrorString(e), have / 1000, have % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
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
    if (profiling)
      prof_harvest();
    profiling = false;
    prof_close();
    stage_close();
    cublasDestroy(blas);
    cublasDestroy(blas16);
    cudaStreamDestroy(stream);
    cudaFree(desc_dev);
    cudaFree(tile_dev);
    cudaFree(train_dev);
    cudaFree(xb16);
    desc_dev = nullptr, desc_cap = 0, tile_dev = nullptr, tile_cap = 0, train_dev = nullptr, train_cap = 0;
    ready = false;
    xb16 = nullptr, xb16_cap = 0;
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

const char *pa_cuda_error(void) { return last_error; }

unsigned long pa_cuda_host_waits(void) { return host_waits; }

int pa_cuda_attention_splits(int n) {
  const int last = splits_last;
  if (n >= 0)
    splits_asked = n;
  return last;
}

int pa_cuda_attention_packing(int mode) {
  const int last = packed_last ? 1 : 0;
  if (mode >= 0 && mode <= 2)
    packing_asked = mode;
  return last;
}

int pa_cuda_attention_kernel(const char *name) {
  for (int k = 0; k < (int)(sizeof kAttentionNames / sizeof *kAttentionNames); k++)
    if (name && !strcmp(name, kAttentionNames[k])) {
      attention_first = (attention_kernel)k;
      return 0;
    }
  snprintf(last_error, sizeof last_error, "no attention kernel \"%.64s\" (mma, mma_bf16, tiled or simple)",
           name ? name : "");
  return -1;
}

} // extern "C"
