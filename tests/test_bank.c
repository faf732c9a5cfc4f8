#define _GNU_SOURCE /* memmem */
/* The activation bank (worker/bank.h) on a tiny random model and a tiny
 * inventory: the shared-prefix computation must give the head outputs of
 * each full prompt run alone, in pa_pas_bank_items' order; the cache file
 * must round-trip bit for bit and refuse every mismatch and every damage
 * with a message naming the file and what is wrong. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bank.h"
#include "chat.h"
#include "forward.h"
#include "inventory.h"
#include "mkmodel.h"
#include "model.h"
#include "probe.h"
#include "prompts.h"
#include "status.h"
#include "testutil.h"
#include "tokenizer.h"

static pa_model *model;
static pa_lm *lm;
static pa_inventory *inv;
static char gguf[300];
static char fingerprint[65];

/* Traits mixed, so that bank order (A, C, E, N, O; split order within a
 * trait) differs from the split's order. */
static const char items_csv[] = TU_TEN_ITEMS_CSV;
static const char split_json[] = "{\"train_index\": [1, 2, 3, 4, 5, 9, 10], \"test_index\": [6, 7, 8]}";
static const int bank_order[] = {4, 9, 5, 10, 2, 1, 3};
enum { N_ITEMS = 7 };

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  char p[300];
  tu_papi_dir(p, sizeof p, ".", (tu_papi_files){.items = items_csv, .split = split_json});
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 3, o.seed = 5;
  tu_path(gguf, sizeof gguf, "m.gguf");
  if (pa_inventory_load(tu_tmp, &inv) || pa_mkmodel_write_gguf(&o, gguf) || pa_model_open(gguf, &model) ||
      pa_lm_create(model, &(pa_lm_opts){.n_threads = 2, .max_seq = 1024}, &lm) ||
      pa_model_fingerprint(gguf, fingerprint)) {
    fprintf(stderr, "%s\n", pa_errmsg());
    return -1;
  }
  return 0;
}

static int teardown(void **s) {
  pa_lm_destroy(lm);
  pa_model_close(model);
  pa_inventory_destroy(inv);
  return tu_teardown(s);
}

static const pa_tokenizer *tok(void) { return pa_model_tokenizer(model); }
static const pa_chat_template *tmpl(void) { return pa_model_chat(model); }

static pa_bank *compute(const pa_bank_opts *o) {
  pa_bank *b = NULL;
  if (pa_bank_compute(lm, tok(), tmpl(), inv, o, &b))
    fail_msg("pa_bank_compute: %s", pa_errmsg());
  return b;
}

static pa_bank_key key_for(const pa_bank_opts *o) {
  pa_bank_key k;
  if (pa_bank_key_make(fingerprint, pa_lm_config(lm), tok(), tmpl(), inv, o, &k))
    fail_msg("pa_bank_key_make: %s", pa_errmsg());
  return k;
}

/* Every sequence of the bank equals its full prompt run alone (no shared
 * prefix, no batch) with head capture, within 1e-5: the shared prefix and
 * the batching change only the order of fp32 sums. Returns the largest
 * difference. */
static double check_against_single(const pa_bank *b, const pa_bank_opts *o) {
  const pa_model_config *c = pa_lm_config(lm);
  const size_t per = (size_t)c->n_layers * c->n_heads * c->head_dim;
  const char *system = o && o->system ? o->system : PA_DEFAULT_SYSTEM;
  const char *prefix = o && o->prefix ? o->prefix : "Option (";
  int n;
  const int *items = pa_bank_items(b, &n);
  const float *z = pa_bank_data(b);
  float *heads = malloc(per * sizeof *heads);
  assert_non_null(heads);
  double worst = 0;
  for (int i = 0; i < n; i++)
    for (int k = 0; k < 2; k++) {
      char *q = pa_prompt_question(pa_inventory_item(inv, items[i]), o && o->lowercase);
      char assistant[64];
      snprintf(assistant, sizeof assistant, "%s%c", prefix, "AE"[k]);
      int32_t *ids;
      size_t len;
      assert_int_equal(pa_chat_tokenize(tmpl(), tok(), system, q, assistant, &ids, &len), PA_OK);
      pa_kv *kv;
      assert_int_equal(pa_kv_create(lm, (int)len, &kv), PA_OK);
      pa_seq seq = {.tokens = ids, .n_tokens = (int)len, .kv = kv};
      assert_int_equal(pa_lm_forward(lm, &(pa_batch){.seqs = &seq, .n_seqs = 1, .heads = heads}), PA_OK);
      const float *mine = z + (size_t)(2 * i + k) * per;
      for (size_t j = 0; j < per; j++) {
        assert_true(isfinite(mine[j]));
        worst = fmax(worst, fabs((double)mine[j] - heads[j]));
      }
      pa_kv_destroy(kv);
      free(ids), free(q);
    }
  free(heads);
  if (worst > 1e-5)
    fail_msg("bank differs from the full prompts run alone by %g", worst);
  return worst;
}

