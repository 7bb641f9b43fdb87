"""Convolution building blocks of the UNet, written for inference speed on CPU and GPU.

Why not plain `F.conv3d` on CPU: torch's CPU dispatcher sends a batch-1 3×3×3 convolution to oneDNN only when
N·C·D·H > 20480; every smaller one (a 64-channel 16³ or 8³ level) runs `slow_conv3d` (im2col + GEMM) at about a
third of oneDNN's rate, and contiguous NCDHW input makes oneDNN reorder the activation around every call. Here
activations stay channels_last(_3d) and CPU convolutions call oneDNN directly (`aten.mkldnn_convolution`), with
the residual add fused into the convolution's epilogue where torch exposes oneDNN's binary post-op. On CUDA (or
where oneDNN is missing) the same functions fall back to `F.conv*d`, which cuDNN runs in channels_last.

Nearest-neighbour ×2 upsampling followed by a 3×3(×3) convolution is computed as one 2×2(×2) convolution with
2^dims·C_out output channels on the low-resolution input (each output phase sees only two distinct input
values per axis), followed by one strided copy that interleaves the phases: the upsampled tensor is never
built and the convolution does 27·8 / (8·8) ≈ 3.4× fewer multiply-adds.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..ops._checks import channels_last_format, tensor_state

_HAS_CONV_ADD = hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_HAS_WEIGHT_PACKING = _HAS_CONV_ADD and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=channels_last_format(x.ndim))


@functools.lru_cache(maxsize=None)
def _onednn_dtypes() -> frozenset:
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return frozenset(dtypes)


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn_path(x, weight, bias=None, add=None) -> bool:
    return x.device.type == "cpu" and x.dtype in _onednn_dtypes() and not _needs_autograd(x, weight, bias, add)


def convolution(x, weight, bias=None, stride=1, padding=0, add=None, out=None):
    """conv(x, weight, bias) (+ add), groups = dilation = 1, 2-D or 3-D. Output channels_last when x is.
    padding: an int, or one int per spatial axis (the tiled decode pads depth itself: partition.py).
    out: write the result there (oneDNN writes straight into a dense channels_last `out`, a depth slice of a
    batch-1 volume included, instead of allocating)."""
    dims = x.ndim - 2
    onednn = _onednn_path(x, weight, bias, add)
    if out is not None and not (onednn and _HAS_CONV_ADD
                                and out.is_contiguous(memory_format=channels_last_format(out.ndim))):
        return out.copy_(convolution(x, weight, bias, stride, padding, add))
    if onednn:
        pads = list(padding) if isinstance(padding, (tuple, list)) else [padding] * dims
        strides, dilation = [stride] * dims, [1] * dims
        x = to_channels_last(x)
        weight = packed_weight(weight, pads, strides, x.shape)
        if out is not None:  # out = (add or 0), then oneDNN adds the convolution into it in place
            if add is None:
                out.zero_()
            else:
                out.copy_(add)
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                out, x, weight, bias, pads, strides, dilation, 1, "add", None, None, [], None)
        if add is not None and _HAS_CONV_ADD:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, to_channels_last(add), weight, bias, pads, strides, dilation, 1, "add", None, None, [], None)
        if _HAS_WEIGHT_PACKING:
            y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pads, strides, dilation, 1, "none", [], "")
        else:
            y = torch.ops.aten.mkldnn_convolution(x, weight, bias, pads, strides, dilation, 1)
    elif _wrong_bf16_weight_gradient(x, weight):
        with torch.autocast("cpu", enabled=False):
            y = F.conv3d(x.float(), weight.float(), None if bias is None else bias.float(), stride,
                         padding).to(torch.bfloat16)
    else:
        y = (F.conv3d if dims == 3 else F.conv2d)(x, weight, bias, stride, padding)
    return y if add is None else y + add


def _wrong_bf16_weight_gradient(x, weight) -> bool:
    """Whether torch's CPU convolution would compute this weight's gradient wrong: in bf16 (bf16 input or CPU
    autocast to bf16), 3-D, input depth below the kernel's (the 2³ deepest level of a UNet trained on 8³ volumes).
    Measured with torch 2.13 (oneDNN 3.12, kernel jit_bf16:avx512_core_bf16) on an AMD Zen 4: such gradients were
    wrong in every trial, NaN in some, for 16 channels and more; fp32 and fp16 were right. The convolution then runs
    in fp32 (the volume is tiny) and its output is rounded to bf16, as the bf16 one would be."""
    if x.device.type != "cpu" or x.ndim != 5 or x.shape[2] >= weight.shape[2]:
        return False
    if not _needs_autograd(weight):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == weight.dtype == torch.bfloat16  # mixed dtypes: F.conv3d's own error


# weight -> ((tensor_state, input shape, padding, stride), oneDNN's packed copy): one copy per weight,
# for the input shape it last saw (a sampler's shape does not change; a tiled decode repacks for its last slab),
# so packing costs at most the convolution weights' bytes once more (memory.estimate_memory counts it). A side
# table, not an attribute of the weight or its module: packed (opaque) tensors can be neither copied nor saved,
# and a model must stay deep-copyable and picklable.
_packed_weights = WeakIdKeyDictionary()


def packed_weight(weight, pads, strides, x_shape):
    """`weight` reordered once into the blocked layout oneDNN picks for a convolution of an input of `x_shape`,
    and kept while the weight lives unchanged. A plain weight is reordered inside every call instead: measured
    on this project's CPU, bf16 128→128 channels 3×3×3 at 8³, 0.41 ms per call plain against 0.24 ms packed
    (64→64 at 32³: 2.70 against 2.64 ms). The same kernel runs either way, so the results are the same bits."""
    if not _HAS_WEIGHT_PACKING:
        return weight
    key = (tensor_state(weight), tuple(x_shape), tuple(pads), tuple(strides))
    entry = _packed_weights.get(weight)
    if entry is None or entry[0] != key:
        entry = _packed_weights[weight] = (key, None)  # the old copy is freed before the new one is made
        entry = _packed_weights[weight] = (key, torch.ops.mkldnn._reorder_convolution_weight(
            weight, pads, strides, [1] * len(pads), 1, list(x_shape)))
    return entry[1]


def conv_module(x, conv: nn.Module, add=None, padding=None, out=None):
    """`convolution` with an nn.Conv2d/Conv3d's parameters (and its padding unless `padding` is given)."""
    if padding is None:
        padding = conv.padding[0] if isinstance(conv.padding, tuple) else conv.padding
    weight = conv.weight
    if _pads_input_channels(x, weight, conv.bias, add):
        # oneDNN's CPU kernels for 1 input channel (3 in bf16/fp16) run 2-10× slower than for one channel
        # more (measured: 1×1×64³ → 32 channels, bf16: 54 ms vs 4.7 ms); a zero channel is almost free.
        x = torch.cat([x, x.new_zeros((x.shape[0], 1, *x.shape[2:]))], dim=1)
        weight = derived(conv, "_pdm_padded_input", (conv.weight,), lambda: to_channels_last(
            torch.cat([conv.weight, conv.weight.new_zeros((conv.weight.shape[0], 1, *conv.weight.shape[2:]))], 1)))
    return convolution(x, weight, conv.bias, conv.stride[0], padding, add, out)


