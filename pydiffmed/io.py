"""Files in and out: NIfTI volumes (nibabel), NumPy arrays (`load_array`: measurements, read without
unpickling), PNG previews (Pillow) and JSON sidecars, every write atomic.

Axis convention: a volume tensor is (C, D, H, W) or (D, H, W); its three spatial axes are the NIfTI voxel axes
i, j, k in that order (the array is written as is, channels last when C > 1). `spacing` is the voxel size in mm
along those three axes and `orientation` a nibabel axis code naming the world direction each axis increases
toward: "RAS" = axis 0 toward the subject's Right, axis 1 Anterior, axis 2 Superior.

Intensity normalisation: a model works in normalised units; `intensity = {"scale": s, "offset": o, "clip":
[lo, hi] or None}` maps them to physical units as physical = normalised·s + o (then clipped to [lo, hi]), and
`normalize` inverts it for volumes read from disk. An optional "units" entry names the physical units ("HU":
Hounsfield units, which makes a DICOM series a CT series; see pydiffmed.dicom).

Atomic writes: every file is written to a temporary file in the destination directory, flushed to disk (fsync)
and renamed over the destination, so an interrupted write leaves the complete old file, the complete new file,
or (for a new file) nothing; `atomic_directory` does the same for a directory of files (a DICOM series). An
existing file is never replaced unless `overwrite=True`. A failed write (a full disk, an exception in the writer)
removes its temporary file; only a killed process can leave one behind (`.pdm-tmp-<hex>-<name>`, which
`pydiffmed sample` removes on its next run).

Deterministic files: the same volume written twice gives byte-identical files: nibabel (>= 5) gzips with
mtime 0 and no file name in the header, and the PNG previews carry no time or text chunks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import stat

import numpy as np
import torch

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_VOLUME_VOXELS = 1 << 31  # voxels (all channels) a file may claim: 8 GiB once read as float32
_GZIP_MAX_RATIO = 1032  # deflate's largest expansion: output bytes per compressed byte


class FileReadError(ValueError):
    """A file that exists but cannot be read as what it should be (corrupt, truncated, wrong format). The
    message starts with the file's path and says what is wrong."""


