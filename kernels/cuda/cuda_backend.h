/* cuda_backend.h: backend.h's operations on an NVIDIA GPU (kernels/cuda/).
 *
 * Every pointer an operation takes is device memory from the backend's
 * alloc (upload and download move data across); the operations run on one
 * stream of the device pa_cuda_select chose and return without waiting
 * (but for the profile's harvests, pa_cuda_profile), so a sequence of them
 * runs back to back; upload queues its copy from a ring
 * of pinned memory without waiting either, and download waits for them. Matrix
 * products are cuBLAS SGEMMs with fp32 inputs, fp32 accumulation and no
 * TF32 (the CPU reference's precision), and with bf16 weights cublasGemmEx
 * on bf16 operands (x rounded by a kernel into a buffer the backend keeps)
 * accumulating in fp32 on the tensor cores; the rest are this directory's
 * kernels (the inference attention's products on the tensor cores too, in
 * tf32 with every operand split in two for fp32's accuracy: see
 * pa_cuda_attention_kernel), every training operation included (the
 * training attention in simple kernels: a block per query row and head,
 * and per key row and kv head for dK and dV, without atomics, so the sums
 * are the same every run).
 * As for the CPU, the attention calls' sequence tables (pa_attn_seq,
 * seq_row0, seq_len) are host memory; every tensor is device memory.
 *
 * Status: compiled and linked on every build with a CUDA toolkit
 * (-DPALIGN_CUDA=AUTO|ON); tests/test_cuda_ops.c checks every operation
 * against the CPU backend and skips (exit 77) where no device is present;
 * the same tests run this source on every build against an emulation of
 * the CUDA runtime and cuBLAS (tests/cuda_emu). Not yet run on a GPU
 * (docs/CUDA.md).
 */
#ifndef PALIGN_CUDA_BACKEND_H
#define PALIGN_CUDA_BACKEND_H

#include <stdio.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Devices this process sees (after CUDA_VISIBLE_DEVICES); 0 without a GPU
 * or a driver; -1 when a driver is installed but cannot serve (older than
 * the toolkit palign was built with): pa_cuda_error says so. */
int pa_cuda_devices(void);

/* Uses device `device` (0 .. pa_cuda_devices() - 1) from now on: 0, or -1
 * (pa_cuda_error says why). */
int pa_cuda_select(int device);

/* The backend on the selected device (device 0 if none was selected), or
 * NULL when there is none (pa_cuda_error says why). */
const pa_backend *pa_backend_cuda(void);

/* sizeof(pa_backend) where this library was built: palign loads it only
 * when its own is the same (kernels/backends.c), so that a library built
 * against another backend.h, whose operation table would be read wrong,
 * is an error naming it rather than a crash. */
size_t pa_cuda_backend_bytes(void);

/* The attention kernel to use first: "mma" (the default: the tensor cores
 * on tf32 parts, fp32's precision, head dimensions that are multiples of 8
 * up to 128), "mma_bf16" (the tensor cores on q, k and v rounded to bf16,
 * up to 128: not the CPU's fp32 attention but its attention on the rounded
 * values; for bench_cuda and the tests, docs/CUDA.md), "tiled" (up to 128)
 * or "simple" (any); a head the kernel does not hold takes the next that
 * does. Read from PALIGN_CUDA_ATTENTION when a device is selected (which
 * refuses mma_bf16: a bank or a store made with it would pass for the
 * CPU's). 0, or -1 for another name (pa_cuda_error says so). */
int pa_cuda_attention_kernel(const char *name);

/* How many blocks share a row's keys in the tensor cores' attention (as
 * flash-decoding splits them; docs/CUDA.md): n = 0, the default, lets the
 * backend choose (more than one only where a call would make fewer blocks
 * than the device has SMs, as a decoding step of one sequence does, and
 * its rows have 4 key tiles a share); n >= 1 asks for n (1: never split),
 * at most one a key tile and 32; n < 0 leaves the setting. Returns how
 * many the last attention call used (with a packed prefix, below, both
 * walks' together). Neither this nor
 * pa_cuda_attention_kernel may change between a call's attention_scratch
 * and its attention: the scratch is sized for the setting. */
