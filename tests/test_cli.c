/* The palign CLI as a user meets it: exit codes (0 ok, 1 failure, 2 usage)
 * and messages that name the file and the problem. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "testutil.h"

static char out[1 << 16];

/* Runs `palign ARGS` (a shell fragment), stdout and stderr into `out`; returns the exit status. */
static int palign(const char *fmt, ...) {
  char args[2048], cmd[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(args, sizeof args, fmt, ap);
  va_end(ap);
  snprintf(cmd, sizeof cmd, "%s/palign %s 2>&1", PALIGN_BINARY_DIR, args);
  FILE *p = popen(cmd, "r");
  assert_non_null(p);
  size_t n = fread(out, 1, sizeof out - 1, p);
  out[n] = '\0';
  int st = pclose(p);
  assert_true(WIFEXITED(st));
  return WEXITSTATUS(st);
}

static void expect_out(const char *what) {
  if (!strstr(out, what))
    fail_msg("output should contain '%s':\n%s", what, out);
}

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
  assert_int_equal(palign("mkmodel %s/tiny-hf --format safetensors --layers 3 --dim 32 --heads 4 --kv-heads 1 --seed 5", tu_tmp), 0);
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
  expect_out("exceed the model's context");
  assert_int_equal(palign("generate --model %s/tiny.gguf --prompt x --template nope", tu_tmp), 2);
  /* mkmodel refuses to overwrite */
  assert_int_equal(palign("mkmodel %s/tiny.gguf", tu_tmp), 1);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_usage, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_bad_model_files, tu_setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_mkmodel_inspect_tokenize, tu_setup, tu_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
