/* palign eval --papi DIR --methods LIST --subjects RANGE [--model M] [--json FILE]
 *             [--mode logits|generate] [--prefix P] [--keep-case] [--batch N]
 *             [--template NAME] [--threads N]
 * Evaluates methods on the subjects' test items and prints the per-method,
 * per-trait table beside the model-free rows. */
#include "cli_util.h"
#include "commands.h"

#include "chat.h"
#include "dpo.h"
#include "eval.h"
#include "backend.h"
#include "bank.h"
#include "fileio.h"
#include "forward.h"
#include "inventory.h"
#include "methods.h"
#include "metrics.h"
#include "model.h"
#include "pas.h"
#include "jsonfile.h"
#include "status.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_METHODS 16
#define MAX_ROWS    32

static void usage(FILE *f) {
  size_t n;
  const pa_method *const *all = pa_methods(&n);
  fprintf(f, "usage: palign eval --methods LIST [--model M] [--papi DIR] [--subjects RANGE] [--json FILE]\n"
             "                   [--mode logits|generate] [--prefix P] [--keep-case] [--bank-lowercase] [--no-share]\n"
             "                   [--batch N] [--template NAME] [--threads N] [--backend cpu|cuda|auto] [--weights W]\n"
             "\n"
             "  --methods LIST   comma-separated, from:\n");
  for (size_t i = 0; i < n; i++)
    fprintf(f, "                     %-10s %s\n", all[i]->name, all[i]->summary);
  fprintf(f, "                   const3 and trait_mean are always reported beside the others\n"
             "  --model M        a GGUF file or Hugging Face directory (needed by model methods)\n"
             "  --papi DIR       the PAPI data (default $PALIGN_PAPI_DIR or ../shared/papi)\n"
             "  --subjects RANGE all, N (the first N) or A-B (0-based, inclusive); default 5\n"
             "  --json FILE      write every prediction, the metrics and the settings\n"
             "  --mode M         logits (default: option-letter probabilities after \"Option (\") or\n"
             "                   generate (greedy 15 tokens after \"Option\", the reference's way)\n"
             "  --prefix P       the assistant's answer prefix instead of the mode's default (in logits\n"
             "                   mode PAS's bank puts its letters after it too: give it its own --bank)\n"
             "  --keep-case      do not lowercase item texts in questions\n"
             "  --bank-lowercase lowercase item texts in PAS's bank (its default keeps them as written)\n"
             "  --no-share       run every prompt whole instead of sharing its common prefix (for comparison)\n"
             "  --batch N        questions per forward batch (default 64)\n"
             "  --template NAME  chat template instead of the model's\n"
             "  --threads N      CPU threads (default: all cores)\n"
             "  --seed N         PAS run seed: probe splits and the holdout items (default 1)\n"
             "  --holdout N      PAS holdout protocol: selection items per trait (default 6)\n"
             "  --alphas LIST    PAS alpha grid, comma-separated (default 0,1,2,4,6,8)\n"
             "  --bank FILE      PAS activation bank cache (default $PALIGN_CACHE/bank-<model fingerprint>.bin);\n"
             "                   computed and saved when missing, refused when made for another setup\n");
  pa_backend_help(f, 19);
  pa_dpo_flags_help(f, 19);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* DPO's progress: a line every 10 s and at the end of a subject's training,
 * with the rate over the steps after the first (which has the start's
 * costs) and the time left. */
typedef struct {
  double first, last; /* when step 1 ended, when the last line was printed */
} step_clock;

static void dpo_step(void *ctx, int done, int total, double loss) {
  step_clock *c = ctx;
  const double t = now();
  if (done == 1)
    c->first = c->last = t;
  if (done > 1 && (done == total || t - c->last >= 10)) {
    const double per_step = (t - c->first) / (done - 1);
    fprintf(stderr, "  DPO step %d/%d, loss %.4f, %.2f s per step, about %.0f s left\n", done, total, loss, per_step,
            per_step * (total - done));
    c->last = t;
  }
}

/* obj[key] = v, or null where v is not a number */
static void add_number(cJSON *obj, const char *key, double v) {
  if (isnan(v))
    cJSON_AddNullToObject(obj, key);
  else
    cJSON_AddNumberToObject(obj, key, v);
}

/* obj[name] = {trait letter: v[trait]} */
static void add_traits(cJSON *obj, const char *name, const double *v) {
  cJSON *o = cJSON_AddObjectToObject(obj, name);
  for (int t = 0; t < PA_N_TRAITS; t++)
    add_number(o, (char[2]){pa_trait_letter(t), 0}, v[t]);
}

static cJSON *metrics_json(const pa_subject_metrics *m) {
  cJSON *o = cJSON_CreateObject();
  add_traits(o, "mae", m->mae);
  add_traits(o, "keyed_pred", m->keyed_pred);
  add_traits(o, "keyed_true", m->keyed_true);
  add_number(o, "mae_sum", m->mae_sum);
  int unknown = 0;
  for (int t = 0; t < PA_N_TRAITS; t++)
    unknown += m->n_unknown[t];
  cJSON_AddNumberToObject(o, "unknown", unknown);
  cJSON_AddNumberToObject(o, "missing_truth", m->n_missing);
  return o;
}

static int bank_progress(void *ctx, int done, int total) {
  (void)ctx;
  fprintf(stderr, "\ractivation bank: %d/%d sequences", done, total);
  if (done == total)
    fputc('\n', stderr);
  return 0;
}

/* The reference code answers every item of every alpha with its whole prompt
 * and then generates this many tokens (PAS.md). */
#define REFERENCE_GEN_TOKENS 15

static long reference_way_tokens(const pa_eval_stats *e) {
  return e->naive_tokens + (long)REFERENCE_GEN_TOKENS * e->prompts;
}

/* Writes root to path (replacing it atomically); 0 or PA_EIO, with a message. */
static int write_json(const cJSON *root, const char *path) {
  char *text = pa_json_print(root, true);
  int rc = text ? pa_write_atomic(path, &(pa_chunk){text, strlen(text)}, 1) : PA_ENOMEM;
  free(text);
  if (rc)
    fprintf(stderr, "palign eval: cannot write %s: %s\n", path, pa_errmsg());
  return rc ? PA_EIO : PA_OK;
}

/* The PAS activation bank from its cache file, or computed and saved there. */
static int load_bank(const char *model_path, const char *bank_path, const char *prefix, bool lowercase, pa_lm *lm,
                     const pa_model *model, const pa_chat_template *tmpl, const pa_inventory *inv, pa_bank **out) {
  char fp[65], path[4096];
  int rc = pa_model_fingerprint(model_path, fp);
  if (rc)
    return rc;
  if (!bank_path) {
    char file[64];
    pa_bank_file_name(fp, pa_lm_weights(lm), file, sizeof file);
    bank_path = pa_cache_file(file, path, sizeof path);
  }
  const pa_bank_opts bo = {
      .progress = bank_progress, .weights = pa_lm_weights(lm), .prefix = prefix, .lowercase = lowercase};
  pa_bank_key key;
  rc = pa_bank_key_make(fp, pa_model_config_get(model), pa_model_tokenizer(model), tmpl, inv, &bo, &key);
  bool loaded = false;
  if (!rc)
    rc = pa_bank_load_or_compute(bank_path, &key, lm, pa_model_tokenizer(model), tmpl, inv, &bo, out, &loaded);
  if (!rc)
    fprintf(stderr, "activation bank %s %s\n", loaded ? "read from" : "computed and saved to", bank_path);
  return rc;
}

int cmd_eval(int argc, char **argv) {
  const char *model_path = NULL, *papi = NULL, *json_path = NULL, *range = "5";
  const char *methods_arg = NULL, *template_name = NULL, *backend_name = "cpu";
  int weights = PA_WEIGHTS_AUTO;
  step_clock clock = {0};
  pa_eval_opts eo = {.step = dpo_step, .poll_ctx = &clock};
  int threads = 0, holdout = 0, n_alphas = 0;
  uint64_t seed = 1;
  double alphas[PA_PAS_MAX_ALPHAS];
  const char *bank_path = NULL;
  bool bank_lowercase = false; /* PAS.md: the bank keeps the item text as written */
  pa_dpo_opts dpo = pa_dpo_defaults();
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    }
    if (!strcmp(a, "--keep-case")) {
      eo.keep_case = true;
      continue;
    }
    if (!strcmp(a, "--bank-lowercase")) {
      bank_lowercase = true;
      continue;
    }
    if (!strcmp(a, "--no-share")) {
      eo.no_share = true;
      continue;
    }
    static const char *const opts[] = {"--model",   "--papi",   "--subjects", "--json",    "--methods", "--mode",
                                       "--prefix",  "--batch",  "--template", "--threads", "--seed",    "--bank",
                                       "--holdout", "--alphas", "--backend",  "--weights"};
    int k = -1;
    for (int j = 0; j < (int)(sizeof opts / sizeof opts[0]); j++)
      if (!strcmp(a, opts[j]))
        k = j;
    if (k < 0 && i + 1 < argc) {
      const int d = pa_dpo_flag(stderr, "palign eval", a, argv[i + 1], &dpo);
      if (d < 0)
        return 2;
      if (d > 0) {
        i++;
        continue;
      }
    }
    if (k < 0 || i + 1 >= argc) {
      fprintf(stderr, k < 0 ? "palign eval: unexpected argument '%s'\n" : "palign eval: %s needs a value\n", a);
      usage(stderr);
      return 2;
    }
    const char *v = argv[++i];
    long long n = 0;
    switch (k) {
    case 0: model_path = v; break;
    case 1: papi = v; break;
    case 2: range = v; break;
    case 3: json_path = v; break;
    case 4: methods_arg = v; break;
    case 5:
      if (strcmp(v, "logits") && strcmp(v, "generate")) {
        fprintf(stderr, "palign eval: --mode is logits or generate, not '%s'\n", v);
        return 2;
      }
      eo.mode = strcmp(v, "logits") ? PA_READ_GENERATE : PA_READ_LOGITS;
      break;
    case 6: eo.prefix = v; break;
    case 7:
      if (pa_arg_int(stderr, "palign eval", a, v, 1, 4096, &n))
        return 2;
      eo.batch = (int)n;
      break;
    case 8: template_name = v; break;
    case 9:
      if (pa_arg_int(stderr, "palign eval", a, v, 1, 1024, &n))
        return 2;
      threads = (int)n;
      break;
    case 10:
      if (pa_arg_int(stderr, "palign eval", a, v, 0, 4294967295LL, &n))
        return 2;
      seed = (uint64_t)n;
      break;
    case 11: bank_path = v; break;
    case 12:
      if (pa_arg_int(stderr, "palign eval", a, v, 1, 1000, &n))
        return 2;
      holdout = (int)n;
      break;
    case 14:
      if (pa_backend_arg(stderr, "palign eval", v))
        return 2;
      backend_name = v;
      break;
    case 15:
      if (pa_weights_arg(stderr, "palign eval", v))
        return 2;
      weights = pa_weight_format_parse(v);
      break;
    default:
      if ((n_alphas = pa_pas_parse_alphas(v, alphas)) < 0) {
        fprintf(stderr, "palign eval: --alphas: %s\n", pa_errmsg());
        return 2;
      }
      break;
    }
  }
  if (!methods_arg) {
    fprintf(stderr, "palign eval: --methods is required\n");
    usage(stderr);
    return 2;
  }
  /* the methods asked for, then the model-free rows if not asked */
  const pa_method *methods[MAX_METHODS];
  int n_methods = 0;
  bool need_model = false, need_bank = false;
  n_methods = pa_methods_parse(methods_arg, methods, MAX_METHODS);
  if (n_methods < 0) {
    fprintf(stderr, "palign eval: %s (see --help)\n", pa_errmsg());
    return 2;
  }
  bool need_dpo = false;
  for (int j = 0; j < n_methods; j++) {
    need_model |= methods[j]->needs_model;
    need_bank |= methods[j]->needs_bank;
    need_dpo |= methods[j]->needs_dpo;
  }
  dpo.run_seed = seed;
  if (pa_dpo_validate(&dpo)) { /* a bad --dpo-* value is a bad flag, whatever the methods */
    fprintf(stderr, "palign eval: %s\n", pa_errmsg());
    return 2;
  }
  if (need_dpo && eo.mode != PA_READ_LOGITS) {
    fprintf(stderr, "palign eval: the DPO methods train on the option letters' logits: use --mode logits\n");
    return 2;
  }
  char be_err[256];
  const pa_backend *backend = need_model ? pa_backend_named(backend_name, 0, be_err, sizeof be_err) : NULL;
  if (need_model && !backend) {
    fprintf(stderr, "palign eval: %s\n", be_err);
    return 1;
  }
  if (need_model && !model_path) {
    fprintf(stderr, "palign eval: the methods asked for need --model\n");
    return 2;
  }

  pa_inventory *inv = NULL;
  pa_subjects *subjects = NULL;
  pa_model *model = NULL;
  pa_lm *lm = NULL;
  pa_chat_template *named = NULL;
  pa_evaluator *ev = NULL;
  pa_bank *bank = NULL;
  int rc = pa_papi_load(papi, NULL, &inv, &subjects);
  size_t first = 0, last = 0;
  if (!rc && pa_subjects_range(range, pa_subjects_count(subjects), &first, &last)) {
    fprintf(stderr, "palign eval: --subjects '%s' is not all, N or A-B within the %zu subjects\n", range,
            pa_subjects_count(subjects));
    pa_subjects_destroy(subjects);
    pa_inventory_destroy(inv);
    return 2;
  }
  if (!rc && need_bank && pa_pas_holdout_check(inv, holdout)) { /* before the bank is computed */
    fprintf(stderr, "palign eval: %s\n", pa_errmsg());
    pa_subjects_destroy(subjects);
    pa_inventory_destroy(inv);
    return 2;
  }
  if (!rc && need_model) {
    rc = pa_model_open(model_path, &model);
    if (!rc && template_name)
      rc = pa_chat_template_from_name(template_name, &named);
    const pa_chat_template *tmpl = named ? named : rc ? NULL : pa_model_chat(model);
    if (!rc && !tmpl)
      rc = pa_error(PA_ENOTFOUND, "%s: no chat template palign knows; choose one with --template", model_path);
    if (!rc)
      /* the longest prompts (an ICL system prompt and a question) stay well under 4,096 tokens */
      rc = pa_lm_create(model,
                        &(pa_lm_opts){.n_threads = threads,
                                      .max_seq = pa_model_config_get(model)->max_seq < 4096
                                                     ? pa_model_config_get(model)->max_seq
                                                     : 4096,
                                      .backend = backend,
                                      .weights = (pa_weight_format)weights},
                        &lm);
    if (!rc)
      rc = pa_evaluator_create(lm, pa_model_tokenizer(model), tmpl, &eo, &ev);
    if (!rc && need_bank)
      /* the letters' activations after the prefix the answers are read after
       * (logits mode; generate mode's "Option" is followed by no letter) */
      rc = load_bank(model_path, bank_path, eo.mode == PA_READ_LOGITS ? eo.prefix : NULL, bank_lowercase, lm, model,
                     tmpl, inv, &bank);
  }
  if (rc) {
    fprintf(stderr, "palign eval: %s\n", pa_errmsg());
    pa_bank_destroy(bank);
    pa_evaluator_destroy(ev);
    pa_lm_destroy(lm);
    pa_chat_template_destroy(named);
    pa_model_close(model);
    pa_subjects_destroy(subjects);
    pa_inventory_destroy(inv);
    return 1;
  }

  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  const size_t n_subj = last - first + 1;
  /* rows of the table, in order of appearance: a method may report several */
  char row_name[MAX_ROWS][48];
  int n_rows = 0;
  pa_subject_metrics *sm = calloc(n_subj * MAX_ROWS, sizeof *sm);
  int n_done[MAX_ROWS] = {0};
  double seconds[MAX_METHODS] = {0};
  long tokens[MAX_METHODS] = {0}, naive[MAX_METHODS] = {0};
  int runs[MAX_METHODS] = {0};
  pa_method_out mo = {0};
  for (int r = 0; r < PA_METHOD_MAX_ROWS; r++) {
    mo.preds[r] = malloc((size_t)n_test * sizeof *mo.preds[r]);
    mo.probs[r] = malloc((size_t)n_test * 5 * sizeof *mo.probs[r]);
  }
  pa_pas_result pas_result = {0};
  pa_dpo_result dpo_result = {0};
  struct {
    int n;
    double ref_s, train_s, ref_flops, train_flops;
    long ref_tokens, train_tokens;
    size_t bytes;
  } dpo_cost = {0};
  cJSON *root = cJSON_CreateObject(), *jsub = cJSON_AddArrayToObject(root, "subjects");
  pa_method_ctx ctx = {.inv = inv,
                       .ev = ev,
                       .pas = {.run_seed = (uint64_t)seed,
                               .holdout_per_trait = holdout,
                               .alphas = n_alphas ? alphas : NULL,
                               .n_alphas = n_alphas,
                               .variants = pa_methods_pas_variants(methods, n_methods)},
                       .pas_result = &pas_result,
                       .dpo = dpo,
                       .dpo_result = &dpo_result};
  pa_pas_bank bank_view;
  if (bank) {
    bank_view = pa_bank_view(bank);
    ctx.bank = &bank_view;
  }
  struct {
    int n;
    double fit_s, grid_s;
    long tokens, naive, ref;
  } pas_cost = {0};
  const double t_start = now();
  size_t skipped = 0, failed = 0;
  double last_report = 0;
  for (size_t k = 0; k < n_subj; k++) {
    const pa_subject *s = pa_subjects_at(subjects, first + k);
    if (!s->usable) {
      fprintf(stderr, "palign eval: skipping subject %s: %s\n", s->id, s->reason);
      skipped++;
      continue;
    }
    cJSON *js = cJSON_CreateObject();
    cJSON_AddStringToObject(js, "id", s->id);
    cJSON *jm = cJSON_AddObjectToObject(js, "methods");
    for (int j = 0; j < n_methods; j++) {
      int mrc = methods[j]->run(&ctx, s, test, n_test, &mo);
      if (mrc) {
        fprintf(stderr, "palign eval: subject %s, method %s failed: %s\n", s->id, methods[j]->name, pa_errmsg());
        failed++;
        continue;
      }
      const pa_eval_stats *st = &mo.stats;
      seconds[j] += st->seconds;
      tokens[j] += st->prefix_tokens + st->question_tokens;
      naive[j] += st->naive_tokens;
      runs[j]++;
      for (int r = 0; r < mo.n_rows; r++) {
        int row = 0;
        while (row < n_rows && strcmp(row_name[row], mo.name[r]) != 0)
          row++;
        if (row == n_rows) {
          if (n_rows == MAX_ROWS)
            continue;
          snprintf(row_name[n_rows++], sizeof row_name[0], "%s", mo.name[r]);
        }
        pa_pred *preds = mo.preds[r];
        for (int i = 0; i < mo.n[r]; i++)
          preds[i].truth = s->answers[preds[i].item];
        pa_subject_metrics *m = &sm[(size_t)n_done[row]++ * MAX_ROWS + row];
        pa_metrics_subject(inv, preds, mo.n[r], m);
        cJSON *o = metrics_json(m);
        cJSON_AddNumberToObject(o, "seconds", st->seconds);
        cJSON_AddNumberToObject(o, "tokens", (double)(st->prefix_tokens + st->question_tokens));
        cJSON_AddNumberToObject(o, "naive_tokens", (double)st->naive_tokens);
        cJSON *items = cJSON_AddArrayToObject(o, "items");
        for (int i = 0; i < mo.n[r]; i++) {
          cJSON *it = cJSON_CreateObject();
          cJSON_AddNumberToObject(it, "item", preds[i].item);
          cJSON_AddNumberToObject(it, "truth", preds[i].truth);
          cJSON_AddNumberToObject(it, "answer", preds[i].answer);
          if (!isnan(preds[i].expected))
            cJSON_AddNumberToObject(it, "expected", preds[i].expected);
          if (!isnan(mo.probs[r][(size_t)i * 5]))
            cJSON_AddItemToObject(it, "p", cJSON_CreateFloatArray(mo.probs[r] + (size_t)i * 5, 5));
          cJSON_AddItemToArray(items, it);
        }
        cJSON_AddItemToObject(jm, mo.name[r], o);
        if (methods[j]->needs_model)
          fprintf(stderr, "  subject %s  %-22s sum MAE %.2f  %5.1f s  %ld tokens (%.1fx fewer than full prompts)\n",
                  s->id, mo.name[r], m->mae_sum, st->seconds, st->prefix_tokens + st->question_tokens,
                  st->prefix_tokens + st->question_tokens > 0
                      ? (double)st->naive_tokens / (double)(st->prefix_tokens + st->question_tokens)
                      : 0.0);
      }
      if (methods[j]->needs_bank && pas_result.status == PA_PAS_FITTED && !strcmp(pas_result.subject_id, s->id)) {
        cJSON *pj = cJSON_AddObjectToObject(jm, methods[j]->name);
        const pa_pas_variant v = strcmp(methods[j]->name, "pas") ? PA_PAS_VAR_ONLY : PA_PAS_VAR_PAS;
        for (int p = 0; p < PA_PAS_N_PROTOCOLS; p++)
          cJSON_AddNumberToObject(pj, p ? "alpha_holdout" : "alpha_reference", pas_result.chosen[v][p].alpha);
        cJSON_AddNumberToObject(pj, "fit_seconds", pas_result.fit_seconds);
        cJSON_AddNumberToObject(pj, "alpha_grid_seconds", pas_result.eval_seconds);
        cJSON_AddNumberToObject(pj, "alpha_grid_tokens",
                                (double)(pas_result.eval.prefix_tokens + pas_result.eval.question_tokens));
        cJSON_AddNumberToObject(pj, "full_prompt_tokens", (double)pas_result.eval.naive_tokens);
        cJSON_AddNumberToObject(pj, "reference_way_tokens", (double)reference_way_tokens(&pas_result.eval));
        cJSON *heads = cJSON_AddArrayToObject(pj, "heads");
        for (int h = 0; h < pas_result.fit.n_selected; h++) {
          cJSON *jh = cJSON_CreateObject();
          cJSON_AddNumberToObject(jh, "layer", pas_result.fit.heads[h].layer);
          cJSON_AddNumberToObject(jh, "head", pas_result.fit.heads[h].head);
          cJSON_AddNumberToObject(jh, "score", pas_result.fit.heads[h].score);
          cJSON_AddNumberToObject(jh, "sigma", pas_result.fit.heads[h].sigma);
          cJSON_AddItemToArray(heads, jh);
        }
      }
    }
    if (need_dpo && dpo_result.adapter && !strcmp(dpo_result.subject_id, s->id)) {
      const pa_dpo_result *d = &dpo_result;
      fprintf(stderr,
              "  subject %s  DPO: %d pairs (%d prompts), %d steps, loss %.4f -> %.4f (last epoch %.4f); reference "
              "%.1f s, steps %.1f s, %ld tokens, %.3g FLOPs\n",
              s->id, d->n_pairs, d->n_items, d->n_steps, d->loss[0], d->loss[d->n_steps - 1],
              d->epoch_loss[d->opts.epochs - 1], d->ref_seconds, d->train_seconds, d->train_tokens,
              d->ref_flops + d->train_flops);
      cJSON *dj = cJSON_AddObjectToObject(jm, "dpo_training");
      cJSON_AddNumberToObject(dj, "pairs", d->n_pairs);
      cJSON_AddNumberToObject(dj, "prompts", d->n_items);
      cJSON_AddNumberToObject(dj, "steps", d->n_steps);
      cJSON_AddItemToObject(dj, "loss", cJSON_CreateDoubleArray(d->loss, d->n_steps));
      cJSON_AddItemToObject(dj, "epoch_loss", cJSON_CreateDoubleArray(d->epoch_loss, d->opts.epochs));
      cJSON_AddNumberToObject(dj, "reference_seconds", d->ref_seconds);
      cJSON_AddNumberToObject(dj, "train_seconds", d->train_seconds);
      cJSON_AddNumberToObject(dj, "reference_tokens", (double)d->ref_tokens);
      cJSON_AddNumberToObject(dj, "train_tokens", (double)d->train_tokens);
      cJSON_AddNumberToObject(dj, "reference_flops", d->ref_flops);
      cJSON_AddNumberToObject(dj, "train_flops", d->train_flops);
      cJSON_AddNumberToObject(dj, "trainer_bytes", (double)d->trainer_bytes);
      dpo_cost.n++;
      dpo_cost.ref_s += d->ref_seconds, dpo_cost.train_s += d->train_seconds;
      dpo_cost.ref_flops += d->ref_flops, dpo_cost.train_flops += d->train_flops;
      dpo_cost.ref_tokens += d->ref_tokens, dpo_cost.train_tokens += d->train_tokens;
      dpo_cost.bytes = d->trainer_bytes > dpo_cost.bytes ? d->trainer_bytes : dpo_cost.bytes;
    }
    cJSON_AddItemToArray(jsub, js);
    if (need_bank && pas_result.status == PA_PAS_FITTED && !strcmp(pas_result.subject_id, s->id)) {
      const pa_eval_stats *e = &pas_result.eval;
      const long t = e->prefix_tokens + e->question_tokens, ref = reference_way_tokens(e);
      fprintf(stderr,
              "  subject %s  PAS: probes %.2f s, alpha grid %.1f s, %ld tokens (full prompts %ld, the reference's "
              "way %ld: %.1fx)\n",
              s->id, pas_result.fit_seconds, pas_result.eval_seconds, t, e->naive_tokens, ref,
              t > 0 ? (double)ref / (double)t : 0.0);
      pas_cost.n++;
      pas_cost.fit_s += pas_result.fit_seconds;
      pas_cost.grid_s += pas_result.eval_seconds;
      pas_cost.tokens += t;
      pas_cost.naive += e->naive_tokens;
      pas_cost.ref += ref;
    }
    if (json_path)
      write_json(root, json_path); /* what is done so far survives an interrupted run */
    const double el = now() - t_start, rate = (double)(k + 1) / el;
    if (need_model || k + 1 == n_subj || el - last_report >= 2) {
      fprintf(stderr, "[%zu/%zu] subjects done, %.2f subjects/min, %.0f s elapsed, about %.0f s left\n", k + 1, n_subj,
              rate * 60, el, (double)(n_subj - k - 1) / rate);
      last_report = el;
    }
  }

  /* the table */
  pa_method_summary sums[MAX_ROWS];
  const char *names[MAX_ROWS];
  pa_subject_metrics *col = malloc(n_subj * sizeof *col);
  for (int r = 0; r < n_rows; r++) {
    for (int k = 0; k < n_done[r]; k++)
      col[k] = sm[(size_t)k * MAX_ROWS + r];
    pa_metrics_summarise(col, n_done[r], &sums[r]);
    names[r] = row_name[r];
  }
  printf("\nMean absolute error on the subjects' test items (lower is better; %zu subjects, %s mode)\n",
         n_subj - skipped, eo.mode == PA_READ_LOGITS ? "logits" : "generate");
  pa_metrics_print_table(stdout, names, sums, n_rows);
  putchar('\n');
  pa_metrics_print_keyed(stdout, names, sums, n_rows);
  for (int j = 0; j < n_methods; j++)
    if (methods[j]->needs_bank && runs[j] > 0 && tokens[j] == 0)
      printf("%-10s computed together with the other PAS variant (one fit, both prompts)\n", methods[j]->name);
    else if (methods[j]->needs_model && runs[j] > 0)
      printf("%-10s %.1f s per subject, %.0f tokens per subject (full prompts one by one: %.0f)\n", methods[j]->name,
             seconds[j] / runs[j], (double)tokens[j] / runs[j], (double)naive[j] / runs[j]);
  if (pas_cost.n > 0) {
    const pa_bank_stats *bs = pa_bank_stats_get(bank);
    const long bank_tokens = bs->prefix_tokens + bs->continuation_tokens;
    int n_usable = 0;
    for (size_t i = 0; i < pa_subjects_count(subjects); i++)
      n_usable += pa_subjects_at(subjects, i)->usable;
    printf("PAS per fitted subject (%d): bank %.1f s and %ld tokens once per model (%.2f s per subject over the %d "
           "usable subjects), probes %.2f s, alpha grid %.1f s\n",
           pas_cost.n, bs->seconds, bank_tokens, bs->seconds / (n_usable > 0 ? n_usable : 1), n_usable,
           pas_cost.fit_s / pas_cost.n, pas_cost.grid_s / pas_cost.n);
    printf("PAS tokens per fitted subject: %.0f computed; %.0f as full prompts one by one; %.0f the reference's way "
           "(every alpha x every item, full prompt + %d generated tokens): %.1fx more\n",
           (double)pas_cost.tokens / pas_cost.n, (double)pas_cost.naive / pas_cost.n, (double)pas_cost.ref / pas_cost.n,
           REFERENCE_GEN_TOKENS, pas_cost.tokens > 0 ? (double)pas_cost.ref / (double)pas_cost.tokens : 0.0);
  }
  if (dpo_cost.n > 0)
    printf("DPO per trained subject (%d): reference %.1f s, %.0f tokens, %.3g FLOPs; steps %.1f s, %.0f tokens, %.3g "
           "FLOPs; %zu MB of activations planned\n",
           dpo_cost.n, dpo_cost.ref_s / dpo_cost.n, (double)dpo_cost.ref_tokens / dpo_cost.n,
           dpo_cost.ref_flops / dpo_cost.n, dpo_cost.train_s / dpo_cost.n, (double)dpo_cost.train_tokens / dpo_cost.n,
           dpo_cost.train_flops / dpo_cost.n, dpo_cost.bytes >> 20);
  if (skipped || failed)
    printf("%zu subjects skipped as unusable, %zu method runs failed (see the messages above)\n", skipped, failed);

  if (json_path) {
    cJSON *settings = cJSON_AddObjectToObject(root, "settings");
    cJSON_AddStringToObject(settings, "model", model_path ? model_path : "");
    cJSON_AddStringToObject(settings, "papi", pa_papi_dir(papi));
    cJSON_AddStringToObject(settings, "mode", eo.mode == PA_READ_LOGITS ? "logits" : "generate");
    cJSON_AddBoolToObject(settings, "lowercase_items", !eo.keep_case);
    cJSON_AddBoolToObject(settings, "bank_lowercase_items", bank_lowercase);
    cJSON_AddStringToObject(settings, "subjects", range);
    cJSON_AddNumberToObject(settings, "seed", seed);
    if (need_dpo) {
      cJSON *dj = cJSON_AddObjectToObject(settings, "dpo");
      cJSON_AddNumberToObject(dj, "epochs", dpo.epochs);
      cJSON_AddNumberToObject(dj, "batch", dpo.batch);
      cJSON_AddNumberToObject(dj, "lr", dpo.lr);
      cJSON_AddNumberToObject(dj, "beta", dpo.beta);
      cJSON_AddNumberToObject(dj, "rank", dpo.rank);
      cJSON_AddNumberToObject(dj, "alpha", dpo.alpha);
      cJSON_AddNumberToObject(dj, "weight_decay", dpo.weight_decay);
    }
    cJSON *summary = cJSON_AddObjectToObject(root, "summary");
    for (int r = 0; r < n_rows; r++) {
      cJSON *o = cJSON_AddObjectToObject(summary, names[r]);
      cJSON_AddNumberToObject(o, "subjects", sums[r].n_subjects);
      add_number(o, "mae_sum", sums[r].sum);
      add_number(o, "mae_sum_ci95", sums[r].sum_ci);
      add_traits(o, "mae", sums[r].mae);
      add_traits(o, "keyed_mae", sums[r].keyed_mae);
      add_traits(o, "keyed_r", sums[r].keyed_r);
      cJSON_AddNumberToObject(o, "unknown", (double)sums[r].n_unknown);
    }
    if (write_json(root, json_path))
      rc = PA_EIO;
  }
  cJSON_Delete(root);
  free(col), free(sm);
  for (int r = 0; r < PA_METHOD_MAX_ROWS; r++)
    free(mo.preds[r]), free(mo.probs[r]);
  pa_pas_result_free(&pas_result);
  pa_dpo_result_free(&dpo_result);
  pa_bank_destroy(bank);
  pa_evaluator_destroy(ev);
  pa_lm_destroy(lm);
  pa_chat_template_destroy(named);
  pa_model_close(model);
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return rc ? 1 : 0;
}
