// cuda_emu.cc: the CUDA runtime and cuBLAS of cuda_emu.h on the CPU.
#include "cuda_emu.h"
#include "rng.h"

#include <cblas.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <map>
#include <set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

struct emu_blas {
  cudaStream_t stream;
  cublasMath_t math;
};

// An event: recorded counts its cudaEventRecord calls, reached the last of
// them the stream has run (it is complete when the two agree), at the
// host's steady clock (ns), kept where timing is on.
struct emu_event {
  uint64_t id;
  uint64_t recorded, reached;
  bool timing;
  int64_t at_ns;
};

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {

constexpr int kSharedDefault = 48 << 10; // dynamic shared memory a kernel may use unless raised
constexpr int kSharedOptin = 232448;     // the H100's and H200's opt-in limit (227 KiB)
constexpr int kSMs = 132;                // the H100 SXM's and H200's multiprocessors
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStack = 256 << 10; // a thread's stack (kernels keep little on it; sanitizers more)

cudaError_t last_error = cudaSuccess; // cudaGetLastError's, cleared when read
cudaError_t fault = cudaSuccess;      // a kernel's fault: every later call returns it, as a GPU's would
// The containers live as long as the process, as a GPU's memory does: the
// backend keeps some device buffers to the end, and a container destroyed
// before the leak check would leave them unreachable.
std::map<uintptr_t, size_t> &allocations = *new std::map<uintptr_t, size_t>;
std::set<cudaStream_t> &streams = *new std::set<cudaStream_t>;
std::set<cublasHandle_t> &handles = *new std::set<cublasHandle_t>;
std::map<const void *, int> &shared_allowed = *new std::map<const void *, int>; // cudaFuncSetAttribute's, per kernel
std::map<uintptr_t, size_t> &pinned = *new std::map<uintptr_t, size_t>;         // cudaHostAlloc's
std::deque<std::function<void()>> &queued = *new std::deque<std::function<void()>>;   // the stream's work, in order
std::map<uint64_t, emu_event *> &events = *new std::map<uint64_t, emu_event *>;       // by id, never reused
uint64_t last_event_id = 0;
uint64_t order_seed = 0x9E3779B97F4A7C15ull;

int device = 0; // cudaSetDevice's

constexpr size_t kDeviceMemory = (size_t)80 << 30; // an H100's, unless PALIGN_EMU_MEMORY says otherwise
size_t device_used = 0;                            // bytes of the live device allocations

using emu::report; // an error's detail (below)

// The devices a process sees: PALIGN_EMU_DEVICES (1 to 16), else 1. They
// share one memory (the host's); what differs is the number a process is on,
// which NCCL's emulation checks as NCCL does (no two members on one device).
int device_count() {
  static const int n = [] {
    const char *env = getenv("PALIGN_EMU_DEVICES");
    if (!env || !*env)
      return 1;
    char *end;
    const long v = strtol(env, &end, 10);
    if (*end || v < 1 || v > 16) {
      report("PALIGN_EMU_DEVICES=%s: not a number of devices from 1 to 16; 1 device", env);
      return 1;
    }
    return (int)v;
  }();
  return n;
}

// The device's memory: PALIGN_EMU_MEMORY (bytes; a K, M or G after the
// number multiplies by 2^10, 2^20, 2^30), else 80 GiB. cudaMalloc refuses
// what would take the live allocations past it, as a GPU's does when full.
size_t device_memory() {
  static const size_t n = [] {
    const char *env = getenv("PALIGN_EMU_MEMORY");
    if (!env || !*env)
      return kDeviceMemory;
    char *end;
    errno = 0;
    const unsigned long long v = strtoull(env, &end, 10);
    const int shift = *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : 0;
    if (errno || *env < '0' || *env > '9' || (shift && end[1]) || (!shift && *end) || v > (SIZE_MAX >> shift)) {
      report("PALIGN_EMU_MEMORY=%s: not a number of bytes (a K, M or G after it allowed); %zu GiB", env,
             kDeviceMemory >> 30);
      return kDeviceMemory;
    }
    return (size_t)v << shift;
  }();
  return n;
}

cudaError_t error(cudaError_t e) {
  last_error = e;
  return e;
}

cudaError_t kernel_fault(cudaError_t e) {
  fault = e;
  return error(e);
}

// Whether [p, p + bytes) lies inside one of the allocations of m.
bool inside(const std::map<uintptr_t, size_t> &m, const void *p, size_t bytes) {
  auto it = m.upper_bound((uintptr_t)p);
  if (it == m.begin())
    return false;
  --it;
  const uintptr_t off = (uintptr_t)p - it->first;
  return off <= it->second && bytes <= it->second - off;
}

bool in_device(const void *p, size_t bytes) { return inside(allocations, p, bytes); }
bool in_pinned(const void *p, size_t bytes) { return inside(pinned, p, bytes); }

bool is_device(const void *p) { return in_device(p, 0); }

bool stream_ok(cudaStream_t s) { return !s || streams.count(s); }

// A copy's two sides, each checked to be where its kind says.
cudaError_t copy_sides(const char *call, void *dst, size_t dst_bytes, const void *src, size_t src_bytes,
                       cudaMemcpyKind kind, cudaStream_t s) {
  if (fault)
    return fault;
  if (!stream_ok(s)) {
    report("%s: stream %p was not created or is destroyed", call, (void *)s);
    return error(cudaErrorInvalidResourceHandle);
  }
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDeviceToDevice)
    return error(cudaErrorInvalidMemcpyDirection);
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (dst_dev ? !in_device(dst, dst_bytes) : is_device(dst)) {
    report("%s: the destination %p is not %zu bytes of %s memory", call, dst, dst_bytes, dst_dev ? "device" : "host");
    return error(cudaErrorInvalidValue);
  }
  if (src_dev ? !in_device(src, src_bytes) : is_device(src)) {
    report("%s: the source %p is not %zu bytes of %s memory", call, src, src_bytes, src_dev ? "device" : "host");
    return error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

// ---- threads as fibres ---------------------------------------------------------------------
//
// A block's threads run on fibres. A fibre takes the threads not yet started,
// in the shuffled order, one after another while each ends without reaching
// a barrier, so a kernel without barriers runs a whole block on one fibre
// without a switch; a thread that reaches __syncthreads() keeps its fibre,
// which goes back to the scheduler until a later stretch resumes it. On
// x86-64 a switch is the few instructions below: the callee-saved registers
// and the stack pointer. The floating-point control words are not switched
// (nothing here changes them, and loading them costs more than the rest of a
// switch). swapcontext, used elsewhere, makes a system call at each switch,
// too slow for kernels that meet a barrier a few dozen times per thread.

#if defined(__x86_64__)
// palign_emu_switch(save, to): saves this context's stack pointer in *save
// and continues the one whose stack pointer is `to`.
asm(R"(
  .text
  .globl palign_emu_switch
  .hidden palign_emu_switch
  .type palign_emu_switch, @function
palign_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size palign_emu_switch, .-palign_emu_switch
)");
extern "C" void palign_emu_switch(void **save, void *to);

struct context {
  void *sp;
};
#else
struct context {
  ucontext_t uc;
};
#endif

struct fibre {
  context ctx;
  char *stack;
  int thread; // the thread it holds (at a barrier), -1 when free
  uint3 index; // that thread's threadIdx
#ifdef EMU_ASAN
  // the frames AddressSanitizer moved off this fibre's stack (to catch use
  // after return), saved while it is switched out: what
  // __sanitizer_start_switch_fiber's first argument holds
  void *asan_frames;
#endif
};

std::vector<fibre *> &fibres = *new std::vector<fibre *>;
context scheduler;
fibre *running; // the fibre running, null outside a kernel
void (*body_fn)(void *);
void *body_ctx;
void *shared_block;             // the launch's dynamic shared memory
size_t shared_bytes;            // its size
std::vector<unsigned> unstarted; // the block's threads in their starting order
size_t next_unstarted;
size_t ended, reached; // threads that ended, and that reached a barrier, in this stretch
#ifdef EMU_ASAN
const void *scheduler_bottom;
size_t scheduler_size;
#endif

void switch_context(context *from, context *to) {
#if defined(__x86_64__)
  palign_emu_switch(&from->sp, to->sp);
#else
  swapcontext(&from->uc, &to->uc);
#endif
}

uint3 thread_index(unsigned t) {
  if (blockDim.y == 1 && blockDim.z == 1)
    return uint3{t, 0, 0};
  return uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
}

// The scheduler resumes f until its thread reaches a barrier or f runs out of threads.
void resume(fibre *f) {
  running = f;
  threadIdx = f->index;
#ifdef EMU_ASAN
  // the scheduler's frames that AddressSanitizer moved off its stack (to
  // catch use after return), saved here while f runs
  void *scheduler_asan_frames = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_asan_frames, f->stack, kStack);
  switch_context(&scheduler, &f->ctx);
  __sanitizer_finish_switch_fiber(scheduler_asan_frames, nullptr, nullptr);
#else
  switch_context(&scheduler, &f->ctx);
#endif
}

void to_scheduler(fibre *f) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&f->asan_frames, scheduler_bottom, scheduler_size);
  switch_context(&f->ctx, &scheduler);
  __sanitizer_finish_switch_fiber(f->asan_frames, &scheduler_bottom, &scheduler_size);
