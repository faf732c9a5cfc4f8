#include "methods.h"

#include "prompts.h"
#include "status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int ask(const pa_method_ctx *ctx, const char *system, const int *items, int n, pa_pred *preds, float *probs,
               pa_eval_stats *stats) {
  return pa_evaluator_answer(ctx->ev, ctx->inv, system, items, n, NULL, preds, probs, stats);
}

static int run_none(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pred *preds,
                    float *probs, pa_eval_stats *stats) {
  (void)s;
  return ask(ctx, PA_DEFAULT_SYSTEM, items, n, preds, probs, stats);
}

static int run_icl(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pred *preds,
                   float *probs, pa_eval_stats *stats) {
  char *system = pa_prompt_icl(ctx->inv, s);
  if (!system)
    return PA_ENOMEM;
  int rc = ask(ctx, system, items, n, preds, probs, stats);
  free(system);
  return rc;
}

static int run_p2(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pred *preds,
                  float *probs, pa_eval_stats *stats) {
  if (!s->description)
    return pa_error(PA_EINVAL, "subject %s has no P2 description (personality_prompt.json)", s->id);
  return ask(ctx, s->description, items, n, preds, probs, stats);
}

static int run_const3(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pred *preds,
                      float *probs, pa_eval_stats *stats) {
  (void)ctx, (void)probs;
  pa_predict_const3(s, items, n, preds);
  if (stats)
    *stats = (pa_eval_stats){0};
  return PA_OK;
}

static int run_trait_mean(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pred *preds,
                          float *probs, pa_eval_stats *stats) {
  (void)probs;
  pa_predict_trait_mean(ctx->inv, s, items, n, preds);
  if (stats)
    *stats = (pa_eval_stats){0};
  return PA_OK;
}

static const pa_method none = {"none", "the model under the default system prompt", true, run_none};
static const pa_method icl = {"icl", "the model under the subject's in-context (train answers) prompt", true, run_icl};
static const pa_method p2 = {"p2", "the model under the subject's written personality description", true, run_p2};
static const pa_method const3 = {"const3", "always answers 3 (no model)", false, run_const3};
static const pa_method trait_mean = {"trait_mean", "the subject's rounded mean train answer per trait (no model)",
                                     false, run_trait_mean};

static const pa_method *const all[] = {&none, &icl, &p2, &const3, &trait_mean};

const pa_method *const *pa_methods(size_t *n) {
  *n = sizeof all / sizeof all[0];
  return all;
}

const pa_method *pa_method_find(const char *name) {
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    if (!strcmp(all[i]->name, name))
      return all[i];
  return NULL;
}
