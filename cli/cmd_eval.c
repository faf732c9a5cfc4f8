/* palign eval --papi DIR --methods LIST --subjects RANGE [--model M] [--json FILE]
 *             [--mode logits|generate] [--prefix P] [--keep-case] [--batch N]
 *             [--template NAME] [--threads N]
 * Evaluates methods on the subjects' test items and prints the per-method,
 * per-trait table beside the model-free rows. */
#include "commands.h"

#include "chat.h"
#include "eval.h"
#include "forward.h"
#include "inventory.h"
#include "methods.h"
#include "metrics.h"
#include "model.h"
#include "status.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_METHODS 16

static void usage(FILE *f) {
  size_t n;
  const pa_method *const *all = pa_methods(&n);
  fprintf(f, "usage: palign eval --methods LIST [--model M] [--papi DIR] [--subjects RANGE] [--json FILE]\n"
             "                   [--mode logits|generate] [--prefix P] [--keep-case] [--no-share] [--batch N]\n"
             "                   [--template NAME] [--threads N]\n"
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
             "  --prefix P       the assistant's answer prefix instead of the mode's default\n"
             "  --keep-case      do not lowercase item texts in questions\n"
             "  --no-share       run every prompt whole instead of sharing its common prefix (for comparison)\n"
             "  --batch N        questions per forward batch (default 64)\n"
             "  --template NAME  chat template instead of the model's\n"
             "  --threads N      CPU threads (default: all cores)\n");
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse_int(const char *flag, const char *v, int lo, int hi, int *out) {
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || end == v || *end || x < lo || x > hi) {
    fprintf(stderr, "palign eval: %s must be an integer in %d..%d, not '%s'\n", flag, lo, hi, v);
    return -1;
  }
  *out = (int)x;
  return 0;
}

/* RANGE -> [*first, *last] (0-based, inclusive) within n subjects. */
static int parse_range(const char *r, size_t n, size_t *first, size_t *last) {
  if (!strcmp(r, "all")) {
    *first = 0, *last = n - 1;
    return 0;
  }
  char *end;
  errno = 0;
  unsigned long a = strtoul(r, &end, 10);
  if (errno || end == r)
    return -1;
  if (*end == '\0') {
    if (a == 0)
      return -1;
    *first = 0, *last = (a > n ? n : a) - 1;
    return 0;
  }
  if (*end != '-')
    return -1;
  const char *r2 = end + 1;
  unsigned long b = strtoul(r2, &end, 10);
  if (errno || end == r2 || *end || b < a || a >= n)
    return -1;
  *first = a, *last = b >= n ? n - 1 : b;
  return 0;
}

static cJSON *metrics_json(const pa_subject_metrics *m) {
  cJSON *o = cJSON_CreateObject();
  cJSON *mae = cJSON_AddObjectToObject(o, "mae");
  for (int t = 0; t < PA_N_TRAITS; t++) {
    char k[2] = {pa_trait_letter(t), 0};
    if (isnan(m->mae[t]))
      cJSON_AddNullToObject(mae, k);
    else
      cJSON_AddNumberToObject(mae, k, m->mae[t]);
  }
  if (isnan(m->mae_sum))
    cJSON_AddNullToObject(o, "mae_sum");
  else
    cJSON_AddNumberToObject(o, "mae_sum", m->mae_sum);
  int unknown = 0;
  for (int t = 0; t < PA_N_TRAITS; t++)
    unknown += m->n_unknown[t];
  cJSON_AddNumberToObject(o, "unknown", unknown);
  cJSON_AddNumberToObject(o, "missing_truth", m->n_missing);
  return o;
}

