"""The pydiffmed model format: weights in safetensors plus a JSON config; loading never unpickles anything.

A model is either
  * a directory holding `model.safetensors` (the UNet3D state dict) and `config.json`, or
  * one `.safetensors` file whose metadata entry "pydiffmed_config" holds the same config as a JSON string.

config.json (format_version 1):

    {
      "format": "pydiffmed-model", "format_version": 1,
      "name": "demo", "description": "...",                  # optional (name defaults to the file/directory name)
      "unet": {...},                 # required: pydiffmed.models.UNet3D (= MONAI DiffusionModelUNet) arguments
      "schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear",
                   "beta_start": 0.0001, "beta_end": 0.02},   # required: the training noise schedule
      "prediction_type": "epsilon",  # required: epsilon | v_prediction | sample | score | flow | neg_flow
      "clip_sample": 1.0,            # optional: clamp x0 estimates to [-v, v] (MONAI/diffusers clip_sample=True)
      "volume_shape": [32, 32, 32],  # optional: the spatial size the model was trained at (null: unknown)
      "channels": 1,                 # optional: = unet.in_channels
      "spacing": [1.0, 1.0, 1.0],    # optional: output voxel size in mm per spatial axis
      "orientation": "RAS",          # optional: output axis code (see pydiffmed.io)
      "origin": null,                # optional: world position of voxel 0 (null: volume centred)
      "intensity": {"scale": 1.0, "offset": 0.0, "clip": null},  # optional: model units → physical units
                                     # (+ optional "units": "HU" for CT: DICOM output is then a CT series)
      "weights_sha256": "...",       # directory form: hash of model.safetensors, checked on load
      "source": {...}                # optional, free-form: how the model was made (training run, conversion)
    }

`schedule` keys by kind (the arguments of pydiffmed.schedules.NoiseSchedule's constructors; diffusers' name
`beta_schedule` for the discrete betas, which also accepts MONAI's names such as "scaled_linear_beta"):
  discrete: num_train_timesteps, beta_schedule (linear | scaled_linear | cosine | sigmoid) or betas (a list),
            beta_start, beta_end, rescale_zero_snr, cosine_s, max_beta, sigmoid_range
  vp, subvp: beta_min, beta_max, t_min, time_scale
  ve: sigma_min, sigma_max, t_min, time_input, time_scale
  flow: num_train_timesteps, t_min, t_max

`load_model(path_or_name)` returns (UNet3D in eval mode, NoiseSchedule, ModelInfo); a name that is not a path
is looked up among the models shipped in pydiffmed/models_data/ (`bundled_models()`). `convert_monai` imports a
MONAI bundle-style checkpoint (a state dict, possibly wrapped under "state_dict"/"model"/…, and a JSON/YAML
holding DiffusionModelUNet's arguments, either bare or as a bundle's network definition).

Every failure to read a model or bundle file is a ModelFileError (a CheckpointError, a ValueError) naming the file
and the key or problem. What a file can make pydiffmed read or allocate is bounded before the work is done:
configs of at most MAX_CONFIG_BYTES of UTF-8, at most MAX_CONFIG_VALUES values once YAML aliases and "@"
references are expanded, networks of at most MAX_PARAMETERS parameters (counted on a meta-device skeleton), and
weights are checked against that skeleton (names, shapes, float dtypes, finite values) before the network is built.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import warnings
from typing import Callable, NamedTuple

from . import prediction
from .io import (MAX_VOLUME_VOXELS, _check_triple, atomic_path, check_intensity, check_orientation, jsonable,
                 make_affine, write_json)
from .models.checkpoint import CheckpointError, load_state_dict_file
from .schedules import NoiseSchedule

FORMAT = "pydiffmed-model"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METADATA_KEY = "pydiffmed_config"
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models_data")

_SCHEDULE_KEYS = {
    "discrete": ("num_train_timesteps", "beta_schedule", "betas", "beta_start", "beta_end", "rescale_zero_snr",
                 "cosine_s", "max_beta", "sigmoid_range"),
    "vp": ("beta_min", "beta_max", "t_min", "time_scale"),
    "subvp": ("beta_min", "beta_max", "t_min", "time_scale"),
    "ve": ("sigma_min", "sigma_max", "t_min", "time_input", "time_scale"),
    "flow": ("num_train_timesteps", "t_min", "t_max"),
}
_REQUIRED_UNET_ARGS = ("spatial_dims", "in_channels", "out_channels")

# Bounds on what a file may make pydiffmed read or allocate: each is checked before the work it bounds.
MAX_CONFIG_BYTES = 16 << 20          # a config.json / bundle JSON or YAML file
MAX_CONFIG_VALUES = 1_000_000        # values in a config once YAML aliases and "@" references are expanded
MAX_PARAMETERS = 4_000_000_000       # parameters of a network a config may describe (16 GB in float32)
_MAX_UNET_SIZE = 1 << 24             # any one size (channels, embedding dims, ...) of a network argument
_MAX_UNET_BLOCKS = 2000              # resnet and attention blocks of a network (a bound on building it)


class ModelFileError(CheckpointError):
    """A model file or config that cannot be used; the message names the file and every problem found."""


# --- schedules ---------------------------------------------------------------------------------------------

def build_schedule(spec) -> NoiseSchedule:
    """The NoiseSchedule described by a config's `schedule` dict (see the module docstring)."""
    if not isinstance(spec, dict):
        raise ValueError(f"schedule must be a dict, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.pop("kind", "discrete")
    if not isinstance(kind, str) or kind not in _SCHEDULE_KEYS:
        raise ValueError(f"schedule: kind must be one of {tuple(_SCHEDULE_KEYS)}, got {kind!r}")
    unknown = sorted(set(spec) - set(_SCHEDULE_KEYS[kind]), key=str)
    if unknown:
        raise ValueError(f"schedule: unknown key(s) {unknown} for kind {kind!r}; allowed: "
                         f"{', '.join(_SCHEDULE_KEYS[kind])}")
    if kind != "discrete":
        return getattr(NoiseSchedule, kind)(**spec)
    if "betas" in spec and "beta_schedule" in spec:
        raise ValueError("schedule: give beta_schedule or betas, not both")
    betas = spec.pop("betas", None)
    if betas is not None:
        if not isinstance(betas, (list, tuple)):
            raise ValueError(f"schedule: betas must be a list of numbers, got {type(betas).__name__}")
        if "num_train_timesteps" in spec and spec.pop("num_train_timesteps") != len(betas):
            raise ValueError(f"schedule: num_train_timesteps does not match the {len(betas)} betas given")
    else:
        betas = spec.pop("beta_schedule", "linear")
        if not isinstance(betas, str):
            raise ValueError(f"schedule: beta_schedule must be a name, got {betas!r}")
    return NoiseSchedule.discrete(betas=betas, **spec)


# --- config validation -------------------------------------------------------------------------------------

def _unet_parameters():
    from .models import UNet3D

    return [p for p in inspect.signature(UNet3D.__init__).parameters if p != "self"]


def _unet_skeleton(args):
    """UNet3D(**args) on the meta device: its shapes without its memory. ValueError naming the argument that is
    wrong, or saying that the network is too large (more than MAX_PARAMETERS), before anything is allocated."""
    import torch

    from .models import UNet3D
    from .models.unet import _check_types

    _check_types(args)
    for key, value in args.items():
        for size in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(size, int) and size > _MAX_UNET_SIZE:
                raise ValueError(f"{key} holds {size}, beyond any real network (at most {_MAX_UNET_SIZE})")
    levels = len(args.get("channels", (32, 64, 64, 64)))
    res_blocks = args.get("num_res_blocks", 2)
    res_blocks = res_blocks if isinstance(res_blocks, (list, tuple)) else [res_blocks] * levels
    blocks = sum(2 * n + 3 for n in res_blocks[:levels]) * (1 + args.get("transformer_num_layers", 1))
    if levels > 64 or blocks > _MAX_UNET_BLOCKS:
        raise ValueError(f"channels ({levels} levels), num_res_blocks and transformer_num_layers make ~{blocks} "
                         f"blocks, more than pydiffmed builds ({_MAX_UNET_BLOCKS})")
    try:
        with torch.device("meta"):
            skeleton = UNet3D(**args)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"the network would have {count:.3g} parameters ({4 * count / 2**30:.3g} GiB in float32), "
                         f"more than pydiffmed loads ({MAX_PARAMETERS:.3g}); check channels, num_res_blocks, "
                         f"transformer_num_layers, cross_attention_dim and num_class_embeds")
    return skeleton


