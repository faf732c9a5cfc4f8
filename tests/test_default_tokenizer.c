/* A real model's tokenizer and chat template against llama.cpp and Hugging
 * Face tokenizers, which agreed on every id: the PAS prompts of all 300
 * IPIP-NEO items in both cases, the ICL prompts of three subjects, and
 * hand-written strings; token for token, and decode(encode(x)) == x.
 *   test_default_tokenizer [smollm2]  the default model (SmolLM2-135M-Instruct,
 *                                     GGUF; tests/golden/make_tokenizer_golden.py)
 *   test_default_tokenizer qwen2      Qwen2.5-Coder-0.5B-Instruct (GGUF;
 *                                     make_qwen2_golden.py real, where
 *                                     transformers' own GGUF tokenizer agreed too)
 *
 * The prompts are rebuilt here from the PAPI files (PALIGN_PAPI_DIR), which
 * are never committed; the goldens hold ids only. Needs the model (see
 * testutil.h); skips (77) without it unless PALIGN_REQUIRE_MODEL=1 /
 * PALIGN_REQUIRE_QWEN2=1. With PALIGN_SMOLLM2_TOKENIZER_JSON (or
 * PALIGN_QWEN2_TOKENIZER_JSON) naming a tokenizer.json the golden script
 * wrote, the JSON loader is checked on the same cases. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cJSON.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "chat.h"
#include "jsonfile.h"
#include "gguf.h"
#include "hfdir.h"
#include "testutil.h"
#include "status.h"
#include "tokenizer.h"

#define GOLDEN PALIGN_TEST_DATA "/tokenizer/"

/* PAS.md's prompts, as the paper's reference code writes them. */
#define ITEM_TEMPLATE                                                                                                  \
  "Given a statement of you: \"You %s.\"\n"                                                                            \
  "Please choose from the following options to identify how accurately this statement describes you.\n"                \
  "Options:\n(A). Very Accurate\n(B). Moderately Accurate\n(C). Neither Accurate Nor Inaccurate\n"                     \
  "(D). Moderately Inaccurate\n(E). Very Inaccurate\n"
#define SYSTEM_PROMPT "You are a helpful, honest and concise assistant."
#define ICL_HEAD      "Here are some of your behaviors and your level of recognition towards them;"
#define PREFIX        "Option ("
static const char *const labels[6] = {NULL,
                                      "Very Inaccurate",
                                      "Moderately Inaccurate",
                                      "Neither Accurate Nor Inaccurate",
                                      "Moderately Accurate",
                                      "Very Accurate"};

typedef struct {
  const char *name;
  const char *(*model)(void);
  const char *papi, *strings; /* golden files */
  const char *json_env;       /* a tokenizer.json to check as well */
  const char *missing;        /* the bytes the vocabulary has no token for (docs/TOKENIZER.md) */
} model_kind;

static const model_kind kinds[] = {
    {"smollm2", test_default_model, "smollm2_papi.txt", "smollm2_strings.txt", "PALIGN_SMOLLM2_TOKENIZER_JSON",
     "\x04\x06\x13\x14\x16\x1d\xc0\xc1\xf1\xf2\xf5\xf6\xf7\xf8\xf9\xfa\xfb\xfc\xfd\xfe\xff"},
    {"qwen2", test_qwen2_model, "qwen2_papi.txt", "qwen2_strings.txt", "PALIGN_QWEN2_TOKENIZER_JSON", ""},
};
static const model_kind *kind = &kinds[0];

static FILE *open_golden(const char *name) {
  char path[512];
  snprintf(path, sizeof path, "%s%s", GOLDEN, name);
  FILE *f = fopen(path, "r");
  if (!f)
    fail_msg("cannot open %s", path);
  return f;
}

static pa_gguf *gguf;
static pa_tokenizer *tok;      /* from the GGUF */
static pa_tokenizer *tok_json; /* from the rebuilt tokenizer.json, if given */
static pa_chat_template *chat; /* from the GGUF's Jinja template */

