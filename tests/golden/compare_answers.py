#!/usr/bin/env python3
"""Compares the per-item answers of a `palign eval --json` run with the
answers Hugging Face transformers gives to the same prompts
(tests/golden/answers/, made by make_answers_golden.py).

Usage: python3 compare_answers.py EVAL.json
Subjects are matched by position: the JSON's first subject is subject 0 of
Test-set.json when `palign eval --subjects N` was used. Prints, per subject and
method, how many argmax answers are equal and the largest difference of an
option probability; exits 1 if fewer than 98% of all answers agree.
Standard library only."""
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def golden(index, method):
    path = os.path.join(HERE, "answers", f"subject{index}_{method}.tsv")
    if not os.path.exists(path):
        return None
    rows = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            item, answer, expected, probs, _ = line.rstrip("\n").split("\t")
            rows[int(item)] = (int(answer), [float(p) for p in probs.split()], float(expected))
    return rows


def main():
    with open(sys.argv[1]) as f:
        run = json.load(f)
    total = same = 0
    for index, subj in enumerate(run["subjects"]):
        for method, res in subj["methods"].items():
            ref = golden(index, method)
            if ref is None:
                continue
            eq = n = 0
            worst = worst_e = 0.0
            for it in res["items"]:
                answer, probs, expected = ref[it["item"]]
                n += 1
                eq += it["answer"] == answer
                if "p" in it:
                    worst = max(worst, max(abs(a - b) for a, b in zip(it["p"], probs)))
                    worst_e = max(worst_e, abs(it["expected"] - expected))
            total += n
            same += eq
            print(f"subject {index} ({subj['id']}) {method:5s}: {eq}/{n} answers equal, "
                  f"max |p diff| {worst:.2g}, max |expected score diff| {worst_e:.2g}")
    if total == 0:
        print("no subject of the run has goldens")
        return 1
    print(f"all: {same}/{total} = {100.0 * same / total:.2f}% equal")
    return 0 if same * 100 >= 98 * total else 1


if __name__ == "__main__":
    sys.exit(main())
