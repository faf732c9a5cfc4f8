#include "inventory.h"

#include "jsonfile.h"

#include "fileio.h"
#include "status.h"
#include "utf8.h"

#include <cJSON.h>

#include <math.h>
#include <stdarg.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <strings.h>

struct pa_inventory {
  int n_items;
  pa_item items[PA_MAX_ITEMS + 1]; /* by number; [0] unused */
  int train[PA_MAX_ITEMS], test[PA_MAX_ITEMS];
  int n_train, n_test;
};

struct pa_subjects {
  pa_subject *v;
  size_t n;
  pa_subject **by_id; /* into v, sorted by id: for find and for detecting repeated ids */
  char **desc;        /* n owned descriptions (entries may be NULL), or NULL before any are loaded */
};

static const char trait_letters[PA_N_TRAITS] = {'A', 'C', 'E', 'N', 'O'};

char pa_trait_letter(pa_trait t) { return (unsigned)t < PA_N_TRAITS ? trait_letters[t] : '?'; }

int pa_trait_from_letter(char c) {
  for (int t = 0; t < PA_N_TRAITS; t++)
    if (trait_letters[t] == c)
      return t;
  return -1;
}

/* ---- small parsers ----------------------------------------------------------- */

static const char *base_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

/* A decimal integer with nothing else (CSV fields are already trimmed). */
static bool parse_int(const char *s, long *out) {
  if (!*s)
    return false;
  long v = 0;
  bool neg = false;
  if (*s == '-' || *s == '+')
    neg = *s++ == '-';
  if (!*s)
    return false;
  for (; *s; s++) {
    if (*s < '0' || *s > '9' || v > 100000000L)
      return false;
    v = v * 10 + (*s - '0');
  }
  *out = neg ? -v : v;
  return true;
}

/* "i17" -> 17. Only the canonical spelling counts ("i017" is not item 17), so
 * every answer has exactly one key. Returns 0 for a name that is not an answer
 * key at all, -1 for an answer key with an impossible number. */
static long answer_key(const char *name) {
  if ((name[0] != 'i' && name[0] != 'I') || name[1] < '0' || name[1] > '9')
    return 0;
  long v;
  if (name[1] == '0' || !parse_int(name + 1, &v))
    return -1;
  return v;
}

/* ---- CSV (RFC 4180: quoted fields may hold commas, quotes as "", newlines) -- */

typedef struct {
  const char *path;
  const char *p, *end;
  int line;     /* line of the next unread character, from 1 */
  int rec_line; /* line where the current record starts */
  char *buf;    /* the current record's fields, each NUL-terminated */
  size_t used, cap;
  size_t *off; /* field i starts at buf + off[i] */
  int nf, capf;
} csv_reader;

static void csv_init(csv_reader *r, const char *path, const pa_mapped *m) {
  memset(r, 0, sizeof *r);
  r->path = path;
  r->p = m->size ? (const char *)m->data : ""; /* an empty file maps to no memory at all */
  r->end = r->p + m->size;
  r->line = 1;
  if (r->end - r->p >= 3 && !memcmp(r->p, "\xEF\xBB\xBF", 3)) /* spreadsheets write a UTF-8 BOM */
    r->p += 3;
}

static void csv_free(csv_reader *r) {
  free(r->buf);
  free(r->off);
}

static const char *csv_field(const csv_reader *r, int i) { return r->buf + r->off[i]; }

static int csv_putc(csv_reader *r, char c) {
  if (r->used == r->cap) {
    size_t cap = r->cap ? 2 * r->cap : 256;
    char *b = realloc(r->buf, cap);
    if (!b)
      return pa_error(PA_ENOMEM, "%s: out of memory reading line %d", r->path, r->rec_line);
    r->buf = b;
    r->cap = cap;
  }
  r->buf[r->used++] = c;
  return PA_OK;
}

static int csv_start_field(csv_reader *r) {
  if (r->nf == r->capf) {
    int capf = r->capf ? 2 * r->capf : 16;
    size_t *o = realloc(r->off, (size_t)capf * sizeof *o);
    if (!o)
      return pa_error(PA_ENOMEM, "%s: out of memory reading line %d", r->path, r->rec_line);
    r->off = o;
    r->capf = capf;
  }
  r->off[r->nf++] = r->used;
  return PA_OK;
}

