"""Public kernel API. Each op dispatches to the torch, cpu, triton or cuda backend (pydiffmed.backends)."""
from .group_norm import group_norm

__all__ = ["group_norm"]
