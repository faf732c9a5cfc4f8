/* The palign CLI as a user meets it: exit codes (0 ok, 1 failure, 2 usage)
 * and messages that name the file and the problem. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "testutil.h"

static char out[1 << 16];

/* Runs `palign ARGS` (a shell fragment), stdout and stderr into `out`; returns the exit status. */
#define palign(...) tu_run(out, sizeof out, NULL, 0, PALIGN_BINARY_DIR "/palign " __VA_ARGS__)

#define expect_out(what) tu_expect_in(out, what, "the output")

static void test_usage(void **s) {
  (void)s;
  assert_int_equal(palign(""), 2);
  expect_out("usage: palign COMMAND");
  assert_int_equal(palign("--help"), 0);
  expect_out("inspect");
  assert_int_equal(palign("frobnicate"), 2);
  expect_out("unknown command 'frobnicate'");
  assert_int_equal(palign("inspect"), 2);
  expect_out("usage: palign inspect");
  assert_int_equal(palign("inspect a b"), 2);
  expect_out("unexpected argument 'b'");
  assert_int_equal(palign("inspect --bogus x"), 2);
  assert_int_equal(palign("mkmodel %s/m --layers zero", tu_tmp), 2);
  assert_int_equal(palign("mkmodel %s/m --format onnx", tu_tmp), 2);
  assert_int_equal(palign("tokenize"), 2);
}

/* Every flag's line of a command's help (`out`) has its description at the
 * column --methods' has, or the flag alone on it (the description below);
 * the shared flags' lines (--backend, --weights, the DPO ones) among them. */
static void test_help_columns(void **s) {
  (void)s;
  /* palign-worker starts MPI (a singleton) even for --help; in the sanitizer
   * build LeakSanitizer then finds what Open MPI's components, unloaded at
   * MPI_Finalize, kept, under names its suppressions cannot match */
  static const char *const commands[] = {"palign eval --help", "palign-worker --help"};
  static const char *const env[] = {"", "ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 "};
  for (size_t c = 0; c < sizeof commands / sizeof commands[0]; c++) {
    assert_int_equal(tu_run(out, sizeof out, NULL, 0, "%s%s/%s", env[c], PALIGN_BINARY_DIR, commands[c]), 0);
    const char *methods = strstr(out, "\n  --methods ");
    assert_non_null(methods);
    const char *after = strstr(methods + 3, "  "); /* after "  --methods LIST" */
    int column = (int)(after + strspn(after, " ") - (methods + 1));
    int flags = 0;
    for (const char *line = strstr(out, "\n  --"); line; line = strstr(line, "\n  --")) {
      line++;
      int len = (int)strcspn(line, "\n");
      flags++;
      const char *gap = strstr(line + 2, "  ");
      bool alone = !gap || gap - line >= len;
      if (!alone && (len <= column || line[column - 1] != ' ' || line[column] == ' '))
        fail_msg("%s: this line's description is not at column %d as --methods' is: %.*s", commands[c], column, len,
                 line);
    }
    assert_true(flags > 20);
    expect_out("  --backend B");
    expect_out("  --dpo-weight-decay X");
  }
}

static void test_bad_model_files(void **s) {
  (void)s;
  assert_int_equal(palign("inspect %s/absent.gguf", tu_tmp), 1);
  expect_out("absent.gguf");
  char cmd[512];
  snprintf(cmd, sizeof cmd, "printf 'GGUF\\003\\000\\000\\000' > %s/trunc.gguf", tu_tmp);
  assert_int_equal(system(cmd), 0);
  assert_int_equal(palign("inspect %s/trunc.gguf", tu_tmp), 1);
  expect_out("trunc.gguf: truncated");
  snprintf(cmd, sizeof cmd, "head -c 4096 /dev/zero > %s/zeros.gguf", tu_tmp);
  assert_int_equal(system(cmd), 0);
  assert_int_equal(palign("inspect %s/zeros.gguf", tu_tmp), 1);
  expect_out("zeros.gguf: not a GGUF file");
  assert_int_equal(palign("tokenize %s/zeros.gguf hello", tu_tmp), 1);
  expect_out("zeros.gguf: not a GGUF file");
}

