"""GroupNorm + SiLU: pydiffmed.ops.group_norm (each fast backend) vs eager F.silu(F.group_norm(x)).

Shapes (1,64,32³), (2,128,32³), (1,32,64³) (G = 32, or 16 for 32 channels), fp32 and bf16, contiguous and
channels_last_3d. For each: median time of every fast backend that runs on this machine (cpu here; triton and
cuda on a GPU) and of eager torch, the speed-up, and the achieved bandwidth for the bytes the kernel must move
(read x twice, write y once) as a fraction of a same-run torch.clone bandwidth on a buffer of x's size.

    python benchmarks/bench_group_norm.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import copy_bandwidth, median_time, save  # noqa: E402
from pydiffmed import backends, ops  # noqa: E402

SHAPES = [((1, 64, 32, 32, 32), 32), ((2, 128, 32, 32, 32), 32), ((1, 32, 64, 64, 64), 16)]
DTYPES = [torch.float32, torch.bfloat16]
FAST_BACKENDS = ("cpu", "triton", "cuda")


def fast_backends_for(x):
    """The fast backends dispatch would accept for x (unforced: no Triton interpreter on CPU)."""
    return [name for name in FAST_BACKENDS if not backends.not_supported_reasons("group_norm", name, [x])]


def run_case(shape, groups, dtype, channels_last, device, repeats):
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    c = shape[1]
    weight = torch.randn(c, device=device)
    bias = torch.randn(c, device=device)
    w_eager, b_eager = weight.to(dtype), bias.to(dtype)

    nbytes = x.numel() * x.element_size()
    moved = 3 * nbytes  # x read twice (statistics, apply), y written once
    copy_bw = copy_bandwidth(nbytes, device)
    eager = median_time(lambda: F.silu(F.group_norm(x, groups, w_eager, b_eager)), device, repeats=repeats)

    rows = []
    base = {"shape": "×".join(map(str, shape)), "G": groups, "dtype": str(dtype).replace("torch.", ""),
            "layout": "channels_last_3d" if channels_last else "contiguous"}
    for name in fast_backends_for(x):
        t = median_time(lambda: ops.group_norm(x, groups, weight, bias, act="silu", backend=name), device,
                        repeats=repeats)
        rate = moved / t
        rows.append({**base, "backend": name, "ms": t * 1e3, "eager_ms": eager * 1e3, "speedup": eager / t,
                     "GB/s": rate / 1e9, "copy_GB/s": copy_bw / 1e9, "of_copy_bw": rate / copy_bw})
        print(rows[-1], flush=True)
    if not rows:
        rows.append({**base, "backend": "(none)", "eager_ms": eager * 1e3, "copy_GB/s": copy_bw / 1e9})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = (5 if args.quick else 20) if device == "cpu" else (10 if args.quick else 50)
    rows = []
    for shape, groups in SHAPES:
        for dtype in DTYPES:
            for channels_last in (False, True):
                rows += run_case(shape, groups, dtype, channels_last, device, repeats)
    columns = ["shape", "G", "dtype", "layout", "backend", "ms", "eager_ms", "speedup", "GB/s", "copy_GB/s",
               "of_copy_bw"]
    notes = ("GN+SiLU with fp32 weight/bias (eager gets them in x's dtype). speedup = eager time / backend time "
             "(eager: F.silu(F.group_norm(x, G, w, b))). GB/s counts 3 × x's bytes (x read twice, y written "
             "once); of_copy_bw divides it by a same-run torch.clone bandwidth on a buffer of x's size. "
             f"Median of {repeats} repeats; times include output allocation and dispatch.")
    if device == "cpu":
        notes += f" CPU: {torch.get_num_threads()} threads; the machine may be shared with other jobs."
    print(save("bench_group_norm", rows, columns, notes))


if __name__ == "__main__":
    main()
