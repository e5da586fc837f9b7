"""Issue 22, part 6: readers (``inspect``, ``report``, the Python API) and a second writer while a scan writes its
run file. Shared by ``tests/faults/test_concurrency.py`` and ``benchmarks/bench_faults.py``.

A reader must get a complete saved state (every slice point marked done holds a finite loss, every other one NaN;
the file opens and says it is in progress) or, before the first save, a clear "in progress" error; the second
writer is refused with one line and exit 2; the scan finishes unharmed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from faults.kills import CKPT, scan

#: A 41x41 slice on 512 samples merged every 0.2 s, then the Hessian: about ten seconds of writes to read through
#: (a later option overrides the one in faults.kills.ARGS).
ARGS = ("--steps", "41", "--max-samples", "512", "--no-sharpness", "--no-coherence", "--no-report")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "landscape", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def snapshot_problem(path: Path) -> str | None:
    """None when ``path`` holds a consistent saved state, else what is wrong with it."""
    with h5py.File(path, "r") as f:
        for name, g in f["slices"].items() if "slices" in f else ():
            done, loss = g["done"][()], g["loss"][()]
            if not np.all(np.isfinite(loss[done])) or not np.all(np.isnan(loss[~done])):
                return f"slice {name}: the done mask and the stored losses disagree"
    return None


def read_while_writing(folder: Path) -> dict[str, Any]:
    """Read the run file of a running scan over and over through the API (``describe``), and once each through
    ``inspect --json``, ``report`` and a second ``scan`` on the same file; count what each read got. The writer is
    paused (SIGSTOP) mid-slice while those three commands run, so they meet it holding its lock however slow the
    machine is (CI once saw the scan finish before the second writer had imported torch)."""
    from landscape.errors import LandscapeError
    from landscape.io.runfile import describe

    out = folder / "run.h5"
    writer = scan(out, *ARGS)
    r: dict[str, Any] = {"reads": 0, "consistent": 0, "in_progress": 0, "partial": 0, "not_yet": 0, "problems": []}
    while writer.poll() is None:
        try:
            info = describe(out)
        except LandscapeError as err:
            r["not_yet"] += 1
            if "in progress" not in str(err) and "does not exist" not in str(err):
                r["problems"].append(str(err))
            time.sleep(0.05)
            continue
        r["reads"] += 1
        problem = snapshot_problem(out)
        if problem:
            r["problems"].append(problem)
        r["consistent"] += problem is None
        r["in_progress"] += info["in_progress"]
        with h5py.File(out, "r") as f:
            partial = any(0 < g["done"][()].sum() < g["done"].size for g in f.get("slices", {}).values())
        r["partial"] += partial
        if partial and "report" not in r:  # mid-slice: the three commands run while the writer holds its lock
            os.kill(writer.pid, signal.SIGSTOP)  # paused, not finished: a slow machine must not let it end first
            try:
                rep = _cli("report", str(out), "-o", str(folder / "report"), "--format", "html")
                ins = _cli("inspect", str(out), "--json")
                res = _cli("scan", CKPT, "-o", str(out), "--resume", *ARGS)
            finally:
                os.kill(writer.pid, signal.SIGCONT)
            r["report"] = (rep.returncode, rep.stderr.strip())
            r["inspect"] = (ins.returncode, ins.stdout)
            r["second_writer"] = (res.returncode, res.stderr.strip())
    _, err = writer.communicate()
    r["writer_exit"], r["writer_stderr"] = writer.returncode, err[-2000:]
    r["final_in_progress"] = describe(out)["in_progress"]
    r["final_problem"] = snapshot_problem(out)
    return r
