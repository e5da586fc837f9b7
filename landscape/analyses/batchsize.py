"""Mini-batch against full-batch curvature: the extreme eigenvalues of the Hessian of random mini-batches.

The Hessian of a batch ``B`` of ``b`` samples, ``H_B = (1/b) sum_{i in B} H_i``, is a noisy copy of the full-data
``H``; by random-matrix arguments its extreme eigenvalues lie beyond ``H``'s and approach them as ``b`` grows, about
like ``1/b`` (Granziol et al., "Learning rates as a function of batch size: a random matrix theory approach to neural
network training", JMLR 2022). This is why the sharpness an optimizer meets at batch size ``b`` exceeds the
full-batch ``lambda_max``. For each size, ``draws`` batches drawn without replacement (batch ``j`` of size ``b`` from
numpy's generator seeded ``[seed, b, j]``: :func:`batch_indices`) get their ``lambda_max`` and ``lambda_min`` by
Lanczos; the means carry standard errors over the draws, and

    lambda_b ~ lambda_full + c / b

is fitted by least squares in ``c`` with ``lambda_full`` the full-data eigenvalue (:func:`fit_inverse_size`), with
the standard error of ``c``, the RMS of the residuals relative to ``|lambda_full|`` and, as a check of the law, the
intercept of a free two-parameter fit ``a + c' / b``.

>>> fit = fit_inverse_size(np.array([8, 32, 128]), 2.0 + 4.0 / np.array([8, 32, 128]), 2.0)
>>> round(fit["c"], 9), round(fit["intercept"], 9), fit["rms"] < 1e-12
(4.0, 2.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import h5py
import numpy as np

from ..problem.curvature import CurvatureOperator
from ..errors import LandscapeError
from ..linalg.lanczos import basis_device, lanczos
from ..problem.problem import Problem


def batch_indices(n: int, b: int, j: int, seed: int) -> np.ndarray:
    """Batch ``j`` of size ``b`` out of ``n`` samples: drawn without replacement, sorted."""
    return np.sort(np.random.default_rng([seed, b, j]).choice(n, size=b, replace=False))


def check_batch_sizes(n: int, sizes: Sequence[int]) -> None:
    """Refuse sizes outside ``[1, n)`` (the full data is ``lambda_full`` itself), before any work."""
    bad = [int(b) for b in sizes if not 1 <= int(b) < n]
    if bad:
        raise LandscapeError(f"--batch-sizes {', '.join(map(str, bad))} not below the {n} evaluation samples",
                             hint="use sizes from 1 to the number of samples minus one (the full data is λ_full)")


def fit_inverse_size(sizes: np.ndarray, means: np.ndarray, full: float) -> dict[str, float]:
    """Least squares of ``means - full = c / sizes`` in ``c``: ``c``, its standard error (NaN with one size), the
    residuals' RMS relative to ``|full|``, and the intercept ``a`` of the free fit ``a + c' / sizes`` (NaN with
    fewer than two sizes)."""
    x = 1.0 / np.asarray(sizes, dtype=np.float64)
    r = np.asarray(means, dtype=np.float64) - full
    c = float(x @ r / (x @ x))
    resid = r - c * x
    dof = len(x) - 1
    stderr = math.sqrt(float(resid @ resid) / dof / float(x @ x)) if dof > 0 else math.nan
    intercept = math.nan
    if len(x) >= 2:
        A = np.stack([np.ones_like(x), x], axis=1)
        intercept = float(np.linalg.lstsq(A, np.asarray(means, dtype=np.float64), rcond=None)[0][0])
    rms = math.sqrt(float(np.mean(resid ** 2))) / max(abs(full), 1e-300)
    return {"c": c, "c_stderr": stderr, "rms": rms, "intercept": intercept}


@dataclass(frozen=True)
class BatchSizeResult:
    """``top``/``bottom``: ``lambda_max``/``lambda_min`` of each draw (sizes x draws) with their ``*_converged``
    flags; ``full_top``/``full_bottom`` the full-data eigenvalues the fits use; ``fits``: ``top``/``bottom`` ->
    :func:`fit_inverse_size`'s numbers."""

    sizes: np.ndarray
    top: np.ndarray
    bottom: np.ndarray
    top_converged: np.ndarray
    bottom_converged: np.ndarray
    full_top: float
    full_bottom: float
    n_samples: int
    n_matvec: int

    @staticmethod
    def _stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = values.shape[1]
        mean = values.mean(axis=1)
        stderr = values.std(axis=1, ddof=1) / math.sqrt(d) if d > 1 else np.full(len(values), np.nan)
        return mean, stderr

    @property
    def fits(self) -> dict[str, dict[str, float]]:
        return {"top": fit_inverse_size(self.sizes, self._stats(self.top)[0], self.full_top),
                "bottom": fit_inverse_size(self.sizes, self._stats(self.bottom)[0], self.full_bottom)}

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"sizes": self.sizes.tolist(), "full_top": self.full_top,
                                  "full_bottom": self.full_bottom, "draws": int(self.top.shape[1]),
                                  "n_matvec": self.n_matvec}
        for k in ("top", "bottom"):
            mean, se = self._stats(getattr(self, k))
            out[f"{k}_mean"], out[f"{k}_stderr"] = mean.tolist(), [None if math.isnan(v) else v for v in se.tolist()]
            out[f"{k}_fit"] = {a: (None if math.isnan(v) else v) for a, v in self.fits[k].items()}
        return out

    def write(self, parent: h5py.Group, name: str = "batch_sizes") -> h5py.Group:
        if name in parent:
            del parent[name]
        g = parent.create_group(name)
        g.create_dataset("sizes", data=self.sizes.astype(np.int64))
        for k in ("top", "bottom", "top_converged", "bottom_converged"):
            g.create_dataset(k, data=getattr(self, k))
        attrs = {"full_top": self.full_top, "full_bottom": self.full_bottom, "n_samples": self.n_samples,
                 "n_matvec": self.n_matvec, "draws": int(self.top.shape[1])}
        for k, fit in self.fits.items():
            attrs.update({f"fit_{k}_{a}": v for a, v in fit.items()})
        for k, v in attrs.items():
            g.attrs[k] = v
        return g


