/* Prompts, answer reading and the evaluator on a tiny random model and a
 * tiny inventory: the shared-prefix evaluator must give the answers of the
 * full prompts run one by one. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "eval.h"
#include "forward.h"
#include "inventory.h"
#include "methods.h"
#include "mkmodel.h"
#include "model.h"
#include "prompts.h"
#include "status.h"
#include "testutil.h"
#include "tokenizer.h"

static pa_model *model;
static pa_lm *lm;
static pa_inventory *inv;
static pa_subjects *subjects;

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  char p[300];
  tu_papi_dir(p, sizeof p, ".", (tu_papi_files){TU_TEN_ITEMS_CSV, TU_TEN_ITEMS_SPLIT, TU_TWO_SUBJECTS_JSON, NULL});
  tu_path(p, sizeof p, "Test-set.json");
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 9;
  if (pa_inventory_load(tu_tmp, &inv) || pa_subjects_load(p, inv, &subjects) ||
      pa_mkmodel_write_gguf(&o, tu_path(p, sizeof p, "m.gguf")) || pa_model_open(p, &model) ||
      pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 1024}, &lm)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  return 0;
}

static int teardown(void **s) {
  pa_lm_destroy(lm);
  pa_model_close(model);
  pa_subjects_destroy(subjects);
  pa_inventory_destroy(inv);
  return tu_teardown(s);
}

static void test_prompts(void **s) {
  (void)s;
  char *q = pa_prompt_question(pa_inventory_item(inv, 1), true);
  assert_string_equal(q, "Given a statement of you: \"You worry about things..\"\n"
                         "Please choose from the following options to identify how accurately this statement "
                         "describes you.\nOptions:\n(A). Very Accurate\n(B). Moderately Accurate\n"
                         "(C). Neither Accurate Nor Inaccurate\n(D). Moderately Inaccurate\n(E). Very Inaccurate\n");
  free(q);
  q = pa_prompt_question(pa_inventory_item(inv, 2), false);
  assert_non_null(strstr(q, "\"You Make friends easily..\""));
  free(q);
  /* the ICL prompt: train items in split order, the missing answer (item 2) left out */
  char *icl = pa_prompt_icl(inv, pa_subjects_at(subjects, 0));
  assert_string_equal(icl, "Here are some of your behaviors and your level of recognition towards them;"
                           "Worry about things.:Moderately Accurate;Have a vivid imagination.:Moderately Inaccurate;"
                           "Trust others.:Very Accurate;Complete tasks successfully.:Very Inaccurate");
  free(icl);
  assert_null(pa_answer_label(0));
  assert_string_equal(pa_answer_label(3), "Neither Accurate Nor Inaccurate");
}

/* The reference's parser, quirks included: the first [a-eA-E][^a-zA-Z] in
 * the first 12 characters. */
