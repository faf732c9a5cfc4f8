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

/* Llama-3.1's RoPE scaling (frequency divisors the RoPE tables read, on
 * the host, before the weights go to the device): a Hugging Face directory
 * whose config asks for it. */
static void test_rope_scaled(void **s) {
  (void)s;
  char dir[300], cfg[400];
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  o.n_layers = 2, o.seed = 29;
  tu_path(dir, sizeof dir, "llama31");
  if (pa_mkmodel_write_hf(&o, dir))
    fail_msg("%s", pa_errmsg());
  snprintf(cfg, sizeof cfg, "%s/config.json", dir);
  char *text = tu_slurp(cfg, NULL), *at = strstr(text, "\"rope_scaling\":"), *end = at;
  if (at)
    for (end = at + strlen("\"rope_scaling\":"); *end == ' ' || *end == '\t';)
      end++;
  if (!at || strncmp(end, "null", 4))
    fail_msg("no \"rope_scaling\": null in %s:\n%s", cfg, text);
  char patched[16384];
  snprintf(patched, sizeof patched,
           "%.*s\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
           "\"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 32}%s",
           (int)(at - text), text, end + 4);
  tu_write_text(cfg, patched);
  free(text);
  tu_check_forward_model("llama, llama3 rope scaling", dir, &device, 0);
}

int main(void) {
  device = *pa_backend_cpu();
  device.name = "cpu-as-device";
  device.host_memory = 0;
  device.alloc = dev_alloc, device.release = dev_release;
  device.upload = dev_copy, device.download = dev_copy, device.copy2d = dev_copy2d;
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_llama), cmocka_unit_test(test_qwen2),
                                     cmocka_unit_test(test_rope_scaled)};
  return cmocka_run_group_tests(tests, tu_setup, tu_teardown);
}
