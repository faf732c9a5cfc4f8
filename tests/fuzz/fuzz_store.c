/* A store's files: a shard (record frames, checksums, torn tails, resync
 * after damage, protobuf payloads) read by every reader palign has (the
 * store's, query summary, subject lookup, export, verify), or the manifest
 * (the first byte says which file the input is). Seed: byte 0 and a shard of
 * three records (two with a row of answers, one failed), or byte 1
 * and a manifest with settings and a run. */
#include "fuzz_util.h"

#include "query.h"
#include "record.h"
#include "store.h"

static int visit(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  (void)ctx, (void)info, (void)r;
  return 0;
}

static void problem(void *ctx, const char *line) { (void)ctx, (void)line; }

/* A framed record of subject id: a method with a row of three answers, or a
 * failed method. */
static size_t frame_record(const char *id, bool failed, uint8_t *out) {
  pa_subject s = {.usable = true};
  snprintf(s.id, sizeof s.id, "%s", id);
  pa_record *r;
  if (pa_record_create(&s, 3, 1, "00ff", &r))
    fz_die("record");
  Palign__SubjectResult *m = pa_record_message(r);
  int32_t items[3] = {1, 2, 3};
  uint8_t truth[3] = {4, 2, 0}, answer[3] = {5, 2, 3};
  float expected[3] = {4.5f, 2.1f, 3.0f};
  Palign__Predictions pr = PALIGN__PREDICTIONS__INIT;
  pr.items = items, pr.n_items = 3, pr.truth = (ProtobufCBinaryData){3, truth};
  pr.answer = (ProtobufCBinaryData){3, answer}, pr.expected = expected, pr.n_expected = 3;
  Palign__MethodRow row = PALIGN__METHOD_ROW__INIT, *rows[1] = {&row};
  row.name = "none", row.predictions = &pr;
  Palign__MethodResult mr = PALIGN__METHOD_RESULT__INIT, *list[1] = {&mr};
  mr.method = failed ? "icl" : "none";
  mr.failed = failed, mr.error = failed ? "a reason" : "";
  if (!failed)
    mr.rows = rows, mr.n_rows = 1;
  m->methods = list, m->n_methods = 1;
  const size_t n = palign__subject_result__get_packed_size(m);
  uint8_t *payload = malloc(n + 1);
  palign__subject_result__pack(m, payload);
  const size_t k = pa_record_frame(payload, (uint32_t)n, out);
  free(payload);
  m->methods = NULL, m->n_methods = 0;
  pa_record_destroy(r);
  return k;
}

static uint8_t *manifest_bytes(size_t *n) {
  Palign__Manifest man = PALIGN__MANIFEST__INIT;
  Palign__Settings st = PALIGN__SETTINGS__INIT;
  Palign__DpoSettings dpo = PALIGN__DPO_SETTINGS__INIT;
  Palign__RunRecord run = PALIGN__RUN_RECORD__INIT, *runs[1] = {&run};
  char *methods[2] = {"none", "const3"}, *shards[1] = {"run1-rank0.pal"};
  double alphas[2] = {0, 4};
  st.model_fingerprint = "00ff", st.inventory_fingerprint = "ab", st.mode = "logits";
  st.methods = methods, st.n_methods = 2, st.alphas = alphas, st.n_alphas = 2, st.dpo = &dpo;
  dpo.epochs = 4, dpo.lr = 1e-3;
  run.started_unix = 1, run.ranks = 3, run.git_revision = "abc";
  man.format = PA_STORE_FORMAT, man.settings = &st, man.shards = shards, man.n_shards = 1;
  man.runs = runs, man.n_runs = 1, man.subjects_total = 3;
  *n = palign__manifest__get_packed_size(&man);
  uint8_t *b = malloc(*n + 1);
  palign__manifest__pack(&man, b);
  return b;
}

static uint8_t *valid_manifest;
static size_t valid_manifest_len;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  valid_manifest = manifest_bytes(&valid_manifest_len);
  const char *which = getenv("PALIGN_FUZZ_SEED_FILE");
  if (which && atoi(which) == 1) {
    uint8_t *seed = malloc(valid_manifest_len + 1);
    seed[0] = 1;
    memcpy(seed + 1, valid_manifest, valid_manifest_len);
    fz_seed(seed, valid_manifest_len + 1);
  }
  static uint8_t shard[1 << 16];
  size_t n = 1;
  shard[0] = 0;
  n += frame_record("11", false, shard + n);
  n += frame_record("12", true, shard + n);
  n += frame_record("13", false, shard + n);
  fz_seed(shard, n);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  char store[512];
  snprintf(store, sizeof store, "%s", fz_path("store/shards/x"));
  *strrchr(store, '/') = '\0';
  *strrchr(store, '/') = '\0';
  char p[600];
  snprintf(p, sizeof p, "%s/manifest.pb", store);
  if (data[0] % 2)
    fz_write(p, data + 1, size - 1);
  else
    fz_write(p, valid_manifest, valid_manifest_len);
  snprintf(p, sizeof p, "%s/shards/run1-rank0.pal", store);
  if (data[0] % 2)
    fz_write(p, "", 0);
  else
    fz_write(p, data + 1, size - 1);

  Palign__Manifest *m = NULL;
  int rc = pa_manifest_read(store, &m);
  fz_check_error(rc);
  if (!rc) {
    fz_check_error(pa_settings_check(store, m->settings, m->settings));
    palign__manifest__free_unpacked(m, NULL);
  }
  size_t counts[6];
  fz_check_error(pa_store_read(store, visit, NULL, counts));
  pa_query_summary s;
  fz_check_error(pa_query_summarise(store, problem, NULL, &s));
  pa_query_summary_free(&s);
  Palign__SubjectResult *r = NULL;
  if (!pa_query_subject(store, "11", &r))
    palign__subject_result__free_unpacked(r, NULL);
  FILE *devnull = fopen("/dev/null", "w");
  fz_check_error(pa_query_export(store, PA_QUERY_CSV, devnull, problem, NULL, NULL));
  fclose(devnull);
  pa_query_verify_result v;
  fz_check_error(pa_query_verify(store, problem, NULL, &v));
  return 0;
}
