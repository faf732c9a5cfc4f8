/* palign generate --model M [--system S] --prompt P [--max-tokens N]
 *                 [--template NAME] [--threads N]
 *                 [--store S --subject ID [--method M] [--variant V] [--protocol P] [--alpha A]
 *                  [--papi DIR] [--subjects-file F]]
 * Greedy chat generation: the prompt as the user's message in the model's
 * chat format, the assistant's answer decoded until its end of turn. With a
 * store and a subject, the subject's stored PAS intervention (heads,
 * directions, sigmas, the chosen alpha) steers every token. */
#include "backend.h"
#include "cli_util.h"
#include "commands.h"

#include "bank.h"
#include "chat.h"
#include "forward.h"
#include "lora.h"
#include "inventory.h"
#include "model.h"
#include "prompts.h"
#include "query.h"
#include "record.h"
#include "status.h"
#include "tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void usage(FILE *f) {
  fprintf(f, "usage: palign generate --model M --prompt P [--system S] [--max-tokens N] [--template NAME]\n"
             "                       [--threads N] [--backend cpu|cuda|auto] [--weights W] [--stats]\n"
             "\n"
             "  --model M        a GGUF file or a Hugging Face model directory\n"
             "  --prompt P       the user's message\n"
             "  --system S       the system message (default: the chat template's own)\n"
             "  --max-tokens N   tokens to generate at most (default 256)\n"
             "  --template NAME  chatml, llama3, llama3.1, llama2 or mistral instead of the model's\n"
             "  --threads N      CPU threads (default: all cores)\n"
             "  --backend B      cpu (default), cuda or auto (cuda where a GPU is)\n"
             "  --weights W      fp32, bf16 or auto (bf16 on a GPU, fp32 on the CPU; the default)\n"
             "  --stats          print token counts, speed and host memory on stderr\n"
             "\n"
             "With a subject's PAS intervention or DPO adapter from a store (palign-worker's):\n"
             "  --store S        the store\n"
             "  --subject ID     the subject (PAPI case id)\n"
             "  --method M       pas (default: the stored steering) or dpo (the stored LoRA adapter)\n"
             "  --variant V      pas: pas_only (default prompt + steering; the default when stored) or pas\n"
             "                   (the subject's ICL prompt as the system message + steering);\n"
             "                   dpo: dpo (default prompt + adapter, the default) or dpo_icl (ICL prompt)\n"
             "  --protocol P     whose alpha: holdout (default) or reference\n"
             "  --alpha A        this alpha instead of the chosen one\n"
             "  --papi DIR       PAPI data, for the pas and dpo_icl variants' ICL prompt (default\n"
             "                   $PALIGN_PAPI_DIR, else the folder the store's last run read, else\n"
             "                   ../shared/papi)\n"
             "  --subjects-file F\n"
             "                   the subjects the store was fitted on, for that prompt (default: the\n"
             "                   store's, as palign-worker was given it; PAPI's Test-set.json if none)\n"
             "These go with --store only; --system does not go with the pas and dpo_icl variants (their\n"
             "system message is the ICL prompt).\n");
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Whether s is the person r is the record of: the answers r's rows hold for
 * the test items are s's (a subjects file may give an id to someone else). */
static int same_person(const Palign__SubjectResult *r, const pa_subject *s, const char *file, const char *store) {
  for (size_t j = 0; j < r->n_methods; j++)
    for (size_t k = 0; k < r->methods[j]->n_rows; k++) {
      const Palign__Predictions *p = r->methods[j]->rows[k]->predictions;
      if (!p || p->truth.len != p->n_items)
        continue;
      for (size_t i = 0; i < p->n_items; i++) {
        const int item = p->items[i];
        if (item >= 1 && item <= PA_MAX_ITEMS && s->answers[item] != p->truth.data[i])
          return pa_error(PA_EINVAL,
                          "subject %s of %s is not the person %s holds under that id (item %d: answer %d there, %d in "
                          "the record): give the subjects file the store was fitted on with --subjects-file",
                          s->id, file, store, item, s->answers[item], p->truth.data[i]);
      }
      return PA_OK; /* every row holds the same answers */
    }
  return PA_OK;
}

