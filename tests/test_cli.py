"""The `pydiffmed` command: sample end to end (NIfTI with the model's affine and intensities, previews,
provenance sidecars, per-volume seeds), atomic outputs under a failure mid-run, --resume, --overwrite, every
kind of bad input (exit 2, one line, nothing written), inpainting, SDEdit, class labels and guidance, MONAI
conversion round trip, and the models / bench / info commands. Tiny random models keep it fast."""
import importlib
import json
import os
import pathlib
import platform
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import randomised

import pydiffmed
from pydiffmed import backends, io, modelfile
from pydiffmed.cli import main
from pydiffmed.engine import Sampler
from pydiffmed.models import UNet3D
from pydiffmed.solvers import get_solver

SHAPE = (8, 8, 8)
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                 attention_levels=(False, True), norm_num_groups=4, num_head_channels=8)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
          "prediction_type": "epsilon", "volume_shape": list(SHAPE), "spacing": [1.0, 1.2, 2.0],
          "orientation": "LPS", "intensity": {"scale": 100.0, "offset": 20.0}, "description": "tiny test model"}
SCALE, OFFSET = 100.0, 20.0
SIDECAR_FIELDS = ("model", "model_sha256", "solver", "steps", "seed", "dtype", "backend", "pydiffmed_version",
                  "seconds_per_volume")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), CONFIG)
    return path


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "classy"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET, num_class_embeds=3), seed=1, scale=0.2), CONFIG)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample(capsys, model, out, *extra, steps=2):
    return run(capsys, "sample", "--model", model, "--out", out, "--steps", steps, "--quiet", *extra)


def reference(model_path, seeds, solver="dpmpp_2m", steps=2, shape=SHAPE, **call):
    """What the engine gives for these seeds, in physical units (the CLI's expected output)."""
    strength = call.pop("strength", None)
    model, schedule, info = pydiffmed.load_model(model_path)
    sampler = Sampler(model, get_solver(solver, schedule, steps, prediction_type=info.prediction_type),
                      (len(seeds), 1, *shape), strength=strength)
    volumes = sampler(list(seeds), **call)
    return (volumes[:, 0] * SCALE + OFFSET).numpy()


def nifti(path):
    image = nib.load(str(path))
    return image.get_fdata(dtype=np.float32), image.affine


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# --- end to end ---------------------------------------------------------------------------------------------

def test_sample_end_to_end(tmp_path, tiny, capsys):
    out = tmp_path / "samples"
    code, stdout, err = run(capsys, "sample", "--model", tiny, "--out", out, "--num", 3, "--batch", 2, "--steps", 2,
                            "--seed", 5)
    assert code == 0, err
    assert "volumes" in err  # progress
    assert "3 volume(s) written" in stdout and "per volume" in stdout and "backend" in stdout
    expected = reference(tiny, [5, 6, 7])  # one batch of 3: the CLI's batches of 2 + 1 must not matter
    affine = io.make_affine((1.0, 1.2, 2.0), "LPS", shape=SHAPE)
    weights_sha = modelfile.file_sha256(tiny / "model.safetensors")
    assert sorted(os.listdir(out)) == [f"sample_{k:04d}{s}" for k in range(3) for s in (".json", ".nii.gz", ".png")]
    for k in range(3):
        data, image_affine = nifti(out / f"sample_{k:04d}.nii.gz")
        assert data.shape == SHAPE
        np.testing.assert_allclose(image_affine, affine, atol=1e-6)
        np.testing.assert_allclose(data, expected[k], rtol=1e-5, atol=1e-3)
        with Image.open(out / f"sample_{k:04d}.png") as preview:
            assert preview.format == "PNG" and preview.mode == "L" and preview.width > preview.height > 0
        sidecar = json.loads((out / f"sample_{k:04d}.json").read_text())
        assert all(sidecar.get(field) is not None for field in SIDECAR_FIELDS), sidecar
        assert sidecar["model"] == "tiny" and sidecar["model_sha256"] == weights_sha
        assert (sidecar["solver"], sidecar["steps"], sidecar["seed"]) == ("dpmpp_2m", 2, 5 + k)
        assert sidecar["dtype"] == "float32" and sidecar["backend"] in backends.BACKENDS
        assert sidecar["pydiffmed_version"] == pydiffmed.__version__ and sidecar["seconds_per_volume"] > 0
        assert sidecar["shape"] == [1, *SHAPE] and sidecar["orientation"] == "LPS"
        np.testing.assert_allclose(sidecar["spacing"], (1.0, 1.2, 2.0))
    assert not np.allclose(expected[0], expected[1])  # per-volume seeds


