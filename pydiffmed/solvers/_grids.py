"""Time grids shared by the solver families."""
from __future__ import annotations

import numpy as np

from ..schedules import SPACINGS, karras_sigmas, spaced_timesteps

CONTINUOUS_SPACINGS = ("time", "logsnr", "karras")


def check_spacing(schedule, spacing):
    allowed = SPACINGS if schedule.kind == "discrete" else CONTINUOUS_SPACINGS
    if spacing not in allowed:
        raise ValueError(f"spacing must be one of {allowed} for a {schedule.kind} schedule, got {spacing!r}")


def continuous_points(schedule, n, spacing="time", rho=7.0):
    """n points from t_max down to t_min (inclusive), uniform in t, in log-SNR, or on the Karras grid."""
    if n < 2:
        return np.array([schedule.t_max]) if n == 1 else np.zeros(0)
    if spacing == "time":
        return np.linspace(schedule.t_max, schedule.t_min, n)
    s_max, s_min = schedule.edm_sigma(schedule.t_max), schedule.edm_sigma(schedule.t_min)
    if not (np.isfinite(s_max) and s_min > 0):
        raise ValueError(f"{spacing} spacing needs finite, positive sigma/alpha at both ends of [t_min, t_max]")
    if spacing == "logsnr":
        sigmas = np.exp(np.linspace(np.log(s_max), np.log(s_min), n))
    elif spacing == "karras":
        sigmas = karras_sigmas(float(s_min), float(s_max), n, rho)
    else:
        raise ValueError(f"unknown continuous spacing {spacing!r}")
    t = schedule.t_from_edm_sigma(sigmas)
    t[0], t[-1] = schedule.t_max, schedule.t_min
    return t


def eval_times_and_end(schedule, n, spacing, final, steps_offset=0):
    """Model-evaluation times (n,) and the end point of an n-step sampler that steps t_i -> t_{i+1}.

    final='clean': the last step goes to the data (alpha=1, sigma=0); returned end None.
    final='t_min': the grid has n+1 points and ends at t_min (continuous schedules) / t=0 (discrete).
    Discrete schedules use the named training-step spacing (`leading`, `trailing`, `linspace`, `monai`)."""
    if final not in ("clean", "t_min"):
        raise ValueError(f"final must be 'clean' or 't_min', got {final!r}")
    if schedule.kind == "discrete":
        if final == "t_min":
            times = spaced_timesteps(schedule.num_train_timesteps, n + 1, spacing, steps_offset).astype(np.float64)
            return times[:-1], float(times[-1])
        return spaced_timesteps(schedule.num_train_timesteps, n, spacing, steps_offset).astype(np.float64), None
    if final == "t_min":
        points = continuous_points(schedule, n + 1, spacing)
        return points[:-1], float(points[-1])
    return continuous_points(schedule, n, spacing), None


def alpha_sigma_at(schedule, t):
    """(alpha, sigma) at t, or the clean data (1, 0) for t None."""
    if t is None:
        return 1.0, 0.0
    a, s = schedule.alpha_sigma(t)
    return float(a), float(s)


