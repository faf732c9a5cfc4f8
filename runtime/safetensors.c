#include "safetensors.h"

#include "fileio.h"

#include "quant.h"
#include "status.h"

#include <cJSON.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* JSON numbers are doubles; integers above 2^53 cannot be told apart, so
 * larger shapes or offsets are refused rather than silently rounded. */
#define MAX_JSON_INT 9007199254740992.0

struct pa_safetensors {
  char *path;
  pa_mapped file;
  const uint8_t *map; /* file.data, and */
  uint64_t size;      /* file.size, for brevity */
  uint64_t data_off, data_size;
  cJSON *header; /* kept: tensor names point into it */
  const cJSON *metadata;
  size_t n;
  pa_st_tensor *tensors; /* header order */
  size_t *by_name;       /* indices sorted by name, for bsearch */
};

static const struct {
  const char *name;
  unsigned size;
  uint32_t dtype;
} dtypes[] = {
    {"F64", 8, PA_F64},
    {"F32", 4, PA_F32},
    {"F16", 2, PA_F16},
    {"BF16", 2, PA_BF16},
    {"I64", 8, PA_I64},
    {"I32", 4, PA_I32},
    {"I16", 2, PA_I16},
    {"I8", 1, PA_I8},
    {"U64", 8, PA_ST_DTYPE_OTHER},
    {"U32", 4, PA_ST_DTYPE_OTHER},
    {"U16", 2, PA_ST_DTYPE_OTHER},
    {"U8", 1, PA_ST_DTYPE_OTHER},
    {"BOOL", 1, PA_ST_DTYPE_OTHER},
    {"F8_E4M3", 1, PA_ST_DTYPE_OTHER},
    {"F8_E5M2", 1, PA_ST_DTYPE_OTHER},
    {"F8_E8M0", 1, PA_ST_DTYPE_OTHER},
    {"C64", 8, PA_ST_DTYPE_OTHER},
};
#define N_DTYPES (sizeof dtypes / sizeof dtypes[0])

static int dtype_index(const char *name) {
  for (size_t i = 0; i < N_DTYPES; i++)
    if (strcmp(dtypes[i].name, name) == 0)
      return (int)i;
  return -1;
}

unsigned pa_st_dtype_size(const char *dtype_name) {
  int i = dtype_index(dtype_name);
  return i < 0 ? 0 : dtypes[i].size;
}

/* ---- reading -------------------------------------------------------------- */

/* A JSON number that is an exact non-negative integer a double can hold. */
static bool json_uint(const cJSON *j, uint64_t *out) {
  if (!cJSON_IsNumber(j))
    return false;
  double d = j->valuedouble;
  if (!(d >= 0 && d <= MAX_JSON_INT) || d != (double)(uint64_t)d)
    return false;
  *out = (uint64_t)d;
  return true;
}

