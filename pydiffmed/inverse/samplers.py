"""Posterior samplers: a data step on the x0 estimate, run by the engine between the model call and fused_step.

    m = Measurement(Masking(mask), y, sigma_y=0.01)
    x = pydiffmed.sample(model, shape, "ddim", measurement=m, posterior="dds", posterior_options={"cg_iters": 5})

How it sits in the engine (ARCHITECTURE §1, §8 "Measurements"). fused_step forms x0 = clip(p_x·x + p_m·m) from the
model output m with the plan row's coefficients. A data step maps the x0 estimate to x0' and hands fused_step
m' = m + (x0' - x̂0)/u_m (u_x, u_m: the x0 coefficients of that evaluation, below), so fused_step forms x0'
itself: the plan, fused_step and the CUDA graphs stay as they are, and the data step is device-only (tables
gathered by the device step index, fixed iteration counts, no host sync). Every model evaluation gets the data
step (Heun, RK4, predictor-corrector: each of a step's evaluations), and multistep solvers keep the corrected
estimates in their history.

Which x0 estimate. Where the plan row's estimate is x0 (p_x, p_m equal the prediction type's x0 coefficients
at the evaluation's noise level — every solver in pydiffmed except the ones below), u = (p_x, p_m): fused_step
then forms x0' up to rounding, so for noiseless y and `projection` the x0 it uses satisfies A x0 = y. Where the
row's estimate is something else (PNDM's raw model output, UniPC with predict_x0=False, rectified-flow Euler
/ Heun on a flow model's velocity), u comes from `prediction.x0_coefs` at the model time's (alpha, sigma): the
corrected model output then carries the data step into whatever the solver does with it. An evaluation whose
model output does not determine x0 (u_m = 0, e.g. at sigma = 0) gets no data step; one where x0 is undefined
(epsilon or score prediction at alpha = 0) is refused (ValueError), as are solvers that encode (inversions).

Clipping. The data step acts on the clipped estimate (the solver's own x0), and fused_step clips its result
again: where y lies inside [-clip, clip] that changes nothing, elsewhere the clip wins (the volume stays in
range; data consistency does not). With dynamic thresholding (a coef_fn) the threshold is computed from the
corrected estimate and applied after the data step.

Noise awareness. Treating x0 | x_t as N(x̂0, r_t²·I) with r_t² = v·sigma_t²/(alpha_t²·v + sigma_t²) (the exact
value for data ~ N(·, v·I); v = `data_variance`, default 1), the posterior mean of x0 given x_t and y is
    x0' = argmin_x ‖y - A x‖²/sigma_y² + ‖x - x̂0‖²/r_t²  =  x̂0 + (AᴴA + ρ_t I)⁻¹ Aᴴ(y - A x̂0),  ρ_t = sigma_y²/r_t²
(ΠGDM's Gaussian approximation). The three data steps approximate it:

* "projection" (hard data consistency, null-space projection, DDNM-style): x0' = x̂0 + λ_t A⁺(y - A x̂0) with
  λ_t = L r_t²/(L r_t² + sigma_y²), L = ‖A‖² (power iteration, once): 1 for noiseless y, where x0' is the
  projection of x̂0 onto {A x = y} (the solve above for every A); for noisy y it equals the solve when
  A Aᴴ = L·I (Masking, Downsampling). A⁺ is exact for Masking (Aᴴ) and Downsampling (k·Aᴴ) or an operator's own
  `pseudo_inverse(r)`, else `cg_iters` CG iterations on AᴴA from zero (the minimum-norm solution).
  Options: cg_iters (10), cg_tol (1e-6), data_variance (1.0), operator_norm2 (None: L by 30 power iterations on
  the sampler's shape when the sampler is built; give it to skip them, e.g. for a large CT operator).
* "dds" (Chung et al., Decomposed Diffusion Sampler): the solve above by `cg_iters` CG iterations started at
  x̂0 (the operator's `gram_solve`: exact for Masking and Downsampling); rho= fixes ρ instead of sigma_y²/r_t².
  For sigma_y = 0 it is `cg_iters` CG iterations on the normal equations from x̂0 (the projection, reached
  after enough iterations). Options: cg_iters (5), cg_tol (1e-6), data_variance (1.0), rho (None).
* "dps" (Chung et al., Diffusion Posterior Sampling): the gradient through the model. weighting="tweedie"
  (default) is Tweedie's formula for the posterior, E[x0 | x_t, y] = x̂0 + (sigma_t²/alpha_t)·∇ log p(y | x_t),
  with DPS's approximation p(y | x_t) ≈ N(y; A x̂0(x_t), (sigma_y² + L r_t²) I), L = ‖A‖²:
      x0' = x̂0 - step_size · sigma_t²/(2 alpha_t (sigma_y² + L r_t²)) · ∇_{x_t} ‖y - A x̂0(x_t)‖²,
  exact for a Gaussian N(·, v I) prior and A Aᴴ = L·I, noise-aware, stable as sigma_y → 0 (the step never
  exceeds 1/‖A‖² in x0: without L an operator with ‖A‖ > √2 makes it diverge), the same for every solver, but
  an under-correction along A's weaker directions when A Aᴴ is far from a multiple of I. weighting="residual"
  is the DPS paper's update, x' ← x' - step_size·∇_{x_t}‖y - A x̂0(x_t)‖ (the official code's unsquared norm),
  mapped onto the estimate through the row's b (evaluations whose x' does not depend on the estimate,
  b·p_m = 0, get none). The gradient is a vector-Jacobian product of the model with
  v = Aᴴ(A x̂0 - y) (only A's adjoint is needed, not a differentiable A). recompute=True (default) checkpoints
  the model's blocks (torch.utils.checkpoint: UNet3D's / MONAI's resnet and attention blocks, or the modules or
  module types given) so the backward keeps one block's activations at a time instead of the whole network's.
  DPS needs a model differentiable in its input and runs eagerly (no CUDA graph: its backward pass is not
  captured). Options: step_size (1.0), weighting ("tweedie"), data_variance (1.0), recompute (True),
  operator_norm2 (None, as for projection).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math

import numpy as np
import torch

from .. import prediction
from .operators import Downsampling, Masking, as_operator, conjugate_gradient

__all__ = ["POSTERIORS", "DataStep", "Measurement", "data_step"]

POSTERIORS = ("projection", "dds", "dps")
_RHO_MAX = 1e10  # ρ_t where r_t = 0 (the state is clean: no correction), and the cap elsewhere
# the model blocks recompute=True checkpoints (pydiffmed's UNet3D / ControlNet and MONAI's DiffusionModelUNet)
_BLOCK_NAMES = ("ResnetBlock", "SpatialAttentionBlock", "SpatialTransformer", "DiffusionUNetResnetBlock",
                "BasicTransformerBlock", "AttentionBlock")


class Measurement:
    """y = A x0 + sigma_y·n (n ~ N(0, I)): `operator` (a LinearOperator, or anything `as_operator` accepts: an
    object with forward/adjoint or a (forward, adjoint) pair), data `y` (batch 1 — one measurement for every
    sample — or the sampler's batch) and the measurement noise standard deviation `sigma_y` >= 0."""

    def __init__(self, operator, y, sigma_y=0.0):
        self.operator = as_operator(operator)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if not (y.is_floating_point() or y.is_complex()):
            raise ValueError(f"y must be a floating-point or complex tensor, got {y.dtype}")
        if y.ndim < 1:
            raise ValueError("y must have a leading batch dimension")
        if not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or Inf")
        if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) \
                or sigma_y < 0:
            raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
        self.y, self.sigma_y = y, float(sigma_y)

    def __repr__(self):
        return f"Measurement({type(self.operator).__name__}, y {tuple(self.y.shape)}, sigma_y={self.sigma_y:g})"


