/* Tests for safetensors.c and hfdir.c: files from our writer and from the
 * reference writer (tests/golden/safetensors, made by the safetensors Python
 * package) read back exactly; every malformed file or directory is refused
 * with a non-zero code and a message that names the file. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "hfdir.h"
#include "jsonfile.h"
#include "quant.h"
#include "safetensors.h"
#include "status.h"
#include "testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A safetensors file from a JSON header and data bytes; hlen is the length
 * field to write (UINT64_MAX: the JSON's real length). */
static void write_raw(const char *path, uint64_t hlen, const char *json, const void *data, size_t data_len) {
  size_t jl = strlen(json);
  if (hlen == UINT64_MAX)
    hlen = jl;
  uint8_t *buf = malloc(8 + jl + data_len + 1);
  assert_non_null(buf);
  for (int i = 0; i < 8; i++)
    buf[i] = (uint8_t)(hlen >> (8 * i));
  memcpy(buf + 8, json, jl);
  if (data_len)
    memcpy(buf + 8 + jl, data, data_len);
  tu_write(path, buf, 8 + jl + data_len);
  free(buf);
}

static const char *base_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

static void expect_msg(const char *path, const char *what) {
  const char *msg = pa_errmsg();
  if (!strstr(msg, base_name(path)) || (what && !strstr(msg, what)))
    fail_msg("message '%s' should name '%s' and say '%s'", msg, base_name(path), what ? what : "");
}

static void expect_open_fails(const char *path, int code, const char *what) {
  pa_safetensors *st = (pa_safetensors *)1;
  pa_error_clear();
  int rc = pa_safetensors_open(path, &st);
  if (rc == 0)
    fail_msg("%s opened, but should fail with '%s'", path, what);
  assert_null(st);
  if (code)
    assert_int_equal(rc, code);
  expect_msg(path, what);
}

/* ---- valid files -------------------------------------------------------------------- */

