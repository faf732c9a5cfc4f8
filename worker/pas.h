/* pas.h: PAS for one subject, end to end from the activation bank (PAS.md
 * "PAS, step by step", steps 6-8, and "Metric").
 *
 * pa_pas_run_subject fits the subject's probes (probe.h, steps 2-5), then for
 * every alpha of the grid and for both variants
 *   - PA_PAS_VAR_PAS      (`pas`):      system prompt = the subject's ICL prompt,
 *   - PA_PAS_VAR_ONLY     (`pas_only`): system prompt = PA_DEFAULT_SYSTEM,
 * answers every test item (the inventory's test split, in split order) with
 * the steering displacement pa_pas_steering(fit, alpha). Alpha 0 is run with
 * no steering at all (steer = NULL), so its answers are exactly the `icl`
 * and `none` baselines'. Everything is kept: per variant, alpha and item the
 * prediction (letter, expected score, the subject's answer as truth) and the
 * five option probabilities.
 *
 * Alpha selection (step 7), per variant, by the sum over traits of the MAE
 * of the predicted letters (metrics.h):
 *   - PA_PAS_PROTO_REFERENCE: chosen on all test items and reported on the
 *     same items (the paper's way; it leaks the test set);
 *   - PA_PAS_PROTO_HOLDOUT: chosen on a fixed selection set
 *     (pa_pas_holdout_select: holdout_per_trait items of each trait, 6 by
 *     default, 30 in all), reported on the other test items (150).
 * Ties go to the smaller alpha (the earlier one in grid order, for a grid that
 * is not ascending). A sum that is NaN (a trait without a scored item in the
 * choosing set) loses to every number; when all are NaN the first alpha of
 * the grid is taken.
 *
 * A subject whose probes cannot be fitted (pa_pas_fit status other than
 * PA_PAS_FITTED) is not an error: the call returns 0, the result has the
 * status and the fit's message, n_alphas = 0, no alpha rows (alphas, preds,
 * probs and the metrics arrays NULL; items and in_select are filled), every
 * number zero (no NaN) and chosen[][].index -1.
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h): PA_EINVAL
 * (bad arguments, an unusable subject, a bank not made for this inventory,
 * a grid with a non-finite or repeated alpha, a trait with no more than
 * holdout_per_trait test items), PA_ENOMEM, and whatever the fit and the
 * evaluator return. On error the result is freed (zeroed).
 *
 * Threads: one evaluator is used by one thread at a time, so one
 * pa_pas_run_subject per evaluator at a time. Deterministic: the same inputs
 * give bit-identical results.
 */
#ifndef PALIGN_PAS_H
#define PALIGN_PAS_H

#include "eval.h"
#include "inventory.h"
#include "metrics.h"
#include "probe.h"

#include <stdint.h>

#define PA_PAS_MAX_ALPHAS        64
#define PA_PAS_HOLDOUT_PER_TRAIT 6 /* PAS.md step 7: 6 per trait, 30 in all */

/* The default alpha grid (PAS.md step 7). */
extern const double pa_pas_default_alphas[6]; /* {0, 1, 2, 4, 6, 8} */

typedef enum { PA_PAS_VAR_PAS = 0, PA_PAS_VAR_ONLY = 1, PA_PAS_N_VARIANTS = 2 } pa_pas_variant;
typedef enum { PA_PAS_PROTO_REFERENCE = 0, PA_PAS_PROTO_HOLDOUT = 1, PA_PAS_N_PROTOCOLS = 2 } pa_pas_protocol;

const char *pa_pas_variant_name(pa_pas_variant v);   /* "pas", "pas_only" */
const char *pa_pas_protocol_name(pa_pas_protocol p); /* "reference", "holdout" */

/* Zero fields take the defaults. */
typedef struct {
  uint64_t run_seed;     /* seeds the probes' split (with the subject id) and the holdout set (alone) */
  int top_k;             /* heads; 0: PA_PAS_TOP_K */
  double C;              /* probes' inverse regularisation; 0: 1.0 */
  int max_iter;          /* 0: PA_PAS_MAX_ITER */
  int n_threads;         /* for the fit; 0: OpenMP's default */
  const double *alphas;  /* the grid (finite, distinct); NULL: pa_pas_default_alphas */
  int n_alphas;          /* with alphas; 1..PA_PAS_MAX_ALPHAS */
  int holdout_per_trait; /* selection items per trait; 0: PA_PAS_HOLDOUT_PER_TRAIT */
  /* which variants to evaluate, bits 1 << pa_pas_variant; 0: both. A variant
   * left out keeps zeroed rows (answers 0) and chosen index -1. */
  unsigned variants;
} pa_pas_run_opts;

