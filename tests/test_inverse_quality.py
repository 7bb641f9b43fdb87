"""Reconstruction quality (issue 17) and the classical baselines of pydiffmed.inverse.baselines.

Quality: the bundled demo model reconstructs unseen head phantoms (family 1, indices 0-2, 32³: the model trained on
family 0, TV's lam was tuned on family 2) from 4× and 8× Poisson-disc undersampled 3-D k-space (one coil, and
four synthetic coils at 8×) and from 30-view sparse parallel-beam CT, with small seeded measurement noise
(TASKS). Sampler: dpmpp_2m, 20 steps (20 model evaluations), DDS data step (posterior="dds": exact closed-form
solve for one coil, 5 CG iterations for coils and CT), bf16 model / fp32 state, seed 0. CT runs on the CT
operator tabulated as its per-slice matrix (SliceMatrix: the same linear map, several times cheaper at 32²).
Every reconstruction is clipped to [-1, 1] (the diffusion sampler clips; the baselines can only gain). Mean
PSNR (dB) / SSIM over the three phantoms, measured 2026-12-06 on this CPU:

    task            zero-filled/FBP   TV (TV_DEFAULTS)   diffusion (dpmpp_2m 20, dds)
    mri_4x          30.53 / 0.8939    42.13 / 0.9940     36.97 / 0.9803
    mri_8x          25.89 / 0.7066    34.09 / 0.9407     31.99 / 0.9246
    mri_8x_4coils   20.68 / 0.6786    41.68 / 0.9930     37.31 / 0.9812
    ct_30           26.83 / 0.9637    44.16 / 0.9961     39.04 / 0.9878

The diffusion reconstruction beats zero-filled / FBP in both measures on every task by a wide margin (asserted
with the margins in MARGINS, about half the measured gaps). It does *not* beat the tuned TV reconstruction, and
neither do more evaluations nor averaging (benchmarks/bench_inverse.py --full, 6 phantoms, mri_4x: NFE 20 / 50 /
100 give 36.9 / 37.5 / 37.7 dB, the mean of 4 samples at NFE 20 38.4 dB, TV 42.1 dB; ct_30: 38.9 / 39.6 / 39.8,
40.3 vs TV 43.9): these phantoms are piecewise constant up to a faint texture, TV's best case, and the demo
model's own fidelity is limited (from the true phantom noised to level 0.2 it returns it with 3.6 % relative
error, tests/test_anomaly.py). The issue's criterion "beats TV" is therefore kept as a strict xfail
(test_diffusion_beats_tv): it starts failing, as a reminder to drop the mark, once a better model reaches it.

Unit tests: psnr / ssim properties and known values, ssim against scikit-image (if installed), the TV operators'
adjointness, TV reconstructions (objective, piecewise-constant recovery), zero-filled forms, SliceMatrix.
"""
from __future__ import annotations

import math

import pytest
import torch

import pydiffmed
from pydiffmed import data
from pydiffmed.inverse import CartesianMRI, Downsampling, Masking, Measurement, ParallelBeamCT, adjoint_error, fft_c
from pydiffmed.inverse import ifft_c, poisson_disc_mask, sparse_view_angles
from pydiffmed.inverse.baselines import (TASKS, TV_DEFAULTS, SliceMatrix, coil_maps, divergence, gradient, measure,
                                         psnr, ssim, task_operator, total_variation, tv_reconstruction, zero_filled)

pytestmark = pytest.mark.usefixtures("one_thread")

QUALITY_TASKS = ("mri_4x", "mri_8x", "mri_8x_4coils", "ct_30")
STEPS = 20
# Required gains of the diffusion reconstruction over zero-filled / FBP (PSNR dB, SSIM): about half the measured
# gaps (module docstring).
MARGINS = {"mri_4x": (3.0, 0.04), "mri_8x": (3.0, 0.10), "mri_8x_4coils": (8.0, 0.15), "ct_30": (6.0, 0.012)}


