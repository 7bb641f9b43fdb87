"""Plain-torch oracles for every op: the always-available fallback and what the tests compare against."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, act=None, bias_nc=None):
    """fp32 math with the kernels' two-pass centred variance (torch's own CPU GroupNorm loses precision on
    offset data and on one-value groups); result in x.dtype and x's memory format."""
    n, c = x.shape[:2]
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    xf = x.float()
    if bias_nc is not None:
        xf = xf + bias_nc.float().reshape(n, c, *per_channel[2:])
    grouped = xf.reshape(n, num_groups, -1)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    variance = (centred * centred).mean(dim=-1, keepdim=True)
    y = (centred * torch.rsqrt(variance + eps)).reshape(xf.shape)
    if weight is not None:
        y = y * weight.float().reshape(per_channel)
    if bias is not None:
        y = y + bias.float().reshape(per_channel)
    if act == "silu":
        y = F.silu(y)
    return torch.empty_like(x).copy_(y)


def group_norm_stats(x, num_groups, bias_nc=None):
    """(elements per group, N×G mean, N×G centred second moment Σ(v − mean)²) of x + bias_nc, fp64. Per channel
    torch's `var_mean` (channels innermost, as channels_last activations lie in memory), then channels merge into
    groups with Chan's formula (a per-channel bias shifts only the channel means)."""
    n, c = x.shape[:2]
    per_group = c // num_groups
    last = x.detach().movedim(1, -1)
    if last.dtype not in (torch.float32, torch.float64):
        last = last.float()
    var, mean = torch.var_mean(last, dim=tuple(range(1, last.ndim - 1)), correction=0)
    count = math.prod(x.shape[2:])
    mean = mean.double()
    if bias_nc is not None:
        mean = mean + bias_nc.detach().double()
    mean = mean.view(n, num_groups, per_group)
    m2 = var.double().view(n, num_groups, per_group) * count
    group_mean = mean.mean(-1)
    group_m2 = m2.sum(-1) + count * (mean - group_mean[..., None]).square().sum(-1)
    return count * per_group, group_mean, group_m2


def group_norm_apply(x, out, center, scale, shift, act=None):
    """out = act((x − center)·scale + shift) per (sample, channel) in fp32 (center, scale, shift: N×C fp32). The
    math runs on channels-innermost views: torch's broadcasting of an N×C×1×1×1 operand over a channels_last
    tensor is ~10× slower than over the same memory seen as N×D×H×W×C."""
    shape = (center.shape[0], *(1,) * (x.ndim - 2), center.shape[1])
    center, scale, shift = (t.view(shape) for t in (center, scale, shift))
    src, dst = x.movedim(1, -1), out.movedim(1, -1)
    work = torch.sub(src, center, out=dst) if dst.dtype == torch.float32 else src.float().sub_(center)
    torch.addcmul(shift, work, scale, out=work)
    if act == "silu":
        F.silu(work, inplace=True)
    if work is not dst:
        dst.copy_(work)
    return out


