/* tu_fake_device.h: the CPU backend's operations behind a backend that says
 * its memory is not the host's, so that the runtime takes the path it takes
 * on a GPU (uploads, its own buffers, strided copies, downloads) with the
 * CPU's arithmetic. Its buffers are poisoned when allocated and freed, so a
 * path that reads host memory where it should read its own copy, or forgets
 * an upload, shows; tu_fake_live counts the buffers not yet released.
 * Setting tu_fake_fail makes the next status() report a failed operation,
 * as a GPU's would (backend.h); setting tu_fake_allocs_left to n >= 0 lets
 * n more allocations through and refuses every one after (NULL, error()
 * saying so), as a full device's memory would, until it is set to -1;
 * tu_fake_uploaded and tu_fake_downloaded count the bytes copied each way. */
#ifndef PALIGN_TU_FAKE_DEVICE_H
#define PALIGN_TU_FAKE_DEVICE_H

#include <stdlib.h>
#include <string.h>

#include "backend.h"

static size_t tu_fake_live;
static int tu_fake_fail;
static long tu_fake_allocs_left = -1;
static const char *tu_fake_why = "";
static size_t tu_fake_uploaded, tu_fake_downloaded;

static inline int tu_fake_status(void) {
  const int failed = tu_fake_fail;
  tu_fake_fail = 0;
  if (failed)
    tu_fake_why = "an operation failed (injected by the test)";
  return failed ? -1 : 0;
}

static inline const char *tu_fake_error(void) { return tu_fake_why; }

static inline void *tu_fake_alloc(size_t bytes) {
  if (tu_fake_allocs_left == 0) {
    tu_fake_why = "an allocation refused (injected by the test)";
    return NULL;
  }
  tu_fake_allocs_left -= tu_fake_allocs_left > 0;
  size_t *p = malloc(sizeof(size_t) * 2 + (bytes ? bytes : 1));
  if (!p)
    return NULL;
  p[0] = bytes;
  memset(p + 2, 0xFF, bytes); /* NaN as floats */
  tu_fake_live++;
  return p + 2;
}

static inline void tu_fake_release(void *q) {
  if (!q)
    return;
  size_t *p = (size_t *)q - 2;
  memset(q, 0xA5, p[0]);
  free(p);
  tu_fake_live--;
}

static inline void tu_fake_upload(void *dst, const void *src, size_t bytes) {
  memcpy(dst, src, bytes);
  tu_fake_uploaded += bytes;
}

static inline void tu_fake_download(void *dst, const void *src, size_t bytes) {
  memcpy(dst, src, bytes);
  tu_fake_downloaded += bytes;
}

static inline void tu_fake_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                                  size_t height) {
  for (size_t r = 0; r < height; r++)
    memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
}

/* The backend (made on first use). */
static inline const pa_backend *tu_fake_device(void) {
  static pa_backend device;
  if (!device.name) {
    device = *pa_backend_cpu();
    device.name = "cpu-as-device";
    device.host_memory = 0;
    device.alloc = tu_fake_alloc, device.release = tu_fake_release;
    device.upload = tu_fake_upload, device.download = tu_fake_download, device.copy2d = tu_fake_copy2d;
    device.status = tu_fake_status, device.error = tu_fake_error;
  }
  return &device;
}

#endif
