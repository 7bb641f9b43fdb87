"""The four kernel backends and the dispatch between them (DESIGN §3).

Every op registers one implementation per backend with `register(op, backend, reasons=...)`. An
implementation's `reasons(**inputs)` returns why it cannot run those inputs (empty list: it can). Dispatch
walks `PRIORITY` and takes the first backend with no reasons; a backend forced through `backend=` or the
`PYDIFFMED_BACKEND` environment variable is used or refused with all its reasons listed.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
PRIORITY = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "PYDIFFMED_BACKEND"

# Codes understood by the C++ and CUDA kernels (csrc/common/pdm_common.h, enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs; the message lists every reason."""


@functools.lru_cache(maxsize=None)
def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"{module} not importable ({type(exc).__name__}: {exc})"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_reasons(name: str) -> list[str]:
    """Why a backend is unavailable on this machine at all (independent of any input)."""
    if name == "torch":
        return []
    if name == "cpu":
        reason = _import_reason("pydiffmed._C")
        return [f"C++ extension not built: {reason} (run `make build`)"] if reason else []
    if name == "triton":
        reason = _import_reason("triton")
        if reason:
            return [f"triton not installed: {reason}"]
        if not torch.cuda.is_available() and not triton_interpreting():
            return ["no CUDA device (set TRITON_INTERPRET=1 before import to run the interpreter on CPU)"]
        return []
    if name == "cuda":
        reasons = []
        if not torch.cuda.is_available():
            reasons.append("no CUDA device")
        reason = _import_reason("cupy")
        if reason:
            reasons.append("cupy not installed (pip install 'pydiffmed[cuda]')")
        return reasons
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def describe_backend(name: str) -> str:
    reasons = backend_reasons(name)
    if reasons:
        return f"{name}: unavailable ({'; '.join(reasons)})"
    if name == "triton" and not torch.cuda.is_available():
        return "triton: no CUDA device (interpreter only: TRITON_INTERPRET=1; used only when forced)"
    where = {"torch": "reference, any device", "cpu": "C++/OpenMP kernels for CPU tensors",
             "triton": "Triton kernels for CUDA tensors", "cuda": "CUDA C++ kernels via CuPy/NVRTC"}[name]
    return f"{name}: available ({where})"


def describe() -> str:
    """One line per backend, available or not, and why."""
    lines = [describe_backend(name) for name in BACKENDS]
    forced = os.environ.get(ENV_VAR)
    if forced:
        lines.append(f"{ENV_VAR}={forced} (forces this backend for every op)")
    return "\n".join(lines)


def device_reasons(name: str, tensors, forced: bool) -> list[str]:
    """Device rules shared by all ops: where each backend's kernels run."""
    devices = {t.device.type for t in tensors if t is not None}
    if name == "cpu" and devices - {"cpu"}:
        return [f"cpu backend needs CPU tensors, got {sorted(devices)}"]
    if name == "cuda" and devices - {"cuda"}:
        return [f"cuda backend needs CUDA tensors, got {sorted(devices)}"]
    if name == "triton":
        if "cpu" in devices:
            if not triton_interpreting():
                return ["triton needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"]
            if not forced:
                return ["triton on CPU tensors runs only through the interpreter; used only when forced"]
        if devices - {"cpu", "cuda"}:
            return [f"triton needs CUDA tensors, got {sorted(devices)}"]
    return []


@dataclass
class OpImpl:
    run: Callable
    reasons: Callable[..., list] | None  # None: runs every input of the op (on the devices it supports)


_REGISTRY: dict[str, dict[str, OpImpl]] = {}
# select()'s answers for ops whose implementations all have reasons=None: they depend only on this key
_SELECTIONS: dict[tuple, str] = {}


def register(op: str, backend: str, reasons: Callable[..., list] | None = None):
    """Decorator: `run` implements `op` on `backend`; `reasons(**inputs)` lists op-specific limits (None: none)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(run):
        _REGISTRY.setdefault(op, {})[backend] = OpImpl(run, reasons)
        _SELECTIONS.clear()
        return run

    return deco


def _input_reasons(impl: OpImpl, inputs: dict) -> list[str]:
    return [] if impl.reasons is None else list(impl.reasons(**inputs))


def forced_backend(backend: str | None) -> str | None:
    name = backend or os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        source = "backend=" if backend else ENV_VAR
        raise ValueError(f"{source}{name!r} is not a backend; expected one of {BACKENDS}")
    return name


def not_supported_reasons(op: str, backend: str, tensors, forced: bool = False, **inputs) -> list[str]:
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        return [f"{backend} has no implementation of {op}"]
    reasons = backend_reasons(backend)
    if reasons:
        return reasons
    return device_reasons(backend, tensors, forced) + _input_reasons(impls[backend], inputs)


def select(op: str, backend: str | None, tensors, **inputs) -> tuple[str, Callable]:
    """Pick the implementation of `op` for these inputs. `tensors` are the tensor arguments (device checks);
    `inputs` go to each implementation's `reasons`."""
    forced = forced_backend(backend)
    # TRITON_INTERPRET matters only to a forced triton (unforced, triton never takes CPU tensors)
    key = (op, forced, frozenset([t.device.type for t in tensors if t is not None]),
           forced == "triton" and triton_interpreting())
    name = _SELECTIONS.get(key)
    if name is None:
        name = _select(op, forced, tensors, inputs)
        if all(impl.reasons is None for impl in _REGISTRY[op].values()):
            _SELECTIONS[key] = name
    return name, _REGISTRY[op][name].run


def _select(op, forced, tensors, inputs) -> str:
    if forced is not None:
        reasons = not_supported_reasons(op, forced, tensors, forced=True, **inputs)
        if reasons:
            raise BackendUnavailable(f"backend {forced!r} cannot run {op}: " + "; ".join(reasons))
        return forced
    for name in PRIORITY:
        if name in _REGISTRY.get(op, {}) and not not_supported_reasons(op, name, tensors, **inputs):
            return name
    raise BackendUnavailable(f"no backend can run {op}")  # torch supports everything; unreachable in practice
