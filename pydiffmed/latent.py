"""Latent diffusion: the engine samples latents, an autoencoder decodes them (ARCHITECTURE §1, DESIGN §9).

    unet, schedule, info = pydiffmed.load_model("mymodel")           # a latent model directory
    ae = pydiffmed.load_autoencoder("mymodel")
    images = pydiffmed.sample(unet, (2, *info.latent_shape()), "ddim", 50, schedule, seed=0,
                              autoencoder=ae, scale_factor=info.scale_factor, decode_tile=8)

`decode_latents` is the decode step MONAI's LatentDiffusionInferer takes after sampling: the image of
`latents / scale_factor` (its `decode_stage_2_outputs(latent / scale_factor)`), here optionally by depth slabs
(`tile` / `max_memory`, exact: pydiffmed.models.AutoencoderKL.decode).
"""
from __future__ import annotations

import math

import torch


def check_scale_factor(scale_factor) -> float:
    if isinstance(scale_factor, torch.Tensor) and scale_factor.numel() == 1:
        scale_factor = scale_factor.item()
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or \
            not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"scale_factor must be a positive number, got {scale_factor!r}")
    return float(scale_factor)


def check_decode_options(tile, max_memory) -> None:
    """ValueError unless the slab options of a decode are None or positive ints (max_memory may be "auto")."""
    if max_memory == "auto":
        if tile is not None:
            raise ValueError("decode max_memory='auto' picks the slabs itself: give no tile with it")
        return
    for key, value in (("tile", tile), ("max_memory", max_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"decode {key} must be a positive int (max_memory: or 'auto'), got {value!r}")


def auto_decode(autoencoder, latent_shape, *, storage=None) -> dict:
    """The slab options that decode_max_memory="auto" picks for decoding `latent_shape` latents: {} (the whole
    decode, the fastest) where it fits the free memory, else {"tile": rows} with the deepest slabs that fit
    (pydiffmed.memory.decode_memory estimates; full activations on `storage` when given). InsufficientMemoryError
    when not even one-row slabs fit."""
    from .memory import InsufficientMemoryError, available_memory, decode_memory
    from .models import AutoencoderKL

    if not isinstance(autoencoder, AutoencoderKL):
        raise TypeError(f"decode max_memory='auto' needs pydiffmed.models.AutoencoderKL, got "
                        f"{type(autoencoder).__name__}")
    device = autoencoder.post_quant_conv.conv.weight.device
    kept_on = torch.device(storage) if storage is not None else device

    def fits(**slabs):
        on_device, stored, _ = decode_memory(autoencoder, latent_shape, storage=storage, **slabs)
        for where, needed in ((device, on_device), (kept_on, stored)):
            free = available_memory(where)
            if needed and free is not None and needed > 0.95 * free:
                return False
        return True

    if fits():
        return {}
    depth = latent_shape[2] * 2 ** (len(autoencoder.config["channels"]) - 1)
    tile = 2 ** max(0, depth.bit_length() - 2)  # slabs of a quarter of the image depth, then halving
    try:
        while tile >= 1:
            if fits(tile=tile):
                return {"tile": tile}
            tile //= 2
    except ValueError as exc:  # an autoencoder that cannot run by slabs (attention)
        raise InsufficientMemoryError(f"decoding latents of shape {tuple(latent_shape)} does not fit the free "
                                      f"memory whole, and {exc}") from None
    raise InsufficientMemoryError(f"decoding latents of shape {tuple(latent_shape)} does not fit the free memory "
                                  f"of {device}{'' if storage is None else f' and {kept_on}'}, not even by one-row "
                                  f"slabs")


def check_decode_memory(autoencoder, latent_shape, *, tile=None, max_memory=None, storage=None) -> None:
    """InsufficientMemoryError, before any sampling, when decoding `latent_shape` latents would need more memory
    than the autoencoder's device (or `storage`) has free (pydiffmed.memory.decode_memory); the message says how
    to fit it. Only pydiffmed's AutoencoderKL is estimated."""
    from .memory import InsufficientMemoryError, available_memory, decode_memory
    from .models import AutoencoderKL

    if not isinstance(autoencoder, AutoencoderKL):
        return
    if max_memory == "auto":
        auto_decode(autoencoder, latent_shape, storage=storage)
        return
    device = autoencoder.post_quant_conv.conv.weight.device
    on_device, stored, _ = decode_memory(autoencoder, latent_shape, tile=tile, max_memory=max_memory,
                                         storage=storage)
    gib = 2.0 ** 30
    for where, needed in ((device, on_device), (torch.device(storage) if storage else device, stored)):
        free = available_memory(where)
        if needed and free is not None and needed > 0.95 * free:
            hint = ("decode by slabs: decode_max_memory=\"auto\", decode_tile= or decode_max_memory= (the "
                    "command's --decode-max-memory auto, --decode-tile, --decode-max-memory), and "
                    "decode_storage=\"cpu\" to keep full activations in host memory"
                    if tile is None and max_memory is None else "a smaller decode_tile / decode_max_memory, or "
                    "decode_storage=\"cpu\"")
            raise InsufficientMemoryError(
                f"decoding latents of shape {tuple(latent_shape)} needs about {needed / gib:.2f} GiB on {where}, "
                f"{free / gib:.2f} GiB are free; try {hint}")


def decode_latents(autoencoder, latents: torch.Tensor, scale_factor=1.0, *, tile: int | None = None,
                   max_memory: int | None = None, storage=None) -> torch.Tensor:
    """The images of `latents` (B, latent_channels, *spatial): autoencoder.decode(latents / scale_factor), on the
    autoencoder's device and in its dtype (the latents are moved there). tile (slab depth) / max_memory (bytes of
    working memory per layer, or "auto": `auto_decode`) / storage (where full activations live) decode by depth
    slabs with the same result; they need pydiffmed's AutoencoderKL (or any autoencoder whose `decode` takes
    them). Any other autoencoder with MONAI's `decode_stage_2_outputs` runs whole."""
    scale_factor = check_scale_factor(scale_factor)
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    check_decode_options(tile, max_memory)
    from .models import AutoencoderKL

    if max_memory == "auto" and isinstance(autoencoder, AutoencoderKL):
        tile, max_memory = auto_decode(autoencoder, latents.shape, storage=storage).get("tile"), None
    slabs = {k: v for k, v in (("tile", tile), ("max_memory", max_memory), ("storage", storage)) if v is not None}

    with torch.no_grad():
        if isinstance(autoencoder, AutoencoderKL):
            return autoencoder.decode(latents / scale_factor, **slabs)
        if slabs:
            raise TypeError(f"decoding by slabs (tile, max_memory, storage) needs pydiffmed.models.AutoencoderKL, got "
                            f"{type(autoencoder).__name__} (convert a MONAI one with AutoencoderKL.from_monai)")
        decode = getattr(autoencoder, "decode_stage_2_outputs", None)
        if not callable(decode):
            raise TypeError(f"autoencoder must be pydiffmed.models.AutoencoderKL or have MONAI's "
                            f"decode_stage_2_outputs, got {type(autoencoder).__name__}")
        reference = next(autoencoder.parameters(), None) if hasattr(autoencoder, "parameters") else None
        if reference is not None:
            latents = latents.to(device=reference.device, dtype=reference.dtype)
        return decode(latents / scale_factor)


__all__ = ["auto_decode", "check_decode_memory", "check_decode_options", "check_scale_factor", "decode_latents"]
