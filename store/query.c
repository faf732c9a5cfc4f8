#include "query.h"

#include "index.h"

#include "jsonfile.h"
#include "record.h"
#include "status.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

const char *pa_query_record_problem(const pa_record_info *info, char *buf, size_t n) {
  int k = snprintf(buf, n, "%s offset %llu: %s", info->shard ? info->shard : "?", (unsigned long long)info->offset,
                   pa_record_status_str(info->status));
  if (info->subject_id[0] && k > 0 && (size_t)k < n)
    snprintf(buf + k, n - (size_t)k, " (subject %.64s)", info->subject_id);
  return buf;
}

static bool is_dir(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static bool exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

int pa_query_check_store(const char *store) {
  struct stat sb;
  if (stat(store, &sb) != 0)
    return errno == ENOENT ? pa_error(PA_ENOTFOUND, "%s: no such store", store)
                           : pa_error(PA_EIO, "%s: cannot read: %s", store, strerror(errno));
  if (!S_ISDIR(sb.st_mode))
    return pa_error(PA_EINVAL, "%s: not a store (not a directory)", store);
  char path[4096];
  snprintf(path, sizeof path, "%s/manifest.pb", store);
  bool manifest = exists(path);
  snprintf(path, sizeof path, "%s/shards", store);
  if (!manifest && !is_dir(path))
    return pa_error(PA_EINVAL, "%s: not a store (neither manifest.pb nor shards/ in it)", store);
  return PA_OK;
}

/* A stored row's metrics; an absent message reads as no scored item. */
static void row_metrics(const Palign__MethodRow *row, pa_subject_metrics *m) { pa_metrics_from_proto(row->metrics, m); }

/* Doubles the capacity of *arr (elements of size `size`) when n == *cap. */
static int grow(void **arr, int n, int *cap, size_t size) {
  if (n < *cap)
    return PA_OK;
  int nc = *cap ? 2 * *cap : 8;
  void *p = realloc(*arr, (size_t)nc * size);
  if (!p)
    return pa_error(PA_ENOMEM, "out of memory reading the store");
  *arr = p, *cap = nc;
  return PA_OK;
}

static void copy_str(char *dst, size_t n, const char *src) { snprintf(dst, n, "%s", src ? src : ""); }

/* Whether an entry whose name was kept by copy_str in n bytes is src's: a
 * name too long for the entry is compared as it was kept, so that it finds
 * its own entry again. */
static bool same_name(const char *kept, size_t n, const char *src) { return !strncmp(kept, src ? src : "", n - 1); }

/* ---- summary ---------------------------------------------------------------- */

typedef struct {
  pa_query_summary *s;
  pa_query_problem_fn problem;
  void *pctx;
  int rows_cap, methods_cap, chosen_cap, other_cap;
} summary_ctx;

static void list_failure(pa_query_failure *list, size_t n_before, const char *subject, const char *method,
                         const char *error) {
  if (n_before >= PA_QUERY_MAX_LISTED)
    return;
  pa_query_failure *f = &list[n_before];
  copy_str(f->subject, sizeof f->subject, subject);
  copy_str(f->method, sizeof f->method, method);
  copy_str(f->error, sizeof f->error, error);
}

static int find_method(summary_ctx *c, const char *name, pa_query_method **out) {
  pa_query_summary *s = c->s;
  for (int i = 0; i < s->n_methods; i++)
    if (same_name(s->methods[i].name, sizeof s->methods[i].name, name)) {
      *out = &s->methods[i];
      return PA_OK;
    }
  int rc = grow((void **)&s->methods, s->n_methods, &c->methods_cap, sizeof *s->methods);
  if (rc)
    return rc;
  *out = &s->methods[s->n_methods++];
  memset(*out, 0, sizeof **out);
  copy_str((*out)->name, sizeof(*out)->name, name);
  return PA_OK;
}

static int add_row(summary_ctx *c, const Palign__MethodRow *mr) {
  pa_query_summary *s = c->s;
  const char *name = mr->name ? mr->name : "";
  pa_query_row *row = NULL;
  for (int i = 0; i < s->n_rows && !row; i++)
    if (same_name(s->rows[i].name, sizeof s->rows[i].name, name))
      row = &s->rows[i];
  if (!row) {
    int rc = grow((void **)&s->rows, s->n_rows, &c->rows_cap, sizeof *s->rows);
    if (rc)
      return rc;
    row = &s->rows[s->n_rows++];
    memset(row, 0, sizeof *row);
    copy_str(row->name, sizeof row->name, name);
  }
  int rc = grow((void **)&row->metrics, row->n, &row->cap, sizeof *row->metrics);
  if (rc)
    return rc;
  row_metrics(mr, &row->metrics[row->n++]);
  return PA_OK;
}

static int add_choice(summary_ctx *c, const Palign__PasChoice *pc) {
  pa_query_summary *s = c->s;
  const char *v = pc->variant ? pc->variant : "", *p = pc->protocol ? pc->protocol : "";
  pa_query_choice *ch = NULL;
  for (int i = 0; i < s->n_chosen && !ch; i++)
    if (same_name(s->chosen[i].variant, sizeof s->chosen[i].variant, v) &&
        same_name(s->chosen[i].protocol, sizeof s->chosen[i].protocol, p))
      ch = &s->chosen[i];
  if (!ch) {
    int rc = grow((void **)&s->chosen, s->n_chosen, &c->chosen_cap, sizeof *s->chosen);
    if (rc)
      return rc;
    ch = &s->chosen[s->n_chosen++];
    memset(ch, 0, sizeof *ch);
    copy_str(ch->variant, sizeof ch->variant, v);
    copy_str(ch->protocol, sizeof ch->protocol, p);
  }
  if (pc->index < 0 || !isfinite(pc->alpha)) {
    ch->none++;
    return PA_OK;
  }
  int k = 0;
  while (k < ch->n_alphas && ch->alphas[k].alpha < pc->alpha)
    k++;
  if (k < ch->n_alphas && ch->alphas[k].alpha == pc->alpha) {
    ch->alphas[k].count++;
    return PA_OK;
  }
  int rc = grow((void **)&ch->alphas, ch->n_alphas, &ch->cap, sizeof *ch->alphas);
  if (rc)
    return rc;
  memmove(&ch->alphas[k + 1], &ch->alphas[k], (size_t)(ch->n_alphas - k) * sizeof *ch->alphas);
  ch->alphas[k] = (pa_query_alpha){pc->alpha, 1};
  ch->n_alphas++;
  return PA_OK;
}

static int add_pas(summary_ctx *c, const Palign__PasResult *pas) {
  pa_query_summary *s = c->s;
  const char *status = pas->status ? pas->status : "";
  if (strcmp(status, "fitted") != 0) {
    for (int i = 0; i < s->n_pas_other; i++)
      if (same_name(s->pas_other[i].status, sizeof s->pas_other[i].status, status)) {
        s->pas_other[i].count++;
        return PA_OK;
      }
    int rc = grow((void **)&s->pas_other, s->n_pas_other, &c->other_cap, sizeof *s->pas_other);
    if (rc)
      return rc;
    pa_query_status *o = &s->pas_other[s->n_pas_other++];
    copy_str(o->status, sizeof o->status, status);
    o->count = 1;
    return PA_OK;
  }
  s->pas_fitted++;
  s->pas_fit_seconds += pas->fit_seconds;
  if (pas->grid_cost) {
    s->pas_grid.seconds += pas->grid_cost->seconds;
    s->pas_grid.tokens += pas->grid_cost->tokens;
    s->pas_grid.full_prompt_tokens += pas->grid_cost->full_prompt_tokens;
    s->pas_grid.reference_way_tokens += pas->grid_cost->reference_way_tokens;
    s->pas_grid.prompts += pas->grid_cost->prompts;
  }
  for (size_t i = 0; i < pas->n_chosen; i++) {
    int rc = pas->chosen[i] ? add_choice(c, pas->chosen[i]) : PA_OK;
    if (rc)
      return rc;
  }
  return PA_OK;
}

static int summary_visit(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  summary_ctx *c = ctx;
  pa_query_summary *s = c->s;
  if (info->status != PA_RECORD_OK || !r) {
    if (c->problem) {
      char line[512];
      c->problem(c->pctx, pa_query_record_problem(info, line, sizeof line));
    }
    return 0;
  }
  if (r->failed) {
    list_failure(s->failed_subjects, s->subjects_failed++, r->subject_id, "", r->error);
    return 0;
  }
  s->subjects++;
  s->subject_seconds += r->seconds;
  for (size_t j = 0; j < r->n_methods; j++) {
    const Palign__MethodResult *mr = r->methods[j];
    if (!mr)
      continue;
    pa_query_method *m;
    int rc = find_method(c, mr->method ? mr->method : "", &m);
    if (rc)
      return rc;
    if (mr->failed) {
      m->failed++;
      list_failure(s->failed_methods, s->methods_failed++, r->subject_id, mr->method, mr->error);
      continue;
    }
    m->runs++;
    if (mr->cost) {
      m->seconds += mr->cost->seconds;
      m->tokens += mr->cost->tokens;
      m->full_prompt_tokens += mr->cost->full_prompt_tokens;
      m->reference_way_tokens += mr->cost->reference_way_tokens;
      m->prompts += mr->cost->prompts;
    }
    for (size_t k = 0; k < mr->n_rows; k++)
      if (mr->rows[k] && (rc = add_row(c, mr->rows[k])))
        return rc;
  }
  if (r->dpo) {
    const Palign__DpoResult *d = r->dpo;
    pa_query_summary *sm = c->s;
    sm->dpo_trained++;
    if (d->reference_cost)
      sm->dpo_ref_seconds += d->reference_cost->seconds, sm->dpo_ref_tokens += (double)d->reference_cost->tokens;
    if (d->train_cost)
      sm->dpo_train_seconds += d->train_cost->seconds, sm->dpo_train_tokens += (double)d->train_cost->tokens;
    sm->dpo_ref_flops += d->reference_flops, sm->dpo_train_flops += d->train_flops;
    sm->dpo_steps += d->n_steps, sm->dpo_pairs += d->n_pairs;
    sm->dpo_first_loss += d->n_loss ? d->loss[0] : NAN;
    sm->dpo_last_epoch_loss += d->n_epoch_loss ? d->epoch_loss[d->n_epoch_loss - 1] : NAN;
    if (d->trainer_bytes > sm->dpo_max_trainer_bytes)
      sm->dpo_max_trainer_bytes = d->trainer_bytes;
  }
  if (r->pas)
    return add_pas(c, r->pas);
  return 0;
}

int pa_query_summarise(const char *store, pa_query_problem_fn problem, void *ctx, pa_query_summary *out) {
  memset(out, 0, sizeof *out);
  palign__cost__init(&out->pas_grid);
  out->store = store;
  int rc = pa_query_check_store(store);
  if (rc)
    return rc;
  if (pa_manifest_read(store, &out->manifest) != PA_OK) {
    out->manifest = NULL;
    copy_str(out->manifest_error, sizeof out->manifest_error, pa_errmsg());
  }
  summary_ctx c = {.s = out, .problem = problem, .pctx = ctx};
  rc = pa_store_read(store, summary_visit, &c, out->counts);
  if (rc)
    return rc;
  for (int k = PA_RECORD_TORN; k <= PA_RECORD_DUPLICATE; k++)
    out->skipped += out->counts[k];
  for (int i = 0; i < out->n_rows; i++)
    pa_metrics_summarise(out->rows[i].metrics, out->rows[i].n, &out->rows[i].summary);
  return PA_OK;
}

void pa_query_summary_free(pa_query_summary *s) {
  if (!s)
    return;
  if (s->manifest)
    palign__manifest__free_unpacked(s->manifest, NULL);
  for (int i = 0; i < s->n_rows; i++)
    free(s->rows[i].metrics);
  for (int i = 0; i < s->n_chosen; i++)
    free(s->chosen[i].alphas);
  free(s->rows), free(s->methods), free(s->chosen), free(s->pas_other);
  memset(s, 0, sizeof *s);
}

/* ---- JSON ------------------------------------------------------------------- */

static const char *fmt_num(double x, char buf[40]);

/* A number that reads back as the same double (cJSON prints 15 digits when
 * they come within DBL_EPSILON, which can be an ulp off), or null for NaN
 * and infinities. */
static cJSON *num_or_null(double x) {
  if (isnan(x) || isinf(x))
    return cJSON_CreateNull();
  char buf[40];
  return cJSON_CreateRaw(fmt_num(x, buf));
}

static void add_num(cJSON *o, const char *key, double x) { cJSON_AddItemToObject(o, key, num_or_null(x)); }

/* 64-bit integers as numbers while a double holds them exactly. */
static cJSON *int64_json(int64_t v) {
  if (v <= (INT64_C(1) << 53) && v >= -(INT64_C(1) << 53))
    return cJSON_CreateNumber((double)v);
  char buf[32];
  snprintf(buf, sizeof buf, "%lld", (long long)v);
  return cJSON_CreateString(buf);
}

static cJSON *uint64_json(uint64_t v) {
  if (v <= (UINT64_C(1) << 53))
    return cJSON_CreateNumber((double)v);
  char buf[32];
  snprintf(buf, sizeof buf, "%llu", (unsigned long long)v);
  return cJSON_CreateString(buf);
}

/* A float as the double of the shortest decimal that reads back as it (0.1f
 * as 0.1, not 0.100000001490116); %g drops trailing zeros, so 6 digits is
 * the place to start. */
static cJSON *float_json(float f) {
  if (isnan(f) || isinf(f))
    return cJSON_CreateNull();
  char buf[32];
  for (int prec = 6; prec <= 9; prec++) {
    snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
    if ((float)strtod(buf, NULL) == f)
      break;
  }
  return cJSON_CreateNumber(strtod(buf, NULL));
}

static cJSON *field_value_json(const ProtobufCFieldDescriptor *fd, const void *p) {
  switch (fd->type) {
  case PROTOBUF_C_TYPE_INT32:
  case PROTOBUF_C_TYPE_SINT32:
  case PROTOBUF_C_TYPE_SFIXED32:
  case PROTOBUF_C_TYPE_ENUM: return cJSON_CreateNumber(*(const int32_t *)p);
  case PROTOBUF_C_TYPE_UINT32:
  case PROTOBUF_C_TYPE_FIXED32: return cJSON_CreateNumber(*(const uint32_t *)p);
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64: return int64_json(*(const int64_t *)p);
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64: return uint64_json(*(const uint64_t *)p);
  case PROTOBUF_C_TYPE_FLOAT: return float_json(*(const float *)p);
  case PROTOBUF_C_TYPE_DOUBLE: return num_or_null(*(const double *)p);
  case PROTOBUF_C_TYPE_BOOL: return cJSON_CreateBool(*(const protobuf_c_boolean *)p);
  case PROTOBUF_C_TYPE_STRING: {
    const char *str = *(const char *const *)p;
    return cJSON_CreateString(str ? str : "");
  }
  case PROTOBUF_C_TYPE_BYTES: {
    const ProtobufCBinaryData *b = p;
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < b->len; i++)
      cJSON_AddItemToArray(a, cJSON_CreateNumber(b->data[i]));
    return a;
  }
  case PROTOBUF_C_TYPE_MESSAGE: {
    const ProtobufCMessage *m = *(const ProtobufCMessage *const *)p;
    return m ? pa_query_message_json(m) : cJSON_CreateNull();
  }
  }
  return cJSON_CreateNull();
}

