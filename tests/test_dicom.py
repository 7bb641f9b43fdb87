"""DICOM output (pydiffmed.dicom and `pydiffmed sample --format dicom`): series read back with pydicom give the
values (stored × rescale, within the quantisation) and the affine (RAS from DICOM's LPS) they were written from;
the synthetic-image flags; CT in Hounsfield units; atomic series directories (nothing half-written, temporary
directories removed), --resume, --overwrite and bad combinations (exit 2, one line, nothing written)."""
import json
import os
import pathlib
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import randomised

from pydiffmed import dicom, io, modelfile
from pydiffmed.cli import main
from pydiffmed.models import UNet3D

pydicom = pytest.importorskip("pydicom")

CT_STORAGE, MR_STORAGE = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def read_series(directory):
    """(values (I, J, K) in physical units, RAS affine, datasets in slice order), rebuilt from the files alone."""
    datasets = [pydicom.dcmread(os.path.join(directory, name)) for name in sorted(os.listdir(directory))]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    planes = [ds.pixel_array.astype(np.float64).T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
              for ds in datasets]  # pixel_array is (rows, columns) = (J, I)
    values = np.stack(planes, axis=-1)
    first = datasets[0]
    orientation = np.array(first.ImageOrientationPatient, dtype=float)
    row_direction, column_direction = orientation[:3], orientation[3:]
    between_rows, between_columns = (float(v) for v in first.PixelSpacing)
    origin = np.array(first.ImagePositionPatient, dtype=float)
    if len(datasets) > 1:
        step = np.array(datasets[1].ImagePositionPatient, dtype=float) - origin
    else:
        step = np.cross(row_direction, column_direction) * float(first.SliceThickness)
    lps = np.eye(4)
    lps[:3, 0] = row_direction * between_columns  # along a row: the column index, volume axis 0
    lps[:3, 1] = column_direction * between_rows
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return values, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, datasets


def rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def oblique_affine(spacing, angles, origin):
    affine = np.eye(4)
    affine[:3, :3] = rotation(angles) * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def write(path, volume, **kwargs):
    """save_dicom_series with pydicom's validation warnings (a value too long for its VR, ...) as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return dicom.save_dicom_series(path, volume, **kwargs)


# --- the writer ------------------------------------------------------------------------------------------------

GEOMETRIES = {
    "RAS": {"spacing": (0.8, 1.5, 2.5), "orientation": "RAS", "origin": (10.0, -20.0, 5.0)},
    "LPS": {"spacing": (1.0, 1.2, 2.0), "orientation": "LPS"},
    "SRA (sagittal slices)": {"spacing": (3.0, 0.7, 0.9), "orientation": "SRA", "origin": (-1.0, 2.0, 3.0)},
    "LIP (left-handed)": {"spacing": (1.0, 2.0, 3.0), "orientation": "LIP"},
    "oblique": {"affine": oblique_affine((0.9, 1.1, 2.2), (0.3, -0.5, 1.1), (12.5, -7.25, 40.0))},
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_mr_series_round_trip_values_and_affine(tmp_path, geometry):
    generator = torch.Generator().manual_seed(0)
    volume = torch.randn(1, 7, 6, 5, generator=generator)
    intensity = {"scale": 300.0, "offset": 1000.0}
    kwargs = dict(GEOMETRIES[geometry])
    info = write(tmp_path / "series", volume, intensity=intensity, model="tiny", seed=11, uid_seed="run", **kwargs)
    expected_affine = kwargs.get("affine")
    if expected_affine is None:
        expected_affine = io.make_affine(kwargs["spacing"], kwargs["orientation"], kwargs.get("origin"), (7, 6, 5))

    values, affine, datasets = read_series(tmp_path / "series")
    physical = io.denormalize(volume[0].numpy(), intensity).astype(np.float64)  # what the writer stores
    assert values.shape == (7, 6, 5) and len(datasets) == 5 == info["slices"]
    slope = float(datasets[0].RescaleSlope)
    assert 0 < slope <= (physical.max() - physical.min()) / 65535 * (1 + 1e-9)  # the whole uint16 range is used
    assert np.abs(values - physical).max() <= slope / 2 * (1 + 1e-6)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-6)
    assert {ds.SOPClassUID for ds in datasets} == {MR_STORAGE} and info["modality"] == "MR"
    assert all(ds.Modality == "MR" and ds.PixelRepresentation == 0 and ds.BitsStored == 16 for ds in datasets)
    assert all(float(ds.SliceThickness) == pytest.approx(np.linalg.norm(expected_affine[:3, 2])) for ds in datasets)


def test_ct_series_in_hounsfield_units(tmp_path):
    generator = torch.Generator().manual_seed(1)
    volume = torch.rand(6, 5, 4, generator=generator) * 2 - 1  # normalised [-1, 1] → [-1024, 3072] HU
    intensity = {"scale": 2048.0, "offset": 1024.0, "clip": [-1024.0, 3071.0], "units": "HU"}
    info = write(tmp_path / "ct", volume, spacing=(0.5, 0.5, 1.25), intensity=intensity, seed=3)
    values, affine, datasets = read_series(tmp_path / "ct")
    hu = np.clip(volume.double().numpy() * 2048.0 + 1024.0, -1024.0, 3071.0)
    assert info["modality"] == "CT" and info["stored_dtype"] == "int16"
    for ds in datasets:
        assert ds.SOPClassUID == CT_STORAGE and ds.Modality == "CT" and ds.RescaleType == "HU"
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
        assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert np.abs(values - hu).max() <= 0.5 + 1e-9  # rounded to 1 HU
    assert values.min() < -500 and values.max() > 2500  # the values really are HU, not rescaled
    np.testing.assert_allclose(affine, io.make_affine((0.5, 0.5, 1.25), "RAS", shape=(6, 5, 4)), atol=1e-6)


def test_ct_outside_int16_is_rescaled_not_clipped(tmp_path):
    physical = np.linspace(-50000.0, 90000.0, 4 * 3 * 2).reshape(4, 3, 2)
    info = write(tmp_path / "ct", physical, intensity={"units": "HU"})
    values, _, _ = read_series(tmp_path / "ct")
    assert info["stored_dtype"] == "int16" and info["rescale_slope"] > 1
    assert np.abs(values - physical).max() <= info["rescale_slope"] / 2 + 1e-6


def test_integer_mr_values_are_stored_as_they_are(tmp_path):
    physical = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3) * 7
    info = write(tmp_path / "mr", physical)
    values, _, datasets = read_series(tmp_path / "mr")
    assert (info["rescale_slope"], info["rescale_intercept"]) == (1.0, 0.0)
    np.testing.assert_array_equal(values, physical)
    np.testing.assert_array_equal(datasets[1].pixel_array, physical[:, :, 1].T)


def test_synthetic_image_flags(tmp_path):
    from pydiffmed import __version__

    write(tmp_path / "s", torch.zeros(4, 4, 2), model="demo", seed=42, comments="dpmpp_2m 20 steps", uid_seed="u")
    _, _, datasets = read_series(tmp_path / "s")
    for ds in datasets:
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.BurnedInAnnotation == "NO"
        assert "SYNTHETIC" in str(ds.PatientName) and "SYNTHETIC" in ds.PatientID and "42" in ds.PatientID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod == "synthetic image generated by pydiffmed"
        assert ds.Manufacturer == "pydiffmed" and __version__ in ds.SoftwareVersions
        for text in (ds.ImageComments, ds.DerivationDescription):
            assert "synthetic image generated by pydiffmed" in text and "model demo" in text and "seed 42" in text
        assert "dpmpp_2m 20 steps" in ds.ImageComments
        assert "SYNTHETIC" in ds.SeriesDescription
        assert ds.StudyDate == "" and "InstanceCreationDate" not in ds  # no time stamps: same volume, same bytes
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_uids_are_fresh_per_series_and_deterministic_from_uid_seed(tmp_path):
    def uids(path):
        _, _, datasets = read_series(path)
        series = {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}
        assert len(series) == 1  # one study, series and frame of reference per volume
        instances = [ds.SOPInstanceUID for ds in datasets]
        assert len(set(instances)) == len(instances)
        (study, series_uid, frame), = series
        assert len({study, series_uid, frame, *instances}) == 3 + len(instances)
        return [study, series_uid, frame, *instances]

    volume = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(2))
    write(tmp_path / "a", volume, uid_seed="run-1 seed 0")
    write(tmp_path / "b", volume, uid_seed="run-1 seed 0")
    write(tmp_path / "c", volume, uid_seed="run-1 seed 1")
    write(tmp_path / "d", volume)
    write(tmp_path / "e", volume)
    assert uids(tmp_path / "a") == uids(tmp_path / "b")
    assert all(pydicom.uid.UID(u).is_valid for u in uids(tmp_path / "a"))
    assert not set(uids(tmp_path / "a")) & set(uids(tmp_path / "c"))
    assert not set(uids(tmp_path / "d")) & set(uids(tmp_path / "e"))  # random without a uid_seed
    assert io.directory_sha256(tmp_path / "a") == io.directory_sha256(tmp_path / "b")  # byte-identical files
    assert io.directory_sha256(tmp_path / "a") != io.directory_sha256(tmp_path / "c")


@pytest.mark.parametrize("failure", [OSError("No space left on device (simulated)"), KeyboardInterrupt()])
def test_failed_write_leaves_no_series_and_no_temporary(tmp_path, monkeypatch, failure):
    real_write = pydicom.dcmwrite
    calls = []

    def failing_write(filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 3:
            with open(filename, "wb") as f:
                f.write(b"DICM partial")
            raise failure
        return real_write(filename, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", failing_write)
    with pytest.raises(type(failure)):
        dicom.save_dicom_series(tmp_path / "s", torch.zeros(3, 3, 5))
    assert len(calls) == 3 and os.listdir(tmp_path) == []


def test_existing_series_kept_unless_overwrite(tmp_path):
    old, new = torch.zeros(3, 3, 2), torch.ones(3, 3, 4)
    write(tmp_path / "s", old, uid_seed="old")
    before = io.directory_sha256(tmp_path / "s")
    with pytest.raises(FileExistsError, match="already exists"):
        write(tmp_path / "s", new)
    assert io.directory_sha256(tmp_path / "s") == before
    write(tmp_path / "s", new, overwrite=True)
    values, _, _ = read_series(tmp_path / "s")
    assert values.shape == (3, 3, 4) and np.all(values == 1.0)
    assert sorted(os.listdir(tmp_path)) == ["s"]  # the old series is gone, no temporary left
    (tmp_path / "f").write_bytes(b"a file where the series goes")
    write(tmp_path / "f", new, overwrite=True)
    assert sorted(os.listdir(tmp_path / "f")) == [f"slice_{n:04d}.dcm" for n in range(4)]


def test_replacing_a_series_that_cannot_be_renamed_keeps_the_old_one(tmp_path, monkeypatch):
    write(tmp_path / "s", torch.zeros(3, 3, 2), uid_seed="old")
    before = io.directory_sha256(tmp_path / "s")
    real_rename, failed = os.rename, []

    def rename(src, dst):  # the new series cannot take its place (once: moving the old one back works)
        if os.path.basename(src).startswith(".pdm-tmp-") and os.path.basename(dst) == "s" and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        dicom.save_dicom_series(tmp_path / "s", torch.ones(3, 3, 2), overwrite=True)
    monkeypatch.undo()
    assert failed and sorted(os.listdir(tmp_path)) == ["s"] and io.directory_sha256(tmp_path / "s") == before


def test_directory_sha256_sees_every_change(tmp_path):
    write(tmp_path / "s", torch.zeros(3, 3, 3), uid_seed="x")
    digest = io.directory_sha256(tmp_path / "s")
    slice_1 = tmp_path / "s" / "slice_0001.dcm"
    data = bytearray(slice_1.read_bytes())
    data[-1] ^= 1
    slice_1.write_bytes(bytes(data))
    assert io.directory_sha256(tmp_path / "s") != digest
    slice_1.unlink()
    assert io.directory_sha256(tmp_path / "s") != digest
    (tmp_path / "s" / "sub").mkdir()
    with pytest.raises(OSError, match="not a regular file"):
        io.directory_sha256(tmp_path / "s")
    with pytest.raises(NotADirectoryError):
        io.directory_sha256(tmp_path / "s" / "slice_0000.dcm")


@pytest.mark.parametrize("volume, kwargs, message", [
    (torch.zeros(2, 3, 3, 3), {}, "holds one channel"),
    (torch.zeros(3, 3, 3), {"affine": [[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}, "sheared"),
    (torch.zeros(3, 3, 3), {"modality": "PT"}, "modality"),
    (torch.full((3, 3, 3), float("nan")), {}, "NaN"),
    (torch.zeros(3, 3, 3), {"affine": np.eye(4), "spacing": (1, 1, 1)}, "either affine"),
])
def test_bad_input_raises_and_writes_nothing(tmp_path, volume, kwargs, message):
    with pytest.raises(ValueError, match=message):
        dicom.save_dicom_series(tmp_path / "s", volume, **kwargs)
    assert os.listdir(tmp_path) == []


def test_modality_from_the_intensity_units():
    assert dicom.modality_for({"scale": 1.0, "units": "HU"}) == "CT"
    assert dicom.modality_for({"scale": 1.0, "units": "hu"}) == "CT"
    assert dicom.modality_for({"scale": 1.0}) == "MR" and dicom.modality_for(None) == "MR"
    assert dicom.modality_for({"units": "a.u."}) == "MR"
    with pytest.raises(ValueError, match="units"):
        io.check_intensity({"units": "HU\\x"})


# --- the command -----------------------------------------------------------------------------------------------

SHAPE = (8, 8, 8)
TINY_UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "num_res_blocks": 1, "channels": (8, 8),
             "attention_levels": (False, False), "norm_num_groups": 4}
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
          "prediction_type": "epsilon", "volume_shape": list(SHAPE), "spacing": [1.0, 1.2, 2.0],
          "orientation": "LPS", "intensity": {"scale": 100.0, "offset": 20.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), CONFIG)
    return path


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny_ct"
    config = dict(CONFIG, intensity={"scale": 1000.0, "offset": 0.0, "clip": [-1024.0, 3071.0], "units": "HU"})
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), config)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample(capsys, model, out, *extra):
    return run(capsys, "sample", "--model", model, "--out", out, "--steps", 2, "--quiet", *extra)


def assert_one_line_error(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "error" in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def tree(root):
    """Every file under root with its bytes."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_model_dicom_end_to_end_matches_its_nifti(tmp_path, capsys):
    """The bundled demo model, one volume, two steps: the DICOM series holds the NIfTI's values (within the
    quantisation) on the NIfTI's grid, and the sidecar records the series."""
    common = ("--num", 1, "--steps", 2, "--quiet", "--seed", 7)
    code, _, err = run(capsys, "sample", "--model", "demo", "--out", tmp_path / "n", *common)
    assert code == 0, err
    code, stdout, err = run(capsys, "sample", "--model", "demo", "--out", tmp_path / "d", "--format", "dicom",
                            *common)
    assert code == 0, err
    assert "1 volume(s) written" in stdout
    assert sorted(os.listdir(tmp_path / "d")) == ["sample_0000", "sample_0000.json", "sample_0000.png"]
    image = nib.load(str(tmp_path / "n" / "sample_0000.nii.gz"))
    values, affine, datasets = read_series(tmp_path / "d" / "sample_0000")
    slope = float(datasets[0].RescaleSlope)
    assert np.abs(values - image.get_fdata()).max() <= slope / 2 + 1e-3
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)
    assert (tmp_path / "n" / "sample_0000.png").read_bytes() == (tmp_path / "d" / "sample_0000.png").read_bytes()
    sidecar = json.loads((tmp_path / "d" / "sample_0000.json").read_text())
    assert sidecar["format"] == "dicom" and sidecar["files"]["dicom"] == "sample_0000"
    assert sidecar["files_sha256"]["dicom"] == io.directory_sha256(tmp_path / "d" / "sample_0000")
    assert sidecar["dicom"]["modality"] == "MR" and sidecar["dicom"]["slices"] == len(datasets) == 32
    assert sidecar["dicom"]["series_instance_uid"] == datasets[0].SeriesInstanceUID
    assert "model demo" in datasets[0].ImageComments and "seed 7" in datasets[0].ImageComments
    assert "dpmpp_2m 2 steps" in datasets[0].ImageComments
    assert sidecar["seed"] == 7 and "PYDIFFMED-SYNTHETIC-7" == datasets[0].PatientID


