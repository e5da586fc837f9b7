"""Hessian- and Gauss-Newton-vector products of a Problem's full-data loss, and the choice of their engine.

``H v`` for ``L(theta) = sum_c (n_c / n) L_c(theta)`` over the evaluation chunks ``c``, by one of three engines:
``graph``, double backward through a gradient graph kept at ``theta0`` (Pearlmutter 1994; PyHessian's way: one
backward pass a product, for evaluation sets of at most ``graph_chunks`` chunks); ``forward-over-reverse`` (``jvp``
of ``grad``, torch.func) and ``reverse-over-reverse`` (``vjp`` of ``grad``), chunked, at any point. ``auto`` times
``graph`` against torch.func's at the first product at ``theta0`` and keeps the faster. The generalized
Gauss-Newton product ``G v = (1/n) sum_i J_i^T (d^2 l / dz^2) J_i v`` (Schraudolph 2002) goes through the same
chunks. Under ``torchrun`` every product is data-parallel: each rank's shard, added by an all-reduce.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch.func import grad, jvp

from ..errors import LandscapeError

if TYPE_CHECKING:
    from .problem import Params, Problem

#: Hessian-vector product engines (``--hvp``): ``auto`` times ``graph`` against the ``torch.func`` one at the first
#: product and keeps the faster (see :meth:`Products.hvp`).
HVP_MODES = ("auto", "graph", "forward-over-reverse", "reverse-over-reverse")


def check_hvp_mode(mode: str) -> None:
    """Refuse an HVP engine not in :data:`HVP_MODES`."""
    if mode not in HVP_MODES:
        raise LandscapeError(f"HVP engine {mode!r} is unknown", hint=f"use --hvp {', '.join(HVP_MODES)}")


class Products:
    """The curvature products of one :class:`~landscape.problem.problem.Problem` (its ``hvp`` and ``ggn_vp``), with
    the engine state: :attr:`mode` (``auto`` until the first product at ``theta0`` picks ``graph`` or
    ``functional``), :attr:`functional_mode` (torch.func's flavour, which may still fall back from
    forward-over-reverse to reverse-over-reverse) and the graph engine's leaves, gradient and loss
    (:attr:`grad_graph`)."""

    def __init__(self, problem: "Problem", hvp_mode: str, graph_chunks: int) -> None:
        check_hvp_mode(hvp_mode)
        self.problem = problem
        self.mode = "functional" if hvp_mode.endswith("reverse") else hvp_mode
        self.functional_mode = hvp_mode if hvp_mode.endswith("reverse") else "forward-over-reverse"
        self.grad_graph: tuple[list[torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor] | None = None
        self.graph_chunks = graph_chunks
        self.timings: dict[str, float] | None = None

    @property
    def engine(self) -> str:
        """The engine that computes HVPs now: ``graph``, ``forward-over-reverse`` or ``reverse-over-reverse``."""
        return "graph" if self.mode == "graph" else self.functional_mode

    def chunked(self, product: Callable[[Params, Params, torch.Tensor, torch.Tensor], Params],
                v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Params:
        """``sum_c (n_c / n) product(theta, v, X_c, y_c)`` over the evaluation chunks (of all ranks)."""
        pb = self.problem
        p = pb._params(params)
        v = {n: v[n].to(pb.device, pb.dtype) for n in p}
        total: Params = {n: torch.zeros_like(t) for n, t in p.items()}
        for s, e in pb._grad_chunks:
            out = product(p, v, pb.X[s:e], pb.y[s:e])
            torch._foreach_add_(list(total.values()), [out[n] for n in total], alpha=(e - s) / pb.n)
        pb.comm.all_reduce_(list(total.values()))
        return total

    def hessian_vector(self, f: Callable[[object], torch.Tensor], x: object, v: object) -> object:
        """``(d^2 f / dx^2) v``: forward-over-reverse (``jvp`` of ``grad``), or reverse-over-reverse (``vjp`` of
        ``grad``) for models whose ops have no forward-mode derivative of their backward (e.g. ``mse_loss`` in
        torch 2.13); the fallback, once needed, is kept."""
        if self.functional_mode == "forward-over-reverse":
            try:
                return jvp(grad(f), (x,), (v,))[1]
            except (RuntimeError, NotImplementedError):
                self.functional_mode = "reverse-over-reverse"
        return torch.func.vjp(grad(f), x)[1](v)[0]

    def _functional_hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Params:
        def product(p: Params, v: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
            return self.hessian_vector(lambda q: self.problem._chunk_loss(q, x, y), p, v)

        return self.chunked(product, v, params)

    def _graph_hvp(self, v: Mapping[str, torch.Tensor]) -> Params:
        """Double backward through the gradient graph at theta0, built once (Pearlmutter 1994; PyHessian's way):
        each product is one backward pass instead of a forward and two backward passes."""
        pb = self.problem
        if self.grad_graph is None:
            leaves = {n: t.detach().clone().requires_grad_(True) for n, t in pb.theta0.items()}
            total = sum(pb._chunk_loss(leaves, pb.X[s:e], pb.y[s:e]) * ((e - s) / pb.n) for s, e in pb._grad_chunks)
            grads = torch.autograd.grad(total, list(leaves.values()), create_graph=True)
            self.grad_graph = (list(leaves.values()), grads, total.detach())
        leaves, grads, _ = self.grad_graph
        hv = torch.autograd.grad(grads, leaves, grad_outputs=[v[n].to(pb.device, pb.dtype) for n in pb.names],
                                 retain_graph=True)
        out = {n: h.detach() for n, h in zip(pb.names, hv)}
        pb.comm.all_reduce_(list(out.values()))
        return out

    def hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Hessian-vector product ``H v`` of the full-data loss.

        Engines (:attr:`mode`): ``graph`` (double backward through a gradient graph kept at theta0, for
        evaluation sets of at most ``graph_chunks`` chunks), ``forward-over-reverse`` and ``reverse-over-reverse``
        (torch.func, chunked, any point). ``auto`` times the candidates on the first product at theta0 and keeps
        the fastest.
        """
        if params is not None or self.mode == "functional":
            return self._functional_hvp(v, params)
        if self.mode == "graph":
            return self._graph_hvp(v)
        if len(self.problem._grad_chunks) > self.graph_chunks:
            self.mode = "functional"
            return self._functional_hvp(v, None)
        timings = {}
        out: Params = {}
        for mode, fn in (("graph", lambda: self._graph_hvp(v)), ("functional", lambda: self._functional_hvp(v, None))):
            fn()  # warm-up (and, for graph, building it)
            t = time.perf_counter()
            out = fn()
            timings[mode] = time.perf_counter() - t
        # rank 0's choice, so that every rank runs the same engine and gets the same bits
        self.mode = self.problem.comm.broadcast("graph" if timings["graph"] <= timings["functional"] else "functional")
        if self.mode != "graph":
            self.grad_graph = None
        self.timings = timings
        return out

    def ggn_vp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Generalized Gauss-Newton product ``G v = (1/n) sum_i J_i^T (d^2 l / dz^2) J_i v``.

        ``J_i`` is the Jacobian of the model's output ``z_i`` in the parameters: ``J v`` by a forward-mode
        product, the loss's Hessian in output space by forward-over-reverse on the loss alone (any loss;
        ``diag(p) - p p^T`` for cross-entropy), and ``J^T`` by a vector-Jacobian product. ``G = H`` for a
        model linear in its parameters.
        """
        def product(p: Params, v: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
            def f(q: Params) -> torch.Tensor:
                return self.problem.forward(q, x)

            z, jv = jvp(f, (p,), (v,))
            hjv = self.hessian_vector(lambda zz: self.problem.loss_fn(zz, y), z, jv)
            return torch.func.vjp(f, p)[1](hjv)[0]

        return self.chunked(product, v, params)
