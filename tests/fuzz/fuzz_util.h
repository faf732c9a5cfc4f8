/* fuzz_util.h: what palign's libFuzzer harnesses share (tests/fuzz/).
 *
 * Every reader palign has takes a path, so a harness writes its input to a
 * file in a private directory on /dev/shm (memory) and opens that. Fixed
 * companion files (a valid model, a tiny PAPI folder) are written once, at
 * initialisation, into the same directory.
 *
 * Seeds: with PALIGN_FUZZ_SEED_OUT=FILE in the environment, a harness writes
 * one valid input of its own format to FILE at initialisation and exits 0;
 * tests/fuzz/make-seeds.sh makes the committed corpus that way, so a
 * harness and its seeds cannot drift apart.
 *
 * A harness must not crash, leak or trip a sanitizer on any input; errors
 * are expected and ignored (their messages are only checked to exist).
 */
#ifndef PALIGN_FUZZ_UTIL_H
#define PALIGN_FUZZ_UTIL_H

#include "status.h"
#include "../tu_papi.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char fz_dir[64];

static inline void fz_die(const char *what) {
  fprintf(stderr, "fuzz harness setup: %s: %s\n", what, pa_errmsg());
  abort();
}

/* The private directory, made on first use and removed at exit. */
static inline void fz_cleanup(void) {
  char cmd[128];
  if (fz_dir[0] && snprintf(cmd, sizeof cmd, "rm -rf '%s'", fz_dir) < (int)sizeof cmd && system(cmd) != 0)
    fprintf(stderr, "fuzz: could not remove %s\n", fz_dir);
}

static inline const char *fz_root(void) {
  if (!fz_dir[0]) {
    snprintf(fz_dir, sizeof fz_dir, "/dev/shm/palign-fuzz-XXXXXX");
    if (!mkdtemp(fz_dir)) {
      snprintf(fz_dir, sizeof fz_dir, "/tmp/palign-fuzz-XXXXXX");
      if (!mkdtemp(fz_dir))
        abort();
    }
    atexit(fz_cleanup);
  }
  return fz_dir;
}

/* name inside the directory (subdirectories made as needed), in a buffer of
 * 8 that rotate. */
static inline const char *fz_path(const char *name) {
  static char bufs[8][512];
  static int next;
  char *b = bufs[next++ % 8];
  snprintf(b, 512, "%s/%s", fz_root(), name);
  for (char *s = strchr(b + strlen(fz_root()) + 1, '/'); s; s = strchr(s + 1, '/')) {
    *s = '\0';
    mkdir(b, 0700);
    *s = '/';
  }
  return b;
}

static inline void fz_write(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f || (n && fwrite(data, 1, n, f) != n) || fclose(f) != 0)
    abort();
}

static inline void fz_write_text(const char *path, const char *text) { fz_write(path, text, strlen(text)); }

/* The seed mode (above): writes data and exits when asked to. */
static inline void fz_seed(const void *data, size_t n) {
  const char *out = getenv("PALIGN_FUZZ_SEED_OUT");
  if (!out || !*out)
    return;
  fz_write(out, data, n);
  exit(0);
}

/* The seed mode for a seed that is a file the harness made. */
static inline void fz_seed_file(const char *path) {
  const char *out = getenv("PALIGN_FUZZ_SEED_OUT");
  if (!out || !*out)
    return;
  FILE *f = fopen(path, "rb");
  if (!f)
    abort();
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n)
    abort();
  fclose(f);
  fz_seed(buf, (size_t)n);
}

/* An error must come with a message. */
static inline void fz_check_error(int rc) {
  if (rc < 0 && !pa_errmsg()[0])
    abort();
}

/* The tiny PAPI folder of the tests (tu_papi.h) in dir: 10 items (two per
 * trait), 5 train and 5 test, two subjects, their P2 descriptions. */
static inline void fz_tiny_papi(const char *dir) {
  if (tu_papi_write(dir, (tu_papi_files){TU_TEN_ITEMS_CSV, TU_TEN_ITEMS_SPLIT, TU_TWO_SUBJECTS_JSON,
                                         "[{\"output\": [\"You worry.\"]}, {\"output\": [\"You like order.\"]}]"}))
    abort();
}

#endif
