// cuda_attention_train.cu: the attention over a training batch (backend.h
// pa_attn_train_args), forward and backward, for a low-rank adapter's
// training: simple kernels, a block per query row and head (forward, dQ)
// or per key row and kv head (dK, dV), no atomics, so that every run makes
// the same sums.
#include "cuda_internal.cuh"

#include <limits.h>
#include <stdlib.h>

namespace palign_cuda {
namespace {

// Query row r sees the keys [0, n_prefix) and [own_start, r] (rows of k and
// v): a prefix row the prefix up to itself (n_prefix 0, own_start 0), a
// sequence's row the whole prefix and its sequence up to itself. Key row j
// is seen by the query rows [j, q_end): a prefix key by every row after it
// (the prefix's, then every sequence's, laid after it and each other), a
// sequence's key by its sequence's rows from itself on.
struct train_row {
  int n_prefix, own_start, q_end;
};

constexpr int kTrainBlock = 128; // threads of the key-gradient kernel

__device__ inline int train_key_row(const train_row &d, int t) {
  return t < d.n_prefix ? t : d.own_start + (t - d.n_prefix);
}

// Forward: one block per (query row, head), as the inference attention's
// simple kernel (cuda_attention.cu), keeping each softmax's log-sum-exp.
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

// dK, dV: one block per (key row j, kv head), the key row the slower index
// (so the prefix keys, seen by every later row and so the longest, start
// first for every kv head), over the items that see the key: the kv head's
// g query heads of each query row in [j, q_end), item n being row
// j + n / g, head n % g of the group. No atomics: the items go in
// rounds of kTrainRound, each in two barriers (where two block-wide sums an
// item would take eighteen):
//  1. kTrainParts threads an item sum a part of its two dot products, q.k
//     and dz.v (dimensions part, part + kTrainParts, ...);
//  2. a thread an item adds its parts, in order, and turns them into the
//     item's weights: p = exp(s scale - lse) and scale dS = scale p (dp - D);
//  3. every thread adds the round's items, in order, to its dimensions of dk
//     (scale dS q) and dv (p dz).
// So every run makes the same sums. The next round needs no barrier before
// it: its step 1 writes only the parts, which step 2 has read before the
// second barrier, and its step 2 overwrites the weights only after its
// first barrier, which every thread reaches when done with step 3. k's and
// v's row j are read once, into shared memory, before the rounds.
constexpr int kTrainParts = 4;                         // threads a dot product
constexpr int kTrainRound = kTrainBlock / kTrainParts; // items a round
constexpr int kTrainMaxDim = 2 * kTrainBlock;          // head_dim at most: two dimensions a thread in step 3

__global__ void k_train_dkdv(int H, int KV, int hd, const float *q, const float *k, const float *v, const float *dz,
                             const float *lse, const float *D, float *dk, float *dv, const train_row *rows) {
  __shared__ float kj[kTrainMaxDim], vj[kTrainMaxDim];
  __shared__ float part_s[kTrainRound][kTrainParts], part_dp[kTrainRound][kTrainParts];
  __shared__ float w_q[kTrainRound], w_dz[kTrainRound]; // scale dS and p: each item's weights on q and dz
  const int j = blockIdx.x / KV, kh = blockIdx.x % KV, g = H / KV, tid = threadIdx.x;
  const float scale = rsqrtf((float)hd);
  // the item's (query row, head) as an index of lse and D, and times hd of q and dz
  auto item_at = [&](int n) { return (j + n / g) * H + kh * g + n % g; };
  for (int i = tid; i < hd; i += kTrainBlock)
    kj[i] = k[((size_t)j * KV + kh) * hd + i], vj[i] = v[((size_t)j * KV + kh) * hd + i];
  __syncthreads(); // k's and v's row j read
  const int n_items = (rows[j].q_end - j) * g, i0 = tid, i1 = tid + kTrainBlock;
  float ak0 = 0, ak1 = 0, av0 = 0, av1 = 0;
  for (int base = 0; base < n_items; base += kTrainRound) {
    const int n = n_items - base < kTrainRound ? n_items - base : kTrainRound;
    { // 1. the dot products' parts
      const int it = tid / kTrainParts, part = tid % kTrainParts;
      if (it < n) {
        const size_t at = (size_t)item_at(base + it) * hd;
        float s = 0, dp = 0;
        for (int d = part; d < hd; d += kTrainParts)
          s += q[at + d] * kj[d], dp += dz[at + d] * vj[d];
        part_s[it][part] = s, part_dp[it][part] = dp;
      }
    }
    __syncthreads(); // the parts written
    if (tid < n) {   // 2. the weights
      float s = 0, dp = 0;
      for (int part = 0; part < kTrainParts; part++)
        s += part_s[tid][part], dp += part_dp[tid][part];
      const int at = item_at(base + tid);
      const float p = expf(s * scale - lse[at]);
      w_q[tid] = scale * p * (dp - D[at]), w_dz[tid] = p;
    }
    __syncthreads();                 // the weights written
    for (int it = 0; it < n; it++) { // 3. into dk and dv
      const size_t at = (size_t)item_at(base + it) * hd;
      if (i0 < hd)
        ak0 += w_q[it] * q[at + i0], av0 += w_dz[it] * dz[at + i0];
      if (i1 < hd)
        ak1 += w_q[it] * q[at + i1], av1 += w_dz[it] * dz[at + i1];
    }
  }
  const size_t out = ((size_t)j * KV + kh) * hd;
  if (i0 < hd)
    dk[out + i0] = ak0, dv[out + i0] = av0;
  if (i1 < hd)
    dk[out + i1] = ak1, dv[out + i1] = av1;
}

// The rows' descriptors, [rows] train_row in device memory kept between calls.
kept_buffer train_dev;

int train_rows_of(const pa_attn_train_args *a) {
  int rows = a->prefix_len;
  for (int i = 0; i < a->n_seqs; i++)
    rows = a->seq_row0[i] + a->seq_len[i] > rows ? a->seq_row0[i] + a->seq_len[i] : rows;
  return rows;
}

// Uploads the descriptors; the longest key list in *max_keys. NULL on error,
// a layout other than backend.h's among them (the sequences after the
// prefix and each other, every one at least a row).
const train_row *train_upload(const pa_attn_train_args *a, const char *what, int rows, int *max_keys) {
  for (int i = 0, at = a->prefix_len; i < a->n_seqs; at += a->seq_len[i], i++)
    if (a->seq_row0[i] != at || a->seq_len[i] < 1) {
      failed("%s: sequence %d is rows [%d, %d), where backend.h lays it from row %d (the sequences after the prefix "
             "and each other, each at least a row)",
             what, i, a->seq_row0[i], a->seq_row0[i] + a->seq_len[i], at);
      return nullptr;
    }
  const size_t bytes = (size_t)rows * sizeof(train_row);
  if (!reserve(train_dev, bytes, "attention_train: descriptors"))
    return nullptr;
  train_row *d = (train_row *)malloc(bytes);
  if (!d) {
    failed("%s: no host memory for %d row descriptors", what, rows);
    return nullptr;
  }
  *max_keys = 0;
  for (int r = 0; r < a->prefix_len; r++) {
    d[r] = train_row{0, 0, rows};
    *max_keys = r + 1 > *max_keys ? r + 1 : *max_keys;
  }
  for (int i = 0; i < a->n_seqs; i++)
    for (int t = 0; t < a->seq_len[i]; t++) {
      d[a->seq_row0[i] + t] = train_row{a->prefix_len, a->seq_row0[i], a->seq_row0[i] + a->seq_len[i]};
      *max_keys = a->prefix_len + t + 1 > *max_keys ? a->prefix_len + t + 1 : *max_keys;
    }
  stage_copy(train_dev.p, d, bytes, "attention_train: tables upload");
  free(d);
  return (const train_row *)train_dev.p;
}

} // namespace

size_t cu_attention_train_scratch(const pa_attn_train_args *a) { return (size_t)train_rows_of(a) * a->n_heads; }

void cu_attention_train(const pa_attn_train_args *a, float *scratch) {
  const int rows = train_rows_of(a);
  int max_keys;
  const train_row *d = rows ? train_upload(a, "attention_train", rows, &max_keys) : nullptr;
  if (!d)
    return;
  const size_t shared = ((size_t)max_keys + kBlock) * sizeof(float);
  if (!shared_for((const void *)k_train_fwd, kShTrainFwd, shared, "attention_train", max_keys))
    return;
  const timed t("attention_train");
  PA_LAUNCH(k_train_fwd, dim3((unsigned)rows, (unsigned)a->n_heads), kBlock, shared)
  (a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->k, a->v, a->z, a->lse, d);
  launched("attention_train");
}

void cu_attention_backward(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv,
                           float *scratch) {
  const int rows = train_rows_of(a), hd = a->head_dim;
  if (hd > kTrainMaxDim) {
    failed("attention_backward: head_dim %d, at most %d", hd, kTrainMaxDim);
    return;
  }
  if ((size_t)rows * a->n_heads > INT_MAX - kTrainRound) { // k_train_dkdv's item indices, a round past the last
    failed("attention_backward: %d rows of %d heads, over %d (rows x heads)", rows, a->n_heads, INT_MAX - kTrainRound);
    return;
  }
  int max_keys;
  const train_row *d = rows ? train_upload(a, "attention_backward", rows, &max_keys) : nullptr;
  if (!d)
    return;
  const size_t shared = (size_t)max_keys * sizeof(float);
  if (!shared_for((const void *)k_train_dq, kShTrainDq, shared, "attention_backward", max_keys))
    return;
  // a span a kernel, so that the profile says which of them a training step waits on
  float *D = scratch; /* [rows][H] */
  const size_t n = (size_t)rows * a->n_heads;
  {
    const timed t("attention_backward: D = dz.z");
    PA_LAUNCH(k_train_rowdot, blocks(n), kBlock, 0)(n, hd, dz, a->z, D);
  }
  {
    const timed t("attention_backward: dQ");
    PA_LAUNCH(k_train_dq, dim3((unsigned)rows, (unsigned)a->n_heads), kBlock, shared)
    (a->n_heads, a->n_kv_heads, hd, a->q, a->k, a->v, dz, a->lse, D, dq, d);
  }
  {
    const timed t("attention_backward: dK, dV");
    PA_LAUNCH(k_train_dkdv, (unsigned)(rows * a->n_kv_heads), kTrainBlock, 0)
    (a->n_heads, a->n_kv_heads, hd, a->q, a->k, a->v, dz, a->lse, D, dk, dv, d);
  }
  launched("attention_backward");
}

} // namespace palign_cuda
