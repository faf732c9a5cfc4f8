/* The forward pass on the CUDA backend against the CPU backend
 * (tu_forward_compare.h): tiny llama and qwen2 models (palign mkmodel), a
 * shared prefix, two sequences (one continuing from its cache), steering and
 * head capture, greedy generation and a pass with a LoRA adapter, with the
 * weights in fp32 and in bf16 on both (llama's fp32 again with the
 * attention's shared prefix packed); the host's waits in a pass; the
 * device-time profile's account of a pass's operations. Skips (exit 77)
 * without a device.
 *
 * Tolerances, of the largest magnitude of the CPU's, with the same argmax
 * and the same generated tokens:
 * - fp32: 1e-4 (fp32 through a few layers; every operation's own error is
 *   checked tighter in test_cuda_ops.c);
 * - bf16: 2e-3. Both backends round the same operands to bf16 and their
 *   products are exact, but a sum that differs in its last fp32 bit can round
 *   to the neighbouring bf16 value (a relative step of 2^-8) when it becomes
 *   the next product's input; such flips are rare (about one input in 2^15)
 *   and each moves an output by a small share of one term, so the layers
 *   add up to well under 2e-3, against the 1e-2 to 1e-1 that separates bf16
 *   from fp32 weights. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_backend.h"
#include "tu_cuda.h"
#include "testutil.h"
#include "tu_forward_compare.h"

static void test_llama(void **s) {
  (void)s;
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_BF16, 2e-3);
  /* the shared prefix packed wherever there is one (the backend's choice packs only long ones); the profile
   * says the packed walks ran */
  pa_cuda_attention_packing(1);
  assert_int_equal(pa_cuda_profile(1), 0);
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  const pa_cuda_profile_row *rows;
  double idle;
  const int n = pa_cuda_profile_read(&rows, &idle);
  assert_int_equal(pa_cuda_profile(0), 0);
  pa_cuda_attention_packing(0);
  int packed = 0;
  for (int r = 0; r < n; r++)
    packed += !strcmp(rows[r].name, "attention (tensor cores): packed prefix") && rows[r].spans > 0;
  assert_int_equal(packed, 1);
}

static void test_qwen2(void **s) {
  (void)s;
  tu_check_forward("qwen2", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  tu_check_forward("qwen2", pa_backend_cuda(), PA_WEIGHTS_BF16, 2e-3);
}

/* A random model of n_layers (mkmodel's shape otherwise) written as NAME in
 * the tests' folder and opened on the CUDA backend with bf16 weights. */
static void open_model(const char *name, int n_layers, uint64_t seed, int max_seq, pa_model **m, pa_lm **lm) {
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = n_layers, o.seed = seed, o.force = true;
  snprintf(path, sizeof path, "%s/%s", tu_tmp, name);
  if (pa_mkmodel_write_gguf(&o, path) || pa_model_open(path, m) ||
      pa_lm_create(*m, &(pa_lm_opts){.max_seq = max_seq, .backend = pa_backend_cuda(), .weights = PA_WEIGHTS_BF16}, lm))
    fail_msg("%s", pa_errmsg());
}

/* The waits for the device in one forward pass of a model of n_layers: a
 * pass over a prefix (nothing downloaded: its status only) in *fill, and a
 * pass of two sequences with steering, head capture and logits (two
 * downloads and the status) in *batch; each measured on a second pass, the
 * first having grown the buffers. */
static void count_waits(int n_layers, unsigned long *fill, unsigned long *batch) {
  char name[64];
  snprintf(name, sizeof name, "waits-%d.gguf", n_layers);
  pa_model *m;
  pa_lm *lm;
  open_model(name, n_layers, 5, 128, &m, &lm);
  const pa_model_config *c = pa_lm_config(lm);
  const size_t V = (size_t)c->vocab_size, Hs = (size_t)c->n_layers * c->n_heads * c->head_dim;
  float *logits = calloc(2 * V, sizeof *logits), *heads = calloc(2 * Hs, sizeof *heads),
        *steer = calloc(Hs, sizeof *steer);
  assert_true(logits && heads && steer);
  int32_t tok[24];
  for (int i = 0; i < 24; i++)
    tok[i] = (i * 29 + 3) % c->vocab_size;
  for (int pass = 0; pass < 2; pass++) {
    pa_kv *pre = NULL, *a = NULL, *b = NULL;
    if (pa_kv_create(lm, 32, &pre) || pa_kv_create(lm, 32, &a) || pa_kv_create(lm, 32, &b))
      fail_msg("%s", pa_errmsg());
    unsigned long w = pa_cuda_host_waits();
    pa_seq ps = {.tokens = tok, .n_tokens = 20, .kv = pre};
    assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &ps, .n_seqs = 1}), PA_OK);
    *fill = pa_cuda_host_waits() - w;
    pa_seq two[2] = {{.tokens = tok + 1, .n_tokens = 4, .kv = a}, {.tokens = tok + 7, .n_tokens = 17, .kv = b}};
    w = pa_cuda_host_waits();
    pa_batch bt = {.prefix = pre, .seqs = two, .n_seqs = 2, .steer = steer, .logits = logits, .heads = heads};
    if (pa_lm_forward(lm, &bt))
      fail_msg("%s", pa_errmsg());
    *batch = pa_cuda_host_waits() - w;
    pa_kv_destroy(pre), pa_kv_destroy(a), pa_kv_destroy(b);
  }
  free(logits), free(heads), free(steer);
  pa_lm_destroy(lm);
  pa_model_close(m);
}

