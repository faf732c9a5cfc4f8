/* palign query STORE summary [--json]
 * palign query STORE subject ID [--json]
 * palign query STORE export [--format csv|json|records] [--out FILE]
 * palign query STORE verify
 * palign query STORE index
 * What a store holds, read back for people (store/query.h does the reading;
 * this file parses the flags and prints). */
#include "commands.h"

#include "fileio.h"
#include "index.h"
#include "inventory.h"
#include "jsonfile.h"
#include "methods.h"
#include "metrics.h"
#include "query.h"
#include "record.h"
#include "status.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Traits in the order the tables print them (metrics.c). */
static const pa_trait order[PA_N_TRAITS] = {PA_TRAIT_O, PA_TRAIT_C, PA_TRAIT_E, PA_TRAIT_A, PA_TRAIT_N};

static void usage(FILE *f) {
  fprintf(f, "usage: palign query STORE COMMAND [options]\n"
             "\n"
             "commands:\n"
             "  summary [--json]      the run, the per-method, per-trait MAE table over every stored subject\n"
             "                        and the keyed scores', PAS alpha choices, costs and failures\n"
             "  subject ID [--json]   one subject's record (--json: everything, with per-item predictions,\n"
             "                        the PAS alpha grid and directions; `subject -- ID` for an ID that\n"
             "                        begins with '-')\n"
             "  export [--format csv|json|records] [--out FILE]\n"
             "                        one row per subject and method row: subject_id, method, row, mae_A .. mae_O,\n"
             "                        mae_sum, n_scored, n_unknown, alpha, seconds (default csv, to stdout;\n"
             "                        --out replaces FILE atomically); records: every record whole, one JSON\n"
             "                        object a line, as subject --json prints it\n"
             "  verify                check the manifest, every record and the shard files; exit 0 when clean,\n"
             "                        1 when a problem was found; says whether the index is current\n"
             "  index                 write STORE/index.pb (where each subject's record is), which subject uses\n"
             "                        while the shards are unchanged; safe to delete or rewrite at any time\n"
             "\n"
             "Damaged records are skipped with a warning on stderr naming the shard and the offset.\n"
             "Exit status: 0 ok, 1 a data error (no store, subject not found, a problem found by verify),\n"
             "2 a usage error.\n");
}

/* ---- helpers --------------------------------------------------------------- */

typedef struct {
  const char *store;
  size_t n;
} warn_ctx;

static void warn_damaged(void *ctx, const char *line) {
  warn_ctx *w = ctx;
  w->n++;
  fprintf(stderr, "palign query: %s: skipping damaged record: %s\n", w->store, line);
}

static void print_problem(void *ctx, const char *line) {
  (void)ctx;
  printf("%s\n", line);
}

static const char *when(int64_t unix_s, char buf[40]) {
  if (unix_s <= 0)
    return "-";
  time_t t = (time_t)unix_s;
  struct tm tm;
  if (!gmtime_r(&t, &tm) || !strftime(buf, 40, "%Y-%m-%d %H:%M:%S UTC", &tm))
    snprintf(buf, 40, "%lld", (long long)unix_s);
  return buf;
}

static void print_cell(double x, int w, int prec) {
  if (isnan(x))
    printf(" %*s", w, "-");
  else
    printf(" %*.*f", w, prec, x);
}

static int print_json(cJSON *o) {
  char *text = o ? pa_json_print(o, true) : NULL;
  cJSON_Delete(o);
  if (!text) {
    fprintf(stderr, "palign query: out of memory\n");
    return 1;
  }
  puts(text);
  free(text);
  return 0;
}

/* ---- summary ----------------------------------------------------------------- */