static bool is_blank(char c) { return c == ' ' || c == '\t'; }

/* Reads the next non-blank record: 1 when there is one, 0 at the end of the
 * input, or a negative error. Unquoted fields are trimmed of spaces and tabs;
 * quoted ones are kept exactly. */
static int csv_next(csv_reader *r) {
  for (;;) {
    if (r->p >= r->end)
      return 0;
    r->used = 0;
    r->nf = 0;
    r->rec_line = r->line;
    bool any_quoted = false;
    int rc;
    for (;;) {
      if ((rc = csv_start_field(r)))
        return rc;
      const char *q = r->p;
      while (q < r->end && is_blank(*q))
        q++;
      if (q < r->end && *q == '"') {
        any_quoted = true;
        int qline = r->line;
        r->p = q + 1;
        for (;;) {
          if (r->p >= r->end)
            return pa_error(PA_EFORMAT, "%s: line %d: a quoted field is never closed", r->path, qline);
          char c = *r->p++;
          if (c == '"') {
            if (r->p < r->end && *r->p == '"')
              r->p++;
            else
              break;
          } else if (c == '\n') {
            r->line++;
          }
          if ((rc = csv_putc(r, c)))
            return rc;
        }
        while (r->p < r->end && is_blank(*r->p))
          r->p++;
        if (r->p < r->end && *r->p != ',' && *r->p != '\n' && *r->p != '\r')
          return pa_error(PA_EFORMAT, "%s: line %d: unexpected text after a closing quote", r->path, r->line);
      } else {
        r->p = q;
        while (r->p < r->end && *r->p != ',' && *r->p != '\n' && *r->p != '\r')
          if ((rc = csv_putc(r, *r->p++)))
            return rc;
        while (r->used > r->off[r->nf - 1] && is_blank(r->buf[r->used - 1]))
          r->used--;
      }
      if ((rc = csv_putc(r, '\0')))
        return rc;
      if (r->p < r->end && *r->p == ',') {
        r->p++;
        continue;
      }
      if (r->p < r->end && *r->p == '\r')
        r->p++;
      if (r->p < r->end && *r->p == '\n')
        r->p++;
      r->line++;
      break;
    }
    if (r->nf == 1 && !any_quoted && r->buf[0] == '\0')
      continue; /* an empty line */
    return 1;
  }
}

/* Index of the header column called `name` (case-insensitively), or -1. */
static int csv_column(const csv_reader *r, const char *name) {
  for (int i = 0; i < r->nf; i++)
    if (!strcasecmp(csv_field(r, i), name))
      return i;
  return -1;
}

static int csv_check_header(const csv_reader *r) {
  for (int i = 0; i < r->nf; i++)
    for (int k = 0; k < i; k++)
      if (csv_field(r, i)[0] && !strcasecmp(csv_field(r, i), csv_field(r, k)))
        return pa_error(PA_EFORMAT, "%s: line %d: column '%s' appears twice in the header (columns %d and %d)", r->path,
                        r->rec_line, csv_field(r, i), k + 1, i + 1);
  return PA_OK;
}

/* ---- the inventory ---------------------------------------------------------- */

void pa_inventory_destroy(pa_inventory *inv) {
  if (!inv)
    return;
  for (int i = 1; i <= PA_MAX_ITEMS; i++) {
    free((char *)inv->items[i].facet);
    free((char *)inv->items[i].text);
  }
  free(inv);
}