typedef struct {
  int calls, last_done, last_total;
  int stop_after; /* > 0: ask to stop after that many calls */
} progress_log;

static int on_progress(void *ctx, int done, int total) {
  progress_log *p = ctx;
  assert_true(done > p->last_done && done <= total);
  p->calls++, p->last_done = done, p->last_total = total;
  return p->stop_after > 0 && p->calls >= p->stop_after;
}

/* A progress callback that returns non-zero stops the computation: no bank,
 * PA_ECANCELED, and no more batches computed after the one that asked. */
static void test_cancel(void **s) {
  (void)s;
  progress_log log = {.stop_after = 1};
  pa_bank *b = (pa_bank *)0x1;
  pa_error_clear();
  assert_int_equal(pa_bank_compute(lm, tok(), tmpl(), inv,
                                   &(pa_bank_opts){.batch = 3, .progress = on_progress, .progress_ctx = &log}, &b),
                   PA_ECANCELED);
  assert_null(b);
  assert_int_equal(log.calls, 1);
  if (!strstr(pa_errmsg(), "stopped after 6 of 14 sequences"))
    fail_msg("message: %s", pa_errmsg());
}

static void test_layout_and_values(void **s) {
  (void)s;
  progress_log log = {0};
  const pa_bank_opts o = {.batch = 3, .progress = on_progress, .progress_ctx = &log};
  pa_bank *b = compute(&o);
  /* order: pa_pas_bank_items, which is A, C, E, N, O */
  int want[PA_MAX_ITEMS], n;
  assert_int_equal(pa_pas_bank_items(inv, want, PA_MAX_ITEMS), N_ITEMS);
  const int *items = pa_bank_items(b, &n);
  assert_int_equal(n, N_ITEMS);
  assert_memory_equal(items, want, sizeof bank_order);
  assert_memory_equal(items, bank_order, sizeof bank_order);
  const pa_model_config *c = pa_lm_config(lm);
  const pa_pas_bank v = pa_bank_view(b);
  assert_ptr_equal(v.z, pa_bank_data(b));
  assert_int_equal(v.n_items, N_ITEMS);
  assert_int_equal(v.n_layers, c->n_layers);
  assert_int_equal(v.n_heads, c->n_heads);
  assert_int_equal(v.head_dim, c->head_dim);
  /* 7 items (14 sequences) in batches of 3 items: each question once, then its two letters */
  assert_int_equal(log.calls, 3);
  assert_int_equal(log.last_done, 2 * N_ITEMS);
  assert_int_equal(log.last_total, 2 * N_ITEMS);
  /* the shared prefix holds the system prompt and the start of the question */
  const pa_bank_stats *st = pa_bank_stats_get(b);
  assert_true(st->prefix_tokens > 20);
  assert_true(st->prefix_tokens < st->min_tokens);
  /* the E sequence of an item costs one token: naive = prefix and question twice, letters once each */
  const long question_tokens = st->continuation_tokens - N_ITEMS; /* question + A, without the E letters */
  assert_int_equal(2 * question_tokens + 2 * N_ITEMS * st->prefix_tokens, st->naive_tokens);
  assert_int_equal(st->batch, 3);
  assert_true(st->seconds > 0);
  /* A and E sequences differ (the letter is seen) */
  const size_t per = (size_t)c->n_layers * c->n_heads * c->head_dim;
  const float *z = pa_bank_data(b);
  assert_true(memcmp(z, z + per, per * sizeof *z) != 0);
  double worst = check_against_single(b, &o);
  print_message("bank vs prompts alone: max |diff| %.2e; tokens %ld prefix + %ld continuation vs %ld naive\n", worst,
                st->prefix_tokens, st->continuation_tokens, st->naive_tokens);
  pa_bank_destroy(b);
}