static int parse_tensor(pa_safetensors *st, const cJSON *j, pa_st_tensor *t) {
  const char *path = st->path;
  t->name = j->string;
  t->file = st->path;
  if (!cJSON_IsObject(j))
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s' is not a JSON object", path, t->name);
  const cJSON *dt = cJSON_GetObjectItemCaseSensitive(j, "dtype");
  const cJSON *shape = cJSON_GetObjectItemCaseSensitive(j, "shape");
  const cJSON *offs = cJSON_GetObjectItemCaseSensitive(j, "data_offsets");
  if (!cJSON_IsString(dt))
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s': \"dtype\" is %s", path, t->name, dt ? "not a string" : "missing");
  int di = dtype_index(dt->valuestring);
  if (di < 0)
    return pa_error(PA_EUNSUPPORTED, "%s: tensor '%.200s' has unknown dtype '%.40s'", path, t->name, dt->valuestring);
  t->dtype = dtypes[di].dtype;
  t->dtype_name = dtypes[di].name;

  if (!cJSON_IsArray(shape))
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s': \"shape\" is %s", path, t->name,
                    shape ? "not an array" : "missing");
  int nd = cJSON_GetArraySize(shape);
  if (nd > PA_ST_MAX_DIMS)
    return pa_error(PA_EUNSUPPORTED, "%s: tensor '%.200s' has %d dimensions (at most %d supported)", path, t->name, nd,
                    PA_ST_MAX_DIMS);
  t->n_dims = (uint32_t)nd;
  /* a zero dim makes the product 0 whatever the others say, but absurd dims
   * are still refused, so the overflow check runs over the non-zero ones */
  uint64_t nonzero = 1;
  bool overflow = false, empty = false;
  for (int d = 0; d < PA_ST_MAX_DIMS; d++)
    t->shape[d] = 1;
  int d = 0;
  for (const cJSON *e = shape->child; e; e = e->next, d++) {
    if (!json_uint(e, &t->shape[d]))
      return pa_error(PA_EFORMAT, "%s: tensor '%.200s': shape entry %d is not a non-negative integer", path, t->name,
                      d);
    if (t->shape[d] == 0)
      empty = true;
    else if (t->shape[d] > UINT64_MAX / nonzero)
      overflow = true;
    else
      nonzero *= t->shape[d];
  }
  t->n_elems = empty ? 0 : nonzero;
  unsigned esize = dtypes[di].size;
  if (overflow || nonzero > UINT64_MAX / esize)
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s': the size of its shape overflows", path, t->name);
  t->nbytes = t->n_elems * esize;

  if (!cJSON_IsArray(offs))
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s': \"data_offsets\" is %s", path, t->name,
                    offs ? "not an array" : "missing");
  uint64_t begin, end;
  if (cJSON_GetArraySize(offs) != 2 || !json_uint(offs->child, &begin) || !json_uint(offs->child->next, &end))
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s': \"data_offsets\" must be two non-negative integers", path,
                    t->name);
  if (begin > end)
    return pa_error(PA_EFORMAT, "%s: tensor '%.200s': data_offsets [%llu, %llu] end before they begin", path, t->name,
                    (unsigned long long)begin, (unsigned long long)end);
  if (end > st->data_size)
    return pa_error(PA_EFORMAT,
                    "%s: tensor '%.200s': data_offsets [%llu, %llu] run past the end of the data section "
                    "(%llu bytes; the file is truncated or the header is wrong)",
                    path, t->name, (unsigned long long)begin, (unsigned long long)end,
                    (unsigned long long)st->data_size);
  if (end - begin != t->nbytes)
    return pa_error(PA_EFORMAT,
                    "%s: tensor '%.200s': data_offsets [%llu, %llu] span %llu bytes but %llu %s values need %llu", path,
                    t->name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)(end - begin),
                    (unsigned long long)t->n_elems, t->dtype_name, (unsigned long long)t->nbytes);
  t->data = st->map + st->data_off + begin;
  return PA_OK;
}

/* qsort has no context argument in C11; the comparators read the tensor
 * array through this thread-local pointer. */
static _Thread_local const pa_st_tensor *sort_base;

static int cmp_name(const void *a, const void *b) {
  return strcmp(sort_base[*(const size_t *)a].name, sort_base[*(const size_t *)b].name);
}

static int cmp_data(const void *a, const void *b) {
  const pa_st_tensor *x = &sort_base[*(const size_t *)a], *y = &sort_base[*(const size_t *)b];
  const uint8_t *px = x->data, *py = y->data;
  return px < py ? -1 : px > py ? 1 : 0;
}

static int check_layout(pa_safetensors *st) {
  size_t *idx = malloc((st->n ? st->n : 1) * sizeof *idx);
  if (!idx)
    return pa_error(PA_ENOMEM, "%s: no memory", st->path);
  for (size_t i = 0; i < st->n; i++)
    idx[i] = i;
  sort_base = st->tensors;
  qsort(idx, st->n, sizeof *idx, cmp_data);
  const pa_st_tensor *prev = NULL;
  for (size_t i = 0; i < st->n; i++) {
    const pa_st_tensor *t = &st->tensors[idx[i]];
    if (t->nbytes == 0) /* an empty range overlaps nothing */
      continue;
    if (prev && (const uint8_t *)prev->data + prev->nbytes > (const uint8_t *)t->data) {
      int rc = pa_error(PA_EFORMAT, "%s: tensors '%.200s' and '%.200s' overlap in the data section", st->path,
                        prev->name, t->name);
      free(idx);
      return rc;
    }
    prev = t;
  }

  for (size_t i = 0; i < st->n; i++)
    idx[i] = i;
  qsort(idx, st->n, sizeof *idx, cmp_name);
  for (size_t i = 1; i < st->n; i++)
    if (strcmp(st->tensors[idx[i]].name, st->tensors[idx[i - 1]].name) == 0) {
      int rc =
          pa_error(PA_EFORMAT, "%s: tensor '%.200s' appears twice in the header", st->path, st->tensors[idx[i]].name);
      free(idx);
      return rc;
    }
  st->by_name = idx;
  return PA_OK;
}

