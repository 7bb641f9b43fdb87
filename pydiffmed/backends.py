"""The four kernel backends and the dispatch between them (ARCHITECTURE §3), as declarations.

Each backend is one `Backend` record (what it needs on this machine, the devices its kernels take, its place in
the priority order). Each op registers one implementation per backend with `register(op, backend, ...)`, which
declares an `OpImpl`: the devices, dtypes and layouts it takes, its limits, and, only for limits that depend on
more than those facts (strides, say), a `reasons(**inputs)` callable listing why it cannot run given inputs.

Lookups: `ops()`, `implementations(op)`, `implementation(op, backend)`, `backend(name)`, and
`choose(op, device=..., dtype=..., layout=..., **facts)`, which answers from the declarations alone which backend
dispatch would pick. `select(op, backend, tensors, **inputs)` is the dispatch the ops call on their real tensors:
it walks `PRIORITY` and takes the first backend that can run them; a backend forced through `backend=` or the
`PYDIFFMED_BACKEND` environment variable is used or refused with all its reasons listed.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "PYDIFFMED_BACKEND"

# Codes understood by the C++ and CUDA kernels (csrc/common/pdm_common.h, enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLOAT_DTYPES = tuple(DTYPE_CODES)
LAYOUTS = ("ncs", "cl")  # contiguous N×C×spatial, channels-last (channels_last / channels_last_3d)
_DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs; the message lists every reason."""


@dataclass(frozen=True)
class Backend:
    """One kernel backend."""
    name: str
    priority: int                      # dispatch tries lower numbers first
    description: str                   # what `pydiffmed info` says about it when it is available
    devices: tuple[str, ...] | None    # device types its kernels take; None: any
    modules: tuple[tuple[str, str], ...] = ()  # (module that must import, the reason when it does not: {error})
    needs_cuda: str | None = None      # the reason given when torch sees no CUDA device; None: needs none
    interpreter: str | None = None     # environment variable that (=1) runs its kernels on CPU tensors through an
                                       # interpreter: for tests, so used only when forced


_BACKENDS = {b.name: b for b in (
    Backend("torch", 3, "reference, any device", None),
    Backend("cpu", 2, "C++/OpenMP kernels for CPU tensors", ("cpu",),
            modules=(("pydiffmed._C", "C++ extension not built: {error} (run `make build`)"),)),
    Backend("triton", 0, "Triton kernels for CUDA tensors", ("cuda",),
            modules=(("triton", "triton not installed: {error}"),),
            needs_cuda="no CUDA device (set TRITON_INTERPRET=1 before import to run the interpreter on CPU)",
            interpreter="TRITON_INTERPRET"),
    Backend("cuda", 1, "CUDA C++ kernels via CuPy/NVRTC", ("cuda",),
            modules=(("cupy", "cupy not installed (pip install 'pydiffmed[cuda]')"),), needs_cuda="no CUDA device"),
)}
BACKENDS = tuple(_BACKENDS)
PRIORITY = tuple(sorted(BACKENDS, key=lambda name: _BACKENDS[name].priority))


@dataclass(frozen=True)
class Limit:
    """An upper bound on one fact of an op's inputs: `name` is its keyword in `choose`, `label` names it in
    messages, `measure(**inputs)` reads it from the inputs `select` gets."""
    name: str
    label: str
    maximum: int
    measure: Callable[..., int]


@dataclass
class OpImpl:
    """How one backend implements one op (declared by `register`)."""
    op: str
    backend: str
    run: Callable
    devices: tuple[str, ...] | None = None          # device types it takes; None: the backend's
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES  # dtypes of the floating tensors; None: any
    interpreter_dtypes: tuple[torch.dtype, ...] | None = None  # those it takes through the interpreter; None: dtypes
    layouts: tuple[str, ...] | None = LAYOUTS       # layout of the first tensor (ncs / cl); None: any strides
    limits: tuple[Limit, ...] = ()
    symbols: tuple[str, ...] = ()                   # functions the backend's compiled module must export
    reasons: Callable[..., list] | None = None      # input-dependent limits only (strides, ...); None: none


_REGISTRY: dict[str, dict[str, OpImpl]] = {}
_layout_of = None  # pydiffmed.ops._checks.layout_of, bound on first use (the ops import this module)
# select()'s answers for ops without a `reasons` callable: they depend only on this key
_SELECTIONS: dict[tuple, str] = {}


