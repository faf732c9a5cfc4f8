/* forward.h: the Llama transformer's forward pass, with KV caches, a shared
 * prefix, head capture and head steering, over a backend (kernels/backend.h).
 *
 * The unit of work is a batch of sequences. Each sequence brings new tokens
 * and its own KV cache (the new tokens' keys and values are appended to it);
 * all sequences of a batch may also attend to one shared, read-only prefix
 * cache first. So a subject's long system prompt is computed once into a
 * prefix and its 180 questions run against it in one batch, without the
 * prefix being recomputed or copied. Positions continue after the prefix:
 * token j of a sequence whose cache holds c tokens is at prefix_len + c + j.
 *
 * Head outputs are z[l][h], the output of attention head h of layer l before
 * the output projection W_o (the slice h of W_o's input). Steering adds a
 * displacement delta[l][h] to z[l][h] at every position of every sequence
 * in the batch; heads whose displacement is all zero cost nothing, and a
 * batch without steering runs exactly the plain model. A LoRA adapter
 * (lora.h) adds its low-rank update to the attention projections.
 *
 * Ownership: pa_lm owns the fp32 weights and scratch, caches are separate
 * objects (create as many as needed). Thread safety: one forward at a time
 * per pa_lm (it reuses its scratch); the backend threads internally.
 * Errors: 0 or a negative PA_E* code with a message (status.h).
 */
#ifndef PALIGN_FORWARD_H
#define PALIGN_FORWARD_H

#include "lora.h"
#include "model.h"

#include <stdint.h>

typedef struct pa_lm pa_lm;
typedef struct pa_kv pa_kv;

/* How the weight matrices are held (the norms and biases stay fp32). */
typedef enum {
  PA_WEIGHTS_AUTO = 0, /* bf16 on a device backend, fp32 on the host */
  PA_WEIGHTS_FP32,     /* as loaded: the CPU reference's precision */
  PA_WEIGHTS_BF16,     /* rounded to bf16 (backend.h: pa_bf16): half the memory, the GPU's tensor cores */
} pa_weight_format;

typedef struct {
  int n_threads; /* 0: all cores */
  int max_seq;   /* longest position needed; 0: the model's context length */
  /* where the model runs; NULL: the CPU. A backend whose memory is not the
   * host's (CUDA) gets the weights uploaded once, and keeps the KV caches and
   * the activations; a forward pass then moves only its inputs (tokens,
   * positions, the steering displacements, a LoRA adapter) up and the logits
   * and captured heads down; so does the trainer (train.h). */
  const struct pa_backend *backend;
  pa_weight_format weights;
} pa_lm_opts;

/* Loads the model's weights (fp32, dequantised), puts them in the backend's
 * memory in the format asked for, and prepares the backend. */
int pa_lm_create(const pa_model *m, const pa_lm_opts *o, pa_lm **out);
void pa_lm_destroy(pa_lm *lm); /* accepts NULL */
const pa_model_config *pa_lm_config(const pa_lm *lm);
/* "fp32" or "bf16": how this pa_lm holds the weight matrices. */
const char *pa_lm_weights(const pa_lm *lm);

/* PA_ENOMEM with the message fmt ("no memory for ..."), for memory of
 * backend be that its alloc refused; where be's memory is a device's, the
 * message adds the backend and its reason (the device, the bytes asked for
 * and what it had free), so that the user sees what would fit. */
int pa_backend_enomem(const struct pa_backend *be, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Parses "auto", "fp32" or "bf16"; -1 for anything else. */
int pa_weight_format_parse(const char *s);
/* Floating-point operations of every pass this pa_lm has run (products and
 * attention, counted as 2 per multiply-add; elementwise work left out). */
double pa_lm_flops(const pa_lm *lm);
int pa_lm_max_seq(const pa_lm *lm);

/* A KV cache for up to `capacity` tokens of one sequence. */
int pa_kv_create(const pa_lm *lm, int capacity, pa_kv **out);
void pa_kv_destroy(pa_kv *kv); /* accepts NULL */
void pa_kv_clear(pa_kv *kv);
/* Forgets all but the first len tokens (no-op if it holds fewer), so that
 * another continuation can follow them. */
void pa_kv_truncate(pa_kv *kv, int len);
int pa_kv_len(const pa_kv *kv);
int pa_kv_capacity(const pa_kv *kv);

typedef struct {
  const int32_t *tokens; /* new tokens, at least one */
  int n_tokens;
  pa_kv *kv; /* this sequence's cache: must have room for n_tokens more */
} pa_seq;

typedef struct {
  const pa_kv *prefix; /* shared keys/values every sequence attends to first, or NULL */
  pa_seq *seqs;
  int n_seqs;
  const float *steer;  /* [n_layers][n_heads][head_dim] displacement, or NULL */
  const pa_lora *lora; /* a low-rank adapter on W_q, W_k, W_v, W_o (lora.h), or NULL */
  float *logits;       /* out: [n_seqs][vocab_size] at each sequence's last new token, or NULL */
  /* The logits of these tokens only, or NULL for the whole vocabulary:
   * logits is then [n_seqs][n_logit_ids], in this order. The output product
   * runs over their rows alone (gathered once and kept while the set stays
   * the same), and a device backend returns n_logit_ids floats a sequence:
   * for the option letters, 5 of a vocabulary of 10^5. */
  const int32_t *logit_ids;
  int n_logit_ids;
  float *heads;        /* out: [n_seqs][n_layers][n_heads][head_dim] at the last new token, or NULL */
  /* Called before every layer after the first, or NULL. A non-zero return
   * stops the pass with PA_ECANCELED; the caches' contents are then
   * undefined (clear them before using them again). For signals and
   * heartbeats during long passes. */
  int (*poll)(void *ctx);
  void *poll_ctx;
} pa_batch;

/* Runs the batch. Caches grow by their sequence's new tokens. */
int pa_lm_forward(pa_lm *lm, const pa_batch *b);

typedef struct {
  int max_tokens;      /* tokens to generate at most */
  const int32_t *stop; /* generation ends after any of these (included in the output) */
  int n_stop;
  const float *steer;  /* as in pa_batch, or NULL */
  const pa_lora *lora; /* as in pa_batch, or NULL */
} pa_gen_opts;

/* Greedy decoding: runs `prompt` after `prefix` (may be NULL) in `kv`
 * (cleared first; capacity for prompt and output), then appends the argmax
 * token until a stop token or max_tokens. *out (malloc'd) holds the
 * generated tokens. */
int pa_lm_generate(pa_lm *lm, const pa_kv *prefix, pa_kv *kv, const int32_t *prompt, int n_prompt, const pa_gen_opts *o,
                   int32_t **out, int *n_out);

/* Index of the largest of n values (the first on ties). */
int pa_argmax(const float *v, int n);

/* Softmax restricted to a token set: p[i] = exp(logits[ids[i]]) normalised
 * over the n ids (computed in double, stable). */
void pa_softmax_subset(const float *logits, const int32_t *ids, int n, double *p);

#endif
