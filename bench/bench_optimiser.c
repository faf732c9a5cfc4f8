/* bench_optimiser: AdamW's step on the host, for docs/DPO.md.
 *
 *   bench_optimiser [VALUES]
 *
 * Times the CPU backend's adamw (backend.h) on VALUES parameters (by
 * default Llama-3-8B's rank-8 adapter on q, k, v and o of 32 layers:
 * 6,815,744, what one DPO step updates on that model) at 1 thread and on
 * all the CPU backend's threads (pa_backend_threads), against a memcpy of
 * as many bytes as a step must move (28 a value: w, g, m and v read, w, m
 * and v written) in the same run; the median of 7 repeats after a warm-up. */
#include "backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double wall_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

enum { REPS = 7 };

static double median(double *t) {
  qsort(t, REPS, sizeof *t, by_value);
  return t[REPS / 2];
}

int main(int argc, char **argv) {
  size_t n = 32 * (size_t)(2 * (8 * 4096 + 4096 * 8) + 2 * (8 * 4096 + 1024 * 8));
  if (argc > 1) {
    char *end;
    const unsigned long long v = strtoull(argv[1], &end, 10);
    if (argc > 2 || *end || end == argv[1] || v < 1 || v > (1ull << 32)) {
      fprintf(stderr, "usage: bench_optimiser [VALUES] (1 to 2^32; not '%s')\n", argv[1]);
      return 2;
    }
    n = (size_t)v;
  }
  float *w = calloc(n, sizeof *w), *g = malloc(n * sizeof *g), *m = calloc(n, sizeof *m), *v = calloc(n, sizeof *v);
  char *src = malloc(14 * n), *dst = malloc(14 * n); /* 28 bytes a value: 14 read, 14 written */
  if (!w || !g || !m || !v || !src || !dst) {
    fprintf(stderr, "bench_optimiser: no memory for %zu values\n", n);
    return 1;
  }
  for (size_t i = 0; i < n; i++)
    g[i] = (float)((double)(i % 1001) - 500) * 1e-4f;
  memset(src, 1, 14 * n);
  const pa_backend *cpu = pa_backend_cpu();
  double t[REPS];
  for (int r = -1; r < REPS; r++) {
    const double t0 = wall_s();
    memcpy(dst, src, 14 * n);
    if (r >= 0)
      t[r] = wall_s() - t0;
  }
  const double copy = median(t);
  printf("%zu values; a memcpy of their 28 bytes each (%.0f MB read and written): %.2f ms, %.1f GB/s\n", n, 28e-6 * n,
         copy * 1e3, 28.0 * n / copy / 1e9);
  const int all = pa_backend_threads();
  for (int th = 1; th <= all; th = th == all ? all + 1 : all) {
    pa_backend_set_threads(th);
    for (int r = -1; r < REPS; r++) {
      const pa_adamw_step st = {
          .beta1 = 0.9, .beta2 = 0.999, .c1 = 0.1, .c2 = 1e-3, .lr = 1e-3, .decay = 1 - 1e-5, .eps = 1e-8};
      const double t0 = wall_s();
      cpu->adamw(n, &st, w, g, m, v);
      if (r >= 0)
        t[r] = wall_s() - t0;
    }
    const double s = median(t);
    printf("adamw on %d thread%s: %.2f ms, %.1f GB/s (%.2fx the memcpy's time)\n", th, th > 1 ? "s" : "", s * 1e3,
           28.0 * n / s / 1e9, s / copy);
  }
  free(w), free(g), free(m), free(v), free(src), free(dst);
  return 0;
}