/* A forward pass waits for the device only for what it downloads and for
 * its status, whatever its depth: its uploads (tokens, positions, steering,
 * each layer's attention tables) are queued, not waited for. */
static void test_waits(void **s) {
  (void)s;
  for (int L = 2; L <= 6; L += 4) {
    unsigned long fill, batch;
    count_waits(L, &fill, &batch);
    fprintf(stderr, "    %d layers: %lu wait(s) filling a prefix, %lu for a batch with heads and logits\n", L, fill,
            batch);
    assert_int_equal(fill, 1);
    assert_int_equal(batch, 3);
  }
}

static const pa_cuda_profile_row *row_named(const pa_cuda_profile_row *rows, int n, const char *name) {
  for (int r = 0; r < n; r++)
    if (!strcmp(rows[r].name, name))
      return &rows[r];
  fail_msg("the profile has no row \"%s\"", name);
  return NULL;
}

/* A row's spans, flops and bytes, exactly: every count is a sum of integers under 2^53. */
static void expect_row(const pa_cuda_profile_row *rows, int n, const char *name, unsigned long spans, double flops,
                       double bytes) {
  const pa_cuda_profile_row *r = row_named(rows, n, name);
  if (r->spans != spans || r->flops != flops || r->bytes != bytes)
    fail_msg("%s: %lu spans, %.0f flops and %.0f bytes, expected %lu, %.0f and %.0f", name, r->spans, r->flops,
             r->bytes, spans, flops, bytes);
}

static void expect_product(const pa_cuda_profile_row *rows, int n, const char *kind, int N, int K, unsigned long spans,
                           double rows_times_calls, double bytes) {
  char name[64];
  snprintf(name, sizeof name, "matmul %s %dx%d", kind, N, K);
  expect_row(rows, n, name, spans, 2.0 * rows_times_calls * N * K, bytes);
}

/* The least bytes of a product of M rows (pa_cuda_profile_row): x and w,
 * of elem bytes an element, read once, y written, and read where it is
 * added to. */
static double product_bytes(double M, int N, int K, int elem, bool adds) {
  return elem * (M * K + (double)N * K) + 4.0 * M * N * (adds ? 2 : 1);
}

/* RoPE's on M rows of h heads: the heads read and written, each row's position and its cos and sin rows. */
static double rope_bytes(double M, int h, int hd) { return 8.0 * M * h * hd + 4.0 * M * (hd + 1); }

static double ms_since(const struct timespec *t0) {
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (t1.tv_sec - t0->tv_sec) * 1e3 + (t1.tv_nsec - t0->tv_nsec) * 1e-6;
}

/* The number in the 10 columns of line from at, where there is one. */
static bool column(const char *line, size_t at, double *v) {
  char field[11] = "";
  if (strlen(line) > at)
    memcpy(field, line + at, 10);
  return sscanf(field, "%lf", v) == 1;
}

