import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blobs, flat_loss, relu_mlp
from landscape import Problem
from landscape.analyses.directions import random_directions
from landscape.problem.products import pick_engine


def flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def dense_hessian(model, X, y):
    f, theta = flat_loss(model, X, y)
    return torch.autograd.functional.hessian(f, theta), torch.autograd.functional.jacobian(f, theta)


def test_loss_gradient_hvp_exact_and_chunk_invariant():
    net, (X, y) = relu_mlp(), blobs(37)
    H, G = dense_hessian(net, X, y)
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    names = list(v)
    for bs in (37, 10, 7):  # one chunk, uneven chunks
        pb = Problem(net, X, y, F.cross_entropy, batch_size=bs)
        loss, g = pb.loss_and_gradient()
        assert loss == pytest.approx(F.cross_entropy(net(X), y).item(), rel=1e-12)
        torch.testing.assert_close(flat(g, names), G, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(flat(pb.hvp(v), names), H @ flat(v, names), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["graph", "forward-over-reverse", "reverse-over-reverse", "auto"])
def test_every_hvp_engine_matches_the_dense_hessian(mode):
    net, (X, y) = relu_mlp(), blobs(41)
    H, _ = dense_hessian(net, X, y)
    pb = Problem(net, X, y, F.cross_entropy, batch_size=15, hvp_mode=mode)  # three uneven chunks
    names = pb.names
    for seed in range(3):
        v = {n: torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
             for n, p in net.named_parameters()}
        torch.testing.assert_close(flat(pb.hvp(v), names), H @ flat(v, names), rtol=1e-10, atol=1e-12)
    assert pb.hvp_engine in ("graph", "forward-over-reverse", "reverse-over-reverse")
    assert mode == "auto" or pb.hvp_engine == mode


@pytest.mark.parametrize("mode", ["graph", "forward-over-reverse", "reverse-over-reverse"])
def test_every_hvp_engine_gives_zeros_for_parameters_the_loss_does_not_use(mode):
    """Real models carry parameters a forward pass may not touch (DINOv2's mask token, a pooler): their rows and
    columns of the Hessian are zero, and the used block is the model's without them, whatever the engine."""
    class WithUnused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = relu_mlp()
            self.mask_token = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))

        def forward(self, x):
            return self.net(x)

    model, (X, y) = WithUnused(), blobs(41)
    H, _ = dense_hessian(model.net, X, y)
    pb = Problem(model, X, y, F.cross_entropy, batch_size=15, hvp_mode=mode)
    v = {n: torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
         for n, p in model.named_parameters()}
    hv = pb.hvp(v)
    used = [n for n in pb.names if n != "mask_token"]
    torch.testing.assert_close(flat(hv, used), H @ flat(v, used), rtol=1e-10, atol=1e-12)
    assert torch.equal(hv["mask_token"], torch.zeros(5, dtype=torch.float64)) and pb.hvp_engine == mode


def test_the_graph_engine_of_a_loss_linear_in_its_parameters_is_zero():
    """Every gradient is then a constant with no graph to differentiate again: the product is zero, as torch.func's."""
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)
    model = torch.nn.Linear(3, 1, bias=False).double()
    for mode in ("graph", "reverse-over-reverse"):
        pb = Problem(model, X, y, lambda out, t: (out[:, 0] - t).mean(), hvp_mode=mode)
        assert torch.equal(pb.hvp({"weight": torch.ones(1, 3, dtype=torch.float64)})["weight"],
                           torch.zeros(1, 3, dtype=torch.float64))


def test_graph_bytes_are_the_leaves_gradient_and_per_sample_activations():
    """What the graph engine holds grows by the same bytes with every sample (the tensors autograd saved for a
    sample: at least the hidden layer's activations) above a constant of about the leaves and the gradient."""
    net, width = relu_mlp((4, 256, 3)), 256
    held = {}
    for n in (20, 40, 80):
        X, y = blobs(n)
        pb = Problem(net, X, y, F.cross_entropy, hvp_mode="graph")
        pb.hvp({k: torch.ones_like(t) for k, t in pb.theta0.items()})
        assert pb.products.held_bytes == pb.products.graph_bytes > 0
        held[n] = pb.products.graph_bytes
    per_sample = (held[40] - held[20]) / 20
    assert (held[80] - held[40]) / 40 == pytest.approx(per_sample, rel=0.05)
    assert per_sample >= width * 8  # at least the hidden activations (float64)
    assert 2 * pb.parameter_bytes <= held[20] - 20 * per_sample <= 3 * pb.parameter_bytes