static void test_roundtrip(void **state) {
  char p[600];
  tu_path(p, sizeof p, "rt.safetensors");
  float f32[6] = {1.5f, -2.25f, 0.0f, 3.0f, -0.125f, 1e-3f};
  uint16_t f16[4], bf16[4];
  float src16[4] = {0.5f, -1.0f, 1000.0f, 6.1035156e-05f};
  for (int i = 0; i < 4; i++) {
    f16[i] = pa_f32_to_f16(src16[i]);
    bf16[i] = pa_f32_to_bf16(src16[i]);
  }
  float scalar = 42.0f, cube[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  pa_st_tensor in[] = {
      {.name = "a.weight", .dtype = PA_F32, .n_dims = 2, .shape = {2, 3}, .data = f32},
      {.name = "half", .dtype = PA_F16, .n_dims = 1, .shape = {4}, .data = f16},
      {.name = "brain\"float\\16", .dtype = PA_BF16, .n_dims = 2, .shape = {2, 2}, .data = bf16},
      {.name = "scalar", .dtype = PA_F32, .n_dims = 0, .data = &scalar},
      {.name = "empty", .dtype = PA_F32, .n_dims = 2, .shape = {0, 3}, .data = NULL},
      {.name = "cube", .dtype = PA_F32, .n_dims = 3, .shape = {2, 2, 2}, .data = cube},
  };
  const size_t n = sizeof in / sizeof in[0];
  pa_st_meta meta[] = {{"format", "pt"}, {"note", "line\nbreak"}};
  assert_int_equal(pa_safetensors_write(p, in, n, meta, 2), 0);

  pa_safetensors *st;
  assert_int_equal(pa_safetensors_open(p, &st), 0);
  assert_string_equal(pa_safetensors_path(st), p);
  assert_int_equal(pa_safetensors_n_tensors(st), n);
  assert_null(pa_safetensors_tensor_at(st, n));
  assert_string_equal(pa_safetensors_metadata(st, "format"), "pt");
  assert_string_equal(pa_safetensors_metadata(st, "note"), "line\nbreak");
  assert_null(pa_safetensors_metadata(st, "absent"));
  for (size_t i = 0; i < n; i++) {
    const pa_st_tensor *t = pa_safetensors_tensor_at(st, i);
    assert_string_equal(t->name, in[i].name);
    assert_ptr_equal(pa_safetensors_find(st, in[i].name), t);
    assert_string_equal(t->file, p);
    assert_int_equal(t->dtype, in[i].dtype);
    assert_int_equal(t->n_dims, in[i].n_dims);
    uint64_t count = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
      assert_int_equal(t->shape[d], in[i].shape[d]);
      count *= in[i].shape[d];
    }
    for (uint32_t d = t->n_dims; d < PA_ST_MAX_DIMS; d++)
      assert_int_equal(t->shape[d], 1);
    assert_int_equal(t->n_elems, count);
    size_t es = in[i].dtype == PA_F32 ? 4 : 2;
    assert_int_equal(t->nbytes, count * es);
    if (count)
      assert_memory_equal(t->data, in[i].data, count * es);
  }
  assert_null(pa_safetensors_find(st, "missing"));
  assert_null(pa_safetensors_find(st, ""));

  /* the header is padded so the data section is 8-byte aligned */
  const pa_st_tensor *a = pa_safetensors_find(st, "a.weight");
  FILE *f = fopen(p, "rb");
  uint8_t len8[8];
  assert_int_equal(fread(len8, 1, 8, f), 8);
  fclose(f);
  assert_int_equal(len8[0] % 8, 0);

  float out[8];
  assert_int_equal(pa_st_tensor_to_f32(a, out), 0);
  assert_memory_equal(out, f32, sizeof f32);
  assert_int_equal(pa_st_tensor_to_f32(pa_safetensors_find(st, "half"), out), 0);
  for (int i = 0; i < 4; i++)
    assert_true(out[i] == src16[i]);
  assert_int_equal(pa_st_tensor_to_f32(pa_safetensors_find(st, "brain\"float\\16"), out), 0);
  for (int i = 0; i < 4; i++)
    assert_true(out[i] == pa_bf16_to_f32(pa_f32_to_bf16(src16[i])));
  assert_int_equal(pa_st_tensor_to_f32(pa_safetensors_find(st, "scalar"), out), 0);
  assert_true(out[0] == 42.0f);
  assert_int_equal(pa_st_tensor_to_f32(pa_safetensors_find(st, "empty"), out), 0);
  pa_safetensors_close(st);
  pa_safetensors_close(NULL);

  /* the same input gives the same bytes */
  char q[600];
  tu_path(q, sizeof q, "rt2.safetensors");
  assert_int_equal(pa_safetensors_write(q, in, n, meta, 2), 0);
  pa_safetensors *s1, *s2;
  assert_int_equal(pa_safetensors_open(p, &s1), 0);
  assert_int_equal(pa_safetensors_open(q, &s2), 0);
  pa_safetensors_close(s1);
  pa_safetensors_close(s2);
  FILE *f1 = fopen(p, "rb"), *f2 = fopen(q, "rb");
  int c1, c2;
  do {
    c1 = fgetc(f1);
    c2 = fgetc(f2);
    assert_int_equal(c1, c2);
  } while (c1 != EOF);
  fclose(f1);
  fclose(f2);
}

