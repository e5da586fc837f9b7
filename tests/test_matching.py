"""Weight matching and connectivity against exact answers: permuted copies, barrier(θ, θ) = 0, convex barriers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import blobs, relu_mlp
from landscape.analyses.connectivity import barrier, bezier_path, difference, fit_bezier, linear_path
from landscape.errors import LandscapeError
from landscape.analyses.matching import apply_permutation, permutation_spec, weight_matching
from landscape.problem import Problem
from landscape_data.models import SmallCNN

F = nn.functional


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    net = SmallCNN(channels=4).double()
    for m in net.modules():  # non-trivial BatchNorm parameters and statistics, so a wrong permutation shows
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


CASES = {
    "mlp": (lambda: relu_mlp((4, 16, 12, 3)).eval(), lambda g: torch.randn(32, 4, generator=g, dtype=torch.float64)),
    "cnn": (_cnn, lambda g: torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_permuted_copy_is_recovered_exactly(case):
    make, inputs = CASES[case]
    net = make()
    x = inputs(torch.Generator().manual_seed(1))
    spec = permutation_spec(net, x)
    rng = np.random.default_rng(7)
    perms = {g.name: rng.permutation(g.size) for g in spec.groups}
    assert all(not np.array_equal(p, np.arange(len(p))) for p in perms.values())
    twin = copy.deepcopy(net)
    twin.load_state_dict(apply_permutation(spec, net.state_dict(), perms))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-12)  # same function
    assert any(not torch.equal(twin.state_dict()[k], net.state_dict()[k]) for k in net.state_dict())
    found = weight_matching(spec, net.state_dict(), twin.state_dict())
    for name, p in perms.items():
        assert np.array_equal(p[found[name]], np.arange(len(p)))  # the inverse permutation, exactly
    aligned = apply_permutation(spec, twin.state_dict(), found)
    assert all(torch.equal(aligned[k], v) for k, v in net.state_dict().items())
    # barriers: the permuted copy sits in another basin; aligned, the path is the point itself
    y = net(x).argmax(1).detach()
    pb = Problem(net, x, y, F.cross_entropy)
    alpha = np.linspace(-0.5, 1.5, 21)
    before = linear_path(pb, dict(twin.named_parameters()), alpha)
    theta_b = {n: aligned[n] for n, _ in net.named_parameters()}
    after = linear_path(pb, theta_b, alpha)
    assert after.loss_barrier == pytest.approx(0.0, abs=1e-12) and after.error_barrier == 0.0
    assert before.loss_barrier > 1e-3


def test_barrier_of_a_point_with_itself_is_zero():
    net = relu_mlp((4, 8, 3))
    X, y = blobs()
    pb = Problem(net, X, y, F.cross_entropy)
    p = linear_path(pb, pb.theta0, np.linspace(-0.5, 1.5, 11))
    assert p.loss_barrier == 0.0 and p.error_barrier == 0.0
    assert np.all(p.loss == p.loss[0])


def test_convex_loss_has_no_barrier():
    X, y = blobs(n=60)
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()  # logistic regression: convex in the weights
    with torch.no_grad():
        b.weight.mul_(5.0)
    pb = Problem(a, X, y, F.cross_entropy)
    p = linear_path(pb, dict(b.named_parameters()), np.linspace(0, 1, 41))
    assert p.loss_barrier <= 1e-12
    assert barrier(np.array([0.0, 0.5, 1.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(1.5)


def test_bezier_through_the_midpoint_is_the_line():
    X, y = blobs()
    a, b = relu_mlp((4, 8, 3), seed=0), relu_mlp((4, 8, 3), seed=1)
    pb = Problem(a, X, y, F.cross_entropy)
    theta_b = dict(b.named_parameters())
    t = np.linspace(0, 1, 11)
    mid = {n: (pb.theta0[n] + theta_b[n]) / 2 for n in pb.theta0}
    np.testing.assert_allclose(bezier_path(pb, theta_b, mid, t).loss, linear_path(pb, theta_b, t).loss, rtol=1e-12)
    before = {n: v.clone() for n, v in pb.theta0.items()}
    bend = fit_bezier(pb, theta_b, steps=150, batch=40)
    assert bezier_path(pb, theta_b, bend, t).loss.mean() < linear_path(pb, theta_b, t).loss.mean()
    assert all(torch.equal(v, before[n]) for n, v in pb.theta0.items())  # fitting leaves the end points alone
    assert all(torch.equal(difference(pb.theta0, theta_b)[n], theta_b[n] - pb.theta0[n]) for n in before)


def test_unsupported_architecture_is_refused():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(h + torch.relu(self.b(h)))  # a skip connection ties the two permutations

    with pytest.raises(LandscapeError, match="does not support"):
        permutation_spec(Residual(), torch.randn(8, 4))
    with pytest.raises(LandscapeError, match="LayerNorm"):
        permutation_spec(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
