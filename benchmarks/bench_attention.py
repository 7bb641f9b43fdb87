"""Attention over volume tokens: pydiffmed.ops.attention vs torch SDPA backends vs naive (MONAI's einsum math).

GPU: N ∈ {512, 4096, 32768} tokens (8³, 16³, 32³), heads×d ∈ {1×64, 4×64}, fp16 and bf16; rows for the
Triton kernel, SDPA restricted to its flash and memory-efficient backends, and the naive
softmax(q·kᵀ)·v in the input dtype. TFLOP/s = 4·B·N²·heads·d / t; `vs_sdpa_best` = best SDPA time / t;
`of_matmul_peak` = achieved rate / the same run's fp16/bf16 matmul rate; peak memory = the call's extra
allocation over its inputs.

CPU: rows for `ops.attention` (what dispatch picks: pydiffmed's bf16 kernel where `cpu_kernel_declines` says
nothing against it, else torch SDPA), the bf16 kernel called directly (on any CPU with AVX-512 BF16, so that an
AMX machine measures it too), torch SDPA and the naive math, in fp32 and bf16 (peak memory is not measured on CPU).

    python benchmarks/bench_attention.py [--quick]
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import median_time, save  # noqa: E402
from pydiffmed import ops  # noqa: E402

ATTENTION_OPS = importlib.import_module("pydiffmed.ops.attention")  # the module; ops.attention is the function

BATCH = 1
HEAD_DIM = 64


def cpu_kernel(q, k, v):
    out = torch.empty_like(q)
    ATTENTION_OPS.cpu_kernel(q, k, v, out, q.shape[-1] ** -0.5)
    return out


def naive(q, k, v):
    scores = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return scores @ v


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def matmul_rate(dtype, device, size):
    """Same-run matmul rate (FLOP/s) at this dtype: the limit the attention rate is compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * size ** 3 / t


def peak_extra_bytes(fn, q, k, v):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(q, k, v)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(fn, q, k, v, device, repeats):
    try:
        t = median_time(lambda: fn(q, k, v), device, repeats=repeats, warmup=2)
        peak = peak_extra_bytes(fn, q, k, v) if device == "cuda" else None
        return t, peak, ""
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # an SDPA backend refusing a shape, or OOM
        if device == "cuda":
            torch.cuda.empty_cache()
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def run_config(n, heads, dtype, device, candidates, repeats, limit):
    q, k, v = (torch.randn(BATCH, heads, n, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    flops = 4 * BATCH * n * n * heads * HEAD_DIM
    results = {name: measure(fn, q, k, v, device, repeats) for name, fn in candidates.items()}
    sdpa_times = [t for name, (t, _, _) in results.items() if name.startswith("sdpa") and t is not None]
    best_sdpa = min(sdpa_times) if sdpa_times else None
    rows = []
    for name, (t, peak, error) in results.items():
        row = {"N": n, "heads×d": f"{heads}×{HEAD_DIM}", "dtype": str(dtype).replace("torch.", ""),
               "backend": name}
        if t is None:
            row["note"] = error
        else:
            rate = flops / t
            row.update({"ms": t * 1e3, "TFLOP/s": rate / 1e12, "of_matmul_peak": rate / limit})
            if best_sdpa is not None:
                row["sdpa_best_ms"] = best_sdpa * 1e3
                row["vs_sdpa_best"] = best_sdpa / t
            if peak is not None:
                row["peak_MB"] = peak / 2 ** 20
        rows.append(row)
        print(row, flush=True)
    del q, k, v
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes only")
    args = parser.parse_args()
    rows = []
    if torch.cuda.is_available():
        from torch.nn.attention import SDPBackend

        device = "cuda"
        sizes = [512, 4096] if args.quick else [512, 4096, 32768]
        dtypes = [torch.float16, torch.bfloat16]
        candidates = {
            "pydiffmed triton": lambda q, k, v: ops.attention(q, k, v, backend="triton"),
            "sdpa flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
            "sdpa efficient": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
            "naive": naive,
        }
        repeats, matmul_size = 20, 8192
    else:
        device = "cpu"
        sizes = [512] if args.quick else [512, 4096]
        dtypes = [torch.float32, torch.bfloat16]
        candidates = {"ops.attention": lambda q, k, v: ops.attention(q, k, v), "pydiffmed cpu kernel": cpu_kernel,
                      "sdpa": F.scaled_dot_product_attention, "naive": naive}
        repeats, matmul_size = 5, 2048
    for dtype in dtypes:
        kernel_runs = device == "cpu" and dtype == torch.bfloat16 and ATTENTION_OPS.cpu_kernel_supported()
        runnable = {name: fn for name, fn in candidates.items() if name != "pydiffmed cpu kernel" or kernel_runs}
        limit = matmul_rate(dtype, device, matmul_size)
        print(f"{dtype} matmul {matmul_size}²: {limit / 1e12:.3f} TFLOP/s", flush=True)
        for n in sizes:
            for heads in (1, 4):
                for row in run_config(n, heads, dtype, device, runnable, repeats, limit):
                    row["matmul_TFLOP/s"] = limit / 1e12
                    rows.append(row)
    columns = ["N", "heads×d", "dtype", "backend", "ms", "TFLOP/s", "of_matmul_peak", "sdpa_best_ms",
               "vs_sdpa_best", "peak_MB", "matmul_TFLOP/s", "note"]
    notes = (f"B={BATCH}, d={HEAD_DIM}. TFLOP/s = 4·B·N²·heads·d / t. of_matmul_peak: against a {matmul_size}² "
             f"matmul at the same dtype, same run. vs_sdpa_best > 1: faster than the best SDPA backend.")
    if device == "cpu":
        kernel_off = ATTENTION_OPS.cpu_kernel_declines(torch.zeros(1, 1, 1, HEAD_DIM, dtype=torch.bfloat16), 1.0)
        notes += (" CPU: ops.attention in bf16 runs " + ("pydiffmed's kernel" if kernel_off is None else
                  f"torch SDPA ({kernel_off})") + " on this machine, SDPA in fp32.")
    print(save("bench_attention", rows, columns, notes))


if __name__ == "__main__":
    main()
