#!/usr/bin/env python3
"""scripts/gpu-figures.py OUTDIR: the figures of a scripts/gpu-check.sh run,
as Markdown for docs/CUDA.md, held against issue 13's goals.

Reads what gpu-check left in OUTDIR (steps.txt, env.txt, bench.json,
forward-8b4*.txt, pas-8b4*.txt, dpo-8b4.txt, profile-pas-8b4.txt,
nccl-compare.txt, sanitizer.log) and prints:
  - the GPU (nvidia-smi's name and driver) and the steps that failed or were
    skipped;
  - the goals: prefill TFLOP/s on the 8B layer shape (bench_forward; the
    1,536-token prefill where there is one, else the 512-token one) as a
    share of the bf16 GEMM peak bench_cuda measured in the same gpu-check
    run (goal: 50%), and PAS seconds per subject: the eval's own figures
    for 4 of the 32 layers (the bank's share per usable subject, the
    probes, the alpha grid), each of which grows with the layers, times 8
    (goal: under 5 s); DPO's the same way;
  - bench_cuda's products, attention kernels and memory rates;
  - the profile's first rows and what the profile cost (PAS's grid with it
    against without);
  - NCCL's comparison and the sanitizer's summaries.
A figure whose file is missing or unreadable is said to be missing, with its
step's status. Exits 0 (the figures are for reading; gpu-check's own status
says whether the run passed), 2 on usage errors.
"""
import json
import os
import re
import sys

LAYERS_RUN, LAYERS_8B = 4, 32
GOAL_PREFILL_SHARE, GOAL_PAS_S = 0.50, 5.0


def read(outdir, name):
    try:
        with open(os.path.join(outdir, name), errors="replace") as f:
            return f.read()
    except OSError:
        return None


def steps_of(outdir):
    """{step: status} from steps.txt ("name status seconds" or "name skipped")."""
    steps = {}
    for line in (read(outdir, "steps.txt") or "").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            steps[parts[0]] = parts[1]
    return steps


def keyvals(text):
    """bench_forward's `key value` lines."""
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def step_status(steps, step):
    status = steps.get(step)
    return f"step {step}: {status}" if status else f"step {step} did not run"


def missing(what, steps, step):
    return f"- {what}: missing ({step_status(steps, step)})"


def tflops(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.3f}"


PAS_LINE = re.compile(r"PAS per fitted subject \((\d+)\): bank ([\d.]+) s .*?\(([\d.]+) s per subject over the (\d+) "
                      r"usable subjects\), probes ([\d.]+) s, alpha grid ([\d.]+) s")
DPO_LINE = re.compile(r"DPO per trained subject \((\d+)\): reference ([\d.]+) s, .*?; steps ([\d.]+) s")


def gpu_line(env):
    """nvidia-smi's GPU name and driver, from its table in env.txt."""
    driver = re.search(r"Driver Version:\s*([\d.]+)", env or "")
    name = re.search(r"\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}", env or "")
    return (name.group(1).strip() if name else "a GPU nvidia-smi did not name") + \
        (f", driver {driver.group(1)}" if driver else "")


def goals(outdir, steps, bench):
    lines = ["## Against the goals", ""]
    peak = bench.get("bf16_peak_tflops") if bench else None
    fwd = keyvals(read(outdir, "forward-8b4.txt"))
    if "prefill_long_gflops" in fwd:
        tokens, gflops = int(fwd["prefill_long_tokens"]), fwd["prefill_long_gflops"]
    elif "prefill_gflops" in fwd:
        tokens, gflops = 512, fwd["prefill_gflops"]
    else:
        tokens = gflops = None
    if gflops is None:
        lines.append(missing("prefill", steps, "forward-8b4"))
    elif not peak:
        lines.append(f"- prefill ({tokens} tokens, bf16 weights, {LAYERS_RUN} layers of Llama-3-8B's shape): "
                     f"{tflops(gflops / 1e3)} TFLOP/s; the bf16 peak is missing ({step_status(steps, 'bench_cuda')})")
    else:
        share = gflops / 1e3 / peak
        lines.append(f"- prefill ({tokens} tokens, bf16 weights, {LAYERS_RUN} layers of Llama-3-8B's shape): "
                     f"{tflops(gflops / 1e3)} TFLOP/s, {100 * share:.0f}% of the bf16 GEMM peak ({peak:.0f} TFLOP/s, "
                     f"cuBLAS 8192^3): goal {100 * GOAL_PREFILL_SHARE:.0f}%, "
                     + ("met" if share >= GOAL_PREFILL_SHARE else f"{100 * (GOAL_PREFILL_SHARE - share):.0f} points "
                        "short"))
    pas = PAS_LINE.search(read(outdir, "pas-8b4.txt") or "")
    if not pas:
        lines.append(missing("PAS per subject", steps, "pas-8b4"))
    else:
        share, probes, grid = float(pas.group(3)), float(pas.group(5)), float(pas.group(6))
        run = share + probes + grid
        whole = run * LAYERS_8B / LAYERS_RUN
        lines.append(f"- PAS per subject, {LAYERS_RUN} layers: {run:.2f} s (the bank's share {share:.2f} s over "
                     f"{pas.group(4)} usable subjects, probes {probes:.2f} s, alpha grid {grid:.2f} s); all "
                     f"{LAYERS_8B} layers, each part {LAYERS_8B // LAYERS_RUN}x: about {whole:.1f} s: goal under "
                     f"{GOAL_PAS_S:.0f} s, " + ("met" if whole < GOAL_PAS_S else f"{whole / GOAL_PAS_S:.1f}x over"))
        prof = PAS_LINE.search(read(outdir, "pas-8b4-profiled.txt") or "")
        if prof and grid > 0:
            lines.append(f"- the profile's cost: PAS's grid {float(prof.group(6)):.2f} s under the profile against "
                         f"{grid:.2f} s ({float(prof.group(6)) / grid:.2f}x)")
    dpo = DPO_LINE.search(read(outdir, "dpo-8b4.txt") or "")
    if not dpo:
        lines.append(missing("DPO per subject", steps, "dpo-8b4"))
    else:
        ref, train = float(dpo.group(2)), float(dpo.group(3))
        lines.append(f"- DPO per subject, {LAYERS_RUN} layers: {ref + train:.1f} s (reference {ref:.1f} s, steps "
                     f"{train:.1f} s); all {LAYERS_8B} layers about {(ref + train) * LAYERS_8B / LAYERS_RUN:.0f} s")
    return lines


