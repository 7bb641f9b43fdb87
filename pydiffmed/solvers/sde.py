"""Score-SDE samplers (Song et al. 2021): reverse-time Euler-Maruyama and predictor-corrector.

The forward SDE of a schedule is dx = f(t)·x dt + g(t) dW (f = alpha'/alpha, g² = d sigma²/dt - 2 f sigma²:
VP: f = -β/2, g² = β; sub-VP: g² = β(1 - alpha⁴); VE: f = 0, g² = d sigma²/dt), and its reverse
dx = [f·x - g²·score] dt + g dW̄, with score = (alpha·x0 - x)/sigma² from the model.

euler_maruyama: grid t_0 = t_max > ... > t_N = t_min (uniform in t by default),
    x_{i+1} = x_i - (f·x_i - g²·score)·Δ + g·sqrt(Δ)·z,   Δ = t_i - t_{i+1};
the last step omits the noise when denoise=True (score_sde's `x_mean`).

pc: at each t_i, `corrector_steps` Langevin corrector steps then one predictor step, every one a model call.
  predictor 'reverse_diffusion' (the discretized reverse SDE: VE x + (σ_i² - σ_{i+1}²)·score + sqrt(..)·z; VP
  (2 - sqrt(1-β_i))·x + β_i·score + sqrt(β_i)·z with 1 - β_i = (alpha_i/alpha_{i+1})²), 'euler_maruyama', or
  None (corrector only);
  corrector 'langevin': x + ε·score + sqrt(2ε)·z, ε = 2·a_i·(snr·‖z‖/‖score‖)² (a_i = 1 - β_i for VP, 1 else).
  The step size depends on device values (‖score‖): it is computed by a sync-free coef_fn. Norms are per sample
  (norm_reduction='sample', default: a sample's trajectory does not depend on its batch) or averaged over the
  batch ('batch', as score_sde / diffusers do). ‖z‖ is its expectation E‖z‖ = sqrt(2)·Γ((n+1)/2)/Γ(n/2)
  (noise_norm='expected', default, graph-capturable) or the drawn noise's norm ('actual', eager only).
  discretization='score_sde' reproduces score_sde / diffusers' ScoreSdeVeScheduler exactly: the time grid
  linspace(1, t_min, N) in fp32, sigma levels / betas indexed by int(t·(N - 1)), the model conditioned on the
  continuous sigma(t) (VE) or t.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ops.fused_step import COEF_NAMES, per_sample_norm, philox_normal
from ._grids import continuous_points
from .base import Solver

_COL = {name: k for k, name in enumerate(COEF_NAMES)}


def expected_normal_norm(n: int) -> float:
    """E‖z‖ for z ~ N(0, I_n)."""
    return math.exp(0.5 * math.log(2.0) + math.lgamma((n + 1) / 2.0) - math.lgamma(n / 2.0))


class LangevinStepSize:
    """coef_fn of a Langevin corrector row: per evaluation e a table holds (q_x, q_m) of the score from (x, m),
    (A, B) with x' = (1 - eps·A)·x + eps·B·x0slot + sqrt(2·eps)·z, and c = 2·a_e·snr²."""

    def __init__(self, table, noise_norm="expected", reduction="sample"):
        self.table = torch.as_tensor(np.asarray(table), dtype=torch.float64)   # (E, 5): q_x, q_m, A, B, c
        self.noise_norm, self.reduction = noise_norm, reduction
        self._device_tables = {}

    def identity(self):
        return (tuple(self.table.shape), self.table.numpy().tobytes(), self.noise_norm, self.reduction)

    def _table(self, device):
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = self.table.to(device=device, dtype=torch.float32)
        return self._device_tables[key]

    def __call__(self, x, m, row, step_index, noise=None):
        q_x, q_m, a_coef, b_coef, c = self._table(x.device)[step_index.reshape(())].unbind(-1)
        score_norm = per_sample_norm(q_x * x.float() + q_m * m.float())
        if noise is not None and self.noise_norm == "actual":
            noise_norm = per_sample_norm(noise)
        else:
            noise_norm = torch.full_like(score_norm, expected_normal_norm(x[0].numel()))
        if self.reduction == "batch":
            score_norm = score_norm.mean().expand_as(score_norm)
            noise_norm = noise_norm.mean().expand_as(noise_norm)
        eps = c * (noise_norm / score_norm) ** 2
        rows = row.to(device=x.device, dtype=torch.float32).reshape(1, -1).repeat(x.shape[0], 1)
        rows[:, _COL["a"]] = 1.0 - eps * a_coef
        rows[:, _COL["b"]] = eps * b_coef
        rows[:, _COL["s"]] = torch.sqrt(2.0 * eps)
        return rows


