"""A scan SIGKILLed at random moments and resumed equals an uninterrupted scan, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from conftest import cli
from landscape.io.runfile import RunFile

# wall-clock facts, the HVP engine timed fastest with what it held (the graph engine's graph; 0 for torch.func's) and
# its trial, and a slice's block of points sized by timing (under load two runs pick different ones; the points'
# values are the same bits either way, which the datasets' comparison checks) differ
VOLATILE = {"created", "completed", "command", "seconds", "hvp_mode", "hvp_held_bytes", "hvp_trials", "block"}
N = 91 * 81
ARGS = ["--steps", "91x81", "--strategy", "inplace", "--save-every", "0.3", "--no-report", "--workers", "2"]


def contents(path):
    out = {}
    with h5py.File(path) as f:
        out["/"] = {k: v for k, v in f.attrs.items() if k not in VOLATILE}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            out[name + "@"] = {k: v for k, v in obj.attrs.items() if k not in VOLATILE}

        f.visititems(visit)
    return out


def assert_same(a, b):
    """Slices (and the root) bitwise; the analyses after them to float round-off: their Hessian-vector
    products use the engine (graph or torch.func) timed fastest at run time, whose bits differ."""
    assert a.keys() == b.keys()
    for k in a:
        exact = k == "/" or k.startswith(("slices", "data"))
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            if exact or a[k].dtype.kind not in "fc":
                assert a[k].tobytes() == b[k].tobytes(), k  # bitwise, NaN included
            elif k.endswith("residual_noise"):
                # the products' own round-off (||A(3v)/3 - Av|| / sqrt 2): a float32 engine's ~1e-7, measured by
                # whichever engine the run timed fastest; two runs agree on its size, not on its digits (CI saw
                # 2.9e-7 against 1.9e-7 once); NaN where a pair met tol without it
                same_size = (a[k] > 0) & (b[k] > 0) & (a[k] < 4 * b[k]) & (b[k] < 4 * a[k])
                assert np.all(np.isclose(a[k], b[k], rtol=1e-5, atol=1e-9, equal_nan=True) | same_size), (k, a[k],
                                                                                                          b[k])
            else:  # eigenvectors are unit vectors: their components to round-off of the whole vector's norm
                atol = 1e-5 if "eigenvectors/" in k else 1e-9
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=atol, equal_nan=True, err_msg=k)
        elif exact:
            assert str(a[k]) == str(b[k]), k
        else:
            assert a[k].keys() == b[k].keys(), k
            for key, va in a[k].items():
                vb = b[k][key]
                if key == "summary":  # a curvature result's summary, JSON: its numbers to round-off too
                    _assert_close(json.loads(va), json.loads(vb), (k, key))
                elif isinstance(va, (float, np.floating)):
                    assert np.isclose(va, vb, rtol=1e-5, atol=1e-9, equal_nan=True), (k, key, va, vb)
                else:
                    assert str(va) == str(vb), (k, key)


def _assert_close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], (*where, k))
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, (*where, i))
    elif isinstance(a, float):
        assert np.isclose(a, b, rtol=1e-5, atol=1e-9, equal_nan=True), (where, a, b)
    else:
        assert a == b, where


def journal_points(path):
    j = path.with_name(path.name + ".journal")
    return j.exists() and j.stat().st_size > 0


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, mlp_ckpt):
    ref = tmp_path / "ref.h5"
    res = cli("scan", str(mlp_ckpt), *ARGS, "-o", str(ref))
    assert res.returncode == 0, res.stderr

    run = tmp_path / "killed.h5"
    rng = random.Random(0)
    kills = 0
    for attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "landscape", "scan", str(mlp_ckpt), *ARGS, "-o", str(run),
                                 *(["--resume"] if attempt else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not journal_points(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the scan finished before it could be killed; make the grid larger"
    with h5py.File(run) as f:  # the file on disk is a complete run file at any moment
        assert f.attrs["schema"] == "landscape/1"
    RunFile(run, mode="resume").close()  # merge the journal: journaled points count as done
    with h5py.File(run) as f:
        partial = int(f["slices/random_2d/done"][()].sum())
        attrs = f["slices/random_2d"].attrs
        assert attrs["input_layers"] == "net.1"  # the first layer went by linearity
        assert attrs["output_layer"] == "net.5" and attrs["workers"] == 2  # the last one into the stack, 2 replicas
    assert partial < N, "every point was done before the kill"
    res = cli("scan", str(mlp_ckpt), *ARGS, "-o", str(run), "--resume", "--json")
    assert res.returncode == 0, res.stderr
    import json

    computed = json.loads(res.stdout)["slices"][0]["computed"]
    assert computed == N - partial  # only missing points were computed
    assert_same(contents(ref), contents(run))
    assert not list(tmp_path.glob("*.journal")) and not list(tmp_path.glob("*.lock"))


def test_resume_refuses_a_different_run(tmp_path, mlp_ckpt, cnn_ckpt):
    out = tmp_path / "run.h5"
    assert cli("scan", str(mlp_ckpt), "--steps", "3", "--no-report", "-o", str(out)).returncode == 0
    res = cli("scan", str(cnn_ckpt), "--steps", "3", "--no-report", "-o", str(out), "--resume")
    assert res.returncode == 2 and "different checkpoint_sha256" in res.stderr
    res = cli("scan", str(mlp_ckpt), "--steps", "5", "--no-report", "-o", str(out), "--resume")
    assert res.returncode == 2 and "settings differ" in res.stderr
    assert cli("scan", str(mlp_ckpt), "--steps", "3", "--no-report", "-o", str(out), "--resume").returncode == 0


def test_resume_keeps_a_finished_curvature_result(tmp_path, mlp_ckpt, monkeypatch):
    """A scan stopped after its Hessian was written (e.g. during sharpness) does not compute it again on resume;
    other settings, or eigenvectors now asked for, do."""
    import landscape.analyses.scan as scan
    from landscape.analyses.hessian import CurvatureSettings

    base = dict(checkpoint=str(mlp_ckpt), max_samples=64, output=str(tmp_path / "run.h5"), steps=(3,), resume=True)
    curv = CurvatureSettings(top_k=2, trace_matvecs=12, max_hvp=40)
    first = scan.run_scan(scan.ScanConfig(**base, curvature=curv, save_vectors=False))
    calls = []
    real = scan.analyze_curvature
    monkeypatch.setattr(scan, "analyze_curvature", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = scan.run_scan(scan.ScanConfig(**base, curvature=curv, save_vectors=False))
    assert calls == [] and again.curvature == first.curvature
    scan.run_scan(scan.ScanConfig(**base, curvature=curv, save_vectors=True))  # eigenvectors were not stored
    scan.run_scan(scan.ScanConfig(**base, curvature=CurvatureSettings(top_k=3, trace_matvecs=12, max_hvp=40)))
    assert calls == [1, 1]
