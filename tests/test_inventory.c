/* The inventory, the split, the subjects and their descriptions: the real
 * PAPI files load with the counts the README states, and every kind of broken
 * input is refused (or, for one subject's problem, marked unusable) with a
 * message naming the file, the subject where there is one, and the problem. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "inventory.h"
#include "status.h"
#include "testutil.h"

/* ---- fixtures: a 10-item inventory (two items per trait) in a directory ---- */

/* Items 1..10: O+ O- C+ C- E+ E- A+ A- N+ N-; the split trains on the odd ones. */
static const char good_items[] = "item,ipip120_no,trait,facet_code,facet,keyed,text\n"
                                 "1,1,O,O1,Imagination,+,Have a vivid imagination.\n"
                                 "2,,O,O2,Artistic Interests,-,Do not like art.\n"
                                 "3,3,C,C2,Orderliness,+,\"Want everything to be \"\"just right,\"\" always.\"\n"
                                 "4,,C,C5,Self-Discipline,-,Waste my time.\n"
                                 "5,5,E,E1,Friendliness,+,Make friends easily.\n"
                                 "6,,E,E3,Assertiveness,-,Wait for others to lead the way.\n"
                                 "7,7,A,A1,Trust,+,Trust others.\n"
                                 "8,,A,A2,Morality,-,\"Cheat, to get ahead.\"\n"
                                 "9,9,N,N1,Anxiety,+,Worry about things.\n"
                                 "10,,N,N5,Immoderation,-,Rarely overindulge.\n";
static const char good_split[] = "{\"train_index\": [1, 3, 5, 7, 9], \"test_index\": [2, 4, 6, 8, 10]}";

static void write_in(const char *dir, const char *file, const char *text) {
  if (tu_papi_write_file(dir, file, text) != 0)
    fail_msg("cannot write %s/%s", dir, file);
}

/* A directory `name` holding the given items CSV and split (NULL: no such file). */
static const char *papi_like(char *buf, size_t n, const char *name, const char *items, const char *split) {
  return tu_papi_dir(buf, n, name, (tu_papi_files){.items = items, .split = split});
}

static pa_inventory *small_inventory(void) {
  static int k;
  char dir[256], name[32];
  snprintf(name, sizeof name, "inv%d", k++);
  papi_like(dir, sizeof dir, name, good_items, good_split);
  pa_inventory *inv = NULL;
  if (pa_inventory_load(dir, &inv))
    fail_msg("%s", pa_errmsg());
  return inv;
}

static void expect_msg(const char *a, const char *b) {
  const char *m = pa_errmsg();
  if ((a && !strstr(m, a)) || (b && !strstr(m, b)))
    fail_msg("message '%s' should contain '%s' and '%s'", m, a ? a : "", b ? b : "");
}

/* Loading the directory fails with a message naming `file` and saying `what`. */
static void expect_inventory_error(const char *name, const char *items, const char *split, const char *file,
                                   const char *what) {
  char dir[256], path[512];
  papi_like(dir, sizeof dir, name, items, split);
  snprintf(path, sizeof path, "%s/%s", dir, file);
  pa_inventory *inv = (pa_inventory *)0x1;
  pa_error_clear();
  int rc = pa_inventory_load(dir, &inv);
  if (rc == PA_OK)
    fail_msg("%s loaded, expected an error about '%s'", dir, what);
  assert_true(rc < 0);
  assert_null(inv);
  expect_msg(path, what);
}

/* ---- the real data ---------------------------------------------------------- */

static bool papi_present(void) {
  char p[4200];
  snprintf(p, sizeof p, "%s/Test-set.json", test_papi_dir());
  if (access(p, R_OK) == 0)
    return true;
  const char *req = getenv("PALIGN_REQUIRE_MODEL");
  if (req && !strcmp(req, "1"))
    fail_msg("the PAPI data %s is missing (set PALIGN_PAPI_DIR)", p);
  return false;
}