# --- atomic writes -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False):
    """Context manager yielding a temporary path next to `path` to write into; on a clean exit the temporary file
    is fsynced and renamed to `path`, on any exception (KeyboardInterrupt included) it is deleted and `path` is
    left as it was. Raises FileExistsError if `path` exists and overwrite is False (checked before and, where the
    filesystem supports hard links, atomically again at the rename). The temporary name ends with the final
    file name, so writers that pick a format from the extension (nibabel's `.nii.gz`) behave the same."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if not name:
        raise ValueError(f"{path!r} names a directory, not a file")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: directory {directory} does not exist")
    temporary = os.path.join(directory, f".pdm-tmp-{secrets.token_hex(6)}-{name}")
    # Created here (mode 0o666 less the umask, like any new file) so the writer only ever opens an existing path.
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:  # from here on, any failure (a full disk, Ctrl-C) removes the temporary file
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
        yield temporary
        os.chmod(temporary, mode)  # writers that replace the file (safetensors) would leave it 0o600
        _fsync_file(temporary)
        _publish(temporary, path, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _publish(temporary, path, overwrite):
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # fails if path appeared meanwhile: no check-then-rename race
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
    except OSError:  # filesystem without hard links
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
        os.replace(temporary, path)
        return
    os.unlink(temporary)


def _fsync_file(path):
    fd = os.open(path, os.O_RDWR)  # some platforms only flush descriptors open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory):
    """Make the rename itself durable; not every platform can open a directory, which is harmless."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(path, overwrite: bool = False):
    """`atomic_path` for a directory of files (a DICOM series): yields a new empty temporary directory next to
    `path` to fill with plain files; on a clean exit every file in it and the directory itself are fsynced and
    it is renamed to `path`; on any exception (KeyboardInterrupt included) it is deleted with its contents and
    `path` is left as it was. So `path` is never a half-written directory. An existing `path` (directory or
    file) raises FileExistsError unless overwrite=True; then it is first renamed to a temporary name, the new
    directory renamed into place and the old one deleted (a process killed between the two renames leaves `path`
    absent and the old one under `.pdm-tmp-<hex>-<name>`, which `pydiffmed sample` removes on its next run)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if not name or name in (".", ".."):
        raise ValueError(f"{path!r} must name a directory to create, without a trailing separator")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: directory {directory} does not exist")
    temporary = os.path.join(directory, f".pdm-tmp-{secrets.token_hex(6)}-{name}")
    os.mkdir(temporary)
    try:
        yield temporary
        for entry in sorted(os.listdir(temporary)):
            _fsync_file(os.path.join(temporary, entry))
        _fsync_directory(temporary)
        _publish_directory(temporary, path, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(directory)


def _remove_tree(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _publish_directory(temporary, path, overwrite):
    old = None
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        old = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".pdm-tmp-{secrets.token_hex(6)}-{os.path.basename(path)}")
        os.rename(path, old)
    try:
        os.rename(temporary, path)  # fails if a non-empty directory or a file appeared at `path` meanwhile
    except OSError as exc:
        if old is not None:  # put the old directory back and report why the new one could not take its place
            with contextlib.suppress(OSError):
                os.rename(old, path)
            raise
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from exc
        raise
    if old is not None:
        _remove_tree(old)


def directory_sha256(path) -> str:
    """sha256 identifying a directory of plain files (a DICOM series), as 64 hex digits: the hash of one line
    "<name> <sha256 of the file>" per file, in sorted name order. OSError if `path` is not a directory (a link to
    one counts as not) or holds anything but regular files."""
    import hashlib

    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: not a directory")
    digest = hashlib.sha256()
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if os.path.islink(full) or not os.path.isfile(full):
            raise OSError(f"{full}: not a regular file")
        file_digest = hashlib.sha256()
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(f"{entry} {file_digest.hexdigest()}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def write_bytes(path, data: bytes, overwrite: bool = False) -> str:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path, overwrite) as temporary:
        with open(temporary, "wb") as f:
            f.write(data)
    return os.fspath(path)


# --- JSON sidecars -----------------------------------------------------------------------------------------

def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json(path, data, overwrite: bool = False) -> str:
    """Write `data` as indented JSON (numpy/torch scalars, arrays, dtypes and paths converted) atomically. NaN and
    infinity are refused (they are not JSON). Returns the path."""
    try:
        text = json.dumps(data, indent=2, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)}: cannot write as JSON: {exc}") from exc
    return write_bytes(path, (text + "\n").encode("utf-8"), overwrite)


def jsonable(value):
    """`value` as its JSON round trip gives it back (tuples become lists, keys strings), so that it compares equal
    to what was written and read. TypeError/ValueError for a value that is not JSON."""
    return json.loads(json.dumps(value))


def read_json(path):
    """The JSON document in `path`. FileNotFoundError, or FileReadError naming the file and the problem."""
    path = _existing_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileReadError(f"{path}: not valid JSON ({exc})") from exc


def _existing_file(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, expected a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return path


# --- geometry ----------------------------------------------------------------------------------------------

def check_orientation(orientation) -> str:
    """A 3-letter axis code with one letter from each of L/R, A/P, S/I (e.g. "RAS", "LPS"), upper-cased."""
    from nibabel.orientations import axcodes2ornt

    if not isinstance(orientation, str) or len(orientation) != 3:
        raise ValueError(f"orientation must be a 3-letter axis code such as 'RAS', got {orientation!r}")
    code = orientation.upper()
    try:
        ornt = axcodes2ornt(tuple(code))
    except ValueError as exc:
        raise ValueError(f"orientation {orientation!r} is not a valid axis code ({exc})") from exc
    if np.isnan(ornt).any() or sorted(ornt[:, 0].astype(int)) != [0, 1, 2]:
        raise ValueError(f"orientation {orientation!r} must use one letter from each of L/R, A/P and S/I")
    return code


def _check_triple(name, value, positive=False):
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers, got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
    if positive and min(triple) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return triple


def make_affine(spacing=(1.0, 1.0, 1.0), orientation: str = "RAS", origin=None, shape=None) -> np.ndarray:
    """The 4×4 voxel-to-world affine (mm) of a volume whose spatial axes point along `orientation` with voxel
    sizes `spacing`. origin: world position of voxel (0, 0, 0); if None and `shape` (3 spatial sizes) is given,
    the volume is centred on the world origin, else voxel (0, 0, 0) sits at the origin."""
    from nibabel.orientations import axcodes2ornt

    spacing = _check_triple("spacing", spacing, positive=True)
    ornt = axcodes2ornt(tuple(check_orientation(orientation)))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for axis, (world_axis, sign) in enumerate(ornt):
        affine[int(world_axis), axis] = sign * spacing[axis]
    if origin is not None:
        affine[:3, 3] = _check_triple("origin", origin)
    elif shape is not None:
        centre = (np.asarray(_check_triple("shape", shape)) - 1.0) / 2.0
        affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def spacing_from_affine(affine) -> tuple:
    """Voxel sizes (mm) along the three spatial axes of a 4×4 affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def orientation_from_affine(affine) -> str:
    from nibabel.orientations import aff2axcodes

    codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    if None in codes:  # an axis that maps to no world direction (degenerate geometry)
        raise ValueError(f"affine has no orientation for every axis (axis codes {codes})")
    return "".join(codes)


