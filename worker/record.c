#include "record.h"

#include "status.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Every piece of the message lives in one arena of blocks, freed at once. */
typedef struct block {
  struct block *next;
  size_t used, cap;
  _Alignas(16) unsigned char data[];
} block;

struct pa_record {
  block *blocks;
  Palign__SubjectResult msg;
  size_t cap_methods;
  bool oom;
};

static void *arena_alloc(pa_record *r, size_t n) {
  n = (n + 15) & ~(size_t)15;
  if (!r->blocks || r->blocks->cap - r->blocks->used < n) {
    size_t cap = n > 65536 ? n : 65536;
    block *b = malloc(sizeof *b + cap);
    if (!b) {
      r->oom = true;
      return NULL;
    }
    b->next = r->blocks, b->used = 0, b->cap = cap;
    r->blocks = b;
  }
  void *p = r->blocks->data + r->blocks->used;
  r->blocks->used += n;
  memset(p, 0, n);
  return p;
}

static char *arena_strdup(pa_record *r, const char *s) {
  size_t n = strlen(s ? s : "") + 1;
  char *d = arena_alloc(r, n);
  if (d)
    memcpy(d, s ? s : "", n);
  return d;
}

#define ARENA_NEW(r, type)      ((type *)arena_alloc((r), sizeof(type)))
#define ARENA_ARRAY(r, type, n) ((type *)arena_alloc((r), (size_t)(n) * sizeof(type) + 1))

int pa_record_create(const pa_subject *s, int64_t subject_index, uint64_t run_seed, const char *model_fingerprint,
                     pa_record **out) {
  *out = NULL;
  pa_record *r = calloc(1, sizeof *r);
  if (!r)
    return pa_error(PA_ENOMEM, "no memory for a record");
  palign__subject_result__init(&r->msg);
  r->msg.subject_id = arena_strdup(r, s->id);
  r->msg.subject_index = subject_index;
  r->msg.run_seed = run_seed;
  r->msg.model_fingerprint = arena_strdup(r, model_fingerprint);
  char host[256] = "";
  gethostname(host, sizeof host - 1);
  r->msg.host = arena_strdup(r, host);
  if (r->oom) {
    pa_record_destroy(r);
    return pa_error(PA_ENOMEM, "no memory for a record");
  }
  *out = r;
  return PA_OK;
}

void pa_record_destroy(pa_record *r) {
  if (!r)
    return;
  for (block *b = r->blocks, *next; b; b = next) {
    next = b->next;
    free(b);
  }
  free(r);
}

Palign__SubjectResult *pa_record_message(pa_record *r) { return &r->msg; }

long pa_reference_way_tokens(const pa_eval_stats *e) {
  return e->naive_tokens + (long)PA_REFERENCE_GEN_TOKENS * e->prompts;
}

static Palign__Metrics *metrics_msg(pa_record *r, const pa_subject_metrics *m) {
  Palign__Metrics *p = ARENA_NEW(r, Palign__Metrics);
  double *d = ARENA_ARRAY(r, double, 4 * PA_N_TRAITS);
  int32_t *k = ARENA_ARRAY(r, int32_t, 2 * PA_N_TRAITS);
  if (!p || !d || !k)
    return NULL;
  palign__metrics__init(p);
  p->n_mae = p->n_n_scored = p->n_n_unknown = p->n_keyed_pred = p->n_keyed_true = PA_N_TRAITS;
  p->mae = d, p->keyed_pred = d + PA_N_TRAITS, p->keyed_true = d + 2 * PA_N_TRAITS;
  p->n_scored = k, p->n_unknown = k + PA_N_TRAITS;
  for (int t = 0; t < PA_N_TRAITS; t++) {
    p->mae[t] = m->mae[t];
    p->keyed_pred[t] = m->keyed_pred[t];
    p->keyed_true[t] = m->keyed_true[t];
    p->n_scored[t] = m->n_scored[t];
    p->n_unknown[t] = m->n_unknown[t];
  }
  p->mae_sum = m->mae_sum;
  p->n_missing = m->n_missing;
  return p;
}

