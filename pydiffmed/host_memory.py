"""Host memory policy for sampling on the CPU.

Every network evaluation allocates and frees the same multi-MiB activations. glibc serves a block of 128 KiB
or more (its default, adapted up to 32 MiB) as fresh pages mapped from the OS and unmaps it on free, so each
evaluation page-faults on every page it writes first: ~1.3 million faults for `make demo` on the development
machine, which sampled ~15 % faster with freed memory kept for reuse (README, "Command line"). This changes the
whole process, so the library never does it on its own: the `pydiffmed sample` and `bench` commands do (unless
the user set glibc's malloc options themselves), and an application that embeds the sampler may call
`keep_freed_memory()`.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def user_set_malloc_options() -> bool:
    """Whether the environment already tunes glibc's malloc (GLIBC_TUNABLES=glibc.malloc.*, MALLOC_*_)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ)


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (mallopt). Returns False where this is not glibc (nothing
    changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (mmap threshold 1 GiB, no trimming
    below 2 GiB of free heap): later allocations of the same sizes reuse pages that are already mapped. The
    process's resident memory then stays at its peak. Returns False where this is not glibc (nothing changed)."""
    return set_malloc_thresholds(1 << 30, (1 << 31) - 1)
