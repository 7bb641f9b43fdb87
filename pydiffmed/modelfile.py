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
      "source": {...},               # optional, free-form: how the model was made (training run, conversion)
      "autoencoder": {               # optional: a latent model (directory form only), see below
        "args": {...},               # pydiffmed.models.AutoencoderKL (= MONAI AutoencoderKL) arguments
        "scale_factor": 1.0,         # latents are divided by it before decoding (MONAI's LatentDiffusionInferer)
        "weights_sha256": "..."}     # hash of autoencoder.safetensors, checked on load
    }

Latent models. A directory whose config has an `autoencoder` entry also holds `autoencoder.safetensors`: the UNet
samples latents of shape (args.latent_channels, *volume_shape / f), f = 2**(len(args.channels) - 1) the
autoencoder's downsampling, and the autoencoder decodes them into the images users get. `volume_shape` and
`channels` describe those images (channels = args.out_channels); the checks: unet.in_channels == latent_channels,
the same spatial_dims, and volume_shape divisible by f · 2**(UNet levels - 1). `load_model` returns the UNet as
for any model (it samples latents; `info.is_latent`, `info.scale_factor`, `info.latent_shape(image_shape)`),
`load_autoencoder(path)` the autoencoder, and `pydiffmed.sample(unet, (B, *info.latent_shape()), ...,
autoencoder=ae, scale_factor=info.scale_factor)` the images: two networks, each loaded and moved by the user as
needed (the decoder often runs by slabs or on another device), rather than one wrapper object.
`convert_monai_bundle` makes such a directory from a MONAI bundle (see its docstring for what it assumes).

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
import re
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
AUTOENCODER_WEIGHTS_NAME = "autoencoder.safetensors"
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
    return _meta_skeleton(UNet3D, args, "the network", "channels, num_res_blocks, transformer_num_layers, "
                                                       "cross_attention_dim and num_class_embeds")


def _meta_skeleton(cls, args, what, sizes):
    """cls(**args) on the meta device (no memory), refused (ValueError) when its parameters are more than pydiffmed
    loads; `sizes` names the arguments to check then."""
    import torch

    try:
        with torch.device("meta"):
            skeleton = cls(**args)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"{what} would have {count:.3g} parameters ({4 * count / 2**30:.3g} GiB in float32), "
                         f"more than pydiffmed loads ({MAX_PARAMETERS:.3g}); check {sizes}")
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


# --- latent models: the autoencoder ------------------------------------------------------------------------

_AE_INT_ARGS = ("spatial_dims", "in_channels", "out_channels", "latent_channels", "norm_num_groups")
_AE_BOOL_ARGS = ("with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn", "use_checkpoint", "use_convtranspose",
                 "include_fc", "use_combined_linear", "use_flash_attention")
_AE_KEYS = ("args", "scale_factor", "weights_sha256")
_REQUIRED_AE_ARGS = ("spatial_dims",)


def _autoencoder_parameters():
    from .models import AutoencoderKL

    return [p for p in inspect.signature(AutoencoderKL.__init__).parameters if p != "self"]


def _is_count(value, minimum=1):
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= _MAX_UNET_SIZE


