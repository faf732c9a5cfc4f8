#!/usr/bin/env bash
# scripts/gpu-check.sh [--bundle DIR] [--budget SECONDS] [--dry-run] OUTDIR:
# on a machine with an NVIDIA GPU, builds palign with the CUDA backend
# (build-gpu/, -DPALIGN_CUDA=ON), runs the gpu tests (every CUDA operation,
# the forward pass, PAS and the trainer against the CPU) and the benchmarks,
# and writes everything into OUTDIR:
#   steps.txt               one line per step: name, exit status, seconds
#                           (124, or 137 when it had to be killed: stopped at
#                           its time limit; "skipped": no time left in the
#                           budget)
#   env.txt                 the GPU, nvcc, cmake, gcc, NCCL and MPI found
#   build.log, gpu-tests.log
#   bench.txt, bench.json   bench/bench_cuda: the card's bf16 GEMM peak by
#                           cuBLAS, the backend's products of a Llama-3-8B
#                           layer (fp32 and bf16 weights) and its attention
#                           kernels on a 1,024-token prefill, on a pass of
#                           PAS's grid and on two decoding steps; the
#                           memory's copy rate and the row operations'
#                           rates against it
#   forward-8b4.txt,        bench/bench_forward --backend cuda --quick on a
#   forward-8b4-fp32.txt    generated model of Llama-3-8B's layer shape with 4
#                           of its 32 layers (random weights), with bf16
#                           weights (the default on a GPU) and with fp32:
#                           prefill (512 and 1,536 tokens) and decode
#                           tokens/s, steering's cost
#   pas-8b4.txt, .json      palign eval --methods pas_only --backend cuda on
#                           one PAPI subject with that model (bf16 weights):
#                           PAS seconds per subject for 4 layers (x 8 for the
#                           whole depth)
#   profile-pas-8b4.txt     the same run again with the device-time profile
#                           on (PALIGN_CUDA_PROFILE): the device's time by
#                           operation and product shape, and its idle time;
#                           its log in pas-8b4-profiled.txt (its seconds
#                           against pas-8b4's: what the profile costs)
#   nccl-1.log, nccl-0.log, the service (mpirun, one worker on the GPU) with
#   nccl-compare.txt        the activation bank gathered over NCCL
#                           (PALIGN_NCCL=1) and over MPI (PALIGN_NCCL=0):
#                           scripts/compare-stores.py finds the same records
#   profile-forward-8b4.txt bench_forward's run (bf16) under the profile: both
#                           prefills, decoding and steering; log in
#                           forward-8b4-profiled.txt
#   dpo-8b4.txt, .json      palign eval --methods dpo --backend cuda on the
#                           same subject and model: DPO seconds per subject
#                           for 4 layers
#   pas-8b4-batch180.txt,   PAS again with the 180 items in one batch
#   .json                   (--batch 180; the default is 64): its grid's
#                           seconds against pas-8b4's
#   profile-dpo-8b4.txt     DPO (one epoch) under the profile: the training
#                           attention's kernels (forward; backward's D, dQ
#                           and dK/dV apart) against the products and
#                           AdamW's step; log in dpo-8b4-profiled.txt
#   sanitizer.log           compute-sanitizer's memcheck, racecheck (shared
#                           memory hazards between a block's threads) and
#                           initcheck on test_cuda_ops
#   figures.md              scripts/gpu-figures.py on the above: the figures
#                           for docs/CUDA.md, held against issue 13's goals
# The steps run in that order, most wanted first, each under a time limit of
# its own; --budget SECONDS (default: none) also stops the whole run by then
# (give 15 s more: a stopped step may take 5 s to be killed, and the unpacking
# of a bundle comes first), a step getting what is left and the steps after
# it skipped, so that a machine lent for a fixed time returns what was
# measured.
# --bundle DIR uses a bundle made by scripts/gpu-bundle.sh, for a machine that
# cannot install packages: its Debian packages are unpacked into
# build-gpu/deps (not into /) and built and run against, and its PAPI data is
# used unless PALIGN_PAPI_DIR is set.
# --dry-run checks this script where a CUDA toolkit but no GPU is: it also
# builds the emulated backend (tests/cuda_emu) and runs every --backend cuda
# step on it (PALIGN_CUDA_MODULE) with a 1-layer model of mkmodel's default
# shape in place of the 8B-shaped one; the figures mean nothing, steps.txt
# says whether each step ran (bench_cuda and the gpu tests still need a GPU;
# the bank goes over NCCL's emulation, tests/cuda_emu/nccl_emu.cc).
# NCCL is the CUDA toolkit's or the system's; failing those, the one Python's
# nvidia-nccl package carries (PyTorch's images have it).
# Exit 0 when the build, the tests and the benchmarks all passed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE= BUDGET=0 DRY=0
while [ $# -gt 1 ]; do
  case $1 in
    --dry-run) DRY=1; shift ;;
    --bundle)
      [ -d "$2" ] || { echo "gpu-check: --bundle: no folder '$2' (make one with scripts/gpu-bundle.sh)" >&2; exit 2; }
      BUNDLE=$(cd "$2" && pwd)
      shift 2 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] && [[ $1 != -* ]] || { echo "usage: scripts/gpu-check.sh [--bundle DIR] [--budget SECONDS] [--dry-run] OUTDIR" >&2; exit 2; }
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu-check: --budget takes whole seconds, not '$BUDGET'" >&2; exit 2; }
BUDGET=$((10#$BUDGET))
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
BUILD=${GPU_BUILD_DIR:-$ROOT/build-gpu}
START=$SECONDS
status=0
cmake_args=()
(cd "$OUT" && rm -f steps.txt env.txt build.log gpu-tests.log bench.txt bench.json mkmodel-8b4.log forward-8b4.txt \
  forward-8b4-fp32.txt pas-8b4.txt pas-8b4.json \
  pas-8b4-profiled.txt pas-8b4-profiled.json profile-pas-8b4.txt forward-8b4-profiled.txt profile-forward-8b4.txt nccl-mkmodel.log nccl-1.log nccl-0.log nccl-compare.txt dpo-8b4.txt \
  dpo-8b4.json pas-8b4-batch180.txt pas-8b4-batch180.json dpo-8b4-profiled.txt profile-dpo-8b4.txt sanitizer.log \
  figures.md)
: >"$OUT/steps.txt"

# step NAME LIMIT LOG COMMAND...: runs COMMAND with its output in LOG, stopped
# after LIMIT seconds or at the budget's end; a failure marks the run failed
# and the steps go on.
step() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc=0
  shift 3
  if [ "$BUDGET" -gt 0 ]; then
    local left=$((BUDGET - (SECONDS - START)))
    if [ $left -lt 10 ]; then
      echo "$name skipped" >>"$OUT/steps.txt"
      status=1
      return 0
    fi
    [ $left -ge "$limit" ] || limit=$left
  fi
  timeout --kill-after=5 "$limit" "$@" </dev/null >>"$log" 2>&1 || rc=$?
  echo "$name $rc $((SECONDS - t0))" >>"$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
  return 0
}
ok() { grep -q "^$1 0 " "$OUT/steps.txt"; }
# figures.md: the figures for the docs from what is there so far
figures() {
  local dry=()
  [ $DRY -eq 0 ] || dry=(--dry-run)
  python3 "$ROOT/scripts/gpu-figures.py" "${dry[@]}" "$OUT" >"$OUT/figures.md" 2>&1 || true
}

# The bundle's packages, unpacked into a folder of their own: pkg-config reads
# only their .pc files (the paths in them under PKG_CONFIG_SYSROOT_DIR), Open
# MPI finds itself through OPAL_PREFIX and its settings (Debian's: no
# InfiniBand or fabric transports) through mca_base_param_files, PMIx its
# plugins through PMIX_MCA_mca_base_component_path, the compiler their
# multiarch headers through C_INCLUDE_PATH, and the loader their libraries
# (the linker too, for the libraries those need) through LD_LIBRARY_PATH.
# The fallback packages (libudev, libuuid, gcc's libquadmath and libatomic,
# which every such system has) come last there: only where the system lacks
# them. Unpacked beside the build, not in /tmp, which may forbid running
# programs.
use_bundle() {
  local deps=$BUILD/deps
  command -v dpkg-deb >/dev/null || { echo "gpu-check: --bundle needs dpkg-deb (Debian or Ubuntu)" >&2; exit 1; }
  compgen -G "$BUNDLE/debs/*.deb" >/dev/null ||
    { echo "gpu-check: $BUNDLE/debs holds no packages (make the bundle with scripts/gpu-bundle.sh)" >&2; exit 1; }
  rm -rf "$deps" && mkdir -p "$deps/bin" "$deps/fallback"
  local f
  for f in "$BUNDLE"/debs/*.deb; do
    dpkg-deb -x "$f" "$deps" || { echo "gpu-check: cannot unpack $f" >&2; exit 1; }
  done
  for f in "$BUNDLE"/fallback/*.deb; do
    [ ! -e "$f" ] || dpkg-deb -x "$f" "$deps/fallback" || { echo "gpu-check: cannot unpack $f" >&2; exit 1; }
  done
  # links to absolute paths (zlib1g-dev's libz.so -> /lib/...) point into the folder instead
  find "$deps" -type l -lname '/*' -exec sh -c 'ln -sfn "$1$(readlink "$2")" "$2"' _ "$deps" {} \;
  local lib=$deps/usr/lib/x86_64-linux-gnu
  # Debian's alternatives (mpicc, mpirun) are made by its install scripts, which do not run here
  ln -s "$deps/usr/bin/mpicc.openmpi" "$deps/bin/mpicc"
  ln -s "$deps/usr/bin/mpirun.openmpi" "$deps/bin/mpirun"
  ln -s "$deps/usr/bin/pkgconf" "$deps/bin/pkg-config"
  mkdir "$deps/alt" && ln -s "$deps/usr/lib/libpsm1/libpsm_infinipath.so.1.16" "$deps/alt/libpsm_infinipath.so.1"
  export PATH=$deps/bin:$deps/usr/bin:$PATH
  export PKG_CONFIG_LIBDIR=$lib/pkgconfig:$lib/openblas-pthread/pkgconfig PKG_CONFIG_SYSROOT_DIR=$deps
  export OPAL_PREFIX=$deps/usr OMPI_MCA_mca_base_param_files=$deps/etc/openmpi/openmpi-mca-params.conf
  export PMIX_MCA_mca_base_component_path=$lib/pmix2/lib/pmix
  # the compiler's multiarch folder (OpenSSL's opensslconf.h), which no .pc file names
  export C_INCLUDE_PATH=$deps/usr/include/x86_64-linux-gnu${C_INCLUDE_PATH:+:$C_INCLUDE_PATH}
  export LD_LIBRARY_PATH=$lib:$deps/lib/x86_64-linux-gnu:$lib/openblas-pthread:$lib/openmpi/lib:$deps/alt${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$deps/fallback/usr/lib/x86_64-linux-gnu:$deps/fallback/lib/x86_64-linux-gnu
  cmake_args+=(-DPKG_CONFIG_EXECUTABLE="$deps/bin/pkg-config" -DMPI_C_COMPILER="$deps/bin/mpicc")
  if [ -z "${PALIGN_PAPI_DIR:-}" ] && [ -f "$BUNDLE/papi/Test-set.json" ]; then
    export PALIGN_PAPI_DIR=$BUNDLE/papi
  fi
}

# The CUDA toolkit's libraries (cudart, cuBLAS) for the loader, where the
# system does not list them. NCCL: CMake finds it in the toolkit or the
# system's folders when both nccl.h and libnccl.so are there; where they are
# not, a Python package nvidia-nccl-cu* may have them (its library has no
# unversioned name, so CMake is told the file).
cuda_libs() {
  local nvcc cuda d
  nvcc=$(command -v nvcc) || return 0
  cuda=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  for d in "$cuda/lib64" "$cuda/lib" "$cuda/targets/x86_64-linux/lib"; do
    [ ! -d "$d" ] || export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d
  done
  if [ -e "$cuda/include/nccl.h" ] || [ -e /usr/include/nccl.h ]; then
    for d in "$cuda"/lib* "$cuda"/targets/*/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
      [ ! -e "$d/libnccl.so" ] || return 0
    done
  fi
  local py
  py=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null) || return 0
  if [ -f "$py/include/nccl.h" ] && [ -f "$py/lib/libnccl.so.2" ]; then
    cmake_args+=(-DPALIGN_NCCL_LIBRARY="$py/lib/libnccl.so.2" -DPALIGN_NCCL_INCLUDE="$py/include")
    export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$py/lib
  fi
}

