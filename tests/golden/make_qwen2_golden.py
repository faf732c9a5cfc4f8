#!/usr/bin/env python3
"""Goldens for palign's qwen2 architecture (Qwen2 / Qwen2.5: Llama plus biases on the Q, K and V
projections, rotate-half RoPE also in GGUF files), made by independent implementations.

  tiny --palign CMD
      tests/golden/qwen2_tiny/: a tiny random qwen2 model written by `CMD mkmodel --arch qwen2
      --format safetensors` with the options recorded in cases.json (test_qwen2.c writes the same
      model again, in both formats), run by Hugging Face transformers' Qwen2ForCausalLM (PyTorch,
      CPU, float32, eager attention) on that directory: logits and head outputs (o_proj's input)
      of fixed token sequences, one of them steered. Cross-checks (the script stops if one fails):
      transformers in float64 (its float32 islands lifted) against an own numpy float64 Qwen2
      written here from the equations; the tokenizer.json palign wrote, loaded by `tokenizers`,
      gives the case's token ids.

  real [--model PATH] [--papi DIR]
      The real model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF; scripts/setup.sh --model
      qwen2.5-0.5b fetches it):
      tests/golden/forward-qwen2/   logits and head outputs as tests/golden/forward/ holds them for
                                    SmolLM2 (schema in README-forward.md), from transformers'
                                    Qwen2ForCausalLM built by from_pretrained(gguf_file=...);
      tests/golden/tokenizer/qwen2_papi.txt, qwen2_strings.txt
                                    token ids of every PAS item question (both cases), three ICL
                                    prompts and hand-written strings: llama.cpp (the golden for
                                    GGUF), Hugging Face tokenizers rebuilt from the GGUF's
                                    vocabulary with Qwen2's pre-tokenizer, and transformers' own
                                    GGUF tokenizer conversion must all agree;
      tests/golden/tokenizer/chat_qwen2.json
                                    the model's chat template and prompts jinja2 renders with it.
      Cross-checks of the forward goldens (the script stops if one fails): gguf-py's dequantised
      tensors equal transformers' state dict bit for bit with no Q/K permutation undone (qwen2
      GGUF files keep Hugging Face's row order); transformers in float64; an own numpy float64
      Qwen2 on the GGUF tensors; the same numpy code in float32; llama.cpp on an F32 copy of the
      GGUF (F32 KV cache, every position); steering as an o_proj-input displacement equals a bias
      W_o delta after o_proj.

Needs: pip install torch transformers gguf numpy safetensors tokenizers jinja2 llama-cpp-python
(no network once installed). Two runs give byte-identical .f32 files.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import make_forward_golden as fg  # noqa: E402  (hf_forward, float64 lifting, llama.cpp helpers)
import make_tokenizer_golden as tg  # noqa: E402  (PAS prompts, Chat, line formats)

MODEL_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")

# the tiny model: palign mkmodel options (test_qwen2.c reads them from cases.json)
TINY = {"arch": "qwen2", "layers": 3, "dim": 96, "heads": 6, "kv_heads": 2, "ffn": 160, "seed": 11,
        "rope_theta": 1000000.0, "norm_eps": 1e-6, "tied": False}
TINY_PAIRS = [(0, 1), (2, 4)]
TINY_LONG = 300  # tokens of the long random case: RoPE at many positions

REAL_PAIRS = [(2, 0), (9, 5), (16, 13), (23, 7)]  # (layer, head) of the steered case
ICL_MIN_TOKENS = 1500
ICL_POSITIONS = [1000]

# cross-check limits (the script stops past them)
LIMIT_NUMPY_VS_HF64 = 1e-7  # two float64 implementations, absolute
LIMIT_FP32_VS_FP64 = 2e-3   # float32 golden against float64, last-position logits, absolute
LIMIT_LLAMACPP = 4e-3       # llama.cpp F32 against the golden, logits, absolute, every position
LIMIT_NUMPY32 = 2e-3        # own numpy float32 Qwen2 against the golden, absolute
LIMIT_STEER_FORMS = 2e-3    # pre-hook displacement against post-o_proj bias, float32, absolute

log_t0 = time.time()


def log(*a):
    print(f"[{time.time() - log_t0:7.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------
# own numpy Qwen2 (Hugging Face names and row order; rotate-half RoPE; Q/K/V biases)

class NumpyQwen2:
    def __init__(self, w, n_layers, n_heads, n_kv, theta, eps, dtype=np.float64):
        self.w = {k: v.astype(dtype) for k, v in w.items()}
        self.L, self.H, self.KV, self.theta, self.eps, self.dtype = n_layers, n_heads, n_kv, theta, eps, dtype
        self.D = self.w["model.embed_tokens.weight"].shape[1]
        self.hd = self.D // n_heads
        self.out = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.dtype(self.eps)) * w

    def rope(self, x, cos, sin):
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def rope_pairs(self, x, cos, sin):
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    def forward(self, ids, positions, pairs=(), deltas=None, no_bias=False, interleaved=False):
        """-> ({position: logits}, heads [L, H, hd] at the last position). no_bias and interleaved
        (RoPE on adjacent pairs, as llama GGUF rows want) are the two mistakes a qwen2 loader can
        make; they give the sensitivity figures."""
        T, H, KV, hd, w = len(ids), self.H, self.KV, self.hd, self.w
        steer = {}
        for (l, h), d in zip(pairs, deltas if deltas is not None else []):
            steer.setdefault(l, []).append((h, d.astype(self.dtype)))
        ang = np.arange(T, dtype=np.float64)[:, None] * self.theta ** (-np.arange(0, hd, 2) / hd)[None, :]
        cos, sin = np.cos(ang)[:, None, :].astype(self.dtype), np.sin(ang)[:, None, :].astype(self.dtype)
        causal = np.triu(np.full((T, T), -np.inf, dtype=self.dtype), k=1)
        scale = self.dtype(1 / np.sqrt(hd))
        x = w["model.embed_tokens.weight"][ids]
        heads = np.zeros((self.L, H, hd), dtype=self.dtype)
        for l in range(self.L):
            p = f"model.layers.{l}."
            proj = lambda n, inp: inp @ w[p + f"self_attn.{n}_proj.weight"].T + (  # noqa: E731
                0 if no_bias else w[p + f"self_attn.{n}_proj.bias"])
            rope = self.rope_pairs if interleaved else self.rope
            hn = self.rmsnorm(x, w[p + "input_layernorm.weight"])
            q = rope(proj("q", hn).reshape(T, H, hd), cos, sin)
            k = rope(proj("k", hn).reshape(T, KV, hd), cos, sin)
            v = proj("v", hn).reshape(T, KV, hd)
            z = np.empty((T, H, hd), dtype=self.dtype)
            for h in range(H):
                g = h // (H // KV)
                s = q[:, h] @ k[:, g].T * scale + causal
                s = np.exp(s - s.max(axis=1, keepdims=True))
                z[:, h] = (s / s.sum(axis=1, keepdims=True)) @ v[:, g]
            for h, d in steer.get(l, []):
                z[:, h] += d
            heads[l] = z[-1]
            x = x + z.reshape(T, H * hd) @ w[p + "self_attn.o_proj.weight"].T
            hn = self.rmsnorm(x, w[p + "post_attention_layernorm.weight"])
            g_ = hn @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((g_ / (1 + np.exp(-g_))) * (hn @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        xn = self.rmsnorm(x, w["model.norm.weight"])
        return {pos: (xn[pos] @ self.out.T).astype(np.float64) for pos in positions}, heads.astype(np.float64)


GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GGUF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def gguf_weights(path):
    """gguf-py's dequantisation under Hugging Face names, rows as stored (no permutation)."""
    out = {}
    for t in GGUFReader(path).tensors:
        if t.name in GGUF_TOP:
            name = GGUF_TOP[t.name]
        else:
            _, l, kind, suffix = t.name.split(".")
            name = f"model.layers.{l}.{GGUF_TO_HF[kind]}.{suffix}"
        out[name] = dequantize(t.data, t.tensor_type).astype(np.float32)
    return out


