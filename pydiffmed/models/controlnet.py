"""`ControlNet3D`: MONAI's `ControlNet` (same constructor, same forward, same state-dict keys) on pydiffmed ops,
and `ControlledUNet`, which makes a ControlNet and its diffusion UNet one `model(x, t, **cond)` call for the
engine (so classifier-free guidance batching and CUDA-graph capture work unchanged).

MONAI's ControlNet is the encoder half of `DiffusionModelUNet` (conv_in, time embedding, down blocks, middle
block: the same modules as UNet3D's) plus
* a conditioning embedding: conv(3)→SiLU, then per further level conv(3)→SiLU and a stride-2 conv(3)→SiLU, then
  a 3×3(×3) `conv_out` to channels[0] (keys `controlnet_cond_embedding.{conv_in,blocks.k,conv_out}.conv.*`);
* zero-initialised 1×1(×1) convolutions, one per skip tensor of the encoder (`controlnet_down_blocks.0.*` is a
  bare convolution, `controlnet_down_blocks.k.conv.*` for k ≥ 1) and one on the middle block's output
  (`controlnet_mid_block.conv.*`); their outputs, times `conditioning_scale`, are the residuals the UNet adds to
  its skip connections and middle block.

What differs from MONAI's forward (same numbers up to rounding): activations channels_last throughout (the
residuals come out channels_last; UNet3D takes them as they are); every conv→SiLU of the conditioning embedding
is one oneDNN convolution with a SiLU epilogue on CPU; conv_in's output and the conditioning embedding are added
in the convolution's epilogue; resnets and attention are UNet3D's fused blocks; the time embedding is computed
per sample on the CPU (batch invariance, see layers.py). `forward` reads no device value on the host.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import MonaiModule
from .layers import (Conv, _onednn_path, _pads_input_channels, channels_last_format, conv_module, per_sample,
                     to_channels_last)
from .transformer import SpatialTransformer
from .unet import (_ARGUMENT_TYPES, MidLevel, ResnetBlock, _check_types, _per_level, _positive_int, _positive_ints,
                   _timesteps, _validate, block_makers, down_level, project_time, silu_time_embedding)

_HAS_CONV_UNARY = hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_silu(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """SiLU(conv(x)) for an nn.Conv2d/Conv3d; on the CPU one oneDNN convolution with a SiLU ("swish") epilogue."""
    if _HAS_CONV_UNARY and _onednn_path(x, conv.weight, conv.bias) and not _pads_input_channels(
            x, conv.weight, conv.bias, None):
        dims = x.ndim - 2
        padding = conv.padding[0] if isinstance(conv.padding, tuple) else conv.padding
        return torch.ops.mkldnn._convolution_pointwise(
            to_channels_last(x), conv.weight, conv.bias, [padding] * dims, [conv.stride[0]] * dims, [1] * dims, 1,
            "swish", [], "")
    return F.silu(conv_module(x, conv), inplace=True)


class ConditioningEmbedding(nn.Module):
    """MONAI `ControlNetConditioningEmbedding`: the conditioning image → channels[0] features at the UNet input's
    resolution (one stride-2 convolution per entry of `channels` after the first)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int]):
        super().__init__()
        channels = tuple(channels)
        self.conv_in = Conv(spatial_dims, in_channels, channels[0], 3)
        blocks = []
        for c_in, c_out in zip(channels, channels[1:]):
            blocks += [Conv(spatial_dims, c_in, c_in, 3), Conv(spatial_dims, c_in, c_out, 3, stride=2, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = Conv(spatial_dims, channels[-1], out_channels, 3)
        for p in self.conv_out.parameters():
            nn.init.zeros_(p)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        h = conv_silu(conditioning, self.conv_in.conv)
        for block in self.blocks:
            h = conv_silu(h, block.conv)
        return self.conv_out(h)


def _zero_conv(spatial_dims, channels, bare=False):
    conv = Conv(spatial_dims, channels, channels, 1, padding=0)
    for p in conv.parameters():
        nn.init.zeros_(p)
    return conv.conv if bare else conv


class ControlNet3D(MonaiModule):
    """MONAI `ControlNet`-compatible control network. Arguments and defaults are MONAI's (`spatial_dims` 3 or 2);
    `use_flash_attention` is accepted (attention is always the flash kernel here). Load MONAI checkpoints with
    `load_state_dict` (today's or the older GenerativeModels attention key names), `load_checkpoint(path)` or
    `ControlNet3D.from_monai(model)`.

    forward(x, timesteps, controlnet_cond, conditioning_scale=1.0, context=None, class_labels=None) ->
    (down_block_res_samples, mid_block_res_sample), as MONAI's: x is B×in_channels×spatial, controlnet_cond
    B×conditioning_embedding_in_channels×(spatial × 2^(len(conditioning_embedding_num_channels) - 1)). The
    residuals are channels_last tensors in the model's dtype (x and controlnet_cond are cast to it on entry).
    Inference only: the fused kernels have no backward."""

    def __init__(self, spatial_dims: int, in_channels: int, num_res_blocks: Sequence[int] | int = (2, 2, 2, 2),
                 channels: Sequence[int] = (32, 64, 64, 64),
                 attention_levels: Sequence[bool] = (False, False, True, True), norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, resblock_updown: bool = False, num_head_channels: int | Sequence[int] = 8,
                 with_conditioning: bool = False, transformer_num_layers: int = 1,
                 cross_attention_dim: int | None = None, num_class_embeds: int | None = None,
                 upcast_attention: bool = False, conditioning_embedding_in_channels: int = 1,
                 conditioning_embedding_num_channels: Sequence[int] = (16, 32, 96, 256), include_fc: bool = True,
                 use_combined_linear: bool = False, use_flash_attention: bool = False) -> None:
        _check_types({name: value for name, value in locals().items() if name in _ARGUMENT_TYPES})
        if not _positive_int(conditioning_embedding_in_channels):
            raise ValueError(f"conditioning_embedding_in_channels must be a positive int, got "
                             f"{conditioning_embedding_in_channels!r}")
        if not _positive_ints(conditioning_embedding_num_channels):
            raise ValueError(f"conditioning_embedding_num_channels must be a non-empty list of positive ints, got "
                             f"{conditioning_embedding_num_channels!r}")
        super().__init__()
        channels, attention_levels = tuple(channels), tuple(bool(a) for a in attention_levels)
        embedding_channels = tuple(conditioning_embedding_num_channels)
        levels = len(channels)
        num_res_blocks = _per_level("num_res_blocks", num_res_blocks, levels)
        num_head_channels = _per_level("num_head_channels", num_head_channels, levels)
        _validate(spatial_dims, in_channels, 1, channels, attention_levels, norm_num_groups, num_head_channels,
                  num_res_blocks, with_conditioning, cross_attention_dim, 0.0, transformer_num_layers)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.block_out_channels = channels
        self.num_res_blocks = num_res_blocks
        self.attention_levels = attention_levels
        self.num_head_channels = num_head_channels
        self.with_conditioning = with_conditioning
        self.num_class_embeds = num_class_embeds
        self.config = dict(spatial_dims=spatial_dims, in_channels=in_channels, num_res_blocks=num_res_blocks,
                           channels=channels, attention_levels=attention_levels, norm_num_groups=norm_num_groups,
                           norm_eps=norm_eps, resblock_updown=resblock_updown, num_head_channels=num_head_channels,
                           with_conditioning=with_conditioning, transformer_num_layers=transformer_num_layers,
                           cross_attention_dim=cross_attention_dim, num_class_embeds=num_class_embeds,
                           upcast_attention=upcast_attention,
                           conditioning_embedding_in_channels=conditioning_embedding_in_channels,
                           conditioning_embedding_num_channels=embedding_channels, include_fc=include_fc,
                           use_combined_linear=use_combined_linear)

        temb = 4 * channels[0]
        resnet, attention = block_makers(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps,
                                         with_conditioning, transformer_num_layers, cross_attention_dim,
                                         upcast_attention, include_fc, use_combined_linear)
        self.conv_in = Conv(spatial_dims, in_channels, channels[0], 3)
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, temb)
        self.controlnet_cond_embedding = ConditioningEmbedding(spatial_dims, conditioning_embedding_in_channels,
                                                               channels[0], embedding_channels)

        self.down_blocks = nn.ModuleList()
        zero_convs = [_zero_conv(spatial_dims, channels[0], bare=True)]  # MONAI keeps the first one bare
        for i, cout in enumerate(channels):
            self.down_blocks.append(down_level(spatial_dims, channels, i, num_res_blocks[i], attention_levels[i],
                                               resblock_updown, resnet, attention))
            zero_convs += [_zero_conv(spatial_dims, cout) for _ in range(num_res_blocks[i] + (i < levels - 1))]
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)

        self.middle_block = MidLevel(resnet(channels[-1], channels[-1]), attention(levels - 1),
                                     resnet(channels[-1], channels[-1]))
        self.controlnet_mid_block = _zero_conv(spatial_dims, channels[-1])
        self.to(memory_format=channels_last_format(spatial_dims + 2))

    # --- loading ---------------------------------------------------------------------------------------------

    @staticmethod
    def monai_config(model: nn.Module) -> dict:
        return monai_controlnet_config(model)

    # --- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps, controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0,
                context: torch.Tensor | None = None, class_labels: torch.Tensor | None = None):
        self._check_input(x, controlnet_cond, context, class_labels)
        weight = self.conv_in.conv.weight
        layout = dict(device=weight.device, dtype=weight.dtype, memory_format=channels_last_format(x.ndim))
        silu_emb = per_sample(lambda t, labels: silu_time_embedding(self, t, labels),
                              _timesteps(timesteps, x.shape[0], weight.device),
                              class_labels if self.num_class_embeds is not None else None)
        project_time(self, silu_emb)
        cond = self.controlnet_cond_embedding(controlnet_cond.to(**layout))
        if cond.shape[0] != x.shape[0]:
            cond = cond.expand(x.shape[0], *cond.shape[1:])
        h = self.conv_in(x.to(**layout), add=cond)
        skips = [h]
        for level in self.down_blocks:
            h = level(h, silu_emb, context, skips)
        h = self.middle_block(h, silu_emb, context)
        down = [conv_module(skip, zero if isinstance(zero, (nn.Conv2d, nn.Conv3d)) else zero.conv)
                for skip, zero in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h)
        if not (isinstance(conditioning_scale, (int, float)) and conditioning_scale == 1):
            down = [d.mul_(conditioning_scale) for d in down]
            mid = mid.mul_(conditioning_scale)
        return down, mid

    def _check_input(self, x, controlnet_cond, context, class_labels):
        for name, value in (("x", x), ("controlnet_cond", controlnet_cond)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be B×{self.in_channels}×(spatial ×{self.spatial_dims}); got shape "
                             f"{tuple(x.shape)}")
        cond_channels = self.config["conditioning_embedding_in_channels"]
        if controlnet_cond.ndim != x.ndim or controlnet_cond.shape[1] != cond_channels:
            raise ValueError(f"controlnet_cond must be B×{cond_channels}×(spatial ×{self.spatial_dims}); got shape "
                             f"{tuple(controlnet_cond.shape)}")
        if controlnet_cond.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"controlnet_cond has batch {controlnet_cond.shape[0]}, x has {x.shape[0]}")
        halvings = len(self.config["conditioning_embedding_num_channels"]) - 1
        embedded = list(controlnet_cond.shape[2:])
        for _ in range(halvings):  # the embedding's stride-2, padding-1, 3-wide convolutions
            embedded = [math.ceil(s / 2) for s in embedded]
        if embedded != list(x.shape[2:]):
            raise ValueError(f"controlnet_cond's spatial sizes {tuple(controlnet_cond.shape[2:])} become "
                             f"{tuple(embedded)} after the conditioning embedding's {halvings} stride-2 "
                             f"convolution(s); x's are {tuple(x.shape[2:])}")
        if self.config["resblock_updown"]:
            factor = 2 ** (len(self.block_out_channels) - 1)
            if any(s % factor for s in x.shape[2:]):
                raise ValueError(f"with resblock_updown, x's spatial sizes {tuple(x.shape[2:])} must be divisible "
                                 f"by {factor}")
        if context is not None and not self.with_conditioning:
            raise ValueError("context was given but the model was built with with_conditioning=False")
        if self.num_class_embeds is not None and class_labels is None:
            raise ValueError("class_labels are required: the model was built with num_class_embeds")


