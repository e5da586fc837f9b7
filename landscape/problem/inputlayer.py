"""Slice points through the input layer by linearity.

A layer that reads the raw inputs ``x`` and is linear in its parameters (``nn.Linear``, ``nn.Conv1d/2d/3d``)
gives, at the point ``theta = theta0 + sum_k a_k d_k`` with weight direction ``D_k`` and bias direction
``e_k``,

    f(x; W0 + sum_k a_k D_k, b0 + sum_k a_k e_k) = f(x; W0, b0) + sum_k a_k f(x; D_k, e_k)

because ``f(x; W, b)`` is linear in ``(W, b)`` jointly. The ``1 + K`` outputs ``Z_0 = f(x; W0, b0)`` and
``Z_k = f(x; D_k, e_k)`` are computed once per evaluation chunk and direction set; after that the layer costs one
``axpy`` per direction and point instead of a matrix product or a convolution. On the shipped MLP the first layer
is about a third of a forward pass; the shipped CNN's slice costs less than its plain forward passes this way
(``benchmarks/RESULTS.md``).

The rest of the model runs as it is. The result differs from evaluating the layer at the moved weights only by
rounding (float32: about 1e-7 relative); at ``a = 0`` it is the same bits, since ``Z_0`` is the layer's own output
at ``theta0``.

A layer qualifies when it is exactly one of those types (a subclass may override ``forward``), holds its weight
and bias as plain parameters of the model (not through a parametrization), and is called on the very tensor the
model was given (the same memory, shape and strides, e.g. after ``nn.Flatten``); any other call of it runs its own
``forward`` (and after one evaluation a layer never called on the inputs is no longer wrapped). The cached
outputs are dropped when the directions change. They are held once for all the replicas of a Problem's point
evaluator (:class:`OutputCache`; the replicas evaluate blocks at once in threads), and a layer whose outputs and the
replicas' partial sums would take more than the budget over the whole evaluation set is left alone, a decision that
depends only on the shapes and the number of replicas, so in-memory, streamed and distributed evaluations take the
same path and give the same bits.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]  # shape, strides, dtype of the layer's input


@contextlib.contextmanager
def swapped_forward(module: nn.Module, make: Callable[[Callable[[torch.Tensor], torch.Tensor]],
                                                       Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """Run ``module`` with ``make(its current forward)`` as its forward while inside; on exit (also after an
    exception) the forward it had is back, so swaps nest."""
    before = vars(module).get("forward")
    module.forward = make(module.forward)
    try:
        yield
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before


Versions = list[tuple[torch.Tensor, int]]


def versions(tensors: Iterable[torch.Tensor]) -> Versions:
    """The tensors with their in-place version counters: what a cache derived from them is keyed by."""
    return [(t, t._version) for t in tensors]


def same_versions(a: Versions, b: Versions) -> bool:
    """Whether ``a`` and ``b`` hold the very same tensors, unchanged in place since (held, so ids stay unique)."""
    return len(a) == len(b) and all(s is t and u == v for (s, u), (t, v) in zip(a, b))


@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: int  # index of the weight in the Problem's parameter list
    bias: int | None
    reads_inputs: bool | None = None  # seen called on the raw inputs (False: not in a whole patched evaluation)


class OutputCache:
    """The outputs ``Z_0, Z_1, ..., Z_K`` of the input layers per evaluation chunk, for one direction set and thread
    count, held once for every replica of a point evaluator (:class:`InputLayers` of each): the replicas share
    ``theta0`` and the directions, so one copy serves them all, and ``budget`` bounds the outputs together with the
    replicas' partial sums (each holds one per layer and chunk, see :meth:`InputLayers._routed`). Whether a layer
    fits is decided on its first chunk from the shapes, :attr:`replicas` and ``budget``. Replicas run in threads:
    lookups, fills and clears hold one lock."""

    def __init__(self, n: int, budget: float) -> None:
        self.n = n
        self.budget = budget
        self.replicas = 0  # InputLayers sharing this cache
        self.generation = 0  # counts the clears: a replica's partial sums belong to one generation
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, Layout]] = {}  # (layer, chunk) -> Z, its input
        self.refused: set[int] = set()  # layers whose outputs do not fit
        self._bytes = 0.0
        self._key: Versions = []
        self._threads = 0  # torch.get_num_threads() when the outputs were made
        self._lock = threading.Lock()

    def attach(self) -> None:
        """One more replica shares the cache: its partial sums change what fits, so the cache starts afresh."""
        with self._lock:
            self.replicas += 1
            self._clear()

    def _clear(self) -> None:
        self.entries.clear()
        self.refused.clear()
        self._bytes = 0.0
        self.generation += 1

    def use(self, key: Versions, threads: int) -> int:
        """Hold outputs for the directions ``key`` computed on ``threads`` threads from now on (others are dropped:
        outputs computed with another number of threads may differ in the last bit, so they are recomputed, and a
        point's value depends only on its block and the thread count); the cache's :attr:`generation`."""
        with self._lock:
            if not same_versions(key, self._key) or threads != self._threads:
                self._clear()
                self._key, self._threads = key, threads
            return self.generation

    def outputs(self, j: int, chunk: int, chunk_size: int, make: Callable[[], torch.Tensor], layout: Layout
                ) -> tuple[torch.Tensor, Layout] | None:
        """Layer ``j``'s stacked outputs on chunk ``chunk`` (of ``chunk_size`` samples) and the layout of the input
        they were made from: cached, or ``make()`` cached, or None when the layer's outputs over the whole evaluation
        set, ``1 + K`` of them and one partial sum per replica, do not fit the budget."""
        with self._lock:
            if j in self.refused:
                return None
            hit = self.entries.get((j, chunk))
            if hit is None:
                Z = make()
                if not any(jj == j for jj, _ in self.entries):  # the first chunk decides for the whole evaluation set
                    projected = Z[0].nbytes * (len(Z) + self.replicas) * self.n / max(1, chunk_size)
                    if self._bytes + projected > self.budget:
                        self.refused.add(j)
                        return None
                    self._bytes += projected
                hit = self.entries[(j, chunk)] = (Z, layout)
            return hit


class InputLayers:
    """The model's linear layers that may read raw inputs, and their outputs ``Z_0, Z_1, ..., Z_K`` from ``cache``
    (shared with the other replicas of the model).

    ``theta0`` and the directions are lists in the order of ``params`` (the live parameters of the model).
    Use :meth:`patched` around a block of in-place evaluations and :meth:`at` before each forward pass.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor], theta0: Sequence[torch.Tensor],
                 cache: OutputCache) -> None:
        index = {id(p): i for i, p in enumerate(params)}
        self.layers: list[_Layer] = []
        for name, m in model.named_modules():
            if type(m) not in LINEAR_TYPES:
                continue
            w, b = m._parameters.get("weight"), m._parameters.get("bias")
            if w is not None and id(w) in index and (b is None or id(b) in index):
                self.layers.append(_Layer(name, m, index[id(w)], None if b is None else index[id(b)]))
        self.theta0 = list(theta0)
        self.cache = cache
        cache.attach()
        self._generation = -1  # the cache's generation that the partial sums were made in
        self._dirs: Sequence[Sequence[torch.Tensor]] = ()
        self._partial: dict[tuple[int, int], tuple[tuple[float, ...], torch.Tensor]] = {}  # see _routed
        self._current: tuple[int, torch.Tensor, np.ndarray] | None = None
        self._ran = False  # a forward pass ran inside the current patched evaluation

    @property
    def routed(self) -> list[str]:
        """Names of the layers whose outputs the current directions take from the cache."""
        return sorted({self.layers[j].name for j, _ in self.cache.entries})

    def _direction_key(self, dirs: Sequence[Sequence[torch.Tensor]]) -> Versions:
        idx = [i for lay in self.layers for i in (lay.weight, lay.bias) if i is not None]
        return versions(d[i] for d in dirs for i in idx)

    @contextlib.contextmanager
    def patched(self, dirs: Sequence[Sequence[torch.Tensor]] | None) -> Iterator[None]:
        """Route the qualifying layers through their cached outputs for points along ``dirs`` (nothing is
        changed when ``dirs`` is None or there is no candidate layer). The modules' own ``forward`` is restored
        on exit, also after an exception."""
        if dirs is None or not self.layers:
            yield
            return
        generation = self.cache.use(self._direction_key(dirs), torch.get_num_threads())
        if generation != self._generation:
            self._partial.clear()
            self._generation = generation
        self._dirs = dirs
        ran = self._ran = False
        with contextlib.ExitStack() as stack:
            for j, lay in enumerate(self.layers):
                if lay.reads_inputs is not False:  # layers never called on the inputs are left alone after a pass
                    stack.enter_context(swapped_forward(lay.module, lambda own, j=j: self._routed(j, own)))
            try:
                yield
                ran = self._ran
            finally:
                self._current = None
        for lay in self.layers:
            if ran and lay.reads_inputs is None:
                lay.reads_inputs = False

    def at(self, chunk: int, x: torch.Tensor, coeffs: np.ndarray) -> None:
        """The next forward pass runs chunk ``chunk`` (inputs ``x``) at ``theta0 + sum_k coeffs[k] d_k``."""
        self._current = (chunk, x, coeffs)
        self._ran = True

    def _routed(self, j: int, own: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(inp: torch.Tensor) -> torch.Tensor:
            cur = self._current
            lay = self.layers[j]
            if cur is None or inp.data_ptr() != cur[1].data_ptr():
                return own(inp)
            lay.reads_inputs = True
            chunk, x, coeffs = cur
            layout = (tuple(inp.shape), tuple(inp.stride()), inp.dtype)
            hit = self.cache.outputs(j, chunk, x.shape[0], lambda: self._outputs(lay, inp), layout)
            if hit is None:
                return own(inp)
            Z, seen = hit
            if seen != layout:
                return own(inp)
            # Z_0 + sum_{k < K} c_k Z_k is kept while those coefficients repeat (along a grid row): a point then
            # costs one axpy; the sums run in the same order either way, so the bits do not depend on it
            head = tuple(coeffs[:-1].tolist())
            known = self._partial.get((j, chunk))
            if known is None or known[0] != head:
                part, fresh = Z[0], False
                for k, c in enumerate(head):
                    if c != 0.0:
                        part = part.add_(Z[k + 1], alpha=c) if fresh else torch.add(part, Z[k + 1], alpha=c)
                        fresh = True
                known = self._partial[(j, chunk)] = (head, part)
            last = float(coeffs[-1]) if len(coeffs) else 0.0
            return torch.add(known[1], Z[-1], alpha=last) if last != 0.0 else known[1].clone()

        return forward

    def _apply(self, lay: _Layer, inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(lay.module, nn.Linear):
            return F.linear(inp, w, b)
        return lay.module._conv_forward(inp, w, b)  # type: ignore[operator]

    def _outputs(self, lay: _Layer, inp: torch.Tensor) -> torch.Tensor:
        """``Z_0, Z_1, ..., Z_K`` of layer ``lay`` on the input ``inp``, stacked."""
        return torch.stack([self._apply(lay, inp, s[lay.weight], None if lay.bias is None else s[lay.bias])
                            for s in [self.theta0, *self._dirs]])
