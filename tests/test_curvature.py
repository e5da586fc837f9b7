"""Curvature operators against dense Hessians and closed forms (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blobs, flat_loss, relu_mlp
from landscape import LandscapeError, Problem
from landscape.problem.curvature import CurvatureOperator
from landscape.linalg.density import slq
from landscape.linalg.lanczos import lanczos
from landscape.linalg.trace import hutchinson


def dense(op):
    return np.column_stack([op.matvec(e) for e in np.eye(op.n)])


def small_cnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)).double()
    net.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics, then evaluate in eval mode
        net(torch.randn(64, 1, 6, 6, dtype=torch.float64) * 2 + 0.5)
    X = torch.randn(50, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))
    return net.eval(), X, y


def autograd_hessian(model, X, y, loss=F.cross_entropy):
    f, theta = flat_loss(model, X, y, loss)
    return torch.autograd.functional.hessian(f, theta).numpy()


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_top_and_bottom_eigenvalues_match_dense_hessian(which):
    if which == "mlp":
        net, (X, y) = relu_mlp((5, 12, 4)), blobs(60, 5, 4)
    else:
        net, X, y = small_cnn()
    H = autograd_hessian(net, X, y)
    exact = np.linalg.eigvalsh(H)
    op = CurvatureOperator(Problem(net, X, y, F.cross_entropy, batch_size=23))
    np.testing.assert_allclose(dense(op), H, atol=1e-12)
    top = lanczos(op, op.n, k=5, which="LA", tol=1e-8)
    bottom = lanczos(op, op.n, k=5, which="SA", tol=1e-8)
    np.testing.assert_allclose(top.eigenvalues, exact[::-1][:5], rtol=1e-6)
    np.testing.assert_allclose(bottom.eigenvalues, exact[:5], rtol=1e-6, atol=1e-9)
    assert top.converged.all()
    tr = hutchinson(op, op.n, max_matvec=200, seed=3)
    assert abs(tr.estimate - np.trace(H)) <= 3 * tr.stderr
    d = slq(op, op.n, n_probes=2, steps=30)
    assert d.negative_mass == pytest.approx((exact < -1e-12).mean(), abs=0.15)


def test_ggn_equals_hessian_for_linear_model_and_is_psd():
    X, y = blobs(40, 4, 3)
    lin = torch.nn.Linear(4, 3).double()
    pb = Problem(lin, X, y, F.cross_entropy, batch_size=13)
    G = dense(CurvatureOperator(pb, kind="ggn"))
    np.testing.assert_allclose(G, dense(CurvatureOperator(pb)), atol=1e-12)
    net = relu_mlp()
    Gn = dense(CurvatureOperator(Problem(net, X, y, F.cross_entropy), kind="ggn"))
    assert np.linalg.eigvalsh(Gn).min() > -1e-12  # positive semi-definite for a convex loss
    assert not np.allclose(Gn, autograd_hessian(net, X, y), atol=1e-6)  # but not the Hessian of a ReLU net


def test_linear_and_logistic_regression_closed_forms():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(70, 6, dtype=torch.float64, generator=g)
    Y = torch.randn(70, 2, dtype=torch.float64, generator=g)
    lin = torch.nn.Linear(6, 2, bias=False).double()
    H = dense(CurvatureOperator(Problem(lin, X, Y, F.mse_loss, batch_size=30)))
    XtX = (X.T @ X).numpy()
    expected = np.kron(np.eye(2), 2 * XtX / (70 * 2))  # nn.MSELoss: 2 X^T X / (n d_out), per output row
    np.testing.assert_allclose(H, expected, atol=1e-12)
    t = (torch.rand(70, 1, generator=g) < 0.5).double()
    logit = torch.nn.Linear(6, 1, bias=False).double()
    pb = Problem(logit, X, t, F.binary_cross_entropy_with_logits, classification=False)
    p = torch.sigmoid(logit(X)).detach().numpy().ravel()
    expected = (X.numpy().T * (p * (1 - p))) @ X.numpy() / 70
    np.testing.assert_allclose(dense(CurvatureOperator(pb)), expected, atol=1e-12)


def test_parameter_subset_is_the_principal_block():
    net, (X, y) = relu_mlp(), blobs(30)
    pb = Problem(net, X, y, F.cross_entropy)
    H = dense(CurvatureOperator(pb))
    sub = CurvatureOperator(pb, parameters=["2.*"])
    assert sub.names == ["2.weight", "2.bias"]
    start = sum(p.numel() for n, p in net.named_parameters() if n.startswith("0."))
    np.testing.assert_allclose(dense(sub), H[start:, start:], atol=1e-12)
    with pytest.raises(LandscapeError, match="no parameter matches"):
        CurvatureOperator(pb, parameters=["nope*"])


def test_recorded_hvp_engine_follows_the_fallback():
    """MSE has no forward-mode derivative of its backward in torch 2.13: the engine used must be the one reported."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, dtype=torch.float64, generator=g)
    Y = torch.randn(60, 2, dtype=torch.float64, generator=g)
    pb = Problem(torch.nn.Linear(4, 2).double(), X, Y, F.mse_loss, batch_size=10)  # 6 chunks: no graph engine
    pb.hvp({n: torch.ones_like(t) for n, t in pb.theta0.items()})
    assert pb.hvp_engine == "reverse-over-reverse"
    assert set(pb.hvp_timings) == {"reverse-over-reverse"}  # the candidate that fell back is left out