def _pads_input_channels(x, weight, bias, add) -> bool:
    channels = x.shape[1]
    return (channels == 1 or (channels == 3 and x.dtype != torch.float32)) and _onednn_path(x, weight, bias, add)


class Conv(nn.Module):
    """MONAI's `Convolution(conv_only=True)` as the UNet uses it: one child `conv`, so the state-dict keys are
    `<name>.conv.weight` / `<name>.conv.bias`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None):
        super().__init__()
        conv_type = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        padding = kernel_size // 2 if padding is None else padding
        self.conv = conv_type(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x, add=None):
        return conv_module(x, self.conv, add)


class FastConv3d(nn.Conv3d):
    """nn.Conv3d whose forward takes the oneDNN channels_last path; `accelerate()` swaps a model's convolutions
    to this class in place (same parameters, same state-dict keys)."""

    def forward(self, x):
        if self.groups != 1 or self.padding_mode != "zeros" or set(self.dilation) != {1} or not _uniform(self):
            return super().forward(x)
        return conv_module(x, self)


class FastConv2d(nn.Conv2d):
    forward = FastConv3d.forward


def _uniform(conv) -> bool:
    padding = conv.padding
    return (not isinstance(padding, str) and len(set(padding)) == 1 and len(set(conv.stride)) == 1)


# --- batch invariance on the CPU ------------------------------------------------------------------------------
# On the CPU a GEMM's rounding depends on its row count (MKL takes a GEMV path for one row, other blockings for
# a few rows) and a vectorised elementwise loop rounds its scalar tail differently from its body. So an op over
# a few rows (the time embedding, B×channels) or a GEMM over B·N token rows would give sample k a result that
# depends on how many companions it has. Computed per sample, sample k always meets the same code path: the
# promise "volume k of a batch equals sampling it alone" holds bit for bit. On CUDA these are the plain batched
# ops (see docs/RELIABILITY.md for what holds there).

def per_sample(fn, *tensors):
    """fn(*tensors) on the CPU computed for each sample (index 0 of every tensor; None passes through) alone and
    concatenated; on other devices fn(*tensors) as is."""
    first = next(t for t in tensors if t is not None)
    if first.device.type != "cpu" or first.shape[0] == 1:
        return fn(*tensors)
    return torch.cat([fn(*(None if t is None else t[i:i + 1] for t in tensors)) for i in range(first.shape[0])])


_FEW_ROWS = 4


def linear(x, weight, bias=None, owner: nn.Module | None = None):
    """F.linear(x, weight, bias) for x of shape B×…×C_in, each sample's rows in a GEMM of their own on the CPU.
    There a bf16/fp16 GEMM of a few rows (the time-embedding projections: one row) costs ~30 µs of call overhead
    and an fp32 one a few, so those run in fp32 (the same products, accumulated in fp32 as the half GEMM does)
    and round to x's dtype once. owner: the module holding weight and bias, which then keeps their fp32 copies
    (`float32_parameters`)."""
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() <= _FEW_ROWS * x.shape[0] * x.shape[-1]):
        weight32, bias32 = float32_parameters(owner, weight, bias)
        return per_sample(lambda sample: F.linear(sample.float(), weight32, bias32), x).to(x.dtype)
    return per_sample(lambda sample: F.linear(sample, weight, bias), x)


class PerSampleLinear(nn.Linear):
    """nn.Linear computing each sample alone on the CPU (`linear`); `accelerate()` swaps a model's Linears to
    this class in place (same parameters, same state-dict keys)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias, owner=self)


