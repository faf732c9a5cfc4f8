#!/usr/bin/env python3
"""Checks that two stores (and, optionally, `palign eval --json` files) hold
the same results for the same subjects: every method's rows (names, items,
true and predicted answers, expected scores, option probabilities) and every
PAS fit (heads, directions, sigmas, grid, chosen alphas), exactly; against
an eval file, every answer and each PAS variant's chosen alphas and heads. What may
legitimately differ is ignored: the rank and host that did a subject, wall
times and token counts (a worker that already holds a prefix in its cache
computes fewer tokens).

    scripts/compare-stores.py STORE_A STORE_B [--eval EVAL.json ...] [--palign build/palign]

Exit status 0 when everything compared is identical, 1 otherwise. Uses
`palign query STORE export/subject --json`, so it needs no protobuf library.
"""
import argparse
import json
import subprocess
import sys

IGNORED = {"rank", "host", "seconds", "finished_unix", "cost", "grid_cost", "fit_seconds"}


def run(palign, *args):
    out = subprocess.run([palign, "query", *args], check=True, capture_output=True, text=True)
    return out.stdout


def subject_ids(palign, store):
    rows = json.loads(run(palign, store, "export", "--format", "json"))
    return sorted({r["subject_id"] for r in rows})


def record(palign, store, sid):
    return json.loads(run(palign, store, "subject", sid, "--json"))


def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in IGNORED}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def first_difference(a, b, path=""):
    if type(a) is not type(b):
        return f"{path}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}/{k}: only in one"
            d = first_difference(a[k], b[k], f"{path}/{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def pas_difference(pas, variant, em):
    """Where the store's PAS fit differs from what `palign eval --json` printed
    for one variant (its chosen alphas and selected heads), or None."""
    if not pas:
        return "no PAS fit stored"
    chosen = {(c["variant"], c["protocol"]): c["alpha"] for c in pas.get("chosen", [])}
    for protocol in ("reference", "holdout"):
        want, got = em[f"alpha_{protocol}"], chosen.get((variant, protocol))
        if got is None or abs(want - got) > 1e-12:
            return f"alpha ({protocol}) {want} in eval, {got} stored"
    heads = [(h["layer"], h["head"]) for h in pas.get("heads", [])]
    eheads = [(h["layer"], h["head"]) for h in em.get("heads", [])]
    if heads != eheads:
        return f"heads {eheads} in eval, {heads} stored"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--eval", action="append", default=[], help="palign eval --json output to compare with A")
    ap.add_argument("--palign", default="build/palign")
    o = ap.parse_args()

    ids_a, ids_b = subject_ids(o.palign, o.a), subject_ids(o.palign, o.b)
    bad = 0
    if ids_a != ids_b:
        print(f"subjects differ: {len(ids_a)} in {o.a}, {len(ids_b)} in {o.b}")
        bad += 1
    recs = {}
    for sid in sorted(set(ids_a) & set(ids_b)):
        ra, rb = record(o.palign, o.a, sid), record(o.palign, o.b, sid)
        recs[sid] = ra
        d = first_difference(strip(ra), strip(rb))
        if d:
            print(f"subject {sid}: {d}")
            bad += 1
    n_items = sum(len(r["predictions"]["items"]) for ra in recs.values() for m in ra["methods"]
                  for r in m.get("rows", []))
    print(f"{o.a} vs {o.b}: {len(recs)} subjects, {n_items} stored answers compared, "
          f"{'identical' if not bad else f'{bad} differences'}")

    for path in o.eval:
        ev = json.load(open(path))
        compared = diffs = 0
        for s in ev["subjects"]:
            ra = recs.get(s["id"])
            if not ra:
                continue
            rows = {r["name"]: r["predictions"] for m in ra["methods"] for r in m.get("rows", [])}
            for name, em in s["methods"].items():
                if isinstance(em, dict) and "alpha_reference" in em:
                    # a PAS variant's fit: the chosen alphas and the heads, in order
                    compared += 1
                    d = pas_difference(ra.get("pas"), name, em)
                    if d:
                        diffs += 1
                        print(f"eval {path}, subject {s['id']}, {name}: {d}")
                    continue
                if not isinstance(em, dict) or "items" not in em or name not in rows:
                    continue
                p = rows[name]
                for i, it in enumerate(em["items"]):
                    compared += 1
                    same = (it["item"] == p["items"][i] and it["answer"] == p["answer"][i]
                            and ("expected" not in it or abs(it["expected"] - p["expected"][i]) <= 1e-6)
                            and ("p" not in it or all(abs(x - y) <= 1e-6 for x, y in
                                                      zip(it["p"], p["probs"][5 * i:5 * i + 5]))))
                    if not same:
                        diffs += 1
                        if diffs <= 5:
                            print(f"eval {path}, subject {s['id']}, {name}, item {it['item']}: differs")
        print(f"{o.a} vs {path}: {compared} answers and PAS fits compared, {diffs} differ "
              f"(expected scores and probabilities within 1e-6: the eval JSON prints floats in decimal)")
        bad += diffs > 0 or compared == 0
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
