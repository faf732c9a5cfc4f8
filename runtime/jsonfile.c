#include "jsonfile.h"
#include "utf8.h"

#include "fileio.h"
#include "status.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_JSON_FILE (1024ull * 1024 * 1024)

int pa_read_file(const char *path, uint64_t max, char **out, size_t *len) {
  *out = NULL;
  uint64_t size;
  const int fd = pa_open_regular(path, &size);
  if (fd < 0)
    return fd;
  if (size > max) {
    close(fd);
    return pa_error(PA_EFORMAT, "%s: %llu bytes is too large for this file (limit %llu)", path,
                    (unsigned long long)size, (unsigned long long)max);
  }
  size_t n = (size_t)size;
  char *buf = malloc(n + 1);
  if (!buf) {
    close(fd);
    return pa_error(PA_ENOMEM, "%s: no memory for %zu bytes", path, n);
  }
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, buf + got, n - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      int e = r < 0 ? errno : 0;
      close(fd);
      free(buf);
      return pa_error(PA_EIO, "%s: read failed: %s", path, e ? strerror(e) : "file shrank while reading");
    }
    got += (size_t)r;
  }
  close(fd);
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return PA_OK;
}

int pa_json_load(const char *path, cJSON **out) {
  *out = NULL;
  char *text;
  size_t len;
  int rc = pa_read_file(path, MAX_JSON_FILE, &text, &len);
  if (rc)
    return rc;
  if (len == 0) {
    free(text);
    return pa_error(PA_EFORMAT, "%s: not valid JSON: empty file", path);
  }
  const char *end = NULL;
  cJSON *j = cJSON_ParseWithLengthOpts(text, len, &end, false);
  size_t stop = end ? (size_t)(end - text) : 0;
  if (j) /* only whitespace may follow the value */
    while (stop < len && (text[stop] == ' ' || text[stop] == '\n' || text[stop] == '\r' || text[stop] == '\t'))
      stop++;
  if (!j || stop < len) {
    int line = 1, col = 1;
    for (size_t i = 0; i < stop && i < len; i++, col++)
      if (text[i] == '\n')
        line++, col = 0;
    free(text);
    cJSON_Delete(j);
    return pa_error(PA_EFORMAT, "%s: not valid JSON (%s at line %d, column %d)", path,
                    j ? "unexpected text after the value" : "syntax error", line, col);
  }
  free(text);
  *out = j;
  return PA_OK;
}

char *pa_json_print(const cJSON *o, bool formatted) {
  char *text = formatted ? cJSON_Print(o) : cJSON_PrintUnformatted(o);
  char *out = text ? pa_utf8_repair(text) : NULL;
  cJSON_free(text);
  return out;
}
