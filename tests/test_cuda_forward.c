/* The forward pass on the CUDA backend against the CPU backend: tiny llama
 * and qwen2 models (palign mkmodel), a shared prefix, two sequences (one
 * continuing from its cache), steering and head capture, then a cached
 * continuation and greedy generation. What is not on the GPU yet (LoRA, the
 * trainer) is refused with a message. Skips (exit 77) without a device.
 *
 * Tolerance: logits and heads within 1e-4 of the largest magnitude of the
 * CPU's (fp32 through a few layers; every operation's own error is checked
 * tighter in test_cuda_ops.c), and the same argmax; generated tokens the
 * same. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"
#include "testutil.h"
#include "tu_forward_compare.h"

static void test_llama(void **s) {
  (void)s;
  tu_check_forward("llama", pa_backend_cuda(), 1e-4);
}

static void test_qwen2(void **s) {
  (void)s;
  tu_check_forward("qwen2", pa_backend_cuda(), 1e-4);
}

int main(void) {
  if (pa_cuda_devices() == 0 || !pa_backend_cuda()) {
    fprintf(stderr, "skipping: no CUDA device (%s)\n", pa_cuda_error()[0] ? pa_cuda_error() : "none visible");
    return 77;
  }
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