#else
  switch_context(&f->ctx, &scheduler);
#endif
}

[[noreturn]] void fibre_main() {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler_bottom, &scheduler_size);
#endif
  for (;;) {
    while (next_unstarted < unstarted.size()) {
      const unsigned t = unstarted[next_unstarted++];
      running->thread = (int)t;
      threadIdx = running->index = thread_index(t);
      body_fn(body_ctx);
      ended++;
    }
    running->thread = -1;
    to_scheduler(running);
  }
}

fibre *new_fibre() {
  fibre *f = new fibre();
  f->thread = -1;
  // the stack over a page nothing may touch: an overflow stops there
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  void *m = mmap(nullptr, page + kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED || mprotect(m, page, PROT_NONE)) {
    if (m != MAP_FAILED)
      munmap(m, page + kStack);
    delete f;
    return nullptr;
  }
  f->stack = static_cast<char *>(m) + page;
#if defined(__x86_64__)
  // the frame palign_emu_switch returns through: six registers, then
  // fibre_main as the return address, 16-byte aligned as a call leaves it,
  // over a null return address of its own
  void **sp = reinterpret_cast<void **>(((uintptr_t)f->stack + kStack) & ~(uintptr_t)15);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void *>(fibre_main);
  for (int r = 0; r < 6; r++)
    *--sp = nullptr;
  f->ctx.sp = sp;
#else
  getcontext(&f->ctx.uc);
  f->ctx.uc.uc_stack.ss_sp = f->stack;
  f->ctx.uc.uc_stack.ss_size = kStack;
  f->ctx.uc.uc_link = nullptr;
  makecontext(&f->ctx.uc, fibre_main, 0);
#endif
  return f;
}

