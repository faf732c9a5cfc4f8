#!/usr/bin/env python3
"""Golden per-item answers of the default model to the PAPI test items, read from the
next-token distribution over the option letters (PAS.md "Reading an answer", logits mode),
made by an independent implementation given the same prompts as palign's evaluator.

THE GOLDEN: Hugging Face transformers' LlamaForCausalLM (PyTorch, CPU, float32, eager
attention) loaded from the default GGUF with from_pretrained(gguf_file=...), exactly as
make_forward_golden.py loads it (that script checks this model against a float64 model, an
own numpy Llama and llama.cpp). Prompts are built by make_tokenizer_golden.py's own PAS.md
construction (ITEM_TEMPLATE, SYSTEM_PROMPT, ICL_HEAD, LABELS, PREFIX) under SmolLM2's ChatML
template rendered by jinja2 from the GGUF's tokenizer.chat_template, and tokenized by
llama.cpp (vocab only, special tokens parsed, no BOS); Hugging Face tokenizers must give the
same ids for every prompt, and the ids must equal those tokenizer/smollm2_papi.txt pins (all
`none` prompts; the first test item's `icl` prompt of subjects 0..2); the script stops otherwise.

For each subject (index into Test-set.json) and method:
  none  system = SYSTEM_PROMPT
  icl   system = ICL_HEAD + ";".join("{item text}:{label}" for train items in train_index
        order whose answer is not 0)   (item text as written in the CSV)
  p2    system = personality_prompt.json[subject]["output"][0]
and for every test item (test_index order): user = ITEM_TEMPLATE.format(text.lower()),
assistant turn opened with "Option (" (left open). From the logits of the last position the
five option-letter logits (the one token "Option (" + letter adds, A..E) are softmaxed among
themselves; answer = 5 - argmax (A = 5 .. E = 1; ties go to the earlier letter), expected =
sum_k p_k * (5 - k).

Speed: the prompts of one (subject, method) share a long token prefix (system prompt and
the start of the question); it is run once, and the 180 suffixes run on copies of its KV
cache, batched with right padding (causal attention: padding after a row's last real token
cannot change that token's logits). The first test item of every (subject, method) is also
run as one whole sequence without a cache; the script stops unless both agree.

Writes tests/golden/answers/ (format: tests/golden/README-answers.md):
  subject{S}_{method}.tsv   one line per test item
  summary.tsv               per (subject, method): MAE summed over traits, prompt lengths,
                            seconds; const3 and trait_mean rows per subject
No PAPI text is written (prompts are identified by token counts and sha256 only).

Usage (needs torch, transformers, accelerate, gguf, numpy, llama-cpp-python, tokenizers,
jinja2; the model and the PAPI files; no network):
  python3 tests/golden/make_answers_golden.py [--subjects 0,1,2,3,4] [--methods none,icl,p2]
      [--model PATH] [--papi DIR] [--batch 24] [--threads 2] [--prompts-only]
--prompts-only builds and checks the prompts without the model (token ids pinned in
tokenizer/smollm2_papi.txt, token counts in existing answer files).
Existing summary rows of other (subject, method) pairs are kept, so subjects can be done in
several runs.
"""
import argparse
import hashlib
import importlib.metadata
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from transformers import DynamicCache

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "answers")
sys.path.insert(0, HERE)
import make_tokenizer_golden as tg  # noqa: E402  (our own PAS.md prompts and tokenizer references)
import make_forward_golden as fg  # noqa: E402  (our own model loading)

LETTERS = "ABCDE"
TRAITS = "OCEAN"
LIMIT_CACHE_VS_FULL = 1e-4  # |p| difference, cached+batched path vs one whole-sequence forward
NEAR_TIE = 1e-3             # top-2 probability gap under which an argmax is fragile


def system_prompt(method, s, items, subjects, split, p2):
    if method == "none":
        return tg.SYSTEM_PROMPT
    if method == "icl":
        a = subjects[s]
        parts = [f"{items[i]}:{tg.LABELS[a[f'i{i}']]}" for i in split["train_index"] if a[f"i{i}"] != 0]
        return tg.ICL_HEAD + ";".join(parts)
    if method == "p2":
        return p2[s]["output"][0]
    raise ValueError(method)


