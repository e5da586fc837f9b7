"""Lanczos, trace estimators and SLQ against explicit matrices with known spectra."""

import numpy as np
import pytest

from landscape.linalg.density import slq
from landscape.linalg.lanczos import lanczos
from landscape.linalg.trace import basis_deflated, hutchinson, hutchpp


def with_spectrum(ev, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(ev), len(ev))))
    return (Q * np.asarray(ev, dtype=np.float64)) @ Q.T


@pytest.mark.parametrize("max_basis", [None, 12])
def test_lanczos_clustered_and_repeated_no_ghosts(max_basis):
    rng = np.random.default_rng(1)
    ev = np.concatenate([[50.0, 50.0, 49.9999, 30.0, 20.0, -7.0, -7.0 + 1e-6], rng.uniform(-1, 5, 293)])
    A = with_spectrum(ev)
    top = lanczos(lambda v: A @ v, 300, k=5, tol=1e-10, max_basis=max_basis)
    np.testing.assert_allclose(top.eigenvalues, np.sort(ev)[::-1][:5], rtol=1e-10)
    assert top.converged.all() and (top.residuals <= 1e-10 * np.abs(top.eigenvalues)).all()
    np.testing.assert_allclose(top.eigenvectors.T @ top.eigenvectors, np.eye(5), atol=1e-10)  # no duplicate pairs
    bottom = lanczos(lambda v: A @ v, 300, k=3, which="SA", tol=1e-10, max_basis=max_basis)
    np.testing.assert_allclose(bottom.eigenvalues, np.sort(ev)[:3], rtol=1e-9)


def test_lanczos_outlier_spectrum_is_cheap():
    rng = np.random.default_rng(2)
    ev = np.concatenate([[85, 60, 40, 30, 25, 10, 8], rng.normal(0, 0.5, 993)])
    A = with_spectrum(ev)
    r = lanczos(lambda v: A @ v, 1000, k=5, tol=1e-6)
    np.testing.assert_allclose(r.eigenvalues, [85, 60, 40, 30, 25], rtol=1e-6)
    assert r.n_matvec <= 40


@pytest.mark.parametrize("max_basis", [15, 40])
def test_dry_runs_lanczos_schedule_is_the_one_lanczos_runs(monkeypatch, max_basis):
    """The cost model's columns swept and restart rewrites (costs.lanczos_sweeps) are what lanczos does, counted by
    wrapping its Gram-Schmidt and its basis transform, over a run long enough for several restarts."""
    from landscape.analyses.costs import lanczos_sweeps
    from landscape.linalg import lanczos as module
    from landscape.linalg.vectors import ColumnStore

    swept, rewritten = [], []
    plain, transform = module.orthogonalize, ColumnStore.transform
    monkeypatch.setattr(module, "orthogonalize", lambda V, w, cols: (swept.append(cols), plain(V, w, cols))[1])
    monkeypatch.setattr(ColumnStore, "transform",
                        lambda self, S: (rewritten.append(S.size), transform(self, S))[1])
    A = with_spectrum(np.linspace(1.0, 2.0, 300))  # no gaps: nothing converges to 1e-14 in 90 products
    r = lanczos(lambda v: A @ v, 300, k=5, tol=1e-14, max_basis=max_basis, max_matvec=90, verify=False)
    assert r.n_matvec == 90 and len(rewritten) >= 2
    assert lanczos_sweeps(90, 5, max_basis) == (sum(swept), sum(rewritten))


