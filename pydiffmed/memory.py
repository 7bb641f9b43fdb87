"""Memory a sampling run needs (ARCHITECTURE §8): `estimate_memory` (parameters, solver state and model input, and
the activations of one model forward measured on small proxy volumes and extrapolated) and `available_memory`
(what the device has free). The engine checks one against the other before it allocates anything
(`Sampler(check_memory=True)` raises InsufficientMemoryError).
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class InsufficientMemoryError(MemoryError):
    """Sampling would need more memory than the device has free (raised before anything is allocated)."""


@dataclass
class MemoryEstimate:
    """Bytes a sampling run needs on its device. activations is None when it could not be measured. With an
    autoencoder (latent models): decode = the peak of the decode on the device (it runs after the sampling loop,
    so the total counts the larger of the two), decode_storage = bytes of full activations kept in another
    device's memory (decode_storage="cpu": host memory) meanwhile."""
    parameters: int
    state: int
    activations: Optional[int]
    device: torch.device
    note: str = ""
    decode: Optional[int] = None
    decode_storage: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.state + max(self.activations or 0, self.decode or 0)

    def __str__(self):
        gib = 2.0 ** 30
        act = "unknown" if self.activations is None else f"{self.activations / gib:.2f} GiB"
        text = (f"{self.total / gib:.2f} GiB on {self.device} (parameters {self.parameters / gib:.2f} GiB, "
                f"state and model input {self.state / gib:.2f} GiB, activations {act}")
        if self.decode is not None:
            text += f", decode {self.decode / gib:.2f} GiB"
        text += ")"
        if self.decode_storage:
            text += f", and {self.decode_storage / gib:.2f} GiB of decoder activations in storage memory"
        return text + (f"; {self.note}" if self.note else "")


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created by the ops run under it (views and in-place results not counted), and
    apart from them the bytes of oneDNN's packed weight copies made (layers.packed_weight: opaque tensors that
    stay cached with the weights, a cost of the parameters rather than of the activations)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.packed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = getattr(func, "_schema", None)
        if schema is None or all(r.alias_info is None for r in schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_mkldnn:
                    self.packed += t.numel() * t.element_size()
                elif isinstance(t, torch.Tensor):
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    weakref.finalize(t, self._free, nbytes)
            self.peak = max(self.peak, self.live)
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def _forward_peak(model, shape, dtype, device, cond):
    x = torch.randn(shape, device=device).to(dtype)
    t = torch.full((shape[0],), 1.0, device=device)
    kwargs = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in (cond or {}).items()}
    tracker = _LiveBytes()
    with torch.no_grad(), tracker:
        out = model(x, t, **kwargs)
    del out
    # what is still alive is what the model cached on itself during the call (e.g. converted weights): that is
    # not an activation, and it would be gone from the next call's count
    return tracker.peak - tracker.live, tracker.packed


def _activation_bytes(model, shape, dtype, device, cond):
    """Peak activation bytes of one forward at `shape`, extrapolated from batch-1 forwards on two small proxy
    volumes: bytes(V) = a·V + c·V² per sample (the V² term catches attention that materialises N×N scores).
    Returns (bytes or None, packed weight bytes, note): the packed copies the larger proxy's forward made (each
    weight keeps one, for the input shape it last saw, so that forward packs every weight it uses anew)."""
    if not isinstance(model, torch.nn.Module):
        return None, 0, "activations not measured (the model is not an nn.Module)"
    spatial = shape[2:]
    volume = math.prod(spatial)
    last_error = None
    for small, large in ((8, 16), (16, 32), (32, 64)):
        proxies = [tuple(min(s, small) for s in spatial), tuple(min(s, large) for s in spatial)]
        try:
            (peak_small, _), (peak_large, packed) = (_forward_peak(model, (1, shape[1], *p), dtype, device, cond)
                                                     for p in proxies)
        except Exception as exc:  # the model rejects this proxy size (e.g. divisibility); try larger ones
            last_error = exc
            continue
        peaks = [peak_small, peak_large]
        v1, v2 = (math.prod(p) for p in proxies)
        if v1 == v2 or v2 == volume:
            per_sample = peaks[1] * volume / v2
        else:
            c = max((peaks[1] / v2 - peaks[0] / v1) / (v2 - v1), 0.0)
            a = max(peaks[1] / v2 - c * v2, 0.0)
            per_sample = a * volume + c * volume * volume
        return int(per_sample * shape[0]), packed, ""
    return None, 0, f"activations not measured (proxy forwards failed: {type(last_error).__name__}: {last_error})"


