#!/usr/bin/env python3
"""Golden token ids and chat prompts for palign's tokenizer and chat templates,
made by independent implementations.

References (none of them shares code with palign's C):
  * llama.cpp, through llama-cpp-python (Llama(vocab_only=True)), reading the
    same GGUF files palign reads.                      <- THE GOLDEN for GGUF
  * Hugging Face `tokenizers`, on a tokenizer.json.   <- THE GOLDEN for JSON
    For the default model it is rebuilt from the GGUF's vocabulary and merges
    with SmolLM2's own pre-tokenizer (Sequence[Digits(individual_digits),
    ByteLevel(use_regex)], no normalizer), since huggingface.co cannot be
    reached from the build machines; every default-model case is encoded by
    both references and the script stops unless they agree on every id.
  * Python's jinja2, rendering the real chat templates (SmolLM2's from the
    GGUF; Llama-3's and Mistral-Instruct's as llama-cpp-python ships them;
    Meta's Llama-2 template, written out below) in the sandbox settings
    transformers uses.

Writes tests/golden/tokenizer/:
  smollm2_papi.txt      ids of the PAS prompts (PAS.md) under SmolLM2's ChatML:
                        every IPIP-NEO item question, item text lowercased and as
                        written, with the default system prompt and the assistant
                        turn opened with "Option ("; and the ICL system prompt of
                        the first three subjects of Test-set.json with the first
                        test item. Ids only: the C test rebuilds the prompts from
                        the PAPI files at run time (PAPI is never committed).
  smollm2_strings.txt   ids of hand-written strings (digits, non-ASCII, spaces,
                        newlines, special-token text with and without parsing).
  tiny_spm.json, tiny_spm_config.json, tiny_spm.tok-gguf
                        a small SentencePiece-style tokenizer (BPE, byte
                        fallback, Prepend+Replace normalizer as Llama-2), trained
                        here with `tokenizers`, and its GGUF form (model "llama",
                        scores = minus merge rank, token types).
  tiny_spm_json.txt     ids `tokenizers` gives for the test strings.
  tiny_spm_gguf.txt     ids llama.cpp gives for them from tiny_spm.tok-gguf.
  tiny_bl.json, tiny_bl.tok-gguf, tiny_bl_json.txt, tiny_bl_gguf.txt
                        the same for a small byte-level tokenizer with Llama-3's
                        Split regex and ignore_merges (GGUF: gpt2 / llama-bpe).
  tiny_mistral.json, tiny_mistral_json.txt
                        the tiny SentencePiece vocabulary with a Mistral-style
                        Metaspace(prepend_scheme=first) pre-tokenizer.
  variants.json         variants of the tiny tokenizers (Split behaviours, Digits,
                        ByteLevel's prefix, lstrip/rstrip added tokens, Metaspace
                        schemes, unknown-token fusing, Replace) and the ids
                        `tokenizers` gives for a list of strings.
  chat.json             chat prompts rendered by jinja2 for every format.

Line formats (parsed by tests/test_tokenizer.c and tests/test_default_tokenizer.c):
  strings files:  FLAGS HEXTEXT N id1 .. idN      (HEXTEXT "-" for the empty
                  string; FLAGS: 1 parse special tokens, 2 add BOS/EOS,
                  4 llama.cpp's ids where tokenizers' differ, 8 tokenizers'
                  ids where llama.cpp's differ)
  smollm2_papi:   KIND ITEM FORM P S M id1 .. idM  (KIND item|icl; FORM lower|
                  orig; ICL lines give the subject's index in Test-set.json as
                  ITEM. The full ids are the first P ids of the previous line,
                  then the M ids listed, then the last S ids of the previous line.)

Usage (needs: pip install llama-cpp-python tokenizers jinja2 gguf numpy):
  PALIGN_MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf PALIGN_PAPI_DIR=../shared/papi \
      python3 tests/golden/make_tokenizer_golden.py [--hf-json OUT]
--hf-json also writes the rebuilt SmolLM2 tokenizer.json (3.5 MB, not
committed); tests/test_default_tokenizer.c checks palign's JSON loader on it
when PALIGN_SMOLLM2_TOKENIZER_JSON names it.
"""
import argparse
import csv
import importlib.metadata
import json
import os
import sys

