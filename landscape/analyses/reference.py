"""PyHessian as a reference engine: its top-k eigenvalues and trace on the same Problem, for comparable numbers.

PyHessian (Yao et al., "PyHessian: Neural Networks Through the Lens of the Hessian", 2020) finds the top
eigenvalues by power iteration with deflation, stopping each one when two successive Rayleigh quotients differ
by less than ``tol`` relative, and the trace by Rademacher Hutchinson, stopping when the running mean moves by
less than ``tol`` relative (which can happen after two probes). Users who must report numbers comparable to
papers that used it run it here through :func:`pyhessian_spectrum` on a private copy of the Problem's model,
restricted to the same parameters, in the same precision, on the same data.

Its answers are not trusted blindly: the residual ``||H v - lambda v||`` of each returned pair is recomputed with
landscape's own HVP, so the run file says how far PyHessian's eigenpairs are from being eigenpairs.
"""

from __future__ import annotations

import copy
import sys
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
import torch

from ..problem.curvature import CurvatureOperator
from ..linalg.lanczos import Eigenpairs
from ..problem.problem import Problem
from ..linalg.trace import TraceEstimate

#: PyHessian's own default for the trace's stopping rule (relative change of the running mean).
PYHESSIAN_TRACE_TOL = 1e-3


def _module():  # noqa: ANN202  (pyhessian ships no type information)
    import pyhessian  # noqa: F401  (its __init__ rebinds ``pyhessian.hessian`` to the class, so use sys.modules)

    return sys.modules["pyhessian.hessian"]


@contextmanager
def _counting(ph) -> Iterator[dict[str, int]]:  # noqa: ANN001
    """Count PyHessian's Hessian-vector products (single-batch and data-loader paths), restoring it afterwards."""
    counts = {"hvp": 0}
    single, loader = ph.hessian_vector_product, ph.hessian.dataloader_hv_product

    def counted_single(*a, **k):  # noqa: ANN002, ANN003, ANN202
        counts["hvp"] += 1
        return single(*a, **k)

    def counted_loader(self, v):  # noqa: ANN001, ANN202
        counts["hvp"] += 1
        return loader(self, v)

    ph.hessian_vector_product, ph.hessian.dataloader_hv_product = counted_single, counted_loader
    try:
        yield counts
    finally:
        ph.hessian_vector_product, ph.hessian.dataloader_hv_product = single, loader


class _Chunks:
    """The Problem's evaluation chunks as a data loader PyHessian can iterate again on every product (read on
    each pass, so streamed inputs stay on disk)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pb = self.problem
        for s in range(0, pb.n, pb.batch_size):
            yield pb.X[s:s + pb.batch_size], pb.y[s:s + pb.batch_size]


def pyhessian_spectrum(problem: Problem, *, top_k: int, tol: float, max_iter: int, trace: bool,
                       trace_max_iter: int, trace_tol: float = PYHESSIAN_TRACE_TOL,
                       parameters: Iterable[str] | None = None, seed: int = 0
                       ) -> tuple[Eigenpairs | None, TraceEstimate | None, int]:
    """PyHessian's ``eigenvalues(top_n=top_k, tol=tol, maxIter=max_iter)`` and ``trace(maxIter, tol)``.

    Returns ``(top, trace, n_hvp)``: ``top.residuals`` are recomputed with landscape's HVP and ``converged``
    means ``residual <= tol * |lambda|`` (not PyHessian's own stopping rule); ``n_hvp`` counts PyHessian's
    products only. The whole evaluation set is used, as one batch if it fits ``problem.batch_size``, otherwise
    through PyHessian's data-loader path over the Problem's chunks. Global RNG state is left untouched.
    """
    ph = _module()
    op = CurvatureOperator(problem, parameters=parameters)
    model = copy.deepcopy(problem._model)
    chosen = set(op.names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)  # PyHessian differentiates every parameter that requires grad
    cuda = problem.device.type == "cuda"
    if problem.n <= problem.batch_size:
        source = {"data": (problem.X[0:problem.n], problem.y)}
    else:
        source = {"dataloader": _Chunks(problem)}
    top = est = None
    devices = [problem.device] if cuda else []
    with torch.random.fork_rng(devices=devices), _counting(ph) as counts, torch.enable_grad(), \
            warnings.catch_warnings():
        # PyHessian builds its graph with backward(create_graph=True) on the private copy, which torch warns about
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        torch.manual_seed(seed)
        engine = ph.hessian(model, problem.loss_fn, cuda=cuda, **source)
        if top_k:
            values, vectors = engine.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_k)
            order = np.argsort(values)[::-1]
            V = np.column_stack([np.concatenate([t.detach().double().reshape(-1).cpu().numpy() for t in vectors[i]])
                                 for i in order])
            V /= np.linalg.norm(V, axis=0)
            lam = np.asarray(values, dtype=np.float64)[order]
            res = np.array([np.linalg.norm(op.matvec(V[:, i]) - lam[i] * V[:, i]) for i in range(len(lam))])
            top = Eigenpairs(eigenvalues=lam, eigenvectors=V, residuals=res, converged=res <= tol * np.abs(lam),
                             n_matvec=counts["hvp"], which="LA", tol=tol)
        if trace:
            before = counts["hvp"]
            samples = np.asarray(engine.trace(maxIter=trace_max_iter, tol=trace_tol), dtype=np.float64)
            stderr = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("inf")
            est = TraceEstimate(estimate=float(samples.mean()), stderr=stderr, n_matvec=counts["hvp"] - before,
                                method="pyhessian-hutchinson", samples=samples)
    return top, est, counts["hvp"]
