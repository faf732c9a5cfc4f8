/* bench_load: time and peak memory of opening a model and loading its weights
 * to fp32, against a baseline measured in the same process: reading the same
 * bytes from the page cache with read(2).
 *
 *   bench_load MODEL [REPEATS]
 * Prints one line per phase, `name seconds`, medians over REPEATS (default 5),
 * then peak resident memory. */
#include "model.h"
#include "status.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, cmp);
  return v[n / 2];
}

/* Bytes of all regular files under a model path (a file, or a directory's top level). */
static double read_all(const char *path) {
  static char buf[1 << 20];
  int fd = open(path, O_RDONLY);
  if (fd < 0)
    return -1;
  double t0 = now();
  while (read(fd, buf, sizeof buf) > 0)
    ;
  close(fd);
  return now() - t0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_load MODEL [REPEATS]\n");
    return 2;
  }
  const int reps = argc > 2 ? atoi(argv[2]) : 5;
  if (reps < 1 || reps > 100) {
    fprintf(stderr, "bench_load: REPEATS must be 1..100\n");
    return 2;
  }
  double t_read[100], t_open[100], t_load[100];
  struct stat st;
  const bool is_file = stat(argv[1], &st) == 0 && S_ISREG(st.st_mode);
  read_all(argv[1]); /* warm the page cache so every phase reads from memory */
  size_t n_floats = 0;
  for (int r = 0; r < reps; r++) {
    t_read[r] = is_file ? read_all(argv[1]) : 0;
    double t0 = now();
    pa_model *m;
    if (pa_model_open(argv[1], &m)) {
      fprintf(stderr, "bench_load: %s\n", pa_errmsg());
      return 1;
    }
    double t1 = now();
    pa_weights w;
    if (pa_model_load_weights(m, &w)) {
      fprintf(stderr, "bench_load: %s\n", pa_errmsg());
      return 1;
    }
    double t2 = now();
    n_floats = w.n_floats;
    pa_weights_free(&w);
    pa_model_close(m);
    t_open[r] = t1 - t0;
    t_load[r] = t2 - t1;
  }
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  const double read_s = median(t_read, reps), open_s = median(t_open, reps), load_s = median(t_load, reps);
  printf("file_bytes %lld\n", (long long)(is_file ? st.st_size : 0));
  printf("read_file_s %.4f\n", read_s);
  printf("open_s %.4f\n", open_s);
  printf("load_weights_s %.4f\n", load_s);
  if (is_file && read_s > 0)
    printf("open_plus_load_over_read %.2f\n", (open_s + load_s) / read_s);
  printf("fp32_weight_mib %.1f\n", (double)n_floats * 4 / (1 << 20));
  printf("peak_rss_mib %.1f\n", (double)ru.ru_maxrss / 1024);
  return 0;
}