static int load_items(const char *path, pa_inventory *inv) {
  pa_mapped m;
  int rc = pa_map_file(path, 0, "", &m);
  if (rc)
    return rc;
  csv_reader r;
  csv_init(&r, path, &m);
  int line_of[PA_MAX_ITEMS + 1] = {0};
  int n = 0;
  rc = csv_next(&r);
  if (rc == 0)
    rc = pa_error(PA_EFORMAT, "%s: empty file (expected a header: item,trait,keyed,text,...)", path);
  if (rc < 0)
    goto done;
  if ((rc = csv_check_header(&r)))
    goto done;
  int ncols = r.nf;
  int c_item = csv_column(&r, "item"), c_trait = csv_column(&r, "trait"), c_keyed = csv_column(&r, "keyed");
  int c_text = csv_column(&r, "text"), c_fcode = csv_column(&r, "facet_code"), c_facet = csv_column(&r, "facet");
  const char *need[] = {"item", "trait", "keyed", "text"};
  int have[] = {c_item, c_trait, c_keyed, c_text};
  for (int k = 0; k < 4; k++)
    if (have[k] < 0) {
      rc = pa_error(PA_EFORMAT, "%s: the header has no column '%s'", path, need[k]);
      goto done;
    }
  while ((rc = csv_next(&r)) == 1) {
    int ln = r.rec_line;
    if (r.nf != ncols) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: %d fields where the header has %d", path, ln, r.nf, ncols);
      goto done;
    }
    long num;
    const char *f = csv_field(&r, c_item);
    if (!parse_int(f, &num)) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: item number '%s' is not an integer", path, ln, f);
      goto done;
    }
    if (num < 1 || num > PA_MAX_ITEMS) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: item number %ld is outside 1..%d", path, ln, num, PA_MAX_ITEMS);
      goto done;
    }
    if (line_of[num]) {
      rc = pa_error(PA_EFORMAT, "%s: item %ld appears twice (lines %d and %d)", path, num, line_of[num], ln);
      goto done;
    }
    f = csv_field(&r, c_trait);
    int t = f[0] && !f[1] ? pa_trait_from_letter(f[0]) : -1;
    if (t < 0) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: item %ld: trait '%s' is not one of O C E A N", path, ln, num, f);
      goto done;
    }
    f = csv_field(&r, c_keyed);
    if (strcmp(f, "+") && strcmp(f, "-")) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: item %ld: keyed '%s' is not + or -", path, ln, num, f);
      goto done;
    }
    pa_item *it = &inv->items[num];
    it->keyed = f[0] == '+' ? 1 : -1;
    f = csv_field(&r, c_text);
    if (!f[0]) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: item %ld has no text", path, ln, num);
      goto done;
    }
    const char *fcode = c_fcode >= 0 ? csv_field(&r, c_fcode) : "";
    if (strlen(fcode) >= sizeof it->facet_code) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: item %ld: facet code '%s' is longer than %zu characters", path, ln, num,
                    fcode, sizeof it->facet_code - 1);
      goto done;
    }
    it->number = (int)num;
    it->trait = (pa_trait)t;
    memcpy(it->facet_code, fcode, strlen(fcode) + 1);
    it->text = strdup(f);
    it->facet = strdup(c_facet >= 0 ? csv_field(&r, c_facet) : "");
    if (!it->text || !it->facet) {
      rc = pa_error(PA_ENOMEM, "%s: out of memory at line %d", path, ln);
      goto done;
    }
    line_of[num] = ln;
    n++;
  }
  if (rc < 0)
    goto done;
  if (n == 0) {
    rc = pa_error(PA_EFORMAT, "%s: no items after the header", path);
    goto done;
  }
  /* n distinct numbers fill 1..n exactly when none is missing. */
  for (int k = 1; k <= n; k++)
    if (!line_of[k]) {
      rc = pa_error(PA_EFORMAT, "%s: items must be numbered 1..%d (one per line) but item %d is missing", path, n, k);
      goto done;
    }
  inv->n_items = n;
  rc = PA_OK;
done:
  csv_free(&r);
  pa_unmap_file(&m);
  return rc;
}

/* One list of the split; where[] records, per item, the list (1 train,
 * 2 test) and position that claimed it, to name both places of a repeat. */