def _build_unet(args, state, blame):
    """UNet3D(**args) holding the weights `state`. The weights are checked (names, shapes, float dtypes, finite
    values) against a meta-device skeleton first, so a file that does not fit is refused before the network's
    memory is allocated. ModelFileError(f"{blame}: ...") for weights that do not fit."""
    from .models import UNet3D
    from .models.checkpoint import check_state_dict, convert_monai_state_dict

    try:
        check_state_dict(_unet_skeleton(args), convert_monai_state_dict(state))
    except CheckpointError as exc:
        raise ModelFileError(f"{blame}: {exc}") from exc
    model = UNet3D(**args)
    model.load_state_dict(state)
    return model


class _Problems(ValueError):
    """Problems with one config key, each message complete (a check that finds several raises them together)."""


def _check_format(value, unet):
    if value != FORMAT:
        raise ValueError(f"format must be {FORMAT!r}, got {value!r}")
    return FORMAT


def _check_format_version(version, unet):
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"format_version {version} is newer than this pydiffmed reads ({FORMAT_VERSION}); "
                         f"upgrade pydiffmed")
    return FORMAT_VERSION


def _string_or_null(key):
    def check(value, unet):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    return check


def _check_unet(unet, _):
    if not isinstance(unet, dict):
        raise ValueError(f"unet must be an object of UNet3D arguments, got {type(unet).__name__}")
    problems = []
    allowed = _unet_parameters()
    bad = sorted(set(unet) - set(allowed), key=str)
    if bad:
        problems.append(f"unet: unknown argument(s) {bad}; UNet3D accepts: {', '.join(allowed)}")
    absent = [k for k in _REQUIRED_UNET_ARGS if k not in unet]
    if absent:
        problems.append(f"unet: missing required argument(s) {absent}")
    if not bad and not absent:
        try:
            _unet_skeleton(unet)
        except ValueError as exc:
            problems.append(f"unet: {exc}")
    in_channels = unet.get("in_channels")
    if in_channels is not None and unet.get("out_channels") != in_channels:
        problems.append(f"unet: out_channels ({unet.get('out_channels')}) must equal in_channels ({in_channels}): "
                        f"pydiffmed samples models whose output has the input's shape")
    if problems:
        raise _Problems(*problems)
    return unet