/* Unshared, every sequence whole; the default batch (all at once). */
static void test_no_share(void **s) {
  (void)s;
  pa_bank *shared = compute(NULL), *whole = compute(&(pa_bank_opts){.no_share = true});
  const pa_bank_stats *st = pa_bank_stats_get(whole);
  assert_int_equal(st->prefix_tokens, 0);
  assert_int_equal(st->continuation_tokens, st->naive_tokens);
  assert_int_equal(st->naive_tokens, pa_bank_stats_get(shared)->naive_tokens);
  assert_int_equal(pa_bank_stats_get(shared)->batch, 32);
  check_against_single(whole, NULL);
  check_against_single(shared, NULL);
  pa_bank_destroy(shared);
  pa_bank_destroy(whole);
}

/* Lowercased text, another system prompt and another prefix: the prompts
 * change accordingly. */
static void test_options(void **s) {
  (void)s;
  const pa_bank_opts o = {.lowercase = true, .system = "Be brief.", .prefix = "(", .batch = 4};
  pa_bank *b = compute(&o), *d = compute(NULL);
  check_against_single(b, &o);
  const pa_pas_bank v = pa_bank_view(b);
  const size_t n = (size_t)2 * v.n_items * v.n_layers * v.n_heads * v.head_dim;
  assert_true(memcmp(pa_bank_data(b), pa_bank_data(d), n * sizeof(float)) != 0);
  pa_bank_destroy(b);
  pa_bank_destroy(d);
}

static void test_refusals(void **s) {
  (void)s;
  pa_bank *b = (pa_bank *)&b;
  /* "Option " + "A" is the one token " A" for this tokenizer */
  assert_int_equal(pa_bank_compute(lm, tok(), tmpl(), inv, &(pa_bank_opts){.prefix = "Option "}, &b), PA_EUNSUPPORTED);
  assert_null(b);
  assert_non_null(strstr(pa_errmsg(), "\"Option \""));
  assert_non_null(strstr(pa_errmsg(), "letter A"));
  /* prompts longer than the model was opened for */
  pa_lm *small;
  assert_int_equal(pa_lm_create(model, &(pa_lm_opts){.n_threads = 1, .max_seq = 40}, &small), PA_OK);
  assert_int_equal(pa_bank_compute(small, tok(), tmpl(), inv, NULL, &b), PA_EINVAL);
  assert_null(b);
  assert_non_null(strstr(pa_errmsg(), "the 40 the model was opened for"));
  pa_lm_destroy(small);
}

