"""The validity radius of the quadratic model: infinite on an exact quadratic (least squares), the closed form
``3 tau a / |b|`` on a cubic, written to the run file and summarized in the report."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cli
from landscape import Problem
from landscape.analyses.hessian import CurvatureSettings, analyze_curvature
from landscape.report.contents import RunContents, summary_rows
from landscape.analyses.validity import validity_radius


class Scalar(torch.nn.Module):
    """Output ``w`` for every sample (``w`` one number)."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x))


def cubic(a: float, b: float):
    return lambda out, y: (a * out ** 2 / 2 + b * out ** 3 / 6).mean()


def settings(**kw) -> CurvatureSettings:
    return CurvatureSettings(top_k=1, trace=False, tol=1e-10, validity=True, **kw)


@pytest.mark.parametrize("a,b", [(1.0, 4.0), (2.0, -5.0)])
def test_cubic_radius_is_the_closed_form(a, b):
    X, y = torch.zeros(8, 1, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    res = analyze_curvature(Problem(Scalar(0.0), X, y, cubic(a, b)), settings(validity_random=0))
    v = res.validity
    assert v.labels == ("top-1", "bottom-1") and v.theta_norm == 0 and v.r_max == 1.0
    np.testing.assert_allclose(v.curvature, a, rtol=1e-9)
    np.testing.assert_allclose(v.slope, 0.0, atol=1e-12)
    for j, tau in enumerate(v.levels):
        np.testing.assert_allclose(v.radius[:, j], 3 * tau * a / abs(b), rtol=2e-2)


def test_least_squares_is_quadratic_everywhere():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    net = torch.nn.Linear(6, 2).double()
    res = analyze_curvature(Problem(net, X, Y, F.mse_loss), settings(validity_random=3))
    v = res.validity
    assert v.labels == ("top-1", "bottom-1", "random-1", "random-2", "random-3")
    assert np.isinf(v.radius).all()
    assert json.dumps(res.summary())  # inf is written as None in the summary
    assert res.summary()["validity"]["radius"]["top-1"] == [None, None]


def test_pure_function_on_explicit_curves():
    assert validity_radius(lambda s: 3 * s + s * s, 3.0, 2.0, (0.1,)) == [math.inf]
    # a quartic term: gap = s^2 / 6 against a s^2 / 2 with a = 2 ... = |s|^2 / 12, crossing 0.1 at sqrt(1.2)
    r = validity_radius(lambda s: s * s + s ** 4 / 12, 0.0, 2.0, (0.1,), r_max=4.0, rtol=1e-8)
    assert r[0] == pytest.approx(math.sqrt(1.2), rel=1e-6)
    # a non-finite loss counts as a failed model
    assert validity_radius(lambda s: s * s if abs(s) < 0.5 else math.nan, 0.0, 2.0, (0.1,), r_max=4.0)[0] <= 0.5


def test_hessian_validity_in_run_file_and_report(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    r = cli("hessian", str(mlp_ckpt), "--top-k", "2", "--no-trace", "--validity", "--validity-random", "1",
            "--max-samples", "128", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["curvature"]["validity"]["radius"]) == {"top-1", "top-2", "bottom-1", "random-1"}
    with h5py.File(out) as f:
        g = f["hessian/validity"]
        assert g["radius"].shape == (4, 2) and g.attrs["n_evals"] > 0
        assert (g["radius"][:, 0] <= g["radius"][:, 1]).all()  # 10% is reached before 50%
        assert f["hessian"].attrs["n_hvp_bottom"] > 0  # --validity brings the bottom eigenvector
    rows = [r for r in summary_rows(RunContents.read(out)) if r.name.startswith("quadratic model within 10%")]
    assert len(rows) == 4 and all(r.value > 0 for r in rows)


def test_validity_is_refused_with_pyhessian(mlp_ckpt):
    r = cli("hessian", str(mlp_ckpt), "--validity", "--engine", "pyhessian")
    assert r.returncode == 2 and "validity" in r.stderr
