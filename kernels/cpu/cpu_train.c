/* The CPU backend's training operations: the backward passes a low-rank
 * adapter needs (backend.h), and attention over a training batch (a shared
 * prefix and sequences in one set of rows), forward and backward.
 *
 * As in cpu_ops.c, results do not depend on the number of threads: products
 * are cut into output blocks of a fixed shape, each computed by one
 * single-threaded OpenBLAS call over the whole reduction; attention into
 * (segment, kv head) pieces whose partial key/value gradients are summed in
 * a fixed order. */
#include "backend.h"
#include "cpu_internal.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

void pa_cpu_scale(size_t n, float a, float *x) {
#pragma omp parallel for schedule(static) if (n > 16384) num_threads(pa_backend_threads())
  for (size_t i = 0; i < n; i++)
    x[i] *= a;
}

void pa_cpu_matmul_nn(int M, int N, int K, const float *x, const float *w, float beta, float *y) {
  const int col_blocks = (N + MATMUL_BLOCK - 1) / MATMUL_BLOCK, row_blocks = (M + MATMUL_ROWS - 1) / MATMUL_ROWS;
  const int blocks = col_blocks * row_blocks;
#pragma omp parallel for schedule(dynamic) num_threads(pa_backend_threads()) if (blocks > 1)
  for (int b = 0; b < blocks; b++) {
    const int m0 = b / col_blocks * MATMUL_ROWS, n0 = b % col_blocks * MATMUL_BLOCK;
    const int m = M - m0 < MATMUL_ROWS ? M - m0 : MATMUL_ROWS, n = N - n0 < MATMUL_BLOCK ? N - n0 : MATMUL_BLOCK;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, K, 1.0f, x + (size_t)m0 * K, K, w + n0, N, beta,
                y + (size_t)m0 * N + n0, N);
  }
}

void pa_cpu_matmul_tn_acc(int M, int N, int K, const float *a, const float *b, float *g) {
  const int col_blocks = (K + MATMUL_BLOCK - 1) / MATMUL_BLOCK, row_blocks = (N + MATMUL_ROWS - 1) / MATMUL_ROWS;
  const int blocks = col_blocks * row_blocks;
#pragma omp parallel for schedule(dynamic) num_threads(pa_backend_threads()) if (blocks > 1)
  for (int blk = 0; blk < blocks; blk++) {
    const int n0 = blk / col_blocks * MATMUL_ROWS, k0 = blk % col_blocks * MATMUL_BLOCK;
    const int n = N - n0 < MATMUL_ROWS ? N - n0 : MATMUL_ROWS, k = K - k0 < MATMUL_BLOCK ? K - k0 : MATMUL_BLOCK;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, k, M, 1.0f, a + n0, N, b + k0, K, 1.0f,
                g + (size_t)n0 * K + k0, K);
  }
}

/* y = w * x * r with r = (mean(x^2) + eps)^(-1/2):
 * dx_i = r w_i dy_i - x_i r^3 / D * sum_j w_j dy_j x_j. */
void pa_cpu_rmsnorm_backward(int M, int D, const float *x, const float *w, float eps, const float *dy, float *dx) {
#pragma omp parallel for schedule(static) if (M > 1) num_threads(pa_backend_threads())
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * D, *gm = dy + (size_t)m * D;
    float *om = dx + (size_t)m * D;
    double ss = 0, dot = 0;
    for (int i = 0; i < D; i++) {
      ss += (double)xm[i] * xm[i];
      dot += (double)w[i] * gm[i] * xm[i];
    }
    const double r = 1.0 / sqrt((double)(float)(ss / D) + (double)eps);
    const float a = (float)r, c = (float)(r * r * r * dot / D);
    for (int i = 0; i < D; i++)
      om[i] += a * w[i] * gm[i] - c * xm[i];
  }
}

