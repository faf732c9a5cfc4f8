#!/usr/bin/env python3
"""Golden DPO loss and LoRA gradients for palign's trainer (runtime/train.c) and DPO loss
(worker/dpo.c), made by PyTorch with autograd on the same weights.

For each architecture (llama, qwen2) a tiny random model is written by `palign mkmodel`
(options recorded in the golden; tests/test_dpo.c writes the same model again), loaded by
Hugging Face transformers (float32, eager attention), and given a LoRA adapter on q_proj,
k_proj, v_proj and o_proj of every layer through forward hooks:
    y = proj(x) + scale * (x A^T) B^T,
with A and B drawn here (numpy default_rng) and stored. The batch is a shared prefix and three
sequences; sequence i is run whole (prefix + its tokens, no sharing: that is palign's
business), and its pair (chosen, rejected) is scored at the last position by log_softmax over
the whole vocabulary (palign computes only the two logits; the normaliser cancels). The
reference is the same model without the adapter. The DPO loss is the mean over the pairs of
    -logsigmoid(beta * ((lp(c) - lp_ref(c)) - (lp(r) - lp_ref(r)))),
and autograd gives its gradient with respect to every A and B.

Writes tests/golden/dpo/: cases.json (options, tokens, pairs, beta, the loss, each pair's
margin), <arch>.adapter.f32 (A and B in palign's layout: layer-major, targets q k v o, each A
[rank][in] then B [out][rank]) and <arch>.grad.f32 (the gradient, same layout).

Usage: python3 tests/golden/make_dpo_golden.py [--palign build/palign]
(needs torch, transformers, numpy, safetensors).
"""
import argparse
import json
import os
import subprocess
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "dpo")

MODEL = {"layers": 2, "dim": 32, "heads": 4, "kv_heads": 2, "ffn": 48, "seed": 21}
RANK, ALPHA, BETA = 4, 8.0, 0.5
PREFIX_LEN, SEQ_LENS = 10, [7, 3, 1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_shapes(cfg):
    hd = cfg.hidden_size // cfg.num_attention_heads
    q, kv, d = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.hidden_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}  # (in, out)


def run(arch, palign, rng):
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, arch)
        cmd = [palign, "mkmodel", d, "--format", "safetensors", "--arch", arch, "--layers", str(MODEL["layers"]),
               "--dim", str(MODEL["dim"]), "--heads", str(MODEL["heads"]), "--kv-heads", str(MODEL["kv_heads"]),
               "--ffn", str(MODEL["ffn"]), "--seed", str(MODEL["seed"])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        hf_logging.set_verbosity_error()
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    cfg = m.config
    V = cfg.vocab_size
    shapes = lora_shapes(cfg)
    scale = ALPHA / RANK
    params, flat = {}, []
    for l in range(cfg.num_hidden_layers):
        for t in TARGETS:
            fin, fout = shapes[t]
            a = (rng.uniform(-1, 1, (RANK, fin)) / np.sqrt(fin)).astype(np.float32)
            b = (rng.uniform(-0.5, 0.5, (fout, RANK))).astype(np.float32)
            A = torch.tensor(a, requires_grad=True)
            B = torch.tensor(b, requires_grad=True)
            params[(l, t)] = (A, B)
            flat += [A, B]
    enabled = {"on": False}

    def hook(l, t):
        def f(mod, args, out):
            if not enabled["on"]:
                return out
            A, B = params[(l, t)]
            return out + scale * (args[0] @ A.T) @ B.T
        return f

    for l, layer in enumerate(m.model.layers):
        for t in TARGETS:
            getattr(layer.self_attn, t).register_forward_hook(hook(l, t))
    prefix = [int(x) for x in rng.integers(3, V, PREFIX_LEN)]
    seqs = [[int(x) for x in rng.integers(3, V, n)] for n in SEQ_LENS]
    pairs = []
    for _ in seqs:
        c, r = (int(x) for x in rng.choice(np.arange(3, V), 2, replace=False))
        pairs.append((c, r))

    def logprobs(on):
        enabled["on"] = on
        out = []
        for s in seqs:
            logits = m(input_ids=torch.tensor([prefix + s]), use_cache=False).logits[0, -1]
            out.append(F.log_softmax(logits.double(), dim=-1))
        return out

    with torch.no_grad():
        ref = logprobs(False)
    pol = logprobs(True)
    losses, margins = [], []
    for (c, r), lp, lr in zip(pairs, pol, ref):
        margin = (lp[c] - lr[c]) - (lp[r] - lr[r])
        margins.append(float(margin))
        losses.append(-F.logsigmoid(BETA * margin))
    loss = torch.stack(losses).mean()
    loss.backward()
    adapter = np.concatenate([p.detach().numpy().ravel() for p in flat]).astype("<f4")
    grad = np.concatenate([p.grad.numpy().ravel() for p in flat]).astype("<f4")
    os.makedirs(OUT, exist_ok=True)
    adapter.tofile(os.path.join(OUT, f"{arch}.adapter.f32"))
    grad.tofile(os.path.join(OUT, f"{arch}.grad.f32"))
    print(arch, "loss", float(loss), "margins", margins, "max |grad|", float(np.abs(grad).max()))
    return {"arch": arch, "prefix": prefix, "seqs": seqs, "pairs": [list(p) for p in pairs], "loss": float(loss),
            "margins": margins, "adapter_file": f"{arch}.adapter.f32", "grad_file": f"{arch}.grad.f32",
            "n_floats": int(adapter.size), "max_abs_grad": float(np.abs(grad).max())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--palign", default=os.path.join(REPO, "build", "palign"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(2024)
    cases = [run(arch, args.palign, rng) for arch in ("llama", "qwen2")]
    import importlib.metadata as md
    doc = {"about": "DPO loss and LoRA gradients from PyTorch autograd on tiny palign mkmodel models "
                    "(tests/golden/make_dpo_golden.py)",
           "mkmodel": MODEL, "rank": RANK, "alpha": ALPHA, "beta": BETA,
           "layout": "adapter and grad files: float32 LE, layer-major, targets q k v o, each A [rank][in] then B "
                     "[out][rank]; pairs are (chosen, rejected) token ids scored at each sequence's last token; "
                     "sequence i runs after the prefix",
           "versions": {p: md.version(p) for p in ("torch", "transformers", "numpy")}, "cases": cases}
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