def load_hf(path, gguf_file=None, dtype=torch.float32):
    hf_logging.set_verbosity_error()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw)
    assert type(m).__name__ == "Qwen2ForCausalLM", type(m).__name__
    m.eval()
    if dtype == torch.float64:
        m = m.double()
        fg.lift_fp32_islands(m)
    return m


def check_weights(m, ref):
    """transformers' state dict against our reading of the same file, bit for bit."""
    sd = m.state_dict()
    n = 0
    for name, w in ref.items():
        got = sd[name].numpy()
        if got.shape != w.shape or not np.array_equal(got.view(np.uint32), w.view(np.uint32)):
            sys.exit(f"weights differ: {name}")
        n += 1
    tied = "lm_head.weight" not in ref
    if tied and not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight):
        sys.exit("lm_head is not the token embedding")
    return n, tied


def compare_all(cases, res, pairs, llamacpp=True):
    """The cross-check numbers of every case; exits on a failure."""
    failures, out = [], {}

    def check(what, value, limit):
        if not value <= limit:
            failures.append(f"{what}: {value:.3g} > {limit:g}")
        return value

    for c in cases:
        r, name = res[c["name"]], c["name"]
        last = len(c["ids"]) - 1
        l32, l64, h32, h64 = r["logits32"], r["logits64"], r["heads32"], r["heads64"]
        x = {
            "numpy64_vs_hf64_logits": check(f"{name} numpy fp64 vs hf fp64 logits", max(
                float(np.abs(r["np_logits"][p] - l64[p]).max()) for p in r["np_logits"]), LIMIT_NUMPY_VS_HF64),
            "numpy64_vs_hf64_heads": check(f"{name} numpy fp64 vs hf fp64 heads",
                                           float(np.abs(r["np_heads"] - h64).max()), LIMIT_NUMPY_VS_HF64),
            "fp32_vs_fp64_logits_last": check(f"{name} fp32 vs fp64 logits",
                                              float(np.abs(l32[last] - l64[last]).max()), LIMIT_FP32_VS_FP64),
            "fp32_vs_fp64_logits_all_positions": float(np.abs(l32 - l64).max()),
            "fp32_vs_fp64_heads": float(np.abs(h32 - h64).max()),
        }
        if "np32_logits" in r:
            x["numpy32_vs_golden_logits_last"] = check(f"{name} numpy fp32 vs golden logits", float(
                np.abs(r["np32_logits"][last] - l32[last]).max()), LIMIT_NUMPY32)
            x["numpy32_vs_golden_heads"] = check(f"{name} numpy fp32 vs golden heads",
                                                 float(np.abs(r["np32_heads"] - h32).max()), LIMIT_NUMPY32)
        if llamacpp and "llamacpp" in r:
            lc = r["llamacpp"]
            x["llamacpp_f32_vs_golden_logits_last"] = float(np.abs(lc[last] - l32[last]).max())
            x["llamacpp_f32_vs_golden_logits_all_positions"] = check(
                f"{name} llama.cpp vs golden", float(np.abs(lc - l32).max()), LIMIT_LLAMACPP)
            x["llamacpp_top1_equal_all_positions"] = bool((lc.argmax(1) == l32.argmax(1)).all())
        for flag in ("no_bias", "interleaved"):
            if "sensitivity_" + flag in r:  # how far the two likely loader mistakes move the last logits
                x["logits_change_if_" + flag] = r["sensitivity_" + flag]
        if "steer_forms" in r:
            x["steer_prehook_vs_post_oproj_bias_logits"] = check(f"{name} steering forms", r["steer_forms"],
                                                                 LIMIT_STEER_FORMS)
        out[name] = x
        log(name, json.dumps(x))
    if failures:
        sys.exit("cross-checks failed:\n  " + "\n  ".join(failures))
    return out


