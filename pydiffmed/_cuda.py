"""The cuda backend's plumbing: compile csrc/cuda/*.cu with CuPy's RawModule (NVRTC) on first use, cache the
modules, and launch kernels on torch's current stream.

Kernel launchers for each op live next to their kernel (`<op>_launch` functions below import from here). Kernel
arguments are passed as numpy scalars so their C types are explicit: pointers as np.uint64 (use `ptr(t)`).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .ops._checks import check_group_norm_launch

_PKG = os.path.dirname(os.path.abspath(__file__))


def source_dir() -> str:
    """csrc/ in a source checkout (editable install), else the copy shipped as package data."""
    for candidate in (os.path.join(os.path.dirname(_PKG), "csrc"), os.path.join(_PKG, "_csrc")):
        if os.path.isfile(os.path.join(candidate, "common", "pdm_common.h")):
            return candidate
    raise FileNotFoundError("pydiffmed CUDA sources not found (expected csrc/ or pydiffmed/_csrc/)")


@functools.lru_cache(maxsize=None)
def module(filename: str):
    """The compiled cupy.RawModule of csrc/cuda/<filename>; NVRTC compiles it once per process (CuPy also
    caches the binary on disk, keyed by source and options)."""
    import cupy

    root = source_dir()
    with open(os.path.join(root, "cuda", filename)) as f:
        code = f.read()
    options = ("-std=c++17", f"-I{os.path.join(root, 'common')}", f"-I{root}", "--use_fast_math")
    return cupy.RawModule(code=code, options=options, name_expressions=None)


def kernel(filename: str, name: str):
    return module(filename).get_function(name)


def ptr(t) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def launch(filename: str, name: str, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on torch's current stream (so the kernel is ordered with torch work and graph-capturable)."""
    import cupy

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with cupy.cuda.Device(torch.cuda.current_device()):
        kernel(filename, name)(tuple(grid), tuple(block), tuple(args), stream=stream, shared_mem=shared_mem)


# ===== group_norm: launcher of csrc/cuda/group_norm.cu ======================================================
# Three launches on torch's current stream, no host synchronisation (graph-capturable): per-(sample, chunk,
# channel) partial statistics, a per-(sample, group) finalize into per-(sample, channel) parameters, the apply
# pass. Scratch buffers come from torch's allocator on x's device. The constants mirror the .cu file's.

