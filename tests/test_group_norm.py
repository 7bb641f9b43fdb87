"""pydiffmed.ops.group_norm on every backend that runs here, against a float64 oracle (ARCHITECTURE §4, §6)."""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pydiffmed import backends, nn as pdm_nn
from pydiffmed.ops import group_norm, group_norm_apply, group_norm_stats, reference
from pydiffmed.ops._checks import channels_last_format

from helpers import assert_close_by_rule, canary_intact, canary_like, max_abs_err, run_backend, runnable_backends

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HAS_CUDA = torch.cuda.is_available()

# (N, C, spatial, G): ragged spatial sizes (never a power of two), odd and even C/G, N = 1 and N > 1, 4-D and 5-D.
SHAPES = [
    (2, 6, (3, 5, 7), 3),
    (1, 24, (5, 9, 11), 3),
    (3, 15, (6, 7), 5),
    (1, 32, (4, 5, 6), 8),
    (2, 12, (9, 10), 4),
    (1, 200, (3, 4, 5), 8),  # more channels than one register block of the CPU loops, and not a multiple of 16
]
# One case big enough for several statistics chunks per channel and for both CPU threads.
LARGE_SHAPE = (1, 8, (20, 21, 22), 2)
# The Triton interpreter runs every program in numpy: tiny shapes only.
TRITON_SHAPES = [(2, 6, (3, 5, 7), 3), (1, 15, (6, 7), 5)]

# Option combinations run for every (backend, shape, dtype, layout): together they cover every option both ways.
OPTIONS = [
    dict(act=None, affine="both", bias_nc=False, offset=0.0, token_major=False),
    dict(act="silu", affine="both", bias_nc=True, offset=0.0, token_major=False),
    dict(act="silu", affine="none", bias_nc=False, offset=1000.0, token_major=True),
    dict(act=None, affine="weight", bias_nc=True, offset=1000.0, token_major=False),
    dict(act="silu", affine="bias", bias_nc=True, offset=0.0, token_major=True),
]


def backends_here():
    return runnable_backends("group_norm", [torch.empty(1)])


# The cpu backend has two sets of loops (csrc/cpu/group_norm.cpp): AVX-512 intrinsics where the CPU has them and
# generic compiler-vectorised ones; every cpu test runs on both ("cpu" = the default choice, "cpu-generic").
CPU_VARIANTS = ["torch", "cpu", "cpu-generic"]


@contextlib.contextmanager
def backend_variant(variant):
    """Yields the backend name of a variant, with the cpu loops it names selected meanwhile."""
    if variant != "cpu-generic":
        yield variant
        return
    from pydiffmed import _C

    previous = _C.group_norm_set_isa("generic")
    try:
        yield "cpu"
    finally:
        _C.group_norm_set_isa(previous)


def test_cpu_default_loops_are_avx512_where_supported():
    from pydiffmed import _C

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    wanted = all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"))
    assert _C.group_norm_isa() == ("avx512" if wanted else "generic")
    with pytest.raises(ValueError, match="avx512"):
        _C.group_norm_set_isa("sse")


# --- inputs and the oracle --------------------------------------------------------------------------------------

def make_inputs(shape, dtype, channels_last, act=None, affine="both", bias_nc=False, offset=0.0, device="cpu",
                seed=0):
    n, c, spatial, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=gen) * 1.5 + offset
    # per-channel shifts so that groups are not already normalised
    x = x + torch.randn((1, c) + (1,) * len(spatial), generator=gen)
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=channels_last_format(x.ndim))
    w = torch.randn(c, generator=gen) if affine in ("both", "weight") else None
    b = torch.randn(c, generator=gen) if affine in ("both", "bias") else None
    bnc = torch.randn(n, c, generator=gen) if bias_nc else None
    w, b, bnc = (None if t is None else t.to(device) for t in (w, b, bnc))
    return x.to(device), g, w, b, bnc