static void test_real_data(void **state) {
  (void)state;
  if (!papi_present())
    skip();
  const char *dir = test_papi_dir();
  pa_inventory *inv = NULL;
  if (pa_inventory_load(dir, &inv))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(pa_inventory_n_items(inv), 300);
  int per_trait[PA_N_TRAITS] = {0}, keyed_minus = 0;
  for (int i = 1; i <= 300; i++) {
    const pa_item *it = pa_inventory_item(inv, i);
    assert_non_null(it);
    assert_int_equal(it->number, i);
    per_trait[it->trait]++;
    keyed_minus += it->keyed < 0;
    assert_true(it->text[0] && it->facet[0] && it->facet_code[0] == pa_trait_letter(it->trait));
  }
  assert_true(keyed_minus > 0 && keyed_minus < 300);
  for (int t = 0; t < PA_N_TRAITS; t++)
    assert_int_equal(per_trait[t], 60);
  assert_null(pa_inventory_item(inv, 0));
  assert_null(pa_inventory_item(inv, 301));
  const pa_item *i1 = pa_inventory_item(inv, 1), *i70 = pa_inventory_item(inv, 70);
  assert_int_equal(i1->trait, PA_TRAIT_N);
  assert_int_equal(i1->keyed, 1);
  assert_string_equal(i1->text, "Worry about things.");
  assert_string_equal(i1->facet, "Anxiety");
  assert_string_equal(i70->text, "Want everything to be \"just right.\""); /* a quoted field with quotes */

  int ntr, nte;
  const int *tr = pa_inventory_train(inv, &ntr), *te = pa_inventory_test(inv, &nte);
  assert_int_equal(ntr, 120);
  assert_int_equal(nte, 180);
  assert_int_equal(tr[0], 1);
  assert_int_equal(tr[8], 99); /* the file's order, not sorted */
  assert_int_equal(te[179], 300);
  int ntr_t[PA_N_TRAITS] = {0}, nte_t[PA_N_TRAITS] = {0};
  for (int k = 0; k < ntr; k++)
    ntr_t[pa_inventory_item(inv, tr[k])->trait]++;
  for (int k = 0; k < nte; k++)
    nte_t[pa_inventory_item(inv, te[k])->trait]++;
  for (int t = 0; t < PA_N_TRAITS; t++) {
    assert_int_equal(ntr_t[t], 24);
    assert_int_equal(nte_t[t], 36);
  }

  char p[4200];
  snprintf(p, sizeof p, "%s/Test-set.json", dir);
  pa_subjects *s = NULL;
  if (pa_subjects_load(p, inv, &s))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(pa_subjects_count(s), 300);
  long dist[6] = {0};
  for (size_t k = 0; k < 300; k++) {
    const pa_subject *x = pa_subjects_at(s, k);
    if (!x->usable)
      fail_msg("%s", x->reason);
    assert_null(x->description);
    for (int i = 1; i <= 300; i++)
      dist[x->answers[i]]++;
  }
  assert_null(pa_subjects_at(s, 300));
  /* the README's distribution over all 300 x 300 cells */
  assert_int_equal(dist[4], 36847);
  assert_int_equal(dist[3], 29336);
  assert_int_equal(dist[2], 15596);
  assert_int_equal(dist[5], 6569);
  assert_int_equal(dist[1], 1600);
  assert_int_equal(dist[0], 52);
  const pa_subject *first = pa_subjects_find(s, "172481");
  assert_ptr_equal(first, pa_subjects_at(s, 0));
  assert_int_equal(first->answers[1], 3);
  assert_int_equal(first->answers[7], 5);
  assert_null(pa_subjects_find(s, "no such subject"));
  for (size_t k = 0; k < 300; k++)
    assert_ptr_equal(pa_subjects_find(s, pa_subjects_at(s, k)->id), pa_subjects_at(s, k));

  /* The CSV form of the large release holds the same subjects. */
  size_t cap = 300 * (300 * 2 + 16) + 4096, w = 0;
  char *csv = malloc(cap);
  assert_non_null(csv);
  w += (size_t)snprintf(csv + w, cap - w, "case");
  for (int i = 1; i <= 300; i++)
    w += (size_t)snprintf(csv + w, cap - w, ",i%d", i);
  for (size_t k = 0; k < 300; k++) {
    w += (size_t)snprintf(csv + w, cap - w, "\n%s", pa_subjects_at(s, k)->id);
    for (int i = 1; i <= 300; i++)
      w += (size_t)snprintf(csv + w, cap - w, ",%d", pa_subjects_at(s, k)->answers[i]);
  }
  assert_true(w < cap);
  char cpath[512];
  tu_write_text(tu_path(cpath, sizeof cpath, "Test-set.csv"), csv);
  free(csv);
  pa_subjects *sc = NULL;
  if (pa_subjects_load(cpath, inv, &sc))
    fail_msg("%s", pa_errmsg());
  assert_int_equal(pa_subjects_count(sc), 300);
  for (size_t k = 0; k < 300; k++) {
    const pa_subject *a = pa_subjects_at(s, k), *b = pa_subjects_at(sc, k);
    assert_string_equal(a->id, b->id);
    assert_true(b->usable);
    assert_memory_equal(a->answers, b->answers, sizeof a->answers);
  }
  pa_subjects_destroy(sc);

  snprintf(p, sizeof p, "%s/personality_prompt.json", dir);
  if (pa_subjects_load_descriptions(s, p))
    fail_msg("%s", pa_errmsg());
  for (size_t k = 0; k < 300; k++) {
    const char *d = pa_subjects_at(s, k)->description;
    assert_non_null(d);
    assert_true(strlen(d) > 100);
  }
  pa_subjects_destroy(s);
  pa_inventory_destroy(inv);
}

/* ---- items CSV -------------------------------------------------------------- */

