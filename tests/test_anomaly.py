"""Anomaly detection (pydiffmed.inverse.anomaly, noise): simplex noise, the map, threshold, score, AUROC and the
three reconstructions, with the exact Gaussian-prior denoiser (pydiffmed.gmm), a tiny random UNet3D and the
bundled demo model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from helpers import randomised

import pydiffmed
from pydiffmed import data
from pydiffmed.gmm import GaussianMixture
from pydiffmed.inverse import (anomaly_map, anomaly_score, auroc, gaussian_smooth, otsu_threshold,
                               reconstruct_healthy, simplex_noise, threshold)
from pydiffmed.inverse.anomaly import METHODS, _DDIMFrom, _DDIMInversionTo
from pydiffmed.inverse.noise import simplex3
from pydiffmed.models import UNet3D
from pydiffmed.ops.fused_step import philox_keys, philox_normal
from pydiffmed.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

LINEAR = NoiseSchedule.discrete("linear")


def lag_correlation(x, axis, lag=1):
    n = x.shape[axis]
    a, b = x.narrow(axis, 0, n - lag).reshape(-1).double(), x.narrow(axis, lag, n - lag).reshape(-1).double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# --- simplex noise -------------------------------------------------------------------------------------------------

def test_simplex_noise_is_determined_by_each_samples_seed():
    a = simplex_noise((3, 2, 12, 10, 8), seed=7)
    assert a.shape == (3, 2, 12, 10, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, simplex_noise((3, 2, 12, 10, 8), seed=7))
    assert not torch.allclose(a, simplex_noise((3, 2, 12, 10, 8), seed=8))
    # sample b uses seed + b, whatever the batch; channels differ from each other
    assert torch.equal(a[1:2], simplex_noise((1, 2, 12, 10, 8), seed=8))
    assert torch.equal(a[[2, 0]], simplex_noise((2, 2, 12, 10, 8), seed=[9, 7]))
    assert (a[:, 0] - a[:, 1]).abs().mean() > 0.5
    assert simplex_noise((2, 1, 16, 16), seed=0, scale=(4, 8)).shape == (2, 1, 16, 16)  # 2-D: a plane of it


@pytest.mark.parametrize("octaves,persistence,scale,tolerance", [(4, 0.8, 4.0, 0.06), (1, 0.5, 3.0, 0.01),
                                                                (6, 0.5, (8.0, 4.0, 2.0), 0.02)])
def test_simplex_noise_has_zero_mean_and_unit_variance(octaves, persistence, scale, tolerance):
    """Pooled over 48 volumes (196 608 voxels): the normalisation by SIMPLEX_STD·sqrt(Σ persistence^2o) gives unit
    variance for every octave count. The spread of these pooled estimates over 20 seed batches was 0.0025 for the
    mean and 0.011, 0.0013, 0.0035 for the variance (the cases in order); the bounds are ≥ 5 of those."""
    x = simplex_noise((48, 1, 16, 16, 16), seed=1000, octaves=octaves, persistence=persistence, scale=scale).double()
    assert abs(float(x.mean())) < 0.015
    assert abs(float(x.var()) - 1.0) < tolerance


def test_simplex_noise_is_spatially_correlated():
    simplex = simplex_noise((4, 1, 24, 24, 24), seed=3, scale=8.0)
    white = philox_normal(philox_keys(3, 4), 0, (4, 1, 24, 24, 24))
    for axis in (2, 3, 4):
        assert lag_correlation(simplex, axis) > 0.35
        assert abs(lag_correlation(white, axis)) < 0.03
        assert lag_correlation(simplex, axis, lag=6) < lag_correlation(simplex, axis, lag=1) - 0.2
    # larger features: neighbours more alike
    coarse = simplex_noise((4, 1, 24, 24, 24), seed=3, scale=16.0, octaves=2)
    assert lag_correlation(coarse, 2) > lag_correlation(simplex, 2) + 0.2


def test_simplex_octave_is_continuous():
    """Along random lines sampled every 1e-4 lattice units, one octave never jumps by more than its slope allows
    (measured largest step 8.4e-6; with the original kernel radius² 0.6 it jumps by 1.7e-4)."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(256, generator=g)
    steps = torch.arange(50_000, dtype=torch.float64)[:, None] * 1e-4
    for _ in range(8):
        start = torch.rand(3, generator=g, dtype=torch.float64) * 50
        direction = torch.randn(3, generator=g, dtype=torch.float64)
        values = simplex3(start + steps * direction / direction.norm(), perm)
        assert (values[1:] - values[:-1]).abs().max() < 2e-5


