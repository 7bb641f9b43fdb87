"""pydiffmed.ops.fused_step and its companions against the torch reference and against diffusers' schedulers.

Backends: every one runnable here (torch, cpu, triton under the interpreter), plus "cuda-emu": the CUDA kernel
of csrc/cuda/fused_step.cu compiled with g++ against the emulation of the CUDA launch model in tests/helpers.py
(shared with test_cuda_sources) and driven by the real launcher in pydiffmed/_cuda.py (so its indexing and
argument marshalling run without a GPU). On a GPU the @gpu tests run triton and cuda on CUDA tensors and
capture the op in a CUDA graph.
"""
from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

from helpers import (CAN_EMULATE_CUDA, assert_close_by_rule, build_cuda_emulation, canary_intact, canary_like,
                     launch_emulated, runnable_backends)
from pydiffmed import _cuda, backends, ops
from pydiffmed.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = len(ops.COEF_NAMES)
fs_module = importlib.import_module("pydiffmed.ops.fused_step")  # the module (ops.fused_step is the function)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

BACKENDS = runnable_backends("fused_step", [torch.empty(1)], x=torch.empty(1)) + (["cuda-emu"] if CAN_EMULATE_CUDA
                                                                                 else [])


# --- the CUDA kernel on the CPU ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_emulation_library(tmp_path_factory):
    """The kernels of fused_step.cu compiled for the CPU emulation (helpers.build_cuda_emulation)."""
    library = build_cuda_emulation("fused_step.cu", tmp_path_factory.mktemp("fused_step_emu"))
    assert hasattr(library, "emu_fused_step_kernel") and hasattr(library, "emu_per_sample_sumsq_kernel")
    return library


@pytest.fixture
def cuda_emu(request, monkeypatch):
    """Active when the test's backend is 'cuda-emu': dispatch maps it to the cuda backend's run function and
    the launcher's kernel call runs the emulated kernel on the CPU tensors."""
    if request.node.callspec.params.get("backend") != "cuda-emu":
        return
    lib = request.getfixturevalue("cuda_emulation_library")

    def kernel_launch(name, grid, block, args):
        launch_emulated(lib, name, grid, block, args)

    real_select = backends.select

    def select(op, backend, tensors, **inputs):
        if backend == "cuda-emu":
            return "cuda"
        return real_select(op, backend, tensors, **inputs)

    monkeypatch.setattr(_cuda, "fused_step_kernel_launch", kernel_launch)
    monkeypatch.setattr(backends, "select", select)


# --- cases ---------------------------------------------------------------------------------------------------

def _random_row(gen, history, noise, clip):
    r = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()  # noqa: E731
    return ops.step_coefs(p_x=r(0.5, 1.5), p_m=r(-1.0, 1.0), clip=1.25 if clip else None, a=r(0.2, 1.0),
                          b=r(-1.0, 1.0), c=[r(-0.5, 0.5) for _ in range(history)], s=r(0.1, 0.9) if noise else 0.0)


def _memory_format(layout, ndim):
    if layout == "cl":
        return torch.channels_last_3d if ndim == 5 else torch.channels_last
    return torch.contiguous_format