def run_all(cases, hf_path, gguf_file, np_weights, np_args, deltas, pairs, llamacpp_model=None):
    res = {}
    m32 = load_hf(hf_path, gguf_file)
    n, tied = check_weights(m32, np_weights)
    log(f"weights: {n} tensors of transformers' state dict equal ours bit for bit (tied: {tied})")
    for c in cases:
        d = deltas if c.get("steered") else None
        logits, heads = fg.hf_forward(m32, c["ids"], d, pairs=pairs)
        res[c["name"]] = {"logits32": logits, "heads32": heads}
        if d is not None:
            alt, _ = fg.hf_forward(m32, c["ids"], d, steer_form="post", pairs=pairs)
            res[c["name"]]["steer_forms"] = float(np.abs(alt[-1] - logits[-1]).max())
        log("hf fp32", c["name"])
    del m32
    m64 = load_hf(hf_path, gguf_file, torch.float64)
    for c in cases:
        logits, heads = fg.hf_forward(m64, c["ids"], deltas if c.get("steered") else None, pairs=pairs)
        res[c["name"]].update(logits64=logits, heads64=heads)
        log("hf fp64", c["name"])
    del m64
    for dtype, key in ((np.float64, "np"), (np.float32, "np32")):
        npm = NumpyQwen2(np_weights, *np_args, dtype=dtype)
        for c in cases:
            pos = [len(c["ids"]) - 1] + c.get("extra_positions", [])
            lg, heads = npm.forward(c["ids"], pos, pairs, deltas if c.get("steered") else None)
            res[c["name"]].update({key + "_logits": lg, key + "_heads": heads})
            if dtype == np.float64 and not c.get("steered"):
                last = len(c["ids"]) - 1
                for flag in ("no_bias", "interleaved"):
                    wrong, _ = npm.forward(c["ids"], [last], **{flag: True})
                    res[c["name"]]["sensitivity_" + flag] = float(np.abs(wrong[last] - lg[last]).max())
            log(f"numpy {np.dtype(dtype).name}", c["name"])
        del npm
    if llamacpp_model:
        with tempfile.TemporaryDirectory() as tmp:
            f32 = os.path.join(tmp, "model-f32.gguf")
            fg.write_f32_copy(llamacpp_model, f32)
            for c in cases:
                if not c.get("steered"):
                    res[c["name"]]["llamacpp"] = fg.llama_cpp_logits(f32, c["ids"])
                    log("llama.cpp F32", c["name"])
    return res