static void sha256_hex(const void *p, size_t n, char out[65]) {
  unsigned char md[32];
  unsigned len;
  assert_int_equal(EVP_Digest(p, n, md, &len, EVP_sha256(), NULL), 1);
  for (int i = 0; i < 32; i++)
    snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void test_fingerprints(void **s) {
  (void)s;
  /* a GGUF: the file's SHA-256 */
  size_t n;
  char *bytes = tu_slurp(gguf, &n), want[65], got[65];
  sha256_hex(bytes, n, want);
  free(bytes);
  assert_string_equal(fingerprint, want);
  /* a Hugging Face directory: its .safetensors files in sorted order */
  char dir[300], p[400];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_shards = 2;
  assert_int_equal(pa_mkmodel_write_hf(&o, tu_path(dir, sizeof dir, "hf")), PA_OK);
  size_t n1, n2;
  snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", dir);
  char *a = tu_slurp(p, &n1);
  snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", dir);
  char *b = tu_slurp(p, &n2);
  char *cat = malloc(n1 + n2);
  assert_non_null(cat);
  memcpy(cat, a, n1), memcpy(cat + n1, b, n2);
  sha256_hex(cat, n1 + n2, want);
  assert_int_equal(pa_model_fingerprint(dir, got), PA_OK);
  assert_string_equal(got, want);
  free(a), free(b), free(cat);
  /* missing things */
  assert_int_equal(pa_model_fingerprint(tu_path(p, sizeof p, "absent.gguf"), got), PA_ENOTFOUND);
  assert_non_null(strstr(pa_errmsg(), "absent.gguf"));
  assert_int_equal(mkdir(tu_path(p, sizeof p, "empty"), 0755), 0);
  assert_int_equal(pa_model_fingerprint(p, got), PA_ENOTFOUND);
  assert_non_null(strstr(pa_errmsg(), "no *.safetensors"));

  /* the inventory: item numbers in bank order and their texts */
  static const char listing[] = "4\tTrust others.\n9\tUse others for my own ends.\n5\tComplete tasks successfully.\n"
                                "10\tLike order.\n2\tMake friends easily.\n1\tWorry about things.\n"
                                "3\tHave a vivid imagination.\n";
  sha256_hex(listing, strlen(listing), want);
  assert_int_equal(pa_bank_inventory_fingerprint(inv, got), PA_OK);
  assert_string_equal(got, want);
}

/* An inventory in its own directory: the test one with `from` replaced by `to`. */
static pa_inventory *other_inventory(const char *name, const char *from, const char *to, const char *split) {
  char dir[300];
  char csv[sizeof items_csv + 64];
  const char *at = strstr(items_csv, from);
  assert_non_null(at);
  snprintf(csv, sizeof csv, "%.*s%s%s", (int)(at - items_csv), items_csv, to, at + strlen(from));
  tu_papi_dir(dir, sizeof dir, name, (tu_papi_files){.items = csv, .split = split ? split : split_json});
  pa_inventory *o;
  assert_int_equal(pa_inventory_load(dir, &o), PA_OK);
  return o;
}

static void test_key(void **s) {
  (void)s;
  const pa_bank_key k = key_for(NULL);
  assert_string_equal(k.model, fingerprint);
  assert_string_equal(k.system, PA_DEFAULT_SYSTEM);
  assert_string_equal(k.prefix, "Option (");
  assert_false(k.lowercase);
  assert_string_equal(k.template_name, "chatml");
  assert_int_equal(k.n_items, N_ITEMS);
  assert_int_equal(k.n_layers, 3);
  assert_int_equal(strlen(k.tokens), 64);
  /* the token fingerprint follows the prompts */
  const pa_bank_key lower = key_for(&(pa_bank_opts){.lowercase = true});
  assert_string_not_equal(lower.tokens, k.tokens);
  assert_string_equal(lower.inventory, k.inventory);
  /* a changed text changes the inventory fingerprint */
  pa_inventory *o = other_inventory("inv-text", "Like order.", "Like tidiness.", NULL);
  char fp[65];
  assert_int_equal(pa_bank_inventory_fingerprint(o, fp), PA_OK);
  assert_string_not_equal(fp, k.inventory);
  pa_inventory_destroy(o);
  char bad[65] = "abc";
  pa_bank_key x;
  assert_int_equal(pa_bank_key_make(bad, pa_lm_config(lm), tok(), tmpl(), inv, NULL, &x), PA_EINVAL);
}

static void test_round_trip(void **s) {
  (void)s;
  pa_bank *b = compute(&(pa_bank_opts){.batch = 5});
  const pa_bank_key k = key_for(NULL);
  char path[300];
  tu_path(path, sizeof path, "bank.bin");
  assert_int_equal(pa_bank_save(b, path, &k), PA_OK);
  pa_bank *r = (pa_bank *)&r;
  if (pa_bank_load(path, &k, &r))
    fail_msg("%s", pa_errmsg());
  const pa_pas_bank v = pa_bank_view(b), w = pa_bank_view(r);
  assert_int_equal(w.n_items, v.n_items);
  assert_int_equal(w.n_layers, v.n_layers);
  assert_int_equal(w.n_heads, v.n_heads);
  assert_int_equal(w.head_dim, v.head_dim);
  const size_t n = (size_t)2 * v.n_items * v.n_layers * v.n_heads * v.head_dim;
  assert_memory_equal(w.z, v.z, n * sizeof(float));
  int ni, nj;
  const int *ib = pa_bank_items(b, &ni), *ir = pa_bank_items(r, &nj);
  assert_int_equal(ni, nj);
  assert_memory_equal(ib, ir, (size_t)ni * sizeof *ib);
  const pa_bank_stats *sb = pa_bank_stats_get(b), *sr = pa_bank_stats_get(r);
  assert_int_equal(sr->prefix_tokens, sb->prefix_tokens);
  assert_int_equal(sr->continuation_tokens, sb->continuation_tokens);
  assert_int_equal(sr->naive_tokens, sb->naive_tokens);
  assert_int_equal(sr->max_tokens, sb->max_tokens);
  assert_int_equal(sr->batch, 5);
  /* a loaded bank saves to the same content (the date aside), and loads again */
  char again[300];
  assert_int_equal(pa_bank_save(r, tu_path(again, sizeof again, "again.bin"), &k), PA_OK);
  pa_bank *r2;
  assert_int_equal(pa_bank_load(again, &k, &r2), PA_OK);
  assert_memory_equal(pa_bank_data(r2), v.z, n * sizeof(float));
  pa_bank_destroy(r2);
  /* the layout: magic, version 1, the header, data at a multiple of 64, checksum */
  size_t len;
  unsigned char *f = (unsigned char *)tu_slurp(path, &len);
  assert_memory_equal(f, "PALIGNBK", 8);
  assert_int_equal(f[8] | f[9] << 8 | f[10] << 16 | (unsigned)f[11] << 24, 1);
  const size_t hlen = f[12] | f[13] << 8 | f[14] << 16 | (size_t)f[15] << 24;
  assert_int_equal((16 + hlen) % 64, 0);
  assert_int_equal(len, 16 + hlen + n * sizeof(float) + 32);
  assert_int_equal(f[16], '{');
  assert_memory_equal(f + 16 + hlen, v.z, n * sizeof(float)); /* little-endian float32 on this machine */
  char md[65];
  sha256_hex(f, len - 32, md);
  char tail[65];
  for (int i = 0; i < 32; i++)
    snprintf(tail + 2 * i, 3, "%02x", f[len - 32 + i]);
  assert_string_equal(md, tail);
  free(f);
  pa_bank_destroy(r);
  pa_bank_destroy(b);
}

/* Loads path under k: must fail with code, *out NULL, and a message naming
 * the file and holding every `needles` string. */
static void expect_refused(const char *path, const pa_bank_key *k, int code, const char *const *needles) {
  pa_bank *r = (pa_bank *)&r;
  const int rc = pa_bank_load(path, k, &r);
  if (rc != code)
    fail_msg("expected %d, got %d: %s", code, rc, pa_errmsg());
  assert_null(r);
  const char *msg = pa_errmsg();
  if (getenv("PALIGN_TEST_VERBOSE"))
    print_message("refused: %s\n", msg);
  if (!strstr(msg, path))
    fail_msg("the message does not name the file: %s", msg);
  for (; *needles; needles++)
    if (!strstr(msg, *needles))
      fail_msg("the message lacks \"%s\": %s", *needles, msg);
}

#define NEEDLES(...) ((const char *const[]){__VA_ARGS__, NULL})

static void test_mismatch(void **s) {
  (void)s;
  pa_bank *b = compute(NULL);
  const pa_bank_key k = key_for(NULL);
  char path[300];
  tu_path(path, sizeof path, "mismatch.bin");
  assert_int_equal(pa_bank_save(b, path, &k), PA_OK);
  pa_bank_key x;
#define REFUSED(change, ...)                                                                                           \
  do {                                                                                                                 \
    x = k;                                                                                                             \
    change;                                                                                                            \
    expect_refused(path, &x, PA_EINVAL, NEEDLES("refusing", __VA_ARGS__));                                             \
  } while (0)
  REFUSED(x.model[3] ^= 1, "model fingerprint differs");
  REFUSED(x.inventory[63] = x.inventory[63] == '0' ? '1' : '0', "inventory (train items or their texts) differs");
  REFUSED(x.tokens[0] = x.tokens[0] == '0' ? '1' : '0', "prompt tokens");
  REFUSED(x.system = "You are a helpful, honest and verbose assistant.", "system prompt differs at byte 30",
          "(file \"...est and concise assistan...\", this run \"...est and verbose assistan...\")");
  REFUSED(x.prefix = "Answer (", "prefix differs at byte 0");
  REFUSED(x.lowercase = true, "lowercase differs (file false, this run true)");
  REFUSED(x.weights = "bf16", "weight format differs", "(file \"fp32\", this run \"bf16\")");
  REFUSED(x.template_name = "llama3", "chat template differs");
  REFUSED(x.n_items = 8, "n_items differs (file 7, this run 8)");
  REFUSED(x.n_layers = 2, "n_layers differs (file 3, this run 2)");
  REFUSED(x.n_heads = 8, "n_heads differs");
  REFUSED(x.head_dim = 8, "head_dim differs");
  /* several at once are all named */
  REFUSED((x.model[0] ^= 1, x.lowercase = true, x.head_dim = 32), "model fingerprint", "lowercase", "head_dim");
#undef REFUSED
  /* keys made for other settings or another inventory */
  const pa_bank_key lower = key_for(&(pa_bank_opts){.lowercase = true});
  expect_refused(path, &lower, PA_EINVAL, NEEDLES("lowercase differs", "prompt tokens"));
  pa_inventory *o = other_inventory("inv-split", "Like order.", "Like order.",
                                    "{\"train_index\": [1, 2, 3, 4, 5, 9], \"test_index\": [6, 7, 8, 10]}");
  pa_bank_key ko;
  assert_int_equal(pa_bank_key_make(fingerprint, pa_lm_config(lm), tok(), tmpl(), o, NULL, &ko), PA_OK);
  expect_refused(path, &ko, PA_EINVAL, NEEDLES("inventory", "n_items differs (file 7, this run 6)"));
  pa_inventory_destroy(o);
  /* a missing file is PA_ENOTFOUND: the caller computes the bank */
  char absent[300];
  pa_bank *r = (pa_bank *)&r;
  assert_int_equal(pa_bank_load(tu_path(absent, sizeof absent, "absent.bin"), &k, &r), PA_ENOTFOUND);
  assert_null(r);
  assert_non_null(strstr(pa_errmsg(), absent));
  /* saving under a key that does not describe the bank */
  x = k;
  x.system = "Another.";
  char other[300];
  assert_int_equal(pa_bank_save(b, tu_path(other, sizeof other, "other.bin"), &x), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "system prompt"));
  assert_int_equal(access(other, F_OK), -1);
  x = k;
  x.tokens[5] ^= 1;
  assert_int_equal(pa_bank_save(b, other, &x), PA_EINVAL);
  x = k;
  x.model[0] = '\0';
  assert_int_equal(pa_bank_save(b, other, &x), PA_EINVAL);
  assert_int_equal(access(other, F_OK), -1);
  pa_bank_destroy(b);
}