/* A rate as the table prints it (to 0.1 from 10 up, else to 0.001), against its figure over the row's time. */
static void expect_rate(const char *name, const char *what, bool printed, double rate, double figure, double ms) {
  if (figure > 0 && ms > 0) {
    const double want = figure / (ms * 1e-3);
    if (!printed || fabs(rate - want) > (want >= 10 ? 0.05 : 5e-4) * (1 + 1e-9))
      fail_msg("%s: %s %s printed, %g computed", name, printed ? "" : "no", what, want);
  } else if (printed)
    fail_msg("%s: %s printed with no figure to rate", name, what);
}

/* pa_cuda_profile_write's table for the n rows: a title, the totals, the
 * heading, then a line a row, the longest first, each product's and the
 * attention's rate of flops over its time, and each row's of bytes, in
 * their columns. */
static void check_table(const pa_cuda_profile_row *rows, int n) {
  FILE *f = tmpfile();
  assert_non_null(f);
  pa_cuda_profile_write(f);
  rewind(f);
  char line[200];
  int lines = 0;
  double last_ms = INFINITY;
  while (fgets(line, sizeof line, f)) {
    fprintf(stderr, "    %s", line);
    if (++lines <= 3)
      continue;
    char name[48] = ""; /* the name's column: 47 characters, as many as a name has */
    memcpy(name, line + 2, 47);
    for (int i = 46; i >= 0 && name[i] == ' '; i--)
      name[i] = '\0';
    unsigned long spans;
    double ms, share, tflops = 0, gbs = 0;
    const int got = sscanf(line + 49, "%lu %lf %lf%%", &spans, &ms, &share);
    const pa_cuda_profile_row *r = row_named(rows, n, name);
    assert_true(got == 3 && spans == r->spans && ms <= last_ms);
    last_ms = ms;
    /* after the name, spans (10 columns), ms (13) and share (8): TFLOP/s from column 80, GB/s from 90 */
    const bool has_tflops = column(line, 80, &tflops), has_gbs = column(line, 90, &gbs);
    expect_rate(name, "TFLOP/s", has_tflops, tflops, r->flops * 1e-12, r->ms);
    expect_rate(name, "GB/s", has_gbs, gbs, r->bytes * 1e-9, r->ms);
  }
  fclose(f);
  assert_int_equal(lines, 3 + n);
}

/* The device-time profile (pa_cuda_profile) of two forward passes, a
 * prefix of 20 tokens and a batch of two sequences (4 and 17 tokens) with
 * steering, head capture and logits, on 6 layers with bf16 weights: each
 * product under its weight's shape with its spans and 2MNK flops, each x
 * rounded to bf16 once a product, the attention's spans and its 4 x heads
 * x head_dim flops a key a row sees, the other operations' spans (an upload
 * at least one), nothing else, every time non-negative, the device idle
 * between them, and the two within the host's time around the passes; the
 * host's waits at least the passes' own (four) and the read's; the table as
 * written. The emulated build keeps 64 spans before it harvests them
 * (PA_PROF_SPANS), so these passes fill the pool several times: a span
 * lost or counted twice there shows in the spans. Then a pass after 20 ms
 * of the device waiting: the idle time grows by them across the harvest
 * between; stopped after that pass, the profile counts it, its last
 * product still in the pool, and nothing after. Restarted, it is empty;
 * with fp32 weights and the attention split in two (a 40-token prefix:
 * two key tiles), the fp32 products' rows and the shares' combining. */