def write_cases(out_dir, cases, res, crosschecks, piece, steer_file, pairs):
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for c in cases:
        r, name = res[c["name"]], c["name"]
        T = len(c["ids"])
        last = T - 1
        v = r["logits32"][last].astype(np.float32)
        h32 = r["heads32"]
        srt = np.sort(v)[::-1]
        oc = {"name": name, "description": c["description"], "source": c["source"]}
        if "text" in c:
            oc["text"] = c["text"]
        oc.update({
            "n_tokens": T, "token_ids": c["ids"], "position": last,
            "logits_file": write_f32(out_dir, f"{name}.logits.f32", v),
            "heads_file": write_f32(out_dir, f"{name}.heads.f32", h32),
            "top1": fg.top(v, 1)[0], "top5": fg.top(v, 5), "top5_pieces": [piece(i) for i in fg.top(v, 5)],
            "top1_margin": float(srt[0] - srt[1]), "max_abs_logit": float(np.abs(v).max()),
            "logit_std": float(v.std()), "max_abs_head": float(np.abs(h32).max()),
            "steering": {"file": steer_file, "pairs": [list(p) for p in pairs]} if c.get("steered") else None,
        })
        if c.get("extra_positions"):
            oc["extra_positions"] = []
            for p in c["extra_positions"]:
                vp = r["logits32"][p].astype(np.float32)
                oc["extra_positions"].append({"position": p, "logits_file": write_f32(out_dir, f"{name}.logits_p{p}.f32", vp),
                                              "top1": fg.top(vp, 1)[0], "max_abs_logit": float(np.abs(vp).max())})
        oc["crosschecks"] = crosschecks[name]
        out.append(oc)
    return out


def write_f32(out_dir, name, arr):
    np.ascontiguousarray(arr, dtype="<f4").tofile(os.path.join(out_dir, name))
    return name


