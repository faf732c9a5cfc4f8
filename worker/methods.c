#include "methods.h"

#include "prompts.h"
#include "status.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One row over all items, named after the method. */
static void one_row(pa_method_out *out, const char *name, int n) {
  out->n_rows = 1;
  snprintf(out->name[0], sizeof out->name[0], "%s", name);
  out->n[0] = n;
}

static int ask(const pa_method_ctx *ctx, const char *name, const char *system, const int *items, int n,
               pa_method_out *out) {
  one_row(out, name, n);
  return pa_evaluator_answer(ctx->ev, ctx->inv, system, items, n, NULL, out->preds[0], out->probs[0], &out->stats);
}

static int run_none(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  (void)s;
  return ask(ctx, "none", PA_DEFAULT_SYSTEM, items, n, out);
}

static int run_icl(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  char *system = pa_prompt_icl(ctx->inv, s);
  if (!system)
    return PA_ENOMEM;
  int rc = ask(ctx, "icl", system, items, n, out);
  free(system);
  return rc;
}

static int run_p2(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  if (!s->description)
    return pa_error(PA_EINVAL, "subject %s has no P2 description (personality_prompt.json)", s->id);
  return ask(ctx, "p2", s->description, items, n, out);
}

static void no_probs(pa_method_out *out, int n) {
  if (out->probs[0])
    for (int i = 0; i < n * 5; i++)
      out->probs[0][i] = NAN;
  out->stats = (pa_eval_stats){0};
}

static int run_const3(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  (void)ctx;
  one_row(out, "const3", n);
  pa_predict_const3(s, items, n, out->preds[0]);
  no_probs(out, n);
  return PA_OK;
}

static int run_trait_mean(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  one_row(out, "trait_mean", n);
  pa_predict_trait_mean(ctx->inv, s, items, n, out->preds[0]);
  no_probs(out, n);
  return PA_OK;
}

/* PAS for one variant: fits (or reuses the fit of the other variant for the
 * same subject), then reports the chosen alpha's answers per protocol. */
static int run_pas_variant(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_pas_variant v,
                           const char *name, pa_method_out *out) {
  pa_pas_result *r = ctx->pas_result;
  out->stats = (pa_eval_stats){0};
  if (strcmp(r->subject_id, s->id) != 0 || r->n_items != n || memcmp(r->items, items, (size_t)n * sizeof *items)) {
    int rc = pa_pas_run_subject(ctx->ev, ctx->inv, ctx->bank, s, &ctx->pas, r);
    if (rc)
      return rc;
    out->stats = r->eval;
  }
  if (r->status == PA_PAS_FITTED && r->chosen[v][0].index < 0)
    return pa_error(PA_EINVAL, "subject %s: PAS was run without the %s variant (pa_pas_run_opts.variants)", s->id,
                    name);
  if (r->status != PA_PAS_FITTED)
    return pa_error(PA_EINVAL, "subject %s: PAS cannot be fitted: %s", s->id, r->message);
  out->n_rows = PA_PAS_N_PROTOCOLS;
  for (int p = 0; p < PA_PAS_N_PROTOCOLS; p++) {
    const int a = r->chosen[v][p].index;
    const pa_pred *preds = r->preds + ((size_t)v * r->n_alphas + a) * r->n_items;
    const float *probs = r->probs + ((size_t)v * r->n_alphas + a) * r->n_items * 5;
    snprintf(out->name[p], sizeof out->name[p], "%s (%s)", name, pa_pas_protocol_name(p));
    int k = 0;
    for (int i = 0; i < r->n_items; i++) {
      /* the holdout protocol reports on the items it did not choose alpha with */
      if (p == PA_PAS_PROTO_HOLDOUT && r->in_select[i])
        continue;
      out->preds[p][k] = preds[i];
      if (out->probs[p])
        memcpy(out->probs[p] + (size_t)k * 5, probs + (size_t)i * 5, 5 * sizeof *probs);
      k++;
    }
    out->n[p] = k;
  }
  return PA_OK;
}

static int run_pas(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  return run_pas_variant(ctx, s, items, n, PA_PAS_VAR_PAS, "pas", out);
}

static int run_pas_only(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  return run_pas_variant(ctx, s, items, n, PA_PAS_VAR_ONLY, "pas_only", out);
}

/* DPO: trains the subject's adapter (or reuses the one the other DPO method
 * trained for the same subject), then asks with it switched on. */
