/* GGUF reading: every metadata type, versions, alignment, the writer, and
 * hostile files (each must give a clear error naming the file, never a crash). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gguf.h"
#include "quant.h"
#include "status.h"
#include "testutil.h"

/* ---- a byte builder for hand-made files --------------------------------- */

typedef struct {
  uint8_t *p;
  size_t n, cap;
} bb;

static void put(bb *b, const void *src, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 64;
    b->p = realloc(b->p, b->cap);
    assert_non_null(b->p);
  }
  memcpy(b->p + b->n, src, n);
  b->n += n;
}
static void u8(bb *b, uint8_t v) { put(b, &v, 1); }
static void u32(bb *b, uint32_t v) { put(b, &v, 4); }
static void u64(bb *b, uint64_t v) { put(b, &v, 8); }
static void str(bb *b, const char *s) {
  u64(b, strlen(s));
  put(b, s, strlen(s));
}
static void pad_to(bb *b, size_t align) {
  while (b->n % align)
    u8(b, 0);
}

static char path[300]; /* the file each test writes and opens */

static int setup(void **s) {
  if (tu_setup(s))
    return -1;
  tu_path(path, sizeof path, "model.gguf");
  return 0;
}

static void save(const bb *b) { tu_write(path, b->p, b->n); }

/* header + one tensor "w" of type F32 shape [ne0, ne1] at offset off */
static void one_tensor_file(bb *b, uint32_t version, uint64_t ne0, uint64_t ne1, uint32_t type, uint64_t off,
                            size_t data_bytes) {
  put(b, "GGUF", 4);
  u32(b, version);
  u64(b, 1); /* tensors */
  u64(b, 1); /* kv */
  str(b, "general.architecture");
  u32(b, PA_GGUF_STRING);
  str(b, "llama");
  str(b, "w");
  u32(b, 2);
  u64(b, ne0);
  u64(b, ne1);
  u32(b, type);
  u64(b, off);
  pad_to(b, 32);
  for (size_t i = 0; i < data_bytes; i++)
    u8(b, (uint8_t)i);
}

/* Expects opening `path` to fail with code and a message naming the file and containing `what`. */
static void expect_error(int code, const char *what) {
  pa_gguf *g = (pa_gguf *)0x1;
  pa_error_clear();
  int rc = pa_gguf_open(path, &g);
  if (rc != code)
    fail_msg("expected code %d, got %d: %s", code, rc, pa_errmsg());
  assert_null(g);
  if (!strstr(pa_errmsg(), path) || !strstr(pa_errmsg(), what))
    fail_msg("message '%s' should name %s and say '%s'", pa_errmsg(), path, what);
}

/* ---- valid files ---------------------------------------------------------- */

