// cuda_ops.cu: the CUDA backend (cuda_backend.h). One stream, one cuBLAS
// handle, per process; kernels sized by a fixed block and a grid over the
// elements or rows.
#include "cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

namespace {

char last_error[256];
bool ready;
int device_used = -1;
cudaStream_t stream;
cublasHandle_t blas;

constexpr int kBlock = 256;

bool check(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return true;
  snprintf(last_error, sizeof last_error, "%s: %s", what, cudaGetErrorString(e));
  return false;
}

bool check_blas(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS)
    return true;
  snprintf(last_error, sizeof last_error, "%s: cuBLAS status %d", what, (int)s);
  return false;
}

// Records a launch error; operations cannot fail by the interface, so a
// failed launch is kept for pa_cuda_error and the next download reports it.
void launched(const char *what) { check(cudaGetLastError(), what); }

unsigned blocks(size_t n) { return (unsigned)((n + kBlock - 1) / kBlock); }

// ---- elementwise and row kernels ---------------------------------------------------

__global__ void k_rmsnorm(int D, const float *x, const float *w, float eps, float *y) {
  const float *xm = x + (size_t)blockIdx.x * D;
  float *ym = y + (size_t)blockIdx.x * D;
  __shared__ double part[kBlock];
  double ss = 0;  // in double, as the CPU reference sums
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    ss += (double)xm[i] * xm[i];
  part[threadIdx.x] = ss;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
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
  const size_t mh = t / half;  // m * n_heads + h
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
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
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

// A query row of the call: its sequence's keys and values, where its own keys
// end (causal), and where q and z are.
struct row_desc {
  const float *k_own, *v_own;
  int stride;  // positions per kv head in k_own / v_own
  int n_own;   // own keys this row sees: past + j + 1
  int row;     // the row of q and z
};

// One block per (query row, head). The row's scores over its keys (the
// prefix's, then its own up to its position) go to shared memory, then the
// softmax (max, exponentials, sum: block reductions), then each thread
// computes output dimensions as sums over the keys.
__global__ void k_attention(int n_heads, int n_kv_heads, int hd, const float *q, float *z, const float *k_prefix,
                            const float *v_prefix, int prefix_len, int prefix_stride, const row_desc *rows) {
  extern __shared__ float sh[];  // [keys] scores, then [kBlock] for reductions
  const row_desc r = rows[blockIdx.x];
  const int h = blockIdx.y, kh = h / (n_heads / n_kv_heads), L = prefix_len + r.n_own;
  float *score = sh, *red = sh + L;
  const float *qh = q + ((size_t)r.row * n_heads + h) * hd;
  const float scale = rsqrtf((float)hd);
  const float *kp = k_prefix ? k_prefix + (size_t)kh * prefix_stride * hd : nullptr;
  const float *ko = r.k_own + (size_t)kh * r.stride * hd;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const float *k = j < prefix_len ? kp + (size_t)j * hd : ko + (size_t)(j - prefix_len) * hd;
    float s = 0;
    for (int d = 0; d < hd; d++)
      s += qh[d] * k[d];
    s *= scale;
    score[j] = s;
    mx = fmaxf(mx, s);
  }
  red[threadIdx.x] = mx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  mx = red[0];
  __syncthreads();
  float sum = 0;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const float e = expf(score[j] - mx);
    score[j] = e;
    sum += e;
  }
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s)
      red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  const float inv = 1.0f / red[0];
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

// The row descriptors of a call, in device memory kept between calls.
row_desc *desc_dev;
size_t desc_cap;

// ---- the operations --------------------------------------------------------------------

void cu_matmul(int M, int N, int K, const float *x, const float *w, float beta, float *y) {
  // row-major y[M][N] = x . w^T is column-major y^T = w^T(as stored) . x
  const float one = 1.0f;
  check_blas(cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, K, x, K, &beta, y, N), "matmul");
}