def add_linear_(out_rows, x, weight, batch: int):
    """out_rows += x @ weightᵀ for row-major (B·N)×C tensors, each sample's N rows in a GEMM of their own on the
    CPU; in place."""
    if out_rows.device.type != "cpu":
        return out_rows.addmm_(x, weight.t())
    n = out_rows.shape[0] // batch
    for i in range(batch):
        out_rows[i * n:(i + 1) * n].addmm_(x[i * n:(i + 1) * n], weight.t())
    return out_rows


# --- cached derived weights ----------------------------------------------------------------------------------

def derived(owner: nn.Module, name: str, sources, build):
    """build() cached on `owner` until any source tensor is replaced, modified in place, moved or cast.
    With autograd active on a source the result is rebuilt every call (so it stays differentiable)."""
    if _needs_autograd(*sources):
        return build()
    key = tuple(tensor_state(t) for t in sources)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


def float32_parameters(owner: nn.Module | None, weight, bias=None):
    """(weight, bias) as fp32 (None stays None). Half-precision parameters are cast once and the copies cached
    on `owner` (`derived`), not cast in every call: a bf16 UNet forward has about a hundred such small casts
    (GroupNorm affines, time projections). Without an owner they are cast each call."""
    if weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        return weight, bias
    build = lambda: (weight.float(), None if bias is None else bias.float())  # noqa: E731
    if owner is None:
        return build()
    return derived(owner, "_pdm_float32_parameters", (weight,) if bias is None else (weight, bias), build)


def norm_affine(norm: nn.Module):
    """A GroupNorm module's (weight, bias) as fp32, cached for a half-precision model (`float32_parameters`);
    (None, None) without affine parameters."""
    if norm.weight is None:
        return None, None
    return float32_parameters(norm, norm.weight, norm.bias)


# --- nearest ×2 upsampling fused with the following 3×3(×3) convolution -----------------------------------------

# Per axis, output phase a of the upsampled-then-convolved signal reads low-res offsets (a - 1, a) through a
# 2-tap kernel: phase 0 gets (w[0], w[1] + w[2]), phase 1 gets (w[0] + w[1], w[2]).
_PHASE_TAPS = torch.tensor([[[1., 0., 0.], [0., 1., 1.]],
                            [[1., 1., 0.], [0., 0., 1.]]], dtype=torch.float64)  # [phase, tap, kernel index]


def _subpixel_weights(weight, bias):
    dims = weight.ndim - 2
    c_out, c_in = weight.shape[:2]
    w = weight.detach().to(torch.float64)
    taps = _PHASE_TAPS.to(weight.device)
    if dims == 3:
        combined = torch.einsum("asp,btq,cur,oipqr->abcoistu", taps, taps, taps, w)
    else:
        combined = torch.einsum("asp,btq,oipq->aboist", taps, taps, w)
    combined = combined.reshape(2 ** dims * c_out, c_in, *([2] * dims)).to(weight.dtype)
    combined = combined.contiguous(memory_format=channels_last_format(weight.ndim))
    big_bias = None if bias is None else bias.repeat(2 ** dims)
    return combined, big_bias


