"""nn.Module wrappers of the fused ops, drop-in for torch.nn layers (same state-dict keys)."""
from __future__ import annotations

from torch import nn

from . import ops
from .models.layers import norm_affine


class GroupNorm3d(nn.GroupNorm):
    """nn.GroupNorm on the fused kernel; `forward(x, bias_nc=None)` adds a per-(sample, channel) bias first."""

    act = None

    def forward(self, x, bias_nc=None, token_major=False):
        return ops.group_norm(x, self.num_groups, *norm_affine(self), self.eps, act=self.act,
                              bias_nc=bias_nc, token_major=token_major)


class GroupNormSiLU(GroupNorm3d):
    """nn.GroupNorm followed by nn.SiLU, as one kernel. State-dict keys are nn.GroupNorm's."""

    act = "silu"


__all__ = ["GroupNorm3d", "GroupNormSiLU"]
