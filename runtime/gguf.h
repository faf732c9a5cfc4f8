/* gguf.h: reading and writing GGUF model files (versions 2 and 3).
 *
 * A file is mapped read-only and validated whole at open: every metadata entry,
 * every tensor's type, shape, offset and size is checked against the file
 * before pa_gguf_open() returns, so later code can trust what it is given.
 * Strings and tensor data are views into the mapping (valid until close).
 * Multi-byte values are little-endian; big-endian files are refused.
 * A pa_gguf is immutable after open and safe to read from many threads.
 */
#ifndef PALIGN_GGUF_H
#define PALIGN_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A byte string that is not NUL-terminated (a view into a file). */
typedef struct {
  const char *ptr;
  uint64_t len;
} pa_str;

bool pa_str_eq(pa_str s, const char *z);

typedef enum {
  PA_GGUF_UINT8 = 0,
  PA_GGUF_INT8 = 1,
  PA_GGUF_UINT16 = 2,
  PA_GGUF_INT16 = 3,
  PA_GGUF_UINT32 = 4,
  PA_GGUF_INT32 = 5,
  PA_GGUF_FLOAT32 = 6,
  PA_GGUF_BOOL = 7,
  PA_GGUF_STRING = 8,
  PA_GGUF_ARRAY = 9,
  PA_GGUF_UINT64 = 10,
  PA_GGUF_INT64 = 11,
  PA_GGUF_FLOAT64 = 12,
  PA_GGUF_NTYPES
} pa_gguf_type;

const char *pa_gguf_type_name(uint32_t t);

#define PA_GGUF_MAX_DIMS 4
#define PA_GGUF_DEFAULT_ALIGNMENT 32

/* One metadata entry. A scalar is an array of one: `n` is 1 and `type` is its
 * type; for PA_GGUF_ARRAY, `elem` is the element type and `n` the length.
 * `data` points at the raw little-endian element(s), possibly unaligned; string
 * values (scalar or array) are in `strs[0..n)`. Read numbers with the
 * pa_gguf_kv_* accessors. */
typedef struct {
  pa_str key;
  uint32_t type;
  uint32_t elem;
  uint64_t n;
  const uint8_t *data;
  pa_str *strs;
} pa_gguf_kv;

typedef struct {
  pa_str name;
  uint32_t n_dims;
  uint64_t ne[PA_GGUF_MAX_DIMS]; /* ne[0] varies fastest (the row length); unused dims are 1 */
  uint32_t type;                 /* pa_dtype */
  uint64_t offset;               /* from the start of the data section */
  uint64_t nbytes;
  const void *data;              /* into the mapping */
} pa_gguf_tensor;

typedef struct pa_gguf pa_gguf;

int pa_gguf_open(const char *path, pa_gguf **out);
void pa_gguf_close(pa_gguf *g);

const char *pa_gguf_path(const pa_gguf *g);
uint32_t pa_gguf_version(const pa_gguf *g);
uint64_t pa_gguf_alignment(const pa_gguf *g);
uint64_t pa_gguf_file_size(const pa_gguf *g);
uint64_t pa_gguf_data_offset(const pa_gguf *g);

size_t pa_gguf_n_kv(const pa_gguf *g);
const pa_gguf_kv *pa_gguf_kv_at(const pa_gguf *g, size_t i);
const pa_gguf_kv *pa_gguf_find(const pa_gguf *g, const char *key); /* NULL if absent */

size_t pa_gguf_n_tensors(const pa_gguf *g);
const pa_gguf_tensor *pa_gguf_tensor_at(const pa_gguf *g, size_t i);
const pa_gguf_tensor *pa_gguf_find_tensor(const pa_gguf *g, const char *name);

/* Element i of an entry, converted. An integer accessor on a float entry (or
 * the reverse) is a bug, caught by an assertion; check kv->elem first. */
int64_t pa_gguf_kv_int(const pa_gguf_kv *kv, uint64_t i);   /* any integer or bool type */
uint64_t pa_gguf_kv_uint(const pa_gguf_kv *kv, uint64_t i); /* UINT64 beyond INT64_MAX */
double pa_gguf_kv_float(const pa_gguf_kv *kv, uint64_t i);  /* FLOAT32 or FLOAT64 */
bool pa_gguf_type_is_int(uint32_t t);                       /* integer types and BOOL */
bool pa_gguf_type_is_float(uint32_t t);

/* Typed scalar look-ups. They return PA_ENOTFOUND if the key is absent and
 * PA_EFORMAT if it has another type or the value does not fit; both record a
 * message naming the file and the key. */
int pa_gguf_get_int(const pa_gguf *g, const char *key, int64_t lo, int64_t hi, int64_t *out);
int pa_gguf_get_float(const pa_gguf *g, const char *key, double *out); /* float or integer */
int pa_gguf_get_bool(const pa_gguf *g, const char *key, bool *out);
int pa_gguf_get_str(const pa_gguf *g, const char *key, pa_str *out);
/* An array whose elements have type `elem` (any integer type when elem is
 * PA_GGUF_INT32 and the values are read with pa_gguf_kv_int). */
int pa_gguf_get_arr(const pa_gguf *g, const char *key, uint32_t elem, const pa_gguf_kv **out);

/* ---- writing ------------------------------------------------------------ */

typedef struct pa_gguf_writer pa_gguf_writer;

int pa_gguf_writer_create(pa_gguf_writer **out);
void pa_gguf_writer_destroy(pa_gguf_writer *w);

int pa_gguf_set_u32(pa_gguf_writer *w, const char *key, uint32_t v);
int pa_gguf_set_i32(pa_gguf_writer *w, const char *key, int32_t v);
int pa_gguf_set_f32(pa_gguf_writer *w, const char *key, float v);
int pa_gguf_set_bool(pa_gguf_writer *w, const char *key, bool v);
int pa_gguf_set_str(pa_gguf_writer *w, const char *key, const char *v);
int pa_gguf_set_arr_str(pa_gguf_writer *w, const char *key, const char *const *v, size_t n);
int pa_gguf_set_arr_f32(pa_gguf_writer *w, const char *key, const float *v, size_t n);
int pa_gguf_set_arr_i32(pa_gguf_writer *w, const char *key, const int32_t *v, size_t n);

/* Copies an entry read from another file, whatever its type. */
int pa_gguf_copy_kv(pa_gguf_writer *w, const pa_gguf_kv *kv);

/* Adds a tensor; `data` (pa_dtype_row_bytes of the element count) is copied. */
int pa_gguf_add_tensor(pa_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                       const uint64_t *ne, const void *data);

/* Writes the file (version 3) to a temporary name beside `path`, then renames
 * it into place, so a reader never sees a partial file. */
int pa_gguf_writer_write(const pa_gguf_writer *w, const char *path);

#endif
