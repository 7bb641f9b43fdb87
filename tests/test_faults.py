"""Faults around `pydiffmed sample`, automated and bounded in time: outputs damaged after the fact (--resume
checks and redoes them), SIGKILL at random points (fixed seed) then --resume (bitwise the uninterrupted run, no
temporary files), a full disk (a real small tmpfs where the test may mount one, and a simulated ENOSPC after N
bytes), an unwritable directory, two processes on one output directory (a lock), and a model that produces
NaN/Inf (nothing written for that batch, the evaluation named). Byte-identical files for identical volumes (the
NIfTI gzip stream carries no time stamp)."""
import builtins
import contextlib
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import nibabel as nib
import pytest
import torch
from helpers import randomised
from PIL import Image

from pydiffmed import io, modelfile
from pydiffmed.cli import main
from pydiffmed.models import UNet3D

SHAPE = (16, 16, 16)
NUM = 8
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=1, channels=(8, 8),
                 attention_levels=(False, False), norm_num_groups=4)
CONFIG = {"schedule": {"kind": "discrete", "num_train_timesteps": 1000, "beta_schedule": "linear"},
          "prediction_type": "epsilon", "volume_shape": list(SHAPE), "spacing": [1.0, 1.2, 2.0],
          "orientation": "LPS", "intensity": {"scale": 100.0, "offset": 20.0}, "description": "fault tests"}
SUFFIXES = (".nii.gz", ".png", ".json")
LOCK = ".pydiffmed.lock"
TIMEOUT = 120  # seconds for any one subprocess


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    modelfile.save_model(path, randomised(UNet3D(**TINY_UNET)), CONFIG)
    return path


def sample_args(model, out, *extra, num=NUM, steps=2):
    """Batch 1 throughout: what a resumed run batches together never matters, whatever the network does."""
    return ["sample", "--model", str(model), "--out", str(out), "--num", str(num), "--batch", "1", "--steps",
            str(steps), "--quiet", *map(str, extra)]


