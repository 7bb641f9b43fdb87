"""Solvers declare what they can do (Solver.plannable, can_start_partway, encodes, adaptive, plan_clip_options);
the engine, the command and get_solver read those declarations. Each declaration is checked against what the
solver actually does: a plannable solver's plan runs in the engine, one that can start part-way runs SDEdit, an
encoder is refused as a sampler, an adaptive one has no plan and says so."""
from __future__ import annotations

import pytest
import torch
from test_solvers import PLAN_CASES, score_model, tiny_model

import pydiffmed
from pydiffmed.schedules import NoiseSchedule
from pydiffmed.solvers import CAPABILITIES, SOLVERS, Solver, get_solver, names

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (2, 1, 2, 2, 2)
SEEDS = [5, 9]


def _case(name, num_steps=6):
    schedule, opts = PLAN_CASES[name]
    model = score_model if opts.get("prediction_type") == "score" else tiny_model
    return get_solver(name, schedule, num_steps, **opts), model


def test_every_solver_declares_its_capabilities():
    for name, cls in SOLVERS.items():
        assert issubclass(cls, Solver) and cls.name == name
        assert all(isinstance(getattr(cls, cap), bool) for cap in CAPABILITIES), name
        assert not (cls.adaptive and cls.plannable), name           # an adaptive solver has no fixed plan
        assert not (cls.encodes and cls.can_start_partway), name    # SDEdit samples
        assert isinstance(cls.plan_clip_options, dict)
    assert names(adaptive=True) == ["ode_dopri5"] and names(encodes=True) == ["ddim_inversion"]
    assert set(names(plannable=True)) == set(PLAN_CASES)
    assert set(names()) == set(SOLVERS)
    with pytest.raises(ValueError, match="unknown capability"):
        names(fast=True)


@pytest.mark.parametrize("name", names(plannable=True))
def test_plannable_solvers_run_their_plan_in_the_engine(name):
    solver, model = _case(name)
    seeds = torch.tensor(SEEDS)
    x_T = solver.initial_noise(SHAPE, seeds=seeds)
    expected = solver.sample(model, x_T, seeds=seeds)
    out = pydiffmed.Sampler(model, solver, SHAPE, check_memory=False)(SEEDS, x_T=x_T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", names(plannable=False))
def test_solvers_without_a_plan_are_refused_clearly(name):
    schedule = NoiseSchedule.vp()
    solver = get_solver(name, schedule)
    for call in (lambda: pydiffmed.Sampler(tiny_model, name, SHAPE, schedule=schedule),
                 lambda: pydiffmed.Sampler(tiny_model, solver, SHAPE),
                 lambda: pydiffmed.sample(tiny_model, SHAPE, name, schedule=schedule),
                 lambda: pydiffmed.estimate_memory(torch.nn.Identity(), SHAPE, solver=name),
                 solver.plan, lambda: solver.step(0, None, None)):
        with pytest.raises(ValueError, match=f"{name} .*no fixed-step plan.*solver.sample"):
            call()
    with pytest.raises(ValueError, match=f"{name} cannot start part-way"):
        solver.starting_at(1)


@pytest.mark.parametrize("name", names(adaptive=True))
def test_adaptive_solvers_take_no_steps_and_sample_eagerly(name):
    schedule = NoiseSchedule.vp()
    with pytest.raises(ValueError, match=f"{name} is adaptive.*no num_steps"):
        get_solver(name, schedule, 10)
    solver = get_solver(name, schedule, rtol=1e-3, atol=1e-3)
    assert solver.timesteps is None and solver.num_model_evals is None
    x, nfe = solver.sample(tiny_model, solver.initial_noise(SHAPE, seed=3))
    assert torch.isfinite(x).all() and nfe == solver.num_model_evals > 0


@pytest.mark.parametrize("strength", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("name", names(can_start_partway=True))
def test_solvers_that_can_start_partway_run_sdedit(name, strength):
    solver, model = _case(name)
    init = torch.rand(SHAPE) - 0.5
    sampler = pydiffmed.Sampler(model, solver, SHAPE, strength=strength, check_memory=False)
    assert 1 <= sampler.num_model_evals - sampler.start_index <= solver.num_model_evals
    assert torch.isfinite(sampler(SEEDS, init=init)).all()


@pytest.mark.parametrize("name", names(can_start_partway=False, plannable=True))
def test_solvers_that_cannot_start_partway_refuse_sdedit(name):
    solver, model = _case(name)
    with pytest.raises(ValueError, match=f"strength=0.5.*{name} cannot start part-way.*ddim, ddpm"):
        pydiffmed.Sampler(model, solver, SHAPE, strength=0.5, check_memory=False)


@pytest.mark.parametrize("name", names(encodes=True))
def test_encoders_do_not_sample_from_noise(name):
    solver, model = _case(name)
    sampler = pydiffmed.Sampler(model, solver, SHAPE, check_memory=False)
    with pytest.raises(ValueError, match=f"{name} encodes volumes into noise.*x_T="):
        sampler(SEEDS)
    assert solver.unsupported("sample") and solver.unsupported("plan") is None


@pytest.mark.parametrize("name", [n for n in names(plannable=True) if SOLVERS[n].supports_clip])
def test_plan_clip_options_keep_a_plan_with_clipping(name):
    schedule, opts = PLAN_CASES[name]
    options = {**opts, "clip": 1.0, **SOLVERS[name].plan_clip_options}
    plan = get_solver(name, schedule, 6, **options).plan()
    assert plan.num_model_evals >= 6


@pytest.mark.parametrize("name", ["ode_heun", "ode_rk4"])
def test_sdedit_keeping_less_than_one_step_starts_at_that_step(name):
    """A strength keeping fewer evaluations than one solver step takes starts at that step's first evaluation
    (the only exact start there), not refused."""
    solver, model = _case(name, num_steps=3)
    evals = solver.num_model_evals
    sampler = pydiffmed.Sampler(model, solver, SHAPE, strength=1.5 / evals, check_memory=False)
    assert sampler.start_index == evals - evals // 3
    assert torch.isfinite(sampler(SEEDS, init=torch.zeros(SHAPE))).all()
