"""The sampling loop's CPU thread count under contention (pydiffmed.cpu_threads, issue 19): the policy on scripted
step timings, and the engine running it with the same bits whatever count it picks."""
from __future__ import annotations

import pytest
import torch

import pydiffmed
from pydiffmed import cpu_threads
from pydiffmed.cpu_threads import AdaptiveThreads
from pydiffmed.models import UNet3D


class Cores:
    """A scripted machine: a step at n threads takes wall[n] seconds and gets share[n] cores."""

    def __init__(self, wall, share, threads=2):
        self.wall, self.share, self.current, self.calls = dict(wall), dict(share), threads, []

    def governor(self, **kwargs):
        return AdaptiveThreads(set_threads=self.set, get_threads=lambda: self.current, **kwargs)

    def set(self, n):
        self.calls.append(n)
        self.current = n

    def run(self, count):
        """A governor started on this machine, after `count` steps."""
        governor = self.governor()
        self.steps(governor, count)
        return governor

    def steps(self, governor, count, kind=None):
        for _ in range(count):
            n = governor.threads
            assert self.current == n
            governor.observe(kind, self.wall[n], self.share[n] * self.wall[n])


def test_quiet_run_never_changes_the_count():
    cores = Cores(wall={2: 0.16}, share={2: 1.55})
    governor = cores.run(50)
    assert governor.history == [2] * 50 and cores.calls == []
    governor.restore()
    assert cores.current == 2


def test_starved_threads_drop_to_one_and_probe_back_ever_more_rarely():
    # two busy jobs in other sessions: two threads of ours get 0.53 cores and run 1.05 s, one thread 0.5 s
    cores = Cores(wall={2: 1.05, 1: 0.5}, share={2: 0.53, 1: 0.6})
    governor = cores.run(40)
    history = governor.history
    # the first step at each count only warms up; the second at two threads is enough to leave them
    assert history[:4] == [2, 2, 1, 1]
    probes = [i for i, n in enumerate(history) if i > 1 and n == 2]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == 3 + cpu_threads.RESET_WAIT + 1 and gaps == sorted(gaps) and gaps[-1] > gaps[0]
    assert history.count(2) <= 6  # of 40 steps: the probes cost little
    governor.restore()
    assert cores.current == 2


def test_a_lower_count_that_is_not_faster_is_not_kept():
    # one busy job: two threads get about one core, and one thread is no faster
    cores = Cores(wall={2: 0.28, 1: 0.27}, share={2: 0.98, 1: 1.0})
    governor = cores.run(30)
    assert governor.history[:5] == [2, 2, 1, 1, 2]
    assert governor.history.count(1) <= 5 and governor.history[-1] == 2


def test_one_slow_step_on_a_quiet_machine_costs_one_short_probe():
    # the hypervisor takes the CPU away once (measured: a 31 ms step took 137 ms and got 0.55 of 2 cores): the
    # loop tries one thread, but judges it against its usual two-thread steps, not against the slow one
    cores = Cores(wall={2: 0.031, 1: 0.048}, share={2: 1.95, 1: 1.0})
    governor = cores.run(9)
    governor.observe(None, 0.137, 0.55 * 0.137)
    cores.steps(governor, 20)
    assert governor.history[:12] == [2] * 10 + [1, 1] and governor.history[12:] == [2] * 18


def test_the_count_comes_back_when_the_cores_free_up():
    cores = Cores(wall={2: 1.05, 1: 0.5}, share={2: 0.53, 1: 0.6})
    governor = cores.run(10)
    assert governor.threads == 1
    cores.wall, cores.share = {2: 0.16, 1: 0.25}, {2: 1.55, 1: 1.0}  # the other jobs end
    cores.steps(governor, 70)
    assert governor.history[-10:] == [2] * 10


