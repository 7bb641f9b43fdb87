"""Argument and input validation (issue 15), one test per class of bad input, each over several cases:

* resource exhaustion: sizes are checked before anything of that size is allocated (--num, --steps and the
  solvers' num_steps, --batch, --shape, bench --size: the memory estimate is consulted first);
* no raw traceback: negative or zero sizes, seeds outside the 64-bit Philox keys, library errors while the
  command checks its input (exit 2, one line), an unexpected error during a run (exit 1, one line naming it);
* inputs blamed on the right party: NaN/Inf in known/mask/init/x_T/cond or a mask outside [0, 1] is the
  input's ValueError (not the model's NaN), mismatched input grids are refused by the command, and a finite but
  huge model output that overflows the state stops with the evaluation where it did (nothing returned/written).

Tiny models and seeded inputs keep it fast and deterministic."""
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import randomised
import pydiffmed
from pydiffmed import engine, modelfile
from pydiffmed.cli import main
from pydiffmed.engine import InsufficientMemoryError, NonFiniteModelOutput, Sampler
from pydiffmed.models import UNet3D
from pydiffmed.schedules import NoiseSchedule
from pydiffmed.solvers import get_solver
from pydiffmed.solvers.base import MAX_STEPS
from pydiffmed.solvers.ode import ODEHeun

SHAPE = (8, 8, 8)
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                 attention_levels=(False, True), norm_num_groups=4, num_head_channels=8)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
          "prediction_type": "epsilon", "volume_shape": list(SHAPE), "spacing": [1.0, 1.2, 2.0],
          "orientation": "LPS", "intensity": {"scale": 100.0, "offset": 20.0}}
GIB = 2 ** 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), CONFIG)
    return path


@pytest.fixture
def one_gib(monkeypatch):
    """The device has 1 GiB free, whatever this machine has: memory checks give the same answer everywhere."""
    monkeypatch.setattr(engine, "available_memory", lambda device: GIB)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def sample_argv(model, out, *extra):
    return ["sample", "--model", model, "--out", out, "--steps", "2", "--num", "2", "--quiet", *extra]


class Elementwise(torch.nn.Module):
    """m = 0.1·x + value: treats every element alone; value=1e38 is finite but overflows the state."""

    def __init__(self, value=0.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.value = value

    def forward(self, x, t, context=None):
        return x * 0.1 * self.weight + self.value


# --- 1. resource exhaustion: sizes checked before allocating -------------------------------------------------

RESOURCE_CASES = {
    "a billion volumes": (["--num", "1000000000"], 2, ["--num 1000000000", "at most 100000"]),
    "ode steps beyond the schedule": (["--solver", "ode_heun", "--steps", "100000"], 2,
                                      ["--steps 100000", "num_train_timesteps (1000)"]),
    "rk4 steps beyond the schedule": (["--solver", "ode_rk4", "--steps", "1001"], 2, ["--steps 1001"]),
    "huge shape": (["--shape", "4096", "4096", "4096"], 2, ["4096×4096×4096", "GiB", "1.00 GiB are available"]),
    "huge batch": (["--shape", "64", "64", "64", "--num", "64", "--batch", "64"], 2,
                   ["--batch 64 of 64×64×64", "GiB"]),
    "bench huge size": (["bench", "--size", "4096"], 2, ["--size 4096", "GiB"]),
    "bench astronomic size": (["bench", "--size", "100000000", "--batch", "1000000"], 2, ["--size 100000000"]),
    "bench too many steps": (["bench", "--steps", "5000"], 2, ["--steps 5000", "num_train_timesteps"]),
}


@pytest.mark.parametrize("case", sorted(RESOURCE_CASES))
def test_sizes_are_checked_before_allocating(tmp_path, tiny, capsys, one_gib, case):
    extra, status, fragments = RESOURCE_CASES[case]
    argv = extra if extra[0] == "bench" else sample_argv(tiny, tmp_path / "out", *extra)
    code, _, err = run(capsys, *argv)
    assert code == status, err
    assert_one_line(err, "error", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, schedule, steps, fragment", [
    ("ode_rk4", NoiseSchedule.vp(), 10 ** 9, f"at most {MAX_STEPS}"),
    ("ode_heun", NoiseSchedule.ve(), MAX_STEPS + 1, f"at most {MAX_STEPS}"),
    ("euler_maruyama", NoiseSchedule.vp(), 10 ** 12, f"at most {MAX_STEPS}"),
    ("rflow_euler", NoiseSchedule.flow(), 10 ** 7, f"at most {MAX_STEPS}"),
    ("ode_heun", NoiseSchedule.discrete(), 1001, "num_train_timesteps (1000)"),
    ("ddim", NoiseSchedule.discrete(num_train_timesteps=50), 51, "num_train_timesteps (50)"),
    ("ddim", NoiseSchedule.discrete(), 0, "positive int"),
    ("ddim", NoiseSchedule.discrete(), -3, "positive int"),
])
def test_library_bounds_steps_before_building(name, schedule, steps, fragment):
    with pytest.raises(ValueError, match="num_steps") as error:
        get_solver(name, schedule, steps)
    assert fragment in str(error.value)
    if name == "ode_heun" and schedule.kind != "discrete":  # the class itself checks before building its grid
        with pytest.raises(ValueError, match=f"at most {MAX_STEPS}"):
            ODEHeun(schedule, steps)