def _noise_level(schedule, model_time):
    """(alpha, sigma, d_alpha, d_sigma) of the state evaluated at `model_time` (d_*: the path derivatives flow
    predictions need; rectified flow's (-1, 1) on discrete schedules, as the solvers use)."""
    t = schedule.t_from_model_time(np.array([float(model_time)]))
    alpha, sigma = (float(v[0]) for v in schedule.alpha_sigma(t))
    if schedule.kind == "discrete":
        return alpha, sigma, -1.0, 1.0
    d_alpha, d_sigma = (float(np.asarray(v).reshape(-1)[0]) for v in schedule.derivatives(t))
    return alpha, sigma, d_alpha, d_sigma


class DataStep:
    """A posterior's data step (module docstring); build one with `data_step(name, measurement, **options)`.
    The engine calls `bind(...)` once, then `self(x, m, step_index, model_input)` per model evaluation."""

    name = "data_step"
    differentiates = False  # needs the gradient through the model (the engine then calls the model on a leaf)
    uses_norm = False  # its table uses ‖A‖² (computed once by power iteration)
    defaults: dict = {}
    # columns of the per-evaluation table
    _COLUMNS = ("u_x", "u_m", "inv_u_m", "clip", "gain", "rho", "weight")

    def __init__(self, measurement, **options):
        if not isinstance(measurement, Measurement):
            raise TypeError(f"measurement must be a pydiffmed.inverse.Measurement, got {type(measurement).__name__}")
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"unknown posterior_options {unknown} for posterior={self.name!r}; it takes "
                             f"{sorted(self.defaults)}")
        self.measurement = measurement
        self.options = {**self.defaults, **options}
        self._check_options()
        self.bound = False

    def _check_options(self):
        o = self.options
        if "cg_iters" in o and (isinstance(o["cg_iters"], bool) or not isinstance(o["cg_iters"], int)
                                or o["cg_iters"] < 1):
            raise ValueError(f"posterior_options cg_iters must be a positive int, got {o['cg_iters']!r}")
        for key in ("cg_tol", "data_variance", "step_size", "rho", "operator_norm2"):
            v = o.get(key)
            if v is None and key in ("rho", "operator_norm2"):
                continue
            positive = key in ("data_variance", "operator_norm2")
            if key in o and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                             or v < 0 or (v == 0 and positive)):
                raise ValueError(f"posterior_options {key} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {v!r}")

    # -- preparation -------------------------------------------------------------------------------------------
    def bind(self, *, solver, rows, times, shape, device, state_dtype, model=None):
        """Check the measurement against the sampler (operator domain, y's shape) and build the device table of
        per-evaluation coefficients from the plan rows `rows` (E × K host lists) and model times `times`."""
        from ..ops.fused_step import COEF_NAMES

        if solver.encodes:
            raise ValueError(f"posterior={self.name!r}: {solver.name} encodes volumes into noise; posterior "
                             "sampling needs a sampler")
        self.batch = shape[0]
        self._bind_measurement(shape, device, state_dtype)
        self._prepare(shape, device, state_dtype)
        col = {n: k for k, n in enumerate(COEF_NAMES)}
        sigma_y, v = self.measurement.sigma_y, float(self.options.get("data_variance", 1.0))
        table = []
        for e, (row, u) in enumerate(zip(rows, times)):
            alpha, sigma, d_alpha, d_sigma = _noise_level(solver.schedule, u)
            try:
                q = prediction.x0_coefs(solver.prediction_type, alpha, sigma, d_alpha, d_sigma)
            except ValueError as exc:
                raise ValueError(f"posterior={self.name!r} needs an x0 estimate at every model evaluation; "
                                 f"{solver.name} has none at evaluation {e} (model time {u:g}): {exc}") from None
            p = (row[col["p_x"]], row[col["p_m"]])
            u_x, u_m = p if np.allclose(p, q, rtol=1e-3, atol=1e-6) else q
            r2 = v * sigma * sigma / (alpha * alpha * v + sigma * sigma)
            clip = math.inf if solver.thresholding else row[col["clip"]]  # thresholding acts after the data step
            values = dict(u_x=u_x, u_m=u_m, inv_u_m=0.0 if u_m == 0 else 1.0 / u_m, clip=clip)
            if u_m != 0:  # else the model output does not move x0: no data step at this evaluation
                values.update(self._coefficients(alpha, sigma, r2, sigma_y, row[col["b"]] * p[1], u_m))
            table.append([float(values.get(name, 0.0)) for name in self._COLUMNS])
        self._table = torch.tensor(table, dtype=torch.float32, device=device)
        self._model = model
        self.bound = True
        return self

    def _prepare(self, shape, device, state_dtype):
        """Setup needing the bound operator (before the table is built): ‖A‖² where the data step uses it."""
        self.norm2 = None
        if self.uses_norm:
            given = self.options["operator_norm2"]
            self.norm2 = float(given) if given is not None else _operator_norm2(self.operator, shape, device,
                                                                                  state_dtype)

    def _coefficients(self, alpha, sigma, r2, sigma_y, b_p_m, u_m):
        """This data step's table entries at one evaluation (b_p_m: the row's b·p_m)."""
        return {}

    def _bind_measurement(self, shape, device, state_dtype):
        op = copy.copy(self.measurement.operator)
        if hasattr(op, "check_finite"):
            op.check_finite = False  # y is checked once; NaN checks of every call would sync the device
        probe = torch.zeros(shape, dtype=state_dtype, device=device)
        try:
            ax = op.forward(probe)
            back = op.adjoint(ax)
        except Exception as exc:  # the operator's own complaint, named as a mismatch of shapes
            raise ValueError(f"the measurement operator {type(op).__name__} does not accept volumes of the "
                             f"sampler's shape {tuple(shape)}: {type(exc).__name__}: {exc}") from None
        if not isinstance(back, torch.Tensor) or tuple(back.shape) != tuple(shape):
            got = tuple(back.shape) if isinstance(back, torch.Tensor) else type(back).__name__
            raise ValueError(f"the measurement operator's adjoint returned {got}, expected the sampler's shape "
                             f"{tuple(shape)} (its image domain does not match the volumes)")
        if back.is_complex():
            raise ValueError("the measurement operator's adjoint returns complex volumes; the sampler's volumes "
                             "are real (use the operator's real image domain, e.g. complex_domain=False)")
        y = self.measurement.y
        if y.is_complex() and not ax.is_complex():
            raise ValueError(f"y is complex but the operator's range is real ({ax.dtype})")
        if tuple(y.shape[1:]) != tuple(ax.shape[1:]) or y.shape[0] not in (1, shape[0]):
            raise ValueError(f"y has shape {tuple(y.shape)}, but the operator maps the sampler's volumes "
                             f"{tuple(shape)} to {tuple(ax.shape)} (y's batch may be 1 or {shape[0]})")
        self.operator = op
        self.y = y.to(device=device, dtype=ax.dtype).expand(ax.shape).contiguous()

    # -- one evaluation --------------------------------------------------------------------------------------
    def _row(self, step_index):
        return self._table.index_select(0, step_index.reshape(1))[0]

    def evaluate(self, call_model, t, model_input):
        """The model output at this evaluation, and the leaf the gradient is taken against (DPS) or None."""
        return call_model(t), None

    def __call__(self, x, m, step_index, model_input=None):
        """The model output m' (fp32) for which fused_step's x0 estimate is the data step's x0' (module
        docstring): x is the state (B, ...) the model was evaluated on, m its (guidance-combined) output."""
        row = self._row(step_index)
        u_x, u_m, inv_u_m, clip = row[0], row[1], row[2], row[3]
        m32 = m.detach().float()
        raw = u_x * x.float() + u_m * m32
        x0 = torch.minimum(torch.maximum(raw, -clip), clip)
        delta = self._correction(x0, row, m, model_input)
        return m32 + (x0 + delta - raw) * inv_u_m

    def _correction(self, x0, row, m, model_input):
        raise NotImplementedError

    def _residual(self, x0):
        return self.y - self.operator.forward(x0)

    def _pinv(self, r):
        """A⁺ r: closed forms where A Aᴴ is a multiple of I, else CG on AᴴA from zero (the minimum-norm answer)."""
        op = self.operator
        if isinstance(op, Masking):
            return op.adjoint(r)
        if isinstance(op, Downsampling):
            return op.adjoint(r) * op.k
        custom = getattr(op, "pseudo_inverse", None)
        if callable(custom):
            return custom(r)
        return conjugate_gradient(op.normal, op.adjoint(r), 0.0, self.options["cg_iters"], self.options["cg_tol"])


