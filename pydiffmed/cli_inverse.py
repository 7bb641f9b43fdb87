"""The `pydiffmed reconstruct` and `pydiffmed anomaly` commands: posterior sampling of MRI / CT measurements, and
anomaly detection with a model of healthy anatomy (pydiffmed.inverse). `pydiffmed.cli` registers them and holds
what they share with `sample` (output directory lock, output checks, atomic output sets with a sidecar of sha256
written last, one-line errors, exit statuses).

    pydiffmed reconstruct --model DIR --kspace k.npy --mask mask.npy [--coils coils.npy] --out DIR
    pydiffmed reconstruct --model DIR --sinogram sino.npy --angles sparse:30 --out DIR
    pydiffmed anomaly --model DIR --input vol.nii.gz [--mask brain.nii.gz] [--threshold otsu] --out DIR

Measurement files (NumPy; read with allow_pickle=False, a pickled or object array is refused):

* --kspace: `.npy`/`.npz`, complex64/complex128, (coils, D, H, W) or (D, H, W): what
  `pydiffmed.inverse.CartesianMRI(mask, coils, mode).forward(image)` gives for the image in the model's output
  units (centred orthonormal FFT, DC at index n // 2, over D, H, W, or over H, W per slice with --mri-mode
  slice). Values where the mask is 0 are ignored.
* --mask: bool or 0/1 numbers, D×H×W, or D×H (the same for every W: the readout axis).
* --coils: sensitivity maps, complex (or real), (coils, D, H, W), one per k-space coil.
* --sinogram: real, (D, views, detectors): `ParallelBeamCT(angles, (H, W), detectors, --detector-spacing)` of
  every axial slice (axis 0) of the image in output units, line integrals with lengths in voxels.
* --angles: a `.npy`/`.npz` of angles in radians, or sparse:N (N views over 180°) or limited:N:SPAN[:START]
  (N views over SPAN degrees from START, default 0).

Units: measurements are of the image in the model's output units (those of the NIfTI files `sample` writes);
the model works in its own units, image_out = scale·image_model + offset (the config's intensity block). The
operators are linear, so the command converts y_model = (y − offset·A·1) / scale and sigma_y_model =
sigma_y / |scale|; the intensity clip applies to the output volumes only.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .cli import (
    _DTYPES,
    UsageError,
    _backends_for,
    _bad_input_is_usage_error,
    _check_count,
    _check_divisible,
    _check_out_dir,
    _check_outputs_free,
    _check_prefix,
    _check_same_geometry,
    _check_seed,
    _device,
    _dtype,
    _input_file_fields,
    _keep_freed_memory_on_cpu,
    _load_model,
    _MAX_VOLUMES,
    _model_fields,
    _open_out_dir,
    _read_volume,
    _remove_leftover_temporaries,
    _run_locked,
    _runtime_fields,
    _solver,
    _write_output_set,
)
from .ops._checks import dtype_name

if TYPE_CHECKING:
    import numpy as np
    import torch

    from . import modelfile
    from .solvers import Solver

_ANGLE_FORMS = "sparse:N (N views over 180°) or limited:N:SPAN[:START] (N views over SPAN degrees from START)"
_THRESHOLD_FORMS = "percentile, percentile:P (0-100), otsu, or a number (in the map's units)"
_NOTHING_KEPT = "no output of this run is left in {out} (its files are written whole, as a set, or not at all)"


def _shape_text(shape):
    return "×".join(map(str, shape))


# --- measurement files ------------------------------------------------------------------------------------------

def _read_array(flag, path):
    """The numeric array in a .npy/.npz file (pydiffmed.io.load_array: never unpickles), with no NaN/Inf."""
    import numpy as np

    from . import io

    try:
        array = io.load_array(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag}: {exc}") from None
    if array.dtype.kind in "fc":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise UsageError(f"{flag} {path}: holds {bad} NaN/Inf value(s)")
    return array


def _real(flag, path, array, what):
    if array.dtype.kind == "c":
        raise UsageError(f"{flag} {path}: {what} must be real, got {array.dtype} (complex)")
    return array


def _read_kspace(args):
    """(coils, D, H, W) complex128 tensor of --kspace."""
    import torch

    array = _read_array("--kspace", args.kspace)
    if array.dtype.kind != "c":
        raise UsageError(f"--kspace {args.kspace}: k-space must be complex (complex64 or complex128), got "
                         f"{array.dtype}; store the complex samples, not their magnitudes or real parts")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise UsageError(f"--kspace {args.kspace}: expected (coils, D, H, W) or (D, H, W), got shape "
                         f"{tuple(array.shape)}")
    return torch.from_numpy(array.astype("complex128"))


def _measurement_shape(args, info, spatial, reference):
    """The volume shape: the model's configured one, which the measurement must match; for a model that stores
    none, the measurement's (MRI) or --reference's."""
    wanted = info.volume_shape
    if wanted is None:
        wanted = spatial or (tuple(reference[1].shape[1:]) if reference is not None else None)
        if wanted is None:
            raise UsageError(f"--model {args.model}: the model stores no volume shape and a sinogram does not give "
                             f"one; pass --reference vol.nii.gz on the output grid")
        _check_divisible("the measured volume", wanted, info)
    if spatial is not None and tuple(spatial) != tuple(wanted):
        flag = "--kspace" if args.kspace is not None else "--sinogram"
        raise UsageError(f"{flag} {getattr(args, flag[2:])}: a {_shape_text(spatial)} volume, but the model "
                         f"{info.name!r} makes {_shape_text(wanted)} volumes (its configured volume shape)")
    return tuple(int(s) for s in wanted)


def _read_mask(args, shape):
    """--mask as a bool tensor, D×H×W or D×H."""
    import numpy as np
    import torch

    array = _real("--mask", args.mask, _read_array("--mask", args.mask), "the mask")
    if array.dtype != np.bool_:
        if not np.all((array == 0) | (array == 1)):
            raise UsageError(f"--mask {args.mask}: must be bool or hold only 0 and 1, found values in "
                             f"[{array.min():g}, {array.max():g}]")
        array = array != 0
    if tuple(array.shape) not in (tuple(shape), tuple(shape[:2])):
        raise UsageError(f"--mask {args.mask}: shape {_shape_text(array.shape)}, but the k-space is "
                         f"{_shape_text(shape)}: the mask must be D×H×W ({_shape_text(shape)}) or D×H "
                         f"({_shape_text(shape[:2])}, the same for every W)")
    if not array.any():
        raise UsageError(f"--mask {args.mask}: samples no k-space point (all zero)")
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_coils(args, shape, n_coils):
    """(1, coils, D, H, W) complex128 coil maps of --coils (or None), one per k-space coil."""
    import torch

    if args.coils is None:
        if n_coils > 1:
            raise UsageError(f"--kspace {args.kspace}: holds the k-space of {n_coils} coils; pass their sensitivity "
                             f"maps with --coils")
        return None
    array = _read_array("--coils", args.coils)
    if array.dtype.kind not in "fc":
        raise UsageError(f"--coils {args.coils}: coil sensitivities must be complex (or real floating point), got "
                         f"{array.dtype}")
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape):
        raise UsageError(f"--coils {args.coils}: expected (coils, {', '.join(map(str, shape))}), got shape "
                         f"{tuple(array.shape)}")
    if array.shape[0] != n_coils:
        raise UsageError(f"--coils {args.coils}: holds {array.shape[0]} coil map(s) but --kspace {args.kspace} "
                         f"holds the k-space of {n_coils} coil(s)")
    return torch.from_numpy(array.astype("complex128"))[None]


def _read_sinogram(args):
    """(D, views, detectors) float64 tensor of --sinogram."""
    import torch

    array = _real("--sinogram", args.sinogram, _read_array("--sinogram", args.sinogram), "a sinogram")
    if array.dtype.kind not in "fiu":
        raise UsageError(f"--sinogram {args.sinogram}: expected real numbers, got {array.dtype}")
    if array.ndim != 3:
        raise UsageError(f"--sinogram {args.sinogram}: expected (D, views, detectors), got shape "
                         f"{tuple(array.shape)}")
    return torch.from_numpy(array.astype("float64"))


def _angles(text):
    """(angles in radians as a float64 tensor, how they were given) of --angles."""
    import torch

    from .inverse import limited_angle_angles, sparse_view_angles

    form, _, rest = text.partition(":")
    if form in ("sparse", "limited") and not os.path.exists(text):
        parts = rest.split(":")
        try:
            n = int(parts[0])
            numbers = [float(p) for p in parts[1:]]
            if form == "sparse" and not numbers:
                return sparse_view_angles(n), text
            if form == "limited" and len(numbers) in (1, 2) and all(math.isfinite(v) for v in numbers):
                return limited_angle_angles(n, *numbers), text
        except ValueError as exc:
            if not str(exc).startswith(("invalid literal", "could not convert")):
                raise UsageError(f"--angles {text}: {exc}") from None
        raise UsageError(f"--angles {text}: expected {'sparse:N' if form == 'sparse' else 'limited:N:SPAN[:START]'}"
                         f" with an integer N and numbers of degrees")
    if not (os.path.exists(text) or text.lower().endswith((".npy", ".npz"))):
        raise UsageError(f"--angles {text}: unknown form; expected a .npy/.npz file of angles in radians, "
                         f"{_ANGLE_FORMS}")
    array = _real("--angles", text, _read_array("--angles", text), "angles")
    if array.dtype.kind not in "fiu" or array.size == 0 or (array.ndim > 1 and array.size != max(array.shape)):
        raise UsageError(f"--angles {text}: expected a 1-D array of angles in radians, got {array.dtype} of shape "
                         f"{tuple(array.shape)}")
    return torch.from_numpy(array.reshape(-1).astype("float64")), "file"


def _measurement(args, info, reference):
    """(operator, y in output units (1, …), volume shape, details for the sidecar) of the measurement given."""
    import torch

    from .inverse import CartesianMRI, ParallelBeamCT

    if args.kspace is not None:
        y = _read_kspace(args)
        shape = _measurement_shape(args, info, tuple(y.shape[1:]), reference)
        mask = _read_mask(args, shape)
        coils = _read_coils(args, shape, y.shape[0])
        op = CartesianMRI(mask, coils, mode=args.mri_mode)
        y = (y * mask.reshape(*mask.shape, *([1] * (3 - mask.ndim))).to(y.dtype))[None]
        sampled = float(mask.double().mean())
        details = {"modality": "mri", "mri_mode": args.mri_mode, "coils": y.shape[1], "mask_shape": list(mask.shape),
                   "sampled_fraction": sampled, "acceleration": 1.0 / sampled}
        return op, y, shape, details
    y = _read_sinogram(args)
    shape = _measurement_shape(args, info, None, reference)
    angles, given = _angles(args.angles)
    if not math.isfinite(args.detector_spacing) or args.detector_spacing <= 0:
        raise UsageError(f"--detector-spacing must be a positive number of voxels, got {args.detector_spacing}")
    if y.shape[0] != shape[0]:
        raise UsageError(f"--sinogram {args.sinogram}: {y.shape[0]} slices, but the model's volumes have {shape[0]} "
                         f"(axis 0 of its {_shape_text(shape)} volumes)")
    if y.shape[1] != angles.numel():
        raise UsageError(f"--sinogram {args.sinogram}: {y.shape[1]} views, but --angles {args.angles} gives "
                         f"{angles.numel()}")
    op = ParallelBeamCT(angles, shape[1:], n_detectors=y.shape[2], detector_spacing=args.detector_spacing)
    details = {"modality": "ct", "angles": given, "views": int(angles.numel()), "detectors": int(y.shape[2]),
               "detector_spacing": args.detector_spacing, "angles_radians": [float(a) for a in angles]}
    return op, y[None, None].to(torch.float64), shape, details


def _to_model_units(op, y, shape, intensity):
    """y_model = (y − offset·A·1) / scale: the data of the image in model units (A is linear)."""
    import torch

    from . import io

    intensity = io.check_intensity(intensity)
    if intensity is None:
        return y
    scale, offset = intensity["scale"], intensity["offset"]
    if offset != 0:
        y = y - offset * op.forward(torch.ones((1, 1, *shape), dtype=torch.float64))
    return y / scale


# --- reconstruct --------------------------------------------------------------------------------------------------

@dataclass
class _Reconstruction:
    """Everything `reconstruct` needs, checked (built by _prepare_reconstruct), used by _run_reconstruct."""
    args: argparse.Namespace
    info: "modelfile.ModelInfo"
    device: "torch.device"
    dtype: "torch.dtype"
    backend: str
    backends: dict
    solver: "Solver"
    solver_options: dict
    shape: tuple
    out: str
    names: dict                   # kind -> file name: samples (a list), mean, std, preview, sidecar
    affine: "np.ndarray"
    operator: object              # the measurement operator
    y: "torch.Tensor"             # the data as given (output units; MRI: zero outside the mask), batch 1
    sigma_y: float                # in model units
    posterior_options: dict
    details: dict                 # modality and measurement facts for the sidecar
    inputs: dict                  # flag -> {"path", "sha256"} or None
    model: Optional["torch.nn.Module"] = None
    samplers: dict = field(default_factory=dict)  # batch size -> Sampler
    lock: object = None


def _recon_names(prefix, num):
    width = max(4, len(str(num - 1)))
    names = {"samples": [f"{prefix}_{k:0{width}d}.nii.gz" for k in range(num)]}
    if num > 1:
        names.update(mean=f"{prefix}_mean.nii.gz", std=f"{prefix}_std.nii.gz")
    names.update(preview=f"{prefix}.png", sidecar=f"{prefix}.json")
    return names


def _all_names(names):
    return [n for value in names.values() for n in (value if isinstance(value, list) else [value])]


def _reference(args):
    return None if args.reference is None else _read_volume("--reference", args.reference)


@_bad_input_is_usage_error
def _prepare_reconstruct(args):
    """Check every argument and measurement file, load the model, convert the data to model units and build the
    samplers; raises UsageError. Writes nothing."""
    import torch

    from .engine import Sampler
    from .inverse import Measurement
    from .inverse.samplers import _operator_norm2
    from .memory import InsufficientMemoryError

    _check_count("--num", args.num)
    if args.num > _MAX_VOLUMES:
        raise UsageError(f"--num {args.num}: at most {_MAX_VOLUMES} posterior samples per run")
    _check_seed(args.seed, args.num)
    _check_count("--batch", args.batch)
    _check_count("--steps", args.steps)
    _check_prefix(args.prefix)
    if args.kspace is None and args.mask is not None or args.kspace is None and args.coils is not None:
        raise UsageError("--mask and --coils go with --kspace (MRI)")
    if args.kspace is not None and args.mask is None:
        raise UsageError("--kspace needs --mask (the sampled k-space points)")
    if args.sinogram is not None and args.angles is None:
        raise UsageError("--sinogram needs --angles (a file of angles in radians, sparse:N or limited:N:SPAN)")
    if args.angles is not None and args.sinogram is None:
        raise UsageError("--angles goes with --sinogram (CT)")
    if not math.isfinite(args.sigma_y) or args.sigma_y < 0:
        raise UsageError(f"--sigma-y must be a finite number >= 0, got {args.sigma_y}")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    backend, chosen = _backends_for(device, dtype)
    model, schedule, info = _load_model(args)
    if info.channels != 1:
        raise UsageError(f"--model {args.model}: a {info.channels}-channel model; the MRI and CT operators image one "
                         f"channel")
    reference = _reference(args)
    operator, y, shape, details = _measurement(args, info, reference)
    if reference is not None and tuple(reference[1].shape[1:]) != shape:
        raise UsageError(f"--reference {args.reference}: a {_shape_text(reference[1].shape[1:])} volume, but the "
                         f"reconstruction is {_shape_text(shape)}")
    solver, solver_options = _solver(args.solver, args.steps, schedule, info)
    out = os.path.abspath(args.out)
    _check_out_dir(out)
    names = _recon_names(args.prefix, args.num)
    _check_outputs_free(out, _all_names(names), args.overwrite)

    intensity = info.intensity
    scale = abs((intensity or {}).get("scale", 1.0))
    y_model = _to_model_units(operator, y, shape, intensity)
    y_model = y_model.to(torch.complex64 if y_model.is_complex() else torch.float32)
    sigma_y = args.sigma_y / scale
    options = {}
    if args.posterior in ("projection", "dps"):  # ‖A‖² once, on one volume: the same for every batch size
        options["operator_norm2"] = _operator_norm2(operator, (1, 1, *shape), "cpu", torch.float32)
    measurement = Measurement(operator, y_model, sigma_y)
    job = _Reconstruction(args=args, info=info, device=device, dtype=dtype, backend=backend, backends=chosen,
                          solver=solver, solver_options=solver_options, shape=shape, out=out, names=names,
                          affine=reference[1].affine if reference is not None else info.affine(shape),
                          operator=operator, y=y, sigma_y=sigma_y, posterior_options=options,
                          details=details,
                          inputs=_input_file_fields({"--kspace": args.kspace, "--mask": args.mask,
                                                     "--coils": args.coils, "--sinogram": args.sinogram,
                                                     "--angles": args.angles if details.get("angles") == "file"
                                                     else None, "--reference": args.reference}))
    job.model = model.to(device=device, dtype=dtype)
    for size in sorted({min(args.batch, args.num - start) for start in range(0, args.num, args.batch)}):
        try:
            job.samplers[size] = Sampler(job.model, solver, (size, 1, *shape), device=device, dtype=dtype,
                                         cuda_graph=not args.eager, measurement=measurement,
                                         posterior=args.posterior, posterior_options=options)
        except InsufficientMemoryError as exc:
            raise UsageError(f"--batch {args.batch} of {_shape_text(shape)} volumes: {exc}") from None
    return job


def _relative_residual(job, physical):
    """‖A x − y‖ / ‖y‖ of one reconstruction as written (output units, (1, D, H, W) float64): how well it explains
    the data as given."""
    import torch

    r = job.operator.forward(torch.from_numpy(physical)[None]) - job.y
    return float(r.abs().norm() / job.y.abs().norm().clamp_min(1e-30))


def _check_finite_output(physical, what):
    import numpy as np

    from .engine import NonFiniteModelOutput

    bad = int(np.size(physical) - np.count_nonzero(np.isfinite(physical)))
    if bad:
        raise NonFiniteModelOutput(f"{what} has {bad} NaN/Inf voxel(s) in output units; nothing written")


def _run_reconstruct(job):
    import numpy as np
    import torch

    import pydiffmed

    from . import io

    args, info = job.args, job.info
    _keep_freed_memory_on_cpu(job.device)
    _open_out_dir(job.out, job.lock, lambda: _check_outputs_free(job.out, _all_names(job.names), args.overwrite))
    _remove_leftover_temporaries(job.out, _all_names(job.names))
    volumes, began = [], time.perf_counter()
    for start in range(0, args.num, args.batch):
        seeds = list(range(args.seed + start, args.seed + min(start + args.batch, args.num)))
        volumes.extend(job.samplers[len(seeds)](seeds, progress=not args.quiet).float().cpu())
    seconds = (time.perf_counter() - began) / args.num
    with np.errstate(over="ignore", invalid="ignore"):
        physical = [io.denormalize(v.numpy().astype(np.float64), info.intensity) for v in volumes]
    for k, p in enumerate(physical):
        _check_finite_output(p, f"posterior sample {k} (seed {args.seed + k})")
    residuals = [_relative_residual(job, p) for p in physical]

    writers = {}
    for k, (name, volume) in enumerate(zip(job.names["samples"], volumes)):
        description = io.sample_description(info.name, args.seed + k, f"{args.solver}/{args.posterior}", args.steps)
        writers[name] = lambda path, v=volume, d=description: io.save_volume(
            path, v, affine=job.affine, intensity=info.intensity, description=d, overwrite=args.overwrite)
    stack = np.stack(physical)
    preview = [stack[0, 0]]
    if args.num > 1:
        mean, std = stack.mean(0), stack.std(0, ddof=1)
        preview = [mean[0], std[0]]
        for kind, array in (("mean", mean), ("std", std)):
            text = io.header_text(f"pydiffmed {pydiffmed.__version__} posterior {kind} of {args.num} {info.name}")
            writers[job.names[kind]] = lambda path, a=array, t=text: io.save_volume(
                path, a.astype(np.float32), affine=job.affine, description=t, overwrite=args.overwrite)
    writers[job.names["preview"]] = lambda path: io.save_preview(path, np.stack(preview), affine=job.affine,
                                                                 overwrite=args.overwrite)
    sidecar = {
        "pydiffmed_version": pydiffmed.__version__,
        "command": "reconstruct",
        **_model_fields(info),
        **job.details,
        "inputs": job.inputs,
        "posterior": args.posterior,
        "posterior_options": job.posterior_options,
        "solver": args.solver,
        "solver_options": job.solver_options,
        "steps": args.steps,
        "num_model_evals": job.solver.num_model_evals,
        "sigma_y": args.sigma_y,
        "sigma_y_model_units": job.sigma_y,
        "measurement_units": "output units (model units = (output - offset) / scale, intensity below)",
        "num": args.num,
        "seed": args.seed,
        "seeds": [args.seed + k for k in range(args.num)],
        "batch": args.batch,
        **_runtime_fields(job.device, job.dtype, job.backend, job.backends, args.dtype),
        "cuda_graph": job.device.type == "cuda" and not args.eager,
        "shape": [1, *job.shape],
        "spacing": list(io.spacing_from_affine(job.affine)),
        "orientation": io.orientation_from_affine(job.affine),
        "affine": [list(map(float, row)) for row in job.affine],
        "intensity": info.intensity,
        "relative_residual": residuals,
        "files": {kind: value for kind, value in job.names.items() if kind != "sidecar"},
        "seconds_per_sample": round(seconds, 6),
        "torch_version": torch.__version__,
    }
    _write_output_set(job.out, writers, job.names["sidecar"], sidecar, args.overwrite)
    what = (f"k-space ({job.details['coils']} coil(s), {job.details['sampled_fraction']:.1%} sampled)"
            if job.details["modality"] == "mri" else f"a {job.details['views']}-view sinogram")
    extra = f" + {job.names['mean']}, {job.names['std']}" if args.num > 1 else ""
    print(f"pydiffmed: reconstructed {_shape_text(job.shape)} from {what} with {info.name} ({args.posterior}, "
          f"{args.solver} {args.steps} steps): {args.num} sample(s) {job.names['samples'][0]}"
          f"{'…' if args.num > 1 else ''}{extra} in {job.out}; data residual {max(residuals):.3g} (relative); "
          f"{seconds:.3g} s per sample; device {job.device}, {dtype_name(job.dtype)}, backend {job.backend}")
    return 0


def _reconstruct(args):
    return _run_locked(args, "reconstruct", _prepare_reconstruct, _run_reconstruct,
                       lambda job: _NOTHING_KEPT.format(out=job.out))


# --- anomaly --------------------------------------------------------------------------------------------------------

@dataclass
class _Anomaly:
    """Everything `anomaly` needs, checked (built by _prepare_anomaly), used by _run_anomaly."""
    args: argparse.Namespace
    info: "modelfile.ModelInfo"
    device: "torch.device"
    dtype: "torch.dtype"
    backend: str
    backends: dict
    schedule: object
    shape: tuple
    out: str
    names: dict                   # kind -> file name
    affine: "np.ndarray"          # the input's
    volume: "torch.Tensor"        # (C, D, H, W) in model units
    mask: Optional["torch.Tensor"]  # (1, D, H, W) bool or None
    threshold: object             # None, "otsu", ("percentile", p) or a number
    inputs: dict
    model: Optional["torch.nn.Module"] = None
    lock: object = None


def _threshold(text):
    """--threshold as None, "otsu", ("percentile", P) or a float."""
    if text is None:
        return None
    if text == "otsu":
        return "otsu"
    form, _, rest = text.partition(":")
    if form == "percentile":
        try:
            p = 99.0 if not rest else float(rest)
        except ValueError:
            p = math.nan
        if not 0 <= p <= 100:
            raise UsageError(f"--threshold {text}: the percentile must be a number in [0, 100]")
        return ("percentile", p)
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--threshold {text}: expected {_THRESHOLD_FORMS}") from None
    if not math.isfinite(value):
        raise UsageError(f"--threshold {text}: must be finite")
    return value


def _anomaly_names(prefix, thresholded):
    names = {"healthy": f"{prefix}_healthy.nii.gz", "map": f"{prefix}_map.nii.gz"}
    if thresholded:
        names["anomalies"] = f"{prefix}_anomalies.nii.gz"
    names.update(preview=f"{prefix}.png", sidecar=f"{prefix}.json")
    return names


@_bad_input_is_usage_error
def _prepare_anomaly(args):
    """Check every argument and input volume and load the model; raises UsageError. Writes nothing."""
    _check_count("--steps", args.steps)
    _check_seed(args.seed, 1)
    _check_prefix(args.prefix)
    if not 0.0 < args.level <= 1.0:
        raise UsageError(f"--level must be in (0, 1], got {args.level}")
    if int(args.steps * args.level) < 1:
        raise UsageError(f"--level {args.level:g} of --steps {args.steps} runs no step back (int(steps·level) = 0); "
                         f"raise --level to at least {1 / args.steps:.3g} or use more --steps")
    if not math.isfinite(args.smoothing) or args.smoothing < 0:
        raise UsageError(f"--smoothing must be a number of voxels >= 0, got {args.smoothing}")
    if not 0.0 < args.top_fraction <= 1.0:
        raise UsageError(f"--top-fraction must be in (0, 1], got {args.top_fraction}")
    thresh = _threshold(args.threshold)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    backend, chosen = _backends_for(device, dtype)
    model, schedule, info = _load_model(args)
    volume, source = _read_volume("--input", args.input, info.intensity)
    shape = tuple(info.volume_shape or volume.shape[1:])
    if info.volume_shape is None:
        _check_divisible("--input", shape, info)
    if tuple(volume.shape) != (info.channels, *shape):
        raise UsageError(f"--input {args.input}: a {volume.shape[0]}-channel {_shape_text(volume.shape[1:])} volume, "
                         f"but the model {info.name!r} takes {info.channels}-channel {_shape_text(shape)} volumes "
                         f"(its configured volume shape)")
    mask = None
    if args.mask is not None:
        mask, mask_source = _read_volume("--mask", args.mask)
        _check_same_geometry(("--input", args.input, source), ("--mask", args.mask, mask_source))
        if tuple(mask.shape) != (1, *shape):
            raise UsageError(f"--mask {args.mask}: a {mask.shape[0]}-channel {_shape_text(mask.shape[1:])} volume; "
                             f"expected one channel of {_shape_text(shape)}, like --input")
        mask = mask >= 0.5
        if not bool(mask.any()):
            raise UsageError(f"--mask {args.mask}: no voxel is inside (values >= 0.5)")
    _solver("ddim", args.steps, schedule, info)  # the steps the schedule allows, and a plan for the decoder
    out = os.path.abspath(args.out)
    _check_out_dir(out)
    names = _anomaly_names(args.prefix, thresh is not None)
    _check_outputs_free(out, list(names.values()), args.overwrite)
    job = _Anomaly(args=args, info=info, device=device, dtype=dtype, backend=backend, backends=chosen,
                   schedule=schedule, shape=shape, out=out, names=names, affine=source.affine, volume=volume,
                   mask=mask, threshold=thresh,
                   inputs=_input_file_fields({"--input": args.input, "--mask": args.mask}))
    job.model = model.to(device=device, dtype=dtype)
    return job


def _run_anomaly(job):
    import numpy as np
    import torch

    import pydiffmed

    from . import io
    from .inverse import anomaly_map, anomaly_score, reconstruct_healthy, threshold
    from .memory import InsufficientMemoryError

    args, info = job.args, job.info
    _keep_freed_memory_on_cpu(job.device)
    _open_out_dir(job.out, job.lock, lambda: _check_outputs_free(job.out, list(job.names.values()), args.overwrite))
    _remove_leftover_temporaries(job.out, job.names.values())
    options = {"prediction_type": info.prediction_type}
    if info.clip_sample is not None:
        options["clip"] = info.clip_sample
    began = time.perf_counter()
    try:
        healthy = reconstruct_healthy(job.model, job.volume[None].to(job.device), method=args.method,
                                      level=args.level, num_steps=args.steps, schedule=job.schedule, seed=args.seed,
                                      device=job.device, dtype=job.dtype, progress=not args.quiet, **options)
    except InsufficientMemoryError as exc:
        raise UsageError(f"--input {args.input}: {exc}") from None
    healthy = healthy[0].float().cpu()
    seconds = time.perf_counter() - began
    with np.errstate(over="ignore", invalid="ignore"):
        physical = io.denormalize(healthy.numpy().astype(np.float64), info.intensity)
    _check_finite_output(physical, "the healthy reconstruction")
    observed = io.denormalize(job.volume.numpy().astype(np.float64), info.intensity)  # as read (clipped)
    mask = None if job.mask is None else job.mask[None]
    amap = anomaly_map(torch.from_numpy(observed)[None], torch.from_numpy(physical)[None], args.smoothing,
                       mask=mask)
    score = float(anomaly_score(amap, top_fraction=args.top_fraction, mask=mask)[0])
    found = None
    if job.threshold is not None:
        method, percentile = job.threshold, 99.0
        if isinstance(method, tuple):
            method, percentile = method
        found = threshold(amap, method, percentile=percentile, mask=mask)[0, 0]
    amap = amap[0, 0].numpy()

    writers = {
        job.names["healthy"]: lambda path: io.save_volume(
            path, healthy, affine=job.affine, intensity=info.intensity, overwrite=args.overwrite,
            description=io.header_text(f"pydiffmed {pydiffmed.__version__} healthy {info.name} {args.method} "
                                       f"level {args.level:g} seed {args.seed}")),
        job.names["map"]: lambda path: io.save_volume(
            path, amap.astype(np.float32), affine=job.affine, overwrite=args.overwrite,
            description=io.header_text(f"pydiffmed {pydiffmed.__version__} anomaly map {info.name} {args.method}")),
    }
    if found is not None:
        writers[job.names["anomalies"]] = lambda path: io.save_volume(
            path, found.numpy().astype(np.uint8), affine=job.affine, dtype="uint8", overwrite=args.overwrite,
            description=io.header_text(f"pydiffmed {pydiffmed.__version__} anomalies {args.threshold}"))
    rows = np.stack([observed.mean(0), physical.mean(0), amap])
    writers[job.names["preview"]] = lambda path: io.save_preview(path, rows, affine=job.affine,
                                                                 overwrite=args.overwrite)
    sidecar = {
        "pydiffmed_version": pydiffmed.__version__,
        "command": "anomaly",
        **_model_fields(info),
        "inputs": job.inputs,
        "score": score,
        "score_definition": f"mean of the top {100 * args.top_fraction:g}% of the map's voxels"
                            f"{' inside --mask' if job.mask is not None else ''}",
        "top_fraction": args.top_fraction,
        "method": args.method,
        "level": args.level,
        "steps": args.steps,
        "seed": args.seed,
        "smoothing": args.smoothing,
        "threshold": args.threshold,
        "anomalous_voxels": None if found is None else int(found.sum()),
        "map_units": "|input − healthy| in the input's units (after the model's intensity clip), smoothed",
        **_runtime_fields(job.device, job.dtype, job.backend, job.backends, args.dtype),
        "shape": [info.channels, *job.shape],
        "spacing": list(io.spacing_from_affine(job.affine)),
        "orientation": io.orientation_from_affine(job.affine),
        "affine": [list(map(float, row)) for row in job.affine],
        "intensity": info.intensity,
        "files": {kind: name for kind, name in job.names.items() if kind != "sidecar"},
        "seconds": round(seconds, 6),
        "torch_version": torch.__version__,
    }
    _write_output_set(job.out, writers, job.names["sidecar"], sidecar, args.overwrite)
    found_text = "" if found is None else f", {int(found.sum())} anomalous voxel(s) (--threshold {args.threshold})"
    print(f"pydiffmed: anomaly score {score:.6g} for {args.input} (mean of the top {100 * args.top_fraction:g}% of "
          f"the map{' inside --mask' if job.mask is not None else ''}){found_text}; {', '.join(writers)} and "
          f"{job.names['sidecar']} in {job.out}; {args.method} level {args.level:g}, {args.steps} steps, "
          f"{seconds:.3g} s; device {job.device}, {dtype_name(job.dtype)}, backend {job.backend}")
    return 0


def _anomaly(args):
    return _run_locked(args, "anomaly", _prepare_anomaly, _run_anomaly, lambda job: _NOTHING_KEPT.format(out=job.out))


# --- the parsers ----------------------------------------------------------------------------------------------------

def _common_options(p, prefix):
    p.add_argument("--model", required=True, help="a bundled model name (see `pydiffmed models`), a model directory "
                                                  "or a .safetensors model file")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--prefix", default=prefix, help=f"output file name prefix (default {prefix})")
    p.add_argument("--steps", type=int, default=20, help="solver steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="model precision (auto: float16 on CUDA; on the CPU bfloat16 where it has native bf16, else "
                        "float32); the solver state stays float32")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same names")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


RECONSTRUCT_HELP = """\
Posterior sampling of an MRI or CT measurement with a diffusion model as the prior: each sample is a volume the
model finds plausible that agrees with the data (pydiffmed.inverse; posterior: projection = hard data
consistency, dds = a few conjugate-gradient steps per evaluation, dps = a gradient through the model, slower).

