import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blobs, relu_mlp
from landscape import Problem
from landscape.analyses.directions import random_directions
from landscape.analyses.slices import axis, compute_slice, grid_coefficients, missing_blocks


def slice_of(net, X, y, norm, axes=(axis(-1, 1, 7), axis(-1, 1, 5))):
    pb = Problem(net, X, y, F.cross_entropy, strategy="inplace")
    dirs = random_directions(pb.theta0, 2, seed=11, norm=norm)
    return compute_slice(pb, dirs, axes)["loss"]


def test_rescaling_invariance_of_filter_normalized_slice():
    """Dinh et al.: W1 -> a W1, b1 -> a b1, W2 -> W2 / a computes the same ReLU function."""
    X, y = blobs(60)
    base = relu_mlp()
    alpha = 10.0
    scaled = relu_mlp()
    with torch.no_grad():
        scaled[0].weight.mul_(alpha)
        scaled[0].bias.mul_(alpha)
        scaled[2].weight.div_(alpha)
    torch.testing.assert_close(base(X), scaled(X), rtol=1e-12, atol=1e-12)
    a, b = slice_of(base, X, y, "filter"), slice_of(scaled, X, y, "filter")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    u, v = slice_of(base, X, y, "none"), slice_of(scaled, X, y, "none")
    assert np.max(np.abs(u - v)) > 1e-2  # an unnormalized slice changes


def test_non_square_grid_orientation_and_origin():
    net, (X, y) = relu_mlp(), blobs(30)
    pb = Problem(net, X, y, F.cross_entropy)
    d1, d2 = random_directions(pb.theta0, 2, seed=0)
    xs, ys = axis(-1, 1, 5), axis(-0.5, 0.5, 3)
    res = compute_slice(pb, [d1, d2], (xs, ys))
    assert res["loss"].shape == (5, 3)
    i, j = 4, 0  # loss[i, j] is the value at (x[i], y[j])
    moved = {n: pb.theta0[n] + xs[i] * d1[n] + ys[j] * d2[n] for n in pb.names}
    direct = F.cross_entropy(torch.func.functional_call(net, moved, (X,)), y).item()
    assert res["loss"][i, j] == pytest.approx(direct, rel=1e-12)
    assert res["loss"][2, 1] == pytest.approx(F.cross_entropy(net(X), y).item(), rel=1e-12)


def test_nonfinite_values_recorded_not_raised():
    net, (X, y) = relu_mlp(), blobs(20)

    def fragile(out, t):  # NaN once the logits grow: log of a negative number
        return torch.log(1.5 - out.abs().mean())

    pb = Problem(net, X, y, fragile)
    (d,) = random_directions(pb.theta0, 1, seed=0, norm="none")
    loss = compute_slice(pb, [d], (axis(-50, 50, 11),))["loss"]
    assert np.isnan(loss).any() and np.isfinite(loss).any()


def test_grid_blocks_and_coefficients():
    c = grid_coefficients((np.array([0.0, 1.0]), np.array([5.0, 6.0, 7.0])))
    assert c.tolist() == [[0, 5], [0, 6], [0, 7], [1, 5], [1, 6], [1, 7]]
    done = np.array([True, True, False, True, True, True, False])
    assert [b.tolist() for b in missing_blocks(done, 2)] == [[2, 3], [6]]
