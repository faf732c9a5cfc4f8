/* The store (store/store.h): records written by the shard writer must read
 * back whole and in (shard name, offset) order; the manifest must round-trip
 * and refuse garbage and newer formats; and every kind of damage a killed
 * writer or a flipped byte can leave (torn tails, bad checksums, bad lengths,
 * garbage, payloads that are not records, duplicates) must be reported at
 * its place while every intact record around it still reads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "status.h"
#include "query.h"
#include "store.h"
#include "testutil.h"
#include "tu_record.h"

/* ---- records made by hand ----------------------------------------------------- */

/* Two methods (icl, none), one row each, four items; k varies the values. */
static Palign__SubjectResult *make_subject(const char *id, int k) {
  char fingerprint[65], host[16];
  for (int i = 0; i < 64; i++)
    fingerprint[i] = "0123456789abcdef"[(i + k) % 16];
  fingerprint[64] = '\0';
  int32_t items[4];
  uint8_t truth[4], answer[2][4];
  float expected[4];
  double mae[5];
  for (int i = 0; i < 4; i++) {
    items[i] = 10 * k + i + 1;
    truth[i] = (uint8_t)(1 + (i + k) % 5);
    answer[0][i] = (uint8_t)(1 + (i + 2 * k) % 5);
    answer[1][i] = (uint8_t)(i == 2 ? 0 : 1 + (3 * i + k) % 5);
    expected[i] = 1.5f + 0.25f * (float)(i + k);
  }
  for (int t = 0; t < 5; t++)
    mae[t] = 0.125 * (t + k);
  static const char *const methods[2] = {"icl", "none"}, *const rows[2] = {"icl", "none (baseline)"};
  Palign__MethodResult *m[2];
  for (int j = 0; j < 2; j++) {
    Palign__MethodRow *row = tu_rec_row(rows[j], mae);
    row->predictions = tu_rec_predictions(4, items, truth, answer[j], j == 0 ? expected : NULL);
    row->metrics->mae_sum = 1.25 * (k + j);
    row->metrics->n_missing = j;
    m[j] = tu_rec_method(methods[j], &row, 1, j == 0 ? tu_rec_cost(0.5 * k, 1000 + k, 4) : NULL, NULL);
  }
  Palign__SubjectResult *r = tu_rec_subject(id, k, 3.5 + k, fingerprint, 42);
  tu_rec_set_methods(r, m, 2);
  snprintf(host, sizeof host, "node%d", k % 3);
  r->host = strcpy(TU_ARRAY(char, strlen(host) + 1), host);
  r->rank = k % 2;
  r->finished_unix = 1700000000 + k;
  return r;
}

enum { N_SUBJECTS = 8 };
static Palign__SubjectResult *subjects[N_SUBJECTS]; /* s0 .. s7 */

static int setup(void **s) {
  for (int k = 0; k < N_SUBJECTS; k++) {
    char id[16];
    snprintf(id, sizeof id, "s%d", k);
    subjects[k] = make_subject(id, k);
  }
  return tu_setup(s);
}

static int teardown(void **s) {
  tu_rec_free();
  return tu_teardown(s);
}

/* Appends subjects[ks[0..n)] to the store's shard for (run, rank). */
static void append(const char *store, int run, int rank, const int *ks, int n) {
  pa_shard_writer *w;
  if (pa_shard_open(store, run, rank, &w))
    fail_msg("%s", pa_errmsg());
  for (int i = 0; i < n; i++)
    if (pa_shard_append(w, subjects[ks[i]]))
      fail_msg("%s", pa_errmsg());
  assert_int_equal(pa_shard_close(w), PA_OK);
}

static const char *store_path(char *buf, size_t n, const char *name) {
  tu_path(buf, n, name);
  return buf;
}

static const char *shard_path(char *buf, size_t n, const char *store, int run, int rank) {
  char name[64];
  snprintf(buf, n, "%s/shards/%s", store, pa_shard_name(run, rank, name));
  return buf;
}

/* ---- what a read visits ---------------------------------------------------------- */

enum { MAX_VISITS = 64 };

typedef struct {
  pa_record_info info;
  char shard[64];
  uint8_t *packed; /* the record, for PA_RECORD_OK */
  size_t n_packed;
} visit_log_entry;

typedef struct {
  visit_log_entry v[MAX_VISITS];
  int n;
  int stop_after; /* > 0: return 7 from that visit on */
} visit_log;

static int log_visit(void *ctx, const pa_record_info *info, const Palign__SubjectResult *r) {
  visit_log *lg = ctx;
  assert_true(lg->n < MAX_VISITS);
  visit_log_entry *e = &lg->v[lg->n++];
  e->info = *info;
  snprintf(e->shard, sizeof e->shard, "%s", info->shard);
  e->info.shard = e->shard;
  assert_int_equal(r != NULL, info->status == PA_RECORD_OK);
  if (r)
    e->packed = tu_rec_pack(r, &e->n_packed);
  return lg->stop_after > 0 && lg->n >= lg->stop_after ? 7 : 0;
}

static void log_free(visit_log *lg) {
  for (int i = 0; i < lg->n; i++)
    free(lg->v[i].packed);
  memset(lg, 0, sizeof *lg);
}

static void read_all(const char *store, visit_log *lg, size_t counts[6]) {
  log_free(lg);
  int rc = pa_store_read(store, log_visit, lg, counts);
  if (rc)
    fail_msg("pa_store_read: %s", pa_errmsg());
}

