"""Per-class curvature (``--per-class``): each class's Hessian equals the dense Hessian of the loss on that class's
samples alone (float64), classes come most frequent first, and the run file and report carry them."""

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blobs, cli, flat_loss, relu_mlp
from landscape import Problem
from landscape.errors import LandscapeError
from landscape.analyses.hessian import CurvatureSettings, analyze_curvature, class_members
from landscape.report.contents import RunContents, summary_rows


def imbalanced(n: int = 60):
    X, y = blobs(n, 5, 3)
    y[: n // 2] = 0  # class 0 the majority
    return X, y


def test_per_class_eigenvalues_equal_dense_class_hessians():
    net, (X, y) = relu_mlp((5, 10, 3)), imbalanced()
    settings = CurvatureSettings(top_k=3, bottom_k=2, trace=False, tol=1e-10, per_class=True, density_steps=40)
    res = analyze_curvature(Problem(net, X, y, F.cross_entropy), settings)
    counts = {c: int((y == c).sum()) for c in range(3)}
    assert list(res.per_class) == [str(c) for c in sorted(counts, key=lambda c: (-counts[c], c))]
    for cls, r in res.per_class.items():
        mask = y == int(cls)
        f, theta = flat_loss(net, X[mask], y[mask])
        exact = np.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta).numpy())
        assert r.n_samples == int(mask.sum())
        np.testing.assert_allclose(r.top.eigenvalues, exact[::-1][:3], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(r.bottom.eigenvalues, exact[:2], rtol=1e-6, atol=1e-10)
        assert r.density.nodes.shape[0] == 3  # at least 3 probes: the negative mass has a standard error
        tol = 1e-4 * np.abs(exact).max()
        assert r.density.negative_mass == pytest.approx((exact < -tol).mean(), abs=0.15)
        assert np.isfinite(r.density.negative_mass_stderr)
    # the whole-data result is unchanged by --per-class
    whole = analyze_curvature(Problem(net, X, y, F.cross_entropy), CurvatureSettings(top_k=3, bottom_k=2, trace=False,
                                                                                    tol=1e-10))
    np.testing.assert_allclose(res.top.eigenvalues, whole.top.eigenvalues, rtol=1e-9)


def test_per_class_needs_class_labels():
    X = torch.randn(20, 3, dtype=torch.float64)
    pb = Problem(torch.nn.Linear(3, 2).double(), X, torch.randn(20, 2, dtype=torch.float64), F.mse_loss)
    with pytest.raises(LandscapeError, match="per-class"):
        class_members(pb)


def test_per_class_in_run_file_and_report(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    r = cli("hessian", str(mlp_ckpt), "--per-class", "--top-k", "1", "--no-trace", "--density-steps", "20",
            "--max-samples", "100", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["curvature"]["per_class"]
    assert sum(v["n_samples"] for v in summary.values()) == 100
    with h5py.File(out) as f:
        g = f["hessian/per_class"]
        assert sorted(g) == sorted(summary)
        for k in g:
            assert g[k].attrs["n_samples"] == summary[k]["n_samples"]
            assert "negative_mass_stderr" in g[k]["density"].attrs and "bottom_eigenvalues" in g[k]
    run = RunContents.read(out)
    counts = [pc.attrs["n_samples"] for pc in run.curvature[0].per_class.values()]
    assert counts == sorted(counts, reverse=True)  # the report shows the most frequent class first
    rows = [r for r in summary_rows(run) if r.name.endswith("negative spectral mass") and r.name.startswith("class")]
    assert len(rows) == len(summary) and all(np.isfinite(r.stderr) for r in rows)
    rep = cli("report", str(out), "-o", str(tmp_path / "rep"))
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "rep" / "figures" / "hessian_per_class_density.png").exists()
    assert "Each class's loss alone" in (tmp_path / "rep" / "index.html").read_text()
