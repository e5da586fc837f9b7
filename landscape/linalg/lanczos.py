"""Extreme eigenpairs of a symmetric operator by restarted Lanczos with full reorthogonalization.

A pure function over a matvec ``A(v)`` (a float64 vector in, a vector out), testable on explicit matrices.

The Krylov basis ``V`` is kept in float64 (in memory within ``budget`` bytes, else on disk, or on a torch
``device`` such as the GPU that runs the products, where the vectors handed to the matvec are tensors too:
:class:`landscape.linalg.vectors.ColumnStore`, same numbers up to the order of summation) and every new vector is orthogonalized against all of ``V`` by
classical Gram-Schmidt, a second time when the first leaves more than :data:`REORTH_TOL` of it ("twice is enough",
Parlett; the second sweep's size is measured during the first, so a step passes over the basis twice, rarely three
times), so the projected matrix ``T = V^T A V`` stays exact and no "ghost" copies of converged eigenvalues
appear; ``T`` is built from those projections (tridiagonal up to rounding). The
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

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..runtime.blas import single_blas_thread
from .vectors import (ColumnStore, Vector, native, norm, product, release_pages, residual_norm, vector_device,
                      vector_norms)

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
    #: where the Krylov basis was kept: ``memory`` or ``disk`` (:class:`landscape.linalg.vectors.ColumnStore`), and its size
    storage: str = "memory"
    basis: int = 0
    #: with ``keep_basis=True``: the Krylov basis the run ended with, open until :meth:`KrylovBasis.close`
    krylov: "KrylovBasis | None" = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class KrylovBasis:
    """The orthonormal basis ``V`` a Lanczos run ended with (the first ``cols`` columns of ``store``) and
    ``tr(V^T A V)``, the trace of its projected matrix ``T``, known without a further product (full
    reorthogonalization keeps ``V^T A V = T`` to rounding). It holds the top eigenvectors Lanczos converged to and
    the Krylov directions beside them: :func:`landscape.linalg.trace.basis_deflated` estimates the trace outside it."""

    store: ColumnStore
    cols: int
    projected_trace: float

    def close(self) -> None:
        self.store.close()


#: the second Gram-Schmidt sweep is applied when the first leaves a component along the basis above this fraction
#: of the vector's norm (measured at no extra pass, see :meth:`ColumnStore.subtract`)
REORTH_TOL = 1e-12


def orthogonalize(V: ColumnStore, w: Vector, cols: int) -> tuple[Vector, np.ndarray]:
    """Project ``w`` (modified in place) off the first ``cols`` columns of ``V``; returns (w, projections).

    Classical Gram-Schmidt, twice when needed ("twice is enough", Parlett): the first sweep takes two passes
    over the basis and measures what a second sweep would remove on its way; the third pass is made only when
    that is above :data:`REORTH_TOL` of ``||w||`` (near convergence, where ``||w||`` is small). ``w`` may be a
    ``(p, n)`` block of ``p`` vectors (rows), all projected in the same passes (projections ``(p, cols)``; the
    third pass when any row needs it).
    """
    h = V.project(w, cols)
    h2 = V.subtract(w, h, cols, project_after=True)
    if np.any(np.linalg.norm(h2, axis=-1) > REORTH_TOL * vector_norms(w)):
        V.subtract(w, h2, cols)
        h = h + h2
    return w, h


def basis_size(k: int, n: int, max_basis: int | None = None, budget: float = float("inf")) -> int:
    """Columns of the restarted basis unless given: ``max(2k + 10, 20)`` when they fit ``budget`` bytes with the
    three vectors a step holds beside them (the residual's column, the step's vector and its product); else as many
    as fit, if that is at least ``2k + 5`` (in memory: restarts come sooner, so convergence takes more products);
    else ``2k + 5`` on disk, where every step reads it. At most ``n``.

    Each step sweeps the basis twice, so its columns cost time as well as memory. A thick restart keeps the wanted
    Ritz vectors and half the rest, so a smaller basis costs few products: the top 5 of ResNet-18 (256 samples, tol
    1e-4) took 64 products with 20 columns and 62 with 41, in 58.1 s against 71.8 s and with 1.9 GB less memory, the
    same eigenvalues to 7 digits and the deflated trace's error bar unchanged (``benchmarks/RESULTS.md``, issue 19,
    session 29; session 26: 1.03-1.06x the products at 20 columns over the ladder's models)."""
    if max_basis:
        return min(n, max_basis)
    m, least = max(2 * k + 10, 20), 2 * k + 5
    rows, blocks = ColumnStore.layout(n)
    fit = int(budget // (8 * rows * blocks)) - 3 if budget != float("inf") else m
    return min(n, m if fit >= m else max(fit, least))


def restart_keep(k: int, m: int) -> int:
    """Ritz vectors a thick restart of an ``m``-column basis keeps for ``k`` wanted pairs: the wanted and half of the
    rest, ``k + (m - k) // 2``, at least ``k + 1`` and at most ``m - 1``."""
    return min(m - 1, max(k + (m - k) // 2, k + 1))


def basis_device(device: torch.device, k: int, n: int) -> torch.device | None:
    """Where :func:`lanczos` for ``k`` pairs keeps its basis when the products run on ``device``: there, if it is a
    GPU with room for the default basis (:func:`landscape.linalg.vectors.vector_device`), else on the host (None)."""
    return vector_device(device, n, basis_size(k, n) + 1)


@single_blas_thread()
def lanczos(matvec: Matvec, n: int, k: int = 5, *, which: str = "LA", tol: float = 1e-6,
            max_basis: int | None = None, max_matvec: int | None = None, seed: int = 0,
            v0: np.ndarray | None = None, verify: bool = True, budget: float = float("inf"),
            device: torch.device | str | None = None, keep_basis: bool = False) -> Eigenpairs:
    """The ``k`` largest (``which="LA"``) or smallest (``"SA"``) eigenpairs of a symmetric ``n x n`` operator.

    ``budget`` (bytes) bounds the basis (``(m + 1) n`` float64 numbers, and the two long vectors a step holds
    beside it: :func:`basis_size`) and the eigenvectors (``k n``) held in memory; what does not fit is kept on disk
    (:class:`landscape.linalg.vectors.ColumnStore`) with the same results.
    With ``device``, the basis lives in that device's memory (the caller has checked that ``max(2k + 10, 20) + 1``
    vectors fit there), ``matvec`` gets and returns float64 tensors on it, and ``budget`` bounds only the
    eigenvectors, which are returned on the host. With ``keep_basis`` the final basis is handed back open
    (``krylov``, a :class:`KrylovBasis`) instead of freed: the caller closes it.

    Length: the iteration, its restarts on an invariant subspace and the convergence test read as one loop over one
    basis; the basis, the eigenvector combination and the verification are already helpers.

    >>> A = np.diag(np.arange(1.0, 101.0))
    >>> r = lanczos(lambda v: A @ v, 100, k=3)
    >>> np.round(r.eigenvalues, 8).tolist(), bool(r.converged.all())
    ([100.0, 99.0, 98.0], True)
    """
    if which not in ("LA", "SA"):
        raise ValueError("which must be 'LA' or 'SA'")
    k = min(k, n)
    m = basis_size(k, n, max_basis, float("inf") if device is not None else budget)
    budget_mv = max_matvec or 50 * m
    sign = 1.0 if which == "LA" else -1.0
    rng = np.random.default_rng(seed)
    basis = ColumnStore(n, m + 1, budget=budget, device=device)
    v = basis.native(rng.standard_normal(n) if v0 is None else v0)
    v = v / norm(v)
    basis.set_column(0, v)
    j = 1
    w, h = orthogonalize(basis, product(matvec, v), 1)
    T = h.reshape(1, 1)
    c = np.ones(1)
    r, n_mv = w, 1
    while True:
        theta, S = np.linalg.eigh((T + T.T) / 2)
        order = np.argsort(-sign * theta)
        rnorm = norm(r)
        res = rnorm * np.abs(c @ S)
        want = order[:k]
        scale = np.maximum(np.abs(theta[want]), np.finfo(float).eps * max(np.abs(theta).max(), 1e-300))
        done = j >= k and bool(np.all(res[want] <= tol * scale))
        if done or j == n or n_mv >= budget_mv:
            break
        if j >= m:  # thick restart: keep the wanted Ritz vectors and a few more
            keep = order[: restart_keep(k, m)]
            basis.transform(S[:, keep])
            T, c, j = np.diag(theta[keep]), c @ S[:, keep], len(keep)
        if rnorm <= 1e-12 * max(np.abs(theta).max(), 1.0):  # invariant subspace: continue from a fresh vector
            r, _ = orthogonalize(basis, basis.native(rng.standard_normal(n)), j)
            rnorm, c = norm(r), np.zeros(j)
        v = r  # normalized in place: a step holds two long vectors beside the basis, v and its product
        v /= rnorm
        basis.set_column(j, v)
        w, h = orthogonalize(basis, product(matvec, v), j + 1)
        n_mv += 1
        T_new = np.zeros((j + 1, j + 1))
        T_new[:j, :j] = T
        T_new[:j, j] = T_new[j, :j] = h[:j]
        T_new[j, j] = h[j]
        T, r, j = T_new, w, j + 1
        c = np.zeros(j)
        c[j - 1] = 1.0
    want = order[:k]
    del v, w, r  # the eigenvectors take their room
    vecs = basis.combine(S[:, want], budget - (basis.nbytes if basis.device is None and not basis.on_disk else 0))
    storage, device = basis.storage, basis.device
    krylov = KrylovBasis(basis, j, float(np.trace(T))) if keep_basis else None
    if krylov is None:
        basis.close()
    del basis
    vals = theta[want]
    scale = np.maximum(np.abs(vals), np.finfo(float).eps * max(np.abs(theta).max(), 1e-300))
    noise = np.full(len(want), np.nan)
    if verify:
        res_true = np.empty(len(want))
        for i in range(len(want)):
            vi = native(vecs[:, i], device)
            p = product(matvec, vi)
            res_true[i] = residual_norm(p, vals[i], vi)
            n_mv += 1
            if res_true[i] > tol * scale[i]:  # the operator's own rounding may be what stops it
                noise[i] = norm(product(matvec, 3.0 * vi) / 3.0 - p) / np.sqrt(2.0)
                n_mv += 1
            release_pages(vecs)
    else:
        res_true = res[want]
    converged = (res_true <= tol * scale) | (res_true <= NOISE_FACTOR * noise)  # NaN compares False
    return Eigenpairs(eigenvalues=vals, eigenvectors=vecs, residuals=res_true, converged=converged,
                      n_matvec=n_mv, which=which, tol=tol, noise=noise, storage=storage, basis=m, krylov=krylov)


@single_blas_thread()
def krylov_tridiagonal(matvec: Matvec, v0: np.ndarray, steps: int, *, budget: float = float("inf"),
                       device: torch.device | str | None = None) -> tuple[np.ndarray, int]:
    """``T = V^T A V`` for the Krylov basis of ``v0`` after ``steps`` matvecs (full reorthogonalization, as in
    :func:`lanczos`; the basis within ``budget`` bytes of memory, the rest on disk, or on ``device``).

    ``T`` is tridiagonal up to rounding; its eigenvalues and the squared first components of its eigenvectors
    are the Gauss quadrature nodes and weights of ``v^T f(A) v`` for the normalized ``v0`` (used by SLQ).
    Stops early at an invariant subspace. Returns ``(T, matvecs)``.
    """
    n = v0.shape[0]
    steps = min(steps, n)
    V = ColumnStore(n, steps, budget=budget, device=device)
    v = V.native(v0)
    v = v / norm(v)
    T = np.zeros((steps, steps))
    for j in range(steps):
        V.set_column(j, v)
        w, h = orthogonalize(V, product(matvec, v), j + 1)
        T[:j + 1, j] = T[j, :j + 1] = h
        beta = norm(w)
        if j + 1 == steps or beta <= 1e-12 * max(np.abs(np.diag(T)[:j + 1]).max(), 1.0):
            T = T[:j + 1, :j + 1]
            return (T + T.T) / 2, j + 1
        v = w / beta
    return (T + T.T) / 2, steps
