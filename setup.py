"""Builds pydiffmed._C (pybind11, no torch at build time) and ships the CUDA sources as package data."""
import glob
import os
import shutil

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithKernelSources(build_py):
    """Copies csrc/common and csrc/cuda into pydiffmed/_csrc: the cuda backend compiles them at run time."""

    def run(self):
        super().run()
        for sub in ("common", "cuda"):
            dst = os.path.join(self.build_lib, "pydiffmed", "_csrc", sub)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(os.path.join(HERE, "csrc", sub), dst)


# DICOM output (pydiffmed.dicom) uses pydicom 3's API; pydicom 3 needs Python >= 3.10 (older: NIfTI output only).
_PYDICOM = "pydicom>=3; python_version>='3.10'"

cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
ext = Pybind11Extension(
    "pydiffmed._C",
    cpu_sources,
    include_dirs=["csrc"],
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"],
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

setup(
    name="pydiffmed",
    version="0.1.0",
    description="Fast sampler engine for diffusion models on 3-D medical volumes",
    # The Triton kernels live in the top-level folder triton_kernels/ but install as pydiffmed.triton_kernels: a
    # top-level `triton_kernels` package would collide with PyPI's triton-kernels (and Triton's own repository).
    packages=["pydiffmed", "pydiffmed.demo", "pydiffmed.ops", "pydiffmed.models", "pydiffmed.solvers",
              "pydiffmed.inverse", "pydiffmed.integrations", "pydiffmed.triton_kernels"],
    package_dir={"pydiffmed.triton_kernels": "triton_kernels"},
    package_data={"pydiffmed": ["models_data/README.md", "models_data/*/*", "models_data/*.safetensors"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext, "build_py": BuildPyWithKernelSources},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "triton>=3.0; platform_system=='Linux' and platform_machine=='x86_64'",
    ],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "bench": ["openvino", "onnxruntime", "onnx", "onnxscript"],
        "io": ["nibabel>=5", "safetensors", "pillow", "pyyaml", _PYDICOM],
        "test": ["pytest", "hypothesis", "scipy", "diffusers>=0.30", "monai>=1.4", "einops", "nibabel>=5",
                 "safetensors", "pillow", "pyyaml", "matplotlib", _PYDICOM, "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["pydiffmed=pydiffmed.cli:main"]},
)
