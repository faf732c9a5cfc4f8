#!/usr/bin/env python3
"""Figures of what a palign store holds, as PNG and SVG, for people to look at.

    scripts/plot-store.py STORE --out DIR [--palign build/palign] [--papi DIR]

Reads the store with `palign query STORE summary --json` and
`palign query STORE export --format records` (every record, one pass) and
writes into DIR:

  mae-by-trait    MAE per trait (O C E A N) of every method row with its 95%
                  interval over subjects, the model-free rows (const3,
                  trait_mean) drawn hatched, and the MAE sum per row
  mae-vs-alpha    PAS: the mean over subjects of the MAE sum at every alpha of
                  the grid, per variant (pas, pas_only), in each protocol: the
                  reference protocol on all test items, the holdout protocol
                  on the items outside its selection set (PAS.md), with the
                  95% interval and the mean chosen alpha marked
  alpha-chosen    how many subjects chose each alpha, per variant and protocol
  heads           the heads PAS selected, as a layer x head map: in how many
                  subjects' top-k each head is
  progress        subjects stored against time since the first run began, in
                  total and per worker rank, with the run boundaries
  figures.md      the list of figures with the numbers they show

A figure that has nothing to show (no PAS fit, one subject) is left out and
the reason printed. The per-alpha MAE is computed here from the stored
answers and the PAPI item traits, the way palign computes it (the mean
absolute difference of answer and truth over the scored items of a trait,
summed over traits); where a subject's chosen alpha has a stored row, the two
are compared and any difference beyond 1e-9 is an error. Needs matplotlib
(Debian: python3-matplotlib); numpy is not needed.
"""
import argparse
import collections
import csv
import json
import math
import os
import subprocess
import sys

TRAITS = "OCEAN"          # the order people read (and `query summary` prints)
STORED = "ACENO"          # the order of Metrics.mae in a record (pa_trait)
MODEL_FREE = ("const3", "trait_mean")


