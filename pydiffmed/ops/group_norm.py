"""`group_norm`: y = act(GroupNorm(x + bias_nc) · weight + bias) over 4-D/5-D input (ARCHITECTURE §4).

The public function validates, normalises the layout (contiguous or channels_last kept as is, other strides
copied once), picks a backend and calls the custom op `pydiffmed::group_norm`, which `torch.compile` and
CUDA-graph capture see as one op.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import as_float32, check_float_tensor, check_same_device, check_shape, layout_of, needs_custom_op
from . import reference

ACTIVATIONS = (None, "silu")


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, act=None, bias_nc=None, token_major=False,
               backend=None):
    """Group normalisation with an optional fused per-(sample, channel) input bias and SiLU.

    x: N×C×D×H×W or N×C×H×W, fp32/fp16/bf16, contiguous or channels_last(_3d) (other strides are copied).
    weight, bias: C-vectors (any float dtype); bias_nc: N×C, added to x before the statistics.
    token_major: return N×(D·H·W)×C (the layout attention consumes) instead of x's shape.
    Output dtype = x.dtype; layout = x's layout. Statistics in fp32, centred variance.
    """
    check_float_tensor("x", x)
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be 4-D (N,C,H,W) or 5-D (N,C,D,H,W); got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {c} channels of x")
    for name, t, shape in (("weight", weight, (c,)), ("bias", bias, (c,)), ("bias_nc", bias_nc, (n, c))):
        if t is not None:
            check_float_tensor(name, t)
            check_shape(name, t, shape)
    check_same_device("x", x, weight=weight, bias=bias, bias_nc=bias_nc)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {eps}")
    if layout_of(x) == "strided":
        x = x.contiguous()
    tensors = (x, weight, bias, bias_nc)
    name = backends.select("group_norm", backend, tensors, x=x, num_groups=num_groups, act=act)
    args = (x, num_groups, weight, bias, eps, act or "", bias_nc, bool(token_major), name)
    if needs_custom_op(*tensors):
        return torch.ops.pydiffmed.group_norm(*args)
    return _group_norm_run(*args)


def _check_input(x):
    check_float_tensor("x", x)
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be 4-D (N,C,H,W) or 5-D (N,C,D,H,W); got shape {tuple(x.shape)}")
    return x.contiguous() if layout_of(x) == "strided" else x


def group_norm_stats(x, num_groups, *, bias_nc=None, backend=None):
    """GroupNorm's statistics phase alone: (elements per group, mean, m2) of x + bias_nc, the mean and the centred
    second moment Σ(v − mean)² as N×G fp64 tensors — what `group_norm` normalises with. Statistics of tiles or
    ranks of one volume merge exactly (Chan's formula: partition.GroupStats.merge); `group_norm_apply` then
    normalises each piece with the merged ones. x: as for group_norm."""
    x = _check_input(x)
    n, c = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {c} channels of x, got {num_groups!r}")
    if bias_nc is not None:
        check_float_tensor("bias_nc", bias_nc)
        check_shape("bias_nc", bias_nc, (n, c))
        check_same_device("x", x, bias_nc=bias_nc)
    name = backends.select("group_norm_stats", backend, (x, bias_nc), x=x)
    return backends.implementation("group_norm_stats", name).run(x, num_groups, bias_nc)


def group_norm_apply(x, mean, scale, shift, *, act=None, out=None, backend=None):
    """GroupNorm's apply phase alone: out = act((x − mean)·scale + shift) per (sample, channel), computed in fp32.
    mean, scale, shift: N×C (from merged group_norm_stats: mean per group, scale = γ/√(var + eps), shift = β);
    an fp64 mean keeps ~48 bits (two fp32 parts), so data far from zero loses nothing to the subtraction. x: as for
    group_norm; out: x's shape and dtype, contiguous or channels-last (default: like x). Returns out."""
    x = _check_input(x)
    n, c = x.shape[:2]
    for name, t in (("mean", mean), ("scale", scale), ("shift", shift)):
        check_float_tensor(name, t, (torch.float32, torch.float64))
        check_shape(name, t, (n, c))
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have x's shape {tuple(x.shape)} and dtype {x.dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    check_same_device("x", x, mean=mean, scale=scale, shift=shift, out=out)
    center = mean.float()
    scale = scale.float()
    shift = (shift.double() - (mean.double() - center.double()) * scale.double()).float()
    name = backends.select("group_norm_apply", backend, (x, out), x=x, out=out)
    backends.implementation("group_norm_apply", name).run(x, out, center.contiguous(), scale.contiguous(),
                                                          shift.contiguous(), act == "silu")
    return out


def _group_norm_run(x, num_groups, weight, bias, eps, act, bias_nc, token_major, backend):
    y = _empty_output(x, token_major)
    backends.implementation("group_norm", backend).run(x, y, num_groups, weight, bias, eps, act == "silu", bias_nc)
    return y


@torch.library.custom_op("pydiffmed::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, act: str, bias_nc: torch.Tensor | None, token_major: bool,
                   backend: str) -> torch.Tensor:
    return _group_norm_run(x, num_groups, weight, bias, eps, act, bias_nc, token_major, backend)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, act, bias_nc, token_major, backend):
    return _empty_output(x, token_major)


def _setup_backward(ctx, inputs, output):
    x, num_groups, weight, bias, eps, act, bias_nc, token_major, _ = inputs
    ctx.save_for_backward(x, weight, bias, bias_nc)
    ctx.num_groups, ctx.eps, ctx.act, ctx.token_major = num_groups, eps, act, token_major


