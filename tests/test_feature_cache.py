"""DeepCache-style feature caching (issue 19): UNet3D's full forward that also returns the deep features at a cache
branch, its shallow forward on them, and the engine's schedule of full and shallow evaluations (CPU eager here;
CUDA graphs in the gpu case): exactness where it must be exact, the cost on the bundled demo model, counts, the
command's option and sidecar, and the errors."""
import importlib
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import randomised

import pydiffmed
from pydiffmed import modelfile
from pydiffmed.cli import main
from pydiffmed.engine import Sampler
from pydiffmed.models import UNet3D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=(1, 2, 1), channels=(8, 16, 16),
             attention_levels=(False, False, True), norm_num_groups=4, num_head_channels=(0, 0, 8))
SHAPE = (2, 1, 8, 8, 8)


def small_unet(**overrides):
    return randomised(UNet3D(**{**SMALL, **overrides}), seed=3, scale=0.2)


class Counts:
    """Forward hooks counting every model evaluation (conv_in runs in each) and the full ones (the middle block runs
    only in a full forward)."""

    def __init__(self, model):
        self.all = self.full = 0
        model.conv_in.register_forward_hook(lambda *_: self._add("all"))
        model.middle_block.register_forward_hook(lambda *_: self._add("full"))

    def _add(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def reset(self):
        self.all = self.full = 0


# --- the network -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {},
    {"resblock_updown": True, "num_res_blocks": 2},
    {"spatial_dims": 2},
    {"with_conditioning": True, "cross_attention_dim": 6, "num_head_channels": (0, 0, 4), "num_class_embeds": 3},
], ids=["attention", "resblock_updown", "2d", "context+classes"])
def test_full_forward_with_cache_and_shallow_forward_reproduce_forward(config):
    """Every branch: forward_and_cache's output is forward's (the same operations, bit for bit), and the shallow
    forward on the features of the same x and t gives it again."""
    model = small_unet(**config)
    shape = SHAPE[:2] + SHAPE[2:2 + model.spatial_dims]
    x = torch.randn(shape)
    t = torch.tensor([700.0, 30.0])
    cond = {}
    if model.with_conditioning:
        cond["context"] = torch.randn(2, 5, 6)
    if model.num_class_embeds:
        cond["class_labels"] = torch.tensor([0, 2])
    with torch.no_grad():
        reference = model(x, t, **cond)
        assert model.num_cache_branches == 1 + sum(model.num_res_blocks) + len(model.block_out_channels) - 1
        for branch in range(model.num_cache_branches):
            out, features = model.forward_and_cache(x, t, branch=branch, **cond)
            assert torch.equal(out, reference), branch
            assert tuple(features.shape) == model.cache_feature_shape(shape, branch)
            shallow = model.forward_shallow(x, t, features, branch=branch, **cond)
            torch.testing.assert_close(shallow, reference, rtol=0, atol=1e-6)
            # other features give another output: the shallow path really reads them
            assert not torch.allclose(model.forward_shallow(x, t, features * 1.5, branch=branch, **cond), reference)


def test_level_branch_caches_the_input_of_the_last_up_blocks():
    """cache_branch_of_level(d): the cached features are the output of the up block above the last d (what enters
    them from the deeper path)."""
    model = small_unet()
    x, t = torch.randn(SHAPE), torch.tensor([500.0, 500.0])
    levels = len(model.block_out_channels)
    for depth in range(1, levels):
        seen = []
        handle = model.up_blocks[levels - 1 - depth].register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            _, features = model.forward_and_cache(x, t, branch=model.cache_branch_of_level(depth))
            model(x, t)
        handle.remove()
        assert torch.equal(features, seen[-1])
    assert [model.cache_branch_of_level(d) for d in (1, 2)] == [1, 4]   # num_res_blocks (1, 2, 1)
    with pytest.raises(ValueError, match=r"depth must be an int in \[1, 2\]"):
        model.cache_branch_of_level(3)


def test_forward_shallow_refuses_features_of_another_shape():
    model = small_unet()
    x, t = torch.randn(SHAPE), torch.tensor([500.0])
    with torch.no_grad():
        _, features = model.forward_and_cache(x, t, branch=1)
        with pytest.raises(ValueError, match=r"features must be the deep features of cache branch 0, shape "
                                             r"\(2, 8, 8, 8, 8\); got \(2, 16, 8, 8, 8\)"):
            model.forward_shallow(x, t, features, branch=0)
        with pytest.raises(ValueError, match=r"cache branch must be an int in \[0, 6\]"):
            model.forward_and_cache(x, t, branch=7)


# --- the engine ------------------------------------------------------------------------------------------------

