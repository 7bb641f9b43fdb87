"""Rectified-flow Euler (MAISI / MONAI RFlowScheduler style) on x_t = (1 - t)·x0 + t·eps.

Model times u run from N·t_max down (u_i = N·(1 - i/n), optionally rounded to integers, optionally warped by
MONAI's resolution-dependent `timestep_transform`), the last step goes to 0, and each step is
    x_next = x + (u_i - u_{i+1})/N · v,       v = x0 - eps  (prediction_type 'neg_flow', MONAI's convention)
— the Euler step of dx/dt = eps - x0. Other prediction types are converted through the x0 estimate. Like MONAI,
the timesteps pass through float16 (`timesteps.astype(np.float16)`) before use, which only matters for
non-integer (transformed or continuous) timesteps. MONAI's step also truncates the *next* timestep to an integer
(`int(next_timestep)`) when forming dt; truncate_next_timestep=True reproduces that (default False: exact dt).
"""
from __future__ import annotations

import numpy as np

from .base import Solver


def monai_timestep_transform(t, input_img_size_numel, base_img_size_numel=32 * 32 * 32, scale=1.0,
                             num_train_timesteps=1000, spatial_dim=3):
    """MONAI's resolution shift: t' = r·t/(1 + (r - 1)·t) (t in [0, 1]), r = (numel/base)^(1/dim)·scale."""
    t = t / num_train_timesteps
    ratio = (input_img_size_numel / base_img_size_numel) ** (1.0 / spatial_dim) * scale
    return ratio * t / (1 + (ratio - 1) * t) * num_train_timesteps


class RFlowEuler(Solver):
    name = "rflow_euler"

    def __init__(self, schedule, num_steps, *, prediction_type="neg_flow", use_discrete_timesteps=True,
                 use_timestep_transform=False, input_img_size_numel=None, transform_scale=1.0,
                 base_img_size_numel=32 * 32 * 32, spatial_dim=3, steps_offset=0, truncate_next_timestep=False,
                 **common):
        if schedule.kind != "flow":
            raise ValueError("rflow_euler needs a flow schedule (NoiseSchedule.flow())")
        if use_timestep_transform and input_img_size_numel is None:
            raise ValueError("use_timestep_transform needs input_img_size_numel (voxels of the sampled volume)")
        self.use_discrete_timesteps = bool(use_discrete_timesteps)
        self.use_timestep_transform = bool(use_timestep_transform)
        self.input_img_size_numel, self.transform_scale = input_img_size_numel, float(transform_scale)
        self.base_img_size_numel, self.spatial_dim = base_img_size_numel, int(spatial_dim)
        self.steps_offset = int(steps_offset)
        self.truncate_next_timestep = bool(truncate_next_timestep)
        super().__init__(schedule, num_steps, prediction_type=prediction_type, **common)

    def _num_evals(self):
        return self.num_steps

    def _times(self):
        n_train = self.schedule.num_train_timesteps
        n = self.num_steps
        times = [(1.0 - i / n) * n_train * self.schedule.t_max for i in range(n)]
        if self.use_discrete_timesteps:
            times = [int(round(t)) for t in times]
        if self.use_timestep_transform:
            times = [monai_timestep_transform(t, self.input_img_size_numel, self.base_img_size_numel,
                                              self.transform_scale, n_train, self.spatial_dim) for t in times]
        times = np.array(times).astype(np.float16)
        if self.use_discrete_timesteps:
            times = times.astype(np.int64)
        return times.astype(np.float64) + self.steps_offset

    def _build(self, program):
        n_train = self.schedule.num_train_timesteps
        times = self._times()
        raw = self.prediction_type == "neg_flow" and self.clip is None
        for i, u in enumerate(times):
            u_next = times[i + 1] if i + 1 < len(times) else 0.0
            if self.truncate_next_timestep:
                dt = float(np.float16(u) - np.float16(int(u_next))) / n_train
            else:
                dt = (u - u_next) / n_train
            x, d = program.current, program.d(i)
            t = u / n_train
            if raw:
                target = x + dt * d
                estimate = (0.0, 1.0, None)
            else:
                # x0 = x + t·v  =>  v = (x0 - x)/t
                target = x + dt * (d - x) / t
                estimate = self.x0_estimate(1.0 - t, t)
            program.add(u, estimate, target, coef_fn=None if raw else self.estimate_coef_fn)
