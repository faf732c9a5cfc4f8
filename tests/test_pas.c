/* PAS for one subject end to end (pas.h) on a tiny random model and a tiny
 * inventory: 30 items, 6 per trait, 15 train and 15 test (3 per trait), the
 * holdout set 1 item per trait. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bank.h"
#include "eval.h"
#include "forward.h"
#include "inventory.h"
#include "metrics.h"
#include "mkmodel.h"
#include "model.h"
#include "pas.h"
#include "probe.h"
#include "prompts.h"
#include "status.h"
#include "testutil.h"

enum { N_ITEMS = 30, PER_TRAIT = 1 };

static pa_model *model;
static pa_lm *lm;
static pa_inventory *inv;
static pa_bank *bank;
static pa_subject subj, subj2, neutral;

static const char *const words[] = {"worry", "laugh", "plan", "trust", "paint", "argue",
                                    "tidy",  "dream", "help", "rush",  "share", "read"};

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  /* items: trait A C E N O cycling, texts made of two words */
  static const char traits[] = "ACENO";
  char csv[8192], split[1024], p[300];
  size_t n = 0;
  tu_cat(csv, sizeof csv, &n, TU_ITEMS_HEADER);
  for (int i = 1; i <= N_ITEMS; i++) {
    const char t = traits[(i - 1) % 5];
    tu_cat(csv, sizeof csv, &n, "%d,%d,%c,%c1,Facet,%c,%s and %s often.\n", i, i, t, t, i % 4 ? '+' : '-',
           words[i % 12], words[(i * 5 + 1) % 12]);
  }
  /* train: items 1..15, test: 16..30 in a scrambled order */
  int train[15], test[15];
  for (int k = 0; k < 15; k++)
    train[k] = 1 + k, test[k] = 16 + (k * 7) % 15;
  assert_int_equal(tu_split_json(split, sizeof split, train, 15, test, 15), 0);
  tu_papi_dir(p, sizeof p, ".", (tu_papi_files){.items = csv, .split = split});
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 11;
  if (pa_inventory_load(tu_tmp, &inv) || pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "m.gguf")) ||
      pa_model_open(p, &model) || pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 1024}, &lm) ||
      pa_bank_compute(lm, pa_model_tokenizer(model), pa_model_chat(model), inv, NULL, &bank)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  memset(&subj, 0, sizeof subj);
  snprintf(subj.id, sizeof subj.id, "1001");
  subj.usable = true;
  subj2 = subj;
  snprintf(subj2.id, sizeof subj2.id, "1002");
  neutral = subj;
  snprintf(neutral.id, sizeof neutral.id, "1003");
  static const uint8_t pat[] = {1, 2, 4, 5, 5, 1, 4, 2, 3, 5, 1};
  for (int i = 1; i <= N_ITEMS; i++) {
    subj.answers[i] = pat[(i * 3) % 11];
    subj2.answers[i] = pat[(i * 5 + 2) % 11];
    neutral.answers[i] = 3;
  }
  subj.answers[20] = 0; /* a missing test answer */
  return 0;
}

static int teardown(void **s) {
  pa_bank_destroy(bank);
  pa_lm_destroy(lm);
  pa_model_close(model);
  pa_inventory_destroy(inv);
  return tu_teardown(s);
}

static pa_evaluator *new_ev(void) {
  pa_evaluator *ev;
  if (pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model), &(pa_eval_opts){.batch = 4}, &ev))
    fail_msg("pa_evaluator_create: %s", pa_errmsg());
  return ev;
}

static const pa_pas_run_opts opts = {.run_seed = 42, .top_k = 4, .holdout_per_trait = PER_TRAIT, .n_threads = 2};

static void run(const pa_subject *s, const pa_pas_run_opts *o, pa_pas_result *r) {
  pa_evaluator *ev = new_ev();
  pa_pas_bank v = pa_bank_view(bank);
  if (pa_pas_run_subject(ev, inv, &v, s, o, r))
    fail_msg("pa_pas_run_subject: %s", pa_errmsg());
  pa_evaluator_destroy(ev);
}