def _check_affine(affine) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4×4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine is singular (its 3×3 part has zero determinant)")
    return affine


# --- intensity ---------------------------------------------------------------------------------------------

def check_intensity(intensity) -> dict | None:
    """Validate an intensity mapping {"scale", "offset", "clip", "units"}; None means identity. Returns a
    normalised dict (floats, clip a [lo, hi] list or None; "units", a short name such as "HU", only when given)."""
    if intensity is None:
        return None
    if not isinstance(intensity, dict):
        raise TypeError(f"intensity must be a dict with keys scale, offset, clip; got {type(intensity).__name__}")
    unknown = sorted(set(intensity) - {"scale", "offset", "clip", "units"})
    if unknown:
        raise ValueError(f"intensity: unknown key(s) {unknown}; allowed: scale, offset, clip, units")
    units = intensity.get("units")
    if units is not None and not (isinstance(units, str) and re.fullmatch(r"[A-Za-z0-9 /%^.*_-]{1,16}", units)):
        raise ValueError(f"intensity: units must be a short name such as 'HU' (1-16 letters, digits, spaces or "
                         f"/%^.*_-), got {units!r}")
    scale, offset = intensity.get("scale", 1.0), intensity.get("offset", 0.0)
    for name, value in (("scale", scale), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"intensity: {name} must be a finite number, got {value!r}")
    if scale == 0:
        raise ValueError("intensity: scale must be non-zero")
    clip = intensity.get("clip")
    if clip is not None:
        try:
            lo, hi = (float(v) for v in clip)
        except (TypeError, ValueError):
            raise ValueError(f"intensity: clip must be [lo, hi] or null, got {clip!r}") from None
        if not lo < hi:
            raise ValueError(f"intensity: clip must have lo < hi, got {clip!r}")
        clip = [lo, hi]
    checked = {"scale": float(scale), "offset": float(offset), "clip": clip}
    if units is not None:  # only when given: sidecars of models without units stay as they were
        checked["units"] = units
    return checked


def denormalize(volume, intensity):
    """Normalised model units → physical units: volume·scale + offset, clipped to `clip` when given."""
    intensity = check_intensity(intensity)
    if intensity is None:
        return volume
    out = volume * intensity["scale"] + intensity["offset"]
    if intensity["clip"] is not None:
        out = out.clip(*intensity["clip"])
    return out


def normalize(volume, intensity):
    """Physical units → normalised model units (inverse of `denormalize`; clipped to `clip` first)."""
    intensity = check_intensity(intensity)
    if intensity is None:
        return volume
    if intensity["clip"] is not None:
        volume = volume.clip(*intensity["clip"])
    return (volume - intensity["offset"]) / intensity["scale"]


# --- volumes -----------------------------------------------------------------------------------------------

def _volume_array(volume) -> np.ndarray:
    """(C, D, H, W) or (D, H, W) tensor/array → numpy array with the same shape (float64 for float64 input, else
    float32: large volumes are not doubled in memory), checked."""
    if isinstance(volume, torch.Tensor):
        wide = volume.dtype == torch.float64
        array = volume.detach().to("cpu", torch.float64 if wide else torch.float32).numpy()
    elif isinstance(volume, np.ndarray):
        if not (np.issubdtype(volume.dtype, np.floating) or np.issubdtype(volume.dtype, np.integer)
                or volume.dtype == np.bool_):
            raise TypeError(f"volume must hold numbers, got dtype {volume.dtype}")
        array = volume.astype(np.float64 if volume.dtype == np.float64 else np.float32)
    else:
        raise TypeError(f"volume must be a torch.Tensor or numpy array, got {type(volume).__name__}")
    if array.ndim not in (3, 4):
        raise ValueError(f"volume must be (C, D, H, W) or (D, H, W); got shape {tuple(array.shape)} "
                         f"(save one volume per file)")
    if array.size == 0:
        raise ValueError(f"volume is empty (shape {tuple(array.shape)})")
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ValueError(f"volume holds {bad} NaN/Inf value(s); refusing to write it")
    return array


