"""Triton kernel of pydiffmed.ops.fused_step (ARCHITECTURE §4), with the Philox4x32-10 + Box-Muller mapping of
csrc/common/philox.h (same constants, same fp32 operation order; launched without multiply-add fusion, so it
reproduces the CPU kernel and the torch reference bit for bit).

Grid: (blocks of BLOCK logical elements, samples). A program holds its elements as a [BLOCK/4, 4] tile: one
row per Philox block, one column per lane, so each row's four normals come from one Philox call.
"""
from __future__ import annotations

import triton
import triton.language as tl

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    m0 = tl.full(c0.shape, PHILOX_M0, tl.uint32)
    m1 = tl.full(c0.shape, PHILOX_M1, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _neg_two_log(w):
    """-2 ln(u) for u = ((w >> 9) + 1/2)·2^-23 (see philox.h: neg_two_log)."""
    u = ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    ix = u.to(tl.uint32, bitcast=True) - 0x3F3504F3
    k = (ix.to(tl.int32, bitcast=True) >> 23).to(tl.float32)
    m = ((ix & 0x007FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True)
    f = m - 1.0
    s = tl.div_rn(f, f + 2.0)
    z = s * s
    p = z * 0.2222222238779068 + 0.2857142984867096
    p = p * z + 0.4000000059604645
    p = p * z + 0.6666666865348816
    p = p * z + 2.0
    ln_u = k * 0.693145751953125 + (k * 1.428606765330187e-06 + s * p)
    return ln_u * -2.0


@triton.jit
def _cos_sin_2pi(w):
    """cos and sin of 2π u for u = ((w >> 9) + 1/2)·2^-23 (see philox.h: philox_cos_sin)."""
    odd = (((w >> 9) << 1) | 1).to(tl.int32)
    q = (odd + (1 << 21)) >> 22
    t = (odd - (q << 22)).to(tl.float32) * 2.384185791015625e-07
    t2 = t * t
    sp = t2 * 0.00016044118092395365 - 0.004681753925979137
    sp = sp * t2 + 0.07969262450933456
    sp = sp * t2 - 0.6459640860557556
    sin_phi = t * 1.5707963705062866 + (t * -4.371138828673793e-08 + (t * t2) * sp)
    cp = t2 * -2.520204179745633e-05 + 0.0009192602592520416
    cp = cp * t2 - 0.020863480865955353
    cp = cp * t2 + 0.25366950035095215
    cp = cp * t2 - 1.2337005138397217
    cos_phi = cp * t2 + 1.0
    quadrant = q & 3
    odd_quadrant = (quadrant & 1) == 1
    c0 = tl.where(odd_quadrant, sin_phi, cos_phi)
    s0 = tl.where(odd_quadrant, cos_phi, sin_phi)
    c = tl.where((quadrant == 1) | (quadrant == 2), -c0, c0)
    s = tl.where(quadrant >= 2, -s0, s0)
    return c, s


@triton.jit
def _box_muller(w_radius, w_angle):
    r = tl.sqrt_rn(_neg_two_log(w_radius))
    c, s = _cos_sin_2pi(w_angle)
    return r * c, r * s


@triton.jit
def philox_normal_tile(seed, step, block):
    """The four normals of each Philox block in `block` (int64 tensor): four fp32 tensors shaped like it.
    seed: int64 scalar (64-bit key); step: uint32 scalar (counter word 2)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros(block.shape, tl.uint32) + step
    c3 = tl.zeros(block.shape, tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def _cast_for(v, ptr):
    """v (fp32) in the element type of ptr, rounded to nearest even. bf16 is rounded by hand: the interpreter's
    conversion truncates, and this keeps every backend's bf16 outputs identical (pdm_common.h f32_to_bf16)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, rounded)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)


@triton.jit
def _term(coef, v):
    return tl.where(coef != 0.0, coef * v, 0.0)


@triton.jit
def _load_if(ptr, offset, mask, coef):
    """ptr[offset] as fp32 where mask and coef != 0; 0 elsewhere, where nothing is read. (The scalar test joins
    the mask through tl.where: `tensor & scalar` of int1 fails in the interpreter.)"""
    return tl.load(ptr + offset, mask=tl.where(coef != 0.0, mask, False), other=0.0).to(tl.float32)


@triton.jit
def _missing_term(coef):
    nan = tl.full([], 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    return tl.where(coef != 0.0, nan, 0.0)


@triton.jit(do_not_specialize=["guidance", "noise_step_value"])
def _fused_step_kernel(x_ptr, m_ptr, mc_ptr, h1_ptr, h2_ptr, h3_ptr, noise_ptr, seeds_ptr, out_ptr, mi_ptr, x0_ptr,
                       coef_ptr, step_index_ptr, noise_step_ptr, guidance, noise_step_value, step_stride,
                       batch_stride, num_steps, numel, channels, spatial, noise_offset, noise_plane,
                       HAS_MC: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr, HAS_H3: tl.constexpr,
                       HAS_NOISE: tl.constexpr, HAS_SEEDS: tl.constexpr, HAS_MI: tl.constexpr,
                       HAS_X0: tl.constexpr, HAS_STEP_INDEX: tl.constexpr, HAS_NOISE_STEP_PTR: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr, NOISE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    step = 0
    if HAS_STEP_INDEX:
        step = tl.minimum(tl.maximum(tl.load(step_index_ptr), 0), num_steps - 1)
    row = coef_ptr + step * step_stride + b * batch_stride
    p_x = tl.load(row + 0)
    p_m = tl.load(row + 1)
    clip = tl.load(row + 2)
    a = tl.load(row + 3)
    b_coef = tl.load(row + 4)
    c1 = tl.load(row + 5)
    c2 = tl.load(row + 6)
    c3 = tl.load(row + 7)
    s = tl.load(row + 8)

    block = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)            # Philox block per row
    lane = tl.arange(0, 4)
    index = block[:, None] * 4 + lane[None, :]                                  # logical index in the sample
    mask = index < numel
    if CHANNELS_LAST:
        channel = index // spatial
        offset = b * numel + (index - channel * spatial) * channels + channel
    else:
        offset = b * numel + index

    x = tl.load(x_ptr + offset, mask=tl.where(a != 0.0, mask, tl.where(p_x != 0.0, mask, False)),
                other=0.0).to(tl.float32)
    m = _load_if(m_ptr, offset, mask, p_m)
    if HAS_MC:
        m = m + guidance * (_load_if(mc_ptr, offset, mask, p_m) - m)
    x0 = _term(p_x, x) + _term(p_m, m)
    x0 = tl.where(x0 > clip, clip, tl.where(x0 < -clip, -clip, x0))

    acc = _term(a, x) + _term(b_coef, x0)
    if HAS_H1:
        acc = acc + _term(c1, _load_if(h1_ptr, offset, mask, c1))
    else:
        acc = acc + _missing_term(c1)
    if HAS_H2:
        acc = acc + _term(c2, _load_if(h2_ptr, offset, mask, c2))
    else:
        acc = acc + _missing_term(c2)
    if HAS_H3:
        acc = acc + _term(c3, _load_if(h3_ptr, offset, mask, c3))
    else:
        acc = acc + _missing_term(c3)
    if HAS_NOISE:
        acc = acc + _term(s, _load_if(noise_ptr, offset, mask, s))
    elif HAS_SEEDS:
        if HAS_NOISE_STEP_PTR:
            step_word = (tl.load(noise_step_ptr) & 0xFFFFFFFF).to(tl.uint32)
        else:
            step_word = (noise_step_value.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
        if NOISE_INDEX:  # a slab of a larger volume: element (c, s) draws index c·noise_plane + noise_offset + s
            channel = index // spatial
            volume_index = channel * noise_plane + noise_offset + (index - channel * spatial)
            z0, z1, z2, z3 = philox_normal_tile(tl.load(seeds_ptr + b), step_word, volume_index // 4)
            col = volume_index % 4
            z = tl.where(col == 0, z0, tl.where(col == 1, z1, tl.where(col == 2, z2, z3)))
        else:
            z0, z1, z2, z3 = philox_normal_tile(tl.load(seeds_ptr + b), step_word, block)
            col = lane[None, :]
            z = tl.where(col == 0, z0[:, None], tl.where(col == 1, z1[:, None],
                                                         tl.where(col == 2, z2[:, None], z3[:, None])))
        acc = acc + _term(s, z)
    else:
        acc = acc + _missing_term(s)
    # Stores after every load: an output may be one of the inputs (out = x, x0_out = h1, ...).
    if HAS_X0:
        tl.store(x0_ptr + offset, _cast_for(x0, x0_ptr), mask=mask)
    tl.store(out_ptr + offset, _cast_for(acc, out_ptr), mask=mask)
    if HAS_MI:
        tl.store(mi_ptr + offset, _cast_for(acc, mi_ptr), mask=mask)


def fused_step_launch(a, block: int | None = None):
    """Launch on the arguments validated by pydiffmed.ops.fused_step (a StepArgs)."""
    if a.batch == 0 or a.numel == 0:
        return
    if block is None:
        block = 1024
    h1, h2, h3 = a.history
    dummy = a.x
    grid = (triton.cdiv(a.numel, block), a.batch)
    _fused_step_kernel[grid](
        a.x, a.m, a.m_cond if a.m_cond is not None else dummy,
        h1 if h1 is not None else dummy, h2 if h2 is not None else dummy, h3 if h3 is not None else dummy,
        a.noise if a.noise is not None else dummy, a.seeds if a.seeds is not None else a.coefs,
        a.out, a.model_input if a.model_input is not None else dummy, a.x0_out if a.x0_out is not None else dummy,
        a.coefs, a.step_index if a.step_index is not None else a.coefs,
        a.noise_step_tensor if a.noise_step_tensor is not None else a.coefs,
        float(a.guidance), int(a.noise_step), a.step_stride, a.batch_stride, a.num_steps, a.numel, a.channels,
        max(a.spatial, 1), a.noise_offset, a.noise_plane,
        HAS_MC=a.m_cond is not None, HAS_H1=h1 is not None, HAS_H2=h2 is not None, HAS_H3=h3 is not None,
        HAS_NOISE=a.noise is not None, HAS_SEEDS=a.seeds is not None, HAS_MI=a.model_input is not None,
        HAS_X0=a.x0_out is not None, HAS_STEP_INDEX=a.step_index is not None,
        HAS_NOISE_STEP_PTR=a.noise_step_tensor is not None, CHANNELS_LAST=bool(a.channels_last),
        NOISE_INDEX=(a.noise_offset, a.noise_plane) != (0, a.spatial), BLOCK=block,
        num_warps=4, enable_fp_fusion=False)


# --- per-sample sums of squares (pydiffmed.ops.per_sample_norm) ----------------------------------------------

@triton.jit
def _sumsq_kernel(t_ptr, partial_ptr, numel, chunks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    index = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(t_ptr + b * numel + index, mask=index < numel, other=0.0).to(tl.float32)
    tl.store(partial_ptr + b * chunks + pid, tl.sum(v * v, axis=0))


def per_sample_sumsq_launch(flat, batch: int, block: int = 4096):
    """fp32 partial sums of squares (batch, chunks) of the `batch` contiguous sample blocks of `flat`."""
    import torch

    numel = flat.numel() // batch
    chunks = triton.cdiv(numel, block)
    partial = torch.empty((batch, chunks), dtype=torch.float32, device=flat.device)
    _sumsq_kernel[(chunks, batch)](flat, partial, numel, chunks, BLOCK=block, num_warps=8)
    return partial
