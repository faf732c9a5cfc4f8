/* The DPO baseline (dpo.h) on a tiny random model and the real PAPI data:
 * the pairs, the settings refused, the loss and its gradient, and a whole
 * training run: exactly ln 2 at step 0, falling after, the same bits when
 * repeated and on 1 and 2 threads, and an adapter that changes the answers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "dpo.h"
#include "eval.h"
#include "forward.h"
#include "inventory.h"
#include "jsonfile.h"
#include "lora.h"
#include "mkmodel.h"
#include "model.h"
#include "prompts.h"
#include "status.h"
#include "testutil.h"
#include "tu_fake_device.h"
#include "train.h"

#include <cJSON.h>

static pa_model *model;
static pa_lm *lm;
static pa_evaluator *ev;
static pa_inventory *inv;
static pa_subjects *subjects;

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  char p[300];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.arch = PA_MK_QWEN2, o.n_layers = 2, o.dim = 32, o.n_heads = 4, o.n_kv_heads = 2, o.ffn_dim = 48, o.seed = 5;
  if (pa_papi_load(test_papi_dir(), NULL, &inv, &subjects) ||
      pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "m.gguf")) || pa_model_open(p, &model) ||
      pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 512}, &lm) ||
      pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model), NULL, &ev)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  return 0;
}

static int teardown(void **s) {
  pa_evaluator_destroy(ev);
  pa_lm_destroy(lm);
  pa_model_close(model);
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return tu_teardown(s);
}

static void test_pairs(void **s) {
  (void)s;
  pa_subject subj = *pa_subjects_at(subjects, 0);
  int n_train;
  const int *train = pa_inventory_train(inv, &n_train);
  pa_dpo_pair *pairs = malloc(2 * (size_t)n_train * sizeof *pairs);
  /* answers 5, 4, 3, 2, 1, missing on the first six train items */
  const int v[6] = {5, 4, 3, 2, 1, 0};
  for (int i = 0; i < 6; i++)
    subj.answers[train[i]] = (uint8_t)v[i];
  const int n = pa_dpo_pairs(inv, &subj, pairs);
  /* letters: A = 0 (answer 5) ... E = 4 (answer 1) */
  const pa_dpo_pair want[6] = {{train[0], 0, 4}, {train[1], 1, 3}, {train[2], 2, 0},
                               {train[2], 2, 4}, {train[3], 3, 1}, {train[4], 4, 0}};
  for (int i = 0; i < 6; i++) {
    assert_int_equal(pairs[i].item, want[i].item);
    assert_int_equal(pairs[i].chosen, want[i].chosen);
    assert_int_equal(pairs[i].rejected, want[i].rejected);
  }
  assert_int_not_equal(pairs[6].item, train[5]); /* the missing answer gives none */
  int expect = 0;
  for (int i = 0; i < n_train; i++)
    expect += subj.answers[train[i]] == 3 ? 2 : subj.answers[train[i]] ? 1 : 0;
  assert_int_equal(n, expect);
  free(pairs);
}

