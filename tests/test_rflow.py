"""Rectified flow as MAISI runs it (issue 14): rflow_euler step for step against MONAI's RFlowScheduler with and
without its resolution-dependent timestep shift (use_timestep_transform, base_img_size_numel, spatial_dim; 2-D
and 3-D; discrete and continuous grids), and rflow_heun, the 2nd-order flow solver on the same grid: run by the
engine exactly as its eager loop, and converging to the exact Gaussian-mixture flow at order 2 (rflow_euler at
order 1) against a float64 RK4 reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pydiffmed
from pydiffmed import get_solver
from pydiffmed.gmm import GaussianMixture
from pydiffmed.schedules import NoiseSchedule
from pydiffmed.solvers import SOLVERS, RFlowHeun

monai_sched = pytest.importorskip("monai.networks.schedulers")
from monai.networks.schedulers.rectified_flow import timestep_transform  # noqa: E402

FLOW = NoiseSchedule.flow()


pytestmark = pytest.mark.usefixtures("one_thread")


def velocity_model(x, t):
    """A fixed smooth nonlinear 'network' depending on x and the time input."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 1e-3 * t) * 0.9 - 0.2 * x


# --- MONAI parity ------------------------------------------------------------------------------------------

MONAI_CASES = [  # discrete, transform, steps, spatial shape (its length is spatial_dim), base_img_size_numel
    (True, True, 30, (24, 20, 16), 32 ** 3),
    (True, True, 10, (40, 36, 28), 16 ** 3),
    (False, True, 30, (40, 36, 28), 16 ** 3),
    (False, True, 10, (24, 20, 16), 32 ** 3),
    (True, True, 30, (64, 48), 32 ** 2),
    (False, True, 10, (96, 80), 16 ** 2),
    (True, False, 10, (24, 20, 16), 32 ** 3),
    (False, False, 30, (64, 48), 32 ** 2),
]


def _pair(discrete, transform, n, spatial, base, numel=None, **ours):
    """MONAI's scheduler (set up as MAISI does: numel as torch.prod of the latent's spatial shape) and ours."""
    dim = len(spatial)
    ref = monai_sched.RFlowScheduler(use_discrete_timesteps=discrete, use_timestep_transform=transform,
                                     base_img_size_numel=base, spatial_dim=dim)
    ref.set_timesteps(n, input_img_size_numel=torch.prod(torch.tensor(spatial)) if numel is None else numel)
    solver = get_solver("rflow_euler", FLOW, n, use_discrete_timesteps=discrete, use_timestep_transform=transform,
                        input_img_size_numel=math.prod(spatial), base_img_size_numel=base, spatial_dim=dim, **ours)
    return ref, solver


@pytest.mark.parametrize("discrete,transform,n,spatial,base", MONAI_CASES,
                         ids=[f"{'disc' if c[0] else 'cont'}-{'shift' if c[1] else 'noshift'}-{c[2]}-{len(c[3])}d"
                              for c in MONAI_CASES])
