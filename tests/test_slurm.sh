#!/usr/bin/env bash
# tests/test_slurm.sh [BUILD_DIR]: palign-worker under a real single-node Slurm
# (docs/SLURM.md). As root: installs slurm-wlm and munge if missing, starts
# munged, slurmctld and slurmd under a scratch directory (the single-node
# recipe in the "a private Slurm" section below), makes a tiny model, and
# through scripts/palign-submit and slurm/palign.sbatch checks, on the PAPI
# data with 2 workers + coordinator:
#   1. a job of 6 subjects completes and its store verifies with 6 subjects;
#   2. a job of 12 subjects cancelled with `scancel` half way stops cleanly
#      (the run is recorded as interrupted, the store verifies), and the same
#      command submitted again does only the subjects left: 12 stored, once each;
#   3. the time-limit path: SIGTERM to the batch script only (what
#      --signal=B:TERM@N sends; here by scancel --signal=TERM --batch) stops
#      palign-worker cleanly, the job requeues itself, resumes and completes;
#   4. the same with a real 1-minute time limit and Slurm's own signal 50 s
#      before it: the run stops cleanly, requeues and resumes with the stored
#      subjects counted (then it is cancelled).
# BUILD_DIR (default $PALIGN_BUILD, else build/) must hold palign and
# palign-worker. PAPI data: $PALIGN_PAPI_DIR, else ../shared/papi beside the
# checkout. Stops only
# the daemons it started, by PID; removes its scratch directory (kept with
# PALIGN_KEEP_SCRATCH=1). Exit status 0 when every check passed, 1 otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${1:-${PALIGN_BUILD:-$ROOT/build}}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
SUBMIT=$ROOT/scripts/palign-submit
KILL_WAIT=30 # slurm.conf KillWait: scancel's SIGTERM, then SIGKILL this much later
T0=$(date +%s)

say() { printf 'test_slurm: [%3d s] %s\n' $(($(date +%s) - T0)) "$*"; }
LOG= # the job log to show on failure
fail() {
  printf 'test_slurm: [%3d s] FAIL: %s\n' $(($(date +%s) - T0)) "$*" >&2
  if [ -n "$LOG" ] && [ -f "$LOG" ]; then
    printf -- '---- last lines of %s\n' "$LOG" >&2
    tail -n 40 "$LOG" >&2
  fi
  if [ -n "${S:-}" ] && [ -f "$S/slurm/log/slurmctld.log" ]; then
    printf -- '---- last lines of slurmctld.log\n' >&2
    tail -n 15 "$S/slurm/log/slurmctld.log" >&2
  fi
  exit 1
}

# ---- what is needed -------------------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
  # the daemons run as root, as in docs/SLURM.md
  sudo -n true 2>/dev/null || fail "run me as root (I start munged, slurmctld and slurmd) or with sudo"
  exec sudo -n -E "$0" "$@"
fi
[ -x "$BUILD/palign" ] && [ -x "$BUILD/palign-worker" ] ||
  fail "no palign and palign-worker in $BUILD: build them first (cmake --build $BUILD)"
BUILD=$(cd "$BUILD" && pwd)
[ -f "$PAPI/Test-set.json" ] || fail "no PAPI data in $PAPI (set PALIGN_PAPI_DIR)"
PALIGN=$BUILD/palign
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! [ -x /usr/sbin/munged ]; then
  say "installing slurm-wlm and munge"
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    fail "apt-get install slurm-wlm munge failed"
fi
id munge >/dev/null 2>&1 || fail "no user munge (the munge package makes it)"