static void test_mkmodel_inspect_tokenize(void **s) {
  (void)s;
  assert_int_equal(palign("mkmodel %s/tiny.gguf --layers 3 --dim 32 --heads 4 --kv-heads 1 --seed 5", tu_tmp), 0);
  assert_int_equal(palign("inspect %s/tiny.gguf", tu_tmp), 0);
  expect_out("layers         3");
  expect_out("heads          4 query, 1 key/value");
  expect_out("blk.2.ffn_down.weight");
  assert_int_equal(
      palign("mkmodel %s/tiny-hf --format safetensors --layers 3 --dim 32 --heads 4 --kv-heads 1 --seed 5", tu_tmp), 0);
  assert_int_equal(palign("inspect %s/tiny-hf --no-tensors", tu_tmp), 0);
  expect_out("format         safetensors");
  /* the same text gives the same ids from both forms */
  assert_int_equal(palign("tokenize %s/tiny.gguf 'You worry about things..' --chat", tu_tmp), 0);
  char first[sizeof out];
  memcpy(first, out, sizeof out);
  assert_int_equal(palign("tokenize %s/tiny-hf 'You worry about things..' --chat", tu_tmp), 0);
  assert_string_equal(first, out);
  expect_out("<|im_start|>");
  /* generate: greedy tokens from the tiny random model (gibberish, but it runs end to end) */
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt 'Hello' --max-tokens 5 --stats", tu_tmp), 0);
  expect_out("generated");
  assert_int_equal(palign("generate --model %s/tiny.gguf", tu_tmp), 2);
  expect_out("--model and --prompt are required");
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x --max-tokens 0", tu_tmp), 2);
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x --max-tokens 100000", tu_tmp), 1);
  expect_out("tiny.gguf: the prompt (68 tokens) and --max-tokens 100000 exceed the model's context of 2048");
  /* up to the context's last position: 68 prompt tokens, and 1981 generated
   * of which all but the last are fed back (this random model never says
   * its end of turn, so all 1981 are generated) */
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x --max-tokens 1982", tu_tmp), 1);
  expect_out("--max-tokens 1982 exceed the model's context of 2048");
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x --max-tokens 1981 --threads 2 --stats", tu_tmp), 0);
  expect_out("prompt 68 tokens, generated 1981 tokens");
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x --template nope", tu_tmp), 2);
  /* a stored fit's flags without a store are refused, not ignored */
  static const char *const store_only[] = {"--alpha 3", "--variant pas",     "--method dpo", "--protocol reference",
                                           "--papi /x", "--subjects-file /x"};
  for (size_t i = 0; i < sizeof store_only / sizeof *store_only; i++) {
    assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x %s", tu_tmp, store_only[i]), 2);
    char want[128];
    snprintf(want, sizeof want, "%.*s applies a stored subject's fit: it goes with --store and --subject",
             (int)strcspn(store_only[i], " "), store_only[i]);
    expect_out(want);
  }
  assert_int_equal(
      palign("generate --model %s/tiny.gguf --prompt x --store S --subject 1 --method dpo --protocol holdout", tu_tmp),
      2);
  expect_out("--protocol chooses PAS's alpha; the DPO adapter has none");
  /* mkmodel refuses to overwrite */
  assert_int_equal(palign("mkmodel %s/tiny.gguf", tu_tmp), 1);
}

/* A tiny PAPI folder: 20 items (4 per trait: 2 train, 2 test), 3 subjects. */
static void write_tiny_papi(char *dir, size_t n_dir) {
  static char items[4096], subjects[4096];
  const char traits[] = "OCEAN";
  size_t n = 0;
  tu_cat(items, sizeof items, &n, TU_ITEMS_HEADER);
  for (int i = 1; i <= 20; i++)
    tu_cat(items, sizeof items, &n, "%d,%d,%c,%c1,Facet,%c,Like thing number %d.\n", i, i, traits[(i - 1) % 5],
           traits[(i - 1) % 5], i % 3 ? '+' : '-', i);
  n = 0;
  tu_cat(subjects, sizeof subjects, &n, "[");
  for (int s = 0; s < 3; s++) {
    tu_cat(subjects, sizeof subjects, &n, "%s{\"case\": %d", s ? "," : "", 100 + s);
    for (int i = 1; i <= 20; i++)
      tu_cat(subjects, sizeof subjects, &n, ", \"i%d\": %d", i, 1 + (i * 7 + s * 3) % 5);
    tu_cat(subjects, sizeof subjects, &n, "}");
  }
  tu_cat(subjects, sizeof subjects, &n, "]");
  tu_papi_dir(dir, n_dir, "papi",
              (tu_papi_files){
                  .items = items,
                  .split = "{\"train_index\": [1,2,3,4,5,6,7,8,9,10], \"test_index\": [11,12,13,14,15,16,17,18,19,20]}",
                  .subjects = subjects,
                  .prompts = "[{\"output\": [\"You like order.\"]}, {\"output\": [\"You are calm.\"]}, "
                             "{\"output\": [\"You love parties.\"]}]"});
}

