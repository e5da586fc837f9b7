"""In-place evaluation on replicas (landscape.problem.replica) and the output layer written into the stack
(landscape.problem.outputlayer): the same values as the plain path, wherever the model's shape allows the shortcut and
nowhere else; blocks shared out over threads give the values of one block at a time."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import blobs, cli
from landscape import Problem
from landscape.analyses.directions import random_directions
from landscape.errors import LandscapeError
from landscape.analyses.slices import axis, compute_slice
from landscape.problem.points import PointEvaluator

COEFFS = np.array([[0.0, 0.0], [0.3, -0.2], [-1.0, 1.0], [0.0, 0.7], [0.5, 0.0], [0.2, 0.9], [-0.4, -0.6]])


class Scaled(nn.Module):
    """The output layer's result is post-processed: a new tensor, so the layer is not the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x)) * 2.0


class InPlaceScaled(Scaled):
    """The output layer's result is changed in place: still that tensor, so it is routed, and the change is kept."""

    def forward(self, x):
        return self.head(self.body(x)).mul_(2.0)


class Twice(Scaled):
    """The same Linear called twice: no single output call, not routed."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.head(self.body(x))))


class Sub(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 1.0


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), "2"),
    "no-bias": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False)), "2"),
    "post-processed": (Scaled, ""),
    "changed-in-place": (InPlaceScaled, "head"),
    "called-twice": (Twice, ""),
    "subclass": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Sub(8, 3)), ""),
}


def problem(net, X, y, loss=F.cross_entropy, **kw):
    return Problem(net, X, y, loss, strategy="inplace", batch_size=16, **kw)


@pytest.mark.parametrize("name", MODELS)
def test_output_layer_route_gives_the_plain_values_where_it_applies(name):
    make, routed = MODELS[name]
    torch.manual_seed(1)
    net = make().double()
    X, y = blobs(37)
    on, off = problem(net, X, y), problem(net, X, y, direct_output=False)
    dirs = random_directions(on.theta0, 2, seed=3, ignore="none")
    a, b = on.evaluate_points(COEFFS, dirs), off.evaluate_points(COEFFS, dirs)
    assert on.direct_output_layer == routed and off.direct_output_layer == ""
    for k in ("loss", "accuracy"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=0, err_msg=k)
    # the plain forward of the user's model at a point agrees too (the slot holds what the model returned)
    point = {n: t + 0.3 * d1 - 0.2 * d2 for (n, t), d1, d2 in
             zip(on.theta0.items(), dirs[0].values(), dirs[1].values())}
    direct = F.cross_entropy(torch.func.functional_call(net, point, (X,)), y).item()
    assert a["loss"][1] == pytest.approx(direct, rel=1e-12)
    for m in on._model.modules():
        assert "forward" not in vars(m)  # every forward restored


def test_output_layer_is_not_used_for_losses_that_reduce_row_major():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    X, _ = blobs(30)
    t = torch.randn(30, 2, dtype=torch.float64)
    on, off = problem(net, X, t, F.mse_loss), problem(net, X, t, F.mse_loss, direct_output=False)
    dirs = random_directions(on.theta0, 2, seed=0)
    np.testing.assert_allclose(on.evaluate_points(COEFFS, dirs)["loss"], off.evaluate_points(COEFFS, dirs)["loss"],
                               rtol=1e-12)
    stacks = on.points._replicas[0]._stacks
    assert stacks and all(b.shape[-1] == 2 for b in stacks.values())  # (K, n, 2)


def bn_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("bn", ["frozen", "recompute"])
def test_blocks_on_concurrent_replicas_equal_one_block_at_a_time(bn):
    X, y = blobs(50)
    one = problem(bn_net(), X, y, bn=bn, workers=1)
    two = problem(bn_net(), X, y, bn=bn, workers=3)
    one.block = two.block = 2
    dirs = random_directions(one.theta0, 2, seed=5)
    threads = torch.get_num_threads()
    a, b = one.evaluate_points(COEFFS, dirs), two.evaluate_points(COEFFS, dirs)
    assert torch.get_num_threads() == threads  # the caller's setting is back
    assert len(two.points._replicas) == 3 and two.workers == 3
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-12, err_msg=k)
    # a block's values do not depend on how the blocks are grouped or which replica takes them
    blocks = [COEFFS[i:i + 2] for i in range(0, len(COEFFS), 2)]
    alone = [two.evaluate_blocks([blk], dirs)[0]["loss"] for blk in blocks]
    grouped = [v["loss"] for v in two.evaluate_blocks(blocks[::-1], dirs)][::-1]
    for x, z, w in zip(alone, grouped, np.split(b["loss"], [2, 4, 6])):
        assert x.tobytes() == z.tobytes() == w.tobytes()


def held_by_input_layers(pb):
    """Bytes the input layers' cached outputs and partial sums hold over all of ``pb``'s replicas (storages counted
    once)."""
    storages = {}
    for r in pb.points._replicas:
        held = [Z for Z, _ in r.inputs.cache.entries.values()] + [part for _, part in r.inputs._partial.values()]
        storages.update((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in held)
    return sum(storages.values())


def test_replicas_share_one_cache_of_input_layer_outputs_within_the_budget():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3)).double()
    X, y = blobs(40)
    dirs = random_directions(problem(net, X, y).theta0, 2, seed=3, ignore="none")
    plain = problem(net, X, y, linear_inputs=False).evaluate_points(COEFFS, dirs)["loss"]
    # Z_0, Z_1, Z_2 of the first layer over 40 samples (3 * 20,480 bytes) and one partial sum per replica, in the
    # half of the budget that a block's stacked outputs leave
    for budget, workers, routed in [(164_000, 1, ["0"]), (164_000, 3, []), (246_000, 3, ["0"])]:
        pb = problem(net, X, y, workers=workers, memory_budget=budget)
        pb.block = 2
        loss = pb.evaluate_points(COEFFS, dirs)["loss"]
        assert len(pb.points._replicas) == workers and pb.linear_input_layers == routed
        assert all(r.inputs.cache is pb.points._replicas[0].inputs.cache for r in pb.points._replicas)
        assert 0 < held_by_input_layers(pb) <= budget / 2 if routed else held_by_input_layers(pb) == 0
        np.testing.assert_allclose(loss, plain, rtol=1e-12)


def test_an_error_on_a_replica_reaches_the_caller():
    X, y = blobs(20)
    pb = problem(bn_net(), X, y, workers=2)
    pb.block = 2
    dirs = random_directions(pb.theta0, 2, seed=0)
    pb.evaluate_points(COEFFS, dirs)

    def boom(m, args, out):
        raise RuntimeError("replica failed")

    pb.points._replicas[1].model[3].register_forward_hook(boom)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="replica failed"):
        pb.evaluate_points(COEFFS, dirs)
    assert torch.get_num_threads() == threads
    for r in pb.points._replicas:
        assert all("forward" not in vars(m) for m in r.model.modules())


def test_workers_are_chosen_only_where_they_can_run():
    X, y = blobs(40)
    net = bn_net()
    with pytest.raises(LandscapeError, match="workers"):
        problem(net, X, y, workers=0)
    pb = problem(net, X, y)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pb.choose_strategy()
        assert pb.workers == 1 and not any(k.startswith("inplace x") for k in pb.strategy_timings)
        torch.set_num_threads(2)
        pb.choose_strategy()
        t = pb.strategy_timings
        one, two = t[f"inplace x1 ({pb.block})"], t[f"inplace x2 ({pb.block})"]  # both at the real block size
        assert pb.workers == (2 if two < 0.95 * one else 1)  # kept only when measured 5% faster
        tiny = problem(net, X, y, memory_budget=1000.0)  # copies would take more than 1/8 of the budget
        tiny.choose_strategy()
        assert tiny.workers == 1 and not any(k.startswith("inplace x") for k in tiny.strategy_timings)
    finally:
        torch.set_num_threads(threads)
    fixed = problem(net, X, y, workers=2)
    fixed.choose_strategy()
    assert fixed.workers == 2
    vm = Problem(net, X, y, F.cross_entropy, strategy="vmap", workers=2)
    vm.choose_strategy()
    assert vm.workers == 1  # replicas are an in-place strategy


@pytest.mark.parametrize("slower", [1, 2])
def test_blocks_timed_for_the_workers_choice_are_kept_with_the_values_of_a_plain_run(monkeypatch, slower):
    """The workers comparison runs on the slice's first blocks; those evaluated with the setting that was kept are
    journaled as they are, and equal what that setting gives them in a slice computed without any timing."""
    X, y = blobs(64)
    net = bn_net()
    dirs = random_directions(dict(net.named_parameters()), 2, seed=3)
    axes = (axis(-1, 1, 20), axis(-1, 1, 16))  # 320 points: 40 blocks of 8, ten times the 4 on replicas
    threads = torch.get_num_threads()
    plain = PointEvaluator.evaluate_blocks

    def lagging(self, blocks, directions, **kw):  # the setting that should lose sleeps
        calls.append(self.workers)
        if self.workers == slower:  # 0.2 s, many blocks' time: 0.05 s lost to a CI whose load slowed the replicas more
            time.sleep(0.2)
        return plain(self, blocks, directions, **kw)

    calls = []

    seen = []
    try:
        torch.set_num_threads(2)
        small = problem(net, X, y, max_block=8)
        compute_slice(small, dirs, (axis(-1, 1, 16), axis(-1, 1, 13)))  # 26 blocks: too few for the timing
        assert small.workers == 1 and not any(k.startswith("inplace x") for k in small.strategy_timings)
        auto = problem(net, X, y, max_block=8)
        monkeypatch.setattr(PointEvaluator, "evaluate_blocks", lagging)
        got = compute_slice(auto, dirs, axes, on_block=lambda idx, vals: seen.append(int(idx[0])))
        monkeypatch.setattr(PointEvaluator, "evaluate_blocks", plain)
        assert auto.workers == 3 - slower and auto.block == 8
        # block 0 on all threads, then 1-4 on two replicas (their first round a warm-up, enough when 2x slower):
        # the winner's are journaled first
        assert calls[:3] == ([1, 2, 2] if slower == 1 else [1, 2, 1])
        assert seen[:4 if slower == 1 else 1] == ([8, 16, 24, 32] if slower == 1 else [0])
        assert sorted(seen) == list(range(0, 320, 8))
        fixed = problem(net, X, y, max_block=8, workers=auto.workers)
        fixed.choose_strategy()
        want = compute_slice(fixed, dirs, axes, block=8)
    finally:
        torch.set_num_threads(threads)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_cli_rejects_a_bad_workers_value(mlp_ckpt):
    res = cli("scan", str(mlp_ckpt), "--workers", "two", "--dry-run")
    assert res.returncode == 2 and "--workers" in res.stderr and "Traceback" not in res.stderr