def test_ct_model_writes_a_ct_series(tmp_path, tiny_ct, capsys):
    code, _, err = sample(capsys, tiny_ct, tmp_path / "s", "--num", 1, "--format", "dicom")
    assert code == 0, err
    values, _, datasets = read_series(tmp_path / "s" / "sample_0000")
    assert datasets[0].SOPClassUID == CT_STORAGE and datasets[0].RescaleType == "HU"
    assert values.min() >= -1024 and values.max() <= 3071 and np.array_equal(values, np.rint(values))


def test_dicom_files_do_not_depend_on_the_batch(tmp_path, tiny, capsys):
    assert sample(capsys, tiny, tmp_path / "a", "--num", 3, "--batch", 1, "--format", "dicom")[0] == 0
    assert sample(capsys, tiny, tmp_path / "b", "--num", 3, "--batch", 3, "--format", "dicom")[0] == 0
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert {name: data for name, data in a.items() if not name.endswith(".json")} == \
        {name: data for name, data in b.items() if not name.endswith(".json")}
    assert len([name for name in a if name.endswith(".dcm")]) == 3 * SHAPE[2]


def test_failure_mid_run_then_resume_gives_what_an_uninterrupted_run_gives(tmp_path, tiny, capsys, monkeypatch):
    code, _, err = sample(capsys, tiny, tmp_path / "whole", "--num", 3, "--batch", 3, "--format", "dicom")
    assert code == 0, err
    out = tmp_path / "s"
    real_write = pydicom.dcmwrite
    calls = []

    def failing_write(filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == SHAPE[2] + 3:  # in volume 1's series
            raise OSError(28, "No space left on device (simulated)")
        return real_write(filename, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmwrite", failing_write)
    code, _, err = sample(capsys, tiny, out, "--num", 3, "--batch", 3, "--format", "dicom")
    monkeypatch.undo()
    assert code == 1
    assert_one_line_error(err, "--resume", "sample_0001")
    assert sorted(os.listdir(out)) == ["sample_0000", "sample_0000.json", "sample_0000.png"]  # nothing half-written
    # What a killed process would leave: a temporary series directory; and a damaged slice in volume 0.
    leftover = out / ".pdm-tmp-0123456789ab-sample_0002"
    leftover.mkdir()
    (leftover / "slice_0000.dcm").write_bytes(b"partial")
    damaged = out / "sample_0000" / "slice_0003.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-10])

    code, stdout, err = sample(capsys, tiny, out, "--num", 3, "--batch", 3, "--format", "dicom", "--resume")
    assert code == 0, err
    assert "3 volume(s) written" in stdout and "1 damaged volume(s) redone" in stdout and "damaged" in err
    whole, resumed = tree(tmp_path / "whole"), tree(out)
    assert whole.keys() == resumed.keys()
    assert {n: d for n, d in whole.items() if not n.endswith(".json")} == \
        {n: d for n, d in resumed.items() if not n.endswith(".json")}  # bit for bit (sidecars hold timings)

    before = tree(out)
    code, stdout, err = sample(capsys, tiny, out, "--num", 3, "--batch", 3, "--format", "dicom", "--resume")
    assert code == 0 and "0 volume(s) written" in stdout and "3 complete volume(s) kept" in stdout
    assert tree(out) == before


def test_overwrite_replaces_a_series(tmp_path, tiny, capsys):
    out = tmp_path / "s"
    assert sample(capsys, tiny, out, "--num", 1, "--format", "dicom")[0] == 0
    code, _, err = sample(capsys, tiny, out, "--num", 1, "--format", "dicom")
    assert code == 2
    assert_one_line_error(err, "already exists", "--overwrite")
    code, _, err = sample(capsys, tiny, out, "--num", 1, "--format", "dicom", "--overwrite", "--seed", 5)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["sample_0000", "sample_0000.json", "sample_0000.png"]
    sidecar = json.loads((out / "sample_0000.json").read_text())
    assert sidecar["seed"] == 5 and sidecar["files_sha256"]["dicom"] == io.directory_sha256(out / "sample_0000")


def _sheared_init(path):
    affine = np.eye(4)
    affine[0, 1] = 0.4
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), affine), str(path))
    return path


