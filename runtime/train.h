/* train.h: the transformer's forward pass with every activation kept, and
 * its backward pass into a low-rank adapter (lora.h), over the backend's
 * operations. The base model's weights stay frozen: the backward pass
 * computes the gradients of the activations and of the adapter's A and B
 * only (which is what LoRA training needs).
 *
 * The unit is a training batch: one shared prefix (the tokens every sequence
 * starts with, computed once per batch, and receiving the gradient of every
 * sequence through attention) and sequences after it. The loss is the
 * caller's: the forward pass returns, at each sequence's last token, the
 * logits of a few tokens the caller names (for DPO with one-token answers,
 * the chosen and the rejected letter), and the backward pass takes the
 * gradient of the loss with respect to exactly those logits. Positions: the
 * prefix is at 0..P-1, token j of a sequence at P + j.
 *
 * Memory is planned once (pa_trainer_create, from the largest batch a caller
 * will run): every per-layer activation, the backward pass's buffers and the
 * attention scratch are allocated then, never during a step.
 *
 * Determinism: the same inputs give the same bits, whatever the number of
 * threads (the CPU backend's products and attention are cut into pieces of a
 * fixed shape). A forward pass without an adapter gives exactly the bits of
 * one with an adapter whose B matrices are zero.
 *
 * Thread safety: one call at a time per trainer; the trainer uses the pa_lm's
 * weights and RoPE tables (read only), not its scratch, so a pa_lm may serve
 * forward passes and a trainer alternately. Errors: 0 or a negative PA_E*
 * code with a message (status.h).
 */
#ifndef PALIGN_TRAIN_H
#define PALIGN_TRAIN_H

#include "backend.h"
#include "forward.h"
#include "lora.h"

#include <stddef.h>
#include <stdint.h>

typedef struct pa_trainer pa_trainer;

/* The largest batch the trainer will run. */
typedef struct {
  int max_prefix;  /* prefix tokens */
  int max_seqs;    /* sequences */
  int max_seq_len; /* tokens of one sequence (after the prefix) */
  int max_rows;    /* prefix + all sequences' tokens; 0: max_prefix + max_seqs * max_seq_len */
  int max_out;     /* logits asked for at each sequence's last token */
  int rank;        /* of the adapters it will train (for its buffers) */
} pa_train_plan;

typedef struct {
  const int32_t *prefix; /* may be NULL with n_prefix 0 */
  int n_prefix;
  const int32_t *const *tokens; /* [n_seqs] sequences, each at least one token */
  const int *n_tokens;
  int n_seqs;
  const int32_t *out; /* [n_seqs][n_out]: the tokens whose logits are wanted at each sequence's last token */
  int n_out;
  /* Called between the layers of the forward pass and of the backward pass
   * that follows it (from the calling thread); a non-zero return stops the
   * pass with PA_ECANCELED, after which the trainer wants a new forward
   * pass. For signals. NULL: never. */
  int (*poll)(void *ctx);
  void *poll_ctx;
} pa_train_batch;

int pa_trainer_create(pa_lm *lm, const pa_train_plan *plan, pa_trainer **out);
void pa_trainer_destroy(pa_trainer *t); /* accepts NULL */

/* Bytes the trainer holds (activations, buffers, scratch; not the
 * optimiser's three or four adapter-sized buffers). */
size_t pa_trainer_bytes(const pa_trainer *t);
/* FLOPs of every forward and backward pass so far (products and attention,
 * 2 per multiply-add). */
double pa_trainer_flops(const pa_trainer *t);

/* Runs the batch with the adapter (NULL: the base model) and keeps what the
 * backward pass needs. logits: [n_seqs][n_out]. The batch must stay valid
 * until the backward pass. */
int pa_trainer_forward(pa_trainer *t, const pa_lora *lora, const pa_train_batch *b, float *logits);

/* Back from dlogits [n_seqs][n_out] (dloss / dlogits of the last forward
 * pass, which must have had an adapter): writes the gradient of every A and
 * B into grad (same shape as that adapter; what it held is not read, so a
 * device backend copies nothing up, only the gradient down). grad may be
 * NULL when the adapter is the one being optimised (below): the gradient
 * then stays where the trainer runs, for pa_trainer_step. */
int pa_trainer_backward(pa_trainer *t, const float *dlogits, pa_lora *grad);

/* ---- optimising an adapter where the trainer runs ----
 * AdamW (backend.h, pa_adamw_step) with its moments, the gradient and the
 * adapter's values all in the backend's memory, so that on a device a step
 * moves nothing between host and device but the batch, its logits and their
 * gradient (on Llama-3-8B's shape with rank 8, a gradient of 27 MB down and
 * the adapter's 27 MB up each step, and the host's pass over both, stay
 * off the bus and off the host).
 *
 * pa_trainer_optimise makes `adapter` the one the trainer optimises, from
 * its values now, both moments zero, step 0; called again (for it or
 * another), it starts again from there, the adapter optimised until then
 * first getting its values as pa_trainer_adapter_sync gives them. Then:
 *   - pa_trainer_forward with that adapter uses the trainer's copy (with
 *     NULL, the base model, as always; another adapter is refused);
 *   - pa_trainer_backward may keep the gradient there (grad NULL);
 *   - pa_trainer_step takes a step from it, once per backward pass (the next
 *     backward pass needs a forward pass with the new values);
 *   - pa_trainer_adapter_sync writes the trainer's values into the
 *     adapter's arena: a device backend's steps leave the arena as it was
 *     (stale) until then, a host backend's write it in place.
 * The adapter must live until the trainer is destroyed. Same bits on every
 * backend for the same gradients (backend.h: adamw). */
typedef struct {
  double lr, weight_decay; /* decoupled: w -= lr weight_decay w */
  double beta1, beta2, eps;
} pa_adamw_opts;

/* Step t's constants (t = 1, 2, ...): what pa_trainer_step gives the backend's adamw. */
pa_adamw_step pa_adamw_constants(const pa_adamw_opts *o, int t);

int pa_trainer_optimise(pa_trainer *t, pa_lora *adapter, const pa_adamw_opts *o);
int pa_trainer_step(pa_trainer *t);
int pa_trainer_adapter_sync(pa_trainer *t);
/* Steps taken since pa_trainer_optimise. */
int pa_trainer_steps(const pa_trainer *t);

#endif
