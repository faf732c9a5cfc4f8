/* model_path.h: where tests find the default model and the PAPI data.
 * The default model is downloaded by scripts/setup.sh; a test that needs it
 * skips (exit 77) when it is absent, unless PALIGN_REQUIRE_MODEL=1 (CI), when
 * its absence is a failure. */
#ifndef PALIGN_TEST_MODEL_PATH_H
#define PALIGN_TEST_MODEL_PATH_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PALIGN_DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

static inline const char *test_default_model(void) {
  static char buf[4096];
  const char *env = getenv("PALIGN_MODEL");
  if (env && *env)
    snprintf(buf, sizeof buf, "%s", env);
  else if (getenv("PALIGN_CACHE") && *getenv("PALIGN_CACHE"))
    snprintf(buf, sizeof buf, "%s/%s", getenv("PALIGN_CACHE"), PALIGN_DEFAULT_MODEL_FILE);
  else
    snprintf(buf, sizeof buf, "%s/.cache/palign/%s", getenv("HOME") ? getenv("HOME") : "", PALIGN_DEFAULT_MODEL_FILE);
  if (access(buf, R_OK) != 0) {
    const char *req = getenv("PALIGN_REQUIRE_MODEL");
    if (req && !strcmp(req, "1")) {
      fprintf(stderr, "the default model %s is missing (run scripts/setup.sh)\n", buf);
      exit(1);
    }
    fprintf(stderr, "skipping: the default model %s is missing (run scripts/setup.sh)\n", buf);
    exit(77);
  }
  return buf;
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
