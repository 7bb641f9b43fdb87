"""Many processes (issue 16): data parallel and spatial parallel sampling against one process on the same cores.

Configurations (CPU): 1 process × 1 thread, 1 process × W threads ("single": the same cores in one process) and
W processes × 1 thread (W = --world-size, default 2), each in fresh processes running this script as a worker: one
process started directly, W processes by torchrun (`python -m torch.distributed.run --standalone --nproc-per-node
W`, gloo over loopback), with OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads set to the threads of
the configuration. The configurations of a mode start together, then run in turn, never together: the launcher
signals one configuration at a time (files in a temporary directory) to run its warm-up, then round by round one
timed round each (so every configuration meets the load of the same minutes: other jobs on the machine hit them
alike), then its memory measurement; bounded in time (--timeout per mode: the processes are stopped, the rows
say why). Rank 0 gathers every rank's numbers and writes one JSON file per configuration. Each mode runs in
processes of its own (--one-launch, the --smoke default: both modes in the same processes).
--device cuda (the default where torch sees a GPU; the GPU suite's form): 1 process on 1 GPU ("single") against W
processes on W GPUs (W = the visible GPUs, NCCL; data parallel with CUDA graphs, spatial parallel and its
single-process Sampler eagerly; defaults: 16 volumes × 10 steps with --quick, else 32 × 20; spatial 64³ with
--quick, else 128³); with fewer than 2 GPUs it prints why and exits 0 without a result file.

Model: the bundled demo model (`pydiffmed.load_model("demo")`, or --model): UNet3D (channels 32, 64, 64, attention
at the lowest level: bench_unet's "small" configuration), v-prediction, cosine schedule, fp32 (--dtype bf16: the
network in bf16, the state fp32). DDIM with the model's clipping as `pydiffmed sample` runs it (clip_sample,
use_clipped_model_output), check_memory=False (no estimate in the timed runs).

  * data parallel: `pydiffmed.sample(..., distributed=True)` of --batch volumes (default 8; --quick 4) at 32³, DDIM
    --steps (default 10; --quick 5): rank r samples volumes r, r + W, ... and every rank gets the whole batch
    (all-gather). One process: `pydiffmed.sample` of the batch. ms: median wall time of a whole run (the slowest
    rank's), after a 1-step warm-up run (CUDA: and a whole one); throughput = batch / that time.
  * spatial parallel: one 64³ volume cut by depth across the ranks: `SpatialParallelUNet` (halo exchange,
    GroupNorm statistics and attention keys/values all-gathered) and `SpatialSampler`; one process: the UNet3D and
    a `pydiffmed.Sampler`. Two measurements, timed in turn in every round after one warm-up each: "forward" (one
    model evaluation at t = 500 of this rank's slab, no gathering) and "DDIM step" (a 1-step DDIM run: noise,
    one model evaluation, the update; each rank keeps its slab, gather=False).

Per run or call, on every rank: wall time (each call starts after a barrier; the row shows the slowest rank's),
process CPU time (cpu_s: summed over ranks, all threads), and time inside torch.distributed calls (comm_share =
that time / the call's wall time, mean over ranks): this script wraps torch.distributed.all_gather,
all_gather_object, broadcast_object_list, all_reduce and batch_isend_irecv (and the wait() of the requests the
latter returns: the halo exchange) with timers, in the worker only. A collective's time includes waiting for the
slower rank to arrive. On CUDA the timers synchronise the device around each call and are read in separate rounds
(the timed rounds run without them).

Peak memory per rank, after the timing (as bench_scaling.py): CPU: glibc malloc serves blocks >= 64 KiB by mmap and
its heap is trimmed, the kernel's peak-RSS mark is reset (clear_refs), then peak_MB = VmHWM after one more call -
VmRSS before it (the call's increment: one forward, one DDIM step, or a data-parallel run of min(2, steps) steps
of the same batch: every step has the same peak), rss_peak_MB = that VmHWM (the whole process: torch, the model,
gloo). GPU: max_memory_allocated - memory_allocated before (a data-parallel run of all its steps). Rows show the
largest rank's.

Ratios: time_vs_1x1 / time_vs_single = ms / ms of 1 process × 1 thread / of single; efficiency = throughput /
(cores × throughput of 1 × 1) for the data-parallel run (ms of 1 × 1 / (cores × ms) for the spatial calls), cores
= processes × threads (CPU) or GPUs; memory_vs_single / memory_vs_1x1 = peak_MB / single's / 1 × 1's; cpu_vs_1x1 =
cpu_s / 1 × 1's (the CPU work of the configuration: 1 = none added; less sensitive to other jobs than wall time).
max_abs_diff_vs_1x1: the sampled volumes (data parallel), the forward and the step's volume (spatial) against
1 process × 1 thread's. Targets of issue 16: data-parallel efficiency >= 0.9 (CPU); spatial per-rank peak memory
<= 0.6 × single and step time <= 0.7 × single at 2 ranks and 64³ (the target column judges both against single and
against 1 × 1 thread). --smoke: tiny sizes for the tests.

    python benchmarks/bench_distributed.py [--quick] [--modes data,spatial] [--world-size W] [--repeats N]
                                           [--batch N] [--steps S] [--size S] [--spatial-size S] [--dtype fp32]
                                           [--device cpu|cuda] [--timeout S] [--model demo] [--one-launch]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scaling import _malloc_returns_memory, _reset_peak_rss, _status_kib  # noqa: E402
from common import ROOT, command_line, save, stop_process_group  # noqa: E402

MIB = 2.0 ** 20
MODES = ("data", "spatial")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EFFICIENCY_TARGET, MEMORY_TARGET, STEP_TARGET = 0.9, 0.6, 0.7
WRAPPED = ("all_gather", "all_gather_object", "broadcast_object_list", "all_reduce", "batch_isend_irecv")


# --- the worker: one configuration, every rank ---------------------------------------------------------------

class CommTimer:
    """Seconds spent inside torch.distributed calls (the functions in WRAPPED, and wait() on the requests that
    batch_isend_irecv returns), installed by patching the torch.distributed module in this process."""

    def __init__(self, device):
        self.seconds, self.calls, self.enabled, self._depth = 0.0, 0, True, 0
        self.sync = torch.device(device).type == "cuda"  # asynchronous on CUDA: time it synchronised
        self.original = {}

    def reset(self):
        self.seconds, self.calls = 0.0, 0

    def _timed(self, fn, *args, **kwargs):
        if not self.enabled or self._depth:
            return fn(*args, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        self._depth += 1
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize()
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self._depth -= 1
        return out

    def install(self):
        import torch.distributed as dist

        timer = self

        class TimedWork:  # a request whose wait() is timed
            def __init__(self, work):
                self._work = work

            def wait(self, *args, **kwargs):
                return timer._timed(self._work.wait, *args, **kwargs)

            def __getattr__(self, name):
                return getattr(self._work, name)

        def wrap(name, fn):
            def wrapper(*args, **kwargs):
                out = self._timed(fn, *args, **kwargs)
                if name == "batch_isend_irecv" and out is not None:
                    out = [TimedWork(work) for work in out]
                return out

            wrapper.__wrapped__ = fn
            return wrapper

        for name in WRAPPED:
            fn = getattr(dist, name, None)
            if fn is not None:
                self.original[name] = fn
                setattr(dist, name, wrap(name, fn))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(world, device):
    """All ranks together (not timed: torch.distributed.barrier is not among the wrapped functions)."""
    if world.distributed:
        import torch.distributed as dist

        _sync(device)
        dist.barrier()


def _timed_call(fn, world, device, timer):
    """(result, wall s, process CPU s, s inside torch.distributed) of one fn() started with every rank."""
    _barrier(world, device)
    timer.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0, timer.seconds


def _peak(fn, world, device):
    """(bytes one more fn() adds above the memory in use before it, the process's peak bytes during it, method),
    as bench_scaling.forward_peak_bytes measures it."""
    import gc

    _barrier(world, device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _barrier(world, device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak - base, peak, "torch.cuda.max_memory_allocated"
    exact = _malloc_returns_memory()
    gc.collect()
    _barrier(world, device)
    base = _status_kib("VmRSS") * 1024
    if _reset_peak_rss():
        fn()
        peak, method = _status_kib("VmHWM") * 1024, "VmHWM after clear_refs"
    else:
        import resource

        fn()
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (lower bound)"
    return peak - base, peak, method + (", malloc mmap threshold 64 KiB" if exact else "")


class Phases:
    """The launcher's go-signals. Phase P of this configuration begins when the file <control>.P.go exists (every
    rank polls for it) and ends with every rank at a barrier and rank 0 writing <control>.P.done; the launcher
    starts one configuration's phase at a time, so the configurations run in turn, never together. Without a
    control path (a worker started by hand) every phase begins at once."""

    def __init__(self, control, world, device, deadline):
        self.control, self.world, self.device, self.deadline = control, world, device, deadline

    def begin(self, phase):
        if not self.control:
            return
        path = f"{self.control}.{phase}.go"
        while not os.path.exists(path):
            if time.time() > self.deadline:
                raise TimeoutError(f"no go-signal for phase {phase} before the deadline")
            time.sleep(0.02)

    def end(self, phase):
        _barrier(self.world, self.device)
        if self.control and self.world.rank == 0:
            open(f"{self.control}.{phase}.done", "w").close()


def _load(args, device):
    import pydiffmed
    from pydiffmed.solvers import SOLVERS

    unet, schedule, info = pydiffmed.load_model(args.model)
    dtype = DTYPES[args.dtype]
    unet = unet.eval().to(device=device, dtype=dtype)
    options = dict(schedule=schedule, prediction_type=info.prediction_type, check_memory=False)
    if info.clip_sample is not None:  # as `pydiffmed sample` runs it: the model's clipping, in the plan's form
        options["clip"] = info.clip_sample
        options.update(SOLVERS["ddim"].plan_clip_options)
    return unet, options, dtype


def memory_steps(args):
    """Steps of the data-parallel run whose memory is measured: the peak of a run is that of one step (the same
    model batch and solver state every step), so 2 on the CPU; on CUDA the timed run's (its captured graph)."""
    return args.steps if args.device == "cuda" else min(2, args.steps)