static size_t field_size(const ProtobufCFieldDescriptor *fd) {
  switch (fd->type) {
  case PROTOBUF_C_TYPE_INT64:
  case PROTOBUF_C_TYPE_SINT64:
  case PROTOBUF_C_TYPE_SFIXED64:
  case PROTOBUF_C_TYPE_UINT64:
  case PROTOBUF_C_TYPE_FIXED64: return 8;
  case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
  case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
  case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
  case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
  case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
  case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
  default: return 4;
  }
}

cJSON *pa_query_message_json(const ProtobufCMessage *m) {
  const ProtobufCMessageDescriptor *d = m->descriptor;
  const uint8_t *base = (const uint8_t *)m;
  cJSON *o = cJSON_CreateObject();
  for (unsigned i = 0; o && i < d->n_fields; i++) {
    const ProtobufCFieldDescriptor *fd = &d->fields[i];
    if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
      size_t n = *(const size_t *)(base + fd->quantifier_offset);
      const uint8_t *arr = *(const uint8_t *const *)(base + fd->offset);
      const size_t es = field_size(fd);
      cJSON *a = cJSON_AddArrayToObject(o, fd->name);
      for (size_t k = 0; a && k < n; k++)
        cJSON_AddItemToArray(a, field_value_json(fd, arr + k * es));
    } else {
      cJSON_AddItemToObject(o, fd->name, field_value_json(fd, base + fd->offset));
    }
  }
  return o;
}

