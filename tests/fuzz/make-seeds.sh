#!/usr/bin/env bash
# Writes the committed seed corpus, tests/fuzz/corpus/<harness>/, from the
# harnesses themselves (each writes a valid input of its format when
# PALIGN_FUZZ_SEED_OUT names a file; see fuzz_util.h).
#
#   tests/fuzz/make-seeds.sh [BUILD_DIR]      (default build-fuzz; build it with scripts/fuzz.sh 0)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${1:-$ROOT/build-fuzz}/tests/fuzz
OUT=$ROOT/tests/fuzz/corpus
seed() { # seed HARNESS NAME [VAR=VALUE...]
  local h=$1 name=$2; shift 2
  mkdir -p "$OUT/$h"
  env "$@" PALIGN_FUZZ_SEED_OUT="$OUT/$h/$name" "$BIN/fuzz_$h" >/dev/null 2>&1
  [ -s "$OUT/$h/$name" ] || { echo "make-seeds: fuzz_$h wrote no seed $name" >&2; exit 1; }
}
# regression-* inputs (crashes once found) are kept; the seeds are overwritten
seed gguf llama
seed gguf qwen2 PALIGN_FUZZ_QWEN2=1
seed safetensors model
for k in 0 1 2; do seed hfdir "qwen2-file$k" PALIGN_FUZZ_SEED_FILE=$k; done
seed hfdir llama-file1 PALIGN_FUZZ_SEED_FILE=1 PALIGN_FUZZ_LLAMA=1
seed tokenizer chat
for k in 0 1 2 3 4; do seed papi "file$k" PALIGN_FUZZ_SEED_FILE=$k; done
seed store shard PALIGN_FUZZ_SEED_FILE=0
seed store manifest PALIGN_FUZZ_SEED_FILE=1
seed store index PALIGN_FUZZ_SEED_FILE=2
seed bank bank
du -sh "$OUT"
