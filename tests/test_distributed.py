"""Many processes (issue 16), on gloo over loopback with processes the tests start through torchrun
(`python -m torch.distributed.run --standalone`) and bound in time: pydiffmed.distributed's bookkeeping,
`pydiffmed.sample(..., distributed=True)` equal to one process bit for bit, and data-parallel `pydiffmed sample`
under torchrun (files byte-identical to a single-process run, --resume across a change of world size, a killed
rank failing the job with nothing partial left)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import randomised

from pydiffmed import distributed

TIMEOUT = 180  # seconds for any one torchrun job
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc, *argv, timeout=TIMEOUT, **kwargs):
    """Run `torchrun --standalone --nproc-per-node nproc argv...` (a free port on 127.0.0.1), bounded in time."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *map(str, argv)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, **kwargs)


# --- bookkeeping ---------------------------------------------------------------------------------------------

def test_world_from_torchrun_environment():
    assert distributed.world_from_env({}) == distributed.World(0, 1, 0)
    world = distributed.world_from_env({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"})
    assert (world.rank, world.world_size, world.local_rank, world.distributed) == (2, 3, 0, True)
    assert world.share(range(8)) == [2, 5] and [k for k in range(8) if world.owns(k)] == [2, 5]
    with pytest.raises(RuntimeError, match="RANK=3 is not in"):
        distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "3"})
    with pytest.raises(RuntimeError, match="WORLD_SIZE='x'"):
        distributed.world_from_env({"RANK": "0", "WORLD_SIZE": "x"})


def test_every_volume_has_exactly_one_owner():
    for world_size in (1, 2, 3, 5):
        shares = [distributed.World(r, world_size).share(range(11)) for r in range(world_size)]
        assert sorted(k for share in shares for k in share) == list(range(11))


def test_cuda_device_without_index_is_the_local_rank():
    world = distributed.World(3, 4, 1)
    assert distributed.device_for(world, torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.device_for(world, torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert distributed.device_for(world, torch.device("cpu")) == torch.device("cpu")


def test_distributed_sample_outside_a_process_group_is_refused():
    import pydiffmed

    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        pydiffmed.sample(torch.nn.Identity(), (2, 1, 4, 4, 4), solver="ddim", num_steps=2, distributed=True)


# --- sample(..., distributed=True) ---------------------------------------------------------------------------

SAMPLE_SCRIPT = textwrap.dedent("""
    import os
    import sys

    import torch
    import torch.distributed as dist

    import pydiffmed
    from pydiffmed.models import UNet3D

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = UNet3D(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
                   num_res_blocks=1, num_head_channels=(0, 8), norm_num_groups=4).eval()
    schedule = pydiffmed.NoiseSchedule.discrete("linear")
    batch = int(sys.argv[2])
    known = torch.randn(batch, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    mask[..., :3] = True
    runs = {
        "ddim_eta1": dict(solver="ddim", num_steps=3, eta=1.0, seed=5),
        "dpmpp_2m_seeds": dict(solver="dpmpp_2m", num_steps=3, seed=[11, 3, 7, 2, 9][:batch]),
        "inpaint": dict(solver="ddim", num_steps=3, seed=0, mask=mask, known=known),
    }
    results = {}
    for name, options in runs.items():
        x = pydiffmed.sample(model, (batch, 1, 8, 8, 8), schedule=schedule, progress=False, distributed=True,
                             **options)
        if dist.get_rank() == 0:  # one process, the same arguments, the same threads
            single = pydiffmed.sample(model, (batch, 1, 8, 8, 8), schedule=schedule, progress=False, **options)
            results[name] = (x, single)
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.destroy_process_group()
    # The group, gloo threads included, is gone now: a thread left over can abort the process at exit.
    gloo_threads = [t for t in os.listdir("/proc/self/task")
                    if open(f"/proc/self/task/{t}/comm").read().startswith("pt_gloo")]
    if gloo_threads:
        sys.exit(f"rank {os.environ['RANK']}: {len(gloo_threads)} gloo threads outlive destroy_process_group")
""")


@pytest.mark.parametrize("nproc,batch", [(2, 3), (3, 5), (3, 2)])
def test_distributed_sample_equals_one_process(tmp_path, nproc, batch):
    """Every rank returns the whole batch, bit for bit what one process samples (a batch smaller than the world
    included: that rank only joins the gather); destroy_process_group then ends the group's gloo threads."""
    script = tmp_path / "run.py"
    script.write_text(SAMPLE_SCRIPT)
    result = torchrun(nproc, script, tmp_path / "out.pt", batch)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, (gathered, single) in torch.load(tmp_path / "out.pt").items():
        assert gathered.shape == (batch, 1, 8, 8, 8)
        assert torch.equal(gathered, single), name


# --- `pydiffmed sample` under torchrun -----------------------------------------------------------------------

SHAPE = (16, 16, 16)
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                 attention_levels=(False, True), num_head_channels=(0, 8), norm_num_groups=4)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
          "prediction_type": "epsilon", "volume_shape": list(SHAPE), "spacing": [1.0, 1.0, 1.0],
          "orientation": "RAS", "intensity": {"scale": 100.0, "offset": 0.0}, "description": "distributed tests"}
