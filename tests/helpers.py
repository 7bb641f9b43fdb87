"""Shared test utilities: the ARCHITECTURE §6 tolerance rule, the NaN canary, random weights for models and the CPU
emulation of the CUDA kernels."""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
from torch import nn

from pydiffmed import backends


def gloo_threads() -> int:
    """How many of this process's threads are gloo's (none once its process group is destroyed)."""
    return sum(open(f"/proc/self/task/{t}/comm").read().startswith("pt_gloo") for t in os.listdir("/proc/self/task"))


def max_abs_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(out, ref_fp32, torch_at_dtype, floor=1e-5, what=""):
    """Low-precision rule: the kernel's error against the fp32 reference is at most twice the error of the same
    math done in plain torch at that dtype (plus a small absolute floor for fp32, where torch's error is ~0)."""
    err = max_abs_err(out, ref_fp32)
    allowed = 2.0 * max_abs_err(torch_at_dtype, ref_fp32) + floor
    assert math.isfinite(err) and err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g}"


def canary_like(t: torch.Tensor, extra: int = 64, shape=None, memory_format=torch.contiguous_format):
    """An output tensor (shape of t, or `shape`) living at the front of a NaN-filled buffer; `canary_intact`
    then checks that nothing was written past it."""
    shape = tuple(t.shape) if shape is None else tuple(shape)
    numel = math.prod(shape)
    buf = torch.full((numel + extra,), float("nan"), dtype=t.dtype, device=t.device)
    if memory_format is torch.contiguous_format:
        out = buf[:numel].view(shape)
    else:
        perm = (0, *range(2, len(shape)), 1)  # channels-last: memory order N, spatial..., C
        phys = tuple(shape[i] for i in perm)
        inv = [perm.index(i) for i in range(len(shape))]
        out = buf[:numel].view(phys).permute(*inv)
    return out, buf


def canary_intact(out: torch.Tensor, buf: torch.Tensor) -> bool:
    return bool(torch.isnan(buf[out.numel():]).all()) and not bool(torch.isnan(out).any())


def run_backend(op: str, backend: str, *args):
    return backends.implementation(op, backend).run(*args)


def runnable_backends(op: str, tensors, **inputs):
    """The backends that can run `op` on this machine (triton counts when forced under the interpreter)."""
    names = []
    for name in backends.BACKENDS:
        if not backends.not_supported_reasons(op, name, tensors, forced=True, **inputs):
            names.append(name)
    return names


def randomize_(model, seed=0):
    """Random weights everywhere (MONAI zero-initialises conv2, proj_out, the output conv and the ControlNet's
    1×1 convolutions, which would hide those paths): norms ≈ 1, other weights ~ 1/sqrt(fan_in), biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = {m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if module in norms:
                    p.copy_(1.0 + 0.1 * noise if name == "weight" else 0.1 * noise)
                elif p.ndim >= 2:
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.1 * noise)
    return model


def randomised(model, seed=0, scale=0.1):
    """Non-trivial weights N(0, scale²) everywhere (the output convolution starts at zero), small enough to keep
    samples bounded; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


# --- step-for-step comparisons with the peers' schedulers (test_convert, test_integrations_monai) ---------------

def smooth_model(x, t):
    """A fixed smooth nonlinear stand-in for a network, depending on x and the time input (as test_solvers')."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 1e-3 * t) * 0.9


def step_noise(i, shape):
    """The explicit noise of step i; a peer draws the same from torch.Generator().manual_seed(1000 + i)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i))


def rel_err(ref, ours) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ref.double() - ours.double()).abs().max() / ref.double().abs().max())


# --- the CUDA kernels on the CPU (test_cuda_sources: group_norm.cu, test_fused_step: fused_step.cu) -------------
# A csrc/cuda/*.cu file compiled with g++ against an emulation of the CUDA features the kernels use: blocks run
# one after another, each with one std::thread per CUDA thread, so __shared__ (a static) is shared by the block
# and barriers and warp shuffles are real. A file that uses neither runs its threads one after another in the
# calling thread (the same results, without a thread per CUDA thread). The launchers in pydiffmed/_cuda.py drive
# the library through `launch_emulated` exactly as they drive the GPU.

CAN_EMULATE_CUDA = shutil.which("g++") is not None and sys.platform == "linux"
CUDA_EMULATION_REASON = "the CPU emulation of the CUDA kernels needs g++ on Linux"
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

