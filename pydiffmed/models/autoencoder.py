"""`AutoencoderKL`: MONAI's `AutoencoderKL` (same constructor, methods and state-dict keys) on pydiffmed ops, with
an exact decode/encode by depth slabs for networks without attention.

What differs from MONAI's forward, and why (the same choices as `UNet3D`, see unet.py):
* Activations are channels_last(_3d) from the first convolution to the last; CPU convolutions call oneDNN directly
  (layers.py) and the residual block's `x + h` is the second convolution's epilogue.
* Every GroupNorm→SiLU pair is one `ops.group_norm(act="silu")`. (MONAI's final GroupNorm of the encoder and of
  the decoder has no SiLU after it; neither has this one.)
* Nearest ×2 upsampling + 3×3×3 convolution is one 2×2×2 convolution on the low-resolution input plus a phase
  interleave (layers.upsample_conv): ~3× fewer FLOPs and no upsampled intermediate.
* Attention blocks are `SpatialAttentionBlock` (flash attention, fused QKV); MONAI builds them with one head.

`decode(z, tile=..., max_memory=...)` and `encode(x, tile=...)` compute the same numbers as the whole-volume call
by depth slabs (pydiffmed/partition.py explains how and what memory it bounds); they refuse networks whose
attention needs the whole volume at once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import partition
from ..nn import GroupNorm3d, GroupNormSiLU
from .attention_block import SpatialAttentionBlock
from .checkpoint import CheckpointError, MonaiModule, convert_monai_state_dict
from .layers import Conv, channels_last_format, conv_module, upsample_conv


class ResBlock(nn.Module):
    """MONAI `AEKLResBlock`: GN→SiLU→conv1, GN→SiLU→conv2, + x (through a 1×1 `nin_shortcut` when the channel
    count changes). Keys: norm1, conv1.conv, norm2, conv2.conv, nin_shortcut.conv."""

    def __init__(self, spatial_dims: int, in_channels: int, norm_num_groups: int, norm_eps: float,
                 out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = GroupNormSiLU(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = Conv(spatial_dims, in_channels, out_channels, 3)
        self.norm2 = GroupNormSiLU(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = Conv(spatial_dims, out_channels, out_channels, 3)
        self.nin_shortcut = (nn.Identity() if in_channels == out_channels
                             else Conv(spatial_dims, in_channels, out_channels, 1))

    def forward(self, x):
        h = self.conv1(self.norm1(x))
        residual = x if isinstance(self.nin_shortcut, nn.Identity) else self.nin_shortcut(x)
        return self.conv2(self.norm2(h), add=residual)


class Downsample(nn.Module):
    """MONAI `AEKLDownsample`: zero-pad one voxel at the high end of every axis, then a stride-2 3×3(×3)
    convolution without padding (`conv.conv.*`)."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.conv = Conv(spatial_dims, channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1) * self.spatial_dims))


class Upsample(nn.Module):
    """MONAI `Upsample(mode="nontrainable", interp_mode="nearest", post_conv=...)`: nearest ×2, then a 3×3(×3)
    convolution (`postconv.conv.*`), computed without the upsampled tensor."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.postconv = Conv(spatial_dims, channels, channels, 3)

    def forward(self, x):
        return upsample_conv(x, self.postconv.conv)


class InterpolateUpsample(nn.Module):
    """MAISI's `MaisiUpsample` (use_convtranspose=False): linear ×2 interpolation (trilinear in 3-D, bilinear in
    2-D, align_corners=False), then a 3×3(×3) convolution (`postconv.conv.*`)."""

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"
        self.postconv = Conv(spatial_dims, channels, channels, 3)

    def forward(self, x):
        return self.postconv(F.interpolate(x, scale_factor=2.0, mode=self.mode))


class DeconvUpsample(nn.Module):
    """MONAI `Upsample(mode="deconv")` (use_convtranspose=True): a 2×2(×2) stride-2 transposed convolution
    (`deconv.*`); kernel_size=3: MAISI's (3×3(×3), stride 2, padding 1, output padding 1)."""

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int = 2):
        super().__init__()
        conv_type = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        extra = dict(padding=1, output_padding=1) if kernel_size == 3 else {}
        self.deconv = conv_type(channels, channels, kernel_size=kernel_size, stride=2, **extra)

    def forward(self, x):
        return self.deconv(x)


