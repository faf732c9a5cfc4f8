/* Every operation of the CUDA backend against the CPU backend (the
 * reference) on the same inputs, shapes that are not multiples of a block
 * included. Skips (exit 77) where no CUDA device or driver is present.
 *
 * Tolerances, and why:
 *  - embed, add, add_bias, scale: exact (the same single rounding);
 *  - matmul, matmul_nn, matmul_tn_acc: cuBLAS and OpenBLAS sum the K products
 *    in other orders; a reordered fp32 sum differs by about sqrt(K) eps
 *    times the sum of the terms' magnitudes (K eps at worst): we allow
 *    4 sqrt(K) eps sum|x w|, element by element;
 *  - rmsnorm: both sum squares in double and round once; the tree order of the
 *    GPU sum can move the double by an ulp: 4 eps |y|;
 *  - rope: the GPU may fuse a multiply and an add (FMA): 4 eps (|a c| + |b s|);
 *  - swiglu: the CPU's exponential is a polynomial (about 2 ulp), the GPU's
 *    expf 2 ulp: 1e-6 relative, plus 1e-7 near zero;
 *  - attention: both exponentials as above and reordered sums over keys and
 *    head dimensions: 2e-6 of the largest |v| plus 1e-6 relative;
 *  - rmsnorm_backward: the sums in double, then a few fp32 products and a
 *    difference (and fused multiply-adds): 8 eps of the terms' magnitudes;
 *  - rope_backward: as rope, 8 eps (|a|, |b| < 1 and |c|, |s| <= 1);
 *  - swiglu_backward: as swiglu, the sigmoid entering twice: 2e-6 relative;
 *  - attention_train and attention_backward: as attention, 2e-6 of the
 *    largest magnitude plus 1e-5 relative;
 *  - matmul_bf16, matmul_nn_bf16: both backends round x to bf16 the same way
 *    (ties to even) and the products of bf16 values are exact in fp32, so
 *    only the order of the sums differs: the fp32 bound, 4 sqrt(K) eps of the
 *    terms' magnitudes, with the GPU's tensor cores accumulating in fp32;
 *    the rounded operand is checked too: the GPU's result with x already
 *    bf16 (rounding again changes nothing) must be the same bits;
 *  - embed_bf16: exact (widening is exact);
 *  - adamw: exact (each element's double operations rounded as written on
 *    both: no fused multiply-add, and IEEE division and square root).
 * The three fp32 attention kernels are checked (pa_cuda_attention_kernel),
 * at the same tolerance: the tensor cores' one makes each product of three
 * tf32 products of split operands, which leaves about 2^-22 of each term
 * (3 ulp of fp32) where the others leave 1 ulp, inside the exponentials'
 * 2 ulp and the 2e-6 floor; the tiled and tensor-core ones also over 70,000
 * keys (2e-5: see there). The tensor cores' kernel on bf16 operands
 * ("mma_bf16") is checked against the CPU's attention on q, k and v
 * rounded to bf16 first (as the kernel rounds them), at the same
 * tolerances plus 2^-17 of the largest |v| (1 in these tests): its scores
 * are exact products summed in fp32, and it multiplies p by v in two bf16
 * parts, which hold p to 2^-17 of itself. And a failing operation (the
 * simple attention kernel over more keys than shared memory holds) is
 * reported by status(), once; an allocation past the device's memory is
 * refused with the device's account and leaves no fault. A machine whose
 * driver cannot serve fails rather than skips (tu_cuda.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <stdbool.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cuda_backend.h"
#include "tu_cuda.h"
#include "testutil.h"

static const pa_backend *cpu, *gpu;
static uint64_t rng = 0x243F6A8885A308D3ULL;

/* ---- device copies ----------------------------------------------------------- */

static void *dev_of(const void *host, size_t bytes) {
  void *d = gpu->alloc(bytes);
  if (!d)
    fail_msg("device alloc of %zu bytes: %s", bytes, pa_cuda_error());
  gpu->upload(d, host, bytes);
  return d;
}

static float *dev_floats(const float *host, size_t n) { return dev_of(host, n * sizeof *host); }

/* The device buffer d of n floats, downloaded into a new host array. */
static float *back(const float *d, size_t n) {
  float *h = malloc(n * sizeof *h);
  assert_non_null(h);
  gpu->download(h, d, n * sizeof *h);
  if (gpu->status())
    fail_msg("CUDA: %s", gpu->error());
  return h;
}

#define expect_close(what, got, want, n, tol_expr)                                                                     \
  do {                                                                                                                 \
    double worst_ = 0;                                                                                                 \
    for (size_t i = 0; i < (n); i++) {                                                                                 \
      const double tol_ = (tol_expr), d_ = fabs((double)(got)[i] - (double)(want)[i]);                                 \
      if (!(d_ <= tol_))                                                                                               \
        fail_msg("%s[%zu]: %.9g on the GPU, %.9g on the CPU (tolerance %.3g)", what, i, (double)(got)[i],              \
                 (double)(want)[i], tol_);                                                                             \
      worst_ = d_ > worst_ ? d_ : worst_;                                                                              \
    }                                                                                                                  \
    fprintf(stderr, "    %-16s largest difference %.3g\n", what, worst_);                                              \
  } while (0)

/* ---- the operations -------------------------------------------------------------- */

/* The magnitude of output i's terms in y = 0.5 y + x . w^T. */
static double sum_abs_xw(const float *x, const float *w, const float *y, int N, int K, size_t i) {
  double s = 0.5 * fabs(y[i]);
  for (int k = 0; k < K; k++)
    s += fabs((double)x[i / N * K + k] * w[i % N * K + k]);
  return s;
}

static void check_matmul(int M, int N, int K) {
  float *x = tu_rand_vec(&rng, (size_t)M * K), *w = tu_rand_vec(&rng, (size_t)N * K);
  float *y = tu_rand_vec(&rng, (size_t)M * N), *want = malloc((size_t)M * N * sizeof *want);
  memcpy(want, y, (size_t)M * N * sizeof *y);
  float *dx = dev_floats(x, (size_t)M * K), *dw = dev_floats(w, (size_t)N * K), *dy = dev_floats(y, (size_t)M * N);
  cpu->matmul(M, N, K, x, w, 0.5f, want);
  gpu->matmul(M, N, K, dx, dw, 0.5f, dy);
  float *got = back(dy, (size_t)M * N);
  char what[64];
  snprintf(what, sizeof what, "matmul %dx%dx%d", M, N, K);
  expect_close(what, got, want, (size_t)M * N, 4 * sqrt(K) * FLT_EPSILON * sum_abs_xw(x, w, y, N, K, i) + 1e-30);
  free(got);

  /* matmul_nn: y = x . w with w [K][N] (the same floats, read the other way);
   * |x|, |w| < 1, so the terms' magnitudes sum to less than K */
  memcpy(want, y, (size_t)M * N * sizeof *y);
  gpu->upload(dy, y, (size_t)M * N * sizeof *y);
  cpu->matmul_nn(M, N, K, x, w, 1.0f, want);
  gpu->matmul_nn(M, N, K, dx, dw, 1.0f, dy);
  got = back(dy, (size_t)M * N);
  snprintf(what, sizeof what, "matmul_nn %dx%dx%d", M, N, K);
  expect_close(what, got, want, (size_t)M * N, 4 * sqrt(K) * FLT_EPSILON * (fabs(y[i]) + K) + 1e-30);
  free(got);
  gpu->release(dx), gpu->release(dw), gpu->release(dy);
  free(x), free(w), free(y), free(want);
}

static void test_matmul(void **s) {
  (void)s;
  check_matmul(1, 1, 1);
  check_matmul(7, 33, 65);
  check_matmul(37, 129, 300);
  check_matmul(128, 256, 64);
}