int cmd_eval(int argc, char **argv) {
  const char *model_path = NULL, *papi = getenv("PALIGN_PAPI_DIR"), *json_path = NULL, *range = "5";
  const char *methods_arg = NULL, *template_name = NULL;
  pa_eval_opts eo = {0};
  int threads = 0;
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
    if (!strcmp(a, "--no-share")) {
      eo.no_share = true;
      continue;
    }
    static const char *const opts[] = {"--model", "--papi",   "--subjects", "--json",    "--methods",
                                       "--mode",  "--prefix", "--batch",    "--template", "--threads"};
    int k = -1;
    for (int j = 0; j < (int)(sizeof opts / sizeof opts[0]); j++)
      if (!strcmp(a, opts[j]))
        k = j;
    if (k < 0 || i + 1 >= argc) {
      fprintf(stderr, k < 0 ? "palign eval: unexpected argument '%s'\n" : "palign eval: %s needs a value\n", a);
      usage(stderr);
      return 2;
    }
    const char *v = argv[++i];
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
    case 7: if (parse_int(a, v, 1, 4096, &eo.batch)) return 2; break;
    case 8: template_name = v; break;
    default: if (parse_int(a, v, 1, 1024, &threads)) return 2; break;
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
  bool need_model = false;
  char *list = strdup(methods_arg);
  for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    const pa_method *m = pa_method_find(tok);
    if (!m) {
      fprintf(stderr, "palign eval: unknown method '%s' (see --help)\n", tok);
      free(list);
      return 2;
    }
    bool dup = false;
    for (int j = 0; j < n_methods; j++)
      dup |= methods[j] == m;
    if (!dup && n_methods < MAX_METHODS - 2)
      methods[n_methods++] = m;
    need_model |= m->needs_model;
  }
  free(list);
  for (int j = 0; j < 2; j++) {
    const pa_method *m = pa_method_find(j ? "trait_mean" : "const3");
    bool have = false;
    for (int k = 0; k < n_methods; k++)
      have |= methods[k] == m;
    if (!have)
      methods[n_methods++] = m;
  }
  if (need_model && !model_path) {
    fprintf(stderr, "palign eval: the methods asked for need --model\n");
    return 2;
  }
  char papi_buf[4096];
  if (!papi || !*papi) {
    snprintf(papi_buf, sizeof papi_buf, "../shared/papi");
    papi = papi_buf;
  }

  pa_inventory *inv = NULL;
  pa_subjects *subjects = NULL;
  pa_model *model = NULL;
  pa_lm *lm = NULL;
  pa_chat_template *named = NULL;
  pa_evaluator *ev = NULL;
  char path[4096 + 64];
  int rc = pa_inventory_load(papi, &inv);
  if (!rc) {
    snprintf(path, sizeof path, "%s/Test-set.json", papi);
    rc = pa_subjects_load(path, inv, &subjects);
  }
  if (!rc) {
    snprintf(path, sizeof path, "%s/personality_prompt.json", papi);
    rc = pa_subjects_load_descriptions(subjects, path);
  }
  size_t first = 0, last = 0;
  if (!rc && parse_range(range, pa_subjects_count(subjects), &first, &last)) {
    fprintf(stderr, "palign eval: --subjects '%s' is not all, N or A-B within the %zu subjects\n", range,
            pa_subjects_count(subjects));
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
      rc = pa_lm_create(model, &(pa_lm_opts){.n_threads = threads, .max_seq = 4096}, &lm);
    if (!rc)
      rc = pa_evaluator_create(lm, pa_model_tokenizer(model), tmpl, &eo, &ev);
  }
  if (rc) {
    fprintf(stderr, "palign eval: %s\n", pa_errmsg());
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
  pa_subject_metrics *sm = calloc(n_subj * (size_t)n_methods, sizeof *sm);
  int *n_done = calloc((size_t)n_methods, sizeof *n_done);
  pa_pred *preds = malloc((size_t)n_test * sizeof *preds);
  float *probs = malloc((size_t)n_test * 5 * sizeof *probs);
  double *seconds = calloc((size_t)n_methods, sizeof *seconds);
  long *tokens = calloc((size_t)n_methods, sizeof *tokens), *naive = calloc((size_t)n_methods, sizeof *naive);
  cJSON *root = cJSON_CreateObject(), *jsub = cJSON_AddArrayToObject(root, "subjects");
  const pa_method_ctx ctx = {.inv = inv, .ev = ev};
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
      pa_eval_stats st = {0};
      int mrc = methods[j]->run(&ctx, s, test, n_test, preds, probs, &st);
      if (mrc) {
        fprintf(stderr, "palign eval: subject %s, method %s failed: %s\n", s->id, methods[j]->name, pa_errmsg());
        failed++;
        continue;
      }
      for (int i = 0; i < n_test; i++)
        preds[i].truth = s->answers[preds[i].item];
      pa_metrics_subject(inv, preds, n_test, &sm[(size_t)n_done[j]++ * n_methods + j]);
      seconds[j] += st.seconds;
      tokens[j] += st.prefix_tokens + st.question_tokens;
      naive[j] += st.naive_tokens;
      cJSON *o = metrics_json(&sm[(size_t)(n_done[j] - 1) * n_methods + j]);
      cJSON_AddNumberToObject(o, "seconds", st.seconds);
      cJSON_AddNumberToObject(o, "tokens", (double)(st.prefix_tokens + st.question_tokens));
      cJSON_AddNumberToObject(o, "naive_tokens", (double)st.naive_tokens);
      cJSON *items = cJSON_AddArrayToObject(o, "items");
      for (int i = 0; i < n_test; i++) {
        cJSON *it = cJSON_CreateObject();
        cJSON_AddNumberToObject(it, "item", preds[i].item);
        cJSON_AddNumberToObject(it, "truth", preds[i].truth);
        cJSON_AddNumberToObject(it, "answer", preds[i].answer);
        if (!isnan(preds[i].expected)) {
          cJSON_AddNumberToObject(it, "expected", preds[i].expected);
          if (methods[j]->needs_model && eo.mode == PA_READ_LOGITS)
            cJSON_AddItemToObject(it, "p", cJSON_CreateFloatArray(probs + (size_t)i * 5, 5));
        }
        cJSON_AddItemToArray(items, it);
      }
      cJSON_AddItemToObject(jm, methods[j]->name, o);
      if (methods[j]->needs_model)
        fprintf(stderr, "  subject %s  %-10s sum MAE %.2f  %5.1f s  %ld tokens (%.1fx fewer than full prompts)\n",
                s->id, methods[j]->name, sm[(size_t)(n_done[j] - 1) * n_methods + j].mae_sum, st.seconds,
                st.prefix_tokens + st.question_tokens,
                (double)st.naive_tokens / (double)(st.prefix_tokens + st.question_tokens));
    }
    cJSON_AddItemToArray(jsub, js);
    const double el = now() - t_start, rate = (double)(k + 1) / el;
    if (need_model || k + 1 == n_subj || el - last_report >= 2) {
      fprintf(stderr, "[%zu/%zu] subjects done, %.2f subjects/min, %.0f s elapsed, about %.0f s left\n", k + 1,
              n_subj, rate * 60, el, (double)(n_subj - k - 1) / rate);
      last_report = el;
    }
  }

  /* the table */
  pa_method_summary *sums = calloc((size_t)n_methods, sizeof *sums);
  const char *names[MAX_METHODS];
  pa_subject_metrics *col = malloc(n_subj * sizeof *col);
  for (int j = 0; j < n_methods; j++) {
    for (int k = 0; k < n_done[j]; k++)
      col[k] = sm[(size_t)k * n_methods + j];
    pa_metrics_summarise(col, n_done[j], &sums[j]);
    names[j] = methods[j]->name;
  }
  printf("\nMean absolute error on the %d test items per subject (lower is better; %zu subjects, %s mode)\n", n_test,
         n_subj - skipped, eo.mode == PA_READ_LOGITS ? "logits" : "generate");
  pa_metrics_print_table(stdout, names, sums, n_methods);
  for (int j = 0; j < n_methods; j++)
    if (methods[j]->needs_model && n_done[j] > 0)
      printf("%-10s %.1f s per subject, %.0f tokens per subject (full prompts one by one: %.0f)\n", names[j],
             seconds[j] / n_done[j], (double)tokens[j] / n_done[j], (double)naive[j] / n_done[j]);
  if (skipped || failed)
    printf("%zu subjects skipped as unusable, %zu method runs failed (see the messages above)\n", skipped, failed);

  if (json_path) {
    cJSON *settings = cJSON_AddObjectToObject(root, "settings");
    cJSON_AddStringToObject(settings, "model", model_path ? model_path : "");
    cJSON_AddStringToObject(settings, "papi", papi);
    cJSON_AddStringToObject(settings, "mode", eo.mode == PA_READ_LOGITS ? "logits" : "generate");
    cJSON_AddBoolToObject(settings, "lowercase_items", !eo.keep_case);
    cJSON_AddStringToObject(settings, "subjects", range);
    cJSON *summary = cJSON_AddObjectToObject(root, "summary");
    for (int j = 0; j < n_methods; j++) {
      cJSON *o = cJSON_AddObjectToObject(summary, names[j]);
      cJSON_AddNumberToObject(o, "subjects", sums[j].n_subjects);
      cJSON_AddNumberToObject(o, "mae_sum", sums[j].sum);
      cJSON_AddNumberToObject(o, "mae_sum_ci95", sums[j].sum_ci);
      cJSON *mae = cJSON_AddObjectToObject(o, "mae");
      for (int t = 0; t < PA_N_TRAITS; t++) {
        char key[2] = {pa_trait_letter(t), 0};
        cJSON_AddNumberToObject(mae, key, sums[j].mae[t]);
      }
      cJSON_AddNumberToObject(o, "unknown", (double)sums[j].n_unknown);
    }
    char *text = cJSON_Print(root);
    FILE *f = text ? fopen(json_path, "w") : NULL;
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
      fprintf(stderr, "palign eval: cannot write %s\n", json_path);
      rc = PA_EIO;
    }
    cJSON_free(text);
  }
  cJSON_Delete(root);
  free(sums), free(col), free(sm), free(n_done), free(preds), free(probs), free(seconds), free(tokens), free(naive);
  pa_evaluator_destroy(ev);
  pa_lm_destroy(lm);
  pa_chat_template_destroy(named);
  pa_model_close(model);
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return rc ? 1 : 0;
}