static void test_profile(void **s) {
  (void)s;
  pa_model *m;
  pa_lm *lm;
  open_model("profile.gguf", 6, 9, 64, &m, &lm);
  const pa_model_config *c = pa_lm_config(lm);
  const int L = c->n_layers, D = c->dim, H = c->n_heads, hd = c->head_dim, F = c->ffn_dim, V = c->vocab_size;
  const int qd = H * hd, kd = c->n_kv_heads * hd;
  assert_int_equal(qd, D); /* q (qd x D) and o (D x qd) share a row */
  float *logits = calloc(2 * (size_t)V, sizeof *logits), *heads = calloc(2 * (size_t)L * qd, sizeof *heads),
        *steer = calloc((size_t)L * qd, sizeof *steer);
  assert_true(logits && heads && steer);
  int32_t tok[48];
  for (int i = 0; i < 48; i++)
    tok[i] = (i * 31 + 5) % V;
  pa_kv *pre = NULL, *a = NULL, *b = NULL;
  if (pa_kv_create(lm, 48, &pre) || pa_kv_create(lm, 32, &a) || pa_kv_create(lm, 32, &b))
    fail_msg("%s", pa_errmsg());
  struct timespec t0;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  const unsigned long waits = pa_cuda_host_waits();
  assert_int_equal(pa_cuda_profile(1), 0);
  pa_seq ps = {.tokens = tok, .n_tokens = 20, .kv = pre};
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &ps, .n_seqs = 1}), PA_OK);
  pa_seq two[2] = {{.tokens = tok + 1, .n_tokens = 4, .kv = a}, {.tokens = tok + 7, .n_tokens = 17, .kv = b}};
  pa_batch bt = {.prefix = pre, .seqs = two, .n_seqs = 2, .steer = steer, .logits = logits, .heads = heads};
  if (pa_lm_forward(lm, &bt))
    fail_msg("%s", pa_errmsg());

  const pa_cuda_profile_row *rows;
  double idle;
  const int n = pa_cuda_profile_read(&rows, &idle);
  const double wall_ms = ms_since(&t0);
  assert_true(pa_cuda_host_waits() - waits >= 1 + 3 + 1);
  assert_int_equal(n, 17);
  const double M = 20 + 21; /* the rows of the two passes */
  double qo = 0, kv = 0, gu = 0, down = 0, rope = 0, norm = 0;
  for (int r = 20; r <= 21; r++) {                                                    /* r rows a pass */
    qo += L * (product_bytes(r, qd, D, 2, false) + product_bytes(r, D, qd, 2, true)); /* o adds to x */
    kv += L * 2 * product_bytes(r, kd, D, 2, false);
    gu += L * 2 * product_bytes(r, F, D, 2, false);
    down += L * product_bytes(r, D, F, 2, true);
    rope += L * (rope_bytes(r, H, hd) + rope_bytes(r, c->n_kv_heads, hd));
    norm += L * 2 * 4.0 * (2.0 * r * D + D);
  }
  expect_product(rows, n, "bf16", qd, D, 4ul * L, 2 * L * M, qo); /* q and o */
  expect_product(rows, n, "bf16", kd, D, 4ul * L, 2 * L * M, kv); /* k and v */
  expect_product(rows, n, "bf16", F, D, 4ul * L, 2 * L * M, gu);  /* gate and up */
  expect_product(rows, n, "bf16", D, F, 2ul * L, L * M, down);    /* down */
  /* the logits of the batch's two last rows */
  expect_product(rows, n, "bf16", V, D, 1, 2, product_bytes(2, V, D, 2, false));
  /* x read as floats, written as bf16: q, k, v, o, gate and up's M x D, down's M x F; the logits' 2 x D */
  expect_row(rows, n, "bf16 rounding of x (products)", 14ul * L + 1, 0, 6.0 * (L * M * (6.0 * D + F) + 2.0 * D));
  /* keys seen: the prefix 1 + ... + 20; a: 4 x 20 + 1 + ... + 4; b: 17 x 20 + 1 + ... + 17. Bytes: q and z of the
   * rows, and the keys and values of 20 positions (the prefix), then of 20 (the prefix) + 4 + 17 (a's and b's) */
  const double kv_pos = 8.0 * c->n_kv_heads * hd;
  expect_row(rows, n, "attention (tensor cores)", 2ul * L, 4.0 * H * hd * L * (210 + 90 + 493),
             L * (8.0 * M * H * hd + kv_pos * (20 + 20 + 4 + 17)));
  expect_row(rows, n, "attention: new keys into the caches", 2ul * L, 0, L * 2 * kv_pos * M);
  /* the batch's two last rows in one call */
  expect_row(rows, n, "rmsnorm", 4ul * L + 1, 0, norm + 4.0 * (2.0 * 2 * D + D));
  expect_row(rows, n, "rope", 4ul * L, 0, rope);
  expect_row(rows, n, "swiglu", 2ul * L, 0, L * 12.0 * M * F);
  expect_row(rows, n, "add_bias", (unsigned long)L, 0, L * (8.0 * 21 * qd + 4.0 * qd)); /* the steering */
  /* the last rows gathered: the heads' a layer, then for the logits */
  expect_row(rows, n, "embed", L + 1ul, 0, L * (4.0 * 2 + 8.0 * 2 * qd) + 4.0 * 2 + 8.0 * 2 * D);
  expect_row(rows, n, "embed bf16", 2, 0, 4.0 * M + 6.0 * M * D);
  expect_row(rows, n, "download", 2, 0, 4.0 * 2 * L * qd + 4.0 * 2 * V); /* heads and logits */
  /* uploads: a span a chunk of the staging ring (a copy may straddle two) */
  assert_true(row_named(rows, n, "attention: tables upload")->spans >= 2ul * L);
  assert_true(row_named(rows, n, "attention: tables upload")->bytes > 0);
  /* tokens and positions twice, the steering, the batch's last rows */
  assert_true(row_named(rows, n, "upload")->spans >= 5);
  assert_true(row_named(rows, n, "upload")->bytes == 4.0 * (2 * M + (double)L * qd + 2));
  double ms = 0;
  for (int r = 0; r < n; r++) {
    assert_true(rows[r].ms >= 0);
    ms += rows[r].ms;
  }
  /* the device's busy and idle stretches lie within the host's time around them (events' clocks: 0.5 us) */
  if (!(ms > 0 && idle > 0 && ms + idle <= wall_ms * 1.001 + 0.01))
    fail_msg("%.3f ms timed and %.3f ms idle in %.3f ms", ms, idle, wall_ms);
  check_table(rows, n);

  /* 20 ms with nothing queued, then a prefix again, the profile stopped after it; then one more pass */
  const double idle_before = idle;
  nanosleep(&(struct timespec){.tv_nsec = 20000000}, NULL);
  pa_kv_clear(pre);
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &ps, .n_seqs = 1}), PA_OK);
  assert_int_equal(pa_cuda_profile(0), 0);
  pa_kv_clear(pre);
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &ps, .n_seqs = 1}), PA_OK);
  assert_int_equal(pa_cuda_profile_read(&rows, &idle), n);
  if (idle < idle_before + 20)
    fail_msg("idle %.3f ms, then %.3f ms after 20 ms of nothing queued", idle_before, idle);
  expect_row(rows, n, "rmsnorm", 6ul * L + 1, 0, norm + 4.0 * (2.0 * 2 * D + D) + L * 2 * 4.0 * (2.0 * 20 * D + D));
  /* the last in a pass: in the pool when it stopped */
  expect_product(rows, n, "bf16", D, F, 3ul * L, L * (M + 20), down + L * product_bytes(20, D, F, 2, true));
  expect_row(rows, n, "attention (tensor cores)", 3ul * L, 4.0 * H * hd * L * (2 * 210 + 90 + 493),
             L * (8.0 * (M + 20) * H * hd + kv_pos * (20 + 20 + 4 + 17 + 20)));

  /* restarted: empty; fp32 weights, a 40-token prefix in two shares */
  assert_int_equal(pa_cuda_profile(1), 0);
  assert_int_equal(pa_cuda_profile_read(&rows, &idle), 0);
  pa_lm *lm32;
  pa_kv *pre32 = NULL;
  if (pa_lm_create(m, &(pa_lm_opts){.max_seq = 64, .backend = pa_backend_cuda(), .weights = PA_WEIGHTS_FP32}, &lm32) ||
      pa_kv_create(lm32, 48, &pre32))
    fail_msg("%s", pa_errmsg());
  pa_cuda_attention_splits(2);
  pa_seq p40 = {.tokens = tok, .n_tokens = 40, .kv = pre32};
  assert_int_equal(pa_lm_forward(lm32, &(pa_batch){.seqs = &p40, .n_seqs = 1}), PA_OK);
  const int n32 = pa_cuda_profile_read(&rows, &idle);
  assert_int_equal(pa_cuda_attention_splits(0), 2);
  assert_int_equal(pa_cuda_profile(0), 0);
  expect_product(rows, n32, "fp32", qd, D, 2ul * L, 2 * L * 40.0,
                 L * (product_bytes(40, qd, D, 4, false) + product_bytes(40, D, qd, 4, true)));
  expect_product(rows, n32, "fp32", kd, D, 2ul * L, 2 * L * 40.0, L * 2 * product_bytes(40, kd, D, 4, false));
  expect_product(rows, n32, "fp32", F, D, 2ul * L, 2 * L * 40.0, L * 2 * product_bytes(40, F, D, 4, false));
  expect_product(rows, n32, "fp32", D, F, 1ul * L, L * 40.0, L * product_bytes(40, D, F, 4, true));
  /* the walk writes two shares a row and head (hd outputs, the max and the sum), which the combining reads */
  const double shares = 4.0 * 40 * H * 2 * (hd + 2);
  expect_row(rows, n32, "attention (tensor cores)", (unsigned long)L, 4.0 * H * hd * L * (40 * 41 / 2),
             L * (4.0 * 40 * H * hd + shares + kv_pos * 40));
  expect_row(rows, n32, "attention: shares combined", (unsigned long)L, 0, L * (shares + 4.0 * 40 * H * hd));
  expect_row(rows, n32, "embed", 1, 0, 4.0 * 40 + 8.0 * 40 * D); /* the tokens' embeddings, fp32 */
  check_table(rows, n32);

  pa_kv_destroy(pre32);
  pa_lm_destroy(lm32);
  pa_kv_destroy(pre), pa_kv_destroy(a), pa_kv_destroy(b);
  free(logits), free(heads), free(steer);
  pa_lm_destroy(lm);
  pa_model_close(m);
}

