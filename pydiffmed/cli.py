"""The `pydiffmed` command: sample volumes from a model, reconstruct MRI/CT measurements and detect anomalies
(pydiffmed/cli_inverse.py), convert MONAI checkpoints, list bundled models, time the machine, show backends.

    pydiffmed sample --model DIR --num 8 --batch 4 --solver dpmpp_2m --steps 20 --seed 0 --out samples/
    pydiffmed reconstruct --model DIR --kspace k.npy --mask mask.npy --out DIR    (or --sinogram s.npy --angles ...)
    pydiffmed anomaly --model DIR --input vol.nii.gz --out DIR
    pydiffmed convert --monai-checkpoint model.pt --monai-config config.json --out DIR    (or --monai-bundle DIR)
    pydiffmed models | bench | info

Bad input (unknown solver or model, impossible shape, unreadable volume, unwritable output, sizes that do not fit
memory, ...) is found before any work starts and reported as one line on stderr with exit status 2. An
unexpected error is one line naming its type (PYDIFFMED_DEBUG=1 shows the traceback). A run that fails or is interrupted
part way exits with status 1 (130 for Ctrl-C) and leaves only complete files (every write is atomic); rerun
it with --resume to finish it: a volume counts as done only when its sidecar (written last) parses, matches the
run and records the sha256 of its NIfTI (or DICOM series) and preview as they are on disk; anything else is
sampled again. A running `sample`, `reconstruct` or `anomaly` holds a lock on its output directory
(OUT/.pydiffmed.lock); a second run into it refuses at once. The pieces these three commands share live here, in
the section "shared by the commands that write into --out".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import functools
import importlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .ops._checks import dtype_name

if TYPE_CHECKING:  # annotations only: the command imports torch and the package lazily
    import numpy as np
    import torch

    from . import distributed, io, modelfile
    from .solvers import Solver

USAGE_ERROR = 2
RUN_ERROR = 1
INTERRUPTED = 130

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Bundled models the project ships once they are trained: named so that a missing one says so.
_PLANNED_BUNDLED = ("demo", "demo_healthy", "demo_latent")
_MAX_VOLUMES = 100_000  # --num: bounds the per-volume bookkeeping (names, files checked: seconds per 10⁵)
_DEBUG_ENV = "PYDIFFMED_DEBUG"  # set to 1: an unexpected error shows its traceback
_TEMP_PREFIX = ".pdm-tmp-"  # pydiffmed.io.atomic_path's temporary names: .pdm-tmp-<12 hex>-<final name>
_LOCK_NAME = ".pydiffmed.lock"  # held (flock) in the output directory by a running sample/reconstruct/anomaly
_MAX_SIDECAR_BYTES = 1 << 20
_OUTPUT_COMMANDS = ("sample", "reconstruct", "anomaly")  # the commands that write into --out (and lock it)
# Under torchrun a rank that finishes its share waits for the others (its final barrier) for up to this long.
_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2, before any work."""