static int load_split_list(const char *path, const cJSON *root, const char *key, int list, pa_inventory *inv,
                           int *where, int *pos) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(root, key);
  if (!a)
    return pa_error(PA_EFORMAT, "%s: no \"%s\"", path, key);
  if (!cJSON_IsArray(a))
    return pa_error(PA_EFORMAT, "%s: \"%s\" is not an array", path, key);
  int n = cJSON_GetArraySize(a);
  if (n == 0)
    return pa_error(PA_EFORMAT, "%s: \"%s\" is empty", path, key);
  int *dst = list == 1 ? inv->train : inv->test, k = 0;
  for (const cJSON *e = a->child; e; e = e->next, k++) {
    double d = cJSON_IsNumber(e) ? e->valuedouble : NAN;
    if (!(d == floor(d)) || fabs(d) > 1e9)
      return pa_error(PA_EFORMAT, "%s: %s[%d] is not an integer item number", path, key, k);
    int v = (int)d;
    if (v < 1 || v > inv->n_items)
      return pa_error(PA_EFORMAT, "%s: %s[%d] = %d is not an item of the inventory (1..%d)", path, key, k, v,
                      inv->n_items);
    if (where[v])
      return pa_error(PA_EFORMAT, "%s: item %d is listed twice (%s[%d] and %s[%d])%s", path, v,
                      where[v] == 1 ? "train_index" : "test_index", pos[v], key, k,
                      where[v] != list ? ": train and test must not overlap" : "");
    where[v] = list;
    pos[v] = k;
    dst[k] = v;
  }
  if (list == 1)
    inv->n_train = n;
  else
    inv->n_test = n;
  return PA_OK;
}

static int load_split(const char *path, pa_inventory *inv) {
  cJSON *j;
  int rc = pa_json_load(path, &j);
  if (rc)
    return rc;
  int where[PA_MAX_ITEMS + 1] = {0}, pos[PA_MAX_ITEMS + 1] = {0};
  if (!cJSON_IsObject(j))
    rc = pa_error(PA_EFORMAT, "%s: not a JSON object (expected train_index and test_index)", path);
  if (!rc)
    rc = load_split_list(path, j, "train_index", 1, inv, where, pos);
  if (!rc)
    rc = load_split_list(path, j, "test_index", 2, inv, where, pos);
  cJSON_Delete(j);
  return rc;
}

int pa_inventory_load(const char *papi_dir, pa_inventory **out) {
  *out = NULL;
  pa_inventory *inv = calloc(1, sizeof *inv);
  if (!inv)
    return pa_error(PA_ENOMEM, "%s: out of memory for the inventory", papi_dir);
  char path[4096];
  int rc = PA_OK;
  if (snprintf(path, sizeof path, "%s/ipip_neo_300_items.csv", papi_dir) >= (int)sizeof path)
    rc = pa_error(PA_EINVAL, "%s: path too long", papi_dir);
  if (!rc)
    rc = load_items(path, inv);
  if (!rc && snprintf(path, sizeof path, "%s/mpi_300_split.json", papi_dir) >= (int)sizeof path)
    rc = pa_error(PA_EINVAL, "%s: path too long", papi_dir);
  if (!rc)
    rc = load_split(path, inv);
  if (rc) {
    pa_inventory_destroy(inv);
    return rc;
  }
  *out = inv;
  return PA_OK;
}

int pa_inventory_n_items(const pa_inventory *inv) { return inv->n_items; }

const pa_item *pa_inventory_item(const pa_inventory *inv, int number) {
  return number >= 1 && number <= inv->n_items ? &inv->items[number] : NULL;
}

const int *pa_inventory_train(const pa_inventory *inv, int *n) {
  *n = inv->n_train;
  return inv->train;
}

const int *pa_inventory_test(const pa_inventory *inv, int *n) {
  *n = inv->n_test;
  return inv->test;
}

/* ---- subjects --------------------------------------------------------------- */

/* Per-subject problem bookkeeping: the first problem is the reason, later ones
 * are counted, so a subject with 300 bad cells gets one readable line. */
typedef struct {
  const char *path;
  pa_subject *s;
  int n_problems;
} subject_check;

__attribute__((format(printf, 2, 3))) static void problem(subject_check *c, const char *fmt, ...) {
  if (c->n_problems++ > 0)
    return;
  char what[192];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  c->s->usable = false;
  /* A long path would crowd out the problem itself; the base name still says which file. */
  if (snprintf(c->s->reason, sizeof c->s->reason, "%s: subject %s: %s", c->path, c->s->id, what) >=
      (int)sizeof c->s->reason)
    snprintf(c->s->reason, sizeof c->s->reason, "%s: subject %s: %s", base_name(c->path), c->s->id, what);
}