def test_auto_keeps_the_graph_only_when_it_fits_half_the_budget():
    net, (X, y) = relu_mlp((4, 64, 3)), blobs(45)
    H, _ = dense_hessian(net, X, y)
    v = {n: torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
         for n, p in net.named_parameters()}
    graph = Problem(net, X, y, F.cross_entropy, batch_size=15, hvp_mode="graph")  # three chunks
    graph.hvp(v)
    size = graph.products.graph_bytes
    for budget, kept in ((1.2 * size, False), (4 * size, True)):
        pb = Problem(net, X, y, F.cross_entropy, batch_size=15, memory_budget=budget)
        torch.testing.assert_close(flat(pb.hvp(v), pb.names), H @ flat(v, pb.names), rtol=1e-10, atol=1e-12)
        # refused after its first chunk, from that chunk's bytes times three: about the whole graph's
        assert pb.products.graph_bytes == pytest.approx(size, rel=0.1)
        assert (pb.hvp_timings is not None and "graph" in pb.hvp_timings) == kept
        # (each build's count may differ by a few bytes: a storage freed while it is built can free its address)
        assert pb.products.held_bytes == (pb.products.graph_bytes if pb.hvp_engine == "graph" else 0)
        assert pb.budget_left() == budget - pb.products.held_bytes
    settled = Problem(net, X, y, F.cross_entropy, batch_size=15, memory_budget=4 * size)
    assert settled.hvp_mode == "auto"
    settled.settle_hvp()
    timings, footprints = settled.hvp_timings, settled.products.footprints
    assert set(timings) == set(footprints) == {"graph", "forward-over-reverse", "reverse-over-reverse"}
    assert footprints["graph"] >= size  # the graph it keeps and what a product adds
    costs = {e: (timings[e], footprints[e]) for e in timings}
    assert settled.hvp_engine == pick_engine(costs, 4 * size)


def test_forward_over_reverse_does_not_give_each_parameter_view_a_whole_vector():
    """The Problem's parameters are views of one flat vector; forward AD gives a view's tangent its base's size, so
    a forward-over-reverse product through them held a parameter vector per tensor (2.8 GB on ResNet-18). Its
    primals are copies of their own now: the product adds a few parameter vectors, not one per tensor (80 here)."""
    from landscape.runtime.budget import AddedMemory

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(40)]).double()
    X, y = torch.randn(8, 128, dtype=torch.float64), torch.randint(0, 128, (8,))
    pb = Problem(net, X, y, F.cross_entropy, hvp_mode="forward-over-reverse")
    v = {n: torch.randn_like(t) for n, t in pb.theta0.items()}
    pb.hvp(v)
    with AddedMemory(None) as added:
        for _ in range(3):
            pb.hvp(v)
    assert pb.hvp_engine == "forward-over-reverse" and len(pb.names) == 80
    assert added.bytes < 20 * pb.parameter_bytes, added.bytes / pb.parameter_bytes


def test_inplace_and_vmap_strategies_agree():
    net, (X, y) = relu_mlp(), blobs(50)
    dirs = random_directions({n: p for n, p in net.named_parameters()}, 2, seed=1)
    coeffs = np.array([[0.0, 0.0], [0.3, -0.2], [-1.0, 1.0], [0.5, 0.5], [0.1, 0.9]])
    a = Problem(net, X, y, F.cross_entropy, strategy="inplace", batch_size=16).evaluate_points(coeffs, dirs)
    b = Problem(net, X, y, F.cross_entropy, strategy="vmap", max_block=2, batch_size=16).evaluate_points(coeffs, dirs)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"])
    auto = Problem(net, X, y, F.cross_entropy)
    assert auto.choose_strategy() in ("inplace", "vmap")


def test_point_evaluation_matches_direct_forward():
    net, (X, y) = relu_mlp(), blobs(30)
    pb = Problem(net, X, y, F.cross_entropy, metrics={"mse_logits": lambda o, t: (o ** 2).mean()})
    d1, d2 = random_directions(pb.theta0, 2, seed=0)
    res = pb.evaluate_points(np.array([[0.25, -0.5]]), [d1, d2])
    moved = {n: pb.theta0[n] + 0.25 * d1[n] - 0.5 * d2[n] for n in pb.names}
    out = torch.func.functional_call(net, moved, (X,))
    assert res["loss"][0] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-12)
    assert res["accuracy"][0] == pytest.approx((out.argmax(1) == y).double().mean().item())
    assert res["mse_logits"][0] == pytest.approx((out ** 2).mean().item(), rel=1e-12)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, m.training