def _one_line(message) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _error(message, code):
    world = os.environ.get("WORLD_SIZE", "1")
    rank = f"rank {os.environ.get('RANK')}: " if world.isdigit() and int(world) > 1 else ""  # under torchrun
    print(f"pydiffmed: error: {rank}{_one_line(message)}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with status 2."""

    def error(self, message):
        print(f"{self.prog}: error: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR)


@contextlib.contextmanager
def _one_line_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"pydiffmed: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


# --- shared argument checks ----------------------------------------------------------------------------------

def _device(text):
    import torch

    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r}: unknown device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UsageError(f"--device {text!r}: unsupported device type {device.type!r}; expected auto, cpu, cuda "
                         f"or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text!r}: no CUDA device is available on this machine (see `pydiffmed info`)")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _dtype(text, device):
    """auto: backends.auto_dtype (float16 on CUDA; bfloat16 on a CPU with native bf16, else float32)."""
    import torch

    from . import backends

    if text == "auto":
        try:
            return backends.auto_dtype(device)[0]
        except ValueError as exc:
            raise UsageError(f"--dtype auto: {exc}") from None
    return getattr(torch, _DTYPES[text])


def _check_count(name, value, minimum=1):
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")


def _check_seed(seed, num):
    """Volume k uses seed + k: every such seed must be a 64-bit Philox key; the command takes seeds >= 0."""
    if not 0 <= seed <= 2 ** 63 - num:
        raise UsageError(f"--seed {seed}: volume k uses seed + k, so --seed must lie in [0, 2**63 - {num}] for "
                         f"--num {num} (seeds are 64-bit Philox keys)")


def _bad_input_is_usage_error(prepare):
    """A library ValueError/TypeError raised while the command checks its input (before any work) is bad
    input: reported as a UsageError (exit status 2, one line)."""
    @functools.wraps(prepare)
    def checked(args):
        try:
            return prepare(args)
        except (ValueError, TypeError) as exc:
            raise UsageError(exc) from None
    return checked


def _check_triple(name, values, positive_int=False):
    if values is None:
        return None
    if positive_int and any(v < 1 for v in values):
        raise UsageError(f"{name} must be three positive sizes, got {' '.join(map(str, values))}")
    if not positive_int and not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{name} must be three positive voxel sizes (mm), got {' '.join(map(str, values))}")
    return tuple(values)


def _backends_for(device, dtype):
    """The backend dispatch picks for every registered op on this device and dtype (from the ops' declarations):
    a one-word summary when all agree, and the choice per op. A forced backend that cannot run them is a
    UsageError."""
    from . import backends

    try:
        chosen = {op: backends.choose(op, device=device, dtype=dtype) for op in backends.ops()}
    except (backends.BackendUnavailable, ValueError) as exc:
        raise UsageError(exc) from None
    names = sorted(set(chosen.values()))
    summary = names[0] if len(names) == 1 else ", ".join(f"{op}={name}" for op, name in chosen.items())
    return summary, chosen


def _model_problem(text, exc):
    """A ModelFileError turned into the message the command prints, naming a planned bundled model as such."""
    from . import modelfile

    bare = os.sep not in text and "/" not in text
    if bare and text in _PLANNED_BUNDLED and not os.path.exists(text) and text not in modelfile.bundled_models():
        return (f"--model {text}: the bundled model {text!r} is not installed (no weights under "
                f"{os.path.join(modelfile.MODELS_DIR, text)}); pass --model DIR or FILE.safetensors with a model "
                f"of your own, or `pydiffmed convert` a MONAI checkpoint")
    return f"--model {text}: {exc}"


# --- sample: validation --------------------------------------------------------------------------------------

def _read_volume(flag, path, intensity=None):
    """((C, D, H, W) tensor in model units, VolumeInfo) of an input volume, read in full now so that an
    unreadable file stops the run before it starts."""
    from . import io

    try:
        return io.load_volume(path, intensity=intensity)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _check_same_geometry(first, second):
    """Input volumes that are combined voxel by voxel must lie on the same grid: same voxel-to-world affine
    (within 1e-3 mm / 1e-5 relative; NIfTI stores it in float32)."""
    import numpy as np

    (flag_a, path_a, info_a), (flag_b, path_b, info_b) = first, second
    if not np.allclose(info_a.affine, info_b.affine, rtol=1e-5, atol=1e-3):
        def where(info):
            origin = ", ".join(f"{v:.4g}" for v in np.asarray(info.affine)[:3, 3])
            spacing = " × ".join(f"{v:.4g}" for v in info.spacing)
            return f"spacing {spacing} mm, orientation {info.orientation}, origin ({origin})"
        raise UsageError(f"{flag_b} {path_b}: its voxel-to-world affine differs from that of {flag_a} {path_a} "
                         f"({where(info_b)} vs {where(info_a)}); resample it onto the same grid")


def _check_input_shape(flag, volume, channels, shape, allow_one_channel=False):
    spatial = tuple(volume.shape[1:])
    wanted = {channels, 1} if allow_one_channel else {channels}
    if spatial != tuple(shape) or volume.shape[0] not in wanted:
        expect = f"{'1 or ' if allow_one_channel and channels != 1 else ''}{channels} channel(s) of {tuple(shape)}"
        raise UsageError(f"{flag}: the volume has {volume.shape[0]} channel(s) of {spatial}; the samples have "
                         f"{expect}")


def _solver(name, steps, schedule, info):
    from .solvers import SOLVERS, get_solver, names
    from .solvers.base import check_num_steps

    try:
        check_num_steps(schedule, steps)
    except ValueError as exc:
        raise UsageError(f"--steps {steps}: {exc}") from None

    samplers = names(plannable=True, encodes=False)  # what the command can run, by the solvers' declarations
    if name in SOLVERS and name not in samplers:
        raise UsageError(f"--solver {name}: {SOLVERS[name].unsupported('sample')}; the command samples with "
                         f"{', '.join(samplers)}")
    if name not in SOLVERS:
        raise UsageError(f"--solver {name!r}: unknown solver; available: {', '.join(samplers)}")
    options = {"prediction_type": info.prediction_type}
    if info.clip_sample is not None and SOLVERS[name].supports_clip:
        options["clip"] = info.clip_sample
        options.update(SOLVERS[name].plan_clip_options)  # the form of clipping the engine's plan runs
    try:
        solver = get_solver(name, schedule, steps, **options)
        solver.plan("cpu")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--solver {name}: {exc}") from None
    return solver, options


_FORMATS = {"nifti": ".nii.gz", "dicom": ""}  # --format: the volume's kind and suffix (dicom: a directory)


def _output_names(prefix, num, fmt="nifti"):
    width = max(4, len(str(num - 1)))
    return [{kind: f"{prefix}_{k:0{width}d}{suffix}" for kind, suffix in
             ((fmt, _FORMATS[fmt]), ("preview", ".png"), ("sidecar", ".json"))} for k in range(num)]


def _volume_kind(names):
    """The kind of a volume's main output in a names/paths dict: "nifti" (a file) or "dicom" (a directory)."""
    return "dicom" if "dicom" in names else "nifti"


def _check_output_format(job):
    """--format dicom: pydicom installed, one channel, a geometry DICOM can hold (UsageError otherwise)."""
    if job.args.format != "dicom":
        return
    from . import dicom

    try:
        dicom.require_pydicom()
    except ImportError as exc:
        raise UsageError(f"--format dicom: {exc}") from None
    if job.channels != 1:
        raise UsageError(f"--format dicom: the model makes {job.channels}-channel volumes and a DICOM series holds "
                         f"one channel; use --format nifti")
    try:
        dicom.check_geometry(job.affine, job.shape)
    except ValueError as exc:
        raise UsageError(f"--format dicom: {exc}") from None


def _check_out_dir(out):
    """The output directory may not exist yet: then its nearest existing ancestor must be a writable directory."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out}: exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: the directory is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: cannot create the directory: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create the directory: {parent} is not writable")


def _run_key(sidecar):
    """The sidecar entries that must agree for --resume to count a volume as part of this run."""
    keys = ("model_sha256", "solver", "solver_options", "steps", "seed", "dtype", "shape", "affine", "intensity",
            "guidance_scale", "class_label", "uncond_class_label", "strength", "init_sha256", "mask_sha256",
            "known_sha256", "feature_cache", "cache_branch")
    key = {key: sidecar.get(key) for key in keys}
    key["format"] = sidecar.get("format", "nifti")  # sidecars before --format existed describe NIfTI runs
    latent = sidecar.get("latent")  # a latent model's autoencoder and scale (decode tiling changes no voxel)
    if isinstance(latent, dict):
        key["latent"] = {k: latent.get(k) for k in ("autoencoder_sha256", "scale_factor", "latent_shape")}
    return key


def _plan_outputs(job, args):
    """Which volumes to sample: all of them, or with --resume those without complete, intact outputs (a damaged
    set is counted in job.damaged and sampled again). Raises UsageError for outputs in the way (without
    --overwrite/--resume) or complete ones from a different run."""
    from . import io

    job.pending, job.skipped, job.damaged = [], [], []
    for k, names in enumerate(job.names):
        paths = {kind: os.path.join(job.out, name) for kind, name in names.items()}
        present = [p for p in paths.values() if os.path.lexists(p)]
        for kind, path in paths.items():
            if kind != "dicom" and os.path.isdir(path) and not os.path.islink(path):
                raise UsageError(f"{path} is a directory where an output file goes; move it or use another --out")
        kind = _volume_kind(paths)  # the other --format's volume must not be there: it would be left stale
        other = paths[kind] + _FORMATS["nifti"] if kind == "dicom" else paths[kind][:-len(_FORMATS["nifti"])]
        if os.path.isdir(other) if kind == "nifti" else os.path.lexists(other):
            raise UsageError(f"{other} is the output of a run with another --format; use another --out or "
                             f"--prefix, or remove it")
        if not present:
            job.pending.append(k)
            continue
        if args.overwrite:
            job.pending.append(k)
            continue
        if not args.resume:
            others = sum(os.path.lexists(os.path.join(job.out, name)) for n in job.names for name in n.values())
            raise UsageError(f"{present[0]} already exists ({others} output file(s) of this run exist in "
                             f"{job.out}); pass --overwrite to replace them or --resume to keep complete volumes "
                             f"and sample the rest")
        if len(present) == len(paths):
            sidecar = _read_sidecar(paths["sidecar"])
            if isinstance(sidecar, dict):
                expected = io.jsonable(_run_key(_provenance(job, k)))
                found = _run_key(sidecar)
                if found != expected:
                    differ = [key for key in expected if found[key] != expected[key]]
                    raise UsageError(f"--resume: {paths['sidecar']} was made with different settings "
                                     f"({', '.join(differ)}); use a new --out, or --overwrite")
            problem = _damage(paths, sidecar)
            if problem is None:
                job.skipped.append(k)
                continue
            job.damaged.append(k)
            warnings.warn(f"--resume: volume {k} is damaged ({problem}); sampling it again")
        job.pending.append(k)  # incomplete or damaged: sampled again, its leftover files replaced


def _regular_file(path):
    return os.path.isfile(path) and not os.path.islink(path)


def _read_sidecar(path):
    """The sidecar's JSON document, or None when it is not a readable regular file of JSON (never follows a
    link, never reads more than _MAX_SIDECAR_BYTES)."""
    if not _regular_file(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_SIDECAR_BYTES + 1)
        if len(data) > _MAX_SIDECAR_BYTES:
            return None
        return json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def _output_sha256(kind, path):
    """sha256 of an output: of the file, or for a DICOM series directory io.directory_sha256."""
    from . import io, modelfile

    return io.directory_sha256(path) if kind == "dicom" else modelfile.file_sha256(path)


def _damage(paths, sidecar):
    """Why a volume's three outputs are not an intact set (None when they are): each must be a regular file, the
    sidecar JSON, and the NIfTI and preview must have the sha256 the sidecar records (written last, when both
    were complete). A sidecar without hashes (an older pydiffmed) needs a NIfTI that loads with the sidecar's
    shape and a PNG that decodes. A DICOM series is a directory of regular files with the sidecar's
    io.directory_sha256."""
    from PIL import Image

    from . import io

    volume_kind = _volume_kind(paths)
    for kind, path in paths.items():
        if kind == "dicom" and (os.path.islink(path) or not os.path.isdir(path)):
            return f"{path} is not a directory"
        if kind != "dicom" and not _regular_file(path):
            return f"{path} is not a regular file"
    if not isinstance(sidecar, dict):
        return f"{paths['sidecar']} is not a readable sidecar"
    hashes = sidecar.get("files_sha256")
    if hashes is None and volume_kind == "dicom":
        return f"{paths['sidecar']} records no sha256 of {paths['dicom']}"
    if hashes is not None:
        for kind in (volume_kind, "preview"):
            try:
                digest = _output_sha256(kind, paths[kind])
            except OSError as exc:
                return f"{paths[kind]}: {exc.strerror or exc}"
            if not isinstance(hashes, dict) or hashes.get(kind) != digest:
                return f"{paths[kind]} does not match the sha256 in its sidecar"
        return None
    try:
        volume, _ = io.load_volume(paths["nifti"])
    except (OSError, ValueError) as exc:
        return _one_line(exc)
    if list(volume.shape) != sidecar.get("shape"):
        return f"{paths['nifti']} has shape {list(volume.shape)}, its sidecar says {sidecar.get('shape')}"
    try:
        with Image.open(paths["preview"]) as image:
            image.load()
    except Exception as exc:  # Pillow raises many types for a bad file
        return f"{paths['preview']} does not decode as an image ({type(exc).__name__})"
    return None


@dataclass
class _Inputs:
    """The input volumes of a run, read in full and checked against each other: SDEdit's init, inpainting's
    mask and known volume, and `source`: the VolumeInfo of the one the outputs overlay (init, else known)."""
    init: Optional["torch.Tensor"] = None
    mask: Optional["torch.Tensor"] = None
    known: Optional["torch.Tensor"] = None
    source: Optional["io.VolumeInfo"] = None


def _check_counts(args):
    _check_count("--num", args.num)
    if args.num > _MAX_VOLUMES:
        raise UsageError(f"--num {args.num}: at most {_MAX_VOLUMES} volumes per run (split the work into runs with "
                         f"--seed and --prefix)")
    _check_seed(args.seed, args.num)
    _check_count("--batch", args.batch)
    _check_count("--steps", args.steps)


def _check_option_pairs(args):
    """Options that need, or exclude, each other; the output prefix."""
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.strength is not None and args.init is None:
        raise UsageError("--strength goes with --init (the volume SDEdit starts from)")
    if args.init is not None and args.strength is None:
        raise UsageError("--init needs --strength (the noise level to start from, in (0, 1])")
    if (args.mask is None) != (args.known is None):
        raise UsageError("inpainting needs both --mask and --known")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise UsageError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    _check_feature_cache(args)
    _check_prefix(args.prefix)


def _check_feature_cache(args):
    if args.feature_cache is not None and args.feature_cache < 1:
        raise UsageError(f"--feature-cache must be >= 1 (one full model evaluation every N evaluations, shallow ones "
                         f"between; 1 = every evaluation full), got {args.feature_cache}")
    if args.cache_branch is not None and args.feature_cache is None:
        raise UsageError("--cache-branch goes with --feature-cache N")
    if args.cache_branch is not None and args.cache_branch < 0:
        raise UsageError(f"--cache-branch must be >= 0 (a skip connection of the UNet, 0 = the shallowest), got "
                         f"{args.cache_branch}")
    if args.feature_cache is not None and args.spatial_parallel:
        raise UsageError("--feature-cache does not work with --spatial-parallel yet (the deep features of a "
                         "slab-split UNet are not cached)")


def _check_prefix(prefix):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        raise UsageError(f"--prefix {prefix!r}: use letters, digits, '_', '.', '-' (not starting with '.')")


def _load_model(args, latent_ok=False):
    """(model, schedule, ModelInfo) of --model, a 3-D model the command line can condition (a latent model only
    where latent_ok: `sample` decodes latents, the other commands work on images)."""
    from . import modelfile

    try:
        model, schedule, info = modelfile.load_model(args.model)
    except modelfile.ModelFileError as exc:
        raise UsageError(_model_problem(args.model, exc)) from None
    if info.is_latent and not latent_ok:
        raise UsageError(f"--model {args.model}: a latent model (its UNet samples an autoencoder's latents); this "
                         f"command works on images: use a model without an autoencoder")
    if info.unet.get("spatial_dims", 3) != 3:
        raise UsageError(f"--model {args.model}: a {info.unet.get('spatial_dims')}-D model; the command samples 3-D "
                         f"volumes")
    if info.unet.get("with_conditioning"):
        raise UsageError(f"--model {args.model}: the model needs a cross-attention context, which the command "
                         f"line cannot provide; sample it from Python (pydiffmed.sample(..., cond={{'context': "
                         f"...}}))")
    return model, schedule, info


def _load_autoencoder(args, info):
    """The autoencoder of a latent --model (None for other models), after checking the options that cannot go
    with one and the decode options."""
    from . import modelfile

    if not info.is_latent:
        if args.decode_tile is not None or args.decode_max_memory is not None:
            raise UsageError(f"--decode-tile/--decode-max-memory: the model {info.name!r} is not a latent model "
                             f"(it has no autoencoder)")
        return None
    for flag, value in (("--init", args.init), ("--mask", args.mask), ("--known", args.known)):
        if value is not None:
            raise UsageError(f"{flag}: the model {info.name!r} is a latent model, whose UNet samples latents; "
                             f"SDEdit and inpainting from image volumes are not supported for it")
    if args.spatial_parallel:
        raise UsageError(f"--spatial-parallel: the model {info.name!r} is a latent model; share out volumes "
                         f"instead (torchrun without --spatial-parallel)")
    if args.decode_tile is not None and args.decode_tile < 1:
        raise UsageError(f"--decode-tile must be a positive number of rows, got {args.decode_tile}")
    if args.decode_tile is not None and args.decode_max_memory == "auto":
        raise UsageError("--decode-max-memory auto picks the slabs itself: drop --decode-tile")
    try:
        return modelfile.load_autoencoder(args.model)
    except modelfile.ModelFileError as exc:
        raise UsageError(_model_problem(args.model, exc)) from None


def _memory_size(text):
    """--decode-max-memory: bytes, or a number with K, M, G or T (powers of 1024; an optional "iB" or "B"), or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 2G, 512M or 1000000 (bytes), or auto, got {text!r}")
    size = int(float(match[1]) * 1024 ** " kmgt".index(match[2].lower() or " "))
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return size


