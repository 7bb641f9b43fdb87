"""GroupNorm(+bias_nc, +SiLU) in Triton: y = act((x + bias_nc - mean) · rstd · w + b), statistics in fp32.

Three launches, all reading both memory layouts through strides:
1. `_stats_kernel`, grid (chunks, channel blocks, N): per-channel partials of x over one chunk of the spatial
   positions (a split reduction: several chunks per sample when N·C alone would not fill the GPU): a pivot
   (the chunk's first value), the mean of x - pivot and the centred M2. Each tile's mean and M2 are exact in
   registers; tiles merge with Chan's formula. The pivot keeps a large offset (x + 1000) from costing digits.
2. `_finalize_kernel`, grid (N·G,): combines a group's per-(channel, chunk) partials in fp64 (mean, then the
   centred M2: two passes over the few partials; bias_nc only moves channel means) and writes per-(n, c)
   center (as hi + lo floats), scale and shift — the scheme of csrc/common/group_norm.h.
3. `_apply_kernel`, grid (spatial blocks, channel blocks, N): y = act(((x - center_hi) - center_lo) · scale +
   shift), reading and writing either layout (a transposing tile for token-major output from NCS input).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from pydiffmed.ops._checks import check_group_norm_launch

# Elements per tile (BLOCK_S · BLOCK_C) and the per-chunk floor (in tiles) of the split reduction.
_TILE = 4096
_MIN_TILES_PER_CHUNK = 2
_MAX_CHUNKS = 256


@triton.jit
def _stats_kernel(x_ptr, part_ptr, C, S, chunk_s, num_chunks, part_stride, stride_n, stride_c, stride_s,
                  BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    # part_ptr: 3 planes of part_stride floats, entry (n, chunk, c): pivot, mean of (x - pivot), M2.
    k = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    s_begin = k * chunk_s
    s_end = tl.minimum(s_begin + chunk_s, S)
    base = x_ptr + n.to(tl.int64) * stride_n + offs_c.to(tl.int64) * stride_c  # [BLOCK_C]
    pivot = tl.load(base + s_begin.to(tl.int64) * stride_s, mask=mask_c, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < s_end)[:, None] & mask_c[None, :]
        v = tl.load(base[None, :] + offs_s.to(tl.int64)[:, None] * stride_s, mask=mask, other=0.0)
        v = tl.where(mask, v.to(tl.float32) - pivot[None, :], 0.0)
        # every tile before this one was full, so the running count is s0 - s_begin
        count = (s0 - s_begin).to(tl.float32)
        tile_count = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(v, axis=0) / tile_count
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        delta = tile_mean - mean
        weight = tile_count / (count + tile_count)
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * count * weight
    out = part_ptr + (n.to(tl.int64) * num_chunks + k) * C + offs_c
    tl.store(out, pivot, mask=mask_c)
    tl.store(out + part_stride, mean, mask=mask_c)
    tl.store(out + 2 * part_stride, m2, mask=mask_c)


@triton.jit
def _load_partials(part_ptr, part_stride, bnc_ptr, rows, n, C, offs_c, mask, mask_c, HAS_BNC: tl.constexpr):
    """A [chunks, channels] tile of partials: the chunk means of x + bias_nc in fp64, and the M2s."""
    ptrs = part_ptr + rows[:, None] + offs_c[None, :]
    mean = tl.load(ptrs, mask=mask, other=0.0).to(tl.float64)
    mean += tl.load(ptrs + part_stride, mask=mask, other=0.0).to(tl.float64)
    if HAS_BNC:
        mean += tl.load(bnc_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float64)[None, :]
    m2 = tl.load(ptrs + 2 * part_stride, mask=mask, other=0.0)
    return mean, m2


@triton.jit
def _finalize_kernel(part_ptr, w_ptr, b_ptr, bnc_ptr, params_ptr, C, S, G, CG, NC, chunk_s, num_chunks,
                     part_stride, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_BNC: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
    # Combines the group's partials in fp64 (a few values per group), two passes: mean, then centred M2.
    # Writes params planes (center_hi, center_lo, scale, shift) with center = mean - bias_nc split in two
    # floats, so the apply pass keeps full fp32 accuracy on data with a large offset.
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < num_chunks
    count_k = tl.where(mask_k, tl.minimum(chunk_s, S - offs_k * chunk_s), 0).to(tl.float64)
    total = tl.sum(count_k) * CG
    rows = (n.to(tl.int64) * num_chunks + offs_k) * C
    first_c = g * CG
    acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float64)
    for c0 in range(0, CG, BLOCK_CG):
        offs_c = first_c + c0 + tl.arange(0, BLOCK_CG)
        mask_c = offs_c < first_c + CG
        mask = mask_k[:, None] & mask_c[None, :]
        mean_kc, m2_kc = _load_partials(part_ptr, part_stride, bnc_ptr, rows, n, C, offs_c, mask, mask_c,
                                        HAS_BNC)
        acc += tl.where(mask, mean_kc * count_k[:, None], 0.0)
    mean = tl.sum(acc) / total
    acc = tl.zeros([BLOCK_K, BLOCK_CG], dtype=tl.float64)
    for c0 in range(0, CG, BLOCK_CG):
        offs_c = first_c + c0 + tl.arange(0, BLOCK_CG)
        mask_c = offs_c < first_c + CG
        mask = mask_k[:, None] & mask_c[None, :]
        mean_kc, m2_kc = _load_partials(part_ptr, part_stride, bnc_ptr, rows, n, C, offs_c, mask, mask_c,
                                        HAS_BNC)
        d = tl.where(mask, mean_kc - mean, 0.0)
        acc += m2_kc.to(tl.float64) + d * d * count_k[:, None]
    var = tl.maximum(tl.sum(acc) / total, 0.0).to(tl.float32)
    rstd = tl.rsqrt(var + eps)
    for c0 in range(0, CG, BLOCK_CG):
        offs_c = first_c + c0 + tl.arange(0, BLOCK_CG)
        mask_c = offs_c < first_c + CG
        center = tl.zeros([BLOCK_CG], dtype=tl.float64) + mean
        if HAS_BNC:
            center -= tl.load(bnc_ptr + n * C + offs_c, mask=mask_c, other=0.0).to(tl.float64)
        center_hi = center.to(tl.float32)
        center_lo = (center - center_hi.to(tl.float64)).to(tl.float32)
        scale = tl.zeros([BLOCK_CG], dtype=tl.float32) + rstd
        if HAS_W:
            scale *= tl.load(w_ptr + offs_c, mask=mask_c, other=0.0)
        shift = tl.zeros([BLOCK_CG], dtype=tl.float32)
        if HAS_B:
            shift += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0)
        p = n * C + offs_c
        tl.store(params_ptr + p, center_hi, mask=mask_c)
        tl.store(params_ptr + NC + p, center_lo, mask=mask_c)
        tl.store(params_ptr + 2 * NC + p, scale, mask=mask_c)
        tl.store(params_ptr + 3 * NC + p, shift, mask=mask_c)


@triton.jit
def _round_to_bf16(v):
    # Round to nearest even explicitly: the interpreter's fp32 -> bf16 cast truncates. The result is exactly
    # representable, so the cast after it is exact on every platform. NaN is kept as is.
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, u.to(tl.float32, bitcast=True))


@triton.jit
def _apply_kernel(x_ptr, y_ptr, params_ptr, C, S, NC, sx_n, sx_c, sx_s, sy_n, sy_c, sy_s,
                  SILU: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_s < S)[:, None] & mask_c[None, :]
    p = n * C + offs_c
    center_hi = tl.load(params_ptr + p, mask=mask_c, other=0.0)
    center_lo = tl.load(params_ptr + NC + p, mask=mask_c, other=0.0)
    scale = tl.load(params_ptr + 2 * NC + p, mask=mask_c, other=0.0)
    shift = tl.load(params_ptr + 3 * NC + p, mask=mask_c, other=0.0)
    s64 = offs_s.to(tl.int64)[:, None]
    c64 = offs_c.to(tl.int64)[None, :]
    n64 = n.to(tl.int64)
    v = tl.load(x_ptr + n64 * sx_n + c64 * sx_c + s64 * sx_s, mask=mask, other=0.0).to(tl.float32)
    out = ((v - center_hi[None, :]) - center_lo[None, :]) * scale[None, :] + shift[None, :]
    if SILU:
        out = out * tl.sigmoid(out)
    if ROUND_BF16:
        out = _round_to_bf16(out)
    tl.store(y_ptr + n64 * sy_n + c64 * sy_c + s64 * sy_s, out.to(y_ptr.dtype.element_ty), mask=mask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _strides(channels_last: bool, n, c, s):
    """(sample, channel, spatial) strides of a dense N×C×S tensor in NCS or channels-last memory order."""
    return (s * c, 1, c) if channels_last else (c * s, s, 1)


def _parallel_units(device: torch.device) -> int:
    """How many programs fill the device: 4 per SM on a GPU; the interpreter runs programs one at a time."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def group_norm_launch(x, y, num_groups, w, b, bias_nc, eps, silu, *, x_channels_last, y_channels_last,
                      num_chunks=None):
    """Write act(GroupNorm(x + bias_nc) · w + b) into y.

    x: N×C×spatial (fp32/fp16/bf16), dense contiguous or channels-last; y: the same shape and dtype in either
    order, or the token-major N×S×C tensor (y_channels_last=True). w, b: fp32 C-vectors or None; bias_nc:
    fp32 contiguous N×C or None. num_chunks forces the number of spatial chunks of the split reduction.
    Launches only (no host synchronisation); partial buffers come from torch on x's device.
    """
    n, c, s = check_group_norm_launch(x, y, num_groups, w, b, bias_nc, x_channels_last, y_channels_last)
    sx, sy = _strides(x_channels_last, n, c, s), _strides(y_channels_last, n, c, s)
    if x.numel() == 0:
        return
    if n > 65535:  # the grid's third axis
        raise ValueError(f"x has {n} samples; the Triton kernels take at most 65535")
    device = x.device
    cg = c // num_groups

    # Stats tiles run along the contiguous dimension: spatial for NCS, channels for channels-last.
    block_c = min(_next_pow2(c), 64 if x_channels_last else 4)
    block_s = _TILE // block_c
    c_blocks = triton.cdiv(c, block_c)
    if num_chunks is None:
        wanted = triton.cdiv(_parallel_units(device), n * c_blocks)
        num_chunks = max(1, min(wanted, _MAX_CHUNKS, s // (_MIN_TILES_PER_CHUNK * block_s)))
    num_chunks = max(1, min(int(num_chunks), s))
    chunk_s = triton.cdiv(s, num_chunks)
    if chunk_s > block_s:
        chunk_s = triton.cdiv(chunk_s, block_s) * block_s
    num_chunks = triton.cdiv(s, chunk_s)

    part_stride = n * num_chunks * c
    partial = torch.empty((3, part_stride), dtype=torch.float32, device=device)
    _stats_kernel[(num_chunks, c_blocks, n)](x, partial, c, s, chunk_s, num_chunks, part_stride, *sx,
                                             BLOCK_S=block_s, BLOCK_C=block_c)

    params = torch.empty((4, n * c), dtype=torch.float32, device=device)
    block_k = _next_pow2(num_chunks)
    block_cg = max(1, min(_next_pow2(cg), _TILE // block_k))
    dummy = partial  # stands in for absent optional pointers (never read: HAS_* is False)
    _finalize_kernel[(n * num_groups,)](
        partial, dummy if w is None else w, dummy if b is None else b,
        dummy if bias_nc is None else bias_nc, params, c, s, num_groups, cg, n * c, chunk_s, num_chunks,
        part_stride, float(eps), HAS_W=w is not None, HAS_B=b is not None, HAS_BNC=bias_nc is not None,
        BLOCK_K=block_k, BLOCK_CG=block_cg)

    if x_channels_last and y_channels_last:
        block_c = min(_next_pow2(c), 64)
    elif x_channels_last or y_channels_last:  # a transpose: square-ish tiles
        block_c = min(_next_pow2(c), 32)
    else:
        block_c = min(_next_pow2(c), 4)
    block_s = _TILE // block_c if x_channels_last == y_channels_last else 64
    grid = (triton.cdiv(s, block_s), triton.cdiv(c, block_c), n)
    _apply_kernel[grid](x, y, params, c, s, n * c, *sx, *sy, SILU=bool(silu),
                        ROUND_BF16=y.dtype == torch.bfloat16, BLOCK_S=block_s,
                        BLOCK_C=block_c)
