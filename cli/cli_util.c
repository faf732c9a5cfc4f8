#include "cli_util.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

int pa_arg_int(FILE *err, const char *prog, const char *flag, const char *v, long long lo, long long hi,
               long long *out) {
  char *end;
  errno = 0;
  const long long x = strtoll(v, &end, 10);
  if (errno || end == v || *end || x < lo || x > hi) {
    if (err)
      fprintf(err, "%s: %s must be an integer in %lld..%lld, not '%s'\n", prog, flag, lo, hi, v);
    return -1;
  }
  *out = x;
  return 0;
}

int pa_arg_num(FILE *err, const char *prog, const char *flag, const char *v, double lo, double hi, double *out) {
  char *end;
  errno = 0;
  const double x = strtod(v, &end);
  if (errno || end == v || *end || !isfinite(x) || !(x >= lo && x <= hi)) {
    if (err)
      fprintf(err, "%s: %s must be a number in [%g, %g], not '%s'\n", prog, flag, lo, hi, v);
    return -1;
  }
  *out = x;
  return 0;
}

const char *pa_cache_file(const char *file, char *buf, size_t n) {
  const char *cache = getenv("PALIGN_CACHE"), *home = getenv("HOME");
  if (cache && *cache)
    snprintf(buf, n, "%s/%s", cache, file);
  else
    snprintf(buf, n, "%s/.cache/palign/%s", home && *home ? home : ".", file);
  return buf;
}