def test_interval_1_equals_no_cache_exactly():
    model = small_unet()
    plain = Sampler(model, "dpmpp_2m", SHAPE, num_steps=5, check_memory=False)(0)
    one = Sampler(model, "dpmpp_2m", SHAPE, num_steps=5, check_memory=False, feature_cache=1)
    assert one.cache_schedule() == [None] * 5
    assert torch.equal(one(0), plain)


@pytest.mark.parametrize("solver, steps, interval, strength", [
    ("ddim", 7, 2, None), ("dpmpp_2m", 6, 3, None), ("edm_heun", 3, 2, None), ("ddim", 10, 3, 0.5),
    ("dpmpp_2m", 6, 4, None)])
def test_full_and_shallow_evaluations_as_planned(solver, steps, interval, strength):
    """A full evaluation first and every interval-th after it (from the first evaluation run, SDEdit's included),
    shallow ones between: counted by hooks in the network."""
    model = small_unet()
    counts = Counts(model)
    sampler = Sampler(model, solver, SHAPE, num_steps=steps, check_memory=False, feature_cache=interval,
                      strength=strength)
    run = sampler.num_model_evals - sampler.start_index
    full = math.ceil(run / interval)
    schedule = sampler.cache_schedule()
    assert schedule == ["full" if k % interval == 0 else "shallow" for k in range(run)]
    init = torch.zeros(SHAPE) if strength else None
    sampler(0, init=init)
    assert (counts.all, counts.full) == (run, full)
    counts.reset()
    plain = Sampler(model, solver, SHAPE, num_steps=steps, check_memory=False, strength=strength)
    plain(0, init=init)
    assert (counts.all, counts.full) == (run, run)


def test_one_graph_per_kind_full_and_shallow(monkeypatch):
    """The graph bookkeeping on the CPU (Sampler._capture replaced by eager replays of the captured step, as in
    test_engine): feature caching captures a "full" and a "shallow" graph per solver form, and replaying them gives
    the eager volumes."""
    captured = []

    def capture(sampler, kinds, first_eval, preview):
        for kind in kinds:
            captured.append(kind)
            sampler._graphs[(kind, preview)] = type("Graph", (), {
                "replay": staticmethod(lambda k=kind: sampler._step(*k, preview))})()

    monkeypatch.setattr(Sampler, "_capture", lambda self, *a: capture(self, *a))
    model = small_unet()
    eager = Sampler(model, "edm_heun", SHAPE, num_steps=3, check_memory=False, feature_cache=3, cuda_graph=False)
    graphed = Sampler(model, "edm_heun", SHAPE, num_steps=3, check_memory=False, feature_cache=3)
    graphed.use_cuda_graph = True
    assert torch.equal(graphed(2), eager(2))
    forms = set(graphed.plan.form_of_eval)
    assert {kind[2] for kind in captured} == {"full", "shallow"}
    assert len(captured) == len({(graphed.plan.form_of_eval[e], kind) for e, kind in
                                 enumerate(graphed.cache_schedule())}) <= 2 * len(forms)
    assert torch.equal(graphed(3), eager(3)) and len(captured) == len(set(captured))   # reused, not recaptured


def test_cache_holds_both_halves_of_a_guidance_batch_and_is_batch_invariant():
    """With classifier-free guidance the model batch is 2B and the cache holds it whole; calling the model one sample
    at a time (batch_invariant) gives the same volumes bit for bit on the CPU, as without caching."""
    model = small_unet(num_class_embeds=3)
    cond, uncond = {"class_labels": torch.tensor([1, 2])}, {"class_labels": torch.tensor([0, 0])}

    def run(**options):
        sampler = Sampler(model, "dpmpp_2m", SHAPE, num_steps=6, guidance_scale=3.0, check_memory=False, **options)
        return sampler, sampler(5, cond=cond, uncond=uncond)

    _, plain = run()
    sampler, cached = run(feature_cache=2)
    assert sampler._features.shape[0] == 4
    _, invariant = run(feature_cache=2, batch_invariant=True)
    assert torch.equal(invariant, cached)
    assert not torch.equal(cached, plain)
    # the guided samples are still close to the uncached ones (the shallow path sees the fresh input and t)
    assert (cached - plain).abs().max() < 0.25 * plain.abs().max()


def test_inpainting_and_preview_with_feature_cache():
    model = small_unet()
    mask = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    mask[..., :4] = True
    known = torch.full((1, 1, 8, 8, 8), 0.5)
    steps = []
    out = Sampler(model, "ddim", SHAPE, num_steps=4, check_memory=False, feature_cache=2)(
        0, mask=mask, known=known, callback=lambda e, x0: steps.append(e))
    assert steps == [0, 1, 2, 3]
    assert torch.equal(out[..., :4], torch.full((2, 1, 8, 8, 4), 0.5))