static const pa_pred *row(const pa_pas_result *r, int v, int a) {
  return r->preds + ((size_t)v * r->n_alphas + a) * r->n_items;
}
static const float *prow(const pa_pas_result *r, int v, int a) {
  return r->probs + ((size_t)v * r->n_alphas + a) * r->n_items * 5;
}

static void assert_preds_equal(const pa_pred *a, const pa_pred *b, int n) {
  for (int i = 0; i < n; i++) {
    assert_int_equal(a[i].item, b[i].item);
    assert_int_equal(a[i].answer, b[i].answer);
    assert_memory_equal(&a[i].expected, &b[i].expected, sizeof(float));
  }
}

/* alpha 0 is the unsteered icl / none baseline, bit for bit */
static void test_alpha0_is_baseline(void **st) {
  (void)st;
  pa_pas_result r = {0};
  run(&subj, &opts, &r);
  assert_int_equal(r.status, PA_PAS_FITTED);
  assert_int_equal(r.n_alphas, 6);
  assert_true(r.alphas[0] == 0 && r.alphas[5] == 8);
  assert_int_equal(r.n_items, 15);
  assert_true(r.fit.n_selected > 0 && r.fit.n_selected <= 4);
  assert_true(r.eval.question_tokens > 0 && r.fit_seconds >= 0 && r.eval_seconds > 0);

  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  assert_memory_equal(r.items, test, sizeof(int) * (size_t)n_test);
  pa_evaluator *ev = new_ev();
  pa_pred want[15];
  float probs[15 * 5];
  char *icl = pa_prompt_icl(inv, &subj);
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, n_test, NULL, want, probs, NULL), PA_OK);
  assert_preds_equal(row(&r, PA_PAS_VAR_PAS, 0), want, n_test);
  assert_memory_equal(prow(&r, PA_PAS_VAR_PAS, 0), probs, sizeof probs);
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, test, n_test, NULL, want, probs, NULL), PA_OK);
  assert_preds_equal(row(&r, PA_PAS_VAR_ONLY, 0), want, n_test);
  assert_memory_equal(prow(&r, PA_PAS_VAR_ONLY, 0), probs, sizeof probs);
  /* the truth is the subject's answer */
  for (int i = 0; i < n_test; i++)
    assert_int_equal(row(&r, PA_PAS_VAR_ONLY, 3)[i].truth, subj.answers[test[i]]);
  free(icl);
  pa_evaluator_destroy(ev);

  /* steering moves the probabilities, for both variants, more with a larger alpha */
  for (int v = 0; v < PA_PAS_N_VARIANTS; v++) {
    double d1 = 0, d8 = 0;
    for (int i = 0; i < n_test * 5; i++) {
      d1 += fabs((double)prow(&r, v, 1)[i] - prow(&r, v, 0)[i]);
      d8 += fabs((double)prow(&r, v, 5)[i] - prow(&r, v, 0)[i]);
    }
    assert_true(d1 > 0);
    assert_true(d8 > d1);
  }
  pa_pas_result_free(&r);
  pa_pas_result_free(&r); /* twice is harmless */
}

/* the protocols choose the minimising alpha, ties to the smaller one, and
 * report the right items */
