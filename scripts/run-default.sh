#!/usr/bin/env bash
# The main job on the default model and the PAPI data, as far as palign has
# grown: describe the model, then show the first PAPI item question exactly as
# the model will see it (chat template, system prompt, open assistant turn).
# As the fitting service lands this becomes `mpirun palign-worker ...`.
#   scripts/run-default.sh        (after scripts/setup.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BUILD_DIR:-$ROOT/build}/palign
MODEL=${PALIGN_MODEL:-${PALIGN_CACHE:-$HOME/.cache/palign}/SmolLM2-135M-Instruct.Q4_1.gguf}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}

[ -x "$BIN" ] || { echo "run-default: $BIN is missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "run-default: the model $MODEL is missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$PAPI/ipip_neo_300_items.csv" ] || { echo "run-default: no PAPI data in $PAPI (set PALIGN_PAPI_DIR)" >&2; exit 1; }

"$BIN" inspect "$MODEL" --no-tensors
# item 1 of the inventory, asked as PAS.md's item question
text=$(awk -F, 'NR == 2 { print $NF }' "$PAPI/ipip_neo_300_items.csv")
question=$(printf 'Given a statement of you: "You %s."\nPlease choose from the following options to identify how accurately this statement describes you.\nOptions:\n(A). Very Accurate\n(B). Moderately Accurate\n(C). Neither Accurate Nor Inaccurate\n(D). Moderately Inaccurate\n(E). Very Inaccurate\n' "${text,}")
echo
"$BIN" tokenize "$MODEL" "$question" --chat --system "You are a helpful, honest and concise assistant." --prefix "Option ("