def _backward(ctx, grad_y):
    """Gradients by recomputing the forward with torch's GroupNorm (sampling never needs them; training the demo
    model does)."""
    saved = ctx.saved_tensors
    wants = [t is not None and needs for t, needs in zip(saved, (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4],
                                                                  ctx.needs_input_grad[6]))]
    with torch.enable_grad():
        x, weight, bias, bias_nc = (t.detach().requires_grad_(w) if t is not None else None
                                    for t, w in zip(saved, wants))
        y = _differentiable_group_norm(x, ctx.num_groups, weight, bias, ctx.eps, ctx.act, bias_nc)
        if ctx.token_major:
            y = y.flatten(2).transpose(1, 2)
        inputs = [t for t, w in zip((x, weight, bias, bias_nc), wants) if w]
        grads = iter(torch.autograd.grad(y, inputs, grad_y)) if inputs else iter(())
    gx, gw, gb, gbnc = (next(grads) if w else None for w in wants)
    return gx, None, gw, gb, None, None, gbnc, None, None


_group_norm_op.register_autograd(_backward, setup_context=_setup_backward)


def _differentiable_group_norm(x, num_groups, weight, bias, eps, act, bias_nc):
    xf = x.float()
    if bias_nc is not None:
        xf = xf + bias_nc.float().reshape(*bias_nc.shape, *(1,) * (x.ndim - 2))
    y = F.group_norm(xf, num_groups, *(None if t is None else t.float() for t in (weight, bias)), eps=eps)
    return (F.silu(y) if act == "silu" else y).to(x.dtype)


def _empty_output(x, token_major):
    if token_major:
        n, c = x.shape[:2]
        return x.new_empty((n, math.prod(x.shape[2:]), c))
    return torch.empty_like(x)


def _output_is_channels_last(x, y):
    return y.ndim == 3 or layout_of(x) == "cl"


# --- backends ------------------------------------------------------------------------------------------------

@backends.register("group_norm", "torch", dtypes=None, layouts=None)
def _run_torch(x, y, num_groups, weight, bias, eps, silu, bias_nc):
    out = reference.group_norm(x, num_groups, weight, bias, eps, act="silu" if silu else None, bias_nc=bias_nc)
    if y.ndim == 3:
        out = out.flatten(2).transpose(1, 2)
    y.copy_(out)


@backends.register("group_norm", "cpu")
def _run_cpu(x, y, num_groups, weight, bias, eps, silu, bias_nc):
    from .. import _C

    n, c = x.shape[:2]
    x_cl = layout_of(x) == "cl"
    params = (as_float32(weight), as_float32(bias), as_float32(bias_nc))  # kept alive until the kernel returns
    pointers = [0 if t is None else t.data_ptr() for t in params]
    _C.group_norm(x.data_ptr(), y.data_ptr(), backends.DTYPE_CODES[x.dtype], n, c, math.prod(x.shape[2:]),
                  num_groups, x_cl, _output_is_channels_last(x, y), *pointers, eps, silu, torch.get_num_threads())


@backends.register("group_norm", "triton")
def _run_triton(x, y, num_groups, weight, bias, eps, silu, bias_nc):
    from pydiffmed.triton_kernels.group_norm import group_norm_launch

    group_norm_launch(x, y, num_groups, as_float32(weight), as_float32(bias), as_float32(bias_nc), eps, silu,
                      x_channels_last=layout_of(x) == "cl", y_channels_last=_output_is_channels_last(x, y))


@backends.register("group_norm", "cuda")
def _run_cuda(x, y, num_groups, weight, bias, eps, silu, bias_nc):
    from .._cuda import group_norm_launch

    group_norm_launch(x, y, num_groups, as_float32(weight), as_float32(bias), as_float32(bias_nc), eps, silu,
                      x_channels_last=layout_of(x) == "cl", y_channels_last=_output_is_channels_last(x, y))


# --- the phases alone ----------------------------------------------------------------------------------------

@backends.register("group_norm_stats", "torch", dtypes=None, layouts=None)
def _stats_torch(x, num_groups, bias_nc):
    return reference.group_norm_stats(x, num_groups, bias_nc)


@backends.register("group_norm_stats", "cpu", symbols=("group_norm_stats",))
def _stats_cpu(x, num_groups, bias_nc):
    from .. import _C

    n, c = x.shape[:2]
    out = torch.empty((n, num_groups, 3), dtype=torch.float64)
    bias_nc = as_float32(bias_nc)
    _C.group_norm_stats(x.data_ptr(), backends.DTYPE_CODES[x.dtype], n, c, math.prod(x.shape[2:]), num_groups,
                        layout_of(x) == "cl", 0 if bias_nc is None else bias_nc.data_ptr(), out.data_ptr(),
                        torch.get_num_threads())
    return (c // num_groups) * math.prod(x.shape[2:]), out[..., 1], out[..., 2]


def _dense_out(x=None, out=None, **_):
    return [] if layout_of(out) in ("ncs", "cl") else ["out is neither contiguous nor channels-last"]


@backends.register("group_norm_apply", "torch", dtypes=None, layouts=None)
def _apply_torch(x, out, center, scale, shift, silu):
    reference.group_norm_apply(x, out, center, scale, shift, "silu" if silu else None)


@backends.register("group_norm_apply", "cpu", symbols=("group_norm_apply",), reasons=_dense_out)
def _apply_cpu(x, out, center, scale, shift, silu):
    from .. import _C

    n, c = x.shape[:2]
    _C.group_norm_apply(x.data_ptr(), out.data_ptr(), backends.DTYPE_CODES[x.dtype], n, c, math.prod(x.shape[2:]),
                        layout_of(x) == "cl", layout_of(out) == "cl", center.data_ptr(), scale.data_ptr(),
                        shift.data_ptr(), silu, torch.get_num_threads())
