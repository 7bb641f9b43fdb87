"""`pydiffmed reconstruct` and `pydiffmed anomaly`: end to end with the bundled demo model (MRI 4× from k-space, CT
30 views, multi-coil MRI: better than the classical reconstruction; anomaly map brighter in lesions), the units
contract (measurements in output units give what the library gives for model-unit data), every kind of bad
measurement file (exit 2, one line, nothing written), and all-or-nothing outputs when a run fails while writing.

Measured on a held-out phantom (pydiffmed.data family 1; the demo model was trained on family 0), 5 dpmpp_2m steps,
PSNR over the 0-1000 output range, the baselines clipped to that range too (as the model's outputs are): MRI 4×
single coil (dds) 31.3 dB vs zero-filled 27.5 dB; CT 30 views (projection) 39.3 dB vs FBP 35.1 dB (dds: 37.1);
MRI 4× with 4 coils (dds) 35.1 dB vs coil-combined zero-filled 27.7 dB. The tests assert a 2 dB margin. Torch runs
on one thread here (the `one_thread` fixture): on the shared 2-core machine that is the fastest."""
import json
import math
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import randomised

import pydiffmed
from pydiffmed import data, io, modelfile
from pydiffmed.cli import _OutputLock, main
from pydiffmed.inverse import (
    CartesianMRI,
    Measurement,
    ParallelBeamCT,
    anomaly_score,
    sparse_view_angles,
    uniform_mask,
)
from pydiffmed.models import UNet3D

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2-core machine: one thread is the fastest

SCALE, OFFSET = 500.0, 500.0  # the demo model's intensity block: output = 500·model + 500, clipped to [0, 1000]
DEMO_SHAPE = (32, 32, 32)
MARGIN_DB = 2.0
TINY_SHAPE = (8, 8, 8)
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                 attention_levels=(False, True), norm_num_groups=4, num_head_channels=8)
TINY_CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
               "prediction_type": "epsilon", "volume_shape": list(TINY_SHAPE), "spacing": [1.0, 1.2, 2.0],
               "orientation": "LPS", "intensity": {"scale": 100.0, "offset": 20.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), TINY_CONFIG)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*"))


def nifti(path):
    image = nib.load(str(path))
    return image.get_fdata(dtype=np.float64), image.affine


def psnr(volume, truth, data_range=1000.0):
    return 10 * math.log10(data_range ** 2 / float(np.mean((np.asarray(volume) - np.asarray(truth)) ** 2)))


def held_out_phantom(index=0):
    """A phantom of family 1 (the demo model saw family 0), (1, 1, D, H, W) float64, in output units."""
    return data.head_phantom(1, index, DEMO_SHAPE)[None].double() * SCALE + OFFSET


def check_sidecar(out, sidecar_name, model="demo"):
    sidecar = json.loads((out / sidecar_name).read_text())
    info = modelfile.read_model_info(model)
    assert (sidecar["model"], sidecar["model_sha256"]) == (info.name, info.sha256)
    assert sidecar["pydiffmed_version"] == pydiffmed.__version__
    for name, digest in sidecar["files_sha256"].items():  # every output, hashed after it was written
        assert modelfile.file_sha256(out / name) == digest, name
    assert sorted(os.listdir(out)) == sorted([*sidecar["files_sha256"], sidecar_name])
    for flag, entry in sidecar["inputs"].items():
        if entry is not None:
            assert modelfile.file_sha256(entry["path"]) == entry["sha256"], flag
    return sidecar


def coil_maps(n=4, shape=DEMO_SHAPE):
    """Smooth complex sensitivities, one per corner of the (H, W) plane, normalised to Σ|S|² = 1."""
    axes = [torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape]
    _, yy, xx = torch.meshgrid(*axes, indexing="ij")
    maps = []
    for cy, cx in [(-1, -1), (1, -1), (-1, 1), (1, 1)][:n]:
        maps.append(torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2) * torch.exp(0.5j * (cx * xx + cy * yy)))
    maps = torch.stack(maps)
    return maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()


