#include "metrics.h"

#include <assert.h>
#include <math.h>
#include <string.h>

/* The table reads traits in the usual Big Five order (O C E A N), not the
 * enum's A C E N O, because that is how the literature prints them. */
static const pa_trait table_order[PA_N_TRAITS] = {PA_TRAIT_O, PA_TRAIT_C, PA_TRAIT_E, PA_TRAIT_A, PA_TRAIT_N};

static int keyed_score(int answer, int keyed) { return keyed < 0 ? 6 - answer : answer; }

void pa_metrics_subject(const pa_inventory *inv, const pa_pred *preds, int n, pa_subject_metrics *out) {
  memset(out, 0, sizeof *out);
  /* Integer sums: every term is a small integer, so the means are exact
   * quotients and do not depend on the order of the predictions. */
  long err[PA_N_TRAITS] = {0}, kp[PA_N_TRAITS] = {0}, kt[PA_N_TRAITS] = {0};
  for (int i = 0; i < n; i++) {
    const pa_item *it = pa_inventory_item(inv, preds[i].item);
    assert(it && "a prediction names an item the inventory does not have");
    if (!it)
      continue;
    int truth = preds[i].truth, ans = preds[i].answer;
    assert(truth <= 5);
    if (truth < 1 || truth > 5) {
      out->n_missing++;
      continue;
    }
    pa_trait t = it->trait;
    if (ans < 1 || ans > 5) {
      out->n_unknown[t]++;
      continue;
    }
    out->n_scored[t]++;
    err[t] += ans > truth ? ans - truth : truth - ans;
    kp[t] += keyed_score(ans, it->keyed);
    kt[t] += keyed_score(truth, it->keyed);
  }
  out->mae_sum = 0;
  for (int t = 0; t < PA_N_TRAITS; t++) {
    int m = out->n_scored[t];
    out->mae[t] = m ? (double)err[t] / m : NAN;
    out->keyed_pred[t] = m ? (double)kp[t] / m : NAN;
    out->keyed_true[t] = m ? (double)kt[t] / m : NAN;
    out->mae_sum += out->mae[t]; /* NaN as soon as one trait has none */
  }
}

/* One subject's value of trait t, or of the sum over traits for t = PA_N_TRAITS. */
static double value_of(const pa_subject_metrics *m, int t) { return t < PA_N_TRAITS ? m->mae[t] : m->mae_sum; }

/* Mean over the subjects that have the value, and the 95% half-width
 * (1.96 standard errors with the sample sd; 0 below two subjects). */
static void mean_ci(const pa_subject_metrics *m, int n, int t, double *mean, double *ci) {
  double s = 0;
  int k = 0;
  for (int i = 0; i < n; i++) {
    double x = value_of(&m[i], t);
    if (!isnan(x))
      s += x, k++;
  }
  *mean = k ? s / k : NAN;
  *ci = 0;
  if (k < 2)
    return;
  double ss = 0; /* two passes: the squared deviations stay accurate when the spread is small */
  for (int i = 0; i < n; i++) {
    double x = value_of(&m[i], t);
    if (!isnan(x))
      ss += (x - *mean) * (x - *mean);
  }
  *ci = 1.96 * sqrt(ss / (k - 1)) / sqrt((double)k);
}

void pa_metrics_summarise(const pa_subject_metrics *m, int n, pa_method_summary *out) {
  memset(out, 0, sizeof *out);
  out->n_subjects = n;
  for (int t = 0; t < PA_N_TRAITS; t++) {
    mean_ci(m, n, t, &out->mae[t], &out->mae_ci[t]);
    double sx = 0, sy = 0, sd = 0;
    int k = 0;
    for (int s = 0; s < n; s++) {
      out->n_scored += m[s].n_scored[t];
      out->n_unknown += m[s].n_unknown[t];
      double x = m[s].keyed_pred[t], y = m[s].keyed_true[t];
      if (isnan(x) || isnan(y))
        continue;
      sx += x, sy += y, sd += fabs(x - y), k++;
    }
    out->keyed_mae[t] = k ? sd / k : NAN;
    out->keyed_r[t] = NAN;
    if (k < 2)
      continue;
    double mx = sx / k, my = sy / k, sxx = 0, syy = 0, sxy = 0;
    for (int s = 0; s < n; s++) {
      double x = m[s].keyed_pred[t], y = m[s].keyed_true[t];
      if (isnan(x) || isnan(y))
        continue;
      sxx += (x - mx) * (x - mx), syy += (y - my) * (y - my), sxy += (x - mx) * (y - my);
    }
    if (sxx > 0 && syy > 0) {
      double r = sxy / sqrt(sxx * syy);
      out->keyed_r[t] = r > 1 ? 1 : r < -1 ? -1 : r; /* rounding can step just outside [-1, 1] */
    }
  }
  mean_ci(m, n, PA_N_TRAITS, &out->sum, &out->sum_ci);
}

static uint8_t truth_of(const pa_subject *s, int item) {
  assert(item >= 1 && item <= PA_MAX_ITEMS);
  return item >= 1 && item <= PA_MAX_ITEMS ? s->answers[item] : 0;
}

