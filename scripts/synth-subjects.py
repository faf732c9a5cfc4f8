#!/usr/bin/env python3
"""Synthetic PAPI subjects sampled from the real ones, for large runs of palign-worker.

    scripts/synth-subjects.py --n 1000 --seed 1 --out synth-1000.csv
    palign-worker --subjects-file synth-1000.csv ...

Each synthetic subject copies a real subject of PAPI_DIR/Test-set.json, picked
at random as a template: every item keeps the template's answer with
probability 1 - p, and otherwise takes an answer drawn from that item's
empirical distribution over all real subjects (their non-missing answers).
A template's missing answer (0) stays missing. This keeps the trait structure
of real people (answers correlate within a trait) while no two synthetic
subjects are the same.

Output: the CSV form palign reads (worker/inventory.c): a header
`case,i1,...,iN`, one subject a line, ids synth-000001, synth-000002, ...
An --out ending in .json writes the Test-set.json form instead (a JSON array
of objects with "case" and "i1".."iN"). Without --out, CSV goes to stdout.
The same --papi, --n, --seed and --p give the same file. Python 3 standard
library only.
"""
import argparse
import csv
import json
import os
import random
import re
import sys

ITEM_KEY = re.compile(r"^i([1-9][0-9]*)$")


def default_papi():
    env = os.environ.get("PALIGN_PAPI_DIR")
    return env if env else "../shared/papi"


def load_real(papi):
    path = os.path.join(papi, "Test-set.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"synth-subjects: {path}: {e}")
    if not isinstance(data, list) or not data:
        sys.exit(f"synth-subjects: {path}: expected a non-empty JSON array of subjects")
    items = sorted({int(m.group(1)) for k in data[0] for m in [ITEM_KEY.match(k)] if m})
    if not items:
        sys.exit(f"synth-subjects: {path}: the first subject has no answers i1, i2, ...")
    rows = []
    for k, s in enumerate(data):
        row = []
        for i in items:
            v = s.get(f"i{i}")
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 5:
                sys.exit(f"synth-subjects: {path}: subject #{k + 1} ({s.get('case')}): answer i{i} = {v!r} is not 0..5")
            row.append(v)
        rows.append(row)
    return path, items, rows


def synthesize(items, rows, n, p, seed):
    rng = random.Random(seed)
    # each item's non-missing answers over all real subjects: drawing uniformly
    # from this list is drawing from the empirical distribution
    pools = [[r[j] for r in rows if r[j] != 0] for j in range(len(items))]
    for j, pool in enumerate(pools):
        if not pool:
            pools[j] = [3]  # never happens with PAPI: an item nobody answered
    out = []
    for _ in range(n):
        t = rows[rng.randrange(len(rows))]
        out.append([a if a == 0 or rng.random() >= p else rng.choice(pools[j]) for j, a in enumerate(t)])
    return out


def main():
    ap = argparse.ArgumentParser(description="Synthetic PAPI subjects sampled from the real ones (CSV case,i1,...).")
    ap.add_argument("--papi", default=default_papi(), help="PAPI data folder (default $PALIGN_PAPI_DIR or ../shared/papi)")
    ap.add_argument("--n", type=int, required=True, help="number of synthetic subjects")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--p", type=float, default=0.3,
                    help="per-item probability of replacing the template's answer by a draw from the item's "
                    "distribution (default 0.3)")
    ap.add_argument("--out", default="-", help="output .csv (or .json) file; - for CSV on stdout (default)")
    a = ap.parse_args()
    if a.n < 1:
        ap.error("--n must be at least 1")
    if not 0.0 <= a.p <= 1.0:
        ap.error("--p must be in [0, 1]")

    path, items, rows = load_real(a.papi)
    synth = synthesize(items, rows, a.n, a.p, a.seed)
    width = max(6, len(str(a.n)))
    ids = [f"synth-{k + 1:0{width}d}" for k in range(a.n)]

    if a.out.lower().endswith(".json"):
        subjects = [dict([("case", ids[k])] + [(f"i{i}", v) for i, v in zip(items, r)]) for k, r in enumerate(synth)]
        text = json.dumps(subjects, separators=(",", ":")) + "\n"
        tmp = a.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, a.out)
    else:
        f = sys.stdout if a.out == "-" else open(a.out + ".tmp", "w", encoding="utf-8", newline="")
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["case"] + [f"i{i}" for i in items])
        for k, r in enumerate(synth):
            w.writerow([ids[k]] + r)
        if f is not sys.stdout:
            f.close()
            os.replace(a.out + ".tmp", a.out)
    if a.out != "-":
        print(f"synth-subjects: {a.n} subjects from {len(rows)} in {path} (p={a.p}, seed={a.seed}) -> {a.out}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