/* The subject's ICL prompt, rebuilt from the PAPI data and the subjects the
 * store was fitted on: subjects_file when given, else the store's (its
 * settings name the file as palign-worker was given it), else PAPI's
 * Test-set.json; PAPI from papi when given, else $PALIGN_PAPI_DIR, else the
 * folder the store's last run read, else ../shared/papi. Checked to be the
 * store's: the inventory's fingerprint and the subject's answers. */
static int load_icl(const char *papi, const char *subjects_file, const char *store, const Palign__SubjectResult *r,
                    char **icl) {
  Palign__Manifest *man = NULL;
  int rc = pa_manifest_read(store, &man);
  const Palign__Settings *st = rc ? NULL : man->settings;
  if (!rc && !subjects_file && st && *st->subjects_file && strcmp(st->subjects_file, "Test-set.json")) {
    subjects_file = st->subjects_file;
    if (access(subjects_file, R_OK))
      rc = pa_error(PA_ENOTFOUND,
                    "%s was fitted on the subjects of %s (its settings), which cannot be read from here (%s): give "
                    "the file with --subjects-file",
                    store, subjects_file, strerror(errno));
  }
  const char *env = getenv("PALIGN_PAPI_DIR");
  struct stat sb;
  if (!rc && !(papi && *papi) && !(env && *env) && man->n_runs && *man->runs[man->n_runs - 1]->papi_dir &&
      !stat(man->runs[man->n_runs - 1]->papi_dir, &sb))
    papi = man->runs[man->n_runs - 1]->papi_dir;
  pa_inventory *inv = NULL;
  pa_subjects *subs = NULL;
  if (!rc)
    rc = pa_papi_load(papi, subjects_file, &inv, &subs);
  char file[4200], fp[65];
  if (subjects_file)
    snprintf(file, sizeof file, "%s", subjects_file);
  else
    snprintf(file, sizeof file, "%s/Test-set.json", pa_papi_dir(papi));
  if (!rc && st && *st->inventory_fingerprint && !(rc = pa_bank_inventory_fingerprint(inv, fp)) &&
      strcmp(fp, st->inventory_fingerprint))
    rc = pa_error(PA_EINVAL,
                  "the PAPI inventory in %s is not the one %s was fitted on: give that PAPI folder with --papi",
                  pa_papi_dir(papi), store);
  const pa_subject *s = rc ? NULL : pa_subjects_find(subs, r->subject_id);
  if (!rc && !s)
    rc = pa_error(PA_ENOTFOUND, "%s: no subject %s", file, r->subject_id);
  if (!rc)
    rc = same_person(r, s, file, store);
  if (!rc && !(*icl = pa_prompt_icl(inv, s)))
    rc = pa_error(PA_ENOMEM, "no memory");
  pa_subjects_destroy(subs);
  pa_inventory_destroy(inv);
  if (man)
    palign__manifest__free_unpacked(man, NULL);
  return rc;
}

/* The record of subject in store, checked to be made with this model. */
static int load_record(const char *model_path, const char *store, const char *subject, Palign__SubjectResult **r) {
  int rc = pa_query_subject(store, subject, r);
  char fp[65];
  if (!rc && !(rc = pa_model_fingerprint(model_path, fp)) && strcmp(fp, (*r)->model_fingerprint))
    rc = pa_error(PA_EINVAL, "%s: subject %s was fitted on model %.16s, %s is %.16s", store, subject,
                  (*r)->model_fingerprint, model_path, fp);
  if (rc && *r) {
    palign__subject_result__free_unpacked(*r, NULL);
    *r = NULL;
  }
  return rc;
}

/* A subject's stored DPO adapter (and, for the dpo_icl variant, its ICL
 * system prompt). */
static int load_adapter(const pa_model *m, const char *model_path, const char *store, const char *subject,
                        const char *variant, const char *papi, const char *subjects_file, pa_lora **lora, char **icl) {
  Palign__SubjectResult *r = NULL;
  int rc = load_record(model_path, store, subject, &r);
  if (!rc && (rc = pa_dpo_adapter_from_proto(r->dpo, subject, pa_model_config_get(m), lora)))
    pa_error_prefix(rc, "%s: ", store);
  if (!rc && variant && !strcmp(variant, "dpo_icl"))
    rc = load_icl(papi, subjects_file, store, r, icl);
  if (!rc)
    fprintf(stderr, "palign generate: subject %s, DPO adapter of rank %d (%s)\n", subject, r->dpo->rank,
            variant ? variant : "dpo");
  if (r)
    palign__subject_result__free_unpacked(r, NULL);
  if (rc) {
    pa_lora_destroy(*lora), free(*icl);
    *lora = NULL, *icl = NULL;
  }
  return rc;
}

