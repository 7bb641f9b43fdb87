"""The number of torch CPU threads a sampling loop uses, following the CPU share the process actually gets.

On cores that other jobs also want, the scheduler gives this process a share of them, not its thread count:
with Linux's autogroups (one group per session) or cgroups (containers, batch systems), two threads of ours next
to two busy jobs on two cores get about two thirds of one core between them. Every torch op ends with a barrier,
so each thread keeps waiting for its descheduled partner (benchmarks/bench_contention.py, small UNet at 48³ in
bf16: two threads 4.8× slower than quiet, this loop, on one thread, 3.8×; README "Shared machines"). When the
other jobs share our session instead, the scheduler shares per thread and two threads beat one: no thread count
is right for every case, so the loop measures: each step's process CPU time against its wall time says whether
the threads got the cores they ask for, and a step run at another count (a probe) says whether that count is
faster.

Policy, per step: at n threads, a step that got less than STARVED·n cores tries fewer threads (about as many as it
got) on the next step; below the starting count it tries one thread more from time to time. A probe is kept only if
its step takes at most KEEP of the lower median of the last RECENT steps of the same kind at the previous count
(steps of another kind, such as feature caching's shallow evaluations, wait for one of theirs): one step slowed by a
passing hiccup (the hypervisor taking the CPU away for 0.1 s, measured on this machine: a 31 ms step took 137 ms)
makes the loop try fewer threads, but it does not make a slower count look faster than the usual one. Each probe
that is not kept doubles the steps to the next one (up to MAX_WAIT). A quiet run at the starting count that gets its
cores never probes, so it pays only two clock reads per step. The first step of each kind at each count is not
judged: it carries one-time costs (warm-up, oneDNN's kernels for that count). Results do not depend on the thread
count: pydiffmed's CPU kernels and oneDNN's convolutions give the same bits with one thread or several
(tests/test_cpu_threads.py checks whole sampling runs), which `keeps_bits` names; the engine adapts by default only
there.
"""
from __future__ import annotations

import time

import torch

STARVED = 0.5     # a step whose n threads got less than this many times n cores (quiet: 1.1-1.7 of 2)
KEEP = 0.9        # a probe is kept if its step takes at most this fraction of the previous count's last step
FIRST_WAIT = 1    # steps before the first probe (a run that starts under load leaves the slow count at once)
RESET_WAIT = 4    # after a kept probe
MAX_WAIT = 64
MAX_PROBE_STEPS = 4  # a probe whose steps have no same-kind step at the previous count to compare with ends
RECENT = 3        # steps per (kind, count) a probe is judged against


def keeps_bits(model) -> bool:
    """Whether sampling with `model` gives the same bits at any CPU thread count: a pydiffmed UNet3D or a model
    passed through pydiffmed.accelerate (oneDNN convolutions, pydiffmed's GroupNorm and attention, per-sample
    GEMMs). MONAI's own modules do not (their sampling runs ended 8e-5 apart with one thread and with two)."""
    from .models import UNet3D

    return isinstance(model, UNet3D) or bool(getattr(model, "_pdm_accelerated", False))


class AdaptiveThreads:
    """Runs the steps of one loop (`run`) and sets torch's CPU thread count between them; `restore()` sets the
    count it started with back. threads: the most it uses (default torch.get_num_threads() now). The clocks and
    the setter are arguments so that tests can drive the policy."""

    def __init__(self, threads: int | None = None, *, clock=time.perf_counter, cpu_clock=time.process_time,
                 set_threads=torch.set_num_threads, get_threads=torch.get_num_threads):
        self._get = get_threads
        self._initial = get_threads()
        self.max_threads = int(threads or self._initial)
        if self.max_threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._clock, self._cpu_clock, self._set = clock, cpu_clock, set_threads
        self.threads = self.max_threads
        if self.threads != self._initial:
            self._set(self.threads)
        self._recent = {}      # (step kind, threads) -> wall seconds of the latest RECENT such steps
        self._warm = set()     # (step kind, threads) run at least once: later ones are measures
        self._probe_from = None  # the count a probe left, until the probe is judged
        self._probe_steps = 0
        self._wait = FIRST_WAIT
        self._since_probe = 0
        self.history = []      # the thread count of every step run (what tests and benchmarks read)

    def run(self, step, kind=None):
        """step() at the current count; then the count for the next step is chosen. Returns step()'s result."""
        wall, cpu = self._clock(), self._cpu_clock()
        result = step()
        self.observe(kind, self._clock() - wall, self._cpu_clock() - cpu)
        return result

    def observe(self, kind, wall: float, cpu: float) -> None:
        n = self.threads
        self.history.append(n)
        key = (kind, n)
        if key not in self._warm:  # one-time costs (oneDNN builds its kernels per thread count): not a measure
            self._warm.add(key)
            if self._probe_from is not None:
                self._probe_steps += 1
                if self._probe_steps >= MAX_PROBE_STEPS:
                    self._end_probe(kept=False, judged=False)
            return
        recent = self._recent.setdefault(key, [])
        recent[:] = [*recent[-(RECENT - 1):], wall]
        if self._probe_from is not None:
            before = sorted(self._recent.get((kind, self._probe_from), ()))
            reference = before[(len(before) - 1) // 2] if before else None
            self._probe_steps += 1
            if reference is None and self._probe_steps < MAX_PROBE_STEPS:
                return  # no step of this kind ran at the previous count yet: judge on a later one
            self._end_probe(kept=reference is not None and wall <= KEEP * reference, judged=reference is not None)
            return
        self._since_probe += 1
        if self._since_probe < self._wait:
            return
        got = cpu / wall if wall > 0 else float(n)  # cores this step's threads got
        if n > 1 and got < STARVED * n:
            self._probe(max(1, min(n - 1, round(got))))
        elif n < self.max_threads:
            self._probe(n + 1)

    def restore(self) -> None:
        self._switch(self._initial)

    def _end_probe(self, kept: bool, judged: bool) -> None:
        previous, self._probe_from = self._probe_from, None
        if kept:
            self._wait = RESET_WAIT
        else:
            if judged:
                self._wait = min(2 * self._wait, MAX_WAIT)
            self._switch(previous)
        self._since_probe = 0

    def _probe(self, threads: int) -> None:
        self._probe_from, self._probe_steps = self.threads, 0
        self._switch(threads)

    def _switch(self, threads: int) -> None:
        if threads != self.threads or threads != self._get():
            self._set(threads)
        self.threads = threads