static void test_parse_generated(void **s) {
  (void)s;
  const struct {
    const char *text;
    int want;
  } cases[] = {
      {" (C). Neither Accurate", 3},
      {"A", 0},
      {"A)", 5},
      {"Abz", 0},
      {"bad", 0},
      {"the answer: B", 1},
      {"(e)", 1},
      {"xxxxxxxxxxxB.", 0},
      {"xxxxxxxxxxB.", 4},
      {"", 0},
      {"éééééééééé D ", 0},
      {"ééééééééé D ", 2},
      {"D\n", 2},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    if (pa_parse_generated_answer(cases[i].text, strlen(cases[i].text)) != cases[i].want)
      fail_msg("'%s': got %d, want %d", cases[i].text, pa_parse_generated_answer(cases[i].text, strlen(cases[i].text)),
               cases[i].want);
}

/* The evaluator's answers equal those of each full prompt run on its own. */
static void test_shared_prefix_answers(void **s) {
  (void)s;
  const pa_tokenizer *tok = pa_model_tokenizer(model);
  const pa_chat_template *tmpl = pa_model_chat(model);
  pa_evaluator *ev;
  assert_int_equal(pa_evaluator_create(lm, tok, tmpl, &(pa_eval_opts){.batch = 2}, &ev), PA_OK);
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  pa_pred preds[5];
  float probs[5 * 5];
  pa_eval_stats st;
  char *icl = pa_prompt_icl(inv, pa_subjects_at(subjects, 0));
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, n_test, NULL, preds, probs, &st), PA_OK);
  assert_true(st.prefix_tokens > 20 && st.question_tokens > 0 && st.naive_tokens > st.prefix_tokens);

  const int V = pa_lm_config(lm)->vocab_size;
  float *logits = malloc((size_t)V * sizeof *logits);
  int32_t letters[5];
  for (int k = 0; k < 5; k++) {
    char text[16];
    int32_t *ids;
    size_t n;
    snprintf(text, sizeof text, "Option (%c", 'A' + k);
    assert_int_equal(pa_tokenizer_encode(tok, text, strlen(text), 0, &ids, &n), PA_OK);
    letters[k] = ids[n - 1];
    free(ids);
  }
  for (int i = 0; i < n_test; i++) {
    char *q = pa_prompt_question(pa_inventory_item(inv, test[i]), true);
    int32_t *ids;
    size_t n;
    assert_int_equal(pa_chat_tokenize(tmpl, tok, icl, q, "Option (", &ids, &n), PA_OK);
    pa_kv *kv;
    assert_int_equal(pa_kv_create(lm, (int)n, &kv), PA_OK);
    pa_seq seq = {.tokens = ids, .n_tokens = (int)n, .kv = kv};
    assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &seq, .n_seqs = 1, .logits = logits}), PA_OK);
    double p[5], expected = 0;
    pa_softmax_subset(logits, letters, 5, p);
    int best = 0;
    for (int k = 0; k < 5; k++) {
      assert_float_equal(probs[i * 5 + k], p[k], 1e-5);
      expected += p[k] * (5 - k);
      best = p[k] > p[best] ? k : best;
    }
    assert_int_equal(preds[i].item, test[i]);
    assert_int_equal(preds[i].answer, 5 - best);
    assert_float_equal(preds[i].expected, expected, 1e-5);
    pa_kv_destroy(kv);
    free(ids);
    free(q);
  }
  /* the same questions again are answered from memory, identically */
  pa_pred again[5];
  float probs2[25];
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, n_test, NULL, again, probs2, &st), PA_OK);
  assert_int_equal(st.prefix_tokens + st.question_tokens, 0);
  assert_memory_equal(again, preds, sizeof preds);
  assert_memory_equal(probs2, probs, sizeof probs);
  /* other items under the same system prompt reuse the prefix only */
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, n_test - 1, NULL, again, NULL, &st), PA_OK);
  assert_int_equal(st.prefix_tokens, 0);
  assert_true(st.question_tokens > 0);
  for (int i = 0; i < n_test - 1; i++)
    assert_int_equal(again[i].answer, preds[i].answer);
  /* the first call is still remembered after another one (and a steered
   * call, which is never remembered), ... */
  const pa_model_config *cfg = pa_lm_config(lm);
  float *steer = calloc((size_t)cfg->n_layers * cfg->n_heads * cfg->head_dim, sizeof *steer);
  steer[3] = 0.5f;
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, 2, steer, again, NULL, &st), PA_OK);
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, n_test, NULL, again, probs2, &st), PA_OK);
  assert_int_equal(st.prefix_tokens + st.question_tokens, 0);
  assert_memory_equal(probs2, probs, sizeof probs);
  /* ... until four other unsteered calls have come since */
  for (int k = 1; k <= 4; k++)
    assert_int_equal(pa_evaluator_answer(ev, inv, icl, test + k, 1, NULL, again, NULL, &st), PA_OK);
  assert_int_equal(pa_evaluator_answer(ev, inv, icl, test, n_test, NULL, again, probs2, &st), PA_OK);
  assert_true(st.question_tokens > 0);
  assert_memory_equal(probs2, probs, sizeof probs);
  /* the template's default system turn (NULL) and an empty one ("") are
   * two prompts, remembered apart */
  float with_default[25], with_empty[25], fresh[25];
  assert_int_equal(pa_evaluator_answer(ev, inv, NULL, test, n_test, NULL, again, with_default, &st), PA_OK);
  assert_int_equal(pa_evaluator_answer(ev, inv, "", test, n_test, NULL, again, with_empty, &st), PA_OK);
  assert_true(st.question_tokens > 0);
  pa_evaluator *other;
  assert_int_equal(pa_evaluator_create(lm, tok, tmpl, &(pa_eval_opts){.batch = 2}, &other), PA_OK);
  assert_int_equal(pa_evaluator_answer(other, inv, "", test, n_test, NULL, again, fresh, &st), PA_OK);
  assert_memory_equal(with_empty, fresh, sizeof fresh);
  assert_memory_not_equal(with_empty, with_default, sizeof fresh);
  pa_evaluator_destroy(other);
  free(steer);
  free(icl), free(logits);
  pa_evaluator_destroy(ev);
}

/* `palign eval --methods none,icl,p2` asks, for each subject, the default
 * prompt (the same for all) and two of the subject's own: the default one
 * is answered from memory for every subject after the first, however many
 * subjects' own prompts have come since (the memory gives up the call least
 * recently used, not the oldest). */
