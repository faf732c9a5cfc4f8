/* probe.h: PAS's probes, head selection and directions for one subject
 * (PAS.md "PAS, step by step", steps 2-5; the exact algorithms are in
 * docs/PROBES.md).
 *
 * Input is the activation bank (step 1, computed elsewhere): for each of
 * n_items train items in bank order (pa_pas_bank_items) two sequences,
 * 2i ending in the answer letter A and 2i+1 ending in E, each with the head
 * outputs z[l][h] (head_dim floats) at that last token. From the subject's
 * answers to those items the fit
 *   - labels the sequences (step 2): for an answer v not in {0, 3}, the A
 *     sequence gets label 1 if v > 3 else 0 and the E sequence the other;
 *   - splits the labelled samples 60/40 into train/validation with a seed
 *     derived from (run seed, subject id) (step 3, reproducible);
 *   - fits, for every (layer, head), sklearn's L2 logistic regression
 *     (minimise 0.5 |w|^2 + C sum_i log(1 + exp(-s_i (w.x_i + b))), s_i = +-1,
 *     intercept b not penalised) to convergence by Newton's method in double
 *     precision; score = (train accuracy + validation accuracy) / 2;
 *   - selects the top_k heads (step 4) by score, ties to the lower layer, then
 *     the lower head, skipping heads whose direction is zero;
 *   - gives each selected head a unit direction (mean of label-1 minus mean of
 *     label-0 activations over all labelled samples) and sigma (population
 *     standard deviation of all labelled samples' projections on it) (step 5).
 *
 * A subject the probes cannot be fitted for (no answer outside {0, 3}, or a
 * training part holding only one class: the unpenalised intercept would run
 * to infinity) is not an error: the call returns 0 with status set to a
 * pa_pas_status other than PA_PAS_FITTED, a message, and no heads. Nothing
 * the fit writes is ever NaN.
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h): PA_EINVAL for
 * a bad argument (shapes, an answer outside 0..5, a non-finite activation in
 * a labelled sequence, C <= 0), PA_ENOMEM.
 *
 * Threads: pa_pas_fit_subject fits the heads in parallel with OpenMP; each
 * head is computed by one thread in a fixed order, so results are
 * bit-identical for every thread count. Functions are reentrant; one
 * pa_pas_fit must not be used by two calls at once.
 */
#ifndef PALIGN_PROBE_H
#define PALIGN_PROBE_H

#include "inventory.h"

#include <stdint.h>

#define PA_PAS_TOP_K    24  /* PAS.md step 4 */
#define PA_PAS_MAX_ITER 100 /* Newton steps; the real bank needs at most 5 */

/* The activation bank: z[s][l][h][d] at ((s * n_layers + l) * n_heads + h) *
 * head_dim + d, for s < 2 * n_items. Borrowed, read-only. */
typedef struct {
  const float *z;
  int n_items, n_layers, n_heads, head_dim;
} pa_pas_bank;

/* Zero fields take the defaults. */
typedef struct {
  uint64_t run_seed; /* with the subject id, seeds the split */
  int top_k;         /* heads to select; 0: PA_PAS_TOP_K */
  double C;          /* inverse regularisation strength (> 0); 0: 1.0 */
  int max_iter;      /* Newton iterations at most; 0: PA_PAS_MAX_ITER */
  int n_threads;     /* 0: OpenMP's default */
} pa_pas_opts;

typedef enum {
  PA_PAS_FITTED = 0,
  PA_PAS_NO_SAMPLES, /* every answer is 0 (missing) or 3 (neutral): nothing to label */
  PA_PAS_ONE_CLASS,  /* the training part of the split holds only one label */
} pa_pas_status;

const char *pa_pas_status_str(pa_pas_status s); /* "fitted", "no samples", "one class" */

/* One (layer, head)'s probe. */
typedef struct {
  double score, train_acc, val_acc;
  int train_correct, val_correct; /* samples classified right (predict 1 iff w.x + b > 0) */
  int iterations;                 /* Newton steps taken */
  int dual_steps;                 /* of which solved through the samples' system (fewer samples than dimensions) */
  double grad_max;                /* largest |gradient component| of the objective at the end */
  int converged;                  /* 1: the gradient fell to <= 1e-10 * max(1, C sum_i max_d |x_id|), after which one
                                     more Newton step was taken; 0: max_iter, or no step could lower the objective */
} pa_pas_probe;

/* One selected head. */
typedef struct {
  int layer, head;
  double score, train_acc, val_acc;
  float *direction; /* [head_dim], unit length (in double, before rounding to float); owned by the fit */
  double sigma;     /* population sd of the labelled samples' projections, > 0 */
} pa_pas_head;