static void write_variant(const char *path, const void *p, size_t n) { tu_write(path, p, n); }

/* Replaces the trailing SHA-256 by that of the content before it. */
static void reseal(unsigned char *f, size_t len) {
  unsigned char md[32];
  unsigned mdlen;
  assert_int_equal(EVP_Digest(f, len - 32, md, &mdlen, EVP_sha256(), NULL), 1);
  memcpy(f + len - 32, md, 32);
}

static void test_damaged(void **s) {
  (void)s;
  pa_bank *b = compute(NULL);
  const pa_bank_key k = key_for(NULL);
  char good[300], bad[300];
  assert_int_equal(pa_bank_save(b, tu_path(good, sizeof good, "good.bin"), &k), PA_OK);
  pa_bank_destroy(b);
  tu_path(bad, sizeof bad, "bad.bin");
  size_t len;
  unsigned char *f = (unsigned char *)tu_slurp(good, &len);
  unsigned char *v = malloc(len + 16);
  assert_non_null(v);
  const size_t hlen = f[12] | f[13] << 8 | f[14] << 16 | (size_t)f[15] << 24, data = 16 + hlen;

  /* truncated anywhere */
  const size_t cuts[] = {0, 5, 8, 12, 20, 16 + hlen / 2, data, data + 100, len - 32, len - 1};
  for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
    write_variant(bad, f, cuts[i]);
    expect_refused(bad, &k, PA_EFORMAT, NEEDLES("truncated"));
  }
  /* trailing bytes */
  memcpy(v, f, len);
  memset(v + len, 0, 16);
  write_variant(bad, v, len + 16);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("trailing bytes"));
  /* not a bank: another magic, or another file altogether */
  memcpy(v, f, len);
  v[7] = 'X';
  write_variant(bad, v, len);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("not a palign activation bank"));
  static const char gguf_like[] = "GGUF\3\0\0\0 a model, not a bank, long enough to pass every size check ...";
  write_variant(bad, gguf_like, sizeof gguf_like);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("not a palign activation bank"));
  write_variant(bad, "PAL", 3);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("truncated"));
  write_variant(bad, "XY", 2);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("not a palign activation bank"));
  /* another format version */
  memcpy(v, f, len);
  v[8] = 2;
  write_variant(bad, v, len);
  expect_refused(bad, &k, PA_EUNSUPPORTED, NEEDLES("format version 2", "reads version 1"));
  /* one flipped bit: in the data, in the header, in the checksum */
  const size_t flips[] = {data, data + (len - 32 - data) / 2, len - 33, 16 + hlen / 3, len - 1};
  for (size_t i = 0; i < sizeof flips / sizeof *flips; i++) {
    memcpy(v, f, len);
    v[flips[i]] ^= 0x10;
    write_variant(bad, v, len);
    expect_refused(bad, &k, PA_EFORMAT, NEEDLES("corrupted"));
  }
  /* the weight format: a file from before it was recorded (the field blanked,
   * the header the same length) is an fp32 bank; a value that is neither is
   * refused */
  char *wf = memmem(f, len, ",\"weights\":\"fp32\"", 17);
  assert_non_null(wf);
  memcpy(v, f, len);
  memset(v + (wf - (char *)f), ' ', 17);
  reseal(v, len);
  write_variant(bad, v, len);
  pa_bank *old = NULL;
  assert_int_equal(pa_bank_load(bad, &k, &old), PA_OK);
  pa_bank_destroy(old);
  pa_bank_key k16 = k;
  k16.weights = "bf16";
  expect_refused(bad, &k16, PA_EINVAL, NEEDLES("weight format differs"));
  memcpy(v, f, len);
  memcpy(v + (wf - (char *)f) + 12, "fp16", 4);
  reseal(v, len);
  write_variant(bad, v, len);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("key.weights"));
  char name[64];
  pa_bank_file_name(k.model, "bf16", name, sizeof name);
  assert_int_equal(strlen(name), strlen("bank-0123456789abcdef-bf16.bin"));
  assert_non_null(strstr(name, "-bf16.bin"));
  pa_bank_file_name(k.model, "fp32", name, sizeof name);
  assert_null(strstr(name, "bf16"));
  /* a header length pointing past the end */
  memcpy(v, f, len);
  v[15] = 0x7f;
  write_variant(bad, v, len);
  expect_refused(bad, &k, PA_EFORMAT, NEEDLES("does not fit"));
  /* resealed (the checksum matches), but the header is wrong inside */
  char *text = malloc(hlen + 1);
  assert_non_null(text);
  memcpy(text, f + 16, hlen);
  text[hlen] = '\0';
  struct {
    const char *from, *to, *needle;
  } edits[] = {
      {"\"n_layers\":3", "\"n_layers\":4", "data.bytes does not match"},
      {"\"dims\":{", "\"dimz\":{", "lacks format"},
      {"\"version\":1", "\"version\":7", "contradicts"},
      {"\"lowercase\":false", "\"lowercase\":0", "lacks system"},
      {"\"items\":[4,", "\"items\":[\"4\",", "items[0] is not an item number"},
      {"\"items\":[4,", "\"items\":[", "lists 6 items for n_items = 7"},
      {"\"model_sha256\":\"", "\"model_sha256\":\"0", "model_sha256 is missing or not 64 hex digits"},
      {"\"format\":\"palign activation bank\"", "\"format\":\"palign activation bunk\"", "lacks format"},
      {"\"system\":\"You", "\"system\" \"You", "not valid JSON"},
  };
  for (size_t i = 0; i < sizeof edits / sizeof *edits; i++) {
    char *at = strstr(text, edits[i].from);
    if (!at)
      fail_msg("no '%s' in the header %s", edits[i].from, text);
    /* the edited header, padded again to a multiple of 64 with the data after it */
    const size_t fl = strlen(edits[i].from), tl = strlen(edits[i].to);
    const size_t jl = hlen - fl + tl, nh = (16 + jl + 63) / 64 * 64 - 16, n = 16 + nh + (len - data);
    unsigned char *e = malloc(n);
    assert_non_null(e);
    memcpy(e, f, 16);
    e[12] = (unsigned char)nh, e[13] = (unsigned char)(nh >> 8), e[14] = (unsigned char)(nh >> 16), e[15] = 0;
    memset(e + 16, ' ', nh);
    memcpy(e + 16, text, (size_t)(at - text));
    memcpy(e + 16 + (at - text), edits[i].to, tl);
    memcpy(e + 16 + (at - text) + tl, at + fl, hlen - (size_t)(at - text) - fl);
    memcpy(e + 16 + nh, f + data, len - data);
    reseal(e, n);
    write_variant(bad, e, n);
    expect_refused(bad, &k, PA_EFORMAT, NEEDLES(edits[i].needle));
    free(e);
  }
  free(text), free(v), free(f);
  /* the good file still loads */
  pa_bank *r;
  assert_int_equal(pa_bank_load(good, &k, &r), PA_OK);
  pa_bank_destroy(r);
}

