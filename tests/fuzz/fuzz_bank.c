/* The PAS activation bank's cache file (bank.h): magic, format version, the
 * key's fields (fingerprints, prompt settings, dimensions), the item list
 * and the data, truncated or corrupted anywhere, read under the key of a
 * tiny model and a tiny inventory. Seed: the valid bank of that model. */
#include "fuzz_util.h"

#include "bank.h"
#include "forward.h"
#include "inventory.h"
#include "mkmodel.h"
#include "model.h"

static pa_bank_key key;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 1, o.dim = 8, o.n_heads = 2, o.n_kv_heads = 1, o.ffn_dim = 8;
  char dir[512];
  snprintf(dir, sizeof dir, "%s", fz_path("papi/x"));
  *strrchr(dir, '/') = '\0';
  fz_tiny_papi(dir);
  static pa_inventory *inv;
  static pa_model *m;
  pa_lm *lm = NULL;
  pa_bank *b = NULL;
  char fp[65];
  const char *model = fz_path("m.gguf"), *seed = fz_path("seed.bin");
  if (pa_mkmodel_write_gguf(&o, model) || pa_inventory_load(dir, &inv) || pa_model_open(model, &m) ||
      pa_model_fingerprint(model, fp) ||
      pa_bank_key_make(fp, pa_model_config_get(m), pa_model_tokenizer(m), pa_model_chat(m), inv, NULL, &key) ||
      pa_lm_create(m, &(pa_lm_opts){.n_threads = 1, .max_seq = 512}, &lm) ||
      pa_bank_compute(lm, pa_model_tokenizer(m), pa_model_chat(m), inv, NULL, &b) || pa_bank_save(b, seed, &key))
    fz_die("bank");
  pa_bank_destroy(b);
  pa_lm_destroy(lm);
  fz_seed_file(seed);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fz_path("in.bin");
  fz_write(path, data, size);
  pa_bank *b = NULL;
  int rc = pa_bank_load(path, &key, &b);
  fz_check_error(rc);
  if (!rc) {
    int n;
    volatile float sink = pa_bank_data(b)[0] + (float)pa_bank_items(b, &n)[0];
    (void)sink;
  }
  pa_bank_destroy(b);
  return 0;
}