static void test_all_metadata_types(void **s) {
  (void)s;
  bb b = {0};
  put(&b, "GGUF", 4);
  u32(&b, 3);
  u64(&b, 0);
  u64(&b, 14);
  str(&b, "u8"), u32(&b, PA_GGUF_UINT8), u8(&b, 200);
  str(&b, "i8"), u32(&b, PA_GGUF_INT8), u8(&b, 0x80);
  str(&b, "u16"), u32(&b, PA_GGUF_UINT16), put(&b, &(uint16_t){65000}, 2);
  str(&b, "i16"), u32(&b, PA_GGUF_INT16), put(&b, &(int16_t){-30000}, 2);
  str(&b, "u32"), u32(&b, PA_GGUF_UINT32), u32(&b, 4000000000u);
  str(&b, "i32"), u32(&b, PA_GGUF_INT32), put(&b, &(int32_t){-7}, 4);
  str(&b, "f32"), u32(&b, PA_GGUF_FLOAT32), put(&b, &(float){1.5f}, 4);
  str(&b, "bool"), u32(&b, PA_GGUF_BOOL), u8(&b, 1);
  str(&b, "str"), u32(&b, PA_GGUF_STRING), str(&b, "héllo");
  str(&b, "u64"), u32(&b, PA_GGUF_UINT64), u64(&b, UINT64_MAX);
  str(&b, "i64"), u32(&b, PA_GGUF_INT64), put(&b, &(int64_t){-5000000000LL}, 8);
  str(&b, "f64"), u32(&b, PA_GGUF_FLOAT64), put(&b, &(double){-2.25}, 8);
  str(&b, "arr_i16"), u32(&b, PA_GGUF_ARRAY), u32(&b, PA_GGUF_INT16), u64(&b, 3);
  for (int16_t v = -1; v <= 1; v++)
    put(&b, &v, 2);
  str(&b, "arr_str"), u32(&b, PA_GGUF_ARRAY), u32(&b, PA_GGUF_STRING), u64(&b, 2), str(&b, "a"), str(&b, "");
  save(&b);
  free(b.p);

  pa_gguf *g;
  assert_int_equal(pa_gguf_open(path, &g), PA_OK);
  assert_int_equal(pa_gguf_version(g), 3);
  assert_int_equal(pa_gguf_n_kv(g), 14);
  assert_int_equal(pa_gguf_n_tensors(g), 0);
  int64_t v;
  double d;
  bool bo;
  pa_str st;
  assert_int_equal(pa_gguf_get_int(g, "u8", 0, 1000, &v), PA_OK), assert_int_equal(v, 200);
  assert_int_equal(pa_gguf_get_int(g, "i8", -1000, 1000, &v), PA_OK), assert_int_equal(v, -128);
  assert_int_equal(pa_gguf_get_int(g, "u16", 0, 70000, &v), PA_OK), assert_int_equal(v, 65000);
  assert_int_equal(pa_gguf_get_int(g, "i16", -40000, 0, &v), PA_OK), assert_int_equal(v, -30000);
  assert_int_equal(pa_gguf_get_int(g, "u32", 0, INT64_MAX, &v), PA_OK), assert_int_equal(v, 4000000000LL);
  assert_int_equal(pa_gguf_get_int(g, "i32", -10, 10, &v), PA_OK), assert_int_equal(v, -7);
  assert_int_equal(pa_gguf_get_int(g, "i64", INT64_MIN, 0, &v), PA_OK), assert_int_equal(v, -5000000000LL);
  assert_int_equal(pa_gguf_kv_uint(pa_gguf_find(g, "u64"), 0), UINT64_MAX);
  /* a uint64 beyond INT64_MAX is out of any int64 range */
  assert_int_equal(pa_gguf_get_int(g, "u64", 0, INT64_MAX, &v), PA_EFORMAT);
  assert_int_equal(pa_gguf_get_float(g, "f32", &d), PA_OK), assert_true(d == 1.5);
  assert_int_equal(pa_gguf_get_float(g, "f64", &d), PA_OK), assert_true(d == -2.25);
  assert_int_equal(pa_gguf_get_float(g, "i32", &d), PA_OK), assert_true(d == -7);
  assert_int_equal(pa_gguf_get_bool(g, "bool", &bo), PA_OK), assert_true(bo);
  assert_int_equal(pa_gguf_get_str(g, "str", &st), PA_OK), assert_true(pa_str_eq(st, "héllo"));
  const pa_gguf_kv *kv;
  assert_int_equal(pa_gguf_get_arr(g, "arr_i16", PA_GGUF_INT32, &kv), PA_OK);
  assert_int_equal(kv->n, 3);
  assert_int_equal(pa_gguf_kv_int(kv, 0), -1);
  assert_int_equal(pa_gguf_kv_int(kv, 2), 1);
  assert_int_equal(pa_gguf_get_arr(g, "arr_str", PA_GGUF_STRING, &kv), PA_OK);
  assert_true(pa_str_eq(kv->strs[0], "a") && pa_str_eq(kv->strs[1], ""));
  /* wrong types and ranges name the file and the key */
  assert_int_equal(pa_gguf_get_int(g, "u8", 0, 100, &v), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), "'u8'"));
  assert_int_equal(pa_gguf_get_str(g, "u8", &st), PA_EFORMAT);
  assert_int_equal(pa_gguf_get_bool(g, "str", &bo), PA_EFORMAT);
  assert_int_equal(pa_gguf_get_arr(g, "arr_str", PA_GGUF_FLOAT32, &kv), PA_EFORMAT);
  assert_int_equal(pa_gguf_get_int(g, "absent", 0, 1, &v), PA_ENOTFOUND);
  assert_non_null(strstr(pa_errmsg(), path));
  assert_non_null(strstr(pa_errmsg(), "'absent'"));
  pa_gguf_close(g);
}