static void print_settings(const pa_query_summary *s) {
  const Palign__Manifest *m = s->manifest;
  if (!m) {
    printf("manifest  none: %s\n", s->manifest_error);
    return;
  }
  const Palign__Settings *st = m->settings;
  if (st) {
    printf("settings  model %.16s  methods ", st->model_fingerprint ? st->model_fingerprint : "");
    for (size_t i = 0; i < st->n_methods; i++)
      printf("%s%s", i ? "," : "", st->methods[i]);
    printf("  seed %llu  mode %s  weights %s\n", (unsigned long long)st->run_seed, st->mode && *st->mode ? st->mode : "-",
           st->weights && *st->weights ? st->weights : st->benchmark_delay > 0 ? "-" : "fp32");
    printf("          inventory %.16s  %s items  holdout %d per trait  top-k %d  %zu alphas",
           st->inventory_fingerprint && *st->inventory_fingerprint ? st->inventory_fingerprint : "-",
           st->lowercase_items ? "lowercased" : "as-is", st->holdout_per_trait, st->top_k, st->n_alphas);
    if (st->n_alphas)
      printf(" (%g .. %g)", st->alphas[0], st->alphas[st->n_alphas - 1]);
    printf("\n");
    if (st->benchmark_delay > 0)
      printf("BENCHMARK a benchmark store (palign-worker --benchmark-delay): the workers slept %g s a subject on "
             "average (CV %g) instead of running a model; no record here holds a model's answers\n",
             st->benchmark_delay, st->benchmark_cv);
  } else {
    printf("settings  none in the manifest\n");
  }
  printf("runs      %zu", m->n_runs);
  if (m->n_runs) {
    printf(" (ranks");
    for (size_t i = 0; i < m->n_runs; i++)
      printf("%s%d", i ? ", " : " ", m->runs[i]->ranks);
    const Palign__RunRecord *last = m->runs[m->n_runs - 1];
    char b1[40], b2[40];
    printf("); the last: git %s, palign %s, started %s, %s%s\n",
           last->git_revision && *last->git_revision ? last->git_revision : "unknown",
           last->version && *last->version ? last->version : "?", when(last->started_unix, b1),
           last->finished_unix ? "finished " : "not finished (running or killed)",
           last->finished_unix ? when(last->finished_unix, b2) : "");
    if (last->interrupted)
      printf("          the last run was interrupted by a signal\n");
    if (last->error && *last->error)
      printf("          the last run stopped with an error: %s\n", last->error);
  } else {
    printf("\n");
  }
  printf("shards    %zu listed\n", m->n_shards);
}

static void print_choices(const pa_query_summary *s) {
  if (!s->pas_fitted && !s->n_pas_other)
    return;
  printf("\nPAS: %d subjects fitted", s->pas_fitted);
  for (int i = 0; i < s->n_pas_other; i++)
    printf(", %d %s", s->pas_other[i].count, s->pas_other[i].status);
  printf("\n");
  if (s->n_chosen)
    printf("alpha chosen (alpha: subjects)\n");
  for (int i = 0; i < s->n_chosen; i++) {
    const pa_query_choice *ch = &s->chosen[i];
    char label[80];
    snprintf(label, sizeof label, "%s (%s)", ch->variant, ch->protocol);
    printf("  %-22s", label);
    for (int k = 0; k < ch->n_alphas; k++)
      printf(" %g: %d", ch->alphas[k].alpha, ch->alphas[k].count);
    if (ch->none)
      printf(" none: %d", ch->none);
    printf("\n");
  }
}

static void print_costs(const pa_query_summary *s) {
  if (!s->subjects)
    return;
  printf("\nTime per subject: %.2f s (wall, all methods)\n", s->subject_seconds / (double)s->subjects);
  for (int i = 0; i < s->n_methods; i++) {
    const pa_query_method *m = &s->methods[i];
    if (!m->runs)
      continue;
    const pa_method *pm = pa_method_find(m->name);
    if (pm && pm->needs_bank && m->tokens == 0 && m->seconds == 0)
      printf("  %-10s computed together with the other PAS variant (one fit, both prompts)\n", m->name);
    else if ((pm && pm->needs_model) || m->tokens > 0)
      printf("  %-10s %.2f s, %.0f tokens per subject (full prompts one by one: %.0f)\n", m->name, m->seconds / m->runs,
             (double)m->tokens / m->runs, (double)m->full_prompt_tokens / m->runs);
    else
      printf("  %-10s %.3f s per subject (no model)\n", m->name, m->seconds / m->runs);
  }
  if (s->pas_fitted) {
    const double n = s->pas_fitted;
    const Palign__Cost *g = &s->pas_grid;
    printf("  PAS per fitted subject: probes %.2f s, alpha grid %.2f s, %.0f tokens computed; %.0f as full prompts; "
           "%.0f the reference's way (%.1fx more)\n",
           s->pas_fit_seconds / n, g->seconds / n, (double)g->tokens / n, (double)g->full_prompt_tokens / n,
           (double)g->reference_way_tokens / n,
           g->tokens > 0 ? (double)g->reference_way_tokens / (double)g->tokens : 0.0);
  }
}

