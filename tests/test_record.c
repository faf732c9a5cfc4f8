/* test_record.c: a subject's results as the stored message and back
 * (worker/record.h): what is packed is what palign computed, and a stored
 * PAS intervention steers exactly as the fit it came from. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "testutil.h"

#include "inventory.h"
#include "methods.h"
#include "metrics.h"
#include "pas.h"
#include "lora.h"
#include "record.h"
#include "status.h"

#include <math.h>

enum { L = 3, H = 4, HD = 5 };

static pa_inventory *inv;
static pa_subjects *subjects;

static int setup(void **state) {
  (void)state;
  char path[4096 + 32];
  if (pa_inventory_load(test_papi_dir(), &inv))
    return -1;
  snprintf(path, sizeof path, "%s/Test-set.json", test_papi_dir());
  return pa_subjects_load(path, inv, &subjects) ? -1 : 0;
}

static int teardown(void **state) {
  (void)state;
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return 0;
}

/* Packs and unpacks the record's message: what a reader of the store sees. */
static Palign__SubjectResult *round_trip(pa_record *r) {
  Palign__SubjectResult *m = pa_record_message(r);
  size_t n = palign__subject_result__get_packed_size(m);
  uint8_t *buf = malloc(n + 1);
  assert_non_null(buf);
  palign__subject_result__pack(m, buf);
  Palign__SubjectResult *u = palign__subject_result__unpack(NULL, n, buf);
  free(buf);
  assert_non_null(u);
  return u;
}

/* A fit with three heads and made-up directions (no model needed). */
static float dirs[3][HD];
static pa_pas_head heads[3];
static pa_pas_result fake_pas(void) {
  const int where[3][2] = {{2, 1}, {0, 3}, {2, 0}};
  for (int h = 0; h < 3; h++) {
    for (int d = 0; d < HD; d++)
      dirs[h][d] = (float)sin(1.0 + h * 7 + d);
    heads[h] = (pa_pas_head){.layer = where[h][0],
                             .head = where[h][1],
                             .score = 0.9 - 0.1 * h,
                             .val_acc = 0.8,
                             .sigma = 0.5 + h,
                             .direction = dirs[h]};
  }
  pa_pas_result r = {.status = PA_PAS_FITTED, .run_seed = 7};
  snprintf(r.subject_id, sizeof r.subject_id, "x");
  r.fit = (pa_pas_fit){
      .status = PA_PAS_FITTED, .n_layers = L, .n_heads = H, .head_dim = HD, .n_selected = 3, .heads = heads};
  for (int v = 0; v < PA_PAS_N_VARIANTS; v++)
    for (int p = 0; p < PA_PAS_N_PROTOCOLS; p++)
      r.chosen[v][p] = (pa_pas_choice){.index = v == PA_PAS_VAR_ONLY ? -1 : 0, .alpha = p ? 4 : 2};
  return r;
}