def _autoencoder_skeleton(args):
    """AutoencoderKL(**args) on the meta device; ValueError naming the argument that is wrong, or saying that the
    network is too large, before anything is allocated."""

    from .models import AutoencoderKL

    for key in _AE_INT_ARGS:
        if key in args and not _is_count(args[key]):
            raise ValueError(f"{key} must be a positive int (at most {_MAX_UNET_SIZE}), got {args[key]!r}")
    for key in _AE_BOOL_ARGS:
        if key in args and not isinstance(args[key], bool):
            raise ValueError(f"{key} must be true or false, got {args[key]!r}")
    channels = args.get("channels", (32, 64, 64, 64))
    if not isinstance(channels, (list, tuple)) or not 1 <= len(channels) <= 16 or \
            not all(_is_count(c) for c in channels):
        raise ValueError(f"channels must be 1 to 16 positive ints, got {channels!r}")
    blocks = args.get("num_res_blocks", 2)
    if not (_is_count(blocks, 0) and blocks <= 100) and not (
            isinstance(blocks, (list, tuple)) and all(_is_count(b, 0) and b <= 100 for b in blocks)):
        raise ValueError(f"num_res_blocks must be an int or a list of ints in 0..100, got {blocks!r}")
    levels = args.get("attention_levels", (False, False, True, True))
    if not isinstance(levels, (list, tuple)) or not all(isinstance(a, bool) for a in levels):
        raise ValueError(f"attention_levels must be a list of true/false, got {levels!r}")
    eps = args.get("norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"norm_eps must be a positive number, got {eps!r}")
    return _meta_skeleton(AutoencoderKL, args, "the autoencoder", "channels and num_res_blocks")


def _check_autoencoder(value, unet):
    """The `autoencoder` entry of a latent model: {"args": AutoencoderKL arguments, "scale_factor": s,
    "weights_sha256": hash of autoencoder.safetensors}, against the UNet (it samples the autoencoder's latents)."""
    if not isinstance(value, dict):
        raise ValueError(f"autoencoder must be an object ({', '.join(_AE_KEYS)}), got {type(value).__name__}")
    problems = []
    unknown = sorted(set(value) - set(_AE_KEYS), key=str)
    if unknown:
        problems.append(f"autoencoder: unknown key(s) {unknown}; allowed: {', '.join(_AE_KEYS)}")
    args = value.get("args")
    full_args = None
    if not isinstance(args, dict):
        problems.append(f"autoencoder.args must be an object of AutoencoderKL arguments, got "
                        f"{type(args).__name__ if 'args' in value else 'nothing'}")
    else:
        allowed = _autoencoder_parameters()
        bad = sorted(set(args) - set(allowed), key=str)
        absent = [k for k in _REQUIRED_AE_ARGS if k not in args]
        if bad:
            problems.append(f"autoencoder.args: unknown argument(s) {bad}; AutoencoderKL accepts: "
                            f"{', '.join(allowed)}")
        if absent:
            problems.append(f"autoencoder.args: missing required argument(s) {absent}")
        if not bad and not absent:
            try:
                full_args = jsonable(_autoencoder_skeleton(args).config)
            except ValueError as exc:
                problems.append(f"autoencoder.args: {exc}")
    scale = value.get("scale_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        problems.append(f"autoencoder.scale_factor must be a positive number, got {scale!r}")
    try:
        digest = _check_weights_sha256(value.get("weights_sha256"), unet)
    except ValueError as exc:
        problems.append(f"autoencoder.{exc}")
    if full_args is not None and unet is not None:
        for ours, theirs, default in (("latent_channels", "in_channels", None), ("spatial_dims", "spatial_dims", 3)):
            mine, other = full_args[ours], unet.get(theirs, default)
            if other is not None and mine != other:
                problems.append(f"autoencoder: args.{ours} ({mine}) must equal unet.{theirs} ({other}): the UNet "
                                f"samples the autoencoder's latents")
    if problems:
        raise _Problems(*problems)
    out = {"args": full_args, "scale_factor": float(scale)}
    if digest is not None:
        out["weights_sha256"] = digest
    return out


def _downsampling(autoencoder) -> int:
    """How many image voxels one latent voxel spans along each axis: 2 per autoencoder level after the first."""
    return 2 ** (len(autoencoder["args"]["channels"]) - 1)


def _check_latent_model(out, values, unet, problems):
    """The keys that describe the image of a latent model (`channels`, `volume_shape`) against its autoencoder:
    the image has the decoder's out_channels; its shape is the latent shape times the downsampling factor, and
    the latent shape must suit the UNet's levels. Completes `out`; appends to `problems`."""
    autoencoder = out.get("autoencoder")
    if autoencoder is None or autoencoder.get("args") is None:
        return
    image_channels = autoencoder["args"]["out_channels"]
    channels = values.get("channels")
    if channels is not None and channels != image_channels:
        problems.append(f"channels ({channels}) must equal autoencoder.args.out_channels ({image_channels}): a "
                        f"latent model makes the decoder's images")
    out["channels"] = image_channels
    shape = out.get("volume_shape")
    if shape is None:
        return
    dims = autoencoder["args"]["spatial_dims"]
    factor = _downsampling(autoencoder)
    levels = len(unet["channels"]) if unet is not None and isinstance(unet.get("channels"), (list, tuple)) else 4
    unet_factor = 2 ** (levels - 1)
    if len(shape) != dims:
        problems.append(f"volume_shape {shape} must have {dims} sizes (autoencoder.args.spatial_dims)")
    elif any(s % (factor * unet_factor) for s in shape):
        problems.append(f"volume_shape {shape} (the image) must be divisible by {factor * unet_factor}: the "
                        f"autoencoder divides each size by {factor} into the latent shape, which the UNet halves "
                        f"{levels - 1} time(s)")
    elif math.prod(shape) * image_channels > MAX_VOLUME_VOXELS:
        problems.append(f"volume_shape {shape} holds more than {MAX_VOLUME_VOXELS} voxels, more than pydiffmed "
                        f"reads or writes in one volume")


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
    "autoencoder": _ConfigKey(_check_autoencoder, _OMITTED),
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
_IMAGE_KEYS = ("channels", "volume_shape")  # keys describing the sampled image (a latent model's: the decoded one)


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
    latent = "autoencoder" in values
    out = {}
    for key, spec in _CONFIG_KEYS.items():
        # In a latent model the UNet samples latents: the image keys are checked against the autoencoder below.
        network = None if latent and key in _IMAGE_KEYS else unet
        if key not in values:
            if spec.absent is not _REQUIRED and spec.absent is not _OMITTED:
                out[key] = spec.absent(network) if callable(spec.absent) else copy.deepcopy(spec.absent)
            continue
        try:
            out[key] = spec.check(values[key], network)
        except (TypeError, ValueError) as exc:
            for problem in (exc.args if isinstance(exc, _Problems) else (str(exc),)):
                problems.append(problem if problem.startswith(key) else f"{key}: {problem}")
    if latent:
        _check_latent_model(out, values, unet, problems)
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
    autoencoder = property(lambda self: self.config.get("autoencoder"))  # its config entry; None: not latent
    is_latent = property(lambda self: self.config.get("autoencoder") is not None)
    scale_factor = property(lambda self: self.autoencoder["scale_factor"] if self.is_latent else None)
    downsampling = property(lambda self: _downsampling(self.autoencoder) if self.is_latent else 1)
    autoencoder_path = property(lambda self: os.path.join(self.path, AUTOENCODER_WEIGHTS_NAME) if self.is_latent
                                else None)

    def latent_shape(self, shape=None) -> tuple:
        """(channels, *spatial) that the UNet samples for an image of spatial `shape` (default volume_shape): for a
        latent model (latent_channels, *shape / downsampling), else (channels, *shape)."""
        shape = self.volume_shape if shape is None else tuple(shape)
        if shape is None:
            raise ValueError(f"the model {self.name!r} stores no volume shape; give the image shape")
        if not self.is_latent:
            return (self.channels, *shape)
        factor = self.downsampling
        if any(s % factor for s in shape):
            raise ValueError(f"image shape {list(shape)} must be divisible by {factor} (the autoencoder's "
                             f"downsampling factor)")
        return (self.autoencoder["args"]["latent_channels"], *(s // factor for s in shape))

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
        if config.get("autoencoder") is not None:
            _check_autoencoder_file(path, config, config_path)
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
    if config.get("autoencoder") is not None:
        raise ModelFileError(f"{path} (embedded config): names an autoencoder, but a single .safetensors file holds "
                             f"one network; a latent model is a directory ({WEIGHTS_NAME}, "
                             f"{AUTOENCODER_WEIGHTS_NAME}, {CONFIG_NAME})")
    return config, ModelInfo(config, path, path, file_sha256(path)), tensors


def _check_autoencoder_file(path, config, config_path):
    weights = os.path.join(path, AUTOENCODER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise ModelFileError(f"{weights}: missing (the autoencoder of the latent model described by {config_path})")
    expected = config["autoencoder"].get("weights_sha256")
    if expected is not None:
        digest = file_sha256(weights)
        if digest != expected:
            raise ModelFileError(f"{weights}: does not match {config_path} (sha256 {digest[:16]}…, the config "
                                 f"expects {expected[:16]}…): the directory holds files from different saves")


def load_autoencoder(path_or_name, *, device=None, dtype=None):
    """The autoencoder of a latent model directory (pydiffmed.models.AutoencoderKL in eval mode, weights from
    autoencoder.safetensors, checked against the configured network before it is built). ModelFileError, naming
    the file, for a model without an autoencoder, a missing/corrupt file or weights that do not fit."""
    config, info, _ = _locate(path_or_name, want_tensors=False)
    if not info.is_latent:
        raise ModelFileError(f"{info.path}: not a latent model (its config has no 'autoencoder' entry)")
    tensors, _ = _read_safetensors(info.autoencoder_path)
    model = _build_autoencoder(config["autoencoder"]["args"], tensors,
                               f"{info.autoencoder_path}: weights do not fit the autoencoder configured in "
                               f"{os.path.join(info.path, CONFIG_NAME)}")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


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

def save_model(path, model, config, *, autoencoder=None, overwrite: bool = False) -> ModelInfo:
    """Save a UNet3D and its config (everything but `unet`, which is read from the model) as a pydiffmed model:
    a directory (`path` without the .safetensors suffix) or a single `.safetensors` file. Each file is written
    atomically; existing files are kept unless overwrite=True. Returns the ModelInfo of what was written.

    autoencoder: a pydiffmed.models.AutoencoderKL makes a latent model (a directory only): its weights go to
    autoencoder.safetensors and its arguments to config["autoencoder"]["args"]; config may hold
    {"autoencoder": {"scale_factor": s}} (default 1.0)."""
    from safetensors.torch import save_file

    from .models import AutoencoderKL, UNet3D

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
    if autoencoder is not None:
        if not isinstance(autoencoder, AutoencoderKL):
            raise TypeError(f"autoencoder must be a pydiffmed.models.AutoencoderKL, got {type(autoencoder).__name__}")
        if single_file:
            raise ValueError(f"{path}: a latent model is a directory (the weights of two networks); drop the "
                             f".safetensors suffix")
        entry = full.get("autoencoder", {})
        if not isinstance(entry, dict) or set(entry) - {"scale_factor"}:
            raise ValueError("config['autoencoder'] may only hold 'scale_factor': save_model writes the arguments and "
                             "the weights hash of the autoencoder itself")
        full["autoencoder"] = {"args": jsonable(autoencoder.config), "scale_factor": entry.get("scale_factor", 1.0)}
    elif "autoencoder" in full:
        raise ValueError("config holds 'autoencoder' but no autoencoder= was given")
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
    autoencoder_path = os.path.join(path, AUTOENCODER_WEIGHTS_NAME)
    if not overwrite:
        for existing in (weights_path, config_path, autoencoder_path):
            if os.path.lexists(existing) and (existing != autoencoder_path or autoencoder is not None):
                raise FileExistsError(f"{existing} already exists (pass overwrite=True to replace it)")
    os.makedirs(path, exist_ok=True)
    if autoencoder is not None:
        ae_tensors = {key: value.detach().to("cpu").contiguous() for key, value in autoencoder.state_dict().items()}
        with atomic_path(autoencoder_path, overwrite) as temporary:
            save_file(ae_tensors, temporary, metadata={"format": FORMAT})
        full["autoencoder"]["weights_sha256"] = file_sha256(autoencoder_path)
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
    entry = {k: v for k, v in entry.items() if k == "_target_" or k not in _BUNDLE_META_KEYS}  # e.g. _requires_
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


# --- MONAI bundle import -----------------------------------------------------------------------------------

_BUNDLE_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_BUNDLE_DIFFUSION = ("DiffusionModelUNet",)
_BUNDLE_AUTOENCODER = ("AutoencoderKL", "AutoencoderKlMaisi")
# Networks a bundle may define that pydiffmed does not build: their layers or inputs differ from the two above.
_BUNDLE_UNSUPPORTED = ("DiffusionModelUNetMaisi", "SPADEDiffusionModelUNet", "SPADEAutoencoderKL", "VQVAE",
                       "ControlNetMaisi")
# Weight files by convention (models/...), when the config names none: the brain LDM bundle's model.pt and
# autoencoder.pt, the brats LDM's model_autoencoder.pt, MAISI-style diffusion_unet.pt.
_BUNDLE_DIFFUSION_WEIGHTS = ("model.safetensors", "model.pt", "diffusion_unet.safetensors", "diffusion_unet.pt",
                             "model_diffusion.pt", "diffusion_model.pt", "diffusion.pt", "unet.pt")
_BUNDLE_AUTOENCODER_WEIGHTS = ("autoencoder.safetensors", "autoencoder.pt", "model_autoencoder.safetensors",
                               "model_autoencoder.pt", "autoencoder_model.pt")
_WEIGHT_FILE_NAME = re.compile(r"[\w.-]+\.(?:pt|pth|safetensors)(?![\w.])")
_RENAMED_AE_ARGS = {"num_channels": "channels"}  # MONAI GenerativeModels → MONAI core
# AutoencoderKlMaisi → AutoencoderKL (models/autoencoder.py, AutoencoderKL.from_maisi): its memory options are
# dropped (norm_float16 too: fp32 statistics, outputs in the model's dtype), its defaults and upsampling kept.
_MAISI_AE_RENAMED = {"num_channels": "channels", "use_checkpointing": "use_checkpoint"}
_MAISI_AE_DROPPED = ("num_splits", "dim_split", "norm_float16", "print_info", "save_mem")
_MAISI_AE_DEFAULTS = {"with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "include_fc": False}
_MAISI_AE_FIXED = {"upsample_mode": "linear", "convtranspose_kernel_size": 3}


def _class_name(entry) -> str:
    return str(entry.get("_target_", "")).rsplit(".", 1)[-1]


def _bundle_definitions(config, names):
    return [key for key, value in config.items() if isinstance(value, dict) and _class_name(value) in names]


def _bundle_config(configs):
    """(path, mapping) of the bundle config that defines the diffusion network: inference.* first, then the
    others in name order (metadata.json is skipped: it holds no networks)."""
    files = sorted(f for f in os.listdir(configs) if f.lower().endswith(_BUNDLE_CONFIG_SUFFIXES)
                   and f.lower() != "metadata.json" and os.path.isfile(os.path.join(configs, f)))
    files.sort(key=lambda f: not f.lower().startswith("inference."))
    if not files:
        raise ModelFileError(f"{configs}: no .json or .yaml config files")
    for name in files:
        path = os.path.join(configs, name)
        config = _read_structured(path)
        unsupported = _bundle_definitions(config, _BUNDLE_UNSUPPORTED)
        if unsupported:
            found = ", ".join(f"{k} ({_class_name(config[k])})" for k in unsupported)
            raise ModelFileError(f"{path}: defines {found}, which pydiffmed does not build (MAISI and SPADE "
                                 f"networks have other layers and inputs than MONAI's DiffusionModelUNet and "
                                 f"AutoencoderKL)")
        if _bundle_definitions(config, _BUNDLE_DIFFUSION):
            return path, config
    raise ModelFileError(f"{configs}: no diffusion network: none of {', '.join(files)} has an entry whose "
                         f"_target_ is a DiffusionModelUNet")


def _definition_args(config, key, source, renamed, allowed, what) -> dict:
    args = {}
    for name, value in config[key].items():
        if name not in _BUNDLE_META_KEYS:
            args[renamed.get(name, name)] = _resolve_references(value, config, source, f"{key}.{name}")
    unknown = sorted(set(args) - set(allowed), key=str)
    if unknown:
        raise ModelFileError(f"{source}: {key}: argument(s) {unknown} are not {what} arguments pydiffmed knows "
                             f"({', '.join(allowed)})")
    return args


def _one_definition(config, names, source, what):
    keys = _bundle_definitions(config, names)
    if len(keys) > 1:
        raise ModelFileError(f"{source}: several {what} definitions ({', '.join(keys)}); pydiffmed converts a "
                             f"bundle with one")
    return keys[0] if keys else None


def _bundle_weights(bundle, config, source, words, others, conventional, what) -> str:
    """The weight file of a network: the file a config entry names (an entry whose key holds one of `words` and
    none of `others`, its string value mentioning NAME.pt/.pth/.safetensors, e.g. "$@model_dir + '/model.pt'",
    read as text, never evaluated), looked up in models/; else the first conventional name present there."""
    models = os.path.join(bundle, "models")
    for key, value in config.items():
        lowered = key.lower()
        if not isinstance(value, str) or not any(w in lowered for w in words) or any(w in lowered for w in others):
            continue
        for name in _WEIGHT_FILE_NAME.findall(value):
            path = os.path.join(models, name)
            if not os.path.isfile(path):
                raise ModelFileError(f"{source}: {key} names the weights {name}, but {path} is missing")
            return path
    for name in conventional:
        path = os.path.join(models, name)
        if os.path.isfile(path):
            return path
    raise ModelFileError(f"{models}: no weights for the {what}: {source} names no weight file and none of "
                         f"{', '.join(conventional)} is there")


def _read_bundle_state(path):
    try:
        state = load_state_dict_file(path)
    except CheckpointError as exc:
        raise ModelFileError(str(exc)) from exc
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _checkpoint_scale_factor(path):
    """A "scale_factor" stored next to the state dict in a torch checkpoint (MAISI's diffusion checkpoints keep
    it there), read with weights_only=True; None when there is none."""
    if path.endswith(".safetensors"):
        return None
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable files are reported when their weights are read
        return None
    value = loaded.get("scale_factor") if isinstance(loaded, dict) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _bundle_scale_factor(config, source, diffusion_weights):
    """(scale_factor, where it came from): the config's top-level "scale_factor" (a number, or a reference to
    one), a LatentDiffusionInferer entry's scale_factor, the diffusion checkpoint's "scale_factor" entry, else
    1.0 (the value of a bundle that decodes its latents unscaled)."""
    candidates = [("scale_factor", config.get("scale_factor"))]
    candidates += [(f"{key}.scale_factor", config[key].get("scale_factor"))
                   for key in _bundle_definitions(config, ("LatentDiffusionInferer",
                                                           "ControlNetLatentDiffusionInferer"))]
    for where, value in candidates:
        if isinstance(value, str) and value.startswith("@"):
            value = _resolve_references(value, config, source, where)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value > 0):
                raise ModelFileError(f"{source}: {where} must be a positive number, got {value!r}")
            return float(value), f"{os.path.basename(source)}: {where}"
    stored = _checkpoint_scale_factor(diffusion_weights)
    if stored is not None:
        return stored, f"{os.path.basename(diffusion_weights)}: scale_factor"
    return 1.0, None


def _bundle_volume_shape(config, source, ae_args):
    """The image shape from a config's "latent_shape" ([C, *spatial] or [*spatial], plain ints) times the
    autoencoder's downsampling, or None."""
    value = config.get("latent_shape")
    if value is None:
        return None
    try:
        value = _resolve_references(value, config, source, "latent_shape")
    except ModelFileError:
        return None  # an expression (e.g. MAISI's "$@output_size[0]//4"): not evaluated
    dims = ae_args.get("spatial_dims", 3)
    if not isinstance(value, list) or len(value) not in (dims, dims + 1) or \
            not all(_is_count(v) for v in value):
        return None
    factor = 2 ** (len(ae_args.get("channels", (32, 64, 64, 64))) - 1)
    return [v * factor for v in value[-dims:]]


def _build_autoencoder(args, state, blame):
    from .models import AutoencoderKL
    from .models.checkpoint import check_state_dict

    try:
        skeleton = _autoencoder_skeleton(args)
        check_state_dict(skeleton, skeleton.convert_keys(state))
    except CheckpointError as exc:
        raise ModelFileError(f"{blame}: {exc}") from exc
    model = AutoencoderKL(**args)
    model.load_state_dict(state)
    return model.eval()


def convert_monai_bundle(bundle_dir, out, *, name=None, description=None, volume_shape=None, spacing=None,
                         orientation=None, intensity=None, scale_factor=None, overwrite: bool = False) -> ModelInfo:
    """Convert a MONAI bundle directory (configs/*.json|yaml + models/*) into a pydiffmed model directory at `out`:
    a latent model when the bundle defines an autoencoder, else a plain one.

    What is read, as data (no bundle code or "$" expression is ever run; "@" references are resolved):
    * the config: configs/inference.{json,yaml,yml} if it defines the diffusion network, else the first other
      config file (by name) that does; metadata.json is skipped;
    * the diffusion network: the one entry whose _target_ is MONAI's DiffusionModelUNet; the autoencoder: the one
      entry whose _target_ is AutoencoderKL or MAISI's AutoencoderKlMaisi (optional; its arguments mapped as
      AutoencoderKL.from_maisi does). MAISI's DiffusionModelUNetMaisi / ControlNetMaisi and the SPADE variants are
      refused (their layers and inputs differ); several definitions of one kind are refused;
    * the scheduler entry (DDPM/DDIM/PNDM/RFlowScheduler) as in `convert_monai` (MONAI's DDPMScheduler defaults, with
      a warning, when there is none);
    * the weights: the file a config entry names — a key holding "diffusion"/"unet" (resp. "autoencoder") whose
      text mentions NAME.pt/.pth/.safetensors, such as the brain LDM's "load_diffusion_path": "$@model_dir +
      '/model.pt'" or MAISI's "trained_autoencoder_path" — looked up in models/; otherwise the conventional names
      (diffusion: model.pt, diffusion_unet.pt, ...; autoencoder: autoencoder.pt, model_autoencoder.pt, ...). They
      load with torch.load(weights_only=True) or from safetensors, state dicts possibly wrapped (pydiffmed.models.
      checkpoint.load_state_dict_file);
    * scale_factor (latent models; the argument wins): the config's "scale_factor" if it is a number (or a
      reference to one), a LatentDiffusionInferer entry's, the "scale_factor" entry of the diffusion checkpoint
      (MAISI keeps it there), else 1.0 with a warning (the brain LDM bundle decodes unscaled latents);
    * volume_shape (the argument wins): a config "latent_shape" of plain ints times the autoencoder's
      downsampling, else unknown.
    Every problem (no configs/ directory, no diffusion network, missing weights, weights that do not fit) is one
    ModelFileError naming the file."""
    bundle = os.fspath(bundle_dir)
    if not os.path.isdir(bundle):
        raise ModelFileError(f"{bundle}: no such directory (a MONAI bundle is a directory with configs/ and "
                             f"models/)")
    configs = os.path.join(bundle, "configs")
    if not os.path.isdir(configs):
        raise ModelFileError(f"{bundle}: not a MONAI bundle: it has no configs/ directory (the network "
                             f"definitions live in configs/*.json or *.yaml)")
    source, config = _bundle_config(configs)
    unet_key = _one_definition(config, _BUNDLE_DIFFUSION, source, "DiffusionModelUNet")
    ae_key = _one_definition(config, _BUNDLE_AUTOENCODER, source, "AutoencoderKL")
    unet_args = _definition_args(config, unet_key, source, _RENAMED_UNET_ARGS, _unet_parameters(),
                                 "DiffusionModelUNet")
    if ae_key is not None and _class_name(config[ae_key]) == "AutoencoderKlMaisi":
        maisi = {**config, ae_key: {k: v for k, v in config[ae_key].items() if k not in _MAISI_AE_DROPPED}}
        ae_args = {**_MAISI_AE_DEFAULTS, **_definition_args(maisi, ae_key, source, _MAISI_AE_RENAMED, [
            p for p in _autoencoder_parameters() if p not in _MAISI_AE_FIXED], "AutoencoderKlMaisi"),
            **_MAISI_AE_FIXED}
    else:
        ae_args = None if ae_key is None else _definition_args(config, ae_key, source, _RENAMED_AE_ARGS,
                                                               _autoencoder_parameters(), "AutoencoderKL")
    found_schedule, found_prediction, found_clip, schedule_source = _monai_schedule(config, source)
    unet_weights = _bundle_weights(bundle, config, source, ("diffusion", "unet"), ("autoencoder", "controlnet",
                                   "mask_generation"), _BUNDLE_DIFFUSION_WEIGHTS, f"diffusion network {unet_key}")
    config_out = {
        "name": name or _default_name(out),
        "description": description if description is not None else
        f"converted from MONAI bundle {os.path.basename(os.path.normpath(bundle))}",
        "schedule": found_schedule, "prediction_type": found_prediction, "clip_sample": found_clip,
        "source": {"converted_from": "monai-bundle", "bundle": os.path.basename(os.path.normpath(bundle)),
                   "config": os.path.relpath(source, bundle), "network": unet_key,
                   "checkpoint": os.path.relpath(unet_weights, bundle), "checkpoint_sha256": None,
                   "schedule_from": schedule_source},
    }
    for key, value in (("volume_shape", volume_shape), ("spacing", spacing), ("orientation", orientation),
                       ("intensity", intensity)):
        if value is not None:
            config_out[key] = value
    ae_weights = scale_from = None
    if ae_args is not None:
        ae_weights = _bundle_weights(bundle, config, source, ("autoencoder",), ("mask_generation",),
                                     _BUNDLE_AUTOENCODER_WEIGHTS, f"autoencoder {ae_key}")
        if scale_factor is None:
            scale_factor, scale_from = _bundle_scale_factor(config, source, unet_weights)
        else:
            scale_from = "arguments"
        if volume_shape is None:
            shape = _bundle_volume_shape(config, source, ae_args)
            if shape is not None:
                config_out["volume_shape"] = shape
        config_out["source"].update({"autoencoder": ae_key, "autoencoder_checkpoint": os.path.relpath(ae_weights,
                                                                                                       bundle),
                                     "autoencoder_checkpoint_sha256": None,
                                     "scale_factor_from": scale_from or "default (the bundle names none)"})
    # What the config says is checked before any weights are read or a network built.
    check = {**config_out, "unet": unet_args}
    if ae_args is not None:
        check["autoencoder"] = {"args": ae_args, "scale_factor": scale_factor}
    validate_config(check, source)
    unet = _build_unet(unet_args, _read_bundle_state(unet_weights),
                       f"{unet_weights}: does not fit the network {unet_key} of {source}")
    config_out["source"]["checkpoint_sha256"] = file_sha256(unet_weights)
    autoencoder = None
    if ae_args is not None:
        autoencoder = _build_autoencoder(ae_args, _read_bundle_state(ae_weights),
                                         f"{ae_weights}: does not fit the autoencoder {ae_key} of {source}")
        config_out["source"]["autoencoder_checkpoint_sha256"] = file_sha256(ae_weights)
        config_out["autoencoder"] = {"scale_factor": scale_factor}
        if scale_from is None:
            warnings.warn(f"{source} gives no scale_factor (config, inferer or checkpoint): assuming 1.0 (latents "
                          f"decoded unscaled); pass scale_factor= to override", stacklevel=2)
    if schedule_source.startswith("MONAI DDPMScheduler defaults"):
        warnings.warn(f"{source} names no scheduler: assuming MONAI DDPMScheduler defaults (1000 steps, linear "
                      f"betas 1e-4..0.02, epsilon)", stacklevel=2)
    return save_model(out, unet, config_out, autoencoder=autoencoder, overwrite=overwrite)


__all__ = ["AUTOENCODER_WEIGHTS_NAME", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "MODELS_DIR", "ModelFileError",
           "ModelInfo", "WEIGHTS_NAME", "build_schedule", "bundled_models", "convert_monai", "convert_monai_bundle",
           "file_sha256", "load_autoencoder", "load_model", "read_model_info", "resolve_model_path", "save_model",
           "validate_config"]