static cJSON *summary_row_json(const pa_query_row *row) {
  const pa_method_summary *s = &row->summary;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "name", row->name);
  cJSON_AddNumberToObject(o, "subjects", s->n_subjects);
  cJSON *mae = cJSON_AddObjectToObject(o, "mae"), *ci = cJSON_AddObjectToObject(o, "mae_ci95");
  cJSON *kmae = cJSON_AddObjectToObject(o, "keyed_mae"), *kr = cJSON_AddObjectToObject(o, "keyed_r");
  for (int t = 0; t < PA_N_TRAITS; t++) {
    char k[2] = {pa_trait_letter((pa_trait)t), 0};
    add_num(mae, k, s->mae[t]);
    add_num(ci, k, s->mae_ci[t]);
    add_num(kmae, k, s->keyed_mae[t]);
    add_num(kr, k, s->keyed_r[t]);
  }
  add_num(o, "mae_sum", s->sum);
  add_num(o, "mae_sum_ci95", s->sum_ci);
  cJSON_AddNumberToObject(o, "scored", (double)s->n_scored);
  cJSON_AddNumberToObject(o, "unknown", (double)s->n_unknown);
  return o;
}

static cJSON *failures_json(const pa_query_failure *list, size_t n) {
  cJSON *a = cJSON_CreateArray();
  for (size_t i = 0; i < n && i < PA_QUERY_MAX_LISTED; i++) {
    cJSON *f = cJSON_CreateObject();
    cJSON_AddStringToObject(f, "subject_id", list[i].subject);
    if (list[i].method[0])
      cJSON_AddStringToObject(f, "method", list[i].method);
    cJSON_AddStringToObject(f, "error", list[i].error);
    cJSON_AddItemToArray(a, f);
  }
  return a;
}

