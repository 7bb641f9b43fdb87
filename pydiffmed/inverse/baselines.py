"""Classical reconstructions, image-quality metrics and the reconstruction tasks: what a posterior sampler must beat.

    op, sigma_y = task_operator("mri_4x", (32, 32, 32))
    y = measure(op, x, sigma_y, seed=0)
    x_zf = zero_filled(op, y)                       # Aᴴ y (CT: op.fbp(y), filtered back-projection)
    x_tv = tv_reconstruction(op, y, "mri_4x")       # isotropic 3-D total variation with the task's tuned lam
    psnr(x_tv, x, data_range=2.0), ssim(x_tv, x, data_range=2.0)   # (B,) each

* `zero_filled(op, y)`: Aᴴ y, the zero-filled reconstruction. For Cartesian MRI, Masking and any operator with
  A Aᴴ a projection it is the minimum-norm solution A⁺ y; Downsampling's is scaled by the block size (nearest-
  neighbour upsampling, again A⁺ y). A complex image (``complex_domain=True`` MRI) is returned as its magnitude, as
  scanners show it; a real-domain operator's Aᴴ y is the real part of the complex zero-filled image, the right
  estimate of a real signed volume (such as the [-1, 1] phantoms, whose magnitude would fold the background over).
* `tv_reconstruction`: argmin_x ½‖A' x - y'‖² + lam·TV(x), optionally subject to a box lo ≤ x ≤ hi, with
  A' = A/‖A‖, y' = y/‖A‖: the data term of the operator scaled to norm 1, so one lam means the same trade-off for
  MRI (‖A‖ = 1) and CT (‖A‖² ≈ 900 for 30 views of 32²). TV(x) = Σ_voxels ‖∇x‖₂, forward differences along D, H,
  W (Neumann boundary: zero difference at the far edge). Solved by Chambolle–Pock's primal-dual algorithm (PDHG,
  θ = 1) with K = [A'; ∇], ‖K‖² ≤ 1 + 12, steps τ = r/√13, σ = 1/(r√13) (r = `step_ratio`; r = 10 converges
  several times faster than r = 1 on these problems): every iteration one forward, one adjoint, one gradient and
  one divergence, a fixed number of iterations and no host sync, so it runs wherever the operator runs. `lam` may
  name a task of TV_DEFAULTS, whose lam and iteration count were chosen by a grid search (documented there).
* `psnr(x, ref, data_range)`: 10·log10(data_range² / MSE) per volume (inf where x = ref).
* `ssim(x, ref, data_range)`: the structural similarity of Wang et al. (2004) in 3-D with a Gaussian window
  (σ = 1.5 voxels, truncated at 3.5σ: an 11³ support; K1 = 0.01, K2 = 0.03; local statistics with population
  (co)variances; the mean of the SSIM map over the voxels at least 5 from every edge, the filter's edges mirrored):
  the value of skimage.metrics.structural_similarity(x, ref, data_range=…, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False) for each volume.
* `TASKS`, `task_operator(name, shape)`, `measure(op, x, sigma_y, seed)`: the reconstruction problems of
  tests/test_inverse_quality.py and benchmarks/bench_inverse.py; `coil_maps` (synthetic sensitivities) and
  `SliceMatrix` (a per-slice operator tabulated as its matrix, e.g. the 32² CT operator) serve them.

Volumes are (B, C, D, H, W) tensors; metrics return a float64 tensor (B,), channels averaged (SSIM) or pooled
(PSNR's mean squared error). A single (D, H, W) or (C, D, H, W) volume gives a 0-d tensor.
"""
from __future__ import annotations

import math
import numbers

import torch

from .anomaly import gaussian_smooth
from .masks import poisson_disc_mask
from .operators import CartesianMRI, Downsampling, LinearOperator, ParallelBeamCT, as_operator, sparse_view_angles

__all__ = ["TASKS", "TV_DEFAULTS", "SliceMatrix", "coil_maps", "divergence", "gradient", "measure", "psnr", "ssim",
           "task_operator", "total_variation", "tv_reconstruction", "zero_filled"]