def upsample_conv(x, conv: nn.Module, padding=1):
    """conv(nearest_upsample_×2(x)) for a 3×3(×3), stride-1, padding-1 `conv`, without the upsampled tensor.
    padding (int or one per axis) is the low-resolution padding: 0 on an axis means x carries one extra row at
    each end of it (a halo: the tiled decode's depth slabs) and the output covers only the rows between."""
    if _needs_autograd(x, conv.weight, conv.bias):
        if padding != 1:
            raise ValueError("upsample_conv with a halo (padding != 1) is inference-only")
        return conv_module(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv)
    weight, bias = derived(conv, "_pdm_subpixel", (conv.weight, conv.bias) if conv.bias is not None
                           else (conv.weight,), lambda: _subpixel_weights(conv.weight, conv.bias))
    # B × (2^dims·C) × (n+1)^dims; one name, so that a copy to channels-last frees the convolution's own output
    z = to_channels_last(convolution(to_channels_last(x), weight, bias, 1, padding))
    return interleave_phases(z, conv.weight.shape[0])


@functools.cache
def _cpu_interleave():
    """pydiffmed._C.subpixel_interleave; None where the extension is not built (torch's copy then does it)."""
    try:
        from .. import _C
    except ImportError:
        return None
    return getattr(_C, "subpixel_interleave", None)


def interleave_phases(z, channels: int):
    """The upsampled volume from upsample_conv's phase convolution z (channels-last, B × (2^dims·C) × (n+1)^dims):
    B × C × (2n)^dims, channels-last. On the CPU one pass of pydiffmed._C; elsewhere torch's 8-D strided copy."""
    kernel = _cpu_interleave() if z.device.type == "cpu" and z.element_size() in (2, 4) else None
    if kernel is None:
        return _interleave_phases_torch(z, channels)
    low = [size - 1 for size in z.shape[2:]]
    depth = low[0] if z.ndim == 5 else 1
    out = torch.empty((z.shape[0], channels, *(2 * n for n in low)), dtype=z.dtype,
                      memory_format=channels_last_format(z.ndim))
    kernel(z.data_ptr(), out.data_ptr(), z.element_size(), z.shape[0], depth, low[-2], low[-1], channels,
           z.ndim == 5, torch.get_num_threads())
    return out


def _interleave_phases_torch(z, c: int):
    dims = z.ndim - 2
    b = z.shape[0]
    low = [size - 1 for size in z.shape[2:]]  # n low-resolution rows per axis give n + 1 rows of z
    zs = z.stride()
    spatial_strides = [zs[2 + i] for i in range(dims)]
    # Phase (a, b, c) lives at channel block ((a·2 + b)·2 + c); its value for low-res voxel i sits at z[i + a].
    phase_strides = [c * 2 ** (dims - 1 - i) for i in range(dims)]
    sizes, strides = [b], [zs[0]]
    for i in range(dims):
        sizes += [low[i], 2]
        strides += [spatial_strides[i], spatial_strides[i] + phase_strides[i]]
    sizes.append(c)
    strides.append(1)
    interleaved = z.as_strided(sizes, strides)
    out = torch.empty((b, c, *(2 * n for n in low)), dtype=z.dtype, device=z.device,
                      memory_format=channels_last_format(z.ndim))
    out_view = out.movedim(1, -1).view(sizes)
    out_view.copy_(interleaved)
    return out


def upsample_nearest(x):
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def avg_pool_2x(x):
    """2×2(×2) average pooling, stride 2; also for CPU half types, which torch's CPU avg_pool3d lacks."""
    if x.device.type != "cpu" or x.dtype == torch.float32:
        return (F.avg_pool3d if x.ndim == 5 else F.avg_pool2d)(x, kernel_size=2, stride=2)
    blocks = x
    for axis in range(2, x.ndim):
        blocks = blocks.unflatten(2 * axis - 2, (x.shape[axis] // 2, 2))
    pooled = blocks.mean(dim=tuple(range(3, 2 * x.ndim - 2, 2)), dtype=torch.float32).to(x.dtype)
    return to_channels_last(pooled)


__all__ = ["Conv", "FastConv2d", "FastConv3d", "PerSampleLinear", "add_linear_", "avg_pool_2x", "channels_last_format",
           "conv_module", "convolution", "derived", "float32_parameters", "linear", "norm_affine", "per_sample",
           "to_channels_last", "upsample_conv", "upsample_nearest"]