@pytest.mark.parametrize("shape", [(1, 1, 4096, 4096, 4096), (100000, 1, 64, 64, 64), (1, 1, 2 ** 40, 2 ** 40, 8)])
def test_library_memory_check_comes_first(one_gib, shape):
    with pytest.raises(InsufficientMemoryError, match="1.00 GiB are available"):
        Sampler(Elementwise(), "ddim", shape, num_steps=2)


# --- 2. no raw tracebacks, no leaked internal messages -------------------------------------------------------

USAGE_CASES = {
    "zero channels": (["--shape", "0", "8", "8"], ["--shape", "positive"]),
    "negative size": (["--shape", "-8", "8", "8"], ["--shape", "-8 8 8"]),
    "negative volumes": (["--num", "-1"], ["--num", "at least 1"]),
    "zero batch": (["--batch", "0"], ["--batch", "at least 1"]),
    "negative steps": (["--steps", "-5"], ["--steps", "at least 1"]),
    "negative seed": (["--seed", "-1"], ["--seed -1", "[0, 2**63 - 2]"]),
    "seed beyond int64": (["--seed", str(2 ** 63)], [f"--seed {2 ** 63}", "2**63"]),
    "last seed beyond int64": (["--seed", str(2 ** 63 - 1)], ["--seed", "volume k uses seed + k"]),
    "bench negative size": (["bench", "--size", "-4"], ["--size", "at least 4"]),
    "bench zero batch": (["bench", "--batch", "0"], ["--batch", "at least 1"]),
    "bench zero steps": (["bench", "--steps", "0"], ["--steps", "at least 1"]),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_bad_values_are_one_line_usage_errors(tmp_path, tiny, capsys, case):
    extra, fragments = USAGE_CASES[case]
    argv = extra if extra[0] == "bench" else sample_argv(tiny, tmp_path / "out", *extra)
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert_one_line(err, "error", *fragments)
    assert not (tmp_path / "out").exists()


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("where, exc, status, fragments", [
    # a library ValueError/TypeError while the input is checked: bad input
    ("load_model", TypeError("config key 'x' must be a list"), 2, ["config key 'x' must be a list"]),
    ("load_model", ValueError("unusable schedule"), 2, ["unusable schedule"]),
    # anything unexpected during the run: exit 1, its type named, no traceback
    ("run", RuntimeError("kernel exploded"), 1, ["unexpected RuntimeError", "kernel exploded", "PYDIFFMED_DEBUG"]),
    ("run", KeyError("slot"), 1, ["unexpected KeyError"]),
    ("run", MemoryError(), 1, ["unexpected MemoryError"]),
], ids=["TypeError while checking", "ValueError while checking", "RuntimeError in the run", "KeyError in the run",
        "MemoryError in the run"])
def test_library_errors_never_show_a_traceback(tmp_path, tiny, capsys, monkeypatch, where, exc, status, fragments):
    from pydiffmed import cli

    monkeypatch.delenv("PYDIFFMED_DEBUG", raising=False)
    if where == "load_model":
        monkeypatch.setattr(modelfile, "load_model", _raise(exc))
    else:
        monkeypatch.setattr(cli, "_run_sample", _raise(exc))
    code, _, err = run(capsys, *sample_argv(tiny, tmp_path / "out"))
    assert code == status, err
    assert_one_line(err, "error", *fragments)
    if where == "run":  # the traceback stays available
        monkeypatch.setenv("PYDIFFMED_DEBUG", "1")
        with pytest.raises(type(exc)):
            main([str(a) for a in sample_argv(tiny, tmp_path / "out")])


@pytest.mark.parametrize("seed, batch, fragment", [
    (2 ** 63, 1, f"seed {2 ** 63} is out of range"),
    (2 ** 63 - 1, 2, "seeds 9223372036854775807..9223372036854775808"),
    (-2 ** 63 - 1, 1, "out of range"),
    ([0, 2 ** 63], 2, f"seed {2 ** 63} is out of range"),
    ([2 ** 64 + 5, 1], 2, "out of range"),
    ([-2 ** 63 - 1, 0], 2, "out of range"),
    (iter(range(10 ** 15)), 2, "more seeds for a batch of 2"),
], ids=["2**63", "2**63-1 batch 2", "-2**63-1", "list with 2**63", "list with 2**64+5", "list with -2**63-1",
        "endless iterator"])
def test_library_seeds_outside_the_philox_keys(seed, batch, fragment):
    sampler = Sampler(Elementwise(), "ddim", (batch, 1, 4, 4, 4), num_steps=2)
    with pytest.raises(ValueError) as error:
        sampler(seed)
    assert fragment in str(error.value)
    if "out of range" in fragment:
        assert "[-2**63, 2**63)" in str(error.value)
    with pytest.raises(ValueError, match="out of range"):
        pydiffmed.sample(Elementwise(), (1, 1, 4, 4, 4), "ddim", 2, seed=2 ** 63, progress=False)
    sampler([-2 ** 63 + b for b in range(batch)])  # the extreme keys themselves are fine


# --- 3. inputs blamed on the right party, never silently mixed -----------------------------------------------

def _with_bad_voxel(value, shape=(2, 1, 4, 4, 4), base=0.0, dtype=torch.float32):
    t = torch.full(shape, base, dtype=dtype)
    t[1, 0, 1, 2, 3] = value
    return t


NAN, INF = float("nan"), float("inf")
HALF_MASK = torch.full((2, 1, 4, 4, 4), 0.5)
INPUT_CASES = {
    "NaN in known": (dict(mask=HALF_MASK, known=_with_bad_voxel(NAN)), "known has NaN/Inf values"),
    "Inf in known": (dict(mask=HALF_MASK, known=_with_bad_voxel(-INF)), "known has NaN/Inf values"),
    "known overflowing float32": (dict(mask=HALF_MASK, known=_with_bad_voxel(1e300, dtype=torch.float64)),
                                  "known has NaN/Inf values (once converted to float32)"),
    "NaN in mask": (dict(mask=_with_bad_voxel(NAN, base=1.0), known=torch.zeros(2, 1, 4, 4, 4)),
                    "mask has NaN/Inf values"),
    "mask above 1": (dict(mask=_with_bad_voxel(1.5, base=1.0), known=torch.zeros(2, 1, 4, 4, 4)),
                     "mask has values outside [0, 1]"),
    "negative mask": (dict(mask=_with_bad_voxel(-0.25), known=torch.zeros(2, 1, 4, 4, 4)),
                      "mask has values outside [0, 1]"),
    "NaN in init": (dict(init=_with_bad_voxel(NAN), strength=0.5), "init has NaN/Inf values"),
    "Inf in x_T": (dict(x_T=_with_bad_voxel(INF)), "x_T has NaN/Inf values"),
    "NaN in a condition": (dict(cond={"context": torch.full((2, 3, 4), NAN)}), "cond['context'] has NaN/Inf"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_bad_inputs_are_the_inputs_problem(case):
    kwargs, message = INPUT_CASES[case]
    kwargs = dict(kwargs)
    strength = kwargs.pop("strength", None)
    with pytest.raises(ValueError) as error:
        pydiffmed.sample(Elementwise(), (2, 1, 4, 4, 4), "ddim", 3, seed=1, strength=strength, progress=False,
                         **kwargs)
    assert not isinstance(error.value, NonFiniteModelOutput)
    assert message in str(error.value)
    assert "model" not in str(error.value)
    # a Sampler reused with good inputs forgets the last call's problem
    sampler = Sampler(Elementwise(), "ddim", (2, 1, 4, 4, 4), num_steps=3, strength=strength)
    with pytest.raises(ValueError, match=re.escape(message)):
        sampler(1, **kwargs)
    good = {name: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else {k: torch.zeros_like(c)
                                                                            for k, c in v.items()})
            for name, v in kwargs.items()}
    assert torch.isfinite(sampler(1, **good)).all()


@pytest.mark.parametrize("value, solver", [(1e38, "ddim"), (-1e38, "ddim"), (3e38, "dpmpp_2m"), (1e38, "ddpm")])
def test_finite_but_huge_model_output_stops_with_its_step(value, solver):
    with pytest.raises(NonFiniteModelOutput) as error:
        pydiffmed.sample(Elementwise(value), (1, 1, 4, 4, 4), solver, 4, seed=0, progress=False)
    assert "solver state became NaN/Inf at model evaluation 0" in str(error.value)
    assert "of 4" in str(error.value)


@pytest.fixture(scope="module")
def huge_output_model(tmp_path_factory):
    """A UNet whose output is finite (about 1e38) but overflows the float32 state at the first update."""
    model = randomised(UNet3D(**TINY_UNET))
    with torch.no_grad():
        model.out[2].conv.weight.zero_()
        model.out[2].conv.bias.fill_(1e38)
    path = tmp_path_factory.mktemp("models") / "huge"
    modelfile.save_model(path, model, CONFIG)
    return path


def _volume(path, spacing=(1.0, 1.2, 2.0), value=0.0, bad=None):
    data = np.full(SHAPE, value, dtype=np.float32)
    if bad is not None:  # written with nibabel: pydiffmed refuses to write NaN
        data[1, 2, 3] = bad
    nib.Nifti1Image(data, np.diag([*spacing, 1.0])).to_filename(str(path))
    return path


COMMAND_INPUT_CASES = {
    "mask on another grid": (lambda d: ["--mask", _volume(d / "m.nii.gz", spacing=(1, 1, 1), value=1.0),
                                        "--known", _volume(d / "k.nii.gz")],
                             ["--mask", "m.nii.gz", "affine differs", "--known"]),
    "init on another grid than known": (lambda d: ["--mask", _volume(d / "m.nii.gz", value=1.0),
                                                   "--known", _volume(d / "k.nii.gz"),
                                                   "--init", _volume(d / "i.nii.gz", spacing=(2, 1.2, 2.0)),
                                                   "--strength", "0.5", "--solver", "ddim"],
                                        ["--init", "i.nii.gz", "affine differs"]),
    "mask above 1": (lambda d: ["--mask", _volume(d / "m.nii.gz", value=1.0, bad=2.0),
                                "--known", _volume(d / "k.nii.gz")], ["--mask", "[0, 1]"]),
    "NaN in known": (lambda d: ["--mask", _volume(d / "m.nii.gz", value=1.0),
                                "--known", _volume(d / "k.nii.gz", bad=NAN)], ["--known", "NaN"]),
}


@pytest.mark.parametrize("case", sorted(COMMAND_INPUT_CASES))
def test_command_refuses_mixed_or_bad_input_volumes(tmp_path, tiny, capsys, case):
    make, fragments = COMMAND_INPUT_CASES[case]
    argv = sample_argv(tiny, tmp_path / "out", *make(tmp_path))
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert_one_line(err, "error", *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_command_writes_no_inf_volume(tmp_path, huge_output_model, capsys, solver):
    out = tmp_path / "out"
    code, _, err = run(capsys, *sample_argv(huge_output_model, out, "--solver", solver))
    assert code == 1, err
    assert_one_line(err, "error", "solver state became NaN/Inf at model evaluation 0")
    if out.exists():
        assert files_under(out) == []
