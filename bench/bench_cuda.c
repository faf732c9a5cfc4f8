/* bench_cuda: what one GPU gives, for docs/CUDA.md.
 *
 *   bench_cuda [--json FILE]
 *
 *  1. the card's bf16 peak as cuBLAS reaches it: an 8192^3 GEMM, bf16 inputs,
 *     fp32 accumulation (the baseline every other figure is a ratio of);
 *  2. the CUDA backend's products on those of a Llama-3-8B layer for a
 *     1,024-token prefill (q/o 4096x4096, k/v 1024x4096, gate/up
 *     14336x4096, down 4096x14336), as TFLOP/s and as a share of (1): matmul
 *     (fp32 SGEMM, no TF32) and matmul_bf16 (bf16 weights, x rounded by the
 *     backend, cublasGemmEx with fp32 accumulation: what the forward pass
 *     runs with --weights bf16, the default on a GPU);
 *  3. the backend's attention (32 heads, 8 kv heads, head_dim 128, causal)
 *     by each of its kernels (pa_cuda_attention_kernel: the simple one, the
 *     baseline, the tiled one, the tensor cores' one on tf32 parts, the
 *     default, and the tensor cores' one on bf16 operands) on
 *     that prefill, on a pass of PAS's grid (180 items of 70 tokens after
 *     a 2,400-token prefix) and on two decoding steps (one new token of one
 *     sequence after 2,400 cached, as `palign generate` after a long
 *     prompt; one new token of each of those 180 items, as the generate
 *     answer mode): time, TFLOP/s, the keys and values read per second (what
 *     bounds decoding), and the ratio to the simple one's time; the
 *     default's time on the prefill as a share of the layer's products, the
 *     bf16 operands' time as a share of the tf32 parts' on each shape, and
 *     for the tensor cores' kernels on the decoding step of one sequence,
 *     the time with its keys in one block a kv head against the backend's
 *     split (pa_cuda_attention_splits), and on the 180 items' decoding step
 *     and PAS's pass, the prefix packed against walked by each item's tiles
 *     (pa_cuda_attention_packing), and the step packed with each walk in
 *     up to 1, 2, 3, 4, 6 and 8 shares;
 *  4. the memory's rate as a device-to-device copy of 1 GiB reaches it
 *     (bytes read and written), and the backend's row operations on the
 *     rows of that pass of PAS's grid (12,600 of the layer's: rmsnorm,
 *     RoPE on q, SwiGLU, the residual add, and the bf16 rounding of the
 *     down projection's x), timed by the device-time profile: their bytes'
 *     rate (the least they must move, cuda_backend.h) as a share of the
 *     copy's, which says how near to the memory's rate each runs;
 *  5. a DPO step's training attention on that layer (a 26-token prefix and
 *     16 prompts of 70 tokens), forward and backward, against the layer's
 *     bf16 products on the same 1,146 rows forward (matmul_bf16) and
 *     backward (matmul_nn_bf16): its share of a layer's training step;
 *  6. the optimiser's step on Llama-3-8B's rank-8 adapter (q, k, v and o of
 *     32 layers: 6.8M values): the backend's adamw on the device (what the
 *     trainer runs since it optimises there) against the host's path it
 *     replaced, in the same run: the gradient's download, the loop on one
 *     thread (as DPO ran it) and the adapter's upload; the loop on all the
 *     CPU backend's threads too; and the device's rate against the copy's
 *     (28 bytes a value).
 * Each timed with CUDA events over repeats after a warm-up. Exits 77 without
 * a device. */