# ---- a private Slurm --------------------------------------------------------------
S=$(mktemp -d /tmp/palign-slurm.XXXXXX)
chmod 755 "$S" # munged (as munge) reaches its socket through here
PIDS=()        # every daemon started here, in start order
JOBS=()        # every job submitted here
cleanup() {
  local rc=$?
  set +e
  if [ ${#JOBS[@]} -gt 0 ] && [ ${#PIDS[@]} -ge 2 ] && kill -0 "${PIDS[1]}" 2>/dev/null; then
    scancel "${JOBS[@]}" 2>/dev/null
    for ((i = 0; i < 2 * (KILL_WAIT + 10); i++)); do
      squeue -h -j "$(
        IFS=,
        echo "${JOBS[*]}"
      )" 2>/dev/null | grep -q . || break
      sleep 0.5
    done
  fi
  for ((k = ${#PIDS[@]} - 1; k >= 0; k--)); do
    kill -TERM "${PIDS[k]}" 2>/dev/null || continue
    for ((i = 0; i < 50; i++)); do
      kill -0 "${PIDS[k]}" 2>/dev/null || break
      sleep 0.2
    done
    kill -0 "${PIDS[k]}" 2>/dev/null && kill -KILL "${PIDS[k]}" 2>/dev/null
    wait "${PIDS[k]}" 2>/dev/null
  done
  if [ "${PALIGN_KEEP_SCRATCH:-0}" = 1 ]; then
    echo "test_slurm: scratch kept in $S" >&2
  else
    rm -rf "$S"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=
for ((try = 0; try < 50; try++)); do
  p=$((20000 + RANDOM % 30000))
  if port_free "$p" && port_free $((p + 1)); then
    port=$p
    break
  fi
done
[ -n "$port" ] || fail "found no two free TCP ports"

mkdir -p "$S/tmp" "$S/munge" "$S/slurm/state" "$S/slurm/spool" "$S/slurm/run" "$S/slurm/log" "$S/work"
chown munge:munge "$S/munge"
chmod 755 "$S/munge"
key=/etc/munge/munge.key
if ! [ -f $key ]; then
  key=$S/munge/munge.key
  head -c 1024 /dev/urandom >"$key"
  chown munge:munge "$key"
  chmod 400 "$key"
fi
mem=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
[ "$mem" -gt 4000 ] && mem=4000
cat >"$S/slurm.conf" <<EOF
ClusterName=palign-test
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket=$S/munge/munge.socket.2,cred_expire=10
MailProg=/bin/true
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval, bf_interval: a requeued job starts about 5 s after its begin time, not up to 60 s
SchedulerParameters=batch_sched_delay=0,sched_interval=5,bf_interval=5
ReturnToService=2
# TmpFS holds pmix's spmix_appdir_UID_JOB.STEP: kept apart from other private Slurms, as are the job ids
TmpFS=$S/tmp
FirstJobId=$((1000 + RANDOM % 30000 * 100))
KillWait=$KILL_WAIT
StateSaveLocation=$S/slurm/state
SlurmdSpoolDir=$S/slurm/spool
SlurmctldPidFile=$S/slurm/run/slurmctld.pid
SlurmdPidFile=$S/slurm/run/slurmd.pid
SlurmctldLogFile=$S/slurm/log/slurmctld.log
SlurmdLogFile=$S/slurm/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$S/slurm.conf
# a Slurm job around this test must not leak into the private one
unset SLURM_JOB_ID SLURM_JOBID SLURM_NODELIST SLURM_JOB_NODELIST SLURM_NTASKS SLURM_NPROCS SLURM_CPUS_PER_TASK

say "starting munged, slurmctld and slurmd in $S (ports $port, $((port + 1)))"
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --socket="$S/munge/munge.socket.2" \
  --key-file="$key" --pid-file="$S/munge/munged.pid" --seed-file="$S/munge/munged.seed" \
  --log-file="$S/munge/munged.log" >"$S/munge/munged.out" 2>&1 &
PIDS+=($!)
for ((i = 0; i < 50; i++)); do
  [ -S "$S/munge/munge.socket.2" ] && break
  kill -0 "${PIDS[0]}" 2>/dev/null || fail "munged stopped: $(cat "$S/munge/munged.out")"
  sleep 0.1
done
[ -S "$S/munge/munge.socket.2" ] || fail "munged made no socket in 5 s: $(cat "$S/munge/munged.out")"
slurmctld -D -i >"$S/slurm/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -N localhost >"$S/slurm/log/slurmd.out" 2>&1 &
PIDS+=($!)
state=
for ((i = 0; i < 60; i++)); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || fail "the node is '$state', not idle, 30 s after start: $(tail -n 5 "$S/slurm/log/slurmd.log")"
say "Slurm is up (node idle)"

# ---- helpers ----------------------------------------------------------------------
job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

# a JobState a job does not leave (others: PENDING, RUNNING, COMPLETING,
# SIGNALING while Slurm's --signal goes out, REQUEUED, ...)
final_state() {
  case $1 in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | PREEMPTED | BOOT_FAIL | DEADLINE) return 0 ;;
    *) return 1 ;;
  esac
}

# wait_job JOB TIMEOUT: until the job has ended; prints its JobState
wait_job() {
  local t_end=$(($(date +%s) + $2)) st
  while :; do
    st=$(job_field "$1" JobState)
    if final_state "$st"; then
      echo "$st"
      return 0
    fi
    [ "$(date +%s)" -lt "$t_end" ] || fail "job $1 still '$st' after $2 s"
    sleep 0.5
  done
}

# the number of valid records in a store (0 when there is none yet)
records() {
  local n
  n=$("$PALIGN" query "$1" verify 2>/dev/null | sed -n 's/.*: \([0-9][0-9]*\) records ok.*/\1/p' | tail -n 1 || true)
  echo "${n:-0}"
}

# wait_records STORE JOB TIMEOUT: until at least one record, the job still running
wait_records() {
  local t_end=$(($(date +%s) + $3)) n st
  while :; do
    n=$(records "$1")
    st=$(job_field "$2" JobState)
    [ "$n" -ge 1 ] && [ "$st" = RUNNING ] && break
    if final_state "$st"; then fail "job $2 ended $st before it stored anything"; fi
    [ "$(date +%s)" -lt "$t_end" ] || fail "job $2: no record in $1 after $3 s"
    sleep 0.25
  done
}

# check_store STORE N: verify passes, N records, N different subjects, each once
check_store() {
  local out n ids uniq
  out=$("$PALIGN" query "$1" verify 2>&1) || fail "palign query $1 verify: $out"
  n=$(records "$1")
  [ "$n" -eq "$2" ] || fail "$1 holds $n valid records, not $2: $out"
  # one export row per (record, method row): a subject stored twice repeats its rows
  ids=$("$PALIGN" query "$1" export --format csv | tail -n +2 | cut -d, -f1,3 | sort)
  [ -z "$(uniq -d <<<"$ids")" ] || fail "$1: a subject is stored more than once: $(uniq -d <<<"$ids" | head -n 3)"
  uniq=$(cut -d, -f1 <<<"$ids" | sort -u | wc -l)
  [ "$uniq" -eq "$2" ] || fail "$1 holds $uniq different subjects, not $2"
}

# submit STORE SUBJECTS [more palign-submit arguments]: the job id into J
J=
submit() {
  local store=$1 subjects=$2 jid
  shift 2
  jid=$("$SUBMIT" --bin "$BUILD" --model "$S/work/tiny.gguf" --papi "$PAPI" --store "$store" \
    --methods none,pas_only --subjects "$subjects" --workers-per-node 2 --cpus-per-task 1 "$@" \
    -- --threads 1 --progress 2 2>>"$S/work/submit.err") ||
    fail "palign-submit failed: $(cat "$S/work/submit.err")"
  [[ $jid =~ ^[0-9]+$ ]] || fail "palign-submit printed '$jid', not a job id"
  JOBS+=("$jid")
  J=$jid
}

# the manifest's last run, as palign query summary describes it
last_run() { "$PALIGN" query "$1" summary 2>/dev/null | sed -n '/^runs /,/^shards /p'; }

"$PALIGN" mkmodel "$S/work/tiny.gguf" --ctx 4096 >/dev/null || fail "palign mkmodel failed"

# ---- 1: a whole job ---------------------------------------------------------------
t=$(date +%s)
st1=$S/work/store1
submit "$st1" 6
j=$J
LOG=$st1/logs/palign-$j.out
say "1: job $j, 6 subjects, 2 workers + coordinator"
state=$(wait_job "$j" 180)
[ "$state" = COMPLETED ] || fail "job $j ended $state (exit $(job_field "$j" ExitCode))"
[ "$(job_field "$j" ExitCode)" = 0:0 ] || fail "job $j exit code $(job_field "$j" ExitCode)"
check_store "$st1" 6
grep -q '6 subjects asked for, 0 already stored, 6 to do; 2 worker(s)' "$LOG" || fail "job $j's log has no start line"
grep -q '^subjects  6 stored' "$LOG" || fail "job $j's log has no palign query summary"
last_run "$st1" | grep -q 'finished ' || fail "store1's run is not recorded as finished: $(last_run "$st1")"
say "1: passed in $(($(date +%s) - t)) s: 6 subjects stored, verify clean"

# ---- 2: scancel half way, then the same command again ------------------------------
t=$(date +%s)
st2=$S/work/store2
submit "$st2" 12
j=$J
LOG=$st2/logs/palign-$j.out
say "2: job $j, 12 subjects; scancel once a record is stored"
wait_records "$st2" "$j" 180
scancel "$j"
state=$(wait_job "$j" $((KILL_WAIT + 30)))
[ "$state" = CANCELLED ] || fail "job $j ended $state after scancel, not CANCELLED"
k=$(records "$st2")
out=$("$PALIGN" query "$st2" verify 2>&1) || fail "after scancel, palign query verify: $out"
[ "$k" -ge 1 ] && [ "$k" -lt 12 ] || fail "after scancel $k of 12 subjects are stored (wanted some, not all)"
last_run "$st2" | grep -q 'interrupted by a signal' ||
  fail "after scancel the run is not recorded as interrupted: $(last_run "$st2")"
grep -q 'palign-worker: stopped by signal 15' "$LOG" || fail "job $j's log does not say palign-worker stopped on SIGTERM"
if grep -q 'requeueing' "$LOG"; then fail "job $j requeued itself after scancel"; fi
say "2: cancelled in $(($(date +%s) - t)) s with $k of 12 stored, run interrupted, verify clean; submitting again"
submit "$st2" 12
j2=$J
LOG=$st2/logs/palign-$j2.out
state=$(wait_job "$j2" 180)
[ "$state" = COMPLETED ] || fail "job $j2 ended $state (exit $(job_field "$j2" ExitCode))"
grep -q "12 subjects asked for, $k already stored, $((12 - k)) to do" "$LOG" ||
  fail "job $j2's log does not say '12 subjects asked for, $k already stored, $((12 - k)) to do'"
check_store "$st2" 12
say "2: passed in $(($(date +%s) - t)) s: the second job did the $((12 - k)) left; 12 stored once each"

# ---- 3: the time-limit signal to the batch script: stop, requeue, resume ------------
t=$(date +%s)
st3=$S/work/store3
submit "$st3" 12 --time 30 --signal-before 600
j=$J
LOG=$st3/logs/palign-$j.out
[ "$(job_field "$j" TimeLimit)" = 00:30:00 ] || fail "job $j's time limit is $(job_field "$j" TimeLimit), not 30 min"
say "3: job $j, 12 subjects; SIGTERM to its batch script once a record is stored"
wait_records "$st3" "$j" 180
scancel --signal=TERM --batch "$j"
# requeued: it ends its first run, waits cred_expire (10 s here), runs again
t_end=$(($(date +%s) + 120))
until [ "$(job_field "$j" Restarts)" = 1 ]; do
  [ "$(date +%s)" -lt "$t_end" ] || fail "job $j not requeued 120 s after the signal (state $(job_field "$j" JobState))"
  sleep 0.5
done
say "3: job $j requeued after $(($(date +%s) - t)) s"
state=$(wait_job "$j" 240)
[ "$state" = COMPLETED ] || fail "requeued job $j ended $state (exit $(job_field "$j" ExitCode))"
grep -q 'got SIGTERM' "$LOG" || fail "job $j's batch script did not report the signal"
grep -q 'palign-worker: stopped by signal 15' "$LOG" || fail "job $j's first run did not stop on SIGTERM"
grep -q 'requeueing job' "$LOG" || fail "job $j's log does not say it requeued"
k=$(grep -o '12 subjects asked for, [0-9]* already stored' "$LOG" | sed -n '2s/.*for, \([0-9]*\) already.*/\1/p')
[ -n "$k" ] && [ "$k" -ge 1 ] && [ "$k" -lt 12 ] ||
  fail "job $j's log has no second start line with some subjects already stored"
grep -q "12 subjects asked for, $k already stored, $((12 - k)) to do" "$LOG" || fail "job $j's second run miscounted"
check_store "$st3" 12
[ "$("$PALIGN" query "$st3" summary | sed -n 's/^runs *\([0-9]*\).*/\1/p')" = 2 ] || fail "store3 does not list 2 runs"
say "3: passed in $(($(date +%s) - t)) s: stopped with $k stored, requeued, resumed, 12 stored once each"

# ---- 4: a real time limit: Slurm's own --signal ------------------------------------
# 100 subjects, far more than a 1-minute run does: Slurm's signal (50 s before
# the limit, checked every 30 s or so: 8 to 40 s into the run) stops the first
# run. Once the second run has stored something, the job is cancelled.
t=$(date +%s)
st4=$S/work/store4
submit "$st4" 100 --time 1 --signal-before 50
j=$J
LOG=$st4/logs/palign-$j.out
say "4: job $j, 100 subjects, --time 1 (minute) --signal-before 50: Slurm signals the run"
t_end=$(($(date +%s) + 150))
until [ "$(job_field "$j" Restarts)" = 1 ]; do
  state=$(job_field "$j" JobState)
  if final_state "$state"; then fail "job $j ended $state (exit $(job_field "$j" ExitCode)) instead of requeueing"; fi
  [ "$(date +%s)" -lt "$t_end" ] || fail "job $j not requeued 150 s after it was submitted"
  sleep 0.25
done
k=$(records "$st4")
say "4: job $j requeued after $(($(date +%s) - t)) s with $k subjects stored"
grep -q 'got SIGTERM' "$LOG" || fail "job $j's batch script did not report Slurm's signal"
grep -q 'palign-worker: stopped by signal 15' "$LOG" || fail "job $j's first run did not stop on SIGTERM"
grep -q 'requeueing job' "$LOG" || fail "job $j's log does not say it requeued"
if grep -q 'DUE TO TIME LIMIT' "$LOG"; then fail "job $j reached its time limit: the signal came too late"; fi
out=$("$PALIGN" query "$st4" verify 2>&1) || fail "after the first run, palign query verify: $out"
last_run "$st4" | grep -q 'interrupted by a signal' || fail "the first run is not recorded as interrupted"
t_end=$(($(date +%s) + 120))
until [ "$(records "$st4")" -gt "$k" ]; do
  [ "$(date +%s)" -lt "$t_end" ] || fail "job $j's second run stored nothing in 120 s"
  sleep 0.25
done
scancel "$j"
wait_job "$j" $((KILL_WAIT + 30)) >/dev/null
grep -q "100 subjects asked for, $k already stored, $((100 - k)) to do" "$LOG" ||
  fail "job $j's second run does not say '100 subjects asked for, $k already stored, $((100 - k)) to do'"
check_store "$st4" "$(records "$st4")"
say "4: passed in $(($(date +%s) - t)) s: stopped by Slurm's signal, requeued, resumed with $k already stored"

LOG=
say "all Slurm checks passed in $(($(date +%s) - T0)) s"