static void test_settings_refused(void **s) {
  (void)s;
  assert_int_equal(pa_dpo_validate(&(pa_dpo_opts){0}), PA_EINVAL); /* epochs 0 */
  static const struct {
    int field;
    double value;
    const char *msg;
  } bad[] = {{0, 0, "epochs 0"},
             {1, 0, "batch 0"},
             {2, -1e-3, "learning rate -0.001"},
             {2, 0, "learning rate"},
             {3, 0, "beta 0"},
             {4, 0, "rank 0"},
             {4, 257, "rank 257"},
             {5, 0, "alpha 0"},
             {6, -1, "weight decay"},
             {7, 1, "Adam betas"},
             {9, 0, "Adam epsilon"},
             {2, NAN, "learning rate"},
             {5, 1e-50, "alpha 1e-50 over rank 8"},
             {5, 1e40, "alpha 1e+40 over rank 8"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    pa_dpo_opts o = pa_dpo_defaults();
    assert_int_equal(pa_dpo_validate(&o), PA_OK);
    switch (bad[i].field) {
    case 0: o.epochs = (int)bad[i].value; break;
    case 1: o.batch = (int)bad[i].value; break;
    case 2: o.lr = bad[i].value; break;
    case 3: o.beta = bad[i].value; break;
    case 4: o.rank = (int)bad[i].value; break;
    case 5: o.alpha = bad[i].value; break;
    case 6: o.weight_decay = bad[i].value; break;
    case 7: o.adam_beta1 = bad[i].value; break;
    case 9: o.adam_eps = bad[i].value; break;
    }
    assert_int_equal(pa_dpo_validate(&o), PA_EINVAL);
    if (!strstr(pa_errmsg(), bad[i].msg))
      fail_msg("case %zu: '%s' does not say '%s'", i, pa_errmsg(), bad[i].msg);
    pa_dpo_result r = {0};
    assert_int_equal(pa_dpo_train(ev, inv, pa_subjects_at(subjects, 0), &o, &r), PA_EINVAL);
    assert_null(r.adapter);
  }
}

/* The loss is -log sigmoid(beta m), and its derivative in m what it says. */
static void test_pair_loss(void **s) {
  (void)s;
  const float pol[5] = {0.3f, -1.2f, 2.0f, 0.1f, 0.7f}, ref[5] = {0.1f, 0.4f, -0.5f, 1.0f, 0.0f};
  double dm;
  const double l = pa_dpo_pair_loss(pol, ref, 2, 1, 0.5, &dm);
  const double m = (2.0 - -1.2) - (-0.5 - 0.4);
  assert_float_equal(l, log1p(exp(-0.5 * m)), 1e-6);
  assert_float_equal(dm, -0.5 / (1 + exp(0.5 * m)), 1e-7);
  assert_float_equal(pa_dpo_pair_loss(ref, ref, 0, 4, 0.1, &dm), log(2.0), 1e-15);
  assert_float_equal(dm, -0.05, 1e-15);
  /* far from 0, finite */
  const float big[5] = {1e4f, -1e4f, 0, 0, 0};
  assert_true(isfinite(pa_dpo_pair_loss(big, ref, 0, 1, 1.0, &dm)) && isfinite(dm));
  assert_true(isfinite(pa_dpo_pair_loss(big, ref, 1, 0, 1.0, &dm)) && isfinite(dm));
}

static pa_dpo_opts fast_opts(void) {
  pa_dpo_opts o = pa_dpo_defaults();
  o.epochs = 3, o.batch = 24, o.lr = 5e-3, o.rank = 4, o.beta = 0.5;
  return o;
}

static void test_training(void **s) {
  (void)s;
  const pa_subject *subj = pa_subjects_at(subjects, 1);
  const pa_dpo_opts o = fast_opts();
  pa_dpo_result r = {0}, again = {0};
  if (pa_dpo_train(ev, inv, subj, &o, &r))
    fail_msg("%s", pa_errmsg());
  assert_string_equal(r.subject_id, subj->id);
  assert_true(r.n_pairs >= r.n_items && r.n_items > 100);
  assert_int_equal(r.n_steps, o.epochs * ((r.n_items + o.batch - 1) / o.batch));
  printf("  %d items, %d pairs, %d steps: loss %.6f -> %.6f (epochs", r.n_items, r.n_pairs, r.n_steps, r.loss[0],
         r.loss[r.n_steps - 1]);
  for (int e = 0; e < o.epochs; e++)
    printf(" %.4f", r.epoch_loss[e]);
  printf("); %.3g train FLOPs, %zu KB of activations\n", r.train_flops, r.trainer_bytes >> 10);
  assert_true(fabs(r.loss[0] - log(2.0)) <= 1e-6);  /* the policy starts as the reference */
  assert_true(fabs(r.loss[0] - log(2.0)) <= 1e-12); /* every margin is exactly 0: only the mean rounds */
  for (int e = 1; e < o.epochs; e++)
    assert_true(r.epoch_loss[e] < r.epoch_loss[e - 1]);
  assert_true(r.train_flops > 0 && r.ref_flops > 0 && r.train_tokens > r.ref_tokens);

  /* repeated, and on one thread: the same bits */
  for (int th = 2; th >= 1; th--) {
    pa_backend_set_threads(th);
    if (pa_dpo_train(ev, inv, subj, &o, &again))
      fail_msg("%s", pa_errmsg());
    assert_int_equal(again.n_steps, r.n_steps);
    assert_memory_equal(again.loss, r.loss, (size_t)r.n_steps * sizeof *r.loss);
    assert_memory_equal(again.adapter->arena, r.adapter->arena, r.adapter->n_floats * sizeof(float));
  }
  pa_backend_set_threads(2);

  /* another subject: another adapter (its own seed and pairs) */
  if (pa_dpo_train(ev, inv, pa_subjects_at(subjects, 2), &o, &again))
    fail_msg("%s", pa_errmsg());
  assert_memory_not_equal(again.adapter->arena, r.adapter->arena, r.adapter->n_floats * sizeof(float));

  /* the adapter moves the model's answers toward the subject's on the train items */
  int n_train;
  const int *train = pa_inventory_train(inv, &n_train);
  pa_pred *base = calloc((size_t)n_train, sizeof *base), *tuned = calloc((size_t)n_train, sizeof *tuned);
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, train, n_train, NULL, base, NULL, NULL), PA_OK);
  pa_evaluator_set_lora(ev, r.adapter);
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, train, n_train, NULL, tuned, NULL, NULL), PA_OK);
  pa_evaluator_set_lora(ev, NULL);
  double err_base = 0, err_tuned = 0;
  int n = 0;
  for (int i = 0; i < n_train; i++)
    if (subj->answers[train[i]]) {
      err_base += fabs((double)base[i].expected - subj->answers[train[i]]);
      err_tuned += fabs((double)tuned[i].expected - subj->answers[train[i]]);
      n++;
    }
  printf("  train items' expected-score error: base %.3f, with the adapter %.3f\n", err_base / n, err_tuned / n);
  assert_true(err_tuned < err_base);
  /* and without it the model is plain again */
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, train, n_train, NULL, tuned, NULL, NULL), PA_OK);
  assert_memory_equal(tuned, base, (size_t)n_train * sizeof *base);
  free(base), free(tuned);
  pa_dpo_result_free(&r);
  pa_dpo_result_free(&again);
  pa_dpo_result_free(&again); /* twice is harmless */
}