/* The bf16 products: w rounded to bf16 once (the weights), x by the backend. */
static void check_matmul_bf16(int M, int N, int K) {
  float *x = tu_rand_vec(&rng, (size_t)M * K), *wf = tu_rand_vec(&rng, (size_t)N * K);
  float *y = tu_rand_vec(&rng, (size_t)M * N), *want = malloc((size_t)M * N * sizeof *want);
  pa_bf16 *w = malloc((size_t)N * K * sizeof *w);
  for (size_t i = 0; i < (size_t)N * K; i++)
    w[i] = pa_bf16_from_f32(wf[i]), wf[i] = pa_bf16_to_f32(w[i]);
  float *dx = dev_floats(x, (size_t)M * K), *dy = dev_floats(y, (size_t)M * N);
  pa_bf16 *dw = dev_of(w, (size_t)N * K * sizeof *w);
  char what[64];
  for (int nn = 0; nn < 2; nn++) {
    memcpy(want, y, (size_t)M * N * sizeof *y);
    gpu->upload(dy, y, (size_t)M * N * sizeof *y);
    (nn ? cpu->matmul_nn_bf16 : cpu->matmul_bf16)(M, N, K, x, w, 0.5f, want);
    (nn ? gpu->matmul_nn_bf16 : gpu->matmul_bf16)(M, N, K, dx, dw, 0.5f, dy);
    float *got = back(dy, (size_t)M * N);
    snprintf(what, sizeof what, "%s %dx%dx%d", nn ? "matmul_nn_bf16" : "matmul_bf16", M, N, K);
    /* |x|, |w| < 1: the terms' magnitudes sum to less than K (as for matmul_nn) */
    expect_close(what, got, want, (size_t)M * N, 4 * sqrt(K) * FLT_EPSILON * (0.5 * fabs(y[i]) + K) + 1e-30);
    free(got);
  }
  /* x already in bf16: the GPU's result is the same bits as with x unrounded */
  float *xr = malloc((size_t)M * K * sizeof *xr), *a, *b;
  for (size_t i = 0; i < (size_t)M * K; i++)
    xr[i] = pa_bf16_to_f32(pa_bf16_from_f32(x[i]));
  float *dxr = dev_floats(xr, (size_t)M * K);
  gpu->matmul_bf16(M, N, K, dx, dw, 0.0f, dy);
  a = back(dy, (size_t)M * N);
  gpu->matmul_bf16(M, N, K, dxr, dw, 0.0f, dy);
  b = back(dy, (size_t)M * N);
  assert_memory_equal(a, b, (size_t)M * N * sizeof *a);
  free(a), free(b), free(xr);
  gpu->release(dx), gpu->release(dw), gpu->release(dy), gpu->release(dxr);
  free(x), free(wf), free(w), free(y), free(want);
}

static void test_matmul_bf16(void **s) {
  (void)s;
  check_matmul_bf16(1, 1, 1);
  check_matmul_bf16(7, 33, 65);
  check_matmul_bf16(37, 129, 300);
  check_matmul_bf16(300, 260, 64); /* several of the CPU's blocks both ways */
  /* embed_bf16: exact */
  const int V = 50, D = 77, M = 9;
  float *t = tu_rand_vec(&rng, (size_t)V * D), *want = malloc((size_t)M * D * sizeof *want);
  pa_bf16 *tab = malloc((size_t)V * D * sizeof *tab);
  for (size_t i = 0; i < (size_t)V * D; i++)
    tab[i] = pa_bf16_from_f32(t[i]);
  int32_t ids[9];
  for (int m = 0; m < M; m++)
    ids[m] = (m * 17 + 3) % V;
  pa_bf16 *dt = dev_of(tab, (size_t)V * D * sizeof *tab);
  int32_t *di = dev_of(ids, sizeof ids);
  float *dg = gpu->alloc((size_t)M * D * sizeof(float));
  cpu->embed_bf16(M, D, ids, tab, want);
  gpu->embed_bf16(M, D, di, dt, dg);
  float *got = back(dg, (size_t)M * D);
  expect_close("embed_bf16", got, want, (size_t)M * D, 0);
  gpu->release(dt), gpu->release(di), gpu->release(dg);
  free(t), free(want), free(tab), free(got);
}

static void test_matmul_tn_acc(void **s) {
  (void)s;
  const int M = 29, N = 47, K = 70;
  float *a = tu_rand_vec(&rng, (size_t)M * N), *b = tu_rand_vec(&rng, (size_t)M * K);
  float *g = tu_rand_vec(&rng, (size_t)N * K), *want = malloc((size_t)N * K * sizeof *want);
  memcpy(want, g, (size_t)N * K * sizeof *g);
  float *da = dev_floats(a, (size_t)M * N), *db = dev_floats(b, (size_t)M * K), *dg = dev_floats(g, (size_t)N * K);
  cpu->matmul_tn_acc(M, N, K, a, b, want);
  gpu->matmul_tn_acc(M, N, K, da, db, dg);
  float *got = back(dg, (size_t)N * K);
  expect_close("matmul_tn_acc", got, want, (size_t)N * K, 4 * sqrt(M) * FLT_EPSILON * (fabs(g[i]) + M));
  gpu->release(da), gpu->release(db), gpu->release(dg);
  free(a), free(b), free(g), free(want), free(got);
}

static void test_rmsnorm(void **s) {
  (void)s;
  const int M = 37, D = 300;
  float *x = tu_rand_vec(&rng, (size_t)M * D), *w = tu_rand_vec(&rng, D), *want = malloc((size_t)M * D * 4);
  float *dx = dev_floats(x, (size_t)M * D), *dw = dev_floats(w, D), *dy = gpu->alloc((size_t)M * D * 4);
  cpu->rmsnorm(M, D, x, w, 1e-5f, want);
  gpu->rmsnorm(M, D, dx, dw, 1e-5f, dy);
  float *got = back(dy, (size_t)M * D);
  expect_close("rmsnorm", got, want, (size_t)M * D, 4 * FLT_EPSILON * fabs(want[i]));
  gpu->release(dx), gpu->release(dw), gpu->release(dy);
  free(x), free(w), free(want), free(got);
}

static void test_rope(void **s) {
  (void)s;
  const int M = 11, H = 3, hd = 40, half = hd / 2, P = 50;
  float *x = tu_rand_vec(&rng, (size_t)M * H * hd), *cs = malloc((size_t)P * half * 4),
        *sn = malloc((size_t)P * half * 4);
  int32_t pos[11];
  for (int p = 0; p < P; p++)
    for (int i = 0; i < half; i++)
      cs[p * half + i] = cosf(p * powf(1e4f, -2.0f * i / hd)), sn[p * half + i] = sinf(p * powf(1e4f, -2.0f * i / hd));
  for (int m = 0; m < M; m++)
    pos[m] = (m * 7 + 3) % P;
  float *want = malloc((size_t)M * H * hd * 4);
  memcpy(want, x, (size_t)M * H * hd * 4);
  float *dx = dev_floats(x, (size_t)M * H * hd), *dc = dev_floats(cs, (size_t)P * half),
        *ds = dev_floats(sn, (size_t)P * half);
  int32_t *dp = dev_of(pos, sizeof pos);
  cpu->rope(M, H, hd, pos, cs, sn, want);
  gpu->rope(M, H, hd, dp, dc, ds, dx);
  float *got = back(dx, (size_t)M * H * hd);
  expect_close("rope", got, want, (size_t)M * H * hd,
               4 * FLT_EPSILON *
                       (fabs(x[i]) + fabs(x[i % (size_t)hd < (size_t)half ? i + (size_t)half : i - (size_t)half])) +
                   1e-30);
  gpu->release(dx), gpu->release(dc), gpu->release(ds), gpu->release(dp);
  free(x), free(cs), free(sn), free(want), free(got);
}

