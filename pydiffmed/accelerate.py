"""`accelerate(model)`: put pydiffmed's fused blocks into an existing MONAI `DiffusionModelUNet`, in place.
MONAI's `ControlNet` (the same encoder blocks, plus its conditioning embedding and 1×1 convolutions) works too;
`pydiffmed.models.ControlNet3D` is its native, slightly faster form. So do MAISI's `DiffusionModelUNetMaisi` and
`ControlNetMaisi` (MONAI's blocks; the region-index and spacing embeddings are MLPs like the time embedding's),
tested equal in tests/test_maisi.py.

Replaced (each new module holds the model's own Parameter objects, so the state dict, its keys and the outputs
are unchanged):
* `DiffusionUNetResnetBlock` → pydiffmed's resnet block: GroupNorm+SiLU fused, time-embedding add fused into the
  second GroupNorm, residual add fused into conv2, upsampling resnets without the upsampled intermediate;
* `SpatialAttentionBlock` → pydiffmed's (fused QKV, flash attention, token-major GroupNorm);
* `SpatialTransformer` → pydiffmed's (same, plus cross-attention on the context);
* the nearest-×2 + conv upsampler → one 2×2(×2) convolution over the low-resolution input;
* a GroupNorm followed by SiLU in an nn.Sequential (the output head) → one fused GroupNorm+SiLU, the SiLU slot
  becoming nn.Identity; any other GroupNorm → pydiffmed's GroupNorm;
* every plain nn.Conv2d/nn.Conv3d → the oneDNN channels_last path on CPU (class swapped in place, weights
  re-laid out channels_last in place: same Parameter objects and values);
* every nn.Linear, and the time-embedding MLP as a whole, → computed per sample on the CPU, so that sample k's
  result does not depend on its batch companions (models/layers.py, "batch invariance");
* the model's input is converted to channels_last once and its output back to contiguous.
Modules it does not recognise are left alone, so any configuration (or a customised model) still runs.
"""
from __future__ import annotations

import torch
from torch import nn

from .models.layers import FastConv2d, FastConv3d, PerSampleLinear, channels_last_format, per_sample, upsample_conv
from .models.unet import ResnetBlock, resnet_forward
from .nn import GroupNorm3d, GroupNormSiLU


class _MonaiCallResnet(ResnetBlock):
    """pydiffmed's resnet block with MONAI's call form `block(x, emb)` (SiLU of the embedding taken here)."""

    def forward(self, x, emb):
        if emb.shape[0] == 1 and x.shape[0] > 1:  # one timestep for the whole batch, as MONAI's inferers pass it
            emb = emb.expand(x.shape[0], *emb.shape[1:])
        return resnet_forward(self, x, per_sample(torch.nn.functional.silu, emb))


class _PerSampleSequential(nn.Sequential):
    """MONAI's time-embedding MLP (Linear, SiLU, Linear) computed for each sample alone on the CPU."""

    def forward(self, x):
        return per_sample(lambda sample: nn.Sequential.forward(self, sample), x)


class _MonaiCallUpsample(nn.Module):
    """MONAI's upsampler (`postconv.conv.*` keys) called as `upsampler(x, emb)`."""

    def __init__(self, postconv: nn.Module):
        super().__init__()
        self.postconv = postconv

    def forward(self, x, emb=None):
        return upsample_conv(x, self.postconv.conv)


