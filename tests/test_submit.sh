#!/usr/bin/env bash
# tests/test_submit.sh BUILD_DIR: scripts/palign-submit's arguments, without
# Slurm (--dry-run prints the sbatch command instead of running it):
#   1. every method palign knows (the list `palign eval --help` prints from
#      worker/methods.c) is accepted, so the script's own list cannot fall
#      behind, and reaches the job as PALIGN_METHODS;
#   2. bad arguments are refused with exit 2 and a message naming them.
# Exit 0 when every check passed, 1 otherwise.
set -euo pipefail

BUILD=$(cd "${1:?usage: tests/test_submit.sh BUILD_DIR}" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUBMIT=$ROOT/scripts/palign-submit
fail() {
  echo "test_submit: FAIL: $*" >&2
  exit 1
}
S=$(mktemp -d "${TMPDIR:-/tmp}/palign-submit-XXXXXX")
trap 'rm -rf "$S"' EXIT
touch "$S/model.gguf" "$S/Test-set.json"
base=(--dry-run --bin "$BUILD" --store "$S/store" --model "$S/model.gguf" --papi "$S")

# 1. palign's methods, as `palign eval --help` lists them (an indented name, then its description)
methods=$("$BUILD/palign" eval --help | sed -n '/--methods LIST/,/always reported/p' |
  sed -n 's/^                     \([a-z0-9_]\{1,\}\) .*/\1/p' | paste -sd, -)
[ "$(tr ',' '\n' <<<"$methods" | wc -l)" -ge 9 ] || fail "read only '$methods' from palign eval --help"
out=$("$SUBMIT" "${base[@]}" --methods "$methods" 2>&1) || fail "--methods $methods refused: $out"
[[ $out == *"PALIGN_METHODS=${methods//,/\\,}"* ]] || fail "PALIGN_METHODS is not $methods in: $out"

# 2. refusals: exit 2, the argument named
refused() { # WANT ARGS...
  local want=$1 rc=0
  shift
  out=$("$SUBMIT" "${base[@]}" "$@" 2>&1) || rc=$?
  [ $rc -eq 2 ] || fail "$* exited $rc, not 2: $out"
  [[ $out == *"$want"* ]] || fail "$*: not '$want' in: $out"
}
refused "unknown method 'bogus'" --methods icl,bogus
refused "--methods wants a comma-separated list" --methods "icl,,pas"
refused "--subjects 9-3: A is after B" --subjects 9-3
refused "--gpus-per-node wants a whole number" --gpus-per-node two
refused "with GPUs there is one worker per GPU" --gpus-per-node 2 --workers-per-node 3
refused "is not a Slurm time" --time soon
echo "test_submit: every check passed"