static void check_finish(subject_check *c) {
  if (c->n_problems > 1) {
    size_t len = strlen(c->s->reason);
    snprintf(c->s->reason + len, sizeof c->s->reason - len, " (and %d more problem%s)", c->n_problems - 1,
             c->n_problems > 2 ? "s" : "");
  }
}

/* Stores answer `v` to item `num`, or records why it cannot. */
static void take_answer(subject_check *c, long num, double v, const char *raw) {
  if (!(v == floor(v)))
    problem(c, "answer i%ld = %s is not an integer", num, raw);
  else if (v < 0 || v > 5)
    problem(c, "answer i%ld = %s is outside 0..5", num, raw);
  else
    c->s->answers[num] = (uint8_t)v;
}

static int set_id(pa_subject *s, const char *id, const char *path, const char *where) {
  size_t len = strlen(id);
  if (len == 0)
    return pa_error(PA_EFORMAT, "%s: %s: empty subject id (\"case\")", path, where);
  if (len >= sizeof s->id)
    return pa_error(PA_EFORMAT, "%s: %s: subject id '%.40s...' is longer than %zu characters", path, where, id,
                    sizeof s->id - 1);
  /* ids are printed in tables, problem lines and JSON: printable UTF-8 */
  for (size_t i = 0, k; i < len; i += k) {
    uint32_t cp;
    k = pa_utf8_valid((const uint8_t *)id + i, len - i, &cp);
    if (!k || cp < 0x20 || (cp >= 0x7F && cp <= 0x9F)) /* C0 and C1 controls, DEL */
      return pa_error(PA_EFORMAT, "%s: %s: subject id has %s at byte %zu (ids are printable UTF-8 text)", path, where,
                      !k ? "a byte that is not UTF-8" : "a control character", i);
  }
  memcpy(s->id, id, len + 1);
  return PA_OK;
}

static int json_subject(const char *path, const cJSON *o, size_t k, const pa_inventory *inv, pa_subject *s) {
  char where[48];
  snprintf(where, sizeof where, "subject #%zu", k + 1);
  if (!cJSON_IsObject(o))
    return pa_error(PA_EFORMAT, "%s: %s is not a JSON object", path, where);
  const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "case");
  char idbuf[64];
  if (cJSON_IsString(id)) {
    int rc = set_id(s, id->valuestring, path, where);
    if (rc)
      return rc;
  } else if (cJSON_IsNumber(id) && id->valuedouble == floor(id->valuedouble) && fabs(id->valuedouble) < 1e15) {
    snprintf(idbuf, sizeof idbuf, "%.0f", id->valuedouble);
    int rc = set_id(s, idbuf, path, where);
    if (rc)
      return rc;
  } else if (!id) {
    return pa_error(PA_EFORMAT, "%s: %s: \"case\" (the subject id) is missing", path, where);
  } else if (cJSON_IsNumber(id)) {
    return pa_error(PA_EFORMAT, "%s: %s: \"case\" = %.15g is not an integer", path, where, id->valuedouble);
  } else {
    return pa_error(PA_EFORMAT, "%s: %s: \"case\" is neither an integer nor a string", path, where);
  }
  s->usable = true;
  subject_check c = {path, s, 0};
  bool seen[PA_MAX_ITEMS + 1] = {false};
  int n = inv->n_items;
  for (const cJSON *e = o->child; e; e = e->next) {
    long num = answer_key(e->string);
    if (num == 0)
      continue; /* demographics and the like */
    if (num < 0 || num > n) {
      problem(&c, "unknown answer key \"%s\" (the inventory has items i1..i%d)", e->string, n);
      continue;
    }
    if (seen[num]) {
      problem(&c, "answer i%ld is given twice", num);
      continue;
    }
    seen[num] = true;
    if (!cJSON_IsNumber(e)) {
      problem(&c, "answer i%ld is not a number", num);
      continue;
    }
    char raw[32];
    snprintf(raw, sizeof raw, "%.15g", e->valuedouble);
    take_answer(&c, num, e->valuedouble, raw);
  }
  for (int i = 1; i <= n; i++)
    if (!seen[i])
      problem(&c, "answer i%d is missing", i);
  check_finish(&c);
  return PA_OK;
}

