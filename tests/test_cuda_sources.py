"""The CUDA sources without a GPU.

1. Every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (the include paths NVRTC gets at run time), so
   a syntax or type error fails CI; csrc/common's headers compile for host and device and convert correctly.
   The Triton group_norm kernels compile to sm_80/sm_90 cubin too (the interpreter alone checks less).
2. The group_norm kernels run on the CPU: the .cu is compiled with g++ against the emulation of the CUDA
   features it uses (tests/helpers.py, shared with test_fused_step: one std::thread per CUDA thread, real
   barriers and warp shuffles), and the launcher in pydiffmed/_cuda.py drives it exactly as it drives the GPU,
   so indexing, reductions and the launcher's grid arithmetic are checked against the fp64 oracle.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import (CAN_EMULATE_CUDA, CUDA_EMULATION_REASON, build_cuda_emulation, canary_intact, canary_like,
                     launch_emulated)
from pydiffmed import _cuda
from pydiffmed.ops._checks import channels_last_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CUDA_SOURCES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
COMMON_HEADERS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CSRC, "common", "*.h")))
ARCHS = ("sm_80", "sm_90")
INCLUDES = (f"-I{os.path.join(CSRC, 'common')}", f"-I{CSRC}")


def _find_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, not /usr/local/cuda/bin)")
needs_gxx = pytest.mark.skipif(not CAN_EMULATE_CUDA, reason=CUDA_EMULATION_REASON)


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


# --- 1. nvcc -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compiles every (source, arch) pair once, in parallel: {(basename, arch): (returncode, output)}."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for source in CUDA_SOURCES:
            name = os.path.basename(source)
            for arch in ARCHS:
                obj = out_dir / f"{name}.{arch}.o"
                cmd = [NVCC, "-std=c++17", f"-arch={arch}", "--use_fast_math", *INCLUDES, "-c", source,
                       "-o", str(obj)]
                jobs[(name, arch)] = pool.submit(_run, cmd)
        return {key: job.result() for key, job in jobs.items()}


def test_cuda_sources_exist():
    assert any(os.path.basename(p) == "group_norm.cu" for p in CUDA_SOURCES), CUDA_SOURCES


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [os.path.basename(p) for p in CUDA_SOURCES])
def test_cuda_source_compiles(nvcc_results, source, arch):
    returncode, output = nvcc_results[(source, arch)]
    assert returncode == 0, f"nvcc -arch={arch} failed on csrc/cuda/{source}:\n{output}"


COMMON_CHECK = r"""
// Every csrc/common header, used from host and device code in one translation unit.
%(includes)s
#include <cstdio>

__global__ void device_use(const unsigned short* h, const unsigned short* bf, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float a = pdm::Convert<pdm::kFloat16>::load(h[i]) + pdm::Convert<pdm::kBFloat16>::load(bf[i]);
        out[i] = pdm::silu(a) + pdm::fast_exp(-a) + pdm::Convert<pdm::kFloat32>::store(a) +
                 pdm::f16_to_f32(pdm::f32_to_f16(a)) + pdm::bf16_to_f32(pdm::f32_to_bf16(a));
    }
}

static int failures = 0;
static void check(bool ok, const char* what) {
    if (!ok) { std::printf("FAILED: %%s\n", what); ++failures; }
}