/* Written by the safetensors package (make_safetensors_golden.py). */
static void test_reference_golden(void **state) {
  const char *p = PALIGN_TEST_DATA "/safetensors/reference.st-fixture";
  pa_safetensors *st;
  assert_int_equal(pa_safetensors_open(p, &st), 0);
  assert_int_equal(pa_safetensors_n_tensors(st), 8);
  assert_string_equal(pa_safetensors_metadata(st, "format"), "pt");
  float out[8];

  const pa_st_tensor *t = pa_safetensors_find(st, "f32");
  assert_non_null(t);
  assert_int_equal(t->dtype, PA_F32);
  assert_int_equal(t->n_dims, 2);
  assert_int_equal(t->shape[0], 2);
  assert_int_equal(t->shape[1], 3);
  assert_int_equal(pa_st_tensor_to_f32(t, out), 0);
  for (int i = 0; i < 6; i++)
    assert_true(out[i] == -1.0f + 0.5f * (float)i);

  t = pa_safetensors_find(st, "f16");
  assert_int_equal(t->dtype, PA_F16);
  assert_int_equal(pa_st_tensor_to_f32(t, out), 0);
  assert_true(out[0] == 0.5f && out[1] == -2.0f && out[2] == 65504.0f && out[3] == 0x1p-14f);

  t = pa_safetensors_find(st, "bf16");
  assert_int_equal(t->dtype, PA_BF16);
  assert_string_equal(t->dtype_name, "BF16");
  assert_int_equal(pa_st_tensor_to_f32(t, out), 0);
  assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.25f && isinf(out[3]) && out[3] > 0);

  t = pa_safetensors_find(st, "f16_3d");
  assert_int_equal(t->n_dims, 3);
  assert_int_equal(t->shape[0], 2);
  assert_int_equal(t->shape[1], 1);
  assert_int_equal(t->shape[2], 2);
  assert_int_equal(pa_st_tensor_to_f32(t, out), 0);
  for (int i = 0; i < 4; i++)
    assert_true(out[i] == (float)(i + 1));

  t = pa_safetensors_find(st, "scalar");
  assert_int_equal(t->n_dims, 0);
  assert_int_equal(t->n_elems, 1);
  assert_int_equal(pa_st_tensor_to_f32(t, out), 0);
  assert_true(out[0] == 3.25f);

  t = pa_safetensors_find(st, "empty");
  assert_int_equal(t->n_elems, 0);
  assert_int_equal(t->nbytes, 0);

  /* listed with their sizes checked, refused when their values are asked for */
  t = pa_safetensors_find(st, "i64");
  assert_int_equal(t->dtype, PA_I64);
  assert_int_equal(t->nbytes, 24);
  int64_t iv[3];
  memcpy(iv, t->data, sizeof iv);
  assert_true(iv[0] == 1 && iv[1] == -2 && iv[2] == 3);
  assert_int_equal(pa_st_tensor_to_f32(t, out), PA_EUNSUPPORTED);
  expect_msg(p, "I64");
  t = pa_safetensors_find(st, "u8");
  assert_int_equal(t->dtype, PA_ST_DTYPE_OTHER);
  assert_string_equal(t->dtype_name, "U8");
  assert_int_equal(pa_st_tensor_to_f32(t, out), PA_EUNSUPPORTED);
  expect_msg(p, "U8");
  pa_safetensors_close(st);

  assert_int_equal(pa_st_dtype_size("BF16"), 2);
  assert_int_equal(pa_st_dtype_size("F64"), 8);
  assert_int_equal(pa_st_dtype_size("BOOL"), 1);
  assert_int_equal(pa_st_dtype_size("F12"), 0);
}

static void test_writer_refuses(void **state) {
  char p[600];
  tu_path(p, sizeof p, "w.safetensors");
  float v[2] = {1, 2};
  pa_st_tensor dup[] = {
      {.name = "x", .dtype = PA_F32, .n_dims = 1, .shape = {2}, .data = v},
      {.name = "x", .dtype = PA_F32, .n_dims = 1, .shape = {2}, .data = v},
  };
  assert_int_equal(pa_safetensors_write(p, dup, 2, NULL, 0), PA_EINVAL);
  expect_msg(p, "twice");
  pa_st_tensor q4 = {.name = "q", .dtype = PA_Q4_0, .n_dims = 1, .shape = {32}, .data = v};
  assert_int_equal(pa_safetensors_write(p, &q4, 1, NULL, 0), PA_EINVAL);
  expect_msg(p, "dtype");
  pa_st_tensor meta = {.name = "__metadata__", .dtype = PA_F32, .n_dims = 1, .shape = {2}, .data = v};
  assert_int_equal(pa_safetensors_write(p, &meta, 1, NULL, 0), PA_EINVAL);
  pa_st_tensor nodata = {.name = "nd", .dtype = PA_F32, .n_dims = 1, .shape = {2}, .data = NULL};
  assert_int_equal(pa_safetensors_write(p, &nodata, 1, NULL, 0), PA_EINVAL);
  pa_st_tensor huge = {.name = "h", .dtype = PA_F32, .n_dims = 3, .shape = {1u << 30, 1u << 30, 1u << 30}, .data = v};
  assert_int_equal(pa_safetensors_write(p, &huge, 1, NULL, 0), PA_EINVAL);
  assert_int_equal(access(p, F_OK), -1);

  char bad[600];
  tu_path(bad, sizeof bad, "no/such/dir/x.safetensors");
  pa_st_tensor ok = {.name = "x", .dtype = PA_F32, .n_dims = 1, .shape = {2}, .data = v};
  assert_int_equal(pa_safetensors_write(bad, &ok, 1, NULL, 0), PA_EIO);
  expect_msg(bad, "cannot create");

  /* no tensors at all is a valid file */
  assert_int_equal(pa_safetensors_write(p, NULL, 0, NULL, 0), 0);
  pa_safetensors *st;
  assert_int_equal(pa_safetensors_open(p, &st), 0);
  assert_int_equal(pa_safetensors_n_tensors(st), 0);
  assert_null(pa_safetensors_find(st, "x"));
  pa_safetensors_close(st);
}