/* sum / n, NaN when n is 0. */
static double per(double sum, double n) { return n > 0 ? sum / n : NAN; }

cJSON *pa_query_summary_json(const pa_query_summary *s) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "store", s->store ? s->store : "");
  if (s->manifest) {
    cJSON *m = pa_query_message_json(&s->manifest->base);
    cJSON_AddItemToObject(o, "manifest", m);
  } else {
    cJSON_AddNullToObject(o, "manifest");
    cJSON_AddStringToObject(o, "manifest_error", s->manifest_error);
  }
  cJSON *rec = cJSON_AddObjectToObject(o, "records");
  for (int k = PA_RECORD_OK; k <= PA_RECORD_DUPLICATE; k++)
    cJSON_AddNumberToObject(rec, pa_record_status_str((pa_record_status)k), (double)s->counts[k]);
  cJSON_AddNumberToObject(rec, "skipped", (double)s->skipped);
  cJSON *subj = cJSON_AddObjectToObject(o, "subjects");
  cJSON_AddNumberToObject(subj, "stored", (double)s->subjects);
  cJSON_AddNumberToObject(subj, "failed", (double)s->subjects_failed);
  if (s->manifest)
    cJSON_AddItemToObject(subj, "total", int64_json(s->manifest->subjects_total));
  else
    cJSON_AddNullToObject(subj, "total");
  add_num(subj, "seconds_per_subject", per(s->subject_seconds, (double)s->subjects));
  cJSON *rows = cJSON_AddArrayToObject(o, "rows");
  for (int i = 0; i < s->n_rows; i++)
    cJSON_AddItemToArray(rows, summary_row_json(&s->rows[i]));
  cJSON *methods = cJSON_AddArrayToObject(o, "methods");
  for (int i = 0; i < s->n_methods; i++) {
    const pa_query_method *m = &s->methods[i];
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "method", m->name);
    cJSON_AddNumberToObject(j, "runs", m->runs);
    cJSON_AddNumberToObject(j, "failed", m->failed);
    add_num(j, "seconds_per_subject", per(m->seconds, m->runs));
    add_num(j, "tokens_per_subject", per((double)m->tokens, m->runs));
    add_num(j, "full_prompt_tokens_per_subject", per((double)m->full_prompt_tokens, m->runs));
    add_num(j, "reference_way_tokens_per_subject", per((double)m->reference_way_tokens, m->runs));
    add_num(j, "prompts_per_subject", per((double)m->prompts, m->runs));
    cJSON_AddItemToArray(methods, j);
  }
  cJSON *pas = cJSON_AddObjectToObject(o, "pas");
  cJSON_AddNumberToObject(pas, "fitted", s->pas_fitted);
  cJSON *other = cJSON_AddObjectToObject(pas, "not_fitted");
  for (int i = 0; i < s->n_pas_other; i++)
    cJSON_AddNumberToObject(other, s->pas_other[i].status, s->pas_other[i].count);
  add_num(pas, "fit_seconds_per_subject", per(s->pas_fit_seconds, s->pas_fitted));
  add_num(pas, "grid_seconds_per_subject", per(s->pas_grid.seconds, s->pas_fitted));
  add_num(pas, "grid_tokens_per_subject", per((double)s->pas_grid.tokens, s->pas_fitted));
  add_num(pas, "grid_full_prompt_tokens_per_subject", per((double)s->pas_grid.full_prompt_tokens, s->pas_fitted));
  add_num(pas, "grid_reference_way_tokens_per_subject", per((double)s->pas_grid.reference_way_tokens, s->pas_fitted));
  cJSON *chosen = cJSON_AddArrayToObject(pas, "chosen");
  for (int i = 0; i < s->n_chosen; i++) {
    const pa_query_choice *ch = &s->chosen[i];
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "variant", ch->variant);
    cJSON_AddStringToObject(j, "protocol", ch->protocol);
    cJSON *a = cJSON_AddArrayToObject(j, "alphas");
    for (int k = 0; k < ch->n_alphas; k++) {
      cJSON *e = cJSON_CreateObject();
      cJSON_AddNumberToObject(e, "alpha", ch->alphas[k].alpha);
      cJSON_AddNumberToObject(e, "count", ch->alphas[k].count);
      cJSON_AddItemToArray(a, e);
    }
    cJSON_AddNumberToObject(j, "none", ch->none);
    cJSON_AddItemToArray(chosen, j);
  }
  cJSON *dpo = cJSON_AddObjectToObject(o, "dpo");
  cJSON_AddNumberToObject(dpo, "trained", s->dpo_trained);
  add_num(dpo, "reference_seconds_per_subject", per(s->dpo_ref_seconds, s->dpo_trained));
  add_num(dpo, "train_seconds_per_subject", per(s->dpo_train_seconds, s->dpo_trained));
  add_num(dpo, "reference_tokens_per_subject", per(s->dpo_ref_tokens, s->dpo_trained));
  add_num(dpo, "train_tokens_per_subject", per(s->dpo_train_tokens, s->dpo_trained));
  add_num(dpo, "reference_flops_per_subject", per(s->dpo_ref_flops, s->dpo_trained));
  add_num(dpo, "train_flops_per_subject", per(s->dpo_train_flops, s->dpo_trained));
  add_num(dpo, "steps_per_subject", per(s->dpo_steps, s->dpo_trained));
  add_num(dpo, "pairs_per_subject", per(s->dpo_pairs, s->dpo_trained));
  add_num(dpo, "mean_first_loss", per(s->dpo_first_loss, s->dpo_trained));
  add_num(dpo, "mean_last_epoch_loss", per(s->dpo_last_epoch_loss, s->dpo_trained));
  cJSON_AddNumberToObject(dpo, "max_trainer_bytes", (double)s->dpo_max_trainer_bytes);
  cJSON *fail = cJSON_AddObjectToObject(o, "failures");
  cJSON_AddNumberToObject(fail, "subjects", (double)s->subjects_failed);
  cJSON_AddNumberToObject(fail, "methods", (double)s->methods_failed);
  cJSON_AddItemToObject(fail, "first_subjects", failures_json(s->failed_subjects, s->subjects_failed));
  cJSON_AddItemToObject(fail, "first_methods", failures_json(s->failed_methods, s->methods_failed));
  return o;
}

