"""Auto-PGD ascent: ``max f(delta)`` over ``||delta / c||_p <= rho`` for a differentiable ``f``, p in {2, inf}.

The ascent runs in the scaled coordinates ``u = delta / c`` (``c = |w|`` for adaptive sharpness, ``1`` for plain,
``|w| + 1`` for Keskar's box), where the ellipsoid ``||delta / c||_2 <= rho`` is the ball ``||u||_2 <= rho`` and
the box ``|delta_i| <= rho c_i`` is ``||u||_inf <= rho``, so projection is exact: rescaling onto the ball, or
clipping. Coordinates with ``c_i = 0`` never move.

Schedule (Croce & Hein 2020, "Reliable evaluation of adversarial robustness...", as used for sharpness by
Andriushchenko et al. 2023, "A modern look at the relationship between sharpness and generalization"):

* a random start, uniform in the ball or box (at an exact minimum the gradient is 0 and ascent from
  ``delta = 0`` would never move);
* steepest-ascent steps in ``u``: ``eta * g_u / ||g_u||_2`` (L2) or ``eta * sign(g_u)`` (L-inf), with
  ``g_u = c * grad f``, initial ``eta = 2 rho``;
* momentum: ``u_{k+1} = P(u_k + a (z_k - u_k) + (1 - a)(u_k - u_{k-1}))``, ``z_k = P(u_k + eta s_k)``,
  ``a = 0.75`` (the first step has no momentum);
* at APGD's checkpoints (fractions 0, 0.22, then increments shrinking by 0.03 down to 0.06 of the steps),
  ``eta`` is halved and the iterate restarts from the best point when fewer than 75% of the steps since the
  last checkpoint increased ``f``, or when ``eta`` was not halved at the last checkpoint and the best value has
  not changed since;
* the best point seen (the start included) is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .draws import normal, uniform

ValueAndGrad = Callable[[torch.Tensor], tuple[float, torch.Tensor]]
NORMS = ("l2", "linf")


@dataclass(frozen=True)
class AscentResult:
    """The best ``delta`` found, ``f`` there, the ``f`` of every iterate and the number of ``f`` evaluations."""

    delta: torch.Tensor
    value: float
    history: tuple[float, ...]
    n_evals: int


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoint iterations for a run of ``steps`` steps."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps - 1e-9) for q in p if q <= 1})[1:]


def project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    """Exact projection onto ``||u||_2 <= rho`` or ``||u||_inf <= rho``."""
    if norm == "linf":
        return u.clamp(-rho, rho)
    n = float(torch.linalg.vector_norm(u))
    return u * (rho / n) if n > rho else u


def random_start(c: torch.Tensor, rho: float, norm: str, seed: int) -> torch.Tensor:
    """A uniform random point of the ball or box in ``u`` (zero where ``c = 0``), drawn on ``c``'s device by
    :mod:`landscape.linalg.draws` (stream 0: the coordinates, stream 1: the radius)."""
    mask = c != 0
    m = int(mask.sum())
    u = torch.zeros(c.numel(), dtype=torch.float64, device=c.device)
    if m:
        if norm == "linf":
            u[mask] = (uniform(m, seed=seed, device=c.device) * 2 - 1) * rho
        else:
            z = normal(m, seed=seed, device=c.device)
            r = float(uniform(1, seed=seed, stream=1)) ** (1.0 / m)
            u[mask] = z / torch.linalg.vector_norm(z) * rho * r
    return u.to(c.dtype)


def apgd(f: ValueAndGrad, c: torch.Tensor, rho: float, *, norm: str = "l2", steps: int = 20, momentum: float = 0.75,
         seed: int = 0, random_init: bool = True) -> AscentResult:
    """Maximize ``f(delta)`` over ``||delta / c||_norm <= rho`` by Auto-PGD (see the module docstring).

    ``f`` returns ``(value, gradient)`` at ``delta`` (a flat tensor shaped like ``c``). Costs ``steps + 1``
    evaluations of ``f``.

    >>> a = torch.tensor([3.0, 1.0], dtype=torch.float64)  # f = 0.5 sum a_i delta_i^2: max on the box is 2
    >>> r = apgd(lambda d: (float(0.5 * (a * d * d).sum()), a * d), torch.ones(2, dtype=torch.float64), 1.0,
    ...          norm="linf", steps=5)
    >>> round(r.value, 12)
    2.0
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
    u = random_start(c, rho, norm, seed) if random_init else torch.zeros_like(c)

    def evaluate(u: torch.Tensor) -> tuple[float, torch.Tensor]:
        val, g = f(c * u)
        return float(val), c * g

    def step_dir(g: torch.Tensor) -> torch.Tensor:
        if norm == "linf":
            return torch.sign(g)
        n = float(torch.linalg.vector_norm(g))
        return g / n if n > 0 else g

    val, g = evaluate(u)
    best_u, best, best_g, history = u, val, g, [val]
    eta = 2.0 * rho
    marks = set(checkpoints(steps))
    last_mark, improved, halved_last, best_at_mark = 0, 0, True, best
    u_prev = u
    for k in range(steps):
        z = project(u + eta * step_dir(g), rho, norm)
        u_new = z if k == 0 else project(u + momentum * (z - u) + (1 - momentum) * (u - u_prev), rho, norm)
        u_prev, u = u, u_new
        new_val, g = evaluate(u)
        history.append(new_val)
        improved += new_val > val
        val = new_val
        if val > best:
            best, best_u, best_g = val, u, g
        if k + 1 in marks:
            few = improved < 0.75 * (k + 1 - last_mark)
            stalled = not halved_last and best == best_at_mark
            halved_last = few or stalled
            if halved_last:
                eta /= 2.0
                u = u_prev = best_u
                val, g = best, best_g
            last_mark, improved, best_at_mark = k + 1, 0, best
    return AscentResult(delta=(c * best_u).detach(), value=best, history=tuple(history), n_evals=len(history))