/* ---- malformed files ----------------------------------------------------------------- */

static void test_truncated(void **state) {
  char p[600];
  tu_path(p, sizeof p, "empty.safetensors");
  tu_write(p, "", 0);
  expect_open_fails(p, PA_EFORMAT, "truncated");
  tu_path(p, sizeof p, "five.safetensors");
  tu_write(p, "\x10\0\0\0\0", 5);
  expect_open_fails(p, PA_EFORMAT, "truncated");

  /* a good file cut short in its data */
  char good[600];
  tu_path(good, sizeof good, "cut.safetensors");
  float v[16] = {0};
  pa_st_tensor t = {.name = "w", .dtype = PA_F32, .n_dims = 2, .shape = {4, 4}, .data = v};
  assert_int_equal(pa_safetensors_write(good, &t, 1, NULL, 0), 0);
  assert_int_equal(truncate(good, 8 + 64), 0);
  expect_open_fails(good, PA_EFORMAT, "past the end");
  /* and cut inside its header */
  assert_int_equal(truncate(good, 20), 0);
  expect_open_fails(good, PA_EFORMAT, "truncated");

  expect_open_fails(tu_path(p, sizeof p, "does-not-exist.safetensors"), PA_ENOTFOUND, "cannot open");
  expect_open_fails(tu_tmp, PA_EIO, "not a regular file");
}

static void test_header_length(void **state) {
  char p[600];
  tu_path(p, sizeof p, "hlen.safetensors");
  write_raw(p, 1000, "{}", NULL, 0);
  expect_open_fails(p, PA_EFORMAT, "runs past the end");
  write_raw(p, (uint64_t)1 << 40, "{}", NULL, 0);
  expect_open_fails(p, PA_EFORMAT, "absurd");
  write_raw(p, UINT64_MAX - 1, "{}", NULL, 0);
  expect_open_fails(p, PA_EFORMAT, "absurd");
  write_raw(p, 0, "{}", NULL, 0);
  expect_open_fails(p, PA_EFORMAT, "JSON object");
}

typedef struct {
  const char *json;
  size_t data_len;
  int code;
  const char *what;
} bad_case;

static void test_bad_headers(void **state) {
  static const bad_case cases[] = {
      {"{\"a\": {", 0, PA_EFORMAT, "not valid JSON"},
      {"[1, 2]", 0, PA_EFORMAT, "JSON object"},
      {"{} xyz", 0, PA_EFORMAT, "unexpected bytes"},
      {"{\"a\": 5}", 0, PA_EFORMAT, "not a JSON object"},
      {"{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT, "\"dtype\" is missing"},
      {"{\"a\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT, "not a string"},
      {"{\"a\": {\"dtype\": \"F12\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, PA_EUNSUPPORTED,
       "unknown dtype 'F12'"},
      {"{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT, "\"shape\" is missing"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT, "not an array"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT,
       "not a non-negative integer"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT,
       "not a non-negative integer"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [\"1\"], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT,
       "not a non-negative integer"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1e300], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT,
       "not a non-negative integer"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4, PA_EUNSUPPORTED,
       "9 dimensions"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 4294967296], \"data_offsets\": [0, 4]}}", 4,
       PA_EFORMAT, "overflows"},
      {"{\"a\": {\"dtype\": \"F64\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 4]}}", 4, PA_EFORMAT,
       "overflows"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, PA_EFORMAT, "\"data_offsets\" is missing"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4, 8]}}", 8, PA_EFORMAT,
       "two non-negative integers"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, PA_EFORMAT,
       "two non-negative integers"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 1e30]}}", 4, PA_EFORMAT,
       "two non-negative integers"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 400]}}", 4, PA_EFORMAT,
       "past the end of the data section"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [9007199254740988, 9007199254740992]}}", 4,
       PA_EFORMAT, "past the end"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", 8, PA_EFORMAT, "end before"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 8, PA_EFORMAT,
       "span 4 bytes but 2 F32 values need 8"},
      {"{\"a\": {\"dtype\": \"BF16\", \"shape\": [3], \"data_offsets\": [0, 8]}}", 8, PA_EFORMAT, "need 6"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
       " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
       12, PA_EFORMAT, "overlap"},
      {"{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
       " \"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}",
       8, PA_EFORMAT, "'a' appears twice"},
      {"{\"__metadata__\": 5}", 0, PA_EFORMAT, "\"__metadata__\" is not a JSON object"},
      {"{\"__metadata__\": {\"format\": 1}}", 0, PA_EFORMAT, "not a string"},
      {"{\"__metadata__\": {}, \"__metadata__\": {}}", 0, PA_EFORMAT, "twice"},
  };
  uint8_t zeros[16] = {0};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char name[64], p[600];
    snprintf(name, sizeof name, "bad%02zu.safetensors", i);
    tu_path(p, sizeof p, name);
    write_raw(p, UINT64_MAX, cases[i].json, zeros, cases[i].data_len);
    expect_open_fails(p, cases[i].code, cases[i].what);
  }

  /* the same shapes, well-formed, open: the cases above fail for their reason */
  char p[600];
  tu_path(p, sizeof p, "ok.safetensors");
  write_raw(p, UINT64_MAX,
            "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
            " \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 16]},"
            " \"z\": {\"dtype\": \"F32\", \"shape\": [0, 7], \"data_offsets\": [8, 8]},"
            " \"__metadata__\": {\"format\": \"pt\"}}   ",
            zeros, 16);
  pa_safetensors *st;
  assert_int_equal(pa_safetensors_open(p, &st), 0);
  assert_int_equal(pa_safetensors_n_tensors(st), 3);
  assert_string_equal(pa_safetensors_tensor_at(st, 2)->name, "z");
  pa_safetensors_close(st);
}

