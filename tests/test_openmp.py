"""pydiffmed sets libgomp's spin count before torch loads it (pydiffmed/_openmp.py), unless the user chose a wait
policy or torch came first. Checked in fresh interpreters: this one imported torch long ago."""
import os
import subprocess
import sys

import pytest

from pydiffmed import _openmp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**clean, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


SHOW = "import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def test_importing_pydiffmed_first_sets_the_spin_count():
    assert _python(f"import pydiffmed; {SHOW}; print(pydiffmed.OPENMP_WAIT_POLICY_SET)") == "1000 None\nTrue"


def test_the_command_runs_with_it_and_says_so():
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-m", "pydiffmed", "info"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=clean)
    assert out.returncode == 0, out.stderr
    assert "openmp wait: GOMP_SPINCOUNT=1000 (set by pydiffmed before torch loaded)" in out.stdout


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "active"}])
def test_a_users_own_setting_wins(env):
    shown = _python(f"import pydiffmed; {SHOW}; print(pydiffmed.OPENMP_WAIT_POLICY_SET)", **env).splitlines()
    assert shown == [f"{env.get('GOMP_SPINCOUNT')} {env.get('OMP_WAIT_POLICY')}", "False"]


def test_torch_imported_first_is_left_alone():
    assert _python(f"import torch, pydiffmed; {SHOW}; print(pydiffmed.OPENMP_WAIT_POLICY_SET)") == "None None\nFalse"


def test_set_wait_policy_decides_from_the_environment_and_the_loaded_modules():
    env = {}
    assert _openmp.set_wait_policy(env, {}) and env == {"GOMP_SPINCOUNT": _openmp.SPIN_COUNT}
    env = {"OMP_WAIT_POLICY": "passive"}
    assert not _openmp.set_wait_policy(env, {}) and env == {"OMP_WAIT_POLICY": "passive"}
    env = {}
    assert not _openmp.set_wait_policy(env, {"torch": object()}) and env == {}