// Fisher-Yates, the index drawn by a multiply rather than a division (a
// division per thread and stretch was a fifth of the emulation's time).
template <class T> void shuffle(std::vector<T> &v) {
  for (size_t i = v.size(); i > 1; i--)
    std::swap(v[i - 1], v[(size_t)(((unsigned __int128)pa_splitmix64(&order_seed) * i) >> 64)]);
}

// Runs one block of n threads, stretch by stretch between barriers, each
// stretch in a shuffled order. False if some threads ended in a stretch in
// which others reached a barrier (a __syncthreads() not every thread meets).
// The fibres are there (at most one a thread).
bool run_block(unsigned n) {
  unstarted.resize(n);
  for (unsigned t = 0; t < n; t++)
    unstarted[t] = t;
  shuffle(unstarted);
  next_unstarted = 0, ended = 0, reached = 0;
  static std::vector<fibre *> waiting, next;
  waiting.clear();
  for (size_t i = 0; next_unstarted < n; i++) { // the first stretch: until every thread has started
    resume(fibres[i]);
    if (fibres[i]->thread >= 0)
      waiting.push_back(fibres[i]);
  }
  bool agreed = true;
  for (;;) {
    agreed = agreed && !(ended && reached);
    if (waiting.empty())
      break;
    ended = 0, reached = 0;
    shuffle(waiting);
    next.clear();
    for (fibre *f : waiting) {
      resume(f);
      if (f->thread >= 0)
        next.push_back(f);
    }
    waiting.swap(next);
  }
  running = nullptr;
  return agreed;
}

} // namespace

void __syncthreads() {
  if (!running) {
    report("__syncthreads() called outside a kernel");
    abort();
  }
  reached++;
  to_scheduler(running);
}

