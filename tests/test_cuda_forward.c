/* The forward pass on the CUDA backend against the CPU backend
 * (tu_forward_compare.h): tiny llama and qwen2 models (palign mkmodel), a
 * shared prefix, two sequences (one continuing from its cache), steering and
 * head capture, greedy generation and a pass with a LoRA adapter, with the
 * weights in fp32 and in bf16 on both. Skips (exit 77) without a device.
 *
 * Tolerances, of the largest magnitude of the CPU's, with the same argmax
 * and the same generated tokens:
 * - fp32: 1e-4 (fp32 through a few layers; every operation's own error is
 *   checked tighter in test_cuda_ops.c);
 * - bf16: 2e-3. Both backends round the same operands to bf16 and their
 *   products are exact, but a sum that differs in its last fp32 bit can round
 *   to the neighbouring bf16 value (a relative step of 2^-8) when it becomes
 *   the next product's input; such flips are rare (about one input in 2^15)
 *   and each moves an output by a small share of one term, so the layers
 *   add up to well under 2e-3, against the 1e-2 to 1e-1 that separates bf16
 *   from fp32 weights. */
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
#include "tu_cuda.h"
#include "testutil.h"
#include "tu_forward_compare.h"

static void test_llama(void **s) {
  (void)s;
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  tu_check_forward("llama", pa_backend_cuda(), PA_WEIGHTS_BF16, 2e-3);
}

static void test_qwen2(void **s) {
  (void)s;
  tu_check_forward("qwen2", pa_backend_cuda(), PA_WEIGHTS_FP32, 1e-4);
  tu_check_forward("qwen2", pa_backend_cuda(), PA_WEIGHTS_BF16, 2e-3);
}

int main(void) {
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
