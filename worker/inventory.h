/* inventory.h: the questionnaire (IPIP-NEO items and the train/test split)
 * and the PAPI subjects who answered it.
 *
 * Files (see ../shared/papi/README.md): ipip_neo_300_items.csv (items),
 * mpi_300_split.json (train_index, test_index: item numbers), Test-set.json
 * (subjects: "case" and answers "i1".."i300", 1..5, 0 = missing) or the CSV
 * form `case,i1,...,i300` of the large release, personality_prompt.json (the
 * "P2" descriptions, one per subject in Test-set.json order).
 *
 * Whole-file problems (unreadable, malformed JSON/CSV, an item listed twice,
 * a split naming an unknown item, an empty subject file, duplicate subject
 * ids) are errors naming the file and the problem. Problems of one subject (an
 * answer outside 0..5, a missing or unknown answer key, an unparsable value)
 * make that subject unusable: it is kept with `usable = false` and a reason
 * naming the file, the subject and the problem, so callers skip it and report
 * why.
 *
 * Errors: 0 or a negative PA_E* code with a message (status.h). Objects are
 * immutable after loading and safe to read from many threads.
 */
#ifndef PALIGN_INVENTORY_H
#define PALIGN_INVENTORY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Big Five traits, in the order PAS.md's activation bank uses (A, C, E, N, O). */
typedef enum { PA_TRAIT_A = 0, PA_TRAIT_C, PA_TRAIT_E, PA_TRAIT_N, PA_TRAIT_O, PA_N_TRAITS } pa_trait;

char pa_trait_letter(pa_trait t);      /* 'A' ... */
int pa_trait_from_letter(char c);      /* pa_trait, or -1 */

#define PA_MAX_ITEMS 300

typedef struct {
  int number;     /* 1..n_items: the N of "iN" */
  pa_trait trait;
  int keyed;      /* +1, or -1 for reverse-keyed items */
  char facet_code[8];
  const char *facet; /* "Anxiety" */
  const char *text;  /* "Worry about things." */
} pa_item;

typedef struct pa_inventory pa_inventory;

/* Reads ipip_neo_300_items.csv and mpi_300_split.json from papi_dir. */
int pa_inventory_load(const char *papi_dir, pa_inventory **out);
void pa_inventory_destroy(pa_inventory *inv); /* accepts NULL */

int pa_inventory_n_items(const pa_inventory *inv);
const pa_item *pa_inventory_item(const pa_inventory *inv, int number); /* NULL if unknown */
/* The split, as item numbers in the file's order. */
const int *pa_inventory_train(const pa_inventory *inv, int *n);
const int *pa_inventory_test(const pa_inventory *inv, int *n);

typedef struct {
  char id[32];                       /* "case" */
  uint8_t answers[PA_MAX_ITEMS + 1]; /* by item number; 0 = missing */
  const char *description;           /* the P2 description, or NULL */
  bool usable;
  char reason[256]; /* why not usable: names the file, the subject and the problem */
} pa_subject;

typedef struct pa_subjects pa_subjects;

/* Test-set.json (a JSON array of objects) or a CSV file with a header
 * `case,i1,...` (by extension: .json or .csv). */
int pa_subjects_load(const char *path, const pa_inventory *inv, pa_subjects **out);
/* personality_prompt.json: entry k describes subject k (output[0]). A count
 * that differs from the subjects' is an error. */
int pa_subjects_load_descriptions(pa_subjects *s, const char *path);
void pa_subjects_destroy(pa_subjects *s); /* accepts NULL */

/* The PAPI directory to use: dir when given (not NULL or ""), else
 * $PALIGN_PAPI_DIR when set, else "../shared/papi". */
const char *pa_papi_dir(const char *dir);
/* The inventory of pa_papi_dir(dir), and the subjects of subjects_file or,
 * when it is NULL, of its Test-set.json with their P2 descriptions
 * (personality_prompt.json). On error both are NULL. */
int pa_papi_load(const char *dir, const char *subjects_file, pa_inventory **inv, pa_subjects **subjects);

size_t pa_subjects_count(const pa_subjects *s);
const pa_subject *pa_subjects_at(const pa_subjects *s, size_t i);
const pa_subject *pa_subjects_find(const pa_subjects *s, const char *id); /* NULL if absent */

/* A selection of n subjects by position: "all", "N" (the first N; more than
 * n means all) or "A-B" (positions A..B inclusive, B clipped to n - 1).
 * 0 with [*first, *last], or -1 if r is none of these or selects nothing. */
int pa_subjects_range(const char *r, size_t n, size_t *first, size_t *last);

#endif
