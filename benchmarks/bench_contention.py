"""UNet forward on a shared CPU: each variant timed quiet and while a fixed competing load runs on the same cores.

The competing load is `--load` busy processes (pure-Python loops, default 2: as many as this machine's cores)
started by the benchmark for the length of one timing and stopped after it (they also stop by themselves after
`--load-seconds`). Every variant runs in a fresh worker process, because the OpenMP wait setting it tests is read
once, when torch loads its OpenMP runtime:

* pydiffmed UNet3D with adaptive threads: each forward run as one step of the engine's CPU loop
  (pydiffmed.cpu_threads.AdaptiveThreads, what Sampler/sample do by default with a UNet3D: fewer threads while
  the process gets fewer cores than it asks for);
* pydiffmed UNet3D at a fixed thread count, with pydiffmed's wait setting (GOMP_SPINCOUNT=1000, what
  `import pydiffmed` sets before torch: pydiffmed/_openmp.py), and with libgomp's default (GOMP_SPINCOUNT=300000
  given explicitly, what torch runs with when nothing is set);
* OpenVINO fp32 / bf16 (benchmarks/peers.py) and MONAI eager, same weights and input, same thread count.

Configuration "small" of bench_unet.py (channels (32, 64, 64), attention at the last level), batch 1. Rounds:
quiet and loaded timings alternate, variant by variant, `--passes` times over; each timing is the median of
`--repeats` forwards after a warm-up. slowdown = loaded / quiet of the same variant; vs_fastest_peer_loaded =
the fastest peer's loaded time at the same precision / ours (> 1: we are faster under the same load);
threads_quiet / threads_loaded: the thread count of the timed forwards of the last pass. The busy processes run
in sessions of their own, as other users' jobs do: with Linux's autogroups each session gets its share of the
cores.

    python benchmarks/bench_contention.py [--quick] [--size N] [--repeats N] [--passes N] [--load N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# (name, worker kind, environment the worker starts with)
VARIANTS = [
    ("pydiffmed UNet3D (adaptive threads)", "unet3d_adaptive", {}),
    ("pydiffmed UNet3D (pydiffmed's OpenMP wait)", "unet3d", {}),
    ("pydiffmed UNet3D (libgomp default wait)", "unet3d", {"GOMP_SPINCOUNT": "300000"}),
    ("MONAI eager", "monai", {"GOMP_SPINCOUNT": "300000"}),
    ("OpenVINO", "openvino", {"GOMP_SPINCOUNT": "300000"}),
]
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def worker(kind: str, dtype_name: str, size: int, repeats: int, threads: int) -> dict:
    """Runs in its own process: build the variant, time `repeats` forwards, print one JSON line."""
    import pydiffmed  # first: it sets the OpenMP wait before torch loads the runtime (unless the env has one)
    import torch

    torch.set_num_threads(threads)
    from bench_unet import CONFIGS, randomize_
    from monai.networks.nets import DiffusionModelUNet

    from pydiffmed.models import UNet3D

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    monai = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS["small"]).eval())
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    governor = None
    if kind.startswith("unet3d"):
        model = UNet3D.from_monai(monai).to(dtype).eval()
        xin = x.to(dtype)
        fn = lambda: model(xin, t)  # noqa: E731
        if kind == "unet3d_adaptive":  # each forward one step of a sampling loop (the engine's default on CPU)
            from pydiffmed.cpu_threads import AdaptiveThreads

            governor = AdaptiveThreads(threads)
            forward = fn
            fn = lambda: governor.run(forward)  # noqa: E731
    elif kind == "monai":
        model = monai.to(dtype)
        xin = x.to(dtype)
        fn = lambda: model(xin, t)  # noqa: E731
    else:
        from peers import build_peers

        peer = build_peers(monai, x, t, include=("openvino",), dtypes=(dtype_name,), threads=threads)[0]
        if not peer.ok:
            return {"error": peer.note}
        fn = peer.fn
    times = []
    with torch.no_grad():
        for _ in range(2):
            fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    used = governor.history[-repeats:] if governor else [torch.get_num_threads()] * repeats
    return {"ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times), "threads_used": used,
            "spin": os.environ.get("GOMP_SPINCOUNT"), "wait_set_by_pydiffmed": pydiffmed.OPENMP_WAIT_POLICY_SET}


def _threads_summary(counts) -> str | None:
    """The thread counts of the timed forwards of the last pass, e.g. "2" or "1 (2 in 1 of 7)"."""
    if not counts:
        return None
    common = max(set(counts), key=counts.count)
    others = [c for c in counts if c != common]
    return str(common) + (f" ({'/'.join(map(str, sorted(set(others))))} in {len(others)} of {len(counts)})"
                          if others else "")


def start_load(count: int, seconds: float) -> list:
    return [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)], start_new_session=True)
            for _ in range(count)]


def stop_load(procs: list) -> None:
    from common import stop_process_group

    for proc in procs:
        stop_process_group(proc)


def timed(kind, env_extra, dtype, args, load: bool) -> dict:
    """One timing in a fresh worker (the last JSON line it prints), under the competing load if `load`."""
    from common import run_worker

    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--dtype", dtype, "--size", str(args.size),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    procs = start_load(args.load, args.load_seconds) if load else []
    try:
        return run_worker(cmd, args.load_seconds, env)
    finally:
        stop_load(procs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32³, 5 forwards per timing, 1 pass")
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy processes (default: cores)")
    parser.add_argument("--load-seconds", type=float, default=300.0, help="bound on each timing and its load")
    parser.add_argument("--variants", nargs="+", help="only the variants whose names contain one of these")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.size, args.repeats, args.threads)))
        return
    if args.quick:
        args.size, args.repeats, args.passes = 32, 5, 1
    from common import save

    variants = [v for v in VARIANTS if not args.variants or any(word in v[0] for word in args.variants)]
    results = {}  # (name, dtype) -> {"quiet": [ms], "loaded": [ms], "error": str}
    for _ in range(args.passes):
        for dtype in args.dtypes:
            for name, kind, env in variants:
                entry = results.setdefault((name, dtype), {"quiet": [], "loaded": [], "error": ""})
                if entry["error"]:
                    continue
                for load in (False, True):
                    out = timed(kind, env, dtype, args, load)
                    if "error" in out:
                        entry["error"] = out["error"]
                        break
                    entry["loaded" if load else "quiet"].append(out["ms"])
                    entry["threads_loaded" if load else "threads_quiet"] = out["threads_used"]
                    print(f"{name} {dtype} {'loaded' if load else 'quiet'}: {out['ms']:.0f} ms "
                          f"(slowest forward {out['max_ms']:.0f} ms, threads {out['threads_used']})", flush=True)
    rows = []
    for (name, dtype), entry in results.items():
        quiet = statistics.median(entry["quiet"]) if entry["quiet"] else None
        loaded = statistics.median(entry["loaded"]) if entry["loaded"] else None
        rows.append({"variant": name, "dtype": dtype, "size": f"{args.size}³",
                     "quiet_ms": None if quiet is None else round(quiet, 1),
                     "loaded_ms": None if loaded is None else round(loaded, 1),
                     "slowdown": None if not (quiet and loaded) else round(loaded / quiet, 2),
                     "threads_quiet": _threads_summary(entry.get("threads_quiet")),
                     "threads_loaded": _threads_summary(entry.get("threads_loaded")),
                     "error": entry["error"]})
    for row in rows:
        if row["variant"].startswith("pydiffmed") and row["loaded_ms"]:
            peers = [r["loaded_ms"] for r in rows if not r["variant"].startswith("pydiffmed")
                     and r["dtype"] == row["dtype"] and r["loaded_ms"]]
            row["vs_fastest_peer_loaded"] = round(min(peers) / row["loaded_ms"], 2) if peers else None
            row["target"] = ("slowdown <= 3: " + ("met" if row["slowdown"] <= 3 else "NOT met")
                             + ("; ahead of every peer under load: " + ("met" if row["vs_fastest_peer_loaded"] > 1
                                                                         else "NOT met") if peers else ""))
    columns = ["variant", "dtype", "size", "quiet_ms", "loaded_ms", "slowdown", "threads_quiet", "threads_loaded",
               "vs_fastest_peer_loaded", "target", "error"]
    load_avg = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    notes = (f"`{' '.join(['python', 'benchmarks/bench_contention.py', *(argv or sys.argv[1:])])}`: small UNet "
             f"config, batch 1, {args.size}³, {args.threads} threads; loaded = while {args.load} busy Python "
             f"processes run on the same cores; medians of {args.repeats} forwards per timing, {args.passes} "
             f"pass(es) of quiet/loaded pairs, each variant in a fresh process. Load average at the end: {load_avg}.")
    print(save("bench_contention", rows, columns, notes))


if __name__ == "__main__":
    main()
