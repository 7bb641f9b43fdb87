"""Loading MONAI `DiffusionModelUNet` weights: key-name conversion, file loading without unpickling arbitrary
objects, and state-dict checks whose errors name every offending key."""
from __future__ import annotations

import os
import pickle
import re

import torch
from torch import nn

# Older MONAI GenerativeModels checkpoints: the unconditioned attention block kept to_q/to_k/to_v and its output
# projection `proj_attn` directly on the block (now under `.attn`, output `attn.out_proj`); the transformer's
# attention output was `to_out.0` (now `out_proj`); the upsampler's convolution was `conv` (now `postconv`).
_OLD_BLOCK_QKV = re.compile(r"^(?P<block>.+)\.(?P<name>to_[qkv])\.(?P<kind>weight|bias)$")
_OLD_PROJ_ATTN = re.compile(r"^(?P<block>.+)\.proj_attn\.(?P<kind>weight|bias)$")
_TRANSFORMER_ATTN = re.compile(r"\.attn[12]?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names every problem found."""


def convert_monai_state_dict(state_dict) -> dict:
    """MONAI `DiffusionModelUNet` state dict with any older GenerativeModels key names renamed to today's.
    Keys already in today's form pass through unchanged, so converting twice is harmless."""
    converted = {}
    for key, value in state_dict.items():
        new_key = _convert_key(key)
        if new_key in converted:
            raise CheckpointError(f"checkpoint has both {key!r} and a key that also maps to {new_key!r}")
        converted[new_key] = value
    return converted


def _convert_key(key: str) -> str:
    match = _OLD_BLOCK_QKV.match(key)
    if match and not _TRANSFORMER_ATTN.search(match["block"]):
        return f"{match['block']}.attn.{match['name']}.{match['kind']}"
    match = _OLD_PROJ_ATTN.match(key)
    if match:
        return f"{match['block']}.attn.out_proj.{match['kind']}"
    key = key.replace(".to_out.0.", ".out_proj.")
    return key.replace(".upsampler.conv.conv.", ".upsampler.postconv.conv.")


def check_state_dict(model: nn.Module, state_dict, strict: bool = True) -> None:
    """Raise CheckpointError listing non-tensor values, unknown and missing keys (strict), shape mismatches
    (key, checkpoint shape, model shape), float parameters stored as integers (never cast silently) and tensors
    holding NaN/Inf — all of them, not just the first."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"a state dict must be a dict of tensors, got {type(state_dict).__name__}")
    expected = model.state_dict()
    problems = []
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        problems.append("values that are not tensors: " + ", ".join(not_tensors))
    if strict:
        unknown = sorted(k for k in state_dict if k not in expected)
        missing = sorted(k for k in expected if k not in state_dict)
        if unknown:
            problems.append(f"{len(unknown)} unknown key(s) (not in this model): " + ", ".join(unknown))
        if missing:
            problems.append(f"{len(missing)} missing key(s): " + ", ".join(missing))
    for key, value in state_dict.items():
        if key in expected and isinstance(value, torch.Tensor) and value.shape != expected[key].shape:
            problems.append(f"shape mismatch for {key!r}: checkpoint has {tuple(value.shape)}, model expects "
                            f"{tuple(expected[key].shape)}")
    tensors = [(k, v) for k, v in state_dict.items() if k in expected and isinstance(v, torch.Tensor)]
    not_float = [f"{k!r} ({v.dtype})" for k, v in tensors
                 if expected[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        problems.append(f"{len(not_float)} float parameter(s) stored as another type (pydiffmed does not cast "
                        f"them): " + _listing(not_float))
    non_finite = []
    for key, value in tensors:
        if value.is_floating_point() and value.device.type != "meta":
            bad = int(value.numel() - torch.isfinite(value).sum())
            if bad:
                non_finite.append(f"{key!r} ({bad} of {value.numel()})")
    if non_finite:
        problems.append(f"{len(non_finite)} tensor(s) hold NaN/Inf values: " + _listing(non_finite))
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}:\n  " + "\n  ".join(problems))


class MonaiModule(nn.Module):
    """Loading shared by the networks that mirror a MONAI class (UNet3D, ControlNet3D, AutoencoderKL): MONAI's
    state-dict keys (older GenerativeModels names converted), errors that name every problem, channels_last
    convolution weights, and `from_monai`. A subclass gives `monai_config(model)` (its constructor arguments read
    off a live MONAI model) and may extend `convert_keys`."""

    def convert_keys(self, state_dict) -> dict:
        return convert_monai_state_dict(state_dict)

    @staticmethod
    def monai_config(model: nn.Module) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a MONAI state dict (today's or the older GenerativeModels key names). Raises CheckpointError
        listing unknown/missing keys and every shape mismatch."""
        state_dict = self.convert_keys(state_dict)
        check_state_dict(self, state_dict, strict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # assigned tensors keep the checkpoint's layout; convolutions want channels_last weights
            self.to(memory_format=torch.channels_last_3d if self.spatial_dims == 3 else torch.channels_last)
        return result

    def load_checkpoint(self, path, strict: bool = True):
        """Load weights from a `.safetensors` file or a torch file read with weights_only=True."""
        self.load_state_dict(load_state_dict_file(path), strict=strict)
        return self

    @classmethod
    def from_monai(cls, model: nn.Module):
        """This network with the configuration and weights of a live MONAI model (same device and dtype)."""
        new = cls(**cls.monai_config(model))
        reference = next(model.parameters())
        new.to(device=reference.device, dtype=reference.dtype)
        new.load_state_dict(model.state_dict())
        return new


# Keys under which training scripts save the state dict next to other entries (epoch, optimizer, scale_factor):
# MAISI saves its diffusion UNet and its autoencoder under "unet_state_dict", its ControlNet under
# "controlnet_state_dict".
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "unet_state_dict", "controlnet_state_dict",
                 "autoencoder_state_dict", "model", "net", "network", "unet", "diffusion")


def load_state_dict_file(path) -> dict:
    """Tensors of a checkpoint file: `.safetensors`, or a torch file read with `torch.load(weights_only=True)`
    (never unpickling arbitrary objects). A dict that wraps the state dict under one of the usual keys
    ("state_dict", MAISI's "unet_state_dict" and "controlnet_state_dict", "model", ...; `_WRAPPER_KEYS`, first
    match wins) is unwrapped. Errors name the file and the problem (for a dict that is no state dict and wraps none
    under those keys: its top-level keys)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the safetensors parser's errors are not one class
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain containers, "
            f"and pydiffmed only loads with torch.load(weights_only=True) ({_first_line(exc)})") from exc
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load's parsers raise IndexError, KeyError, struct.error, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from exc
    state_dict = _unwrap(loaded)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state_dict).__name__}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        where = "" if state_dict is not loaded else (
            f"; not a state dict, and none of the keys that wrap one ({', '.join(_WRAPPER_KEYS)}) holds a dict; "
            f"its top-level keys: " + _listing([repr(k) for k in loaded]))
        raise CheckpointError(f"{path}: entries that are not tensors: " + _listing(bad) + where)
    bad = [repr(k) for k in state_dict if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: keys that are not names: " + _listing(bad))
    return state_dict


def _unwrap(loaded):
    if isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                return loaded[key]
    return loaded


def _listing(items, limit=20) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["CheckpointError", "MonaiModule", "check_state_dict", "convert_monai_state_dict", "load_state_dict_file"]