/* zero: the bytes asked for, not one past either end (an odd count: a memset's, not a float's). */
static void test_zero(void **s) {
  (void)s;
  const size_t n = 1037;
  float *x = tu_rand_vec(&rng, n), *dx = dev_floats(x, n);
  uint8_t *got = malloc(n * sizeof *x);
  assert_non_null(got);
  gpu->zero((char *)dx + 13, 4001);
  gpu->zero(dx, 0);
  gpu->download(got, dx, n * sizeof *x);
  assert_int_equal(gpu->status(), 0);
  for (size_t i = 0; i < n * sizeof *x; i++)
    if (i >= 13 && i < 13 + 4001)
      assert_int_equal(got[i], 0);
    else
      assert_int_equal(got[i], ((const uint8_t *)x)[i]);
  gpu->release(dx);
  free(x), free(got);
}

/* An allocation past the device's memory (1 TiB) is refused: NULL, and
 * error() the device's account (the bytes asked for, what was free, of how
 * much), with no fault left: the next allocation, copies and status run. */
static void test_alloc_refused(void **s) {
  (void)s;
  assert_null(gpu->alloc((size_t)1 << 40));
  const char *why = gpu->error();
  if (strncmp(why, "device ", 7) || !strstr(why, ": 1099.5 GB asked for, ") || !strstr(why, " free of its "))
    fail_msg("the refusal's reason: %s", why);
  const size_t n = 301;
  float *x = tu_rand_vec(&rng, n), *dx = dev_floats(x, n), *got = malloc(n * sizeof *got);
  assert_non_null(got);
  gpu->download(got, dx, n * sizeof *got);
  assert_int_equal(gpu->status(), 0);
  assert_memory_equal(got, x, n * sizeof *got);
  gpu->release(dx);
  free(x), free(got);
}

static void test_elementwise(void **s) {
  (void)s;
  const int M = 13, N = 301, V = 17;
  const size_t n = (size_t)M * N;
  float *g = tu_rand_vec(&rng, n), *u = tu_rand_vec(&rng, n), *b = tu_rand_vec(&rng, N);
  for (size_t i = 0; i < n; i++)
    g[i] *= 8; /* silu over [-8, 8) */
  float *want = malloc(n * 4);
  float *dg = dev_floats(g, n), *du = dev_floats(u, n), *db = dev_floats(b, N);
  /* swiglu */
  memcpy(want, g, n * 4);
  cpu->swiglu(M, N, want, u);
  gpu->swiglu(M, N, dg, du);
  float *got = back(dg, n);
  expect_close("swiglu", got, want, n, 1e-6 * fabs(want[i]) + 1e-7);
  free(got);
  /* add, add_bias, scale: exact */
  gpu->upload(dg, g, n * 4);
  memcpy(want, g, n * 4);
  cpu->add(M, N, u, want);
  gpu->add(M, N, du, dg);
  cpu->add_bias(M, N, b, want);
  gpu->add_bias(M, N, db, dg);
  cpu->scale(n, -0.375f, want);
  gpu->scale(n, -0.375f, dg);
  got = back(dg, n);
  expect_close("add, bias, scale", got, want, n, 0);
  free(got);
  /* embed */
  float *table = tu_rand_vec(&rng, (size_t)V * N), *dt = dev_floats(table, (size_t)V * N);
  int32_t ids[13];
  for (int m = 0; m < M; m++)
    ids[m] = (m * 5 + 2) % V;
  int32_t *di = dev_of(ids, sizeof ids);
  cpu->embed(M, N, ids, table, want);
  gpu->embed(M, N, di, dt, dg);
  got = back(dg, n);
  expect_close("embed", got, want, n, 0);
  free(got);
  gpu->release(dg), gpu->release(du), gpu->release(db), gpu->release(dt), gpu->release(di);
  free(g), free(u), free(b), free(want), free(table);
}

/* The backward operations of rmsnorm, rope and swiglu (tolerances as their
 * forward's; rmsnorm_backward accumulates into dx, so dx starts non-zero). */
static void test_backward(void **s) {
  (void)s;
  const int M = 19, D = 300, H = 3, hd = 40, half = hd / 2, P = 50;
  const size_t n = (size_t)M * D;
  float *x = tu_rand_vec(&rng, n), *w = tu_rand_vec(&rng, D), *dy = tu_rand_vec(&rng, n), *dx = tu_rand_vec(&rng, n);
  float *want = malloc(n * 4);
  memcpy(want, dx, n * 4);
  float *d_x = dev_floats(x, n), *d_w = dev_floats(w, D), *d_dy = dev_floats(dy, n), *d_dx = dev_floats(dx, n);
  cpu->rmsnorm_backward(M, D, x, w, 1e-5f, dy, want);
  gpu->rmsnorm_backward(M, D, d_x, d_w, 1e-5f, d_dy, d_dx);
  float *got = back(d_dx, n);
  expect_close("rmsnorm_backward", got, want, n, 8 * FLT_EPSILON * (fabs(dx[i]) + 4 * fabs(x[i]) + 2 * fabs(dy[i])));
  free(got);
  /* rope_backward on M rows of H heads */
  const size_t nr = (size_t)M * H * hd;
  float *cs = malloc((size_t)P * half * 4), *sn = malloc((size_t)P * half * 4);
  int32_t pos[19];
  for (int p = 0; p < P * half; p++)
    cs[p] = cosf(0.37f * p), sn[p] = sinf(0.37f * p);
  for (int m = 0; m < M; m++)
    pos[m] = (m * 11 + 1) % P;
  float *g = tu_rand_vec(&rng, nr), *wantr = malloc(nr * 4);
  memcpy(wantr, g, nr * 4);
  float *d_g = dev_floats(g, nr), *d_c = dev_floats(cs, (size_t)P * half), *d_s = dev_floats(sn, (size_t)P * half);
  int32_t *d_p = dev_of(pos, sizeof pos);
  cpu->rope_backward(M, H, hd, pos, cs, sn, wantr);
  gpu->rope_backward(M, H, hd, d_p, d_c, d_s, d_g);
  got = back(d_g, nr);
  expect_close("rope_backward", got, wantr, nr, 8 * FLT_EPSILON + 1e-30);
  free(got);
  /* swiglu_backward */
  float *gate = tu_rand_vec(&rng, n), *up = tu_rand_vec(&rng, n), *wg = malloc(n * 4), *wu = malloc(n * 4);
  for (size_t i = 0; i < n; i++)
    gate[i] *= 8;
  float *d_gate = dev_floats(gate, n), *d_up = dev_floats(up, n), *d_dg = gpu->alloc(n * 4), *d_du = gpu->alloc(n * 4);
  cpu->swiglu_backward(M, D, gate, up, dy, wg, wu);
  gpu->swiglu_backward(M, D, d_gate, d_up, d_dy, d_dg, d_du);
  got = back(d_dg, n);
  expect_close("swiglu_backward dgate", got, wg, n, 2e-6 * fabs(wg[i]) + 1e-7);
  free(got);
  got = back(d_du, n);
  expect_close("swiglu_backward dup", got, wu, n, 2e-6 * fabs(wu[i]) + 1e-7);
  free(got);
  const void *all[] = {d_x, d_w, d_dy, d_dx, d_g, d_c, d_s, d_p, d_gate, d_up, d_dg, d_du};
  for (size_t i = 0; i < sizeof all / sizeof *all; i++)
    gpu->release((void *)all[i]);
  free(x), free(w), free(dy), free(dx), free(want), free(cs), free(sn), free(g), free(wantr), free(gate), free(up);
  free(wg), free(wu);
}