def _check_schedule(spec, unet):
    build_schedule(spec)
    spec.setdefault("kind", "discrete")
    return spec


def _check_prediction_type(value, unet):
    return prediction.canonical(value)


def _check_clip_sample(clip, unet):
    if clip is True:
        return 1.0
    if clip is None or clip is False:
        return None
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip_sample must be null, true or a positive number, got {clip!r}")
    return float(clip)


def _check_volume_shape(shape, unet):
    """Against the network (`unet`: its arguments, None when they are not an object): its number of spatial
    dimensions, its channels (the voxel bound) and its levels (each halves the size)."""
    if shape is None:
        return None
    spatial_dims, in_channels, levels = 3, None, None
    if unet is not None:
        spatial_dims, in_channels = unet.get("spatial_dims", 3), unet.get("in_channels")
        levels = unet.get("channels", (32, 64, 64, 64))
        levels = len(levels) if isinstance(levels, (list, tuple)) else None
    if (not isinstance(shape, (list, tuple)) or len(shape) != spatial_dims
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"volume_shape must be {spatial_dims} positive ints, got {shape!r}")
    if math.prod(shape) * (in_channels if isinstance(in_channels, int) else 1) > MAX_VOLUME_VOXELS:
        raise ValueError(f"volume_shape {list(shape)} holds more than {MAX_VOLUME_VOXELS} voxels, more than "
                         f"pydiffmed reads or writes in one volume")
    if levels:
        factor = 2 ** (levels - 1)
        if any(s % factor for s in shape):
            raise ValueError(f"volume_shape {list(shape)} must be divisible by {factor} (the network halves each "
                             f"spatial size {levels - 1} times)")
    return list(shape)


def _in_channels(unet):
    return None if unet is None else unet.get("in_channels")


def _check_channels(channels, unet):
    in_channels = _in_channels(unet)
    if channels is not None and in_channels is not None and channels != in_channels:
        raise ValueError(f"channels ({channels}) must equal unet.in_channels ({in_channels})")
    return channels


def _check_spacing(value):
    return list(_check_triple("spacing", value, positive=True))


def _check_origin(value):
    return list(_check_triple("origin", value))


def _null_is(default, check):
    """A key whose null means `default`; other values go through check(value)."""
    return lambda value, unet: copy.deepcopy(default) if value is None else check(value)


def _check_weights_sha256(digest, unet):
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError(f"weights_sha256 must be 64 lower-case hex digits, got {digest!r}")
    return digest


def _check_source(value, unet):
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"source must be an object, got {type(value).__name__}")
    return value


_REQUIRED = object()  # ConfigKey.absent of a key every config must have
_OMITTED = object()   # ConfigKey.absent of a key left out of the completed config when the file has none