import jinja2
import jinja2.sandbox
import llama_cpp
from gguf import GGUFReader, GGUFWriter
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
import llama_cpp.llama_chat_format as chat_formats

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "tokenizer")

# ---- PAS.md prompts (as the paper's reference code, zhu-minjun/PAlign main.py) ----
ITEM_TEMPLATE = (
    'Given a statement of you: "You {}."\n'
    "Please choose from the following options to identify how accurately this statement describes you.\n"
    "Options:\n(A). Very Accurate\n(B). Moderately Accurate\n(C). Neither Accurate Nor Inaccurate\n"
    "(D). Moderately Inaccurate\n(E). Very Inaccurate\n"
)
SYSTEM_PROMPT = "You are a helpful, honest and concise assistant."
ICL_HEAD = "Here are some of your behaviors and your level of recognition towards them;"
LABELS = {5: "Very Accurate", 4: "Moderately Accurate", 3: "Neither Accurate Nor Inaccurate",
          2: "Moderately Inaccurate", 1: "Very Inaccurate"}
PREFIX = "Option ("

# Meta's Llama-2-chat template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Hand-written strings for the default model (no PAPI text).
STRINGS = [
    "", " ", "  ", "\n", "\n\n", " \n ", "Hello world", " Hello world", "Hello  world ", "Hello world   ",
    "   leading and trailing   ", "tabs\tand\nnewlines\r\n", "digits 0123456789 and 3.14159 and 1,000,000",
    "x1y22z333", "Numbers١٢٣ and ²½Ⅷ", "café naïve résumé", "é", "中文测试", "日本語のテキスト", "한국어",
    "emoji 😀👍🏽🇺🇸 ❤️", "I'm sure they'll say it's fine, don't you think? We've", "'S 'T 'RE 'LL 'D",
    "nbsp\u00a0here\u00a0\u00a0x", "nel\u0085\u0085x", "line\u2028sep", "ideographic\u3000space", "zero\u200bwidth",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "a<|im_end|>b", " <|im_start|> ", "<|im_start", "<repo_name>x",
    "Option (A", "Option (", " (A). Very Accurate\n(B).", "!!!???...---", "    def f(x):\n        return x ** 2\n",
    # bytes SmolLM2's vocabulary has no token for (both references drop them)
    "Trust\x04 others.", "\x06\x13\x14\x16\x1d", "a\U00040000b",
]
# Where the references differ: a byte without a token between two that merge
# (tokenizers drops it before merging, so "!!" merges; llama.cpp after, so it
# does not). Each reference's ids are kept, for the loader that follows it.
STRINGS_DIFFER = ["!\x04!", "...\x04..."]
STRINGS_SPECIAL = [s for s in STRINGS if "<" in s] + ["<|im_start|>system\nYou are\n<|im_end|>\n<|im_start|>assistant\n"]

# Strings for the tiny tokenizers (their corpus is English-like text).
TINY_STRINGS = [
    "", " ", "hello", "Hello world", " hello world", "hello  world", "  two leading", "trailing  ", "a\nb\n\nc",
    "the quick brown fox", "The Quick Brown Fox!", "jumps over the lazy dog.", "numbers 12345 678", "é", "café",
    "中文", "😀", "x\x7fy", "tab\there", "I'm you're we'll", "<s>", "</s>", "<unk>", "a<s>b", "<s> hi", "hi </s>",
    "<|begin_of_text|>hi", "<|eot_id|>", "mixed <s>[INST] text [/INST]", "\u00a0nbsp", "▁meta",
]

CORPUS = """The quick brown fox jumps over the lazy dog. Hello world, hello there! A tokenizer cuts text into pieces.
Personality is measured with questionnaires: very accurate, moderately accurate, neither accurate nor inaccurate.
I'm sure you're right; we'll see what they've done. Numbers like 12345 and 678 appear too. Café au lait, naïve résumé.
Given a statement of you, please choose from the following options to identify how accurately it describes you.
Enjoy long walks. Read many books. Like tidy desks. Answer letters quickly. Sing in the shower sometimes.
""" * 4