/* AdamW's step, four times on 5,003 parameters (not a multiple of a
 * block), the gradients' magnitudes from 1e-9 to 1e3 with exact zeros among
 * them, the moments from zero: w, m and v the CPU's bits after every step. */
static void test_adamw(void **s) {
  (void)s;
  const size_t n = 5003;
  float *w = tu_rand_vec(&rng, n), *g = tu_rand_vec(&rng, n), *m = calloc(n, sizeof *m), *v = calloc(n, sizeof *v);
  assert_true(m && v);
  float *d_w = dev_floats(w, n), *d_g = gpu->alloc(n * sizeof *g), *d_m = dev_floats(m, n), *d_v = dev_floats(v, n);
  assert_non_null(d_g);
  const double b1 = 0.9, b2 = 0.999, lr = 1e-3;
  for (int t = 1; t <= 4; t++) {
    for (size_t i = 0; i < n; i++) /* a fresh gradient each step, magnitudes 1e-9 .. 1e3, every 17th zero */
      g[i] = i % 17 ? (float)(tu_frand(&rng) * pow(10, (double)(i * 7 % 13) - 9)) : 0.0f;
    gpu->upload(d_g, g, n * sizeof *g);
    const pa_adamw_step st = {.beta1 = b1,
                              .beta2 = b2,
                              .c1 = 1 - pow(b1, t),
                              .c2 = 1 - pow(b2, t),
                              .lr = lr,
                              .decay = 1 - lr * 0.01,
                              .eps = 1e-8};
    cpu->adamw(n, &st, w, g, m, v);
    gpu->adamw(n, &st, d_w, d_g, d_m, d_v);
    const float *want[3] = {w, m, v}, *dev[3] = {d_w, d_m, d_v};
    for (int k = 0; k < 3; k++) {
      float *got = back(dev[k], n);
      char what[32];
      snprintf(what, sizeof what, "adamw step %d %c", t, "wmv"[k]);
      expect_close(what, got, want[k], n, 0);
      free(got);
    }
  }
  gpu->release(d_w), gpu->release(d_g), gpu->release(d_m), gpu->release(d_v);
  free(w), free(g), free(m), free(v);
}

/* n floats of x (NULL: NULL), each rounded to bf16 (ties to even), in a new array. */
static float *rounded_bf16(const float *x, size_t n) {
  if (!x)
    return NULL;
  float *r = malloc(n * sizeof *r);
  assert_non_null(r);
  for (size_t i = 0; i < n; i++)
    r[i] = pa_bf16_to_f32(pa_bf16_from_f32(x[i]));
  return r;
}

/* The CPU's attention a over `rows` rows, on its inputs or (bf16) on them
 * rounded to bf16: a new array. */
static float *cpu_attention(const pa_attn_args *a, int rows, bool bf16) {
  const int hd = a->head_dim, KV = a->n_kv_heads;
  const size_t nz = (size_t)rows * a->n_heads * hd, np = (size_t)KV * a->prefix_stride * hd;
  float *want = calloc(nz, sizeof *want);
  pa_attn_seq *seqs = malloc((size_t)a->n_seqs * sizeof *seqs);
  assert_true(want && seqs);
  pa_attn_args c = *a;
  c.z = want, c.seqs = seqs;
  memcpy(seqs, a->seqs, (size_t)a->n_seqs * sizeof *seqs);
  if (bf16) {
    c.q = rounded_bf16(a->q, nz), c.k_prefix = rounded_bf16(a->k_prefix, np);
    c.v_prefix = rounded_bf16(a->v_prefix, np);
    for (int i = 0; i < a->n_seqs; i++) {
      const size_t cache = (size_t)KV * seqs[i].stride * hd;
      seqs[i].k_own = rounded_bf16(seqs[i].k_own, cache), seqs[i].v_own = rounded_bf16(seqs[i].v_own, cache);
    }
  }
  float *scratch = malloc(cpu->attention_scratch(&c) * sizeof(float) + 4);
  cpu->attention(&c, scratch);
  free(scratch);
  if (bf16) {
    free((void *)c.q), free((void *)c.k_prefix), free((void *)c.v_prefix);
    for (int i = 0; i < a->n_seqs; i++)
      free(seqs[i].k_own), free(seqs[i].v_own);
  }
  free(seqs);
  return want;
}

/* The attention a (host memory: q, the prefix and each sequence's caches,
 * of kv heads x prefix_stride or stride positions) on the CPU, then on the
 * device, on copies of its inputs, by each of the kernels named: its rows'
 * outputs within tol + rel |want| of the CPU's (for "mma_bf16": of the
 * CPU's on the inputs rounded to bf16, within 2^-17 more; |v| <= 1). */
static void compare_attention(const pa_attn_args *a, int rows, const char *const *kernels, int n_kernels,
                              const char *label, double tol, double rel) {
  const int hd = a->head_dim, KV = a->n_kv_heads;
  const size_t nz = (size_t)rows * a->n_heads * hd, np = (size_t)KV * a->prefix_stride * hd;
  float *const want32 = cpu_attention(a, rows, false);
  float *want16 = NULL;
  pa_attn_seq *dseqs = malloc((size_t)a->n_seqs * sizeof *dseqs);
  assert_non_null(dseqs);
  for (int i = 0; i < a->n_seqs; i++) {
    const size_t cache = (size_t)KV * a->seqs[i].stride * hd;
    dseqs[i] = a->seqs[i];
    dseqs[i].k_own = dev_floats(a->seqs[i].k_own, cache), dseqs[i].v_own = dev_floats(a->seqs[i].v_own, cache);
  }
  pa_attn_args da = *a;
  da.q = dev_floats(a->q, nz), da.z = gpu->alloc(nz * sizeof(float)), da.seqs = dseqs;
  da.k_prefix = a->k_prefix ? dev_floats(a->k_prefix, np) : NULL;
  da.v_prefix = a->v_prefix ? dev_floats(a->v_prefix, np) : NULL;
  for (int k = 0; k < n_kernels; k++) {
    const bool bf16 = !strcmp(kernels[k], "mma_bf16") && hd <= 128; /* wider heads: the simple kernel, fp32 */
    if (bf16 && !want16)
      want16 = cpu_attention(a, rows, true);
    const float *want = bf16 ? want16 : want32;
    assert_int_equal(pa_cuda_attention_kernel(kernels[k]), 0);
    float *d_scratch = gpu->alloc(gpu->attention_scratch(&da) * sizeof(float) + 4); /* the kernel's, split or not */
    gpu->attention(&da, d_scratch);
    float *got = back(da.z, nz);
    gpu->release(d_scratch);
    char what[128];
    snprintf(what, sizeof what, "attention (%s), %s", kernels[k], label);
    expect_close(what, got, want, nz, tol + (bf16 ? 0x1p-17 : 0) + rel * fabs(want[i]));
    if (bf16) { /* what the rounding costs, for the docs: no bound to hold it to but the rounded reference's */
      double off = 0;
      for (size_t i = 0; i < nz; i++)
        off = fmax(off, fabs((double)got[i] - want32[i]));
      fprintf(stderr, "    %-16s from the CPU's fp32 attention: %.3g\n", "", off);
    }
    free(got);
  }
  assert_int_equal(pa_cuda_attention_kernel("mma"), 0); /* the default again */
  gpu->release((void *)da.q), gpu->release(da.z), gpu->release((void *)da.k_prefix), gpu->release((void *)da.v_prefix);
  for (int i = 0; i < a->n_seqs; i++)
    gpu->release(dseqs[i].k_own), gpu->release(dseqs[i].v_own);
  free(dseqs), free(want32), free(want16);
}

