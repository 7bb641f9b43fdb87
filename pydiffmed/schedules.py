"""Noise schedules: the forward process x_t = alpha(t)*x0 + sigma(t)*eps of every model family we sample.

One `NoiseSchedule` type covers
  * discrete-time models (DDPM family): betas `linear`, `scaled_linear`, `cosine` (diffusers'
    `squaredcos_cap_v2`, MONAI's `cosine`), `sigmoid`, or given explicitly; optional zero-terminal-SNR rescale;
    t is the training index 0..N-1 (fractional t interpolates log(sigma/alpha) linearly, which is exactly the
    inverse of diffusers' `_sigma_to_t`);
  * continuous-time SDEs (Song et al.): VP (beta_min, beta_max), sub-VP, VE (sigma_min, sigma_max; NCSN's
    geometric sigma levels), with t in [t_min, 1];
  * rectified flow: x_t = (1 - t)*x0 + t*eps, t in [0, 1].
Everything is float64 numpy on the host; solvers turn it into coefficient tables once.

Timestep grids: `spaced_timesteps` implements diffusers' `leading` / `trailing` / `linspace` spacings (and the
"N+1 points, drop the last" variant of its multistep solvers) and MONAI's grid (`monai`); `karras_sigmas`
gives the Karras et al. (2022) grid (rho = 7).
"""
from __future__ import annotations

import math

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
_BETA_ALIASES = {"squaredcos_cap_v2": "cosine", "linear_beta": "linear", "scaled_linear_beta": "scaled_linear",
                 "sigmoid_beta": "sigmoid"}
SPACINGS = ("leading", "trailing", "linspace", "monai")
KINDS = ("discrete", "vp", "subvp", "ve", "flow")
MAX_TRAIN_TIMESTEPS = 1 << 20  # a bound on the tables a discrete schedule allocates


# --- betas -------------------------------------------------------------------------------------------------

