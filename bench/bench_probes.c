/* bench_probes: PAS's probes for one subject (worker/probe.h) on a bank of a
 * given shape, for docs/PROBES.md.
 *
 *   bench_probes [--shape LAYERS,HEADS,HEAD_DIM] [--bank FILE] [--subjects N] [--threads T]
 *
 * The shape defaults to Llama-3-8B's (32,32,128: 1,024 probes of 128
 * dimensions); SmolLM2-135M's is 30,9,64 and Qwen2.5-0.5B's 24,14,64. The
 * bank is PAPI's 120 train items, two sequences each, with made-up
 * activations: each head's samples are 8 Gaussian factors of its own (a real
 * head's activations fill few of its dimensions), a little isotropic noise,
 * and a signal along a direction of its own whose sign is the sequence's
 * answer letter, of a size that differs by head (as in a real bank, where the
 * letter is read by most heads and the subject's answers decide how well);
 * its probes take about as many Newton steps as a real bank's (5 here, 4 on
 * Qwen2.5-0.5B's). --bank FILE takes a real bank's activations instead (a
 * palign cache file, e.g. ~/.cache/palign/bank-*.bin), its heads side by
 * side where the shape's are wider (bank_from_file). N subjects with random
 * answers 1..5 are fitted on 1 thread, then on T threads (default: all
 * cores).
 *
 * Prints seconds per subject and per probe, the Newton steps a probe took,
 * and, as the baseline measured in the same run, the time of one Newton
 * step's two library calls through the Hessian (OpenBLAS's dsyrk, LAPACK's
 * dpotrf) at the probe's size (the last subject's training samples): a
 * probe's time in those units (on T threads, its thread-seconds) is a figure
 * the machine's speed on the day does not move, and shows what a step costs
 * against that way of making it. */
#include "probe.h"
#include "rng.h"
#include "status.h"

#include <cJSON.h>
#include <cblas.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* LAPACK's Cholesky factorisation, as worker/probe.c declares it (OpenBLAS provides it) */
void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);

enum { N_ITEMS = 120, RANK = 8 };

static double gauss(uint64_t *s) {
  const double u = pa_uniform24(s) + 0x1p-25, v = pa_uniform24(s);
  return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

/* Seconds of one Newton step's library calls for n samples of d dimensions. */
static double library_step(int n, int d) {
  const int p = d + 1, reps = 200;
  double *x = malloc((size_t)n * d * sizeof *x), *h = malloc((size_t)p * p * sizeof *h);
  if (!x || !h)
    exit(1);
  uint64_t s = 7;
  for (size_t i = 0; i < (size_t)n * d; i++)
    x[i] = gauss(&s);
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    const double t0 = omp_get_wtime();
    memset(h, 0, (size_t)p * p * sizeof *h);
    cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, d, n, 1.0, x, d, 0.0, h, p);
    for (int a = 0; a < p; a++)
      h[(size_t)a * p + a] += 1 + n;
    int info = 0;
    dpotrf_("U", &p, h, &p, &info);
    const double t = omp_get_wtime() - t0;
    best = t < best ? t : best;
    if (info) {
      fprintf(stderr, "bench_probes: dpotrf failed (%d)\n", info);
      exit(1);
    }
  }
  free(x), free(h);
  return best;
}