/* --subjects: all, N (the first N, at most all) or A-B (positions, B cut
 * to the last); anything else, 0, B < A, A past the end, or a sign (strtoul
 * would read "-1" as ULONG_MAX: every subject) is refused. */
static void test_subjects_range(void **state) {
  (void)state;
  static const struct {
    const char *r;
    size_t first, last;
  } good[] = {{"all", 0, 299}, {"5", 0, 4}, {"1000", 0, 299}, {"3-7", 3, 7}, {"290-400", 290, 299}, {"0-0", 0, 0}};
  for (size_t k = 0; k < sizeof good / sizeof *good; k++) {
    size_t first = 9999, last = 9999;
    assert_int_equal(pa_subjects_range(good[k].r, 300, &first, &last), 0);
    assert_int_equal(first, good[k].first);
    assert_int_equal(last, good[k].last);
  }
  static const char *const bad[] = {"",   "0",   "-1",  "-5-3", "3--1",    "+3",   " 3",  "3-",
                                    "-3", "3-2", "abc", "3x",   "300-301", "3-7x", "All", "1e3"};
  for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
    size_t first, last;
    if (pa_subjects_range(bad[k], 300, &first, &last) == 0)
      fail_msg("'%s' taken as %zu-%zu", bad[k], first, last);
  }
  size_t first, last;
  assert_int_not_equal(pa_subjects_range("all", 0, &first, &last), 0); /* no subjects */
}

static void test_traits(void **state) {
  (void)state;
  const char *letters = "ACENO";
  for (int t = 0; t < PA_N_TRAITS; t++) {
    assert_int_equal(pa_trait_letter((pa_trait)t), letters[t]);
    assert_int_equal(pa_trait_from_letter(letters[t]), t);
  }
  assert_int_equal(pa_trait_from_letter('X'), -1);
  assert_int_equal(pa_trait_from_letter('\0'), -1);
}

static void test_items_good(void **state) {
  (void)state;
  pa_inventory *inv = small_inventory();
  assert_int_equal(pa_inventory_n_items(inv), 10);
  const pa_item *it = pa_inventory_item(inv, 3);
  assert_string_equal(it->text, "Want everything to be \"just right,\" always.");
  assert_string_equal(it->facet, "Orderliness");
  assert_string_equal(it->facet_code, "C2");
  assert_int_equal(it->trait, PA_TRAIT_C);
  assert_int_equal(it->keyed, 1);
  assert_string_equal(pa_inventory_item(inv, 8)->text, "Cheat, to get ahead.");
  assert_int_equal(pa_inventory_item(inv, 8)->keyed, -1);
  assert_int_equal(pa_inventory_item(inv, 10)->trait, PA_TRAIT_N);
  pa_inventory_destroy(inv);

  /* Columns found by name in any order, extra and optional ones, a BOM, CRLF
   * line ends, padding around unquoted fields, a quoted field over two lines,
   * blank lines. */
  char dir[256];
  papi_like(dir, sizeof dir, "reordered",
            "\xEF\xBB\xBFtext,keyed,extra,TRAIT,item\r\n"
            "Have a vivid imagination.,+,x,O,1\r\n"
            "\r\n"
            "\"Two\nlines.\" , - ,,C, 2 \r\n",
            "{\"train_index\": [2], \"test_index\": [1]}");
  assert_int_equal(pa_inventory_load(dir, &inv), PA_OK);
  assert_int_equal(pa_inventory_n_items(inv), 2);
  assert_string_equal(pa_inventory_item(inv, 1)->text, "Have a vivid imagination.");
  assert_string_equal(pa_inventory_item(inv, 1)->facet, "");
  assert_string_equal(pa_inventory_item(inv, 2)->text, "Two\nlines.");
  assert_int_equal(pa_inventory_item(inv, 2)->keyed, -1);
  assert_int_equal(pa_inventory_item(inv, 2)->trait, PA_TRAIT_C);
  int n;
  assert_int_equal(pa_inventory_train(inv, &n)[0], 2);
  assert_int_equal(n, 1);
  assert_int_equal(pa_inventory_test(inv, &n)[0], 1);
  pa_inventory_destroy(inv);
  pa_inventory_destroy(NULL);
}

