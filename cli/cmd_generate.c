/* palign generate --model M [--system S] --prompt P [--max-tokens N]
 *                 [--template NAME] [--threads N]
 * Greedy chat generation: the prompt as the user's message in the model's
 * chat format, the assistant's answer decoded until its end of turn. */
#include "commands.h"

#include "chat.h"
#include "forward.h"
#include "model.h"
#include "status.h"
#include "tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(FILE *f) {
  fprintf(f, "usage: palign generate --model M --prompt P [--system S] [--max-tokens N] [--template NAME]\n"
             "                       [--threads N] [--stats]\n"
             "\n"
             "  --model M        a GGUF file or a Hugging Face model directory\n"
             "  --prompt P       the user's message\n"
             "  --system S       the system message (default: the chat template's own)\n"
             "  --max-tokens N   tokens to generate at most (default 256)\n"
             "  --template NAME  chatml, llama3, llama3.1, llama2 or mistral instead of the model's\n"
             "  --threads N      CPU threads (default: all cores)\n"
             "  --stats          print token counts and speed on stderr\n");
}

static int parse_int(const char *flag, const char *v, int lo, int hi, int *out) {
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || end == v || *end || x < lo || x > hi) {
    fprintf(stderr, "palign generate: %s must be an integer in %d..%d, not '%s'\n", flag, lo, hi, v);
    return 2;
  }
  *out = (int)x;
  return 0;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int cmd_generate(int argc, char **argv) {
  const char *model_path = NULL, *prompt = NULL, *system = NULL, *template_name = NULL;
  int max_tokens = 256, threads = 0, stats = 0;
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
    const char *opts[] = {"--model", "--prompt", "--system", "--template", "--max-tokens", "--threads"};
    int k = -1;
    for (int j = 0; j < 6; j++)
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
    switch (k) {
    case 0: model_path = v; break;
    case 1: prompt = v; break;
    case 2: system = v; break;
    case 3: template_name = v; break;
    case 4: if (parse_int(a, v, 1, 1 << 20, &max_tokens)) return 2; break;
    default: if (parse_int(a, v, 1, 1024, &threads)) return 2; break;
    }
  }
  if (!model_path || !prompt) {
    fprintf(stderr, "palign generate: --model and --prompt are required\n");
    usage(stderr);
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
  if (!rc)
    rc = pa_chat_tokenize(tmpl, tok, system, prompt, NULL, &ids, &n_ids);
  if (!rc) {
    const int ctx = pa_model_config_get(m)->max_seq;
    if ((long)n_ids + max_tokens > ctx)
      rc = pa_error(PA_EINVAL, "the prompt (%zu tokens) and --max-tokens %d exceed the model's context of %d", n_ids,
                    max_tokens, ctx);
  }
  if (!rc)
    rc = pa_lm_create(m, &(pa_lm_opts){.n_threads = threads, .max_seq = (int)n_ids + max_tokens}, &lm);
  if (!rc)
    rc = pa_kv_create(lm, (int)n_ids + max_tokens, &kv);
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
    const pa_gen_opts go = {.max_tokens = max_tokens, .stop = stop, .n_stop = n_stop};
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
  if (!rc && stats)
    fprintf(stderr, "prompt %zu tokens, generated %d tokens; load %.2f s, generation %.2f s (%.1f tokens/s)\n", n_ids,
            n_out, t_load, t_gen, t_gen > 0 ? n_out / t_gen : 0.0);
  free(out);
  free(ids);
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