@pytest.mark.parametrize("tunables", [None, "glibc.malloc.mmap_threshold=131072"])
def test_cpu_sampling_keeps_freed_memory_unless_the_user_tuned_malloc(tmp_path, tiny, capsys, monkeypatch, tunables):
    from pydiffmed import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    for name in [n for n in os.environ if n.startswith("MALLOC_") and n.endswith("_")]:
        monkeypatch.delenv(name)
    code, _, err = sample(capsys, tiny, tmp_path / "s", "--num", 1, "--device", "cpu")
    assert code == 0, err
    assert calls == ([1] if tunables is None else [])


def test_keep_freed_memory_applies_on_glibc_only(monkeypatch):
    from pydiffmed import host_memory

    # elsewhere it changes nothing and says so
    assert host_memory.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert host_memory.user_set_malloc_options()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert host_memory.user_set_malloc_options()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")
    assert not host_memory.user_set_malloc_options()


def test_spacing_and_shape_overrides(tmp_path, capsys):
    path = tmp_path / "noshape"
    config = {k: v for k, v in CONFIG.items() if k != "volume_shape"}
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), config)
    code, _, err = sample(capsys, path, tmp_path / "a", "--num", 1)
    assert code == 2
    assert_one_line_error(err, "--shape")
    assert not (tmp_path / "a").exists()

    code, _, err = sample(capsys, path, tmp_path / "b", "--num", 1, "--shape", 8, 8, 16, "--spacing", 0.5, 0.5, 3)
    assert code == 0, err
    data, affine = nifti(tmp_path / "b" / "sample_0000.nii.gz")
    assert data.shape == (8, 8, 16)
    np.testing.assert_allclose(affine, io.make_affine((0.5, 0.5, 3.0), "LPS", shape=(8, 8, 16)), atol=1e-6)
    np.testing.assert_allclose(data, reference(path, [0], shape=(8, 8, 16))[0], rtol=1e-5, atol=1e-3)


def test_existing_outputs_refused_then_overwritten(tmp_path, tiny, capsys):
    out = tmp_path / "s"
    assert sample(capsys, tiny, out, "--num", 2)[0] == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    code, _, err = sample(capsys, tiny, out, "--num", 2, "--seed", 9)
    assert code == 2
    assert_one_line_error(err, "already exists", "--overwrite")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before

    code, _, err = sample(capsys, tiny, out, "--num", 2, "--seed", 9, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(before)
    expected = reference(tiny, [9, 10])
    for k in range(2):
        np.testing.assert_allclose(nifti(out / f"sample_{k:04d}.nii.gz")[0], expected[k], rtol=1e-5, atol=1e-3)
        assert json.loads((out / f"sample_{k:04d}.json").read_text())["seed"] == 9 + k


# --- atomic writes and resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("where, failure, status", [("preview", OSError("No space left on device (simulated)"), 1),
                                                    ("nifti", KeyboardInterrupt(), 130)])