/* palign eval end to end: every method, PAS with both protocols, the bank cached and reused. */
static void test_eval_all_methods(void **s) {
  (void)s;
  char papi[300], json[300];
  write_tiny_papi(papi, sizeof papi);
  tu_path(json, sizeof json, "eval.json");
  assert_int_equal(palign("mkmodel %s/tiny.gguf --layers 2 --seed 3", tu_tmp), 0);
  assert_int_equal(palign("eval --model %s/tiny.gguf --papi %s --methods none,icl,p2,pas,pas_only --subjects all "
                          "--holdout 1 --bank %s/bank.bin --json %s",
                          tu_tmp, papi, tu_tmp, json),
                   0);
  expect_out("activation bank computed and saved to");
  const char *rows[] = {
      "none ",  "icl ",      "p2 ", "pas (reference)", "pas (holdout)", "pas_only (reference)", "pas_only (holdout)",
      "const3", "trait_mean"};
  for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
    expect_out(rows[i]);
  size_t len;
  char *text = tu_slurp(json, &len);
  assert_non_null(strstr(text, "\"alpha_holdout\""));
  assert_non_null(strstr(text, "\"pas (holdout)\""));
  assert_non_null(strstr(text, "\"keyed_pred\"")); /* each subject's keyed scores */
  assert_non_null(strstr(text, "\"keyed_r\""));    /* and the summary's */
  free(text);
  expect_out("Keyed trait score");
  /* a second run reads the bank back */
  assert_int_equal(
      palign("eval --model %s/tiny.gguf --papi %s --methods pas --subjects 1 --holdout 1 --bank %s/bank.bin", tu_tmp,
             papi, tu_tmp),
      0);
  expect_out("activation bank read from");
  /* another answer prefix: the bank's letters follow it too, so the bank
   * cached after "Option (" is refused, and one of its own is made */
  assert_int_equal(
      palign("eval --model %s/tiny.gguf --papi %s --methods pas --subjects 1 --holdout 1 --bank %s/bank.bin "
             "--prefix 'Answer: ('",
             tu_tmp, papi, tu_tmp),
      1);
  expect_out("prefix differs at byte 0 (file \"Option (\", this run \"Answer: (\")");
  assert_int_equal(palign("eval --model %s/tiny.gguf --papi %s --methods pas --subjects 1 --holdout 1 --bank "
                          "%s/bank-answer.bin --prefix 'Answer: ('",
                          tu_tmp, papi, tu_tmp),
                   0);
  char bank_answer[300];
  text = tu_slurp(tu_path(bank_answer, sizeof bank_answer, "bank-answer.bin"), &len);
  assert_non_null(strstr(text + 16, "\"prefix\":\"Answer: (\"")); /* in the file's JSON header */
  free(text);
  /* the bank's item texts lowercased (PAS.md: configurable; the default
   * keeps them as written): another bank, refused in place of the first */
  assert_int_equal(
      palign("eval --model %s/tiny.gguf --papi %s --methods pas --subjects 1 --holdout 1 --bank %s/bank.bin "
             "--bank-lowercase",
             tu_tmp, papi, tu_tmp),
      1);
  expect_out("lowercase differs");
  /* a bank made for another model is refused, not used */
  assert_int_equal(palign("mkmodel %s/other.gguf --layers 2 --seed 4", tu_tmp), 0);
  assert_int_equal(
      palign("eval --model %s/other.gguf --papi %s --methods pas --subjects 1 --holdout 1 --bank %s/bank.bin", tu_tmp,
             papi, tu_tmp),
      1);
  expect_out("bank.bin");
  /* bf16 weights on the CPU: the same methods, a bank of its own kind (an
   * fp32 bank under the same path is refused, naming the difference) */
  assert_int_equal(
      palign("eval --model %s/tiny.gguf --papi %s --methods pas --subjects 1 --holdout 1 --bank %s/bank.bin "
             "--weights bf16",
             tu_tmp, papi, tu_tmp),
      1);
  expect_out("weight format differs");
  assert_int_equal(palign("eval --model %s/tiny.gguf --papi %s --methods none,pas --subjects 1 --holdout 1 "
                          "--bank %s/bank16.bin --weights bf16",
                          tu_tmp, papi, tu_tmp),
                   0);
  expect_out("activation bank computed and saved to");
  /* a holdout leaving a trait no test item to report (this PAPI has 2 a
   * trait), refused before the bank is made */
  assert_int_equal(
      palign("eval --model %s/tiny.gguf --papi %s --methods pas --holdout 2 --bank %s/never.bin", tu_tmp, papi, tu_tmp),
      2);
  expect_out("--holdout 2: trait A has 2 test items; the holdout protocol needs 2 to choose alpha and one to report");
  char never[300];
  assert_int_equal(access(tu_path(never, sizeof never, "never.bin"), F_OK), -1);
  /* no PAPI data where the default points (relative to the working directory): say how to give it */
  assert_int_equal(tu_run(out, sizeof out, NULL, 0,
                          "cd / && env -u PALIGN_PAPI_DIR " PALIGN_BINARY_DIR "/palign eval --methods const3"),
                   1);
  expect_out("no PAPI data at ../shared/papi (the default, relative to the working directory): give the folder "
             "with --papi DIR or PALIGN_PAPI_DIR");
  assert_int_equal(palign("eval --model %s/tiny.gguf --papi %s --weights fp16", tu_tmp, papi), 2);
  expect_out("--weights is auto, fp32 or bf16, not 'fp16'");
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt hi --max-tokens 2 --weights half", tu_tmp), 2);
  expect_out("--weights is auto, fp32 or bf16, not 'half'");
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt hi --max-tokens 2 --weights bf16 --stats", tu_tmp), 0);
  expect_out("MB resident once loaded (bf16 weights)");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_usage, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_help_columns, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_bad_model_files, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_mkmodel_inspect_tokenize, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_eval_all_methods, tu_setup, tu_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
