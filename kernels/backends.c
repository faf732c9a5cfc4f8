/* backends.c: the backend a user names (backend.h pa_backend_named).
 *
 * The CUDA backend is a shared library of its own (kernels/cuda/,
 * libpalign_cuda.so), loaded the first time cuda or auto is asked for: from
 * the file the environment's PALIGN_CUDA_MODULE names when set (the tests
 * load the backend built against the CUDA emulation so, tests/cuda_emu, in
 * builds with or without a CUDA toolkit), else from where the build put it,
 * else by name (the loader's search path); a build without the backend
 * loads one only where PALIGN_CUDA_MODULE names it. A program that only ever
 * runs on the CPU never loads the CUDA runtime. */
#define _GNU_SOURCE /* dlopen's RTLD_ flags under -std=c11 */
#include "backend.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* where the build put the CUDA backend (CMake defines it), or none */
#ifdef PALIGN_CUDA_MODULE
static const char *const built_module = PALIGN_CUDA_MODULE;
#else
static const char *const built_module = NULL;
#endif

typedef struct {
  int (*devices)(void);
  int (*select)(int);
  const pa_backend *(*backend)(void);
  const char *(*error)(void);
  size_t (*backend_bytes)(void);
} cuda_module;

/* The module's entry points (cuda_backend.h); NULL with a message in err when it cannot be loaded. */
static const cuda_module *load_cuda(char *err, size_t n) {
  static cuda_module m;
  static int tried;
  static char why[512];
  if (!tried) {
    tried = 1;
    const char *chosen = getenv("PALIGN_CUDA_MODULE");
    const char *path = chosen && *chosen ? chosen : built_module;
    void *h = NULL;
    char first[384] = ""; /* why the file itself failed: the fallback by name would hide it */
    if (path) {
      h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
      if (!h) {
        const char *e = dlerror();
        snprintf(first, sizeof first, "%s", e ? e : "");
      }
      if (!h && path == built_module)
        h = dlopen("libpalign_cuda.so", RTLD_NOW | RTLD_LOCAL);
    }
    if (h) {
      *(void **)&m.devices = dlsym(h, "pa_cuda_devices");
      *(void **)&m.select = dlsym(h, "pa_cuda_select");
      *(void **)&m.backend = dlsym(h, "pa_backend_cuda");
      *(void **)&m.error = dlsym(h, "pa_cuda_error");
      *(void **)&m.backend_bytes = dlsym(h, "pa_cuda_backend_bytes");
    }
    if (!path) {
      snprintf(why, sizeof why, "this palign was built without the CUDA backend (PALIGN_CUDA=OFF or no CUDA toolkit)");
    } else if (!h || !m.devices || !m.select || !m.backend || !m.error || !m.backend_bytes) {
      const char *e = h ? dlerror() : first;
      snprintf(why, sizeof why, "the CUDA backend (%s) cannot be loaded: %s", path, e && *e ? e : "symbols missing");
      m.backend = NULL;
    } else if (m.backend_bytes() != sizeof(pa_backend)) {
      snprintf(why, sizeof why,
               "the CUDA backend (%s) was built for another palign: its operation table is %zu bytes, this "
               "palign's %zu (build the two together)",
               path, m.backend_bytes(), sizeof(pa_backend));
      m.backend = NULL;
    }
  }
  if (!m.backend) {
    snprintf(err, n, "%s", why);
    return NULL;
  }
  return &m;
}

int pa_backend_devices(const pa_backend *be) {
  if (!be || be->host_memory)
    return 0;
  char why[600];
  const cuda_module *m = load_cuda(why, sizeof why);
  const int n = m ? m->devices() : 0;
  return n > 0 ? n : 0;
}

const pa_backend *pa_backend_named(const char *name, int device, char *err, size_t n) {
  if (!name || !strcmp(name, "cpu"))
    return pa_backend_cpu();
  const int want_cuda = !strcmp(name, "cuda");
  if (!want_cuda && strcmp(name, "auto")) {
    snprintf(err, n, "no backend '%s' (cpu, cuda or auto)", name);
    return NULL;
  }
  char why[600];
  const cuda_module *m = load_cuda(why, sizeof why);
  const int devices = m ? m->devices() : 0;
  if (devices > 0 && m->select((device < 0 ? 0 : device) % devices) == 0)
    return m->backend();
  /* a GPU's driver that cannot serve, or a device there that cannot be
   * used as asked (PALIGN_CUDA_ATTENTION naming no kernel, say): not a
   * machine without one, even for auto */
  if (devices != 0) {
    snprintf(err, n, "--backend %s: %s (--backend cpu runs without it)", name, m->error());
    return NULL;
  }
  if (!want_cuda)
    return pa_backend_cpu();
  snprintf(err, n, "--backend cuda: %s", !m ? why : "no CUDA device is visible");
  return NULL;
}
