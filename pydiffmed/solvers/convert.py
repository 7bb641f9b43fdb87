"""A diffusers or MONAI scheduler turned into the pydiffmed solver that takes the same steps.

    solver = pydiffmed.solvers.from_diffusers(scheduler)                 # after scheduler.set_timesteps(n)
    solver = pydiffmed.solvers.from_diffusers(scheduler.config, num_steps=20)
    solver = pydiffmed.solvers.from_diffusers("model_dir/scheduler", num_steps=20)   # scheduler_config.json
    solver = pydiffmed.solvers.from_monai(monai_scheduler)              # after scheduler.set_timesteps(n)
    volumes = pydiffmed.sample(model, shape, solver=solver)             # solver.schedule is its NoiseSchedule

Every option of the schedulers below is mapped, and every option value pydiffmed does not implement is refused
with one ValueError that names each such option and value (nothing is silently approximated):

diffusers                      pydiffmed
DDPMScheduler                  ddpm (grid posterior; timestep_spacing → spacing, clip_sample → clip =
                               clip_sample_range, thresholding, variance_type fixed_small[_log] / fixed_large /
                               learned / learned_range)
DDIMScheduler                  ddim (prev_rule='stride', as diffusers steps to t - N // num_steps; eta= the step's
                               eta; clip / thresholding keep eps from the unclipped x0 as diffusers'
                               use_clipped_model_output=False does)
PNDMScheduler                  pndm (variant 'diffusers')
DPMSolverMultistepScheduler    dpmpp_2m / dpmpp_3m by solver_order (1, 2, 3), dpmpp_2m_sde for algorithm_type
                               'sde-dpmsolver++' (orders 1, 2); use_karras_sigmas → grid='karras', use_lu_lambdas
                               → grid='logsnr', final_sigmas_type → final
UniPCMultistepScheduler        unipc (solver_type → variant, use_karras_sigmas → grid='karras'; with solver_type
                               'bh1' and final_sigmas_type 'zero' diffusers' last step is NaN, pydiffmed's finite)
EulerDiscreteScheduler         edm_euler, HeunDiscreteScheduler → edm_heun (grid 'uniform' or 'karras'; Heun's
                               clip_sample → clip); the
                               solver's state is x_t = x_sigma / sqrt(sigma² + 1), where diffusers' is x_sigma
                               (its init_noise_sigma and scale_model_input): start from plain N(0, 1) noise
Not mapped: EDMEulerScheduler and EDMDPMSolverMultistepScheduler (their EDM preconditioning c_in / c_skip / c_out /
c_noise = log(σ)/4 is not one of pydiffmed's prediction types), flow-matching and the other schedulers.

MONAI (monai.networks.schedulers)
DDPMScheduler                  ddpm (spacing='monai', posterior='train_step': MONAI's one-training-step posterior,
                               learned_range in linear space)
DDIMScheduler                  ddim (spacing='monai', prev_rule='stride'; MONAI's clip_sample=True default keeps
                               eps from the unclipped x0: a two-pass step, run by `step`/eager loops, not a plan)
PNDMScheduler                  pndm (variant 'monai')
RFlowScheduler                 rflow_euler on the scheduler's own timesteps (resolution shift included), with
                               MONAI's int(next_timestep) in dt as its inferers call step (truncate_next_timestep)

num_steps: from the scheduler when set_timesteps was called (diffusers' num_inference_steps; MONAI's grid length),
else required. A live scheduler's timesteps are checked against the solver's: a grid set with custom timesteps or
sigmas (which no option describes) is refused. Beta tables: diffusers' are rebuilt from the config (its named
schedules, or trained_betas); MONAI's are the scheduler's own betas.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from ..schedules import NoiseSchedule
from .base import Solver
from .ddim import DDIM
from .ddpm import DDPM
from .dpmpp import DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP3M
from .edm import EDMEuler, EDMHeun
from .pndm import PNDM
from .rflow import RFlowEuler
from .unipc import UniPC

# The options of each diffusers scheduler pydiffmed maps, with diffusers' defaults (diffusers 0.42). A config may
# leave any of them out (older diffusers versions wrote fewer), as diffusers' from_config allows.
_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_MULTISTEP = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace", "steps_offset": 0,
              "final_sigmas_type": "zero", "rescale_betas_zero_snr": False, "use_dynamic_shifting": False,
              "time_shift_type": "exponential"}
DIFFUSERS_DEFAULTS = {
    "DDPMScheduler": dict(_BETAS, **_THRESHOLD, variance_type="fixed_small", clip_sample=True,
                          prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                          steps_offset=0, rescale_betas_zero_snr=False),
    "DDIMScheduler": dict(_BETAS, **_THRESHOLD, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                          prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                          rescale_betas_zero_snr=False),
    "PNDMScheduler": dict(_BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                          timestep_spacing="leading", steps_offset=0),
    "DPMSolverMultistepScheduler": dict(_BETAS, **_THRESHOLD, **_MULTISTEP, solver_order=2, prediction_type="epsilon",
                                        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                        euler_at_final=False, use_lu_lambdas=False, lambda_min_clipped=-math.inf,
                                        variance_type=None),
    "UniPCMultistepScheduler": dict(_BETAS, **_THRESHOLD, **_MULTISTEP, solver_order=2, prediction_type="epsilon",
                                    predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
                                    solver_p=None, sigma_min=None, sigma_max=None, shift_terminal=None),
    "EulerDiscreteScheduler": dict(_BETAS, prediction_type="epsilon", interpolation_type="linear",
                                   use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                                   sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                                   timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
                                   final_sigmas_type="zero"),
    "HeunDiscreteScheduler": dict(_BETAS, beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                                  use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                                  clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace",
                                  steps_offset=0),
}
DIFFUSERS_SCHEDULERS = tuple(DIFFUSERS_DEFAULTS)
MONAI_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "RFlowScheduler")

_UNMAPPED = {
    "EDMEulerScheduler": "its EDM preconditioning (model input ×c_in, model time log(σ)/4, x0 = c_skip·x + "
                         "c_out·output) is not one of pydiffmed's prediction types",
    "EDMDPMSolverMultistepScheduler": "its EDM preconditioning (model input ×c_in, model time log(σ)/4, x0 = "
                                      "c_skip·x + c_out·output) is not one of pydiffmed's prediction types",
}
_SPACINGS = ("leading", "trailing", "linspace")
_NAMED_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
_MAX_CONFIG_BYTES = 1 << 20


# --- options -------------------------------------------------------------------------------------------------

def _same(a, b) -> bool:
    """Equality that keeps bools apart from numbers (True is not 1 here)."""
    if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
        return isinstance(a, (bool, np.bool_)) and isinstance(b, (bool, np.bool_)) and bool(a) == bool(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):   # arrays, tensors: not an option value we map
        return False


class _Options:
    """A scheduler's option values (defaults filled in) and the problems found while mapping them."""

    def __init__(self, source: str, values: Mapping, defaults: Mapping):
        self.source = source
        self.values = dict(defaults)
        self.problems: list[str] = []
        for key, value in values.items():
            if not isinstance(key, str):
                self.problems.append(f"{key!r} (option names are strings)")
            elif key.startswith("_"):
                continue                      # _class_name, _diffusers_version, _use_default_values
            elif key in defaults:
                self.values[key] = value
            elif value is not None and not _same(value, False):
                # an option this mapping does not know (a newer diffusers?): pydiffmed cannot tell what it does
                self.problems.append(f"{key}={value!r} (an option pydiffmed does not know; only unset / false "
                                     "values of unknown options are accepted)")

    def __getitem__(self, key):
        return self.values[key]

    def refuse(self, key, why):
        self.problems.append(f"{key}={self.values[key]!r} ({why})")

    def one_of(self, key, allowed, why=None):
        value = self.values[key]
        if not any(_same(value, a) for a in allowed):
            self.refuse(key, why or f"pydiffmed implements {' / '.join(repr(a) for a in allowed)}")
            return allowed[0]
        return value

    def flag(self, key) -> bool:
        value = self.values[key]
        if not isinstance(value, (bool, np.bool_)):
            self.refuse(key, "must be true or false")
            return False
        return bool(value)

    def off(self, key, why):
        """The option must be unset / false (a feature pydiffmed does not implement)."""
        value = self.values[key]
        if value is not None and not _same(value, False):
            self.refuse(key, why)

    def number(self, key, positive=False) -> float:
        value = self.values[key]
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if not ok or not math.isfinite(value) or (positive and value <= 0):
            self.refuse(key, f"must be a finite{' positive' if positive else ''} number")
            return 1.0
        return float(value)

    def integer(self, key, minimum=0) -> int:
        value = self.values[key]
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if not ok or value < minimum:
            self.refuse(key, f"must be an integer >= {minimum}")
            return minimum
        return int(value)

    def raise_if_refused(self):
        if self.problems:
            raise ValueError(f"{self.source}: pydiffmed cannot reproduce these option values: "
                             + "; ".join(self.problems))