# The reconstruction problems (y = A x + sigma_y·n, n ~ N(0, I), complex circular for k-space) on volumes in
# [-1, 1]. MRI: 3-D Cartesian with an orthonormal FFT; a variable-density Poisson-disc mask on the ky×kz plane
# (poisson_disc_mask, seed 0, 8 % fully sampled centre), the readout axis fully sampled; "coils": that many
# synthetic coil maps (coil_maps). CT: 2-D parallel-beam, `views` equispaced angles in [0, π), every axial slice.
TASKS = {
    "mri_4x": {"kind": "mri", "acceleration": 4, "sigma_y": 0.01},
    "mri_8x": {"kind": "mri", "acceleration": 8, "sigma_y": 0.01},
    "mri_8x_4coils": {"kind": "mri", "acceleration": 8, "coils": 4, "sigma_y": 0.01},
    "ct_30": {"kind": "ct", "views": 30, "sigma_y": 0.05},
}

# TV parameters per task (bounds: the phantoms' range). lam was chosen by a grid search on held-out phantoms
# (family 2, indices 0-3, 32³; the quality tests and bench_inverse.py use family 1, the demo model trained on
# family 0), measurement noise seed 0, 300 iterations, step_ratio 10; mean PSNR dB / SSIM per lam (2026-12-06):
#   mri_4x:        3e-4 41.99/0.9941  1e-3 42.37/0.9944  2e-3 42.20/0.9942  3e-3 41.86/0.9937  5e-3 41.10/0.9925
#                  1e-2 39.45/0.9887  2e-2 37.38/0.9806  5e-2 34.37/0.9542      (zero-filled 29.99/0.8795)
#   mri_8x:        1e-3 29.61/0.8493  2e-3 33.49/0.9266  3e-3 35.02/0.9502  5e-3 35.31/0.9574  1e-2 34.34/0.9496
#                  2e-2 32.99/0.9348  5e-2 30.89/0.9029                          (zero-filled 25.32/0.6934)
#   mri_8x_4coils: 3e-4 41.09/0.9924  1e-3 41.70/0.9933  2e-3 41.11/0.9922  5e-3 39.19/0.9875  1e-2 37.21/0.9796
#                                                                                (zero-filled 20.49/0.6596)
#   ct_30:         0 39.87/0.9884  3e-5 42.17/0.9941  1e-4 43.38/0.9957  2e-4 42.82/0.9951  3e-4 42.06/0.9941
#                  1e-3 38.87/0.9879  1e-2 33.05/0.9481                          (FBP 26.79/0.9653)
# Convergence at the chosen lam, 300 → 1000 iterations: mri_4x 42.368 → 42.368, mri_8x 35.309 → 35.310,
# mri_8x_4coils 41.698 → 41.698, ct_30 43.38 → 43.93 (hence 1000 for CT); step_ratio 1 needs > 1000 iterations
# (ct_30 at lam 3e-4: 36.81 after 300, 40.68 after 1000; step_ratio 10: 42.06 after 300).
TV_DEFAULTS: dict[str, dict] = {
    "mri_4x": {"lam": 1e-3, "iters": 300, "step_ratio": 10.0, "bounds": (-1.0, 1.0)},
    "mri_8x": {"lam": 5e-3, "iters": 300, "step_ratio": 10.0, "bounds": (-1.0, 1.0)},
    "mri_8x_4coils": {"lam": 1e-3, "iters": 300, "step_ratio": 10.0, "bounds": (-1.0, 1.0)},
    "ct_30": {"lam": 1e-4, "iters": 1000, "step_ratio": 10.0, "bounds": (-1.0, 1.0)},
}


# --------------------------------------------------------------------------------------------------- metrics
def _pair(x: torch.Tensor, ref: torch.Tensor):
    """x, ref as float64 (B, C, D, H, W), and whether the input was one volume."""
    if not isinstance(x, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise TypeError("x and ref must be torch.Tensors")
    if x.shape != ref.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} and ref {tuple(ref.shape)}: they must match")
    if x.is_complex() or ref.is_complex():
        raise ValueError("x and ref must be real (take the magnitude of complex images first)")
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"expected (B, C, D, H, W), (C, D, H, W) or (D, H, W) volumes, got shape {tuple(x.shape)}")
    single = x.ndim < 5
    view = (1,) * (5 - x.ndim) + tuple(x.shape)
    return (x.detach().to(torch.float64).reshape(view), ref.detach().to(x.device, torch.float64).reshape(view),
            single)


def _data_range(data_range) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, numbers.Real) or not math.isfinite(data_range) \
            or data_range <= 0:
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return float(data_range)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range) -> torch.Tensor:
    """Peak signal-to-noise ratio 10·log10(data_range² / mean((x - ref)²)) per volume, in dB (float64; +inf where
    x equals ref). data_range: the width of the intensity range (2 for volumes in [-1, 1])."""
    r = _data_range(data_range)
    a, b, single = _pair(x, ref)
    mse = (a - b).pow(2).reshape(a.shape[0], -1).mean(1)
    out = 10.0 * torch.log10(r * r / mse)
    return out[0] if single else out


SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range, *, sigma: float = SSIM_SIGMA,
         truncate: float = SSIM_TRUNCATE) -> torch.Tensor:
    """Mean structural similarity per volume (module docstring), float64 in [-1, 1]; 1 where x equals ref.
    Every spatial axis must be longer than the window's radius int(truncate·sigma + 0.5) doubled."""
    r = _data_range(data_range)
    a, b, single = _pair(x, ref)
    radius = int(truncate * sigma + 0.5)
    if min(a.shape[2:]) <= 2 * radius:
        raise ValueError(f"volumes of spatial shape {tuple(a.shape[2:])} are too small for a Gaussian window of "
                         f"radius {radius}: every axis must exceed {2 * radius}")
    bsz, ch = a.shape[:2]
    a, b = a.reshape(bsz * ch, 1, *a.shape[2:]), b.reshape(bsz * ch, 1, *b.shape[2:])
    stats = gaussian_smooth(torch.cat([a, b, a * a, b * b, a * b], 1), sigma, truncate)
    ua, ub, uaa, ubb, uab = stats.unbind(1)
    va, vb, vab = uaa - ua * ua, ubb - ub * ub, uab - ua * ub
    c1, c2 = (SSIM_K1 * r) ** 2, (SSIM_K2 * r) ** 2
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    s = s[:, radius:-radius, radius:-radius, radius:-radius]
    out = s.reshape(bsz, ch, -1).mean(-1).mean(1)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------------- zero-filled
def zero_filled(op, y: torch.Tensor, magnitude: bool | None = None) -> torch.Tensor:
    """The zero-filled reconstruction Aᴴ y (module docstring). magnitude: None (default) returns |Aᴴ y| for a
    complex image and Aᴴ y for a real one; True / False force or skip the magnitude."""
    op = as_operator(op)
    x = op.adjoint(y)
    if isinstance(op, Downsampling):
        x = x * op.k
    if magnitude or (magnitude is None and x.is_complex()):
        x = x.abs()
    return x


# --------------------------------------------------------------------------------------------------- TV
def gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences of (B, C, D, H, W) along D, H, W, zero at the far edge: (B, C, 3, D, H, W)."""
    g = x.new_zeros(*x.shape[:2], 3, *x.shape[2:])
    g[:, :, 0, :-1] = x[:, :, 1:] - x[:, :, :-1]
    g[:, :, 1, :, :-1] = x[:, :, :, 1:] - x[:, :, :, :-1]
    g[:, :, 2, :, :, :-1] = x[..., 1:] - x[..., :-1]
    return g


def divergence(g: torch.Tensor) -> torch.Tensor:
    """The negative adjoint of `gradient`: div = -∇ᴴ, (B, C, 3, D, H, W) → (B, C, D, H, W)."""
    out = g.new_zeros(*g.shape[:2], *g.shape[3:])
    for axis in range(3):
        p = g[:, :, axis]
        dim = 2 + axis
        n = p.shape[dim]
        inner = p.narrow(dim, 0, n - 1)  # the last difference is zero by construction
        out.narrow(dim, 0, n - 1).add_(inner)
        out.narrow(dim, 1, n - 1).sub_(inner)
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Isotropic TV Σ_voxels ‖∇x‖₂ per sample: (B,)."""
    g = gradient(x)
    return g.pow(2).sum(2).sqrt().reshape(x.shape[0], -1).sum(1)


def _norm2(op, shape, device, dtype, iters=30, seed=0) -> float:
    from .samplers import _operator_norm2

    return _operator_norm2(op, shape, device, dtype, iters, seed)


