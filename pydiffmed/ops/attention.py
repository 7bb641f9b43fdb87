"""`attention`: softmax(q·kᵀ·scale)·v over volume tokens (ARCHITECTURE §4), without an N×N matrix on the fast path.

Layouts: "bhnd" (B×heads×N×d) or "bnhd" (B×N×heads×d, the token-major layout a fused QKV projection produces:
q, k and v may be strided views into one B×N×3×heads×d tensor, and the output B×N×heads×d is the B×N×C
token-major activation). Both are handled as strided views, never copied. Self- and cross-attention
(N_q ≠ N_kv). fp16/bf16/fp32 in, output in the input dtype, softmax and accumulation in fp32.

Backends: `triton` (FlashAttention-2-style kernel, triton_kernels/attention.py) for CUDA tensors; `cpu`: the
bf16 flash attention of pydiffmed._C (csrc/cpu/attention.cpp) where it is the faster kernel (`cpu_kernel_declines`
says where not), else torch SDPA, torch's own fused flash kernel on CPU; `torch`: SDPA. `cuda` has no attention
kernel: Triton is the CUDA path for this op.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import backends
from ._checks import check_float_tensor, check_same_device, dtype_name, needs_custom_op

LAYOUTS = ("bhnd", "bnhd")


def attention(q, k, v, *, scale=None, layout="bhnd", backend=None):
    """Scaled dot-product attention softmax(q·kᵀ·scale)·v, no mask, no dropout.

    q: B×heads×N_q×d ("bhnd") or B×N_q×heads×d ("bnhd"); k, v: the same with N_kv tokens (N_kv ≥ 1).
    q, k, v share dtype (fp32/fp16/bf16) and device; any strides. scale defaults to 1/√d.
    Returns a new contiguous tensor in q's layout and dtype. Differentiable (backward recomputes with torch SDPA).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D ({_layout_words(layout)}); got shape {tuple(t.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(t.dtype)} but q has dtype {dtype_name(q.dtype)}")
    check_same_device("q", q, k=k, v=v)
    qh, kh, vh = (_as_bhnd(t, layout) for t in (q, k, v))
    batch, heads, _, head_dim = qh.shape
    n_kv = kh.shape[2]
    expected_kv = (batch, heads, n_kv, head_dim)
    for name, t in (("k", kh), ("v", vh)):
        if tuple(t.shape) != expected_kv:
            raise ValueError(f"{name} has shape {tuple(_from_bhnd(t, layout).shape)} but q has shape "
                             f"{tuple(q.shape)}; in layout {layout!r} ({_layout_words(layout)}) k and v need "
                             f"q's batch, heads and d, and the same token count as each other")
    if head_dim < 1:
        raise ValueError(f"q has head dimension d = 0 (shape {tuple(q.shape)})")
    if n_kv < 1:
        raise ValueError(f"k and v have no tokens (shape {tuple(k.shape)}); softmax over zero keys is undefined")
    if scale is None:
        scale = head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    name = backends.select("attention", backend, (q, k, v), q=qh, k=kh, v=vh)
    args = (q, k, v, float(scale), layout == "bnhd", name)
    if needs_custom_op(q, k, v):
        return torch.ops.pydiffmed.attention(*args)
    return _attention_run(*args)


def _layout_words(layout):
    return "B×N×heads×d" if layout == "bnhd" else "B×heads×N×d"


def _as_bhnd(t, layout):
    return t.transpose(1, 2) if layout == "bnhd" else t


_from_bhnd = _as_bhnd  # the transpose is its own inverse


def _attention_run(q, k, v, scale, tokens_before_heads, backend):
    out = _empty_output(q)
    layout = "bnhd" if tokens_before_heads else "bhnd"
    if out.numel():
        backends.implementation("attention", backend).run(
            _as_bhnd(q, layout), _as_bhnd(k, layout), _as_bhnd(v, layout), _as_bhnd(out, layout), scale)
    return out


@torch.library.custom_op("pydiffmed::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tokens_before_heads: bool,
                  backend: str) -> torch.Tensor:
    return _attention_run(q, k, v, scale, tokens_before_heads, backend)


@_attention_op.register_fake
def _(q, k, v, scale, tokens_before_heads, backend):
    return _empty_output(q)


def _setup_backward(ctx, inputs, output):
    q, k, v, scale, tokens_before_heads, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale, ctx.layout = scale, "bnhd" if tokens_before_heads else "bhnd"


