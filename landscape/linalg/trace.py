"""Stochastic trace estimators over a symmetric matvec, with standard errors.

* Hutchinson (1989): ``tr(A) ~ (1/s) sum_i z_i^T A z_i`` with Rademacher ``z``; its variance per probe is
  ``2 (||A||_F^2 - sum_i A_ii^2)``, so it is exact for a diagonal ``A``. Optionally *deflated* by known
  eigenpairs ``(lambda_j, q_j)``: ``tr(A) = sum_j lambda_j + tr(P A P)`` with ``P = I - Q Q^T``, which removes the
  outliers' share of the variance.
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with ``m`` matvecs: ``S, G`` in ``{+-1}^{n x m/3}``,
  ``Q = qr(A S)``, ``tr ~ tr(Q^T A Q) + (3/m) tr(G^T P A P G)``, ``P = I - Q Q^T``.
* Deflated by a Lanczos basis (:func:`basis_deflated`): Hutch++'s split with the orthonormal Krylov basis ``V`` of
  a top-eigenvalue run in place of ``Q``: ``tr(V^T A V)`` is the trace of Lanczos's projected matrix (no product),
  so only the ``s`` residual probes cost products (Krylov-aware trace estimation, Chen & Hallman 2023).

Both stop on a standard-error target (checked after ``min_probes``) or on a matvec budget, never on a running
mean's change, which stops after two probes and fails for negative traces (PyHessian's rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..runtime.blas import single_blas_thread
from .draws import sign_columns, signs
from .lanczos import KrylovBasis, orthogonalize
from .vectors import ColumnStore, orthonormalize, product, tensor_of

Matvec = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TraceEstimate:
    """``estimate`` of ``tr(A)`` with its standard error, the matvecs spent and the per-probe samples."""

    estimate: float
    stderr: float
    n_matvec: int
    method: str
    samples: np.ndarray
    #: where Hutch++ kept its block: ``memory`` or ``disk`` (:class:`landscape.linalg.vectors.ColumnStore`)
    storage: str = "memory"
    #: what Hutch++'s block was stored as (:func:`sketch_dtype`); every other estimator's vectors are float64
    vector_dtype: str = "float64"


def sketch_dtype(products: torch.dtype) -> np.dtype:
    """What :func:`hutchpp` stores its block as for products made in ``products``: float64 for float64 ones (the
    tests' exact checks), float32 otherwise. A float32 product is exact to about 1e-7 of its size, so storing its
    result in float32 adds rounding of the same size, far below any trace's standard error, while halving the
    block's memory and its reading (every pass over it still computes in float64).

    >>> sketch_dtype(torch.float64), sketch_dtype(torch.float32), sketch_dtype(torch.bfloat16)
    (dtype('float64'), dtype('float32'), dtype('float32'))
    """
    return np.dtype(np.float64 if products == torch.float64 else np.float32)


def _rademacher(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0


@single_blas_thread()
def hutchinson(matvec: Matvec, n: int, *, max_matvec: int = 100, stderr_target: float | None = None,
               min_probes: int = 10, seed: int = 0, deflate: tuple[np.ndarray, np.ndarray] | None = None
               ) -> TraceEstimate:
    """Rademacher Hutchinson estimate of ``tr(A)``, optionally deflated by eigenpairs ``(values, vectors)``.

    >>> A = np.diag([1.0, 2.0, 3.0])
    >>> hutchinson(lambda v: A @ v, 3, max_matvec=5).estimate  # exact for a diagonal matrix
    6.0
    """
    rng = np.random.default_rng(seed)
    base, Q = 0.0, None
    if deflate is not None:
        vals, Q = deflate
        base = float(np.sum(vals))

    def quadratic(_: int) -> float:
        z = _rademacher(rng, n)
        if Q is not None:
            z = z - Q @ (Q.T @ z)
        return float(z @ np.asarray(matvec(z), dtype=np.float64))

    arr, stderr = _probe(quadratic, max_matvec, stderr_target, min_probes)
    return TraceEstimate(estimate=base + float(arr.mean()), stderr=stderr, n_matvec=len(arr),
                         method="hutchinson" + ("-deflated" if Q is not None else ""), samples=arr)


def _probe(quadratic: Callable[[int], float], probes: int, stderr_target: float | None, min_probes: int
           ) -> tuple[np.ndarray, float]:
    """``quadratic(i)`` (probe ``i``'s ``z^T A z``) for ``i = 0, 1, ...``, at most ``probes`` of them, stopped once
    the standard error of their mean ``std / sqrt(i + 1)`` is at most ``stderr_target`` (after ``min_probes``): the
    samples and that standard error (inf for a single sample).

    >>> _probe(lambda i: float(i % 2), 100, 0.2, 10)[0].size  # stderr of 0, 1, 0, 1, ... falls below 0.2 at 10
    10
    """
    samples = np.empty(probes)
    used = probes
    for i in range(probes):
        samples[i] = quadratic(i)
        if stderr_target is not None and i + 1 >= min_probes \
                and np.std(samples[:i + 1], ddof=1) / np.sqrt(i + 1) <= stderr_target:
            used = i + 1
            break
    samples = samples[:used]
    return samples, float(np.std(samples, ddof=1) / np.sqrt(used)) if used > 1 else float("inf")


def _sign_column(seed: int, i: int, n: int, device: torch.device | None) -> torch.Tensor:
    """Column ``i`` of the sketch signs ``S``: stream ``2 i`` of ``seed`` (:func:`landscape.linalg.draws.signs`)."""
    return signs(n, seed=seed, stream=2 * i, device=device)


def _sign_rows(seed: int, k: int, a: int, b: int, device: torch.device | None) -> torch.Tensor:
    """Rows ``a:b`` of the ``(n, k)`` probe signs ``G`` (column ``j`` is stream ``2 j + 1``), transposed: a
    ``(k, b - a)`` block. The same numbers whatever rows are asked for, so ``G`` is drawn again instead of kept."""
    return sign_columns(b - a, seed=seed, streams=[2 * j + 1 for j in range(k)], start=a, device=device)


@single_blas_thread()
def hutchpp(matvec: Matvec, n: int, *, max_matvec: int = 99, seed: int = 0, budget: float = float("inf"),
            stderr_target: float | None = None, min_probes: int = 10,
            device: torch.device | str | None = None, dtype: Any = np.float64) -> TraceEstimate:
    """Hutch++ estimate of ``tr(A)`` with ``max_matvec`` matvecs (a third each for sketch, projection, residual).

    With ``stderr_target`` the residual probes stop once their standard error is below it (after ``min_probes``).

    The standard error is that of the Hutchinson part on the deflated remainder (the low-rank part is exact).
    Memory: one ``(n, m/3)`` block of ``dtype`` (:func:`sketch_dtype`: float32 for float32 products, half the
    bytes and the reading of float64; within ``budget`` bytes, else on disk: :class:`ColumnStore`), ``A S``,
    orthonormalized in place into ``Q`` by SVQB (:func:`landscape.linalg.vectors.orthonormalize`), then overwritten by
    ``P G = G - Q (Q^T G)``; the signs ``S`` and ``G`` are never held whole: a column of ``S`` and a row block of
    ``G`` are drawn when needed by the counter-based :func:`landscape.linalg.draws.signs` (one bit of a hash per sign, on
    the block's device; at 124M parameters drawing and holding both as int8 took 8 GB and longer than the products
    on a GPU, and drawing them on the host and copying them over still cost ~0.5 s a column). Beside the products this costs six passes over
    the block (Gram-Schmidt column by column cost ``O(m^2)`` column passes, which at 11M parameters took longer than
    the products: benchmarks/RESULTS.md issue 19). Directions of ``A S`` below 1e-6 of its largest singular value
    (``A`` of rank below ``m/3``) are dropped with their products: they are left to the Hutchinson part. With
    ``device`` the block lives on that torch device and ``matvec`` gets and returns tensors there (as in
    :func:`landscape.linalg.lanczos.lanczos`); the signs are drawn there too, the same numbers as on the host.

    >>> A = np.diag(np.arange(1.0, 31.0))
    >>> round(hutchpp(lambda v: A @ v, 30, max_matvec=90).estimate, 6)  # rank 30 <= m/3: exact
    465.0
    """
    k = max(1, max_matvec // 3)
    block = ColumnStore(n, k, budget=budget, device=device, dtype=dtype)
    for i in range(k):
        block.set_column(i, product(matvec, block.native(_sign_column(seed, i, n, block.device))))
    r = orthonormalize(block, k)
    low_rank = float(sum(float(q @ product(matvec, q)) for q in map(block.column, range(r))))
    Ct = torch.zeros((k, r), dtype=torch.float64, device=block.device)  # (Q^T G)^T
    for a, b in block.blocks():
        Ct += _sign_rows(seed, k, a, b, block.device) @ tensor_of(block.read(a, b, r)).T
    for a, b in block.blocks():  # P G, written over Q row block by row block
        block.write(a, _sign_rows(seed, k, a, b, block.device).sub_(Ct @ tensor_of(block.read(a, b, r))))

    def quadratic(i: int) -> float:
        g = block.column(i)
        return float(g @ product(matvec, g))

    samples, stderr = _probe(quadratic, k, stderr_target, min_probes)
    used = len(samples)
    block.close()
    return TraceEstimate(estimate=low_rank + float(samples.mean()), stderr=stderr, n_matvec=k + r + used,
                         method="hutch++", samples=samples, storage=block.storage, vector_dtype=block.dtype.name)


#: probes :func:`basis_deflated` projects off the basis in the same passes (at most): two passes over the basis
#: serve them all, and beyond a few the passes are bound by the products, not by reading the basis
PROBE_BLOCK = 8


def probe_block(n: int, probes: int, room: float) -> int:
    """How many probes of ``n`` float64 numbers :func:`basis_deflated` projects together: up to
    :data:`PROBE_BLOCK`, as many as fit ``room`` bytes beside the product of the one being evaluated, at least
    one."""
    return int(max(1, min(probes, PROBE_BLOCK, room // (8 * n) - 1)))


@single_blas_thread()
def basis_deflated(matvec: Matvec, basis: KrylovBasis, *, probes: int = 33, seed: int = 0,
                   stderr_target: float | None = None, min_probes: int = 10, budget: float = float("inf")
                   ) -> TraceEstimate:
    """``tr(A) = tr(V^T A V) + tr(P A P)``, ``P = I - V V^T``, for the orthonormal basis ``V`` a Lanczos run on ``A``
    ended with (:class:`landscape.linalg.lanczos.KrylovBasis`): the first term is known from the run, the second is
    Hutchinson's ``(1/s) sum_i z_i^T P A P z_i`` over ``probes`` Rademacher vectors projected off ``V``, one product
    each (stopping early on ``stderr_target`` after ``min_probes``).

    Unbiased for any ``V`` drawn independently of the probes (here: Lanczos's Gaussian start against counter-based
    signs), with variance ``2 (||P A P||_F^2 - sum_i (P A P)_ii^2) / s``: what the Krylov space leaves outside. A
    basis that holds the top eigenvectors removes the outliers' share, as Hutch++'s sketch ``Q = qr(A S)`` does,
    and the products Hutch++ spends on ``A S`` and ``A Q`` (two thirds of its budget) are the Lanczos run's, which a
    top-eigenvalue analysis makes anyway. The standard error is the probes'; ``n_matvec`` counts the probes only.
    The projections are Gram-Schmidt sweeps over ``V`` where it lives (memory, disk or a device), for a block of
    probes at a time (:func:`probe_block`: as many as fit ``budget`` bytes beside a basis held in memory, or a
    quarter of a GPU's free memory).

    >>> from landscape.linalg.lanczos import lanczos
    >>> A = np.diag([9.0, 8.0, 7.0] + [0.0] * 27)
    >>> top = lanczos(lambda v: A @ v, 30, k=2, keep_basis=True)
    >>> est = basis_deflated(lambda v: A @ v, top.krylov, probes=10)
    >>> top.krylov.close()
    >>> round(est.estimate, 8), round(est.stderr, 8)  # rank 3 inside the basis: nothing left outside
    (24.0, 0.0)
    """
    store = basis.store
    if store.device is not None and store.device.type == "cuda":
        room = torch.cuda.mem_get_info(store.device)[0] / 4
    else:
        room = budget - (0 if store.on_disk else store.nbytes)
    block = probe_block(store.n, probes, room)
    Z = None

    def quadratic(i: int) -> float:
        nonlocal Z
        if i % block == 0:  # the next block of probes, projected off V together
            Z = store.native(sign_columns(store.n, seed=seed, streams=[2 * j + 1 for j in
                                                                        range(i, min(probes, i + block))],
                                          device=store.device))
            Z, _ = orthogonalize(store, Z, basis.cols)
        z = Z[i % block]
        return float(z @ product(matvec, z))

    samples, stderr = _probe(quadratic, probes, stderr_target, min_probes)
    return TraceEstimate(estimate=basis.projected_trace + float(samples.mean()), stderr=stderr, n_matvec=len(samples),
                         method="lanczos-deflated", samples=samples, storage=store.storage)
