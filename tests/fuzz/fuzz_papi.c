/* The PAPI files: ipip_neo_300_items.csv (RFC 4180 fields, quoting, BOM,
 * CRLF), mpi_300_split.json, Test-set.json, the CSV form of the subjects,
 * personality_prompt.json. The first byte of an input says which file it
 * replaces in a tiny valid PAPI folder; then the folder is loaded as
 * palign-worker loads it (and, for the CSV form, as --subjects-file), and
 * every subject's use is touched. Seed: byte k and the valid file k. */
#include "fuzz_util.h"

#include "inventory.h"
#include "prompts.h"

static const char *const files[5] = {"ipip_neo_300_items.csv", "mpi_300_split.json", "Test-set.json",
                                     "subjects.csv", "personality_prompt.json"};

/* The tests' tiny folder, with a quoted field in the items (its seed then
 * holds RFC 4180 quoting), a subject id given as a string, and the CSV form. */
static void write_valid(const char *dir) {
  fz_tiny_papi(dir);
  char items[sizeof TU_TEN_ITEMS_CSV + 16];
  const char *art = strstr(TU_TEN_ITEMS_CSV, "Believe in the importance of art.");
  snprintf(items, sizeof items, "%.*s\"Believe in the importance of \"\"art\"\".\"%s", (int)(art - TU_TEN_ITEMS_CSV),
           TU_TEN_ITEMS_CSV, art + strlen("Believe in the importance of art."));
  char subjects[sizeof TU_TWO_SUBJECTS_JSON + 8];
  const char *twelve = strstr(TU_TWO_SUBJECTS_JSON, "\"case\": 12");
  snprintf(subjects, sizeof subjects, "%.*s\"case\": \"12\"%s", (int)(twelve - TU_TWO_SUBJECTS_JSON),
           TU_TWO_SUBJECTS_JSON, twelve + strlen("\"case\": 12"));
  if (tu_papi_write(dir, (tu_papi_files){.items = items, .subjects = subjects}) ||
      tu_papi_write_file(dir, "subjects.csv",
                         "case,i1,i2,i3,i4,i5,i6,i7,i8,i9,i10\n21,1,2,3,4,5,5,4,3,2,1\n\"22\",3,3,0,3,3,3,3,3,3,3\r\n"))
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  char dir[512];
  snprintf(dir, sizeof dir, "%s", fz_path("seed/x"));
  *strrchr(dir, '/') = '\0';
  write_valid(dir);
  const char *which = getenv("PALIGN_FUZZ_SEED_FILE");
  const int k = which ? atoi(which) % 5 : 0;
  char p[600];
  snprintf(p, sizeof p, "%s/%s", dir, files[k]);
  FILE *f = fopen(p, "rb");
  char buf[8192];
  buf[0] = (char)k;
  const size_t n = fread(buf + 1, 1, sizeof buf - 1, f);
  fclose(f);
  fz_seed(buf, n + 1);
  return 0;
}

static void use(const pa_inventory *inv, pa_subjects *subs) {
  for (size_t i = 0; i < pa_subjects_count(subs); i++) {
    const pa_subject *s = pa_subjects_at(subs, i);
    if (!s->usable)
      continue;
    char *icl = pa_prompt_icl(inv, s);
    free(icl);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  char dir[512];
  snprintf(dir, sizeof dir, "%s", fz_path("in/x"));
  *strrchr(dir, '/') = '\0';
  write_valid(dir);
  char p[600];
  snprintf(p, sizeof p, "%s/%s", dir, files[data[0] % 5]);
  fz_write(p, data + 1, size - 1);
  pa_inventory *inv = NULL;
  pa_subjects *subs = NULL;
  int rc = pa_papi_load(dir, NULL, &inv, &subs);
  fz_check_error(rc);
  if (!rc)
    use(inv, subs);
  pa_subjects_destroy(subs);
  pa_inventory_destroy(inv);
  snprintf(p, sizeof p, "%s/subjects.csv", dir);
  rc = pa_papi_load(dir, p, &inv, &subs);
  fz_check_error(rc);
  if (!rc)
    use(inv, subs);
  pa_subjects_destroy(subs);
  pa_inventory_destroy(inv);
  return 0;
}