KERNELS = ("simple", "tiled", "mma", "mma_bf16")
SHAPES = (("prefill", "prefill, 1,024 tokens"), ("pas", "PAS's pass, 180 x 70 after 2,400"),
          ("decode1", "decoding, 1 sequence after 2,400"), ("decode180", "decoding, 180 items"))
ROW_OPS = ("rmsnorm", "rope", "swiglu", "add", "round_bf16")


def bench_lines(bench):
    lines = ["## bench_cuda", ""]
    if not bench:
        return lines + ["- missing (bench.json)"]
    lines.append(f"- products of a layer, 1,024 tokens: fp32 {bench['layer_matmul_tflops']:.1f} TFLOP/s, bf16 "
                 f"{bench['layer_matmul_bf16_tflops']:.1f} TFLOP/s "
                 f"({100 * bench['layer_matmul_bf16_tflops'] / bench['bf16_peak_tflops']:.0f}% of the peak)")
    lines += ["", "| attention, ms | " + " | ".join(KERNELS) + " | bf16 / tf32 |", "| --- |" + " ---: |" * 5]
    for key, name in SHAPES:
        ms = [bench.get(f"attention_{key}_{k}_ms") for k in KERNELS]
        cells = [f"{m:.3f}" if m is not None else "-" for m in ms]
        ratio = f"{ms[3] / ms[2]:.2f}" if ms[2] and ms[3] else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("")
    for k in ("mma", "mma_bf16"):
        split, whole = bench.get(f"attention_decode1_{k}_ms"), bench.get(f"attention_decode1_{k}_unsplit_ms")
        if split and whole:
            lines.append(f"- {k}, decoding 1 sequence: {bench.get('decode1_shares')} shares {split:.3f} ms, one "
                         f"block a kv head {whole:.3f} ms ({whole / split:.2f}x)")
        sweep = [(n, bench.get(f"attention_decode180_{k}_packed_{n}_shares_ms"),
                  bench.get(f"attention_decode180_{k}_packed_{n}_shares_total")) for n in (1, 2, 3, 4, 6, 8)]
        if all(ms is not None for _, ms, _ in sweep):
            lines.append(f"- {k}, decoding 180 items packed, by shares a walk (asked: all, ms): "
                         + ", ".join(f"{n}: {total} {ms:.3f}" for n, ms, total in sweep))
    if "copy_gbs" in bench:
        lines.append(f"- memory: a device-to-device copy at {bench['copy_gbs']:.0f} GB/s; on PAS's pass's rows "
                     + ", ".join(f"{op} {bench[op + '_gbs']:.0f} GB/s ({100 * bench[op + '_gbs'] / bench['copy_gbs']:.0f}%)"
                                 for op in ROW_OPS if op + "_gbs" in bench))
    return lines


def main():
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print("usage: scripts/gpu-figures.py OUTDIR", file=sys.stderr)
        return 2
    outdir = sys.argv[1]
    if not os.path.isdir(outdir):
        print(f"gpu-figures: {outdir}: not a folder", file=sys.stderr)
        return 2
    steps = steps_of(outdir)
    try:
        bench = json.loads(read(outdir, "bench.json") or "null")
    except json.JSONDecodeError as e:
        print(f"gpu-figures: {outdir}/bench.json: {e}", file=sys.stderr)
        bench = None
    out = [f"# gpu-check on {gpu_line(read(outdir, 'env.txt'))}", ""]
    bad = [f"{name} ({status})" for name, status in steps.items() if status != "0"]
    out.append(f"{len(steps)} steps; " + ("all passed" if not bad else "not passed: " + ", ".join(bad)))
    out += [""] + goals(outdir, steps, bench) + [""] + bench_lines(bench) + ["", "## Where PAS's device time goes", ""]
    profile = read(outdir, "profile-pas-8b4.txt")
    out += ["```"] + profile.splitlines()[:16] + ["```"] if profile else [missing("profile", steps, "pas-8b4-profiled")]
    nccl = read(outdir, "nccl-compare.txt")
    out += ["", "## NCCL and the sanitizer", "",
            f"- NCCL against MPI: {nccl.strip().splitlines()[-1]}" if nccl and nccl.strip()
            else missing("NCCL against MPI", steps, "nccl-compare")]
    sanitizer = read(outdir, "sanitizer.log")
    summaries = re.findall(r"^=+ (ERROR SUMMARY: .*|LEAK SUMMARY: .*|RACECHECK SUMMARY: .*)$", sanitizer or "", re.M)
    out.append("- compute-sanitizer: " + ("; ".join(summaries) if summaries else
                                         (sanitizer.strip().splitlines()[-1] if sanitizer and sanitizer.strip()
                                          else "no log")))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
