#!/usr/bin/env bash
# tests/test_cuda_memory_emu.sh BUILD_DIR [eval|service]: --backend cuda
# when the device's memory runs out, on the emulated device (tests/cuda_emu)
# with its memory set by PALIGN_EMU_MEMORY, on a tiny model (1 layer, 32
# dimensions); both parts without the second argument:
#   eval: `palign eval` of `none` and DPO (one epoch) under device memories
#      of 16 KiB to 10,000 KiB, each refusing a stage's allocation first
#      (found by trying memories on this model): the RoPE tables and the
#      weights (the run exits 1), a KV cache, the forward pass's activations
#      and the bf16 products' buffer that the backend grows inside an
#      operation (the method fails, the run goes on and exits 0), the
#      trainer's activations (the same). Every run exits 0 or
#      1 (no crash; in the sanitizer build no leak), and every refusal is a
#      message naming what it was for, the backend and the device's own
#      account (the bytes asked for, what was free, of how much).
#   service (mpirun): a store holding one subject, then a service run of
#      two subjects on a device too small (4 MiB) for the default batch's
#      activations: it stops with the worker's message, the stored record
#      and its shard unchanged; then on the same device in batches of 16
#      (--batch) it resumes and stores the second.
# Exit 0 when every check passed, 1 otherwise, 77 (skipped) without the
# PAPI data, the emulated module or (service) mpirun.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$(cd "${1:-$ROOT/build}" && pwd)
PART=${2:-all}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
MODULE=$BUILD/tests/libpalign_cuda_emu.so
fail() {
  echo "test_cuda_memory_emu: FAIL: $*" >&2
  exit 1
}
skip() {
  echo "test_cuda_memory_emu: skipping: $*"
  exit 77
}
[ -f "$PAPI/Test-set.json" ] || skip "no PAPI data at $PAPI"
[ -f "$MODULE" ] || skip "no emulated CUDA module at $MODULE"

S=$(mktemp -d /tmp/palign-cudamem-XXXXXX)
[ -n "${KEEP:-}" ] && echo "keeping $S"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$S"' EXIT
export PALIGN_CACHE=$S/cache PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_PROFILE= TMPDIR=$S
unset PALIGN_EMU_MEMORY PALIGN_EMU_DEVICES PALIGN_NCCL
mkdir -p "$PALIGN_CACHE"
"$BUILD/palign" mkmodel "$S/m.gguf" --ctx 4096 --layers 1 --dim 32 --heads 2 --kv-heads 1 --ffn 64 --seed 7 \
  >"$S/mkmodel.log" 2>&1 || fail "mkmodel: $(cat "$S/mkmodel.log")"

# a refusal's message: what it was for, the backend, and the device's account; a buffer the backend grows inside
# an operation (its descriptors, the bf16 rounding's) fails the pass with the same account
size='[0-9.]+ (bytes|kB|MB|GB)'
account="\(device 0: $size asked for, $size free of its $size\)"
refusal="no memory for .+ on the cuda backend $account|on the cuda backend: .+: no memory $account"

# 1. eval under each memory, with the methods whose allocations it reaches (a method that runs whole on the
# emulation takes seconds, and under AddressSanitizer a minute or more), and what each refuses first
eval_sweep() {
  local run mem methods want log rc
  for run in "16K none palign eval: no memory for the RoPE tables" \
    "256K none palign eval: [^ ]*/m.gguf: no memory for [0-9.]+ MB of bf16 weights" \
    "1M none method none failed: no memory for a KV cache" \
    "4M none method none failed: no memory for the activations" \
    "4M dpo method dpo failed: trainer: no memory for [0-9.]+ MB of activations" \
    "10000K none method none failed: the forward pass on the cuda backend: matmul_bf16: no memory"; do
    read -r mem methods want <<<"$run"
    log=$S/eval-$mem-$methods.log rc=0
    PALIGN_EMU_MEMORY=$mem "$BUILD/palign" eval --model "$S/m.gguf" --papi "$PAPI" --methods "$methods" \
      --dpo-epochs 1 --subjects 1 --threads 1 --backend cuda >"$log" 2>&1 || rc=$?
    [ $rc -le 1 ] || fail "device memory $mem: exit $rc: $(tail -5 "$log")"
    grep -E "no memory|out of memory|AddressSanitizer|LeakSanitizer" "$log" | grep -Ev "$refusal" >"$S/bad" || true
    [ ! -s "$S/bad" ] || fail "device memory $mem: a refusal without the device's account, or a sanitizer's: $(cat "$S/bad")"
    grep -E "$want" "$log" | grep -E "$refusal" >/dev/null || fail "device memory $mem: not '$want': $(cat "$log")"
    # the model not placed ends the run; a method's buffers fail the method, and the run goes on
    [ $rc -eq $([[ $want == "palign eval: "* ]] && echo 1 || echo 0) ] || fail "device memory $mem: exit $rc"
    echo "  device memory $mem, $methods: exit $rc: $(grep -E "$want" "$log" | head -1)"
  done
}

