#!/usr/bin/env bash
# Forward-pass speed on the default model with 2 threads: prefill, decode,
# the fraction of a plain sgemm (measured in the same run), and a shared
# 1,600-token prefix against the naive full sequences.
#   bench/forward.sh [NAIVE]   NAIVE: full sequences to run (default 12, or all)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${PALIGN_MODEL:-${PALIGN_CACHE:-$HOME/.cache/palign}/SmolLM2-135M-Instruct.Q4_1.gguf}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
BIN=${BUILD_DIR:-$ROOT/build}/bench/bench_forward
[ -x "$BIN" ] || { echo "bench/forward.sh: build first (scripts/setup.sh)" >&2; exit 1; }
echo "# $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(uname -m) $(nproc) cores"
"$BIN" "$MODEL" "$PAPI" --threads 2 --naive "${1:-12}"