void pa_metrics_from_proto(const Palign__Metrics *p, pa_subject_metrics *m) {
  for (int t = 0; t < PA_N_TRAITS; t++) {
    m->mae[t] = p && (size_t)t < p->n_mae ? p->mae[t] : NAN;
    m->keyed_pred[t] = p && (size_t)t < p->n_keyed_pred ? p->keyed_pred[t] : NAN;
    m->keyed_true[t] = p && (size_t)t < p->n_keyed_true ? p->keyed_true[t] : NAN;
    m->n_scored[t] = p && (size_t)t < p->n_n_scored ? p->n_scored[t] : 0;
    m->n_unknown[t] = p && (size_t)t < p->n_n_unknown ? p->n_unknown[t] : 0;
  }
  m->mae_sum = p ? p->mae_sum : NAN;
  m->n_missing = p ? p->n_missing : 0;
}

/* preds[0..n) (and probs [n][5] unless NULL or NaN) as a Predictions message. */
static Palign__Predictions *preds_msg(pa_record *r, const pa_pred *preds, const float *probs, int n) {
  Palign__Predictions *p = ARENA_NEW(r, Palign__Predictions);
  int32_t *items = ARENA_ARRAY(r, int32_t, n);
  uint8_t *bytes = ARENA_ARRAY(r, uint8_t, 2 * n);
  if (!p || !items || !bytes)
    return NULL;
  palign__predictions__init(p);
  bool expected = n > 0, have_probs = probs && n > 0;
  for (int i = 0; i < n; i++) {
    items[i] = preds[i].item;
    bytes[i] = preds[i].truth;
    bytes[n + i] = preds[i].answer;
    expected &= !isnan(preds[i].expected);
    have_probs &= have_probs && !isnan(probs[(size_t)i * 5]);
  }
  p->n_items = (size_t)n, p->items = items;
  p->truth = (ProtobufCBinaryData){(size_t)n, bytes};
  p->answer = (ProtobufCBinaryData){(size_t)n, bytes + n};
  if (expected) {
    float *e = ARENA_ARRAY(r, float, n);
    if (!e)
      return NULL;
    for (int i = 0; i < n; i++)
      e[i] = preds[i].expected;
    p->n_expected = (size_t)n, p->expected = e;
  }
  if (have_probs) {
    float *q = ARENA_ARRAY(r, float, 5 * n);
    if (!q)
      return NULL;
    memcpy(q, probs, (size_t)n * 5 * sizeof *q);
    p->n_probs = (size_t)n * 5, p->probs = q;
  }
  return p;
}

static Palign__Cost *cost_msg(pa_record *r, const pa_eval_stats *st) {
  Palign__Cost *c = ARENA_NEW(r, Palign__Cost);
  if (!c)
    return NULL;
  palign__cost__init(c);
  c->seconds = st->seconds;
  c->tokens = st->prefix_tokens + st->question_tokens;
  c->full_prompt_tokens = st->naive_tokens;
  c->reference_way_tokens = st->prompts ? pa_reference_way_tokens(st) : 0;
  c->prompts = st->prompts;
  return c;
}

static Palign__MethodResult *new_method(pa_record *r, const char *method) {
  if (r->msg.n_methods == r->cap_methods) {
    size_t cap = r->cap_methods ? 2 * r->cap_methods : 8;
    Palign__MethodResult **m = ARENA_ARRAY(r, Palign__MethodResult *, cap);
    if (!m)
      return NULL;
    if (r->msg.n_methods)
      memcpy(m, r->msg.methods, r->msg.n_methods * sizeof *m);
    r->msg.methods = m, r->cap_methods = cap;
  }
  Palign__MethodResult *m = ARENA_NEW(r, Palign__MethodResult);
  if (!m)
    return NULL;
  palign__method_result__init(m);
  m->method = arena_strdup(r, method);
  r->msg.methods[r->msg.n_methods++] = m;
  return m;
}

