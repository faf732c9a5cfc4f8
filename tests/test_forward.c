/* The forward pass on tiny random models (mkmodel): a shared prefix, batching
 * and token-by-token decoding give the logits of plain full sequences;
 * steering and head capture do exactly what forward.h says; greedy
 * generation is the argmax, steered and adapted on every token. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "forward.h"
#include "lora.h"
#include "mkmodel.h"
#include "model.h"
#include "status.h"
#include "testutil.h"

static pa_model *model;
static pa_lm *lm;
static const pa_model_config *cfg;

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  char path[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 3, o.dim = 96, o.n_heads = 6, o.n_kv_heads = 2, o.ffn_dim = 160, o.seed = 42;
  if (pa_mkmodel_write_gguf(&o, tu_path(path, sizeof path, "m.gguf")) || pa_model_open(path, &model) ||
      pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 512}, &lm)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  cfg = pa_lm_config(lm);
  return 0;
}

static int teardown(void **s) {
  pa_lm_destroy(lm);
  pa_model_close(model);
  return tu_teardown(s);
}

static int32_t *random_tokens(int n, uint64_t seed) {
  int32_t *t = malloc((size_t)n * sizeof *t);
  for (int i = 0; i < n; i++) {
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    t[i] = (int32_t)((seed >> 33) % (uint64_t)cfg->vocab_size);
  }
  return t;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
  double d = 0;
  for (size_t i = 0; i < n; i++)
    d = fmax(d, fabs((double)a[i] - b[i]));
  return d;
}

/* Logits and heads at the last token of one whole sequence, fresh cache,
 * with steering and an adapter where they are not NULL. */
static void run_full_with(const int32_t *tokens, int n, const float *steer, const pa_lora *lora, float *logits,
                          float *heads) {
  pa_kv *kv;
  assert_int_equal(pa_kv_create(lm, n, &kv), PA_OK);
  pa_seq seq = {.tokens = tokens, .n_tokens = n, .kv = kv};
  pa_batch b = {.seqs = &seq, .n_seqs = 1, .steer = steer, .lora = lora, .logits = logits, .heads = heads};
  if (pa_lm_forward(lm, &b))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(pa_kv_len(kv), n);
  pa_kv_destroy(kv);
}

static void run_full(const int32_t *tokens, int n, const float *steer, float *logits, float *heads) {
  run_full_with(tokens, n, steer, NULL, logits, heads);
}

static size_t heads_size(void) { return (size_t)cfg->n_layers * cfg->n_heads * cfg->head_dim; }

/* A prefix computed once and 9 continuations batched against it give the
 * logits and head outputs of the 9 full sequences run one by one. */
static void test_shared_prefix(void **s) {
  (void)s;
  const int P = 150, n_seqs = 9, V = cfg->vocab_size;
  int32_t *prefix = random_tokens(P, 1);
  pa_kv *pkv, *kv[9];
  assert_int_equal(pa_kv_create(lm, P, &pkv), PA_OK);
  pa_seq pseq = {.tokens = prefix, .n_tokens = P, .kv = pkv};
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &pseq, .n_seqs = 1}), PA_OK);

  pa_seq seqs[9];
  int32_t *cont[9];
  for (int i = 0; i < n_seqs; i++) {
    const int n = 1 + (i * 7) % 23;
    cont[i] = random_tokens(n, 100 + i);
    assert_int_equal(pa_kv_create(lm, n, &kv[i]), PA_OK);
    seqs[i] = (pa_seq){.tokens = cont[i], .n_tokens = n, .kv = kv[i]};
  }
  float *logits = malloc((size_t)n_seqs * V * sizeof *logits), *heads = malloc(n_seqs * heads_size() * sizeof *heads);
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.prefix = pkv, .seqs = seqs, .n_seqs = n_seqs, .logits = logits,
                                                 .heads = heads}),
                   PA_OK);
  assert_int_equal(pa_kv_len(pkv), P); /* the prefix is read, never written */

  float *want = malloc((size_t)V * sizeof *want), *want_heads = malloc(heads_size() * sizeof *want_heads);
  for (int i = 0; i < n_seqs; i++) {
    const int n = seqs[i].n_tokens;
    int32_t *full = malloc((size_t)(P + n) * sizeof *full);
    memcpy(full, prefix, (size_t)P * sizeof *full);
    memcpy(full + P, cont[i], (size_t)n * sizeof *full);
    run_full(full, P + n, NULL, want, want_heads);
    const double dl = max_abs_diff(logits + (size_t)i * V, want, (size_t)V);
    const double dh = max_abs_diff(heads + i * heads_size(), want_heads, heads_size());
    if (dl > 1e-5 || dh > 1e-5) /* logits here are about 0.2 in size */
      fail_msg("continuation %d: logits differ by %g, heads by %g", i, dl, dh);
    assert_int_equal(pa_argmax(logits + (size_t)i * V, V), pa_argmax(want, V));
    free(full);
    free(cont[i]);
    pa_kv_destroy(kv[i]);
  }
  free(want), free(want_heads), free(logits), free(heads), free(prefix);
  pa_kv_destroy(pkv);
}

