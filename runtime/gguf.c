#include "gguf.h"

#include "fileio.h"
#include "quant.h"
#include "status.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GGUF_MAGIC "GGUF"

struct pa_gguf {
  char *path;
  pa_mapped file;
  const uint8_t *map; /* file.data, and */
  uint64_t size;      /* file.size, for brevity */
  uint32_t version;
  uint64_t alignment;
  uint64_t data_off;
  size_t n_kv, kv_cap; /* entries read, entries allocated */
  pa_gguf_kv *kv;
  size_t n_tensors;
  pa_gguf_tensor *tensors;
};

bool pa_str_eq(pa_str s, const char *z) {
  size_t n = strlen(z);
  return s.len == n && memcmp(s.ptr, z, n) == 0;
}

static const char *const type_names[PA_GGUF_NTYPES] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool",  "string", "array", "uint64", "int64", "float64",
};

/* Size of one element of a fixed-size type; 0 for string and array. */
static const uint8_t type_size[PA_GGUF_NTYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *pa_gguf_type_name(uint32_t t) { return t < PA_GGUF_NTYPES ? type_names[t] : "invalid"; }

bool pa_gguf_type_is_int(uint32_t t) {
  return t <= PA_GGUF_INT32 || t == PA_GGUF_BOOL || t == PA_GGUF_UINT64 || t == PA_GGUF_INT64;
}

bool pa_gguf_type_is_float(uint32_t t) { return t == PA_GGUF_FLOAT32 || t == PA_GGUF_FLOAT64; }

/* ---- a bounds-checked cursor over the mapping ---------------------------- */

typedef struct {
  const pa_gguf *g;
  uint64_t pos;
} cursor;

static int short_read(const cursor *c, const char *what, uint64_t need) {
  return pa_error(PA_EFORMAT, "%s: truncated: %s needs %llu bytes at offset %llu but the file has %llu",
                  c->g->path, what, (unsigned long long)need, (unsigned long long)c->pos,
                  (unsigned long long)c->g->size);
}

static int take(cursor *c, uint64_t n, const char *what, const uint8_t **p) {
  if (n > c->g->size - c->pos)
    return short_read(c, what, n);
  *p = c->g->map + c->pos;
  c->pos += n;
  return PA_OK;
}

static int rd_u32(cursor *c, const char *what, uint32_t *v) {
  const uint8_t *p = NULL;
  int rc = take(c, 4, what, &p);
  if (!rc)
    memcpy(v, p, 4);
  return rc;
}

static int rd_u64(cursor *c, const char *what, uint64_t *v) {
  const uint8_t *p = NULL;
  int rc = take(c, 8, what, &p);
  if (!rc)
    memcpy(v, p, 8);
  return rc;
}

static int rd_str(cursor *c, const char *what, pa_str *s) {
  uint64_t len;
  const uint8_t *p = NULL;
  int rc = rd_u64(c, what, &len);
  if (rc)
    return rc;
  if ((rc = take(c, len, what, &p)))
    return rc;
  s->ptr = (const char *)p;
  s->len = len;
  return PA_OK;
}

/* ---- reading -------------------------------------------------------------- */

static int read_kv(pa_gguf *g, cursor *c, pa_gguf_kv *kv) {
  int rc;
  if ((rc = rd_str(c, "metadata key", &kv->key)))
    return rc;
  if ((rc = rd_u32(c, "metadata type", &kv->type)))
    return rc;
  const int klen = kv->key.len > 200 ? 200 : (int)kv->key.len;
  if (kv->type >= PA_GGUF_NTYPES)
    return pa_error(PA_EFORMAT, "%s: metadata key '%.*s' has invalid type %u", g->path, klen,
                    kv->key.ptr, kv->type);
  kv->elem = kv->type;
  kv->n = 1;
  if (kv->type == PA_GGUF_ARRAY) {
    if ((rc = rd_u32(c, "array element type", &kv->elem)) || (rc = rd_u64(c, "array length", &kv->n)))
      return rc;
    if (kv->elem >= PA_GGUF_NTYPES || kv->elem == PA_GGUF_ARRAY)
      return pa_error(PA_EFORMAT, "%s: metadata key '%.*s' is an array of %s, which GGUF readers do not support",
                      g->path, klen, kv->key.ptr, kv->elem == PA_GGUF_ARRAY ? "arrays" : "an invalid type");
  }
  kv->data = g->map + c->pos;
  if (kv->elem != PA_GGUF_STRING) {
    const uint8_t *p = NULL;
    if (kv->n > (g->size - c->pos) / type_size[kv->elem])
      return pa_error(PA_EFORMAT, "%s: metadata key '%.*s': %llu elements of %s run past the end of the file",
                      g->path, klen, kv->key.ptr, (unsigned long long)kv->n, type_names[kv->elem]);
    return take(c, kv->n * type_size[kv->elem], "metadata value", &p);
  }
  /* each string takes at least its 8-byte length, which bounds the allocation */
  if (kv->n > (g->size - c->pos) / 8)
    return pa_error(PA_EFORMAT, "%s: metadata key '%.*s': %llu strings cannot fit in the file", g->path,
                    klen, kv->key.ptr, (unsigned long long)kv->n);
  kv->strs = malloc((kv->n ? kv->n : 1) * sizeof *kv->strs);
  if (!kv->strs)
    return pa_error(PA_ENOMEM, "%s: no memory for %llu strings", g->path, (unsigned long long)kv->n);
  for (uint64_t i = 0; i < kv->n; i++)
    if ((rc = rd_str(c, "metadata string", &kv->strs[i])))
      return rc;
  return PA_OK;
}

static int read_tensor_info(pa_gguf *g, cursor *c, pa_gguf_tensor *t) {
  int rc;
  if ((rc = rd_str(c, "tensor name", &t->name)) || (rc = rd_u32(c, "tensor dimension count", &t->n_dims)))
    return rc;
  const int nlen = t->name.len > 200 ? 200 : (int)t->name.len;
  if (t->n_dims == 0 || t->n_dims > PA_GGUF_MAX_DIMS)
    return pa_error(PA_EFORMAT, "%s: tensor '%.*s' has %u dimensions (1 to %d allowed)", g->path, nlen,
                    t->name.ptr, t->n_dims, PA_GGUF_MAX_DIMS);
  uint64_t count = 1;
  for (uint32_t d = 0; d < PA_GGUF_MAX_DIMS; d++) {
    t->ne[d] = 1;
    if (d < t->n_dims && (rc = rd_u64(c, "tensor shape", &t->ne[d])))
      return rc;
    if (t->ne[d] == 0 || t->ne[d] > (uint64_t)INT64_MAX / count)
      return pa_error(PA_EFORMAT, "%s: tensor '%.*s' has an absurd dimension %llu (zero, or the element count overflows)",
                      g->path, nlen, t->name.ptr, (unsigned long long)t->ne[d]);
    count *= t->ne[d];
  }
  if ((rc = rd_u32(c, "tensor type", &t->type)) || (rc = rd_u64(c, "tensor offset", &t->offset)))
    return rc;
  if (!pa_dtype_known(t->type))
    return pa_error(PA_EUNSUPPORTED, "%s: tensor '%.*s' has unknown type id %u", g->path, nlen, t->name.ptr,
                    t->type);
  if (t->ne[0] % pa_dtype_block(t->type) != 0)
    return pa_error(PA_EFORMAT, "%s: tensor '%.*s': row length %llu is not a multiple of the %s block size %u",
                    g->path, nlen, t->name.ptr, (unsigned long long)t->ne[0], pa_dtype_name(t->type),
                    pa_dtype_block(t->type));
  if (pa_dtype_row_bytes(t->type, count, &t->nbytes))
    return pa_error(PA_EFORMAT, "%s: tensor '%.*s': size of %llu %s values overflows", g->path, nlen,
                    t->name.ptr, (unsigned long long)count, pa_dtype_name(t->type));
  return PA_OK;
}

static int check_names_unique(pa_gguf *g) {
  /* n is at most a few thousand; a quadratic scan keeps this simple */
  for (size_t i = 0; i < g->n_kv; i++)
    for (size_t j = 0; j < i; j++)
      if (g->kv[i].key.len == g->kv[j].key.len && !memcmp(g->kv[i].key.ptr, g->kv[j].key.ptr, g->kv[i].key.len))
        return pa_error(PA_EFORMAT, "%s: metadata key '%.*s' appears twice", g->path,
                        (int)(g->kv[i].key.len > 200 ? 200 : g->kv[i].key.len), g->kv[i].key.ptr);
  for (size_t i = 0; i < g->n_tensors; i++)
    for (size_t j = 0; j < i; j++)
      if (g->tensors[i].name.len == g->tensors[j].name.len &&
          !memcmp(g->tensors[i].name.ptr, g->tensors[j].name.ptr, g->tensors[i].name.len))
        return pa_error(PA_EFORMAT, "%s: tensor '%.*s' appears twice", g->path,
                        (int)(g->tensors[i].name.len > 200 ? 200 : g->tensors[i].name.len), g->tensors[i].name.ptr);
  return PA_OK;
}

static int parse(pa_gguf *g) {
  cursor c = {g, 0};
  const uint8_t *magic = NULL;
  uint64_t n_tensors, n_kv;
  int rc;
  if ((rc = take(&c, 4, "magic", &magic)))
    return rc;
  if (memcmp(magic, GGUF_MAGIC, 4) != 0)
    return pa_error(PA_EFORMAT, "%s: not a GGUF file (magic %02x %02x %02x %02x, expected 'GGUF')", g->path,
                    magic[0], magic[1], magic[2], magic[3]);
  if ((rc = rd_u32(&c, "version", &g->version)))
    return rc;
  if (g->version == 1)
    return pa_error(PA_EUNSUPPORTED, "%s: GGUF version 1 is obsolete; convert the model again", g->path);
  if (g->version != 2 && g->version != 3) {
    /* a big-endian file reads its version byte-swapped */
    if ((g->version & 0xffff) == 0 && (g->version >> 24) <= 3)
      return pa_error(PA_EUNSUPPORTED, "%s: big-endian GGUF files are not supported", g->path);
    return pa_error(PA_EUNSUPPORTED, "%s: unknown GGUF version %u", g->path, g->version);
  }
  if ((rc = rd_u64(&c, "tensor count", &n_tensors)) || (rc = rd_u64(&c, "metadata count", &n_kv)))
    return rc;
  /* every entry takes at least 12 bytes (key length + type), every tensor 24 */
  if (n_kv > (g->size - c.pos) / 12 || n_tensors > (g->size - c.pos) / 24)
    return pa_error(PA_EFORMAT, "%s: header claims %llu metadata entries and %llu tensors, more than the file can hold",
                    g->path, (unsigned long long)n_kv, (unsigned long long)n_tensors);
  g->kv_cap = n_kv;
  g->kv = calloc(n_kv ? n_kv : 1, sizeof *g->kv);
  g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
  if (!g->kv || !g->tensors)
    return pa_error(PA_ENOMEM, "%s: no memory for the header", g->path);
  for (; g->n_kv < n_kv; g->n_kv++)
    if ((rc = read_kv(g, &c, &g->kv[g->n_kv])))
      return rc;

  g->alignment = PA_GGUF_DEFAULT_ALIGNMENT;
  const pa_gguf_kv *al = pa_gguf_find(g, "general.alignment");
  if (al) {
    if (al->type != PA_GGUF_UINT32 || pa_gguf_kv_int(al, 0) == 0 ||
        (pa_gguf_kv_int(al, 0) & (pa_gguf_kv_int(al, 0) - 1)) != 0)
      return pa_error(PA_EFORMAT, "%s: general.alignment must be a uint32 power of two", g->path);
    g->alignment = (uint64_t)pa_gguf_kv_int(al, 0);
  }

  for (; g->n_tensors < n_tensors; g->n_tensors++)
    if ((rc = read_tensor_info(g, &c, &g->tensors[g->n_tensors])))
      return rc;
  if ((rc = check_names_unique(g)))
    return rc;

  uint64_t pad = (g->alignment - c.pos % g->alignment) % g->alignment;
  g->data_off = c.pos + pad;
  if (n_tensors > 0 && g->data_off > g->size)
    return pa_error(PA_EFORMAT, "%s: truncated: the tensor data section would start at %llu, past the end (%llu bytes)",
                    g->path, (unsigned long long)g->data_off, (unsigned long long)g->size);
  const uint64_t data_size = g->data_off <= g->size ? g->size - g->data_off : 0;
  for (size_t i = 0; i < g->n_tensors; i++) {
    pa_gguf_tensor *t = &g->tensors[i];
    const int nlen = t->name.len > 200 ? 200 : (int)t->name.len;
    if (t->offset % g->alignment != 0)
      return pa_error(PA_EFORMAT, "%s: tensor '%.*s' offset %llu is not a multiple of the alignment %llu", g->path,
                      nlen, t->name.ptr, (unsigned long long)t->offset, (unsigned long long)g->alignment);
    if (t->offset > data_size || t->nbytes > data_size - t->offset)
      return pa_error(PA_EFORMAT, "%s: tensor '%.*s' (offset %llu, %llu bytes) runs past the end of the file (%llu data bytes)",
                      g->path, nlen, t->name.ptr, (unsigned long long)t->offset, (unsigned long long)t->nbytes,
                      (unsigned long long)data_size);
    t->data = g->map + g->data_off + t->offset;
  }
  return PA_OK;
}

int pa_gguf_open(const char *path, pa_gguf **out) {
  *out = NULL;
  pa_gguf *g = calloc(1, sizeof *g);
  if (!g || !(g->path = strdup(path))) {
    free(g);
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  }
  int rc = pa_map_file(path, 4 + 4 + 8 + 8, "a GGUF header", &g->file);
  g->map = g->file.data;
  g->size = g->file.size;
  if (!rc)
    rc = parse(g);
  if (rc) {
    pa_gguf_close(g);
    return rc;
  }
  *out = g;
  return PA_OK;
}

void pa_gguf_close(pa_gguf *g) {
  if (!g)
    return;
  if (g->kv) /* all allocated entries: the one being read when parsing failed may own strings */
    for (size_t i = 0; i < g->kv_cap; i++)
      free(g->kv[i].strs);
  free(g->kv);
  free(g->tensors);
  pa_unmap_file(&g->file);
  free(g->path);
  free(g);
}

const char *pa_gguf_path(const pa_gguf *g) { return g->path; }
uint32_t pa_gguf_version(const pa_gguf *g) { return g->version; }
uint64_t pa_gguf_alignment(const pa_gguf *g) { return g->alignment; }
uint64_t pa_gguf_file_size(const pa_gguf *g) { return g->size; }
uint64_t pa_gguf_data_offset(const pa_gguf *g) { return g->data_off; }
size_t pa_gguf_n_kv(const pa_gguf *g) { return g->n_kv; }
const pa_gguf_kv *pa_gguf_kv_at(const pa_gguf *g, size_t i) { return i < g->n_kv ? &g->kv[i] : NULL; }
size_t pa_gguf_n_tensors(const pa_gguf *g) { return g->n_tensors; }
const pa_gguf_tensor *pa_gguf_tensor_at(const pa_gguf *g, size_t i) {
  return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const pa_gguf_kv *pa_gguf_find(const pa_gguf *g, const char *key) {
  for (size_t i = 0; i < g->n_kv; i++)
    if (pa_str_eq(g->kv[i].key, key))
      return &g->kv[i];
  return NULL;
}

const pa_gguf_tensor *pa_gguf_find_tensor(const pa_gguf *g, const char *name) {
  for (size_t i = 0; i < g->n_tensors; i++)
    if (pa_str_eq(g->tensors[i].name, name))
      return &g->tensors[i];
  return NULL;
}

int64_t pa_gguf_kv_int(const pa_gguf_kv *kv, uint64_t i) {
  assert(pa_gguf_type_is_int(kv->elem) && i < kv->n);
  const uint8_t *p = kv->data + i * type_size[kv->elem];
  switch (kv->elem) {
  case PA_GGUF_UINT8: return p[0];
  case PA_GGUF_BOOL: return p[0] != 0;
  case PA_GGUF_INT8: return (int8_t)p[0];
  case PA_GGUF_UINT16: { uint16_t v; memcpy(&v, p, 2); return v; }
  case PA_GGUF_INT16: { int16_t v; memcpy(&v, p, 2); return v; }
  case PA_GGUF_UINT32: { uint32_t v; memcpy(&v, p, 4); return v; }
  case PA_GGUF_INT32: { int32_t v; memcpy(&v, p, 4); return v; }
  case PA_GGUF_UINT64: { uint64_t v; memcpy(&v, p, 8); return v > INT64_MAX ? INT64_MAX : (int64_t)v; }
  default: { int64_t v; memcpy(&v, p, 8); return v; }
  }
}

uint64_t pa_gguf_kv_uint(const pa_gguf_kv *kv, uint64_t i) {
  if (kv->elem == PA_GGUF_UINT64) {
    uint64_t v;
    memcpy(&v, kv->data + i * 8, 8);
    return v;
  }
  int64_t v = pa_gguf_kv_int(kv, i);
  return v < 0 ? 0 : (uint64_t)v;
}

double pa_gguf_kv_float(const pa_gguf_kv *kv, uint64_t i) {
  assert(pa_gguf_type_is_float(kv->elem) && i < kv->n);
  if (kv->elem == PA_GGUF_FLOAT32) {
    float v;
    memcpy(&v, kv->data + i * 4, 4);
    return v;
  }
  double v;
  memcpy(&v, kv->data + i * 8, 8);
  return v;
}

static int lookup(const pa_gguf *g, const char *key, const pa_gguf_kv **kv) {
  *kv = pa_gguf_find(g, key);
  if (!*kv)
    return pa_error(PA_ENOTFOUND, "%s: metadata key '%s' is missing", g->path, key);
  return PA_OK;
}

static int wrong_type(const pa_gguf *g, const char *key, const pa_gguf_kv *kv, const char *want) {
  return pa_error(PA_EFORMAT, "%s: metadata key '%s' should be %s but is %s%s%s", g->path, key, want,
                  pa_gguf_type_name(kv->type), kv->type == PA_GGUF_ARRAY ? " of " : "",
                  kv->type == PA_GGUF_ARRAY ? pa_gguf_type_name(kv->elem) : "");
}

int pa_gguf_get_int(const pa_gguf *g, const char *key, int64_t lo, int64_t hi, int64_t *out) {
  const pa_gguf_kv *kv;
  int rc = lookup(g, key, &kv);
  if (rc)
    return rc;
  if (kv->type == PA_GGUF_ARRAY || !pa_gguf_type_is_int(kv->type) || kv->type == PA_GGUF_BOOL)
    return wrong_type(g, key, kv, "an integer");
  int64_t v = pa_gguf_kv_int(kv, 0);
  if (v < lo || v > hi || (kv->type == PA_GGUF_UINT64 && pa_gguf_kv_uint(kv, 0) > (uint64_t)INT64_MAX))
    return pa_error(PA_EFORMAT, "%s: metadata key '%s' = %lld is outside the range %lld..%lld", g->path, key,
                    (long long)v, (long long)lo, (long long)hi);
  *out = v;
  return PA_OK;
}

int pa_gguf_get_float(const pa_gguf *g, const char *key, double *out) {
  const pa_gguf_kv *kv;
  int rc = lookup(g, key, &kv);
  if (rc)
    return rc;
  if (kv->type == PA_GGUF_ARRAY || kv->type == PA_GGUF_BOOL || kv->type == PA_GGUF_STRING)
    return wrong_type(g, key, kv, "a number");
  *out = pa_gguf_type_is_float(kv->type) ? pa_gguf_kv_float(kv, 0) : (double)pa_gguf_kv_int(kv, 0);
  return PA_OK;
}

int pa_gguf_get_bool(const pa_gguf *g, const char *key, bool *out) {
  const pa_gguf_kv *kv;
  int rc = lookup(g, key, &kv);
  if (rc)
    return rc;
  if (kv->type != PA_GGUF_BOOL)
    return wrong_type(g, key, kv, "a bool");
  *out = kv->data[0] != 0;
  return PA_OK;
}

int pa_gguf_get_str(const pa_gguf *g, const char *key, pa_str *out) {
  const pa_gguf_kv *kv;
  int rc = lookup(g, key, &kv);
  if (rc)
    return rc;
  if (kv->type != PA_GGUF_STRING)
    return wrong_type(g, key, kv, "a string");
  *out = kv->strs[0];
  return PA_OK;
}

int pa_gguf_get_arr(const pa_gguf *g, const char *key, uint32_t elem, const pa_gguf_kv **out) {
  const pa_gguf_kv *kv;
  int rc = lookup(g, key, &kv);
  if (rc)
    return rc;
  bool ok = kv->type == PA_GGUF_ARRAY &&
            (kv->elem == elem || (elem == PA_GGUF_INT32 && pa_gguf_type_is_int(kv->elem) && kv->elem != PA_GGUF_BOOL));
  if (!ok) {
    char want[48];
    snprintf(want, sizeof want, "an array of %s", pa_gguf_type_name(elem));
    return wrong_type(g, key, kv, want);
  }
  *out = kv;
  return PA_OK;
}

/* ---- writing ---------------------------------------------------------------- */

typedef struct {
  uint8_t *p;
  size_t len, cap;
} buf;

static int buf_put(buf *b, const void *p, size_t n) {
  if (n == 0) /* p may be NULL then, and memcpy must not see it */
    return PA_OK;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n)
      cap *= 2;
    uint8_t *np = realloc(b->p, cap);
    if (!np)
      return pa_error(PA_ENOMEM, "GGUF writer: no memory");
    b->p = np;
    b->cap = cap;
  }
  memcpy(b->p + b->len, p, n);
  b->len += n;
  return PA_OK;
}

