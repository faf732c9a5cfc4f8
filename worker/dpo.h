/* dpo.h: the DPO baseline for one subject (PAS.md, "DPO baseline"): a LoRA
 * adapter on W_q, W_k, W_v and W_o of every layer, trained by Direct
 * Preference Optimisation on pairs made from the subject's train answers.
 *
 * Pairs: for every train item with a known answer v (train_index order), the
 * prompt is the question exactly as the evaluator asks it for `none` (the
 * default system prompt, the item question, the assistant turn opened with
 * "Option ("); chosen = the letter of v (A = 5 ... E = 1), rejected = the
 * letter of 6 - v; for v = 3 two pairs, rejected A and rejected E. An answer
 * is one token, so a pair's two log-probabilities come from one position of
 * one forward pass, and the two pairs of a v = 3 item share it. Since
 * log pi(c) - log pi(r) = logit_c - logit_r (the softmax's normaliser
 * cancels), only the five letters' logits are computed.
 *
 * Loss per pair (beta > 0):
 *     -log sigmoid(beta ((lp(c) - lp_ref(c)) - (lp(r) - lp_ref(r)))),
 * averaged over the pairs of a step. The reference is the base model (no
 * adapter); its letter logits are computed once per subject, with the
 * trainer and in the batches of the first epoch, so that at step 0 (B = 0,
 * the policy equal to the reference) every margin is exactly 0 and the loss
 * ln 2 up to the rounding of the mean (1e-16).
 *
 * Optimisation: epochs over the items in an order shuffled per epoch (seeded
 * by the run seed and the subject id), `batch` items per step (a step's pairs
 * are those of its items), AdamW as PyTorch writes it (decoupled weight
 * decay, bias-corrected moments). The adapter's A matrices start as PEFT
 * initialises them from the same seed, its B matrices at zero.
 *
 * Determinism: the same inputs give the same bits, whatever the number of
 * threads. Errors: 0 or a negative PA_E* code with a message (status.h);
 * pa_dpo_validate names the bad setting. Threads: one call per evaluator at
 * a time.
 */
#ifndef PALIGN_DPO_H
#define PALIGN_DPO_H

#include "eval.h"
#include "inventory.h"
#include "lora.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
  int epochs;          /* passes over the subject's items */
  int batch;           /* items (prompts) per optimiser step */
  double lr;           /* AdamW learning rate */
  double beta;         /* DPO's beta */
  int rank;            /* LoRA rank */
  double alpha;        /* LoRA alpha: the update is alpha / rank * B A */
  double weight_decay; /* AdamW's decoupled weight decay */
  double adam_beta1, adam_beta2, adam_eps;
  uint64_t run_seed; /* with the subject id: the adapter's A and the epochs' orders */
} pa_dpo_opts;

/* palign's defaults (docs/DPO.md gives the reason for each): 4 epochs,
 * batch 16, lr 1e-3, beta 0.1, rank 8, alpha 16, weight decay 0, Adam
 * betas 0.9 and 0.999, eps 1e-8, run seed 1. */
pa_dpo_opts pa_dpo_defaults(void);

/* Every setting in range (epochs >= 1, batch >= 1, lr > 0, beta > 0, rank
 * 1..256, alpha > 0, ...): PA_EINVAL naming the first bad one otherwise. */
int pa_dpo_validate(const pa_dpo_opts *o);

/* One preference pair: the item, and the letters (0 = A ... 4 = E). */
typedef struct {
  int item;
  int chosen, rejected;
} pa_dpo_pair;

typedef struct {
  char subject_id[32];
  pa_dpo_opts opts;
  uint64_t seed;    /* pa_dpo_seed(run_seed, subject) */
  pa_lora *adapter; /* the trained adapter (owned) */
  int n_items;      /* prompts trained on */
  int n_pairs;
  pa_dpo_pair *pairs; /* [n_pairs] */
  int n_steps;
  double *loss;                      /* [n_steps] each step's mean loss over its pairs, before its update */
  double *epoch_loss;                /* [epochs] the mean of an epoch's step losses */
  double ref_seconds, train_seconds; /* wall time: the reference pass, the steps */
  long ref_tokens, train_tokens;     /* tokens computed (each step's prefix once) */
  double ref_flops, train_flops;     /* forward (and backward) FLOPs */
  size_t trainer_bytes;              /* activation memory the trainer planned */
} pa_dpo_result;

/* The seed of a subject's adapter and orders. */
uint64_t pa_dpo_seed(uint64_t run_seed, const char *subject_id);

/* The pairs of subject s (above) into pairs[2 * n_train] at most; returns
 * their number. */
int pa_dpo_pairs(const pa_inventory *inv, const pa_subject *s, pa_dpo_pair *pairs);

/* Trains subject s's adapter with ev's model and prompts (ev must read
 * answers from logits). out must be zeroed or an earlier result (freed
 * first). A subject without any known train answer is PA_EINVAL naming it.
 * poll (ev's, pa_eval_opts) is called before every step and between the
 * layers of its passes. */
int pa_dpo_train(pa_evaluator *ev, const pa_inventory *inv, const pa_subject *s, const pa_dpo_opts *o,
                 pa_dpo_result *out);

void pa_dpo_result_free(pa_dpo_result *r); /* accepts NULL and a zeroed result */

/* DPO's loss and its gradient for one pair from the letter logits of the
 * policy and the reference: returns -log sigmoid(beta m) with
 * m = (pol[c] - pol[r]) - (ref[c] - ref[r]); *dm = d loss / d m. */
double pa_dpo_pair_loss(const float *pol, const float *ref, int chosen, int rejected, double beta, double *dm);

#endif
