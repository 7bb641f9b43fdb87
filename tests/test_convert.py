"""Scheduler conversion (pydiffmed.solvers.from_diffusers / from_monai):
1. step for step against the source scheduler (same start, same model, same explicit noise; fp32; the relative
   error max|ours - peer| / max|peer| after every step <= 1e-5, test_solvers' tolerance), for every supported
   diffusers and MONAI scheduler over a spread of options; the scheduler object, its `.config`, a
   scheduler_config.json (file, directory, pipeline directory) all give the same solver;
2. every option value pydiffmed does not implement is refused with a ValueError naming it (and its value), and
   wrong arguments fail clearly;
3. configs read without diffusers installed: defaults filled in, the class told from its options.
Only the comparisons with the peers need diffusers / MONAI (importorskip inside those tests)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import rel_err, smooth_model, step_noise

from pydiffmed.solvers import (
    DDIM,
    DDPM,
    PNDM,
    DPMSolverPP2M,
    DPMSolverPP2MSDE,
    DPMSolverPP3M,
    EDMEuler,
    EDMHeun,
    RFlowEuler,
    UniPC,
    from_diffusers,
    from_monai,
)
from pydiffmed.solvers.convert import DIFFUSERS_DEFAULTS, _guess_class

SHAPE = (2, 2, 3, 3, 3)
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def start(seed, scale=1.0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scale


def learned_model(x, t):
    """2·C output channels: the prediction, then a variance (or interpolation weight) in [-1, 1]."""
    return torch.cat([smooth_model(x, t), 0.6 * torch.tanh(0.3 * x + 0.2)], dim=1)


# =========================================================================================================
# 1. step for step against the peers
# =========================================================================================================

DIFFUSERS_CASES = [
    ("DDPMScheduler", {}, 10),
    ("DDPMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing",
                       "variance_type": "fixed_large", "clip_sample": False, "beta_schedule": "scaled_linear"}, 12),
    ("DDPMScheduler", {"prediction_type": "sample", "timestep_spacing": "linspace", "beta_schedule": "sigmoid",
                       "thresholding": True, "sample_max_value": 1.5}, 8),
    ("DDPMScheduler", {"steps_offset": 1, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log",
                       "clip_sample_range": 1.5}, 9),
    ("DDPMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing", "clip_sample": False}, 10),
    ("DDPMScheduler", {"trained_betas": np.linspace(2e-4, 0.03, 1000).tolist(), "clip_sample": False}, 7),
    ("DDPMScheduler", {"variance_type": "learned_range", "clip_sample": False}, 9),
    ("DDIMScheduler", {}, 10),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False}, 12),
    ("DDIMScheduler", {"prediction_type": "sample", "timestep_spacing": "linspace", "set_alpha_to_one": False}, 9),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 1.3, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "beta_end": 0.012}, 11),
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                       "timestep_spacing": "trailing", "clip_sample": False}, 10),
    ("DDIMScheduler", {"clip_sample_range": 2.0, "steps_offset": 1, "set_alpha_to_one": False}, 8),
    ("PNDMScheduler", {}, 12),
    ("PNDMScheduler", {"skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 10),
    ("PNDMScheduler", {"timestep_spacing": "linspace", "set_alpha_to_one": True,
                       "beta_schedule": "squaredcos_cap_v2"}, 8),
    ("PNDMScheduler", {"steps_offset": 1, "skip_prk_steps": True}, 9),
    ("DPMSolverMultistepScheduler", {}, 10),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True, "prediction_type": "v_prediction",
                                     "timestep_spacing": "trailing"}, 12),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_lu_lambdas": True,
                                     "thresholding": True, "sample_max_value": 1.5}, 9),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 1,
                                     "use_karras_sigmas": True}, 8),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "final_sigmas_type": "sigma_min",
                                     "prediction_type": "sample"}, 7),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "lower_order_final": False,
                                     "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 16),
    ("DPMSolverMultistepScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                     "timestep_spacing": "trailing"}, 12),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "scaled_linear",
                                     "lambda_min_clipped": -30.0}, 10),
    ("UniPCMultistepScheduler", {}, 10),
    ("UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True, "prediction_type": "v_prediction",
                                 "timestep_spacing": "trailing", "thresholding": True, "sample_max_value": 1.5}, 9),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 12),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}, 11),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 3]}, 10),
    ("UniPCMultistepScheduler", {"lower_order_final": False, "timestep_spacing": "leading", "steps_offset": 1,
                                 "prediction_type": "sample", "final_sigmas_type": "sigma_min"}, 8),
    ("EulerDiscreteScheduler", {}, 10),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
                                "timestep_spacing": "leading"}, 12),
    ("EulerDiscreteScheduler", {"prediction_type": "sample", "timestep_spacing": "trailing",
                                "final_sigmas_type": "sigma_min"}, 9),
    ("EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                "use_karras_sigmas": True}, 8),
    ("HeunDiscreteScheduler", {}, 8),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction",
                               "timestep_spacing": "trailing"}, 7),
    ("HeunDiscreteScheduler", {"clip_sample": True, "clip_sample_range": 1.2, "prediction_type": "sample",
                               "timestep_spacing": "leading"}, 6),
]
EXPECTED_SOLVER = {"DDPMScheduler": DDPM, "DDIMScheduler": DDIM, "PNDMScheduler": PNDM,
                   "UniPCMultistepScheduler": UniPC, "EulerDiscreteScheduler": EDMEuler,
                   "HeunDiscreteScheduler": EDMHeun}


def _case_id(case):
    name, config, n = case
    options = ",".join(f"{k}={v}" for k, v in config.items() if k != "trained_betas")
    return f"{name[:-9]}-{n}-{options or 'defaults'}" + ("-trained_betas" if "trained_betas" in config else "")


def _expected_class(name, config):
    if name != "DPMSolverMultistepScheduler":
        return EXPECTED_SOLVER[name]
    if config.get("algorithm_type") == "sde-dpmsolver++":
        return DPMSolverPP2MSDE
    return DPMSolverPP3M if config.get("solver_order") == 3 else DPMSolverPP2M


def run_against_diffusers(ref, solver, x, eta=0.0, model=smooth_model):
    """Peer and solver from the same x_t, same model and noise; returns the largest relative error over the steps.
    Euler/Heun peers work on x_sigma = x_t·sqrt(sigma² + 1) (scale_model_input): compared in x_t."""
    name = type(ref).__name__
    sigma_space = name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
    assert solver.num_model_evals == len(ref.timesteps)
    np.testing.assert_array_equal(solver.timesteps.numpy(), ref.timesteps.float().numpy())
    peer = x * float((ref.sigmas[0] ** 2 + 1) ** 0.5) if sigma_space else x.clone()
    y, worst = x.clone(), 0.0
    for i, t in enumerate(ref.timesteps):
        kwargs = {}
        if name == "DDPMScheduler":
            kwargs["generator"] = torch.Generator().manual_seed(1000 + i)
        elif name == "DDIMScheduler":
            kwargs.update(eta=eta, variance_noise=step_noise(i, x.shape))
        elif name == "DPMSolverMultistepScheduler" and ref.config.algorithm_type.startswith("sde"):
            kwargs["variance_noise"] = step_noise(i, x.shape)
        model_input = ref.scale_model_input(peer, t) if sigma_space else peer
        peer = ref.step(model(model_input, t.expand(x.shape[0])), t, peer, **kwargs).prev_sample
        y = solver.step(i, y, model(y, solver.timesteps[i].expand(x.shape[0])), noise=step_noise(i, x.shape))
        in_x_t = peer / float((ref.sigmas[i + 1] ** 2 + 1) ** 0.5) if sigma_space else peer
        worst = max(worst, rel_err(in_x_t, y))
    return worst


@pytest.mark.parametrize("case", DIFFUSERS_CASES, ids=[_case_id(c) for c in DIFFUSERS_CASES])
def test_equals_diffusers_step_for_step(case):
    diffusers = pytest.importorskip("diffusers")
    name, config, n = case
    ref = getattr(diffusers, name)(**config)
    ref.set_timesteps(n)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(0)     # diffusers' own timestep lookup mis-indexes repeated timesteps (Karras + cosine)
    solver = from_diffusers(ref)
    assert type(solver) is _expected_class(name, config)
    model = learned_model if config.get("variance_type", "").startswith("learned") else smooth_model
    worst = run_against_diffusers(ref, solver, start(len(config) + n, 1.5), model=model)
    assert worst <= TOL, f"max relative error over the steps {worst:.3g}"


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_eta_equals_diffusers(eta):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(10)
    solver = from_diffusers(ref, eta=eta)
    assert solver.eta == eta
    assert run_against_diffusers(ref, solver, start(3), eta=eta) <= TOL


def test_config_forms_give_the_same_solver(tmp_path):
    """The scheduler object, its .config (no _class_name: told from its options), the saved scheduler_config.json
    as a file, its directory and a pipeline directory (scheduler/ inside) all give the same solver."""
    diffusers = pytest.importorskip("diffusers")
    for name, config, n in [DIFFUSERS_CASES[9], DIFFUSERS_CASES[18], DIFFUSERS_CASES[27], DIFFUSERS_CASES[32]]:
        ref = getattr(diffusers, name)(**config)
        ref.set_timesteps(n)
        reference = from_diffusers(ref)
        folder = tmp_path / name / "scheduler"
        ref.save_config(str(folder))
        forms = {"config": ref.config, "dict": dict(ref.config), "file": str(folder / "scheduler_config.json"),
                 "directory": folder, "pipeline directory": str(folder.parent)}
        for form, value in forms.items():
            solver = from_diffusers(value, num_steps=n)
            assert type(solver) is type(reference), (name, form)
            np.testing.assert_array_equal(solver.timesteps.numpy(), reference.timesteps.numpy())
            np.testing.assert_array_equal(solver.coefficient_table, reference.coefficient_table)


def test_num_steps_argument_overrides_and_custom_grids_are_refused():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler()
    ref.set_timesteps(timesteps=[900, 500, 100, 0])
    with pytest.raises(ValueError, match="set by hand"):
        from_diffusers(ref)
    assert from_diffusers(ref, num_steps=6).num_steps == 6       # the config's own grid for 6 steps
    fresh = diffusers.DDIMScheduler()
    with pytest.raises(ValueError, match="num_steps is required.*set_timesteps was not called"):
        from_diffusers(fresh)


# --- MONAI ---------------------------------------------------------------------------------------------------

MONAI_CASES = [
    ("DDPMScheduler", {}, 10, {}),
    ("DDPMScheduler", {"prediction_type": "v_prediction", "variance_type": "fixed_large", "clip_sample": False},
     12, {}),
    ("DDPMScheduler", {"prediction_type": "sample", "schedule": "scaled_linear_beta", "beta_start": 0.0005,
                       "beta_end": 0.015}, 9, {}),
    ("DDPMScheduler", {"variance_type": "learned_range", "clip_sample": False}, 8, {}),
    ("DDPMScheduler", {"schedule": "cosine", "clip_sample_min": -1.5, "clip_sample_max": 1.5}, 7, {}),
    ("DDIMScheduler", {}, 10, {}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "clip_sample": False, "set_alpha_to_one": False,
                       "steps_offset": 1}, 12, {}),
    ("DDIMScheduler", {"prediction_type": "sample", "schedule": "sigmoid_beta"}, 9, {"eta": 1.0}),
    ("DDIMScheduler", {"clip_sample": False}, 11, {"eta": 0.5}),
    ("PNDMScheduler", {}, 12, {}),
    ("PNDMScheduler", {"skip_prk_steps": True, "prediction_type": "v_prediction"}, 10, {}),
    ("PNDMScheduler", {"steps_offset": 1, "set_alpha_to_one": True, "schedule": "scaled_linear_beta"}, 8, {}),
    ("RFlowScheduler", {}, 10, {}),
    ("RFlowScheduler", {"use_timestep_transform": True}, 12, {"numel": 40 * 36 * 28}),
    ("RFlowScheduler", {"use_discrete_timesteps": False, "use_timestep_transform": True,
                        "base_img_size_numel": 16 ** 3},
     9, {"numel": 24 * 20 * 16}),
    ("RFlowScheduler", {"use_discrete_timesteps": False, "steps_offset": 1}, 7, {}),
]


def _float64_tables(ref):
    """MONAI's DDPM with its tables in float64 from its own betas: in float32 its last step loses up to 1.7e-4
    (relative) to the cancellation in 1 - alpha_bar[0] (test_solvers.test_ddpm_monai_as_is)."""
    ref.betas = ref.betas.double()
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.one = ref.one.double()
    return ref


def monai_case(case):
    schedulers = pytest.importorskip("monai.networks.schedulers")
    name, config, n, extra = case
    ref = getattr(schedulers, name)(**config)
    if "numel" in extra:
        ref.set_timesteps(n, input_img_size_numel=extra["numel"])
    else:
        ref.set_timesteps(n)
    if name == "DDPMScheduler":
        _float64_tables(ref)
    return ref


@pytest.mark.parametrize("case", MONAI_CASES, ids=[f"{c[0][:-9]}-{c[2]}-{','.join(c[1]) or 'defaults'}"
                                                   f"{'-eta' if 'eta' in c[3] else ''}" for c in MONAI_CASES])
def test_equals_monai_step_for_step(case):
    """As MONAI's inferers drive the schedulers: step(output, t, x) with the global torch RNG for DDPM's noise
    (here a seeded generator), next_timestep for RFlow."""
    name, config, n, extra = case
    ref = monai_case(case)
    eta = extra.get("eta", 0.0)
    solver = from_monai(ref, eta=eta)
    assert type(solver).__name__ in {"DDPMScheduler": "DDPM", "DDIMScheduler": "DDIM", "PNDMScheduler": "PNDM",
                                     "RFlowScheduler": "_RFlowEulerOnGrid"}[name]
    np.testing.assert_array_equal(solver.timesteps.numpy(), ref.timesteps.float().numpy())
    model = learned_model if config.get("variance_type") == "learned_range" else smooth_model
    nxt = torch.cat((ref.timesteps[1:], torch.tensor([0], dtype=ref.timesteps.dtype)))
    x = start(n + 40, 1.5)
    y, worst = x.clone(), 0.0
    for i, t in enumerate(ref.timesteps):
        m = model(x, t.expand(2))
        if name == "RFlowScheduler":
            x = ref.step(m, t, x, nxt[i])[0]
        elif name == "DDPMScheduler":
            x = ref.step(m, t, x, generator=torch.Generator().manual_seed(1000 + i))[0]
        elif name == "DDIMScheduler":
            x = ref.step(m, t, x, eta=eta, generator=torch.Generator().manual_seed(1000 + i))[0]
        else:
            x = ref.step(m, t, x)[0]
        y = solver.step(i, y, model(y, solver.timesteps[i].expand(2)), noise=step_noise(i, SHAPE))
        worst = max(worst, rel_err(x, y))
    assert worst <= TOL, f"max relative error over the steps {worst:.3g}"


def test_monai_rflow_with_num_steps_builds_monai_grid():
    schedulers = pytest.importorskip("monai.networks.schedulers")
    ref = schedulers.RFlowScheduler(use_timestep_transform=True, spatial_dim=3)
    ref.set_timesteps(15, input_img_size_numel=48 ** 3)
    solver = from_monai(ref, num_steps=15, input_img_size_numel=48 ** 3)
    assert type(solver) is RFlowEuler
    np.testing.assert_array_equal(solver.timesteps.numpy(), ref.timesteps.float().numpy())
    with pytest.raises(ValueError, match="input_img_size_numel"):
        from_monai(ref, num_steps=15)
    with pytest.raises(ValueError, match="input_img_size_numel goes with num_steps"):
        from_monai(ref, input_img_size_numel=48 ** 3)


def test_monai_refusals_and_wrong_arguments():
    schedulers = pytest.importorskip("monai.networks.schedulers")
    with pytest.raises(ValueError, match=r"clip_sample_min=-2, clip_sample_max=1 \(pydiffmed clips"):
        from_monai(schedulers.DDIMScheduler(clip_sample_min=-2.0))
    with pytest.raises(ValueError, match="num_steps is required"):
        from_monai(schedulers.DDPMScheduler())
    assert from_monai(schedulers.DDPMScheduler(), num_steps=20).num_steps == 20
    with pytest.raises(ValueError, match="eta is DDIMScheduler's step option; PNDMScheduler has none"):
        from_monai(schedulers.PNDMScheduler(), eta=0.5)
    with pytest.raises(ValueError, match="input_img_size_numel is an RFlowScheduler option"):
        from_monai(schedulers.DDIMScheduler(), input_img_size_numel=10)
    moved = schedulers.DDIMScheduler()
    moved.set_timesteps(10)
    moved.timesteps = moved.timesteps + 3
    with pytest.raises(ValueError, match="not the grid its options give"):
        from_monai(moved)
    with pytest.raises(TypeError, match="takes a MONAI scheduler"):
        from_monai(object())
    with pytest.raises(TypeError, match="from_monai"):
        from_diffusers(schedulers.DDIMScheduler())
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(TypeError, match="from_diffusers"):
        from_monai(diffusers.DDIMScheduler())


# =========================================================================================================
# 2. refusals (no peer library needed: configs are plain dicts)
# =========================================================================================================

REFUSED = [  # (class, options, text the message must contain)
    ("DDPMScheduler", {"variance_type": "fixed_large_log"}, "variance_type='fixed_large_log'"),
    ("DDPMScheduler", {"beta_schedule": "laplace"}, "beta_schedule='laplace'"),
    ("DDPMScheduler", {"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ("DDPMScheduler", {"prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ("DDPMScheduler", {"clip_sample": "yes"}, "clip_sample='yes' (must be true or false)"),
    ("DDPMScheduler", {"trained_betas": [0.1, 0.2]}, "trained_betas=[0.1, 0.2] (2 betas for num_train_timesteps"),
    ("DDPMScheduler", {"steps_offset": -1}, "steps_offset=-1"),
    ("DDPMScheduler", {"a_new_option": 3}, "a_new_option=3 (an option pydiffmed does not know"),
    ("DDIMScheduler", {"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio=1.5"),
    ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver'"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
     "algorithm_type='sde-dpmsolver'"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "solver_order=3"),
    ("DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order=4"),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas=True"),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas=True"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas=True"),
    ("DPMSolverMultistepScheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting=True"),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
     "lambda_min_clipped=-5.1 (it cuts the grid short"),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type='sigma_max'"),
    ("UniPCMultistepScheduler", {"solver_p": "DDIMScheduler"}, "solver_p='DDIMScheduler'"),
    ("UniPCMultistepScheduler", {"sigma_min": 0.1}, "sigma_min=0.1"),
    ("UniPCMultistepScheduler", {"shift_terminal": 0.5}, "shift_terminal=0.5"),
    ("UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0=False with final_sigmas_type='zero'"),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min", "thresholding": True},
     "predict_x0=False with thresholding=True"),
    ("UniPCMultistepScheduler", {"solver_type": "dpm"}, "solver_type='dpm'"),
    ("UniPCMultistepScheduler", {"lower_order_final": False}, "lower_order_final=False with final_sigmas_type"),
    ("UniPCMultistepScheduler", {"disable_corrector": "all"}, "disable_corrector='all'"),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "timestep_type='continuous'"),
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
    ("EulerDiscreteScheduler", {"sigma_max": 10.0}, "sigma_max=10.0"),
    ("HeunDiscreteScheduler", {"beta_schedule": "exp"}, "beta_schedule='exp'"),
    ("HeunDiscreteScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas=True"),
]


@pytest.mark.parametrize("name,options,text", REFUSED, ids=[f"{r[0][:-9]}-{next(iter(r[1]))}" for r in REFUSED])
def test_refused_option_is_named(name, options, text):
    with pytest.raises(ValueError) as info:
        from_diffusers({"_class_name": name, **options}, num_steps=10)
    message = str(info.value)
    assert text in message and f"diffusers {name}" in message, message


def test_every_refused_option_is_named_at_once():
    with pytest.raises(ValueError) as info:
        from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "use_beta_sigmas": True,
                        "algorithm_type": "dpmsolver", "timestep_spacing": "middle"}, num_steps=10)
    message = str(info.value)
    for text in ("use_beta_sigmas=True", "algorithm_type='dpmsolver'", "timestep_spacing='middle'"):
        assert text in message, message


@pytest.mark.parametrize("name,why", [("EDMEulerScheduler", "EDM preconditioning"),
                                      ("EDMDPMSolverMultistepScheduler", "EDM preconditioning"),
                                      ("LMSDiscreteScheduler", "no solver mapped")])
def test_unmapped_classes_are_refused(name, why):
    with pytest.raises(ValueError, match=f"{name} cannot be converted: .*{why}.*convertible: DDPMScheduler"):
        from_diffusers({"_class_name": name}, num_steps=10)


def test_wrong_arguments():
    with pytest.raises(ValueError, match="num_steps is required .*a config does not say"):
        from_diffusers({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="eta is DDIMScheduler's step option; UniPCMultistepScheduler has none"):
        from_diffusers({"_class_name": "UniPCMultistepScheduler"}, num_steps=10, eta=1.0)
    with pytest.raises(ValueError, match="eta must be a non-negative number"):
        from_diffusers({"_class_name": "DDIMScheduler"}, num_steps=10, eta=-1)
    with pytest.raises(TypeError, match="from_diffusers takes"):
        from_diffusers(42)
    with pytest.raises(ValueError, match="cannot tell which diffusers scheduler"):
        from_diffusers({"beta_start": 0.001})
    with pytest.raises(ValueError, match="num_steps=1001 is too many"):
        from_diffusers({"_class_name": "DDIMScheduler"}, num_steps=1001)
    with pytest.raises(ValueError, match="beta_end must lie in"):
        from_diffusers({"_class_name": "DDIMScheduler", "beta_end": 2.0}, num_steps=10)


def test_config_files_and_errors(tmp_path):
    config = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0", "timestep_spacing": "trailing",
              "prediction_type": "v_prediction", "clip_sample": False}
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    path = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(config))
    solvers = [from_diffusers(p, num_steps=12) for p in (path, str(path), path.parent, tmp_path / "pipe")]
    for solver in solvers:
        assert isinstance(solver, DDIM) and solver.spacing == "trailing" and solver.clip is None
        assert solver.prediction_type == "v_prediction" and solver.prev_rule == "stride"
        np.testing.assert_array_equal(solver.coefficient_table, solvers[0].coefficient_table)
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        from_diffusers(tmp_path, num_steps=3)
    with pytest.raises(FileNotFoundError, match="no such scheduler config file"):
        from_diffusers(str(tmp_path / "missing.json"), num_steps=3)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON scheduler config"):
        from_diffusers(bad, num_steps=3)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="a scheduler config is a JSON object"):
        from_diffusers(bad, num_steps=3)


def test_defaults_fill_a_partial_config():
    """A config that leaves options out gets diffusers' defaults (as from_config does)."""
    dpm = from_diffusers({"_class_name": "DPMSolverMultistepScheduler"}, num_steps=10)
    assert type(dpm) is DPMSolverPP2M and dpm.grid == "uniform" and dpm.spacing == "linspace"
    assert dpm.solver_type == "midpoint" and dpm.lower_order_final and dpm.final == "zero"
    ddpm = from_diffusers({"_class_name": "DDPMScheduler"}, num_steps=10)
    assert ddpm.clip == 1.0 and ddpm.spacing == "leading" and ddpm.variance_type == "fixed_small"
    heun = from_diffusers({"_class_name": "HeunDiscreteScheduler"}, num_steps=10)
    assert heun.schedule._beta_range == (0.00085, 0.012) and heun.grid == "uniform" and heun.clip is None
    karras = from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
                             "use_lu_lambdas": True}, num_steps=10)
    assert karras.grid == "karras"      # diffusers tests use_karras_sigmas first
    deis = from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "deis"}, num_steps=10)
    assert type(deis) is DPMSolverPP2M  # diffusers itself turns deis into dpmsolver++
    harmless = from_diffusers({"_class_name": "DDIMScheduler", "some_future_flag": False, "other": None},
                              num_steps=10)
    assert isinstance(harmless, DDIM)
    kept = from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -100.0}, 10)
    np.testing.assert_array_equal(kept.coefficient_table, dpm.coefficient_table)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_DEFAULTS))
def test_class_told_from_a_full_config(name):
    """A scheduler's .config has no _class_name: its option names tell the class."""
    assert _guess_class(DIFFUSERS_DEFAULTS[name]) == name
    assert type(from_diffusers(dict(DIFFUSERS_DEFAULTS[name]), num_steps=6)) is _expected_class(name, {})
