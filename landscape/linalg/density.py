"""Spectral density by stochastic Lanczos quadrature (SLQ; Ubaru, Chen & Saad 2017; Ghorbani et al. 2019).

For each of ``n_probes`` normalized Rademacher vectors ``v``, ``steps`` Lanczos steps with full
reorthogonalization give ``T``; its eigenvalues are the nodes ``theta_k`` and the squared first components of its
eigenvectors the weights ``tau_k`` of a Gauss quadrature of the spectral measure seen from ``v``:
``sum_k tau_k theta_k^j = v^T A^j v`` exactly for ``j <= 2 steps - 1``. The density is
``phi(t) = (1/n_v) sum_v sum_k tau_k N(t; theta_k, sigma^2)``, mass 1. Nodes and weights are stored, so any
broadening can be drawn later. PyHessian's defaults: ``steps = 100``, ``n_probes = 1``,
``sigma^2 = 1e-5 max(1, lambda_max - lambda_min)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..runtime.blas import single_blas_thread
from .lanczos import krylov_tridiagonal

Matvec = Callable[[np.ndarray], np.ndarray]


#: relative size below which a quadrature node counts as a zero eigenvalue (:attr:`SpectralDensity.zero_tol`)
ZERO_TOL = 1e-4


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature ``nodes`` and ``weights`` (one row per probe; rows shorter than ``steps`` are NaN-padded)."""

    nodes: np.ndarray
    weights: np.ndarray
    n_matvec: int

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        ok = np.isfinite(self.nodes)
        return self.nodes[ok], self.weights[ok] / self.nodes.shape[0]

    def moment(self, j: int) -> np.ndarray:
        """Per probe, ``sum_k tau_k theta_k^j`` (equals ``v^T A^j v`` for ``j <= 2 steps - 1``)."""
        return np.nansum(self.weights * self.nodes ** j, axis=1)

    @property
    def zero_tol(self) -> float:
        """Nodes within ``ZERO_TOL`` of the largest ``|node|`` count as zero: a network's Hessian has a large null
        space, and the Ritz value that carries its mass lands at +-1e-8 or so by rounding, which would otherwise put
        nearly all of the mass on one side or the other from one probe to the next."""
        t, _ = self._flat()
        return ZERO_TOL * float(np.abs(t).max()) if t.size else 0.0

    @property
    def negative_mass(self) -> float:
        """Share of the spectral mass on eigenvalues below ``-zero_tol``."""
        t, w = self._flat()
        return float(w[t < -self.zero_tol].sum())

    @property
    def negative_mass_stderr(self) -> float:
        """Standard error of :attr:`negative_mass` over the probes (NaN with one probe)."""
        per_probe = np.nansum(np.where(self.nodes < -self.zero_tol, self.weights, 0.0), axis=1)
        p = len(per_probe)
        return float(per_probe.std(ddof=1) / np.sqrt(p)) if p > 1 else float("nan")

    def default_sigma2(self) -> float:
        t, _ = self._flat()
        return 1e-5 * max(1.0, float(t.max() - t.min()))

    def default_grid(self, num: int = 1000) -> np.ndarray:
        t, _ = self._flat()
        pad = 0.01 * max(1.0, float(t.max() - t.min()))
        return np.linspace(t.min() - pad, t.max() + pad, num)

    def evaluate(self, grid: np.ndarray | None = None, sigma2: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(grid, phi)``: the Gaussian-broadened density on ``grid``, normalized to mass 1 on that grid."""
        grid = self.default_grid() if grid is None else np.asarray(grid, dtype=np.float64)
        sigma2 = self.default_sigma2() if sigma2 is None else sigma2
        t, w = self._flat()
        phi = (w[None, :] * np.exp(-((grid[:, None] - t[None, :]) ** 2) / (2 * sigma2))).sum(1)
        phi /= np.sqrt(2 * np.pi * sigma2)
        mass = np.trapezoid(phi, grid) if len(grid) > 1 else 1.0
        return grid, phi / mass if mass > 0 else phi

    def write(self, group: Any) -> None:
        """Into ``group`` (an h5py group of the run file): the quadrature (``nodes``, ``weights``), the broadened
        density on its default grid (``grid``, ``values``), ``sigma2``, the negative mass with its standard error and
        the product count as attributes."""
        grid, values = self.evaluate()
        for key, data in (("nodes", self.nodes), ("weights", self.weights), ("grid", grid), ("values", values)):
            group.create_dataset(key, data=data)
        group.attrs.update({"sigma2": self.default_sigma2(), "negative_mass": self.negative_mass,
                            "negative_mass_stderr": self.negative_mass_stderr, "n_matvec": self.n_matvec})


@single_blas_thread()
def slq(matvec: Matvec, n: int, *, n_probes: int = 1, steps: int = 100, seed: int = 0,
        budget: float = float("inf"), device: torch.device | str | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectrum of a symmetric ``n x n`` operator (the basis on ``device``
    if given: :func:`landscape.linalg.lanczos.krylov_tridiagonal`).

    >>> d = slq(lambda v: np.arange(1.0, 11.0) * v, 10, steps=10)
    >>> np.round(np.sort(d.nodes[0]), 6).tolist() == list(np.arange(1.0, 11.0))
    True
    """
    rng = np.random.default_rng(seed)
    steps = min(steps, n)
    nodes = np.full((n_probes, steps), np.nan)
    weights = np.full((n_probes, steps), np.nan)
    n_mv = 0
    for p in range(n_probes):
        v = rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0
        T, used = krylov_tridiagonal(matvec, v, steps, budget=budget, device=device)
        n_mv += used
        theta, S = np.linalg.eigh(T)
        nodes[p, : len(theta)] = theta
        weights[p, : len(theta)] = S[0, :] ** 2
    return SpectralDensity(nodes=nodes, weights=weights, n_matvec=n_mv)