def _decode_peak(autoencoder, z):
    """(peak bytes of a whole decode of z, bytes of the packed weight copies it made), as _forward_peak."""
    tracker = _LiveBytes()
    with torch.no_grad(), tracker:
        out = autoencoder.decode(z)
    del out
    return tracker.peak - tracker.live, tracker.packed


def decode_memory(autoencoder, latent_shape, dtype=None, *, tile=None, max_memory=None, storage=None):
    """(bytes on the autoencoder's device, bytes on `storage`, note) of one decode of a latent batch of
    `latent_shape` = (B, latent_channels, *spatial) with pydiffmed's AutoencoderKL (parameters not included).
    Whole-volume decodes are measured on small proxy latents and extrapolated (linear + quadratic in the voxel
    count, as for model forwards); decodes by slabs (tile / max_memory) are planned at full size on a copy of the
    network on the meta device, which allocates nothing: the peak of the tensors they create, of which the
    working memory of the slabs (partition.SlabPlan.peak_estimate) stays on the device and the full activations
    go to `storage` when it is another device."""
    from .models import AutoencoderKL
    from .models.autoencoder import run_blocks_by_slabs
    from .partition import SlabPlan

    if not isinstance(autoencoder, AutoencoderKL):
        raise TypeError(f"decode_memory needs pydiffmed.models.AutoencoderKL, got {type(autoencoder).__name__}")
    weight = autoencoder.post_quant_conv.conv.weight
    device, own_dtype = weight.device, weight.dtype
    dtype = dtype or own_dtype
    size, own_size = (torch.tensor([], dtype=d).element_size() for d in (dtype, own_dtype))
    batch, channels, *spatial = latent_shape
    volume = math.prod(spatial)
    if tile is None and max_memory is None:
        peaks = []
        proxies = [tuple(min(s, edge) for s in spatial) for edge in (4, 8)]
        for proxy in proxies:
            peaks.append(_decode_peak(autoencoder, torch.zeros(1, channels, *proxy, device=device,
                                                               dtype=own_dtype))[0])
        v1, v2 = (math.prod(p) for p in proxies)
        if v1 == v2:
            per_sample = peaks[1] * volume / v2
        else:
            c = max((peaks[1] / v2 - peaks[0] / v1) / (v2 - v1), 0.0)
            per_sample = max(peaks[1] / v2 - c * v2, 0.0) * volume + c * volume * volume
        return int(per_sample * batch * size / own_size), 0, ""
    meta = copy.deepcopy(autoencoder).to(device="meta", dtype=dtype)
    plan = SlabPlan(tile, max_memory)
    tracker = _LiveBytes()
    z = torch.empty(latent_shape, device="meta", dtype=dtype)
    with torch.no_grad(), tracker:
        h = meta.post_quant_conv(meta._input(z))  # what decode() runs, with the plan at hand
        out = run_blocks_by_slabs(meta.decoder.blocks, h, plan, what="decoder")
    del out, h
    if storage is None or torch.device(storage) == device:
        return tracker.peak, 0, ""
    return plan.peak_estimate, tracker.peak, (f"by slabs: the full decoder activations live on {storage}, the "
                                              f"device holds the slabs")


def _decoder_packed_bytes(autoencoder, dtype) -> int:
    """Bytes of the packed weight copies a decode makes (on the CPU: layers.packed_weight), from the decode of a
    2³ latent, scaled to `dtype`; 0 without a decode where nothing is packed (off the CPU)."""
    from .models import layers

    weight = autoencoder.post_quant_conv.conv.weight
    if weight.device.type != "cpu" or not layers._HAS_WEIGHT_PACKING:
        return 0
    z = torch.zeros(1, autoencoder.post_quant_conv.conv.in_channels, *(2,) * (weight.ndim - 2), device=weight.device,
                    dtype=weight.dtype)
    size, own_size = (torch.tensor([], dtype=d).element_size() for d in (dtype, weight.dtype))
    return _decode_peak(autoencoder, z)[1] * size // own_size


