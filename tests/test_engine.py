"""The sampling engine (issue 7): pydiffmed.sample / Sampler end to end on the exact Gaussian-mixture model,
reuse and determinism, half precision, guidance, inpainting, SDEdit, NaN reporting, memory checks, and that
the sampling loop reads no device value on the host (instrumented on CPU, and run on meta tensors, where any
read of a value raises)."""
from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import pydiffmed
from pydiffmed import engine, gmm, memory, ops
from pydiffmed.schedules import NoiseSchedule
from pydiffmed.solvers import get_solver

SCHEDULE = NoiseSchedule.discrete("linear")
MIXTURE = gmm.GaussianMixture.random(8, 3, seed=1)
SHAPE_OF = lambda batch: (batch, 2, 2, 2)  # noqa: E731  (d = 8 elements per sample)


class TorchGMM(torch.nn.Module):
    """The exact epsilon model of MIXTURE under a discrete schedule in torch ops only (no numpy, no host reads):
    alpha, sigma at a (possibly fractional) model time interpolate log(sigma/alpha) between training steps, as
    NoiseSchedule does. float64 math; the output has the input's dtype."""

    def __init__(self, device=torch.device("cpu"), mixture=MIXTURE, schedule=SCHEDULE):
        super().__init__()
        lam, vec = np.linalg.eigh(mixture.covariances)
        ab = schedule.alphas_cumprod
        for name, value in (("mu", mixture.means), ("lam", lam), ("vec", vec), ("log_w", np.log(mixture.weights)),
                            ("log_s", 0.5 * (np.log1p(-ab) - np.log(ab)))):
            self.register_buffer(name, torch.from_numpy(value).to(device))

    def alpha_sigma(self, t):
        t = t.double().clamp(0, self.log_s.shape[0] - 1)
        lo = t.floor()
        hi = (lo + 1).clamp(max=self.log_s.shape[0] - 1)
        frac = t - lo
        log_s = (1 - frac) * self.log_s[lo.long()] + frac * self.log_s[hi.long()]
        alpha = torch.rsqrt(1 + torch.exp(2 * log_s))
        return alpha, alpha * torch.exp(log_s)

    def forward(self, x, t):
        b = x.shape[0]
        flat = x.reshape(b, -1).double()
        alpha, sigma = (v.reshape(b, 1) for v in self.alpha_sigma(t.reshape(-1).expand(b)))
        log_p, eps = [], []
        for k in range(self.mu.shape[0]):
            c = ((flat - alpha * self.mu[k]).unsqueeze(2) * self.vec[k]).sum(1)      # (B, d) = r @ V_k
            var = alpha * alpha * self.lam[k] + sigma * sigma
            log_p.append(self.log_w[k] - 0.5 * (torch.log(var) + c * c / var).sum(1))
            eps.append(((sigma / var * c).unsqueeze(1) * self.vec[k]).sum(2))           # (.) @ V_k^T
        resp = torch.softmax(torch.stack(log_p, 1), 1).unsqueeze(2)
        return (resp * torch.stack(eps, 1)).sum(1).to(x.dtype).reshape(x.shape)


class Elementwise(torch.nn.Module):
    """A model treating every element alone (so batch composition cannot matter); `context` (B, k) adds a
    per-sample bias, `class_labels` (B,) another."""

    def __init__(self, device=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7, device=device))

    def forward(self, x, t, context=None, class_labels=None):
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        out = self.scale * torch.tanh(x) * (t.reshape(shape) / 1000.0) + 0.1 * x
        if context is not None:
            out = out + context.to(x.dtype).mean(1).reshape(shape)
        if class_labels is not None:
            out = out + 0.05 * class_labels.to(x.dtype).reshape(shape)
        return out


def randomize_(model):
    """Non-zero weights everywhere (MONAI zero-initialises the output and cross-attention projections)."""
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, device=p.device)
            p.copy_(0.5 * noise / p[0].numel() ** 0.5 if p.ndim >= 2 else 1.0 + 0.1 * noise)
    return model


def tiny_sampler(solver="ddim", batch=3, model=None, num_steps=8, **kw):
    return pydiffmed.Sampler(model or TorchGMM(), solver, SHAPE_OF(batch), num_steps=num_steps, **kw)


# --- end to end: the distribution --------------------------------------------------------------------------

