#include "dpo.h"

#include "probe.h"
#include "prompts.h"
#include "status.h"
#include "train.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_LETTERS 5

pa_dpo_opts pa_dpo_defaults(void) {
  return (pa_dpo_opts){.epochs = 4,
                       .batch = 16,
                       .lr = 1e-3,
                       .beta = 0.1,
                       .rank = 8,
                       .alpha = 16,
                       .weight_decay = 0,
                       .adam_beta1 = 0.9,
                       .adam_beta2 = 0.999,
                       .adam_eps = 1e-8,
                       .run_seed = 1};
}

int pa_dpo_validate(const pa_dpo_opts *o) {
  if (o->epochs < 1 || o->epochs > 1000)
    return pa_error(PA_EINVAL, "DPO: epochs %d is outside 1..1000", o->epochs);
  if (o->batch < 1 || o->batch > 4096)
    return pa_error(PA_EINVAL, "DPO: batch %d is outside 1..4096", o->batch);
  if (!(o->lr > 0) || !isfinite(o->lr))
    return pa_error(PA_EINVAL, "DPO: learning rate %g must be a positive number", o->lr);
  if (!(o->beta > 0) || !isfinite(o->beta))
    return pa_error(PA_EINVAL, "DPO: beta %g must be a positive number", o->beta);
  if (o->rank < 1 || o->rank > 256)
    return pa_error(PA_EINVAL, "DPO: LoRA rank %d is outside 1..256", o->rank);
  if (!(o->alpha > 0) || !isfinite(o->alpha))
    return pa_error(PA_EINVAL, "DPO: LoRA alpha %g must be a positive number", o->alpha);
  const float scale = (float)(o->alpha / o->rank); /* as the adapter holds it */
  if (!(scale > 0) || !isfinite(scale))
    return pa_error(PA_EINVAL, "DPO: LoRA alpha %g over rank %d is %g as a float: outside what an adapter can scale by",
                    o->alpha, o->rank, (double)scale);
  if (!(o->weight_decay >= 0) || !isfinite(o->weight_decay))
    return pa_error(PA_EINVAL, "DPO: weight decay %g must be 0 or more", o->weight_decay);
  if (!(o->adam_beta1 >= 0 && o->adam_beta1 < 1) || !(o->adam_beta2 >= 0 && o->adam_beta2 < 1))
    return pa_error(PA_EINVAL, "DPO: Adam betas %g, %g must be in [0, 1)", o->adam_beta1, o->adam_beta2);
  if (!(o->adam_eps > 0) || !isfinite(o->adam_eps))
    return pa_error(PA_EINVAL, "DPO: Adam epsilon %g must be a positive number", o->adam_eps);
  return PA_OK;
}

uint64_t pa_dpo_seed(uint64_t run_seed, const char *subject_id) {
  return pa_pas_split_seed(run_seed ^ 0x44504f2d4c6f5241ull /* "DPO-LoRA" */, subject_id);
}

int pa_dpo_pairs(const pa_inventory *inv, const pa_subject *s, pa_dpo_pair *pairs) {
  int n_train, n = 0;
  const int *train = pa_inventory_train(inv, &n_train);
  for (int i = 0; i < n_train; i++) {
    const int v = s->answers[train[i]];
    if (v < 1 || v > 5)
      continue;
    const int chosen = 5 - v; /* letter index: A = 5 ... E = 1 */
    if (v == 3) {
      pairs[n++] = (pa_dpo_pair){.item = train[i], .chosen = chosen, .rejected = 0};
      pairs[n++] = (pa_dpo_pair){.item = train[i], .chosen = chosen, .rejected = 4};
    } else {
      pairs[n++] = (pa_dpo_pair){.item = train[i], .chosen = chosen, .rejected = 5 - (6 - v)};
    }
  }
  return n;
}

double pa_dpo_pair_loss(const float *pol, const float *ref, int chosen, int rejected, double beta, double *dm) {
  const double m = ((double)pol[chosen] - pol[rejected]) - ((double)ref[chosen] - ref[rejected]);
  const double x = beta * m;
  /* -log sigmoid(x) = softplus(-x), written to stay finite for large |x| */
  const double loss = x > 0 ? log1p(exp(-x)) : -x + log1p(exp(x));
  *dm = -beta / (1 + exp(x)); /* -beta sigmoid(-x) */
  return loss;
}