# --- end to end with the demo model -------------------------------------------------------------------------------

def test_mri_4x_from_kspace_beats_zero_filled(tmp_path, capsys):
    truth = held_out_phantom()
    mask, acceleration = uniform_mask(DEMO_SHAPE[:2], 4, center_fraction=0.08)  # D×H phase encodes, W readout
    assert acceleration == 4
    kspace = CartesianMRI(mask).forward(truth)[0, 0]  # (D, H, W) complex128, output units
    np.save(tmp_path / "kspace.npy", kspace.numpy().astype(np.complex64))
    np.save(tmp_path / "mask.npy", mask.numpy())
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "reconstruct", "--model", "demo", "--kspace", tmp_path / "kspace.npy", "--mask",
                            tmp_path / "mask.npy", "--out", out, "--steps", 5, "--quiet")
    assert code == 0, err
    assert "reconstructed 32×32×32 from k-space" in stdout and "recon_0000.nii.gz" in stdout
    recon, affine = nifti(out / "recon_0000.nii.gz")
    np.testing.assert_allclose(affine, modelfile.read_model_info("demo").affine(), atol=1e-5)
    zero_filled = CartesianMRI(mask).adjoint(CartesianMRI(mask).forward(truth))[0, 0].clamp(0, 1000).numpy()
    gain, base = psnr(recon, truth[0, 0]), psnr(zero_filled, truth[0, 0])
    assert gain > base + MARGIN_DB, (gain, base)  # measured 31.3 vs 27.5 dB
    sidecar = check_sidecar(out, "recon.json")
    assert sorted(sidecar["files_sha256"]) == ["recon.png", "recon_0000.nii.gz"]
    assert (sidecar["command"], sidecar["modality"], sidecar["posterior"], sidecar["solver"], sidecar["steps"]) == \
        ("reconstruct", "mri", "dds", "dpmpp_2m", 5)
    assert sidecar["acceleration"] == pytest.approx(4.0) and sidecar["coils"] == 1
    assert sidecar["relative_residual"][0] < 0.05  # the sample explains the data it was given
    assert sidecar["inputs"]["--coils"] is None and sidecar["seeds"] == [0]


def test_ct_30_views_beats_fbp_on_the_reference_grid(tmp_path, capsys):
    truth = held_out_phantom()
    op = ParallelBeamCT(sparse_view_angles(30), DEMO_SHAPE[1:])
    np.save(tmp_path / "sino.npy", op.forward(truth)[0, 0].numpy().astype(np.float32))  # (D, 30, detectors)
    reference_affine = io.make_affine((2.0, 2.5, 3.0), "LPS", origin=(10.0, -4.0, 7.0))
    io.save_volume(tmp_path / "ref.nii.gz", torch.zeros(DEMO_SHAPE), affine=reference_affine)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "reconstruct", "--model", "demo", "--sinogram", tmp_path / "sino.npy",
                            "--angles", "sparse:30", "--reference", tmp_path / "ref.nii.gz", "--out", out,
                            "--steps", 5, "--posterior", "projection", "--quiet", "--prefix", "ct")
    assert code == 0, err
    assert "30-view sinogram" in stdout
    recon, affine = nifti(out / "ct_0000.nii.gz")
    np.testing.assert_allclose(affine, reference_affine, atol=1e-5)
    fbp = op.fbp(op.forward(truth))[0, 0].clamp(0, 1000).numpy()
    gain, base = psnr(recon, truth[0, 0]), psnr(fbp, truth[0, 0])
    assert gain > base + MARGIN_DB, (gain, base)  # measured 39.3 vs 35.1 dB
    sidecar = check_sidecar(out, "ct.json")
    assert (sidecar["modality"], sidecar["views"], sidecar["angles"]) == ("ct", 30, "sparse:30")
    assert sidecar["posterior"] == "projection" and sidecar["posterior_options"]["operator_norm2"] > 0
    assert sidecar["orientation"] == "LPS" and sidecar["spacing"] == pytest.approx([2.0, 2.5, 3.0])
    assert sidecar["inputs"]["--reference"]["sha256"] == modelfile.file_sha256(tmp_path / "ref.nii.gz")