# --- smoothing and the map ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,truncate", [(1.0, 4.0), ((0.5, 1.5, 2.0), 4.0), ((3.0, 0.0, 1.0), 2.5), (0.3, 4.0)])
def test_gaussian_smooth_equals_scipy(sigma, truncate):
    """sigma 3 on a length-5 axis: the kernel reaches past the mirrored copy (scipy's 'reflect' repeats)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 9, 11, generator=g, dtype=torch.float64)
    sig = sigma if isinstance(sigma, tuple) else (sigma,) * 3
    expected = scipy.ndimage.gaussian_filter(x.numpy(), (0, 0, *sig), mode="reflect", truncate=truncate)
    out = gaussian_smooth(x, sigma, truncate)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)
    out32 = gaussian_smooth(x.float(), sigma, truncate)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, rtol=0, atol=2e-6)


def test_anomaly_map_is_the_smoothed_channel_mean_difference():
    g = torch.Generator().manual_seed(1)
    volume, recon = torch.randn(2, 3, 6, 7, 8, generator=g), torch.randn(2, 3, 6, 7, 8, generator=g)
    diff = (volume - recon).abs().mean(1, keepdim=True).double().numpy()
    amap = anomaly_map(volume, recon, smoothing_sigma=1.2)
    assert amap.shape == (2, 1, 6, 7, 8) and amap.dtype == torch.float32
    np.testing.assert_allclose(amap.numpy(), scipy.ndimage.gaussian_filter(diff, (0, 0, 1.2, 1.2, 1.2)), atol=2e-6)
    np.testing.assert_allclose(anomaly_map(volume, recon, 0).numpy(), diff, atol=1e-6)
    # a mask: smoothing normalised to it, zero outside; float masks count from 0.5
    mask = torch.zeros(6, 7, 8)
    mask[1:5, 2:6, 1:7] = 0.9
    m = (mask > 0.5).double().numpy()[None, None]
    smooth = lambda a: scipy.ndimage.gaussian_filter(a, (0, 0, 1.2, 1.2, 1.2))  # noqa: E731
    expected = np.where(m > 0, smooth(diff * m) / smooth(m), 0.0)
    np.testing.assert_allclose(anomaly_map(volume, recon, 1.2, mask=mask).numpy(), expected, atol=2e-6)


# --- threshold, score, AUROC ------------------------------------------------------------------------------------

def bimodal(seed=0):
    """900 'healthy' values around 0.1 and 100 'anomalous' ones around 0.7, as one (1, 1, 10, 10, 10) map."""
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([0.1 + 0.03 * torch.randn(900, generator=g), 0.7 + 0.08 * torch.randn(100, generator=g)])
    order = torch.randperm(1000, generator=g)
    truth = (torch.arange(1000) >= 900)[order]
    return values[order].reshape(1, 1, 10, 10, 10), truth.reshape(1, 1, 10, 10, 10)


def test_otsu_separates_a_bimodal_map():
    amap, truth = bimodal()
    t = otsu_threshold(amap)
    low, high = amap[~truth].max(), amap[truth].min()
    assert low < t <= high
    # the midpoint of the empty gap between the two classes' histogram bins
    assert abs(t - 0.5 * (float(low) + float(high))) < 0.5 * float(high - low) + (amap.max() - amap.min()) / 256
    assert torch.equal(threshold(amap, "otsu"), truth)
    # Otsu's criterion itself: the split it picks beats every split of the sorted values by at most one bin
    v = torch.sort(amap.reshape(-1).double()).values
    best = max(((k * (1000 - k)) * (v[:k].mean() - v[k:].mean()) ** 2, k) for k in range(1, 1000))[1]
    assert int((v < t).sum()) == best
    # two volumes: each gets its own threshold
    both = torch.cat([amap, 3.0 * amap])
    assert torch.equal(threshold(both, "otsu"), torch.cat([truth, truth]))


def test_percentile_and_value_thresholds():
    amap, _ = bimodal(1)
    for q in (50.0, 90.0, 99.0):
        found = threshold(amap, "percentile", percentile=q)
        assert torch.equal(found, amap > float(np.percentile(amap.numpy(), q)))
    assert int(threshold(amap, "percentile", percentile=90.0).sum()) == 100
    assert torch.equal(threshold(amap, 0.4), amap > 0.4)
    mask = torch.zeros(10, 10, 10, dtype=torch.bool)
    mask[:5] = True
    found = threshold(amap, "percentile", percentile=80.0, mask=mask)
    assert not found[..., 5:, :, :].any()
    inside = amap[0, 0, :5].reshape(-1).numpy()
    assert int(found.sum()) == int((inside > np.percentile(inside, 80.0)).sum())


def test_anomaly_score_is_the_mean_of_the_top_fraction():
    g = torch.Generator().manual_seed(2)
    amap = torch.rand(3, 1, 6, 6, 6, generator=g)
    flat = amap.reshape(3, -1)
    k = math.ceil(0.05 * 216)
    expected = torch.sort(flat, 1, descending=True).values[:, :k].mean(1)
    assert torch.allclose(anomaly_score(amap, top_fraction=0.05), expected)
    assert torch.allclose(anomaly_score(amap, top_fraction=1.0), flat.mean(1))
    assert torch.allclose(anomaly_score(amap, top_fraction=1e-9), flat.max(1).values)
    mask = torch.zeros(6, 6, 6, dtype=torch.bool)
    mask[2:4] = True
    inside = amap[:, 0, 2:4].reshape(3, -1)
    assert torch.allclose(anomaly_score(amap, top_fraction=1.0, mask=mask), inside.mean(1))


def brute_force_auroc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    greater = int((pos[:, None] > neg[None, :]).sum())
    ties = int((pos[:, None] == neg[None, :]).sum())
    return (greater + 0.5 * ties) / (pos.numel() * neg.numel())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pair_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(4, 5, 6, generator=g) < 0.3
    scores = torch.randint(0, 5, (4, 5, 6), generator=g).float() + 0.7 * labels  # many ties
    assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores.reshape(-1), labels.reshape(-1)),
                                                  abs=1e-12)
    assert auroc(scores, labels.long()) == auroc(scores, labels)
    mask = torch.rand(4, 5, 6, generator=g) < 0.6
    assert auroc(scores, labels, mask=mask) == pytest.approx(brute_force_auroc(scores[mask], labels[mask]),
                                                             abs=1e-12)


def test_auroc_extremes():
    labels = torch.tensor([False, False, True, True])
    assert auroc(torch.tensor([0.0, 1.0, 2.0, 3.0]), labels) == 1.0
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), labels) == 0.0
    assert auroc(torch.ones(4), labels) == 0.5


# --- reconstruction: exact Gaussian prior ---------------------------------------------------------------------

def gaussian_prior(side, variance, length, nugget, amplitude):
    """One smooth Gaussian 'anatomy': mean a cosine along the first axis, covariance a squared-exponential kernel
    of `length` voxels plus a nugget, on a side³ grid (d = side³)."""
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    dist2 = ((grid[:, None] - grid[None]) ** 2).sum(-1)
    cov = variance * np.exp(-dist2 / (2 * length ** 2)) + nugget * np.eye(side ** 3)
    return GaussianMixture([1.0], [amplitude * np.cos(grid[:, 0] / 3.0)], [cov])


PRIOR8 = gaussian_prior(8, 0.05, 2.0, 0.002, 0.5)


@pytest.mark.parametrize("method", ["gaussian", "simplex"])
def test_exact_prior_reconstruction_finds_an_outlier_region(method):
    """A draw from the prior plus +1.5 on a 3×3×3 block (27 of 512 voxels): the exact denoiser pulls the block
    back to the prior, so the smoothed map peaks there (AUROC over voxels; measured 0.9998 gaussian, 0.9993
    simplex) and the volume scores above the same draw without the block (measured 2.0 and 1.6 times)."""
    model = PRIOR8.model(LINEAR, "epsilon")
    healthy = PRIOR8.sample(1, seed=3)[0].float().reshape(1, 1, 8, 8, 8)
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    labels[..., 2:5, 3:6, 2:5] = True
    volume = healthy + 1.5 * labels
    both = torch.cat([volume, healthy])
    recon = reconstruct_healthy(model, both, method=method, level=0.5, num_steps=20, schedule=LINEAR, seed=0)
    assert recon.shape == both.shape and recon.dtype == torch.float32
    amap = anomaly_map(both, recon, smoothing_sigma=1.0)
    assert auroc(amap[:1], labels) > 0.9
    scores = anomaly_score(amap, top_fraction=0.05)
    assert scores[0] > 1.5 * scores[1]


def test_ddim_inversion_with_the_exact_prior_maps_a_healthy_volume_to_itself():
    """The probability-flow ODE is invertible: encoding to the level and decoding back returns the volume, up to
    DDIM's first-order error (measured relative errors 0.229, 0.072, 0.018 at 10, 40, 160 steps)."""
    prior = gaussian_prior(4, 0.3, 1.5, 0.05, 0.3)
    model = prior.model(LINEAR, "epsilon")
    volume = prior.sample(2, seed=3)[0].float().reshape(2, 1, 4, 4, 4)
    errors = []
    for steps in (10, 40, 160):
        recon = reconstruct_healthy(model, volume, method="ddim_inversion", level=0.5, num_steps=steps,
                                    schedule=LINEAR)
        errors.append(float((recon - volume).norm() / volume.norm()))
    assert errors[0] > 2.5 * errors[1] > 6 * errors[2]
    assert errors[2] < 0.03