int pa_record_add_method(pa_record *r, const pa_inventory *inv, const char *method, const pa_method_out *mo) {
  Palign__MethodResult *m = new_method(r, method);
  Palign__MethodRow **rows = ARENA_ARRAY(r, Palign__MethodRow *, mo->n_rows);
  if (!m || !rows)
    return pa_error(PA_ENOMEM, "no memory for a record");
  m->n_rows = (size_t)mo->n_rows, m->rows = rows;
  for (int k = 0; k < mo->n_rows; k++) {
    pa_subject_metrics sm;
    pa_metrics_subject(inv, mo->preds[k], mo->n[k], &sm);
    rows[k] = ARENA_NEW(r, Palign__MethodRow);
    if (!rows[k])
      return pa_error(PA_ENOMEM, "no memory for a record");
    palign__method_row__init(rows[k]);
    rows[k]->name = arena_strdup(r, mo->name[k]);
    rows[k]->predictions = preds_msg(r, mo->preds[k], mo->probs[k], mo->n[k]);
    rows[k]->metrics = metrics_msg(r, &sm);
  }
  m->cost = cost_msg(r, &mo->stats);
  return r->oom ? pa_error(PA_ENOMEM, "no memory for a record") : PA_OK;
}

int pa_record_add_failure(pa_record *r, const char *method, const char *error) {
  Palign__MethodResult *m = new_method(r, method);
  if (!m)
    return pa_error(PA_ENOMEM, "no memory for a record");
  m->failed = true;
  m->error = arena_strdup(r, error);
  return r->oom ? pa_error(PA_ENOMEM, "no memory for a record") : PA_OK;
}

int pa_record_set_pas(pa_record *r, const pa_pas_result *pas) {
  Palign__PasResult *p = ARENA_NEW(r, Palign__PasResult);
  if (!p)
    return pa_error(PA_ENOMEM, "no memory for a record");
  palign__pas_result__init(p);
  const pa_pas_fit *f = &pas->fit;
  p->status = arena_strdup(r, pa_pas_status_str(pas->status));
  p->message = arena_strdup(r, pas->message);
  p->run_seed = pas->run_seed;
  p->split_seed = f->split_seed;
  p->top_k = f->n_selected;
  p->n_layers = f->n_layers, p->heads_per_layer = f->n_heads, p->head_dim = f->head_dim;
  p->n_samples = f->n_samples, p->n_train = f->n_train, p->n_val = f->n_val;
  p->fit_seconds = pas->fit_seconds;
  p->holdout_per_trait = pas->holdout_per_trait;

  p->heads = ARENA_ARRAY(r, Palign__PasHead *, f->n_selected);
  p->n_heads = 0;
  for (int h = 0; p->heads && h < f->n_selected; h++) {
    const pa_pas_head *src = &f->heads[h];
    Palign__PasHead *d = ARENA_NEW(r, Palign__PasHead);
    float *dir = ARENA_ARRAY(r, float, f->head_dim);
    if (!d || !dir)
      break;
    palign__pas_head__init(d);
    d->layer = src->layer, d->head = src->head;
    d->score = src->score, d->train_acc = src->train_acc, d->val_acc = src->val_acc, d->sigma = src->sigma;
    memcpy(dir, src->direction, (size_t)f->head_dim * sizeof *dir);
    d->n_direction = (size_t)f->head_dim, d->direction = dir;
    p->heads[p->n_heads++] = d;
  }

  const int n = pas->n_items, A = pas->n_alphas;
  p->items = ARENA_ARRAY(r, int32_t, n);
  uint8_t *sel = ARENA_ARRAY(r, uint8_t, n);
  if (p->items && sel && n > 0) {
    memcpy(p->items, pas->items, (size_t)n * sizeof *p->items);
    memcpy(sel, pas->in_select, (size_t)n);
    p->n_items = (size_t)n;
    p->in_select = (ProtobufCBinaryData){(size_t)n, sel};
  }
  p->alphas = ARENA_ARRAY(r, double, A);
  if (p->alphas && A > 0) {
    memcpy(p->alphas, pas->alphas, (size_t)A * sizeof *p->alphas);
    p->n_alphas = (size_t)A;
  }
  const size_t rows = (size_t)PA_PAS_N_VARIANTS * (size_t)A;
  p->grid = ARENA_ARRAY(r, Palign__Predictions *, rows);
  for (size_t k = 0; p->grid && k < rows && pas->preds; k++)
    if ((p->grid[k] = preds_msg(r, pas->preds + k * (size_t)n, NULL, n)))
      p->n_grid++;

  p->chosen = ARENA_ARRAY(r, Palign__PasChoice *, PA_PAS_N_VARIANTS * PA_PAS_N_PROTOCOLS);
  for (int v = 0; p->chosen && v < PA_PAS_N_VARIANTS; v++)
    for (int q = 0; q < PA_PAS_N_PROTOCOLS; q++) {
      const pa_pas_choice *c = &pas->chosen[v][q];
      if (pas->status == PA_PAS_FITTED && c->index < 0)
        continue; /* a variant that was not asked for */
      Palign__PasChoice *d = ARENA_NEW(r, Palign__PasChoice);
      if (!d)
        break;
      palign__pas_choice__init(d);
      d->variant = arena_strdup(r, pa_pas_variant_name(v));
      d->protocol = arena_strdup(r, pa_pas_protocol_name(q));
      d->index = c->index;
      d->alpha = c->alpha;
      d->select_mae_sum = c->select_mae_sum;
      d->metrics = c->index >= 0 ? metrics_msg(r, &c->metrics) : NULL;
      p->chosen[p->n_chosen++] = d;
    }
  p->grid_cost = cost_msg(r, &pas->eval);
  if (p->grid_cost)
    p->grid_cost->seconds = pas->eval_seconds;
  r->msg.pas = p;
  return r->oom ? pa_error(PA_ENOMEM, "no memory for a record") : PA_OK;
}