def _attention(spatial_dims, channels, norm_num_groups, norm_eps, include_fc, use_combined_linear):
    # MONAI's autoencoder passes no num_head_channels: one head over all channels.
    return SpatialAttentionBlock(spatial_dims, channels, None, norm_num_groups, norm_eps, include_fc=include_fc,
                                 use_combined_linear=use_combined_linear)


class Encoder(nn.Module):
    """MONAI's `Encoder`, block for block (`blocks.i`): conv_in; per level num_res_blocks resnets (each followed by
    attention on attention levels) and a downsampler except at the last level; optionally resnet, attention,
    resnet (with_nonlocal_attn); GroupNorm (no SiLU); conv_out."""

    def __init__(self, spatial_dims, in_channels, channels, out_channels, num_res_blocks, norm_num_groups, norm_eps,
                 attention_levels, with_nonlocal_attn=True, include_fc=True, use_combined_linear=False):
        super().__init__()
        attention = dict(norm_num_groups=norm_num_groups, norm_eps=norm_eps, include_fc=include_fc,
                         use_combined_linear=use_combined_linear)
        blocks = [Conv(spatial_dims, in_channels, channels[0], 3)]
        cin = channels[0]
        for level, cout in enumerate(channels):
            for _ in range(num_res_blocks[level]):
                blocks.append(ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cout))
                cin = cout
                if attention_levels[level]:
                    blocks.append(_attention(spatial_dims, cin, **attention))
            if level < len(channels) - 1:
                blocks.append(Downsample(spatial_dims, cin))
        if with_nonlocal_attn:
            blocks += [ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cin),
                       _attention(spatial_dims, cin, **attention),
                       ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cin)]
        blocks += [GroupNorm3d(norm_num_groups, cin, eps=norm_eps), Conv(spatial_dims, cin, out_channels, 3)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """MONAI's `Decoder`, block for block: conv_in; optionally resnet, attention, resnet; per level (deepest
    first) num_res_blocks resnets (+ attention) and an upsampler except at the last; GroupNorm (no SiLU);
    conv_out."""

    def __init__(self, spatial_dims, channels, in_channels, out_channels, num_res_blocks, norm_num_groups, norm_eps,
                 attention_levels, with_nonlocal_attn=True, use_convtranspose=False, include_fc=True,
                 use_combined_linear=False, upsample_mode="nearest", convtranspose_kernel_size=2):
        super().__init__()
        attention = dict(norm_num_groups=norm_num_groups, norm_eps=norm_eps, include_fc=include_fc,
                         use_combined_linear=use_combined_linear)
        channels = list(reversed(channels))
        cin = channels[0]
        blocks = [Conv(spatial_dims, in_channels, cin, 3)]
        if with_nonlocal_attn:
            blocks += [ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cin),
                       _attention(spatial_dims, cin, **attention),
                       ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cin)]
        levels = len(channels)
        for i, cout in enumerate(channels):
            level = levels - 1 - i
            for _ in range(num_res_blocks[level]):
                blocks.append(ResBlock(spatial_dims, cin, norm_num_groups, norm_eps, cout))
                cin = cout
                if attention_levels[level]:
                    blocks.append(_attention(spatial_dims, cin, **attention))
            if i < levels - 1:
                if use_convtranspose:
                    blocks.append(DeconvUpsample(spatial_dims, cin, convtranspose_kernel_size))
                else:
                    blocks.append((Upsample if upsample_mode == "nearest" else InterpolateUpsample)(spatial_dims, cin))
        blocks += [GroupNorm3d(norm_num_groups, cin, eps=norm_eps), Conv(spatial_dims, cin, out_channels, 3)]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class AutoencoderKL(MonaiModule):
    """MONAI `AutoencoderKL`-compatible autoencoder (Rombach et al. 2022; Pinaya et al. 2022). Arguments and
    defaults are MONAI's; spatial_dims is 2 or 3. `use_checkpoint` and `use_flash_attention` are accepted for
    compatibility (inference needs no activation checkpointing; attention is always the flash kernel here).
    Two arguments of pydiffmed's describe MAISI's decoder (`AutoencoderKlMaisi`, see `from_maisi`):
    upsample_mode="linear" (trilinear/bilinear ×2 interpolation before the upsampling convolution, instead of
    MONAI's "nearest") and convtranspose_kernel_size=3 (MAISI's transposed convolution; MONAI's is 2).

    Load MONAI weights with `load_state_dict` (today's keys or the older GenerativeModels names),
    `load_checkpoint(path)` or `AutoencoderKL.from_monai(model)`. Inputs are cast to the model's dtype; outputs
    are contiguous. Inference only: the fused kernels have no backward.

    decode(z, tile=..., max_memory=...), encode(x, tile=..., max_memory=...): the same result as the whole-volume
    call (fp32: equal to rounding), computed by depth slabs with whole-volume GroupNorm statistics; see
    pydiffmed/partition.py for the memory this bounds (working memory) and what it keeps (a residual block's
    input and its output; upsampled activations are recomputed where they are read, not kept), on `storage`."""

    def __init__(self, spatial_dims: int, in_channels: int = 1, out_channels: int = 1,
                 num_res_blocks: Sequence[int] | int = (2, 2, 2, 2), channels: Sequence[int] = (32, 64, 64, 64),
                 attention_levels: Sequence[bool] = (False, False, True, True), latent_channels: int = 3,
                 norm_num_groups: int = 32, norm_eps: float = 1e-6, with_encoder_nonlocal_attn: bool = True,
                 with_decoder_nonlocal_attn: bool = True, use_checkpoint: bool = False,
                 use_convtranspose: bool = False, include_fc: bool = True, use_combined_linear: bool = False,
                 use_flash_attention: bool = False, upsample_mode: str = "nearest",
                 convtranspose_kernel_size: int = 2) -> None:
        super().__init__()
        channels, attention_levels = tuple(channels), tuple(bool(a) for a in attention_levels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if upsample_mode not in ("nearest", "linear"):
            raise ValueError(f"upsample_mode must be 'nearest' (MONAI) or 'linear' (MAISI), got {upsample_mode!r}")
        if convtranspose_kernel_size not in (2, 3):
            raise ValueError(f"convtranspose_kernel_size must be 2 (MONAI) or 3 (MAISI), got "
                             f"{convtranspose_kernel_size!r}")
        if not channels:
            raise ValueError("channels must name at least one level")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"every entry of channels {channels} must be divisible by norm_num_groups="
                             f"{norm_num_groups}")
        if len(attention_levels) != len(channels):
            raise ValueError(f"attention_levels has {len(attention_levels)} entries but channels has {len(channels)}")
        if isinstance(num_res_blocks, int):
            num_res_blocks = (num_res_blocks,) * len(channels)
        num_res_blocks = tuple(num_res_blocks)
        if len(num_res_blocks) != len(channels):
            raise ValueError(f"num_res_blocks must be an int or have one entry per level ({len(channels)}); got "
                             f"{num_res_blocks}")
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.use_checkpoint = use_checkpoint
        self.config = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                           num_res_blocks=num_res_blocks, channels=channels, attention_levels=attention_levels,
                           latent_channels=latent_channels, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
                           with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
                           with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
                           use_convtranspose=use_convtranspose, include_fc=include_fc,
                           use_combined_linear=use_combined_linear, upsample_mode=upsample_mode,
                           convtranspose_kernel_size=convtranspose_kernel_size)
        attention = dict(include_fc=include_fc, use_combined_linear=use_combined_linear)
        self.encoder = Encoder(spatial_dims, in_channels, channels, latent_channels, num_res_blocks,
                               norm_num_groups, norm_eps, attention_levels, with_encoder_nonlocal_attn, **attention)
        self.decoder = Decoder(spatial_dims, channels, latent_channels, out_channels, num_res_blocks,
                               norm_num_groups, norm_eps, attention_levels, with_decoder_nonlocal_attn,
                               use_convtranspose, **attention, upsample_mode=upsample_mode,
                               convtranspose_kernel_size=convtranspose_kernel_size)
        self.quant_conv_mu = Conv(spatial_dims, latent_channels, latent_channels, 1)
        self.quant_conv_log_sigma = Conv(spatial_dims, latent_channels, latent_channels, 1)
        self.post_quant_conv = Conv(spatial_dims, latent_channels, latent_channels, 1)
        # Convolution weights live channels_last like the activations (oneDNN would reorder them every call).
        self.to(memory_format=channels_last_format(spatial_dims + 2))

    # --- loading ---------------------------------------------------------------------------------------------

    def convert_keys(self, state_dict) -> dict:
        """Today's keys, GenerativeModels' older names (attention `to_q/to_k/to_v/proj_attn` directly on the
        block, the upsampler's `conv` for `postconv`) or MAISI's (`AutoencoderKlMaisi`, see `maisi_key_map`)."""
        return self._rename_old_upsampler_keys(convert_monai_state_dict(self._rename_maisi_keys(state_dict)))

    def maisi_key_map(self) -> dict:
        """{MAISI key: this model's key} for the weights `AutoencoderKlMaisi` names differently: its
        `MaisiConvolution` wraps MONAI's `Convolution` once more (`<name>.conv.conv.*` for our `<name>.conv.*`,
        also inside resnets and downsamplers), and its upsamplers hold that wrapper as `conv`
        (`<name>.conv.conv.conv.*` for our `<name>.postconv.conv.*` or, transposed, `<name>.deconv.*`).
        GroupNorm (`MaisiGroupNorm3D`), attention and the quant convolutions keep MONAI's names."""
        mapping = {}
        for name, module in self.named_modules():
            if isinstance(module, Conv):
                mapping.update({f"{name}.conv.conv.{p}": f"{name}.conv.{p}" for p, _ in module.conv.named_parameters()})
            elif isinstance(module, (InterpolateUpsample, DeconvUpsample)):
                inner = module.postconv.conv if isinstance(module, InterpolateUpsample) else module.deconv
                prefix = f"{name}.postconv.conv." if isinstance(module, InterpolateUpsample) else f"{name}.deconv."
                mapping.update({f"{name}.conv.conv.conv.{p}": prefix + p for p, _ in inner.named_parameters()})
        return mapping

    def _rename_maisi_keys(self, state_dict):
        own = self.state_dict().keys()
        mapping = {k: v for k, v in self.maisi_key_map().items() if k not in own}
        renamed = {}
        for key, value in state_dict.items():
            new_key = mapping.get(key, key)
            if new_key in renamed:
                raise CheckpointError(f"checkpoint has both {key!r} and a key that also maps to {new_key!r}")
            renamed[new_key] = value
        return renamed

    def _rename_old_upsampler_keys(self, state_dict):
        # `decoder.blocks.i.conv.conv.*` names the upsampler's convolution only where block i is an Upsample
        # (the encoder's downsamplers keep that name today), so the rename follows the model's structure.
        upsamplers = {f"decoder.blocks.{i}.conv.conv." for i, block in enumerate(self.decoder.blocks)
                      if isinstance(block, Upsample)}
        renamed = {}
        for key, value in state_dict.items():
            prefix = key[:key.rfind(".") + 1]
            if prefix in upsamplers:
                key = prefix.replace(".conv.conv.", ".postconv.conv.") + key[len(prefix):]
            renamed[key] = value
        return renamed

    @staticmethod
    def monai_config(model: nn.Module) -> dict:
        if _is_maisi(model):
            return maisi_autoencoder_config(model)
        return monai_autoencoder_config(model)

    @classmethod
    def from_maisi(cls, model: nn.Module):
        """This network with the configuration and weights of a live MONAI `AutoencoderKlMaisi` (same device and
        dtype; `from_monai` does the same for either class). The same math: MAISI's num_splits/dim_split
        (convolutions by overlapping pieces), save_mem and print_info only save memory or log, and are dropped;
        norm_float16 (MAISI rounds every normalised activation to float16 to save memory) is not reproduced —
        GroupNorm statistics are fp32 and outputs are in the model's dtype (run the model in float16 for fp16
        activations); a MAISI model with norm_float16=False gives the same numbers in fp32."""
        if not _is_maisi(model):
            raise TypeError(f"from_maisi expects a MONAI AutoencoderKlMaisi, got {type(model).__name__}")
        return cls.from_monai(model)

    # --- the MONAI interface -----------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, *, tile: int | None = None, max_memory: int | None = None,
               storage=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_mu, z_sigma) of an image batch B×in_channels×(spatial). With `tile` (slab depth, in rows of each
        layer) or `max_memory` (bytes of working memory per layer) the encoder runs by depth slabs with the same
        result; `storage` is the device holding full activations then (default: the model's device)."""
        x = self._input(x)
        if tile is None and max_memory is None:
            h = self.encoder(x)
        else:
            h = run_blocks_by_slabs(self.encoder.blocks, x, partition.SlabPlan(tile, max_memory), storage, "encoder")
            h = h.to(x.device)
        z_mu = self.quant_conv_mu(h)
        z_log_var = torch.clamp(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu.contiguous(), torch.exp(z_log_var / 2).contiguous()

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """z_mu + z_sigma · ε, ε ~ N(0, 1) from torch's global generator, drawn like MONAI's (randn_like) for a
        contiguous z_sigma: a seed gives MONAI's draw where its z_sigma is contiguous too (not always in 2-D)."""
        return z_mu + torch.randn_like(z_sigma) * z_sigma

    def decode(self, z: torch.Tensor, *, tile: int | None = None, max_memory: int | None = None,
               storage=None) -> torch.Tensor:
        """The image of a latent batch B×latent_channels×(spatial). With `tile` (slab depth, in rows of each layer)
        or `max_memory` (bytes of working memory per layer on the model's device) the decoder runs by depth slabs
        with the same result (no seams); full activations are kept on `storage` (default: the model's device;
        "cpu" keeps them in host memory while slabs are computed on the model's device), where the image is
        returned."""
        h = self.post_quant_conv(self._input(z))
        if tile is None and max_memory is None:
            return self.decoder(h).contiguous()
        return run_blocks_by_slabs(self.decoder.blocks, h, partition.SlabPlan(tile, max_memory), storage, "decoder",
                                   contiguous_output=True)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.encode(x)
        return self.decode(self.sampling(z_mu, z_sigma)), z_mu, z_sigma

    def encode_stage_2_inputs(self, x: torch.Tensor, **slabs) -> torch.Tensor:
        return self.sampling(*self.encode(x, **slabs))

    def decode_stage_2_outputs(self, z: torch.Tensor, **slabs) -> torch.Tensor:
        return self.decode(z, **slabs)

    def _input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}-D tensor (B, C, spatial...), got shape "
                             f"{tuple(x.shape)}")
        weight = self.post_quant_conv.conv.weight
        return x.to(device=weight.device, dtype=weight.dtype, memory_format=channels_last_format(x.ndim))