/* The same batch (a shared prefix, then 9 continuations) gives the same
 * logits and head outputs, bit for bit, on 1, 2 and 3 threads: the backend
 * splits its work into pieces whose shape does not depend on the thread
 * count (kernels/cpu/cpu_ops.c). */
static void test_threads_do_not_change_results(void **s) {
  (void)s;
  const int P = 150, n_seqs = 9, V = cfg->vocab_size;
  int32_t *prefix = random_tokens(P, 3), *cont[9];
  for (int i = 0; i < n_seqs; i++)
    cont[i] = random_tokens(1 + (i * 5) % 17, 200 + i);
  const size_t nl = (size_t)n_seqs * V, nh = n_seqs * heads_size();
  float *logits[3], *heads[3];
  for (int t = 0; t < 3; t++) {
    pa_backend_set_threads(t + 1);
    logits[t] = malloc(nl * sizeof *logits[t]);
    heads[t] = malloc(nh * sizeof *heads[t]);
    pa_kv *pkv, *kv[9];
    assert_int_equal(pa_kv_create(lm, P, &pkv), PA_OK);
    pa_seq pseq = {.tokens = prefix, .n_tokens = P, .kv = pkv}, seqs[9];
    assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &pseq, .n_seqs = 1}), PA_OK);
    for (int i = 0; i < n_seqs; i++) {
      assert_int_equal(pa_kv_create(lm, 17, &kv[i]), PA_OK);
      seqs[i] = (pa_seq){.tokens = cont[i], .n_tokens = 1 + (i * 5) % 17, .kv = kv[i]};
    }
    assert_int_equal(pa_lm_forward(lm, &(pa_batch){.prefix = pkv, .seqs = seqs, .n_seqs = n_seqs,
                                                   .logits = logits[t], .heads = heads[t]}),
                     PA_OK);
    for (int i = 0; i < n_seqs; i++)
      pa_kv_destroy(kv[i]);
    pa_kv_destroy(pkv);
  }
  pa_backend_set_threads(2);
  for (int t = 1; t < 3; t++) {
    if (memcmp(logits[0], logits[t], nl * sizeof *logits[0]) || memcmp(heads[0], heads[t], nh * sizeof *heads[0]))
      fail_msg("%d threads: logits differ from 1 thread's by up to %g, heads by %g", t + 1,
               max_abs_diff(logits[0], logits[t], nl), max_abs_diff(heads[0], heads[t], nh));
  }
  for (int t = 0; t < 3; t++)
    free(logits[t]), free(heads[t]);
  for (int i = 0; i < n_seqs; i++)
    free(cont[i]);
  free(prefix);
}

/* Feeding a sequence in pieces (a chunk, then one token at a time, as
 * generation does) gives the logits of running each prefix of it whole. */
static void test_incremental(void **s) {
  (void)s;
  const int n = 24, V = cfg->vocab_size;
  int32_t *t = random_tokens(n, 7);
  pa_kv *kv;
  assert_int_equal(pa_kv_create(lm, n, &kv), PA_OK);
  float *logits = malloc((size_t)V * sizeof *logits), *want = malloc((size_t)V * sizeof *want);
  int done = 0;
  for (int step = 10; done < n; step = 1) {
    pa_seq seq = {.tokens = t + done, .n_tokens = step, .kv = kv};
    assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &seq, .n_seqs = 1, .logits = logits}), PA_OK);
    done += step;
    run_full(t, done, NULL, want, NULL);
    const double d = max_abs_diff(logits, want, (size_t)V);
    if (d > 1e-5)
      fail_msg("after %d tokens: logits differ by %g", done, d);
  }
  /* the cache is full now */
  pa_seq more = {.tokens = t, .n_tokens = 1, .kv = kv};
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &more, .n_seqs = 1}), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "do not fit its cache"));
  free(logits), free(want), free(t);
  pa_kv_destroy(kv);
}