static Palign__DpoSettings *dpo_settings_msg(pa_record *r, const pa_dpo_opts *o) {
  Palign__DpoSettings *d = ARENA_NEW(r, Palign__DpoSettings);
  if (!d)
    return NULL;
  pa_dpo_settings_to_proto(o, d);
  return d;
}

void pa_dpo_settings_to_proto(const pa_dpo_opts *o, Palign__DpoSettings *d) {
  palign__dpo_settings__init(d);
  d->epochs = o->epochs, d->batch = o->batch, d->lr = o->lr, d->beta = o->beta, d->rank = o->rank;
  d->alpha = o->alpha, d->weight_decay = o->weight_decay;
  d->adam_beta1 = o->adam_beta1, d->adam_beta2 = o->adam_beta2, d->adam_eps = o->adam_eps;
}

int pa_record_set_dpo(pa_record *r, const pa_dpo_result *dpo) {
  Palign__DpoResult *p = ARENA_NEW(r, Palign__DpoResult);
  if (!p || !dpo->adapter)
    return pa_error(PA_ENOMEM, "no memory for a record");
  palign__dpo_result__init(p);
  const pa_lora *l = dpo->adapter;
  p->settings = dpo_settings_msg(r, &dpo->opts);
  p->run_seed = dpo->opts.run_seed, p->seed = dpo->seed;
  p->n_layers = l->n_layers, p->rank = l->rank, p->scale = l->scale;
  p->in = ARENA_ARRAY(r, int32_t, PA_LORA_N_TARGETS);
  p->out = ARENA_ARRAY(r, int32_t, PA_LORA_N_TARGETS);
  p->adapter = ARENA_ARRAY(r, float, l->n_floats);
  p->loss = ARENA_ARRAY(r, double, dpo->n_steps);
  p->epoch_loss = ARENA_ARRAY(r, double, dpo->opts.epochs);
  if (!p->in || !p->out || !p->adapter || !p->loss || !p->epoch_loss)
    return pa_error(PA_ENOMEM, "no memory for a record");
  for (int t = 0; t < PA_LORA_N_TARGETS; t++)
    p->in[t] = l->in[t], p->out[t] = l->out[t];
  p->n_in = p->n_out = PA_LORA_N_TARGETS;
  memcpy(p->adapter, l->arena, l->n_floats * sizeof *p->adapter);
  p->n_adapter = l->n_floats;
  memcpy(p->loss, dpo->loss, (size_t)dpo->n_steps * sizeof *p->loss);
  p->n_loss = (size_t)dpo->n_steps;
  memcpy(p->epoch_loss, dpo->epoch_loss, (size_t)dpo->opts.epochs * sizeof *p->epoch_loss);
  p->n_epoch_loss = (size_t)dpo->opts.epochs;
  p->n_items = dpo->n_items, p->n_pairs = dpo->n_pairs, p->n_steps = dpo->n_steps;
  const pa_eval_stats ref = {.seconds = dpo->ref_seconds, .prefix_tokens = dpo->ref_tokens, .prompts = dpo->n_items};
  const pa_eval_stats train = {.seconds = dpo->train_seconds, .prefix_tokens = dpo->train_tokens};
  p->reference_cost = cost_msg(r, &ref);
  p->train_cost = cost_msg(r, &train);
  p->reference_flops = dpo->ref_flops, p->train_flops = dpo->train_flops;
  p->trainer_bytes = (int64_t)dpo->trainer_bytes;
  r->msg.dpo = p;
  return r->oom ? pa_error(PA_ENOMEM, "no memory for a record") : PA_OK;
}