@pytest.mark.parametrize("schedule,spacing", [(LINEAR, "leading"), (LINEAR, "trailing"), (LINEAR, "linspace"),
                                              (NoiseSchedule.vp(), "time"), (NoiseSchedule.vp(), "logsnr")])
def test_the_encoder_ends_where_the_decoder_starts(schedule, spacing):
    """The inversion's last evaluation moves the state to (alpha, sigma) of the decoder's first evaluation, and
    is evaluated at its model time, for every level and grid."""
    for steps in (7, 20):
        for level in (0.15, 0.5, 1.0):
            keep = int(steps * level)
            encoder = _DDIMInversionTo(schedule, steps, count=keep, spacing=spacing)
            decoder = _DDIMFrom(schedule, steps, first=steps - keep, spacing=spacing)
            assert encoder.num_model_evals == decoder.num_model_evals == keep
            time_enc, _, _, a_s, s_s, _ = encoder._step_list[-1]
            time_dec, a_t, s_t, *_ = decoder._step_list[0]
            assert (time_enc, a_s, s_s) == (time_dec, a_t, s_t)
            full = pydiffmed.get_solver("ddim", schedule, steps, spacing=spacing)
            assert decoder.timesteps.tolist() == full.timesteps.tolist()[steps - keep:]


@pytest.mark.parametrize("method", METHODS)
def test_the_model_is_evaluated_on_the_kept_part_of_the_grid(method):
    """Level 0.3 of 20 DDIM steps keeps the last 6 grid times; the inversion first climbs to the first of them."""
    times = []

    def model(x, t):
        times.append(float(t[0]))
        return exact(x, t)

    exact = PRIOR8.model(LINEAR, "epsilon")
    volume = PRIOR8.sample(1, seed=4)[0].float().reshape(1, 1, 8, 8, 8)
    reconstruct_healthy(model, volume, method=method, level=0.3, num_steps=20, schedule=LINEAR)
    kept = pydiffmed.get_solver("ddim", LINEAR, 20).timesteps.tolist()[-6:]
    assert kept == [250.0, 200.0, 150.0, 100.0, 50.0, 0.0]
    assert times == (kept[::-1] + kept if method == "ddim_inversion" else kept)