void pa_cpu_rope_backward(int M, int n_heads, int hd, const int32_t *pos, const float *cos_tab, const float *sin_tab,
                          float *dx) {
  const int half = hd / 2;
#pragma omp parallel for schedule(static) if (M > 1) num_threads(pa_backend_threads())
  for (int m = 0; m < M; m++) {
    const float *c = cos_tab + (size_t)pos[m] * half, *s = sin_tab + (size_t)pos[m] * half;
    for (int h = 0; h < n_heads; h++) {
      float *v = dx + ((size_t)m * n_heads + h) * hd;
      for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] + b * s[i];
        v[i + half] = b * c[i] - a * s[i];
      }
    }
  }
}

/* h = silu(g) u, silu(g) = g sigma(g), silu'(g) = sigma(g) (1 + g (1 - sigma(g))),
 * with the forward's exponential. */
void pa_cpu_swiglu_backward(int M, int F, const float *gate, const float *up, const float *dh, float *dgate,
                            float *dup) {
  const size_t n = (size_t)M * F;
#pragma omp parallel for schedule(static) if (n > 4096) num_threads(pa_backend_threads())
  for (size_t i = 0; i < n; i++) {
    const float g = gate[i], sg = 1.0f / (1.0f + exp_approx(-g));
    dgate[i] = dh[i] * up[i] * (sg * (1.0f + g * (1.0f - sg)));
    dup[i] = dh[i] * (g * sg);
  }
}

/* -ffp-contract=off (CMakeLists.txt) keeps every product and sum rounded as
 * written, which the device's kernel does with its _rn intrinsics. */
void pa_cpu_adamw(size_t n, const pa_adamw_step *s, float *w, const float *g, float *m, float *v) {
#pragma omp parallel for schedule(static) if (n > 65536) num_threads(pa_backend_threads())
  for (size_t i = 0; i < n; i++) {
    const double gi = g[i];
    const double mi = s->beta1 * m[i] + (1 - s->beta1) * gi, vi = s->beta2 * v[i] + (1 - s->beta2) * gi * gi;
    m[i] = (float)mi, v[i] = (float)vi;
    w[i] = (float)(w[i] * s->decay - s->lr * (mi / s->c1) / (sqrt(vi / s->c2) + s->eps));
  }
}

/* ---- attention over a training batch ---------------------------------------
 * Segment -1 is the prefix (rows [0, P), no keys before its own), segment i
 * >= 0 sequence i (the P prefix keys, then its own). Within a (segment, kv
 * head) pair the query rows are r = j * g + i for the g query heads sharing
 * the kv head at the segment's token j, as in cpu_ops.c. */

typedef struct {
  int row0, n, P; /* the segment's first row, its tokens, and the prefix keys it sees first */
} segment;

static segment seg_of(const pa_attn_train_args *a, int s) {
  if (s < 0)
    return (segment){.row0 = 0, .n = a->prefix_len, .P = 0};
  return (segment){.row0 = a->seq_row0[s], .n = a->seq_len[s], .P = a->prefix_len};
}

static int n_segments(const pa_attn_train_args *a) { return a->n_seqs + (a->prefix_len > 0); }
/* Segment index k (0-based, prefix first when there is one) -> s for seg_of. */
static int seg_at(const pa_attn_train_args *a, int k) { return a->prefix_len > 0 ? k - 1 : k; }

static size_t max_keys(const pa_attn_train_args *a) {
  size_t mx = (size_t)a->prefix_len;
  for (int i = 0; i < a->n_seqs; i++)
    mx = (size_t)(a->prefix_len + a->seq_len[i]) > mx ? (size_t)(a->prefix_len + a->seq_len[i]) : mx;
  return mx;
}

/* Rows [r0, r1) of a piece between the batch's q/z-style rows ([rows][H][hd])
 * and a dense block [r1 - r0][hd]. */
static void gather(const float *src, const segment *sg, int H, int g, int kh, int hd, int r0, int r1, float *dst) {
  for (int r = r0; r < r1; r++)
    memcpy(dst + (size_t)(r - r0) * hd, src + ((size_t)(sg->row0 + r / g) * H + (size_t)kh * g + r % g) * hd,
           (size_t)hd * sizeof(float));
}

