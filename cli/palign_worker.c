/* palign-worker: the fitting service (coordinator/service.h).
 *
 *   mpirun -np N palign-worker [--model M] [--papi DIR] [--store S] [--methods LIST] ...
 *
 * Rank 0 coordinates and every other rank fits; with -np 1 (or without
 * mpirun) one process does both. Exit status: 0 when every subject asked for
 * is stored, 3 when stopped by SIGTERM/SIGINT (rerun to resume), 2 for bad
 * flags (unknown, missing or malformed values: an unknown method, a
 * --subjects that is not all, N or A-B), 1 for other errors (a --subjects
 * range beyond the subjects file, a store with other settings). */
#include "cli_util.h"
#include "commands.h"
#include "comm.h"
#include "dpo.h"
#include "inventory.h"
#include "methods.h"
#include "pas.h"
#include "service.h"
#include "status.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

static void usage(FILE *f) {
  fprintf(f, "usage: mpirun -np N palign-worker [options]\n"
             "Fits and evaluates every subject asked for and stores the results (resumable).\n"
             "  --model M          GGUF file or Hugging Face directory (default $PALIGN_MODEL, else\n"
             "                     $PALIGN_CACHE or ~/.cache/palign, file " DEFAULT_MODEL_FILE ")\n"
             "  --papi DIR         PAPI data (default $PALIGN_PAPI_DIR, else ../shared/papi)\n"
             "  --store S          the store directory (default results/store)\n"
             "  --methods LIST     comma-separated: none, icl, p2, pas, pas_only, dpo, dpo_icl (default icl,pas);\n"
             "                     const3 and trait_mean are always added\n"
             "  --subjects R       all, N (the first N) or A-B (positions) (default all)\n"
             "  --subjects-file F  subjects as JSON or CSV instead of PAPI/Test-set.json\n"
             "  --seed N           run seed: probe splits and the holdout set (default 1)\n"
             "  --threads N        CPU threads per worker (default: all)\n"
             "  --mode M           how answers are read: logits (default) or generate (as palign eval --help says)\n"
             "  --batch N          questions per forward batch (default 64; fewer need less memory)\n"
             "  --holdout N        PAS holdout protocol: selection items per trait (default 6)\n"
             "  --alphas LIST      PAS alpha grid, comma-separated (default 0,1,2,4,6,8)\n"
             "  --chunk N          subjects per hand-out (default: from the counts)\n"
             "  --progress S       seconds between progress lines (default 10)\n"
             "  --heartbeat S      seconds between a busy worker's heartbeats (default 5)\n"
             "  --silent S         report a worker silent for this long (default 120)\n"
             "  --shard-mb N       a worker's shard begins a new part file past N MiB (default 256)\n"
             "  --benchmark-delay MEAN[,CV]\n"
             "                     the benchmark mode, for measuring the service itself: no model is loaded;\n"
             "                     each subject is a sleep of MEAN seconds on average (log-normal, coefficient\n"
             "                     of variation CV, default 0.3), then the model-free methods only (the\n"
             "                     default --methods is const3); the store is marked as a benchmark store\n");
  pa_backend_help(f, 21);
  pa_dpo_flags_help(f, 21);
}