def test_gaussian_and_simplex_methods_start_at_the_same_level():
    """The 'gaussian' method (the engine's SDEdit) equals the simplex method's decoder started from the volume
    noised with the engine's own Philox noise, and the 'simplex' method that decoder started from the volume
    noised with simplex_noise of the seed: both methods noise to the same level."""
    model = PRIOR8.model(LINEAR, "epsilon")
    volume = PRIOR8.sample(2, seed=4)[0].float().reshape(2, 1, 8, 8, 8)
    steps, level = 20, 0.35
    recon = reconstruct_healthy(model, volume, method="gaussian", level=level, num_steps=steps, schedule=LINEAR,
                                seed=5)
    decoder = _DDIMFrom(LINEAR, steps, first=steps - int(steps * level))
    _, alpha, sigma, *_ = decoder._step_list[0]
    noise = philox_normal(philox_keys(5, 2), steps, volume.shape)  # the engine's start noise: word E
    again = pydiffmed.sample(model, volume.shape, decoder, x_T=alpha * volume + sigma * noise, progress=False)
    assert torch.allclose(recon, again, atol=1e-6)
    recon = reconstruct_healthy(model, volume, method="simplex", level=level, num_steps=steps, schedule=LINEAR,
                                seed=5, noise_options={"scale": 3.0})
    noise = simplex_noise(volume.shape, seed=5, scale=3.0)
    again = pydiffmed.sample(model, volume.shape, decoder, x_T=alpha * volume + sigma * noise, progress=False)
    assert torch.allclose(recon, again, atol=1e-6)