namespace emu {

void *dynamic_shared() { return shared_block; }

unsigned lane() { return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32; }

bool wmma_tile_ok(const char *call, const void *p, size_t size, unsigned ldm, unsigned rows, unsigned cols,
                  bool row_major) {
  if (fault) // said already, by the first lane (nothing is loaded or stored after a fault)
    return false;
  if ((uintptr_t)p % 32 || ldm * size % 16) {
    report("%s: pointer %p or leading dimension %u: the pointer must be 32-byte aligned and the leading dimension a "
           "multiple of 16 bytes (%zu elements)",
           call, p, ldm, 16 / size);
    kernel_fault(cudaErrorMisalignedAddress);
    return false;
  }
  const unsigned lines = row_major ? rows : cols, width = row_major ? cols : rows;
  const size_t bytes = ((size_t)(lines - 1) * ldm + width) * size;
  const uintptr_t sh = (uintptr_t)shared_block;
  const bool in_shared = shared_block && (uintptr_t)p >= sh && (uintptr_t)p - sh <= shared_bytes &&
                         bytes <= shared_bytes - ((uintptr_t)p - sh);
  if (!in_shared && !in_device(p, bytes)) {
    report("%s: the %ux%u tile at %p (leading dimension %u) is not inside device or dynamic shared memory", call, rows,
           cols, (const void *)p, ldm);
    kernel_fault(cudaErrorIllegalAddress);
    return false;
  }
  return true;
}

bool device_argument(const char *kernel, int index, const void *p) {
  if (!p || is_device(p))
    return true;
  report("%s: argument %d (%p) is not device memory", kernel, index, p);
  kernel_fault(cudaErrorIllegalAddress);
  return false;
}

bool launch_ok(const void *kernel, const char *name, dim3 grid, dim3 block, size_t shared, cudaStream_t s) {
  if (fault)
    return false;
  if (!stream_ok(s)) {
    report("%s: launched on stream %p, which was not created or is destroyed", name, (void *)s);
    error(cudaErrorInvalidResourceHandle);
    return false;
  }
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (!grid.x || !grid.y || !grid.z || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535 || !threads ||
      threads > kMaxThreads || block.z > 64) {
    report("%s: grid (%u, %u, %u) of blocks (%u, %u, %u) is not a valid configuration", name, grid.x, grid.y, grid.z,
           block.x, block.y, block.z);
    error(cudaErrorInvalidConfiguration);
    return false;
  }
  const auto allowed = shared_allowed.find(kernel);
  const size_t limit = allowed != shared_allowed.end() ? (size_t)allowed->second : (size_t)kSharedDefault;
  if (shared > limit) {
    report("%s: %zu bytes of dynamic shared memory, the kernel may have %zu", name, shared, limit);
    error(cudaErrorInvalidValue);
    return false;
  }
  return true;
}

void run_grid(const char *name, dim3 grid, dim3 block, size_t shared, void (*body)(void *), void *ctx) {
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  while (fibres.size() < threads) { // a fibre a thread at most: each may hold one at a barrier
    fibre *f = new_fibre();
    if (!f) {
      report("%s: no host memory for a thread's stack", name);
      error(cudaErrorMemoryAllocation);
      return;
    }
    fibres.push_back(f);
  }
  // 128-byte aligned, as a GPU's shared memory is at least: the warp matrix functions want 32
  shared_bytes = shared;
  shared_block = aligned_alloc(128, (shared / 128 + 1) * 128);
  if (!shared_block) {
    report("%s: no host memory for %zu bytes of shared memory", name, shared);
    error(cudaErrorMemoryAllocation);
    return;
  }
  gridDim = grid, blockDim = block, body_fn = body, body_ctx = ctx;
  bool agreed = true;
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        blockIdx = uint3{x, y, z};
        memset(shared_block, 0xFF, shared);
        if (!run_block((unsigned)threads) && agreed) {
          report("%s: block (%u, %u, %u): some threads ended while others waited at __syncthreads()", name, x, y, z);
          agreed = false;
        }
      }
  free(shared_block);
  shared_block = nullptr;
  if (!agreed)
    kernel_fault(cudaErrorLaunchFailure);
}

void enqueue(std::function<void()> op) { queued.push_back(std::move(op)); }

void run_queued() {
  run_until([] { return false; });
}