[ -z "$BUNDLE" ] || use_bundle
cuda_libs
# PAS's and DPO's peak memory where GNU time is (the bundle carries it)
timed=()
if gnu_time=$(type -P time); then timed=("$gnu_time" -v); fi
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
# without make, CMake's default generator (Unix Makefiles) cannot build
command -v make >/dev/null || ! command -v ninja >/dev/null || cmake_args+=(-G Ninja)
{
  timeout 30 nvidia-smi || echo "nvidia-smi: not found or failed"
  echo "--"
  nvcc --version 2>&1 | tail -1 || echo "nvcc: not found"
  cmake --version 2>&1 | head -1 || true
  "${CC:-cc}" --version 2>&1 | head -1 || true
  echo "bundle: ${BUNDLE:-none}; PAPI: $PAPI; cmake arguments: ${cmake_args[*]:-none}"
  echo "mpirun: $(command -v mpirun || echo none)"
  echo "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-}"
} >"$OUT/env.txt" 2>&1 || true

# PALIGN_WERROR=OFF: another machine's compiler may warn where this project's
# does not; the warnings stay in build.log
step configure 120 "$OUT/build.log" cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DPALIGN_CUDA=ON \
  -DPALIGN_WERROR=OFF "${cmake_args[@]}"
targets=(palign palign-worker test_cuda_ops test_cuda_forward test_cuda_pas test_cuda_train bench_cuda bench_forward)
shape=(--layers 4 --dim 4096 --heads 32 --kv-heads 8 --ffn 14336 --dtype bf16 --ctx 4096) # Llama-3-8B's layers
grid=() nccl_model=(--layers 2 --seed 5) nccl_work=(--subjects 2) nccl_limit=90
if [ $DRY -eq 1 ]; then # the emulation runs a GPU thread by thread: less of everything
  targets+=(palign_cuda_emu_module)
  shape=(--layers 1 --ctx 4096)
  grid=(--alphas 0,4) nccl_model=(--layers 1 --seed 5) nccl_work=(--subjects 1 --alphas 0,4) nccl_limit=240
  export PALIGN_CUDA_MODULE=$BUILD/tests/libpalign_cuda_emu.so
