#!/usr/bin/env bash
# Builds palign's libFuzzer harnesses (tests/fuzz/, clang with ASan and UBSan)
# and runs each for SECONDS, starting from the committed seed corpus.
#
#   scripts/fuzz.sh [SECONDS] [HARNESS ...]     (default 60 s each, every harness)
#
# Harnesses: gguf safetensors hfdir tokenizer papi store bank. The growing
# corpus is kept in build-fuzz/corpus/<harness>/ (rerun to continue from it),
# crashes in build-fuzz/crashes/<harness>/. Prints, per harness, the runs,
# the coverage reached and the corpus; exits 1 when any harness found a
# crash, leak or sanitizer report. SECONDS 0 only builds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}
SECONDS_EACH=${1:-60}
shift || true
HARNESSES=("$@")
[ ${#HARNESSES[@]} -gt 0 ] || HARNESSES=(gguf safetensors hfdir tokenizer papi store bank)

# clang with libFuzzer, the sanitizers and OpenMP (on Debian: clang libclang-rt-14-dev libomp-dev)
printf '#include <omp.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const unsigned char *d, size_t n) { (void)d, (void)n; return omp_get_thread_num(); }\n' |
  clang -x c - -o /dev/null -fsanitize=fuzzer,address,undefined -fopenmp 2>/dev/null ||
  { echo "fuzz.sh: clang cannot build a libFuzzer harness with OpenMP here (on Debian: apt-get install clang" \
         "libclang-rt-14-dev libomp-dev)" >&2; exit 1; }
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  CC=clang cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPALIGN_FUZZ=ON >/dev/null
fi
cmake --build "$BUILD" -j "$(nproc)" --target fuzz_all >/dev/null || {
  cmake --build "$BUILD" -j1 --target fuzz_all 2>&1 | tail -20; exit 1; }
[ "$SECONDS_EACH" -gt 0 ] || exit 0

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
printf '%-12s %10s %8s %8s %8s %s\n' harness runs cov ft corpus result
for h in "${HARNESSES[@]}"; do
  corpus=$BUILD/corpus/$h crashes=$BUILD/crashes/$h log=$BUILD/fuzz-$h.log
  mkdir -p "$corpus" "$crashes"
  cp -n "$ROOT/tests/fuzz/corpus/$h/"* "$corpus/" 2>/dev/null || true
  rc=0
  (cd "$crashes" && "$BUILD/tests/fuzz/fuzz_$h" -max_total_time="$SECONDS_EACH" -rss_limit_mb=3072 -timeout=30 \
     -print_final_stats=1 "$corpus") >"$log" 2>&1 || rc=$?
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  runs=$(echo "$done_line" | sed -n 's/^#\([0-9]*\).*/\1/p')
  cov=$(echo "$done_line" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  ft=$(echo "$done_line" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
  if [ $rc -eq 0 ]; then result=ok; else result="FOUND (rc $rc, see $log and $crashes)"; status=1; fi
  printf '%-12s %10s %8s %8s %8s %s\n' "$h" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$(ls "$corpus" | wc -l)" "$result"
done
exit $status
