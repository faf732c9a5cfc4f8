/* bench_probes: PAS's probes for one subject (worker/probe.h) on a bank of a
 * given shape, for docs/PROBES.md.
 *
 *   bench_probes [--shape LAYERS,HEADS,HEAD_DIM] [--subjects N] [--threads T]
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
 * Qwen2.5-0.5B's). N subjects with random answers 1..5 are fitted on 1
 * thread, then on T threads (default: all cores).
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

#include <cblas.h>
#include <math.h>
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

int main(int argc, char **argv) {
  int L = 32, H = 32, hd = 128, subjects = 3, threads = omp_get_num_procs();
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--shape") && i + 1 < argc && sscanf(argv[i + 1], "%d,%d,%d", &L, &H, &hd) == 3 && L > 0 &&
        H > 0 && hd > 0)
      i++;
    else if (!strcmp(argv[i], "--subjects") && i + 1 < argc && (subjects = atoi(argv[i + 1])) > 0)
      i++;
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc && (threads = atoi(argv[i + 1])) > 0)
      i++;
    else {
      fprintf(stderr, "usage: bench_probes [--shape LAYERS,HEADS,HEAD_DIM] [--subjects N] [--threads T]\n");
      return 2;
    }
  }
  const int n_lh = L * H;
  const size_t per_seq = (size_t)n_lh * hd;
  float *z = malloc(2 * N_ITEMS * per_seq * sizeof *z);
  double *dir = malloc(per_seq * sizeof *dir), *size = malloc((size_t)n_lh * sizeof *size);
  uint8_t *answers = malloc(N_ITEMS);
  if (!z || !dir || !size || !answers)
    return 1;
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
  double *basis = malloc(per_seq * RANK * sizeof *basis);
  if (!basis)
    return 1;
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
  free(basis);
  const pa_pas_bank bank = {z, N_ITEMS, L, H, hd};

  printf("bank: %d layers x %d heads, head_dim %d (%d probes), %d items\n", L, H, hd, n_lh, N_ITEMS);
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
  free(z), free(dir), free(size), free(answers);
  return 0;
}