def sandbox():
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env


def gguf_strings(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def gguf_scalar(r, key):
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode("utf-8") if f.types[0].name == "STRING" else v[0]


# ---- chat rendering with the real templates ----

class Chat:
    def __init__(self, name, source, bos, eos, end, fold_system=False):
        self.name, self.tmpl, self.bos, self.eos = name, sandbox().from_string(source), bos, eos
        self.end = end  # what the template writes after an assistant message
        self.fold_system = fold_system  # the template has no system role

    def render(self, system, user, prefix):
        msgs = []
        if system is not None and not self.fold_system:
            msgs.append({"role": "system", "content": system})
        if system is not None and self.fold_system:
            user = system + "\n\n" + user
        msgs.append({"role": "user", "content": user})
        if prefix:
            msgs.append({"role": "assistant", "content": prefix})
        text = self.tmpl.render(messages=msgs, bos_token=self.bos, eos_token=self.eos,
                                add_generation_prompt=not prefix)
        if prefix:
            assert text.endswith(self.end), (self.name, text)
            text = text[: -len(self.end)]
        return text


def chat_goldens(smol_template):
    chats = {
        "smollm2": Chat("smollm2", smol_template, "<|im_start|>", "<|im_end|>", "<|im_end|>\n"),
        "chatml": Chat("chatml", chat_formats.CHATML_CHAT_TEMPLATE, "", "<|im_end|>", "<|im_end|>\n"),
        "llama3": Chat("llama3", chat_formats.LLAMA3_INSTRUCT_CHAT_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
                       "<|eot_id|>"),
        "llama2": Chat("llama2", LLAMA2_TEMPLATE, "<s>", "</s>", " </s>"),
        "mistral": Chat("mistral", chat_formats.MISTRAL_INSTRUCT_CHAT_TEMPLATE, "<s>", "</s>", "</s> ",
                        fold_system=True),
    }
    inputs = [
        (None, "Hello", None), (None, "Hello", "Option ("), ("Be brief.", "Hello", None),
        ("Be brief.", "Hello", "Option ("), ("", "Hi", ""), ("  sys with spaces \n", " user text \n\n", " Option ( "),
        ("multi\nline\nsystem", "Given a statement:\n(A). x\n", "Option"),
        ("\u00a0nbsp system\u2003", "\x1cuser\u3000", "\u2028prefix\u0085"), ("s", "", "p"),
        (SYSTEM_PROMPT, ITEM_TEMPLATE.format("enjoy testing tokenizers."), PREFIX),
    ]
    cases = []
    for name, chat in chats.items():
        for system, user, prefix in inputs:
            cases.append({"template": name, "system": system, "user": user, "prefix": prefix,
                          "expected": chat.render(system, user, prefix)})
    return chats, cases


# ---- the default model ----

def smollm2_references(model):
    r = GGUFReader(model)
    toks = gguf_strings(r, "tokenizer.ggml.tokens")
    merges = gguf_strings(r, "tokenizer.ggml.merges")
    tt = r.fields["tokenizer.ggml.token_type"]
    types = [int(tt.parts[i][0]) for i in tt.data]
    assert gguf_scalar(r, "tokenizer.ggml.model") == "gpt2" and gguf_scalar(r, "tokenizer.ggml.pre") == "smollm"
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(toks)},
                              merges=[tuple(m.split(" ", 1)) for m in merges]))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(toks[i], special=True, normalized=False)
                           for i in range(len(toks)) if types[i] == 3])
    ll = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    template = gguf_scalar(r, "tokenizer.chat_template")
    return ll, hf, template


def encode_both(ll, hf, text, parse_special):
    a = ll.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)
    hf.encode_special_tokens = not parse_special
    b = hf.encode(text, add_special_tokens=False).ids
    if a != b:
        sys.exit(f"llama.cpp and tokenizers disagree on {text[:80]!r}:\n  {a}\n  {b}")
    return a


def encode_each(ll, hf, text):
    a = ll.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    hf.encode_special_tokens = True
    b = hf.encode(text, add_special_tokens=False).ids
    if a == b:
        sys.exit(f"llama.cpp and tokenizers now agree on {text[:80]!r} ({a}): move it to STRINGS")
    return [(4, text, a), (8, text, b)]


