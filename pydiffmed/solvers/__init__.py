"""Solvers: a schedule and a step count turned into a SamplingPlan (one fused_step row per model evaluation).

    solver = pydiffmed.get_solver("dpmpp_2m", schedule, 20, prediction_type="epsilon")
    solver.timesteps, solver.num_model_evals, solver.plan(device), solver.step(i, x, model_output)

One file per family: ddpm, ddim (+ inversion), pndm, ald (NCSN), sde (Euler-Maruyama, predictor-corrector),
ode (Heun, RK4, adaptive Dormand-Prince), dpmpp (DPM-Solver++ 2M / 3M / 2M-SDE), unipc, edm (Euler, Heun),
rflow (rectified-flow Euler and Heun on MONAI's RFlowScheduler grid).
`from_diffusers(scheduler_or_config)` / `from_monai(scheduler)` (convert.py): the solver taking a peer
scheduler's steps.
"""
from ..schedules import NoiseSchedule
from .ald import AnnealedLangevin
from .base import CAPABILITIES, Solver
from .convert import from_diffusers, from_monai
from .ddim import DDIM, DDIMInversion
from .ddpm import DDPM
from .dpmpp import DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP3M
from .edm import EDMEuler, EDMHeun
from .ode import ODEDopri5, ODEHeun, ODERK4
from .plan import SamplingPlan, StepForm
from .pndm import PNDM
from .rflow import RFlowEuler, RFlowHeun
from .sde import EulerMaruyama, PredictorCorrector
from .unipc import UniPC

SOLVERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "ddim_inversion": DDIMInversion,
    "pndm": PNDM,
    "ald": AnnealedLangevin,
    "euler_maruyama": EulerMaruyama,
    "pc": PredictorCorrector,
    "ode_heun": ODEHeun,
    "ode_rk4": ODERK4,
    "ode_dopri5": ODEDopri5,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_3m": DPMSolverPP3M,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "unipc": UniPC,
    "edm_euler": EDMEuler,
    "edm_heun": EDMHeun,
    "rflow_euler": RFlowEuler,
    "rflow_heun": RFlowHeun,
}


def get_solver(name, schedule, num_steps=None, **opts):
    """A solver by name (see SOLVERS) for `schedule` with `num_steps` steps; opts are the solver's options
    (prediction_type, clip, thresholding, spacing, grid, ... — see each class). Adaptive solvers
    (names(adaptive=True)) take no num_steps."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(SOLVERS)}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a pydiffmed.schedules.NoiseSchedule, got {type(schedule).__name__}")
    return SOLVERS[name](schedule, num_steps, **opts)


def names(**capabilities) -> list[str]:
    """Sorted names of the solvers whose declared capabilities (CAPABILITIES, class attributes of Solver) have
    the given values: names(plannable=True, encodes=False) are the samplers the engine runs,
    names(can_start_partway=True) those SDEdit can use."""
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capability {', '.join(sorted(unknown))}; expected one of {CAPABILITIES}")
    return sorted(name for name, cls in SOLVERS.items()
                  if all(getattr(cls, key) == bool(value) for key, value in capabilities.items()))


__all__ = ["CAPABILITIES", "SOLVERS", "get_solver", "names", "Solver", "SamplingPlan", "StepForm", "from_diffusers",
           "from_monai"] + sorted(
    cls.__name__ for cls in SOLVERS.values())