void cu_matmul_nn(int M, int N, int K, const float *x, const float *w, float beta, float *y) {
  const float one = 1.0f;
  check_blas(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &one, w, N, x, K, &beta, y, N), "matmul_nn");
}

void cu_matmul_tn_acc(int M, int N, int K, const float *a, const float *b, float *g) {
  // g[N][K] += a[M][N]^T . b[M][K]: column-major g^T (K x N) += b^T (K x M) . a (M x N)
  const float one = 1.0f;
  check_blas(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, &one, b, K, a, N, &one, g, K), "matmul_tn_acc");
}

void cu_rmsnorm(int M, int D, const float *x, const float *w, float eps, float *y) {
  if (M <= 0)
    return;
  k_rmsnorm<<<M, kBlock, 0, stream>>>(D, x, w, eps, y);
  launched("rmsnorm");
}

void cu_rope(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab, float *x) {
  const size_t n = (size_t)M * n_heads * (hd / 2);
  if (!n)
    return;
  k_rope<<<blocks(n), kBlock, 0, stream>>>(M, n_heads, hd, pos, cos_tab, sin_tab, x, 1.0f);
  launched("rope");
}

void cu_swiglu(int M, int F, float *gate, const float *up) {
  const size_t n = (size_t)M * F;
  if (!n)
    return;
  k_swiglu<<<blocks(n), kBlock, 0, stream>>>(n, gate, up);
  launched("swiglu");
}

void cu_embed(int M, int D, const int32_t *ids, const float *table, float *y) {
  const size_t n = (size_t)M * D;
  if (!n)
    return;
  k_embed<<<blocks(n), kBlock, 0, stream>>>(M, D, ids, table, y);
  launched("embed");
}

void cu_add(int M, int N, const float *x, float *y) {
  const size_t n = (size_t)M * N;
  if (!n)
    return;
  k_add<<<blocks(n), kBlock, 0, stream>>>(n, x, y);
  launched("add");
}

void cu_add_bias(int M, int N, const float *b, float *y) {
  const size_t n = (size_t)M * N;
  if (!n)
    return;
  k_add_bias<<<blocks(n), kBlock, 0, stream>>>(n, N, b, y);
  launched("add_bias");
}

void cu_scale(size_t n, float a, float *x) {
  if (!n)
    return;
  k_scale<<<blocks(n), kBlock, 0, stream>>>(n, a, x);
  launched("scale");
}

void cu_rmsnorm_backward(int M, int D, const float *x, const float *w, float eps, const float *dy, float *dx) {
  if (M <= 0)
    return;
  k_rmsnorm_backward<<<M, kBlock, 0, stream>>>(D, x, w, eps, dy, dx);
  launched("rmsnorm_backward");
}

void cu_rope_backward(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab,
                      float *dx) {
  const size_t n = (size_t)M * n_heads * (hd / 2);
  if (!n)
    return;
  k_rope<<<blocks(n), kBlock, 0, stream>>>(M, n_heads, hd, pos, cos_tab, sin_tab, dx, -1.0f); /* by minus the angle */
  launched("rope_backward");
}

void cu_swiglu_backward(int M, int F, const float *gate, const float *up, const float *dh, float *dgate, float *dup) {
  const size_t n = (size_t)M * F;
  if (!n)
    return;
  k_swiglu_backward<<<blocks(n), kBlock, 0, stream>>>(n, gate, up, dh, dgate, dup);
  launched("swiglu_backward");
}

size_t cu_attention_scratch(const pa_attn_args *a) { return 0; }