def register(op: str, backend: str, **declaration):
    """Decorator: `run` implements `op` on `backend`. Keywords: the OpImpl fields (devices, dtypes,
    interpreter_dtypes, layouts, limits, symbols, reasons)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(run):
        _REGISTRY.setdefault(op, {})[backend] = OpImpl(op, backend, run, **declaration)
        _SELECTIONS.clear()
        return run

    return deco


def unregister(op: str, backend: str | None = None) -> None:
    """Forget `op`'s implementation on `backend` (on every backend when None)."""
    impls = _REGISTRY.get(op, {})
    for name in list(impls) if backend is None else [backend]:
        impls.pop(name, None)
    if not impls:
        _REGISTRY.pop(op, None)
    _SELECTIONS.clear()


# --- lookups -------------------------------------------------------------------------------------------------

def _load_ops():
    importlib.import_module("pydiffmed.ops")  # the ops register themselves when imported


def ops() -> tuple[str, ...]:
    """Every registered op."""
    _load_ops()
    return tuple(_REGISTRY)


def implementations(op: str) -> dict[str, OpImpl]:
    """{backend name: declaration} of `op`, in BACKENDS order."""
    _load_ops()
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered: {', '.join(_REGISTRY)}")
    return {name: _REGISTRY[op][name] for name in BACKENDS if name in _REGISTRY[op]}


def implementation(op: str, backend: str) -> OpImpl:
    """The declaration (and `run`) of `op` on `backend`."""
    try:
        return _REGISTRY[op][backend]
    except KeyError:
        raise ValueError(f"{backend} has no implementation of {op}") from None


def backend(name: str) -> Backend:
    """The record of backend `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return _BACKENDS[name]


# --- availability and description ----------------------------------------------------------------------------

@functools.cache
def _import_reason(module: str) -> str | None:
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:  # noqa: BLE001 (ImportError, or a broken install raising something else)
        return f"{module} not importable ({type(exc).__name__}: {exc})"


def _interpreting(b: Backend) -> bool:
    return b.interpreter is not None and os.environ.get(b.interpreter, "0") not in ("", "0")


def triton_interpreting() -> bool:
    return _interpreting(_BACKENDS["triton"])


def backend_reasons(name: str) -> list[str]:
    """Why a backend is unavailable on this machine at all (independent of any input)."""
    b = backend(name)
    reasons = []
    if b.needs_cuda and not torch.cuda.is_available() and not _interpreting(b):
        reasons.append(b.needs_cuda)
    for module, why in b.modules:
        error = _import_reason(module)
        if error:
            reasons.append(why.format(error=error))
    return reasons


def describe_backend(name: str) -> str:
    reasons = backend_reasons(name)
    if reasons:
        return f"{name}: unavailable ({'; '.join(reasons)})"
    b = _BACKENDS[name]
    if b.needs_cuda and b.interpreter and not torch.cuda.is_available():
        return f"{name}: no CUDA device (interpreter only: {b.interpreter}=1; used only when forced)"
    return f"{name}: available ({b.description})"


def describe() -> str:
    """One line per backend, available or not, and why."""
    lines = [describe_backend(name) for name in BACKENDS]
    forced = os.environ.get(ENV_VAR)
    if forced:
        lines.append(f"{ENV_VAR}={forced} (forces this backend for every op)")
    return "\n".join(lines)


# --- dispatch ------------------------------------------------------------------------------------------------

def dtype_name(dtype) -> str:
    """'float16' for torch.float16: how messages, sidecars and reports name a dtype."""
    return str(dtype).replace("torch.", "")


_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of x86 CPUs that compute in bf16 natively


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The flag that makes bf16 native on this CPU (amx_bf16 or avx512_bf16: oneDNN then runs bf16 convolutions
    and matmuls ~3× faster than fp32), or None: no such flag, or a system without /proc/cpuinfo (bf16 is then
    emulated, slower than fp32, or of unknown speed)."""
    return bf16_flag_in("/proc/cpuinfo")


def bf16_flag_in(cpuinfo_path) -> str | None:
    """The first of _BF16_CPU_FLAGS on the "flags" lines of a /proc/cpuinfo-style file, None if none or unreadable."""
    flags = set()
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.partition(":")[2].split())
    except OSError:
        return None
    return next((flag for flag in _BF16_CPU_FLAGS if flag in flags), None)


CPU_BF16_ENV = "PYDIFFMED_CPU_BF16"  # "0" / "1": what auto_dtype assumes of this CPU, whatever its flags say