static int load_subjects_json(const char *path, const pa_inventory *inv, pa_subjects *ss) {
  cJSON *j;
  int rc = pa_json_load(path, &j);
  if (rc)
    return rc;
  if (!cJSON_IsArray(j))
    rc = pa_error(PA_EFORMAT, "%s: not a JSON array of subjects", path);
  else if (cJSON_GetArraySize(j) == 0)
    rc = pa_error(PA_EFORMAT, "%s: no subjects (an empty array)", path);
  if (!rc) {
    ss->n = (size_t)cJSON_GetArraySize(j);
    ss->v = calloc(ss->n, sizeof *ss->v);
    if (!ss->v)
      rc = pa_error(PA_ENOMEM, "%s: out of memory for %zu subjects", path, ss->n);
  }
  size_t k = 0;
  for (const cJSON *o = j->child; !rc && o; o = o->next, k++)
    rc = json_subject(path, o, k, inv, &ss->v[k]);
  cJSON_Delete(j);
  return rc;
}

/* The CSV form: `case` and one column per item; other columns are ignored. A
 * column that is absent concerns every subject, so it is a file error. */
static int load_subjects_csv(const char *path, const pa_inventory *inv, pa_subjects *ss, int **lines) {
  pa_mapped m;
  int rc = pa_map_file(path, 0, "", &m);
  if (rc)
    return rc;
  csv_reader r;
  csv_init(&r, path, &m);
  int col_of[PA_MAX_ITEMS + 1];
  size_t cap = 0;
  int n = inv->n_items;
  rc = csv_next(&r);
  if (rc == 0)
    rc = pa_error(PA_EFORMAT, "%s: empty file (expected a header case,i1,...,i%d)", path, n);
  if (rc < 0)
    goto done;
  if ((rc = csv_check_header(&r)))
    goto done;
  int ncols = r.nf, c_case = csv_column(&r, "case");
  if (c_case < 0) {
    rc = pa_error(PA_EFORMAT, "%s: the header has no column 'case'", path);
    goto done;
  }
  for (int i = 0; i <= n; i++)
    col_of[i] = -1;
  for (int i = 0; i < r.nf; i++) {
    long num = answer_key(csv_field(&r, i));
    if (num == 0)
      continue;
    if (num < 0 || num > n) {
      rc = pa_error(PA_EFORMAT, "%s: header column '%s' is not an item of the inventory (i1..i%d)", path,
                    csv_field(&r, i), n);
      goto done;
    }
    col_of[num] = i;
  }
  for (int i = 1; i <= n; i++)
    if (col_of[i] < 0) {
      rc = pa_error(PA_EFORMAT, "%s: the header has no column 'i%d'", path, i);
      goto done;
    }
  while ((rc = csv_next(&r)) == 1) {
    if (ss->n == cap) {
      size_t ncap = cap ? 2 * cap : 1024;
      pa_subject *v = realloc(ss->v, ncap * sizeof *v);
      int *l = realloc(*lines, ncap * sizeof *l);
      if (v)
        ss->v = v;
      if (l)
        *lines = l;
      if (!v || !l) {
        rc = pa_error(PA_ENOMEM, "%s: out of memory for %zu subjects", path, ncap);
        goto done;
      }
      cap = ncap;
    }
    pa_subject *s = &ss->v[ss->n];
    memset(s, 0, sizeof *s);
    char where[32];
    snprintf(where, sizeof where, "line %d", r.rec_line);
    if (c_case >= r.nf) {
      rc = pa_error(PA_EFORMAT, "%s: line %d: %d fields, too few to hold 'case' (column %d)", path, r.rec_line, r.nf,
                    c_case + 1);
      goto done;
    }
    if ((rc = set_id(s, csv_field(&r, c_case), path, where)))
      goto done;
    (*lines)[ss->n++] = r.rec_line;
    s->usable = true;
    subject_check c = {path, s, 0};
    if (r.nf != ncols)
      problem(&c, "line %d has %d fields where the header has %d", r.rec_line, r.nf, ncols);
    for (int i = 1; i <= n; i++) {
      if (col_of[i] >= r.nf)
        continue; /* already reported as a short line */
      const char *f = csv_field(&r, col_of[i]);
      char *end;
      double v = strtod(f, &end);
      if (!*f || *end) {
        problem(&c, "answer i%d = '%.20s' is not a number", i, f);
        continue;
      }
      take_answer(&c, i, v, f);
    }
    check_finish(&c);
  }
  if (rc < 0)
    goto done;
  if (ss->n == 0)
    rc = pa_error(PA_EFORMAT, "%s: no subjects after the header", path);
done:
  csv_free(&r);
  pa_unmap_file(&m);
  return rc;
}