/* An all-zero displacement is the plain model, bit for bit; a displacement
 * on one head leaves earlier layers alone and moves that head's output by
 * exactly the displacement. */
static void test_steering(void **s) {
  (void)s;
  const int n = 30, V = cfg->vocab_size, H = cfg->n_heads, hd = cfg->head_dim;
  int32_t *t = random_tokens(n, 3);
  float *l0 = malloc((size_t)V * sizeof(float)), *l1 = malloc((size_t)V * sizeof(float));
  float *h0 = malloc(heads_size() * sizeof(float)), *h1 = malloc(heads_size() * sizeof(float));
  float *steer = calloc(heads_size(), sizeof(float));
  run_full(t, n, NULL, l0, h0);
  run_full(t, n, steer, l1, h1);
  assert_memory_equal(l0, l1, (size_t)V * sizeof(float));
  assert_memory_equal(h0, h1, heads_size() * sizeof(float));

  const int sl = 1, sh = 4;
  float *d = steer + ((size_t)sl * H + sh) * hd;
  for (int i = 0; i < hd; i++)
    d[i] = 0.5f * (float)((i % 5) - 2);
  run_full(t, n, steer, l1, h1);
  const size_t layer = (size_t)H * hd;
  assert_memory_equal(h0, h1, sl * layer * sizeof(float)); /* layer 0 untouched */
  for (int h = 0; h < H; h++)
    for (int i = 0; i < hd; i++) {
      const size_t k = sl * layer + (size_t)h * hd + i;
      const float expect = h == sh ? h0[k] + d[i] : h0[k]; /* other heads of the layer are unchanged too */
      if (h1[k] != expect)
        fail_msg("layer %d head %d dim %d: %g, expected %g", sl, h, i, h1[k], expect);
    }
  assert_true(max_abs_diff(l0, l1, (size_t)V) > 1e-3); /* and it does change the answer */
  free(l0), free(l1), free(h0), free(h1), free(steer), free(t);
}

static void test_generate_and_errors(void **s) {
  (void)s;
  int32_t *t = random_tokens(8, 11);
  pa_kv *kv;
  assert_int_equal(pa_kv_create(lm, 20, &kv), PA_OK);
  int32_t *out;
  int n_out;
  const pa_gen_opts go = {.max_tokens = 6};
  assert_int_equal(pa_lm_generate(lm, NULL, kv, t, 8, &go, &out, &n_out), PA_OK);
  assert_int_equal(n_out, 6);
  assert_int_equal(pa_kv_len(kv), 8 + 5); /* the last token is produced, never fed back */
  /* greedy: each generated token is the argmax after the tokens before it */
  int32_t all[14];
  memcpy(all, t, 8 * sizeof *all);
  memcpy(all + 8, out, 6 * sizeof *all);
  float *logits = malloc((size_t)cfg->vocab_size * sizeof *logits);
  for (int i = 0; i < 6; i++) {
    run_full(all, 8 + i, NULL, logits, NULL);
    assert_int_equal(out[i], pa_argmax(logits, cfg->vocab_size));
  }
  /* a stop token ends generation and is kept */
  const pa_gen_opts stop = {.max_tokens = 6, .stop = &out[2], .n_stop = 1};
  int32_t *out2;
  assert_int_equal(pa_lm_generate(lm, NULL, kv, t, 8, &stop, &out2, &n_out), PA_OK);
  assert_true(n_out <= 3 && out2[n_out - 1] == out[2]);
  free(out2);

  int32_t bad = cfg->vocab_size;
  pa_seq seq = {.tokens = &bad, .n_tokens = 1, .kv = kv};
  pa_kv_clear(kv);
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &seq, .n_seqs = 1}), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "outside the vocabulary"));
  pa_kv *big;
  assert_int_equal(pa_kv_create(lm, 100000, &big), PA_EINVAL);
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &seq, .n_seqs = 0}), PA_EINVAL);
  int32_t fine = 1;
  pa_seq twice[2] = {{.tokens = &fine, .n_tokens = 1, .kv = kv}, {.tokens = &fine, .n_tokens = 1, .kv = kv}};
  assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = twice, .n_seqs = 2}), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "sequences 0 and 1 of the batch share one cache"));

  double p[3];
  const float lg[4] = {1.0f, 2.0f, 3.0f, 1000.0f};
  const int32_t ids[3] = {0, 1, 2};
  pa_softmax_subset(lg, ids, 3, p);
  assert_float_equal(p[0] + p[1] + p[2], 1.0, 1e-12);
  assert_float_equal(p[2] / p[1], exp(1.0), 1e-9);
  free(logits), free(out), free(t);
  pa_kv_destroy(kv);
}

