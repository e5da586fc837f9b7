"""Issue 22: a disk that fills mid-write (every fsync of the run file failing with ENOSPC from some point on, where
a full disk shows itself): one line and exit 2, the file on disk still the last saved state, an earlier run file
byte for byte intact, and ``--resume`` on a disk with room finishes the run."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py

from conftest import EXAMPLES, cli

HOOK = """
import errno, runpy, sys
import landscape.io.runfile as rf
calls, real = [0], rf._fsync_path
def fsync(path):
    calls[0] += 1
    if calls[0] > {after}:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(path)
rf._fsync_path = fsync
sys.argv = ["landscape", *{args!r}]
runpy.run_module("landscape", run_name="__main__")
"""
CK = str(EXAMPLES / "mlp_sgd_s2000.pt")
ARGS = ["--max-samples", "64", "--steps", "7", "--no-sharpness", "--no-coherence", "--no-report"]


def full_disk_after(after: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HOOK.format(after=after, args=list(args))], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def assert_one_line(res: subprocess.CompletedProcess) -> None:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip() and not ln.startswith("random_2d")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-1500:]
    assert len(lines) == 1 and lines[0].startswith("error: no space left on the device"), res.stderr[-1500:]


def test_a_disk_filling_mid_scan(tmp_path):
    out = tmp_path / "run.h5"
    res = full_disk_after(6, "scan", CK, *ARGS, "-o", str(out))  # three transactions saved: up to the empty slice
    assert_one_line(res)
    with h5py.File(out) as f:  # the last saved state: a run file with the slice created
        assert f.attrs["schema"] == "landscape/1" and "slices/random_2d" in f
    assert not list(tmp_path.glob("run.h5.tmp*"))
    done = cli("scan", CK, *ARGS, "-o", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    with h5py.File(out) as f:
        assert f["slices/random_2d/done"][()].all() and "hessian" in f


def test_a_full_disk_leaves_an_earlier_run_file_intact(tmp_path):
    out = tmp_path / "run.h5"
    assert cli("scan", CK, *ARGS, "-o", str(out)).returncode == 0
    before = out.read_bytes()
    res = full_disk_after(0, "scan", CK, *ARGS, "-o", str(out), "--resume", "--name", "second")
    assert_one_line(res)
    assert out.read_bytes() == before
