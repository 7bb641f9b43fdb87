"""The sampling engine: runs a solver's SamplingPlan on the device (DESIGN §1, issue 7).

A `Sampler` prepares once — plan tables on the device, static buffers, the device step counter, optionally
one CUDA graph per distinct step form — and then samples many times with new seeds or conditions. A step
is: gather the timestep from the plan by the device step index, call the model on the model-dtype input
buffer, apply `ops.fused_step` (which also writes the next model input), advance the step index. Nothing in a
step reads a device value back to the host; NaN/Inf in the model output is recorded in a device flag and
raised after the loop with the first step where it appeared.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import ops


class NonFiniteModelOutput(FloatingPointError):
    """The model produced NaN or Inf; the message names the first model evaluation where it happened."""


def _as_seed_tensor(seed, batch, device):
    if isinstance(seed, torch.Tensor):
        seeds = seed.to(device=device, dtype=torch.int64).reshape(-1)
    elif isinstance(seed, int):
        seeds = torch.arange(batch, dtype=torch.int64) + seed
    else:
        seeds = torch.tensor(list(seed), dtype=torch.int64)
    if seeds.numel() != batch:
        raise ValueError(f"seed gives {seeds.numel()} seeds for a batch of {batch}")
    return seeds.to(device)


class Sampler:
    """Prepared sampling of `model` with `solver` at a fixed `shape` = (B, C, *spatial).

    model: any module with `model(x, t, **cond) -> output` (UNet3D and accelerate()d MONAI models are fast).
    solver: a pydiffmed solver (`pydiffmed.get_solver(...)`).
    dtype: model dtype (fp32/fp16/bf16); the state stays in `state_dtype` (fp32 by default).
    guidance_scale: classifier-free guidance; the model is then called once per step on a 2·B batch
      (unconditional half first) and the two halves are combined inside fused_step.
    """

    def __init__(self, model, solver, shape, *, device=None, dtype=None, state_dtype=torch.float32,
                 guidance_scale=None, cuda_graph=True, nan_check=True):
        if len(shape) < 3:
            raise ValueError(f"shape must be (B, C, *spatial), got {tuple(shape)}")
        if any(int(s) < 1 for s in shape):
            raise ValueError(f"shape must be positive, got {tuple(shape)}")
        self.model = model
        self.solver = solver
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.dtype = dtype or _model_dtype(model)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        self.state_dtype = state_dtype
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.nan_check = nan_check
        self.plan = solver.plan(self.device)
        batch = self.shape[0]
        self.buffers = {name: torch.zeros(self.shape, dtype=state_dtype, device=self.device)
                        for name in self.plan.buffers}
        model_batch = 2 * batch if self.guidance_scale is not None else batch
        self.model_input = torch.zeros((model_batch, *self.shape[1:]), dtype=self.dtype, device=self.device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self.use_cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self._graphs = None
        self._cond = {}

    # -- one step -------------------------------------------------------------------------------------------
    def _model_time(self):
        t = self.plan.timesteps[self.step_index]
        return t.expand(self.model_input.shape[0])

    def _step(self, form):
        plan = self.plan
        m = self.model(self.model_input, self._model_time(), **self._cond)
        batch = self.shape[0]
        if self.guidance_scale is not None:
            m_uncond, m_cond = m[:batch], m[batch:]
        else:
            m_uncond, m_cond = m, None
        if self.nan_check:
            bad = ~torch.isfinite(m).all()
            self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & bad, self.step_index,
                                                  self.first_bad_step))
        x = self.buffers[form.x]
        coefs, step_index = plan.coefs, self.step_index
        if form.coef_fn is not None:
            coefs, step_index = form.coef_fn(x, m_uncond, plan.coefs[self.step_index], self.step_index), None
        ops.fused_step(
            x, m_uncond, coefs, step_index=step_index,
            history=tuple(self.buffers[h] for h in form.history),
            out=self.buffers[form.out],
            model_input=self.model_input[:batch],
            x0_out=None if form.x0_out is None else self.buffers[form.x0_out],
            seeds=self.seeds if form.noisy else None, noise_step=self.step_index,
            model_output_cond=m_cond, guidance_scale=self.guidance_scale)
        if self.guidance_scale is not None:
            self.model_input[batch:].copy_(self.model_input[:batch])
        self.step_index.add_(1)

    # -- sampling -------------------------------------------------------------------------------------------
    def _start(self, seed, init, cond):
        batch = self.shape[0]
        self.seeds.copy_(_as_seed_tensor(seed, batch, self.device))
        plan = self.plan
        x = self.buffers[plan.buffers[0]]
        if init is None:
            noise = ops.philox_normal(self.seeds, plan.num_model_evals, self.shape, device=self.device)
            x.copy_(noise.mul_(plan.init_noise_scale))
        else:
            if tuple(init.shape) != self.shape:
                raise ValueError(f"init has shape {tuple(init.shape)}; expected {self.shape}")
            x.copy_(init)
        self.model_input[:batch].copy_(x)
        if self.guidance_scale is not None:
            self.model_input[batch:].copy_(x)
        self.step_index.zero_()
        self.first_bad_step.fill_(-1)
        self._cond = self._prepare_cond(cond)

    def _prepare_cond(self, cond):
        cond = dict(cond or {})
        if self.guidance_scale is None:
            return cond
        uncond = cond.pop("uncond", None)
        merged = {}
        for key, value in cond.items():
            other = (uncond or {}).get(key)
            if other is None:
                raise ValueError(f"classifier-free guidance needs an unconditional value for {key!r} (uncond=)")
            merged[key] = torch.cat([other, value])
        return merged

    def __call__(self, seed=0, *, init=None, cond=None, callback=None):
        """Sample one batch; returns the final state (B, C, *spatial) in state dtype."""
        plan = self.plan
        self._start(seed, init, cond)
        forms = plan.forms
        for e, f in enumerate(plan.form_of_eval):
            self._step(forms[f])
            if callback is not None:
                callback(e, self.buffers[forms[f].out])
        if self.nan_check:
            first = int(self.first_bad_step)  # the one host read, after the loop
            if first >= 0:
                raise NonFiniteModelOutput(f"model output has NaN/Inf at model evaluation {first} "
                                           f"(of {plan.num_model_evals})")
        return self.buffers[plan.output].clone()


def _model_device(model):
    for p in getattr(model, "parameters", lambda: [])():
        return p.device
    return torch.device("cpu")


def _model_dtype(model):
    for p in getattr(model, "parameters", lambda: [])():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def sample(model, shape, solver="dpmpp_2m", num_steps=20, schedule=None, seed=0, device=None, dtype=None,
           cuda_graph=True, guidance_scale=None, cond=None, init=None, callback=None, **solver_opts):
    """Sample `shape` = (B, C, *spatial) volumes from `model` in one call (see `Sampler`)."""
    from .solvers import get_solver

    if isinstance(solver, str):
        if schedule is None:
            raise ValueError("schedule= is required when the solver is given by name")
        solver = get_solver(solver, schedule, num_steps, **solver_opts)
    sampler = Sampler(model, solver, shape, device=device, dtype=dtype, guidance_scale=guidance_scale,
                      cuda_graph=cuda_graph)
    return sampler(seed, init=init, cond=cond, callback=callback)