/* The evaluator's step hook (progress lines): called once per optimiser
 * step, in order, with the step count and each step's loss as recorded. */
typedef struct {
  int calls, bad_order, total;
  double loss[4096];
} step_log;

static void log_step(void *ctx, int done, int total, double loss) {
  step_log *l = ctx;
  if (done != l->calls + 1 || done > (int)(sizeof l->loss / sizeof *l->loss))
    l->bad_order++;
  else
    l->loss[done - 1] = loss;
  l->calls++;
  l->total = total;
}

/* The poll: counts its calls, and asks to stop at call `stop_at` (0: never). */
typedef struct {
  int calls, stop_at;
} poll_log;

static int poll_count(void *ctx) {
  poll_log *p = ctx;
  return ++p->calls == p->stop_at;
}

/* A stop is seen between the layers of a step's passes, not only between
 * steps: on the 2-layer model, a reference pass polls twice (before it, and
 * between its layers) and a training step three times (and between its
 * backward pass's layers). A stop asked at any of them ends the training
 * there, with PA_ECANCELED and nothing kept. */
static void test_poll_inside_passes(void **s) {
  (void)s;
  poll_log log = {0};
  pa_evaluator *polled = NULL;
  if (pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model),
                          &(pa_eval_opts){.poll = poll_count, .poll_ctx = &log}, &polled))
    fail_msg("%s", pa_errmsg());
  pa_dpo_opts o = fast_opts();
  o.epochs = 2;
  pa_dpo_result r = {0};
  if (pa_dpo_train(polled, inv, pa_subjects_at(subjects, 1), &o, &r))
    fail_msg("%s", pa_errmsg());
  const int steps_per_epoch = r.n_steps / o.epochs, all = log.calls;
  assert_int_equal(all, 2 * steps_per_epoch + 3 * r.n_steps);
  pa_dpo_result_free(&r);
  const int stops[] = {2, 2 * steps_per_epoch + 2, all - 1, all};
  for (size_t i = 0; i < sizeof stops / sizeof stops[0]; i++) {
    log = (poll_log){.stop_at = stops[i]};
    assert_int_equal(pa_dpo_train(polled, inv, pa_subjects_at(subjects, 1), &o, &r), PA_ECANCELED);
    assert_int_equal(log.calls, stops[i]);
    assert_null(r.adapter);
  }
  pa_evaluator_destroy(polled);
}

/* A learning rate that makes the adapter overflow: a second step's loss is
 * NaN, and training stops naming it rather than storing the adapter; after
 * one step (no loss has seen the adapter) the adapter's answers are NaN
 * logits, which the evaluator reads as unknown, not as A. */