def test_failure_mid_run_leaves_no_partial_file_and_resume_completes(tmp_path, tiny, capsys, monkeypatch, where,
                                                                     failure, status):
    out = tmp_path / "s"
    real_save = nib.save if where == "nifti" else Image.Image.save
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # volume 1: a half-written file, then the failure
            with open(args[1], "wb") as f:  # nib.save(image, path) / Image.save(self, path)
                f.write(b"\x1f\x8b partial")
            raise failure
        return real_save(*args, **kwargs)

    if where == "nifti":
        monkeypatch.setattr(nib, "save", failing_save)
    else:
        monkeypatch.setattr(Image.Image, "save", failing_save)
    code, _, err = sample(capsys, tiny, out, "--num", 3, "--batch", 3)
    monkeypatch.undo()
    assert code == status
    assert_one_line_error(err, "--resume")
    names = set(os.listdir(out))
    assert {f"sample_0000{s}" for s in (".nii.gz", ".png", ".json")} <= names
    assert not any(n.startswith(".") for n in names), names  # no temporary file left
    assert not any(n.startswith(("sample_0001.png", "sample_0001.json", "sample_0002")) for n in names)
    for name in names:  # every file present is complete
        if name.endswith(".nii.gz"):
            nifti(out / name)
        elif name.endswith(".png"):
            Image.open(out / name).load()
        else:
            json.loads((out / name).read_text())
    kept = {name: (out / name).read_bytes() for name in names if name.startswith("sample_0000")}
    # what a killed process (no cleanup) would leave, plus an unrelated hidden file that must survive
    (out / ".pdm-tmp-0123456789ab-sample_0002.nii.gz").write_bytes(b"partial")
    (out / ".pdm-tmp-0123456789ab-notes.txt").write_bytes(b"not ours")

    code, stdout, err = sample(capsys, tiny, out, "--num", 3, "--batch", 3, "--resume")
    assert code == 0, err
    assert "2 volume(s) written" in stdout and "1 complete volume(s) kept" in stdout
    assert sorted(os.listdir(out)) == [".pdm-tmp-0123456789ab-notes.txt"] + [
        f"sample_{k:04d}{s}" for k in range(3) for s in (".json", ".nii.gz", ".png")]
    assert {name: (out / name).read_bytes() for name in kept} == kept
    expected = reference(tiny, [0, 1, 2])
    for k in range(3):
        np.testing.assert_allclose(nifti(out / f"sample_{k:04d}.nii.gz")[0], expected[k], rtol=1e-5, atol=1e-3)


def test_resume_checks_settings_and_skips_complete_runs(tmp_path, tiny, capsys):
    out = tmp_path / "s"
    assert sample(capsys, tiny, out, "--num", 2)[0] == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    code, stdout, err = sample(capsys, tiny, out, "--num", 2, "--resume")
    assert code == 0, err
    assert "0 volume(s) written" in stdout and "2 complete volume(s) kept" in stdout
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    code, _, err = sample(capsys, tiny, out, "--num", 2, "--resume", steps=3)
    assert code == 2
    assert_one_line_error(err, "different settings", "steps")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_non_finite_model_output_fails_the_run_with_one_line(tmp_path, capsys):
    model = randomised(UNet3D(**TINY_UNET))
    with torch.no_grad():  # finite weights (NaN/Inf weights are refused at load) whose output overflows float32
        model.out[2].conv.weight.fill_(3e38)
        model.out[2].conv.bias.fill_(3e38)
    modelfile.save_model(tmp_path / "broken", model, CONFIG)
    code, _, err = sample(capsys, tmp_path / "broken", tmp_path / "s", "--num", 1)
    assert code == 1
    assert_one_line_error(err, "NaN")
    assert os.listdir(tmp_path / "s") == []


# --- bad input ----------------------------------------------------------------------------------------------

def _write_garbage(path):
    path.write_bytes(b"this is not a NIfTI file")
    return path


def _write_volume(path, shape=SHAPE):
    io.save_volume(path, torch.zeros(1, *shape), spacing=(1.0, 1.0, 1.0))
    return path


