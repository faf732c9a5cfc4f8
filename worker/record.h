/* record.h: a subject's results as the Palign__SubjectResult message that
 * the store keeps (proto/palign.proto), and back.
 *
 * pa_subject_run runs a list of methods on one subject and builds its record
 * (`palign-worker`); it calls each method's run exactly as `palign eval` does
 * (methods.h), and tests/test_service.c checks that the stored predictions
 * equal eval's. A method that fails is recorded as failed (with its message)
 * and the others still run.
 *
 * The record owns every piece of its message (one arena); the message stays
 * valid until pa_record_destroy.
 */
#ifndef PALIGN_RECORD_H
#define PALIGN_RECORD_H

#include "dpo.h"
#include "inventory.h"
#include "methods.h"
#include "metrics.h"
#include "palign.pb-c.h"
#include "pas.h"

#include <stdint.h>

/* The reference code answers every item of every alpha with its whole prompt
 * and then generates this many tokens (PAS.md): what "the reference's way"
 * costs. */
#define PA_REFERENCE_GEN_TOKENS 15

typedef struct pa_record pa_record;

/* A record for subject s (its id and position in the subjects file). */
int pa_record_create(const pa_subject *s, int64_t subject_index, uint64_t run_seed, const char *model_fingerprint,
                     pa_record **out);
void pa_record_destroy(pa_record *r); /* accepts NULL */

/* The message; owned by r. */
Palign__SubjectResult *pa_record_message(pa_record *r);

/* Adds a method's rows (their preds' truth filled), with each row's metrics
 * over inv, and what it cost. */
int pa_record_add_method(pa_record *r, const pa_inventory *inv, const char *method, const pa_method_out *mo);
/* Adds a method that failed, with why. */
int pa_record_add_failure(pa_record *r, const char *method, const char *error);
/* Adds the subject's PAS fit and alpha grid (pas.h). */
int pa_record_set_pas(pa_record *r, const pa_pas_result *pas);
/* Adds the subject's DPO adapter, loss curve and costs (dpo.h). */
int pa_record_set_dpo(pa_record *r, const pa_dpo_result *dpo);
/* DPO's settings as their message (d is initialised here). */
void pa_dpo_settings_to_proto(const pa_dpo_opts *o, Palign__DpoSettings *d);

/* Runs methods[0..n) on subject s over the test items (items, n_items) and
 * adds each to r, with the PAS result when a PAS method ran. mo is scratch
 * with preds/probs room for n_items per row (methods.h). progress, if not
 * NULL, is called after each method. Returns the number of methods that
 * failed on this subject (each recorded with its message), or a negative
 * PA_E* code when the record could not be built or the trouble is not the
 * subject's: out of memory, an I/O error (PA_EIO) or a stop request
 * (PA_ECANCELED, from the evaluator's poll). */
int pa_subject_run(const pa_method_ctx *ctx, const pa_method *const *methods, int n, const pa_subject *s,
                   const int *items, int n_items, pa_method_out *mo, pa_record *r,
                   void (*progress)(void *pctx, const pa_subject *s, const char *method, const pa_method_out *mo,
                                    int failed),
                   void *pctx);

/* The reference's way of paying for a call (full prompts + 15 generated tokens each). */
long pa_reference_way_tokens(const pa_eval_stats *e);

/* ---- reading back ----------------------------------------------------------- */

/* A stored metrics message as metrics.h's struct (missing arrays read as NaN / 0). */
void pa_metrics_from_proto(const Palign__Metrics *p, pa_subject_metrics *m);

/* The steering displacement of a stored PAS fit at alpha, as pa_pas_steering
 * gives it for the fit it was made from (delta [n_layers][n_heads][head_dim]).
 * PA_EINVAL naming the subject if the fit's shape is not the model's, its
 * status is not "fitted" or a head is malformed (layer or head out of range,
 * a direction of the wrong length). */
int pa_pas_steering_from_proto(const Palign__PasResult *p, const char *subject_id, double alpha, int n_layers,
                               int n_heads, int head_dim, float *delta);

/* The adapter of a stored DPO result, checked against the model's shape
 * (layers, targets' sizes, value count, finite values): *out is a new
 * pa_lora (pa_lora_destroy). PA_ENOTFOUND for a record without one,
 * PA_EINVAL naming the subject for one that does not fit. */
int pa_dpo_adapter_from_proto(const Palign__DpoResult *p, const char *subject_id, const pa_model_config *c,
                              pa_lora **out);

/* The alpha a stored PAS result chose for variant ("pas" or "pas_only") under
 * protocol ("reference" or "holdout"): PA_ENOTFOUND if there is no such choice
 * (nothing fitted). */
int pa_pas_chosen_alpha(const Palign__PasResult *p, const char *variant, const char *protocol, double *alpha);

#endif
