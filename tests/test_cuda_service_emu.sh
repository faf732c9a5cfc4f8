#!/usr/bin/env bash
# tests/test_cuda_service_emu.sh BUILD_DIR: the fitting service with
# --backend cuda, end to end, where no GPU is: palign-worker loads the CUDA
# backend built against the emulation (tests/cuda_emu, PALIGN_CUDA_MODULE),
# so the backend's own source runs under everything a GPU run goes through
# (device selection per worker, --weights auto on a GPU, the bank on the
# device and its exchange, PAS's grid, the store's records). On a tiny
# random model and one PAPI subject, methods none and pas_only:
#   1. mpirun -np 2 palign-worker --backend cuda with PALIGN_NCCL=1 finishes;
#      the log says why the bank went over MPI (the emulation has no NCCL);
#   2. the store's settings say weights bf16 (auto on a GPU), the record
#      backend cuda;
#   3. its answers are the CPU's with bf16 weights (palign eval --backend
#      cpu --weights bf16): at least 99% of them the same (the sums' order
#      differs, so a near tie may go either way), every option probability
#      within 1e-3, and PAS's chosen alphas the same.
#   4. PALIGN_CUDA_ATTENTION naming no kernel is an error for --backend auto
#      too (a device that cannot be used as asked is no machine without one),
#      naming the variable; a kernel it names runs, and so does an empty one.
# Exit 0 when every check passed, 1 otherwise, 77 (skipped) without mpirun,
# the PAPI data or the emulated module.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$(cd "${1:-$ROOT/build}" && pwd)
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
MODULE=$BUILD/tests/libpalign_cuda_emu.so
fail() {
  echo "test_cuda_service_emu: FAIL: $*" >&2
  exit 1
}
skip() {
  echo "test_cuda_service_emu: skipping: $*"
  exit 77
}
command -v mpirun >/dev/null || skip "no mpirun"
[ -f "$PAPI/Test-set.json" ] || skip "no PAPI data at $PAPI"
[ -f "$MODULE" ] || skip "no emulated CUDA module at $MODULE"

S=$(mktemp -d /tmp/palign-cudaemu-XXXXXX)
trap 'rm -rf "$S"' EXIT
export PALIGN_CACHE=$S/cache # the bank of each run its own
mkdir -p "$PALIGN_CACHE"

"$BUILD/palign" mkmodel "$S/m.gguf" --ctx 4096 --layers 1 --dim 32 --heads 2 --kv-heads 1 --ffn 64 --seed 7 \
  >"$S/mkmodel.log" 2>&1 || fail "mkmodel: $(cat "$S/mkmodel.log")"
ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" PALIGN_CUDA_MODULE=$MODULE PALIGN_NCCL=1 \
  mpirun --allow-run-as-root --oversubscribe -np 2 -x PALIGN_CUDA_MODULE -x PALIGN_NCCL -x PALIGN_CACHE -x ASAN_OPTIONS \
  "$BUILD/palign-worker" --model "$S/m.gguf" --papi "$PAPI" --store "$S/store" --subjects 1 --threads 1 \
  --methods none,pas_only --alphas 0,4 --backend cuda >"$S/worker.log" 2>&1 ||
  fail "palign-worker --backend cuda: $(tail -20 "$S/worker.log")"
grep -q "PALIGN_NCCL=1, but this backend has no collectives" "$S/worker.log" ||
  fail "the log does not say why the bank did not go over NCCL: $(grep -i bank "$S/worker.log")"
grep -q "gathered over MPI" "$S/worker.log" || fail "no bank line: $(tail -5 "$S/worker.log")"

"$BUILD/palign" query "$S/store" summary >"$S/summary.txt" 2>&1 || fail "query summary: $(cat "$S/summary.txt")"
grep -q "weights bf16" "$S/summary.txt" || fail "the store's settings: $(grep settings "$S/summary.txt")"
"$BUILD/palign" query "$S/store" export --format records --out "$S/records.jsonl" >/dev/null 2>&1 ||
  fail "query export"
"$BUILD/palign" eval --model "$S/m.gguf" --papi "$PAPI" --subjects 1 --threads 1 --methods none,pas_only \
  --alphas 0,4 --backend cpu --weights bf16 --json "$S/cpu.json" >"$S/cpu.log" 2>&1 ||
  fail "palign eval --backend cpu: $(tail -5 "$S/cpu.log")"

python3 - "$S/records.jsonl" "$S/cpu.json" <<'EOF' || fail "the store's results differ from the CPU's"
import json, sys
rec = json.loads(open(sys.argv[1]).readline())
cpu = json.load(open(sys.argv[2]))["subjects"][0]
assert (rec["backend"], rec["weights"]) == ("cuda", "bf16"), (rec["backend"], rec["weights"])
rows = {r["name"]: r["predictions"] for m in rec["methods"] for r in m.get("rows", [])}
chosen = {(c["variant"], c["protocol"]): c["alpha"] for c in rec["pas"]["chosen"]}
same = total = 0
worst = 0.0
for name, em in cpu["methods"].items():
    if "alpha_reference" in em:  # a PAS variant's fit
        for protocol in ("reference", "holdout"):
            assert chosen[(name, protocol)] == em[f"alpha_{protocol}"], (name, protocol, chosen, em)
    if "items" not in em or name not in rows:
        continue
    p = rows[name]
    for i, it in enumerate(em["items"]):
        assert it["item"] == p["items"][i], (name, i)
        total += 1
        same += it["answer"] == p["answer"][i]
        if "p" in it:  # the model's rows (the model-free ones have none)
            worst = max([worst] + [abs(x - y) for x, y in zip(it["p"], p["probs"][5 * i:5 * i + 5])])
print(f"{same}/{total} answers the same as the CPU's, option probabilities within {worst:.2g}, PAS alphas {chosen}")
assert total >= 300 and same >= 0.99 * total and worst <= 1e-3
EOF

# 4. the attention kernel as the environment names it
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
if PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_ATTENTION=flash "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi \
  --max-tokens 2 --backend auto >"$S/bad.log" 2>&1; then
  fail "PALIGN_CUDA_ATTENTION=flash with --backend auto ran: $(cat "$S/bad.log")"
fi
grep -q "PALIGN_CUDA_ATTENTION=flash: not one of mma, tiled, simple" "$S/bad.log" ||
  fail "PALIGN_CUDA_ATTENTION=flash: $(cat "$S/bad.log")"
PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_ATTENTION=tiled "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi \
  --max-tokens 2 --backend auto >"$S/tiled.log" 2>&1 || fail "PALIGN_CUDA_ATTENTION=tiled: $(cat "$S/tiled.log")"
PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_ATTENTION= "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi \
  --max-tokens 2 --backend auto >"$S/empty.log" 2>&1 || fail "PALIGN_CUDA_ATTENTION empty: $(cat "$S/empty.log")"
echo "test_cuda_service_emu: passed"
