#!/usr/bin/env bash
# scripts/gpu-check.sh OUTDIR: on a machine with an NVIDIA GPU, builds palign
# with the CUDA backend (build-gpu/, -DPALIGN_CUDA=ON), runs the gpu tests
# (every CUDA operation against the CPU one) and the GPU benchmark
# (bench/bench_cuda.c: the card's bf16 GEMM peak by cuBLAS, the backend's
# products of a Llama-3-8B layer and its attention on a 1,024-token
# prefill), and writes everything into OUTDIR:
#   build.log, gpu-tests.log, bench.txt, bench.json, nvidia-smi.txt
# Exit 0 when the build, the tests and the benchmark all passed.
#
# Not yet measured here: a whole forward pass, PAS and DPO seconds per subject
# on an 8B-shaped model, which need the forward pass on the device
# (docs/CUDA.md says what is done and what is next).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$OUT"
BUILD=${GPU_BUILD_DIR:-$ROOT/build-gpu}
status=0
{ nvidia-smi || true; } >"$OUT/nvidia-smi.txt" 2>&1
if ! { cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPALIGN_CUDA=ON &&
  cmake --build "$BUILD" -j "$(nproc)" --target test_cuda_ops bench_cuda; } >"$OUT/build.log" 2>&1; then
  echo "gpu-check: the build failed (see $OUT/build.log)" >&2
  tail -20 "$OUT/build.log" >&2
  exit 1
fi
ctest --test-dir "$BUILD" -L gpu --output-on-failure >"$OUT/gpu-tests.log" 2>&1 || status=1
"$BUILD/tests/test_cuda_ops" >>"$OUT/gpu-tests.log" 2>&1 || status=1
"$BUILD/bench/bench_cuda" --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 || status=1
cat "$OUT/gpu-tests.log" | tail -30
cat "$OUT/bench.txt"
exit $status
