/* The encoder and decoder on any text: three fixed tokenizers (SmolLM2-style
 * byte-level BPE from a GGUF, Qwen2-style from a tokenizer.json with NFC, and
 * the same Qwen2 one from GGUF), with and without special-token parsing.
 * Byte-level BPE without a normalizer must give the input back:
 * decode(encode(x)) == x for every byte string, or the harness aborts.
 * Seed: a chat-like text with special tokens, digits and non-ASCII. */
#include "fuzz_util.h"

#include "mkmodel.h"
#include "model.h"
#include "tokenizer.h"

static pa_model *models[3];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  static const char seed[] = "<|im_start|>user\nYou worry about things.. (A). 1,000 caf\xc3\xa9 \xe6\x97\xa5\xff<|im_end|>";
  fz_seed(seed, sizeof seed - 1);
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 1, o.dim = 8, o.n_heads = 2, o.n_kv_heads = 1, o.ffn_dim = 8;
  const char *paths[3] = {fz_path("llama.gguf"), fz_path("qwen2-hf"), fz_path("qwen2.gguf")};
  if (pa_mkmodel_write_gguf(&o, paths[0]))
    fz_die("mkmodel");
  o.arch = PA_MK_QWEN2;
  if (pa_mkmodel_write_hf(&o, paths[1]) || pa_mkmodel_write_gguf(&o, paths[2]))
    fz_die("mkmodel");
  for (int i = 0; i < 3; i++)
    if (pa_model_open(paths[i], &models[i]))
      fz_die(paths[i]);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *text = (const char *)data;
  for (int i = 0; i < 3; i++)
    for (unsigned flags = 0; flags <= PA_TOK_PARSE_SPECIAL; flags += PA_TOK_PARSE_SPECIAL) {
      const pa_tokenizer *t = pa_model_tokenizer(models[i]);
      int32_t *ids = NULL;
      size_t n = 0;
      int rc = pa_tokenizer_encode(t, text, size, flags, &ids, &n);
      fz_check_error(rc);
      if (rc)
        continue;
      char *back = NULL;
      size_t len = 0;
      rc = pa_tokenizer_decode(t, ids, n, PA_TOK_DECODE_SPECIAL, &back, &len);
      fz_check_error(rc);
      /* no normalizer: every byte comes back */
      if (!rc && i != 1 && (len != size || memcmp(back, text, size) != 0))
        abort();
      free(back);
      free(ids);
    }
  return 0;
}
