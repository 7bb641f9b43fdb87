"""GroupNorm on a CUDA GPU: the triton and cuda backends against an fp64 oracle (shapes, dtypes, layouts, split
reductions, misaligned pointers, large offsets), inside a captured CUDA graph, and without host syncs.
Skipped on machines without a GPU (the CPU suites cover the same code through the interpreter/emulation)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_by_rule, canary_intact, canary_like
from pydiffmed import backends, ops

pytestmark = pytest.mark.gpu

GPU_BACKENDS = ("triton", "cuda")
SHAPES = [  # (shape, groups)
    ((1, 64, 16, 16, 16), 32),
    ((2, 24, 5, 7, 9), 3),        # ragged D·H·W, C/G = 8
    ((1, 320, 6, 10, 10), 32),    # C/G = 10
    ((2, 32, 33, 31), 8),         # 4-D
    ((3, 15, 4, 5, 3), 5),        # odd C/G
    ((1, 8, 48, 48, 48), 2),      # few groups, many positions: split reduction
]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "token_major")


def _usable(backend):
    reasons = backends.backend_reasons(backend)
    if reasons:
        pytest.skip(f"{backend} backend unavailable: {'; '.join(reasons)}")


def _channels_last(t):
    return t.to(memory_format=torch.channels_last_3d if t.ndim == 5 else torch.channels_last)


def _inputs(shape, dtype, *, channels_last=False, offset=0.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, device="cuda", generator=gen) * 1.5 + offset
    x = (_channels_last(x) if channels_last else x).to(dtype)
    w = torch.randn(c, device="cuda", generator=gen)
    b = torch.randn(c, device="cuda", generator=gen)
    bias_nc = torch.randn(n, c, device="cuda", generator=gen)
    return x, w, b, bias_nc


def _oracle(x, groups, w, b, bias_nc, eps=1e-5, silu=True, dtype=torch.float64):
    xd = x.to(dtype)
    if bias_nc is not None:
        xd = xd + bias_nc.to(dtype).reshape(*bias_nc.shape, *([1] * (x.ndim - 2)))
    y = F.group_norm(xd, groups, None if w is None else w.to(dtype), None if b is None else b.to(dtype), eps)
    return F.silu(y) if silu else y


def _token(t):
    return t.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, groups", SHAPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_matches_oracle(backend, shape, groups, dtype, layout):
    _usable(backend)
    x, w, b, bias_nc = _inputs(shape, dtype, channels_last=layout == "channels_last")
    token = layout == "token_major"
    y = ops.group_norm(x, groups, w, b, 1e-5, act="silu", bias_nc=bias_nc, token_major=token, backend=backend)
    ref = _oracle(x, groups, w, b, bias_nc)
    # "the same math in plain torch at that dtype": fp32 math for fp32, torch's own half GroupNorm otherwise
    at_dtype = _oracle(x, groups, w.to(dtype), b.to(dtype), bias_nc.to(dtype), dtype=dtype)
    if token:
        assert y.shape == (shape[0], math.prod(shape[2:]), shape[1]) and y.is_contiguous()
        ref, at_dtype = _token(ref), _token(at_dtype)
    elif layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last_3d if y.ndim == 5 else torch.channels_last)
    else:
        assert y.is_contiguous()
    assert_close_by_rule(y, ref, at_dtype, floor=2e-5, what=f"{backend} {shape} {dtype} {layout}")


@pytest.mark.parametrize("num_chunks", [1, 2, 7, 64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_launcher_split_reduction_and_canary(backend, channels_last, num_chunks):
    """The launchers directly, with the number of spatial chunks forced, writing into a NaN canary buffer."""
    _usable(backend)
    if backend == "triton":
        from triton_kernels.group_norm import group_norm_launch
    else:
        from pydiffmed._cuda import group_norm_launch
    shape, groups = (2, 40, 7, 9, 11), 5
    x, w, b, bias_nc = _inputs(shape, torch.float32, channels_last=channels_last)
    fmt = (torch.channels_last_3d if channels_last else torch.contiguous_format)
    y, buf = canary_like(x, memory_format=fmt)
    group_norm_launch(x, y, groups, w, b, bias_nc, 1e-5, True, x_channels_last=channels_last,
                      y_channels_last=channels_last, num_chunks=num_chunks)
    torch.cuda.synchronize()
    assert canary_intact(y, buf)
    err = (y.double() - _oracle(x, groups, w, b, bias_nc)).abs().max().item()
    assert err < 2e-5, err


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_large_offset_keeps_fp32_accuracy(backend, channels_last):
    _usable(backend)
    x, w, b, bias_nc = _inputs((2, 32, 12, 12, 12), torch.float32, channels_last=channels_last, offset=1000.0)
    y = ops.group_norm(x, 8, w, b, act="silu", bias_nc=bias_nc, backend=backend)
    err = (y.double() - _oracle(x, 8, w, b, bias_nc)).abs().max().item()
    assert err < 2e-5, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_input_and_no_affine(backend, dtype):
    """A tensor starting one element into its storage (no 16-byte alignment) takes the scalar-load path."""
    _usable(backend)
    shape, groups = (2, 16, 8, 8, 8), 4
    storage = torch.randn(math.prod(shape) + 1, device="cuda").to(dtype)
    x = storage[1:].view(shape)
    y = ops.group_norm(x, groups, backend=backend)
    ref = _oracle(x, groups, None, None, None, silu=False)
    at_dtype = _oracle(x, groups, None, None, None, silu=False, dtype=dtype)
    assert_close_by_rule(y, ref, at_dtype, floor=2e-5, what=f"{backend} misaligned {dtype}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    _usable(backend)
    shape, groups = (2, 32, 10, 12, 14), 8
    x, w, b, bias_nc = _inputs(shape, torch.bfloat16, channels_last=True)

    def step():
        return ops.group_norm(x, groups, w, b, act="silu", bias_nc=bias_nc, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compilation and autotuning happen outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for seed in (1, 2):
        x_new, _, _, bias_new = _inputs(shape, torch.bfloat16, channels_last=True, seed=seed)
        x.copy_(x_new)
        bias_nc.copy_(bias_new)
        graph.replay()
        torch.cuda.synchronize()
        expected = ops.group_norm(x_new, groups, w, b, act="silu", bias_nc=bias_new, backend=backend)
        assert torch.equal(y, expected), f"replay {seed} differs from an eager call on the same data"
        ref = _oracle(x_new, groups, w, b, bias_new)
        at_dtype = _oracle(x_new, groups, w.bfloat16(), b.bfloat16(), bias_new.bfloat16(), dtype=torch.bfloat16)
        assert_close_by_rule(y, ref, at_dtype, floor=2e-5, what=f"{backend} graph replay {seed}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    _usable(backend)
    x, w, b, bias_nc = _inputs((1, 24, 9, 9, 9), torch.float16)
    ops.group_norm(x, 3, w, b, act="silu", bias_nc=bias_nc, backend=backend)  # compile first
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for token_major in (False, True):
            ops.group_norm(x, 3, w, b, act="silu", bias_nc=bias_nc, token_major=token_major, backend=backend)
        ops.group_norm(_channels_last(x), 3, w, b, bias_nc=bias_nc, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