/* ---- Hugging Face directories ------------------------------------------------------------ */

static const char config_text[] = "{\"model_type\": \"llama\", \"hidden_size\": 8}\n";

static void make_dir(const char *dir) { assert_int_equal(mkdir(dir, 0777), 0); }

static void put(const char *dir, const char *name, const char *text) {
  char p[800];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  tu_write_text(p, text);
}

static float wvals[8] = {1, 2, 3, 4, 5, 6, 7, 8};

static void put_shard(const char *dir, const char *name, const char *const *tensors, size_t n) {
  char p[800];
  snprintf(p, sizeof p, "%s/%s", dir, name);
  pa_st_tensor t[8];
  for (size_t i = 0; i < n; i++)
    t[i] = (pa_st_tensor){.name = tensors[i], .dtype = PA_F32, .n_dims = 2, .shape = {2, 4}, .data = wvals};
  assert_int_equal(pa_safetensors_write(p, t, n, NULL, 0), 0);
}

/* config.json, tokenizer.json, a tokenizer_config.json; weights up to the caller */
static void make_base(const char *dir) {
  make_dir(dir);
  put(dir, "config.json", config_text);
  put(dir, "tokenizer.json", "{}");
  put(dir, "tokenizer_config.json",
      "{\"bos_token\": \"<s>\", \"eos_token\": {\"__type\": \"AddedToken\", \"content\": \"</s>\"},"
      " \"chat_template\": \"{{ messages }}\"}");
}

static const char *new_dir(char *buf, size_t n, const char *name) {
  tu_path(buf, n, name);
  make_base(buf);
  return buf;
}

static void expect_hf_fails(const char *dir, int code, const char *names, const char *what) {
  pa_hfdir *h = (pa_hfdir *)1;
  pa_error_clear();
  int rc = pa_hfdir_open(dir, &h);
  if (rc == 0)
    fail_msg("%s opened, but should fail with '%s'", dir, what);
  assert_null(h);
  if (code)
    assert_int_equal(rc, code);
  const char *msg = pa_errmsg();
  if (!strstr(msg, names) || (what && !strstr(msg, what)))
    fail_msg("message '%s' should name '%s' and say '%s'", msg, names, what ? what : "");
}