/* Entry i is subject k, intact. */
static void expect_ok(const visit_log *lg, int i, int k) {
  assert_true(i < lg->n);
  const visit_log_entry *e = &lg->v[i];
  if (e->info.status != PA_RECORD_OK)
    fail_msg("visit %d: %s at %llu (%llu bytes), want s%d ok", i, pa_record_status_str(e->info.status),
             (unsigned long long)e->info.offset, (unsigned long long)e->info.length, k);
  assert_string_equal(e->info.subject_id, subjects[k]->subject_id);
  size_t n;
  uint8_t *want = tu_rec_pack(subjects[k], &n);
  assert_int_equal(e->n_packed, n);
  assert_memory_equal(e->packed, want, n);
  assert_int_equal(e->info.length, PA_STORE_RECORD_HEAD + n);
  free(want);
}

static void expect_damage(const visit_log *lg, int i, pa_record_status st, uint64_t offset, uint64_t length) {
  assert_true(i < lg->n);
  const visit_log_entry *e = &lg->v[i];
  if (e->info.status != st || e->info.offset != offset || e->info.length != length)
    fail_msg("visit %d: %s at %llu (%llu bytes), want %s at %llu (%llu bytes)", i, pa_record_status_str(e->info.status),
             (unsigned long long)e->info.offset, (unsigned long long)e->info.length, pa_record_status_str(st),
             (unsigned long long)offset, (unsigned long long)length);
  assert_string_equal(e->info.subject_id, "");
}

/* A fresh store whose one shard (run 1, rank 0) holds subjects 0..n-1; their
 * offsets and sizes in off[], len[]; the shard's bytes in *bytes. */
static void one_shard(const char *name, int n, char *store, size_t cap, uint64_t *off, uint64_t *len, char **bytes,
                      size_t *size) {
  store_path(store, cap, name);
  int ks[N_SUBJECTS];
  for (int i = 0; i < n; i++)
    ks[i] = i;
  append(store, 1, 0, ks, n);
  visit_log lg = {0};
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, n);
  for (int i = 0; i < n; i++) {
    expect_ok(&lg, i, i);
    off[i] = lg.v[i].info.offset, len[i] = lg.v[i].info.length;
  }
  log_free(&lg);
  char path[600];
  *bytes = tu_slurp(shard_path(path, sizeof path, store, 1, 0), size);
}

static void rewrite(const char *store, const void *p, size_t n) {
  char path[600];
  tu_write(shard_path(path, sizeof path, store, 1, 0), p, n);
}

/* ---- the tests -------------------------------------------------------------------- */

static void test_names_and_frame(void **state) {
  char buf[64];
  assert_string_equal(pa_shard_name(3, 12, buf), "run3-rank12.pal");
  static const char *const want[] = {"ok", "torn", "checksum", "frame", "protobuf", "duplicate"};
  for (int s = PA_RECORD_OK; s <= PA_RECORD_DUPLICATE; s++)
    assert_string_equal(pa_record_status_str((pa_record_status)s), want[s]);
  uint8_t rec[PA_STORE_RECORD_HEAD + 9];
  assert_int_equal(pa_record_frame((const uint8_t *)"123456789", 9, rec), sizeof rec);
  /* "PAR1", 9, then the standard CRC-32 check value 0xCBF43926, little-endian */
  static const uint8_t head[] = {'P', 'A', 'R', '1', 9, 0, 0, 0, 0x26, 0x39, 0xf4, 0xcb};
  assert_memory_equal(rec, head, sizeof head);
  assert_memory_equal(rec + PA_STORE_RECORD_HEAD, "123456789", 9);
}

static void test_round_trip(void **state) {
  char store[300];
  store_path(store, sizeof store, "roundtrip");
  /* written out of name order */
  append(store, 2, 0, (int[]){5, 6}, 2);
  append(store, 1, 1, (int[]){3, 4}, 2);
  append(store, 1, 0, (int[]){0, 1, 2}, 3);
  char path[600];
  snprintf(path, sizeof path, "%s/shards/notes.txt", store);
  tu_write_text(path, "not a shard");
  visit_log lg = {0};
  size_t counts[6] = {9, 9, 9, 9, 9, 9};
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 7);
  static const char *const shard[] = {"run1-rank0.pal", "run1-rank0.pal", "run1-rank0.pal", "run1-rank1.pal",
                                      "run1-rank1.pal", "run2-rank0.pal", "run2-rank0.pal"};
  uint64_t offset = 0;
  for (int i = 0; i < 7; i++) {
    expect_ok(&lg, i, i);
    assert_string_equal(lg.v[i].shard, shard[i]);
    if (i > 0 && strcmp(shard[i], shard[i - 1]) != 0)
      offset = 0;
    assert_int_equal(lg.v[i].info.offset, offset);
    offset += lg.v[i].info.length;
  }
  assert_int_equal(counts[PA_RECORD_OK], 7);
  for (int s = 1; s < 6; s++)
    assert_int_equal(counts[s], 0);
  /* and field by field, for one */
  Palign__SubjectResult *r = palign__subject_result__unpack(NULL, lg.v[3].n_packed, lg.v[3].packed);
  assert_non_null(r);
  assert_string_equal(r->subject_id, "s3");
  assert_int_equal(r->n_methods, 2);
  assert_string_equal(r->methods[0]->method, "icl");
  assert_int_equal(r->methods[0]->rows[0]->predictions->n_items, 4);
  assert_int_equal(r->methods[0]->rows[0]->predictions->items[3], 34);
  assert_int_equal(r->methods[1]->rows[0]->predictions->answer.len, 4);
  assert_int_equal(r->methods[1]->rows[0]->predictions->answer.data[2], 0);
  assert_true(r->methods[0]->rows[0]->predictions->expected[1] == 2.5f);
  assert_true(r->methods[0]->rows[0]->metrics->mae[4] == 0.875);
  assert_int_equal(r->methods[0]->cost->tokens, 1003);
  assert_int_equal(r->finished_unix, 1700000003);
  palign__subject_result__free_unpacked(r, NULL);
  log_free(&lg);
}