def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               *, cosine_s: float = 0.008, max_beta: float = 0.999, sigmoid_range: float = 6.0) -> np.ndarray:
    """Discrete betas (float64) by name: linear, scaled_linear (linear in sqrt(beta)), cosine (Nichol & Dhariwal:
    alpha_bar(t) = cos²((t/N + s)/(1 + s)·π/2), betas capped at max_beta), sigmoid (sigmoid over
    [-range, range] scaled to [beta_start, beta_end])."""
    if not isinstance(schedule, str) or _BETA_ALIASES.get(schedule, schedule) not in BETA_SCHEDULES:
        raise ValueError(f"betas: unknown schedule {schedule!r}; expected one of {BETA_SCHEDULES} "
                         f"(or {tuple(_BETA_ALIASES)})")
    name = _BETA_ALIASES.get(schedule, schedule)
    n = _check_positive_int("num_train_timesteps", num_train_timesteps)
    if n > MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be at most {MAX_TRAIN_TIMESTEPS}, got {n}")
    beta_start, beta_end = _check_finite("beta_start", beta_start), _check_finite("beta_end", beta_end)
    cosine_s, max_beta = _check_finite("cosine_s", cosine_s), _check_finite("max_beta", max_beta)
    sigmoid_range = _check_finite("sigmoid_range", sigmoid_range)
    if name == "cosine":
        if cosine_s < 0:
            raise ValueError(f"cosine_s must be >= 0, got {cosine_s}")
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
    else:  # beta_start and beta_end are the first and last betas of these schedules
        for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0 < value < 1:
                raise ValueError(f"{key} must lie in (0, 1) (a beta is a per-step noise variance), got {value}")
    with np.errstate(all="ignore"):
        if name == "linear":
            betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
        elif name == "scaled_linear":
            betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
        elif name == "cosine":
            def alpha_bar(t):
                return math.cos((t + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])
        else:
            grid = np.linspace(-sigmoid_range, sigmoid_range, n, dtype=np.float64)
            betas = 1.0 / (1.0 + np.exp(-grid)) * (beta_end - beta_start) + beta_start
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError(f"betas: the {name} schedule with these parameters gives betas outside (0, 1)")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has SNR exactly 0."""
    alpha_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = alpha_bar_sqrt[0], alpha_bar_sqrt[-1]
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * (first / (first - last))
    alpha_bar = alpha_bar_sqrt ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho)."""
    n = _check_positive_int("n", n)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0,
                     *, extra_point: bool = False, integer: bool = True) -> np.ndarray:
    """Descending training timesteps for `num_steps` model evaluations, as the peers define them.

    spacing: `leading` (arange(n)·(N//n) + offset), `trailing` (round(arange(N, 0, -N/n)) - 1), `linspace`
    (linspace(0, N-1, n) rounded) — diffusers' definitions; `monai`: MONAI ≥ 1.5's grid
    round(linspace(N-1-offset, 0, n)) + offset computed in float32 like torch.linspace.
    extra_point: diffusers' multistep solvers (DPM-Solver, UniPC) space n+1 points and drop the last (their
    final step goes to sigma = 0 instead of t = 0).
    integer=False: diffusers' Euler/Heun `linspace` grid, which is not rounded (float32 values).
    """
    n_train = _check_positive_int("num_train_timesteps", num_train_timesteps)
    n = _check_positive_int("num_steps", num_steps)
    if n > n_train:
        raise ValueError(f"num_steps={n} cannot exceed num_train_timesteps={n_train}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    points = n + 1 if extra_point else n
    if spacing == "linspace":
        if not integer:
            if extra_point:
                raise ValueError("a non-integer linspace grid has no extra-point variant")
            return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        t = np.linspace(0, n_train - 1, points).round()[::-1]
        return (t[:-1] if extra_point else t).astype(np.int64)
    if spacing == "leading":
        ratio = n_train // points
        t = (np.arange(0, points) * ratio).round()[::-1]
        t = (t[:-1] if extra_point else t).astype(np.int64) + int(steps_offset)
        return t
    if spacing == "trailing":
        ratio = n_train / n
        return (np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1)
    # monai
    import torch

    if not 0 <= steps_offset < n_train:
        raise ValueError(f"steps_offset must be in [0, {n_train}), got {steps_offset}")
    grid = torch.linspace((n_train - 1) - steps_offset, 0, n, dtype=torch.float32).round().long() + steps_offset
    return grid.numpy().astype(np.int64)


def _check_positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def _check_finite(name, v) -> float:
    """v as a float; ValueError naming `name` unless v is a finite real number (bools are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


# --- the schedule --------------------------------------------------------------------------------------------

class NoiseSchedule:
    """x_t = alpha(t)·x0 + sigma(t)·eps for one model family. Build with `discrete`, `vp`, `subvp`, `ve`, `flow`.

    Attributes: kind, t_min, t_max (the sampling range of t), num_train_timesteps (discrete; the model-time scale
    of flows), alphas_cumprod (discrete, float64), betas (discrete).
    Methods (vectorised over numpy arrays, float64): alpha_sigma(t), edm_sigma(t) = sigma/alpha,
    t_from_edm_sigma(s), derivatives(t) (continuous kinds), model_time(t) / t_from_model_time(u),
    sde(t) -> (f, g²) of the forward SDE dx = f·x dt + g dW.
    """

    def __init__(self, kind, *, alphas_cumprod=None, betas=None, num_train_timesteps=1000, beta_min=0.1,
                 beta_max=20.0, sigma_min=0.01, sigma_max=50.0, t_min=0.0, t_max=1.0, time_scale=1.0,
                 time_input="t"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.beta_schedule = None
        self.num_train_timesteps = _check_positive_int("num_train_timesteps", num_train_timesteps)
        self.time_scale = _check_finite("time_scale", time_scale)
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be positive, got {time_scale!r}")
        if time_input not in ("t", "sigma"):
            raise ValueError(f"time_input must be 't' or 'sigma', got {time_input!r}")
        if time_input == "sigma" and kind != "ve":
            raise ValueError("time_input='sigma' is only defined for VE schedules")
        self.time_input = time_input
        self.beta_min, self.beta_max = _check_finite("beta_min", beta_min), _check_finite("beta_max", beta_max)
        if kind in ("vp", "subvp") and not (self.beta_min >= 0 and self.beta_max > 0):
            raise ValueError(f"need beta_min >= 0 and beta_max > 0, got {beta_min}, {beta_max}")
        self.sigma_min, self.sigma_max = _check_finite("sigma_min", sigma_min), _check_finite("sigma_max", sigma_max)
        t_min, t_max = _check_finite("t_min", t_min), _check_finite("t_max", t_max)
        self.betas = None if betas is None else np.asarray(betas, dtype=np.float64)
        self.alphas_cumprod = None if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64)
        if kind == "discrete":
            self.t_min, self.t_max = 0.0, float(len(self.alphas_cumprod) - 1)
            with np.errstate(divide="ignore"):
                self._log_edm_sigmas = 0.5 * (np.log1p(-self.alphas_cumprod) - np.log(self.alphas_cumprod))
        else:
            self.t_min, self.t_max = float(t_min), float(t_max)
            if not 0.0 <= self.t_min < self.t_max:
                raise ValueError(f"need 0 <= t_min < t_max, got {t_min}, {t_max}")

    # constructors ----------------------------------------------------------------------------------------
    @classmethod
    def discrete(cls, betas="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                 rescale_zero_snr=False, **beta_kwargs):
        """DDPM-family schedule. `betas` is a schedule name (BETA_SCHEDULES or a diffusers/MONAI alias) or an
        explicit sequence of betas."""
        if not isinstance(rescale_zero_snr, (bool, np.bool_)):
            raise ValueError(f"rescale_zero_snr must be true or false, got {rescale_zero_snr!r}")
        if isinstance(betas, str):
            b = make_betas(betas, num_train_timesteps, beta_start, beta_end, **beta_kwargs)
        else:
            try:
                b = np.asarray(betas, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                b = np.zeros(0)
            if b.size < 2 or not np.all((b > 0) & (b < 1)):
                raise ValueError("explicit betas must be a sequence of at least 2 values in (0, 1)")
        raw = b
        if rescale_zero_snr:
            b = rescale_zero_terminal_snr(b)
        schedule = cls("discrete", alphas_cumprod=np.cumprod(1.0 - b), betas=b, num_train_timesteps=b.size)
        schedule._beta_range, schedule._raw_betas, schedule._zero_snr = (beta_start, beta_end), raw, rescale_zero_snr
        schedule.beta_schedule = _BETA_ALIASES.get(betas, betas) if isinstance(betas, str) else "explicit"
        return schedule

    @classmethod
    def vp(cls, beta_min=0.1, beta_max=20.0, t_min=1e-3, time_scale=1.0):
        """Variance-preserving SDE: alpha = exp(-∫β/2), sigma² = 1 - alpha², β(t) linear in t."""
        return cls("vp", beta_min=beta_min, beta_max=beta_max, t_min=t_min, time_scale=time_scale)

    @classmethod
    def subvp(cls, beta_min=0.1, beta_max=20.0, t_min=1e-3, time_scale=1.0):
        """Sub-VP SDE: alpha as VP, sigma = 1 - alpha²."""
        return cls("subvp", beta_min=beta_min, beta_max=beta_max, t_min=t_min, time_scale=time_scale)

    @classmethod
    def ve(cls, sigma_min=0.01, sigma_max=50.0, t_min=1e-5, time_input="sigma", time_scale=1.0):
        """Variance-exploding SDE (NCSN): alpha = 1, sigma = sigma_min·(sigma_max/sigma_min)^t. The model is
        conditioned on sigma (time_input='sigma', as NCSN / score_sde) or on t·time_scale."""
        if not 0 < _check_finite("sigma_min", sigma_min) < _check_finite("sigma_max", sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        return cls("ve", sigma_min=sigma_min, sigma_max=sigma_max, t_min=t_min, time_input=time_input,
                   time_scale=time_scale)

    @classmethod
    def flow(cls, num_train_timesteps=1000, t_min=0.0, t_max=1.0):
        """Rectified flow x_t = (1-t)·x0 + t·eps; the model time is t·num_train_timesteps (MONAI RFlow)."""
        return cls("flow", num_train_timesteps=num_train_timesteps, t_min=t_min, t_max=t_max)

    def fp32_alphas_cumprod(self):
        """alpha_bar as diffusers stores it: betas made in float32 torch arithmetic (linspace, sigmoid, the
        zero-SNR rescale), cumulative product in float32; returned as float64. diffusers derives its sigma
        grids (Karras, log-SNR, interpolated sigmas) from these; 1 - alpha_bar[0] then carries a ~1e-4
        relative cancellation error, so reproducing their grid points needs the same values."""
        import torch

        n, f32 = self.num_train_timesteps, torch.float32
        start, end = self._beta_range
        if self.beta_schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=f32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=f32) ** 2
        elif self.beta_schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (end - start) + start
        else:
            betas = torch.tensor(self._raw_betas, dtype=f32)
        if self._zero_snr:
            ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
            first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
            ab_sqrt = (ab_sqrt - last) * (first / (first - last))
            ab = ab_sqrt ** 2
            betas = 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])
        return torch.cumprod(1.0 - betas, dim=0).double().numpy()

    def __repr__(self):
        if self.kind == "discrete":
            return f"NoiseSchedule.discrete(N={self.num_train_timesteps})"
        return f"NoiseSchedule.{self.kind}(t in [{self.t_min:g}, {self.t_max:g}])"

    # marginals -------------------------------------------------------------------------------------------
    def alpha_sigma(self, t):
        """(alpha, sigma) at t (float64 arrays shaped like t)."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "discrete":
            return self._discrete_alpha_sigma(t)
        if self.kind in ("vp", "subvp"):
            alpha = np.exp(self._log_alpha(t))
            sigma = np.sqrt(-np.expm1(2 * self._log_alpha(t))) if self.kind == "vp" else -np.expm1(
                2 * self._log_alpha(t))
            return alpha, sigma
        if self.kind == "ve":
            return np.ones_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return 1.0 - t, t.copy()  # flow

    def _discrete_alpha_sigma(self, t):
        shape = t.shape
        t = t.reshape(-1)
        n = len(self.alphas_cumprod)
        if np.any(t < 0) or np.any(t > n - 1):
            raise ValueError(f"discrete timesteps must lie in [0, {n - 1}]")
        whole = np.floor(t).astype(np.int64)
        frac = t - whole
        alpha = np.sqrt(self.alphas_cumprod[whole])
        sigma = np.sqrt(1.0 - self.alphas_cumprod[whole])
        between = frac > 0
        if np.any(between):
            lo = whole[between]
            hi = np.minimum(lo + 1, n - 1)
            with np.errstate(invalid="ignore"):
                log_s = (1 - frac[between]) * self._log_edm_sigmas[lo] + frac[between] * self._log_edm_sigmas[hi]
            s = np.exp(log_s)
            a = 1.0 / np.sqrt(1.0 + s * s)
            alpha = alpha.copy()
            sigma = sigma.copy()
            alpha[between] = np.where(np.isinf(s), 0.0, a)
            sigma[between] = np.where(np.isinf(s), 1.0, s * a)
        return alpha.reshape(shape), sigma.reshape(shape)

    def _log_alpha(self, t):
        return -(0.5 * self.beta_min * t + 0.25 * (self.beta_max - self.beta_min) * t * t)

    def _t_from_log_alpha(self, log_alpha):
        target = -np.asarray(log_alpha, dtype=np.float64)
        quad, lin = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        if quad == 0:
            return target / lin
        return (-lin + np.sqrt(lin * lin + 4 * quad * target)) / (2 * quad)

    def edm_sigma(self, t):
        """sigma/alpha: the noise level of x/alpha (Karras et al.'s sigma; diffusers' `sigmas`)."""
        alpha, sigma = self.alpha_sigma(t)
        with np.errstate(divide="ignore"):
            return sigma / alpha

    def t_from_edm_sigma(self, s):
        """Inverse of edm_sigma (discrete: diffusers' `_sigma_to_t`, log-linear between training steps)."""
        s = np.asarray(s, dtype=np.float64)
        if np.any(s <= 0):
            raise ValueError("edm sigma must be positive")
        if self.kind == "discrete":
            log_sigmas = self._log_edm_sigmas
            finite = np.isfinite(log_sigmas)
            log_sigmas = log_sigmas[finite]
            log_s = np.log(s).reshape(-1)
            dists = log_s[None, :] - log_sigmas[:, None]
            low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, len(log_sigmas) - 2)
            high = low + 1
            w = np.clip((log_sigmas[low] - log_s) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
            return ((1 - w) * low + w * high).reshape(s.shape)
        if self.kind == "vp":
            return self._t_from_log_alpha(-0.5 * np.log1p(s * s))
        if self.kind == "subvp":
            alpha = (np.sqrt(s * s + 4) - s) / 2
            return self._t_from_log_alpha(np.log(alpha))
        if self.kind == "ve":
            return np.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return s / (1.0 + s)  # flow

    def derivatives(self, t):
        """(d alpha/dt, d sigma/dt) for the continuous kinds."""
        t = np.asarray(t, dtype=np.float64)
        alpha, sigma = self.alpha_sigma(t)
        if self.kind in ("vp", "subvp"):
            d_alpha = -0.5 * self.beta(t) * alpha
            d_sigma = -alpha * d_alpha / sigma if self.kind == "vp" else -2.0 * alpha * d_alpha
            return d_alpha, d_sigma
        if self.kind == "ve":
            return np.zeros_like(t), sigma * math.log(self.sigma_max / self.sigma_min)
        if self.kind == "flow":
            return -np.ones_like(t), np.ones_like(t)
        raise ValueError("derivatives are defined for continuous-time schedules only (not 'discrete')")

    def beta(self, t):
        """β(t) = beta_min + t·(beta_max - beta_min) of the VP / sub-VP SDEs."""
        if self.kind not in ("vp", "subvp"):
            raise ValueError("beta(t) is defined for VP and sub-VP schedules")
        return self.beta_min + np.asarray(t, dtype=np.float64) * (self.beta_max - self.beta_min)

    def sde(self, t):
        """(f, g²) of the forward SDE dx = f·x dt + g dW whose marginals are this schedule:
        f = alpha'/alpha, g² = d(sigma²)/dt - 2 f sigma²."""
        alpha, sigma = self.alpha_sigma(t)
        d_alpha, d_sigma = self.derivatives(t)
        f = d_alpha / alpha
        return f, 2 * sigma * d_sigma - 2 * f * sigma * sigma

    # model time ------------------------------------------------------------------------------------------
    def model_time(self, t):
        """What the model is called with at schedule time t: the training index (discrete), t·time_scale
        (VP / sub-VP / VE with time_input='t'), sigma(t) (VE, time_input='sigma'), t·num_train_timesteps
        (flow)."""
        t = np.asarray(t, dtype=np.float64)
        if self.kind == "discrete":
            return t.copy()
        if self.kind == "ve" and self.time_input == "sigma":
            return self.alpha_sigma(t)[1]
        if self.kind == "flow":
            return t * self.num_train_timesteps
        return t * self.time_scale

    def t_from_model_time(self, u):
        u = np.asarray(u, dtype=np.float64)
        if self.kind == "discrete":
            return u.copy()
        if self.kind == "ve" and self.time_input == "sigma":
            return np.log(u / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        if self.kind == "flow":
            return u / self.num_train_timesteps
        return u / self.time_scale

    def init_noise_scale(self, t=None):
        """Scale of the initial noise x_T = scale·z: sigma(t_max) for VE (x_T ~ N(0, sigma_max²)), else 1."""
        if self.kind == "ve":
            return float(self.alpha_sigma(self.t_max if t is None else t)[1])
        return 1.0
