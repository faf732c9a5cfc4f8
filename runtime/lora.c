#include "lora.h"

#include "rng.h"
#include "status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static size_t target_floats(const pa_lora *l, int t) { return (size_t)l->rank * ((size_t)l->in[t] + l->out[t]); }

static size_t target_offset(const pa_lora *l, int layer, int t) {
  size_t off = (size_t)layer * l->per_layer;
  for (int i = 0; i < t; i++)
    off += target_floats(l, i);
  return off;
}

static int make(int n_layers, int rank, float scale, const int in[4], const int out[4], pa_lora **res) {
  *res = NULL;
  if (rank < 1 || rank > 256)
    return pa_error(PA_EINVAL, "LoRA rank %d is outside 1..256", rank);
  if (!(scale > 0) || !isfinite(scale))
    return pa_error(PA_EINVAL, "LoRA scale %g must be a positive number", (double)scale);
  pa_lora *l = calloc(1, sizeof *l);
  if (!l)
    return pa_error(PA_ENOMEM, "no memory");
  l->n_layers = n_layers, l->rank = rank, l->scale = scale;
  memcpy(l->in, in, sizeof l->in);
  memcpy(l->out, out, sizeof l->out);
  for (int t = 0; t < PA_LORA_N_TARGETS; t++)
    l->per_layer += target_floats(l, t);
  l->n_floats = l->per_layer * (size_t)n_layers;
  l->arena = calloc(l->n_floats, sizeof *l->arena);
  if (!l->arena) {
    const size_t mb = l->n_floats * 4 >> 20;
    free(l);
    return pa_error(PA_ENOMEM, "no memory for a LoRA adapter of %zu MB", mb);
  }
  *res = l;
  return PA_OK;
}

int pa_lora_create(const pa_model_config *c, int rank, float scale, pa_lora **out) {
  const int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
  const int in[4] = {c->dim, c->dim, c->dim, q}, outs[4] = {q, kv, kv, c->dim};
  return make(c->n_layers, rank, scale, in, outs, out);
}

int pa_lora_create_like(const pa_lora *like, pa_lora **out) {
  return make(like->n_layers, like->rank, like->scale, like->in, like->out, out);
}

void pa_lora_destroy(pa_lora *l) {
  if (!l)
    return;
  free(l->arena);
  free(l);
}

float *pa_lora_a(const pa_lora *l, int layer, pa_lora_target t) { return l->arena + target_offset(l, layer, t); }

float *pa_lora_b(const pa_lora *l, int layer, pa_lora_target t) {
  return l->arena + target_offset(l, layer, t) + (size_t)l->rank * l->in[t];
}

const char *pa_lora_target_name(pa_lora_target t) {
  static const char *const names[] = {"q", "k", "v", "o"};
  return t >= 0 && t < PA_LORA_N_TARGETS ? names[t] : "?";
}

void pa_lora_init(pa_lora *l, uint64_t seed) {
  memset(l->arena, 0, l->n_floats * sizeof *l->arena);
  for (int layer = 0; layer < l->n_layers; layer++)
    for (int t = 0; t < PA_LORA_N_TARGETS; t++) {
      uint64_t s = seed ^ (0x51ed270b27ull * (uint64_t)(layer * PA_LORA_N_TARGETS + t + 1));
      const double bound = 1.0 / sqrt((double)l->in[t]);
      float *a = pa_lora_a(l, layer, t);
      for (size_t i = 0; i < (size_t)l->rank * l->in[t]; i++) {
        /* 24 random bits: exact in a double, the same on every machine */
        const double u = pa_uniform24(&s);
        a[i] = (float)((2 * u - 1) * bound);
      }
    }
}

int pa_lora_check(const pa_lora *l, const pa_model_config *c) {
  const int q = c->n_heads * c->head_dim, kv = c->n_kv_heads * c->head_dim;
  if (l->n_layers != c->n_layers || l->in[PA_LORA_Q] != c->dim || l->out[PA_LORA_Q] != q || l->out[PA_LORA_K] != kv ||
      l->out[PA_LORA_V] != kv || l->in[PA_LORA_O] != q || l->out[PA_LORA_O] != c->dim)
    return pa_error(PA_EINVAL,
                    "a LoRA adapter for %d layers of %d (q %d, kv %d) does not fit this model (%d layers of %d, q %d, "
                    "kv %d)",
                    l->n_layers, l->in[PA_LORA_Q], l->out[PA_LORA_Q], l->out[PA_LORA_K], c->n_layers, c->dim, q, kv);
  return PA_OK;
}
