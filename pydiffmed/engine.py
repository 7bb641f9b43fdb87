"""The sampling engine: runs a solver's SamplingPlan on the device (ARCHITECTURE §1, issue 7).

    volumes = pydiffmed.sample(model, (B, C, D, H, W), solver="dpmpp_2m", num_steps=20, seed=0)
    sampler = pydiffmed.Sampler(model, "ddim", (B, C, D, H, W), num_steps=50, dtype=torch.bfloat16)
    a, b = sampler(seed=0), sampler(seed=[7, 8, 9, 10])

A `Sampler` prepares once — the plan's tables on the device, static buffers, the device step counter, and on
a CUDA device one CUDA graph per distinct step form — and then samples many times with new seeds, conditions,
masks or start volumes. One model evaluation is: gather the timestep from the plan by the device step index,
call the model on the model-dtype input buffer, apply `ops.fused_step` (which also writes the next model
input), advance the step index. Nothing in the loop reads a device value back to the host; NaN/Inf in the
model output or the solver state is recorded in a device flag and raised after the loop with the first
evaluation where it appeared (`NonFiniteModelOutput`), and NaN/Inf in the inputs (known, mask, init, x_T,
cond) or a mask outside [0, 1] is the input's ValueError (before the loop on the CPU, after it on a GPU).

Noise: sample b of a batch uses the Philox key seeds[b] (seed + b for an int seed); the initial noise is
counter word E (= the number of model evaluations), evaluation e's update noise word e and the inpainting
re-noise of evaluation e word E + 1 + e. So a sample depends only on its own seed, never on the batch it is
in (given a model that treats samples independently).
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import warnings
import weakref

import torch

from . import backends, cpu_threads, ops
from .inverse import samplers
from .memory import InsufficientMemoryError, MemoryEstimate, available_memory, estimate_memory
from .ops._checks import dtype_name, tensor_state
from .ops.fused_step import COEF_NAMES, philox_keys

_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COL = {name: k for k, name in enumerate(COEF_NAMES)}
_HISTORY_COLS = (_COL["c1"], _COL["c2"], _COL["c3"])


class NonFiniteModelOutput(FloatingPointError):
    """The model produced NaN or Inf; the message names the first model evaluation where it happened."""


# --- arguments -----------------------------------------------------------------------------------------------

def _check_shape(shape):
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 3:
        raise ValueError(f"shape must be (B, C, *spatial) with at least one spatial dimension, got {shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must hold positive ints, got {tuple(shape)!r}")
    return tuple(int(s) for s in shape)


def _broadcast_to(name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    try:
        ok = torch.broadcast_shapes(tuple(t.shape), shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, which does not broadcast to {shape}")
    return t


def _model_device(model):
    for p in _tensors_of(model):
        return p.device
    return torch.device("cpu")


def _model_dtype(model):
    """The dtype of the model's floating-point parameters (float32 when it has none, or float64 ones)."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    for p in params:
        if p.is_floating_point():
            return p.dtype if p.dtype in _MODEL_DTYPES else torch.float32
    return torch.float32


def _tensors_of(model):
    if isinstance(model, torch.nn.Module):
        yield from model.parameters()
        yield from model.buffers()


def _needs_copy(model, device, dtype):
    """Whether the model's tensors live elsewhere or its floating-point parameters have another dtype (buffers
    alone do not count: a parameter-free model keeps its buffers' precision)."""
    if any(t.device != device for t in _tensors_of(model)):
        return True
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return any(p.is_floating_point() and p.dtype != dtype for p in params)


def _prepare_model(model, device, dtype):
    """The model on `device` in `dtype`: itself when it already is, else a converted copy (the user's module is
    never modified)."""
    if _needs_copy(model, device, dtype):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model


def _model_signature(model):
    """Where the model's tensors live: a captured CUDA graph reads exactly these addresses."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in _tensors_of(model))


def _noise_level(schedule, model_time):
    """(alpha, sigma) of the state the model is evaluated on at `model_time`."""
    alpha, sigma = schedule.alpha_sigma(schedule.t_from_model_time(float(model_time)))
    return float(alpha), float(sigma)


def _row(**values):
    row = [0.0] * len(COEF_NAMES)
    row[_COL["clip"]] = math.inf
    for name, v in values.items():
        row[_COL[name]] = float(v)
    return row


def _slab_noise_index(slab, shape, plan, data_step):
    """fused_step's noise_index for a Sampler holding depth rows [start, start + rows) of a volume `depth` rows
    deep (slab = (start, depth)); None without a slab."""
    if slab is None:
        return None
    try:
        start, depth = (int(v) for v in slab)
    except (TypeError, ValueError):
        raise TypeError(f"slab must be (start, depth) ints, got {slab!r}") from None
    if len(shape) < 3 or not 0 <= start <= start + shape[2] <= depth:
        raise ValueError(f"slab={slab!r}: the shape's {shape[2]} depth rows from row {start} must lie in the "
                         f"volume's [0, {depth})")
    if data_step is not None:
        raise ValueError("a posterior data step (measurement=) needs the whole volume; it cannot run on a slab")
    if any(form.coef_fn is not None for form in plan.forms):
        raise ValueError("this solver's updates compute per-sample numbers over the whole volume (dynamic "
                         "thresholding or Langevin step sizes); they cannot run on a slab")
    plane = math.prod(shape[3:])
    return start * plane, depth * plane


def _self_contained_start(plan, rows, k):
    """Whether evaluations k..E-1 run exactly from a state placed in the buffer evaluation k reads: no history
    term they use (nonzero c_j) reads a buffer last written before k, and the output is written after k."""
    written = {plan.forms[plan.form_of_eval[k]].x}
    for e in range(k, plan.num_model_evals):
        form = plan.forms[plan.form_of_eval[e]]
        for j, name in enumerate(form.history):
            if rows[e][_HISTORY_COLS[j]] != 0 and name not in written:
                return False
        written.add(form.out)
        if form.x0_out is not None:
            written.add(form.x0_out)
    return plan.output in written


def _solver_from(solver, schedule, num_steps, options):
    from .schedules import NoiseSchedule
    from .solvers import SOLVERS, Solver, get_solver

    if isinstance(solver, Solver):
        if schedule is not None or num_steps is not None or options:
            raise ValueError("schedule=, num_steps= and solver options go with a solver given by name; "
                             "this solver instance already has them")
        _check_plannable(type(solver))
        return solver
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a name (str) or a pydiffmed Solver, got {type(solver).__name__}")
    if schedule is None:
        schedule = NoiseSchedule.discrete("linear")
    elif isinstance(schedule, str):
        schedule = NoiseSchedule.discrete(schedule)
    elif not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule or a beta schedule name, got {type(schedule).__name__}")
    if solver in SOLVERS:  # an unknown name: get_solver says so
        _check_plannable(SOLVERS[solver])
    return get_solver(solver, schedule, 20 if num_steps is None else num_steps, **options)


def _sdedit_error(strength, problem):
    from .solvers import names

    return ValueError(f"strength={strength} (SDEdit): solver {problem}; the solvers that can start part-way: "
                      f"{', '.join(names(can_start_partway=True))}")


def _check_plannable(solver_class):
    """The engine runs a solver's fixed plan: a solver declaring none is refused (ValueError) before it is built."""
    from .solvers import names

    problem = solver_class.unsupported("plan")
    if problem:
        raise ValueError(f"{problem}; the engine runs the solvers with a fixed plan: "
                         f"{', '.join(names(plannable=True))}")


