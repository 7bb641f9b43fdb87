"""Exact computation of convolutional networks by depth slabs: halos for convolutions, whole-volume statistics for
GroupNorm (ARCHITECTURE §8).

Why this is exact. A convolution's output rows [a, b) depend only on its input rows [a·s − p, (b−1)·s − p + k):
the slab plus a halo, with zero rows where the halo leaves the volume (the zero padding of the whole-volume
convolution). A GroupNorm needs the mean and variance of the whole volume per (sample, group); those are
accumulated while the slabs of its input are produced (`GroupStats`, one fp64 count/mean/centred second moment
per slab, merged with Chan et al.'s parallel formula: the two-pass centred variance whatever the slab sizes),
and the normalisation (+ SiLU) is applied to each slab, halo included, as it is read by the next convolution
(`GroupNormApply`). No stored activation's slab is recomputed beyond its halo; the repeated work is normalising
the halo rows (elementwise) and the upsamplers' outputs (below). Networks with attention need every voxel at once
and cannot be cut this way.

What memory this bounds, honestly. Layers run one after another, and a GroupNorm cannot normalise any row before
the last row of its input exists, so most layers' *full* outputs are kept, on `storage`: the model's device, or
host memory ("cpu") when the device is the scarce one. Two things keep that small. A residual block writes its
result over its first convolution's output, slab by slab (`run_layer(out=x)` saves the few input rows a later
slab still reads), so a block holds its input and one activation of its output's size. And an upsampler's output
— the channels of the level below at 2^dims times its voxels, the largest activation of its level — is not
stored at all: it is a `LazyActivation`, recomputed slab by slab wherever it is read (its statistics sweep, the
next block's first convolution and its shortcut), each row once per sweep. That costs three sub-pixel
convolutions at the lower resolution instead of one. What the slabs bound is the *working* memory of every layer
on the compute device: the gathered input slab with its halo, the output slab,
the residual slab, the recomputed rows and the statistics temporaries — `SlabPlan` picks each layer's slab depth
so that this estimate stays under `max_memory`. Statistics and apply are the fused GroupNorm's two phases run
separately (ops.group_norm_stats, ops.group_norm_apply).

The pieces are model-agnostic: a network maps its blocks onto `ConvLayer`, `UpsampleConvLayer` and
`DeconvLayer` and calls `run_layer` (see models/autoencoder.py). Slabs cut the first spatial axis (depth; height
for 2-D networks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .models.layers import channels_last_format, conv_module, upsample_conv
from .ops._checks import layout_of


# --- whole-volume GroupNorm statistics ------------------------------------------------------------------------

class GroupStats:
    """Per-(sample, group) element count, mean and centred second moment (Σ(x − mean)²) of one activation,
    accumulated tile by tile in fp64. `merge` also combines the statistics of tiles held elsewhere (other
    ranks)."""

    def __init__(self, num_groups: int):
        self.num_groups = num_groups
        self.count = 0
        self.mean = None  # N×G fp64
        self.m2 = None  # N×G fp64

    def update(self, tile: torch.Tensor, bias_nc: torch.Tensor | None = None) -> None:
        """Add a tile N×C×(spatial...) of the activation (any layout, any float dtype), plus a per-(sample,
        channel) bias_nc if given."""
        self.merge(*self.tile_statistics(tile, self.num_groups, bias_nc))

    @staticmethod
    def tile_statistics(tile: torch.Tensor, num_groups: int, bias_nc: torch.Tensor | None = None):
        """(elements per group, N×G mean, N×G centred second moment) of tile + bias_nc, fp64: the statistics
        phase of the fused GroupNorm (ops.group_norm_stats)."""
        return ops.group_norm_stats(_dense(tile.detach()), num_groups,
                                    bias_nc=None if bias_nc is None else bias_nc.detach())

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan, Golub & LeVeque's pairwise update: exact in exact arithmetic, and free of the cancellation of
        E[x²] − E[x]²."""
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total

    def normalizer(self, norm: nn.GroupNorm, act: str | None = None) -> "GroupNormApply":
        """The apply phase of `norm` (its weight, bias, eps) with these statistics."""
        if self.count == 0:
            raise RuntimeError("GroupStats.normalizer before any tile was added")
        if norm.num_groups != self.num_groups:
            raise ValueError(f"statistics were gathered for {self.num_groups} groups, the norm has "
                             f"{norm.num_groups}")
        per_group = norm.num_channels // self.num_groups
        scale = (self.m2 / self.count + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        shift = (norm.bias.detach().double() if norm.bias is not None
                 else torch.zeros(norm.num_channels, dtype=torch.float64, device=scale.device))
        return GroupNormApply(self.mean.repeat_interleave(per_group, dim=1), scale,
                              shift.expand_as(scale).contiguous(), act)


class GroupNormApply:
    """y = act((x − mean)·scale + shift) per (sample, channel): GroupNorm's apply phase with given statistics
    (scale = γ/√(var + eps), shift = β; N×C each), computed in fp32 whatever the tensor dtype (ops.group_norm_apply).
    """

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: str | None):
        if act not in (None, "silu"):
            raise ValueError(f"act must be None or 'silu', got {act!r}")
        self.mean, self.scale, self.shift, self.act = mean, scale, shift, act

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Writes the normalised src into dst (same shape; dst may be a view into a larger buffer)."""
        src = _dense(src)
        if layout_of(dst) != "strided":
            ops.group_norm_apply(src, self.mean, self.scale, self.shift, act=self.act, out=dst)
        else:
            dst.copy_(ops.group_norm_apply(src, self.mean, self.scale, self.shift, act=self.act))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t, or a channels-last copy of t when its strides are neither layout (a depth slab of a batch > 1): the
    kernels then see every sample in the same layout whatever the batch, so a sample's bits do not depend on its
    companions (README, "Determinism")."""
    return t if layout_of(t) != "strided" else t.contiguous(memory_format=channels_last_format(t.ndim))


