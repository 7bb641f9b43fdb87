"""ops.attention (triton under the interpreter, torch SDPA) and the fused SpatialAttentionBlock vs MONAI's."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_close_by_rule, canary_intact, canary_like, max_abs_err, randomize_, run_backend
from pydiffmed import backends, ops
from pydiffmed.ops import reference
from pydiffmed.triton_kernels.attention import attention_launch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
attention_ops = importlib.import_module("pydiffmed.ops.attention")  # the module: ops.attention is the function
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(batch, heads, n_q, n_kv, d, dtype, device=DEVICE, magnitude=1.0):
    q = (torch.randn(batch, heads, n_q, d) * magnitude).to(device=device, dtype=dtype)
    k = (torch.randn(batch, heads, n_kv, d) * magnitude).to(device=device, dtype=dtype)
    v = torch.randn(batch, heads, n_kv, d).to(device=device, dtype=dtype)
    return q, k, v


def float64_reference(q, k, v, scale=None):
    return reference.attention(q.double(), k.double(), v.double(), scale, compute_dtype=torch.float64)


def check_kernel(q, k, v, scale=None, block_m=None, block_n=None, what=""):
    """Run the triton kernel into a canary-guarded output; compare with the float64 oracle by the §6 rule
    (torch SDPA at the same dtype is the 'plain torch' error)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, buf = canary_like(q)
    attention_launch(q, k, v, out, scale, block_m, block_n)
    assert canary_intact(out, buf), f"{what}: write outside the output or NaN"
    torch_at_dtype = torch.empty_like(q)
    run_backend("attention", "torch", q, k, v, torch_at_dtype, scale)
    assert_close_by_rule(out, float64_reference(q, k, v, scale), torch_at_dtype, what=what)
    return out


# --- the triton kernel ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("n", [1, 7, 64, 343, 1000])
def test_triton_self_attention(n, d, dtype):
    heads = 1 if n == 1000 else 2
    q, k, v = qkv(1, heads, n, n, d, dtype)
    check_kernel(q, k, v, what=f"N={n} d={d} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_q,n_kv", [(7, 100), (130, 9), (64, 343), (1, 65)])
def test_triton_cross_attention(n_q, n_kv, dtype):
    q, k, v = qkv(2, 2, n_q, n_kv, 32, dtype)
    check_kernel(q, k, v, what=f"N_q={n_q} N_kv={n_kv}")


@pytest.mark.parametrize("d", [8, 24, 48, 128])
def test_triton_head_dims_padded_or_large(d):
    """d = 128 (largest supported) and dims that are not a power of two or below the 16-wide dot (masked)."""
    q, k, v = qkv(1, 1, 50, 70, d, torch.float32)
    check_kernel(q, k, v, what=f"d={d}")


