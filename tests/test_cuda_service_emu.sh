#!/usr/bin/env bash
# tests/test_cuda_service_emu.sh BUILD_DIR: the fitting service with
# --backend cuda, end to end, where no GPU is: palign-worker loads the CUDA
# backend built against the emulation (tests/cuda_emu, PALIGN_CUDA_MODULE),
# so the backend's own source runs under everything a GPU run goes through
# (device selection per worker, --weights auto on a GPU, the bank on the
# device and its exchange, PAS's grid, DPO's training, the store's
# records). On a tiny random model and one PAPI subject, methods none and
# pas_only (and dpo in 7.):
#   1. mpirun -np 4 palign-worker --backend cuda, three workers each on a
#      device of its own (PALIGN_EMU_DEVICES=3), finishes, and the bank's
#      slices (64, 64 and 112 of 240 sequences: batches of 64, two shorter
#      slices padded to the longest) went over NCCL (its emulation,
#      tests/cuda_emu/nccl_emu.cc), which left nothing behind;
#   2. the store's settings say weights bf16 (auto on a GPU), the record
#      backend cuda;
#   3. its answers are the CPU's with bf16 weights (palign eval --backend
#      cpu --weights bf16): at least 99% of them the same (the sums' order
#      differs, so a near tie may go either way), every option probability
#      within 1e-3, and PAS's chosen alphas the same;
#   4. the same bank gathered over MPI (two devices for three workers, so
#      PALIGN_NCCL=1 cannot have NCCL, and the log says why) is the same
#      file, byte for byte; on the CPU backend PALIGN_NCCL=1 says it has no
#      collectives;
#   5. PALIGN_CUDA_ATTENTION naming no kernel is an error for --backend auto
#      too (a device that cannot be used as asked is no machine without one),
#      naming the variable; a kernel it names runs, and so does an empty one.
#   6. PALIGN_CUDA_PROFILE: each process appends its table of the device's
#      time by operation to the file it names at exit; one that cannot be
#      written is a message, and the run's own result stands; a name too
#      long is refused before the run; each worker of 1. gave its NCCL
#      all-gather a row, with the rate of what it received.
#   7. DPO on the device through the service (one epoch of 8 steps, learning
#      rate 0.01 so that the loss moves: 0.693 to about 0.670), against the
#      CPU's service with bf16 weights: every step's loss within 1e-5, the
#      adapter within 1e-3 of its largest value, at least 99% of the
#      answers the same and every option probability within 1e-3 (measured:
#      5.4e-8, 2.2e-5, 180 of 180, 5.9e-5; the attention's sums go in
#      another order, which may move an activation's bf16 rounding by one
#      step, and eight Adam steps carry such differences on); under the
#      profile, the training attention's three backward kernels a row each
#      (D = dz.z, dQ, dK and dV), a span a step.
# KEEP=1 keeps the scratch directory (its path printed) for a look after.
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

unset PALIGN_NCCL PALIGN_EMU_DEVICES # each run below sets its own
S=$(mktemp -d /tmp/palign-cudaemu-XXXXXX)
[ -n "${KEEP:-}" ] && echo "keeping $S"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$S"' EXIT
export PALIGN_CACHE=$S/cache # the bank of each run its own
mkdir -p "$PALIGN_CACHE"

"$BUILD/palign" mkmodel "$S/m.gguf" --ctx 4096 --layers 1 --dim 32 --heads 2 --kv-heads 1 --ffn 64 --seed 7 \
  >"$S/mkmodel.log" 2>&1 || fail "mkmodel: $(cat "$S/mkmodel.log")"
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" PALIGN_CUDA_MODULE=$MODULE
export TMPDIR=$S # NCCL's emulation keeps its groups there
export PALIGN_CUDA_PROFILE= # empty: as unset (6. sets it for the first service)
# the service on WORKERS workers over DEVICES emulated devices: worker WORKERS DEVICES LOG ARGS...
worker() {
  local workers=$1 devices=$2 log=$3
  shift 3
  PALIGN_EMU_DEVICES=$devices mpirun --allow-run-as-root --oversubscribe -np $((workers + 1)) \
    -x PALIGN_CUDA_MODULE -x PALIGN_EMU_DEVICES -x PALIGN_NCCL -x PALIGN_CACHE -x ASAN_OPTIONS -x TMPDIR \
    -x PALIGN_CUDA_PROFILE \
    "$BUILD/palign-worker" --model "$S/m.gguf" --papi "$PAPI" --subjects 1 --threads 1 "$@" >"$log" 2>&1 ||
    fail "palign-worker $*: $(tail -20 "$log")"
}
PALIGN_CUDA_PROFILE=$S/service-profile-%p.txt worker 3 3 "$S/worker.log" --store "$S/store" \
  --methods none,pas_only --alphas 0,4 --backend cuda
