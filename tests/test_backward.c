/* The CPU backend's training operations (backend.h): each backward pass
 * against central finite differences of its forward operation, and the
 * training attention and the two new products against naive double loops.
 *
 * Finite differences: for an operation y = f(x) and a fixed random upstream
 * gradient g, L(x) = sum g . f(x) is computed in double from the fp32
 * outputs; (L(x + h e_i) - L(x - h e_i)) / 2h, with h = 1e-2 on inputs of
 * size about 1, is compared with the backward pass's dx_i for every i.
 * Precision of that check: the fp32 outputs carry a relative rounding of
 * about 1e-7, which over the tens to hundreds of terms of L divided by 2h
 * gives about 1e-5 of absolute error; the truncation error h^2 f'''/6 is of
 * the same order. The bound is 1e-3 relative to the largest gradient
 * (measured errors are printed; they are 1e-6 to 1e-4). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "testutil.h"

#define FD_H   1e-2
#define FD_TOL 1e-3

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
#define frand()     tu_frand(&rng)
#define rand_vec(n) tu_rand_vec(&rng, (n))
static double dot(const float *a, const float *b, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; i++)
    s += (double)a[i] * b[i];
  return s;
}

/* Checks the analytic gradient an[0..n) of L against central differences,
 * perturbing x[i] (an input of loss(ctx)) in place. */
static void fd_check(const char *what, float *x, const float *an, size_t n, double (*loss)(void *), void *ctx) {
  double worst = 0, scale = 0;
  for (size_t i = 0; i < n; i++)
    scale = fmax(scale, fabs(an[i]));
  for (size_t i = 0; i < n; i++) {
    const float keep = x[i];
    x[i] = keep + (float)FD_H;
    const double up = loss(ctx);
    x[i] = keep - (float)FD_H;
    const double down = loss(ctx);
    x[i] = keep;
    const double fd = (up - down) / (2 * FD_H), err = fabs(fd - an[i]) / (scale > 0 ? scale : 1);
    if (err > worst)
      worst = err;
    if (!(err <= FD_TOL))
      fail_msg("%s[%zu]: analytic %.8g, finite difference %.8g (relative error %.3g > %g)", what, i, an[i], fd, err,
               FD_TOL);
  }
  printf("  %-40s %zu coordinates, max relative error %.2g (largest gradient %.3g)\n", what, n, worst, scale);
  assert_true(scale > 0); /* a check on all-zero gradients would prove nothing */
}

/* ---- rmsnorm -------------------------------------------------------------- */

enum { NM = 3, ND = 19 };
static struct { float x[NM * ND], w[ND], g[NM * ND], y[NM * ND]; } rn;

static double rmsnorm_loss(void *ctx) {
  (void)ctx;
  pa_backend_cpu()->rmsnorm(NM, ND, rn.x, rn.w, 1e-5f, rn.y);
  return dot(rn.g, rn.y, NM * ND);
}

static void test_rmsnorm_backward(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cpu();
  for (int i = 0; i < NM * ND; i++)
    rn.x[i] = frand(), rn.g[i] = frand();
  for (int i = 0; i < ND; i++)
    rn.w[i] = 0.5f + frand();
  float dx[NM * ND], base[NM * ND];
  for (int i = 0; i < NM * ND; i++)
    base[i] = dx[i] = 0.25f * (float)i; /* the op accumulates into dx */
  be->rmsnorm_backward(NM, ND, rn.x, rn.w, 1e-5f, rn.g, dx);
  for (int i = 0; i < NM * ND; i++)
    dx[i] -= base[i];
  fd_check("rmsnorm_backward dx", rn.x, dx, NM * ND, rmsnorm_loss, NULL);
}

/* ---- rope ------------------------------------------------------------------- */

enum { RM = 4, RH = 3, RD = 10, RPOS = 40 };
static struct {
  float x[RM * RH * RD], g[RM * RH * RD], y[RM * RH * RD], cos_t[RPOS * RD / 2], sin_t[RPOS * RD / 2];
  int32_t pos[RM];
} rp;

static double rope_loss(void *ctx) {
  (void)ctx;
  memcpy(rp.y, rp.x, sizeof rp.x);
  pa_backend_cpu()->rope(RM, RH, RD, rp.pos, rp.cos_t, rp.sin_t, rp.y);
  return dot(rp.g, rp.y, RM * RH * RD);
}