static void test_version2_and_tensor_data(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 2, 4, 3, PA_F32, 0, 48);
  save(&b);
  free(b.p);
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(path, &g), PA_OK);
  assert_int_equal(pa_gguf_version(g), 2);
  const pa_gguf_tensor *t = pa_gguf_find_tensor(g, "w");
  assert_non_null(t);
  assert_int_equal(t->n_dims, 2);
  assert_int_equal(t->ne[0], 4);
  assert_int_equal(t->ne[1], 3);
  assert_int_equal(t->ne[2], 1);
  assert_int_equal(t->nbytes, 48);
  assert_int_equal(((const uint8_t *)t->data)[5], 5);
  assert_int_equal(pa_gguf_data_offset(g) % 32, 0);
  assert_null(pa_gguf_find_tensor(g, "x"));
  pa_gguf_close(g);
}

static void test_custom_alignment(void **s) {
  (void)s;
  bb b = {0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 2), u64(&b, 1);
  str(&b, "general.alignment"), u32(&b, PA_GGUF_UINT32), u32(&b, 64);
  str(&b, "a"), u32(&b, 1), u64(&b, 8), u32(&b, PA_F32), u64(&b, 0);
  str(&b, "b"), u32(&b, 1), u64(&b, 8), u32(&b, PA_F32), u64(&b, 64);
  pad_to(&b, 64);
  for (int i = 0; i < 128; i++)
    u8(&b, (uint8_t)i);
  save(&b);
  pa_gguf *g;
  assert_int_equal(pa_gguf_open(path, &g), PA_OK);
  assert_int_equal(pa_gguf_alignment(g), 64);
  assert_int_equal(pa_gguf_data_offset(g) % 64, 0);
  assert_int_equal(((const uint8_t *)pa_gguf_find_tensor(g, "b")->data)[0], 64);
  pa_gguf_close(g);
  free(b.p);
  /* an offset of 32 is misaligned under alignment 64 */
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 1), u64(&b, 1);
  str(&b, "general.alignment"), u32(&b, PA_GGUF_UINT32), u32(&b, 64);
  str(&b, "a"), u32(&b, 1), u64(&b, 8), u32(&b, PA_F32), u64(&b, 32);
  pad_to(&b, 64);
  for (int i = 0; i < 128; i++)
    u8(&b, 0);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "not a multiple of the alignment");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1);
  str(&b, "general.alignment"), u32(&b, PA_GGUF_UINT32), u32(&b, 48);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "power of two");
}

