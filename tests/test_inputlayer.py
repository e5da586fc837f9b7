"""Layers that read the raw inputs are evaluated by linearity (landscape.problem.inputlayer): the same values as moving
their weights, only for the layers where that is exact, and the model's own forward restored afterwards."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import blobs
from landscape import Problem
from landscape.analyses.directions import random_directions

COEFFS = np.array([[0.0, 0.0], [0.3, -0.2], [-1.0, 1.0], [0.0, 0.7], [0.5, 0.0]])


def both(net, X, y, coeffs=COEFFS, loss=F.cross_entropy, **kw):
    """Slice points with the input layers by linearity and by moving the weights, and the linear Problem."""
    on = Problem(net, X, y, loss, strategy="inplace", batch_size=16, **kw)
    off = Problem(net, X, y, loss, strategy="inplace", batch_size=16, linear_inputs=False, **kw)
    dirs = random_directions(on.theta0, coeffs.shape[1], seed=3, ignore="none")
    return on.evaluate_points(coeffs, dirs), off.evaluate_points(coeffs, dirs), on


def images(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


MODELS = {
    "flatten-linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(72, 9), nn.ReLU(), nn.Linear(9, 3)), ["1"]),
    "conv2d-bn": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                        nn.Flatten(), nn.Linear(144, 3)), ["0"]),
    "conv2d-circular-nobias": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular",
                                                               bias=False), nn.ReLU(), nn.Flatten(),
                                                     nn.Linear(108, 3)), ["0"]),
    "conv1d": (lambda: nn.Sequential(nn.Flatten(2), nn.Conv1d(2, 3, 5, stride=2), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(48, 3)), ["1"]),
}


@pytest.mark.parametrize("name", MODELS)
def test_linearity_matches_moving_the_weights(name):
    make, layers = MODELS[name]
    torch.manual_seed(0)
    net = make().double()
    X, y = images()  # three chunks of 16, 16 and 5
    a, b, pb = both(net, X, y)
    assert pb.linear_input_layers == layers
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    np.testing.assert_array_equal(a["accuracy"], b["accuracy"])
    assert a["loss"][0] == pb.evaluate().loss  # at the origin: the layer's own output, the same bits


def test_float32_origin_is_the_same_bits_and_points_agree_to_rounding():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    X, y = blobs(50)
    a, b, pb = both(net, X.float(), y)
    assert pb.linear_input_layers == ["0"]
    assert a["loss"][0] == b["loss"][0] == pb.evaluate().loss
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


class Scaled(nn.Module):
    """A parameter touches the inputs before the first layer: that layer must not be routed."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x * self.scale)


class TwiceCalled(nn.Module):
    """The same layer on the raw inputs and on a transformed copy; a weight tied to a later layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x) + self.a(x.flip(1))) + self.b(x).relu())


class Custom(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("make,routed", [(Scaled, []), (TwiceCalled, ["a", "b"]),
                                         (lambda: nn.Sequential(Custom(4, 5), nn.ReLU(), nn.Linear(5, 3)), [])])
def test_only_exact_raw_input_layers_are_routed(make, routed):
    torch.manual_seed(2)
    net = make().double()
    X, y = blobs(40)
    a, b, pb = both(net, X, y)
    assert pb.linear_input_layers == routed
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    if not routed:  # nothing routed: the very same computation
        np.testing.assert_array_equal(a["loss"], b["loss"])


def test_over_budget_layers_are_left_alone():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3)).double()
    X, y = blobs(40)
    # Z_0, Z_1, Z_2 of the first layer and one partial sum: 4 * 40 * 64 * 8 bytes = 81,920, in the half of the
    # budget that a block's stacked outputs leave (one replica: each holds a partial sum, test_replica.py)
    a, b, pb = both(net, X, y, memory_budget=162_000, workers=1)
    assert pb.linear_input_layers == []
    np.testing.assert_array_equal(a["loss"], b["loss"])
    a, b, pb = both(net, X, y, memory_budget=164_000, workers=1)
    assert pb.linear_input_layers == ["0"]


def test_bn_recompute_and_edited_directions():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    X, y = blobs(40)
    a, b, pb = both(net, X, y, bn="recompute", bn_batches=2, bn_batch_size=16)
    assert pb.linear_input_layers == ["0"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    # directions edited in place after a first use: the cached outputs are recomputed
    dirs = [pb.as_list(d) for d in random_directions(pb.theta0, 2, seed=5, ignore="none")]
    pb.evaluate_points(COEFFS, dirs)
    dirs[0][0].mul_(3.0)
    off = Problem(net, X, y, F.cross_entropy, strategy="inplace", batch_size=16, linear_inputs=False,
                  bn="recompute", bn_batches=2, bn_batch_size=16)
    np.testing.assert_allclose(pb.evaluate_points(COEFFS, dirs)["loss"], off.evaluate_points(COEFFS, dirs)["loss"],
                               rtol=1e-12)


def test_own_forward_restored_also_after_an_error():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X, y = blobs(20)

    def bad(out, t):
        raise RuntimeError("boom")

    for loss in (F.cross_entropy, bad):
        pb = Problem(net, X, y, loss, strategy="inplace")
        dirs = random_directions(pb.theta0, 2, seed=0)
        try:
            pb.evaluate_points(COEFFS, dirs)
        except RuntimeError:
            assert loss is bad
        for private, mine in zip(pb._model, net):
            assert "forward" not in vars(private) and "forward" not in vars(mine)



def test_layers_never_called_on_the_inputs_are_not_wrapped_after_a_first_pass():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    X, y = blobs(20)
    pb = Problem(net, X, y, F.cross_entropy, strategy="inplace", direct_output=False)
    pb.block = 8  # no strategy timing first: the first evaluation is the first pass
    seen: dict[int, list[bool]] = {0: [], 2: []}  # per call: was the layer's forward swapped?
    for i in seen:
        pb._model[i].register_forward_hook(lambda m, a, o, i=i: seen[i].append("forward" in vars(m)))
    dirs = random_directions(pb.theta0, 2, seed=0)
    first = pb.evaluate_points(COEFFS, dirs)
    calls = len(COEFFS)
    assert seen[0] == [True] * calls and seen[2] == [True] * calls
    again = pb.evaluate_points(COEFFS, dirs)
    assert seen[0][calls:] == [True] * calls and seen[2][calls:] == [False] * calls
    np.testing.assert_array_equal(first["loss"], again["loss"])
