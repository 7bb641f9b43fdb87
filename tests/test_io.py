"""pydiffmed.io: NIfTI round trips with geometry, atomic and non-overwriting writes, clear errors for bad files,
PNG previews, JSON sidecars."""
import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import pydiffmed
from pydiffmed import io


def _leftovers(directory):
    return [name for name in os.listdir(directory) if name.startswith(".pdm-tmp-")]


# --- NIfTI round trips ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("channels", [None, 1, 2])
def test_nifti_round_trip_keeps_values_and_geometry(tmp_path, suffix, channels):
    shape = (7, 9, 10)
    volume = torch.randn(shape if channels is None else (channels, *shape))
    path = tmp_path / f"vol{suffix}"
    io.save_volume(path, volume, spacing=(0.8, 1.5, 2.5), orientation="LPS", origin=(10.0, -20.0, 5.0))

    loaded, info = io.load_volume(path)
    expected = volume if channels is not None else volume[None]
    assert loaded.dtype == torch.float32 and loaded.shape == expected.shape
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    assert info.spacing == pytest.approx((0.8, 1.5, 2.5))
    assert info.orientation == "LPS"
    np.testing.assert_allclose(info.affine[:3, 3], [10.0, -20.0, 5.0])

    # Independently of our loader: nibabel sees the same affine, voxel order and units.
    image = nib.load(str(path))
    np.testing.assert_allclose(image.affine, io.make_affine((0.8, 1.5, 2.5), "LPS", (10.0, -20.0, 5.0)))
    assert image.header.get_xyzt_units()[0] == "mm"
    on_disk = volume.numpy() if channels is None else np.moveaxis(volume.numpy(), 0, -1)
    if channels == 1:
        on_disk = on_disk[..., 0]  # one channel is stored as a plain 3-D image
    np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), on_disk)
    assert (suffix == ".nii.gz") == (open(path, "rb").read(2) == b"\x1f\x8b")


def test_make_affine_orientation_spacing_and_centring():
    affine = io.make_affine((2.0, 3.0, 4.0), "RAS")
    np.testing.assert_allclose(affine, np.diag([2.0, 3.0, 4.0, 1.0]))
    lps = io.make_affine((2.0, 3.0, 4.0), "LPS")
    np.testing.assert_allclose(np.diag(lps)[:3], [-2.0, -3.0, 4.0])
    # Axis permutation: "SRA" means axis 0 runs along world z.
    sra = io.make_affine((1.0, 2.0, 3.0), "SRA")
    assert sra[2, 0] == 1.0 and sra[0, 1] == 2.0 and sra[1, 2] == 3.0
    # With a shape and no origin the volume is centred: the middle of the grid maps to world (0, 0, 0).
    centred = io.make_affine((1.5, 1.5, 2.0), "LPS", shape=(8, 10, 12))
    middle = centred @ np.array([3.5, 4.5, 5.5, 1.0])
    np.testing.assert_allclose(middle[:3], 0.0, atol=1e-12)
    assert io.spacing_from_affine(centred) == pytest.approx((1.5, 1.5, 2.0))
    assert io.orientation_from_affine(centred) == "LPS"


def test_intensity_denormalised_on_write_and_normalised_on_read(tmp_path):
    volume = torch.linspace(-1, 1, 4 * 5 * 6).reshape(4, 5, 6)
    intensity = {"scale": 1000.0, "offset": 40.0, "clip": [-900.0, 1000.0]}
    path = tmp_path / "ct.nii.gz"
    io.save_volume(path, volume, intensity=intensity, dtype="int16")
    raw = np.asarray(nib.load(str(path)).dataobj)
    assert raw.dtype == np.int16
    expected = np.clip(np.rint(volume.double().numpy() * 1000.0 + 40.0), -900, 1000)
    np.testing.assert_array_equal(raw, expected)
    back, _ = io.load_volume(path, intensity=intensity)
    inside = (volume * 1000 + 40 > -900) & (volume * 1000 + 40 < 1000)
    torch.testing.assert_close(back[0][inside], volume[inside], atol=1e-3, rtol=0)
    assert float(back.min()) == pytest.approx((-900 - 40) / 1000)  # clipped values stay clipped


def test_int_dtype_saturates_instead_of_wrapping(tmp_path):
    volume = torch.tensor([[[-1e6, 1e6], [0.4, 0.6]]]).expand(2, 2, 2)
    io.save_volume(tmp_path / "sat.nii", volume, dtype="int16")
    raw = np.asarray(nib.load(str(tmp_path / "sat.nii")).dataobj)
    assert raw[0, 0, 0] == -32768 and raw[0, 0, 1] == 32767 and raw[0, 1, 0] == 0 and raw[0, 1, 1] == 1


