"""Mode connectivity: loss along the straight line and along a quadratic Bezier curve between two solutions.

Linear path ``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``; its loss barrier (Frankle et al. 2020,
"Linear Mode Connectivity and the Lottery Ticket Hypothesis"; Entezari et al. 2022) is

    B_L = max_{alpha in [0, 1]} L(theta(alpha)) - ((1 - alpha) L_A + alpha L_B)

and the error barrier the same with the error 1 - accuracy. Both are 0 for theta_A = theta_B and <= 0 on a
convex loss. Grid points outside [0, 1] are evaluated (and plotted) but do not enter the barrier.

Quadratic Bezier curve (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of
DNNs"): ``phi(t) = (1-t)^2 theta_A + 2t(1-t) theta + t^2 theta_B``; the bend ``theta`` is fitted by
minimizing ``E_{t ~ U(0,1)} L(phi(t))`` with Adam (step 0.003) over random ``t`` and minibatches, from the
midpoint. Since ``phi(t) = theta_A + 2t(1-t)(theta - theta_A) + t^2 (theta_B - theta_A)``, the curve is
evaluated with the Problem's two-direction point evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np
import torch

from ..problem.problem import Params, Problem
from ..io.runfile import encode_attr


def barrier(alpha: np.ndarray, values: np.ndarray) -> float:
    """``max_{0 <= alpha <= 1} v(alpha) - ((1 - alpha) v(0) + alpha v(1))``; ``alpha`` must hold 0 and 1."""
    alpha, values = np.asarray(alpha, dtype=np.float64), np.asarray(values, dtype=np.float64)
    i0, i1 = np.flatnonzero(np.isclose(alpha, 0.0)), np.flatnonzero(np.isclose(alpha, 1.0))
    if not len(i0) or not len(i1):
        raise ValueError("the alpha grid must contain 0 and 1")
    v0, v1 = values[i0[0]], values[i1[0]]
    inside = (alpha >= -1e-12) & (alpha <= 1 + 1e-12)
    return float(np.max(values[inside] - ((1 - alpha[inside]) * v0 + alpha[inside] * v1)))


def with_ends(alpha: np.ndarray) -> np.ndarray:
    """The sorted grid ``alpha`` with 0 and 1 on it."""
    return np.unique(np.concatenate([np.asarray(alpha, dtype=np.float64).ravel(), [0.0, 1.0]]))


def difference(a: Params, b: Params) -> Params:
    """``b - a`` by parameter name."""
    return {n: b[n].detach().to(a[n]) - a[n] for n in a}


@dataclass(frozen=True)
class Path:
    """Loss (and accuracy) along a path between A (``alpha`` or ``t`` = 0) and B (= 1)."""

    alpha: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    loss_barrier: float
    error_barrier: float
    kind: str = "linear"

    def write(self, group: h5py.Group, **attrs: object) -> None:
        group.create_dataset("alpha", data=self.alpha)
        group.create_dataset("loss", data=self.loss)
        if self.accuracy is not None:
            group.create_dataset("accuracy", data=self.accuracy)
        for k, v in {"kind": self.kind, "loss_barrier": self.loss_barrier, "error_barrier": self.error_barrier,
                     **attrs}.items():
            group.attrs[k] = encode_attr(v)


def _path(alpha: np.ndarray, vals: dict[str, np.ndarray], kind: str) -> Path:
    acc = vals.get("accuracy")
    return Path(alpha=alpha, loss=vals["loss"], accuracy=acc, loss_barrier=barrier(alpha, vals["loss"]),
                error_barrier=barrier(alpha, 1.0 - acc) if acc is not None else float("nan"), kind=kind)


def linear_path(problem: Problem, theta_b: Params, alpha: np.ndarray) -> Path:
    """Loss and accuracy at ``(1 - alpha) theta_A + alpha theta_B``, ``theta_A`` the Problem's ``theta0``
    (0 and 1 are added to the grid ``alpha`` when missing)."""
    alpha = with_ends(alpha)
    vals = problem.evaluate_points(alpha[:, None], [difference(problem.theta0, theta_b)])
    return _path(alpha, vals, "linear")


def fit_bezier(problem: Problem, theta_b: Params, *, steps: int = 300, batch: int = 128, lr: float = 0.003,
               seed: int = 0) -> Params:
    """The bend ``theta`` of the quadratic Bezier curve from ``theta0`` to ``theta_b`` of least mean loss."""
    a = problem.theta0
    theta_b = {n: theta_b[n].detach().to(a[n]) for n in a}
    bend = {n: (a[n] + theta_b[n]) / 2 for n in a}
    m = {n: torch.zeros_like(t) for n, t in bend.items()}
    v = {n: torch.zeros_like(t) for n, t in bend.items()}
    rng = np.random.default_rng(seed)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k in range(1, steps + 1):
        t = float(rng.uniform())
        w = (2 * t * (1 - t))
        point = {n: (1 - t) ** 2 * a[n] + w * bend[n] + t ** 2 * theta_b[n] for n in a}
        idx = torch.as_tensor(rng.choice(problem.n, size=min(batch, problem.n), replace=False))
        _, g = problem.loss_and_gradient(point, idx)
        for n in bend:
            gn = w * g[n]  # d phi(t) / d theta = 2t(1-t)
            m[n].mul_(b1).add_(gn, alpha=1 - b1)
            v[n].mul_(b2).addcmul_(gn, gn, value=1 - b2)
            bend[n] -= lr * (m[n] / (1 - b1 ** k)) / ((v[n] / (1 - b2 ** k)).sqrt() + eps)
    return bend


def bezier_path(problem: Problem, theta_b: Params, bend: Params, t: np.ndarray) -> Path:
    """Loss and accuracy along ``phi(t)``; its barriers are measured against the straight line between the ends."""
    t = with_ends(t)
    coeffs = np.stack([2 * t * (1 - t), t ** 2], axis=1)
    vals = problem.evaluate_points(coeffs, [difference(problem.theta0, bend), difference(problem.theta0, theta_b)])
    return _path(t, vals, "bezier")