def run_in_process(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def command(*argv):
    return [sys.executable, "-m", "pydiffmed.cli", *argv]


# The command as a user runs it: without the Triton interpreter that tests/conftest.py switches on for this
# process (it only slows the start: the command picks the cpu backend either way).
ENV = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def start(*argv, **kwargs):
    return subprocess.Popen(command(*argv), env=ENV, **kwargs)


def run_subprocess(*argv):
    return subprocess.run(command(*argv), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def one_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def name(k, suffix):
    return f"sample_{k:04d}{suffix}"


def check_outputs(out, num=NUM, allow_leftovers=False):
    """Every file in `out` is whole: each NIfTI loads with the right shape, each PNG decodes, each sidecar parses
    and, when present, records the sha256 of its NIfTI and PNG as they are. Anything else in the directory is a
    failure, except (allow_leftovers: what a killed process leaves) temporaries and a stale lock file. Returns
    the indices of the complete volumes."""
    complete = set()
    ours = {name(k, s) for k in range(num) for s in SUFFIXES}
    for entry in os.listdir(out):
        if entry in ours:
            continue
        assert allow_leftovers and (entry.startswith(".pdm-tmp-") or entry == LOCK), f"stray file {entry}"
    for k in range(num):
        paths = {s: os.path.join(out, name(k, s)) for s in SUFFIXES}
        if os.path.exists(paths[".nii.gz"]):
            assert nib.load(paths[".nii.gz"]).get_fdata().shape == SHAPE
        if os.path.exists(paths[".png"]):
            Image.open(paths[".png"]).load()
        if os.path.exists(paths[".json"]):
            sidecar = json.loads(pathlib.Path(paths[".json"]).read_text())
            assert sidecar["seed"] == k and sidecar["files_sha256"] == {
                "nifti": modelfile.file_sha256(paths[".nii.gz"]), "preview": modelfile.file_sha256(paths[".png"])}
            complete.add(k)
    return complete


def volume_bytes(out, num=NUM):
    """The NIfTI and PNG files' bytes (the sidecars hold timings and so legitimately differ between runs)."""
    return {name(k, s): pathlib.Path(out, name(k, s)).read_bytes() for k in range(num) for s in SUFFIXES[:2]}


@pytest.fixture(scope="module")
def reference_subprocess(tiny, tmp_path_factory):
    """An uninterrupted run of the command in its own process, as the kill and lock tests run it."""
    out = tmp_path_factory.mktemp("reference") / "out"
    began = time.monotonic()
    result = run_subprocess(*sample_args(tiny, out))
    assert result.returncode == 0, result.stderr
    assert check_outputs(out) == set(range(NUM))
    return volume_bytes(out), time.monotonic() - began


@pytest.fixture(scope="module")
def reference_in_process(tiny, tmp_path_factory):
    """An uninterrupted run in this process (as the in-process tests run it); volume k's files do not depend
    on --num, so a test sampling fewer volumes compares with the first ones."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(sample_args(tiny, out)) == 0
    files = volume_bytes(out)
    files["sidecar_size"] = max(len(pathlib.Path(out, name(k, ".json")).read_bytes()) for k in range(NUM))
    return files


def first(expected, num):
    return {key: value for key, value in expected.items() if key.startswith("sample_") and int(key[7:11]) < num}


# --- deterministic files ------------------------------------------------------------------------------------

def test_identical_volumes_give_identical_files(tmp_path, monkeypatch):
    volume = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3))
    io.save_volume(tmp_path / "a.nii.gz", volume, spacing=(1.0, 1.2, 2.0))
    io.save_preview(tmp_path / "a.png", volume)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 12345.0)  # a gzip header would record this
    io.save_volume(tmp_path / "b.nii.gz", volume, spacing=(1.0, 1.2, 2.0))
    io.save_preview(tmp_path / "b.png", volume)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.nii.gz").read_bytes()[4:8] == b"\0\0\0\0"  # gzip MTIME field


# --- --resume and damaged outputs ---------------------------------------------------------------------------

def test_resume_redoes_damaged_outputs(tmp_path, tiny, capsys, reference_in_process):
    num = 7
    expected = first(reference_in_process, num)
    out = tmp_path / "s"
    code, _, err = run_in_process(capsys, *sample_args(tiny, out, num=num))
    assert code == 0, err
    path = lambda k, s: out / name(k, s)  # noqa: E731

    def truncate(p, keep):
        p.write_bytes(p.read_bytes()[:keep])

    truncate(path(0, ".nii.gz"), 5000)                        # no longer loads
    truncate(path(1, ".png"), 100)                            # no longer decodes
    path(2, ".json").write_text('{"seed": 2, "files_sha')     # sidecar cut short
    data = bytearray(path(3, ".nii.gz").read_bytes())         # one flipped bit deep in the gzip stream
    data[len(data) // 2] ^= 0x10
    path(3, ".nii.gz").write_bytes(bytes(data))
    for k in (4, 5):                                          # sidecars of an older pydiffmed: no hashes
        sidecar = json.loads(path(k, ".json").read_text())
        del sidecar["files_sha256"]
        path(k, ".json").write_text(json.dumps(sidecar))
    truncate(path(5, ".nii.gz"), 5000)                        # ... checked by loading the files instead
    path(6, ".png").unlink()                                  # a link to a valid preview in its place:
    path(6, ".png").symlink_to(path(4, ".png"))               # never trusted (nor followed), replaced
    kept = {p: (p.read_bytes(), p.stat().st_ino) for p in out.glob("sample_0004*")}

    code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, "--resume", num=num))
    assert code == 0, err
    assert "6 volume(s) written" in stdout and "1 complete volume(s) kept" in stdout
    assert "6 damaged volume(s) redone" in stdout
    warned = err.strip().splitlines()
    assert len(warned) == 6 and all("damaged" in line and "Traceback" not in line for line in warned), err
    for k in (0, 1, 2, 3, 5, 6):
        assert any(f"volume {k} is damaged" in line for line in warned), (k, err)
    assert {p: (p.read_bytes(), p.stat().st_ino) for p in kept} == kept  # untouched
    assert not path(6, ".png").is_symlink()
    assert volume_bytes(out, num) == expected
    for k in (0, 1, 2, 3, 5, 6):
        assert "files_sha256" in json.loads(path(k, ".json").read_text())
    code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, "--resume", num=num))
    assert code == 0 and err == "" and "7 complete volume(s) kept" in stdout


# --- SIGKILL at random points, then --resume ----------------------------------------------------------------

def _listing(out):
    try:
        return set(os.listdir(out))
    except FileNotFoundError:
        return set()


def _kill_when(process, out, ready):
    """Poll `out` until ready(new entries seen since the start) or the process ends; then SIGKILL it. Returns
    whether it was killed."""
    initial, seen = _listing(out), set()
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        seen |= _listing(out) - initial
        if ready(seen):
            break
        time.sleep(0.0005)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    return True


def test_sigkill_at_random_points_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, tiny,
                                                                                reference_subprocess):
    """Six kills (more rounds only where a run finished before its kill point), their points drawn from
    random.Random(0), of a run (--resume) into one directory, each run picking up what the killed one left.
    Rounds 0, 2, 4 kill as soon as the run has created a number (1-6) of new directory entries plus a further
    0-60 ms, so they land while it samples or between files; rounds 1, 3, 5 kill the moment the run has opened
    its n-th (1-6) new temporary file, that is in the middle of writing a file.
    After each kill every file present is whole; the final --resume completes the set, bitwise equal to an
    uninterrupted run, and leaves nothing else behind (no .pdm-tmp-* file, no lock file)."""
    expected, _ = reference_subprocess
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills, mid_write, leftovers = 0, 0, 0
    for round_ in range(12):  # 6 rounds, more only where timing let a round finish before its kill point
        if round_ >= 6 and kills >= 4 and mid_write >= 2 and leftovers >= 1:
            break
        if os.path.isdir(out) and check_outputs(out, allow_leftovers=True) == set(range(NUM)):
            os.rename(out, tmp_path / f"completed_{round_}")  # nothing left to kill in: start a fresh set
        count, delay, during_write = rng.randint(1, 6), rng.uniform(0.0, 0.06), round_ % 2 == 1
        process = start(*sample_args(tiny, out, "--resume"), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        try:
            if during_write:
                killed = _kill_when(process, out, lambda seen: sum(n.startswith(".pdm-tmp-") for n in seen) >= count)
            else:
                killed = _kill_when(process, out, lambda seen: len(seen) >= count and time.sleep(delay) is None)
            _, err = process.communicate(timeout=TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode in (0, -signal.SIGKILL), err.decode()
        kills += killed
        mid_write += killed and during_write
        check_outputs(out, allow_leftovers=True)  # all whole
        leftovers += any(n.startswith(".pdm-tmp-") for n in os.listdir(out))
    assert kills >= 4 and mid_write >= 2, f"{kills} kills, {mid_write} mid-write: the kill points tested little"
    assert leftovers >= 1, "no kill left a temporary file behind: the clean-up on --resume went untested"
    result = run_subprocess(*sample_args(tiny, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert check_outputs(out) == set(range(NUM))  # no .pdm-tmp-* files, no lock file
    assert volume_bytes(out) == expected


# --- full disk ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at `path` (skips the test where this process may not mount one)."""
    path.mkdir()
    if not hasattr(os, "getuid") or os.getuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, f"pdm-test-{uuid.uuid4().hex[:8]}", str(path)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _assert_failed_cleanly(code, err, out, expected, num):
    assert code == 1
    one_line(err, "cannot write", os.strerror(errno.ENOSPC), "--resume")
    complete = check_outputs(out, num)  # every file whole, no temporaries, no lock file
    assert complete and complete != set(range(num))
    assert complete == set(range(max(complete) + 1))
    for k in complete:  # the volumes finished before the disk filled are intact
        for suffix in SUFFIXES[:2]:
            assert (out / name(k, suffix)).read_bytes() == expected[name(k, suffix)]
    return complete


def test_full_tmpfs_fails_cleanly_then_resume_finishes(tmp_path, tiny, capsys, reference_in_process):
    """About 2.5 volumes fit (each takes 6 pages of 4 KiB: NIfTI 4, preview 1, sidecar 1)."""
    num = 4
    expected = first(reference_in_process, num)
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        out = disk / "out"
        code, _, err = run_in_process(capsys, *sample_args(tiny, out, num=num))
        _assert_failed_cleanly(code, err, out, expected, num)
        result = subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
        code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, "--resume", num=num))
        assert code == 0, err
        assert check_outputs(out, num) == set(range(num))
        assert volume_bytes(out, num) == expected