def tv_reconstruction(op, y: torch.Tensor, lam=None, iters: int | None = None, *, bounds=None,
                      x0: torch.Tensor | None = None, operator_norm2: float | None = None,
                      step_ratio: float | None = None, shape=None) -> torch.Tensor:
    """Isotropic 3-D total-variation reconstruction (module docstring): argmin_x ½‖A x - y‖²/‖A‖² + lam·TV(x)
    subject to bounds[0] ≤ x ≤ bounds[1] (bounds=None: unconstrained), by `iters` Chambolle–Pock iterations
    started at x0 (default zeros). Returns a real (B, C, D, H, W) tensor of the image domain.

    lam: a number ≥ 0, or the name of a task in TV_DEFAULTS, which then also gives iters, bounds and step_ratio
    unless they are given. iters: default 200 (a number lam). step_ratio: r in τ = r/√13, σ = 1/(r√13) (default 1).
    operator_norm2: ‖A‖² (default: 30 power iterations on the image shape). shape: the image shape (default: the
    shape of Aᴴ y). y is checked for NaN/Inf once; the operator's own per-call check is off during the loop."""
    op = as_operator(op)
    if isinstance(lam, str):
        if lam not in TV_DEFAULTS:
            raise ValueError(f"unknown TV task {lam!r}; TV_DEFAULTS has {sorted(TV_DEFAULTS)}")
        task = TV_DEFAULTS[lam]
        lam = task["lam"]
        iters = task["iters"] if iters is None else iters
        bounds = task.get("bounds") if bounds is None else bounds
        step_ratio = task.get("step_ratio") if step_ratio is None else step_ratio
    if lam is None or isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) \
            or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0 or a TV_DEFAULTS task name, got {lam!r}")
    iters = 200 if iters is None else iters
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if bounds is not None:
        lo, hi = (float(v) for v in bounds)
        if not lo < hi:
            raise ValueError(f"bounds must be (low, high) with low < high, got {bounds!r}")
    check = getattr(op, "check_finite", None)
    if check is not None:  # y is checked once here; the loop must not sync on every call
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or Inf")
        op.check_finite = False
    try:
        back = op.adjoint(y)
        if back.is_complex():
            raise ValueError("tv_reconstruction needs a real image domain (e.g. CartesianMRI(complex_domain=False))")
        shape = tuple(back.shape) if shape is None else tuple(shape)
        if len(shape) != 5:
            raise ValueError(f"the image domain must be (B, C, D, H, W), got shape {shape}")
        norm2 = float(operator_norm2) if operator_norm2 is not None else _norm2(op, shape, back.device, back.dtype)
        if not norm2 > 0:
            raise ValueError(f"the operator norm² must be > 0, got {norm2}")
        scale = 1.0 / math.sqrt(norm2)
        ys = y * scale
        ratio = 1.0 if step_ratio is None else float(step_ratio)
        if not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"step_ratio must be a positive number, got {step_ratio!r}")
        # τ·σ·‖K‖² = 1 with ‖K‖² ≤ ‖A'‖² + ‖∇‖² ≤ 1 + 12; τ/σ = ratio² (a larger primal step for ill-conditioned A)
        tau, sig = ratio / math.sqrt(13.0), 1.0 / (ratio * math.sqrt(13.0))
        x = back.new_zeros(shape) if x0 is None else x0.to(back.dtype).clone()
        xbar = x.clone()
        p = torch.zeros_like(ys)
        q = x.new_zeros(*shape[:2], 3, *shape[2:])
        for _ in range(iters):
            p = (p + sig * (op.forward(xbar) * scale - ys)) / (1.0 + sig)
            q = q + sig * gradient(xbar)
            if lam > 0:
                q = q / (q.pow(2).sum(2, keepdim=True).sqrt() / lam).clamp_min(1.0)
            else:
                q = torch.zeros_like(q)
            x_new = x - tau * (op.adjoint(p) * scale - divergence(q))
            if bounds is not None:
                x_new = x_new.clamp(lo, hi)
            xbar = 2.0 * x_new - x
            x = x_new
        return x
    finally:
        if check is not None:
            op.check_finite = check


# --------------------------------------------------------------------------------------------------- tasks
def coil_maps(n_coils: int, shape, device="cpu") -> torch.Tensor:
    """Synthetic smooth complex coil sensitivities (1, n_coils, D, H, W): coils on a ring around the volume in the
    H×W plane, each a Gaussian fall-off (width 0.6 of the half-size) times a smooth phase ramp, normalised so that
    Σ_c |S_c|² = 1 at every voxel (then the coil-combined Aᴴ y is a SENSE combination)."""
    d, h, w = shape
    axes = [(torch.arange(s, dtype=torch.float64) + 0.5) / s * 2 - 1 for s in (d, h, w)]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    maps = []
    for c in range(n_coils):
        phi = 2 * math.pi * c / n_coils
        cy, cx = 1.2 * math.sin(phi), 1.2 * math.cos(phi)
        mag = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2 + 0.5 * zz ** 2) / (2 * 0.6 ** 2))
        phase = math.pi / 3 * (math.cos(phi) * yy - math.sin(phi) * xx + 0.3 * zz)
        maps.append(torch.polar(mag, phase))
    s = torch.stack(maps)[None]
    s = s / s.abs().pow(2).sum(1, keepdim=True).sqrt()
    return s.to(device=device, dtype=torch.complex64)


