// cuda_attention.cu: the inference attention (backend.h pa_attn_args:
// grouped K/V heads, causal, a shared prefix and per-sequence caches): its
// kernels (the tensor cores', the tiled one, the simple one), and how a
// call is split among their blocks (split keys, a packed prefix).
#include "cuda_internal.cuh"

#include <mma.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace palign_cuda {
namespace {

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
constexpr int kRowThreads = kTiledThreads / kTileQ;       // threads per query row in the value sums: 8
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

__global__ void k_attention_tiled(int n_heads, int n_kv_heads, int hd, const float *q, float *z, const float *k_prefix,
                                  const float *v_prefix, int prefix_len, int prefix_stride, const tile_desc *tiles) {
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
    if (live) {      // the scores of this warp's head: keys 0-15 and 16-31 of the tile
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
kept_buffer desc_buf, tile_buf;
row_desc *desc_dev() { return (row_desc *)desc_buf.p; }
tile_desc *tile_dev() { return (tile_desc *)tile_buf.p; }

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
  PA_LAUNCH(k_attention_combine, tiles_heads, 128, 0)(a->n_heads, a->head_dim, slots, part, a->z, tile_dev());
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
    if (walk_attention_mma<Ops>(a, tile_dev(), sh.tiles, a->prefix_len, true, splits, splits > 1 ? part : nullptr,
                                splits, 0, which, what, flops, bytes) &&
        splits > 1)
      combine_attention(a, sh, splits, part, b);
    return;
  }
  const int ps = attention_splits(a, prefix_walk(sh, a->prefix_len)), os = attention_splits(a, own_walk(sh));
  splits_last = ps + os;
  char name[kProfNameBytes];
  snprintf(name, sizeof name, "%s: packed prefix", what);
  if (!walk_attention_mma<Ops>(a, tile_dev() + sh.tiles, sh.prefix_tiles, a->prefix_len, false, ps, part, ps + os, 0,
                               which, name, prefix_flops, b.q + b.shares(ps) + b.prefix_kv))
    return;
  snprintf(name, sizeof name, "%s: own keys", what);
  if (walk_attention_mma<Ops>(a, tile_dev(), sh.tiles, 0, true, os, part, ps + os, ps, which, name,
                              flops - prefix_flops, b.q + b.shares(os) + b.own_kv))
    combine_attention(a, sh, ps + os, part, b);
}

} // namespace

// The shares: [z rows][heads][shares][head_dim + 2] floats, for split keys
// and for a packed prefix's two walks.
size_t cu_attention_scratch(const pa_attn_args *a) {
  const attention_shape sh = shape_of(a);
  const int n = attention_packed(a, sh)
                    ? attention_split_cap(a, prefix_walk(sh, a->prefix_len)) + attention_split_cap(a, own_walk(sh))
                    : attention_split_cap(a, sh);
  return n > 1 ? sh.z_rows * a->n_heads * n * (a->head_dim + 2) : 0;
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
  double seen = 0.0;                                         // the keys the rows see, summed: the products' size
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
  const bool placed = reserve(tile_buf, all_tiles * sizeof(tile_desc), "attention: tile descriptors") &&
                      (!rows_used || reserve(desc_buf, n_rows * sizeof(row_desc), "attention: row descriptors"));
  if (placed) {
    stage_copy(tile_dev(), host_tiles, all_tiles * sizeof(tile_desc), "attention: tables upload");
    if (rows_used)
      stage_copy(desc_dev(), host_rows, n_rows * sizeof(row_desc), "attention: tables upload");
  }
  free(host_tiles);
  if (!placed)
    return;
  const size_t shared = ((size_t)max_keys + kBlock) * sizeof(float);
  if (rows_used && !shared_for((const void *)k_attention, kShAttention, shared, "attention", max_keys))
    return;
  if (a->k_new) {
    const timed store("attention: new keys into the caches", 0.0, 2.0 * kv_bytes * n_rows);
    PA_LAUNCH(k_store_new, (unsigned)n_tiles, kBlock, 0)(a->n_kv_heads, a->head_dim, a->k_new, a->v_new, tile_dev());
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
              tiled_shared_floats(a->head_dim) * sizeof(float))
    (a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->z, a->k_prefix, a->v_prefix, a->prefix_len, a->prefix_stride,
     tile_dev());
  } else {
    const timed ts("attention (simple)", flops, 2.0 * b.q + b.prefix_kv + b.own_kv);
    PA_LAUNCH(k_attention, dim3((unsigned)n_rows, (unsigned)a->n_heads), kBlock, shared)
    (a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->z, a->k_prefix, a->v_prefix, a->prefix_len, a->prefix_stride,
     desc_dev());
  }
  launched("attention");
}

} // namespace palign_cuda

using namespace palign_cuda;

extern "C" {

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
