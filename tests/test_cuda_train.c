/* The trainer (train.h: the LoRA adapter's forward and backward passes, what
 * DPO runs) on the CUDA backend against the CPU backend, on the fixture of
 * tu_train_compare.h (a tiny qwen2 model, a shared prefix and three
 * sequences). Skips (exit 77) without a device.
 *
 * Tolerances, of the largest value of the CPU's:
 * - fp32: 1e-4 for the logits and the gradients (fp32 through two layers
 *   and back; each operation's own error is checked tighter in
 *   test_cuda_ops.c, the backward operations there too);
 * - bf16: 2e-3 for both, as for the forward pass (test_cuda_forward.c says
 *   why bf16 allows more than fp32). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>

#include "cuda_backend.h"
#include "tu_cuda.h"
#include "testutil.h"
#include "tu_train_compare.h"

static void check(pa_weight_format wf, double tol) {
  pa_lora *g, *g_cpu;
  tu_train_compare(pa_backend_cuda(), wf, tol, tol, &g, &g_cpu);
  pa_lora_destroy(g), pa_lora_destroy(g_cpu);
}

static void test_fp32(void **s) {
  (void)s;
  check(PA_WEIGHTS_FP32, 1e-4);
}

static void test_bf16(void **s) {
  (void)s;
  check(PA_WEIGHTS_BF16, 2e-3);
}

/* AdamW on the device (pa_trainer_optimise): three steps with fp32 and with
 * bf16 weights, the same bits as the device's forward and backward passes
 * with the CPU's adamw on the host (tu_optimise_compare). */
static void test_optimiser(void **s) {
  (void)s;
  tu_optimise_compare(pa_backend_cuda(), PA_WEIGHTS_FP32, NULL, NULL, NULL);
  tu_optimise_compare(pa_backend_cuda(), PA_WEIGHTS_BF16, NULL, NULL, NULL);
}

int main(void) {
  const int ready = tu_cuda_ready();
  if (ready)
    return ready;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_fp32), cmocka_unit_test(test_bf16),
                                     cmocka_unit_test(test_optimiser)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