static int parse(pa_safetensors *st) {
  uint64_t hlen = 0;
  for (int i = 0; i < 8; i++)
    hlen |= (uint64_t)st->map[i] << (8 * i);
  if (hlen > PA_ST_MAX_HEADER)
    return pa_error(PA_EFORMAT, "%s: header length %llu is absurd (over %u bytes); not a safetensors file?", st->path,
                    (unsigned long long)hlen, PA_ST_MAX_HEADER);
  if (hlen > st->size - 8)
    return pa_error(PA_EFORMAT, "%s: truncated: the header length %llu runs past the end of the file (%llu bytes)",
                    st->path, (unsigned long long)hlen, (unsigned long long)st->size);
  if (hlen < 2 || st->map[8] != '{')
    return pa_error(PA_EFORMAT, "%s: the header does not start with a JSON object; not a safetensors file?", st->path);
  st->data_off = 8 + hlen;
  st->data_size = st->size - st->data_off;

  /* cJSON gets its own NUL-terminated copy, so a parser bug cannot read past
   * the header into the tensor data unnoticed (the sanitizer build sees it) */
  char *text = malloc(hlen + 1);
  if (!text)
    return pa_error(PA_ENOMEM, "%s: no memory for a %llu-byte header", st->path, (unsigned long long)hlen);
  memcpy(text, st->map + 8, hlen);
  text[hlen] = '\0';
  const char *end = NULL;
  st->header = cJSON_ParseWithLengthOpts(text, hlen, &end, false);
  size_t stop = end ? (size_t)(end - text) : 0;
  bool tail_ok = st->header != NULL;
  /* the format allows the header to be padded with spaces */
  for (size_t i = stop; tail_ok && i < hlen; i++)
    tail_ok = text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r';
  free(text);
  if (!st->header)
    return pa_error(PA_EFORMAT, "%s: the header is not valid JSON (error near byte %zu of %llu)", st->path, 8 + stop,
                    (unsigned long long)(8 + hlen));
  if (!tail_ok)
    return pa_error(PA_EFORMAT, "%s: unexpected bytes after the JSON header (at byte %zu)", st->path, 8 + stop);
  if (!cJSON_IsObject(st->header))
    return pa_error(PA_EFORMAT, "%s: the header is not a JSON object", st->path);

  size_t n = 0;
  for (const cJSON *c = st->header->child; c; c = c->next) {
    if (strcmp(c->string, "__metadata__") != 0) {
      n++;
      continue;
    }
    if (st->metadata)
      return pa_error(PA_EFORMAT, "%s: \"__metadata__\" appears twice", st->path);
    if (!cJSON_IsObject(c))
      return pa_error(PA_EFORMAT, "%s: \"__metadata__\" is not a JSON object", st->path);
    for (const cJSON *m = c->child; m; m = m->next)
      if (!cJSON_IsString(m))
        return pa_error(PA_EFORMAT, "%s: \"__metadata__\" value '%.200s' is not a string", st->path, m->string);
    st->metadata = c;
  }
  st->tensors = calloc(n ? n : 1, sizeof *st->tensors);
  if (!st->tensors)
    return pa_error(PA_ENOMEM, "%s: no memory for %zu tensors", st->path, n);
  for (const cJSON *c = st->header->child; c; c = c->next) {
    if (c == st->metadata)
      continue;
    int rc = parse_tensor(st, c, &st->tensors[st->n]);
    if (rc)
      return rc;
    st->n++;
  }
  return check_layout(st);
}

int pa_safetensors_open(const char *path, pa_safetensors **out) {
  *out = NULL;
  pa_safetensors *st = calloc(1, sizeof *st);
  if (!st || !(st->path = strdup(path))) {
    free(st);
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  }
  int rc = pa_map_file(path, 8, "the 8-byte header length", &st->file);
  st->map = st->file.data;
  st->size = st->file.size;
  if (!rc)
    rc = parse(st);
  if (rc) {
    pa_safetensors_close(st);
    return rc;
  }
  *out = st;
  return PA_OK;
}