def _check_feature_cache(model, feature_cache, cache_branch):
    """(interval or None, branch or None) of feature caching, checked: an int >= 1 (None: off), a cache branch of
    the model (default 0), and a model that can run its shallow path (UNet3D)."""
    from .models import UNet3D

    if feature_cache is None:
        if cache_branch is not None:
            raise ValueError(f"cache_branch={cache_branch!r} goes with feature_cache= (the evaluations per full "
                             "model evaluation)")
        return None, None
    if isinstance(feature_cache, bool) or not isinstance(feature_cache, int):
        raise TypeError(f"feature_cache must be an int >= 1 (one full model evaluation every feature_cache "
                        f"evaluations, shallow ones between) or None, got {feature_cache!r}")
    if feature_cache < 1:
        raise ValueError(f"feature_cache must be >= 1 (one full model evaluation every feature_cache evaluations; "
                         f"1 = every evaluation full; None = off), got {feature_cache}")
    if not isinstance(model, UNet3D):
        hint = (" (a MONAI DiffusionModelUNet: convert it with pydiffmed.models.UNet3D.from_monai(model))"
                if type(model).__name__ == "DiffusionModelUNet" else "")
        raise TypeError(f"feature_cache= reuses the deep features of a pydiffmed UNet3D between evaluations; the "
                        f"model is a {type(model).__name__}{hint}")
    branch = model._check_branch(0 if cache_branch is None else cache_branch)
    return int(feature_cache), branch


# --- progress ------------------------------------------------------------------------------------------------