def setup_data_parallel(args, world, device):
    """(warm-up, timed calls, memory calls, outputs of the last results, extra info) of the data-parallel mode."""
    import pydiffmed

    unet, options, _ = _load(args, device)
    shape = (args.batch, unet.conv_in.conv.in_channels, *[args.size] * 3)
    options.update(progress=False, distributed=world.distributed)

    def run(steps):
        return pydiffmed.sample(unet, shape, "ddim", num_steps=steps, seed=0, **options)

    def warmup():  # every kernel and primitive of this batch, once (CUDA: also a whole run, its graphs captured)
        run(1)
        if device.type == "cuda":
            run(args.steps)

    return (warmup, {"run": lambda: run(args.steps)}, {"run": lambda: run(memory_steps(args))}, lambda r: r,
            {"shape": list(shape)})


def setup_spatial(args, world, device):
    """(warm-up, timed calls, memory calls, outputs of the last results, extra info) of the spatial mode."""
    import pydiffmed
    from pydiffmed.spatial_parallel import SpatialParallelUNet, SpatialSampler

    unet, options, dtype = _load(args, device)
    shape = (1, unet.conv_in.conv.in_channels, *[args.spatial_size] * 3)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    t = torch.full((1,), 500.0, device=device)
    extra = {"shape": list(shape)}
    if world.distributed:
        model = SpatialParallelUNet(unet, shape[2])
        slab = model.slab(x).contiguous()
        sampler = SpatialSampler(model, "ddim", shape, num_steps=1, **options)
        calls = {"forward": lambda: model(slab, t), "step": lambda: sampler(seed=0, gather=False)}

        def outputs(results):  # the whole volumes, for the comparison with one process (not timed)
            return {"forward": model.gather(results["forward"]), "step": sampler(seed=0, gather=True)}
        extra["bounds"] = model.bounds
    else:
        def forward():
            with torch.no_grad():
                return unet(x, t)

        sampler = pydiffmed.Sampler(unet, "ddim", shape, num_steps=1, cuda_graph=False, **options)
        calls = {"forward": forward, "step": lambda: sampler(seed=0)}

        def outputs(results):
            return results

    def warmup():
        for fn in calls.values():
            fn()

    return warmup, calls, calls, outputs, extra


