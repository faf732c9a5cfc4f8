/* cpu_internal.h: what the CPU backend's source files share (not part of
 * the backend interface). */
#ifndef PALIGN_CPU_INTERNAL_H
#define PALIGN_CPU_INTERNAL_H

#include "backend.h"

#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MATMUL_BLOCK 256 /* output columns per piece of a product */
#define MATMUL_ROWS  256 /* and rows */
#define ATTN_ROWS    96  /* query rows (tokens x grouped heads) per piece of attention */

/* exp(x) for softmax and SiLU, written so the compiler vectorises the loops
 * that call it (libm's expf is a scalar call): Cody-Waite reduction by ln 2
 * and Cephes' degree-6 minimax polynomial, within 2 ulp of expf on
 * [-87, 88]; inputs outside are clamped (softmax feeds x <= 0, and
 * exp(-87) is already negligible beside the row's maximum of 1). */
static inline float exp_approx(float x) {
  x = fminf(fmaxf(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  union {
    float f;
    int32_t i;
  } t = {.f = x * 1.44269504088896341f + shifter}, scale;
  const float n = t.f - shifter;
  const int32_t k = t.i - 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  /* unsigned: a NaN input (a diverged model's) can give any k here, the
   * clamp above being free to pass it under -ffinite-math-only; the result
   * is then meaningless, but the shift stays defined */
  scale.i = (int32_t)((uint32_t)(k + 127) << 23);
  return p * scale.f;
}

/* Softmax over the first `valid` of a row's entries, in place; the rest
 * become 0 (causally masked keys). Returns the log-sum-exp of the valid
 * entries (what the training attention keeps for its backward pass). */
static inline float pa_cpu_softmax(float *row, int valid, int len) {
  float mx = -FLT_MAX; /* the kernels are built assuming finite values */
  for (int i = 0; i < valid; i++)
    mx = row[i] > mx ? row[i] : mx;
  float sum = 0;
  /* the exponentials are a large share of attention over long prefixes */
#pragma omp simd reduction(+ : sum)
  for (int i = 0; i < valid; i++) {
    row[i] = exp_approx(row[i] - mx);
    sum += row[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < valid; i++)
    row[i] *= inv;
  for (int i = valid; i < len; i++)
    row[i] = 0;
  return mx + logf(sum);
}

/* The training ops (cpu_train.c), as backend.h describes them. */
void pa_cpu_scale(size_t n, float a, float *x);
void pa_cpu_matmul_nn(int M, int N, int K, const float *x, const float *w, float beta, float *y);
void pa_cpu_matmul_tn_acc(int M, int N, int K, const float *a, const float *b, float *g);
void pa_cpu_rmsnorm_backward(int M, int D, const float *x, const float *w, float eps, const float *dy, float *dx);
void pa_cpu_rope_backward(int M, int n_heads, int head_dim, const int32_t *pos, const float *cos_tab,
                          const float *sin_tab, float *dx);
void pa_cpu_swiglu_backward(int M, int F, const float *gate, const float *up, const float *dh, float *dgate,
                            float *dup);
size_t pa_cpu_attention_train_scratch(const pa_attn_train_args *a);
void pa_cpu_attention_train(const pa_attn_train_args *a, float *scratch);
void pa_cpu_attention_backward(const pa_attn_train_args *a, const float *dz, float *dq, float *dk, float *dv,
                               float *scratch);
void pa_cpu_adamw(size_t n, const pa_adamw_step *s, float *w, const float *g, float *m, float *v);

/* The bf16-weight operations (cpu_bf16.c), as backend.h describes them. */
void pa_cpu_matmul_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y);
void pa_cpu_matmul_nn_bf16(int M, int N, int K, const float *x, const pa_bf16 *w, float beta, float *y);
void pa_cpu_embed_bf16(int M, int D, const int32_t *ids, const pa_bf16 *table, float *y);
/* Their definition, one product at a time with no buffers (summed in k
 * order): y[m][n] = beta * y + sum_k bf16(x[m][k]) * w, with w[n][k] (nn
 * false) or w[k][n] (nn true), leading dimensions ldx, ldw, ldy. What a
 * thread without buffers computes, and a reference for the tests. */
void pa_cpu_matmul_bf16_direct(bool nn, int M, int N, int K, const float *x, int ldx, const pa_bf16 *w, int ldw,
                               float beta, float *y, int ldy);
#endif