def attention(q, k, v, scale=None, compute_dtype=torch.float32):
    """softmax(q·kᵀ·scale)·v for B×heads×N×d tensors, computed naively in `compute_dtype` (an N_q×N_kv score
    matrix), result in q.dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    weights = torch.softmax(qc @ kc.transpose(-1, -2) * scale, dim=-1)
    return (weights @ vc).to(q.dtype)


# ===== fused_step / philox_normal oracles (issue 3) =====================================================
# Philox4x32-10 in int64 arithmetic (every intermediate < 2^50, so no overflow). The mapping of words to
# normals is defined by csrc/common/philox.h: the uniforms u = ((w >> 9) + 1/2)·2^-23 (exact in fp32), and
# Box-Muller with log / sin / cos evaluated by fixed fp32 polynomials. `philox_normal` repeats that fp32
# arithmetic operation for operation (so it matches the kernels to the last bit where they do not contract
# multiply-adds); `philox_normal_float64` evaluates the same Box-Muller formula in float64, the accuracy oracle.

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a, multiplier):
    """(hi, lo) 32-bit words of a * multiplier for int64 tensors a in [0, 2^32) and a 32-bit constant."""
    p_lo = (a & 0xFFFF) * multiplier
    p_hi = (a >> 16) * multiplier
    t = p_hi + (p_lo >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 on int64 tensors holding 32-bit words: counter = (c0, c1, c2, c3), key = (k0, k1),
    broadcastable. Returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _sample_numel(shape):
    n = 1
    for s in tuple(shape)[1:]:
        n *= int(s)
    return n


def philox_words(seeds, step, shape, device=None, block_range=None):
    """The four Philox words of the blocks of 4 logical elements of each sample (all blocks, or those in
    block_range = (start, stop)): four int64 tensors (B, blocks)."""
    device = torch.device(device) if device is not None else seeds.device
    seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1, 1)
    start, stop = block_range if block_range is not None else (0, (_sample_numel(shape) + 3) // 4)
    blocks = torch.arange(start, stop, dtype=torch.int64, device=device).reshape(1, -1)
    if isinstance(step, torch.Tensor):
        step_word = step.to(device=device, dtype=torch.int64).reshape(1, 1) & _MASK32
    else:
        step_word = torch.full((1, 1), int(step) & _MASK32, dtype=torch.int64, device=device)
    zero = torch.zeros_like(blocks)
    return philox4x32_10((blocks & _MASK32, blocks >> 32, step_word.expand_as(blocks), zero),
                         (seeds & _MASK32, (seeds >> 32) & _MASK32))


def _normals_by_chunk(seeds, step, shape, device, normals_of_words, dtype):
    """Runs normals_of_words over chunks of blocks: on the CPU, (B, 8192) temporaries stay below the allocator's
    mmap threshold, which makes the ~200 int64 passes of Philox several times faster (no fresh pages)."""
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else seeds.device
    batch, n = shape[0], _sample_numel(shape)
    num_blocks = (n + 3) // 4
    chunk = max(1, 8192 // max(batch, 1)) if device.type == "cpu" else max(num_blocks, 1)
    z = torch.empty((batch, num_blocks, 4), dtype=dtype, device=device)
    for start in range(0, num_blocks, chunk):
        stop = min(start + chunk, num_blocks)
        z[:, start:stop] = torch.stack(normals_of_words(philox_words(seeds, step, shape, device, (start, stop))),
                                       dim=-1)
    return z.reshape(batch, -1)[:, :n].reshape(shape)


def philox_uniform(word):
    """u = ((w >> 9) + 1/2) * 2^-23: odd multiples of 2^-24 in (0, 1), exact in fp32."""
    return ((word >> 9).float() + 0.5) * 1.1920928955078125e-07


def _neg_two_log(u):
    ix = u.view(torch.int32) - 0x3F3504F3
    k = (ix >> 23).float()
    m = ((ix & 0x007FFFFF) + 0x3F3504F3).view(torch.float32)
    f = m - 1.0
    s = f / (f + 2.0)
    z = s * s
    p = z * 0.2222222238779068 + 0.2857142984867096
    p = p * z + 0.4000000059604645
    p = p * z + 0.6666666865348816
    p = p * z + 2.0
    ln_u = k * 0.693145751953125 + (k * 1.428606765330187e-06 + s * p)
    return ln_u * -2.0


def _cos_sin_2pi(word):
    odd = ((word >> 9) << 1) | 1
    q = (odd + (1 << 21)) >> 22
    t = (odd - (q << 22)).float() * 2.384185791015625e-07
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
    c0 = torch.where(odd_quadrant, sin_phi, cos_phi)
    s0 = torch.where(odd_quadrant, cos_phi, sin_phi)
    c = torch.where((quadrant == 1) | (quadrant == 2), -c0, c0)
    s = torch.where(quadrant >= 2, -s0, s0)
    return c, s


def _box_muller_fp32(words):
    z = []
    for w_radius, w_angle in ((words[0], words[1]), (words[2], words[3])):
        # sqrt in fp64, then rounded: correctly rounded, unlike torch's fp32 CPU sqrt (off by 1 ulp at times)
        r = torch.sqrt(_neg_two_log(philox_uniform(w_radius)).double()).float()
        c, s = _cos_sin_2pi(w_angle)
        z += [r * c, r * s]
    return z


def _box_muller_float64(words):
    u = [((w >> 9).double() + 0.5) * 2.0 ** -23 for w in words]
    z = []
    for u_radius, u_angle in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2.0 * torch.log(u_radius))
        z += [r * torch.cos(2.0 * math.pi * u_angle), r * torch.sin(2.0 * math.pi * u_angle)]
    return z


def philox_normal(seeds, step, shape, device=None, index=None):
    """The noise fused_step draws (fp32): z[b, i] for the logical (row-major) index i of each sample's
    `shape[1:]`. seeds: (B,) int64 (64-bit keys); step: int or 0-d integer tensor (the counter's third word).
    index = (offset, plane): the element of channel c (shape[1]) at spatial index s draws the index
    c·plane + offset + s instead (a slab of a volume with `plane` elements per channel)."""
    if index is None:
        return _normals_by_chunk(seeds, step, shape, device, _box_muller_fp32, torch.float32)
    shape = tuple(int(s) for s in shape)
    device = torch.device(device) if device is not None else seeds.device
    channels = shape[1] if len(shape) > 1 else 1
    spatial = _sample_numel(shape) // max(channels, 1)
    offset, plane = index
    out = torch.empty((shape[0], channels, spatial), dtype=torch.float32, device=device)
    for c in range(channels):  # each channel's indices are one contiguous range of the volume's
        first = c * plane + offset
        block0, block1 = first // 4, (first + spatial + 3) // 4
        z = torch.stack(_box_muller_fp32(philox_words(seeds, step, shape, device, (block0, block1))), dim=-1)
        out[:, c] = z.reshape(shape[0], -1)[:, first - 4 * block0:first - 4 * block0 + spatial]
    return out.reshape(shape)


def philox_normal_float64(seeds, step, shape, device=None):
    """The same normals with the Box-Muller formula evaluated in float64 (not rounded): the accuracy oracle."""
    return _normals_by_chunk(seeds, step, shape, device, _box_muller_float64, torch.float64)


def _term(coef, t):
    """coef * t where coef != 0, exactly 0 where coef == 0 (zero-coefficient terms read nothing); a missing
    buffer (t None) with a nonzero coefficient gives NaN, the on-device signal of a missing input."""
    if t is None:
        return torch.where(coef != 0, torch.full_like(coef, float("nan")), torch.zeros_like(coef))
    return torch.where(coef != 0, coef * t.float(), torch.zeros((), dtype=torch.float32, device=t.device))


def fused_step(x, model_output, coefs, history=(), noise=None, model_output_cond=None, guidance_scale=None):
    """One solver update in fp32 (COEF_NAMES order p_x, p_m, clip, a, b, c1, c2, c3, s):
        x0 = clamp(p_x*x + p_m*m, -clip, clip);  x' = a*x + b*x0 + c1*h1 + c2*h2 + c3*h3 + s*z
    coefs: (K,) or (B, K) rows. m = m_uncond + w*(m_cond - m_uncond) when model_output_cond is given.
    history: up to 3 tensors (None entries allowed); noise: z or None. Returns (x' fp32, x0 fp32)."""
    b = x.shape[0]
    rows = coefs.to(device=x.device, dtype=torch.float32)
    rows = rows.reshape(1, -1).expand(b, -1) if rows.ndim == 1 else rows
    col = [rows[:, k].reshape(b, *([1] * (x.ndim - 1))) for k in range(rows.shape[1])]
    p_x, p_m, clip, a, b_coef, c1, c2, c3, s = col
    m = model_output.float()
    if model_output_cond is not None:
        m = m + float(guidance_scale) * (model_output_cond.float() - m)
    x0 = _term(p_x, x) + _term(p_m, m)
    x0 = torch.where(x0 > clip, clip, torch.where(x0 < -clip, -clip, x0))  # NaN passes through
    history = tuple(history) + (None,) * (3 - len(history))
    x_new = _term(a, x) + _term(b_coef, x0)
    for c, h in zip((c1, c2, c3), history):
        x_new = x_new + _term(c, h)
    x_new = x_new + _term(s, noise)
    return x_new, x0