def test_rflow_euler_equals_monai_step_for_step(discrete, transform, n, spatial, base):
    """Same grid, and after every step the same state (fp32; measured: bit-identical)."""
    ref, solver = _pair(discrete, transform, n, spatial, base, truncate_next_timestep=True)
    np.testing.assert_array_equal(solver.timesteps.numpy(), ref.timesteps.float().numpy())
    nxt = torch.cat((ref.timesteps[1:], torch.tensor([0], dtype=ref.timesteps.dtype)))
    shape = (2, 3, *spatial)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        x = ref.step(velocity_model(x, t.expand(2)), t, x, nxt[i])[0]
        y = solver.step(i, y, velocity_model(y, solver.timesteps[i].expand(2)))
        assert float((x - y).abs().max()) <= 1e-6, f"step {i}"
    if discrete:  # integer grids: MONAI's int(next_timestep) changes nothing, the default dt is the same
        _, exact = _pair(discrete, transform, n, spatial, base)
        torch.testing.assert_close(exact.sample(velocity_model, torch.randn(shape, generator=torch.Generator()
                                                                            .manual_seed(7))), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("discrete", [True, False])
@pytest.mark.parametrize("n", [1, 5, 10, 30, 50])
def test_shifted_grid_equals_monai(discrete, n):
    """The shifted grid over many volume sizes (below and above the base size, 2-D and 3-D), with steps_offset,
    numel given as an int or as MONAI's torch.prod tensor."""
    for spatial in [(32, 32, 32), (64, 64, 64), (128, 128, 64), (100, 90, 33), (16, 16, 16), (256, 256, 128),
                    (64, 64), (512, 512), (50, 70)]:
        dim = len(spatial)
        for numel in (math.prod(spatial), torch.prod(torch.tensor(spatial))):
            ref = monai_sched.RFlowScheduler(use_discrete_timesteps=discrete, use_timestep_transform=True,
                                             spatial_dim=dim, steps_offset=1, base_img_size_numel=32 ** dim)
            ref.set_timesteps(n, input_img_size_numel=numel)
            ours = get_solver("rflow_euler", FLOW, n, use_discrete_timesteps=discrete, use_timestep_transform=True,
                              input_img_size_numel=numel, spatial_dim=dim, steps_offset=1,
                              base_img_size_numel=32 ** dim)
            np.testing.assert_array_equal(ours.timesteps.numpy(), ref.timesteps.float().numpy())
            heun = get_solver("rflow_heun", FLOW, n, use_discrete_timesteps=discrete, use_timestep_transform=True,
                              input_img_size_numel=numel, spatial_dim=dim, steps_offset=1,
                              base_img_size_numel=32 ** dim)
            np.testing.assert_array_equal(np.unique(heun.timesteps.numpy()), np.unique(ours.timesteps.numpy()))


def test_the_shift_puts_more_steps_at_the_noisy_end():
    plain = get_solver("rflow_euler", FLOW, 10).timesteps
    big = get_solver("rflow_euler", FLOW, 10, use_timestep_transform=True, input_img_size_numel=128 ** 3).timesteps
    small = get_solver("rflow_euler", FLOW, 10, use_timestep_transform=True, input_img_size_numel=16 ** 3).timesteps
    assert big[0] == plain[0] == small[0] == 1000
    assert torch.all(big[1:] > plain[1:]) and torch.all(small[1:] < plain[1:])
    same = get_solver("rflow_euler", FLOW, 10, use_timestep_transform=True, input_img_size_numel=32 ** 3).timesteps
    torch.testing.assert_close(same, plain, rtol=0, atol=0)     # numel = base: no shift


def test_transform_scale_is_monai_formula():
    """MONAI's set_timesteps ignores transform_scale (it passes no scale); ours applies it as MONAI's
    timestep_transform(scale=...) defines."""
    ours = get_solver("rflow_euler", FLOW, 8, use_discrete_timesteps=False, use_timestep_transform=True,
                      input_img_size_numel=48 ** 3, transform_scale=1.7)
    grid = [(1 - i / 8) * 1000 for i in range(8)]
    expected = np.array([timestep_transform(t, 48 ** 3, scale=1.7) for t in grid]).astype(np.float16)
    np.testing.assert_array_equal(ours.timesteps.numpy(), expected.astype(np.float32))


def test_option_validation():
    with pytest.raises(ValueError, match="input_img_size_numel"):
        get_solver("rflow_heun", FLOW, 10, use_timestep_transform=True)
    for bad in (0, -5, float("nan"), "big"):
        with pytest.raises(ValueError, match="input_img_size_numel"):
            get_solver("rflow_euler", FLOW, 10, use_timestep_transform=True, input_img_size_numel=bad)
    with pytest.raises(ValueError, match="spatial_dim"):
        get_solver("rflow_euler", FLOW, 10, spatial_dim=2.5)
    with pytest.raises(ValueError, match="base_img_size_numel"):
        get_solver("rflow_heun", FLOW, 10, base_img_size_numel=0)
    with pytest.raises(ValueError, match="flow schedule"):
        get_solver("rflow_heun", NoiseSchedule.discrete(), 10)
    with pytest.raises(TypeError):
        get_solver("rflow_heun", FLOW, 10, truncate_next_timestep=True)   # an Euler-only MONAI quirk
    # without the shift the volume size is not needed and is ignored, as in MONAI
    assert get_solver("rflow_euler", FLOW, 10, input_img_size_numel=5).input_img_size_numel == 5


# --- rflow_heun: plan, engine ------------------------------------------------------------------------------

def test_heun_grid_and_plan():
    """2n - 1 evaluations: (u_i, u_{i+1}) per step, the last step (to u = 0) an Euler step; two buffers (the
    state and the kept step start, used in turn) and as few distinct step forms (CUDA graphs) as edm_heun's."""
    solver = get_solver("rflow_heun", FLOW, 5)
    euler = get_solver("rflow_euler", FLOW, 5).timesteps
    assert solver.num_model_evals == 9
    expected = torch.stack([euler[:-1], euler[1:]], 1).reshape(-1).tolist() + [euler[-1].item()]
    assert solver.timesteps.tolist() == expected
    plan = solver.plan()
    assert len(plan.buffers) == 2 and all(len(f.history) <= 1 for f in plan.forms)
    assert len(plan.forms) <= len(get_solver("edm_heun", NoiseSchedule.discrete(), 5).plan().forms) == 5
    assert len(get_solver("rflow_heun", FLOW, 30).plan().forms) == len(plan.forms)
    assert not any(f.noisy for f in plan.forms)
    assert "rflow_heun" in SOLVERS and SOLVERS["rflow_heun"] is RFlowHeun


MIXTURE = GaussianMixture.random(8, 3, seed=1, separation=2.0, std_range=(0.5, 1.0))
SHAPE = (4, 2, 2, 2)

ENGINE_CASES = [
    ("rflow_heun", {}, "neg_flow"),
    ("rflow_heun", {"use_timestep_transform": True, "input_img_size_numel": 64 ** 3,
                    "use_discrete_timesteps": False}, "neg_flow"),
    ("rflow_heun", {"clip": 4.0}, "neg_flow"),
    ("rflow_heun", {}, "sample"),
    ("rflow_heun", {}, "flow"),
    ("rflow_euler", {"use_timestep_transform": True, "input_img_size_numel": 40 ** 3}, "neg_flow"),
    ("rflow_euler", {}, "v_prediction"),
]


@pytest.mark.parametrize("name,opts,pred", ENGINE_CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(ENGINE_CASES)])
def test_engine_equals_eager_solver_loop(name, opts, pred):
    solver = get_solver(name, FLOW, 7, prediction_type=pred, **opts)
    model = MIXTURE.model(FLOW, pred)
    out = pydiffmed.Sampler(model, solver, SHAPE)(seed=3)
    eager = solver.sample(model, shape=SHAPE, seed=3)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    by_name = pydiffmed.sample(model, SHAPE, name, 7, FLOW, seed=3, progress=False, prediction_type=pred, **opts)
    torch.testing.assert_close(by_name, eager, rtol=0, atol=0)