static Palign__Settings settings(void) {
  static char *methods[] = {"icl", "pas"};
  static double alphas[] = {0, 1, 2.5};
  Palign__Settings s = PALIGN__SETTINGS__INIT;
  s.model_fingerprint = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
  s.inventory_fingerprint = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
  s.n_methods = 2, s.methods = methods;
  s.mode = "logits";
  s.run_seed = 1;
  s.holdout_per_trait = 2;
  s.n_alphas = 3, s.alphas = alphas;
  s.top_k = 48;
  s.subjects_file = "subjects.json";
  return s;
}

static uint8_t *pack_manifest(const Palign__Manifest *m, size_t *n) {
  *n = palign__manifest__get_packed_size(m);
  uint8_t *p = malloc(*n ? *n : 1);
  assert_non_null(p);
  assert_int_equal(palign__manifest__pack(m, p), *n);
  return p;
}

static void test_manifest(void **state) {
  char store[300], path[600];
  store_path(store, sizeof store, "manifest");
  Palign__Manifest *got = NULL;
  assert_int_equal(pa_manifest_read(store, &got), PA_ENOTFOUND);
  assert_null(got);
  assert_non_null(strstr(pa_errmsg(), "manifest.pb"));

  Palign__Settings st = settings();
  Palign__RunRecord run = PALIGN__RUN_RECORD__INIT;
  run.started_unix = 1700000000, run.ranks = 4, run.git_revision = "abc1234", run.host = "login1";
  Palign__RunRecord *runs[] = {&run};
  char *shards[] = {"run1-rank1.pal", "run1-rank2.pal"};
  Palign__Manifest m = PALIGN__MANIFEST__INIT;
  m.format = PA_STORE_FORMAT, m.settings = &st, m.n_shards = 2, m.shards = shards, m.n_runs = 1, m.runs = runs;
  m.subjects_total = 300;
  assert_int_equal(pa_manifest_write(store, &m), PA_OK);
  snprintf(path, sizeof path, "%s/shards", store);
  struct stat sb;
  assert_int_equal(stat(path, &sb), 0);
  assert_true(S_ISDIR(sb.st_mode));

  assert_int_equal(pa_manifest_read(store, &got), PA_OK);
  size_t n1, n2;
  uint8_t *a = pack_manifest(&m, &n1), *b = pack_manifest(got, &n2);
  assert_int_equal(n1, n2);
  assert_memory_equal(a, b, n1);
  free(a), free(b);
  assert_string_equal(got->settings->subjects_file, "subjects.json");
  assert_string_equal(got->runs[0]->git_revision, "abc1234");
  palign__manifest__free_unpacked(got, NULL);

  /* replaced whole, leaving no temporary file beside it */
  run.finished_unix = 1700000100, run.subjects_done = 299;
  m.subjects_total = 301;
  assert_int_equal(pa_manifest_write(store, &m), PA_OK);
  assert_int_equal(pa_manifest_read(store, &got), PA_OK);
  assert_int_equal(got->subjects_total, 301);
  assert_int_equal(got->runs[0]->subjects_done, 299);
  palign__manifest__free_unpacked(got, NULL);
  DIR *d = opendir(store);
  assert_non_null(d);
  int entries = 0;
  for (struct dirent *e; (e = readdir(d));)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
      entries++;
      assert_true(!strcmp(e->d_name, "manifest.pb") || !strcmp(e->d_name, "shards"));
    }
  closedir(d);
  assert_int_equal(entries, 2);

  /* garbage, an empty file, format 0, a newer format */
  snprintf(path, sizeof path, "%s/manifest.pb", store);
  tu_write(path, "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 12);
  assert_int_equal(pa_manifest_read(store, &got), PA_EFORMAT);
  assert_null(got);
  assert_non_null(strstr(pa_errmsg(), path));
  assert_non_null(strstr(pa_errmsg(), "not a palign manifest"));
  tu_write(path, "", 0);
  assert_int_equal(pa_manifest_read(store, &got), PA_EFORMAT);
  assert_non_null(strstr(pa_errmsg(), path));
  m.format = 0;
  assert_int_equal(pa_manifest_write(store, &m), PA_OK);
  assert_int_equal(pa_manifest_read(store, &got), PA_EFORMAT);
  m.format = PA_STORE_FORMAT + 1;
  assert_int_equal(pa_manifest_write(store, &m), PA_OK);
  assert_int_equal(pa_manifest_read(store, &got), PA_EUNSUPPORTED);
  assert_null(got);
  assert_non_null(strstr(pa_errmsg(), path));
}