static void print_dpo_costs(const pa_query_summary *s) {
  if (!s->dpo_trained)
    return;
  const double n = s->dpo_trained;
  printf("  DPO per trained subject: %.0f pairs, %.0f steps; reference %.2f s, %.0f tokens, %.3g FLOPs; steps %.2f s, "
         "%.0f tokens, %.3g FLOPs; loss %.4f at step 0, %.4f over the last epoch; activations %.0f MB at most\n",
         s->dpo_pairs / n, s->dpo_steps / n, s->dpo_ref_seconds / n, s->dpo_ref_tokens / n, s->dpo_ref_flops / n,
         s->dpo_train_seconds / n, s->dpo_train_tokens / n, s->dpo_train_flops / n, s->dpo_first_loss / n,
         s->dpo_last_epoch_loss / n, (double)s->dpo_max_trainer_bytes / (1 << 20));
}

static void print_failures(const pa_query_summary *s) {
  if (s->subjects_failed) {
    printf("\nFailed subjects: %zu%s\n", s->subjects_failed,
           s->subjects_failed > PA_QUERY_MAX_LISTED ? " (the first listed)" : "");
    for (size_t i = 0; i < s->subjects_failed && i < PA_QUERY_MAX_LISTED; i++)
      printf("  %s: %s\n", s->failed_subjects[i].subject, s->failed_subjects[i].error);
  }
  if (s->methods_failed) {
    printf("\nFailed methods: %zu%s\n", s->methods_failed,
           s->methods_failed > PA_QUERY_MAX_LISTED ? " (the first listed)" : "");
    for (size_t i = 0; i < s->methods_failed && i < PA_QUERY_MAX_LISTED; i++)
      printf("  %s %s: %s\n", s->failed_methods[i].subject, s->failed_methods[i].method, s->failed_methods[i].error);
  }
}

static int run_summary(const char *store, bool json) {
  warn_ctx w = {.store = store};
  pa_query_summary s;
  int rc = pa_query_summarise(store, warn_damaged, &w, &s);
  if (rc) {
    fprintf(stderr, "palign query: %s\n", pa_errmsg());
    pa_query_summary_free(&s);
    return 1;
  }
  if (!s.manifest)
    fprintf(stderr, "palign query: warning: %s\n", s.manifest_error);
  if (s.skipped)
    fprintf(stderr, "palign query: %s: %zu damaged record%s skipped\n", store, s.skipped, s.skipped == 1 ? "" : "s");
  if (json) {
    rc = print_json(pa_query_summary_json(&s));
    pa_query_summary_free(&s);
    return rc;
  }
  printf("store     %s\n", store);
  print_settings(&s);
  printf("subjects  %zu stored, %zu failed", s.subjects, s.subjects_failed);
  if (s.manifest)
    printf(", of %lld", (long long)s.manifest->subjects_total);
  printf("\nrecords   %zu valid", s.counts[PA_RECORD_OK]);
  if (s.skipped)
    printf(", %zu damaged skipped (see the warnings)", s.skipped);
  printf("\n");

  const char **names = malloc((size_t)(s.n_rows ? s.n_rows : 1) * sizeof *names);
  pa_method_summary *sums = malloc((size_t)(s.n_rows ? s.n_rows : 1) * sizeof *sums);
  if (!names || !sums) {
    fprintf(stderr, "palign query: out of memory\n");
    free(names), free(sums), pa_query_summary_free(&s);
    return 1;
  }
  for (int i = 0; i < s.n_rows; i++)
    names[i] = s.rows[i].name, sums[i] = s.rows[i].summary;
  const char *mode = s.manifest && s.manifest->settings && s.manifest->settings->mode && *s.manifest->settings->mode
                         ? s.manifest->settings->mode
                         : "unknown";
  printf("\nMean absolute error on the subjects' test items (lower is better; %zu subjects, %s mode)\n", s.subjects,
         mode);
  pa_metrics_print_table(stdout, names, sums, s.n_rows);
  putchar('\n');
  pa_metrics_print_keyed(stdout, names, sums, s.n_rows);
  free(names), free(sums);
  print_choices(&s);
  print_costs(&s);
  print_dpo_costs(&s);
  print_failures(&s);
  pa_query_summary_free(&s);
  return 0;
}