def _prediction(o, allowed=("epsilon", "v_prediction", "sample")):
    return str(o.one_of("prediction_type", allowed))


def _clip_and_threshold(o, clip_key="clip_sample"):
    """clip / thresholding options of the Solver base class."""
    opts = {}
    if clip_key is not None and o.flag(clip_key):
        opts["clip"] = o.number("clip_sample_range", positive=True)
    if "thresholding" in o.values and o.flag("thresholding"):
        ratio = o.number("dynamic_thresholding_ratio", positive=True)
        if ratio > 1:
            o.refuse("dynamic_thresholding_ratio", "must lie in (0, 1]")
        max_value = o.number("sample_max_value")
        if max_value < 1:
            o.refuse("sample_max_value", "must be >= 1")
        opts.update(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    return opts


def _diffusers_schedule(o, betas=_NAMED_BETAS):
    """A function building the NoiseSchedule of a diffusers config (called once the options are all checked)."""
    n = o.integer("num_train_timesteps", minimum=2)
    rescale = o.flag("rescale_betas_zero_snr") if "rescale_betas_zero_snr" in o.values else False
    trained = o["trained_betas"]
    if trained is not None:
        try:
            values = np.asarray(trained, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            o.refuse("trained_betas", "must be a list of numbers")
            return None
        if values.size != n:
            o.refuse("trained_betas", f"{values.size} betas for num_train_timesteps={n}")
            return None
        # diffusers keeps them as float32
        values = torch.tensor(values, dtype=torch.float32).double().numpy()
        return lambda: NoiseSchedule.discrete(values, rescale_zero_snr=rescale)
    name = o.one_of("beta_schedule", betas, f"a beta_schedule {o.source} does not implement or pydiffmed does not "
                                             f"map; pydiffmed maps {' / '.join(betas)} (or trained_betas)")
    start, end = o.number("beta_start"), o.number("beta_end")
    return lambda: NoiseSchedule.discrete(name, num_train_timesteps=n, beta_start=start, beta_end=end,
                                          rescale_zero_snr=rescale)


def _spacing(o):
    return str(o.one_of("timestep_spacing", _SPACINGS))


# --- diffusers, one mapping per scheduler ------------------------------------------------------------------------

def _diffusers_ddpm(o, eta):
    variance = o.one_of("variance_type", ("fixed_small", "fixed_small_log", "fixed_large", "learned",
                                          "learned_range"),
                        "pydiffmed implements fixed_small / fixed_small_log / fixed_large / learned / learned_range "
                        "(diffusers' fixed_large_log takes the square root of log(beta), a NaN)")
    opts = dict(prediction_type=_prediction(o), variance_type=str(variance), spacing=_spacing(o),
                steps_offset=o.integer("steps_offset"), **_clip_and_threshold(o))
    return DDPM, opts, _diffusers_schedule(o, _NAMED_BETAS + ("sigmoid",))


def _diffusers_ddim(o, eta):
    opts = dict(prediction_type=_prediction(o), spacing=_spacing(o), steps_offset=o.integer("steps_offset"),
                set_alpha_to_one=o.flag("set_alpha_to_one"), prev_rule="stride", eta=eta, **_clip_and_threshold(o))
    return DDIM, opts, _diffusers_schedule(o)


def _diffusers_pndm(o, eta):
    opts = {"prediction_type": _prediction(o, ("epsilon", "v_prediction")), "spacing": _spacing(o),
            "steps_offset": o.integer("steps_offset"), "skip_prk_steps": o.flag("skip_prk_steps"),
            "set_alpha_to_one": o.flag("set_alpha_to_one"), "variant": "diffusers"}
    return PNDM, opts, _diffusers_schedule(o)


def _multistep_common(o):
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
        o.off(key, "pydiffmed has no such sigma grid")
    opts = dict(prediction_type=_prediction(o), spacing=_spacing(o), steps_offset=o.integer("steps_offset"),
                final=str(o.one_of("final_sigmas_type", ("zero", "sigma_min"))),
                lower_order_final=o.flag("lower_order_final"), **_clip_and_threshold(o, clip_key=None))
    return opts


def _diffusers_dpm(o, eta):
    opts = _multistep_common(o)
    algorithm = o["algorithm_type"]
    if _same(algorithm, "deis"):
        algorithm = "dpmsolver++"             # diffusers itself replaces it
    if not any(_same(algorithm, a) for a in ("dpmsolver++", "sde-dpmsolver++")):
        o.refuse("algorithm_type", "pydiffmed implements the data-prediction forms 'dpmsolver++' and "
                                   "'sde-dpmsolver++'")
    sde = _same(algorithm, "sde-dpmsolver++")
    order = o.one_of("solver_order", (1, 2, 3))
    if sde and _same(order, 3):
        o.refuse("solver_order", "pydiffmed's sde-dpmsolver++ has orders 1 and 2")
    solver_type = o["solver_type"]
    if any(_same(solver_type, s) for s in ("logrho", "bh1", "bh2")):
        solver_type = "midpoint"              # as diffusers re-registers them
    elif not any(_same(solver_type, s) for s in ("midpoint", "heun")):
        o.refuse("solver_type", "pydiffmed implements 'midpoint' / 'heun'")
        solver_type = "midpoint"
    o.off("variance_type", "diffusers' DPM-Solver keeps the first 3 channels of a learned-variance output; "
                           "pydiffmed does not reproduce that")
    karras, lu = o.flag("use_karras_sigmas"), o.flag("use_lu_lambdas")
    grid = "karras" if karras else "logsnr" if lu else "uniform"   # diffusers tests Karras first
    opts.update(order=int(order), solver_type=str(solver_type), grid=grid, euler_at_final=o.flag("euler_at_final"))
    schedule = _diffusers_schedule(o)
    clipped = o["lambda_min_clipped"]
    if not (isinstance(clipped, (int, float)) and not isinstance(clipped, bool)):
        o.refuse("lambda_min_clipped", "must be a number")
    elif clipped != -math.inf and schedule is not None and not o.problems:
        lam = _fp32_lambdas(schedule())
        if np.count_nonzero(lam < np.float32(clipped)):
            o.refuse("lambda_min_clipped", "it cuts the grid short (diffusers' cosine-schedule truncation); "
                                           "pydiffmed's grids always span the whole schedule")
    cls = DPMSolverPP2MSDE if sde else DPMSolverPP3M if _same(order, 3) else DPMSolverPP2M
    return cls, opts, schedule


def _fp32_lambdas(schedule):
    """diffusers' lambda_t = log(alpha_t) - log(sigma_t) in float32 (zero-SNR end floored at 2^-24 as it does)."""
    ac = torch.tensor(schedule.fp32_alphas_cumprod(), dtype=torch.float32)
    if schedule._zero_snr:
        ac[-1] = 2.0 ** -24
    return (torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))).numpy()


