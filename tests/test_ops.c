/* The CPU backend's operations against naive double-precision loops written
 * straight from the definitions, on shapes that are not multiples of any
 * block size. Tolerance: 1e-5 relative to the result's scale (fp32 sums of a
 * few hundred terms, accumulated in a different order). The bf16 rounding
 * against PyTorch's (tests/golden/make_bf16_golden.py); the bf16 products
 * against the same loops over the rounded operands (the products of bf16
 * values are exact, so the tolerance is the fp32 one). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu_internal.h"
#include "testutil.h"

static uint64_t rng = 88172645463325252ULL;
#define frand()     tu_frand(&rng)
#define rand_vec(n) tu_rand_vec(&rng, (n))

static void close_enough(const float *got, const double *want, size_t n, double rel, const char *what) {
  double scale = 0;
  for (size_t i = 0; i < n; i++)
    scale = fmax(scale, fabs(want[i]));
  for (size_t i = 0; i < n; i++)
    if (!(fabs(got[i] - want[i]) <= rel * (scale > 1 ? scale : 1)))
      fail_msg("%s[%zu]: got %.8g want %.8g (scale %g)", what, i, got[i], want[i], scale);
}

static void test_matmul(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cpu();
  const int M = 7, N = 13, K = 37;
  float *x = rand_vec((size_t)M * K), *w = rand_vec((size_t)N * K), *y = rand_vec((size_t)M * N);
  double *want = malloc((size_t)M * N * sizeof *want);
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      double acc = 0.5 * y[m * N + n];
      for (int k = 0; k < K; k++)
        acc += (double)x[m * K + k] * w[n * K + k];
      want[m * N + n] = acc;
    }
  for (size_t i = 0; i < (size_t)M * N; i++)
    y[i] *= 0.5f; /* beta = 1 accumulates onto what is there */
  be->matmul(M, N, K, x, w, 1.0f, y);
  close_enough(y, want, (size_t)M * N, 1e-5, "matmul");
  free(x), free(w), free(y), free(want);
}

static void test_rmsnorm_swiglu_add_bias_embed(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cpu();
  const int M = 5, D = 77;
  float *x = rand_vec((size_t)M * D), *w = rand_vec(D), *y = malloc((size_t)M * D * sizeof *y);
  double want[5 * 77];
  for (int m = 0; m < M; m++) {
    double ss = 0;
    for (int i = 0; i < D; i++)
      ss += (double)x[m * D + i] * x[m * D + i];
    for (int i = 0; i < D; i++)
      want[m * D + i] = x[m * D + i] / sqrt(ss / D + 1e-5) * w[i];
  }
  be->rmsnorm(M, D, x, w, 1e-5f, y);
  close_enough(y, want, (size_t)M * D, 1e-6, "rmsnorm");

  float *g = rand_vec((size_t)M * D), *u = rand_vec((size_t)M * D);
  for (int i = 0; i < M * D; i++)
    g[i] *= 40.0f; /* SiLU's exponential over [-40, 40], both tails */
  for (int i = 0; i < M * D; i++)
    want[i] = (double)g[i] / (1 + exp(-(double)g[i])) * u[i];
  be->swiglu(M, D, g, u);
  close_enough(g, want, (size_t)M * D, 1e-6, "swiglu");

  for (int i = 0; i < M * D; i++)
    want[i] = (double)y[i] + u[i];
  be->add(M, D, u, y);
  close_enough(y, want, (size_t)M * D, 1e-7, "add");

  float *bias = rand_vec(D);
  for (int i = 0; i < M * D; i++)
    want[i] = (double)y[i] + bias[i % D];
  be->add_bias(M, D, bias, y);
  close_enough(y, want, (size_t)M * D, 1e-7, "add_bias");
  free(bias);

  const int32_t ids[3] = {4, 0, 4};
  float *e = malloc(3 * (size_t)D * sizeof *e);
  be->embed(3, D, ids, x, e);
  assert_memory_equal(e, x + 4 * D, D * sizeof(float));
  assert_memory_equal(e + D, x, D * sizeof(float));
  free(x), free(w), free(y), free(g), free(u), free(e);
}

static void test_rope(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cpu();
  const int M = 3, H = 2, hd = 10, half = 5, maxpos = 50;
  float *cos_t = malloc((size_t)maxpos * half * sizeof(float)), *sin_t = malloc((size_t)maxpos * half * sizeof(float));
  for (int p = 0; p < maxpos; p++)
    for (int i = 0; i < half; i++) {
      cos_t[p * half + i] = (float)cos(p * pow(100.0, -2.0 * i / hd));
      sin_t[p * half + i] = (float)sin(p * pow(100.0, -2.0 * i / hd));
    }
  const int32_t pos[3] = {0, 7, 49};
  float *x = rand_vec((size_t)M * H * hd);
  double want[3 * 2 * 10];
  for (int m = 0; m < M; m++)
    for (int h = 0; h < H; h++)
      for (int i = 0; i < half; i++) {
        const double a = pos[m] * pow(100.0, -2.0 * i / hd);
        const float *v = x + (m * H + h) * hd;
        want[(m * H + h) * hd + i] = v[i] * cos(a) - v[i + half] * sin(a);
        want[(m * H + h) * hd + i + half] = v[i + half] * cos(a) + v[i] * sin(a);
      }
  be->rope(M, H, hd, pos, cos_t, sin_t, x);
  close_enough(x, want, (size_t)M * H * hd, 1e-6, "rope");
  free(cos_t), free(sin_t), free(x);
}

