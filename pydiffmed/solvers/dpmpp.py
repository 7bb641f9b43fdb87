"""DPM-Solver++ multistep (Lu et al. 2022), data prediction: dpmpp_2m, dpmpp_3m, dpmpp_2m_sde.

With lambda = log(alpha/sigma), h = lambda_t - lambda_s0, r_k = h_k/h and D_k the x0 estimates:
  1st order: x_t = (sigma_t/sigma_s)·x - alpha_t·(e^{-h} - 1)·D0
  2M:        adds -½·alpha_t·(e^{-h} - 1)·(D0 - D1)/r0   (midpoint; solver_type='heun' the other variant)
  3M:        the third-order multistep update with D1, D2 divided differences
  2M SDE:    x_t = (sigma_t/sigma_s·e^{-h})·x + alpha_t·(1 - e^{-2h})·(D0 + ½·(D0 - D1)/r0)
             + sigma_t·sqrt(1 - e^{-2h})·z
The first step(s) use lower orders (warm-up); with lower_order_final the last steps fall back to lower
orders when there are fewer than 15 steps, and the final step to sigma = 0 is first order (it returns the x0
estimate) — as diffusers' DPMSolverMultistepScheduler does, whose grids (spacing, Karras, uniform log-SNR)
`multistep_grid` reproduces for discrete schedules.
"""
from __future__ import annotations

import math

import numpy as np

from ._grids import CutGridMixin, multistep_grid
from .base import Solver


class DPMSolverPP(CutGridMixin, Solver):
    name = "dpmpp"

    def __init__(self, schedule, num_steps, *, order=2, sde=False, solver_type="midpoint", grid="uniform",
                 spacing=None, steps_offset=0, final="zero", lower_order_final=True, euler_at_final=False,
                 **common):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if sde and order == 3:
            raise ValueError("the SDE variant supports orders 1 and 2")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.order, self.sde, self.solver_type = int(order), bool(sde), solver_type
        self.grid, self.spacing, self.steps_offset, self.final = grid, spacing, int(steps_offset), final
        self.lower_order_final, self.euler_at_final = bool(lower_order_final), bool(euler_at_final)
        self._model_t, self._alpha, self._sigma = multistep_grid(
            schedule, num_steps, grid=grid, spacing=spacing, steps_offset=steps_offset, final=final)
        super().__init__(schedule, num_steps, **common)

    def _num_evals(self):
        return len(self._model_t)

    def _lambda(self, k):
        with np.errstate(divide="ignore"):
            return math.log(self._alpha[k]) - (math.log(self._sigma[k]) if self._sigma[k] > 0 else -math.inf)

    def _build(self, program):
        n = self._num_evals()
        final_zero = self._sigma[n] == 0
        lower_order_nums = 0
        outputs = []
        for i in range(n):
            lower_final = i == n - 1 and (self.euler_at_final or (self.lower_order_final and self._grid_evals < 15)
                                          or final_zero)
            lower_second = i == n - 2 and self.lower_order_final and self._grid_evals < 15
            d = program.d(i)
            outputs.append(d)
            x = program.current
            zero_length = self._sigma[i + 1] == self._sigma[i] and self._alpha[i + 1] == self._alpha[i]
            if zero_length:
                # a repeated grid point (a Karras grid ending at final='sigma_min'; diffusers' linspace grid
                # rounds two timesteps to one at ~1000 steps): the identity, and the next step restarts at
                # first order (diffusers divides by the zero step there and returns NaN)
                target = x
            elif self.order == 1 or lower_order_nums < 1 or lower_final:
                target = self._first_order(i, x, d, program)
            elif self.order == 2 or lower_order_nums < 2 or lower_second:
                target = self._second_order(i, x, outputs[-1], outputs[-2], program)
            else:
                target = self._third_order(i, x, outputs[-1], outputs[-2], outputs[-3])
            lower_order_nums = 0 if zero_length else min(lower_order_nums + 1, self.order)
            keep = outputs[-(self.order - 1):] if self.order > 1 else []
            program.add(self._model_t[i], self.x0_estimate(self._alpha[i], self._sigma[i]), target, keep=keep,
                        coef_fn=self.estimate_coef_fn)

    def _coeffs(self, i):
        alpha_t, sigma_t, sigma_s = self._alpha[i + 1], self._sigma[i + 1], self._sigma[i]
        h = self._lambda(i + 1) - self._lambda(i)
        return alpha_t, sigma_t, sigma_s, h

    def _noise(self, i, sigma_t, h, program):
        return sigma_t * math.sqrt(-math.expm1(-2.0 * h)) * program.z(i)

    def _first_order(self, i, x, d, program):
        alpha_t, sigma_t, sigma_s, h = self._coeffs(i)
        if self.sde:
            return (sigma_t / sigma_s * math.exp(-h)) * x - alpha_t * math.expm1(-2.0 * h) * d \
                + self._noise(i, sigma_t, h, program)
        return (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d

    def _second_order(self, i, x, m0, m1, program):
        alpha_t, sigma_t, sigma_s, h = self._coeffs(i)
        r0 = (self._lambda(i) - self._lambda(i - 1)) / h
        d1 = (m0 - m1) / r0
        if self.sde:
            base = (sigma_t / sigma_s * math.exp(-h)) * x - alpha_t * math.expm1(-2.0 * h) * m0
            if self.solver_type == "midpoint":
                corr = -0.5 * alpha_t * math.expm1(-2.0 * h) * d1
            else:
                corr = alpha_t * (math.expm1(-2.0 * h) / (2.0 * h) + 1.0) * d1
            return base + corr + self._noise(i, sigma_t, h, program)
        base = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * m0
        if self.solver_type == "midpoint":
            return base - 0.5 * alpha_t * math.expm1(-h) * d1
        return base + alpha_t * (math.expm1(-h) / h + 1.0) * d1

    def _third_order(self, i, x, m0, m1, m2):
        alpha_t, sigma_t, sigma_s, h = self._coeffs(i)
        h0 = self._lambda(i) - self._lambda(i - 1)
        h1 = self._lambda(i - 1) - self._lambda(i - 2)
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        em1 = math.expm1(-h)
        return (sigma_t / sigma_s) * x - alpha_t * em1 * m0 + alpha_t * (em1 / h + 1.0) * d1 \
            - alpha_t * ((em1 + h) / h ** 2 - 0.5) * d2


class DPMSolverPP2M(DPMSolverPP):
    name = "dpmpp_2m"

    def __init__(self, schedule, num_steps, **opts):
        super().__init__(schedule, num_steps, order=opts.pop("order", 2), **opts)


class DPMSolverPP3M(DPMSolverPP):
    name = "dpmpp_3m"

    def __init__(self, schedule, num_steps, **opts):
        super().__init__(schedule, num_steps, order=opts.pop("order", 3), **opts)


class DPMSolverPP2MSDE(DPMSolverPP):
    name = "dpmpp_2m_sde"

    def __init__(self, schedule, num_steps, **opts):
        super().__init__(schedule, num_steps, order=opts.pop("order", 2), sde=True, **opts)