void run_until(const std::function<bool()> &reached) {
  while (!queued.empty() && !reached()) {
    const std::function<void()> op = std::move(queued.front());
    queued.pop_front();
    if (!fault) // after a fault the rest is dropped
      op();
  }
}

bool device_range(const void *p, size_t bytes) { return in_device(p, bytes); }
bool stream_valid(cudaStream_t s) { return stream_ok(s); }
cudaError_t pending_fault() { return fault; }
int current_device() { return device; }

void report(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("cuda emulation: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
}

} // namespace emu

// ---- the runtime -------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int *n) {
  *n = device_count();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d < 0 || d >= device_count())
    return error(cudaErrorInvalidDevice);
  device = d;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int d) {
  if (d < 0 || d >= device_count())
    return error(cudaErrorInvalidDevice);
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin && attr != cudaDevAttrMultiProcessorCount)
    return error(cudaErrorInvalidValue);
  *value = attr == cudaDevAttrMultiProcessorCount ? kSMs : kSharedOptin;
  return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v) {
  *v = 13000;
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *v) {
  *v = 13000;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) {
  *s = reinterpret_cast<cudaStream_t>(new char);
  streams.insert(*s);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
  if (!streams.erase(s))
    return error(cudaErrorInvalidResourceHandle);
  delete reinterpret_cast<char *>(s);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  if (!stream_ok(s))
    return error(cudaErrorInvalidResourceHandle);
  emu::run_queued();
  return fault;
}

namespace {

// A new allocation of bytes in m (device or pinned memory), align-byte
// aligned, in *p.
cudaError_t allocate(std::map<uintptr_t, size_t> &m, void **p, size_t bytes, size_t align) {
  *p = nullptr;
  if (fault)
    return fault;
  const bool dev = &m == &allocations;
  if (dev && bytes > device_memory() - device_used)
    return error(cudaErrorMemoryAllocation);
  void *a = aligned_alloc(align, (bytes / align + 1) * align);
  if (!a)
    return error(cudaErrorMemoryAllocation);
  memset(a, 0xFF, bytes); // NaN floats: what is read before it is written shows
  m[(uintptr_t)a] = bytes;
  device_used += dev ? bytes : 0;
  *p = a;
  return cudaSuccess;
}

// Frees p, the start of an allocation in m (what names such an allocation
// in the refusal), once the stream has run.
cudaError_t release(std::map<uintptr_t, size_t> &m, void *p, const char *call, const char *what, cudaError_t refusal) {
  if (!p)
    return cudaSuccess;
  emu::run_queued(); // as CUDA's, which waits for the device's work first
  auto it = m.find((uintptr_t)p);
  if (it == m.end()) {
    report("%s: %p is not the start of %s", call, p, what);
    return error(refusal);
  }
  device_used -= &m == &allocations ? it->second : 0;
  m.erase(it);
  free(p);
  return fault;
}

} // namespace

cudaError_t cudaMalloc(void **p, size_t bytes) {
  return allocate(allocations, p, bytes, 256); // as a GPU's allocations are
}

cudaError_t cudaFree(void *p) {
  return release(allocations, p, "cudaFree", "a device allocation", cudaErrorInvalidDevicePointer);
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  if (fault)
    return fault;
  *free_bytes = device_memory() - device_used, *total_bytes = device_memory();
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void **p, size_t bytes, unsigned flags) {
  if (flags != cudaHostAllocDefault) {
    *p = nullptr;
    return error(cudaErrorInvalidValue);
  }
  return allocate(pinned, p, bytes, 4096); // page-locked memory is whole pages
}

cudaError_t cudaFreeHost(void *p) {
  return release(pinned, p, "cudaFreeHost", "memory cudaHostAlloc gave", cudaErrorInvalidValue);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags) {
  if (flags & ~cudaEventDisableTiming)
    return error(cudaErrorInvalidValue);
  *e = new emu_event{++last_event_id, 0, 0, !(flags & cudaEventDisableTiming), 0};
  events[(*e)->id] = *e;
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t e) {
  if (!e || !events.erase(e->id))
    return error(cudaErrorInvalidResourceHandle);
  delete e; // a record still queued finds no event by its id, and does nothing
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (!e || !events.count(e->id) || !stream_ok(s))
    return error(cudaErrorInvalidResourceHandle);
  if (fault)
    return fault;
  emu::enqueue([id = e->id, n = ++e->recorded] {
    const auto it = events.find(id);
    if (it != events.end())
      it->second->reached = n, it->second->at_ns = (int64_t)std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                       std::chrono::steady_clock::now().time_since_epoch())
                                                       .count();
  });
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t e) {
  if (!e || !events.count(e->id))
    return error(cudaErrorInvalidResourceHandle);
  if (fault)
    return fault;
  // not an error, but kept as the last one, as the runtime has been seen to keep it
  return e->reached == e->recorded ? cudaSuccess : error(cudaErrorNotReady);
}

cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e || !events.count(e->id))
    return error(cudaErrorInvalidResourceHandle);
  emu::run_until([e] { return e->reached == e->recorded; }); // up to the event, no further
  return fault;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
  for (cudaEvent_t e : {start, end})
    if (!e || !events.count(e->id) || !e->timing || !e->recorded)
      return error(cudaErrorInvalidResourceHandle);
  if (fault)
    return fault;
  if (start->reached != start->recorded || end->reached != end->recorded)
    return error(cudaErrorNotReady);
  *ms = (float)((double)(end->at_ns - start->at_ns) * 1e-6);
  return cudaSuccess;
}

namespace {

// A checked copy of height rows of width bytes, run when CUDA would run it:
// into pageable host memory and between host buffers at once, after what
// the stream holds (the call returns when the copy is done); from pageable
// host memory queued with its source taken now (CUDA stages it); everything
// else (device to device, from or into pinned memory) queued as it is.
cudaError_t copy(const char *call, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                 size_t height, cudaMemcpyKind kind, cudaStream_t s) {
  const size_t dst_bytes = height ? dpitch * (height - 1) + width : 0,
               src_bytes = height ? spitch * (height - 1) + width : 0;
  const cudaError_t e = copy_sides(call, dst, dst_bytes, src, src_bytes, kind, s);
  if (e != cudaSuccess || !width || !height)
    return e;
  auto rows = [=](void *to, size_t to_pitch, const void *from, size_t from_pitch) {
    for (size_t r = 0; r < height; r++)
      memmove((char *)to + r * to_pitch, (const char *)from + r * from_pitch, width);
  };
  const bool to_host = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost;
  const bool from_host = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost;
  if (to_host && (kind == cudaMemcpyHostToHost || !in_pinned(dst, dst_bytes))) {
    emu::run_queued();
    if (fault)
      return fault;
    rows(dst, dpitch, src, spitch);
  } else if (from_host && !in_pinned(src, src_bytes)) {
    std::vector<char> staged(width * height);
    rows(staged.data(), width, src, spitch);
    emu::enqueue([=, staged = std::move(staged)] { rows(dst, dpitch, staged.data(), width); });
  } else {
    emu::enqueue([=] { rows(dst, dpitch, src, spitch); });
  }
  return cudaSuccess;
}

} // namespace

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  return copy("cudaMemcpyAsync", dst, bytes, src, bytes, bytes, 1, kind, s);
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s) {
  if (width > dpitch || width > spitch) {
    report("cudaMemcpy2DAsync: width %zu over a pitch (%zu, %zu)", width, dpitch, spitch);
    return error(cudaErrorInvalidValue);
  }
  return copy("cudaMemcpy2DAsync", dst, dpitch, src, spitch, width, height, kind, s);
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s) {
  if (fault)
    return fault;
  if (!stream_ok(s)) {
    report("cudaMemsetAsync: stream %p was not created or is destroyed", (void *)s);
    return error(cudaErrorInvalidResourceHandle);
  }
  if (!in_device(dst, bytes)) {
    report("cudaMemsetAsync: %p is not %zu bytes of device memory", dst, bytes);
    return error(cudaErrorInvalidValue);
  }
  emu::enqueue([=] { memset(dst, value, bytes); });
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void *kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kSharedOptin) {
    report("cudaFuncSetAttribute: %d bytes of dynamic shared memory asked for, the device allows %d", value,
           kSharedOptin);
    return error(cudaErrorInvalidValue);
  }
  shared_allowed[kernel] = value;
  return cudaSuccess;
}