def dump_json(path, doc):
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\s+(-?[0-9][0-9.e+-]*(?:,\s+-?[0-9][0-9.e+-]*)*)\s+\]",
                  lambda mt: "[" + re.sub(r",\s+", ", ", mt.group(1)) + "]", text)
    assert json.loads(text) == doc
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def versions():
    import importlib.metadata as md
    names = ("torch", "transformers", "gguf", "numpy", "tokenizers", "jinja2", "safetensors", "llama_cpp_python")
    out = {}
    for p in names:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------
# tiny

def tiny(args):
    out_dir = os.path.join(HERE, "qwen2_tiny")
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "hf")
        cmd = [args.palign, "mkmodel", d, "--format", "safetensors", "--arch", "qwen2", "--layers", str(TINY["layers"]),
               "--dim", str(TINY["dim"]), "--heads", str(TINY["heads"]), "--kv-heads", str(TINY["kv_heads"]),
               "--ffn", str(TINY["ffn"]), "--seed", str(TINY["seed"]), "--rope-theta", repr(TINY["rope_theta"]),
               "--norm-eps", repr(TINY["norm_eps"])] + ([] if TINY["tied"] else ["--untied"])
        subprocess.run(cmd, check=True)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        hf_tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        tok = AutoTokenizer.from_pretrained(d)
        chat_text = tok.apply_chat_template([{"role": "system", "content": tg.SYSTEM_PROMPT},
                                             {"role": "user", "content": tg.ITEM_TEMPLATE.format("worry about things")}],
                                            tokenize=False, add_generation_prompt=True) + tg.PREFIX
        ids_chat = tok(chat_text)["input_ids"]
        assert ids_chat == hf_tok.encode(chat_text, add_special_tokens=False).ids
        plain = "Caf\u00e9 people are curious, imaginative and interested in 42 new ideas."
        ids_plain = hf_tok.encode(plain, add_special_tokens=False).ids
        rng = np.random.default_rng(7)
        ids_long = [int(i) for i in rng.integers(3, cfg["vocab_size"], TINY_LONG)]
        cases = [
            {"name": "chat", "description": "PAS item question under the model's template, 'Option ('",
             "source": {"kind": "chat"}, "text": chat_text, "ids": ids_chat},
            {"name": "plain", "description": "raw text, no template", "source": {"kind": "raw"}, "text": plain,
             "ids": ids_plain},
            {"name": "long", "description": f"{TINY_LONG} random token ids (numpy default_rng(7))",
             "source": {"kind": "random"}, "ids": ids_long, "extra_positions": [100]},
            {"name": "chat_steered", "description": "chat with a displacement on two heads at every position",
             "source": {"kind": "chat"}, "ids": ids_chat, "steered": True},
        ]
        hd = TINY["dim"] // TINY["heads"]
        deltas = (np.random.default_rng(3).standard_normal((len(TINY_PAIRS), hd)) * 2.0).astype(np.float32)
        w = {k: v.astype(np.float32) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
        np_args = (TINY["layers"], TINY["heads"], TINY["kv_heads"], TINY["rope_theta"], TINY["norm_eps"])
        res = run_all(cases, d, None, w, np_args, deltas, TINY_PAIRS)
        x = compare_all(cases, res, TINY_PAIRS, llamacpp=False)
        os.makedirs(out_dir, exist_ok=True)
        steer_file = write_f32(out_dir, "steer_deltas.f32", deltas)
        piece = lambda i: tok.decode([i])  # noqa: E731
        out_cases = write_cases(out_dir, cases, res, x, piece, steer_file, TINY_PAIRS)
    dump_json(os.path.join(out_dir, "cases.json"), {
        "about": "logits and head outputs (o_proj input) of a tiny random qwen2 model written by palign mkmodel "
                 "with `mkmodel` below, from transformers' Qwen2ForCausalLM (float32, eager) on that Hugging Face "
                 "directory. Made by tests/golden/make_qwen2_golden.py tiny.",
        "format_version": 1, "mkmodel": TINY, "vocab_size": cfg["vocab_size"], "head_dim": hd,
        "layout": "as tests/golden/forward/cases.json (README-forward.md)",
        "steering": {"file": steer_file, "pairs": [list(p) for p in TINY_PAIRS],
                     "generator": "numpy default_rng(3).standard_normal((2, 16)) * 2.0, float32"},
        "limits_checked": {"numpy64_vs_hf64": LIMIT_NUMPY_VS_HF64, "fp32_vs_fp64_logits": LIMIT_FP32_VS_FP64,
                           "numpy32_vs_golden": LIMIT_NUMPY32, "steer_forms": LIMIT_STEER_FORMS},
        "versions": versions(), "cases": out_cases})
    log("wrote", out_dir)


# ------------------------------------------------------------------------------------------
# real: tokenizer references

def references(model):
    import llama_cpp
    r = GGUFReader(model)
    toks = tg.gguf_strings(r, "tokenizer.ggml.tokens")
    merges = tg.gguf_strings(r, "tokenizer.ggml.merges")
    tt = r.fields["tokenizer.ggml.token_type"]
    types = [int(tt.parts[i][0]) for i in tt.data]
    assert tg.gguf_scalar(r, "tokenizer.ggml.model") == "gpt2" and tg.gguf_scalar(r, "tokenizer.ggml.pre") == "qwen2"
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=[tuple(m.split(" ", 1)) for m in merges]))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    # control tokens are special (parsed only when asked); user-defined ones are always matched
    hf.add_special_tokens([AddedToken(toks[i], special=True, normalized=False) for i in range(len(toks)) if types[i] == 3])
    hf.add_tokens([AddedToken(toks[i], special=False, normalized=False) for i in range(len(toks)) if types[i] == 4])
    ll = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    tf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(model)), gguf_file=os.path.basename(model))
    template = tg.gguf_scalar(r, "tokenizer.chat_template")
    return ll, hf, tf, template