class _ScoreSolver(Solver):
    def __init__(self, schedule, num_steps, **common):
        if schedule.kind == "discrete":
            raise ValueError(f"{self.name} needs a continuous-time schedule (vp, subvp, ve or flow)")
        super().__init__(schedule, num_steps, **common)

    def _score(self, program, e, alpha, sigma):
        """(estimate row, score vector in terms of the state and d_e)."""
        if self.prediction_type == "score" and self.clip is None:
            return (0.0, 1.0, None), program.d(e)
        estimate = self.x0_estimate(alpha, sigma)
        return estimate, (alpha * program.d(e) - program.current) / (sigma * sigma)


class EulerMaruyama(_ScoreSolver):
    name = "euler_maruyama"

    def __init__(self, schedule, num_steps, *, spacing="time", denoise=True, **common):
        self.spacing, self.denoise = spacing, bool(denoise)
        super().__init__(schedule, num_steps, **common)

    def _num_evals(self):
        return self.num_steps

    def _build(self, program):
        sched = self.schedule
        times = continuous_points(sched, self.num_steps + 1, self.spacing)
        for i in range(self.num_steps):
            t, delta = times[i], times[i] - times[i + 1]
            alpha, sigma = (float(v) for v in sched.alpha_sigma(t))
            f, g2 = (float(v) for v in sched.sde(t))
            estimate, score = self._score(program, i, alpha, sigma)
            x = program.current
            target = x - (f * x - g2 * score) * delta
            if not (self.denoise and i == self.num_steps - 1):
                target = target + math.sqrt(g2 * delta) * program.z(i)
            program.add(sched.model_time(t), estimate, target, coef_fn=self.estimate_coef_fn)


