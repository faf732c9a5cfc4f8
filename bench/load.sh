#!/usr/bin/env bash
# Load time and peak memory of the default model (or MODEL), 2 threads' worth
# of machine, medians over 5 repeats; the baseline is a plain read of the file.
#   bench/load.sh [MODEL]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${1:-${PALIGN_CACHE:-$HOME/.cache/palign}/SmolLM2-135M-Instruct.Q4_1.gguf}
BIN=${BUILD_DIR:-$ROOT/build}/bench/bench_load
[ -x "$BIN" ] || { echo "bench/load.sh: build first (scripts/setup.sh)" >&2; exit 1; }
echo "# $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(uname -m) $(nproc) cores"
echo "# model $MODEL"
"$BIN" "$MODEL" 5
