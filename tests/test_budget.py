"""Memory budget and compact run files (issue 19): vectors kept only when asked, resume without them, refusals
with the number needed."""

import h5py
import numpy as np
import pytest

from conftest import EXAMPLES, cli, import_from
from landscape.runtime.budget import check_disk, resolve_budget
from landscape.errors import LandscapeError

MLP = str(EXAMPLES / "mlp_sgd_s2000.pt")
FAST = ["--steps", "7", "--no-sharpness", "--no-report", "--strategy", "inplace", "--workers", "1"]


def _datasets(path):
    names = []
    with h5py.File(path) as f:
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def test_no_save_vectors_then_resume_equals_save_vectors(tmp_path):
    lean, full = tmp_path / "lean.h5", tmp_path / "full.h5"
    r = cli("scan", MLP, *FAST, "--no-save-vectors", "-o", str(lean))
    assert r.returncode == 0, r.stderr
    r = cli("scan", MLP, *FAST, "--save-vectors", "-o", str(full))
    assert r.returncode == 0, r.stderr
    lean_names, full_names = _datasets(lean), _datasets(full)
    assert not any("directions" in n or "eigenvectors" in n or "gsnr" in n for n in lean_names)
    assert any("slices/random_2d/directions/1/" in n for n in full_names)
    assert any("hessian/eigenvectors/0/" in n for n in full_names) and any("coherence/gsnr/" in n for n in full_names)
    with h5py.File(full) as f:  # stored in the run's dtype (the checkpoint's float32)
        d = f["slices/random_2d/directions/0"]
        assert {d[k].dtype for k in d} == {np.dtype("float32")}
        assert f["slices/random_2d"].attrs["directions_sha256"] == h5py.File(lean)["slices/random_2d"].attrs[
            "directions_sha256"]
    # forget half of the lean file's points: --resume recomputes the directions from their seed, checks their
    # hash, and fills in the same values
    with h5py.File(lean, "r+") as f:
        g = f["slices/random_2d"]
        done, loss = g["done"][()], g["loss"][()]
        done[3:] = False
        loss[3:] = np.nan
        g["done"][...], g["loss"][...] = done, loss
    r = cli("scan", MLP, *FAST, "--no-save-vectors", "-o", str(lean), "--resume")
    assert r.returncode == 0, r.stderr
    with h5py.File(lean) as a, h5py.File(full) as b:
        assert np.array_equal(a["slices/random_2d/loss"][()], b["slices/random_2d/loss"][()])
        # a hash that does not match is refused
        sha = a["slices/random_2d"].attrs["directions_sha256"]
    with h5py.File(lean, "r+") as f:
        f["slices/random_2d"].attrs["directions_sha256"] = "0" * len(sha)
        f["slices/random_2d/done"][0, 0] = False
    r = cli("scan", MLP, *FAST, "--no-save-vectors", "-o", str(lean), "--resume")
    assert r.returncode == 2 and "differ from the stored hash" in r.stderr


def test_budget_beyond_the_machine_and_disk_are_refused_with_the_number(tmp_path):
    with pytest.raises(LandscapeError, match="more than the .* this machine has available"):
        resolve_budget(2.0 ** 60)
    with pytest.raises(LandscapeError, match=r"needs 1024\.0 TiB of scratch space"):
        check_disk(str(tmp_path), 2.0 ** 50, "a block")
    r = cli("hessian", MLP, "--memory-budget", "1000TB", "-o", str(tmp_path / "r.h5"))
    assert r.returncode == 2 and "this machine has available" in r.stderr and "Traceback" not in r.stderr


def test_hessian_with_a_budget_too_small_for_its_basis_spills_and_agrees(tmp_path):
    args = ["hessian", MLP, "--dtype", "float64", "--json", "--top-k", "3", "--trace-method", "hutch++"]  # its block spills
    mem = cli(*args, "-o", str(tmp_path / "m.h5"))
    disk = cli(*args, "--memory-budget", "1MiB", "-o", str(tmp_path / "d.h5"))
    assert mem.returncode == 0 and disk.returncode == 0, disk.stderr
    with h5py.File(tmp_path / "m.h5") as a, h5py.File(tmp_path / "d.h5") as b:
        assert a["hessian"].attrs["vector_storage"] == "memory" and b["hessian"].attrs["vector_storage"] == "disk"
        np.testing.assert_allclose(a["hessian/eigenvalues"][()], b["hessian/eigenvalues"][()], rtol=1e-10)
        assert a["hessian/trace"].attrs["estimate"] == pytest.approx(b["hessian/trace"].attrs["estimate"], rel=1e-10)


