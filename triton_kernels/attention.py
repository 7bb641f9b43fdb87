"""FlashAttention-2-style forward: softmax(q·kᵀ·scale)·v without an N_q×N_kv matrix in memory.

One program per (query block, batch·head): it keeps its BLOCK_M query rows on chip, streams the K/V rows in
BLOCK_N tiles and keeps an online softmax (running max m, running sum l, output accumulator) in fp32. Tails
of either token count are masked, so N is any size. q, k, v and out are B×heads×N×d views with arbitrary
strides: the B×N×heads×d layout and q/k/v sliced out of one fused QKV tensor are read in place.

On a GPU q·kᵀ and p·v run on tensor cores in the input dtype (fp16/bf16; fp32 inputs use exact fp32 dots)
with fp32 accumulation. Under the interpreter every tile is converted to fp32 right after loading (bf16
tl.dot is wrong there) and one fixed 64×64 tile config is used (numpy works per tile: large tiles are
quickest; tests pass smaller tiles explicitly to cover multi-tile paths).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
MIN_BLOCK_D = 16  # tl.dot needs an inner dimension of at least 16


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_tile_ptrs, v_tile_ptrs, kv_start, n_kv, qk_scale, offs_n, d_mask,
                 MASK_N: tl.constexpr, MASK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one BLOCK_N tile of keys/values into the running softmax state of a BLOCK_M block of queries."""
    if MASK_N:
        n_mask = (kv_start + offs_n) < n_kv
        if MASK_D:
            kv_mask = n_mask[:, None] & d_mask[None, :]
        else:
            kv_mask = n_mask[:, None]
        k = tl.load(k_tile_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_tile_ptrs, mask=kv_mask, other=0.0)
    elif MASK_D:
        k = tl.load(k_tile_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_tile_ptrs, mask=d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_tile_ptrs)
        v = tl.load(v_tile_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # scores in log2 units: exp(x·scale) = exp2(x·scale·log2 e)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK_N:
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one real key
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attention_fwd_kernel(Q, K, V, O,
                          sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                          so_b, so_h, so_n, so_d,
                          heads, n_q, n_kv, head_dim, qk_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          MASK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n_q
    d_mask = offs_d < head_dim

    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :] * sk_d
    v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :] * sv_d

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for kv_start in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs + kv_start * sk_n, v_ptrs + kv_start * sv_n,
                                     kv_start, n_kv, qk_scale, offs_n, d_mask, False, MASK_D, UPCAST,
                                     DOT_PRECISION)
    if n_full < n_kv:
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_ptrs + n_full * sk_n, v_ptrs + n_full * sv_n,
                                     n_full, n_kv, qk_scale, offs_n, d_mask, True, MASK_D, UPCAST, DOT_PRECISION)
    out = acc / l_i[:, None]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"  # CPU tensors reach Triton only under TRITON_INTERPRET=1


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(head_dim: int, dtype: torch.dtype, interpreting: bool, n_q: int, batch_heads: int,
                  sm_count: int = 132):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Heuristic, not autotuned: no timing runs on the first call,
    so a first call inside CUDA-graph capture is safe."""
    if interpreting:
        return 64, 64, 1, 1
    if dtype == torch.float32:  # fp32 tiles are twice as large in shared memory
        return 64, 32, 4, 2
    if head_dim <= 64:
        # 128-row query blocks unless that leaves most SMs idle (B·heads = 1–4 at small N)
        block_m = 128 if triton.cdiv(n_q, 128) * batch_heads >= sm_count else 64
        return block_m, 64, 4, 3
    return 128, 64, 8, 2


def attention_launch(q, k, v, out, scale: float, block_m: int | None = None, block_n: int | None = None):
    """out = softmax(q·kᵀ·scale)·v. q, out: B×heads×N_q×d; k, v: B×heads×N_kv×d; any strides, one dtype,
    validated by pydiffmed.ops.attention. block_m/block_n override the heuristic (tests use small blocks)."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    interpreting = _interpreting(q)
    sm_count = 132 if interpreting else _sm_count(q.device.index if q.device.index is not None else 0)
    cfg_m, cfg_n, num_warps, num_stages = choose_config(head_dim, q.dtype, interpreting, n_q, batch * heads,
                                                        sm_count)
    block_m, block_n = block_m or cfg_m, block_n or cfg_n
    block_d = max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))
    upcast = interpreting or q.dtype == torch.float32
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _launch(grid, q, k, v, out, heads, n_q, n_kv, head_dim, scale, block_m, block_n, block_d, upcast,
                num_warps, num_stages)


def _launch(grid, q, k, v, out, heads, n_q, n_kv, head_dim, scale, block_m, block_n, block_d, upcast,
            num_warps, num_stages):
    _attention_fwd_kernel[grid](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, n_q, n_kv, head_dim, scale * LOG2_E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, MASK_D=block_d != head_dim, UPCAST=upcast,
        DOT_PRECISION="ieee" if upcast else "tf32", num_warps=num_warps, num_stages=num_stages)


MAX_GRID_Y = 65535
INT32_MAX = 2 ** 31 - 1


def unsupported_reasons(q, k, v) -> list[str]:
    """Limits of this kernel beyond the op's own checks (B×heads×N×d views)."""
    reasons = []
    if q.shape[-1] > 128:
        reasons.append(f"head dimension d = {q.shape[-1]} > 128")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        reasons.append(f"B·heads = {q.shape[0] * q.shape[1]} > {MAX_GRID_Y} (grid limit)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        span = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if span > INT32_MAX:
            reasons.append(f"{name}: offsets within one (batch, head) exceed int32")
    return reasons