static void test_rope_backward(void **s) {
  (void)s;
  for (int p = 0; p < RPOS; p++)
    for (int i = 0; i < RD / 2; i++) {
      rp.cos_t[p * RD / 2 + i] = (float)cos(p * pow(1e4, -2.0 * i / RD));
      rp.sin_t[p * RD / 2 + i] = (float)sin(p * pow(1e4, -2.0 * i / RD));
    }
  const int32_t pos[RM] = {0, 3, 17, 39};
  memcpy(rp.pos, pos, sizeof pos);
  for (int i = 0; i < RM * RH * RD; i++)
    rp.x[i] = frand(), rp.g[i] = frand();
  float dx[RM * RH * RD];
  memcpy(dx, rp.g, sizeof dx);
  pa_backend_cpu()->rope_backward(RM, RH, RD, rp.pos, rp.cos_t, rp.sin_t, dx);
  fd_check("rope_backward dx", rp.x, dx, RM * RH * RD, rope_loss, NULL);
}

/* ---- swiglu ----------------------------------------------------------------- */

enum { SM = 3, SF = 29 };
static struct { float gate[SM * SF], up[SM * SF], g[SM * SF], y[SM * SF]; } sw;

static double swiglu_loss(void *ctx) {
  (void)ctx;
  memcpy(sw.y, sw.gate, sizeof sw.y);
  pa_backend_cpu()->swiglu(SM, SF, sw.y, sw.up);
  return dot(sw.g, sw.y, SM * SF);
}

static void test_swiglu_backward(void **s) {
  (void)s;
  for (int i = 0; i < SM * SF; i++)
    sw.gate[i] = 4 * frand(), sw.up[i] = frand(), sw.g[i] = frand();
  float dgate[SM * SF], dup[SM * SF];
  pa_backend_cpu()->swiglu_backward(SM, SF, sw.gate, sw.up, sw.g, dgate, dup);
  fd_check("swiglu_backward dgate", sw.gate, dgate, SM * SF, swiglu_loss, NULL);
  fd_check("swiglu_backward dup", sw.up, dup, SM * SF, swiglu_loss, NULL);
}

/* ---- the products ---------------------------------------------------------- */

static void test_products(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cpu();
  /* shapes across the 256 blocks of the CPU backend, not multiples of them */
  const int M = 300, N = 270, K = 37;
  float *x = rand_vec((size_t)M * K), *w = rand_vec((size_t)K * N), *y = rand_vec((size_t)M * N);
  double *want = malloc((size_t)M * N * sizeof *want);
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      double acc = 0.5 * y[(size_t)m * N + n];
      for (int k = 0; k < K; k++)
        acc += (double)x[(size_t)m * K + k] * w[(size_t)k * N + n];
      want[(size_t)m * N + n] = acc;
    }
  be->matmul_nn(M, N, K, x, w, 0.5f, y);
  for (size_t i = 0; i < (size_t)M * N; i++)
    if (!(fabs(y[i] - want[i]) <= 1e-5 * 8))
      fail_msg("matmul_nn[%zu]: %g vs %g", i, y[i], want[i]);
  /* g[N][K] += a[M][N]^T b[M][K] */
  float *a = rand_vec((size_t)M * N), *b = rand_vec((size_t)M * K), *g = rand_vec((size_t)N * K);
  double *wg = malloc((size_t)N * K * sizeof *wg);
  for (int n = 0; n < N; n++)
    for (int k = 0; k < K; k++) {
      double acc = g[(size_t)n * K + k];
      for (int m = 0; m < M; m++)
        acc += (double)a[(size_t)m * N + n] * b[(size_t)m * K + k];
      wg[(size_t)n * K + k] = acc;
    }
  be->matmul_tn_acc(M, N, K, a, b, g);
  for (size_t i = 0; i < (size_t)N * K; i++)
    if (!(fabs(g[i] - wg[i]) <= 1e-5 * 20)) /* sums of 300 products of size 1: scale ~17 */
      fail_msg("matmul_tn_acc[%zu]: %g vs %g", i, g[i], wg[i]);
  float v[5] = {1, -2, 3, 0, 0.5f};
  be->scale(5, -2.0f, v);
  assert_true(v[0] == -2 && v[1] == 4 && v[2] == -6 && v[3] == 0 && v[4] == -1);
  free(x), free(w), free(y), free(want), free(a), free(b), free(g), free(wg);
}

/* ---- training attention ------------------------------------------------------ */

typedef struct {
  pa_attn_train_args a;
  float *q, *k, *v, *z, *lse, *g, *scratch;
  int rows;
} attn_case;

