"""Sharpness measures against closed forms (float64): interpolating linear regression, separable quadratics,
the Dinh et al. rescaling of a ReLU net."""

import numpy as np
import pytest
import torch

from conftest import blobs
from landscape import Problem
from landscape.linalg.ascent import apgd, checkpoints
from landscape.problem.curvature import CurvatureOperator
from landscape.linalg.lanczos import lanczos
from landscape.analyses.sharpness import SharpnessSettings, batches, sharpness, work


def half_mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def interpolating_regression(n=8, d=5, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(d, 1, bias=bias).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        if bias:
            lin.bias.fill_(0.3)
    y = lin(X).squeeze(-1).detach()  # every residual, hence every per-sample gradient, is 0
    return Problem(lin, X, y, half_mse), X.numpy(), lin.weight.detach().numpy().ravel()


def run(pb, **kw):
    return sharpness(pb, SharpnessSettings(**kw))


@pytest.mark.parametrize("adaptive", [True, False])
def test_worst_case_m1_closed_forms(adaptive):
    pb, X, w = interpolating_regression()
    c = np.abs(w) if adaptive else np.ones_like(w)
    rho = 0.3
    l2 = run(pb, measure="worst-case", norm="l2", adaptive=adaptive, m=1, rho=(rho,), steps=40)
    linf = run(pb, measure="worst-case", norm="linf", adaptive=adaptive, m=1, rho=(rho,))
    np.testing.assert_allclose(l2.value[0], 0.5 * rho ** 2 * np.mean(np.sum((c * X) ** 2, axis=1)), rtol=1e-6)
    np.testing.assert_allclose(linf.value[0], 0.5 * rho ** 2 * np.mean(np.sum(np.abs(c * X), axis=1) ** 2),
                               rtol=1e-10)
    assert l2.m == 1 and l2.n_samples == 8 and l2.samples.shape == (1, 8)


def test_average_adaptive_closed_form_within_error_bars():
    pb, X, w = interpolating_regression()
    rho = 0.2
    r = run(pb, measure="average-case", norm="l2", adaptive=True, m=2, rho=(rho,), draws=300)
    exact = 0.5 * rho ** 2 * np.mean(np.sum((np.abs(w) * X) ** 2, axis=1))
    assert abs(r.value[0] - exact) < 4 * r.stderr[0]
    assert r.stderr[0] < 0.1 * exact  # the error bar is informative, not huge


def test_full_batch_worst_case_is_half_rho2_lambda_max_and_m_orders_the_values():
    pb, X, _ = interpolating_regression()
    rho = 0.5
    lam = np.linalg.eigvalsh(X.T @ X / len(X))[-1]
    full = run(pb, measure="worst-case", adaptive=False, m=None, rho=(rho,), steps=200)
    np.testing.assert_allclose(full.value[0], 0.5 * rho ** 2 * lam, rtol=1e-6)
    s1, s4 = (run(pb, measure="worst-case", adaptive=False, m=m, rho=(rho,), steps=200).value[0] for m in (1, 4))
    assert s1 >= s4 >= full.value[0] * (1 - 1e-9)
    assert s1 > 1.05 * full.value[0]


def test_ascent_needs_its_random_start_at_an_exact_minimum():
    pb, X, w = interpolating_regression()
    wt = torch.as_tensor(w)

    def f(delta):  # the regression loss around its exact minimum, as a function of delta
        r = torch.as_tensor(X) @ delta
        return float(0.5 * (r ** 2).mean()), torch.as_tensor(X).T @ r / len(X)

    c = torch.ones_like(wt)
    assert apgd(f, c, 0.3, random_init=False).value == 0.0  # the gradient is 0: ascent never moves
    assert apgd(f, c, 0.3).value > 0.5 * 0.3 ** 2 * np.linalg.eigvalsh(X.T @ X / len(X))[-1] * 0.99
    assert checkpoints(20)[-1] == 20 and checkpoints(100)[:3] == [22, 41, 57]


def test_sam_asam_first_order_basin_width_and_parameter_subset():
    pb, X, w = interpolating_regression(bias=True)
    rho = 0.1
    # at an interpolating minimum every batch gradient is 0 up to round-off: SAM's step is (almost) 0, while the
    # worst case over the same ball is not
    sam = run(pb, measure="sam", rho=(rho,), m=2).value[0]
    assert abs(sam) < 1e-4 * run(pb, measure="worst-case", adaptive=False, rho=(rho,), m=2).value[0]
    # only the bias moves: x = 1 for it, so the m = 1 worst case is rho^2 / 2 exactly
    bias_only = run(pb, measure="worst-case", adaptive=False, m=1, rho=(rho,), parameters=("bias",))
    np.testing.assert_allclose(bias_only.value[0], 0.5 * rho ** 2, rtol=1e-9)
    # first-order: grad L(w + delta) = H delta, so the largest gradient norm in the ball is rho * lambda_max(H)
    Xb = np.hstack([X, np.ones((len(X), 1))])
    H = Xb.T @ Xb / len(X)
    fo = run(pb, measure="first-order", adaptive=False, rho=(rho,), steps=200)
    np.testing.assert_allclose(fo.value[0], rho * np.linalg.eigvalsh(H)[-1], rtol=1e-5)
    # basin width: L(w + t d) - L(w) = t^2 d'Hd / 2 reaches eps at t = sqrt(2 eps / d'Hd)
    d = {"weight": torch.ones(1, 5, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64)}
    dv = np.r_[np.ones(5), 0.0]
    bw = sharpness(pb, SharpnessSettings(measure="basin-width", rho=(0.05,)), directions=[d])
    np.testing.assert_allclose(bw.extra["distance"][0, 0], np.sqrt(2 * 0.05 / (dv @ H @ dv)), rtol=2e-3)
    # ASAM's step from a non-minimum: delta = rho T^2 g / ||T g||, T = |w| + eta
    with torch.no_grad():
        pb.theta0["weight"] += 0.1
    a = run(pb, measure="asam", rho=(rho,), m=None)
    wv = np.r_[pb.theta0["weight"].numpy().ravel(), pb.theta0["bias"].numpy()]
    y = pb.y.numpy()

    def loss(v):
        return 0.5 * np.mean((Xb @ v - y) ** 2)

    g = Xb.T @ (Xb @ wv - y) / len(X)
    T = np.abs(wv) + 0.01
    delta = rho * T ** 2 * g / np.linalg.norm(T * g)
    np.testing.assert_allclose(a.value[0], loss(wv + delta) - loss(wv), rtol=1e-9)


class Quadratic(torch.nn.Module):
    """f(w) = sum_i a_i (w_i - b_i)^2 / 2, whatever the input: the loss of a separable quadratic."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return self.w.expand(x.shape[0], -1)


def test_keskar_hits_the_box_vertex_of_a_separable_quadratic():
    a = torch.tensor([3.0, 1.0, 0.5, 2.0], dtype=torch.float64)
    b = torch.tensor([0.2, -0.1, 0.4, 0.0], dtype=torch.float64)
    w = torch.tensor([0.5, -0.3, 0.1, 1.0], dtype=torch.float64)
    pb = Problem(Quadratic(w), torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                 lambda out, y: 0.5 * ((out - b) ** 2 * a).sum(-1).mean())
    r = run(pb, measure="keskar", rho=(1e-3, 0.05))

    def f(v):
        return float(0.5 * ((v - b) ** 2 * a).sum())

    for i, eps in enumerate((1e-3, 0.05)):
        vertex = w + eps * (w.abs() + 1) * torch.sign(w - b)
        np.testing.assert_allclose(r.value[i], 100 * (f(vertex) - f(w)) / (1 + f(w)), rtol=1e-12)


def trained_relu_net():
    """The 10-32-3 ReLU net of Dinh et al.'s check, trained to fit seeded blobs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).double()
    X, y = blobs(64, 10, 3, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        opt.step()
    return net


def relu_net_rescaled(alpha):
    net = trained_relu_net()
    with torch.no_grad():
        net[0].weight *= alpha
        net[0].bias *= alpha
        net[2].weight /= alpha
    X, y = blobs(64, 10, 3, seed=1)
    return Problem(net, X, y, torch.nn.functional.cross_entropy)


def test_dinh_rescaling_leaves_adaptive_measures_unchanged():
    pbs = {a: relu_net_rescaled(a) for a in (1.0, 10.0)}
    assert abs(pbs[1.0].loss() - pbs[10.0].loss()) < 1e-12  # the same function
    invariant = [dict(measure="worst-case", norm="l2", m=16, rho=(0.1,)),
                 dict(measure="worst-case", norm="linf", m=16, rho=(0.01,)),
                 dict(measure="average-case", norm="l2", m=16, rho=(0.05,)),
                 dict(measure="pacbayes", adaptive=True, eps=0.0, rho=(0.1,))]
    for kw in invariant:
        v1, v10 = (run(pbs[a], **kw).value[0] for a in (1.0, 10.0))
        assert v1 > 0 and abs(v1 - v10) <= 1e-9 * abs(v1), kw
    for kw in [dict(measure="worst-case", adaptive=False, m=16, rho=(0.1,)),
               dict(measure="average-case", adaptive=False, m=16, rho=(0.05,))]:
        v1, v10 = (run(pbs[a], **kw).value[0] for a in (1.0, 10.0))
        assert v10 >= 10 * v1, (kw, v1, v10)
    lam = {a: lanczos(CurvatureOperator(pb), sum(t.numel() for t in pb.theta0.values()), k=1).eigenvalues[0]
           for a, pb in pbs.items()}
    assert lam[10.0] >= 10 * lam[1.0]


def test_pacbayes_sigma_is_a_standard_deviation_that_moves_with_plain_rescaling():
    sig = {a: run(relu_net_rescaled(a), measure="pacbayes", adaptive=False, rho=(0.1,)).extra["sigma"][0]
           for a in (1.0, 10.0)}
    assert sig[1.0] >= 3 * sig[10.0]  # plain noise on the shrunk second layer: sigma' falls about like 1 / alpha
    pb = relu_net_rescaled(1.0)
    r = run(pb, measure="pacbayes", adaptive=False, rho=(0.1,), draws=10)
    sigma = r.extra["sigma"][0]
    assert r.value[0] == pytest.approx(1 / sigma ** 2)
    # at sigma' the error moved by at most 0.1; at 1.5 sigma' (same seeded draws, sigma as a std) by more
    from landscape.linalg.draws import normal
    from landscape.analyses.sharpness import _Flat, _error

    flat = _Flat(pb)
    z = [normal(flat.w.numel(), seed=0, stream=k) * flat.mask for k in range(10)]  # the measure's draws
    err0 = _error(pb, flat.params(flat.w))
    dev = [abs(np.mean([_error(pb, flat.params(flat.w + k * sigma * zk)) for zk in z]) - err0) for k in (1.0, 1.5)]
    assert dev[0] <= 0.1 < dev[1]


@pytest.mark.parametrize("adaptive", [False, True])
def test_pacbayes_search_ends_at_noise_a_thousand_times_the_weights(monkeypatch, adaptive):
    """An error no noise moves (an untrained net's, here a constant) gives sigma' = inf after the doublings from
    1/64 up to NOISE_CAP x the weights' RMS (plain) or x each weight (magnitude-aware), not on to 1e6."""
    import math

    from landscape.analyses import sharpness as module

    pb = relu_net_rescaled(1.0)
    flat = module._Flat(pb)
    monkeypatch.setattr(module, "_error", lambda problem, params: 0.5)
    evals = [0]
    s = SharpnessSettings(measure="pacbayes", adaptive=adaptive, rho=(0.1,), draws=3)
    sigma, dev = module._pacbayes_sigma(pb, flat, s, 0.1, evals)
    rms = float(torch.sqrt((flat.w ** 2).mean()))
    cap = module.NOISE_CAP * (1.0 if adaptive else rms)
    assert sigma == float("inf") and dev == 0.0
    assert evals[0] == 3 * (math.floor(math.log2(64 * cap)) + 1) < 3 * 26


def test_batches_are_disjoint_and_seeded():
    bs = batches(10, 3, seed=1)
    assert len(bs) == 3 and len(torch.unique(torch.cat(bs))) == 9
    assert all(torch.equal(a, b) for a, b in zip(bs, batches(10, 3, seed=1)))
    assert len(batches(10, None, 0)) == 1 and len(batches(10, 50, 0)[0]) == 10


def test_run_file_layout_and_quadratic_prediction_from_the_stored_hessian(tmp_path):
    import h5py

    from landscape.analyses.sharpness import same_settings, summary_from_group

    pb, X, _ = interpolating_regression()
    lam = np.linalg.eigvalsh(X.T @ X / len(X))[-1]
    res = run(pb, measure="worst-case", adaptive=False, m=None, rho=(0.2, 0.4), steps=200)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f.create_dataset("hessian/eigenvalues", data=[lam])
        g = res.write(f)
        assert g.name == "/sharpness/worst_case_l2"
        np.testing.assert_allclose(g["quadratic"][()], 0.5 * np.array([0.2, 0.4]) ** 2 * lam)
        np.testing.assert_allclose(g["value"][()], g["quadratic"][()], rtol=1e-6)  # a quadratic at its minimum
        assert same_settings(g, res.settings)
        assert not same_settings(g, SharpnessSettings(measure="worst-case", adaptive=False, m=None, rho=(0.2,),
                                                      steps=200).resolved())
        stored, fresh = summary_from_group(g), res.summary()
        assert np.isnan(stored.pop("stderr")).all() and np.isnan(fresh.pop("stderr")).all()  # one batch: no error bar
        assert stored == fresh


@pytest.mark.parametrize("measure", ["worst-case", "average-case", "sam", "asam", "keskar", "first-order"])
def test_dry_run_work_counts_every_evaluation_a_measure_makes(measure):
    """The ``--dry-run`` cost model's count of loss, gradient and HVP evaluations equals what the measure does
    (two rho, two batches), so an algorithm change that forgets the count fails here."""
    pb, _, _ = interpolating_regression(n=8)
    s = SharpnessSettings(measure=measure, rho=(0.1, 0.2), m=4, steps=5, draws=3)
    w = work(s, pb.n)
    assert sum(w.losses.values()) + sum(w.gradients.values()) + w.hvps == sharpness(pb, s).n_evals


@pytest.mark.parametrize("measure", ["pacbayes", "basin-width"])
def test_dry_run_work_of_searches_is_their_typical_length(measure):
    """Searches stop when the answer is found: the count assumes 20 steps, within 2x of a real search."""
    pb, _, _ = interpolating_regression(n=8)
    s = SharpnessSettings(measure=measure, rho=(0.01,), draws=4)
    dirs = [{n: torch.ones_like(t) for n, t in pb.theta0.items()}]
    counted = sum(work(s, pb.n, n_directions=1).losses.values())
    done = sharpness(pb, s, directions=dirs).n_evals
    assert counted / 2 <= done <= counted * 2, (counted, done)
