/* methods.h: the things palign evaluates for a subject, by name.
 *
 * A method turns a subject and a list of items into predicted answers. The
 * prompt baselines (none, icl, p2) ask the model under a different system
 * prompt; the model-free rows (const3, trait_mean) need no model. Fitted
 * methods (PAS, DPO) register here the same way.
 */
#ifndef PALIGN_METHODS_H
#define PALIGN_METHODS_H

#include "eval.h"
#include "inventory.h"
#include "metrics.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct {
  const pa_inventory *inv;
  pa_evaluator *ev; /* NULL when no model is loaded */
} pa_method_ctx;

typedef struct {
  const char *name;
  const char *summary;
  bool needs_model;
  /* Predictions for items[0..n) (preds[i].item, .answer, .expected; truth is
   * the caller's); probs: [n][5] or NULL; stats may be NULL. A subject the
   * method cannot handle (p2 without a description) is PA_EINVAL with a
   * message naming the subject. */
  int (*run)(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pred *preds, float *probs,
             pa_eval_stats *stats);
} pa_method;

/* NULL if there is no such method. */
const pa_method *pa_method_find(const char *name);
/* Every method, in a fixed order. */
const pa_method *const *pa_methods(size_t *n);

#endif
