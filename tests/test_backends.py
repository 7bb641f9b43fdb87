"""Dispatch as declarations: the Backend records, each op's OpImpl declarations, the public lookups, and
`choose` (declarations only, no tensors) agreeing with `select` (real tensors) on every input the CPU allows."""
from __future__ import annotations

import importlib
import itertools
import os
import sys

import pytest
import torch

from pydiffmed import backends, cli
from pydiffmed.ops._checks import layout_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _volume(dtype, layout):
    x = torch.randn(2, 4, 3, 3, 3).to(dtype)
    return x.to(memory_format=torch.channels_last_3d) if layout == "cl" else x


# One small real input per op: (tensors select sees, the keyword inputs its limits and reasons read). A new op
# needs an entry here (test_every_op_has_a_sample_input).
SAMPLES = {
    "group_norm": lambda x: ((x, None, None, None), {"x": x, "num_groups": 2, "act": "silu"}),
    "group_norm_stats": lambda x: ((x, None), {"x": x}),
    "group_norm_apply": lambda x: ((x, torch.empty_like(x)), {"x": x, "out": torch.empty_like(x)}),
    "fused_step": lambda x: ((x, x), {"x": x}),
    "per_sample_norm": lambda x: ((x,), {"t": x}),
    "attention": lambda x: ((q := x.flatten(2)[:, :, :16].reshape(2, 2, 2, 16), q, q), {"q": q, "k": q, "v": q}),
}


def test_every_op_has_a_sample_input():
    assert set(SAMPLES) == set(backends.ops())


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_every_op_has_a_torch_implementation_that_takes_anything(op):
    impls = backends.implementations(op)
    assert "torch" in impls and set(impls) <= set(backends.BACKENDS)
    torch_impl = impls["torch"]
    assert torch_impl.dtypes is None and torch_impl.layouts is None and torch_impl.limits == ()
    assert torch_impl.reasons is None and backends.backend("torch").devices is None
    for name, impl in impls.items():
        assert (impl.op, impl.backend) == (op, name) and callable(impl.run)
        assert backends.implementation(op, name) is impl


def test_backend_records():
    assert backends.PRIORITY == ("triton", "cuda", "cpu", "torch")
    assert set(backends.BACKENDS) == set(backends.PRIORITY)
    assert backends.backend("cpu").devices == ("cpu",) and backends.backend("cuda").devices == ("cuda",)
    assert backends.backend("triton").interpreter == "TRITON_INTERPRET"
    lines = backends.describe().splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == list(backends.BACKENDS)
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        backends.backend("fortran")
    with pytest.raises(ValueError, match="unknown op"):
        backends.implementations("fft")
    with pytest.raises(ValueError, match="cuda has no implementation of attention"):
        backends.implementation("attention", "cuda")


def _outcome(call):
    try:
        return call()
    except backends.BackendUnavailable as exc:
        return f"refused: {exc}"


GRID = list(itertools.product(sorted(SAMPLES), backends.FLOAT_DTYPES, ("ncs", "cl"), (None, *backends.BACKENDS)))


@pytest.mark.parametrize("op, dtype, layout, forced", GRID)
def test_choose_agrees_with_select_on_real_tensors(op, dtype, layout, forced):
    """What the declarations say (choose: device, dtype, layout, limit facts; no tensors) is what dispatch does
    on real CPU tensors with those facts, forced or not, run or refused with the same reasons."""
    tensors, inputs = SAMPLES[op](_volume(dtype, layout))
    facts = {limit.name: limit.measure(**inputs) for impl in backends.implementations(op).values()
             for limit in impl.limits}
    declared = _outcome(lambda: backends.choose(op, device="cpu", dtype=dtype, layout=layout_of(tensors[0]),
                                                backend=forced, **facts))
    actual = _outcome(lambda: backends.select(op, forced, tensors, **inputs))
    assert declared == actual


def test_choose_answers_without_tensors(monkeypatch):
    created = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: created.append(a))
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: created.append(a))
    for op in backends.ops():
        assert backends.choose(op, device=torch.device("cpu"), dtype=torch.float32) in ("cpu", "torch")
    assert created == []