/* ---- subject ------------------------------------------------------------------ */

static void print_metrics_head(void) {
  printf("    %-24s", "row");
  for (int k = 0; k < PA_N_TRAITS; k++)
    printf(" %6c", pa_trait_letter(order[k]));
  printf(" %7s %7s %7s\n", "sum", "scored", "unknown");
}

static void print_row(const Palign__MethodRow *row) {
  pa_subject_metrics m;
  if (row->metrics) {
    pa_metrics_from_proto(row->metrics, &m);
  } else {
    memset(&m, 0, sizeof m);
    for (int t = 0; t < PA_N_TRAITS; t++)
      m.mae[t] = NAN;
    m.mae_sum = NAN;
  }
  long scored = 0, unknown = 0; /* a record's counts are any int32 */
  for (int t = 0; t < PA_N_TRAITS; t++)
    scored += m.n_scored[t], unknown += m.n_unknown[t];
  printf("    %-24s", row->name);
  for (int k = 0; k < PA_N_TRAITS; k++)
    print_cell(m.mae[order[k]], 6, 3);
  print_cell(m.mae_sum, 7, 3);
  printf(" %7ld %7ld\n", scored, unknown);
}

static void print_pas(const Palign__PasResult *p) {
  printf("PAS       %s%s%s\n", p->status, p->message && *p->message ? ": " : "", p->message ? p->message : "");
  printf("          %d of %d layers x %d heads (head dim %d), %d samples (%d train, %d validation), "
         "run seed %llu, split seed %llu, fit %.2f s\n",
         (int)p->n_heads, p->n_layers, p->heads_per_layer, p->head_dim, p->n_samples, p->n_train, p->n_val,
         (unsigned long long)p->run_seed, (unsigned long long)p->split_seed, p->fit_seconds);
  if (p->grid_cost)
    printf("          alpha grid: %zu alphas x %zu items, %.2f s, %lld tokens\n", p->n_alphas, p->n_items,
           p->grid_cost->seconds, (long long)p->grid_cost->tokens);
  for (size_t i = 0; i < p->n_chosen; i++) {
    const Palign__PasChoice *c = p->chosen[i];
    char label[80];
    snprintf(label, sizeof label, "%s (%s)", c->variant, c->protocol);
    if (c->index < 0)
      printf("          %-22s nothing chosen\n", label);
    else
      printf("          %-22s alpha %g (grid index %d), selection MAE sum %.3f\n", label, c->alpha, c->index,
             c->select_mae_sum);
  }
  if (p->n_heads) {
    printf("          %5s %5s %7s %7s %9s\n", "layer", "head", "score", "val_acc", "sigma");
    for (size_t i = 0; i < p->n_heads; i++) {
      const Palign__PasHead *h = p->heads[i];
      printf("          %5d %5d %7.3f %7.3f %9.4g\n", h->layer, h->head, h->score, h->val_acc, h->sigma);
    }
  }
}

static void print_dpo(const Palign__DpoResult *d) {
  const Palign__DpoSettings *o = d->settings;
  printf("DPO       rank %d (scale %g) on q, k, v, o of %d layers, %zu values; seed %llu\n", d->rank, (double)d->scale,
         d->n_layers, d->n_adapter, (unsigned long long)d->seed);
  if (o)
    printf("          %d epochs, batch %d, lr %g, beta %g, alpha %g, weight decay %g\n", o->epochs, o->batch, o->lr,
           o->beta, o->alpha, o->weight_decay);
  printf("          %d pairs from %d prompts, %d steps; loss", d->n_pairs, d->n_items, d->n_steps);
  if (d->n_loss)
    printf(" %.4f at step 0, %.4f at the last step;", d->loss[0], d->loss[d->n_loss - 1]);
  printf(" by epoch");
  for (size_t e = 0; e < d->n_epoch_loss; e++)
    printf(" %.4f", d->epoch_loss[e]);
  printf("\n");
  if (d->reference_cost && d->train_cost)
    printf("          reference %.2f s, %lld tokens, %.3g FLOPs; steps %.2f s, %lld tokens, %.3g FLOPs; %.0f MB of "
           "activations\n",
           d->reference_cost->seconds, (long long)d->reference_cost->tokens, d->reference_flops, d->train_cost->seconds,
           (long long)d->train_cost->tokens, d->train_flops, (double)d->trainer_bytes / (1 << 20));
}

