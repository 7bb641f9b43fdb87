"""Turns a solver's update rule, written as linear algebra on the host, into fused_step rows and buffer forms.

Every quantity a solver handles is a linear combination (float64 vector) of "atoms": the initial state x_T,
the estimate d_e that fused_step computes at evaluation e (x0 = clamp(p_x·x + p_m·m), or any other linear
estimate the solver chose, e.g. the raw model output), and the noise z_e drawn at evaluation e. A solver
states, per evaluation, its estimate row (p_x, p_m, clip), the target x' as such a vector, and which vectors
must survive for later evaluations (`keep`). The program then
  * finds the fused_step coefficients: b and s are the target's d_e and z_e components; the rest must lie in
    the span of the state buffer (a) and at most three live buffers (c1..c3) — solved exactly (least squares
    with a residual check), so an update that cannot be written as one fused_step raises instead of silently
    approximating;
  * assigns buffers: x0_out goes to a slot that is free after this evaluation (aliasing a history input is
    fine: fused_step reads each element before writing it), the state is updated in place unless it must be
    kept, and slots no longer kept are recycled. Identical (x, history, out, x0_out, noisy, coef_fn) tuples
    share one form, so a multistep solver usually needs one or two distinct forms (one CUDA graph each).
An update whose coefficients a coef_fn computes on the device from data (Langevin step sizes) makes its output
"opaque": a fresh atom, so later rows never depend on the nominal coefficients the host saw.
"""
from __future__ import annotations

import itertools

import numpy as np

from .plan import K, StepForm

_TOL = 1e-9