@pytest.mark.parametrize("name,steps", [("dpmpp_2m", 20), ("ddpm", 100)])
def test_gmm_distribution_through_sample(name, steps):
    """pydiffmed.sample with the exact mixture model passes the solvers' distribution check, the sliced
    Wasserstein distance to exact data is that of two exact samples, and a wrong model fails the check."""
    from test_solvers import MIX_DIM, MIX_N, MIXTURE as mixture, _chi2_quantile, _component_stats, \
        check_reproduces_mixture

    exact_stats = _component_stats(mixture.sample(MIX_N, seed=123)[0])
    model = mixture.model(SCHEDULE, "epsilon")
    out = pydiffmed.sample(model, (MIX_N, 1, MIX_DIM), name, steps, SCHEDULE, seed=11, progress=False)
    assert out.shape == (MIX_N, 1, MIX_DIM) and out.dtype == torch.float32
    x = out.reshape(MIX_N, MIX_DIM).double()
    check_reproduces_mixture(x, mixture, exact_stats, _component_stats, _chi2_quantile)
    exact, _ = mixture.sample(MIX_N, seed=1)
    exact2, _ = mixture.sample(MIX_N, seed=2)
    assert gmm.sliced_wasserstein(x, exact) <= 1.5 * gmm.sliced_wasserstein(exact2, exact)
    if name == "dpmpp_2m":
        wrong = pydiffmed.sample(lambda x, t: 1.1 * model(x, t), (MIX_N, 1, MIX_DIM), name, steps, SCHEDULE,
                                 seed=11, progress=False)
        with pytest.raises(AssertionError):
            check_reproduces_mixture(wrong.reshape(MIX_N, MIX_DIM).double(), mixture, exact_stats,
                                     _component_stats, _chi2_quantile)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "ddpm", "unipc", "edm_heun", "pndm", "dpmpp_2m_sde"])
def test_engine_equals_eager_solver_loop(name):
    """The engine runs the plan exactly as Solver.sample's eager loop (same noise, same updates)."""
    solver = get_solver(name, SCHEDULE, 6)
    model = MIXTURE.model(SCHEDULE, "epsilon")
    out = pydiffmed.Sampler(model, solver, SHAPE_OF(4))(seed=3)
    torch.testing.assert_close(out, solver.sample(model, shape=SHAPE_OF(4), seed=3), rtol=0, atol=0)


def test_torch_gmm_matches_exact_model():
    x = torch.randn(SHAPE_OF(5))
    t = torch.tensor([999.0, 500.0, 10.0, 0.0, 250.5])
    exact = MIXTURE.model(SCHEDULE, "epsilon")(x, t)
    torch.testing.assert_close(TorchGMM()(x, t), exact, rtol=1e-5, atol=1e-6)


# --- reuse, seeds, batch invariance -------------------------------------------------------------------------

def test_sampler_reuse_same_seed_identical_different_seeds_differ():
    sampler = tiny_sampler("ddpm", num_steps=10)
    a, b, c = sampler(seed=5), sampler(seed=5), sampler(seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(sampler(seed=[5, 6, 7]), a)  # an int seed s means seeds s, s+1, ...


@pytest.mark.parametrize("name", ["ddpm", "dpmpp_2m_sde", "dpmpp_2m"])
def test_batch_invariance_and_per_sample_seeds(name):
    """Sample k of a batch is bitwise the sample drawn alone with its seed, whatever shares the batch."""
    model = Elementwise()
    batch = pydiffmed.Sampler(model, name, (3, 1, 4, 5, 3), num_steps=7)(seed=[11, 42, 5])
    alone = pydiffmed.Sampler(model, name, (1, 1, 4, 5, 3), num_steps=7)(seed=[42])
    other = pydiffmed.Sampler(model, name, (2, 1, 4, 5, 3), num_steps=7)(seed=torch.tensor([42, 1]))
    assert torch.equal(batch[1:2], alone)
    assert torch.equal(other[0:1], alone)
    assert not torch.equal(batch[0], batch[1])


def test_bf16_model_with_fp32_state_matches_fp32():
    model = TorchGMM()
    ref = pydiffmed.sample(model, SHAPE_OF(64), "dpmpp_2m", 10, SCHEDULE, seed=1, progress=False)
    sampler = pydiffmed.Sampler(model, "dpmpp_2m", SHAPE_OF(64), num_steps=10, dtype=torch.bfloat16)
    assert sampler.model_input.dtype == torch.bfloat16
    half = sampler(seed=1)
    assert half.dtype == torch.float32
    err = (half - ref).abs()
    # bf16 keeps 8 significant bits: model inputs/outputs of size ~3 round by up to ~0.01 per evaluation
    # (measured here: max 0.04, mean 0.002)
    assert err.max() < 0.1 and err.mean() < 0.01, (err.max(), err.mean())
    assert not torch.equal(half, ref)
    bf16_state = pydiffmed.Sampler(model, "dpmpp_2m", SHAPE_OF(64), num_steps=10, dtype=torch.bfloat16,
                                   state_dtype=torch.bfloat16)(seed=1)
    assert bf16_state.dtype == torch.bfloat16 and (bf16_state.float() - ref).abs().max() < 0.15


# --- no host reads in the loop ------------------------------------------------------------------------------

_HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu",
               "__array__", "__format__", "__repr__"}


