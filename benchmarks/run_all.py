"""Run every benchmarks/bench_*.py, then regenerate benchmarks/RESULTS.md from benchmarks/results/*.json.

Each benchmark runs in its own subprocess (this Python, repository root as working directory) with a time limit;
a benchmark that fails or runs out of time is reported at the end and the others still run. RESULTS.md is
regenerated from whatever results exist afterwards. The exit status is 1 if any benchmark (or the RESULTS.md
step) failed, else 0.

    python benchmarks/run_all.py                  # quick sizes (each script's --quick): minutes per script on CPU
    python benchmarks/run_all.py --full           # each script's full sizes
    python benchmarks/run_all.py --only bench_group_norm,fused_step --timeout 600
    python benchmarks/run_all.py --list
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import stop_process_group  # noqa: E402

QUICK_TIMEOUT_S = 1200
FULL_TIMEOUT_S = 3600


def discover() -> list[str]:
    """Names (without .py) of all bench_*.py scripts, sorted."""
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def normalize(name: str) -> str:
    """'group_norm', 'bench_group_norm' and 'bench_group_norm.py' all name benchmarks/bench_group_norm.py."""
    name = os.path.basename(name.strip())
    if name.endswith(".py"):
        name = name[:-3]
    return name if name.startswith("bench_") else "bench_" + name


def select(available: list[str], only: str | None, skip: str | None) -> list[str]:
    def parse(spec, flag):
        names = [normalize(n) for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise SystemExit(f"{flag}: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
        return names

    chosen = parse(only, "--only") if only else list(available)
    if skip:
        skipped = set(parse(skip, "--skip"))
        chosen = [n for n in chosen if n not in skipped]
    return chosen


def run_one(name: str, quick: bool, timeout_s: float) -> tuple[str, float]:
    """Run one benchmark with output passed straight through; return (status, wall seconds)."""
    cmd = [sys.executable, os.path.join(HERE, name + ".py")] + (["--quick"] if quick else [])
    print(f"\n=== {name}: {' '.join(cmd)} (time limit {timeout_s:.0f} s)", flush=True)
    start = time.perf_counter()
    # Own session, so that on a timeout the whole process group (worker threads/processes included) is stopped.
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        status = f"timed out after {timeout_s:.0f} s"
    except KeyboardInterrupt:
        stop_process_group(proc)
        raise
    wall = time.perf_counter() - start
    print(f"=== {name}: {status} in {wall:.1f} s", flush=True)
    return status, wall


def regenerate_results_md() -> str:
    rc = subprocess.call([sys.executable, os.path.join(HERE, "results_md.py")], cwd=ROOT)
    return "ok" if rc == 0 else f"failed (exit {rc})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full sizes (default: each script's --quick)")
    parser.add_argument("--only", default=None, help="comma-separated benchmarks to run, e.g. group_norm,unet")
    parser.add_argument("--skip", default=None, help="comma-separated benchmarks to leave out")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds per benchmark (default {QUICK_TIMEOUT_S} quick, {FULL_TIMEOUT_S} full)")
    parser.add_argument("--no-results-md", action="store_true", help="do not regenerate RESULTS.md")
    parser.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    args = parser.parse_args(argv)
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")

    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    names = select(available, args.only, args.skip)
    if not names:
        parser.error("no benchmark left to run")
    quick = not args.full
    timeout_s = args.timeout or (QUICK_TIMEOUT_S if quick else FULL_TIMEOUT_S)

    outcomes = [(name, *run_one(name, quick, timeout_s)) for name in names]
    if not args.no_results_md:
        outcomes.append(("RESULTS.md", regenerate_results_md(), 0.0))

    print(f"\n=== summary ({'quick' if quick else 'full'} sizes)")
    for name, status, wall in outcomes:
        print(f"  {name:<22} {status:<28} {wall:8.1f} s")
    failed = [name for name, status, _ in outcomes if status != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