def _diffusers_unipc(o, eta):
    opts = _multistep_common(o)
    o.off("solver_p", "pydiffmed's UniPC has its own predictor only")
    for key in ("sigma_min", "sigma_max", "shift_terminal"):
        o.off(key, "pydiffmed takes the grid's ends from the training schedule")
    variant = o["solver_type"]
    if any(_same(variant, s) for s in ("midpoint", "heun", "logrho")):
        variant = "bh2"                        # as diffusers re-registers them
    elif not any(_same(variant, s) for s in ("bh1", "bh2")):
        o.refuse("solver_type", "pydiffmed implements 'bh1' / 'bh2'")
        variant = "bh2"
    predict_x0 = o.flag("predict_x0")
    if not predict_x0 and opts["final"] == "zero":
        o.problems.append("predict_x0=False with final_sigmas_type='zero' (noise prediction cannot step to sigma 0; "
                          "diffusers returns NaN there: use final_sigmas_type='sigma_min')")
    if not opts["lower_order_final"] and opts["final"] == "zero":
        o.problems.append("lower_order_final=False with final_sigmas_type='zero' (a multistep update into sigma 0 "
                          "divides by an infinite step: diffusers returns NaN there)")
    if not predict_x0 and opts.get("thresholding"):
        o.problems.append("predict_x0=False with thresholding=True (pydiffmed thresholds the x0 estimate of "
                          "predict_x0=True only)")
    corrector = o["disable_corrector"]
    if corrector is None:
        corrector = []
    if not isinstance(corrector, (list, tuple)) or not all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in corrector):
        o.refuse("disable_corrector", "must be a list of step indices")
        corrector = []
    opts.update(order=int(o.one_of("solver_order", (1, 2, 3))), variant=str(variant), predict_x0=predict_x0,
                grid="karras" if o.flag("use_karras_sigmas") else "uniform",
                disable_corrector=tuple(int(k) for k in corrector))
    return UniPC, opts, _diffusers_schedule(o)


