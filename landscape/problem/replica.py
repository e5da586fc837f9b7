"""A private copy of the model that is evaluated at slice points in place.

The :class:`~landscape.problem.Problem` holds one :class:`Replica` for in-place evaluation, and on a CPU may hold
more to evaluate the points of a block concurrently, one Python thread and one intra-op thread each
(``workers``, see :meth:`Problem.choose_strategy`). On a small model that uses two cores better than running each
operation on both: an operation on a few hundred kilobytes pays for handing half of its data to the other core,
and the per-call overheads of two threads overlap.

A point ``theta = origin + sum_k a_k d_k`` is written into the replica's parameters, which are views of one flat
vector, with one copy and one ``add_`` per direction. The forward pass then takes the layers that read the raw
inputs by linearity (:mod:`landscape.problem.inputlayer`) and writes a classifier's output layer class-major into the
stack of the block's outputs (:mod:`landscape.problem.outputlayer`), where the loss reduction finds them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import LandscapeError
from .inputlayer import InputLayers, OutputCache
from .losses import LossFn, class_major
from .outputlayer import OutputLayer

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
KEEP_STACK_BYTES = 64 * 2**20  # stacked-output buffers up to this size are reused from block to block

#: ``(point coefficients, [(chunk index, inputs), ...])``: the forward passes of a block, in the order they run.
Runs = Iterable[tuple[Sequence[float], Sequence[tuple[int, torch.Tensor]]]]


def views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` (one vector of all parameters) as tensors shaped like ``like``, in order."""
    out, i = [], 0
    for p in like:
        out.append(flat[i:i + p.numel()].view(p.shape))
        i += p.numel()
    return out