def monai_controlnet_config(model: nn.Module) -> dict:
    """The constructor arguments of a live MONAI `ControlNet` (or ControlNet3D), read from its modules."""
    conv_in = model.conv_in.conv
    embedding = model.controlnet_cond_embedding
    embedding_channels = (embedding.conv_in.conv.out_channels,
                          *(block.conv.out_channels for block in list(embedding.blocks)[1::2]))
    norm = model.middle_block.resnet_1.norm1
    attention = model.middle_block.attention
    config = dict(spatial_dims=conv_in.weight.ndim - 2, in_channels=conv_in.in_channels,
                  num_res_blocks=tuple(model.num_res_blocks), channels=tuple(model.block_out_channels),
                  attention_levels=tuple(bool(a) for a in model.attention_levels), norm_num_groups=norm.num_groups,
                  norm_eps=norm.eps, resblock_updown=bool(getattr(model.down_blocks[0], "resblock_updown", False)
                                                          or isinstance(model.down_blocks[0].downsampler,
                                                                        ResnetBlock)),
                  num_head_channels=tuple(model.num_head_channels), with_conditioning=bool(model.with_conditioning),
                  num_class_embeds=model.num_class_embeds,
                  conditioning_embedding_in_channels=embedding.conv_in.conv.in_channels,
                  conditioning_embedding_num_channels=embedding_channels)
    if hasattr(attention, "transformer_blocks"):
        block = SpatialTransformer.config_of(attention)
        config.update(transformer_num_layers=block["num_layers"], cross_attention_dim=block["cross_attention_dim"],
                      upcast_attention=block["upcast_attention"], include_fc=block["include_fc"],
                      use_combined_linear=block["use_combined_linear"])
    else:
        attn = attention.attn
        config.update(include_fc=bool(attn.include_fc), use_combined_linear=bool(attn.use_combined_linear))
    return config