fi
ok configure && step build 400 "$OUT/build.log" cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}"
if ! ok build; then
  grep -q "^build" "$OUT/steps.txt" || echo "build skipped" >>"$OUT/steps.txt"
  figures
  echo "gpu-check: the build failed (see $OUT/build.log)" >&2
  tail -20 "$OUT/build.log" >&2
  cat "$OUT/steps.txt" >&2
  exit 1
fi
grep -E "palign: (CUDA|NCCL)" "$OUT/build.log" >>"$OUT/env.txt" || true

for t in test_cuda_ops test_cuda_forward test_cuda_train test_cuda_pas; do
  step "$t" 150 "$OUT/gpu-tests.log" "$BUILD/tests/$t"
done
step bench_cuda 90 "$OUT/bench.txt" "$BUILD/bench/bench_cuda" --json "$OUT/bench.json"

M=${TMPDIR:-/tmp}/palign-8b4.gguf
step mkmodel-8b4 120 "$OUT/mkmodel-8b4.log" "$BUILD/palign" mkmodel "$M" --force "${shape[@]}"
if ok mkmodel-8b4; then
  step forward-8b4 120 "$OUT/forward-8b4.txt" "$BUILD/bench/bench_forward" "$M" "$PAPI" --quick --backend cuda
  # each run its own bank file, made afresh: the same work, whatever a cache holds
  PB=${TMPDIR:-/tmp}/palign-8b4-bank.bin
  rm -f "$PB"
  step pas-8b4 180 "$OUT/pas-8b4.txt" "${timed[@]}" "$BUILD/palign" eval --model "$M" --papi "$PAPI" \
    --methods pas_only --subjects 1 "${grid[@]}" --backend cuda --json "$OUT/pas-8b4.json" --bank "$PB"
  rm -f "$PB"
  step pas-8b4-profiled 180 "$OUT/pas-8b4-profiled.txt" env PALIGN_CUDA_PROFILE="$OUT/profile-pas-8b4.txt" \
    "${timed[@]}" "$BUILD/palign" eval --model "$M" --papi "$PAPI" --methods pas_only --subjects 1 "${grid[@]}" \
    --backend cuda --json "$OUT/pas-8b4-profiled.json" --bank "$PB"
