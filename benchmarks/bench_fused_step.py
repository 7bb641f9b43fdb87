"""Solver update: pydiffmed.ops.fused_step (each backend) vs the same update written as eager torch, the way
diffusers writes it (DDIMScheduler.step with torch.randn noise; DPMSolverMultistepScheduler's second-order
DPM-Solver++ update), both ending with the cast of the new state to the model dtype (the next model input).

Steps: "ddim_eta1" (x0 estimate, direction, fresh noise) and "dpmpp_2m" (x0 estimate, second-order update from
the previous x0, the new x0 kept as history). Shapes (2, 4, 48³) (issue 19's), (1, 4, 64³) and (2, 1, 128³);
fp32 state, fp16 model output. For each: median time of every backend that runs on this machine (cpu and the
torch fallback here; triton and cuda on a GPU) and of the eager version, the speed-up, and the achieved
bandwidth for the bytes the fused kernel must move as a fraction of a same-run copy bandwidth (the faster of
torch.clone and copy_ into a preallocated buffer, moving that many bytes).

    python benchmarks/bench_fused_step.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import copy_bandwidth, save, sync  # noqa: E402
from pydiffmed import backends, ops  # noqa: E402

SHAPES = [(2, 4, 48, 48, 48), (1, 4, 64, 64, 64), (2, 1, 128, 128, 128)]
BACKENDS = ("cpu", "triton", "cuda", "torch")

# One mid-sampling step of a scaled-linear (SD-style) schedule: alpha-bar at the current and previous steps.
ALPHA_T, ALPHA_PREV, ALPHA_PREV2 = 0.30, 0.45, 0.60


def available_backends(x):
    """The backends dispatch would accept for x (unforced: no Triton interpreter on CPU)."""
    return [name for name in BACKENDS if not backends.not_supported_reasons("fused_step", name, [x], x=x)]


def ddim_case(shape, device):
    """DDIM, eta = 1, epsilon prediction: eager as in DDIMScheduler.step, and the fused coefficient row."""
    a_t, a_p = ALPHA_T, ALPHA_PREV
    b_t = 1 - a_t
    std = math.sqrt((1 - a_p) / b_t * (1 - a_t / a_p))
    direction = math.sqrt(1 - a_p - std ** 2)
    x = torch.randn(shape, device=device)
    m = torch.randn(shape, device=device).half()

    def eager():
        pred_original_sample = (x - b_t ** 0.5 * m) / a_t ** 0.5
        pred_epsilon = m
        pred_sample_direction = direction * pred_epsilon
        prev_sample = a_p ** 0.5 * pred_original_sample + pred_sample_direction
        variance_noise = torch.randn(m.shape, device=device, dtype=m.dtype)
        prev_sample = prev_sample + std * variance_noise
        return prev_sample.to(torch.float16)

    p_x, p_m = 1 / math.sqrt(a_t), -math.sqrt(b_t / a_t)
    row = ops.step_coefs(p_x=p_x, p_m=p_m, a=-direction * p_x / p_m, b=math.sqrt(a_p) + direction / p_m, s=std)
    row = row.to(device)
    out = torch.empty_like(x)
    model_input = torch.empty_like(m)
    seeds = torch.arange(shape[0], device=device)

    def fused(backend):
        return lambda: ops.fused_step(x, m, row, seeds=seeds, noise_step=3, out=out, model_input=model_input,
                                      backend=backend)

    def check(backend):  # with the eager update's own noise, the fused result equals it
        z = torch.randn(shape, device=device).half()
        mf = m.float()  # (eager's fp16 products round: compare with the fp32 math)
        want = a_p ** 0.5 * ((x - b_t ** 0.5 * mf) / a_t ** 0.5) + direction * mf + std * z.float()
        got = ops.fused_step(x, m, row, noise=z, backend=backend)
        return (got - want).abs().max().item()

    moved = x.numel() * (4 + 2 + 4 + 2)  # read x, m; write x', model input (noise made in the kernel)
    return eager, fused, check, moved


def dpmpp_2m_case(shape, device):
    """DPM-Solver++(2M), epsilon prediction: eager as in DPMSolverMultistepScheduler (convert_model_output,
    multistep_dpm_solver_second_order_update, midpoint), and the fused row (the previous x0 is history h1)."""
    alpha = [math.sqrt(a) for a in (ALPHA_PREV2, ALPHA_T, ALPHA_PREV)]     # s1, s0 (current), t (next)
    sigma = [math.sqrt(1 - a * a) for a in alpha]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    alpha_s0, sigma_s0, alpha_t, sigma_t = alpha[1], sigma[1], alpha[2], sigma[2]
    h, h_0 = lam[2] - lam[1], lam[1] - lam[0]
    r0 = h_0 / h
    x = torch.randn(shape, device=device)
    m = torch.randn(shape, device=device).half()
    prev_x0 = torch.randn(shape, device=device)
    phi = alpha_t * (math.exp(-h) - 1.0)

    def eager():
        x0 = (x - sigma_s0 * m) / alpha_s0
        m0, m1 = x0, prev_x0
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        x_t = (sigma_t / sigma_s0) * x - phi * d0 - 0.5 * phi * d1
        return x_t.to(torch.float16), x0

    row = ops.step_coefs(p_x=1 / alpha_s0, p_m=-sigma_s0 / alpha_s0, a=sigma_t / sigma_s0,
                         b=-phi - 0.5 * phi / r0, c=(0.5 * phi / r0,)).to(device)
    out = torch.empty_like(x)
    model_input = torch.empty_like(m)
    x0_out = torch.empty_like(x)

    def fused(backend):
        return lambda: ops.fused_step(x, m, row, history=(prev_x0,), out=out, model_input=model_input,
                                      x0_out=x0_out, backend=backend)

    def check(backend):
        x0 = (x - sigma_s0 * m.float()) / alpha_s0
        want = (sigma_t / sigma_s0) * x - phi * x0 - 0.5 * phi * (1.0 / r0) * (x0 - prev_x0)
        got = ops.fused_step(x, m, row, history=(prev_x0,), backend=backend)
        return (got - want).abs().max().item()

    moved = x.numel() * (4 + 2 + 4 + 4 + 2 + 4)  # read x, m, h1; write x', model input, x0
    return eager, fused, check, moved


CASES = {"ddim_eta1": ddim_case, "dpmpp_2m": dpmpp_2m_case}


def median_and_best(fn, device, repeats, warmup=2):
    """(median, minimum) wall time of fn() in seconds. The minimum is the least disturbed by other processes on
    a shared machine; the median is what ARCHITECTURE §7 reports."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def copy_into_bandwidth(nbytes, device):
    """Same-run bandwidth (bytes/s, read + write) of dst.copy_(src) into a preallocated buffer, (median, best):
    the fused op writes preallocated buffers too, while common.copy_bandwidth's clone() also pays for fresh
    pages."""
    src = torch.empty(nbytes // 8, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    median, best = median_and_best(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() * 4 / median, 2 * src.numel() * 4 / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes on 2 CPU cores)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    repeats = 5 if args.quick else 15
    load_before = os.getloadavg()[0]
    rows = []
    for shape in SHAPES:
        for subject, make in CASES.items():
            eager, fused, check, moved = make(shape, device)
            copy_into, best_copy_bw = copy_into_bandwidth(moved, device)
            copy_bw = max(copy_bandwidth(moved, device), copy_into)
            eager_t, eager_best = median_and_best(eager, device, repeats)
            base = {"step": subject, "shape": "×".join(map(str, shape)), "state/model": "fp32/fp16"}
            probe = torch.empty(shape, device=device)
            for name in available_backends(probe):
                error = check(name)
                assert error < 1e-4, f"{subject} {name}: fused result differs from eager by {error}"
                # the torch fallback is slow (the reference's int64 Philox): fewer repeats
                t, best = median_and_best(fused(name), device, repeats if name != "torch" else 3, warmup=1)
                rate = moved / t
                rows.append({**base, "backend": name, "ms": t * 1e3, "eager_ms": eager_t * 1e3,
                             "speedup": eager_t / t, "best_ms": best * 1e3, "eager_best_ms": eager_best * 1e3,
                             "best_speedup": eager_best / best, "GB/s": rate / 1e9, "copy_GB/s": copy_bw / 1e9,
                             "of_copy_bw": rate / copy_bw, "best_copy_GB/s": best_copy_bw / 1e9,
                             "best_of_copy_bw": moved / best / best_copy_bw})
                print(rows[-1], flush=True)
    columns = ["step", "shape", "state/model", "backend", "ms", "eager_ms", "speedup", "best_ms", "eager_best_ms",
               "best_speedup", "GB/s", "copy_GB/s", "of_copy_bw", "best_copy_GB/s", "best_of_copy_bw"]
    notes = ("Eager = the diffusers-style update in plain torch (DDIM includes torch.randn; both end with the cast "
             "to the model dtype). GB/s counts the bytes the fused kernel must move (DDIM: x, m read; x', model "
             "input written; DPM++2M: also h1 read and x0 written) against the faster of a same-run torch.clone "
             "and a copy_ into a preallocated buffer moving that many bytes. "
             "The torch backend is the reference fallback (unfused: many passes). "
             f"1-minute load average at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
             f"({os.cpu_count()} CPUs; other work on the machine inflates every time here: best_* use the "
             "fastest of the repeats).")
    print(save("bench_fused_step", rows, columns, notes))


if __name__ == "__main__":
    main()