class PredictorCorrector(_ScoreSolver):
    name = "pc"

    def __init__(self, schedule, num_steps, *, predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                 corrector_steps=1, denoise=True, noise_norm="expected", norm_reduction="sample",
                 discretization="grid", spacing="time", **common):
        if predictor not in ("reverse_diffusion", "euler_maruyama", None, "none"):
            raise ValueError(f"predictor must be 'reverse_diffusion', 'euler_maruyama' or None, got {predictor!r}")
        if corrector not in ("langevin", None, "none"):
            raise ValueError(f"corrector must be 'langevin' or None, got {corrector!r}")
        if noise_norm not in ("expected", "actual"):
            raise ValueError(f"noise_norm must be 'expected' or 'actual', got {noise_norm!r}")
        if norm_reduction not in ("sample", "batch"):
            raise ValueError(f"norm_reduction must be 'sample' or 'batch', got {norm_reduction!r}")
        if discretization not in ("grid", "score_sde"):
            raise ValueError(f"discretization must be 'grid' or 'score_sde', got {discretization!r}")
        self.predictor = None if predictor in (None, "none") else predictor
        self.corrector = None if corrector in (None, "none") else corrector
        if self.predictor is None and self.corrector is None:
            raise ValueError("pc needs a predictor or a corrector")
        if self.corrector and (isinstance(corrector_steps, bool) or int(corrector_steps) < 1):
            raise ValueError(f"corrector_steps must be >= 1, got {corrector_steps!r}")
        if predictor == "reverse_diffusion" and schedule.kind not in ("vp", "ve"):
            raise ValueError("the reverse-diffusion predictor is defined for VP and VE schedules "
                             "(use predictor='euler_maruyama')")
        if self.corrector and common.get("thresholding"):
            raise ValueError("dynamic thresholding is not supported with the Langevin corrector (use clip)")
        self.snr, self.corrector_steps = float(snr), int(corrector_steps) if self.corrector else 0
        self.denoise, self.noise_norm, self.norm_reduction = bool(denoise), noise_norm, norm_reduction
        self.discretization, self.spacing = discretization, spacing
        super().__init__(schedule, num_steps, **common)
        if noise_norm == "actual" and self.corrector:
            self._plan_unsupported = ("noise_norm='actual' needs the drawn noise in the step size; the plan "
                                      "uses noise_norm='expected' — run eagerly with step()/sample()")

    def _num_evals(self):
        return self.num_steps * (self.corrector_steps + (1 if self.predictor else 0))

    def _grid(self):
        """Per step i: (t_i, G²_i and sqrt(1 - β_i) of the reverse-diffusion predictor, the corrector's a_i,
        the Euler-Maruyama step Δ_i)."""
        sched, n = self.schedule, self.num_steps
        steps = []
        if self.discretization == "score_sde":
            times = torch.linspace(sched.t_max, sched.t_min, n, dtype=torch.float32)
            index = (times * (n - 1)).long().numpy()
            times = times.double().numpy()
            if sched.kind == "ve":
                levels = np.exp(np.linspace(math.log(sched.sigma_min), math.log(sched.sigma_max), n))
            else:
                betas = np.linspace(sched.beta_min / n, sched.beta_max / n, n)
            for t, k in zip(times, index):
                if sched.kind == "ve":
                    adjacent = levels[k - 1] if k > 0 else 0.0
                    g2, keep, corr_a = levels[k] ** 2 - adjacent ** 2, 1.0, 1.0
                elif sched.kind == "vp":
                    g2, keep, corr_a = betas[k], math.sqrt(1 - betas[k]), 1 - betas[k]
                else:
                    g2, keep, corr_a = None, None, 1.0
                steps.append((t, g2, keep, corr_a, 1.0 / n))
            return steps
        times = continuous_points(sched, n + 1, self.spacing)
        for i in range(n):
            t, t_next = times[i], times[i + 1]
            a_t, s_t = (float(v) for v in sched.alpha_sigma(t))
            a_n, s_n = (float(v) for v in sched.alpha_sigma(t_next))
            if sched.kind == "ve":
                g2, keep, corr_a = s_t ** 2 - s_n ** 2, 1.0, 1.0
            elif sched.kind == "vp":
                beta = 1.0 - (a_t / a_n) ** 2        # the forward step t_{i+1} -> t_i: alpha_t = alpha_n·sqrt(1-β)
                g2, keep, corr_a = beta, math.sqrt(1 - beta), 1 - beta
            else:
                g2, keep, corr_a = None, None, 1.0
            steps.append((t, g2, keep, corr_a, t - t_next))
        return steps

    def _build(self, program):
        sched = self.schedule
        table = []
        self._langevin = None
        e = 0
        steps = self._grid()
        for i, (t, g2, keep, corr_a, delta) in enumerate(steps):
            alpha, sigma = (float(v) for v in sched.alpha_sigma(t))
            model_time = sched.model_time(t)
            for _ in range(self.corrector_steps):
                estimate, score = self._score(program, e, alpha, sigma)
                raw = estimate[1] == 1.0 and estimate[0] == 0.0 and estimate[2] is None
                q = (0.0, 1.0) if raw else (-1.0 / sigma ** 2 + alpha * estimate[0] / sigma ** 2,
                                            alpha * estimate[1] / sigma ** 2)
                ab = (0.0, 1.0) if raw else (1.0 / sigma ** 2, alpha / sigma ** 2)
                table.append((q[0], q[1], ab[0], ab[1], 2.0 * corr_a * self.snr ** 2))
                x = program.current
                target = x + score + math.sqrt(2.0) * program.z(e)     # nominal: the coef_fn sets eps
                program.add(model_time, estimate, target, coef_fn=self._langevin_fn(), noisy=True, opaque=True)
                e += 1
            if self.predictor is None:
                continue
            table.append((0.0, 0.0, 0.0, 0.0, 0.0))
            estimate, score = self._score(program, e, alpha, sigma)
            x = program.current
            last = i == len(steps) - 1
            if self.predictor == "reverse_diffusion":
                target = (2.0 - keep) * x + g2 * score
                noise_std = math.sqrt(g2)
            else:
                f, gg = (float(v) for v in sched.sde(t))
                target = x - (f * x - gg * score) * delta
                noise_std = math.sqrt(gg * delta)
            if not (self.denoise and last):
                target = target + noise_std * program.z(e)
            program.add(model_time, estimate, target, coef_fn=self.estimate_coef_fn)
            e += 1
        if self._langevin is not None:
            self._langevin.table = torch.as_tensor(np.asarray(table), dtype=torch.float64)

    def _langevin_fn(self):
        if self._langevin is None:
            self._langevin = LangevinStepSize(np.zeros((1, 5)), self.noise_norm, self.norm_reduction)
        return self._langevin

    def _coef_row(self, form, x, m, row, i, noise_args):
        if not isinstance(form.coef_fn, LangevinStepSize) or self.noise_norm != "actual":
            return super()._coef_row(form, x, m, row, i, noise_args)
        noise = noise_args.get("noise")
        if noise is None:
            noise = philox_normal(noise_args["seeds"], i, x.shape, device=x.device)
            noise_args.clear()
            noise_args["noise"] = noise       # the very noise fused_step would draw, now explicit
        return form.coef_fn(x, m, row, torch.tensor(i, device=x.device), noise=noise)
