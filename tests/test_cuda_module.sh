#!/usr/bin/env bash
# tests/test_cuda_module.sh BUILD_DIR: palign refuses a CUDA backend library
# it cannot use, naming the file and the reason, and runs nothing on it
# (kernels/backends.c), in any build (the libraries are stand-ins,
# tests/cuda_stale_module.c, which say a device is there):
#   1. one built against another backend.h (its pa_cuda_backend_bytes is not
#      this palign's sizeof(pa_backend)): "was built for another palign",
#      with both sizes;
#   2. one without pa_cuda_backend_bytes (built before the check): "cannot be
#      loaded", the missing symbol named;
#   3. a file that is not a library: "cannot be loaded", the loader's reason;
# each with --backend cuda (an error, exit 1); with --backend auto the run
# goes on on the CPU, as where no backend can be loaded.
# Exit 0 when every check passed, 1 otherwise.
set -euo pipefail

BUILD=$(cd "${1:?usage: tests/test_cuda_module.sh BUILD_DIR}" && pwd)
fail() {
  echo "test_cuda_module: FAIL: $*" >&2
  exit 1
}
S=$(mktemp -d "${TMPDIR:-/tmp}/palign-cuda-module-XXXXXX")
trap 'rm -rf "$S"' EXIT
"$BUILD/palign" mkmodel "$S/m.gguf" --layers 1 --dim 32 --heads 2 --kv-heads 1 --ffn 64 --seed 3 >"$S/mkmodel.log" 2>&1 ||
  fail "mkmodel: $(cat "$S/mkmodel.log")"
echo "not a library" >"$S/not-a-library.so"
stale=$BUILD/tests/libpalign_cuda_stale.so old=$BUILD/tests/libpalign_cuda_old.so
for want in "$stale|was built for another palign: its operation table is 8 bytes, this palign's " \
  "$old|cannot be loaded: $old: undefined symbol: pa_cuda_backend_bytes" \
  "$S/not-a-library.so|the CUDA backend ($S/not-a-library.so) cannot be loaded: $S/not-a-library.so: "; do
  module=${want%%|*} said=${want#*|}
  [ -e "$module" ] || fail "no $module"
  if PALIGN_CUDA_MODULE=$module "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi --max-tokens 1 \
    --backend cuda >"$S/out.log" 2>&1; then
    fail "--backend cuda ran on $module: $(cat "$S/out.log")"
  else
    rc=$?
  fi
  [ $rc -eq 1 ] || fail "--backend cuda on $module: exit $rc (a crash?): $(cat "$S/out.log")"
  grep -qF -- "$said" "$S/out.log" || fail "--backend cuda on $module: not '$said' in: $(cat "$S/out.log")"
  PALIGN_CUDA_MODULE=$module "$BUILD/palign" generate --model "$S/m.gguf" --prompt Hi --max-tokens 1 \
    --backend auto >"$S/auto.log" 2>&1 || fail "--backend auto with $module: $(cat "$S/auto.log")"
  echo "refused: $(grep -F -- "$said" "$S/out.log")"
done
echo "test_cuda_module: passed"
