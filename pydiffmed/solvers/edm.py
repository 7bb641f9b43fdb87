"""Karras et al. (2022) samplers in sigma space: edm_euler and edm_heun (2nd order), with optional churn.

In sigma = sigma_t/alpha_t and x_sigma = x_t/alpha_t the probability-flow ODE is dx/dsigma = (x - D)/sigma.
The solver state stays in the model's input space (x_t = alpha·x_sigma, the change of variables diffusers'
Euler/Heun schedulers apply with scale_model_input), so every row acts on x_t directly.

Churn (s_churn > 0, for sigma in [s_tmin, s_tmax]): sigma_hat = sigma·(1 + gamma), gamma =
min(s_churn/n, sqrt(2) - 1), and noise of std s_noise·sqrt(sigma_hat² - sigma²) is added.
churn_mode='edm' (default, Karras et al. / k-diffusion): the noise is added before the model evaluation, which
happens at sigma_hat (so the noise is drawn in the previous step's fused_step). churn_mode='diffusers'
reproduces diffusers' EulerDiscreteScheduler, which evaluates the model on the un-churned sample at sigma and
adds the noise afterwards (x0 from the noised sample and sigma_hat).

Heun's last step to sigma = 0 is an Euler step (2n - 1 evaluations), as in the paper, k-diffusion and diffusers'
HeunDiscreteScheduler. Grids: `sigma_grid` (Karras by default; 'uniform' is diffusers' default timestep grid).
"""
from __future__ import annotations

import math

import numpy as np

from ._grids import alpha_of_edm_sigma, model_time_of_edm_sigma, sigma_grid
from .base import Solver


class _EDMBase(Solver):
    def __init__(self, schedule, num_steps, *, grid="karras", spacing="linspace", steps_offset=0, final="zero",
                 rho=7.0, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, churn_mode="edm", **common):
        if churn_mode not in ("edm", "diffusers"):
            raise ValueError(f"churn_mode must be 'edm' or 'diffusers', got {churn_mode!r}")
        if s_churn < 0 or s_noise < 0:
            raise ValueError("s_churn and s_noise must be non-negative")
        self.grid, self.spacing, self.steps_offset, self.final = grid, spacing, int(steps_offset), final
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = float(s_churn), float(s_tmin), float(s_tmax), \
            float(s_noise)
        self.churn_mode = churn_mode
        self._grid_times, self._sigmas = sigma_grid(schedule, num_steps, grid=grid, spacing=spacing,
                                                    steps_offset=steps_offset, final=final, rho=rho)
        n = len(self._grid_times)
        self._sigma_hat = np.array([
            s * (1 + (min(self.s_churn / n, math.sqrt(2) - 1) if self.s_tmin <= s <= self.s_tmax else 0.0))
            for s in self._sigmas[:-1]])
        super().__init__(schedule, num_steps, **common)
        if churn_mode == "edm" and self.schedule.kind == "ve":
            self.init_noise_scale = float(self._sigma_hat[0])

    def _alpha(self, s):
        return float(alpha_of_edm_sigma(self.schedule, s))

    def _model_time(self, i, sigma):
        if sigma == self._sigmas[i]:
            return self._grid_times[i]
        return float(model_time_of_edm_sigma(self.schedule, np.array([sigma]))[0])

    def _estimate_at(self, sigma, churned_from=None):
        """(p_x, p_m, clip) for x0 at edm sigma with x_t = alpha(sigma)·x_sigma (churned_from: diffusers'
        churn, model evaluated at churned_from but x0 formed with sigma)."""
        base = sigma if churned_from is None else churned_from
        alpha = self._alpha(base)
        if churned_from is not None and self.prediction_type == "epsilon":
            return 1.0 / alpha, -sigma, self.clip
        return self.x0_estimate(alpha, base * alpha)

    def _churn_noise(self, i):
        """std of the churn noise added at step i (in x_sigma units)."""
        return self.s_noise * math.sqrt(max(self._sigma_hat[i] ** 2 - self._sigmas[i] ** 2, 0.0))

    def _enter(self, program, e, x_sigma, i_next):
        """The state vector (x_t) entering step i_next: churned at sigma_hat (edm mode) or at sigma."""
        if i_next >= len(self._grid_times):
            return self._alpha(self._sigmas[i_next]) * x_sigma
        if self.churn_mode == "edm" and self._sigma_hat[i_next] > self._sigmas[i_next]:
            x_sigma = x_sigma + self._churn_noise(i_next) * program.z(e)
            return self._alpha(self._sigma_hat[i_next]) * x_sigma
        return self._alpha(self._sigmas[i_next]) * x_sigma

    def _eval_sigma(self, i):
        return self._sigma_hat[i] if self.churn_mode == "edm" else self._sigmas[i]


class EDMEuler(_EDMBase):
    name = "edm_euler"

    def _num_evals(self):
        return len(self._grid_times)

    def _build(self, program):
        n = len(self._grid_times)
        for i in range(n):
            sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
            s_eval = self._eval_sigma(i)
            x_sigma = program.current / self._alpha(s_eval)
            d = program.d(i)
            if self.churn_mode == "diffusers" and self._sigma_hat[i] > sigma:
                sigma_hat = self._sigma_hat[i]
                k = self._churn_noise(i)
                x_sigma = x_sigma + k * program.z(i)
                if self.prediction_type == "epsilon":
                    x0 = d + k * program.z(i)
                elif self.prediction_type == "v_prediction":
                    x0 = d + k / (sigma * sigma + 1.0) * program.z(i)
                else:
                    x0 = d
                estimate = self._estimate_at(sigma_hat, churned_from=sigma)
            else:
                sigma_hat = s_eval
                x0 = d
                estimate = self._estimate_at(s_eval)
            x_next = x_sigma + (sigma_next - sigma_hat) * (x_sigma - x0) / sigma_hat
            target = self._enter(program, i, x_next, i + 1)
            program.add(self._model_time(i, s_eval), estimate, target, coef_fn=self.estimate_coef_fn)


class EDMHeun(_EDMBase):
    name = "edm_heun"

    def __init__(self, schedule, num_steps, **opts):
        if opts.get("churn_mode", "edm") != "edm":
            raise ValueError("edm_heun supports churn_mode='edm' only")
        super().__init__(schedule, num_steps, **opts)

    def _num_evals(self):
        n = len(self._grid_times)
        return 2 * n - (1 if self._sigmas[n] == 0 else 0)

    def _build(self, program):
        n = len(self._grid_times)
        e = 0
        for i in range(n):
            sigma_hat, sigma_next = self._sigma_hat[i], self._sigmas[i + 1]
            start = program.current
            x_hat = start / self._alpha(sigma_hat)
            d1 = (x_hat - program.d(e)) / sigma_hat
            x_euler = x_hat + (sigma_next - sigma_hat) * d1
            if sigma_next == 0:
                program.add(self._model_time(i, sigma_hat), self._estimate_at(sigma_hat), x_euler,
                            coef_fn=self.estimate_coef_fn)
                e += 1
                continue
            program.add(self._model_time(i, sigma_hat), self._estimate_at(sigma_hat),
                        self._alpha(sigma_next) * x_euler, keep=[start], coef_fn=self.estimate_coef_fn)
            e += 1
            d2 = (x_euler - program.d(e)) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (d1 + d2) / 2
            target = self._enter(program, e, x_next, i + 1)
            time_next = self._grid_times[i + 1] if i + 1 < n else float(
                model_time_of_edm_sigma(self.schedule, np.array([sigma_next]))[0])
            program.add(time_next, self._estimate_at(sigma_next), target, coef_fn=self.estimate_coef_fn)
            e += 1