def auto_dtype(device) -> tuple[torch.dtype, str]:
    """The model precision `--dtype auto` picks on `device`, and why: float16 on CUDA; on the CPU bfloat16 where
    the CPU has native bf16 (cpu_bf16_feature), float32 elsewhere. The solver state stays float32 either way.
    PYDIFFMED_CPU_BF16=0 (or 1) overrides the CPU's answer: e.g. to get float32 everywhere on a cluster of mixed
    CPUs, where bf16 on some and float32 on others would give different bits for the same seed."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16, "auto: float16 on CUDA"
    forced = os.environ.get(CPU_BF16_ENV, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{CPU_BF16_ENV}={forced!r}: expected 0 or 1 (or unset: ask the CPU)")
    if forced == "1":
        return torch.bfloat16, f"auto: bfloat16, {CPU_BF16_ENV}=1"
    if forced == "0":
        return torch.float32, f"auto: float32, {CPU_BF16_ENV}=0"
    feature = cpu_bf16_feature()
    if feature is not None:
        return torch.bfloat16, f"auto: bfloat16, this CPU computes bf16 natively ({feature})"
    return torch.float32, f"auto: float32, this CPU has no native bf16 (none of {', '.join(_BF16_CPU_FLAGS)})"


def _device_reasons(impl: OpImpl, devices, forced: bool) -> list[str]:
    b = _BACKENDS[impl.backend]
    allowed = impl.devices if impl.devices is not None else b.devices
    if allowed is None:
        return []
    words = " or ".join(_DEVICE_WORDS.get(d, d) for d in allowed)
    other = set(devices) - set(allowed)
    if b.interpreter and "cpu" in other:
        if not _interpreting(b):
            return [f"{b.name} needs {words} tensors (CPU tensors only under {b.interpreter}=1)"]
        if not forced:
            return [f"{b.name} on CPU tensors runs only through the interpreter; used only when forced"]
        other.discard("cpu")
    return [f"{b.name} backend needs {words} tensors, got {sorted(devices)}"] if other else []


def _declared_reasons(impl: OpImpl, devices, dtypes, layout, facts: dict, forced: bool) -> list[str]:
    """Why `impl` cannot run inputs with these facts, from its declaration and its backend's availability."""
    reasons = backend_reasons(impl.backend)
    if reasons:
        return reasons
    reasons = _device_reasons(impl, devices, forced)
    interpreted = "cpu" in devices and _interpreting(_BACKENDS[impl.backend])
    allowed = impl.interpreter_dtypes if interpreted and impl.interpreter_dtypes is not None else impl.dtypes
    for dtype in sorted(set(dtypes) - set(allowed or dtypes), key=str):
        if interpreted:
            reasons.append(f"{impl.backend} runs {impl.op} in {dtype_name(dtype)} on GPU only (not under the "
                           f"interpreter, {_BACKENDS[impl.backend].interpreter}=1)")
        else:
            reasons.append(f"{impl.backend} has no {impl.op} kernel for {dtype_name(dtype)}")
    if layout is not None and impl.layouts is not None and layout not in impl.layouts:
        reasons.append(f"{impl.backend} {impl.op} takes {' or '.join(impl.layouts)} layouts, not {layout}")
    for limit in impl.limits:
        value = facts.get(limit.name)
        if value is not None and value > limit.maximum:
            reasons.append(f"{limit.label} = {value} > {limit.maximum}")
    if impl.symbols:
        module = _BACKENDS[impl.backend].modules[0][0]
        compiled = importlib.import_module(module)
        reasons += [f"{module} was built without {s} (rebuild it)" for s in impl.symbols if not hasattr(compiled, s)]
    return reasons


def forced_backend(backend: str | None) -> str | None:
    name = backend or os.environ.get(ENV_VAR) or None
    if name is not None and name not in _BACKENDS:
        source = "backend=" if backend else ENV_VAR
        raise ValueError(f"{source}{name!r} is not a backend; expected one of {BACKENDS}")
    return name


def _facts_of(op: str, tensors, inputs: dict):
    """(devices, float dtypes, layout of the first tensor, limit facts) of real inputs."""
    global _layout_of
    if _layout_of is None:
        from .ops._checks import layout_of as _layout_of
    devices, dtypes = set(), set()
    for t in tensors:
        if t is not None:
            devices.add(t.device.type)
            if t.is_floating_point():
                dtypes.add(t.dtype)
    first = tensors[0] if tensors else None
    layout = _layout_of(first) if isinstance(first, torch.Tensor) else None
    facts = {limit.name: limit.measure(**inputs) for impl in _REGISTRY.get(op, {}).values() for limit in impl.limits}
    return frozenset(devices), frozenset(dtypes), layout, facts