static int run_dpo_prompt(const pa_method_ctx *ctx, const pa_subject *s, const char *name, const char *system,
                          const int *items, int n, pa_method_out *out) {
  pa_dpo_result *r = ctx->dpo_result;
  if (!r)
    return pa_error(PA_EINVAL, "%s: no DPO result slot (pa_method_ctx.dpo_result)", name);
  if (!r->adapter || strcmp(r->subject_id, s->id) != 0) {
    int rc = pa_dpo_train(ctx->ev, ctx->inv, s, &ctx->dpo, r);
    if (rc)
      return rc;
  }
  pa_evaluator_set_lora(ctx->ev, r->adapter);
  int rc = ask(ctx, name, system, items, n, out);
  pa_evaluator_set_lora(ctx->ev, NULL);
  return rc;
}

static int run_dpo(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  return run_dpo_prompt(ctx, s, "dpo", PA_DEFAULT_SYSTEM, items, n, out);
}

static int run_dpo_icl(const pa_method_ctx *ctx, const pa_subject *s, const int *items, int n, pa_method_out *out) {
  char *system = pa_prompt_icl(ctx->inv, s);
  if (!system)
    return pa_error(PA_ENOMEM, "no memory");
  int rc = run_dpo_prompt(ctx, s, "dpo_icl", system, items, n, out);
  free(system);
  return rc;
}

static const pa_method none = {"none", "the model under the default system prompt", true, false, false, run_none};
static const pa_method icl = {
    "icl", "the model under the subject's in-context (train answers) prompt", true, false, false, run_icl};
static const pa_method p2 = {"p2",  "the model under the subject's written personality description", true, false, false,
                             run_p2};
static const pa_method pas = {"pas",  "ICL prompt + PAS head steering, alpha chosen per protocol", true, true, false,
                              run_pas};
static const pa_method pas_only = {"pas_only",  "default prompt + PAS head steering (ablation)", true, true, false,
                                   run_pas_only};
static const pa_method dpo = {"dpo", "default prompt + the subject's LoRA-DPO adapter", true, false, true, run_dpo};
static const pa_method dpo_icl = {"dpo_icl",  "ICL prompt + the subject's LoRA-DPO adapter", true, false, true,
                                  run_dpo_icl};
static const pa_method const3 = {"const3", "always answers 3 (no model)", false, false, false, run_const3};
static const pa_method trait_mean = {
    "trait_mean", "the subject's rounded mean train answer per trait (no model)", false, false, false, run_trait_mean};

static const pa_method *const all[] = {&none, &icl, &p2, &pas, &pas_only, &dpo, &dpo_icl, &const3, &trait_mean};

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

unsigned pa_methods_pas_variants(const pa_method *const *methods, int n) {
  unsigned v = 0;
  for (int i = 0; i < n; i++)
    v |= methods[i] == &pas ? 1u << PA_PAS_VAR_PAS : methods[i] == &pas_only ? 1u << PA_PAS_VAR_ONLY : 0;
  return v;
}

int pa_methods_parse(const char *list, const pa_method **out, int cap) {
  int n = 0;
  const char *p = list ? list : "";
  while (*p) {
    size_t len = strcspn(p, ",");
    char name[48];
    snprintf(name, sizeof name, "%.*s", (int)(len < sizeof name ? len : sizeof name - 1), p);
    const pa_method *m = pa_method_find(name);
    if (!m)
      return pa_error(PA_EINVAL,
                      "unknown method '%s' (one of none, icl, p2, pas, pas_only, dpo, dpo_icl, const3, trait_mean)",
                      name);
    bool dup = false;
    for (int j = 0; j < n; j++)
      dup |= out[j] == m;
    if (!dup && n == cap)
      return pa_error(PA_EINVAL, "too many methods in '%s'", list);
    if (!dup)
      out[n++] = m;
    p += len + (p[len] == ',');
  }
  if (n == 0)
    return pa_error(PA_EINVAL, "no method named in '%s'", list ? list : "");
  for (int k = 0; k < 2; k++) {
    bool have = false;
    for (int j = 0; j < n; j++)
      have |= out[j] == (k ? &trait_mean : &const3);
    if (!have && n == cap)
      return pa_error(PA_EINVAL, "too many methods in '%s'", list);
    if (!have)
      out[n++] = k ? &trait_mean : &const3;
  }
  return n;
}