def _read_inputs(args, info) -> _Inputs:
    inputs = _Inputs()
    if args.init is not None:
        inputs.init, inputs.source = _read_volume("--init", args.init, info.intensity)
    if args.mask is not None:
        inputs.mask, mask_info = _read_volume("--mask", args.mask)
        inputs.known, known_info = _read_volume("--known", args.known, info.intensity)
        _check_same_geometry(("--known", args.known, known_info), ("--mask", args.mask, mask_info))
        if inputs.source is not None:
            _check_same_geometry(("--known", args.known, known_info), ("--init", args.init, inputs.source))
        inputs.source = inputs.source or known_info
        low, high = float(inputs.mask.min()), float(inputs.mask.max())
        if low < 0.0 or high > 1.0:
            raise UsageError(f"--mask {args.mask}: values must lie in [0, 1] (1 where --known is kept), found "
                             f"[{low:g}, {high:g}]")
    return inputs


def _volume_shape(args, info, shape_override, inputs) -> tuple:
    """The spatial size to sample: --shape, else the model's, else that of the input volumes; one the model's
    levels divide, and that of every input volume."""
    source = inputs.source
    shape = shape_override or info.volume_shape or (source.shape[1:] if source is not None else None)
    if shape is None:
        raise UsageError(f"--model {args.model}: the model stores no volume shape; pass --shape D H W")
    shape = tuple(int(s) for s in shape)
    _check_divisible("--shape", shape, info)
    if inputs.init is not None:
        _check_input_shape("--init", inputs.init, info.channels, shape)
    if inputs.known is not None:
        _check_input_shape("--known", inputs.known, info.channels, shape)
        _check_input_shape("--mask", inputs.mask, info.channels, shape, allow_one_channel=True)
    return shape


def _check_divisible(flag, shape, info):
    """Every size of a volume shape must be divisible by 2**(levels - 1): the model halves it at each level."""
    factor = 2 ** (len(info.unet.get("channels", (32, 64, 64, 64))) - 1) * info.downsampling  # × the autoencoder's
    if any(s % factor for s in shape):
        raise UsageError(f"{flag} {' '.join(map(str, shape))}: every size must be divisible by {factor} (the "
                         f"model halves each spatial size {factor.bit_length() - 1} time(s))")


