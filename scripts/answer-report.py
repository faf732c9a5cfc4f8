#!/usr/bin/env python3
"""How a model answers: the letter distribution of each method, the alphas PAS chose, and the
MAE of every alpha of the PAS grid, from what palign wrote.

  scripts/answer-report.py eval FILE.json     palign eval --json's file: per method the letters
                                              answered over all subjects and items, the mean
                                              expected score; per subject each row's MAE sum and
                                              PAS's chosen alphas
  scripts/answer-report.py store STORE [--palign build/palign]
                                              a palign-worker store: the same from its records, and
                                              for PAS the MAE sum (all test items) of every alpha of
                                              the grid, per variant, averaged over subjects

Prints Markdown tables (docs/QWEN2.md shows them). Needs only the Python standard library.
"""
import argparse
import collections
import json
import os
import subprocess
import sys

LETTERS = "EDCBA"  # answer 1..5 -> letter


def letter(a):
    return LETTERS[a - 1] if 1 <= a <= 5 else "?"


def table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()


def dist_rows(answers):
    rows = []
    for m, ans in answers.items():
        c = collections.Counter(letter(a) for a, _ in ans)
        n = len(ans)
        exp = [e for _, e in ans if e is not None]
        rows.append([m, n] + [f"{100 * c[x] / n:.1f}%" for x in "ABCDE"] +
                    [f"{sum(exp) / len(exp):.2f}" if exp else "-"])
    return rows


def report_eval(path):
    d = json.load(open(path))
    answers = collections.OrderedDict()
    per_subject = []
    for s in d["subjects"]:
        line = {"id": s["id"]}
        for name, m in s["methods"].items():
            if "items" in m:
                answers.setdefault(name, []).extend((i["answer"], i.get("expected")) for i in m["items"])
                line[name] = m["mae_sum"]
            elif "alpha_reference" in m:
                line[f"{name} alphas"] = f"{m['alpha_reference']:g} / {m['alpha_holdout']:g}"
        per_subject.append(line)
    print(f"Letters answered ({path}; all subjects, all items of each row)\n")
    table(["row", "answers", "A", "B", "C", "D", "E", "mean expected score"], dist_rows(answers))
    cols = []
    for line in per_subject:
        for k in line:
            if k != "id" and k not in cols:
                cols.append(k)
    print("Per subject: MAE sum of each row; PAS alphas as reference / holdout\n")
    table(["subject"] + cols, [[l["id"]] + [f"{l[c]:.2f}" if isinstance(l.get(c), (int, float)) else l.get(c, "")
                                            for c in cols] for l in per_subject])


def query_json(palign, store, *args):
    out = subprocess.run([palign, "query", store, *args, "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def mae_sum(truth, answer, traits):
    by = collections.defaultdict(list)
    for t, a, tr in zip(truth, answer, traits):
        if t and a:
            by[tr].append(abs(t - a))
    return sum(sum(v) / len(v) for v in by.values()) if len(by) == 5 else float("nan")


def report_store(store, palign):
    ids = [line.split(",")[0] for line in subprocess.run(
        [palign, "query", store, "export", "--format", "csv"], check=True, capture_output=True,
        text=True).stdout.splitlines()[1:]]
    ids = list(dict.fromkeys(ids))
    items_csv = os.path.join(os.environ.get("PALIGN_PAPI_DIR") or os.path.join(os.path.dirname(__file__), "..", "..",
                                                                               "shared", "papi"),
                             "ipip_neo_300_items.csv")
    import csv
    trait = {int(r["item"]): r["trait"] for r in csv.DictReader(open(items_csv, newline=""))}
    answers = collections.OrderedDict()
    grid = collections.defaultdict(lambda: collections.defaultdict(list))
    chosen = collections.defaultdict(collections.Counter)
    for sid in ids:
        r = query_json(palign, store, "subject", sid)
        for m in r.get("methods", []):
            for row in m.get("rows", []):
                p = row["predictions"]
                ans = p.get("answer", "")
                ans = list(bytes.fromhex(ans)) if isinstance(ans, str) and len(ans) == 2 * len(p["items"]) else ans
                exp = p.get("expected") or [None] * len(p["items"])
                answers.setdefault(row["name"], []).extend(zip(ans, exp))
        pas = r.get("pas")
        if pas and pas.get("status") == "fitted":
            alphas, items = pas["alphas"], pas["items"]
            traits = [trait[i] for i in items]
            n_a = len(alphas)
            for k, g in enumerate(pas.get("grid", [])):
                v = ["pas", "pas_only"][k // n_a]
                t = g["truth"]
                a = g["answer"]
                if isinstance(t, str):
                    t, a = list(bytes.fromhex(t)), list(bytes.fromhex(a))
                if any(a):
                    grid[v][alphas[k % n_a]].append(mae_sum(t, a, traits))
            for c in pas.get("chosen", []):
                chosen[f"{c['variant']} ({c['protocol']})"][c["alpha"]] += 1
    print(f"Letters answered ({store}, {len(ids)} subjects; all items of each row)\n")
    table(["row", "answers", "A", "B", "C", "D", "E", "mean expected score"], dist_rows(answers))
    for v, by in grid.items():
        print(f"{v}: mean over subjects of the MAE sum (all 180 test items) at each alpha\n")
        table(["alpha"] + [f"{a:g}" for a in sorted(by)], [["MAE sum"] + [f"{sum(x) / len(x):.3f}" for _, x in
                                                                          sorted(by.items())]])
    print("Alphas chosen (alpha: subjects)\n")
    table(["variant (protocol)", "alphas"], [[k, ", ".join(f"{a:g}: {n}" for a, n in sorted(c.items()))]
                                             for k, c in chosen.items()])


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("json")
    s = sub.add_parser("store")
    s.add_argument("store")
    s.add_argument("--palign", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build",
                                                    "palign"))
    a = ap.parse_args()
    if a.cmd == "eval":
        report_eval(a.json)
    else:
        report_store(a.store, a.palign)


if __name__ == "__main__":
    sys.exit(main())