def run_blocks_by_slabs(blocks, x: torch.Tensor, plan: "partition.SlabPlan", storage=None, what: str = "network",
                        contiguous_output: bool = False) -> torch.Tensor:
    """The output of `blocks` (an Encoder's or Decoder's) on x, computed layer by layer in depth slabs with
    whole-volume GroupNorm statistics (pydiffmed/partition.py): equal to running the blocks on the whole volume.
    Slabs are computed on x's device; full activations live on `storage` (default x's device), where the result
    is returned."""
    if any(isinstance(block, SpatialAttentionBlock) for block in blocks):
        raise ValueError(f"this {what} has attention blocks (attention_levels or the non-local attention option), "
                         f"which need the whole volume at once: it cannot run by slabs exactly. Call without "
                         f"tile/max_memory to run the whole volume.")
    device = x.device
    storage = torch.device(storage) if storage is not None else device
    blocks = list(blocks)

    def consumer_groups(i):  # the GroupNorm that reads block i's output, if any
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if isinstance(following, ResBlock):
            return following.norm1.num_groups
        if isinstance(following, GroupNorm3d):
            return following.num_groups
        return None

    def layer(op, inp, *, norm=None, add=None, out=None, stats=None, memory_format=None):
        rows = plan.rows(op, inp, norm=norm is not None, add=add is not None, stats=stats is not None,
                         device=device)
        return partition.run_layer(op, inp, rows=rows, norm=norm, add=add, out=out, stats=stats, device=device,
                                   storage=storage, memory_format=memory_format)

    dims = x.ndim - 2
    stats = None
    if consumer_groups(-1) is not None:
        stats = partition.sweep_stats(x, consumer_groups(-1), plan.tile or 1, device)
    x = x.to(storage)
    pending_norm = None  # a bare GroupNorm, applied as the next convolution reads its input
    for i, block in enumerate(blocks):
        groups = consumer_groups(i)
        want = partition.GroupStats(groups) if groups is not None else None
        last = i == len(blocks) - 1
        if isinstance(block, GroupNorm3d):
            pending_norm = stats.normalizer(block, act=None)
            continue
        if isinstance(block, Conv):
            x = layer(partition.ConvLayer(block.conv), x, norm=pending_norm, stats=want,
                      memory_format=torch.contiguous_format if last and contiguous_output else None)
            pending_norm = None
        elif isinstance(block, ResBlock):
            s2 = partition.GroupStats(block.norm2.num_groups)
            h = layer(partition.ConvLayer(block.conv1.conv), x, norm=stats.normalizer(block.norm1, "silu"),
                      stats=s2)
            inp = x
            if isinstance(block.nin_shortcut, nn.Identity):
                def add(a, b):
                    return partition.read_rows(inp, a, b, device)
            else:
                def add(a, b):
                    return conv_module(partition.read_rows(inp, a, b, device), block.nin_shortcut.conv)
            # the result has h's shape: written over h, slab by slab
            x = layer(partition.ConvLayer(block.conv2.conv), h, norm=s2.normalizer(block.norm2, "silu"),
                      add=add, out=h, stats=want)
            del h, inp, add
        elif isinstance(block, Downsample):
            x = layer(partition.ConvLayer(block.conv.conv, pads=[(0, 1)] * dims), x, stats=want)
        elif isinstance(block, (Upsample, InterpolateUpsample, DeconvUpsample)):
            op = (partition.UpsampleConvLayer(block.postconv.conv) if isinstance(block, Upsample) else
                  partition.InterpolateUpsampleConvLayer(block.postconv.conv, block.mode, x.shape[2])
                  if isinstance(block, InterpolateUpsample) else partition.DeconvLayer(block.deconv))
            if last:
                x = layer(op, x, stats=want)
            else:  # the level's largest activation: recomputed where it is read rather than stored
                x = partition.LazyActivation(op, x, device)
                if want is not None:
                    rows = plan.rows(op, x.input, norm=False, add=False, stats=True, device=device)
                    rows -= rows % op.align
                    want = partition.sweep_stats(x, groups, rows, device)
        else:
            raise TypeError(f"run_blocks_by_slabs does not know {type(block).__name__}")
        stats = want
    return x


