/* backends.c: the backend a user names (backend.h pa_backend_named). */
#include "backend.h"

#include <stdio.h>
#include <string.h>

#ifdef PALIGN_HAVE_CUDA
#include "cuda_backend.h"
#endif

const pa_backend *pa_backend_named(const char *name, int device, char *err, size_t n) {
  if (!name || !strcmp(name, "cpu"))
    return pa_backend_cpu();
  const int want_cuda = !strcmp(name, "cuda");
  if (!want_cuda && strcmp(name, "auto")) {
    snprintf(err, n, "no backend '%s' (cpu, cuda or auto)", name);
    return NULL;
  }
#ifdef PALIGN_HAVE_CUDA
  const int devices = pa_cuda_devices();
  if (devices > 0 && pa_cuda_select((device < 0 ? 0 : device) % devices) == 0)
    return pa_backend_cuda();
  if (!want_cuda)
    return pa_backend_cpu();
  snprintf(err, n, "--backend cuda: %s", devices > 0 ? pa_cuda_error() : "no CUDA device is visible");
  return NULL;
#else
  (void)device;
  if (!want_cuda)
    return pa_backend_cpu();
  snprintf(err, n, "--backend cuda: this palign was built without the CUDA backend (PALIGN_CUDA=OFF or no CUDA toolkit)");
  return NULL;
#endif
}