static void test_items_bad(void **state) {
  (void)state;
  const char *f = "ipip_neo_300_items.csv", *split = good_split;
  const char *hdr = "item,trait,keyed,text\n";
  char csv[1024];
  expect_inventory_error("i_nofile", NULL, split, f, "cannot open");
  expect_inventory_error("i_empty", "", split, f, "empty file");
  expect_inventory_error("i_header_only", hdr, split, f, "no items");
  expect_inventory_error("i_nokeyed", "item,trait,text\n1,O,Text.\n", split, f, "no column 'keyed'");
  expect_inventory_error("i_duphdr", "item,trait,keyed,text,trait\n1,O,+,T.,O\n", split, f,
                         "column 'trait' appears twice");
  snprintf(csv, sizeof csv, "%s1,O,+,A.\n2,X,+,B.\n", hdr);
  expect_inventory_error("i_trait", csv, split, f, "line 3: item 2: trait 'X' is not one of O C E A N");
  snprintf(csv, sizeof csv, "%s1,O,+,A.\n2,Op,+,B.\n", hdr);
  expect_inventory_error("i_trait2", csv, split, f, "trait 'Op'");
  snprintf(csv, sizeof csv, "%s1,O,*,A.\n", hdr);
  expect_inventory_error("i_keyed", csv, split, f, "keyed '*' is not + or -");
  snprintf(csv, sizeof csv, "%s1,O,+,A.\n2,O,+,B.\n1,C,+,C.\n", hdr);
  expect_inventory_error("i_dup", csv, split, f, "item 1 appears twice (lines 2 and 4)");
  snprintf(csv, sizeof csv, "%s1,O,+,A.\n2,O,+,B.\n4,C,+,C.\n", hdr);
  expect_inventory_error("i_gap", csv, split, f, "item 3 is missing");
  snprintf(csv, sizeof csv, "%s1,O,+,A.\n2a,O,+,B.\n", hdr);
  expect_inventory_error("i_num", csv, split, f, "item number '2a' is not an integer");
  snprintf(csv, sizeof csv, "%s0,O,+,A.\n", hdr);
  expect_inventory_error("i_zero", csv, split, f, "item number 0 is outside 1..300");
  snprintf(csv, sizeof csv, "%s301,O,+,A.\n", hdr);
  expect_inventory_error("i_big", csv, split, f, "item number 301 is outside 1..300");
  snprintf(csv, sizeof csv, "%s1,O,+,\"A, unterminated.\n2,O,+,B.\n", hdr);
  expect_inventory_error("i_quote", csv, split, f, "line 2: a quoted field is never closed");
  snprintf(csv, sizeof csv, "%s1,O,+,\"A.\"x\n", hdr);
  expect_inventory_error("i_afterquote", csv, split, f, "unexpected text after a closing quote");
  snprintf(csv, sizeof csv, "%s1,O,+,A, with a comma.\n", hdr);
  expect_inventory_error("i_fields", csv, split, f, "line 2: 5 fields where the header has 4");
  snprintf(csv, sizeof csv, "%s1,O,+\n", hdr);
  expect_inventory_error("i_short", csv, split, f, "3 fields where the header has 4");
  snprintf(csv, sizeof csv, "%s1,O,+,\"\"\n", hdr);
  expect_inventory_error("i_notext", csv, split, f, "item 1 has no text");
  expect_inventory_error("i_fcode", "item,trait,keyed,text,facet_code\n1,O,+,A.,O1234567\n", split, f,
                         "facet code 'O1234567' is longer than 7 characters");
}

/* ---- split JSON ------------------------------------------------------------- */

static void test_split_bad(void **state) {
  (void)state;
  const char *f = "mpi_300_split.json", *items = good_items;
  expect_inventory_error("s_nofile", items, NULL, f, "cannot open");
  expect_inventory_error("s_empty", items, "", f, "empty file");
  expect_inventory_error("s_syntax", items, "{\"train_index\": [1, 3,\n \"test_index\": [2]}", f,
                         "not valid JSON (syntax error at line 2");
  expect_inventory_error("s_trailing", items, "{\"train_index\": [1], \"test_index\": [2]} x", f,
                         "unexpected text after the value");
  expect_inventory_error("s_array", items, "[1, 2]", f, "not a JSON object");
  expect_inventory_error("s_notest", items, "{\"train_index\": [1]}", f, "no \"test_index\"");
  expect_inventory_error("s_notarray", items, "{\"train_index\": 1, \"test_index\": [2]}", f,
                         "\"train_index\" is not an array");
  expect_inventory_error("s_emptytrain", items, "{\"train_index\": [], \"test_index\": [2]}", f,
                         "\"train_index\" is empty");
  expect_inventory_error("s_unknown", items, "{\"train_index\": [1], \"test_index\": [2, 11]}", f,
                         "test_index[1] = 11 is not an item of the inventory (1..10)");
  expect_inventory_error("s_zero", items, "{\"train_index\": [0], \"test_index\": [2]}", f,
                         "train_index[0] = 0 is not an item");
  expect_inventory_error("s_frac", items, "{\"train_index\": [1, 2.5], \"test_index\": [3]}", f,
                         "train_index[1] is not an integer item number");
  expect_inventory_error("s_string", items, "{\"train_index\": [\"1\"], \"test_index\": [3]}", f,
                         "train_index[0] is not an integer item number");
  expect_inventory_error("s_twice", items, "{\"train_index\": [1, 3, 1], \"test_index\": [2]}", f,
                         "item 1 is listed twice (train_index[0] and train_index[2])");
  expect_inventory_error("s_overlap", items, "{\"train_index\": [1, 3], \"test_index\": [2, 3]}", f,
                         "item 3 is listed twice (train_index[1] and test_index[1]): train and test must not overlap");
}

