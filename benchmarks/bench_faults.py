"""Benchmark: the reliability promises as figures (issue 22), from the fault suite's own tables.

    python benchmarks/bench_faults.py [--parts kill,bad,pickles,untouched,hostile,concurrency,disk]

- ``kill``: a default scan of the shipped CNN (every analysis and the report, ``tests/faults/kills.py``) stopped by
  SIGKILL at 20 seeded moments spread over the run, and by SIGINT and SIGTERM once each at its middle, then
  resumed. Figure: equal / stopped (the resumed file equal to an uninterrupted run's, slices bitwise and analyses to
  round-off as in ``tests/test_resume.py``, the file readable after the stop, and only the missing slice points
  computed), with the phase each stop fell in.
- ``bad``: every bad input of ``tests/faults/badinputs.py`` (files and options over every command): clean when the
  command exits 2 with one ``error:`` line that names the problem, prints no traceback and leaves an earlier run
  file byte for byte as it was. Figure: clean / tried, and each failure's reason.
- ``pickles``: the five crafted-pickle carriers of ``tests/faults/pickles.py`` through ``landscape scan``. Figure:
  executed / tried (the marker file appearing counts as executed).
- ``untouched``: the user's module (weights, buffers, BatchNorm statistics, requires_grad, modes, .grad) after every
  analysis and after failures injected at four points of them (``tests/faults/test_model_untouched.py``). Figure:
  unchanged / tried.
- ``hostile``: ``tests/faults/test_hostile_names.py``: markup, quotes and ``/`` in parameter names, the checkpoint's
  folder, a spec argument and the slice name, kept exactly in the run file and shown as text in Chromium.
- ``concurrency``: ``tests/faults/concurrency.py``: the run file of a running scan read over and over (API,
  ``inspect``, ``report``) and a second writer started. Figure: consistent / reads.
- ``disk``: ``tests/faults/test_disk_full.py``: every fsync failing with ENOSPC from some point of a scan on, and
  under an earlier run file: one line, exit 2, the saved state kept, ``--resume`` finishing the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from faults.badinputs import CASES, make_files, run_case, verdict  # noqa: E402
from faults.kills import kill_and_resume, moments, reference  # noqa: E402
from faults.concurrency import read_while_writing  # noqa: E402
from faults.pickles import carriers  # noqa: E402


def largest_difference(a, b) -> float:
    """The largest relative difference of any stored float (datasets, attributes, JSON summaries) between two
    run files' ``contents`` (eigenvector components relative to the vector's largest one)."""
    import json

    import numpy as np

    def rel(x, y) -> float:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.size == 0 or x.shape != y.shape:
            return 0.0
        both = np.isfinite(x) & np.isfinite(y)
        scale = np.maximum(np.abs(x[both]), np.abs(y[both]))
        if "vector" in where[0]:
            scale = np.full_like(scale, np.abs(x[both]).max(initial=0.0))
        d = np.abs(x[both] - y[both])
        return float(np.max(np.where(scale > 0, d / np.where(scale > 0, scale, 1.0), d), initial=0.0))

    def walk(x, y) -> float:
        if isinstance(x, dict):
            return max((walk(x[k], y[k]) for k in x if k in y), default=0.0)
        if isinstance(x, list) and x and not isinstance(x[0], (int, float)):
            return max((walk(u, v) for u, v in zip(x, y)), default=0.0)
        if isinstance(x, str) and x[:1] in "[{":
            try:
                return walk(json.loads(x), json.loads(y))
            except ValueError:
                return 0.0
        if isinstance(x, (bytes, str)):
            return 0.0
        try:
            if np.asarray(x).dtype.kind not in "fc":
                return 0.0
        except (TypeError, ValueError):
            return 0.0
        return rel(x, y)

    worst = 0.0
    for k in a:
        where = (k,)
        worst = max(worst, walk(a[k], b[k]))
    return worst


def kills(folder: Path) -> None:
    import signal

    import h5py
    from test_resume import assert_same, contents

    ref, wall = reference(folder)
    with h5py.File(ref) as f:
        points = sum(int(g["done"].size) for g in f["slices"].values())
    print(f"reference scan: {wall:.1f} s")
    trials = [(t, signal.SIGKILL) for t in moments(20, wall)] + [(wall / 2, signal.SIGINT), (wall / 2, signal.SIGTERM)]
    equal = stopped = saved = redone = 0
    worst = 0.0
    for i, (delay, sig) in enumerate(trials):
        out = folder / f"kill{i}" / "run.h5"
        out.parent.mkdir()
        r = kill_and_resume(out, delay, sig)
        ok = (r["readable"] and r["resumed_exit"] == 0 and r["computed"] == points - r["done_before"]
              and not r["redone"])
        saved += len(r["saved_before"])
        redone += len(r["redone"])
        if ok:
            try:
                assert_same(contents(ref), contents(out))
                worst = max(worst, largest_difference(contents(ref), contents(out)))
            except AssertionError as err:
                ok, r["stderr"] = False, str(err)[:200]
        stopped += r["stopped"]
        equal += ok and r["stopped"]
        print(f"  - {signal.Signals(sig).name} at {delay:5.1f} s: {'stopped' if r['stopped'] else 'had finished'}, "
              f"{r['done_before']}/{points} slice points and {len(r['saved_before'])} analyses on disk, resumed "
              f"computed {r['computed']} points and redid {r['redone'] or 'no analysis'}, "
              f"{'equal' if ok else 'DIFFERENT: ' + r['stderr']}", flush=True)
    print(f"kill anywhere: {equal} equal / {stopped} stopped ({len(trials)} tried); analyses saved before a stop "
          f"and computed again on resume: {redone} / {saved}; the largest relative difference of a stored float from "
          f"the uninterrupted run: {worst:.1e}")


def bad_inputs(folder: Path) -> None:
    files = make_files(folder)
    run = Path(files["run"])
    before = run.read_bytes()
    clean, failures, t = 0, [], time.perf_counter()
    for name, args, needle in CASES:
        problem = verdict(run_case(args, files), needle)
        if problem is None and run.read_bytes() != before:
            problem = "the earlier run file changed"
        if problem is None:
            clean += 1
        else:
            failures.append((name, problem))
    print(f"bad inputs: {clean} clean / {len(CASES)} tried ({time.perf_counter() - t:.0f} s)")
    for name, problem in failures:
        print(f"  - {name}: {problem}")


def pickles(folder: Path) -> None:
    import subprocess

    marker = folder / "pwned"
    executed = 0
    files = carriers(folder / "carriers", marker)
    for name, path in files.items():
        res = subprocess.run([sys.executable, "-m", "landscape", "scan", str(path), "-o", str(folder / "p.h5")],
                             capture_output=True, text=True)
        if marker.exists():
            executed += 1
            marker.unlink()
        print(f"  - {name}: exit {res.returncode}, {res.stderr.strip().splitlines()[-1][:110]}")
    print(f"crafted pickles: {executed} executed / {len(files)} tried")


def concurrency(folder: Path) -> None:
    t = time.perf_counter()
    r = read_while_writing(folder)
    print(f"reads during a write: {r['consistent']} consistent / {r['reads']} reads of a running scan's file "
          f"({r['in_progress']} said in progress, {r['not_yet']} before its first save said so, "
          f"{len(r['problems'])} problems; {time.perf_counter() - t:.0f} s)")
    print(f"  - report during the write: exit {r['report'][0]}, {r['report'][1][:100]}")
    print(f"  - inspect --json during the write: exit {r['inspect'][0]}")
    print(f"  - a second writer: exit {r['second_writer'][0]}, {r['second_writer'][1][:110]}")
    print(f"  - the scan: exit {r['writer_exit']}, afterwards in progress {r['final_in_progress']}, "
          f"snapshot problem {r['final_problem']}")


def pytest_part(name: str, what: str) -> None:
    """One test file of tests/faults, run as it is, with its wall time."""
    import pytest

    t = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(HERE.parent / "tests" / "faults" / name)])
    print(f"{what}: pytest exit {code} ({time.perf_counter() - t:.0f} s)")


def untouched() -> None:
    pytest_part("test_model_untouched.py", "model untouched (2 analysis runs, 4 injected failures)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="kill,bad,pickles,untouched,hostile,concurrency,disk")
    a = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    parts = a.parts.split(",")
    if "kill" in parts:
        kills(folder)
    if "bad" in parts:
        bad_inputs(folder / "bad")
    if "pickles" in parts:
        pickles(folder)
    if "untouched" in parts:
        untouched()
    if "hostile" in parts:
        pytest_part("test_hostile_names.py", "hostile names (run file exact, Chromium shows text)")
    if "concurrency" in parts:
        concurrency(folder / "concurrency")
    if "disk" in parts:
        pytest_part("test_disk_full.py", "a disk that fills mid-scan, and under an earlier run file")


if __name__ == "__main__":
    main()
