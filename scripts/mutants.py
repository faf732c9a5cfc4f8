#!/usr/bin/env python3
"""scripts/mutants.py [--work DIR] [--only TEXT]... LIST...: whether the tests
catch the breakages a list describes (tests/mutants/*.txt).

Each breakage (a mutant) replaces one line's text in one source file with
another, and names the ctest tests that must then fail:

    [the gathered slices placed at their own length, not the padded one]
    file = coordinator/service.c
    from = recv + (size_t)k * count,
    to = recv + (size_t)k * all[2 * k + 1] * per,
    tests = test_cuda_service_emu

`from` must occur exactly once in the file, so a list that no longer fits
the code says so instead of testing nothing. The tree (tracked and
untracked files, as they are now) is copied to WORK/src (the files that
differ from the last run's copy) and built in WORK/build (Release); the
tests are run there unbroken first, and must pass; then for each mutant
the file is changed, the build brought up to date, the tests run, and the
file put back. A mutant is killed when a test fails, or
runs past the mutant's `timeout` (seconds, default 600: a hang). The
script prints a line per mutant and exits 1 when any mutant survives, no
longer fits, does not build, or a test was skipped (a skip proves nothing).

Running it takes a build and a test run per mutant: minutes to an hour, not
for every CI run. WORK defaults to /tmp/palign-mutants.
"""
import argparse
import configparser
import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_lists(paths):
    mutants = []
    for path in paths:
        cp = configparser.ConfigParser(interpolation=None, delimiters=("=",), comment_prefixes=("#",),
                                       inline_comment_prefixes=None, strict=True, empty_lines_in_values=False)
        cp.optionxform = str
        try:
            with open(path) as f:
                cp.read_file(f)
        except (OSError, configparser.Error) as e:
            sys.exit(f"mutants: {path}: {e}")
        for name in cp.sections():
            m = dict(cp[name])
            missing = {"file", "from", "to", "tests"} - set(m)
            if missing:
                sys.exit(f"mutants: {path}: [{name}] lacks {', '.join(sorted(missing))}")
            if "\n" in m["from"] or "\n" in m["to"]:
                sys.exit(f"mutants: {path}: [{name}]: from and to are one line each")
            try:
                timeout = int(m.get("timeout", 600))
            except ValueError:
                sys.exit(f"mutants: {path}: [{name}]: timeout {m['timeout']!r} is not a number of seconds")
            m.update(name=name, list=os.path.basename(path), tests=m["tests"].split(), timeout=timeout)
            mutants.append(m)
    return mutants


def run(cmd, log, timeout=None):
    """cmd's exit status, its output in log; None when it ran past timeout
    seconds (it is stopped then, with every process it started)."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None
        except KeyboardInterrupt:  # its own session does not get the terminal's ^C: stop it too
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise


def sync_tree(src):
    """src made the tree's copy (its tracked and untracked files). A file
    whose bytes differ is copied afresh, so it is newer than anything built
    from it, and the rest keep their times: a build left by an earlier run
    (its last mutant's objects, whose source was put back) is remade where
    it must be and only there."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    keep = {f for f in files if f and os.path.isfile(os.path.join(ROOT, f))}
    for f in keep:
        to = os.path.join(src, f)
        if not os.path.isfile(to) or not filecmp.cmp(os.path.join(ROOT, f), to, shallow=False):
            os.makedirs(os.path.dirname(to), exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, f), to)
            shutil.copymode(os.path.join(ROOT, f), to)
    for top, _, names in os.walk(src):
        for n in names:
            if os.path.relpath(os.path.join(top, n), src) not in keep:
                os.remove(os.path.join(top, n))


def ctest(build, tests, timeout, log):
    """'passed', 'failed', 'timed out' or 'skipped' for the tests named, run together."""
    regex = "^(" + "|".join(tests) + ")$"
    rc = run(["ctest", "--test-dir", build, "-R", regex, "--output-on-failure"], log, timeout)
    if rc is None:
        return "timed out"
    text = open(log, errors="replace").read()
    if "No tests were found" in text:
        return "no such test"
    if "***Skipped" in text or "Not Run" in text:
        return "skipped"
    return "failed" if rc else "passed"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lists", nargs="+")
    ap.add_argument("--work", default="/tmp/palign-mutants")
    ap.add_argument("--only", action="append",
                    help="only the mutants whose name contains this text (given again: any of the texts)")
    a = ap.parse_args()
    mutants = [m for m in read_lists(a.lists) if not a.only or any(t in m["name"] for t in a.only)]
    src, build, logs = (os.path.join(a.work, d) for d in ("src", "build", "logs"))
    os.makedirs(logs, exist_ok=True)
    sync_tree(src)
    # the data where the tree's tests look for it (../shared/papi beside the checkout)
    os.environ.setdefault("PALIGN_PAPI_DIR", os.path.join(os.path.dirname(ROOT), "shared", "papi"))
    if run(["cmake", "-S", src, "-B", build, "-DCMAKE_BUILD_TYPE=Release"], os.path.join(logs, "configure.log")) or \
            run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], os.path.join(logs, "build.log")):
        sys.exit(f"mutants: the unbroken tree does not build: {logs}/configure.log, build.log")
    for tests in sorted({tuple(m["tests"]) for m in mutants}):
        got = ctest(build, tests, 900, os.path.join(logs, "unbroken.log"))
        if got != "passed":
            sys.exit(f"mutants: unbroken, {' '.join(tests)}: {got} ({logs}/unbroken.log)")
    bad, start = 0, time.time()
    for i, m in enumerate(mutants):
        path = os.path.join(src, m["file"])
        text = open(path).read() if os.path.isfile(path) else ""
        log = os.path.join(logs, f"{i:03d}.log")
        t0 = time.time()
        if not os.path.isfile(path):
            got = f"no longer fits: no file {m['file']}"
        elif text.count(m["from"]) != 1:
            got = f"no longer fits: `from` occurs {text.count(m['from'])} times in {m['file']}"
        else:
            with open(path, "w") as f:
                f.write(text.replace(m["from"], m["to"]))
            try:
                if run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], log):
                    got = f"does not build ({log})"
                else:
                    got = ctest(build, m["tests"], m["timeout"], log)
                    # a test that hangs would fail at its ctest time limit
                    got = {"failed": "killed", "timed out": f"killed (timed out after {m['timeout']} s)",
                           "passed": f"SURVIVED ({log})"}.get(got, f"{got} ({log})")
            finally:
                with open(path, "w") as f:
                    f.write(text)
                os.utime(path)  # newer than the mutant's objects, so the next build remakes them
        bad += not got.startswith("killed")
        print(f"{m['list']}: [{m['name']}]: {got}, {time.time() - t0:.0f} s", flush=True)
    print(f"mutants: {len(mutants) - bad} of {len(mutants)} killed in {(time.time() - start) / 60:.1f} min")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the mutated file is put back, and what ran stopped
        sys.exit("mutants: stopped")