class _ConfigKey(NamedTuple):
    """One config key: check(value, unet) -> the completed value (ValueError/TypeError: the problem; `unet` is the
    config's network arguments, None when they are not an object), and what stands for it when the config lacks
    it: a default value, a function of `unet`, _REQUIRED or _OMITTED."""
    check: Callable
    absent: object


# Every key of a model config, in the order the completed config lists them (the module docstring describes them).
_CONFIG_KEYS = {
    "format": _ConfigKey(_check_format, FORMAT),
    "format_version": _ConfigKey(_check_format_version, FORMAT_VERSION),
    "name": _ConfigKey(_string_or_null("name"), _OMITTED),
    "description": _ConfigKey(_string_or_null("description"), ""),
    "unet": _ConfigKey(_check_unet, _REQUIRED),
    "schedule": _ConfigKey(_check_schedule, _REQUIRED),
    "prediction_type": _ConfigKey(_check_prediction_type, _REQUIRED),
    "clip_sample": _ConfigKey(_check_clip_sample, None),
    "volume_shape": _ConfigKey(_check_volume_shape, None),
    "channels": _ConfigKey(_check_channels, _in_channels),
    "spacing": _ConfigKey(_null_is([1.0, 1.0, 1.0], _check_spacing), [1.0, 1.0, 1.0]),
    "orientation": _ConfigKey(_null_is("RAS", check_orientation), "RAS"),
    "origin": _ConfigKey(_null_is(None, _check_origin), None),
    "intensity": _ConfigKey(_null_is(None, check_intensity), None),
    "weights_sha256": _ConfigKey(_check_weights_sha256, _OMITTED),
    "source": _ConfigKey(_check_source, _OMITTED),
}
_REQUIRED_KEYS = tuple(k for k, spec in _CONFIG_KEYS.items() if spec.absent is _REQUIRED)


def validate_config(config, source: str = "config") -> dict:
    """Check a model config (see the module docstring) and return it completed with defaults. Raises
    ModelFileError("<source>: invalid model config: ...") listing every problem found."""
    if not isinstance(config, dict):
        raise ModelFileError(f"{source}: a model config must be a JSON object, got {type(config).__name__}")
    problems = []
    unknown = sorted(set(config) - set(_CONFIG_KEYS), key=str)
    if unknown:
        allowed = _REQUIRED_KEYS + tuple(k for k in _CONFIG_KEYS if k not in _REQUIRED_KEYS)
        problems.append(f"unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        problems.append(f"missing required key(s) {missing}")
    try:
        values = jsonable(config)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"{source}: a model config must hold JSON values only ({exc})") from exc

    unet = values.get("unet") if isinstance(values.get("unet"), dict) else None
    out = {}
    for key, spec in _CONFIG_KEYS.items():
        if key not in values:
            if spec.absent is not _REQUIRED and spec.absent is not _OMITTED:
                out[key] = spec.absent(unet) if callable(spec.absent) else copy.deepcopy(spec.absent)
            continue
        try:
            out[key] = spec.check(values[key], unet)
        except (TypeError, ValueError) as exc:
            for problem in (exc.args if isinstance(exc, _Problems) else (str(exc),)):
                problems.append(problem if problem.startswith(key) else f"{key}: {problem}")
    if problems:
        raise ModelFileError(f"{source}: invalid model config:\n  - " + "\n  - ".join(problems))
    return out


# --- model info --------------------------------------------------------------------------------------------

class ModelInfo:
    """What is known about a model file without running it: `config` (validated, defaults filled in), `name`,
    `description`, `path` (the directory or file), `weights_path`, `sha256` (of the weights file: the model's
    identity for provenance), and shortcuts to the config entries."""

    def __init__(self, config: dict, path: str, weights_path: str, sha256: str):
        self.config = config
        self.path = path
        self.weights_path = weights_path
        self.sha256 = sha256
        self.name = config.get("name") or _default_name(path)
        self.description = config.get("description", "")

    unet = property(lambda self: self.config["unet"])
    schedule_config = property(lambda self: self.config["schedule"])
    prediction_type = property(lambda self: self.config["prediction_type"])
    clip_sample = property(lambda self: self.config["clip_sample"])
    volume_shape = property(lambda self: None if self.config["volume_shape"] is None
                            else tuple(self.config["volume_shape"]))
    channels = property(lambda self: self.config["channels"])
    spacing = property(lambda self: tuple(self.config["spacing"]))
    orientation = property(lambda self: self.config["orientation"])
    origin = property(lambda self: self.config["origin"])
    intensity = property(lambda self: self.config["intensity"])

    def affine(self, shape=None, spacing=None):
        """4×4 voxel-to-world affine for an output of spatial `shape` (default volume_shape), with the model's
        spacing (or the `spacing` override), orientation and origin (centred when the config has none)."""
        shape = self.volume_shape if shape is None else tuple(shape)
        return make_affine(self.spacing if spacing is None else spacing, self.orientation, self.origin, shape)

    def __repr__(self):
        return f"ModelInfo(name={self.name!r}, path={self.path!r}, sha256={self.sha256[:12]}…)"


