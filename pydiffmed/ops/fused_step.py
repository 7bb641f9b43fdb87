"""`fused_step`: one solver update in one pass over memory, with in-kernel Philox noise (ARCHITECTURE §1, §4).

    x0 = clamp(p_x*x + p_m*m, -clip, clip)                  (clip = +inf: no clamp)
    x' = a*x + b*x0 + c1*h1 + c2*h2 + c3*h3 + s*z

The coefficients come as one row in COEF_NAMES order: scalar (K,), per sample (B, K), or a row of a device
table (S, K) / (S, B, K) selected by a device step index inside the kernel (no host sync, so a CUDA graph
captured once serves every step). A term whose coefficient is 0 contributes exactly 0 and its buffer is not
read (uninitialised history cannot leak NaN). z is either an explicit tensor or the Philox4x32-10 normal
`philox_normal(seeds, noise_step, x.shape)`: it depends on the sample's seed, the step word and the element's
logical (NCDHW) index only — not on the batch, the memory layout or the backend.

Conditions that need the coefficient values (a nonzero c_j without h_j, s != 0 without noise or seeds) raise
ValueError when the coefficients are on the CPU. With device coefficients they cannot be checked without a
host sync; the kernels then make the affected elements of x' NaN, which the engine's NaN check reports.

Outputs (out, model_input, x0_out) may be the very tensors passed as inputs (e.g. out=x, x0_out=h1: each
element is read before it is written), but must not partially overlap them.
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Optional, Sequence

import torch

from .. import backends
from ._checks import (FLOAT_DTYPES, channels_last_format, check_float_tensor, check_same_device, check_shape,
                      dtype_name, layout_of)
from . import reference

COEF_NAMES = ("p_x", "p_m", "clip", "a", "b", "c1", "c2", "c3", "s")
K = len(COEF_NAMES)
_COL = {name: k for k, name in enumerate(COEF_NAMES)}
_HISTORY_COLS = (_COL["c1"], _COL["c2"], _COL["c3"])
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def step_coefs(p_x=0.0, p_m=0.0, clip=None, a=0.0, b=0.0, c=(), s=0.0, dtype=torch.float64) -> torch.Tensor:
    """One coefficient row (K,) in COEF_NAMES order; clip None means no clamp (+inf). Rows stack into tables."""
    c = tuple(c)
    if len(c) > 3:
        raise ValueError(f"c holds at most 3 history coefficients, got {len(c)}")
    clip = math.inf if clip is None else float(clip)
    if not clip > 0:
        raise ValueError(f"clip must be positive (or None for no clamp), got {clip}")
    values = {"p_x": p_x, "p_m": p_m, "a": a, "b": b, "s": s, **{f"c{j + 1}": v for j, v in enumerate(c)}}
    row = []
    for name in COEF_NAMES:
        if name == "clip":
            row.append(clip)
            continue
        v = float(values.get(name, 0.0))
        if not math.isfinite(v):
            raise ValueError(f"coefficient {name} must be finite, got {v}")
        row.append(v)
    return torch.tensor(row, dtype=dtype)


def _check_index_tensor(name, t, device):
    if t.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {dtype_name(t.dtype)}")
    if t.numel() != 1 or t.ndim > 1:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_int(name, v, upper):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int or a 0-d integer tensor, got {type(v).__name__}")
    if not 0 <= v < upper:
        raise ValueError(f"{name} must be in [0, {upper}), got {v}")


def _coefficient_tensor(coefs, b, table, device):
    """coefs as an fp32 tensor on `device`, shape-checked: (K,) / (B, K), or (S, K) / (S, B, K) when `table`."""
    if not isinstance(coefs, torch.Tensor):
        try:
            coefs = torch.tensor([float(v) for v in coefs], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError("coefs must be a tensor or a sequence of K numbers") from None
    if coefs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"coefs must be float32 or float64, got {dtype_name(coefs.dtype)}")
    shape = tuple(coefs.shape)
    if table:
        ok = (coefs.ndim == 2 and shape[1] == K) or (coefs.ndim == 3 and shape[1:] == (b, K))
        expected = f"a table (S, {K}) or (S, {b}, {K}) (step_index is given)"
    else:
        ok = shape == (K,) or shape == (b, K)
        expected = f"({K},) or ({b}, {K}) (or a table (S, {K}) / (S, {b}, {K}) with step_index)"
    if not ok or (table and shape[0] == 0):
        raise ValueError(f"coefs has shape {shape}; expected {expected}")
    return coefs


def _check_coefficient_values(rows, history, has_noise):
    """Host-side checks of the coefficient rows that can be used (CPU coefficients only)."""
    clip_col, s_col = _COL["clip"], _COL["s"]
    for row in rows.reshape(-1, K).tolist():
        if not row[clip_col] > 0:
            raise ValueError(f"coefs: clip must be positive (+inf for no clamp), got {row[clip_col]}")
        if not all(math.isfinite(v) for k, v in enumerate(row) if k != clip_col):
            raise ValueError(f"coefs: every coefficient except clip must be finite, got {row}")
        for j, col in enumerate(_HISTORY_COLS):
            if row[col] != 0 and history[j] is None:
                raise ValueError(f"coefs use history h{j + 1} (c{j + 1} != 0) but history has no h{j + 1}")
        if row[s_col] != 0 and not has_noise:
            raise ValueError("coefs have s != 0 but neither noise nor seeds is given")


def fused_step(x, model_output, coefs, *, step_index=None, history=(), out=None, model_input=None, x0_out=None,
               noise=None, seeds=None, noise_step=None, model_output_cond=None, guidance_scale=None,
               noise_index=None, backend=None):
    """One solver update (module docstring). Returns `out` (a new tensor like x when not given).

    x: (B, ...) fp32/fp16/bf16; model_output (m), model_output_cond, history (h1, h2, h3; None entries
    allowed), noise, out, model_input, x0_out: shaped like x, any of fp32/fp16/bf16. All math in fp32.
    coefs: (K,) sequence or tensor, (B, K) tensor, or with step_index a table (S, K) / (S, B, K); float32/64.
    step_index: int or 0-d integer tensor on x.device selecting the table row (on device: no host sync).
    seeds: (B,) int64 on x.device (64-bit Philox keys); noise_step: int in [0, 2^32) or 0-d integer tensor
    on x.device (default step_index, else 0). CFG: m = m + guidance_scale*(model_output_cond - m).
    noise_index = (offset, plane): x is a slab of a larger volume (spatial parallelism): the element of channel c
    (x.shape[1]) at spatial index s draws the Philox index c·plane + offset + s, the volume's own, where plane is
    the volume's element count per channel (default (0, x's): the logical index).
    """
    check_float_tensor("x", x)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension of size >= 1, got shape {tuple(x.shape)}")
    b, device, shape = x.shape[0], x.device, tuple(x.shape)
    like_x = {"model_output": model_output}
    if model_output_cond is not None or guidance_scale is not None:
        if model_output_cond is None or guidance_scale is None:
            raise ValueError("classifier-free guidance needs both model_output_cond and guidance_scale")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise TypeError(f"guidance_scale must be a finite float, got {guidance_scale!r}")
        like_x["model_output_cond"] = model_output_cond
    if isinstance(history, torch.Tensor) or not isinstance(history, Sequence):
        raise TypeError("history must be a sequence (tuple/list) of up to 3 tensors")
    history = tuple(history)
    if len(history) > 3:
        raise ValueError(f"history holds at most 3 tensors (h1, h2, h3), got {len(history)}")
    history = history + (None,) * (3 - len(history))
    for j, h in enumerate(history):
        if h is not None:
            like_x[f"history[{j}]"] = h
    for name, t in (("noise", noise), ("out", out), ("model_input", model_input), ("x0_out", x0_out)):
        if t is not None:
            like_x[name] = t
    for name, t in like_x.items():
        check_float_tensor(name, t)
        check_shape(name, t, shape)
    check_same_device("x", x, **like_x)

    if seeds is not None:
        if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64:
            raise TypeError("seeds must be an int64 tensor of shape (B,)")
        check_shape("seeds", seeds, (b,))
        check_same_device("x", x, seeds=seeds)

    if isinstance(step_index, bool):
        raise TypeError("step_index must be an int or a 0-d integer tensor, got bool")
    coefs = _coefficient_tensor(coefs, b, step_index is not None, device)
    if isinstance(step_index, torch.Tensor):
        _check_index_tensor("step_index", step_index, device)
        if step_index.device.type == "cpu":
            _check_int("step_index", int(step_index), coefs.shape[0])
        step_index = step_index.reshape(()).to(torch.int64)
    elif step_index is not None:
        _check_int("step_index", step_index, coefs.shape[0])
        host_step = step_index
        coefs, step_index = coefs[host_step], None
        if noise_step is None:
            noise_step = host_step

    if noise_step is None:
        noise_step = step_index if step_index is not None else 0
    noise_step_tensor = None
    if isinstance(noise_step, torch.Tensor):
        _check_index_tensor("noise_step", noise_step, device)
        noise_step_tensor, noise_step = noise_step.reshape(()).to(torch.int64), 0
    else:
        _check_int("noise_step", noise_step, 2 ** 32)
    noise_offset, noise_plane = _noise_index(noise_index, x)

    if coefs.device.type == "cpu":
        used = coefs
        if step_index is not None and step_index.device.type == "cpu":
            used = coefs[int(step_index)]
        _check_coefficient_values(used, history, noise is not None or seeds is not None)
    coefs = coefs.to(device=device, dtype=torch.float32).contiguous()

    # One memory layout for every tensor the kernel touches: x's (contiguous if x is neither).
    layout = layout_of(x) if layout_of(x) != "strided" else "ncs"
    fmt = channels_last_format(x.ndim) if layout == "cl" else torch.contiguous_format

    def as_layout(t):
        return t if t is None or layout_of(t) == layout else t.contiguous(memory_format=fmt)

    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=device, memory_format=fmt)
    results = {"out": out, "model_input": model_input, "x0_out": x0_out}
    staged = {name: (t if t is None or layout_of(t) == layout
                     else torch.empty(shape, dtype=t.dtype, device=device, memory_format=fmt))
              for name, t in results.items()}
    x_k, m_k, mc_k = as_layout(x), as_layout(model_output), as_layout(model_output_cond)
    h_k = [as_layout(h) for h in history]
    noise_k = as_layout(noise)

    tensors = (x_k, m_k, mc_k, *h_k, noise_k, seeds, coefs, step_index, noise_step_tensor, *staged.values())
    name = backends.select("fused_step", backend, tensors, x=x_k)
    args = (x_k, m_k, mc_k, float(guidance_scale or 0.0), coefs, step_index, *h_k, noise_k, seeds, int(noise_step),
            noise_step_tensor, staged["out"], staged["model_input"], staged["x0_out"], name, noise_offset,
            noise_plane)
    if torch.compiler.is_compiling():
        torch.ops.pydiffmed.fused_step(*args)  # torch.compile must see one op
    else:
        _fused_step_run(*args)  # eager: skip the custom-op layer's per-call overhead
    for key, t in results.items():
        if t is not None and staged[key] is not t:
            t.copy_(staged[key])
    return out


@torch.library.custom_op("pydiffmed::fused_step", mutates_args=("out", "model_input", "x0_out"))
def _fused_step_op(x: torch.Tensor, model_output: torch.Tensor, model_output_cond: Optional[torch.Tensor],
                   guidance_scale: float, coefs: torch.Tensor, step_index: Optional[torch.Tensor],
                   h1: Optional[torch.Tensor], h2: Optional[torch.Tensor], h3: Optional[torch.Tensor],
                   noise: Optional[torch.Tensor], seeds: Optional[torch.Tensor], noise_step: int,
                   noise_step_tensor: Optional[torch.Tensor], out: torch.Tensor, model_input: Optional[torch.Tensor],
                   x0_out: Optional[torch.Tensor], backend: str, noise_offset: int = 0,
                   noise_plane: int = -1) -> None:
    _fused_step_run(x, model_output, model_output_cond, guidance_scale, coefs, step_index, h1, h2, h3, noise, seeds,
                    noise_step, noise_step_tensor, out, model_input, x0_out, backend, noise_offset, noise_plane)


def _fused_step_run(x, model_output, model_output_cond, guidance_scale, coefs, step_index, h1, h2, h3, noise, seeds,
                    noise_step, noise_step_tensor, out, model_input, x0_out, backend, noise_offset=0, noise_plane=-1):
    args = StepArgs(x, model_output, model_output_cond, guidance_scale, coefs, step_index, (h1, h2, h3), noise,
                    seeds, noise_step, noise_step_tensor, out, model_input, x0_out, noise_offset, noise_plane)
    backends.implementation("fused_step", backend).run(args)


@_fused_step_op.register_fake
def _(x, model_output, model_output_cond, guidance_scale, coefs, step_index, h1, h2, h3, noise, seeds, noise_step,
      noise_step_tensor, out, model_input, x0_out, backend, noise_offset=0, noise_plane=-1):
    return None


def _noise_index(noise_index, x):
    """(offset, plane) of fused_step's noise_index, checked; plane -1 stands for x's own (the default)."""
    if noise_index is None:
        return 0, -1
    spatial = x.numel() // x.shape[0] // (x.shape[1] if x.ndim > 1 and x.shape[1] else 1) if x.numel() else 0
    try:
        offset, plane = noise_index
    except (TypeError, ValueError):
        raise TypeError(f"noise_index must be a pair (offset, plane) of ints, got {noise_index!r}") from None
    for name, v in (("offset", offset), ("plane", plane)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"noise_index {name} must be an int, got {v!r}")
    offset, plane = int(offset), int(plane)
    if offset < 0 or offset + spatial > plane:
        raise ValueError(f"noise_index=({offset}, {plane}): the slab's {spatial} elements per channel must lie in "
                         f"[0, plane) of the volume's channel (0 <= offset, offset + {spatial} <= plane)")
    return offset, plane


class StepArgs:
    """Validated kernel arguments: every tensor shaped like x shares x's layout ('ncs' or 'cl')."""

    def __init__(self, x, m, m_cond, guidance, coefs, step_index, history, noise, seeds, noise_step,
                 noise_step_tensor, out, model_input, x0_out, noise_offset=0, noise_plane=-1):
        self.x, self.m, self.m_cond, self.guidance = x, m, m_cond, guidance
        self.coefs, self.step_index, self.history, self.noise, self.seeds = coefs, step_index, history, noise, seeds
        self.noise_step, self.noise_step_tensor = noise_step, noise_step_tensor
        self.out, self.model_input, self.x0_out = out, model_input, x0_out
        self.batch = x.shape[0]
        self.numel = x.numel() // self.batch                  # elements per sample
        self.channels_last = layout_of(x) == "cl"
        self.channels = x.shape[1] if x.ndim > 1 else 1
        self.spatial = self.numel // self.channels if self.channels else 0
        # Philox index of element (c, s): c·noise_plane + noise_offset + s (fused_step's noise_index)
        self.noise_offset = noise_offset
        self.noise_plane = self.spatial if noise_plane < 0 else noise_plane
        table = step_index is not None
        self.num_steps = coefs.shape[0] if table else 1
        per_sample = coefs.ndim == (3 if table else 2)
        self.batch_stride = K if per_sample else 0            # in elements of the fp32 coefficient tensor
        self.step_stride = (coefs.shape[1] * coefs.shape[2] if per_sample else K) if table else 0