/* Steering and an adapter act on every token generated (the prompt's pass
 * and each new token's): each token is the argmax of the whole sequence so
 * far run with them; and they do change what is generated. A random model
 * mostly repeats a token (tied embeddings: the current token's own row
 * wins), so the plain and the steered-only outputs are one token eight
 * times; the adapter's outputs vary, and the case with both is the one that
 * sees steering dropped from the new tokens' passes. */
static void test_generate_steered_and_adapted(void **s) {
  (void)s;
  enum { N_PROMPT = 8, N_GEN = 8 };
  int32_t *t = random_tokens(N_PROMPT, 12);
  float *steer = calloc(heads_size(), sizeof *steer);
  uint64_t rng = 9;
  for (int k = 0; k < 4; k++) { /* PAS steers a few heads */
    float *d = steer + ((size_t)(k % cfg->n_layers) * cfg->n_heads + (size_t)(k * 5 % cfg->n_heads)) * cfg->head_dim;
    for (int i = 0; i < cfg->head_dim; i++)
      d[i] = 1.0f * tu_frand(&rng);
  }
  pa_lora *lora = NULL;
  assert_int_equal(pa_lora_create(cfg, 4, 2.0f, &lora), PA_OK);
  pa_lora_init(lora, 5);
  for (int l = 0; l < cfg->n_layers; l++) /* B is zero after PEFT's initialisation: the adapter would do nothing */
    for (int k = 0; k < PA_LORA_N_TARGETS; k++)
      for (int i = 0; i < lora->out[k] * lora->rank; i++)
        pa_lora_b(lora, l, (pa_lora_target)k)[i] = 0.3f * (float)((i * 7 + l + k) % 11 - 5);
  float *logits = malloc((size_t)cfg->vocab_size * sizeof *logits);
  pa_kv *kv;
  assert_int_equal(pa_kv_create(lm, N_PROMPT + N_GEN, &kv), PA_OK);
  int32_t *plain, *out;
  int n_plain, n_out;
  assert_int_equal(pa_lm_generate(lm, NULL, kv, t, N_PROMPT, &(pa_gen_opts){.max_tokens = N_GEN}, &plain, &n_plain),
                   PA_OK);
  const struct {
    const float *steer;
    const pa_lora *lora;
  } cases[] = {{steer, NULL}, {NULL, lora}, {steer, lora}};
  for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
    const pa_gen_opts go = {.max_tokens = N_GEN, .steer = cases[c].steer, .lora = cases[c].lora};
    assert_int_equal(pa_lm_generate(lm, NULL, kv, t, N_PROMPT, &go, &out, &n_out), PA_OK);
    assert_int_equal(n_out, N_GEN);
    int32_t all[N_PROMPT + N_GEN];
    memcpy(all, t, N_PROMPT * sizeof *all);
    memcpy(all + N_PROMPT, out, N_GEN * sizeof *all);
    for (int i = 0; i < N_GEN; i++) {
      run_full_with(all, N_PROMPT + i, cases[c].steer, cases[c].lora, logits, NULL);
      if (out[i] != pa_argmax(logits, cfg->vocab_size))
        fail_msg("case %zu, token %d: %d generated, %d the whole sequence's argmax", c, i, out[i],
                 pa_argmax(logits, cfg->vocab_size));
    }
    if (!memcmp(out, plain, N_GEN * sizeof *out))
      fail_msg("case %zu generates what the plain model does", c);
    free(out);
  }
  pa_kv_destroy(kv);
  pa_lora_destroy(lora);
  free(plain), free(logits), free(steer), free(t);
}

