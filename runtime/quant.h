/* quant.h: tensor element types (GGML's numbering) and dequantisation to fp32.
 *
 * A quantised tensor is a sequence of fixed-size blocks, each encoding
 * pa_dtype_block(t) consecutive values of one row in pa_dtype_bytes(t) bytes.
 * The dequantisers reproduce GGML's reference arithmetic operation for
 * operation (same float expressions, same order, no FMA), so results are
 * bit-identical to any faithful implementation of the format.
 */
#ifndef PALIGN_QUANT_H
#define PALIGN_QUANT_H

#include <stdbool.h>
#include <stdint.h>

typedef enum {
  PA_F32 = 0,
  PA_F16 = 1,
  PA_Q4_0 = 2,
  PA_Q4_1 = 3,
  PA_Q5_0 = 6,
  PA_Q5_1 = 7,
  PA_Q8_0 = 8,
  PA_Q8_1 = 9,
  PA_Q2_K = 10,
  PA_Q3_K = 11,
  PA_Q4_K = 12,
  PA_Q5_K = 13,
  PA_Q6_K = 14,
  PA_Q8_K = 15,
  PA_I8 = 24,
  PA_I16 = 25,
  PA_I32 = 26,
  PA_I64 = 27,
  PA_F64 = 28,
  PA_BF16 = 30,
  PA_DTYPE_LIMIT = 64, /* type ids at or above this are never valid */
} pa_dtype;

/* True for a type id whose storage size palign knows (it can bounds-check
 * and list such a tensor even where it cannot dequantise it). */
bool pa_dtype_known(uint32_t t);
/* True where pa_dequantize() handles the type. */
bool pa_dtype_can_dequantize(uint32_t t);
/* "Q4_K", or "type#N" for an unknown id (a static buffer per thread). */
const char *pa_dtype_name(uint32_t t);
/* Values per block and bytes per block; 0 for an unknown type. */
uint32_t pa_dtype_block(uint32_t t);
uint32_t pa_dtype_bytes(uint32_t t);

/* Bytes taken by n values; fails with PA_EFORMAT if n is not a multiple of the
 * block size and PA_EINVAL on overflow or an unknown type. */
int pa_dtype_row_bytes(uint32_t t, uint64_t n, uint64_t *bytes);

/* Dequantises n values (a whole number of blocks) from src to dst.
 * src may be unaligned (it usually points into an mmapped file). */
int pa_dequantize(uint32_t t, const void *src, float *dst, uint64_t n);

/* IEEE half and bfloat16 conversions (exact, subnormals, inf and NaN kept). */
float pa_f16_to_f32(uint16_t h);
uint16_t pa_f32_to_f16(float f); /* round to nearest even */
float pa_bf16_to_f32(uint16_t h);
uint16_t pa_f32_to_bf16(float f); /* round to nearest even */

#endif
