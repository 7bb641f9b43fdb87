"""`--dtype auto`: bfloat16 on CPUs that compute bf16 natively (AMX, AVX512-BF16), float32 on other CPUs, float16 on
CUDA; the sidecar says which and why. conftest.py pins PYDIFFMED_CPU_BF16=0 for the rest of the suite; these tests
clear it and decide the CPU's answer themselves, so both branches run on every machine."""
import json

import numpy as np
import pytest
import torch

import pydiffmed
from pydiffmed import backends
from pydiffmed.cli import main


@pytest.fixture
def cpu(monkeypatch):
    """set(flag): from now on this CPU's bf16 flag is `flag` (None: it has none); the env override is cleared."""
    monkeypatch.delenv(backends.CPU_BF16_ENV, raising=False)

    def set_flag(flag):
        monkeypatch.setattr(backends, "cpu_bf16_feature", lambda: flag)
    return set_flag


@pytest.mark.parametrize("flags, found", [
    ("fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
    ("fpu sse2 avx512f avx512_bf16", "avx512_bf16"),
    ("fpu sse2 avx2 avx512f", None),
])
def test_the_bf16_flag_is_read_from_cpuinfo(tmp_path, flags, found):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: {flags}\n")
    assert backends.bf16_flag_in(info) == found


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert backends.bf16_flag_in(tmp_path / "missing") is None


def test_auto_is_bf16_on_a_cpu_with_native_bf16_else_fp32(cpu):
    cpu("amx_bf16")
    dtype, why = backends.auto_dtype("cpu")
    assert dtype == torch.bfloat16 and "amx_bf16" in why
    cpu(None)
    dtype, why = backends.auto_dtype("cpu")
    assert dtype == torch.float32 and "no native bf16" in why
    assert backends.auto_dtype("cuda")[0] == torch.float16


def test_the_environment_overrides_the_cpu(cpu, monkeypatch):
    cpu("avx512_bf16")
    monkeypatch.setenv(backends.CPU_BF16_ENV, "0")
    assert backends.auto_dtype("cpu") == (torch.float32, "auto: float32, PYDIFFMED_CPU_BF16=0")
    cpu(None)
    monkeypatch.setenv(backends.CPU_BF16_ENV, "1")
    assert backends.auto_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setenv(backends.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="PYDIFFMED_CPU_BF16='yes': expected 0 or 1"):
        backends.auto_dtype("cpu")


def test_sampler_takes_auto(cpu):
    model = lambda x, t: 0.1 * x  # noqa: E731
    cpu("amx_bf16")
    assert pydiffmed.Sampler(model, "ddim", (1, 1, 4, 4, 4), num_steps=2, dtype="auto").dtype == torch.bfloat16
    cpu(None)
    assert pydiffmed.Sampler(model, "ddim", (1, 1, 4, 4, 4), num_steps=2, dtype="auto").dtype == torch.float32


def _sample_demo(tmp_path, capsys, name, *extra):
    out = tmp_path / name
    code = main(["sample", "--model", "demo", "-n", "1", "--batch", "1", "--steps", "4", "--solver", "ddim",
                 "--out", str(out), "--quiet", *extra])
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads((out / "sample_0000.json").read_text())
    import nibabel as nib
    return sidecar, nib.load(str(out / "sample_0000.nii.gz")).get_fdata(dtype=np.float32)


def test_the_command_runs_the_demo_model_in_the_dtype_auto_picks_and_says_why(tmp_path, capsys, cpu):
    cpu("amx_bf16")
    side16, bf16 = _sample_demo(tmp_path, capsys, "auto_bf16")
    assert side16["dtype"] == "bfloat16" and "amx_bf16" in side16["dtype_choice"]
    cpu(None)
    side32, fp32 = _sample_demo(tmp_path, capsys, "auto_fp32")
    assert side32["dtype"] == "float32" and "no native bf16" in side32["dtype_choice"]
    side, explicit = _sample_demo(tmp_path, capsys, "explicit", "--dtype", "float32")
    assert side["dtype"] == "float32" and side["dtype_choice"] == "--dtype float32"
    np.testing.assert_array_equal(explicit, fp32)
    # bf16 weights and activations with a float32 solver state: the same seed gives a volume that differs from the
    # float32 one in its bits, by little against the volume's range (measured: ~1 % of the range on 4 DDIM steps)
    spread = float(fp32.max() - fp32.min())
    assert spread > 0
    assert float(np.abs(bf16 - fp32).mean()) < 0.02 * spread


def test_a_bad_override_is_one_usage_error(tmp_path, capsys, cpu, monkeypatch):
    monkeypatch.setenv(backends.CPU_BF16_ENV, "2")
    code = main(["sample", "--model", "demo", "-n", "1", "--steps", "2", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "PYDIFFMED_CPU_BF16='2'" in err and len(err.strip().splitlines()) == 1