class _TextProgress:
    """Minimal progress line on stderr, used when tqdm is not installed (it is a dependency, but optional to
    this display)."""

    def __init__(self, total, desc):
        self.total, self.desc, self.count = total, desc, 0

    def update(self, n=1):
        self.count += n
        sys.stderr.write(f"\r{self.desc}: {self.count}/{self.total}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def progress_bar(total, enabled, desc="sampling", unit="eval", leave=False):
    """A progress bar on stderr with update(n) and close() (tqdm, or a plain line without it); None when not
    enabled. The engine counts model evaluations with it, the command volumes."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total, desc)
    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


# --- the sampler ---------------------------------------------------------------------------------------------

class Sampler:
    """Prepared sampling of `model` with `solver` at a fixed `shape` = (B, C, *spatial).

    model: any callable `model(x, t, **cond) -> output` (x: the model input (B, C, ...) in `dtype`, t: (B,)
      fp32 model times; output shaped like x). UNet3D and accelerate()d MONAI models are the fast path. The
      model must not modify x in place. For CUDA graphs it must not synchronise (no .item(), no host branches
      on tensor values) and must keep its shapes; otherwise sampling falls back to eager with a warning.
    solver: a solver name (pydiffmed.solvers.SOLVERS) with `num_steps` (default 20), `schedule` (a
      NoiseSchedule or a beta schedule name; default the DDPM/MONAI linear 1000-step schedule) and solver
      options (prediction_type, clip, eta, ...), or a Solver instance.
    device, dtype: where and in which precision the model runs (default: the model's; "auto": what
      `pydiffmed sample --dtype auto` picks, backends.auto_dtype); the model is converted (a copy; the caller's
      module is untouched) if its parameters differ. On CPU bfloat16 is the half type.
    state_dtype: the solver state (default float32, whatever the model dtype).
    guidance_scale: classifier-free guidance w: one model call per step on a 2·B batch (unconditional half
      first), combined inside fused_step as m = m_uncond + w·(m_cond - m_uncond).
    strength: SDEdit — sample from `init` volumes noised to the level of the first kept evaluation; the
      solver's last int(E·strength) evaluations run (E = its number of model evaluations), the start moved
      later (within one solver step; back to the step's start when strength keeps less than a step) to the
      first evaluation where the run is exact: the solver's updates from there on must use no history written
      before it. That holds for single-step solvers (ddim, ddpm, euler-type, rflow, Heun at step boundaries).
      Multistep solvers (dpmpp_*, unipc) keep earlier model outputs: their grid is cut instead
      (`Solver.starting_at`, diffusers' set_begin_index: the history restarts at lower order). Solvers that
      declare can_start_partway = False (pydiffmed.solvers.names(can_start_partway=False)) are refused
      (ValueError). `start_index` is the first evaluation run. A solver that declares `encodes` (an inversion)
      runs from x_T= (the volumes to encode), never from noise.
    cuda_graph: on a CUDA device, capture one graph per distinct step form on the first call (after a warm-up
      on a side stream) and replay them; graphs are re-captured when the model's tensors move or the
      conditioning or inpainting mask shapes change (a callback needs its own graphs, captured once).
    nan_check: keep the device NaN/Inf flags of the model output and the solver state (raised after the loop,
      naming the first model evaluation). Inputs (known, mask, init, x_T, cond) are always checked: NaN/Inf
      or a mask outside [0, 1] is a ValueError naming the input.
    batch_invariant: call the model on one sample at a time, so that volume k cannot depend on its batch
      companions even where the model's libraries pick algorithms by batch size (cuDNN, cuBLAS). On the CPU
      pydiffmed's models (UNet3D, accelerate()d MONAI models) give this bit for bit without it; the cost is the
      batching speed-up (benchmarks/bench_determinism.py).
    check_memory: estimate the memory (estimate_memory) and raise InsufficientMemoryError up front when the
      device lacks it.
    measurement, posterior, posterior_options: posterior sampling of an inverse problem (pydiffmed.inverse.
      samplers): a Measurement(operator, y, sigma_y) and the data step applied to every x0 estimate between the
      model call and fused_step — "projection", "dds" (the default) or "dps" — with its options. DPS runs
      eagerly (no CUDA graph).
    slab: (start, depth) when this Sampler's shape (B, C, rows, ...) holds depth rows [start, start + rows) of
      a volume `depth` rows deep (spatial parallelism, pydiffmed.spatial_parallel): the noise is that volume's
      (fused_step's noise_index), so the slabs of all ranks together draw what one process draws. Updates that
      are not elementwise (dynamic thresholding, Langevin step sizes, posterior data steps) are refused.
    feature_cache, cache_branch: DeepCache-style feature caching (Ma et al. 2023), off by default, for a UNet3D
      model: a full model evaluation every `feature_cache` evaluations (the first one run, then every N-th) keeps
      the deep features entering the decoder at skip connection `cache_branch` (default 0, the shallowest; see
      UNet3D.num_cache_branches, cache_branch_of_level) in a static buffer, and the N-1 evaluations between
      recompute only the shallow path on them (UNet3D.forward_shallow). Solver-independent; the cache holds both
      halves of a guidance batch; on CUDA the full and the shallow evaluations get one graph each. 1: every
      evaluation is full (the same samples as without). An approximation: the samples change a little
      (benchmarks/bench_feature_cache.py measures speed and quality). `cache_schedule()` lists the kinds.
    adaptive_threads: on the CPU, lower torch's thread count for the following evaluations while this process
      gets fewer cores than its threads ask for (other jobs on the same cores), and raise it again when they
      free up (pydiffmed.cpu_threads; the count is set back after each run, `thread_history` lists it per
      evaluation). None (the default): on where the samples are the same bits at any count, a pydiffmed UNet3D
      or an accelerate()d model without a posterior data step (cpu_threads.keeps_bits); off otherwise (MONAI's
      own modules and the MRI data steps' FFTs round differently with another count: 1e-7 to 1e-4 apart).
      True: on anyway; False: torch's count stays as it is.
    """

    def __init__(self, model, solver, shape, *, num_steps=None, schedule=None, device=None, dtype=None,
                 state_dtype=torch.float32, guidance_scale=None, strength=None, cuda_graph=True, nan_check=True,
                 check_memory=True, batch_invariant=False, measurement=None, posterior=None,
                 posterior_options=None, slab=None, feature_cache=None, cache_branch=None, adaptive_threads=None,
                 **solver_options):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **cond), got {type(model).__name__}")
        self.shape = _check_shape(shape)
        self.solver = _solver_from(solver, schedule, num_steps, solver_options)
        self.device = torch.device(device) if device is not None else _model_device(model)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if isinstance(dtype, str) and dtype == "auto":
            dtype = backends.auto_dtype(self.device)[0]
        self.dtype = dtype or _model_dtype(model)
        if self.dtype not in _MODEL_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if state_dtype not in _MODEL_DTYPES:
            raise TypeError(f"state_dtype must be float32, float16 or bfloat16, got {state_dtype}")
        self.state_dtype = state_dtype
        if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(
                guidance_scale, (int, float)) or not math.isfinite(guidance_scale)):
            raise TypeError(f"guidance_scale must be a finite number or None, got {guidance_scale!r}")
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.nan_check = bool(nan_check)
        self.batch_invariant = bool(batch_invariant)

        # host side of the plan: validated on the CPU, then the tables move to the device once
        plan = self.solver.plan("cpu")
        self._rows = plan.coefs.numpy().tolist()
        self.start_index = self._start_index(plan, strength)
        if self.start_index is None:  # SDEdit with a multistep solver: cut its grid, restart its history
            self.solver = self._cut_solver(plan, strength)
            plan, self.start_index = self.solver.plan("cpu"), 0
            self._rows = plan.coefs.numpy().tolist()
        self.num_model_evals = plan.num_model_evals
        self._times = plan.timesteps.numpy().tolist()
        self.strength = strength
        self.feature_cache, self.cache_branch = _check_feature_cache(model, feature_cache, cache_branch)
        self.memory_estimate = self._check_memory(model) if check_memory else None
        self.model = _prepare_model(model, self.device, self.dtype)
        self.plan = plan
        self._timesteps = plan.timesteps.to(self.device)
        self._coefs = plan.coefs.to(self.device)
        self._estimate_coefs = self._estimate_table(plan.coefs).to(self.device)
        self._inpaint_coefs = self._inpaint_table().to(self.device)
        start_row = self._start_row()
        self._start_coefs = torch.tensor(start_row, dtype=torch.float32).to(self.device)

        batch = self.shape[0]
        self.buffers = {name: torch.zeros(self.shape, dtype=state_dtype, device=self.device)
                        for name in plan.buffers}
        self.model_batch = 2 * batch if self.guidance_scale is not None else batch
        self.model_input = torch.zeros((self.model_batch, *self.shape[1:]), dtype=self.dtype, device=self.device)
        self.step_index = torch.zeros((), dtype=torch.int64, device=self.device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.first_bad_state = torch.full((), -1, dtype=torch.int64, device=self.device)
        self.bad_inputs = torch.zeros((), dtype=torch.int64, device=self.device)  # bit k: _input_problems[k]
        self._input_problems = []
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._inpaint_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self._preview = None
        self._known = self._noised_known = self._mask = None
        self._cond = {}
        self._cond_signature = ()
        self.data_step = samplers.from_arguments(measurement, posterior, posterior_options)
        self._noise_index = _slab_noise_index(slab, self.shape, plan, self.data_step)
        if self.data_step is not None:  # the posterior's data step (inverse/samplers.py), checked against the plan
            self.data_step.bind(solver=self.solver, rows=self._rows, times=self._times, shape=self.shape,
                                device=self.device, state_dtype=self.state_dtype, model=self.model)
        self.adaptive_threads = self.device.type == "cpu" and (
            cpu_threads.keeps_bits(self.model) and self.data_step is None if adaptive_threads is None
            else bool(adaptive_threads))
        self.thread_history = []  # with adaptive_threads: torch's thread count at each evaluation of the last run
        self.use_cuda_graph = bool(cuda_graph) and self.device.type == "cuda" and not (
            self.data_step is not None and self.data_step.differentiates)  # DPS's backward is not captured
        self.graph_failure = None      # why capture failed (then sampling is eager), or None
        self._graphs = {}
        self._graph_key = self._failed_key = None
        self._pool = None
        self._features = None   # feature caching: the deep features of the last full evaluation (model batch)
        if self.feature_cache is not None:
            shape = self.model.cache_feature_shape(self.model_input.shape, self.cache_branch)
            self._features = torch.zeros(shape, dtype=self.dtype, device=self.device).to(
                memory_format=torch.channels_last_3d if len(shape) == 5 else torch.channels_last)

    # -- preparation ------------------------------------------------------------------------------------------
    def _start_index(self, plan, strength):
        """The first model evaluation SDEdit runs, or None when the plan cannot start exactly near it (the
        solver keeps history from earlier evaluations: its grid must be cut instead)."""
        if strength is None:
            return 0
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        problem = self.solver.unsupported("start_partway")
        if problem:
            raise _sdedit_error(strength, problem)
        evals = plan.num_model_evals
        keep = int(evals * strength)
        if keep < 1:
            raise ValueError(f"strength={strength} keeps no model evaluation of {evals}; raise it to at least "
                             f"{1 / evals:.3g}")
        # a solver step may take several evaluations (Heun, RK4, predictor-corrector): the start may move to
        # the next exact start within one step, no further (or, when strength keeps less than that, back to the
        # exact start before it)
        per_step = max(1, math.ceil(evals / self.solver.num_steps))
        first = evals - keep
        later = range(first, min(first + per_step, evals))
        earlier = range(first - 1, max(first - per_step, -1), -1)
        for k in (*later, *earlier):
            if _self_contained_start(plan, self._rows, k):
                return k
        return None

    def _cut_solver(self, plan, strength):
        step = (plan.num_model_evals - int(plan.num_model_evals * strength)) * self.solver.num_steps \
            // plan.num_model_evals
        try:
            return self.solver.starting_at(step)
        except ValueError as error:
            raise _sdedit_error(strength, f"{self.solver.name} cannot start at step {step} of "
                                          f"{self.solver.num_steps} ({error})") from None

    def _start_row(self):
        """fused_step row of the initial state: init_noise_scale·z, or SDEdit's alpha·init + sigma·z."""
        if self.strength is None:
            return _row(s=self.plan.init_noise_scale)
        alpha, sigma = _noise_level(self.solver.schedule, self._times[self.start_index])
        return _row(a=alpha, s=sigma)

    def _estimate_table(self, coefs):
        """Per evaluation, the row computing only the x0 estimate (for previews)."""
        table = torch.zeros_like(coefs)
        for name in ("p_x", "p_m", "clip"):
            table[:, _COL[name]] = coefs[:, _COL[name]]
        table[:, _COL["b"]] = 1.0
        return table

    def _inpaint_table(self):
        """Row e re-noises the known volume to the level of the state evaluation e produces: that of evaluation
        e + 1's model time, and the clean data (alpha 1, sigma 0) after the last evaluation."""
        rows = []
        for e in range(self.num_model_evals):
            if e + 1 < self.num_model_evals:
                alpha, sigma = _noise_level(self.solver.schedule, self._times[e + 1])
            else:
                alpha, sigma = 1.0, 0.0
            rows.append(_row(a=alpha, s=sigma))
        return torch.tensor(rows, dtype=torch.float32)

    def _check_memory(self, model):
        estimate = estimate_memory(model, self.shape, self.dtype, solver=self.solver, state_dtype=self.state_dtype,
                                   guidance=self.guidance_scale is not None, device=self.device,
                                   cache_branch=self.cache_branch if self.feature_cache is not None else None)
        available = available_memory(self.device)
        if available is None:
            return estimate
        resident = sum(t.numel() * t.element_size() for t in _tensors_of(model)
                       if t.device == self.device and (t.dtype == self.dtype or not t.is_floating_point()))
        needed = estimate.total - resident
        if needed > 0.95 * available:
            gib = 2.0 ** 30
            raise InsufficientMemoryError(
                f"sampling {self.shape} needs about {needed / gib:.2f} GiB more on {self.device} "
                f"({estimate}) but only {available / gib:.2f} GiB are available; reduce the batch size "
                f"(B={self.shape[0]}) or the volume {self.shape[2:]}, run the model in bfloat16/float16 (dtype=), "
                "drop classifier-free guidance (it doubles the model batch), or pass check_memory=False to try "
                "anyway")
        return estimate

    # -- one model evaluation ---------------------------------------------------------------------------------
    def _step(self, form_index, blend_target, cache, preview):
        """Evaluation `step_index` (a device tensor): model (cache: None, or "full"/"shallow" with feature caching),
        NaN flag, fused update, inpainting blend, CFG input copy, step counter. Reads no device value on the host."""
        form = self.plan.forms[form_index]
        batch = self.shape[0]
        t = torch.index_select(self._timesteps, 0, self.step_index.reshape(1)).expand(self.model_batch)
        if self.data_step is None:
            m, leaf = self._evaluate_model(t, cache=cache), None
        else:  # DPS calls the model on a leaf tensor it differentiates against
            m, leaf = self.data_step.evaluate(lambda t, *x: self._evaluate_model(t, *x, cache=cache), t,
                                              self.model_input)
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"the model returned {type(m).__name__}; expected a tensor")
        if self.plan.model_output_channels is not None:
            m = m[:, self.plan.model_output_channels]
        if tuple(m.shape) != tuple(self.model_input.shape):
            raise ValueError(f"the model returned shape {tuple(m.shape)}; expected {tuple(self.model_input.shape)}")
        if m.dtype not in _MODEL_DTYPES:
            m = m.float()
        if self.nan_check:
            bad = ~torch.isfinite(m).all()
            self.first_bad_step.copy_(torch.where((self.first_bad_step < 0) & bad, self.step_index,
                                                  self.first_bad_step))
        if self.guidance_scale is not None:
            m_uncond, m_cond, scale = m[:batch], m[batch:], self.guidance_scale
        else:
            m_uncond, m_cond, scale = m, None, None
        x = self.buffers[form.x]
        if self.data_step is not None:  # the posterior's data step on the x0 estimate: m -> m' (inverse/samplers.py)
            if m_cond is not None:
                m_uncond, m_cond, scale = torch.lerp(m_uncond.float(), m_cond.float(), scale), None, None
            m_uncond = self.data_step(x, m_uncond, self.step_index, leaf)
        if preview:
            ops.fused_step(x, m_uncond, self._estimate_coefs, step_index=self.step_index, out=self._preview,
                           model_output_cond=m_cond, guidance_scale=scale)
        coefs, step_index = self._coefs, self.step_index
        if form.coef_fn is not None:
            if m_cond is not None:
                m_uncond, m_cond, scale = torch.lerp(m_uncond.float(), m_cond.float(), scale), None, None
            row = torch.index_select(self._coefs, 0, self.step_index.reshape(1))[0]
            coefs, step_index = form.coef_fn(x, m_uncond, row, self.step_index), None
        out = self.buffers[form.out]
        model_input = self.model_input[:batch]
        ops.fused_step(
            x, m_uncond, coefs, step_index=step_index,
            history=tuple(self.buffers[h] for h in form.history),
            out=out, model_input=model_input,
            x0_out=None if form.x0_out is None else self.buffers[form.x0_out],
            seeds=self.seeds if form.noisy else None, noise_step=self.step_index, noise_index=self._noise_index,
            model_output_cond=m_cond, guidance_scale=scale)
        if blend_target is not None:
            out = self.buffers[blend_target]
            self._blend(out, model_input)
        if self.nan_check:  # a finite but huge model output can still overflow the state
            bad = ~torch.isfinite(out).all()
            self.first_bad_state.copy_(torch.where((self.first_bad_state < 0) & bad, self.step_index,
                                                   self.first_bad_state))
        if self.guidance_scale is not None:
            self.model_input[batch:].copy_(model_input)
        self.step_index.add_(1)

    def _evaluate_model(self, t, model_input=None, cache=None):
        model_input = self.model_input if model_input is None else model_input
        if not self.batch_invariant:
            return self._call_model(model_input, t, self._cond, cache, slice(None))
        outputs = []
        for i in range(self.model_batch):  # every cond tensor has the model batch as its leading dimension
            cond = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in self._cond.items()}
            outputs.append(self._call_model(model_input[i:i + 1], t[i:i + 1], cond, cache, slice(i, i + 1)))
        return torch.cat(outputs) if all(isinstance(m, torch.Tensor) for m in outputs) else outputs[0]

    def _call_model(self, x, t, cond, cache, rows):
        """The model on x; with feature caching a full evaluation also stores the deep features of these model
        batch rows in the static buffer, and a shallow one reads them back (UNet3D.forward_and_cache /
        forward_shallow)."""
        if cache is None:
            return self.model(x, t, **cond)
        if cache == "shallow":
            return self.model.forward_shallow(x, t, self._features[rows], branch=self.cache_branch, **cond)
        m, features = self.model.forward_and_cache(x, t, branch=self.cache_branch, **cond)
        with torch.no_grad():  # DPS differentiates through this evaluation only, never into a later one
            self._features[rows].copy_(features)
        return m

    def _blend(self, target, model_input):
        """RePaint: the known region of `target` becomes the known volume re-noised to target's level."""
        torch.add(self.step_index, self.num_model_evals + 1, out=self._inpaint_step)
        ops.fused_step(self._known, self._known, self._inpaint_coefs, step_index=self.step_index,
                       out=self._noised_known, seeds=self.seeds, noise_step=self._inpaint_step,
                       noise_index=self._noise_index)
        if self._mask.dtype == torch.bool:
            torch.where(self._mask, self._noised_known, target, out=target)
        else:
            target.lerp_(self._noised_known, self._mask)
        model_input.copy_(target)

    # -- per-call inputs --------------------------------------------------------------------------------------
    def _set_cond(self, cond, uncond):
        if cond is not None and not isinstance(cond, dict):
            raise TypeError("cond must be a dict of model keyword arguments (e.g. {'context': c, "
                            "'class_labels': y})")
        if uncond is not None and not isinstance(uncond, dict):
            raise TypeError("uncond must be a dict with the same keys as cond")
        cond, batch = dict(cond or {}), self.shape[0]
        if self.guidance_scale is None:
            if uncond is not None:
                raise ValueError("uncond= is only used with classifier-free guidance (guidance_scale=)")
            merged = {k: self._batched(f"cond[{k!r}]", v, batch) for k, v in cond.items()}
        else:
            if not cond:
                raise ValueError("classifier-free guidance (guidance_scale=) needs cond= (and uncond=)")
            uncond = dict(uncond or {})
            if set(uncond) != set(cond):
                raise ValueError(f"uncond must give the unconditional value of every cond key {sorted(cond)}; "
                                 f"got keys {sorted(uncond)}")
            merged = {}
            for k, v in cond.items():
                u = uncond[k]
                if isinstance(v, torch.Tensor) != isinstance(u, torch.Tensor):
                    raise TypeError(f"cond[{k!r}] and uncond[{k!r}] must both be tensors or both not")
                if isinstance(v, torch.Tensor):
                    merged[k] = torch.cat([self._batched(f"uncond[{k!r}]", u, batch),
                                           self._batched(f"cond[{k!r}]", v, batch)])
                elif u != v:
                    raise ValueError(f"cond[{k!r}] and uncond[{k!r}] are not tensors and differ")
                else:
                    merged[k] = v
        signature = tuple(sorted((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else ("value", v))
                                 for k, v in merged.items()))
        if signature != self._cond_signature:
            self._cond = {k: (torch.empty(v.shape, dtype=v.dtype, device=self.device)
                              if isinstance(v, torch.Tensor) else v) for k, v in merged.items()}
            self._cond_signature = signature
        for k, v in merged.items():
            if isinstance(v, torch.Tensor):
                self._cond[k].copy_(v)
                if v.is_floating_point():
                    name = f"cond[{k!r}]" if self.guidance_scale is None else f"cond[{k!r}] or uncond[{k!r}]"
                    self._flag_input(name, v.dtype, self._cond[k])

    def _flag_input(self, name, dtype, copy):
        """Record on the device, without reading it, whether this call's input `name` (of `dtype`, copied into
        `copy`) has NaN/Inf; raise_if_nonfinite reports it as the input's problem, not the model's."""
        converted = "" if dtype == copy.dtype else f" (once converted to {dtype_name(copy.dtype)})"
        self._flag(f"{name} has NaN/Inf values{converted}", ~torch.isfinite(copy).all())

    def _flag(self, problem, bad):
        if len(self._input_problems) < 63:
            self.bad_inputs.add_(bad.to(torch.int64) * (1 << len(self._input_problems)))
            self._input_problems.append(problem)

    @staticmethod
    def _batched(name, v, batch):
        if not isinstance(v, torch.Tensor):
            return v
        if v.ndim == 0 or v.shape[0] not in (1, batch):
            raise ValueError(f"{name} must have a leading batch dimension of 1 or {batch}, got shape "
                             f"{tuple(v.shape)}")
        return v.expand(batch, *v.shape[1:])

    def _set_inpainting(self, mask, known):
        if (mask is None) != (known is None):
            raise ValueError("inpainting needs both mask= (1/True where `known` is kept) and known=")
        if mask is None:
            return False
        _broadcast_to("mask", mask, self.shape)
        _broadcast_to("known", known, self.shape)
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"mask must be bool or floating point, got {dtype_name(mask.dtype)}")
        if not known.is_floating_point():
            raise TypeError(f"known must be floating point, got {dtype_name(known.dtype)}")
        mask_dtype = torch.bool if mask.dtype == torch.bool else self.state_dtype
        if self._mask is None or self._mask.shape != mask.shape or self._mask.dtype != mask_dtype:
            self._mask = torch.empty(mask.shape, dtype=mask_dtype, device=self.device)
        if self._known is None:
            self._known = torch.empty(self.shape, dtype=self.state_dtype, device=self.device)
            self._noised_known = torch.empty_like(self._known)
        self._mask.copy_(mask)
        self._known.copy_(known.expand(self.shape))
        self._flag_input("known", known.dtype, self._known)
        if mask_dtype != torch.bool:
            self._flag_input("mask", mask.dtype, self._mask)
            self._flag("mask has values outside [0, 1] (1 where `known` is kept, 0 where new content is sampled)",
                       ((self._mask < 0) | (self._mask > 1)).any())
        return True

    def _kinds(self, inpaint):
        """Per evaluation (form index, buffer to blend with the known volume or None, _cache_kind)."""
        kinds = []
        last = self.num_model_evals - 1
        for e, f in enumerate(self.plan.form_of_eval):
            target = None
            if inpaint:
                target = self.plan.output if e == last else self.plan.forms[f].out
            kinds.append((f, target, self._cache_kind(e)))
        return kinds

    def _cache_kind(self, e):
        """Feature caching's kind of evaluation e: None (caching off, or every evaluation full), "full" for the
        first evaluation run and every feature_cache-th after it (DeepCache's uniform 1:N), else "shallow"."""
        if self.feature_cache is None or self.feature_cache == 1:
            return None
        return "full" if (e - self.start_index) % self.feature_cache == 0 else "shallow"

    def cache_schedule(self):
        """Per model evaluation this Sampler runs (from start_index): "full" or "shallow" with feature caching,
        None where the model runs as it is."""
        return [self._cache_kind(e) for e in range(self.start_index, self.num_model_evals)]

    # -- CUDA graphs ------------------------------------------------------------------------------------------
    def _graphs_ready(self, kinds, preview):
        """Capture (or reuse) one graph per distinct kind; False (after a warning) when capture fails."""
        key = (_model_signature(self.model), self._cond_signature,
               None if self._mask is None else (tuple(self._mask.shape), self._mask.dtype))
        if key != self._graph_key:
            self._graphs, self._graph_key = {}, key
        if self._failed_key == (key, preview):
            return False
        first_eval = {}
        for e in range(self.start_index, self.num_model_evals):
            first_eval.setdefault(kinds[e], e)
        missing = [kind for kind in first_eval if (kind, preview) not in self._graphs]
        if not missing:
            return True
        try:
            self._capture(missing, first_eval, preview)
        except Exception as exc:  # a model that syncs, allocates on the host or changes shape cannot be captured
            self.graph_failure = f"{type(exc).__name__}: {exc}"
            self._graphs, self._pool = {}, None
            self._failed_key = (key, preview)   # not retried until the model, conditioning or mask change
            warnings.warn(f"CUDA graph capture failed, sampling eagerly instead ({self.graph_failure}). Models "
                          "replayed from a graph must not synchronise (.item(), printing or branching on tensor "
                          "values) or change shapes; pass cuda_graph=False to skip capturing.", RuntimeWarning,
                          stacklevel=3)
            return False
        return True

    def _capture(self, kinds, first_eval, preview):
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # warm-up: first-call work (Triton/CuPy compilation, cuDNN/cuBLAS setup) stays out of the capture
            for kind in kinds:
                self.step_index.fill_(first_eval[kind])
                self._step(*kind, preview)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            # Graphs share one pool: only the static buffers (allocated outside) carry data between them, and
            # they replay one after another on one stream, so their temporaries may reuse the same memory.
            self._pool = torch.cuda.graph_pool_handle()
        for kind in kinds:
            self.step_index.fill_(first_eval[kind])
            graph = torch.cuda.CUDAGraph()
            # the outer context restores the caller's stream even when a failed capture's exit raises
            with torch.cuda.stream(stream):
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    self._step(*kind, preview)
            self._graphs[(kind, preview)] = graph

    # -- sampling ---------------------------------------------------------------------------------------------
    def launch(self, seed=0, *, cond=None, uncond=None, mask=None, known=None, init=None, x_T=None,
               callback=None, progress=False):
        """Run one batch without waiting for it: returns the result (B, C, *spatial) in state_dtype (a new
        tensor; on a GPU still being computed) and reads no device value. `raise_if_nonfinite()` then reports
        NaN/Inf; `__call__` does both. Arguments as for __call__."""
        batch = self.shape[0]
        seeds = philox_keys(seed, batch)
        self.bad_inputs.zero_()
        self._input_problems = []
        self._set_cond(cond, uncond)
        inpaint = self._set_inpainting(mask, known)
        if self.strength is not None:
            if init is None:
                raise ValueError("this Sampler was built with strength= (SDEdit): pass init= (the volume to start "
                                 "from)")
            _broadcast_to("init", init, self.shape)
        elif init is not None:
            raise ValueError("init= (SDEdit) needs strength= when the Sampler is built (the noise level to start "
                             "from); use x_T= to give the initial state itself")
        if x_T is not None:
            if self.strength is not None:
                raise ValueError("x_T= and init= (SDEdit) exclude each other")
            if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != self.shape:
                raise ValueError(f"x_T must be a tensor of shape {self.shape}, got "
                                 f"{tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
        elif self.solver.encodes:
            raise ValueError(f"{self.solver.unsupported('sample')}: pass x_T= (the volumes to encode)")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable as callback(step, x0_estimate)")
        preview = callback is not None
        if preview and self._preview is None:
            self._preview = torch.zeros(self.shape, dtype=self.state_dtype, device=self.device)
        kinds = self._kinds(inpaint)

        # DPS differentiates through the model: its step runs with autograd on (only its leaf input needs grad)
        with torch.set_grad_enabled(self.data_step is not None and self.data_step.differentiates):
            graphs = self.use_cuda_graph and self._graphs_ready(kinds, preview)
            self._start(seeds, init, x_T)
            if self.device.type == "cpu":  # reading the flags costs nothing here: fail before the run
                self._raise_if_bad_inputs()
            bar = progress_bar(self.num_model_evals - self.start_index, progress)
            threads = cpu_threads.AdaptiveThreads() if self.adaptive_threads else None
            try:
                for e in range(self.start_index, self.num_model_evals):
                    if graphs:
                        self._graphs[(kinds[e], preview)].replay()
                    elif threads is not None:
                        threads.run(functools.partial(self._step, *kinds[e], preview), kinds[e])
                    else:
                        self._step(*kinds[e], preview)
                    if bar is not None:
                        bar.update(1)
                    if callback is not None:
                        callback(e, self._preview)
            finally:
                if bar is not None:
                    bar.close()
                if threads is not None:
                    threads.restore()
                    self.thread_history = threads.history
            return self.buffers[self.plan.output].clone()

    def _start(self, seeds, init, x_T):
        if self.device.type == "cuda" and seeds.device.type == "cpu" and torch.cuda.is_available():
            seeds = seeds.pin_memory()
        self.seeds.copy_(seeds.to(self.device, non_blocking=True))
        x = self.buffers[self.plan.forms[self.plan.form_of_eval[self.start_index]].x]
        batch = self.shape[0]
        if x_T is not None:
            x.copy_(x_T)
            self._flag_input("x_T", x_T.dtype, x)
            self.model_input[:batch].copy_(x)
        else:
            if init is not None:
                x.copy_(init.expand(self.shape))
                self._flag_input("init", init.dtype, x)
            ops.fused_step(x, x, self._start_coefs, out=x, model_input=self.model_input[:batch], seeds=self.seeds,
                           noise_step=self.num_model_evals, noise_index=self._noise_index)
        if self.guidance_scale is not None:
            self.model_input[batch:].copy_(self.model_input[:batch])
        self.step_index.fill_(self.start_index)
        self.first_bad_step.fill_(-1)
        self.first_bad_state.fill_(-1)

    def _raise_if_bad_inputs(self, bad=None):
        bad = int(self.bad_inputs) if bad is None else bad
        if bad:
            raise ValueError("; ".join(p for k, p in enumerate(self._input_problems) if bad >> k & 1))

    def raise_if_nonfinite(self):
        """After a run (one host read): ValueError if its inputs (known, mask, init, x_T, cond tensors) had
        NaN/Inf or the mask left [0, 1]; NonFiniteModelOutput if the model output had NaN/Inf, or if the solver
        state became NaN/Inf (a finite but huge model output), naming the first model evaluation where it did."""
        if not self.nan_check and not self._input_problems:
            return
        first, first_state, bad = torch.stack([self.first_bad_step, self.first_bad_state,
                                               self.bad_inputs]).tolist()
        self._raise_if_bad_inputs(bad)
        if not self.nan_check:
            return
        if first >= 0 and not 0 <= first_state < first:
            raise NonFiniteModelOutput(f"the model output has NaN/Inf, first at model evaluation {first} (model "
                                       f"time {self._times[first]:g}) of {self.num_model_evals}")
        if first_state >= 0:  # overflowed while the model output was still finite
            raise NonFiniteModelOutput(
                f"the solver state became NaN/Inf at model evaluation {first_state} (model time "
                f"{self._times[first_state]:g}) of {self.num_model_evals}: the model output was finite but too large "
                f"for the {dtype_name(self.state_dtype)} state")

    def __call__(self, seed=0, *, cond=None, uncond=None, mask=None, known=None, init=None, x_T=None,
                 callback=None, progress=False):
        """Sample one batch; returns the final state (B, C, *spatial) in state_dtype.

        seed: an int (sample b gets seed + b) or one seed per sample (sequence or integer tensor).
        cond / uncond: dicts of model keyword arguments (cross-attention `context`, `class_labels`, ...), tensors
          with a leading batch dimension of B (or 1). With guidance_scale, uncond gives the unconditional
          values (same keys) and the model sees cat([uncond, cond]) along the batch.
        mask, known: RePaint-style inpainting. mask (bool, or float in [0, 1] for soft blending) broadcasts to
          the shape and is 1/True where `known` is kept. After every update the known region of the new state
          is replaced by `known` re-noised (fresh Philox noise) to that state's noise level; after the last
          update the known region equals `known` exactly.
        init: SDEdit start volume (broadcasts to the shape; needs strength= at construction). x_T: the initial
          state itself (default: init_noise_scale · Philox noise).
        callback(step, x0_estimate): called after evaluation `step` with the x0 estimate of that evaluation (a
          buffer reused by the next step: clone it to keep it). Reading it synchronises with the device.
        progress: show a progress bar (tqdm), advanced from the host-side loop counter (no device sync; on a
          GPU it shows evaluations queued, which run ahead of those finished).
        """
        out = self.launch(seed, cond=cond, uncond=uncond, mask=mask, known=known, init=init, x_T=x_T,
                          callback=callback, progress=progress)
        self.raise_if_nonfinite()
        return out


# --- one-call API ----------------------------------------------------------------------------------------------

_CACHE_SIZE = 2
_sampler_cache: list = []   # (key, weakref to the caller's model, Sampler), most recent last


def clear_cache():
    """Forget the Samplers (and their CUDA graphs) kept by `sample` for reuse."""
    _sampler_cache.clear()


def _plan_key(solver):
    return solver.plan("cpu").identity(), type(solver).__name__


def sample(model, shape, solver="dpmpp_2m", num_steps=None, schedule=None, seed=0, device=None, dtype=None, *,
           state_dtype=torch.float32, cuda_graph=True, guidance_scale=None, cond=None, uncond=None, mask=None,
           known=None, init=None, strength=None, x_T=None, callback=None, progress=True, nan_check=True,
           check_memory=True, batch_invariant=False, measurement=None, posterior=None, posterior_options=None,
           distributed=False, feature_cache=None, cache_branch=None, autoencoder=None, scale_factor=1.0,
           decode_tile=None, decode_max_memory=None, decode_storage=None, adaptive_threads=None, **solver_options):
    """Sample `shape` = (B, C, *spatial) volumes from `model` in one call; returns them in state_dtype.

    See `Sampler` for the arguments (solver by name with num_steps (default 20), schedule and solver options such as
    prediction_type="v_prediction", clip=1.0, eta=1.0; or a Solver instance) and `Sampler.__call__` for seed,
    cond/uncond, mask/known, init (with strength), x_T, callback and progress. On a CUDA device with
    cuda_graph=True the prepared Sampler and its graphs are kept (up to two, see clear_cache) and reused by the
    next call with the same model (same tensors, weights unchanged), shape, dtypes and solver plan.
    measurement=, posterior=, posterior_options=: posterior sampling (see `Sampler`; such a Sampler is not kept).
    feature_cache=N (cache_branch=k): DeepCache-style feature caching of a UNet3D, off by default (see `Sampler`).
    adaptive_threads: the CPU thread count follows the cores this process gets (see `Sampler`; default: where
    that leaves the samples' bits unchanged).
    distributed=True (inside an initialised torch.distributed process group): every rank calls sample with the same
    arguments; rank r samples volumes r, r + world_size, ... of the batch and every rank returns the whole batch,
    equal to what one process would sample (pydiffmed.distributed).
    autoencoder= (a latent model): `shape` is the latent shape (B, latent_channels, *latent spatial; see
    ModelInfo.latent_shape) and so are mask/known/init/x_T; the sampled latents are decoded as MONAI's
    LatentDiffusionInferer does, autoencoder.decode(latents / scale_factor), by depth slabs with decode_tile /
    decode_max_memory / decode_storage (pydiffmed.latent.decode_latents; decode_max_memory="auto": whole where it
    fits the free memory, else the deepest slabs that fit); the images are returned in state_dtype."""
    shape = _check_shape(shape)
    latent = _latent_options(autoencoder, scale_factor, decode_tile, decode_max_memory, decode_storage, state_dtype)
    if latent is not None and check_memory:
        from .latent import check_decode_memory

        check_decode_memory(autoencoder, shape, tile=decode_tile, max_memory=decode_max_memory,
                            storage=decode_storage)
    if distributed:
        return _decoded(latent, _sample_distributed(model, shape, seed, dict(
            solver=solver, num_steps=num_steps, schedule=schedule, device=device, dtype=dtype,
            state_dtype=state_dtype, cuda_graph=cuda_graph, guidance_scale=guidance_scale, cond=cond, uncond=uncond,
            mask=mask, known=known, init=init, strength=strength, x_T=x_T, callback=callback, progress=progress,
            nan_check=nan_check, check_memory=check_memory, batch_invariant=batch_invariant,
            measurement=measurement, posterior=posterior, posterior_options=posterior_options,
            feature_cache=feature_cache, cache_branch=cache_branch, adaptive_threads=adaptive_threads,
            **solver_options)))
    solver = _solver_from(solver, schedule, num_steps, solver_options)
    device = torch.device(device) if device is not None else _model_device(model)
    options = dict(device=device, dtype=dtype, state_dtype=state_dtype, guidance_scale=guidance_scale,
                   strength=strength, cuda_graph=cuda_graph, nan_check=nan_check, check_memory=check_memory,
                   batch_invariant=batch_invariant, feature_cache=feature_cache, cache_branch=cache_branch,
                   adaptive_threads=adaptive_threads)
    cacheable = cuda_graph and device.type == "cuda" and measurement is None
    sampler = None
    if cacheable:
        # a Sampler holding a converted copy must not outlive in-place changes of the caller's weights
        versions = tuple(tensor_state(t) for t in _tensors_of(model)) \
            if _needs_copy(model, device, dtype or _model_dtype(model)) else ()
        key = (id(model), _model_signature(model), versions, shape,
               tuple(sorted((k, str(v)) for k, v in options.items())), _plan_key(solver))
        for i, (k, ref, cached) in enumerate(_sampler_cache):
            if k == key and ref() is model:
                sampler = cached
                _sampler_cache.append(_sampler_cache.pop(i))
                break
    if sampler is None:
        sampler = Sampler(model, solver, shape, measurement=measurement, posterior=posterior,
                          posterior_options=posterior_options, **options)
        if cacheable:
            _sampler_cache.append((key, weakref.ref(model), sampler))
            del _sampler_cache[:-_CACHE_SIZE]
    return _decoded(latent, sampler(seed, cond=cond, uncond=uncond, mask=mask, known=known, init=init, x_T=x_T,
                                    callback=callback, progress=progress))


def _latent_options(autoencoder, scale_factor, tile, max_memory, storage, state_dtype):
    """sample()'s decoding of latents (None without an autoencoder), checked before any sampling."""
    if autoencoder is None:
        if (tile, max_memory, storage) != (None, None, None) or scale_factor != 1.0:
            raise ValueError("scale_factor and decode_tile/decode_max_memory/decode_storage go with autoencoder=")
        return None
    from .latent import check_decode_options, check_scale_factor

    check_decode_options(tile, max_memory)
    return dict(autoencoder=autoencoder, scale_factor=check_scale_factor(scale_factor), tile=tile,
                max_memory=max_memory, storage=storage, state_dtype=state_dtype)


def _decoded(latent, latents):
    if latent is None:
        return latents
    from .latent import decode_latents

    options = dict(latent)
    state_dtype = options.pop("state_dtype")
    return decode_latents(latents=latents, **options).to(state_dtype)


def _sample_distributed(model, shape, seed, options):
    """sample(..., distributed=True): this rank's share of the batch, then the whole batch gathered."""
    from . import distributed

    world = distributed.current_world()
    if not world.distributed:
        raise ValueError("distributed=True needs an initialised torch.distributed process group with more than one "
                         "process (start the script with torchrun and call torch.distributed.init_process_group)")
    if options["measurement"] is not None:
        raise ValueError("distributed=True does not take a measurement yet; sample each measurement in one process")
    batch = shape[0]
    seeds = philox_keys(seed, batch)
    mine = list(range(world.rank, batch, world.world_size))

    def share(value, ndim=None):  # a per-sample tensor (leading dimension B) is cut to this rank's samples
        if isinstance(value, dict):
            return {k: share(v) for k, v in value.items()}
        per_sample = isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
        return value[mine] if per_sample and ndim in (None, value.ndim) else value

    for name in ("cond", "uncond"):  # model keyword tensors have a leading batch dimension of B or 1
        options[name] = share(options[name])
    for name in ("mask", "known", "init", "x_T"):  # these broadcast to the shape: per-sample only at full rank
        options[name] = share(options[name], len(shape))
    device = torch.device(options["device"]) if options["device"] is not None else _model_device(model)
    if mine:
        local = sample(model, (len(mine),) + shape[1:], seed=seeds[mine], **options)
    else:  # a batch smaller than the world: this rank only takes part in the gather
        local = torch.empty((0,) + shape[1:], dtype=options["state_dtype"], device=device)
    return distributed.gather_batch(local, mine, batch, world)


__all__ = ["InsufficientMemoryError", "MemoryEstimate", "NonFiniteModelOutput", "Sampler", "available_memory",
           "clear_cache", "estimate_memory", "sample"]