class Projection(DataStep):
    name = "projection"
    defaults = {"cg_iters": 10, "cg_tol": 1e-6, "data_variance": 1.0, "operator_norm2": None}
    uses_norm = True

    def _coefficients(self, alpha, sigma, r2, sigma_y, b_p_m, u_m):
        return {"gain": 1.0 if sigma_y == 0 else self.norm2 * r2 / (self.norm2 * r2 + sigma_y * sigma_y)}

    def _correction(self, x0, row, m, model_input):
        return row[4] * self._pinv(self._residual(x0))


class DDS(DataStep):
    name = "dds"
    defaults = {"cg_iters": 5, "cg_tol": 1e-6, "data_variance": 1.0, "rho": None}

    def _coefficients(self, alpha, sigma, r2, sigma_y, b_p_m, u_m):
        if self.options["rho"] is not None:
            return {"rho": float(self.options["rho"])}
        if sigma_y == 0:
            return {"rho": 0.0}
        return {"rho": _RHO_MAX if r2 == 0 else min(sigma_y * sigma_y / r2, _RHO_MAX)}

    def _correction(self, x0, row, m, model_input):
        r = self._residual(x0)
        if self.options["rho"] == 0 or (self.options["rho"] is None and self.measurement.sigma_y == 0):
            op = self.operator  # ρ = 0: CG on the normal equations (a closed-form gram_solve needs ρ > 0)
            return conjugate_gradient(op.normal, op.adjoint(r), 0.0, self.options["cg_iters"],
                                      self.options["cg_tol"])
        rho = row[5].expand(x0.shape[0])
        return self.operator.gram_solve(self.operator.adjoint(r), rho, iters=self.options["cg_iters"],
                                        tol=self.options["cg_tol"])