/* The made-up bank: [2 N_ITEMS][L][H][hd] (the header says how it is made). */
static float *made_up_bank(int L, int H, int hd) {
  const int n_lh = L * H;
  const size_t per_seq = (size_t)n_lh * hd;
  float *z = malloc(2 * N_ITEMS * per_seq * sizeof *z);
  double *dir = malloc(per_seq * sizeof *dir), *size = malloc((size_t)n_lh * sizeof *size);
  double *basis = malloc(per_seq * RANK * sizeof *basis);
  if (!z || !dir || !size || !basis)
    exit(1);
  uint64_t s = 1;
  for (int lh = 0; lh < n_lh; lh++) { /* a unit direction, and a signal of 0 to 2 along it */
    double *u = dir + (size_t)lh * hd, nn = 0;
    for (int k = 0; k < hd; k++) {
      u[k] = gauss(&s);
      nn += u[k] * u[k];
    }
    for (int k = 0; k < hd; k++)
      u[k] /= sqrt(nn);
    size[lh] = 2 * pa_uniform24(&s);
  }
  /* the rest of a sample: RANK factors of its head's own (a real head's
   * activations fill few of its dimensions) and a little isotropic noise */
  for (size_t i = 0; i < per_seq * RANK; i++)
    basis[i] = gauss(&s);
  for (int q = 0; q < 2 * N_ITEMS; q++) /* sequence 2i ends in A, 2i + 1 in E */
    for (int lh = 0; lh < n_lh; lh++) {
      double f[RANK];
      for (int r = 0; r < RANK; r++)
        f[r] = gauss(&s);
      for (int k = 0; k < hd; k++) {
        double x = 0.1 * gauss(&s) + (q % 2 ? -1 : 1) * size[lh] * dir[(size_t)lh * hd + k];
        for (int r = 0; r < RANK; r++)
          x += basis[((size_t)lh * hd + k) * RANK + r] * f[r];
        z[q * per_seq + (size_t)lh * hd + k] = (float)x;
      }
    }
  free(dir), free(size), free(basis);
  return z;
}

/* A bank of the shape L x H x hd made of a real one's heads (a cache file of
 * palign's, docs/BANK.md; its checksum is not checked: this is a
 * benchmark's input): each head is hd / (the file's head_dim) of the file's
 * heads side by side, taken in turn, so that Qwen2.5-0.5B's 64-dim heads
 * make 128-dim ones of an 8B shape. NULL, with the reason on stderr, when
 * the file is not such a bank or its head_dim does not divide hd. */
static float *bank_from_file(const char *path, int L, int H, int hd) {
  FILE *f = fopen(path, "rb");
  unsigned char head[16];
  if (!f || fread(head, 1, 16, f) != 16 || memcmp(head, "PALIGNBK", 8)) {
    fprintf(stderr, "bench_probes: %s: not an activation bank (docs/BANK.md)\n", path);
    if (f)
      fclose(f);
    return NULL;
  }
  const uint32_t hl = head[12] | head[13] << 8 | head[14] << 16 | (uint32_t)head[15] << 24;
  char *json = hl < (1u << 26) ? malloc((size_t)hl + 1) : NULL;
  cJSON *h = NULL;
  if (json && fread(json, 1, hl, f) == hl) {
    json[hl] = 0;
    h = cJSON_Parse(json);
  }
  free(json);
  const cJSON *d = cJSON_GetObjectItemCaseSensitive(h, "dims");
  int dims[4] = {0, 0, 0, 0};
  const char *names[4] = {"n_items", "n_layers", "n_heads", "head_dim"};
  for (int i = 0; i < 4; i++) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(d, names[i]);
    dims[i] = cJSON_IsNumber(v) && v->valuedouble >= 1 && v->valuedouble <= 1e6 ? v->valueint : 0;
  }
  cJSON_Delete(h);
  const int fn = dims[1] * dims[2], fd = dims[3];
  if (!dims[0] || !fn || !fd || dims[0] != N_ITEMS || hd % fd) {
    fprintf(stderr,
            "bench_probes: %s: its header's dims (%d items, %d x %d heads of %d) are not PAPI's %d items with a "
            "head_dim dividing %d\n",
            path, dims[0], dims[1], dims[2], fd, N_ITEMS, hd);
    fclose(f);
    return NULL;
  }
  const size_t nf = (size_t)2 * N_ITEMS * fn * fd;
  float *src = malloc(nf * sizeof *src), *z = malloc((size_t)2 * N_ITEMS * L * H * hd * sizeof *z);
  const bool read = src && z && fread(src, sizeof *src, nf, f) == nf;
  fclose(f);
  if (!read) {
    fprintf(stderr, "bench_probes: %s: truncated (its header describes %zu floats)\n", path, nf);
    free(src), free(z);
    return NULL;
  }
  const int parts = hd / fd;
  for (int q = 0; q < 2 * N_ITEMS; q++)
    for (int lh = 0; lh < L * H; lh++)
      for (int k = 0; k < hd; k++)
        z[((size_t)q * L * H + lh) * hd + k] = src[((size_t)q * fn + (lh * parts + k / fd) % fn) * fd + k % fd];
  free(src);
  return z;
}

