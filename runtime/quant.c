#include "quant.h"

#include "status.h"

#include <stdio.h>
#include <string.h>

typedef struct {
  const char *name;
  uint32_t block; /* values per block */
  uint32_t bytes; /* bytes per block */
} dtype_info;

/* Storage sizes of every GGML type id palign recognises. IQ* and other
 * codebook formats are listed so that files holding them can be inspected;
 * they are refused only when their values are needed. */
static const dtype_info dtypes[PA_DTYPE_LIMIT] = {
    [0] = {"F32", 1, 4},         [1] = {"F16", 1, 2},         [2] = {"Q4_0", 32, 18},
    [3] = {"Q4_1", 32, 20},      [6] = {"Q5_0", 32, 22},      [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34},      [9] = {"Q8_1", 32, 40},      [10] = {"Q2_K", 256, 84},
    [11] = {"Q3_K", 256, 110},   [12] = {"Q4_K", 256, 144},   [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210},   [15] = {"Q8_K", 256, 292},   [16] = {"IQ2_XXS", 256, 66},
    [17] = {"IQ2_XS", 256, 74},  [18] = {"IQ3_XXS", 256, 98}, [19] = {"IQ1_S", 256, 50},
    [20] = {"IQ4_NL", 32, 18},   [21] = {"IQ3_S", 256, 110},  [22] = {"IQ2_S", 256, 82},
    [23] = {"IQ4_XS", 256, 136}, [24] = {"I8", 1, 1},         [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},        [27] = {"I64", 1, 8},        [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", 256, 56},   [30] = {"BF16", 1, 2},       [34] = {"TQ1_0", 256, 54},
    [35] = {"TQ2_0", 256, 66},   [39] = {"MXFP4", 32, 17},
};

bool pa_dtype_known(uint32_t t) { return t < PA_DTYPE_LIMIT && dtypes[t].block != 0; }

bool pa_dtype_can_dequantize(uint32_t t) {
  switch (t) {
  case PA_F32: case PA_F16: case PA_BF16: case PA_Q4_0: case PA_Q4_1: case PA_Q5_0:
  case PA_Q5_1: case PA_Q8_0: case PA_Q4_K: case PA_Q5_K: case PA_Q6_K:
    return true;
  default:
    return false;
  }
}

const char *pa_dtype_name(uint32_t t) {
  static _Thread_local char buf[24];
  if (pa_dtype_known(t))
    return dtypes[t].name;
  snprintf(buf, sizeof buf, "type#%u", t);
  return buf;
}

uint32_t pa_dtype_block(uint32_t t) { return pa_dtype_known(t) ? dtypes[t].block : 0; }
uint32_t pa_dtype_bytes(uint32_t t) { return pa_dtype_known(t) ? dtypes[t].bytes : 0; }

int pa_dtype_row_bytes(uint32_t t, uint64_t n, uint64_t *bytes) {
  if (!pa_dtype_known(t))
    return pa_error(PA_EINVAL, "unknown tensor type %u", t);
  uint64_t blk = dtypes[t].block;
  if (n % blk != 0)
    return pa_error(PA_EFORMAT, "%llu values of type %s are not a whole number of %llu-value blocks",
                    (unsigned long long)n, dtypes[t].name, (unsigned long long)blk);
  uint64_t nb = n / blk;
  if (nb > UINT64_MAX / dtypes[t].bytes)
    return pa_error(PA_EINVAL, "tensor of %llu values of type %s overflows 64 bits",
                    (unsigned long long)n, dtypes[t].name);
  *bytes = nb * dtypes[t].bytes;
  return PA_OK;
}

/* ---- scalar conversions ---------------------------------------------- */

static float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static uint32_t bits_from_f32(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

float pa_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ff;
  if (exp == 0x1f) /* inf or NaN: keep the payload */
    return f32_from_bits(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0)
      return f32_from_bits(sign);
    /* subnormal half: value = man * 2^-24, exact in float */
    float v = (float)man * 0x1p-24f;
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t pa_f32_to_f16(float f) {
  uint32_t x = bits_from_f32(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) /* inf or NaN */
    return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);
  if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
    return sign | 0x7c00;
  if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
    /* scale so the half's subnormal step (2^-24) becomes 1 and round to even */
    float v = f32_from_bits(ax) * 0x1p24f;
    uint32_t m = (uint32_t)v;
    float rem = v - (float)m;
    if (rem > 0.5f || (rem == 0.5f && (m & 1)))
      m++;
    return sign | (uint16_t)m;
  }
  uint32_t man = ax & 0x7fffff;
  uint32_t exp = (ax >> 23) - 112;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1)))
    h++; /* carries into the exponent correctly */
  return sign | (uint16_t)h;
}