static void test_protocols(void **st) {
  (void)st;
  pa_pas_result r = {0};
  /* a grid out of order: alpha 1 ties with alpha 0 on this tiny model (the
   * steering is too weak to move a letter), the large ones saturate */
  static const double grid[] = {1000, 100, 1, 0};
  pa_pas_run_opts o = opts;
  o.alphas = grid, o.n_alphas = 4;
  run(&subj, &o, &r);
  int n_sel = 0, per[PA_N_TRAITS] = {0};
  for (int i = 0; i < r.n_items; i++)
    if (r.in_select[i]) {
      n_sel++;
      per[pa_inventory_item(inv, r.items[i])->trait]++;
    }
  assert_int_equal(n_sel, 5 * PER_TRAIT);
  for (int t = 0; t < PA_N_TRAITS; t++)
    assert_int_equal(per[t], PER_TRAIT);

  for (int v = 0; v < PA_PAS_N_VARIANTS; v++) {
    pa_pred sel[15], rep[15];
    for (int a = 0; a < r.n_alphas; a++) {
      /* the stored metrics are those of the stored predictions */
      const pa_pred *pr = row(&r, v, a);
      int ns = 0, nr = 0;
      for (int i = 0; i < r.n_items; i++) {
        if (r.in_select[i])
          sel[ns++] = pr[i];
        else
          rep[nr++] = pr[i];
      }
      pa_subject_metrics m;
      size_t k = (size_t)v * r.n_alphas + a;
      pa_metrics_subject(inv, pr, r.n_items, &m);
      assert_memory_equal(&m, &r.m_all[k], sizeof m);
      pa_metrics_subject(inv, sel, ns, &m);
      assert_memory_equal(&m, &r.m_select[k], sizeof m);
      pa_metrics_subject(inv, rep, nr, &m);
      assert_memory_equal(&m, &r.m_report[k], sizeof m);
      /* disjoint, covering */
      int scored = 0;
      for (int t = 0; t < PA_N_TRAITS; t++)
        scored += r.m_select[k].n_scored[t] + r.m_report[k].n_scored[t] - r.m_all[k].n_scored[t];
      assert_int_equal(scored, 0);
      assert_int_equal(ns + nr, r.n_items);
    }
    for (int p = 0; p < PA_PAS_N_PROTOCOLS; p++) {
      const pa_subject_metrics *by = (p == PA_PAS_PROTO_REFERENCE ? r.m_all : r.m_select) + (size_t)v * r.n_alphas;
      const pa_subject_metrics *rp = (p == PA_PAS_PROTO_REFERENCE ? r.m_all : r.m_report) + (size_t)v * r.n_alphas;
      const pa_pas_choice *c = &r.chosen[v][p];
      assert_true(c->index >= 0 && c->index < r.n_alphas);
      /* on this model and subject (checked by hand): alpha 0 wins, alpha 1
       * ties with it, the saturated alphas are worse */
      assert_int_equal(c->index, 3);
      assert_true(by[2].mae_sum == by[3].mae_sum && by[0].mae_sum > by[3].mae_sum);
      assert_true(c->alpha == r.alphas[c->index]);
      assert_false(isnan(by[c->index].mae_sum));
      for (int a = 0; a < r.n_alphas; a++) {
        assert_true(isnan(by[a].mae_sum) || by[c->index].mae_sum <= by[a].mae_sum);
      }
      assert_memory_equal(&c->metrics, &rp[c->index], sizeof c->metrics);
      assert_true(c->select_mae_sum == by[c->index].mae_sum);
      for (int a = 0; a < r.n_alphas; a++)
        if (by[a].mae_sum == by[c->index].mae_sum)
          assert_true(r.alphas[a] >= c->alpha);
    }
  }
  pa_pas_result_free(&r);
}

/* the selection rule on its own */
static void test_choose_alpha(void **st) {
  (void)st;
  const double al[] = {0, 1, 2, 4, 6, 8};
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){3, 2, 1, 1.5, 4, 5}, NULL, 6), 2);
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){3, 2, 1, 1, 1, 5}, NULL, 6), 2); /* ties: the smaller alpha */
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){NAN, 2, NAN, 1, 4, 1}, NULL, 6), 3);
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){NAN, NAN, NAN, NAN, NAN, NAN}, NULL, 6), 0);
  const double down[] = {8, 4, 0, 2};
  assert_int_equal(pa_pas_choose_alpha(down, (double[]){1, 1, 1, 0.5}, NULL, 4), 3);
  assert_int_equal(pa_pas_choose_alpha(down, (double[]){1, 1, 1, 2}, NULL, 4), 2); /* alpha 0, not the first */
  /* fewer unknown answers first: alpha 2's 1.0 on fewer scored items loses */
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){3, 2, 1, 1.5, 4, 5}, (long[]){0, 0, 7, 0, 0, 0}, 6), 3);
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){3, 2, 1, 1.5, 4, 5}, (long[]){2, 2, 3, 2, 1, 1}, 6), 4);
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){3, 2, 1, 1.5, 4, NAN}, (long[]){0, 0, 0, 0, 0, 0}, 6), 2);
  assert_int_equal(pa_pas_choose_alpha(al, (double[]){NAN, 2, 1, 1.5, 4, 5}, (long[]){0, 1, 1, 1, 1, 1}, 6), 0);
  assert_int_equal(pa_pas_choose_alpha(down, (double[]){1}, NULL, 1), 0);
}