/* A cache's positions from `used` to `stride` (of each of KV heads) set to
 * NaN: what a cache holds past its keys is no number, and a kernel that
 * lets it into a sum (a key tile's tail weighted by 0 still gives NaN)
 * fails. */
static void unused_nan(float *cache, int KV, int stride, int hd, int used) {
  for (int h = 0; h < KV; h++)
    for (size_t i = ((size_t)h * stride + used) * hd; i < (size_t)(h + 1) * stride * hd; i++)
      cache[i] = NAN;
}

enum { kSeqs = 4 };
/* Attention with grouped heads over a shared prefix and four sequences of
 * their own: 3 rows after 5 cached, 37 (more than two of the tiled kernel's
 * 16-row tiles), 16 (one whole tile) after 20 cached, and 1 after 46 cached
 * (a decoding step); or without a prefix; by the kernel named (or, for a
 * head it does not hold, the next: see cuda_backend.h). The caches' and the
 * prefix's positions past their keys hold NaN. */
static void check_attention(int prefix_len, int hd, int H, int KV, const char *kernel) {
  const int stride = 48, P = prefix_len;
  static const int n[kSeqs] = {3, 37, 16, 1}, past[kSeqs] = {5, 0, 20, 46};
  const size_t cache = (size_t)KV * stride * hd;
  int rows = 0;
  for (int i = 0; i < kSeqs; i++)
    rows += n[i];
  float *q = tu_rand_vec(&rng, (size_t)rows * H * hd);
  float *kp = tu_rand_vec(&rng, (size_t)KV * 40 * hd), *vp = tu_rand_vec(&rng, (size_t)KV * 40 * hd);
  unused_nan(kp, KV, 40, hd, P), unused_nan(vp, KV, 40, hd, P);
  float *k[kSeqs], *v[kSeqs];
  pa_attn_seq seqs[kSeqs];
  for (int i = 0, row0 = 0; i < kSeqs; row0 += n[i], i++) {
    k[i] = tu_rand_vec(&rng, cache), v[i] = tu_rand_vec(&rng, cache);
    unused_nan(k[i], KV, stride, hd, past[i] + n[i]), unused_nan(v[i], KV, stride, hd, past[i] + n[i]);
    seqs[i] = (pa_attn_seq){.row0 = row0, .n = n[i], .past = past[i], .k_own = k[i], .v_own = v[i], .stride = stride};
  }
  pa_attn_args a = {.n_heads = H,
                    .n_kv_heads = KV,
                    .head_dim = hd,
                    .q = q,
                    .k_prefix = P ? kp : NULL,
                    .v_prefix = P ? vp : NULL,
                    .prefix_len = P,
                    .prefix_stride = 40,
                    .seqs = seqs,
                    .n_seqs = kSeqs};
  char label[64];
  snprintf(label, sizeof label, "prefix %d, head_dim %d, %d/%d heads", P, hd, H, KV);
  compare_attention(&a, rows, &kernel, 1, label, 2e-6, 1e-6);
  for (int i = 0; i < kSeqs; i++)
    free(k[i]), free(v[i]);
  free(q), free(kp), free(vp);
}

/* The training attention: a prefix of P tokens and sequences of len[]
 * tokens laid after it, H heads on KV kv heads; forward (z, lse) and
 * backward (dq, dk, dv) against the CPU's, within 2e-6 of the largest
 * magnitude plus 1e-5 relative (reordered fp32 sums over keys and heads,
 * two exponentials of about 2 ulp). */
static void max_abs(const float *v, size_t n, double *mx) {
  for (size_t i = 0; i < n; i++)
    *mx = fabs(v[i]) > *mx ? fabs(v[i]) : *mx;
}

enum { kMaxTrainSeqs = 4 };

static void check_attention_train(int H, int KV, int hd, int P, int n_seqs, const int len[]) {
  int row0[kMaxTrainSeqs], rows = P;
  for (int i = 0; i < n_seqs; i++)
    row0[i] = rows, rows += len[i];
  const size_t nq = (size_t)rows * H * hd, nk = (size_t)rows * KV * hd, nl = (size_t)rows * H;
  float *q = tu_rand_vec(&rng, nq), *k = tu_rand_vec(&rng, nk), *v = tu_rand_vec(&rng, nk), *dz = tu_rand_vec(&rng, nq);
  float *z = calloc(nq, 4), *lse = calloc(nl, 4), *dq = calloc(nq, 4), *dk = calloc(nk, 4), *dv = calloc(nk, 4);
  pa_attn_train_args a = {.n_heads = H,
                          .n_kv_heads = KV,
                          .head_dim = hd,
                          .prefix_len = P,
                          .n_seqs = n_seqs,
                          .seq_row0 = row0,
                          .seq_len = len,
                          .q = q,
                          .k = k,
                          .v = v,
                          .z = z,
                          .lse = lse};
  float *scratch = malloc(cpu->attention_train_scratch(&a) * 4 + 4);
  cpu->attention_train(&a, scratch);
  cpu->attention_backward(&a, dz, dq, dk, dv, scratch);
  free(scratch);
  float *d_q = dev_floats(q, nq), *d_k = dev_floats(k, nk), *d_v = dev_floats(v, nk), *d_dz = dev_floats(dz, nq);
  float *d_z = gpu->alloc(nq * 4), *d_lse = gpu->alloc(nl * 4), *d_dq = gpu->alloc(nq * 4);
  float *d_dk = gpu->alloc(nk * 4), *d_dv = gpu->alloc(nk * 4);
  pa_attn_train_args da = a;
  da.q = d_q, da.k = d_k, da.v = d_v, da.z = d_z, da.lse = d_lse; /* seq_row0, seq_len: host arrays, as documented */
  float *d_scratch = gpu->alloc(gpu->attention_train_scratch(&da) * 4 + 4);
  gpu->attention_train(&da, d_scratch);
  gpu->attention_backward(&da, d_dz, d_dq, d_dk, d_dv, d_scratch);
  const struct {
    const char *what;
    const float *want, *dev;
    size_t n;
  } out[] = {{"attention_train z", z, d_z, nq},
             {"attention_train lse", lse, d_lse, nl},
             {"attention_backward dq", dq, d_dq, nq},
             {"attention_backward dk", dk, d_dk, nk},
             {"attention_backward dv", dv, d_dv, nk}};
  for (size_t o = 0; o < sizeof out / sizeof *out; o++) {
    char name[128];
    snprintf(name, sizeof name, "%s (prefix %d, %d sequences, head_dim %d, %d/%d heads)", out[o].what, P, n_seqs, hd, H,
             KV);
    double mx = 0;
    max_abs(out[o].want, out[o].n, &mx);
    float *got = back(out[o].dev, out[o].n);
    expect_close(name, got, out[o].want, out[o].n, 2e-6 * mx + 1e-5 * fabs(out[o].want[i]));
    free(got);
  }
  float *const devs[] = {d_q, d_k, d_v, d_dz, d_z, d_lse, d_dq, d_dk, d_dv, d_scratch};
  for (size_t i = 0; i < sizeof devs / sizeof *devs; i++)
    gpu->release(devs[i]);
  free(q), free(k), free(v), free(dz), free(z), free(lse), free(dq), free(dk), free(dv);
}

/* Shapes for the key gradients' rounds of 32 items (cuda_attention_train.cu):
 * a prefix key's items span rounds and sequences; a round ends inside a
 * row's heads (3 or 40 query heads a kv head, and 1); head_dim 40, 128 and
 * 200 (over 128: two dimensions a thread); a one-token sequence, and no
 * prefix. */