def available_memory(device) -> Optional[int]:
    """Bytes free for new tensors on `device` (CUDA: driver-free plus torch's cached free blocks; CPU:
    MemAvailable of /proc/meminfo), or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def estimate_memory(model, shape, dtype=None, *, solver=None, state_dtype=torch.float32, guidance=False,
                    inpaint=False, cond=None, device=None, autoencoder=None, decode_tile=None,
                    decode_max_memory=None, decode_storage=None, cache_branch=None) -> MemoryEstimate:
    """Memory one sampling run of `model` at `shape` = (B, C, *spatial) needs on its device.

    parameters: the model's parameters and buffers in `dtype`, and the copies of its convolution weights that
    oneDNN packs on the CPU (measured in the proxy forwards; an autoencoder's in a 2³ decode); state: the
    solver's state buffers (its plan's buffer count; 4 when no solver is given), the model input in `dtype`
    (2·B with classifier-free `guidance`), a preview buffer and, with `inpaint`, the known volume, its re-noised
    copy and the mask;
    activations: the peak of one model forward on the model batch, measured on two small proxy volumes (with
    the model where and as it is, scaled by the element size of `dtype`) and extrapolated (linear + quadratic
    in the voxel count), None for a model that is not an nn.Module or rejects the proxy sizes (a model that
    needs conditioning is measured only when `cond` gives it). Intermediates inside custom ops (workspaces)
    are not seen, so keep a margin.
    autoencoder (a latent model: `shape` is the latent shape): its parameters, and the decode after sampling
    (decode_memory, with decode_tile / decode_max_memory / decode_storage as pydiffmed.sample takes them).
    cache_branch (feature caching, Sampler(feature_cache=...)): the state adds the buffer of cached features."""
    # the engine's argument checks (it imports this module, so they are looked up when called)
    from .engine import _MODEL_DTYPES, _check_shape, _model_device, _model_dtype, _solver_from, _tensors_of

    shape = _check_shape(shape)
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = dtype or _model_dtype(model)
    if dtype not in _MODEL_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    num_buffers = 4
    if solver is not None:
        num_buffers = len(_solver_from(solver, None, None, {}).plan("cpu").buffers)
    numel = math.prod(shape)
    size = torch.tensor([], dtype=dtype).element_size()
    state_size = torch.tensor([], dtype=state_dtype).element_size()
    parameters = sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in _tensors_of(model))
    model_batch = 2 * shape[0] if guidance else shape[0]
    state = (num_buffers + 1 + (2 if inpaint else 0)) * numel * state_size + (numel if inpaint else 0)
    state += model_batch * (numel // shape[0]) * size
    if cache_branch is not None:
        state += math.prod(model.cache_feature_shape((model_batch, *shape[1:]), cache_branch)) * size
    # measured on the model as it is (no converted copy), scaled from its dtype to `dtype`
    own_dtype = _model_dtype(model)
    own_size = torch.tensor([], dtype=own_dtype).element_size()
    activations, packed, note = _activation_bytes(model, (model_batch, *shape[1:]), own_dtype, _model_device(model),
                                                  cond)
    parameters += packed * size // own_size
    if activations is not None:
        activations = activations * size // own_size
    if autoencoder is None:
        return MemoryEstimate(int(parameters), int(state), activations, device, note)
    parameters += sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                      for t in _tensors_of(autoencoder)) + _decoder_packed_bytes(autoencoder, dtype)
    decode, stored, decode_note = decode_memory(autoencoder, shape, dtype, tile=decode_tile,
                                                max_memory=decode_max_memory, storage=decode_storage)
    note = "; ".join(text for text in (note, decode_note) if text)
    return MemoryEstimate(int(parameters), int(state), activations, device, note, decode, stored)


__all__ = ["InsufficientMemoryError", "MemoryEstimate", "available_memory", "decode_memory", "estimate_memory"]