def reconstruct(task, x, model, schedule, info):
    """{method: (mean PSNR, mean SSIM)} for zero-filled/FBP, TV and the diffusion sampler on phantoms x."""
    op, sigma_y = task_operator(task, tuple(x.shape[2:]))
    fbp = None
    if isinstance(op, ParallelBeamCT):
        fbp = op.fbp
        op = SliceMatrix.from_operator(op, x.shape[3:])
        op = SliceMatrix(op.matrix.float(), op.image_size, op.range_tail)
    y = measure(op, x, sigma_y, seed=0)
    recon = {"baseline": (fbp(y) if fbp else zero_filled(op, y)).clamp(-1, 1),
             "tv": tv_reconstruction(op, y, task)}
    recon["diffusion"] = pydiffmed.sample(
        model, tuple(x.shape), "dpmpp_2m", STEPS, schedule, seed=0, dtype=torch.bfloat16, progress=False,
        prediction_type=info.prediction_type, clip=info.clip_sample, measurement=Measurement(op, y, sigma_y),
        posterior="dds")
    return {name: (float(psnr(r, x, 2.0).mean()), float(ssim(r, x, 2.0).mean())) for name, r in recon.items()}


@pytest.fixture(scope="module")
def quality(one_thread):
    """One torch thread: the same numbers (checked), and on shared cores 5× faster than two threads competing with
    another process (measured 29 s vs 138 s for this fixture; 17 s with two threads on idle cores)."""
    model, schedule, info = pydiffmed.load_model("demo")
    x = data.phantoms(3, seed=1, shape=tuple(info.volume_shape))
    return {task: reconstruct(task, x, model, schedule, info) for task in QUALITY_TASKS}


@pytest.mark.parametrize("task", QUALITY_TASKS)
def test_diffusion_beats_zero_filled_and_fbp(quality, task):
    got = quality[task]
    (p0, s0), (p, s) = got["baseline"], got["diffusion"]
    dp, ds = MARGINS[task]
    assert p >= p0 + dp and s >= s0 + ds, got


@pytest.mark.parametrize("task", QUALITY_TASKS)
def test_tv_baseline_beats_zero_filled_and_fbp(quality, task):
    """The TV baseline is a real one: it improves on zero-filled / FBP by at least the diffusion margins."""
    got = quality[task]
    (p0, s0), (p, s) = got["baseline"], got["tv"]
    dp, ds = MARGINS[task]
    assert p >= p0 + dp and s >= s0 + ds, got


@pytest.mark.xfail(strict=True, reason="the demo model does not beat the tuned TV reconstruction on these "
                                       "piecewise-constant phantoms (module docstring for the measured numbers)")
@pytest.mark.parametrize("task", QUALITY_TASKS)
def test_diffusion_beats_tv(quality, task):
    got = quality[task]
    assert got["diffusion"][0] > got["tv"][0] and got["diffusion"][1] > got["tv"][1], got


# --------------------------------------------------------------------------------------------------- metrics
def test_psnr_values():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 1, 6, 7, 8, generator=gen) * 2 - 1
    assert torch.isinf(psnr(ref, ref.clone(), 2.0)).all()
    shifted = psnr(ref + 0.1, ref, 2.0)  # MSE 0.01: 10·log10(4 / 0.01)
    assert shifted.shape == (2,) and shifted.dtype == torch.float64
    assert torch.allclose(shifted, torch.full((2,), 10 * math.log10(400.0), dtype=torch.float64), atol=1e-4)
    assert float(psnr(ref[0, 0] + 0.1, ref[0, 0], 1.0)) == pytest.approx(20.0, abs=1e-4)  # one volume: 0-d
    assert (psnr(ref + 0.2, ref, 2.0) < shifted).all()  # more error, lower PSNR
    with pytest.raises(ValueError, match="data_range"):
        psnr(ref, ref, 0)
    with pytest.raises(ValueError, match="must match"):
        psnr(ref, ref[:1], 2.0)


def test_ssim_values():
    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 1, 14, 13, 12, generator=gen, dtype=torch.float64)
    assert torch.allclose(ssim(ref, ref.clone(), 1.0), torch.ones(2, dtype=torch.float64))
    # constant volumes: variances vanish, SSIM = (2ab + C1) / (a² + b² + C1) everywhere, C1 = (0.01·range)²
    a, b, c1 = 0.2, 0.5, (0.01 * 2.0) ** 2
    got = ssim(torch.full((12, 12, 12), b, dtype=torch.float64), torch.full((12, 12, 12), a, dtype=torch.float64), 2.0)
    assert got.ndim == 0 and float(got) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # symmetric, below 1 and falling with the noise level
    noisy = [ref + s * torch.randn(ref.shape, generator=gen, dtype=torch.float64) for s in (0.02, 0.1, 0.3)]
    scores = [ssim(n, ref, 1.0) for n in noisy]
    assert torch.allclose(ssim(ref, noisy[1], 1.0), scores[1])
    assert (scores[0] < 1).all() and (scores[0] > scores[1]).all() and (scores[1] > scores[2]).all()
    with pytest.raises(ValueError, match="too small"):
        ssim(ref[..., :10], ref[..., :10], 1.0)


