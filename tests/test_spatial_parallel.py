"""Spatial parallelism (issue 16): one volume split by depth across processes (pydiffmed.spatial_parallel).

The distributed cases run two and three gloo processes on loopback, spawned here (torch.multiprocessing, start
method spawn) and bounded in time: one job per world size computes every case, the tests compare its results
with one process's. UNet3D forward (attention, resblock up/down, the conditioned transformer, a single level)
and whole DDIM (eta = 1: the noise matters, also inpainting) and DPM-Solver++(2M) runs equal the single-process
result within 1e-5 (fp32), with unequal slabs, depths not divisible by the world size and an odd depth. Bad
cases raise on every rank (none is left waiting). AutoencoderKL decode and encode by slabs (without and with
attention, transposed-convolution upsampling, 2-D, odd latent depths) equal one process's likewise. The slab
noise (fused_step's noise_index) is checked on every backend against the whole volume's noise, bit for bit."""
import copy
import datetime
import importlib
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import pydiffmed
from pydiffmed import _cuda, backends, ops
from pydiffmed.models import AutoencoderKL, UNet3D
from pydiffmed.spatial_parallel import slab_bounds

from helpers import (CAN_EMULATE_CUDA, build_cuda_emulation, gloo_threads, launch_emulated, randomize_,
                     runnable_backends)

JOB_TIMEOUT = 240  # seconds for one spawned job (every case of one world size)
TOLERANCE = 1e-5  # of the values' scale (at least 1): fp32 sums in another order
fs_module = importlib.import_module("pydiffmed.ops.fused_step")

# --- models and cases (built alike in the workers and here) ---------------------------------------------------

CONFIGS = {
    "attention": dict(spatial_dims=3, in_channels=2, out_channels=2, channels=(8, 16, 16),
                      attention_levels=(False, False, True), num_res_blocks=1, num_head_channels=8,
                      norm_num_groups=4),
    "updown": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                   num_res_blocks=1, num_head_channels=8, norm_num_groups=4, resblock_updown=True),
    "transformer": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16),
                        attention_levels=(True, True), num_res_blocks=1, num_head_channels=4, norm_num_groups=4,
                        with_conditioning=True, cross_attention_dim=6),
    "one_level": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8,), attention_levels=(True,),
                      num_res_blocks=1, num_head_channels=8, norm_num_groups=4),
    "two_d": dict(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                  num_res_blocks=1, num_head_channels=8, norm_num_groups=4),
}
# (config, depth): depth 20 = 5 units of 4 (slabs 12|8 and 8|8|4), 24 (12|12, 8|8|8), 10 = 5 units of 2
# (6|4, 4|4|2), 6 (4|2, 2|2|2), 7 rows of a one-level model (4|3, 3|2|2: odd); a 2-D model is cut along height
FORWARD_CASES = [("attention", 20), ("attention", 24), ("updown", 10), ("transformer", 6), ("one_level", 7),
                 ("two_d", 14)]
PLANE = (12, 8)
SAMPLE_SHAPE = (2, 2, 20, *PLANE)
SOLVER_OPTIONS = dict(num_steps=3, prediction_type="sample")  # x0 prediction: bounded states for a random model
SAMPLE_CASES = {
    "ddim_eta1": dict(solver="ddim", eta=1.0),
    "dpmpp_2m": dict(solver="dpmpp_2m"),
    "ddim_inpaint": dict(solver="ddim", eta=1.0, inpaint=True),
}


AE_CONFIGS = {
    "plain": dict(spatial_dims=3, attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                  with_decoder_nonlocal_attn=False),
    "attention_deconv": dict(spatial_dims=3, attention_levels=(False, True), use_convtranspose=True),
    "two_d": dict(spatial_dims=2, attention_levels=(False, False), with_encoder_nonlocal_attn=False,
                  with_decoder_nonlocal_attn=False),
}
# (config, latent depth): 13 rows = 7|6 and 5|4|4 (odd, unequal), 12 = 6|6 and 4|4|4, 2-D: 7 = 4|3 and 3|2|2
AE_CASES = [("plain", 13), ("attention_deconv", 12), ("two_d", 7)]
AE_PLANE = (6, 5)


def make_autoencoder(name):
    return randomize_(AutoencoderKL(in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                                    latent_channels=4, norm_num_groups=4, **AE_CONFIGS[name]).eval(), 1)


