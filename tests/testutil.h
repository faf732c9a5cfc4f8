/* testutil.h: what palign's cmocka tests share. Include after <cmocka.h>.
 *
 *  - a scratch directory per test group (tu_setup / tu_teardown as cmocka
 *    group or test fixtures; tu_path names a file in it);
 *  - whole-file reading and writing that fail the test on error;
 *  - running a command (a built binary) and keeping what it printed, and
 *    checking what it printed;
 *  - tiny PAPI folders (tu_papi.h) and seeded random vectors;
 *  - where the models and the PAPI data are: the models are downloaded by
 *    scripts/setup.sh, and a test that needs one skips (exit 77) when it is
 *    absent, unless PALIGN_REQUIRE_MODEL=1 (PALIGN_REQUIRE_QWEN2=1 for the
 *    qwen2 model; CI sets both), when its absence fails. */
#ifndef PALIGN_TESTUTIL_H
#define PALIGN_TESTUTIL_H

#include <dirent.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tu_papi.h"

#define PALIGN_DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"
#define PALIGN_QWEN2_MODEL_FILE   "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

static char tu_tmp[256];

static inline void tu_rm_rf(const char *path) {
  struct stat sb;
  if (lstat(path, &sb) != 0)
    return;
  if (S_ISDIR(sb.st_mode)) {
    DIR *d = opendir(path);
    struct dirent *e;
    while (d && (e = readdir(d))) {
      if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
        continue;
      char sub[1024];
      if (snprintf(sub, sizeof sub, "%s/%s", path, e->d_name) < (int)sizeof sub)
        tu_rm_rf(sub);
    }
    if (d)
      closedir(d);
    rmdir(path);
  } else {
    unlink(path);
  }
}

static inline int tu_setup(void **state) {
  (void)state;
  snprintf(tu_tmp, sizeof tu_tmp, "/tmp/palign-test-XXXXXX");
  return mkdtemp(tu_tmp) ? 0 : -1;
}

static inline int tu_teardown(void **state) {
  (void)state;
  tu_rm_rf(tu_tmp);
  return 0;
}

/* `name` inside the scratch directory, written to buf and returned. */
static inline const char *tu_path(char *buf, size_t n, const char *name) {
  if (snprintf(buf, n, "%s/%s", tu_tmp, name) >= (int)n)
    fail_msg("path %s/%s is too long", tu_tmp, name);
  return buf;
}

/* The whole file, NUL-terminated (malloc'd); *len its size if len != NULL. */
static inline char *tu_slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f)
    fail_msg("cannot open %s", path);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  assert_non_null(buf);
  assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
  fclose(f);
  buf[n] = '\0';
  if (len)
    *len = (size_t)n;
  return buf;
}