/* ---- one subject --------------------------------------------------------------- */

typedef struct {
  const char *id;
  Palign__SubjectResult *found;
  int damaged;            /* damaged records that named the subject */
  char first_damage[512]; /* the first of them */
  int rc;
} subject_ctx;

/* A deep copy of a message that is freed after the visit returns. */
static int copy_record(const Palign__SubjectResult *r, Palign__SubjectResult **out) {
  size_t n = palign__subject_result__get_packed_size(r);
  uint8_t *buf = malloc(n ? n : 1);
  if (!buf)
    return pa_error(PA_ENOMEM, "out of memory copying the record of subject %s", r->subject_id);
  palign__subject_result__pack(r, buf);
  *out = palign__subject_result__unpack(NULL, n, buf);
  free(buf);
  return *out ? PA_OK : pa_error(PA_ENOMEM, "out of memory copying the record of subject %s", r->subject_id);
}

static int subject_visit(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  subject_ctx *c = ctx;
  if (info->status != PA_RECORD_OK || !r) {
    /* a damaged record cannot say whose it is; a duplicate is of a subject
     * already read, which, were it this one, would have ended the search */
    if (info->status != PA_RECORD_DUPLICATE && c->damaged++ == 0)
      pa_query_record_problem(info, c->first_damage, sizeof c->first_damage);
    return 0;
  }
  if (!r->subject_id || strcmp(r->subject_id, c->id) != 0)
    return 0;
  c->rc = copy_record(r, &c->found);
  return 1; /* found (or out of memory): stop reading */
}