def diffusers_sigma_to_t(sigma, log_sigmas):
    """diffusers' `_sigma_to_t`: fractional training timestep of each sigma by log-linear interpolation
    (log_sigmas float32 as theirs, so the mixed-precision arithmetic matches)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.clip(np.cumsum(dists >= 0, axis=0).argmax(axis=0), None, len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


MULTISTEP_GRIDS = ("uniform", "karras", "logsnr")


def multistep_grid(schedule, n, *, grid="uniform", spacing=None, steps_offset=0, final="zero", variant="dpm"):
    """Model times (n,) and alpha, sigma (n+1,) of a multistep solver whose last step ends at `final`.

    Discrete schedules follow diffusers' DPMSolverMultistep (variant 'dpm') / UniPCMultistep ('unipc')
    exactly: `spacing` (default 'linspace', over n+1 points with the last dropped, except 'trailing'),
    grid 'uniform' (sigma interpolated at the timesteps), 'karras' (rho = 7 between the training sigmas'
    ends, timesteps rounded) or 'logsnr' (uniform log sigma; diffusers' use_lu_lambdas); sigmas rounded to
    fp32 like theirs and computed from alpha_bar stored in fp32 as theirs is; a zero-terminal-SNR alpha_bar is
    floored at 2^-24 as they do. final: 'zero' (sigma = 0, the last step returns the x0 estimate) or
    'sigma_min'.
    Continuous schedules: grid 'uniform' (in t), 'karras' or 'logsnr' between t_max and t_min; final 'zero'
    (n points, then sigma = 0) or 't_min' (n + 1 points ending at t_min)."""
    if grid not in MULTISTEP_GRIDS:
        raise ValueError(f"grid must be one of {MULTISTEP_GRIDS}, got {grid!r}")
    if schedule.kind == "discrete":
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min' for a discrete schedule, got {final!r}")
        spacing = spacing or "linspace"
        if spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"spacing must be linspace, leading or trailing, got {spacing!r}")
        ac = schedule.fp32_alphas_cumprod()
        if ac[-1] == 0:
            ac[-1] = 2.0 ** -24
        train_sigmas = _fp32_train_sigmas(ac)
        log_sigmas = np.log(train_sigmas)
        n_train = len(ac)
        times = spaced_timesteps(n_train, n, spacing, steps_offset, extra_point=True).astype(np.float64)
        if grid == "uniform":
            sigmas = np.interp(times, np.arange(n_train), train_sigmas)
        else:
            if grid == "karras":
                sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), n)
            else:
                lam_max, lam_min = float(log_sigmas[-1]), float(log_sigmas[0])
                sigmas = np.exp(lam_max + np.linspace(0, 1, n) * (lam_min - lam_max))
            times = diffusers_sigma_to_t(sigmas, log_sigmas)
            if variant == "dpm" and getattr(schedule, "beta_schedule", None) == "cosine":
                times = np.floor(times)  # diffusers leaves them unrounded, then casts to int64
            else:
                times = np.round(times)
        if final == "zero":
            last = 0.0
        elif variant == "unipc" and grid == "karras":
            last = sigmas[-1]
        else:
            last = train_sigmas[0]
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        alpha = 1.0 / np.sqrt(sigmas ** 2 + 1.0)
        return times.astype(np.int64).astype(np.float64), alpha, sigmas * alpha
    if final not in ("zero", "t_min"):
        raise ValueError(f"final must be 'zero' or 't_min' for a continuous schedule, got {final!r}")
    spacing = {"uniform": "time"}.get(grid, grid)
    if final == "t_min":
        points = continuous_points(schedule, n + 1, spacing)
        alpha, sigma = schedule.alpha_sigma(points)
        return schedule.model_time(points[:-1]), alpha, sigma
    points = continuous_points(schedule, n, spacing)
    alpha, sigma = schedule.alpha_sigma(points)
    return schedule.model_time(points), np.append(alpha, 1.0), np.append(sigma, 0.0)


def alpha_of_edm_sigma(schedule, s):
    """alpha at the time where sigma/alpha = s (so x_t = alpha·x_sigma)."""
    s = np.asarray(s, dtype=np.float64)
    if schedule.kind in ("discrete", "vp"):
        return 1.0 / np.sqrt(1.0 + s * s)
    if schedule.kind == "subvp":
        return (np.sqrt(s * s + 4.0) - s) / 2.0
    if schedule.kind == "ve":
        return np.ones_like(s)
    return 1.0 / (1.0 + s)  # flow


SIGMA_GRIDS = ("karras", "uniform", "logsnr")


def sigma_grid(schedule, n, *, grid="karras", spacing="linspace", steps_offset=0, final="zero", rho=7.0):
    """Model times (n,) and Karras-style sigmas = sigma/alpha (n+1,) for the EDM / Euler / Heun family.

    Discrete schedules reproduce diffusers' Euler/Heun discrete schedulers: `spacing` timesteps (float, not
    rounded, for linspace), sigmas linearly interpolated at them from the fp32 training sigmas ('uniform'),
    or the Karras / log-uniform grid between those interpolated ends with timesteps from `_sigma_to_t`
    (fractional). final 'zero' appends sigma = 0, 'sigma_min' the smallest training sigma.
    Continuous schedules: the grid between sigma(t_max) and sigma(t_min); final 'zero' (n points, then 0)
    or 't_min' (n + 1 points)."""
    if grid not in SIGMA_GRIDS:
        raise ValueError(f"grid must be one of {SIGMA_GRIDS}, got {grid!r}")
    if schedule.kind == "discrete":
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min' for a discrete schedule, got {final!r}")
        if spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"spacing must be linspace, leading or trailing, got {spacing!r}")
        ac = schedule.fp32_alphas_cumprod()
        if ac[-1] == 0:
            raise ValueError("sigma-space solvers need a finite terminal sigma (no zero-terminal-SNR schedule)")
        train_sigmas = _fp32_train_sigmas(ac)
        log_sigmas = np.log(train_sigmas)
        n_train = len(ac)
        times = spaced_timesteps(n_train, n, spacing, steps_offset, integer=False).astype(np.float32)
        sigmas = np.interp(times.astype(np.float64), np.arange(n_train), train_sigmas)
        if grid == "karras":
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], n, rho)
            times = diffusers_sigma_to_t(sigmas, log_sigmas)
        elif grid == "logsnr":
            sigmas = np.exp(np.linspace(np.log(sigmas[0]), np.log(sigmas[-1]), n))
            times = diffusers_sigma_to_t(sigmas, log_sigmas)
        last = 0.0 if final == "zero" else train_sigmas[0]
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        return np.asarray(times, dtype=np.float32).astype(np.float64), sigmas
    if final not in ("zero", "t_min"):
        raise ValueError(f"final must be 'zero' or 't_min' for a continuous schedule, got {final!r}")
    spacing = {"uniform": "time"}.get(grid, grid)
    count = n + 1 if final == "t_min" else n
    points = continuous_points(schedule, count, spacing, rho)
    sigmas = schedule.edm_sigma(points)
    if final == "zero":
        sigmas = np.append(sigmas, 0.0)
    return schedule.model_time(points[:n]), sigmas


def model_time_of_edm_sigma(schedule, s):
    """The model time at sigma/alpha = s (discrete: diffusers' _sigma_to_t over the fp32 training sigmas)."""
    if schedule.kind == "discrete":
        return diffusers_sigma_to_t(s, np.log(_fp32_train_sigmas(schedule.fp32_alphas_cumprod())))
    return schedule.model_time(schedule.t_from_edm_sigma(s))


def _fp32_train_sigmas(alphas_cumprod):
    """sqrt((1 - ab)/ab) evaluated and kept in float32 as diffusers does (its grids and _sigma_to_t use
    these, with numpy's float32/float64 promotion)."""
    import torch

    ab = torch.tensor(alphas_cumprod, dtype=torch.float32)
    return (((1 - ab) / ab) ** 0.5).numpy()


class CutGridMixin:
    """For solvers on a `multistep_grid` (arrays _model_t, _alpha, _sigma): `Solver.starting_at` cuts the grid.
    _begin_step counts the steps cut; _grid_evals is the uncut length (diffusers' len(timesteps))."""

    _begin_step = 0

    @property
    def _grid_evals(self):
        return self._begin_step + len(self._model_t)

    def _drop_steps(self, step):
        self._model_t, self._alpha, self._sigma = self._model_t[step:], self._alpha[step:], self._sigma[step:]
        self._begin_step += step