/* Naive causal GQA attention of one sequence over [prefix keys; own keys]. */
static void naive_attention(const pa_attn_args *a, const pa_attn_seq *s, double *z) {
  const int H = a->n_heads, hd = a->head_dim, g = H / a->n_kv_heads, P = a->prefix_len;
  for (int j = 0; j < s->n; j++)
    for (int h = 0; h < H; h++) {
      const int kh = h / g, nk = P + s->past + j + 1;
      const float *q = a->q + ((size_t)(s->row0 + j) * H + h) * hd;
      double *sc = malloc((size_t)nk * sizeof *sc), mx = -INFINITY, sum = 0;
      for (int t = 0; t < nk; t++) {
        const float *k = t < P ? a->k_prefix + ((size_t)kh * a->prefix_stride + t) * hd
                               : s->k_own + ((size_t)kh * s->stride + t - P) * hd;
        double d = 0;
        for (int i = 0; i < hd; i++)
          d += (double)q[i] * k[i];
        sc[t] = d / sqrt(hd);
        mx = fmax(mx, sc[t]);
      }
      for (int t = 0; t < nk; t++)
        sum += sc[t] = exp(sc[t] - mx);
      double *out = z + ((size_t)(s->row0 + j) * H + h) * hd;
      for (int i = 0; i < hd; i++)
        out[i] = 0;
      for (int t = 0; t < nk; t++) {
        const float *v = t < P ? a->v_prefix + ((size_t)kh * a->prefix_stride + t) * hd
                               : s->v_own + ((size_t)kh * s->stride + t - P) * hd;
        for (int i = 0; i < hd; i++)
          out[i] += sc[t] / sum * v[i];
      }
      free(sc);
    }
}

static void check_attention(int H, int KV, int hd, int P, int n_seqs, int threads) {
  pa_backend_set_threads(threads);
  const pa_backend *be = pa_backend_cpu();
  const int stride = 23, pstride = P + 3;
  pa_attn_seq seqs[8];
  int rows = 0;
  float *kown[8], *vown[8];
  for (int i = 0; i < n_seqs; i++) {
    const int past = i % 3 * 2, n = 1 + (i * 5) % 9; /* uneven lengths, some with cached tokens */
    kown[i] = rand_vec((size_t)KV * stride * hd);
    vown[i] = rand_vec((size_t)KV * stride * hd);
    seqs[i] = (pa_attn_seq){.row0 = rows, .n = n, .past = past, .k_own = kown[i], .v_own = vown[i], .stride = stride};
    rows += n;
  }
  float *q = rand_vec((size_t)rows * H * hd), *z = malloc((size_t)rows * H * hd * sizeof *z);
  float *kp = P ? rand_vec((size_t)KV * pstride * hd) : NULL, *vp = P ? rand_vec((size_t)KV * pstride * hd) : NULL;
  const pa_attn_args a = {.n_heads = H,
                          .n_kv_heads = KV,
                          .head_dim = hd,
                          .q = q,
                          .z = z,
                          .k_prefix = kp,
                          .v_prefix = vp,
                          .prefix_len = P,
                          .prefix_stride = pstride,
                          .seqs = seqs,
                          .n_seqs = n_seqs};
  float *scratch = malloc(be->attention_scratch(&a) * sizeof(float));
  be->attention(&a, scratch);
  double *want = malloc((size_t)rows * H * hd * sizeof *want);
  for (int i = 0; i < n_seqs; i++)
    naive_attention(&a, &seqs[i], want);
  close_enough(z, want, (size_t)rows * H * hd, 1e-5, "attention");
  for (int i = 0; i < n_seqs; i++)
    free(kown[i]), free(vown[i]);
  free(q), free(z), free(kp), free(vp), free(scratch), free(want);
  pa_backend_set_threads(0);
}

static void test_attention_no_prefix(void **s) {
  (void)s;
  check_attention(6, 2, 12, 0, 1, 1);
  check_attention(6, 3, 10, 0, 5, 2);
}

static void test_attention_prefix(void **s) {
  (void)s;
  check_attention(4, 4, 8, 17, 1, 1); /* plain multi-head */
  check_attention(6, 2, 12, 31, 7, 1);
  check_attention(6, 2, 12, 31, 7, 2); /* the many-pairs path, threads in parallel */
  check_attention(9, 3, 16, 5, 8, 2);
}

/* pa_bf16_from_f32 and back against torch.Tensor.bfloat16 on 2,055 bit
 * patterns (ties both ways, subnormals, overflow to infinity): exact. */