int pa_dpo_adapter_from_proto(const Palign__DpoResult *p, const char *subject_id, const pa_model_config *c,
                              pa_lora **out) {
  *out = NULL;
  if (!p)
    return pa_error(PA_ENOTFOUND, "subject %s has no DPO adapter (run the dpo method)", subject_id);
  if (!(p->scale > 0) || !isfinite(p->scale) || p->rank < 1 || p->rank > 256)
    return pa_error(PA_EINVAL, "subject %s: the stored DPO adapter has rank %d and scale %g", subject_id, p->rank,
                    (double)p->scale);
  int rc = pa_lora_create(c, p->rank, p->scale, out);
  if (rc)
    return rc;
  pa_lora *l = *out;
  bool fits = p->n_layers == l->n_layers && p->n_in == PA_LORA_N_TARGETS && p->n_out == PA_LORA_N_TARGETS &&
              p->n_adapter == l->n_floats;
  for (int t = 0; fits && t < PA_LORA_N_TARGETS; t++)
    fits = p->in[t] == l->in[t] && p->out[t] == l->out[t];
  for (size_t i = 0; fits && i < p->n_adapter; i++)
    fits = isfinite(p->adapter[i]);
  if (!fits) {
    const size_t expected = l->n_floats;
    pa_lora_destroy(l);
    *out = NULL;
    return pa_error(PA_EINVAL,
                    "subject %s: the stored DPO adapter (%d layers, %zu values) does not fit this model (%d layers, "
                    "%zu values expected) or holds a value that is not finite",
                    subject_id, p->n_layers, p->n_adapter, c->n_layers, expected);
  }
  memcpy(l->arena, p->adapter, l->n_floats * sizeof *l->arena);
  return PA_OK;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int pa_subject_run(const pa_method_ctx *ctx, const pa_method *const *methods, int n, const pa_subject *s,
                   const int *items, int n_items, pa_method_out *mo, pa_record *r,
                   void (*progress)(void *pctx, const pa_subject *s, const char *method, const pa_method_out *mo,
                                    int failed),
                   void *pctx) {
  const double t0 = now_s();
  int failed = 0, rc = PA_OK;
  bool pas_ran = false, dpo_ran = false;
  for (int j = 0; j < n && !rc; j++) {
    mo->n_rows = 0;
    mo->stats = (pa_eval_stats){0};
    int mrc = methods[j]->run(ctx, s, items, n_items, mo);
    if (mrc == PA_ENOMEM || mrc == PA_ECANCELED || mrc == PA_EIO)
      return mrc; /* the machine's trouble, not the subject's: stop rather than store a failure */
    pas_ran |= methods[j]->needs_bank;
    dpo_ran |= methods[j]->needs_dpo;
    if (mrc) {
      failed++;
      rc = pa_record_add_failure(r, methods[j]->name, pa_errmsg());
    } else {
      for (int k = 0; k < mo->n_rows; k++)
        for (int i = 0; i < mo->n[k]; i++)
          mo->preds[k][i].truth = s->answers[mo->preds[k][i].item];
      rc = pa_record_add_method(r, ctx->inv, methods[j]->name, mo);
    }
    if (progress)
      progress(pctx, s, methods[j]->name, mo, mrc != 0);
  }
  if (!rc && pas_ran && ctx->pas_result && !strcmp(ctx->pas_result->subject_id, s->id))
    rc = pa_record_set_pas(r, ctx->pas_result);
  if (!rc && dpo_ran && ctx->dpo_result && ctx->dpo_result->adapter && !strcmp(ctx->dpo_result->subject_id, s->id))
    rc = pa_record_set_dpo(r, ctx->dpo_result);
  if (rc)
    return rc;
  r->msg.seconds = now_s() - t0;
  r->msg.finished_unix = (int64_t)time(NULL);
  return failed;
}

int pa_pas_steering_from_proto(const Palign__PasResult *p, const char *subject_id, double alpha, int n_layers,
                               int n_heads, int head_dim, float *delta) {
  if (!p || strcmp(p->status ? p->status : "", "fitted") != 0)
    return pa_error(PA_EINVAL, "subject %s: no fitted PAS intervention (status '%s')", subject_id,
                    p && p->status ? p->status : "none");
  if (p->n_layers != n_layers || p->heads_per_layer != n_heads || p->head_dim != head_dim)
    return pa_error(PA_EINVAL, "subject %s: the PAS fit is for %d layers x %d heads of %d, the model has %d x %d of %d",
                    subject_id, p->n_layers, p->heads_per_layer, p->head_dim, n_layers, n_heads, head_dim);
  pa_pas_head *heads = calloc(p->n_heads + 1, sizeof *heads);
  if (!heads)
    return pa_error(PA_ENOMEM, "no memory");
  for (size_t h = 0; h < p->n_heads; h++) {
    const Palign__PasHead *src = p->heads[h];
    bool finite = isfinite(src->sigma);
    for (size_t i = 0; finite && i < src->n_direction; i++)
      finite = isfinite(src->direction[i]);
    if (src->layer < 0 || src->layer >= n_layers || src->head < 0 || src->head >= n_heads ||
        src->n_direction != (size_t)head_dim || !finite) {
      free(heads);
      return pa_error(PA_EINVAL, "subject %s: PAS head %zu is malformed (layer %d, head %d, %zu direction values, %s)",
                      subject_id, h, src->layer, src->head, src->n_direction,
                      finite ? "all finite" : "a value that is not a finite number");
    }
    heads[h] = (pa_pas_head){.layer = src->layer, .head = src->head, .sigma = src->sigma, .direction = src->direction};
  }
  pa_pas_fit f = {.status = PA_PAS_FITTED,
                  .n_layers = n_layers,
                  .n_heads = n_heads,
                  .head_dim = head_dim,
                  .n_selected = (int)p->n_heads,
                  .heads = heads};
  int rc = pa_pas_steering(&f, alpha, n_layers, n_heads, head_dim, delta);
  free(heads);
  return rc;
}

int pa_pas_chosen_alpha(const Palign__PasResult *p, const char *variant, const char *protocol, double *alpha) {
  for (size_t i = 0; p && i < p->n_chosen; i++) {
    const Palign__PasChoice *c = p->chosen[i];
    if (c->index >= 0 && !strcmp(c->variant, variant) && !strcmp(c->protocol, protocol)) {
      *alpha = c->alpha;
      return PA_OK;
    }
  }
  bool fitted = false; /* the variant at all, under another protocol */
  for (size_t i = 0; p && i < p->n_chosen; i++)
    fitted |= !strcmp(p->chosen[i]->variant, variant);
  if (!fitted)
    return pa_error(PA_ENOTFOUND, "the PAS variant %s was not fitted (the run's methods did not include it)", variant);
  return pa_error(PA_ENOTFOUND, "no PAS alpha chosen for %s under the %s protocol", variant, protocol);
}
