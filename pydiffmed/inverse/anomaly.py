"""Anomaly detection with a diffusion model of healthy anatomy: reconstruct, compare, threshold, score.

    recon = reconstruct_healthy(model, volume, schedule=schedule, method="simplex", level=0.3, num_steps=50,
                                prediction_type="v_prediction")
    amap = anomaly_map(volume, recon, smoothing_sigma=1.0, mask=brain)      # (B, 1, *spatial)
    found, score = threshold(amap, "otsu", mask=brain), anomaly_score(amap, mask=brain)
    auroc(amap, lesion_labels, mask=brain)                                  # voxel-level AUROC

A model trained on healthy volumes maps a partly noised volume back to a healthy-looking one: what it changes is
what it did not expect. `reconstruct_healthy` runs the reconstruction on the engine, three ways. All of them
start at the same noise level: `level` in (0, 1] is the fraction of the solver's `num_steps`-step grid that is
run back, keep = int(num_steps·level) evaluations, starting at the grid time t_k of the first kept one (SDEdit's
`strength`; with DDIM's default leading spacing t_k = (keep − 1)·T/num_steps ≈ level·T), where
x_t = alpha_k·x0 + sigma_k·noise.

* "gaussian" (SDEdit, Meng et al.; AnoDDPM's Gaussian baseline): the engine's partial noising and denoising,
  `pydiffmed.sample(..., init=volume, strength=level)`: noise = the engine's Philox Gaussian noise of the seed,
  then any solver that can start part-way (default "ddim", eta=0; e.g. "ddpm" for the stochastic AnoDDPM).
* "simplex" (AnoDDPM, Wyatt et al. 2022): the volume is noised with multi-octave simplex noise (noise.py, unit
  variance per voxel, seeded) instead of Gaussian noise; its low frequencies cover larger structures, which the
  model then re-draws. The engine's stochastic solvers draw Philox Gaussian noise inside fused_step at every
  step and the engine cannot be handed other noise, so AnoDDPM's fresh simplex noise per step (its DDPM
  sampler) is not available; the decoder here is deterministic DDIM (eta = 0)
  from the simplex-noised start x_T = alpha_k·x0 + sigma_k·n_simplex, which adds no noise after the start and so
  is exactly "simplex partial noising, then the model's probability-flow map back" (solver must be "ddim").
* "ddim_inversion": deterministic DDIM inversion of the volume up to t_k (the first `keep` evaluations of the
  `ddim_inversion` solver on the same grid), then DDIM (eta = 0) from there back to the data: no noise at all,
  the seed is unused. With an exact model and fine steps this maps the volume to itself (the probability-flow
  ODE is invertible); anomalies disappear through what the model's encoding does not preserve, so it favours
  few steps and high levels (or conditioning towards healthy data).

The map: |volume − reconstruction| averaged over channels and Gaussian-smoothed in 3-D (`gaussian_smooth`:
separable, = scipy.ndimage.gaussian_filter with mode="reflect"); with a mask, smoothing is normalised to the
mask (smooth(d·m)/smooth(m), zero outside), so errors outside the brain do not bleed in nor does its edge fade.
The per-volume score is the mean of the top `top_fraction` (default 1 %) of the map's voxels inside the mask:
unlike the maximum it is not set by one noisy voxel, unlike the mean it is not diluted by the healthy volume.

Masks (everywhere): bool, or numbers (voxels ≥ 0.5 are inside), broadcastable to the map (B, 1, *spatial).
"""
from __future__ import annotations

import math
import numbers

import torch

from ..solvers.ddim import DDIM, DDIMInversion
from .noise import simplex_noise

METHODS = ("gaussian", "simplex", "ddim_inversion")
THRESHOLD_METHODS = ("percentile", "otsu")


# --- checks --------------------------------------------------------------------------------------------------

def _check_volume(name, volume, min_dims=3):
    if not isinstance(volume, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(volume).__name__}")
    if volume.ndim < min_dims:
        raise ValueError(f"{name} must be (B, C, *spatial), got shape {tuple(volume.shape)}")
    if volume.is_complex():
        raise ValueError(f"{name} must be real, got {volume.dtype}")
    if volume.is_floating_point() and not bool(torch.isfinite(volume).all()):
        raise ValueError(f"{name} has NaN/Inf values")
    return volume


def _check_level(level):
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 < level <= 1.0:
        raise ValueError(f"level must be a number in (0, 1], got {level!r}")
    return float(level)


