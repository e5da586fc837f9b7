"""Hessian- and Gauss-Newton-vector products of a Problem's full-data loss, and the choice of their engine.

``H v`` for ``L(theta) = sum_c (n_c / n) L_c(theta)`` over the evaluation chunks ``c``, by one of three engines:
``graph``, double backward through a gradient graph kept at ``theta0`` (Pearlmutter 1994; PyHessian's way: one
backward pass a product, for evaluation sets of at most ``graph_chunks`` chunks); ``forward-over-reverse`` (``jvp``
of ``grad``, torch.func) and ``reverse-over-reverse`` (``vjp`` of ``grad``), chunked, at any point. ``auto`` times
the three at the first product at ``theta0`` and keeps the fastest of those that need at most half the memory budget
more than the leanest (:func:`pick_engine`), the graph only when it holds at most half the budget between products
(what it holds counts against the budget: :meth:`Products.budget_left`). The generalized Gauss-Newton product
``G v = (1/n) sum_i J_i^T (d^2 l / dz^2) J_i v`` (Schraudolph 2002) goes through the same chunks. Under ``torchrun``
every product is data-parallel: each rank's shard, added by an all-reduce.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch.func import grad, jvp

from ..errors import LandscapeError
from ..runtime.budget import measured

if TYPE_CHECKING:
    from .problem import Params, Problem

#: Hessian-vector product engines (``--hvp``): ``auto`` times ``graph`` against the ``torch.func`` one at the first
#: product and keeps the faster (see :meth:`Products.hvp`).
HVP_MODES = ("auto", "graph", "forward-over-reverse", "reverse-over-reverse")


def check_hvp_mode(mode: str) -> None:
    """Refuse an HVP engine not in :data:`HVP_MODES`."""
    if mode not in HVP_MODES:
        raise LandscapeError(f"HVP engine {mode!r} is unknown", hint=f"use --hvp {', '.join(HVP_MODES)}")


def pick_engine(costs: Mapping[str, tuple[float, float]], budget: float) -> str:
    """The fastest engine of ``costs`` (engine: seconds a product, bytes it needs) among those that need at most
    half of ``budget`` more than the leanest: memory an engine could do without is held to the share of the budget
    an analysis's own holdings get. Ties go to the first.

    >>> costs = {"graph": (0.6, 600e6), "forward-over-reverse": (1.5, 3.4e9), "reverse-over-reverse": (1.0, 640e6)}
    >>> pick_engine(costs, budget=5e9)
    'graph'
    >>> pick_engine({**costs, "graph": (0.6, 3.2e9)}, budget=5e9)
    'reverse-over-reverse'
    """
    lean = min(b for _, b in costs.values())
    within = {e: s for e, (s, b) in costs.items() if b - lean <= budget / 2}
    return min(within, key=within.__getitem__)


def standalone(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with every view copied into memory of its own, for the primals of a forward-mode product: forward
    AD gives a view's tangent the size of the view's base, so the Problem's parameters, views of one flat vector
    (see :class:`~landscape.problem.replica.Replica`), cost a whole parameter vector each in ``jvp``: 2.8 GB on
    ResNet-18 (62 tensors of a 45 MB vector) where a copy costs 45 MB."""
    return {n: t.clone() if t._base is not None else t for n, t in params.items()}