static void scatter(const float *src, const segment *sg, int H, int g, int kh, int hd, int r0, int r1, float *dst) {
  for (int r = r0; r < r1; r++)
    memcpy(dst + ((size_t)(sg->row0 + r / g) * H + (size_t)kh * g + r % g) * hd, src + (size_t)(r - r0) * hd,
           (size_t)hd * sizeof(float));
}

/* S[R][L] = scale * Qb . [K_prefix; K_own]^T (or dP = dZb . [V_prefix; V_own]^T with scale 1). */
static void scores(const pa_attn_train_args *a, const segment *sg, int kh, const float *kv, int R, float scale,
                   const float *Qb, float *S, int L) {
  const int hd = a->head_dim, ld = a->n_kv_heads * hd;
  if (sg->P > 0)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, sg->P, hd, scale, Qb, hd, kv + (size_t)kh * hd, ld, 0.0f, S,
                L);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, sg->n, hd, scale, Qb, hd,
              kv + (size_t)sg->row0 * ld + (size_t)kh * hd, ld, 0.0f, S + sg->P, L);
}

/* Keys of query row r of a segment: its prefix keys and own tokens 0..j. */
static int valid_keys(const segment *sg, int r, int g) { return sg->P + r / g + 1; }

static void train_rows(const pa_attn_train_args *a, const segment *sg, int kh, int r0, int r1, float *scratch) {
  const int hd = a->head_dim, H = a->n_heads, g = H / a->n_kv_heads, ld = a->n_kv_heads * hd;
  const int R = r1 - r0, L = sg->P + sg->n;
  const float scale = 1.0f / sqrtf((float)hd);
  float *Q = scratch, *S = Q + (size_t)R * hd, *Z = S + (size_t)R * L;
  gather(a->q, sg, H, g, kh, hd, r0, r1, Q);
  scores(a, sg, kh, a->k, R, scale, Q, S, L);
  for (int r = r0; r < r1; r++) {
    a->lse[(size_t)(sg->row0 + r / g) * H + (size_t)kh * g + r % g] =
        pa_cpu_softmax(S + (size_t)(r - r0) * L, valid_keys(sg, r, g), L);
  }
  if (sg->P > 0)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, hd, sg->P, 1.0f, S, L, a->v + (size_t)kh * hd, ld, 0.0f,
                Z, hd);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, hd, sg->n, 1.0f, S + sg->P, L,
              a->v + (size_t)sg->row0 * ld + (size_t)kh * hd, ld, sg->P > 0 ? 1.0f : 0.0f, Z, hd);
  scatter(Z, sg, H, g, kh, hd, r0, r1, a->z);
}

static int blocks_of(const pa_attn_train_args *a, const segment *sg) {
  const int rows = sg->n * (a->n_heads / a->n_kv_heads);
  return (rows + ATTN_ROWS - 1) / ATTN_ROWS;
}

static size_t forward_piece_floats(const pa_attn_train_args *a) {
  return (size_t)ATTN_ROWS * (2 * (size_t)a->head_dim + max_keys(a));
}

/* Backward scratch per thread: Q, dZ, dQ [ATTN_ROWS][hd], P, dP [ATTN_ROWS][L],
 * the row sums D [ATTN_ROWS], the piece's key and value gradients [L][hd] x 2.
 * Shared after them: the prefix keys' gradients by segment, [segments][kv][P][hd] x 2. */
static size_t backward_piece_floats(const pa_attn_train_args *a) {
  const size_t hd = (size_t)a->head_dim, L = max_keys(a);
  return ATTN_ROWS * (3 * hd + 2 * L + 1) + 2 * L * hd;
}

static size_t prefix_grad_floats(const pa_attn_train_args *a) {
  return 2 * (size_t)n_segments(a) * a->n_kv_heads * a->prefix_len * a->head_dim;
}