def measure(mode, args, world, device, timer, phases):
    """One mode on this rank, phase by phase: warm-up, `repeats` rounds (every call of the mode timed once, in
    turn), then the outputs and the memory of one more call each. Returns (this rank's numbers, outputs)."""
    setup = setup_data_parallel if mode == "data" else setup_spatial
    warmup, calls, memory_calls, outputs_of, extra = setup(args, world, device)
    phases.begin(f"{mode}.warmup")
    warmup()
    _sync(device)
    phases.end(f"{mode}.warmup")
    times = {name: {"wall": [], "cpu": [], "comm": []} for name in calls}
    instrumented = timer.sync and world.distributed  # CUDA: comm time in calls of their own, synchronised
    results = {}
    for i in range(args.repeats):
        phases.begin(f"{mode}.round{i}")
        for name, fn in calls.items():
            timer.enabled = not timer.sync
            results[name], wall, cpu, comm = _timed_call(fn, world, device, timer)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
            if instrumented:
                timer.enabled = True
                _, wall, _, comm = _timed_call(fn, world, device, timer)
                times[name].setdefault("comm_wall", []).append(wall)
            times[name]["comm"].append(comm)
        timer.enabled = True
        phases.end(f"{mode}.round{i}")
    phases.begin(f"{mode}.memory")
    outputs = outputs_of(results)
    peaks, hwms, method = {}, {}, None
    for name, fn in memory_calls.items():
        peaks[name], hwms[name], method = _peak(fn, world, device)
    phases.end(f"{mode}.memory")
    return {"times": times, "peak": peaks, "hwm": hwms, "memory_method": method, **extra}, outputs