static int cmp_by_id(const void *a, const void *b) {
  const pa_subject *x = *(const pa_subject *const *)a, *y = *(const pa_subject *const *)b;
  int c = strcmp(x->id, y->id);
  return c ? c : (x > y) - (x < y); /* file order among equal ids, so a repeat names its first two places */
}

static int index_ids(const char *path, pa_subjects *ss, const int *lines) {
  ss->by_id = malloc(ss->n * sizeof *ss->by_id);
  if (!ss->by_id)
    return pa_error(PA_ENOMEM, "%s: out of memory indexing %zu subjects", path, ss->n);
  for (size_t i = 0; i < ss->n; i++)
    ss->by_id[i] = &ss->v[i];
  qsort(ss->by_id, ss->n, sizeof *ss->by_id, cmp_by_id);
  for (size_t k = 1; k < ss->n; k++) {
    size_t a = (size_t)(ss->by_id[k - 1] - ss->v), b = (size_t)(ss->by_id[k] - ss->v);
    if (strcmp(ss->v[a].id, ss->v[b].id))
      continue;
    if (lines)
      return pa_error(PA_EFORMAT, "%s: subject id %s appears twice (lines %d and %d)", path, ss->v[a].id, lines[a],
                      lines[b]);
    return pa_error(PA_EFORMAT, "%s: subject id %s appears twice (subjects #%zu and #%zu)", path, ss->v[a].id, a + 1,
                    b + 1);
  }
  return PA_OK;
}

void pa_subjects_destroy(pa_subjects *s) {
  if (!s)
    return;
  if (s->desc)
    for (size_t i = 0; i < s->n; i++)
      free(s->desc[i]);
  free(s->desc);
  free(s->by_id);
  free(s->v);
  free(s);
}

static bool has_suffix(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && !strcasecmp(s + n - m, suffix);
}

int pa_subjects_load(const char *path, const pa_inventory *inv, pa_subjects **out) {
  *out = NULL;
  bool json = has_suffix(path, ".json"), csv = has_suffix(path, ".csv");
  if (!json && !csv)
    return pa_error(PA_EINVAL, "%s: subjects must be a .json or a .csv file", path);
  pa_subjects *ss = calloc(1, sizeof *ss);
  if (!ss)
    return pa_error(PA_ENOMEM, "%s: out of memory", path);
  int *lines = NULL;
  int rc = json ? load_subjects_json(path, inv, ss) : load_subjects_csv(path, inv, ss, &lines);
  if (!rc)
    rc = index_ids(path, ss, lines);
  free(lines);
  if (rc) {
    pa_subjects_destroy(ss);
    return rc;
  }
  *out = ss;
  return PA_OK;
}

const char *pa_papi_dir(const char *dir) {
  if (dir && *dir)
    return dir;
  const char *env = getenv("PALIGN_PAPI_DIR");
  return env && *env ? env : "../shared/papi";
}

int pa_papi_load(const char *dir, const char *subjects_file, pa_inventory **inv, pa_subjects **subjects) {
  *inv = NULL;
  *subjects = NULL;
  const char *env = getenv("PALIGN_PAPI_DIR");
  const bool by_default = !(dir && *dir) && !(env && *env);
  dir = pa_papi_dir(dir);
  char path[4096 + 32];
  struct stat st;
  if (by_default && stat(dir, &st)) /* the default is relative to where palign runs */
    return pa_error(PA_ENOTFOUND,
                    "no PAPI data at %s (the default, relative to the working directory): give the folder with "
                    "--papi DIR or PALIGN_PAPI_DIR",
                    dir);
  int rc = pa_inventory_load(dir, inv);
  if (!rc) {
    if (subjects_file)
      snprintf(path, sizeof path, "%s", subjects_file);
    else
      snprintf(path, sizeof path, "%s/Test-set.json", dir);
    rc = pa_subjects_load(path, *inv, subjects);
  }
  if (!rc && !subjects_file) {
    snprintf(path, sizeof path, "%s/personality_prompt.json", dir);
    rc = pa_subjects_load_descriptions(*subjects, path);
  }
  if (rc) {
    pa_subjects_destroy(*subjects);
    pa_inventory_destroy(*inv);
    *subjects = NULL;
    *inv = NULL;
  }
  return rc;
}