def sweep_stats(x, num_groups: int, rows: int, device=None) -> GroupStats:
    """Statistics of an activation (stored, or a LazyActivation), read slab by slab."""
    stats = GroupStats(num_groups)
    for a, b in slab_ranges(x.shape[2], rows):
        stats.update(read_rows(x, a, b, device or x.device))
    return stats


# --- activations that are not stored as they are --------------------------------------------------------------

class LazyActivation:
    """A layer's output that is not stored: its rows are recomputed from the layer's stored input whenever they are
    read. The slab decode keeps each upsampler's output this way: it is the largest activation of its level,
    and recomputing it (a sub-pixel convolution at the lower resolution) costs less than the memory it would take."""

    def __init__(self, layer, x: torch.Tensor, device):
        self.layer, self.input, self.device = layer, x, torch.device(device)
        self.shape = torch.Size((x.shape[0], layer.out_channels, *layer.out_spatial(x.shape[2:])))
        self.dtype, self.ndim = x.dtype, x.ndim
        self._kept, self._kept_from = None, 0  # the rows computed last: slabs read in order overlap by their halo

    def element_size(self) -> int:
        return self.input.element_size()

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) (within the volume) on the compute device. Rows the previous call computed are reused, so
        a sweep of slabs with halos computes each row once."""
        kept, kept_from = self._kept, self._kept_from
        kept_to = kept_from + (kept.shape[2] if kept is not None else 0)
        if kept is not None and kept_from <= lo < kept_to:
            if hi <= kept_to:
                return kept[:, :, lo - kept_from:hi - kept_from]
            head, first = kept[:, :, lo - kept_from:].clone(), kept_to  # aligned: short of the volume's end
        else:
            head, first = None, lo - lo % self.layer.align
        self._kept = kept = None  # freed before the new rows are computed
        end = min(hi + (-hi) % self.layer.align, self.shape[2])
        new = compute_slab(self.layer, self.input, first, end, device=self.device)
        if head is not None:
            new, first = torch.cat([head, new], dim=2), lo
        self._kept, self._kept_from = new, first
        return new[:, :, lo - first:hi - first]


class _OverwrittenInput:
    """The input of a layer that writes its output over it slab by slab (run_layer with out=x): rows already
    overwritten are read from the copy saved before the write (`save`), the others from x itself."""

    def __init__(self, x: torch.Tensor):
        self.x, self.shape, self.dtype, self.ndim = x, x.shape, x.dtype, x.ndim
        self.saved, self.saved_from, self.written_to = None, 0, 0
        self.element_size = x.element_size

    def save(self, lo: int, hi: int) -> None:
        """Rows [lo, hi) of x are about to be overwritten, and rows from `lo` are read again later."""
        self.saved, self.saved_from, self.written_to = self.x[:, :, lo:hi].clone(), lo, hi

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        if lo >= self.written_to:
            return self.x[:, :, lo:hi]
        if lo < self.saved_from:
            raise RuntimeError(f"rows from {lo} were overwritten and not saved (saved from {self.saved_from})")
        kept = self.saved[:, :, lo - self.saved_from:min(hi, self.written_to) - self.saved_from]
        return kept if hi <= self.written_to else torch.cat([kept, self.x[:, :, self.written_to:hi]], dim=2)


def read_rows(x, lo: int, hi: int, device) -> torch.Tensor:
    """Rows [lo, hi) (within the volume) of an activation on `device`: a stored tensor, a LazyActivation or an
    input being overwritten."""
    if isinstance(x, (LazyActivation, _OverwrittenInput)):
        return x.rows(lo, hi).to(device)
    return x[:, :, lo:hi].to(device)


# --- layers computed by slabs ------------------------------------------------------------------------------------

class ConvLayer:
    """conv(pad(x)) for a k-wide, stride-s convolution (`conv`: nn.Conv2d/3d, groups = dilation = 1). `pads` is
    the zero padding per spatial axis as (before, after); default: the convolution's own symmetric padding.
    Depth padding comes from the slab gather (zero rows outside the volume); symmetric padding of the other axes
    from the convolution itself (free); asymmetric padding (MONAI's downsampler) from the gather (a copy)."""

    align = 1  # output slab boundaries are multiples of this

    def __init__(self, conv: nn.Module, pads=None):
        if len(set(conv.kernel_size)) != 1 or len(set(conv.stride)) != 1:
            raise ValueError("ConvLayer needs the same kernel size and stride on every axis")
        self.conv = conv
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        self.pads = [tuple(p) for p in pads] if pads is not None else [(p, p) for p in conv.padding]
        self.conv_padding = [0] + [before if before == after else 0 for before, after in self.pads[1:]]
        self.gather_pads = [(0, 0) if before == after else (before, after) for before, after in self.pads[1:]]
        self.out_channels = conv.out_channels

    def out_spatial(self, spatial):
        return tuple((n + before + after - self.kernel) // self.stride + 1
                     for n, (before, after) in zip(spatial, self.pads))

    def in_rows(self, a: int, b: int) -> tuple[int, int]:
        """The input rows (possibly outside [0, D): zero rows) that output rows [a, b) read."""
        return a * self.stride - self.pads[0][0], (b - 1) * self.stride - self.pads[0][0] + self.kernel

    def compute(self, slab, add=None):
        return conv_module(slab, self.conv, add=add, padding=self.conv_padding)


class UpsampleConvLayer:
    """conv(nearest_upsample_×2(x)) for a 3×3(×3), padding-1 `conv` (layers.upsample_conv): output rows
    [2i, 2j) read low-resolution rows [i − 1, j + 1)."""

    align = 2

    def __init__(self, conv: nn.Module):
        self.conv = conv
        self.out_channels = conv.out_channels
        self.gather_pads = [(0, 0)] * (conv.weight.ndim - 3)

    def out_spatial(self, spatial):
        return tuple(2 * n for n in spatial)

    def in_rows(self, a, b):
        return a // 2 - 1, b // 2 + 1

    def compute(self, slab, add=None):
        if add is not None:
            raise ValueError("UpsampleConvLayer takes no residual")
        return upsample_conv(slab, self.conv, padding=[0] + [1] * (slab.ndim - 3))


class DeconvLayer:
    """A stride-2 transposed convolution: kernel 2 (MONAI's, no padding): output rows [2i, 2j) read input rows
    [i, j), no halo; kernel 3 with padding 1 and output padding 1 (MAISI's): output rows [2i, 2j) read input rows
    [i − 1, j + 1) (zero rows outside the volume add nothing), computed without depth padding and cropped."""

    align = 2

    def __init__(self, deconv: nn.Module):
        kernel, stride = tuple(deconv.kernel_size), tuple(deconv.stride)
        dims = len(kernel)
        if stride != (2,) * dims or kernel not in ((2,) * dims, (3,) * dims):
            raise ValueError("DeconvLayer needs stride 2 and kernel_size 2 (no padding) or 3")
        self.kernel = kernel[0]
        expected = ((0,) * dims, (0,) * dims) if self.kernel == 2 else ((1,) * dims, (1,) * dims)
        if (tuple(deconv.padding), tuple(deconv.output_padding)) != expected:
            raise ValueError(f"DeconvLayer with kernel_size {self.kernel} needs padding and output_padding "
                             f"{expected[0][0]}")
        self.deconv = deconv
        self.out_channels = deconv.out_channels
        self.gather_pads = [(0, 0)] * (deconv.weight.ndim - 3)

    def out_spatial(self, spatial):
        return tuple(2 * n for n in spatial)

    def in_rows(self, a, b):
        return (a // 2, b // 2) if self.kernel == 2 else (a // 2 - 1, b // 2 + 1)

    def compute(self, slab, add=None):
        if add is not None:
            raise ValueError("DeconvLayer takes no residual")
        if self.kernel == 2:
            return self.deconv(slab)
        conv = F.conv_transpose3d if slab.ndim == 5 else F.conv_transpose2d
        rest = (1,) * (slab.ndim - 3)
        y = conv(slab, self.deconv.weight, self.deconv.bias, stride=2, padding=(0, *rest),
                 output_padding=(0, *rest))
        # local output row r is padded row 2·lo + r − 1 of the whole volume, lo = a/2 − 1: rows [a, b) start at 3
        return y[:, :, 3:3 + 2 * (slab.shape[2] - 2)]


class InterpolateUpsampleConvLayer(UpsampleConvLayer):
    """conv(linear_upsample_×2(x)) for a 3×3(×3), padding-1 `conv` (MAISI's decoder: F.interpolate(mode="trilinear"
    or "bilinear", align_corners=False), then the convolution). Output rows [2i, 2j) read upsampled rows
    [2i − 1, 2j + 1), which read low-resolution rows [i − 1, j + 1), as for the nearest upsampler. The
    interpolation clamps at the volume's ends (not zeros), so `compute` is told where its slab lies (`wants_rows`)
    and the input depth `size`."""

    wants_rows = True

    def __init__(self, conv: nn.Module, mode: str, size: int):
        super().__init__(conv)
        self.mode, self.size = mode, size

    def compute(self, slab, add=None, rows=None):
        if add is not None:
            raise ValueError("InterpolateUpsampleConvLayer takes no residual")
        lo, hi = rows
        if lo < 0:  # the gathered zero row stands for the clamped edge: replicate row 0
            slab = torch.cat([slab[:, :, 1:2], slab[:, :, 1:]], dim=2)
        if hi > self.size:
            slab = torch.cat([slab[:, :, :-1], slab[:, :, -2:-1]], dim=2)
        # upsampled rows [2·lo, 2·hi); the first and last were clamped at the slab's edge: drop them
        up = F.interpolate(slab, scale_factor=2.0, mode=self.mode)[:, :, 1:-1]
        if lo < 0 or hi > self.size:  # upsampled rows −1 and 2·size are the convolution's zero padding
            up = up.clone()
            if lo < 0:
                up[:, :, 0] = 0
            if hi > self.size:
                up[:, :, -1] = 0
        return conv_module(up, self.conv, padding=[0] + [1] * (slab.ndim - 3))


def slab_ranges(size: int, rows: int, align: int = 1) -> list[tuple[int, int]]:
    """[a, b) ranges covering [0, size) with at most `rows` rows each (at least `align`), boundaries at multiples
    of `align`; the last range may be shorter."""
    if rows < 1:
        raise ValueError(f"slab rows must be ≥ 1, got {rows}")
    step = max(align, rows - rows % align)
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def gather(x, lo: int, hi: int, pads, norm: GroupNormApply | None, device) -> torch.Tensor:
    """Rows [lo, hi) of the activation x (see read_rows) on `device`, normalised by `norm` if given, with zero
    rows where [lo, hi) leaves the volume and `pads` ((before, after) per non-depth axis) zeros around the other
    axes. A view of a stored x when nothing needs to change."""
    size = x.shape[2]
    inner_lo, inner_hi = max(lo, 0), min(hi, size)
    raw = read_rows(x, inner_lo, inner_hi, device)
    pads = [(inner_lo - lo, hi - inner_hi), *pads]
    memory_format = channels_last_format(x.ndim)
    if not any(before or after for before, after in pads):
        if norm is None:
            return raw
        out = torch.empty(raw.shape, dtype=raw.dtype, device=raw.device, memory_format=memory_format)
        norm(raw, out)
        return out
    shape = (*raw.shape[:2], *(n + before + after for n, (before, after) in zip(raw.shape[2:], pads)))
    out = torch.empty(shape, dtype=raw.dtype, device=raw.device, memory_format=memory_format).zero_()
    interior = out[(slice(None), slice(None), *(slice(before, before + n)
                                                for n, (before, _) in zip(raw.shape[2:], pads)))]
    if norm is None:
        interior.copy_(raw)
    else:
        norm(raw, interior)
    return out


def compute_slab(layer, x, a: int, b: int, *, norm: GroupNormApply | None = None, add=None, device):
    """Output rows [a, b) of `layer` on the activation x: the input rows they read, gathered (and normalised by
    `norm`), computed with the residual slab `add` fused in."""
    lo, hi = layer.in_rows(a, b)
    where = {"rows": (lo, hi)} if getattr(layer, "wants_rows", False) else {}
    return layer.compute(gather(x, lo, hi, layer.gather_pads, norm, device), add, **where)


def run_layer(layer, x, *, rows: int, norm: GroupNormApply | None = None, add=None, out=None,
              stats: GroupStats | None = None, device=None, storage=None, memory_format=None) -> torch.Tensor:
    """The layer's full output, computed slab by slab: for each output slab [a, b), gather the input rows it
    reads (normalised by `norm`), compute, add `add(a, b)` (a residual slab, fused into the convolution), update
    `stats` with the result and store it into `out` (allocated on `storage` when not given). out=x writes the
    output over its input (same shape): the input rows a later slab still reads are saved before each write.
    x may be a LazyActivation. device: where slabs are computed (default x's device)."""
    device = torch.device(device) if device is not None else x.device
    storage = torch.device(storage) if storage is not None else x.device
    spatial = layer.out_spatial(x.shape[2:])
    source = x
    if out is x:
        if tuple(spatial) != tuple(x.shape[2:]) or layer.out_channels != x.shape[1]:
            raise ValueError("out=x needs an output of the input's shape")
        source = _OverwrittenInput(x)
    elif out is None:
        out = torch.empty((x.shape[0], layer.out_channels, *spatial), dtype=x.dtype, device=storage,
                          memory_format=memory_format or channels_last_format(x.ndim))
    for a, b in slab_ranges(spatial[0], rows, layer.align):
        y = compute_slab(layer, source, a, b, norm=norm, add=None if add is None else add(a, b), device=device)
        if stats is not None:
            stats.update(y)
        if source is not x:
            source.save(max(a, min(layer.in_rows(b, b + 1)[0], b)), b)
        out[:, :, a:b].copy_(y)
    return out


# --- the one planner ---------------------------------------------------------------------------------------------

class SlabPlan:
    """Slab depth per layer: `tile` rows for every layer, or the most rows whose working-memory estimate
    (`working_bytes`) fits `max_memory` bytes; a budget below a layer's smallest slab (one row, two for the
    ×2 upsamplers) is an error naming what that slab needs. `peak_estimate` records the largest estimate of any
    layer planned so far (for `tile` plans too)."""

    def __init__(self, tile: int | None = None, max_memory: int | None = None):
        if tile is None and max_memory is None:
            raise ValueError("give tile (rows per slab) or max_memory (bytes)")
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
            raise ValueError(f"tile must be a positive int (slab depth in rows), got {tile!r}")
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
        self.tile, self.max_memory = tile, max_memory
        self.peak_estimate = 0  # the largest working_bytes of any layer run under this plan

    def rows(self, layer, x: torch.Tensor, *, norm: bool, add: bool, stats: bool, device=None) -> int:
        """Rows per slab of `layer` on the stored input x, slabs computed on `device` (default x's)."""
        size = layer.out_spatial(x.shape[2:])[0]
        if self.tile is not None:
            rows = self.tile
        else:
            smallest = working_bytes(layer, x, layer.align, norm=norm, add=add, stats=stats, device=device)
            if smallest > self.max_memory:
                raise ValueError(f"max_memory={self.max_memory} bytes is below the smallest slab of a "
                                 f"{type(layer).__name__} on input {tuple(x.shape)} ({smallest} bytes for "
                                 f"{layer.align} row(s))")
            rows, low, high = layer.align, layer.align, size
            while low <= high:  # the largest row count within budget (estimates grow with rows)
                mid = (low + high) // 2
                if working_bytes(layer, x, mid, norm=norm, add=add, stats=stats, device=device) <= self.max_memory:
                    rows, low = mid, mid + 1
                else:
                    high = mid - 1
        rows = min(max(rows, layer.align), size + size % layer.align)
        self.peak_estimate = max(self.peak_estimate,
                                 working_bytes(layer, x, rows, norm=norm, add=add, stats=stats, device=device))
        return rows


def working_bytes(layer, x: torch.Tensor, rows: int, *, norm: bool, add: bool, stats: bool, device=None) -> int:
    """Estimated bytes a slab of `rows` output rows needs on the compute device: input slab with halo and its
    normalised copy, output (twice for the sub-pixel upsampler: phases, then interleaved), residual slab; off the
    CPU (where the GroupNorm phases are torch code) fp32 temporaries of half-precision slabs for the apply and the
    statistics."""
    n, c_in = x.shape[:2]
    item = x.element_size()
    lo, hi = layer.in_rows(0, rows - rows % layer.align or layer.align)
    producing = 0  # a LazyActivation input: what computing its rows needs
    if isinstance(x, LazyActivation):
        producing = working_bytes(x.layer, x.input, hi - lo + x.layer.align, norm=False, add=False, stats=False,
                                  device=device)
    in_plane = math.prod(s + before + after for s, (before, after) in zip(x.shape[3:], layer.gather_pads))
    in_elems = n * c_in * (hi - lo) * in_plane
    out_elems = n * layer.out_channels * rows * math.prod(layer.out_spatial(x.shape[2:])[1:])
    half_temporaries = item < 4 and torch.device(device or x.device).type != "cpu"
    total = in_elems * item * (2 if norm or n > 1 else 1) + (in_elems * 4 if norm and half_temporaries else 0)
    total += out_elems * item * (2 if type(layer) is UpsampleConvLayer else 1)
    if isinstance(layer, InterpolateUpsampleConvLayer):  # the upsampled slab, before the convolution
        total += in_elems * item * 2 ** (x.ndim - 2)
    total += out_elems * item if add else 0
    total += out_elems * 4 if stats and half_temporaries else 0
    return total + producing


__all__ = ["ConvLayer", "DeconvLayer", "GroupNormApply", "GroupStats", "InterpolateUpsampleConvLayer",
           "LazyActivation", "SlabPlan", "UpsampleConvLayer", "compute_slab", "gather", "read_rows", "run_layer",
           "slab_ranges", "sweep_stats", "working_bytes"]
