/* pas.c: PAS for one subject (pas.h). */
#include "pas.h"

#include "prompts.h"
#include "status.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const double pa_pas_default_alphas[6] = {0, 1, 2, 4, 6, 8};

const char *pa_pas_variant_name(pa_pas_variant v) {
  switch (v) {
  case PA_PAS_VAR_PAS: return "pas";
  case PA_PAS_VAR_ONLY: return "pas_only";
  default: return "?";
  }
}

const char *pa_pas_protocol_name(pa_pas_protocol p) {
  switch (p) {
  case PA_PAS_PROTO_REFERENCE: return "reference";
  case PA_PAS_PROTO_HOLDOUT: return "holdout";
  default: return "?";
  }
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

void pa_pas_result_free(pa_pas_result *r) {
  if (!r)
    return;
  pa_pas_fit_free(&r->fit);
  free(r->alphas);
  free(r->items);
  free(r->in_select);
  free(r->preds);
  free(r->probs);
  free(r->m_all);
  free(r->m_select);
  free(r->m_report);
  memset(r, 0, sizeof *r);
}

int pa_pas_holdout_check(const pa_inventory *inv, int per_trait) {
  int n_test;
  pa_inventory_test(inv, &n_test);
  uint8_t *scratch = malloc((size_t)n_test + 1);
  if (!scratch)
    return pa_error(PA_ENOMEM, "holdout: out of memory");
  const int per = per_trait ? per_trait : PA_PAS_HOLDOUT_PER_TRAIT, n = pa_pas_holdout_select(inv, 0, per, scratch);
  free(scratch);
  return n < 0 ? pa_error_prefix(n, "--holdout %d: ", per) : PA_OK;
}

int pa_pas_holdout_select(const pa_inventory *inv, uint64_t run_seed, int per_trait, uint8_t *in_select) {
  if (!inv || !in_select)
    return pa_error(PA_EINVAL, "pa_pas_holdout_select: NULL argument");
  if (per_trait < 1)
    return pa_error(PA_EINVAL, "holdout: %d selection items per trait (need at least 1)", per_trait);
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  int *pos = malloc(((size_t)n_test + 1) * sizeof *pos), *perm = malloc(((size_t)n_test + 1) * sizeof *perm);
  if (!pos || !perm) {
    free(pos), free(perm);
    return pa_error(PA_ENOMEM, "holdout: out of memory");
  }
  memset(in_select, 0, (size_t)n_test);
  int total = 0;
  for (int t = 0; t < PA_N_TRAITS; t++) {
    int n_t = 0;
    for (int i = 0; i < n_test; i++) {
      const pa_item *it = pa_inventory_item(inv, test[i]);
      if (it && (int)it->trait == t)
        pos[n_t++] = i;
    }
    if (n_t <= per_trait) {
      free(pos), free(perm);
      return pa_error(PA_EINVAL,
                      "trait %c has %d test items; the holdout protocol needs %d to choose alpha and one to report",
                      pa_trait_letter((pa_trait)t), n_t, per_trait);
    }
    pa_pas_shuffle(run_seed ^ (uint64_t)t, n_t, perm);
    for (int k = 0; k < per_trait; k++)
      in_select[pos[perm[k]]] = 1;
    total += per_trait;
  }
  free(pos), free(perm);
  return total;
}

/* Metrics of preds[0..n) restricted to the items with mask[i] == want (mask
 * NULL: all). buf holds n preds. */
static void metrics_subset(const pa_inventory *inv, const pa_pred *preds, int n, const uint8_t *mask, int want,
                           pa_pred *buf, pa_subject_metrics *out) {
  int m = 0;
  for (int i = 0; i < n; i++)
    if (!mask || mask[i] == want)
      buf[m++] = preds[i];
  pa_metrics_subject(inv, buf, m, out);
}

int pa_pas_choose_alpha(const double *alphas, const double *mae_sums, const long *unknown, int n) {
  int best = 0;
  for (int a = 1; a < n; a++) {
    const long u = unknown ? unknown[a] : 0, ub = unknown ? unknown[best] : 0;
    if (u != ub) {
      if (u < ub)
        best = a;
      continue;
    }
    double s = mae_sums[a], b = mae_sums[best];
    if (isnan(s))
      continue;
    if (isnan(b) || s < b || (s == b && alphas[a] < alphas[best]))
      best = a;
  }
  return best;
}

static int choose(const double *alphas, const pa_subject_metrics *ms, int n) {
  double sums[PA_PAS_MAX_ALPHAS];
  long unknown[PA_PAS_MAX_ALPHAS];
  for (int a = 0; a < n; a++) {
    sums[a] = ms[a].mae_sum;
    unknown[a] = 0;
    for (int t = 0; t < PA_N_TRAITS; t++)
      unknown[a] += ms[a].n_unknown[t];
  }
  return pa_pas_choose_alpha(alphas, sums, unknown, n);
}

static void stats_add(pa_eval_stats *sum, const pa_eval_stats *st) {
  sum->prefix_tokens += st->prefix_tokens;
  sum->question_tokens += st->question_tokens;
  sum->naive_tokens += st->naive_tokens;
  sum->prompts += st->prompts;
  sum->seconds += st->seconds;
}

int pa_pas_run_subject(pa_evaluator *ev, const pa_inventory *inv, const pa_pas_bank *bank, const pa_subject *s,
                       const pa_pas_run_opts *o, pa_pas_result *out) {
  if (!out)
    return pa_error(PA_EINVAL, "pa_pas_run_subject: NULL result");
  pa_pas_result_free(out);
  if (!ev || !inv || !bank || !s)
    return pa_error(PA_EINVAL, "pa_pas_run_subject: NULL argument");
  static const pa_pas_run_opts defaults = {0};
  if (!o)
    o = &defaults;
  if (!s->usable)
    return pa_error(PA_EINVAL, "PAS: subject %s is not usable: %s", s->id, s->reason);
  const double *alphas = o->alphas ? o->alphas : pa_pas_default_alphas;
  const int n_alphas = o->alphas ? o->n_alphas : (int)(sizeof pa_pas_default_alphas / sizeof *pa_pas_default_alphas);
  if (n_alphas < 1 || n_alphas > PA_PAS_MAX_ALPHAS)
    return pa_error(PA_EINVAL, "PAS: %d alphas (1..%d)", n_alphas, PA_PAS_MAX_ALPHAS);
  for (int a = 0; a < n_alphas; a++) {
    if (!isfinite(alphas[a]))
      return pa_error(PA_EINVAL, "PAS: alpha %d is not finite", a);
    for (int b = 0; b < a; b++)
      if (alphas[b] == alphas[a])
        return pa_error(PA_EINVAL, "PAS: alpha %g is in the grid twice", alphas[a]);
  }
  const int per_trait = o->holdout_per_trait ? o->holdout_per_trait : PA_PAS_HOLDOUT_PER_TRAIT;
  const unsigned variants = o->variants ? o->variants : (1u << PA_PAS_N_VARIANTS) - 1;

  int rc = PA_OK;
  int *bank_items = NULL;
  uint8_t *answers = NULL;
  float *delta = NULL;
  pa_pred *buf = NULL;
  char *icl = NULL;

  snprintf(out->subject_id, sizeof out->subject_id, "%s", s->id);
  out->run_seed = o->run_seed;
  out->holdout_per_trait = per_trait;

  /* the test items and the holdout split (checked before the costly parts) */
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  if (n_test < 1) {
    rc = pa_error(PA_EINVAL, "PAS: the inventory has no test items");
    goto fail;
  }
  out->items = malloc((size_t)n_test * sizeof *out->items);
  out->in_select = malloc((size_t)n_test);
  if (!out->items || !out->in_select) {
    rc = pa_error(PA_ENOMEM, "PAS: out of memory");
    goto fail;
  }
  memcpy(out->items, test, (size_t)n_test * sizeof *test);
  out->n_items = n_test;
  rc = pa_pas_holdout_select(inv, o->run_seed, per_trait, out->in_select);
  if (rc < 0)
    goto fail;
  rc = PA_OK;

  /* the probes (steps 2-5) */
  int n_train;
  pa_inventory_train(inv, &n_train);
  bank_items = malloc(((size_t)n_train + 1) * sizeof *bank_items);
  if (!bank_items) {
    rc = pa_error(PA_ENOMEM, "PAS: out of memory");
    goto fail;
  }
  int n_bank = pa_pas_bank_items(inv, bank_items, n_train + 1);
  if (n_bank < 0) {
    rc = n_bank;
    goto fail;
  }
  if (n_bank != bank->n_items) {
    rc = pa_error(PA_EINVAL, "PAS: the bank has %d items, the inventory's train split %d", bank->n_items, n_bank);
    goto fail;
  }
  const pa_model_config *mc = pa_lm_config(pa_evaluator_lm(ev)); /* the steer is read with the model's shape */
  if (bank->n_layers != mc->n_layers || bank->n_heads != mc->n_heads || bank->head_dim != mc->head_dim) {
    rc = pa_error(PA_EINVAL, "PAS: the bank has %d layers of %d heads of %d, the model %d of %d of %d", bank->n_layers,
                  bank->n_heads, bank->head_dim, mc->n_layers, mc->n_heads, mc->head_dim);
    goto fail;
  }
  answers = malloc((size_t)n_bank + 1);
  if (!answers) {
    rc = pa_error(PA_ENOMEM, "PAS: out of memory");
    goto fail;
  }
  for (int i = 0; i < n_bank; i++)
    answers[i] = s->answers[bank_items[i]];
  pa_pas_opts fo = {
      .run_seed = o->run_seed, .top_k = o->top_k, .C = o->C, .max_iter = o->max_iter, .n_threads = o->n_threads};
  double t0 = now_s();
  rc = pa_pas_fit_subject(bank, answers, s->id, &fo, &out->fit);
  out->fit_seconds = now_s() - t0;
  if (rc)
    goto fail;
  out->status = out->fit.status;
  snprintf(out->message, sizeof out->message, "%s", out->fit.message);
  if (out->status != PA_PAS_FITTED) {
    for (int v = 0; v < PA_PAS_N_VARIANTS; v++)
      for (int p = 0; p < PA_PAS_N_PROTOCOLS; p++)
        out->chosen[v][p].index = -1;
    goto done;
  }

  /* every alpha, both variants (steps 6-7) */
  const size_t rows = (size_t)PA_PAS_N_VARIANTS * (size_t)n_alphas;
  const size_t n_delta = (size_t)bank->n_layers * bank->n_heads * bank->head_dim;
  out->alphas = malloc((size_t)n_alphas * sizeof *out->alphas);
  out->preds = calloc(rows * (size_t)n_test, sizeof *out->preds);
  out->probs = calloc(rows * (size_t)n_test * 5, sizeof *out->probs);
  out->m_all = calloc(rows, sizeof *out->m_all);
  out->m_select = calloc(rows, sizeof *out->m_select);
  out->m_report = calloc(rows, sizeof *out->m_report);
  delta = malloc((n_delta ? n_delta : 1) * sizeof *delta);
  buf = malloc((size_t)n_test * sizeof *buf);
  icl = pa_prompt_icl(inv, s);
  if (!out->alphas || !out->preds || !out->probs || !out->m_all || !out->m_select || !out->m_report || !delta || !buf ||
      !icl) {
    rc = pa_error(PA_ENOMEM, "PAS: out of memory");
    goto fail;
  }
  memcpy(out->alphas, alphas, (size_t)n_alphas * sizeof *alphas);
  out->n_alphas = n_alphas;

  t0 = now_s();
  for (int a = 0; a < n_alphas; a++) {
    const float *steer = NULL;
    if (alphas[a] != 0) {
      rc = pa_pas_steering(&out->fit, alphas[a], bank->n_layers, bank->n_heads, bank->head_dim, delta);
      if (rc)
        goto fail;
      steer = delta;
    }
    for (int v = 0; v < PA_PAS_N_VARIANTS; v++) {
      if (!(variants & (1u << v)))
        continue;
      const size_t row = (size_t)v * n_alphas + a;
      pa_pred *pr = out->preds + row * n_test;
      pa_eval_stats st = {0};
      rc = pa_evaluator_answer(ev, inv, v == PA_PAS_VAR_PAS ? icl : PA_DEFAULT_SYSTEM, test, n_test, steer, pr,
                               out->probs + row * n_test * 5, &st);
      if (rc) {
        pa_error_prefix(rc, "PAS %s, subject %s, alpha %g: ", pa_pas_variant_name((pa_pas_variant)v), s->id, alphas[a]);
        goto fail;
      }
      stats_add(&out->eval, &st);
      for (int i = 0; i < n_test; i++)
        pr[i].truth = s->answers[test[i]];
      metrics_subset(inv, pr, n_test, NULL, 0, buf, &out->m_all[row]);
      metrics_subset(inv, pr, n_test, out->in_select, 1, buf, &out->m_select[row]);
      metrics_subset(inv, pr, n_test, out->in_select, 0, buf, &out->m_report[row]);
    }
  }
  out->eval_seconds = now_s() - t0;

  /* selection (step 7) */
  for (int v = 0; v < PA_PAS_N_VARIANTS; v++) {
    const size_t base = (size_t)v * n_alphas;
    for (int p = 0; p < PA_PAS_N_PROTOCOLS && !(variants & (1u << v)); p++)
      out->chosen[v][p].index = -1;
    for (int p = 0; p < PA_PAS_N_PROTOCOLS && (variants & (1u << v)); p++) {
      const pa_subject_metrics *sel = p == PA_PAS_PROTO_REFERENCE ? out->m_all + base : out->m_select + base;
      const pa_subject_metrics *rep = p == PA_PAS_PROTO_REFERENCE ? out->m_all + base : out->m_report + base;
      int k = choose(alphas, sel, n_alphas);
      pa_pas_choice *c = &out->chosen[v][p];
      c->index = k;
      c->alpha = alphas[k];
      c->select_mae_sum = isnan(sel[k].mae_sum) ? 0 : sel[k].mae_sum;
      c->metrics = rep[k];
    }
  }

done:
  free(bank_items), free(answers), free(delta), free(buf), free(icl);
  return PA_OK;
fail:
  free(bank_items), free(answers), free(delta), free(buf), free(icl);
  pa_pas_result_free(out);
  return rc;
}

int pa_pas_parse_alphas(const char *text, double *alphas) {
  int n = 0;
  for (const char *p = text; *p;) {
    char *end;
    errno = 0;
    const double x = strtod(p, &end);
    bool dup = false;
    for (int i = 0; i < n; i++)
      dup |= alphas[i] == x;
    if (errno || end == p || (*end && *end != ',') || !isfinite(x) || dup || n == PA_PAS_MAX_ALPHAS)
      return pa_error(PA_EINVAL, "alphas '%s': expected up to %d distinct numbers separated by commas", text,
                      PA_PAS_MAX_ALPHAS);
    alphas[n++] = x;
    p = *end ? end + 1 : end;
  }
  return n ? n : pa_error(PA_EINVAL, "alphas '%s': no number", text);
}
