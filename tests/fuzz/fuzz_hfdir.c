/* Hugging Face directories: config.json (the description: every field, the
 * architectures, rope_scaling, the refused flags), tokenizer.json (model,
 * normalizers, pre-tokenizers, added tokens, merges) and
 * tokenizer_config.json (special tokens, the chat template), one of them
 * fuzzed per input (the first byte says which) beside the valid others of a
 * tiny mkmodel model; then the model is opened and its tokenizer used.
 * Seed: byte 0, 1 or 2 and the valid file. */
#include "fuzz_util.h"

#include "chat.h"
#include "mkmodel.h"
#include "model.h"
#include "tokenizer.h"

static const char *const files[3] = {"config.json", "tokenizer.json", "tokenizer_config.json"};
static char *valid[3];
static size_t valid_len[3];

static char *slurp(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f)
    abort();
  fseek(f, 0, SEEK_END);
  *n = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc(*n + 1);
  if (!b || fread(b, 1, *n, f) != *n)
    abort();
  fclose(f);
  return b;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.arch = getenv("PALIGN_FUZZ_LLAMA") ? PA_MK_LLAMA : PA_MK_QWEN2;
  o.n_layers = 1, o.dim = 8, o.n_heads = 2, o.n_kv_heads = 1, o.ffn_dim = 8, o.n_merges = 30;
  if (pa_mkmodel_write_hf(&o, fz_path("m")))
    fz_die("mkmodel");
  char p[600];
  for (int i = 0; i < 3; i++) {
    snprintf(p, sizeof p, "%s/m/%s", fz_root(), files[i]);
    valid[i] = slurp(p, &valid_len[i]);
  }
  const char *which = getenv("PALIGN_FUZZ_SEED_FILE"); /* 0, 1 or 2: which file the seed fuzzes */
  const int k = which ? atoi(which) % 3 : 0;
  char *seed = malloc(valid_len[k] + 1);
  seed[0] = (char)k;
  memcpy(seed + 1, valid[k], valid_len[k]);
  fz_seed(seed, valid_len[k] + 1);
  free(seed);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const int k = data[0] % 3;
  char p[600];
  for (int i = 0; i < 3; i++) {
    snprintf(p, sizeof p, "%s/m/%s", fz_root(), files[i]);
    if (i == k)
      fz_write(p, data + 1, size - 1);
    else
      fz_write(p, valid[i], valid_len[i]);
  }
  snprintf(p, sizeof p, "%s/m", fz_root());
  pa_model *m = NULL;
  int rc = pa_model_open(p, &m);
  fz_check_error(rc);
  if (rc)
    return 0;
  const pa_tokenizer *t = pa_model_tokenizer(m);
  int32_t *ids = NULL;
  size_t n = 0;
  static const char text[] = "<|im_start|>user\nCafe\xcc\x81 123 worry<|im_end|>\xff";
  if (!pa_tokenizer_encode(t, text, sizeof text - 1, PA_TOK_PARSE_SPECIAL, &ids, &n)) {
    char *back = NULL;
    size_t len = 0;
    if (!pa_tokenizer_decode(t, ids, n, PA_TOK_DECODE_SPECIAL, &back, &len))
      free(back);
  }
  free(ids);
  if (pa_model_chat(m)) {
    char *out = NULL;
    if (!pa_chat_render(pa_model_chat(m), NULL, "hi", "Option (", &out))
      free(out);
  }
  pa_model_close(m);
  return 0;
}