void pa_safetensors_close(pa_safetensors *st) {
  if (!st)
    return;
  pa_unmap_file(&st->file);
  cJSON_Delete(st->header);
  free(st->tensors);
  free(st->by_name);
  free(st->path);
  free(st);
}

const char *pa_safetensors_path(const pa_safetensors *st) { return st->path; }
size_t pa_safetensors_n_tensors(const pa_safetensors *st) { return st->n; }

const pa_st_tensor *pa_safetensors_tensor_at(const pa_safetensors *st, size_t i) {
  return i < st->n ? &st->tensors[i] : NULL;
}

const pa_st_tensor *pa_safetensors_find(const pa_safetensors *st, const char *name) {
  size_t lo = 0, hi = st->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const pa_st_tensor *t = &st->tensors[st->by_name[mid]];
    int c = strcmp(t->name, name);
    if (c == 0)
      return t;
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return NULL;
}

const char *pa_safetensors_metadata(const pa_safetensors *st, const char *key) {
  const cJSON *v = st->metadata ? cJSON_GetObjectItemCaseSensitive(st->metadata, key) : NULL;
  return v ? v->valuestring : NULL;
}

int pa_st_tensor_to_f32(const pa_st_tensor *t, float *dst) {
  if (t->dtype != PA_F32 && t->dtype != PA_F16 && t->dtype != PA_BF16)
    return pa_error(PA_EUNSUPPORTED, "%s: tensor '%.200s' has dtype %s; palign reads only F32, F16 and BF16",
                    t->file ? t->file : "safetensors", t->name, t->dtype_name ? t->dtype_name : "?");
  if (t->n_elems == 0)
    return PA_OK;
  return pa_dequantize(t->dtype, t->data, dst, t->n_elems);
}

/* ---- writing ---------------------------------------------------------------- */

typedef struct {
  char *p;
  size_t len, cap;
  bool oom;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
  if (b->oom)
    return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1)
      cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) {
      b->oom = true;
      return;
    }
    b->p = np;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

static void sb_printf_u64(sbuf *b, uint64_t v) {
  char tmp[24];
  snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
  sb_puts(b, tmp);
}

/* A JSON string literal; bytes >= 0x80 pass through, so UTF-8 names stay UTF-8. */
static void sb_json_str(sbuf *b, const char *s) {
  sb_put(b, "\"", 1);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      char esc[2] = {'\\', (char)c};
      sb_put(b, esc, 2);
    } else if (c < 0x20) {
      char esc[8];
      snprintf(esc, sizeof esc, "\\u%04x", c);
      sb_puts(b, esc);
    } else {
      sb_put(b, (const char *)&c, 1);
    }
  }
  sb_put(b, "\"", 1);
}

static const char *writable_dtype(uint32_t dtype) {
  switch (dtype) {
  case PA_F32: return "F32";
  case PA_F16: return "F16";
  case PA_BF16: return "BF16";
  default: return NULL;
  }
}

/* Checks the tensors and fills nbytes[i]. */
static int check_write_input(const char *path, const pa_st_tensor *t, size_t n, uint64_t *nbytes) {
  for (size_t i = 0; i < n; i++) {
    const char *dn = writable_dtype(t[i].dtype);
    if (!t[i].name || !t[i].name[0] || strcmp(t[i].name, "__metadata__") == 0)
      return pa_error(PA_EINVAL, "%s: tensor %zu has an invalid name", path, i);
    if (!dn)
      return pa_error(PA_EINVAL, "%s: tensor '%.200s': cannot write dtype %s", path, t[i].name,
                      pa_dtype_name(t[i].dtype));
    if (t[i].n_dims > PA_ST_MAX_DIMS)
      return pa_error(PA_EINVAL, "%s: tensor '%.200s' has %u dimensions", path, t[i].name, t[i].n_dims);
    uint64_t count = 1;
    for (uint32_t d = 0; d < t[i].n_dims; d++) {
      if (t[i].shape[d] > (uint64_t)MAX_JSON_INT || (t[i].shape[d] && count > UINT64_MAX / t[i].shape[d]))
        return pa_error(PA_EINVAL, "%s: tensor '%.200s': shape overflows", path, t[i].name);
      count *= t[i].shape[d];
    }
    unsigned es = pa_st_dtype_size(dn);
    if (count > (uint64_t)MAX_JSON_INT / es)
      return pa_error(PA_EINVAL, "%s: tensor '%.200s' is too large", path, t[i].name);
    nbytes[i] = count * es;
    if (nbytes[i] && !t[i].data)
      return pa_error(PA_EINVAL, "%s: tensor '%.200s' has no data", path, t[i].name);
    for (size_t j = 0; j < i; j++)
      if (strcmp(t[i].name, t[j].name) == 0)
        return pa_error(PA_EINVAL, "%s: tensor '%.200s' given twice", path, t[i].name);
  }
  return PA_OK;
}

