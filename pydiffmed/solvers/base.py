"""The Solver base class: a schedule and a step count turned into a fused_step program (coefficient rows and
buffer forms), with `plan(device)` for the engine, `step(...)` for step-by-step use and `sample(...)` for an
eager loop."""
from __future__ import annotations

import abc
import copy
import math
from typing import ClassVar

import numpy as np
import torch

from .. import prediction
from ..ops.fused_step import apply_dynamic_threshold, dynamic_threshold, fused_step, philox_keys, philox_normal
from ..schedules import NoiseSchedule
from ._program import Program
from .plan import SamplingPlan


class DynamicThreshold:
    """coef_fn for Imagen / diffusers dynamic thresholding: x0 -> clamp(x0, -s, s)/s with s the per-sample
    `ratio` quantile of |x0| clamped to [1, max_value] (device-only, no host sync)."""

    def __init__(self, ratio=0.995, max_value=1.0):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
        if not max_value >= 1.0:
            raise ValueError(f"sample_max_value must be >= 1, got {max_value}")
        self.ratio, self.max_value = float(ratio), float(max_value)

    def identity(self):
        return (self.ratio, self.max_value)

    def __call__(self, x, m, row, step_index):
        s = dynamic_threshold(x, m, row, ratio=self.ratio, max_value=self.max_value)
        return apply_dynamic_threshold(row, s)


# The most steps a solver takes on a continuous-time schedule (a discrete one allows at most its
# num_train_timesteps). Building a plan costs time quadratic in its model evaluations: ode_rk4 at 4096 steps
# (16384 evaluations) takes minutes, so a larger count is a mistake, not a wish.
MAX_STEPS = 4096


