"""Linear measurement operators A (with exact adjoints Aᴴ) for inverse problems on B×C×D×H×W volumes.

Protocol: an operator is any object with ``forward(x)`` (A x) and ``adjoint(y)`` (Aᴴ y), batched over the first
axis; `as_operator` wraps such an object (or a pair of callables) into a `LinearOperator`, which adds ``normal``
(AᴴA) and ``gram_solve`` ((AᴴA + ρI)⁻¹ b, by batched conjugate gradient unless the operator has a closed form).

Dtypes: the image domain is real (fp32/fp64) unless an operator says ``complex_domain``; MRI k-space is complex.
Inner products are ⟨u, v⟩ = Σ conj(u)·v; for a real domain with a complex range the adjoint is the real-linear
one, Re(Aᴴ y), so that Re⟨A x, y⟩ = ⟨x, Aᴴ y⟩. Inputs are checked for shape and dtype (free), and for NaN/Inf
when ``check_finite`` is true (one host sync; skipped during CUDA-graph capture — set it False in a sampler loop).
Masks, coil maps and angle tables are copied to the input's device and dtype on first use and cached, so call an
operator once before capturing it in a CUDA graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CartesianMRI", "Downsampling", "LinearOperator", "Masking", "ParallelBeamCT", "adjoint_error",
           "as_operator", "conjugate_gradient", "fft_c", "ifft_c", "limited_angle_angles", "sparse_view_angles"]


def _skip_sync() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _finite(t: torch.Tensor, name: str) -> None:
    if not _skip_sync() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Re⟨a, b⟩, shape (B,)."""
    p = a.conj() * b if a.is_complex() else a * b
    p = p.real if p.is_complex() else p
    return p.reshape(p.shape[0], -1).sum(1)


