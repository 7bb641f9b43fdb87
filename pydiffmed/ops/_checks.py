"""Argument checks shared by the ops: each raises TypeError/ValueError naming the argument, before any kernel."""
from __future__ import annotations

import math

import torch

from ..backends import dtype_name

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {dtype_name(t.dtype)}; expected one of {allowed}")


def check_shape(name: str, t, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def check_same_device(reference_name: str, reference, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def channels_last_format(ndim: int):
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def layout_of(x: torch.Tensor) -> str:
    """'ncs' (contiguous), 'cl' (channels_last / channels_last_3d) or 'strided' (needs a copy)."""
    if x.is_contiguous():
        return "ncs"
    if x.ndim in (4, 5) and x.is_contiguous(memory_format=channels_last_format(x.ndim)):
        return "cl"
    return "strided"


def needs_custom_op(*tensors) -> bool:
    """Whether an op must go through its registered custom op: under torch.compile (which must see one op) or
    with autograd on a tensor argument (the op's registered backward). Eager inference skips that layer's
    per-call overhead (~0.1 ms)."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled()
                                             and any(t is not None and t.requires_grad for t in tensors))


def tensor_state(t) -> tuple:
    """What a cache of something derived from `t` must compare: (data_ptr, version, dtype, device). A tensor made
    under torch.inference_mode has no version counter (reading it raises), so an in-place change of it (a
    load_state_dict there) cannot be seen: its state then equals no other, and a cache keyed on it is rebuilt at
    every call. A model made or loaded under inference_mode is right but misses these caches."""
    return t.data_ptr(), (object() if t.is_inference() else t._version), t.dtype, t.device


def as_float32(t):
    """t as a contiguous fp32 tensor (t itself when it already is one; kernels only read its data)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.detach().to(torch.float32).contiguous()


def check_group_norm_launch(x, y, num_groups, w, b, bias_nc, x_channels_last, y_channels_last):
    """Checks shared by the triton and cuda group_norm launchers (callable directly, below the op wrapper);
    returns (N, C, S). x: dense NCS or channels-last; y likewise, or the token-major N×S×C tensor; w, b, bias_nc:
    contiguous fp32 on x's device or None."""
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {c} channels of x")
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y must match x in dtype and device; got {y.dtype} on {y.device}, x is {x.dtype} on "
                         f"{x.device}")
    for name, t, channels_last in (("x", x, x_channels_last), ("y", y, y_channels_last)):
        if t.ndim == 3:
            ok = channels_last and tuple(t.shape) == (n, s, c) and t.is_contiguous()
        else:
            fmt = channels_last_format(t.ndim) if channels_last else torch.contiguous_format
            ok = t.ndim in (4, 5) and tuple(t.shape[:2]) == (n, c) and math.prod(t.shape[2:]) == s and \
                t.is_contiguous(memory_format=fmt)
        if not ok:
            layout = "channels-last" if channels_last else "contiguous"
            raise ValueError(f"{name} must be a dense {layout} tensor with {n} samples, {c} channels and {s} "
                             f"positions; got shape {tuple(t.shape)}, strides {t.stride()}")
    for name, t, shape in (("w", w, (c,)), ("b", b, (c,)), ("bias_nc", bias_nc, (n, c))):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous()
                              or t.device != x.device):
            raise ValueError(f"{name} must be a contiguous fp32 tensor of shape {shape} on {x.device}")
    return n, c, s
