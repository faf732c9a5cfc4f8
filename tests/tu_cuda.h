/* tu_cuda.h: whether a gpu test can run. 0: a device, and the CUDA backend
 * on it; 77 (ctest's skip) on a machine without a GPU or a driver; 1 when a
 * driver is there but cannot serve, or the backend cannot start on the
 * device: a GPU machine that must not pass for one without. */
#ifndef PALIGN_TU_CUDA_H
#define PALIGN_TU_CUDA_H

#include <stdio.h>

#include "cuda_backend.h"

static inline int tu_cuda_ready(void) {
  const int n = pa_cuda_devices();
  if (n == 0) {
    fprintf(stderr, "skipping: no CUDA device (%s)\n", pa_cuda_error()[0] ? pa_cuda_error() : "none visible");
    return 77;
  }
  if (n < 0 || !pa_backend_cuda()) {
    fprintf(stderr, "CUDA: %s\n", pa_cuda_error());
    return 1;
  }
  return 0;
}

#endif
