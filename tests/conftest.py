"""Test setup. Without a GPU the Triton kernels run through the interpreter, which must be switched on before
any @triton.jit function is defined, so this happens here, before pydiffmed or pydiffmed.triton_kernels are
imported."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# `--dtype auto` means float32 on the CPU in every test, here and in the processes tests start, whether or not this
# CPU has native bf16: results then do not depend on the machine. tests/test_auto_dtype.py covers both branches.
os.environ["PYDIFFMED_CPU_BF16"] = "0"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Every property test draws the same examples on every run and machine (no example database, no random seed), so
# a failure reproduces and the suite cannot fail at random.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("deterministic")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny tensors: more threads only add contention on the shared CI cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