grep -q "computed by 3 worker(s) .*gathered over NCCL" "$S/worker.log" ||
  fail "the bank did not go over NCCL: $(grep -i -e bank -e nccl "$S/worker.log")"
! compgen -G "$S/palign-nccl-*" >/dev/null || fail "NCCL's emulation left its group behind: $(ls "$S")"

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

# 4. the bank over MPI: the same bytes
PALIGN_NCCL=1 worker 3 2 "$S/mpi.log" --store "$S/store-mpi" --methods pas_only --alphas 0 --backend cuda
grep -q "PALIGN_NCCL=1, but a node has more workers than GPUs" "$S/mpi.log" ||
  fail "the log does not say why the bank did not go over NCCL: $(grep -i -e bank -e nccl "$S/mpi.log")"
grep -q "gathered over MPI" "$S/mpi.log" || fail "no bank line: $(tail -5 "$S/mpi.log")"
python3 - "$S"/store/bank-*.bin "$S"/store-mpi/bank-*.bin <<'EOF' || fail "the bank gathered over NCCL is not the one over MPI"
import json, struct, sys
def data(path):  # the bank's floats: after 16 fixed bytes and the JSON header (worker/bank.c, pa_bank_save)
    raw = open(path, "rb").read()
    hlen = struct.unpack_from("<I", raw, 12)[0]
    n = json.loads(raw[16:16 + hlen])["data"]["bytes"]
    return raw[16 + hlen:16 + hlen + n]
a, b = (data(p) for p in sys.argv[1:3])
assert len(a) == 240 * 2 * 16 * 4 and a == b, (len(a), len(b))  # sequences x heads x head_dim floats
print(f"the bank over NCCL and over MPI: {len(a)} bytes, the same")
EOF
PALIGN_NCCL=1 worker 1 1 "$S/cpu-worker.log" --store "$S/store-cpu" --methods pas_only --alphas 0 --backend cpu
grep -q "PALIGN_NCCL=1, but this backend has no collectives" "$S/cpu-worker.log" ||
  fail "the CPU's log does not say why the bank did not go over NCCL: $(grep -i bank "$S/cpu-worker.log")"

# 5. the attention kernel as the environment names it
# (mma_bf16 is bench_cuda's and the tests': not the CPU's attention, so no bank or store is made with it)
for k in flash mma_bf16; do
  if PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_ATTENTION=$k "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi \
    --max-tokens 2 --backend auto >"$S/bad.log" 2>&1; then
    fail "PALIGN_CUDA_ATTENTION=$k with --backend auto ran: $(cat "$S/bad.log")"
  fi
  grep -q "PALIGN_CUDA_ATTENTION=$k: not one of mma, tiled, simple" "$S/bad.log" ||
    fail "PALIGN_CUDA_ATTENTION=$k: $(cat "$S/bad.log")"
done
PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_ATTENTION=tiled "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi \
  --max-tokens 2 --backend auto >"$S/tiled.log" 2>&1 || fail "PALIGN_CUDA_ATTENTION=tiled: $(cat "$S/tiled.log")"
PALIGN_CUDA_MODULE=$MODULE PALIGN_CUDA_ATTENTION= "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi \
  --max-tokens 2 --backend auto >"$S/empty.log" 2>&1 || fail "PALIGN_CUDA_ATTENTION empty: $(cat "$S/empty.log")"

# 6. the device-time profile: a table a process, appended to the file at exit
for i in 1 2; do
  PALIGN_CUDA_PROFILE=$S/profile.txt "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi --max-tokens 3 \
    --backend cuda >"$S/profiled.log" 2>&1 || fail "PALIGN_CUDA_PROFILE: $(cat "$S/profiled.log")"
done
[ "$(grep -c "^palign: CUDA device time by operation" "$S/profile.txt")" = 2 ] ||
  fail "PALIGN_CUDA_PROFILE: not a table a run: $(cat "$S/profile.txt")"
grep -Eq "^  attention \(tensor cores\) +[1-9][0-9]* " "$S/profile.txt" &&
  grep -Eq "^  matmul bf16 32x32 +[1-9][0-9]* " "$S/profile.txt" || fail "the profile's rows: $(cat "$S/profile.txt")"
