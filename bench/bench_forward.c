/* bench_forward: speed of the CPU forward pass on a real model.
 *
 *   bench_forward MODEL PAPI_DIR [--quick] [--threads N] [--naive K|all] [--backend cpu|cuda|auto]
 *                 [--weights auto|fp32|bf16]
 *
 * Prints `key value` lines:
 *  - sgemm_gflops: a plain OpenBLAS sgemm of the model's FFN shape (512 x
 *    ffn x dim) with OpenBLAS's own threading on the same thread count, the
 *    baseline measured in the same run (palign itself runs OpenBLAS
 *    single-threaded in pieces of a fixed shape: kernels/cpu/cpu_ops.c);
 *  - prefill: a 512-token prompt in one sequence: tokens/s, GFLOP/s and the
 *    fraction of the sgemm baseline; on a device also prefill_long, a
 *    1,536-token prompt (about an ICL prompt's length) three times after
 *    a warm-up: its tokens/s and GFLOP/s over the three (a GPU's products
 *    need the rows to fill its SMs);
 *  - decode: 64 tokens one at a time after a 128-token prompt: tokens/s;
 *  - prefix sharing: a ~1,600-token prefix (the inventory's item texts) and
 *    180 item-question continuations, batched against the shared prefix,
 *    against running K of the 181 full sequences one by one (default 12,
 *    `all` for every one), extrapolated linearly to 180 (each full sequence
 *    is independent work); the logits of the compared ones must agree to
 *    1e-4 or the bench exits 1;
 *  - --quick stops after prefill, decode and the cost of steering.
 * With --backend cuda the model runs on the GPU (a warm-up prefill first; the
 * sgemm baseline stays the CPU's: bench_cuda measures the GPU's). Every
 * timed pass asks for its logits, whose download waits for the device.
 * --weights as palign's (auto: bf16 on the GPU, fp32 on the CPU). */
#include "backend.h"
#include "chat.h"
#include "forward.h"
#include "inventory.h"
#include "model.h"
#include "prompts.h"
#include "status.h"
#include "tokenizer.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

_Noreturn static void die(const char *what) {
  fprintf(stderr, "bench_forward: %s: %s\n", what, pa_errmsg());
  exit(1);
}

/* FLOPs of the matrix products for `rows` tokens that attend to `keys` keys on average. */
static double forward_flops(const pa_model_config *c, double rows, double keys) {
  const double qd = (double)c->n_heads * c->head_dim, kd = (double)c->n_kv_heads * c->head_dim;
  const double per_token =
      2 * (c->dim * qd + 2 * c->dim * kd + qd * c->dim + 3.0 * c->dim * c->ffn_dim) + 4 * keys * qd;
  return rows * per_token * c->n_layers;
}

