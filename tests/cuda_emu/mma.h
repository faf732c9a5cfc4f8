// mma.h: the emulation's (cuda_emu.h) warp matrix functions, nvcuda::wmma,
// in the two shapes kernels/cuda/cuda_attention.cu uses: m16n16k8 products of
// tf32 operands and m16n16k16 products of bf16 ones, accumulated in fp32.
//
// A fragment's mapping of elements to a warp's lanes is unspecified by
// CUDA, and a kernel may only treat its elements alike (fill, convert,
// scale); the emulation uses that freedom so that a lane needs no other
// lane's registers. An accumulator is spread over the warp as on a GPU:
// element e of lane l is the tile's element l + 32 e in row-major order,
// row l / 16 + 2 e, column l % 16 (num_elements 8). A lane's matrix_a
// fragment holds the 8 rows of A its accumulator elements are in (64
// elements), and its matrix_b fragment the column of B (8), where a GPU's
// lane holds 4 of each: so each lane computes its own eight sums, and a
// warp's product costs what one product costs. The m16n16k16 accumulator
// spreads its tile otherwise: element e of lane l is row l % 16, column
// l / 16 + 2 e (CUDA gives each shape its own mapping, so a kernel that
// took one shape's for the other's fails here); its matrix_a fragment
// holds the lane's row of A (16 elements), its matrix_b fragment the 8
// columns of B.
//
// mma_sync uses only the top 19 bits of each tf32 operand, as the tensor
// cores do (an operand not rounded to tf32 is truncated), and adds the
// eight (or, bf16, sixteen) products of a dot product (each exact in fp32)
// to the accumulator one by one, rounding every sum toward zero: measurements of the tensor cores
// (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021) found
// their fp32 sums truncated, not rounded to nearest, so an error that
// grows with the number of sums taken in the accumulator shows here as it
// would on a GPU. (A GPU aligns a product group's terms once and truncates
// then; truncating each sum is the coarser bound.)
//
// Checked as the CUDA programming guide requires, a failure being a kernel
// fault (cudaErrorMisalignedAddress or cudaErrorIllegalAddress) that
// every later call returns: a load's or store's pointer 256-bit aligned,
// its leading dimension a multiple of 16 bytes (4 floats, 8 bf16 values),
// and the tile inside device
// memory or the block's dynamic shared memory (a static __shared__ array,
// which cuda_attention.cu does not use for tiles, is refused). Not checked: that
// every lane of the warp makes the call with the same arguments.
#ifndef PALIGN_CUDA_EMU_MMA_H
#define PALIGN_CUDA_EMU_MMA_H

#include "cuda_emu.h"

namespace emu {
// The running thread's lane in its warp.
unsigned lane();
// Whether a warp matrix load or store may touch rows x cols elements of
// `size` bytes at p, ldm apart (rows apart in mem_row_major, columns in
// mem_col_major order): records the kernel fault and says why on standard
// error otherwise.
bool wmma_tile_ok(const char *call, const void *p, size_t size, unsigned ldm, unsigned rows, unsigned cols,
                  bool row_major);
} // namespace emu

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}
enum layout_t { mem_row_major, mem_col_major };

// Round to nearest (ties away from zero) at tf32's 10 mantissa bits, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float in) {
  uint32_t u;
  memcpy(&u, &in, sizeof u);
  if ((u & 0x7F800000u) != 0x7F800000u) // Inf and NaN stay
    u = (u + 0x1000u) & 0xFFFFE000u;
  float r;
  memcpy(&r, &u, sizeof r);
  return r;
}

template <class Use, int M, int N, int K, class T, class Layout = void> class fragment;

