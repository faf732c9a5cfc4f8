/* safetensors.h: reading and writing .safetensors files (Hugging Face).
 *
 * Format: an 8-byte little-endian header length N, N bytes of JSON (an object
 * mapping tensor names to {"dtype", "shape", "data_offsets": [begin, end]},
 * plus an optional "__metadata__" object of string values), then the data
 * section; offsets are relative to the start of the data section.
 *
 * A file is mapped read-only and validated whole at open: the header length
 * against the file and a 100 MB cap, the JSON, every field's type, every
 * tensor's dtype, shape and byte range (inside the data section, size equal to
 * the element count times the element size, no two tensors overlapping, no
 * name twice). Later code can trust what it is given.
 *
 * Tensors of any dtype the format defines (F64, I64, U8, BOOL, F8_E4M3, ...)
 * are listed with their sizes checked; only F32, F16 and BF16 have values
 * palign reads (pa_st_tensor_to_f32 refuses the others). An unknown dtype
 * string is refused at open.
 *
 * Errors: functions return 0 or a negative PA_E* code and record a message
 * naming the file and the problem (status.h).
 * A pa_safetensors is immutable after open and safe to read from many threads.
 */
#ifndef PALIGN_SAFETENSORS_H
#define PALIGN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define PA_ST_MAX_DIMS 8
/* Headers above this are refused as absurd (the largest real ones, for
 * models with tens of thousands of tensors, are a few MB). */
#define PA_ST_MAX_HEADER (100u * 1000u * 1000u)

/* The dtype of a tensor that has no pa_dtype equivalent (U8, BOOL, F8_E4M3,
 * ...); dtype_name says which it is. */
#define PA_ST_DTYPE_OTHER 0xffffffffu

/* A view of one stored tensor. Read: every pointer is owned by the file
 * object and valid until it is closed. Write: the caller's; nbytes and file
 * are ignored by the writer (it derives nbytes from dtype and shape). */
typedef struct {
  const char *name;
  const char *file;               /* the .safetensors path it lives in (for messages) */
  uint32_t dtype;                 /* pa_dtype (F32, F16, BF16, F64, I64, I32, I16, I8) or PA_ST_DTYPE_OTHER */
  const char *dtype_name;         /* as the format spells it: "BF16", "U8" */
  uint32_t n_dims;                /* 0 (a scalar) to PA_ST_MAX_DIMS */
  uint64_t shape[PA_ST_MAX_DIMS]; /* outermost first, as in PyTorch; unused entries are 1 */
  uint64_t n_elems;               /* product of the shape; 1 for a scalar, 0 if any dim is 0 */
  uint64_t nbytes;
  const void *data; /* into the mapping; possibly unaligned */
} pa_st_tensor;

typedef struct pa_safetensors pa_safetensors;

/* Opens and validates `path`. On failure *out is NULL. */
int pa_safetensors_open(const char *path, pa_safetensors **out);
void pa_safetensors_close(pa_safetensors *st); /* accepts NULL */

const char *pa_safetensors_path(const pa_safetensors *st);
size_t pa_safetensors_n_tensors(const pa_safetensors *st);
/* Tensors in the order the header lists them; NULL past the end. */
const pa_st_tensor *pa_safetensors_tensor_at(const pa_safetensors *st, size_t i);
/* NULL if absent (no message recorded: absence is often expected). */
const pa_st_tensor *pa_safetensors_find(const pa_safetensors *st, const char *name);
/* A "__metadata__" value, or NULL if the file has no such key. */
const char *pa_safetensors_metadata(const pa_safetensors *st, const char *key);

/* Bytes per element of a safetensors dtype string ("BF16" -> 2); 0 if the
 * string is not a dtype the format defines. Sub-byte types (F4) are not. */
unsigned pa_st_dtype_size(const char *dtype_name);

/* Converts all n_elems values of an F32, F16 or BF16 tensor to fp32 in dst
 * (room for n_elems floats). Other dtypes: PA_EUNSUPPORTED, naming the file,
 * tensor and dtype. Pure: safe from many threads. */
int pa_st_tensor_to_f32(const pa_st_tensor *t, float *dst);

/* ---- writing ------------------------------------------------------------ */

/* One "__metadata__" entry (Hugging Face writes {"format": "pt"}). */
typedef struct {
  const char *key;
  const char *value;
} pa_st_meta;

/* Writes n tensors (dtype PA_F32, PA_F16 or PA_BF16; data holds the
 * little-endian values, n_elems derived from shape) in the given order, with
 * the header padded to a multiple of 8 bytes, to a temporary file beside
 * `path`, then renames it into place, so a reader never sees a partial file.
 * Names must be unique, non-empty and not "__metadata__". The same input
 * gives byte-identical files. */
int pa_safetensors_write(const char *path, const pa_st_tensor *tensors, size_t n, const pa_st_meta *meta,
                         size_t n_meta);

#endif
