#include "status.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define PA_ERRMSG_MAX 1024

static _Thread_local char errmsg[PA_ERRMSG_MAX];

const char *pa_strerror(int code) {
  switch (code) {
  case PA_OK: return "success";
  case PA_EIO: return "input/output error";
  case PA_EFORMAT: return "malformed file";
  case PA_ENOMEM: return "out of memory";
  case PA_EUNSUPPORTED: return "unsupported";
  case PA_ENOTFOUND: return "not found";
  case PA_EINVAL: return "invalid argument";
  case PA_ECANCELED: return "canceled";
  default: return "unknown error";
  }
}

int pa_error(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(errmsg, sizeof errmsg, fmt, ap);
  va_end(ap);
  return code;
}

int pa_error_prefix(int code, const char *fmt, ...) {
  char prefix[PA_ERRMSG_MAX], old[PA_ERRMSG_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prefix, sizeof prefix, fmt, ap);
  va_end(ap);
  memcpy(old, errmsg, sizeof old);
  /* truncation of an over-long message is acceptable; it stays NUL-terminated */
  size_t n = strlen(prefix);
  memcpy(errmsg, prefix, n + 1);
  const char *rest = old[0] ? old : pa_strerror(code);
  size_t m = strlen(rest);
  if (m > sizeof errmsg - 1 - n)
    m = sizeof errmsg - 1 - n;
  memcpy(errmsg + n, rest, m);
  errmsg[n + m] = '\0';
  return code;
}

const char *pa_errmsg(void) { return errmsg[0] ? errmsg : "no error recorded"; }

void pa_error_clear(void) { errmsg[0] = '\0'; }
