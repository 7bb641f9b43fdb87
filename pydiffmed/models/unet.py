"""`UNet3D`: MONAI's `DiffusionModelUNet` (same constructor, same forward, same state-dict keys) built for fast
inference on pydiffmed ops.

What differs from MONAI's forward, and why (CPU measurements in benchmarks/bench_unet.py):
* Activations are channels_last(_3d) from the first convolution to the last (one layout conversion at the input,
  one at the output). Convolutions call oneDNN directly on CPU (see layers.py: torch's own dispatch runs the
  small-volume levels on its slow im2col path) and cuDNN in channels_last on GPU.
* Every GroupNorm→SiLU pair is one `ops.group_norm(act="silu")`; the resnet's time-embedding add is that
  kernel's `bias_nc` input (no separate broadcast add); the resnet's residual add is the second convolution's
  epilogue (oneDNN binary post-op on CPU). The time projections of all resnets are one GEMM per forward
  (`project_time`), not one small GEMM per resnet.
* Nearest ×2 upsampling + 3×3×3 convolution is one 2×2×2 convolution over the low-resolution input plus a
  phase interleave (layers.upsample_conv): ~3× fewer FLOPs, no upsampled intermediate.
* Attention is `ops.attention` (flash-style, no N×N matrix) on fused QKV projections, reading token-major
  GroupNorm output; the proj_out GEMM accumulates onto the residual.
* `forward` never reads a device value on the host, so the model can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import GroupNormSiLU
from .attention_block import SpatialAttentionBlock
from .checkpoint import MonaiModule
from .layers import (Conv, avg_pool_2x, conv_module, derived, float32_parameters, linear, norm_affine, per_sample,
                     upsample_conv, upsample_nearest)
from .transformer import SpatialTransformer


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of Ho et al. (cos half, then sin half, zero-padded to an odd dim), fp32, B×dim."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    freqs = torch.exp(exponent / half)
    angles = timesteps.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def silu_time_embedding(net: nn.Module, timesteps: torch.Tensor, class_labels) -> torch.Tensor:
    """SiLU(time_embed(sinusoid(t)) + class embedding), B×temb: the input of every resnet's time projection. `net`
    has MONAI's attribute names (conv_in, time_embed, block_out_channels, class_embedding)."""
    dtype = net.conv_in.conv.weight.dtype
    emb = net.time_embed(timestep_embedding(timesteps, net.block_out_channels[0]).to(dtype))
    if class_labels is not None:
        emb = emb + net.class_embedding(class_labels).to(dtype)
    return F.silu(emb)


def resnet_forward(block: nn.Module, x: torch.Tensor, silu_emb: torch.Tensor) -> torch.Tensor:
    """MONAI's `DiffusionUNetResnetBlock` math on the fused ops. `block` has MONAI's attribute names (norm1, conv1,
    time_emb_proj, norm2, conv2, skip_connection, up, down); silu_emb = SiLU(time embedding), B×temb."""
    norm1, norm2 = block.norm1, block.norm2
    h = ops.group_norm(x, norm1.num_groups, *norm_affine(norm1), norm1.eps, act="silu")
    if block.up:
        x = upsample_nearest(x)
        h = upsample_conv(h, block.conv1.conv)
    else:
        if block.down:
            x, h = avg_pool_2x(x), avg_pool_2x(h)
        h = conv_module(h, block.conv1.conv)
    h = ops.group_norm(h, norm2.num_groups, *norm_affine(norm2), norm2.eps, act="silu",
                       bias_nc=time_projection(block, silu_emb))
    skip = block.skip_connection
    residual = x if isinstance(skip, nn.Identity) else conv_module(x, skip.conv)
    return conv_module(h, block.conv2.conv, add=residual)