int pa_subjects_load_descriptions(pa_subjects *s, const char *path) {
  cJSON *j;
  int rc = pa_json_load(path, &j);
  if (rc)
    return rc;
  char **desc = NULL;
  if (!cJSON_IsArray(j)) {
    rc = pa_error(PA_EFORMAT, "%s: not a JSON array of descriptions", path);
  } else if ((size_t)cJSON_GetArraySize(j) != s->n) {
    rc = pa_error(PA_EFORMAT, "%s: %d descriptions for %zu subjects (entry k must describe subject k)", path,
                  cJSON_GetArraySize(j), s->n);
  } else if (!(desc = calloc(s->n, sizeof *desc))) {
    rc = pa_error(PA_ENOMEM, "%s: out of memory for %zu descriptions", path, s->n);
  }
  size_t k = 0;
  for (const cJSON *e = j->child; !rc && e; e = e->next, k++) {
    if (!cJSON_IsObject(e)) {
      rc = pa_error(PA_EFORMAT, "%s: entry #%zu is not a JSON object", path, k + 1);
      break;
    }
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(e, "output");
    if (!o || cJSON_IsNull(o) || (cJSON_IsArray(o) && !o->child))
      continue; /* no description for this subject */
    const cJSON *first = cJSON_IsArray(o) ? o->child : NULL;
    if (!cJSON_IsString(first)) {
      rc = pa_error(PA_EFORMAT, "%s: entry #%zu: \"output\" is not an array of strings", path, k + 1);
      break;
    }
    if (first->valuestring[0] && !(desc[k] = strdup(first->valuestring)))
      rc = pa_error(PA_ENOMEM, "%s: out of memory at entry #%zu", path, k + 1);
  }
  cJSON_Delete(j);
  if (rc) {
    if (desc)
      for (size_t i = 0; i < s->n; i++)
        free(desc[i]);
    free(desc);
    return rc;
  }
  /* Replacing earlier descriptions only once the new file has fully loaded
   * leaves the subjects as they were when it fails. */
  if (s->desc)
    for (size_t i = 0; i < s->n; i++)
      free(s->desc[i]);
  free(s->desc);
  s->desc = desc;
  for (size_t i = 0; i < s->n; i++)
    s->v[i].description = desc[i];
  return PA_OK;
}

size_t pa_subjects_count(const pa_subjects *s) { return s->n; }

const pa_subject *pa_subjects_at(const pa_subjects *s, size_t i) { return i < s->n ? &s->v[i] : NULL; }

const pa_subject *pa_subjects_find(const pa_subjects *s, const char *id) {
  size_t lo = 0, hi = s->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(id, s->by_id[mid]->id);
    if (c == 0)
      return s->by_id[mid];
    if (c < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return NULL;
}

int pa_subjects_range(const char *r, size_t n, size_t *first, size_t *last) {
  if (n == 0)
    return -1;
  if (!strcmp(r, "all")) {
    *first = 0, *last = n - 1;
    return 0;
  }
  char *end;
  errno = 0;
  unsigned long a = strtoul(r, &end, 10);
  if (errno || end == r || !isdigit((unsigned char)r[0])) /* strtoul takes "-1" for ULONG_MAX */
    return -1;
  if (*end == '\0') {
    if (a == 0)
      return -1;
    *first = 0, *last = (a > n ? n : a) - 1;
    return 0;
  }
  if (*end != '-')
    return -1;
  const char *r2 = end + 1;
  unsigned long b = strtoul(r2, &end, 10);
  if (errno || end == r2 || !isdigit((unsigned char)r2[0]) || *end || b < a || a >= n)
    return -1;
  *first = a, *last = b >= n ? n - 1 : b;
  return 0;
}