int pa_query_subject(const char *store, const char *id, Palign__SubjectResult **out) {
  *out = NULL;
  int rc = pa_query_check_store(store);
  if (rc)
    return rc;
  bool used = false; /* a current index finds the record without reading every shard */
  if ((rc = pa_index_lookup(store, id, out, &used)) || used)
    return rc;
  subject_ctx c = {.id = id};
  rc = pa_store_read(store, subject_visit, &c, NULL);
  if (rc < 0)
    return rc;
  if (c.rc)
    return c.rc;
  if (!c.found) {
    if (c.damaged)
      return pa_error(PA_ENOTFOUND,
                      "subject %s is not in store %s, or its record is damaged: %d damaged record%s skipped, which "
                      "cannot say whose %s (the first: %s; `palign query %s verify` lists them)",
                      id, store, c.damaged, c.damaged == 1 ? "" : "s", c.damaged == 1 ? "it is" : "they are",
                      c.first_damage, store);
    return pa_error(PA_ENOTFOUND, "subject %s is not in store %s", id, store);
  }
  *out = c.found;
  return PA_OK;
}

double pa_query_row_alpha(const Palign__SubjectResult *r, const char *row) {
  if (!r->pas || !row)
    return NAN;
  const char *open = strstr(row, " ("), *end = row + strlen(row);
  if (!open || end - open < 4 || end[-1] != ')')
    return NAN;
  char variant[64], protocol[64];
  snprintf(variant, sizeof variant, "%.*s", (int)(open - row), row);
  snprintf(protocol, sizeof protocol, "%.*s", (int)(end - 1 - (open + 2)), open + 2);
  double alpha;
  return pa_pas_chosen_alpha(r->pas, variant, protocol, &alpha) == PA_OK ? alpha : NAN;
}

/* ---- export ------------------------------------------------------------------- */

typedef struct {
  pa_query_format fmt;
  FILE *f;
  pa_query_problem_fn problem;
  void *pctx;
  size_t rows;
  int rc;
} export_ctx;

/* x in the fewest digits that read back as x; "" for NaN. */
static const char *fmt_num(double x, char buf[40]) {
  if (isnan(x) || isinf(x)) {
    buf[0] = '\0';
    return buf;
  }
  snprintf(buf, 40, "%.15g", x);
  if (strtod(buf, NULL) != x)
    snprintf(buf, 40, "%.17g", x);
  return buf;
}

/* A CSV field, quoted where it must be (RFC 4180). */
static void csv_str(FILE *f, const char *s) {
  if (!s)
    s = "";
  if (!strpbrk(s, ",\"\r\n")) {
    fputs(s, f);
    return;
  }
  fputc('"', f);
  for (; *s; s++) {
    if (*s == '"')
      fputc('"', f);
    fputc(*s, f);
  }
  fputc('"', f);
}