def _per_sample(v, like: torch.Tensor):
    """A scalar or a (B,) tensor, shaped to broadcast over `like`'s non-batch axes."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.to(like.real.dtype).reshape(-1, *[1] * (like.ndim - 1))
    return v


def _check_rho(rho, closed_form: bool = False) -> None:
    if not isinstance(rho, torch.Tensor) and (not math.isfinite(rho) or rho < 0 or (closed_form and rho == 0)):
        raise ValueError(f"rho must be finite and {'> 0 (AᴴA is singular)' if closed_form else '>= 0'}, got {rho}")


def conjugate_gradient(normal, b: torch.Tensor, rho=0.0, iters: int = 50, tol: float = 1e-6,
                       x0: torch.Tensor | None = None) -> torch.Tensor:
    """Solve (N + ρI) x = b per sample, N Hermitian positive semi-definite (given as a function). A fixed number of
    iterations and no host sync: a sample whose residual fell below ``tol·‖b‖`` stops moving (masked update).
    ρ: a number or a (B,) tensor."""
    rho = _per_sample(rho, b)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - (normal(x) + rho * x) if x0 is not None else b.clone()
    p = r.clone()
    rs = _inner(r, r)
    stop = (tol * tol) * _inner(b, b)
    tiny = torch.finfo(rs.dtype).tiny
    view = (-1,) + (1,) * (b.ndim - 1)
    for _ in range(iters):
        active = rs > stop
        ap = normal(p) + rho * p
        pap = _inner(p, ap)
        alpha = torch.where(active & (pap > 0), rs / pap.clamp_min(tiny), torch.zeros_like(rs))
        x = x + alpha.view(view) * p
        r = r - alpha.view(view) * ap
        rs_new = _inner(r, r)
        beta = torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = r + beta.view(view) * p
        rs = torch.where(active, rs_new, rs)
    return x


class LinearOperator:
    """Base class: subclasses implement ``forward``, ``adjoint``, ``range_shape`` and ``domain_shape`` and may
    override ``normal`` and ``gram_solve`` with something faster."""

    complex_domain = False  # the domain accepts complex tensors (else real only)
    complex_range = False  # A x is complex whatever x is
    check_finite = True
    cg_iters = 50
    cg_tol = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """AᴴA x."""
        return self.adjoint(self.forward(x))

    def gram_solve(self, b: torch.Tensor, rho, iters: int | None = None, tol: float | None = None,
                   x0: torch.Tensor | None = None) -> torch.Tensor:
        """Solve (AᴴA + ρI) x = b per sample (ρ: number or (B,) tensor); conjugate gradient by default (b is
        checked for NaN once, not on every iteration)."""
        _check_rho(rho)
        self._check_domain(b, "b")
        check, self.check_finite = self.check_finite, False
        try:
            return conjugate_gradient(self.normal, b, rho, self.cg_iters if iters is None else iters,
                                      self.cg_tol if tol is None else tol, x0)
        finally:
            self.check_finite = check

    def range_shape(self, shape) -> tuple[int, ...]:
        """Shape of A x for x of `shape`."""
        raise NotImplementedError

    def domain_shape(self, shape) -> tuple[int, ...]:
        """Shape of Aᴴ y for y of `shape`."""
        raise NotImplementedError

    def range_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of A x for x of `dtype`."""
        return dtype.to_complex() if self.complex_range and not dtype.is_complex else dtype

    def _check_domain(self, x, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex() and not self.complex_domain:
            raise ValueError(f"{name} is complex but {type(self).__name__} has a real image domain")
        if not (x.is_floating_point() or x.is_complex()):
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if self.check_finite:
            _finite(x, name)


class _Wrapped(LinearOperator):
    complex_domain = True  # unknown: let the user's operator decide what it accepts

    def __init__(self, forward, adjoint, obj=None):
        self._forward, self._adjoint, self._obj = forward, adjoint, obj
        self._probe = (torch.float32, "cpu")
        for name in ("normal", "gram_solve", "range_shape", "domain_shape"):
            if obj is not None and callable(getattr(obj, name, None)):
                setattr(self, name, getattr(obj, name))

    def forward(self, x):
        return self._forward(x)

    def adjoint(self, y):
        return self._adjoint(y)

    def range_shape(self, shape):  # one forward on zeros of the probe dtype/device given to as_operator
        return tuple(self._forward(torch.zeros(shape, dtype=self._probe[0], device=self._probe[1])).shape)


def adjoint_error(op, shape, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> float:
    """|⟨A x, y⟩ - ⟨x, Aᴴ y⟩| / max(|⟨A x, y⟩|, |⟨x, Aᴴ y⟩|) for a seeded random x of `shape`/`dtype` and
    y = A x + r, r random with ‖r‖ = ‖A x‖ (so ⟨A x, y⟩ is never small by chance and a scaled adjoint shows in
    full). Inner products are accumulated in fp64; for a real x the real part of ⟨A x, y⟩ is compared."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tuple(shape), dtype=dtype, device=device, generator=gen)
    ax = op.forward(x)
    r = torch.randn(ax.shape, dtype=ax.dtype, device=device, generator=gen)
    y = ax + r * (ax.norm() / r.norm().clamp_min(1e-30))
    aty = op.adjoint(y)
    if tuple(aty.shape) != tuple(x.shape):
        raise ValueError(f"adjoint returned shape {tuple(aty.shape)}, expected the domain shape {tuple(x.shape)}")
    wide = torch.complex128 if ax.is_complex() or x.is_complex() else torch.float64
    lhs = (ax.to(wide).conj() * y.to(wide)).sum()
    rhs = (x.to(wide).conj() * aty.to(wide)).sum()
    if not x.is_complex():
        lhs, rhs = lhs.real, rhs.real
    scale = max(abs(complex(lhs)), abs(complex(rhs)), 1e-300)
    return abs(complex(lhs - rhs)) / scale


def as_operator(obj, check_adjoint: bool = False, shape=None, dtype: torch.dtype = torch.float32, device="cpu",
                tol: float = 1e-4, seed: int = 0) -> LinearOperator:
    """A `LinearOperator` from any object with ``forward(x)`` and ``adjoint(y)`` (or a pair ``(forward, adjoint)``
    of callables). With ``check_adjoint=True`` the adjoint identity is tested once on a seeded random probe of
    `shape`/`dtype` and a ValueError raised if its relative error exceeds `tol`."""
    if isinstance(obj, LinearOperator):
        op = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(callable(f) for f in obj):
        op = _Wrapped(obj[0], obj[1])
    elif callable(getattr(obj, "forward", None)) and callable(getattr(obj, "adjoint", None)):
        op = _Wrapped(obj.forward, obj.adjoint, obj)
    else:
        raise TypeError(f"{type(obj).__name__} is not an operator: it needs forward(x) and adjoint(y) methods")
    if isinstance(op, _Wrapped):
        op._probe = (dtype, device)
    if check_adjoint:
        if shape is None:
            raise ValueError("check_adjoint=True needs the domain `shape` of a probe")
        err = adjoint_error(op, shape, dtype, device, seed)
        if not err <= tol:
            raise ValueError(f"adjoint check failed: relative error {err:.3g} > {tol} (is adjoint the exact "
                             "transpose/conjugate transpose of forward?)")
    return op


def _buffer(cache: dict, t: torch.Tensor, device, dtype) -> torch.Tensor:
    key = (id(t), torch.device(device), dtype)
    if key not in cache:
        cache[key] = t.to(device=device, dtype=dtype)
    return cache[key]


def _mask_tensor(mask, name: str = "mask") -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.is_complex():
        raise ValueError(f"{name} must be real (bool or 0/1), got {mask.dtype}")
    if mask.dtype != torch.bool:
        _finite(mask, name)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1")
    return mask.bool().contiguous()


# --------------------------------------------------------------------------------------------------- MRI
def fft_c(x: torch.Tensor, dims) -> torch.Tensor:
    """Centred orthonormal FFT: fftshift(fftn(ifftshift(x))) over `dims` (DC at index n // 2)."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho"), dim=dims)


def ifft_c(k: torch.Tensor, dims) -> torch.Tensor:
    """Inverse (= adjoint) of `fft_c`."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(k, dim=dims), dim=dims, norm="ortho"), dim=dims)


class CartesianMRI(LinearOperator):
    """A x = M · F(S_c · x): Cartesian MRI of B×1×D×H×W volumes into B×C×D×H×W complex k-space (zeros where not
    sampled). F is `fft_c` over (D, H, W) (``mode="3d"``) or over (H, W) per slice (``mode="slice"``).
    mask: D×H×W, or D×H broadcast along the readout axis W (the ky×kz plane in 3-D; slice-wise phase-encode
    lines in ``"slice"`` mode). coils: sensitivity maps (B or 1)×C×D×H×W (complex); None for one coil, S = 1.
    The domain is real unless ``complex_domain=True`` (then x may be complex and Aᴴ y is complex)."""

    complex_range = True

    def __init__(self, mask, coils: torch.Tensor | None = None, mode: str = "3d", complex_domain: bool = False,
                 check_finite: bool = True):
        if mode not in ("3d", "slice"):
            raise ValueError(f"mode must be '3d' or 'slice', got {mode!r}")
        self.mask = _mask_tensor(mask)
        if self.mask.ndim not in (2, 3):
            raise ValueError(f"mask must be D×H×W or D×H (broadcast along W), got shape {tuple(self.mask.shape)}")
        self.mode, self.complex_domain, self.check_finite = mode, complex_domain, check_finite
        self.dims = (-3, -2, -1) if mode == "3d" else (-2, -1)
        self.coils = None
        if coils is not None:
            coils = torch.as_tensor(coils)
            if coils.ndim != 5:
                raise ValueError(f"coils must be (B or 1)×C×D×H×W, got shape {tuple(coils.shape)}")
            if tuple(coils.shape[2:2 + self.mask.ndim]) != tuple(self.mask.shape):
                raise ValueError(f"mask shape {tuple(self.mask.shape)} does not match the coil maps' spatial shape "
                                 f"{tuple(coils.shape[2:])}")
            if not (coils.is_complex() or coils.is_floating_point()):
                raise ValueError(f"coils must be complex, got {coils.dtype}")
            _finite(coils, "coils")
            self.coils = coils if coils.is_complex() else coils.to(coils.dtype.to_complex())
        self._cache: dict = {}

    @property
    def n_coils(self) -> int:
        return 1 if self.coils is None else self.coils.shape[1]

    def _check(self, t: torch.Tensor, name: str, channels: int) -> None:
        if t.ndim != 5 or t.shape[1] != channels:
            raise ValueError(f"{name} must be B×{channels}×D×H×W, got shape {tuple(t.shape)}")
        if tuple(t.shape[2:2 + self.mask.ndim]) != tuple(self.mask.shape):
            raise ValueError(f"{name} spatial shape {tuple(t.shape[2:])} does not match mask shape "
                             f"{tuple(self.mask.shape)}")
        if self.coils is not None:
            if tuple(t.shape[2:]) != tuple(self.coils.shape[2:]):
                raise ValueError(f"{name} spatial shape {tuple(t.shape[2:])} does not match the coil maps "
                                 f"{tuple(self.coils.shape[2:])}")
            if self.coils.shape[0] not in (1, t.shape[0]):
                raise ValueError(f"{name} batch {t.shape[0]} does not match the coil maps' batch {self.coils.shape[0]}")

    def _m(self, t: torch.Tensor) -> torch.Tensor:
        m = _buffer(self._cache, self.mask, t.device, t.real.dtype)
        return m if m.ndim == 3 else m[..., None]

    def _s(self, t: torch.Tensor) -> torch.Tensor:
        return _buffer(self._cache, self.coils, t.device, t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_domain(x)
        self._check(x, "x", 1)
        xc = x if x.is_complex() else x.to(x.dtype.to_complex())
        if self.coils is not None:
            xc = xc * self._s(xc)
        return fft_c(xc, self.dims) * self._m(xc)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or not y.is_complex():
            raise ValueError(f"k-space y must be a complex tensor, got {getattr(y, 'dtype', type(y).__name__)}")
        self._check(y, "y", self.n_coils)
        if self.check_finite:
            _finite(y, "y")
        img = ifft_c(y * self._m(y), self.dims)
        if self.coils is not None:
            img = (img * self._s(img).conj()).sum(1, keepdim=True)
        return img if self.complex_domain else img.real.contiguous()

    def gram_solve(self, b, rho, iters=None, tol=None, x0=None):
        """Closed form for one coil: AᴴA = Fᴴ M F is diagonal in k-space (for a real domain Re(·) symmetrises the
        mask under k → -k); multi-coil falls back to conjugate gradient."""
        if self.coils is not None:
            return super().gram_solve(b, rho, iters, tol, x0)
        _check_rho(rho, closed_form=True)
        self._check_domain(b, "b")
        self._check(b, "b", 1)
        m = self._m(b).expand(b.shape[2:])
        if not self.complex_domain:  # reflection k -> -k in centred indexing: flip, then roll by 1 for even n
            flipped = m.flip([d % 3 for d in self.dims])
            for d in self.dims:
                if m.shape[d] % 2 == 0:
                    flipped = flipped.roll(1, dims=d)
            m = 0.5 * (m + flipped)
        bc = b if b.is_complex() else b.to(b.dtype.to_complex())
        x = ifft_c(fft_c(bc, self.dims) / (m + _per_sample(rho, bc)), self.dims)
        return x if self.complex_domain else x.real.contiguous()

    def range_shape(self, shape):
        return (shape[0], self.n_coils, *shape[2:])

    def domain_shape(self, shape):
        return (shape[0], 1, *shape[2:])


# --------------------------------------------------------------------------------------------------- masking, SR
class Masking(LinearOperator):
    """Inpainting: A x = x[..., mask] (the trailing ``mask.ndim`` axes flattened to the K kept voxels); Aᴴ scatters
    back into zeros. Real or complex."""

    complex_domain = True

    def __init__(self, mask, check_finite: bool = True):
        self.mask = _mask_tensor(mask)
        if self.mask.ndim == 0:
            raise ValueError("mask must have at least one axis")
        self.check_finite = check_finite
        flat = self.mask.reshape(-1)
        self.index = torch.nonzero(flat).squeeze(1)
        self.count = int(self.index.numel())
        pos = torch.full((flat.numel(),), self.count, dtype=torch.long)  # unmasked voxels read a zero slot
        pos[self.index] = torch.arange(self.count)
        self.position = pos
        self._cache: dict = {}

    def forward(self, x):
        self._check_domain(x)
        self._check(x, "x")
        lead = x.shape[:x.ndim - self.mask.ndim]
        return x.reshape(*lead, -1).index_select(-1, _buffer(self._cache, self.index, x.device, torch.long))

    def adjoint(self, y):
        self._check_domain(y, "y")
        if y.ndim < 1 or y.shape[-1] != self.count:
            raise ValueError(f"y must end in the {self.count} kept voxels, got shape {tuple(y.shape)}")
        padded = torch.cat([y, y.new_zeros(*y.shape[:-1], 1)], -1)  # gather, not scatter: deterministic on GPU
        out = padded.index_select(-1, _buffer(self._cache, self.position, y.device, torch.long))
        return out.reshape(*y.shape[:-1], *self.mask.shape)

    def normal(self, x):
        return x * _buffer(self._cache, self.mask, x.device, x.real.dtype)

    def _check(self, x, name):
        m = self.mask.ndim
        if x.ndim < m or tuple(x.shape[x.ndim - m:]) != tuple(self.mask.shape):
            raise ValueError(f"mask shape {tuple(self.mask.shape)} does not match the trailing axes of {name} "
                             f"{tuple(x.shape)}")

    def gram_solve(self, b, rho, iters=None, tol=None, x0=None):
        _check_rho(rho, closed_form=True)
        self._check_domain(b, "b")
        self._check(b, "b")
        return b / (_buffer(self._cache, self.mask, b.device, b.real.dtype) + _per_sample(rho, b))

    def range_shape(self, shape):
        return (*shape[:len(shape) - self.mask.ndim], self.count)

    def domain_shape(self, shape):
        return (*shape[:-1], *self.mask.shape)


class Downsampling(LinearOperator):
    """Super-resolution: A x = average over f_d×f_h×f_w blocks of the last three axes; Aᴴ y = nearest upsampling
    divided by f_d·f_h·f_w (the exact adjoint). Real or complex; sizes must be divisible by the factors."""

    complex_domain = True

    def __init__(self, factor, check_finite: bool = True):
        f = (factor,) * 3 if isinstance(factor, int) else tuple(factor)
        if len(f) != 3 or not all(isinstance(v, int) and v >= 1 for v in f):
            raise ValueError(f"factor must be a positive int or three positive ints, got {factor}")
        self.factor, self.k, self.check_finite = f, math.prod(f), check_finite

    def forward(self, x):
        self._check_domain(x)
        if x.ndim < 3 or any(n % f for n, f in zip(x.shape[-3:], self.factor)):
            raise ValueError(f"x shape {tuple(x.shape)}: last three axes must be divisible by factor {self.factor}")
        (d, h, w), (fd, fh, fw) = x.shape[-3:], self.factor
        return x.reshape(*x.shape[:-3], d // fd, fd, h // fh, fh, w // fw, fw).mean((-5, -3, -1))

    def adjoint(self, y):
        self._check_domain(y, "y")
        if y.ndim < 3:
            raise ValueError(f"y must have at least three axes, got shape {tuple(y.shape)}")
        (d, h, w), (fd, fh, fw) = y.shape[-3:], self.factor
        up = y[..., :, None, :, None, :, None].expand(*y.shape[:-3], d, fd, h, fh, w, fw)
        return up.reshape(*y.shape[:-3], d * fd, h * fh, w * fw) / self.k

    def gram_solve(self, b, rho, iters=None, tol=None, x0=None):
        """AᴴA = P / k with P the block-mean projector: x = (b - P b) / ρ + P b / (1/k + ρ)."""
        _check_rho(rho, closed_form=True)
        rho = _per_sample(rho, b)
        pb = self.normal(b) * self.k
        return (b - pb) / rho + pb / (1.0 / self.k + rho)

    def range_shape(self, shape):
        return (*shape[:-3], *(n // f for n, f in zip(shape[-3:], self.factor)))

    def domain_shape(self, shape):
        return (*shape[:-3], *(n * f for n, f in zip(shape[-3:], self.factor)))


# --------------------------------------------------------------------------------------------------- CT
def sparse_view_angles(n: int) -> torch.Tensor:
    """n equispaced angles in [0, π) (radians, fp64)."""
    if n < 1:
        raise ValueError(f"need at least one view, got {n}")
    return torch.arange(n, dtype=torch.float64) * (math.pi / n)


def limited_angle_angles(n: int, span_degrees: float, start_degrees: float = 0.0) -> torch.Tensor:
    """n equispaced angles in [start, start + span) degrees, returned in radians (fp64)."""
    if n < 1 or not 0 < span_degrees <= 180:
        raise ValueError(f"need n >= 1 and 0 < span_degrees <= 180, got n={n}, span={span_degrees}")
    return torch.deg2rad(start_degrees + torch.arange(n, dtype=torch.float64) * (span_degrees / n))


class ParallelBeamCT(LinearOperator):
    """2-D parallel-beam CT of every axial slice: B×1×D×H×W → sinogram B×1×D×A×N_det.

    Geometry (pixel units, pixel (i, j) centred at x = j + ½ - W/2, y = i + ½ - H/2): view θ integrates the
    bilinear interpolant of the slice along the line x cos θ + y sin θ = s, s_k = (k - (N_det-1)/2) · spacing,
    with samples every ≤ `step` pixels (midpoint rule). The forward gathers with ``grid_sample``; the adjoint is
    the transpose of the same matrix written as a gather over each pixel's footprint (deterministic, no
    atomics). Work is split over angles so intermediates stay under `max_elements`."""

    def __init__(self, angles, image_size, n_detectors: int | None = None, detector_spacing: float = 1.0,
                 step: float = 0.5, max_elements: int = 2 ** 26, check_finite: bool = True):
        angles = torch.as_tensor(angles, dtype=torch.float64).reshape(-1)
        if angles.numel() == 0:
            raise ValueError("need at least one angle")
        _finite(angles, "angles")
        h, w = (int(image_size), int(image_size)) if isinstance(image_size, int) else map(int, image_size)
        if h < 1 or w < 1 or detector_spacing <= 0 or step <= 0:
            raise ValueError(f"need positive image_size, detector_spacing, step; got {image_size}, "
                             f"{detector_spacing}, {step}")
        self.angles, self.image_size, self.spacing = angles, (h, w), float(detector_spacing)
        self.n_det = int(n_detectors) if n_detectors else math.ceil(math.hypot(h, w) / self.spacing) + 1
        half = math.hypot(h, w) / 2 + 1  # samples cover the diagonal plus the bilinear support
        self.n_samples = math.ceil(2 * half / step)
        self.half, self.dt = half, 2 * half / self.n_samples
        self.max_elements, self.check_finite = int(max_elements), check_finite
        self._cos_sin, self._cache = (torch.cos(angles), torch.sin(angles)), {}

    @property
    def n_angles(self) -> int:
        return self.angles.numel()

    def _trig(self, a0, a1, like):
        cos, sin = (_buffer(self._cache, t, like.device, like.dtype) for t in self._cos_sin)
        return cos[a0:a1], sin[a0:a1]

    def _pixels(self, like):
        h, w = self.image_size
        jy = torch.arange(h, device=like.device, dtype=like.dtype).repeat_interleave(w)  # row-major: i * W + j
        jx = torch.arange(w, device=like.device, dtype=like.dtype).repeat(h)
        return jx + (0.5 - w / 2), jy + (0.5 - h / 2), jx, jy

    def _check(self, t, name, shape_tail):
        self._check_domain(t, name)
        if t.ndim != 5 or t.shape[1] != 1 or tuple(t.shape[3:]) != shape_tail:
            raise ValueError(f"{name} must be B×1×D×{shape_tail[0]}×{shape_tail[1]}, got shape {tuple(t.shape)}")

    def forward(self, x):
        h, w = self.image_size
        self._check(x, "x", (h, w))
        b, _, d = x.shape[:3]
        img = x.reshape(1, b * d, h, w)
        s = (torch.arange(self.n_det, device=x.device, dtype=x.dtype) - (self.n_det - 1) / 2) * self.spacing
        t = (torch.arange(self.n_samples, device=x.device, dtype=x.dtype) + 0.5) * self.dt - self.half
        chunk = max(1, self.max_elements // (b * d * self.n_det * self.n_samples))
        out = []
        for a0 in range(0, self.n_angles, chunk):
            cos, sin = self._trig(a0, a0 + chunk, x)
            c, sn = cos[:, None, None], sin[:, None, None]
            px = s[None, :, None] * c - t[None, None, :] * sn  # (a, n_det, n_samples)
            py = s[None, :, None] * sn + t[None, None, :] * c
            grid = torch.stack((px * (2 / w), py * (2 / h)), -1).reshape(1, -1, self.n_samples, 2)
            v = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out.append(v.sum(-1) * self.dt)
        return torch.cat(out, -1).reshape(b, 1, d, self.n_angles, self.n_det)

    def _footprint(self, a0: int, a1: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For angles a0:a1 and every pixel p: the detectors k it reaches and A[(θ, k), p] (a, HW, kc each)."""
        h, w = self.image_size
        xp, yp, jx, jy = self._pixels(like)
        reach = math.sqrt(2)  # a sample influences pixels closer than √2 (bilinear support)
        kc, lc = math.floor(2 * reach / self.spacing) + 2, math.floor(2 * reach / self.dt) + 2
        cos, sin = (v[:, None] for v in self._trig(a0, a1, like))
        u = (xp * cos + yp * sin) / self.spacing + (self.n_det - 1) / 2  # detector index of the pixel
        v = (-xp * sin + yp * cos + self.half) / self.dt - 0.5  # sample index along the ray
        kk = torch.floor(u - reach / self.spacing)[..., None] + torch.arange(kc, device=like.device, dtype=like.dtype)
        ll = torch.floor(v - reach / self.dt)[..., None] + torch.arange(lc, device=like.device, dtype=like.dtype)
        s = (kk - (self.n_det - 1) / 2) * self.spacing
        t = (ll + 0.5) * self.dt - self.half
        c, sn = cos[..., None, None], sin[..., None, None]
        px = s[..., :, None] * c - t[..., None, :] * sn  # (a, HW, kc, lc): the same arithmetic as forward
        py = s[..., :, None] * sn + t[..., None, :] * c
        ix = ((px * (2 / w) + 1) * w - 1) / 2  # grid_sample's unnormalisation (align_corners=False)
        iy = ((py * (2 / h) + 1) * h - 1) / 2
        wt = (1 - (ix - jx[:, None, None]).abs()).clamp_min(0) * (1 - (iy - jy[:, None, None]).abs()).clamp_min(0)
        wt = (wt * ((ll >= 0) & (ll < self.n_samples))[..., None, :]).sum(-1)
        wt = wt * ((kk >= 0) & (kk < self.n_det)) * self.dt
        return wt, kk.clamp(0, self.n_det - 1).to(torch.int32)

    def _footprints(self, like: torch.Tensor):
        """All angles' footprints, computed in pieces and cached per device/dtype when they fit `max_elements`."""
        key = ("footprint", like.device, like.dtype)
        if key in self._cache:
            return self._cache[key]
        h, w = self.image_size
        per_angle = h * w * (math.floor(2 * math.sqrt(2) / self.spacing) + 2)
        if per_angle * self.n_angles > self.max_elements:
            return None
        step = max(1, 2 ** 22 // (per_angle * (math.floor(2 * math.sqrt(2) / self.dt) + 2)))  # cache-sized pieces
        parts = [self._footprint(a0, a0 + step, like) for a0 in range(0, self.n_angles, step)]
        self._cache[key] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return self._cache[key]

    def adjoint(self, y):
        """Aᵀ y: every pixel gathers the detectors its bilinear footprint reaches (no scatter, no atomics)."""
        h, w = self.image_size
        self._check(y, "y", (self.n_angles, self.n_det))
        b, _, d = y.shape[:3]
        g = y.reshape(b * d, self.n_angles, self.n_det)
        cached = self._footprints(y)
        kc = math.floor(2 * math.sqrt(2) / self.spacing) + 2
        lc = 1 if cached is not None else math.floor(2 * math.sqrt(2) / self.dt) + 2
        chunk = max(1, self.max_elements // (h * w * max(b * d * kc, kc * lc)))
        out = y.new_zeros(b * d, h * w)
        for a0 in range(0, self.n_angles, chunk):
            wt, kk = (t[a0:a0 + chunk] for t in cached) if cached is not None else self._footprint(a0, a0 + chunk, y)
            idx = kk.long().reshape(1, kk.shape[0], -1).expand(b * d, -1, -1)
            ga = g[:, a0:a0 + chunk].gather(-1, idx)  # (BD, a, HW*kc)
            out += (ga.reshape(b * d, *wt.shape) * wt).sum((1, 3))
        return out.reshape(b, 1, d, h, w)

    def fbp(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Filtered back-projection (Ram-Lak ramp filter, zero-padded FFT convolution; linear interpolation
        on the detector; angular weight = median angle step mod π). Returns B×1×D×H×W."""
        h, w = self.image_size
        self._check(sinogram, "sinogram", (self.n_angles, self.n_det))
        b, _, d = sinogram.shape[:3]
        n, tau = self.n_det, self.spacing
        npad = 1 << (2 * n - 1).bit_length()
        i = torch.arange(npad, device=sinogram.device)
        k = torch.where(i < npad // 2, i, i - npad).to(torch.float64)
        ramp = torch.where(k == 0, torch.full_like(k, 0.25 / tau ** 2), -1 / (math.pi * k * tau) ** 2)
        ramp = torch.where((k.remainder(2) == 0) & (k != 0), torch.zeros_like(k), ramp)
        filt = (torch.fft.fft(ramp).real * tau).to(sinogram.dtype)
        q = torch.fft.ifft(torch.fft.fft(sinogram, n=npad, dim=-1) * filt, dim=-1).real[..., :n]
        q = q.reshape(b * d, self.n_angles, n)
        a = torch.sort(self.angles.remainder(math.pi)).values
        gaps = torch.diff(torch.cat([a, a[:1] + math.pi]))
        dtheta = float(gaps.median()) if self.n_angles > 1 else math.pi
        xp, yp = self._pixels(sinogram)[:2]
        out = sinogram.new_zeros(b * d, h * w)
        chunk = max(1, self.max_elements // (b * d * h * w * 2))
        for a0 in range(0, self.n_angles, chunk):
            cos, sin = (v[:, None] for v in self._trig(a0, a0 + chunk, sinogram))
            u = (xp * cos + yp * sin) / tau + (n - 1) / 2
            k0 = torch.floor(u)
            frac = u - k0
            for kk, wt in ((k0, 1 - frac), (k0 + 1, frac)):
                wt = wt * ((kk >= 0) & (kk < n))
                idx = kk.clamp(0, n - 1).long()[None].expand(b * d, -1, -1)
                out += (q[:, a0:a0 + chunk].gather(-1, idx) * wt).sum(1)
        return (out * dtheta).reshape(b, 1, d, h, w)

    def range_shape(self, shape):
        return (shape[0], 1, shape[2], self.n_angles, self.n_det)

    def domain_shape(self, shape):
        return (shape[0], 1, shape[2], *self.image_size)