def _sigma_space_common(o):
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
        o.off(key, "pydiffmed has no such sigma grid")
    return {"prediction_type": _prediction(o), "spacing": _spacing(o), "steps_offset": o.integer("steps_offset"),
            "grid": "karras" if o.flag("use_karras_sigmas") else "uniform"}


def _diffusers_euler(o, eta):
    opts = _sigma_space_common(o)
    o.one_of("interpolation_type", ("linear",), "pydiffmed interpolates the training sigmas linearly ('linear')")
    o.one_of("timestep_type", ("discrete",), "pydiffmed implements the 'discrete' timestep type")
    for key in ("sigma_min", "sigma_max"):
        o.off(key, "pydiffmed takes the grid's ends from the training schedule")
    if o.flag("rescale_betas_zero_snr"):
        o.refuse("rescale_betas_zero_snr", "pydiffmed's sigma-space solvers need a finite terminal sigma")
    opts["final"] = str(o.one_of("final_sigmas_type", ("zero", "sigma_min")))
    return EDMEuler, opts, _diffusers_schedule(o)


def _diffusers_heun(o, eta):
    opts = _sigma_space_common(o)
    opts.update(_clip_and_threshold(o))
    return EDMHeun, opts, _diffusers_schedule(o)


_DIFFUSERS = {"DDPMScheduler": _diffusers_ddpm, "DDIMScheduler": _diffusers_ddim, "PNDMScheduler": _diffusers_pndm,
              "DPMSolverMultistepScheduler": _diffusers_dpm, "UniPCMultistepScheduler": _diffusers_unipc,
              "EulerDiscreteScheduler": _diffusers_euler, "HeunDiscreteScheduler": _diffusers_heun}


