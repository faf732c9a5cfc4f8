#!/usr/bin/env python3
"""PAS against DPO, per subject: time, tokens and FLOPs, from a palign store.

    scripts/cost-table.py STORE [--palign build/palign] [--bank-log LOG]

For every subject whose record holds both a PAS fit and a DPO adapter
(palign-worker --methods ...,pas,...,dpo[,dpo_icl]), prints a Markdown table:

  PAS   bank share: the activation bank's worker-seconds divided by the
        store's subjects (the bank is computed once per model and store;
        read from the "activation bank computed by W worker(s) in S s" line
        of --bank-log, 0 when not given or read from the cache), probes (the
        fit), the alpha grid (every alpha, both variants, which is also the
        evaluation), tokens computed, FLOPs;
  DPO   reference pass, the optimiser steps (forward and backward),
        evaluation (dpo, and dpo_icl when asked for), tokens, FLOPs;
  and the ratios DPO / PAS of the fit alone (bank share + probes against
  reference + steps) and of everything (fit + grid against fit +
  evaluation).

FLOPs: DPO's are palign's own count (pa_lm_flops: every matrix product of
the forward and backward, attention included). PAS's are estimated as its
tokens times the reference pass's FLOPs per token (both are forward passes
of the same model; PAS's prompts are longer, so attention makes this a
slight underestimate). Needs only the Python standard library.
"""
import argparse
import json
import os
import re
import subprocess
import sys


def records(palign, store):
    p = subprocess.run([palign, "query", store, "export", "--format", "records"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"cost-table: palign query {store} export failed (exit {p.returncode}):\n{p.stderr}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def bank_worker_seconds(log):
    if not log:
        return 0.0
    try:
        text = open(log, errors="replace").read()
    except OSError as e:
        sys.exit(f"cost-table: {log}: {e}")
    m = re.search(r"activation bank computed by (\d+) worker\(s\) in ([0-9.]+) s", text)
    return int(m.group(1)) * float(m.group(2)) if m else 0.0


def cost(c, key):
    return float((c or {}).get(key) or 0)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--palign", default=os.path.join(here, "..", "build", "palign"))
    ap.add_argument("--bank-log", help="the palign-worker log of the run that computed the bank")
    a = ap.parse_args()
    recs = records(a.palign, a.store)
    bank_share = bank_worker_seconds(a.bank_log) / max(1, len(recs))
    rows, tot = [], {"pas": 0.0, "pas_fit": 0.0, "dpo": 0.0, "dpo_fit": 0.0}
    for r in recs:
        pas, dpo = r.get("pas") or {}, r.get("dpo") or {}
        if pas.get("status") != "fitted" or not dpo.get("adapter"):
            continue
        evals = {m["method"]: m.get("cost") for m in r.get("methods", []) if m.get("method") in ("dpo", "dpo_icl")}
        ref, train = dpo.get("reference_cost"), dpo.get("train_cost")
        flops_per_token = float(dpo.get("reference_flops") or 0) / max(1.0, cost(ref, "tokens"))
        pas_fit = bank_share + float(pas.get("fit_seconds") or 0)
        pas_all = pas_fit + cost(pas.get("grid_cost"), "seconds")
        pas_tokens = cost(pas.get("grid_cost"), "tokens")
        dpo_fit = cost(ref, "seconds") + cost(train, "seconds")
        dpo_eval = sum(cost(c, "seconds") for c in evals.values())
        dpo_all = dpo_fit + dpo_eval
        dpo_tokens = cost(ref, "tokens") + cost(train, "tokens") + sum(cost(c, "tokens") for c in evals.values())
        dpo_flops = float(dpo.get("reference_flops") or 0) + float(dpo.get("train_flops") or 0) + \
            flops_per_token * sum(cost(c, "tokens") for c in evals.values())
        rows.append([r["subject_id"], f"{bank_share:.1f}", f"{float(pas.get('fit_seconds') or 0):.2f}",
                     f"{cost(pas.get('grid_cost'), 'seconds'):.1f}", f"{pas_all:.1f}", f"{pas_tokens:,.0f}",
                     f"{pas_tokens * flops_per_token:.2e}",
                     f"{cost(ref, 'seconds'):.1f}", f"{cost(train, 'seconds'):.1f} ({dpo.get('n_steps', 0)} steps)",
                     f"{dpo_eval:.1f} ({', '.join(sorted(evals))})", f"{dpo_all:.1f}", f"{dpo_tokens:,.0f}",
                     f"{dpo_flops:.2e}", f"{dpo_fit / pas_fit:.0f}x" if pas_fit > 0 else "-",
                     f"{dpo_all / pas_all:.2f}x" if pas_all > 0 else "-"])
        tot["pas"] += pas_all
        tot["pas_fit"] += pas_fit
        tot["dpo"] += dpo_all
        tot["dpo_fit"] += dpo_fit
    if not rows:
        sys.exit(f"cost-table: no record in {a.store} holds both a PAS fit and a DPO adapter")
    head = ["subject", "PAS bank share s", "PAS probes s", "PAS alpha grid s", "PAS total s", "PAS tokens",
            "PAS FLOPs (est.)", "DPO reference s", "DPO steps s", "DPO evaluation s", "DPO total s", "DPO tokens",
            "DPO FLOPs", "DPO / PAS, fit", "DPO / PAS, all"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    n = len(rows)
    print(f"\n{n} subjects. Mean per subject: PAS {tot['pas'] / n:.1f} s (fit {tot['pas_fit'] / n:.2f} s), "
          f"DPO {tot['dpo'] / n:.1f} s (fit {tot['dpo_fit'] / n:.1f} s); DPO / PAS: fit "
          f"{tot['dpo_fit'] / max(tot['pas_fit'], 1e-12):.0f}x, all {tot['dpo'] / max(tot['pas'], 1e-12):.2f}x.")


if __name__ == "__main__":
    main()