def task_operator(name: str, shape, device="cpu"):
    """(operator, sigma_y) of task `name` of TASKS for volumes of spatial `shape` (D, H, W); seeded, the same on
    every machine."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; TASKS has {sorted(TASKS)}")
    t = TASKS[name]
    d, h, w = shape
    if t["kind"] == "mri":
        mask, _ = poisson_disc_mask((d, h), t["acceleration"], seed=0)
        coils = coil_maps(t["coils"], shape, device) if t.get("coils") else None
        return CartesianMRI(mask.to(device), coils=coils), t["sigma_y"]
    if h != w:
        raise ValueError(f"task {name!r}: CT needs square slices, got {h}×{w}")
    return ParallelBeamCT(sparse_view_angles(t["views"]), h), t["sigma_y"]


def measure(op, x: torch.Tensor, sigma_y: float, seed: int = 0) -> torch.Tensor:
    """y = A x + sigma_y·n with seeded n ~ N(0, I) (complex circular for a complex range: E|n|² = 1)."""
    ax = op.forward(x)
    gen = torch.Generator().manual_seed(int(seed))
    n = torch.randn(ax.shape, generator=gen, dtype=ax.dtype)
    return ax + sigma_y * n.to(ax.device)


class SliceMatrix(LinearOperator):
    """A per-slice operator given by an explicit matrix: B×1×D×H×W → B×1×D×(range tail), A x = M · x_slice for
    every axial slice (M: (m, H·W), real). `SliceMatrix.from_operator(op, (H, W))` tabulates a per-slice operator
    such as ParallelBeamCT by applying it to the H·W unit images: the same linear map up to rounding, and at small
    slices (32²) far cheaper per call than the gather-based original (two matrix products)."""

    def __init__(self, matrix: torch.Tensor, image_size, range_tail, check_finite: bool = True):
        self.matrix = torch.as_tensor(matrix)
        self.image_size, self.range_tail = tuple(image_size), tuple(range_tail)
        if self.matrix.ndim != 2 or self.matrix.shape[1] != math.prod(self.image_size) \
                or self.matrix.shape[0] != math.prod(self.range_tail):
            raise ValueError(f"matrix must be ({math.prod(self.range_tail)}, {math.prod(self.image_size)}), got "
                             f"{tuple(self.matrix.shape)}")
        self.check_finite = check_finite
        self._cache: dict = {}

    @classmethod
    def from_operator(cls, op, image_size, dtype=torch.float64) -> SliceMatrix:
        h, w = image_size
        eye = torch.eye(h * w, dtype=dtype).reshape(1, 1, h * w, h, w)
        check = getattr(op, "check_finite", None)
        if check is not None:
            op.check_finite = False
        try:
            cols = op.forward(eye)  # (1, 1, H·W, *tail): column j of M is A applied to unit image j
        finally:
            if check is not None:
                op.check_finite = check
        tail = tuple(cols.shape[3:])
        return cls(cols.reshape(h * w, -1).T.contiguous(), (h, w), tail)

    def _m(self, like):
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.matrix.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def forward(self, x):
        self._check_domain(x)
        b, c, d = x.shape[:3]
        if c != 1 or tuple(x.shape[3:]) != self.image_size:
            raise ValueError(f"x must be B×1×D×{self.image_size[0]}×{self.image_size[1]}, got {tuple(x.shape)}")
        return (x.reshape(b * d, -1) @ self._m(x).T).reshape(b, 1, d, *self.range_tail)

    def adjoint(self, y):
        self._check_domain(y, "y")
        b, c, d = y.shape[:3]
        if c != 1 or tuple(y.shape[3:]) != self.range_tail:
            raise ValueError(f"y must be B×1×D×{'×'.join(map(str, self.range_tail))}, got {tuple(y.shape)}")
        return (y.reshape(b * d, -1) @ self._m(y)).reshape(b, 1, d, *self.image_size)

    def range_shape(self, shape):
        return (shape[0], 1, shape[2], *self.range_tail)

    def domain_shape(self, shape):
        return (shape[0], 1, shape[2], *self.image_size)