static inline void tu_write(const char *path, const void *p, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f)
    fail_msg("cannot create %s", path);
  assert_int_equal(fwrite(p, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
}

static inline void tu_write_text(const char *path, const char *text) { tu_write(path, text, strlen(text)); }

/* Decodes hex ("-" is the empty string) into out; returns the byte count. */
static inline size_t tu_unhex(const char *h, char *out) {
  size_t n = 0;
  if (!strcmp(h, "-"))
    return 0;
  for (; h[0] && h[1]; h += 2) {
    unsigned v;
    if (sscanf(h, "%2x", &v) != 1)
      fail_msg("bad hex '%s'", h);
    out[n++] = (char)v;
  }
  return n;
}

/* Runs the shell command made from fmt: its stdout into out (size n_out),
 * its stderr into err (size n_err) or, when err is NULL, into out as well.
 * Fails the test when the command dies of a signal or a sanitizer reports
 * (under the sanitizer build a report may come with an exit status a data
 * error also has); returns the exit status. */
static inline int tu_run(char *out, size_t n_out, char *err, size_t n_err, const char *fmt, ...) {
  char cmd[8192], errpath[300];
  va_list ap;
  va_start(ap, fmt);
  int len = vsnprintf(cmd, sizeof cmd - 400, fmt, ap);
  va_end(ap);
  if (len < 0 || len >= (int)sizeof cmd - 400)
    fail_msg("command too long: %.200s...", cmd);
  if (snprintf(errpath, sizeof errpath, "%s/tu_run.stderr", tu_tmp) >= (int)sizeof errpath)
    fail_msg("scratch path too long");
  snprintf(cmd + len, sizeof cmd - (size_t)len, err ? " 2>'%s'" : " 2>&1", errpath);
  FILE *p = popen(cmd, "r");
  if (!p)
    fail_msg("cannot run %s", cmd);
  size_t n = fread(out, 1, n_out - 1, p);
  out[n] = '\0';
  while (fgetc(p) != EOF) /* the rest, so that the command is not killed by SIGPIPE */
    ;
  int st = pclose(p);
  const char *report = out;
  if (err) {
    char *e = tu_slurp(errpath, NULL);
    snprintf(err, n_err, "%s", e);
    free(e);
    report = err;
  }
  if (!WIFEXITED(st))
    fail_msg("%s: ended by a signal\n%s", cmd, report);
  if (strstr(report, "Sanitizer") || strstr(report, "runtime error:"))
    fail_msg("%s:\n%s", cmd, report);
  return WEXITSTATUS(st);
}

/* Fails the test unless text (what `where` names) contains what. */
static inline void tu_expect_in(const char *text, const char *what, const char *where) {
  if (!strstr(text, what))
    fail_msg("%s should contain '%s':\n%s", where, what, text);
}

/* Fails the test unless the file contains what. */
static inline void tu_expect_file_has(const char *path, const char *what) {
  char *text = tu_slurp(path, NULL);
  if (!strstr(text, what))
    fail_msg("%s should contain '%s':\n%s", path, what, text);
  free(text);
}

/* The PAPI folder `name` in the scratch directory with the given files;
 * its path, written to buf. */
static inline const char *tu_papi_dir(char *buf, size_t n, const char *name, tu_papi_files files) {
  tu_path(buf, n, name);
  if (tu_papi_write(buf, files) != 0)
    fail_msg("cannot write the PAPI folder %s", buf);
  return buf;
}

/* Appends to buf like tu_appendf; fails the test when it does not fit. */
#define tu_cat(buf, cap, len, ...)                                                                                     \
  do {                                                                                                                 \
    if (tu_appendf((buf), (cap), (len), __VA_ARGS__) != 0)                                                             \
      fail_msg("%s:%d: buffer %s too small", __FILE__, __LINE__, #buf);                                                \
  } while (0)

/* xorshift64: uniform floats in [-1, 1) from *state (never 0). */
static inline float tu_frand(uint64_t *state) {
  uint64_t x = *state;
  x ^= x << 13, x ^= x >> 7, x ^= x << 17;
  *state = x;
  return (float)((double)(x >> 11) / 9007199254740992.0 * 2 - 1);
}

/* n such floats (malloc'd). */
static inline float *tu_rand_vec(uint64_t *state, size_t n) {
  float *v = malloc(n * sizeof *v);
  assert_non_null(v);
  for (size_t i = 0; i < n; i++)
    v[i] = tu_frand(state);
  return v;
}

/* A model in the cache: $env_path if set, else $PALIGN_CACHE/file (default
 * ~/.cache/palign/file). Exits 77 (skip) when absent, or 1 when the variable
 * require is "1" (CI). */
static inline const char *tu_cached_model(const char *file, const char *env_path, const char *require,
                                          const char *setup_hint) {
  static char buf[4096];
  const char *env = getenv(env_path), *cache = getenv("PALIGN_CACHE");
  if (env && *env)
    snprintf(buf, sizeof buf, "%s", env);
  else if (cache && *cache)
    snprintf(buf, sizeof buf, "%s/%s", cache, file);
  else
    snprintf(buf, sizeof buf, "%s/.cache/palign/%s", getenv("HOME") ? getenv("HOME") : "", file);
  if (access(buf, R_OK) != 0) {
    const char *req = getenv(require);
    if (req && !strcmp(req, "1")) {
      fprintf(stderr, "the model %s is missing (run %s)\n", buf, setup_hint);
      exit(1);
    }
    fprintf(stderr, "skipping: the model %s is missing (run %s)\n", buf, setup_hint);
    exit(77);
  }
  return buf;
}

static inline const char *test_default_model(void) {
  return tu_cached_model(PALIGN_DEFAULT_MODEL_FILE, "PALIGN_MODEL", "PALIGN_REQUIRE_MODEL", "scripts/setup.sh");
}

/* Qwen2.5-Coder-0.5B-Instruct, the qwen2 model scripts/setup.sh --model
 * qwen2.5-0.5b fetches (PALIGN_QWEN2_MODEL overrides; PALIGN_REQUIRE_QWEN2=1
 * makes its absence fail). */
static inline const char *test_qwen2_model(void) {
  return tu_cached_model(PALIGN_QWEN2_MODEL_FILE, "PALIGN_QWEN2_MODEL", "PALIGN_REQUIRE_QWEN2",
                         "scripts/setup.sh --model qwen2.5-0.5b");
}

static inline const char *test_papi_dir(void) {
  static char buf[4096];
  const char *env = getenv("PALIGN_PAPI_DIR");
  if (env && *env)
    snprintf(buf, sizeof buf, "%s", env);
  else
    snprintf(buf, sizeof buf, "%s/../shared/papi", PALIGN_SOURCE_DIR);
  return buf;
}

#endif