# --- reconstruction: a tiny UNet3D -------------------------------------------------------------------------------

TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                 attention_levels=(False, False), norm_num_groups=4)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomised(UNet3D(**TINY_UNET), seed=1)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_a_unet(tiny, method):
    volume = data.phantoms(2, seed=0, shape=16)
    run = dict(method=method, level=0.5, num_steps=6, schedule="cosine", prediction_type="v_prediction", clip=1.0)
    recon = reconstruct_healthy(tiny, volume, seed=3, **run)
    assert recon.shape == volume.shape and recon.dtype == torch.float32 and torch.isfinite(recon).all()
    assert recon.abs().max() < 10 and not torch.allclose(recon, volume, atol=1e-3)
    assert torch.equal(recon, reconstruct_healthy(tiny, volume, seed=3, **run))
    other = reconstruct_healthy(tiny, volume, seed=4, **run)
    if method == "ddim_inversion":  # no noise anywhere
        assert torch.equal(other, recon)
    else:
        assert not torch.allclose(other, recon)
        # sample b depends only on its own seed (3 + b)
        assert torch.allclose(reconstruct_healthy(tiny, volume[1:], seed=4, **run), recon[1:], atol=1e-5)
    amap = anomaly_map(volume, recon)
    assert amap.shape == (2, 1, 16, 16, 16) and (amap >= 0).all()


def test_stochastic_solver_and_noise_options(tiny):
    volume = data.phantoms(1, seed=0, shape=16)
    ddpm = reconstruct_healthy(tiny, volume, method="gaussian", solver="ddpm", level=0.4, num_steps=5)
    assert torch.isfinite(ddpm).all()
    coarse = reconstruct_healthy(tiny, volume, method="simplex", level=0.4, num_steps=5,
                                 noise_options={"scale": 8.0, "octaves": 2})
    fine = reconstruct_healthy(tiny, volume, method="simplex", level=0.4, num_steps=5,
                               noise_options={"scale": 2.0, "octaves": 2})
    assert not torch.allclose(coarse, fine)


# --- bad inputs ------------------------------------------------------------------------------------------------