#include "backend.h"
#include "cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHECK(x)                                                                                                       \
  do {                                                                                                                 \
    cudaError_t e_ = (x);                                                                                              \
    if (e_ != cudaSuccess) {                                                                                           \
      fprintf(stderr, "bench_cuda: %s: %s\n", #x, cudaGetErrorString(e_));                                             \
      exit(1);                                                                                                         \
    }                                                                                                                  \
  } while (0)

/* The bench's one timer: timer_start() records its first event on the
 * default stream (the backend's stream is a blocking one, so it orders
 * with it), timer_per_rep(reps) its second, waits, and gives the seconds
 * between over reps. Each measurement runs its warm-up calls, starts the
 * timer and runs reps more. */
static cudaEvent_t timer_begin, timer_end;

static void timer_start(void) {
  if (!timer_begin) {
    CHECK(cudaEventCreate(&timer_begin));
    CHECK(cudaEventCreate(&timer_end));
  }
  CHECK(cudaEventRecord(timer_begin, 0));
}

static double timer_per_rep(int reps) {
  float ms = 0;
  CHECK(cudaEventRecord(timer_end, 0));
  CHECK(cudaEventSynchronize(timer_end));
  CHECK(cudaEventElapsedTime(&ms, timer_begin, timer_end));
  return ms / 1e3 / reps;
}

/* Seconds a call of the attention a takes, over 5 after a warm-up (its
 * scratch, where it needs one, allocated here). */
static double time_attention(const pa_backend *be, const pa_attn_args *a) {
  const size_t need = be->attention_scratch(a);
  float *scratch = need ? be->alloc(need * sizeof(float)) : NULL;
  if (need && !scratch) {
    fprintf(stderr, "bench_cuda: attention scratch: %s\n", pa_cuda_error());
    exit(1);
  }
  for (int r = -1; r < 5; r++) {
    if (r == 0)
      timer_start();
    be->attention(a, scratch);
  }
  const double secs = timer_per_rep(5);
  be->release(scratch);
  return secs;
}

static void *dev_zero(size_t bytes) {
  void *p;
  CHECK(cudaMalloc(&p, bytes));
  CHECK(cudaMemset(p, 0, bytes));
  return p;
}

/* bf16 GEMM, n^3, reps times: TFLOP/s */
static double bf16_peak(cublasHandle_t h, int n, int reps) {
  void *a = dev_zero((size_t)n * n * 2), *b = dev_zero((size_t)n * n * 2), *c = dev_zero((size_t)n * n * 4);
  const float one = 1, zero = 0;
  for (int r = -2; r < reps; r++) {
    if (r == 0)
      timer_start();
    if (cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &zero, c,
                     CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
      fprintf(stderr, "bench_cuda: cublasGemmEx (bf16) failed\n");
      exit(1);
    }
  }
  const double s = timer_per_rep(reps);
  cudaFree(a), cudaFree(b), cudaFree(c);
  return 2.0 * n * n * (double)n / s / 1e12;
}

/* The seven products of a layer for T tokens through the backend: fp32
 * weights (matmul), bf16 weights (matmul_bf16), or bf16 weights the
 * backward way (matmul_nn_bf16: dx = dy . W, what a training step's
 * backward pass runs, the same FLOPs): seconds for all seven (printed per
 * product). */
enum products { FP32, BF16, BF16_BACKWARD };
static double layer_products(const pa_backend *be, enum products kind, int T, double peak) {
  static const char *const op[] = {"matmul", "matmul_bf16", "matmul_nn_bf16"};
  const int D = 4096, KV = 1024, F = 14336;
  const struct {
    const char *name;
    int n, k;
  } prod[] = {{"q", D, D}, {"k", KV, D}, {"v", KV, D}, {"o", D, D}, {"gate", F, D}, {"up", F, D}, {"down", D, F}};
  float *x = dev_zero((size_t)T * F * 4), *y = dev_zero((size_t)T * F * 4);
  void *w = dev_zero((size_t)F * D * (kind == FP32 ? 4 : 2));
  double flops = 0, secs = 0;
  for (size_t i = 0; i < sizeof prod / sizeof *prod; i++) {
    const int reps = 10;
    for (int r = -2; r < reps; r++) {
      if (r == 0)
        timer_start();
      if (kind == FP32)
        be->matmul(T, prod[i].n, prod[i].k, x, w, 0.0f, y);
      else if (kind == BF16)
        be->matmul_bf16(T, prod[i].n, prod[i].k, x, w, 0.0f, y);
      else /* x: the gradient of the product's output, y: its input's */
        be->matmul_nn_bf16(T, prod[i].k, prod[i].n, x, w, 0.0f, y);
    }
    const double s = timer_per_rep(reps), f = 2.0 * T * prod[i].n * (double)prod[i].k;
    printf("%-14s %-4s %5d x %5d x %5d: %.3f ms, %.1f TFLOP/s, %.0f%% of the bf16 peak\n", op[kind], prod[i].name, T,
           prod[i].n, prod[i].k, s * 1e3, f / s / 1e12, 100 * f / s / 1e12 / peak);
    flops += f, secs += s;
  }
  printf("a layer's products (%s): %.2f ms, %.1f TFLOP/s, %.0f%% of the bf16 peak\n", op[kind], secs * 1e3,
         flops / secs / 1e12, 100 * flops / secs / 1e12 / peak);
  cudaFree(x), cudaFree(y), cudaFree(w);
  return secs;
}

/* A DPO step's training attention on a Llama-3-8B layer (32 heads, 8 kv
 * heads, head_dim 128): the shared prefix of 26 tokens and 16 prompts of 70
 * tokens after it (docs/DPO.md: a step of 16 prompts, 26 of about 95 tokens
 * shared), forward (attention_train) and backward (attention_backward),
 * against the layer's bf16 products on the same rows forward and backward:
 * the attention's share of a layer's training step. Its milliseconds
 * forward and backward, and the products', into ms[4]. */
enum { kTrainPrefix = 26, kTrainSeqs = 16, kTrainLen = 70, kTrainRows = kTrainPrefix + kTrainSeqs * kTrainLen };
static void train_attention(const pa_backend *be, double peak, double ms[4]) {
  enum { H = 32, KH = 8, hd = 128, P = kTrainPrefix, N_SEQS = kTrainSeqs, LEN = kTrainLen };
  const int rows = kTrainRows;
  int row0[N_SEQS], len[N_SEQS];
  for (int i = 0; i < N_SEQS; i++)
    row0[i] = P + i * LEN, len[i] = LEN;
  const size_t nq = (size_t)rows * H * hd, nk = (size_t)rows * KH * hd;
  float *q = dev_zero(nq * 4), *z = dev_zero(nq * 4), *dz = dev_zero(nq * 4), *dq = dev_zero(nq * 4);
  float *k = dev_zero(nk * 4), *v = dev_zero(nk * 4), *dk = dev_zero(nk * 4), *dv = dev_zero(nk * 4);
  float *lse = dev_zero((size_t)rows * H * 4);
  const pa_attn_train_args a = {.n_heads = H,
                                .n_kv_heads = KH,
                                .head_dim = hd,
                                .prefix_len = P,
                                .n_seqs = N_SEQS,
                                .seq_row0 = row0,
                                .seq_len = len,
                                .q = q,
                                .k = k,
                                .v = v,
                                .z = z,
                                .lse = lse};
  float *scratch = dev_zero(be->attention_train_scratch(&a) * 4 + 4);
  for (int pass = 0; pass < 2; pass++) {
    for (int r = -1; r < 5; r++) {
      if (r == 0)
        timer_start();
      if (pass == 0)
        be->attention_train(&a, scratch);
      else
        be->attention_backward(&a, dz, dq, dk, dv, scratch);
    }
    ms[pass] = timer_per_rep(5) * 1e3;
  }
  ms[2] = layer_products(be, BF16, rows, peak) * 1e3;
  ms[3] = layer_products(be, BF16_BACKWARD, rows, peak) * 1e3;
  printf("training attention, a DPO step (%d rows: a %d-token prefix and %d prompts of %d): forward %.3f ms (%.2fx "
         "the layer's bf16 products), backward %.3f ms (%.2fx the backward products): %.0f%% of the step's "
         "products and attention\n",
         rows, P, N_SEQS, LEN, ms[0], ms[0] / ms[2], ms[1], ms[1] / ms[3],
         100 * (ms[0] + ms[1]) / (ms[0] + ms[1] + ms[2] + ms[3]));
  float *const dev[] = {q, z, dz, dq, k, v, dk, dv, lse, scratch};
  for (size_t i = 0; i < sizeof dev / sizeof *dev; i++)
    cudaFree(dev[i]);
}

/* The values of Llama-3-8B's rank-8 adapter: A [8][in] and B [out][8] for
 * q (4096 in and out), k and v (4096 in, 1024 out) and o, in 32 layers. */
static const size_t kAdapterValues = 32 * (size_t)(2 * (8 * 4096 + 4096 * 8) + 2 * (8 * 4096 + 1024 * 8));

static double wall_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Section 6: ms[0] the device's step; ms[1] the host's path as DPO ran it
 * before the step moved to the device (the gradient's download, the loop on
 * one thread, the adapter's upload), ms[2..4] those three; ms[5] the loop on
 * all of the CPU backend's threads. A gradient of values 1e-4 apart, w, m
 * and v from zero, as a first step's. */
static void optimiser_step(const pa_backend *be, double copy_gbs, double ms[6]) {
  const size_t n = kAdapterValues, bytes = n * sizeof(float);
  const pa_adamw_step st = {
      .beta1 = 0.9, .beta2 = 0.999, .c1 = 0.1, .c2 = 1e-3, .lr = 1e-3, .decay = 1, .eps = 1e-8}; /* step 1's */
  float *hw = calloc(n, sizeof *hw), *hg = malloc(bytes), *hm = calloc(n, sizeof *hm),
        *hv = calloc(n, sizeof *hv); /* pageable, as an adapter's arena */
  if (!hw || !hg || !hm || !hv) {
    fprintf(stderr, "bench_cuda: no host memory for the optimiser's step\n");
    exit(1);
  }
  for (size_t i = 0; i < n; i++)
    hg[i] = (float)((double)(i % 1001) - 500) * 1e-4f;
  float *w = dev_zero(bytes), *g = dev_zero(bytes), *m = dev_zero(bytes), *v = dev_zero(bytes);
  be->upload(g, hg, bytes);
  for (int r = -1; r < 10; r++) {
    if (r == 0)
      timer_start();
    be->adamw(n, &st, w, g, m, v);
  }
  ms[0] = timer_per_rep(10) * 1e3;
  const pa_backend *cpu = pa_backend_cpu();
  const int threads = pa_backend_threads();
  double part[3] = {0}, all = 0;
  enum { REPS = 5 };
  for (int r = -1; r < REPS; r++) {
    pa_backend_set_threads(1);
    const double t0 = wall_s();
    be->download(hg, g, bytes);
    const double t1 = wall_s();
    cpu->adamw(n, &st, hw, hg, hm, hv);
    const double t2 = wall_s();
    be->upload(w, hw, bytes);
    be->status(); /* the upload done */
    const double t3 = wall_s();
    pa_backend_set_threads(threads);
    cpu->adamw(n, &st, hw, hg, hm, hv);
    const double t4 = wall_s();
    if (r >= 0)
      part[0] += t1 - t0, part[1] += t2 - t1, part[2] += t3 - t2, all += t4 - t3;
  }
  for (int k = 0; k < 3; k++)
    ms[2 + k] = part[k] / REPS * 1e3;
  ms[1] = ms[2] + ms[3] + ms[4];
  ms[5] = all / REPS * 1e3;
  const double gbs = 28.0 * n / (ms[0] * 1e-3) / 1e9;
  printf("optimiser step, Llama-3-8B's rank-8 adapter (%zu values): on the device %.3f ms (%.0f GB/s, %.0f%% of the "
         "copy's); on the host as DPO ran it %.3f ms, %.1fx the device's (the gradient's download %.3f, adamw on 1 "
         "thread %.3f, the adapter's upload %.3f); adamw on the host's %d threads %.3f ms\n",
         n, ms[0], gbs, 100 * gbs / copy_gbs, ms[1], ms[1] / ms[0], ms[2], ms[3], ms[4], threads, ms[5]);
  cudaFree(w), cudaFree(g), cudaFree(m), cudaFree(v);
  free(hw), free(hg), free(hm), free(hv);
}

/* The memory's rate as a device-to-device copy of bytes reaches it: GB/s, counting what it reads and writes. */
static double copy_rate(size_t bytes, int reps) {
  void *a = dev_zero(bytes), *b = dev_zero(bytes);
  for (int r = -2; r < reps; r++) {
    if (r == 0)
      timer_start();
    CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0));
  }
  const double s = timer_per_rep(reps);
  cudaFree(a), cudaFree(b);
  return 2.0 * bytes / s / 1e9;
}

