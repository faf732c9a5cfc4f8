/* metrics.h: how a method's answers are judged (PAS.md, "Metric"), and the
 * model-free reference predictors.
 *
 * Per subject and trait: MAE = mean over the evaluated items of that trait
 * with a known true answer of |predicted answer - true answer| on the raw
 * 1..5 scale (no keying). Items whose prediction is unknown are counted
 * separately and left out of the mean, never silently. Per method: the mean
 * over subjects of each trait's MAE, the sum over traits, and 95% intervals
 * over subjects (normal approximation, 1.96 standard errors). Also the keyed
 * trait score (reverse-keyed answers as 6 - answer, averaged over a trait's
 * items), predicted against true: its mean absolute error and Pearson r over
 * subjects.
 *
 * Pure functions, no allocation except where stated; thread-safe.
 */
#ifndef PALIGN_METRICS_H
#define PALIGN_METRICS_H

#include "inventory.h"

#include <stdio.h>

/* One predicted answer. */
typedef struct {
  int item;       /* item number */
  uint8_t truth;  /* the subject's answer, 0 = missing (not scored) */
  uint8_t answer; /* predicted 1..5 (A = 5 ... E = 1), 0 = unknown */
  float expected; /* expected score sum_k p_k * score_k, or NaN where there is none */
} pa_pred;

typedef struct {
  double mae[PA_N_TRAITS];    /* NaN for a trait with no scored item */
  double mae_sum;             /* NaN unless every trait has a value */
  int n_scored[PA_N_TRAITS];  /* known truth, known prediction */
  int n_unknown[PA_N_TRAITS]; /* known truth, unknown prediction */
  int n_missing;              /* items without a true answer */
  double keyed_pred[PA_N_TRAITS], keyed_true[PA_N_TRAITS]; /* mean keyed score over scored items, NaN if none */
} pa_subject_metrics;

/* Scores n predictions (items of `inv`). */
void pa_metrics_subject(const pa_inventory *inv, const pa_pred *preds, int n, pa_subject_metrics *out);

typedef struct {
  int n_subjects;
  double mae[PA_N_TRAITS], mae_ci[PA_N_TRAITS]; /* mean over subjects, half-width of the 95% interval */
  double sum, sum_ci;                           /* over subjects with every trait scored */
  long n_scored, n_unknown;
  double keyed_mae[PA_N_TRAITS], keyed_r[PA_N_TRAITS];
} pa_method_summary;

void pa_metrics_summarise(const pa_subject_metrics *m, int n, pa_method_summary *out);

/* Model-free predictors for a subject's items: `const3` answers 3 to every
 * item; `trait_mean` answers, for an item of trait t, the subject's mean raw
 * answer over the train items of t with a known answer, rounded half up
 * (3 when there is none). Fills preds[i] (item, truth, answer, expected). */
void pa_predict_const3(const pa_subject *s, const int *items, int n, pa_pred *preds);
void pa_predict_trait_mean(const pa_inventory *inv, const pa_subject *s, const int *items, int n, pa_pred *preds);

/* The per-method, per-trait table: one row per method, MAE per trait and the
 * sum with its 95% interval, unknown counts. */
void pa_metrics_print_table(FILE *f, const char *const *names, const pa_method_summary *sums, int n_methods);
/* The keyed trait scores' table (PAS.md: "also reported"): per method and
 * trait, keyed_mae and keyed_r. */
void pa_metrics_print_keyed(FILE *f, const char *const *names, const pa_method_summary *sums, int n_methods);

#endif