float pa_bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t pa_f32_to_bf16(float f) {
  uint32_t x = bits_from_f32(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet */
    return (uint16_t)((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

/* ---- block formats ----------------------------------------------------- */

static inline float rd_f16(const uint8_t *p) { return pa_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

static void deq_q4_0(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const uint8_t *qs = b + 2;
  for (int j = 0; j < 16; j++) {
    y[j] = (float)((qs[j] & 0x0f) - 8) * d;
    y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
  }
}

static void deq_q4_1(const uint8_t *b, float *y) {
  const float d = rd_f16(b), m = rd_f16(b + 2);
  const uint8_t *qs = b + 4;
  for (int j = 0; j < 16; j++) {
    y[j] = (float)(qs[j] & 0x0f) * d + m;
    y[j + 16] = (float)(qs[j] >> 4) * d + m;
  }
}

static uint32_t rd_u32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void deq_q5_0(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const uint32_t qh = rd_u32(b + 2);
  const uint8_t *qs = b + 6;
  for (int j = 0; j < 16; j++) {
    int x0 = (int)((qs[j] & 0x0f) | (((qh >> j) << 4) & 0x10)) - 16;
    int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
    y[j] = (float)x0 * d;
    y[j + 16] = (float)x1 * d;
  }
}

static void deq_q5_1(const uint8_t *b, float *y) {
  const float d = rd_f16(b), m = rd_f16(b + 2);
  const uint32_t qh = rd_u32(b + 4);
  const uint8_t *qs = b + 8;
  for (int j = 0; j < 16; j++) {
    int x0 = (int)((qs[j] & 0x0f) | (((qh >> j) << 4) & 0x10));
    int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10));
    y[j] = (float)x0 * d + m;
    y[j + 16] = (float)x1 * d + m;
  }
}

static void deq_q8_0(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const int8_t *qs = (const int8_t *)(b + 2);
  for (int j = 0; j < 32; j++)
    y[j] = (float)qs[j] * d;
}

/* The 12 scale bytes of Q4_K/Q5_K pack eight 6-bit scales and eight 6-bit mins. */
static void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
    *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

static void deq_q4_k(const uint8_t *b, float *y) {
  const float d = rd_f16(b), dmin = rd_f16(b + 2);
  const uint8_t *scales = b + 4, *q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; l++)
      *y++ = d1 * (float)(q[l] & 0x0f) - m1;
    for (int l = 0; l < 32; l++)
      *y++ = d2 * (float)(q[l] >> 4) - m2;
  }
}

static void deq_q5_k(const uint8_t *b, float *y) {
  const float d = rd_f16(b), dmin = rd_f16(b + 2);
  const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
    uint8_t sc, m;
    scale_min_k4(is, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; l++)
      *y++ = d1 * (float)((ql[l] & 0x0f) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; l++)
      *y++ = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
  }
}

static void deq_q6_k(const uint8_t *b, float *y) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t *sc = (const int8_t *)(b + 192);
  const float d = rd_f16(b + 208);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; l++) {
      const int is = l / 16;
      const int q1 = (int)((ql[l] & 0x0f) | ((qh[l] >> 0) & 3) << 4) - 32;
      const int q2 = (int)((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) - 32;
      const int q3 = (int)((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
      const int q4 = (int)((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
      y[l] = d * (float)sc[is] * (float)q1;
      y[l + 32] = d * (float)sc[is + 2] * (float)q2;
      y[l + 64] = d * (float)sc[is + 4] * (float)q3;
      y[l + 96] = d * (float)sc[is + 6] * (float)q4;
    }
  }
}

int pa_dequantize(uint32_t t, const void *src, float *dst, uint64_t n) {
  const uint8_t *s = src;
  uint64_t bytes;
  int rc = pa_dtype_row_bytes(t, n, &bytes);
  if (rc)
    return rc;
  switch (t) {
  case PA_F32:
    memcpy(dst, s, n * 4);
    return PA_OK;
  case PA_F16:
    for (uint64_t i = 0; i < n; i++)
      dst[i] = rd_f16(s + 2 * i);
    return PA_OK;
  case PA_BF16:
    for (uint64_t i = 0; i < n; i++)
      dst[i] = pa_bf16_to_f32((uint16_t)(s[2 * i] | s[2 * i + 1] << 8));
    return PA_OK;
  default:
    break;
  }
  void (*blockfn)(const uint8_t *, float *);
  switch (t) {
  case PA_Q4_0: blockfn = deq_q4_0; break;
  case PA_Q4_1: blockfn = deq_q4_1; break;
  case PA_Q5_0: blockfn = deq_q5_0; break;
  case PA_Q5_1: blockfn = deq_q5_1; break;
  case PA_Q8_0: blockfn = deq_q8_0; break;
  case PA_Q4_K: blockfn = deq_q4_k; break;
  case PA_Q5_K: blockfn = deq_q5_k; break;
  case PA_Q6_K: blockfn = deq_q6_k; break;
  default:
    return pa_error(PA_EUNSUPPORTED, "palign cannot dequantise tensors of type %s", pa_dtype_name(t));
  }
  const uint32_t blk = dtypes[t].block, bb = dtypes[t].bytes;
  for (uint64_t i = 0; i < n / blk; i++)
    blockfn(s + i * bb, dst + i * blk);
  return PA_OK;
}