def test_prediction_types_agree():
    """The exact model's outputs of every flow-compatible type describe the same flow: same Heun result."""
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    ref = get_solver("rflow_heun", FLOW, 12).sample(MIXTURE.model(FLOW, "neg_flow"), x_T)
    for pred in ("flow", "sample", "v_prediction"):
        out = get_solver("rflow_heun", FLOW, 12, prediction_type=pred).sample(MIXTURE.model(FLOW, pred), x_T)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sdedit_start_is_exact_for_heun():
    """strength: the engine starts at a Heun step boundary (no kept vector from before)."""
    model = MIXTURE.model(FLOW, "neg_flow")
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    sampler = pydiffmed.Sampler(model, "rflow_heun", SHAPE, num_steps=6, schedule=FLOW, prediction_type="neg_flow",
                                strength=0.5)
    out = sampler(0, init=init)
    assert torch.isfinite(out).all() and sampler.start_index % 2 == 0


# --- convergence order on the exact Gaussian-mixture flow ---------------------------------------------------

@pytest.fixture(scope="module")
def exact_flow():
    """x_T and its flow end point x(0) by classical RK4 in float64 (512 uniform steps; checked against 256)."""
    model = MIXTURE.model(FLOW, "neg_flow")
    x_T = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def rk4(n):
        x, h = x_T.clone(), 1.0 / n
        v = lambda x, t: model(x, torch.tensor(1000.0 * t, dtype=torch.float64))  # noqa: E731  (dx/d(-t))
        for i in range(n):
            t = 1.0 - i * h
            k1 = v(x, t)
            k2 = v(x + 0.5 * h * k1, t - 0.5 * h)
            k3 = v(x + 0.5 * h * k2, t - 0.5 * h)
            k4 = v(x + h * k3, t - h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    coarse, fine = rk4(256), rk4(512)
    assert float((coarse - fine).abs().max()) < 1e-8
    return model, x_T, fine


ORDER_CASES = [  # name, options, (low, high) bounds of the observed order over 16 -> 32 -> 64 steps
    ("rflow_euler", {"use_discrete_timesteps": False}, (0.85, 1.15)),
    ("rflow_euler", {}, (0.85, 1.15)),
    ("rflow_heun", {"use_discrete_timesteps": False}, (1.8, 2.3)),
    ("rflow_heun", {}, (1.8, 2.3)),
    ("rflow_heun", {"use_discrete_timesteps": False, "use_timestep_transform": True,
                    "input_img_size_numel": 64 ** 3}, (1.8, 2.3)),
]


@pytest.mark.parametrize("name,opts,bounds", ORDER_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ORDER_CASES)])
def test_convergence_order(name, opts, bounds, exact_flow):
    model, x_T, exact = exact_flow
    errors = []
    for n in (16, 32, 64):
        x = get_solver(name, FLOW, n, **opts).sample(model, x_T.float())
        errors.append(float(((x.double() - exact) ** 2).mean().sqrt()))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(bounds[0] <= p <= bounds[1] for p in orders), f"{name}: errors {errors}, orders {orders}"