static void attn_make(attn_case *c, int H, int KV, int hd, int P, const int *lens, int n_seqs, int threads) {
  pa_backend_set_threads(threads);
  static int row0[8], len[8];
  int rows = P;
  for (int i = 0; i < n_seqs; i++) {
    row0[i] = rows;
    len[i] = lens[i];
    rows += lens[i];
  }
  c->rows = rows;
  c->q = rand_vec((size_t)rows * H * hd);
  c->k = rand_vec((size_t)rows * KV * hd);
  c->v = rand_vec((size_t)rows * KV * hd);
  c->g = rand_vec((size_t)rows * H * hd);
  for (size_t i = 0; i < (size_t)rows * H * hd; i++)
    c->q[i] *= 2; /* scores of a few units: softmax far from uniform */
  c->z = malloc((size_t)rows * H * hd * sizeof(float));
  c->lse = malloc((size_t)rows * H * sizeof(float));
  c->a = (pa_attn_train_args){.n_heads = H,
                              .n_kv_heads = KV,
                              .head_dim = hd,
                              .prefix_len = P,
                              .n_seqs = n_seqs,
                              .seq_row0 = row0,
                              .seq_len = len,
                              .q = c->q,
                              .k = c->k,
                              .v = c->v,
                              .z = c->z,
                              .lse = c->lse};
  c->scratch = malloc(pa_backend_cpu()->attention_train_scratch(&c->a) * sizeof(float));
}

static void attn_free(attn_case *c) {
  free(c->q), free(c->k), free(c->v), free(c->z), free(c->lse), free(c->g), free(c->scratch);
  pa_backend_set_threads(0);
}

static double attn_loss(void *ctx) {
  attn_case *c = ctx;
  pa_backend_cpu()->attention_train(&c->a, c->scratch);
  return dot(c->g, c->z, (size_t)c->rows * c->a.n_heads * c->a.head_dim);
}

/* Naive: row t of segment s attends to the prefix (for a sequence) and its own tokens up to t. */
static void attn_naive(const attn_case *c, double *z, double *lse) {
  const pa_attn_train_args *a = &c->a;
  const int H = a->n_heads, KV = a->n_kv_heads, hd = a->head_dim, P = a->prefix_len, g = H / KV;
  for (int row = 0; row < c->rows; row++) {
    int start = 0, own0 = 0; /* keys [0, P) then [own0, row] for sequence rows; [0, row] for prefix rows */
    if (row >= P) {
      int s = 0;
      while (s + 1 < a->n_seqs && row >= a->seq_row0[s + 1])
        s++;
      own0 = a->seq_row0[s];
      start = P;
    }
    for (int h = 0; h < H; h++) {
      const int kh = h / g;
      double sc[64], mx = -INFINITY, sum = 0;
      int nk = 0, keys[64];
      for (int t = 0; t < start; t++)
        keys[nk++] = t;
      for (int t = row >= P ? own0 : 0; t <= row; t++)
        keys[nk++] = t;
      for (int j = 0; j < nk; j++) {
        sc[j] = dot(c->q + ((size_t)row * H + h) * hd, c->k + ((size_t)keys[j] * KV + kh) * hd, (size_t)hd) / sqrt(hd);
        mx = fmax(mx, sc[j]);
      }
      for (int j = 0; j < nk; j++)
        sum += exp(sc[j] - mx);
      lse[(size_t)row * H + h] = mx + log(sum);
      for (int i = 0; i < hd; i++) {
        double acc = 0;
        for (int j = 0; j < nk; j++)
          acc += exp(sc[j] - mx) / sum * c->v[((size_t)keys[j] * KV + kh) * hd + i];
        z[((size_t)row * H + h) * hd + i] = acc;
      }
    }
  }
}

static void check_attention_forward(int H, int KV, int hd, int P, const int *lens, int n_seqs, int threads) {
  attn_case c;
  attn_make(&c, H, KV, hd, P, lens, n_seqs, threads);
  pa_backend_cpu()->attention_train(&c.a, c.scratch);
  const size_t nz = (size_t)c.rows * H * hd;
  double *z = malloc(nz * sizeof *z), *lse = malloc((size_t)c.rows * H * sizeof *lse);
  attn_naive(&c, z, lse);
  for (size_t i = 0; i < nz; i++)
    if (!(fabs(c.z[i] - z[i]) <= 1e-5))
      fail_msg("attention_train z[%zu]: %g vs %g", i, c.z[i], z[i]);
  for (size_t i = 0; i < (size_t)c.rows * H; i++)
    if (!(fabs(c.lse[i] - lse[i]) <= 1e-5 * fmax(1, fabs(lse[i]))))
      fail_msg("attention_train lse[%zu]: %g vs %g", i, c.lse[i], lse[i]);
  free(z), free(lse);
  attn_free(&c);
}

