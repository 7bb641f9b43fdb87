"""Scaling: time per model evaluation and peak memory vs volume size and batch size, pydiffmed vs MONAI.

Model: the "small" configuration of bench_unet.py (random non-zero weights, batch B, one channel), one forward at
t = 500 under no_grad; pydiffmed = UNet3D (bf16 on CPU, fp16 on a GPU), baseline = MONAI DiffusionModelUNet fp32.
Points: volume side 32, 48, 64, 96 at batch 1 and batch 2, 4 at 32³ (GPU: sides 32, 64, 96, 128 with --quick, else
32, 48, 64, 96, 128, 160).

Peak memory, measured per point after its timing (so one-time costs of a first call, such as libraries, JIT
kernels and primitive caches, are not counted): the memory one more forward adds above what is in use before it.
  * CPU: each point runs in a fresh subprocess. glibc malloc is set to serve blocks >= 64 KiB by mmap and its heap
    trimmed (mallopt), so freed tensors leave the RSS and the RSS follows the live tensors; then the kernel's
    peak-RSS mark is reset (writing 5 to /proc/self/clear_refs), and peak_MB = VmHWM after the forward - VmRSS
    before it. Without clear_refs: ru_maxrss - RSS before (a lower bound; `memory_method` says which).
  * GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
Next to it pydiffmed.estimate_memory(model, shape, dtype): its activation estimate (one forward, extrapolated from
two proxy volumes; comparable to peak_MB) and its total for a whole sampling run (parameters + solver state +
activations). time: median over --repeats forwards after one warm-up (fewer when one forward exceeds --max-seconds
of timing). Writes results/bench_scaling_<device>.json and a log-log plot of time (and memory) vs voxels.

    python benchmarks/bench_scaling.py [--quick] [--repeats N] [--threads N] [--max-seconds S]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import command_line, result_path, run_worker, save, sync  # noqa: E402
from pydiffmed.host_memory import set_malloc_thresholds  # noqa: E402

CONFIG = "small"
IMPLS = ("pydiffmed", "MONAI")
MIB = 2.0 ** 20


def build(impl, device):
    """The model of `impl` on `device` and its dtype (same random weights for both)."""
    from monai.networks.nets import DiffusionModelUNet

    from bench_unet import CONFIGS, randomize_
    from pydiffmed.models import UNet3D

    torch.manual_seed(0)
    monai = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS[CONFIG]))
    monai = monai.eval().to(device)
    if impl == "MONAI":
        return monai, torch.float32
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    return UNet3D.from_monai(monai).eval().to(dtype), dtype


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_returns_memory() -> bool:
    """Make glibc malloc serve every block of 64 KiB or more by mmap and trim its heap, so that freed tensors
    leave the RSS at once and the RSS follows the live tensors (the default keeps freed blocks for reuse)."""
    import ctypes

    if not set_malloc_thresholds(64 * 1024, 128 * 1024):
        return False
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return True


def time_forwards(forward, device, repeats, max_seconds):
    """Median seconds of forward() after one warm-up; stops early once max_seconds of timing have passed."""
    forward()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        forward()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times), len(times)


def forward_peak_bytes(forward, device):
    """(bytes one more forward() adds above the memory in use before it, method). Run after the timing, so
    one-time costs of a first call (libraries, JIT kernels, primitive caches) are not counted."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    exact_rss = _malloc_returns_memory()
    gc.collect()
    base = _status_kib("VmRSS") * 1024
    if _reset_peak_rss():
        forward()
        peak, method = _status_kib("VmHWM") * 1024, "VmHWM after clear_refs"
    else:
        forward()
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (lower bound)"
    return peak - base, method + (", malloc mmap threshold 64 KiB" if exact_rss else "")


def measure_point(impl, size, batch, device, repeats, max_seconds) -> dict:
    """Time and peak memory of one point, in this process (a fresh one on CPU: the allocator settings of the
    memory measurement then affect no other point)."""
    import pydiffmed

    model, dtype = build(impl, device)
    shape = (batch, 1, size, size, size)
    x = torch.randn(shape, device=device).to(dtype)
    t = torch.full((batch,), 500.0, device=device)
    with torch.no_grad():
        seconds, runs = time_forwards(lambda: model(x, t), device, repeats, max_seconds)
        peak, method = forward_peak_bytes(lambda: model(x, t), device)
    # last: the estimate runs proxy forwards of its own
    estimate = pydiffmed.estimate_memory(model, shape, dtype)
    return {"ms": seconds * 1e3, "runs": runs, "peak_MB": peak / MIB, "memory_method": method,
            "est_activations_MB": None if estimate.activations is None else estimate.activations / MIB,
            "est_total_MB": estimate.total / MIB}