@pytest.mark.parametrize("n_q,n_kv", [(65, 33), (17, 1), (16, 16)])
def test_triton_fully_masked_tail_rows_and_small_tiles(n_q, n_kv):
    """16×16 tiles: many full key tiles plus a tail; the last query block is one real row and 15 masked rows
    (n_q = 65, 17); n_kv = 1 leaves 15 masked key columns; 16/16 has no tail at all."""
    q, k, v = qkv(1, 2, n_q, n_kv, 16, torch.float16)
    out = check_kernel(q, k, v, block_m=16, block_n=16, what=f"N_q={n_q} N_kv={n_kv}")
    if n_kv == 1:
        torch.testing.assert_close(out, v.expand_as(out), rtol=0, atol=0)  # softmax over one key is exactly 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_large_magnitude_logits_stay_finite(backend):
    """fp16 inputs whose scores reach ~±1e4 after scaling: exp must be taken after the running max is removed."""
    q, k, v = qkv(1, 2, 40, 90, 64, torch.float16, magnitude=100.0)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 8
    assert scores.abs().max() > 1e4
    out = ops.attention(q, k, v, backend=backend)
    assert torch.isfinite(out).all()
    sdpa = ops.attention(q, k, v, backend="torch")
    assert_close_by_rule(out, float64_reference(q, k, v), sdpa, floor=1e-3, what="large logits")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_token_major_layout_reads_fused_qkv_in_place(backend):
    """q, k, v as strided views of one B×N×3×heads×d projection ('bnhd'); output B×N×heads×d contiguous."""
    batch, n, heads, d = 2, 45, 3, 16
    fused = torch.randn(batch, n, 3, heads, d, device=DEVICE)
    q, k, v = fused.unbind(2)
    out = ops.attention(q, k, v, layout="bnhd", backend=backend)
    assert out.shape == (batch, n, heads, d) and out.is_contiguous()
    expected = float64_reference(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert max_abs_err(out, expected) < 1e-5
    # the same inputs in the head-major layout give the same numbers
    out_bhnd = ops.attention(*(t.transpose(1, 2) for t in (q, k, v)), backend=backend)
    assert max_abs_err(out_bhnd.transpose(1, 2), out) < 1e-6


def test_triton_arbitrary_strides():
    """k with a non-unit d stride, v sliced from a wider tensor, q with heads and batch swapped in memory."""
    q = torch.randn(3, 2, 20, 16, device=DEVICE).transpose(0, 1)
    k = torch.randn(2, 3, 16, 30, device=DEVICE).transpose(-1, -2)
    v = torch.randn(2, 3, 30, 40, device=DEVICE)[..., 5:21]
    check_kernel(q, k, v, scale=0.3, what="strided")


def test_public_op_triton_forced_matches_torch():
    q, k, v = qkv(2, 2, 33, 21, 32, torch.float32)
    out = ops.attention(q, k, v, scale=0.2, backend="triton")
    expected = ops.attention(q, k, v, scale=0.2, backend="torch")
    assert max_abs_err(out, expected) < 1e-5


def test_empty_query_or_batch():
    for shape_q, shape_kv in (((2, 1, 0, 16), (2, 1, 5, 16)), ((0, 1, 4, 16), (0, 1, 5, 16))):
        q, k, v = (torch.randn(s, device=DEVICE) for s in (shape_q, shape_kv, shape_kv))
        for backend in ("triton", "torch"):
            assert ops.attention(q, k, v, backend=backend).shape == shape_q


# --- the CPU bf16 kernel (pydiffmed._C, csrc/cpu/attention.cpp) ----------------------------------------------

needs_avx512_bf16 = pytest.mark.skipif(not attention_ops.cpu_kernel_supported(),
                                       reason="this CPU lacks AVX-512 BF16, which the CPU attention kernel needs "
                                              "(it is compiled all the same; ops.attention runs SDPA here)")


def cpu_bf16_qkv(batch, heads, n_q, n_kv, d, magnitude=1.0, seed=0):
    torch.manual_seed(seed)
    return qkv(batch, heads, n_q, n_kv, d, torch.bfloat16, device="cpu", magnitude=magnitude)


def check_cpu_kernel(q, k, v, scale=None, what=""):
    """The CPU kernel into a canary-guarded output against the float64 oracle, by the §6 rule (torch SDPA in bf16
    is the plain-torch error)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, buf = canary_like(q)
    attention_ops.cpu_kernel(q, k, v, out, scale)
    assert canary_intact(out, buf), f"{what}: write outside the output or NaN"
    sdpa = torch.empty_like(q)
    run_backend("attention", "torch", q, k, v, sdpa, scale)
    assert_close_by_rule(out, float64_reference(q, k, v, scale), sdpa, what=what)
    return out


@needs_avx512_bf16
@pytest.mark.parametrize("d", [1, 17, 64, 128])
@pytest.mark.parametrize("n_q, n_kv", [(1, 1), (7, 300), (64, 128), (129, 129), (200, 5)])
def test_cpu_kernel_matches_float64(n_q, n_kv, d):
    """Query counts around the 64-row task and key counts around the 128-key block and its 16-key vectors, with
    odd and full head dimensions."""
    check_cpu_kernel(*cpu_bf16_qkv(2, 3, n_q, n_kv, d), what=f"n_q={n_q} n_kv={n_kv} d={d}")


@needs_avx512_bf16
def test_cpu_kernel_strided_and_token_major_inputs():
    torch.manual_seed(0)
    q = torch.randn(3, 2, 20, 16).bfloat16().transpose(0, 1)
    k = torch.randn(2, 3, 16, 150).bfloat16().transpose(-1, -2)
    v = torch.randn(2, 3, 150, 40).bfloat16()[..., 5:21]
    check_cpu_kernel(q, k, v, scale=0.3, what="strided")
    fused = torch.randn(2, 45, 3, 2, 64).bfloat16()
    q, k, v = fused.unbind(2)
    out = ops.attention(q, k, v, layout="bnhd", backend="cpu")
    expected = check_cpu_kernel(*(t.transpose(1, 2) for t in (q, k, v)), what="fused qkv")
    if attention_ops.cpu_kernel_declines(q, 0.125) is None:
        assert torch.equal(out.transpose(1, 2), expected)


@needs_avx512_bf16
def test_cpu_kernel_random_shapes_and_memory_orders():
    """25 seeded cases: random sizes, and q, k, v each stored in a random axis order (views of permuted tensors),
    d possibly sliced out of a wider last axis."""
    gen = torch.Generator().manual_seed(7)

    def draw(high, low=1):
        return int(torch.randint(low, high + 1, (), generator=gen))

    def stored(shape, width):
        order = torch.randperm(4, generator=gen).tolist()
        full = list(shape[:3]) + [width]
        base = torch.randn([full[i] for i in order], generator=gen).bfloat16()
        view = base.permute([order.index(i) for i in range(4)])
        return view[..., :shape[3]]

    for case in range(25):
        batch, heads, n_q, n_kv, d = draw(2), draw(3), draw(150), draw(300), draw(80)
        width = d + draw(3, 0)
        q = stored((batch, heads, n_q, d), width)
        k = stored((batch, heads, n_kv, d), width)
        v = stored((batch, heads, n_kv, d), width)
        check_cpu_kernel(q, k, v, scale=0.05 + torch.rand((), generator=gen).item(), what=f"case {case}")


@needs_avx512_bf16
def test_cpu_kernel_large_logits_and_nan_rows():
    q, k, v = cpu_bf16_qkv(1, 2, 40, 300, 64, magnitude=30.0)
    assert (q.double() @ k.double().transpose(-1, -2)).abs().max() / 8 > 1e3
    check_cpu_kernel(q, k, v, what="large logits")
    q[0, 1, 5, 3] = float("nan")
    out = torch.empty_like(q)
    attention_ops.cpu_kernel(q, k, v, out, 0.125)
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[0, 1, 5] and nan_rows.sum() == 1 and torch.isnan(out[0, 1, 5]).all()


@needs_avx512_bf16
def test_cpu_kernel_bits_do_not_depend_on_threads():
    q, k, v = cpu_bf16_qkv(1, 2, 200, 300, 64)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.empty_like(q))
            attention_ops.cpu_kernel(q, k, v, outs[-1], 0.125)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_cpu_backend_runs_the_kernel_only_where_it_is_the_faster_one(monkeypatch):
    q, k, v = cpu_bf16_qkv(1, 2, 70, 90, 64)
    declines = attention_ops.cpu_kernel_declines
    assert "bf16 only" in declines(q.float(), 0.125)
    assert "d = 130" in declines(torch.zeros(1, 1, 2, 130, dtype=torch.bfloat16), 0.125)
    assert "not positive" in declines(q, -0.5)
    attention_ops._cpu_kernel_isa_reason.cache_clear()
    try:
        monkeypatch.setattr(backends, "cpu_bf16_feature", lambda: "amx_bf16")
        assert "AMX" in declines(q, 0.125) or not attention_ops.cpu_kernel_supported()
        monkeypatch.setattr(backends, "cpu_bf16_feature", lambda: "avx512_bf16")
        attention_ops._cpu_kernel_isa_reason.cache_clear()
        assert (declines(q, 0.125) is None) == attention_ops.cpu_kernel_supported()
        sdpa = torch.empty_like(q)
        run_backend("attention", "torch", q, k, v, sdpa, 0.125)
        out = ops.attention(q, k, v, scale=0.125, backend="cpu")
        if attention_ops.cpu_kernel_supported():
            kernel = torch.empty_like(q)
            attention_ops.cpu_kernel(q, k, v, kernel, 0.125)
            assert torch.equal(out, kernel) and not torch.equal(out, sdpa)
        else:
            assert torch.equal(out, sdpa)
        assert torch.equal(ops.attention(q.float(), k.float(), v.float(), scale=0.125, backend="cpu"),
                           ops.attention(q.float(), k.float(), v.float(), scale=0.125, backend="torch"))
    finally:
        attention_ops._cpu_kernel_isa_reason.cache_clear()


@needs_avx512_bf16
def test_cpu_kernel_refuses_what_it_cannot_run():
    q, k, v = cpu_bf16_qkv(1, 1, 4, 4, 16)
    out = torch.empty_like(q)
    with pytest.raises(TypeError, match="k is float32"):
        attention_ops.cpu_kernel(q, k.float(), v, out, 0.25)
    with pytest.raises(ValueError, match=r"v \(1, 1, 5, 16\)"):
        attention_ops.cpu_kernel(q, k, torch.zeros(1, 1, 5, 16, dtype=torch.bfloat16), out, 0.25)
    big = torch.zeros(1, 1, 4, 130, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="d = 130"):
        attention_ops.cpu_kernel(big, big, big, torch.empty_like(big), 0.25)
    with pytest.raises(ValueError, match="scale"):
        attention_ops.cpu_kernel(q, k, v, out, 0.0)
    with pytest.raises(ValueError, match="d-stride"):
        attention_ops.cpu_kernel(q, k, v, torch.empty(1, 1, 16, 4, dtype=torch.bfloat16).transpose(-1, -2), 0.25)


# --- dispatch and errors -------------------------------------------------------------------------------------

def test_cpu_tensors_dispatch_to_cpu_or_torch_not_interpreter():
    q, k, v = qkv(1, 1, 4, 4, 16, torch.float32, device="cpu")
    name = backends.select("attention", None, (q, k, v), q=q, k=k, v=v)
    assert name in ("cpu", "torch")


def test_cuda_backend_declares_attention_unsupported():
    q, k, v = qkv(1, 1, 4, 4, 16, torch.float32, device="cpu")
    reasons = backends.not_supported_reasons("attention", "cuda", (q,), forced=True, q=q, k=k, v=v)
    assert reasons
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        ops.attention(q, k, v, backend="cuda")


def test_head_dim_over_128_is_refused_by_triton_but_runs_on_torch():
    q, k, v = qkv(1, 1, 4, 6, 256, torch.float32, device="cpu")
    with pytest.raises(backends.BackendUnavailable, match="d = 256"):
        ops.attention(q, k, v, backend="triton")
    assert max_abs_err(ops.attention(q, k, v), float64_reference(q, k, v)) < 1e-5


def test_triton_limits_on_grid_and_offsets():
    from pydiffmed.triton_kernels.attention import unsupported_reasons

    small = torch.empty(1, 1, 2, 16, device="meta")
    assert unsupported_reasons(small, small, small) == []
    many_heads = torch.empty(70000, 1, 2, 16, device="meta")
    assert any("grid limit" in r for r in unsupported_reasons(many_heads, many_heads, many_heads))
    far_apart = torch.empty_strided((1, 1, 2, 16), (0, 0, 2 ** 31, 1), device="meta")
    assert any("k: offsets" in r for r in unsupported_reasons(small, far_apart, small))


def test_bf16_on_interpreter_refused():
    q, k, v = qkv(1, 1, 4, 4, 16, torch.bfloat16, device="cpu")
    with pytest.raises(backends.BackendUnavailable, match="bfloat16"):
        ops.attention(q, k, v, backend="triton")
    assert ops.attention(q, k, v).dtype == torch.bfloat16  # SDPA on CPU handles bf16


def test_bad_inputs_raise_before_any_kernel():
    q, k, v = qkv(2, 2, 5, 6, 16, torch.float32, device="cpu")
    cases = [
        (TypeError, "q must be a torch.Tensor", dict(q=q.numpy())),
        (TypeError, "q has dtype float64", dict(q=q.double())),
        (TypeError, "k has dtype float16", dict(k=k.half())),
        (TypeError, "v has dtype bfloat16", dict(v=v.bfloat16())),
        (ValueError, "q must be 4-D", dict(q=q[0])),
        (ValueError, "k has shape", dict(k=k[:1])),
        (ValueError, "k has shape", dict(k=torch.randn(2, 2, 6, 8))),
        (ValueError, "v has shape", dict(v=v[:, :, :3])),
        (ValueError, "v has shape", dict(v=torch.randn(2, 3, 6, 16))),
        (ValueError, "no tokens", dict(k=k[:, :, :0], v=v[:, :, :0])),
        (ValueError, "k is on meta", dict(k=k.to("meta"))),
        (ValueError, "layout must be", dict(layout="nhwc")),
        (ValueError, "scale must be a finite", dict(scale=float("nan"))),
        (ValueError, "scale must be a finite", dict(scale="0.1")),
        (ValueError, "is not a backend", dict(backend="gpu")),
    ]
    for error, message, change in cases:
        args = dict(q=q, k=k, v=v)
        kwargs = {key: change.pop(key) for key in ("layout", "scale", "backend") if key in change}
        args.update(change)
        with pytest.raises(error, match=message):
            ops.attention(args["q"], args["k"], args["v"], **kwargs)


def test_bnhd_shape_errors_name_the_layout():
    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match="B×N×heads×d"):
        ops.attention(q, torch.randn(1, 5, 3, 16), torch.randn(1, 5, 3, 16), layout="bnhd")


# --- custom op -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,tokens_before_heads", [("triton", False), ("triton", True), ("torch", True)])
def test_opcheck(backend, tokens_before_heads):
    q, k, v = qkv(1, 2, 5, 3, 16, torch.float32)
    if tokens_before_heads:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    torch.library.opcheck(torch.ops.pydiffmed.attention.default, (q, k, v, 0.25, tokens_before_heads, backend))


def test_backward_matches_sdpa():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 6, 9, 16, torch.float32, device="cpu"))
    grad_out = torch.randn(1, 6, 2, 16)
    out = ops.attention(*(t.transpose(1, 2) for t in (q, k, v)), layout="bnhd")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    expected = torch.autograd.grad(expected_out, (q, k, v), grad_out)
    for got, want in zip(grads, expected):
        assert max_abs_err(got, want) < 1e-6


def test_triton_kernel_compiles_for_gpus():
    """The compiled (non-interpreter) path: Triton lowers the kernel to sm_80 and sm_90 machine code without a
    GPU, so type or layout errors in the fp16/bf16 tensor-core path fail here too."""
    script = (
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from pydiffmed.triton_kernels.attention import _attention_fwd_kernel as kern, choose_config\n"
        "import torch\n"
        "for arch in (80, 90):\n"
        "    for dt, tdt, d in (('fp16', torch.float16, 64), ('bf16', torch.bfloat16, 128),\n"
        "                       ('fp32', torch.float32, 32)):\n"
        "        bm, bn, warps, stages = choose_config(d, tdt, False, 4096, 4)\n"
        "        sig = {n: 'i32' for n in kern.arg_names}\n"
        "        sig.update({n: '*' + dt for n in 'QKVO'}, qk_scale='fp32')\n"
        "        consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, MASK_D=False, UPCAST=dt == 'fp32',\n"
        "                      DOT_PRECISION='ieee' if dt == 'fp32' else 'tf32')\n"
        "        sig.update({n: 'constexpr' for n in consts})\n"
        "        c = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget('cuda', arch, 32),\n"
        "                           options=dict(num_warps=warps, num_stages=stages))\n"
        "        assert c.asm['cubin'], (arch, dt)\n"
        "        if dt != 'fp32':\n"
        "            assert 'mma' in c.asm['ptx'], (arch, dt)\n"
        "print('ok')\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# --- GPU ----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_q,n_kv,d", [(4096, 4096, 64), (1000, 1000, 128), (32768, 32768, 64), (343, 77, 32)])
def test_gpu_triton_vs_sdpa(n_q, n_kv, d, dtype):
    heads = 1 if n_q >= 32768 else 4
    q, k, v = qkv(1, heads, n_q, n_kv, d, dtype, device="cuda")
    out = ops.attention(q, k, v)  # triton is the default CUDA path
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if n_q * n_kv <= 4096 * 4096:
        assert_close_by_rule(out, float64_reference(q, k, v), sdpa, what=f"N={n_q} {dtype}")
    else:  # a float64 N×N reference is too large: compare with SDPA in fp32
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        assert_close_by_rule(out, ref, sdpa, floor=1e-4, what=f"N={n_q} {dtype}")


@pytest.mark.gpu
def test_gpu_token_major_bf16_and_block():
    fused = torch.randn(2, 4096, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = fused.unbind(2)
    out = ops.attention(q, k, v, layout="bnhd")
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    ref = float64_reference(*(t.transpose(1, 2) for t in (q, k, v)))
    assert_close_by_rule(out.transpose(1, 2), ref, sdpa, what="bnhd bf16")


# --- the attention block -------------------------------------------------------------------------------------

BLOCK_CONFIGS = [
    # spatial_dims, channels, num_head_channels, groups, include_fc, use_combined_linear, spatial shape
    (3, 32, 8, 8, True, False, (5, 6, 7)),
    (3, 16, None, 4, False, True, (4, 3, 5)),
    (3, 24, 12, 6, True, True, (3, 3, 3)),
    (2, 32, 16, 8, True, False, (9, 7)),
    (2, 16, 4, 16, False, False, (6, 5)),
    (1, 8, 4, 2, True, False, (11,)),
]


def monai_block(spatial_dims, channels, head_channels, groups, include_fc, combined):
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock as MonaiBlock

    block = MonaiBlock(spatial_dims, channels, head_channels, norm_num_groups=groups, include_fc=include_fc,
                       use_combined_linear=combined).eval()
    with torch.no_grad():  # non-trivial norm affine parameters
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    return block


def our_block(spatial_dims, channels, head_channels, groups, include_fc, combined):
    from pydiffmed.models.attention_block import SpatialAttentionBlock

    return SpatialAttentionBlock(spatial_dims, channels, head_channels, norm_num_groups=groups,
                                 include_fc=include_fc, use_combined_linear=combined)


@pytest.mark.parametrize("config", BLOCK_CONFIGS, ids=lambda c: f"{c[0]}d-C{c[1]}-hc{c[2]}-fc{c[4]}-comb{c[5]}")
def test_block_matches_monai(config):
    *args, spatial = config
    reference_block = monai_block(*args)
    block = our_block(*args)
    assert list(block.state_dict()) == list(reference_block.state_dict())  # same keys, same order
    block.load_state_dict(reference_block.state_dict())
    x = torch.randn(2, args[1], *spatial)
    with torch.no_grad():
        expected = reference_block(x)
        out = block(x)
    assert out.shape == expected.shape
    if len(spatial) > 1:
        fmt = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
        assert out.is_contiguous(memory_format=fmt)  # the token-major result, no transpose back
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_block_channels_last_input_and_from_monai():
    from pydiffmed.models.attention_block import SpatialAttentionBlock

    reference_block = monai_block(3, 32, 8, 8, True, False)
    block = SpatialAttentionBlock.from_monai(reference_block)
    x = torch.randn(1, 32, 4, 5, 6).to(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_block(x), rtol=1e-5, atol=1e-5)


def test_block_fused_weights_follow_parameter_changes():
    reference_block = monai_block(3, 16, 8, 4, True, False)
    block = our_block(3, 16, 8, 4, True, False)
    block.load_state_dict(reference_block.state_dict())
    x = torch.randn(1, 16, 3, 4, 5)
    with torch.no_grad():
        block(x)  # builds the fused QKV cache
        for module in (reference_block, block):  # in-place change (version counter)
            module.attn.to_k.weight.mul_(1.5)
        torch.testing.assert_close(block(x), reference_block(x), rtol=1e-5, atol=1e-5)
        other = monai_block(3, 16, 8, 4, True, False)  # load_state_dict copies into the same storage
        block.load_state_dict(other.state_dict())
        torch.testing.assert_close(block(x), other(x), rtol=1e-5, atol=1e-5)
        block.half()  # cast: the cache must be rebuilt in fp16
        out_half = block(x.half())
    assert out_half.dtype == torch.float16
    assert max_abs_err(out_half, other(x).detach()) < 2e-2


def test_block_fp16_within_tolerance_rule():
    reference_block = monai_block(3, 32, 8, 8, True, False)
    block = our_block(3, 32, 8, 8, True, False)
    block.load_state_dict(reference_block.state_dict())
    x = torch.randn(1, 32, 6, 6, 6)
    with torch.no_grad():
        expected = reference_block(x)
        monai_half = reference_block.half()(x.half())
        out = block.half()(x.half())
    assert_close_by_rule(out, expected, monai_half, floor=1e-3, what="block fp16")


def test_block_gradients_match_monai():
    reference_block = monai_block(2, 16, 8, 4, True, True)
    block = our_block(2, 16, 8, 4, True, True)
    block.load_state_dict(reference_block.state_dict())
    x1 = torch.randn(2, 16, 5, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    reference_block(x1).square().sum().backward()
    block(x2).square().sum().backward()
    assert max_abs_err(x1.grad, x2.grad) < 1e-5
    assert max_abs_err(reference_block.attn.qkv.weight.grad, block.attn.qkv.weight.grad) < 1e-4


def test_block_rejects_wrong_rank():
    block = our_block(3, 16, 8, 4, True, False)
    with pytest.raises(ValueError, match="x must be 5-D"):
        block(torch.randn(1, 16, 4, 4))


@pytest.mark.gpu
def test_gpu_block_matches_monai_fp16():
    reference_block = monai_block(3, 64, 32, 16, True, False).cuda()
    block = our_block(3, 64, 32, 16, True, False).cuda()
    block.load_state_dict(reference_block.state_dict())
    x = torch.randn(2, 64, 16, 16, 16, device="cuda")
    with torch.no_grad():
        expected = reference_block(x)
        monai_half = reference_block.half()(x.half())
        out = block.half()(x.half())
    assert_close_by_rule(out, expected, monai_half, floor=1e-3, what="gpu block fp16")


def test_unet_bf16_forward_runs_the_cpu_kernel_where_dispatch_picks_it(monkeypatch):
    """The real UNet3D in bf16 on the CPU: its attention goes through pydiffmed._C's kernel exactly where
    cpu_kernel_declines says nothing against it, and agrees with the SDPA route within bf16 rounding."""
    from pydiffmed.models import UNet3D

    torch.manual_seed(0)
    model = UNet3D(spatial_dims=3, in_channels=1, out_channels=1, channels=(16, 32), attention_levels=(False, True),
                   num_res_blocks=1, num_head_channels=(0, 16), norm_num_groups=8)
    model = randomize_(model).to(torch.bfloat16).eval()
    x, t = torch.randn(1, 1, 8, 8, 8).bfloat16(), torch.tensor([500])
    shapes = []
    launch = attention_ops._launch_cpu_kernel
    monkeypatch.setattr(attention_ops, "_launch_cpu_kernel",
                        lambda q, *rest: (shapes.append(tuple(q.shape)), launch(q, *rest)))
    with torch.no_grad():
        out = model(x, t)
        monkeypatch.setattr(attention_ops, "cpu_kernel_declines", lambda q, scale: "SDPA for the comparison")
        sdpa_route = model(x, t)
    picked = attention_ops._cpu_kernel_isa_reason() is None  # bf16, d = 16 and scale > 0 take the kernel
    assert bool(shapes) == picked
    if picked:
        assert (1, 2, 64, 16) in shapes and not torch.equal(out, sdpa_route)
    rel = (out.float() - sdpa_route.float()).norm() / sdpa_route.float().norm()
    assert rel < 1e-2, rel
