"""Spatial self-attention block on pydiffmed ops: MONAI's `SpatialAttentionBlock` (as used by
`DiffusionModelUNet`), same constructor, same state-dict keys, same output.

Data movement, counted in passes over a B×N×C activation (N = D·H·W tokens; one pass = reading or writing
B·N·C values; traced op by op with a TorchDispatchMode on MONAI 1.6.1, CPU, B = 2):

    MONAI's block                                   passes   this block                                passes
    GroupNorm (x → h, NCDHW)                             2   ops.group_norm, token-major (x → h B×N×C)      2
    to_q, to_k, to_v on the transposed h: each a        18   one fused QKV addmm (h → q|k|v, bias in the    4
      clone of h (2), mm (2) and a bias add (2)                epilogue; 3C×C weight cached)
    q·kᵀ bmm, ·scale, softmax, ·v bmm                     4   ops.attention on strided views of q|k|v         4
      (read q, k, v; write o) + an N×N score                   (read q, k, v; write o) and NO score matrix
      matrix written 3×, read 3× (B·heads·N² values)
    head rearrange (clone of o)                          2   — (o is already B×N×C)                          0
    out_proj addmm (bias in the epilogue)                2   y = x + b_out (strided read of x, writes the    2
                                                               channels_last output y)
    transpose back + residual add                        3   y += o·W_outᵀ (BLAS β = 1: read o, y; write y)  3
    total                                               31   total                                          15

At B = 1 MONAI's projections skip the clones (25 passes). Beyond the halved activation traffic, the score
matrix is what the flash kernel removes: at N = 32768 tokens with 8 heads it is 8.6·10⁹ values per call,
~6 passes over it, against ~3·10⁶ values per activation pass at C = 96. The fused QKV weight is cached
on first use and rebuilt when any source parameter is replaced, modified in place (version counter), moved
or cast.

The output is channels_last(_3d) (values equal to MONAI's contiguous output); convolutions accept it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import GroupNorm3d
from ..ops._checks import tensor_state
from .layers import add_linear_, channels_last_format, linear, norm_affine


class SpatialSelfAttention(nn.Module):
    """The `attn` submodule: parameter names of MONAI's `SABlock` (to_q/to_k/to_v or qkv, out_proj), qkv bias
    always on as in `SpatialAttentionBlock`."""

    def __init__(self, num_channels: int, num_heads: int, include_fc: bool = True,
                 use_combined_linear: bool = False, attention_dtype: torch.dtype | None = None):
        super().__init__()
        if num_channels % num_heads:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dim_head = num_channels // num_heads
        self.scale = self.dim_head ** -0.5
        self.include_fc = include_fc
        self.use_combined_linear = use_combined_linear
        self.attention_dtype = attention_dtype
        # registration order = MONAI's, so state_dict() lists the keys in the same order
        self.out_proj = nn.Linear(num_channels, num_channels) if include_fc else nn.Identity()
        if use_combined_linear:
            self.qkv = nn.Linear(num_channels, 3 * num_channels, bias=True)
            self.to_q = self.to_k = self.to_v = nn.Identity()
        else:
            self.to_q = nn.Linear(num_channels, num_channels, bias=True)
            self.to_k = nn.Linear(num_channels, num_channels, bias=True)
            self.to_v = nn.Linear(num_channels, num_channels, bias=True)
            self.qkv = nn.Identity()
        self._fused_key = None
        self._fused = None

    def _sources(self):
        if self.use_combined_linear:
            return [self.qkv.weight, self.qkv.bias]
        return [self.to_q.weight, self.to_k.weight, self.to_v.weight, self.to_q.bias, self.to_k.bias,
                self.to_v.bias]

    def fused_qkv(self, dtype: torch.dtype, device: torch.device):
        """(3C×C weight, 3C bias) in `dtype` on `device`: rows ordered q | k | v, heads-major inside each."""
        sources = self._sources()
        if torch.is_grad_enabled() and any(p.requires_grad for p in sources):
            return self._build_fused(sources, dtype, device)  # differentiable, never cached
        key = (dtype, device, *(tensor_state(p) for p in sources))
        if key != self._fused_key:
            self._fused = self._build_fused(sources, dtype, device)
            self._fused_key = key
        return self._fused

    def _build_fused(self, sources, dtype, device):
        if self.use_combined_linear:
            weight, bias = sources
        else:
            weight, bias = torch.cat(sources[:3]), torch.cat(sources[3:])
        return weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """h: B×N×C token-major, normalised. Returns B×N×C attention output (before out_proj)."""
        b, n, c = h.shape
        weight, bias = self.fused_qkv(h.dtype, h.device)
        qkv = linear(h, weight, bias).view(b, n, 3, self.num_heads, self.dim_head)
        q, k, v = qkv.unbind(2)  # B×N×heads×d strided views, no copies
        if self.attention_dtype is not None and self.attention_dtype != h.dtype:
            q, k, v = (t.to(self.attention_dtype) for t in (q, k, v))
        out = ops.attention(q, k, v, scale=self.scale, layout="bnhd")
        return out.view(b, n, c).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """MONAI `SABlock` call form: B×N×C in, B×N×C out (out_proj applied)."""
        out = self.attend(h)
        if self.include_fc:
            out = linear(out, self.out_proj.weight.to(out.dtype), self.out_proj.bias.to(out.dtype))
        return out


class SpatialAttentionBlock(nn.Module):
    """GroupNorm → self-attention over all voxels → residual, for B×C×(spatial) input with spatial_dims ∈
    {1, 2, 3}. Constructor and state-dict keys (`norm.*`, `attn.to_q/to_k/to_v.*` or `attn.qkv.*`,
    `attn.out_proj.*`) are MONAI's `SpatialAttentionBlock`'s; `use_flash_attention` is accepted for
    compatibility (attention is always the flash kernel here); `attention_dtype` casts q, k, v.

    The fused path runs when autograd is off for it (torch.no_grad / inference_mode, or nothing requires
    grad); otherwise an unfused differentiable path computes the same values."""

    def __init__(self, spatial_dims: int, num_channels: int, num_head_channels: int | None = None,
                 norm_num_groups: int = 32, norm_eps: float = 1e-6, attention_dtype: torch.dtype | None = None,
                 include_fc: bool = True, use_combined_linear: bool = False, use_flash_attention: bool = False):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if num_head_channels is not None and num_channels % num_head_channels:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_head_channels="
                             f"{num_head_channels}")
        self.spatial_dims = spatial_dims
        self.use_flash_attention = use_flash_attention
        self.norm = GroupNorm3d(num_groups=norm_num_groups, num_channels=num_channels, eps=norm_eps, affine=True)
        num_heads = num_channels // num_head_channels if num_head_channels is not None else 1
        self.attn = SpatialSelfAttention(num_channels, num_heads, include_fc=include_fc,
                                         use_combined_linear=use_combined_linear, attention_dtype=attention_dtype)

    @classmethod
    def from_monai(cls, block: nn.Module) -> "SpatialAttentionBlock":
        """A copy of a MONAI `SpatialAttentionBlock` (same weights, device and dtype)."""
        attn = block.attn
        new = cls(block.spatial_dims, block.norm.num_channels, attn.dim_head, block.norm.num_groups,
                  block.norm.eps, attn.attention_dtype, attn.include_fc, attn.use_combined_linear,
                  attn.use_flash_attention)
        reference = next(block.parameters())
        new.to(device=reference.device, dtype=reference.dtype)
        new.load_state_dict(block.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"x must be {self.spatial_dims + 2}-D (B, C, spatial...) for spatial_dims="
                             f"{self.spatial_dims}; got shape {tuple(x.shape)}")
        if self.spatial_dims == 1:  # the norm kernels take 4-D/5-D input
            return self.forward_volume(x.unsqueeze(-1)).squeeze(-1)
        return self.forward_volume(x)

    def forward_volume(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return self._forward_differentiable(x)
        b, c = x.shape[:2]
        n = math.prod(x.shape[2:])
        norm, attn = self.norm, self.attn
        h = ops.group_norm(x, norm.num_groups, *norm_affine(norm), norm.eps, token_major=True)
        out = attn.attend(h).view(b * n, c)
        y = torch.empty_like(x, memory_format=channels_last_format(x.ndim))
        y_tokens = y.movedim(1, -1).view(b, n, c)  # y's own memory, token-major
        x_tokens = x.movedim(1, -1).reshape(b, n, c)  # a view for contiguous or channels_last x
        if attn.include_fc:
            torch.add(x_tokens, attn.out_proj.bias.to(y.dtype), out=y_tokens)
            add_linear_(y_tokens.view(b * n, c), out, attn.out_proj.weight.to(y.dtype), b)
        else:
            torch.add(x_tokens, out.view(b, n, c), out=y_tokens)
        return y

    def _forward_differentiable(self, x):
        """The same math from autograd-aware pieces (out= and the norm kernel have no backward)."""
        norm = self.norm
        h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps).flatten(2).transpose(1, 2)
        tokens = self.attn(h)
        return x + tokens.transpose(1, 2).reshape(x.shape)


__all__ = ["SpatialAttentionBlock", "SpatialSelfAttention"]