def run_point_subprocess(impl, size, batch, repeats, max_seconds, threads, timeout_s) -> dict:
    """measure_point in a fresh Python (the RSS peak then belongs to this point alone)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{impl},{size},{batch}", "--repeats",
           str(repeats), "--max-seconds", str(max_seconds)] + (["--threads", str(threads)] if threads else [])
    return run_worker(cmd, timeout_s)


def points(device, quick, smoke):
    """[(impl, side, batch)]: the volume sweep at batch 1, then the batch sweep at the smallest side."""
    if smoke:
        sides, batches = [8, 16], [1, 2]
    elif device == "cuda":
        sides, batches = ([32, 64, 96, 128] if quick else [32, 48, 64, 96, 128, 160]), [1, 2, 4]
    else:
        sides, batches = [32, 48, 64, 96], [1, 2, 4]
    sweep = [(side, 1) for side in sides] + [(sides[0], b) for b in batches if b != 1]
    return [(impl, side, batch) for side, batch in sweep for impl in IMPLS]


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    for k, impl in enumerate(IMPLS):
        mine = [r for r in rows if r["impl"] == impl and "ms" in r]
        color = f"C{k}"
        for batch_one, marker, ls, what in ((True, "o", "-", "batch 1, volume sweep"),
                                            (False, "s", "none", "batch sweep")):
            pts = sorted((r for r in mine if (r["batch"] == 1) == batch_one), key=lambda r: r["voxels"])
            if not pts:
                continue
            label = f"{mine[0]['variant']} ({what})"
            ax_t.plot([r["voxels"] for r in pts], [r["ms"] for r in pts], marker=marker, ls=ls, color=color,
                      label=label, mfc=color if batch_one else "none")
            ax_m.plot([r["voxels"] for r in pts], [r["peak_MB"] for r in pts], marker=marker, ls=ls, color=color,
                      label=f"{label}, measured", mfc=color if batch_one else "none")
            est = [(r["voxels"], r["est_activations_MB"]) for r in pts if r.get("est_activations_MB")]
            if est and batch_one:
                ax_m.plot(*zip(*est), ls="--", color=color, label=f"{mine[0]['variant']}, estimate_memory "
                          "activations")
    for ax, title, unit in ((ax_t, "time per model evaluation", "ms"),
                            (ax_m, "peak memory of one forward (above baseline)", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels per evaluation (batch × D·H·W)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("plot:", path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (GPU: fewer sizes, up to 128³)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests): 8³ and 16³, batch 1 and 2")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per point")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop timing a point after this many seconds (at least one timed forward)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "impl,side,batch": one CPU point
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = args.repeats or (2 if args.smoke else (3 if args.quick else 5) if device == "cpu" else
                               (10 if args.quick else 20))
    max_seconds = args.max_seconds or (30.0 if device == "cpu" else 2.0 if args.quick else 10.0)

    if args.worker:
        impl, side, batch = args.worker.split(",")
        print(json.dumps(measure_point(impl, int(side), int(batch), device, repeats, max_seconds)), flush=True)
        return

    rows = []
    todo = points(device, args.quick, args.smoke)
    for k, (impl, side, batch) in enumerate(todo):
        if device == "cpu":
            result = run_point_subprocess(impl, side, batch, repeats, max_seconds, args.threads,
                                          timeout_s=max(120.0, 20 * max_seconds))
        else:
            try:
                result = measure_point(impl, side, batch, device, repeats, max_seconds)
            except torch.cuda.OutOfMemoryError as exc:
                result = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            gc.collect()
            torch.cuda.empty_cache()
        dtype = "fp32" if impl == "MONAI" else ("fp16" if device == "cuda" else "bf16")
        row = {"impl": impl, "variant": f"{'UNet3D' if impl == 'pydiffmed' else 'MONAI'} {dtype}",
               "volume": f"{side}³", "batch": batch, "voxels": batch * side ** 3}
        if "error" in result:
            row["note"] = result["error"]
        else:
            row.update(result)
            if row.get("est_activations_MB"):
                row["peak_vs_estimate"] = row["peak_MB"] / row["est_activations_MB"]
        rows.append(row)
        print(f"{row['variant']:12s} {row['volume']:>5s} batch {batch}: "
              + (row["note"] if "note" in row else
                 f"{row['ms']:9.1f} ms ({row['runs']} runs), peak {row['peak_MB']:8.1f} MiB, estimate "
                 f"{row['est_activations_MB'] or float('nan'):8.1f} MiB activations"), flush=True)
        if k + 1 < len(todo):  # a run stopped by a time limit still leaves the points measured so far
            write(rows, repeats, max_seconds, device, partial=f"PARTIAL: {k + 1} of {len(todo)} points done. ")
    print(write(rows, repeats, max_seconds, device))
    plot(rows, result_path("bench_scaling", "png"))


def write(rows, repeats, max_seconds, device, partial=""):
    """Add the pydiffmed/MONAI ratios and save the rows; returns the markdown table."""
    for row in rows:
        other = next((r for r in rows if r["impl"] == "MONAI" and r["voxels"] == row["voxels"]
                      and r["batch"] == row["batch"] and "ms" in r), None)
        if row["impl"] == "pydiffmed" and other and "ms" in row:
            row["speedup_vs_MONAI"] = other["ms"] / row["ms"]
            row["memory_vs_MONAI"] = row["peak_MB"] / other["peak_MB"] if other["peak_MB"] > 0 else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    method = next((r["memory_method"] for r in rows if "memory_method" in r), "none")
    notes = (f"{partial}`{command_line()}`: model bench_unet '{CONFIG}' config, one forward at t = 500, "
             f"repeats={repeats} (fewer past {max_seconds:g} s of timing: see runs), torch threads "
             f"{torch.get_num_threads()}, 1-min load average at the end {load:.2f}. peak_MB = memory one more "
             f"forward adds above what is in use before it (after the timed forwards), measured by {method}"
             + (", each point in a fresh process" if device == "cpu" else "") +
             "; est_activations_MB / est_total_MB = pydiffmed.estimate_memory (one forward; a whole sampling run).")
    columns = ["variant", "volume", "batch", "voxels", "ms", "runs", "speedup_vs_MONAI", "peak_MB",
               "est_activations_MB", "peak_vs_estimate", "est_total_MB", "memory_vs_MONAI", "note"]
    return save("bench_scaling", rows, columns, notes)


if __name__ == "__main__":
    main()
