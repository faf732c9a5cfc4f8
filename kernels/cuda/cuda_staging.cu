// cuda_staging.cu: the copies from the host to the device (upload).
//
// Every upload goes through a ring of pinned host memory: the source is
// copied into the ring and the copy to the device queued from there, so
// the caller may reuse the source at once and the host does not wait for
// the stream (a forward pass's tokens and each layer's attention tables
// are queued behind the work before them). The ring is kStageChunks chunks;
// leaving a chunk records an event (after all the work queued so far), and
// a chunk is written again only after its event: a wait only when the
// device is kStageChunks - 1 chunks' turns behind. An upload larger than a
// chunk goes through chunk by chunk. Where pinned memory cannot be had,
// uploads are pageable copies, each waited for. The tests' build makes the
// chunks small (PA_STAGE_CHUNK), so that a model's weights turn the ring
// onto chunks still being read.
#include "cuda_internal.cuh"

#include <string.h>

namespace palign_cuda {
namespace {

#ifdef PA_STAGE_CHUNK
constexpr size_t kStageChunk = PA_STAGE_CHUNK;
#else
constexpr size_t kStageChunk = 4 << 20;
#endif
constexpr int kStageChunks = 4;
constexpr size_t kStageAlign = 256;   // each copy's start in a chunk
char *stage;                          // kStageChunks chunks of kStageChunk bytes, pinned; null without
cudaEvent_t stage_read[kStageChunks]; // recorded when the ring leaves the chunk: its copies are queued before it
int stage_at;                         // the chunk being filled
size_t stage_used;                    // its bytes taken

// Moves the ring to its next chunk once the copies queued from it the last
// time round have read it (waiting for them if need be); false, the ring
// where it was, on an error.
bool stage_turn(const char *what) {
  const int next = (stage_at + 1) % kStageChunks;
  if (!check(cudaEventRecord(stage_read[stage_at], stream), what))
    return false;
  const cudaError_t e = cudaEventQuery(stage_read[next]);
  if (e == cudaErrorNotReady) {
    // no error, but the runtime may keep it as the last one, which the next launch's check would take for its own
    (void)cudaGetLastError();
    host_waits++;
    if (!check(cudaEventSynchronize(stage_read[next]), what))
      return false;
  } else if (!check(e, what)) {
    return false;
  }
  stage_at = next, stage_used = 0;
  return true;
}

} // namespace

bool stage_open() {
  if (cudaHostAlloc((void **)&stage, kStageChunks * kStageChunk, cudaHostAllocDefault) != cudaSuccess) {
    cudaGetLastError();
    stage = nullptr;
    return false;
  }
  for (int c = 0; c < kStageChunks; c++)
    if (cudaEventCreateWithFlags(&stage_read[c], cudaEventDisableTiming) != cudaSuccess) {
      cudaGetLastError();
      while (c-- > 0)
        cudaEventDestroy(stage_read[c]);
      cudaFreeHost(stage);
      stage = nullptr;
      return false;
    }
  stage_at = 0, stage_used = 0;
  return true;
}

void stage_close() {
  if (!stage)
    return;
  cudaStreamSynchronize(stream); // the copies still reading it
  for (int c = 0; c < kStageChunks; c++)
    cudaEventDestroy(stage_read[c]);
  cudaFreeHost(stage);
  stage = nullptr;
}

void stage_copy(void *dst, const void *src, size_t bytes, const char *what) {
  if (!stage) {
    {
      const timed t(what, 0.0, (double)bytes);
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), what);
    }
    wait_stream(what); // the source may be reused on return
    return;
  }
  for (size_t off = 0; off < bytes;) {
    if (stage_used == kStageChunk && !stage_turn(what))
      return;
    const size_t n = bytes - off < kStageChunk - stage_used ? bytes - off : kStageChunk - stage_used;
    char *at = stage + (size_t)stage_at * kStageChunk + stage_used;
    memcpy(at, (const char *)src + off, n);
    const timed t(what, 0.0, (double)n); // the copy's time on the device, not the host's into the ring
    if (!check(cudaMemcpyAsync((char *)dst + off, at, n, cudaMemcpyHostToDevice, stream), what))
      return;
    off += n;
    stage_used += (n + kStageAlign - 1) / kStageAlign * kStageAlign;
    stage_used = stage_used < kStageChunk ? stage_used : kStageChunk;
  }
}

} // namespace palign_cuda