def test_multicoil_mri_with_a_coils_file(tmp_path, capsys):
    truth = held_out_phantom()
    coils = coil_maps()
    mask, _ = uniform_mask(DEMO_SHAPE[:2], 4, center_fraction=0.08)
    op = CartesianMRI(mask, coils[None])
    np.save(tmp_path / "kspace.npy", op.forward(truth)[0].numpy())  # (4, D, H, W) complex128
    np.savez(tmp_path / "coils.npz", coils=coils.numpy().astype(np.complex64))  # a .npz holding one array
    np.save(tmp_path / "mask.npy", mask.numpy().astype(np.uint8))  # 0/1 numbers
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "reconstruct", "--model", "demo", "--kspace", tmp_path / "kspace.npy", "--mask",
                            tmp_path / "mask.npy", "--coils", tmp_path / "coils.npz", "--out", out, "--steps", 5,
                            "--quiet")
    assert code == 0, err
    assert "4 coil(s)" in stdout
    recon, _ = nifti(out / "recon_0000.nii.gz")
    zero_filled = op.adjoint(op.forward(truth))[0, 0].clamp(0, 1000).numpy()
    gain, base = psnr(recon, truth[0, 0]), psnr(zero_filled, truth[0, 0])
    assert gain > base + MARGIN_DB, (gain, base)  # measured 35.1 vs 27.7 dB
    sidecar = check_sidecar(out, "recon.json")
    assert sidecar["coils"] == 4 and sidecar["inputs"]["--coils"]["sha256"] == \
        modelfile.file_sha256(tmp_path / "coils.npz")


def test_anomaly_map_is_brighter_in_the_lesion(tmp_path, capsys):
    """With the bundled demo_healthy (the demo fine-tuned on lesion-free phantoms). The map's mean over the lesion
    voxels against its mean over the rest of the brain mask: measured 3.9× (demo_healthy; 2.8× with the
    lesion-trained demo) for this phantom (gaussian, level 0.5 of 10 steps, smoothing 1); asserted > 3×."""
    model = "demo_healthy"
    volume, labels = data.head_phantom(1, 1, DEMO_SHAPE, return_labels=True)
    lesion = labels == data.TISSUE_CLASSES.index("lesion")
    brain = labels >= data.TISSUE_CLASSES.index("brain")  # brain, lesions, ventricles
    assert int(lesion.sum()) > 100
    affine = modelfile.read_model_info(model).affine()
    io.save_volume(tmp_path / "head.nii.gz", volume, affine=affine, intensity={"scale": SCALE, "offset": OFFSET})
    io.save_volume(tmp_path / "brain.nii.gz", brain.float(), affine=affine)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "anomaly", "--model", model, "--input", tmp_path / "head.nii.gz", "--mask",
                            tmp_path / "brain.nii.gz", "--out", out, "--steps", 10, "--level", 0.5,
                            "--threshold", "percentile:95", "--quiet")
    assert code == 0, err
    sidecar = check_sidecar(out, "anomaly.json", model)
    assert sorted(sidecar["files_sha256"]) == ["anomaly.png", "anomaly_anomalies.nii.gz", "anomaly_healthy.nii.gz",
                                               "anomaly_map.nii.gz"]
    assert f"anomaly score {sidecar['score']:.6g}" in stdout
    amap, map_affine = nifti(out / "anomaly_map.nii.gz")
    np.testing.assert_allclose(map_affine, affine, atol=1e-5)
    assert np.all(amap[~brain.numpy()] == 0)  # restricted to the mask
    inside, outside = amap[lesion.numpy()].mean(), amap[(brain & ~lesion).numpy()].mean()
    assert inside > 3.0 * outside, (model, inside, outside)
    score = float(anomaly_score(torch.from_numpy(amap)[None, None], mask=brain[None, None]))
    assert sidecar["score"] == pytest.approx(score, rel=1e-5)
    found, _ = nifti(out / "anomaly_anomalies.nii.gz")
    assert set(np.unique(found)) <= {0, 1} and sidecar["anomalous_voxels"] == int(found.sum())
    assert int(found.sum()) == pytest.approx(0.05 * int(brain.sum()), abs=2)  # the top 5 % of the brain
    assert found[lesion.numpy()].mean() > found[(brain & ~lesion).numpy()].mean()
    healthy, _ = nifti(out / "anomaly_healthy.nii.gz")
    assert 0.0 <= healthy.min() and healthy.max() <= 1000.0  # output units, the model's intensity clip