/* The backend's row operations on `rows` rows of a Llama-3-8B layer, each
 * run `reps` times after one warm-up under the device-time profile: a line each
 * with its time a call, its bytes' rate and that rate as a share of
 * copy_gbs; the rates into gbs[] in the order of kRowOps. */
enum { N_ROW_OPS = 5 };
static const char *const kRowOps[N_ROW_OPS] = {"rmsnorm", "rope", "swiglu", "add", "bf16 rounding of x (products)"};
static const char *const kRowOpKeys[N_ROW_OPS] = {"rmsnorm", "rope", "swiglu", "add", "round_bf16"};

static void row_ops(const pa_backend *be, int rows, double copy_gbs, int reps, double gbs[N_ROW_OPS]) {
  const int D = 4096, F = 14336, H = 32, hd = 128;
  float *x = dev_zero((size_t)rows * F * 4), *y = dev_zero((size_t)rows * F * 4);
  float *w = dev_zero((size_t)F * 4), *tab = dev_zero((size_t)hd / 2 * 4); /* position 0's cos and sin row */
  int32_t *pos = dev_zero((size_t)rows * 4);
  void *w16 = dev_zero((size_t)16 * F * 2);
  for (int r = -1; r < reps; r++) {
    if (r == 0 && pa_cuda_profile(1) != 0) {
      fprintf(stderr, "bench_cuda: profile: %s\n", pa_cuda_error());
      exit(1);
    }
    be->rmsnorm(rows, D, x, w, 1e-5f, y);
    be->rope(rows, H, hd, pos, tab, tab, y);
    be->swiglu(rows, F, y, x);
    be->add(rows, D, x, y);
    be->matmul_bf16(rows, 16, F, x, w16, 0.0f, y); /* its x rounded: the down projection's, rows x F */
  }
  const pa_cuda_profile_row *prof;
  double idle;
  const int n = pa_cuda_profile_read(&prof, &idle);
  if (n < 0 || pa_cuda_profile(0) != 0) {
    fprintf(stderr, "bench_cuda: profile: %s\n", pa_cuda_error());
    exit(1);
  }
  for (int k = 0; k < N_ROW_OPS; k++) {
    gbs[k] = 0;
    for (int r = 0; r < n; r++)
      if (!strcmp(prof[r].name, kRowOps[k]) && prof[r].ms > 0) {
        gbs[k] = prof[r].bytes / (prof[r].ms * 1e-3) / 1e9;
        printf("%s on %d rows: %.3f ms a call, %.0f GB/s, %.0f%% of the copy's\n", kRowOps[k], rows,
               prof[r].ms / prof[r].spans, gbs[k], 100 * gbs[k] / copy_gbs);
      }
  }
  cudaFree(x), cudaFree(y), cudaFree(w), cudaFree(tab), cudaFree(pos), cudaFree(w16);
}