class DPS(DataStep):
    name = "dps"
    differentiates = True
    defaults = {"step_size": 1.0, "weighting": "tweedie", "data_variance": 1.0, "recompute": True,
                "operator_norm2": None}
    uses_norm = True

    def _check_options(self):
        super()._check_options()
        if self.options["weighting"] not in ("tweedie", "residual"):
            raise ValueError(f"posterior_options weighting must be 'tweedie' or 'residual', got "
                             f"{self.options['weighting']!r}")
        rec = self.options["recompute"]
        if not isinstance(rec, bool) and not (isinstance(rec, (list, tuple)) and all(
                isinstance(r, torch.nn.Module) or (isinstance(r, type) and issubclass(r, torch.nn.Module))
                for r in rec)):
            raise ValueError("posterior_options recompute must be True, False or a list of modules / module "
                             f"types to checkpoint, got {rec!r}")

    def _coefficients(self, alpha, sigma, r2, sigma_y, b_p_m, u_m):
        zeta = float(self.options["step_size"])
        if self.options["weighting"] == "tweedie":
            den = alpha * (sigma_y * sigma_y + self.norm2 * r2)
            return {"weight": 0.0 if den == 0 else zeta * sigma * sigma / den}
        # x' = … + b·(p_x·x + p_m·m): x' moves by b·p_m/u_m per unit of x0
        return {"weight": 0.0 if b_p_m == 0 else zeta * u_m / b_p_m}

    def evaluate(self, call_model, t, model_input):
        leaf = model_input.detach().requires_grad_()
        with torch.enable_grad(), self._recomputing():
            m = call_model(t, leaf)
        if isinstance(m, torch.Tensor) and not m.requires_grad:
            raise ValueError("posterior='dps' needs the gradient of the model output with respect to its input: "
                             "the model returned a tensor without one (is it differentiable, and not run under "
                             "torch.no_grad?)")
        return m, leaf

    def _correction(self, x0, row, m, leaf):
        batch = x0.shape[0]
        u_x, u_m, clip = row[0], row[1], row[3]
        with torch.enable_grad():
            est = u_x * leaf[:batch].float() + u_m * m.float()
            est = torch.minimum(torch.maximum(est, -clip), clip)
            r = self.operator.forward(est.detach()) - self.y
            v = self.operator.adjoint(r)  # ½∇‖A x0 - y‖² with respect to x0
            (g,) = torch.autograd.grad(est, leaf, grad_outputs=v.to(est.dtype))
        g = g.float()
        if g.shape[0] != batch:  # classifier-free guidance: both halves of the model batch are copies of x
            g = g.reshape(-1, batch, *g.shape[1:]).sum(0)
        if self.options["weighting"] == "tweedie":
            return -row[6] * g
        sq = (r.real ** 2 + r.imag ** 2) if r.is_complex() else r * r
        norm = sq.reshape(batch, -1).sum(1).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
        return -row[6] * g / norm.reshape(-1, *[1] * (g.ndim - 1))  # ∇‖r‖ = ∇(½‖r‖²)/‖r‖

    # -- recomputation ----------------------------------------------------------------------------------------
    def _blocks(self):
        model, rec = self._model, self.options["recompute"]
        if rec is False or not isinstance(model, torch.nn.Module):
            return []
        if rec is True:
            chosen = [mod for mod in model.modules() if type(mod).__name__ in _BLOCK_NAMES]
        else:
            types = tuple(r for r in rec if isinstance(r, type))
            ids = {id(r) for r in rec if isinstance(r, torch.nn.Module)}
            chosen = [mod for mod in model.modules() if id(mod) in ids or (types and isinstance(mod, types))]
        inner = set()
        for mod in chosen:  # a block inside a checkpointed block is recomputed with it
            inner.update(id(sub) for sub in mod.modules() if sub is not mod)
        return [mod for mod in chosen if id(mod) not in inner]

    @contextlib.contextmanager
    def _recomputing(self):
        blocks = self._blocks()
        saved = [mod.__dict__.get("forward") for mod in blocks]
        try:
            for mod in blocks:
                mod.forward = functools.partial(torch.utils.checkpoint.checkpoint, mod.forward, use_reentrant=False)
            yield
        finally:
            for mod, old in zip(blocks, saved):
                if old is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = old