static int setup(void **s) {
  (void)s;
  const char *model = kind->model(); /* exits 77 when absent */
  if (pa_gguf_open(model, &gguf) || pa_tokenizer_from_gguf(gguf, &tok)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  pa_str jinja;
  if (pa_gguf_get_str(gguf, "tokenizer.chat_template", &jinja)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  char *j = strndup(jinja.ptr, jinja.len);
  int rc = pa_chat_template_from_jinja(j, "llama", &chat);
  free(j);
  if (rc) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  const char *json = getenv(kind->json_env);
  if (json && *json && pa_tokenizer_from_json(json, NULL, &tok_json)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  return 0;
}

static int teardown(void **s) {
  (void)s;
  pa_tokenizer_destroy(tok);
  pa_tokenizer_destroy(tok_json);
  pa_chat_template_destroy(chat);
  pa_gguf_close(gguf);
  return 0;
}

/* text without the bytes the vocabulary has no token for, which encoding
 * drops (as both references do): what decoding gives back. */
static char *without_missing_bytes(const char *text) {
  char *out = strdup(text), *o = out;
  assert_non_null(out);
  for (const char *p = text; *p; p++)
    if (!strchr(kind->missing, *p))
      *o++ = *p;
  *o = 0;
  return out;
}

static void check_ids(const pa_tokenizer *t, const char *text, unsigned flags, const int32_t *want, size_t n_want,
                      const char *what) {
  int32_t *ids;
  size_t n;
  if (pa_tokenizer_encode(t, text, strlen(text), flags, &ids, &n))
    fail_msg("%s: %s", what, pa_errmsg());
  size_t i = 0;
  while (i < n && i < n_want && ids[i] == want[i])
    i++;
  if (i < n || i < n_want)
    fail_msg("%s: token %zu differs (got %d, want %d; %zu vs %zu tokens) in '%.300s'", what, i, i < n ? ids[i] : -1,
             i < n_want ? want[i] : -1, n, n_want, text);
  /* and back: special tokens shown, so the text comes back whole */
  char *back;
  size_t len;
  assert_int_equal(pa_tokenizer_decode(t, ids, n, PA_TOK_DECODE_SPECIAL, &back, &len), PA_OK);
  char *kept = without_missing_bytes(text);
  if (len != strlen(kept) || memcmp(back, kept, len))
    fail_msg("%s: decode(encode(x)) != x for '%.300s'", what, text);
  free(back), free(kept);
  free(ids);
}

static void test_metadata(void **s) {
  (void)s;
  assert_int_equal(pa_tokenizer_model_kind(tok), PA_TOK_BYTE_BPE);
  assert_non_null(strstr(pa_tokenizer_describe(tok), kind->name[0] == 's' ? "smollm" : "qwen2"));
  assert_false(pa_tokenizer_add_bos(tok));
  assert_int_equal(pa_chat_template_kind(chat), PA_CHAT_CHATML);
  /* the bytes the vocabulary has no token for are the ones docs/TOKENIZER.md
   * names (21 for SmolLM2, none for Qwen2): alone, each encodes to nothing */
  for (int b = 1; b < 256; b++) {
    const char one = (char)b;
    int32_t *ids;
    size_t n;
    assert_int_equal(pa_tokenizer_encode(tok, &one, 1, 0, &ids, &n), PA_OK);
    free(ids);
    if ((n == 0) != (strchr(kind->missing, one) != NULL))
      fail_msg("byte 0x%02x: %zu tokens, %s the bytes listed as missing", b, n,
               strchr(kind->missing, one) ? "one of" : "not one of");
  }
  assert_int_equal(strlen(kind->missing), kind == &kinds[0] ? 21 : 0);
  const char *letters[] = {"A", "B", "C", "D", "E"};
  if (kind == &kinds[0]) {
    assert_int_equal(pa_tokenizer_n_vocab(tok), 49152);
    assert_int_equal(pa_tokenizer_bos(tok), 1);
    assert_int_equal(pa_tokenizer_eos(tok), 2);
    /* the file's unknown_token_id is 0, which llama.cpp's byte-level BPE never writes */
    assert_int_equal(pa_tokenizer_unk(tok), -1);
    assert_int_equal(pa_tokenizer_pad(tok), 2);
    assert_int_equal(pa_tokenizer_eot(tok), 2); /* <|im_end|> */
    assert_int_equal(pa_tokenizer_find(tok, "<|im_start|>"), 1);
    assert_true(pa_tokenizer_is_special(tok, 1));
    assert_false(pa_tokenizer_is_special(tok, 100));
    /* the option letters a reader of logits needs */
    for (int i = 0; i < 5; i++)
      assert_int_equal(pa_tokenizer_find(tok, letters[i]), 49 + i);
    assert_string_equal(pa_chat_template_default_system(chat),
                        "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  } else {
    assert_int_equal(pa_tokenizer_n_vocab(tok), 151936);
    assert_int_equal(pa_tokenizer_bos(tok), 151643); /* <|endoftext|> */
    assert_int_equal(pa_tokenizer_eos(tok), 151645); /* <|im_end|> */
    assert_int_equal(pa_tokenizer_pad(tok), 151643);
    assert_int_equal(pa_tokenizer_eot(tok), 151645);
    assert_int_equal(pa_tokenizer_find(tok, "<|im_start|>"), 151644);
    assert_true(pa_tokenizer_is_special(tok, 151644));
    assert_false(pa_tokenizer_is_special(tok, 100));
    for (int i = 0; i < 5; i++)
      assert_int_equal(pa_tokenizer_find(tok, letters[i]), 32 + i);
    assert_string_equal(pa_chat_template_default_system(chat),
                        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
  }
}

/* The model's own template renders what jinja2 rendered: chat.json's SmolLM2
 * cases, or chat_qwen2.json's (made from this model's template). */
static void test_chat_template(void **s) {
  (void)s;
  cJSON *root;
  const bool qwen2 = kind == &kinds[1];
  assert_int_equal(pa_json_load(qwen2 ? GOLDEN "chat_qwen2.json" : GOLDEN "chat.json", &root), PA_OK);
  if (qwen2) {
    pa_str jinja;
    assert_int_equal(pa_gguf_get_str(gguf, "tokenizer.chat_template", &jinja), PA_OK);
    const char *want = cJSON_GetObjectItem(root, "template")->valuestring;
    assert_true(strlen(want) == jinja.len && !memcmp(want, jinja.ptr, jinja.len));
  }
  const cJSON *c;
  int n = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
    const cJSON *t = cJSON_GetObjectItem(c, "template");
    if (!qwen2 && strcmp(t->valuestring, "smollm2"))
      continue;
    const cJSON *sys = cJSON_GetObjectItem(c, "system"), *pre = cJSON_GetObjectItem(c, "prefix");
    char *out;
    assert_int_equal(pa_chat_render(chat, cJSON_IsString(sys) ? sys->valuestring : NULL,
                                    cJSON_GetObjectItem(c, "user")->valuestring,
                                    cJSON_IsString(pre) ? pre->valuestring : NULL, &out),
                     PA_OK);
    assert_string_equal(out, cJSON_GetObjectItem(c, "expected")->valuestring);
    free(out);
    n++;
  }
  assert_true(n >= 9);
  cJSON_Delete(root);
}

/* Encoding flags 1 and 2; flag 4: llama.cpp's ids (the GGUF loader follows
 * it), 8: Hugging Face tokenizers' (the tokenizer.json loader follows it),
 * where the two differ. */
static void check_strings(const pa_tokenizer *t, const char *what, unsigned only) {
  FILE *f = open_golden(kind->strings);
  char *line = NULL, *save;
  size_t cap = 0;
  int n = 0;
  while (getline(&line, &cap, f) > 0) {
    if (line[0] == '#')
      continue;
    unsigned flags = (unsigned)atoi(strtok_r(line, " \n", &save));
    if ((flags & 12) && !(flags & only))
      continue;
    flags &= 3;
    const char *hex = strtok_r(NULL, " \n", &save);
    char *text = malloc(strlen(hex) / 2 + 1);
    text[tu_unhex(hex, text)] = '\0';
    size_t k = (size_t)atol(strtok_r(NULL, " \n", &save));
    int32_t *want = malloc((k + 1) * sizeof *want);
    for (size_t i = 0; i < k; i++)
      want[i] = atoi(strtok_r(NULL, " \n", &save));
    check_ids(t, text, flags, want, k, what);
    free(want);
    free(text);
    n++;
  }
  free(line);
  fclose(f);
  assert_true(n >= 40);
}

static void test_strings(void **s) {
  (void)s;
  check_strings(tok, "GGUF", 4);
  if (tok_json)
    check_strings(tok_json, "tokenizer.json", 8);
}

/* ---- PAPI ------------------------------------------------------------------ */

static char *items[301];
static cJSON *subjects, *split;

static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  if (fread(b, 1, (size_t)n, f) != (size_t)n) {
    free(b);
    b = NULL;
  } else {
    b[n] = '\0';
  }
  fclose(f);
  return b;
}

/* The next CSV field (RFC 4180 quoting) of *p into a malloc'd string;
 * *end_of_row is set at the end of a line. */
static char *csv_field(const char **p, bool *end_of_row) {
  const char *s = *p;
  size_t cap = 64, n = 0;
  char *out = malloc(cap);
  bool quoted = *s == '"';
  if (quoted)
    s++;
  for (;; s++) {
    if (n + 2 > cap)
      out = realloc(out, cap *= 2);
    if (quoted && *s == '"' && s[1] == '"') {
      out[n++] = '"';
      s++;
    } else if (quoted && *s == '"') {
      quoted = false;
    } else if (!quoted && (*s == ',' || *s == '\n' || *s == '\r' || *s == '\0')) {
      break;
    } else {
      out[n++] = *s;
    }
  }
  out[n] = '\0';
  *end_of_row = *s != ',';
  if (*s == '\r')
    s++;
  if (*s)
    s++;
  *p = s;
  return out;
}

static bool load_papi(void) {
  const char *dir = test_papi_dir();
  char path[4200];
  snprintf(path, sizeof path, "%s/ipip_neo_300_items.csv", dir);
  char *csv = slurp(path);
  if (!csv)
    return false;
  const char *p = csv;
  int col_item = -1, col_text = -1, col = 0;
  bool eor = false;
  while (!eor) { /* the header names the columns */
    char *f = csv_field(&p, &eor);
    if (!strcmp(f, "item"))
      col_item = col;
    if (!strcmp(f, "text"))
      col_text = col;
    free(f);
    col++;
  }
  assert_true(col_item >= 0 && col_text >= 0);
  while (*p) {
    int item = -1;
    char *text = NULL;
    col = 0;
    eor = false;
    while (!eor) {
      char *f = csv_field(&p, &eor);
      if (col == col_item)
        item = atoi(f);
      if (col == col_text) {
        text = f;
        f = NULL;
      }
      free(f);
      col++;
    }
    assert_true(item >= 1 && item <= 300 && text && !items[item]);
    items[item] = text;
  }
  free(csv);
  for (int i = 1; i <= 300; i++)
    assert_non_null(items[i]);
  snprintf(path, sizeof path, "%s/Test-set.json", dir);
  assert_int_equal(pa_json_load(path, &subjects), PA_OK);
  snprintf(path, sizeof path, "%s/mpi_300_split.json", dir);
  assert_int_equal(pa_json_load(path, &split), PA_OK);
  return true;
}

static void free_papi(void) {
  for (int i = 1; i <= 300; i++) {
    free(items[i]);
    items[i] = NULL;
  }
  cJSON_Delete(subjects);
  cJSON_Delete(split);
}

/* The item question; lowercase as the reference does when answering (the
 * items are ASCII, so ASCII lowering is Python's lower()). */
static char *question(int item, bool lower) {
  char *text = strdup(items[item]);
  for (char *c = text; lower && *c; c++)
    *c = (char)tolower((unsigned char)*c);
  size_t n = strlen(ITEM_TEMPLATE) + strlen(text) + 1;
  char *q = malloc(n);
  snprintf(q, n, ITEM_TEMPLATE, text);
  free(text);
  return q;
}

/* The ICL system prompt of subject s (index in Test-set.json). */
static char *icl_system(int s) {
  const cJSON *subj = cJSON_GetArrayItem(subjects, s), *idx;
  size_t cap = 1 << 16, n = 0;
  char *out = malloc(cap);
  n += (size_t)snprintf(out, cap, "%s", ICL_HEAD);
  bool first = true;
  cJSON_ArrayForEach(idx, cJSON_GetObjectItem(split, "train_index")) {
    char key[16];
    snprintf(key, sizeof key, "i%d", idx->valueint);
    int v = cJSON_GetObjectItem(subj, key)->valueint;
    assert_true(v >= 0 && v <= 5);
    if (v == 0) /* missing answers are left out (PAS.md) */
      continue;
    n += (size_t)snprintf(out + n, cap - n, "%s%s:%s", first ? "" : ";", items[idx->valueint], labels[v]);
    first = false;
    assert_true(n < cap);
  }
  return out;
}

static void check_papi(const pa_tokenizer *t, const char *what, bool timing) {
  FILE *f = open_golden(kind->papi);
  char *line = NULL, *save;
  size_t cap = 0, n_prev = 0;
  int32_t *prev = NULL;
  int rows = 0, icl = 0;
  while (getline(&line, &cap, f) > 0) {
    if (line[0] == '#')
      continue;
    const char *row_kind = strtok_r(line, " \n", &save);
    int item = atoi(strtok_r(NULL, " \n", &save));
    bool lower = !strcmp(strtok_r(NULL, " \n", &save), "lower");
    size_t p = (size_t)atol(strtok_r(NULL, " \n", &save)), sfx = (size_t)atol(strtok_r(NULL, " \n", &save)),
           m = (size_t)atol(strtok_r(NULL, " \n", &save));
    assert_true(p + sfx <= n_prev);
    size_t n = p + m + sfx;
    int32_t *want = malloc((n + 1) * sizeof *want);
    for (size_t i = 0; i < p; i++)
      want[i] = prev[i];
    for (size_t i = 0; i < m; i++)
      want[p + i] = atoi(strtok_r(NULL, " \n", &save));
    for (size_t i = 0; i < sfx; i++)
      want[p + m + i] = prev[n_prev - sfx + i];
    char *sys, *user;
    if (!strcmp(row_kind, "item")) {
      sys = strdup(SYSTEM_PROMPT);
      user = question(item, lower);
    } else {
      sys = icl_system(item);
      user = question(cJSON_GetArrayItem(cJSON_GetObjectItem(split, "test_index"), 0)->valueint, true);
      icl++;
    }
    char *prompt;
    assert_int_equal(pa_chat_render(chat, sys, user, PREFIX, &prompt), PA_OK);
    char what_row[96];
    snprintf(what_row, sizeof what_row, "%s, %s %d %s", what, row_kind, item, lower ? "lower" : "orig");
    check_ids(t, prompt, PA_TOK_PARSE_SPECIAL, want, n, what_row);
    if (timing && icl == 1 && !strcmp(row_kind, "icl")) {
      /* the long prompt every question of a subject shares: how fast? */
      int reps = 200;
      struct timespec a, b;
      clock_gettime(CLOCK_MONOTONIC, &a);
      for (int r = 0; r < reps; r++) {
        int32_t *ids;
        size_t k;
        assert_int_equal(pa_tokenizer_encode(t, prompt, strlen(prompt), PA_TOK_PARSE_SPECIAL, &ids, &k), PA_OK);
        free(ids);
      }
      clock_gettime(CLOCK_MONOTONIC, &b);
      double secs = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
      fprintf(stderr, "encoding the ICL prompt (%zu bytes, %zu tokens): %.3f ms, %.2f M tokens/s\n", strlen(prompt), n,
              1e3 * secs / reps, (double)n * reps / secs / 1e6);
    }
    free(prompt);
    free(sys);
    free(user);
    free(prev);
    prev = want;
    n_prev = n;
    rows++;
  }
  free(prev);
  free(line);
  fclose(f);
  assert_int_equal(rows, 603);
  assert_int_equal(icl, 3);
}

static void test_papi_prompts(void **s) {
  (void)s;
  if (!load_papi()) {
    const char *req = getenv("PALIGN_REQUIRE_MODEL");
    if (req && !strcmp(req, "1"))
      fail_msg("the PAPI data is missing from %s (set PALIGN_PAPI_DIR)", test_papi_dir());
    skip();
  }
  check_papi(tok, "GGUF", true);
  if (tok_json)
    check_papi(tok_json, "tokenizer.json", false);
  free_papi();
}

int main(int argc, char **argv) {
  for (size_t i = 0; argc > 1 && i < sizeof kinds / sizeof kinds[0]; i++)
    if (!strcmp(argv[1], kinds[i].name))
      kind = &kinds[i];
  if (argc > 1 && strcmp(argv[1], kind->name)) {
    fprintf(stderr, "usage: %s [smollm2|qwen2]\n", argv[0]);
    return 2;
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_metadata),
      cmocka_unit_test(test_chat_template),
      cmocka_unit_test(test_strings),
      cmocka_unit_test(test_papi_prompts),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
