#!/usr/bin/env bash
# scripts/cuda-resources.sh [ARCH]: what each kernel of kernels/cuda/*.cu
# costs a GPU, read from the compiler without one (the figures docs/CUDA.md
# quotes): for ARCH (default sm_90), ptxas's registers, stack and spills
# per kernel; and where nvdisasm is found (the CUDA toolkit's, on PATH or
# beside nvcc, or `pip install nvidia-cuda-nvdisasm`'s, named by NVDISASM),
# the tensor cores' attention kernels' tensor-core instructions (HMMA), their
# shared-memory loads (LDS) and their generic 32-bit loads (LD.E, how nvcc's
# warp matrix functions read fragments). Needs nvcc; builds nothing else.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARCH=${1:-sm_90}
[[ $ARCH =~ ^sm_[0-9]+$ ]] || { echo "usage: scripts/cuda-resources.sh [sm_NN]" >&2; exit 2; }
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
[ -x "$NVCC" ] || { echo "cuda-resources: no nvcc (on PATH or in /usr/local/cuda/bin)" >&2; exit 1; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
flags=(-O3 -DNDEBUG -std=c++17 -arch="$ARCH" -I"$ROOT/kernels" -I"$ROOT/kernels/cuda")

echo "== ptxas, $ARCH: registers, stack and spills a kernel"
for cu in "$ROOT"/kernels/cuda/*.cu; do
  "$NVCC" "${flags[@]}" -Xptxas -v -cubin "$cu" -o "$T/$(basename "$cu" .cu).cubin" 2>>"$T/ptxas.txt"
done
# "Function properties for NAME", then its stack and spill line, then "Used N registers"
awk '/Function properties for/ { sub(/.*Function properties for /, ""); name = $0 }
     /bytes stack frame/ { frame = $0; sub(/^ +/, "", frame) }
     /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); print substr($0, RSTART + 5, RLENGTH - 15) " registers, " frame ": " name }' \
  "$T/ptxas.txt" | c++filt | sed 's/(anonymous namespace):://g; s/palign_cuda:://g; s/(.*//' | sort -k1,1nr

NVDISASM=${NVDISASM:-$(command -v nvdisasm || echo "$(dirname "$NVCC")/nvdisasm")}
if [ ! -x "$NVDISASM" ]; then
  echo "== no nvdisasm (set NVDISASM, or pip install nvidia-cuda-nvdisasm): no instruction counts"
  exit 0
fi
echo "== $ARCH machine code of the attention kernels: instructions by kind"
"$NVDISASM" "$T/cuda_attention.cubin" >"$T/ops.sass"
awk '/^[ \t]*\.text\./ { name = $1; sub(/:$/, "", name); next }
     name ~ /k_attention_mma/ {
       for (i = 1; i <= NF; i++) {
         op = $i; sub(/;$/, "", op)
         if (op == "LD.E" || op ~ /^LDS(\.|$)/ || op ~ /^LDSM/ || op ~ /^HMMA/) {
           split(op, p, "."); k = (op == "LD.E") ? "LD.E (32-bit)" : p[1]
           n[(name ~ /mma_bf16/ ? "mma_bf16" : "mma_tf32") " " k]++
           break
         }
       }
     }
     END { for (k in n) print n[k], k }' "$T/ops.sass" | sort -k2