static void test_attention_train(void **s) {
  (void)s;
  check_attention_train(6, 2, 40, 7, 2, (const int[]){5, 9});
  check_attention_train(4, 4, 128, 12, 3, (const int[]){1, 6, 10});
  check_attention_train(40, 1, 24, 3, 2, (const int[]){2, 3});
  check_attention_train(4, 2, 200, 0, 1, (const int[]){9});
  check_attention_train(4, 1, 256, 6, 2, (const int[]){5, 4});
  /* layouts backend.h does not allow: refused, named (a row between two sequences; an empty sequence) */
  const int H = 2, hd = 8, rows = 8;
  const struct {
    int row0[2], len[2];
    const char *said;
  } bad[] = {{{3, 6}, {2, 2}, "attention_train: sequence 1 is rows [6, 8), where backend.h lays it from row 5"},
             {{3, 3}, {0, 5}, "attention_train: sequence 0 is rows [3, 3), where backend.h lays it from row 3"}};
  float *buf = gpu->alloc((size_t)rows * H * hd * 6 * sizeof(float));
  assert_non_null(buf);
  const size_t n = (size_t)rows * H * hd;
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    const pa_attn_train_args a = {.n_heads = H,
                                  .n_kv_heads = H,
                                  .head_dim = hd,
                                  .prefix_len = 3,
                                  .n_seqs = 2,
                                  .seq_row0 = bad[i].row0,
                                  .seq_len = bad[i].len,
                                  .q = buf,
                                  .k = buf + n,
                                  .v = buf + 2 * n,
                                  .z = buf + 3 * n,
                                  .lse = buf + 4 * n};
    gpu->attention_train(&a, buf + 5 * n);
    assert_int_equal(gpu->status(), -1);
    fprintf(stderr, "    reported: %s\n", gpu->error());
    assert_non_null(strstr(gpu->error(), bad[i].said));
  }
  gpu->release(buf);
}

static void test_attention(void **s) {
  (void)s;
  static const char *const kernels[] = {"mma", "tiled", "simple"};
  for (int k = 0; k < 3; k++) {
    check_attention(23, 40, 6, 2, kernels[k]);
    check_attention(0, 40, 6, 2, kernels[k]);
    check_attention(37, 128, 6, 2, kernels[k]); /* the tiled and tensor-core kernels' widest head */
  }
  /* the tensor cores' kernel takes up to 4 query heads of a kv head a block: 4, 1, and 7 (4 + 3, a warp idle) */
  check_attention(23, 40, 8, 2, "mma");
  check_attention(23, 40, 3, 3, "mma");
  check_attention(23, 64, 14, 2, "mma");
  check_attention(11, 8, 6, 2, "mma");   /* narrower than an output block (16): v padded with zeros */
  check_attention(23, 136, 6, 2, "mma"); /* wider: the simple kernel runs */
  assert_int_equal(pa_cuda_attention_kernel("flash"), -1);
  assert_non_null(strstr(pa_cuda_error(), "\"flash\""));
}

/* Scores that grow along the keys, so that rows' maxima move by far (more
 * than 8, a factor e^8 on the outputs so far) after their first key tile,
 * in some rows of a tile and not in others (the test checks that the data
 * do this): the online softmax's rescaling, which the tensor cores' kernel
 * does on its accumulators by the rows it finds for their elements, cannot
 * be wrong by a little. Prefix key j scaled by 1/4 + j/16 over 96 keys
 * (three key tiles), then 16 rows of their own. Large scores magnify their rounding: an error d in a score
 * moves the weights by d relative, and the output by up to d max|v|, with d
 * under 2^-19 of the score's terms' magnitude sum_d |q_d k_d| / sqrt(hd)
 * (three tf32 products leave 2^-22 of each term; the sums and the
 * exponentials add a few ulp). So the tolerance is that, over the 2e-6 of
 * check_attention, for every kernel. */
static void test_attention_rescaled(void **s) {
  (void)s;
  enum { H = 2, hd = 128, P = 96, N = 16 };
  const float scale = 1.0f / sqrtf((float)hd);
  float *q = tu_rand_vec(&rng, (size_t)N * H * hd), *kp = tu_rand_vec(&rng, (size_t)P * hd);
  float *vp = tu_rand_vec(&rng, (size_t)P * hd), *k = tu_rand_vec(&rng, (size_t)N * hd),
        *v = tu_rand_vec(&rng, (size_t)N * hd);
  for (size_t e = 0; e < (size_t)N * H * hd; e++)
    q[e] *= 4;
  for (int j = 0; j < P; j++)
    for (int d = 0; d < hd; d++)
      kp[j * hd + d] *= 0.25f + j / 16.0f;
  /* which (row, head) pairs move their max after their first tile, and the scores' largest terms */
  int moved = 0;
  double terms = 0;
  for (int i = 0; i < N; i++)
    for (int h = 0; h < H; h++) {
      double used = -INFINITY;
      bool moves = false;
      for (int t0 = 0; t0 < P + i + 1; t0 += 32) {
        double m = -INFINITY;
        for (int t = t0; t < t0 + 32 && t < P + i + 1; t++) {
          const float *kt = t < P ? kp + (size_t)t * hd : k + (size_t)(t - P) * hd;
          double sc = 0, abs_sum = 0;
          for (int d = 0; d < hd; d++)
            sc += (double)q[(i * H + h) * hd + d] * kt[d], abs_sum += fabs((double)q[(i * H + h) * hd + d] * kt[d]);
          m = fmax(m, sc * scale);
          terms = fmax(terms, abs_sum * scale);
        }
        if (m > used + 8) {
          moves = moves || used > -INFINITY;
          used = m;
        }
      }
      moved += moves;
    }
  fprintf(stderr, "    %d of %d rows and heads move their max; the largest score's terms sum to %.1f\n", moved, N * H,
          terms);
  assert_true(moved > 0 && moved < N * H);
  pa_attn_seq seq = {.row0 = 0, .n = N, .past = 0, .k_own = k, .v_own = v, .stride = N};
  pa_attn_args a = {.n_heads = H, .n_kv_heads = 1, .head_dim = hd, .q = q, .k_prefix = kp, .v_prefix = vp,
                    .prefix_len = P, .prefix_stride = P, .seqs = &seq, .n_seqs = 1};
  /* mma_bf16: its scores' exact products in sums of 16, each truncated: 2^-19 of the terms too */
  static const char *const kernels[] = {"mma", "tiled", "simple", "mma_bf16"};
  compare_attention(&a, N, kernels, 4, "growing scores", 2e-6 + ldexp(terms, -19), 1e-6); /* |v| <= 1 */
  free(q), free(kp), free(vp), free(k), free(v);
}

/* The tiled and tensor-core kernels' shared memory does not grow with the
 * keys: one row over 70,000 prefix keys (which the simple kernel refuses,
 * below) against the CPU's, by each, in one block (pa_cuda_attention_splits)
 * and, for the tensor cores' kernels, in the backend's 32 shares. The output is a weighted mean of
 * values in [-1, 1] whose weights are sums over 70,000 keys taken in other
 * orders: about sqrt(n) eps = 1.6e-5 of it, so 2e-5 (seen on the
 * emulation: 5.2e-8 and 4.2e-8 in Release, 4.6e-7 under the sanitizers,
 * whose build rounds the CPU's sums otherwise). */
