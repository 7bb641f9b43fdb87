"""PNDM (Liu et al. 2022): pseudo linear multistep (PLMS) with its pseudo Runge-Kutta warm start, as diffusers'
and MONAI's PNDMScheduler implement it.

The transfer x_t -> x_prev of a noise estimate e is
    x_prev = sqrt(ab_prev/ab_t)·x_t - (ab_prev - ab_t)·e / (ab_t·sqrt(1 - ab_prev) + sqrt(ab_t·(1 - ab_t)·ab_prev))
(for v-prediction models e = sqrt(ab_t)·v + sqrt(1 - ab_t)·x_t of the *combined* v, as the peers do).
Warm start: three pseudo-RK4 steps (4 model evaluations each, at t, t - stride/2, t - stride/2, t - stride),
then the 4th-order Adams-Bashforth combination (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3)/24; skip_prk_steps=True
warms up with lower-order PLMS instead (diffusers evaluates the first timestep twice).

The fused_step estimate here is the raw model output (history holds model outputs, as in the peers); the
pseudo-RK's running average is never stored: the row recovers the third stage's output from the state.
variant='monai' reproduces MONAI's scheduler, which (a) uses `num_train // len(timesteps)` as its step stride
(len(timesteps) counts the 12 RK evaluations), and (b) with skip_prk_steps does not repeat the first timestep.
Default: 'diffusers'. Discrete schedules only.
"""
from __future__ import annotations

import math

import numpy as np

from ..schedules import spaced_timesteps
from .base import Solver


class PNDM(Solver):
    name = "pndm"
    can_start_partway = False  # its PLMS history cannot restart part-way, and its grid is not cut
    supports_clip = False

    def __init__(self, schedule, num_steps, *, skip_prk_steps=False, spacing="leading", steps_offset=0,
                 set_alpha_to_one=False, variant="diffusers", **common):
        if schedule.kind != "discrete":
            raise ValueError("pndm needs a discrete schedule")
        if variant not in ("diffusers", "monai"):
            raise ValueError(f"variant must be 'diffusers' or 'monai', got {variant!r}")
        if variant == "monai" and spacing != "leading":
            raise ValueError("MONAI's PNDMScheduler only has the 'leading' grid")
        if common.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "eps", "v"):
            raise ValueError("pndm supports prediction_type 'epsilon' and 'v_prediction'")
        self.skip_prk_steps, self.spacing, self.steps_offset = bool(skip_prk_steps), spacing, int(steps_offset)
        self.set_alpha_to_one, self.variant = bool(set_alpha_to_one), variant
        n_train = schedule.num_train_timesteps
        n = int(num_steps)
        if n < 4 and not skip_prk_steps:
            raise ValueError("pndm with the Runge-Kutta warm start needs num_steps >= 4")
        if variant == "monai":
            base = (np.arange(0, n) * (n_train // n)).round().astype(np.int64) + self.steps_offset
        else:
            base = spaced_timesteps(n_train, n, spacing, steps_offset)[::-1].copy()   # ascending
        if skip_prk_steps:
            self._prk = np.zeros(0, dtype=np.int64)
            if variant == "monai":
                plms = base[::-1]
            else:
                plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            half = n_train // n // 2
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, half]), 4)
            self._prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1]
        self._times = np.concatenate([self._prk, plms]).astype(np.int64)
        effective = len(self._times) if variant == "monai" else n
        self._stride = n_train // effective
        super().__init__(schedule, num_steps, **common)

    def _num_evals(self):
        return len(self._times)

    def _alpha_bar(self, t):
        ab = self.schedule.alphas_cumprod
        if t >= 0:
            return ab[int(t)]
        return 1.0 if self.set_alpha_to_one else ab[0]

    def _prev_sample(self, sample, t, prev_t, e):
        ab_t, ab_prev = self._alpha_bar(t), self._alpha_bar(prev_t)
        if self.prediction_type == "v_prediction":
            e = math.sqrt(ab_t) * e + math.sqrt(1 - ab_t) * sample
        denom = ab_t * math.sqrt(1 - ab_prev) + math.sqrt(ab_t * (1 - ab_t) * ab_prev)
        return math.sqrt(ab_prev / ab_t) * sample - (ab_prev - ab_t) * e / denom

    def _build(self, program):
        raw = (0.0, 1.0, None)
        ets, counter, cur_sample, stage = [], 0, None, []
        for e, t in enumerate(self._times):
            m, x = program.d(e), program.current
            t = int(t)
            if counter < len(self._prk):
                prev_t = t - (0 if counter % 2 else self._stride // 2)
                start_t = int(self._prk[counter // 4 * 4])
                phase = counter % 4
                if phase == 0:
                    stage = [m]
                    ets.append(m)
                    cur_sample = x
                    used = m
                elif phase in (1, 2):
                    stage.append(m)
                    used = m
                else:
                    used = stage[0] / 6 + stage[1] / 3 + stage[2] / 3 + m / 6
                target = self._prev_sample(cur_sample, start_t, prev_t, used)
                if phase == 0:
                    keep = [cur_sample] + ets[-3:]
                elif phase in (1, 2):
                    keep = [cur_sample, stage[0], stage[1]] + ets[-3:]
                else:
                    keep = ets[-3:]
                    cur_sample = None
            else:
                prev_t = t - self._stride
                sample = x
                if counter != 1:
                    ets = ets[-3:] + [m]
                else:
                    prev_t, t = t, t + self._stride
                if len(ets) == 1 and counter == 0:
                    used = m
                    cur_sample = x
                elif len(ets) == 1 and counter == 1:
                    used = (m + ets[-1]) / 2
                    sample = cur_sample
                    cur_sample = None
                elif len(ets) == 2:
                    used = (3 * ets[-1] - ets[-2]) / 2
                elif len(ets) == 3:
                    used = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
                else:
                    used = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
                target = self._prev_sample(sample, t, prev_t, used)
                keep = ets[-3:] + ([cur_sample] if cur_sample is not None else [])
            counter += 1
            program.add(self.schedule.model_time(self._times[e]), raw, target, keep=keep)
