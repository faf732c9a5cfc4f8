#!/usr/bin/env python3
"""Golden AdamW steps for palign's optimiser (the backends' adamw, kernels/backend.h, with the
constants runtime/train.c's pa_adamw_constants makes), made by PyTorch's torch.optim.AdamW.

For each case, one float32 parameter tensor of N values (numpy default_rng, seeded here) takes
STEPS steps of torch.optim.AdamW (the single-tensor implementation: foreach=False,
fused=False, on the CPU) with the case's options, each from a gradient drawn here: entries of
magnitudes 1e-9 to 1e2, every seventh exactly zero, so that the square root's floor (eps), the
weight decay alone and large steps are all met. After every step the parameter and the
optimiser's exp_avg and exp_avg_sq (palign's w, m and v) are stored.

PyTorch computes each operation in float32; palign computes each element's step in double
and rounds once, so the two agree to a few float32 roundings per step, not to the bit
(tests/test_train.c states the tolerance).

Writes tests/golden/adamw/cases.json: for each case its options, w0, and per step the gradient
and w, m, v after it. Every float is a float32 value, written so that it reads back exactly.

Usage: python3 tests/golden/make_adamw_golden.py (needs torch and numpy).
"""
import json
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "adamw")
N, STEPS = 64, 6

CASES = [
    # palign's DPO defaults (worker/dpo.c), with a weight decay so that it is exercised
    {"name": "dpo", "lr": 1e-3, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    # short memories, a large rate, decay and floor: every term matters
    {"name": "stressed", "lr": 0.05, "weight_decay": 0.5, "beta1": 0.5, "beta2": 0.9, "eps": 1e-3},
]


def f32(a):
    """float32 values as Python floats (exact), for JSON."""
    return [float(x) for x in np.asarray(a, dtype=np.float32).ravel()]


def gradient(rng):
    g = rng.uniform(-1, 1, N) * 10.0 ** rng.integers(-9, 3, N)
    g[::7] = 0
    return g.astype(np.float32)


def run(case, rng):
    w0 = rng.standard_normal(N).astype(np.float32)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=case["lr"], betas=(case["beta1"], case["beta2"]), eps=case["eps"],
                            weight_decay=case["weight_decay"], foreach=False, fused=False)
    steps = []
    for _ in range(STEPS):
        g = gradient(rng)
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        st = opt.state[p]
        steps.append({"g": f32(g), "w": f32(p.detach().numpy()), "m": f32(st["exp_avg"].numpy()),
                      "v": f32(st["exp_avg_sq"].numpy())})
    return dict(case, w0=f32(w0), steps=steps)


def main():
    torch.set_num_threads(1)
    rng = np.random.default_rng(20261207)
    os.makedirs(OUT, exist_ok=True)
    out = {"torch": torch.__version__, "n": N, "cases": [run(c, rng) for c in CASES]}
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