def test_model_bitwise_unchanged_also_after_error():
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    net.train()
    X, y = blobs(40)
    X = X.float()
    before, mode = snapshot(net)
    pb = Problem(net, X, y, F.cross_entropy, bn="recompute", bn_batches=2, bn_batch_size=16)
    pb.evaluate_points(np.array([[0.5], [1.0]]), random_directions(pb.theta0, 1, seed=0))
    pb.hvp(pb.gradient())

    def bad_loss(out, t):
        raise RuntimeError("boom")

    pb2 = Problem(net, X, y, bad_loss)
    with pytest.raises(RuntimeError):
        pb2.evaluate_points(np.array([[0.5]]), random_directions(pb2.theta0, 1, seed=0))
    after, mode_after = snapshot(net)
    assert mode_after == mode
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bn_recompute_matches_manual_estimate():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5)).double()
    X = torch.randn(64, 4, dtype=torch.float64) * 3 + 1
    y = torch.randn(64, 5, dtype=torch.float64)
    pb = Problem(net, X, y, F.mse_loss, bn="recompute", bn_batches=100, bn_batch_size=64)
    # all 64 samples in one batch: running stats = batch mean and unbiased variance
    h = net[0](X).detach()
    ref = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=True) + 1e-5) * net[1].weight + net[1].bias
    assert pb.evaluate().loss == pytest.approx(F.mse_loss(ref, y).item(), rel=1e-10)
    frozen = Problem(net, X, y, F.mse_loss)
    assert frozen.evaluate().loss != pytest.approx(pb.evaluate().loss, rel=1e-3)


def test_stacked_losses_match_functional_losses_near_a_minimum():
    from landscape.problem.losses import stacked_loss

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (200,), generator=g)
    logits = torch.randn(4, 200, 10, generator=g)
    logits[..., :] += 12.0 * F.one_hot(y, 10)  # confident: loss ~ 1e-5, far below the logits' rounding error
    ce, correct = stacked_loss(F.cross_entropy, logits, y, correct=True)
    for k in range(4):
        exact = F.cross_entropy(logits[k].double(), y).item()  # float64 truth for the float32 logits
        assert ce[k].item() == pytest.approx(exact, rel=1e-4)
        naive = (torch.logsumexp(logits[k], 1) - logits[k].gather(1, y[:, None]).squeeze(1)).mean().item()
        assert naive != pytest.approx(exact, rel=1e-4)  # the cancelling formula would fail this check
        assert correct[k].item() == (logits[k].argmax(1) == y).sum().item()
    target = torch.randn(200, 3, generator=g)
    outs = torch.randn(4, 200, 3, generator=g)
    mse, none = stacked_loss(F.mse_loss, outs, target)
    assert none is None
    custom, _ = stacked_loss(lambda o, t: (o - t).abs().mean(), outs, target)
    for k in range(4):
        assert mse[k].item() == pytest.approx(F.mse_loss(outs[k], target).item(), rel=1e-6)
        assert custom[k].item() == pytest.approx((outs[k] - target).abs().mean().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_cross_entropy_with_underflowing_exponentials_is_exact(dtype):
    """Far from a minimum the shifted logits go below -87, where exp is subnormal or zero: clamped, the same loss."""
    from landscape.problem.losses import stacked_loss

    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 10, (300,), generator=g)
    logits = (torch.randn(5, 300, 10, generator=g, dtype=torch.float64) * torch.tensor([1.0, 30, 100, 300, 1e4],
              dtype=torch.float64).view(5, 1, 1)).to(dtype)
    loss, correct = stacked_loss(F.cross_entropy, logits, y, correct=True)
    for k in range(5):
        assert loss[k].item() == F.cross_entropy(logits[k], y).item() or \
            loss[k].item() == pytest.approx(F.cross_entropy(logits[k].double(), y).item(), rel=1e-6)
        assert correct[k].item() == (logits[k].argmax(1) == y).sum().item()