def time_projection(block: nn.Module, silu_emb: torch.Tensor) -> torch.Tensor:
    """block.time_emb_proj(silu_emb): what `project_time` made for this very silu_emb, else computed here."""
    made = block.__dict__.get("_pdm_time_projection")
    if made is not None and made[0] is silu_emb:
        return made[1]
    proj = block.time_emb_proj
    return linear(silu_emb, proj.weight, proj.bias, owner=proj)


def project_time(net: nn.Module, silu_emb: torch.Tensor) -> None:
    """Every resnet's time projection of silu_emb as one GEMM on the stacked weights of net's resnets (cached on
    `net`), each handed to its resnet for `time_projection`. A per-resnet projection is a GEMM of one row per
    sample, mostly call overhead: measured ~40 µs each on the CPU, and a forward has one per resnet. The same
    products as `linear` computes (fp32 accumulation, one rounding to the model's dtype). Nothing is done with
    autograd on (DPS, training): then each resnet projects its own, as MONAI, and the blocks keep no graph."""
    if torch.is_grad_enabled():
        return
    resnets = net.__dict__.get("_pdm_resnets")
    if resnets is None:  # a plain list, not a registered submodule list: no state-dict keys
        resnets = net.__dict__["_pdm_resnets"] = [m for m in net.modules() if isinstance(m, ResnetBlock)]
    projections = [block.time_emb_proj for block in resnets]
    sources = [t for proj in projections for t in (proj.weight, proj.bias)]

    def stack():
        weights, biases = zip(*(float32_parameters(None, proj.weight, proj.bias) if silu_emb.device.type == "cpu"
                                else (proj.weight, proj.bias) for proj in projections))
        return torch.cat(weights), torch.cat(biases)

    weight, bias = derived(net, "_pdm_time_projections", sources, stack)
    rows = per_sample(lambda sample: F.linear(sample.to(weight.dtype), weight, bias), silu_emb).to(silu_emb.dtype)
    for block, part in zip(resnets, rows.split([proj.out_features for proj in projections], dim=1)):
        block.__dict__["_pdm_time_projection"] = (silu_emb, part.contiguous())


