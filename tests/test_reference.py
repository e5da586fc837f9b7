"""The PyHessian reference engine: same Problem, same parameters, its numbers checked against a dense Hessian."""

import json

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from conftest import blobs, cli
from landscape import Problem
from landscape.problem.curvature import CurvatureOperator
from landscape.analyses.hessian import CurvatureSettings, analyze_curvature
from landscape.analyses.reference import pyhessian_spectrum


def test_pyhessian_engine_matches_dense_spectrum_and_leaves_state_alone():
    X, y = blobs(60, 5, 3)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pb = Problem(net, X, y, F.cross_entropy)
    op = CurvatureOperator(pb)
    H = np.column_stack([op.matvec(e) for e in np.eye(op.n)])
    exact = np.linalg.eigvalsh(H)[::-1]
    rng_state = torch.get_rng_state()
    top, tr, n_hvp = pyhessian_spectrum(pb, top_k=2, tol=1e-10, max_iter=3000, trace=True, trace_max_iter=50)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    np.testing.assert_allclose(top.eigenvalues, exact[:2], rtol=1e-5)
    # residuals are recomputed, not PyHessian's: check them against the dense matrix
    for i in range(2):
        v = top.eigenvectors[:, i]
        assert abs(top.residuals[i] - np.linalg.norm(H @ v - top.eigenvalues[i] * v)) < 1e-10
    assert 2 <= tr.n_matvec <= 50 and n_hvp == top.n_matvec + tr.n_matvec
    assert abs(tr.estimate - np.trace(H)) < 5 * tr.stderr
    # the data-loader path (evaluation set larger than one batch) computes the same products
    chunked = Problem(net, X, y, F.cross_entropy, batch_size=25)
    top2, tr2, _ = pyhessian_spectrum(chunked, top_k=2, tol=1e-10, max_iter=3000, trace=True, trace_max_iter=50)
    np.testing.assert_allclose(top2.eigenvalues, top.eigenvalues, rtol=1e-9)
    np.testing.assert_allclose(tr2.samples, tr.samples, rtol=1e-9)


def test_pyhessian_engine_on_a_parameter_subset_is_the_principal_block():
    X, y = blobs(40, 4, 3)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    pb = Problem(net, X, y, F.cross_entropy)
    settings = CurvatureSettings(top_k=1, tol=1e-10, max_hvp=3000, trace=False, parameters=("2.*",),
                                 engine="pyhessian")
    res = analyze_curvature(pb, settings)
    op = CurvatureOperator(pb, parameters=["2.*"])
    exact = np.linalg.eigvalsh(np.column_stack([op.matvec(e) for e in np.eye(op.n)]))[-1]
    assert res.n_parameters == 18 and res.hvp_mode == "pyhessian"
    full = CurvatureOperator(pb)
    whole = np.linalg.eigvalsh(np.column_stack([full.matvec(e) for e in np.eye(full.n)]))[-1]
    assert abs(whole - exact) > 1e-2 * exact  # the block's top eigenvalue is not the whole Hessian's
    assert abs(res.top.eigenvalues[0] - exact) < 1e-4 * exact  # power iteration: slow on a small gap
    assert settings.group == "hessian_pyhessian"


def test_cli_engine_pyhessian_writes_its_own_group_and_refuses_what_it_cannot_do(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    common = ["hessian", str(mlp_ckpt), "--max-samples", "64", "--top-k", "2", "--trace-matvecs", "12", "-o", str(out)]
    assert cli(*common).returncode == 0
    r = cli(*common, "--engine", "pyhessian", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    with h5py.File(out) as f:
        assert "hessian" in f and "hessian_pyhessian" in f  # ours is kept beside PyHessian's
        g = f["hessian_pyhessian"]
        assert g.attrs["engine"] == "pyhessian" and g["trace"].attrs["method"] == "pyhessian-hutchinson"
        np.testing.assert_allclose(g["eigenvalues"][()], summary["curvature"]["eigenvalues"])
        np.testing.assert_allclose(g["eigenvalues"][()], f["hessian/eigenvalues"][()], rtol=1e-2)
    bad = cli(*common, "--engine", "pyhessian", "--bottom-k", "2")
    assert bad.returncode == 2 and "top-k eigenvalues and trace only" in bad.stderr and "Traceback" not in bad.stderr