def _mask(mask, shape, device):
    """The mask as a bool tensor of `shape` (broadcast), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    try:
        mask = mask.to(device).expand(shape)
    except RuntimeError:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to {tuple(shape)}") from None
    if mask.dtype != torch.bool:
        if not bool(torch.isfinite(mask).all()):
            raise ValueError("mask has NaN/Inf values")
        mask = mask >= 0.5
    return mask


def _check_map(amap, name="map"):
    amap = _check_volume(name, amap)
    if not amap.is_floating_point():
        amap = amap.float()
    return amap


def _inside(amap, mask):
    """Per volume, the 1-D values of the map inside the mask (ValueError for an empty one)."""
    mask = _mask(mask, amap.shape, amap.device)
    values = [amap[b].reshape(-1) if mask is None else amap[b][mask[b]] for b in range(amap.shape[0])]
    for b, v in enumerate(values):
        if v.numel() == 0:
            raise ValueError(f"the mask of volume {b} is empty")
    return values, mask


# --- smoothing and the map -------------------------------------------------------------------------------------

def _reflect_index(n, radius, device):
    """Indices of a length-n axis padded by `radius` on each side, mirrored about the edges (scipy's 'reflect':
    d c b a | a b c d | d c b a), for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_smooth(volume, sigma, truncate: float = 4.0):
    """Gaussian smoothing of (B, C, *spatial) over the spatial axes: separable 1-D convolutions with kernels of
    radius int(truncate·sigma + 0.5), normalised to sum 1, edges mirrored — scipy.ndimage.gaussian_filter(x,
    (0, 0, *sigma), mode="reflect", truncate=truncate). sigma: voxels, a number or one per spatial axis (0: that
    axis is not smoothed). Computed in float32 (float64 for float64 input)."""
    volume = _check_volume("volume", volume)
    spatial = volume.ndim - 2
    sigmas = tuple(sigma) if isinstance(sigma, (tuple, list)) else (sigma,) * spatial
    if len(sigmas) != spatial or any(isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s)
                                     or s < 0 for s in sigmas):
        raise ValueError(f"sigma must be a non-negative number or one per spatial axis ({spatial}), got {sigma!r}")
    if isinstance(truncate, bool) or not isinstance(truncate, numbers.Real) or not truncate > 0:
        raise ValueError(f"truncate must be a positive number, got {truncate!r}")
    out = volume.to(torch.float64 if volume.dtype == torch.float64 else torch.float32)
    for axis, s in enumerate(sigmas, start=2):
        radius = int(truncate * s + 0.5)
        if s == 0 or radius == 0:
            continue
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / s) ** 2)
        kernel = (kernel / kernel.sum()).to(out.dtype).to(out.device)
        n = out.shape[axis]
        padded = out.index_select(axis, _reflect_index(n, radius, out.device)).movedim(axis, -1)
        rows = padded.reshape(-1, 1, n + 2 * radius)
        smooth = torch.nn.functional.conv1d(rows, kernel.view(1, 1, -1))
        out = smooth.reshape(*padded.shape[:-1], n).movedim(-1, axis)
    return out.contiguous()


