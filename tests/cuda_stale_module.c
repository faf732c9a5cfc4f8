/* cuda_stale_module.c: stand-ins for the CUDA backend's library
 * (libpalign_cuda.so) that palign must refuse, naming them
 * (kernels/backends.c; tests/test_cuda_module.sh): built with
 * STALE_TABLE_BYTES, a library whose operation table has another size than
 * this palign's (built against another backend.h); without it, one that
 * lacks pa_cuda_backend_bytes (built before palign checked the size).
 * Both say a device is there, so that only the check stands between palign
 * and a table it would read wrong. */
#include "backend.h"

#include <stddef.h>

static const char table[512]; /* not a pa_backend: nothing may call through it */

int pa_cuda_devices(void) { return 1; }
int pa_cuda_select(int device) { return device == 0 ? 0 : -1; }
const pa_backend *pa_backend_cuda(void) { return (const pa_backend *)table; }
const char *pa_cuda_error(void) { return ""; }
#ifdef STALE_TABLE_BYTES
size_t pa_cuda_backend_bytes(void) { return STALE_TABLE_BYTES; }
#endif