def _backward(ctx, grad_out):
    """Gradients by recomputing the forward with torch SDPA (the sampler itself never needs them)."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        out = F.scaled_dot_product_attention(*(_as_bhnd(t, ctx.layout) for t in (q, k, v)), scale=ctx.scale)
        grads = torch.autograd.grad(out, (q, k, v), _as_bhnd(grad_out, ctx.layout))
    return (*grads, None, None, None)


_attention_op.register_autograd(_backward, setup_context=_setup_backward)


def _empty_output(q):
    return q.new_empty(q.shape)  # contiguous in the caller's layout


# --- backends: each run(q, k, v, out, scale) gets B×heads×N×d views (any strides) and fills out ---------------

def _run_sdpa(q, k, v, out, scale):
    out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale))


backends.register("attention", "torch", dtypes=None, layouts=None)(_run_sdpa)

CPU_KERNEL_MAX_HEAD_DIM = 128


@functools.lru_cache(maxsize=1)
def _cpu_kernel_isa_reason() -> str | None:
    if not cpu_kernel_supported():
        return "this CPU lacks AVX-512 BF16, or pydiffmed._C was built without the kernel (`make build`)"
    if backends.cpu_bf16_feature() == "amx_bf16":
        # torch's SDPA can compute on AMX tiles there; the kernel (AVX-512 dot products) has not been timed against
        # it on such a CPU yet: benchmarks/bench_attention.py times both
        return "this CPU has AMX, which torch SDPA can use"
    return None


def cpu_kernel_supported() -> bool:
    """Whether this CPU and build run `cpu_kernel` at all (AVX-512 BF16), fast or not."""
    try:
        from pydiffmed import _C

        return bool(_C.attention_bf16_supported())
    except (ImportError, AttributeError):
        return False


def cpu_kernel_declines(q, scale) -> str | None:
    """Why the `cpu` backend runs torch SDPA rather than pydiffmed._C's bf16 flash attention on these inputs;
    None: it runs the kernel (bf16, d <= 128, scale > 0, a CPU with AVX-512 BF16 and without AMX)."""
    if q.dtype != torch.bfloat16:
        return f"the kernel is bf16 only, not {dtype_name(q.dtype)}"
    if q.shape[-1] > CPU_KERNEL_MAX_HEAD_DIM:
        return f"head dimension d = {q.shape[-1]} > {CPU_KERNEL_MAX_HEAD_DIM}"
    if scale <= 0:
        return f"scale = {scale} is not positive"
    return _cpu_kernel_isa_reason()


def cpu_bf16_route() -> str:
    """What the cpu backend runs for bf16 attention on this machine (`pydiffmed info` prints it)."""
    why = _cpu_kernel_isa_reason()
    return "pydiffmed's kernel (AVX-512 BF16, csrc/cpu/attention.cpp)" if why is None else f"torch SDPA ({why})"


def cpu_kernel(q, k, v, out, scale):
    """pydiffmed._C's bf16 flash attention on B×heads×N×d views (any strides; out's d-stride 1), whatever
    cpu_kernel_declines says of its speed; the `cpu` backend and bench_attention call it."""
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.dtype != torch.bfloat16 or t.device.type != "cpu":
            raise TypeError(f"cpu_kernel takes bf16 CPU tensors; {name} is {dtype_name(t.dtype)} on {t.device}")
    kv_shape = (*q.shape[:2], k.shape[2], q.shape[-1]) if q.ndim == 4 and k.ndim == 4 else None
    if kv_shape is None or tuple(k.shape) != kv_shape or tuple(v.shape) != kv_shape or out.shape != q.shape:
        raise ValueError(f"cpu_kernel needs B×heads×N×d q and out, and k, v of shape B×heads×N_kv×d; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, out {tuple(out.shape)}")
    _launch_cpu_kernel(q, k, v, out, scale)


def _launch_cpu_kernel(q, k, v, out, scale):
    """cpu_kernel without its checks, for inputs `attention` has validated."""
    from pydiffmed import _C

    batch, heads, n_q, head_dim = q.shape
    _C.attention_bf16(q.data_ptr(), q.stride(), k.data_ptr(), k.stride(), v.data_ptr(), v.stride(), out.data_ptr(),
                      out.stride(), batch, heads, n_q, k.shape[2], head_dim, scale, torch.get_num_threads())


@backends.register("attention", "cpu", layouts=None, symbols=("attention_bf16",))
def _run_cpu(q, k, v, out, scale):
    if cpu_kernel_declines(q, scale) is None:
        _launch_cpu_kernel(q, k, v, out, scale)
    else:
        _run_sdpa(q, k, v, out, scale)


# The Triton kernel's limits (pydiffmed/triton_kernels/attention.py: d <= 128, MAX_GRID_Y; its
# unsupported_reasons also checks the strides, which only the inputs tell). bf16 tl.dot gives wrong results
# under the Triton interpreter: bf16 runs on GPU only.
_TRITON_LIMITS = (backends.Limit("head_dim", "head dimension d", 128, lambda q, **_: q.shape[-1]),
                  backends.Limit("batch_heads", "B·heads", 65535, lambda q, **_: q.shape[0] * q.shape[1]))


def _triton_reasons(q, k, v):
    from pydiffmed.triton_kernels.attention import unsupported_reasons

    return unsupported_reasons(q, k, v)


@backends.register("attention", "triton", layouts=None, limits=_TRITON_LIMITS,
                   interpreter_dtypes=(torch.float32, torch.float16), reasons=_triton_reasons)
def _run_triton(q, k, v, out, scale):
    from pydiffmed.triton_kernels.attention import attention_launch

    attention_launch(q, k, v, out, scale)
