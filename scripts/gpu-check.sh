#!/usr/bin/env bash
# scripts/gpu-check.sh OUTDIR: on a machine with an NVIDIA GPU, builds palign
# with the CUDA backend (build-gpu/, -DPALIGN_CUDA=ON), runs the gpu tests
# (every CUDA operation, the forward pass and PAS against the CPU) and the
# benchmarks, and writes everything into OUTDIR:
#   build.log, gpu-tests.log, nvidia-smi.txt
#   bench.txt, bench.json   bench/bench_cuda: the card's bf16 GEMM peak by
#                           cuBLAS, the backend's products of a Llama-3-8B
#                           layer and its attention on a 1,024-token prefill
#   forward-8b4.txt         bench/bench_forward --backend cuda --quick on a
#                           generated model of Llama-3-8B's layer shape with 4
#                           of its 32 layers (random bf16 weights): prefill
#                           and decode tokens/s, steering's cost
#   pas-8b4.txt, .json      palign eval --methods pas_only --backend cuda on
#                           one PAPI subject with that model: PAS seconds per
#                           subject for 4 layers (x 8 for the whole depth)
# Exit 0 when the build, the tests and the benchmarks all passed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$OUT"
BUILD=${GPU_BUILD_DIR:-$ROOT/build-gpu}
status=0
{ nvidia-smi || true; } >"$OUT/nvidia-smi.txt" 2>&1
if ! { cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPALIGN_CUDA=ON &&
  cmake --build "$BUILD" -j "$(nproc)" --target palign test_cuda_ops test_cuda_forward test_cuda_pas bench_cuda \
    bench_forward; } >"$OUT/build.log" 2>&1; then
  echo "gpu-check: the build failed (see $OUT/build.log)" >&2
  tail -20 "$OUT/build.log" >&2
  exit 1
fi
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
ctest --test-dir "$BUILD" -L gpu --output-on-failure >"$OUT/gpu-tests.log" 2>&1 || status=1
for t in test_cuda_ops test_cuda_forward test_cuda_pas; do
  "$BUILD/tests/$t" >>"$OUT/gpu-tests.log" 2>&1 || status=1
done
"$BUILD/bench/bench_cuda" --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 || status=1
M=${TMPDIR:-/tmp}/palign-8b4.gguf
if "$BUILD/palign" mkmodel "$M" --force --layers 4 --dim 4096 --heads 32 --kv-heads 8 --ffn 14336 --dtype bf16 \
  --ctx 4096 >"$OUT/mkmodel-8b4.log" 2>&1; then
  "$BUILD/bench/bench_forward" "$M" "$PAPI" --quick --backend cuda >"$OUT/forward-8b4.txt" 2>&1 || status=1
  { /usr/bin/time -v "$BUILD/palign" eval --model "$M" --papi "$PAPI" --methods pas_only --subjects 1 \
    --backend cuda --json "$OUT/pas-8b4.json"; } >"$OUT/pas-8b4.txt" 2>&1 || status=1
else
  status=1
fi
rm -f "$M"
tail -30 "$OUT/gpu-tests.log"
cat "$OUT/bench.txt" "$OUT/forward-8b4.txt"
grep -E "Time per|Elapsed|Maximum resident" "$OUT/pas-8b4.txt" || true
exit $status
