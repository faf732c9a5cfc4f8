#!/usr/bin/env python3
"""Goldens and cross-checks for palign's safetensors reader and `palign mkmodel`.

Independent implementations (the Hugging Face `safetensors` and `tokenizers`
packages, `gguf` from llama.cpp, optionally `transformers`) judge the files
palign reads and writes.

  golden --palign CMD   (re)writes tests/golden/safetensors/:
      reference.st-fixture   written by the safetensors package itself, one
                              tensor of each interesting kind; test_safetensors
                              checks palign reads back exactly these values
      mkmodel_encodings.json  how `tokenizers` encodes a few texts with the
                              default mkmodel tokenizer (for tokenizer tests)
  check --palign CMD    writes models with `CMD mkmodel ...` in several
                        configurations and checks each: the safetensors load,
                        GGUF and safetensors hold the same fp32 weights once the
                        Q/K row permutation is undone, both describe the same
                        tokenizer, `tokenizers` loads tokenizer.json and
                        round-trips text, the chat template renders ChatML.

CMD is a palign binary (e.g. build/palign). Needs: numpy, safetensors,
tokenizers, gguf, jinja2 (pip install them in a venv); transformers is used
when present.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "safetensors")

TEXTS = [
    "Hello world! I am 34 years old, and they're   careful.",
    "I worry about things.\n\nAnswer: (B). Moderately Accurate",
    "Openness describes a person who is curious, imaginative and interested in new ideas.",
    "  leading spaces, tabs\tand 1234567890 digits",
    "Caf\u00e9 na\u00efve \u2014 unicode",
]

CHATML_EXPECTED = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
)


def die(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


# ---- the reference file -------------------------------------------------------------


def write_reference(path):
    from safetensors import TensorSpec, serialize_file

    arrays = {
        "f32": ("float32", [2, 3], np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5], dtype="<f4")),
        "f16": ("float16", [4], np.array([0.5, -2.0, 65504.0, 2.0**-14], dtype="<f2")),
        # numpy has no bfloat16: raw bits of 1.0, -2.0, 0.25, +inf
        "bf16": ("bfloat16", [2, 2], np.array([0x3F80, 0xC000, 0x3E80, 0x7F80], dtype="<u2")),
        "f16_3d": ("float16", [2, 1, 2], np.array([1, 2, 3, 4], dtype="<f2")),
        "i64": ("int64", [3], np.array([1, -2, 3], dtype="<i8")),
        "u8": ("uint8", [2], np.array([7, 9], dtype="u1")),
        "scalar": ("float32", [], np.array([3.25], dtype="<f4")),
        "empty": ("float32", [0, 4], np.zeros(0, dtype="<f4")),
    }
    specs = {
        name: TensorSpec(dtype=dtype, shape=shape, data_ptr=a.ctypes.data, data_len=a.nbytes) for name, (dtype, shape, a) in arrays.items()
    }
    # one metadata key: the writer keeps them in a hash map, so two would come
    # out in a different order from run to run
    serialize_file(specs, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)


# ---- reading palign's output ---------------------------------------------------------------


def to_f32(dtype, shape, data):
    if dtype == "F32":
        a = np.frombuffer(data, dtype="<f4")
    elif dtype == "F16":
        a = np.frombuffer(data, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        a = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        die("unexpected dtype " + dtype)
    return a.reshape(shape)


def load_hf_weights(d):
    from safetensors import deserialize, safe_open

    single = os.path.join(d, "model.safetensors")
    if os.path.exists(single):
        files = ["model.safetensors"]
        wmap = None
    else:
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            wmap = json.load(f)["weight_map"]
        files = sorted(set(wmap.values()))
    out = {}
    for fn in files:
        p = os.path.join(d, fn)
        with open(p, "rb") as f:
            tensors = deserialize(f.read())
        with safe_open(p, framework="numpy") as so:
            if so.metadata() != {"format": "pt"}:
                die(f"{p}: metadata {so.metadata()}")
        for name, t in tensors:
            if wmap is not None and wmap.get(name) != fn:
                die(f"{p}: tensor {name} is not mapped to this shard")
            out[name] = to_f32(t["dtype"], t["shape"], bytes(t["data"]))
    if wmap is not None and set(wmap) != set(out):
        die(f"{d}: index and shards list different tensors")
    return out


def gguf_weights(r):
    out = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        raw = np.asarray(t.data)
        if int(t.tensor_type) == 30:  # BF16: raw bits
            a = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = raw.astype(np.float32)
        out[t.name] = a.reshape(shape)
    return out


def field(r, key):
    f = r.fields[key]
    return f.contents()


def hf_to_gguf_name(name):
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm.weight": "attn_norm",
        "self_attn.q_proj.weight": "attn_q",
        "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v",
        "self_attn.o_proj.weight": "attn_output",
        "post_attention_layernorm.weight": "ffn_norm",
        "mlp.gate_proj.weight": "ffn_gate",
        "mlp.up_proj.weight": "ffn_up",
        "mlp.down_proj.weight": "ffn_down",
    }
    return f"blk.{i}.{table[rest]}.weight"


def unpermute(w, n_head):
    """GGUF's interleaved Q/K rows back to Hugging Face's rotate-half order."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def check_pair(hf_dir, gguf_path, untied):
    import gguf
    from tokenizers import Tokenizer

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    r = gguf.GGUFReader(gguf_path)
    meta = {
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.context_length": cfg["max_position_embeddings"],
        "llama.rope.dimension_count": cfg["head_dim"],
        "llama.vocab_size": cfg["vocab_size"],
    }
    for k, v in meta.items():
        if field(r, k) != v:
            die(f"{gguf_path}: {k} = {field(r, k)}, config.json says {v}")
    if np.float32(field(r, "llama.rope.freq_base")) != np.float32(cfg["rope_theta"]):
        die("rope_theta differs")
    if np.float32(field(r, "llama.attention.layer_norm_rms_epsilon")) != np.float32(cfg["rms_norm_eps"]):
        die("rms_norm_eps differs")
    if field(r, "general.architecture") != "llama" or cfg["architectures"] != ["LlamaForCausalLM"]:
        die("architecture")
    if cfg["tie_word_embeddings"] == untied:
        die("tie_word_embeddings")

    hf = load_hf_weights(hf_dir)
    gg = gguf_weights(r)
    if len(hf) != len(gg):
        die(f"{len(hf)} safetensors tensors, {len(gg)} GGUF tensors")
    for name, w in hf.items():
        g = gg[hf_to_gguf_name(name)]
        if ".q_proj." in name:
            g = unpermute(g, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            g = unpermute(g, cfg["num_key_value_heads"])
        if g.shape != w.shape or not np.array_equal(g, w):
            die(f"{name}: the GGUF and safetensors weights differ")
        if w.ndim == 2 and not (0.015 < float(w.std()) < 0.025):
            die(f"{name}: std {w.std()} is not about 0.02")
        if w.ndim == 1 and not (w.min() >= 0.89 and w.max() <= 1.11):
            die(f"{name}: norm weights outside [0.9, 1.1]")
    if ("lm_head.weight" in hf) != untied:
        die("lm_head.weight presence")

    tok = Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    tokens = field(r, "tokenizer.ggml.tokens")
    if tok.get_vocab_size() != cfg["vocab_size"] or len(tokens) != cfg["vocab_size"]:
        die("vocab sizes differ")
    for i, t in enumerate(tokens):
        if tok.id_to_token(i) != t:
            die(f"token {i}: {tok.id_to_token(i)!r} vs GGUF {t!r}")
    with open(os.path.join(hf_dir, "tokenizer.json")) as f:
        tj = json.load(f)
    if tj["model"]["merges"] != list(field(r, "tokenizer.ggml.merges")):
        die("merges differ")
    types = list(field(r, "tokenizer.ggml.token_type"))
    if types[:3] != [3, 3, 3] or set(types[3:]) != {1}:
        die("token types")
    for sp, i in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        if tok.token_to_id(sp) != i:
            die(f"{sp} is not id {i}")
    if (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) != (1, 2):
        die("bos/eos ids")
    for text in TEXTS:
        enc = tok.encode(text)
        if tok.decode(enc.ids, skip_special_tokens=False) != text:
            die(f"round trip of {text!r}")

    with open(os.path.join(hf_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    if tc["chat_template"] != field(r, "tokenizer.chat_template"):
        die("chat templates differ")
    if (tc["bos_token"], tc["eos_token"]) != ("<|im_start|>", "<|im_end|>"):
        die("bos/eos tokens")
    import jinja2

    rendered = jinja2.Template(tc["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi there"}], add_generation_prompt=True
    )
    if rendered != CHATML_EXPECTED:
        die(f"chat template renders {rendered!r}")
    try:
        import transformers
    except ImportError:
        print("  (transformers not installed: AutoConfig/AutoTokenizer checks skipped)")
        return
    ac = transformers.AutoConfig.from_pretrained(hf_dir)
    if ac.model_type != "llama" or ac.hidden_size != cfg["hidden_size"]:
        die("transformers reads another config")
    at = transformers.AutoTokenizer.from_pretrained(hf_dir)
    s = at.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True)
    if s != CHATML_EXPECTED:
        die(f"transformers renders {s!r}")
    for text in TEXTS:
        if at(text)["input_ids"] != tok.encode(text).ids:
            die(f"transformers and tokenizers encode {text!r} differently")


CONFIGS = [
    [],
    ["--dtype", "f16", "--untied", "--seed", "7"],
    ["--dtype", "bf16", "--layers", "3", "--dim", "96", "--heads", "6", "--kv-heads", "3", "--merges", "500"],
    ["--dim", "32", "--heads", "2", "--kv-heads", "1", "--ffn", "48", "--merges", "0"],
]


def run_mkmodel(palign, out, args):
    cmd = shlex.split(palign) + ["mkmodel", out] + args
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        die(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr}")


def cmd_check(a):
    with tempfile.TemporaryDirectory() as tmp:
        for k, args in enumerate(CONFIGS):
            for shards in ([], ["--shards", "3"]):
                hf = os.path.join(tmp, f"hf{k}-{len(shards)}")
                gg = os.path.join(tmp, f"m{k}.gguf")
                run_mkmodel(a.palign, hf, args + shards)
                if not os.path.exists(gg):
                    run_mkmodel(a.palign, gg, args)
                print(f"checking mkmodel {' '.join(args + shards) or '(defaults)'}")
                check_pair(hf, gg, "--untied" in args)
    print("all mkmodel checks passed")


def cmd_golden(a):
    from tokenizers import Tokenizer

    os.makedirs(OUT, exist_ok=True)
    write_reference(os.path.join(OUT, "reference.st-fixture"))
    with tempfile.TemporaryDirectory() as tmp:
        hf = os.path.join(tmp, "m")
        run_mkmodel(a.palign, hf, [])
        tok = Tokenizer.from_file(os.path.join(hf, "tokenizer.json"))
        with open(os.path.join(hf, "tokenizer.json")) as f:
            merges = json.load(f)["model"]["merges"]
        g = {
            "about": "tokenizers' encodings with the default `palign mkmodel` tokenizer "
            "(make_safetensors_golden.py golden)",
            "vocab_size": tok.get_vocab_size(),
            "first_merges": merges[:10],
            "encodings": [{"text": t, "ids": tok.encode(t).ids} for t in TEXTS],
        }
    # one encoding per line keeps the file short and its diffs readable
    lines = [",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in g.pop("encodings"))]
    head = json.dumps(g, indent=1, ensure_ascii=False)[:-2]
    with open(os.path.join(OUT, "mkmodel_encodings.json"), "w") as f:
        f.write(head + ',\n "encodings": [\n' + lines[0] + "\n ]\n}\n")
    print("wrote", OUT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("golden", "check"):
        p = sub.add_parser(name)
        p.add_argument("--palign", required=True, help="palign binary (a command line; 'mkmodel' is appended)")
    a = ap.parse_args()
    {"golden": cmd_golden, "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    main()