# --- atomic writes and overwriting ---------------------------------------------------------------------------

def _failing_nibabel_save(monkeypatch, exception=RuntimeError("disk on fire")):
    """nibabel.save that writes half a file to the (temporary) target, then fails."""
    def save(image, filename):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise exception

    monkeypatch.setattr(nib, "save", save)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    _failing_nibabel_save(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        io.save_volume(tmp_path / "new.nii.gz", torch.zeros(4, 4, 4))
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_leaves_old_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "old.nii.gz"
    io.save_volume(path, torch.ones(4, 4, 4))
    before = path.read_bytes()
    _failing_nibabel_save(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        io.save_volume(path, torch.zeros(4, 4, 4), overwrite=True)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_failure_at_the_rename_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "side.json"
    io.write_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        io.write_json(path, {"v": 2}, overwrite=True)
    assert json.loads(path.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_existing_file_is_not_overwritten_unless_asked(tmp_path):
    path = tmp_path / "vol.nii.gz"
    io.save_volume(path, torch.ones(4, 4, 4))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="vol.nii.gz already exists.*overwrite=True"):
        io.save_volume(path, torch.zeros(4, 4, 4))
    assert path.read_bytes() == before
    io.save_volume(path, torch.zeros(4, 4, 4), overwrite=True)
    assert float(io.load_volume(path)[0].abs().max()) == 0.0
    assert _leftovers(tmp_path) == []


def test_file_appearing_during_the_write_is_not_clobbered(tmp_path):
    path = tmp_path / "race.json"
    with pytest.raises(FileExistsError, match="race.json"):
        with io.atomic_path(path) as temporary:
            with open(temporary, "w") as f:
                f.write("mine")
            path.write_text("someone else's")
    assert path.read_text() == "someone else's"
    assert _leftovers(tmp_path) == []


def test_written_file_has_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = io.write_bytes(tmp_path / "x.bin", b"abc")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_write_into_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        io.write_json(tmp_path / "missing" / "a.json", {})


# --- bad inputs and bad files --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"volume": torch.zeros(1, 1, 4, 4, 4)}, "one volume per file"),
    ({"volume": torch.zeros(4, 4)}, r"\(C, D, H, W\)"),
    ({"volume": torch.full((4, 4, 4), float("nan"))}, "NaN"),
    ({"spacing": (1.0, -1.0, 1.0)}, "spacing must be positive"),
    ({"spacing": (1.0, 1.0)}, "spacing must be 3"),
    ({"orientation": "RAR"}, "one letter from each"),
    ({"orientation": "XYZ"}, "orientation"),
    ({"affine": np.eye(4), "spacing": (1, 1, 1)}, "either affine or spacing"),
    ({"affine": np.zeros((4, 4))}, "singular"),
    ({"intensity": {"scale": 0.0}}, "scale must be non-zero"),
    ({"intensity": {"slope": 2.0}}, "unknown key"),
    ({"dtype": "complex64"}, "dtype"),
])
def test_save_volume_rejects_bad_arguments(tmp_path, kwargs, message):
    kwargs = {"volume": torch.zeros(4, 4, 4), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        io.save_volume(tmp_path / "x.nii.gz", **kwargs)
    assert os.listdir(tmp_path) == []


def test_save_volume_needs_a_nifti_name(tmp_path):
    with pytest.raises(ValueError, match=r"x.png: .*\.nii"):
        io.save_volume(tmp_path / "x.png", torch.zeros(4, 4, 4))


def test_missing_volume_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz: no such file"):
        io.load_volume(tmp_path / "nothere.nii.gz")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        io.load_volume(tmp_path)


def test_garbage_file_gives_clear_error(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(io.FileReadError, match="garbage.nii.gz: cannot read as a NIfTI volume"):
        io.load_volume(path)
    plain = tmp_path / "garbage.nii"
    plain.write_bytes(b"\x00" * 10)
    with pytest.raises(io.FileReadError, match="garbage.nii: cannot read"):
        io.load_volume(plain)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_volume_gives_clear_error(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    io.save_volume(path, torch.randn(16, 16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.FileReadError, match=f"cut{suffix}: cannot read"):
        io.load_volume(path)


def test_nonfinite_voxels_in_a_file_are_reported(tmp_path):
    path = tmp_path / "nan.nii"
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    with pytest.raises(io.FileReadError, match="nan.nii: holds 1 NaN/Inf"):
        io.load_volume(path)


# --- previews ------------------------------------------------------------------------------------------------

def test_preview_has_three_views_in_anatomical_orientation(tmp_path):
    volume = torch.zeros(16, 16, 16)
    volume[8, 13, 8] = 1.0  # in front (anterior) of the centre, on all three mid-slices
    image = io.preview_image(volume, zoom=1, window=(0.0, 1.0), gap=4)
    assert image.size == (16 * 3 + 8, 16) and image.mode == "L"
    pixels = np.asarray(image)
    bright = list(zip(*np.nonzero(pixels)))
    # axial: anterior is up, so row 15 - 13 = 2, column x = 8; coronal: the voxel is not on y = 8, nothing shows;
    # sagittal (starts at column 40): anterior to the right (column 40 + 13), superior up (row 15 - 8 = 7).
    assert bright == [(2, 8), (7, 40 + 13)]


def test_preview_is_the_same_whatever_the_storage_orientation(tmp_path):
    volume = torch.randn(2, 10, 12, 14)
    ras = io.preview_image(volume, affine=io.make_affine((1.0, 1.0, 2.0), "RAS"))
    flipped = torch.flip(volume, dims=(1, 2))  # L→R and P→A reversed: the same anatomy stored as LPS
    lps = io.preview_image(flipped, affine=io.make_affine((1.0, 1.0, 2.0), "LPS"))
    assert np.array_equal(np.asarray(ras), np.asarray(lps))
    assert ras.height > 2 * 12  # two channels, one row each; 2 mm voxels drawn twice as tall as 1 mm ones


def test_save_preview_writes_png(tmp_path):
    path = io.save_preview(tmp_path / "p.png", torch.randn(1, 32, 32, 32))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height >= 32
    with pytest.raises(FileExistsError):
        io.save_preview(path, torch.randn(32, 32, 32))
    with pytest.raises(ValueError, match=r"\.png"):
        io.save_preview(tmp_path / "p.jpg", torch.randn(32, 32, 32))


def test_auto_window_handles_constant_volume():
    lo, hi = io.auto_window(np.full((4, 4, 4), 3.0))
    assert hi > lo
    image = io.preview_image(torch.full((8, 8, 8), 3.0))
    assert image.size[0] > 0


# --- JSON ----------------------------------------------------------------------------------------------------

def test_json_sidecar_round_trip_and_types(tmp_path):
    data = {"seed": np.int64(3), "seconds": np.float32(0.25), "shape": torch.Size([1, 32]),
            "dtype": torch.float16, "path": tmp_path, "values": np.arange(3)}
    path = io.write_json(tmp_path / "s.json", data)
    assert io.read_json(path) == {"seed": 3, "seconds": 0.25, "shape": [1, 32], "dtype": "torch.float16",
                                  "path": str(tmp_path), "values": [0, 1, 2]}
    with pytest.raises(ValueError, match="s2.json: cannot write as JSON"):
        io.write_json(tmp_path / "s2.json", {"x": float("nan")})
    with pytest.raises(ValueError, match="not JSON serialisable"):
        io.write_json(tmp_path / "s2.json", {"x": object()})
    assert not (tmp_path / "s2.json").exists()


def test_corrupt_json_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"a": ')
    with pytest.raises(io.FileReadError, match="bad.json: not valid JSON"):
        io.read_json(path)
    with pytest.raises(FileNotFoundError, match="none.json"):
        io.read_json(tmp_path / "none.json")


# --- provenance in the NIfTI header ----------------------------------------------------------------------------

def test_nifti_descrip_holds_the_description(tmp_path):
    text = io.sample_description("demo", 7, "dpmpp_2m", 20)
    assert text == f"pydiffmed {pydiffmed.__version__} demo seed 7 dpmpp_2m 20"
    io.save_volume(tmp_path / "v.nii.gz", torch.zeros(2, 2, 2), description=text)
    assert nib.load(str(tmp_path / "v.nii.gz")).header["descrip"].item() == text.encode()
    io.save_volume(tmp_path / "w.nii.gz", torch.zeros(2, 2, 2))  # no description: the field stays empty
    assert nib.load(str(tmp_path / "w.nii.gz")).header["descrip"].item() == b""


def test_description_fits_80_bytes_keeping_seed_solver_and_steps(tmp_path):
    seed = 2 ** 63 - 1
    text = io.sample_description("a-very-long-model-name-" * 5, seed, "dpmpp_2m_sde", 1000)
    assert len(text) == 80 and text.startswith(f"pydiffmed {pydiffmed.__version__} a-very-long-")
    assert text.endswith(f"... seed {seed} dpmpp_2m_sde 1000")
    odd = io.sample_description("Modèle\n2 (v1)", 3, "ddim", 50)  # printable ASCII only, one line
    assert odd.endswith("Mod?le?2_(v1) seed 3 ddim 50") and odd.isascii() and odd.isprintable()
    io.save_volume(tmp_path / "v.nii", torch.zeros(2, 2, 2), description="x" * 200)  # cut, not an error
    assert nib.load(str(tmp_path / "v.nii")).header["descrip"].item() == b"x" * 80