def _guess_class(config: Mapping) -> str:
    """The diffusers class of a config without `_class_name` (a scheduler's `.config`), from its option names."""
    keys = set(config)
    if "sigma_data" in keys:
        return "EDMDPMSolverMultistepScheduler" if "solver_order" in keys else "EDMEulerScheduler"
    if "algorithm_type" in keys:
        return "DPMSolverMultistepScheduler"
    if keys & {"predict_x0", "solver_p", "disable_corrector"}:
        return "UniPCMultistepScheduler"
    if "skip_prk_steps" in keys:
        return "PNDMScheduler"
    if keys & {"interpolation_type", "timestep_type"}:
        return "EulerDiscreteScheduler"
    if "variance_type" in keys and "clip_sample" in keys:
        return "DDPMScheduler"
    if "set_alpha_to_one" in keys and "thresholding" in keys:
        return "DDIMScheduler"
    if "clip_sample" in keys and "use_karras_sigmas" in keys:
        return "HeunDiscreteScheduler"
    raise ValueError("cannot tell which diffusers scheduler this config belongs to: it has no '_class_name' and its "
                     f"options {sorted(keys)} match none of {list(DIFFUSERS_SCHEDULERS)}; add '_class_name'")


def load_diffusers_config(path) -> dict:
    """The dict of a diffusers `scheduler_config.json`: `path` is the file, a directory holding it, or a pipeline
    directory holding `scheduler/scheduler_config.json`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "scheduler_config.json"),
                          os.path.join(path, "scheduler", "scheduler_config.json")):
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise FileNotFoundError(f"{path}: no scheduler_config.json in this directory (nor in scheduler/)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such scheduler config file")
    if os.path.getsize(path) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes is too large for a scheduler config")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON scheduler config ({exc})") from None
    if isinstance(config, dict):
        return config
    raise ValueError(f"{path}: a scheduler config is a JSON object, got {type(config).__name__}")


def _check_eta(eta, class_name):
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a non-negative number, got {eta!r}")
    if eta != 0 and class_name != "DDIMScheduler":
        raise ValueError(f"eta={eta!r}: eta is DDIMScheduler's step option; {class_name} has none")
    return float(eta)


def _steps_of(num_steps, live, class_name):
    if num_steps is not None:
        return num_steps
    if getattr(live, "custom_timesteps", False):
        raise ValueError(f"{class_name}: its timesteps were set by hand (set_timesteps(timesteps=...)), which no "
                         "option describes and pydiffmed does not reproduce; pass num_steps= for the grid of its "
                         "options")
    n = getattr(live, "num_inference_steps", None) if live is not None else None
    if n is None:
        where = ("set_timesteps was not called on this scheduler" if live is not None
                 else "a config does not say how many steps to take")
        raise ValueError(f"{class_name}: num_steps is required ({where})")
    return int(n)


def _check_grid(solver, timesteps, source):
    """ValueError unless the solver evaluates the model at exactly the scheduler's timesteps."""
    theirs = torch.as_tensor(timesteps).detach().cpu().float().reshape(-1)
    ours = solver.timesteps
    if ours.shape != theirs.shape or not torch.equal(ours, theirs):
        raise ValueError(f"{source}: the scheduler's timesteps {_short(theirs)} are not the grid its options give "
                         f"({_short(ours)}): were they set by hand or with custom timesteps / sigmas? pydiffmed "
                         "reproduces only the grid of the options (pass num_steps= to build that one)")