int main() {
    check(pdm::f32_to_f16(1.0f) == 0x3c00, "f16(1)");
    check(pdm::f32_to_f16(-2.5f) == 0xc100, "f16(-2.5)");
    check(pdm::f32_to_f16(65520.0f) == 0x7c00, "f16 overflow rounds to inf");
    check(pdm::f32_to_f16(5.960464477539063e-08f) == 0x0001, "f16 smallest subnormal");
    check(pdm::f16_to_f32(0x3555) == 0.333251953125f, "f16 -> f32");
    check(pdm::f32_to_bf16(1.0f) == 0x3f80, "bf16(1)");
    check(pdm::f32_to_bf16(1.00390625f) == 0x3f80, "bf16 ties to even (down)");
    check(pdm::f32_to_bf16(1.01171875f) == 0x3f82, "bf16 ties to even (up)");
    check(pdm::bf16_to_f32(0xc040) == -3.0f, "bf16 -> f32");
    float worst = 0.0f;
    for (float x = -20.0f; x <= 20.0f; x += 0.01f) {
        double e = std::exp((double)x);
        double rel = std::fabs(pdm::fast_exp(x) - e) / e;
        if (rel > worst) worst = (float)rel;
    }
    check(worst < 1e-6f, "fast_exp relative error < 1e-6 on [-20, 20]");
    check(std::fabs(pdm::silu(2.0f) - 2.0 / (1.0 + std::exp(-2.0))) < 1e-6, "silu(2)");
    std::printf("fast_exp worst relative error %%g\n", worst);
    return failures;
}
"""


@needs_nvcc
def test_common_headers_compile_for_host_and_device(tmp_path):
    includes = "\n".join(f'#include "{h}"' for h in COMMON_HEADERS)
    source = tmp_path / "common_check.cu"
    source.write_text(COMMON_CHECK % {"includes": includes})
    exe = tmp_path / "common_check"
    returncode, output = _run([NVCC, "-std=c++17", "-arch=sm_80", *INCLUDES, str(source), "-o", str(exe)])
    assert returncode == 0, f"nvcc failed on the csrc/common headers:\n{output}"
    # The host half runs without a GPU (no CUDA API call is made).
    returncode, output = _run([str(exe)], timeout=60)
    assert returncode == 0, output


TRITON_GPU_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pydiffmed.triton_kernels import group_norm as gn


def compile_for(target, fn, types, constexprs):
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
    assert compiled.asm["cubin"], fn.__name__


for cc in (80, 90):
    target = GPUTarget("cuda", cc, 32)
    for dt in ("fp32", "fp16", "bf16"):
        # stride 1 arrives as a constant (Triton specialises integer arguments equal to 1)
        for unit_stride, blocks in (("stride_s", (1024, 4)), ("stride_c", (64, 64))):
            compile_for(target, gn._stats_kernel, {"x_ptr": f"*{dt}", "part_ptr": "*fp32"},
                        {unit_stride: 1, "BLOCK_S": blocks[0], "BLOCK_C": blocks[1]})
        for x_unit, y_unit, blocks in (("sx_s", "sy_s", (1024, 4)), ("sx_c", "sy_c", (64, 64)),
                                       ("sx_s", "sy_c", (64, 32))):
            compile_for(target, gn._apply_kernel, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "params_ptr": "*fp32"},
                        {x_unit: 1, y_unit: 1, "SILU": dt != "fp16", "ROUND_BF16": dt == "bf16",
                         "BLOCK_S": blocks[0], "BLOCK_C": blocks[1]})
    for present in (False, True):
        types = {name: "*fp32" for name in ("part_ptr", "w_ptr", "b_ptr", "bnc_ptr", "params_ptr")}
        types["eps"] = "fp32"
        compile_for(target, gn._finalize_kernel, types, {"HAS_W": present, "HAS_B": present, "HAS_BNC": present,
                                                         "BLOCK_K": 8, "BLOCK_CG": 16})
print("ok")
"""