size_t pa_cpu_attention_train_scratch(const pa_attn_train_args *a) {
  const size_t f = forward_piece_floats(a), b = backward_piece_floats(a);
  return (f > b ? f : b) * (size_t)pa_backend_threads() + prefix_grad_floats(a);
}

void pa_cpu_attention_train(const pa_attn_train_args *a, float *scratch) {
  int pieces = 0;
  for (int k = 0; k < n_segments(a); k++) {
    const segment sg = seg_of(a, seg_at(a, k));
    pieces += a->n_kv_heads * blocks_of(a, &sg);
  }
  const size_t per_thread = forward_piece_floats(a);
#pragma omp parallel num_threads(pa_backend_threads()) if (pieces > 1)
  {
    float *mine = scratch + per_thread * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic)
    for (int p = 0; p < pieces; p++) {
      int k = 0, first = 0; /* the segment of piece p */
      segment sg = seg_of(a, seg_at(a, 0));
      while (p >= first + a->n_kv_heads * blocks_of(a, &sg)) {
        first += a->n_kv_heads * blocks_of(a, &sg);
        sg = seg_of(a, seg_at(a, ++k));
      }
      const int per_head = blocks_of(a, &sg), q = p - first, rows = sg.n * (a->n_heads / a->n_kv_heads);
      const int r0 = (q % per_head) * ATTN_ROWS, r1 = r0 + ATTN_ROWS < rows ? r0 + ATTN_ROWS : rows;
      train_rows(a, &sg, q / per_head, r0, r1, mine);
    }
  }
}

/* One (segment, kv head) piece: its query rows in blocks of ATTN_ROWS, in
 * order, with P recomputed from the forward's log-sum-exp:
 *   dV += P^T dZ,  dP = dZ V^T,  dS = P (dP - rowsum(dZ Z)),
 *   dQ = scale dS K,  dK += scale dS^T Q.
 * dQ goes to its rows; the own keys' dK/dV to theirs (no other piece has
 * them); the prefix keys' to this segment's slot of pgrad. */