/* ---- subjects --------------------------------------------------------------- */

static char subj_buf[8192];

/* Appends a subject object to subj_buf: `id` as JSON text, answers to items
 * 1..10 (a negative one leaves its key out), `extra` JSON members or "". */
static void add_subject(const char *id, const int *ans, const char *extra) {
  size_t len = strlen(subj_buf);
  char *p = subj_buf + len;
  size_t room = sizeof subj_buf - len;
  int w = snprintf(p, room, "%s{\"case\": %s, \"sex\": 1, \"country\": \"USA\"", len > 1 ? ", " : "", id);
  for (int i = 0; i < 10; i++)
    if (ans[i] >= 0)
      w += snprintf(p + w, room - (size_t)w, ", \"i%d\": %d", i + 1, ans[i]);
  snprintf(p + w, room - (size_t)w, "%s%s}", extra[0] ? ", " : "", extra);
}

static const int ok_answers[10] = {4, 3, 2, 5, 1, 0, 4, 4, 3, 2};

static const char *subjects_file(char *path, size_t n, const char *name, const char *text) {
  tu_path(path, n, name);
  tu_write_text(path, text);
  return path;
}

static pa_subjects *load_ok(const char *path, const pa_inventory *inv) {
  pa_subjects *s = NULL;
  if (pa_subjects_load(path, inv, &s))
    fail_msg("%s: %s", path, pa_errmsg());
  return s;
}

static void expect_subjects_error(const pa_inventory *inv, const char *name, const char *text, const char *what) {
  char path[512];
  subjects_file(path, sizeof path, name, text);
  pa_subjects *s = (pa_subjects *)0x1;
  pa_error_clear();
  int rc = pa_subjects_load(path, inv, &s);
  if (rc == PA_OK)
    fail_msg("%s loaded, expected an error about '%s'", path, what);
  assert_true(rc < 0);
  assert_null(s);
  expect_msg(path, what);
}

/* subj_buf as a JSON array, holding the three subjects 1, "s2" and 3 where
 * subject "s2" gets `bad` answers and `extra` members. */
static const char *three_with(const int *bad, const char *extra) {
  strcpy(subj_buf, "[");
  add_subject("1", ok_answers, "");
  add_subject("\"s2\"", bad, extra);
  add_subject("3", ok_answers, "\"age\": 40");
  strcat(subj_buf, "]");
  return subj_buf;
}

/* The file loads; subject "s2" is unusable with a reason naming the file,
 * the subject and `what`; the others are usable. */
static void expect_unusable(const pa_inventory *inv, const char *name, const int *bad, const char *extra,
                            const char *what) {
  char path[512];
  subjects_file(path, sizeof path, name, three_with(bad, extra));
  pa_subjects *s = load_ok(path, inv);
  assert_int_equal(pa_subjects_count(s), 3);
  assert_true(pa_subjects_at(s, 0)->usable);
  assert_true(pa_subjects_at(s, 2)->usable);
  const pa_subject *x = pa_subjects_find(s, "s2");
  assert_ptr_equal(x, pa_subjects_at(s, 1));
  assert_false(x->usable);
  if (!strstr(x->reason, path) || !strstr(x->reason, "subject s2") || !strstr(x->reason, what))
    fail_msg("reason '%s' should name %s, subject s2 and '%s'", x->reason, path, what);
  pa_subjects_destroy(s);
}

