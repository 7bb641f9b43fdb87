"""Seeded multi-octave 3-D simplex noise in torch: the structured noise of AnoDDPM-style partial noising.

Simplex noise (Perlin 2001; the formulation of Gustavson's "Simplex noise demystified"), written here from that
description. Space is cut into tetrahedra by skewing the lattice: a point p lies in the skewed cube with integer
corner c = floor(p + (p₁+p₂+p₃)/3); unskewing by (c₁+c₂+c₃)/6 gives the offset d₀ from that corner, and the order
of d₀'s coordinates picks the tetrahedron (corners c, c + e_a, c + e_a + e_b, c + 1 with a, b the largest and
second-largest coordinates of d₀). Each corner k carries a pseudo-random gradient g_k, one of the 12 midpoints of
a cube's edges, chosen by hashing the corner's coordinates through a seeded permutation of 0..255; the noise is
    n(p) = Σ_k max(0, r² − |d_k|²)⁴ · (g_k · d_k),   d_k = p − (corner k, unskewed),   r² = 1/2
(r² = 1/2 rather than the original 0.6 keeps every kernel inside the tetrahedra around its corner, so the field
is continuous). A field of B×C volumes sums `octaves` such layers: octave o has feature size scale/lacunarityᵒ
voxels, amplitude persistenceᵒ, its own permutation and a random offset in the 256-periodic lattice. Layers are
independent and zero-mean, so the sum has variance SIMPLEX_STD²·Σ persistence²ᵒ at every position (in
expectation over seeds: the random offsets make the field's law the same everywhere); dividing by its square
root gives unit variance, like the Gaussian noise it replaces. Every (sample, channel) draws its permutations and
offsets from a torch Generator seeded with the sample's seed, so sample b depends only on seeds[b].
"""
from __future__ import annotations

import math

import torch

from ..ops.fused_step import philox_keys

_SKEW = 1.0 / 3.0
_UNSKEW = 1.0 / 6.0
_RADIUS2 = 0.5
_PERIOD = 256
_GRADIENTS = ((1, 1, 0), (-1, 1, 0), (1, -1, 0), (-1, -1, 0), (1, 0, 1), (-1, 0, 1), (1, 0, -1), (-1, 0, -1),
              (0, 1, 1), (0, -1, 1), (0, 1, -1), (0, -1, -1))
# Standard deviation of one octave n(p) at a uniformly random position, with a uniformly random permutation:
# 1000 permutations × 2^18 positions uniform in the 256-periodic lattice give 0.0051055 (standard error 3e-7);
# tests/test_anomaly.py checks the resulting unit variance.
SIMPLEX_STD = 0.0051055
_CHUNK = 1 << 18  # voxels per evaluation: bounds the temporaries (~40 float64 values a voxel)


def simplex3(points: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """One octave of raw simplex noise n(p) at `points` (N, 3) float64, with the lattice hash `perm` (a permutation
    of 0..255, int64, on the points' device). Not normalised: standard deviation SIMPLEX_STD, |n| ≲ 0.013."""
    skew = points.sum(1, keepdim=True) * _SKEW
    cell = torch.floor(points + skew)
    d0 = points - cell + cell.sum(1, keepdim=True) * _UNSKEW
    x, y, z = d0.unbind(1)
    # rank of each coordinate of d0 (2: largest), ties broken x before y before z, so the ranks are 0, 1, 2
    rank = torch.stack([(x >= y).long() + (x >= z).long(), (y > x).long() + (y >= z).long(),
                        (z > x).long() + (z > y).long()], 1)
    cell = cell.long()
    grads = torch.tensor(_GRADIENTS, dtype=points.dtype, device=points.device)
    zero = torch.zeros_like(cell)
    total = torch.zeros(points.shape[0], dtype=points.dtype, device=points.device)
    for k, offset in enumerate((zero, (rank >= 2).long(), (rank >= 1).long(), zero + 1)):
        d = d0 - offset + k * _UNSKEW
        corner = (cell + offset) & (_PERIOD - 1)
        h = perm[(corner[:, 0] + perm[(corner[:, 1] + perm[corner[:, 2]]) & (_PERIOD - 1)]) & (_PERIOD - 1)]
        falloff = (_RADIUS2 - (d * d).sum(1)).clamp_min(0.0)
        total += falloff.square().square() * (grads[h % len(_GRADIENTS)] * d).sum(1)
    return total


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def simplex_noise(shape, seed=0, *, scale=None, octaves: int = 4, persistence: float = 0.8,
                  lacunarity: float = 2.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Multi-octave simplex noise of `shape` = (B, C, *spatial) (1 to 3 spatial axes), zero mean and unit variance
    per voxel (over seeds), spatially correlated over about `scale` voxels.

    seed: an int (sample b uses seed + b, as the engine does) or one seed per sample.
    scale: feature size of the first (coarsest) octave in voxels: a number or one per spatial axis (default a
      quarter of the smallest spatial size). octaves: the number of layers; persistence: each layer's amplitude
      relative to the previous; lacunarity: each layer's frequency relative to the previous (AnoDDPM: 6 octaves,
      persistence 0.8).
    """
    shape = tuple(int(s) for s in shape)
    spatial = shape[2:]
    if len(shape) < 3 or len(spatial) > 3 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, *spatial) with 1 to 3 spatial axes of positive size, got {shape}")
    if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
        raise ValueError(f"octaves must be a positive int, got {octaves!r}")
    persistence, lacunarity = _check_positive("persistence", persistence), _check_positive("lacunarity", lacunarity)
    if scale is None:
        scale = max(min(spatial) / 4.0, 1.0)
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * len(spatial)
    if len(scales) != len(spatial):
        raise ValueError(f"scale must be a number or one per spatial axis ({len(spatial)}), got {scale!r}")
    scales = [_check_positive("scale", s) for s in scales]
    keys = philox_keys(seed, shape[0])
    device = torch.device("cpu") if device is None else torch.device(device)

    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in spatial]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(spatial))
    grid = torch.nn.functional.pad(grid, (0, 3 - len(spatial)))  # fewer axes: a plane or line of 3-D noise
    scales = torch.tensor(scales + [1.0] * (3 - len(spatial)), dtype=torch.float64, device=device)
    norm = SIMPLEX_STD * math.sqrt(sum(persistence ** (2 * o) for o in range(octaves)))
    out = torch.empty((shape[0], shape[1], grid.shape[0]), dtype=dtype, device=device)
    for b, key in enumerate(keys.tolist()):
        generator = torch.Generator().manual_seed(key)
        for c in range(shape[1]):
            field = torch.zeros(grid.shape[0], dtype=torch.float64, device=device)
            for o in range(octaves):
                perm = torch.randperm(_PERIOD, generator=generator).to(device)
                offset = (torch.rand(3, generator=generator, dtype=torch.float64) * _PERIOD).to(device)
                step = lacunarity ** o / scales
                for start in range(0, grid.shape[0], _CHUNK):
                    points = grid[start:start + _CHUNK] * step + offset
                    field[start:start + _CHUNK] += persistence ** o * simplex3(points, perm)
            out[b, c] = (field / norm).to(dtype)
    return out.reshape(shape)


__all__ = ["SIMPLEX_STD", "simplex3", "simplex_noise"]
