// nccl.h: the emulation's (cuda_emu.h, nccl_emu.cc), found before the toolkit's when the
// tests build the CUDA backend (kernels/cuda/*.cu) for the CPU.
#include "cuda_emu.h"