def test_bad_inputs_are_value_errors_naming_the_problem():
    model = PRIOR8.model(LINEAR, "epsilon")
    volume = torch.zeros(1, 1, 8, 8, 8)
    for level in (0, 0.0, -0.2, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="level must be a number in"):
            reconstruct_healthy(model, volume, level=level)
    with pytest.raises(ValueError, match="keeps no step of 10"):
        reconstruct_healthy(model, volume, level=0.05, num_steps=10)
    with pytest.raises(ValueError, match="unknown method 'anoddpm'"):
        reconstruct_healthy(model, volume, method="anoddpm")
    nan = volume.clone()
    nan[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="volume has NaN/Inf"):
        reconstruct_healthy(model, nan)
    with pytest.raises(ValueError, match="solver must be None or 'ddim'"):
        reconstruct_healthy(model, volume, method="simplex", solver="dpmpp_2m")
    with pytest.raises(ValueError, match="eta must be 0"):
        reconstruct_healthy(model, volume, method="ddim_inversion", eta=1.0)
    with pytest.raises(ValueError, match="noise_options are simplex noise options"):
        reconstruct_healthy(model, volume, method="gaussian", noise_options={"scale": 2.0})
    with pytest.raises(ValueError, match=r"volume has shape \(1, 1, 8, 8, 8\) and reconstruction \(1, 1, 8, 8, 7\)"):
        anomaly_map(volume, torch.zeros(1, 1, 8, 8, 7))
    with pytest.raises(ValueError, match="reconstruction has NaN/Inf"):
        anomaly_map(volume, nan)
    with pytest.raises(ValueError, match="mask has shape"):
        anomaly_map(volume, volume, mask=torch.ones(7, 8, 8))
    with pytest.raises(ValueError, match="unknown threshold method 'mean'"):
        threshold(volume, "mean")
    with pytest.raises(ValueError, match="percentile must be a number in"):
        threshold(volume, "percentile", percentile=101)
    with pytest.raises(ValueError, match="the mask of volume 0 is empty"):
        anomaly_score(volume, mask=torch.zeros(8, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_fraction"):
        anomaly_score(volume, top_fraction=0)
    with pytest.raises(ValueError, match="needs positive and negative voxels, got 0 positive"):
        auroc(torch.rand(5), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores have NaN"):
        auroc(torch.tensor([0.0, float("nan")]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="labels must be bool or hold only 0 and 1"):
        auroc(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"scores have shape \(3,\) and labels \(4,\)"):
        auroc(torch.rand(3), torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="sigma must be"):
        gaussian_smooth(volume, -1.0)
    with pytest.raises(ValueError, match="octaves must be a positive int"):
        simplex_noise((1, 1, 4, 4, 4), octaves=0)


# --- the bundled demo model ----------------------------------------------------------------------------------

def test_demo_model_reconstructs_a_phantom_by_every_method():
    """Sanity with a trained network (the demo model saw lesions in training: not a healthy model, so no lesion
    AUROC is asserted): each method's reconstruction of a phantom from level 0.2 (2 of 10 DDIM steps) is close to
    it (measured relative errors 0.036, 0.063, 0.062) but not the phantom itself (8 model evaluations)."""
    model, schedule, info = pydiffmed.load_model("demo")
    phantom = data.head_phantom(5, 0, info.volume_shape)[None]
    for method in METHODS:
        recon = reconstruct_healthy(model, phantom, method=method, level=0.2, num_steps=10, schedule=schedule,
                                    seed=0, prediction_type=info.prediction_type, clip=info.clip_sample)
        error = float((recon - phantom).norm() / phantom.norm())
        assert 0.005 < error < 0.15, (method, error)


def test_healthy_phantoms_differ_only_in_their_lesions():
    volume, labels = data.head_phantom(1, 4, return_labels=True)
    healthy, healthy_labels = data.head_phantom(1, 4, return_labels=True, lesions=False)
    assert (labels == 3).sum() > 0 and (healthy_labels == 3).sum() == 0
    changed = (volume - healthy).abs()[0] > 1e-6
    assert changed.any()
    assert (labels[changed] == 3).float().mean() > 0.6  # the rest: partial-volume rims of the lesions
    assert torch.equal(volume[0][labels != 3].ne(healthy[0][labels != 3]), changed[labels != 3])


def test_healthy_model_finds_lesions():
    """The bundled demo_healthy (the demo fine-tuned on the same heads without lesions) against held-out lesion
    phantoms (family 1): voxel AUROC of the smoothed anomaly map inside the head's brain (Gaussian partial noising
    to level 0.5, 10 DDIM steps). Measured 0.985 / 0.986 / 0.994 (mean 0.989), against 0.946 / 0.966 / 0.978
    (mean 0.963) with the lesion-trained demo model."""
    aurocs = {}
    for name in ("demo_healthy", "demo"):
        model, schedule, info = pydiffmed.load_model(name)
        values = []
        for index in range(3):
            volume, labels = data.head_phantom(1, index, info.volume_shape, return_labels=True)
            volume = volume[None]
            recon = reconstruct_healthy(model, volume, method="gaussian", level=0.5, num_steps=10,
                                        schedule=schedule, seed=index, prediction_type=info.prediction_type)
            brain = (labels >= 2)[None, None]
            amap = anomaly_map(volume, recon, smoothing_sigma=1.0, mask=brain)
            values.append(float(auroc(amap, (labels == 3)[None, None], mask=brain)))
        aurocs[name] = sum(values) / len(values)
    assert aurocs["demo_healthy"] > 0.975, aurocs
    assert aurocs["demo_healthy"] > aurocs["demo"] + 0.01, aurocs
