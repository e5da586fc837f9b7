"""Per-sample gradient coherence against exact answers (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLES, blobs, relu_mlp
from landscape import Problem
from landscape import coherence
from landscape.analyses.coherence import (Batches, CoherenceSettings, GradientStats, analyze_coherence,
                                         random_batches)
from landscape.problem.curvature import CurvatureOperator
from landscape.problem.persample import chunk_size, gradient_matrix, gradient_sum, per_sample_gradients

FAST = dict(noise_samples=0, batch_sizes=(4,), batch_repeats=4)


def test_identical_examples_give_m_and_one_hot_linear_gives_one():
    m = 7
    x = torch.randn(1, 4, dtype=torch.float64).repeat(m, 1)
    y = torch.zeros(m, dtype=torch.long)
    pb = Problem(relu_mlp((4, 6, 3)), x, y, F.cross_entropy)
    r = analyze_coherence(pb, CoherenceSettings(**FAST))
    assert r.metrics["m_coherence"] == pytest.approx(m, rel=1e-12)
    assert r.metrics["alpha"] == pytest.approx(1.0, rel=1e-12)
    assert r.metrics["gradient_diversity"] == pytest.approx(1 / m, rel=1e-12)
    assert abs(r.metrics["trace_sigma"]) < 1e-12 * r.arrays["grand"][0] ** 2  # zero up to round-off
    # one-hot inputs to a linear map: g_i = r_i e_i^T are orthogonal, whatever their norms
    X = torch.eye(6, dtype=torch.float64)
    lin = torch.nn.Linear(6, 2, bias=False).double()
    Y = torch.randn(6, 2, dtype=torch.float64)
    r = analyze_coherence(Problem(lin, X, Y, F.mse_loss), CoherenceSettings(**FAST))
    assert r.metrics["m_coherence"] == pytest.approx(1.0, rel=1e-12)


def test_vmap_equals_loop_and_stats_equal_dense_formulas():
    X, y = blobs(30, 4, 3)
    pb = Problem(relu_mlp((4, 8, 3)), X, y, F.cross_entropy)
    gv = per_sample_gradients(pb, X, y, method="vmap")
    gl = per_sample_gradients(pb, X, y, method="loop")
    assert torch.allclose(gv, gl, rtol=0, atol=1e-12)
    G = gv.numpy()
    full = np.concatenate([t.reshape(-1).numpy() for t in pb.gradient().values()])
    np.testing.assert_allclose(G.mean(0), full, atol=1e-14)  # the mean per-sample gradient is the gradient
    # nested batches of sizes 1, 2 and 5 over a random order of the samples, rows added in that order
    order = np.random.default_rng(0).permutation(30)
    batches = Batches(order, {5: 6, 2: 4, 1: 3})
    stats = GradientStats(G.shape[1], y.numpy(), batches=batches, reference=torch.as_tensor(G.sum(0)))
    for s in range(0, 30, 7):  # uneven chunks, across the batches' ends
        stats.add(s, torch.as_tensor(G[order[s:s + 7]]))
    red = stats.reduced()
    met = red.metrics()
    assert met["m_coherence"] == pytest.approx(np.sum(G.sum(0) ** 2) / np.sum(G ** 2), rel=1e-12)
    assert met["trace_sigma"] == pytest.approx(np.trace(np.cov(G.T)), rel=1e-10)
    var = G.var(0)
    ok = var > 1e-12 * (G ** 2).mean(0)
    np.testing.assert_allclose(red.gsnr[ok], (G.mean(0) ** 2 / var)[ok], rtol=1e-8)
    cls = red.class_metrics()
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    a, b = (y == 0).numpy(), (y == 1).numpy()
    np.testing.assert_allclose(cls["class_cosine"][0, 1], (U[a] @ U[b].T).mean(), rtol=1e-10)
    C = U[a] @ U[a].T
    np.testing.assert_allclose(cls["class_cosine"][0, 0], C[~np.eye(len(C), dtype=bool)].mean(), rtol=1e-10)
    bm = red.batch_metrics()
    assert bm["batch_sizes"].tolist() == [1, 2, 5] and bm["batch_count"].tolist() == [3, 4, 6]
    for j, (b, r) in enumerate([(1, 3), (2, 4), (5, 6)]):
        means = [G[order[k * b:(k + 1) * b]].mean(0) for k in range(r)]
        cos = [(m @ G.mean(0)) / np.linalg.norm(m) / np.linalg.norm(G.mean(0)) for m in means]
        np.testing.assert_allclose(bm["batch_cosine"][j], np.mean(cos), rtol=1e-10)
        np.testing.assert_allclose(bm["batch_cosine_std"][j], np.std(cos, ddof=1), rtol=1e-8)


def test_batches_kept_whole_equal_the_running_sums_and_rows_out_of_order_are_refused():
    """Under torchrun each rank holds part of some batches: every batch then keeps its sum to the end, with the
    same statistics as the running sums a single process closes batch by batch."""
    G = torch.randn(23, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = np.arange(23) % 3
    batches = random_batches(23, (1, 4, 8, 64), 3, seed=2)
    assert batches.counts == {1: 3, 4: 3, 8: 2}
    ids4, ids8 = batches.ids(4), batches.ids(8)
    assert all(len(set(ids8[ids4 == k])) == 1 and ids8[ids4 == k][0] >= 0 for k in range(3))  # nested
    kw = dict(batches=batches, reference=G.sum(0))
    running, whole = GradientStats(40, labels, **kw), GradientStats(40, labels, **kw, whole_batches=True)
    for s in (0, 3, 11, 12, 20):
        e = {0: 3, 3: 11, 11: 12, 12: 20, 20: 23}[s]
        running.add(s, G[batches.order[s:e]])
        whole.add(s, G[batches.order[s:e]])
    a, b = running.reduced().batch_metrics(), whole.reduced().batch_metrics()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, err_msg=k)
    with pytest.raises(ValueError, match="position 0 expected, 3 given"):
        GradientStats(40, labels, **kw).add(3, G[:2])


def test_the_gradient_sum_equals_the_per_sample_gradients_summed():
    X, y = blobs(37, 4, 3, seed=2)
    pb = Problem(relu_mlp((4, 8, 3), seed=3), X, y, F.cross_entropy, batch_size=10)
    want = per_sample_gradients(pb, X, y).sum(0)
    torch.testing.assert_close(gradient_sum(pb, X, y), want, rtol=0, atol=1e-13)

    def branching(out, target):  # reads a value to branch on: vmap cannot trace it, a loop can
        return F.cross_entropy(out, target) * (2.0 if target.max().item() > 99 else 1.0)

    pb = Problem(relu_mlp((4, 8, 3), seed=3), X, y, branching, batch_size=10)
    torch.testing.assert_close(gradient_sum(pb, X, y), want, rtol=0, atol=1e-13)


def test_b_simple_matches_the_two_batch_estimator_and_b_noise_the_dense_formula():
    X, y = blobs(200, 4, 3, seed=3)
    pb = Problem(relu_mlp((4, 8, 3), seed=1), X, y, F.cross_entropy)
    r = analyze_coherence(pb, CoherenceSettings(noise_samples=200, batch_sizes=(8,)))
    G = per_sample_gradients(pb, X, y).numpy()
    rng = np.random.default_rng(0)
    small, big = 4, 64
    est = []
    for _ in range(40):  # McCandlish et al. (2018), appendix A: |G_B|^2 = |G|^2 + tr(Sigma)/B in expectation
        gs = np.mean([np.sum(G[rng.integers(0, 200, small)].mean(0) ** 2) for _ in range(50)])
        gb = np.mean([np.sum(G[rng.integers(0, 200, big)].mean(0) ** 2) for _ in range(50)])
        g2 = (big * gb - small * gs) / (big - small)
        s = (gs - gb) / (1 / small - 1 / big)
        est.append(s / g2)
    mean, se = np.mean(est), np.std(est, ddof=1) / np.sqrt(len(est))
    assert abs(r.metrics["b_simple"] * 199 / 200 - mean) < 4 * se  # two-batch estimates the population covariance
    # with every sample used, tr(H Sigma) is exact
    op = CurvatureOperator(pb)
    H = np.column_stack([op.matvec(e) for e in np.eye(op.n)])
    Sigma = np.cov(G.T)
    g = G.mean(0)
    assert r.metrics["b_noise"] == pytest.approx(np.trace(H @ Sigma) / (g @ H @ g), rel=1e-8)


def test_real_labels_are_more_coherent_than_shuffled_at_initialization():
    from landscape.analyses.scan import ScanConfig, setup

    st = setup(ScanConfig(str(EXAMPLES / "mlp_sgd_s0000.pt"), max_samples=300, device="cpu", dtype="float64"))
    pb = st.problem
    r = analyze_coherence(pb, CoherenceSettings(control=True, **FAST), sample_index=st.data.indices)
    assert r.metrics["m_coherence"] > 2 * r.control.metrics["m_coherence"]  # digits at initialization
    assert np.nanmean(r.arrays["class_m_coherence"]) > np.nanmean(r.control.arrays["class_m_coherence"])
    assert r.control.arrays["shuffled_from"].shape == (300,)
    np.testing.assert_array_equal(r.arrays["sample_index"], st.data.indices)
    assert r.arrays["grand"].shape == r.arrays["el2n"].shape == (300,)
    p = torch.softmax(pb._model(pb.X), 1).detach().numpy()
    np.testing.assert_allclose(r.arrays["el2n"], np.linalg.norm(p - np.eye(10)[pb.y.numpy()], axis=1), rtol=1e-12)


def test_sketch_matches_exact_within_its_stated_error():
    X, y = blobs(60, 4, 3, seed=4)
    pb = Problem(relu_mlp((4, 10, 3), seed=3), X, y, F.cross_entropy)
    exact = analyze_coherence(pb, CoherenceSettings(**FAST))
    k = 400
    sk = analyze_coherence(pb, CoherenceSettings(sketch=k, **FAST))
    err = np.sqrt(2 / k)  # relative standard deviation of a sketched squared norm
    assert sk.method == "sketch" and not sk.gsnr
    assert abs(sk.metrics["m_coherence"] / exact.metrics["m_coherence"] - 1) < 4 * err
    assert abs(sk.metrics["b_simple"] / exact.metrics["b_simple"] - 1) < 4 * err
    ratio = sk.arrays["grand"] / exact.arrays["grand"]  # a norm: relative sd about err / 2
    assert np.all(np.abs(ratio - 1) < 3 * err) and abs(ratio.mean() - 1) < err / 2


class ItemNet(torch.nn.Module):
    """A model vmap cannot trace: Python control flow on a data value."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3).double()

    def forward(self, x):
        return self.lin(x) * (2.0 if x.sum().item() > 0 else 1.0)