def encode_all(refs, text, special):
    ll, hf, tf, _ = refs
    a = ll.tokenize(text.encode("utf-8"), add_bos=False, special=special)
    hf.encode_special_tokens = not special
    b = hf.encode(text, add_special_tokens=False).ids
    c = tf(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]
    if not a == b == c:
        sys.exit(f"llama.cpp, tokenizers and transformers disagree on {text[:80]!r}:\n  {a}\n  {b}\n  {c}")
    return a


def real_tokenizer(refs, items, subjects, split, chat):
    out = os.path.join(HERE, "tokenizer")
    tg.OUT = out
    name = os.path.basename(refs_model_path)
    rows = []
    for i in range(1, 301):
        for form in ("lower", "orig"):
            text = items[i].lower() if form == "lower" else items[i]
            rows.append(("item", i, form, encode_all(refs, chat.render(tg.SYSTEM_PROMPT, tg.ITEM_TEMPLATE.format(text),
                                                                        tg.PREFIX), True)))
    question = tg.ITEM_TEMPLATE.format(items[split["test_index"][0]].lower())
    for s in range(3):
        rows.append(("icl", s, "lower", encode_all(refs, chat.render(icl_system(items, subjects[s], split), question,
                                                                      tg.PREFIX), True)))
    tg.write("qwen2_papi.txt", [
        f"PAS prompts (PAS.md) under {name}'s chat template, system '{tg.SYSTEM_PROMPT}', prefix '{tg.PREFIX}'.",
        "Golden: llama.cpp; Hugging Face tokenizers (Qwen2's pre-tokenizer and NFC on the GGUF vocabulary) and "
        "transformers' GGUF tokenizer agreed on every id.",
        tg.versions(), "KIND ITEM FORM P S M ids (see make_tokenizer_golden.py)"], tg.delta_lines(rows))
    cases = [(0, s, encode_all(refs, s, False)) for s in tg.STRINGS]
    cases += [(1, s, encode_all(refs, s, True)) for s in tg.STRINGS_SPECIAL]
    tg.write("qwen2_strings.txt", [f"hand-written strings, {name}. Golden: llama.cpp; tokenizers and transformers "
                                   "agreed on every id.", tg.versions(), "FLAGS HEXTEXT N ids"], tg.strings_lines(cases))
    log("wrote", out, "qwen2_papi.txt, qwen2_strings.txt")