int main(int argc, char **argv) {
  int L = 32, H = 32, hd = 128, subjects = 3, threads = omp_get_num_procs();
  const char *bank_path = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--shape") && i + 1 < argc && sscanf(argv[i + 1], "%d,%d,%d", &L, &H, &hd) == 3 && L > 0 &&
        H > 0 && hd > 0)
      i++;
    else if (!strcmp(argv[i], "--subjects") && i + 1 < argc && (subjects = atoi(argv[i + 1])) > 0)
      i++;
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc && (threads = atoi(argv[i + 1])) > 0)
      i++;
    else if (!strcmp(argv[i], "--bank") && i + 1 < argc)
      bank_path = argv[++i];
    else {
      fprintf(stderr,
              "usage: bench_probes [--shape LAYERS,HEADS,HEAD_DIM] [--bank FILE] [--subjects N] [--threads T]\n");
      return 2;
    }
  }
  const int n_lh = L * H;
  float *z = bank_path ? bank_from_file(bank_path, L, H, hd) : made_up_bank(L, H, hd);
  uint8_t *answers = malloc(N_ITEMS);
  if (!z || !answers)
    return 1;
  const pa_pas_bank bank = {z, N_ITEMS, L, H, hd};

  printf("bank: %d layers x %d heads, head_dim %d (%d probes), %d items, %s\n", L, H, hd, n_lh, N_ITEMS,
         bank_path ? bank_path : "made up");
  double step = 0;
  int n_train = 0;
  for (int pass = 0; pass < 2; pass++) {
    const int t = pass ? threads : 1;
    double secs = 0;
    long steps = 0;
    for (int j = 0; j < subjects; j++) {
      uint64_t a = 1000 + (uint64_t)j;
      for (int i = 0; i < N_ITEMS; i++)
        answers[i] = (uint8_t)(1 + pa_splitmix64(&a) % 5);
      char id[32];
      snprintf(id, sizeof id, "bench-%d", j);
      pa_pas_fit fit;
      memset(&fit, 0, sizeof fit);
      const pa_pas_opts o = {.run_seed = 1, .n_threads = t};
      const double t0 = omp_get_wtime();
      if (pa_pas_fit_subject(&bank, answers, id, &o, &fit) || fit.status != PA_PAS_FITTED) {
        fprintf(stderr, "bench_probes: %s\n", fit.status != PA_PAS_FITTED ? fit.message : pa_errmsg());
        return 1;
      }
      secs += omp_get_wtime() - t0;
      for (int lh = 0; lh < n_lh; lh++)
        steps += fit.probes[lh].iterations;
      n_train = fit.n_train;
      pa_pas_fit_free(&fit);
    }
    if (!pass) {
      step = library_step(n_train, hd);
      printf("baseline: one Newton step's dsyrk and dpotrf (%d samples, %d dims): %.1f us\n", n_train, hd, step * 1e6);
    }
    const double per = secs / subjects;
    printf("%d thread%s: %.3f s a subject, %.1f us a probe, %.2f Newton steps a probe, %.2f baseline steps a "
           "probe\n",
           t, t > 1 ? "s" : "", per, per / n_lh * 1e6, (double)steps / subjects / n_lh, per / n_lh / step * t);
  }
  free(z), free(answers);
  return 0;
}