def ae_inputs(name, depth):
    """(latent, image) batches; the image is twice as deep as the latent (two levels)."""
    plane = AE_PLANE[:AE_CONFIGS[name]["spatial_dims"] - 1]
    gen = torch.Generator().manual_seed(6)
    return (torch.randn(2, 4, depth, *plane, generator=gen),
            torch.randn(2, 1, 2 * depth, *(2 * n for n in plane), generator=gen))


def make_model(name):
    return randomize_(UNet3D(**CONFIGS[name]).eval(), 1)


def forward_inputs(name, depth):
    config = CONFIGS[name]
    plane = PLANE if config["spatial_dims"] == 3 else PLANE[1:]
    x = torch.randn(2, config["in_channels"], depth, *plane, generator=torch.Generator().manual_seed(2))
    context = (torch.randn(2, 3, config["cross_attention_dim"], generator=torch.Generator().manual_seed(3))
               if config.get("with_conditioning") else None)
    return x, torch.tensor([10, 500]), context


def inpainting():
    gen = torch.Generator().manual_seed(4)
    known = torch.randn(SAMPLE_SHAPE, generator=gen).clamp(-1, 1)
    mask = torch.zeros(1, 1, SAMPLE_SHAPE[2], *PLANE, dtype=torch.bool)
    mask[:, :, 3:15, 2:9] = True  # across the slab boundaries of 2 and 3 ranks
    return dict(mask=mask, known=known)


def sample_arguments(case):
    options = dict(SAMPLE_CASES[case])
    solver = options.pop("solver")
    extra = inpainting() if options.pop("inpaint", False) else {}
    return solver, {**SOLVER_OPTIONS, **options}, extra


# --- the spawned job -----------------------------------------------------------------------------------------