static void test_divergence(void **s) {
  (void)s;
  pa_dpo_opts o = fast_opts();
  o.lr = 1e30;
  pa_dpo_result r = {0};
  assert_int_equal(pa_dpo_train(ev, inv, pa_subjects_at(subjects, 1), &o, &r), PA_EINVAL);
  tu_expect_in(pa_errmsg(), "DPO diverged: the loss is not a number at step 2 of 15 (learning rate 1e+30, beta 0.5)",
               "the error");
  assert_null(r.adapter);
  assert_null(r.loss);

  o.epochs = 1, o.batch = 4096; /* one step */
  if (pa_dpo_train(ev, inv, pa_subjects_at(subjects, 1), &o, &r))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(r.n_steps, 1);
  pa_dpo_opts past_float = o; /* a step past FLT_MAX: the adapter itself infinite */
  past_float.lr = 1e39;
  pa_dpo_result inf = {0};
  assert_int_equal(pa_dpo_train(ev, inv, pa_subjects_at(subjects, 1), &past_float, &inf), PA_EINVAL);
  tu_expect_in(pa_errmsg(), "DPO diverged: the adapter holds an infinite value after the last step", "the error");
  assert_null(inf.adapter);
  const int items[] = {1, 2, 3};
  pa_pred preds[3];
  pa_evaluator_set_lora(ev, r.adapter);
  const int rc = pa_evaluator_answer(ev, inv, NULL, items, 3, NULL, preds, NULL, NULL);
  pa_evaluator_set_lora(ev, NULL);
  assert_int_equal(rc, PA_OK);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(preds[i].answer, 0);
    assert_true(isnan(preds[i].expected));
  }
  pa_dpo_result_free(&r);
}

static void test_step_hook(void **s) {
  (void)s;
  static step_log seen;
  pa_evaluator *hooked = NULL;
  if (pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model),
                          &(pa_eval_opts){.step = log_step, .poll_ctx = &seen}, &hooked))
    fail_msg("%s", pa_errmsg());
  const pa_dpo_opts o = fast_opts();
  pa_dpo_result r = {0};
  if (pa_dpo_train(hooked, inv, pa_subjects_at(subjects, 1), &o, &r))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(seen.bad_order, 0);
  assert_int_equal(seen.calls, r.n_steps);
  assert_int_equal(seen.total, r.n_steps);
  assert_memory_equal(seen.loss, r.loss, (size_t)r.n_steps * sizeof *r.loss);
  pa_dpo_result_free(&r);
  pa_evaluator_destroy(hooked);
}

/* DPO through the device path (tu_fake_device.h): the same subject, settings
 * and seed as on the CPU; the loss at every step within 1e-6 and the adapter
 * within 1e-4 of its largest value (the trainer's last-row products are fp32
 * there, double on the host: a few ulps a step, carried through the steps). */
static void test_device_path(void **s) {
  (void)s;
  const pa_subject *subj = pa_subjects_at(subjects, 1);
  const pa_dpo_opts o = fast_opts();
  pa_lm *dlm;
  pa_evaluator *dev;
  if (pa_lm_create(
          model, &(pa_lm_opts){.n_threads = 2, .max_seq = 512, .backend = tu_fake_device(), .weights = PA_WEIGHTS_FP32},
          &dlm) ||
      pa_evaluator_create(dlm, pa_model_tokenizer(model), pa_model_chat(model), NULL, &dev))
    fail_msg("%s", pa_errmsg());
  pa_dpo_result r = {0}, d = {0};
  if (pa_dpo_train(ev, inv, subj, &o, &r) || pa_dpo_train(dev, inv, subj, &o, &d))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(d.n_steps, r.n_steps);
  double worst_loss = 0, mx = 0, worst = 0;
  for (int i = 0; i < r.n_steps; i++) {
    worst_loss = fmax(worst_loss, fabs(d.loss[i] - r.loss[i]));
    if (!(fabs(d.loss[i] - r.loss[i]) <= 1e-6))
      fail_msg("step %d: loss %.9f on the device path, %.9f on the CPU", i, d.loss[i], r.loss[i]);
  }
  for (size_t i = 0; i < r.adapter->n_floats; i++)
    mx = fmax(mx, fabs(r.adapter->arena[i]));
  for (size_t i = 0; i < r.adapter->n_floats; i++) {
    const double e = fabs((double)d.adapter->arena[i] - r.adapter->arena[i]);
    if (!(e <= 1e-4 * mx))
      fail_msg("adapter[%zu]: %.9g on the device path, %.9g on the CPU", i, d.adapter->arena[i], r.adapter->arena[i]);
    worst = fmax(worst, e);
  }
  printf("  device path: %d steps, losses within %.3g, the adapter within %.3g of its largest %.3g\n", r.n_steps,
         worst_loss, worst, mx);
  pa_dpo_result_free(&r), pa_dpo_result_free(&d);
  pa_evaluator_destroy(dev);
  pa_lm_destroy(dlm);
  assert_int_equal(tu_fake_live, 0);
}

