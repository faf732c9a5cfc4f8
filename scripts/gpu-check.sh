#!/usr/bin/env bash
# scripts/gpu-check.sh OUTDIR: on a machine with an NVIDIA GPU, builds palign
# with the CUDA backend (build-gpu/, -DPALIGN_CUDA=ON), runs the gpu tests
# (every CUDA operation, the forward pass, PAS and the trainer against the
# CPU) and the benchmarks, and writes everything into OUTDIR:
#   build.log, gpu-tests.log, nvidia-smi.txt
#   bench.txt, bench.json   bench/bench_cuda: the card's bf16 GEMM peak by
#                           cuBLAS, the backend's products of a Llama-3-8B
#                           layer (fp32 and bf16 weights) and its attention on
#                           a 1,024-token prefill
#   forward-8b4.txt,        bench/bench_forward --backend cuda --quick on a
#   forward-8b4-fp32.txt    generated model of Llama-3-8B's layer shape with 4
#                           of its 32 layers (random weights), with bf16
#                           weights (the default on a GPU) and with fp32:
#                           prefill and decode tokens/s, steering's cost
#   pas-8b4.txt, .json      palign eval --methods pas_only --backend cuda on
#                           one PAPI subject with that model (bf16 weights):
#                           PAS seconds per subject for 4 layers (x 8 for the
#                           whole depth)
#   dpo-8b4.txt, .json      palign eval --methods dpo --backend cuda on the
#                           same subject and model: DPO seconds per subject
#                           for 4 layers (stopped after 240 s)
#   nccl-1.log, nccl-0.log, the service (mpirun, one worker on the GPU) with
#   nccl-compare.txt        the activation bank gathered over NCCL
#                           (PALIGN_NCCL=1) and over MPI (PALIGN_NCCL=0):
#                           scripts/compare-stores.py finds the same records
# Exit 0 when the build, the tests and the benchmarks all passed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: scripts/gpu-check.sh OUTDIR}
mkdir -p "$OUT"
BUILD=${GPU_BUILD_DIR:-$ROOT/build-gpu}
status=0
{ nvidia-smi || true; } >"$OUT/nvidia-smi.txt" 2>&1
if ! { cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPALIGN_CUDA=ON &&
  cmake --build "$BUILD" -j "$(nproc)" --target palign palign-worker test_cuda_ops test_cuda_forward test_cuda_pas test_cuda_train bench_cuda \
    bench_forward; } >"$OUT/build.log" 2>&1; then
  echo "gpu-check: the build failed (see $OUT/build.log)" >&2
  tail -20 "$OUT/build.log" >&2
  exit 1
fi
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
for t in test_cuda_ops test_cuda_forward test_cuda_pas test_cuda_train; do
  "$BUILD/tests/$t" >>"$OUT/gpu-tests.log" 2>&1 || status=1
done
"$BUILD/bench/bench_cuda" --json "$OUT/bench.json" >"$OUT/bench.txt" 2>&1 || status=1
M=${TMPDIR:-/tmp}/palign-8b4.gguf
if "$BUILD/palign" mkmodel "$M" --force --layers 4 --dim 4096 --heads 32 --kv-heads 8 --ffn 14336 --dtype bf16 \
  --ctx 4096 >"$OUT/mkmodel-8b4.log" 2>&1; then
  "$BUILD/bench/bench_forward" "$M" "$PAPI" --quick --backend cuda >"$OUT/forward-8b4.txt" 2>&1 || status=1
  "$BUILD/bench/bench_forward" "$M" "$PAPI" --quick --backend cuda --weights fp32 >"$OUT/forward-8b4-fp32.txt" 2>&1 ||
    status=1
  { /usr/bin/time -v "$BUILD/palign" eval --model "$M" --papi "$PAPI" --methods pas_only --subjects 1 \
    --backend cuda --json "$OUT/pas-8b4.json"; } >"$OUT/pas-8b4.txt" 2>&1 || status=1
  { timeout 240 /usr/bin/time -v "$BUILD/palign" eval --model "$M" --papi "$PAPI" --methods dpo --subjects 1 \
    --backend cuda --json "$OUT/dpo-8b4.json"; } >"$OUT/dpo-8b4.txt" 2>&1 || status=1
else
  status=1
fi
rm -f "$M"
if command -v mpirun >/dev/null; then
  T=${TMPDIR:-/tmp}/palign-nccl
  rm -rf "$T" && mkdir -p "$T"
  "$BUILD/palign" mkmodel "$T/m.gguf" --layers 2 --seed 5 >"$OUT/nccl-mkmodel.log" 2>&1 || status=1
  for mode in 1 0; do
    PALIGN_NCCL=$mode mpirun --allow-run-as-root --oversubscribe -np 2 "$BUILD/palign-worker" --model "$T/m.gguf" \
      --papi "$PAPI" --store "$T/s$mode" --methods none,pas_only --subjects 2 --backend cuda \
      >"$OUT/nccl-$mode.log" 2>&1 || status=1
  done
  grep -q "gathered over NCCL" "$OUT/nccl-1.log" || { echo "gpu-check: the bank did not go over NCCL" >&2; status=1; }
  python3 "$ROOT/scripts/compare-stores.py" "$T/s1" "$T/s0" --palign "$BUILD/palign" >"$OUT/nccl-compare.txt" 2>&1 ||
    status=1
  rm -rf "$T"
else
  echo "no mpirun: the NCCL check did not run" >"$OUT/nccl-compare.txt"
fi
tail -30 "$OUT/gpu-tests.log"
cat "$OUT/bench.txt" "$OUT/forward-8b4.txt" "$OUT/forward-8b4-fp32.txt"
grep -E "Time per|Elapsed|Maximum resident" "$OUT/pas-8b4.txt" "$OUT/dpo-8b4.txt" || true
exit $status
