"""Noise schedules, timestep grids and prediction-type conversions, checked against diffusers / MONAI and against
their own definitions (inverses, derivatives, closed forms)."""
import math

import numpy as np
import pytest
import torch

from pydiffmed import prediction
from pydiffmed.schedules import NoiseSchedule, karras_sigmas, make_betas, rescale_zero_terminal_snr, \
    spaced_timesteps
from pydiffmed.solvers._grids import diffusers_sigma_to_t

diffusers = pytest.importorskip("diffusers")
monai_schedulers = pytest.importorskip("monai.networks.schedulers")


# --- betas -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_betas_match_diffusers(name):
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=1e-4, beta_end=0.02)
    ours = NoiseSchedule.discrete(name, 1000, 1e-4, 0.02)
    np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-6, atol=1e-8)
    # diffusers keeps alpha_bar in float32: fp32_alphas_cumprod reproduces it exactly
    np.testing.assert_array_equal(ours.fp32_alphas_cumprod(), ref.alphas_cumprod.double().numpy())


@pytest.mark.parametrize("name", ["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"])
def test_betas_match_monai(name):
    ref = monai_schedulers.DDPMScheduler(schedule=name)
    ours = NoiseSchedule.discrete(name)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=5e-6, atol=1e-7)


def test_cosine_definition():
    n = 1000
    betas = make_betas("cosine", n)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ab = np.cumprod(1 - betas)
    assert betas.max() <= 0.999
    np.testing.assert_allclose(ab[:900], [f((i + 1) / n) / f(0) for i in range(900)], rtol=1e-10)


def test_zero_terminal_snr():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = rescale_zero_terminal_snr(betas)
    ab = np.cumprod(1 - rescaled)
    assert ab[-1] == pytest.approx(0.0, abs=1e-15)
    assert ab[0] == pytest.approx(1 - betas[0], rel=1e-12)          # first step unchanged
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True)
    np.testing.assert_allclose(ab[:-1], ref.alphas_cumprod.double().numpy()[:-1], rtol=1e-4, atol=1e-8)
    sched = NoiseSchedule.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_snr=True)
    alpha, sigma = sched.alpha_sigma(999)
    assert alpha == 0 and sigma == 1


def test_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="explicit betas"):
        NoiseSchedule.discrete([0.5, 1.5])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_betas("linear", 0)


# --- timestep grids ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n,offset", [(10, 0), (50, 1), (7, 0), (1000, 0)])
def test_spacings_match_diffusers(spacing, n, offset):
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        ours = spaced_timesteps(1000, n, spacing, offset)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    if spacing != "trailing" or n <= 100:
        ref = diffusers.DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n if n < 1000 else 999)
        ours = spaced_timesteps(1000, n if n < 1000 else 999, spacing, offset, extra_point=True)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_float_linspace_grid_matches_euler():
    ref = diffusers.EulerDiscreteScheduler()
    ref.set_timesteps(13)
    np.testing.assert_array_equal(spaced_timesteps(1000, 13, "linspace", integer=False).astype(np.float32),
                                  ref.timesteps.numpy())


@pytest.mark.parametrize("n,offset", [(10, 0), (50, 0), (1000, 0), (37, 3)])
def test_monai_grid(n, offset):
    for cls in (monai_schedulers.DDPMScheduler, monai_schedulers.DDIMScheduler):
        kwargs = {"steps_offset": offset} if cls is monai_schedulers.DDIMScheduler else {}
        if offset and cls is monai_schedulers.DDPMScheduler:
            continue
        ref = cls(**kwargs)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(spaced_timesteps(1000, n, "monai", offset), ref.timesteps.numpy())


def test_spacing_errors():
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 10, "cosine")
    with pytest.raises(ValueError, match="exceed"):
        spaced_timesteps(100, 101, "leading")


def test_karras_sigmas():
    s = karras_sigmas(0.002, 80.0, 18)
    assert s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
    assert np.all(np.diff(s) < 0)
    # uniform in sigma^(1/7)
    np.testing.assert_allclose(np.diff(s ** (1 / 7)), np.diff(s ** (1 / 7))[0], rtol=1e-10)
    ref = diffusers.EulerDiscreteScheduler()._convert_to_karras(np.array([80.0, 0.002]), 18)
    np.testing.assert_allclose(s, ref, rtol=1e-14)
    with pytest.raises(ValueError):
        karras_sigmas(1.0, 0.5, 4)


# --- continuous schedules -----------------------------------------------------------------------------------

CONTINUOUS = [NoiseSchedule.vp(), NoiseSchedule.subvp(), NoiseSchedule.ve(), NoiseSchedule.flow(t_max=0.999),
              NoiseSchedule.vp(beta_min=0.5, beta_max=0.5)]