static void test_hfdir_single(void **state) {
  char d[600];
  new_dir(d, sizeof d, "single");
  static const char *const names[] = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
  put_shard(d, "model.safetensors", names, 3);

  char slash[700];
  snprintf(slash, sizeof slash, "%s//", d);
  pa_hfdir *h;
  assert_int_equal(pa_hfdir_open(slash, &h), 0);
  assert_string_equal(pa_hfdir_path(h), d);
  const cJSON *cfg = pa_hfdir_config(h);
  assert_true(cJSON_IsObject(cfg));
  assert_int_equal(cJSON_GetObjectItemCaseSensitive(cfg, "hidden_size")->valueint, 8);
  assert_non_null(strstr(pa_hfdir_config_path(h), "single/config.json"));
  assert_int_equal(pa_hfdir_n_shards(h), 1);
  assert_int_equal(pa_hfdir_n_tensors(h), 3);
  for (size_t i = 0; i < 3; i++) {
    const pa_st_tensor *t = pa_hfdir_tensor_at(h, i);
    assert_string_equal(t->name, names[i]);
    assert_ptr_equal(pa_hfdir_find_tensor(h, names[i]), t);
    assert_non_null(strstr(t->file, "single/model.safetensors"));
  }
  assert_null(pa_hfdir_tensor_at(h, 3));
  assert_null(pa_hfdir_find_tensor(h, "nope"));
  assert_non_null(strstr(pa_hfdir_tokenizer_json_path(h), "single/tokenizer.json"));
  assert_non_null(strstr(pa_hfdir_tokenizer_config_path(h), "single/tokenizer_config.json"));
  assert_non_null(pa_hfdir_tokenizer_config(h));
  assert_string_equal(pa_hfdir_chat_template(h), "{{ messages }}");
  assert_string_equal(pa_hfdir_bos_token(h), "<s>");
  assert_string_equal(pa_hfdir_eos_token(h), "</s>");
  pa_hfdir_close(h);
  pa_hfdir_close(NULL);
}

static void test_hfdir_sharded(void **state) {
  char d[600];
  new_dir(d, sizeof d, "sharded");
  static const char *const s1[] = {"a", "b"}, *const s2[] = {"c", "stray"};
  put_shard(d, "model-00001-of-00002.safetensors", s1, 2);
  put_shard(d, "model-00002-of-00002.safetensors", s2, 2);
  put(d, "model.safetensors.index.json",
      "{\"metadata\": {\"total_size\": 96}, \"weight_map\": {\"c\": \"model-00002-of-00002.safetensors\","
      " \"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00001-of-00002.safetensors\"}}");
  /* no tokenizer_config.json here: it is optional */
  char p[800];
  snprintf(p, sizeof p, "%s/tokenizer_config.json", d);
  unlink(p);
  pa_hfdir *h;
  assert_int_equal(pa_hfdir_open(d, &h), 0);
  assert_int_equal(pa_hfdir_n_shards(h), 2);
  assert_int_equal(pa_hfdir_n_tensors(h), 3); /* "stray" is not in the index */
  assert_string_equal(pa_hfdir_tensor_at(h, 0)->name, "c");
  assert_string_equal(pa_hfdir_tensor_at(h, 1)->name, "a");
  assert_non_null(strstr(pa_hfdir_find_tensor(h, "c")->file, "model-00002-of-00002"));
  assert_non_null(strstr(pa_hfdir_find_tensor(h, "b")->file, "model-00001-of-00002"));
  assert_null(pa_hfdir_find_tensor(h, "stray"));
  float out[8];
  assert_int_equal(pa_st_tensor_to_f32(pa_hfdir_find_tensor(h, "c"), out), 0);
  assert_memory_equal(out, wvals, sizeof out);
  assert_null(pa_hfdir_tokenizer_config_path(h));
  assert_null(pa_hfdir_tokenizer_config(h));
  assert_null(pa_hfdir_chat_template(h));
  assert_null(pa_hfdir_bos_token(h));
  pa_hfdir_close(h);
}

