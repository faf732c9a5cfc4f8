// cuda_rows.cu: the elementwise and row operations, forward and backward:
// a thread per element, or a block per row where a row is summed (the sums
// in double, as the CPU reference sums them).
#include "cuda_internal.cuh"

namespace palign_cuda {
namespace {

__global__ void k_rmsnorm(int D, const float *x, const float *w, float eps, float *y) {
  const float *xm = x + (size_t)blockIdx.x * D;
  float *ym = y + (size_t)blockIdx.x * D;
  __shared__ double red[kBlock];
  double ss = 0; // in double, as the CPU reference sums
  for (int i = threadIdx.x; i < D; i += blockDim.x)
    ss += (double)xm[i] * xm[i];
  const float r = 1.0f / sqrtf((float)(block_sum(ss, red) / D) + eps);
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

// AdamW's step (backend.h), each double operation rounded as written: the _rn intrinsics are
// never fused into multiply-adds, so the bits are the CPU's (built with -ffp-contract=off).
__global__ void k_adamw(size_t n, pa_adamw_step s, float *w, const float *g, float *m, float *v) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n)
    return;
  const double gi = g[i];
  const double mi = __dadd_rn(__dmul_rn(s.beta1, m[i]), __dmul_rn(1 - s.beta1, gi));
  const double vi = __dadd_rn(__dmul_rn(s.beta2, v[i]), __dmul_rn(__dmul_rn(1 - s.beta2, gi), gi));
  m[i] = (float)mi, v[i] = (float)vi;
  const double step =
      __ddiv_rn(__dmul_rn(s.lr, __ddiv_rn(mi, s.c1)), __dadd_rn(__dsqrt_rn(__ddiv_rn(vi, s.c2)), s.eps));
  w[i] = (float)__dsub_rn(__dmul_rn(w[i], s.decay), step);
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

// Backward (a low-rank adapter's training).

__global__ void k_rmsnorm_backward(int D, const float *x, const float *w, float eps, const float *dy, float *dx) {
  const size_t off = (size_t)blockIdx.x * D;
  __shared__ double red[kBlock];
  double ss = 0, dot = 0;
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    ss += (double)x[off + i] * x[off + i];
    dot += (double)w[i] * dy[off + i] * x[off + i];
  }
  ss = block_sum(ss, red);
  dot = block_sum(dot, red);
  const double r = 1.0 / sqrt((double)(float)(ss / D) + (double)eps);
  const float a = (float)r, c = (float)(r * r * r * dot / D);
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

// RoPE's least bytes: the M rows' heads read and written, each row's
// position and its cos and sin rows (hd / 2 each) read once.
double rope_bytes(int M, int n_heads, int hd) { return 8.0 * M * n_heads * hd + 4.0 * M * (hd + 1.0); }

} // namespace

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

void cu_adamw(size_t n, const pa_adamw_step *s, float *w, const float *g, float *m, float *v) {
  if (!n)
    return;
  const timed t("adamw", 0.0, 28.0 * n); // w, g, m, v read; w, m, v written
  PA_LAUNCH(k_adamw, blocks(n), kBlock, 0)(n, *s, w, g, m, v);
  launched("adamw");
}

} // namespace palign_cuda
