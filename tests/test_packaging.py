"""How pydiffmed presents itself as a package: the top-level API names, `python -m pydiffmed` as the command, and
the Triton kernels installed inside the package (pydiffmed.triton_kernels), never as a top-level
`triton_kernels`, the name PyPI's triton-kernels and Triton's own repository use."""
import os
import re
import subprocess
import sys
import textwrap

import pydiffmed
from pydiffmed import schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_noise_schedule_at_the_top_level():
    from pydiffmed import NoiseSchedule

    assert NoiseSchedule is schedules.NoiseSchedule
    assert "NoiseSchedule" in pydiffmed.__all__
    assert all(hasattr(pydiffmed, name) for name in pydiffmed.__all__)


def _python_m(tmp_path, *argv):
    # Run from an empty directory so that nothing but the installed package can be imported.
    return subprocess.run([sys.executable, "-m", "pydiffmed", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)


def test_python_m_runs_the_command(tmp_path):
    result = _python_m(tmp_path, "info")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pydiffmed {pydiffmed.__version__}") and "backends:" in result.stdout
    result = _python_m(tmp_path, "--help")
    assert result.returncode == 0 and "sample" in result.stdout and "convert" in result.stdout


def test_python_m_exit_status_of_a_usage_error(tmp_path):
    result = _python_m(tmp_path, "sample", "--model", "demo")  # --out missing
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "Traceback" not in result.stderr
    result = _python_m(tmp_path, "sample", "--model", "demo", "--out", str(tmp_path / "s"), "--solver", "nope")
    assert result.returncode == 2 and "unknown solver" in result.stderr
    assert not (tmp_path / "s").exists()
    result = _python_m(tmp_path)  # no command
    assert result.returncode == 2


# A module that stands in for PyPI's triton-kernels (or any other top-level `triton_kernels`): importing it fails.
FAKE_TRITON_KERNELS = 'raise ImportError("this is not pydiffmed\'s triton_kernels")\n'

KERNELS_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import pydiffmed
    from pydiffmed import ops
    import pydiffmed.triton_kernels.attention
    import pydiffmed.triton_kernels.fused_step
    import pydiffmed.triton_kernels.group_norm

    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: the Triton interpreter
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, 3, device=device)
    weight, bias = torch.randn(4, device=device), torch.randn(4, device=device)
    y = ops.group_norm(x, 2, weight, bias, act="silu", backend="triton")
    ref = ops.group_norm(x, 2, weight, bias, act="silu", backend="torch")
    assert (y - ref).abs().max().item() < 1e-5
    q = torch.randn(1, 2, 7, 16, device=device)
    out = ops.attention(q, q, q, backend="triton")
    assert (out - torch.nn.functional.scaled_dot_product_attention(q, q, q)).abs().max().item() < 1e-5
    kernels = [name for name in sys.modules if name.split(".")[0] == "triton_kernels"]
    assert not kernels, kernels
    print("ok", pydiffmed.triton_kernels.__name__)
""")


def test_no_top_level_triton_kernels_needed(tmp_path):
    """With another `triton_kernels` first on sys.path (the working directory) whose import fails, pydiffmed's
    Triton kernels still import and run: they live in pydiffmed.triton_kernels."""
    fake = tmp_path / "triton_kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text(FAKE_TRITON_KERNELS)
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # conftest sets it without a GPU; the kernels need it on the CPU
    result = subprocess.run([sys.executable, "-c", KERNELS_SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["ok", "pydiffmed.triton_kernels"]
    # The stand-in really is what `import triton_kernels` finds there.
    probe = subprocess.run([sys.executable, "-c", "import triton_kernels"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert probe.returncode != 0 and "not pydiffmed's triton_kernels" in probe.stderr


def test_no_source_imports_a_top_level_triton_kernels():
    """Every import of the kernels in the package, tests and benchmarks names pydiffmed.triton_kernels."""
    pattern = re.compile(r"""(^|["'\s;])(from|import)\s+triton_kernels\b""")  # also in scripts held in strings
    offenders = []
    for folder in ("pydiffmed", "tests", "benchmarks", "triton_kernels"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                path = os.path.join(root, name)
                if not name.endswith(".py") or os.path.samefile(path, __file__):  # this file names it on purpose
                    continue
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if pattern.search(line):
                            offenders.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_installed_metadata_names_one_top_level_package():
    """pip's record of the installation: `pydiffmed` is the only top-level package (editable or wheel)."""
    from importlib import metadata

    top_level = metadata.distribution("pydiffmed").read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["pydiffmed"]


def test_setup_lists_every_package():
    """setup.py names its packages one by one, so a new subpackage left off the list would be missing from a
    wheel (an editable install would still find it and hide the mistake)."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        listed = set(re.findall(r'"(pydiffmed(?:\.\w+)*)"', re.search(r"packages=\[(.*?)\]", f.read(), re.S).group(1)))
    found = {"pydiffmed.triton_kernels"}
    for root, dirs, files in os.walk(os.path.join(REPO, "pydiffmed")):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        if "__init__.py" in files:
            found.add(os.path.relpath(root, REPO).replace(os.sep, "."))
    assert found == listed, (sorted(found - listed), sorted(listed - found))