/* the selection set depends on the run seed only; its size is checked */
static void test_holdout_set(void **st) {
  (void)st;
  int n_test;
  pa_inventory_test(inv, &n_test);
  uint8_t a[15], b[15];
  assert_int_equal(pa_pas_holdout_select(inv, 42, 2, a), 10);
  assert_int_equal(pa_pas_holdout_select(inv, 42, 2, b), 10);
  assert_memory_equal(a, b, sizeof a);
  assert_int_equal(pa_pas_holdout_select(inv, 42, 3, a), PA_EINVAL); /* nothing left to report */
  assert_int_equal(pa_pas_holdout_select(inv, 42, 0, a), PA_EINVAL);
  /* the algorithm as documented */
  assert_int_equal(pa_pas_holdout_select(inv, 7, 1, a), 5);
  const int *test = pa_inventory_test(inv, &n_test);
  memset(b, 0, sizeof b);
  for (int t = 0; t < PA_N_TRAITS; t++) {
    int pos[15], n_t = 0, perm[15];
    for (int i = 0; i < n_test; i++)
      if ((int)pa_inventory_item(inv, test[i])->trait == t)
        pos[n_t++] = i;
    pa_pas_shuffle(7 ^ (uint64_t)t, n_t, perm);
    b[pos[perm[0]]] = 1;
  }
  assert_memory_equal(a, b, sizeof a);
  /* every subject of a run gets the same set */
  pa_pas_result r1 = {0}, r2 = {0};
  run(&subj, &opts, &r1);
  run(&subj2, &opts, &r2);
  assert_int_equal(r2.status, PA_PAS_FITTED);
  assert_memory_equal(r1.in_select, r2.in_select, 15);
  pa_pas_result_free(&r1);
  pa_pas_result_free(&r2);
  /* the default (6 per trait) does not fit this inventory: an error, result zeroed */
  pa_evaluator *ev = new_ev();
  pa_pas_bank v = pa_bank_view(bank);
  pa_pas_run_opts o = opts;
  o.holdout_per_trait = 0;
  assert_int_equal(pa_pas_run_subject(ev, inv, &v, &subj, &o, &r1), PA_EINVAL);
  assert_null(r1.preds);
  /* a bad grid */
  const double twice[] = {0, 1, 1};
  o = opts, o.alphas = twice, o.n_alphas = 3;
  assert_int_equal(pa_pas_run_subject(ev, inv, &v, &subj, &o, &r1), PA_EINVAL);
  pa_evaluator_destroy(ev);
}

static void assert_results_equal(const pa_pas_result *a, const pa_pas_result *b) {
  assert_int_equal(a->status, b->status);
  assert_int_equal(a->n_alphas, b->n_alphas);
  assert_int_equal(a->n_items, b->n_items);
  assert_memory_equal(a->alphas, b->alphas, sizeof(double) * (size_t)a->n_alphas);
  assert_memory_equal(a->in_select, b->in_select, (size_t)a->n_items);
  size_t rows = (size_t)PA_PAS_N_VARIANTS * a->n_alphas;
  for (size_t k = 0; k < rows; k++)
    assert_preds_equal(a->preds + k * a->n_items, b->preds + k * b->n_items, a->n_items);
  assert_memory_equal(a->probs, b->probs, sizeof(float) * rows * a->n_items * 5);
  assert_memory_equal(a->m_all, b->m_all, sizeof *a->m_all * rows);
  assert_memory_equal(a->m_report, b->m_report, sizeof *a->m_report * rows);
  assert_memory_equal(a->chosen, b->chosen, sizeof a->chosen);
  assert_int_equal(a->fit.n_selected, b->fit.n_selected);
  for (int h = 0; h < a->fit.n_selected; h++) {
    assert_int_equal(a->fit.heads[h].layer, b->fit.heads[h].layer);
    assert_int_equal(a->fit.heads[h].head, b->fit.heads[h].head);
    assert_memory_equal(&a->fit.heads[h].sigma, &b->fit.heads[h].sigma, sizeof(double));
    assert_memory_equal(a->fit.heads[h].direction, b->fit.heads[h].direction, sizeof(float) * (size_t)a->fit.head_dim);
  }
}