/* One protocol's outcome for one variant. */
typedef struct {
  int index;                  /* into alphas; -1 for an unfitted subject */
  double alpha;               /* alphas[index] */
  double select_mae_sum;      /* the choosing set's MAE sum at the chosen alpha (0 if NaN) */
  pa_subject_metrics metrics; /* on the report set, at the chosen alpha */
} pa_pas_choice;

typedef struct {
  char subject_id[32];
  uint64_t run_seed;
  pa_pas_status status; /* PA_PAS_FITTED, or why the probes could not be fitted */
  char message[256];
  pa_pas_fit fit; /* heads, directions, sigmas (owned) */

  int n_alphas;
  double *alphas; /* [n_alphas] the grid, as given */
  int n_items;
  int *items; /* [n_items] the test items, split order */
  /* [n_items] 1: in the holdout protocol's selection set, 0: in its report set */
  uint8_t *in_select;
  int holdout_per_trait;

  /* By variant v, alpha a and item i: index (v * n_alphas + a) * n_items + i. */
  pa_pred *preds; /* truth = the subject's answer */
  float *probs;   /* [.. * 5] option probabilities A..E */
  /* [v * n_alphas + a]: metrics of each alpha on all test items, on the
   * selection set and on the report set */
  pa_subject_metrics *m_all, *m_select, *m_report;

  pa_pas_choice chosen[PA_PAS_N_VARIANTS][PA_PAS_N_PROTOCOLS];

  double fit_seconds, eval_seconds; /* wall time */
  pa_eval_stats eval;               /* summed over all evaluator calls (seconds included) */
} pa_pas_result;

/* Steps 2-8 for subject s. bank is the activation bank of inv (pa_bank_view);
 * ev answers with the model the bank was made with. o may be NULL. out must
 * be zeroed or a result from an earlier call (its contents are freed). */
int pa_pas_run_subject(pa_evaluator *ev, const pa_inventory *inv, const pa_pas_bank *bank, const pa_subject *s,
                       const pa_pas_run_opts *o, pa_pas_result *out);

/* A grid written as "0,2,4" (finite, distinct, 1..PA_PAS_MAX_ALPHAS numbers)
 * into alphas[PA_PAS_MAX_ALPHAS]; returns the count or PA_EINVAL with a
 * message quoting the text. */
int pa_pas_parse_alphas(const char *text, double *alphas);

/* Frees what a result holds and zeroes it; accepts NULL and a zeroed result. */
void pa_pas_result_free(pa_pas_result *r);

/* The holdout protocol's selection set; the same for every subject of a run.
 * For each trait t in the order A, C, E, N, O: the trait's test items in
 * split order, positions 0..n_t-1, permuted by pa_pas_shuffle(run_seed ^ t,
 * n_t, perm) (probe.h: splitmix64-driven Fisher-Yates); the items at
 * perm[0..per_trait-1] are selected. in_select[i] (for the i-th test item in
 * split order) is set to 1 for a selected item, else 0. PA_EINVAL if
 * per_trait < 1 or a trait has no more than per_trait test items (nothing
 * would be left to report). Returns the number selected (5 * per_trait). */
int pa_pas_holdout_select(const pa_inventory *inv, uint64_t run_seed, int per_trait, uint8_t *in_select);
/* PA_OK when per_trait (0: PA_PAS_HOLDOUT_PER_TRAIT) leaves every trait of
 * inv a test item to report; otherwise pa_pas_holdout_select's PA_EINVAL,
 * naming the trait and the flag: what a run checks before it computes. */
int pa_pas_holdout_check(const pa_inventory *inv, int per_trait);

/* The selection rule: the index of the alpha with the fewest unknown answers
 * on the choosing set (unknown[a]; NULL: none anywhere), among those the
 * smallest mae_sums[a] (NaN loses to every number), ties to the smaller
 * alphas[a], then the earlier index (so 0 when every sum is NaN and the
 * unknown counts are equal). An alpha that makes
 * the model's answers unreadable (generate mode) cannot win on the few it
 * still answers. n >= 1. */
int pa_pas_choose_alpha(const double *alphas, const double *mae_sums, const long *unknown, int n);

#endif