def _triton_nvidia_backend():
    try:
        import triton.backends.nvidia  # noqa: F401
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _triton_nvidia_backend(), reason="triton with its NVIDIA backend is not installed")
def test_triton_group_norm_compiles_for_gpus(tmp_path):
    """Triton compiles the kernels to cubin for sm_80 and sm_90 without a GPU (its bundled ptxas), in a process
    without TRITON_INTERPRET, so code the interpreter accepts but the compiler rejects fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", TRITON_GPU_COMPILE], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


# --- 2. CPU emulation of csrc/cuda/group_norm.cu -------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated_group_norm(tmp_path_factory):
    """The group_norm kernels compiled for the CPU emulation (helpers.build_cuda_emulation)."""
    library = build_cuda_emulation("group_norm.cu", tmp_path_factory.mktemp("cuda_emu"))
    assert hasattr(library, "emu_gn_finalize")
    return library


@pytest.fixture
def emulated_launch(emulated_group_norm, monkeypatch):
    """pydiffmed._cuda with `launch` running the emulated kernels on CPU tensors; records the launches."""
    launches = []

    def launch(filename, name, grid, block, args, shared_mem=0):
        assert filename == "group_norm.cu"
        launches.append((name, tuple(grid), tuple(block)))
        launch_emulated(emulated_group_norm, name, grid, block, args)

    monkeypatch.setattr(_cuda, "launch", launch)
    monkeypatch.setattr(_cuda, "_sm_count", lambda device: 2)
    monkeypatch.setattr(_cuda, "_on_device", lambda device: contextlib.nullcontext())
    return launches


def _oracle(x, groups, w, b, bias_nc, eps, silu):
    xd = x.double()
    if bias_nc is not None:
        xd = xd + bias_nc.double().reshape(*bias_nc.shape, *([1] * (x.ndim - 2)))
    y = F.group_norm(xd, groups, None if w is None else w.double(), None if b is None else b.double(), eps)
    return F.silu(y) if silu else y


def _channels_last(t):
    return t.to(memory_format=channels_last_format(t.ndim))


# (shape, groups, dtype, x channels-last, output: "same" layout or "token"-major, chunks, affine+bias_nc+silu)
EMULATED_CASES = [
    ((2, 6, 3, 5, 4), 3, torch.float32, False, "same", None, True),
    ((2, 6, 3, 5, 4), 3, torch.float32, True, "same", None, True),
    ((1, 8, 4, 6, 6), 2, torch.float32, False, "same", 3, False),   # S % 4 == 0: 4-wide loads, 3 chunks
    ((1, 8, 4, 6, 6), 2, torch.float32, True, "same", 3, True),     # C % 4 == 0: 4-wide loads, 3 chunks
    ((2, 8, 5, 7), 4, torch.float16, True, "same", 2, True),        # 4-D
    ((1, 24, 2, 3, 5), 3, torch.bfloat16, False, "token", 2, True),  # NCS in, token-major out: transpose
    ((1, 40, 3, 3, 4), 5, torch.bfloat16, True, "token", None, False),
    ((3, 5, 2, 3, 3), 5, torch.float16, False, "same", 4, True),    # odd C, ragged chunks
    ((2, 40, 3, 3, 4), 5, torch.float32, False, "token", None, True),  # transpose over 2 x 2 tiles
    ((1, 258, 2, 2, 3), 3, torch.float32, True, "same", 2, True),   # more channels than threads per block
    ((1, 2, 10, 12, 11), 1, torch.float32, False, "same", None, False),  # several loop trips per thread
    ((1, 4, 10, 12, 11), 2, torch.bfloat16, True, "same", None, True),
]


@needs_gxx
@pytest.mark.parametrize("shape, groups, dtype, x_cl, out, chunks, extras", EMULATED_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", ""))
def test_group_norm_cuda_kernels_emulated(emulated_launch, shape, groups, dtype, x_cl, out, chunks, extras):
    n, c = shape[:2]
    x = torch.randn(shape) * 1.5 + 0.25
    w = b = bias_nc = None
    if extras:
        w, b, bias_nc = torch.randn(c), torch.randn(c), torch.randn(n, c)
    if x_cl:
        x = _channels_last(x)
    x = x.to(dtype)
    s = math.prod(shape[2:])
    token = out == "token"
    if token:
        y, buf = canary_like(x, shape=(n, s, c))
    else:
        y, buf = canary_like(x, memory_format=channels_last_format(x.ndim) if x_cl else torch.contiguous_format)
    _cuda.group_norm_launch(x, y, groups, w, b, bias_nc, 1e-5, extras, x_channels_last=x_cl,
                            y_channels_last=x_cl or token, num_chunks=chunks)
    ref = _oracle(x, groups, w, b, bias_nc, 1e-5, extras)
    at_dtype = ref.to(dtype).double()  # the output's own rounding
    if token:
        ref, at_dtype = (t.flatten(2).transpose(1, 2) for t in (ref, at_dtype))
    err = (y.double() - ref).abs().max().item()
    allowed = 2 * (at_dtype - ref).abs().max().item() + 2e-5
    assert err <= allowed, f"max error {err:.3g} > {allowed:.3g}"
    assert canary_intact(y, buf), "wrote past the output, or left part of it unwritten"
    names = [name for name, _, _ in emulated_launch]
    assert names[1] == "gn_finalize" and len(names) == 3, names


@needs_gxx
@pytest.mark.parametrize("x_cl", [False, True])
def test_group_norm_cuda_kernels_emulated_large_offset(emulated_launch, x_cl):
    x = torch.randn(2, 8, 4, 6, 8) + 1000.0
    if x_cl:
        x = _channels_last(x)
    y = torch.empty_like(x)
    _cuda.group_norm_launch(x, y, 4, None, None, None, 1e-5, False, x_channels_last=x_cl, y_channels_last=x_cl,
                            num_chunks=3)
    err = (y.double() - _oracle(x, 4, None, None, None, 1e-5, False)).abs().max().item()
    assert err < 2e-6, err


@needs_gxx
def test_group_norm_cuda_launcher_rejects_bad_layouts(emulated_launch):
    x = torch.randn(1, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="y must be a dense channels-last"):
        _cuda.group_norm_launch(x, torch.empty_like(x), 2, None, None, None, 1e-5, False, x_channels_last=False,
                                y_channels_last=True)
    with pytest.raises(ValueError, match="x must be a dense contiguous"):
        _cuda.group_norm_launch(x.transpose(2, 3), torch.empty_like(x), 2, None, None, None, 1e-5, False,
                                x_channels_last=False, y_channels_last=False)
    with pytest.raises(ValueError, match="w must be a contiguous fp32"):
        _cuda.group_norm_launch(x, torch.empty_like(x), 2, torch.ones(4, dtype=torch.float16), None, None, 1e-5,
                                False, x_channels_last=False, y_channels_last=False)
    assert emulated_launch == []