static void test_steering_round_trip(void **state) {
  (void)state;
  pa_pas_result pas = fake_pas();
  pa_record *r = NULL;
  assert_int_equal(pa_record_create(pa_subjects_at(subjects, 0), 0, 7, "fp", &r), PA_OK);
  assert_int_equal(pa_record_set_pas(r, &pas), PA_OK);
  Palign__SubjectResult *u = round_trip(r);
  assert_non_null(u->pas);
  assert_string_equal(u->pas->status, "fitted");
  assert_int_equal(u->pas->n_heads, 3);
  /* the variant that was not asked for has no choice stored */
  assert_int_equal(u->pas->n_chosen, 2);
  double a = 0;
  assert_int_equal(pa_pas_chosen_alpha(u->pas, "pas", "holdout", &a), PA_OK);
  assert_true(a == 4);
  assert_int_equal(pa_pas_chosen_alpha(u->pas, "pas_only", "holdout", &a), PA_ENOTFOUND);

  float want[L * H * HD], got[L * H * HD];
  for (int k = 0; k < 3; k++) {
    const double alpha = k == 0 ? 0 : k == 1 ? 2.5 : -6;
    assert_int_equal(pa_pas_steering(&pas.fit, alpha, L, H, HD, want), PA_OK);
    assert_int_equal(pa_pas_steering_from_proto(u->pas, "x", alpha, L, H, HD, got), PA_OK);
    assert_memory_equal(want, got, sizeof want); /* bit for bit */
  }
  /* another model's shape, a malformed head, an unfitted result: refused */
  assert_int_equal(pa_pas_steering_from_proto(u->pas, "x", 1, L, H + 1, HD, got), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "subject x"));
  u->pas->heads[1]->layer = L;
  assert_int_equal(pa_pas_steering_from_proto(u->pas, "x", 1, L, H, HD, got), PA_EINVAL);
  u->pas->heads[1]->layer = 0;
  u->pas->heads[1]->n_direction = HD - 1;
  assert_int_equal(pa_pas_steering_from_proto(u->pas, "x", 1, L, H, HD, got), PA_EINVAL);
  u->pas->heads[1]->n_direction = HD;
  const float was = u->pas->heads[1]->direction[2]; /* a direction value that is not a number */
  u->pas->heads[1]->direction[2] = NAN;
  assert_int_equal(pa_pas_steering_from_proto(u->pas, "x", 1, L, H, HD, got), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "a value that is not a finite number"));
  u->pas->heads[1]->direction[2] = was;
  char *status = u->pas->status, other[] = "one class";
  u->pas->status = other;
  assert_int_equal(pa_pas_steering_from_proto(u->pas, "x", 1, L, H, HD, got), PA_EINVAL);
  u->pas->status = status; /* back: the unpacked message frees its own string */
  palign__subject_result__free_unpacked(u, NULL);
  pa_record_destroy(r);
}

/* Every row a method reports survives the store, with its metrics. */
static void test_method_rows(void **state) {
  (void)state;
  const pa_subject *s = pa_subjects_at(subjects, 3);
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  const pa_method *methods[4];
  int n = pa_methods_parse("const3", methods, 4);
  assert_int_equal(n, 2); /* const3, then trait_mean added */
  pa_method_out mo = {0};
  for (int k = 0; k < PA_METHOD_MAX_ROWS; k++) {
    mo.preds[k] = malloc((size_t)n_test * sizeof *mo.preds[k]);
    mo.probs[k] = malloc((size_t)n_test * 5 * sizeof *mo.probs[k]);
  }
  pa_method_ctx ctx = {.inv = inv};
  pa_record *r = NULL;
  assert_int_equal(pa_record_create(s, 3, 1, "fp", &r), PA_OK);
  assert_int_equal(pa_subject_run(&ctx, methods, n, s, test, n_test, &mo, r, NULL, NULL), 0);
  assert_int_equal(pa_record_add_failure(r, "p2", "no description"), PA_OK);
  Palign__SubjectResult *u = round_trip(r);
  assert_string_equal(u->subject_id, s->id);
  assert_int_equal(u->subject_index, 3);
  assert_int_equal(u->n_methods, 3);
  assert_true(u->methods[2]->failed);
  assert_string_equal(u->methods[2]->error, "no description");
  for (int j = 0; j < 2; j++) {
    const Palign__MethodResult *m = u->methods[j];
    assert_string_equal(m->method, methods[j]->name);
    assert_int_equal(m->n_rows, 1);
    const Palign__Predictions *p = m->rows[0]->predictions;
    assert_int_equal(p->n_items, (size_t)n_test);
    assert_int_equal(p->n_probs, 0); /* model-free rows have none */
    /* the stored answers and truths score to the stored metrics */
    pa_pred *preds = calloc((size_t)n_test, sizeof *preds);
    for (int i = 0; i < n_test; i++) {
      assert_int_equal(p->items[i], test[i]);
      assert_int_equal(p->truth.data[i], s->answers[test[i]]);
      preds[i] = (pa_pred){.item = p->items[i],
                           .truth = p->truth.data[i],
                           .answer = p->answer.data[i],
                           .expected = p->n_expected ? p->expected[i] : NAN};
    }
    pa_subject_metrics want, got;
    pa_metrics_subject(inv, preds, n_test, &want);
    pa_metrics_from_proto(m->rows[0]->metrics, &got);
    for (int t = 0; t < PA_N_TRAITS; t++) {
      assert_true(want.mae[t] == got.mae[t]);
      assert_int_equal(want.n_scored[t], got.n_scored[t]);
    }
    assert_true(want.mae_sum == got.mae_sum);
    free(preds);
  }
  /* a missing metrics message reads as nothing scored, never as zeros */
  pa_subject_metrics none;
  pa_metrics_from_proto(NULL, &none);
  assert_true(isnan(none.mae_sum) && isnan(none.mae[0]) && none.n_scored[0] == 0);
  palign__subject_result__free_unpacked(u, NULL);
  pa_record_destroy(r);
  for (int k = 0; k < PA_METHOD_MAX_ROWS; k++)
    free(mo.preds[k]), free(mo.probs[k]);
}

