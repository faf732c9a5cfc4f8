/* utf8.h: checking UTF-8, shared by the tokenizer (where it is on the hot
 * path, hence inline) and what prints or reads text people supply. */
#ifndef PALIGN_UTF8_H
#define PALIGN_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is not one
 * (overlong forms, surrogates and code points past U+10FFFF are invalid, as
 * PCRE2 and Unicode say). *cp gets the code point. */
static inline size_t pa_utf8_valid(const uint8_t *s, size_t n, uint32_t *cp) {
  uint8_t c = s[0];
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  size_t len;
  uint32_t v, min;
  if (c >= 0xC2 && c <= 0xDF)
    len = 2, v = c & 0x1F, min = 0x80;
  else if (c >= 0xE0 && c <= 0xEF)
    len = 3, v = c & 0x0F, min = 0x800;
  else if (c >= 0xF0 && c <= 0xF4)
    len = 4, v = c & 0x07, min = 0x10000;
  else
    return 0;
  if (len > n)
    return 0;
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80)
      return 0;
    v = (v << 6) | (s[i] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
    return 0;
  *cp = v;
  return len;
}

/* A copy of the NUL-terminated text s (malloc'd; NULL when out of memory)
 * in which every byte that does not begin valid UTF-8 is U+FFFD instead:
 * what JSON output needs, where palign prints texts it did not make
 * (subject ids, paths) that may hold other encodings. */
char *pa_utf8_repair(const char *s);

#endif