def test_lanczos_pairs_at_the_rounding_of_a_float32_matvec_count_as_converged():
    """A float32 product cannot verify a residual of 1e-10 relative: such a pair is converged when its residual is
    within 4x the product's measured rounding error, and its eigenvalue is then as accurate as float32 allows. A pair
    stopped early by the budget is not. An exact product spends no matvec on the estimate."""
    rng = np.random.default_rng(3)
    ev = np.concatenate([[9.0, 7.0, 5.0], rng.uniform(-1, 2, 397)])
    A = with_spectrum(ev)
    A32 = A.astype(np.float32)

    def rounded(v):
        return (A32 @ v.astype(np.float32)).astype(np.float64)

    r = lanczos(rounded, 400, k=3, tol=1e-10)
    assert (r.residuals > 1e-10 * np.abs(r.eigenvalues)).all()  # tol is out of reach
    assert r.converged.all() and (r.residuals <= 4 * r.noise).all()
    assert ((r.noise > 1e-8) & (r.noise < 1e-5)).all()  # float32 rounding of a norm-9 operator
    np.testing.assert_allclose(r.eigenvalues, np.sort(np.linalg.eigvalsh(A32.astype(np.float64)))[::-1][:3],
                               rtol=1e-6)
    starved = lanczos(rounded, 400, k=3, tol=1e-10, max_matvec=4)
    assert not starved.converged.any() and (starved.residuals > 100 * starved.noise).all()
    exact = lanczos(lambda v: A @ v, 400, k=3, tol=1e-10)
    plain = lanczos(lambda v: A @ v, 400, k=3, tol=1e-10, verify=False)
    assert exact.converged.all() and np.isnan(exact.noise).all() and exact.n_matvec == plain.n_matvec + 3


def test_hutchinson_exact_for_diagonal_and_within_error_bars():
    D = np.diag(np.arange(1.0, 51.0))
    assert hutchinson(lambda v: D @ v, 50, max_matvec=3).estimate == pytest.approx(D.trace(), rel=1e-12)
    A = with_spectrum(np.random.default_rng(3).normal(1.0, 2.0, 200))
    est = hutchinson(lambda v: A @ v, 200, max_matvec=400, seed=4)
    assert abs(est.estimate - A.trace()) <= 3 * est.stderr
    # variance per probe 2(||A||_F^2 - sum A_ii^2)
    expected_sd = np.sqrt(2 * ((A ** 2).sum() - (np.diag(A) ** 2).sum()))
    assert np.std(est.samples, ddof=1) == pytest.approx(expected_sd, rel=0.2)


def test_stderr_target_and_deflation():
    ev = np.concatenate([[500.0, 300.0, 200.0], np.random.default_rng(5).normal(0, 1, 297)])
    A = with_spectrum(ev)
    plain = hutchinson(lambda v: A @ v, 300, max_matvec=60, seed=0)
    top = lanczos(lambda v: A @ v, 300, k=3)
    defl = hutchinson(lambda v: A @ v, 300, max_matvec=60, seed=0, deflate=(top.eigenvalues, top.eigenvectors))
    assert defl.stderr < plain.stderr / 5
    assert abs(defl.estimate - ev.sum()) <= 3 * defl.stderr
    stop = hutchinson(lambda v: A @ v, 300, max_matvec=10_000, stderr_target=40.0, seed=1)  # per-probe sd ~ 850
    assert stop.stderr <= 40.0 and 10 <= stop.n_matvec < 10_000
    neg = hutchinson(lambda v: -A @ v, 300, max_matvec=300, seed=2)  # negative traces are fine
    assert abs(neg.estimate + ev.sum()) <= 3 * neg.stderr


def test_hutchpp_exact_on_low_rank_and_better_than_hutchinson():
    ev = np.zeros(200)
    ev[:10] = np.linspace(10, 100, 10)
    A = with_spectrum(ev)
    est = hutchpp(lambda v: A @ v, 200, max_matvec=60)
    # the sketch A S spans the rank-10 range after 10 of its 20 columns: the other 10 are dropped with their products
    assert est.estimate == pytest.approx(ev.sum(), rel=1e-10) and est.n_matvec == 60 - 10
    B = with_spectrum(np.concatenate([np.linspace(50, 100, 20), np.random.default_rng(6).normal(0, 1, 280)]))
    errs_pp = [abs(hutchpp(lambda v: B @ v, 300, max_matvec=99, seed=s).estimate - B.trace()) for s in range(8)]
    errs_h = [abs(hutchinson(lambda v: B @ v, 300, max_matvec=99, seed=s).estimate - B.trace()) for s in range(8)]
    assert np.mean(errs_pp) < np.mean(errs_h)