static void test_settings_check(void **state) {
  Palign__Settings have = settings(), want = settings();
  assert_int_equal(pa_settings_check("S", &have, &want), PA_OK);

  static char *none[] = {"none"};
  want.model_fingerprint = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
  want.n_methods = 1, want.methods = none;
  want.run_seed = 2;
  assert_int_equal(pa_settings_check("S", &have, &want), PA_EINVAL);
  const char *msg = pa_errmsg();
  assert_non_null(strstr(msg, "S: this store was made with other settings: "));
  assert_non_null(strstr(msg, "model_fingerprint '0123456789abcdef..' here, 'fedcba9876543210..' asked"));
  assert_non_null(strstr(msg, "methods 'icl,pas' here, 'none' asked"));
  assert_non_null(strstr(msg, "run_seed 1 here, 2 asked"));
  assert_null(strstr(msg, "mode '"));
  assert_null(strstr(msg, "inventory_fingerprint"));
  assert_null(strstr(msg, "alphas"));

  /* the same methods in another order differ; grids that print alike are
   * printed in full */
  static char *swapped[] = {"pas", "icl"};
  static double near[] = {0, 1, 2.5000001};
  want = settings();
  want.methods = swapped;
  want.n_alphas = 3, want.alphas = near;
  want.lowercase_items = 1;
  want.mode = "generate";
  assert_int_equal(pa_settings_check("S", &have, &want), PA_EINVAL);
  msg = pa_errmsg();
  assert_non_null(strstr(msg, "methods 'icl,pas' here, 'pas,icl' asked"));
  assert_non_null(strstr(msg, "mode 'logits' here, 'generate' asked"));
  assert_non_null(strstr(msg, "lowercase_items false here, true asked"));
  assert_non_null(strstr(msg, "alphas '0,1,2.5' here, '0,1,2.50000"));
  assert_null(strstr(msg, "model_fingerprint"));

  /* DPO's settings on one side only: one difference, not each of its fields */
  Palign__DpoSettings dpo = PALIGN__DPO_SETTINGS__INIT;
  dpo.epochs = 1, dpo.batch = 4, dpo.rank = 8, dpo.lr = 1e-3, dpo.beta = 0.1;
  want = settings();
  have.dpo = &dpo;
  assert_int_equal(pa_settings_check("S", &have, &want), PA_EINVAL);
  msg = pa_errmsg();
  assert_non_null(strstr(msg, "dpo set here, none asked"));
  assert_null(strstr(msg, "dpo."));
  have.dpo = NULL, want.dpo = &dpo;
  assert_int_equal(pa_settings_check("S", &have, &want), PA_EINVAL);
  assert_non_null(strstr(pa_errmsg(), "dpo none here, set asked"));
}

static void test_torn_tail(void **state) {
  char store[300], *bytes;
  uint64_t off[3], len[3];
  size_t size;
  one_shard("torn", 3, store, sizeof store, off, len, &bytes, &size);
  visit_log lg = {0};
  for (uint64_t j = 0; j < len[2]; j++) {
    rewrite(store, bytes, (size_t)(off[2] + j));
    size_t counts[6];
    read_all(store, &lg, counts);
    assert_int_equal(lg.n, j ? 3 : 2);
    expect_ok(&lg, 0, 0);
    expect_ok(&lg, 1, 1);
    if (j)
      expect_damage(&lg, 2, PA_RECORD_TORN, off[2], j);
    assert_int_equal(counts[PA_RECORD_OK], 2);
    assert_int_equal(counts[PA_RECORD_TORN], j ? 1 : 0);
  }
  log_free(&lg);
  free(bytes);
}

static void test_flipped_payload(void **state) {
  char store[300], *bytes;
  uint64_t off[4], len[4];
  size_t size;
  one_shard("checksum", 4, store, sizeof store, off, len, &bytes, &size);
  visit_log lg = {0};
  /* every byte of the crc and the payload of the second record */
  for (uint64_t p = off[1] + 8; p < off[1] + len[1]; p++) {
    bytes[p] ^= 0x55;
    rewrite(store, bytes, size);
    bytes[p] ^= 0x55;
    size_t counts[6];
    read_all(store, &lg, counts);
    assert_int_equal(lg.n, 4);
    expect_ok(&lg, 0, 0);
    expect_damage(&lg, 1, PA_RECORD_CHECKSUM, off[1], len[1]);
    expect_ok(&lg, 2, 2);
    expect_ok(&lg, 3, 3);
    assert_int_equal(counts[PA_RECORD_CHECKSUM], 1);
  }
  /* the last record, complete but damaged, is not torn */
  bytes[off[3] + 20] ^= 1;
  rewrite(store, bytes, size);
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, 4);
  expect_damage(&lg, 3, PA_RECORD_CHECKSUM, off[3], len[3]);
  log_free(&lg);
  free(bytes);
}

static void test_flipped_length(void **state) {
  char store[300], *bytes;
  uint64_t off[4], len[4];
  size_t size;
  one_shard("length", 4, store, sizeof store, off, len, &bytes, &size);
  visit_log lg = {0};
  static const uint8_t flips[] = {0x01, 0x02, 0x10, 0x80, 0xff};
  for (int b = 4; b < 8; b++)
    for (size_t f = 0; f < sizeof flips; f++) {
      bytes[off[1] + b] ^= flips[f];
      rewrite(store, bytes, size);
      bytes[off[1] + b] ^= flips[f];
      read_all(store, &lg, NULL);
      assert_int_equal(lg.n, 4);
      expect_ok(&lg, 0, 0);
      const pa_record_status st = lg.v[1].info.status;
      assert_true(st == PA_RECORD_CHECKSUM || st == PA_RECORD_FRAME);
      expect_damage(&lg, 1, st, off[1], len[1]);
      expect_ok(&lg, 2, 2);
      expect_ok(&lg, 3, 3);
    }
  /* a length over the limit is no frame at all */
  bytes[off[1] + 7] ^= 0x80;
  rewrite(store, bytes, size);
  read_all(store, &lg, NULL);
  expect_damage(&lg, 1, PA_RECORD_FRAME, off[1], len[1]);
  log_free(&lg);
  free(bytes);
}