static void export_row(export_ctx *c, const Palign__SubjectResult *r, const Palign__MethodResult *mr,
                       const Palign__MethodRow *row) {
  pa_subject_metrics m;
  row_metrics(row, &m);
  long scored = 0, unknown = 0;
  for (int t = 0; t < PA_N_TRAITS; t++)
    scored += m.n_scored[t], unknown += m.n_unknown[t];
  const double alpha = pa_query_row_alpha(r, row->name);
  const double seconds = mr->cost ? mr->cost->seconds : NAN;
  if (c->fmt == PA_QUERY_CSV) {
    char b[40];
    csv_str(c->f, r->subject_id);
    fputc(',', c->f);
    csv_str(c->f, mr->method);
    fputc(',', c->f);
    csv_str(c->f, row->name);
    for (int t = 0; t < PA_N_TRAITS; t++)
      fprintf(c->f, ",%s", fmt_num(m.mae[t], b));
    fprintf(c->f, ",%s,%ld,%ld", fmt_num(m.mae_sum, b), scored, unknown);
    fprintf(c->f, ",%s", fmt_num(alpha, b));
    fprintf(c->f, ",%s\n", fmt_num(seconds, b));
  } else {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "subject_id", r->subject_id ? r->subject_id : "");
    cJSON_AddStringToObject(o, "method", mr->method ? mr->method : "");
    cJSON_AddStringToObject(o, "row", row->name ? row->name : "");
    for (int t = 0; t < PA_N_TRAITS; t++) {
      char k[8] = "mae_";
      k[4] = pa_trait_letter((pa_trait)t);
      add_num(o, k, m.mae[t]);
    }
    add_num(o, "mae_sum", m.mae_sum);
    cJSON_AddNumberToObject(o, "n_scored", (double)scored);
    cJSON_AddNumberToObject(o, "n_unknown", (double)unknown);
    add_num(o, "alpha", alpha);
    add_num(o, "seconds", seconds);
    char *text = pa_json_print(o, false);
    if (text)
      fprintf(c->f, "%s\n  %s", c->rows ? "," : "", text);
    else
      c->rc = pa_error(PA_ENOMEM, "out of memory exporting subject %s", r->subject_id);
    free(text);
    cJSON_Delete(o);
  }
  c->rows++;
}

static int export_visit(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  export_ctx *c = ctx;
  if (info->status != PA_RECORD_OK || !r) {
    if (c->problem) {
      char line[512];
      c->problem(c->pctx, pa_query_record_problem(info, line, sizeof line));
    }
    return 0;
  }
  if (c->fmt == PA_QUERY_RECORDS) {
    cJSON *o = pa_query_message_json(&r->base);
    char *text = o ? pa_json_print(o, false) : NULL;
    if (text)
      fprintf(c->f, "%s\n", text), c->rows++;
    else
      c->rc = pa_error(PA_ENOMEM, "out of memory exporting subject %s", r->subject_id);
    free(text);
    cJSON_Delete(o);
  } else if (r->failed) {
    return 0;
  }
  for (size_t j = 0; j < r->n_methods && c->fmt != PA_QUERY_RECORDS; j++) {
    const Palign__MethodResult *mr = r->methods[j];
    if (!mr || mr->failed)
      continue;
    for (size_t k = 0; k < mr->n_rows; k++)
      if (mr->rows[k])
        export_row(c, r, mr, mr->rows[k]);
  }
  if (c->rc)
    return c->rc;
  return ferror(c->f) ? pa_error(PA_EIO, "writing the export failed: %s", strerror(errno)) : 0;
}

int pa_query_export(const char *store, pa_query_format fmt, FILE *f, pa_query_problem_fn problem, void *ctx,
                    size_t *rows) {
  if (rows)
    *rows = 0;
  int rc = pa_query_check_store(store);
  if (rc)
    return rc;
  export_ctx c = {.fmt = fmt, .f = f, .problem = problem, .pctx = ctx};
  if (fmt == PA_QUERY_CSV)
    fputs("subject_id,method,row,mae_A,mae_C,mae_E,mae_N,mae_O,mae_sum,n_scored,n_unknown,alpha,seconds\n", f);
  else if (fmt == PA_QUERY_JSON)
    fputs("[", f);
  rc = pa_store_read(store, export_visit, &c, NULL);
  if (rc)
    return rc;
  if (fmt == PA_QUERY_JSON)
    fputs(c.rows ? "\n]\n" : "]\n", f);
  if (fflush(f) != 0 || ferror(f))
    return pa_error(PA_EIO, "writing the export failed: %s", strerror(errno));
  if (rows)
    *rows = c.rows;
  return PA_OK;
}

/* ---- verify ------------------------------------------------------------------- */

typedef struct {
  pa_query_verify_result *v;
  const Palign__Settings *settings; /* NULL without a manifest */
  pa_query_problem_fn problem;
  void *pctx;
} verify_ctx;

