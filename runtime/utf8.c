/* utf8.c: text made fit for JSON output (utf8.h). */
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

char *pa_utf8_repair(const char *s) {
  const size_t n = strlen(s);
  char *out = malloc(3 * n + 1); /* each byte at most U+FFFD's three */
  if (!out)
    return NULL;
  size_t o = 0;
  for (size_t i = 0; i < n;) {
    uint32_t cp;
    const size_t k = pa_utf8_valid((const uint8_t *)s + i, n - i, &cp);
    if (k) {
      memcpy(out + o, s + i, k);
      o += k, i += k;
    } else {
      memcpy(out + o, "\xEF\xBF\xBD", 3);
      o += 3, i++;
    }
  }
  out[o] = '\0';
  return out;
}
