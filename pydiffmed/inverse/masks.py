"""Seeded Cartesian undersampling masks for `CartesianMRI`.

k-space is centred (index ``n // 2`` is DC, as `CartesianMRI` produces it). Every generator returns
``(mask, achieved_acceleration)``: a bool tensor of the requested shape and ``mask.numel() / mask.sum()``. The
fully sampled centre (``max(1, round(center_fraction * n))`` lines around ``n // 2``) is always included and
counts towards the acceleration. The same arguments and seed give the same mask on every machine.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["poisson_disc_mask", "random_mask", "uniform_mask"]


def _shape(shape) -> tuple[int, ...]:
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"mask shape must be non-empty with positive sizes, got {shape}")
    return shape


def _check(acceleration: float, center_fraction: float) -> float:
    acceleration = float(acceleration)
    if not math.isfinite(acceleration) or acceleration < 1:
        raise ValueError(f"acceleration must be a finite number >= 1, got {acceleration}")
    if not 0 <= center_fraction < 1:
        raise ValueError(f"center_fraction must be in [0, 1), got {center_fraction}")
    return acceleration


def _centre(n: int, center_fraction: float) -> tuple[int, int]:
    nc = max(1, round(center_fraction * n))
    start = n // 2 - nc // 2
    return start, start + nc


def _budget(n: int, acceleration: float, nc: int) -> int:
    target = max(1, round(n / acceleration))
    if nc > target:
        raise ValueError(f"the fully sampled centre ({nc} of {n}) alone exceeds the budget of acceleration "
                         f"{acceleration} ({target} samples): lower center_fraction or acceleration")
    return target


def _finish(lines: torch.Tensor, shape: tuple[int, ...], axis: int) -> tuple[torch.Tensor, float]:
    """lines: (..., n) bool, either 1-D (broadcast) or one row per index of the other axes."""
    other = shape[:axis] + shape[axis + 1:]
    mask = lines.expand(*other, shape[axis]) if lines.ndim == 1 else lines.reshape(*other, shape[axis])
    mask = torch.movedim(mask, -1, axis).contiguous()
    return mask, mask.numel() / max(int(mask.sum()), 1)


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-D mask shape")
    return axis % ndim


def uniform_mask(shape, acceleration: float, center_fraction: float = 0.08, axis: int = -1,
                 offset: float = 0.0) -> tuple[torch.Tensor, float]:
    """Equispaced phase-encode lines along `axis` plus the centre; the spacing is chosen so that the total,
    centre included, is ``n / acceleration`` lines (fastMRI's equispaced rule). Constant along other axes."""
    shape = _shape(shape)
    acceleration = _check(acceleration, center_fraction)
    axis = _axis(axis, len(shape))
    n = shape[axis]
    c0, c1 = _centre(n, center_fraction)
    target = _budget(n, acceleration, c1 - c0)
    lines = torch.zeros(n, dtype=torch.bool)
    lines[c0:c1] = True
    if target > c1 - c0:
        spacing = (n - (c1 - c0)) / (target - (c1 - c0))
        pos = torch.arange(offset % spacing, n, spacing, dtype=torch.float64).round().long().clamp(max=n - 1)
        lines[pos] = True
    return _finish(lines, shape, axis)


def random_mask(shape, acceleration: float, center_fraction: float = 0.08, axis: int = -1,
                density: str = "gaussian", seed: int | torch.Generator = 0, independent: bool = False,
                sigma: float = 0.25) -> tuple[torch.Tensor, float]:
    """Random phase-encode lines along `axis` plus the centre: exactly ``round(n / acceleration)`` lines, the
    non-centre ones drawn without replacement, uniformly (``density="uniform"``) or with Gaussian weights of
    standard deviation ``sigma * n`` around the centre (``"gaussian"``). ``independent=True`` draws a new set for
    every index of the other axes (e.g. slice-wise masks of shape D×H for ``CartesianMRI(mode="slice")``)."""
    shape = _shape(shape)
    acceleration = _check(acceleration, center_fraction)
    axis = _axis(axis, len(shape))
    if density not in ("gaussian", "uniform"):
        raise ValueError(f"density must be 'gaussian' or 'uniform', got {density!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    n = shape[axis]
    c0, c1 = _centre(n, center_fraction)
    extra = _budget(n, acceleration, c1 - c0) - (c1 - c0)
    k = torch.arange(n, dtype=torch.float64)
    weights = torch.exp(-0.5 * ((k - n // 2) / (sigma * n)) ** 2) if density == "gaussian" else torch.ones(n)
    weights[c0:c1] = 0
    rows = math.prod(shape[:axis] + shape[axis + 1:]) if independent else 1
    lines = torch.zeros(rows, n, dtype=torch.bool)
    lines[:, c0:c1] = True
    for r in range(rows):
        if extra > 0:
            lines[r, torch.multinomial(weights, extra, replacement=False, generator=gen)] = True
    return _finish(lines if independent else lines[0], shape, axis)


_STENCILS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _stencil(r8: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets strictly inside a disc of radius r8 / 8 (grid units)."""
    if r8 not in _STENCILS:
        r = r8 / 8
        m = math.ceil(r)
        oy, oz = np.mgrid[-m:m + 1, -m:m + 1]
        keep = oy ** 2 + oz ** 2 < r * r
        _STENCILS[r8] = (oy[keep], oz[keep])
    return _STENCILS[r8]


def _dart_throw(radius: np.ndarray, order: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Random sequential Poisson-disc sampling on the grid: visit points in `order`, keep a point unless it lies
    within the radius of a kept point (the kept point's radius). Centre points are kept first."""
    ny, nz = radius.shape
    pad = math.ceil(float(radius.max())) + 1
    blocked = np.zeros((ny + 2 * pad, nz + 2 * pad), dtype=bool)
    kept = np.zeros(ny * nz, dtype=bool)
    r8 = np.maximum(np.round(radius * 8).astype(np.int64), 1).ravel()
    for idx in np.flatnonzero(centre.ravel()).tolist() + order.tolist():
        y, z = divmod(idx, nz)
        if kept[idx] or (blocked[y + pad, z + pad] and not centre[y, z]):
            continue
        kept[idx] = True
        oy, oz = _stencil(int(r8[idx]))
        blocked[oy + (y + pad), oz + (z + pad)] = True
    return kept.reshape(ny, nz)


def poisson_disc_mask(shape, acceleration: float, center_fraction: float = 0.08, seed: int | np.random.Generator = 0,
                      falloff: float = 2.0, tol: float = 0.02, max_iter: int = 20) -> tuple[torch.Tensor, float]:
    """Variable-density Poisson-disc mask on a 2-D phase-encode plane (ky×kz of 3-D Cartesian MRI; the readout
    axis is fully sampled, so pass this D×H mask to `CartesianMRI`, which broadcasts it along W). Minimum
    distance between samples grows as ``scale * (1 + falloff * rho)`` with the normalised radius rho from the
    centre (density ~ 1/(1 + falloff * rho)²); `scale` is adjusted until the acceleration, centre box included,
    is within `tol` (relative) of the request, or the closest after `max_iter` tries is returned."""
    shape = _shape(shape)
    if len(shape) != 2:
        raise ValueError(f"poisson_disc_mask needs a 2-D shape (ky, kz), got {shape}")
    acceleration = _check(acceleration, center_fraction)
    if falloff < 0:
        raise ValueError(f"falloff must be >= 0, got {falloff}")
    ny, nz = shape
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(int(seed))
    (y0, y1), (z0, z1) = _centre(ny, center_fraction), _centre(nz, center_fraction)
    centre = np.zeros(shape, dtype=bool)
    centre[y0:y1, z0:z1] = True
    target = _budget(ny * nz, acceleration, int(centre.sum()))
    yy, zz = np.meshgrid(np.arange(ny), np.arange(nz), indexing="ij")
    rho = np.sqrt(((yy - ny // 2) / (ny / 2)) ** 2 + ((zz - nz // 2) / (nz / 2)) ** 2)
    profile = 1 + falloff * rho
    order = rng.permutation(ny * nz)
    scale = math.sqrt(0.7 * ny * nz / target) / float(profile.mean())  # random packing: ~0.7·area/r² points
    best = None
    for _ in range(max_iter):
        kept = _dart_throw(scale * profile, order, centre)
        count = int(kept.sum())
        err = abs(ny * nz / count / acceleration - 1)
        if best is None or err < best[0]:
            best = (err, kept)
        if err <= tol:
            break
        outside, want = count - centre.sum(), target - centre.sum()
        scale *= math.sqrt(max(outside, 1) / max(want, 1)) ** 0.8  # count ~ 1/scale²; damped
    mask = torch.from_numpy(best[1].copy())
    return mask, mask.numel() / int(mask.sum())
