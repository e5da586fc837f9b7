"""Per-sample gradients ``g_i = grad l_i(theta)`` of a Problem, exact or sketched, in chunks.

* Exact: ``torch.func.vmap(torch.func.grad(l))`` over a chunk of samples (one batched backward), with
  ``randomness="different"`` so that dropout, if a model keeps it active, draws per sample; the model is
  evaluated in eval mode with the Problem's buffers. Chunks are sized to a memory budget (``c * P`` numbers per
  chunk). A model vmap cannot trace falls back to a per-sample loop, with a warning.
* Sketched (Johnson-Lindenstrauss): ``s_i = R g_i`` with ``R`` a seeded ``k x P`` Gaussian matrix of variance
  ``1/k``, computed without forming any ``g_i``: row ``r_j`` of ``R`` gives ``(r_j . g_1, ..., r_j . g_c)`` for a
  whole chunk as one forward-mode product (``jvp``) of the vector of per-sample losses. For a fixed ``x``,
  ``k ||R x||^2 / ||x||^2`` is chi-square with ``k`` degrees of freedom: squared norms and inner products are
  kept with relative standard deviation ``sqrt(2 / k)``.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import torch
from torch.func import grad, vmap

from ..linalg.draws import normal
from .problem import Problem
from .products import forward_jvp, standalone


class PerSampleWarning(UserWarning):
    """vmap could not trace the model; per-sample gradients are computed one sample at a time."""


def _flat(grads: dict[str, torch.Tensor], names: list[str], c: int, out: torch.Tensor | None = None
          ) -> torch.Tensor:
    return torch.cat([grads[n].reshape(c, -1) for n in names], dim=1, out=out)


def _single_loss(problem: Problem):  # noqa: ANN202
    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = problem.forward(params, x.unsqueeze(0))
        return problem.loss_fn(out, y.unsqueeze(0))
    return loss


def per_sample_gradients(problem: Problem, X: torch.Tensor, y: torch.Tensor, *, method: str = "vmap",
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``(len(X), P)`` per-sample gradients at theta0, parameters flattened in the Problem's order.

    ``method`` is ``vmap`` (batched) or ``loop`` (one sample at a time, the reference). ``out``, a contiguous
    ``(len(X), P)`` tensor, receives the rows (no second copy of them); it is returned.
    """
    loss = _single_loss(problem)
    p = dict(problem.theta0)
    if method == "vmap":
        g = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")(p, X, y)
        return _flat(g, problem.names, len(X), out)
    rows = [_flat({n: t.unsqueeze(0) for n, t in grad(loss)(p, X[i], y[i]).items()}, problem.names, 1)
            for i in range(len(X))]
    return torch.cat(rows, out=out)


#: Most samples per vmap chunk: larger chunks measured slower on CPU (cache), e.g. the shipped MLP's 1,438 samples
#: took 34 ms in one chunk and 21 ms in chunks of 512.
MAX_CHUNK = 512


