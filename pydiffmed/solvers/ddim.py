"""DDIM (Song et al. 2021) with eta, and DDIM inversion (deterministic x0 -> x_T encoding).

One step from (alpha_t, sigma_t) to (alpha_s, sigma_s):
    x_s = alpha_s·x0 + sqrt(sigma_s² - sigma_eta²)·eps + sigma_eta·z,
    sigma_eta = eta·sqrt(sigma_ts²·sigma_s²/sigma_t²)   (eta = 1: the DDPM posterior variance).

Grids (discrete schedules): `spacing` as diffusers defines it (default 'leading'; 'monai' = MONAI's grid).
prev_rule='grid' (default) steps to the next grid timestep; prev_rule='stride' reproduces diffusers' and MONAI's
`prev = t - N // num_steps`, which differs from the grid for trailing/linspace/monai spacings (their known
off-by-one). set_alpha_to_one: the last step goes to alpha_bar = 1 (default) or to alpha_bar[0].

Clipping: with clip / thresholding, the peers keep eps from the *unclipped* x0 (use_clipped_model_output=False,
their default), which needs the raw model output in the update: `step` then does two fused_step passes and
there is no single-pass plan. use_clipped_model_output=True (eps recomputed from the clipped x0) is one pass.
"""
from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch

from .. import prediction
from ..ops.fused_step import fused_step
from ._grids import alpha_sigma_at, check_spacing, eval_times_and_end
from .base import Solver


def _clean_end_alpha_sigma(schedule, set_alpha_to_one):
    """(alpha, sigma) of the clean end of the trajectory: (1, 0), or the first training step's when a discrete
    schedule does not set alpha to one there (diffusers' set_alpha_to_one=False)."""
    if set_alpha_to_one or schedule.kind != "discrete":
        return 1.0, 0.0
    ab0 = schedule.alphas_cumprod[0]
    return math.sqrt(ab0), math.sqrt(1.0 - ab0)

class _DDIMCore(Solver):
    """Deterministic-or-eta DDIM over a list of (model time, alpha_t, sigma_t, alpha_s, sigma_s, sigma_eta)."""

    plan_clip_options: ClassVar[dict] = {"use_clipped_model_output": True}  # the single-pass form

    def __init__(self, schedule, num_steps, *, use_clipped_model_output=False, **common):
        self.use_clipped_model_output = bool(use_clipped_model_output)
        super().__init__(schedule, num_steps, **common)
        if self._two_pass:
            self._plan_unsupported = ("clip/thresholding with use_clipped_model_output=False needs eps from the "
                                      "unclipped model output, which one fused_step cannot apply; use "
                                      "use_clipped_model_output=True for a plan, or step()/sample() eagerly")

    @property
    def _two_pass(self):
        return self.clip is not None and not self.use_clipped_model_output

    @abc.abstractmethod
    def _steps(self):
        """The (model time, alpha_t, sigma_t, alpha_s, sigma_s, sigma_eta) of every evaluation."""

    def _num_evals(self):
        return len(self._step_list)

    def _compile(self):
        self._step_list = self._steps()
        super()._compile()

    def _build(self, program):
        for i, (model_time, a_t, s_t, a_s, s_s, s_eta) in enumerate(self._step_list):
            direction = math.sqrt(max(s_s * s_s - s_eta * s_eta, 0.0))
            x, d = program.current, program.d(i)
            # (with _two_pass this single-pass form, eps from the clipped x0, is replaced by step()'s two passes)
            eps = (x - a_t * d) / s_t
            target = a_s * d + direction * eps + s_eta * program.z(i)
            program.add(model_time, self.x0_estimate(a_t, s_t), target, coef_fn=self.estimate_coef_fn)

    def step(self, i, x, model_output, noise=None, *, seeds=None):
        if not self._two_pass:
            return super().step(i, x, model_output, noise, seeds=seeds)
        i = self._check_index(i)
        _, a_t, s_t, a_s, s_s, s_eta = self._step_list[i]
        direction = math.sqrt(max(s_s * s_s - s_eta * s_eta, 0.0))
        q_x, q_m = prediction.eps_coefs(self.prediction_type, a_t, s_t)
        p_x, p_m, clip = self.x0_estimate(a_t, s_t)
        # pass 1: direction·eps from the raw model output (the "x0" slot computes eps itself, unclipped)
        eps_term = fused_step(x, model_output, [q_x, q_m, math.inf, 0, direction, 0, 0, 0, 0])
        row = torch.tensor([p_x, p_m, clip, 0.0, a_s, 1.0, 0.0, 0.0, s_eta], dtype=torch.float64,
                           device=x.device)
        if self.threshold is not None:
            row = self.threshold(x.float(), model_output, row, torch.tensor(i, device=x.device))
        extra = self._noise_args(s_eta != 0, x, noise, seeds)
        return fused_step(x.float(), model_output, row, history=(eps_term,), noise_step=i, **extra)