def monai_autoencoder_config(model: nn.Module) -> dict:
    """The constructor arguments of a live MONAI `AutoencoderKL`, read from its modules."""
    encoder, decoder = model.encoder, model.decoder
    channels = tuple(encoder.channels)
    num_res_blocks = tuple(encoder.num_res_blocks)
    attention_levels = tuple(bool(a) for a in encoder.attention_levels)
    # Without the non-local blocks each network has: conv_in, resnets (+ attention), one resampler per level
    # but the last, GroupNorm, conv_out. The non-local option adds resnet, attention, resnet.
    plain = 1 + sum(n * (1 + a) for n, a in zip(num_res_blocks, attention_levels)) + len(channels) - 1 + 2
    attentions = [m for m in model.modules() if type(m).__name__ == "SpatialAttentionBlock"]
    attn = attentions[0].attn if attentions else None
    return dict(spatial_dims=encoder.spatial_dims, in_channels=encoder.in_channels,
                out_channels=decoder.out_channels, num_res_blocks=num_res_blocks, channels=channels,
                attention_levels=attention_levels, latent_channels=model.latent_channels,
                norm_num_groups=encoder.norm_num_groups, norm_eps=encoder.norm_eps,
                with_encoder_nonlocal_attn=len(encoder.blocks) == plain + 3,
                with_decoder_nonlocal_attn=len(decoder.blocks) == plain + 3,
                use_convtranspose=any(hasattr(block, "deconv") for block in decoder.blocks),
                include_fc=bool(attn.include_fc) if attn is not None else True,
                use_combined_linear=bool(attn.use_combined_linear) if attn is not None else False)