@pytest.fixture(scope="module")
def demo():
    return pydiffmed.load_model("demo")


def test_demo_model_cost_of_caching(demo):
    """The bundled demo model, 20 dpmpp_2m steps, two 32³ samples (model units, [-1, 1]). Caching changes a sample
    a little. Measured RMS changes (CPU, fp32): 0.015 with interval 2 and 0.023 with interval 3 (1.7 % and 2.7 % of
    the samples' RMS, 0.86), against 0.097 between the two seeds of the batch (the phantoms' heads differ in
    details only) and 0.35-0.44 for a cache that is wrong (shallow evaluations on zeros, or features never refreshed
    after the first evaluation). The bound, 0.05 and half the seed-to-seed change, leaves room for other CPUs'
    rounding and sits far below a wrong cache."""
    model, schedule, info = demo
    options = dict(num_steps=20, schedule=schedule, prediction_type=info.prediction_type, clip=info.clip_sample,
                   check_memory=False)
    shape = (2, 1, *info.volume_shape)
    plain = Sampler(model, "dpmpp_2m", shape, **options)(0)
    between_seeds = (plain[0] - plain[1]).pow(2).mean().sqrt()
    changes = {}
    for interval in (2, 3):
        cached = Sampler(model, "dpmpp_2m", shape, feature_cache=interval, **options)(0)
        assert torch.isfinite(cached).all() and cached.abs().max() <= 1.0 + 1e-6
        changes[interval] = float((cached - plain).pow(2).mean().sqrt())
        assert changes[interval] > 1e-4, "caching should change the samples"
        assert changes[interval] < 0.05 and changes[interval] < 0.5 * between_seeds, changes
    assert changes[3] > changes[2]  # reusing features longer costs more


# --- errors ------------------------------------------------------------------------------------------------------

def test_bad_feature_cache_arguments():
    model = small_unet()
    make = lambda m=model, **kw: Sampler(m, "ddim", SHAPE, num_steps=4, check_memory=False, **kw)  # noqa: E731
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"feature_cache must be >= 1 .*got {bad}"):
            make(feature_cache=bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="feature_cache must be an int >= 1"):
            make(feature_cache=bad)
    with pytest.raises(ValueError, match=r"cache branch must be an int in \[0, 6\].*got 7"):
        make(feature_cache=2, cache_branch=7)
    with pytest.raises(ValueError, match=r"cache branch must be an int in \[0, 6\].*got -1"):
        make(feature_cache=2, cache_branch=-1)
    with pytest.raises(ValueError, match="cache_branch=1 goes with feature_cache="):
        make(cache_branch=1)

    class Plain(torch.nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(TypeError, match="deep features of a pydiffmed UNet3D .* the model is a Plain"):
        make(Plain(), feature_cache=2)
    with pytest.raises(TypeError, match="the model is a function"):
        make(lambda x, t: x, feature_cache=2)
    make(Plain(), feature_cache=None)  # off: any model


def test_monai_model_gets_a_hint():
    nets = pytest.importorskip("monai.networks.nets")
    from pydiffmed import accelerate

    monai_unet = nets.DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 8),
                                         attention_levels=(False, False), num_res_blocks=1, norm_num_groups=4)
    for model in (monai_unet, accelerate(monai_unet)):
        with pytest.raises(TypeError, match=r"DiffusionModelUNet: convert it with .*UNet3D.from_monai"):
            Sampler(model, "ddim", (1, 1, 8, 8, 8), num_steps=4, check_memory=False, feature_cache=2)


# --- the command ---------------------------------------------------------------------------------------------------

CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
          "prediction_type": "epsilon", "volume_shape": [8, 8, 8]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, small_unet(), CONFIG)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_option_samples_what_the_engine_does_and_records_it(tmp_path, tiny, capsys):
    model, schedule, info = pydiffmed.load_model(tiny)
    solver = pydiffmed.solvers.get_solver("ddim", schedule, 5, prediction_type=info.prediction_type)
    volumes = {}
    for name, extra in (("plain", []), ("one", ["--feature-cache", "1"]), ("two", ["--feature-cache", "2"]),
                        ("deep", ["--feature-cache", "2", "--cache-branch", "4"])):
        out = tmp_path / name
        code, _, err = run(capsys, "sample", "--model", tiny, "--out", out, "--num", 2, "--steps", 5, "--solver",
                           "ddim", "--quiet", *extra)
        assert code == 0, err
        sidecar = json.loads((out / "sample_0001.json").read_text())
        volumes[name] = torch.from_numpy(nib.load(str(out / "sample_0001.nii.gz")).get_fdata(dtype=np.float32))
        expected = {"plain": (None, None, 5), "one": (1, 0, 5), "two": (2, 0, 3), "deep": (2, 4, 3)}[name]
        assert (sidecar["feature_cache"], sidecar["cache_branch"], sidecar["full_model_evals"]) == expected
        assert sidecar["num_model_evals"] == 5
    assert torch.equal(volumes["one"], volumes["plain"])
    assert not torch.equal(volumes["two"], volumes["plain"])
    # the engine with the same settings gives the command's volume (seed 1: the second volume)
    reference = Sampler(model, solver, (1, 1, 8, 8, 8), feature_cache=2)(1)
    torch.testing.assert_close(volumes["two"].reshape(reference.shape), reference, rtol=1e-5, atol=1e-5)

    # --resume counts only volumes made with the same caching
    code, _, err = run(capsys, "sample", "--model", tiny, "--out", tmp_path / "two", "--num", 2, "--steps", 5,
                       "--solver", "ddim", "--quiet", "--resume")
    assert code == 2 and "different settings" in err