static void test_garbage(void **state) {
  char store[300], *bytes;
  uint64_t off[3], len[3];
  size_t size;
  one_shard("garbage", 3, store, sizeof store, off, len, &bytes, &size);
  visit_log lg = {0};
  /* before the first record, between the first two, and at the end */
  char *g = malloc(2 * size + 32);
  assert_non_null(g);
  size_t n = 0;
  memcpy(g + n, "xy", 2), n += 2;
  memcpy(g + n, bytes, len[0]), n += len[0];
  memcpy(g + n, "garbage!", 8), n += 8;
  memcpy(g + n, bytes + off[1], size - off[1]), n += size - off[1];
  memcpy(g + n, "zz!", 3), n += 3;
  rewrite(store, g, n);
  size_t counts[6];
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 6);
  expect_damage(&lg, 0, PA_RECORD_FRAME, 0, 2);
  expect_ok(&lg, 1, 0);
  expect_damage(&lg, 2, PA_RECORD_FRAME, 2 + len[0], 8);
  expect_ok(&lg, 3, 1);
  expect_ok(&lg, 4, 2);
  expect_damage(&lg, 5, PA_RECORD_FRAME, n - 3, 3);
  assert_int_equal(counts[PA_RECORD_FRAME], 3);
  assert_int_equal(counts[PA_RECORD_OK], 3);

  /* a flipped magic byte, and a head claiming more than the limit */
  memcpy(g, bytes, size);
  g[off[1] + 2] ^= 0x20;
  static const uint8_t huge[PA_STORE_RECORD_HEAD] = {'P', 'A', 'R', '1', 1, 0, 0, 4 /* 64 MiB + 1 */, 0, 0, 0, 0};
  memcpy(g + size, huge, sizeof huge);
  memcpy(g + size + sizeof huge, bytes, len[0]);
  rewrite(store, g, size + sizeof huge + len[0]);
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, 5);
  expect_ok(&lg, 0, 0);
  expect_damage(&lg, 1, PA_RECORD_FRAME, off[1], len[1]);
  expect_ok(&lg, 2, 2);
  expect_damage(&lg, 3, PA_RECORD_FRAME, size, sizeof huge);
  assert_int_equal(lg.v[4].info.status, PA_RECORD_DUPLICATE); /* s0 again */

  /* damage in the middle, then a torn tail */
  memcpy(g, bytes, size);
  g[off[1] + 30] ^= 1;
  rewrite(store, g, size - 5);
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, 3);
  expect_ok(&lg, 0, 0);
  expect_damage(&lg, 1, PA_RECORD_CHECKSUM, off[1], len[1]);
  expect_damage(&lg, 2, PA_RECORD_TORN, off[2], len[2] - 5);
  log_free(&lg);
  free(g);
  free(bytes);
}

static void test_not_protobuf(void **state) {
  char store[300], *bytes;
  uint64_t off[2], len[2];
  size_t size;
  one_shard("protobuf", 2, store, sizeof store, off, len, &bytes, &size);
  uint8_t junk[16];
  memset(junk, 0xff, sizeof junk); /* a varint tag that never ends */
  uint8_t *g = malloc(size + PA_STORE_RECORD_HEAD + sizeof junk);
  assert_non_null(g);
  memcpy(g, bytes, len[0]);
  const size_t n = pa_record_frame(junk, sizeof junk, g + len[0]);
  assert_int_equal(n, PA_STORE_RECORD_HEAD + sizeof junk);
  memcpy(g + len[0] + n, bytes + off[1], len[1]);
  rewrite(store, g, size + n);
  visit_log lg = {0};
  size_t counts[6];
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 3);
  expect_ok(&lg, 0, 0);
  expect_damage(&lg, 1, PA_RECORD_PROTOBUF, len[0], n);
  expect_ok(&lg, 2, 1);
  assert_int_equal(counts[PA_RECORD_PROTOBUF], 1);
  log_free(&lg);
  free(g);
  free(bytes);
}

static void test_duplicate(void **state) {
  char store[300];
  store_path(store, sizeof store, "duplicate");
  append(store, 1, 0, (int[]){0, 1}, 2);
  append(store, 2, 0, (int[]){1, 2, 0}, 3);
  visit_log lg = {0};
  size_t counts[6];
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 5);
  expect_ok(&lg, 0, 0);
  expect_ok(&lg, 1, 1);
  for (int i = 2; i <= 4; i += 2) {
    assert_int_equal(lg.v[i].info.status, PA_RECORD_DUPLICATE);
    assert_string_equal(lg.v[i].shard, "run2-rank0.pal");
    assert_null(lg.v[i].packed);
  }
  assert_string_equal(lg.v[2].info.subject_id, "s1");
  assert_int_equal(lg.v[2].info.offset, 0);
  expect_ok(&lg, 3, 2);
  assert_string_equal(lg.v[4].info.subject_id, "s0");
  assert_int_equal(counts[PA_RECORD_OK], 3);
  assert_int_equal(counts[PA_RECORD_DUPLICATE], 2);
  log_free(&lg);
}

