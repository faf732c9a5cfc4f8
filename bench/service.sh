#!/usr/bin/env bash
# Throughput of the fitting service (palign-worker under mpirun): subjects per
# hour with rank 0 alone (-np 1) and with 1, 2 and 3 workers (-np 2, 3, 4),
# each run into a fresh store, on a small random model and synthetic subjects
# (scripts/synth-subjects.py), --threads 1 per worker. Two workloads:
#   icl   every subject gets its own ICL prompt: real model work per subject
#         (about 22k tokens: the shared prefix and 180 questions; about 0.6 s
#         of CPU a subject with the default model here)
#   none  the same questions for everyone: the evaluator remembers the previous
#         call's answers, so only each worker's first subject runs the model
#         and the rest cost only the service's own work (hand-out, record,
#         store append, report): the service overhead per subject
#
#   bench/service.sh [BUILD_DIR]    (default $BUILD_DIR, else build/)
#
# Environment: N_ICL (default 60), N_NONE (default 1000) subjects; WORKLOADS
# (default "icl none"); REPS (icl, default 1) and REPS_NONE (default 3): runs
# per rank count, even reps in reverse rank order; NPS (default "1 2 3 4");
# PALIGN_PAPI_DIR; MODEL_ARGS (palign mkmodel options, default a 1-layer,
# dim-32 model); BANK=0 skips the activation-bank timing; KEEP=1 keeps the
# scratch folder (logs, stores). About 5 minutes on a busy 2-core box.
#
# Columns: wall = mpirun start to exit, measured here; service = the time the
# service reports for the subjects (last progress line: finished / rate; its
# clock starts after model load and bank); start-up = wall - service (mpirun
# launch, data and model load, manifest, teardown); launch = a bare
# `mpirun -np N palign-worker --help`; cpu = user+sys of mpirun and all ranks;
# got = cpu / wall, the cores the run actually used; bg = cores used by other
# processes meanwhile (/proc/stat busy time less ours); per worker = subjects
# each worker stored (from its shard's size). Ratios are against the
# 1-worker (-np 2) rate of the same workload measured in this same run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-${BUILD_DIR:-$ROOT/build}}
case $BUILD in /*) ;; *) BUILD=$PWD/$BUILD ;; esac
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
WORKLOADS=${WORKLOADS:-icl none}
REPS=${REPS:-1}
NPS=${NPS:-1 2 3 4}
MODEL_ARGS=${MODEL_ARGS:---layers 1 --dim 32 --heads 2 --kv-heads 1 --ffn 64}
PALIGN=$BUILD/palign WORKER=$BUILD/palign-worker
for b in "$PALIGN" "$WORKER"; do
  [ -x "$b" ] || { echo "bench/service.sh: $b not found (cmake --build $BUILD --target palign palign-worker)" >&2; exit 1; }
done
command -v mpirun >/dev/null || { echo "bench/service.sh: mpirun not found" >&2; exit 1; }
[ -f "$PAPI/Test-set.json" ] || { echo "bench/service.sh: no PAPI data in $PAPI (set PALIGN_PAPI_DIR)" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

W=$(mktemp -d "${TMPDIR:-/tmp}/palign-bench-service.XXXXXX")
BGPID=
cleanup() {
  if [ -n "$BGPID" ]; then kill -TERM "$BGPID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "# scratch kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
TCK=$(getconf CLK_TCK)
CORES=$(nproc)
# busy jiffies of the whole machine (user nice system irq softirq steal)
busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
n_of() { if [ "$1" = icl ]; then echo "${N_ICL:-60}"; else echo "${N_NONE:-1000}"; fi; }

echo "# $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(uname -m) $CORES cores, build $BUILD"
# shellcheck disable=SC2086 # MODEL_ARGS is a list of options
"$PALIGN" mkmodel "$W/model.gguf" --ctx 4096 $MODEL_ARGS >/dev/null
NMAX=0
for wl in $WORKLOADS; do [ "$(n_of "$wl")" -gt "$NMAX" ] && NMAX=$(n_of "$wl"); done
python3 "$ROOT/scripts/synth-subjects.py" --papi "$PAPI" --n "$NMAX" --seed 1 --out "$W/subjects.csv" 2>/dev/null
echo "# model: palign mkmodel --ctx 4096 $MODEL_ARGS; synthetic subjects (seed 1), the first N of them"
echo "# --threads 1 per worker; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
over=0
for np in $NPS; do [ "$np" -gt "$CORES" ] && over=1; done
[ $over = 1 ] && echo "# NOTE: only $CORES cores: runs with more than $CORES ranks oversubscribe the machine"

# launch cost alone, per rank count
declare -A LAUNCH
for np in $NPS; do
  t0=$(date +%s.%N)
  mpirun -np "$np" "$WORKER" --help >/dev/null 2>&1
  LAUNCH[$np]=$(echo "$(date +%s.%N) $t0" | awk '{ printf "%.2f", $1 - $2 }')
done

# subjects stored per worker, "31/29" in rank order: from the shard files'
# sizes (one shard per rank; a workload's records are all the same size)
per_rank() {
  local f sizes=""
  for f in "$1"/shards/*.pal; do sizes="$sizes $(stat -c %s "$f")"; done
  echo "$sizes" | awk -v n="$2" '{ t = 0; for (i = 1; i <= NF; i++) t += $i
    for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? "/" : ""), int($i * n / t + 0.5); print "" }'
}

# one run: prints "wl np n wall service startup rate coord_us cpu bg perrank"
run_one() {
  local wl=$1 np=$2 tag=$3 n log=$W/run-$3.log b0 b1 t0 t1
  n=$(n_of "$wl")
  b0=$(busy); t0=$(date +%s.%N)
  if ! /usr/bin/time -f "%U %S" -o "$W/time-$tag" mpirun -np "$np" "$WORKER" --model "$W/model.gguf" --papi "$PAPI" \
      --store "$W/store-$tag" --subjects-file "$W/subjects.csv" --subjects "$n" --methods "$wl" --threads 1 \
      --progress 5 >"$log" 2>&1; then
    echo "bench/service.sh: $wl -np $np failed; its log:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  t1=$(date +%s.%N); b1=$(busy)
  local pr
  pr=$(per_rank "$W/store-$tag" "$n")
  awk -v wl="$wl" -v np="$np" -v t0="$t0" -v t1="$t1" -v b0="$b0" -v b1="$b1" -v tck="$TCK" -v cpufile="$W/time-$tag" \
      -v n="$n" -v pr="$pr" '
    /subjects done/ { last = $0 }
    /^coordinator:/ { for (i = 1; i <= NF; i++) if ($i == "per" && $(i + 1) == "subject" && cus == "") cus = $(i - 2) }
    END {
      getline cpu < cpufile; split(cpu, c, " ")
      split(last, a, " "); done = a[3]; sub(/\/.*/, "", done)
      for (i = 1; i <= split(last, f, ";"); i++) if (f[i] ~ /subjects\/h/) { split(f[i], g, " "); rate = g[1] }
      if (done != n || rate <= 0) { print "bench/service.sh: " wl " -np " np ": expected " n " subjects done, read: " last > "/dev/stderr"; exit 1 }
      wall = t1 - t0; service = done * 3600 / rate; ours = c[1] + c[2]
      bg = ((b1 - b0) / tck - ours) / wall; if (bg < 0) bg = 0
      printf "%s %d %d %.2f %.2f %.2f %.1f %s %.1f %.2f %s\n", wl, np, n, wall, service, wall - service, rate, (cus == "" ? "-" : cus), ours, bg, pr
    }' "$log"
}

