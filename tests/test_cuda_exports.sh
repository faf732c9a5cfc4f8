#!/usr/bin/env bash
# tests/test_cuda_exports.sh LIB HEADER: the CUDA backend's library (LIB,
# libpalign_cuda.so) exports exactly the functions its header (HEADER,
# kernels/cuda/cuda_backend.h) declares: the modules' shared names
# (kernels/cuda/cuda_internal.cuh) stay hidden from its users, and nothing
# the header promises is missing. Needs nm (binutils).
# Exit 0 when the two lists agree, 1 otherwise (both printed), 77 without nm.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: tests/test_cuda_exports.sh LIB HEADER" >&2; exit 2; }
command -v nm >/dev/null || { echo "skipping: no nm"; exit 77; }
exported=$(nm -D --defined-only "$1" | awk '{ print $NF }' | sort -u)
declared=$(grep -oE '\bpa_[a-z_]+\(' "$2" | tr -d '(' | sort -u)
if [ "$exported" != "$declared" ]; then
  echo "test_cuda_exports: FAIL: $1 exports other names than $2 declares" >&2
  diff <(echo "$declared") <(echo "$exported") | sed 's/^</  declared, not exported:/; s/^>/  exported, not declared:/' | grep -v '^[0-9]' >&2
  exit 1
fi
echo "test_cuda_exports: $1 exports the $(echo "$exported" | wc -l) functions $2 declares, nothing else"