def test_heun_beats_euler_at_equal_model_evaluations(exact_flow):
    model, x_T, exact = exact_flow
    heun = get_solver("rflow_heun", FLOW, 16).sample(model, x_T.float())                 # 31 evaluations
    euler = get_solver("rflow_euler", FLOW, 31).sample(model, x_T.float())
    err = lambda x: float(((x.double() - exact) ** 2).mean().sqrt())  # noqa: E731
    assert err(heun) * 5 < err(euler)


# --- GPU: the engine captures rflow_heun in CUDA graphs ------------------------------------------------------

class _Velocity(torch.nn.Module):
    def forward(self, x, t):
        return torch.tanh(0.7 * x + 1e-3 * t.reshape(-1, *([1] * (x.ndim - 1)))) * 0.9 - 0.2 * x


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rflow_euler", "rflow_heun"])
def test_gpu_graph_replay_equals_eager(name):
    shape, opts = (2, 4, 16, 16, 16), {"use_timestep_transform": True, "input_img_size_numel": 16 ** 3,
                                       "prediction_type": "neg_flow"}
    model = _Velocity().cuda()
    eager = pydiffmed.Sampler(model, name, shape, num_steps=6, schedule=FLOW, cuda_graph=False, **opts)(3)
    sampler = pydiffmed.Sampler(model, name, shape, num_steps=6, schedule=FLOW, **opts)
    graphed = sampler(3)
    assert sampler.graph_failure is None and len(sampler._graphs) == len(set(sampler.plan.form_of_eval))
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    cpu = get_solver(name, FLOW, 6, **opts).sample(_Velocity(), shape=shape, seed=3)   # same Philox noise
    torch.testing.assert_close(graphed.cpu(), cpu, rtol=1e-4, atol=1e-4)
