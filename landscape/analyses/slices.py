"""Loss slices: the loss (and accuracy, metrics) on a 1D line or a 2D grid of parameter points.

A slice along directions ``d_1[, d_2]`` evaluates ``f(a[, b]) = L(theta0 + a d_1 [+ b d_2])`` at
``a = x[i]`` (and ``b = y[j]``). Values are stored so that ``loss[i, j]`` is the value at
``(x[i], y[j])``; the original loss-landscape code stored ``[y, x]``, which scrambles
non-square grids. Points are numbered in C order (``p = i * ny + j``) and evaluated in blocks
of fixed, aligned size, so a resumed slice evaluates exactly the same blocks as an
uninterrupted one and gives the same bits. A Problem with ``workers > 1`` evaluates that many blocks
at once (:meth:`~landscape.problem.Problem.evaluate_blocks`). Under ``torchrun`` the blocks are dealt
out to the ranks round by round (``workers`` consecutive blocks each) and each round is gathered on
rank 0, which is the only one that sees ``on_block``; the points and their bits do not depend on the
number of ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from ..problem.problem import Problem


def axis(lo: float, hi: float, steps: int) -> np.ndarray:
    """``steps`` evenly spaced coordinates on ``[lo, hi]``; 0 is hit exactly when it is a grid point.

    >>> axis(-1, 1, 5).tolist()
    [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return np.linspace(lo, hi, steps, dtype=np.float64)


def grid_coefficients(axes: Sequence[np.ndarray]) -> np.ndarray:
    """All grid points as rows ``(x[i], y[j])`` in C order (``p = i * ny + j``)."""
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def missing_blocks(done: np.ndarray, block: int) -> list[np.ndarray]:
    """Flat index arrays of the aligned blocks that still have a point to compute."""
    flat = done.reshape(-1)
    out = []
    for start in range(0, flat.size, block):
        if not flat[start:start + block].all():
            out.append(np.arange(start, min(start + block, flat.size)))
    return out


def block_points(axes: Sequence[np.ndarray], done: np.ndarray) -> Callable[[int], list[np.ndarray]]:
    """For a block size, the grid coefficients of each block :func:`missing_blocks` gives, in its order: the blocks
    :meth:`Problem.choose_strategy_for` times on a slice's own points."""
    coeffs = grid_coefficients(axes)
    return lambda block: [coeffs[b] for b in missing_blocks(done, block)]


def compute_slice(
    problem: Problem,
    directions: Sequence[Mapping[str, torch.Tensor]],
    axes: Sequence[np.ndarray],
    *,
    done: np.ndarray | None = None,
    block: int | None = None,
    on_block: Callable[[np.ndarray, Mapping[str, np.ndarray]], None] | None = None,
    ready: Mapping[int, Mapping[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate every grid point not yet ``done``; returns arrays shaped like the grid.

    ``on_block(index, values)`` is called after each block (flat indices and their values),
    which is how the scan journals progress. Points already done are left as NaN in the
    returned arrays. ``block`` defaults to the Problem's block size; when the Problem has none yet, its strategy is
    chosen by timing this slice's first blocks (:meth:`Problem.choose_strategy_for`), whose values are kept.
    ``ready`` holds such values already computed: by position in :func:`missing_blocks` ``(done, block)``.
    Under ``torchrun`` (the Problem's ``comm``) each rank computes its share of the blocks; rank 0 receives
    all of them (``on_block`` and the returned arrays), the other ranks return only their own.
    """
    shape = tuple(len(a) for a in axes)
    done = np.zeros(shape, dtype=bool) if done is None else done
    coeffs = grid_coefficients(axes)
    dirs = [problem.as_list(d) for d in directions]
    ready = dict(ready or {})
    if block is None:
        if problem.block is None:
            ready = problem.choose_strategy_for(dirs, block_points(axes, done))
        block = problem.block
    comm = problem.comm
    out: dict[str, np.ndarray] = {}
    blocks = missing_blocks(done, block)
    per_rank = problem.workers if problem.strategy == "inplace" else 1  # blocks a rank evaluates at once

    def record(idx: np.ndarray, vals: Mapping[str, np.ndarray]) -> None:
        for k, v in vals.items():
            out.setdefault(k, np.full(math.prod(shape), np.nan))[idx] = v
        if on_block is not None and comm.is_writer:
            on_block(idx, vals)

    for i, vals in sorted(ready.items()):
        record(blocks[i], vals)
    blocks = [b for i, b in enumerate(blocks) if i not in ready]
    for first in range(0, len(blocks), comm.world * per_rank):
        mine = blocks[first + comm.rank * per_rank:first + (comm.rank + 1) * per_rank]
        part = list(zip(mine, problem.evaluate_blocks([coeffs[b] for b in mine], dirs))) if mine else []
        for got in comm.gather(part) or [part]:
            for idx, vals in got:
                record(idx, vals)
    return {k: v.reshape(shape) for k, v in out.items()}