def test_default_trace_reuses_the_top_eigenvalues_lanczos_basis():
    """``trace_method="auto"`` with top eigenvalues asked: the top-k run's Krylov basis and 33 probes outside it
    (lanczos-deflated), within its error bars of the dense Hessian's trace, with 66 products fewer than Hutch++;
    without top eigenvalues, Hutch++."""
    from landscape.analyses.hessian import CurvatureSettings, analyze_curvature

    net, X, y = small_cnn()
    exact = np.trace(autograd_hessian(net, X, y))
    pb = Problem(net, X, y, F.cross_entropy)
    auto = analyze_curvature(pb, CurvatureSettings(top_k=3, tol=1e-8))
    hpp = analyze_curvature(pb, CurvatureSettings(top_k=3, tol=1e-8, trace_method="hutch++"))
    alone = analyze_curvature(pb, CurvatureSettings(top_k=0))
    assert auto.trace.method == "lanczos-deflated" and auto.trace.n_matvec == 33 and auto.top.krylov is None
    assert abs(auto.trace.estimate - exact) <= 4 * auto.trace.stderr
    assert hpp.trace.method == alone.trace.method == "hutch++" and hpp.n_matvec - auto.n_matvec == 99 - 33
    assert hpp.trace.vector_dtype == auto.trace.vector_dtype == "float64"  # float64 products: a float64 block
    np.testing.assert_allclose(auto.top.eigenvalues, hpp.top.eigenvalues, rtol=1e-12)
    with pytest.raises(LandscapeError, match="deflates by the top eigenvectors"):
        CurvatureSettings(top_k=0, trace_method="lanczos-deflated")
    with pytest.raises(LandscapeError, match="unknown"):
        CurvatureSettings(trace_method="hutch+")


def test_hutchpp_of_a_float32_model_keeps_a_float32_block(tmp_path):
    """A float32 model's Hutch++ stores its block as float32 (trace.sketch_dtype) and says so in the run file; the
    estimate is the float64 model's to float32 rounding of the products, and within its error bars of the dense
    Hessian's trace."""
    import h5py

    from landscape.analyses.hessian import CurvatureSettings, analyze_curvature

    net, X, y = small_cnn()
    exact = np.trace(autograd_hessian(net, X, y))
    settings = CurvatureSettings(top_k=0, trace_method="hutch++")
    wide = analyze_curvature(Problem(net, X, y, F.cross_entropy), settings)
    narrow = analyze_curvature(Problem(net.float(), X.float(), y, F.cross_entropy), settings)
    assert (wide.trace.vector_dtype, narrow.trace.vector_dtype) == ("float64", "float32")
    assert abs(narrow.trace.estimate - wide.trace.estimate) < 1e-4 * abs(wide.trace.estimate)
    assert abs(narrow.trace.estimate - exact) <= 4 * narrow.trace.stderr
    with h5py.File(tmp_path / "run.h5", "w") as f:
        narrow.write(f)
        assert f["hessian/trace"].attrs["vector_dtype"] == "float32"


def test_the_deflated_trace_holds_its_probes_beside_the_eigenvectors(monkeypatch):
    """The trace's probe block gets what the budget leaves beside the basis and the top eigenvectors in memory
    (and the HVP engine's graph, if it keeps one), not the room the eigenvectors already took."""
    import landscape.analyses.hessian as hessian

    seen = {}

    def spy(*args, budget, **kw):
        seen["budget"] = budget
        return basis_deflated(*args, budget=budget, **kw)

    from landscape.linalg.trace import basis_deflated
    monkeypatch.setattr(hessian, "basis_deflated", spy)
    net, X, y = small_cnn()
    pb = Problem(net, X, y, F.cross_entropy, memory_budget=2**30)
    res = hessian.analyze_curvature(pb, hessian.CurvatureSettings(top_k=3, tol=1e-6))
    assert isinstance(res.top.eigenvectors, np.ndarray) and not isinstance(res.top.eigenvectors, np.memmap)
    assert seen["budget"] == 2**30 - res.hvp_held_bytes - res.top.eigenvectors.nbytes