def query(palign, store, *args):
    p = subprocess.run([palign, "query", store, *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"plot-store: palign query {store} {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr}")
    if p.stderr.strip():
        sys.stderr.write(p.stderr)
    return p.stdout


def as_bytes(v):
    """A bytes field as pa_query_message_json writes it (an array of numbers)."""
    if isinstance(v, str):
        return list(bytes.fromhex(v))
    return list(v or [])


def mean_ci(xs):
    """Mean and the half-width of the normal 95% interval (0 for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, 1.96 * math.sqrt(var / n)


def mae_sum(truth, answer, traits, keep):
    """Sum over traits of the mean |answer - truth| over the scored items kept; NaN when a trait has none."""
    by = collections.defaultdict(list)
    for t, a, tr, k in zip(truth, answer, traits, keep):
        if k and t and a:
            by[tr].append(abs(t - a))
    return sum(sum(v) / len(v) for v in by.values()) if len(by) == 5 else float("nan")


def item_traits(papi):
    path = os.path.join(papi, "ipip_neo_300_items.csv")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return {int(r["item"]): r["trait"] for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"plot-store: {path}: cannot read the item traits ({e})")


def save(fig, out, name, made):
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(out, f"{name}.{ext}"), dpi=120, bbox_inches="tight")
    made.append(name)


def plot_mae_by_trait(plt, summary, out, made, notes):
    rows = [r for r in summary["rows"] if r.get("subjects")]
    if not rows:
        print("plot-store: mae-by-trait left out: no scored rows")
        return
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(rows) + 3), 4.5))
    width = 0.8 / len(rows)
    cmap = plt.get_cmap("tab20")
    for k, r in enumerate(rows):
        ys = [r["mae"][t] if r["mae"][t] is not None else float("nan") for t in TRAITS]
        es = [r["mae_ci95"][t] if r["mae_ci95"][t] is not None else 0 for t in TRAITS]
        free = r["name"] in MODEL_FREE
        ax.bar([i + (k - (len(rows) - 1) / 2) * width for i in range(5)], ys, width, yerr=es, capsize=2,
               color="lightgrey" if free else cmap(k % 20), edgecolor="black" if free else "none",
               hatch="//" if free else None,
               label=f"{r['name']} (sum {r['mae_sum']:.2f} ± {r['mae_sum_ci95'] or 0:.2f})")
    ax.set_xticks(range(5))
    ax.set_xticklabels(["Openness", "Conscientiousness", "Extraversion", "Agreeableness", "Neuroticism"])
    ax.set_ylabel("MAE on the 1..5 scale (lower is better)")
    ax.set_title(f"MAE per trait on the test items, {summary['subjects']['stored']} subjects, 95% intervals")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, out, "mae-by-trait", made)
    plt.close(fig)
    notes.append("mae-by-trait: " + "; ".join(f"{r['name']} {r['mae_sum']:.3f}" for r in rows))


def grid_curves(records, traits_of):
    """{(variant, protocol): {alpha: [MAE sum per subject]}}, chosen alphas, head counts, the PAS shape."""
    curves = collections.defaultdict(lambda: collections.defaultdict(list))
    chosen = collections.defaultdict(list)
    heads = collections.Counter()
    shape = None
    checked = 0
    for r in records:
        pas = r.get("pas")
        if not pas or pas.get("status") != "fitted":
            continue
        shape = (pas["n_layers"], pas["heads_per_layer"])
        for h in pas.get("heads", []):
            heads[(h.get("layer", 0), h.get("head", 0))] += 1
        alphas, items = pas["alphas"], pas["items"]
        traits = [traits_of.get(i) for i in items]
        if None in traits:
            sys.exit(f"plot-store: subject {r['subject_id']}: PAS items not in the PAPI inventory")
        select = as_bytes(pas.get("in_select"))
        keep = {"reference": [1] * len(items), "holdout": [0 if s else 1 for s in select]}
        stored = {}
        for m in r.get("methods", []):
            for row in m.get("rows", []):
                stored[row["name"]] = row.get("metrics", {}).get("mae_sum")
        grid = pas.get("grid", [])
        n_a = len(alphas)
        for k, g in enumerate(grid):
            variant = ("pas", "pas_only")[k // n_a]
            truth, answer = as_bytes(g.get("truth")), as_bytes(g.get("answer"))
            if not any(answer):
                continue  # this variant was not asked for
            for proto, kp in keep.items():
                curves[(variant, proto)][alphas[k % n_a]].append(mae_sum(truth, answer, traits, kp))
        for c in pas.get("chosen", []):
            if c.get("index", -1) < 0:
                continue
            key = (c["variant"], c["protocol"])
            chosen[key].append(c["alpha"])
            # the curve at the chosen alpha is the stored row of that protocol
            row = stored.get(f"{c['variant']} ({c['protocol']})")
            vals = curves[key].get(c["alpha"])
            if row is not None and vals:
                if abs(vals[-1] - row) > 1e-9:
                    sys.exit(f"plot-store: subject {r['subject_id']}: {key} at alpha {c['alpha']}: MAE sum "
                             f"{vals[-1]:.12f} computed here, {row:.12f} stored")
                checked += 1
    return curves, chosen, heads, shape, checked


def plot_mae_vs_alpha(plt, curves, chosen, out, made, notes):
    protos = [p for p in ("reference", "holdout") if any(k[1] == p for k in curves)]
    if not protos:
        print("plot-store: mae-vs-alpha left out: no PAS fit in the store")
        return
    fig, axes = plt.subplots(1, len(protos), figsize=(6 * len(protos), 4.2), squeeze=False)
    for ax, proto in zip(axes[0], protos):
        for variant, colour in (("pas", "tab:blue"), ("pas_only", "tab:orange")):
            by = curves.get((variant, proto))
            if not by:
                continue
            xs = sorted(by)
            ms = [mean_ci([v for v in by[x] if not math.isnan(v)] or [float("nan")]) for x in xs]
            ys, es = [m for m, _ in ms], [e for _, e in ms]
            n = len(by[xs[0]])
            ax.plot(xs, ys, "o-", color=colour, label=f"{variant} ({n} subjects)")
            ax.fill_between(xs, [y - e for y, e in zip(ys, es)], [y + e for y, e in zip(ys, es)], color=colour,
                            alpha=0.15)
            ch = chosen.get((variant, proto))
            if ch:
                ax.axvline(sum(ch) / len(ch), color=colour, linestyle=":", label=f"{variant}: mean chosen alpha")
            notes.append(f"mae-vs-alpha {variant} ({proto}): " +
                         ", ".join(f"alpha {x:g}: {y:.3f}" for x, y in zip(xs, ys)))
        ax.set_xlabel("alpha")
        ax.set_ylabel("MAE sum over the five traits")
        ax.set_title("reference protocol: all test items" if proto == "reference"
                     else "holdout protocol: items outside the selection set")
        ax.legend(fontsize=8)
    save(fig, out, "mae-vs-alpha", made)
    plt.close(fig)


def plot_alpha_chosen(plt, summary, out, made, notes):
    chosen = (summary.get("pas") or {}).get("chosen") or []
    chosen = [c for c in chosen if c["alphas"] or c["none"]]
    if not chosen:
        print("plot-store: alpha-chosen left out: no PAS fit in the store")
        return
    alphas = sorted({a["alpha"] for c in chosen for a in c["alphas"]})
    labels = [f"{a:g}" for a in alphas] + ["none"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) * len(chosen) / 2 + 3), 4))
    width = 0.8 / len(chosen)
    for k, c in enumerate(chosen):
        counts = {a["alpha"]: a["count"] for a in c["alphas"]}
        ys = [counts.get(a, 0) for a in alphas] + [c["none"]]
        ax.bar([i + (k - (len(chosen) - 1) / 2) * width for i in range(len(labels))], ys, width,
               label=f"{c['variant']} ({c['protocol']})")
        notes.append(f"alpha-chosen {c['variant']} ({c['protocol']}): " +
                     ", ".join(f"{l}: {y}" for l, y in zip(labels, ys) if y))
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("alpha chosen (none: no alpha could be chosen)")
    ax.set_ylabel("subjects")
    ax.set_title("The alpha PAS chose per subject")
    ax.legend(fontsize=8)
    save(fig, out, "alpha-chosen", made)
    plt.close(fig)


def plot_heads(plt, heads, shape, n_fitted, out, made, notes):
    if not heads or not shape:
        print("plot-store: heads left out: no PAS fit in the store")
        return
    n_layers, n_heads = shape
    grid = [[0] * n_heads for _ in range(n_layers)]
    for (l, h), n in heads.items():
        if 0 <= l < n_layers and 0 <= h < n_heads:
            grid[l][h] = n
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n_heads + 2), max(3, 0.22 * n_layers + 1.5)))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Heads PAS selected: subjects (of {n_fitted}) with the head in their top-k")
    fig.colorbar(im, ax=ax, label="subjects")
    save(fig, out, "heads", made)
    plt.close(fig)
    top = heads.most_common(5)
    notes.append("heads: most selected " + ", ".join(f"layer {l} head {h}: {n}" for (l, h), n in top))


def plot_progress(plt, records, summary, out, made, notes):
    done = sorted((r["finished_unix"], r.get("rank", 0)) for r in records if r.get("finished_unix"))
    if len(done) < 2:
        print("plot-store: progress left out: fewer than two records with a finishing time")
        return
    runs = (summary.get("manifest") or {}).get("runs") or []
    starts = [r.get("started_unix") for r in runs if r.get("started_unix")]
    t0 = min(starts + [done[0][0]])
    scale, unit = (3600.0, "hours") if done[-1][0] - t0 > 3 * 3600 else (60.0, "minutes")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.step([0] + [(t - t0) / scale for t, _ in done], range(len(done) + 1), where="post", color="black",
            label="all ranks")
    by_rank = collections.defaultdict(list)
    for t, rank in done:
        by_rank[rank].append(t)
    if len(by_rank) > 1 and len(by_rank) <= 16:
        for rank, ts in sorted(by_rank.items()):
            ax.step([0] + [(t - t0) / scale for t in ts], range(len(ts) + 1), where="post", linewidth=0.8,
                    label=f"rank {rank}")
    for s in starts[1:]:
        ax.axvline((s - t0) / scale, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel(f"{unit} since the first run began (dotted: a later run began)")
    ax.set_ylabel("subjects stored")
    span = (done[-1][0] - t0) / 3600.0
    ax.set_title(f"Progress: {len(done)} subjects in {span:.2f} h")
    ax.legend(fontsize=8)
    save(fig, out, "progress", made)
    plt.close(fig)
    notes.append(f"progress: {len(done)} subjects, {len(by_rank)} rank(s), {span:.2f} h from the first start "
                 f"to the last record")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--out", required=True, help="the folder for the figures (made if missing)")
    ap.add_argument("--palign", default=os.path.join(here, "..", "build", "palign"))
    ap.add_argument("--papi", default=os.environ.get("PALIGN_PAPI_DIR") or os.path.join(here, "..", "..", "shared",
                                                                                         "papi"))
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot-store: matplotlib is needed (apt-get install python3-matplotlib)")
    summary = json.loads(query(a.palign, a.store, "summary", "--json"))
    records = [json.loads(line) for line in query(a.palign, a.store, "export", "--format", "records").splitlines()
               if line.strip()]
    os.makedirs(a.out, exist_ok=True)
    made, notes = [], []
    plot_mae_by_trait(plt, summary, a.out, made, notes)
    fitted = [r for r in records if (r.get("pas") or {}).get("status") == "fitted"]
    if fitted:
        curves, chosen, heads, shape, checked = grid_curves(fitted, item_traits(a.papi))
        notes.append(f"mae-vs-alpha: the computed MAE sum at the chosen alpha equals the stored row in {checked} "
                     "cases")
        plot_mae_vs_alpha(plt, curves, chosen, a.out, made, notes)
        plot_heads(plt, heads, shape, len(fitted), a.out, made, notes)
    else:
        print("plot-store: mae-vs-alpha and heads left out: no PAS fit in the store")
    plot_alpha_chosen(plt, summary, a.out, made, notes)
    plot_progress(plt, records, summary, a.out, made, notes)
    with open(os.path.join(a.out, "figures.md"), "w") as f:
        f.write(f"# Figures of {a.store}\n\n")
        for name in made:
            f.write(f"![{name}]({name}.png)\n\n")
        f.write("## The numbers\n\n" + "".join(f"- {n}\n" for n in notes))
    print(f"plot-store: {len(made)} figures in {a.out}: {', '.join(made)}")
    for n in notes:
        print("  " + n)


if __name__ == "__main__":
    main()
