// cuda_ops_emu.cc: the CUDA backend's source, kernels/cuda/cuda_ops.cu, built
// as C++ against the emulation in this directory (cuda_emu.h), whose
// cuda_runtime.h, cublas_v2.h and cuda_bf16.h come first on the include path.
#include "cuda_ops.cu"