template <class Layout> class fragment<matrix_a, 16, 16, 8, precision::tf32, Layout> {
public:
  enum { num_elements = 8 * 8 };
  float x[num_elements]; // x[e * 8 + k] = A(lane / 16 + 2 e, k)
};
template <class Layout> class fragment<matrix_b, 16, 16, 8, precision::tf32, Layout> {
public:
  enum { num_elements = 8 };
  float x[num_elements]; // x[k] = B(k, lane % 16)
};
template <> class fragment<accumulator, 16, 16, 8, float, void> {
public:
  enum { num_elements = 16 * 16 / 32 };
  float x[num_elements]; // x[e] = C(lane / 16 + 2 e, lane % 16)
};
// bf16 operands are held widened (exactly) to fp32.
template <class Layout> class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, Layout> {
public:
  enum { num_elements = 16 };
  float x[num_elements]; // x[k] = A(lane % 16, k)
};
template <class Layout> class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, Layout> {
public:
  enum { num_elements = 8 * 16 };
  float x[num_elements]; // x[e * 16 + k] = B(k, lane / 16 + 2 e)
};
template <> class fragment<accumulator, 16, 16, 16, float, void> {
public:
  enum { num_elements = 16 * 16 / 32 };
  float x[num_elements]; // x[e] = C(lane % 16, lane / 16 + 2 e)
};

template <class F> void fill_fragment(F &f, float v) {
  for (int i = 0; i < F::num_elements; i++)
    f.x[i] = v;
}

namespace detail {
template <class L> constexpr bool is_row_major() {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "a layout is row_major or col_major");
  return std::is_same_v<L, row_major>;
}
// The tile's element (r, c) of a rows x cols tile at p.
inline float at(const float *p, unsigned ldm, bool row_major, unsigned r, unsigned c) {
  return row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}
inline float at(const __nv_bfloat16 *p, unsigned ldm, bool row_major, unsigned r, unsigned c) {
  return __bfloat162float(row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]);
}
inline float add_toward_zero(float a, float b) {
  // s + err = a + b exactly (Knuth's two-sum, in round-to-nearest fp32)
  const float s = a + b, bb = s - a, err = (a - (s - bb)) + (b - bb);
  if (err == 0.0f || (err < 0.0f) == (s < 0.0f) || isinf(s))
    return s;
  uint32_t u; // s rounded away from zero: the float one step nearer zero
  memcpy(&u, &s, sizeof u);
  u -= 1;
  float t;
  memcpy(&t, &u, sizeof t);
  return t;
}
inline float tf32_bits(float v) { // what the tensor cores read of an operand
  uint32_t u;
  memcpy(&u, &v, sizeof u);
  u &= 0xFFFFE000u;
  memcpy(&v, &u, sizeof v);
  return v;
}
// Whether a load may read its tile; if not (a fault, said and recorded), f
// is NaN: the launch has failed, and what the kernel goes on to compute is
// garbage.
template <class F, class T>
bool readable(F &f, const char *call, const T *p, unsigned ldm, unsigned rows, unsigned cols, bool row_major) {
  if (emu::wmma_tile_ok(call, p, sizeof *p, ldm, rows, cols, row_major))
    return true;
  fill_fragment(f, NAN);
  return false;
}
} // namespace detail

template <class L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 8, precision::tf32, L> &a, const float *p, unsigned ldm) {
  constexpr bool rm = detail::is_row_major<L>();
  if (!detail::readable(a, "load_matrix_sync(matrix_a)", p, ldm, 16, 8, rm))
    return;
  const unsigned r0 = emu::lane() / 16;
  for (unsigned e = 0; e < 8; e++)
    for (unsigned k = 0; k < 8; k++)
      a.x[e * 8 + k] = detail::at(p, ldm, rm, r0 + 2 * e, k);
}

template <class L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 8, precision::tf32, L> &b, const float *p, unsigned ldm) {
  constexpr bool rm = detail::is_row_major<L>();
  if (!detail::readable(b, "load_matrix_sync(matrix_b)", p, ldm, 8, 16, rm))
    return;
  const unsigned n = emu::lane() % 16;
  for (unsigned k = 0; k < 8; k++)
    b.x[k] = detail::at(p, ldm, rm, k, n);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 8, float> &c, const float *p, unsigned ldm,
                             layout_t layout) {
  const bool rm = layout == mem_row_major;
  if (!detail::readable(c, "load_matrix_sync(accumulator)", p, ldm, 16, 16, rm))
    return;
  for (unsigned e = 0; e < 8; e++) {
    const unsigned f = emu::lane() + 32 * e;
    c.x[e] = detail::at(p, ldm, rm, f / 16, f % 16);
  }
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 8, float> &c, unsigned ldm,
                              layout_t layout) {
  const bool rm = layout == mem_row_major;
  if (!emu::wmma_tile_ok("store_matrix_sync", p, sizeof *p, ldm, 16, 16, rm))
    return;
  for (unsigned e = 0; e < 8; e++) {
    const unsigned f = emu::lane() + 32 * e, r = f / 16, n = f % 16;
    (rm ? p[(size_t)r * ldm + n] : p[(size_t)n * ldm + r]) = c.x[e];
  }
}

