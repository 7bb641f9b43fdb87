"""Solvers: a schedule and a step count turned into a SamplingPlan (one fused_step row per model evaluation).

    solver = pydiffmed.get_solver("dpmpp_2m", schedule, 20, prediction_type="epsilon")
    solver.timesteps, solver.num_model_evals, solver.plan(device), solver.step(i, x, model_output)
"""
from .base import Solver
from .ddim import DDIM, DDIMInversion
from .ddpm import DDPM
from .dpmpp import DPMSolverPP2M, DPMSolverPP2MSDE, DPMSolverPP3M
from .pndm import PNDM
from .unipc import UniPC
from .plan import SamplingPlan, StepForm

SOLVERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "ddim_inversion": DDIMInversion,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_3m": DPMSolverPP3M,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "unipc": UniPC,
    "pndm": PNDM,
}


def get_solver(name, schedule, num_steps, **opts) -> Solver:
    """A solver by name (see SOLVERS) for `schedule` with `num_steps` steps; opts are the solver's options."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; available: {sorted(SOLVERS)}")
    return SOLVERS[name](schedule, num_steps, **opts)


__all__ = ["SOLVERS", "get_solver", "Solver", "SamplingPlan", "StepForm", "DDPM", "DDIM", "DDIMInversion"]