# the workers' all-gathers: a row each, its bytes' rate after its share (no flops), which over its time is what
# each worker received: the 3 slices, each padded to the longest, so at least the bank's 240 x 2 x 16 floats and
# at most 3 times them (to the precision of the printed rate and time: 10% while it takes under 5 ms); a worker's
# own slice alone would be under the bank
[ "$(cat "$S"/service-profile-*.txt | awk '$1 == "NCCL" && $2 == "all-gather" && NF == 6 &&
    $6 * $4 * 1e6 > 0.9 * 30720 && $6 * $4 * 1e6 < 1.1 * 3 * 30720' | wc -l)" = 3 ] ||
  fail "the service's profiles: not an all-gather of the bank's 30,720 bytes in each: $(cat "$S"/service-profile-*.txt)"
PALIGN_CUDA_PROFILE=$S/no/such/dir/p.txt "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi --max-tokens 2 \
  --backend cuda >"$S/unwritable.log" 2>&1 || fail "an unwritable PALIGN_CUDA_PROFILE failed the run: $(cat "$S/unwritable.log")"
grep -q "PALIGN_CUDA_PROFILE: cannot write $S/no/such/dir/p.txt" "$S/unwritable.log" ||
  fail "an unwritable PALIGN_CUDA_PROFILE: $(cat "$S/unwritable.log")"
long=$(printf "$S/%04000d" 0)
if PALIGN_CUDA_PROFILE=$long "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi --max-tokens 2 --backend cuda \
  >"$S/long.log" 2>&1; then
  fail "a PALIGN_CUDA_PROFILE too long to write ran"
fi
grep -q "PALIGN_CUDA_PROFILE: a name of .* characters (at most 4000)" "$S/long.log" ||
  fail "a PALIGN_CUDA_PROFILE too long: $(cat "$S/long.log")"

# 7. DPO on the device: one epoch (8 steps, a learning rate that moves the loss) through the service, against the
# CPU's service with bf16 weights; under the profile, the training attention's backward kernels a row each, a span
# a step (one layer)
dpo=(--methods none,dpo --dpo-epochs 1 --dpo-lr 0.01)
PALIGN_CUDA_PROFILE=$S/dpo-profile-%p.txt worker 1 1 "$S/dpo.log" --store "$S/store-dpo" "${dpo[@]}" --backend cuda
for row in "D = dz.z" "dQ" "dK, dV"; do
  [ "$(cat "$S"/dpo-profile-*.txt | grep -cE "^  attention_backward: $row +8 ")" = 1 ] ||
    fail "DPO's profile: no row 'attention_backward: $row' of 8 spans: $(cat "$S"/dpo-profile-*.txt)"
done
worker 1 1 "$S/dpo-cpu.log" --store "$S/store-dpo-cpu" "${dpo[@]}" --backend cpu --weights bf16
for st in store-dpo store-dpo-cpu; do
  "$BUILD/palign" query "$S/$st" export --format records --out "$S/$st.jsonl" >/dev/null 2>&1 || fail "query export $st"
done
python3 - "$S/store-dpo.jsonl" "$S/store-dpo-cpu.jsonl" <<'EOF' || fail "DPO on the device differs from the CPU's"
import json, sys
gpu, cpu = (json.loads(open(p).readline()) for p in sys.argv[1:3])
assert (gpu["backend"], gpu["weights"], cpu["backend"], cpu["weights"]) == ("cuda", "bf16", "cpu", "bf16")
g, c = gpu["dpo"], cpu["dpo"]
assert g["n_steps"] == c["n_steps"] == len(g["loss"]) == len(c["loss"]) == 8, (g["n_steps"], c["n_steps"])
loss = max(abs(x - y) for x, y in zip(g["loss"], c["loss"]))
big = max(abs(x) for x in c["adapter"])
adapter = max(abs(x - y) for x, y in zip(g["adapter"], c["adapter"])) / big
rows = [{r["name"]: r["predictions"] for m in rec["methods"] for r in m.get("rows", [])}["dpo"] for rec in (gpu, cpu)]
same = sum(a == b for a, b in zip(rows[0]["answer"], rows[1]["answer"]))
probs = max(abs(x - y) for x, y in zip(rows[0]["probs"], rows[1]["probs"]))
print(f"DPO on the device: losses {c['loss'][0]:.4f} -> {c['loss'][-1]:.4f} within {loss:.2g} of the CPU's, the "
      f"adapter within {adapter:.2g} of its largest {big:.3g}, {same}/{len(rows[1]['answer'])} answers the same, "
      f"option probabilities within {probs:.2g}")
assert c["loss"][-1] < c["loss"][0] - 0.01, c["loss"]  # the steps moved it (0.693 to 0.670)
assert loss <= 1e-5 and adapter <= 1e-3 and same >= 0.99 * len(rows[1]["answer"]) and probs <= 1e-3
EOF
echo "test_cuda_service_emu: passed"