static void test_subjects_json(void **state) {
  (void)state;
  pa_inventory *inv = small_inventory();
  char path[512];
  subjects_file(path, sizeof path, "good.json", three_with(ok_answers, "\"year\": 103"));
  pa_subjects *s = load_ok(path, inv);
  assert_int_equal(pa_subjects_count(s), 3);
  for (size_t k = 0; k < 3; k++) {
    const pa_subject *x = pa_subjects_at(s, k);
    assert_true(x->usable);
    assert_string_equal(x->reason, "");
    assert_null(x->description);
    for (int i = 0; i < 10; i++)
      assert_int_equal(x->answers[i + 1], ok_answers[i]);
  }
  assert_string_equal(pa_subjects_at(s, 0)->id, "1"); /* a numeric case */
  assert_string_equal(pa_subjects_at(s, 1)->id, "s2");
  assert_ptr_equal(pa_subjects_find(s, "3"), pa_subjects_at(s, 2));
  assert_null(pa_subjects_find(s, "4"));
  pa_subjects_destroy(s);
  pa_subjects_destroy(NULL);

  int a[10];
  memcpy(a, ok_answers, sizeof a);
  a[4] = 7;
  expect_unusable(inv, "seven.json", a, "", "answer i5 = 7 is outside 0..5");
  a[4] = -1;
  expect_unusable(inv, "missing.json", a, "", "answer i5 is missing");
  expect_unusable(inv, "negative.json", a, "\"i5\": -1", "answer i5 = -1 is outside 0..5");
  expect_unusable(inv, "frac.json", a, "\"i5\": 3.5", "answer i5 = 3.5 is not an integer");
  expect_unusable(inv, "string.json", a, "\"i5\": \"4\"", "answer i5 is not a number");
  expect_unusable(inv, "null.json", a, "\"i5\": null", "answer i5 is not a number");
  expect_unusable(inv, "unknown.json", ok_answers, "\"i11\": 3",
                  "unknown answer key \"i11\" (the inventory has items i1..i10)");
  expect_unusable(inv, "leading0.json", ok_answers, "\"i05\": 3", "unknown answer key \"i05\"");
  expect_unusable(inv, "twice.json", ok_answers, "\"i2\": 3", "answer i2 is given twice");
  a[0] = 9;
  a[9] = -1;
  expect_unusable(inv, "several.json", a, "", "answer i1 = 9 is outside 0..5 (and 2 more problems)");

  expect_subjects_error(inv, "empty.json", "", "empty file");
  expect_subjects_error(inv, "blank.json", " \n", "not valid JSON");
  expect_subjects_error(inv, "emptyarray.json", "[ ]", "no subjects (an empty array)");
  expect_subjects_error(inv, "object.json", "{\"case\": 1}", "not a JSON array of subjects");
  expect_subjects_error(inv, "syntax.json", "[{\"case\": 1,\n \"i1\": 3,,}]", "not valid JSON (syntax error at line 2");
  expect_subjects_error(inv, "notobject.json", "[{\"case\": 1}, 5]", "subject #2 is not a JSON object");
  expect_subjects_error(inv, "nocase.json", "[{\"i1\": 1}]", "subject #1: \"case\" (the subject id) is missing");
  expect_subjects_error(inv, "badcase.json", "[{\"case\": 1.5}]", "subject #1: \"case\" = 1.5 is not an integer");
  expect_subjects_error(inv, "boolcase.json", "[{\"case\": true}]", "\"case\" is neither an integer nor a string");
  expect_subjects_error(inv, "emptycase.json", "[{\"case\": \"\"}]", "subject #1: empty subject id");
  expect_subjects_error(inv, "longcase.json", "[{\"case\": \"0123456789012345678901234567890123456789\"}]",
                        "longer than 31 characters");
  expect_subjects_error(inv, "newlinecase.json", "[{\"case\": \"a\\nb\"}]",
                        "subject #1: subject id has a control character at byte 1 (ids are printable UTF-8 text)");
  expect_subjects_error(inv, "latin1case.json", "[{\"case\": \"M\xfcller\"}]",
                        "subject #1: subject id has a byte that is not UTF-8 at byte 1");
  strcpy(subj_buf, "[");
  add_subject("5", ok_answers, "");
  add_subject("6", ok_answers, "");
  add_subject("\"5\"", ok_answers, ""); /* the same id as a string */
  strcat(subj_buf, "]");
  expect_subjects_error(inv, "dupid.json", subj_buf, "subject id 5 appears twice (subjects #1 and #3)");

  pa_error_clear();
  s = (pa_subjects *)0x1;
  assert_int_equal(pa_subjects_load(tu_path(path, sizeof path, "subjects.txt"), inv, &s), PA_EINVAL);
  assert_null(s);
  expect_msg("subjects.txt", ".json or a .csv");
  assert_int_equal(pa_subjects_load(tu_path(path, sizeof path, "absent.json"), inv, &s), PA_ENOTFOUND);
  expect_msg("absent.json", "cannot open");
  pa_inventory_destroy(inv);
}

