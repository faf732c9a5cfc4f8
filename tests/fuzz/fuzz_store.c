/* A store's files: a shard (record frames, checksums, torn tails, resync
 * after damage, protobuf payloads) read by every reader palign has (the
 * store's, query summary, subject lookup, export, verify), or the manifest
 * or the index (the first byte says which file the input is: 0, 1, 2). Seed:
 * byte 0 and a shard of three records (two with a row of answers, one
 * failed), byte 1 and a manifest with settings and a run, or byte 2 and the
 * index of that shard. */
#include "fuzz_util.h"

#include "index.h"
#include "query.h"
#include "record.h"
#include "store.h"

#include <sys/stat.h>

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

static uint8_t *valid_manifest, valid_shard[1 << 16];
static size_t valid_manifest_len, valid_shard_len;

/* The store directory inputs are written into (made on first use). */
static const char *store_dir(void) {
  static char store[512];
  if (!store[0]) {
    snprintf(store, sizeof store, "%s", fz_path("store/shards/x"));
    *strrchr(store, '/') = '\0';
    *strrchr(store, '/') = '\0';
  }
  return store;
}

static void write_in(const char *name, const void *data, size_t n) {
  char p[600];
  snprintf(p, sizeof p, "%s/%s", store_dir(), name);
  fz_write(p, data, n);
}

/* An index made for the valid shard, as `palign query STORE index` writes it. */
static uint8_t *index_bytes(size_t *n) {
  write_in("manifest.pb", valid_manifest, valid_manifest_len);
  write_in("shards/run1-rank0.pal", valid_shard, valid_shard_len);
  if (pa_index_build(store_dir(), NULL, NULL))
    fz_die("index");
  char p[600];
  snprintf(p, sizeof p, "%s/index.pb", store_dir());
  FILE *f = fopen(p, "rb");
  static uint8_t buf[1 << 16];
  *n = f ? fread(buf, 1, sizeof buf, f) : 0;
  if (f)
    fclose(f);
  return buf;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc, (void)argv;
  valid_manifest = manifest_bytes(&valid_manifest_len);
  valid_shard_len = frame_record("11", false, valid_shard);
  valid_shard_len += frame_record("12", true, valid_shard + valid_shard_len);
  valid_shard_len += frame_record("13", false, valid_shard + valid_shard_len);
  const char *which = getenv("PALIGN_FUZZ_SEED_FILE");
  const int k = which ? atoi(which) : 0;
  static uint8_t seed[1 << 16];
  size_t n = 0;
  const uint8_t *body = k == 1 ? valid_manifest : k == 2 ? index_bytes(&n) : valid_shard;
  n = k == 1 ? valid_manifest_len : k == 2 ? n : valid_shard_len;
  seed[0] = (uint8_t)k;
  memcpy(seed + 1, body, n);
  fz_seed(seed, n + 1);
  return 0;
}

/* Mode 2: the input as an index, made to match the shard's size and time
 * wherever it names it, so that the lookup trusts its entries (offsets,
 * lengths, shard numbers) and must check each record itself. */
static void write_index(const uint8_t *data, size_t size) {
  Palign__StoreIndex *ix = palign__store_index__unpack(NULL, size, data);
  if (!ix) {
    write_in("index.pb", data, size);
    return;
  }
  char p[600];
  snprintf(p, sizeof p, "%s/shards/run1-rank0.pal", store_dir());
  struct stat sb;
  if (stat(p, &sb) != 0)
    abort();
  for (size_t i = 0; i < ix->n_shards; i++)
    if (ix->shards[i] && ix->shards[i]->name && !strcmp(ix->shards[i]->name, "run1-rank0.pal"))
      ix->shards[i]->size = (uint64_t)sb.st_size,
      ix->shards[i]->mtime_ns = (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec;
  const size_t n = palign__store_index__get_packed_size(ix);
  uint8_t *b = malloc(n + 1);
  if (!b)
    abort();
  palign__store_index__pack(ix, b);
  write_in("index.pb", b, n);
  free(b);
  palign__store_index__free_unpacked(ix, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  const int mode = data[0] % 3; /* 0: the shard, 1: the manifest, 2: the index */
  const char *store = store_dir();
  write_in("manifest.pb", mode == 1 ? data + 1 : valid_manifest, mode == 1 ? size - 1 : valid_manifest_len);
  if (mode == 0)
    write_in("shards/run1-rank0.pal", data + 1, size - 1);
  else
    write_in("shards/run1-rank0.pal", valid_shard, valid_shard_len);
  char p[600];
  snprintf(p, sizeof p, "%s/index.pb", store);
  unlink(p);
  if (mode == 2)
    write_index(data + 1, size - 1);

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
  static const char *const ids[] = {"11", "12", "13", "14", ""};
  for (int i = 0; i < 5; i++) {
    Palign__SubjectResult *r = NULL;
    if (!pa_query_subject(store, ids[i], &r)) {
      if (mode != 0 && strcmp(r->subject_id, ids[i])) /* a lookup returns the subject asked for */
        abort();
      palign__subject_result__free_unpacked(r, NULL);
    }
  }
  FILE *devnull = fopen("/dev/null", "w");
  fz_check_error(pa_query_export(store, PA_QUERY_CSV, devnull, problem, NULL, NULL));
  fz_check_error(pa_query_export(store, PA_QUERY_RECORDS, devnull, problem, NULL, NULL));
  fclose(devnull);
  pa_query_verify_result v;
  fz_check_error(pa_query_verify(store, problem, NULL, &v));
  return 0;
}