@pytest.mark.parametrize("extra, fragment", [
    (["--feature-cache", "0"], "--feature-cache must be >= 1"),
    (["--feature-cache", "-3"], "--feature-cache must be >= 1"),
    (["--cache-branch", "1"], "--cache-branch goes with --feature-cache"),
    (["--feature-cache", "2", "--cache-branch", "-1"], "--cache-branch must be >= 0"),
    (["--feature-cache", "2", "--cache-branch", "9"], r"cache branch must be an int in [0, 6]"),
])
def test_command_bad_values_are_one_line_usage_errors(tmp_path, tiny, capsys, extra, fragment):
    out = tmp_path / "out"
    code, _, err = run(capsys, "sample", "--model", tiny, "--out", out, "--num", 1, "--steps", 2, "--quiet", *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and fragment in lines[0], err
    assert not os.path.exists(out) or not [f for f in os.listdir(out) if not f.startswith(".")]


# --- the benchmark ---------------------------------------------------------------------------------------------

def test_benchmark_smoke(tmp_path, tiny):
    env = dict(os.environ, PYDIFFMED_BENCH_RESULTS=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_feature_cache.py"), "--smoke",
                           "--model", str(tiny)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "bench_feature_cache_cpu.json") as f:
        result = json.load(f)
    assert "--smoke" in result["command"] and "load average" in result["notes"]
    rows = result["rows"]
    assert [(r["feature_cache"], r["cache_branch"]) for r in rows][:3] == [("off", None), (2, 0), (3, 0)]
    plain = rows[0]
    assert plain["speedup"] == 1.0 and plain["full_evals"] == plain["evals"] and plain["rel_rms_change"] == 0.0
    for r in rows[1:]:
        assert r["ms"] > 0 and r["speedup"] == pytest.approx(plain["ms"] / r["ms"])
        assert r["cpu_ms"] > 0 and r["cpu_speedup"] == pytest.approx(plain["cpu_ms"] / r["cpu_ms"])
        assert r["full_evals"] == math.ceil(r["evals"] / r["feature_cache"])
        assert r["rel_rms_change"] > 0
        for key in ("histogram_W1", "fractions_L1", "structure"):
            assert math.isfinite(r[key]) and r[key] >= 0
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        results_md = importlib.import_module("results_md")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    [(subject, line)] = results_md.headline_feature_cache(rows)
    assert "branch 0" in subject and "interval 2: ×" in line and "interval 3: ×" in line and "% RMS" in line


# --- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_graphs_one_per_kind_equal_eager():
    model = small_unet().cuda()
    shape = (2, 1, 16, 16, 16)
    eager = Sampler(model, "dpmpp_2m", shape, num_steps=6, cuda_graph=False, feature_cache=3)(1)
    sampler = Sampler(model, "dpmpp_2m", shape, num_steps=6, feature_cache=3)
    graphed = sampler(1)
    assert sampler.graph_failure is None
    assert {kind[2] for kind, _ in sampler._graphs} == {"full", "shallow"}
    assert len(sampler._graphs) == 2 * len(set(sampler.plan.form_of_eval))
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(sampler(1), graphed)
    plain = Sampler(model, "dpmpp_2m", shape, num_steps=6)(1)
    assert not torch.equal(plain, graphed)
    # no host sync in the loop
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler.launch(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sampler.raise_if_nonfinite()
    assert torch.isfinite(out).all()


def test_the_memory_estimate_counts_the_feature_buffer():
    model = small_unet()
    plain = Sampler(model, "ddim", SHAPE, num_steps=4).memory_estimate
    cached = Sampler(model, "ddim", SHAPE, num_steps=4, feature_cache=2)
    features = cached._features.numel() * cached._features.element_size()
    assert features > 0 and cached.memory_estimate.state == plain.state + features