static void test_too_large(void **state) {
  char store[300], path[600];
  store_path(store, sizeof store, "large");
  Palign__SubjectResult *big = make_subject("big", 1);
  char *error = malloc(PA_STORE_MAX_RECORD + 1);
  assert_non_null(error);
  memset(error, 'x', PA_STORE_MAX_RECORD);
  error[PA_STORE_MAX_RECORD] = '\0';
  big->failed = 1, big->error = error;
  pa_shard_writer *w;
  assert_int_equal(pa_shard_open(store, 1, 0, &w), PA_OK);
  assert_int_equal(pa_shard_append(w, big), PA_EINVAL);
  shard_path(path, sizeof path, store, 1, 0);
  assert_non_null(strstr(pa_errmsg(), path));
  assert_non_null(strstr(pa_errmsg(), "'big'"));
  assert_int_equal(pa_shard_append(w, subjects[0]), PA_OK);
  assert_int_equal(pa_shard_close(w), PA_OK);
  free(error);
  visit_log lg = {0};
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, 1);
  expect_ok(&lg, 0, 0);
  log_free(&lg);
}

static void test_empty_and_missing(void **state) {
  char store[300], path[600];
  visit_log lg = {0};
  size_t counts[6];
  store_path(store, sizeof store, "missing");
  assert_int_equal(pa_store_read(store, log_visit, &lg, counts), PA_ENOTFOUND);
  assert_non_null(strstr(pa_errmsg(), store));

  /* a store without shards, then with an empty shard before a full one */
  store_path(store, sizeof store, "empty");
  assert_int_equal(mkdir(store, 0777), 0);
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 0);
  assert_int_equal(counts[PA_RECORD_OK], 0);
  append(store, 1, 1, (int[]){4}, 1);
  pa_shard_writer *w;
  assert_int_equal(pa_shard_open(store, 1, 0, &w), PA_OK);
  assert_int_equal(pa_shard_close(w), PA_OK);
  assert_int_equal(pa_shard_close(NULL), PA_OK);
  struct stat sb;
  assert_int_equal(stat(shard_path(path, sizeof path, store, 1, 0), &sb), 0);
  assert_int_equal(sb.st_size, 0);
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 1);
  expect_ok(&lg, 0, 4);
  assert_string_equal(lg.v[0].shard, "run1-rank1.pal");

  /* a shard that cannot be read: a directory by a shard's name */
  snprintf(path, sizeof path, "%s/shards/run9-rank0.pal", store);
  assert_int_equal(mkdir(path, 0777), 0);
  log_free(&lg);
  assert_int_equal(pa_store_read(store, log_visit, &lg, NULL), PA_EIO);
  assert_non_null(strstr(pa_errmsg(), path));
  log_free(&lg);
}

static void test_visit_stops(void **state) {
  char store[300];
  store_path(store, sizeof store, "stop");
  append(store, 1, 0, (int[]){0, 1, 2}, 3);
  append(store, 1, 1, (int[]){3}, 1);
  visit_log lg = {.stop_after = 2};
  size_t counts[6];
  assert_int_equal(pa_store_read(store, log_visit, &lg, counts), 7);
  assert_int_equal(lg.n, 2);
  assert_int_equal(counts[PA_RECORD_OK], 2);
  log_free(&lg);
  /* no visit: counting only */
  assert_int_equal(pa_store_read(store, NULL, NULL, counts), PA_OK);
  assert_int_equal(counts[PA_RECORD_OK], 4);
}

/* Many small records (framed by hand, not fsynced one by one): the seen-set
 * grows, and every duplicate across shards is still found. */
static void test_many(void **state) {
  enum { N = 100000, REPEAT = 1000 };
  char store[300], path[600];
  store_path(store, sizeof store, "many");
  append(store, 1, 0, (int[]){0}, 1); /* creates the directories */
  uint8_t *buf = malloc((size_t)(N + REPEAT) * 64);
  assert_non_null(buf);
  size_t n = 0;
  for (int i = 0; i < N + REPEAT; i++) {
    char id[32];
    snprintf(id, sizeof id, "subject-%d", i < N ? i : (i - N) * 97);
    Palign__SubjectResult r = PALIGN__SUBJECT_RESULT__INIT;
    r.subject_id = id, r.subject_index = i;
    uint8_t payload[48];
    const size_t len = palign__subject_result__get_packed_size(&r);
    assert_true(len <= sizeof payload);
    palign__subject_result__pack(&r, payload);
    n += pa_record_frame(payload, (uint32_t)len, buf + n);
    if (i == N / 2 || i == N + REPEAT - 1) { /* two shards */
      tu_write(shard_path(path, sizeof path, store, 2, i == N / 2 ? 0 : 1), buf, n);
      n = 0;
    }
  }
  free(buf);
  size_t counts[6];
  assert_int_equal(pa_store_read(store, NULL, NULL, counts), PA_OK);
  assert_int_equal(counts[PA_RECORD_OK], N + 1);
  assert_int_equal(counts[PA_RECORD_DUPLICATE], REPEAT);
  for (int s = PA_RECORD_TORN; s <= PA_RECORD_PROTOBUF; s++)
    assert_int_equal(counts[s], 0);
}

static void print_problem(void *ctx, const char *line) {
  (void)ctx;
  fprintf(stderr, "    verify: %s\n", line);
}

/* A shard past its limit goes on in numbered parts, each within the limit
 * (a part holds at least one record), read back in order with the shards
 * in run, rank, part order (run 10 after run 9), and the manifest lists a
 * shard by its first part: verify sees no unlisted file. */