static int put_u32(buf *b, uint32_t v) { return buf_put(b, &v, 4); }
static int put_u64(buf *b, uint64_t v) { return buf_put(b, &v, 8); }
static int put_str(buf *b, const char *s) {
  size_t n = strlen(s);
  return put_u64(b, n) || buf_put(b, s, n) ? PA_ENOMEM : PA_OK;
}

struct pa_gguf_writer {
  buf kv;      /* serialised metadata entries */
  uint64_t n_kv;
  buf info;    /* serialised tensor infos */
  buf data;    /* tensor data, each tensor aligned */
  uint64_t n_tensors;
};

int pa_gguf_writer_create(pa_gguf_writer **out) {
  *out = calloc(1, sizeof **out);
  return *out ? PA_OK : pa_error(PA_ENOMEM, "GGUF writer: no memory");
}

void pa_gguf_writer_destroy(pa_gguf_writer *w) {
  if (!w)
    return;
  free(w->kv.p);
  free(w->info.p);
  free(w->data.p);
  free(w);
}

static int kv_head(pa_gguf_writer *w, const char *key, uint32_t type) {
  w->n_kv++;
  return put_str(&w->kv, key) || put_u32(&w->kv, type) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_u32(pa_gguf_writer *w, const char *key, uint32_t v) {
  return kv_head(w, key, PA_GGUF_UINT32) || put_u32(&w->kv, v) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_i32(pa_gguf_writer *w, const char *key, int32_t v) {
  return kv_head(w, key, PA_GGUF_INT32) || buf_put(&w->kv, &v, 4) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_f32(pa_gguf_writer *w, const char *key, float v) {
  return kv_head(w, key, PA_GGUF_FLOAT32) || buf_put(&w->kv, &v, 4) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_bool(pa_gguf_writer *w, const char *key, bool v) {
  uint8_t b = v;
  return kv_head(w, key, PA_GGUF_BOOL) || buf_put(&w->kv, &b, 1) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_str(pa_gguf_writer *w, const char *key, const char *v) {
  return kv_head(w, key, PA_GGUF_STRING) || put_str(&w->kv, v) ? PA_ENOMEM : PA_OK;
}

static int arr_head(pa_gguf_writer *w, const char *key, uint32_t elem, size_t n) {
  return kv_head(w, key, PA_GGUF_ARRAY) || put_u32(&w->kv, elem) || put_u64(&w->kv, n) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_arr_str(pa_gguf_writer *w, const char *key, const char *const *v, size_t n) {
  if (arr_head(w, key, PA_GGUF_STRING, n))
    return PA_ENOMEM;
  for (size_t i = 0; i < n; i++)
    if (put_str(&w->kv, v[i]))
      return PA_ENOMEM;
  return PA_OK;
}

int pa_gguf_set_arr_f32(pa_gguf_writer *w, const char *key, const float *v, size_t n) {
  return arr_head(w, key, PA_GGUF_FLOAT32, n) || buf_put(&w->kv, v, 4 * n) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_set_arr_i32(pa_gguf_writer *w, const char *key, const int32_t *v, size_t n) {
  return arr_head(w, key, PA_GGUF_INT32, n) || buf_put(&w->kv, v, 4 * n) ? PA_ENOMEM : PA_OK;
}

int pa_gguf_copy_kv(pa_gguf_writer *w, const pa_gguf_kv *kv) {
  if (put_u64(&w->kv, kv->key.len) || buf_put(&w->kv, kv->key.ptr, (size_t)kv->key.len) || put_u32(&w->kv, kv->type))
    return PA_ENOMEM;
  if (kv->type == PA_GGUF_ARRAY && (put_u32(&w->kv, kv->elem) || put_u64(&w->kv, kv->n)))
    return PA_ENOMEM;
  if (kv->elem == PA_GGUF_STRING) {
    for (uint64_t i = 0; i < kv->n; i++)
      if (put_u64(&w->kv, kv->strs[i].len) || buf_put(&w->kv, kv->strs[i].ptr, (size_t)kv->strs[i].len))
        return PA_ENOMEM;
  } else if (buf_put(&w->kv, kv->data, (size_t)(kv->n * type_size[kv->elem]))) {
    return PA_ENOMEM;
  }
  w->n_kv++;
  return PA_OK;
}

int pa_gguf_add_tensor(pa_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims, const uint64_t *ne,
                       const void *data) {
  if (n_dims == 0 || n_dims > PA_GGUF_MAX_DIMS)
    return pa_error(PA_EINVAL, "GGUF writer: tensor '%s' has %u dimensions", name, n_dims);
  uint64_t count = 1, nbytes;
  for (uint32_t d = 0; d < n_dims; d++)
    count *= ne[d];
  int rc = pa_dtype_row_bytes(type, count, &nbytes);
  if (rc)
    return pa_error_prefix(rc, "GGUF writer: tensor '%s': ", name);
  static const uint8_t zeros[PA_GGUF_DEFAULT_ALIGNMENT];
  size_t pad = (PA_GGUF_DEFAULT_ALIGNMENT - w->data.len % PA_GGUF_DEFAULT_ALIGNMENT) % PA_GGUF_DEFAULT_ALIGNMENT;
  if (buf_put(&w->data, zeros, pad))
    return PA_ENOMEM;
  if (put_str(&w->info, name) || put_u32(&w->info, n_dims))
    return PA_ENOMEM;
  for (uint32_t d = 0; d < n_dims; d++)
    if (put_u64(&w->info, ne[d]))
      return PA_ENOMEM;
  if (put_u32(&w->info, type) || put_u64(&w->info, w->data.len) || buf_put(&w->data, data, nbytes))
    return PA_ENOMEM;
  w->n_tensors++;
  return PA_OK;
}

int pa_gguf_writer_write(const pa_gguf_writer *w, const char *path) {
  buf head = {0};
  int rc = PA_OK;
  if (buf_put(&head, GGUF_MAGIC, 4) || put_u32(&head, 3) || put_u64(&head, w->n_tensors) ||
      put_u64(&head, w->n_kv) || buf_put(&head, w->kv.p, w->kv.len) || buf_put(&head, w->info.p, w->info.len)) {
    free(head.p);
    return PA_ENOMEM;
  }
  static const uint8_t zeros[PA_GGUF_DEFAULT_ALIGNMENT];
  size_t pad = (PA_GGUF_DEFAULT_ALIGNMENT - head.len % PA_GGUF_DEFAULT_ALIGNMENT) % PA_GGUF_DEFAULT_ALIGNMENT;
  const pa_chunk chunks[] = {{head.p, head.len}, {zeros, pad}, {w->data.p, w->data.len}};
  rc = pa_write_atomic(path, chunks, 3);
  free(head.p);
  return rc;
}
