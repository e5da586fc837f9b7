"""Lowered-precision slice evaluation (bf16 autocast; tf32 needs CUDA) with its error measured, and the memory
budget reaching the Problem."""

import h5py
import numpy as np
import pytest
import torch

from conftest import blobs, cli, relu_mlp
from landscape.errors import LandscapeError
from landscape.problem import Problem
from landscape.analyses.scan import precision_error
from landscape.analyses.slices import axis


def problem(precision="full", dtype=torch.float32):
    X, y = blobs(200, 4, 3)
    return Problem(relu_mlp((4, 32, 3)).to(dtype), X.to(dtype), y, torch.nn.functional.cross_entropy,
                   precision=precision, strategy="inplace")


def test_bf16_points_are_close_but_not_equal_and_the_error_is_measured():
    full, low = problem(), problem("bf16")
    torch.manual_seed(1)
    d = [{n: torch.randn_like(t) * 0.3 for n, t in full.theta0.items()}]
    coeffs = np.linspace(-1, 1, 9)[:, None]
    a = full.evaluate_points(coeffs, d)["loss"]
    b = low.evaluate_points(coeffs, d)["loss"]
    assert not np.array_equal(a, b)  # bf16 really ran
    np.testing.assert_allclose(b, a, rtol=5e-2)  # 8-bit mantissa: about 1% per op
    # the same Problem evaluates at full precision on request: what the measurement compares against
    np.testing.assert_array_equal(low.evaluate_points(coeffs, d, precision="full")["loss"], a)
    err = precision_error(low, d, (axis(-1, 1, 9),), points=9)
    assert err["precision_points"] == 9
    assert err["precision_max_abs_error"] == pytest.approx(np.abs(a - b).max())
    # gradients and HVPs are never lowered
    assert low.loss_and_gradient()[0] == full.loss_and_gradient()[0]


def test_precision_refusals():
    with pytest.raises(LandscapeError, match="needs a CUDA device"):
        problem("tf32")
    with pytest.raises(LandscapeError, match="lowers float32"):
        problem("bf16", torch.float64)
    with pytest.raises(LandscapeError, match="unknown"):
        problem("fp8")


def test_scan_records_the_precision_and_its_error(tmp_path, mlp_ckpt):
    out = tmp_path / "r.h5"
    res = cli("scan", str(mlp_ckpt), "--steps", "7", "--precision", "bf16", "--memory-budget", "64MiB",
              "--no-hessian", "--no-sharpness", "--no-coherence", "--no-report", "-o", str(out))
    assert res.returncode == 0, res.stderr
    with h5py.File(out) as f:
        a = f["slices/random_2d"].attrs
        assert a["precision"] == "bf16" and a["precision_points"] >= 9
        assert 0 < a["precision_max_rel_error"] < 0.1
    # resuming with another precision is refused by name
    res = cli("scan", str(mlp_ckpt), "--steps", "7", "--no-hessian", "--no-sharpness", "--no-coherence",
              "--no-report", "-o", str(out), "--resume")
    assert res.returncode == 2 and "precision" in res.stderr
    for bad in (["--precision", "tf32", "--device", "cpu"], ["--memory-budget", "lots"]):
        res = cli("scan", str(mlp_ckpt), *bad, "--no-report", "-o", str(tmp_path / "x.h5"))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr


def test_memory_budget_sizes_blocks(mlp_ckpt):
    from landscape.analyses.scan import ScanConfig, setup
    from landscape.problem.strategy import OUTPUTS_SHARE

    st = setup(ScanConfig(checkpoint=str(mlp_ckpt), memory_budget=1e5, strategy="inplace"))
    assert st.problem.memory_budget == 1e5
    st.problem.choose_strategy()
    out_bytes = 10 * 4 * st.problem.n  # 10 logits per sample, float32
    assert st.problem.block == max(1, int(OUTPUTS_SHARE * 1e5 // out_bytes))  # the rest for the input layers