int main(int argc, char **argv) {
  const char *json = argc == 3 && !strcmp(argv[1], "--json") ? argv[2] : NULL;
  setvbuf(stdout, NULL, _IOLBF, 0); /* a line as it comes: a run stopped at a time limit keeps what it printed */
  if (pa_cuda_devices() == 0) {
    fprintf(stderr, "bench_cuda: skipping: no CUDA device\n");
    return 77;
  }
  const pa_backend *be = pa_backend_cuda();
  if (!be) {
    fprintf(stderr, "bench_cuda: %s\n", pa_cuda_error());
    return 1;
  }
  struct cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS)
    return 1;
  const double peak = bf16_peak(h, 8192, 20);
  printf("device: %s, %d SMs, %.1f GiB\n", prop.name, prop.multiProcessorCount,
         (double)prop.totalGlobalMem / (1 << 30));
  printf("bf16 GEMM 8192^3 (cuBLAS, fp32 accumulation): %.1f TFLOP/s\n", peak);

  /* a Llama-3-8B layer's products for T tokens, through the backend */
  const int T = 1024;
  const double layer_flops = 2.0 * T * (2.0 * 4096 * 4096 + 2.0 * 1024 * 4096 + 3.0 * 14336 * 4096);
  const double secs = layer_products(be, FP32, T, peak), secs16 = layer_products(be, BF16, T, peak);

  /* attention by each kernel (cuda_attention.cu; the simple one the baseline) on
   * shapes of a Llama-3-8B layer: the prefill above, an evaluation pass of
   * PAS's grid (180 items of 70 tokens after a 2,400-token shared prefix,
   * about what the ICL prompts make: docs/EVALUATION.md), and decoding: a
   * row of one sequence after 2,400 keys of its own, and a row of each of
   * the 180 items, the last of its 70 (the keys of the caches are zero: the
   * time does not depend on them) */
  const int H = 32, KH = 8, hd = 128, n_items = 180, item = 70, prefix = 2400;
  const size_t rows = (size_t)n_items * item;
  float *q = dev_zero(rows * H * hd * 4), *z = dev_zero(rows * H * hd * 4);
  float *k = dev_zero(rows * KH * hd * 4), *v = dev_zero(rows * KH * hd * 4);
  float *kp = dev_zero((size_t)prefix * KH * hd * 4), *vp = dev_zero((size_t)prefix * KH * hd * 4);
  pa_attn_seq one = {.row0 = 0, .n = T, .past = 0, .k_own = k, .v_own = v, .stride = T};
  pa_attn_seq *items = malloc(n_items * sizeof *items);
  pa_attn_seq *steps = malloc(n_items * sizeof *steps);
  if (!items || !steps)
    return 1;
  for (int i = 0; i < n_items; i++) {
    items[i] = (pa_attn_seq){.row0 = i * item,
                             .n = item,
                             .past = 0,
                             .k_own = k + (size_t)i * KH * item * hd,
                             .v_own = v + (size_t)i * KH * item * hd,
                             .stride = item};
    steps[i] = items[i];
    steps[i].row0 = i, steps[i].n = 1, steps[i].past = item - 1;
  }
  /* one sequence's own cache: 2,401 rows a kv head, the 2,400 keys before its new row and the row's own */
  float *k_gen = dev_zero(((size_t)prefix + 1) * KH * hd * 4), *v_gen = dev_zero(((size_t)prefix + 1) * KH * hd * 4);
  pa_attn_seq gen = {.row0 = 0, .n = 1, .past = prefix, .k_own = k_gen, .v_own = v_gen, .stride = prefix + 1};
  /* the 180 items after the shared prefix: a pass of PAS's grid, and a decoding step of each */
  const pa_attn_args on_prefix = {.n_heads = H,
                                  .n_kv_heads = KH,
                                  .head_dim = hd,
                                  .q = q,
                                  .z = z,
                                  .k_prefix = kp,
                                  .v_prefix = vp,
                                  .prefix_len = prefix,
                                  .prefix_stride = prefix,
                                  .seqs = items,
                                  .n_seqs = n_items};
  pa_attn_args on_prefix_steps = on_prefix;
  on_prefix_steps.seqs = steps;
  enum { N_SHAPES = 4, PAS = 1, DECODE1 = 2, DECODE180 = 3 };
  const struct {
    const char *name, *key; /* key: its name in bench.json */
    pa_attn_args a;
    double flops; /* the two products over the keys each row sees */
    double bytes; /* the keys and values it reads, once each */
  } shape[N_SHAPES] = {
      {"prefill",
       "prefill",
       {.n_heads = H, .n_kv_heads = KH, .head_dim = hd, .q = q, .z = z, .seqs = &one, .n_seqs = 1},
       4.0 * H * hd * (T * (T + 1) / 2.0),
       8.0 * KH * hd * T},
      {"pas pass", "pas", on_prefix, 4.0 * H * hd * n_items * (item * (double)prefix + item * (item + 1) / 2.0),
       8.0 * KH * hd * (prefix + (double)n_items * item)},
      {"decode, 1 sequence",
       "decode1",
       {.n_heads = H, .n_kv_heads = KH, .head_dim = hd, .q = q, .z = z, .seqs = &gen, .n_seqs = 1},
       4.0 * H * hd * (prefix + 1.0),
       8.0 * KH * hd * (prefix + 1.0)},
      {"decode, 180 items", "decode180", on_prefix_steps, 4.0 * H * hd * n_items * ((double)prefix + item),
       8.0 * KH * hd * (prefix + (double)n_items * item)},
  };
  enum { N_KERNELS = 4, MMA = 2, MMA_BF16 = 3 };
  static const char *const kernel[N_KERNELS] = {"simple", "tiled", "mma", "mma_bf16"};
  double att[N_SHAPES][N_KERNELS];
  int shares = 1; /* the backend's split of decode1's keys (the tensor cores' kernels) */
  int packed = 0; /* whether the backend packed decode180's prefix */
  for (int sh = 0; sh < N_SHAPES; sh++) {
    for (int kk = 0; kk < N_KERNELS; kk++) {
      if (pa_cuda_attention_kernel(kernel[kk]) != 0)
        return 1;
      att[sh][kk] = time_attention(be, &shape[sh].a);
      if (sh == DECODE1 && kk == MMA)
        shares = pa_cuda_attention_splits(-1);
      if (sh == DECODE180 && kk == MMA)
        packed = pa_cuda_attention_packing(-1);
      printf("attention (%s) %s: %.3f ms, %.1f TFLOP/s, keys and values read at %.0f GB/s, %.2fx the simple kernel's "
             "time\n",
             kernel[kk], shape[sh].name, att[sh][kk] * 1e3, shape[sh].flops / att[sh][kk] / 1e12,
             shape[sh].bytes / att[sh][kk] / 1e9, att[sh][kk] / att[sh][0]);
    }
  }
  printf("attention on the prefill (mma, the default): %.2fx the layer's bf16 products\n", att[0][MMA] / secs16);
  for (int sh = 0; sh < N_SHAPES; sh++)
    printf("attention (mma_bf16) %s: %.2fx the time of mma's\n", shape[sh].name, att[sh][MMA_BF16] / att[sh][MMA]);
  /* decoding one sequence: its keys split across blocks, as timed above, against one block a kv head */
  double whole[N_KERNELS] = {0};
  for (int kk = MMA; kk < N_KERNELS; kk++) {
    pa_cuda_attention_kernel(kernel[kk]);
    pa_cuda_attention_splits(1);
    whole[kk] = time_attention(be, &shape[DECODE1].a);
    pa_cuda_attention_splits(0);
    printf("attention (%s) %s: its keys in %d shares a row %.3f ms, in one %.3f ms (%.2fx)\n", kernel[kk],
           shape[DECODE1].name, shares, att[DECODE1][kk] * 1e3, whole[kk] * 1e3, whole[kk] / att[DECODE1][kk]);
  }
  /* the 180 items' shared prefix: packed or walked by each item's tiles, on their decoding step (packed by the
   * backend's choice, as timed above) and on PAS's pass (not packed by its choice: 5 tiles an item, 4 full) */
  double other[2][N_KERNELS] = {{0}};
  /* the decoding step's packed prefix walk makes 12 tiles x 8 kv heads' blocks, fewer than an H100's 132 SMs,
   * which the backend's rule leaves unsplit: the step packed with each walk in 1 to 8 shares, for the rule to
   * weigh the idle SMs against the shares' combining */
  enum { N_SWEEP = 6 };
  static const int sweep_shares[N_SWEEP] = {1, 2, 3, 4, 6, 8};
  double sweep[N_SWEEP][N_KERNELS] = {{0}};
  int swept[N_SWEEP][N_KERNELS] = {{0}}; /* the shares the two walks took together */
  for (int kk = MMA; kk < N_KERNELS; kk++) {
    pa_cuda_attention_kernel(kernel[kk]);
    pa_cuda_attention_packing(packed ? 2 : 1);
    other[0][kk] = time_attention(be, &shape[DECODE180].a);
    pa_cuda_attention_packing(1);
    other[1][kk] = time_attention(be, &shape[PAS].a);
    for (int n = 0; n < N_SWEEP; n++) {
      pa_cuda_attention_splits(sweep_shares[n]);
      sweep[n][kk] = time_attention(be, &shape[DECODE180].a);
      swept[n][kk] = pa_cuda_attention_splits(-1);
    }
    pa_cuda_attention_splits(0);
    pa_cuda_attention_packing(0);
    printf("attention (%s) %s: the prefix %s %.3f ms, %s %.3f ms (%.2fx)\n", kernel[kk], shape[DECODE180].name,
           packed ? "packed" : "walked by each item's tile", att[DECODE180][kk] * 1e3,
           packed ? "walked by each item's tile" : "packed", other[0][kk] * 1e3, other[0][kk] / att[DECODE180][kk]);
    printf("attention (%s) %s: the prefix walked by each item's tiles %.3f ms, packed %.3f ms (%.2fx)\n", kernel[kk],
           shape[PAS].name, att[PAS][kk] * 1e3, other[1][kk] * 1e3, other[1][kk] / att[PAS][kk]);
    for (int n = 0; n < N_SWEEP; n++)
      printf("attention (%s) %s: the prefix packed, each walk in up to %d share(s) (%d in all) %.3f ms (%.2fx "
             "with the rule's shares)\n",
             kernel[kk], shape[DECODE180].name, sweep_shares[n], swept[n][kk], sweep[n][kk] * 1e3,
             sweep[n][kk] / (packed ? att[DECODE180][kk] : other[0][kk]));
  }
  pa_cuda_attention_kernel("mma");
  free(items), free(steps);

  /* the memory's rate, and the row operations on PAS's pass against it */
  const double copy_gbs = copy_rate((size_t)1 << 30, 10);
  printf("device-to-device copy of 1 GiB: %.0f GB/s (read and written)\n", copy_gbs);
  double row_gbs[N_ROW_OPS] = {0};
  const char *prof_env = getenv("PALIGN_CUDA_PROFILE");
  const bool rows_timed = !prof_env || !*prof_env;
  if (rows_timed)
    row_ops(be, (int)rows, copy_gbs, 5, row_gbs);
  else /* row_ops restarts and stops the profile: the variable's table would lose the rest */
    printf("row operations not timed: they use the device-time profile, which PALIGN_CUDA_PROFILE holds\n");
  double train_ms[4], opt_ms[6];
  train_attention(be, peak, train_ms);
  optimiser_step(be, copy_gbs, opt_ms);
  if (pa_cuda_error()[0]) {
    fprintf(stderr, "bench_cuda: %s\n", pa_cuda_error());
    return 1;
  }
  if (json) {
    FILE *f = fopen(json, "w");
    if (f) {
      fprintf(f,
              "{\"device\": \"%s\", \"bf16_peak_tflops\": %.2f, \"layer_matmul_ms\": %.4f, \"layer_matmul_tflops\": "
              "%.2f, \"layer_matmul_bf16_ms\": %.4f, \"layer_matmul_bf16_tflops\": %.2f, \"tokens\": %d",
              prop.name, peak, secs * 1e3, layer_flops / secs / 1e12, secs16 * 1e3, layer_flops / secs16 / 1e12, T);
      for (int sh = 0; sh < N_SHAPES; sh++)
        for (int kk = 0; kk < N_KERNELS; kk++)
          fprintf(f, ", \"attention_%s_%s_ms\": %.4f", shape[sh].key, kernel[kk], att[sh][kk] * 1e3);
      fprintf(f, ", \"decode1_shares\": %d", shares);
      for (int kk = MMA; kk < N_KERNELS; kk++)
        fprintf(f, ", \"attention_decode1_%s_unsplit_ms\": %.4f", kernel[kk], whole[kk] * 1e3);
      fprintf(f, ", \"decode180_packed\": %d", packed);
      for (int kk = MMA; kk < N_KERNELS; kk++) {
        fprintf(f, ", \"attention_decode180_%s_%s_ms\": %.4f, \"attention_pas_%s_packed_ms\": %.4f", kernel[kk],
                packed ? "unpacked" : "packed", other[0][kk] * 1e3, kernel[kk], other[1][kk] * 1e3);
        for (int n = 0; n < N_SWEEP; n++)
          fprintf(f,
                  ", \"attention_decode180_%s_packed_%d_shares_ms\": %.4f, "
                  "\"attention_decode180_%s_packed_%d_shares_total\": %d",
                  kernel[kk], sweep_shares[n], sweep[n][kk] * 1e3, kernel[kk], sweep_shares[n], swept[n][kk]);
      }
      fprintf(f, ", \"copy_gbs\": %.1f", copy_gbs);
      for (int op = 0; rows_timed && op < N_ROW_OPS; op++)
        fprintf(f, ", \"%s_gbs\": %.1f", kRowOpKeys[op], row_gbs[op]);
      fprintf(f,
              ", \"train_rows\": %d, \"train_attention_ms\": %.4f, \"train_attention_backward_ms\": %.4f, "
              "\"train_products_ms\": %.4f, \"train_products_backward_ms\": %.4f",
              kTrainRows, train_ms[0], train_ms[1], train_ms[2], train_ms[3]);
      fprintf(f,
              ", \"adamw_values\": %zu, \"adamw_device_ms\": %.4f, \"adamw_host_ms\": %.4f, "
              "\"adamw_host_download_ms\": %.4f, \"adamw_host_update_ms\": %.4f, \"adamw_host_upload_ms\": %.4f, "
              "\"adamw_host_threads\": %d, \"adamw_host_update_all_ms\": %.4f",
              kAdapterValues, opt_ms[0], opt_ms[1], opt_ms[2], opt_ms[3], opt_ms[4], pa_backend_threads(), opt_ms[5]);
      fprintf(f, "}\n");
      fclose(f);
    }
  }
  cublasDestroy(h);
  return 0;
}
