"""Directions in parameter space, always keyed by parameter name.

Random directions follow Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets":
``d ~ N(0, I)`` with one tensor per parameter, then normalized against the weights ``theta``:

* ``filter`` (default): every filter ``j`` of every tensor (conv output channel, row of a
  linear weight, i.e. index ``j`` of dimension 0) is rescaled to the weight's filter norm,
  ``d_j <- d_j / (||d_j|| + 1e-10) * ||theta_j||``;
* ``layer``: the same with whole tensors;
* ``none``: the raw Gaussian.

Ignore policy: ``biasbn`` (default) gives every tensor with at most one dimension (biases,
BatchNorm weights and biases) a zero direction; ``none`` keeps them, normalized like the rest
(under ``filter`` each entry of a 1-D tensor is its own filter). BatchNorm running statistics
are buffers, never parameters, and are never perturbed.

Random numbers come from the counter-based generator of :mod:`landscape.linalg.draws`: direction ``j`` is
stream ``j`` of ``seed``, one float64 vector over all parameters in the model's parameter order,
ignored tensors included, drawn and normalized on the weights' device. A direction does not depend on
the device, the dtype or the ignore policy.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..linalg.draws import normal
from ..errors import LandscapeError

Direction = dict[str, torch.Tensor]
NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")
EPS = 1e-10


def filter_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each filter (slice along dimension 0); a 0-d tensor is one filter."""
    if t.ndim == 0:
        return t.abs().reshape(1)
    return t.reshape(t.shape[0], -1).norm(dim=1)


def check_policy(norm: str, ignore: str) -> None:
    """A normalization and an ignore policy this module knows, else a :class:`LandscapeError`."""
    if norm not in NORMS:
        raise LandscapeError(f"direction normalization {norm!r} is unknown", hint=f"use one of {', '.join(NORMS)}")
    if ignore not in IGNORES:
        raise LandscapeError(f"ignore policy {ignore!r} is unknown", hint=f"use one of {', '.join(IGNORES)}")


def normalize_direction(d: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor], *,
                        norm: str = "filter", ignore: str = "biasbn") -> Direction:
    """Rescale ``d`` against the weights ``theta`` (see the module docstring)."""
    check_policy(norm, ignore)
    out: Direction = {}
    for name, w in theta.items():
        v = d[name]
        if ignore == "biasbn" and w.ndim <= 1:
            out[name] = torch.zeros_like(v)
        elif norm == "filter":
            scale = filter_norms(w.to(v.dtype)) / (filter_norms(v) + EPS)
            out[name] = v * scale.reshape(-1, *([1] * (v.ndim - 1))) if v.ndim else v * scale[0]
        elif norm == "layer":
            out[name] = v * (w.to(v.dtype).norm() / (v.norm() + EPS))
        else:
            out[name] = v.clone()
    return out


def random_directions(theta: Mapping[str, torch.Tensor], count: int, *, seed: int, norm: str = "filter",
                      ignore: str = "biasbn", orthogonalize: bool = False) -> list[Direction]:
    """``count`` seeded Gaussian directions, normalized, as float64 CPU tensors keyed by name.

    With ``orthogonalize``, each direction after the first is Gram-Schmidt orthogonalized
    against the earlier ones (as flat vectors over all parameters); its filter norms then no
    longer match the weights exactly, which is why it is off by default.
    """
    total = sum(t.numel() for t in theta.values())
    device = next(iter(theta.values())).device if theta else torch.device("cpu")
    weights = {n: t.detach().double() for n, t in theta.items()}
    dirs: list[Direction] = []
    for j in range(count):
        flat = normal(total, seed=int(seed), stream=j, device=device)
        raw, i = {}, 0
        for n, t in theta.items():
            raw[n] = flat[i:i + t.numel()].view(tuple(t.shape))
            i += t.numel()
        d = normalize_direction(raw, weights, norm=norm, ignore=ignore)
        del flat, raw
        d = {n: v.cpu() for n, v in d.items()}
        if orthogonalize:
            for prev in dirs:
                coef = dot(d, prev) / max(dot(prev, prev), EPS)
                d = {n: d[n] - coef * prev[n] for n in d}
        dirs.append(d)
    return dirs


def difference_direction(theta_a: Mapping[str, torch.Tensor], theta_b: Mapping[str, torch.Tensor]) -> Direction:
    """``theta_b - theta_a`` by name: the interpolation ``theta_a + t d`` reaches B at ``t = 1``."""
    missing = sorted(set(theta_a) ^ set(theta_b))
    if missing:
        raise LandscapeError(f"the two checkpoints have different parameters ({', '.join(missing[:5])})",
                             hint="interpolation needs two checkpoints of the same architecture")
    bad = [n for n in theta_a if theta_a[n].shape != theta_b[n].shape]
    if bad:
        raise LandscapeError(f"the two checkpoints differ in shape at {', '.join(bad[:5])}",
                             hint="interpolation needs two checkpoints of the same architecture")
    return {n: theta_b[n].detach().cpu().double() - theta_a[n].detach().cpu().double() for n in theta_a}


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Inner product of two directions as flat vectors."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a))