# 2. the service: a store's record kept through a run the device cannot hold (the store's other runs on the
# CPU with the device's bf16 weights, for speed)
service() {
  command -v mpirun >/dev/null || skip "no mpirun"
  # under AddressSanitizer, no leak check for the workers: Open MPI's components leave allocations that the
  # suppressions cannot name (their frames outlive their modules)
  export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
  worker() {
    local subjects=$1 log=$2
    shift 2
    mpirun --allow-run-as-root --oversubscribe -np 2 -x PALIGN_CUDA_MODULE -x PALIGN_CACHE -x PALIGN_EMU_MEMORY \
      -x ASAN_OPTIONS -x TMPDIR "$BUILD/palign-worker" --model "$S/m.gguf" --papi "$PAPI" \
      --store "$S/store" --subjects "$subjects" --threads 1 --methods none "$@" >"$log" 2>&1
  }
  worker 1 "$S/w1.log" --backend cpu --weights bf16 || fail "the first service run: $(tail -20 "$S/w1.log")"
  "$BUILD/palign" query "$S/store" export --format records --out "$S/before.jsonl" >/dev/null 2>&1 || fail "export"
  (cd "$S/store" && md5sum shards/*) >"$S/before.md5" || fail "no shard after the first run: $(ls -R "$S/store")"
  ! PALIGN_EMU_MEMORY=4M worker 2 "$S/w2.log" --backend cuda ||
    fail "a service run on a device too small for it passed: $(cat "$S/w2.log")"
  grep -Eq "palign-worker: rank 1 stopped: $refusal" "$S/w2.log" || fail "the worker's refusal: $(cat "$S/w2.log")"
  # the run's record says what stopped it, the worker's own message
  "$BUILD/palign" query "$S/store" summary 2>/dev/null | grep -Eq "the last run stopped with an error: rank 1: $refusal" ||
    fail "the run's record: $("$BUILD/palign" query "$S/store" summary 2>&1 | head -12)"
  "$BUILD/palign" query "$S/store" export --format records --out "$S/after.jsonl" >/dev/null 2>&1 || fail "export"
  cmp -s "$S/before.jsonl" "$S/after.jsonl" || fail "the stored record changed"
  (cd "$S/store" && md5sum --quiet -c "$S/before.md5") >/dev/null 2>&1 || fail "the first run's shard changed"
  PALIGN_EMU_MEMORY=4M worker 2 "$S/w3.log" --backend cuda --batch 16 || fail "the resumed run: $(tail -20 "$S/w3.log")"
  grep -q "2 subjects asked for, 1 already stored, 1 to do" "$S/w3.log" || fail "the resumed run: $(head -3 "$S/w3.log")"
  "$BUILD/palign" query "$S/store" export --format records --out "$S/resumed.jsonl" >/dev/null 2>&1 || fail "export"
  [ "$(wc -l <"$S/resumed.jsonl")" = 2 ] || fail "the resumed store: $(wc -l <"$S/resumed.jsonl") records"
  # each record keeps what it was made with
  [ "$(python3 -c 'import json, sys; print(sorted((r["backend"], r["batch"]) for r in map(json.loads, open(sys.argv[1]))))' \
    "$S/resumed.jsonl")" = "[('cpu', 64), ('cuda', 16)]" ] || fail "the records' backend and batch: $(cat "$S/resumed.jsonl")"
  echo "  service: stopped on the device's refusal, the stored record kept; resumed in batches of 16"
}

case $PART in
eval) eval_sweep ;;
service) service ;;
*) eval_sweep && service ;;
esac
echo "test_cuda_memory_emu: passed"