def chunk_size(problem: Problem, memory_budget: float, extra_bytes_per_sample: float = 0) -> int:
    """Samples per chunk so that a chunk's gradients (about three copies of ``c * P`` numbers: vmap's two, measured
    1.8-2.2x on ResNet-18, and the rows handed out) and ``extra_bytes_per_sample`` for each, what the caller does
    with them, fit the budget."""
    per_sample = 3 * problem.parameter_bytes + extra_bytes_per_sample
    return max(1, min(problem.batch_size, MAX_CHUNK, int(memory_budget // per_sample)))


def iter_gradients(problem: Problem, X: torch.Tensor, y: torch.Tensor, *, memory_budget: float = 256 * 2**20,
                   out: torch.Tensor | None = None, extra_bytes_per_sample: float = 0
                   ) -> Iterator[tuple[int, torch.Tensor, str]]:
    """``(start, gradients, method)`` for consecutive chunks of ``(X, y)``; ``method`` is ``vmap``, or ``loop``
    after a warning if vmap fails. With ``out`` (``(len(X), P)``, contiguous) each chunk is written into its rows
    and the chunk yielded is that view."""
    c = chunk_size(problem, memory_budget, extra_bytes_per_sample)
    method = "vmap"
    for s in range(0, len(X), c):
        rows = None if out is None else out[s:s + c]
        try:
            g = per_sample_gradients(problem, X[s:s + c], y[s:s + c], method=method, out=rows)
        except (RuntimeError, NotImplementedError) as err:
            if method != "vmap":
                raise
            warnings.warn(f"vmap cannot trace this model ({str(err).splitlines()[0][:120]}); per-sample gradients "
                          "fall back to a loop over samples (slower, same values)", PerSampleWarning, stacklevel=2)
            method = "loop"
            g = per_sample_gradients(problem, X[s:s + c], y[s:s + c], method=method, out=rows)
        yield s, g.detach(), method
        del g  # a caller that drops its chunk before asking for the next one frees it for the next one


def gradient_matrix(problem: Problem, X: torch.Tensor, y: torch.Tensor, *, memory_budget: float = 256 * 2**20
                    ) -> torch.Tensor:
    """The whole ``(len(X), P)`` matrix of per-sample gradients, computed in chunks (:func:`iter_gradients`) that
    are written straight into it: the rows are copied once, from the per-parameter gradients into the matrix."""
    out = torch.empty(len(X), problem.num_parameters, dtype=problem.dtype, device=problem.device)
    for _ in iter_gradients(problem, X, y, memory_budget=memory_budget, out=out):
        pass
    return out


def per_sample_losses(problem: Problem, params: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor
                      ) -> torch.Tensor:
    """``(len(X),)`` losses ``l_i`` at ``params``, from one forward pass of the batch: the Problem's loss applied to
    each sample's output alone (vmapped; one sample at a time for a loss vmap cannot trace)."""
    out = problem.forward(params, X)

    def one(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return problem.loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    try:
        return vmap(one)(out, y)
    except (RuntimeError, NotImplementedError):  # e.g. a loss that reads a value (.item()) to branch on
        return torch.stack([one(o, t) for o, t in zip(out, y)])


def gradient_sum(problem: Problem, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``sum_i g_i`` over ``(X, y)`` as one float64 vector, without forming any ``g_i``: the gradient of
    ``sum_i l_i`` (:func:`per_sample_losses`), one batched backward per batch of the Problem's batch size."""
    total = torch.zeros(problem.num_parameters, dtype=torch.float64, device=problem.device)
    of_sum = grad(lambda q, xb, yb: per_sample_losses(problem, q, xb, yb).sum())
    for s in range(0, len(X), problem.batch_size):
        total += _flat(of_sum(dict(problem.theta0), X[s:s + problem.batch_size], y[s:s + problem.batch_size]),
                       problem.names, 1)[0]
    return total


def sketch_matrix_rows(problem: Problem, k: int, seed: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the seeded ``k x P`` sketch ``R`` (entries N(0, 1/k)): row ``j`` is stream ``j`` of
    ``seed`` (:mod:`landscape.linalg.draws`), drawn on the problem's device, so any block of rows is regenerated alone."""
    return torch.stack([(normal(problem.num_parameters, seed=seed, stream=j, device=problem.device) / k ** 0.5)
                        .to(problem.dtype) for j in range(start, stop)])


def sketched_gradients(problem: Problem, X: torch.Tensor, y: torch.Tensor, k: int, *, seed: int = 0,
                       group: int = 16) -> torch.Tensor:
    """``(len(X), k)`` sketches ``R g_i`` by forward-mode products, ``group`` rows of ``R`` at a time (vmapped
    over the group, so memory grows with ``group`` times one forward pass's activations)."""
    names = problem.names
    sizes = [problem.theta0[n].numel() for n in names]
    p = standalone(problem.theta0)  # primals of a forward-mode product: not views of one vector
    out = torch.empty(len(X), k, dtype=problem.dtype, device=problem.device)
    for j0 in range(0, k, group):
        R = sketch_matrix_rows(problem, k, seed, j0, min(k, j0 + group))
        tangents = {n: t.reshape(len(R), *problem.theta0[n].shape) for n, t in zip(names, R.split(sizes, dim=1))}
        for s in range(0, len(X), problem.batch_size):
            xb, yb = X[s:s + problem.batch_size], y[s:s + problem.batch_size]
            # the group's tangents batched by vmap: one forward-mode pass for all of them
            block = vmap(lambda tan: forward_jvp(lambda q: per_sample_losses(problem, q, xb, yb), p, tan)[1])(tangents)
            out[s:s + len(xb), j0:j0 + len(R)] = block.T.detach()
    return out
