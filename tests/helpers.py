"""Shared test utilities: the DESIGN §6 tolerance rule, the NaN canary and random weights for models."""
from __future__ import annotations

import math

import torch
from torch import nn

from pydiffmed import backends


def max_abs_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(out, ref_fp32, torch_at_dtype, floor=1e-5, what=""):
    """Low-precision rule: the kernel's error against the fp32 reference is at most twice the error of the same
    math done in plain torch at that dtype (plus a small absolute floor for fp32, where torch's error is ~0)."""
    err = max_abs_err(out, ref_fp32)
    allowed = 2.0 * max_abs_err(torch_at_dtype, ref_fp32) + floor
    assert math.isfinite(err) and err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g}"


def canary_like(t: torch.Tensor, extra: int = 64, shape=None, memory_format=torch.contiguous_format):
    """An output tensor (shape of t, or `shape`) living at the front of a NaN-filled buffer; `canary_intact`
    then checks that nothing was written past it."""
    shape = tuple(t.shape) if shape is None else tuple(shape)
    numel = math.prod(shape)
    buf = torch.full((numel + extra,), float("nan"), dtype=t.dtype, device=t.device)
    if memory_format is torch.contiguous_format:
        out = buf[:numel].view(shape)
    else:
        perm = (0, *range(2, len(shape)), 1)  # channels-last: memory order N, spatial..., C
        phys = tuple(shape[i] for i in perm)
        inv = [perm.index(i) for i in range(len(shape))]
        out = buf[:numel].view(phys).permute(*inv)
    return out, buf


def canary_intact(out: torch.Tensor, buf: torch.Tensor) -> bool:
    return bool(torch.isnan(buf[out.numel():]).all()) and not bool(torch.isnan(out).any())


def run_backend(op: str, backend: str, *args):
    return backends._REGISTRY[op][backend].run(*args)


def runnable_backends(op: str, tensors, **inputs):
    """The backends that can run `op` on this machine (triton counts when forced under the interpreter)."""
    names = []
    for name in backends.BACKENDS:
        if not backends.not_supported_reasons(op, name, tensors, forced=True, **inputs):
            names.append(name)
    return names


def randomize_(model, seed=0):
    """Random weights everywhere (MONAI zero-initialises conv2, proj_out, the output conv and the ControlNet's
    1×1 convolutions, which would hide those paths): norms ≈ 1, other weights ~ 1/sqrt(fan_in), biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = {m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if module in norms:
                    p.copy_(1.0 + 0.1 * noise if name == "weight" else 0.1 * noise)
                elif p.ndim >= 2:
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * noise)
    return model


def randomised(model, seed=0, scale=0.1):
    """Non-trivial weights N(0, scale²) everywhere (the output convolution starts at zero), small enough to keep
    samples bounded; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()