static void backward_piece(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv, int k, int kh,
                           float *scratch, float *pgrad) {
  const segment sg = seg_of(a, seg_at(a, k));
  const int hd = a->head_dim, H = a->n_heads, KV = a->n_kv_heads, g = H / KV, ld = KV * hd;
  const int L = sg.P + sg.n, rows = sg.n * g;
  const float scale = 1.0f / sqrtf((float)hd);
  float *Q = scratch, *dZ = Q + (size_t)ATTN_ROWS * hd, *dQ = dZ + (size_t)ATTN_ROWS * hd;
  float *Pm = dQ + (size_t)ATTN_ROWS * hd, *dP = Pm + (size_t)ATTN_ROWS * L, *D = dP + (size_t)ATTN_ROWS * L;
  float *accK = D + ATTN_ROWS, *accV = accK + (size_t)L * hd;
  memset(accK, 0, 2 * (size_t)L * hd * sizeof(float));
  for (int r0 = 0; r0 < rows; r0 += ATTN_ROWS) {
    const int r1 = r0 + ATTN_ROWS < rows ? r0 + ATTN_ROWS : rows, R = r1 - r0;
    gather(a->q, &sg, H, g, kh, hd, r0, r1, Q);
    gather(dz, &sg, H, g, kh, hd, r0, r1, dZ);
    scores(a, &sg, kh, a->k, R, scale, Q, Pm, L);
    scores(a, &sg, kh, a->v, R, 1.0f, dZ, dP, L);
    for (int r = r0; r < r1; r++) {
      const size_t at = (size_t)(sg.row0 + r / g) * H + (size_t)kh * g + r % g;
      const float lse = a->lse[at], *zr = a->z + at * hd, *dzr = dZ + (size_t)(r - r0) * hd;
      double d = 0;
      for (int i = 0; i < hd; i++)
        d += (double)dzr[i] * zr[i];
      D[r - r0] = (float)d;
      float *pr = Pm + (size_t)(r - r0) * L, *dpr = dP + (size_t)(r - r0) * L;
      const int valid = valid_keys(&sg, r, g);
      for (int i = 0; i < valid; i++) {
        pr[i] = exp_approx(pr[i] - lse);
        dpr[i] = pr[i] * (dpr[i] - D[r - r0]); /* dS */
      }
      for (int i = valid; i < L; i++)
        pr[i] = dpr[i] = 0;
    }
    /* accV += P^T dZ; accK += scale dS^T Q; dQ = scale dS K */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, L, hd, R, 1.0f, Pm, L, dZ, hd, 1.0f, accV, hd);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, L, hd, R, scale, dP, L, Q, hd, 1.0f, accK, hd);
    if (sg.P > 0)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, hd, sg.P, scale, dP, L, a->k + (size_t)kh * hd, ld,
                  0.0f, dQ, hd);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, R, hd, sg.n, scale, dP + sg.P, L,
                a->k + (size_t)sg.row0 * ld + (size_t)kh * hd, ld, sg.P > 0 ? 1.0f : 0.0f, dQ, hd);
    scatter(dQ, &sg, H, g, kh, hd, r0, r1, dq);
  }
  /* the prefix keys (all of a prefix segment's keys are prefix keys) */
  const int np = sg.P > 0 ? sg.P : (seg_at(a, k) < 0 ? sg.n : 0);
  const size_t slot = ((size_t)k * KV + kh) * a->prefix_len * hd, half = prefix_grad_floats(a) / 2;
  if (np > 0) {
    memcpy(pgrad + slot, accK, (size_t)np * hd * sizeof(float));
    memcpy(pgrad + half + slot, accV, (size_t)np * hd * sizeof(float));
  }
  if (seg_at(a, k) >= 0)
    for (int t = 0; t < sg.n; t++) {
      memcpy(dk + (size_t)(sg.row0 + t) * ld + (size_t)kh * hd, accK + (size_t)(sg.P + t) * hd,
             (size_t)hd * sizeof(float));
      memcpy(dv + (size_t)(sg.row0 + t) * ld + (size_t)kh * hd, accV + (size_t)(sg.P + t) * hd,
             (size_t)hd * sizeof(float));
    }
}

void pa_cpu_attention_backward(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv,
                               float *scratch) {
  const int KV = a->n_kv_heads, segs = n_segments(a), pieces = segs * KV, hd = a->head_dim, P = a->prefix_len;
  const size_t per_thread = backward_piece_floats(a);
  float *pgrad = scratch + per_thread * (size_t)pa_backend_threads();
#pragma omp parallel num_threads(pa_backend_threads()) if (pieces > 1)
  {
    float *mine = scratch + per_thread * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic)
    for (int p = 0; p < pieces; p++)
      backward_piece(a, dz, dq, dk, dv, p / KV, p % KV, mine, pgrad);
  }
  /* the prefix keys' gradients, summed over segments in order */
  const size_t half = prefix_grad_floats(a) / 2;
#pragma omp parallel for schedule(static) num_threads(pa_backend_threads()) if ((size_t)P * KV > 64)
  for (int t = 0; t < P; t++)
    for (int kh = 0; kh < KV; kh++) {
      float *ok = dk + ((size_t)t * KV + kh) * hd, *ov = dv + ((size_t)t * KV + kh) * hd;
      memset(ok, 0, (size_t)hd * sizeof(float));
      memset(ov, 0, (size_t)hd * sizeof(float));
      for (int k = 0; k < segs; k++) {
        const float *sk = pgrad + (((size_t)k * KV + kh) * P + t) * hd, *sv = sk + half;
        for (int i = 0; i < hd; i++) {
          ok[i] += sk[i];
          ov[i] += sv[i];
        }
      }
    }
}
