#!/usr/bin/env python3
"""Golden logits and attention-head outputs for palign's transformer forward pass,
made by an independent implementation reading the same weights in fp32.

THE GOLDEN: Hugging Face transformers' LlamaForCausalLM (PyTorch, CPU, float32,
eager attention), built by `from_pretrained(dir, gguf_file=...)` from the default
GGUF model. transformers dequantises every tensor with gguf-py (the dequantiser
palign's C matches bit for bit) and un-permutes attn_q/attn_k itself, so nothing
of palign's is involved.

Cross-checks, all run every time; the script stops if one fails:
  1. weights: palign's stated un-permute rule (per head of hd rows, HF row
     a*hd/2+b = GGUF row 2*b+a) applied to gguf-py's dequantised tensors gives
     transformers' state dict bit for bit (every tensor, tied lm_head included).
  2. float64: the same transformers model in float64, with the three places
     where transformers' Llama computes in float32 whatever the model's dtype
     (RMSNorm, RoPE angles, eager softmax) lifted to float64. Its difference from
     the float32 golden is the floor that fp32 rounding alone puts on any tolerance.
  3. an own float64 numpy Llama written here from the Llama equations, reading the
     GGUF with gguf-py and NOT un-permuting Q/K: it applies RoPE to adjacent
     pairs (2i, 2i+1) of the GGUF rows, as llama.cpp does. It must agree with (2)
     within 1e-7 (it does to ~1e-13) on logits and head outputs, steering included. The same code in
     float32 (numpy's OpenBLAS sgemm, another summation order) shows what a second
     fp32 implementation, like palign's, may differ from the golden.
  4. llama.cpp (llama-cpp-python) on an F32 copy of the model written here with
     gguf-py (temporary, never committed), F32 KV cache, no flash attention,
     logits of every position: it must agree with the golden at the fp32 level.
     (llama.cpp cannot displace one head before W_o, so the steered case is
     checked by (2), (3) and by (5) only.)
  5. steering: adding delta[l][h] to o_proj's input (pre-hook) and adding
     W_o[:, h*hd:(h+1)*hd] @ delta[l][h] to o_proj's output (forward hook) give
     the same logits (PAS.md step 6 says they are equivalent).
  6. token ids: every case is tokenized by llama.cpp (vocab_only, special tokens
     parsed, no BOS added) and by Hugging Face tokenizers (make_tokenizer_golden's
     rebuilt SmolLM2 tokenizer); they must agree, and the PAS prompts must equal
     the ids pinned in tokenizer/smollm2_papi.txt.

Writes tests/golden/forward/:
  cases.json                   the cases, their token ids, results, file names and
                               the cross-check numbers (schema: README-forward.md)
  <case>.logits.f32            logits of the last position, 49152 float32 LE
  <case>.heads.f32             o_proj input at the last position for every layer and
                               head: [30][9][64] float32 LE (layer, head, dim)
  icl_long.logits_p<N>.f32     logits at intermediate position N (0-based) of icl_long
  steer_deltas.f32             the steering displacements, [4][64] float32 LE, in the
                               order of cases.json's steering.pairs

Cases: item1, item2 (PAS item questions), icl_long (PAS ICL prompt, >= 1500 tokens: subject 0's
is 1483, so the first subject of Test-set.json that reaches 1500), non_ascii, plain (raw text),
item1_steered. PAPI text is not committed: cases built from PAPI files store token ids only.

Usage (needs: pip install torch transformers accelerate gguf numpy llama-cpp-python
tokenizers jinja2; the model and PAPI files; no network):
  python3 tests/golden/make_forward_golden.py [--model PATH] [--papi DIR]
  PALIGN_MODEL, PALIGN_CACHE and PALIGN_PAPI_DIR are read as in make_tokenizer_golden.py.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
import llama_cpp
import gguf
from gguf import GGUFReader, GGUFWriter, GGUFValueType
from gguf.quants import dequantize
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.utils import logging as hf_logging

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "forward")
sys.path.insert(0, HERE)
import make_tokenizer_golden as tg  # noqa: E402  (our own prompt construction and tokenizer references)

# ---- what is computed ----
NON_ASCII_USER = "Décris ta personnalité en une phrase — 性格は? 🙂"
PLAIN_TEXT = "The Big Five personality traits are openness, conscientiousness, extraversion, agreeableness and"
STEER_PAIRS = [(3, 0), (10, 4), (17, 8), (25, 2)]  # (layer, head)
STEER_SEED = 1234
STEER_SCALE = 4.0
ICL_MIN_TOKENS = 1500
ICL_POSITIONS = [100, 1000]  # 0-based positions of icl_long whose logits are stored too
TOP_K = 5

# ---- cross-check limits (the script stops past them) ----
LIMIT_NUMPY_VS_HF64 = 1e-7      # two float64 implementations: logits and head outputs, absolute
LIMIT_FP32_VS_FP64 = 1e-3       # the float32 golden against float64: last-position logits, absolute
LIMIT_LLAMACPP = 2e-3           # llama.cpp F32 against the golden: logits, absolute, every position
LIMIT_STEER_FORMS = 1e-3        # pre-hook against post-o_proj bias, float32 logits, absolute
LIMIT_NUMPY32 = 1e-3            # own numpy float32 Llama (OpenBLAS sgemm) against the golden, absolute
                                # (the logits tolerance README-forward.md proposes for palign)


# ------------------------------------------------------------------------------------------
# cases

def parse_papi_golden(path):
    """tokenizer/smollm2_papi.txt -> {(kind, item, form): ids} (delta-coded lines)."""
    out, prev = {}, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            t = line.split()
            kind, item, form, p, s, m = t[0], int(t[1]), t[2], int(t[3]), int(t[4]), int(t[5])
            mid = [int(x) for x in t[6:6 + m]]
            ids = prev[:p] + mid + (prev[len(prev) - s:] if s else [])
            out[(kind, item, form)] = ids
            prev = ids
    return out


def build_cases(model, papi_dir):
    ll, hf, template = tg.smollm2_references(model)
    chat = tg.Chat("smollm2", template, "<|im_start|>", "<|im_end|>", "<|im_end|>\n")
    items, subjects, split = tg.papi(papi_dir)
    pinned = parse_papi_golden(os.path.join(HERE, "tokenizer", "smollm2_papi.txt"))

    def enc(text, special=True):
        return tg.encode_both(ll, hf, text, special)  # exits unless llama.cpp == tokenizers

    cases = []

    def item_prompt(i, lower):
        text = items[i].lower() if lower else items[i]
        return chat.render(tg.SYSTEM_PROMPT, tg.ITEM_TEMPLATE.format(text), tg.PREFIX)

    for name, i, lower, desc in [
            ("item1", 1, True, "PAS item question, IPIP-NEO item 1 lowercased, default system prompt, "
                               "SmolLM2 ChatML, assistant turn opened with 'Option ('"),
            ("item2", 2, False, "PAS item question, IPIP-NEO item 2 as written, default system prompt, "
                                "SmolLM2 ChatML, assistant turn opened with 'Option ('")]:
        ids = enc(item_prompt(i, lower))
        assert ids == pinned[("item", i, "lower" if lower else "orig")], name
        cases.append({"name": name, "description": desc, "source": {
            "kind": "item", "item": i, "form": "lower" if lower else "orig",
            "system": tg.SYSTEM_PROMPT, "prefix": tg.PREFIX, "pinned_in": "tokenizer/smollm2_papi.txt"},
            "ids": ids})

    # ICL system prompt (built as make_tokenizer_golden.py builds it) with the item-1 question, lowercased.
    # The prompt of subject 0 is 1483 tokens (all 120 train answers given), under ICL_MIN_TOKENS, so the
    # case takes the first subject of Test-set.json whose prompt reaches ICL_MIN_TOKENS.
    def icl_prompt(s, q_item):
        a = subjects[s]
        parts = [f"{items[i]}:{tg.LABELS[a[f'i{i}']]}" for i in split["train_index"] if a[f"i{i}"] != 0]
        return chat.render(tg.ICL_HEAD + ";".join(parts), tg.ITEM_TEMPLATE.format(items[q_item].lower()), tg.PREFIX)

    # the construction reproduces the pinned ICL prompts (their question is item test_index[0])
    for s in range(3):
        assert enc(icl_prompt(s, split["test_index"][0])) == pinned[("icl", s, "lower")], s
    for s in range(len(subjects)):
        ids = enc(icl_prompt(s, 1))
        if len(ids) >= ICL_MIN_TOKENS:
            break
    else:
        sys.exit(f"no subject's ICL prompt reaches {ICL_MIN_TOKENS} tokens")
    cases.append({"name": "icl_long", "description": f"PAS ICL system prompt of subject {s} of Test-set.json "
                  "(train answers, train_index order), question of item 1 lowercased, 'Option ('",
                  "source": {"kind": "icl", "subject_index": s, "subject_case": subjects[s].get("case"),
                             "subject_rule": f"first subject of Test-set.json whose prompt has >= {ICL_MIN_TOKENS} tokens",
                             "question_item": 1, "form": "lower", "prefix": tg.PREFIX},
                  "ids": ids, "extra_positions": ICL_POSITIONS})

    text = chat.render(tg.SYSTEM_PROMPT, NON_ASCII_USER, None)  # generation prompt: '<|im_start|>assistant\n'
    cases.append({"name": "non_ascii", "description": "chat prompt, default system prompt, non-ASCII user "
                  "message, assistant turn opened by the template's generation prompt",
                  "source": {"kind": "chat", "system": tg.SYSTEM_PROMPT, "user": NON_ASCII_USER,
                             "add_generation_prompt": True}, "text": text, "ids": enc(text)})
    cases.append({"name": "plain", "description": "raw text, no template, no BOS",
                  "source": {"kind": "raw"}, "text": PLAIN_TEXT, "ids": enc(PLAIN_TEXT, False)})
    c1 = cases[0]
    cases.append({"name": "item1_steered", "description": "item1 with a fixed displacement added to 4 heads' "
                  "outputs (o_proj input) at every position", "source": dict(c1["source"]),
                  "ids": list(c1["ids"]), "steered": True})
    return cases, ll


def steering_deltas():
    rng = np.random.default_rng(STEER_SEED)
    return (rng.standard_normal((len(STEER_PAIRS), 64)) * STEER_SCALE).astype(np.float32)


# ------------------------------------------------------------------------------------------
# transformers

def load_hf(model_path, dtype):
    hf_logging.set_verbosity_error()
    m = LlamaForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(model_path)),
                                         gguf_file=os.path.basename(model_path), dtype=torch.float32,
                                         attn_implementation="eager")
    m.eval()
    if dtype == torch.float64:
        m = m.double()
        lift_fp32_islands(m)
    return m


def _rmsnorm64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rope64(self, x, position_ids):
    hd = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
    inv = 1.0 / (self.config.rope_parameters["rope_theta"] **
                 (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = position_ids[..., None].to(torch.float64) * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    n_rep = module.num_key_value_groups
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    # transformers hands a registered attention function no mask when there is no padding
    # (it expects the function to be causal itself, like sdpa's is_causal)
    if attention_mask is None:
        tq, tk = query.shape[-2], key.shape[-2]
        attention_mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    if attention_mask.dtype == torch.bool:
        w = w.masked_fill(~attention_mask, float("-inf"))
    else:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def lift_fp32_islands(m):
    """transformers' Llama (and Qwen2) casts to float32 inside RMSNorm, the RoPE angles and the
    eager softmax whatever the model's dtype; for a true float64 reference those three run in float64."""
    for mod in m.modules():
        if type(mod).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm"):
            mod.forward = types.MethodType(_rmsnorm64, mod)
    m.model.rotary_emb.forward = types.MethodType(_rope64, m.model.rotary_emb)
    AttentionInterface.register("palign_eager_fp64", _eager64)
    m.set_attn_implementation("palign_eager_fp64")