def phase_names(mode, repeats):
    return [f"{mode}.{p}" for p in ("warmup", *(f"round{i}" for i in range(repeats)), "memory")]


def worker(args):
    """Every mode of args.worker ("data", "spatial" or both, comma-separated) on this rank; rank 0 writes the JSON
    {mode: {"world_size", "ranks": [every rank's numbers]}} to args.out and the sampled tensors beside it."""
    import torch.distributed as dist

    from pydiffmed import distributed

    torch.set_num_threads(args.threads)
    world = distributed.world_from_env()
    device = distributed.device_for(world, torch.device(args.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deadline = args.deadline or time.time() + args.timeout
    distributed.init_process_group(world, device, timeout_s=max(60.0, deadline - time.time()))
    timer = CommTimer(device)
    timer.install()
    phases = Phases(args.control, world, device, deadline)
    report = {}
    for mode in args.worker.split(","):
        mine, outputs = measure(mode, args, world, device, timer, phases)
        mine.update(rank=world.rank, threads=torch.get_num_threads(), device=str(device))
        gathered = [mine]
        if world.distributed:
            gathered = [None] * world.world_size
            timer.original["all_gather_object"](gathered, mine)
        if world.rank == 0:
            torch.save({k: v.detach().float().cpu() for k, v in outputs.items()}, f"{args.out}.{mode}.pt")
        report[mode] = {"world_size": world.world_size, "ranks": gathered, "outputs": f"{args.out}.{mode}.pt"}
        del outputs
    if world.rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(args.out + ".tmp", args.out)
    if world.distributed:
        dist.destroy_process_group()


# --- the launcher --------------------------------------------------------------------------------------------

def _failure(rc, log_path):
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if "Error" in line and "ChildFailedError" not in line]
    tail = errors[-1] if errors else lines[-1] if lines else "no output"
    return f"exit {rc}: {tail[:300]}"


def launch(modes, args, workdir) -> dict:
    """Every configuration of `modes`, started together in fresh processes (each in a session of its own, stopped
    whole on a failure or the time limit), then driven phase by phase: warm-up, the timed rounds and the memory
    phase, one configuration at a time, so that every round of every configuration meets the machine's load of
    the same minutes. Returns {config label: {mode: rank 0's numbers, with "outputs" (the path of its tensors),
    or {"error": why}}}."""
    start = time.time()
    deadline = start + args.timeout * len(modes)
    running = {}
    for label, processes, threads in configurations(args):
        name = f"{'+'.join(modes)}_{processes}x{threads}"
        control = os.path.join(workdir, name)
        script = [os.path.abspath(__file__), "--worker", ",".join(modes), "--out", control + ".json",
                  "--control", control, "--deadline", str(deadline), "--threads", str(threads),
                  "--device", args.device, "--model", args.model, "--dtype", args.dtype, "--repeats",
                  str(args.repeats), "--batch", str(args.batch), "--steps", str(args.steps), "--size",
                  str(args.size), "--spatial-size", str(args.spatial_size), "--timeout", str(args.timeout)]
        if processes > 1:
            script = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *script]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        with open(control + ".log", "w") as log:
            proc = subprocess.Popen([sys.executable, *script], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        running[label] = (proc, control)
    errors = {}
    try:
        for phase in (p for mode in modes for p in phase_names(mode, args.repeats)):
            phase_start = time.time()
            for label, (proc, control) in running.items():
                if label in errors:
                    continue
                open(f"{control}.{phase}.go", "w").close()
                while not os.path.exists(f"{control}.{phase}.done"):
                    if proc.poll() is not None:
                        errors[label] = _failure(proc.returncode, control + ".log")
                        break
                    if time.time() > deadline:
                        errors[label] = f"timed out after {time.time() - start:.0f} s (in phase {phase})"
                        stop_process_group(proc)
                        break
                    time.sleep(0.02)
            if hasattr(os, "getloadavg"):
                LOADS.append(os.getloadavg()[0])
            print(f"  {phase:16s} {time.time() - phase_start:7.1f} s (every configuration), 1-min load average "
                  f"{LOADS[-1] if LOADS else float('nan'):.2f}", flush=True)
        for label, (proc, control) in running.items():
            try:
                rc = proc.wait(timeout=max(60.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                errors.setdefault(label, f"timed out after {time.time() - start:.0f} s (at the end)")
                continue
            if label not in errors and (rc != 0 or not os.path.exists(control + ".json")):
                errors[label] = _failure(rc, control + ".log")
    finally:
        for proc, _ in running.values():
            if proc.poll() is None:
                stop_process_group(proc)
    results = {}
    for label, (_, control) in running.items():
        if label in errors:
            results[label] = {mode: {"error": errors[label]} for mode in modes}
        else:
            with open(control + ".json") as f:
                results[label] = json.load(f)
    return results


def summarize(result, what):
    """The numbers of one measurement ("run", "forward" or "step") over the ranks of one configuration."""
    ranks = result["ranks"]
    rounds = len(ranks[0]["times"][what]["wall"])
    wall = [max(r["times"][what]["wall"][i] for r in ranks) for i in range(rounds)]  # the slowest rank's
    cpu = [sum(r["times"][what]["cpu"][i] for r in ranks) for i in range(rounds)]
    shares = []
    for r in ranks:
        t = r["times"][what]
        walls = t.get("comm_wall", t["wall"])
        shares.append(statistics.median(c / w for c, w in zip(t["comm"], walls)))
    distributed = result["world_size"] > 1
    return {"ms": statistics.median(wall) * 1e3, "runs": rounds, "cpu_s": statistics.median(cpu),
            "comm_share": statistics.mean(shares) if distributed else None,
            "comm_share_per_rank": shares if distributed else None,
            "peak_MB": max(r["peak"][what] for r in ranks) / MIB,
            "peak_MB_per_rank": [r["peak"][what] / MIB for r in ranks],
            "rss_peak_MB": max(r["hwm"][what] for r in ranks) / MIB,
            "memory_method": ranks[0]["memory_method"]}


MEASURES = {"data": [("run", "sampling run")], "spatial": [("forward", "forward"), ("step", "DDIM step")]}


def configurations(args):
    """[(label, processes, threads)]: 1 × 1, single (1 × W; 1 GPU on CUDA), W × 1."""
    w = args.world_size
    if args.device == "cuda":
        return [("1 GPU", 1, 1), (f"{w} GPUs ({w} processes)", w, 1)]
    return [("1 process × 1 thread", 1, 1), (f"1 process × {w} threads", 1, w), (f"{w} processes × 1 thread", w, 1)]


def rows_of(mode, results, args):
    """The rows of one mode, from {label: launch result} (in configurations() order)."""
    configs = configurations(args)
    base_label, single_label = configs[0][0], configs[-2][0]
    outputs = {label: torch.load(r["outputs"]) for label, r in results.items() if "error" not in r}
    rows = []
    for what, measure in MEASURES[mode]:
        summaries = {label: summarize(r, what) for label, r in results.items() if "error" not in r}
        base, single = summaries.get(base_label), summaries.get(single_label)
        for label, processes, threads in configs:
            if label not in results:
                continue
            volume = f"{args.size}³" if mode == "data" else f"{args.spatial_size}³"
            row = {"mode": f"{mode} parallel", "measure": measure,
                   "config": label, "processes": processes, "threads": threads, "volume": volume,
                   "batch": args.batch if mode == "data" else 1}
            if "error" in results[label]:
                row["note"] = results[label]["error"]
                rows.append(row)
                continue
            row.update(summaries[label])
            cores = processes * threads if args.device == "cpu" else processes
            if mode == "data":
                row["steps"] = args.steps
                row["throughput_vol_s"] = args.batch / (row["ms"] / 1e3)
            if base:
                row["time_vs_1x1"] = row["ms"] / base["ms"]
                row["cpu_vs_1x1"] = row["cpu_s"] / base["cpu_s"] if base["cpu_s"] > 0 else None
                row["memory_vs_1x1"] = row["peak_MB"] / base["peak_MB"] if base["peak_MB"] > 0 else None
                if cores > 1:
                    row["efficiency"] = base["ms"] / (cores * row["ms"])
            if single:
                row["time_vs_single"] = row["ms"] / single["ms"]
                row["memory_vs_single"] = row["peak_MB"] / single["peak_MB"] if single["peak_MB"] > 0 else None
            if base_label in outputs:
                key = what if what in outputs[label] else "run"
                row["max_abs_diff_vs_1x1"] = float((outputs[label][key] - outputs[base_label][key]).abs().max())
            if processes > 1:
                row["target"] = target_text(mode, what, row, args)
            rows.append(row)
    return rows


def target_text(mode, what, row, args):
    def verdict(ok):
        return "met" if ok else "NOT met"

    cpu = args.device == "cpu"
    if mode == "data":
        if row.get("efficiency") is None:
            return None
        return f"efficiency {row['efficiency']:.2f} (target >= {EFFICIENCY_TARGET}): " \
               f"{verdict(row['efficiency'] >= EFFICIENCY_TARGET)}" + ("" if cpu else " (the target is for CPU)")
    single = "1 × W threads" if cpu else "1 GPU"
    single = single.replace("W", str(args.world_size))
    parts = []
    scale = "" if args.world_size == 2 and args.spatial_size == 64 else \
        f" (the targets are for 2 ranks at 64³, this is {args.world_size} at {args.spatial_size}³)"
    if what == "forward" and row.get("memory_vs_single") is not None:
        parts.append(f"peak memory {row['memory_vs_single']:.2f}× {single} (target <= {MEMORY_TARGET}): "
                     f"{verdict(row['memory_vs_single'] <= MEMORY_TARGET)}")
        if cpu and row.get("memory_vs_1x1") is not None:
            parts.append(f"{row['memory_vs_1x1']:.2f}× 1 × 1 thread: {verdict(row['memory_vs_1x1'] <= MEMORY_TARGET)}")
    if what == "step" and row.get("time_vs_single") is not None:
        parts.append(f"step time {row['time_vs_single']:.2f}× {single} (target <= {STEP_TARGET}): "
                     f"{verdict(row['time_vs_single'] <= STEP_TARGET)}")
        if cpu and row.get("time_vs_1x1") is not None:
            parts.append(f"{row['time_vs_1x1']:.2f}× 1 × 1 thread: {verdict(row['time_vs_1x1'] <= STEP_TARGET)}")
    return "; ".join(parts) + scale if parts else None


COLUMNS = ["mode", "measure", "config", "volume", "batch", "ms", "runs", "throughput_vol_s", "cpu_s", "cpu_vs_1x1",
           "comm_share", "peak_MB", "rss_peak_MB", "time_vs_1x1", "time_vs_single", "efficiency", "memory_vs_single",
           "memory_vs_1x1", "max_abs_diff_vs_1x1", "target", "note"]


LOADS = []  # the 1-min load average after every phase of the run (launch)


def _load_range():
    return f"{min(LOADS):.2f} to {max(LOADS):.2f}" if LOADS else "not recorded"


def write(rows, args, load_start, partial=""):
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    method = next((r["memory_method"] for r in rows if "memory_method" in r), "none")
    single = f"1 process × {args.world_size} threads" if args.device == "cpu" else "1 GPU"
    backend = "gloo" if args.device == "cpu" else "NCCL"
    notes = (f"{partial}`{command_line()}`: model {args.model} ({args.dtype}), DDIM, check_memory=False; data "
             f"parallel: pydiffmed.sample(distributed=True) of {args.batch} volumes at {args.size}³, {args.steps} "
             f"steps (ms: one whole run, the slowest rank's; throughput = volumes/s); spatial parallel: one "
             f"{args.spatial_size}³ volume, SpatialParallelUNet forward at t = 500 and a 1-step SpatialSampler run "
             f"(gather=False) vs the UNet3D and pydiffmed.Sampler in one process. Median of {args.repeats} rounds "
             f"after a warm-up, every configuration in fresh processes (torchrun, {backend}, for several), the "
             f"configurations of a mode started together and run in turn, round by round, each call started after a "
             f"barrier. single = {single}; efficiency = "
             f"throughput / (cores × throughput of 1 × 1). comm_share = time inside torch.distributed calls "
             f"(all_gather, all_gather_object, batch_isend_irecv and its waits, ...) / wall time, mean over ranks; "
             f"cpu_s = process CPU time summed over ranks, cpu_vs_1x1 = cpu_s / 1 × 1's (the CPU work, less sensitive "
             f"than wall time to other jobs on the cores). peak_MB = the largest rank's memory increment of one more "
             f"call (data parallel: a run of {memory_steps(args)} steps of the same batch), measured by {method}; "
             f"rss_peak_MB = that rank's whole resident peak. 1-min load average at the start "
             f"{load_start[0]:.2f}, after each phase {_load_range()}, at the end {load[0]:.2f} (5-min {load[1]:.2f}, "
             f"{os.cpu_count()} CPUs): other jobs "
             f"on the machine share the cores.")
    return save("bench_distributed", rows, COLUMNS, notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer volumes, steps and rounds (spatial still 64³)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests): 2 volumes of 16³, one step, 16³")
    parser.add_argument("--modes", default="data,spatial", help="comma-separated: data, spatial")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"),
                        help="cpu (threads and processes on this CPU) or cuda (1 GPU against every visible GPU); "
                             "default cuda where torch sees a GPU, as the other benchmarks")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes of the parallel runs (CPU: default 2, also the threads of 'single'; CUDA: "
                             "default every visible GPU)")
    parser.add_argument("--batch", type=int, default=None, help="data parallel: volumes per run (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="data parallel: DDIM steps (default 10)")
    parser.add_argument("--size", type=int, default=None, help="data parallel: volume side (default 32)")
    parser.add_argument("--spatial-size", type=int, default=None, help="spatial parallel: volume side (default 64)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per configuration")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the network's dtype")
    parser.add_argument("--model", default="demo", help="pydiffmed model name or path (default: demo)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds for one mode, all its configurations (default 1800; --quick 900)")
    parser.add_argument("--one-launch", action="store_true",
                        help="run both modes in the same processes per configuration (faster; --smoke's default)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "data", "spatial" or "data,spatial"
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--control", default=None, help=argparse.SUPPRESS)  # the launcher's go-signal files
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() to give up
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if not cuda and not args.worker:  # the CPU form touches no GPU (and its results file is *_cpu.json)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if cuda:
        args.batch = args.batch or (2 if args.smoke else 16 if args.quick else 32)
        args.steps = args.steps or (1 if args.smoke else 10 if args.quick else 20)
        args.spatial_size = args.spatial_size or (16 if args.smoke else 64 if args.quick else 128)
    args.batch = args.batch or (2 if args.smoke else 4 if args.quick else 8)
    args.steps = args.steps or (1 if args.smoke else 5 if args.quick else 10)
    args.size = args.size or (16 if args.smoke else 32)
    args.spatial_size = args.spatial_size or (16 if args.smoke else 64)
    args.repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 3)
    args.timeout = args.timeout or (300.0 if args.smoke else 900.0 if args.quick else 1800.0)
    args.one_launch = args.one_launch or args.smoke
    for name in ("batch", "steps", "size", "spatial_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    if args.worker:
        if any(m not in MODES for m in args.worker.split(",")):
            parser.error(f"--worker: choose from {', '.join(MODES)}")
        worker(args)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    if cuda:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        args.world_size = args.world_size or gpus
        if gpus < 2 or args.world_size < 2 or args.world_size > gpus:
            print(f"bench_distributed: skipped: {gpus} CUDA device(s) visible, world size {args.world_size}; the "
                  f"N-GPU form needs at least 2 GPUs, one per process (no result file written)")
            return 0
    args.world_size = args.world_size or 2
    if args.world_size < 2:
        parser.error("--world-size must be >= 2")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"bench_distributed: {args.device}, world size {args.world_size}, 1-min load average {load_start[0]:.2f} "
          f"({os.cpu_count()} CPUs), started {datetime.datetime.now():%H:%M:%S}", flush=True)

    # the configurations of a mode run in turn, round by round; each mode in processes of its own (--one-launch:
    # both modes in the same processes)
    groups = [tuple(modes)] if args.one_launch else [(mode,) for mode in modes]
    rows, results = [], {mode: {} for mode in modes}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as workdir:
        for k, group in enumerate(groups):
            start = time.perf_counter()
            print(f"{'+'.join(group)}: {', '.join(label for label, _, _ in configurations(args))}, started together, "
                  "run in turn", flush=True)
            for label, by_mode in launch(group, args, workdir).items():
                for mode in group:
                    results[mode][label] = by_mode[mode]
            print(f"{'+'.join(group)}: done in {time.perf_counter() - start:.0f} s", flush=True)
            rows = [row for m in modes if results[m] for row in rows_of(m, results[m], args)]
            for row in rows:
                if row["mode"].split()[0] in group:
                    print(f"    {row['measure']:13s} {row['config']:26s} " + (
                          row["note"] if "note" in row else
                          f"{row['ms']:10.1f} ms, peak {row['peak_MB']:8.1f} MiB/rank"
                          + (f", comm {row['comm_share']:.1%}" if row.get("comm_share") is not None else "")),
                          flush=True)
            if k + 1 < len(groups):
                write(rows, args, load_start, partial=f"PARTIAL: {k + 1} of {len(groups)} modes done. ")
    print(write(rows, args, load_start))
    for row in rows:
        if row.get("target"):
            print(f"target, {row['mode']} {row['measure']}: {row['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