def _reasons(op: str, name: str, facts: tuple, inputs: dict | None, forced: bool) -> list[str]:
    """Why backend `name` cannot run `op` on inputs with these facts (_facts_of's tuple); the implementation's
    `reasons` callable is asked too unless inputs is None (choose: no inputs to ask about)."""
    impl = _REGISTRY.get(op, {}).get(name)
    if impl is None:
        return [f"{name} has no implementation of {op}"]
    reasons = _declared_reasons(impl, *facts, forced)
    if not reasons and impl.reasons is not None and inputs is not None:
        reasons = list(impl.reasons(**inputs))
    return reasons


def not_supported_reasons(op: str, backend: str, tensors, forced: bool = False, **inputs) -> list[str]:
    """Why `backend` cannot run `op` on these tensors (`tensors`: the tensor arguments; `inputs`: what the
    implementation's limits and `reasons` read). Empty: it can."""
    return _reasons(op, backend, _facts_of(op, tensors, inputs), inputs, forced)


def _pick(op: str, forced: str | None, facts: tuple, inputs: dict | None) -> str:
    if forced is not None:
        reasons = _reasons(op, forced, facts, inputs, True)
        if reasons:
            raise BackendUnavailable(f"backend {forced!r} cannot run {op}: " + "; ".join(reasons))
        return forced
    for name in PRIORITY:
        if not _reasons(op, name, facts, inputs, False):
            return name
    raise BackendUnavailable(f"no backend can run {op}")  # torch supports everything; unreachable in practice


def select(op: str, backend: str | None, tensors, **inputs) -> str:
    """The backend that runs `op` on these inputs. `tensors` are the tensor arguments (device, dtype and layout
    checks: the first one's layout counts); `inputs` go to the declared limits and `reasons`."""
    forced = forced_backend(backend)
    facts = _facts_of(op, tensors, inputs)
    devices, dtypes, layout, limit_facts = facts
    key = (op, forced, devices, dtypes, layout, tuple(sorted(limit_facts.items())),
           forced is not None and _interpreting(_BACKENDS[forced]))
    name = _SELECTIONS.get(key)
    if name is None:
        name = _pick(op, forced, facts, inputs)
        if _decided_by_declarations(op, name, forced, facts):
            _SELECTIONS[key] = name
    return name


def _decided_by_declarations(op: str, name: str, forced: str | None, facts: tuple) -> bool:
    """Whether _pick's answer `name` depends on the key's facts alone: no backend it considered (those before
    `name` in priority, and `name`) got as far as its input-dependent `reasons` callable."""
    impls = _REGISTRY.get(op, {})
    considered = [forced] if forced is not None else PRIORITY[:PRIORITY.index(name) + 1]
    return all(impls.get(n) is None or impls[n].reasons is None
               or _declared_reasons(impls[n], *facts, forced is not None) for n in considered)


def choose(op: str, *, device, dtype: torch.dtype | None = None, layout: str | None = None,
           backend: str | None = None, **facts) -> str:
    """The backend `select` picks for `op` on inputs with these facts, answered from the declarations (no
    tensors): `device` (a device or its type), `dtype` of the floating tensors, `layout` ('ncs', 'cl') and the
    op's limit facts by name (e.g. head_dim=64 for attention); an omitted fact is not checked. Limits only a
    `reasons` callable knows (strides, ...) are taken as met. Honours `backend=` and PYDIFFMED_BACKEND like
    select: a forced backend that cannot run such inputs raises BackendUnavailable."""
    impls = implementations(op)
    known = {limit.name for impl in impls.values() for limit in impl.limits}
    unknown = set(facts) - known
    if unknown:
        raise ValueError(f"{op} has no limit named {', '.join(sorted(unknown))}; its limits: "
                         f"{', '.join(sorted(known)) or 'none'}")
    if layout is not None and layout not in LAYOUTS + ("strided",):
        raise ValueError(f"layout must be one of {LAYOUTS + ('strided',)}, got {layout!r}")
    dtypes = frozenset([dtype]) if dtype is not None else frozenset()
    return _pick(op, forced_backend(backend), (frozenset([torch.device(device).type]), dtypes, layout, facts), None)
