#!/usr/bin/env bash
# tests/test_cuda_memory_emu.sh BUILD_DIR: --backend cuda when the device's
# memory runs out, on the emulated device (tests/cuda_emu) with its memory
# set by PALIGN_EMU_MEMORY, on a tiny model (1 layer, 32 dimensions):
#   1. `palign eval` of `none` and DPO (one epoch) under device memories
#      from 16 KiB up: each run exits 0 or 1 (no crash, and under
#      AddressSanitizer no leak), and every allocation the device refused is
#      a message naming what it was for, the backend and the device's own
#      account (the bytes asked for, what was free, of how much). Over the
#      sweep the refusals reach the model's placement (the run exits 1),
#      the forward pass's buffers (the method fails, the run goes on) and
#      the trainer's.
#   2. with mpirun: a store holding one subject, then a service run of two
#      subjects on a device too small (4 MiB) for the default batch's
#      activations: it stops with the worker's message, the stored record
#      and its shard unchanged; then on the same device in batches of 16
#      (--batch) it resumes and stores the second.
# Exit 0 when every check passed, 1 otherwise, 77 (skipped) without the
# PAPI data or the emulated module.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$(cd "${1:-$ROOT/build}" && pwd)
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

# a refusal's message: what it was for, the backend, and the device's account
size='[0-9.]+ (bytes|kB|MB|GB)'
refusal="no memory for .+ on the cuda backend \(device 0: $size asked for, $size free of its $size\)"

# 1. eval under each memory, with the methods whose allocations it reaches (a method that runs whole on the
# emulation takes seconds, and under AddressSanitizer a minute or more)
placement=0 forward=0 trainer=0
for run in 16K:none 256K:none 1M:none 4M:none 4M:dpo; do
  mem=${run%:*} log=$S/eval-${run/:/-}.log rc=0
  PALIGN_EMU_MEMORY=$mem "$BUILD/palign" eval --model "$S/m.gguf" --papi "$PAPI" --methods "${run#*:}" \
    --dpo-epochs 1 --subjects 1 --threads 1 --backend cuda >"$log" 2>&1 || rc=$?
  [ $rc -le 1 ] || fail "device memory $mem: exit $rc: $(tail -5 "$log")"
  if grep -E "no memory|AddressSanitizer|LeakSanitizer" "$log" | grep -Evq "$refusal"; then
    fail "device memory $mem: a refusal without the device's account, or a sanitizer's report: $(cat "$log")"
  fi
  if [ $rc -eq 1 ]; then
    grep -Eq "^palign eval: .*$refusal" "$log" || fail "device memory $mem: exit 1 without a refusal: $(cat "$log")"
    placement=$((placement + 1))
  fi
  grep -Eq "^palign eval: subject [0-9]+, method none failed: $refusal" "$log" && forward=$((forward + 1))
  grep -Eq "^palign eval: subject [0-9]+, method dpo failed: trainer: $refusal" "$log" && trainer=$((trainer + 1))
  echo "  device memory $mem, methods ${run#*:}: exit $rc, $(grep -c "no memory" "$log" || true) refusal(s)" \
    "$(grep -Eo "no memory for [^(]+" "$log" | head -2 | tr '\n' ';')"
done
[ $placement -gt 0 ] && [ $forward -gt 0 ] && [ $trainer -gt 0 ] ||
  fail "the sweep did not reach every stage: placement $placement, forward pass $forward, trainer $trainer"

# 2. the service: a store's record kept through a run the device cannot hold (the store's other runs on the
# CPU with the device's bf16 weights, for speed)
if command -v mpirun >/dev/null; then
  # under AddressSanitizer, no leak check for the workers: Open MPI's components leave allocations that the
  # suppressions cannot name (their frames outlive their modules); eval's runs above are checked
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
  (cd "$S/store" && md5sum shards/*) >"$S/before.md5" # the manifest will list the next run too
  ! PALIGN_EMU_MEMORY=4M worker 2 "$S/w2.log" --backend cuda ||
    fail "a service run on a device too small for it passed: $(cat "$S/w2.log")"
  grep -Eq "palign-worker: rank 1 stopped: $refusal" "$S/w2.log" || fail "the worker's refusal: $(cat "$S/w2.log")"
  "$BUILD/palign" query "$S/store" export --format records --out "$S/after.jsonl" >/dev/null 2>&1 || fail "export"
  cmp -s "$S/before.jsonl" "$S/after.jsonl" || fail "the stored record changed"
  (cd "$S/store" && md5sum --quiet -c "$S/before.md5") >/dev/null 2>&1 || fail "the first run's shard changed"
  PALIGN_EMU_MEMORY=4M worker 2 "$S/w3.log" --backend cuda --batch 16 || fail "the resumed run: $(tail -20 "$S/w3.log")"
  grep -q "2 subjects asked for, 1 already stored, 1 to do" "$S/w3.log" || fail "the resumed run: $(head -3 "$S/w3.log")"
  "$BUILD/palign" query "$S/store" export --format records --out "$S/resumed.jsonl" >/dev/null 2>&1 || fail "export"
  [ "$(wc -l <"$S/resumed.jsonl")" = 2 ] || fail "the resumed store: $(wc -l <"$S/resumed.jsonl") records"
  echo "  service: stopped on the device's refusal, the stored record kept; resumed in batches of 16"
else
  echo "  no mpirun: the service's part not run"
fi
echo "test_cuda_memory_emu: passed"
