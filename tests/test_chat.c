/* Chat templates: every format's rendering against the real Jinja templates
 * rendered by jinja2 (tests/golden/tokenizer/chat.json, made by
 * make_tokenizer_golden.py, and chat_qwen2.json, make_qwen2_golden.py), recognition of templates by their markers, and
 * bad arguments. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cJSON.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "jsonfile.h"
#include "hfdir.h"
#include "status.h"

#define SMOL_DEFAULT "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

/* Not SmolLM2's template (that one is read from the model in
 * test_default_tokenizer.c), only its markers: what recognition looks at. */
static const char smol_like[] =
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" SMOL_DEFAULT
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n'}}";

static pa_chat_template *by_golden_name(const char *name) {
  pa_chat_template *t;
  int rc = !strcmp(name, "smollm2") ? pa_chat_template_from_jinja(smol_like, "llama", &t)
                                    : pa_chat_template_from_name(name, &t);
  if (rc)
    fail_msg("%s: %s", name, pa_errmsg());
  return t;
}

static const char *str_or_null(const cJSON *o, const char *key) {
  const cJSON *v = cJSON_GetObjectItem(o, key);
  return cJSON_IsString(v) ? v->valuestring : NULL;
}

static void test_golden(void **s) {
  (void)s;
  cJSON *root;
  if (pa_json_load(PALIGN_TEST_DATA "/tokenizer/chat.json", &root))
    fail_msg("%s", pa_errmsg());
  const cJSON *c;
  int n = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
    const char *name = str_or_null(c, "template");
    pa_chat_template *t = by_golden_name(name);
    char *out;
    assert_int_equal(
        pa_chat_render(t, str_or_null(c, "system"), str_or_null(c, "user"), str_or_null(c, "prefix"), &out), PA_OK);
    const char *want = str_or_null(c, "expected");
    if (strcmp(out, want))
      fail_msg("%s (case %d):\n got  [%s]\n want [%s]", name, n, out, want);
    free(out);
    pa_chat_template_destroy(t);
    n++;
  }
  assert_true(n >= 40);
  cJSON_Delete(root);
}

/* Qwen2.5's real template (from the Qwen2.5-Coder GGUF, kept in the golden)
 * is recognised as ChatML with Qwen's default system turn and renders what
 * jinja2 rendered (make_qwen2_golden.py real). */
static void test_qwen2_golden(void **s) {
  (void)s;
  cJSON *root;
  if (pa_json_load(PALIGN_TEST_DATA "/tokenizer/chat_qwen2.json", &root))
    fail_msg("%s", pa_errmsg());
  pa_chat_template *t;
  if (pa_chat_template_from_jinja(str_or_null(root, "template"), "qwen2", &t))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(pa_chat_template_kind(t), PA_CHAT_CHATML);
  assert_string_equal(pa_chat_template_default_system(t),
                      "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  const cJSON *c;
  int n = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
    char *out;
    assert_int_equal(
        pa_chat_render(t, str_or_null(c, "system"), str_or_null(c, "user"), str_or_null(c, "prefix"), &out), PA_OK);
    if (strcmp(out, str_or_null(c, "expected")))
      fail_msg("qwen2 case %d:\n got  [%s]\n want [%s]", n, out, str_or_null(c, "expected"));
    free(out);
    n++;
  }
  assert_true(n >= 9);
  pa_chat_template_destroy(t);
  cJSON_Delete(root);
}