@pytest.mark.parametrize("shape, data_range, level", [((16, 16, 16), 2.0, 0.05), ((13, 17, 20), 1.0, 0.3),
                                                      ((32, 32, 32), 2.0, 0.02)])
def test_ssim_matches_scikit_image(shape, data_range, level):
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(2)
    ref = data.head_phantom(1, 0, shape)[0].double() * (data_range / 2)
    x = ref + level * torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    want = metrics.structural_similarity(x.numpy(), ref.numpy(), data_range=data_range, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
    assert float(ssim(x, ref, data_range)) == pytest.approx(want, abs=1e-10)


# --------------------------------------------------------------------------------------------------- TV
def test_gradient_and_divergence_are_adjoint():
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, 1, 5, 6, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 1, 3, 5, 6, 7, generator=gen, dtype=torch.float64)
    assert float((gradient(v) * g).sum()) == pytest.approx(-float((v * divergence(g)).sum()), rel=1e-12)
    assert float(gradient(v)[:, :, 0, -1].abs().max()) == 0.0  # Neumann boundary
    ramp = torch.arange(5, dtype=torch.float64).reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 4, 3)
    assert float(total_variation(ramp)[0]) == pytest.approx(4 * 4 * 3)  # 4 unit steps on each of 12 columns


def _cubes(n=16):
    """A piecewise-constant volume in [-1, 1]: background, a block and a smaller brighter block inside it."""
    x = torch.full((1, 1, n, n, n), -1.0)
    x[..., 3:13, 4:12, 2:14] = 0.0
    x[..., 6:10, 6:9, 5:9] = 0.8
    return x


def test_tv_recovers_a_piecewise_constant_volume_better_than_zero_filled():
    x = _cubes()
    mask, _ = poisson_disc_mask((16, 16), 4, seed=0)
    op = CartesianMRI(mask)
    y = measure(op, x, 0.01, seed=0)
    zf = zero_filled(op, y)
    tv = tv_reconstruction(op, y, 1e-3, 300, bounds=(-1, 1), step_ratio=10.0)
    e_zf, e_tv = float((zf - x).norm()), float((tv - x).norm())
    assert e_tv < 0.3 * e_zf, (e_tv, e_zf)  # measured 0.07
    assert float(psnr(tv, x, 2.0)) > float(psnr(zf.clamp(-1, 1), x, 2.0)) + 10


def test_tv_minimises_its_objective():
    """The result has a lower objective than zero-filled, than the truth and than small perturbations of itself."""
    x = _cubes()
    mask, _ = poisson_disc_mask((16, 16), 4, seed=0)
    op = CartesianMRI(mask)
    y = measure(op, x, 0.05, seed=1)
    lam = 3e-3

    def objective(v):  # ‖A‖ = 1 here, so the normalised data term is the plain one
        r = op.forward(v) - y
        return float(0.5 * (r.abs() ** 2).sum() + lam * total_variation(v).sum())

    tv = tv_reconstruction(op, y, lam, 600, step_ratio=10.0)
    best = objective(tv)
    assert best < objective(zero_filled(op, y)) and best < objective(x)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        assert best <= objective(tv + 1e-3 * torch.randn(x.shape, generator=gen)) + 1e-6


def test_tv_without_regularisation_inverts_a_full_measurement():
    x = _cubes()
    op = CartesianMRI(torch.ones(16, 16, dtype=torch.bool))
    y = op.forward(x)
    assert torch.allclose(tv_reconstruction(op, y, 0.0, 100), x, atol=1e-4)