def papi(papi_dir):
    with open(os.path.join(papi_dir, "ipip_neo_300_items.csv"), newline="", encoding="utf-8") as f:
        items = {int(row["item"]): row["text"] for row in csv.DictReader(f)}
    assert sorted(items) == list(range(1, 301))
    # the C test lowercases with ASCII rules; that is Python's lower() only for ASCII text
    assert all(t.isascii() for t in items.values())
    with open(os.path.join(papi_dir, "Test-set.json"), encoding="utf-8") as f:
        subjects = json.load(f)
    with open(os.path.join(papi_dir, "mpi_300_split.json"), encoding="utf-8") as f:
        split = json.load(f)
    return items, subjects, split


def delta_lines(rows):
    """rows: (kind, item, form, ids) -> lines sharing prefix/suffix with the previous row."""
    out, prev = [], []
    for kind, item, form, ids in rows:
        p = 0
        while p < min(len(ids), len(prev)) and ids[p] == prev[p]:
            p += 1
        s = 0
        while s < min(len(ids), len(prev)) - p and ids[-1 - s] == prev[-1 - s]:
            s += 1
        mid = ids[p:len(ids) - s]
        out.append(f"{kind} {item} {form} {p} {s} {len(mid)} " + " ".join(map(str, mid)))
        prev = ids
    return out


def strings_lines(cases):
    lines = []
    for flags, text, ids in cases:
        hx = text.encode("utf-8").hex() if text else "-"
        lines.append(f"{flags} {hx} {len(ids)} " + " ".join(map(str, ids)))
    return lines


def write(name, header, lines):
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
        for h in header:
            f.write("# " + h + "\n")
        for line in lines:
            f.write(line.rstrip() + "\n")


def versions():
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("llama_cpp_python", "tokenizers", "jinja2"))


# ---- tiny tokenizers ----