static void test_hfdir_bad_shards(void **state) {
  static const char *const s1[] = {"a"};
  char d[600];
  /* a shard the index names is missing */
  new_dir(d, sizeof d, "missing");
  put_shard(d, "model-00001-of-00002.safetensors", s1, 1);
  put(d, "model.safetensors.index.json",
      "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", \"b\": \"model-00002-of-00002.safetensors\"}}");
  expect_hf_fails(d, PA_ENOTFOUND, "model.safetensors.index.json", "model-00002-of-00002.safetensors");

  /* names that would leave the directory */
  static const char *const evil[] = {"../evil.safetensors", "sub/x.safetensors", "..", "",
                                     "/etc/passwd",         "a\\\\b.safetensors"};
  for (size_t i = 0; i < sizeof evil / sizeof evil[0]; i++) {
    char name[32], index[256];
    snprintf(name, sizeof name, "evil%zu", i);
    new_dir(d, sizeof d, name);
    put_shard(d, "model-00001-of-00001.safetensors", s1, 1);
    snprintf(index, sizeof index, "{\"weight_map\": {\"a\": \"%s\"}}", evil[i]);
    put(d, "model.safetensors.index.json", index);
    expect_hf_fails(d, PA_EFORMAT, "model.safetensors.index.json", "not a plain file name");
  }

  /* a tensor the index places in a shard that does not have it */
  new_dir(d, sizeof d, "notinshard");
  put_shard(d, "model-00001-of-00001.safetensors", s1, 1);
  put(d, "model.safetensors.index.json",
      "{\"weight_map\": {\"a\": \"model-00001-of-00001.safetensors\", \"zz\": \"model-00001-of-00001.safetensors\"}}");
  expect_hf_fails(d, PA_EFORMAT, "model.safetensors.index.json", "'zz' is listed in shard");

  /* a broken shard: the message names the index and the shard file */
  new_dir(d, sizeof d, "badshard");
  put(d, "model-00001-of-00001.safetensors", "garbage!");
  put(d, "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"model-00001-of-00001.safetensors\"}}");
  expect_hf_fails(d, PA_EFORMAT, "model-00001-of-00001.safetensors", "index.json: shard");

  static const struct {
    const char *index, *what;
  } bad_index[] = {
      {"{\"weight_map\": ", "not valid JSON"},
      {"[]", "not a JSON object"},
      {"{\"metadata\": {}}", "\"weight_map\" is missing"},
      {"{\"weight_map\": []}", "not a JSON object"},
      {"{\"weight_map\": {}}", "lists no tensors"},
      {"{\"weight_map\": {\"a\": 7}}", "not a file name string"},
      {"{\"weight_map\": {\"a\": \"model-00001-of-00001.safetensors\", \"a\": \"model-00001-of-00001.safetensors\"}}",
       "'a' is listed twice"},
  };
  for (size_t i = 0; i < sizeof bad_index / sizeof bad_index[0]; i++) {
    char name[32];
    snprintf(name, sizeof name, "badindex%zu", i);
    new_dir(d, sizeof d, name);
    put_shard(d, "model-00001-of-00001.safetensors", s1, 1);
    put(d, "model.safetensors.index.json", bad_index[i].index);
    expect_hf_fails(d, PA_EFORMAT, "model.safetensors.index.json", bad_index[i].what);
  }
}

static void test_hfdir_bad_files(void **state) {
  static const char *const s1[] = {"a"};
  char d[600], p[800];

  new_dir(d, sizeof d, "badconfig");
  put_shard(d, "model.safetensors", s1, 1);
  put(d, "config.json", "{\"hidden_size\": 8,\n \"oops\" }");
  expect_hf_fails(d, PA_EFORMAT, "badconfig/config.json", "not valid JSON (syntax error at line 2");
  put(d, "config.json", "this is not JSON");
  expect_hf_fails(d, PA_EFORMAT, "badconfig/config.json", "not valid JSON");
  put(d, "config.json", "");
  expect_hf_fails(d, PA_EFORMAT, "config.json", "not valid JSON");
  put(d, "config.json", "{} {}");
  expect_hf_fails(d, PA_EFORMAT, "config.json", "unexpected text after the value");
  put(d, "config.json", "[1, 2, 3]");
  expect_hf_fails(d, PA_EFORMAT, "config.json", "not a JSON object");
  snprintf(p, sizeof p, "%s/config.json", d);
  unlink(p);
  expect_hf_fails(d, PA_ENOTFOUND, "config.json", "cannot open");

  new_dir(d, sizeof d, "notok");
  put_shard(d, "model.safetensors", s1, 1);
  snprintf(p, sizeof p, "%s/tokenizer.json", d);
  unlink(p);
  expect_hf_fails(d, PA_ENOTFOUND, "notok", "tokenizer.json is missing");

  new_dir(d, sizeof d, "badtokcfg");
  put_shard(d, "model.safetensors", s1, 1);
  put(d, "tokenizer_config.json", "{\"bos_token\": ");
  expect_hf_fails(d, PA_EFORMAT, "tokenizer_config.json", "not valid JSON");
  put(d, "tokenizer_config.json", "{\"bos_token\": 5}");
  expect_hf_fails(d, PA_EFORMAT, "tokenizer_config.json", "\"bos_token\"");
  put(d, "tokenizer_config.json", "{\"eos_token\": {\"content\": null}}");
  expect_hf_fails(d, PA_EFORMAT, "tokenizer_config.json", "\"eos_token\"");
  put(d, "tokenizer_config.json", "{\"chat_template\": 3}");
  expect_hf_fails(d, PA_EFORMAT, "tokenizer_config.json", "chat_template");
  put(d, "tokenizer_config.json", "{\"chat_template\": [{\"name\": \"tool_use\", \"template\": \"x\"}]}");
  expect_hf_fails(d, PA_EFORMAT, "tokenizer_config.json", "no \"default\"");

  new_dir(d, sizeof d, "noweights");
  expect_hf_fails(d, PA_ENOTFOUND, "noweights", "no model.safetensors");
  put(d, "pytorch_model.bin", "x");
  expect_hf_fails(d, PA_ENOTFOUND, "noweights", "pytorch_model.bin");

  new_dir(d, sizeof d, "badweights");
  snprintf(p, sizeof p, "%s/model.safetensors", d);
  tu_write(p, "\x40\0\0\0\0\0\0\0{}", 10);
  expect_hf_fails(d, PA_EFORMAT, "badweights/model.safetensors", "runs past the end");

  expect_hf_fails(tu_path(d, sizeof d, "no-such-dir"), PA_ENOTFOUND, "no-such-dir", "cannot open");
  char f[600];
  tu_path(f, sizeof f, "plainfile");
  tu_write_text(f, "x");
  expect_hf_fails(f, PA_EINVAL, "plainfile", "not a directory");
}

