/* cmd_tokenize.c: `palign tokenize MODEL TEXT [--chat] [--system S]
 * [--template NAME] [--prefix P] [--special]`: the token ids and pieces of a
 * text, or of the chat prompt built around it, one token a line. */
#include "commands.h"

#include "chat.h"
#include "model.h"
#include "status.h"
#include "tokenizer.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f, "usage: palign tokenize MODEL TEXT [--chat] [--system S] [--template NAME] [--prefix P] [--special]\n"
             "\n"
             "Prints one token a line, `ID<TAB>\"BYTES\"` (the bytes the token stands for, C-escaped), then the\n"
             "count. MODEL is a GGUF file or a Hugging Face model directory.\n"
             "\n"
             "  --chat           make TEXT the user message of a chat prompt in the model's format, with the\n"
             "                   assistant turn opened; the prompt is tokenized with special tokens parsed\n"
             "  --system S       the system message (default: the template's own behaviour)\n"
             "  --template NAME  chatml, llama3, llama3.1, llama2 or mistral instead of the model's template\n"
             "  --prefix P       start the assistant's answer with P (e.g. \"Option (\")\n"
             "  --special        without --chat: read special-token text such as <|im_start|> as the token\n");
}

/* Writes b[0..n) as a C string literal's contents. */
static void put_escaped(const char *b, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)b[i];
    switch (c) {
    case '\n': fputs("\\n", stdout); break;
    case '\t': fputs("\\t", stdout); break;
    case '\r': fputs("\\r", stdout); break;
    case '"': fputs("\\\"", stdout); break;
    case '\\': fputs("\\\\", stdout); break;
    default:
      /* bytes of 0x80 and up are left alone: in valid UTF-8 they print as
       * the characters they spell; control bytes are escaped */
      if (c < 0x20 || c == 0x7F)
        printf("\\x%02x", c);
      else
        putchar(c);
    }
  }
}

int cmd_tokenize(int argc, char **argv) {
  const char *model_path = NULL, *text = NULL, *system = NULL, *template_name = NULL, *prefix = NULL;
  bool chat = false, special = false;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
      usage(stdout);
      return 0;
    }
    if (!strcmp(a, "--chat")) {
      chat = true;
    } else if (!strcmp(a, "--special")) {
      special = true;
    } else if (!strcmp(a, "--system") || !strcmp(a, "--template") || !strcmp(a, "--prefix")) {
      if (i + 1 >= argc) {
        fprintf(stderr, "palign tokenize: %s needs a value\n", a);
        usage(stderr);
        return 2;
      }
      const char **dst = !strcmp(a, "--system") ? &system : !strcmp(a, "--template") ? &template_name : &prefix;
      *dst = argv[++i];
    } else if (a[0] == '-' && a[1] == '-') {
      fprintf(stderr, "palign tokenize: unknown option '%s'\n", a);
      usage(stderr);
      return 2;
    } else if (!model_path) {
      model_path = a;
    } else if (!text) {
      text = a;
    } else {
      fprintf(stderr, "palign tokenize: unexpected argument '%s' (quote TEXT if it has spaces)\n", a);
      usage(stderr);
      return 2;
    }
  }
  if (!model_path || !text) {
    fprintf(stderr, "palign tokenize: %s\n", !model_path ? "MODEL and TEXT are required" : "TEXT is required");
    usage(stderr);
    return 2;
  }
  if (!chat && (system || template_name || prefix)) {
    fprintf(stderr, "palign tokenize: --system, --template and --prefix need --chat\n");
    return 2;
  }
  pa_chat_template *named = NULL;
  if (template_name && pa_chat_template_from_name(template_name, &named)) {
    fprintf(stderr, "palign tokenize: %s\n", pa_errmsg());
    return 2;
  }

  pa_model *m = NULL;
  char *prompt = NULL;
  int32_t *ids = NULL;
  size_t n = 0;
  int rc = pa_model_open(model_path, &m);
  const pa_tokenizer *tok = rc ? NULL : pa_model_tokenizer(m);
  const pa_chat_template *tmpl = named ? named : rc ? NULL : pa_model_chat(m);
  if (!rc && !tok)
    rc = pa_error(PA_ENOTFOUND, "%s: the model has no tokenizer", model_path);
  if (!rc && chat && !tmpl)
    rc = pa_error(PA_ENOTFOUND, "%s: the model has no chat template; choose one with --template", model_path);
  if (!rc && chat)
    rc = pa_chat_render(tmpl, system, text, prefix, &prompt);
  const char *input = prompt ? prompt : text;
  if (!rc)
    rc = pa_tokenizer_encode(tok, input, strlen(input), chat || special ? PA_TOK_PARSE_SPECIAL : 0, &ids, &n);
  if (!rc) {
    for (size_t i = 0; i < n; i++) {
      size_t len;
      const char *b = pa_tokenizer_token_bytes(tok, ids[i], &len);
      printf("%d\t\"", ids[i]);
      put_escaped(b, len);
      printf("\"\n");
    }
    printf("%zu tokens\n", n);
  }
  free(ids);
  free(prompt);
  if (m)
    pa_model_close(m);
  pa_chat_template_destroy(named);
  if (rc) {
    fprintf(stderr, "palign tokenize: %s\n", pa_errmsg());
    return 1;
  }
  return 0;
}