# ops.fused_step validates coefficient rows on the host only when they are CPU tensors, and a CPU Sampler reads
# its input-check flags before the loop (on a GPU both stay on the device; the meta-device test below covers
# that path), so reads made by that validation are not counted here.
_CPU_ONLY_VALIDATION = {("fused_step.py", "fused_step"), ("fused_step.py", "_check_coefficient_values"),
                        ("engine.py", "_raise_if_bad_inputs")}


class CountHostReads(TorchFunctionMode):
    """Counts Tensor methods that read values back to the host (syncs on a GPU), with the frame that called."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            caller = sys._getframe(1).f_code
            if (os.path.basename(caller.co_filename), caller.co_name) not in _CPU_ONLY_VALIDATION:
                self.reads.append(f"{name} in {caller.co_name}")
        return func(*args, **(kwargs or {}))


class Syncing(torch.nn.Module):
    def __init__(self, device=None):
        super().__init__()

    def forward(self, x, t):
        if t[0].item() > 500:  # a host branch on a device value
            return x * 0.5
        return x * 0.25


def _count_reads_in_loop(sampler, **call):
    counter = CountHostReads()
    with counter:
        sampler.launch(**call)
    return counter.reads


def test_no_host_reads_inside_the_loop():
    model = Elementwise()
    shape = (2, 1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    seen = []
    sampler = pydiffmed.Sampler(model, "ddpm", shape, num_steps=6, guidance_scale=3.0)
    reads = _count_reads_in_loop(sampler, seed=0, cond={"context": torch.ones(2, 3)},
                                 uncond={"context": torch.zeros(2, 3)}, mask=mask, known=torch.zeros(shape),
                                 callback=lambda e, x0: seen.append(e), progress=True)
    assert reads == []
    assert seen == list(range(6))
    for name, opts in [("dpmpp_2m", {}), ("edm_heun", {}), ("ddim", {"thresholding": True,
                                                                      "use_clipped_model_output": True})]:
        sampler = pydiffmed.Sampler(TorchGMM(), name, SHAPE_OF(2), num_steps=5, **opts)
        assert _count_reads_in_loop(sampler, seed=1) == []
    # the instrument works: a model that branches on a value is caught
    assert _count_reads_in_loop(pydiffmed.Sampler(Syncing(), "ddim", SHAPE_OF(2), num_steps=3),
                                seed=0) == ["item in forward"] * 3


def _meta_run(model_factory, solver, shape, sampler_opts=None, **call):
    """Build a Sampler on the meta device and launch it: meta tensors hold no values, so any host read of one
    (item, bool, tolist, int, copies to the CPU) raises, while the engine and fused_step take the same
    non-CPU code paths as on a GPU (no host-side validation of coefficient rows)."""
    meta = torch.device("meta")
    sampler = pydiffmed.Sampler(model_factory(meta), solver, shape, device=meta, check_memory=False,
                                **(sampler_opts or {}))
    call = {k: (v.to(meta) if isinstance(v, torch.Tensor) else v) for k, v in call.items()}
    for key in ("cond", "uncond"):
        if key in call:
            call[key] = {k: v.to(meta) for k, v in call[key].items()}
    out = sampler.launch(**call)
    assert out.device == meta and tuple(out.shape) == tuple(shape)
    return sampler


def test_loop_runs_on_meta_tensors_without_reading_values():
    """The whole launch (start, every step, fused_step's wrapper and dispatch, inpainting, CFG, previews,
    dynamic thresholding, SDEdit start) runs on tensors that have no values to read."""
    shape = (2, 1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    _meta_run(Elementwise, get_solver("ddpm", SCHEDULE, 5), shape, {"guidance_scale": 2.0}, seed=0,
              cond={"context": torch.ones(2, 3)}, uncond={"context": torch.zeros(2, 3)}, mask=mask,
              known=torch.zeros(shape), callback=lambda e, x0: None, progress=True)
    for name, opts in [("dpmpp_2m", {}), ("edm_heun", {}), ("unipc", {}), ("dpmpp_2m_sde", {}),
                       ("ddim", {"thresholding": True, "use_clipped_model_output": True})]:
        _meta_run(TorchGMM, get_solver(name, SCHEDULE, 5, **opts), SHAPE_OF(2), seed=[3, 4])
    _meta_run(TorchGMM, get_solver("ddim", SCHEDULE, 6), SHAPE_OF(2), {"strength": 0.5}, seed=1,
              init=torch.zeros(SHAPE_OF(2)))
    with pytest.raises(RuntimeError, match="meta"):
        _meta_run(Syncing, get_solver("ddim", SCHEDULE, 3), SHAPE_OF(2), seed=0)


# --- guidance and conditioning ------------------------------------------------------------------------------

def test_cfg_scale_one_equals_conditional_run():
    model, shape = Elementwise(), (2, 1, 3, 4, 2)
    context, null = torch.randn(2, 5), torch.zeros(2, 5)
    labels = torch.tensor([1, 3])
    cond = {"context": context, "class_labels": labels}
    uncond = {"context": null, "class_labels": torch.zeros(2, dtype=torch.int64)}
    plain = pydiffmed.sample(model, shape, "dpmpp_2m", 8, SCHEDULE, seed=4, cond=cond, progress=False)
    guided = pydiffmed.sample(model, shape, "dpmpp_2m", 8, SCHEDULE, seed=4, cond=cond, uncond=uncond,
                              guidance_scale=1.0, progress=False)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    strong = pydiffmed.sample(model, shape, "dpmpp_2m", 8, SCHEDULE, seed=4, cond=cond, uncond=uncond,
                              guidance_scale=4.0, progress=False)
    assert (strong - plain).abs().max() > 1e-2
    unconditional = pydiffmed.sample(model, shape, "dpmpp_2m", 8, SCHEDULE, seed=4, cond=uncond, progress=False)
    guided_zero = pydiffmed.sample(model, shape, "dpmpp_2m", 8, SCHEDULE, seed=4, cond=cond, uncond=uncond,
                                   guidance_scale=0.0, progress=False)
    torch.testing.assert_close(guided_zero, unconditional, rtol=1e-5, atol=1e-5)


def test_cfg_sampler_takes_new_conditions_each_call():
    sampler = pydiffmed.Sampler(Elementwise(), "ddim", (2, 1, 2, 2, 2), num_steps=4, guidance_scale=2.0)
    u = {"context": torch.zeros(1, 3)}  # batch 1 broadcasts over the batch
    a = sampler(0, cond={"context": torch.ones(2, 3)}, uncond=u)
    b = sampler(0, cond={"context": -torch.ones(2, 3)}, uncond=u)
    assert not torch.equal(a, b)
    assert torch.equal(sampler(0, cond={"context": torch.ones(2, 3)}, uncond=u), a)


def test_unet3d_with_cross_attention_context_and_guidance():
    from pydiffmed.models import UNet3D

    torch.manual_seed(0)
    unet = UNet3D(3, 1, 1, num_res_blocks=1, channels=(8, 16), attention_levels=(False, True), norm_num_groups=4,
                  num_head_channels=8, with_conditioning=True, cross_attention_dim=6).eval()
    randomize_(unet)
    shape = (2, 1, 8, 8, 8)
    context = torch.randn(2, 3, 6)
    out = pydiffmed.sample(unet, shape, "ddim", 3, SCHEDULE, seed=0, cond={"context": context},
                           uncond={"context": torch.zeros(2, 3, 6)}, guidance_scale=2.5, progress=False)
    assert out.shape == shape and torch.isfinite(out).all()
    plain = pydiffmed.sample(unet, shape, "ddim", 3, SCHEDULE, seed=0, cond={"context": context}, progress=False)
    assert not torch.equal(out, plain)


# --- inpainting ---------------------------------------------------------------------------------------------

def test_inpainting_keeps_known_region_and_renoises_each_step():
    batch, steps = 3, 6
    shape = SHAPE_OF(batch)
    known = torch.randn(shape)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[:, :, 0] = True                      # half of every sample is known
    solver = get_solver("ddpm", SCHEDULE, steps)
    sampler = pydiffmed.Sampler(TorchGMM(), solver, shape)
    seeds = torch.tensor([4, 5, 6])
    states = []
    out = sampler(seeds, mask=mask, known=known,
                  callback=lambda e, x0: states.append(sampler.buffers["x"].clone()))
    full = mask.expand(shape)
    assert torch.equal(out[full], known[full])
    assert (out[~full] - known[~full]).abs().min() > 0
    free = pydiffmed.Sampler(TorchGMM(), solver, shape)(seeds)
    assert not torch.equal(out[~full], free[~full])     # the generated part follows the known part
    # after evaluation e the known region holds known re-noised to the level of evaluation e + 1
    times = solver.timesteps
    e = 2
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(float(times[e + 1])))
    z = ops.philox_normal(seeds, solver.num_model_evals + 1 + e, shape)
    expected = alpha * known + sigma * z
    torch.testing.assert_close(states[e][full], expected[full], rtol=1e-5, atol=1e-5)


def test_soft_mask_blends_and_keeps_known_where_one():
    shape = SHAPE_OF(2)
    known = torch.randn(shape)
    mask = torch.tensor([1.0, 0.5]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)
    out = tiny_sampler("ddim", batch=2)(0, mask=mask, known=known)
    assert torch.equal(out[:, 0], known[:, 0])
    assert not torch.equal(out[:, 1], known[:, 1])


# --- SDEdit -------------------------------------------------------------------------------------------------

def test_sdedit_runs_the_tail_of_the_plan_from_the_noised_volume():
    solver = get_solver("ddim", SCHEDULE, 10)
    init = torch.randn(SHAPE_OF(2))
    sampler = pydiffmed.Sampler(TorchGMM(), solver, SHAPE_OF(2), strength=0.4)
    assert sampler.start_index == 6
    out = sampler([1, 2], init=init)
    seeds = torch.tensor([1, 2])
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(float(solver.timesteps[6])))
    x = alpha * init + sigma * ops.philox_normal(seeds, solver.num_model_evals, SHAPE_OF(2))
    model = TorchGMM()
    for i in range(6, 10):
        x = solver.step(i, x, model(x, solver.timesteps[i].expand(2)), seeds=seeds)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    # low strength stays near the start volume, full strength does not
    near = pydiffmed.Sampler(TorchGMM(), "ddim", SHAPE_OF(2), num_steps=10, strength=0.1)(0, init=init)
    far = pydiffmed.Sampler(TorchGMM(), "ddim", SHAPE_OF(2), num_steps=10, strength=1.0)(0, init=init)
    assert (near - init).abs().mean() < (far - init).abs().mean()


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_sdedit_with_multistep_solver_cuts_its_grid(name):
    """A multistep solver's history cannot start part-way: the Sampler runs solver.starting_at(k) instead (a
    fresh history from step k, as diffusers' img2img does), from the init volume noised to step k's level."""
    init = torch.randn(SHAPE_OF(2))
    sampler = pydiffmed.Sampler(TorchGMM(), name, SHAPE_OF(2), num_steps=10, schedule=SCHEDULE, strength=0.4)
    cut = get_solver(name, SCHEDULE, 10).starting_at(6)
    assert sampler.start_index == 0 and sampler.num_model_evals == 4
    np.testing.assert_array_equal(sampler.solver.timesteps.numpy(), cut.timesteps.numpy())
    out = sampler([3, 4], init=init)
    seeds = torch.tensor([3, 4])
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(float(cut.timesteps[0])))
    x = alpha * init + sigma * ops.philox_normal(seeds, cut.num_model_evals, SHAPE_OF(2))
    model = TorchGMM()
    for i in range(4):
        x = cut.step(i, x, model(x, cut.timesteps[i].expand(2)), seeds=seeds)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="pndm.*cannot start"):
        tiny_sampler("pndm", strength=0.5)


# --- NaN, callback, progress --------------------------------------------------------------------------------

class NaNAt(torch.nn.Module):
    def __init__(self, bad_time):
        super().__init__()
        self.bad_time = bad_time

    def forward(self, x, t):
        bad = (t == self.bad_time).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(bad, torch.full_like(x, float("nan")), 0.1 * x)


def test_nan_reported_with_first_bad_evaluation():
    solver = get_solver("ddim", SCHEDULE, 8)
    bad_time = float(solver.timesteps[3])
    sampler = pydiffmed.Sampler(NaNAt(bad_time), solver, SHAPE_OF(2))
    with pytest.raises(engine.NonFiniteModelOutput, match=r"evaluation 3 \(model time"):
        sampler(0)
    sampler.launch(0)  # launch does not check
    fine = pydiffmed.Sampler(NaNAt(-1.0), solver, SHAPE_OF(2))
    fine(0)
    fine.raise_if_nonfinite()


def test_callback_gets_x0_estimates_and_progress_runs(capsys):
    steps = []
    sampler = tiny_sampler("ddim", num_steps=5)
    out = sampler(0, progress=True, callback=lambda e, x0: steps.append((e, x0.clone())))
    assert [e for e, _ in steps] == list(range(5))
    # DDIM's last update goes to the clean data: the result is the last x0 estimate
    torch.testing.assert_close(steps[-1][1], out, rtol=1e-6, atol=1e-6)
    assert "sampling" in capsys.readouterr().err


# --- bad inputs ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    model = TorchGMM()
    with pytest.raises(ValueError, match="shape"):
        pydiffmed.Sampler(model, "ddim", (2, 8))
    with pytest.raises(ValueError, match="shape"):
        pydiffmed.Sampler(model, "ddim", (2, 0, 4))
    with pytest.raises(ValueError, match="unknown solver"):
        pydiffmed.Sampler(model, "dpm_turbo", SHAPE_OF(2))
    with pytest.raises(TypeError, match="dtype"):
        pydiffmed.Sampler(model, "ddim", SHAPE_OF(2), dtype=torch.int32)
    with pytest.raises(TypeError, match="callable"):
        pydiffmed.Sampler("unet", "ddim", SHAPE_OF(2))
    with pytest.raises(ValueError, match="strength"):
        pydiffmed.Sampler(model, "ddim", SHAPE_OF(2), strength=1.5)
    with pytest.raises(ValueError, match="num_steps"):
        pydiffmed.Sampler(model, get_solver("ddim", SCHEDULE, 4), SHAPE_OF(2), num_steps=8)
    sampler = tiny_sampler("ddim", batch=2)
    with pytest.raises(ValueError, match="2 seeds for a batch of 2|3 seeds for a batch of 2"):
        sampler([1, 2, 3])
    with pytest.raises(TypeError, match="seed"):
        sampler(1.5)
    with pytest.raises(ValueError, match="mask"):
        sampler(0, mask=torch.ones(1, 3, 1, 1, dtype=torch.bool), known=torch.zeros(SHAPE_OF(2)))
    with pytest.raises(ValueError, match="known"):
        sampler(0, mask=torch.ones(SHAPE_OF(2), dtype=torch.bool))
    with pytest.raises(ValueError, match="strength"):
        sampler(0, init=torch.zeros(SHAPE_OF(2)))
    with pytest.raises(ValueError, match="x_T"):
        sampler(0, x_T=torch.zeros(3, 2, 2, 2))
    with pytest.raises(ValueError, match="uncond"):
        sampler(0, uncond={"context": torch.zeros(2, 3)})
    with pytest.raises(TypeError, match="cond"):
        sampler(0, cond=torch.zeros(2, 3))
    guided = tiny_sampler("ddim", batch=2, model=Elementwise(), guidance_scale=2.0)
    with pytest.raises(ValueError, match="cond"):
        guided(0)
    with pytest.raises(ValueError, match="uncond"):
        guided(0, cond={"context": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="batch dimension"):
        guided(0, cond={"context": torch.zeros(3, 3)}, uncond={"context": torch.zeros(3, 3)})

    class WrongShape(torch.nn.Module):
        def forward(self, x, t):
            return x[:, :1]

    with pytest.raises(ValueError, match="model returned shape"):
        tiny_sampler("ddim", model=WrongShape())(0)


def test_x_T_gives_the_initial_state():
    solver = get_solver("ddim", SCHEDULE, 5)
    x_T = torch.randn(SHAPE_OF(2))
    model = MIXTURE.model(SCHEDULE, "epsilon")
    out = pydiffmed.Sampler(model, solver, SHAPE_OF(2))(0, x_T=x_T)
    torch.testing.assert_close(out, solver.sample(model, x_T), rtol=0, atol=0)


# --- memory -------------------------------------------------------------------------------------------------

class ConvNet(torch.nn.Module):
    def __init__(self, channels=16):
        super().__init__()
        self.a = torch.nn.Conv3d(1, channels, 3, padding=1)
        self.b = torch.nn.Conv3d(channels, 1, 3, padding=1)

    def forward(self, x, t):
        return self.b(torch.nn.functional.silu(self.a(x))) * (t.reshape(-1, 1, 1, 1, 1) / 1000)


def test_estimate_memory_components_and_extrapolation():
    model, shape = ConvNet(), (2, 1, 24, 32, 40)
    est = pydiffmed.estimate_memory(model, shape, solver="dpmpp_2m")
    params = sum(p.numel() * 4 for p in model.parameters())
    assert est.parameters == params
    numel = math.prod(shape)
    assert est.state == (2 + 1) * numel * 4 + numel * 4       # x, h0, preview + the model input
    measured = 2 * memory._forward_peak(model, (1, *shape[1:]), torch.float32, torch.device("cpu"), None)[0]
    assert measured > 16 * numel // 2 * 4                      # at least the 16-channel hidden activation
    assert 0.7 * measured <= est.activations <= 1.5 * measured, (est.activations, measured)
    assert est.total == est.parameters + est.state + est.activations and "GiB" in str(est)
    half = pydiffmed.estimate_memory(model, shape, torch.bfloat16, guidance=True)
    assert half.parameters == params // 2 and abs(half.activations - est.activations) < 0.1 * est.activations
    assert pydiffmed.estimate_memory(MIXTURE.model(SCHEDULE, "epsilon"), SHAPE_OF(4)).activations is None


def test_up_front_memory_check(monkeypatch):
    monkeypatch.setattr(engine, "available_memory", lambda device: 1024)
    with pytest.raises(engine.InsufficientMemoryError, match="reduce the batch size"):
        pydiffmed.Sampler(ConvNet(), "ddim", (2, 1, 16, 16, 16), num_steps=3)
    pydiffmed.Sampler(ConvNet(), "ddim", (2, 1, 16, 16, 16), num_steps=3, check_memory=False)
    assert memory.available_memory("cpu") > 0


# --- graph bookkeeping on the CPU -----------------------------------------------------------------------------

class ReplayStepGraphs:
    """Stands in for Sampler._capture on the CPU: each "graph" replays the step it was captured for eagerly, so
    the replay order, the per-kind graph cache and its invalidation are tested without a GPU."""

    def __init__(self, fail=False):
        self.captured, self.fail = [], fail

    def __call__(self, sampler, kinds, first_eval, preview):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        for kind in kinds:
            self.captured.append((kind, preview))
            sampler._graphs[(kind, preview)] = type("Graph", (), {
                "replay": staticmethod(lambda k=kind: sampler._step(*k, preview))})()


@pytest.mark.parametrize("name", ["edm_heun", "pndm", "dpmpp_2m"])
def test_graph_replay_order_and_cache(monkeypatch, name):
    capture = ReplayStepGraphs()
    monkeypatch.setattr(pydiffmed.Sampler, "_capture", lambda self, *a: capture(self, *a))
    eager = tiny_sampler(name, cuda_graph=False)
    graphed = tiny_sampler(name)
    graphed.use_cuda_graph = True
    assert torch.equal(graphed(3), eager(3))
    forms = set(graphed.plan.form_of_eval)
    assert sorted(capture.captured) == sorted(((f, None, None), False) for f in forms)   # one graph per form
    assert torch.equal(graphed(4), eager(4)) and len(capture.captured) == len(forms)   # reused
    known, mask = torch.randn(SHAPE_OF(3)), torch.rand(1, 2, 2, 2) > 0.5
    assert torch.equal(graphed(5, mask=mask, known=known, callback=lambda e, x0: None),
                       eager(5, mask=mask, known=known))
    assert len(capture.captured) > len(forms)            # inpainting + preview kinds captured on demand


def test_graph_capture_failure_warns_once_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(pydiffmed.Sampler, "_capture", lambda self, *a: ReplayStepGraphs(fail=True)(self, *a))
    sampler = tiny_sampler("ddim")
    sampler.use_cuda_graph = True
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed.*stream is capturing"):
        out = sampler(0)
    assert "stream is capturing" in sampler.graph_failure
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sampler(0), out)               # not retried, no second warning
    assert torch.equal(out, tiny_sampler("ddim", cuda_graph=False)(0))


# --- GPU (skipped without CUDA) -----------------------------------------------------------------------------

def _gpu_unet():
    from pydiffmed.models import UNet3D

    torch.manual_seed(0)
    unet = UNet3D(3, 1, 1, num_res_blocks=1, channels=(16, 32), attention_levels=(False, True), norm_num_groups=8,
                  num_head_channels=16).eval().cuda()
    return randomize_(unet)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "edm_heun", "ddpm"])
def test_gpu_graph_replay_equals_eager(name):
    unet, shape = _gpu_unet(), (2, 1, 16, 16, 16)
    eager = pydiffmed.Sampler(unet, name, shape, num_steps=6, cuda_graph=False)(3)
    sampler = pydiffmed.Sampler(unet, name, shape, num_steps=6)
    graphed = sampler(3)
    assert sampler.graph_failure is None and len(sampler._graphs) == len(set(sampler.plan.form_of_eval))
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampler(3), graphed, rtol=0, atol=0)   # replayed again
    assert not torch.equal(sampler(4), graphed)


@pytest.mark.gpu
def test_gpu_loop_never_synchronises():
    unet, shape = _gpu_unet(), (2, 1, 16, 16, 16)
    mask = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool, device="cuda")
    mask[..., :8] = True
    for cuda_graph in (False, True):
        sampler = pydiffmed.Sampler(unet, "dpmpp_2m", shape, num_steps=5, cuda_graph=cuda_graph,
                                    dtype=torch.float16)
        sampler.launch(0, mask=mask, known=torch.zeros(shape, device="cuda"))      # warm-up / capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sampler.launch(1, mask=mask, known=torch.zeros(shape, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sampler.raise_if_nonfinite()
        assert torch.isfinite(out).all()


@pytest.mark.gpu
def test_gpu_capture_failure_falls_back_to_eager_with_warning():
    class SyncingGPU(torch.nn.Module):
        def forward(self, x, t):
            return x * (0.5 if float(t[0]) > 500 else 0.25)

    sampler = pydiffmed.Sampler(SyncingGPU(), "ddim", (2, 1, 8, 8, 8), num_steps=4, device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = sampler(0)
    assert sampler.graph_failure and torch.cuda.current_stream() == torch.cuda.default_stream()
    eager = pydiffmed.Sampler(SyncingGPU(), "ddim", (2, 1, 8, 8, 8), num_steps=4, device="cuda",
                              cuda_graph=False)(0)
    torch.testing.assert_close(out, eager)


@pytest.mark.gpu
def test_gpu_sample_reuses_cached_graphs_and_recaptures_on_change():
    engine.clear_cache()
    unet, shape = _gpu_unet(), (1, 1, 16, 16, 16)
    a = pydiffmed.sample(unet, shape, "ddim", 4, seed=0, progress=False)
    (_, _, sampler), = engine._sampler_cache
    graphs = dict(sampler._graphs)
    b = pydiffmed.sample(unet, shape, "ddim", 4, seed=0, progress=False)
    assert torch.equal(a, b) and len(engine._sampler_cache) == 1 and sampler._graphs == graphs
    with torch.no_grad():
        unet.out[2].bias.add_(0.1)     # weights changed in place: same addresses, graphs stay valid
    c = pydiffmed.sample(unet, shape, "ddim", 4, seed=0, progress=False)
    assert not torch.equal(a, c)
    pydiffmed.sample(unet, (2, 1, 16, 16, 16), "ddim", 4, seed=0, progress=False)
    assert len(engine._sampler_cache) == 2
    engine.clear_cache()


@pytest.mark.parametrize("name, schedule, options", [
    ("pc", NoiseSchedule.ve(), {"prediction_type": "score"}),
    ("pc", NoiseSchedule.ve(), {"prediction_type": "score", "norm_reduction": "batch"}),
    ("ddim", SCHEDULE, {"thresholding": True, "use_clipped_model_output": True}),
    ("ddim", SCHEDULE, {"thresholding": True, "use_clipped_model_output": True, "dynamic_thresholding_ratio": 0.9}),
    ("dpmpp_2m", SCHEDULE, {})])
def test_plan_keys_are_hashable_and_compare_by_content(name, schedule, options):
    """The sample() cache compares plan keys: solvers whose coef_fns hold tensors (the pc corrector's table)
    must compare by value, equal for equal solvers and different for different ones."""
    key = engine._plan_key(get_solver(name, schedule, 6, **options))
    assert key == engine._plan_key(get_solver(name, schedule, 6, **options))
    assert hash(key) == hash(engine._plan_key(get_solver(name, schedule, 6, **options)))
    keys = {engine._plan_key(get_solver(n, s, 6, **o)) for n, s, o in [
        ("pc", NoiseSchedule.ve(), {"prediction_type": "score"}),
        ("pc", NoiseSchedule.ve(), {"prediction_type": "score", "norm_reduction": "batch"}),
        ("ddim", SCHEDULE, {"thresholding": True, "use_clipped_model_output": True}),
        ("ddim", SCHEDULE, {"thresholding": True, "use_clipped_model_output": True, "dynamic_thresholding_ratio": 0.9}),
        ("dpmpp_2m", SCHEDULE, {})]}
    assert len(keys) == 5 and key in keys
