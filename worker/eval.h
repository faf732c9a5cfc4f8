/* eval.h: asking a model the questionnaire and reading its answers
 * (PAS.md, "Reading an answer").
 *
 * An evaluator answers a list of items under one system prompt. The rendered
 * prompts of all the items are tokenized whole, and their longest common
 * token prefix (the system prompt, the chat markup and the start of the
 * question) is computed once into a shared KV cache; the rest of each prompt
 * runs against it, batched. Because the split is made on the final token
 * sequences, the model sees exactly the tokens of each full prompt.
 *
 * Answer modes:
 *  - logits (default): the assistant turn opens with a prefix ("Option ("),
 *    and the answer is read from the next-token distribution restricted to
 *    the option letters A..E: the argmax letter and the expected score
 *    sum_k p_k * score_k (A = 5 ... E = 1).
 *  - generate (the reference's way): greedy decoding of up to 15 tokens after
 *    the prefix "Option"; the answer is the first match of [a-eA-E][^a-zA-Z]
 *    in the first 12 characters of the decoded text; no match = unknown.
 *
 * Steering (PAS) applies to the shared prefix and the questions alike.
 * Without steering, asking the same items under the same system prompt as
 * one of the last four unsteered calls returns those answers without running
 * the model (the `none` baseline asks every subject the same questions, and
 * PAS's alpha 0 asks what `icl` and `none` asked just before).
 * One evaluator is used by one thread at a time.
 */
#ifndef PALIGN_EVAL_H
#define PALIGN_EVAL_H

#include "chat.h"
#include "forward.h"
#include "inventory.h"
#include "metrics.h"
#include "tokenizer.h"

#include <stdbool.h>

typedef enum { PA_READ_LOGITS = 0, PA_READ_GENERATE = 1 } pa_read_mode;

typedef struct {
  pa_read_mode mode;
  const char *prefix; /* NULL: "Option (" (logits) or "Option" (generate) */
  bool keep_case;     /* false (default): item text lowercased, as the reference does when answering */
  int batch;          /* questions per forward batch; 0: 64 */
  int gen_tokens;     /* generate mode; 0: 15 */
  bool no_share;      /* run every prompt whole (no shared prefix): the naive way, for comparison */
  /* Called before every forward pass and between its layers (from the
   * calling thread); a non-zero return stops the call with PA_ECANCELED.
   * For heartbeats and signals. */
  int (*poll)(void *ctx);
  void *poll_ctx;
  /* Called (with poll_ctx) after each step of work made of many, such as
   * DPO's optimiser steps: done of total, and the step's loss. NULL: not
   * reported. For progress lines. */
  void (*step)(void *ctx, int done, int total, double loss);
} pa_eval_opts;

/* What one call cost. */
typedef struct {
  long prefix_tokens;   /* computed for the shared prefix (0 when reused) */
  long question_tokens; /* continuation tokens, generated ones included */
  long naive_tokens;    /* what full prompts one by one would have computed */
  long prompts;         /* questions answered (remembered answers included) */
  double seconds;
} pa_eval_stats;

typedef struct pa_evaluator pa_evaluator;

int pa_evaluator_create(pa_lm *lm, const pa_tokenizer *tok, const pa_chat_template *tmpl, const pa_eval_opts *o,
                        pa_evaluator **out);
void pa_evaluator_destroy(pa_evaluator *ev); /* accepts NULL */

/* Answers items[0..n) under `system` (NULL: the template's default). Sets
 * preds[i].item, .answer and .expected (truth is left for the caller);
 * probs, if not NULL, gets [n][5] option probabilities (A..E; logits mode;
 * NaN in generate mode).
 * steer: [n_layers][n_heads][head_dim] or NULL. stats may be NULL. */
int pa_evaluator_answer(pa_evaluator *ev, const pa_inventory *inv, const char *system, const int *items, int n,
                        const float *steer, pa_pred *preds, float *probs, pa_eval_stats *stats);

/* An adapter (lora.h) every later call answers with, until set to NULL
 * again (then the model is plain). Calls with an adapter are not remembered
 * and reuse no shared prefix. Not owned. */
void pa_evaluator_set_lora(pa_evaluator *ev, const pa_lora *lora);

/* The token ids of the prompt pa_evaluator_answer asks item `number` with
 * under system (NULL: the template's default); *ids malloc'd. */
int pa_evaluator_prompt(const pa_evaluator *ev, const pa_inventory *inv, const char *system, int number, int32_t **ids,
                        size_t *n);
/* The token ids of the letters A..E after the prefix (logits mode), or NULL
 * in generate mode. */
const int32_t *pa_evaluator_letters(const pa_evaluator *ev);
pa_lm *pa_evaluator_lm(const pa_evaluator *ev);
const pa_eval_opts *pa_evaluator_opts(const pa_evaluator *ev);

/* The reference's answer parser: first [a-eA-E][^a-zA-Z] within the first
 * 12 characters; returns 5 (A) .. 1 (E), or 0 when there is none. */
int pa_parse_generated_answer(const char *text, size_t len);

#endif