results=$W/results
: >"$results"
for wl in $WORKLOADS; do
  reps=$REPS
  [ "$wl" = none ] && reps=${REPS_NONE:-3}
  for ((rep = 1; rep <= reps; rep++)); do
    order=$NPS
    [ $((rep % 2)) = 0 ] && order=$(echo "$NPS" | tr -s ' ' '\n' | tac | tr '\n' ' ')
    for np in $order; do
      line=$(run_one "$wl" "$np" "$wl-r$rep-np$np")
      echo "$rep $line" >>"$results"
    done
  done
done

awk -v over=$over -v cores="$CORES" -v launch="$(for np in $NPS; do printf '%s=%s ' "$np" "${LAUNCH[$np]}"; done)" '
  BEGIN { split(launch, l, " "); for (k in l) { split(l[k], kv, "="); L[kv[1]] = kv[2] } }
  { i = NR; rep[i] = $1; wl[i] = $2; np[i] = $3; n[i] = $4; wall[i] = $5; svc[i] = $6; st[i] = $7; rate[i] = $8; cus[i] = $9
    cpu[i] = $10; bg[i] = $11; pr[i] = $12
    if ($3 == 2) base[$2, $1] = $8
    k = $2 SUBSEP $3; S[k] += $6; D[k] += $4; WL[k] += $5; C[k] += $10; R[k]++
    if (!($2 in seen)) { seen[$2] = 1; order[++nw] = $2 } }
  END {
    printf "\n%-5s %-4s %-5s %-9s %-5s %7s %8s %8s %8s %8s %6s %8s %6s %6s %5s  %s\n", "work", "rep", "ranks", "workers",
      "subj", "wall s", "svc s", "start s", "subj/h", "x 1wkr", "coord", "cpu s", "cpu/sj", "got", "bg", "per worker"
    printf "%-5s %-4s %-5s %-9s %-5s %7s %8s %8s %8s %8s %6s %8s %6s %6s %5s  %s\n", "", "", "", "", "", "", "", "", "(svc)", "",
      "us/sj", "", "s", "cores", "cores", ""
    for (i = 1; i <= NR; i++) {
      w = np[i] == 1 ? "0 (alone)" : np[i] - 1
      b = base[wl[i], rep[i]]
      printf "%-5s %-4s %-5s %-9s %-5s %7.2f %8.2f %8.2f %8.0f %8s %6s %8.1f %6.3f %6.2f %5.2f  %s\n", wl[i], rep[i], np[i], w, n[i],
        wall[i], svc[i], st[i], rate[i], (b > 0 ? sprintf("%.2f", rate[i] / b) : "-"), cus[i], cpu[i], cpu[i] / n[i],
        cpu[i] / wall[i], bg[i], pr[i]
    }
    printf "\nsummary (subjects / summed time over reps; x 1wkr: against -np 2 of the same workload in this run;\n"
    printf "launch: a bare mpirun -np N palign-worker --help)\n"
    printf "%-5s %-5s %-9s %10s %7s %11s %7s %9s %8s %9s\n", "work", "ranks", "workers", "subj/h svc", "x 1wkr", "subj/h wall",
      "x 1wkr", "start s", "launch s", "cpu/sj s"
    for (o = 1; o <= nw; o++) for (p = 1; p <= 64; p++) {
      k = order[o] SUBSEP p
      if (!(k in R)) continue
      b = order[o] SUBSEP 2
      rs = 3600 * D[k] / S[k]; rw = 3600 * D[k] / WL[k]
      bs = b in R ? 3600 * D[b] / S[b] : 0; bw = b in R ? 3600 * D[b] / WL[b] : 0
      printf "%-5s %-5d %-9s %10.0f %7s %11.0f %7s %9.2f %8s %9.3f\n", order[o], p, p == 1 ? "0 (alone)" : p - 1, rs,
        (bs ? sprintf("%.2f", rs / bs) : "-"), rw, (bw ? sprintf("%.2f", rw / bw) : "-"), (WL[k] - S[k]) / R[k], L[p], C[k] / D[k]
    }
    if (over) printf "(%d cores: runs with more than %d ranks oversubscribe the machine; got/bg say how much of it each run had)\n", cores, cores
  }' "$results"