def _check_conditioning(args, info):
    """--class-label, --uncond-class-label and --guidance-scale against the model's classes."""
    num_classes = info.unet.get("num_class_embeds")
    if num_classes is None and (args.class_label is not None or args.uncond_class_label is not None):
        raise UsageError(f"--class-label: the model {info.name!r} is not class-conditional")
    if num_classes is not None:
        if args.class_label is None:
            raise UsageError(f"--model {args.model}: the model is class-conditional ({num_classes} classes); pass "
                             f"--class-label")
        for flag, label in (("--class-label", args.class_label), ("--uncond-class-label", args.uncond_class_label)):
            if label is not None and not 0 <= label < num_classes:
                raise UsageError(f"{flag} {label}: the model has classes 0..{num_classes - 1}")
    if args.guidance_scale is not None:
        if num_classes is None:
            raise UsageError(f"--guidance-scale: the model {info.name!r} has no condition to guide (it is not "
                             f"class-conditional)")
        if args.uncond_class_label is None:
            raise UsageError("--guidance-scale needs --uncond-class-label: the class index the model was trained "
                             "with as 'no class'")
    elif args.uncond_class_label is not None:
        raise UsageError("--uncond-class-label is only used with --guidance-scale")


def _output_affine(info, spacing, shape, inputs):
    if inputs.source is not None and spacing is None:
        return inputs.source.affine  # an output derived from an input volume overlays it
    return info.affine(shape=shape, spacing=spacing)


def _input_hashes(args) -> dict:
    from . import modelfile

    return {name: (modelfile.file_sha256(path) if path is not None else None)
            for name, path in (("init", args.init), ("mask", args.mask), ("known", args.known))}


@dataclass
class _Job:
    """Everything `sample` needs, checked (built by _prepare_sample from the validators above), used by
    _run_sample. pending/skipped/damaged are the output plan (_plan_outputs); model, samplers and start_eval
    are set once the plan says which batch sizes are needed; lock is the output directory's _OutputLock."""
    args: argparse.Namespace
    info: "modelfile.ModelInfo"
    device: "torch.device"
    dtype: "torch.dtype"
    backend: str                  # the backend summary (one name when every op agrees)
    backends: dict                # op -> backend
    solver: "Solver"
    solver_options: dict
    shape: tuple                  # spatial
    channels: int
    out: str                      # absolute output directory
    names: list                   # per volume: {kind: file name}
    affine: "np.ndarray"
    init: Optional["torch.Tensor"]
    mask: Optional["torch.Tensor"]
    known: Optional["torch.Tensor"]
    hashes: dict                  # sha256 of the input volume files (None where not given)
    version: str
    pending: list = field(default_factory=list)   # volume indices to sample
    skipped: list = field(default_factory=list)   # complete volumes kept (--resume)
    damaged: list = field(default_factory=list)   # damaged volumes sampled again (--resume)
    model: Optional["torch.nn.Module"] = None
    samplers: dict = field(default_factory=dict)  # batch size -> Sampler
    start_eval: Optional[int] = None  # SDEdit: the first model evaluation run, of the full run's evaluations
    lock: Optional[_OutputLock] = None
    world: "distributed.World" = None   # this process's place under torchrun (World(): alone)
    all_pending: list = field(default_factory=list)  # every rank's pending volumes (pending: this rank's share)
    autoencoder: Optional["torch.nn.Module"] = None  # a latent model's: decodes what the samplers return


def _sampled_shape(job) -> tuple:
    """(channels, *spatial) of what the samplers sample: a latent model's latents, else the volumes."""
    return job.info.latent_shape(job.shape) if job.autoencoder is not None else (job.channels, *job.shape)


def _decode(job, sampled):
    """The volumes of a batch the sampler returned: decoded by a latent model's autoencoder."""
    if job.autoencoder is None:
        return sampled
    from .latent import decode_latents

    return decode_latents(job.autoencoder, sampled, job.info.scale_factor, tile=job.args.decode_tile,
                          max_memory=job.args.decode_max_memory)


def _latent_fields(job) -> dict:
    """The sidecar entry of a latent model's volume: what was sampled and how it was decoded."""
    if job.autoencoder is None:
        return {}
    info = job.info
    return {"latent": {"autoencoder_sha256": info.autoencoder.get("weights_sha256"),
                       "scale_factor": info.scale_factor, "latent_shape": list(_sampled_shape(job)),
                       "decode_tile": job.args.decode_tile, "decode_max_memory": job.args.decode_max_memory}}


def _join_world(args, device):
    """(World, device) of this process. Under torchrun: joins the job's process group (gloo for the CPU, NCCL for
    CUDA) and takes the rank's own GPU (cuda:LOCAL_RANK) for a CUDA device given without an index."""
    import torch

    from . import distributed

    try:
        world = distributed.world_from_env()
    except RuntimeError as exc:
        raise UsageError(exc) from None
    if args.spatial_parallel and world.world_size < 2:
        raise UsageError("--spatial-parallel splits every volume across the processes of a torchrun job; start the "
                         "command with `torchrun --nproc-per-node N -m pydiffmed sample ...` (N >= 2)")
    if not world.distributed:
        return world, device
    if device.type == "cuda" and not re.fullmatch(r"cuda:\d+", args.device):
        device = torch.device("cuda", world.local_rank)
    distributed.init_process_group(world, device, timeout_s=_COLLECTIVE_TIMEOUT_S)
    return world, device


def _share_outputs(job):
    """Under torchrun every rank takes rank 0's output plan (one look at the directory), then its share of the
    volumes: volume k is sampled by rank k mod world_size (data parallel), or by all ranks together, each holding
    a depth slab (--spatial-parallel)."""
    from . import distributed

    plan = distributed.broadcast_object((job.pending, job.skipped, job.damaged), job.world)
    job.pending, job.skipped, job.damaged = (list(part) for part in plan)
    job.all_pending = list(job.pending)
    if not job.args.spatial_parallel:
        job.pending = job.world.share(job.pending)


