#!/usr/bin/env python3
"""scripts/gpu-figures.py [--dry-run] OUTDIR: the figures of a
scripts/gpu-check.sh run, as Markdown for docs/CUDA.md, held against
issue 13's goals.

Reads what gpu-check left in OUTDIR (steps.txt, env.txt, bench.json or else
bench.txt, forward-8b4*.txt, pas-8b4*.txt and .json (the batch-180 run's
too), dpo-8b4.txt and .json,
profile-pas-8b4.txt, profile-dpo-8b4.txt, nccl-compare.txt, sanitizer.log)
and prints:
  - the GPU (bench_cuda's device name, else nvidia-smi's) and the steps that
    failed or were skipped;
  - the goals: prefill TFLOP/s on the 8B layer shape (bench_forward; the
    1,536-token prefill where there is one, else the 512-token one) as a
    share of the bf16 GEMM peak bench_cuda measured in the same gpu-check
    run (goal: 50%), and PAS seconds per subject: the eval's own figures
    for 4 of the 32 layers (the bank's share per usable subject, the
    probes, the alpha grid), each of which grows with the layers, times 8:
    at most about that, since a pass's fixed costs (the embedding, the
    output rows, the waits) do not grow (goal: under 5 s); DPO's the same
    way;
  - bench_cuda's products, attention kernels and memory rates;
  - the PAS profile's first rows and what the profile cost (PAS's grid
    with it against without), and PAS's grid with its 180 items in one
    batch against batches of 64; the DPO profile's first rows;
  - NCCL's comparison and each sanitizer tool's summary.
A figure whose file is missing or unreadable says so, with its step's
status; a section that cannot be read says why, and the others stand.
--dry-run (gpu-check --dry-run) says the figures are the emulation's.
Exits 0 (the figures are for reading; gpu-check's own status says whether
the run passed), 2 on usage errors.
"""
import json
import os
import re
import sys

LAYERS_RUN, LAYERS_8B = 4, 32
GOAL_PREFILL_SHARE, GOAL_PAS_S = 0.50, 5.0
PROFILE_LINES = 16  # a profile's title, totals, header and its 13 costliest rows