class ResnetBlock(nn.Module):
    """MONAI `DiffusionUNetResnetBlock`: GN→SiLU→conv1, + time projection, GN→SiLU→conv2, + skip."""

    def __init__(self, spatial_dims: int, in_channels: int, temb_channels: int, out_channels: int | None = None,
                 up: bool = False, down: bool = False, norm_num_groups: int = 32, norm_eps: float = 1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        self.up, self.down = up, down
        self.norm1 = GroupNormSiLU(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = Conv(spatial_dims, in_channels, out_channels, 3)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNormSiLU(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = Conv(spatial_dims, out_channels, out_channels, 3)
        nn.init.zeros_(self.conv2.conv.weight)  # as MONAI: each block starts as the identity
        nn.init.zeros_(self.conv2.conv.bias)
        self.skip_connection = (nn.Identity() if out_channels == in_channels
                                else Conv(spatial_dims, in_channels, out_channels, 1))

    def forward(self, x, silu_emb):
        return resnet_forward(self, x, silu_emb)


class Downsample(nn.Module):
    """Strided 3×3(×3) convolution (`op.conv.*`)."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.op = Conv(spatial_dims, channels, channels, 3, stride=2, padding=1)

    def forward(self, x, silu_emb):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3(×3) convolution (`postconv.conv.*`), computed without the upsampled tensor."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.postconv = Conv(spatial_dims, channels, channels, 3)

    def forward(self, x, silu_emb):
        return upsample_conv(x, self.postconv.conv)


def block_makers(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps, with_conditioning,
                 transformer_num_layers, cross_attention_dim, upcast_attention, include_fc, use_combined_linear):
    """resnet(cin, cout, up=, down=) and attention(level) for one DiffusionModelUNet configuration (shared by
    UNet3D and ControlNet3D)."""
    temb = 4 * channels[0]

    def resnet(cin, cout, **kw):
        return ResnetBlock(spatial_dims, cin, temb, cout, **kw, norm_num_groups=norm_num_groups, norm_eps=norm_eps)

    def attention(level):
        return _attention_block(spatial_dims, channels[level], num_head_channels[level], norm_num_groups, norm_eps,
                                with_conditioning, transformer_num_layers, cross_attention_dim, upcast_attention,
                                include_fc, use_combined_linear)

    return resnet, attention


def down_level(spatial_dims, channels, i, num_res_blocks, with_attention, resblock_updown, resnet, attention):
    """Encoder level i of MONAI's DiffusionModelUNet (and ControlNet): resnets (+ attentions), then a downsampler
    unless it is the last level."""
    cin, cout = channels[max(i - 1, 0)], channels[i]
    resnets = [resnet(cin if j == 0 else cout, cout) for j in range(num_res_blocks)]
    attentions = [attention(i) for _ in range(num_res_blocks)] if with_attention else []
    downsampler = None
    if i < len(channels) - 1:
        downsampler = resnet(cout, cout, down=True) if resblock_updown else Downsample(spatial_dims, cout)
    return DownLevel(resnets, attentions, downsampler)


def _attention_block(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps, with_conditioning,
                     transformer_num_layers, cross_attention_dim, upcast_attention, include_fc, use_combined_linear):
    if with_conditioning:
        return SpatialTransformer(spatial_dims, channels, channels // num_head_channels, num_head_channels,
                                  transformer_num_layers, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                                  cross_attention_dim=cross_attention_dim, upcast_attention=upcast_attention,
                                  include_fc=include_fc, use_combined_linear=use_combined_linear)
    # MONAI passes upcast_attention to the transformer only; its unconditioned blocks never upcast.
    return SpatialAttentionBlock(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps,
                                 include_fc=include_fc, use_combined_linear=use_combined_linear)


def _apply_attention(attn, h, context):
    if isinstance(attn, SpatialTransformer):
        return attn(h, context)
    return attn(h)


class DownLevel(nn.Module):
    """One encoder level: `resnets.j`, optional `attentions.j`, optional `downsampler` (MONAI key names)."""

    def __init__(self, resnets, attentions, downsampler):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.downsampler = downsampler

    def forward(self, h, silu_emb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, silu_emb)
            if len(self.attentions):
                h = _apply_attention(self.attentions[j], h, context)
            skips.append(h)
        if self.downsampler is not None:
            h = self.downsampler(h, silu_emb)
            skips.append(h)
        return h


class MidLevel(nn.Module):
    """`resnet_1`, `attention`, `resnet_2`."""

    def __init__(self, resnet_1, attention, resnet_2):
        super().__init__()
        self.resnet_1, self.attention, self.resnet_2 = resnet_1, attention, resnet_2

    def forward(self, h, silu_emb, context):
        h = self.resnet_1(h, silu_emb)
        h = _apply_attention(self.attention, h, context)
        return self.resnet_2(h, silu_emb)


class UpLevel(nn.Module):
    """One decoder level: each resnet consumes the latest skip tensor (concatenated on channels)."""

    def __init__(self, resnets, attentions, upsampler):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsampler = upsampler

    def forward(self, h, silu_emb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), silu_emb)
            if len(self.attentions):
                h = _apply_attention(self.attentions[j], h, context)
        if self.upsampler is not None:
            h = self.upsampler(h, silu_emb)
        return h


class UNet3D(MonaiModule):
    """MONAI `DiffusionModelUNet`-compatible denoiser. Arguments and defaults are MONAI's; `spatial_dims` may be
    3 or 2. `dropout_cattn` is accepted (inference has no dropout) and `use_flash_attention` too (attention is
    always the flash kernel here). Load MONAI checkpoints with `load_state_dict` (today's or the older
    GenerativeModels key names), `load_checkpoint(path)` or `UNet3D.from_monai(model)`.

    forward(x, timesteps, context=None, class_labels=None, [ControlNet residuals]): x is B×in_channels×D×H×W
    (or ×H×W) with every spatial size divisible by 2^(len(channels)-1); timesteps a tensor of B values (or one,
    broadcast); context B×S×cross_attention_dim; the output is B×out_channels×... contiguous, in the model's dtype
    (x is cast to it on entry). Inference only: the fused kernels have no backward."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 num_res_blocks: Sequence[int] | int = (2, 2, 2, 2), channels: Sequence[int] = (32, 64, 64, 64),
                 attention_levels: Sequence[bool] = (False, False, True, True), norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, resblock_updown: bool = False, num_head_channels: int | Sequence[int] = 8,
                 with_conditioning: bool = False, transformer_num_layers: int = 1,
                 cross_attention_dim: int | None = None, num_class_embeds: int | None = None,
                 upcast_attention: bool = False, dropout_cattn: float = 0.0, include_fc: bool = True,
                 use_combined_linear: bool = False, use_flash_attention: bool = False) -> None:
        _check_types({name: value for name, value in locals().items() if name in _ARGUMENT_TYPES})
        super().__init__()
        channels, attention_levels = tuple(channels), tuple(bool(a) for a in attention_levels)
        levels = len(channels)
        num_res_blocks = _per_level("num_res_blocks", num_res_blocks, levels)
        num_head_channels = _per_level("num_head_channels", num_head_channels, levels)
        _validate(spatial_dims, in_channels, out_channels, channels, attention_levels, norm_num_groups,
                  num_head_channels, num_res_blocks, with_conditioning, cross_attention_dim, dropout_cattn,
                  transformer_num_layers)
        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.block_out_channels = channels
        self.num_res_blocks = num_res_blocks
        self.attention_levels = attention_levels
        self.num_head_channels = num_head_channels
        self.with_conditioning = with_conditioning
        self.num_class_embeds = num_class_embeds
        self.config = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                           num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
                           norm_num_groups=norm_num_groups, norm_eps=norm_eps, resblock_updown=resblock_updown,
                           num_head_channels=num_head_channels, with_conditioning=with_conditioning,
                           transformer_num_layers=transformer_num_layers, cross_attention_dim=cross_attention_dim,
                           num_class_embeds=num_class_embeds, upcast_attention=upcast_attention,
                           include_fc=include_fc, use_combined_linear=use_combined_linear)

        temb = 4 * channels[0]
        resnet, attention = block_makers(spatial_dims, channels, num_head_channels, norm_num_groups, norm_eps,
                                         with_conditioning, transformer_num_layers, cross_attention_dim,
                                         upcast_attention, include_fc, use_combined_linear)
        self.conv_in = Conv(spatial_dims, in_channels, channels[0], 3)
        self.time_embed = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, temb)
        self.down_blocks = nn.ModuleList(down_level(spatial_dims, channels, i, num_res_blocks[i], attention_levels[i],
                                                    resblock_updown, resnet, attention) for i in range(levels))
        self.middle_block = MidLevel(resnet(channels[-1], channels[-1]), attention(levels - 1),
                                     resnet(channels[-1], channels[-1]))

        self.up_blocks = nn.ModuleList()
        for i in range(levels):
            level = levels - 1 - i
            cout = channels[level]
            previous = channels[min(level + 1, levels - 1)]  # channels arriving from the level below
            skip_in = channels[max(level - 1, 0)]  # channels of the encoder tensor saved before this level
            count = num_res_blocks[level] + 1
            resnets = []
            for j in range(count):
                skip_channels = skip_in if j == count - 1 else cout
                resnets.append(resnet((previous if j == 0 else cout) + skip_channels, cout))
            attentions = [attention(level) for _ in range(count)] if attention_levels[level] else []
            upsampler = None
            if level > 0:
                upsampler = resnet(cout, cout, up=True) if resblock_updown else Upsample(spatial_dims, cout)
            self.up_blocks.append(UpLevel(resnets, attentions, upsampler))

        self.out = nn.Sequential(GroupNormSiLU(norm_num_groups, channels[0], eps=norm_eps), nn.Identity(),
                                 Conv(spatial_dims, channels[0], out_channels, 3))
        for p in self.out[2].parameters():
            nn.init.zeros_(p)
        # Convolution weights live channels_last like the activations: oneDNN would otherwise copy every weight
        # into that layout on every call (loading and .to(dtype) keep a parameter's layout).
        self.to(memory_format=_channels_last(spatial_dims + 2))

    # --- loading ---------------------------------------------------------------------------------------------

    @staticmethod
    def monai_config(model: nn.Module) -> dict:
        return monai_unet_config(model)

    # --- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """The last two arguments are MONAI's ControlNet inputs: tensors added to the skip connections (in the
        order they are produced, conv_in's output first) and to the middle block's output."""
        h, silu_emb = self._embed(x, timesteps, context, class_labels)
        h = self.conv_in(h)
        skips = [h]
        for level in self.down_blocks:
            h = level(h, silu_emb, context, skips)
        if down_block_additional_residuals is not None:
            for i, residual in enumerate(down_block_additional_residuals[:len(skips)]):
                skips[i] = skips[i] + residual
        h = self.middle_block(h, silu_emb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for level in self.up_blocks:
            h = level(h, silu_emb, context, skips)
        return self._output(h)

    # --- feature caching (DeepCache, Ma et al. 2023) -------------------------------------------------------------
    #
    # The skip connections are numbered in the order the encoder makes them: 0 is conv_in's output, then one per
    # down resnet (after its attention) and one per downsampler. The decoder consumes them in reverse order, one per
    # up resnet. Cache branch k is skip connection k: `forward_and_cache` also returns the feature map entering the
    # up resnet that consumes skip k from the deeper path (what the rest of the network computed below it);
    # `forward_shallow` recomputes only the shallow path around that skip (conv_in and the encoder up to skip k,
    # then that up resnet and the rest of the decoder on the cached deep features) and skips everything deeper.
    # Branch 0 is the cheapest shallow path (conv_in, the last up resnet, out); the branch of the first up resnet
    # of up_blocks[-d] recomputes whole levels (the first d down blocks and the last d up blocks).

    @property
    def num_cache_branches(self) -> int:
        """The number of skip connections: the cache branches are 0 .. num_cache_branches - 1."""
        return 1 + sum(len(level.resnets) + (level.downsampler is not None) for level in self.down_blocks)

    def cache_branch_of_level(self, depth: int) -> int:
        """The cache branch whose shallow path is whole levels: the first `depth` down blocks (less the last
        downsampler) and the last `depth` up blocks, 1 <= depth < len(channels)."""
        levels = len(self.block_out_channels)
        if not _is_int(depth) or not 1 <= depth < levels:
            raise ValueError(f"depth must be an int in [1, {levels - 1}] (the model has {levels} levels), got "
                             f"{depth!r}")
        return sum(self.num_res_blocks[level] + 1 for level in range(depth)) - 1

    def cache_feature_shape(self, shape, branch: int = 0) -> tuple:
        """The shape of the deep features `forward_and_cache` returns for an input of `shape` (B, C, *spatial)."""
        branch = self._check_branch(branch)
        resnet = next(level.resnets[j] for level, j, skip in self._up_units() if skip == branch)
        channels, scale = self._skip_geometry(branch)
        return (shape[0], resnet.norm1.num_channels - channels, *(s // scale for s in shape[2:]))

    def forward_and_cache(self, x: torch.Tensor, timesteps, context: torch.Tensor | None = None,
                          class_labels: torch.Tensor | None = None, *, branch: int = 0):
        """(forward(x, timesteps, context, class_labels), deep features): the same output as `forward` (the same
        operations in the same order), and the feature map entering the up resnet that consumes skip connection
        `branch` from the deeper path (shape `cache_feature_shape(x.shape, branch)`, channels_last)."""
        branch = self._check_branch(branch)
        h, silu_emb = self._embed(x, timesteps, context, class_labels)
        h = self.conv_in(h)
        skips = [h]
        for level in self.down_blocks:
            h = level(h, silu_emb, context, skips)
        h = self.middle_block(h, silu_emb, context)
        features = None
        for level, j, skip in self._up_units():
            if skip == branch:
                features = h
            h = self._up_unit(level, j, h, silu_emb, context, skips)
        return self._output(h), features

    def forward_shallow(self, x: torch.Tensor, timesteps, features: torch.Tensor,
                        context: torch.Tensor | None = None, class_labels: torch.Tensor | None = None, *,
                        branch: int = 0) -> torch.Tensor:
        """The output with the deep path replaced by `features` (from `forward_and_cache` at the same branch, at
        this or an earlier step): conv_in and the encoder up to skip connection `branch`, then the decoder from the
        up resnet that consumes it. With the features of the same x and timesteps this equals `forward`."""
        branch = self._check_branch(branch)
        expected = self.cache_feature_shape(tuple(x.shape), branch)
        if not isinstance(features, torch.Tensor) or tuple(features.shape) != expected:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be the deep features of cache branch {branch}, shape {expected}; got "
                             f"{got}")
        h, silu_emb = self._embed(x, timesteps, context, class_labels)
        h = self.conv_in(h)
        skips = [h]
        for level, j in self._down_units():
            if len(skips) > branch:
                break
            h = self._down_unit(level, j, h, silu_emb, context)
            skips.append(h)
        h = features.to(dtype=h.dtype)
        started = False
        for level, j, skip in self._up_units():
            started = started or skip == branch
            if started:
                h = self._up_unit(level, j, h, silu_emb, context, skips)
        return self._output(h)

    def _check_branch(self, branch):
        count = self.num_cache_branches
        if not _is_int(branch) or not 0 <= branch < count:
            raise ValueError(f"cache branch must be an int in [0, {count - 1}] (a skip connection of this model: 0 "
                             f"is conv_in's output, {count - 1} the deepest), got {branch!r}")
        return int(branch)

    def _skip_geometry(self, branch):
        """(channels, spatial down-scaling factor) of skip connection `branch`."""
        if branch == 0:
            return self.block_out_channels[0], 1
        level, j = self._down_units()[branch - 1]
        return self.block_out_channels[level], 2 ** (level + (j is None))

    def _down_units(self):
        """[(level index, resnet index or None for the downsampler)] in encoder order; unit u makes skip u + 1."""
        return [(i, j) for i, level in enumerate(self.down_blocks)
                for j in [*range(len(level.resnets)), *([None] if level.downsampler is not None else [])]]

    def _up_units(self):
        """(up level, resnet index, the skip connection it consumes) per up resnet and (up level, None, None) per
        upsampler, in decoder order."""
        remaining = self.num_cache_branches
        for level in self.up_blocks:
            for j in range(len(level.resnets)):
                remaining -= 1
                yield level, j, remaining
            if level.upsampler is not None:
                yield level, None, None

    def _embed(self, x, timesteps, context, class_labels, check=True):
        """(x in the model's dtype and channels_last, SiLU(time embedding)), as `forward` computes them. check=False:
        the caller checked the input itself (a spatial-parallel slab)."""
        if check:
            self._check_input(x, context, class_labels)
        weight = self.conv_in.conv.weight
        batch = x.shape[0]
        h = x.to(device=weight.device, dtype=weight.dtype, memory_format=_channels_last(x.ndim))
        silu_emb = per_sample(lambda t, labels: silu_time_embedding(self, t, labels),
                              _timesteps(timesteps, batch, weight.device),
                              class_labels if self.num_class_embeds is not None else None)
        project_time(self, silu_emb)
        return h, silu_emb

    def _down_unit(self, index, j, h, silu_emb, context):
        """One step of DownLevel.forward: resnet j (+ attention j), or the downsampler (j None)."""
        level = self.down_blocks[index]
        if j is None:
            return level.downsampler(h, silu_emb)
        h = level.resnets[j](h, silu_emb)
        if len(level.attentions):
            h = _apply_attention(level.attentions[j], h, context)
        return h

    @staticmethod
    def _up_unit(level, j, h, silu_emb, context, skips):
        """One step of UpLevel.forward: resnet j on (h, the latest skip) (+ attention j), or the upsampler."""
        if j is None:
            return level.upsampler(h, silu_emb)
        h = level.resnets[j](torch.cat([h, skips.pop()], dim=1), silu_emb)
        if len(level.attentions):
            h = _apply_attention(level.attentions[j], h, context)
        return h

    def _output(self, h):
        norm = self.out[0]
        h = ops.group_norm(h, norm.num_groups, *norm_affine(norm), norm.eps, act="silu")
        return self.out[2](h).contiguous()

    def _check_input(self, x, context, class_labels):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be B×{self.in_channels}×(spatial ×{self.spatial_dims}); got shape "
                             f"{tuple(x.shape)}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"x's spatial sizes {tuple(x.shape[2:])} must be divisible by {factor} "
                             f"(the model halves them {len(self.block_out_channels) - 1} times)")
        if context is not None and not self.with_conditioning:
            raise ValueError("context was given but the model was built with with_conditioning=False")
        if self.num_class_embeds is not None and class_labels is None:
            raise ValueError("class_labels are required: the model was built with num_class_embeds")


def _channels_last(ndim):
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _timesteps(timesteps, batch, device):
    t = torch.as_tensor(timesteps, device=device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"timesteps must be a scalar or hold 1 or {batch} values; got shape {tuple(t.shape)}")
    return t.reshape(-1).expand(batch)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(value):
    return _is_int(value) and value >= 1


def _positive_ints(value):
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_positive_int(v) for v in value)


def _flag(value):
    return isinstance(value, bool) or (_is_int(value) and value in (0, 1))


def _number_in(low, high):
    return lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and low <= v <= high


# What each constructor argument must be, checked before any arithmetic on it (a string of channels would
# otherwise fail inside a `%` with Python's own message, or pass as a tuple of characters).
_ARGUMENT_TYPES = {
    "spatial_dims": (_is_int, "an int (2 or 3)"),
    "in_channels": (_positive_int, "a positive int"),
    "out_channels": (_positive_int, "a positive int"),
    "num_res_blocks": (lambda v: _positive_int(v) or _positive_ints(v),
                       "a positive int or a list of positive ints (one per level)"),
    "channels": (_positive_ints, "a non-empty list of positive ints"),
    "attention_levels": (lambda v: isinstance(v, (list, tuple)) and all(_flag(a) for a in v),
                         "a list of booleans (one per level)"),
    "norm_num_groups": (_positive_int, "a positive int"),
    "norm_eps": (lambda v: _number_in(0, math.inf)(v) and 0 < v < math.inf, "a positive finite number"),
    "resblock_updown": (_flag, "true or false"),
    "num_head_channels": (lambda v: _positive_int(v) or (isinstance(v, (list, tuple)) and len(v) > 0
                                                          and all(_is_int(n) and n >= 0 for n in v)),
                          "a positive int or a list of ints ≥ 0 (one per level; 0 where a level has no attention)"),
    "with_conditioning": (_flag, "true or false"),
    "transformer_num_layers": (_positive_int, "a positive int"),
    "cross_attention_dim": (lambda v: v is None or _positive_int(v), "null or a positive int"),
    "num_class_embeds": (lambda v: v is None or _positive_int(v), "null or a positive int"),
    "upcast_attention": (_flag, "true or false"),
    "dropout_cattn": (_number_in(0.0, 1.0), "a number in [0, 1]"),
    "include_fc": (_flag, "true or false"),
    "use_combined_linear": (_flag, "true or false"),
    "use_flash_attention": (_flag, "true or false"),
}


def _check_types(arguments: dict) -> None:
    """ValueError naming the first constructor argument whose type (or sign) is wrong."""
    for name, value in arguments.items():
        check, expected = _ARGUMENT_TYPES[name]
        if not check(value):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise ValueError(f"{name} must be {expected}, got {shown}")


def _per_level(name, value, levels):
    if _is_int(value):
        return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
        raise ValueError(f"{name} must be an int or have one entry per level ({levels}); got {value}")
    return value


def _validate(spatial_dims, in_channels, out_channels, channels, attention_levels, norm_num_groups,
              num_head_channels, num_res_blocks, with_conditioning, cross_attention_dim, dropout_cattn,
              transformer_num_layers):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be ≥ 1, got {in_channels}, {out_channels}")
    if not channels:
        raise ValueError("channels must name at least one level")
    if len(attention_levels) != len(channels):
        raise ValueError(f"attention_levels has {len(attention_levels)} entries but channels has {len(channels)}")
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"every entry of channels {channels} must be divisible by norm_num_groups="
                         f"{norm_num_groups}")
    if any(n < 1 for n in num_res_blocks):
        raise ValueError(f"num_res_blocks must be ≥ 1 at every level, got {num_res_blocks}")
    if with_conditioning and cross_attention_dim is None:
        raise ValueError("with_conditioning=True needs cross_attention_dim")
    if cross_attention_dim is not None and not with_conditioning:
        raise ValueError("cross_attention_dim was given but with_conditioning=False")
    if not 0.0 <= dropout_cattn <= 1.0:
        raise ValueError(f"dropout_cattn must be in [0, 1], got {dropout_cattn}")
    if transformer_num_layers < 1:
        raise ValueError(f"transformer_num_layers must be ≥ 1, got {transformer_num_layers}")
    # The middle block always has attention at the last level.
    for level, channel in enumerate(channels):
        if attention_levels[level] or level == len(channels) - 1:
            head = num_head_channels[level]
            if head < 1 or (not with_conditioning and channel % head):
                raise ValueError(f"num_head_channels[{level}]={head} must be ≥ 1 and divide channels[{level}]="
                                 f"{channel} (level {level} has attention)")
            if with_conditioning and channel // head < 1:
                raise ValueError(f"num_head_channels[{level}]={head} exceeds channels[{level}]={channel}")


def monai_unet_config(model: nn.Module) -> dict:
    """The constructor arguments of a live MONAI `DiffusionModelUNet` (read from its modules)."""
    conv_in = model.conv_in.conv
    spatial_dims = conv_in.weight.ndim - 2
    out_norm = model.out[0]
    attention = model.middle_block.attention
    config = dict(spatial_dims=spatial_dims, in_channels=conv_in.in_channels,
                  out_channels=model.out[2].conv.out_channels, num_res_blocks=tuple(model.num_res_blocks),
                  channels=tuple(model.block_out_channels), attention_levels=tuple(model.attention_levels),
                  norm_num_groups=out_norm.num_groups, norm_eps=out_norm.eps,
                  resblock_updown=bool(getattr(model.down_blocks[0], "resblock_updown", False)),
                  num_head_channels=tuple(model.num_head_channels), with_conditioning=bool(model.with_conditioning),
                  num_class_embeds=model.num_class_embeds)
    if hasattr(attention, "transformer_blocks"):
        block = SpatialTransformer.config_of(attention)
        config.update(transformer_num_layers=block["num_layers"], cross_attention_dim=block["cross_attention_dim"],
                      upcast_attention=block["upcast_attention"], include_fc=block["include_fc"],
                      use_combined_linear=block["use_combined_linear"])
    else:
        attn = attention.attn
        config.update(include_fc=bool(attn.include_fc), use_combined_linear=bool(attn.use_combined_linear))
    return config


__all__ = ["UNet3D", "ResnetBlock", "monai_unet_config", "project_time", "resnet_forward", "silu_time_embedding",
           "time_projection", "timestep_embedding"]
