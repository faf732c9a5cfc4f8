#!/usr/bin/env bash
# Time and tokens per subject per method on the default model (2 threads):
# the shared-prefix evaluator against the naive way (every prompt whole,
# --no-share), for the first subject of the PAPI test set.
#   bench/eval.sh [METHODS]   methods to run both ways (default none,p2; icl
#                             naively takes about an hour here)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODEL=${PALIGN_MODEL:-${PALIGN_CACHE:-$HOME/.cache/palign}/SmolLM2-135M-Instruct.Q4_1.gguf}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
BIN=${BUILD_DIR:-$ROOT/build}/palign
METHODS=${1:-none,p2}
[ -x "$BIN" ] || { echo "bench/eval.sh: build first (scripts/setup.sh)" >&2; exit 1; }
echo "# $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(uname -m) $(nproc) cores"
for share in shared naive; do
  flag=
  [ $share = naive ] && flag=--no-share
  "$BIN" eval --model "$MODEL" --papi "$PAPI" --methods "$METHODS" --subjects 1 --threads 2 $flag 2>/dev/null |
    awk -v s=$share '/ s per subject/ { printf "%-7s %s\n", s, $0 }'
done