# --- backends ------------------------------------------------------------------------------------------------

@backends.register("fused_step", "torch", dtypes=None, layouts=None)
def _run_torch(a: StepArgs):
    coefs = a.coefs
    if a.step_index is not None:
        index = a.step_index.reshape(1).clamp(0, a.num_steps - 1)
        coefs = coefs.index_select(0, index)[0]
    noise = a.noise
    if noise is None and a.seeds is not None:
        step = a.noise_step_tensor if a.noise_step_tensor is not None else a.noise_step
        index = None if (a.noise_offset, a.noise_plane) == (0, a.spatial) else (a.noise_offset, a.noise_plane)
        noise = reference.philox_normal(a.seeds, step, a.x.shape, a.x.device, index=index)
    guidance = a.guidance if a.m_cond is not None else None
    x_new, x0 = reference.fused_step(a.x, a.m, coefs, a.history, noise, a.m_cond, guidance)
    if a.x0_out is not None:
        a.x0_out.copy_(x0)
    if a.model_input is not None:
        a.model_input.copy_(x_new)
    a.out.copy_(x_new)


def _code(t):
    return backends.DTYPE_CODES[t.dtype] if t is not None else 0


def _ptr(t):
    return t.data_ptr() if t is not None else 0


@backends.register("fused_step", "cpu", symbols=("fused_step",))
def _run_cpu(a: StepArgs):
    from .. import _C

    h1, h2, h3 = a.history
    _C.fused_step(
        _ptr(a.x), _code(a.x), _ptr(a.m), _code(a.m), _ptr(a.m_cond), _code(a.m_cond), float(a.guidance),
        _ptr(h1), _code(h1), _ptr(h2), _code(h2), _ptr(h3), _code(h3), _ptr(a.noise), _code(a.noise),
        _ptr(a.seeds), _ptr(a.out), _code(a.out), _ptr(a.model_input), _code(a.model_input),
        _ptr(a.x0_out), _code(a.x0_out),
        _ptr(a.coefs), a.step_stride, a.batch_stride, _ptr(a.step_index), a.num_steps,
        a.noise_step, _ptr(a.noise_step_tensor), a.noise_offset, a.noise_plane,
        a.batch, a.channels, a.spatial, a.channels_last, torch.get_num_threads())