static void test_rotation(void **state) {
  (void)state;
  char store[300], path[600], name[64];
  store_path(store, sizeof store, "rotation");
  size_t n0;
  uint8_t *p0 = tu_rec_pack(subjects[0], &n0);
  free(p0);
  const uint64_t rec = PA_STORE_RECORD_HEAD + n0, limit = 2 * rec + rec / 2; /* two records a part */
  pa_shard_writer *w;
  assert_int_equal(pa_shard_open(store, 9, 1, &w), PA_OK);
  pa_shard_set_limit(w, limit);
  for (int k = 0; k < N_SUBJECTS; k++)
    assert_int_equal(pa_shard_append(w, subjects[k]), PA_OK);
  assert_int_equal(pa_shard_close(w), PA_OK);
  append(store, 10, 1, (int[]){0}, 1); /* a later run: read after run 9 */
  /* s0..s7 are about the same size: 2 a part, 4 parts */
  for (int part = 1; part <= 5; part++) {
    snprintf(path, sizeof path, "%s/shards/%s", store, pa_shard_part_name(9, 1, part, name));
    struct stat sb;
    if (part == 5) {
      assert_int_not_equal(stat(path, &sb), 0);
      break;
    }
    if (stat(path, &sb) != 0)
      fail_msg("no part %d (%s)", part, path);
    assert_true((uint64_t)sb.st_size <= limit);
    assert_true((uint64_t)sb.st_size >= rec);
  }
  assert_string_equal(pa_shard_part_name(9, 1, 1, name), "run9-rank1.pal");
  assert_string_equal(pa_shard_part_name(9, 1, 3, name), "run9-rank1.p3.pal");
  assert_string_equal(pa_shard_part_base("run9-rank1.p3.pal", name), "run9-rank1.pal");
  assert_string_equal(pa_shard_part_base("run9-rank1.pal", name), "run9-rank1.pal");
  assert_string_equal(pa_shard_part_base("run9-rank1.p1.pal", name), "run9-rank1.p1.pal"); /* no part 1 name */
  assert_string_equal(pa_shard_part_base("notes.pal", name), "notes.pal");
  visit_log lg = {0};
  size_t counts[6];
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, N_SUBJECTS + 1);
  for (int k = 0; k < N_SUBJECTS; k++)
    expect_ok(&lg, k, k);
  assert_string_equal(lg.v[1].shard, "run9-rank1.pal");
  assert_string_equal(lg.v[2].shard, "run9-rank1.p2.pal");
  assert_string_equal(lg.v[7].shard, "run9-rank1.p4.pal");
  assert_string_equal(lg.v[8].shard, "run10-rank1.pal");
  assert_int_equal(lg.v[8].info.status, PA_RECORD_DUPLICATE); /* s0 again, in the later run */
  log_free(&lg);
  /* the manifest lists the shards by their first parts: verify is clean */
  Palign__Manifest m = PALIGN__MANIFEST__INIT;
  char *listed[2] = {"shards/run9-rank1.pal", "shards/run10-rank1.pal"};
  m.format = 1, m.n_shards = 2, m.shards = listed;
  assert_int_equal(pa_manifest_write(store, &m), PA_OK);
  pa_query_verify_result v;
  assert_int_equal(pa_query_verify(store, print_problem, NULL, &v), PA_OK);
  assert_int_equal(v.problems, 2); /* the duplicate and the settings this manifest lacks, no unlisted file */
}

/* Runs are numbered past every run the manifest records and every shard
 * file present; a shard name is never opened twice; a shard nothing was
 * written to can be discarded. */
static void test_run_numbers(void **state) {
  char store[300], path[600];
  store_path(store, sizeof store, "runs");
  int run = 0;
  assert_int_equal(pa_store_next_run(store, NULL, &run), PA_OK); /* no store yet */
  assert_int_equal(run, 1);
  append(store, 3, 1, (int[]){0}, 1);
  assert_int_equal(pa_store_next_run(store, NULL, &run), PA_OK);
  assert_int_equal(run, 4);
  Palign__Manifest m = PALIGN__MANIFEST__INIT;
  m.n_runs = 5;
  assert_int_equal(pa_store_next_run(store, &m, &run), PA_OK);
  assert_int_equal(run, 6);
  m.n_runs = 2;
  assert_int_equal(pa_store_next_run(store, &m, &run), PA_OK);
  assert_int_equal(run, 4);

  /* the same shard again: refused, its records untouched */
  pa_shard_writer *w = NULL;
  pa_error_clear();
  assert_int_equal(pa_shard_open(store, 3, 1, &w), PA_EIO);
  assert_null(w);
  if (!strstr(pa_errmsg(), "run3-rank1.pal: exists already"))
    fail_msg("message: %s", pa_errmsg());
  visit_log lg = {0};
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, 1);
  expect_ok(&lg, 0, 0);
  log_free(&lg);

  /* discarding: an untouched shard goes, one with a record stays */
  assert_int_equal(pa_shard_open(store, 7, 0, &w), PA_OK);
  assert_int_equal(access(shard_path(path, sizeof path, store, 7, 0), F_OK), 0);
  assert_int_equal(pa_shard_discard(w), PA_OK);
  assert_int_equal(access(path, F_OK), -1);
  assert_int_equal(pa_shard_open(store, 8, 0, &w), PA_OK);
  assert_int_equal(pa_shard_append(w, subjects[1]), PA_OK);
  assert_int_equal(pa_shard_discard(w), PA_OK);
  read_all(store, &lg, NULL);
  assert_int_equal(lg.n, 2);
  expect_ok(&lg, 1, 1);
  log_free(&lg);
  assert_int_equal(pa_shard_discard(NULL), PA_OK);
}

/* One job at a time: a store another process holds is refused, naming it;
 * once that process is gone the store can be taken. */