/* two runs are bit-identical; a result can be reused; a custom grid */
static void test_deterministic(void **st) {
  (void)st;
  pa_pas_result a = {0}, b = {0};
  run(&subj, &opts, &a);
  run(&subj, &opts, &b);
  assert_results_equal(&a, &b);
  run(&subj, &opts, &b); /* reuse without freeing */
  assert_results_equal(&a, &b);
  /* a grid of its own: alpha 0 last still matches the default grid's alpha 0 */
  const double grid[] = {2, 0};
  pa_pas_run_opts o = opts;
  o.alphas = grid, o.n_alphas = 2;
  run(&subj, &o, &b);
  assert_int_equal(b.n_alphas, 2);
  for (int v = 0; v < PA_PAS_N_VARIANTS; v++) {
    assert_preds_equal(row(&b, v, 1), row(&a, v, 0), a.n_items);
    assert_preds_equal(row(&b, v, 0), row(&a, v, 2), a.n_items);
    assert_memory_equal(prow(&b, v, 0), prow(&a, v, 2), sizeof(float) * 5 * (size_t)a.n_items);
  }
  pa_pas_result_free(&a);
  pa_pas_result_free(&b);
}

/* a subject answering 3 everywhere cannot be fitted: a status, no rows, no NaN */
static void test_unfittable(void **st) {
  (void)st;
  pa_pas_result r = {0};
  run(&neutral, &opts, &r);
  assert_int_equal(r.status, PA_PAS_NO_SAMPLES);
  assert_true(strlen(r.message) > 0);
  assert_string_equal(r.subject_id, "1003");
  assert_int_equal(r.n_alphas, 0);
  assert_null(r.preds);
  assert_null(r.probs);
  assert_null(r.m_all);
  assert_int_equal(r.eval.question_tokens, 0);
  for (int v = 0; v < PA_PAS_N_VARIANTS; v++)
    for (int p = 0; p < PA_PAS_N_PROTOCOLS; p++) {
      const pa_pas_choice *c = &r.chosen[v][p];
      assert_int_equal(c->index, -1);
      assert_false(isnan(c->alpha) || isnan(c->select_mae_sum) || isnan(c->metrics.mae_sum));
      for (int t = 0; t < PA_N_TRAITS; t++)
        assert_false(isnan(c->metrics.mae[t]) || isnan(c->metrics.keyed_pred[t]) || isnan(c->metrics.keyed_true[t]));
    }
  assert_false(isnan(r.fit_seconds) || isnan(r.eval_seconds));
  pa_pas_result_free(&r);
  /* an unusable subject is an error */
  pa_subject bad = subj;
  bad.usable = false;
  snprintf(bad.reason, sizeof bad.reason, "broken");
  pa_evaluator *ev = new_ev();
  pa_pas_bank v = pa_bank_view(bank);
  assert_int_equal(pa_pas_run_subject(ev, inv, &v, &bad, &opts, &r), PA_EINVAL);
  assert_int_equal(pa_pas_run_subject(ev, inv, &v, &subj, NULL, NULL), PA_EINVAL);
  /* a bank of another shape than the model (its steer would be read past its end) */
  pa_pas_bank other = v;
  other.n_heads--;
  assert_int_equal(pa_pas_run_subject(ev, inv, &other, &subj, &opts, &r), PA_EINVAL);
  tu_expect_in(pa_errmsg(), "PAS: the bank has 2 layers of 3 heads", "the error");
  pa_evaluator_destroy(ev);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_alpha0_is_baseline), cmocka_unit_test(test_protocols),
      cmocka_unit_test(test_choose_alpha),       cmocka_unit_test(test_holdout_set),
      cmocka_unit_test(test_deterministic),      cmocka_unit_test(test_unfittable),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
