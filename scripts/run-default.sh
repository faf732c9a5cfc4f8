#!/usr/bin/env bash
# The main job on the default model and the PAPI data: the fitting service
# (palign-worker) runs the ICL prompt baseline and PAS on the first SUBJECTS
# subjects into a store, shows its progress, and ends by printing the store's
# summary (the per-method, per-trait table with both PAS protocols and the
# model-free rows). Rerunning resumes: subjects already stored are skipped.
#
#   scripts/run-default.sh [SUBJECTS] [RANKS]      (after scripts/setup.sh)
#
# SUBJECTS defaults to 2 and RANKS to 1 (one process, all cores). RANKS > 1
# runs `mpirun -np RANKS` (rank 0 coordinates, the others work, cores split
# between them). The PAS alpha grid is PALIGN_ALPHAS (default 0,4 here, so
# that a first run on 2 cores stays within minutes; palign-worker's own
# default is PAS.md's 0,1,2,4,6,8). The store is results/store-default, or
# PALIGN_STORE.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${BUILD_DIR:-$ROOT/build}
MODEL=${PALIGN_MODEL:-${PALIGN_CACHE:-$HOME/.cache/palign}/SmolLM2-135M-Instruct.Q4_1.gguf}
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
SUBJECTS=${1:-2}
RANKS=${2:-1}
ALPHAS=${PALIGN_ALPHAS:-0,4}
STORE=${PALIGN_STORE:-$ROOT/results/store-default}

[ -x "$BUILD/palign-worker" ] || { echo "run-default: $BUILD/palign-worker is missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "run-default: the model $MODEL is missing; run scripts/setup.sh first" >&2; exit 1; }
[ -f "$PAPI/Test-set.json" ] || { echo "run-default: no PAPI data in $PAPI (set PALIGN_PAPI_DIR)" >&2; exit 1; }
mkdir -p "$(dirname "$STORE")"

args=(--model "$MODEL" --papi "$PAPI" --store "$STORE" --methods icl,pas --subjects "$SUBJECTS"
      --alphas "$ALPHAS")
if [ "$RANKS" -gt 1 ]; then
  cores=$(nproc)
  per=$(( cores / (RANKS - 1) )); [ "$per" -ge 1 ] || per=1
  # as root, Open MPI wants these; on a small machine ranks may outnumber cores
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  exec mpirun -np "$RANKS" "$BUILD/palign-worker" "${args[@]}" --threads "$per"
fi
exec "$BUILD/palign-worker" "${args[@]}"
