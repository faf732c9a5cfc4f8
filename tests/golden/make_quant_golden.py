#!/usr/bin/env python3
"""Golden values for palign's dequantisers, computed by an independent implementation.

The reference is the `gguf` Python package (gguf-py, maintained with llama.cpp),
whose numpy dequantisers are written independently of palign's C code.

Writes, for each block type, tests/golden/quant/<TYPE>.raw (random blocks with
finite fp16 scales) and <TYPE>.f32 (the reference's fp32 values, little-endian).
With --model MODEL.gguf it also writes tests/golden/default_model_tensors.tsv:
name, type, shape and the SHA-256 of every tensor dequantised to fp32, so the
C test can demand bit-identical results on the real model without committing
any of its weights.

Usage: python3 make_quant_golden.py [--model PATH]   (needs: pip install gguf numpy)
"""
import argparse
import hashlib
import importlib.metadata
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))

# byte offsets of the fp16 scale fields in each block, which must hold finite values
SCALE_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
N_BLOCKS = 12


def random_blocks(rng, qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N_BLOCKS, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        # scales from 1e-4 to 1 with random sign, as real models have
        scale = (rng.uniform(1e-4, 1.0, N_BLOCKS) * rng.choice([-1, 1], N_BLOCKS)).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(N_BLOCKS, 2)
    # one block with a subnormal scale and one with a zero scale: edge cases of fp16
    raw[0, SCALE_FIELDS[qtype][0]:SCALE_FIELDS[qtype][0] + 2] = np.array([0x01, 0x00], np.uint8)
    raw[1, SCALE_FIELDS[qtype][0]:SCALE_FIELDS[qtype][0] + 2] = np.array([0x00, 0x80], np.uint8)
    return raw


def write_blocks():
    rng = np.random.default_rng(20261126)
    out = os.path.join(HERE, "quant")
    os.makedirs(out, exist_ok=True)
    for qtype in SCALE_FIELDS:
        raw = random_blocks(rng, qtype)
        vals = dequantize(raw.reshape(-1), qtype).astype("<f4").reshape(-1)
        raw.tofile(os.path.join(out, qtype.name + ".raw"))
        vals.tofile(os.path.join(out, qtype.name + ".f32"))
    # plain float types: random bit patterns that are finite
    halves = rng.integers(0, 0x10000, 4096, dtype=np.uint16)
    halves = halves[np.isfinite(halves.view(np.float16))][:2048]
    halves.astype("<u2").tofile(os.path.join(out, "F16.raw"))
    halves.view(np.float16).astype("<f4").tofile(os.path.join(out, "F16.f32"))
    bf = halves.astype(np.uint32) << 16
    halves.astype("<u2").tofile(os.path.join(out, "BF16.raw"))
    bf.astype("<u4").view("<f4").tofile(os.path.join(out, "BF16.f32"))


def write_model_hashes(path):
    reader = gguf.GGUFReader(path)
    rows = []
    for t in reader.tensors:
        vals = dequantize(t.data, t.tensor_type).astype("<f4")
        shape = "x".join(str(int(d)) for d in t.shape)  # fastest dimension first, as GGUF lists it
        rows.append(f"{t.name}\t{t.tensor_type.name}\t{shape}\t{hashlib.sha256(vals.tobytes()).hexdigest()}\n")
    with open(os.path.join(HERE, "default_model_tensors.tsv"), "w") as f:
        f.write("# name\ttype\tshape (fastest first)\tsha256 of fp32 values, from gguf-py %s\n" % importlib.metadata.version("gguf"))
        f.writelines(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="the default model's GGUF file")
    args = ap.parse_args()
    write_blocks()
    if args.model:
        write_model_hashes(args.model)