class _SmallDisk:
    """builtins.open for files under `directory` opened for writing returns a file whose writes fail with
    ENOSPC once `budget` bytes in all have been written (what fits is written first, as a real disk does)."""

    def __init__(self, directory, budget):
        self.directory, self.budget, self.real_open = str(directory), budget, builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        if writing and isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(self.directory):
            return _LimitedFile(handle, self)
        return handle


class _LimitedFile:
    def __init__(self, handle, disk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self._disk.budget:
            self._handle.write(memoryview(data).cast("B")[:self._disk.budget])
            self._disk.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.budget -= size
        return self._handle.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, attribute):
        return getattr(self._handle, attribute)


@pytest.mark.parametrize("where", ["nifti", "preview", "sidecar"])
def test_simulated_enospc_fails_cleanly_then_resume_finishes(tmp_path, tiny, capsys, monkeypatch,
                                                             reference_in_process, where):
    """The disk fills while volume 2's NIfTI, preview or sidecar is being written (budgets from the sizes of
    the reference files)."""
    num = 4
    expected = first(reference_in_process, num)
    sizes = {s: len(expected[name(2, s)]) for s in SUFFIXES[:2]}
    sidecar_size = reference_in_process["sidecar_size"] + 16  # sidecars differ by a few digits of timing
    budget = 2 * sidecar_size + sum(len(expected[name(k, s)]) for k in (0, 1) for s in SUFFIXES[:2])
    budget += {"nifti": sizes[".nii.gz"] // 2, "preview": sizes[".nii.gz"] + sizes[".png"] // 2,
               "sidecar": sizes[".nii.gz"] + sizes[".png"] + sidecar_size // 2}[where]
    out = tmp_path / "out"
    monkeypatch.setattr(builtins, "open", _SmallDisk(out, budget))
    code, _, err = run_in_process(capsys, *sample_args(tiny, out, num=num))
    monkeypatch.undo()
    complete = _assert_failed_cleanly(code, err, out, expected, num)
    assert complete == {0, 1}
    suffix = {"nifti": ".nii.gz", "preview": ".png", "sidecar": ".json"}[where]
    assert f"{out / name(2, suffix)}" in err  # the message names the file it could not write
    present = {s for s in SUFFIXES if (out / name(2, s)).exists()}
    assert present == set(SUFFIXES[:SUFFIXES.index(suffix)])  # whole files written before the failure stay
    code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, "--resume", num=num))
    assert code == 0, err
    assert "2 volume(s) written" in stdout and "2 complete volume(s) kept" in stdout
    assert check_outputs(out, num) == set(range(num))
    assert volume_bytes(out, num) == expected