static void test_lock(void **state) {
  char store[300];
  store_path(store, sizeof store, "locked");
  int to_child[2], to_parent[2];
  assert_int_equal(pipe(to_child), 0);
  assert_int_equal(pipe(to_parent), 0);
  const pid_t child = fork();
  assert_true(child >= 0);
  if (child == 0) {
    pa_store_guard *g = NULL;
    char c = pa_store_lock(store, &g) == PA_OK ? 'y' : 'n';
    if (write(to_parent[1], &c, 1) != 1 || read(to_child[0], &c, 1) != 1)
      _exit(2);
    _exit(0); /* the lock goes with the process */
  }
  char c = 0;
  assert_int_equal(read(to_parent[0], &c, 1), 1);
  assert_int_equal(c, 'y');
  pa_store_guard *g = (pa_store_guard *)0x1;
  pa_error_clear();
  assert_int_equal(pa_store_lock(store, &g), PA_EINVAL);
  assert_null(g);
  char want[64];
  snprintf(want, sizeof want, "another job (process %ld)", (long)child);
  if (!strstr(pa_errmsg(), store) || !strstr(pa_errmsg(), want))
    fail_msg("message '%s' should name %s and '%s'", pa_errmsg(), store, want);
  assert_int_equal(write(to_child[1], "x", 1), 1);
  int st = 0;
  assert_int_equal(waitpid(child, &st, 0), child);
  assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  assert_int_equal(pa_store_lock(store, &g), PA_OK);
  assert_non_null(g);
  pa_store_unlock(g);
  pa_store_unlock(NULL);
  close(to_child[0]), close(to_child[1]), close(to_parent[0]), close(to_parent[1]);
}

/* A frame whose checksum holds around an empty message, or one without a
 * subject id, is not a record. */
static void test_empty_message(void **state) {
  char store[300], *bytes;
  uint64_t off[1], len[1];
  size_t size;
  one_shard("anon", 1, store, sizeof store, off, len, &bytes, &size);
  Palign__SubjectResult anon = *subjects[0];
  anon.subject_id = "";
  size_t n_anon;
  uint8_t *packed = tu_rec_pack(&anon, &n_anon);
  uint8_t *g = malloc(size + 2 * PA_STORE_RECORD_HEAD + n_anon);
  assert_non_null(g);
  memcpy(g, bytes, size);
  size_t n = size + pa_record_frame(NULL, 0, g + size);
  n += pa_record_frame(packed, (uint32_t)n_anon, g + n);
  rewrite(store, g, n);
  visit_log lg = {0};
  size_t counts[6];
  read_all(store, &lg, counts);
  assert_int_equal(lg.n, 3);
  expect_ok(&lg, 0, 0);
  expect_damage(&lg, 1, PA_RECORD_PROTOBUF, size, PA_STORE_RECORD_HEAD);
  expect_damage(&lg, 2, PA_RECORD_PROTOBUF, size + PA_STORE_RECORD_HEAD, PA_STORE_RECORD_HEAD + n_anon);
  assert_int_equal(counts[PA_RECORD_PROTOBUF], 2);
  log_free(&lg);
  free(packed), free(g), free(bytes);
}

/* A shard crafted with a plausible record head every 12 bytes (each claiming
 * 60,000 bytes with a wrong checksum): the search for the next record stops
 * once it has checksummed 8x the shard's size, so reading it costs about
 * 10 MB of checksums instead of 10 GB, and it all reads as damage. */
static void test_hostile_heads(void **state) {
  char store[300], path[600];
  store_path(store, sizeof store, "hostile");
  append(store, 1, 0, (int[]){0}, 1);
  const size_t n = 1u << 20;
  uint8_t *g = malloc(n);
  assert_non_null(g);
  for (size_t o = 0; o + PA_STORE_RECORD_HEAD <= n; o += PA_STORE_RECORD_HEAD) {
    memcpy(g + o, "PAR1", 4);
    memcpy(g + o + 4, (uint8_t[]){0x60, 0xea, 0, 0}, 4); /* 60,000 */
    memset(g + o + 8, 0, 4);
  }
  tu_write(shard_path(path, sizeof path, store, 1, 0), g, n);
  visit_log lg = {0};
  size_t counts[6];
  read_all(store, &lg, counts);
  assert_int_equal(counts[PA_RECORD_OK], 0);
  uint64_t covered = 0;
  for (int i = 0; i < lg.n; i++) {
    assert_int_equal(lg.v[i].info.offset, covered); /* the stretches cover the shard, in order */
    covered += lg.v[i].info.length;
  }
  assert_int_equal(covered, n);
  log_free(&lg);
  free(g);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_names_and_frame), cmocka_unit_test(test_round_trip),
      cmocka_unit_test(test_manifest),        cmocka_unit_test(test_settings_check),
      cmocka_unit_test(test_torn_tail),       cmocka_unit_test(test_flipped_payload),
      cmocka_unit_test(test_flipped_length),  cmocka_unit_test(test_garbage),
      cmocka_unit_test(test_not_protobuf),    cmocka_unit_test(test_duplicate),
      cmocka_unit_test(test_too_large),       cmocka_unit_test(test_empty_and_missing),
      cmocka_unit_test(test_visit_stops),     cmocka_unit_test(test_many),
      cmocka_unit_test(test_run_numbers),     cmocka_unit_test(test_lock),
      cmocka_unit_test(test_empty_message),   cmocka_unit_test(test_hostile_heads),
      cmocka_unit_test(test_rotation),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