def _short(t):
    values = [f"{v:g}" for v in t.tolist()]
    return "[" + ", ".join(values if len(values) <= 8 else values[:4] + ["..."] + values[-3:]) + "]"


def from_diffusers(scheduler_or_config, num_steps=None, *, eta=0.0) -> Solver:
    """The pydiffmed solver (with its NoiseSchedule as `.schedule`) that takes the steps of a diffusers scheduler.

    scheduler_or_config: a diffusers scheduler object, its `.config` (any mapping; `_class_name` optional), or the
      path of a `scheduler_config.json` (or of a directory holding one, or a pipeline directory with
      `scheduler/scheduler_config.json`). Reading a config needs no diffusers installation.
    num_steps: the number of inference steps; default: the scheduler's `num_inference_steps` (set_timesteps),
      required for a config. With it left out, a scheduler's timesteps must equal the solver's (custom timesteps
      or sigmas are refused).
    eta: DDIMScheduler.step's eta (stochastic DDIM); other schedulers take none.
    Raises ValueError naming every option value pydiffmed does not implement (see the module docstring)."""
    live = None
    module = type(scheduler_or_config).__module__ or ""
    if module.startswith(("monai", "generative")):
        raise TypeError(f"{type(scheduler_or_config).__name__} is a MONAI scheduler: use "
                        "pydiffmed.solvers.from_monai")
    if isinstance(scheduler_or_config, (str, os.PathLike)):
        config = load_diffusers_config(scheduler_or_config)
    elif isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
    elif isinstance(getattr(scheduler_or_config, "config", None), Mapping):
        live, config = scheduler_or_config, dict(scheduler_or_config.config)
        config["_class_name"] = type(live).__name__
    else:
        raise TypeError("from_diffusers takes a diffusers scheduler, its .config (a mapping) or the path of a "
                        f"scheduler_config.json, got {type(scheduler_or_config).__name__}")
    class_name = config.get("_class_name") or _guess_class(config)
    if not isinstance(class_name, str):
        raise TypeError(f"_class_name must be a string, got {class_name!r}")
    if class_name not in _DIFFUSERS:
        why = _UNMAPPED.get(class_name, "pydiffmed has no solver mapped to it")
        raise ValueError(f"diffusers {class_name} cannot be converted: {why}; convertible: "
                         f"{', '.join(DIFFUSERS_SCHEDULERS)}")
    eta = _check_eta(eta, class_name)
    options = _Options(f"diffusers {class_name}", config, DIFFUSERS_DEFAULTS[class_name])
    cls, opts, make_schedule = _DIFFUSERS[class_name](options, eta)
    options.raise_if_refused()
    steps = _steps_of(num_steps, live, class_name)
    solver = cls(make_schedule(), steps, **opts)
    if live is not None and num_steps is None and getattr(live, "timesteps", None) is not None:
        _check_grid(solver, live.timesteps, f"diffusers {class_name}")
    return solver


