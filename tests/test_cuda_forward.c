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
    pa_kv *pre, *a, *b;
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

static void expect_row(const pa_cuda_profile_row *rows, int n, const char *name, unsigned long spans, double flops) {
  const pa_cuda_profile_row *r = row_named(rows, n, name);
  if (r->spans != spans || r->flops != flops)
    fail_msg("%s: %lu spans and %.0f flops, expected %lu and %.0f", name, r->spans, r->flops, spans, flops);
}

static void expect_product(const pa_cuda_profile_row *rows, int n, const char *kind, int N, int K, unsigned long spans,
                           double rows_times_calls) {
  char name[64];
  snprintf(name, sizeof name, "matmul %s %dx%d", kind, N, K);
  expect_row(rows, n, name, spans, 2.0 * rows_times_calls * N * K);
}

static double ms_since(const struct timespec *t0) {
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (t1.tv_sec - t0->tv_sec) * 1e3 + (t1.tv_nsec - t0->tv_nsec) * 1e-6;
}

/* pa_cuda_profile_write's table for the n rows: a title, the totals, the
 * heading, then a line a row, the longest first, each product's rate its
 * flops over its time (as printed: to 0.1%, or 0.001 TFLOP/s). */
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
    double ms, share, rate;
    const int got = sscanf(line + 49, "%lu %lf %lf%% %lf", &spans, &ms, &share, &rate);
    const pa_cuda_profile_row *r = row_named(rows, n, name);
    assert_true(got >= 3 && spans == r->spans && ms <= last_ms);
    last_ms = ms;
    if (r->flops > 0 && r->ms > 0) {
      const double want = r->flops / (r->ms * 1e-3) * 1e-12;
      if (got != 4 || fabs(rate - want) > fmax(1e-3, 1e-3 * want))
        fail_msg("%s: %s TFLOP/s printed, %g computed", name, got == 4 ? "" : "no", want);
    }
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
  pa_kv *pre, *a, *b;
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
  expect_product(rows, n, "bf16", qd, D, 4ul * L, 2 * L * M); /* q and o */
  expect_product(rows, n, "bf16", kd, D, 4ul * L, 2 * L * M); /* k and v */
  expect_product(rows, n, "bf16", F, D, 4ul * L, 2 * L * M);  /* gate and up */
  expect_product(rows, n, "bf16", D, F, 2ul * L, L * M);      /* down */
  expect_product(rows, n, "bf16", V, D, 1, 2);                /* the logits of the batch's two last rows */
  expect_row(rows, n, "bf16 rounding of x (products)", 14ul * L + 1, 0);
  /* keys seen: the prefix 1 + ... + 20; a: 4 x 20 + 1 + ... + 4; b: 17 x 20 + 1 + ... + 17 */
  expect_row(rows, n, "attention (tensor cores)", 2ul * L, 4.0 * H * hd * L * (210 + 90 + 493));
  expect_row(rows, n, "attention: new keys into the caches", 2ul * L, 0);
  expect_row(rows, n, "rmsnorm", 4ul * L + 1, 0); /* the batch's two last rows in one call */
  expect_row(rows, n, "rope", 4ul * L, 0);
  expect_row(rows, n, "swiglu", 2ul * L, 0);
  expect_row(rows, n, "add_bias", (unsigned long)L, 0); /* the steering */
  expect_row(rows, n, "embed", L + 1ul, 0); /* the last rows gathered: the heads' a layer, then for the logits */
  expect_row(rows, n, "embed bf16", 2, 0);
  expect_row(rows, n, "download", 2, 0); /* heads and logits */
  /* uploads: a span a chunk of the staging ring (a copy may straddle two) */
  assert_true(row_named(rows, n, "attention: tables upload")->spans >= 2ul * L);
  assert_true(row_named(rows, n, "upload")->spans >= 5); /* tokens and positions twice, the steering */
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
  expect_row(rows, n, "rmsnorm", 6ul * L + 1, 0);
  expect_product(rows, n, "bf16", D, F, 3ul * L, L * (M + 20)); /* the last in a pass: in the pool when it stopped */
  expect_row(rows, n, "attention (tensor cores)", 3ul * L, 4.0 * H * hd * L * (2 * 210 + 90 + 493));

  /* restarted: empty; fp32 weights, a 40-token prefix in two shares */
  assert_int_equal(pa_cuda_profile(1), 0);
  assert_int_equal(pa_cuda_profile_read(&rows, &idle), 0);
  pa_lm *lm32;
  pa_kv *pre32;
  if (pa_lm_create(m, &(pa_lm_opts){.max_seq = 64, .backend = pa_backend_cuda(), .weights = PA_WEIGHTS_FP32}, &lm32) ||
      pa_kv_create(lm32, 48, &pre32))
    fail_msg("%s", pa_errmsg());
  pa_cuda_attention_splits(2);
  pa_seq p40 = {.tokens = tok, .n_tokens = 40, .kv = pre32};
  assert_int_equal(pa_lm_forward(lm32, &(pa_batch){.seqs = &p40, .n_seqs = 1}), PA_OK);
  const int n32 = pa_cuda_profile_read(&rows, &idle);
  assert_int_equal(pa_cuda_attention_splits(0), 2);
  assert_int_equal(pa_cuda_profile(0), 0);
  expect_product(rows, n32, "fp32", qd, D, 2ul * L, 2 * L * 40.0);
  expect_product(rows, n32, "fp32", kd, D, 2ul * L, 2 * L * 40.0);
  expect_product(rows, n32, "fp32", F, D, 2ul * L, 2 * L * 40.0);
  expect_product(rows, n32, "fp32", D, F, 1ul * L, L * 40.0);
  expect_row(rows, n32, "attention (tensor cores)", (unsigned long)L, 4.0 * H * hd * L * (40 * 41 / 2));
  expect_row(rows, n32, "attention: shares combined", (unsigned long)L, 0);
  expect_row(rows, n32, "embed", 1, 0);
  check_table(rows, n32);

  pa_kv_destroy(pre32);
  pa_lm_destroy(lm32);
  pa_kv_destroy(pre), pa_kv_destroy(a), pa_kv_destroy(b);
  free(logits), free(heads), free(steer);
  pa_lm_destroy(lm);
  pa_model_close(m);
}

int main(void) {
  unsetenv("PALIGN_CUDA_PROFILE"); /* the profile's own waits would count in test_waits */
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2),
                                     cmocka_unit_test(test_waits), cmocka_unit_test(test_profile)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
