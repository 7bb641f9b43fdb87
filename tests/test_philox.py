"""The in-kernel noise of fused_step: Philox4x32-10 + Box-Muller (csrc/common/philox.h).

The torch reference's Philox is checked against Random123's known-answer vectors; every backend's normals
against the reference (<= 1e-6 abs, in fact bit-identical here) and against the float64 Box-Muller formula;
the distribution by moments and normality tests on 10^6 draws; and the promise that a sample's noise depends
only on its seed, the step and the element's logical index (not the batch, the layout or the backend).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import runnable_backends
from pydiffmed import ops
from pydiffmed.ops import reference

NOISE_BACKENDS = runnable_backends("fused_step", [torch.empty(1)], x=torch.empty(1))


def test_backends_under_test():
    assert "torch" in NOISE_BACKENDS and "cpu" in NOISE_BACKENDS, NOISE_BACKENDS


# Random123 tests/kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    words = reference.philox4x32_10(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor([k]) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_reference_counter_and_key_layout():
    """Block i//4 -> counter words (lo, hi), step -> word 2, word 3 = 0, seed -> key (lo, hi)."""
    seed, step = -0x1234567890ABCDEF, 0xDEADBEEF
    words = reference.philox_words(torch.tensor([seed]), step, (1, 4 * 5))
    key = (torch.tensor([seed & 0xFFFFFFFF]), torch.tensor([(seed >> 32) & 0xFFFFFFFF]))
    for block in range(5):
        expected = reference.philox4x32_10(
            (torch.tensor([block]), torch.tensor([0]), torch.tensor([step]), torch.tensor([0])), key)
        assert tuple(int(w[0, block]) for w in words) == tuple(int(w) for w in expected)
    zero = reference.philox_words(torch.tensor([0]), 0, (1, 4))
    assert tuple(int(w[0, 0]) for w in zero) == KAT[0][2]


def _noise(backend, seeds, step, shape):
    return ops.philox_normal(seeds, step, shape, backend=backend)


SEEDS = torch.tensor([0, 1, -1, 2 ** 62 + 12345], dtype=torch.int64)


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
@pytest.mark.parametrize("shape,step", [((4, 1, 7, 5, 3), 0), ((4, 3, 37), 2 ** 32 - 1), ((4, 2, 2, 3), 17)])
def test_backends_agree_with_reference(backend, shape, step):
    got = _noise(backend, SEEDS, step, shape)
    want = reference.philox_normal(SEEDS, step, shape)
    assert got.dtype == torch.float32 and got.shape == shape
    assert (got - want).abs().max().item() <= 1e-6
    # A device-tensor step gives the same numbers as the int.
    got_t = _noise(backend, SEEDS, torch.tensor(step, dtype=torch.int64), shape)
    assert torch.equal(got_t, got)


def test_cpu_and_triton_bit_identical_to_reference():
    """Not required (the contract is 1e-6) but true on this machine: same fp32 operations, no contraction."""
    shape = (4, 5, 41)
    want = reference.philox_normal(SEEDS, 5, shape)
    for backend in NOISE_BACKENDS:
        assert torch.equal(_noise(backend, SEEDS, 5, shape), want), backend


@pytest.fixture(scope="module")
def million():
    """10^6 normals from the fastest backend here (8 samples x 125000), plus the float64 formula."""
    seeds = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    shape = (8, 125000)
    backend = "cpu" if "cpu" in NOISE_BACKENDS else "torch"
    return _noise(backend, seeds, 7, shape), reference.philox_normal_float64(seeds, 7, shape)


def test_accuracy_against_float64_formula(million):
    z, exact = million
    assert (z.double() - exact).abs().max().item() <= 1e-6


def test_moments(million):
    z = million[0].double().flatten()
    mean, var = z.mean().item(), z.var().item()
    centred = (z - mean) / math.sqrt(var)
    skew, kurt = (centred ** 3).mean().item(), (centred ** 4).mean().item()
    # 5-sigma bounds for n = 10^6: se(mean) = 1e-3, se(var) ~ 1.4e-3, se(skew) ~ 2.4e-3, se(kurt) ~ 4.9e-3
    assert abs(mean) < 5e-3 and abs(var - 1) < 7e-3 and abs(skew) < 1.2e-2 and abs(kurt - 3) < 2.5e-2
    assert z.abs().max().item() < math.sqrt(-2 * math.log(2.0 ** -24)) + 1e-5  # the mapping's largest radius
    # Tail mass beyond 3 sigma: 0.0026998; binomial sd ~ 5.2e-5.
    assert abs((z.abs() > 3).double().mean().item() - 0.0026998) < 3e-4


def test_normality_and_independence(million):
    stats = pytest.importorskip("scipy.stats")
    z = million[0].flatten().double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert stats.normaltest(z).pvalue > 1e-3
    # Box-Muller partners (same radius), neighbours across Philox blocks, and samples: uncorrelated
    # (|r| < 5 / sqrt(n)); the partners' squares too (the radius is shared, so dependence would show there).
    pairs = z.reshape(-1, 2)
    tol = 5 / math.sqrt(pairs.shape[0])
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < tol
    assert abs(np.corrcoef(pairs[:, 0] ** 2, pairs[:, 1] ** 2)[0, 1]) < tol
    quads = z.reshape(-1, 4)
    assert abs(np.corrcoef(quads[:-1, 3], quads[1:, 0])[0, 1]) < tol
    per_sample = million[0].double().numpy()
    assert abs(np.corrcoef(per_sample[0], per_sample[1])[0, 1]) < 5 / math.sqrt(per_sample.shape[1])


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
def test_noise_of_a_sample_independent_of_batch(backend):
    shape = (4, 2, 3, 5, 7)
    batch = _noise(backend, SEEDS, 3, shape)
    for b in range(4):
        alone = _noise(backend, SEEDS[b:b + 1], 3, (1, *shape[1:]))
        assert torch.equal(alone[0], batch[b])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(_noise(backend, SEEDS, 4, shape), batch)  # another step, other noise


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
def test_noise_independent_of_layout(backend):
    """fused_step draws z by logical (NCDHW) index: a channels_last state gets the same noise per element."""
    shape = (4, 3, 2, 5, 3)
    coefs = ops.step_coefs(s=1.0)
    x = torch.zeros(shape)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    z = ops.fused_step(x, x, coefs, seeds=SEEDS, noise_step=9, backend=backend)
    z_cl = ops.fused_step(x_cl, x_cl, coefs, seeds=SEEDS, noise_step=9, backend=backend)
    assert z_cl.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(z_cl, z)
    assert torch.equal(z, reference.philox_normal(SEEDS, 9, shape))


def test_philox_normal_arguments():
    with pytest.raises(TypeError, match="seeds"):
        ops.philox_normal(torch.tensor([1.0]), 0, (1, 4))
    with pytest.raises(ValueError, match="batch size"):
        ops.philox_normal(torch.tensor([1, 2]), 0, (3, 4))
    with pytest.raises(ValueError, match="noise_step"):
        ops.philox_normal(torch.tensor([1]), 2 ** 32, (1, 4))
    with pytest.raises(ValueError, match="noise_step"):
        ops.philox_normal(torch.tensor([1]), -1, (1, 4))
    assert ops.philox_normal(torch.tensor([1]), 0, (1, 0)).shape == (1, 0)