void pa_predict_const3(const pa_subject *s, const int *items, int n, pa_pred *preds) {
  for (int i = 0; i < n; i++)
    preds[i] = (pa_pred){.item = items[i], .truth = truth_of(s, items[i]), .answer = 3, .expected = 3.0f};
}

void pa_predict_trait_mean(const pa_inventory *inv, const pa_subject *s, const int *items, int n, pa_pred *preds) {
  int ntrain;
  const int *train = pa_inventory_train(inv, &ntrain);
  int sum[PA_N_TRAITS] = {0}, cnt[PA_N_TRAITS] = {0};
  for (int i = 0; i < ntrain; i++) {
    const pa_item *it = pa_inventory_item(inv, train[i]);
    int v = s->answers[train[i]];
    if (it && v >= 1 && v <= 5)
      sum[it->trait] += v, cnt[it->trait]++;
  }
  uint8_t guess[PA_N_TRAITS];
  for (int t = 0; t < PA_N_TRAITS; t++)
    /* Half up in integers: floor(sum/cnt + 1/2) = (2 sum + cnt) / (2 cnt), so a
     * mean of exactly 3.5 is 4 with no floating-point doubt. */
    guess[t] = cnt[t] ? (uint8_t)((2 * sum[t] + cnt[t]) / (2 * cnt[t])) : 3;
  for (int i = 0; i < n; i++) {
    const pa_item *it = pa_inventory_item(inv, items[i]);
    assert(it && "an item the inventory does not have");
    uint8_t a = it ? guess[it->trait] : 0;
    /* A point prediction: all probability on one answer, so the expected score is that answer. */
    preds[i] = (pa_pred){.item = items[i], .truth = truth_of(s, items[i]), .answer = a, .expected = a ? a : NAN};
  }
}

/* `w` columns: the value with `prec` decimals, or "-" where there is none. */
static void cell(FILE *f, double v, int w, int prec) {
  if (isnan(v))
    fprintf(f, " %*s", w, "-");
  else
    fprintf(f, " %*.*f", w, prec, v);
}

/* A table's header row up to its trait columns (method, n, O C E A N);
 * returns the method column's width, the longest name's. */
static int table_head(FILE *f, const char *const *names, int n_methods) {
  int nw = (int)strlen("method");
  for (int i = 0; i < n_methods; i++)
    if ((int)strlen(names[i]) > nw)
      nw = (int)strlen(names[i]);
  fprintf(f, "%-*s %5s", nw, "method", "n");
  for (int k = 0; k < PA_N_TRAITS; k++)
    fprintf(f, " %6c", pa_trait_letter(table_order[k]));
  return nw;
}

void pa_metrics_print_table(FILE *f, const char *const *names, const pa_method_summary *sums, int n_methods) {
  fprintf(f, "MAE per trait on the 1..5 scale (traits in the Big Five order O C E A N), mean over subjects;\n"
             "sum = mean over subjects of the sum over traits, ± the 95%% interval over subjects; lower is better\n");
  const int nw = table_head(f, names, n_methods);
  /* Widths count bytes: "±" takes two bytes and one column, hence 14 for 13 columns. */
  fprintf(f, " %14s %8s %8s\n", "sum ± 95%", "scored", "unknown");
  for (int i = 0; i < n_methods; i++) {
    const pa_method_summary *s = &sums[i];
    fprintf(f, "%-*s %5d", nw, names[i], s->n_subjects);
    for (int k = 0; k < PA_N_TRAITS; k++)
      cell(f, s->mae[table_order[k]], 6, 3);
    if (isnan(s->sum))
      fprintf(f, " %13s", "-");
    else
      fprintf(f, " %6.2f ± %4.2f", s->sum, s->sum_ci);
    fprintf(f, " %8ld %8ld\n", s->n_scored, s->n_unknown);
  }
}

void pa_metrics_print_keyed(FILE *f, const char *const *names, const pa_method_summary *sums, int n_methods) {
  fprintf(f, "Keyed trait score (reverse-keyed answers as 6 - answer, the mean over a trait's scored items):\n"
             "|predicted - true| averaged over subjects (lower is better), and Pearson's r over subjects\n"
             "between the predicted and the true score (higher is better; - for a constant prediction)\n");
  const int nw = table_head(f, names, n_methods);
  fprintf(f, "  |");
  for (int k = 0; k < PA_N_TRAITS; k++)
    fprintf(f, " %4s%c", "r ", pa_trait_letter(table_order[k]));
  fputc('\n', f);
  for (int i = 0; i < n_methods; i++) {
    fprintf(f, "%-*s %5d", nw, names[i], sums[i].n_subjects);
    for (int k = 0; k < PA_N_TRAITS; k++)
      cell(f, sums[i].keyed_mae[table_order[k]], 6, 3);
    fprintf(f, "  |");
    for (int k = 0; k < PA_N_TRAITS; k++)
      cell(f, sums[i].keyed_r[table_order[k]], 5, 2);
    fputc('\n', f);
  }
}