static void report(verify_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void report(verify_ctx *c, const char *fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  c->v->problems++;
  if (c->problem)
    c->problem(c->pctx, line);
}

static int verify_visit(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  verify_ctx *c = ctx;
  char line[512];
  if (info->status != PA_RECORD_OK || !r) {
    report(c, "%s", pa_query_record_problem(info, line, sizeof line));
    return 0;
  }
  c->v->subjects_failed += r->failed ? 1 : 0;
  if (!c->settings)
    return 0;
  const char *have = r->model_fingerprint ? r->model_fingerprint : "";
  const char *want = c->settings->model_fingerprint ? c->settings->model_fingerprint : "";
  bool bad = false;
  if (strcmp(have, want) != 0) {
    report(c, "%s offset %llu: subject %s has model fingerprint '%.16s', the manifest's settings '%.16s'", info->shard,
           (unsigned long long)info->offset, r->subject_id, have, want);
    bad = true;
  }
  if (r->run_seed != c->settings->run_seed) {
    report(c, "%s offset %llu: subject %s has run seed %llu, the manifest's settings %llu", info->shard,
           (unsigned long long)info->offset, r->subject_id, (unsigned long long)r->run_seed,
           (unsigned long long)c->settings->run_seed);
    bad = true;
  }
  c->v->mismatched += bad;
  return 0;
}

/* A manifest shard name as a file name under STORE/shards ("shards/x.pal"
 * and "x.pal" both name x.pal). */
static const char *shard_base(const char *name) {
  if (!name)
    return "";
  return strncmp(name, "shards/", 7) == 0 ? name + 7 : name;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The STORE/shards/ *.pal names, sorted; *n 0 and *out NULL when there are none. */
static int list_shards(const char *store, char ***out, size_t *n) {
  *out = NULL, *n = 0;
  char path[4096];
  snprintf(path, sizeof path, "%s/shards", store);
  DIR *d = opendir(path);
  if (!d)
    return errno == ENOENT ? PA_OK : pa_error(PA_EIO, "%s: cannot list: %s", path, strerror(errno));
  int rc = PA_OK, cap = 0, k = 0;
  char **names = NULL;
  for (struct dirent *e; !rc && (e = readdir(d));) {
    size_t len = strlen(e->d_name);
    if (len < 5 || strcmp(e->d_name + len - 4, ".pal") != 0)
      continue;
    rc = grow((void **)&names, k, &cap, sizeof *names);
    if (!rc && !(names[k++] = strdup(e->d_name)))
      rc = pa_error(PA_ENOMEM, "out of memory listing %s", path);
  }
  closedir(d);
  if (rc) {
    for (int i = 0; i < k; i++)
      free(names[i]);
    free(names);
    return rc;
  }
  if (k)
    qsort(names, (size_t)k, sizeof *names, cmp_str);
  *out = names, *n = (size_t)k;
  return PA_OK;
}

int pa_query_verify(const char *store, pa_query_problem_fn problem, void *ctx, pa_query_verify_result *out) {
  memset(out, 0, sizeof *out);
  out->subjects_total = -1;
  int rc = pa_query_check_store(store);
  if (rc)
    return rc;
  verify_ctx c = {.v = out, .problem = problem, .pctx = ctx};
  Palign__Manifest *m = NULL;
  if (pa_manifest_read(store, &m) != PA_OK) {
    m = NULL;
    report(&c, "%s", pa_errmsg());
  } else {
    out->subjects_total = m->subjects_total;
    c.settings = m->settings;
    if (!m->settings)
      report(&c, "%s/manifest.pb: no settings", store);
  }
  char **names = NULL;
  size_t n_names = 0;
  rc = list_shards(store, &names, &n_names);
  out->shards = n_names;
  if (!rc && m) {
    for (size_t i = 0; i < n_names; i++) {
      bool listed = false;
      char base[64]; /* a later part of a shard is listed by its first */
      pa_shard_part_base(names[i], base);
      for (size_t j = 0; j < m->n_shards && !listed; j++)
        listed = !strcmp(shard_base(m->shards[j]), base);
      if (!listed) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/shards/%s", store, names[i]);
        const bool empty = stat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == 0;
        report(&c, "%s: a shard file the manifest does not list%s", names[i],
               empty ? " (empty: left by a run stopped before it started, or a run's that is starting now; "
                       "safe to delete while no run holds the store)"
                     : "");
      }
    }
    for (size_t j = 0; j < m->n_shards; j++) {
      bool present = false;
      for (size_t i = 0; i < n_names && !present; i++)
        present = !strcmp(shard_base(m->shards[j]), names[i]);
      if (!present)
        report(&c, "%s: listed in the manifest but missing", shard_base(m->shards[j]));
    }
  }
  if (!rc)
    rc = pa_store_read(store, verify_visit, &c, out->counts);
  out->records_ok = out->counts[PA_RECORD_OK];
  for (size_t i = 0; i < n_names; i++)
    free(names[i]);
  free(names);
  if (m)
    palign__manifest__free_unpacked(m, NULL);
  return rc;
}
