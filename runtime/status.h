/* status.h: error codes and the message that travels with them.
 *
 * Every fallible function returns an int: PA_OK (0) or a negative PA_E* code.
 * The function that detects a problem records a human-readable message (naming
 * the file and the offending value) with pa_error(); callers up the stack pass
 * the code through unchanged, and main() prints pa_errmsg(). The message buffer
 * is thread-local, so threads never see each other's errors.
 */
#ifndef PALIGN_STATUS_H
#define PALIGN_STATUS_H

enum {
  PA_OK = 0,
  PA_EIO = -1,          /* a system call failed (open, read, mmap, write) */
  PA_EFORMAT = -2,      /* a file is malformed or inconsistent */
  PA_ENOMEM = -3,       /* an allocation failed */
  PA_EUNSUPPORTED = -4, /* well-formed, but something palign does not handle */
  PA_ENOTFOUND = -5,    /* a named key, tensor or file is absent */
  PA_EINVAL = -6,       /* a caller or user passed a bad argument */
  PA_ECANCELED = -7,    /* stopped on request (a signal) before finishing */
};

/* A short constant description of a code ("malformed file"). */
const char *pa_strerror(int code);

/* Records a printf-style message for the current thread and returns code,
 * so a failure reads `return pa_error(PA_EFORMAT, "%s: ...", path);`. */
int pa_error(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepends context ("loading model: ") to the current message; returns code. */
int pa_error_prefix(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* The current thread's last message, or the code's description if none. */
const char *pa_errmsg(void);

void pa_error_clear(void);

#endif
