"""What batch invariance costs (issue 15): volume k of a batch must not depend on its companions.

Two rows per dtype, each against a baseline measured in the same run (timed interleaved, round by round):
* "per-sample small GEMMs": UNet3D's forward as shipped (on the CPU the time-embedding MLP, the time projections
  and the attention projections run one sample per GEMM: models/layers.py, "batch invariance") vs the same
  forward with those ops batched (the pre-invariance code path, restored for the measurement only).
  This is what every CPU user pays.
* "per-sample model calls": a DDIM loop with Sampler(batch_invariant=True) (the model called once per volume,
  the mode that keeps the promise where libraries pick algorithms by batch size: cuDNN/cuBLAS on a GPU) vs the
  batched loop. On the CPU it is not needed (the first row already makes the batch bitwise invariant).

Model: bench_unet's "small" configuration (channels 32, 64, 64; attention at the last level), random weights.

    python benchmarks/bench_determinism.py [--quick] [--size N] [--batch B] [--steps S] [--repeats R]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import interleaved_medians, save  # noqa: E402
from bench_unet import CONFIGS, DTYPE_NAMES, randomize_  # noqa: E402
import pydiffmed  # noqa: E402
from pydiffmed.models import UNet3D, attention_block, layers, transformer, unet  # noqa: E402


def _batched_add_linear_(out_rows, x, weight, batch):
    return out_rows.addmm_(x, weight.t())


def _batched_linear(x, weight, bias=None, owner=None):
    return F.linear(x, weight, bias)


@contextlib.contextmanager
def batched_small_gemms():
    """The per-sample ops of models/layers.py replaced by their batched forms (for the baseline only)."""
    replacements = {(layers, "per_sample"): lambda fn, *tensors: fn(*tensors),
                    (unet, "per_sample"): lambda fn, *tensors: fn(*tensors)}
    for module in (layers, unet, attention_block, transformer):
        replacements[(module, "linear")] = _batched_linear
    for module in (attention_block, transformer):
        replacements[(module, "add_linear_")] = _batched_add_linear_
    saved = {key: getattr(*key) for key in replacements}
    try:
        for (module, name), value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (the CPU default sizes)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    shape = (args.batch, 1, args.size, args.size, args.size)
    torch.manual_seed(0)
    base = randomize_(UNet3D(spatial_dims=3, in_channels=1, out_channels=1, **CONFIGS["small"])).eval()
    rows = []
    for dtype in dtypes:
        model = base.to(device=device, dtype=dtype)
        x = torch.randn(shape, device=device).to(dtype)
        t = torch.linspace(10, 900, args.batch, device=device)

        def forward():
            with torch.no_grad():
                model(x, t)

        def forward_batched():
            with batched_small_gemms():
                forward()

        times = interleaved_medians({"invariant": forward, "batched": forward_batched}, device, args.repeats)
        rows.append({"subject": "per-sample small GEMMs (UNet3D forward)", "shape": "×".join(map(str, shape)),
                     "dtype": DTYPE_NAMES[dtype], "device": device.type, "ms": times["invariant"][0] * 1e3,
                     "baseline": "batched GEMMs", "baseline_ms": times["batched"][0] * 1e3,
                     "cost": times["invariant"][0] / times["batched"][0]})

        samplers = {name: pydiffmed.Sampler(model, "ddim", shape, num_steps=args.steps, dtype=dtype,
                                            batch_invariant=name == "per_sample", check_memory=False)
                    for name in ("batched", "per_sample")}
        times = interleaved_medians({name: (lambda s=s: s(0, progress=False)) for name, s in samplers.items()},
                                    device, max(3, args.repeats // 2), warmup=1)
        rows.append({"subject": f"per-sample model calls (Sampler batch_invariant=True, DDIM {args.steps} steps)",
                     "shape": "×".join(map(str, shape)), "dtype": DTYPE_NAMES[dtype], "device": device.type,
                     "ms": times["per_sample"][0] * 1e3, "baseline": "batched model calls",
                     "baseline_ms": times["batched"][0] * 1e3, "cost": times["per_sample"][0] / times["batched"][0]})
        print(rows[-2], rows[-1], sep="\n", flush=True)
    columns = ["subject", "shape", "dtype", "device", "ms", "baseline", "baseline_ms", "cost"]
    notes = ("cost = time / baseline time in the same run (1.0 = free). Median wall time, interleaved rounds. "
             "On the CPU only the first row is paid (it is how UNet3D runs); the second is the GPU mode.")
    print(save("bench_determinism", rows, columns, notes))


if __name__ == "__main__":
    main()
