"""SamplingPlan and StepForm: the contract between solvers and the engine (ARCHITECTURE §1).

A plan is numbers plus a little wiring: for model evaluation e the engine calls the model on the model input
(written from the previous form's `out`) at `timesteps[e]`, then applies `ops.fused_step` with row `coefs[e]`
to the buffers named by `forms[form_of_eval[e]]`. Validated when built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ops.fused_step import COEF_NAMES

K = len(COEF_NAMES)
_COL = {name: k for k, name in enumerate(COEF_NAMES)}


def _tensor_identity(t: torch.Tensor) -> tuple:
    t = t.detach().to("cpu").contiguous()
    return (str(t.dtype), tuple(t.shape), t.numpy().tobytes())


def coef_fn_identity(fn):
    if fn is None:
        return None
    identity = getattr(fn, "identity", None)
    return (type(fn).__name__, identity()) if callable(identity) else ("object", id(fn))


@dataclass(frozen=True)
class StepForm:
    """Which buffers one fused_step call reads and writes.

    x: buffer read as fused_step's x (the buffer the model was just evaluated on); history: buffers bound to
    h1..h3; out: buffer receiving x' (the next model input is written from it); x0_out: buffer receiving the
    x0 estimate (a history slot), or None; noisy: whether the step draws Philox noise (noise_step = e);
    coef_fn: None, or a sync-free callable (x, m, row, step_index) -> (B, K) row for coefficients that depend
    on device values (Langevin step sizes, dynamic thresholding)."""
    x: str
    history: tuple = ()
    out: str = "x"
    x0_out: Optional[str] = None
    noisy: bool = False
    coef_fn: Optional[Callable] = field(default=None, compare=False)


@dataclass
class SamplingPlan:
    timesteps: torch.Tensor            # (E,) fp32: the model's time input for evaluation e
    coefs: torch.Tensor                # (E, K) fp32: the fused_step row of evaluation e
    buffers: tuple                     # buffer names; buffers[0] ("x") holds the initial state
    forms: list                        # StepForm per distinct form
    form_of_eval: tuple                # (E,) host ints: the form of evaluation e
    init_noise_scale: float            # x_T = init_noise_scale · philox_normal(seeds, step=E, shape)
    output: str                        # buffer holding the result after the last evaluation
    model_output_channels: Optional[slice] = None

    def __post_init__(self):
        self.validate()

    @property
    def num_model_evals(self) -> int:
        return len(self.form_of_eval)

    def identity(self) -> tuple:
        """A hashable value equal for plans that do the same work (numbers, wiring and coef_fns), for caches
        keyed by plan. A coef_fn contributes its `identity()` when it has one, else its object identity."""
        forms = tuple((f.x, f.history, f.out, f.x0_out, f.noisy, coef_fn_identity(f.coef_fn)) for f in self.forms)
        return (_tensor_identity(self.timesteps), _tensor_identity(self.coefs), tuple(self.buffers), forms,
                tuple(self.form_of_eval), float(self.init_noise_scale), self.output,
                None if self.model_output_channels is None else
                (self.model_output_channels.start, self.model_output_channels.stop, self.model_output_channels.step))

    def validate(self):
        e = len(self.form_of_eval)
        if e < 1:
            raise ValueError("a plan needs at least one model evaluation")
        if not isinstance(self.timesteps, torch.Tensor) or tuple(self.timesteps.shape) != (e,) \
                or self.timesteps.dtype != torch.float32:
            raise ValueError(f"plan.timesteps must be an fp32 tensor of shape ({e},)")
        if not isinstance(self.coefs, torch.Tensor) or tuple(self.coefs.shape) != (e, K) \
                or self.coefs.dtype != torch.float32:
            raise ValueError(f"plan.coefs must be an fp32 tensor of shape ({e}, {K})")
        if self.coefs.device != self.timesteps.device:
            raise ValueError("plan.coefs and plan.timesteps must be on the same device")
        names = tuple(self.buffers)
        if not names or names[0] != "x" or len(set(names)) != len(names):
            raise ValueError(f"plan.buffers must be unique names starting with 'x', got {names}")
        for f, form in enumerate(self.forms):
            used = (form.x, form.out, *form.history) + (() if form.x0_out is None else (form.x0_out,))
            unknown = [n for n in used if n not in names]
            if unknown:
                raise ValueError(f"form {f} names unknown buffers {unknown}")
            if len(form.history) > 3:
                raise ValueError(f"form {f} binds {len(form.history)} history buffers (at most 3)")
            if form.x0_out is not None and form.x0_out == form.out:
                raise ValueError(f"form {f} writes x' and x0 to the same buffer {form.out!r}")
        if any(not 0 <= f < len(self.forms) for f in self.form_of_eval):
            raise ValueError("plan.form_of_eval refers to a form that does not exist")
        first = self.forms[self.form_of_eval[0]]
        if first.x != names[0]:
            raise ValueError(f"the first evaluation must read the initial state buffer {names[0]!r}")
        for i in range(1, e):
            prev, cur = self.forms[self.form_of_eval[i - 1]], self.forms[self.form_of_eval[i]]
            if cur.x != prev.out:
                raise ValueError(f"evaluation {i} reads {cur.x!r} but evaluation {i - 1} wrote {prev.out!r}")
        if self.output not in names:
            raise ValueError(f"plan.output {self.output!r} is not a buffer")
        rows = self.coefs.detach().to("cpu", torch.float64)
        for i, f in enumerate(self.form_of_eval):
            form = self.forms[f]
            for j in range(3):
                if rows[i, _COL[f"c{j + 1}"]] != 0 and j >= len(form.history):
                    raise ValueError(f"evaluation {i} uses h{j + 1} but its form binds {len(form.history)} "
                                     "history buffers")
            if rows[i, _COL["s"]] != 0 and not form.noisy:
                raise ValueError(f"evaluation {i} has s != 0 but its form is not noisy")
