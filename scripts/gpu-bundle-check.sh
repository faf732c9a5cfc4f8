#!/usr/bin/env bash
# scripts/gpu-bundle-check.sh WORKDIR [--ctest]: checks scripts/gpu-bundle.sh
# and gpu-check.sh --bundle where none of palign's packages is installed, on
# a Debian 12 machine with apt, debootstrap and a CUDA toolkit (no GPU
# needed), as root:
#   1. debootstrap a Debian 12 minbase system into WORKDIR/root holding only
#      gcc, g++, make, cmake, ninja and python3 (kept for the next run);
#   2. mount the CUDA toolkit (nvcc's) and /proc, /dev, /sys into it;
#   3. copy this checkout's files into it with a fresh bundle (.gpu-bundle);
#   4. run `gpu-check.sh --bundle .gpu-bundle --dry-run` there, into
#      WORKDIR/out (steps.txt says what each step did and took), and with
#      --ctest also build the whole project against the bundle there and run
#      `ctest -LE slow`;
#   5. unmount.
# The figures in docs/CUDA.md ("On a GPU machine without packages") come
# from such runs. Exit: gpu-check's (1 on this machine: the gpu tests and
# bench_cuda need a device), or ctest's with --ctest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: scripts/gpu-bundle-check.sh WORKDIR [--ctest]" >&2; exit 2; }
mkdir -p "$1"
W=$(cd "$1" && pwd)
CTEST=0
[ "${2:-}" != --ctest ] || CTEST=1
die() { printf 'gpu-bundle-check: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "debootstrap, chroot and mount need root"
command -v debootstrap >/dev/null || die "no debootstrap (apt-get install debootstrap)"
NVCC=$(command -v nvcc) || die "no nvcc on PATH: the check builds the CUDA backend"
CUDA=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
R=$W/root

if [ ! -x "$R/usr/bin/cmake" ]; then
  rm -rf "$R"
  debootstrap --variant=minbase --include=gcc,g++,make,cmake,ninja-build,python3,ca-certificates bookworm "$R" \
    http://deb.debian.org/debian >"$W/debootstrap.log" 2>&1 || die "debootstrap failed (see $W/debootstrap.log)"
fi
mounts=()
cleanup() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() { # bind SRC DST: mounted for this run only
  mkdir -p "$2"
  mountpoint -q "$2" || { mount --bind "$1" "$2" && mounts+=("$2"); }
}
bind /proc "$R/proc"
bind /dev "$R/dev"
bind /sys "$R/sys"
bind "$CUDA" "$R/usr/local/cuda"

rm -rf "$R/work/palign" && mkdir -p "$R/work/palign"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$R/work/palign")
"$ROOT/scripts/gpu-bundle.sh" "$R/work/palign/.gpu-bundle"
# the default model, where this machine has it, for the model tests of --ctest (they skip without it)
CACHE=${PALIGN_CACHE:-$HOME/.cache/palign}
if [ $CTEST -eq 1 ] && [ -f "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  mkdir -p "$R/root/.cache/palign" && cp "$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf" "$R/root/.cache/palign/"
fi

run_in() { # a clean environment inside, CUDA's compiler on the PATH
  chroot "$R" env -i HOME=/root PATH=/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash -c "cd /work/palign && $1"
}
rm -rf "$W/out" && mkdir -p "$R/work/out"
rc=0
run_in "scripts/gpu-check.sh --bundle .gpu-bundle --dry-run /work/out" >"$W/gpu-check.log" 2>&1 || rc=$?
cp -r "$R/work/out" "$W/out"
echo "gpu-check --bundle --dry-run: exit $rc; steps (name, exit status, seconds):"
cat "$W/out/steps.txt"
if [ $CTEST -eq 1 ]; then
  # the whole project against the bundle: gpu-check's own setup, sourced, then CMake and ctest
  run_in 'BUNDLE=/work/palign/.gpu-bundle BUILD=/work/palign/build-bundle; cmake_args=()
    source <(sed -n "/^use_bundle()/,/^}/p;/^cuda_libs()/,/^}/p" scripts/gpu-check.sh)
    use_bundle && cuda_libs
    command -v ssh >/dev/null || export OMPI_MCA_plm=isolated
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" >/dev/null &&
      cmake --build "$BUILD" -j "$(nproc)" >/dev/null && ctest --test-dir "$BUILD" -LE slow' >"$W/ctest.log" 2>&1 || rc=$?
  tail -25 "$W/ctest.log"
fi
exit $rc