def oracle(x, num_groups, weight, bias, eps, act, bias_nc):
    """float64 GroupNorm of the (already rounded) input, written out (no torch GroupNorm kernel involved)."""
    n, c = x.shape[:2]
    per_channel = (n, c) + (1,) * (x.ndim - 2)
    xd = x.double()
    if bias_nc is not None:
        xd = xd + bias_nc.double().reshape(per_channel)
    groups = xd.reshape(n, num_groups, -1)
    mean = groups.mean(dim=2, keepdim=True)
    var = ((groups - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((groups - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * weight.double().reshape((1, c) + (1,) * (x.ndim - 2))
    if bias is not None:
        y = y + bias.double().reshape((1, c) + (1,) * (x.ndim - 2))
    return F.silu(y) if act == "silu" else y


def torch_at_dtype(x, num_groups, weight, bias, eps, act, bias_nc):
    """The same math in plain torch at x's dtype (the ARCHITECTURE §6 yardstick)."""
    dt = x.dtype
    xt = x
    if bias_nc is not None:
        xt = xt + bias_nc.to(dt).reshape(*bias_nc.shape, *([1] * (x.ndim - 2)))
    y = F.group_norm(xt, num_groups, None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    return F.silu(y) if act == "silu" else y


def token_major_of(y):
    return y.flatten(2).transpose(1, 2)


def check_against_oracle(out, x, g, w, b, eps, act, bnc, token_major, offset, what):
    ref = oracle(x, g, w, b, eps, act, bnc)
    at_dtype = torch_at_dtype(x, g, w, b, eps, act, bnc)
    if token_major:
        ref, at_dtype = token_major_of(ref), token_major_of(at_dtype)
    assert out.shape == ref.shape, what
    # fp32 on data with a large offset: ~16 ulp of the offset, far below what E[x^2] - E[x]^2 would lose
    floor = 1e-3 if (offset and x.dtype == torch.float32) else 1e-5
    assert_close_by_rule(out, ref, at_dtype, floor=floor, what=what)


# --- the main comparison ------------------------------------------------------------------------------------------

def _cases(shapes):
    return [(shape, dtype, cl) for shape in shapes for dtype in DTYPES for cl in (False, True)]


def _ids(case):
    shape, dtype, cl = case
    n, c, spatial, g = shape
    return f"{n}x{c}x{'x'.join(map(str, spatial))}g{g}-{str(dtype)[6:]}-{'cl' if cl else 'ncs'}"


def _run_all_options(backend, shape, dtype, channels_last, options=OPTIONS, device="cpu"):
    for opts in options:
        x, g, w, b, bnc = make_inputs(shape, dtype, channels_last, device=device,
                                      **{k: opts[k] for k in ("act", "affine", "bias_nc", "offset")})
        out = group_norm(x, g, w, b, 1e-5, act=opts["act"], bias_nc=bnc, token_major=opts["token_major"],
                         backend=backend)
        assert out.dtype == x.dtype and out.device == x.device
        if not opts["token_major"]:
            # layout preserved: channels_last in -> channels_last out (same strides), contiguous -> contiguous
            assert out.stride() == x.stride()
        check_against_oracle(out.cpu(), x.cpu(), g, *(None if t is None else t.cpu() for t in (w, b)), 1e-5,
                             opts["act"], None if bnc is None else bnc.cpu(), opts["token_major"], opts["offset"],
                             what=f"{backend} {opts}")


@pytest.mark.parametrize("case", _cases(SHAPES + [LARGE_SHAPE]), ids=_ids)
@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_matches_oracle(variant, case):
    with backend_variant(variant) as backend:
        assert backend in backends_here()
        _run_all_options(backend, *case)


@pytest.mark.parametrize("case", _cases(TRITON_SHAPES), ids=_ids)
def test_triton_interpreter_matches_oracle(case):
    assert "triton" in backends_here()
    _run_all_options("triton", *case)


@pytest.mark.parametrize("variant", CPU_VARIANTS[1:])
def test_cpu_exact_on_large_offset(variant):
    """fp32 statistics and apply keep full precision on x + 1000 (pivoted sums, split center), both layouts."""
    for cl in (False, True):
        x, g, w, b, bnc = make_inputs(LARGE_SHAPE, torch.float32, cl, bias_nc=True, offset=1000.0)
        with backend_variant(variant) as backend:
            out = group_norm(x, g, w, b, act="silu", bias_nc=bnc, backend=backend)
        assert max_abs_err(out, oracle(x, g, w, b, 1e-5, "silu", bnc)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", CPU_VARIANTS[1:])
def test_cpu_silu_over_its_whole_range(variant, dtype):
    """SiLU's tails: GroupNorm outputs of up to a few hundred in magnitude, where e^-v overflows (v < -88) or is
    negligible, and the values in between."""
    n, c, s, g = 1, 32, 1000, 4
    x = torch.linspace(-1, 1, n * c * s).reshape(n, c, 10, 10, 10)[:, torch.randperm(c)].to(dtype)
    w = torch.linspace(-200, 200, c)
    for cl in (False, True):
        xx = x.to(memory_format=torch.channels_last_3d) if cl else x
        with backend_variant(variant) as backend:
            out = group_norm(xx, g, w, None, act="silu", backend=backend)
        ref = oracle(xx, g, w, None, 1e-5, "silu", None)
        assert torch.isfinite(out).all()
        assert_close_by_rule(out, ref, torch_at_dtype(xx, g, w, None, 1e-5, "silu", None), floor=1e-5,
                             what=f"{variant} {dtype} cl={cl}")


def test_weight_fp32_with_half_input_equals_half_weight_cast():
    x, g, w, b, _ = make_inputs(SHAPES[1], torch.bfloat16, False)
    for backend in ("torch", "cpu"):
        out32 = group_norm(x, g, w, b, backend=backend)
        check_against_oracle(out32, x, g, w, b, 1e-5, None, None, False, 0.0, what=backend)
        # weight and bias given in bf16 (exactly representable values) give the same result
        wb, bb = w.bfloat16(), b.bfloat16()
        torch.testing.assert_close(group_norm(x, g, wb, bb, backend=backend),
                                   group_norm(x, g, wb.float(), bb.float(), backend=backend), rtol=0, atol=0)


def test_non_contiguous_views():
    base, g, w, b, bnc = make_inputs((2, 12, (6, 8, 10), 4), torch.float32, False, bias_nc=True)
    views = {
        "sliced W": base[..., ::2],
        "permuted D/H": base.transpose(2, 3),
        "channel slice": base[:, 4:],
        "channels_last then sliced": base.to(memory_format=torch.channels_last_3d)[:, :, 1:],
    }
    for backend in ("torch", "cpu"):
        for name, x in views.items():
            c = x.shape[1]
            gg = 2 if c == 8 else g
            out = group_norm(x, gg, w[:c], b[:c], act="silu", bias_nc=bnc[:, :c], backend=backend)
            ref = oracle(x, gg, w[:c], b[:c], 1e-5, "silu", bnc[:, :c])
            assert max_abs_err(out, ref) < 2e-5, f"{backend} {name}"


def test_channels_last_input_reaches_the_kernel_without_a_copy(monkeypatch):
    seen = []
    impl = backends.implementation("group_norm", "cpu")
    run = impl.run

    def spy(x, y, *args):
        seen.append((x.data_ptr(), y.is_contiguous(memory_format=torch.channels_last_3d)))
        return run(x, y, *args)

    monkeypatch.setattr(impl, "run", spy)
    x, g, w, b, _ = make_inputs(SHAPES[0], torch.float32, True)
    out = group_norm(x, g, w, b, backend="cpu")
    assert seen == [(x.data_ptr(), True)]
    assert out.is_contiguous(memory_format=torch.channels_last_3d)


def test_token_major_is_the_transposed_output():
    for cl in (False, True):
        x, g, w, b, bnc = make_inputs(SHAPES[1], torch.float32, cl, bias_nc=True)
        for backend in ("torch", "cpu"):
            full = group_norm(x, g, w, b, act="silu", bias_nc=bnc, backend=backend)
            tokens = group_norm(x, g, w, b, act="silu", bias_nc=bnc, token_major=True, backend=backend)
            n, c = x.shape[:2]
            assert tokens.shape == (n, math.prod(x.shape[2:]), c) and tokens.is_contiguous()
            # (the CPU backend's transposing apply may use other loops than its same-layout apply: rounding only)
            torch.testing.assert_close(tokens, token_major_of(full), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", CPU_VARIANTS[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cpu_kernel_every_layout_pair(variant, dtype):
    """pydiffmed._C.group_norm takes x and y layouts independently (the op itself only asks for NCS->NCS,
    cl->cl and NCS->token-major): all four pairs, against the oracle, with nothing written outside y."""
    from pydiffmed import _C

    for shape in ((1, 24, (5, 9, 11), 3), (2, 200, (3, 4, 5), 8), (1, 32, (40, 50), 4)):
        n, c, spatial, g = shape
        s = math.prod(spatial)
        for x_cl in (False, True):
            x, g, w, b, bnc = make_inputs(shape, dtype, x_cl, act="silu", bias_nc=True)
            ref = oracle(x, g, w, b, 1e-5, "silu", bnc)
            for y_cl in (False, True):
                y, buf = canary_like(x, shape=(n, s, c) if y_cl else (n, c, s))
                with backend_variant(variant):
                    _C.group_norm(x.data_ptr(), y.data_ptr(), backends.DTYPE_CODES[dtype], n, c, s, g, x_cl, y_cl,
                                  w.data_ptr(), b.data_ptr(), bnc.data_ptr(), 1e-5, True, 2)
                assert canary_intact(y, buf), f"{shape} x_cl={x_cl} y_cl={y_cl}"
                got = y.transpose(1, 2) if y_cl else y
                expected = ref.reshape(n, c, s)
                at_dtype = torch_at_dtype(x, g, w, b, 1e-5, "silu", bnc).reshape(n, c, s)
                assert_close_by_rule(got, expected, at_dtype, what=f"{variant} {shape} x_cl={x_cl} y_cl={y_cl}")


# --- streaming (non-temporal) stores of y in the AVX-512 apply ----------------------------------------------------

@contextlib.contextmanager
def stream_min_bytes(nbytes):
    """The cpu kernel writes y with streaming stores from nbytes of output on (-1: its default) meanwhile."""
    from pydiffmed import _C

    previous = _C.group_norm_set_stream_min_bytes(nbytes)
    try:
        yield
    finally:
        _C.group_norm_set_stream_min_bytes(previous)


def default_stream_min_bytes():
    from pydiffmed import _C

    previous = _C.group_norm_set_stream_min_bytes(-1)
    default = _C.group_norm_set_stream_min_bytes(previous)
    return default


# Above the default streaming threshold at every dtype; S = 55·57·59 is odd, so NCS channels start at every
# alignment (the unaligned heads and the tails use normal stores); C = 48 lets the channels-last output stream.
STREAM_SHAPE = (1, 48, (55, 57, 59), 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cpu_streaming_stores_on_a_large_output(dtype):
    n, c, spatial, _ = STREAM_SHAPE
    assert n * c * math.prod(spatial) * dtype.itemsize >= default_stream_min_bytes()
    for cl in (False, True):
        x, g, w, b, bnc = make_inputs(STREAM_SHAPE, dtype, cl, act="silu", bias_nc=True)
        # (the transposing apply streams fp32 only)
        for token_major in (False, True) if dtype == torch.float32 and not cl else (False,):
            def run():
                return group_norm(x, g, w, b, act="silu", bias_nc=bnc, token_major=token_major, backend="cpu")

            streamed = run()
            what = f"cl={cl} token_major={token_major}"
            check_against_oracle(streamed, x, g, w, b, 1e-5, "silu", bnc, token_major, 0.0, what=what)
            with stream_min_bytes(1 << 62):
                plain = run()
            # the store instruction is the only difference
            assert torch.equal(streamed, plain), what


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_cpu_streaming_stores_every_layout_pair_and_alignment(dtype):
    """Streaming forced on small problems: every x/y layout pair, y starting at several element offsets from an
    aligned address (unaligned y: NCS peels a head, the other layouts fall back to normal stores), bit-equal to
    plain stores, nothing written before or after y."""
    from pydiffmed import _C

    # C = 80 and 96: channels-last rows in two slabs (64 + 16 or 32 channels)
    for shape in ((1, 24, (5, 9, 11), 3), (1, 32, (40, 50), 4), (2, 48, (7, 16), 4), (1, 80, (3, 5), 8),
                  (1, 96, (4, 20), 8)):
        n, c, spatial, g = shape
        s = math.prod(spatial)
        for x_cl in (False, True):
            x, g, w, b, bnc = make_inputs(shape, dtype, x_cl, act="silu", bias_nc=True)
            for y_cl in (False, True):
                for lead in (0, 1, 3, 8):
                    outputs = []
                    for threshold in (0, 1 << 62):
                        buf = torch.full((lead + n * c * s + 64,), float("nan"), dtype=dtype)
                        y = buf[lead:lead + n * c * s].view((n, s, c) if y_cl else (n, c, s))
                        with stream_min_bytes(threshold):
                            _C.group_norm(x.data_ptr(), y.data_ptr(), backends.DTYPE_CODES[dtype], n, c, s, g, x_cl,
                                          y_cl, w.data_ptr(), b.data_ptr(), bnc.data_ptr(), 1e-5, True, 2)
                        what = f"{shape} x_cl={x_cl} y_cl={y_cl} lead={lead} threshold={threshold}"
                        assert torch.isnan(buf[:lead]).all() and torch.isnan(buf[lead + n * c * s:]).all(), what
                        assert not torch.isnan(y).any(), what
                        outputs.append(y.transpose(1, 2) if y_cl else y)
                    assert torch.equal(outputs[0], outputs[1]), what
                    at_dtype = torch_at_dtype(x, g, w, b, 1e-5, "silu", bnc).reshape(n, c, s)
                    assert_close_by_rule(outputs[0], oracle(x, g, w, b, 1e-5, "silu", bnc).reshape(n, c, s),
                                         at_dtype, what=what)


def test_stream_min_bytes_rejects_bad_values():
    from pydiffmed import _C

    with pytest.raises(ValueError, match="bytes"):
        _C.group_norm_set_stream_min_bytes(-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last", [False, True], ids=["ncs", "cl"])
def test_cpu_sample_result_independent_of_batch_and_threads(channels_last, dtype):
    """Bit for bit: a sample normalised alone or inside a batch, on one thread or two (whoever generates in bulk
    gets the volumes they would get one at a time)."""
    _, c, spatial, g = LARGE_SHAPE
    x, g, w, b, bnc = make_inputs((3, c, spatial, g), dtype, channels_last, act="silu", bias_nc=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch = group_norm(x, g, w, b, act="silu", bias_nc=bnc, backend="cpu")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for k in range(3):
                alone = group_norm(x[k:k + 1], g, w, b, act="silu", bias_nc=bnc[k:k + 1], backend="cpu")
                assert torch.equal(alone, batch[k:k + 1]), f"sample {k}, {threads} thread(s)"
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("variant", CPU_VARIANTS[1:])
def test_fp16_subnormal_outputs_round_like_torch(variant):
    """fp16 stores (branch-free or hardware conversion) round tiny results to the same subnormals as torch."""
    x, g, _, _, _ = make_inputs(SHAPES[0], torch.float16, False)
    c = x.shape[1]
    w = torch.full((c,), 3e-6)  # outputs ~1e-6: fp16 subnormals (below 6.1e-5)
    with backend_variant(variant) as backend:
        out = group_norm(x, g, w, None, backend=backend)
    expected = oracle(x, g, w, None, 1e-5, None, None).float().half()
    assert (out != 0).any()
    assert max_abs_err(out, expected) <= 2 ** -24  # at most one subnormal step (double rounding in the oracle)


# --- NaN canary: nothing written outside the output ---------------------------------------------------------------

@pytest.mark.parametrize("variant", CPU_VARIANTS + ["triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_nan_canary(variant, dtype):
    with backend_variant(variant) as backend:
        _check_nan_canary(backend, dtype)


def _check_nan_canary(backend, dtype):
    assert backend in backends_here()
    # ragged spatial size and odd C/G: the vector loops end in masked tails
    shapes = [TRITON_SHAPES[0]] if backend == "triton" else [LARGE_SHAPE, (2, 15, (3, 5, 7), 5)]
    for shape, cl in ((shape, cl) for shape in shapes for cl in (False, True)):
        x, g, w, b, bnc = make_inputs(shape, dtype, cl, bias_nc=True)
        fmt = channels_last_format(x.ndim) if cl else torch.contiguous_format
        n, c = x.shape[:2]
        for token_major in (False, True):
            if token_major:
                y, buf = canary_like(x, shape=(n, math.prod(x.shape[2:]), c))
            else:
                y, buf = canary_like(x, memory_format=fmt)
            run_backend("group_norm", backend, x, y, g, w, b, 1e-5, True, bnc)
            assert canary_intact(y, buf), f"{backend} cl={cl} token_major={token_major}: wrote outside the output"
            check_against_oracle(y, x, g, w, b, 1e-5, "silu", bnc, token_major, 0.0,
                                 what=f"{backend} canary cl={cl} token_major={token_major}")


# --- property tests -----------------------------------------------------------------------------------------------

@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 3))
    g = draw(st.integers(1, 4))
    c = g * draw(st.integers(1, 4))
    ndim = draw(st.sampled_from([4, 5]))
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(ndim - 2))
    return (n, c, spatial, g), draw(st.booleans()), draw(st.sampled_from([None, "silu"])), draw(st.booleans())


@settings(max_examples=30, deadline=None)
@given(problem=small_problems(), seed=st.integers(0, 2 ** 16))
def test_property_small_shapes(problem, seed):
    shape, channels_last, act, with_bias_nc = problem
    x, g, w, b, bnc = make_inputs(shape, torch.float32, channels_last, act=act, bias_nc=with_bias_nc, seed=seed)
    ref = oracle(x, g, w, b, 1e-5, act, bnc)
    for variant in CPU_VARIANTS:
        with backend_variant(variant) as backend:
            out = group_norm(x, g, w, b, act=act, bias_nc=bnc, backend=backend)
        # groups of a single value normalise to 0 (variance 0): exact; otherwise fp32 rounding
        assert max_abs_err(out, ref) < 5e-5, variant


# --- custom op registration --------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x, g, w, b, bnc = make_inputs(SHAPES[0], torch.float32, channels_last, bias_nc=True)
    for args in ((x, g, w, b, 1e-5, "silu", bnc, False, "cpu"), (x, g, None, None, 1e-6, "", None, True, "cpu")):
        torch.library.opcheck(torch.ops.pydiffmed.group_norm.default, args)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("token_major", [False, True])
def test_backward_matches_reference_autograd(channels_last, token_major):
    """The op's backward (recompute through torch's GroupNorm) against autograd through the two-pass reference."""
    x, g, w, b, bnc = make_inputs(SHAPES[0], torch.float32, channels_last, act="silu", bias_nc=True, seed=5)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, bnc)]
    out = group_norm(leaves[0], g, *leaves[1:3], act="silu", bias_nc=leaves[3], token_major=token_major)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, bnc)]
    ref = reference.group_norm(ref_leaves[0], g, *ref_leaves[1:3], act="silu", bias_nc=ref_leaves[3])
    if token_major:
        ref = ref.flatten(2).transpose(1, 2)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    for name, got, want in zip(("x", "weight", "bias", "bias_nc"), grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    only_x = x.detach().clone().requires_grad_()  # frozen affine parameters: a gradient for x alone
    group_norm(only_x, g, w, b, token_major=token_major).sum().backward()
    assert only_x.grad is not None and torch.isfinite(only_x.grad).all()


# --- bad input -----------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    x = torch.randn(2, 6, 3, 4, 5)
    w, b = torch.randn(6), torch.randn(6)
    cases = [
        (ValueError, "x", lambda: group_norm(torch.randn(2, 6, 5), 3)),
        (ValueError, "x", lambda: group_norm(torch.randn(1, 2, 6, 3, 4, 5), 3)),
        (ValueError, "num_groups", lambda: group_norm(x, 4)),
        (ValueError, "num_groups", lambda: group_norm(x, 0)),
        (ValueError, "num_groups", lambda: group_norm(x, 3.0)),
        (ValueError, "weight", lambda: group_norm(x, 3, torch.randn(5), b)),
        (ValueError, "bias", lambda: group_norm(x, 3, w, torch.randn(6, 1))),
        (ValueError, "bias_nc", lambda: group_norm(x, 3, bias_nc=torch.randn(2, 5))),
        (ValueError, "bias_nc", lambda: group_norm(x, 3, bias_nc=torch.randn(6))),
        (TypeError, "x", lambda: group_norm(torch.ones(2, 6, 3, 4, 5, dtype=torch.int32), 3)),
        (TypeError, "x", lambda: group_norm(x.double(), 3)),
        (TypeError, "weight", lambda: group_norm(x, 3, torch.ones(6, dtype=torch.int64))),
        (TypeError, "x", lambda: group_norm(x.numpy(), 3)),
        (ValueError, "weight", lambda: group_norm(x, 3, w.to("meta"), b)),
        (ValueError, "bias_nc", lambda: group_norm(x, 3, bias_nc=torch.randn(2, 6, device="meta"))),
        (ValueError, "act", lambda: group_norm(x, 3, act="relu")),
        (ValueError, "eps", lambda: group_norm(x, 3, eps=0.0)),
        (ValueError, "eps", lambda: group_norm(x, 3, eps=float("nan"))),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


# --- dispatch ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_forced_cuda_backend_lists_reasons():
    x = torch.randn(1, 4, 2, 3, 5)
    with pytest.raises(backends.BackendUnavailable, match="cuda.*no CUDA device"):
        group_norm(x, 2, backend="cuda")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        group_norm(torch.randn(1, 4, 2, 3, 5), 2, backend="fortran")


def _spy_backends(monkeypatch):
    called = []
    for name, impl in backends.implementations("group_norm").items():
        def spy(*args, _name=name, _run=impl.run):
            called.append(_name)
            return _run(*args)
        monkeypatch.setattr(impl, "run", spy)
    return called


def test_env_var_forces_the_backend(monkeypatch):
    called = _spy_backends(monkeypatch)
    x = torch.randn(1, 4, 2, 3, 5)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    group_norm(x, 2)
    monkeypatch.setenv(backends.ENV_VAR, "cpu")
    group_norm(x, 2)
    monkeypatch.delenv(backends.ENV_VAR)
    group_norm(x, 2)
    # default on a CPU tensor: triton is interpreter-only (never picked unforced), cuda needs a GPU -> cpu
    assert called == ["torch", "cpu", "cpu"]
    if not HAS_CUDA:
        monkeypatch.setenv(backends.ENV_VAR, "cuda")
        with pytest.raises(backends.BackendUnavailable, match="no CUDA device"):
            group_norm(x, 2)


def test_select_remembers_answers_only_while_they_hold(request):
    """select() caches per (op, forced backend, input facts): a later registration is seen, and an op with
    input-dependent limits is asked again on every call."""
    x = torch.randn(2)
    for op in ("probe_op", "probe_limited_op"):
        request.addfinalizer(lambda op=op: backends.unregister(op))
    backends.register("probe_op", "torch")(lambda: "torch")
    assert backends.select("probe_op", None, (x,)) == "torch"
    backends.register("probe_op", "cpu")(lambda: "cpu")
    assert backends.select("probe_op", None, (x,)) == "cpu"

    backends.register("probe_limited_op", "torch")(lambda: "torch")
    backends.register("probe_limited_op", "cpu", reasons=lambda small: [] if small else ["too big"])(lambda: "cpu")
    assert backends.select("probe_limited_op", None, (x,), small=True) == "cpu"
    assert backends.select("probe_limited_op", None, (x,), small=False) == "torch"
    with pytest.raises(backends.BackendUnavailable, match="too big"):
        backends.select("probe_limited_op", "cpu", (x,), small=False)
    assert backends.select("probe_limited_op", "cpu", (x,), small=True) == "cpu"


def test_backend_argument_overrides_env_var(monkeypatch):
    called = _spy_backends(monkeypatch)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    group_norm(torch.randn(1, 4, 2, 3, 5), 2, backend="cpu")
    assert called == ["cpu"]


# --- nn modules ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
def test_modules_match_torch_nn(channels_last):
    torch_gn = torch.nn.GroupNorm(4, 12, eps=1e-6)
    with torch.no_grad():
        torch_gn.weight.normal_()
        torch_gn.bias.normal_()
    ours = pdm_nn.GroupNorm3d(4, 12, eps=1e-6)
    ours_silu = pdm_nn.GroupNormSiLU(4, 12, eps=1e-6)
    assert set(ours.state_dict()) == set(torch_gn.state_dict()) == set(ours_silu.state_dict())
    ours.load_state_dict(torch_gn.state_dict())
    ours_silu.load_state_dict(torch_gn.state_dict())
    x = torch.randn(2, 12, 5, 6, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = torch_gn(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_silu(x), F.silu(expected), rtol=1e-5, atol=1e-5)
        bnc = torch.randn(2, 12)
        torch.testing.assert_close(ours_silu(x, bias_nc=bnc), F.silu(torch_gn(x + bnc[:, :, None, None, None])),
                                   rtol=1e-5, atol=1e-5)


# --- GPU (marked gpu: skipped without CUDA, "needs a CUDA GPU") --------------------------------------------------
# The triton and cuda backends on CUDA tensors: the same oracle comparison as on the CPU plus shapes whose spatial
# reduction splits into many chunks, the launchers with the chunk count forced, large offsets, misaligned
# pointers, a captured CUDA graph and no host syncs. Without a GPU the same code runs through the Triton
# interpreter (above) and the CUDA kernels through the CPU emulation (test_cuda_sources).

GPU_BACKENDS = ["triton", "cuda"]
GPU_SHAPES = SHAPES + [LARGE_SHAPE, (2, 320, (9, 10, 11), 32),
                       (1, 64, (16, 16, 16), 32),
                       (1, 320, (6, 10, 10), 32),   # C/G = 10
                       (2, 32, (33, 31), 8),        # 4-D
                       (1, 8, (48, 48, 48), 2)]     # few groups, many positions: split reduction


def _require(backend):
    reasons = backends.backend_reasons(backend)
    if reasons:
        pytest.skip(f"{backend} backend unavailable: {'; '.join(reasons)}")


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("case", _cases(GPU_SHAPES), ids=_ids)
    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_matches_oracle(self, backend, case):
        _require(backend)
        _run_all_options(backend, *case, device="cuda")

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
    def test_nan_canary(self, backend, dtype):
        _require(backend)
        for cl in (False, True):
            x, g, w, b, bnc = make_inputs(LARGE_SHAPE, dtype, cl, bias_nc=True, device="cuda")
            fmt = channels_last_format(x.ndim) if cl else torch.contiguous_format
            n, c = x.shape[:2]
            for token_major in (False, True):
                shape = (n, math.prod(x.shape[2:]), c) if token_major else None
                y, buf = canary_like(x, shape=shape, memory_format=torch.contiguous_format if token_major else fmt)
                run_backend("group_norm", backend, x, y, g, w, b, 1e-5, True, bnc)
                torch.cuda.synchronize()
                assert canary_intact(y, buf), f"{backend} cl={cl} token_major={token_major}"
                check_against_oracle(y.cpu(), x.cpu(), g, w.cpu(), b.cpu(), 1e-5, "silu", bnc.cpu(), token_major,
                                     0.0, what=f"{backend} canary")

    @pytest.mark.parametrize("num_chunks", [1, 2, 7, 64])
    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_launcher_split_reduction_and_canary(self, backend, channels_last, num_chunks):
        """The launchers directly, with the number of spatial chunks forced, writing into a NaN canary buffer."""
        _require(backend)
        if backend == "triton":
            from pydiffmed.triton_kernels.group_norm import group_norm_launch
        else:
            from pydiffmed._cuda import group_norm_launch
        x, g, w, b, bnc = make_inputs((2, 40, (7, 9, 11), 5), torch.float32, channels_last, bias_nc=True,
                                      device="cuda")
        fmt = channels_last_format(x.ndim) if channels_last else torch.contiguous_format
        y, buf = canary_like(x, memory_format=fmt)
        group_norm_launch(x, y, g, w, b, bnc, 1e-5, True, x_channels_last=channels_last,
                          y_channels_last=channels_last, num_chunks=num_chunks)
        torch.cuda.synchronize()
        assert canary_intact(y, buf)
        assert max_abs_err(y.cpu(), oracle(x.cpu(), g, w.cpu(), b.cpu(), 1e-5, "silu", bnc.cpu())) < 2e-5

    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_large_offset_keeps_fp32_accuracy(self, backend, channels_last):
        _require(backend)
        x, g, w, b, bnc = make_inputs((2, 32, (12, 12, 12), 8), torch.float32, channels_last, bias_nc=True,
                                      offset=1000.0, device="cuda")
        y = group_norm(x, g, w, b, act="silu", bias_nc=bnc, backend=backend)
        assert max_abs_err(y.cpu(), oracle(x.cpu(), g, w.cpu(), b.cpu(), 1e-5, "silu", bnc.cpu())) < 2e-5

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_misaligned_input_and_no_affine(self, backend, dtype):
        """A tensor starting one element into its storage (no 16-byte alignment) takes the scalar-load path."""
        _require(backend)
        shape, groups = (2, 16, 8, 8, 8), 4
        storage = torch.randn(math.prod(shape) + 1, device="cuda").to(dtype)
        x = storage[1:].view(shape)
        y = group_norm(x, groups, backend=backend)
        check_against_oracle(y.cpu(), x.cpu(), groups, None, None, 1e-5, None, None, False, 0.0,
                             what=f"{backend} misaligned {dtype}")

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_cuda_graph_capture_and_replay(self, backend):
        _require(backend)
        shape = (2, 64, (16, 16, 16), 32)
        x, g, w, b, bnc = make_inputs(shape, torch.bfloat16, True, bias_nc=True, device="cuda")

        def run():
            return group_norm(x, g, w, b, act="silu", bias_nc=bnc, backend=backend)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compilation, autotuning and caches outside the capture
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        for seed in (1, 2):
            x_new, _, _, _, bnc_new = make_inputs(shape, torch.bfloat16, True, bias_nc=True, device="cuda",
                                                  seed=seed)
            x.copy_(x_new)
            bnc.copy_(bnc_new)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, run()), f"replay {seed} differs from an eager call on the same data"
            check_against_oracle(out.cpu(), x.cpu(), g, w.cpu(), b.cpu(), 1e-5, "silu", bnc.cpu(), False, 0.0,
                                 what=f"{backend} graph replay {seed}")

    @pytest.mark.parametrize("backend", GPU_BACKENDS)
    def test_no_host_sync(self, backend):
        _require(backend)
        x, g, w, b, bnc = make_inputs((1, 24, (9, 9, 9), 3), torch.float16, False, bias_nc=True, device="cuda")
        group_norm(x, g, w, b, act="silu", bias_nc=bnc, backend=backend)  # compile first
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for token_major in (False, True):
                group_norm(x, g, w, b, act="silu", bias_nc=bnc, token_major=token_major, backend=backend)
            group_norm(x.to(memory_format=channels_last_format(x.ndim)), g, w, b, bias_nc=bnc, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode(previous)


# --- the two phases alone: group_norm_stats and group_norm_apply --------------------------------------------------

def _float64_group_stats(x, groups, bias_nc=None):
    n, c = x.shape[:2]
    xd = x.double()
    if bias_nc is not None:
        xd = xd + bias_nc.double().reshape(n, c, *(1,) * (x.ndim - 2))
    grouped = xd.reshape(n, groups, -1)
    mean = grouped.mean(-1)
    return grouped.shape[-1], mean, (grouped - mean[..., None]).square().sum(-1)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_stats_phase_matches_a_float64_oracle(variant, dtype, channels_last):
    torch.manual_seed(3)
    for n, c, spatial, groups in (*SHAPES, LARGE_SHAPE):
        x = (torch.randn(n, c, *spatial) * 2 + 500).to(dtype)  # an offset far larger than the spread
        if channels_last:
            x = x.to(memory_format=channels_last_format(x.ndim))
        bias_nc = torch.randn(n, c)
        with backend_variant(variant) as backend:
            count, mean, m2 = group_norm_stats(x, groups, bias_nc=bias_nc, backend=backend)
        want_count, want_mean, want_m2 = _float64_group_stats(x, groups, bias_nc)
        assert count == want_count and mean.dtype == m2.dtype == torch.float64
        assert mean.shape == m2.shape == (n, groups)
        torch.testing.assert_close(mean, want_mean, rtol=0, atol=1e-6 * 500)
        torch.testing.assert_close(m2, want_m2, rtol=2e-5, atol=0)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layouts", [(False, False), (True, True), (False, True), (True, False)])
def test_stats_then_apply_is_the_fused_op(variant, dtype, layouts):
    """Statistics of two depth tiles merged, then each tile normalised by the apply phase into its rows of the
    output: the fused op on the whole volume, within the dtype's rounding."""
    from pydiffmed.partition import GroupStats

    torch.manual_seed(4)
    x_cl, y_cl = layouts
    n, c, spatial, groups = 2, 24, (9, 5, 7), 3
    x = (torch.randn(n, c, *spatial) + 30).to(dtype)
    weight, bias, bias_nc = torch.randn(c), torch.randn(c), torch.randn(n, c)
    if x_cl:
        x = x.to(memory_format=torch.channels_last_3d)
    want = group_norm(x, groups, weight, bias, 1e-5, act="silu", bias_nc=bias_nc)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
    stats = GroupStats(groups)
    with backend_variant(variant) as backend:
        for a, b in ((0, 4), (4, 9)):
            stats.merge(*group_norm_stats(x[:, :, a:b].contiguous(memory_format=x_memory(x_cl)), groups,
                                          bias_nc=bias_nc, backend=backend))
        apply = stats.normalizer(norm, "silu")
        out = torch.empty_like(x, memory_format=x_memory(y_cl))
        for a, b in ((0, 4), (4, 9)):
            tile = x[:, :, a:b].contiguous(memory_format=x_memory(x_cl))
            rows = torch.empty_like(tile, memory_format=x_memory(y_cl))
            group_norm_apply(tile, apply.mean - bias_nc.double(), apply.scale, apply.shift, act="silu", out=rows,
                             backend=backend)
            out[:, :, a:b] = rows
    tolerance = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.float(), want.float(), rtol=tolerance, atol=tolerance)


def x_memory(channels_last):
    return torch.channels_last_3d if channels_last else torch.contiguous_format


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_apply_keeps_a_float64_mean_exact_on_offset_data(variant):
    """x ≈ 1e4 with unit spread: a mean rounded to fp32 (ulp 1e-3) would shift every output by ~1e-3; the apply
    carries the fp64 mean in two fp32 parts."""
    torch.manual_seed(5)
    x = torch.randn(1, 4, 6, 6, 6, dtype=torch.float64) + 10000.123456
    mean = x.mean(dim=(2, 3, 4))
    scale = torch.ones(1, 4, dtype=torch.float64)
    with backend_variant(variant) as backend:
        out = group_norm_apply(x.float(), mean, scale, torch.zeros(1, 4), backend=backend)
    want = x - mean[..., None, None, None]
    assert (out.double() - want).abs().max() < 2e-3  # x itself is rounded to fp32 (ulp 1e-3) on the way in
    if variant != "torch":
        assert (out.double() - want).abs().max() < (x.float().double() - x).abs().max() + 1e-5


def test_apply_into_a_strided_view_falls_back_and_says_why():
    x = torch.randn(2, 4, 3, 3, 3)
    big = torch.zeros(2, 4, 5, 3, 3)
    view = big[:, :, 1:4]
    mean, scale, shift = torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 4)
    assert "out is neither contiguous nor channels-last" in " ".join(
        backends.not_supported_reasons("group_norm_apply", "cpu", (x, view), x=x, out=view))
    group_norm_apply(x, mean, scale, shift, out=view)
    torch.testing.assert_close(big[:, :, 1:4], x)
    assert big[:, :, 0].abs().max() == 0 and big[:, :, 4].abs().max() == 0


@pytest.mark.parametrize("call, message", [
    (lambda x: group_norm_stats(x, 3), "num_groups must be a positive int dividing the 4 channels"),
    (lambda x: group_norm_stats(x, 2, bias_nc=torch.zeros(2, 3)), "bias_nc"),
    (lambda x: group_norm_stats(x[0, 0], 2), "must be 4-D"),
    (lambda x: group_norm_apply(x, torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, 4)), "mean"),
    (lambda x: group_norm_apply(x, torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 4), act="relu"), "act"),
    (lambda x: group_norm_apply(x, torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 4),
                                out=torch.empty(2, 4, 3, 3, 3, dtype=torch.float16)), "out must have x's shape"),
])
def test_phase_bad_input_names_the_problem(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(torch.randn(2, 4, 3, 3, 3))
