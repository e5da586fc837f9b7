"""Extreme eigenpairs of a symmetric operator by restarted Lanczos with full reorthogonalization.

A pure function over a matvec ``A(v)`` (a float64 vector in, a vector out), testable on explicit matrices.

The Krylov basis ``V`` is kept in float64 and every new vector is orthogonalized against all of ``V``
twice ("twice is enough", Parlett), so the projected matrix ``T = V^T A V`` stays exact and no "ghost" copies
of converged eigenvalues appear; ``T`` is built from those projections (tridiagonal up to rounding). The
factorization ``A V = V T + r c^T`` is maintained; the residual of a Ritz pair ``(theta, V s)`` is
``||r|| |c^T s|``, so convergence is checked without extra matvecs. When the basis reaches ``max_basis``
vectors it is thick-restarted (Wu & Simon 2000): ``V <- V S_keep`` keeps the wanted Ritz vectors, ``T`` becomes
diagonal and ``c <- S_keep^T c``. Iteration stops when the ``k`` wanted Ritz pairs have residual
``||A v - theta v|| <= tol |theta|``; the returned pairs are then verified with one matvec each (``verify``).

A matvec that rounds (a float32 Hessian-vector product) cannot verify a residual below its own rounding error at
``v``: the shipped models' top-5 pairs reach 1e-6 to 1e-5 relative in float32, at 1.1-2.9x that error. So a pair
that misses ``tol`` on verification gets one more matvec, which estimates that error as
``||A(3 v)/3 - A v|| / sqrt(2)`` (zero in exact arithmetic; scaling by 3 changes every rounding, so the difference
holds two products' rounding), and counts as converged when its residual is within :data:`NOISE_FACTOR` times it:
as accurate as the operator can tell. Its eigenvalue is then off by at most that residual, and typically by its
square over the gap to the next eigenvalue.

Cf. PyHessian's power iteration (tol 1e-3, hundreds of matvecs for the top-5) and hessian-eigenthings'
Lanczos (no reorthogonalization beyond 50 steps: repeated copies of lambda_1 flagged as converged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

Matvec = Callable[[np.ndarray], np.ndarray]

#: a verified residual within this many times the matvec's rounding error at the vector counts as converged (see
#: the module docstring; float32 Ritz pairs of the shipped models sit at 1.1-2.9x it)
NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class Eigenpairs:
    """``k`` eigenpairs: ``eigenvalues`` sorted (descending for ``LA``, ascending for ``SA``), ``eigenvectors``
    as columns (float64, unit norm), true residuals ``||A v - lambda v||``, ``converged`` flags, the number of
    matvecs spent (verification included) and, for pairs whose residual missed ``tol``, the matvec's rounding
    error at the vector (``noise``, NaN elsewhere; see the module docstring)."""

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    n_matvec: int
    which: str
    tol: float
    noise: np.ndarray | None = None


def _orthogonalize(V: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project ``w`` off the columns of ``V`` twice; returns (w, projections)."""
    h = V.T @ w
    w = w - V @ h
    h2 = V.T @ w
    return w - V @ h2, h + h2