static void test_recognition(void **s) {
  (void)s;
  static const struct {
    const char *jinja, *arch;
    pa_chat_kind kind;
    const char *default_system;
  } cases[] = {
      {smol_like, "llama", PA_CHAT_CHATML, SMOL_DEFAULT},
      /* the same with the newline written as the escape \n, and a quote */
      {"{{ '<|im_start|>system\\nYou\\'re Qwen.<|im_end|>\\n' }}", "llama", PA_CHAT_CHATML, "You're Qwen."},
      /* a system turn built from variables is no constant default */
      {"{{ '<|im_start|>system\\n' + sys + '<|im_end|>' }}", "llama", PA_CHAT_CHATML, NULL},
      {"{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}", "llama", PA_CHAT_CHATML,
       NULL},
      {"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}", "llama", PA_CHAT_LLAMA3, NULL},
      {"{{- \"Cutting Knowledge Date: December 2023\\n\" }}{{'<|start_header_id|>'}}", "llama", PA_CHAT_LLAMA31, NULL},
      {"{{ bos_token + '[INST] ' + '<<SYS>>\\n' + content + ' [/INST]' }}", "llama", PA_CHAT_LLAMA2, NULL},
      {"{{ '[INST] ' + message['content'] + ' [/INST]' }}", "mistral", PA_CHAT_MISTRAL, NULL},
      {NULL, "llama", PA_CHAT_LLAMA2, NULL},
      {"", "mistral", PA_CHAT_MISTRAL, NULL},
      {NULL, NULL, PA_CHAT_LLAMA2, NULL},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    pa_chat_template *t;
    if (pa_chat_template_from_jinja(cases[i].jinja, cases[i].arch, &t))
      fail_msg("case %zu: %s", i, pa_errmsg());
    assert_int_equal(pa_chat_template_kind(t), cases[i].kind);
    const char *d = pa_chat_template_default_system(t);
    if (cases[i].default_system)
      assert_string_equal(d, cases[i].default_system);
    else
      assert_null(d);
    pa_chat_template_destroy(t);
  }
}

static void test_names_and_errors(void **s) {
  (void)s;
  const char *names[] = {"chatml", "llama3", "llama3.1", "llama2", "mistral"};
  const char *eot[] = {"<|im_end|>", "<|eot_id|>", "<|eot_id|>", "</s>", "</s>"};
  for (int i = 0; i < 5; i++) {
    pa_chat_template *t;
    assert_int_equal(pa_chat_template_from_name(names[i], &t), PA_OK);
    assert_string_equal(pa_chat_template_name(t), names[i]);
    assert_int_equal((int)pa_chat_template_kind(t), i);
    assert_string_equal(pa_chat_template_end_of_turn(t), eot[i]);
    assert_null(pa_chat_template_default_system(t));
    char *out = (char *)"unchanged";
    assert_int_equal(pa_chat_render(t, NULL, NULL, NULL, &out), PA_EINVAL);
    assert_null(out);
    assert_non_null(strstr(pa_errmsg(), "no user message"));
    pa_chat_template_destroy(t);
  }
  pa_chat_template *t = (pa_chat_template *)&t;
  assert_int_equal(pa_chat_template_from_name("vicuna", &t), PA_EINVAL);
  assert_null(t);
  assert_non_null(strstr(pa_errmsg(), "'vicuna' is unknown"));
  assert_int_equal(pa_chat_template_from_jinja("{{ messages }}", "llama", &t), PA_EUNSUPPORTED);
  assert_null(t);
  assert_non_null(strstr(pa_errmsg(), "--template"));
  assert_int_equal(pa_chat_template_from_jinja("{{ '[INST]' + x + '[/INST]' }}", "mistral", &t), PA_EUNSUPPORTED);
  assert_non_null(strstr(pa_errmsg(), "[/INST]"));
  pa_chat_template_destroy(NULL);
}

/* Llama-3.1's fixed system header (there is no real template here to render,
 * so this pins the documented form). */
static void test_llama31(void **s) {
  (void)s;
  pa_chat_template *t;
  assert_int_equal(pa_chat_template_from_name("llama3.1", &t), PA_OK);
  char *out;
  assert_int_equal(pa_chat_render(t, NULL, " hi ", "Option (", &out), PA_OK);
  assert_string_equal(out, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                           "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\nOption (");
  free(out);
  pa_chat_template_destroy(t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_golden),           cmocka_unit_test(test_qwen2_golden), cmocka_unit_test(test_recognition),
      cmocka_unit_test(test_names_and_errors), cmocka_unit_test(test_llama31),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