Writes PREFIX_k.nii.gz per sample k (seed = --seed + k; the model's voxel grid or --reference's, output units),
with --num > 1 PREFIX_mean.nii.gz and PREFIX_std.nii.gz (voxelwise mean and standard deviation over the samples,
n − 1 normalisation), PREFIX.png (mid-slices of the reconstruction, or of mean and std) and PREFIX.json (model and
sha256, settings, the sha256 of the input files and of every output, the relative data residual ‖Ax − y‖/‖y‖ of
each sample), the sidecar last. All outputs of a run are written whole or not at all.

Measurements are NumPy .npy files (or a .npz holding one array), read without unpickling (a pickled or object
array is refused), of the image in the model's OUTPUT units (those of the NIfTI files `sample` writes):
  --kspace   complex64/complex128, (coils, D, H, W) or (D, H, W) = CartesianMRI(mask, coils).forward(image):
             centred orthonormal FFT (DC at index n//2) over D, H, W (--mri-mode slice: over H, W per slice);
             values outside the mask are ignored
  --mask     bool or 0/1, D×H×W, or D×H (the same along W, the readout axis)
  --coils    sensitivity maps, complex (coils, D, H, W), one per k-space coil (without: one coil, S = 1)
  --sinogram real (D, views, detectors) = ParallelBeamCT(angles, (H, W), detectors, --detector-spacing)
             .forward(image): parallel-beam line integrals of every axial slice (axis 0), lengths in voxels
  --angles   a .npy/.npz of angles in radians, sparse:N (N views over 180°) or limited:N:SPAN[:START] (N views
             over SPAN degrees from START, default 0)
The volume shape must be the model's configured one. The command converts the data to model units:
y_model = (y − offset·A·1) / scale and sigma_y / |scale| (the model config's intensity scale and offset; the
operators are linear; the intensity clip applies to the output volumes only).
Bad input (a file that is missing, pickled, of the wrong shape or dtype, real k-space, NaN, a coil count or view
count that does not match) stops the command before any work with one line and exit status 2."""

ANOMALY_HELP = """\
Anomaly detection with a model of healthy anatomy (pydiffmed.inverse.anomaly): the input is noised part way
(--level of the --steps-step grid) and denoised back by the model; what the model changes is what it did not
expect. --method gaussian (SDEdit), simplex (AnoDDPM's simplex noise) or ddim_inversion (deterministic).

Writes, on the input's voxel grid: PREFIX_healthy.nii.gz (the reconstruction, output units), PREFIX_map.nii.gz
(|input − healthy| averaged over channels, Gaussian-smoothed by --smoothing voxels, normalised to --mask and
zero outside it, in the input's units), with --threshold PREFIX_anomalies.nii.gz (uint8, 1 = anomalous),
PREFIX.png (mid-slices of input, healthy, map) and PREFIX.json (the score, model and sha256, settings, the sha256
of the input files and of every output), the sidecar last; prints the score: the mean of the top --top-fraction
of the map's voxels (inside --mask). The input is read in the model's output units and converted as
`sample --init` does (clipped to the intensity clip). Bad input stops the command before any work with one line
and exit status 2."""


def add_parsers(sub):
    """Register `reconstruct` and `anomaly` on the `pydiffmed` command's subparsers."""
    from .inverse import POSTERIORS
    from .inverse.anomaly import METHODS

    r = sub.add_parser("reconstruct", help="posterior samples of an MRI (k-space) or CT (sinogram) measurement",
                       description=RECONSTRUCT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_options(r, "recon")
    kind = r.add_mutually_exclusive_group(required=True)
    kind.add_argument("--kspace", help="MRI k-space, .npy/.npz, complex (coils, D, H, W) or (D, H, W)")
    kind.add_argument("--sinogram", help="CT sinogram, .npy/.npz, real (D, views, detectors)")
    r.add_argument("--mask", help="MRI sampling mask, .npy/.npz, bool or 0/1, D×H×W or D×H")
    r.add_argument("--coils", help="MRI coil sensitivity maps, .npy/.npz, complex (coils, D, H, W)")
    r.add_argument("--mri-mode", choices=("3d", "slice"), default="3d",
                   help="3d: FFT over D, H, W (default); slice: 2-D FFT over H, W of every slice")
    r.add_argument("--angles", help="CT view angles: a .npy/.npz in radians, sparse:N or limited:N:SPAN[:START]")
    r.add_argument("--detector-spacing", type=float, default=1.0,
                   help="CT detector spacing in voxels (default 1)")
    r.add_argument("--reference", help="NIfTI whose voxel grid (affine) the outputs take (default: the model's "
                                       "spacing and orientation, centred)")
    r.add_argument("--posterior", choices=POSTERIORS, default="dds",
                   help="data step: projection, dds (default) or dps (slower: a gradient through the model)")
    r.add_argument("--solver", default="dpmpp_2m", help="solver name (default dpmpp_2m)")
    r.add_argument("--sigma-y", type=float, default=0.0,
                   help="standard deviation of the measurement noise, in the measurement's units (default 0)")
    r.add_argument("--num", type=int, default=1, help="posterior samples (default 1); more also write their mean "
                                                      "and standard deviation")
    r.add_argument("--batch", type=int, default=4, help="samples per model call (default 4)")
    r.add_argument("--eager", action="store_true", help="no CUDA graphs")
    r.set_defaults(func=_reconstruct)

    a = sub.add_parser("anomaly", help="anomaly map and score of a volume, from a model of healthy anatomy",
                       description=ANOMALY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_options(a, "anomaly")
    a.add_argument("--input", required=True, help="NIfTI volume to examine (the model's output units and shape)")
    a.add_argument("--method", choices=METHODS, default="gaussian", help="reconstruction method (default gaussian)")
    a.add_argument("--level", type=float, default=0.5,
                   help="noise level to start from, in (0, 1]: the fraction of the --steps grid run back "
                        "(default 0.5)")
    a.add_argument("--smoothing", type=float, default=1.0, help="Gaussian smoothing of the map, voxels (default 1)")
    a.add_argument("--mask", help="NIfTI mask on the input's grid (>= 0.5 inside, e.g. the brain): the map, "
                                  "threshold and score are restricted to it")
    a.add_argument("--threshold", help=f"also write a binary map: {_THRESHOLD_FORMS}")
    a.add_argument("--top-fraction", type=float, default=0.01,
                   help="the score is the mean of this fraction of the highest map voxels (default 0.01)")
    a.set_defaults(func=_anomaly)