void cu_attention(const pa_attn_args *a, float *scratch) {
  size_t n_rows = 0;
  int max_keys = 0;
  for (int i = 0; i < a->n_seqs; i++) {
    n_rows += (size_t)a->seqs[i].n;
    const int keys = a->prefix_len + a->seqs[i].past + a->seqs[i].n;
    max_keys = keys > max_keys ? keys : max_keys;
  }
  if (!n_rows)
    return;
  if (n_rows > desc_cap) {
    cudaFree(desc_dev);
    desc_dev = nullptr, desc_cap = 0;
    if (!check(cudaMalloc(&desc_dev, n_rows * sizeof *desc_dev), "attention: row descriptors"))
      return;
    desc_cap = n_rows;
  }
  row_desc *host = (row_desc *)malloc(n_rows * sizeof *host);
  if (!host) {
    snprintf(last_error, sizeof last_error, "attention: no host memory for %zu row descriptors", n_rows);
    return;
  }
  size_t k = 0;
  for (int i = 0; i < a->n_seqs; i++) {
    const pa_attn_seq *s = &a->seqs[i];
    for (int j = 0; j < s->n; j++)
      host[k++] = row_desc{s->k_own, s->v_own, s->stride, s->past + j + 1, s->row0 + j};
  }
  check(cudaMemcpyAsync(desc_dev, host, n_rows * sizeof *host, cudaMemcpyHostToDevice, stream), "attention: upload");
  check(cudaStreamSynchronize(stream), "attention: upload"); /* host may be freed now */
  free(host);
  const size_t shared = ((size_t)max_keys + kBlock) * sizeof(float);
  static size_t shared_set = 48 << 10;
  if (shared > shared_set &&
      check(cudaFuncSetAttribute(k_attention, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared),
            "attention: shared memory"))
    shared_set = shared;
  k_attention<<<dim3((unsigned)n_rows, (unsigned)a->n_heads), kBlock, shared, stream>>>(
      a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->z, a->k_prefix, a->v_prefix, a->prefix_len, a->prefix_stride,
      desc_dev);
  launched("attention");
}

void *cu_alloc(size_t bytes) {
  void *p = nullptr;
  return check(cudaMalloc(&p, bytes ? bytes : 1), "alloc") ? p : nullptr;
}

void cu_release(void *p) {
  if (p)
    check(cudaFree(p), "free");
}

void cu_upload(void *dst, const void *src, size_t bytes) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), "upload");
  check(cudaStreamSynchronize(stream), "upload"); /* the caller may reuse src at once */
}

void cu_download(void *dst, const void *src, size_t bytes) {
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream), "download");
  check(cudaStreamSynchronize(stream), "download");
}

void cu_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height) {
  if (width && height)
    check(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToDevice, stream), "copy2d");
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
    nullptr, /* attention_train_scratch: next */
    nullptr, /* attention_train */
    nullptr, /* attention_backward */
    cu_alloc,
    cu_release,
    cu_upload,
    cu_download,
    cu_copy2d,
    0, /* device memory */
};

}  // namespace

extern "C" {

int pa_cuda_devices(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError(); /* no driver or no device: not an error to keep */
    return 0;
  }
  return n;
}

int pa_cuda_select(int device) {
  const int n = pa_cuda_devices();
  if (device < 0 || device >= n) {
    snprintf(last_error, sizeof last_error, "no CUDA device %d (%d visible)", device, n);
    return -1;
  }
  if (ready && device == device_used)
    return 0;
  if (ready) {
    cublasDestroy(blas);
    cudaStreamDestroy(stream);
    cudaFree(desc_dev);
    desc_dev = nullptr, desc_cap = 0, ready = false;
  }
  if (!check(cudaSetDevice(device), "cudaSetDevice") || !check(cudaStreamCreate(&stream), "cudaStreamCreate"))
    return -1;
  if (!check_blas(cublasCreate(&blas), "cublasCreate") || !check_blas(cublasSetStream(blas, stream), "cublasSetStream") ||
      !check_blas(cublasSetMathMode(blas, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode")) /* no TF32 */
    return -1;
  device_used = device, ready = true;
  return 0;
}

const pa_backend *pa_backend_cuda(void) {
  if (!ready && pa_cuda_select(0) != 0)
    return nullptr;
  return &cuda_backend;
}

const char *pa_cuda_error(void) { return last_error; }

}  // extern "C"
