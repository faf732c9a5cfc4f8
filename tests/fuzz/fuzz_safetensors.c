/* safetensors files: the 8-byte header length, the JSON header (dtypes,
 * shapes, offsets, __metadata__), the data's extent; then every tensor
 * converted to fp32. Seed: a tiny mkmodel HF directory's model.safetensors. */
#include "fuzz_util.h"

#include "mkmodel.h"
#include "quant.h"
#include "safetensors.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 1, o.dim = 8, o.n_heads = 2, o.n_kv_heads = 1, o.ffn_dim = 8, o.n_merges = 20, o.dtype = PA_BF16;
  if (pa_mkmodel_write_hf(&o, fz_path("seed")))
    fz_die("mkmodel");
  fz_seed_file(fz_path("seed/model.safetensors"));
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *path = fz_path("in.safetensors");
  fz_write(path, data, size);
  pa_safetensors *st = NULL;
  int rc = pa_safetensors_open(path, &st);
  fz_check_error(rc);
  if (rc)
    return 0;
  for (size_t i = 0; i < pa_safetensors_n_tensors(st); i++) {
    const pa_st_tensor *t = pa_safetensors_tensor_at(st, i);
    uint64_t n = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
      n *= t->shape[d];
    if (n > (1u << 24))
      continue; /* the file holds them (checked), but converting huge ones only costs time */
    float *f = malloc((n ? n : 1) * sizeof *f);
    if (f)
      fz_check_error(pa_st_tensor_to_f32(t, f));
    free(f);
  }
  (void)pa_safetensors_metadata(st, "format");
  pa_safetensors_close(st);
  return 0;
}
