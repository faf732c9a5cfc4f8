/* GGUF files: the header, the metadata (every type, arrays, strings), the
 * tensor table and offsets; then the model built from one (description,
 * tensor checks, the tokenizer from tokenizer.ggml.*, the chat template),
 * its fp32 weights, and a few encodes. Seed: a tiny mkmodel GGUF. */
#include "fuzz_util.h"

#include "gguf.h"
#include "mkmodel.h"
#include "model.h"
#include "quant.h"
#include "tokenizer.h"

#include <stdbool.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 1, o.dim = 8, o.n_heads = 2, o.n_kv_heads = 1, o.ffn_dim = 8, o.n_merges = 40, o.dtype = PA_F16;
  const char *seed = fz_path("seed.gguf");
  if (getenv("PALIGN_FUZZ_QWEN2"))
    o.arch = PA_MK_QWEN2;
  if (pa_mkmodel_write_gguf(&o, seed))
    fz_die("mkmodel");
  fz_seed_file(seed);
  return 0;
}

static void walk(const pa_gguf *g) {
  volatile uint64_t sink = 0; /* unsigned: a file's integers may be anything, and their sum must not overflow */
  for (size_t i = 0; i < pa_gguf_n_kv(g); i++) {
    const pa_gguf_kv *kv = pa_gguf_kv_at(g, i);
    const uint32_t t = kv->type == PA_GGUF_ARRAY ? kv->elem : kv->type;
    const bool integer = t <= 5 || t == 7 || t == 10 || t == 11; /* the integer and bool types */
    if (integer && kv->n > 0)
      sink += (uint64_t)pa_gguf_kv_int(kv, 0) + (uint64_t)pa_gguf_kv_int(kv, kv->n - 1);
  }
  for (size_t i = 0; i < pa_gguf_n_tensors(g); i++)
    sink += (uint64_t)pa_gguf_tensor_at(g, i)->nbytes;
  (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fz_path("in.gguf");
  fz_write(path, data, size);
  pa_gguf *g = NULL;
  int rc = pa_gguf_open(path, &g);
  fz_check_error(rc);
  if (!rc) {
    walk(g);
    pa_tokenizer *t = NULL;
    if (!(rc = pa_tokenizer_from_gguf(g, &t))) {
      int32_t *ids = NULL;
      size_t n = 0;
      static const char text[] = "<|im_start|>user\nYou worry about things.. 123 é<|im_end|>";
      if (!pa_tokenizer_encode(t, text, sizeof text - 1, PA_TOK_PARSE_SPECIAL | PA_TOK_ADD_SPECIAL, &ids, &n)) {
        char *back = NULL;
        size_t len = 0;
        if (!pa_tokenizer_decode(t, ids, n, PA_TOK_DECODE_SPECIAL, &back, &len))
          free(back);
      }
      free(ids);
    }
    fz_check_error(rc);
    pa_tokenizer_destroy(t);
    pa_gguf_close(g);
  }
  pa_model *m = NULL;
  rc = pa_model_open(path, &m);
  fz_check_error(rc);
  if (!rc) {
    pa_weights w;
    fz_check_error(pa_model_load_weights(m, &w));
    pa_weights_free(&w);
    pa_model_close(m);
  }
  return 0;
}