def test_untraceable_model_falls_back_to_the_loop_with_a_warning():
    from landscape.problem.persample import PerSampleWarning

    X, y = blobs(12, 4, 3)
    pb = Problem(ItemNet(), X, y, F.cross_entropy)
    with pytest.warns(PerSampleWarning, match="fall back to a loop"):
        r = analyze_coherence(pb, CoherenceSettings(**FAST))
    assert r.method == "loop"
    G = per_sample_gradients(pb, X, y, method="loop").numpy()
    assert r.metrics["m_coherence"] == pytest.approx(np.sum(G.sum(0) ** 2) / np.sum(G ** 2), rel=1e-12)
    with pytest.warns(PerSampleWarning):  # the matrix path falls back too, and writes the loop's rows in place
        np.testing.assert_array_equal(gradient_matrix(pb, X, y).numpy(), G)


def test_gradient_matrix_writes_chunks_in_place():
    X, y = blobs(30, 4, 3)
    pb = Problem(relu_mlp((4, 8, 3)), X, y, F.cross_entropy)
    budget = 7 * 3 * pb.num_parameters * 8  # 7 samples per chunk: 30 = 4 * 7 + 2, a short last chunk
    assert chunk_size(pb, budget) == 7
    M = gradient_matrix(pb, X, y, memory_budget=budget)
    assert M.shape == (30, pb.num_parameters) and M.dtype == torch.float64
    torch.testing.assert_close(M, per_sample_gradients(pb, X, y, method="loop"), rtol=0, atol=1e-12)


