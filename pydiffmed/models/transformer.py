"""The conditioned attention level of MONAI's `DiffusionModelUNet`: `SpatialTransformer` (GroupNorm → 1×1 proj_in
→ transformer blocks [LayerNorm → self-attention, LayerNorm → cross-attention on the context, LayerNorm →
GEGLU MLP, each with a residual] → 1×1 proj_out + residual), on pydiffmed ops. Same constructor arguments,
attribute names and state-dict keys as MONAI's, so its checkpoints load unchanged.

Data movement: the GroupNorm writes token-major B×N×C directly (no permute/reshape copy); proj_in is a matmul
on those tokens; q|k|v come out of one fused projection and go to `ops.attention` as strided B×N×heads×d views
(no head-split copies, no N×N score matrix); proj_out writes straight into the channels_last output, whose
memory is the B×N×C token matrix, with the residual as the GEMM's accumulator (BLAS β = 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import GroupNorm3d
from .layers import Conv, PerSampleLinear, add_linear_, channels_last_format, derived, linear, norm_affine


def _heads_view(t, heads):
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads)


def _attend(q, k, v, heads, scale, upcast):
    """q: B×N×inner, k/v: B×S×inner (any strides with unit channel stride) → B×N×inner."""
    b, n, inner = q.shape
    out_dtype = q.dtype
    qh, kh, vh = (_heads_view(t, heads) for t in (q, k, v))
    if upcast and out_dtype != torch.float32:
        qh, kh, vh = (t.float() for t in (qh, kh, vh))
    out = ops.attention(qh, kh, vh, scale=scale, layout="bnhd")
    return out.reshape(b, n, inner).to(out_dtype)


class TransformerSelfAttention(nn.Module):
    """MONAI `SABlock` as the transformer block builds it: no qkv bias; `to_q/to_k/to_v` or one `qkv`;
    `out_proj` only with include_fc."""

    def __init__(self, channels: int, num_heads: int, dim_head: int, include_fc: bool = True,
                 use_combined_linear: bool = False, upcast: bool = False):
        super().__init__()
        inner = num_heads * dim_head
        self.num_heads, self.dim_head, self.scale = num_heads, dim_head, dim_head ** -0.5
        self.include_fc, self.use_combined_linear, self.upcast = include_fc, use_combined_linear, upcast
        self.out_proj = nn.Linear(inner, channels) if include_fc else nn.Identity()  # first, as in MONAI's order
        if use_combined_linear:
            self.qkv = nn.Linear(channels, 3 * inner, bias=False)
            self.to_q = self.to_k = self.to_v = nn.Identity()
        else:
            self.to_q = nn.Linear(channels, inner, bias=False)
            self.to_k = nn.Linear(channels, inner, bias=False)
            self.to_v = nn.Linear(channels, inner, bias=False)
            self.qkv = nn.Identity()

    def fused_weight(self):
        if self.use_combined_linear:
            return self.qkv.weight
        sources = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        return derived(self, "_pdm_qkv", sources, lambda: torch.cat(sources))

    def forward(self, h):
        qkv = linear(h, self.fused_weight())
        q, k, v = qkv.chunk(3, dim=-1)
        return _attend(q, k, v, self.num_heads, self.scale, self.upcast)


class TransformerCrossAttention(nn.Module):
    """MONAI `CrossAttentionBlock` as the transformer block builds it: q from the tokens, k and v from the
    context (or from the tokens when no context is given), no qkv bias, `out_proj` always."""

    def __init__(self, channels: int, num_heads: int, dim_head: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner = num_heads * dim_head
        context_dim = context_dim or inner
        self.num_heads, self.dim_head, self.scale, self.upcast = num_heads, dim_head, dim_head ** -0.5, upcast
        self.out_proj = nn.Linear(inner, channels)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)

    def forward(self, h, context=None):
        source = h if context is None else context.to(h.dtype)
        sources = (self.to_k.weight, self.to_v.weight)
        kv = linear(source, derived(self, "_pdm_kv", sources, lambda: torch.cat(sources)))
        k, v = kv.chunk(2, dim=-1)
        return _attend(linear(h, self.to_q.weight), k, v, self.num_heads, self.scale, self.upcast)


class FeedForwardGEGLU(nn.Module):
    """MONAI `MLPBlock(act="GEGLU")`: linear1 (C → 2·4C), x·GELU(gate), linear2 (4C → C)."""

    def __init__(self, channels: int, mlp_dim: int):
        super().__init__()
        self.linear1 = PerSampleLinear(channels, 2 * mlp_dim)
        self.linear2 = PerSampleLinear(mlp_dim, channels)

    def forward(self, h):
        value, gate = self.linear1(h).chunk(2, dim=-1)
        return self.linear2(F.gelu(gate) * value)


class TransformerBlock(nn.Module):
    """MONAI `DiffusionUNetTransformerBlock`: pre-norm self-attention, cross-attention and GEGLU MLP."""

    def __init__(self, channels: int, num_heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 upcast_attention: bool = False, include_fc: bool = True, use_combined_linear: bool = False):
        super().__init__()
        self.attn1 = TransformerSelfAttention(channels, num_heads, dim_head, include_fc, use_combined_linear,
                                              upcast_attention)
        self.ff = FeedForwardGEGLU(channels, 4 * channels)
        self.attn2 = TransformerCrossAttention(channels, num_heads, dim_head, cross_attention_dim, upcast_attention)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.norm3 = nn.LayerNorm(channels)

    def forward(self, x, context=None):
        x = _add_projected(x, self.attn1(self.norm1(x)), self.attn1.out_proj)
        x = _add_projected(x, self.attn2(self.norm2(x), context), self.attn2.out_proj)
        return x + self.ff(self.norm3(x))


def _add_projected(x, h, proj):
    """x + proj(h), where proj is an nn.Linear or nn.Identity."""
    if isinstance(proj, nn.Identity):
        return x + h
    return linear(h, proj.weight, proj.bias).view_as(x).add_(x)


class SpatialTransformer(nn.Module):
    """MONAI's `SpatialTransformer` (the attention of conditioned UNet levels), same arguments and keys."""

    def __init__(self, spatial_dims: int, in_channels: int, num_attention_heads: int, num_head_channels: int,
                 num_layers: int = 1, dropout: float = 0.0, norm_num_groups: int = 32, norm_eps: float = 1e-6,
                 cross_attention_dim: int | None = None, upcast_attention: bool = False, include_fc: bool = True,
                 use_combined_linear: bool = False, use_flash_attention: bool = False):
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        inner = num_attention_heads * num_head_channels
        self.norm = GroupNorm3d(num_groups=norm_num_groups, num_channels=in_channels, eps=norm_eps, affine=True)
        self.proj_in = Conv(spatial_dims, in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, num_attention_heads, num_head_channels, cross_attention_dim, upcast_attention,
                             include_fc, use_combined_linear) for _ in range(num_layers))
        self.proj_out = Conv(spatial_dims, inner, in_channels, kernel_size=1)
        for p in self.proj_out.parameters():  # MONAI zero-initialises proj_out
            nn.init.zeros_(p)

    @classmethod
    def config_of(cls, block: nn.Module) -> dict:
        """Constructor arguments that rebuild a MONAI (or pydiffmed) SpatialTransformer."""
        first = block.transformer_blocks[0]
        attn1, attn2 = first.attn1, first.attn2
        heads = attn1.num_heads
        upcast = getattr(attn1, "upcast", None)
        if upcast is None:
            upcast = getattr(attn1, "attention_dtype", None) is not None
        return dict(spatial_dims=block.spatial_dims, in_channels=block.norm.num_channels,
                    num_attention_heads=heads, num_head_channels=attn1.dim_head,
                    num_layers=len(block.transformer_blocks), norm_num_groups=block.norm.num_groups,
                    norm_eps=block.norm.eps, cross_attention_dim=attn2.to_k.in_features,
                    upcast_attention=bool(upcast), include_fc=bool(attn1.include_fc),
                    use_combined_linear=bool(attn1.use_combined_linear))

    def forward(self, x, context=None):
        b, c = x.shape[:2]
        norm = self.norm
        tokens = ops.group_norm(x, norm.num_groups, *norm_affine(norm), norm.eps, token_major=True)
        w_in = self.proj_in.conv.weight
        tokens = linear(tokens, w_in.reshape(w_in.shape[0], -1), self.proj_in.conv.bias)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        n, inner = tokens.shape[1], tokens.shape[2]
        w_out = self.proj_out.conv.weight.reshape(c, inner)
        if torch.is_grad_enabled() and (x.requires_grad or tokens.requires_grad):
            projected = F.linear(tokens, w_out, self.proj_out.conv.bias)
            return x + projected.movedim(-1, 1).reshape(x.shape)
        x_tokens = x.movedim(1, -1).reshape(b * n, c)  # a view when x is channels_last
        y = torch.empty_like(x, memory_format=channels_last_format(x.ndim))
        y_tokens = y.movedim(1, -1).view(b * n, c)  # y's memory, token-major
        torch.add(x_tokens, self.proj_out.conv.bias, out=y_tokens)
        add_linear_(y_tokens, tokens.reshape(b * n, inner), w_out, b)
        return y


__all__ = ["SpatialTransformer", "TransformerBlock"]