@pytest.mark.parametrize("case", ["two channels", "nifti outputs there", "dicom outputs there", "no pydicom",
                                  "sheared init", "resume other format", "unknown format"])
def test_bad_combinations_exit_2_and_write_nothing(tmp_path, tiny, capsys, monkeypatch, case):
    out = tmp_path / "s"
    model, extra = tiny, ["--format", "dicom"]
    if case == "two channels":
        model = tmp_path / "two"
        modelfile.save_model(model, randomised(UNet3D(**dict(TINY_UNET, in_channels=2, out_channels=2))),
                             dict(CONFIG, channels=2))
        fragments = ("--format dicom", "2-channel")
    elif case == "nifti outputs there":
        out.mkdir()
        (out / "sample_0000.nii.gz").write_bytes(b"x")
        fragments = ("sample_0000.nii.gz", "another --format")
    elif case == "dicom outputs there":
        (out / "sample_0000").mkdir(parents=True)
        extra = []
        fragments = ("sample_0000", "another --format")
    elif case == "no pydicom":
        monkeypatch.setitem(__import__("sys").modules, "pydicom", None)
        fragments = ("--format dicom", "pip install pydicom")
    elif case == "sheared init":
        extra += ["--init", _sheared_init(tmp_path / "init.nii.gz"), "--strength", "0.5"]
        fragments = ("--format dicom", "sheared")
    elif case == "resume other format":
        assert sample(capsys, tiny, out, "--num", 1)[0] == 0
        extra += ["--resume"]
        fragments = ("sample_0000.nii.gz", "another --format")
    else:
        extra = ["--format", "dcm"]
        fragments = ("--format", "invalid choice")
    before = tree(tmp_path)
    code, _, err = sample(capsys, model, out, "--num", 1, *extra)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert tree(tmp_path) == before


def test_sidecar_without_format_counts_as_nifti_on_resume(tmp_path, tiny, capsys):
    """Sidecars written before --format existed have no "format" entry: --resume still keeps their volumes."""
    out = tmp_path / "s"
    assert sample(capsys, tiny, out, "--num", 1)[0] == 0
    sidecar = json.loads((out / "sample_0000.json").read_text())
    del sidecar["format"]
    (out / "sample_0000.json").write_text(json.dumps(sidecar))
    code, stdout, err = sample(capsys, tiny, out, "--num", 1, "--resume")
    assert code == 0 and "1 complete volume(s) kept" in stdout, err