SPM_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def train_tiny_spm():
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=3 + 256 + 260, special_tokens=["<unk>", "<s>", "</s>"] + SPM_BYTES,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    d = json.loads(tok.to_str())
    # Llama-2's files keep the byte tokens in the vocabulary only, not as added tokens
    d["added_tokens"] = [a for a in d["added_tokens"] if a["content"] in ("<unk>", "<s>", "</s>")]
    d["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    return d


def train_tiny_bl():
    llama3_re = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(llama3_re), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=256 + 5 + 300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    d = json.loads(tok.to_str())
    d["model"]["ignore_merges"] = True
    return d


def merges_of(d):
    return [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]


def write_gguf(path, d, model, pre=None):
    vocab = d["model"]["vocab"]
    toks = [None] * len(vocab)
    for t, i in vocab.items():
        toks[i] = t
    added = {a["content"]: a for a in d["added_tokens"]}
    merges = merges_of(d)
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    w = GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(toks)
    types = []
    for t in toks:
        if t == "<unk>":
            types.append(2)
        elif t in added:
            types.append(3)
        elif model == "llama" and t in SPM_BYTES:
            types.append(6)
        else:
            types.append(1)
    w.add_token_types(types)
    if model == "llama":
        # SentencePiece merges the pair whose result scores highest: minus the rank
        w.add_token_scores([-float(rank[t]) if t in rank else 0.0 for t in toks])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)
    else:
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab["<|begin_of_text|>"])
        w.add_eos_token_id(vocab["<|end_of_text|>"])
        w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny(name, d, gguf_model, gguf_pre, config=None):
    jpath = os.path.join(OUT, name + ".json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(d, f, ensure_ascii=False, separators=(",", ":"))
    if config:
        with open(os.path.join(OUT, name + "_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
    hf = Tokenizer.from_file(jpath)
    cases = []
    for flags in (0, 1, 3):
        for s in TINY_STRINGS:
            hf.encode_special_tokens = not (flags & 1)
            cases.append((flags, s, hf.encode(s, add_special_tokens=bool(flags & 2)).ids))
    write(name + "_json.txt", [f"ids by tokenizers {importlib.metadata.version('tokenizers')} from {name}.json"],
          strings_lines(cases))
    if gguf_model:
        gpath = os.path.join(OUT, name + ".tok-gguf")  # not .gguf: a tokenizer fixture, no weights
        write_gguf(gpath, d, gguf_model, gguf_pre)
        ll = llama_cpp.Llama(model_path=gpath, vocab_only=True, verbose=False)
        cases = []
        for flags in (0, 1, 3):
            for s in TINY_STRINGS:
                cases.append((flags, s, ll.tokenize(s.encode(), add_bos=bool(flags & 2), special=bool(flags & 1))))
        write(name + "_gguf.txt", [f"ids by llama.cpp (llama-cpp-python {importlib.metadata.version('llama_cpp_python')}) from {name}.tok-gguf"],
              strings_lines(cases))


def variants(bases):
    """Feature checks against tokenizers: each variant patches a tiny tokenizer.json."""
    bl = lambda use_regex=False: {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": use_regex}
    seq = lambda *p: {"type": "Sequence", "pretokenizers": list(p)}
    split = lambda pat, beh, inv=False, lit=False: {"type": "Split", "pattern": {"String" if lit else "Regex": pat},
                                                    "behavior": beh, "invert": inv}
    added = json.loads(json.dumps(bases["tiny_bl"]["added_tokens"]))
    for a in added:
        if a["content"] == "<|eot_id|>":
            a["lstrip"] = a["rstrip"] = True
    n_bl = len(bases["tiny_bl"]["model"]["vocab"])
    added.append({"id": n_bl, "content": "[X]", "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": False})
    specs = [
        ("split_removed", "tiny_bl", {"pre_tokenizer": seq(split(r"\s+", "Removed"), bl())}, {}),
        ("split_merged_prev", "tiny_bl", {"pre_tokenizer": seq(split(" ", "MergedWithPrevious", lit=True), bl())}, {}),
        ("split_merged_next", "tiny_bl", {"pre_tokenizer": seq(split(" ", "MergedWithNext", lit=True), bl())}, {}),
        ("split_contiguous", "tiny_bl", {"pre_tokenizer": seq(split("[aeiou ]", "Contiguous"), bl())}, {}),
        ("split_invert", "tiny_bl", {"pre_tokenizer": seq(split(r"\p{L}+", "Isolated", inv=True), bl())}, {}),
        ("split_literal_meta", "tiny_bl", {"pre_tokenizer": seq(split("o.", "Isolated", lit=True), bl())}, {}),
        ("bytelevel_prefix", "tiny_bl", {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True,
                                                           "trim_offsets": True, "use_regex": True}}, {}),
        ("digits_grouped", "tiny_bl", {"pre_tokenizer": seq({"type": "Digits", "individual_digits": False},
                                                            bl(True))}, {}),
        ("added_strip", "tiny_bl", {"added_tokens": added}, {}),
        ("no_ignore_merges", "tiny_bl", {}, {"ignore_merges": False}),
        ("metaspace_always_split", "tiny_spm", {"normalizer": None, "pre_tokenizer": {
            "type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}}, {}),
        ("metaspace_never", "tiny_spm", {"normalizer": None, "pre_tokenizer": {
            "type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}}, {}),
        ("unk_fused", "tiny_spm", {}, {"byte_fallback": False, "fuse_unk": True}),
        ("unk_unfused", "tiny_spm", {}, {"byte_fallback": False, "fuse_unk": False}),
        ("normalizer_replace", "tiny_spm", {"normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "hello"}, "content": "jello"},
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}},
         {}),
    ]
    texts = TINY_STRINGS + ["a,b  c", "x<|eot_id|>  y", "x  <|eot_id|>y", " [X] z", "[X][X]", "oo.o.x", "a1b22c333d4444",
                            "中😀中", "hello hello"]
    out = []
    for name, base, patch, mpatch in specs:
        d = json.loads(json.dumps(bases[base]))
        d.update(patch)
        d["model"].update(mpatch)
        hf = Tokenizer.from_str(json.dumps(d))
        cases = []
        for flags in (0, 1):
            for s in texts:
                hf.encode_special_tokens = not (flags & 1)
                cases.append([flags, s, hf.encode(s, add_special_tokens=False).ids])
        out.append({"name": name, "base": base, "patch": patch, "model_patch": mpatch, "cases": cases})
    with open(os.path.join(OUT, "variants.json"), "w", encoding="utf-8") as f:
        json.dump({"about": "tiny tokenizer.json variants: base file, keys replaced, model keys replaced, and the ids "
                   "tokenizers " + importlib.metadata.version("tokenizers") + " gives (FLAGS 1: special tokens parsed)",
                   "variants": out}, f, ensure_ascii=False, separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-json", help="also write the rebuilt SmolLM2 tokenizer.json here")
    args = ap.parse_args()
    cache = os.environ.get("PALIGN_CACHE") or os.path.expanduser("~/.cache/palign")
    model = os.environ.get("PALIGN_MODEL") or os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf")
    papi_dir = os.environ.get("PALIGN_PAPI_DIR") or os.path.join(REPO, "..", "shared", "papi")
    os.makedirs(OUT, exist_ok=True)

    ll, hf, smol_template = smollm2_references(model)
    if args.hf_json:
        hf.save(args.hf_json)
    chats, chat_cases = chat_goldens(smol_template)
    with open(os.path.join(OUT, "chat.json"), "w", encoding="utf-8") as f:
        json.dump({"about": "chat prompts rendered by jinja2 " + importlib.metadata.version("jinja2") +
                   " from each format's real template; palign's render must equal 'expected'",
                   "cases": chat_cases}, f, ensure_ascii=False, indent=1)

    # PAS prompts under SmolLM2's template, encoded with special-token parsing
    items, subjects, split = papi(papi_dir)
    chat = chats["smollm2"]
    rows = []
    for i in range(1, 301):
        for form in ("lower", "orig"):
            text = items[i].lower() if form == "lower" else items[i]
            prompt = chat.render(SYSTEM_PROMPT, ITEM_TEMPLATE.format(text), PREFIX)
            rows.append(("item", i, form, encode_both(ll, hf, prompt, True)))
    question = ITEM_TEMPLATE.format(items[split["test_index"][0]].lower())
    for s in range(3):
        answers = subjects[s]
        parts = [f"{items[i]}:{LABELS[answers[f'i{i}']]}" for i in split["train_index"] if answers[f"i{i}"] != 0]
        prompt = chat.render(ICL_HEAD + ";".join(parts), question, PREFIX)
        rows.append(("icl", s, "lower", encode_both(ll, hf, prompt, True)))
    model_name = os.path.basename(model)
    write("smollm2_papi.txt", [
        f"PAS prompts (PAS.md) under {model_name}'s ChatML template, system '{SYSTEM_PROMPT}', prefix '{PREFIX}'.",
        "Golden: llama.cpp; Hugging Face tokenizers (SmolLM2's pre-tokenizer on the GGUF vocabulary) agreed on every id.",
        versions(), "KIND ITEM FORM P S M ids (see make_tokenizer_golden.py)"], delta_lines(rows))

    cases = [(0, s, encode_both(ll, hf, s, False)) for s in STRINGS]
    cases += [(1, s, encode_both(ll, hf, s, True)) for s in STRINGS_SPECIAL]
    cases += [c for s in STRINGS_DIFFER for c in encode_each(ll, hf, s)]
    write("smollm2_strings.txt", [
        f"hand-written strings, {model_name}. Golden: llama.cpp; Hugging Face tokenizers agreed on every id "
        "but those of the FLAGS 4 and 8 lines (llama.cpp's and theirs).",
        versions(), "FLAGS HEXTEXT N ids"], strings_lines(cases))

    spm = train_tiny_spm()
    tiny("tiny_spm", spm, "llama", None,
         config={"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"},
                 "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False})
    mistral = json.loads(json.dumps(spm))
    mistral["normalizer"] = None
    mistral["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    tiny("tiny_mistral", mistral, None, None)
    bl = train_tiny_bl()
    tiny("tiny_bl", bl, "gpt2", "llama-bpe")
    variants({"tiny_bl": bl, "tiny_spm": spm})
    print("wrote", OUT)


if __name__ == "__main__":
    main()