def icl_system(items, answers, split):
    parts = [f"{items[i]}:{tg.LABELS[answers[f'i{i}']]}" for i in split["train_index"] if answers[f"i{i}"] != 0]
    return tg.ICL_HEAD + ";".join(parts)


def real_chat(template, chat):
    inputs = [
        (None, "Hello", None), (None, "Hello", "Option ("), ("Be brief.", "Hello", None),
        ("Be brief.", "Hello", "Option ("), ("", "Hi", ""), ("  sys with spaces \n", " user text \n\n", " Option ( "),
        ("multi\nline\nsystem", "Given a statement:\n(A). x\n", "Option"), ("s", "", "p"),
        (tg.SYSTEM_PROMPT, tg.ITEM_TEMPLATE.format("enjoy testing tokenizers."), tg.PREFIX),
    ]
    cases = [{"system": s, "user": u, "prefix": p, "expected": chat.render(s, u, p)} for s, u, p in inputs]
    import importlib.metadata as md
    dump_json(os.path.join(HERE, "tokenizer", "chat_qwen2.json"), {
        "about": "the chat template of " + os.path.basename(refs_model_path) + " (its tokenizer.chat_template) and "
                 "prompts jinja2 " + md.version("jinja2") + " renders with it; palign's render must equal 'expected'",
        "template": template, "cases": cases})


# ------------------------------------------------------------------------------------------
# real: forward