@pytest.mark.parametrize("column_block", [None, 7])
def test_accumulators_beyond_the_budget_take_passes_over_coordinate_ranges_with_the_same_results(
        column_block, monkeypatch):
    X, y = blobs(60, 4, 3, seed=5)
    pb = Problem(relu_mlp((4, 10, 3), seed=4), X.double(), y, F.cross_entropy, dtype=torch.float64)
    one = analyze_coherence(pb, CoherenceSettings(**FAST))
    runs = []
    if column_block:  # rows added 7 coordinates at a time: 12 blocks, the last one short
        monkeypatch.setattr(coherence, "COLUMN_BLOCK", column_block)
        runs.append(analyze_coherence(pb, CoherenceSettings(**FAST)))
    # 83 parameters; 2 + 2 * 3 classes + the random batches' accumulators, 8 bytes each: a 1.6 KB budget
    # leaves room for a few coordinates at a time
    runs.append(analyze_coherence(pb, CoherenceSettings(**FAST, memory_budget=1600)))
    assert one.metrics["coordinate_passes"] == 1 and runs[-1].metrics["coordinate_passes"] > 5
    for many in runs:
        for k, v in one.metrics.items():
            if k != "coordinate_passes":
                np.testing.assert_allclose(many.metrics[k], v, rtol=1e-10, err_msg=k)
        for k, v in one.arrays.items():
            np.testing.assert_allclose(many.arrays[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
        for k, v in one.gsnr.items():
            np.testing.assert_allclose(many.gsnr[k], v, rtol=1e-10, err_msg=k)
