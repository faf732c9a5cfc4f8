/* rng.h: the deterministic generators and hashes palign draws its numbers
 * from (weights of generated models, adapters' initialisation, probe splits
 * and shuffles, the benchmark mode's delays), one copy for every module so
 * that a seed means the same stream wherever it is used.
 *
 * splitmix64 (Steele, Lea, Flood 2014: the state advances by the golden
 * ratio's 64 bits, the output is its finaliser) and 64-bit FNV-1a. */
#ifndef PALIGN_RNG_H
#define PALIGN_RNG_H

#include <stdint.h>

/* splitmix64's finaliser: a bijection of 64-bit words that mixes every bit. */
static inline uint64_t pa_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

/* The next word of the stream at *s. */
static inline uint64_t pa_splitmix64(uint64_t *s) { return pa_mix64(*s += 0x9E3779B97F4A7C15ULL); }

/* [0, 1) with 24 bits: exact in a float, so no rounding differs by machine. */
static inline double pa_uniform24(uint64_t *s) { return (double)(pa_splitmix64(s) >> 40) * 0x1p-24; }

/* FNV-1a of a string's bytes. */
static inline uint64_t pa_fnv1a64(const char *s) {
  uint64_t h = 0xCBF29CE484222325ULL;
  for (; *s; s++)
    h = (h ^ (uint8_t)*s) * 0x100000001B3ULL;
  return h;
}

#endif
