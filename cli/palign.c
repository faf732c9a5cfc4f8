/* palign: the user CLI. Dispatches to one subcommand per file (cmd_*.c). */
#include "build_info.h"
#include "commands.h"

#include <stdio.h>
#include <string.h>

typedef struct {
  const char *name;
  int (*run)(int argc, char **argv);
  const char *summary;
} command;

static const command commands[] = {
    {"inspect", cmd_inspect, "MODEL                      describe a model file: dimensions, tokenizer, tensors"},
    {"tokenize", cmd_tokenize, "MODEL TEXT [--chat ...]   token ids and pieces of a text or a chat prompt"},
    {"generate", cmd_generate, "--model M --prompt P [--system S] [--max-tokens N]  greedy chat answer"},
    {"eval", cmd_eval, "--methods LIST [--model M] [--subjects RANGE]  evaluate methods on PAPI subjects"},
    {"query", cmd_query, "STORE summary|subject ID|export|verify|index  what a store holds (see query --help)"},
    {"mkmodel", cmd_mkmodel, "OUT [--format gguf|safetensors ...]  write a tiny random model for tests"},
};

static void usage(FILE *f) {
  fprintf(f, "usage: palign COMMAND [ARGS]\n\ncommands:\n");
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    fprintf(f, "  %-9s %s\n", commands[i].name, commands[i].summary);
  fprintf(f, "\n`palign COMMAND --help` describes a command.\n");
}

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
    usage(stdout);
    return 0;
  }
  if (!strcmp(argv[1], "--version")) {
    printf("palign %s (revision %s; %s)\n", pa_version, pa_git_revision, pa_build);
    return 0;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (!strcmp(argv[1], commands[i].name))
      return commands[i].run(argc - 1, argv + 1);
  fprintf(stderr, "palign: unknown command '%s'\n\n", argv[1]);
  usage(stderr);
  return 2;
}