BAD_INPUTS = {
    "unknown solver": (lambda d: ["--solver", "nope"], ["unknown solver", "dpmpp_2m"]),
    "adaptive solver": (lambda d: ["--solver", "ode_dopri5"], ["--solver ode_dopri5", "no fixed-step plan"]),
    "encoding solver": (lambda d: ["--solver", "ddim_inversion"], ["--solver ddim_inversion", "does not sample"]),
    "zero steps": (lambda d: ["--steps", "0"], ["--steps"]),
    "zero volumes": (lambda d: ["--num", "0"], ["--num"]),
    "zero batch": (lambda d: ["--batch", "0"], ["--batch"]),
    "indivisible shape": (lambda d: ["--shape", "9", "8", "8"], ["divisible by 2"]),
    "missing model": (lambda d: ["--model", d / "nowhere"], ["nowhere", "no such file"]),
    "model without weights": (lambda d: ["--model", d / "halfmodel"], ["model.safetensors", "missing"]),
    "demo not installed": (lambda d: ["--model", "demo"], ["'demo' is not installed"]),
    "unreadable init": (lambda d: ["--init", _write_garbage(d / "init.nii.gz"), "--strength", "0.5"],
                        ["--init", "init.nii.gz"]),
    "missing init": (lambda d: ["--init", d / "absent.nii.gz", "--strength", "0.5"], ["--init", "absent.nii.gz"]),
    "init of another shape": (lambda d: ["--init", _write_volume(d / "small.nii.gz", (4, 4, 4)), "--strength", "1"],
                              ["--init", "(4, 4, 4)"]),
    "strength without init": (lambda d: ["--strength", "0.5"], ["--strength"]),
    "strength out of range": (lambda d: ["--init", _write_volume(d / "v.nii.gz"), "--strength", "1.5"],
                              ["--strength"]),
    "unreadable mask": (lambda d: ["--mask", _write_garbage(d / "mask.nii.gz"), "--known",
                                   _write_volume(d / "k.nii.gz")], ["--mask", "mask.nii.gz"]),
    "unreadable known": (lambda d: ["--mask", _write_volume(d / "m.nii.gz"), "--known",
                                    _write_garbage(d / "known.nii.gz")], ["--known", "known.nii.gz"]),
    "mask without known": (lambda d: ["--mask", _write_volume(d / "m.nii.gz")], ["--known"]),
    "output under a file": (lambda d: ["--out", _write_garbage(d / "afile") / "sub"], ["--out", "not a directory"]),
    "unknown device": (lambda d: ["--device", "tpu"], ["--device", "unknown device"]),
    "absent cuda device": (lambda d: ["--device", "cuda:99"], ["--device"]),
    "unknown dtype": (lambda d: ["--dtype", "float64"], ["--dtype"]),
    "class label on an unconditioned model": (lambda d: ["--class-label", "1"], ["not class-conditional"]),
    "guidance without a condition": (lambda d: ["--guidance-scale", "2"], ["--guidance-scale"]),
    "unknown option": (lambda d: ["--colour", "blue"], ["--colour"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny, capsys, monkeypatch, case):
    monkeypatch.setattr(modelfile, "MODELS_DIR", str(tmp_path / "no_bundled_models"))
    monkeypatch.chdir(tmp_path)
    half = tmp_path / "halfmodel"
    half.mkdir()
    (half / "config.json").write_text((tiny / "config.json").read_text())
    make_argv, fragments = BAD_INPUTS[case]
    argv = ["sample", "--model", tiny, "--out", tmp_path / "out", "--steps", "2", "--num", "2", "--quiet"]
    argv += make_argv(tmp_path)
    before = files_under(tmp_path)
    code, stdout, err = run(capsys, *argv)
    assert code == 2, err
    assert_one_line_error(err, *fragments)
    assert files_under(tmp_path) == before


def test_forced_unusable_backend_is_a_usage_error(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nonexistent")
    code, _, err = sample(capsys, tiny, tmp_path / "out")
    assert code == 2
    assert_one_line_error(err, backends.ENV_VAR)
    assert not (tmp_path / "out").exists()


# --- conditioning, inpainting, SDEdit -----------------------------------------------------------------------

def test_inpainting_keeps_the_known_region(tmp_path, tiny, capsys):
    generator = torch.Generator().manual_seed(3)
    known = torch.randn(1, *SHAPE, generator=generator) * 0.5  # model units
    mask = torch.zeros(1, *SHAPE)
    mask[..., :4] = 1.0
    known_affine = io.make_affine((2.0, 2.0, 2.0), "RAS", shape=SHAPE)
    io.save_volume(tmp_path / "known.nii.gz", known, affine=known_affine, intensity=CONFIG["intensity"])
    io.save_volume(tmp_path / "mask.nii.gz", mask, affine=known_affine)
    code, _, err = sample(capsys, tiny, tmp_path / "s", "--num", 2, "--mask", tmp_path / "mask.nii.gz",
                          "--known", tmp_path / "known.nii.gz")
    assert code == 0, err
    physical = known[0].numpy() * SCALE + OFFSET
    expected = reference(tiny, [0, 1], mask=mask[None], known=known[None])
    for k in range(2):
        data, affine = nifti(tmp_path / "s" / f"sample_{k:04d}.nii.gz")
        np.testing.assert_allclose(affine, known_affine, atol=1e-6)  # outputs overlay the known volume
        np.testing.assert_allclose(data[..., :4], physical[..., :4], rtol=1e-5, atol=1e-3)
        assert np.abs(data[..., 4:] - physical[..., 4:]).max() > 1.0
        np.testing.assert_allclose(data, expected[k], rtol=1e-5, atol=1e-3)
        sidecar = json.loads((tmp_path / "s" / f"sample_{k:04d}.json").read_text())
        assert sidecar["mask_sha256"] == modelfile.file_sha256(tmp_path / "mask.nii.gz")


def test_sdedit_starts_from_the_init_volume(tmp_path, tiny, capsys):
    init = torch.linspace(-1, 1, 512).reshape(1, *SHAPE)
    io.save_volume(tmp_path / "init.nii.gz", init, affine=io.make_affine((1.0, 1.2, 2.0), "LPS", shape=SHAPE),
                   intensity=CONFIG["intensity"])
    code, _, err = sample(capsys, tiny, tmp_path / "s", "--num", 1, "--solver", "ddim", "--init",
                          tmp_path / "init.nii.gz", "--strength", 0.5, steps=4)
    assert code == 0, err
    data, _ = nifti(tmp_path / "s" / "sample_0000.nii.gz")
    expected = reference(tiny, [0], solver="ddim", steps=4, init=init[None], strength=0.5)
    np.testing.assert_allclose(data, expected[0], rtol=1e-5, atol=1e-3)
    assert not np.allclose(data, reference(tiny, [0], solver="ddim", steps=4)[0], atol=1.0)
    sidecar = json.loads((tmp_path / "s" / "sample_0000.json").read_text())
    assert sidecar["strength"] == 0.5 and sidecar["init_sha256"] == modelfile.file_sha256(tmp_path / "init.nii.gz")
    assert sidecar["start_eval"] == 2
    # A multistep solver (the default dpmpp_2m) restarts its history at the kept step: exactly what was asked
    code, _, err = sample(capsys, tiny, tmp_path / "m", "--num", 1, "--solver", "dpmpp_2m", "--init",
                          tmp_path / "init.nii.gz", "--strength", 0.5, steps=6)
    assert code == 0 and "warning" not in err, err
    data, _ = nifti(tmp_path / "m" / "sample_0000.nii.gz")
    expected = reference(tiny, [0], solver="dpmpp_2m", steps=6, init=init[None], strength=0.5)
    np.testing.assert_allclose(data, expected[0], rtol=1e-5, atol=1e-3)
    assert json.loads((tmp_path / "m" / "sample_0000.json").read_text())["start_eval"] == 3
    # pndm cannot start part-way: a usage error, nothing written
    code, _, err = sample(capsys, tiny, tmp_path / "p", "--num", 1, "--solver", "pndm", "--init",
                          tmp_path / "init.nii.gz", "--strength", 0.5, steps=6)
    assert code == 2
    assert_one_line_error(err, "pndm")
    assert not (tmp_path / "p").exists()


def test_class_labels_and_guidance(tmp_path, class_model, capsys):
    code, _, err = sample(capsys, class_model, tmp_path / "none", "--num", 1)
    assert code == 2
    assert_one_line_error(err, "--class-label")
    code, _, err = sample(capsys, class_model, tmp_path / "bad", "--num", 1, "--class-label", 3)
    assert code == 2
    assert_one_line_error(err, "0..2")
    code, _, err = sample(capsys, class_model, tmp_path / "nouncond", "--num", 1, "--class-label", 1,
                          "--guidance-scale", 2)
    assert code == 2
    assert_one_line_error(err, "--uncond-class-label")

    def volumes(out, *extra):
        code, _, err = sample(capsys, class_model, tmp_path / out, "--num", 2, *extra)
        assert code == 0, err
        return [nifti(tmp_path / out / f"sample_{k:04d}.nii.gz")[0] for k in range(2)]

    label1 = volumes("c1", "--class-label", 1)
    expected = reference(class_model, [0, 1], cond={"class_labels": torch.tensor([1, 1])})
    np.testing.assert_allclose(np.stack(label1), expected, rtol=1e-5, atol=1e-3)
    assert not np.allclose(np.stack(volumes("c0", "--class-label", 0)), expected, atol=1e-2)
    # guidance scale 1 is the conditional model; a larger scale moves away from it
    guided1 = volumes("g1", "--class-label", 1, "--guidance-scale", 1, "--uncond-class-label", 2)
    np.testing.assert_allclose(np.stack(guided1), expected, rtol=1e-4, atol=1e-3)
    guided3 = volumes("g3", "--class-label", 1, "--guidance-scale", 3, "--uncond-class-label", 2)
    assert not np.allclose(np.stack(guided3), expected, atol=1e-2)
    sidecar = json.loads((tmp_path / "g3" / "sample_0000.json").read_text())
    assert (sidecar["class_label"], sidecar["guidance_scale"], sidecar["uncond_class_label"]) == (1, 3.0, 2)


# --- convert, models, bench, info ---------------------------------------------------------------------------

MONAI_ARGS = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 8], attention_levels=[False, True],
                  num_res_blocks=1, norm_num_groups=4, num_head_channels=8)


def test_convert_round_trip_matches_monai(tmp_path, capsys):
    from monai.networks.nets import DiffusionModelUNet

    monai_net = randomised(DiffusionModelUNet(**MONAI_ARGS), seed=4)
    torch.save(monai_net.state_dict(), tmp_path / "model.pt")
    bundle = {"network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **MONAI_ARGS},
              "noise_scheduler": {"_target_": "monai.networks.schedulers.DDPMScheduler",
                                  "num_train_timesteps": 1000, "schedule": "scaled_linear_beta",
                                  "beta_start": 0.0015, "beta_end": 0.0195, "clip_sample": False}}
    (tmp_path / "config.json").write_text(json.dumps(bundle))
    argv = ["convert", "--monai-checkpoint", tmp_path / "model.pt", "--monai-config", tmp_path / "config.json",
            "--out", tmp_path / "converted", "--volume-shape", 8, 8, 8]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "converted" in stdout and "converted" in os.listdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, "already exists")

    code, _, err = sample(capsys, tmp_path / "converted", tmp_path / "s", "--num", 2)
    assert code == 0, err
    schedule = pydiffmed.schedules.NoiseSchedule.discrete("scaled_linear", 1000, 0.0015, 0.0195)
    expected = Sampler(monai_net, get_solver("dpmpp_2m", schedule, 2), (2, 1, *SHAPE))([0, 1])
    for k in range(2):
        data, affine = nifti(tmp_path / "s" / f"sample_{k:04d}.nii.gz")
        np.testing.assert_allclose(data, expected[k, 0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(affine, io.make_affine((1.0, 1.0, 1.0), "RAS", shape=SHAPE), atol=1e-6)
    assert json.loads((tmp_path / "s" / "sample_0000.json").read_text())["model"] == "converted"


def test_convert_warnings_and_errors_are_one_line(tmp_path, capsys):
    from monai.networks.nets import DiffusionModelUNet

    torch.save(DiffusionModelUNet(**MONAI_ARGS).state_dict(), tmp_path / "model.pt")
    (tmp_path / "bare.json").write_text(json.dumps(MONAI_ARGS))
    code, _, err = run(capsys, "convert", "--monai-checkpoint", tmp_path / "model.pt", "--monai-config",
                       tmp_path / "bare.json", "--out", tmp_path / "m")
    assert code == 0
    assert err.strip().startswith("pydiffmed: warning:") and len(err.strip().splitlines()) == 1
    assert "DDPMScheduler defaults" in err
    code, _, err = run(capsys, "convert", "--monai-checkpoint", tmp_path / "absent.pt", "--monai-config",
                       tmp_path / "bare.json", "--out", tmp_path / "m2")
    assert code == 2
    assert_one_line_error(err, "absent.pt")
    assert not (tmp_path / "m2").exists()


def test_models_lists_bundled_models_and_samples_them_by_name(tmp_path, tiny, capsys, monkeypatch):
    bundled = tmp_path / "models_data"
    bundled.mkdir()
    monkeypatch.setattr(modelfile, "MODELS_DIR", str(bundled))
    code, stdout, _ = run(capsys, "models")
    assert code == 0
    assert "no bundled models" in stdout and "demo: not installed" in stdout

    model, _, _ = pydiffmed.load_model(tiny)
    modelfile.save_model(bundled / "demo", model, {**CONFIG, "name": "demo"})
    code, stdout, _ = run(capsys, "models")
    assert code == 0
    row = [line for line in stdout.splitlines() if line.startswith("demo ")]
    assert row and "1×8×8×8" in row[0] and "tiny test model" in row[0]
    assert "demo: not installed" not in stdout and "demo_healthy: not installed" in stdout

    monkeypatch.chdir(tmp_path)
    code, _, err = sample(capsys, "demo", tmp_path / "s", "--num", 1)
    assert code == 0, err
    np.testing.assert_allclose(nifti(tmp_path / "s" / "sample_0000.nii.gz")[0], reference(tiny, [0])[0],
                               rtol=1e-5, atol=1e-3)


def test_bench_and_info_run(capsys):
    code, stdout, err = run(capsys, "bench", "--size", 8, "--steps", 2, "--repeats", 1)
    assert code == 0, err
    assert "ms per step" in stdout and "s per volume" in stdout and "backend" in stdout
    code, _, err = run(capsys, "bench", "--size", 6)
    assert code == 2
    assert_one_line_error(err, "--size")
    code, stdout, _ = run(capsys, "info")
    assert code == 0 and "backends:" in stdout
    route = importlib.import_module("pydiffmed.ops.attention").cpu_bf16_route()
    assert f"bf16 attention on the cpu: {route}" in stdout


def test_console_entry_point(tmp_path, tiny):
    script = pathlib.Path(sys.executable).with_name("pydiffmed")
    assert script.exists(), "the pydiffmed console script is not installed (make install / pip install -e .)"
    result = subprocess.run([str(script), "sample", "--model", str(tiny), "--out", str(tmp_path / "s"),
                             "--solver", "nope"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "unknown solver")
    assert not (tmp_path / "s").exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "sample" in result.stdout and "convert" in result.stdout


def test_nifti_header_names_the_provenance(tmp_path, tiny, capsys):
    code, _, err = sample(capsys, tiny, tmp_path / "s", "--num", 2, "--seed", 40, "--solver", "ddim")
    assert code == 0, err
    for k in range(2):
        descrip = nib.load(str(tmp_path / "s" / f"sample_{k:04d}.nii.gz")).header["descrip"].item().decode()
        assert descrip == f"pydiffmed {pydiffmed.__version__} tiny seed {40 + k} ddim 2"