static int run_subject(const char *store, const char *id, bool json) {
  Palign__SubjectResult *r = NULL;
  if (pa_query_subject(store, id, &r)) {
    fprintf(stderr, "palign query: %s\n", pa_errmsg());
    return 1;
  }
  if (json) {
    int rc = print_json(pa_query_message_json(&r->base));
    palign__subject_result__free_unpacked(r, NULL);
    return rc;
  }
  char b[40];
  printf("subject   %s (index %lld)\n", r->subject_id, (long long)r->subject_index);
  printf("done by   rank %d on %s, %.2f s, finished %s\n", r->rank, r->host && *r->host ? r->host : "?", r->seconds,
         when(r->finished_unix, b));
  printf("model     %.16s  run seed %llu\n", r->model_fingerprint, (unsigned long long)r->run_seed);
  if (r->failed)
    printf("FAILED    %s\n", r->error);
  for (size_t j = 0; j < r->n_methods; j++) {
    const Palign__MethodResult *m = r->methods[j];
    if (m->failed) {
      printf("method    %s FAILED: %s\n", m->method, m->error);
      continue;
    }
    printf("method    %s", m->method);
    if (m->cost)
      printf(": %.2f s, %lld tokens (full prompts %lld), %lld prompts", m->cost->seconds, (long long)m->cost->tokens,
             (long long)m->cost->full_prompt_tokens, (long long)m->cost->prompts);
    printf("\n");
    if (m->n_rows)
      print_metrics_head();
    for (size_t k = 0; k < m->n_rows; k++)
      print_row(m->rows[k]);
  }
  if (r->pas)
    print_pas(r->pas);
  if (r->dpo)
    print_dpo(r->dpo);
  palign__subject_result__free_unpacked(r, NULL);
  return 0;
}

/* ---- export ------------------------------------------------------------------- */

static int run_export(const char *store, pa_query_format fmt, const char *out_path) {
  if (out_path && pa_path_within(out_path, store)) {
    fprintf(stderr, "palign query: --out %s is inside the store %s, whose files it could replace: write the export "
                    "elsewhere\n", out_path, store);
    return 1;
  }
  warn_ctx w = {.store = store};
  char *buf = NULL;
  size_t len = 0, rows = 0;
  /* with --out, the whole export is written in one atomic replacement */
  FILE *f = out_path ? open_memstream(&buf, &len) : stdout;
  if (!f) {
    fprintf(stderr, "palign query: out of memory\n");
    return 1;
  }
  int rc = pa_query_export(store, fmt, f, warn_damaged, &w, &rows);
  if (out_path) {
    if (fclose(f) != 0 && !rc)
      rc = pa_error(PA_ENOMEM, "out of memory building the export");
    if (!rc)
      rc = pa_write_atomic(out_path, &(pa_chunk){buf, len}, 1);
    free(buf);
  }
  if (rc) {
    fprintf(stderr, "palign query: %s%s\n", !out_path && ferror(stdout) ? "the standard output: " : "", pa_errmsg());
    return 1;
  }
  if (w.n)
    fprintf(stderr, "palign query: %s: %zu damaged record%s skipped\n", store, w.n, w.n == 1 ? "" : "s");
  if (out_path)
    fprintf(stderr, "palign query: %zu rows written to %s\n", rows, out_path);
  return 0;
}

/* ---- verify ------------------------------------------------------------------- */

static int run_verify(const char *store) {
  pa_query_verify_result v;
  if (pa_query_verify(store, print_problem, NULL, &v)) {
    fprintf(stderr, "palign query: %s\n", pa_errmsg());
    return 1;
  }
  printf("%s: %zu records ok (%zu subjects done, %zu failed)", store, v.records_ok, v.records_ok - v.subjects_failed,
         v.subjects_failed);
  if (v.subjects_total >= 0)
    printf(" of %lld subjects", (long long)v.subjects_total);
  printf(", %zu shard file%s, %zu problem%s\n", v.shards, v.shards == 1 ? "" : "s", v.problems,
         v.problems == 1 ? "" : "s");
  Palign__StoreIndex *ix = NULL;
  switch (pa_index_check(store, &ix)) {
  case PA_INDEX_CURRENT: printf("index: current, %zu subjects\n", ix->n_entries); break;
  case PA_INDEX_STALE:
    printf("index: stale (the shards changed since it was written; `palign query STORE index` rewrites it; until "
           "then lookups read the shards)\n");
    break;
  case PA_INDEX_UNREADABLE:
    printf("index: unreadable (damaged, or another palign's format; `palign query STORE index` rewrites it; until "
           "then lookups read the shards)\n");
    break;
  default: break;
  }
  if (ix)
    palign__store_index__free_unpacked(ix, NULL);
  return v.problems ? 1 : 0;
}

