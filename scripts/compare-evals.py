#!/usr/bin/env python3
"""Compares two `palign eval --json` files of the same subjects and methods
run two ways (fp32 and bf16 weights, two backends), and optionally the
activation banks they used: how far apart they are, not whether they are
identical (scripts/compare-stores.py is for that).

    scripts/compare-evals.py A.json B.json [--banks A.bin B.bin]

Per subject and method row: answers in common, the largest difference of an
option probability and of an expected score, the MAE sums; for PAS, the
chosen alphas and the selected heads in common. For the banks: the largest
difference as a share of the largest value, and the median relative one.
Exit status 0 (a report, not a test).
"""
import argparse
import json
import struct
import sys


MODEL_FREE = {"const3", "trait_mean"}  # no model: the same either way, left out


def bank_values(path):
    import numpy as np  # only for --banks

    data = open(path, "rb").read()
    if data[:8] != b"PALIGNBK":
        sys.exit(f"{path}: not a palign activation bank")
    hlen = struct.unpack("<I", data[12:16])[0]
    return np.frombuffer(data[16 + hlen : len(data) - 32], dtype="<f4")


def compare_banks(a, b):
    import numpy as np

    x, y = bank_values(a), bank_values(b)
    if x.size != y.size:
        sys.exit(f"the banks hold {x.size} and {y.size} values")
    d = np.abs(x - y)
    top = float(np.abs(x).max())
    rel = float(np.median(d / np.maximum(np.abs(x), 1e-6)))
    print(f"banks: {x.size} values, largest {top:.3g}; largest difference {d.max():.3g} "
          f"({d.max() / top:.2e} of the largest), median relative {rel:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--banks", nargs=2, metavar=("A.bin", "B.bin"))
    o = ap.parse_args()
    ja, jb = json.load(open(o.a)), json.load(open(o.b))
    sb = {s["id"]: s for s in jb["subjects"]}
    total = same = 0
    for sa in ja["subjects"]:
        other = sb.get(sa["id"])
        if other is None:
            print(f"{sa['id']}: only in {o.a}")
            continue
        for name, ma in sa["methods"].items():
            mb = other["methods"].get(name)
            if mb is None or name in MODEL_FREE:
                continue
            if "items" in ma:
                pairs = list(zip(ma["items"], mb["items"]))
                if any(x["item"] != y["item"] for x, y in pairs):
                    sys.exit(f"{sa['id']} {name}: the files list other items")
                agree = sum(x["answer"] == y["answer"] for x, y in pairs)
                dp = max((abs(p - q) for x, y in pairs for p, q in zip(x.get("p", []), y.get("p", []))), default=0)
                de = max((abs(x["expected"] - y["expected"]) for x, y in pairs if "expected" in x), default=0)
                total += len(pairs)
                same += agree
                print(f"{sa['id']} {name}: {agree}/{len(pairs)} answers the same, probabilities within {dp:.4f}, "
                      f"expected scores within {de:.4f}, MAE sum {ma['mae_sum']:.3f} / {mb['mae_sum']:.3f}")
            elif "heads" in ma:
                ha = {(h["layer"], h["head"]) for h in ma["heads"]}
                hb = {(h["layer"], h["head"]) for h in mb["heads"]}
                print(f"{sa['id']} {name}: alpha {ma.get('alpha_reference')} / {mb.get('alpha_reference')} "
                      f"(reference), {ma.get('alpha_holdout')} / {mb.get('alpha_holdout')} (holdout); "
                      f"{len(ha & hb)} of {len(ha)} heads in common")
    if total:
        print(f"all rows: {same}/{total} answers the same ({100.0 * same / total:.1f}%)")
    if o.banks:
        compare_banks(*o.banks)


if __name__ == "__main__":
    main()