def hf_forward(m, ids, deltas=None, steer_form="pre", pairs=STEER_PAIRS):
    """-> (logits [T, V] float64 numpy, heads [L, H, hd] at the last position)."""
    cfg = m.config
    hd, dt = cfg.hidden_size // cfg.num_attention_heads, m.dtype
    steer = {}
    if deltas is not None:
        for (l, h), d in zip(pairs, deltas):
            steer.setdefault(l, []).append((h, torch.from_numpy(d).to(dt)))
    heads = [None] * cfg.num_hidden_layers
    handles = []
    for l, layer in enumerate(m.model.layers):
        o_proj = layer.self_attn.o_proj

        def pre(mod, args, l=l):
            (z,) = args
            if steer_form == "pre" and l in steer:
                z = z.clone()
                for h, d in steer[l]:
                    z[..., h * hd:(h + 1) * hd] += d
            heads[l] = z[0, -1].detach().double().numpy().copy()
            return (z,)

        def post(mod, args, out, l=l):
            for h, d in steer.get(l, []):
                out = out + mod.weight[:, h * hd:(h + 1) * hd] @ d
            return out

        handles.append(o_proj.register_forward_pre_hook(pre))
        if steer_form == "post":
            handles.append(o_proj.register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for hd_ in handles:
            hd_.remove()
    return logits.double().numpy(), np.stack(heads).reshape(cfg.num_hidden_layers, cfg.num_attention_heads, hd)


# ------------------------------------------------------------------------------------------
# own float64 numpy Llama (cross-check 3): GGUF layout, RoPE on adjacent pairs

class NumpyLlama:
    def __init__(self, path, dtype=np.float64):
        self.dtype = dtype
        r = GGUFReader(path)
        f = lambda k: r.fields[k].contents()  # noqa: E731
        self.L = int(f("llama.block_count"))
        self.H = int(f("llama.attention.head_count"))
        self.KV = int(f("llama.attention.head_count_kv"))
        self.D = int(f("llama.embedding_length"))
        self.hd = self.D // self.H
        self.theta = float(f("llama.rope.freq_base"))
        self.eps = float(f("llama.attention.layer_norm_rms_epsilon"))
        self.w = {t.name: dequantize(t.data, t.tensor_type).astype(dtype) for t in r.tensors}
        assert "output.weight" not in self.w  # tied: the lm head is token_embd

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.dtype(self.eps)) * w

    def rope_pairs(self, x, cos, sin):
        # x [T, n, hd] in GGUF row order: rotation pairs are (2i, 2i+1), angle pos * theta^(-2i/hd)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def forward(self, ids, positions, deltas=None):
        """-> ({position: logits}, heads [L, H, hd] at the last position)."""
        T, H, KV, hd, w = len(ids), self.H, self.KV, self.hd, self.w
        steer = {}
        if deltas is not None:
            for (l, h), d in zip(STEER_PAIRS, deltas):
                steer.setdefault(l, []).append((h, d.astype(self.dtype)))
        # angles in float64 also for the float32 run (rounded once, when cos/sin are cast)
        ang = np.arange(T, dtype=np.float64)[:, None] * self.theta ** (-np.arange(0, hd, 2) / hd)[None, :]
        cos, sin = np.cos(ang)[:, None, :].astype(self.dtype), np.sin(ang)[:, None, :].astype(self.dtype)
        causal = np.triu(np.full((T, T), -np.inf, dtype=self.dtype), k=1)
        scale = self.dtype(1 / np.sqrt(hd))
        x = w["token_embd.weight"][ids]
        heads = np.zeros((self.L, H, hd), dtype=self.dtype)
        for l in range(self.L):
            p = f"blk.{l}."
            hn = self.rmsnorm(x, w[p + "attn_norm.weight"])
            q = self.rope_pairs((hn @ w[p + "attn_q.weight"].T).reshape(T, H, hd), cos, sin)
            k = self.rope_pairs((hn @ w[p + "attn_k.weight"].T).reshape(T, KV, hd), cos, sin)
            v = (hn @ w[p + "attn_v.weight"].T).reshape(T, KV, hd)
            z = np.empty((T, H, hd), dtype=self.dtype)
            for h in range(H):
                g = h // (H // KV)  # grouped-query: consecutive query heads share a K/V head
                s = q[:, h] @ k[:, g].T * scale + causal
                s = np.exp(s - s.max(axis=1, keepdims=True))
                z[:, h] = (s / s.sum(axis=1, keepdims=True)) @ v[:, g]
            for h, d in steer.get(l, []):
                z[:, h] += d
            heads[l] = z[-1]
            x = x + z.reshape(T, H * hd) @ w[p + "attn_output.weight"].T
            hn = self.rmsnorm(x, w[p + "ffn_norm.weight"])
            g_ = hn @ w[p + "ffn_gate.weight"].T
            x = x + ((g_ / (1 + np.exp(-g_))) * (hn @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        xn = self.rmsnorm(x, w["output_norm.weight"])
        return ({pos: (xn[pos] @ w["token_embd.weight"].T).astype(np.float64) for pos in positions},
                heads.astype(np.float64))


# ------------------------------------------------------------------------------------------
# weights check (cross-check 1)

def unpermute(wt, n_head):
    """palign's rule: per head of hd rows, HF row a*hd/2+b = GGUF row 2*b+a."""
    rows, cols = wt.shape
    hd = rows // n_head
    out = np.empty_like(wt)
    for h in range(n_head):
        for a in range(2):
            for b in range(hd // 2):
                out[h * hd + a * hd // 2 + b] = wt[h * hd + 2 * b + a]
    return out


def check_weights(m, model_path):
    sd = m.state_dict()
    r = GGUFReader(model_path)
    cfg = m.config
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    per = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    n = 0
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type)
        if t.name in names:
            hf = names[t.name]
        else:
            _, l, kind, _ = t.name.split(".")
            hf = f"model.layers.{l}.{per[kind]}.weight"
            if kind == "attn_q":
                w = unpermute(w, cfg.num_attention_heads)
            elif kind == "attn_k":
                w = unpermute(w, cfg.num_key_value_heads)
        ref = sd[hf].numpy()
        if ref.shape != w.shape or ref.dtype != np.float32 or not np.array_equal(ref.view(np.uint32),
                                                                                 w.astype(np.float32).view(np.uint32)):
            sys.exit(f"weights differ: {t.name} vs {hf}")
        n += 1
    if not torch.equal(m.lm_head.weight, m.model.embed_tokens.weight):
        sys.exit("lm_head is not the token embedding")
    return n


# ------------------------------------------------------------------------------------------
# llama.cpp on an F32 copy (cross-check 4)

def write_f32_copy(src, dst):
    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = f.contents()
        if key == "general.file_type":
            val = int(gguf.LlamaFileType.ALL_F32)
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, val, f.types[0], sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(f32_path, ids):
    ll = llama_cpp.Llama(model_path=f32_path, n_ctx=max(len(ids), 64), n_batch=len(ids), n_ubatch=len(ids),
                         n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), logits_all=True,
                         flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                         verbose=False)
    ll.eval(ids)
    out = np.array(ll.scores[:len(ids)], dtype=np.float64)
    ll.close()
    return out


# ------------------------------------------------------------------------------------------

def top(v, k):
    order = np.argsort(-v, kind="stable")
    return [int(i) for i in order[:k]]


def write_f32(name, arr):
    arr = np.ascontiguousarray(arr, dtype="<f4")
    arr.tofile(os.path.join(OUT, name))
    return name


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions():
    return {p: importlib.metadata.version(p) for p in
            ("torch", "transformers", "gguf", "numpy", "llama_cpp_python", "tokenizers", "jinja2")}


def main():
    ap = argparse.ArgumentParser()
    cache = os.environ.get("PALIGN_CACHE") or os.path.expanduser("~/.cache/palign")
    ap.add_argument("--model", default=os.environ.get("PALIGN_MODEL") or
                    os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--papi", default=os.environ.get("PALIGN_PAPI_DIR") or os.path.join(REPO, "..", "shared", "papi"))
    ap.add_argument("--keep-f32", metavar="PATH", help="keep the F32 GGUF copy used for llama.cpp here")
    args = ap.parse_args()
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    log = lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)  # noqa: E731

    cases, vocab = build_cases(args.model, args.papi)
    piece = lambda i: vocab.detokenize([i]).decode("utf-8", "replace")  # noqa: E731
    deltas = steering_deltas()
    for c in cases:
        log(c["name"], len(c["ids"]), "tokens")

    m32 = load_hf(args.model, torch.float32)
    log("weights:", check_weights(m32, args.model), "tensors equal bit for bit (palign's un-permute rule)")
    cfg = m32.config
    res = {}
    for c in cases:
        d = deltas if c.get("steered") else None
        logits, heads = hf_forward(m32, c["ids"], d)
        res[c["name"]] = {"logits32": logits, "heads32": heads}
        if d is not None:
            alt, _ = hf_forward(m32, c["ids"], d, steer_form="post")
            res[c["name"]]["steer_forms"] = float(np.abs(alt[-1] - logits[-1]).max())
        log("hf fp32", c["name"])
    del m32

    m64 = load_hf(args.model, torch.float64)
    for c in cases:
        logits, heads = hf_forward(m64, c["ids"], deltas if c.get("steered") else None)
        res[c["name"]].update(logits64=logits, heads64=heads)
        log("hf fp64", c["name"])
    del m64

    npm = NumpyLlama(args.model)
    for c in cases:
        pos = [len(c["ids"]) - 1] + c.get("extra_positions", [])
        lg, heads = npm.forward(c["ids"], pos, deltas if c.get("steered") else None)
        res[c["name"]].update(np_logits=lg, np_heads=heads)
        log("numpy fp64", c["name"])
    del npm
    npm = NumpyLlama(args.model, np.float32)
    for c in cases:
        pos = [len(c["ids"]) - 1] + c.get("extra_positions", [])
        lg, heads = npm.forward(c["ids"], pos, deltas if c.get("steered") else None)
        res[c["name"]].update(np32_logits=lg, np32_heads=heads)
        log("numpy fp32", c["name"])
    del npm

    with tempfile.TemporaryDirectory() as tmp:
        f32 = args.keep_f32 or os.path.join(tmp, "model-f32.gguf")
        write_f32_copy(args.model, f32)
        for c in cases:
            if not c.get("steered"):
                res[c["name"]]["llamacpp"] = llama_cpp_logits(f32, c["ids"])
                log("llama.cpp F32", c["name"])

    # ---- compare, write ----
    failures = []

    def check(what, value, limit):
        if not value <= limit:
            failures.append(f"{what}: {value:.3g} > {limit:g}")
        return value

    steer_file = write_f32("steer_deltas.f32", deltas)
    out_cases = []
    for c in cases:
        r, name = res[c["name"]], c["name"]
        T = len(c["ids"])
        last = T - 1
        l32, l64, h32, h64 = r["logits32"], r["logits64"], r["heads32"], r["heads64"]
        x = {
            "numpy64_vs_hf64_logits": check(f"{name} numpy fp64 vs hf fp64 logits",
                                            max(float(np.abs(r["np_logits"][p] - l64[p]).max()) for p in r["np_logits"]),
                                            LIMIT_NUMPY_VS_HF64),
            "numpy64_vs_hf64_heads": check(f"{name} numpy fp64 vs hf fp64 heads",
                                           float(np.abs(r["np_heads"] - h64).max()), LIMIT_NUMPY_VS_HF64),
            "fp32_vs_fp64_logits_last": check(f"{name} fp32 vs fp64 logits", float(np.abs(l32[last] - l64[last]).max()),
                                              LIMIT_FP32_VS_FP64),
            "fp32_vs_fp64_logits_all_positions": float(np.abs(l32 - l64).max()),
            "fp32_vs_fp64_heads": float(np.abs(h32 - h64).max()),
            "fp32_vs_fp64_heads_rel": float(np.abs(h32 - h64).max() / np.abs(h64).max()),
            "numpy32_vs_golden_logits_last": check(f"{name} numpy fp32 vs golden logits",
                                                   float(np.abs(r["np32_logits"][last] - l32[last]).max()), LIMIT_NUMPY32),
            "numpy32_vs_golden_heads": check(f"{name} numpy fp32 vs golden heads",
                                             float(np.abs(r["np32_heads"] - h32).max()), LIMIT_NUMPY32),
        }
        if "llamacpp" in r:
            lc = r["llamacpp"]
            x["llamacpp_f32_vs_golden_logits_last"] = float(np.abs(lc[last] - l32[last]).max())
            x["llamacpp_f32_vs_golden_logits_all_positions"] = check(f"{name} llama.cpp vs golden",
                                                                      float(np.abs(lc - l32).max()), LIMIT_LLAMACPP)
            x["llamacpp_f32_vs_fp64_logits_all_positions"] = float(np.abs(lc - l64).max())
            x["llamacpp_top1_equal_all_positions"] = bool((lc.argmax(1) == l32.argmax(1)).all())
        if "steer_forms" in r:
            x["steer_prehook_vs_post_oproj_bias_logits"] = check(f"{name} steering forms", r["steer_forms"],
                                                                 LIMIT_STEER_FORMS)
        v = l32[last].astype(np.float32)
        srt = np.sort(v)[::-1]
        oc = {"name": name, "description": c["description"], "source": c["source"]}
        if "text" in c:
            oc["text"] = c["text"]
        oc.update({
            "n_tokens": T, "token_ids": c["ids"], "position": last,
            "logits_file": write_f32(f"{name}.logits.f32", v),
            "heads_file": write_f32(f"{name}.heads.f32", h32),
            "top1": top(v, 1)[0], "top5": top(v, TOP_K), "top5_pieces": [piece(i) for i in top(v, TOP_K)],
            "top1_margin": float(srt[0] - srt[1]), "top5_margin": float(srt[4] - srt[5]),
            "top5_min_gap": float(np.min(srt[:TOP_K] - srt[1:TOP_K + 1])),
            "max_abs_logit": float(np.abs(v).max()), "logit_mean": float(v.mean()), "logit_std": float(v.std()),
            "max_abs_head": float(np.abs(h32).max()), "head_rms": float(np.sqrt(np.mean(h32.astype(np.float64) ** 2))),
            "steering": None,
        })
        if c.get("steered"):
            oc["steering"] = {"file": steer_file, "pairs": [list(p) for p in STEER_PAIRS]}
        if c.get("extra_positions"):
            oc["extra_positions"] = []
            for p in c["extra_positions"]:
                vp = l32[p].astype(np.float32)
                oc["extra_positions"].append({
                    "position": p, "logits_file": write_f32(f"{name}.logits_p{p}.f32", vp),
                    "top1": top(vp, 1)[0], "top5": top(vp, TOP_K), "max_abs_logit": float(np.abs(vp).max()),
                    "fp32_vs_fp64_logits": float(np.abs(l32[p] - l64[p]).max()),
                    "numpy32_vs_golden_logits": float(np.abs(r["np32_logits"][p] - l32[p]).max()),
                    "llamacpp_f32_vs_golden_logits": float(np.abs(r["llamacpp"][p] - l32[p]).max())})
        oc["crosschecks"] = x
        out_cases.append(oc)
        log(name, json.dumps({k: oc[k] for k in ("n_tokens", "top1", "top5", "max_abs_logit")}), json.dumps(x))

    doc = {
        "about": "palign forward-pass goldens: logits and attention-head outputs of SmolLM2-135M-Instruct "
                 "(the default GGUF, dequantised to fp32) for fixed token ids. Made by "
                 "tests/golden/make_forward_golden.py; see tests/golden/README-forward.md.",
        "format_version": 1,
        "reference": "Hugging Face transformers LlamaForCausalLM, PyTorch CPU, float32, eager attention, "
                     "from_pretrained(gguf_file=...) (gguf-py dequantisation, transformers' Q/K un-permute)",
        "crosschecks_run": ["weights: palign's un-permute rule on gguf-py tensors == transformers' state dict, bitwise",
                            "float64: transformers in float64 with RMSNorm, RoPE angles and softmax in float64",
                            "numpy float64 Llama on the GGUF layout (RoPE on adjacent pairs, no un-permute)",
                            "the same numpy Llama in float32 (OpenBLAS sgemm), as a second float32 implementation",
                            "llama.cpp (llama-cpp-python) on an F32 GGUF copy, F32 KV cache, every position",
                            "steering: pre-o_proj displacement == post-o_proj bias W_o delta",
                            "token ids: llama.cpp == tokenizers; PAS prompts == tokenizer/smollm2_papi.txt"],
        "model": {"file": os.path.basename(args.model), "sha256": sha256(args.model), "arch": "llama",
                  "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size, "n_head": cfg.num_attention_heads,
                  "n_head_kv": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "n_ff": cfg.intermediate_size,
                  "n_vocab": cfg.vocab_size, "rope_theta": cfg.rope_parameters["rope_theta"],
                  "rms_eps": cfg.rms_norm_eps, "tied_embeddings": bool(cfg.tie_word_embeddings)},
        "tokenization": "llama.cpp vocab_only, special tokens parsed (raw text case: not parsed; no special "
                        "text in it), no BOS added; feed token_ids as they are, positions 0..n_tokens-1",
        "layout": {"logits_file": "n_vocab float32 little-endian: logits of position `position` (the last)",
                   "heads_file": "[n_layer][n_head][head_dim] float32 little-endian: o_proj input (head "
                                 "outputs before W_o) at the last position; for a steered case after the displacement",
                   "extra_positions": "logits at 0-based positions inside the sequence (causal: they depend "
                                      "on tokens 0..position only)",
                   "steering_file": "[len(pairs)][head_dim] float32 little-endian, row i for pairs[i]"},
        "steering": {"file": steer_file, "pairs": [list(p) for p in STEER_PAIRS], "head_dim": 64,
                     "generator": f"numpy.random.default_rng({STEER_SEED}).standard_normal((4, 64)) * "
                                  f"{STEER_SCALE}, cast to float32",
                     "applied": "delta[i] added to o_proj's input slice [h*64:(h+1)*64] of layer l, "
                                "(l, h) = pairs[i], at every position, before W_o"},
        "limits_checked": {"numpy64_vs_hf64": LIMIT_NUMPY_VS_HF64, "fp32_vs_fp64_logits": LIMIT_FP32_VS_FP64,
                           "llamacpp_vs_golden": LIMIT_LLAMACPP, "steer_forms": LIMIT_STEER_FORMS,
                           "numpy32_vs_golden": LIMIT_NUMPY32},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "cases": out_cases,
    }
    # indented, with the lists of numbers on one line each
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\s+(-?[0-9][0-9.e+-]*(?:,\s+-?[0-9][0-9.e+-]*)*)\s+\]",
                  lambda mt: "[" + re.sub(r",\s+", ", ", mt.group(1)) + "]", text)
    assert json.loads(text) == doc
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    log(f"wrote {OUT}: {total} bytes")
    if failures:
        sys.exit("cross-checks failed:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
