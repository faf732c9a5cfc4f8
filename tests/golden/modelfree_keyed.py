#!/usr/bin/env python3
"""The model-free rows' keyed trait scores on the real PAPI data, computed
from the raw files without palign (Python's csv, json and statistics only),
for tests/test_papi_modelfree.c, which pins palign's to these.

For every subject of Test-set.json and trait: the keyed score (an answer to a
'-' item counted as 6 - answer) averaged over the trait's test items with a
known answer, predicted (const3: 3 everywhere; trait_mean: the subject's mean
known train answer on the trait rounded half up, 3 when there is none) and
true; then over subjects the mean of |predicted - true| and Pearson's r (none
for a constant prediction).

    python3 tests/golden/modelfree_keyed.py [PAPI_DIR]   # default ../shared/papi

prints the values as C #defines in palign's trait order A C E N O.
"""
import csv
import json
import math
import os
import statistics
import sys

papi = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PALIGN_PAPI_DIR", "../shared/papi")
with open(os.path.join(papi, "ipip_neo_300_items.csv"), newline="", encoding="utf-8-sig") as f:
    items = {int(r["item"]): r for r in csv.DictReader(f)}
with open(os.path.join(papi, "mpi_300_split.json")) as f:
    split = json.load(f)
with open(os.path.join(papi, "Test-set.json")) as f:
    subjects = json.load(f)

TRAITS = "ACENO"


def keyed(answer, item):
    return 6 - answer if items[item]["keyed"] == "-" else answer


pairs = {m: {t: [] for t in TRAITS} for m in ("const3", "trait_mean")}
for s in subjects:
    answers = {i: int(s[f"i{i}"]) for i in items}
    for t in TRAITS:
        train = [answers[i] for i in split["train_index"] if items[i]["trait"] == t and answers[i]]
        mean_guess = math.floor(sum(train) / len(train) + 0.5) if train else 3
        scored = [i for i in split["test_index"] if items[i]["trait"] == t and answers[i]]
        true = sum(keyed(answers[i], i) for i in scored) / len(scored)
        for m, guess in (("const3", 3), ("trait_mean", mean_guess)):
            pairs[m][t].append((sum(keyed(guess, i) for i in scored) / len(scored), true))

for m, prefix in (("const3", "CONST3"), ("trait_mean", "TM")):
    for t in TRAITS:
        p = pairs[m][t]
        mae = sum(abs(a - b) for a, b in p) / len(p)
        print(f"#define {prefix}_KMAE_{t} {mae!r}")
        if m == "trait_mean":
            print(f"#define {prefix}_R_{t} {statistics.correlation([a for a, _ in p], [b for _, b in p])!r}")