def lanczos(matvec: Matvec, n: int, k: int = 5, *, which: str = "LA", tol: float = 1e-6,
            max_basis: int | None = None, max_matvec: int | None = None, seed: int = 0,
            v0: np.ndarray | None = None, verify: bool = True) -> Eigenpairs:
    """The ``k`` largest (``which="LA"``) or smallest (``"SA"``) eigenpairs of a symmetric ``n x n`` operator.

    >>> A = np.diag(np.arange(1.0, 101.0))
    >>> r = lanczos(lambda v: A @ v, 100, k=3)
    >>> np.round(r.eigenvalues, 8).tolist(), bool(r.converged.all())
    ([100.0, 99.0, 98.0], True)
    """
    if which not in ("LA", "SA"):
        raise ValueError("which must be 'LA' or 'SA'")
    k = min(k, n)
    m = min(n, max_basis or max(2 * k + 20, 40))
    budget = max_matvec or 50 * m
    sign = 1.0 if which == "LA" else -1.0
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n) if v0 is None else np.asarray(v0, dtype=np.float64).copy()
    # the basis lives in one preallocated Fortran-ordered array: contiguous columns, no copy per step
    basis = np.empty((n, m + 1), order="F")
    basis[:, 0] = v / np.linalg.norm(v)
    j = 1
    w, h = _orthogonalize(basis[:, :1], np.asarray(matvec(basis[:, 0]), dtype=np.float64))
    T = h.reshape(1, 1)
    c = np.ones(1)
    r, n_mv = w, 1
    while True:
        theta, S = np.linalg.eigh((T + T.T) / 2)
        order = np.argsort(-sign * theta)
        rnorm = np.linalg.norm(r)
        res = rnorm * np.abs(c @ S)
        want = order[:k]
        scale = np.maximum(np.abs(theta[want]), np.finfo(float).eps * max(np.abs(theta).max(), 1e-300))
        done = j >= k and bool(np.all(res[want] <= tol * scale))
        if done or j == n or n_mv >= budget:
            break
        if j >= m:  # thick restart: keep the wanted Ritz vectors and a few more
            keep = order[: min(m - 1, max(k + (m - k) // 2, k + 1))]
            basis[:, : len(keep)] = basis[:, :j] @ S[:, keep]
            T, c, j = np.diag(theta[keep]), c @ S[:, keep], len(keep)
        if rnorm <= 1e-12 * max(np.abs(theta).max(), 1.0):  # invariant subspace: continue from a fresh vector
            r, _ = _orthogonalize(basis[:, :j], rng.standard_normal(n))
            rnorm, c = np.linalg.norm(r), np.zeros(j)
        basis[:, j] = r / rnorm
        w, h = _orthogonalize(basis[:, : j + 1], np.asarray(matvec(basis[:, j]), dtype=np.float64))
        n_mv += 1
        T_new = np.zeros((j + 1, j + 1))
        T_new[:j, :j] = T
        T_new[:j, j] = T_new[j, :j] = h[:j]
        T_new[j, j] = h[j]
        T, r, j = T_new, w, j + 1
        c = np.zeros(j)
        c[j - 1] = 1.0
    V = basis[:, :j]
    want = order[:k]
    vecs = np.asfortranarray(V @ S[:, want])
    vals = theta[want]
    scale = np.maximum(np.abs(vals), np.finfo(float).eps * max(np.abs(theta).max(), 1e-300))
    noise = np.full(len(want), np.nan)
    if verify:
        products = [np.asarray(matvec(vecs[:, i]), dtype=np.float64) for i in range(len(want))]
        res_true = np.array([np.linalg.norm(p - vals[i] * vecs[:, i]) for i, p in enumerate(products)])
        n_mv += len(want)
        for i in np.flatnonzero(res_true > tol * scale):  # the operator's own rounding may be what stops it
            noise[i] = np.linalg.norm(np.asarray(matvec(3.0 * vecs[:, i]), dtype=np.float64) / 3.0
                                      - products[i]) / np.sqrt(2.0)
            n_mv += 1
    else:
        res_true = res[want]
    converged = (res_true <= tol * scale) | (res_true <= NOISE_FACTOR * noise)  # NaN compares False
    return Eigenpairs(eigenvalues=vals, eigenvectors=vecs, residuals=res_true, converged=converged,
                      n_matvec=n_mv, which=which, tol=tol, noise=noise)


def krylov_tridiagonal(matvec: Matvec, v0: np.ndarray, steps: int) -> tuple[np.ndarray, int]:
    """``T = V^T A V`` for the Krylov basis of ``v0`` after ``steps`` matvecs (full reorthogonalization, twice).

    ``T`` is tridiagonal up to rounding; its eigenvalues and the squared first components of its eigenvectors
    are the Gauss quadrature nodes and weights of ``v^T f(A) v`` for the normalized ``v0`` (used by SLQ).
    Stops early at an invariant subspace. Returns ``(T, matvecs)``.
    """
    n = v0.shape[0]
    V = (v0 / np.linalg.norm(v0))[:, None]
    T = np.zeros((0, 0))
    for j in range(min(steps, n)):
        w, h = _orthogonalize(V, np.asarray(matvec(V[:, j]), dtype=np.float64))
        T_new = np.zeros((j + 1, j + 1))
        T_new[:j, :j] = T
        T_new[:, j] = T_new[j, :] = h
        T = T_new
        beta = np.linalg.norm(w)
        if j + 1 == min(steps, n) or beta <= 1e-12 * max(np.abs(np.diag(T)).max(), 1.0):
            return (T + T.T) / 2, j + 1
        V = np.column_stack([V, w / beta])
    return (T + T.T) / 2, T.shape[0]