/* A pass restricted to some tokens' logits gives the values the whole
 * vocabulary's pass gives them (fp32 and bf16 weights), in the order asked,
 * a token twice included; a new set replaces the last; bad sets are refused.
 * Not the same bits: OpenBLAS's SGEMM sums a product of 5 columns in another
 * order than one of 10^4, so the tolerance is that of two fp32 sum orders,
 * 4 sqrt(K) eps of the row's largest logit (K = dim = 96: 4.7e-6). */
static void test_restricted_logits(void **s) {
  (void)s;
  const int V = cfg->vocab_size, B = 3;
  const int32_t set_a[5] = {7, 3, V - 1, 3, 0}, set_b[2] = {12, 11};
  float *steer = calloc(heads_size(), sizeof *steer);
  for (size_t i = 0; i < heads_size(); i += 5)
    steer[i] = 0.5f;
  for (int wf = PA_WEIGHTS_FP32; wf <= PA_WEIGHTS_BF16; wf++) {
    pa_lm *w;
    assert_int_equal(pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 64, .weights = wf}, &w), PA_OK);
    float *full = malloc((size_t)B * V * sizeof *full), got[B * 5];
    int32_t *t = random_tokens(B * 4, 3 + wf);
    for (int pass = 0; pass < 3; pass++) { /* the whole vocabulary, then set a, then set b */
      const int32_t *ids = pass == 1 ? set_a : pass == 2 ? set_b : NULL;
      const int n = pass == 1 ? 5 : pass == 2 ? 2 : 0;
      pa_kv *kv[B];
      pa_seq seqs[B];
      for (int i = 0; i < B; i++) {
        assert_int_equal(pa_kv_create(w, 8, &kv[i]), PA_OK);
        seqs[i] = (pa_seq){.tokens = t + 4 * i, .n_tokens = 2 + i, .kv = kv[i]};
      }
      pa_batch b = {.seqs = seqs, .n_seqs = B, .steer = steer, .logits = ids ? got : full, .logit_ids = ids,
                    .n_logit_ids = n};
      if (pa_lm_forward(w, &b))
        fail_msg("%s", pa_errmsg());
      for (int i = 0; i < B && ids; i++) {
        double mx = 0;
        for (int j = 0; j < V; j++)
          mx = fmax(mx, fabs(full[(size_t)i * V + j]));
        const double tol = 4 * sqrt((double)cfg->dim) * 1.1920929e-7 * mx;
        for (int k = 0; k < n; k++)
          if (!(fabs((double)got[i * n + k] - full[(size_t)i * V + ids[k]]) <= tol))
            fail_msg("%s: sequence %d, token %d: %.9g restricted, %.9g in the whole pass", pa_lm_weights(w), i, ids[k],
                     got[i * n + k], full[(size_t)i * V + ids[k]]);
      }
      for (int i = 0; i < B; i++)
        pa_kv_destroy(kv[i]);
    }
    pa_kv *kv;
    assert_int_equal(pa_kv_create(w, 8, &kv), PA_OK);
    pa_seq one = {.tokens = t, .n_tokens = 2, .kv = kv};
    const int32_t outside[2] = {1, V};
    assert_int_equal(pa_lm_forward(w, &(pa_batch){.seqs = &one, .n_seqs = 1, .logits = got, .logit_ids = outside,
                                                  .n_logit_ids = 2}),
                     PA_EINVAL);
    assert_non_null(strstr(pa_errmsg(), "outside the vocabulary"));
    assert_int_equal(pa_kv_len(kv), 0); /* refused before it ran */
    assert_int_equal(
        pa_lm_forward(w, &(pa_batch){.seqs = &one, .n_seqs = 1, .logits = got, .logit_ids = set_a, .n_logit_ids = 0}),
        PA_EINVAL);
    pa_kv_destroy(kv);
    free(full), free(t);
    pa_lm_destroy(w);
  }
  free(steer);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_shared_prefix),
      cmocka_unit_test(test_incremental),
      cmocka_unit_test(test_steering),
      cmocka_unit_test(test_generate_and_errors),
      cmocka_unit_test(test_generate_steered_and_adapted),
      cmocka_unit_test(test_threads_do_not_change_results),
      cmocka_unit_test(test_restricted_logits),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
