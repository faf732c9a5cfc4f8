/* lora.h: low-rank adapters on the attention projections of every layer.
 *
 * For each layer l and target t in {W_q, W_k, W_v, W_o}, with the target's
 * weight W [out][in], the adapted projection is
 *     y = x W^T (+ bias) + scale * (x A^T) B^T,
 * A [rank][in], B [out][rank], scale = alpha / rank (PEFT's lora_alpha). The
 * forward pass (pa_batch.lora) and the trainer (train.h) apply it; a
 * gradient is a pa_lora of the same shape.
 *
 * Memory: one fp32 arena, layer-major, and in each layer the targets in the
 * order q, k, v, o, each A then B (pa_lora_a, pa_lora_b find them).
 * Ownership: pa_lora_create allocates, pa_lora_destroy (NULL accepted) frees.
 */
#ifndef PALIGN_LORA_H
#define PALIGN_LORA_H

#include "model.h"

#include <stddef.h>
#include <stdint.h>

typedef enum { PA_LORA_Q = 0, PA_LORA_K = 1, PA_LORA_V = 2, PA_LORA_O = 3, PA_LORA_N_TARGETS = 4 } pa_lora_target;

typedef struct {
  int n_layers, rank;
  float scale;                /* alpha / rank */
  int in[PA_LORA_N_TARGETS];  /* the target's input size */
  int out[PA_LORA_N_TARGETS]; /* and output size */
  size_t per_layer;           /* floats of one layer's A and B matrices */
  size_t n_floats;            /* of the arena */
  float *arena;
} pa_lora;

/* An adapter of `rank` (1..256) for the model's shape, all zero. */
int pa_lora_create(const pa_model_config *c, int rank, float scale, pa_lora **out);
/* Another, all zero, of the same shape and scale (a gradient, a moment). */
int pa_lora_create_like(const pa_lora *like, pa_lora **out);
void pa_lora_destroy(pa_lora *l);

/* PEFT's initialisation: every A uniform in [-1/sqrt(in), 1/sqrt(in))
 * (kaiming_uniform with a = sqrt(5)), every B zero, so the adapted model
 * starts equal to the base one. Deterministic: a splitmix64 stream seeded by
 * seed and the layer and target. */
void pa_lora_init(pa_lora *l, uint64_t seed);

float *pa_lora_a(const pa_lora *l, int layer, pa_lora_target t); /* [rank][in] */
float *pa_lora_b(const pa_lora *l, int layer, pa_lora_target t); /* [out][rank] */

const char *pa_lora_target_name(pa_lora_target t); /* "q", "k", "v", "o" */

/* Whether l was made for a model of this shape: PA_EINVAL with a message
 * naming both shapes otherwise. */
int pa_lora_check(const pa_lora *l, const pa_model_config *c);

#endif