def _build_samplers(job):
    """({batch size: Sampler} for the batches of job.pending, SDEdit's start_eval or None). A run that does not
    fit memory is a UsageError naming --batch."""
    from .engine import Sampler
    from .memory import InsufficientMemoryError

    args = job.args
    samplers, start_eval = {}, None
    for size in sorted({min(args.batch, len(job.pending) - start) for start in range(0, len(job.pending),
                                                                                   args.batch)}):
        options = dict(device=job.device, dtype=job.dtype, guidance_scale=args.guidance_scale,
                       strength=args.strength, batch_invariant=args.batch_invariant,
                       feature_cache=args.feature_cache, cache_branch=args.cache_branch)
        try:
            if args.spatial_parallel:
                from .spatial_parallel import SpatialSampler

                samplers[size] = SpatialSampler(job.model, job.solver, (size, *_sampled_shape(job)), **options)
            else:
                samplers[size] = Sampler(job.model, job.solver, (size, *_sampled_shape(job)),
                                         cuda_graph=not args.eager, **options)
            if job.autoencoder is not None:
                from .latent import check_decode_memory

                check_decode_memory(job.autoencoder, (size, *_sampled_shape(job)), tile=args.decode_tile,
                                    max_memory=args.decode_max_memory)
        except InsufficientMemoryError as exc:
            raise UsageError(f"--batch {args.batch} of {'×'.join(map(str, job.shape))} volumes: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise UsageError(exc) from None
    if args.strength is not None and samplers:
        sampler = next(iter(samplers.values()))
        sampler = getattr(sampler, "sampler", sampler)  # a SpatialSampler's own Sampler (of its slab)
        evals = job.solver.num_model_evals
        start_eval = evals - (sampler.num_model_evals - sampler.start_index)  # of the full run's evaluations
        if evals - start_eval != int(evals * args.strength):
            warnings.warn(f"--strength {args.strength:g}: {args.solver} can only start at model evaluation "
                          f"{start_eval} of {evals} (a multi-stage solver), so the effective strength is "
                          f"{(evals - start_eval) / evals:g}; a solver taking one model evaluation per "
                          f"step starts where the strength asks")
    return samplers, start_eval


@_bad_input_is_usage_error
def _prepare_sample(args):
    """Check every argument and input, load the model and build the samplers; raises UsageError. Writes
    nothing."""
    import pydiffmed

    _check_counts(args)
    _check_option_pairs(args)
    spacing = _check_triple("--spacing", args.spacing)
    shape_override = _check_triple("--shape", args.shape, positive_int=True)
    device = _device(args.device)
    world, device = _join_world(args, device)
    dtype = _dtype(args.dtype, device)
    backend, chosen = _backends_for(device, dtype)
    model, schedule, info = _load_model(args, latent_ok=True)
    autoencoder = _load_autoencoder(args, info)
    inputs = _read_inputs(args, info)
    shape = _volume_shape(args, info, shape_override, inputs)
    _check_conditioning(args, info)
    solver, solver_options = _solver(args.solver, args.steps, schedule, info)
    out = os.path.abspath(args.out)
    _check_out_dir(out)

    job = _Job(args=args, info=info, device=device, dtype=dtype, backend=backend, backends=chosen, solver=solver,
               solver_options=solver_options, shape=shape, channels=info.channels, out=out,
               names=_output_names(args.prefix, args.num, args.format),
               affine=_output_affine(info, spacing, shape, inputs), init=inputs.init, mask=inputs.mask,
               known=inputs.known, hashes=_input_hashes(args), version=pydiffmed.__version__, world=world,
               autoencoder=autoencoder)
    _check_output_format(job)
    _plan_outputs(job, args)
    _share_outputs(job)
    job.model = model.to(device=device, dtype=dtype)
    if autoencoder is not None:
        job.autoencoder = autoencoder.to(device=device, dtype=dtype)
    job.samplers, job.start_eval = _build_samplers(job)
    return job


def _cache_branch(job):
    """The cache branch the samplers use with --feature-cache (the default resolved), else None."""
    sampler = next(iter(job.samplers.values()), None)
    return getattr(sampler, "cache_branch", None)


def _full_model_evals(job):
    """How many of a volume's model evaluations ran the whole network (fewer with --feature-cache)."""
    sampler = next(iter(job.samplers.values()), None)
    if sampler is None or not hasattr(sampler, "cache_schedule"):
        return None
    return sum(kind != "shallow" for kind in sampler.cache_schedule())


def _provenance(job, k):
    """The sidecar of volume k, less the timing (filled in once it is sampled)."""
    import torch

    from . import io

    args, info = job.args, job.info
    return {
        "pydiffmed_version": job.version,
        "index": k,
        "seed": args.seed + k,
        "base_seed": args.seed,
        **_model_fields(info),
        "solver": args.solver,
        "solver_options": job.solver_options,
        "steps": args.steps,
        "num_model_evals": job.solver.num_model_evals,
        **_runtime_fields(job.device, job.dtype, job.backend, job.backends, args.dtype),
        "cuda_graph": job.device.type == "cuda" and not args.eager and not args.spatial_parallel,
        "batch_invariant": args.batch_invariant,
        "feature_cache": args.feature_cache,
        "cache_branch": _cache_branch(job),
        "full_model_evals": _full_model_evals(job),
        "world_size": job.world.world_size,
        "rank": None if args.spatial_parallel else job.world.rank,  # the rank that sampled it (data parallel)
        "spatial_parallel": args.spatial_parallel,
        "shape": [job.channels, *job.shape],
        **_latent_fields(job),
        "spacing": list(io.spacing_from_affine(job.affine)),
        "orientation": io.orientation_from_affine(job.affine),
        "affine": [list(map(float, row)) for row in job.affine],
        "intensity": info.intensity,
        "guidance_scale": args.guidance_scale,
        "class_label": args.class_label,
        "uncond_class_label": args.uncond_class_label,
        "init": None if args.init is None else os.path.abspath(args.init),
        "init_sha256": job.hashes["init"],
        "strength": args.strength,
        "start_eval": job.start_eval,
        "mask": None if args.mask is None else os.path.abspath(args.mask),
        "mask_sha256": job.hashes["mask"],
        "known": None if args.known is None else os.path.abspath(args.known),
        "known_sha256": job.hashes["known"],
        "format": args.format,
        "files": {kind: job.names[k][kind] for kind in (_volume_kind(job.names[k]), "preview")},
        "torch_version": torch.__version__,
    }


# --- sample: the run -----------------------------------------------------------------------------------------

class _OutputLock:
    """An exclusive lock on an output directory, held by one run of a command that writes into --out (`sample`,
    `reconstruct`, `anomaly`) from before it reads the directory until it ends, so that two runs never write into
    one directory at once: the second refuses at once (exit 2). It is an flock on OUT/.pydiffmed.lock, which holds
    the owner's pid and command and is removed when the run ends; a killed run's flock dies with it and its stale
    file is reused. No-op where fcntl is missing."""

    def __init__(self, command="sample"):
        self.fd = self.path = None
        self.command = command

    def acquire(self, out):
        """Take the lock if `out` is an existing directory and the lock is not held yet; True if held after."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return True
        if self.fd is not None:
            return True
        if not os.path.isdir(out):
            return False
        path = os.path.join(out, _LOCK_NAME)
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileNotFoundError:  # the directory went away meanwhile
                return False
            except OSError as exc:
                problem = ("the directory is not writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                           else "cannot lock the directory")
                raise UsageError(f"--out {out}: {problem} (cannot create {_LOCK_NAME}: {exc.strerror or exc})") \
                    from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    owner = os.read(fd, 64).decode("ascii", "replace").split()
                finally:
                    os.close(fd)
                pid = owner[0] if owner else "unknown"
                command = owner[1] if len(owner) > 1 and owner[1] in _OUTPUT_COMMANDS else "run"
                raise UsageError(f"another pydiffmed {command} is writing to {out} (pid {pid}); wait for it to "
                                 f"finish or use another --out") from None
            try:  # the owner before us may have removed the file between our open and our flock: then retry
                current = os.stat(path, follow_symlinks=False)
                mine = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.path = fd, path
                with contextlib.suppress(OSError):  # the pid is informative only (a full disk cannot store it)
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {self.command}\n".encode())
                return True
            os.close(fd)
        raise UsageError(f"--out {out}: could not lock the directory ({_LOCK_NAME} keeps changing)")

    def release(self):
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still holding the flock: a run that opened the old file notices and retries
        os.close(self.fd)
        self.fd = self.path = None


def _remove_leftover_temporaries(out, ours):
    """Delete temporary files in `out` that interrupted writes of the outputs named `ours` left behind (a killed
    run's; the directory lock makes sure no other run is writing them)."""
    ours = set(ours)
    pattern = re.compile(re.escape(_TEMP_PREFIX) + r"[0-9a-f]+-(.+)\Z")
    removed = 0
    for entry in os.listdir(out):
        match = pattern.match(entry)
        if match and match.group(1) in ours:
            path = os.path.join(out, entry)
            if os.path.isdir(path) and not os.path.islink(path):  # a DICOM series' temporary directory
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
    return removed


def _batch_inputs(job, indices):
    import torch

    size = len(indices)
    kwargs = {}
    args = job.args
    if args.class_label is not None:
        kwargs["cond"] = {"class_labels": torch.full((size,), args.class_label, dtype=torch.long,
                                                     device=job.device)}
        if args.guidance_scale is not None:
            kwargs["uncond"] = {"class_labels": torch.full((size,), args.uncond_class_label, dtype=torch.long,
                                                           device=job.device)}
    if job.init is not None:
        kwargs["init"] = job.init[None].to(job.device)
    if job.mask is not None:
        kwargs["mask"] = job.mask[None].to(job.device)
        kwargs["known"] = job.known[None].to(job.device)
    return kwargs


def _write_volume(job, k, volume, seconds, overwrite):
    """Write volume k's NIfTI, preview and sidecar (last: it marks the set complete and records the sha256 of
    the other two). Nothing is written for a volume that is not finite in output units. An OSError names the
    file that could not be written."""
    import numpy as np

    from . import io
    from .engine import NonFiniteModelOutput

    paths = {kind: os.path.join(job.out, name) for kind, name in job.names[k].items()}
    volume_kind = _volume_kind(paths)
    intensity = job.info.intensity
    with np.errstate(over="ignore", invalid="ignore"):
        physical = io.denormalize(volume.numpy(), intensity)
        bad = int(np.size(physical) - np.count_nonzero(np.isfinite(physical)))
    if bad:
        raise NonFiniteModelOutput(f"volume {k} (seed {job.args.seed + k}) has {bad} NaN/Inf voxel(s) in output "
                                   f"units (intensity scale {(intensity or {}).get('scale', 1.0):g}); nothing "
                                   f"written for it")
    path = paths["sidecar"]
    try:
        if overwrite and os.path.lexists(path):
            os.unlink(path)  # the old set stops counting as complete before any of its files is replaced
        path = paths[volume_kind]
        sidecar = _provenance(job, k)
        if volume_kind == "dicom":
            sidecar["dicom"] = _write_dicom(job, k, path, volume, sidecar, overwrite)
        else:
            io.save_volume(path, volume, affine=job.affine, intensity=intensity, overwrite=overwrite,
                           description=io.sample_description(job.info.name, job.args.seed + k, job.args.solver,
                                                             job.args.steps))
        path = paths["preview"]
        io.save_preview(path, physical, affine=job.affine, overwrite=overwrite)
        sidecar["files_sha256"] = {kind: _output_sha256(kind, paths[kind]) for kind in (volume_kind, "preview")}
        sidecar["seconds_per_volume"] = seconds
        sidecar["created_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        path = paths["sidecar"]
        io.write_json(path, sidecar, overwrite=overwrite)
    except FileExistsError:
        raise
    except OSError as exc:
        raise OSError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_dicom(job, k, path, volume, provenance, overwrite):
    """Volume k as a DICOM series directory (pydiffmed.dicom); its UIDs derive from the run's settings, the
    volume's seed, the pydiffmed version and the device type, so a rerun or --resume writes the same bytes."""
    from . import dicom, io

    uid_seed = json.dumps({"run": io.jsonable(_run_key(provenance)), "version": job.version,
                           "device": job.device.type}, sort_keys=True)
    args = job.args
    return dicom.save_dicom_series(path, volume, affine=job.affine, intensity=job.info.intensity,
                                   model=job.info.name, seed=args.seed + k, uid_seed=uid_seed,
                                   comments=f"model sha256 {job.info.sha256}; {args.solver} {args.steps} steps; "
                                            f"{dtype_name(job.dtype)}", overwrite=overwrite)


def _keep_freed_memory_on_cpu(device):
    """This process is ours: on the CPU, reuse freed activations instead of faulting in fresh pages
    (pydiffmed.host_memory), unless the user tuned glibc's malloc."""
    from .host_memory import keep_freed_memory, user_set_malloc_options

    if device.type == "cpu" and not user_set_malloc_options():
        keep_freed_memory()


def _run_sample(job):
    from .engine import NonFiniteModelOutput, progress_bar

    args = job.args
    _keep_freed_memory_on_cpu(job.device)

    def replan():
        share = job.pending
        _plan_outputs(job, args)
        if job.pending != job.all_pending:
            raise UsageError(f"another pydiffmed run wrote into {job.out} while this one was starting; rerun "
                             f"with --resume")
        job.pending = share

    world = job.world
    if world.rank == 0:
        _open_out_dir(job.out, job.lock, replan)
        _remove_leftover_temporaries(job.out, (name for names in job.names for name in names.values()))
    else:
        os.makedirs(job.out, exist_ok=True)
    _barrier(world)  # under torchrun: nobody writes before rank 0 has locked the directory and cleared it
    writes = world.rank == 0 or not args.spatial_parallel
    # over volumes; the engine shows the steps of each batch
    progress = progress_bar(len(job.pending), not args.quiet, "volumes", "vol", leave=True)
    sampled, sampling_seconds = 0, 0.0
    try:
        for start in range(0, len(job.pending), args.batch):
            indices = job.pending[start:start + args.batch]
            sampler = job.samplers[len(indices)]
            seeds = [args.seed + k for k in indices]
            began = time.perf_counter()
            try:
                volumes = _decode(job, sampler(seeds, progress=not args.quiet,
                                               **_batch_inputs(job, indices))).float().cpu()
            except NonFiniteModelOutput as exc:
                which = ", ".join(map(str, indices))
                raise NonFiniteModelOutput(f"{exc}, sampling volume(s) {which}; nothing written for them, "
                                           f"{sampled + len(job.skipped)} complete volume(s) in {job.out}") from None
            seconds = (time.perf_counter() - began) / len(indices)
            sampling_seconds += seconds * len(indices)
            for k, volume in zip(indices, volumes):
                if writes:
                    _write_volume(job, k, volume, round(seconds, 6), overwrite=args.overwrite or args.resume)
                sampled += 1
                if progress is not None:
                    progress.update(1)
    finally:
        if progress is not None:
            progress.close()
    _barrier(world)  # rank 0 keeps the directory locked until every rank has written its share
    if args.spatial_parallel and world.rank != 0:
        return 0
    per_volume = f"{sampling_seconds / sampled:.3g} s per volume" if sampled else "nothing to sample"
    skipped = f", {len(job.skipped)} complete volume(s) kept" if job.skipped else ""
    if job.damaged:
        skipped += f", {len(job.damaged)} damaged volume(s) redone"
    if world.distributed:
        how = "all ranks, each a depth slab" if args.spatial_parallel else f"rank {world.rank}'s share"
        skipped += f" ({how} of {world.world_size} processes)"
    print(f"pydiffmed: {sampled} volume(s) written to {job.out}{skipped}; {per_volume} ({args.solver}, "
          f"{args.steps} steps, batch {args.batch}); device {job.device}, {dtype_name(job.dtype)}, backend "
          f"{job.backend}")
    return 0


def _sample(args):
    from . import distributed

    try:
        return _run_locked(args, "sample", _prepare_sample, _run_sample,
                           lambda job: f"complete volumes are kept in {job.out}; rerun with --resume to finish")
    finally:
        distributed.leave()


# --- shared by the commands that write into --out (sample, reconstruct, anomaly) ------------------------------

def _barrier(world):
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def _run_locked(args, command, prepare, run, kept):
    """The frame of a command that writes into --out: lock the directory (if it exists: before anything in it is
    read), check everything and build the job (`prepare(args)`; bad input is a UsageError, nothing written), then
    `run(job)`. A failure part way is one line and exit status 1 (130 for Ctrl-C) ending with `kept(job)`: what is
    left in the directory. The lock is released however the run ends."""
    from .engine import NonFiniteModelOutput

    from . import distributed

    try:
        rank = distributed.world_from_env().rank
    except RuntimeError as exc:
        raise UsageError(exc) from None
    if os.environ.get("WORLD_SIZE", "1") != "1" and command != "sample":
        raise UsageError(f"`{command}` runs in one process; start it without torchrun")
    lock = _OutputLock(command)
    try:
        if rank == 0:  # under torchrun rank 0 locks the directory for the whole job
            lock.acquire(os.path.abspath(args.out))
        job = prepare(args)
        job.lock = lock if rank == 0 else None  # otherwise taken once the run has created the directory
        try:
            return run(job)
        except KeyboardInterrupt:
            return _error(f"interrupted; {kept(job)}", INTERRUPTED)
        except NonFiniteModelOutput as exc:
            hint = "" if dtype_name(job.dtype) == "float32" else "; try --dtype float32"
            return _error(f"{exc}{hint}", RUN_ERROR)
        except OSError as exc:
            return _error(f"{exc} ({kept(job)})", RUN_ERROR)
    finally:
        lock.release()


def _open_out_dir(out, lock, recheck):
    """Create the output directory (nothing is created while the input is checked). If it did not exist then, its
    lock is taken now and `recheck()` runs: another run may have written into it meanwhile."""
    os.makedirs(out, exist_ok=True)
    if lock is not None and lock.fd is None and lock.acquire(out):
        recheck()


def _check_outputs_free(out, names, overwrite):
    """UsageError when an output file of this run is in the way: a directory, or (without --overwrite) any
    existing file."""
    paths = [os.path.join(out, name) for name in names]
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            raise UsageError(f"{path} is a directory where an output file goes; move it or use another --out")
    present = [path for path in paths if os.path.lexists(path)]
    if present and not overwrite:
        raise UsageError(f"{present[0]} already exists ({len(present)} output file(s) of this run exist in {out}); "
                         f"pass --overwrite to replace them, or use another --out or --prefix")


def _model_fields(info) -> dict:
    """The sidecar entries naming the model."""
    return {"model": info.name, "model_sha256": info.sha256, "model_path": os.path.abspath(info.path)}


def _runtime_fields(device, dtype, backend, chosen, requested_dtype) -> dict:
    """The sidecar entries naming where and how the model ran (requested_dtype: the --dtype given)."""
    from . import backends

    why = backends.auto_dtype(device)[1] if requested_dtype == "auto" else f"--dtype {requested_dtype}"
    return {"dtype": dtype_name(dtype), "dtype_choice": why, "state_dtype": "float32", "device": str(device),
            "backend": backend, "backends": chosen}


def _input_file_fields(files) -> dict:
    """{flag: {"path", "sha256"}} of the input files given (None where not), for a sidecar."""
    from . import modelfile

    return {flag: None if path is None else {"path": os.path.abspath(path), "sha256": modelfile.file_sha256(path)}
            for flag, path in files.items()}


def _write_output_set(out, writers, sidecar_name, sidecar, overwrite):
    """Write one run's output files, then its sidecar (last: it marks the set complete and records every file's
    sha256 under "files_sha256"). writers: {file name: write(path)}, each writing atomically (pydiffmed.io). The
    set is whole or absent: if any write fails (a full disk, Ctrl-C), the files written so far are removed again
    (with --overwrite also any older file of an output's name: the user gave them up) and the error re-raised; an
    OSError then names the file that could not be written."""
    from . import io, modelfile

    names = [*writers, sidecar_name]
    written, current = [], None
    try:
        if overwrite:
            current = os.path.join(out, sidecar_name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(current)  # the old set stops counting as complete before any of its files is replaced
        hashes = {}
        for name, write in writers.items():
            current = os.path.join(out, name)
            write(current)
            written.append(name)
            hashes[name] = modelfile.file_sha256(current)
        sidecar = {**sidecar, "files_sha256": hashes,
                   "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        current = os.path.join(out, sidecar_name)
        io.write_json(current, sidecar, overwrite=overwrite)
    except BaseException as exc:
        for name in names if overwrite else written:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
            raise OSError(f"cannot write {current}: {exc.strerror or exc}") from exc
        raise
    return sidecar

# --- convert, models, bench, info ----------------------------------------------------------------------------

def _convert(args):
    from . import modelfile

    if args.monai_bundle is not None:
        if args.monai_checkpoint is not None or args.monai_config is not None:
            raise UsageError("--monai-bundle replaces --monai-checkpoint and --monai-config: give one or the other")
        if args.prediction_type is not None:
            raise UsageError("--prediction-type goes with --monai-checkpoint (a bundle's scheduler says it)")
    elif args.monai_checkpoint is None or args.monai_config is None:
        raise UsageError("convert needs --monai-checkpoint and --monai-config, or --monai-bundle DIR")
    elif args.scale_factor is not None:
        raise UsageError("--scale-factor goes with --monai-bundle (a latent model)")
    shape = None if args.volume_shape is None else list(args.volume_shape)
    spacing = None if args.spacing is None else list(args.spacing)
    try:
        if args.monai_bundle is not None:
            info = modelfile.convert_monai_bundle(args.monai_bundle, args.out, name=args.name, volume_shape=shape,
                                                  spacing=spacing, orientation=args.orientation,
                                                  scale_factor=args.scale_factor, overwrite=args.overwrite)
        else:
            info = modelfile.convert_monai(args.monai_checkpoint, args.monai_config, args.out, name=args.name,
                                           volume_shape=shape, spacing=spacing, orientation=args.orientation,
                                           prediction_type=args.prediction_type, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:  # ModelFileError / CheckpointError are ValueErrors
        raise UsageError(exc) from None
    shape = "unknown (pass --shape when sampling)" if info.volume_shape is None else \
        "×".join(map(str, info.volume_shape))
    latent = f", latent model (scale factor {info.scale_factor:g})" if info.is_latent else ""
    print(f"pydiffmed: converted {args.monai_bundle or args.monai_checkpoint} → {info.path}: model {info.name!r}, "
          f"{info.prediction_type}, volume {shape}{latent}, sha256 {info.sha256[:16]}…")
    return 0


def _models(args):
    from . import modelfile

    names = modelfile.bundled_models()
    rows = []
    for name in names:
        try:
            info = modelfile.read_model_info(name)
        except modelfile.ModelFileError as exc:
            rows.append((name, "-", f"unusable: {_one_line(exc)}"))
            continue
        shape = "?" if info.volume_shape is None else "×".join(map(str, info.volume_shape))
        rows.append((name, f"{info.channels}×{shape}", info.description or "-"))
    if rows:
        width = max(len(r[0]) for r in rows + [("name",)])
        shape_width = max(len(r[1]) for r in rows + [("", "shape")])
        print(f"{'name':<{width}}  {'shape':<{shape_width}}  description")
        for name, shape, description in rows:
            print(f"{name:<{width}}  {shape:<{shape_width}}  {description}")
    else:
        print(f"no bundled models are installed (in {modelfile.MODELS_DIR})")
    for name in _PLANNED_BUNDLED:
        if name not in names:
            print(f"{name}: not installed (its weights are not in {os.path.join(modelfile.MODELS_DIR, name)})")
    return 0


def _bench(args):
    """Eager end-to-end sampling of a small random UNet3D: seconds per step and per volume."""
    import statistics

    import torch

    from .engine import Sampler
    from .memory import InsufficientMemoryError
    from .models import UNet3D
    from .schedules import NoiseSchedule
    from .solvers import get_solver

    _check_count("--size", args.size, 4)
    if args.size % 4:
        raise UsageError(f"--size {args.size}: must be divisible by 4 (the bench model halves it twice)")
    _check_count("--steps", args.steps)
    _check_count("--batch", args.batch)
    _check_count("--repeats", args.repeats)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    backend, _ = _backends_for(device, dtype)
    _keep_freed_memory_on_cpu(device)
    torch.manual_seed(0)
    model = UNet3D(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(16, 32, 64),
                   attention_levels=(False, False, True), norm_num_groups=8, num_head_channels=16)
    model = model.eval().to(device=device, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    try:
        solver = get_solver("ddim", NoiseSchedule.discrete("linear"), args.steps)
    except ValueError as exc:
        raise UsageError(f"--steps {args.steps}: {exc}") from None
    shape = (args.batch, 1, args.size, args.size, args.size)
    try:  # checks the memory the run needs before allocating it
        sampler = Sampler(model, solver, shape, device=device, dtype=dtype, cuda_graph=False)
    except InsufficientMemoryError as exc:
        raise UsageError(f"--size {args.size} --batch {args.batch}: {exc}") from None
    with torch.no_grad():  # warm-up: kernel compilation, oneDNN/cuDNN setup for this shape
        model(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(args.batch, device=device))
    times = []
    for repeat in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        sampler(repeat + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    median = statistics.median(times)
    evals = solver.num_model_evals
    print(f"bench: UNet3D {parameters / 1e6:.2f} M parameters, batch {args.batch} × {args.size}³, ddim "
          f"{args.steps} steps, eager, device {device}, {dtype_name(dtype)}, backend {backend}")
    print(f"  {median / evals * 1e3:.1f} ms per step, {median / args.batch:.3f} s per volume "
          f"(median of {args.repeats})")
    return 0


def _info(args) -> int:
    import torch

    import pydiffmed
    from pydiffmed import _openmp, backends

    print(f"pydiffmed {pydiffmed.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"openmp wait: {_openmp.describe(pydiffmed.OPENMP_WAIT_POLICY_SET)}")
    dtype, why = backends.auto_dtype("cpu")
    print(f"--dtype auto on the cpu: {why}")
    print(f"bf16 attention on the cpu: {importlib.import_module('pydiffmed.ops.attention').cpu_bf16_route()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: no device")
    print("backends:")
    for line in backends.describe().splitlines():
        print("  " + line)
    return 0


# --- the parser ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pydiffmed", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sample", help="sample volumes from a model into NIfTI files, previews and sidecars",
                       description="Sample volumes; per volume k (seed = --seed + k, whatever --batch is) write "
                                   "PREFIX_k.nii.gz (or with --format dicom a series directory PREFIX_k/), "
                                   "PREFIX_k.png (mid-slice preview) and PREFIX_k.json (provenance), each "
                                   "atomically.")
    s.add_argument("--model", required=True, help="a bundled model name (see `pydiffmed models`), a model directory "
                                                  "or a .safetensors model file")
    s.add_argument("--out", required=True, help="output directory (created if missing)")
    s.add_argument("-n", "--num", type=int, default=8,
                   help="number of volumes (default 8; at most 100000 per run). Under torchrun write -n: torchrun's "
                        "own parser takes --num for an abbreviation of its --numa-binding")
    s.add_argument("--batch", type=int, default=4, help="volumes per model call (default 4)")
    s.add_argument("--solver", default="dpmpp_2m", help="solver name (default dpmpp_2m)")
    s.add_argument("--steps", type=int, default=20, help="solver steps (default 20)")
    s.add_argument("--seed", type=int, default=0,
                   help="volume k uses seed + k (default 0; 64-bit seeds: 0 <= seed + k < 2**63)")
    s.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    s.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="model precision (auto: float16 on CUDA; on the CPU bfloat16 where it has native bf16 (AMX or "
                        "AVX512-BF16), else float32); the solver state stays float32")
    s.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (class-conditional models; "
                                                        "needs --class-label and --uncond-class-label)")
    s.add_argument("--class-label", type=int, help="class to sample (class-conditional models)")
    s.add_argument("--uncond-class-label", type=int, help="the 'no class' index the model was trained with, for "
                                                          "--guidance-scale")
    s.add_argument("--mask", help="inpainting: NIfTI mask, 1 where --known is kept, 0 where new content is sampled")
    s.add_argument("--known", help="inpainting: NIfTI volume whose masked region is kept")
    s.add_argument("--init", help="SDEdit: NIfTI volume to start from (with --strength)")
    s.add_argument("--strength", type=float, help="SDEdit: noise level to start from, in (0, 1] (1 = pure noise); "
                                                  "multistep solvers restart their history there; pndm needs "
                                                  "strength 1")
    s.add_argument("--spacing", type=float, nargs=3, metavar=("SI", "SJ", "SK"),
                   help="output voxel size in mm (default: the model's, or that of --init/--known)")
    s.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="volume size (default: the model's stored shape, or that of --init/--known)")
    s.add_argument("--prefix", default="sample", help="output file name prefix (default sample)")
    s.add_argument("--format", choices=sorted(_FORMATS), default="nifti",
                   help="volume format: nifti (PREFIX_k.nii.gz, the default) or dicom (a directory PREFIX_k/ of "
                        "one .dcm file per slice: CT images in Hounsfield units when the model's intensity units "
                        "are HU, else MR images; marked as synthetic; needs pydicom)")
    existing = s.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument("--resume", action="store_true",
                          help="keep volumes whose outputs are complete and intact (the sha256 in their sidecar); "
                               "sample the rest, damaged ones included")
    s.add_argument("--eager", action="store_true", help="no CUDA graphs")
    s.add_argument("--feature-cache", type=int, metavar="N",
                   help="DeepCache-style feature caching (UNet3D models): a full model evaluation every N "
                        "evaluations, the N-1 between recompute only the shallow path on the cached deep features; "
                        "faster, slightly different samples (default: off)")
    s.add_argument("--cache-branch", type=int, metavar="K",
                   help="with --feature-cache: the skip connection where the deep features are cached (default 0, "
                        "the shallowest and fastest; higher recomputes more of the network)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="evaluate the model one volume at a time, so that --batch cannot change a bit of any volume "
                        "on a GPU either (on the CPU this always holds); slower on a GPU")
    s.add_argument("--spatial-parallel", action="store_true",
                   help="under torchrun: split every volume along its depth across the processes (one slab each: "
                        "halo exchanges, all-reduced GroupNorm statistics) instead of sharing out the volumes")
    s.add_argument("--decode-tile", type=int, metavar="N",
                   help="latent models: decode by depth slabs of N rows per layer (same voxels, less working "
                        "memory; autoencoders without attention)")
    s.add_argument("--decode-max-memory", type=_memory_size, metavar="SIZE",
                   help="latent models: decode by depth slabs within SIZE of working memory per layer (e.g. 2G); "
                        "auto: whole where it fits the free memory, else the deepest slabs that fit")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_sample)

    from .cli_inverse import add_parsers  # reconstruct, anomaly (they import this module's shared pieces)

    add_parsers(sub)

    c = sub.add_parser("convert", help="convert a MONAI DiffusionModelUNet checkpoint or a MONAI bundle into a "
                                       "pydiffmed model")
    c.add_argument("--monai-checkpoint", help="state dict (.pt/.pth, read without unpickling code) or .safetensors "
                                              "(with --monai-config)")
    c.add_argument("--monai-config", help="JSON/YAML with the network's arguments (bare, or a bundle's network "
                                          "definition and scheduler)")
    c.add_argument("--monai-bundle", metavar="DIR",
                   help="instead of the two above: a MONAI bundle directory (configs/*.json|yaml, models/*); its "
                        "DiffusionModelUNet, and AutoencoderKL if it has one (a latent model), read as data")
    c.add_argument("--scale-factor", type=float, help="--monai-bundle: the latent scale factor (default: the "
                                                      "bundle's)")
    c.add_argument("--out", required=True, help="model directory to write (or FILE.safetensors)")
    c.add_argument("--volume-shape", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="the volume size the model was trained at")
    c.add_argument("--name", help="model name (default: the output's name)")
    c.add_argument("--spacing", type=float, nargs=3, metavar=("SI", "SJ", "SK"), help="voxel size in mm")
    c.add_argument("--orientation", help="axis code of the output volumes, e.g. RAS")
    c.add_argument("--prediction-type", help="override what the model predicts (epsilon, v_prediction, sample, ...)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing model")
    c.set_defaults(func=_convert)

    m = sub.add_parser("models", help="list the bundled models")
    m.set_defaults(func=_models)

    b = sub.add_parser("bench", help="quick end-to-end timing on this machine (small UNet3D, eager)")
    b.add_argument("--size", type=int, default=32, help="volume edge (default 32)")
    b.add_argument("--steps", type=int, default=5, help="ddim steps (default 5)")
    b.add_argument("--batch", type=int, default=1, help="volumes per call (default 1)")
    b.add_argument("--repeats", type=int, default=2, help="timed runs (default 2)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="model precision")
    b.set_defaults(func=_bench)

    info = sub.add_parser("info", help="backends, devices and versions")
    info.set_defaults(func=_info)
    return parser


def main(argv=None) -> int:
    """Run the command; returns the exit status (2: bad input, 1: a run that failed part way, 130: Ctrl-C). No
    traceback: an unexpected error is one line naming its type (PYDIFFMED_DEBUG=1 shows the traceback)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    with _one_line_warnings():
        try:
            return args.func(args)
        except UsageError as exc:
            return _error(exc, USAGE_ERROR)
        except BrokenPipeError:  # the reader of stdout left (`pydiffmed info | head`): nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush stays quiet
            return RUN_ERROR
        except Exception as exc:
            if os.environ.get(_DEBUG_ENV, "") not in ("", "0"):
                raise
            return _error(f"unexpected {type(exc).__name__}: {exc} (set {_DEBUG_ENV}=1 to see the traceback)",
                          RUN_ERROR)


if __name__ == "__main__":
    sys.exit(main())