int pa_cuda_attention_splits(int n);

/* Whether the tensor cores' attention packs the shared prefix (as cascade
 * attention does; docs/CUDA.md): every row sees all of the prefix, so its
 * rows walk it in tiles of 16 consecutive rows whatever their sequences,
 * and each sequence's tiles walk only its own keys, the two merged as
 * split keys are. mode 0, the default: where that at least halves the
 * tiles walking the prefix (a decoding step of many sequences after a
 * shared prompt); 1: wherever there is a prefix; 2: never; another value
 * leaves the setting. Returns 1 when the last attention call packed, else
 * 0. Not to be changed between a call's attention_scratch and its
 * attention, as pa_cuda_attention_splits. */
int pa_cuda_attention_packing(int mode);

/* The times this process has waited for the device: for a download, for
 * status(), for a collective, for a staging chunk the device had not yet
 * read (uploads go through a ring of pinned memory and do not wait
 * otherwise), and for the profile's spans (pa_cuda_profile). Not counted: cudaFree's own wait, where a buffer is
 * released or grown. A forward pass with its buffers grown waits once for each download and once for its status,
 * however many layers it has (tests/test_cuda_forward.c). */
unsigned long pa_cuda_host_waits(void);

/* One row of the device-time profile: an operation (a product with its
 * weight's shape, N x K: "matmul bf16 4096x14336"), its spans (a call
 * each; an upload one for each chunk of the staging ring it goes
 * through), their time on the device, the floating-point operations
 * of the products and the attention (2MNK a product; 4 x heads x head_dim
 * a key a row sees; 0 for the rest), and the bytes its work must move
 * at least: each operand in device memory it reads read once and each it
 * writes written once (a product's x, weights and y, y twice where it is
 * added to; the attention's q, its outputs or its shares (a split or
 * packed walk's), and each key and value its walk sees; a device copy's
 * bytes read and written; 0 for the training attention), whose rate
 * against the memory's says how near a kernel runs to it; but an upload's
 * or a download's bytes once (what crosses the bus), and an all-gather's
 * what it receives (a rate of the link and of the other ranks' skew, not
 * of the memory) (docs/CUDA.md). */
typedef struct {
  char name[48];
  unsigned long spans;
  double ms;
  double flops;
  double bytes;
} pa_cuda_profile_row;

/* Starts (on != 0; the table cleared) or stops timing each operation's
 * work on the device between two events (docs/CUDA.md, "Where the device's
 * time goes"). It costs two event records a span and a wait for every
 * 4,096 spans (counted by pa_cuda_host_waits). Started when the device is
 * selected where PALIGN_CUDA_PROFILE names a file, to which the table is
 * appended at the process's exit ("-": standard error; "%p" in the name:
 * the process's id); selecting another device restarts it. An error of
 * the profile's is an operation's (status() reports it). 0, or -1
 * (pa_cuda_error says why). */
int pa_cuda_profile(int on);

/* The table so far (the host waits for the device's timed work): its rows,
 * in the order first timed, in *rows, and in *idle_ms the device's time
 * between one span's end and the next one's start (the host's own work
 * and its waits between operations). The number of rows, or -1 on an
 * error. */
int pa_cuda_profile_read(const pa_cuda_profile_row **rows, double *idle_ms);

/* Writes the table to f, the longest first, with each row's share, the
 * rate of its floating-point operations and that of its bytes. */
void pa_cuda_profile_write(FILE *f);

/* The last CUDA or cuBLAS error of this process, as text ("" if none). */
const char *pa_cuda_error(void);

#ifdef __cplusplus
}
#endif

#endif