class Replica:
    """``model`` (a private copy: eval mode, no gradients, on the Problem's device and dtype) set up for in-place
    evaluation. Its parameters become views of :attr:`flat`; ``theta0`` and ``theta0_flat`` are shared between
    replicas and only read.

    With ``bn_batches`` (``--bn recompute``) the BatchNorm running statistics are re-estimated on those batches at
    every point. ``inputs_cache`` holds the input layers' outputs for all the replicas of one model.
    """

    def __init__(self, model: nn.Module, theta0: Sequence[torch.Tensor], theta0_flat: torch.Tensor, *,
                 inputs_cache: OutputCache, loss: LossFn, target: torch.Tensor,
                 bn_batches: Sequence[torch.Tensor] | None = None) -> None:
        self.model = model
        self.live: list[torch.Tensor] = list(model.parameters())
        self.flat = theta0_flat.clone()
        for p, view in zip(self.live, views(self.flat, self.live)):
            p.data = view
        self.theta0_flat = theta0_flat
        self.inputs = InputLayers(model, self.live, theta0, inputs_cache)
        self.output = OutputLayer(model)
        self.loss = loss
        self.target = target[:1]  # what class_major looks at
        self.bn_modules = [m for m in model.modules() if isinstance(m, BN_TYPES)]
        self.bn_batches = bn_batches
        self._stacks: dict[int, torch.Tensor] = {}

    def set_point(self, coeffs: Sequence[float], dirs: Sequence[torch.Tensor],
                  origin: Sequence[torch.Tensor] | None = None) -> None:
        """Write ``origin + sum_k coeffs[k] dirs[k]`` (origin: theta0; ``dirs`` flat vectors) into the parameters."""
        terms = [(float(c), d) for c, d in zip(coeffs, dirs) if c != 0.0]
        if origin is not None:
            torch._foreach_copy_(self.live, list(origin))
        elif terms:  # theta0 + c d written in one pass (the same arithmetic as a copy and an add_)
            c, d = terms.pop(0)
            torch.add(self.theta0_flat, d, alpha=c, out=self.flat)
        else:
            self.flat.copy_(self.theta0_flat)
        for c, d in terms:
            self.flat.add_(d, alpha=c)
        if self.bn_batches is not None:
            for m in self.bn_modules:
                m.reset_running_stats()
            self.model.train()
            for xb in self.bn_batches:
                self.model(xb)
            self.model.eval()

    def outputs(self, runs: Runs, points: int, chunks: int, dirs: Sequence[Sequence[torch.Tensor]],
                flat_dirs: Sequence[torch.Tensor], origin: Sequence[torch.Tensor] | None, *, linear: bool,
                direct: bool, precision: Callable[[], contextlib.AbstractContextManager[object]]
                ) -> list[torch.Tensor]:
        """The outputs of ``points`` points at the ``runs`` forward passes, stacked per chunk (``(points, *out)``
        each, at the replica's dtype), for the Problem's loss reduction. ``linear``: input layers by linearity
        (along ``dirs`` from theta0); ``direct``: the output layer into the stack; ``precision()``: the context
        of each forward pass."""
        per_chunk: list[list[torch.Tensor]] = [[] for _ in range(chunks)]
        stacks: dict[int, torch.Tensor | None] = {}  # chunk -> (points, C, n) stack its outputs go straight into
        routed = False
        with self.inputs.patched(dirs if linear else None), contextlib.ExitStack() as routing:
            for c, parts in runs:
                self.set_point(c, flat_dirs, origin)
                with precision():
                    for i, x in parts:
                        self.inputs.at(i, x, c)
                        if direct and not routed:
                            self.output.find(self.model, x)
                            routing.enter_context(self.output.patched())
                            routed = True
                        if direct and i not in stacks:
                            stacks[i] = self._direct_stack(i, x, points)
                        buf = stacks.get(i)
                        out = self.output.run(self.model, x, None if buf is None else buf[len(per_chunk[i])])
                        per_chunk[i].append(out)
        return [buf.transpose(1, 2) if (buf := stacks.get(i)) is not None else self._stack(i, o)
                for i, o in enumerate(per_chunk)]

    def _direct_stack(self, chunk: int, x: torch.Tensor, points: int) -> torch.Tensor | None:
        """The ``(points, C, n)`` stack that the routed output layer writes chunk ``chunk``'s outputs into, when
        there is such a layer and the loss reduces its outputs class-major; else None."""
        shape = self.output.out_shape(x)
        if shape is None or not class_major(self.loss, torch.empty(shape, device="meta"), self.target):
            return None
        return self._buffer(chunk, (points, shape[1], shape[0]))

    def _buffer(self, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A ``shape`` tensor to stack chunk ``chunk``'s outputs in, kept from block to block while the kept ones
        total at most :data:`KEEP_STACK_BYTES`: a fresh one per block costs a page fault per 4 KiB, a third of the
        reduction on a small model."""
        buf = self._stacks.get(chunk)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = torch.empty(shape, dtype=self.flat.dtype, device=self.flat.device)
            if sum(b.nbytes for b in self._stacks.values()) + buf.nbytes <= KEEP_STACK_BYTES:
                self._stacks[chunk] = buf
        return buf[:shape[0]]

    def _stack(self, chunk: int, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The outputs of one chunk as a ``(K, *out.shape)`` tensor at the replica's dtype (held class-major when
        the loss reduces fastest that way)."""
        if class_major(self.loss, outs[0], self.target):
            cm = self._buffer(chunk, (len(outs), *reversed(outs[0].shape)))
            torch.stack([o.t() for o in outs], out=cm)
            return cm.transpose(1, 2)
        buf = self._buffer(chunk, (len(outs), *outs[0].shape))
        torch.stack(list(outs), out=buf)
        return buf


def recompute_batches(model: nn.Module, X: torch.Tensor, batches: int, size: int, seed: int) -> list[torch.Tensor]:
    """The fixed seeded batches of ``X`` that ``--bn recompute`` re-estimates the BatchNorm statistics on at every
    point; ``model``'s BatchNorm layers are set to a cumulative average (the exact mean over those batches)."""
    bn_modules = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not bn_modules:
        raise LandscapeError("--bn recompute was asked for, but the model has no BatchNorm layer",
                             hint="drop --bn recompute")
    for m in bn_modules:
        m.momentum = None
    n = X.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(X.device)
    size = min(size, n)
    return [X[perm[s:s + size]] for s in range(0, min(batches * size, n), size)]


def batchnorm_check(model: nn.Module, state: dict[str, torch.Tensor], loss: LossFn, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[float, float] | None:
    """``(eval-mode loss, train-mode loss)`` of ``model`` at ``state`` (parameters and buffers) on ``x``, or None for
    a model without BatchNorm: the checkpoint's running statistics against the batch's own (what training saw). Far
    apart, frozen statistics evaluate a point the user did not mean (a briefly trained net, running averages still
    near their initial values): ``--bn recompute`` re-estimates them. Works on a copy; other random layers
    (dropout) stay in eval mode."""
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        return None
    probe = copy.deepcopy(model)
    with torch.no_grad():
        probe.load_state_dict(state, strict=False)
        frozen = float(loss(probe(x), y))
        for m in probe.modules():
            if isinstance(m, BN_TYPES):
                m.train()
        batch = float(loss(probe(x), y))
    return frozen, batch