/* The steering displacement of a subject's stored PAS intervention (and,
 * for the pas variant, its ICL system prompt). */
static int load_intervention(const pa_model *m, const char *model_path, const char *store, const char *subject,
                             const char *variant, const char *protocol, double alpha, const char *papi,
                             const char *subjects_file, bool has_system, float **steer, char **icl) {
  Palign__SubjectResult *r = NULL;
  int rc = load_record(model_path, store, subject, &r);
  if (rc)
    return rc;
  const Palign__PasResult *p = r->pas;
  if (!p)
    rc = pa_error(PA_ENOTFOUND, "%s: subject %s has no PAS result (the run's methods had neither pas nor pas_only)",
                  store, subject);
  /* the variant: as asked, else pas_only when it was fitted, else pas */
  double chosen = 0;
  if (!rc && !variant) {
    variant = pa_pas_chosen_alpha(p, "pas_only", protocol, &chosen) == PA_OK ? "pas_only" : "pas";
    pa_error_clear();
    if (has_system && !strcmp(variant, "pas"))
      rc = pa_error(PA_EINVAL, "--system does not go with the pas variant (the subject's record has no pas_only), "
                               "whose system message is the subject's ICL prompt");
  }
  if (!rc && isnan(alpha) && (rc = pa_pas_chosen_alpha(p, variant, protocol, &chosen)))
    pa_error_prefix(rc, "%s: subject %s: ", store, subject);
  if (!rc && isnan(alpha))
    alpha = chosen;
  const pa_model_config *c = pa_model_config_get(m);
  const size_t n = (size_t)c->n_layers * c->n_heads * c->head_dim;
  if (!rc && !(*steer = malloc(n * sizeof **steer)))
    rc = pa_error(PA_ENOMEM, "no memory");
  if (!rc)
    rc = pa_pas_steering_from_proto(p, subject, alpha, c->n_layers, c->n_heads, c->head_dim, *steer);
  if (!rc && !strcmp(variant, "pas"))
    rc = load_icl(papi, subjects_file, store, r, icl);
  if (!rc)
    fprintf(stderr, "palign generate: subject %s, PAS %s, %s alpha %g, %zu heads%s\n", subject, variant, protocol,
            alpha, p->n_heads, alpha == 0 ? " (alpha 0: the intervention changes nothing)" : "");
  palign__subject_result__free_unpacked(r, NULL);
  if (rc) {
    free(*steer), free(*icl);
    *steer = NULL, *icl = NULL;
  }
  return rc;
}

/* A size line of /proc/self/status ("VmRSS:", "VmHWM:") in MB; 0 where there is none. */
static double status_mb(const char *field) {
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  double kb = 0;
  while (f && fgets(line, sizeof line, f))
    if (!strncmp(line, field, strlen(field)))
      kb = strtod(line + strlen(field), NULL);
  if (f)
    fclose(f);
  return kb / 1024;
}