cudaError_t cudaDeviceReset() {
  queued.clear(); // the device's work is dropped with its memory
  for (const auto &a : allocations)
    free((void *)a.first);
  allocations.clear();
  device_used = 0;
  for (const auto &a : pinned)
    free((void *)a.first);
  pinned.clear();
  for (const auto &ev : events)
    delete ev.second;
  events.clear();
  for (cudaStream_t st : streams)
    delete reinterpret_cast<char *>(st);
  streams.clear();
  for (cublasHandle_t h : handles)
    delete h;
  handles.clear();
  shared_allowed.clear();
  fault = last_error = cudaSuccess;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = fault;
  return e;
}

const char *cudaGetErrorString(cudaError_t e) {
  switch (e) {
  case cudaSuccess: return "no error";
  case cudaErrorInvalidValue: return "invalid argument";
  case cudaErrorMemoryAllocation: return "out of memory";
  case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  case cudaErrorInvalidDevicePointer: return "invalid device pointer";
  case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
  case cudaErrorNoDevice: return "no CUDA-capable device is detected";
  case cudaErrorInvalidDevice: return "invalid device ordinal";
  case cudaErrorInvalidResourceHandle: return "invalid resource handle";
  case cudaErrorNotReady: return "device not ready";
  case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
  case cudaErrorMisalignedAddress: return "misaligned address";
  case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

// ---- cuBLAS ------------------------------------------------------------------------------

cublasStatus_t cublasCreate(cublasHandle_t *h) {
  *h = new emu_blas{nullptr, CUBLAS_DEFAULT_MATH};
  handles.insert(*h);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (!handles.erase(h))
    return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!handles.count(h))
    return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!stream_ok(s))
    return CUBLAS_STATUS_INVALID_VALUE;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode) {
  if (!handles.count(h))
    return CUBLAS_STATUS_NOT_INITIALIZED;
  h->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char *cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
  case CUBLAS_STATUS_SUCCESS: return "the operation completed successfully";
  case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
  case CUBLAS_STATUS_INVALID_VALUE: return "an unsupported value or parameter was passed to the function";
  case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
  case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
  }
  return "unknown error";
}

