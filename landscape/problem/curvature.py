"""Curvature operators: the Hessian or the generalized Gauss-Newton matrix of a Problem as a symmetric matvec.

:class:`CurvatureOperator` turns :meth:`Problem.hvp` / :meth:`Problem.ggn_vp` into ``matvec(v)`` on flat float64
vectors (numpy arrays, or torch tensors, which stay on their device: a result is of its argument's kind), the interface of :mod:`landscape.linalg.lanczos`, :mod:`landscape.linalg.trace` and :mod:`landscape.linalg.density`. It can be
restricted to a subset of parameters (names or shell-style globs such as ``"net.0.*"``): the operator is then
the principal block ``H_SS`` (the curvature of the loss in those parameters, the others fixed), which is how
per-layer results are computed.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping

import numpy as np
import torch

from ..errors import LandscapeError
from .problem import Problem


def select_parameters(names: Iterable[str], patterns: Iterable[str] | None) -> list[str]:
    """Parameter names matching any of ``patterns`` (exact names or globs), in model order."""
    names = list(names)
    if not patterns:
        return names
    pats = list(patterns)
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not chosen:
        raise LandscapeError(f"no parameter matches {', '.join(pats)}",
                             hint=f"parameters are: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    return chosen


class CurvatureOperator:
    """``kind`` = ``hessian`` or ``ggn`` of the Problem's full-data loss at ``point`` (theta0 when None)."""

    def __init__(self, problem: Problem, *, kind: str = "hessian", parameters: Iterable[str] | None = None,
                 point: Mapping[str, torch.Tensor] | None = None) -> None:
        if kind not in ("hessian", "ggn"):
            raise LandscapeError(f"curvature {kind!r} is unknown", hint="use hessian or ggn")
        self.problem = problem
        self.kind = kind
        self.names = select_parameters(problem.names, parameters)
        self.shapes = [tuple(problem.theta0[n].shape) for n in self.names]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.n = int(sum(self.sizes))
        self.point = point
        self.n_matvec = 0

    def to_params(self, vec: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """A full parameter dict from a flat vector over the selected parameters (zeros elsewhere): one cast of
        the whole vector, viewed tensor by tensor."""
        pb = self.problem
        if not isinstance(vec, torch.Tensor):
            vec = torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float64))
        flat = vec.to(pb.device, pb.dtype)
        out = dict(zip(self.names, (t.view(shape) for t, shape in zip(flat.split(self.sizes), self.shapes))))
        return {n: out[n] if n in out else torch.zeros_like(t) for n, t in pb.theta0.items()}

    def to_vector(self, params: Mapping[str, torch.Tensor], device: torch.device | None = None
                  ) -> np.ndarray | torch.Tensor:
        """The selected parameters as one float64 vector, each tensor cast straight into its place (one pass; a
        ``double()`` copy per tensor and a concatenation cost as much as a product at 11M parameters): a numpy
        array, or a tensor on ``device``."""
        out = np.empty(self.n) if device is None else torch.empty(self.n, dtype=torch.float64, device=device)
        flat, i = torch.from_numpy(out) if device is None else out, 0  # torch casts on its threads, numpy on one
        for n, size in zip(self.names, self.sizes):
            flat[i:i + size].copy_(params[n].detach().reshape(-1))
            i += size
        return out

    def matvec(self, vec: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        device = vec.device if isinstance(vec, torch.Tensor) else None
        v = self.to_params(vec)
        fn = self.problem.hvp if self.kind == "hessian" else self.problem.ggn_vp
        self.n_matvec += 1
        return self.to_vector(fn(v, self.point), device)

    __call__ = matvec

    def budget(self) -> float:
        """What the vectors of an algorithm over this operator may hold: the Problem's memory budget less what its
        HVP engine holds between products (:meth:`~landscape.problem.products.Products.budget_left`), the engine
        picked first (:meth:`~landscape.problem.products.Products.settle`) when this is the Hessian at theta0, whose
        products may keep a graph."""
        if self.kind == "hessian" and self.point is None:
            self.problem.settle_hvp()
        return self.problem.budget_left()
