/* Dequantisation against values computed by gguf-py (tests/golden/make_quant_golden.py):
 * bit-identical, since both follow GGML's arithmetic operation for operation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"
#include "status.h"
#include "testutil.h"

static void *slurp(const char *name, size_t *len) {
  char path[512];
  snprintf(path, sizeof path, "%s/quant/%s", PALIGN_TEST_DATA, name);
  return tu_slurp(path, len);
}

static void check_type(uint32_t type) {
  char name[64];
  size_t raw_len, f32_len;
  snprintf(name, sizeof name, "%s.raw", pa_dtype_name(type));
  uint8_t *raw = slurp(name, &raw_len);
  snprintf(name, sizeof name, "%s.f32", pa_dtype_name(type));
  float *want = slurp(name, &f32_len);
  const uint64_t n = f32_len / 4;
  uint64_t bytes;
  assert_int_equal(pa_dtype_row_bytes(type, n, &bytes), PA_OK);
  assert_int_equal(bytes, raw_len);
  float *got = malloc(f32_len);
  assert_int_equal(pa_dequantize(type, raw, got, n), PA_OK);
  for (uint64_t i = 0; i < n; i++)
    if (memcmp(&got[i], &want[i], 4) != 0)
      fail_msg("%s value %llu: got %.9g want %.9g", pa_dtype_name(type), (unsigned long long)i, got[i], want[i]);
  free(got);
  free(want);
  free(raw);
}

static void test_q4_0(void **s) { (void)s; check_type(PA_Q4_0); }
static void test_q4_1(void **s) { (void)s; check_type(PA_Q4_1); }
static void test_q5_0(void **s) { (void)s; check_type(PA_Q5_0); }
static void test_q5_1(void **s) { (void)s; check_type(PA_Q5_1); }
static void test_q8_0(void **s) { (void)s; check_type(PA_Q8_0); }
static void test_q4_k(void **s) { (void)s; check_type(PA_Q4_K); }
static void test_q5_k(void **s) { (void)s; check_type(PA_Q5_K); }
static void test_q6_k(void **s) { (void)s; check_type(PA_Q6_K); }
static void test_f16(void **s) { (void)s; check_type(PA_F16); }
static void test_bf16(void **s) { (void)s; check_type(PA_BF16); }

static void test_f32_copy(void **s) {
  (void)s;
  const float src[3] = {1.5f, -0.0f, 3e-40f};
  float dst[3];
  assert_int_equal(pa_dequantize(PA_F32, src, dst, 3), PA_OK);
  assert_memory_equal(src, dst, sizeof src);
}

/* Every half converts to float and back to itself (NaNs stay NaN). */
static void test_f16_round_trip(void **s) {
  (void)s;
  for (uint32_t h = 0; h < 0x10000; h++) {
    float f = pa_f16_to_f32((uint16_t)h);
    uint16_t back = pa_f32_to_f16(f);
    if (isnan(f))
      assert_true((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
    else if (back != h)
      fail_msg("half 0x%04x -> %g -> 0x%04x", h, f, back);
  }
}

/* Rounding to nearest, ties to even, including across the subnormal boundary. */
static void test_f16_rounding(void **s) {
  (void)s;
  assert_int_equal(pa_f32_to_f16(1.0f + 0x1p-11f), 0x3c00);         /* tie, round down to even */
  assert_int_equal(pa_f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);     /* tie, round up to even */
  assert_int_equal(pa_f32_to_f16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
  assert_int_equal(pa_f32_to_f16(65504.0f), 0x7bff);
  assert_int_equal(pa_f32_to_f16(65520.0f), 0x7c00);                /* overflows to inf */
  assert_int_equal(pa_f32_to_f16(0x1p-25f), 0x0000);                /* tie to even zero */
  assert_int_equal(pa_f32_to_f16(0x1p-25f + 0x1p-30f), 0x0001);
  assert_int_equal(pa_f32_to_f16(0x1p-14f - 0x1p-25f), 0x0400);     /* rounds up into the normals */
  assert_int_equal(pa_f32_to_f16(-2.0f), 0xc000);
  assert_int_equal(pa_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);         /* tie to even */
  assert_int_equal(pa_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  assert_true(isnan(pa_bf16_to_f32(pa_f32_to_bf16(NAN))));
}

static void test_sizes_and_errors(void **s) {
  (void)s;
  uint64_t b;
  assert_int_equal(pa_dtype_row_bytes(PA_Q4_K, 512, &b), PA_OK);
  assert_int_equal(b, 288);
  assert_int_equal(pa_dtype_row_bytes(PA_Q4_K, 100, &b), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), "block"));
  assert_int_equal(pa_dtype_row_bytes(PA_F32, UINT64_MAX / 2, &b), PA_EINVAL);
  assert_int_equal(pa_dtype_row_bytes(5, 32, &b), PA_EINVAL); /* ids 4 and 5 were removed from GGML */
  assert_false(pa_dtype_known(63));
  assert_string_equal(pa_dtype_name(63), "type#63");
  float out[256];
  uint8_t zeros[292] = {0};
  assert_int_equal(pa_dequantize(PA_Q8_K, zeros, out, 256), PA_EUNSUPPORTED);
  assert_non_null(strstr(pa_errmsg(), "Q8_K"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_q4_0),  cmocka_unit_test(test_q4_1),          cmocka_unit_test(test_q5_0),
      cmocka_unit_test(test_q5_1),  cmocka_unit_test(test_q8_0),          cmocka_unit_test(test_q4_k),
      cmocka_unit_test(test_q5_k),  cmocka_unit_test(test_q6_k),          cmocka_unit_test(test_f16),
      cmocka_unit_test(test_bf16),  cmocka_unit_test(test_f32_copy),      cmocka_unit_test(test_f16_round_trip),
      cmocka_unit_test(test_f16_rounding), cmocka_unit_test(test_sizes_and_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