/* ---- index ------------------------------------------------------------------- */

static int run_index(const char *store) {
  int rc = pa_query_check_store(store);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  size_t n = 0;
  uint64_t bytes = 0;
  if (!rc)
    rc = pa_index_build(store, &n, &bytes);
  if (rc) {
    fprintf(stderr, "palign query: %s\n", pa_errmsg());
    return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  printf("%s/index.pb: %zu subjects, %llu bytes, written in %.2f s\n", store, n, (unsigned long long)bytes,
         (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
  return 0;
}

/* ---- the command -------------------------------------------------------------- */

static int bad_usage(const char *fmt, const char *arg) {
  fprintf(stderr, "palign query: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\n");
  usage(stderr);
  return 2;
}

int cmd_query(int argc, char **argv) {
  for (int i = 1; i < argc; i++)
    if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    }
  if (argc < 3)
    return bad_usage(argc < 2 ? "%sSTORE and COMMAND are required" : "%sCOMMAND is required", "");
  const char *store = argv[1], *cmd = argv[2];
  enum { SUMMARY, SUBJECT, EXPORT, VERIFY, INDEX } which;
  if (!strcmp(cmd, "summary"))
    which = SUMMARY;
  else if (!strcmp(cmd, "subject"))
    which = SUBJECT;
  else if (!strcmp(cmd, "export"))
    which = EXPORT;
  else if (!strcmp(cmd, "verify"))
    which = VERIFY;
  else if (!strcmp(cmd, "index"))
    which = INDEX;
  else
    return bad_usage("unknown command '%s'", cmd);

  bool json = false;
  const char *id = NULL, *out_path = NULL;
  pa_query_format fmt = PA_QUERY_CSV;
  for (int i = 3; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--json") && (which == SUMMARY || which == SUBJECT)) {
      json = true;
    } else if ((!strcmp(a, "--format") || !strcmp(a, "--out")) && which == EXPORT) {
      if (i + 1 >= argc)
        return bad_usage("%s needs a value", a);
      const char *v = argv[++i];
      if (!strcmp(a, "--out")) {
        out_path = v;
      } else if (!strcmp(v, "csv") || !strcmp(v, "json") || !strcmp(v, "records")) {
        fmt = !strcmp(v, "csv") ? PA_QUERY_CSV : !strcmp(v, "json") ? PA_QUERY_JSON : PA_QUERY_RECORDS;
      } else {
        return bad_usage("--format is csv, json or records, not '%s'", v);
      }
    } else if (which == SUBJECT && !id && (a[0] != '-' || (!strcmp(a, "--") && i + 1 < argc))) {
      id = a[0] == '-' ? argv[++i] : a; /* `subject -- -5`: an id that begins with '-' */
    } else if (which == SUBJECT && !id && !strcmp(a, "--")) {
      return bad_usage("%ssubject -- needs an ID after it", "");
    } else {
      return bad_usage(a[0] == '-' ? "unknown flag '%s' for this command" : "unexpected argument '%s'", a);
    }
  }
  if (which == SUBJECT && !id)
    return bad_usage("%ssubject needs an ID", "");

  int rc;
  switch (which) {
  case SUMMARY: rc = run_summary(store, json); break;
  case SUBJECT: rc = run_subject(store, id, json); break;
  case EXPORT: rc = run_export(store, fmt, out_path); break;
  case INDEX: rc = run_index(store); break;
  default: rc = run_verify(store); break;
  }
  /* what was printed must have arrived: `summary --json > out.json` on a
   * full disk is an error, not a truncated file and exit 0 */
  errno = 0;
  if (fflush(stdout) != 0 || ferror(stdout)) {
    if (!rc)
      fprintf(stderr, "palign query: writing to the standard output failed%s%s\n", errno ? ": " : "",
              errno ? strerror(errno) : "");
    return 1;
  }
  return rc;
}
