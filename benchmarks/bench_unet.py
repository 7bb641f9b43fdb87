"""UNet forward: MONAI's DiffusionModelUNet vs pydiffmed's UNet3D (and MONAI + pydiffmed.accelerate()), same
random weights, same input, batch 1.

Configurations (the issue's): "small" channels=(32,64,64), attention_levels=(False,False,True), num_res_blocks=1,
num_head_channels=(0,0,64), norm_num_groups=16; "large" channels=(64,128,256), attention_levels=(False,True,True),
num_res_blocks=2, num_head_channels=64, norm_num_groups=32. Volumes 32³ and 64³; fp32 and bf16 (fp16 too on a GPU).

Each row: median wall time (all variants of a case are timed interleaved, round by round, so machine load hits
them alike), the speed-up over MONAI fp32 eager measured in the same run, the model's FLOPs as
torch.utils.flop_counter counts them on MONAI's forward (the work both models represent; UNet3D executes fewer,
its upsampling convolutions being ~3× cheaper), the achieved GFLOP/s = those FLOPs / time, and that rate as a
fraction of a same-run convolution peak (a 64→64 3×3×3 convolution on a 32³ volume, channels_last, the fastest
path torch offers, in the row's dtype). On a GPU it adds UNet3D replayed from a CUDA graph and
torch.compile(MONAI, mode="max-autotune").

    python benchmarks/bench_unet.py [--quick] [--repeats N] [--threads N]

--quick (the CPU default for CI-sized runs): 32³ for both configurations and 64³ for the small one.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import interleaved_medians, save  # noqa: E402
import pydiffmed  # noqa: E402
from pydiffmed.models import UNet3D  # noqa: E402

CONFIGS = {
    "small": dict(channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1,
                  num_head_channels=(0, 0, 64), norm_num_groups=16),
    "large": dict(channels=(64, 128, 256), attention_levels=(False, True, True), num_res_blocks=2,
                  num_head_channels=64, norm_num_groups=32),
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def randomize_(model, seed=0):
    """Non-zero weights everywhere (MONAI zero-initialises some convolutions)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim >= 2 else 1.0 + 0.1 * noise)
    return model


def conv_peak(dtype, device, repeats=10) -> float:
    """GFLOP/s of a 64→64 3×3×3 convolution on 1×64×32³, channels_last (oneDNN directly on CPU)."""
    from pydiffmed.models.layers import convolution, to_channels_last

    x = to_channels_last(torch.randn(1, 64, 32, 32, 32, device=device).to(dtype))
    w = to_channels_last(torch.randn(64, 64, 3, 3, 3, device=device).to(dtype) / 40)
    b = torch.zeros(64, device=device, dtype=dtype)
    flops = 2 * 64 * 64 * 27 * 32 ** 3
    with torch.no_grad():
        t = interleaved_medians({"conv": lambda: convolution(x, w, b, 1, 1)}, device, repeats)["conv"][0]
    return flops / t / 1e9


def model_flops(model, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops()


def run_case(config_name, size, dtypes, device, repeats, peaks):
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    config = CONFIGS[config_name]
    monai = randomize_(DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, **config)).eval()
    monai = monai.to(device)
    x = torch.randn(1, 1, size, size, size, device=device)
    t = torch.tensor([500], device=device)
    flops = model_flops(monai, x, t)
    variants = {"MONAI fp32": (monai, torch.float32)}
    variants["MONAI+accelerate fp32"] = (pydiffmed.accelerate(copy.deepcopy(monai)), torch.float32)
    for dtype in dtypes:
        name = DTYPE_NAMES[dtype]
        if dtype != torch.float32:
            variants[f"MONAI {name}"] = (copy.deepcopy(monai).to(dtype), dtype)
        variants[f"UNet3D {name}"] = (UNet3D.from_monai(monai).eval().to(dtype), dtype)
    fns = {}
    with torch.no_grad():
        for name, (model, dtype) in variants.items():
            xi = x.to(dtype)
            fns[name] = (lambda m=model, xi=xi: m(xi, t))
        if device == "cuda":
            fns.update(_gpu_variants(monai, x, t))
        medians = interleaved_medians(fns, device, repeats)
    base, base_cpu = medians["MONAI fp32"]
    rows = []
    for name, (seconds, cpu_seconds) in medians.items():
        dtype_name = name.split()[-1]
        rate = flops / seconds / 1e9
        peak = peaks.get(dtype_name)
        rows.append({"config": config_name, "volume": f"{size}³", "variant": name, "ms": seconds * 1e3,
                     "MONAI_fp32_ms": base * 1e3, "speedup": base / seconds, "cpu_ms": cpu_seconds * 1e3,
                     "cpu_speedup": base_cpu / cpu_seconds, "GFLOP": flops / 1e9, "GFLOP/s": rate,
                     "conv_peak_GFLOP/s": peak, "of_peak": rate / peak if peak else None})
        print(f"{config_name} {size}³ {name:40s} {seconds * 1e3:9.1f} ms  ×{base / seconds:5.2f} vs MONAI fp32 "
              f"(CPU time ×{base_cpu / cpu_seconds:5.2f})  {rate:7.1f} GFLOP/s"
              + (f"  {rate / peak:5.1%} of conv peak" if peak else ""), flush=True)
    return rows


def _gpu_variants(monai, x, t):
    """UNet3D fp16 replayed from a CUDA graph, and torch.compile(MONAI fp16, max-autotune)."""
    model = UNet3D.from_monai(monai).eval().half()
    static_x = x.half().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            model(static_x, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(static_x, t)
    compiled = torch.compile(copy.deepcopy(monai).half(), mode="max-autotune")
    with torch.no_grad():
        compiled(static_x, t)  # compile + autotune outside the timed region
    return {"UNet3D+CUDA graph fp16": graph.replay,
            "torch.compile(MONAI) max-autotune fp16": lambda: compiled(static_x, t)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized run: 32³ both configs, 64³ small only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    cases = [("small", 32), ("large", 32), ("small", 64), ("large", 64)]
    if args.quick:
        cases = cases[:3]
    repeats = args.repeats or (5 if device == "cpu" else 20)
    peaks = {DTYPE_NAMES[d]: conv_peak(d, device) for d in dtypes}
    print("same-run conv peak (GFLOP/s):", {k: round(v, 1) for k, v in peaks.items()}, flush=True)
    rows = []
    for config_name, size in cases:
        rows += run_case(config_name, size, dtypes, device, repeats, peaks)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = " ".join(["python benchmarks/bench_unet.py", *sys.argv[1:]])
    notes = (f"`{command}`: repeats={repeats}, batch 1, torch threads {torch.get_num_threads()}, 1-min load "
             f"average at the end {load:.2f}. ms = median wall time, "
             "cpu_ms = median process CPU time (all threads; less disturbed by other processes), speed-ups vs "
             "MONAI fp32 eager timed interleaved in the same run. GFLOP = MONAI's forward as counted by "
             "torch.utils.flop_counter; conv peak = same-run 64→64 3×3×3 conv on 32³, channels_last.")
    columns = ["config", "volume", "variant", "ms", "MONAI_fp32_ms", "speedup", "cpu_ms", "cpu_speedup", "GFLOP",
               "GFLOP/s", "conv_peak_GFLOP/s", "of_peak"]
    print(save("bench_unet", rows, columns, notes))


if __name__ == "__main__":
    main()
