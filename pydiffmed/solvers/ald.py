"""Annealed Langevin dynamics (Song & Ermon 2019, NCSN) on a VE schedule.

Noise levels sigma_1 > ... > sigma_L are geometric (the VE schedule at t = linspace(t_max, 0, L), so the last
level is sigma_min); at level i, `steps_per_level` Langevin steps
    x <- x + (a_i/2)·score(x, sigma_i) + sqrt(a_i)·z,     a_i = step_lr·sigma_i²/sigma_L²,
each one model evaluation; final_denoise adds one noise-free Tweedie step x <- x + sigma_L²·score(x, sigma_L)
(Jolicoeur-Martineau et al. 2021; NCSNv2's `denoise`). num_steps is the number of levels L.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Solver


class AnnealedLangevin(Solver):
    name = "ald"

    def __init__(self, schedule, num_steps, *, steps_per_level=5, step_lr=2e-5, final_denoise=True,
                 prediction_type="score", **common):
        if schedule.kind != "ve":
            raise ValueError("ald needs a VE schedule (NoiseSchedule.ve())")
        if isinstance(steps_per_level, bool) or int(steps_per_level) < 1:
            raise ValueError(f"steps_per_level must be a positive int, got {steps_per_level!r}")
        if not step_lr > 0:
            raise ValueError(f"step_lr must be positive, got {step_lr!r}")
        self.steps_per_level, self.step_lr = int(steps_per_level), float(step_lr)
        self.final_denoise = bool(final_denoise)
        super().__init__(schedule, num_steps, prediction_type=prediction_type, **common)
        self.init_noise_scale = float(self._levels()[1][0])

    def _levels(self):
        t = np.linspace(self.schedule.t_max, 0.0, self.num_steps)
        return t, self.schedule.alpha_sigma(t)[1]

    def _num_evals(self):
        return self.num_steps * self.steps_per_level + (1 if self.final_denoise else 0)

    def _score(self, program, e, sigma):
        if self.prediction_type == "score" and self.clip is None:
            return (0.0, 1.0, None), program.d(e)
        return self.x0_estimate(1.0, sigma), (program.d(e) - program.current) / (sigma * sigma)

    def _build(self, program):
        times, sigmas = self._levels()
        sigma_last = float(sigmas[-1])
        e = 0
        for t, sigma in zip(times, sigmas):
            sigma = float(sigma)
            step = self.step_lr * (sigma / sigma_last) ** 2
            for _ in range(self.steps_per_level):
                estimate, score = self._score(program, e, sigma)
                target = program.current + 0.5 * step * score + math.sqrt(step) * program.z(e)
                program.add(self.schedule.model_time(t), estimate, target, coef_fn=self.estimate_coef_fn)
                e += 1
        if self.final_denoise:
            estimate, score = self._score(program, e, sigma_last)
            program.add(self.schedule.model_time(times[-1]), estimate,
                        program.current + sigma_last ** 2 * score, coef_fn=self.estimate_coef_fn)
