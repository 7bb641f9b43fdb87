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