static void test_hfdir_templates(void **state) {
  static const char *const s1[] = {"a"};
  char d[600];
  new_dir(d, sizeof d, "tmpl_list");
  put_shard(d, "model.safetensors", s1, 1);
  put(d, "tokenizer_config.json",
      "{\"bos_token\": null, \"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"},"
      " {\"name\": \"default\", \"template\": \"D\"}]}");
  pa_hfdir *h;
  assert_int_equal(pa_hfdir_open(d, &h), 0);
  assert_string_equal(pa_hfdir_chat_template(h), "D");
  assert_null(pa_hfdir_bos_token(h));
  assert_null(pa_hfdir_eos_token(h));
  pa_hfdir_close(h);

  new_dir(d, sizeof d, "tmpl_jinja");
  put_shard(d, "model.safetensors", s1, 1);
  put(d, "tokenizer_config.json", "{\"eos_token\": \"<|eot_id|>\"}");
  put(d, "chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}\n");
  assert_int_equal(pa_hfdir_open(d, &h), 0);
  assert_string_equal(pa_hfdir_chat_template(h), "{% for m in messages %}{{ m.content }}{% endfor %}\n");
  assert_string_equal(pa_hfdir_eos_token(h), "<|eot_id|>");
  pa_hfdir_close(h);

  /* model.safetensors wins over an index, as in transformers */
  new_dir(d, sizeof d, "both");
  put_shard(d, "model.safetensors", s1, 1);
  put(d, "model.safetensors.index.json", "{\"weight_map\": {\"a\": \"missing.safetensors\"}}");
  assert_int_equal(pa_hfdir_open(d, &h), 0);
  assert_int_equal(pa_hfdir_n_shards(h), 1);
  pa_hfdir_close(h);
}

static void test_load_json(void **state) {
  char p[600];
  tu_path(p, sizeof p, "x.json");
  tu_write_text(p, "{\n  \"a\": [1, 2,\n  ]\n}");
  cJSON *j = (cJSON *)1;
  assert_int_equal(pa_json_load(p, &j), PA_EFORMAT);
  assert_null(j);
  expect_msg(p, "line 3");
  tu_write_text(p, "  {\"a\": \"\\u00e9\"}\n\n");
  assert_int_equal(pa_json_load(p, &j), 0);
  assert_string_equal(cJSON_GetObjectItemCaseSensitive(j, "a")->valuestring, "\xc3\xa9");
  cJSON_Delete(j);
  assert_int_equal(pa_json_load(tu_path(p, sizeof p, "none.json"), &j), PA_ENOTFOUND);
  expect_msg(p, "cannot open");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_roundtrip),        cmocka_unit_test(test_reference_golden),
      cmocka_unit_test(test_writer_refuses),   cmocka_unit_test(test_truncated),
      cmocka_unit_test(test_header_length),    cmocka_unit_test(test_bad_headers),
      cmocka_unit_test(test_hfdir_single),     cmocka_unit_test(test_hfdir_sharded),
      cmocka_unit_test(test_hfdir_bad_shards), cmocka_unit_test(test_hfdir_bad_files),
      cmocka_unit_test(test_hfdir_templates),  cmocka_unit_test(test_load_json),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