def analyze_batch_sizes(problem: Problem, sizes: Sequence[int], *, draws: int = 5, full_top: float,
                        full_bottom: float, tol: float = 1e-6, max_hvp: int = 400, seed: int = 0,
                        parameters: list[str] | None = None, kind: str = "hessian",
                        progress: Callable[[str], None] | None = None) -> BatchSizeResult:
    """``lambda_max`` and ``lambda_min`` of ``draws`` random batches of each size (see the module docstring); the
    full-data eigenvalues come from the caller. Sizes must lie in ``[1, n)`` (the full data is ``lambda_full``)."""
    n = problem.n
    check_batch_sizes(n, sizes)
    sizes = np.asarray(sorted(set(int(b) for b in sizes)), dtype=np.int64)
    shape = (len(sizes), draws)
    top, bottom = np.empty(shape), np.empty(shape)
    top_ok, bottom_ok = np.empty(shape, dtype=bool), np.empty(shape, dtype=bool)
    products = 0
    for i, b in enumerate(sizes):
        for j in range(draws):
            if progress:
                progress(f"batch size {b}, draw {j + 1} of {draws}")
            op = CurvatureOperator(problem.subset(batch_indices(n, int(b), j, seed)), kind=kind, parameters=parameters)
            for which, vals, ok in (("LA", top, top_ok), ("SA", bottom, bottom_ok)):
                r = lanczos(op, op.n, k=1, which=which, tol=tol, seed=seed, max_matvec=max_hvp,
                            budget=problem.budget_left(), device=basis_device(problem.device, 1, op.n))
                vals[i, j], ok[i, j] = r.eigenvalues[0], r.converged[0]
            products += op.n_matvec
    return BatchSizeResult(sizes=sizes, top=top, bottom=bottom, top_converged=top_ok, bottom_converged=bottom_ok,
                           full_top=float(full_top), full_bottom=float(full_bottom), n_samples=n, n_matvec=products)