static void test_attention_long_row(void **s) {
  (void)s;
  const int P = 70000, hd = 8;
  float *kp = tu_rand_vec(&rng, (size_t)P * hd), *vp = tu_rand_vec(&rng, (size_t)P * hd);
  float *q = tu_rand_vec(&rng, hd), *k0 = tu_rand_vec(&rng, hd), *v0 = tu_rand_vec(&rng, hd);
  for (int d = 0; d < hd; d++)
    q[d] *= 8; /* scores of a few units: a softmax far from uniform */
  pa_attn_seq seq = {.row0 = 0, .n = 1, .past = 0, .k_own = k0, .v_own = v0, .stride = 1};
  pa_attn_args a = {.n_heads = 1, .n_kv_heads = 1, .head_dim = hd, .q = q, .k_prefix = kp, .v_prefix = vp,
                    .prefix_len = P, .prefix_stride = P, .seqs = &seq, .n_seqs = 1};
  /* in one block a row (its sums over 2,188 key tiles), then as the backend splits it (a block: 32 shares) */
  static const char *const kernels[] = {"tiled", "mma", "mma_bf16"};
  pa_cuda_attention_splits(1);
  compare_attention(&a, 1, kernels, 3, "70,000 keys in one block", 2e-5, 0);
  pa_cuda_attention_splits(0);
  compare_attention(&a, 1, kernels + 1, 2, "70,000 keys in shares", 2e-5, 0);
  const int used = pa_cuda_attention_splits(-1);
  assert_true(used > 1 && used <= 32); /* 32 on the emulation and any GPU of 32 SMs or more */
  free(kp), free(vp), free(q), free(k0), free(v0);
}

/* A head_dim the tensor cores' kernel does not hold (not a multiple of 8,
 * its k-step): the tiled kernel runs in its place. (Last, so that the other
 * tests draw the same random numbers as before it.) */
static void test_attention_head_dim_36(void **s) {
  (void)s;
  check_attention(23, 36, 6, 2, "mma");
}

/* The tensor cores' kernel on bf16 operands at check_attention's shapes:
 * head dims 40, 128 and 8 (rounded up to 16, its k-step, with zeros), 36
 * (not a multiple of 8: it takes every head up to 128, where the tf32
 * one hands such heads to the tiled kernel), and 136 (wider: the simple
 * kernel runs); blocks of 3, 4 and 4 + 3 heads (a warp idle). (After the
 * others: their random numbers stay as they were.) */
static void test_attention_bf16(void **s) {
  (void)s;
  check_attention(23, 40, 6, 2, "mma_bf16");
  check_attention(0, 40, 6, 2, "mma_bf16");
  check_attention(37, 128, 6, 2, "mma_bf16");
  check_attention(23, 40, 8, 2, "mma_bf16");
  check_attention(23, 64, 14, 2, "mma_bf16");
  check_attention(11, 8, 6, 2, "mma_bf16");
  check_attention(23, 36, 6, 2, "mma_bf16");
  check_attention(23, 136, 6, 2, "mma_bf16");
}

/* Attention over a prefix of P keys (P > 0) and n_seqs sequences, sequence i
 * n[i] rows at row0[i] after past[i] cached keys (the rows 0 .. rows - 1
 * all covered), 8 heads on 2 kv heads of head_dim 64, by both tensor-core
 * kernels; then whether the last call packed the prefix. The caches' and
 * the prefix's positions past their keys hold NaN. */
static int check_seqs(int P, int n_seqs, const int *n, const int *past, const int *row0, const char *label) {
  enum { H = 8, KV = 2, hd = 64, kMaxSeqs = 64 };
  static const char *const mma[] = {"mma", "mma_bf16"};
  assert_true(P > 0 && n_seqs <= kMaxSeqs);
  int stride = 1, rows = 0;
  for (int i = 0; i < n_seqs; i++) {
    stride = past[i] + n[i] > stride ? past[i] + n[i] : stride;
    rows = row0[i] + n[i] > rows ? row0[i] + n[i] : rows;
  }
  const size_t cache = (size_t)KV * stride * hd;
  float *q = tu_rand_vec(&rng, (size_t)rows * H * hd);
  float *kp = tu_rand_vec(&rng, (size_t)KV * (P + 3) * hd), *vp = tu_rand_vec(&rng, (size_t)KV * (P + 3) * hd);
  unused_nan(kp, KV, P + 3, hd, P), unused_nan(vp, KV, P + 3, hd, P);
  float *k[kMaxSeqs], *v[kMaxSeqs];
  pa_attn_seq seqs[kMaxSeqs];
  for (int i = 0; i < n_seqs; i++) {
    k[i] = tu_rand_vec(&rng, cache), v[i] = tu_rand_vec(&rng, cache);
    unused_nan(k[i], KV, stride, hd, past[i] + n[i]), unused_nan(v[i], KV, stride, hd, past[i] + n[i]);
    seqs[i] =
        (pa_attn_seq){.row0 = row0[i], .n = n[i], .past = past[i], .k_own = k[i], .v_own = v[i], .stride = stride};
  }
  pa_attn_args a = {.n_heads = H,
                    .n_kv_heads = KV,
                    .head_dim = hd,
                    .q = q,
                    .k_prefix = kp,
                    .v_prefix = vp,
                    .prefix_len = P,
                    .prefix_stride = P + 3,
                    .seqs = seqs,
                    .n_seqs = n_seqs};
  compare_attention(&a, rows, mma, 2, label, 2e-6, 1e-6);
  for (int i = 0; i < n_seqs; i++)
    free(k[i]), free(v[i]);
  free(q), free(kp), free(vp);
  return pa_cuda_attention_packing(-1);
}

/* The tensor cores' kernels with a row's keys split across blocks
 * (pa_cuda_attention_splits), their shares combined after: at
 * check_attention's shapes (with a prefix and without, head_dim 40 and
 * 128, a block with an idle warp) in 2 and 3 shares (tiles of 16 rows whose
 * first rows see no key of the last share: their shares weigh 0) and in as
 * many as a tile has key tiles; and by the backend's own choice on a decoding
 * step, one row after 2,400 keys, 8 heads on 2 kv heads (2 blocks where
 * the device has 132 SMs: 19 shares of its 76 key tiles, 4 each). Combining
 * shares reorders the sums over the keys: the same tolerances. */
static void test_attention_split(void **s) {
  (void)s;
  static const char *const mma[] = {"mma", "mma_bf16"};
  for (int k = 0; k < 2; k++)
    for (int n = 2; n <= 4; n++) {
      pa_cuda_attention_splits(n == 4 ? 1000 : n);
      check_attention(23, 40, 6, 2, mma[k]);
      assert_int_equal(pa_cuda_attention_splits(-1), n == 4 ? 3 : n); /* 70 keys: 3 key tiles */
      check_attention(0, 40, 6, 2, mma[k]);
      assert_int_equal(pa_cuda_attention_splits(-1), 2); /* 47 keys: 2 key tiles */
      check_attention(37, 128, 14, 2, mma[k]);
      assert_int_equal(pa_cuda_attention_splits(0), n == 4 ? 3 : n); /* 84 keys: 3 key tiles */
      check_attention(37, 128, 14, 2, mma[k]);
      assert_int_equal(pa_cuda_attention_splits(-1), 1); /* by the backend's choice: too few keys */
    }
  static const int one[] = {1}, none[] = {0};
  check_seqs(2400, 1, one, none, none, "a decoding step after 2,400 keys");
  const int used = pa_cuda_attention_splits(-1);
  fprintf(stderr, "    split in %d shares\n", used);
  /* 19 with 38 SMs or more (the emulation's 132, an A100's 108, an H100's 114 or 132): at least 4 key tiles each */
  assert_true(used > 1 && used <= 19);
}

