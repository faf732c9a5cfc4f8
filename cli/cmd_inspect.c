/* palign inspect MODEL [--no-tensors]: the model's description, tokenizer,
 * chat template and tensor table (name, type, shape, bytes), with totals. */
#include "commands.h"

#include "chat.h"
#include "model.h"
#include "quant.h"
#include "status.h"
#include "tokenizer.h"

#include <stdio.h>
#include <string.h>

static void usage(FILE *f) {
  fprintf(f, "usage: palign inspect MODEL [--no-tensors]\n"
             "  MODEL  a .gguf file or a Hugging Face model directory\n"
             "  --no-tensors  leave out the tensor table\n");
}

static void print_token(const pa_tokenizer *tok, const char *what, int32_t id) {
  if (id < 0)
    return;
  size_t len = 0;
  const char *piece = pa_tokenizer_piece(tok, id, &len);
  printf("  %-14s %d %.*s\n", what, id, piece ? (int)len : 0, piece ? piece : "");
}

static void human_bytes(double b, char *out, size_t cap) {
  const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4)
    b /= 1024, u++;
  snprintf(out, cap, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
}

int cmd_inspect(int argc, char **argv) {
  const char *path = NULL;
  int tensors = 1;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--no-tensors")) {
      tensors = 0;
    } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    } else if (argv[i][0] == '-' || path) {
      fprintf(stderr, "palign inspect: unexpected argument '%s'\n", argv[i]);
      usage(stderr);
      return 2;
    } else {
      path = argv[i];
    }
  }
  if (!path) {
    usage(stderr);
    return 2;
  }
  pa_model *m;
  if (pa_model_open(path, &m)) {
    fprintf(stderr, "palign inspect: %s\n", pa_errmsg());
    return 1;
  }
  const pa_model_config *c = pa_model_config_get(m);
  printf("model          %s\n", pa_model_path(m));
  printf("format         %s\n", pa_model_format(m));
  printf("architecture   %s%s%s\n", c->arch, c->name[0] ? "  " : "", c->name);
  printf("layers         %d\n", c->n_layers);
  printf("hidden         %d\n", c->dim);
  printf("heads          %d query, %d key/value (%d queries per key/value head), head dim %d\n", c->n_heads,
         c->n_kv_heads, c->n_heads / c->n_kv_heads, c->head_dim);
  if (c->qkv_bias)
    printf("biases         on the Q, K and V projections\n");
  printf("ffn            %d (SwiGLU)\n", c->ffn_dim);
  printf("vocabulary     %d\n", c->vocab_size);
  printf("context        %d\n", c->max_seq);
  printf("rope           base %g", (double)c->rope_theta);
  if (c->rope_scaling.kind == PA_ROPE_SCALING_LLAMA3) {
    if (c->rope_scaling.factor > 0)
      printf(", llama3 scaling factor %g, low %g, high %g, original context %d", (double)c->rope_scaling.factor,
             (double)c->rope_scaling.low_freq_factor, (double)c->rope_scaling.high_freq_factor,
             c->rope_scaling.orig_max_seq);
    else
      printf(", llama3 scaling (frequency divisors from the file)");
  }
  printf("\nnorm eps       %g\n", (double)c->norm_eps);
  printf("embeddings     %s\n", c->tied_embeddings ? "tied (output = token embedding)" : "separate output matrix");

  const pa_tokenizer *tok = pa_model_tokenizer(m);
  printf("tokenizer      %s, %d tokens\n", pa_tokenizer_describe(tok), pa_tokenizer_n_vocab(tok));
  print_token(tok, "bos", pa_tokenizer_bos(tok));
  print_token(tok, "eos", pa_tokenizer_eos(tok));
  print_token(tok, "eot", pa_tokenizer_eot(tok));
  const pa_chat_template *chat = pa_model_chat(m);
  if (chat) {
    const char *sys = pa_chat_template_default_system(chat);
    printf("chat template  %s%s%s%s\n", pa_chat_template_name(chat), sys ? " (default system: \"" : "", sys ? sys : "",
           sys ? "\")" : "");
  } else {
    printf("chat template  none recognised (use --template with tokenize and generate)\n");
  }

  /* totals by type, then the table */
  uint64_t total_bytes = 0, total_params = 0;
  struct type_total {
    const char *name;
    size_t count;
    uint64_t bytes;
  } by_type[32];
  size_t n_types = 0;
  const size_t n = pa_model_n_tensors(m);
  for (size_t i = 0; i < n; i++) {
    pa_tensor_info t;
    pa_model_tensor_info(m, i, &t);
    uint64_t elems = 1;
    for (uint32_t d = 0; d < t.n_dims; d++)
      elems *= t.shape[d];
    total_params += elems;
    total_bytes += t.nbytes;
    size_t k = 0;
    while (k < n_types && strcmp(by_type[k].name, t.type_name) != 0)
      k++;
    if (k == n_types && n_types < 32)
      by_type[n_types++] = (struct type_total){t.type_name, 0, 0};
    if (k < n_types)
      by_type[k].count++, by_type[k].bytes += t.nbytes;
  }
  char hb[32];
  human_bytes((double)total_bytes, hb, sizeof hb);
  printf("tensors        %zu, %.1fM parameters, %s\n", n, (double)total_params / 1e6, hb);
  for (size_t k = 0; k < n_types; k++) {
    human_bytes((double)by_type[k].bytes, hb, sizeof hb);
    printf("  %-12s %zu tensors, %s\n", by_type[k].name, by_type[k].count, hb);
  }
  if (tensors) {
    printf("\n%-40s %-6s %-18s %12s\n", "name", "type", "shape", "bytes");
    for (size_t i = 0; i < n; i++) {
      pa_tensor_info t;
      pa_model_tensor_info(m, i, &t);
      char shape[64] = "";
      for (uint32_t d = 0; d < t.n_dims; d++) {
        size_t len = strlen(shape);
        snprintf(shape + len, sizeof shape - len, "%s%llu", d ? " x " : "", (unsigned long long)t.shape[d]);
      }
      printf("%-40s %-6s %-18s %12llu\n", t.name, t.type_name, shape, (unsigned long long)t.nbytes);
    }
  }
  pa_model_close(m);
  return 0;
}
