"""Rectified flow (MAISI / MONAI RFlowScheduler) on x_t = (1 - t)·x0 + t·eps: rflow_euler and rflow_heun.

The grid is MONAI's `RFlowScheduler.set_timesteps`: model times u_i = N·t_max·(1 - i/n), i < n (N =
num_train_timesteps), rounded to integers when use_discrete_timesteps (the default, as in MONAI), then — with
use_timestep_transform — warped by MONAI's resolution-dependent shift

    t' = r·t/(1 + (r - 1)·t),   r = (input_img_size_numel / base_img_size_numel)^(1/spatial_dim)·transform_scale

(t = u/N; more steps at the noisy end for volumes larger than the base size), then passed through float16 like
MONAI (`astype(np.float16)`, and back to integers when discrete), then shifted by steps_offset (added in float16
as well on continuous grids, as MONAI's in-place add on its float16 tensor does). The last step goes to u = 0.
`input_img_size_numel` is the number of voxels of one sampled volume's spatial grid (for a latent model: of the
latent, e.g. `math.prod(latent_shape[2:])`), exactly what MONAI's set_timesteps takes (a Python number, or a
tensor as MAISI passes it: MONAI then computes the shift in float32, and so do we, bit for bit);
`spatial_dim` (default 3) is MONAI's option, not derived from the shape (as in MONAI's set_timesteps).
MONAI (1.5, 1.6) stores transform_scale but does not pass it on in set_timesteps, so its grid is always the
scale-1 grid: leave transform_scale at 1 for parity (other values apply the formula above).

The model output v (prediction_type 'neg_flow', MONAI's convention) is x0 - eps = -dx/dt, so the flow ODE in
decreasing t is dx = v·(t_i - t_{i+1}). Other prediction types go through the x0 estimate (v = (x0 - x)/t),
'flow' (eps - x0, diffusers' convention) directly as -v.

rflow_euler: x_{i+1} = x_i + (u_i - u_{i+1})/N·v(x_i, u_i) — MONAI's `RFlowScheduler.step`. MONAI also
truncates the *next* timestep to an integer (`int(next_timestep)`) when forming dt, which only matters for
non-integer (use_discrete_timesteps=False) grids; truncate_next_timestep=True reproduces that (default False:
the exact dt, so the steps add up to the whole interval).
rflow_heun: Heun's 2nd-order method on the same grid (two model evaluations per step: at u_i, and at u_{i+1}
on the Euler predictor); the last step, to u = 0, is an Euler step (2n - 1 evaluations), as in Karras et al.
and diffusers' HeunDiscreteScheduler — a flow model's x0 estimate is singular there for other prediction types.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Solver


def monai_timestep_transform(t, input_img_size_numel, base_img_size_numel=32 * 32 * 32, scale=1.0,
                             num_train_timesteps=1000, spatial_dim=3):
    """MONAI's resolution shift: t' = r·t/(1 + (r - 1)·t) (t in [0, 1]), r = (numel/base)^(1/dim)·scale."""
    t = t / num_train_timesteps
    ratio = (input_img_size_numel / base_img_size_numel) ** (1.0 / spatial_dim) * scale
    return ratio * t / (1 + (ratio - 1) * t) * num_train_timesteps


def _positive(name, value, integer=False):
    """value (a number or a 0-d tensor/array, e.g. MONAI's torch.prod(...)) as a positive finite float / int."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0 or (integer and number != int(number)):
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return int(number) if integer else number


class _RFlowBase(Solver):
    """MONAI's RFlowScheduler grid and the flow velocity; subclasses write the steps."""

    def __init__(self, schedule, num_steps, *, prediction_type="neg_flow", use_discrete_timesteps=True,
                 use_timestep_transform=False, input_img_size_numel=None, transform_scale=1.0,
                 base_img_size_numel=32 * 32 * 32, spatial_dim=3, steps_offset=0, **common):
        if schedule.kind != "flow":
            raise ValueError(f"{self.name} needs a flow schedule (NoiseSchedule.flow())")
        self.use_discrete_timesteps = bool(use_discrete_timesteps)
        self.use_timestep_transform = bool(use_timestep_transform)
        if self.use_timestep_transform:
            if input_img_size_numel is None:
                raise ValueError("use_timestep_transform needs input_img_size_numel: the number of voxels of one "
                                 "sampled volume (of the latent for a latent model), e.g. "
                                 "math.prod(shape[2:]) — what MONAI's set_timesteps takes")
            number = _positive("input_img_size_numel", input_img_size_numel)
            # a tensor (MAISI passes torch.prod(torch.tensor(latent_shape))) makes MONAI compute the shift in
            # torch's float32 arithmetic, a Python number in float64: keep the kind so the grids agree to the bit
            if isinstance(input_img_size_numel, torch.Tensor):
                input_img_size_numel = input_img_size_numel.detach().to("cpu").clone().reshape(())
            else:
                input_img_size_numel = number
        self.input_img_size_numel = input_img_size_numel
        self.transform_scale = _positive("transform_scale", transform_scale)
        self.base_img_size_numel = _positive("base_img_size_numel", base_img_size_numel)
        self.spatial_dim = _positive("spatial_dim", spatial_dim, integer=True)
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)):
            raise ValueError(f"steps_offset must be an int, got {steps_offset!r}")
        self.steps_offset = int(steps_offset)
        super().__init__(schedule, num_steps, prediction_type=prediction_type, **common)

    def _times(self):
        """The n model times of MONAI's set_timesteps (float64 values of its int64 / float16 tensor)."""
        n_train = self.schedule.num_train_timesteps
        n = self.num_steps
        times = [(1.0 - i / n) * n_train * self.schedule.t_max for i in range(n)]
        if self.use_discrete_timesteps:
            times = [int(round(t)) for t in times]
        if self.use_timestep_transform:  # same operations in the same order as MONAI (float32 for a tensor numel)
            times = [monai_timestep_transform(t, self.input_img_size_numel, self.base_img_size_numel,
                                              self.transform_scale, n_train, self.spatial_dim) for t in times]
        times = np.array([float(t) for t in times]).astype(np.float16)
        if self.use_discrete_timesteps:
            times = times.astype(np.int64)
        # MONAI adds steps_offset to its int64 / float16 tensor in place: in float16 arithmetic when continuous
        times = times + times.dtype.type(self.steps_offset)
        return times.astype(np.float64)

    @property
    def _raw(self):
        """The velocity is the model output itself (no x0 estimate, no clip)."""
        return self.prediction_type in ("neg_flow", "flow") and self.clip is None

    def _estimate(self, u):
        """(p_x, p_m, clip) fused_step estimates at model time u, and its coef_fn."""
        if self._raw:
            return (0.0, 1.0, None), None
        t = u / self.schedule.num_train_timesteps
        return self.x0_estimate(1.0 - t, t), self.estimate_coef_fn

    def _velocity(self, program, e, x, u):
        """v = x0 - eps (= -dx/dt) at state vector x, model time u, from evaluation e's estimate."""
        d = program.d(e)
        if self._raw:
            return d if self.prediction_type == "neg_flow" else -d
        return (d - x) / (u / self.schedule.num_train_timesteps)

    def _add(self, program, u, target, keep=()):
        estimate, coef_fn = self._estimate(u)
        program.add(u, estimate, target, keep=keep, coef_fn=coef_fn)


