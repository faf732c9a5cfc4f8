/* The forward pass's device path, run here: the CPU backend's operations
 * behind a backend that says its memory is not the host's, so the forward
 * pass takes the path it takes on a GPU (the weights uploaded into one
 * arena and rebased, the RoPE tables, caches and activations in "device"
 * buffers of their own, tokens and positions uploaded, new keys and values
 * stored by strided copies, steering as added displacements, heads and
 * logits downloaded) with the CPU's arithmetic. It must give the CPU path's
 * results bit for bit (tu_forward_compare.h). The buffers are poisoned when
 * allocated and freed, so a path that reads host memory where it should read
 * its own copy, or forgets an upload, shows. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "tu_forward_compare.h"

static size_t live; /* buffers allocated and not yet released */

/* A buffer with its size in front, filled with NaN-ish garbage. */
static void *dev_alloc(size_t bytes) {
  size_t *p = malloc(sizeof(size_t) * 2 + (bytes ? bytes : 1));
  if (!p)
    return NULL;
  p[0] = bytes;
  memset(p + 2, 0xFF, bytes);
  live++;
  return p + 2;
}

static void dev_release(void *q) {
  if (!q)
    return;
  size_t *p = (size_t *)q - 2;
  memset(q, 0xA5, p[0]);
  free(p);
  live--;
}

static void dev_copy(void *dst, const void *src, size_t bytes) { memcpy(dst, src, bytes); }

static void dev_copy2d(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height) {
  for (size_t r = 0; r < height; r++)
    memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
}

static pa_backend device;

static void test_llama(void **s) {
  (void)s;
  tu_check_forward("llama", &device, 0);
}

static void test_qwen2(void **s) {
  (void)s;
  tu_check_forward("qwen2", &device, 0);
  assert_int_equal(live, 0); /* every buffer of both models released */
}

int main(void) {
  device = *pa_backend_cpu();
  device.name = "cpu-as-device";
  device.host_memory = 0;
  device.alloc = dev_alloc, device.release = dev_release;
  device.upload = dev_copy, device.download = dev_copy, device.copy2d = dev_copy2d;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