int main(int argc, char **argv) {
  pa_comm *comm = NULL;
  if (pa_comm_init(&argc, &argv, &comm)) {
    fprintf(stderr, "palign-worker: %s\n", pa_errmsg());
    return 1;
  }
  const bool talk = pa_comm_rank(comm) == 0;
  char *said = NULL; /* this rank's complaints about its flags, said below once the ranks agree */
  size_t said_len = 0;
  FILE *msg = open_memstream(&said, &said_len);
  if (!msg) {
    fprintf(stderr, "palign-worker: no memory\n");
    pa_comm_finalize(comm);
    return 1;
  }
  char model_buf[4096];
  pa_service_opts o = {.model = getenv("PALIGN_MODEL"),
                       .store = "results/store",
                       .methods = "icl,pas",
                       .subjects = "all",
                       .seed = 1,
                       .dpo = pa_dpo_defaults()};
  double alphas[PA_PAS_MAX_ALPHAS];
  int bad = 0;
  bool methods_given = false;
  for (int i = 1; i < argc && !bad; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      if (talk)
        usage(stdout);
      fclose(msg);
      free(said);
      pa_comm_finalize(comm);
      return 0;
    }
    static const char *const flags[] = {"--model",           "--papi",     "--store",     "--methods", "--subjects",
                                        "--subjects-file",   "--seed",     "--threads",   "--mode",    "--holdout",
                                        "--chunk",           "--progress", "--heartbeat", "--silent",  "--alphas",
                                        "--benchmark-delay", "--shard-mb", "--backend",   "--weights", "--batch"};
    int k = -1;
    for (int j = 0; j < (int)(sizeof flags / sizeof *flags); j++)
      if (!strcmp(a, flags[j]))
        k = j;
    if (k < 0 && i + 1 < argc) {
      const int d = pa_dpo_flag(msg, "palign-worker", a, argv[i + 1], &o.dpo);
      if (d) {
        bad = d < 0;
        i++;
        continue;
      }
    }
    if (k < 0 || i + 1 >= argc) {
      fprintf(msg,
              k < 0 ? "palign-worker: unexpected argument '%s' (see --help)\n" : "palign-worker: %s needs a value\n",
              a);
      bad = 1;
      break;
    }
    const char *v = argv[++i];
    FILE *err = msg;
    long long n = 0;
    switch (k) {
    case 0: o.model = v; break;
    case 1: o.papi = v; break;
    case 2: o.store = v; break;
    case 3: o.methods = v, methods_given = true; break;
    case 4: o.subjects = v; break;
    case 5: o.subjects_file = v; break;
    case 6: bad = pa_arg_int(err, "palign-worker", a, v, 0, 4294967295LL, &n), o.seed = (uint64_t)n; break;
    case 7: bad = pa_arg_int(err, "palign-worker", a, v, 1, 1024, &n), o.threads = (int)n; break;
    case 8:
      if (strcmp(v, "logits") && strcmp(v, "generate")) {
        fprintf(msg, "palign-worker: --mode is logits or generate, not '%s'\n", v);
        bad = 1;
      }
      o.eval.mode = strcmp(v, "logits") ? PA_READ_GENERATE : PA_READ_LOGITS;
      break;
    case 9: bad = pa_arg_int(err, "palign-worker", a, v, 1, 1000, &n), o.holdout_per_trait = (int)n; break;
    case 10: bad = pa_arg_int(err, "palign-worker", a, v, 1, 64, &n), o.chunk = (int)n; break;
    case 11: bad = pa_arg_num(err, "palign-worker", a, v, 0.1, 86400, &o.progress_every); break;
    case 12: bad = pa_arg_num(err, "palign-worker", a, v, 0.1, 86400, &o.heartbeat_every); break;
    case 13: bad = pa_arg_num(err, "palign-worker", a, v, 1, 864000, &o.silent_after); break;
    case 15: {
      char *end;
      errno = 0;
      o.benchmark_delay = strtod(v, &end);
      o.benchmark_cv = 0.3;
      const char *cv = *end == ',' ? end + 1 : NULL;
      if (cv)
        o.benchmark_cv = strtod(cv, &end);
      if (errno || *end || v[0] == ',' || (cv && end == cv) || !(o.benchmark_delay > 0 && o.benchmark_delay <= 86400) ||
          !(o.benchmark_cv >= 0 && o.benchmark_cv <= 10)) {
        fprintf(msg,
                "palign-worker: --benchmark-delay is MEAN[,CV] with MEAN in (0, 86400] seconds and CV in "
                "[0, 10], not '%s'\n",
                v);
        bad = 1;
      }
      break;
    }
    case 16:
      bad = pa_arg_int(err, "palign-worker", a, v, 1, 1 << 20, &n);
      o.shard_bytes = (uint64_t)n << 20;
      break;
    case 17: bad = pa_backend_arg(err, "palign-worker", v) != 0, o.backend = v; break;
    case 18: bad = pa_weights_arg(err, "palign-worker", v) != 0, o.weights = v; break;
    case 19: bad = pa_arg_int(err, "palign-worker", a, v, 1, 4096, &n), o.eval.batch = (int)n; break;
    default:
      o.n_alphas = pa_pas_parse_alphas(v, alphas);
      o.alphas = alphas;
      if ((bad = o.n_alphas < 0))
        fprintf(msg, "palign-worker: --alphas: %s\n", pa_errmsg());
      break;
    }
  }
  if (!bad && pa_dpo_validate(&o.dpo)) { /* a bad --dpo-* value is a bad flag, whatever the methods */
    fprintf(msg, "palign-worker: %s\n", pa_errmsg());
    bad = 1;
  }
  /* the values known to be malformed before any data is read: exit 2 (a
   * range beyond the subjects file is found with the data: exit 1) */
  size_t first, last;
  if (!bad && pa_subjects_range(o.subjects, SIZE_MAX, &first, &last)) {
    fprintf(msg, "palign-worker: --subjects is all, N (at least 1) or A-B (A <= B), not '%s'\n", o.subjects);
    bad = 1;
  }
  if (!bad && o.benchmark_delay > 0 && !methods_given)
    o.methods = "const3";
  const pa_method *m[32];
  const int n_methods = bad ? 0 : pa_methods_parse(o.methods, m, 32);
  if (n_methods < 0) {
    fprintf(msg, "palign-worker: --methods: %s\n", pa_errmsg());
    bad = 1;
  }
  if (!bad && o.benchmark_delay > 0) {
    for (int j = 0; j < n_methods && !bad; j++)
      if (m[j]->needs_model) {
        fprintf(msg,
                "palign-worker: --benchmark-delay runs no model: method %s cannot go with it (only const3 "
                "and trait_mean)\n",
                m[j]->name);
        bad = 1;
      }
  }
  /* Every rank read its own command line (an MPMD job may give ranks
   * different ones): all stop with exit 2 if any found a bad flag. Rank 0
   * says its complaints; a worker says its own only where rank 0 had none,
   * so that one mistake given to every rank is said once. */
  fclose(msg);
  int rank0_bad = bad, all = !bad;
  if (pa_comm_bcast(comm, &rank0_bad, sizeof rank0_bad) || pa_comm_all_ok(comm, !bad, &all))
    all = 0;
  if (said && (talk || (bad && !rank0_bad)))
    fputs(said, stderr);
  free(said);
  if (!all) {
    if (talk && !bad)
      fprintf(stderr, "palign-worker: another rank was given a bad flag (see its message)\n");
    pa_comm_finalize(comm);
    return 2;
  }
  if (!o.model || !*o.model)
    o.model = pa_cache_file(DEFAULT_MODEL_FILE, model_buf, sizeof model_buf);

  int rc = pa_service_run(comm, &o);
  if (rc == PA_OK && talk) {
    /* the run ends with what is in the store now */
    char *args[] = {"query", (char *)o.store, "summary", NULL};
    fputc('\n', stdout);
    cmd_query(3, args);
  }
  pa_comm_finalize(comm);
  return rc == PA_OK ? 0 : rc == PA_ECANCELED ? 3 : 1;
}
