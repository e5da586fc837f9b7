"""Where the quadratic model stops holding: the validity radius of the second-order Taylor model along directions.

Along a unit direction ``u`` the loss at distance ``s`` is compared with its quadratic model at the checkpoint,

    dL(s) = L(theta + s u) - L(theta),        dQ(s) = s g.u + s^2 u^T H u / 2,

through the model's error relative to the size of its terms,

    gap(s) = |dL(s) - dQ(s)| / max(|s g.u| + s^2 |u^T H u| / 2, floor).

(Dividing by ``|dL|`` instead, the ratio of actual to predicted change that trust-region methods watch, Nocedal &
Wright, *Numerical Optimization*, 2nd ed., ch. 4, blows up wherever the slope and curvature terms cancel, which near
a minimum happens within a hair of the checkpoint.) The validity radius at level ``tau`` is the distance of the first
crossing ``gap >= tau`` from the checkpoint: a doubling grid from ``r_max / 1024`` on each side, refined by bisection,
the nearer side kept; ``inf`` when the gap stays under ``tau`` up to ``r_max`` (an exact quadratic, e.g. least
squares). On the cubic ``L(s) = a s^2 / 2 + b s^3 / 6`` (``g = 0``, ``u^T H u = a > 0``) ``gap = |b s| / (3 a)``:
the radius is ``3 tau a / |b|`` on both sides.

``floor`` keeps round-off out of the ratio where the change itself is at the loss's rounding level:
``1000 eps |L(theta)|`` for the evaluation dtype's machine epsilon. Every sharpness radius ``rho`` beyond the
validity radius is outside the quadratic regime, where eigenvalues no longer predict the loss.

>>> a, b = 1.0, 1.0
>>> r = validity_radius(lambda s: a * s * s / 2 + b * s ** 3 / 6, 0.0, a, (0.1, 0.5), r_max=4.0, rtol=1e-6)
>>> [round(x, 4) for x in r]
[0.3, 1.5]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import h5py
import numpy as np
import torch

from .directions import dot
from ..problem.problem import Problem
from ..io.runfile import encode_attr

LEVELS = (0.1, 0.5)


def validity_radius(change: Callable[[float], float], slope: float, curvature: float, levels: Sequence[float] = LEVELS,
                    *, r_max: float = 1.0, rtol: float = 1e-2, floor: float = 0.0) -> list[float]:
    """The validity radius at each of ``levels`` (see the module docstring) of the loss change ``change(s)`` along
    a direction with ``g.u = slope`` and ``u^T H u = curvature``; ``inf`` where the gap stays under a level up to
    ``r_max``."""
    cache: dict[float, float] = {}

    def gap(s: float) -> float:
        if s not in cache:
            actual = change(s)
            predicted = s * slope + 0.5 * s * s * curvature
            size = abs(s * slope) + 0.5 * s * s * abs(curvature)
            cache[s] = abs(actual - predicted) / max(size, floor, 1e-300) if math.isfinite(actual) else math.inf
        return cache[s]

    radii = []
    for level in levels:
        sides = []
        for sign in (1.0, -1.0):
            lo, hi = 0.0, r_max / 1024
            while gap(sign * hi) < level:
                lo, hi = hi, hi * 2
                if hi > r_max * (1 + 1e-12):
                    hi = math.inf
                    break
            while math.isfinite(hi) and hi - lo > rtol * hi:
                mid = 0.5 * (lo + hi)
                if gap(sign * mid) < level:
                    lo = mid
                else:
                    hi = mid
            sides.append(hi)
        radii.append(min(sides))
    return radii


@dataclass(frozen=True)
class ValidityResult:
    """Per direction (``labels``: ``top-i`` eigenvectors, ``bottom-1``, ``random-j`` filter-normalized), its slope
    ``g.u`` and curvature ``u^T H u`` (unit ``u``), and the validity radius at each level as a distance in parameter
    space (``radius``, directions x levels; ``inf``: none up to ``r_max``); ``theta_norm`` = ``||theta||`` over
    the same parameters, so ``radius / theta_norm`` is the relative radius."""

    labels: tuple[str, ...]
    slope: np.ndarray
    curvature: np.ndarray
    levels: tuple[float, ...]
    radius: np.ndarray
    theta_norm: float
    r_max: float
    n_evals: int

    def summary(self) -> dict[str, object]:
        return {"levels": list(self.levels), "theta_norm": self.theta_norm,
                "radius": {lab: [None if not math.isfinite(r) else float(r) for r in row]
                           for lab, row in zip(self.labels, self.radius)}}

    def write(self, parent: h5py.Group, name: str = "validity") -> h5py.Group:
        if name in parent:
            del parent[name]
        g = parent.create_group(name)
        g.create_dataset("labels", data=np.array(self.labels, dtype=h5py.string_dtype()))
        for k in ("slope", "curvature", "radius"):
            g.create_dataset(k, data=np.asarray(getattr(self, k), dtype=np.float64))
        g.create_dataset("levels", data=np.asarray(self.levels, dtype=np.float64))
        for k in ("theta_norm", "r_max", "n_evals"):
            g.attrs[k] = encode_attr(getattr(self, k))
        return g


def analyze_validity(problem: Problem, directions: Sequence[tuple[str, Mapping[str, torch.Tensor]]], *,
                     levels: Sequence[float] = LEVELS, r_max: float | None = None, rtol: float = 1e-2
                     ) -> ValidityResult:
    """The validity radius along each named direction (dicts by parameter name, any norm: each is scaled to unit
    length). ``r_max`` defaults to ``||theta||`` (1 where the weights are zero). Costs one gradient, one
    Hessian-vector product per direction and about ``2 (log2(1024) + log2(1/rtol))`` loss evaluations per side and
    level."""
    theta_norm = math.sqrt(dot(problem.theta0, problem.theta0))
    r_max = r_max if r_max is not None else (theta_norm if theta_norm > 0 else 1.0)
    loss0 = problem.evaluate().loss
    floor = 1000 * torch.finfo(problem.dtype).eps * abs(loss0)
    grad = problem.gradient()
    labels, slopes, curvatures, radii, evals = [], [], [], [], 0

    def change(s: float) -> float:  # along the unit direction u of the loop below
        nonlocal evals
        evals += 1
        return float(problem.evaluate_points(np.array([[s]]), [u])["loss"][0]) - loss0

    for label, d in directions:
        norm = math.sqrt(dot(d, d))
        if norm == 0:
            continue
        u = {n: (d[n].double() / norm).to(problem.device, problem.dtype) for n in problem.names}
        slope, curv = dot(grad, u), dot(problem.hvp(u), u)
        labels.append(label)
        slopes.append(slope)
        curvatures.append(curv)
        radii.append(validity_radius(change, slope, curv, levels, r_max=r_max, rtol=rtol, floor=floor))
    return ValidityResult(labels=tuple(labels), slope=np.asarray(slopes), curvature=np.asarray(curvatures),
                          levels=tuple(levels), radius=np.asarray(radii, dtype=np.float64).reshape(-1, len(levels)),
                          theta_norm=theta_norm, r_max=r_max, n_evals=evals)