VOLUME_FILES = (".nii.gz", ".png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pydiffmed import modelfile
    from pydiffmed.models import UNet3D

    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), CONFIG)
    return path


def sample_argv(model, out, *extra, num=5):
    """The README's form: -n, because torchrun's parser would take --num for its --numa-binding."""
    return ["-m", "pydiffmed", "sample", "--model", model, "--out", out, "-n", num, "--steps", 3, "--solver", "ddpm",
            "--quiet", *extra]


def single_process(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One process, one batch of 5: the files every other run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    result = single_process(*sample_argv(tiny, out, "--batch", 5))
    assert result.returncode == 0, result.stderr
    return out


def assert_same_volumes(out, reference, num=5):
    for k in range(num):
        for suffix in VOLUME_FILES:
            name = f"sample_{k:04d}{suffix}"
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def sidecar(out, k):
    import json

    return json.loads((out / f"sample_{k:04d}.json").read_text())


def test_data_parallel_files_equal_one_process(tiny, reference, tmp_path):
    """Two ranks, batch 2 (the volumes meet other batch companions than in the reference): the same bytes; each
    sidecar names the rank that sampled it (volume k: rank k mod 2)."""
    result = torchrun(2, *sample_argv(tiny, tmp_path, "--batch", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_volumes(tmp_path, reference)
    assert [(sidecar(tmp_path, k)["world_size"], sidecar(tmp_path, k)["rank"]) for k in range(5)] == \
        [(2, 0), (2, 1), (2, 0), (2, 1), (2, 0)]
    assert "rank 0's share of 2 processes" in result.stdout and "rank 1's share" in result.stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries, no lock left


def test_resume_across_a_change_of_world_size(tiny, reference, tmp_path):
    result = torchrun(2, *sample_argv(tiny, tmp_path, "--batch", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    for k in (1, 4):
        (tmp_path / f"sample_{k:04d}.json").unlink()  # incomplete sets: sampled again
    (tmp_path / "sample_0002.nii.gz").write_bytes(b"damaged")  # damaged: sampled again
    result = torchrun(3, *sample_argv(tiny, tmp_path, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_volumes(tmp_path, reference)
    assert sidecar(tmp_path, 0)["world_size"] == 2 and sidecar(tmp_path, 1)["world_size"] == 3
    assert "2 complete volume(s) kept" in result.stdout


def test_spatial_parallel_command_equals_one_process(tiny, reference, tmp_path):
    """Every volume split in two depth slabs: equal to one process within fp32 rounding; rank 0 writes."""
    import nibabel as nib
    import numpy as np

    result = torchrun(2, *sample_argv(tiny, tmp_path, "--batch", 2, "--spatial-parallel"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("volume(s) written") == 1
    for k in range(5):
        ours = nib.load(tmp_path / f"sample_{k:04d}.nii.gz").get_fdata()
        expected = nib.load(reference / f"sample_{k:04d}.nii.gz").get_fdata()
        assert np.abs(ours - expected).max() <= 1e-5 * CONFIG["intensity"]["scale"] * max(1.0, np.abs(expected).max())
        assert sidecar(tmp_path, k)["spatial_parallel"] is True


def test_spatial_parallel_needs_torchrun(tiny, tmp_path):
    result = single_process(*sample_argv(tiny, tmp_path, "--spatial-parallel"))
    assert result.returncode == 2 and "torchrun --nproc-per-node N" in result.stderr
    assert not os.path.exists(tmp_path / "sample_0000.json")


def test_a_killed_rank_fails_the_job_and_leaves_nothing_partial(tiny, tmp_path):
    """SIGKILL rank 1 once the first volume is complete: torchrun stops the job (non-zero, naming the rank), every
    output set present is complete, and --resume in one process finishes it: byte for byte an uninterrupted run."""
    import signal
    import time

    killed, whole = tmp_path / "killed", tmp_path / "whole"
    slow = ("--batch", 1, "--steps", 50)  # long enough to be killed part way
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               *map(str, sample_argv(tiny, killed, *slow))]
    job = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (killed / "sample_0000.json").exists() and job.poll() is None:
            assert time.monotonic() < deadline, "no volume was written in time"
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before it could be killed part way"
        victims = [pid for pid in _descendants(job.pid) if _environ(pid).get("RANK") == "1"]
        assert victims, "rank 1's process not found"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = job.communicate(timeout=TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "rank: 1" in stderr or "local_rank: 1" in stderr, stderr[-2000:]  # torchrun's report names the rank
    done = [k for k in range(5) if (killed / f"sample_{k:04d}.json").exists()]  # sidecars come last
    assert done and len(done) < 5
    for k in done:
        assert all((killed / f"sample_{k:04d}{suffix}").exists() for suffix in VOLUME_FILES)
    result = single_process(*sample_argv(tiny, killed, *slow, "--resume"))
    assert result.returncode == 0, result.stderr
    result = single_process(*sample_argv(tiny, whole, *slow))
    assert result.returncode == 0, result.stderr
    assert_same_volumes(killed, whole)


def _descendants(pid):
    """Process ids of pid's descendants (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys, tmp_path):
    from pydiffmed.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code = main(["anomaly", "--model", "demo", "--input", str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "rank 1: `anomaly` runs in one process; start it without torchrun" in err
