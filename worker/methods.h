/* methods.h: the things palign evaluates for a subject, by name.
 *
 * A method turns a subject and a list of items into predicted answers,
 * reported as one or more rows: the prompt baselines (none, icl, p2) and the
 * model-free rows (const3, trait_mean) report one row over all items; PAS
 * reports one row per alpha-selection protocol (`pas (reference)` over all
 * items, `pas (holdout)` over the items the holdout protocol reports on).
 * DPO reports one row (`dpo` under the default prompt, `dpo_icl` under the
 * ICL prompt), both with the subject's adapter, trained once for both.
 */
#ifndef PALIGN_METHODS_H
#define PALIGN_METHODS_H

#include "dpo.h"
#include "eval.h"
#include "inventory.h"
#include "metrics.h"
#include "pas.h"

#include <stdbool.h>
#include <stddef.h>

#define PA_METHOD_MAX_ROWS 2

typedef struct {
  const pa_inventory *inv;
  pa_evaluator *ev;          /* NULL when no model is loaded */
  const pa_pas_bank *bank;   /* the activation bank, when a PAS method runs */
  pa_pas_run_opts pas;       /* PAS settings (seed, grid, ...) */
  pa_pas_result *pas_result; /* the last subject's PAS result: pas and pas_only share one fit */
  pa_dpo_opts dpo;           /* DPO settings */
  pa_dpo_result *dpo_result; /* the last subject's DPO adapter: dpo and dpo_icl share one */
} pa_method_ctx;

/* What a method reports for one subject. The caller provides preds[r] and
 * probs[r] with room for every item; row r fills n[r] of them. */
typedef struct {
  int n_rows;
  char name[PA_METHOD_MAX_ROWS][48];
  int n[PA_METHOD_MAX_ROWS];
  pa_pred *preds[PA_METHOD_MAX_ROWS];
  float *probs[PA_METHOD_MAX_ROWS]; /* [n][5] option probabilities, or NaN where there are none */
  pa_eval_stats stats;
} pa_method_out;

typedef struct {
  const char *name;
  const char *summary;
  bool needs_model;
  bool needs_bank;
  bool needs_dpo; /* trains the subject's DPO adapter (ctx->dpo_result) */
  /* Fills out's rows for items[0..n) (preds' item, answer, expected; truth
   * is the caller's). A subject the method cannot handle (p2 without a
   * description) is PA_EINVAL with a message naming the subject. */
  int (*run)(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out);
} pa_method;

/* NULL if there is no such method. */
const pa_method *pa_method_find(const char *name);
/* The methods a comma-separated list names, each once, in the list's order,
 * followed by the model-free rows (const3, trait_mean) when not named; at
 * most cap. Returns their number, or PA_EINVAL naming an unknown method (or
 * a list that is empty or longer than cap). */
int pa_methods_parse(const char *list, const pa_method **out, int cap);

/* The PAS variants (pa_pas_run_opts.variants bits) that methods[0..n) ask for. */
unsigned pa_methods_pas_variants(const pa_method *const *methods, int n);
/* Every method, in a fixed order. */
const pa_method *const *pa_methods(size_t *n);

#endif
