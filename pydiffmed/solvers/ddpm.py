"""DDPM ancestral sampling (Ho et al. 2020) on any schedule, with fixed or learned variances.

Each step samples the Gaussian posterior q(x_s | x_t, x0 = x0_estimate):
    mean = alpha_s·sigma_ts²/sigma_t² · x0 + alpha_ts·sigma_s²/sigma_t² · x_t,   alpha_ts = alpha_t/alpha_s,
    sigma_ts² = sigma_t² - alpha_ts²·sigma_s²  (= beta_t over the stride for discrete VP schedules),
    variance  = sigma_ts²·sigma_s²/sigma_t² (fixed_small) or sigma_ts² (fixed_large),
which for discrete schedules is exactly diffusers' DDPMScheduler (posterior between consecutive grid
timesteps; noise is drawn while t > 0).

Grids: discrete schedules use `spacing` (default 'leading' as diffusers; 'monai' = MONAI's grid) and
`steps_offset`; continuous ones a uniform grid in t ending at the data (final='clean') or at t_min.

posterior='train_step' reproduces MONAI's DDPMScheduler instead: it always uses the one-training-step posterior
(alpha_bar[t-1], beta[t]) even when the grid skips steps — correct only for num_steps = N (MONAI's known
off-by-stride). Default: 'grid'.

variance_type 'learned' / 'learned_range': the model outputs 2·C channels, the second half being the variance
(learned) or an interpolation weight v in [-1, 1] between the fixed_small and fixed_large variances — in log
space (diffusers, default) or linear space (learned_range_space='linear', MONAI). The noise then needs a
per-element scale, which `step` applies eagerly (explicit noise = std·z); these variants have no
graph-capturable plan.
"""
from __future__ import annotations

import math

import torch

from ..ops.fused_step import philox_keys, philox_normal
from ._grids import alpha_sigma_at, check_spacing, eval_times_and_end
from .base import Solver

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


class DDPM(Solver):
    name = "ddpm"

    def __init__(self, schedule, num_steps, *, variance_type="fixed_small", spacing=None, steps_offset=0,
                 posterior="grid", learned_range_space="log", final="clean", **common):
        if variance_type in ("fixed_small_log",):
            variance_type = "fixed_small"
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        if posterior not in ("grid", "train_step"):
            raise ValueError(f"posterior must be 'grid' or 'train_step', got {posterior!r}")
        if posterior == "train_step" and schedule.kind != "discrete":
            raise ValueError("posterior='train_step' needs a discrete schedule")
        if learned_range_space not in ("log", "linear"):
            raise ValueError(f"learned_range_space must be 'log' or 'linear', got {learned_range_space!r}")
        self.variance_type = variance_type
        self.spacing = spacing or ("leading" if schedule.kind == "discrete" else "time")
        check_spacing(schedule, self.spacing)
        self.steps_offset = int(steps_offset)
        self.posterior = posterior
        self.learned_range_space = learned_range_space
        self.final = final
        super().__init__(schedule, num_steps, **common)
        if self.learned:
            self._plan_unsupported = (f"variance_type={variance_type!r} scales the noise per element from the "
                                      "model output; run it eagerly with step()/sample()")

    @property
    def learned(self):
        return self.variance_type in ("learned", "learned_range")

    def _num_evals(self):
        return self.num_steps

    def _posterior(self, t, prev):
        """(x0 coefficient, x_t coefficient, fixed_small variance, fixed_large variance)."""
        sched = self.schedule
        if sched.kind == "discrete":
            ab = sched.alphas_cumprod
            ab_t = ab[int(t)]
            if self.posterior == "train_step":
                ab_prev = ab[int(t) - 1] if t > 0 else 1.0
                beta = sched.betas[int(t)]
            else:
                ab_prev = 1.0 if prev is None else ab[int(prev)]
                beta = 1.0 - ab_t / ab_prev
            c0 = math.sqrt(ab_prev) * beta / (1.0 - ab_t)
            ct = math.sqrt(1.0 - beta) * (1.0 - ab_prev) / (1.0 - ab_t)
            small = max((1.0 - ab_prev) / (1.0 - ab_t) * beta, 1e-20)
            return c0, ct, small, beta
        a_t, s_t = alpha_sigma_at(sched, t)
        a_s, s_s = alpha_sigma_at(sched, prev)
        a_ts = a_t / a_s
        var_ts = s_t * s_t - a_ts * a_ts * s_s * s_s
        return a_s * var_ts / (s_t * s_t), a_ts * s_s * s_s / (s_t * s_t), var_ts * s_s * s_s / (s_t * s_t), var_ts

    def _build(self, program):
        times, end = eval_times_and_end(self.schedule, self.num_steps, self.spacing, self.final,
                                        self.steps_offset)
        self._variances = []
        for i, t in enumerate(times):
            prev = times[i + 1] if i + 1 < len(times) else end
            a_t, s_t = alpha_sigma_at(self.schedule, t)
            c0, ct, small, large = self._posterior(t, prev)
            if self.schedule.kind == "discrete":
                noisy = t > 0
            else:
                noisy = prev is not None
            self._variances.append((small, large, noisy))
            if self.learned:
                std = 1.0  # the effective noise std·z is passed explicitly by step()
            else:
                std = math.sqrt(small if self.variance_type == "fixed_small" else large)
            x = program.current
            target = c0 * program.d(i) + ct * x + (std * program.z(i) if noisy else 0.0)
            program.add(self.schedule.model_time(t), self.x0_estimate(a_t, s_t), target,
                        coef_fn=self.estimate_coef_fn, noisy=noisy)

    def step(self, i, x, model_output, noise=None, *, seeds=None):
        if not self.learned:
            return super().step(i, x, model_output, noise, seeds=seeds)
        i = self._check_index(i)
        channels = x.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(f"variance_type={self.variance_type!r} needs a model output with 2·C = "
                             f"{2 * channels} channels, got {model_output.shape[1]}")
        m, v = model_output[:, :channels], model_output[:, channels:].float()
        small, large, noisy = self._variances[i]
        if not noisy:
            return super().step(i, x, m, None, seeds=seeds)
        if noise is None:
            seeds = philox_keys(self.seed, x.shape[0]).to(x.device) if seeds is None else seeds
            noise = philox_normal(seeds, i, x.shape, device=x.device)
        if self.variance_type == "learned":
            std = v.clamp(min=0).sqrt()
        else:
            frac = (v + 1) / 2
            if self.learned_range_space == "log":
                std = torch.exp(0.5 * (frac * math.log(large) + (1 - frac) * math.log(small)))
            else:
                std = (frac * large + (1 - frac) * small).clamp(min=0).sqrt()
        return super().step(i, x, m, std * noise.float(), seeds=seeds)