# --- unwritable directory -----------------------------------------------------------------------------------

def test_unwritable_directory_is_refused_before_any_work(tmp_path, tiny, capsys):
    locked = tmp_path / "locked"
    with contextlib.ExitStack() as stack:
        if hasattr(os, "getuid") and os.getuid() != 0:
            locked.mkdir()
            locked.chmod(0o555)
            stack.callback(locked.chmod, 0o755)
        else:  # root writes anywhere permissions allow: use a read-only filesystem
            stack.enter_context(tmpfs(locked, "ro,size=64k"))
        for out in (locked, locked / "new" / "sub"):
            code, stdout, err = run_in_process(capsys, *sample_args(tiny, out))
            assert code == 2 and stdout == ""
            one_line(err, "--out", "not writable")
            assert os.listdir(locked) == []


# --- two processes, one output directory --------------------------------------------------------------------

def _wait_for_lock(out, process):
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if (out / LOCK).read_text().split()[:1] == [str(process.pid)]:  # "<pid> <command>"
                return
        time.sleep(0.005)
    pytest.fail(f"the first run never held the lock (exit status {process.poll()})")


def test_a_second_run_on_the_same_directory_refuses_at_once(tmp_path, tiny, capsys, reference_subprocess):
    expected, _ = reference_subprocess
    out = tmp_path / "shared"
    out.mkdir()
    first = start(*sample_args(tiny, out), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(out, first)
        began = time.monotonic()
        for extra in ((), ("--resume",), ("--overwrite",)):
            code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, *extra))
            assert code == 2 and stdout == ""
            one_line(err, f"another pydiffmed sample is writing to {out} (pid {first.pid})")
        assert time.monotonic() - began < 10
        assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
        _, err = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err
    assert check_outputs(out) == set(range(NUM))
    assert volume_bytes(out) == expected