/* A DPO result stored and read back: the adapter bit for bit, the loss
 * curve and the settings; a record without one, an adapter for another
 * shape and a non-finite value are refused naming the subject. */
static void test_dpo_round_trip(void **state) {
  (void)state;
  const pa_model_config c = {.n_layers = 3, .dim = 16, .n_heads = 4, .n_kv_heads = 2, .head_dim = 4};
  pa_dpo_result d = {.opts = pa_dpo_defaults(), .seed = 99, .n_items = 5, .n_pairs = 6, .n_steps = 4};
  d.opts.epochs = 2;
  snprintf(d.subject_id, sizeof d.subject_id, "%s", pa_subjects_at(subjects, 0)->id);
  assert_int_equal(pa_lora_create(&c, 2, 8.0f, &d.adapter), PA_OK);
  for (size_t i = 0; i < d.adapter->n_floats; i++)
    d.adapter->arena[i] = (float)i / 7.0f - 3.0f;
  double loss[4] = {0.6931471805599453, 0.6, 0.5, 0.45}, epoch[2] = {0.65, 0.47};
  d.loss = loss, d.epoch_loss = epoch;
  pa_record *r;
  assert_int_equal(pa_record_create(pa_subjects_at(subjects, 0), 0, 1, "fp", &r), PA_OK);
  assert_int_equal(pa_record_set_dpo(r, &d), PA_OK);
  const Palign__SubjectResult *m = pa_record_message(r);
  const size_t n = palign__subject_result__get_packed_size(m);
  uint8_t *buf = malloc(n);
  assert_int_equal(palign__subject_result__pack(m, buf), n);
  Palign__SubjectResult *u = palign__subject_result__unpack(NULL, n, buf);
  assert_non_null(u);
  assert_non_null(u->dpo);
  assert_int_equal(u->dpo->n_loss, 4);
  assert_memory_equal(u->dpo->loss, loss, sizeof loss);
  assert_int_equal(u->dpo->settings->epochs, 2);
  assert_true(u->dpo->settings->lr == d.opts.lr && u->dpo->seed == 99);
  pa_lora *back;
  assert_int_equal(pa_dpo_adapter_from_proto(u->dpo, u->subject_id, &c, &back), PA_OK);
  assert_memory_equal(back->arena, d.adapter->arena, back->n_floats * sizeof(float));
  assert_true(back->scale == 8.0f && back->rank == 2);
  pa_lora_destroy(back);
  /* another model's shape */
  pa_model_config other = c;
  other.n_layers = 4;
  back = (pa_lora *)1;
  assert_int_equal(pa_dpo_adapter_from_proto(u->dpo, u->subject_id, &other, &back), PA_EINVAL);
  assert_null(back);
  assert_non_null(strstr(pa_errmsg(), u->subject_id));
  /* a NaN in the stored values */
  u->dpo->adapter[3] = NAN;
  assert_int_equal(pa_dpo_adapter_from_proto(u->dpo, u->subject_id, &c, &back), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "not finite"));
  assert_int_equal(pa_dpo_adapter_from_proto(NULL, u->subject_id, &c, &back), PA_ENOTFOUND);
  palign__subject_result__free_unpacked(u, NULL);
  free(buf);
  pa_record_destroy(r);
  pa_lora_destroy(d.adapter);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_steering_round_trip),
      cmocka_unit_test(test_method_rows),
      cmocka_unit_test(test_dpo_round_trip),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