def test_tv_arguments():
    x = _cubes()
    op = CartesianMRI(torch.ones(16, 16, dtype=torch.bool))
    y = op.forward(x)
    for name, task in TV_DEFAULTS.items():
        assert name in TASKS and task["lam"] > 0 and task["iters"] >= 100
    with pytest.raises(ValueError, match="unknown TV task"):
        tv_reconstruction(op, y, "mri_3x")
    with pytest.raises(ValueError, match="lam must be"):
        tv_reconstruction(op, y, -1.0)
    with pytest.raises(ValueError, match="iters must be"):
        tv_reconstruction(op, y, 0.1, 0)
    with pytest.raises(ValueError, match="bounds"):
        tv_reconstruction(op, y, 0.1, 10, bounds=(1, -1))
    bad = y.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tv_reconstruction(op, bad, 0.1, 10)
    assert op.check_finite  # restored after the loop
    with pytest.raises(ValueError, match="real image domain"):
        tv_reconstruction(CartesianMRI(torch.ones(16, 16, dtype=torch.bool), complex_domain=True), y, 0.1, 10)


# --------------------------------------------------------------------------------------------------- zero-filled
def test_zero_filled_forms():
    x = _cubes()
    mask, _ = poisson_disc_mask((16, 16), 4, seed=0)
    y = CartesianMRI(mask).forward(x)
    image = ifft_c(y, (-3, -2, -1))
    assert torch.allclose(zero_filled(CartesianMRI(mask), y), image.real, atol=1e-6)  # real domain: Re(Aᴴ y)
    magnitude = zero_filled(CartesianMRI(mask, complex_domain=True), y)
    assert magnitude.dtype == torch.float32 and torch.allclose(magnitude, image.abs(), atol=1e-6)
    full = CartesianMRI(torch.ones(16, 16, dtype=torch.bool))
    assert torch.allclose(zero_filled(full, full.forward(x)), x, atol=1e-5)
    assert torch.allclose(fft_c(ifft_c(y, (-3, -2, -1)), (-3, -2, -1)), y, atol=1e-5)
    down = Downsampling(2)
    blocks = zero_filled(down, down.forward(x))  # nearest-neighbour upsampling of the block means
    assert torch.allclose(down.forward(blocks), down.forward(x), atol=1e-6) and blocks.shape == x.shape
    keep = torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(5)) < 0.5
    assert torch.equal(zero_filled(Masking(keep), Masking(keep).forward(x)), x * keep)


# --------------------------------------------------------------------------------------------------- tasks
def test_slice_matrix_is_the_ct_operator():
    ct = ParallelBeamCT(sparse_view_angles(7), 12)
    sm = SliceMatrix.from_operator(ct, (12, 12))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1, 3, 12, 12, generator=gen, dtype=torch.float64)
    y = ct.forward(x)
    assert sm.matrix.shape == (7 * ct.n_det, 144)
    assert torch.allclose(sm.forward(x), y, atol=1e-9) and torch.allclose(sm.adjoint(y), ct.adjoint(y), atol=1e-7)
    assert adjoint_error(sm, (2, 1, 3, 12, 12)) < 1e-6
    with pytest.raises(ValueError, match="matrix must be"):
        SliceMatrix(torch.zeros(5, 7), (12, 12), (7, ct.n_det))


def test_tasks_and_measurements():
    coils = coil_maps(4, (8, 10, 12))
    assert coils.shape == (1, 4, 8, 10, 12) and coils.dtype == torch.complex64
    assert torch.allclose(coils.abs().pow(2).sum(1), torch.ones(8, 10, 12), atol=1e-5)
    for name in TASKS:
        op, sigma_y = task_operator(name, (16, 16, 16))
        assert sigma_y > 0
        if name.startswith("mri"):
            acceleration = op.mask.numel() / op.mask.sum()
            assert abs(acceleration / TASKS[name]["acceleration"] - 1) < 0.05 and op.n_coils == TASKS[name].get(
                "coils", 1)
    op, sigma_y = task_operator("mri_4x", (16, 16, 16))
    x = _cubes()
    y0, y1 = measure(op, x, sigma_y, seed=3), measure(op, x, sigma_y, seed=3)
    assert torch.equal(y0, y1) and not torch.equal(y0, measure(op, x, sigma_y, seed=4))
    sampled = op.mask[..., None].expand(16, 16, 16)  # D×H mask, broadcast along the readout axis
    noise = (y0 - op.forward(x))[..., sampled]
    assert float(noise.abs().pow(2).mean().sqrt()) == pytest.approx(sigma_y, rel=0.1)
    with pytest.raises(ValueError, match="unknown task"):
        task_operator("mri_3x", (16, 16, 16))