@backends.register("fused_step", "triton")
def _run_triton(a: StepArgs):
    from pydiffmed.triton_kernels.fused_step import fused_step_launch

    fused_step_launch(a)


@backends.register("fused_step", "cuda")
def _run_cuda(a: StepArgs):
    from .._cuda import fused_step_launch

    fused_step_launch(a)


# --- noise ---------------------------------------------------------------------------------------------------

_SEED_RANGE = "[-2**63, 2**63)"  # a Philox key is the seed's 64-bit two's complement


def philox_keys(seed, batch: int) -> torch.Tensor:
    """(B,) int64 CPU tensor of the per-sample Philox keys fused_step's noise uses: seed + arange(B) for an int
    (what the engine and the solvers do by default), or one seed per sample (sequence or integer tensor). Every
    key must lie in [-2**63, 2**63) (ValueError naming the seed)."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, a sequence of B ints or an int64 tensor (B,), got bool")
    if isinstance(seed, numbers.Integral):
        seed = int(seed)
        if not -2 ** 63 <= seed <= 2 ** 63 - batch:
            last = f" (samples use seeds {seed}..{seed + batch - 1})" if batch > 1 else ""
            raise ValueError(f"seed {seed} is out of range{last}: every per-sample seed must lie in {_SEED_RANGE}, "
                             f"the 64-bit Philox keys")
        return torch.arange(batch, dtype=torch.int64) + seed
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"seed tensor must have an integer dtype, got {dtype_name(seed.dtype)}")
        seeds = seed.reshape(-1).to(torch.int64)
    else:
        if hasattr(seed, "__len__") and len(seed) != batch:
            raise ValueError(f"seed gives {len(seed)} seeds for a batch of {batch} (one per sample, or one int)")
        try:
            values = list(itertools.islice(seed, batch + 1))  # never more than one too many
        except TypeError:
            raise TypeError(f"seed must be an int, a sequence of B ints or an int64 tensor, "
                            f"got {type(seed).__name__}") from None
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
            raise TypeError("seed sequence must hold ints")
        for v in values:
            if not -2 ** 63 <= int(v) < 2 ** 63:
                raise ValueError(f"seed {int(v)} is out of range: every per-sample seed must lie in {_SEED_RANGE}, "
                                 f"the 64-bit Philox keys")
        seeds = torch.tensor([int(v) for v in values], dtype=torch.int64)
    if seeds.numel() != batch:
        count = f"{seeds.numel()}" if seeds.numel() <= batch else "more"
        raise ValueError(f"seed gives {count} seeds for a batch of {batch} (one per sample, or one int)")
    return seeds


def philox_normal(seeds, step, shape, device=None, backend=None, noise_index=None) -> torch.Tensor:
    """Exactly the noise fused_step draws for these seeds and step word: an fp32 tensor of `shape` (B, ...)
    with z[b, i] = normal(Philox4x32-10(key=seeds[b], counter=(i//4 lo, i//4 hi, step, 0)))[lane i%4] for the
    logical row-major index i within sample b. The uniforms are u = ((w >> 9) + 1/2)·2^-23 (exact in fp32, in
    (0, 1)); Box-Muller maps lanes (0, 1) and (2, 3) to (r cos θ, r sin θ), r = sqrt(-2 ln u_a), θ = 2π u_b.
    noise_index = (offset, plane): the noise of a slab of a larger volume (see fused_step)."""
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.ndim != 1:
        raise TypeError("seeds must be a 1-D int64 tensor (B,)")
    shape = tuple(int(s) for s in shape)
    if not shape or shape[0] != seeds.shape[0]:
        raise ValueError(f"shape {shape} must start with the batch size {seeds.shape[0]} of seeds")
    device = torch.device(device) if device is not None else seeds.device
    seeds = seeds.to(device)
    if isinstance(step, torch.Tensor):
        step = step.to(device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    # Every coefficient but s is zero, so x and m are never read: `out` stands in for them.
    return fused_step(out, out, step_coefs(s=1.0), seeds=seeds, noise_step=step, out=out, noise_index=noise_index,
                      backend=backend)


# --- companion ops: dynamic thresholding and per-sample norms ----------------------------------------------

def dynamic_threshold(x, model_output, coefs, ratio=0.995, max_value=1.0, step_index=None, *,
                      model_output_cond=None, guidance_scale=None, backend=None) -> torch.Tensor:
    """Per-sample Imagen / diffusers dynamic-thresholding scale s (B,) fp32, without host sync:
    s = clamp(quantile(|x0|, ratio), 1, max_value) over each sample's elements, x0 = p_x*x + p_m*m unclipped
    (with CFG when model_output_cond is given). Use `apply_dynamic_threshold(row, s)` to fold it into the
    coefficient row passed to fused_step."""
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    if not (isinstance(max_value, (int, float)) and max_value >= 1.0):
        raise ValueError(f"max_value must be >= 1, got {max_value!r}")
    check_float_tensor("x", x)
    b = x.shape[0]
    estimate = _x0_row(coefs, b, step_index, x.device)
    x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    fused_step(x, model_output, estimate, step_index=step_index if isinstance(step_index, torch.Tensor) else None,
               out=x0, model_output_cond=model_output_cond, guidance_scale=guidance_scale, backend=backend)
    magnitude = x0.abs().reshape(b, -1)
    n = magnitude.shape[1]
    position = ratio * (n - 1)                 # torch.quantile's 'linear' interpolation between ranks
    lo = int(math.floor(position))
    hi = min(lo + 1, n - 1)
    frac = position - lo
    if n - lo <= hi + 1:                       # fewer values at or above rank lo: take the largest ones
        top = torch.topk(magnitude, n - lo, dim=1, largest=True, sorted=True).values   # descending
        v_lo, v_hi = top[:, n - 1 - lo], top[:, n - 1 - hi]
    else:
        bottom = torch.topk(magnitude, hi + 1, dim=1, largest=False, sorted=True).values  # ascending
        v_lo, v_hi = bottom[:, lo], bottom[:, hi]
    s = v_lo + frac * (v_hi - v_lo)
    return s.clamp(min=1.0, max=float(max_value))


def _x0_row(coefs, b, step_index, device):
    """The row (or table) computing the unclipped x0 as x' (a=0, b=1, no history, no noise, no clip)."""
    table = step_index is not None
    coefs = _coefficient_tensor(coefs, b, table, device)
    if isinstance(step_index, int) and not isinstance(step_index, bool):
        _check_int("step_index", step_index, coefs.shape[0])
        coefs, table = coefs[step_index], False
    keep = torch.zeros(K, dtype=coefs.dtype, device=coefs.device)
    keep[_COL["p_x"]] = keep[_COL["p_m"]] = 1.0
    row = coefs * keep
    row[..., _COL["clip"]] = math.inf
    row[..., _COL["b"]] = 1.0
    return row


def apply_dynamic_threshold(row, s) -> torch.Tensor:
    """Fold dynamic-threshold scales s (B,) into a coefficient row (K,) or (B, K): returns (B, K) with p_x and
    p_m divided by s and clip = 1, so fused_step's x0 = clamp(x0 / s, -1, 1) (= diffusers' clamp(x0, -s, s)/s)."""
    if not isinstance(s, torch.Tensor) or s.ndim != 1:
        raise TypeError("s must be a 1-D tensor (B,) from dynamic_threshold")
    row = torch.as_tensor(row, device=s.device)
    if row.dtype not in (torch.float32, torch.float64):
        row = row.double()
    if row.shape not in ((K,), (s.shape[0], K)):
        raise ValueError(f"row has shape {tuple(row.shape)}; expected ({K},) or ({s.shape[0]}, {K})")
    rows = row.to(s.device).expand(s.shape[0], K).clone()
    scale = s.to(rows.dtype)
    rows[:, _COL["p_x"]] = rows[:, _COL["p_x"]] / scale
    rows[:, _COL["p_m"]] = rows[:, _COL["p_m"]] / scale
    rows[:, _COL["clip"]] = 1.0
    return rows


def per_sample_norm(t, *, backend=None) -> torch.Tensor:
    """(B,) fp32 L2 norms of each sample of t (B, ...) over all its other dims (Langevin corrector step sizes).
    One pass, any float dtype, contiguous or channels_last (a sample is one contiguous block of memory either
    way); partial sums in fp32 per chunk, combined in fp64; no host sync."""
    check_float_tensor("t", t, FLOAT_DTYPES)
    if t.ndim < 1 or t.shape[0] < 1:
        raise ValueError(f"t must have a batch dimension of size >= 1, got shape {tuple(t.shape)}")
    if layout_of(t) == "strided":
        t = t.contiguous()
    name = backends.select("per_sample_norm", backend, (t,), t=t)
    return torch.ops.pydiffmed.per_sample_norm(t, name)


@torch.library.custom_op("pydiffmed::per_sample_norm", mutates_args=())
def _per_sample_norm_op(t: torch.Tensor, backend: str) -> torch.Tensor:
    if t.numel() == 0:
        return torch.zeros(t.shape[0], dtype=torch.float32, device=t.device)
    partial_sums = backends.implementation("per_sample_norm", backend).run(t.reshape(-1), t.shape[0])
    return partial_sums.double().sum(dim=1).sqrt().float()


@_per_sample_norm_op.register_fake
def _(t, backend):
    return t.new_empty((t.shape[0],), dtype=torch.float32)


# Each run returns fp32 partial sums of squares (B, P), P >= 1, for the flat sample blocks of `flat`.

@backends.register("per_sample_norm", "torch", dtypes=None, layouts=None)
def _norm_torch(flat, batch):
    return flat.reshape(batch, -1).float().square().sum(dim=1, keepdim=True)


@backends.register("per_sample_norm", "cpu", symbols=("per_sample_sumsq",))
def _norm_cpu(flat, batch):
    from .. import _C

    out = torch.empty((batch, 1), dtype=torch.float64)
    _C.per_sample_sumsq(flat.data_ptr(), _code(flat), batch, flat.numel() // batch, out.data_ptr(),
                        torch.get_num_threads())
    return out


@backends.register("per_sample_norm", "triton")
def _norm_triton(flat, batch):
    from pydiffmed.triton_kernels.fused_step import per_sample_sumsq_launch

    return per_sample_sumsq_launch(flat, batch)


@backends.register("per_sample_norm", "cuda")
def _norm_cuda(flat, batch):
    from .._cuda import per_sample_sumsq_launch

    return per_sample_sumsq_launch(flat, batch)
