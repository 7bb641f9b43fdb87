"""How long idle OpenMP threads spin before they sleep, set before torch loads its OpenMP runtime (libgomp reads
it once, when it is loaded).

libgomp's default, when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set, is 300 000 spins: milliseconds of a
busy core per wait on a CPU with a slow `pause`. On a machine whose cores other jobs also want, a thread that
reaches a barrier first then burns the time slice its partner needs, and every torch op ends with a barrier: a
forward runs several times slower than its share of the cores allows. With 1000 spins (tens of microseconds)
a waiting thread sleeps instead, while the gap between the ops of one forward is still short enough to be spun
through. benchmarks/bench_contention.py measures both, quiet and under a competing load.

A setting of the user's own (either variable) wins, and so does a torch imported before pydiffmed: then the
runtime is loaded already and this changes nothing (README, "Shared machines").
"""
import os
import sys

SPIN_COUNT = "1000"
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def describe(set_here: bool, environ=os.environ) -> str:
    """One line for `pydiffmed info`: the wait setting OpenMP runs with, and whose it is."""
    chosen = [f"{name}={environ[name]}" for name in _WAIT_VARIABLES if name in environ]
    if set_here:
        return f"{', '.join(chosen)} (set by pydiffmed before torch loaded)"
    if chosen:
        return f"{', '.join(chosen)} (from the environment)"
    return "libgomp's default (torch was imported before pydiffmed)"


def set_wait_policy(environ=os.environ, modules=sys.modules) -> bool:
    """Set GOMP_SPINCOUNT=SPIN_COUNT unless the user chose a wait policy or torch is loaded; True if it did."""
    if "torch" in modules or any(name in environ for name in _WAIT_VARIABLES):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