static void test_bf16_round(void **s) {
  (void)s;
  FILE *f = fopen(PALIGN_TEST_DATA "/bf16/round.tsv", "r");
  assert_non_null(f);
  char line[128];
  int n = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned in, want;
    if (line[0] == '#')
      continue;
    assert_int_equal(sscanf(line, "%x %x", &in, &want), 2);
    union {
      uint32_t u;
      float f;
    } v = {.u = in}, back;
    const pa_bf16 got = pa_bf16_from_f32(v.f);
    if (got != want)
      fail_msg("fp32 %08x: bf16 %04x, torch %04x", in, got, want);
    back.f = pa_bf16_to_f32(got);
    assert_int_equal(back.u, (uint32_t)want << 16);
    n++;
  }
  fclose(f);
  assert_int_equal(n, 2055);
  union {
    uint32_t u;
    float f;
  } nan = {.u = 0xFFC00001u};
  assert_int_equal(pa_bf16_from_f32(nan.f) & 0xFFC0u, 0xFFC0u); /* NaN stays a (quiet) NaN, sign kept */
}

static float round16(float x) { return pa_bf16_to_f32(pa_bf16_from_f32(x)); }

/* y = beta y + bf16(x) . w (w [N][K], or [K][N] when nn) in double. */
static void bf16_reference(bool nn, int M, int N, int K, const float *x, const pa_bf16 *w, float beta, const float *y0,
                           double *want) {
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      double acc = beta == 0.0f ? 0.0 : (double)beta * y0[(size_t)m * N + n];
      for (int k = 0; k < K; k++)
        acc += (double)round16(x[(size_t)m * K + k]) * pa_bf16_to_f32(nn ? w[(size_t)k * N + n] : w[(size_t)n * K + k]);
      want[(size_t)m * N + n] = acc;
    }
}

/* matmul_bf16 and matmul_nn_bf16 (one block, and several both ways: 300 rows
 * and 260 columns), with beta 0 over a NaN-filled y and beta 0.5; and the
 * buffer-free definition a thread without buffers falls back to. */
static void test_matmul_bf16(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cpu();
  const int shapes[][3] = {{1, 1, 1}, {7, 13, 37}, {300, 260, 33}, {3, 300, 70}};
  for (size_t c = 0; c < sizeof shapes / sizeof *shapes; c++) {
    const int M = shapes[c][0], N = shapes[c][1], K = shapes[c][2];
    float *x = rand_vec((size_t)M * K), *wf = rand_vec((size_t)N * K), *y0 = rand_vec((size_t)M * N);
    pa_bf16 *w = malloc((size_t)N * K * sizeof *w);
    float *y = malloc((size_t)M * N * sizeof *y);
    double *want = malloc((size_t)M * N * sizeof *want);
    for (size_t i = 0; i < (size_t)N * K; i++)
      w[i] = pa_bf16_from_f32(wf[i]);
    for (int nn = 0; nn < 2; nn++)
      for (int bi = 0; bi < 2; bi++) {
        const float beta = bi ? 0.5f : 0.0f;
        bf16_reference(nn, M, N, K, x, w, beta, y0, want);
        for (int direct = 0; direct < 2; direct++) {
          if (beta == 0.0f)
            memset(y, 0xFF, (size_t)M * N * sizeof *y); /* NaN: not read */
          else
            memcpy(y, y0, (size_t)M * N * sizeof *y);
          if (direct)
            pa_cpu_matmul_bf16_direct(nn, M, N, K, x, K, w, nn ? N : K, beta, y, N);
          else
            (nn ? be->matmul_nn_bf16 : be->matmul_bf16)(M, N, K, x, w, beta, y);
          char what[80];
          snprintf(what, sizeof what, "%s%s %dx%dx%d beta %g", nn ? "matmul_nn_bf16" : "matmul_bf16",
                   direct ? " (direct)" : "", M, N, K, beta);
          close_enough(y, want, (size_t)M * N, 1e-5, what);
        }
      }
    free(x), free(wf), free(y0), free(w), free(y), free(want);
  }
}

static void test_embed_bf16(void **s) {
  (void)s;
  const int V = 11, D = 9, ids[4] = {3, 0, 10, 3};
  float *t = rand_vec((size_t)V * D), y[4 * 9];
  pa_bf16 tab[11 * 9];
  for (int i = 0; i < V * D; i++)
    tab[i] = pa_bf16_from_f32(t[i]);
  pa_backend_cpu()->embed_bf16(4, D, ids, tab, y);
  for (int m = 0; m < 4; m++)
    for (int i = 0; i < D; i++)
      assert_true(y[m * D + i] == round16(t[ids[m] * D + i]));
  free(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_matmul),
      cmocka_unit_test(test_rmsnorm_swiglu_add_bias_embed),
      cmocka_unit_test(test_rope),
      cmocka_unit_test(test_attention_no_prefix),
      cmocka_unit_test(test_attention_prefix),
      cmocka_unit_test(test_bf16_round),
      cmocka_unit_test(test_matmul_bf16),
      cmocka_unit_test(test_embed_bf16),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