class RFlowEuler(_RFlowBase):
    name = "rflow_euler"

    def __init__(self, schedule, num_steps, *, truncate_next_timestep=False, **opts):
        self.truncate_next_timestep = bool(truncate_next_timestep)
        super().__init__(schedule, num_steps, **opts)

    def _num_evals(self):
        return self.num_steps

    def _build(self, program):
        n_train = self.schedule.num_train_timesteps
        times = self._times()
        for i, u in enumerate(times):
            u_next = times[i + 1] if i + 1 < len(times) else 0.0
            if self.truncate_next_timestep:  # MONAI: float(timestep - int(next_timestep)), in float16
                dt = float(np.float16(u) - np.float16(int(u_next))) / n_train
            else:
                dt = (u - u_next) / n_train
            x = program.current
            self._add(program, u, x + dt * self._velocity(program, i, x, u))


class RFlowHeun(_RFlowBase):
    """Heun (explicit trapezoid) on the flow ODE over MONAI's grid; global order 2."""
    name = "rflow_heun"

    def _num_evals(self):
        times = self._times()
        return sum(1 if u_next == 0.0 else 2 for u_next in [*times[1:], 0.0])

    def _build(self, program):
        n_train = self.schedule.num_train_timesteps
        times = self._times()
        e = 0
        for i, u in enumerate(times):
            u_next = times[i + 1] if i + 1 < len(times) else 0.0
            dt = (u - u_next) / n_train
            start = program.current
            v1 = self._velocity(program, e, start, u)
            predictor = start + dt * v1
            if u_next == 0.0:
                self._add(program, u, predictor)
                e += 1
                continue
            self._add(program, u, predictor, keep=[start])
            e += 1
            v2 = self._velocity(program, e, predictor, u_next)
            self._add(program, u_next, start + 0.5 * dt * (v1 + v2))
            e += 1
