"""Mini-batch against full-batch curvature (``--batch-sizes``): on least squares each batch's Hessian is
``2 X_B^T X_B / b`` (with the bias column), so every draw's λmax and λmin are checked against ``eigvalsh``; the
``1/b`` fit recovers an exact law; sizes outside ``[1, n)`` are refused."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli
from landscape import Problem
from landscape.analyses.batchsize import batch_indices, fit_inverse_size
from landscape.errors import LandscapeError
from landscape.analyses.hessian import CurvatureSettings, analyze_curvature
from landscape.report.contents import RunContents, summary_rows


def test_least_squares_batches_match_eigvalsh():
    g = torch.Generator().manual_seed(0)
    n, d = 64, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    pb = Problem(torch.nn.Linear(d, 1).double(), X, y, F.mse_loss)
    res = analyze_curvature(pb, CurvatureSettings(top_k=1, trace=False, tol=1e-10, batch_sizes=(8, 16, 32),
                                                  batch_draws=3, seed=4))
    b = res.batch_sizes
    A = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], dim=1).numpy()
    full = np.linalg.eigvalsh(2 * A.T @ A / n)
    assert b.full_top == pytest.approx(full[-1], rel=1e-9) and b.full_bottom == pytest.approx(full[0], rel=1e-9)
    for i, size in enumerate(b.sizes):
        for j in range(3):
            Ab = A[batch_indices(n, int(size), j, 4)]
            exact = np.linalg.eigvalsh(2 * Ab.T @ Ab / size)
            assert b.top[i, j] == pytest.approx(exact[-1], rel=1e-8)
            assert b.bottom[i, j] == pytest.approx(exact[0], rel=1e-7, abs=1e-10)
    assert b.top_converged.all() and b.bottom_converged.all()
    assert (b.top.mean(axis=1) >= b.full_top).all()  # a batch's λmax exceeds the full data's on average


def test_fit_recovers_an_exact_law_and_its_error():
    sizes = np.array([4, 16, 64, 256])
    exact = fit_inverse_size(sizes, 3.0 - 8.0 / sizes, 3.0)
    assert exact["c"] == pytest.approx(-8.0) and exact["c_stderr"] < 1e-12 and exact["intercept"] == pytest.approx(3.0)
    noisy = fit_inverse_size(sizes, 3.0 - 8.0 / sizes + np.array([0.1, -0.1, 0.1, -0.1]), 3.0)
    assert noisy["c_stderr"] > 0 and noisy["rms"] > 0


def test_batch_sizes_must_be_below_the_sample_count():
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    pb = Problem(torch.nn.Linear(3, 2).double(), X, y, F.cross_entropy)
    with pytest.raises(LandscapeError, match="10"):
        analyze_curvature(pb, CurvatureSettings(top_k=1, trace=False, batch_sizes=(4, 10)))


def test_batch_sizes_cli_run_file_and_report(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    r = cli("hessian", str(mlp_ckpt), "--batch-sizes", "8,32", "--batch-draws", "3", "--top-k", "1", "--no-trace",
            "--max-samples", "128", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["curvature"]["batch_sizes"]
    assert s["sizes"] == [8, 32] and s["draws"] == 3 and len(s["top_mean"]) == 2
    with h5py.File(out) as f:
        g = f["hessian/batch_sizes"]
        assert g["top"].shape == (2, 3) and "fit_top_c" in g.attrs and "fit_bottom_intercept" in g.attrs
    rows = [row for row in summary_rows(RunContents.read(out)) if "batches of" in row.name]
    assert len(rows) == 4 and all(np.isfinite(row.stderr) for row in rows)
    rep = cli("report", str(out), "-o", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "figures" / "hessian_batch_sizes.png").exists()
    bad = cli("hessian", str(mlp_ckpt), "--batch-sizes", "8,x")
    assert bad.returncode == 2 and "--batch-sizes" in bad.stderr