static void test_attention_train_forward(void **s) {
  (void)s;
  const int lens[4] = {3, 1, 7, 2};
  check_attention_forward(4, 2, 8, 5, lens, 3, 1);
  check_attention_forward(6, 3, 10, 0, lens, 4, 2); /* no prefix */
  check_attention_forward(4, 4, 6, 9, lens, 1, 2);  /* plain multi-head */
  const int long_lens[2] = {40, 25};                /* 7 heads per kv head: pieces of 96 rows cut inside */
  check_attention_forward(14, 2, 8, 20, long_lens, 2, 2);
}

static void check_attention_backward(int H, int KV, int hd, int P, const int *lens, int n_seqs, int threads) {
  attn_case c;
  attn_make(&c, H, KV, hd, P, lens, n_seqs, threads);
  const pa_backend *be = pa_backend_cpu();
  be->attention_train(&c.a, c.scratch);
  const size_t nq = (size_t)c.rows * H * hd, nk = (size_t)c.rows * KV * hd;
  float *dq = malloc(nq * sizeof *dq), *dk = malloc(nk * sizeof *dk), *dv = malloc(nk * sizeof *dv);
  be->attention_backward(&c.a, c.g, dq, dk, dv, c.scratch);
  char what[96];
  snprintf(what, sizeof what, "attention_backward dq (P=%d, %d seqs)", P, n_seqs);
  fd_check(what, c.q, dq, nq, attn_loss, &c);
  snprintf(what, sizeof what, "attention_backward dk (P=%d, %d seqs)", P, n_seqs);
  fd_check(what, c.k, dk, nk, attn_loss, &c);
  snprintf(what, sizeof what, "attention_backward dv (P=%d, %d seqs)", P, n_seqs);
  fd_check(what, c.v, dv, nk, attn_loss, &c);
  free(dq), free(dk), free(dv);
  attn_free(&c);
}

static void test_attention_backward(void **s) {
  (void)s;
  const int lens[3] = {3, 1, 4};
  check_attention_backward(4, 2, 8, 5, lens, 3, 2); /* prefix keys get gradients from every sequence */
  check_attention_backward(6, 3, 4, 0, lens, 2, 1); /* no prefix */
  const int long_lens[1] = {20};                    /* 140 query rows per kv head: two row blocks */
  check_attention_backward(14, 2, 4, 3, long_lens, 1, 2);
}

/* The same inputs on 1 and 3 threads give the same bits. */
static void test_attention_threads(void **s) {
  (void)s;
  const int lens[3] = {9, 30, 5};
  float *out[2][4];
  for (int t = 0; t < 2; t++) {
    rng = 42;
    attn_case c;
    attn_make(&c, 6, 2, 16, 11, lens, 3, t ? 3 : 1);
    const pa_backend *be = pa_backend_cpu();
    be->attention_train(&c.a, c.scratch);
    const size_t nq = (size_t)c.rows * 6 * 16, nk = (size_t)c.rows * 2 * 16;
    out[t][0] = malloc(nq * sizeof(float)), out[t][1] = malloc(nq * sizeof(float));
    out[t][2] = malloc(nk * sizeof(float)), out[t][3] = malloc(nk * sizeof(float));
    memcpy(out[t][0], c.z, nq * sizeof(float));
    be->attention_backward(&c.a, c.g, out[t][1], out[t][2], out[t][3], c.scratch);
    if (t == 1) {
      assert_memory_equal(out[0][0], out[1][0], nq * sizeof(float));
      assert_memory_equal(out[0][1], out[1][1], nq * sizeof(float));
      assert_memory_equal(out[0][2], out[1][2], nk * sizeof(float));
      assert_memory_equal(out[0][3], out[1][3], nk * sizeof(float));
    }
    attn_free(&c);
  }
  for (int t = 0; t < 2; t++)
    for (int i = 0; i < 4; i++)
      free(out[t][i]);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rmsnorm_backward),        cmocka_unit_test(test_rope_backward),
      cmocka_unit_test(test_swiglu_backward),         cmocka_unit_test(test_products),
      cmocka_unit_test(test_attention_train_forward), cmocka_unit_test(test_attention_backward),
      cmocka_unit_test(test_attention_threads),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
