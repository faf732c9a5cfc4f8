/* tu_record.h: store records (palign.SubjectResult) built by hand, for the
 * tests of the store and of `palign query`. Include after testutil.h.
 *
 * Every allocation is kept and freed at once by tu_rec_free (call it in the
 * group teardown); a builder fills only what its arguments say, and the
 * test sets any other field on what it returns. */
#ifndef PALIGN_TU_RECORD_H
#define PALIGN_TU_RECORD_H

#include <math.h>

#include "palign.pb-c.h"

static void *tu_rec_kept[8192];
static int tu_rec_n_kept;

static inline void *tu_rec_keep(void *p) {
  assert_non_null(p);
  assert_true(tu_rec_n_kept < (int)(sizeof tu_rec_kept / sizeof tu_rec_kept[0]));
  return tu_rec_kept[tu_rec_n_kept++] = p;
}

static inline void tu_rec_free(void) {
  while (tu_rec_n_kept > 0)
    free(tu_rec_kept[--tu_rec_n_kept]);
}

#define TU_NEW(T)      ((T *)tu_rec_keep(calloc(1, sizeof(T))))
#define TU_ARRAY(T, n) ((T *)tu_rec_keep(calloc((n) ? (size_t)(n) : 1, sizeof(T))))

/* Per-trait MAE (A C E N O) and their sum; a NaN trait has no scored item
 * and its 2 items unknown, any other 2 scored. */
static inline Palign__Metrics *tu_rec_metrics(const double mae[5]) {
  Palign__Metrics *m = TU_NEW(Palign__Metrics);
  palign__metrics__init(m);
  m->n_mae = m->n_n_scored = m->n_n_unknown = 5;
  m->mae = TU_ARRAY(double, 5);
  m->n_scored = TU_ARRAY(int32_t, 5);
  m->n_unknown = TU_ARRAY(int32_t, 5);
  for (int t = 0; t < 5; t++) {
    m->mae[t] = mae[t];
    m->mae_sum += mae[t];
    m->n_scored[t] = isnan(mae[t]) ? 0 : 2;
    m->n_unknown[t] = isnan(mae[t]) ? 2 : 0;
  }
  return m;
}

/* Answers to items[0..n): truth and answer letters (1..5, 0 unknown), the
 * expected scores when expected is not NULL (copied). */
static inline Palign__Predictions *tu_rec_predictions(int n, const int32_t *items, const uint8_t *truth,
                                                      const uint8_t *answer, const float *expected) {
  Palign__Predictions *p = TU_NEW(Palign__Predictions);
  palign__predictions__init(p);
  p->n_items = (size_t)n;
  p->items = memcpy(TU_ARRAY(int32_t, n), items, (size_t)n * sizeof *items);
  p->truth = (ProtobufCBinaryData){(size_t)n, memcpy(TU_ARRAY(uint8_t, n), truth, (size_t)n)};
  p->answer = (ProtobufCBinaryData){(size_t)n, memcpy(TU_ARRAY(uint8_t, n), answer, (size_t)n)};
  if (expected) {
    p->n_expected = (size_t)n;
    p->expected = memcpy(TU_ARRAY(float, n), expected, (size_t)n * sizeof *expected);
  }
  return p;
}

static inline Palign__MethodRow *tu_rec_row(const char *name, const double mae[5]) {
  Palign__MethodRow *r = TU_NEW(Palign__MethodRow);
  palign__method_row__init(r);
  r->name = (char *)name;
  r->metrics = tu_rec_metrics(mae);
  return r;
}

static inline Palign__Cost *tu_rec_cost(double seconds, int64_t tokens, int64_t prompts) {
  Palign__Cost *c = TU_NEW(Palign__Cost);
  palign__cost__init(c);
  c->seconds = seconds, c->tokens = tokens, c->prompts = prompts;
  return c;
}

/* A method with rows[0..n) and cost c (no rows and failed when error is not NULL). */
static inline Palign__MethodResult *tu_rec_method(const char *name, Palign__MethodRow **rows, int n, Palign__Cost *c,
                                                  const char *error) {
  Palign__MethodResult *m = TU_NEW(Palign__MethodResult);
  palign__method_result__init(m);
  m->method = (char *)name;
  m->failed = error != NULL;
  m->error = error ? (char *)error : (char *)"";
  m->n_rows = (size_t)n;
  m->rows = TU_ARRAY(Palign__MethodRow *, n);
  for (int i = 0; i < n; i++)
    m->rows[i] = rows[i];
  m->cost = c;
  return m;
}

/* A subject's record: its id (copied), index, wall seconds, the model's
 * fingerprint (copied) and the run seed; no methods yet. */
static inline Palign__SubjectResult *tu_rec_subject(const char *id, int64_t index, double seconds,
                                                    const char *fingerprint, int64_t run_seed) {
  Palign__SubjectResult *r = TU_NEW(Palign__SubjectResult);
  palign__subject_result__init(r);
  r->subject_id = strcpy(TU_ARRAY(char, strlen(id) + 1), id);
  r->subject_index = index;
  r->seconds = seconds;
  r->model_fingerprint = strcpy(TU_ARRAY(char, strlen(fingerprint) + 1), fingerprint);
  r->run_seed = run_seed;
  return r;
}

static inline void tu_rec_set_methods(Palign__SubjectResult *r, Palign__MethodResult **m, int n) {
  r->n_methods = (size_t)n;
  r->methods = TU_ARRAY(Palign__MethodResult *, n);
  for (int i = 0; i < n; i++)
    r->methods[i] = m[i];
}

/* The record packed (malloc'd, the caller frees); *n its size. */
static inline uint8_t *tu_rec_pack(const Palign__SubjectResult *r, size_t *n) {
  *n = palign__subject_result__get_packed_size(r);
  uint8_t *p = malloc(*n ? *n : 1);
  assert_non_null(p);
  assert_int_equal(palign__subject_result__pack(r, p), *n);
  return p;
}

#endif