@pytest.mark.parametrize("sched", CONTINUOUS, ids=lambda s: s.kind)
def test_continuous_marginals_and_derivatives(sched):
    t = np.linspace(max(sched.t_min, 1e-3), sched.t_max, 23)
    alpha, sigma = sched.alpha_sigma(t)
    if sched.kind == "vp":
        np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-12)
        integral = sched.beta_min * t + 0.5 * (sched.beta_max - sched.beta_min) * t ** 2
        np.testing.assert_allclose(alpha, np.exp(-0.5 * integral), rtol=1e-12)
    if sched.kind == "subvp":
        np.testing.assert_allclose(sigma, 1 - alpha ** 2, rtol=1e-12)
    if sched.kind == "ve":
        np.testing.assert_allclose(alpha, 1.0)
        assert sigma[-1] == pytest.approx(sched.sigma_max)
    if sched.kind == "flow":
        np.testing.assert_allclose(alpha + sigma, 1.0)
    # derivatives against central differences
    h = 1e-6
    d_alpha, d_sigma = sched.derivatives(t)
    a_p, s_p = sched.alpha_sigma(t + h)
    a_m, s_m = sched.alpha_sigma(t - h)
    np.testing.assert_allclose(d_alpha, (a_p - a_m) / (2 * h), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d_sigma, (s_p - s_m) / (2 * h), rtol=1e-5, atol=1e-7)
    # forward SDE: d(sigma²)/dt = 2 f sigma² + g², d(alpha)/dt = f alpha
    f, g2 = sched.sde(t)
    np.testing.assert_allclose(2 * sigma * d_sigma, 2 * f * sigma ** 2 + g2, rtol=1e-10, atol=1e-12)
    if sched.kind == "vp":
        np.testing.assert_allclose(g2, sched.beta(t), rtol=1e-10)
        np.testing.assert_allclose(f, -0.5 * sched.beta(t), rtol=1e-12)
    if sched.kind == "subvp":
        np.testing.assert_allclose(g2, sched.beta(t) * (1 - alpha ** 4), rtol=1e-10)
    # inverses
    np.testing.assert_allclose(sched.t_from_edm_sigma(sched.edm_sigma(t)), t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sched.t_from_model_time(sched.model_time(t)), t, rtol=1e-12)


def test_discrete_interpolation_and_inverse():
    sched = NoiseSchedule.discrete("linear")
    t = np.array([0.0, 1.0, 10.5, 500.25, 998.9, 999.0])
    alpha, sigma = sched.alpha_sigma(t)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(alpha[[0, 1, 5]] ** 2, sched.alphas_cumprod[[0, 1, 999]], rtol=1e-12)
    # log(sigma/alpha) is linear between training steps, and t_from_edm_sigma inverts it
    mid = np.log(sched.edm_sigma(10.5))
    assert mid == pytest.approx(0.5 * (np.log(sched.edm_sigma(10.0)) + np.log(sched.edm_sigma(11.0))))
    np.testing.assert_allclose(sched.t_from_edm_sigma(sched.edm_sigma(t)), t, rtol=1e-9, atol=1e-9)
    # ... and equals diffusers' _sigma_to_t
    sigmas = np.array([0.02, 0.5, 3.0, 100.0])
    ref = diffusers.EulerDiscreteScheduler()
    log_sigmas = np.log(np.sqrt((1 - sched.alphas_cumprod) / sched.alphas_cumprod))
    expected = np.array([ref._sigma_to_t(s, log_sigmas) for s in sigmas])
    np.testing.assert_allclose(sched.t_from_edm_sigma(sigmas), expected, rtol=1e-12)
    np.testing.assert_allclose(diffusers_sigma_to_t(sigmas, log_sigmas), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="discrete timesteps"):
        sched.alpha_sigma(1000.5)


def test_schedule_validation():
    with pytest.raises(ValueError, match="sigma_min"):
        NoiseSchedule.ve(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="time_input"):
        NoiseSchedule("vp", time_input="sigma")
    with pytest.raises(ValueError, match="continuous"):
        NoiseSchedule.discrete().derivatives(0.5)
    assert NoiseSchedule.ve(sigma_max=30.0).init_noise_scale() == pytest.approx(30.0)
    assert NoiseSchedule.vp().init_noise_scale() == 1.0
    assert NoiseSchedule.flow().model_time(0.25) == 250.0
    assert NoiseSchedule.ve().model_time(1.0) == pytest.approx(50.0)      # conditioned on sigma


# --- prediction types --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ptype", prediction.PREDICTION_TYPES)
@pytest.mark.parametrize("alpha,sigma,d_alpha,d_sigma", [(0.8, 0.6, -0.3, 0.4), (1.0, 3.0, 0.0, 2.0),
                                                         (0.25, 0.75, -1.0, 1.0), (0.1, 0.9, -0.05, 0.2)])
def test_prediction_round_trip(ptype, alpha, sigma, d_alpha, d_sigma):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    x = alpha * x0 + sigma * eps
    m = prediction.model_output(ptype, x0, eps, alpha, sigma, d_alpha, d_sigma)
    p_x, p_m = prediction.x0_coefs(ptype, alpha, sigma, d_alpha, d_sigma)
    q_x, q_m = prediction.eps_coefs(ptype, alpha, sigma, d_alpha, d_sigma)
    torch.testing.assert_close(p_x * x + p_m * m, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q_x * x + q_m * m, eps, rtol=1e-12, atol=1e-12)


def test_prediction_matches_peer_formulas():
    # diffusers' v: v = sqrt(ab)·eps - sqrt(1 - ab)·x0;  MONAI RFlow: x0 = x + t·v (neg_flow)
    ab, t = 0.3, 0.4
    p_x, p_m = prediction.x0_coefs("v_prediction", math.sqrt(ab), math.sqrt(1 - ab))
    assert (p_x, p_m) == pytest.approx((math.sqrt(ab), -math.sqrt(1 - ab)))
    assert prediction.x0_coefs("neg_flow", 1 - t, t) == pytest.approx((1.0, t))
    assert prediction.x0_coefs("flow_prediction", 1 - t, t) == pytest.approx((1.0, -t))   # diffusers alias
    assert prediction.x0_coefs("score", 1.0, 2.0) == pytest.approx((1.0, 4.0))


def test_prediction_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        prediction.canonical("noise")
    with pytest.raises(TypeError):
        prediction.canonical(3)
    with pytest.raises(ValueError, match="alpha = 0"):
        prediction.x0_coefs("epsilon", 0.0, 1.0)
    assert prediction.x0_coefs("v_prediction", 0.0, 1.0) == (0.0, -1.0)       # zero terminal SNR is fine for v
    with pytest.raises(ValueError, match="sigma = 0"):
        prediction.eps_coefs("sample", 1.0, 0.0)