/* Each operation's bytes in the profile that the forward pass does not
 * make (the backward ones, the fp32 and nn products, the adds, copies, a zeroing),
 * one call each on small shapes: as pa_cuda_profile_row says. The
 * training attention has none. */
static void test_profile_ops(void **s) {
  (void)s;
  const pa_backend *be = pa_backend_cuda();
  enum { M = 3, N = 5, K = 7, D = 8, H = 2, hd = 4, F = 6 };
  float *x = be->alloc(4 * 64 * 8), *w = be->alloc(4 * 64 * 8), *y = be->alloc(4 * 64 * 8), *g = be->alloc(4 * 64 * 8),
        *tab = be->alloc(4 * 64);
  int32_t *pos = be->alloc(4 * M);
  assert_true(x && w && y && g && tab && pos);
  const int32_t zero[M] = {0};
  const float zeros[64] = {0};
  be->upload(pos, zero, sizeof zero);
  be->upload(tab, zeros, sizeof zeros);
  be->upload(x, zeros, sizeof zeros);
  assert_int_equal(pa_cuda_profile(1), 0);
  be->matmul(M, N, K, x, w, 0.5f, y);
  be->matmul_nn(M, N, K, x, w, 0.0f, y);
  be->matmul_tn_acc(M, N, K, x, w, g);
  be->matmul_nn_bf16(M, N, K, x, (const pa_bf16 *)w, 1.0f, y);
  be->add(M, N, x, y);
  be->scale(M * N, 2.0f, y);
  be->rmsnorm_backward(M, D, x, w, 1e-5f, g, y);
  be->rope_backward(M, H, hd, pos, tab, tab, y);
  be->swiglu_backward(M, F, x, w, g, y, y + M * F);
  be->embed(M, D, pos, x, y);
  be->copy2d(y, 16, x, 20, 12, M);
  be->zero(g + 8, 4 * 20);
  /* two one-row sequences after a 20-key prefix (1 kv head of 8 for 2 heads, each with its own key), packed:
   * each walk writes a share a row and head, the combining reads both; then after a 40-key prefix in 2 shares
   * (2 key tiles), the own keys' walk in 1 (1 key tile) */
  pa_attn_seq seqs[2] = {{.row0 = 0, .n = 1, .k_own = tab, .v_own = tab + 16, .stride = 2},
                         {.row0 = 1, .n = 1, .k_own = tab + 32, .v_own = tab + 48, .stride = 2}};
  pa_attn_args a = {.n_heads = 2,
                    .n_kv_heads = 1,
                    .head_dim = 8,
                    .q = x,
                    .z = y,
                    .k_prefix = w,
                    .v_prefix = g,
                    .prefix_len = 20,
                    .prefix_stride = 20,
                    .seqs = seqs,
                    .n_seqs = 2};
  pa_cuda_attention_packing(1);
  pa_cuda_attention_splits(0);
  float *scratch = be->alloc(be->attention_scratch(&a) * sizeof(float));
  assert_non_null(scratch);
  be->attention(&a, scratch);
  assert_int_equal(pa_cuda_attention_splits(-1), 1 + 1);
  be->release(scratch);
  a.prefix_len = a.prefix_stride = 40;
  pa_cuda_attention_splits(2);
  scratch = be->alloc(be->attention_scratch(&a) * sizeof(float));
  assert_non_null(scratch);
  be->attention(&a, scratch);
  assert_int_equal(pa_cuda_attention_splits(0), 2 + 1);
  assert_int_equal(pa_cuda_attention_packing(0), 1);
  float back[M * N];
  be->download(back, y, sizeof back);
  const pa_cuda_profile_row *rows;
  double idle;
  const int n = pa_cuda_profile_read(&rows, &idle);
  assert_int_equal(pa_cuda_profile(0), 0);
  assert_int_equal(be->status(), 0);
  assert_int_equal(n, 18);
  const double MN = M * N, MK = M * K, NK = N * K;
  expect_row(rows, n, "matmul fp32 5x7", 1, 2 * MN * K, 4 * (MK + NK) + 8 * MN); /* beta 0.5: y read too */
  expect_row(rows, n, "matmul_nn fp32 5x7", 1, 2 * MN * K, 4 * (MK + NK + MN));
  expect_row(rows, n, "matmul_tn_acc fp32 5x7", 1, 2 * MN * K, 4 * (MN + MK) + 8 * NK); /* g read and written */
  expect_row(rows, n, "matmul_nn bf16 5x7", 1, 2 * MN * K, 2 * (MK + NK) + 8 * MN);
  expect_row(rows, n, "bf16 rounding of x (products)", 1, 0, 6 * MK);
  expect_row(rows, n, "add", 1, 0, 12 * MN);
  expect_row(rows, n, "scale", 1, 0, 8 * MN);
  expect_row(rows, n, "rmsnorm_backward", 1, 0, 4 * (4.0 * M * D + D)); /* x and dy read, dx added to */
  expect_row(rows, n, "rope_backward", 1, 0, rope_bytes(M, H, hd));
  expect_row(rows, n, "swiglu_backward", 1, 0, 20.0 * M * F);
  expect_row(rows, n, "embed", 1, 0, 4.0 * M + 8.0 * M * D);
  expect_row(rows, n, "copy2d", 1, 0, 2.0 * 12 * M);
  expect_row(rows, n, "zero", 1, 0, 4 * 20);
  expect_row(rows, n, "download", 1, 0, sizeof back);
  /* a call's q (2 rows x 2 heads x 8), a row and head's share (8 outputs, the max and the sum), a position's
   * key and value; the two calls' sums */
  const double q = 4.0 * 2 * 2 * 8, share = 4.0 * 2 * 2 * (8 + 2), kv = 8.0 * 8;
  expect_row(rows, n, "attention (tensor cores): packed prefix", 2, 4.0 * 2 * 8 * 2 * (20 + 40),
             (q + share + 20 * kv) + (q + 2 * share + 40 * kv));
  expect_row(rows, n, "attention (tensor cores): own keys", 2, 2 * 4.0 * 2 * 8 * 2 * 1, 2 * (q + share + 2 * kv));
  expect_row(rows, n, "attention: shares combined", 2, 0, (2 * share + q) + (3 * share + q));
  const pa_cuda_profile_row *tables = row_named(rows, n, "attention: tables upload"); /* 3 tiles' descriptors a call */
  assert_true(tables->spans == 2 && tables->bytes > 0);
  be->release(scratch);
  be->release(x), be->release(w), be->release(y), be->release(g), be->release(tab), be->release(pos);
}

int main(void) {
  unsetenv("PALIGN_CUDA_PROFILE"); /* the profile's own waits would count in test_waits */
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2),
                                     cmocka_unit_test(test_waits), cmocka_unit_test(test_profile),
                                     cmocka_unit_test(test_profile_ops)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