def forward_jvp(f: Callable[[Any], Any], primal: Any, tangent: Any) -> tuple[Any, Any]:
    """``torch.func.jvp(f, (primal,), (tangent,))``, a mapping of tensors as ``primal`` taken :func:`standalone`:
    every forward-mode product of the library goes through here (``tests/test_layout.py`` checks it), so that none
    pays a view's base as its tangent again (the trap was closed by hand at three call sites before)."""
    return jvp(f, (standalone(primal) if isinstance(primal, Mapping) else primal,), (tangent,))


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
        #: ``auto``'s measurements of each candidate engine: seconds a product, and bytes it added at its peak
        #: (with the graph it keeps, for ``graph``)
        self.timings: dict[str, float] | None = None
        self.footprints: dict[str, int] | None = None
        #: bytes the graph engine's gradient graph holds between products (:meth:`_build_graph`); under ``auto``
        #: a graph refused for its size keeps the bytes it was projected to hold
        self.graph_bytes = 0

    @property
    def held_bytes(self) -> int:
        """Memory this engine holds between products: the gradient graph while the graph engine keeps one."""
        return self.graph_bytes if self.grad_graph is not None else 0

    def budget_left(self) -> float:
        """The Problem's memory budget less what this engine holds between products (:attr:`held_bytes`): what an
        analysis may fill with its own vectors and chunks. Analyses that make products call :meth:`settle` first."""
        return max(0.0, self.problem.memory_budget - self.held_bytes)

    def settle(self) -> None:
        """Pick the engine now if ``auto`` has not yet (one product of a seeded random vector at theta0, its result
        dropped), or build the graph engine's graph, so that what it holds between products (:attr:`held_bytes`)
        is known before an analysis sizes its vectors to the budget (:meth:`budget_left`)."""
        if self.mode == "graph" and self.grad_graph is None:
            self._build_graph()
        elif self.mode == "auto":
            gen = torch.Generator(device=self.problem.device).manual_seed(0)
            self.hvp({n: torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
                      for n, t in self.problem.theta0.items()})

    def trials(self) -> dict[str, dict[str, float]]:
        """``auto``'s trial (:meth:`_choose`): each engine's ``seconds`` a product and the ``bytes`` it needed; empty
        when no trial ran."""
        return {e: {"seconds": t, "bytes": float(self.footprints[e])} for e, t in (self.timings or {}).items()}

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
                return forward_jvp(grad(f), x, v)[1]
            except (RuntimeError, NotImplementedError):
                self.functional_mode = "reverse-over-reverse"
        return torch.func.vjp(grad(f), x)[1](v)[0]

    def _functional_hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Params:
        def product(p: Params, v: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
            return self.hessian_vector(lambda q: self.problem._chunk_loss(q, x, y), p, v)

        return self.chunked(product, v, params)

    def _build_graph(self, limit: float = math.inf) -> bool:
        """Build the gradient graph at theta0 a chunk at a time and count what it holds between products
        (:attr:`graph_bytes`): the leaves and the gradient, and every tensor autograd saved for the backward passes
        (counted by storage address as it is saved; an address freed and reused during the build counts once, so two
        builds may differ by a few bytes), less the inputs and buffers the Problem holds anyway. After the first
        chunk, when the whole graph would hold more than ``limit`` (that chunk's saved tensors once per chunk),
        stop and return False: nothing is kept (rank 0's verdict on every rank)."""
        pb = self.problem
        held_anyway = {t.untyped_storage().data_ptr() for t in (pb.X, *pb.buffers.values())
                       if isinstance(t, torch.Tensor)}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        leaves = {n: t.detach().clone().requires_grad_(True) for n, t in pb.theta0.items()}
        own = held_anyway | {t.untyped_storage().data_ptr() for t in leaves.values()}
        fixed = 2 * pb.parameter_bytes  # the leaves and the gradient
        grads: tuple[torch.Tensor, ...] = ()
        value = torch.zeros((), dtype=pb.dtype, device=pb.device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for i, (s, e) in enumerate(pb._grad_chunks):
                loss = pb._chunk_loss(leaves, pb.X[s:e], pb.y[s:e]) * ((e - s) / pb.n)
                # a parameter the loss does not use (DINOv2's mask token) has a zero gradient, as torch.func gives
                g = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True,
                                        materialize_grads=True)
                grads = tuple(a + b for a, b in zip(grads, g)) if grads else g
                value = value + loss.detach()
                self.graph_bytes = fixed + sum(b for p, b in saved.items() if p not in own)
                if i == 0 and math.isfinite(limit):
                    projected = fixed + (self.graph_bytes - fixed) * len(pb._grad_chunks)
                    if not pb.comm.broadcast(projected <= limit):
                        self.graph_bytes = projected
                        return False
        self.grad_graph = (list(leaves.values()), grads, value)
        return True

    def _graph_hvp(self, v: Mapping[str, torch.Tensor]) -> Params:
        """Double backward through the gradient graph at theta0, built once (Pearlmutter 1994; PyHessian's way):
        each product is one backward pass instead of a forward and two backward passes."""
        pb = self.problem
        if self.grad_graph is None:
            self._build_graph()
        leaves, grads, _ = self.grad_graph
        # a gradient that does not depend on the parameters (an unused one's zeros) has no second derivative
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        hv = torch.autograd.grad([grads[i] for i in live], leaves,
                                 grad_outputs=[v[pb.names[i]].to(pb.device, pb.dtype) for i in live],
                                 retain_graph=True, allow_unused=True, materialize_grads=True)
        out = {n: h.detach() for n, h in zip(pb.names, hv)}
        pb.comm.all_reduce_(list(out.values()))
        return out

    def hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Hessian-vector product ``H v`` of the full-data loss.

        Engines (:attr:`mode`): ``graph`` (double backward through a gradient graph kept at theta0, for
        evaluation sets of at most ``graph_chunks`` chunks), ``forward-over-reverse`` and ``reverse-over-reverse``
        (torch.func, chunked, any point). ``auto`` picks one at the first product at theta0 (:meth:`_choose`).
        """
        if params is not None or self.mode == "functional":
            return self._functional_hvp(v, params)
        if self.mode == "graph":
            return self._graph_hvp(v)
        return self._choose(v)

    def _choose(self, v: Mapping[str, torch.Tensor]) -> Params:
        """``auto``'s choice at the first product at theta0. Candidates: the graph engine, for evaluation sets of
        at most ``graph_chunks`` chunks whose graph holds at most half the memory budget (:meth:`_build_graph`),
        and both torch.func engines. Each is timed after a warm-up, with the memory it adds at its peak
        (:class:`~landscape.runtime.budget.AddedMemory`; the graph's own bytes added to the graph engine's), and
        :func:`pick_engine` keeps the fastest of those within half the budget of the leanest; the torch.func
        engine for products elsewhere (at other points, and the Gauss-Newton's output-space Hessian) is picked
        the same way among the two. A forward-over-reverse that the model's ops cannot run is left out. Rank 0's
        choice holds on every rank, so that all run the same engine and get the same bits."""
        pb = self.problem
        engines = ["forward-over-reverse", "reverse-over-reverse"]
        if len(pb._grad_chunks) <= self.graph_chunks and self._build_graph(pb.memory_budget / 2):
            engines.insert(0, "graph")
        costs: dict[str, tuple[float, int]] = {}
        out: dict[str, Params] = {}
        for engine in engines:
            if engine != "graph":
                self.functional_mode = engine
            # a warm-up, then the product timed; the memory added over both
            seconds, added = measured(pb.device, lambda: out.update(product=self._hvp_by(engine, v)))
            if engine == "graph" or self.functional_mode == engine:  # else it fell back to reverse-over-reverse
                costs[engine] = (seconds, added + (self.graph_bytes if engine == "graph" else 0))
        choice = pick_engine(costs, pb.memory_budget)
        # the torch.func engine for products away from theta0: the choice itself, or the best of the two
        elsewhere = (choice if choice != "graph"
                     else pick_engine({e: c for e, c in costs.items() if e != "graph"}, pb.memory_budget))
        choice, self.functional_mode = pb.comm.broadcast((choice, elsewhere))
        self.mode = "graph" if choice == "graph" else "functional"
        if self.mode != "graph":
            self.grad_graph = None
        self.timings = {e: c[0] for e, c in costs.items()}
        self.footprints = {e: c[1] for e, c in costs.items()}
        return out["product"]

    def _hvp_by(self, engine: str, v: Mapping[str, torch.Tensor]) -> Params:
        """``H v`` at theta0 by ``graph`` or by torch.func (:attr:`functional_mode`)."""
        return self._graph_hvp(v) if engine == "graph" else self._functional_hvp(v, None)

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

            z, jv = forward_jvp(f, p, v)
            hjv = self.hessian_vector(lambda zz: self.problem.loss_fn(zz, y), z, jv)
            return torch.func.vjp(f, p)[1](hjv)[0]

        return self.chunked(product, v, params)
