"""Probability-flow ODE solvers: ode_heun, ode_rk4 (fixed steps) and ode_dopri5 (adaptive, eager only).

For any schedule x_t = alpha·x0 + sigma·eps, in s = sigma/alpha and y = x/alpha the probability-flow ODE is
    dy/ds = (y - D(alpha(s)·y, t(s)))/s,       D = E[x0 | x_t] (the model's x0 estimate)
(Karras et al. 2022, who show this variable gives the smallest truncation error of the common choices). The
fixed-step solvers integrate it in s (every kind: discrete VP through its log-linear sigma interpolation, VP,
sub-VP, VE, flow); the adaptive one in log s (dy/dlog s = y - D). The state stays in the model's input space
(x = alpha·y); the grid runs from t_max to t_min (uniform in t by default, or 'logsnr' / 'karras'), and
denoise=True adds a final evaluation that returns the x0 estimate at t_min.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ops.fused_step import philox_keys, philox_normal
from ..schedules import NoiseSchedule
from ._grids import alpha_of_edm_sigma, continuous_points
from .base import Solver


def _log_sigma_grid(schedule, n, spacing):
    """n + 1 grid times t_max -> t_min and their u = log(sigma/alpha)."""
    if schedule.kind == "discrete":
        if spacing == "time":
            times = np.linspace(schedule.t_max, schedule.t_min, n + 1)
        else:
            s_max, s_min = schedule.edm_sigma(schedule.t_max), schedule.edm_sigma(schedule.t_min)
            if spacing == "logsnr":
                sig = np.exp(np.linspace(np.log(s_max), np.log(s_min), n + 1))
            else:
                from ..schedules import karras_sigmas
                sig = karras_sigmas(float(s_min), float(s_max), n + 1)
            times = schedule.t_from_edm_sigma(sig)
            times[0], times[-1] = schedule.t_max, schedule.t_min
    else:
        times = continuous_points(schedule, n + 1, spacing)
    sig = schedule.edm_sigma(times)
    if not np.all(np.isfinite(sig)) or np.any(sig <= 0):
        raise ValueError("the probability-flow ODE solvers need 0 < sigma/alpha < inf on [t_min, t_max] "
                         "(no zero terminal SNR; flows need t_max < 1 and t_min > 0)")
    return times, np.log(sig)


class _ODESolver(Solver):
    stages = 1

    def __init__(self, schedule, num_steps, *, spacing="time", denoise=False, **common):
        self.spacing, self.denoise = spacing, bool(denoise)
        self._times, self._u = _log_sigma_grid(schedule, int(num_steps), spacing)
        super().__init__(schedule, num_steps, **common)
        self.init_noise_scale = schedule.init_noise_scale(self._times[0])

    def _num_evals(self):
        return self.num_steps * self.stages + (1 if self.denoise else 0)

    def _at(self, u, exact_t=None):
        """(alpha, sigma, model time) at log-sigma u (exact_t: a grid time, used as is)."""
        t = exact_t if exact_t is not None else float(self.schedule.t_from_edm_sigma(math.exp(u)))
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        return alpha, sigma, float(self.schedule.model_time(t))

    def _add(self, program, u, exact_t, target_y, u_next, exact_next, keep=()):
        """One evaluation at u whose target is y-vector target_y living at u_next."""
        alpha, sigma, model_time = self._at(u, exact_t)
        alpha_next = self._at(u_next, exact_next)[0]
        program.add(model_time, self.x0_estimate(alpha, sigma), alpha_next * target_y, keep=keep,
                    coef_fn=self.estimate_coef_fn)

    def _finish(self, program, e):
        if self.denoise:
            alpha, sigma, model_time = self._at(self._u[-1], self._times[-1])
            program.add(model_time, self.x0_estimate(alpha, sigma), program.d(e),
                        coef_fn=self.estimate_coef_fn)


class ODEHeun(_ODESolver):
    name = "ode_heun"
    stages = 2

    def _build(self, program):
        e = 0
        for i in range(self.num_steps):
            u0, u1, t0, t1 = self._u[i], self._u[i + 1], self._times[i], self._times[i + 1]
            s0, s1 = math.exp(u0), math.exp(u1)
            h = s1 - s0
            start = program.current
            y = start / self._at(u0, t0)[0]
            k1 = (y - program.d(e)) / s0
            y_euler = y + h * k1
            self._add(program, u0, t0, y_euler, u1, t1, keep=[start])
            e += 1
            k2 = (y_euler - program.d(e)) / s1
            self._add(program, u1, t1, y + 0.5 * h * (k1 + k2), u1, t1)
            e += 1
        self._finish(program, e)


class ODERK4(_ODESolver):
    name = "ode_rk4"
    stages = 4

    def _build(self, program):
        e = 0
        for i in range(self.num_steps):
            u0, u1, t0, t1 = self._u[i], self._u[i + 1], self._times[i], self._times[i + 1]
            s0, s1 = math.exp(u0), math.exp(u1)
            h, sm = s1 - s0, 0.5 * (s0 + s1)
            um = math.log(sm)
            start = program.current
            y = start / self._at(u0, t0)[0]
            k1 = (y - program.d(e)) / s0
            self._add(program, u0, t0, y + 0.5 * h * k1, um, None, keep=[start, program.d(e)])
            e += 1
            k2 = (y + 0.5 * h * k1 - program.d(e)) / sm
            self._add(program, um, None, y + 0.5 * h * k2, um, None, keep=[start, program.d(e - 1), program.d(e)])
            e += 1
            k3 = (y + 0.5 * h * k2 - program.d(e)) / sm
            self._add(program, um, None, y + h * k3, u1, t1, keep=[start, program.d(e - 2), program.d(e - 1)])
            e += 1
            k4 = (y + h * k3 - program.d(e)) / s1
            self._add(program, u1, t1, y + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4), u1, t1)
            e += 1
        self._finish(program, e)


# Dormand-Prince 5(4) tableau
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


class ODEDopri5(Solver):
    """Adaptive Dormand-Prince 5(4) on the probability-flow ODE (eager only; one step size for the batch).

    sample(model, x_T) -> (x, nfe): integrates from t_max to t_min in u = log(sigma/alpha) with tolerances
    rtol/atol on y = x/alpha (RMS norm over all elements, like scipy's RK45); the state dtype is x_T's (use
    float64 for reference solutions). denoise=True returns the x0 estimate at t_min (one more evaluation).
    Adaptive: no num_steps, no fixed plan (plan(), step() and starting_at() raise ValueError); timesteps is None
    and num_model_evals is None until a sample() sets it."""
    name = "ode_dopri5"
    plannable = False
    can_start_partway = False
    adaptive = True
    timesteps = None
    num_model_evals = None

    def __init__(self, schedule, num_steps=None, *, rtol=1e-5, atol=1e-5, prediction_type="epsilon", clip=None,
                 denoise=False, first_step=None, max_steps=100000, safety=0.9):
        from .. import prediction

        if num_steps is not None:
            raise ValueError(f"{self.name} is adaptive: it picks its own steps and takes no num_steps (rtol/atol "
                             f"set its accuracy)")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a pydiffmed.schedules.NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.num_steps = None
        self.prediction_type = prediction.canonical(prediction_type)
        self.rtol, self.atol, self.clip, self.denoise = float(rtol), float(atol), clip, bool(denoise)
        self.first_step, self.max_steps, self.safety = first_step, int(max_steps), float(safety)
        times, u = _log_sigma_grid(schedule, 1, "time")
        self._t0, self._t1, self._u0, self._u1 = times[0], times[-1], u[0], u[-1]
        self.init_noise_scale = schedule.init_noise_scale(self._t0)
        self._eager = {}

    # no fixed program: what a planned solver builds, steps through or cuts does not exist here
    def _num_evals(self):
        raise ValueError(self.unsupported("plan"))

    def _build(self, program):
        raise ValueError(self.unsupported("plan"))

    @property
    def coefficient_table(self):
        raise ValueError(self.unsupported("plan"))

    def step(self, i, x, model_output, noise=None, *, seeds=None):
        raise ValueError(self.unsupported("plan"))

    def initial_noise(self, shape, seed=0, seeds=None, device=None):
        """x_T = init_noise_scale · philox_normal(seeds, step=0) (there is no fixed evaluation count)."""
        seeds = philox_keys(int(seed), shape[0]).to(device) if seeds is None else seeds
        return philox_normal(seeds, 0, shape, device=device) * self.init_noise_scale

    def _at(self, u):
        if u == self._u0:
            t = self._t0
        elif u == self._u1:
            t = self._t1
        else:
            t = float(self.schedule.t_from_edm_sigma(math.exp(u)))
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(t))
        return alpha, sigma, float(self.schedule.model_time(t))

    def _denoise(self, model, x, u):
        from .. import prediction

        alpha, sigma, model_time = self._at(u)
        m = model(x, torch.full((x.shape[0],), model_time, dtype=torch.float32, device=x.device))
        p_x, p_m = prediction.x0_coefs(self.prediction_type, alpha, sigma)
        x0 = p_x * x + p_m * m.to(x.dtype)
        return x0.clamp(-self.clip, self.clip) if self.clip is not None else x0

    def sample(self, model, x_T):
        nfe = 0

        def f(u, y):
            nonlocal nfe
            nfe += 1
            alpha = float(alpha_of_edm_sigma(self.schedule, math.exp(u)))
            return y - self._denoise(model, alpha * y, u)

        u, u_end = self._u0, self._u1
        y = x_T / self._at(u)[0]
        direction = -1.0 if u_end < u else 1.0
        span = abs(u_end - u)
        k1 = f(u, y)
        h = self.first_step if self.first_step is not None else self._initial_step(y, k1, span)
        steps = 0
        while direction * (u_end - u) > 1e-12 * max(1.0, span):
            h = min(h, abs(u_end - u))
            ks = [k1]
            for s in range(1, 7):
                y_stage = y + direction * h * sum(a * k for a, k in zip(_A[s], ks) if a != 0.0)
                ks.append(f(u + direction * h * _C[s], y_stage))
            y_new = y + direction * h * sum(b * k for b, k in zip(_B5, ks) if b != 0.0)
            err = direction * h * sum((b5 - b4) * k for b5, b4, k in zip(_B5, _B4, ks))
            scale = self.atol + self.rtol * torch.maximum(y.abs(), y_new.abs())
            err_norm = float(torch.sqrt(torch.mean((err / scale) ** 2)))
            if err_norm <= 1.0:
                u = u + direction * h
                y, k1 = y_new, ks[6]
            factor = 10.0 if err_norm == 0 else min(10.0, max(0.2, self.safety * err_norm ** -0.2))
            h = h * factor
            steps += 1
            if steps > self.max_steps:
                raise RuntimeError("ode_dopri5: too many steps (tighten nothing or raise max_steps)")
        x = self._at(self._u1)[0] * y
        if self.denoise:
            nfe += 1
            x = self._denoise(model, x, self._u1)
        self.num_model_evals = nfe
        return x, nfe

    def _initial_step(self, y, k1, span):
        scale = self.atol + self.rtol * y.abs()
        d0 = float(torch.sqrt(torch.mean((y / scale) ** 2)))
        d1 = float(torch.sqrt(torch.mean((k1 / scale) ** 2)))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        return min(h0, span)