def letter_ids(ll, prompt, ids):
    """the single token that each letter adds after the prompt (which ends with 'Option (')."""
    out = []
    for c in LETTERS:
        t = ll.tokenize((prompt + c).encode("utf-8"), add_bos=False, special=True)
        if len(t) != len(ids) + 1 or t[:-1] != ids:
            sys.exit(f"letter {c} does not add exactly one token after the prompt")
        out.append(t[-1])
    return out


def answers_of(logits5):
    """logits5 [N,5] float -> probabilities (float64), answer 5..1, expected score."""
    z = logits5.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    arg = p.argmax(1)  # first maximum: ties go to the earlier letter
    return p, 5 - arg, p @ np.array([5.0, 4.0, 3.0, 2.0, 1.0])


def run_combination(m, all_ids, batch):
    """all_ids: token id lists -> last-position hidden states [N, n_embd] via one shared prefix."""
    P = 0
    first = all_ids[0]
    while all(P < len(x) - 1 and x[P] == first[P] for x in all_ids):
        P += 1
    with torch.no_grad():
        pre = m.model(input_ids=torch.tensor([first[:P]]), use_cache=True)
    kv = [(layer.keys, layer.values) for layer in pre.past_key_values.layers]
    order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
    hid = [None] * len(all_ids)
    pad = all_ids[0][-1]
    for b0 in range(0, len(order), batch):
        rows = order[b0:b0 + batch]
        suf = [all_ids[i][P:] for i in rows]
        S = max(len(x) for x in suf)
        x = torch.tensor([t + [pad] * (S - len(t)) for t in suf])
        mask = torch.tensor([[1] * (P + len(t)) + [0] * (S - len(t)) for t in suf])
        B = len(rows)
        cache = DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1).contiguous(), v.expand(B, -1, -1, -1).contiguous())
                                             for k, v in kv], config=m.config)
        with torch.no_grad():
            h = m.model(input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
        for r, i in enumerate(rows):
            hid[i] = h[r, len(suf[r]) - 1]
    return torch.stack(hid), P


def mae(pred, truth_row, test_items, trait_of):
    """PAS.md metric for one subject: per trait mean |pred - truth| over known answers, summed."""
    per = {}
    for t in TRAITS:
        d = [abs(pred[i] - truth_row[f"i{i}"]) for i in test_items if trait_of[i] == t and truth_row[f"i{i}"] != 0]
        per[t] = sum(d) / len(d)
    return sum(per.values()), per


def read_summary(path):
    rows = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("#") or line.startswith("subject\t") or not line.strip():
                    continue
                t = line.rstrip("\n").split("\t")
                rows[(int(t[0]), t[1])] = line.rstrip("\n")
    return rows


def main():
    ap = argparse.ArgumentParser()
    cache = os.environ.get("PALIGN_CACHE") or os.path.expanduser("~/.cache/palign")
    ap.add_argument("--model", default=os.environ.get("PALIGN_MODEL") or
                    os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--papi", default=os.environ.get("PALIGN_PAPI_DIR") or os.path.join(REPO, "..", "shared", "papi"))
    ap.add_argument("--subjects", default="0,1,2,3,4")
    ap.add_argument("--methods", default="none,icl,p2")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts-only", action="store_true",
                    help="build and check the prompts only (no model): token ids against the ids pinned in "
                         "tokenizer/smollm2_papi.txt and token counts against the existing answer files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    log = lambda *a: print(f"[{time.time() - t0:7.1f}s]", *a, flush=True)  # noqa: E731

    ll, hf, template = tg.smollm2_references(args.model)
    chat = tg.Chat("smollm2", template, "<|im_start|>", "<|im_end|>", "<|im_end|>\n")
    items, subjects, split = tg.papi(args.papi)
    import csv
    import json
    with open(os.path.join(args.papi, "ipip_neo_300_items.csv"), newline="", encoding="utf-8") as f:
        trait_of = {int(r["item"]): r["trait"] for r in csv.DictReader(f)}
    with open(os.path.join(args.papi, "personality_prompt.json"), encoding="utf-8") as f:
        p2 = json.load(f)
    test = split["test_index"]
    assert len(test) == 180

    pinned = fg.parse_papi_golden(os.path.join(HERE, "tokenizer", "smollm2_papi.txt"))
    if args.prompts_only:
        check_prompts(args, ll, hf, chat, items, subjects, split, p2, pinned)
        return
    m = fg.load_hf(args.model, torch.float32)
    W = m.lm_head.weight
    model_sha = fg.sha256(args.model)
    vers = fg.versions()
    log("model loaded")

    summary_path = os.path.join(OUT, "summary.tsv")
    summary = read_summary(summary_path)
    for s in [int(x) for x in args.subjects.split(",")]:
        truth = subjects[s]
        # model-free rows (PAS.md): const3, trait_mean (rounded mean raw answer on the trait's train items)
        const3, _ = mae({i: 3 for i in test}, truth, test, trait_of)
        tm = {}
        for t in TRAITS:
            a = [truth[f"i{i}"] for i in split["train_index"] if trait_of[i] == t and truth[f"i{i}"] != 0]
            tm[t] = int(np.floor(sum(a) / len(a) + 0.5))  # half up
        tmean, _ = mae({i: tm[trait_of[i]] for i in test}, truth, test, trait_of)
        summary[(s, "const3")] = f"{s}\tconst3\t{const3:.6f}\t\t-\t-\t-\t-\t-\t-"
        summary[(s, "trait_mean")] = f"{s}\ttrait_mean\t{tmean:.6f}\t\t-\t-\t-\t-\t-\t-"
        for method in args.methods.split(","):
            tc = time.time()
            system = system_prompt(method, s, items, subjects, split, p2)
            prompts = [chat.render(system, tg.ITEM_TEMPLATE.format(items[i].lower()), tg.PREFIX) for i in test]
            all_ids = [tg.encode_both(ll, hf, p, True) for p in prompts]  # exits unless llama.cpp == tokenizers
            check_pinned(method, s, test, all_ids, pinned)
            lids = letter_ids(ll, prompts[0], all_ids[0])
            item1_prompt = chat.render(system, tg.ITEM_TEMPLATE.format(items[1].lower()), tg.PREFIX)
            n_item1 = len(tg.encode_both(ll, hf, item1_prompt, True))
            h, P = run_combination(m, all_ids, args.batch)
            with torch.no_grad():
                l5 = (h @ W[lids].T).double().numpy()
                # check: first test item as one whole sequence, no cache, full lm_head
                full = m(input_ids=torch.tensor([all_ids[0]]), use_cache=False).logits[0, -1]
                full5 = full[lids].double().numpy()[None]
            p, ans, exp = answers_of(l5)
            pf, _, _ = answers_of(full5)
            dcheck = float(np.abs(pf[0] - p[0]).max())
            if not dcheck <= LIMIT_CACHE_VS_FULL:
                sys.exit(f"subject {s} {method}: cached/batched vs whole-sequence |dp| = {dcheck:.3g}")
            top2 = np.sort(p, 1)[:, -2:]
            near = int(((top2[:, 1] - top2[:, 0]) < NEAR_TIE).sum())
            pred = {i: int(a) for i, a in zip(test, ans)}
            total, per = mae(pred, truth, test, trait_of)
            exp_total, _ = mae({i: float(e) for i, e in zip(test, exp)}, truth, test, trait_of)
            secs = time.time() - tc
            name = f"subject{s}_{method}.tsv"
            with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
                f.write(f"# palign golden answers: subject index {s} of Test-set.json (case {truth.get('case')}), "
                        f"method {method}, {len(test)} test items in test_index order\n")
                f.write("# reference: transformers LlamaForCausalLM, PyTorch CPU float32, eager attention, "
                        "from_pretrained(gguf_file=...); prompts: make_tokenizer_golden.py construction, "
                        "SmolLM2 ChatML (jinja2, GGUF template), prefix 'Option (', item text lowercased; "
                        "ids: llama.cpp (special parsed, no BOS) == tokenizers\n")
                f.write(f"# model: {os.path.basename(args.model)} sha256 {model_sha}\n")
                f.write("# versions: " + " ".join(f"{k}={v}" for k, v in vers.items()) + "\n")
                f.write(f"# letter token ids A..E: {' '.join(map(str, lids))}; softmax over these 5 logits only\n")
                f.write(f"# system prompt: {len(system)} chars, sha256 {hashlib.sha256(system.encode()).hexdigest()}\n")
                f.write(f"# first test item {test[0]}: n_tokens {len(all_ids[0])}, prompt sha256 "
                        f"{hashlib.sha256(prompts[0].encode()).hexdigest()}; IPIP item 1 (a train item) asked the "
                        f"same way: n_tokens {n_item1}; shared prefix {P} tokens\n")
                f.write(f"# check: first test item run whole, no cache: max |dp| {dcheck:.2e}; near ties "
                        f"(top-2 gap < {NEAR_TIE:g}): {near}\n")
                f.write(f"# MAE sum over traits (argmax answers): {total:.6f}  "
                        + " ".join(f"{t}={per[t]:.4f}" for t in TRAITS) + f"; expected-score MAE sum {exp_total:.6f}\n")
                f.write("# item\tanswer\texpected\tpA pB pC pD pE\tn_tokens\n")
                for r, i in enumerate(test):
                    f.write(f"{i}\t{ans[r]}\t{exp[r]:.7g}\t" + " ".join(f"{x:.7g}" for x in p[r]) +
                            f"\t{len(all_ids[r])}\n")
            summary[(s, method)] = (f"{s}\t{method}\t{total:.6f}\t{exp_total:.6f}\t"
                                    f"{len(all_ids[0])}\t{n_item1}\t{P}\t{near}\t{dcheck:.2e}\t{secs:.0f}")
            log(f"subject {s} {method}: MAE {total:.4f} (expected {exp_total:.4f}), first test item "
                f"{len(all_ids[0])} tokens, prefix {P}, near ties {near}, check {dcheck:.1e}, {secs:.0f}s")
            write_summary(summary_path, summary, vers)


def check_pinned(method, s, test, all_ids, pinned):
    """the prompts must be the ones tokenizer/smollm2_papi.txt pins where it pins them."""
    n = 0
    for i, ids in zip(test, all_ids):
        key = ("item", i, "lower") if method == "none" else ("icl", s, "lower") if method == "icl" and i == test[0] else None
        if key in pinned:
            if pinned[key] != ids:
                sys.exit(f"subject {s} {method} item {i}: ids differ from tokenizer/smollm2_papi.txt {key}")
            n += 1
    return n


def check_prompts(args, ll, hf, chat, items, subjects, split, p2, pinned):
    test = split["test_index"]
    for s in [int(x) for x in args.subjects.split(",")]:
        for method in args.methods.split(","):
            system = system_prompt(method, s, items, subjects, split, p2)
            prompts = [chat.render(system, tg.ITEM_TEMPLATE.format(items[i].lower()), tg.PREFIX) for i in test]
            all_ids = [tg.encode_both(ll, hf, p, True) for p in prompts]
            npin = check_pinned(method, s, test, all_ids, pinned)
            path = os.path.join(OUT, f"subject{s}_{method}.tsv")
            msg = ""
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    rows = [ln.rstrip("\n").split("\t") for ln in f if not ln.startswith("#")]
                if [(int(r[0]), int(r[4])) for r in rows] != [(i, len(x)) for i, x in zip(test, all_ids)]:
                    sys.exit(f"{path}: items or token counts differ from the prompts built now")
                msg = f", token counts of {len(rows)} items equal {os.path.basename(path)}'s"
            print(f"subject {s} {method}: {len(all_ids)} prompts, llama.cpp == tokenizers, "
                  f"{npin} equal to pinned ids{msg}")


def write_summary(path, summary, vers):
    order = {"none": 0, "icl": 1, "p2": 2, "const3": 3, "trait_mean": 4}
    with open(path, "w", encoding="utf-8") as f:
        f.write("# palign golden answers summary (make_answers_golden.py); see README-answers.md\n")
        f.write("# versions: " + " ".join(f"{k}={v}" for k, v in vers.items()) + "\n")
        f.write("subject\tmethod\tmae_sum\tmae_sum_expected\tn_tokens_first_test_item\tn_tokens_item1\t"
                "shared_prefix\tnear_ties\tcheck_dp\tseconds\n")
        for k in sorted(summary, key=lambda k: (k[0], order.get(k[1], 9))):
            f.write(summary[k] + "\n")


if __name__ == "__main__":
    main()