# --- MONAI -----------------------------------------------------------------------------------------------------

class _RFlowEulerOnGrid(RFlowEuler):
    """rflow_euler on given model times: a MONAI RFlowScheduler's `timesteps` as its set_timesteps made them (the
    resolution shift depends on the input_img_size_numel passed there, which the scheduler does not keep)."""

    def __init__(self, schedule, num_steps, *, times, **opts):
        self._given_times = np.asarray(times, dtype=np.float64).reshape(-1)
        if len(self._given_times) != num_steps:
            raise ValueError(f"{num_steps} steps need {num_steps} times, got {len(self._given_times)}")
        super().__init__(schedule, num_steps, **opts)

    def _times(self):
        return self._given_times.copy()


def _monai_str(value):
    return str(getattr(value, "value", value))


def _monai_clip(o, scheduler):
    if not o.flag("clip_sample"):
        return {}
    low, high = (float(v) for v in scheduler.clip_sample_values)
    if not (high > 0 and low == -high and math.isfinite(high)):
        o.problems.append(f"clip_sample_min={low:g}, clip_sample_max={high:g} (pydiffmed clips the x0 estimate to "
                          "a symmetric range [-c, c])")
        return {}
    return {"clip": high}


def _monai_alpha_to_one(scheduler):
    """MONAI keeps set_alpha_to_one only as final_alpha_cumprod (1, or alphas_cumprod[0])."""
    return float(scheduler.final_alpha_cumprod) == 1.0


def _monai_schedule(scheduler):
    betas = torch.as_tensor(scheduler.betas).detach().cpu().double().numpy()
    return NoiseSchedule.discrete(betas)


