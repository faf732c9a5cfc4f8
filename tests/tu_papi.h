/* tu_papi.h: tiny PAPI folders, for palign's cmocka tests (through
 * testutil.h, whose tu_papi_dir fails the test on error) and its fuzz
 * harnesses (fuzz_util.h). Plain C, no cmocka.
 *
 * A PAPI folder, as in ../shared/papi: ipip_neo_300_items.csv (the
 * inventory), mpi_300_split.json (train and test item numbers),
 * Test-set.json (the subjects' answers) and personality_prompt.json (the
 * subjects' P2 descriptions). */
#ifndef PALIGN_TU_PAPI_H
#define PALIGN_TU_PAPI_H

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#define TU_ITEMS_HEADER "item,ipip120_no,trait,facet_code,facet,keyed,text\n"

/* Ten items, two per trait, traits mixed (so that trait order, A C E N O,
 * differs from file order); item 9 reverse-keyed. */
#define TU_TEN_ITEMS_CSV                                                                                               \
  TU_ITEMS_HEADER                                                                                                      \
  "1,1,N,N1,Anxiety,+,Worry about things.\n"                                                                           \
  "2,2,E,E1,Friendliness,+,Make friends easily.\n"                                                                     \
  "3,3,O,O1,Imagination,+,Have a vivid imagination.\n"                                                                 \
  "4,4,A,A1,Trust,+,Trust others.\n"                                                                                   \
  "5,5,C,C1,Self-Efficacy,+,Complete tasks successfully.\n"                                                            \
  "6,6,N,N2,Anger,+,Get angry easily.\n"                                                                               \
  "7,7,E,E2,Gregariousness,+,Love large parties.\n"                                                                    \
  "8,8,O,O2,Artistic Interests,+,Believe in the importance of art.\n"                                                  \
  "9,9,A,A2,Morality,-,Use others for my own ends.\n"                                                                  \
  "10,10,C,C2,Orderliness,+,Like order.\n"

/* Items 1..5 train, 6..10 test: one test item per trait but C's. */
#define TU_TEN_ITEMS_SPLIT "{\"train_index\": [1, 2, 3, 4, 5], \"test_index\": [6, 7, 8, 9, 10]}"

/* Two subjects over the ten items; 0 is a missing answer. */
#define TU_TWO_SUBJECTS_JSON                                                                                           \
  "[{\"case\": 11, \"i1\": 4, \"i2\": 0, \"i3\": 2, \"i4\": 5, \"i5\": 1, \"i6\": 3, \"i7\": 4, \"i8\": 2, \"i9\": 1, "    \
  "\"i10\": 5}, {\"case\": 12, \"i1\": 1, \"i2\": 2, \"i3\": 3, \"i4\": 4, \"i5\": 5, \"i6\": 5, \"i7\": 0, \"i8\": 3, "     \
  "\"i9\": 2, \"i10\": 1}]"

/* The files of a PAPI folder; NULL: not written. */
typedef struct {
  const char *items, *split, *subjects, *prompts;
} tu_papi_files;

/* Appends the printf-style text to buf (capacity cap, *len used so far);
 * -1 when it does not fit. */
static inline int tu_appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  const int n = *len < cap ? vsnprintf(buf + *len, cap - *len, fmt, ap) : -1;
  va_end(ap);
  if (n < 0 || (size_t)n >= cap - *len)
    return -1;
  *len += (size_t)n;
  return 0;
}

static inline int tu_papi_write_file(const char *dir, const char *name, const char *text) {
  char path[1024];
  if (!text)
    return 0;
  if (snprintf(path, sizeof path, "%s/%s", dir, name) >= (int)sizeof path)
    return -1;
  FILE *f = fopen(path, "wb");
  if (!f)
    return -1;
  const size_t n = strlen(text);
  const int ok = fwrite(text, 1, n, f) == n;
  return fclose(f) == 0 && ok ? 0 : -1;
}

/* Writes the given files into dir (made when missing); -1 on error. */
static inline int tu_papi_write(const char *dir, tu_papi_files f) {
  if (mkdir(dir, 0755) != 0 && errno != EEXIST)
    return -1;
  return tu_papi_write_file(dir, "ipip_neo_300_items.csv", f.items) ||
                 tu_papi_write_file(dir, "mpi_300_split.json", f.split) ||
                 tu_papi_write_file(dir, "Test-set.json", f.subjects) ||
                 tu_papi_write_file(dir, "personality_prompt.json", f.prompts)
             ? -1
             : 0;
}

/* The split JSON of the item numbers train[0..n_train) and test[0..n_test)
 * into buf; -1 when it does not fit. */
static inline int tu_split_json(char *buf, size_t cap, const int *train, int n_train, const int *test, int n_test) {
  size_t len = 0;
  int rc = tu_appendf(buf, cap, &len, "{\"train_index\": [");
  for (int i = 0; i < n_train; i++)
    rc |= tu_appendf(buf, cap, &len, "%s%d", i ? ", " : "", train[i]);
  rc |= tu_appendf(buf, cap, &len, "], \"test_index\": [");
  for (int i = 0; i < n_test; i++)
    rc |= tu_appendf(buf, cap, &len, "%s%d", i ? ", " : "", test[i]);
  return rc | tu_appendf(buf, cap, &len, "]}");
}

#endif