static void test_subjects_csv(void **state) {
  (void)state;
  pa_inventory *inv = small_inventory();
  const char *hdr = "i10,i9,i8,i7,i6,i5,i4,i3,i2,i1,case,sex\n";
  char text[1024], path[512];
  snprintf(text, sizeof text, "%s2,3,4,4,0,1,5,2,3,4,17,1\n\n2,3,4,4,0,1,5,2,3,4,\"id, quoted\",2\n", hdr);
  pa_subjects *s = load_ok(subjects_file(path, sizeof path, "good.csv", text), inv);
  assert_int_equal(pa_subjects_count(s), 2);
  for (size_t k = 0; k < 2; k++) {
    const pa_subject *x = pa_subjects_at(s, k);
    if (!x->usable)
      fail_msg("%s", x->reason);
    for (int i = 0; i < 10; i++)
      assert_int_equal(x->answers[i + 1], ok_answers[i]);
  }
  assert_ptr_equal(pa_subjects_find(s, "id, quoted"), pa_subjects_at(s, 1));
  assert_ptr_equal(pa_subjects_find(s, "17"), pa_subjects_at(s, 0));
  pa_subjects_destroy(s);

  snprintf(text, sizeof text,
           "%s2,3,4,4,0,1,5,2,3,4,17,1\n2,3,4,4,0,7,5,2,3,4,18,1\n2,3,4,4,0,1,5,2,3,,19,1\n"
           "2,3,4,4,0,1,5,2,3,4.0,20,1\n2,3,4,4,0,1,5,2,3,4,21\n",
           hdr);
  s = load_ok(subjects_file(path, sizeof path, "bad.csv", text), inv);
  assert_int_equal(pa_subjects_count(s), 5);
  assert_true(pa_subjects_at(s, 0)->usable);
  const pa_subject *x = pa_subjects_find(s, "18");
  assert_false(x->usable);
  if (!strstr(x->reason, path) || !strstr(x->reason, "subject 18: answer i5 = 7 is outside 0..5"))
    fail_msg("reason '%s'", x->reason);
  x = pa_subjects_find(s, "19");
  assert_false(x->usable);
  assert_non_null(strstr(x->reason, "subject 19: answer i1 = '' is not a number"));
  x = pa_subjects_find(s, "20"); /* an integral number written as a decimal is accepted */
  assert_true(x->usable);
  assert_int_equal(x->answers[1], 4);
  x = pa_subjects_find(s, "21"); /* a short line that still holds its id */
  assert_false(x->usable);
  assert_non_null(strstr(x->reason, "subject 21: line 6 has 11 fields where the header has 12"));
  pa_subjects_destroy(s);

  expect_subjects_error(inv, "empty.csv", "", "empty file");
  expect_subjects_error(inv, "header.csv", hdr, "no subjects after the header");
  snprintf(text, sizeof text, "%s2,3,4,4,0,1,5,2,3,4,17,1\n2,3,4\n", hdr);
  expect_subjects_error(inv, "short.csv", text, "line 3: 3 fields, too few to hold 'case' (column 11)");
  expect_subjects_error(inv, "nocase.csv", "i1,i2,i3,i4,i5,i6,i7,i8,i9,i10\n1,1,1,1,1,1,1,1,1,1\n",
                        "the header has no column 'case'");
  expect_subjects_error(inv, "noi4.csv", "case,i1,i2,i3,i5,i6,i7,i8,i9,i10\n1,1,1,1,1,1,1,1,1,1\n",
                        "the header has no column 'i4'");
  expect_subjects_error(inv, "i11.csv", "case,i1,i2,i3,i4,i5,i6,i7,i8,i9,i10,i11\n",
                        "header column 'i11' is not an item");
  expect_subjects_error(inv, "dupcol.csv", "case,i1,i2,i3,i4,i5,i6,i7,i8,i9,i10,i3\n", "column 'i3' appears twice");
  expect_subjects_error(inv, "quote.csv", "case,i1,i2,i3,i4,i5,i6,i7,i8,i9,i10\n\"7,1,1,1,1,1,1,1,1,1,1\n",
                        "line 2: a quoted field is never closed");
  snprintf(text, sizeof text, "%s2,3,4,4,0,1,5,2,3,4,17,1\n2,3,4,4,0,1,5,2,3,4,18,1\n2,3,4,4,0,1,5,2,3,4,17,1\n", hdr);
  expect_subjects_error(inv, "dupid.csv", text, "subject id 17 appears twice (lines 2 and 4)");
  pa_inventory_destroy(inv);
}

/* ---- descriptions ----------------------------------------------------------- */

static void test_descriptions(void **state) {
  (void)state;
  pa_inventory *inv = small_inventory();
  char path[512], dpath[512];
  pa_subjects *s = load_ok(subjects_file(path, sizeof path, "d.json", three_with(ok_answers, "")), inv);
  subjects_file(dpath, sizeof dpath, "p1.json",
                "[{\"input\": \"x\", \"output\": [\"You are calm.\", \"ignored\"]}, {\"input\": \"y\"},"
                " {\"output\": []}]");
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_OK);
  assert_string_equal(pa_subjects_at(s, 0)->description, "You are calm.");
  assert_null(pa_subjects_at(s, 1)->description);
  assert_null(pa_subjects_at(s, 2)->description);

  /* failures leave the loaded descriptions as they were */
  subjects_file(dpath, sizeof dpath, "p2.json", "[{\"output\": [\"a\"]}, {\"output\": [\"b\"]}]");
  pa_error_clear();
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_EFORMAT);
  expect_msg(dpath, "2 descriptions for 3 subjects");
  assert_string_equal(pa_subjects_at(s, 0)->description, "You are calm.");
  subjects_file(dpath, sizeof dpath, "p3.json", "[{\"output\": [\"a\"]}, {\"output\": [\"b\"]}, {\"output\": [1]}]");
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_EFORMAT);
  expect_msg(dpath, "entry #3: \"output\" is not an array of strings");
  subjects_file(dpath, sizeof dpath, "p4.json", "[{\"output\": [\"a\"]}, {\"output\": [\"b\"]}, 3]");
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_EFORMAT);
  expect_msg(dpath, "entry #3 is not a JSON object");
  subjects_file(dpath, sizeof dpath, "p5.json", "[{\"output\": [\"a\"]},");
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_EFORMAT);
  expect_msg(dpath, "not valid JSON");
  subjects_file(dpath, sizeof dpath, "p6.json", "{\"output\": [\"a\"]}");
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_EFORMAT);
  expect_msg(dpath, "not a JSON array of descriptions");
  assert_string_equal(pa_subjects_at(s, 0)->description, "You are calm.");

  /* a second file replaces the first; an empty string is no description */
  subjects_file(dpath, sizeof dpath, "p7.json", "[{\"output\": [\"\"]}, {\"output\": null}, {\"output\": [\"c\"]}]");
  assert_int_equal(pa_subjects_load_descriptions(s, dpath), PA_OK);
  assert_null(pa_subjects_at(s, 0)->description);
  assert_null(pa_subjects_at(s, 1)->description);
  assert_string_equal(pa_subjects_at(s, 2)->description, "c");
  pa_subjects_destroy(s);
  pa_inventory_destroy(inv);
}