def _default_name(path):
    base = os.path.basename(os.path.normpath(path))
    return base[: -len(".safetensors")] if base.endswith(".safetensors") else base


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- locating and reading ----------------------------------------------------------------------------------

def bundled_models() -> list:
    """Names of the models shipped in pydiffmed/models_data (a directory with config.json, or a .safetensors)."""
    if not os.path.isdir(MODELS_DIR):
        return []
    names = []
    for entry in sorted(os.listdir(MODELS_DIR)):
        full = os.path.join(MODELS_DIR, entry)
        if os.path.isdir(full) and os.path.isfile(os.path.join(full, CONFIG_NAME)):
            names.append(entry)
        elif entry.endswith(".safetensors") and os.path.isfile(full):
            names.append(entry[: -len(".safetensors")])
    return names


def resolve_model_path(path_or_name) -> str:
    """A path as given if it exists, else the bundled model of that name; ModelFileError otherwise. A bare name
    that exists here only as a directory without a config (e.g. a `demo/` folder in the working directory) still
    means the bundled model."""
    path = os.fspath(path_or_name)
    bare_name = os.sep not in path and "/" not in path and path not in ("", ".", "..")
    looks_like_model = os.path.isfile(path) or os.path.isfile(os.path.join(path, CONFIG_NAME))
    if os.path.exists(path) and (looks_like_model or not bare_name):
        return path
    if bare_name:
        for candidate in (os.path.join(MODELS_DIR, path), os.path.join(MODELS_DIR, path + ".safetensors")):
            if os.path.isfile(candidate) or os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
                return candidate
    if os.path.exists(path):
        return path
    bundled = bundled_models()
    available = f"bundled models: {', '.join(bundled)}" if bundled else "no bundled models are installed"
    raise ModelFileError(f"{path}: no such file or directory, and not the name of a bundled model ({available})")


def _read_safetensors(path, want_tensors=True):
    """(tensors or None, metadata dict) of a .safetensors file, every failure a ModelFileError naming it."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()} if want_tensors else None
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ValueError, RuntimeError, ...
        raise ModelFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return tensors, metadata


def _read_text(path) -> str:
    """The UTF-8 text of a config file of at most MAX_CONFIG_BYTES; ModelFileError naming it otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, too large for a config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); "
                             f"save the file as UTF-8") from exc