def _operator_norm2(op, shape, device, dtype, iters=30, seed=0):
    """‖A‖² = the largest eigenvalue of AᴴA, by power iteration on a seeded probe of the sampler's shape (the
    largest over the batch: masks may differ per sample); 0 for an operator with an empty range."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    view = (-1,) + (1,) * (len(shape) - 1)
    for _ in range(iters):
        x = op.normal(x / x.reshape(shape[0], -1).norm(dim=1).clamp_min(1e-30).reshape(view))
    value = x.reshape(shape[0], -1).double().norm(dim=1)
    return float(value.max())


_STEPS = {"projection": Projection, "dds": DDS, "dps": DPS}


def data_step(name, measurement, **options) -> DataStep:
    """The data step of posterior `name` ("projection", "dds" or "dps"; module docstring) for `measurement`."""
    if not isinstance(name, str) or name not in _STEPS:
        raise ValueError(f"unknown posterior {name!r}; available: {list(POSTERIORS)}")
    return _STEPS[name](measurement, **options)


def from_arguments(measurement, posterior, posterior_options):
    """The engine's arguments (measurement=, posterior=, posterior_options=) as a DataStep, or None."""
    if measurement is None:
        if posterior is not None or posterior_options:
            raise ValueError("posterior= and posterior_options= need measurement= (a pydiffmed.inverse.Measurement)")
        return None
    if posterior_options is not None and not isinstance(posterior_options, dict):
        raise TypeError(f"posterior_options must be a dict, got {type(posterior_options).__name__}")
    return data_step("dds" if posterior is None else posterior, measurement, **(posterior_options or {}))