static int build_header(const char *path, const pa_st_tensor *t, size_t n, const uint64_t *nbytes,
                        const pa_st_meta *meta, size_t n_meta, sbuf *h) {
  sb_put(h, "{", 1);
  if (n_meta) {
    sb_puts(h, "\"__metadata__\":{");
    for (size_t i = 0; i < n_meta; i++) {
      if (i)
        sb_put(h, ",", 1);
      sb_json_str(h, meta[i].key);
      sb_put(h, ":", 1);
      sb_json_str(h, meta[i].value);
    }
    sb_put(h, "}", 1);
  }
  uint64_t off = 0;
  for (size_t i = 0; i < n; i++) {
    if (i || n_meta)
      sb_put(h, ",", 1);
    sb_json_str(h, t[i].name);
    sb_puts(h, ":{\"dtype\":\"");
    sb_puts(h, writable_dtype(t[i].dtype));
    sb_puts(h, "\",\"shape\":[");
    for (uint32_t d = 0; d < t[i].n_dims; d++) {
      if (d)
        sb_put(h, ",", 1);
      sb_printf_u64(h, t[i].shape[d]);
    }
    sb_puts(h, "],\"data_offsets\":[");
    sb_printf_u64(h, off);
    sb_put(h, ",", 1);
    if (nbytes[i] > (uint64_t)MAX_JSON_INT - off)
      return pa_error(PA_EINVAL, "%s: the tensors add up to more than 2^53 bytes", path);
    off += nbytes[i];
    sb_printf_u64(h, off);
    sb_puts(h, "]}");
  }
  sb_put(h, "}", 1);
  /* pad so the data section starts 8-byte aligned, as Hugging Face's writer does */
  while ((8 + h->len) % 8 != 0)
    sb_put(h, " ", 1);
  if (h->oom)
    return pa_error(PA_ENOMEM, "%s: no memory for the header", path);
  if (h->len > PA_ST_MAX_HEADER)
    return pa_error(PA_EINVAL, "%s: the header would be %zu bytes, over the %u limit", path, h->len, PA_ST_MAX_HEADER);
  return PA_OK;
}

int pa_safetensors_write(const char *path, const pa_st_tensor *tensors, size_t n, const pa_st_meta *meta,
                         size_t n_meta) {
  uint64_t *nbytes = calloc(n ? n : 1, sizeof *nbytes);
  if (!nbytes)
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  sbuf h = {0};
  int rc = check_write_input(path, tensors, n, nbytes);
  if (!rc)
    rc = build_header(path, tensors, n, nbytes, meta, n_meta, &h);
  pa_chunk *chunks = rc ? NULL : malloc((n + 2) * sizeof *chunks);
  if (!rc && !chunks)
    rc = pa_error(PA_ENOMEM, "%s: no memory", path);
  if (!rc) {
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
      len8[i] = (uint8_t)((uint64_t)h.len >> (8 * i));
    chunks[0] = (pa_chunk){len8, 8};
    chunks[1] = (pa_chunk){h.p, h.len};
    for (size_t i = 0; i < n; i++)
      chunks[i + 2] = (pa_chunk){tensors[i].data, (size_t)nbytes[i]};
    rc = pa_write_atomic(path, chunks, n + 2);
  }
  free(chunks);
  free(h.p);
  free(nbytes);
  return rc;
}
