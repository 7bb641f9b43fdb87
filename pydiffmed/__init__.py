"""pydiffmed: a fast sampler engine for diffusion models on 3-D medical volumes."""
__version__ = "0.1.0"

from . import _openmp  # noqa: E402  (before torch: see its docstring)

OPENMP_WAIT_POLICY_SET = _openmp.set_wait_policy()

from . import backends, distributed, ops  # noqa: E402,F401
from .accelerate import accelerate  # noqa: E402
from .engine import Sampler, sample  # noqa: E402
from .memory import estimate_memory  # noqa: E402
from .modelfile import load_autoencoder, load_model  # noqa: E402
from .schedules import NoiseSchedule  # noqa: E402
from .solvers import get_solver  # noqa: E402

__all__ = ["NoiseSchedule", "Sampler", "accelerate", "backends", "estimate_memory", "get_solver", "load_autoencoder",
           "load_model", "ops", "sample", "__version__"]
