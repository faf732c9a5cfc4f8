#include "cli_util.h"

#include "dpo.h"
#include "forward.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* Flags shared by several commands' help: the flag and its value, then its
 * description's lines, the first beside the flag. */
typedef struct {
  const char *flag;
  const char *lines[3];
} shared_flag;

static void print_flags(FILE *f, int column, const shared_flag *rows, size_t n) {
  for (size_t i = 0; i < n; i++) {
    int used = fprintf(f, "  %s", rows[i].flag);
    for (size_t k = 0; k < 3 && rows[i].lines[k]; k++) {
      if (k > 0 || used + 2 > column) { /* two spaces at least between flag and text */
        fputc('\n', f);
        used = 0;
      }
      fprintf(f, "%*s%s", column - used, "", rows[i].lines[k]);
      used = column;
    }
    fputc('\n', f);
  }
}

static const shared_flag dpo_flags[] = {
    {"--dpo-epochs N", {"DPO: passes over the subject's train items (default 4)"}},
    {"--dpo-batch N", {"DPO: prompts per optimiser step (default 16)"}},
    {"--dpo-lr X", {"DPO: AdamW learning rate (default 1e-3)"}},
    {"--dpo-beta X", {"DPO: beta (default 0.1)"}},
    {"--dpo-rank N", {"DPO: LoRA rank (default 8)"}},
    {"--dpo-alpha X", {"DPO: LoRA alpha, the update being alpha/rank * B A (default 16)"}},
    {"--dpo-weight-decay X", {"DPO: AdamW's decoupled weight decay (default 0)"}},
};

void pa_dpo_flags_help(FILE *f, int column) {
  print_flags(f, column, dpo_flags, sizeof dpo_flags / sizeof dpo_flags[0]);
}

int pa_dpo_flag(FILE *err, const char *prog, const char *flag, const char *v, void *dpo_opts) {
  pa_dpo_opts *o = dpo_opts;
  static const char *const names[] = {"--dpo-epochs", "--dpo-batch", "--dpo-lr",          "--dpo-beta",
                                      "--dpo-rank",   "--dpo-alpha", "--dpo-weight-decay"};
  int k = -1;
  for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++)
    if (!strcmp(flag, names[i]))
      k = i;
  if (k < 0)
    return 0;
  long long n;
  double x;
  switch (k) {
  case 0:
  case 1:
  case 4:
    if (pa_arg_int(NULL, prog, flag, v, -1000000000LL, 1000000000LL, &n)) {
      if (err)
        fprintf(err, "%s: %s must be a whole number, not '%s'\n", prog, flag, v);
      return -1;
    }
    *(k == 0 ? &o->epochs : k == 1 ? &o->batch : &o->rank) = (int)n;
    return 1;
  default:
    if (pa_arg_num(NULL, prog, flag, v, -1e300, 1e300, &x)) {
      if (err)
        fprintf(err, "%s: %s must be a number, not '%s'\n", prog, flag, v);
      return -1;
    }
    *(k == 2 ? &o->lr : k == 3 ? &o->beta : k == 5 ? &o->alpha : &o->weight_decay) = x;
    return 1;
  }
}

int pa_backend_arg(FILE *err, const char *prog, const char *v) {
  if (!strcmp(v, "cpu") || !strcmp(v, "cuda") || !strcmp(v, "auto"))
    return 0;
  if (err)
    fprintf(err, "%s: --backend is cpu, cuda or auto, not '%s'\n", prog, v);
  return -1;
}

static const shared_flag backend_flags[] = {
    {"--backend B",
     {"cpu, cuda or auto (cuda where a GPU is, else cpu); default cpu. On cuda",
      "the model runs on the GPU (its forward pass, PAS's bank and grid, DPO's training)"}},
    {"--weights W",
     {"how the weight matrices are held: fp32, bf16 (half the memory; the GPU's",
      "tensor cores) or auto (bf16 on a GPU, fp32 on the CPU; the default)"}},
};

void pa_backend_help(FILE *f, int column) {
  print_flags(f, column, backend_flags, sizeof backend_flags / sizeof backend_flags[0]);
}

int pa_weights_arg(FILE *err, const char *prog, const char *v) {
  if (pa_weight_format_parse(v) >= 0)
    return 0;
  if (err)
    fprintf(err, "%s: --weights is auto, fp32 or bf16, not '%s'\n", prog, v);
  return -1;
}
