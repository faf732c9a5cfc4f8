#!/usr/bin/env python3
"""Golden PAS probes (PAS.md "PAS, step by step", steps 1-5) on the default model's real
activation bank, made by an independent implementation: scikit-learn's LogisticRegression.

STEP 1, THE BANK: Hugging Face transformers' LlamaForCausalLM (PyTorch, CPU, float32, eager
attention) loaded from the default GGUF exactly as make_forward_golden.py loads it. For each
train item in bank order (traits A, C, E, N, O; train_index order within a trait) two
sequences: the default system prompt, the item question with the item text as written (not
lowercased), and the assistant turn opened with "Option (" followed by the letter A (sequence
2i) or E (sequence 2i+1), rendered with make_tokenizer_golden.py's PAS.md construction and
SmolLM2's own chat template, tokenized by llama.cpp and Hugging Face tokenizers (they must
agree). The letter must be the last token (49 = A, 53 = E) and everything before it must be
the ids tokenizer/smollm2_papi.txt pins for the item ("orig" form). z[l][h] is o_proj's input
at that last token (forward pre-hook). Both sequences of an item run as one batch of two
(same length, no padding). Cross-check: the same hook on the forward golden's `item2` case
must give forward/item2.heads.f32 (within 1e-4: thread count and batch shape change the fp32
rounding).

Only HEADS (16 (layer, head) pairs spread over the model, in (layer, head) order) are
committed: the whole bank (240 x 30 x 9 x 64 float32, 16.6 MB) is too large.

STEPS 2-5 for the subjects Test-set.json[0, 1, 2], with RUN_SEED and TOP_K = 8 among the 16:
  labels  item with answer v not in {0, 3}: its A sequence gets label 1 if v > 3 else 0, its E
          sequence the other label; samples are those sequences in bank order.
  split   seed = mix64(RUN_SEED ^ fnv1a64(subject id as decimal text)); a splitmix64 stream
          from that seed drives Fisher-Yates over 0..n-1 (i from n-1 down to 1, j uniform in
          [0, i] by rejection: draw r until r >= 2^64 mod (i+1), j = r mod (i+1));
          n_val = ceil(0.4 n); the first n_val shuffled positions are validation, the rest train.
  probes  LogisticRegression(C=1.0, tol=1e-12, max_iter=100000, solver="newton-cholesky") on
          X = the float32 activations as float64. sklearn minimises 0.5|w|^2 + C sum log(1 +
          exp(-s (w.x + b))) with b unpenalised; the script checks this by the gradient of that
          objective at sklearn's solution (must be < 1e-8) and by a second solver (lbfgs).
          Accuracy: predict 1 iff w.x + b > 0 (sklearn's predict); score = (train + val acc)/2.
  heads   rank by the exact integer key train_correct * n_val + val_correct * n_train (=
          2 n_train n_val score), higher first, then lower layer, then lower head; heads whose
          direction is zero are skipped; the first TOP_K.
  dirs    mean of label-1 minus mean of label-0 samples over all labelled samples, unit
          length; sigma = population standard deviation of all labelled samples' projections.

No PAPI data is written: answers are read from the PAPI files by the C test too; the golden
stores per subject only the case id, sample count and a sha256 of the labels in bank order.

Writes tests/golden/probe/:
  bank.f32      [240][16][64] float32 LE: sequence (bank order), HEADS index, dimension
  probes.json   everything else (schema in docs/PROBES.md)

Usage (needs torch, transformers, gguf, numpy, llama-cpp-python, tokenizers, jinja2,
scikit-learn; the model and the PAPI files; no network):
  python3 tests/golden/make_probe_golden.py [--model PATH] [--papi DIR] [--threads 1]
      [--full-bank PATH]   also write the whole bank [240][30][9][64] float32 there, and
                           what its run reported to PATH.json (not committed; used to
                           time the C fit on all 270 heads)
      [--reuse PATH]       take the whole bank (and PATH.json) from a --full-bank run
                           instead of running the model again
      [--all-heads]        also fit all 270 heads of the three subjects with sklearn (K = 24)
                           into /tmp/palign_probe_allheads.json, to compare with the C fit
                           on the whole bank (docs/PROBES.md, "Measured agreement")
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "probe")
sys.path.insert(0, HERE)

# ---- what is computed ----
N_LAYERS, N_HEADS, HEAD_DIM = 30, 9, 64
HEADS = [(round(i * (N_LAYERS - 1) / 15), (4 * i + 1) % N_HEADS) for i in range(16)]
RUN_SEED = 1
SUBJECTS = [0, 1, 2]
TOP_K = 8
C = 1.0
TRAIT_ORDER = "ACENO"
LETTER_IDS = {"A": 49, "E": 53}

# ---- cross-check limits (the script stops past them) ----
LIMIT_ITEM2_HEADS = 1e-4   # hook on item2 vs forward/item2.heads.f32, absolute (|z| <= 5; fp32
                           # rounding differs with the thread count and batch shape)
LIMIT_GRAD = 1e-8          # gradient of the stated objective at sklearn's solution, max abs
LIMIT_LBFGS = 1e-4         # newton-cholesky vs lbfgs coefficients, max abs (lbfgs stops earlier)

M64 = (1 << 64) - 1


# ------------------------------------------------------------------------------------------
# the split (docs/PROBES.md; worker/probe.c implements the same)

def mix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & M64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & M64
    return z ^ (z >> 31)


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & M64

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        return mix64(self.s)

    def below(self, bound):
        """uniform in [0, bound): rejects the 2^64 mod bound lowest draws."""
        threshold = (1 << 64) % bound
        while True:
            r = self.next()
            if r >= threshold:
                return r % bound


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def split_seed(run_seed, subject_id):
    return mix64((run_seed ^ fnv1a64(subject_id.encode("utf-8"))) & M64)


def shuffle(n, seed):
    perm = list(range(n))
    rng = SplitMix64(seed)
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def n_val_of(n):
    return (2 * n + 4) // 5  # ceil(0.4 n), exactly


# ------------------------------------------------------------------------------------------
# step 1: the bank

def bank_items(papi_dir):
    import csv
    with open(os.path.join(papi_dir, "ipip_neo_300_items.csv"), newline="", encoding="utf-8") as f:
        trait = {int(r["item"]): r["trait"] for r in csv.DictReader(f)}
    with open(os.path.join(papi_dir, "mpi_300_split.json"), encoding="utf-8") as f:
        train = json.load(f)["train_index"]
    return [i for t in TRAIT_ORDER for i in train if trait[i] == t]


def compute_bank(model_path, papi_dir, order, threads):
    import torch
    import make_forward_golden as fg
    import make_tokenizer_golden as tg
    torch.set_num_threads(threads)
    ll, hf, template = tg.smollm2_references(model_path)
    chat = tg.Chat("smollm2", template, "<|im_start|>", "<|im_end|>", "<|im_end|>\n")
    items, _, _ = tg.papi(papi_dir)
    pinned = fg.parse_papi_golden(os.path.join(HERE, "tokenizer", "smollm2_papi.txt"))
    m = fg.load_hf(model_path, torch.float32)
    cfg = m.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim) == (N_LAYERS, N_HEADS, HEAD_DIM)

    captured = [None] * N_LAYERS
    handles = []
    for l, layer in enumerate(m.model.layers):
        def pre(mod, args, l=l):
            captured[l] = args[0][:, -1].detach().numpy().copy()  # [batch, H*hd] float32
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))

    def run(batch_ids):
        with torch.no_grad():
            m.model(input_ids=torch.tensor(batch_ids), use_cache=False)
        return np.stack(captured, axis=1).reshape(len(batch_ids), N_LAYERS, N_HEADS, HEAD_DIM)

    # cross-check: the forward golden's item2 heads
    item2 = json.load(open(os.path.join(HERE, "forward", "cases.json")))
    case = next(c for c in item2["cases"] if c["name"] == "item2")
    ref = np.fromfile(os.path.join(HERE, "forward", "item2.heads.f32"), dtype="<f4").reshape(N_LAYERS, N_HEADS,
                                                                                              HEAD_DIM)
    d_item2 = float(np.abs(run([case["token_ids"]])[0] - ref).max())
    if d_item2 > LIMIT_ITEM2_HEADS:
        sys.exit(f"item2 heads differ from forward/item2.heads.f32 by {d_item2}")

    bank = np.empty((2 * len(order), N_LAYERS, N_HEADS, HEAD_DIM), dtype=np.float32)
    n_tokens = []
    t0 = time.time()
    for k, i in enumerate(order):
        seqs = []
        for letter in "AE":
            text = chat.render(tg.SYSTEM_PROMPT, tg.ITEM_TEMPLATE.format(items[i]), tg.PREFIX + letter)
            ids = tg.encode_both(ll, hf, text, True)
            if ids[:-1] != pinned[("item", i, "orig")] or ids[-1] != LETTER_IDS[letter]:
                sys.exit(f"item {i} {letter}: ids are not the pinned prompt + the letter")
            seqs.append(ids)
        bank[2 * k:2 * k + 2] = run(seqs)
        n_tokens.append(len(seqs[0]))
    for h in handles:
        h.remove()
    return bank, {"torch_threads": torch.get_num_threads(), "item2_heads_max_abs_diff": d_item2, "n_tokens_min": min(n_tokens),
                  "n_tokens_max": max(n_tokens), "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------
# steps 2-5

def labels_of(answers):
    """answers in bank order -> (sample sequence indices, labels)."""
    seqs, labels = [], []
    for k, v in enumerate(answers):
        if v in (0, 3):
            continue
        a = 1 if v > 3 else 0
        seqs += [2 * k, 2 * k + 1]
        labels += [a, 1 - a]
    return np.array(seqs, dtype=np.int64), np.array(labels, dtype=np.int64)


def objective_grad(X, y, w, b):
    m = X @ w + b
    p = 0.5 * (1 + np.tanh(0.5 * m))  # sigmoid, stable
    r = p - y
    return np.concatenate([w + C * (X.T @ r), [C * r.sum()]])


def fit_head(X, y, tr, va):
    from sklearn.linear_model import LogisticRegression
    res = {}
    clf = LogisticRegression(C=C, tol=1e-12, max_iter=100000, solver="newton-cholesky")
    clf.fit(X[tr], y[tr])
    w, b = clf.coef_[0].astype(np.float64), float(clf.intercept_[0])
    g = objective_grad(X[tr], y[tr], w, b)
    if np.abs(g).max() > LIMIT_GRAD:
        sys.exit(f"sklearn's solution is not the stated objective's optimum: gradient {np.abs(g).max()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lb = LogisticRegression(C=C, tol=1e-12, max_iter=100000, solver="lbfgs").fit(X[tr], y[tr])
    d_lbfgs = float(max(np.abs(lb.coef_[0] - w).max(), abs(lb.intercept_[0] - b)))
    if d_lbfgs > LIMIT_LBFGS:
        sys.exit(f"lbfgs and newton-cholesky disagree by {d_lbfgs}")
    # sklearn's predict: class 1 iff the decision function is > 0
    pred = clf.predict(X)
    assert np.array_equal(pred, (X @ w + b > 0).astype(np.int64))
    margin = X @ w + b
    res.update(coef=w, intercept=b, train_correct=int((pred[tr] == y[tr]).sum()),
               val_correct=int((pred[va] == y[va]).sum()), grad_max=float(np.abs(g).max()),
               lbfgs_max_abs_diff=d_lbfgs, min_abs_margin=float(np.abs(margin).min()))
    return res


def direction(X, y):
    diff = X[y == 1].mean(axis=0) - X[y == 0].mean(axis=0)
    nrm = np.sqrt((diff * diff).sum())
    if nrm == 0:
        return None, 0.0
    u = diff / nrm
    return u, float(np.std(X @ u))  # population (ddof = 0)


def fit_subject(bank, answers, subject_id, heads, top_k=TOP_K):
    """bank [n_seq][n_heads_listed][hd] float32; heads: (layer, head) per column."""
    seqs, y = labels_of(answers)
    n = len(seqs)
    perm = shuffle(n, split_seed(RUN_SEED, subject_id))
    nv = n_val_of(n)
    va, tr = np.array(perm[:nv]), np.array(perm[nv:])
    nt = n - nv
    out = {"n_samples": n, "n_train": nt, "n_val": nv, "perm": perm,
           "labels_sha256": hashlib.sha256(bytes(y.astype(np.uint8))).hexdigest(), "probes": []}
    keys = []
    for c, (l, h) in enumerate(heads):
        X = bank[seqs, c, :].astype(np.float64)
        r = fit_head(X, y, tr, va)
        r["train_acc"], r["val_acc"] = r["train_correct"] / nt, r["val_correct"] / nv
        r["score"] = (r["train_acc"] + r["val_acc"]) / 2
        r["layer"], r["head"] = l, h
        out["probes"].append(r)
        keys.append((-(r["train_correct"] * nv + r["val_correct"] * nt), l, h, c))
    top = []
    for _, l, h, c in sorted(keys):
        if len(top) == top_k:
            break
        u, sigma = direction(bank[seqs, c, :].astype(np.float64), y)
        if u is None:
            continue
        top.append({"index": c, "layer": l, "head": h, "direction": u, "sigma": sigma})
    out["top"] = top
    return out


# ------------------------------------------------------------------------------------------

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def versions():
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in
                     ["torch", "transformers", "gguf", "numpy", "scikit-learn", "llama_cpp_python", "tokenizers"])


def jsonable(o):
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return [jsonable(v) for v in o.tolist()]
    if isinstance(o, (np.floating, float)):
        return float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def main():
    ap = argparse.ArgumentParser()
    cache = os.environ.get("PALIGN_CACHE") or os.path.expanduser("~/.cache/palign")
    ap.add_argument("--model", default=os.environ.get("PALIGN_MODEL") or
                    os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--papi", default=os.environ.get("PALIGN_PAPI_DIR") or
                    os.path.join(REPO, "..", "shared", "papi"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full-bank")
    ap.add_argument("--reuse")
    ap.add_argument("--all-heads", action="store_true")
    a = ap.parse_args()

    order = bank_items(a.papi)
    assert len(order) == 120
    if a.reuse:
        bank = np.fromfile(a.reuse, dtype="<f4").reshape(2 * len(order), N_LAYERS, N_HEADS, HEAD_DIM)
        with open(a.reuse + ".json", encoding="utf-8") as f:  # what the run that made it reported
            bank_info = json.load(f)
    else:
        bank, bank_info = compute_bank(a.model, a.papi, order, a.threads)
        if a.full_bank:
            bank.astype("<f4").tofile(a.full_bank)
            with open(a.full_bank + ".json", "w", encoding="utf-8") as f:
                json.dump(bank_info, f)
    print("bank:", bank_info, file=sys.stderr)

    sub = np.ascontiguousarray(np.stack([bank[:, l, h, :] for l, h in HEADS], axis=1)).astype("<f4")
    os.makedirs(OUT, exist_ok=True)
    bank_path = os.path.join(OUT, "bank.f32")
    sub.tofile(bank_path)

    with open(os.path.join(a.papi, "Test-set.json"), encoding="utf-8") as f:
        subjects = json.load(f)
    doc = {
        "description": "PAS probes (PAS.md steps 1-5) on the default model's activation bank, "
                       "restricted to 16 heads; reference: scikit-learn LogisticRegression",
        "script": "tests/golden/make_probe_golden.py", "versions": versions(),
        "model": os.path.basename(a.model), "model_sha256": sha256(a.model),
        "bank": {"file": "bank.f32", "shape": list(sub.shape), "sha256": sha256(bank_path),
                 "items": order, "heads": HEADS, **bank_info},
        "run_seed": RUN_SEED, "top_k": TOP_K, "C": C,
        "sklearn": "LogisticRegression(C=1.0, tol=1e-12, max_iter=100000, solver='newton-cholesky')",
        "subjects": [],
    }
    t_fit = time.time()
    for s in SUBJECTS:
        sid = str(subjects[s]["case"])
        answers = [int(subjects[s][f"i{i}"]) for i in order]
        r = fit_subject(sub, answers, sid, HEADS)
        doc["subjects"].append({"index": s, "id": sid, "split_seed": f"{split_seed(RUN_SEED, sid):016x}", **r})
        print(f"subject {s} ({sid}): n={r['n_samples']} top={[t['index'] for t in r['top']]} "
              f"scores={[round(p['score'], 4) for p in r['probes']]}", file=sys.stderr)
    doc["fit_seconds"] = round(time.time() - t_fit, 2)
    pr = [p for s in doc["subjects"] for p in s["probes"]]
    doc["checks"] = {"max_grad": max(p["grad_max"] for p in pr),
                     "max_lbfgs_abs_diff": max(p["lbfgs_max_abs_diff"] for p in pr),
                     "min_abs_margin": min(p["min_abs_margin"] for p in pr),
                     "max_abs_coef": max(float(np.abs(p["coef"]).max()) for p in pr)}
    print("checks:", doc["checks"], file=sys.stderr)
    with open(os.path.join(OUT, "probes.json"), "w", encoding="utf-8") as f:
        json.dump(jsonable(doc), f, indent=None, separators=(",", ":"))
        f.write("\n")

    if a.all_heads:
        all_heads = [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]
        full = bank.reshape(bank.shape[0], N_LAYERS * N_HEADS, HEAD_DIM)
        res = []
        for s in SUBJECTS:
            sid = str(subjects[s]["case"])
            answers = [int(subjects[s][f"i{i}"]) for i in order]
            t0 = time.time()
            r = fit_subject(full, answers, sid, all_heads, top_k=24)
            res.append({"id": sid, "seconds": time.time() - t0, **r})
        with open("/tmp/palign_probe_allheads.json", "w") as f:
            json.dump(jsonable(res), f)
        print("all heads: /tmp/palign_probe_allheads.json", file=sys.stderr)


if __name__ == "__main__":
    main()
