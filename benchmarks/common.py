"""Shared benchmark helpers: timing, same-run bandwidth/FLOP limits, machine description, result files.

Every benchmark prints a markdown table and writes benchmarks/results/<name>.json; benchmarks/RESULTS.md is
regenerated from those files by `python benchmarks/results_md.py`."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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
                                       stderr=subprocess.DEVNULL, cwd=os.path.dirname(RESULTS_DIR)).strip()
    except Exception:
        return "unknown"


def save(name: str, rows: list[dict], columns: list[str], notes: str = "") -> str:
    """Write results/<name>[_<device>].json and return the markdown table."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    suffix = "_cuda" if torch.cuda.is_available() else "_cpu"
    payload = {"name": name, "machine": machine(), "columns": columns, "rows": rows, "notes": notes}
    path = os.path.join(RESULTS_DIR, name + suffix + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    return markdown_table(columns, rows)


def markdown_table(columns, rows) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
