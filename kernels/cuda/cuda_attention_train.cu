// cuda_attention_train.cu: the attention over a training batch (backend.h
// pa_attn_train_args), forward and backward, for a low-rank adapter's
// training: simple kernels, a block per query row and head (forward, dQ)
// or per key row and kv head (dK, dV), no atomics, so that every run makes
// the same sums.
#include "cuda_internal.cuh"

#include <stdlib.h>

namespace palign_cuda {
namespace {

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
kept_buffer train_dev;

int train_rows_of(const pa_attn_train_args *a) {
  int rows = a->prefix_len;
  for (int i = 0; i < a->n_seqs; i++)
    rows = a->seq_row0[i] + a->seq_len[i] > rows ? a->seq_row0[i] + a->seq_len[i] : rows;
  return rows;
}

// Uploads the descriptors; the longest key list in *max_keys. NULL on error.
const train_row *train_upload(const pa_attn_train_args *a, int rows, int *max_keys, const int **row0, const int **len) {
  const size_t bytes = (size_t)rows * sizeof(train_row) + 2 * (size_t)a->n_seqs * sizeof(int);
  if (!reserve(train_dev, bytes, "attention_train: descriptors"))
    return nullptr;
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
  stage_copy(train_dev.p, host, bytes, "attention_train: tables upload");
  free(host);
  *row0 = (const int *)((train_row *)train_dev.p + rows);
  *len = *row0 + a->n_seqs;
  return (const train_row *)train_dev.p;
}

} // namespace

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
  PA_LAUNCH(k_train_fwd, dim3((unsigned)rows, (unsigned)a->n_heads), kBlock, shared)
  (a->n_heads, a->n_kv_heads, a->head_dim, a->q, a->k, a->v, a->z, a->lse, d);
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
  PA_LAUNCH(k_train_dq, dim3((unsigned)rows, (unsigned)a->n_heads), kBlock, shared)
  (a->n_heads, a->n_kv_heads, hd, a->q, a->k, a->v, dz, a->lse, D, dq, d);
  PA_LAUNCH(k_train_dkdv, dim3((unsigned)rows, (unsigned)a->n_kv_heads), kTrainBlock, 0)
  (a->n_heads, a->n_kv_heads, hd, a->prefix_len, a->n_seqs, row0, len, a->q, a->k, a->v, dz, a->lse, D, dk, dv, d);
  launched("attention_backward");
}

} // namespace palign_cuda
