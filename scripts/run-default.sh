#!/usr/bin/env bash
# The main job on the default model and the PAPI data, as far as palign has
# grown: evaluate the prompt baselines (none, icl, p2) beside the model-free
# rows on the first SUBJECTS subjects (default 1; about 4 minutes per subject
# on 2 cores), print the table, and keep every prediction in results/.
# PAS and the MPI service (`mpirun palign-worker`) take this over as they land.
#   scripts/run-default.sh [SUBJECTS]      (after scripts/setup.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BUILD_DIR:-$ROOT/build}/palign
MODEL=${PALIGN_MODEL:-${PALIGN_CACHE:-$HOME/.cache/palign}/SmolLM2-135M-Instruct.Q4_1.gguf}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
SUBJECTS=${1:-1}
OUT=${PALIGN_RESULTS:-$ROOT/results}

[ -x "$BIN" ] || { echo "run-default: $BIN is missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "run-default: the model $MODEL is missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$PAPI/Test-set.json" ] || { echo "run-default: no PAPI data in $PAPI (set PALIGN_PAPI_DIR)" >&2; exit 1; }
mkdir -p "$OUT"

"$BIN" inspect "$MODEL" --no-tensors
echo
"$BIN" eval --model "$MODEL" --papi "$PAPI" --methods none,icl,p2 --subjects "$SUBJECTS" \
  --json "$OUT/eval-default.json"
echo "predictions, metrics and settings: $OUT/eval-default.json"