def check_num_steps(schedule, num_steps):
    """num_steps as an int, checked before anything is built (ValueError): a positive int, at most the
    schedule's num_train_timesteps (discrete schedules: more would repeat timesteps) or MAX_STEPS."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    discrete = getattr(schedule, "kind", None) == "discrete"
    limit = schedule.num_train_timesteps if discrete else MAX_STEPS
    if num_steps > limit:
        what = (f"the schedule's num_train_timesteps ({limit})" if discrete else
                f"{limit} (the limit for continuous-time schedules)")
        raise ValueError(f"num_steps={num_steps} is too many: at most {what}")
    return int(num_steps)


# The capabilities every Solver class declares (class attributes; pydiffmed.solvers.names selects by them).
CAPABILITIES = ("plannable", "can_start_partway", "encodes", "adaptive")


class Solver(abc.ABC):
    """Base class. Subclasses implement `_build(program)` (calling program.add once per model evaluation) and
    set `init_noise_scale`. Options shared by all solvers:

    prediction_type: what the model predicts (pydiffmed.prediction.PREDICTION_TYPES).
    clip: clamp the x0 estimate to [-clip, clip] (diffusers/MONAI `clip_sample=True` is clip=1.0); None = off.
    thresholding: dynamic thresholding (diffusers' `thresholding=True`) with dynamic_thresholding_ratio and
      sample_max_value; overrides clip.
    seed: default Philox seed of `step`/`sample` (per-sample keys seed + arange(B), like the engine).
    """

    name = "solver"
    supports_clip = True

    # Capabilities, declared per class: the engine, the command and get_solver read these (see `unsupported`
    # and pydiffmed.solvers.names), never a solver's name.
    plannable = True          # plan() gives the fixed SamplingPlan the engine runs (some option values may still
                              # need the eager step(): plan() then raises ValueError saying which)
    plan_clip_options: ClassVar[dict] = {}  # options that keep a plan with clip / thresholding
    can_start_partway = True  # SDEdit (strength=): the engine starts it at a later model evaluation (or cuts its
                              # grid with starting_at)
    encodes = False           # maps data to noise (an inversion) instead of sampling noise to data
    adaptive = False          # picks its step sizes while it runs: takes no num_steps, has no fixed plan

    @classmethod
    def unsupported(cls, task: str) -> str | None:
        """Why this solver cannot do `task`, from its declared capabilities (None: it can): 'plan' (a fixed plan
        for the engine), 'sample' (noise to data through the engine) or 'start_partway' (SDEdit)."""
        if task == "start_partway":
            return None if cls.can_start_partway else f"{cls.name} cannot start part-way through its grid"
        if task == "sample" and cls.encodes:
            return f"{cls.name} encodes volumes into noise (data to noise); it does not sample"
        if task not in ("plan", "sample"):
            raise ValueError(f"unknown task {task!r}; expected 'plan', 'sample' or 'start_partway'")
        if cls.plannable:
            return None
        what = "is adaptive (it picks its step sizes while it runs) and " if cls.adaptive else ""
        return f"{cls.name} {what}has no fixed-step plan: run it eagerly with solver.sample(model, x_T)"

    def __new__(cls, *args, **kwargs):
        # the step count is checked before a subclass's __init__ builds grids of that size (copy and pickle call
        # __new__ with no arguments)
        schedule = args[0] if args else kwargs.get("schedule")
        num_steps = args[1] if len(args) > 1 else kwargs.get("num_steps")
        if isinstance(schedule, NoiseSchedule) and num_steps is not None:
            check_num_steps(schedule, num_steps)
        return super().__new__(cls)

    def __init__(self, schedule, num_steps, *, prediction_type="epsilon", clip=None, thresholding=False,
                 dynamic_thresholding_ratio=0.995, sample_max_value=1.0, seed=0):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a pydiffmed.schedules.NoiseSchedule, got {type(schedule).__name__}")
        check_num_steps(schedule, num_steps)
        self.schedule = schedule
        self.num_steps = int(num_steps)
        self.prediction_type = prediction.canonical(prediction_type)
        if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                                     and clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be None or a positive finite number, got {clip!r}")
        self.thresholding = bool(thresholding)
        self.threshold = DynamicThreshold(dynamic_thresholding_ratio, sample_max_value) if thresholding else None
        self.clip = 1.0 if self.thresholding else (None if clip is None else float(clip))
        if (self.clip is not None) and not self.supports_clip:
            raise ValueError(f"{self.name} does not support clip / thresholding")
        self.seed = int(seed)
        self.init_noise_scale = schedule.init_noise_scale()
        self._plan_unsupported = None
        self._eager = {}
        self._compile()

    # building -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _num_evals(self) -> int:
        """How many model evaluations the solver makes."""

    @abc.abstractmethod
    def _build(self, program: Program):
        """Add one fused_step row per model evaluation to `program`."""

    def _compile(self):
        program = Program(self._num_evals())
        self._build(program)
        self._rows, self._model_times = program.finish()
        self._forms = list(program.forms)
        self._form_of_eval = tuple(program.form_of_eval)
        self._buffers = tuple(program.buffers)
        self._output = program.state

    def x0_estimate(self, alpha, sigma, d_alpha=-1.0, d_sigma=1.0):
        """(p_x, p_m, clip) of the x0 estimate at (alpha, sigma), with this solver's clip."""
        p_x, p_m = prediction.x0_coefs(self.prediction_type, alpha, sigma, d_alpha, d_sigma)
        return p_x, p_m, self.clip

    @property
    def estimate_coef_fn(self):
        return self.threshold

    # public API -----------------------------------------------------------------------------------------
    @property
    def timesteps(self) -> torch.Tensor:
        """fp32 (E,): the model's time input for each model evaluation."""
        return torch.tensor(self._model_times, dtype=torch.float32)

    @property
    def num_model_evals(self) -> int:
        return len(self._form_of_eval)

    @property
    def coefficient_table(self) -> np.ndarray:
        """(E, K) float64 fused_step rows (COEF_NAMES order)."""
        return self._rows.copy()

    def plan(self, device=None) -> SamplingPlan:
        if not self.plannable:
            raise ValueError(self.unsupported("plan"))
        if self._plan_unsupported:
            raise ValueError(f"{self.name}: {self._plan_unsupported}")
        device = torch.device("cpu") if device is None else torch.device(device)
        return SamplingPlan(
            timesteps=torch.tensor(self._model_times, dtype=torch.float32, device=device),
            coefs=torch.tensor(self._rows, dtype=torch.float32, device=device),
            buffers=self._buffers, forms=list(self._forms), form_of_eval=self._form_of_eval,
            init_noise_scale=float(self.init_noise_scale), output=self._output)

    def starting_at(self, step: int) -> Solver:
        """A copy of this solver with its first `step` steps removed, the rest run as a fresh solve from the
        grid point they start at (a multistep solver warms up again at lower order, as diffusers' schedulers do
        after `set_begin_index`): the form SDEdit needs. Solvers whose grid cannot be cut raise ValueError."""
        if not self.can_start_partway:
            raise ValueError(self.unsupported("start_partway"))
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.num_steps:
            raise ValueError(f"step must be an int in [0, {self.num_steps}), got {step!r}")
        if step == 0:
            return self
        solver = copy.copy(self)
        solver._drop_steps(int(step))
        solver.num_steps = self.num_steps - int(step)
        solver.reset()
        solver._compile()
        return solver

    def _drop_steps(self, step: int):
        raise ValueError(f"{self.name} cannot cut its grid (the engine starts it part-way at a later model "
                         f"evaluation of its plan instead)")

    def reset(self):
        """Forget the buffers of step-by-step use."""
        self._eager = {}

    def _buffers_like(self, x):
        key = (tuple(x.shape), x.device)
        if self._eager.get("key") != key:
            self._eager = {"key": key,
                           "bufs": {n: torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                                    for n in self._buffers}}
        return self._eager["bufs"]

    def _noise_args(self, noisy, x, noise, seeds):
        if not noisy:
            return {}
        if noise is not None:
            return {"noise": noise}
        if seeds is None:
            seeds = philox_keys(self.seed, x.shape[0]).to(x.device)
        return {"seeds": seeds}

    def _check_index(self, i):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_model_evals:
            raise ValueError(f"step index must be an int in [0, {self.num_model_evals}), got {i!r}")
        return int(i)

    def step(self, i, x, model_output, noise=None, *, seeds=None):
        """Apply model evaluation i's update to the state x (the tensor the model was evaluated on) and return
        the next state (a new tensor). Multistep history is kept inside the solver; call `reset()` (or start
        again at i = 0 with a new shape) between runs. noise: explicit z (overrides the Philox noise);
        seeds: (B,) int64 Philox keys (default seed + arange(B))."""
        i = self._check_index(i)
        form = self._forms[self._form_of_eval[i]]
        bufs = self._buffers_like(x)
        bufs[form.x].copy_(x)
        row = torch.from_numpy(self._rows[i]).to(x.device)
        noise_args = self._noise_args(form.noisy, x, noise, seeds)
        if form.coef_fn is not None:
            row = self._coef_row(form, bufs[form.x], model_output, row, i, noise_args)
        fused_step(bufs[form.x], model_output, row, history=tuple(bufs[h] for h in form.history),
                   out=bufs[form.out], x0_out=None if form.x0_out is None else bufs[form.x0_out],
                   noise_step=i, **noise_args)
        return bufs[form.out].clone()

    def _coef_row(self, form, x, m, row, i, noise_args):
        """The (B, K) row of a coef_fn form (noise_args: the noise/seeds fused_step will use)."""
        return form.coef_fn(x, m, row, torch.tensor(i, device=x.device))

    def initial_noise(self, shape, seed=0, seeds=None, device=None):
        """x_T = init_noise_scale · philox_normal(seeds, step=E): what the engine starts from."""
        seeds = philox_keys(int(seed), shape[0]).to(device) if seeds is None else seeds
        return philox_normal(seeds, self.num_model_evals, shape, device=device) * self.init_noise_scale

    def sample(self, model, x_T=None, *, shape=None, seed=0, seeds=None, noises=None, callback=None):
        """Eager sampling loop: model(x, t) with t a (B,) fp32 tensor. Starts from x_T (or init noise of
        `shape`); noises: optional list of explicit noise tensors per evaluation. Returns the final state."""
        if x_T is None:
            if shape is None:
                raise ValueError("sample needs x_T or shape")
            x_T = self.initial_noise(shape, seed, seeds)
        if seeds is None:
            seeds = philox_keys(int(seed), x_T.shape[0]).to(x_T.device)
        self.reset()
        x = x_T.float()
        times = self.timesteps.to(x.device)
        for i in range(self.num_model_evals):
            m = model(x, times[i].expand(x.shape[0]))
            x = self.step(i, x, m, None if noises is None else noises[i], seeds=seeds)
            if callback is not None:
                callback(i, x)
        return x