static void test_writer_round_trip(void **s) {
  (void)s;
  pa_gguf_writer *w;
  assert_int_equal(pa_gguf_writer_create(&w), PA_OK);
  const char *toks[] = {"a", "b c", "<|x|>"};
  const float sc[] = {0.5f, -1.0f, 2.0f};
  const int32_t ty[] = {1, 1, 3};
  assert_int_equal(pa_gguf_set_str(w, "general.architecture", "llama"), PA_OK);
  assert_int_equal(pa_gguf_set_u32(w, "llama.block_count", 2), PA_OK);
  assert_int_equal(pa_gguf_set_i32(w, "i", -3), PA_OK);
  assert_int_equal(pa_gguf_set_f32(w, "f", 0.25f), PA_OK);
  assert_int_equal(pa_gguf_set_bool(w, "b", true), PA_OK);
  assert_int_equal(pa_gguf_set_arr_str(w, "toks", toks, 3), PA_OK);
  assert_int_equal(pa_gguf_set_arr_f32(w, "scores", sc, 3), PA_OK);
  assert_int_equal(pa_gguf_set_arr_i32(w, "types", ty, 3), PA_OK);
  float data[3 * 32];
  for (int i = 0; i < 96; i++)
    data[i] = (float)i;
  uint16_t half[5] = {0x3c00, 0, 0, 0, 0xc000};
  assert_int_equal(pa_gguf_add_tensor(w, "m", PA_F32, 2, (uint64_t[]){32, 3}, data), PA_OK);
  assert_int_equal(pa_gguf_add_tensor(w, "h", PA_F16, 1, (uint64_t[]){5}, half), PA_OK);
  assert_int_equal(pa_gguf_add_tensor(w, "bad", PA_Q4_0, 1, (uint64_t[]){5}, half), PA_EFORMAT);
  assert_int_equal(pa_gguf_writer_write(w, path), PA_OK);
  pa_gguf_writer_destroy(w);

  pa_gguf *g;
  assert_int_equal(pa_gguf_open(path, &g), PA_OK);
  const pa_gguf_kv *kv;
  assert_int_equal(pa_gguf_get_arr(g, "toks", PA_GGUF_STRING, &kv), PA_OK);
  assert_true(pa_str_eq(kv->strs[1], "b c"));
  assert_int_equal(pa_gguf_get_arr(g, "scores", PA_GGUF_FLOAT32, &kv), PA_OK);
  assert_true(pa_gguf_kv_float(kv, 1) == -1.0);
  assert_int_equal(pa_gguf_get_arr(g, "types", PA_GGUF_INT32, &kv), PA_OK);
  assert_int_equal(pa_gguf_kv_int(kv, 2), 3);
  const pa_gguf_tensor *t = pa_gguf_find_tensor(g, "m");
  assert_memory_equal(t->data, data, sizeof data);
  assert_int_equal(t->ne[0], 32);
  assert_int_equal(t->ne[1], 3);
  t = pa_gguf_find_tensor(g, "h");
  float out[5];
  assert_int_equal(pa_dequantize(t->type, t->data, out, 5), PA_OK);
  assert_true(out[0] == 1.0f && out[4] == -2.0f);
  assert_int_equal(((uintptr_t)t->data - (uintptr_t)pa_gguf_tensor_at(g, 0)->data) % 32, 0);
  pa_gguf_close(g);
}

/* ---- hostile files ------------------------------------------------------------ */

static void test_wrong_magic(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 3, 4, 3, PA_F32, 0, 48);
  memcpy(b.p, "GGML", 4);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "not a GGUF file");
}

static void test_versions(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 1, 4, 3, PA_F32, 0, 48);
  save(&b);
  expect_error(PA_EUNSUPPORTED, "version 1");
  uint32_t v = 7;
  memcpy(b.p + 4, &v, 4);
  save(&b);
  expect_error(PA_EUNSUPPORTED, "unknown GGUF version 7");
  v = 0x03000000; /* version 3 written big-endian */
  memcpy(b.p + 4, &v, 4);
  save(&b);
  expect_error(PA_EUNSUPPORTED, "big-endian");
  free(b.p);
}

/* Every proper prefix of a valid file is refused cleanly. */
static void test_every_truncation(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 3, 8, 2, PA_F32, 0, 64);
  for (size_t len = 0; len < b.n; len++) {
    bb t = {.p = b.p, .n = len};
    save(&t);
    pa_gguf *g;
    int rc = pa_gguf_open(path, &g);
    if (rc != PA_EFORMAT)
      fail_msg("prefix of %zu bytes: code %d (%s)", len, rc, pa_errmsg());
    assert_non_null(strstr(pa_errmsg(), path));
  }
  free(b.p);
}

static void test_tensor_past_end(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 3, 4, 3, PA_F32, 0, 47); /* one byte short */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "runs past the end");
  b = (bb){0};
  one_tensor_file(&b, 3, 4, 3, PA_F32, 64, 48); /* offset beyond the data */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "runs past the end");
  b = (bb){0};
  one_tensor_file(&b, 3, 4, 3, PA_F32, UINT64_MAX - 31, 48); /* offset + size overflows */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "runs past the end");
}

