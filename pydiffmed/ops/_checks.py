"""Argument checks shared by the ops: each raises TypeError/ValueError naming the argument, before any kernel."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")


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
    if x.is_contiguous(memory_format=channels_last_format(x.ndim)):
        return "cl"
    return "strided"


def as_float32(t):
    return None if t is None else t.detach().to(torch.float32).contiguous()
