import pytest
import torch

from conftest import relu_mlp
from landscape.analyses.directions import difference_direction, dot, filter_norms, normalize_direction, random_directions
from landscape.errors import LandscapeError


def params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def test_filter_norms_equal_weight_filter_norms():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Flatten(),
                              torch.nn.Linear(5 * 4 * 4, 7)).double()
    theta = params(net)
    (d,) = random_directions(theta, 1, seed=3)
    for name, w in theta.items():
        if w.ndim <= 1:
            assert torch.count_nonzero(d[name]) == 0, name  # biases and BN ignored
        else:
            torch.testing.assert_close(filter_norms(d[name]), filter_norms(w), rtol=1e-9, atol=0)


def test_layer_norm_and_ignore_none():
    theta = params(relu_mlp())
    (d,) = random_directions(theta, 1, seed=0, norm="layer", ignore="none")
    for name, w in theta.items():
        assert d[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-9)
    (f,) = random_directions(theta, 1, seed=0, norm="filter", ignore="none")
    bias = "0.bias"
    torch.testing.assert_close(f[bias].abs(), theta[bias].abs(), rtol=1e-7, atol=1e-9)


def test_seeded_reproducible_and_independent_of_ignore_policy():
    theta = params(relu_mlp())
    a = random_directions(theta, 2, seed=5)
    b = random_directions(theta, 2, seed=5)
    c = random_directions(theta, 2, seed=6)
    n = random_directions(theta, 2, seed=5, ignore="none")
    assert all(torch.equal(a[k][n_], b[k][n_]) for k in range(2) for n_ in theta)
    assert not torch.equal(a[0]["0.weight"], c[0]["0.weight"])
    assert torch.equal(a[1]["2.weight"], n[1]["2.weight"])  # the ignore policy does not shift the stream


def test_orthogonalize():
    theta = params(relu_mlp((10, 30, 4)))
    d1, d2 = random_directions(theta, 2, seed=0, orthogonalize=True)
    assert abs(dot(d1, d2)) < 1e-10 * dot(d1, d1)


def test_difference_direction_and_errors():
    a, b = params(relu_mlp(seed=0)), params(relu_mlp(seed=1))
    d = difference_direction(a, b)
    assert all(torch.allclose(a[n] + d[n], b[n]) for n in a)
    with pytest.raises(LandscapeError, match="different parameters"):
        difference_direction(a, params(relu_mlp((4, 8, 8, 3))))
    with pytest.raises(LandscapeError, match="normalization"):
        normalize_direction(a, a, norm="bogus")