template <class L>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __nv_bfloat16, L> &a, const __nv_bfloat16 *p, unsigned ldm) {
  constexpr bool rm = detail::is_row_major<L>();
  if (!detail::readable(a, "load_matrix_sync(matrix_a, bf16)", p, ldm, 16, 16, rm))
    return;
  for (unsigned k = 0; k < 16; k++)
    a.x[k] = detail::at(p, ldm, rm, emu::lane() % 16, k);
}

template <class L>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __nv_bfloat16, L> &b, const __nv_bfloat16 *p, unsigned ldm) {
  constexpr bool rm = detail::is_row_major<L>();
  if (!detail::readable(b, "load_matrix_sync(matrix_b, bf16)", p, ldm, 16, 16, rm))
    return;
  for (unsigned e = 0; e < 8; e++)
    for (unsigned k = 0; k < 16; k++)
      b.x[e * 16 + k] = detail::at(p, ldm, rm, k, emu::lane() / 16 + 2 * e);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &c, const float *p, unsigned ldm,
                             layout_t layout) {
  const bool rm = layout == mem_row_major;
  if (!detail::readable(c, "load_matrix_sync(accumulator, k16)", p, ldm, 16, 16, rm))
    return;
  for (unsigned e = 0; e < 8; e++)
    c.x[e] = detail::at(p, ldm, rm, emu::lane() % 16, emu::lane() / 16 + 2 * e);
}

inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &c, unsigned ldm,
                              layout_t layout) {
  const bool rm = layout == mem_row_major;
  if (!emu::wmma_tile_ok("store_matrix_sync(k16)", p, sizeof *p, ldm, 16, 16, rm))
    return;
  for (unsigned e = 0; e < 8; e++) {
    const unsigned r = emu::lane() % 16, n = emu::lane() / 16 + 2 * e;
    (rm ? p[(size_t)r * ldm + n] : p[(size_t)n * ldm + r]) = c.x[e];
  }
}

template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 8, float> &d, const fragment<matrix_a, 16, 16, 8, precision::tf32, LA> &a,
              const fragment<matrix_b, 16, 16, 8, precision::tf32, LB> &b,
              const fragment<accumulator, 16, 16, 8, float> &c) {
  float out[8], bk[8]; // element e: row lane / 16 + 2 e (a's row e), column lane % 16 (b's)
  for (unsigned k = 0; k < 8; k++)
    bk[k] = detail::tf32_bits(b.x[k]);
  for (unsigned e = 0; e < 8; e++) {
    float s = c.x[e];
    for (unsigned k = 0; k < 8; k++)
      s = detail::add_toward_zero(s, detail::tf32_bits(a.x[e * 8 + k]) * bk[k]);
    out[e] = s;
  }
  memcpy(d.x, out, sizeof out); // d may be c
}

template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA> &a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB> &b,
              const fragment<accumulator, 16, 16, 16, float> &c) {
  float out[8]; // element e: row lane % 16 (a's row), column lane / 16 + 2 e (b's column e)
  for (unsigned e = 0; e < 8; e++) {
    float s = c.x[e];
    for (unsigned k = 0; k < 16; k++) // bf16 times bf16: exact in fp32
      s = detail::add_toward_zero(s, a.x[k] * b.x[e * 16 + k]);
    out[e] = s;
  }
  memcpy(d.x, out, sizeof out);
}

} // namespace wmma
} // namespace nvcuda

#endif