namespace {

// op(X), rows x cols as the product takes it, stored column-major with
// leading dimension ld: the leading dimension as cuBLAS checks it (against
// the stored rows), then, with reach, whether the operand lies in device
// memory as far as the product reaches.
cublasStatus_t operand_ld(const char *call, const char *name, cublasOperation_t op, int rows, int cols, int ld) {
  const int stored_rows = op == CUBLAS_OP_N ? rows : cols;
  if (ld >= (stored_rows > 1 ? stored_rows : 1))
    return CUBLAS_STATUS_SUCCESS;
  report("%s: leading dimension of %s %d < its %d stored rows", call, name, ld, stored_rows);
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t operand_reach(const char *call, const char *name, cublasOperation_t op, int rows, int cols,
                             const void *p, int ld, size_t elem) {
  const int stored_rows = op == CUBLAS_OP_N ? rows : cols, stored_cols = op == CUBLAS_OP_N ? cols : rows;
  if (!rows || !cols)
    return CUBLAS_STATUS_SUCCESS;
  const size_t extent = ((size_t)ld * (stored_cols - 1) + stored_rows) * elem;
  if (in_device(p, extent))
    return CUBLAS_STATUS_SUCCESS;
  report("%s: %s (%d x %d stored, ld %d) is not %zu bytes of device memory at %p", call, name, stored_rows,
         stored_cols, ld, extent, p);
  kernel_fault(cudaErrorIllegalAddress);
  return CUBLAS_STATUS_EXECUTION_FAILED;
}

// C = alpha op(A) op(B) + beta C on fp32 operands (the checks made).
void sgemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float *A, int lda,
           const float *B, int ldb, float beta, float *C, int ldc) {
  if (beta == 0.0f) // cuBLAS does not read C then: NaN there must not come through
    for (int j = 0; j < n; j++)
      memset(C + (size_t)j * ldc, 0, (size_t)m * sizeof *C);
  cblas_sgemm(CblasColMajor, ta == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
              tb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// The checks common to both products; SUCCESS when the product is to run.
cublasStatus_t gemm_args(const char *call, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                         int k, const void *alpha, const void *A, int lda, const void *B, int ldb, const void *beta,
                         const void *C, int ldc, size_t ab_elem) {
  if (!handles.count(h))
    return CUBLAS_STATUS_NOT_INITIALIZED;
  if (fault)
    return CUBLAS_STATUS_EXECUTION_FAILED;
  if ((ta != CUBLAS_OP_N && ta != CUBLAS_OP_T) || (tb != CUBLAS_OP_N && tb != CUBLAS_OP_T) || m < 0 || n < 0 ||
      k < 0) {
    report("%s: m %d n %d k %d or an operation out of range", call, m, n, k);
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  cublasStatus_t s; // the arguments first, as cuBLAS checks them, and only then what they reach
  if ((s = operand_ld(call, "A", ta, m, k, lda)) != CUBLAS_STATUS_SUCCESS ||
      (s = operand_ld(call, "B", tb, k, n, ldb)) != CUBLAS_STATUS_SUCCESS ||
      (s = operand_ld(call, "C", CUBLAS_OP_N, m, n, ldc)) != CUBLAS_STATUS_SUCCESS)
    return s;
  if (is_device(alpha) || is_device(beta)) { // the default pointer mode: alpha and beta on the host
    report("%s: alpha or beta in device memory under the host pointer mode", call);
    kernel_fault(cudaErrorIllegalAddress);
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  if ((s = operand_reach(call, "A", ta, m, k, A, lda, ab_elem)) != CUBLAS_STATUS_SUCCESS ||
      (s = operand_reach(call, "B", tb, k, n, B, ldb, ab_elem)) != CUBLAS_STATUS_SUCCESS ||
      (s = operand_reach(call, "C", CUBLAS_OP_N, m, n, C, ldc, sizeof(float))) != CUBLAS_STATUS_SUCCESS)
    return s;
  return CUBLAS_STATUS_SUCCESS;
}

// An operand's elements as fp32 (bf16 widens exactly), over its whole extent.
std::vector<float> widened(cublasOperation_t op, int rows, int cols, const void *p, int ld) {
  const int stored_rows = op == CUBLAS_OP_N ? rows : cols, stored_cols = op == CUBLAS_OP_N ? cols : rows;
  const size_t extent = rows && cols ? (size_t)ld * (stored_cols - 1) + stored_rows : 0;
  std::vector<float> out(extent);
  const __nv_bfloat16 *b = static_cast<const __nv_bfloat16 *>(p);
  for (size_t i = 0; i < extent; i++)
    out[i] = __bfloat162float(b[i]);
  return out;
}

} // namespace

cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc) {
  const cublasStatus_t s =
      gemm_args("cublasSgemm", h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, sizeof(float));
  if (s != CUBLAS_STATUS_SUCCESS || !m || !n)
    return s;
  emu::enqueue([=, a = *alpha, b = *beta] { sgemm(ta, tb, m, n, k, a, A, lda, B, ldb, b, C, ldc); });
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void *alpha, const void *A, cudaDataType Atype, int lda, const void *B,
                            cudaDataType Btype, int ldb, const void *beta, void *C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  // the combinations palign asks for: bf16 or fp32 inputs alike, fp32 out, fp32 accumulation
  if (Atype != Btype || (Atype != CUDA_R_16BF && Atype != CUDA_R_32F) || Ctype != CUDA_R_32F ||
      compute != CUBLAS_COMPUTE_32F || algo != CUBLAS_GEMM_DEFAULT) {
    report("cublasGemmEx: types A %d B %d C %d, compute %d: not a combination palign uses", Atype, Btype, Ctype,
           compute);
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  const size_t elem = Atype == CUDA_R_16BF ? sizeof(__nv_bfloat16) : sizeof(float);
  const cublasStatus_t s = gemm_args("cublasGemmEx", h, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, elem);
  if (s != CUBLAS_STATUS_SUCCESS || !m || !n)
    return s;
  // alpha and beta are read now (the host pointer mode), the operands when the stream runs
  const float a = *static_cast<const float *>(alpha), b = *static_cast<const float *>(beta);
  float *c = static_cast<float *>(C);
  emu::enqueue([=] {
    if (Atype == CUDA_R_32F) {
      sgemm(ta, tb, m, n, k, a, static_cast<const float *>(A), lda, static_cast<const float *>(B), ldb, b, c, ldc);
    } else {
      const std::vector<float> a32 = widened(ta, m, k, A, lda), b32 = widened(tb, k, n, B, ldb);
      sgemm(ta, tb, m, n, k, a, a32.data(), lda, b32.data(), ldb, b, c, ldc);
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