void pa_dpo_result_free(pa_dpo_result *r) {
  if (!r)
    return;
  pa_lora_destroy(r->adapter);
  free(r->pairs);
  free(r->loss);
  free(r->epoch_loss);
  memset(r, 0, sizeof *r);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A subject's prompts: one per item that has pairs, split into the prefix
 * every prompt shares and each prompt's rest. */
typedef struct {
  int n;           /* items */
  int *item;       /* [n] item numbers, train_index order */
  int *first_pair; /* [n + 1]: item i's pairs are first_pair[i] .. first_pair[i + 1] - 1 */
  int32_t **ids;   /* [n] whole prompts */
  size_t *len;
  size_t common; /* tokens of the shared prefix (every prompt keeps at least one of its own) */
  int longest;   /* tokens after the prefix, at most */
} prompts;

static void prompts_free(prompts *p) {
  for (int i = 0; p->ids && i < p->n; i++)
    free(p->ids[i]);
  free(p->ids), free(p->len), free(p->item), free(p->first_pair);
  memset(p, 0, sizeof *p);
}

static int prompts_make(const pa_evaluator *ev, const pa_inventory *inv, const pa_dpo_pair *pairs, int n_pairs,
                        prompts *p) {
  memset(p, 0, sizeof *p);
  p->item = malloc((size_t)n_pairs * sizeof *p->item);
  p->first_pair = malloc(((size_t)n_pairs + 1) * sizeof *p->first_pair);
  p->ids = calloc((size_t)n_pairs, sizeof *p->ids);
  p->len = calloc((size_t)n_pairs, sizeof *p->len);
  if (!p->item || !p->first_pair || !p->ids || !p->len)
    return pa_error(PA_ENOMEM, "no memory");
  for (int k = 0; k < n_pairs; k++) {
    if (k > 0 && pairs[k].item == pairs[k - 1].item)
      continue;
    p->item[p->n] = pairs[k].item;
    p->first_pair[p->n] = k;
    int rc = pa_evaluator_prompt(ev, inv, PA_DEFAULT_SYSTEM, pairs[k].item, &p->ids[p->n], &p->len[p->n]);
    if (rc)
      return rc;
    p->n++;
  }
  p->first_pair[p->n] = n_pairs;
  p->common = p->len[0];
  for (int i = 0; i < p->n; i++) {
    size_t k = 0;
    while (k < p->common && k < p->len[i] && p->ids[i][k] == p->ids[0][k])
      k++;
    p->common = k;
  }
  for (int i = 0; i < p->n; i++)
    if (p->common >= p->len[i])
      p->common = p->len[i] - 1;
  for (int i = 0; i < p->n; i++)
    if ((int)(p->len[i] - p->common) > p->longest)
      p->longest = (int)(p->len[i] - p->common);
  return PA_OK;
}

/* One step's batch: the prompts order[0..n) after the shared prefix, the five letters wanted at each. */
static void batch_make(const prompts *p, const pa_eval_opts *eo, const int *order, int n, const int32_t *letters,
                       const int32_t **tokens, int *n_tokens, int32_t *out, pa_train_batch *b) {
  for (int i = 0; i < n; i++) {
    tokens[i] = p->ids[order[i]] + p->common;
    n_tokens[i] = (int)(p->len[order[i]] - p->common);
    memcpy(out + (size_t)i * N_LETTERS, letters, N_LETTERS * sizeof *out);
  }
  *b = (pa_train_batch){.prefix = p->ids[0],
                        .n_prefix = (int)p->common,
                        .tokens = tokens,
                        .n_tokens = n_tokens,
                        .n_seqs = n,
                        .out = out,
                        .n_out = N_LETTERS,
                        .poll = eo->poll,
                        .poll_ctx = eo->poll_ctx};
}

int pa_dpo_train(pa_evaluator *ev, const pa_inventory *inv, const pa_subject *s, const pa_dpo_opts *o,
                 pa_dpo_result *out) {
  pa_dpo_result_free(out);
  int rc = pa_dpo_validate(o);
  if (rc)
    return rc;
  const int32_t *letters = pa_evaluator_letters(ev);
  if (!letters)
    return pa_error(PA_EINVAL, "DPO trains on the option letters' logits: it needs the logits answer mode");
  const pa_eval_opts *eo = pa_evaluator_opts(ev);
  pa_lm *lm = pa_evaluator_lm(ev);
  int n_train;
  pa_inventory_train(inv, &n_train);
  snprintf(out->subject_id, sizeof out->subject_id, "%s", s->id);
  out->opts = *o;
  out->seed = pa_dpo_seed(o->run_seed, s->id);
  out->pairs = malloc((2 * (size_t)n_train + 1) * sizeof *out->pairs);
  if (!out->pairs)
    return pa_error(PA_ENOMEM, "no memory");
  out->n_pairs = pa_dpo_pairs(inv, s, out->pairs);
  if (out->n_pairs == 0) {
    pa_dpo_result_free(out);
    return pa_error(PA_EINVAL, "subject %s has no known train answer to make DPO pairs from", s->id);
  }

  prompts p;
  pa_trainer *tr = NULL;
  float *ref = NULL, *pol = NULL, *dlog = NULL;
  int *order = NULL, *n_tokens = NULL;
  const int32_t **tokens = NULL;
  int32_t *want = NULL;
  if ((rc = prompts_make(ev, inv, out->pairs, out->n_pairs, &p)))
    goto done;
  out->n_items = p.n;
  const int B = o->batch < p.n ? o->batch : p.n;
  const int steps_per_epoch = (p.n + B - 1) / B;
  out->n_steps = steps_per_epoch * o->epochs;
  const pa_train_plan plan = {
      .max_prefix = (int)p.common, .max_seqs = B, .max_seq_len = p.longest, .max_out = N_LETTERS, .rank = o->rank};
  out->loss = calloc((size_t)out->n_steps, sizeof *out->loss);
  out->epoch_loss = calloc((size_t)o->epochs, sizeof *out->epoch_loss);
  ref = malloc((size_t)p.n * N_LETTERS * sizeof *ref); /* by prompt */
  pol = malloc((size_t)B * N_LETTERS * sizeof *pol);   /* by batch slot */
  dlog = malloc((size_t)B * N_LETTERS * sizeof *dlog);
  order = malloc((size_t)o->epochs * p.n * sizeof *order); /* every epoch's order */
  n_tokens = malloc((size_t)B * sizeof *n_tokens);
  tokens = malloc((size_t)B * sizeof *tokens);
  want = malloc((size_t)B * N_LETTERS * sizeof *want);
  if (!out->loss || !out->epoch_loss || !ref || !pol || !dlog || !order || !n_tokens || !tokens || !want) {
    rc = pa_error(PA_ENOMEM, "no memory");
    goto done;
  }
  if ((rc = pa_trainer_create(lm, &plan, &tr)) ||
      (rc = pa_lora_create(pa_lm_config(lm), o->rank, (float)(o->alpha / o->rank), &out->adapter)))
    goto done;
  out->trainer_bytes = pa_trainer_bytes(tr);
  pa_lora_init(out->adapter, out->seed);
  /* AdamW where the trainer runs: on a device the adapter, its gradient and
   * moments stay there, and come down once, at the end */
  const pa_adamw_opts adamw = {
      .lr = o->lr, .weight_decay = o->weight_decay, .beta1 = o->adam_beta1, .beta2 = o->adam_beta2, .eps = o->adam_eps};
  if ((rc = pa_trainer_optimise(tr, out->adapter, &adamw)))
    goto done;
  for (int e = 0; e < o->epochs; e++) {
    int *ord = order + (size_t)e * p.n;
    for (int i = 0; i < p.n; i++)
      ord[i] = i;
    pa_pas_shuffle(out->seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(e + 1)), p.n, ord);
  }

  /* the reference's letter logits, in the first epoch's batches */
  double t0 = now_s(), f0 = pa_trainer_flops(tr);
  for (int st = 0; st < steps_per_epoch; st++) {
    const int *ord = order + (size_t)st * B, n = st + 1 < steps_per_epoch ? B : p.n - st * B;
    pa_train_batch b;
    batch_make(&p, eo, ord, n, letters, tokens, n_tokens, want, &b);
    if (eo->poll && eo->poll(eo->poll_ctx)) {
      rc = pa_error(PA_ECANCELED, "stopped on request");
      goto done;
    }
    if ((rc = pa_trainer_forward(tr, NULL, &b, pol)))
      goto done;
    for (int i = 0; i < n; i++)
      memcpy(ref + (size_t)ord[i] * N_LETTERS, pol + (size_t)i * N_LETTERS, N_LETTERS * sizeof *ref);
    out->ref_tokens += b.n_prefix;
    for (int i = 0; i < n; i++)
      out->ref_tokens += n_tokens[i];
  }
  out->ref_seconds = now_s() - t0;
  out->ref_flops = pa_trainer_flops(tr) - f0;

  /* the steps */
  t0 = now_s(), f0 = pa_trainer_flops(tr);
  for (int e = 0, step = 0; e < o->epochs; e++) {
    double epoch_sum = 0;
    for (int st = 0; st < steps_per_epoch; st++, step++) {
      const int *ord = order + (size_t)e * p.n + (size_t)st * B, n = st + 1 < steps_per_epoch ? B : p.n - st * B;
      pa_train_batch b;
      batch_make(&p, eo, ord, n, letters, tokens, n_tokens, want, &b);
      if (eo->poll && eo->poll(eo->poll_ctx)) {
        rc = pa_error(PA_ECANCELED, "stopped on request");
        goto done;
      }
      if ((rc = pa_trainer_forward(tr, out->adapter, &b, pol)))
        goto done;
      int n_pairs = 0;
      for (int i = 0; i < n; i++)
        n_pairs += p.first_pair[ord[i] + 1] - p.first_pair[ord[i]];
      double loss = 0;
      memset(dlog, 0, (size_t)n * N_LETTERS * sizeof *dlog);
      for (int i = 0; i < n; i++)
        for (int k = p.first_pair[ord[i]]; k < p.first_pair[ord[i] + 1]; k++) {
          const pa_dpo_pair *pr = &out->pairs[k];
          double dm;
          loss += pa_dpo_pair_loss(pol + (size_t)i * N_LETTERS, ref + (size_t)ord[i] * N_LETTERS, pr->chosen,
                                   pr->rejected, o->beta, &dm);
          dlog[i * N_LETTERS + pr->chosen] += (float)(dm / n_pairs);
          dlog[i * N_LETTERS + pr->rejected] -= (float)(dm / n_pairs);
        }
      loss /= n_pairs;
      if (!isfinite(loss)) { /* the adapter has diverged: what it answers would not be numbers */
        rc = pa_error(PA_EINVAL, "DPO diverged: the loss is %s at step %d of %d (learning rate %g, beta %g)",
                      isnan(loss) ? "not a number" : "infinite", step + 1, out->n_steps, o->lr, o->beta);
        goto done;
      }
      out->loss[step] = loss;
      epoch_sum += loss;
      if ((rc = pa_trainer_backward(tr, dlog, NULL)) || (rc = pa_trainer_step(tr)))
        goto done;
      if (eo->step)
        eo->step(eo->poll_ctx, step + 1, out->n_steps, loss);
      out->train_tokens += b.n_prefix;
      for (int i = 0; i < n; i++)
        out->train_tokens += n_tokens[i];
    }
    out->epoch_loss[e] = epoch_sum / steps_per_epoch;
  }
  if ((rc = pa_trainer_adapter_sync(tr)))
    goto done;
  for (size_t i = 0; i < out->adapter->n_floats; i++)
    if (!isfinite(out->adapter->arena[i])) { /* the last step's, which no loss has seen */
      rc = pa_error(PA_EINVAL, "DPO diverged: the adapter holds %s after the last step (learning rate %g, beta %g)",
                    isnan(out->adapter->arena[i]) ? "a value that is not a number" : "an infinite value", o->lr,
                    o->beta);
      goto done;
    }
  out->train_seconds = now_s() - t0;
  out->train_flops = pa_trainer_flops(tr) - f0;
done:
  prompts_free(&p);
  pa_trainer_destroy(tr);
  free(ref), free(pol), free(dlog), free(order), free(n_tokens), free(tokens), free(want);
  if (rc)
    pa_dpo_result_free(out);
  return rc;
}