/* A subject's fit. Zero it before the first pa_pas_fit_subject; a later call
 * on the same object reuses its memory when the bank's shape allows. */
typedef struct {
  pa_pas_status status;
  char message[256]; /* what was fitted, or why not */
  int n_layers, n_heads, head_dim;
  uint64_t split_seed;

  int n_samples, n_train, n_val;
  int *sample_seq;       /* [n_samples] bank sequence of each labelled sample, ascending */
  uint8_t *sample_label; /* [n_samples] 0 or 1 */
  uint8_t *sample_val;   /* [n_samples] 1: in the validation part */

  /* Every head's probe, (layer, head) order: index l * n_heads + h. All zero
   * unless status is PA_PAS_FITTED. */
  pa_pas_probe *probes; /* [n_layers * n_heads] */
  double *coef;         /* [n_layers * n_heads][head_dim + 1]: w, then the intercept b */

  int n_selected;     /* <= top_k: fewer when fewer heads have a non-zero direction */
  pa_pas_head *heads; /* [n_selected], best first */
  double seconds;     /* wall time of the fit */

  /* private: the directions' storage, and what the buffers can hold (for reuse) */
  float *dir_block;
  int cap_samples, cap_probes, cap_coef, cap_heads, cap_dirs;
} pa_pas_fit;

/* Steps 2-5 for one subject. answers[i] (0..5) is the subject's answer to the
 * bank's item i. subject_id is the PAPI case id as text ("172481"). opts may
 * be NULL (all defaults, run seed 0). */
int pa_pas_fit_subject(const pa_pas_bank *bank, const uint8_t *answers, const char *subject_id, const pa_pas_opts *opts,
                       pa_pas_fit *out);

/* Frees what a fit holds and zeroes it; accepts NULL and a zeroed fit. */
void pa_pas_fit_free(pa_pas_fit *f);

/* The steering displacement of PAS.md step 6 in the layout pa_batch.steer
 * takes: delta [n_layers][n_heads][head_dim] is zero-filled, then
 * (float)(alpha * sigma * direction[d]) is added for every selected head.
 * A fit without heads gives all zeros. PA_EINVAL if the shape is not the
 * fit's. */
int pa_pas_steering(const pa_pas_fit *f, double alpha, int n_layers, int n_heads, int head_dim, float *delta);

/* ---- the pieces, exposed so that tests and the golden script can check each ---- */

/* The bank's item order (PAS.md step 1): the inventory's train items, trait by
 * trait in the order A, C, E, N, O, in train_index order within a trait.
 * Writes up to cap item numbers; returns their count, or PA_EINVAL if cap is
 * too small. */
int pa_pas_bank_items(const pa_inventory *inv, int *items, int cap);

/* mix64(run_seed XOR fnv1a64(subject_id's bytes)): splitmix64's output
 * function applied once; the split's seed. */
uint64_t pa_pas_split_seed(uint64_t run_seed, const char *subject_id);

/* Fisher-Yates over perm[0..n-1] = 0..n-1 driven by a splitmix64 stream from
 * seed: for i = n-1 down to 1, j uniform in [0, i] (draws r below 2^64 mod
 * (i+1) are rejected, then j = r mod (i+1)), swap perm[i] and perm[j]. */
void pa_pas_shuffle(uint64_t seed, int n, int *perm);

/* Validation size: ceil(0.4 n) (sklearn's train_test_split with test_size 0.4). */
int pa_pas_n_val(int n);

/* One L2 logistic regression, as above: Newton's method from w = 0, b = 0
 * with a Cholesky solve and backtracking. X [n][d] row-major, y[i] in {0, 1}
 * with both values present (else PA_EINVAL), C > 0, max_iter >= 1. wb [d + 1]
 * receives w, then b. info may be NULL; only its iterations, dual_steps,
 * grad_max and converged are written. scratch holds pa_pas_logreg_scratch(n, d) doubles,
 * or is NULL (then it is allocated). The Hessian's product and its
 * factorisation are OpenBLAS's: with OpenBLAS on one thread (as
 * pa_pas_fit_subject and pa_lm_create set it) the call runs on the calling
 * thread and the same inputs give the same bits. */
int pa_pas_logreg(const double *X, const uint8_t *y, int n, int d, double C, int max_iter, double *wb,
                  pa_pas_probe *info, double *scratch);
size_t pa_pas_logreg_scratch(int n, int d);

#endif