fi

if command -v mpirun >/dev/null; then
  # one machine: mpirun starts the ranks itself, and Open MPI asks for ssh only to reach others
  command -v ssh >/dev/null || command -v rsh >/dev/null || export OMPI_MCA_plm=isolated
  T=${TMPDIR:-/tmp}/palign-nccl
  rm -rf "$T" && mkdir -p "$T"
  step nccl-mkmodel 60 "$OUT/nccl-mkmodel.log" "$BUILD/palign" mkmodel "$T/m.gguf" "${nccl_model[@]}"
  for mode in 1 0; do
    step "nccl-$mode" $nccl_limit "$OUT/nccl-$mode.log" env PALIGN_NCCL=$mode mpirun --allow-run-as-root --oversubscribe -np 2 \
      "$BUILD/palign-worker" --model "$T/m.gguf" --papi "$PAPI" --store "$T/s$mode" --methods none,pas_only \
      "${nccl_work[@]}" --backend cuda
  done
  if ok nccl-1 && ok nccl-0; then
    grep -q "gathered over NCCL" "$OUT/nccl-1.log" ||
      { echo "gpu-check: the bank did not go over NCCL" >&2; status=1; }
    step nccl-compare 60 "$OUT/nccl-compare.txt" python3 "$ROOT/scripts/compare-stores.py" "$T/s1" "$T/s0" \
      --palign "$BUILD/palign"
  fi
  rm -rf "$T"
