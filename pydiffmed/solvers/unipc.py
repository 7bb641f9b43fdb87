"""UniPC (Zhao et al. 2023): multistep predictor UniP plus corrector UniC, B(h) = e^h - 1 ('bh2', default) or h
('bh1'), data prediction by default (predict_x0=False: noise prediction).

At evaluation i the corrector first refines the state the model was evaluated on, using the new estimate
D_i (no extra model call), then the predictor steps on from the corrected state. The corrected state is never
stored: the fused_step row recovers it from the state buffer and the kept estimates (it is a linear
combination of them), so order 2 needs two history slots. Matches diffusers' UniPCMultistepScheduler step for
step (its grids via `multistep_grid`, variant 'unipc').
"""
from __future__ import annotations

import math

import numpy as np

from .. import prediction
from ._grids import CutGridMixin, multistep_grid
from .base import Solver


class UniPC(CutGridMixin, Solver):
    name = "unipc"

    def __init__(self, schedule, num_steps, *, order=2, variant="bh2", predict_x0=True, grid="uniform",
                 spacing=None, steps_offset=0, final="zero", lower_order_final=True, disable_corrector=(),
                 **common):
        if order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
        self.order, self.variant, self.predict_x0 = int(order), variant, bool(predict_x0)
        self.lower_order_final = bool(lower_order_final)
        self.disable_corrector = set(int(k) for k in disable_corrector)
        self.grid, self.spacing, self.steps_offset, self.final = grid, spacing, int(steps_offset), final
        if not self.predict_x0 and final == "zero":
            raise ValueError("predict_x0=False cannot step to sigma = 0 (final='zero'); use final='sigma_min'")
        if not self.predict_x0 and (common.get("clip") is not None or common.get("thresholding")):
            raise ValueError("clip / thresholding apply to the x0 estimate: they need predict_x0=True")
        self._model_t, self._alpha, self._sigma = multistep_grid(
            schedule, num_steps, grid=grid, spacing=spacing, steps_offset=steps_offset, final=final,
            variant="unipc")
        super().__init__(schedule, num_steps, **common)

    def _num_evals(self):
        return len(self._model_t)

    def _lambda(self, k):
        if self._sigma[k] == 0:
            return math.inf
        return math.log(self._alpha[k]) - math.log(self._sigma[k])

    def _estimate(self, i):
        if self.predict_x0:
            return self.x0_estimate(self._alpha[i], self._sigma[i])
        q_x, q_m = prediction.eps_coefs(self.prediction_type, self._alpha[i], self._sigma[i])
        return q_x, q_m, None

    def _rhos(self, h, rks, order, corrector):
        """h·phi coefficients and the rho weights of UniP (corrector=False) / UniC (True)."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1.0
        factorial = 1
        b_h = hh if self.variant == "bh1" else math.expm1(hh)
        rks = np.append(np.asarray(rks, dtype=np.float64), 1.0)
        big_r, b = [], []
        for k in range(1, order + 1):
            big_r.append(rks ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        big_r, b = np.stack(big_r), np.asarray(b)
        if corrector:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
        elif order == 1:
            rhos = np.zeros(0)
        elif order == 2:
            rhos = np.array([0.5])
        else:
            rhos = np.linalg.solve(big_r[:-1, :-1], b[:-1])
        return h_phi_1, b_h, rhos

    def _update(self, x, t_index, s_index, m0, previous, rk_indices, order, corrector, model_t=None):
        """x_t from x at s: UniP (corrector False) or UniC with the new estimate model_t."""
        alpha_t, sigma_t = self._alpha[t_index], self._sigma[t_index]
        alpha_s, sigma_s = self._alpha[s_index], self._sigma[s_index]
        h = self._lambda(t_index) - self._lambda(s_index)
        if h == 0:
            return x  # zero-length step (a Karras grid ending at final='sigma_min'): the identity
        rks, d1s = [], []
        for k in range(1, order):
            rk = (self._lambda(rk_indices[k - 1]) - self._lambda(s_index)) / h
            rks.append(rk)
            d1s.append((previous[k - 1] - m0) / rk)
        h_phi_1, b_h, rhos = self._rhos(h, rks, order, corrector)
        if self.predict_x0:
            base, scale = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0, alpha_t * b_h
        else:
            base, scale = alpha_t / alpha_s * x - sigma_t * h_phi_1 * m0, sigma_t * b_h
        if not d1s and not corrector:
            return base  # first order: no correction term (B(h) may be infinite when sigma_t = 0)
        res = sum((r * d for r, d in zip(rhos, d1s)), np.zeros_like(x))
        if corrector:
            res = res + rhos[-1] * (model_t - m0)
        return base - scale * res

    def _build(self, program):
        n = self._num_evals()
        outputs = []          # estimates D_0..D_i
        last_sample = None
        this_order = 0
        lower_order_nums = 0
        for i in range(n):
            d = program.d(i)
            sample = program.current
            if i > 0 and (self._begin_step + i - 1) not in self.disable_corrector and last_sample is not None:
                previous = [outputs[-(k + 1)] for k in range(1, this_order)]
                sample = self._update(last_sample, i, i - 1, outputs[-1], previous,
                                      [i - (k + 1) for k in range(1, this_order)], this_order, True, d)
            outputs.append(d)
            order = min(self.order, n - i) if self.lower_order_final else self.order
            this_order = min(order, lower_order_nums + 1)
            last_sample = sample
            previous = [outputs[-(k + 1)] for k in range(1, this_order)]
            target = self._update(sample, i + 1, i, d, previous, [i - k for k in range(1, this_order)],
                                  this_order, False)
            if self._lambda(i + 1) == self._lambda(i):
                lower_order_nums = 0   # a repeated grid point: restart the multistep history (see dpmpp.py)
            else:
                lower_order_nums = min(lower_order_nums + 1, self.order)
            program.add(self._model_t[i], self._estimate(i), target, keep=outputs[-self.order:],
                        coef_fn=self.estimate_coef_fn if self.predict_x0 else None)