class ControlledUNet(nn.Module):
    """A ControlNet and the diffusion UNet it steers, as one denoiser `model(x, t, controlnet_cond=..., **cond)`
    for `pydiffmed.sample` / `Sampler` (MONAI `ControlNetDiffusionInferer`'s model evaluation: the ControlNet's
    residuals go to the UNet's skip connections and middle block).

    unet: UNet3D or a MONAI `DiffusionModelUNet` (accelerate()d or not); controlnet: ControlNet3D or a MONAI
    `ControlNet`. conditioning_scale multiplies the residuals (a `conditioning_scale` keyword in cond overrides
    it). `context` and `class_labels` go to both networks, as in MONAI's inferer.

    Pass the conditioning image as a cond tensor: `cond={"controlnet_cond": img}`. With classifier-free guidance
    the engine needs every cond key in uncond as well; MONAI's inferer uses the same image in both halves, i.e.
    `cond={"context": c, "controlnet_cond": img}, uncond={"context": c_null, "controlnet_cond": img}`."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, conditioning_scale: float = 1.0):
        super().__init__()
        if not isinstance(unet, nn.Module) or not isinstance(controlnet, nn.Module):
            raise TypeError(f"unet and controlnet must be torch.nn.Modules, got {type(unet).__name__} and "
                            f"{type(controlnet).__name__}")
        if isinstance(conditioning_scale, bool) or not isinstance(conditioning_scale, (int, float)) \
                or not math.isfinite(conditioning_scale):
            raise TypeError(f"conditioning_scale must be a finite number, got {conditioning_scale!r}")
        self.unet, self.controlnet = unet, controlnet
        self.conditioning_scale = float(conditioning_scale)

    @classmethod
    def from_monai(cls, unet: nn.Module, controlnet: nn.Module, conditioning_scale: float = 1.0) -> "ControlledUNet":
        """UNet3D and ControlNet3D copies (configuration and weights) of live MONAI models."""
        from .unet import UNet3D

        return cls(UNet3D.from_monai(unet), ControlNet3D.from_monai(controlnet), conditioning_scale)

    def forward(self, x: torch.Tensor, timesteps, controlnet_cond: torch.Tensor, context=None, class_labels=None,
                conditioning_scale: float | None = None) -> torch.Tensor:
        if not isinstance(controlnet_cond, torch.Tensor):
            raise TypeError(f"controlnet_cond must be a torch.Tensor, got {type(controlnet_cond).__name__}")
        scale = self.conditioning_scale if conditioning_scale is None else conditioning_scale
        extra = {} if class_labels is None else {"class_labels": class_labels}
        down, mid = self.controlnet(x=x, timesteps=timesteps, controlnet_cond=controlnet_cond.to(x.dtype),
                                    conditioning_scale=scale, context=context, **extra)
        return self.unet(x, timesteps=timesteps, context=context, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **extra)


__all__ = ["ControlNet3D", "ControlledUNet", "conv_silu", "monai_controlnet_config"]