def test_two_runs_started_together_never_mix_files(tmp_path, tiny, reference_subprocess):
    """Both start at once into a directory that does not exist yet; one writes the set, the other refuses
    (exit 2: it found the lock held, or the outputs written)."""
    expected, _ = reference_subprocess
    out = tmp_path / "new"
    processes = [start(*sample_args(tiny, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=TIMEOUT) + (p.returncode,) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], results
    loser = next(err for _, err, code in results if code == 2)
    line = one_line(loser)
    # "another pydiffmed run ... (pid unknown)" when the winner holds the lock but has not yet written its pid and
    # command into the lock file
    assert any(s in line for s in ("another pydiffmed sample", "another pydiffmed run", "already exists")), line
    assert check_outputs(out) == set(range(NUM))
    assert volume_bytes(out) == expected


# --- a model that produces NaN/Inf --------------------------------------------------------------------------

class _NaNAt(torch.nn.Module):
    """The wrapped model, except that it returns NaN at evaluation `evaluation` of its `run`-th sampling run (a
    run starts with the first, noisiest timestep 999; other calls, such as the command's checks, do not count)."""

    def __init__(self, inner, run, evaluation):
        super().__init__()
        self.inner, self.target, self.runs, self.evaluation = inner, (run, evaluation), 0, -1

    def forward(self, x, t, **cond):
        out = self.inner(x, t, **cond)
        if float(t.max()) >= 999:
            self.runs, self.evaluation = self.runs + 1, 0
        elif self.evaluation >= 0:
            self.evaluation += 1
        return out * float("nan") if (self.runs, self.evaluation) == self.target else out


def test_nan_model_output_stops_at_its_evaluation_and_writes_nothing_for_the_batch(tmp_path, tiny, capsys,
                                                                                  monkeypatch, reference_in_process):
    expected = first(reference_in_process, 4)
    real_load = modelfile.load_model
    steps = 2  # dpmpp_2m: one model evaluation per step, evaluations 0 and 1 for each batch (= volume)

    def nan_model(path):
        model, schedule, info = real_load(path)
        return _NaNAt(model, run=3, evaluation=1), schedule, info  # volume 2 (batches of 1), its evaluation 1

    out = tmp_path / "out"
    monkeypatch.setattr(modelfile, "load_model", nan_model)
    code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, num=4))
    monkeypatch.undo()
    assert code == 1 and stdout == ""
    one_line(err, "NaN", "model evaluation 1", f"of {steps}", "volume(s) 2;", "2 complete volume(s)")
    assert check_outputs(out, num=4) == {0, 1}
    assert sorted(os.listdir(out)) == [name(k, s) for k in (0, 1) for s in sorted(SUFFIXES)]
    code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, "--resume", num=4))
    assert code == 0, err
    assert volume_bytes(out, 4) == expected


def test_volume_that_overflows_in_output_units_is_not_written(tmp_path, tiny, capsys, monkeypatch):
    """A finite sample that the intensity mapping (×100) takes past float32: refused, nothing written for it."""
    from pydiffmed import engine

    real_call = engine.Sampler.__call__

    def huge_second_volume(self, seeds, **kwargs):
        volumes = real_call(self, seeds, **kwargs)
        if list(seeds) == [1]:
            volumes[0, 0, 0, 0, 0] = 1e38
        return volumes

    monkeypatch.setattr(engine.Sampler, "__call__", huge_second_volume)
    out = tmp_path / "out"
    code, stdout, err = run_in_process(capsys, *sample_args(tiny, out, num=3))
    assert code == 1
    one_line(err, "volume 1", "1 NaN/Inf voxel(s) in output units", "nothing written")
    assert check_outputs(out, num=3) == {0}
    assert sorted(os.listdir(out)) == [name(0, s) for s in sorted(SUFFIXES)]


def test_a_reader_that_leaves_early_gets_no_error_message():
    """`pydiffmed info | head -1`: the pipe is closed before the command writes (here: before it has even started),
    so every write fails with EPIPE; the command stops quietly (exit 1, nothing on stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "pydiffmed", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == b"", err