def _is_nifti_name(path: str) -> bool:
    return path.lower().endswith(_NIFTI_SUFFIXES)


def header_text(text, limit: int = 80) -> str:
    """`text` as printable ASCII (anything else becomes '?') cut to `limit` characters: what fits a fixed-size
    header field such as NIfTI's 80-byte `descrip`."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(text))[:limit]


def sample_description(model, seed, solver, steps, limit: int = 80) -> str:
    """The provenance line written into a sampled volume's header: "pydiffmed <version> <model> seed <k> <solver>
    <steps>", at most `limit` printable ASCII characters; a model name too long to fit is shortened with "..."
    so that the seed, solver and steps always fit."""
    from . import __version__

    head, tail = f"pydiffmed {__version__} ", f" seed {seed} {header_text(solver)} {steps}"
    name = header_text(model, limit).replace(" ", "_")
    room = limit - len(head) - len(tail)
    if len(name) > room:
        name = name[:room - 3] + "..." if room >= 4 else ""
    return header_text(head + name + tail, limit)


def save_volume(path, volume, *, spacing=None, affine=None, orientation: str = "RAS", origin=None,
                intensity=None, dtype="float32", description=None, overwrite: bool = False) -> str:
    """Write one volume as NIfTI-1 (`.nii` or `.nii.gz`, gzip from the name) atomically; returns the path.

    volume: (C, D, H, W) or (D, H, W) tensor or array in normalised units (C > 1 is stored as a 4-D image,
    channels last). Geometry: either `affine` (4×4), or `spacing` (mm, default 1) + `orientation` + `origin`
    (default: volume centred on the world origin; see `make_affine`). intensity: mapping to physical units
    (see `denormalize`). dtype: stored data type, e.g. "float32" or "int16" (integers are rounded and clipped
    to the type's range). description: text for the header's 80-byte `descrip` field (see `header_text`;
    `pydiffmed sample` writes `sample_description`)."""
    import nibabel as nib

    path = os.fspath(path)
    if not _is_nifti_name(path):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    array = denormalize(_volume_array(volume), intensity)
    spatial = array.shape[-3:]
    if affine is not None:
        if spacing is not None or origin is not None:
            raise ValueError("give either affine or spacing/origin, not both")
        affine = _check_affine(affine)
    else:
        affine = make_affine((1.0, 1.0, 1.0) if spacing is None else spacing, orientation, origin, spatial)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        limits = np.iinfo(dtype)
        array = np.clip(np.rint(array), limits.min, limits.max)
    elif not np.issubdtype(dtype, np.floating):
        raise ValueError(f"dtype must be a float or integer type, got {dtype}")
    data = array.astype(dtype)
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
        if data.shape[-1] == 1:
            data = data[..., 0]
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=2)
    image.set_sform(affine, code=2)
    image.header.set_xyzt_units("mm")
    if description is not None:
        image.header["descrip"] = header_text(description).encode("ascii")
    with atomic_path(path, overwrite) as temporary:
        nib.save(image, temporary)
    return path


class VolumeInfo:
    """Geometry of a loaded volume: affine (4×4 float64), spacing (mm per axis), orientation (axis code),
    shape (C, D, H, W) and the source path."""

    def __init__(self, path, affine, shape):
        self.path = path
        self.affine = affine
        self.spacing = spacing_from_affine(affine)
        self.orientation = orientation_from_affine(affine)
        self.shape = tuple(shape)

    def __repr__(self):
        return (f"VolumeInfo({self.path!r}, shape={self.shape}, spacing={self.spacing}, "
                f"orientation={self.orientation!r})")


def load_volume(path, *, intensity=None, dtype=torch.float32):
    """Read a NIfTI (or any image nibabel reads) → (tensor (C, D, H, W) of `dtype`, VolumeInfo). A 3-D image has
    C = 1; a 4-D image's last axis is the channel axis. intensity: map physical units to normalised ones (see
    `normalize`). FileNotFoundError for a missing file; FileReadError naming the file for anything unreadable
    (not an image, truncated, corrupt compression, NaN/Inf voxels, more than 4 dimensions, degenerate geometry),
    and, before any voxel is read, for a header claiming more voxels than MAX_VOLUME_VOXELS or more data than
    the file can hold."""
    import nibabel as nib

    path = _existing_file(path)
    try:
        image = nib.load(path)
        _check_claimed_size(image, path)
        data = np.asarray(image.get_fdata(dtype=np.float64 if dtype == torch.float64 else np.float32))
        affine = image.affine
    except (FileReadError, MemoryError):
        raise
    except Exception as exc:  # nibabel raises many types for a bad file (ImageFileError, EOFError, zlib, ...)
        raise FileReadError(f"{path}: cannot read as a NIfTI volume ({type(exc).__name__}: {exc})") from exc
    if affine is None:
        raise FileReadError(f"{path}: the image has no affine (voxel-to-world geometry)")
    try:
        affine = _check_affine(affine)
        orientation_from_affine(affine)
    except ValueError as exc:
        raise FileReadError(f"{path}: unusable voxel-to-world geometry in the header ({exc})") from exc
    while data.ndim > 4 and data.shape[3] == 1:  # NIfTI keeps vector components in dim 5 (dim 4 = time = 1)
        data = data[:, :, :, 0]
    if data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    else:
        raise FileReadError(f"{path}: expected a 3-D or 4-D image, got shape {data.shape}")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise FileReadError(f"{path}: holds {bad} NaN/Inf voxel(s)")
    data = normalize(data, intensity)
    tensor = torch.from_numpy(np.ascontiguousarray(data)).to(dtype)
    return tensor, VolumeInfo(path, affine, tensor.shape)


def _check_claimed_size(image, path):
    """FileReadError, before the voxels are read, for a header whose size claim the file cannot back: no voxels,
    more than MAX_VOLUME_VOXELS, more bytes than an uncompressed file holds, or more than a gzip file could
    expand to (deflate expands at most ~1032:1)."""
    shape = tuple(int(n) for n in image.shape)
    voxels = math.prod(shape)
    if voxels == 0:
        raise FileReadError(f"{path}: cannot read as a NIfTI volume: the image holds no voxels (shape {shape})")
    if voxels > MAX_VOLUME_VOXELS:
        raise FileReadError(f"{path}: cannot read as a NIfTI volume: the header claims a {'×'.join(map(str, shape))} "
                            f"image ({voxels} voxels), more than pydiffmed reads ({MAX_VOLUME_VOXELS}); is the "
                            f"header damaged?")
    proxy = image.dataobj
    offset, stored = getattr(proxy, "offset", None), getattr(proxy, "dtype", None)
    file_holder = image.file_map.get("image")
    data_file = getattr(file_holder, "filename", None) or path
    if offset is None or stored is None or not os.path.isfile(data_file):
        return
    claimed, size = int(offset) + voxels * np.dtype(stored).itemsize, os.path.getsize(data_file)
    what = f"the header claims a {'×'.join(map(str, shape))} image of {np.dtype(stored)} ({claimed} bytes)"
    if data_file.lower().endswith(".gz"):
        if claimed > _GZIP_MAX_RATIO * size:
            raise FileReadError(f"{path}: cannot read as a NIfTI volume: {what}, more than a {size}-byte gzip "
                                f"file can hold; is the file truncated or its header damaged?")
    elif not data_file.lower().endswith((".bz2", ".zst")) and claimed > size:
        raise FileReadError(f"{path}: cannot read as a NIfTI volume: the file is truncated: {what}, but the "
                            f"file has {size} bytes")


# --- NumPy arrays (measurements) ---------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_NUMERIC_KINDS = "biufc"  # bool, integers, floats, complex


def _npy_header(stream, where):
    """(shape, fortran_order, dtype) from the header of a .npy stream, which is left at the start of the data;
    FileReadError for anything but a plain numeric array (object arrays can only be read by unpickling, so they are
    refused here, before numpy sees the data)."""
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except Exception as exc:  # numpy raises ValueError / SyntaxError / EOFError for a damaged header
        raise FileReadError(f"{where}: cannot read as a NumPy .npy array (damaged header: {exc})") from None
    if dtype.hasobject:
        raise FileReadError(f"{where}: the array holds Python objects (dtype {dtype}), which can only be read by "
                            f"unpickling, and pydiffmed never unpickles; save a numeric array "
                            f"(np.save(path, array, allow_pickle=False))")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in _NUMERIC_KINDS:
        raise FileReadError(f"{where}: expected a numeric array (bool, integer, float or complex), got dtype "
                            f"{dtype}")
    return tuple(int(s) for s in shape), bool(fortran_order), dtype


def _check_array_claim(where, shape, dtype, available, max_elements):
    count = math.prod(shape)
    if count > max_elements:
        raise FileReadError(f"{where}: the header claims a {'×'.join(map(str, shape))} array ({count} elements), "
                            f"more than pydiffmed reads ({max_elements}); is the header damaged?")
    if count * dtype.itemsize > available:
        raise FileReadError(f"{where}: the file is truncated: the header claims a {'×'.join(map(str, shape))} array "
                            f"of {dtype} ({count * dtype.itemsize} bytes), but it holds {available} bytes of data")
    return count * dtype.itemsize


def _read_npz_member(path, key, max_elements):
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FileReadError(f"{path}: cannot read as a NumPy .npz archive ({exc})") from None
    with archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        if key is None and len(names) != 1:
            raise FileReadError(f"{path}: the archive holds {len(names)} arrays ({', '.join(names) or 'none'}); it "
                                f"must hold exactly one")
        name = names[0] if key is None else key
        if name not in names:
            raise FileReadError(f"{path}: the archive holds no array named {name!r} (it holds "
                                f"{', '.join(names) or 'none'})")
        where = f"{path} (array {name!r})"
        info = archive.getinfo(name + ".npy")
        try:
            with archive.open(info) as member:
                shape, fortran_order, dtype = _npy_header(member, where)
                nbytes = _check_array_claim(where, shape, dtype, info.file_size, max_elements)
                data = member.read(nbytes)
        except FileReadError:
            raise
        except Exception as exc:  # zlib / zipfile errors of a damaged member
            raise FileReadError(f"{where}: cannot read ({type(exc).__name__}: {exc})") from None
    if len(data) != nbytes:
        raise FileReadError(f"{where}: the file is truncated ({len(data)} of {nbytes} bytes of data)")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def load_array(path, *, key=None, max_elements: int = MAX_VOLUME_VOXELS) -> np.ndarray:
    """Read one numeric array from a NumPy `.npy` file or a `.npz` archive, never unpickling (allow_pickle=False,
    and object arrays are refused from the header, before any data is read). A `.npz` must hold one array, or an
    array named `key`. The header's size claim is checked first (at most `max_elements` elements, no more bytes
    than the file holds). FileNotFoundError for a missing file; FileReadError naming the file otherwise (a pickle,
    not NumPy data, truncated, several arrays and no `key`, ...). Returns a C-contiguous native-byte-order array."""
    path = _existing_file(path)
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
        if head == _NPY_MAGIC:
            f.seek(0)
            shape, _, dtype = _npy_header(f, path)
            _check_array_claim(path, shape, dtype, os.path.getsize(path) - f.tell(), max_elements)
    if head[:1] == b"\x80":  # pickle protocol 2 and later start with PROTO
        raise FileReadError(f"{path}: the file is a Python pickle, and pydiffmed never unpickles; save the array "
                            f"with np.save(path, array, allow_pickle=False)")
    if head == _NPY_MAGIC:
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise FileReadError(f"{path}: cannot read the array ({type(exc).__name__}: {exc})") from None
    elif head[:4] == b"PK\x03\x04":
        array = _read_npz_member(path, key, max_elements)
    else:
        raise FileReadError(f"{path}: not a NumPy .npy or .npz file (save the array with np.save or np.savez)")
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False))


# --- previews ----------------------------------------------------------------------------------------------

def _to_ras(array, affine):
    """Reorient (C, X, Y, Z) data so its axes point to R, A, S; returns the data and the permuted spacing."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("R", "A", "S")))
    spacing = np.asarray(spacing_from_affine(affine))
    ras_spacing = np.empty(3)
    for axis, (target, _) in enumerate(transform):
        ras_spacing[int(target)] = spacing[axis]
    channels = [apply_orientation(channel, transform) for channel in array]
    return np.stack(channels), ras_spacing