def _tensor(shape, dtype, layout, gen):
    t = torch.randn(shape, generator=gen).to(dtype)
    if layout == "strided":                        # a non-contiguous view: every other element of a wider tensor
        wide = torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen).to(dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous(memory_format=_memory_format(layout, len(shape)))


def run_case(backend, shape=(3, 4, 5, 6, 7), *, x_dtype=F32, m_dtype=F16, out_dtype=None, history=0,
             coefs="scalar", clip=False, cfg=False, noise="seeds", x0_out=None, model_input=None, layout="ncs",
             m_layout=None, out_layout=None, in_place=False, x0_into_h1=False, noise_step_tensor=False):
    """Runs fused_step with these options on `backend` and checks every output against the reference
    (tolerance rule of helpers, NaN canary after each output buffer)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, history, coefs, noise, layout)).encode()))
    b = shape[0]
    out_dtype = out_dtype or x_dtype
    x = _tensor(shape, x_dtype, layout, gen)
    m = _tensor(shape, m_dtype, m_layout or layout, gen)
    m_cond = _tensor(shape, m_dtype, m_layout or layout, gen) if cfg else None
    hist = [_tensor(shape, x_dtype, layout, gen) for _ in range(history)]
    noise_t = _tensor(shape, m_dtype, layout, gen) if noise == "tensor" else None
    seeds = torch.tensor([11, -5, 2 ** 40 + 3, 7, 0][:b]) if noise == "seeds" else None
    has_noise = noise is not None

    step_index = None
    if coefs == "scalar":
        c = _random_row(gen, history, has_noise, clip)
        rows = c.expand(b, K)
    elif coefs == "per_sample":
        c = torch.stack([_random_row(gen, history, has_noise, clip) for _ in range(b)])
        rows = c
    elif coefs == "table":                         # (S, K) + device step index
        c = torch.stack([_random_row(gen, history, has_noise, clip) for _ in range(4)])
        step_index = torch.tensor(2)
        rows = c[2].expand(b, K)
    elif coefs == "table_per_sample":              # (S, B, K) + device step index
        c = torch.stack([torch.stack([_random_row(gen, history, has_noise, clip) for _ in range(b)])
                         for _ in range(3)])
        step_index = torch.tensor(1)
        rows = c[1]
    else:
        raise AssertionError(coefs)
    noise_step = None if step_index is not None else 5
    step_word = int(step_index) if step_index is not None else 5
    if noise_step_tensor:
        noise_step = torch.tensor(step_word)

    # expected values (fp32 reference, from the fp32 view of the same inputs)
    z = noise_t if noise_t is not None else (reference.philox_normal(seeds, step_word, shape) if has_noise else None)
    g = 2.5 if cfg else None
    want_x, want_x0 = reference.fused_step(x, m, rows, hist, z, m_cond, g)

    out_fmt = _memory_format(out_layout or ("ncs" if layout == "strided" else layout), len(shape))
    canaries = {}
    if in_place:
        out = x
    else:
        out, canaries["out"] = canary_like(torch.empty(0, dtype=out_dtype), shape=shape, memory_format=out_fmt)
    mi = x0 = None
    if model_input is not None:
        mi, canaries["model_input"] = canary_like(torch.empty(0, dtype=model_input), shape=shape,
                                                  memory_format=out_fmt)
    if x0_into_h1:
        x0 = hist[0]
    elif x0_out is not None:
        x0, canaries["x0_out"] = canary_like(torch.empty(0, dtype=x0_out), shape=shape, memory_format=out_fmt)

    result = ops.fused_step(x, m, c, step_index=step_index, history=hist, out=out,
                            model_input=mi, x0_out=x0, noise=noise_t, seeds=seeds, noise_step=noise_step,
                            model_output_cond=m_cond, guidance_scale=g, backend=backend)
    assert result is out
    checks = [("out", out, want_x)] + ([("model_input", mi, want_x)] if mi is not None else [])
    checks += [("x0_out", x0, want_x0)] if x0 is not None else []
    for name, got, want in checks:
        assert got.shape == shape
        assert_close_by_rule(got, want, want.to(got.dtype), what=f"{backend} {name}")
        if name in canaries:
            assert canary_intact(got, canaries[name]), f"{backend}: {name} written out of bounds or NaN"
    if layout != "strided" and not in_place and out_layout is None:
        assert out.is_contiguous(memory_format=out_fmt)


DTYPES = [(xd, md) for xd in (F32, F16, BF16) for md in (F32, F16, BF16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,m_dtype", DTYPES, ids=[f"x{x}-m{m}".replace("torch.", "") for x, m in DTYPES])
def test_dtype_combinations(backend, x_dtype, m_dtype, cuda_emu):
    run_case(backend, (2, 3, 5, 3, 3), x_dtype=x_dtype, m_dtype=m_dtype, history=1, clip=True, cfg=True,
             noise="tensor", x0_out=x_dtype, model_input=m_dtype)


FEATURES = {
    "plain": dict(),
    "no_noise_ode": dict(noise=None, history=2, coefs="per_sample"),
    "clip_cfg_3hist_cl_ragged": dict(shape=(3, 2, 3, 5, 5), clip=True, cfg=True, history=3, coefs="per_sample",
                                     x0_out=F32, model_input=F16, layout="cl"),
    "table_step_index": dict(coefs="table", history=2, x0_out=F32, model_input=BF16),
    "table_per_sample_noise_tensor": dict(coefs="table_per_sample", noise="tensor", clip=True, layout="cl"),
    "in_place_x0_into_h1": dict(in_place=True, history=2, x0_into_h1=True, clip=True, coefs="per_sample"),
    "mixed_layouts": dict(layout="ncs", m_layout="cl", out_layout="cl", x0_out=F16, history=1),
    "strided_x": dict(shape=(2, 3, 4, 5, 6), layout="strided", history=1, model_input=F16),
    "multi_tile_cl_unaligned": dict(shape=(2, 3, 5, 29, 29), layout="cl", history=1, x0_out=F32),
    "2d_ragged_noise_step_tensor": dict(shape=(3, 1001), coefs="per_sample", noise_step_tensor=True, cfg=True),
    "4d_cl": dict(shape=(2, 3, 7, 5), layout="cl", clip=True, model_input=F16),
    "long_rows": dict(shape=(2, 1, 4101), history=3, x0_out=BF16, out_dtype=F16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_against_reference(backend, feature, cuda_emu):
    run_case(backend, **FEATURES[feature])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_coefficients_do_not_read_their_buffers(backend, cuda_emu):
    """Uninitialised (NaN) history, noise or state contribute nothing when their coefficient is 0."""
    shape = (2, 3, 4, 5)
    nan = torch.full(shape, float("nan"))
    m = torch.randn(shape)
    coefs = ops.step_coefs(p_m=0.5, b=2.0)               # x' = 2 * (0.5 m): p_x = a = c_j = s = 0
    out = ops.fused_step(nan, m, coefs, history=(nan, nan, nan), noise=nan, backend=backend)
    assert torch.equal(out, m)
    # ... but a NaN in a buffer that is used propagates (the engine's NaN check relies on it)
    m_bad = m.clone()
    m_bad[1, 2, 3, 4] = float("nan")
    out = ops.fused_step(nan, m_bad, coefs, backend=backend)
    assert torch.isnan(out[1, 2, 3, 4]) and torch.isnan(out).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_inputs_with_device_coefficients_give_nan(backend, cuda_emu):
    """What the kernels do when the host could not check (device coefficients): NaN, not silent garbage.
    Driven through StepArgs directly, as validation rejects these arguments for CPU coefficients."""
    shape = (2, 1, 3, 4)
    x, m = torch.randn(shape), torch.randn(shape)
    name = "cuda" if backend == "cuda-emu" else backend
    for row, expect_nan in ((ops.step_coefs(p_x=1.0, b=1.0, c=(0.0, 0.5)), True),   # c2 without h2
                            (ops.step_coefs(p_x=1.0, b=1.0, s=0.5), True),           # s without noise/seeds
                            (ops.step_coefs(p_x=1.0, b=1.0, c=(0.0, 0.0)), False)):
        out = torch.empty(shape)
        args = fs_module.StepArgs(x, m, None, 0.0, row.float(), None, (None, None, None), None, None, 0, None,
                                  out, None, None)
        backends.implementation("fused_step", name).run(args)
        assert bool(torch.isnan(out).all()) == expect_nan and (expect_nan or torch.equal(out, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_step_index_is_clamped_to_the_table(backend, cuda_emu):
    """A step index past the table (possible only on device, where it is not checked) reads the last row."""
    shape = (2, 3, 4)
    x, m = torch.randn(shape), torch.randn(shape)
    table = torch.stack([ops.step_coefs(p_x=1.0, b=float(k)) for k in range(3)]).float()
    name = "cuda" if backend == "cuda-emu" else backend
    for index, scale in ((7, 2.0), (-3, 0.0)):
        out = torch.empty(shape)
        args = fs_module.StepArgs(x, m, None, 0.0, table, torch.tensor(index), (None, None, None), None, None, 0,
                                  None, out, None, None)
        backends.implementation("fused_step", name).run(args)
        assert torch.equal(out, scale * x)


def test_torch_backend_gathers_the_table_row_with_tensor_ops():
    """The torch fallback selects the row with index_select on the step-index tensor (no .item())."""
    shape = (2, 3, 4)
    x, m = torch.randn(shape), torch.randn(shape)
    table = torch.stack([ops.step_coefs(p_x=1.0, b=float(k), s=0.1) for k in range(3)])
    out = ops.fused_step(x, m, table, step_index=torch.tensor(1), seeds=torch.tensor([1, 2]), backend="torch")
    want, _ = reference.fused_step(x, m, table[1], noise=reference.philox_normal(torch.tensor([1, 2]), 1, shape))
    assert torch.allclose(out, want, atol=1e-6)


# --- argument validation -------------------------------------------------------------------------------------

def _ok_args(shape=(2, 3, 4, 5)):
    return torch.randn(shape), torch.randn(shape), ops.step_coefs(p_x=1.0, b=1.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(model_output=torch.randn(2, 3, 4, 6)), ValueError, "model_output has shape"),
    (dict(history=(torch.randn(2, 3, 4, 6),)), ValueError, r"history\[0\] has shape"),
    (dict(out=torch.empty(1, 3, 4, 5)), ValueError, "out has shape"),
    (dict(x=torch.randn(2, 3, 4, 5, dtype=torch.float64)), TypeError, "x has dtype float64"),
    (dict(model_output=torch.randint(0, 3, (2, 3, 4, 5))), TypeError, "model_output has dtype"),
    (dict(noise=torch.randn(2, 3, 4, 5, device="meta")), ValueError, "noise is on meta"),
    (dict(coefs=ops.step_coefs(p_x=1.0, b=1.0, c=(0.5,))), ValueError, "history h1"),
    (dict(coefs=ops.step_coefs(p_x=1.0, b=1.0, c=(0.0, 0.0, 0.5)), history=(torch.randn(2, 3, 4, 5),) * 2),
     ValueError, "history h3"),
    (dict(coefs=ops.step_coefs(b=1.0, s=0.5)), ValueError, "neither noise nor seeds"),
    (dict(coefs=torch.zeros(4, K)), ValueError, "coefs has shape"),                 # a table without step_index
    (dict(coefs=torch.zeros(4, 2, K), step_index=None), ValueError, "coefs has shape"),
    (dict(coefs=torch.zeros(K), step_index=torch.tensor(0)), ValueError, "coefs has shape"),
    (dict(coefs=torch.zeros(4, K), step_index=torch.tensor(4)), ValueError, "step_index must be in"),
    (dict(coefs=torch.zeros(4, K), step_index=torch.tensor(1.0)), TypeError, "step_index must be an integer"),
    (dict(coefs=torch.zeros(4, K), step_index=torch.tensor([0, 1])), ValueError, "step_index must be a 0-d"),
    (dict(coefs=torch.zeros(K, dtype=torch.float16)), TypeError, "coefs must be float32 or float64"),
    (dict(coefs=[1.0, 2.0]), ValueError, "coefs has shape"),
    (dict(coefs=ops.step_coefs(p_x=1.0, b=1.0) * float("nan")), ValueError, "clip must be positive"),
    (dict(seeds=torch.tensor([1.0, 2.0])), TypeError, "seeds must be an int64"),
    (dict(seeds=torch.tensor([1, 2, 3])), ValueError, "seeds has shape"),
    (dict(noise_step=-1), ValueError, "noise_step must be in"),
    (dict(model_output_cond=torch.randn(2, 3, 4, 5)), ValueError, "needs both"),
    (dict(guidance_scale=2.0), ValueError, "needs both"),
    (dict(history=(torch.randn(2, 3, 4, 5),) * 4), ValueError, "at most 3"),
    (dict(history=torch.randn(2, 3, 4, 5)), TypeError, "history must be a sequence"),
    (dict(backend="nope"), ValueError, "not a backend"),
])
def test_bad_arguments_raise_before_launch(kwargs, error, match, monkeypatch):
    def no_launch(*_, **__):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(torch.ops.pydiffmed, "fused_step", no_launch)
    x, m, coefs = _ok_args()
    args = dict(x=x, model_output=m, coefs=coefs)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.fused_step(args.pop("x"), args.pop("model_output"), args.pop("coefs"), **args)


def test_forced_unavailable_backend_lists_reasons():
    x, m, coefs = _ok_args()
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        ops.fused_step(x, m, coefs, backend="cuda")


def test_step_coefs():
    row = ops.step_coefs(p_x=1.0, p_m=2.0, a=3.0, b=4.0, c=(5.0, 6.0), s=7.0)
    assert ops.COEF_NAMES == ("p_x", "p_m", "clip", "a", "b", "c1", "c2", "c3", "s")
    assert row.dtype == torch.float64 and row.tolist() == [1.0, 2.0, math.inf, 3.0, 4.0, 5.0, 6.0, 0.0, 7.0]
    assert ops.step_coefs(clip=2.0, dtype=torch.float32)[2].item() == 2.0
    with pytest.raises(ValueError, match="at most 3"):
        ops.step_coefs(c=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="clip must be positive"):
        ops.step_coefs(clip=0.0)
    with pytest.raises(ValueError, match="finite"):
        ops.step_coefs(a=math.inf)


# --- diffusers schedulers, one step --------------------------------------------------------------------------

def _x0_coefs(alpha_t, prediction):
    """x0 = p_x * x + p_m * m, and eps = e_x * x + e_m * m, for a prediction type (float64 scalars)."""
    a, s = math.sqrt(alpha_t), math.sqrt(1 - alpha_t)
    if prediction == "epsilon":
        return (1 / a, -s / a), (0.0, 1.0)
    return (a, -s), (s, a)                          # v-prediction


def ddim_step_coefs(scheduler, t, eta, prediction, clip):
    """The fused_step coefficients of diffusers' DDIMScheduler.step (use_clipped_model_output=False), and
    whether the row uses the model output as history slot h1 (needed when x0 is clipped but eps is not)."""
    ac = scheduler.alphas_cumprod.double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = ac[t].item()
    alpha_prev = ac[prev_t].item() if prev_t >= 0 else scheduler.final_alpha_cumprod.double().item()
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * math.sqrt(variance)
    direction = math.sqrt(1 - alpha_prev - std ** 2)
    (p_x, p_m), (e_x, e_m) = _x0_coefs(alpha_t, prediction)
    # x' = sqrt(alpha_prev) x0 + direction (e_x x + e_m m) + std z
    if clip:
        row = ops.step_coefs(p_x=p_x, p_m=p_m, clip=1.0, a=direction * e_x, b=math.sqrt(alpha_prev),
                             c=(direction * e_m,), s=std)
        return row, True
    # m = (x0 - p_x x) / p_m: the eps term folds into a·x + b·x0
    row = ops.step_coefs(p_x=p_x, p_m=p_m, a=direction * (e_x - e_m * p_x / p_m),
                         b=math.sqrt(alpha_prev) + direction * e_m / p_m, s=std)
    return row, False


def ddpm_step_coefs(scheduler, t, prediction, clip):
    ac = scheduler.alphas_cumprod.double()
    timesteps = scheduler.timesteps.tolist()
    i = timesteps.index(t)
    prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
    alpha_t = ac[t].item()
    alpha_prev = ac[prev_t].item() if prev_t >= 0 else 1.0
    current_alpha = alpha_t / alpha_prev
    current_beta = 1 - current_alpha
    (p_x, p_m), _ = _x0_coefs(alpha_t, prediction)
    variance = max((1 - alpha_prev) / (1 - alpha_t) * current_beta, 1e-20)
    return ops.step_coefs(p_x=p_x, p_m=p_m, clip=1.0 if clip else None,
                          a=math.sqrt(current_alpha) * (1 - alpha_prev) / (1 - alpha_t),
                          b=math.sqrt(alpha_prev) * current_beta / (1 - alpha_t),
                          s=math.sqrt(variance) if t > 0 else 0.0)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in BACKENDS])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_reproduces_diffusers_ddim_step(backend, prediction, clip, eta):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        prediction_type=prediction, clip_sample=clip, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(3)
    shape = (2, 3, 4, 5, 6)
    x = torch.randn(shape, generator=gen) * 1.5
    m = torch.randn(shape, generator=gen)
    z = torch.randn(shape, generator=gen)
    for t in (int(scheduler.timesteps[3]), int(scheduler.timesteps[-1])):
        want = scheduler.step(m, t, x, eta=eta, variance_noise=z if eta > 0 else None)
        row, uses_m = ddim_step_coefs(scheduler, t, eta, prediction, clip)
        x0 = torch.empty(shape)
        out = ops.fused_step(x, m, row, history=(m,) if uses_m else (), noise=z if eta > 0 else None, x0_out=x0,
                             backend=backend)
        torch.testing.assert_close(out, want.prev_sample, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(x0, want.pred_original_sample, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_reproduces_diffusers_ddpm_step(prediction, clip):
    diffusers = pytest.importorskip("diffusers")
    backend = "cpu" if "cpu" in BACKENDS else "torch"
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction, clip_sample=clip)
    scheduler.set_timesteps(20)
    gen = torch.Generator().manual_seed(4)
    shape = (2, 3, 4, 5, 6)
    x = torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen)
    for t in (int(scheduler.timesteps[5]), int(scheduler.timesteps[-1])):
        want = scheduler.step(m, t, x, generator=torch.Generator().manual_seed(99))
        z = torch.randn(shape, generator=torch.Generator().manual_seed(99))   # what diffusers drew
        x0 = torch.empty(shape)
        out = ops.fused_step(x, m, ddpm_step_coefs(scheduler, t, prediction, clip), noise=z, x0_out=x0,
                             backend=backend)
        torch.testing.assert_close(out, want.prev_sample, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(x0, want.pred_original_sample, atol=2e-5, rtol=1e-5)


# --- companion ops -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dynamic_threshold_matches_diffusers(backend):
    diffusers = pytest.importorskip("diffusers")
    shape = (3, 2, 5, 6, 7)
    gen = torch.Generator().manual_seed(5)
    scale = torch.tensor([0.2, 1.0, 3.0]).reshape(3, 1, 1, 1, 1)   # s clamped to 1, inside (1, 3), clamped to 3
    x = torch.randn(shape, generator=gen) * scale
    m = (torch.randn(shape, generator=gen) * scale).half()
    row = ops.step_coefs(p_x=1.3, p_m=-0.7, a=0.2, b=0.9, c=(0.4,), s=0.3)   # thresholding ignores a, b, c, s
    x0_unclipped = 1.3 * x - 0.7 * m.float()
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    s = ops.dynamic_threshold(x, m, row, ratio=0.9, max_value=3.0, backend=backend)
    quantile = torch.quantile(x0_unclipped.abs().reshape(3, -1), 0.9, dim=1)
    torch.testing.assert_close(s, quantile.clamp(1.0, 3.0), atol=1e-5, rtol=1e-6)
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert s[0] == 1 and 1 < s[1] < 3 and s[2] == 3
    thresholded = ops.apply_dynamic_threshold(row, s)
    assert thresholded.shape == (3, K) and (thresholded[:, 2] == 1).all()
    x0 = torch.empty(shape)
    ops.fused_step(x, m, thresholded, x0_out=x0, history=(x,), seeds=torch.tensor([1, 2, 3]), backend=backend)
    torch.testing.assert_close(x0, scheduler._threshold_sample(x0_unclipped), atol=1e-5, rtol=1e-5)


def test_dynamic_threshold_table_on_device_step_and_small_ratio():
    shape = (2, 1, 9, 11)
    x, m = torch.randn(shape) * 3, torch.randn(shape)
    table = torch.stack([ops.step_coefs(p_x=1.0, p_m=0.5, b=1.0), ops.step_coefs(p_x=2.0, p_m=-1.0, b=1.0)])
    for ratio in (0.1, 0.5, 0.995, 1.0):
        s = ops.dynamic_threshold(x, m, table, ratio=ratio, max_value=100.0, step_index=torch.tensor(1))
        want = torch.quantile((2 * x - m).abs().reshape(2, -1), ratio, dim=1).clamp(1.0, 100.0)
        torch.testing.assert_close(s, want, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="ratio"):
        ops.dynamic_threshold(x, m, table[0], ratio=1.5)
    with pytest.raises(ValueError, match="max_value"):
        ops.dynamic_threshold(x, m, table[0], max_value=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("shape,layout", [((3, 2, 5, 7, 4), "cl"), ((2, 1, 9000), "ncs"), ((2, 4, 6), "strided"),
                                          ((1, 3, 0, 4), "ncs")])
def test_per_sample_norm(backend, dtype, shape, layout, cuda_emu):
    t = _tensor(shape, dtype, layout, torch.Generator().manual_seed(6))
    got = ops.per_sample_norm(t, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), t.double().reshape(shape[0], -1).norm(dim=1), atol=1e-5, rtol=1e-6)


# --- custom op -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_opcheck(backend):
    shape = (2, 3, 4, 5)
    x, m, h = torch.randn(shape), torch.randn(shape).half(), torch.randn(shape)
    coefs = torch.stack([ops.step_coefs(p_x=1.1, p_m=-0.3, clip=1.0, a=0.4, b=0.6, c=(0.2,), s=0.3)] * 3).float()
    args = (x, m, None, 0.0, coefs, torch.tensor(1), h, None, None, None, torch.tensor([3, 4]), 0, None,
            torch.empty(shape), torch.empty(shape, dtype=torch.float16), torch.empty(shape), backend)
    torch.library.opcheck(torch.ops.pydiffmed.fused_step.default, args)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_opcheck_per_sample_norm(backend):
    t = torch.randn(3, 2, 4, 5).half()
    torch.library.opcheck(torch.ops.pydiffmed.per_sample_norm.default, (t, backend))


AOT_SCRIPT = r"""
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import pydiffmed.triton_kernels.fused_step as F

def compile_kernel(fn, types, constexprs, **options):
    names = fn.arg_names
    signature = {n: types.get(n, "*fp32") for n in names}
    signature.update({k: "constexpr" for k in constexprs})
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

ints = {n: "i64" for n in ("noise_step_value", "step_stride", "batch_stride", "num_steps", "numel", "channels",
                           "spatial", "noise_offset", "noise_plane")}
types = dict(ints, guidance="fp32", m_ptr="*fp16", mi_ptr="*bf16", x0_ptr="*fp16", seeds_ptr="*i64",
             step_index_ptr="*i64", noise_step_ptr="*i64")
for cl, seeds, present in itertools.product((False, True), (False, True), (False, True)):
    flags = dict(HAS_MC=present, HAS_H1=present, HAS_H2=present, HAS_H3=present, HAS_NOISE=not seeds,
                 HAS_SEEDS=seeds, HAS_MI=present, HAS_X0=present, HAS_STEP_INDEX=present,
                 HAS_NOISE_STEP_PTR=present, CHANNELS_LAST=cl, NOISE_INDEX=seeds and present, BLOCK=1024)
    ptx = compile_kernel(F._fused_step_kernel, types, flags, num_warps=4, enable_fp_fusion=False).asm["ptx"]
    assert "fma.rn.f32" not in ptx, "multiply-adds were contracted"
    assert not seeds or ("div.rn.f32" in ptx and "sqrt.rn.f32" in ptx), "Box-Muller must use IEEE div/sqrt"
compile_kernel(F._sumsq_kernel, {"t_ptr": "*fp16", "numel": "i64", "chunks": "i32"}, {"BLOCK": 4096})
print("ok")
"""


def test_triton_kernels_compile_for_sm90():
    """The Triton kernels through the real compiler (to PTX for sm_90, no GPU needed), which the interpreter
    does not exercise: typing, constexpr branches, no multiply-add fusion, IEEE division and sqrt."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# --- GPU -----------------------------------------------------------------------------------------------------

GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_gpu_backends_against_reference(backend, feature):
    """The same cases on CUDA tensors (inputs made on the CPU, moved; expected values from the CPU reference)."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    opts = dict(FEATURES[feature])
    shape = opts.pop("shape", (3, 4, 5, 6, 7))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    m = torch.randn(shape, generator=gen).half()
    hist = [torch.randn(shape, generator=gen) for _ in range(opts.get("history", 0))]
    c = _random_row(gen, len(hist), True, opts.get("clip", False))
    seeds = torch.tensor([3, -4, 5][: shape[0]] + [6] * max(0, shape[0] - 3))
    want, want_x0 = reference.fused_step(x, m, c, hist, reference.philox_normal(seeds, 9, shape))
    dev = "cuda"
    x0 = torch.empty(shape, device=dev)
    out = ops.fused_step(x.to(dev), m.to(dev), c.to(dev), history=[h.to(dev) for h in hist], seeds=seeds.to(dev),
                         noise_step=torch.tensor(9, device=dev), x0_out=x0, backend=backend)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x0.cpu(), want_x0, atol=1e-5, rtol=1e-6)
    assert torch.equal(ops.philox_normal(seeds.to(dev), 9, shape, backend=backend).cpu(),
                       reference.philox_normal(seeds, 9, shape))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_replays_every_step(backend):
    """One captured fused_step serves a whole table: the device step index advances between replays."""
    if backend == "cuda":
        pytest.importorskip("cupy")
    dev = "cuda"
    shape = (2, 4, 8, 8, 8)
    steps = 4
    gen = torch.Generator().manual_seed(2)
    table = torch.stack([torch.stack([_random_row(gen, 1, True, k % 2 == 0) for _ in range(2)])
                         for k in range(steps)]).float()
    x0_host, m_host, h_host = (torch.randn(shape, generator=gen) for _ in range(3))
    seeds = torch.tensor([10, 20])
    x, m, h = x0_host.to(dev), m_host.half().to(dev), h_host.to(dev)
    table_d, seeds_d, step = table.to(dev), seeds.to(dev), torch.zeros((), dtype=torch.int64, device=dev)
    model_input = torch.empty(shape, dtype=torch.float16, device=dev)

    def one_step():
        ops.fused_step(x, m, table_d, step_index=step, history=(h,), seeds=seeds_d, out=x, model_input=model_input,
                       backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_step()                                   # warm-up: compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(side)
    x.copy_(x0_host.to(dev))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    x.copy_(x0_host.to(dev))
    want = x0_host.clone()
    for k in range(steps):
        step.fill_(k)
        graph.replay()
        want, _ = reference.fused_step(want, m_host.half(), table[k], (h_host,),
                                       reference.philox_normal(seeds, k, shape))
    torch.cuda.synchronize()
    torch.testing.assert_close(x.cpu(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(model_input.cpu().float(), want.half().float(), atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_gpu_per_sample_norm(backend, dtype):
    if backend == "cuda":
        pytest.importorskip("cupy")
    t = torch.randn(3, 4, 17, 33, 20).to(dtype)
    got = ops.per_sample_norm(t.cuda().contiguous(memory_format=torch.channels_last_3d), backend=backend)
    torch.testing.assert_close(got.cpu().double(), t.double().reshape(3, -1).norm(dim=1), atol=1e-4, rtol=1e-6)