static void test_load_or_compute(void **s) {
  (void)s;
  char path[300];
  tu_path(path, sizeof path, "cache.bin");
  const pa_bank_opts o = {.batch = 6};
  const pa_bank_key k = key_for(&o);
  pa_bank *a, *b;
  bool loaded = true;
  assert_int_equal(pa_bank_load_or_compute(path, &k, lm, tok(), tmpl(), inv, &o, &a, &loaded), PA_OK);
  assert_false(loaded);
  assert_int_equal(access(path, R_OK), 0);
  assert_int_equal(pa_bank_load_or_compute(path, &k, lm, tok(), tmpl(), inv, &o, &b, &loaded), PA_OK);
  assert_true(loaded);
  const pa_pas_bank v = pa_bank_view(a);
  assert_memory_equal(pa_bank_data(a), pa_bank_data(b),
                      (size_t)2 * v.n_items * v.n_layers * v.n_heads * v.head_dim * sizeof(float));
  pa_bank_destroy(a);
  pa_bank_destroy(b);
  /* a stale cache is an error, and is left as it was */
  size_t n0, n1;
  char *before = tu_slurp(path, &n0);
  const pa_bank_opts other = {.system = "Be brief."};
  const pa_bank_key ko = key_for(&other);
  pa_bank *c = (pa_bank *)&c;
  assert_int_equal(pa_bank_load_or_compute(path, &ko, lm, tok(), tmpl(), inv, &other, &c, &loaded), PA_EINVAL);
  assert_null(c);
  assert_false(loaded);
  assert_non_null(strstr(pa_errmsg(), "system prompt"));
  char *after = tu_slurp(path, &n1);
  assert_int_equal(n0, n1);
  assert_memory_equal(before, after, n0);
  free(before), free(after);
}