def _errors(fn):
    try:
        fn()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _job(rank, world):
    from pydiffmed.spatial_parallel import (SpatialParallelAutoencoder, SpatialParallelUNet, SpatialSampler,
                                            spatial_decode, spatial_encode, spatial_sample)

    results, timings = {}, {}
    for name, depth in FORWARD_CASES:
        model = make_model(name)
        x, t, context = forward_inputs(name, depth)
        start = time.perf_counter()
        wrapped = SpatialParallelUNet(model, depth)
        results[("forward", name, depth)] = wrapped.gather(wrapped(wrapped.slab(x), t, context=context))
        timings[("forward", name, depth)] = time.perf_counter() - start
        if name == "updown":  # the engine deep-copies a model to convert it: the copy shares the process group
            duplicate = copy.deepcopy(wrapped)
            assert duplicate.unet is not wrapped.unet and duplicate.group is wrapped.group
            results[("copy", name, depth)] = duplicate.gather(duplicate(duplicate.slab(x), t))
    for name, depth in AE_CASES:
        autoencoder = make_autoencoder(name)
        z, image = ae_inputs(name, depth)
        start = time.perf_counter()
        results[("decode", name, depth)] = spatial_decode(autoencoder, z)
        timings[("decode", name, depth)] = time.perf_counter() - start
        start = time.perf_counter()
        results[("encode", name, depth)] = spatial_encode(autoencoder, image)
        timings[("encode", name, depth)] = time.perf_counter() - start
    results[("decode_slab", "plain", 13)] = spatial_decode(make_autoencoder("plain"), ae_inputs("plain", 13)[0],
                                                           gather=False)
    model = make_model("attention")
    for case in SAMPLE_CASES:
        solver, options, extra = sample_arguments(case)
        start = time.perf_counter()
        results[("sample", case)] = spatial_sample(model, SAMPLE_SHAPE, solver, seed=5, check_memory=False,
                                                   **options, **extra)
        timings[("sample", case)] = time.perf_counter() - start
    sampler = SpatialSampler(model, "ddim", SAMPLE_SHAPE, num_steps=2, eta=1.0, prediction_type="sample")
    results[("slab", "ddim")] = sampler(seed=[3, 4], gather=False)  # this rank's slab; check_memory on
    # bad cases: every rank raises, none waits
    wrapped = SpatialParallelUNet(model, 20)
    x = torch.randn(1, 2, 20, *PLANE)
    wrong = x[:, :, :wrapped.rows + 4] if rank == world - 1 else wrapped.slab(x)  # the last rank: 4 rows too many
    autoencoder = make_autoencoder("plain")
    z = ae_inputs("plain", 13)[0]
    decoder = SpatialParallelAutoencoder(autoencoder, 13)
    wrong_z = z[:, :, :decoder.rows + 1] if rank == 0 else decoder.slab(z)  # rank 0: one row too many
    bad_channels = decoder.slab(z)[:, :3] if rank == world - 1 else decoder.slab(z)
    errors = {
        "ae_too_shallow": _errors(lambda: spatial_decode(autoencoder, z[:, :, :world - 1])),
        "ae_image_depth": _errors(lambda: spatial_encode(autoencoder, torch.randn(1, 1, 25, 12, 10))),
        "ae_wrong_slab": _errors(lambda: decoder.decode(wrong_z)),
        "ae_channels": _errors(lambda: decoder.decode(bad_channels)),
        "depth_not_unit": _errors(lambda: SpatialParallelUNet(model, 22)),
        "too_few_units": _errors(lambda: SpatialParallelUNet(model, 4 * (world - 1))),
        "wrong_slab": _errors(lambda: wrapped(wrong, torch.tensor([1]))),
        "dynamic_threshold": _errors(lambda: SpatialSampler(model, "ddim", SAMPLE_SHAPE, num_steps=2,
                                                            thresholding=True, use_clipped_model_output=True)),
        "nan_known": _errors(lambda: spatial_sample(model, SAMPLE_SHAPE, "ddim", num_steps=2, check_memory=False,
                                                    mask=torch.ones(SAMPLE_SHAPE, dtype=torch.bool),
                                                    known=torch.full(SAMPLE_SHAPE, float("nan")))),
    }
    return dict(results=results, timings=timings, errors=errors, bounds=wrapped.bounds)


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=JOB_TIMEOUT))
    try:
        torch.save(_job(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # pydiffmed imported before init_process_group: the group and its threads end here (pydiffmed/distributed.py)
    assert gloo_threads() == 0, f"rank {rank}: gloo threads outlive destroy_process_group"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(world, out_dir):
    """Every case on `world` gloo processes; their saved results, rank by rank. Killed and failed after
    JOB_TIMEOUT seconds."""
    context = mp.start_processes(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process job did not finish within {JOB_TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def job(request, tmp_path_factory):
    start = time.perf_counter()
    ranks = run_job(request.param, tmp_path_factory.mktemp(f"spatial{request.param}"))
    print(f"\n{request.param}-process job: {time.perf_counter() - start:.1f} s; per case (rank 0): "
          + ", ".join(f"{'/'.join(map(str, k))} {v:.2f} s" for k, v in ranks[0]["timings"].items()))
    return request.param, ranks


@pytest.fixture(scope="module")
def references():
    """Single-process results, computed once."""
    torch.set_num_threads(1)
    out = {}
    with torch.no_grad():
        for name, depth in FORWARD_CASES:
            x, t, context = forward_inputs(name, depth)
            out[("forward", name, depth)] = make_model(name)(x, t, context=context)
        for name, depth in AE_CASES:
            autoencoder = make_autoencoder(name)
            z, image = ae_inputs(name, depth)
            out[("decode", name, depth)] = autoencoder.decode(z)
            out[("encode", name, depth)] = autoencoder.encode(image)
    model = make_model("attention")
    for case in SAMPLE_CASES:
        solver, options, extra = sample_arguments(case)
        out[("sample", case)] = pydiffmed.sample(model, SAMPLE_SHAPE, solver, seed=5, progress=False, **options,
                                                 **extra)
    out[("slab", "ddim")] = pydiffmed.sample(model, SAMPLE_SHAPE, "ddim", num_steps=2, seed=[3, 4], eta=1.0,
                                             prediction_type="sample", progress=False)
    return out


# --- distributed results -------------------------------------------------------------------------------------

def _assert_close(got, want, what):
    assert got.shape == want.shape, what
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= TOLERANCE * max(1.0, scale), f"{what}: max |Δ| = {error:.3g} (values up to {scale:.3g})"


@pytest.mark.parametrize("case", FORWARD_CASES, ids=[f"{n}-depth{d}" for n, d in FORWARD_CASES])
def test_forward_equals_one_process(job, references, case):
    world, ranks = job
    key = ("forward", *case)
    assert references[key].abs().max() > 0.1  # random weights everywhere: a non-trivial output
    for rank, result in enumerate(ranks):
        _assert_close(result["results"][key], references[key], f"{world} ranks, rank {rank}, {case}")


def test_deep_copy_shares_the_group(job, references):
    world, ranks = job
    for result in ranks:
        _assert_close(result["results"][("copy", "updown", 10)], references[("forward", "updown", 10)], "copy")


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sampling_equals_one_process(job, references, case):
    world, ranks = job
    key = ("sample", case)
    for rank, result in enumerate(ranks):
        _assert_close(result["results"][key], references[key], f"{world} ranks, rank {rank}, {case}")


@pytest.mark.parametrize("case", AE_CASES, ids=[f"{n}-latent{d}" for n, d in AE_CASES])
def test_autoencoder_equals_one_process(job, references, case):
    world, ranks = job
    decoded, (z_mu, z_sigma) = references[("decode", *case)], references[("encode", *case)]
    assert decoded.abs().max() > 0.1 and z_mu.abs().max() > 0.1
    for rank, result in enumerate(ranks):
        what = f"{world} ranks, rank {rank}, {case}"
        _assert_close(result["results"][("decode", *case)], decoded, f"decode, {what}")
        got_mu, got_sigma = result["results"][("encode", *case)]
        _assert_close(got_mu, z_mu, f"encode z_mu, {what}")
        _assert_close(got_sigma, z_sigma, f"encode z_sigma, {what}")
    if case == ("plain", 13):  # gather=False: this rank's image slab, 2 × its latent rows
        for rank, result in enumerate(ranks):
            start, stop = slab_bounds(13, world)[rank]
            _assert_close(result["results"][("decode_slab", *case)], decoded[:, :, 2 * start:2 * stop],
                          f"rank {rank}'s image slab")


def test_slabs_and_per_sample_seeds(job, references):
    world, ranks = job
    want = references[("slab", "ddim")]
    bounds = slab_bounds(SAMPLE_SHAPE[2], world, 4)
    assert ranks[0]["bounds"] == bounds
    for rank, result in enumerate(ranks):
        start, stop = bounds[rank]
        _assert_close(result["results"][("slab", "ddim")], want[:, :, start:stop], f"rank {rank}'s slab")


def test_bad_cases_raise_on_every_rank(job):
    world, ranks = job
    for rank, result in enumerate(ranks):
        errors = result["errors"]
        assert "depth 22 is not a multiple of 4" in errors["depth_not_unit"]
        assert f"for {world} ranks" in errors["too_few_units"]
        assert "the ranks' inputs have shapes" in errors["wrong_slab"]
        assert "whole volume" in errors["dynamic_threshold"]
        assert "known has NaN/Inf" in errors["nan_known"]
        assert f"for {world} ranks" in errors["ae_too_shallow"]
        assert "depth 25 is not a multiple of 2" in errors["ae_image_depth"]
        assert "the ranks' inputs have shapes" in errors["ae_wrong_slab"]
        assert ("the latent slab must be B×4" if rank == world - 1 else "rejected their input") in errors["ae_channels"]


# --- slabs ---------------------------------------------------------------------------------------------------

def test_slab_bounds():
    assert slab_bounds(20, 3, 4) == [(0, 8), (8, 16), (16, 20)]
    assert slab_bounds(24, 3, 4) == [(0, 8), (8, 16), (16, 24)]
    assert slab_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert slab_bounds(12, 2, 4) == [(0, 8), (8, 12)]
    with pytest.raises(ValueError, match="not a multiple of 4"):
        slab_bounds(18, 2, 4)
    with pytest.raises(ValueError, match="every rank needs at least one unit"):
        slab_bounds(8, 3, 4)
    with pytest.raises(ValueError, match="positive int"):
        slab_bounds(8, 0)


def test_wrapper_needs_a_process_group():
    from pydiffmed.spatial_parallel import SpatialParallelUNet

    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        SpatialParallelUNet(make_model("one_level"), 8)
    with pytest.raises(TypeError, match="UNet3D"):
        SpatialParallelUNet(torch.nn.Identity(), 8)


# --- slab noise: fused_step's noise_index on every backend ---------------------------------------------------

NOISE_BACKENDS = runnable_backends("fused_step", [torch.empty(1)], x=torch.empty(1)) + (
    ["cuda-emu"] if CAN_EMULATE_CUDA else [])
SEEDS = torch.tensor([3, -7], dtype=torch.int64)
# (volume shape, depth rows of the slab, channels_last): unaligned Philox blocks (plane 15, offsets 30, 45),
# 2-D, one channel
NOISE_CASES = [((2, 3, 9, 5, 3), (2, 7), False), ((2, 3, 9, 5, 3), (3, 9), True), ((2, 2, 5, 3), (1, 4), True),
               ((2, 1, 8, 4, 4), (0, 5), False), ((2, 2, 6, 5, 3), (0, 6), False)]


@pytest.fixture(scope="module")
def cuda_emulation_library(tmp_path_factory):
    return build_cuda_emulation("fused_step.cu", tmp_path_factory.mktemp("fused_step_emu"))


@pytest.fixture
def noise_backend(request, monkeypatch):
    """The backend name to call; 'cuda-emu' runs csrc/cuda/fused_step.cu on the CPU (helpers' emulation)."""
    name = request.param
    if name != "cuda-emu":
        return name
    lib = request.getfixturevalue("cuda_emulation_library")
    monkeypatch.setattr(_cuda, "fused_step_kernel_launch",
                        lambda kernel, grid, block, args: launch_emulated(lib, kernel, grid, block, args))
    real_select = backends.select
    monkeypatch.setattr(backends, "select", lambda op, backend, tensors, **inputs: "cuda" if backend == "cuda-emu"
                        else real_select(op, backend, tensors, **inputs))
    return name


@pytest.mark.parametrize("noise_backend", NOISE_BACKENDS, indirect=True)
@pytest.mark.parametrize("volume, rows, channels_last", NOISE_CASES)
def test_slab_noise_is_the_volumes(noise_backend, volume, rows, channels_last):
    full = ops.philox_normal(SEEDS, 11, volume, backend="torch")
    plane = 1
    for size in volume[3:]:
        plane *= size
    lo, hi = rows
    x = torch.zeros((volume[0], volume[1], hi - lo, *volume[3:]))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    m = torch.randn(x.shape)
    index = (lo * plane, volume[2] * plane)
    step = ops.fused_step(x, m, ops.step_coefs(p_m=1.0, b=0.5, s=0.25), seeds=SEEDS, noise_step=11,
                          noise_index=index, backend=noise_backend)
    assert torch.equal(step, 0.5 * m + 0.25 * full[:, :, lo:hi])
    assert torch.equal(ops.philox_normal(SEEDS, torch.tensor(11), x.shape, noise_index=index,
                                         backend=noise_backend), full[:, :, lo:hi])


def test_noise_index_default_and_checks():
    x = torch.zeros(2, 3, 4, 5)
    plain = ops.philox_normal(SEEDS, 2, x.shape)
    assert torch.equal(ops.philox_normal(SEEDS, 2, x.shape, noise_index=(0, 20)), plain)
    with pytest.raises(ValueError, match="must lie in"):
        ops.philox_normal(SEEDS, 2, x.shape, noise_index=(5, 20))
    with pytest.raises(ValueError, match="must lie in"):
        ops.philox_normal(SEEDS, 2, x.shape, noise_index=(-1, 40))
    with pytest.raises(TypeError, match="pair"):
        ops.philox_normal(SEEDS, 2, x.shape, noise_index=7)
    with pytest.raises(TypeError, match="must be an int"):
        ops.philox_normal(SEEDS, 2, x.shape, noise_index=(0.5, 40))


# --- the engine's slab= --------------------------------------------------------------------------------------

class _Half(torch.nn.Module):
    def forward(self, x, t):
        return 0.5 * x


def test_engine_slabs_compose_the_volume():
    """A model that treats voxels independently: slabs sampled apart, noise included, are the volume's."""
    shape = (2, 2, 7, 5, 3)
    options = dict(num_steps=3, eta=1.0, prediction_type="sample", check_memory=False)
    whole = pydiffmed.Sampler(_Half(), "ddim", shape, **options)(seed=9)
    pieces = [pydiffmed.Sampler(_Half(), "ddim", (2, 2, b - a, 5, 3), slab=(a, 7), **options)(seed=9)
              for a, b in ((0, 3), (3, 4), (4, 7))]
    assert torch.equal(torch.cat(pieces, dim=2), whole)


def test_engine_slab_refusals():
    with pytest.raises(ValueError, match="must lie in the volume"):
        pydiffmed.Sampler(_Half(), "ddim", (1, 1, 4, 3, 3), slab=(2, 5), num_steps=2, check_memory=False)
    with pytest.raises(TypeError, match="slab must be"):
        pydiffmed.Sampler(_Half(), "ddim", (1, 1, 4, 3, 3), slab=3, num_steps=2, check_memory=False)
    with pytest.raises(ValueError, match="whole volume"):
        pydiffmed.Sampler(_Half(), "ddim", (1, 1, 4, 3, 3), slab=(0, 8), num_steps=2, thresholding=True,
                          use_clipped_model_output=True, check_memory=False)