def test_slq_moments_exact_and_density_matches_histogram():
    rng = np.random.default_rng(7)
    ev = np.concatenate([rng.normal(0, 1, 380), [40, 30, 20, -3]])
    A = with_spectrum(ev)
    d = slq(lambda v: A @ v, len(ev), n_probes=3, steps=40, seed=1)
    assert np.allclose(d.weights.sum(1), 1.0)
    vs = np.random.default_rng(1)
    for p in range(3):  # regenerate the probes: sum tau theta^j = v^T A^j v for j <= 2 steps - 1
        v = vs.integers(0, 2, size=len(ev)).astype(float) * 2 - 1
        v /= np.linalg.norm(v)
        for j in (1, 2, 5, 20, 79):
            exact = v @ np.linalg.matrix_power(A, j) @ v
            assert d.moment(j)[p] == pytest.approx(exact, rel=1e-7)
    grid, phi = d.evaluate(np.linspace(-5, 45, 2001), sigma2=0.3)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, rel=1e-9)
    # compare the CDF with the exact eigenvalue CDF
    cdf = np.cumsum(phi) * (grid[1] - grid[0])
    exact_cdf = np.searchsorted(np.sort(ev), grid) / len(ev)
    assert np.max(np.abs(cdf - exact_cdf)) < 0.08
    assert d.negative_mass == pytest.approx((ev < 0).mean(), abs=0.08)


def test_hutchpp_stops_its_residual_probes_at_the_stderr_target():
    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    A = (Q * np.concatenate([[100.0, 50.0], rng.uniform(0.5, 1.5, 198)])) @ Q.T
    full = hutchpp(lambda v: A @ v, 200, max_matvec=90, seed=1)
    early = hutchpp(lambda v: A @ v, 200, max_matvec=90, seed=1, stderr_target=10.0)
    assert full.n_matvec == 90 and len(full.samples) == 30
    assert 30 + 10 <= early.n_matvec < 90 and len(early.samples) >= 10 and early.stderr <= 10.0
    assert abs(early.estimate - np.trace(A)) < 4 * early.stderr


def test_lanczos_deflated_trace_exact_outside_nothing_unbiased_and_tighter_than_hutchpp():
    """tr(V^T A V) from Lanczos's projected matrix plus Hutchinson outside the basis: exact when A's range lies in
    the basis, unbiased otherwise (mean of many probe seeds within 4 standard errors of tr A), and on an outlier
    spectrum a third of Hutch++'s products give about the spread of all of Hutch++'s."""
    low = with_spectrum(np.concatenate([[40.0, 30.0, 20.0, 10.0], np.zeros(196)]))
    top = lanczos(lambda v: low @ v, 200, k=2, keep_basis=True)
    assert top.krylov is not None and top.krylov.cols >= 4
    est = basis_deflated(lambda v: low @ v, top.krylov, probes=12)
    top.krylov.close()
    assert est.estimate == pytest.approx(100.0, rel=1e-10) and est.stderr < 1e-8 and est.n_matvec == 12
    assert est.method == "lanczos-deflated"

    rng = np.random.default_rng(8)
    ev = np.concatenate([np.geomspace(50, 5, 10), rng.normal(0.02, 0.05, 590)])
    A = with_spectrum(ev, seed=8)
    spread = {"deflated": [], "hutch++": []}
    for seed in range(20):
        top = lanczos(lambda v: A @ v, 600, k=5, tol=1e-6, seed=seed, keep_basis=True)
        draws = [basis_deflated(lambda v: A @ v, top.krylov, probes=33, seed=100 * seed + j) for j in range(3)]
        top.krylov.close()
        spread["deflated"] += [d.estimate for d in draws]
        spread["hutch++"].append(hutchpp(lambda v: A @ v, 600, max_matvec=99, seed=seed).estimate)
        assert all(d.n_matvec == 33 and np.isfinite(d.stderr) for d in draws)
    est = np.array(spread["deflated"])
    assert abs(est.mean() - ev.sum()) <= 4 * est.std(ddof=1) / np.sqrt(len(est))
    assert est.std(ddof=1) < 1.3 * np.std(spread["hutch++"], ddof=1)  # measured 1.04x; the spreads' own error ~15%
    stop = basis_deflated(lambda v: A @ v, lanczos(lambda v: A @ v, 600, k=5, keep_basis=True).krylov,
                          probes=200, stderr_target=1.0)
    assert 10 <= stop.n_matvec < 200 and stop.stderr <= 1.0