def accelerate(model: nn.Module) -> nn.Module:
    """Swap the GroupNorm/SiLU, resnet, attention, upsampling and convolution modules of a MONAI
    `DiffusionModelUNet` or `ControlNet` (2-D or 3-D) for pydiffmed's, in place; returns the same model object."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, nn.Conv1d) for m in model.modules()):
        raise ValueError("accelerate() supports 2-D and 3-D models; this one has 1-D convolutions")
    from monai.networks.blocks import SpatialAttentionBlock as MonaiSpatialAttention
    from monai.networks.nets.diffusion_model_unet import (DiffusionUNetResnetBlock, SpatialTransformer,
                                                           WrappedUpsample)

    _replace_children(model, DiffusionUNetResnetBlock, MonaiSpatialAttention, SpatialTransformer,
                      WrappedUpsample)
    if type(getattr(model, "time_embed", None)) is nn.Sequential:
        model.time_embed.__class__ = _PerSampleSequential
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PerSampleLinear
        elif type(module) is nn.Conv3d:
            module.__class__ = FastConv3d
        elif type(module) is nn.Conv2d:
            module.__class__ = FastConv2d
        elif type(module) is nn.GroupNorm:
            module.__class__ = GroupNorm3d
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            # channels_last weights, like the activations; otherwise oneDNN re-lays them out on every call.
            # The Parameter object stays the same (only its storage layout changes).
            weight_format = channels_last_format(module.weight.ndim)
            if not module.weight.is_contiguous(memory_format=weight_format):
                module.weight.data = module.weight.data.contiguous(memory_format=weight_format)
    if not getattr(model, "_pdm_accelerated", False):
        model.register_forward_pre_hook(_input_to_channels_last, with_kwargs=True)
        model.register_forward_hook(_output_to_contiguous)
        model._pdm_accelerated = True
    return model


def _replace_children(parent, resnet_type, attention_type, transformer_type, upsample_type):
    for name, child in list(parent.named_children()):
        new = None
        if isinstance(child, resnet_type):
            new = _shared(_MonaiCallResnet, child, spatial_dims=child.conv1.conv.weight.ndim - 2,
                          in_channels=child.norm1.num_channels, temb_channels=child.time_emb_proj.in_features,
                          out_channels=child.conv1.conv.out_channels, up=bool(child.up), down=bool(child.down),
                          norm_num_groups=child.norm1.num_groups, norm_eps=child.norm1.eps)
        elif isinstance(child, attention_type):
            from .models.attention_block import SpatialAttentionBlock

            attn = child.attn
            new = _shared(SpatialAttentionBlock, child, spatial_dims=child.spatial_dims,
                          num_channels=child.norm.num_channels, num_head_channels=attn.dim_head,
                          norm_num_groups=child.norm.num_groups, norm_eps=child.norm.eps,
                          attention_dtype=attn.attention_dtype, include_fc=attn.include_fc,
                          use_combined_linear=attn.use_combined_linear)
        elif isinstance(child, transformer_type):
            from .models.transformer import SpatialTransformer

            new = _shared(SpatialTransformer, child, **SpatialTransformer.config_of(child))
        elif isinstance(child, upsample_type) and _is_nearest_2x_then_conv(child):
            new = _MonaiCallUpsample(child.postconv)
        if new is not None:
            new.train(child.training)
            setattr(parent, name, new)
            continue
        if isinstance(child, nn.Sequential):
            _fuse_groupnorm_silu(child)
        _replace_children(child, resnet_type, attention_type, transformer_type, upsample_type)


def _shared(cls, old: nn.Module, **config) -> nn.Module:
    """cls(**config) holding old's parameter tensors themselves (built on the meta device, then assigned)."""
    with torch.device("meta"):
        new = cls(**config)
    new.load_state_dict(old.state_dict(keep_vars=True), strict=True, assign=True)
    return new


def _is_nearest_2x_then_conv(upsampler) -> bool:
    names = [name for name, _ in upsampler.named_children()]
    resize = getattr(upsampler, "upsample_non_trainable", None)
    if names != ["upsample_non_trainable", "postconv"] or not isinstance(resize, nn.Upsample):
        return False
    scale = resize.scale_factor
    scales = scale if isinstance(scale, tuple) else (scale,)
    conv = getattr(upsampler.postconv, "conv", None)
    return (resize.mode == "nearest" and resize.size is None and all(float(s) == 2.0 for s in scales)
            and isinstance(conv, (nn.Conv2d, nn.Conv3d)) and len(list(upsampler.postconv.children())) == 1
            and conv.kernel_size == (3,) * (conv.weight.ndim - 2) and set(conv.padding) == {1}
            and set(conv.stride) == {1} and set(conv.dilation) == {1} and conv.groups == 1)


def _fuse_groupnorm_silu(seq: nn.Sequential):
    children = list(seq._modules.items())
    for (name, module), (next_name, following) in zip(children, children[1:]):
        if type(module) in (nn.GroupNorm, GroupNorm3d) and type(following) is nn.SiLU:
            module.__class__ = GroupNormSiLU
            seq._modules[next_name] = nn.Identity()


def _input_to_channels_last(module, args, kwargs):
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim in (4, 5):
        x = args[0]
        return (x.contiguous(memory_format=channels_last_format(x.ndim)), *args[1:]), kwargs
    if isinstance(kwargs.get("x"), torch.Tensor) and kwargs["x"].ndim in (4, 5):
        x = kwargs["x"]
        return args, {**kwargs, "x": x.contiguous(memory_format=channels_last_format(x.ndim))}
    return None


def _output_to_contiguous(module, args, output):
    return output.contiguous() if isinstance(output, torch.Tensor) else output


__all__ = ["accelerate"]