def auto_window(array, low_percentile: float = 0.5, high_percentile: float = 99.5):
    """Display window (lo, hi) from intensity percentiles; a constant volume gets a unit-wide window."""
    lo, hi = np.percentile(array, [low_percentile, high_percentile])
    if not hi > lo:
        lo, hi = float(array.min()), float(array.max())
        if not hi > lo:
            hi = lo + 1.0
    return float(lo), float(hi)


def preview_image(volume, *, affine=None, spacing=None, window=None, zoom=None, gap: int = 4):
    """A PIL greyscale image of the axial, coronal and sagittal mid-slices side by side (one row per channel).

    The volume is first reoriented to RAS from `affine` (or `spacing` with RAS axes; default 1 mm isotropic), so
    the views are anatomical whatever the storage order: axial with anterior up, coronal and sagittal with
    superior up. Anisotropic voxels are shown at their physical aspect ratio. window: (lo, hi) mapped to black and
    white; default the 0.5–99.5 percentile range of each channel. zoom: display pixels per smallest voxel side
    (default: enough to make the largest panel side about 192 pixels)."""
    from PIL import Image

    array = _volume_array(volume)
    if array.ndim == 3:
        array = array[None]
    if affine is None:
        affine = make_affine((1.0, 1.0, 1.0) if spacing is None else spacing, "RAS")
    elif spacing is not None:
        raise ValueError("give either affine or spacing, not both")
    array, ras_spacing = _to_ras(array, _check_affine(affine))
    pixel = ras_spacing / ras_spacing.min()
    extent = np.asarray(array.shape[1:]) * pixel
    if zoom is None:
        zoom = max(1, int(round(192 / extent.max())))
    if not (isinstance(zoom, int) and zoom >= 1):
        raise ValueError(f"zoom must be a positive int, got {zoom!r}")
    rows = []
    for channel in array:
        lo, hi = auto_window(channel) if window is None else (float(window[0]), float(window[1]))
        if not hi > lo:
            raise ValueError(f"window must have lo < hi, got {window!r}")
        grey = np.clip((channel - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        x, y, z = (s // 2 for s in grey.shape)
        views = (  # (2-D slice with the horizontal axis first, the two RAS axes it spans)
            (grey[:, :, z], (0, 1)),  # axial: R-L horizontal, A up
            (grey[:, y, :], (0, 2)),  # coronal: S up
            (grey[x, :, :], (1, 2)),  # sagittal: A to the right, S up
        )
        panels = []
        for plane, (h_axis, v_axis) in views:
            picture = Image.fromarray(np.ascontiguousarray(plane.T[::-1]))
            size = (max(1, int(round(plane.shape[0] * pixel[h_axis] * zoom))),
                    max(1, int(round(plane.shape[1] * pixel[v_axis] * zoom))))
            panels.append(picture.resize(size, Image.NEAREST))
        rows.append(panels)
    width = max(sum(p.width for p in panels) + gap * (len(panels) - 1) for panels in rows)
    heights = [max(p.height for p in panels) for panels in rows]
    canvas = Image.new("L", (width, sum(heights) + gap * (len(rows) - 1)), 0)
    top = 0
    for panels, height in zip(rows, heights):
        left = 0
        for panel in panels:
            canvas.paste(panel, (left, top + (height - panel.height) // 2))
            left += panel.width + gap
        top += height + gap
    return canvas


def save_preview(path, volume, *, affine=None, spacing=None, window=None, zoom=None,
                 overwrite: bool = False) -> str:
    """Write `preview_image(volume, ...)` as a PNG atomically; returns the path."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"{path}: a preview file name must end in .png")
    image = preview_image(volume, affine=affine, spacing=spacing, window=window, zoom=zoom)
    with atomic_path(path, overwrite) as temporary:
        image.save(temporary, format="PNG")
    return path


__all__ = ["FileReadError", "VolumeInfo", "atomic_directory", "atomic_path", "auto_window", "check_intensity",
           "check_orientation", "denormalize", "directory_sha256", "header_text", "jsonable", "load_array",
           "load_volume", "make_affine", "normalize", "orientation_from_affine", "preview_image", "read_json",
           "sample_description", "save_preview", "save_volume", "spacing_from_affine", "write_bytes", "write_json"]