class DDIM(_DDIMCore):
    name = "ddim"

    def __init__(self, schedule, num_steps, *, eta=0.0, spacing=None, steps_offset=0, prev_rule="grid",
                 set_alpha_to_one=True, final="clean", **common):
        if not (isinstance(eta, (int, float)) and eta >= 0):
            raise ValueError(f"eta must be a non-negative number, got {eta!r}")
        if prev_rule not in ("grid", "stride"):
            raise ValueError(f"prev_rule must be 'grid' or 'stride', got {prev_rule!r}")
        if prev_rule == "stride" and schedule.kind != "discrete":
            raise ValueError("prev_rule='stride' needs a discrete schedule")
        self.eta = float(eta)
        self.spacing = spacing or ("leading" if schedule.kind == "discrete" else "time")
        check_spacing(schedule, self.spacing)
        self.steps_offset, self.prev_rule = int(steps_offset), prev_rule
        self.set_alpha_to_one, self.final = bool(set_alpha_to_one), final
        super().__init__(schedule, num_steps, **common)

    def _steps(self):
        sched = self.schedule
        times, end = eval_times_and_end(sched, self.num_steps, self.spacing, self.final, self.steps_offset)
        steps = []
        for i, t in enumerate(times):
            if self.prev_rule == "stride":
                prev = t - sched.num_train_timesteps // self.num_steps
                prev = prev if prev >= 0 else None
            else:
                prev = times[i + 1] if i + 1 < len(times) else end
            a_t, s_t = alpha_sigma_at(sched, t)
            if prev is None:
                a_s, s_s = _clean_end_alpha_sigma(self.schedule, self.set_alpha_to_one)
            else:
                a_s, s_s = alpha_sigma_at(sched, prev)
            s_eta = 0.0
            if self.eta > 0:
                if sched.kind == "discrete":
                    ab_t, ab_s = a_t * a_t, a_s * a_s
                    var = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
                else:
                    a_ts = a_t / a_s
                    var = (s_t * s_t - a_ts * a_ts * s_s * s_s) * s_s * s_s / (s_t * s_t)
                s_eta = self.eta * math.sqrt(max(var, 0.0))
            steps.append((sched.model_time(t), a_t, s_t, a_s, s_s, s_eta))
        return steps


class DDIMInversion(_DDIMCore):
    """Deterministic DDIM run backwards, data -> noise (image translation, anomaly detection).

    model_time='target' (default, diffusers' DDIMInverseScheduler): evaluation k moves the state from the
    previous grid time (the clean data before the first step) to u_k and evaluates the model at u_k;
    num_steps evaluations. model_time='source' (MONAI's DDIMScheduler.reversed_step): the model is evaluated
    at the state's own time; the data is taken as x at the smallest grid time, num_steps - 1 evaluations.
    prev_rule 'stride' uses the peers' source/target = t -/+ N // num_steps instead of the grid neighbour.
    """
    name = "ddim_inversion"
    encodes = True
    can_start_partway = False

    def __init__(self, schedule, num_steps, *, spacing=None, steps_offset=0, model_time="target",
                 prev_rule="grid", set_alpha_to_one=True, final="clean", **common):
        if model_time not in ("target", "source"):
            raise ValueError(f"model_time must be 'target' or 'source', got {model_time!r}")
        if prev_rule not in ("grid", "stride"):
            raise ValueError(f"prev_rule must be 'grid' or 'stride', got {prev_rule!r}")
        if prev_rule == "stride" and schedule.kind != "discrete":
            raise ValueError("prev_rule='stride' needs a discrete schedule")
        self.spacing = spacing or ("leading" if schedule.kind == "discrete" else "time")
        check_spacing(schedule, self.spacing)
        self.steps_offset, self.model_time_rule, self.prev_rule = int(steps_offset), model_time, prev_rule
        self.set_alpha_to_one, self.final = bool(set_alpha_to_one), final
        super().__init__(schedule, num_steps, **common)
        self.init_noise_scale = 1.0

    def _steps(self):
        sched = self.schedule
        times, end = eval_times_and_end(sched, self.num_steps, self.spacing, self.final, self.steps_offset)
        up = list(times[::-1])                      # ascending
        stride = sched.num_train_timesteps // self.num_steps if sched.kind == "discrete" else None
        steps = []
        if self.model_time_rule == "target":
            for k, u in enumerate(up):
                if self.prev_rule == "stride":
                    src = min(u - stride, sched.num_train_timesteps - 1)
                    src = src if src >= 0 else None
                else:
                    src = up[k - 1] if k > 0 else (end if self.final == "t_min" else None)
                if src is None:
                    a_t, s_t = _clean_end_alpha_sigma(self.schedule, self.set_alpha_to_one)
                else:
                    a_t, s_t = alpha_sigma_at(sched, src)
                a_s, s_s = alpha_sigma_at(sched, u)
                steps.append((sched.model_time(u), a_t, s_t, a_s, s_s, 0.0))
        else:
            for k, u in enumerate(up[:-1]):
                dst = u + stride if self.prev_rule == "stride" else up[k + 1]
                a_t, s_t = alpha_sigma_at(sched, u)
                a_s, s_s = alpha_sigma_at(sched, dst)
                steps.append((sched.model_time(u), a_t, s_t, a_s, s_s, 0.0))
        if not steps:
            raise ValueError("ddim_inversion with model_time='source' needs num_steps >= 2")
        for model_time, a_t, s_t, *_ in steps:
            if s_t == 0 and self.prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError("inverting from the clean data (sigma = 0) needs an epsilon or v model "
                                 "(or set_alpha_to_one=False)")
        return steps

    def _build(self, program):
        for i, (model_time, a_t, s_t, a_s, s_s, _) in enumerate(self._step_list):
            x, d = program.current, program.d(i)
            if s_t == 0:
                # from the clean data: x0 = x and eps is the model output itself (epsilon and v models)
                target = a_s * x + s_s * d
                program.add(model_time, (0.0, 1.0, None), target)
                continue
            eps = (x - a_t * d) / s_t
            target = a_s * d + s_s * eps
            program.add(model_time, self.x0_estimate(a_t, s_t), target, coef_fn=self.estimate_coef_fn)
