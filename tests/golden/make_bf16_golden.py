#!/usr/bin/env python3
"""Writes tests/golden/bf16/round.tsv: fp32 bit patterns and the bf16 that
PyTorch rounds each to (torch.Tensor.bfloat16: round to nearest, ties to
even), the reference for backend.h's pa_bf16_from_f32 (test_ops).

The patterns: zeros, the smallest and largest normals and subnormals,
infinities, values exactly halfway between two bf16 values (both parities:
ties go to the even one), a bit above and below halfway, values that round
up into the next exponent and into infinity, and 2,000 random finite ones.
NaN is left out: palign keeps a NaN a quiet NaN of its sign; torch makes
every NaN 0x7FC0.

    python3 tests/golden/make_bf16_golden.py   # needs torch, numpy
"""
import os

import numpy as np
import torch

def patterns():
    fixed = [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,
             0x7F800000, 0xFF800000, 0x3F800000, 0xBF800000, 0x7F7F8000, 0x7F7FFFFF, 0x3F807FFF,
             0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x3FFF8000, 0x3FFFFFFF, 0xBFFF8000,
             0x00008000, 0x00018000, 0x0000FFFF, 0x80018000]
    for hi in (0x3F80, 0x3F81, 0x4049, 0xC049, 0x0001, 0x7F00):  # around halfway, both parities
        for lo in (0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF):
            fixed.append((hi << 16) | lo)
    rs = np.random.RandomState(20261203)
    rand = rs.randint(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32)
    rand = [int(u) for u in rand if (u & 0x7F800000) != 0x7F800000][:2000]  # finite only
    return fixed + rand

def main():
    pats = np.array(patterns(), dtype=np.uint32)
    f = torch.from_numpy(pats.view(np.float32).copy())
    b = f.bfloat16().view(torch.int16).numpy().astype(np.uint16)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bf16", "round.tsv")
    with open(out, "w") as fh:
        fh.write("# fp32 bits\tbf16 bits (torch %s, round to nearest even)\n" % torch.__version__)
        for p, q in zip(pats, b):
            fh.write("%08x\t%04x\n" % (int(p), int(q)))
    print("wrote %d values to %s" % (len(pats), out))

if __name__ == "__main__":
    main()