CUDA_EMULATION = r"""
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx;
static thread_local int emu_thread_rank;
static dim3 blockIdx, blockDim, gridDim;
static int emu_stalled = 0;  // a barrier timed out: the threads of a block did not all reach it

struct EmuBarrier {
    std::mutex m;
    std::condition_variable cv;
    int expected = 0, arrived = 0;
    long generation = 0;
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        const long gen = generation;
        if (++arrived == expected) {
            arrived = 0;
            ++generation;
            cv.notify_all();
        } else if (!cv.wait_for(lock, std::chrono::seconds(20), [&] { return generation != gen; })) {
            emu_stalled = 1;
        }
    }
};

struct EmuWarp {
    EmuBarrier barrier;
    unsigned long long lanes[32];
};
static EmuBarrier* emu_block_barrier;
static std::vector<std::unique_ptr<EmuWarp>> emu_warps;

inline void __syncthreads() { emu_block_barrier->wait(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int offset) {
    EmuWarp& w = *emu_warps[emu_thread_rank / 32];
    const int lane = emu_thread_rank % 32;
    std::memcpy(&w.lanes[lane], &v, sizeof(T));
    w.barrier.wait();
    T r;
    std::memcpy(&r, &w.lanes[lane ^ offset], sizeof(T));
    w.barrier.wait();
    return r;
}

static void emu_run_grid(const unsigned* dims, const std::function<void()>& body) {
    gridDim = {dims[0], dims[1], dims[2]};
    blockDim = {dims[3], dims[4], dims[5]};
    const int threads = (int)(blockDim.x * blockDim.y * blockDim.z);
    EmuBarrier block_barrier;
    block_barrier.expected = threads;
    emu_block_barrier = &block_barrier;
    emu_warps.clear();
    for (int t = 0; t < threads; t += 32) {
        emu_warps.emplace_back(new EmuWarp());
        emu_warps.back()->barrier.expected = threads - t < 32 ? threads - t : 32;
    }
    auto run_thread = [&](int t) {
        threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
        emu_thread_rank = t;
        body();
    };
    for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
            for (unsigned bx = 0; bx < gridDim.x; ++bx) {
                blockIdx = {bx, by, bz};
#ifdef EMU_SEQUENTIAL_THREADS
                for (int t = 0; t < threads; ++t) run_thread(t);
#else
                std::vector<std::thread> pool;
                for (int t = 0; t < threads; ++t) pool.emplace_back(run_thread, t);
                for (auto& th : pool) th.join();
#endif
            }
}

extern "C" int emu_stalled_flag() { return emu_stalled; }
"""

_KERNEL_DEF = re.compile(r'extern "C"\s+void\s+(\w+)\s*\(([^()]*)\)\s*\{')
_CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_longlong, np.int32: ctypes.c_int,
           np.uint32: ctypes.c_uint, np.float32: ctypes.c_float}


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def build_cuda_emulation(cu_file: str, work_dir) -> ctypes.CDLL:
    """csrc/cuda/<cu_file> compiled for the CPU emulation, as a ctypes library with one cuLaunchKernel-style entry
    point emu_<kernel>(dims[6], void** args) per extern "C" kernel (see launch_emulated)."""
    with open(os.path.join(CSRC, "cuda", cu_file)) as f:
        threads_interact = re.search(r"__syncthreads|__shfl", f.read()) is not None
    source = os.path.join(str(work_dir), cu_file.replace(".cu", "_emu.cpp"))
    flags = ["-std=c++17", f"-I{os.path.join(CSRC, 'common')}", f"-I{CSRC}", "-pthread"]
    if not threads_interact:
        flags.append("-DEMU_SEQUENTIAL_THREADS")
    with open(source, "w") as f:
        f.write(CUDA_EMULATION + f'\n#include "cuda/{cu_file}"\n')
    # Wrappers for exactly the kernels the .cu defines (some are made by macros): preprocess it, read them off.
    returncode, preprocessed = _run(["g++", *flags, "-E", "-P", "-x", "c++", "-include", source, "/dev/null"])
    assert returncode == 0, preprocessed
    wrappers = []
    for name, params in _KERNEL_DEF.findall(preprocessed[preprocessed.rindex("emu_stalled_flag"):]):
        types = [re.sub(r"\w+\s*$", "", p.strip()).strip() for p in params.split(",")]
        call = ", ".join(f"*({t}*)args[{i}]" for i, t in enumerate(types))
        wrappers.append(f'extern "C" void emu_{name}(const unsigned* dims, void** args) '
                        f'{{ emu_run_grid(dims, [&] {{ {name}({call}); }}); }}')
    assert wrappers, f"no extern \"C\" kernels found in {cu_file}"
    with open(source, "a") as f:
        f.write("\n".join(wrappers) + "\n")
    library = os.path.join(str(work_dir), cu_file.replace(".cu", "_emu.so"))
    returncode, output = _run(["g++", *flags, "-O1", "-shared", "-fPIC", source, "-o", library])
    assert returncode == 0, f"g++ failed on the emulated csrc/cuda/{cu_file}:\n{output}"
    return ctypes.CDLL(library)


def launch_emulated(library, name, grid, block, args) -> None:
    """Run kernel `name` of a build_cuda_emulation library on grid × block with the launcher's argument tuple
    (numpy scalars, pointers as np.uint64), after checking the launch against CUDA's limits."""
    grid, block = tuple(grid), tuple(block)
    assert len(grid) == len(block) == 3 and all(g >= 1 for g in grid) and all(b >= 1 for b in block)
    assert math.prod(block) <= 1024 and grid[0] < 2 ** 31 and grid[1] <= 65535 and grid[2] <= 65535
    values = [_CTYPES[type(a)](a) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    getattr(library, f"emu_{name}")((ctypes.c_uint * 6)(*grid, *block), pointers)
    assert library.emu_stalled_flag() == 0, f"{name}: threads diverged at a barrier"