else
  echo "no mpirun: the NCCL check did not run" >"$OUT/nccl-compare.txt"
  echo "nccl skipped" >>"$OUT/steps.txt"
fi

if ok mkmodel-8b4; then
  step forward-8b4-fp32 120 "$OUT/forward-8b4-fp32.txt" "$BUILD/bench/bench_forward" "$M" "$PAPI" --quick \
    --backend cuda --weights fp32
  step forward-8b4-profiled 120 "$OUT/forward-8b4-profiled.txt" env PALIGN_CUDA_PROFILE="$OUT/profile-forward-8b4.txt" \
    "$BUILD/bench/bench_forward" "$M" "$PAPI" --quick --backend cuda
  step dpo-8b4 240 "$OUT/dpo-8b4.txt" "${timed[@]}" "$BUILD/palign" eval --model "$M" --papi "$PAPI" \
    --methods dpo --subjects 1 --backend cuda --json "$OUT/dpo-8b4.json"
  # PAS's grid with the 180 items in one batch, against the default 64 (three passes an alpha): whether a GPU
  # wants a larger default; the bank the profiled run made, read from its file
  step pas-8b4-batch180 180 "$OUT/pas-8b4-batch180.txt" "$BUILD/palign" eval --model "$M" --papi "$PAPI" \
    --methods pas_only --subjects 1 "${grid[@]}" --backend cuda --batch 180 --json "$OUT/pas-8b4-batch180.json" \
    --bank "$PB"
  rm -f "$PB"
  # where DPO's device time goes (one epoch: the reference pass and 8 steps): the training attention's kernels
  # against the products and the copies, which says what DPO's next step is
  step dpo-8b4-profiled 150 "$OUT/dpo-8b4-profiled.txt" env PALIGN_CUDA_PROFILE="$OUT/profile-dpo-8b4.txt" \
    "$BUILD/palign" eval --model "$M" --papi "$PAPI" --methods dpo --subjects 1 --dpo-epochs 1 --backend cuda
fi
rm -f "$M"

# the kernels under compute-sanitizer (the toolkit's, beside nvcc when not on PATH)
sanitizer=$(command -v compute-sanitizer || echo "$(dirname "$(command -v nvcc)")/compute-sanitizer")
if [ $DRY -eq 0 ] && [ -x "$sanitizer" ]; then
  for tool in memcheck racecheck initcheck; do
    step "sanitizer-$tool" 150 "$OUT/sanitizer.log" "$sanitizer" --tool "$tool" --error-exitcode 1 \
      "$BUILD/tests/test_cuda_ops"
  done
else
  echo "sanitizer skipped" >>"$OUT/steps.txt"
fi

tail -30 "$OUT/gpu-tests.log" 2>/dev/null || true
cat "$OUT"/bench.txt "$OUT"/forward-8b4*.txt 2>/dev/null || true
grep -E "Time per|Elapsed|Maximum resident" "$OUT"/pas-8b4*.txt "$OUT"/dpo-8b4.txt 2>/dev/null || true
head -n 16 "$OUT"/profile-*.txt 2>/dev/null || true
echo "--- steps (name, exit status, seconds) after $((SECONDS - START)) s"
cat "$OUT/steps.txt"
figures
cat "$OUT/figures.md"
exit $status