/* pa_papi_load: a whole PAPI-like directory (inventory, Test-set.json, the
 * descriptions), another subjects file in its place, $PALIGN_PAPI_DIR as the
 * default, and nothing half-loaded on error. */
static void test_papi_load(void **state) {
  (void)state;
  char dir[256], path[512];
  papi_like(dir, sizeof dir, "papi", good_items, good_split);
  write_in(dir, "Test-set.json", three_with(ok_answers, ""));
  write_in(dir, "personality_prompt.json", "[{\"output\": [\"one\"]}, {\"output\": [\"two\"]}, {\"output\": []}]");
  pa_inventory *inv = NULL;
  pa_subjects *s = NULL;
  assert_int_equal(pa_papi_load(dir, NULL, &inv, &s), PA_OK);
  assert_int_equal(pa_inventory_n_items(inv), 10);
  assert_int_equal(pa_subjects_count(s), 3);
  assert_string_equal(pa_subjects_at(s, 1)->description, "two");
  pa_subjects_destroy(s);
  pa_inventory_destroy(inv);

  /* the default directory: $PALIGN_PAPI_DIR, else ../shared/papi */
  const char *saved = getenv("PALIGN_PAPI_DIR");
  char *keep = saved ? strdup(saved) : NULL;
  setenv("PALIGN_PAPI_DIR", dir, 1);
  assert_string_equal(pa_papi_dir(NULL), dir);
  assert_string_equal(pa_papi_dir(""), dir);
  assert_string_equal(pa_papi_dir("/x"), "/x");
  assert_int_equal(pa_papi_load(NULL, NULL, &inv, &s), PA_OK);
  assert_int_equal(pa_subjects_count(s), 3);
  pa_subjects_destroy(s);
  pa_inventory_destroy(inv);
  unsetenv("PALIGN_PAPI_DIR");
  assert_string_equal(pa_papi_dir(NULL), "../shared/papi");
  if (keep)
    setenv("PALIGN_PAPI_DIR", keep, 1);
  free(keep);

  /* another subjects file: its subjects, no descriptions read */
  subjects_file(path, sizeof path, "other.json", "[{\"case\": 7, \"i1\": 1}]");
  assert_int_equal(pa_papi_load(dir, path, &inv, &s), PA_OK);
  assert_int_equal(pa_subjects_count(s), 1);
  assert_string_equal(pa_subjects_at(s, 0)->id, "7");
  assert_null(pa_subjects_at(s, 0)->description);
  pa_subjects_destroy(s);
  pa_inventory_destroy(inv);

  /* descriptions that do not match: an error naming the file, nothing loaded */
  write_in(dir, "personality_prompt.json", "[{\"output\": [\"one\"]}]");
  inv = (pa_inventory *)0x1;
  s = (pa_subjects *)0x1;
  pa_error_clear();
  assert_int_equal(pa_papi_load(dir, NULL, &inv, &s), PA_EFORMAT);
  assert_null(inv);
  assert_null(s);
  expect_msg("personality_prompt.json", "1 descriptions for 3 subjects");
  /* a missing Test-set.json */
  snprintf(path, sizeof path, "%s/Test-set.json", dir);
  unlink(path);
  assert_true(pa_papi_load(dir, NULL, &inv, &s) < 0);
  assert_null(inv);
  assert_null(s);
  expect_msg(path, NULL);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_subjects_range), cmocka_unit_test(test_traits),       cmocka_unit_test(test_items_good),
      cmocka_unit_test(test_items_bad),      cmocka_unit_test(test_split_bad),    cmocka_unit_test(test_subjects_json),
      cmocka_unit_test(test_subjects_csv),   cmocka_unit_test(test_descriptions), cmocka_unit_test(test_papi_load),
      cmocka_unit_test(test_real_data),
  };
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