def anomaly_map(volume, reconstruction, smoothing_sigma=1.0, mask=None, *, truncate: float = 4.0):
    """The anomaly map (B, 1, *spatial) float32: |volume − reconstruction| averaged over channels, Gaussian-smoothed
    with `smoothing_sigma` voxels (a number or one per spatial axis; 0: no smoothing). With a mask: smoothing
    normalised to the mask (smooth(d·m)/smooth(m)) and zero outside it. The reconstruction is moved to the
    volume's device."""
    volume = _check_volume("volume", volume)
    reconstruction = _check_volume("reconstruction", reconstruction)
    if volume.shape != reconstruction.shape:
        raise ValueError(f"volume has shape {tuple(volume.shape)} and reconstruction {tuple(reconstruction.shape)}: "
                         f"they must match")
    diff = (volume.float() - reconstruction.to(volume.device).float()).abs().mean(1, keepdim=True)
    m = _mask(mask, diff.shape, diff.device)
    if m is None:
        return gaussian_smooth(diff, smoothing_sigma, truncate)
    weight = m.float()
    num = gaussian_smooth(diff * weight, smoothing_sigma, truncate)
    den = gaussian_smooth(weight, smoothing_sigma, truncate)
    return torch.where(m, num / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


# --- threshold, score, AUROC -----------------------------------------------------------------------------------

def _percentile(sorted_values, q):
    """numpy.percentile's default (linear) of 1-D sorted values."""
    pos = q / 100.0 * (sorted_values.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, sorted_values.numel() - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold of 1-D values: the histogram (`bins` bins over [min, max]) is split where the
    between-class variance w0·w1·(mu0 − mu1)² is largest; the threshold is the bin edge of that split (the
    middle of a run of equal maxima, e.g. across an empty gap), so `values >= threshold` is the upper class."""
    values = torch.as_tensor(values).reshape(-1).double()
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}")
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        raise ValueError("otsu needs a non-empty set of finite values")
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return math.nextafter(hi, math.inf)  # one value: nothing is above it
    counts = torch.histc(values, bins=bins, min=lo, max=hi).double()
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = torch.cumsum(counts, 0)[:-1]
    s0 = torch.cumsum(counts * centres, 0)[:-1]
    total, sum_all = counts.sum(), (counts * centres).sum()
    w1 = total - w0
    between = w0 * w1 * (s0 / w0.clamp_min(1) - (sum_all - s0) / w1.clamp_min(1)) ** 2
    best = float(between.max())
    first = int(torch.argmax(between))
    last = first
    while last + 1 < between.numel() and float(between[last + 1]) >= best * (1 - 1e-12):
        last += 1
    return float(0.5 * (edges[first + 1] + edges[last + 1]))


def threshold(amap, method="percentile", *, percentile: float = 99.0, bins: int = 256, mask=None):
    """A bool map (same shape) of the anomalous voxels, thresholded per volume (first axis) over its voxels in the
    mask (False outside it). method: "percentile" (voxels above the `percentile`-th percentile, numpy's linear
    interpolation), "otsu" (voxels at or above Otsu's threshold with `bins` histogram bins, `otsu_threshold`), or
    a number (voxels above it)."""
    amap = _check_map(amap)
    if isinstance(method, numbers.Real) and not isinstance(method, bool):
        if not math.isfinite(method):
            raise ValueError(f"a threshold value must be finite, got {method!r}")
        m = _mask(mask, amap.shape, amap.device)
        found = amap > float(method)
        return found if m is None else found & m
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; expected one of {THRESHOLD_METHODS} or a number")
    if method == "percentile" and (isinstance(percentile, bool) or not isinstance(percentile, numbers.Real)
                                   or not 0 <= percentile <= 100):
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    values, m = _inside(amap, mask)
    found = torch.zeros(amap.shape, dtype=torch.bool, device=amap.device)
    for b, v in enumerate(values):
        if method == "percentile":
            found[b] = amap[b] > _percentile(torch.sort(v).values, float(percentile))
        else:
            found[b] = amap[b] >= otsu_threshold(v.cpu(), bins)
    return found if m is None else found & m


def anomaly_score(amap, *, top_fraction: float = 0.01, mask=None):
    """Per-volume anomaly score (B,) float32: the mean of the k = max(1, ceil(top_fraction·n)) largest map values
    among the n voxels of the volume inside the mask (top_fraction = 1: the mean over the mask)."""
    amap = _check_map(amap)
    if isinstance(top_fraction, bool) or not isinstance(top_fraction, numbers.Real) or not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be a number in (0, 1], got {top_fraction!r}")
    values, _ = _inside(amap, mask)
    return torch.stack([torch.topk(v.float(), max(1, math.ceil(top_fraction * v.numel()))).values.mean()
                        for v in values])


def auroc(scores, labels, mask=None) -> float:
    """Area under the ROC curve of `scores` for the binary `labels` (same shape; bool or 0/1), over the voxels in
    the mask: the Mann–Whitney probability that a positive voxel scores above a negative one, ties counting 1/2
    (average ranks; exact integer arithmetic)."""
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError("scores and labels must be torch.Tensors")
    if scores.shape != labels.shape:
        raise ValueError(f"scores have shape {tuple(scores.shape)} and labels {tuple(labels.shape)}: they must match")
    if labels.dtype != torch.bool:
        if labels.is_complex() or not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("labels must be bool or hold only 0 and 1")
        labels = labels == 1
    scores = scores.detach().cpu().double()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores have NaN/Inf values")
    labels = labels.cpu()
    m = _mask(mask, scores.shape, "cpu")
    if m is not None:
        scores, labels = scores[m], labels[m]
    scores, labels = scores.reshape(-1), labels.reshape(-1)
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs positive and negative voxels, got {n_pos} positive and {n_neg} negative")
    _, group, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # a group of c tied values holds ranks end−c+1 … end (1-based): twice its average rank is 2·end − c + 1
    twice_rank = 2 * torch.cumsum(counts, 0) - counts + 1
    twice_sum = int(twice_rank[group][labels].sum())
    return (twice_sum - n_pos * (n_pos + 1)) / (2 * n_pos * n_neg)


# --- reconstruction ------------------------------------------------------------------------------------------------

class _DDIMFrom(DDIM):
    """DDIM's evaluations first, first+1, … of its num_steps grid: the decoder from that evaluation's level."""

    def __init__(self, schedule, num_steps, *, first, **options):
        self.first = int(first)
        super().__init__(schedule, num_steps, **options)

    def _steps(self):
        return super()._steps()[self.first:]


class _DDIMInversionTo(DDIMInversion):
    """The first `count` evaluations of DDIM inversion on a num_steps grid: the encoder up to the level where
    _DDIMFrom(first=num_steps − count) starts."""

    def __init__(self, schedule, num_steps, *, count, **options):
        self.count = int(count)
        super().__init__(schedule, num_steps, **options)

    def _steps(self):
        return super()._steps()[:self.count]


def _schedule(schedule):
    from ..schedules import NoiseSchedule

    if schedule is None:
        return NoiseSchedule.discrete("linear")
    if isinstance(schedule, str):
        return NoiseSchedule.discrete(schedule)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule or a beta schedule name, got {type(schedule).__name__}")
    return schedule


def _with_clip_form(name, options):
    """Clipping runs in the form the engine's plan supports (as the command does it)."""
    from ..solvers import SOLVERS

    if name in SOLVERS and (options.get("clip") is not None or options.get("thresholding")):
        return {**SOLVERS[name].plan_clip_options, **options}
    return options


def reconstruct_healthy(model, volume, *, method="gaussian", level=0.5, solver=None, num_steps=50, schedule=None,
                        seed=0, noise_options=None, device=None, dtype=None, progress=False, **solver_options):
    """The model's reconstruction of `volume` (B, C, *spatial) from noise level `level` (see the module docstring):
    a float32 tensor of the volume's shape on the engine's device.

    model, schedule (NoiseSchedule or beta schedule name; default linear), device, dtype: as for pydiffmed.sample.
    method: "gaussian" (SDEdit through the engine; solver: any that can start part-way, default "ddim"),
      "simplex" (simplex-noised start, deterministic DDIM back) or "ddim_inversion" (DDIM inversion up to the
      level, DDIM back); the last two take solver None or "ddim" with eta = 0.
    level: in (0, 1]: the fraction of the num_steps-step grid run back; at least one evaluation must remain.
    seed: an int (sample b: seed + b) or one per sample: the Gaussian noise of "gaussian" (the engine's Philox
      noise) and the simplex noise of "simplex"; "ddim_inversion" uses none.
    noise_options: keyword arguments of noise.simplex_noise (scale, octaves, persistence, lacunarity).
    solver_options: the solvers' options (prediction_type, clip, spacing, ...); with clip, DDIM's plan form
      use_clipped_model_output=True is the default.
    """
    from ..engine import sample

    volume = _check_volume("volume", volume)
    if not volume.is_floating_point():
        raise ValueError(f"volume must be a floating-point tensor, got {volume.dtype}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    level = _check_level(level)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    num_steps = int(num_steps)
    keep = int(num_steps * level)
    if keep < 1:
        raise ValueError(f"level={level} keeps no step of {num_steps}; raise it to at least {1 / num_steps:.3g} or "
                         f"use more steps")
    if noise_options is not None and method != "simplex":
        raise ValueError(f"noise_options are simplex noise options; method {method!r} does not use them")
    schedule = _schedule(schedule)
    shape = tuple(volume.shape)
    run = dict(device=device, dtype=dtype, progress=progress)

    if method == "gaussian":
        name = "ddim" if solver is None else solver
        return sample(model, shape, name, num_steps, schedule, seed, init=volume, strength=level, **run,
                      **_with_clip_form(name, solver_options))

    if solver not in (None, "ddim"):
        raise ValueError(f"method {method!r} decodes with deterministic DDIM: solver must be None or 'ddim', got "
                         f"{solver!r}")
    if solver_options.get("eta", 0.0) != 0.0:
        raise ValueError(f"method {method!r} decodes with deterministic DDIM: eta must be 0, got "
                         f"{solver_options['eta']!r}")
    if "model_time" in solver_options:
        raise ValueError("model_time is not an option here: the inversion evaluates the model at its target time "
                         "(model_time='target'), where the decoder starts")
    options = _with_clip_form("ddim", solver_options)
    decoder = _DDIMFrom(schedule, num_steps, first=num_steps - keep, **options)
    if method == "simplex":
        _, alpha, sigma, *_ = decoder._step_list[0]
        noise = simplex_noise(shape, seed, device=volume.device, **(noise_options or {}))
        start = alpha * volume.float() + sigma * noise
    else:
        encoder_options = {k: v for k, v in options.items() if k != "eta"}
        encoder = _DDIMInversionTo(schedule, num_steps, count=keep, **encoder_options)
        start = sample(model, shape, encoder, x_T=volume.float(), **run)
    return sample(model, shape, decoder, seed=seed, x_T=start, **run)


__all__ = ["METHODS", "THRESHOLD_METHODS", "anomaly_map", "anomaly_score", "auroc", "gaussian_smooth",
           "otsu_threshold", "reconstruct_healthy", "threshold"]
