#!/usr/bin/env bash
# The coordinator at scale: palign-worker's benchmark mode (--benchmark-delay:
# no model, each subject a sleep drawn from a log-normal distribution, then
# the model-free methods and a real record in the store) under mpirun with
# 1 to 64 ranks, oversubscribing this machine's cores, each run into a fresh
# store. What it measures per rank count:
#   wall        mpirun start to exit
#   service     the service's own time for the subjects (last progress line)
#   ideal       the subjects' summed delays / workers: what a coordinator that
#               cost nothing would take (the delays are each subject's
#               recorded wall time, read back from the store)
#   efficiency  ideal / service
#   coord       rank 0's handling time per subject finished (us), and per
#               subject the messages it handled (reports, heartbeats
#               included) and the hand-outs it sent
#   files       shard files of the run, and store bytes per subject
#
#   bench/coordinator.sh [BUILD_DIR]     (default $BUILD_DIR, else build/)
#
# Environment: NPS (default "1 4 16 64"), N (subjects, default 3000; more
# than PAPI's 300 are synthetic, scripts/synth-subjects.py), DELAY (mean
# seconds and coefficient of variation, default "0.05,0.3"), CHUNK (default:
# the service's choice), KEEP=1 keeps the scratch folder. About 3 minutes
# here with the defaults.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-${BUILD_DIR:-$ROOT/build}}
case $BUILD in /*) ;; *) BUILD=$PWD/$BUILD ;; esac
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
NPS=${NPS:-1 4 16 64}
N=${N:-3000}
DELAY=${DELAY:-0.05,0.3}
PALIGN=$BUILD/palign WORKER=$BUILD/palign-worker
for b in "$PALIGN" "$WORKER"; do
  [ -x "$b" ] || { echo "bench/coordinator.sh: $b not found (cmake --build $BUILD)" >&2; exit 1; }
done
[ -f "$PAPI/Test-set.json" ] || { echo "bench/coordinator.sh: no PAPI data in $PAPI" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# many ranks on few cores: a rank waiting for a message sleeps instead of spinning
export OMPI_MCA_mpi_yield_when_idle=1

W=$(mktemp -d "${TMPDIR:-/tmp}/palign-bench-coord.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "# scratch kept: $W"; else rm -rf "$W"; fi; }
trap cleanup EXIT
python3 "$ROOT/scripts/synth-subjects.py" --papi "$PAPI" --n "$N" --seed 1 --out "$W/subjects.csv" 2>/dev/null

echo "# $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(uname -m), $(nproc) cores, build $BUILD"
echo "# palign-worker --benchmark-delay $DELAY (mean s, CV), $N synthetic subjects (seed 1)${CHUNK:+, --chunk $CHUNK}"
echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '| ranks | workers | wall s | service s | ideal s | efficiency | coord us/subject | reports/subject | hand-outs/subject | shard files | store bytes/subject |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|\n'
for np in $NPS; do
  log=$W/run-$np.log store=$W/store-$np
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086 # CHUNK adds two words or none
  if ! mpirun -np "$np" "$WORKER" --papi "$PAPI" --store "$store" --subjects-file "$W/subjects.csv" \
      --benchmark-delay "$DELAY" --progress 5 ${CHUNK:+--chunk $CHUNK} >"$log" 2>&1; then
    echo "bench/coordinator.sh: -np $np failed; its log:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  t1=$(date +%s.%N)
  bytes=$(du -sb "$store/shards" | cut -f1)
  shards=$(ls "$store/shards" | wc -l)
  slept=$("$PALIGN" query "$store" export --format records |
    python3 -c 'import json, sys; print(sum(json.loads(l)["seconds"] for l in sys.stdin if l.strip()))')
  awk -v np="$np" -v slept="$slept" -v n="$N" -v t0="$t0" -v t1="$t1" -v bytes="$bytes" -v shards="$shards" '
    /subjects done/ { last = $0 }
    /^coordinator:/ {
      for (i = 1; i <= NF; i++) {
        if ($i == "us" && $(i + 1) == "per" && $(i + 2) == "subject") cus = $(i - 1)
        if ($i == "reports") rep = $(i - 1)
        if ($i == "hand-outs;") ho = $(i - 1)
      }
    }
    END {
      split(last, a, " "); done = a[3]; sub(/\/.*/, "", done)
      for (i = 1; i <= split(last, f, ";"); i++) if (f[i] ~ /subjects\/h/) { split(f[i], g, " "); rate = g[1] }
      if (done != n || rate <= 0) { print "bench/coordinator.sh: -np " np ": expected " n " done, read: " last > "/dev/stderr"; exit 1 }
      workers = np > 1 ? np - 1 : 1; service = done * 3600 / rate; ideal = slept / workers
      printf "| %d | %s | %.2f | %.2f | %.2f | %.2f | %s | %s | %s | %d | %.0f |\n", np, (np > 1 ? workers : "0 (alone)"),
        t1 - t0, service, ideal, ideal / service, (np > 1 ? cus : "-"), (np > 1 ? rep : "-"), (np > 1 ? ho : "-"),
        shards, bytes / n
    }' "$log"
done