class Program:
    def __init__(self, num_evals: int):
        if num_evals < 1:
            raise ValueError("a solver needs at least one model evaluation")
        self.num_evals = int(num_evals)
        self.size = 1 + 3 * self.num_evals
        self.rows = []
        self.model_times = []
        self.forms = []
        self.form_of_eval = []
        self._form_index = {}
        self.buffers = ["x"]
        self.state = "x"
        self.contents = {"x": self.initial()}
        self.live = {"x"}

    # atoms ------------------------------------------------------------------------------------------------
    def _unit(self, k):
        v = np.zeros(self.size)
        v[k] = 1.0
        return v

    def initial(self):
        return self._unit(0)

    def d(self, e):
        """The estimate fused_step computes at evaluation e."""
        return self._unit(1 + e)

    def z(self, e):
        """The noise drawn at evaluation e."""
        return self._unit(1 + self.num_evals + e)

    def _opaque(self, e):
        """The state written by evaluation e when its coefficients depend on device values."""
        return self._unit(1 + 2 * self.num_evals + e)

    def zero(self):
        return np.zeros(self.size)

    @property
    def current(self):
        """The vector held by the state buffer (the model input of the next evaluation)."""
        return self.contents[self.state]

    # one evaluation ---------------------------------------------------------------------------------------
    def add(self, model_time, estimate, target, keep=(), coef_fn=None, noisy=None, opaque=False):
        """estimate = (p_x, p_m, clip) (clip None: no clamp); target: x' as a vector; keep: vectors needed by
        later evaluations (each must be d_e, the current state, or a live buffer's content). opaque: coef_fn
        replaces a, b, c, s by device-dependent values, so x' becomes a new unknown vector (later updates can
        only use it as a whole); `target` then only fixes the form and nominal coefficients."""
        e = len(self.rows)
        if e >= self.num_evals:
            raise ValueError(f"program was declared with {self.num_evals} evaluations")
        target = np.asarray(target, dtype=np.float64)
        if not np.all(np.isfinite(target)):
            raise ValueError(f"evaluation {e}: the update has non-finite coefficients")
        future = np.concatenate([target[2 + e:1 + self.num_evals], target[2 + self.num_evals + e:]])
        future = future[:len(future) - self.num_evals]
        if np.any(future != 0):
            raise ValueError(f"evaluation {e}: the update uses estimates or noise of later evaluations")
        b = float(target[1 + e])
        s = float(target[1 + self.num_evals + e])
        rest = target - b * self.d(e) - s * self.z(e)
        state = self.state
        a, history, c = self._solve(e, rest)

        keep_d = keep_state = False
        kept = set()
        for vec in keep:
            vec = np.asarray(vec, dtype=np.float64)
            if _same(vec, self.d(e)):
                keep_d = True
            elif _same(vec, self.contents[state]):
                keep_state = True
            elif _same(vec, target):
                continue
            else:
                owner = next((n for n in sorted(self.live - {state}) if _same(vec, self.contents[n])), None)
                if owner is None:
                    raise ValueError(f"evaluation {e}: a vector to keep is not held by any buffer")
                kept.add(owner)
        # any buffer not kept may be overwritten; prefer ones not read in this step, then aliasing a history
        # input (fused_step reads each element before writing it), then a new buffer
        unread = sorted(set(self.buffers) - kept - {state} - set(history))
        free = unread + sorted(set(history) - kept)
        x0_out = None
        if keep_d:
            x0_out = free.pop(0) if free else self._new_buffer()
        if keep_state:
            out = free.pop(0) if free else self._new_buffer()
        else:
            out = state

        clip = estimate[2]
        row = np.zeros(K)
        row[:3] = (estimate[0], estimate[1], np.inf if clip is None else float(clip))
        row[3], row[4], row[8] = a, b, s
        row[5:5 + len(c)] = c
        self.rows.append(row)
        self.model_times.append(float(model_time))
        noisy = bool(s != 0) if noisy is None else bool(noisy)
        form = StepForm(x=state, history=tuple(history), out=out, x0_out=x0_out, noisy=noisy, coef_fn=coef_fn)
        key = (form.x, form.history, form.out, form.x0_out, form.noisy, id(coef_fn) if coef_fn else None)
        if key not in self._form_index:
            self._form_index[key] = len(self.forms)
            self.forms.append(form)
        self.form_of_eval.append(self._form_index[key])

        new_live = set(kept) | {out}
        if keep_state:
            new_live.add(state)
        if x0_out is not None:
            self.contents[x0_out] = self.d(e)
            new_live.add(x0_out)
        self.contents[out] = self._opaque(e) if opaque else target
        self.live = new_live
        self.state = out

    def _new_buffer(self):
        name = f"h{len(self.buffers) - 1}"
        self.buffers.append(name)
        return name

    def _solve(self, e, rest):
        """a, history names, c with rest = a·state + Σ c_j·history_j exactly."""
        state_vec = self.contents[self.state]
        scale = max(1.0, float(np.abs(rest).max()))
        if not np.any(rest):
            return 0.0, (), ()
        others = sorted(self.live - {self.state})
        # usually one solve over every live buffer shows which few the update uses
        found = self._fit(state_vec, others, rest, scale)
        if found is not None:
            used = [n for n, c in zip(others, found[1:]) if c != 0.0]
            if len(used) <= 3:
                found = self._fit(state_vec, used, rest, scale)
                if found is not None:
                    return found[0], tuple(used), tuple(found[1:])
        for size in range(0, min(3, len(others)) + 1):
            for names in itertools.combinations(others, size):
                found = self._fit(state_vec, names, rest, scale)
                if found is not None:
                    return found[0], names, tuple(found[1:])
        raise ValueError(f"evaluation {e}: the update is not one fused_step over the state and at most three "
                         "kept buffers (keep the vectors it needs)")

    def _fit(self, state_vec, names, rest, scale):
        """[a, c_1, ...] with rest = a·state + Σ c_j·contents[names_j] exactly (negligible terms zeroed), or None."""
        basis = np.stack([state_vec] + [self.contents[n] for n in names], axis=1)
        coef, *_ = np.linalg.lstsq(basis, rest, rcond=None)
        if np.abs(basis @ coef - rest).max() > _TOL * scale:
            return None
        negligible = np.abs(coef) * np.abs(basis).max(axis=0) < 1e-14 * scale
        return [float(v) for v in np.where(negligible, 0.0, coef)]

    def finish(self):
        if len(self.rows) != self.num_evals:
            raise ValueError(f"program has {len(self.rows)} of {self.num_evals} evaluations")
        return np.stack(self.rows), np.asarray(self.model_times)


def _same(u, v):
    return np.allclose(u, v, rtol=0.0, atol=1e-12 * max(1.0, float(np.abs(v).max())))