def test_the_graph_engines_graph_counts_against_the_budget(tmp_path):
    """The Lanczos basis is sized to the budget less the gradient graph the graph engine keeps, and the run file
    records what that graph held; the eigenvalue is the same as with the whole budget."""
    import torch.nn.functional as F

    from conftest import blobs, relu_mlp
    from landscape import Problem
    from landscape.analyses.hessian import CurvatureSettings, analyze_curvature
    from landscape.linalg.lanczos import basis_size

    net, (X, y) = relu_mlp((4, 256, 3)), blobs(400)
    settings = CurvatureSettings(top_k=1, trace=False)
    probe = Problem(net, X, y, F.cross_entropy, hvp_mode="graph")
    probe.settle_hvp()  # builds the graph
    graph, n = probe.products.graph_bytes, probe.num_parameters
    budget = 18.5 * 8 * n + graph  # the default 20 vectors fit the budget, 15 fit what the graph leaves of it
    assert basis_size(1, n, budget=budget) == 20 and basis_size(1, n, budget=budget - graph) == 15
    pb = Problem(net, X, y, F.cross_entropy, hvp_mode="graph", memory_budget=budget)
    res = analyze_curvature(pb, settings)
    # another build's count may differ by a few bytes (a storage freed while it is built can free its address)
    assert res.hvp_held_bytes == pytest.approx(graph, rel=1e-3) and res.top.basis == 15
    with h5py.File(tmp_path / "r.h5", "w") as f:
        assert res.write(f).attrs["hvp_held_bytes"] == res.hvp_held_bytes
    functional = analyze_curvature(Problem(net, X, y, F.cross_entropy, hvp_mode="forward-over-reverse",
                                           memory_budget=budget), settings)
    assert functional.hvp_held_bytes == 0 and functional.top.basis == 20
    assert res.top.eigenvalues[0] == pytest.approx(functional.top.eigenvalues[0], rel=1e-9)


def test_the_dry_run_counts_the_engine_choice_once_in_the_first_phase_with_products(tmp_path, monkeypatch):
    """The run pays ``--hvp auto``'s choice (a graph built, each engine timed) once, before its first product; the
    dry run adds the time its own first product took to the phase that makes the run's first product."""
    import time

    from landscape.analyses.hessian import CurvatureSettings
    from landscape.analyses.scan import ScanConfig, estimate
    from landscape.problem.products import Products

    choose = Products._choose

    def slow(self, v):
        time.sleep(0.5)
        return choose(self, v)

    monkeypatch.setattr(Products, "_choose", slow)
    config = ScanConfig(checkpoint=MLP, steps=(3,), curvature=CurvatureSettings(top_k=1, trace=False),
                        output=str(tmp_path / "r.h5"))
    phases = estimate(config).phases
    assert phases["hessian"]["seconds"] >= 0.5 and phases["slices"]["seconds"] < 0.5


MID_MODEL = """
import torch
def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 768), torch.nn.ReLU(),
                               torch.nn.Linear(768, 768), torch.nn.ReLU(), torch.nn.Linear(768, 10))
"""


@pytest.mark.slow
def test_dry_run_predicts_the_measured_peak_memory_within_1_5x(tmp_path):
    """A 3M-parameter MLP, the default analyses on a 5x5 slice: the dry run's peak against the process's ru_maxrss."""
    import json
    import os
    import subprocess
    import sys

    import torch

    (tmp_path / "mid.py").write_text(MID_MODEL)
    torch.save(import_from(tmp_path, "mid").net().state_dict(), tmp_path / "ck.pt")
    torch.manual_seed(0)
    torch.save({"X": torch.randn(128, 3, 32, 32), "y": torch.randint(0, 10, (128,))}, tmp_path / "d.pt")
    args = ["scan", str(tmp_path / "ck.pt"), "--model", f"{tmp_path / 'mid.py'}:net", "--data", str(tmp_path / "d.pt"),
            "--steps", "5", "--no-report", "--json", "-o", str(tmp_path / "run.h5")]
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    predicted = json.loads(dry.stdout)["memory_bytes"]
    proc = subprocess.Popen([sys.executable, "-m", "landscape", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-2000:]
    measured = usage.ru_maxrss * 1024
    assert measured / 1.5 <= predicted <= 1.5 * measured, (predicted / 2**20, measured / 2**20)


def test_a_run_that_cannot_fit_is_refused_before_it_starts(monkeypatch):
    """Gradients, products and float64 vectors in flight plus the budget, against what the machine has: refused
    with the number before any product runs."""
    import landscape.runtime.budget as budget
    from landscape.analyses.hessian import CurvatureSettings
    from landscape.analyses.scan import ScanConfig, setup

    calls = []
    monkeypatch.setattr("landscape.problem.Problem.evaluate", lambda self, *a, **k: calls.append(1))
    floor = budget.analysis_floor(8970, 8970 * 4, host_vectors=True)
    assert floor == 3 * 8970 * 4 + 4 * 8 * 8970
    monkeypatch.setattr(budget, "available_memory", lambda: 2**20 + floor // 2)
    with pytest.raises(LandscapeError, match=r"need at least 1\.\d+ MiB .* this machine has 1\.\d+ MiB available"):
        setup(ScanConfig(MLP, memory_budget=2**20, device="cpu", curvature=CurvatureSettings()))
    assert calls == []  # refused before the model ran
    monkeypatch.setattr(budget, "available_memory", lambda: 2**20 + 2 * floor)
    setup(ScanConfig(MLP, memory_budget=2**20, device="cpu", curvature=CurvatureSettings()))
    assert calls == [1]
