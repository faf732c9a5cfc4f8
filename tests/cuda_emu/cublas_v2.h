// cublas_v2.h: the emulation's (cuda_emu.h), found before the toolkit's when the tests
// build the CUDA backend (kernels/cuda/*.cu) for the CPU.
#include "cuda_emu.h"