def _is_maisi(model: nn.Module) -> bool:
    return any(type(m).__name__ in ("MaisiEncoder", "MaisiDecoder") for m in (getattr(model, "encoder", None),
                                                                             getattr(model, "decoder", None)))


def maisi_autoencoder_config(model: nn.Module) -> dict:
    """AutoencoderKL arguments for a live MONAI `AutoencoderKlMaisi`, read from its blocks (MaisiEncoder keeps no
    configuration): levels are the runs of `MaisiResBlock`s between `MaisiDownsample`s; MONAI `AEKLResBlock`s are
    the non-local part."""
    def kind(block):
        return type(block).__name__

    encoder, decoder = list(model.encoder.blocks), list(model.decoder.blocks)
    levels, attention_levels = [[]], [False]
    for block in encoder[1:]:
        if kind(block) == "AEKLResBlock":
            break
        if kind(block) == "MaisiResBlock":
            levels[-1].append(block.out_channels)
        elif kind(block) == "SpatialAttentionBlock":
            attention_levels[-1] = True
        elif kind(block) == "MaisiDownsample":
            levels.append([])
            attention_levels.append(False)
    if any(not level for level in levels):
        raise ValueError("this AutoencoderKlMaisi has a level without residual blocks; pydiffmed cannot read its "
                         "channels from the modules")
    norm = next(m for m in model.modules() if isinstance(m, nn.GroupNorm))
    attentions = [m for m in model.modules() if kind(m) == "SpatialAttentionBlock"]
    attn = attentions[0].attn if attentions else None
    upsamplers = [b for b in decoder if kind(b) == "MaisiUpsample"]
    return dict(spatial_dims=encoder[0].conv.conv.weight.ndim - 2, in_channels=encoder[0].conv.conv.in_channels,
                out_channels=decoder[-1].conv.conv.out_channels, num_res_blocks=tuple(len(lv) for lv in levels),
                channels=tuple(lv[-1] for lv in levels), attention_levels=tuple(attention_levels),
                latent_channels=model.latent_channels, norm_num_groups=norm.num_groups, norm_eps=norm.eps,
                with_encoder_nonlocal_attn=any(kind(b) == "AEKLResBlock" for b in encoder),
                with_decoder_nonlocal_attn=any(kind(b) == "AEKLResBlock" for b in decoder),
                use_convtranspose=any(b.use_convtranspose for b in upsamplers),
                include_fc=bool(attn.include_fc) if attn is not None else False,
                use_combined_linear=bool(attn.use_combined_linear) if attn is not None else False,
                upsample_mode="linear", convtranspose_kernel_size=3)


__all__ = ["AutoencoderKL", "Decoder", "DeconvUpsample", "Downsample", "Encoder", "InterpolateUpsample", "ResBlock",
           "Upsample", "maisi_autoencoder_config", "monai_autoencoder_config", "run_blocks_by_slabs"]
