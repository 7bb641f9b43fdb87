"""Shared benchmark helpers: timing, same-run bandwidth/FLOP limits, machine description, result files.

Every benchmark prints a markdown table and writes benchmarks/results/<name>_<cpu|cuda>.json; benchmarks/RESULTS.md
is regenerated from those files by `python benchmarks/results_md.py`. The environment variable
PYDIFFMED_BENCH_RESULTS names another results directory (the tests use one, so they never touch results/)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_DIR = os.path.abspath(os.environ.get("PYDIFFMED_BENCH_RESULTS") or DEFAULT_RESULTS_DIR)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device="cpu", repeats=10, warmup=2, min_time=0.0) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def interleaved_medians(fns: dict, device, repeats: int, warmup: int = 2) -> dict:
    """(median wall time, median process CPU time) of each callable, timing them in turn within every round.
    CPU time (all threads of this process) is less sensitive than wall time to other processes on the cores."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
            for name, ts in times.items()}


def run_worker(cmd: list, timeout_s: float, env: dict | None = None) -> dict:
    """Run a benchmark's measuring worker in a fresh Python (so that its memory peak is its own; env: its whole
    environment, default this one's) and return the last JSON line it printed, or {"error": why} when it timed
    out, failed or printed none."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group of `proc` (started with start_new_session=True), 10 s grace each."""
    import signal

    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def add_fresh_pages_option(parser) -> None:
    parser.add_argument("--fresh-pages", action="store_true",
                        help="keep glibc's malloc defaults (freed activations go back to the OS)")


def keep_freed_memory_unless(fresh_pages: bool, device) -> str:
    """On the CPU, keep freed memory for reuse as the `pydiffmed sample` command does (unless --fresh-pages);
    the sentence the results' notes get about it ("" elsewhere)."""
    from pydiffmed.host_memory import keep_freed_memory

    if str(device) != "cpu":
        return ""
    if not fresh_pages and keep_freed_memory():
        return " Freed memory kept for reuse (glibc mmap/trim thresholds raised, as `pydiffmed sample` does)."
    return " glibc's malloc defaults: activations page-faulted in afresh on every call."


def copy_bandwidth(nbytes: int, device="cpu") -> float:
    """Same-run memory bandwidth (bytes/s) of torch.clone on a buffer of nbytes: read + write counted."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    t = median_time(lambda: src.clone(), device, repeats=10)
    return 2 * src.numel() * 4 / t


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "commit": _commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL, cwd=HERE).strip()
    except Exception:
        return "unknown"


def device_suffix() -> str:
    return "_cuda" if torch.cuda.is_available() else "_cpu"


def result_path(name: str, ext: str = "json", results_dir: str | None = None) -> str:
    """<results dir>/<name>_<cpu|cuda>.<ext>: where a benchmark's table (json) or plot (png) goes."""
    return os.path.join(results_dir or RESULTS_DIR, f"{name}{device_suffix()}.{ext}")


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(HERE))
    return shlex.join(["python", script, *sys.argv[1:]])


def save(name: str, rows: list[dict], columns: list[str], notes: str = "", results_dir: str | None = None) -> str:
    """Write <results dir>/<name>_<device>.json (with the command line that produced it) and return the markdown
    table. results_dir defaults to RESULTS_DIR (benchmarks/results, or $PYDIFFMED_BENCH_RESULTS)."""
    path = result_path(name, "json", results_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"name": name, "command": command_line(), "machine": machine(), "columns": columns, "rows": rows,
               "notes": notes}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return markdown_table(columns, rows)


def op_benchmarks() -> list[str]:
    """bench_<op> for every op in pydiffmed's backend registry that has a script here: the kernel benchmarks
    (gpu_suite.sh runs them, results_md.py gives each a headline), read from the registry, not kept by hand."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from pydiffmed import backends

    return [f"bench_{op}" for op in backends.ops() if os.path.exists(os.path.join(HERE, f"bench_{op}.py"))]


def markdown_table(columns, rows) -> str:
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v).replace("|", "\\|")  # a bare | would end the table cell

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