def read(outdir, name):
    try:
        with open(os.path.join(outdir, name), errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_json(outdir, name):
    try:
        return json.loads(read(outdir, name) or "null")
    except ValueError:
        return None


def steps_of(outdir):
    """{step: status} from steps.txt ("name status seconds", or "name skipped"), or None without one."""
    text = read(outdir, "steps.txt")
    if text is None:
        return None
    steps = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            steps[parts[0]] = parts[1]
    return steps


def keyvals(text):
    """bench_forward's `key value` lines (numbers), and its `weights` line."""
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                out[parts[0]] = parts[1]
    return out


def step_status(steps, step):
    status = (steps or {}).get(step)
    return f"step {step}: {status}" if status else f"step {step} did not run"


def missing(what, steps, step, text=None):
    """A figure not there: its step's status, or, where its file has the line, that the line did not parse."""
    why = "its line is there but did not parse" if text else step_status(steps, step)
    return f"- {what}: missing ({why})"


def rate(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


def share(a, b):
    return f"{100 * a / b:.0f}%" if a is not None and b else "-"


NUM = r"([-+]?(?:[\d.]+(?:e[-+]?\d+)?|nan|inf))"
PAS_LINE = re.compile(rf"PAS per fitted subject \((\d+)\): bank {NUM} s .*?\({NUM} s per subject over the (\d+) "
                      rf"usable subjects\), probes {NUM} s, alpha grid {NUM} s")
DPO_LINE = re.compile(rf"DPO per trained subject \((\d+)\): reference {NUM} s, .*?; steps {NUM} s")


def bench_txt(text):
    """What bench_cuda printed before its JSON (which it writes at its end): the device and the peak."""
    out = {}
    m = re.search(r"^device: (.*?), \d+ SMs", text or "", re.M)
    if m:
        out["device"] = m.group(1)
    m = re.search(r"^bf16 GEMM 8192\^3 .*?: ([\d.]+) TFLOP/s", text or "", re.M)
    if m:
        out["bf16_peak_tflops"] = float(m.group(1))
    return out


def gpu_name(env, bench):
    """bench_cuda's device name (the runtime's), else nvidia-smi's (older drivers cut it short), and the driver."""
    name = bench.get("device")
    if not name:
        m = re.search(r"\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}", env or "")
        name = m.group(1).strip() if m else "a GPU neither bench_cuda nor nvidia-smi named"
    driver = re.search(r"Driver Version:\s*([\d.]+)", env or "")
    return name + (f", driver {driver.group(1)}" if driver else "")


def pas_parts(outdir, name):
    """The PAS line's figures, the probes and grid from the run's JSON where it has them (the line rounds the grid
    to 0.1 s); None where there is no line, and "unparsed" where its line is there but not its numbers."""
    text = read(outdir, name + ".txt") or ""
    m = PAS_LINE.search(text)
    if not m:
        return "unparsed" if "PAS per fitted subject" in text else None
    parts = {"share": float(m.group(3)), "usable": int(m.group(4)), "probes": float(m.group(5)),
             "grid": float(m.group(6))}
    doc = read_json(outdir, name + ".json")
    try:
        fitted = [mj for s in doc["subjects"] for mj in s["methods"].values()
                  if isinstance(mj, dict) and "alpha_grid_seconds" in mj]
        parts["probes"], parts["grid"] = float(fitted[0]["fit_seconds"]), float(fitted[0]["alpha_grid_seconds"])
    except (TypeError, KeyError, IndexError, ValueError):
        pass
    return parts


def goals(outdir, steps, bench):
    lines = ["## Against the goals", ""]
    peak = bench.get("bf16_peak_tflops")
    fwd_text = read(outdir, "forward-8b4.txt")
    fwd = keyvals(fwd_text)
    weights = fwd.get("weights") if isinstance(fwd.get("weights"), str) else "unnamed"
    if isinstance(fwd.get("prefill_long_gflops"), float):
        tokens, gflops = int(fwd.get("prefill_long_tokens", 0)) or "long", fwd["prefill_long_gflops"]
    elif isinstance(fwd.get("prefill_gflops"), float):
        tokens, gflops = 512, fwd["prefill_gflops"]
    else:
        tokens = gflops = None
    what = f"prefill ({tokens} tokens, {weights} weights, {LAYERS_RUN} layers of Llama-3-8B's shape)"
    if gflops is None:
        lines.append(missing("prefill", steps, "forward-8b4", fwd_text and "prefill_gflops" in fwd_text))
    elif not peak:
        lines.append(f"- {what}: {rate(gflops / 1e3)} TFLOP/s; the bf16 peak is missing "
                     f"({step_status(steps, 'bench_cuda')})")
    else:
        part = gflops / 1e3 / peak
        lines.append(f"- {what}: {rate(gflops / 1e3)} TFLOP/s, {100 * part:.0f}% of the bf16 GEMM peak ({peak:.0f} "
                     f"TFLOP/s, cuBLAS 8192^3): goal {100 * GOAL_PREFILL_SHARE:.0f}%, "
                     + ("met" if part >= GOAL_PREFILL_SHARE else
                        f"{100 * (GOAL_PREFILL_SHARE - part):.0f} points short"))
    pas = pas_parts(outdir, "pas-8b4")
    if not isinstance(pas, dict):
        lines.append(missing("PAS per subject", steps, "pas-8b4", pas))
    else:
        run = pas["share"] + pas["probes"] + pas["grid"]
        whole = run * LAYERS_8B / LAYERS_RUN
        lines.append(f"- PAS per subject, {LAYERS_RUN} layers: {run:.2f} s (the bank's share {pas['share']:.2f} s over "
                     f"{pas['usable']} usable subjects, probes {pas['probes']:.2f} s, alpha grid {pas['grid']:.2f} s); "
                     f"all {LAYERS_8B} layers, each part {LAYERS_8B // LAYERS_RUN}x: at most about {whole:.1f} s: goal "
                     f"under {GOAL_PAS_S:.0f} s, " + ("met" if whole < GOAL_PAS_S else f"{whole / GOAL_PAS_S:.1f}x over"))
        prof = pas_parts(outdir, "pas-8b4-profiled")
        if isinstance(prof, dict) and pas["grid"] > 0:
            lines.append(f"- the profile's cost: PAS's grid {prof['grid']:.2f} s under the profile against "
                         f"{pas['grid']:.2f} s ({prof['grid'] / pas['grid']:.2f}x)")
        big = pas_parts(outdir, "pas-8b4-batch180")
        if isinstance(big, dict) and pas["grid"] > 0:
            lines.append(f"- PAS's grid with the 180 items in one batch (--batch 180): {big['grid']:.2f} s against "
                         f"{pas['grid']:.2f} s in batches of 64 ({big['grid'] / pas['grid']:.2f}x)")
    dpo_text = read(outdir, "dpo-8b4.txt") or ""
    dpo = DPO_LINE.search(dpo_text)
    if not dpo:
        lines.append(missing("DPO per subject", steps, "dpo-8b4", "DPO per trained subject" in dpo_text))
    else:
        ref, train = float(dpo.group(2)), float(dpo.group(3))
        lines.append(f"- DPO per subject, {LAYERS_RUN} layers: {ref + train:.1f} s (reference {ref:.1f} s, steps "
                     f"{train:.1f} s); all {LAYERS_8B} layers at most about "
                     f"{(ref + train) * LAYERS_8B / LAYERS_RUN:.0f} s")
    return lines


KERNELS = ("simple", "tiled", "mma", "mma_bf16")
SHAPES = (("prefill", "prefill, 1,024 tokens"), ("pas", "PAS's pass, 180 x 70 after 2,400"),
          ("decode1", "decoding, 1 sequence after 2,400"), ("decode180", "decoding, 180 items"))
SWEEP = (1, 2, 3, 4, 6, 8)
ROW_OPS = ("rmsnorm", "rope", "swiglu", "add", "round_bf16")


def ms(x):
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def bench_lines(bench, steps):
    lines = ["## bench_cuda", ""]
    if "layer_matmul_tflops" not in bench:
        where = "only bench.txt's peak" if bench else "no bench.json"
        return lines + [f"- missing: {where} ({step_status(steps, 'bench_cuda')})"]
    peak = bench.get("bf16_peak_tflops")
    lines.append(f"- products of a layer, 1,024 tokens: fp32 {rate(bench['layer_matmul_tflops'])} TFLOP/s, bf16 "
                 f"{rate(bench.get('layer_matmul_bf16_tflops', 0))} TFLOP/s "
                 f"({share(bench.get('layer_matmul_bf16_tflops'), peak)} of the peak)")
    lines += ["", "| attention, ms | " + " | ".join(KERNELS) + " | bf16 / tf32 |", "| --- |" + " ---: |" * 5]
    for key, name in SHAPES:
        t = [bench.get(f"attention_{key}_{k}_ms") for k in KERNELS]
        ratio = f"{t[3] / t[2]:.2f}" if t[2] and t[3] is not None else "-"
        lines.append(f"| {name} | " + " | ".join(ms(x) for x in t) + f" | {ratio} |")
    lines.append("")
    for k in ("mma", "mma_bf16"):
        split, whole = bench.get(f"attention_decode1_{k}_ms"), bench.get(f"attention_decode1_{k}_unsplit_ms")
        if split and whole:
            lines.append(f"- {k}, decoding 1 sequence: {bench.get('decode1_shares')} shares {split:.3f} ms, one "
                         f"block a kv head {whole:.3f} ms ({whole / split:.2f}x)")
        sweep = [(n, bench.get(f"attention_decode180_{k}_packed_{n}_shares_ms"),
                  bench.get(f"attention_decode180_{k}_packed_{n}_shares_total")) for n in SWEEP]
        if all(t is not None for _, t, _ in sweep):
            lines.append(f"- {k}, decoding 180 items packed, by shares a walk (asked: all, ms): "
                         + ", ".join(f"{n}: {total} {t:.3f}" for n, t, total in sweep))
    copy = bench.get("copy_gbs")
    if copy:
        lines.append(f"- memory: a device-to-device copy at {copy:.0f} GB/s; on PAS's pass's rows "
                     + ", ".join(f"{op} {bench[op + '_gbs']:.0f} GB/s ({share(bench[op + '_gbs'], copy)})"
                                 for op in ROW_OPS if op + "_gbs" in bench))
    train = [bench.get(k) for k in ("train_attention_ms", "train_attention_backward_ms", "train_products_ms",
                                    "train_products_backward_ms")]
    if all(isinstance(t, (int, float)) and t > 0 for t in train):
        fwd, bwd, prod, prod_bwd = train
        rows = bench.get("train_rows")
        rows = f"{rows:,}" if isinstance(rows, int) else "?"
        lines.append(f"- training attention, a DPO step's {rows} rows: forward {fwd:.3f} ms ({fwd / prod:.2f}x the "
                     f"layer's bf16 products), backward {bwd:.3f} ms ({bwd / prod_bwd:.2f}x the backward products): "
                     f"{100 * (fwd + bwd) / (fwd + bwd + prod + prod_bwd):.0f}% of the step's products and attention")
    opt = [bench.get(k) for k in ("adamw_device_ms", "adamw_host_ms", "adamw_host_download_ms",
                                  "adamw_host_update_ms", "adamw_host_upload_ms", "adamw_host_update_all_ms")]
    if all(isinstance(t, (int, float)) and t > 0 for t in opt):
        dev, host, down, update, up, update_all = opt
        lines.append(f"- AdamW's step on Llama-3-8B's rank-8 adapter ({bench.get('adamw_values', 0):,} values): on the "
                     f"device {dev:.3f} ms; on the host as DPO ran it {host:.3f} ms, {host / dev:.1f}x the device's "
                     f"(the gradient's download {down:.3f}, adamw on 1 thread {update:.3f}, the adapter's upload "
                     f"{up:.3f}); adamw on the host's {bench.get('adamw_host_threads', '?')} threads {update_all:.3f} ms")
    return lines


def sanitizer_lines(outdir, steps):
    """Each tool's part of sanitizer.log (compute-sanitizer's banner starts it) with its summary and its step."""
    text = read(outdir, "sanitizer.log")
    tools = [name[len("sanitizer-"):] for name in (steps or {}) if name.startswith("sanitizer-")]
    if not text or not text.strip():
        return [f"- compute-sanitizer: no log ({step_status(steps, 'sanitizer')})"] if not tools else \
            [f"- compute-sanitizer {t}: no log ({step_status(steps, 'sanitizer-' + t)})" for t in tools]
    parts = [p for p in re.split(r"^=+ COMPUTE-SANITIZER\s*$", text, flags=re.M)[1:]]
    lines = []
    for i, tool in enumerate(tools or ["(tool unnamed)"]):
        summary = re.findall(r"^=+ ((?:ERROR|LEAK|RACECHECK) SUMMARY: .*)$", parts[i], re.M) if i < len(parts) else []
        lines.append(f"- compute-sanitizer {tool}: " + ("; ".join(summary) if summary else "no summary")
                     + f" ({step_status(steps, 'sanitizer-' + tool)})")
    return lines


def section(out, title, make):
    try:
        out += make()
    except Exception as e:  # a file of a shape not foreseen: that section says so, the rest stands
        out.append(f"- {title}: unreadable ({type(e).__name__}: {e})")


def main():
    args = sys.argv[1:]
    dry = args[:1] == ["--dry-run"]
    args = args[1:] if dry else args
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: scripts/gpu-figures.py [--dry-run] OUTDIR", file=sys.stderr)
        return 2
    outdir = args[0]
    if not os.path.isdir(outdir):
        print(f"gpu-figures: {outdir}: not a folder", file=sys.stderr)
        return 2
    steps = steps_of(outdir)
    bench = read_json(outdir, "bench.json")
    if not isinstance(bench, dict):
        bench = bench_txt(read(outdir, "bench.txt"))
    out = [f"# gpu-check on {gpu_name(read(outdir, 'env.txt'), bench)}", ""]
    if dry:
        out += ["(a dry run: the emulation on the CPU with a 1-layer model; the figures mean nothing)", ""]
    if steps is None:
        out.append("no steps.txt: not a gpu-check folder, or a run stopped before its first step")
    else:
        bad = [f"{name} ({status})" for name, status in steps.items() if status != "0"]
        out.append(f"{len(steps)} steps; " + ("all passed" if not bad else "not passed: " + ", ".join(bad)))
    out.append("")
    section(out, "the goals", lambda: goals(outdir, steps, bench))
    out.append("")
    section(out, "bench_cuda", lambda: bench_lines(bench, steps))
    for what, name in (("PAS", "pas"), ("DPO", "dpo")):
        out += ["", f"## Where {what}'s device time goes", ""]
        profile = read(outdir, f"profile-{name}-8b4.txt")
        out += (["```"] + profile.splitlines()[:PROFILE_LINES] + ["```"] if profile else
                [missing("profile", steps, f"{name}-8b4-profiled")])
    out += ["", "## NCCL and the sanitizer", ""]
    nccl = read(outdir, "nccl-compare.txt")
    out.append(f"- NCCL against MPI: {nccl.strip().splitlines()[-1]}" if nccl and nccl.strip() else
               missing("NCCL against MPI", steps, next((s for s in ("nccl-1", "nccl-0", "nccl-compare")
                                                         if (steps or {}).get(s, "0") != "0"), "nccl-compare")))
    section(out, "compute-sanitizer", lambda: sanitizer_lines(outdir, steps))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