def test_choose_checks_declared_limits_and_facts(monkeypatch):
    with pytest.raises(backends.BackendUnavailable, match="head dimension d = 256 > 128"):
        backends.choose("attention", device="cpu", head_dim=256, backend="triton")
    with pytest.raises(ValueError, match="no limit named head_size.*head_dim"):
        backends.choose("attention", device="cpu", head_size=64)
    with pytest.raises(ValueError, match="layout"):
        backends.choose("group_norm", device="cpu", layout="nchw")
    # a layout no fast kernel takes falls back to torch (the ops copy such inputs before they dispatch)
    assert backends.choose("group_norm", device="cpu", layout="strided") == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "fortran")
    with pytest.raises(ValueError, match="PYDIFFMED_BACKEND"):
        backends.choose("group_norm", device="cpu")


def test_triton_attention_limits_match_the_kernel():
    pytest.importorskip("triton")
    kernel = importlib.import_module("pydiffmed.triton_kernels.attention")
    limits = {limit.name: limit.maximum for limit in backends.implementation("attention", "triton").limits}
    assert limits == {"head_dim": 128, "batch_heads": kernel.MAX_GRID_Y}
    big = torch.empty(1, 1, 2, 129, device="meta")
    assert any("128" in r for r in kernel.unsupported_reasons(big, big, big))


def test_declared_dtypes_steer_dispatch(request):
    """A declaration is all it takes: a backend declaring fp32 only is skipped for fp16 by select and choose."""
    request.addfinalizer(lambda: backends.unregister("probe_fp32_op"))
    backends.register("probe_fp32_op", "torch", dtypes=None, layouts=None)(lambda: "torch")
    backends.register("probe_fp32_op", "cpu", dtypes=(torch.float32,))(lambda: "cpu")
    for dtype, expected in ((torch.float32, "cpu"), (torch.float16, "torch")):
        x = torch.zeros(2, dtype=dtype)
        assert backends.select("probe_fp32_op", None, (x,)) == expected
        assert backends.choose("probe_fp32_op", device="cpu", dtype=dtype) == expected
    with pytest.raises(backends.BackendUnavailable, match="cpu has no probe_fp32_op kernel for float16"):
        backends.select("probe_fp32_op", "cpu", (torch.zeros(2, dtype=torch.float16),))
    backends.unregister("probe_fp32_op")
    assert "probe_fp32_op" not in backends.ops()


def test_selections_are_remembered_only_when_no_input_dependent_reasons_decided_them(request):
    """select() remembers an answer per (devices, dtypes, layout, limits) unless a backend it considered got as
    far as its `reasons` callable: a cpu kernel that refuses odd sizes is asked on every call, while a reasons
    callable of a backend the declarations already exclude (triton's, on CPU tensors) is never asked."""
    request.addfinalizer(lambda: backends.unregister("probe_reasons_op"))
    asked = []

    def even_only(x):
        asked.append("cpu")
        return [] if x.shape[0] % 2 == 0 else ["odd size"]

    def gpu_reasons(x):
        asked.append("triton")
        return []

    backends.register("probe_reasons_op", "torch", dtypes=None, layouts=None)(lambda: "torch")
    backends.register("probe_reasons_op", "cpu", layouts=None, reasons=even_only)(lambda: "cpu")
    backends.register("probe_reasons_op", "triton", layouts=None, reasons=gpu_reasons)(lambda: "triton")
    for size, expected in ((2, "cpu"), (3, "torch"), (4, "cpu"), (5, "torch")):
        x = torch.zeros(size)
        assert backends.select("probe_reasons_op", None, (x,), x=x) == expected
    assert asked == ["cpu"] * 4
    backends.unregister("probe_reasons_op", "cpu")
    asked.clear()
    for size in (3, 4):
        x = torch.zeros(size)
        assert backends.select("probe_reasons_op", None, (x,), x=x) == "torch"
    assert asked == []


def test_command_reports_a_backend_for_every_op_without_tensors(monkeypatch):
    def no_select(*args, **kwargs):
        raise AssertionError("the command must answer from the declarations")

    monkeypatch.setattr(backends, "select", no_select)
    summary, chosen = cli._backends_for(torch.device("cpu"), torch.float32)
    assert set(chosen) == set(backends.ops())
    assert summary in backends.BACKENDS  # one backend runs every op here: the one-word summary


def test_benchmark_lists_come_from_the_registry():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        common = importlib.import_module("common")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    expected = [f"bench_{op}" for op in backends.ops()
                if os.path.exists(os.path.join(ROOT, "benchmarks", f"bench_{op}.py"))]
    assert common.op_benchmarks() == expected
    assert {"bench_group_norm", "bench_attention", "bench_fused_step"} <= set(expected)