static void test_absurd_dimensions(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 3, 1ULL << 40, 1ULL << 40, PA_F32, 0, 48); /* count overflows int64 */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "absurd dimension");
  b = (bb){0};
  one_tensor_file(&b, 3, 1ULL << 62, 1, PA_F32, 0, 48); /* 2^64 bytes overflow */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "overflows");
  b = (bb){0};
  one_tensor_file(&b, 3, 0, 3, PA_F32, 0, 48);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "absurd dimension");
  b = (bb){0};
  one_tensor_file(&b, 3, 4, 3, PA_F32, 0, 48);
  uint32_t nd = 5; /* the dimension count sits after magic, version, counts, the kv and the name */
  size_t at = 4 + 4 + 8 + 8 + (8 + 20) + 4 + (8 + 5) + (8 + 1);
  memcpy(b.p + at, &nd, 4);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "5 dimensions");
  b = (bb){0};
  one_tensor_file(&b, 3, 48, 1, PA_Q4_0, 0, 48); /* 48 is not a multiple of Q4_0's 32 */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "block size");
}

static void test_unknown_type(void **s) {
  (void)s;
  bb b = {0};
  one_tensor_file(&b, 3, 4, 3, 4 /* removed from GGML */, 0, 48);
  save(&b);
  free(b.p);
  expect_error(PA_EUNSUPPORTED, "unknown type id 4");
  b = (bb){0};
  one_tensor_file(&b, 3, 4, 3, 0xdeadbeef, 0, 48);
  save(&b);
  free(b.p);
  expect_error(PA_EUNSUPPORTED, "unknown type");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1);
  str(&b, "k"), u32(&b, 13); /* invalid metadata type */
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "invalid type 13");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1);
  str(&b, "nested"), u32(&b, PA_GGUF_ARRAY), u32(&b, PA_GGUF_ARRAY), u64(&b, 0);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "array of arrays");
}

static void test_absurd_counts(void **s) {
  (void)s;
  bb b = {0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1ULL << 60);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "more than the file can hold");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1);
  str(&b, "toks"), u32(&b, PA_GGUF_ARRAY), u32(&b, PA_GGUF_STRING), u64(&b, 1ULL << 62);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "cannot fit");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1);
  str(&b, "arr"), u32(&b, PA_GGUF_ARRAY), u32(&b, PA_GGUF_UINT64), u64(&b, 1ULL << 62);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "run past the end");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 1);
  u64(&b, UINT64_MAX); /* key length */
  u64(&b, 0);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "truncated");
}

static void test_duplicates(void **s) {
  (void)s;
  bb b = {0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 0), u64(&b, 2);
  str(&b, "k"), u32(&b, PA_GGUF_UINT8), u8(&b, 1);
  str(&b, "k"), u32(&b, PA_GGUF_UINT8), u8(&b, 2);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "'k' appears twice");
  b = (bb){0};
  put(&b, "GGUF", 4), u32(&b, 3), u64(&b, 2), u64(&b, 0);
  str(&b, "t"), u32(&b, 1), u64(&b, 8), u32(&b, PA_F32), u64(&b, 0);
  str(&b, "t"), u32(&b, 1), u64(&b, 8), u32(&b, PA_F32), u64(&b, 32);
  pad_to(&b, 32);
  for (int i = 0; i < 64; i++)
    u8(&b, 0);
  save(&b);
  free(b.p);
  expect_error(PA_EFORMAT, "'t' appears twice");
}

static void test_missing_and_directory(void **s) {
  (void)s;
  pa_gguf *g;
  assert_int_equal(pa_gguf_open("/nonexistent/palign/model.gguf", &g), PA_ENOTFOUND);
  assert_non_null(strstr(pa_errmsg(), "/nonexistent/palign/model.gguf"));
  assert_int_equal(pa_gguf_open(tu_tmp, &g), PA_EIO);
  assert_non_null(strstr(pa_errmsg(), "not a regular file"));
  pa_gguf_close(NULL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_all_metadata_types, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_version2_and_tensor_data, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_custom_alignment, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_writer_round_trip, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_wrong_magic, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_versions, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_every_truncation, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_tensor_past_end, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_absurd_dimensions, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_unknown_type, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_absurd_counts, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_duplicates, setup, tu_teardown),
      cmocka_unit_test_setup_teardown(test_missing_and_directory, setup, tu_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
