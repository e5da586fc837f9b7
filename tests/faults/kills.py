"""Issue 22, part 1: a default scan (every analysis and the report) of the shipped CNN, killed at seeded moments
spread over its phases and resumed, against an uninterrupted run. Shared by ``tests/faults/test_kill_anywhere.py``
and ``benchmarks/bench_faults.py``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[2]
CKPT = str(REPO / "data" / "examples" / "cnn_adam_s2000.pt")
#: Strategy, workers and HVP engine pinned: a fresh run picks them by timing, and the thread layout and engine they
#: bring change float rounding, so on a busy machine two fresh runs may differ in the last bits (a resume reuses
#: the stored slice strategy, not the engine an unfinished analysis would time again).
ARGS = ["--max-samples", "128", "--steps", "15", "--save-every", "0.2", "--strategy", "inplace", "--workers", "2",
        "--hvp", "graph"]


def scan(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "landscape", "scan", CKPT, *ARGS, "-o", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def reference(folder: Path) -> tuple[Path, float]:
    """The uninterrupted run and its wall time."""
    out = folder / "reference.h5"
    t = time.perf_counter()
    proc = scan(out)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return out, time.perf_counter() - t


def moments(count: int, wall: float, seed: int = 0) -> list[float]:
    """``count`` seeded moments spread over the run: one in each of ``count`` equal stretches of the first 75% of
    the reference's ``wall`` (the reference starts cold and runs ~20% longer than the scans after it: stops later
    than that found them finished)."""
    rng = random.Random(seed)
    return [0.75 * wall * (i + rng.random()) / count for i in range(count)]


def done_points(f: h5py.File, journal: Path) -> int:
    """Finished slice points of a stopped run: those merged into the file and those still in its journal (complete
    lines only: a torn last line is computed again), as a resume counts them."""
    done = {name: g["done"][()] for name, g in f.get("slices", {}).items()}
    if journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.endswith("\n"):
                record = json.loads(line)
                d = done[record["slice"]]
                d[np.unravel_index(np.asarray(record["index"], dtype=np.int64), d.shape)] = True
    return sum(int(d.sum()) for d in done.values())


def kill_and_resume(out: Path, delay: float, sig: int = signal.SIGKILL) -> dict:
    """Start a scan, send ``sig`` after ``delay`` seconds (if it is still running), check the file on disk, resume
    it to the end. Returns what happened: whether it was stopped, the file's state after the stop, the resumed
    run's exit code, the points it computed and those that were done before."""
    proc = scan(out)
    time.sleep(delay)
    stopped = proc.poll() is None
    if stopped:
        proc.send_signal(sig)
    _, err = proc.communicate()
    readable, done, saved = True, 0, []
    if out.exists():
        try:
            with h5py.File(out) as f:
                readable = f.attrs.get("schema") == "landscape/1"
                done = done_points(f, out.with_name(out.name + ".journal"))
                saved = [a for a in ("hessian", "coherence") if a in f]
                saved += [f"sharpness {g}" for g in f.get("sharpness", {})]
        except OSError:
            readable = False
    resumed = scan(out, "--resume", "--json")
    res_out, res_err = resumed.communicate()
    computed = sum(s["computed"] for s in json.loads(res_out)["slices"]) if resumed.returncode == 0 else None
    # an analysis saved before the stop that the resumed run reports progress on was computed again
    redone = [a for a in saved if any(line.startswith(a + " ") or line.startswith(a + ":")
                                      for line in res_err.splitlines())]
    return {"stopped": stopped, "exit": proc.returncode, "readable": readable, "done_before": done,
            "saved_before": saved, "redone": redone, "resumed_exit": resumed.returncode, "computed": computed,
            "stderr": res_err[-500:], "report": (out.parent / "index.html").exists()}