# --- the units contract, with a tiny random model -------------------------------------------------------------------

def test_measurements_in_output_units_match_model_unit_data(tmp_path, tiny, capsys):
    """y in output units (image = 100·x + 20) gives, bit for bit up to the complex64 file, the posterior samples the
    library gives for the model-unit data A·x and sigma_y / 100; --num 2 adds their mean and std."""
    model, schedule, info = pydiffmed.load_model(tiny)
    x = torch.randn(1, 1, *TINY_SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    mask = torch.rand(TINY_SHAPE[:2], generator=torch.Generator().manual_seed(4)) < 0.5
    op = CartesianMRI(mask)
    np.save(tmp_path / "k.npy", op.forward(100.0 * x + 20.0)[0, 0].numpy())
    np.save(tmp_path / "m.npy", mask.numpy())
    out = tmp_path / "out"
    code, _, err = run(capsys, "reconstruct", "--model", tiny, "--kspace", tmp_path / "k.npy", "--mask",
                       tmp_path / "m.npy", "--out", out, "--steps", 3, "--num", 2, "--batch", 1, "--seed", 7,
                       "--sigma-y", 5.0, "--posterior", "projection", "--solver", "ddim", "--quiet")
    assert code == 0, err
    solver = pydiffmed.get_solver("ddim", schedule, 3, prediction_type=info.prediction_type)
    from pydiffmed.inverse.samplers import _operator_norm2

    norm2 = _operator_norm2(op, (1, 1, *TINY_SHAPE), "cpu", torch.float32)
    expected = pydiffmed.sample(model, (2, 1, *TINY_SHAPE), solver, seed=[7, 8], progress=False,
                                measurement=Measurement(op, op.forward(x).to(torch.complex64), 0.05),
                                posterior="projection", posterior_options={"operator_norm2": norm2})
    expected = expected[:, 0].double().numpy() * 100.0 + 20.0
    samples = [nifti(out / f"recon_{k:04d}.nii.gz")[0] for k in range(2)]
    for k in range(2):
        np.testing.assert_allclose(samples[k], expected[k], rtol=1e-4, atol=2e-3)
    assert not np.allclose(samples[0], samples[1])  # the seeds differ
    np.testing.assert_allclose(nifti(out / "recon_mean.nii.gz")[0], np.mean(samples, 0), atol=1e-3)
    np.testing.assert_allclose(nifti(out / "recon_std.nii.gz")[0], np.std(samples, 0, ddof=1), atol=1e-3)
    sidecar = check_sidecar(out, "recon.json", tiny)
    assert sidecar["sigma_y_model_units"] == pytest.approx(0.05) and sidecar["seeds"] == [7, 8]
    assert sorted(sidecar["files"]) == ["mean", "preview", "samples", "std"]


def test_ct_units_and_angle_forms(tmp_path, tiny, capsys):
    """CT: output-unit sinogram → the library's answer for model-unit data; limited:N:SPAN and an angle file
    are the operators' limited_angle_angles and the file's radians."""
    from pydiffmed.inverse import limited_angle_angles

    model, schedule, info = pydiffmed.load_model(tiny)
    x = torch.randn(1, 1, *TINY_SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    angles = limited_angle_angles(6, 120.0)
    op = ParallelBeamCT(angles, TINY_SHAPE[1:])
    np.save(tmp_path / "s.npy", op.forward(100.0 * x + 20.0)[0, 0].numpy())
    np.save(tmp_path / "angles.npy", angles.numpy())
    solver = pydiffmed.get_solver("dpmpp_2m", schedule, 2, prediction_type=info.prediction_type)
    expected = pydiffmed.sample(model, (1, 1, *TINY_SHAPE), solver, seed=0, progress=False,
                                measurement=Measurement(op, op.forward(x).float()), posterior="dds")
    expected = expected[0, 0].double().numpy() * 100.0 + 20.0
    for form in ("limited:6:120", tmp_path / "angles.npy"):
        out = tmp_path / f"out{len(str(form))}"
        code, _, err = run(capsys, "reconstruct", "--model", tiny, "--sinogram", tmp_path / "s.npy", "--angles", form,
                           "--out", out, "--steps", 2, "--quiet")
        assert code == 0, err
        np.testing.assert_allclose(nifti(out / "recon_0000.nii.gz")[0], expected, rtol=1e-4, atol=2e-3)


# --- bad input --------------------------------------------------------------------------------------------------------

def _kspace(d, name="k.npy", shape=TINY_SHAPE, coils=None, dtype=np.complex64, value=None):
    lead = () if coils is None else (coils,)
    fill = (1 + 1j if np.dtype(dtype).kind == "c" else 1.0) if value is None else value
    array = np.full(lead + shape, fill, dtype=dtype)
    np.save(d / name, array)
    return d / name


def _mask(d, name="m.npy", shape=TINY_SHAPE[:2], array=None):
    np.save(d / name, np.ones(shape, bool) if array is None else array)
    return d / name


def _pickled(d):
    np.save(d / "pickled.npy", np.array([{"kspace": 1}], dtype=object), allow_pickle=True)
    return d / "pickled.npy"


def _file(d, name, content: bytes):
    (d / name).write_bytes(content)
    return d / name


def _two_arrays(d):
    np.savez(d / "k.npz", a=np.ones(2, np.complex64), b=np.ones(2, np.complex64))
    return d / "k.npz"


def _mri(d, kspace=None, mask=None):
    return ["--kspace", kspace or _kspace(d), "--mask", mask or _mask(d)]


def _ct(d, angles="sparse:4", views=4, slices=TINY_SHAPE[0], dtype=np.float32):
    np.save(d / "s.npy", np.ones((slices, views, 13), dtype))
    return ["--sinogram", d / "s.npy", "--angles", angles]


def _anomaly_input(d, shape=TINY_SHAPE, name="v.nii.gz", spacing=(1.0, 1.2, 2.0)):
    io.save_volume(d / name, torch.zeros(1, *shape), spacing=spacing, orientation="LPS")
    return d / name


BAD_INPUTS = {
    "k-space shape mismatch": (lambda d: _mri(d, _kspace(d, shape=(16, 8, 8))),
                               ["--kspace", "16×8×8", "8×8×8", "configured volume shape"]),
    "real k-space": (lambda d: _mri(d, _kspace(d, dtype=np.float32)), ["--kspace", "must be complex", "float32"]),
    "NaN in k-space": (lambda d: _mri(d, _kspace(d, value=complex("nan+1j"))), ["--kspace", "NaN"]),
    "pickled npy": (lambda d: _mri(d, _pickled(d)), ["--kspace", "pickled.npy", "never unpickles"]),
    "pickle file": (lambda d: _mri(d, _file(d, "k.npy", b"\x80\x04K\x01.")),
                    ["--kspace", "Python pickle", "never unpickles"]),
    "mask of wrong shape": (lambda d: _mri(d, mask=_mask(d, shape=(8, 4))), ["--mask", "8×4", "D×H×W (8×8×8)"]),
    "mask not 0/1": (lambda d: _mri(d, mask=_mask(d, array=np.full((8, 8), 0.5))), ["--mask", "only 0 and 1"]),
    "complex mask": (lambda d: _mri(d, mask=_mask(d, array=np.ones((8, 8), np.complex64))), ["--mask", "real"]),
    "empty mask": (lambda d: _mri(d, mask=_mask(d, array=np.zeros((8, 8), bool))), ["--mask", "all zero"]),
    "missing k-space file": (lambda d: _mri(d, d / "absent.npy"), ["--kspace", "absent.npy", "no such file"]),
    "missing mask file": (lambda d: _mri(d, mask=d / "absent_mask.npy"), ["--mask", "absent_mask.npy",
                                                                          "no such file"]),
    "not a NumPy file": (lambda d: _mri(d, _file(d, "k.npy", b"text")), ["--kspace", "not a NumPy .npy or .npz"]),
    "truncated npy": (lambda d: _mri(d, _file(d, "t.npy", _kspace(d).read_bytes()[:-16])),
                      ["--kspace", "truncated"]),
    "npz with two arrays": (lambda d: _mri(d, _two_arrays(d)), ["--kspace", "holds 2 arrays"]),
    "coils count mismatch": (lambda d: _mri(d, _kspace(d, coils=3)) + ["--coils", _kspace(d, "c.npy", coils=2)],
                             ["--coils", "2 coil map(s)", "3 coil(s)"]),
    "multi-coil k-space without coils": (lambda d: _mri(d, _kspace(d, coils=3)), ["--kspace", "3 coils", "--coils"]),
    "coil maps of another shape": (lambda d: _mri(d, _kspace(d, coils=2)) + ["--coils", _kspace(
        d, "c.npy", coils=2, shape=(8, 8, 4))], ["--coils", "(2, 8, 8, 4)"]),
    "k-space without mask": (lambda d: ["--kspace", _kspace(d)], ["--kspace needs --mask"]),
    "unknown --angles form": (lambda d: _ct(d, angles="fan:30"), ["--angles fan:30", "unknown form", "sparse:N"]),
    "bad sparse count": (lambda d: _ct(d, angles="sparse:x"), ["--angles sparse:x", "integer N"]),
    "limited span out of range": (lambda d: _ct(d, angles="limited:4:200"), ["--angles limited:4:200", "span"]),
    "views mismatch": (lambda d: _ct(d, views=5), ["--sinogram", "5 views", "gives 4"]),
    "slices mismatch": (lambda d: _ct(d, slices=6), ["--sinogram", "6 slices"]),
    "complex sinogram": (lambda d: _ct(d, dtype=np.complex64), ["--sinogram", "must be real"]),
    "sinogram without angles": (lambda d: _ct(d)[:2], ["--sinogram needs --angles"]),
    "negative sigma-y": (lambda d: _mri(d) + ["--sigma-y", "-1"], ["--sigma-y"]),
    "reference of another shape": (lambda d: _mri(d) + ["--reference", _anomaly_input(d, (8, 8, 16))],
                                   ["--reference", "8×8×16"]),
    "unknown posterior": (lambda d: _mri(d) + ["--posterior", "magic"], ["--posterior", "magic"]),
    "encoding solver": (lambda d: _mri(d) + ["--solver", "ddim_inversion"], ["--solver ddim_inversion"]),
}


BAD_ANOMALY_INPUTS = {
    "input of another shape": (lambda d: ["--input", _anomaly_input(d, (16, 8, 8))],
                               ["--input", "16×8×8", "8×8×8"]),
    "missing input": (lambda d: ["--input", d / "absent.nii.gz"], ["--input", "absent.nii.gz"]),
    "mask on another grid": (lambda d: ["--input", _anomaly_input(d), "--mask",
                                        _anomaly_input(d, name="m.nii.gz", spacing=(2.0, 2.0, 2.0))],
                             ["--mask", "affine differs"]),
    "empty mask": (lambda d: ["--input", _anomaly_input(d), "--mask", _anomaly_input(d, name="m.nii.gz")],
                   ["--mask", "no voxel is inside"]),
    "unknown threshold": (lambda d: ["--input", _anomaly_input(d), "--threshold", "median"],
                          ["--threshold median", "otsu"]),
    "percentile out of range": (lambda d: ["--input", _anomaly_input(d), "--threshold", "percentile:101"],
                                ["--threshold percentile:101", "[0, 100]"]),
    "level too low for the steps": (lambda d: ["--input", _anomaly_input(d), "--level", "0.1"],
                                    ["--level 0.1", "--steps 2"]),
    "level out of range": (lambda d: ["--input", _anomaly_input(d), "--level", "1.5"], ["--level"]),
    "unknown method": (lambda d: ["--input", _anomaly_input(d), "--method", "magic"], ["--method"]),
}


BAD = {**{("reconstruct", case): v for case, v in BAD_INPUTS.items()},
       **{("anomaly", case): v for case, v in BAD_ANOMALY_INPUTS.items()}}


@pytest.mark.parametrize("command,case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny, capsys, command, case):
    make_argv, fragments = BAD[command, case]
    argv = [command, "--model", tiny, "--out", tmp_path / "out", "--steps", "2", "--quiet"]
    argv += make_argv(tmp_path)
    before = files_under(tmp_path)
    code, stdout, err = run(capsys, *argv)
    assert code == 2, err
    assert_one_line_error(err, *fragments)
    assert files_under(tmp_path) == before and stdout == ""


# --- outputs: all or nothing, existing files, the lock ---------------------------------------------------------------

@pytest.mark.parametrize("failure, status", [(OSError(28, "No space left on device (simulated)"), 1),
                                             (KeyboardInterrupt(), 130)])
def test_a_failed_write_leaves_no_output_at_all(tmp_path, tiny, capsys, monkeypatch, failure, status):
    """The second NIfTI write fails after a partial file: exit 1 (130 for Ctrl-C), one line, and neither the
    partial file, nor a temporary, nor the first complete file of the set is left; a rerun then succeeds."""
    argv = ["reconstruct", "--model", tiny, *_mri(tmp_path), "--out", tmp_path / "out", "--steps", "2", "--num", "2",
            "--quiet"]
    real_save, calls = nib.save, []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\x1f\x8b partial")
            raise failure
        return real_save(image, path)

    monkeypatch.setattr(nib, "save", failing_save)
    code, stdout, err = run(capsys, *argv)
    monkeypatch.undo()
    assert code == status and len(calls) == 2
    assert_one_line_error(err, "no output of this run is left")
    assert os.listdir(tmp_path / "out") == []
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["recon.json", "recon.png", "recon_0000.nii.gz",
                                                    "recon_0001.nii.gz", "recon_mean.nii.gz", "recon_std.nii.gz"]


def test_existing_outputs_need_overwrite_and_a_locked_directory_refuses(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    argv = ["anomaly", "--model", tiny, "--input", _anomaly_input(tmp_path), "--out", out, "--steps", "2",
            "--level", "1", "--quiet"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "anomaly score" in stdout
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, "already exists", "--overwrite")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(before)

    lock = _OutputLock("sample")  # another command holds the directory
    assert lock.acquire(str(out))
    try:
        code, _, err = run(capsys, *argv, "--overwrite")
    finally:
        lock.release()
    assert code == 2
    assert_one_line_error(err, f"another pydiffmed sample is writing to {out} (pid {os.getpid()})")