def _parse_json(text, source):
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise ModelFileError(f"{source}: not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, and ValueError for integers too long to convert
        raise ModelFileError(f"{source}: not valid JSON ({exc})") from exc


def _read_config_file(path) -> dict:
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: missing (a pydiffmed model directory holds {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME})")
    return _parse_json(_read_text(path), path)


def _locate(path_or_name, want_tensors):
    """(config, info, tensors or None) of a model directory or single file."""
    path = resolve_model_path(path_or_name)
    if os.path.isdir(path):
        config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        config = validate_config(_read_config_file(config_path), config_path)
        if not os.path.isfile(weights_path):
            raise ModelFileError(f"{weights_path}: missing (the weights of the model described by {config_path})")
        tensors, _ = _read_safetensors(weights_path, want_tensors)
        digest = file_sha256(weights_path)
        expected = config.get("weights_sha256")
        if expected is not None and expected != digest:
            raise ModelFileError(f"{weights_path}: does not match {config_path} (sha256 {digest[:16]}…, the config "
                                 f"expects {expected[:16]}…): the directory holds files from different saves")
        return config, ModelInfo(config, path, weights_path, digest), tensors
    if not path.endswith(".safetensors"):
        raise ModelFileError(f"{path}: not a pydiffmed model (a directory with {CONFIG_NAME} + {WEIGHTS_NAME}, or "
                             f"a .safetensors file with an embedded config); import a MONAI checkpoint with "
                             f"`pydiffmed convert --monai-checkpoint ... --monai-config ... --out DIR`")
    tensors, metadata = _read_safetensors(path, want_tensors)
    if METADATA_KEY not in metadata:
        raise ModelFileError(f"{path}: a .safetensors file without an embedded pydiffmed config (metadata key "
                             f"{METADATA_KEY!r}); bare weights need a {CONFIG_NAME} beside them in a directory "
                             f"named as the model, with the weights renamed {WEIGHTS_NAME}")
    raw = _parse_json(metadata[METADATA_KEY], f"{path} (embedded config)")
    config = validate_config(raw, f"{path} (embedded config)")
    return config, ModelInfo(config, path, path, file_sha256(path)), tensors


def read_model_info(path_or_name) -> ModelInfo:
    """The validated config and weights hash of a model, without building the network or reading tensors."""
    return _locate(path_or_name, want_tensors=False)[1]


def load_model(path_or_name, *, device=None, dtype=None):
    """Load a pydiffmed model (directory, single .safetensors, or bundled name) → (UNet3D in eval mode,
    NoiseSchedule, ModelInfo). Never unpickles: weights come from safetensors. ModelFileError, naming the file,
    for a missing/truncated/corrupt file, an invalid config, or weights that do not fit the configured network
    (names, shapes, float parameters stored as integers, NaN/Inf values)."""
    config, info, tensors = _locate(path_or_name, want_tensors=True)
    config_source = info.path if info.path == info.weights_path else os.path.join(info.path, CONFIG_NAME)
    model = _build_unet(config["unet"], tensors,
                        f"{info.weights_path}: weights do not fit the network configured in {config_source}")
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model, build_schedule(config["schedule"]), info


# --- writing -----------------------------------------------------------------------------------------------

def save_model(path, model, config, *, overwrite: bool = False) -> ModelInfo:
    """Save a UNet3D and its config (everything but `unet`, which is read from the model) as a pydiffmed model:
    a directory (`path` without the .safetensors suffix) or a single `.safetensors` file. Each file is written
    atomically; existing files are kept unless overwrite=True. Returns the ModelInfo of what was written."""
    from safetensors.torch import save_file

    from .models import UNet3D

    if not isinstance(model, UNet3D):
        raise TypeError(f"model must be a pydiffmed.models.UNet3D, got {type(model).__name__}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if "unet" in config:
        raise ValueError("config must not hold 'unet': save_model writes the network arguments of the model itself")
    if "weights_sha256" in config:
        raise ValueError("config must not hold 'weights_sha256': save_model computes it")
    path = os.fspath(path)
    single_file = path.endswith(".safetensors")
    full = copy.deepcopy(config)
    full["unet"] = jsonable(model.config)
    full.setdefault("name", _default_name(path))
    full = validate_config(full, path)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}

    if single_file:
        metadata = {"format": FORMAT, METADATA_KEY: json.dumps(full, allow_nan=False)}
        with atomic_path(path, overwrite) as temporary:
            save_file(tensors, temporary, metadata=metadata)
        return ModelInfo(full, path, path, file_sha256(path))

    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    weights_path, config_path = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    if not overwrite:
        for existing in (weights_path, config_path):
            if os.path.lexists(existing):
                raise FileExistsError(f"{existing} already exists (pass overwrite=True to replace it)")
    os.makedirs(path, exist_ok=True)
    # Weights first, then the config naming their hash: a save interrupted in between leaves a directory whose
    # files disagree, which load_model reports, instead of one that silently pairs old and new.
    with atomic_path(weights_path, overwrite) as temporary:
        save_file(tensors, temporary, metadata={"format": FORMAT})
    full["weights_sha256"] = file_sha256(weights_path)
    write_json(config_path, full, overwrite)
    return ModelInfo(full, path, weights_path, full["weights_sha256"])


# --- MONAI import ------------------------------------------------------------------------------------------

_BUNDLE_META_KEYS = ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_")
_RENAMED_UNET_ARGS = {"num_channels": "channels"}  # MONAI GenerativeModels → MONAI core


def _read_structured(path) -> dict:
    """The mapping in a JSON or YAML file: at most MAX_CONFIG_BYTES of UTF-8, at most MAX_CONFIG_VALUES values
    once YAML aliases are expanded (a YAML "billion laughs" is refused, not expanded); ModelFileError naming the
    file otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    text = _read_text(path)
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ModelFileError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from exc
        try:
            data = yaml.safe_load(text)
        except RecursionError as exc:
            raise ModelFileError(f"{path}: not valid YAML (nested too deeply)") from exc
        except yaml.YAMLError as exc:
            raise ModelFileError(f"{path}: not valid YAML ({exc})") from exc
    else:
        data = _parse_json(text, path)
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        _expanded_size(data, path, {}, set())
    except RecursionError as exc:
        raise ModelFileError(f"{path}: nested too deeply") from exc
    return data


def _expanded_size(value, source, sizes, open_ids) -> int:
    """How many values `value` holds with every shared (YAML-aliased) part counted each time it is used; each
    distinct object is walked once. ModelFileError above MAX_CONFIG_VALUES or for a structure that holds itself."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) in sizes:
        return sizes[id(value)]
    if id(value) in open_ids:
        raise ModelFileError(f"{source}: an entry contains itself (a recursive YAML alias)")
    open_ids.add(id(value))
    total = 1
    for item in value.values() if isinstance(value, dict) else value:
        total += _expanded_size(item, source, sizes, open_ids)
        if total > MAX_CONFIG_VALUES:
            raise ModelFileError(f"{source}: expands to more than {MAX_CONFIG_VALUES} values (YAML aliases "
                                 f"repeated inside each other?); refusing to expand it")
    open_ids.discard(id(value))
    sizes[id(value)] = total
    return total


def _resolve_references(value, root, source, where, depth=0, budget=None):
    """Replace MONAI bundle references "@key" (and "@a#b" for nested entries) by the values they name. The
    result may hold at most MAX_CONFIG_VALUES values (references that repeat each other are refused)."""
    budget = [MAX_CONFIG_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ModelFileError(f"{source}: {where}: its \"@\" references expand to more than {MAX_CONFIG_VALUES} "
                             f"values (references repeated inside each other?); refusing to expand them")
    if depth > 20:
        raise ModelFileError(f"{source}: {where}: references nest too deeply (a cycle?)")
    if isinstance(value, dict):
        return {k: _resolve_references(v, root, source, f"{where}.{k}", depth, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_references(v, root, source, f"{where}[{i}]", depth, budget) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("@"):
        target = root
        for part in value[1:].split("#"):
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdecimal() and len(part) < 10 and int(part) < len(target):
                target = target[int(part)]
            else:
                raise ModelFileError(f"{source}: {where}: reference {value!r} names no entry of the config")
        return _resolve_references(target, root, source, where, depth + 1, budget)
    if isinstance(value, str) and value[:1] in ("$", "%"):
        raise ModelFileError(f"{source}: {where}: {value!r} is a bundle expression or macro, which pydiffmed does "
                             f"not evaluate; replace it with its value")
    return value


_MONAI_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "RFlowScheduler")


def _targets(config, suffixes):
    return [(key, value) for key, value in config.items()
            if isinstance(value, dict) and str(value.get("_target_", "")).endswith(suffixes)]


def _monai_network_args(config, source) -> dict:
    if "_target_" in config:
        network, where = config, "network"
    else:
        found = _targets(config, "DiffusionModelUNet")
        if len(found) > 1:
            raise ModelFileError(f"{source}: several DiffusionModelUNet definitions ({', '.join(k for k, _ in found)});"
                                 f" keep only the one to convert")
        if found:
            where, network = found[0]
        elif "spatial_dims" in config and "in_channels" in config:
            network, where = config, "config"
        else:
            raise ModelFileError(f"{source}: no DiffusionModelUNet arguments found (expected the constructor "
                                 f"arguments, or a bundle entry whose _target_ is a DiffusionModelUNet)")
    args = {}
    for key, value in network.items():
        if key in _BUNDLE_META_KEYS:
            continue
        if network is config and isinstance(value, dict) and "_target_" in value:
            continue  # other bundle components next to bare arguments
        args[_RENAMED_UNET_ARGS.get(key, key)] = _resolve_references(value, config, source, f"{where}.{key}")
    allowed = _unet_parameters()
    unknown = sorted(set(args) - set(allowed), key=str)
    if unknown:
        raise ModelFileError(f"{source}: {where}: argument(s) {unknown} are not DiffusionModelUNet arguments "
                             f"pydiffmed knows ({', '.join(allowed)})")
    return args


def _monai_schedule(config, source):
    """(schedule dict, prediction type, clip_sample, description of where it came from) from a bundle's
    scheduler entry, or MONAI's DDPMScheduler defaults when there is none."""
    found = _targets(config, _MONAI_SCHEDULERS)
    if not found:
        return ({"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear",
                 "beta_start": 1e-4, "beta_end": 0.02}, "epsilon", 1.0,
                "MONAI DDPMScheduler defaults (the config names no scheduler)")
    key, entry = found[0]
    entry = _resolve_references(entry, config, source, key)
    target = str(entry["_target_"])
    steps = entry.get("num_train_timesteps", 1000)
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if target.endswith("RFlowScheduler"):
        return {"kind": "flow", "num_train_timesteps": steps}, "neg_flow", None, f"{key} ({target})"
    name = entry.get("schedule", entry.get("beta_schedule", "linear_beta"))
    schedule = {"kind": "discrete", "num_train_timesteps": steps, "beta_schedule": name}
    for theirs, ours in (("beta_start", "beta_start"), ("beta_end", "beta_end"), ("sig_range", "sigmoid_range"),
                         ("s", "cosine_s")):
        if theirs in entry:
            schedule[ours] = entry[theirs]
    clip = entry.get("clip_sample", True)
    if not isinstance(clip, bool):
        raise ModelFileError(f"{source}: {key}.clip_sample must be true or false, got {clip!r}")
    bounds = [entry.get("clip_sample_min", -1.0), entry.get("clip_sample_max", 1.0)]
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds):
        raise ModelFileError(f"{source}: {key}: clip_sample_min and clip_sample_max must be finite numbers, "
                             f"got {bounds}")
    clip_value = max(abs(float(b)) for b in bounds)
    return schedule, entry.get("prediction_type", "epsilon"), (clip_value if clip else None), f"{key} ({target})"


def convert_monai(checkpoint_path, monai_config_path, out, *, name=None, description=None, schedule=None,
                  prediction_type=None, clip_sample=None, volume_shape=None, spacing=None, orientation=None,
                  intensity=None, overwrite: bool = False) -> ModelInfo:
    """Convert a MONAI DiffusionModelUNet checkpoint into a pydiffmed model at `out` (directory, or a
    `.safetensors` path for the single-file form).

    checkpoint_path: a torch state dict (read with torch.load(weights_only=True): pickled objects are refused),
      possibly wrapped under "state_dict", "model", … or carrying DataParallel's "module." prefix; or a
      .safetensors file. Today's MONAI key names and the older GenerativeModels ones both load.
    monai_config_path: JSON or YAML holding the constructor arguments, bare or as a bundle component (an entry
      whose _target_ is DiffusionModelUNet; "@key" references are resolved). A scheduler entry in the same file
      (DDPM/DDIM/PNDM/RFlowScheduler) gives the schedule and prediction type; without one, MONAI's
      DDPMScheduler defaults apply (with a warning). Keyword arguments override what the files say."""
    checkpoint_path, monai_config_path = os.fspath(checkpoint_path), os.fspath(monai_config_path)
    bundle = _read_structured(monai_config_path)
    args = _monai_network_args(bundle, monai_config_path)
    found_schedule, found_prediction, found_clip, schedule_source = _monai_schedule(bundle, monai_config_path)
    config = {
        "name": name or _default_name(out),
        "description": description if description is not None else
        f"converted from MONAI checkpoint {os.path.basename(checkpoint_path)}",
        "schedule": found_schedule if schedule is None else schedule,
        "prediction_type": found_prediction if prediction_type is None else prediction_type,
        "clip_sample": found_clip if clip_sample is None else clip_sample,
        "source": {"converted_from": "monai", "checkpoint": os.path.basename(checkpoint_path),
                   "checkpoint_sha256": None,  # below, once the checkpoint has loaded
                   "config": os.path.basename(monai_config_path),
                   "schedule_from": "arguments" if schedule is not None else schedule_source},
    }
    for key, value in (("volume_shape", volume_shape), ("spacing", spacing), ("orientation", orientation),
                       ("intensity", intensity)):
        if value is not None:
            config[key] = value
    # What the config says is checked before the checkpoint is read or the network built.
    validate_config({**config, "unet": args}, monai_config_path)
    state = load_state_dict_file(checkpoint_path)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    config["source"]["checkpoint_sha256"] = file_sha256(checkpoint_path)
    model = _build_unet(args, state, f"{checkpoint_path}: does not fit the network described by {monai_config_path}")
    if schedule is None and schedule_source.startswith("MONAI DDPMScheduler defaults"):
        warnings.warn(f"{monai_config_path} names no scheduler: assuming MONAI DDPMScheduler defaults (1000 steps, "
                      f"linear betas 1e-4..0.02, epsilon); pass schedule= to override", stacklevel=2)
    return save_model(out, model, config, overwrite=overwrite)


__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "MODELS_DIR", "ModelFileError", "ModelInfo", "WEIGHTS_NAME",
           "build_schedule", "bundled_models", "convert_monai", "file_sha256", "load_model", "read_model_info",
           "resolve_model_path", "save_model", "validate_config"]