def from_monai(scheduler, num_steps=None, *, eta=0.0, input_img_size_numel=None) -> Solver:
    """The pydiffmed solver (with its NoiseSchedule as `.schedule`) that takes the steps of a MONAI scheduler
    (monai.networks.schedulers: DDPMScheduler, DDIMScheduler, PNDMScheduler, RFlowScheduler).

    num_steps: default the scheduler's own grid (after set_timesteps; MONAI's DDIM and PNDM set 1000 steps when
      made), whose timesteps the solver then reproduces exactly (checked). Given, the solver builds MONAI's grid
      for that many steps (an RFlowScheduler with use_timestep_transform then needs input_img_size_numel, the
      voxel count of one sampled volume, as set_timesteps does).
    eta: DDIMScheduler.step's eta (MONAI's inferers use 0).
    Raises ValueError naming every option value pydiffmed does not implement."""
    cls_name = type(scheduler).__name__
    module = type(scheduler).__module__ or ""
    if module.startswith("diffusers"):
        raise TypeError(f"{cls_name} is a diffusers scheduler: use pydiffmed.solvers.from_diffusers")
    if cls_name not in MONAI_SCHEDULERS or not (module.startswith(("monai", "generative"))):
        raise TypeError(f"from_monai takes a MONAI scheduler ({', '.join(MONAI_SCHEDULERS)} of "
                        f"monai.networks.schedulers), got {module}.{cls_name}")
    eta = _check_eta(eta, cls_name)
    source = f"MONAI {cls_name}"
    given = num_steps
    if cls_name == "RFlowScheduler":
        return _monai_rflow(scheduler, num_steps, input_img_size_numel, source)
    if input_img_size_numel is not None:
        raise ValueError(f"input_img_size_numel is an RFlowScheduler option; {cls_name} has none")
    values = {"prediction_type": _monai_str(scheduler.prediction_type)}
    if cls_name in ("DDPMScheduler", "DDIMScheduler"):
        values["clip_sample"] = scheduler.clip_sample
    defaults = {"prediction_type": "epsilon", "clip_sample": False}
    o = _Options(source, values, defaults)
    if cls_name == "PNDMScheduler":
        opts = {"prediction_type": _prediction(o, ("epsilon", "v_prediction")),
                "skip_prk_steps": bool(scheduler.skip_prk_steps), "set_alpha_to_one": _monai_alpha_to_one(scheduler),
                "steps_offset": int(scheduler.steps_offset), "variant": "monai"}
        cls = PNDM
        if num_steps is None and getattr(scheduler, "_timesteps", None) is not None:
            num_steps = len(scheduler._timesteps)
    elif cls_name == "DDIMScheduler":
        opts = dict(prediction_type=_prediction(o), spacing="monai", prev_rule="stride", eta=eta,
                    steps_offset=int(scheduler.steps_offset), set_alpha_to_one=_monai_alpha_to_one(scheduler),
                    **_monai_clip(o, scheduler))
        cls = DDIM
    else:
        variance = o.values["variance_type"] = _monai_str(scheduler.variance_type)
        o.one_of("variance_type", ("fixed_small", "fixed_large", "learned", "learned_range"))
        opts = dict(prediction_type=_prediction(o), spacing="monai", posterior="train_step", variance_type=variance,
                    learned_range_space="linear", **_monai_clip(o, scheduler))
        cls = DDPM
    o.raise_if_refused()
    steps = _steps_of(num_steps, scheduler, cls_name)
    solver = cls(_monai_schedule(scheduler), steps, **opts)
    if given is None and getattr(scheduler, "timesteps", None) is not None:
        _check_grid(solver, scheduler.timesteps, source)
    return solver


def _monai_rflow(scheduler, num_steps, numel, source):
    common = {"use_discrete_timesteps": bool(scheduler.use_discrete_timesteps), "truncate_next_timestep": True,
              "steps_offset": int(scheduler.steps_offset)}
    schedule = NoiseSchedule.flow(num_train_timesteps=int(scheduler.num_train_timesteps))
    if num_steps is None:
        times = getattr(scheduler, "timesteps", None)
        if times is None or getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError(f"{source}: num_steps is required (set_timesteps was not called on this scheduler)")
        times = torch.as_tensor(times).detach().cpu().double().numpy()
        if numel is not None:
            raise ValueError("input_img_size_numel goes with num_steps=; without it the scheduler's own timesteps "
                             "are used")
        # the grid is the scheduler's (shift and offset included): build it without them, then take those times
        common["steps_offset"] = 0
        return _RFlowEulerOnGrid(schedule, len(times), times=times, **common)
    # MONAI stores transform_scale but set_timesteps does not pass it on: its grid is always the scale-1 one
    return RFlowEuler(schedule, num_steps, use_timestep_transform=bool(scheduler.use_timestep_transform),
                      input_img_size_numel=numel, base_img_size_numel=scheduler.base_img_size_numel,
                      spatial_dim=int(scheduler.spatial_dim), transform_scale=1.0, **common)


__all__ = ["DIFFUSERS_SCHEDULERS", "MONAI_SCHEDULERS", "from_diffusers", "from_monai", "load_diffusers_config"]