def real_forward(model, refs, items, subjects, split, chat):
    out_dir = os.path.join(HERE, "forward-qwen2")
    ll = refs[0]
    enc = lambda text, special=True: encode_all(refs, text, special)  # noqa: E731
    cases = []
    for name, i, lower in [("item1", 1, True), ("item2", 2, False)]:
        text = items[i].lower() if lower else items[i]
        cases.append({"name": name, "description": f"PAS item question, IPIP-NEO item {i} "
                      f"{'lowercased' if lower else 'as written'}, default system prompt, 'Option ('",
                      "source": {"kind": "item", "item": i, "form": "lower" if lower else "orig",
                                 "pinned_in": "tokenizer/qwen2_papi.txt"},
                      "ids": enc(chat.render(tg.SYSTEM_PROMPT, tg.ITEM_TEMPLATE.format(text), tg.PREFIX))})
    for s in range(len(subjects)):
        ids = enc(chat.render(icl_system(items, subjects[s], split), tg.ITEM_TEMPLATE.format(items[1].lower()),
                              tg.PREFIX))
        if len(ids) >= ICL_MIN_TOKENS:
            break
    else:
        sys.exit(f"no subject's ICL prompt reaches {ICL_MIN_TOKENS} tokens")
    cases.append({"name": "icl_long", "description": f"PAS ICL system prompt of subject {s} of Test-set.json, "
                  "question of item 1 lowercased, 'Option ('",
                  "source": {"kind": "icl", "subject_index": s, "question_item": 1, "form": "lower",
                             "subject_rule": f"first subject of Test-set.json whose prompt has >= {ICL_MIN_TOKENS} "
                                             "tokens"},
                  "ids": ids, "extra_positions": ICL_POSITIONS})
    text = chat.render(tg.SYSTEM_PROMPT, fg.NON_ASCII_USER, None)
    cases.append({"name": "non_ascii", "description": "chat prompt, non-ASCII user message, generation prompt",
                  "source": {"kind": "chat", "user": fg.NON_ASCII_USER}, "text": text, "ids": enc(text)})
    cases.append({"name": "plain", "description": "raw text, no template, no BOS", "source": {"kind": "raw"},
                  "text": fg.PLAIN_TEXT, "ids": enc(fg.PLAIN_TEXT, False)})
    cases.append({"name": "item1_steered", "description": "item1 with a fixed displacement added to 4 heads' "
                  "outputs (o_proj input) at every position", "source": dict(cases[0]["source"]),
                  "ids": list(cases[0]["ids"]), "steered": True})
    for c in cases:
        log(c["name"], len(c["ids"]), "tokens")

    r = GGUFReader(model)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    L, H, KV = int(f("qwen2.block_count")), int(f("qwen2.attention.head_count")), int(f("qwen2.attention.head_count_kv"))
    theta, eps = float(f("qwen2.rope.freq_base")), float(f("qwen2.attention.layer_norm_rms_epsilon"))
    hd = int(f("qwen2.embedding_length")) // H
    deltas = (np.random.default_rng(fg.STEER_SEED).standard_normal((len(REAL_PAIRS), hd)) * fg.STEER_SCALE).astype(np.float32)
    w = gguf_weights(model)
    res = run_all(cases, os.path.dirname(os.path.abspath(model)), os.path.basename(model), w, (L, H, KV, theta, eps),
                  deltas, REAL_PAIRS, llamacpp_model=model)
    del w
    x = compare_all(cases, res, REAL_PAIRS)
    os.makedirs(out_dir, exist_ok=True)
    steer_file = write_f32(out_dir, "steer_deltas.f32", deltas)
    piece = lambda i: ll.detokenize([i]).decode("utf-8", "replace")  # noqa: E731
    out_cases = write_cases(out_dir, cases, res, x, piece, steer_file, REAL_PAIRS)
    dump_json(os.path.join(out_dir, "cases.json"), {
        "about": "palign forward-pass goldens for the qwen2 architecture: logits and head outputs of "
                 f"{os.path.basename(model)} (dequantised to fp32) for fixed token ids. Made by "
                 "tests/golden/make_qwen2_golden.py real; see tests/golden/README-forward.md.",
        "format_version": 1,
        "reference": "Hugging Face transformers Qwen2ForCausalLM, PyTorch CPU, float32, eager attention, "
                     "from_pretrained(gguf_file=...)",
        "model": {"file": os.path.basename(model), "sha256": fg.sha256(model), "arch": "qwen2", "n_layer": L,
                  "n_head": H, "n_head_kv": KV, "head_dim": hd, "rope_theta": theta, "rms_eps": eps},
        "steering": {"file": steer_file, "pairs": [list(p) for p in REAL_PAIRS], "head_dim": hd,
                     "generator": f"numpy.random.default_rng({fg.STEER_SEED}).standard_normal(({len(REAL_PAIRS)}, "
                                  f"{hd})) * {fg.STEER_SCALE}, float32"},
        "limits_checked": {"numpy64_vs_hf64": LIMIT_NUMPY_VS_HF64, "fp32_vs_fp64_logits": LIMIT_FP32_VS_FP64,
                           "llamacpp_vs_golden": LIMIT_LLAMACPP, "numpy32_vs_golden": LIMIT_NUMPY32,
                           "steer_forms": LIMIT_STEER_FORMS},
        "versions": versions(), "threads": torch.get_num_threads(), "cases": out_cases})
    log("wrote", out_dir)


refs_model_path = None


def real(args):
    global refs_model_path
    refs_model_path = args.model
    refs = references(args.model)
    chat = tg.Chat("qwen2", refs[3], "", "<|im_end|>", "<|im_end|>\n")
    items, subjects, split = tg.papi(args.papi)
    real_chat(refs[3], chat)
    real_tokenizer(refs, items, subjects, split, chat)
    if not args.tokenizer_only:
        real_forward(args.model, refs, items, subjects, split, chat)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny")
    t.add_argument("--palign", default=os.path.join(REPO, "build", "palign"))
    r = sub.add_parser("real")
    cache = os.environ.get("PALIGN_CACHE") or os.path.expanduser("~/.cache/palign")
    r.add_argument("--model", default=os.environ.get("PALIGN_QWEN2_MODEL") or os.path.join(cache, MODEL_FILE))
    r.add_argument("--papi", default=os.environ.get("PALIGN_PAPI_DIR") or os.path.join(REPO, "..", "shared", "papi"))
    r.add_argument("--tokenizer-only", action="store_true", help="only the tokenizer and chat goldens")
    args = ap.parse_args()
    torch.manual_seed(0)
    tiny(args) if args.cmd == "tiny" else real(args)


if __name__ == "__main__":
    main()
