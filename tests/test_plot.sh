#!/usr/bin/env bash
# tests/test_plot.sh BUILD_DIR: scripts/plot-store.py on a real store, made
# here by palign-worker (one process) from a tiny random model and the PAPI
# data: 3 subjects, methods none, pas, pas_only and the model-free rows.
#   1. every figure is written, as a PNG and an SVG that are what they say;
#   2. the per-alpha MAE the script computes equals the stored row at every
#      chosen alpha (the script checks; here, that it checked some);
#   3. figures.md lists every figure and the numbers;
#   4. a store that is not there fails with its name, and leaves no figure.
# Exit 0 when every check passed, 1 otherwise, 77 (skipped) without
# matplotlib unless PALIGN_REQUIRE_PLOT=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$(cd "${1:-$ROOT/build}" && pwd)
PAPI=${PALIGN_PAPI_DIR:-$ROOT/../shared/papi}
fail() {
  echo "test_plot: FAIL: $*" >&2
  exit 1
}

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  [ "${PALIGN_REQUIRE_PLOT:-0}" = 1 ] && fail "matplotlib is missing (apt-get install python3-matplotlib)"
  echo "test_plot: skipping: matplotlib is missing (apt-get install python3-matplotlib)"
  exit 77
fi
[ -f "$PAPI/Test-set.json" ] || {
  echo "test_plot: skipping: no PAPI data at $PAPI"
  exit 77
}
S=$(mktemp -d /tmp/palign-plot-XXXXXX)
trap 'rm -rf "$S"' EXIT

"$BUILD/palign" mkmodel "$S/m.gguf" --ctx 4096 --layers 1 --merges 800 --dim 32 --heads 2 --kv-heads 1 --ffn 64 \
  >"$S/mkmodel.log" 2>&1 || fail "mkmodel: $(cat "$S/mkmodel.log")"
# (in the sanitizer build, Open MPI's own allocations kept until exit are no
# finding of this test: leak checking is off for the worker alone)
ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
  "$BUILD/palign-worker" --model "$S/m.gguf" --papi "$PAPI" --store "$S/store" --subjects 3 --threads 1 \
  --methods none,pas,pas_only >"$S/worker.log" 2>&1 || fail "palign-worker: $(tail -20 "$S/worker.log")"

python3 "$ROOT/scripts/plot-store.py" "$S/store" --out "$S/figs" --palign "$BUILD/palign" --papi "$PAPI" \
  >"$S/plot.log" 2>&1 || fail "plot-store.py: $(cat "$S/plot.log")"
for f in mae-by-trait mae-vs-alpha alpha-chosen heads progress; do
  [ "$(head -c 8 "$S/figs/$f.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || fail "$f.png is not a PNG"
  grep -q '<svg' "$S/figs/$f.svg" || fail "$f.svg is not an SVG"
  grep -q "($f.png)" "$S/figs/figures.md" || fail "figures.md does not show $f"
done
grep -Eq 'equals the stored row in [1-9][0-9]* cases' "$S/plot.log" ||
  fail "the per-alpha MAE was never checked against a stored row: $(cat "$S/plot.log")"
grep -q 'mae-by-trait: none [0-9.]*; pas (reference)' "$S/figs/figures.md" || fail "figures.md lacks the MAE numbers"
grep -q 'progress: 3 subjects' "$S/figs/figures.md" || fail "figures.md: not 3 subjects in the progress"

if python3 "$ROOT/scripts/plot-store.py" "$S/nothing" --out "$S/figs2" --palign "$BUILD/palign" --papi "$PAPI" \
  >"$S/bad.log" 2>&1; then
  fail "a store that is not there was plotted"
fi
grep -q "$S/nothing" "$S/bad.log" || fail "the error does not name the store: $(cat "$S/bad.log")"
[ -z "$(ls "$S/figs2" 2>/dev/null)" ] || fail "figures were written for a store that is not there"
echo "test_plot: ok ($(grep -c '' "$S/figs/figures.md") lines of figures.md)"