static void test_memo_keeps_the_shared_call(void **s) {
  (void)s;
  pa_evaluator *ev;
  assert_int_equal(pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model), NULL, &ev), PA_OK);
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  pa_pred preds[5];
  float probs[5 * 5];
  pa_eval_stats st;
  /* first asked without the probabilities, which a later call asks for:
   * that call is computed again, and remembered in the place of the first */
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, test, n_test, NULL, preds, NULL, &st), PA_OK);
  for (int subject = 0; subject < 5; subject++) {
    assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, test, n_test, NULL, preds, probs, &st), PA_OK);
    if ((subject > 0) == (st.question_tokens != 0))
      fail_msg("subject %d: the default prompt's answers were %s", subject,
               subject > 0 ? "computed again" : "remembered without the probabilities asked for");
    for (int own = 0; own < 2; own++) {
      char system[64];
      snprintf(system, sizeof system, "You are subject %d, prompt %d.", subject, own);
      assert_int_equal(pa_evaluator_answer(ev, inv, system, test, n_test, NULL, preds, NULL, &st), PA_OK);
      assert_true(st.question_tokens > 0);
    }
  }
  pa_evaluator_destroy(ev);
}

/* Generate mode: each answer is what greedy decoding of that full prompt says. */
static void test_generate_mode(void **s) {
  (void)s;
  const pa_tokenizer *tok = pa_model_tokenizer(model);
  const pa_chat_template *tmpl = pa_model_chat(model);
  pa_evaluator *ev;
  assert_int_equal(pa_evaluator_create(lm, tok, tmpl, &(pa_eval_opts){.mode = PA_READ_GENERATE, .batch = 3}, &ev),
                   PA_OK);
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  pa_pred preds[5];
  float probs[5 * 5];
  memset(probs, 0x41, sizeof probs); /* what a caller's buffer may hold: 12.1 */
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, test, n_test, NULL, preds, probs, NULL), PA_OK);
  for (int i = 0; i < n_test * 5; i++)
    assert_true(isnan(probs[i]));    /* generated text has none */
  memset(probs, 0x41, sizeof probs); /* and so has the same call answered from memory */
  pa_eval_stats st;
  assert_int_equal(pa_evaluator_answer(ev, inv, PA_DEFAULT_SYSTEM, test, n_test, NULL, preds, probs, &st), PA_OK);
  assert_int_equal(st.question_tokens, 0);
  for (int i = 0; i < n_test * 5; i++)
    assert_true(isnan(probs[i]));
  for (int i = 0; i < n_test; i++) {
    char *q = pa_prompt_question(pa_inventory_item(inv, test[i]), true);
    int32_t *ids, *out;
    size_t n;
    int n_out;
    assert_int_equal(pa_chat_tokenize(tmpl, tok, PA_DEFAULT_SYSTEM, q, "Option", &ids, &n), PA_OK);
    pa_kv *kv;
    assert_int_equal(pa_kv_create(lm, (int)n + 15, &kv), PA_OK);
    const int32_t stop[2] = {pa_tokenizer_eos(tok), pa_tokenizer_find(tok, "<|im_end|>")};
    assert_int_equal(pa_lm_generate(lm, NULL, kv, ids, (int)n,
                                    &(pa_gen_opts){.max_tokens = 15, .stop = stop, .n_stop = 2}, &out, &n_out),
                     PA_OK);
    if (n_out > 0 && (out[n_out - 1] == stop[0] || out[n_out - 1] == stop[1]))
      n_out--;
    char *text;
    size_t len;
    assert_int_equal(pa_tokenizer_decode(tok, out, (size_t)n_out, 0, &text, &len), PA_OK);
    assert_int_equal(preds[i].answer, pa_parse_generated_answer(text, len));
    assert_true(isnan(preds[i].expected));
    free(text), free(out), free(ids), free(q);
    pa_kv_destroy(kv);
  }
  pa_evaluator_destroy(ev);
}

static void test_methods(void **s) {
  (void)s;
  assert_non_null(pa_method_find("icl"));
  assert_null(pa_method_find("pas_nonexistent"));
  const pa_method_ctx ctx = {.inv = inv, .ev = NULL};
  int n_test;
  const int *test = pa_inventory_test(inv, &n_test);
  pa_pred preds[5];
  pa_method_out out = {.preds = {preds}};
  assert_int_equal(pa_method_find("const3")->run(&ctx, pa_subjects_at(subjects, 0), test, n_test, &out), PA_OK);
  assert_int_equal(out.n_rows, 1);
  assert_string_equal(out.name[0], "const3");
  assert_int_equal(out.n[0], n_test);
  for (int i = 0; i < n_test; i++)
    assert_int_equal(preds[i].answer, 3);
  /* p2 without a description fails for that subject, naming it */
  pa_evaluator *ev;
  assert_int_equal(pa_evaluator_create(lm, pa_model_tokenizer(model), pa_model_chat(model), NULL, &ev), PA_OK);
  const pa_method_ctx mctx = {.inv = inv, .ev = ev};
  assert_int_equal(pa_method_find("p2")->run(&mctx, pa_subjects_at(subjects, 1), test, n_test, &out), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "subject 12"));
  pa_evaluator_destroy(ev);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_prompts),
      cmocka_unit_test(test_parse_generated),
      cmocka_unit_test(test_shared_prefix_answers),
      cmocka_unit_test(test_memo_keeps_the_shared_call),
      cmocka_unit_test(test_generate_mode),
      cmocka_unit_test(test_methods),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