static void test_no_pairs(void **s) {
  (void)s;
  pa_subject empty = *pa_subjects_at(subjects, 0);
  memset(empty.answers, 0, sizeof empty.answers);
  pa_dpo_result r = {0};
  const pa_dpo_opts o = fast_opts();
  assert_int_equal(pa_dpo_train(ev, inv, &empty, &o, &r), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), empty.id));
  assert_null(r.adapter);
}

/* Loss and LoRA gradients against PyTorch autograd on the same tiny models
 * and adapter (tests/golden/dpo/, make_dpo_golden.py), where each sequence
 * runs whole and its pair is scored by log_softmax over the vocabulary; here
 * the prefix is shared and only the two logits are computed. Tolerances: the
 * loss within 1e-6, every gradient entry within 1e-4 of the largest (both
 * sides are float32 through two layers: the logit margins agree to about
 * 1e-7, the gradients to about 1e-6 of their scale). */
static void check_pytorch_case(const cJSON *root, const cJSON *c) {
  const cJSON *mk = cJSON_GetObjectItem(root, "mkmodel");
  const char *arch = cJSON_GetObjectItem(c, "arch")->valuestring;
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.arch = !strcmp(arch, "qwen2") ? PA_MK_QWEN2 : PA_MK_LLAMA;
  o.n_layers = cJSON_GetObjectItem(mk, "layers")->valueint, o.dim = cJSON_GetObjectItem(mk, "dim")->valueint;
  o.n_heads = cJSON_GetObjectItem(mk, "heads")->valueint, o.n_kv_heads = cJSON_GetObjectItem(mk, "kv_heads")->valueint;
  o.ffn_dim = cJSON_GetObjectItem(mk, "ffn")->valueint, o.seed = (uint64_t)cJSON_GetObjectItem(mk, "seed")->valueint;
  o.force = true;
  char path[300];
  pa_model *m;
  pa_lm *l;
  if (pa_mkmodel_write_gguf(&o, tu_path(path, sizeof path, "golden.gguf")) || pa_model_open(path, &m) ||
      pa_lm_create(m, &(pa_lm_opts){.n_threads = 2, .max_seq = 128}, &l))
    fail_msg("%s", pa_errmsg());
  const int rank = cJSON_GetObjectItem(root, "rank")->valueint;
  const double alpha = cJSON_GetObjectItem(root, "alpha")->valuedouble,
               beta = cJSON_GetObjectItem(root, "beta")->valuedouble;
  pa_lora *lora, *grad;
  assert_int_equal(pa_lora_create(pa_lm_config(l), rank, (float)(alpha / rank), &lora), PA_OK);
  assert_int_equal(pa_lora_create_like(lora, &grad), PA_OK);
  assert_int_equal((size_t)cJSON_GetObjectItem(c, "n_floats")->valueint, lora->n_floats);
  char file[512];
  size_t len;
  snprintf(file, sizeof file, PALIGN_TEST_DATA "/dpo/%s", cJSON_GetObjectItem(c, "adapter_file")->valuestring);
  float *a = (float *)tu_slurp(file, &len);
  assert_int_equal(len, lora->n_floats * sizeof(float));
  memcpy(lora->arena, a, len);
  free(a);
  snprintf(file, sizeof file, PALIGN_TEST_DATA "/dpo/%s", cJSON_GetObjectItem(c, "grad_file")->valuestring);
  float *want = (float *)tu_slurp(file, &len);

  const cJSON *pre = cJSON_GetObjectItem(c, "prefix"), *seqs = cJSON_GetObjectItem(c, "seqs"),
              *pairs = cJSON_GetObjectItem(c, "pairs");
  int32_t prefix[64], tok[3][64], out[3 * 2];
  const int32_t *tokens[3];
  int n_tokens[3];
  const int P = cJSON_GetArraySize(pre), S = cJSON_GetArraySize(seqs);
  for (int i = 0; i < P; i++)
    prefix[i] = cJSON_GetArrayItem(pre, i)->valueint;
  int longest = 0;
  for (int q = 0; q < S; q++) {
    const cJSON *sq = cJSON_GetArrayItem(seqs, q);
    n_tokens[q] = cJSON_GetArraySize(sq);
    for (int j = 0; j < n_tokens[q]; j++)
      tok[q][j] = cJSON_GetArrayItem(sq, j)->valueint;
    tokens[q] = tok[q];
    longest = n_tokens[q] > longest ? n_tokens[q] : longest;
    out[2 * q] = cJSON_GetArrayItem(cJSON_GetArrayItem(pairs, q), 0)->valueint;
    out[2 * q + 1] = cJSON_GetArrayItem(cJSON_GetArrayItem(pairs, q), 1)->valueint;
  }
  pa_trainer *tr;
  assert_int_equal(
      pa_trainer_create(
          l, &(pa_train_plan){.max_prefix = P, .max_seqs = S, .max_seq_len = longest, .max_out = 2, .rank = rank}, &tr),
      PA_OK);
  const pa_train_batch b = {
      .prefix = prefix, .n_prefix = P, .tokens = tokens, .n_tokens = n_tokens, .n_seqs = S, .out = out, .n_out = 2};
  float ref[6], pol[6], dlog[6];
  assert_int_equal(pa_trainer_forward(tr, NULL, &b, ref), PA_OK);
  assert_int_equal(pa_trainer_forward(tr, lora, &b, pol), PA_OK);
  double loss = 0;
  for (int q = 0; q < S; q++) {
    double dm;
    loss += pa_dpo_pair_loss(pol + 2 * q, ref + 2 * q, 0, 1, beta, &dm);
    dlog[2 * q] = (float)(dm / S), dlog[2 * q + 1] = (float)(-dm / S);
    const double margin = ((double)pol[2 * q] - pol[2 * q + 1]) - ((double)ref[2 * q] - ref[2 * q + 1]);
    assert_float_equal(margin, cJSON_GetArrayItem(cJSON_GetObjectItem(c, "margins"), q)->valuedouble, 1e-5);
  }
  loss /= S;
  const double want_loss = cJSON_GetObjectItem(c, "loss")->valuedouble;
  assert_int_equal(pa_trainer_backward(tr, dlog, grad), PA_OK);
  double scale = 0, worst = 0;
  for (size_t i = 0; i < grad->n_floats; i++)
    scale = fmax(scale, fabs(want[i]));
  for (size_t i = 0; i < grad->n_floats; i++)
    worst = fmax(worst, fabs(grad->arena[i] - want[i]));
  printf("  %s: loss %.9f (PyTorch %.9f), gradients within %.2g of PyTorch's (largest %.3g), %zu entries\n", arch, loss,
         want_loss, worst, scale, grad->n_floats);
  assert_true(fabs(loss - want_loss) <= 1e-6);
  assert_true(worst <= 1e-4 * scale);
  free(want);
  pa_trainer_destroy(tr);
  pa_lora_destroy(lora), pa_lora_destroy(grad);
  pa_lm_destroy(l);
  pa_model_close(m);
}

static void test_against_pytorch(void **s) {
  (void)s;
  cJSON *root;
  assert_int_equal(pa_json_load(PALIGN_TEST_DATA "/dpo/cases.json", &root), PA_OK);
  const cJSON *c;
  int n = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
    check_pytorch_case(root, c);
    n++;
  }
  assert_int_equal(n, 2);
  cJSON_Delete(root);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_pairs),           cmocka_unit_test(test_settings_refused),
      cmocka_unit_test(test_pair_loss),       cmocka_unit_test(test_training),
      cmocka_unit_test(test_device_path),     cmocka_unit_test(test_no_pairs),
      cmocka_unit_test(test_against_pytorch), cmocka_unit_test(test_step_hook),
      cmocka_unit_test(test_divergence),      cmocka_unit_test(test_poll_inside_passes),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
