"""Trajectories against exact answers: PCA coordinates by a direct SVD, the edge of stability of full-batch GD
(Cohen et al. 2021) on the Chebyshev toy of the reference sheet, and monotone sharpening at a small step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from landscape.problem import Problem
from landscape.analyses.trajectory import Snapshot, analyze_trajectory, pca_path, threshold

X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
Y = (16 * X ** 5 - 20 * X ** 3 + 5 * X).squeeze(1)  # T_5, the Chebyshev polynomial


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def toy() -> nn.Module:
    """1 -> 100 tanh -> 1, no output bias; N(0, 1) input weights, N(0, 1e-4) output weights."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 100), nn.Tanh(), nn.Linear(100, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(100, 1, generator=g, dtype=torch.float64))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.randn(1, 100, generator=g, dtype=torch.float64) / 100)
    return net


def gd(lr: float, steps: int, every: int) -> tuple[nn.Module, list[Snapshot]]:
    """Full-batch gradient descent; a snapshot every ``every`` steps, recording the step size as SGD's lr."""
    net = toy()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    info = {"name": "SGD", "hyperparameters": {"lr": lr, "momentum": 0.0}}
    snaps = []
    for step in range(steps + 1):
        if step % every == 0:
            snaps.append(Snapshot(f"s{step}", step, {n: p.detach().clone() for n, p in net.named_parameters()}, {},
                                  optimizer=info))
        opt.zero_grad()
        half_mse(net(X), Y).backward()
        opt.step()
    return net, snaps


def run(lr: float, steps: int, every: int, tol: float = 1e-8):
    net, snaps = gd(lr, steps, every)

    def problem_for(s: Snapshot) -> Problem:
        m = copy.deepcopy(net)
        m.load_state_dict(s.params)
        return Problem(m, X, Y, half_mse)

    return analyze_trajectory(problem_for, snaps, plane_steps=5, tol=tol)


def test_edge_of_stability():
    lr = 0.098  # 2/lr = 20.4, just under the initial sharpness 21.7: GD sharpens up to 2/lr and hovers there
    res = run(lr, steps=2000, every=50)
    assert res.threshold[0] == pytest.approx(2 / lr)
    ratio = res.sharpness * lr / 2
    late = ratio[len(ratio) // 2:]
    assert 0.9 <= float(np.median(late)) <= 1.1, ratio
    assert res.edge_of_stability[len(ratio) // 2:].mean() > 0.5


def test_small_step_sharpens_monotonically():
    res = run(0.01, steps=2000, every=500)
    assert np.all(np.diff(res.sharpness) > 0), res.sharpness  # progressive sharpening, far below 2/lr = 200
    assert not res.edge_of_stability.any()
    assert np.all(np.diff(res.distance) > 0) and res.distance[0] == 0.0


def test_pca_matches_a_direct_svd():
    _, snaps = gd(0.05, steps=300, every=30)
    names = list(snaps[-1].params)
    flat = np.stack([np.concatenate([s.params[n].reshape(-1).numpy() for n in names]) for s in snaps])
    M = flat - flat[-1]
    U, S, Vt = np.linalg.svd(M - M.mean(axis=0), full_matrices=False)
    pca = pca_path(snaps, names)
    np.testing.assert_allclose(pca.explained_variance, S ** 2 / np.sum(S ** 2), rtol=1e-10)
    for k in range(2):
        sign = np.sign(Vt[k] @ np.concatenate([pca.directions[k][n].reshape(-1).numpy() for n in names]))
        np.testing.assert_allclose(pca.coords[:, k], sign * M @ Vt[k], rtol=1e-9, atol=1e-12)
    assert np.allclose(pca.coords[-1], 0.0)  # the final checkpoint is the origin


def test_thresholds():
    assert threshold({"name": "SGD", "hyperparameters": {"lr": 0.1, "momentum": 0.9}}) == (pytest.approx(38.0),
                                                                                          "hessian")
    t, kind = threshold({"name": "Adam", "hyperparameters": {"lr": 0.001, "betas": [0.9, 0.999]}})
    assert t == pytest.approx(38000.0) and kind == "preconditioned"
    assert math.isnan(threshold(None)[0])


def test_trajectory_command(tmp_path):
    import json

    import h5py

    from conftest import EXAMPLES, cli

    files = [str(EXAMPLES / f"mlp_adam_s{s:04d}.pt") for s in (2000, 0, 500, 100)]  # out of order on purpose
    r = cli("trajectory", *files, "--max-samples", "200", "--plane-steps", "5", "-o", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [c["step"] for c in out["checkpoints"]] == [0, 100, 500, 2000]  # ordered by recorded step
    with h5py.File(tmp_path / "trajectory.h5") as f:
        g = f["trajectory"]
        for k in ("step", "lr", "sharpness", "threshold", "distance", "pca/explained_variance", "pca/coords"):
            assert k in g, k
        assert g["pca/coords"].shape == (4, 2) and np.allclose(g["pca/coords"][-1], 0)
        kinds = [k.decode() for k in g["sharpness_kind"][()]]
        assert kinds[1:] == ["preconditioned"] * 3  # Adam's state is in the checkpoints after step 0
        assert g["threshold"][1] == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-3))
        assert g["plane/loss"].shape == (5, 5) and f.attrs["kind"] == "trajectory"
    assert {p.stem for p in (tmp_path / "figures").iterdir()} == {"trajectory_plane", "trajectory_sharpness",
                                                                 "trajectory_distance"}
    default = cli("trajectory", files[2], files[1], "--max-samples", "100", "--plane-steps", "3", "--no-report",
                  "--json", cwd=tmp_path)  # named after the final checkpoint by step, not the last file given
    assert json.loads(default.stdout)["trajectory_file"] == "reports/trajectory_mlp_adam_s0500/trajectory.h5"
    bad = cli("trajectory", files[0], "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and "at least two" in bad.stderr
    mixed = cli("trajectory", files[0], str(EXAMPLES / "cnn_adam_s0000.pt"), "-o", str(tmp_path / "y"))
    assert mixed.returncode == 2 and "another architecture" in mixed.stderr


def test_no_threshold_for_parameter_groups_that_differ():
    sgd = {"name": "SGD", "hyperparameters": {"lr": 0.1, "momentum": 0.9}}
    same = {**sgd, "param_groups": [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0}]}
    assert threshold(same) == (pytest.approx(38.0), "hessian")
    for other in ({"lr": 0.01, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.0}):
        t, kind = threshold({**sgd, "param_groups": [{"lr": 0.1, "momentum": 0.9}, other]})
        assert math.isnan(t) and kind == "hessian"
    adam = {"name": "Adam", "hyperparameters": {"lr": 1e-3, "betas": [0.9, 0.999]},
            "param_groups": [{"lr": 1e-3, "betas": [0.9, 0.999]}, {"lr": 1e-4, "betas": [0.9, 0.999]}]}
    t, kind = threshold(adam)
    assert math.isnan(t) and kind == "preconditioned"