/* The packed prefix (pa_cuda_attention_packing): a decoding step of 40
 * sequences after a 600-token prefix (one row each, 1 to 22 keys of their
 * own), which the backend packs by itself (3 tiles walk the prefix where 40
 * would) and whose prefix walk it splits (6 blocks), and never packed as
 * asked (after 100 keys); two one-row sequences, packed by the backend's
 * choice after 128 keys (1 tile for 2, 4 key tiles) and not after 127;
 * seven sequences of 0 to 34 rows placed out of order (the runs of
 * consecutive rows break where the order does), packed as asked after a
 * 70-token prefix, in one share a walk and split in 2 and 3 (the two walks'
 * shares side by side); check_attention's shapes packed as asked, and not
 * packed by the backend's choice (6 tiles, 4 of them walking the prefix
 * packed). Combining reorders the sums over the keys: the same tolerances. */
static void test_attention_packed(void **s) {
  (void)s;
  enum { D = 40 };
  int n[D], past[D], row0[D];
  for (int i = 0; i < D; i++)
    n[i] = 1, past[i] = i * 7 % 22, row0[i] = i;
  assert_int_equal(check_seqs(600, D, n, past, row0, "a decoding step of 40 sequences"), 1);
  /* the prefix's walk: 3 tiles x 2 kv heads, 19 key tiles in 4 shares (at least 4 each, with 24 SMs or more);
   * the own keys': 40 tiles x 2 kv heads, too few keys to split */
  assert_int_equal(pa_cuda_attention_splits(-1), 4 + 1);
  pa_cuda_attention_packing(2);
  assert_int_equal(check_seqs(100, D, n, past, row0, "a decoding step of 40 sequences, never packed"), 0);
  pa_cuda_attention_packing(0);
  assert_int_equal(check_seqs(128, 2, n, past, row0, "two sequences after 128 keys"), 1);
  assert_int_equal(check_seqs(127, 2, n, past, row0, "two sequences after 127 keys"), 0);

  /* rows 20-53, 0-2, 3-19, none, 54-55, 56, 57-61: runs [20, 54), [0, 20), [54, 62) */
  static const int mn[] = {34, 3, 17, 0, 2, 1, 5}, mpast[] = {0, 9, 31, 4, 0, 17, 2},
                   mrow0[] = {20, 0, 3, 54, 54, 56, 57};
  pa_cuda_attention_packing(1);
  for (int splits = 1; splits <= 3; splits++) {
    pa_cuda_attention_splits(splits);
    char label[64];
    snprintf(label, sizeof label, "mixed sequences out of order, packed, %d share(s) a walk", splits);
    assert_int_equal(check_seqs(70, 7, mn, mpast, mrow0, label), 1);
    /* at most a share a key tile: the prefix's 3, the most own keys' (48) 2 */
    assert_int_equal(pa_cuda_attention_splits(-1), splits + (splits < 2 ? splits : 2));
  }
  pa_cuda_attention_splits(0);
  static const char *const mma[] = {"mma", "mma_bf16"};
  for (int k = 0; k < 2; k++) {
    check_attention(23, 40, 6, 2, mma[k]);
    assert_int_equal(pa_cuda_attention_packing(-1), 1);
    check_attention(37, 128, 14, 2, mma[k]);
    assert_int_equal(pa_cuda_attention_packing(-1), 1);
  }
  pa_cuda_attention_packing(0);
  check_attention(23, 40, 6, 2, "mma");
  assert_int_equal(pa_cuda_attention_packing(-1), 0);
}

/* A failed operation is reported by status() (backend.h), once: the simple
 * attention kernel over 70,000 keys (a row's scores would need 280 KB of
 * shared memory, more than a GPU allows a block) is refused, and the next
 * operations run. */
static void test_failure_reported(void **s) {
  (void)s;
  assert_int_equal(gpu->status(), 0);
  const int P = 70000, hd = 8;
  float *kp = gpu->alloc((size_t)P * hd * sizeof(float)), *vp = gpu->alloc((size_t)P * hd * sizeof(float));
  float *q = gpu->alloc(hd * sizeof(float)), *z = gpu->alloc(hd * sizeof(float));
  float *k0 = gpu->alloc(hd * sizeof(float)), *v0 = gpu->alloc(hd * sizeof(float));
  assert_true(kp && vp && q && z && k0 && v0);
  pa_attn_seq seq = {.row0 = 0, .n = 1, .past = 0, .k_own = k0, .v_own = v0, .stride = 1};
  pa_attn_args a = {.n_heads = 1, .n_kv_heads = 1, .head_dim = hd, .q = q, .z = z, .k_prefix = kp, .v_prefix = vp,
                    .prefix_len = P, .prefix_stride = P, .seqs = &seq, .n_seqs = 1};
  float *scratch = gpu->alloc(gpu->attention_scratch(&a) * sizeof(float) + 4);
  assert_int_equal(pa_cuda_attention_kernel("simple"), 0);
  gpu->attention(&a, scratch);
  assert_int_equal(pa_cuda_attention_kernel("mma"), 0);
  assert_int_equal(gpu->status(), -1);
  fprintf(stderr, "    reported: %s\n", gpu->error());
  assert_non_null(strstr(gpu->error(), "shared memory"));
  assert_int_equal(gpu->status(), 0); /* forgotten once reported */
  const float one = 1.0f;
  gpu->upload(q, &one, sizeof one);
  float got = 0;
  gpu->copy2d(z, 4, q, 4, 4, 1);
  gpu->download(&got, z, sizeof got);
  assert_int_equal(gpu->status(), 0);
  assert_true(got == 1.0f);
  gpu->release(kp), gpu->release(vp), gpu->release(q), gpu->release(z), gpu->release(k0), gpu->release(v0);
  gpu->release(scratch);
}

/* A change of device (pa_cuda_select): the stream, the cuBLAS handles, the
 * staging ring and the device buffers kept between calls (the attention's
 * descriptors, the training attention's, the products' bf16 x) belong to
 * the device left; they are made again on the new one, whose operations
 * agree with the CPU as before, and so on the way back. Needs two devices:
 * the emulation's run has them (PALIGN_EMU_DEVICES=2), a machine with one
 * GPU skips it. */
static void test_device_change(void **s) {
  if (pa_cuda_devices() < 2) {
    fprintf(stderr, "    one device: nothing to change to\n");
    skip();
  }
  for (int round = 0; round < 3; round++) { /* on device 0, 1, then 0 again */
    assert_int_equal(pa_cuda_select(round % 2), 0);
    assert_ptr_equal(pa_backend_cuda(), gpu);
    check_attention(23, 40, 6, 2, "simple"); /* the row descriptors too */
    check_attention(37, 64, 8, 2, "mma");
    check_matmul_bf16(7 + round, 33, 40);
    test_attention_train(s);
  }
}

int main(void) {
  cpu = pa_backend_cpu();
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  gpu = pa_backend_cuda();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_matmul),
      cmocka_unit_test(test_matmul_bf16),
      cmocka_unit_test(test_matmul_tn_acc),
      cmocka_unit_test(test_rmsnorm),
      cmocka_unit_test(test_rope),
      cmocka_unit_test(test_elementwise),
      cmocka_unit_test(test_zero),
      cmocka_unit_test(test_alloc_refused),
      cmocka_unit_test(test_attention),
      cmocka_unit_test(test_backward),
      cmocka_unit_test(test_adamw),
      cmocka_unit_test(test_attention_train),
      cmocka_unit_test(test_attention_rescaled),
      cmocka_unit_test(test_attention_long_row),
      cmocka_unit_test(test_failure_reported),
      cmocka_unit_test(test_attention_head_dim_36),
      cmocka_unit_test(test_attention_bf16),
      cmocka_unit_test(test_attention_split),
      cmocka_unit_test(test_attention_packed),
      cmocka_unit_test(test_device_change),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