@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), float("-inf")])
def test_stacked_accuracy_equals_argmax_with_ties_and_non_finite_logits(special):
    """Accuracy is read off the shifted logits; it must agree with ``argmax`` (first maximum wins) on ties, and
    with non-finite logits too."""
    from landscape.problem.losses import stacked_loss

    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 5, (300,), generator=g)
    logits = torch.randint(0, 3, (6, 300, 5), generator=g).float()  # three values over five classes: many ties
    if special is not None:
        logits[2, ::7, 1] = special
        logits[4, 5, y[5]] = special
    loss, correct = stacked_loss(F.cross_entropy, logits, y, correct=True)
    for k in range(6):
        assert correct[k].item() == (logits[k].argmax(1) == y).sum().item()
        torch.testing.assert_close(loss[k], F.cross_entropy(logits[k], y), equal_nan=True)
    # the custom-loss path counts with argmax directly
    _, counted = stacked_loss(lambda o, t: F.cross_entropy(o, t) * 1.0, logits, y, correct=True)
    torch.testing.assert_close(counted, correct)
    # stacked class-major and overwritten (the Problem's way): the same numbers; without overwrite, untouched
    work = logits.transpose(1, 2).contiguous().transpose(1, 2)
    kept = work.clone()
    same = stacked_loss(F.cross_entropy, work, y, correct=True)
    torch.testing.assert_close(work, kept, equal_nan=True, rtol=0, atol=0)
    over = stacked_loss(F.cross_entropy, work, y, correct=True, overwrite=True)
    torch.testing.assert_close(over[0], loss, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(over[1], correct) and torch.equal(same[1], correct)


def test_strategy_timing_raises_what_fails_in_place_and_drops_only_vmap():
    """auto timing drops vmap when vmap cannot run the model, and a model that fails in place still raises."""
    X, y = blobs(16)
    state = {"fail": None, "vmap_failures": 0}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3).double()

        def forward(self, x):
            batched = torch._C._functorch.is_batchedtensor(self.lin.weight)
            if state["fail"] == "always" or (state["fail"] == "vmap" and batched):
                state["vmap_failures"] += batched
                raise RuntimeError("boom")
            return self.lin(x)

    pb = Problem(Net(), X, y, F.cross_entropy)
    dirs = random_directions(pb.theta0, 2, seed=0)
    state["fail"] = "vmap"
    pb.choose_strategy_for([pb.as_list(d) for d in dirs])
    assert pb.strategy == "inplace" and state["vmap_failures"] > 0
    pb = Problem(Net(), X, y, F.cross_entropy)
    state["fail"] = "always"
    with pytest.raises(RuntimeError, match="boom"):
        pb.choose_strategy_for([pb.as_list(d) for d in dirs])


def test_vmap_trials_are_bounded_by_the_budget_and_by_a_block_of_work(monkeypatch):
    """vmap's trial block holds at most what the memory budget holds of the in-place trial's memory and a copy of the
    parameters a point (and vmap is not tried under two points); its second, larger block is at most
    ``block_seconds`` of work and what the budget holds at the memory per point its trial took; the most memory a
    trial added is kept for the dry run."""
    from landscape.problem import strategy

    calls = []

    def fake(ev, fn, dirs, k, repeats, beat):  # seconds per point and bytes added, by strategy and block
        name = "vmap" if fn == ev._evaluate_vmap else "inplace"
        calls.append((name, k))
        return (1e-3, 100) if name == "inplace" else (1.2e-3 if k <= 8 else 0.5e-3, 60 * k)

    monkeypatch.setattr(strategy, "_per_point", fake)
    net, (X, y) = relu_mlp(), blobs(16)
    ev = Problem(net, X, y, F.cross_entropy).points
    point = 100 + ev.problem.parameter_bytes  # a vmap trial point: the in-place trial's memory and the parameters

    def trials(budget, block_seconds=0.5, mem_block=32):
        calls.clear()
        ev.problem.memory_budget, ev.block_seconds = budget, block_seconds
        timings, block, peak = strategy._time_strategies(ev, [], ["inplace", "vmap"], mem_block, 3)
        return list(calls), timings, block, peak

    got, timings, block, peak = trials(budget=point + 50)  # no room for two points at once
    assert got == [("inplace", 8)] and timings["vmap"] == float("inf") and peak == 100
    got, timings, block, peak = trials(budget=4 * point + 50)  # 4 points
    assert got == [("inplace", 8), ("vmap", 4), ("vmap", 32)] and block == 32 and peak == 60 * 32
    assert timings["vmap"] == 0.5e-3
    got, _, block, _ = trials(budget=2 * point + 50)  # 2 points; then as many as the budget holds at 60 bytes a point
    assert got == [("inplace", 8), ("vmap", 2), ("vmap", (2 * point + 50) // 60)] and block == (2 * point + 50) // 60
    got, timings, block, peak = trials(budget=1e9, block_seconds=0.006)  # 5 points of 1.2 ms: not above the trial
    assert got == [("inplace", 8), ("vmap", 8)] and block == 8 and timings["vmap"] == 1.2e-3 and peak == 60 * 8


def test_a_strategy_trial_stops_repeating_once_its_calls_took_long_enough(monkeypatch):
    """Repeats refine a short trial's time; once the timed calls have taken TIMING_SECONDS they stop."""
    import time

    from landscape.problem import strategy

    monkeypatch.setattr(strategy, "TIMING_SECONDS", 0.05)
    net, (X, y) = relu_mlp(), blobs(16)
    ev = Problem(net, X, y, F.cross_entropy).points
    calls = []

    def slow(coeffs, dirs, precision):
        calls.append(len(coeffs))
        time.sleep(0.03)

    seconds, _ = strategy._per_point(ev, slow, [[]], 4, repeats=5, beat=float("inf"))
    assert calls == [1, 4, 4] and seconds >= 0.03 / 4  # a one-point warm-up, then 0.03 + 0.03 >= 0.05 s