int cmd_generate(int argc, char **argv) {
  const char *model_path = NULL, *prompt = NULL, *system = NULL, *template_name = NULL;
  const char *store = NULL, *subject = NULL, *variant = NULL, *protocol = NULL, *papi = NULL, *method = NULL;
  const char *subjects_file = NULL, *backend_name = "cpu";
  int weights = PA_WEIGHTS_AUTO;
  double alpha = NAN;
  int max_tokens = 256, threads = 0, stats = 0;
  double rss_loaded = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    }
    if (!strcmp(a, "--stats")) {
      stats = 1;
      continue;
    }
    const char *opts[] = {"--model",  "--prompt",  "--system",  "--template",     "--max-tokens", "--threads",
                          "--store",  "--subject", "--variant", "--protocol",     "--alpha",      "--papi",
                          "--method", "--backend", "--weights", "--subjects-file"};
    int k = -1;
    for (int j = 0; j < (int)(sizeof opts / sizeof *opts); j++)
      if (!strcmp(a, opts[j]))
        k = j;
    if (k < 0) {
      fprintf(stderr, "palign generate: unexpected argument '%s'\n", a);
      usage(stderr);
      return 2;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "palign generate: %s needs a value\n", a);
      return 2;
    }
    const char *v = argv[++i];
    long long n = 0;
    switch (k) {
    case 0: model_path = v; break;
    case 1: prompt = v; break;
    case 2: system = v; break;
    case 3: template_name = v; break;
    case 4:
      if (pa_arg_int(stderr, "palign generate", a, v, 1, 1 << 20, &n))
        return 2;
      max_tokens = (int)n;
      break;
    case 5:
      if (pa_arg_int(stderr, "palign generate", a, v, 1, 1024, &n))
        return 2;
      threads = (int)n;
      break;
    case 6: store = v; break;
    case 7: subject = v; break;
    case 8: variant = v; break;
    case 9: protocol = v; break;
    case 10:
      if (pa_arg_num(stderr, "palign generate", a, v, -1e6, 1e6, &alpha))
        return 2;
      break;
    case 11: papi = v; break;
    case 13:
      if (pa_backend_arg(stderr, "palign generate", v))
        return 2;
      backend_name = v;
      break;
    case 14:
      if (pa_weights_arg(stderr, "palign generate", v))
        return 2;
      weights = pa_weight_format_parse(v);
      break;
    case 15: subjects_file = v; break;
    default: method = v; break;
    }
  }
  if (!model_path || !prompt) {
    fprintf(stderr, "palign generate: --model and --prompt are required\n");
    usage(stderr);
    return 2;
  }
  if (!store != !subject) {
    fprintf(stderr, "palign generate: --store and --subject go together\n");
    return 2;
  }
  const char *store_only = method          ? "--method"
                           : variant       ? "--variant"
                           : protocol      ? "--protocol"
                           : !isnan(alpha) ? "--alpha"
                           : papi          ? "--papi"
                           : subjects_file ? "--subjects-file"
                                           : NULL;
  if (!store && store_only) {
    fprintf(stderr, "palign generate: %s applies a stored subject's fit: it goes with --store and --subject\n",
            store_only);
    return 2;
  }
  const bool dpo = method && !strcmp(method, "dpo");
  if (system && variant && (!strcmp(variant, "pas") || !strcmp(variant, "dpo_icl"))) {
    fprintf(stderr,
            "palign generate: --system does not go with the %s variant, whose system message is the subject's "
            "ICL prompt\n",
            variant);
    return 2;
  }
  if (dpo && protocol) {
    fprintf(stderr, "palign generate: --protocol chooses PAS's alpha; the DPO adapter has none\n");
    return 2;
  }
  if (!method)
    method = "pas";
  if (!protocol)
    protocol = "holdout";
  if (!dpo && strcmp(method, "pas")) {
    fprintf(stderr, "palign generate: --method is pas or dpo, not '%s'\n", method);
    return 2;
  }
  if (variant && (dpo ? strcmp(variant, "dpo") && strcmp(variant, "dpo_icl")
                      : strcmp(variant, "pas") && strcmp(variant, "pas_only"))) {
    fprintf(stderr, "palign generate: --variant is %s, not '%s'\n", dpo ? "dpo or dpo_icl" : "pas or pas_only",
            variant);
    return 2;
  }
  if (dpo && !isnan(alpha)) {
    fprintf(stderr, "palign generate: --alpha is PAS's; the DPO adapter has none\n");
    return 2;
  }
  if (strcmp(protocol, "holdout") && strcmp(protocol, "reference")) {
    fprintf(stderr, "palign generate: --protocol is holdout or reference, not '%s'\n", protocol);
    return 2;
  }
  pa_chat_template *named = NULL;
  if (template_name && pa_chat_template_from_name(template_name, &named)) {
    fprintf(stderr, "palign generate: %s\n", pa_errmsg());
    return 2;
  }

  pa_model *m = NULL;
  pa_lm *lm = NULL;
  pa_kv *kv = NULL;
  int32_t *ids = NULL, *out = NULL;
  size_t n_ids = 0;
  int n_out = 0;
  double t0 = now(), t_load = 0, t_gen = 0;
  int rc = pa_model_open(model_path, &m);
  const pa_chat_template *tmpl = named ? named : rc ? NULL : pa_model_chat(m);
  if (!rc && !tmpl)
    rc = pa_error(PA_ENOTFOUND, "%s: the model has no chat template palign knows; choose one with --template",
                  model_path);
  const pa_tokenizer *tok = rc ? NULL : pa_model_tokenizer(m);
  float *steer = NULL;
  char *icl = NULL;
  pa_lora *lora = NULL;
  if (!rc && store && dpo)
    rc = load_adapter(m, model_path, store, subject, variant, papi, subjects_file, &lora, &icl);
  else if (!rc && store)
    rc = load_intervention(m, model_path, store, subject, variant, protocol, alpha, papi, subjects_file, system != NULL,
                           &steer, &icl);
  if (!rc && icl)
    system = icl;
  if (!rc)
    rc = pa_chat_tokenize(tmpl, tok, system, prompt, NULL, &ids, &n_ids);
  if (!rc) {
    /* positions: the prompt's and every generated token's but the last,
     * which is never fed back */
    const int ctx = pa_model_config_get(m)->max_seq;
    if ((long)n_ids + max_tokens - 1 > ctx)
      rc = pa_error(PA_EINVAL, "%s: the prompt (%zu tokens) and --max-tokens %d exceed the model's context of %d",
                    model_path, n_ids, max_tokens, ctx);
  }
  {
    char be_err[256];
    const pa_backend *be = rc ? NULL : pa_backend_named(backend_name, 0, be_err, sizeof be_err);
    if (!rc && !be)
      rc = pa_error(PA_EINVAL, "%s", be_err);
    if (!rc)
      rc = pa_lm_create(m,
                        &(pa_lm_opts){.n_threads = threads,
                                      .max_seq = (int)n_ids + max_tokens - 1,
                                      .backend = be,
                                      .weights = (pa_weight_format)weights},
                        &lm);
  }
  if (!rc)
    rc = pa_kv_create(lm, (int)n_ids + max_tokens - 1, &kv);
  if (!rc) {
    /* stop at the end of the assistant's turn, however the model spells it */
    int32_t stop[3];
    int n_stop = 0;
    const int32_t eot = pa_tokenizer_find(tok, pa_chat_template_end_of_turn(tmpl));
    if (eot >= 0)
      stop[n_stop++] = eot;
    if (pa_tokenizer_eos(tok) >= 0)
      stop[n_stop++] = pa_tokenizer_eos(tok);
    if (pa_tokenizer_eot(tok) >= 0)
      stop[n_stop++] = pa_tokenizer_eot(tok);
    t_load = now() - t0;
    rss_loaded = status_mb("VmRSS:");
    const pa_gen_opts go = {.max_tokens = max_tokens, .stop = stop, .n_stop = n_stop, .steer = steer, .lora = lora};
    rc = pa_lm_generate(lm, NULL, kv, ids, (int)n_ids, &go, &out, &n_out);
    t_gen = now() - t0 - t_load;
    if (!rc) {
      int shown = n_out;
      for (int i = 0; i < n_stop && shown > 0; i++)
        if (out[shown - 1] == stop[i])
          shown--; /* the end-of-turn token is not part of the answer */
      char *text = NULL;
      size_t len = 0;
      rc = pa_tokenizer_decode(tok, out, (size_t)shown, 0, &text, &len);
      if (!rc) {
        fwrite(text, 1, len, stdout);
        putchar('\n');
      }
      free(text);
    }
  }
  fflush(stdout);
  if (!rc && stats) {
    fprintf(stderr, "prompt %zu tokens, generated %d tokens; load %.2f s, generation %.2f s (%.1f tokens/s)\n", n_ids,
            n_out, t_load, t_gen, t_gen > 0 ? n_out / t_gen : 0.0);
    fprintf(stderr, "host memory: %.0f MB resident once loaded (%s weights), %.0f MB at the peak\n", rss_loaded,
            pa_lm_weights(lm), status_mb("VmHWM:"));
  }
  free(out);
  free(ids);
  free(steer), free(icl);
  pa_lora_destroy(lora);
  pa_kv_destroy(kv);
  pa_lm_destroy(lm);
  pa_model_close(m);
  pa_chat_template_destroy(named);
  if (rc) {
    fprintf(stderr, "palign generate: %s\n", pa_errmsg());
    return 1;
  }
  return 0;
}
