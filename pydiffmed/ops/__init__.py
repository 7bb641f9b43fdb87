"""Public kernel API. Each op dispatches to the torch, cpu, triton or cuda backend (pydiffmed.backends)."""
from .attention import attention
from .group_norm import group_norm, group_norm_apply, group_norm_stats
from .fused_step import (COEF_NAMES, apply_dynamic_threshold, dynamic_threshold, fused_step, per_sample_norm,
                         philox_normal, step_coefs)

__all__ = ["attention", "group_norm", "group_norm_apply", "group_norm_stats"]
__all__ += ["COEF_NAMES", "apply_dynamic_threshold", "dynamic_threshold", "fused_step", "per_sample_norm",
            "philox_normal", "step_coefs"]