def test_probes_compare_steps_of_the_same_kind():
    # full and shallow evaluations (feature caching) alternate: a cheap shallow step at one thread must not
    # look like a gain over an expensive full step at two
    cores = Cores(wall={2: 0.3, 1: 0.5}, share={2: 0.9, 1: 1.0})
    governor = cores.governor()
    for i in range(20):
        kind = "full" if i % 2 == 0 else "shallow"
        n = governor.threads
        wall = cores.wall[n] * (1.0 if kind == "full" else 0.4)
        governor.observe(kind, wall, cores.share[n] * wall)
    history = governor.history
    # the probe at one thread warms up both kinds, then its shallow step has no shallow step at two threads to
    # compare with (the first one only warmed up) and waits for a full one
    assert history[:8] == [2, 2, 2, 1, 1, 1, 1, 2]
    assert history.count(1) <= 8 and "1, 1, 1, 1, 1" not in str(history)  # one thread is never kept


def test_threads_argument_and_restore():
    cores = Cores(wall={1: 0.1, 3: 0.1}, share={1: 1.0, 3: 2.5}, threads=3)
    governor = cores.governor(threads=1)
    assert cores.current == 1 and governor.max_threads == 1
    governor.restore()
    assert cores.current == 3
    with pytest.raises(ValueError, match="at least 1"):
        AdaptiveThreads(threads=-1)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def small_unet3d():
    torch.manual_seed(0)
    return UNet3D(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64), attention_levels=(False, True),
                  num_res_blocks=1, num_head_channels=16).eval()


def small_monai_unet():
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    return DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64),
                              attention_levels=(False, True), num_res_blocks=1, num_head_channels=16,
                              norm_num_groups=32).eval()


@pytest.mark.parametrize("network", ["UNet3D", "accelerated MONAI"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampling_gives_the_same_bits_whatever_count_the_loop_picks(monkeypatch, two_threads, network, dtype):
    model = small_unet3d() if network == "UNet3D" else pydiffmed.accelerate(small_monai_unet())
    assert cpu_threads.keeps_bits(model)
    options = dict(shape=(2, 1, 12, 12, 12), solver="dpmpp_2m", num_steps=6, seed=3, dtype=dtype, progress=False)
    fixed = pydiffmed.sample(model, adaptive_threads=False, **options)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    one_thread = pydiffmed.sample(model, adaptive_threads=False, **options)
    torch.set_num_threads(2)
    assert torch.equal(fixed, one_thread)

    monkeypatch.setattr(cpu_threads, "STARVED", 10.0)  # every step at two threads counts as starved
    sampler = pydiffmed.Sampler(model, options["solver"], options["shape"], num_steps=6, dtype=dtype)
    assert sampler.adaptive_threads  # the default for these models
    adaptive = sampler(seed=3)
    history = sampler.thread_history
    assert len(history) == 6 and history[0] == 2 and 1 in history  # a run at both counts
    assert torch.get_num_threads() == 2  # set back after the run
    assert torch.equal(adaptive, fixed)

    quiet = pydiffmed.Sampler(model, options["solver"], options["shape"], num_steps=6, dtype=dtype,
                              adaptive_threads=False)
    quiet(seed=3)
    assert quiet.thread_history == []


def test_adapts_by_default_only_where_the_bits_stay(two_threads):
    """MONAI's own modules and the MRI data steps round differently with another thread count: the default leaves
    the count alone there, adaptive_threads=True adapts anyway."""
    from pydiffmed.inverse import Masking, Measurement

    shape = (1, 1, 8, 8, 8)
    monai = small_monai_unet()
    assert not cpu_threads.keeps_bits(monai)
    assert not pydiffmed.Sampler(monai, "ddim", shape, num_steps=2).adaptive_threads
    assert pydiffmed.Sampler(monai, "ddim", shape, num_steps=2, adaptive_threads=True).adaptive_threads
    unet = small_unet3d()
    assert pydiffmed.Sampler(unet, "ddim", shape, num_steps=2).adaptive_threads
    mask = torch.zeros(shape[2:], dtype=torch.bool)
    mask[..., ::2] = True
    operator = Masking(mask)
    measurement = Measurement(operator, operator.forward(torch.zeros(shape)), 0.0)
    assert not pydiffmed.Sampler(unet, "ddim", shape, num_steps=2, measurement=measurement,
                                 posterior="projection").adaptive_threads
    if torch.cuda.is_available():
        assert not pydiffmed.Sampler(unet.cuda(), "ddim", shape, num_steps=2).adaptive_threads
