/* service.h: `palign-worker`, the fitting service over MPI (docs/SERVICE.md).
 *
 * Every rank calls pa_service_run with the same options. Rank 0 reads the
 * store's manifest and records, refuses a store made with other settings,
 * holds the store's lock for the run (a second job on one store is
 * refused), starts a run (a RunRecord and one new shard per worker in the
 * manifest, written once every worker is ready), and hands the subjects that have no valid record to the workers in
 * chunks, on demand; it prints progress (subjects done, failed and left,
 * subjects per hour, time left, each worker's last heartbeat and a warning
 * for a worker silent for longer than silent_after) and, at the end, records
 * the run in the manifest. Workers (every other rank; rank 0 itself when
 * there is one rank) load the model, get the activation bank from the
 * store's cache or compute it in slices and gather it, then for each subject
 * run the methods (record.h), append the record to their shard (store.h)
 * and report. A subject that fails is stored as failed and the run goes on.
 *
 * At the end rank 0 prints what the run cost the service: messages
 * handled and coordinator time per subject, messages and files per subject.
 *
 * SIGTERM and SIGINT: a worker stops within one layer of the forward pass
 * (or DPO training pass) in progress, as the evaluator and DPO's trainer
 * poll between layers, or after the current batch while it computes the
 * activation bank; it abandons its current subject (no record) and exits
 * cleanly; rank 0 marks the run interrupted. A rerun on the same store
 * resumes.
 *
 * Returns 0 when every subject asked for has a record, PA_ECANCELED when
 * stopped by a signal, or a negative PA_E* code with a message.
 */
#ifndef PALIGN_SERVICE_H
#define PALIGN_SERVICE_H

#include "comm.h"
#include "dpo.h"
#include "eval.h"

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

typedef struct {
  const char *model;         /* GGUF file or Hugging Face directory */
  const char *papi;          /* the PAPI directory (IPIP-NEO-120.json, Test-set.json, ...) */
  const char *store;         /* the store directory (created if missing) */
  const char *methods;       /* comma-separated (methods.h); const3 and trait_mean are always added */
  const char *subjects;      /* "all", "N" or "A-B" (inventory.h pa_subjects_range) */
  const char *subjects_file; /* NULL: PAPI/Test-set.json */
  uint64_t seed;
  int threads;           /* per worker; 0: OpenMP's default */
  pa_eval_opts eval;     /* mode, batch, ... (poll is the service's) */
  int holdout_per_trait; /* 0: PAS.md's 6 */
  const double *alphas;  /* the PAS alpha grid; NULL: PAS.md's {0, 1, 2, 4, 6, 8} */
  int n_alphas;
  pa_dpo_opts dpo;        /* DPO's settings (run_seed is taken from seed) */
  int chunk;              /* subjects per hand-out; 0: chosen from the number of subjects and workers */
  double progress_every;  /* seconds between progress lines; 0: 10 */
  double heartbeat_every; /* seconds between a busy worker's heartbeats; 0: 5 */
  double silent_after;    /* seconds without a heartbeat before a worker is reported; 0: 120 */
  FILE *log;              /* progress and messages; NULL: stderr */
  /* The benchmark mode, for measuring the service itself: > 0, workers load
   * no model and, for each subject, sleep a delay drawn from a log-normal
   * distribution of this mean (seconds) and coefficient of variation
   * benchmark_cv, then store the model-free methods only. The store's
   * settings say so: it cannot be mixed with a real run. */
  double benchmark_delay;
  double benchmark_cv;
  uint64_t shard_bytes; /* a worker's shard begins a new part past this size; 0: PA_STORE_SHARD_BYTES */
  const char *backend;  /* "cpu" (NULL too), "cuda" or "auto" (backend.h pa_backend_named); on cuda a worker takes
                           the GPU of its index among the workers on its node */
  const char *weights;  /* "auto" (NULL too), "fp32" or "bf16" (forward.h pa_weight_format) */
} pa_service_opts;

int pa_service_run(pa_comm *comm, const pa_service_opts *o);

/* Set by the SIGTERM/SIGINT handler pa_service_run installs. */
extern volatile sig_atomic_t pa_service_stop_signal;

#endif