static double sgemm_gflops(const pa_model_config *c, int threads) {
  const int M = 512, N = c->ffn_dim, K = c->dim;
  openblas_set_num_threads(threads);
  float *a = calloc((size_t)M * K, 4), *b = calloc((size_t)N * K, 4), *y = calloc((size_t)M * N, 4);
  for (size_t i = 0; i < (size_t)M * K; i++)
    a[i] = (float)(i % 7) * 0.1f;
  for (size_t i = 0; i < (size_t)N * K; i++)
    b[i] = (float)(i % 5) * 0.1f;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1, a, K, b, K, 0, y, N); /* warm up */
  int reps = 0;
  double t0 = now();
  while (now() - t0 < 1.0 || reps < 5) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1, a, K, b, K, 0, y, N);
    reps++;
  }
  const double s = (now() - t0) / reps;
  free(a), free(b), free(y);
  openblas_set_num_threads(1); /* as palign's backend has it */
  return 2.0 * M * N * K / s / 1e9;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: bench_forward MODEL PAPI_DIR [--threads N] [--naive K|all]\n");
    return 2;
  }
  int threads = 2, naive = 12, quick = 0;
  const char *backend_name = "cpu";
  int weights = PA_WEIGHTS_AUTO;
  for (int i = 3; i < argc; i++) {
    if (!strcmp(argv[i], "--quick")) {
      quick = 1;
    } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
      threads = atoi(argv[++i]);
    } else if (!strcmp(argv[i], "--backend") && i + 1 < argc) {
      backend_name = argv[++i];
    } else if (!strcmp(argv[i], "--weights") && i + 1 < argc) {
      if ((weights = pa_weight_format_parse(argv[++i])) < 0) {
        fprintf(stderr, "bench_forward: --weights is auto, fp32 or bf16, not '%s'\n", argv[i]);
        return 2;
      }
    } else if (!strcmp(argv[i], "--naive") && i + 1 < argc) {
      i++;
      naive = strcmp(argv[i], "all") ? atoi(argv[i]) : 180;
    } else {
      fprintf(stderr, "bench_forward: unexpected argument '%s'\n", argv[i]);
      return 2;
    }
  }
  pa_model *m;
  pa_lm *lm;
  if (pa_model_open(argv[1], &m))
    die("model");
  char be_err[256];
  const pa_backend *be = pa_backend_named(backend_name, 0, be_err, sizeof be_err);
  if (!be) {
    fprintf(stderr, "bench_forward: %s\n", be_err);
    return 1;
  }
  if (pa_lm_create(
          m, &(pa_lm_opts){.n_threads = threads, .max_seq = 2048, .backend = be, .weights = (pa_weight_format)weights},
          &lm))
    die("runtime");
  printf("backend %s\n", be->name);
  printf("weights %s\n", pa_lm_weights(lm));
  const pa_model_config *c = pa_model_config_get(m);
  const pa_tokenizer *tok = pa_model_tokenizer(m);
  const int V = c->vocab_size;
  printf("threads %d\n", threads);
  const double base = sgemm_gflops(c, threads);
  printf("sgemm_gflops %.1f\n", base);

  pa_inventory *inv;
  if (pa_inventory_load(argv[2], &inv))
    die("inventory");
  const int n_items = pa_inventory_n_items(inv);
  /* the prefix: item texts until ~1,600 tokens */
  char *text = calloc(1 << 16, 1);
  int32_t *prefix = NULL;
  size_t P = 0;
  strcpy(text, "Here are some of your behaviors and your level of recognition towards them;");
  for (int i = 0; i < n_items && P < 1600; i++) {
    strcat(text, pa_inventory_item(inv, i + 1)->text);
    strcat(text, ":Moderately Accurate;");
    free(prefix);
    if (pa_tokenizer_encode(tok, text, strlen(text), 0, &prefix, &P))
      die("tokenize");
  }

  /* prefill and decode */
  {
    pa_kv *kv;
    if (pa_kv_create(lm, 1024, &kv))
      die("cache");
    pa_seq s = {.tokens = prefix, .n_tokens = 512, .kv = kv};
    float *last = malloc((size_t)V * sizeof *last);
    if (!be->host_memory) { /* the device's first pass loads its kernels */
      if (pa_lm_forward(lm, &(pa_batch){.seqs = &s, .n_seqs = 1, .logits = last}))
        die("warm-up");
      pa_kv_clear(kv);
    }
    double t0 = now();
    if (pa_lm_forward(lm, &(pa_batch){.seqs = &s, .n_seqs = 1, .logits = last}))
      die("prefill");
    free(last);
    const double t = now() - t0, fl = forward_flops(c, 512, 256.5);
    printf("prefill_tokens_per_s %.1f\nprefill_gflops %.1f\nprefill_fraction_of_sgemm %.2f\n", 512 / t, fl / t / 1e9,
           fl / t / 1e9 / base);
    if (!be->host_memory && P >= 1536) {
      pa_kv *long_kv;
      float *lg = malloc((size_t)V * sizeof *lg);
      if (!lg || pa_kv_create(lm, 1536, &long_kv))
        die("long prefill's cache");
      pa_seq ls = {.tokens = prefix, .n_tokens = 1536, .kv = long_kv};
      double secs = 0;
      for (int r = -1; r < 3; r++) { /* the first grows the activations' buffers: not timed */
        pa_kv_clear(long_kv);
        t0 = now();
        if (pa_lm_forward(lm, &(pa_batch){.seqs = &ls, .n_seqs = 1, .logits = lg}))
          die("long prefill");
        secs += r >= 0 ? now() - t0 : 0.0;
      }
      printf("prefill_long_tokens 1536\nprefill_long_tokens_per_s %.1f\nprefill_long_gflops %.1f\n", 3 * 1536 / secs,
             3 * forward_flops(c, 1536, 768.5) / secs / 1e9);
      pa_kv_destroy(long_kv);
      free(lg);
    }
    /* steering 24 heads (PAS's K) against the same prefill without it */
    float *steer = calloc((size_t)c->n_layers * c->n_heads * c->head_dim, sizeof *steer);
    for (int k = 0; k < 24; k++)
      for (int i = 0; i < c->head_dim; i++)
        steer[((size_t)(k * 7 % c->n_layers) * c->n_heads + k % c->n_heads) * c->head_dim + i] = 0.01f;
    double t_off = 0, t_on = 0;
    float *lg = malloc((size_t)V * sizeof *lg);
    for (int r = 0; r < 3; r++) {
      for (int on = 0; on < 2; on++) {
        pa_kv_clear(kv);
        s.n_tokens = 256;
        t0 = now();
        if (pa_lm_forward(lm, &(pa_batch){.seqs = &s, .n_seqs = 1, .steer = on ? steer : NULL, .logits = lg}))
          die("steered prefill");
        *(on ? &t_on : &t_off) += now() - t0;
      }
    }
    printf("steering_24_heads_time_ratio %.3f\n", t_on / t_off);
    free(steer), free(lg);
    pa_kv_clear(kv);
    s.n_tokens = 128;
    if (pa_lm_forward(lm, &(pa_batch){.seqs = &s, .n_seqs = 1}))
      die("decode prompt");
    float *logits = malloc((size_t)V * sizeof *logits);
    t0 = now();
    for (int i = 0; i < 64; i++) {
      s.tokens = prefix + 128 + i;
      s.n_tokens = 1;
      if (pa_lm_forward(lm, &(pa_batch){.seqs = &s, .n_seqs = 1, .logits = logits}))
        die("decode");
    }
    printf("decode_tokens_per_s %.1f\n", 64 / (now() - t0));
    free(logits);
    pa_kv_destroy(kv);
  }

  if (quick) {
    pa_inventory_destroy(inv);
    free(prefix), free(text);
    pa_lm_destroy(lm);
    pa_model_close(m);
    return 0;
  }

  /* prefix sharing: 180 item questions (the test items' worth) as continuations */
  const int n_seqs = 180;
  pa_chat_template *tmpl = NULL;
  pa_seq *seqs = calloc(n_seqs, sizeof *seqs);
  int32_t **cont = calloc(n_seqs, sizeof *cont);
  size_t cont_tokens = 0, max_n = 0;
  for (int i = 0; i < n_seqs; i++) {
    /* a user turn in the default model's ChatML after the prefix, asking PAS.md's item question */
    char *question = pa_prompt_question(pa_inventory_item(inv, (i * 7) % n_items + 1), true);
    char q[2048];
    snprintf(q, sizeof q, "<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\nOption (", question);
    free(question);
    size_t n;
    if (pa_tokenizer_encode(tok, q, strlen(q), PA_TOK_PARSE_SPECIAL, &cont[i], &n))
      die("tokenize");
    pa_kv *kv;
    if (pa_kv_create(lm, (int)n, &kv))
      die("cache");
    seqs[i] = (pa_seq){.tokens = cont[i], .n_tokens = (int)n, .kv = kv};
    cont_tokens += n;
    max_n = n > max_n ? n : max_n;
  }
  pa_kv *pkv;
  if (pa_kv_create(lm, (int)P, &pkv))
    die("cache");
  float *logits = malloc((size_t)n_seqs * V * sizeof *logits);
  double t0 = now();
  pa_seq ps = {.tokens = prefix, .n_tokens = (int)P, .kv = pkv};
  if (pa_lm_forward(lm, &(pa_batch){.seqs = &ps, .n_seqs = 1, .logits = logits})) /* its logits: the device's end */
    die("prefix");
  const double t_prefix = now() - t0;
  if (pa_lm_forward(lm, &(pa_batch){.prefix = pkv, .seqs = seqs, .n_seqs = n_seqs, .logits = logits}))
    die("continuations");
  const double t_shared = now() - t0;
  printf("prefix_tokens %zu\ncontinuations %d\ncontinuation_tokens %zu\n", P, n_seqs, cont_tokens);
  printf("shared_prefix_s %.2f\nshared_continuations_s %.2f\nshared_total_s %.2f\n", t_prefix, t_shared - t_prefix,
         t_shared);

  /* the naive way: every full sequence on its own (K of them, spread over the 180) */
  if (naive > n_seqs)
    naive = n_seqs;
  pa_kv *fkv;
  if (pa_kv_create(lm, (int)(P + max_n), &fkv))
    die("cache");
  int32_t *full = malloc((P + max_n) * sizeof *full);
  memcpy(full, prefix, P * sizeof *full);
  float *want = malloc((size_t)V * sizeof *want);
  double worst = 0, t_naive = 0;
  size_t naive_tokens = 0;
  for (int k = 0; k < naive; k++) {
    const int i = k * n_seqs / naive;
    memcpy(full + P, cont[i], (size_t)seqs[i].n_tokens * sizeof *full);
    pa_kv_clear(fkv);
    pa_seq fs = {.tokens = full, .n_tokens = (int)P + seqs[i].n_tokens, .kv = fkv};
    t0 = now();
    if (pa_lm_forward(lm, &(pa_batch){.seqs = &fs, .n_seqs = 1, .logits = want}))
      die("full sequence");
    t_naive += now() - t0;
    naive_tokens += (size_t)fs.n_tokens;
    for (int v = 0; v < V; v++)
      worst = fmax(worst, fabs((double)want[v] - logits[(size_t)i * V + v]));
    if (pa_argmax(want, V) != pa_argmax(logits + (size_t)i * V, V))
      worst = INFINITY;
  }
  /* the prefix alone, the 181st sequence, once more */
  t0 = now();
  pa_kv_clear(fkv);
  pa_seq fs = {.tokens = prefix, .n_tokens = (int)P, .kv = fkv};
  if (pa_lm_forward(lm, &(pa_batch){.seqs = &fs, .n_seqs = 1, .logits = want}))
    die("prefix");
  const double t_alone = now() - t0;
  const double naive_est = t_naive * n_seqs / naive + t_alone;
  const double naive_tok = (double)naive_tokens * n_seqs / naive + (double)P;
  printf("naive_sequences_run %d\nnaive_total_s %.2f%s\n", naive, naive_est, naive < n_seqs ? " (extrapolated)" : "");
  printf("tokens_shared %zu\ntokens_naive %.0f\nwork_ratio %.1f\ntime_ratio %.1f\n", P + cont_tokens, naive_tok,
         naive_tok / (double)(P + cont_tokens), naive_est / t_shared);
  printf("max_abs_logit_diff %.3g\n", worst);
  const int ok = worst <= 1e-4;
  if (!ok)
    fprintf(stderr, "bench_forward: shared-prefix logits differ from full sequences by %g (> 1e-4)\n", worst);
  for (int i = 0; i < n_seqs; i++) {
    free(cont[i]);
    pa_kv_destroy(seqs[i].kv);
  }
  pa_inventory_destroy(inv);
  free(cont), free(seqs), free(full), free(want), free(logits), free(prefix), free(text);
  pa_kv_destroy(pkv);
  pa_kv_destroy(fkv);
  pa_chat_template_destroy(tmpl);
  pa_lm_destroy(lm);
  pa_model_close(m);
  return ok ? 0 : 1;
}