/* The view is what probe.h fits on. */
static void test_fit_on_view(void **s) {
  (void)s;
  pa_bank *b = compute(NULL);
  const pa_pas_bank v = pa_bank_view(b);
  const uint8_t answers[N_ITEMS] = {5, 1, 4, 2, 5, 1, 4};
  pa_pas_fit f = {0};
  assert_int_equal(pa_pas_fit_subject(&v, answers, "1", &(pa_pas_opts){.run_seed = 3, .top_k = 4}, &f), PA_OK);
  assert_int_equal(f.n_samples, 2 * N_ITEMS);
  assert_int_equal(f.n_layers, v.n_layers);
  if (f.status == PA_PAS_FITTED)
    assert_true(f.n_selected > 0);
  pa_pas_fit_free(&f);
  pa_bank_destroy(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_layout_and_values), cmocka_unit_test(test_no_share),     cmocka_unit_test(test_options),
      cmocka_unit_test(test_refusals),          cmocka_unit_test(test_fingerprints), cmocka_unit_test(test_key),
      cmocka_unit_test(test_round_trip),        cmocka_unit_test(test_mismatch),     cmocka_unit_test(test_damaged),
      cmocka_unit_test(test_load_or_compute),   cmocka_unit_test(test_fit_on_view),  cmocka_unit_test(test_cancel),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