_GN_FILE = "group_norm.cu"
_GN_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_GN_THREADS = 256  # kMaxThreads
_GN_UNROLL = 4  # kUnroll
_GN_FINALIZE_THREADS = 128
_GN_MAX_CHUNKS = 1024
_GRID_YZ_LIMIT = 65535


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _on_device(device):
    return torch.cuda.device(device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _gn_vec(channels_last, c, s, *tensors) -> int:
    """4 (one 4-element access) when the contiguous dimension is a multiple of 4 and every pointer is aligned."""
    inner = c if channels_last else s
    aligned = all(t.data_ptr() % (4 * t.element_size()) == 0 for t in tensors)
    return 4 if inner % 4 == 0 and aligned else 1


def _gn_cl_block(c, vec):
    """(TX, TY) of the channels-last kernels: TX threads across channel groups of `vec`, TY across rows."""
    tx = min(c // vec, _GN_THREADS)
    return tx, max(1, _GN_THREADS // tx)


def group_norm_launch(x, y, num_groups, w, b, bias_nc, eps, silu, *, x_channels_last, y_channels_last,
                      num_chunks=None):
    """Write act(GroupNorm(x + bias_nc) · w + b) into y with the CUDA kernels of csrc/cuda/group_norm.cu.

    x: N×C×spatial (fp32/fp16/bf16), dense contiguous or channels-last; y: the same shape and dtype in either
    order, or the token-major N×S×C tensor (y_channels_last=True). w, b: fp32 C-vectors or None; bias_nc:
    fp32 contiguous N×C or None. num_chunks forces the number of spatial chunks of the split reduction.
    """
    if x.dtype not in _GN_SUFFIX:
        raise TypeError(f"x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    n, c, s = check_group_norm_launch(x, y, num_groups, w, b, bias_nc, x_channels_last, y_channels_last)
    if x.numel() == 0:
        return
    if n > _GRID_YZ_LIMIT or _cdiv(c, 32) > _GRID_YZ_LIMIT:
        raise ValueError(f"x has {n} samples and {c} channels; the CUDA kernels take at most {_GRID_YZ_LIMIT} "
                         f"samples and {32 * _GRID_YZ_LIMIT} channels")
    sfx = _GN_SUFFIX[x.dtype]
    with _on_device(x.device):
        sms = _sm_count(x.device)
        vec = _gn_vec(x_channels_last, c, s, x)
        if x_channels_last:  # blocks of (sample, chunk); about 8 blocks of 256 threads per SM fill it
            tx, ty = _gn_cl_block(c, vec)
            wanted, useful = _cdiv(8 * sms, n), s // (2 * ty * _GN_UNROLL)
        else:  # warps of (sample, channel, chunk); about 48 warps per SM
            wanted, useful = _cdiv(48 * sms, n * c), s // (32 * vec * _GN_UNROLL)
        if num_chunks is None:
            num_chunks = min(wanted, useful, _GN_MAX_CHUNKS)
        num_chunks = max(1, min(int(num_chunks), s))
        chunk_s = _cdiv(_cdiv(s, num_chunks), vec) * vec
        num_chunks = _cdiv(s, chunk_s)

        part_stride = n * num_chunks * c
        part = torch.empty((3, part_stride), dtype=torch.float32, device=x.device)
        common = (ptr(x), ptr(part), np.int64(part_stride), np.int32(c), np.int64(s), np.int64(chunk_s),
                  np.int32(num_chunks))
        if x_channels_last:
            launch(_GN_FILE, f"gn_stats_cl_{sfx}_v{vec}", (num_chunks, n, 1), (tx, ty, 1), common)
        else:
            segments = n * c * num_chunks
            launch(_GN_FILE, f"gn_stats_ncs_{sfx}_v{vec}", (_cdiv(segments, _GN_THREADS // 32), 1, 1),
                   (_GN_THREADS, 1, 1), common + (np.int64(segments),))

        nc = n * c
        params = torch.empty((4, nc), dtype=torch.float32, device=x.device)
        launch(_GN_FILE, "gn_finalize", (n * num_groups, 1, 1), (_GN_FINALIZE_THREADS, 1, 1),
               (ptr(part), np.int64(part_stride), ptr(w), ptr(b), ptr(bias_nc), ptr(params), np.int64(nc),
                np.int32(c), np.int32(num_groups), np.int64(s), np.int64(chunk_s), np.int32(num_chunks),
                np.float32(eps)))

        act = np.int32(1 if silu else 0)
        if x_channels_last != y_channels_last:
            launch(_GN_FILE, f"gn_apply_transpose_{sfx}", (_cdiv(s, 32), _cdiv(c, 32), n), (32, 8, 1),
                   (ptr(x), ptr(y), ptr(params), np.int64(nc), np.int32(c), np.int64(s),
                    np.int32(x_channels_last), np.int32(y_channels_last), act))
        elif x_channels_last:
            vec = _gn_vec(True, c, s, x, y)
            tx, ty = _gn_cl_block(c, vec)
            row_tiles = _cdiv(s, ty * _GN_UNROLL)
            launch(_GN_FILE, f"gn_apply_cl_{sfx}_v{vec}", (n * row_tiles, 1, 1), (tx, ty, 1),
                   (ptr(x), ptr(y), ptr(params), np.int64(nc), np.int32(c), np.int64(s), np.int32(row_tiles),
                    act))
        else:
            vec = _gn_vec(False, c, s, x, y)
            threads = min(_GN_THREADS, max(32, _cdiv(_cdiv(s, vec * _GN_UNROLL), 32) * 32))
            tiles = _cdiv(s, threads * vec * _GN_UNROLL)
            launch(_GN_FILE, f"gn_apply_ncs_{sfx}_v{vec}", (nc * tiles, 1, 1), (threads, 1, 1),
                   (ptr(x), ptr(y), ptr(params), np.int64(nc), np.int64(s), np.int32(tiles), act))


# ===== fused_step: launcher of csrc/cuda/fused_step.cu (issue 3) ============================================
# One launch on torch's current stream, grid (Philox blocks of a sample / threads, samples). The module is
# compiled without --use_fast_math and with --fmad=false: IEEE division/sqrt and no multiply-add contraction,
# so the CUDA results (noise included) equal the CPU kernel's and the torch reference's bit for bit.

_FS_FILE = "fused_step.cu"
_FS_THREADS = 256


@functools.lru_cache(maxsize=None)
def _fused_step_module():
    import cupy

    root = source_dir()
    with open(os.path.join(root, "cuda", _FS_FILE)) as f:
        code = f.read()
    options = ("-std=c++17", f"-I{os.path.join(root, 'common')}", f"-I{root}", "--fmad=false")
    return cupy.RawModule(code=code, options=options)


def fused_step_kernel_launch(name, grid, block, args) -> None:
    """Launch kernel `name` of fused_step.cu on torch's current stream (the tests replace this with a CPU
    emulation)."""
    import cupy

    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    with cupy.cuda.Device(torch.cuda.current_device()):
        _fused_step_module().get_function(name)(tuple(grid), tuple(block), tuple(args), stream=stream)


def _fs_launch_on(device, name, grid, block, args) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            fused_step_kernel_launch(name, grid, block, args)
    else:  # CPU tensors reach here only from the test suite's emulation of the kernels
        fused_step_kernel_launch(name, grid, block, args)


def fused_step_launch(a) -> None:
    """Run fused_step on the arguments validated by pydiffmed.ops.fused_step (a StepArgs)."""
    from .backends import DTYPE_CODES

    if a.batch == 0 or a.numel == 0:
        return
    if a.batch > 65535:
        raise ValueError(f"the cuda backend handles at most 65535 samples per call, got {a.batch}")

    def code(t):
        return np.int32(DTYPE_CODES[t.dtype] if t is not None else 0)

    h1, h2, h3 = a.history
    args = (ptr(a.x), code(a.x), ptr(a.m), code(a.m), ptr(a.m_cond), code(a.m_cond), np.float32(a.guidance),
            ptr(h1), code(h1), ptr(h2), code(h2), ptr(h3), code(h3), ptr(a.noise), code(a.noise), ptr(a.seeds),
            ptr(a.out), code(a.out), ptr(a.model_input), code(a.model_input), ptr(a.x0_out), code(a.x0_out),
            ptr(a.coefs), np.int64(a.step_stride), np.int64(a.batch_stride), ptr(a.step_index),
            np.int64(a.num_steps), np.uint32(a.noise_step), ptr(a.noise_step_tensor),
            np.int64(a.numel), np.int64(a.channels), np.int64(max(a.spatial, 1)), np.int32(bool(a.channels_last)),
            np.int64(a.noise_offset), np.int64(a.noise_plane))
    philox_blocks = (a.numel + 3) // 4
    grid = ((philox_blocks + _FS_THREADS - 1) // _FS_THREADS, a.batch, 1)
    _fs_launch_on(a.x.device, "fused_step_kernel", grid, (_FS_THREADS, 1, 1), args)


def per_sample_sumsq_launch(flat, batch: int):
    """fp32 partial sums of squares (batch, T) of the `batch` contiguous sample blocks of `flat`, T threads per
    sample each summing >= 16 elements (at most 64K threads per sample)."""
    from .backends import DTYPE_CODES

    if batch > 65535:
        raise ValueError(f"the cuda backend handles at most 65535 samples per call, got {batch}")
    numel = flat.numel() // batch
    blocks = max(1, min(256, -(-numel // (16 * _FS_THREADS))))
    partial = torch.empty((batch, blocks * _FS_THREADS), dtype=torch.float32, device=flat.device)
    _fs_launch_on(flat.device, "per_sample_sumsq_kernel", (blocks, batch, 1), (_FS_THREADS, 1, 1),
                  (ptr(flat), np.int32(DTYPE_CODES[flat.dtype]), np.int64(numel), ptr(partial)))
    return partial