# the activation bank (computed at start-up for methods pas/pas_only, in
# slices across the workers): a pas run is stopped by SIGTERM once it is done
if [ "${BANK:-1}" = 1 ]; then
  echo
  echo "activation bank (start-up of a pas run, stopped by SIGTERM once the bank is computed)"
  printf "%-5s %-9s %8s %18s\n" "ranks" "workers" "bank s" "launch to bank s"
  for np in 1 3; do
    log=$W/bank-np$np.log
    t0=$(date +%s.%N)
    mpirun -np "$np" "$WORKER" --model "$W/model.gguf" --papi "$PAPI" --store "$W/store-bank-np$np" \
      --subjects-file "$W/subjects.csv" --subjects 1 --methods pas --threads 1 >"$log" 2>&1 &
    BGPID=$!
    for ((i = 0; i < 1200; i++)); do
      grep -qs "activation bank computed" "$log" && break
      kill -0 "$BGPID" 2>/dev/null || break
      sleep 0.1
    done
    t1=$(date +%s.%N)
    kill -TERM "$BGPID" 2>/dev/null || true
    wait "$BGPID" 2>/dev/null || true
    BGPID=
    s=$(sed -n 's/.*activation bank computed by [0-9]* worker(s) in \([0-9.]*\) s.*/\1/p' "$log")
    printf "%-5d %-9s %8s %18s\n" "$np" "$([ "$np" = 1 ] && echo "0 (alone)" || echo $((np - 1)))" "${s:-n/a}" \
      "$(echo "$t1 $t0" | awk '{ printf "%.2f", $1 - $2 }')"
  done
fi
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
