"""Many slice points at once: how a Problem evaluates blocks of points ``theta0 + sum_k a_k d_k``.

Points are evaluated in blocks. ``inplace`` writes each point of a block into the private model's parameters and
runs a forward pass, in which, at full precision, the linear layers that read the raw inputs are evaluated by
linearity from outputs cached per direction set (:mod:`landscape.problem.inputlayer`: one cache for all replicas, of
at most the share of ``memory_budget`` that a block's stacked outputs leave; ``linear_inputs=False`` turns this
off), and a classifier's output layer writes its logits transposed straight into the stack the loss is reduced over
(:mod:`landscape.problem.outputlayer`; ``direct_output=False`` turns this off); on a CPU ``workers`` blocks are
evaluated at once, each on its own copy of the model with one thread (:mod:`landscape.problem.replica`; ``"auto"``:
by measurement). ``vmap`` runs the whole block in one batched forward with ``torch.func.vmap`` over
``functional_call``. Either way the block's outputs are stacked and the loss and accuracy of all its points are
reduced at once, which matters for small models where a cross-entropy costs half a forward pass. ``auto`` times both
on the actual model and data and keeps the faster; the block size follows from a memory budget and the measured time
per point (:mod:`landscape.problem.strategy`).

Precision (slice points only): ``full`` evaluates at the Problem's dtype; ``bf16`` runs the forward passes under
bfloat16 autocast and ``tf32`` with TensorFloat-32 matmuls (CUDA only); losses are reduced at full precision either
way.
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.func import vmap

from ..errors import LandscapeError
from ..io.stream import StreamedInputs
from .inputlayer import OutputCache, Versions, same_versions, versions
from .losses import stacked_loss
from .replica import Replica
from .strategy import OUTPUTS_SHARE, choose

if TYPE_CHECKING:
    from .problem import Params, Problem

@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """TensorFloat-32 matmuls and convolutions on Ampere and later GPUs (10-bit mantissa inputs, float32
    accumulation), the previous settings restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class PointEvaluator:
    """The evaluation of blocks of points of one :class:`~landscape.problem.problem.Problem`: its strategy
    (``inplace`` or ``vmap``), block size and workers, the model replicas, and the timing that chooses them.

    The Problem's :meth:`~landscape.problem.problem.Problem.evaluate_points` and ``evaluate_blocks`` are the
    public face; the settings (:attr:`strategy`, :attr:`block`, :attr:`workers`, ...) are read and set through
    the Problem too.
    """

    def __init__(self, problem: "Problem", *, strategy: str, max_block: int, block_seconds: float,
                 linear_inputs: bool, direct_output: bool, workers: int | str) -> None:
        if strategy not in ("auto", "inplace", "vmap"):
            raise LandscapeError(f"evaluation strategy {strategy!r} is unknown", hint="use auto, inplace or vmap")
        if problem.bn == "recompute" and strategy == "vmap":
            raise LandscapeError("--bn recompute needs the in-place strategy", hint="drop --strategy vmap")
        if workers != "auto" and (not isinstance(workers, int) or workers < 1):
            raise LandscapeError(f"workers {workers!r} is not a positive number", hint="use --workers auto or N >= 1")
        self.problem = problem
        self.strategy = strategy if strategy != "auto" else ("inplace" if problem.bn == "recompute" else "auto")
        self.max_block = max(1, int(max_block))
        self.block_seconds = block_seconds
        self.block: int | None = None
        self.linear_inputs = linear_inputs
        self.direct_output = direct_output
        self._workers_setting = workers
        self.workers = 1 if workers == "auto" else workers
        self.strategy_timings: dict[str, float] = {}
        self.strategy_memory = 0  # bytes the strategy's trials added at their peak (landscape.problem.strategy)
        self._flat_dirs: tuple[Versions, list[torch.Tensor]] = ([], [])
        # one for all the replicas, beside the blocks' stacked outputs
        self._inputs_cache = OutputCache(problem.n, (1 - OUTPUTS_SHARE) * problem.memory_budget)
        self._replicas = [self._replica(problem._model)]
        self._pool: tuple[ThreadPoolExecutor, int] | None = None

    @property
    def linear_input_layers(self) -> list[str]:
        """Names of the layers that the last full-precision slice points took by linearity from cached outputs
        (:mod:`landscape.problem.inputlayer`); empty when none qualified or :attr:`linear_inputs` is off."""
        return self._replicas[0].inputs.routed if self.linear_inputs and self.problem.precision == "full" else []

    @property
    def direct_output_layer(self) -> str:
        """Name of the output layer that the last full-precision in-place points wrote straight into the stack of
        their outputs (:mod:`landscape.problem.outputlayer`); empty when none qualified or :attr:`direct_output` is
        off."""
        return self._replicas[0].output.routed if self.direct_output and self.problem.precision == "full" else ""

    def _flat_directions(self, dirs: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each direction as one flat vector, kept while the same tensors (unchanged) are passed again."""
        key = versions(t for d in dirs for t in d)
        known, flat = self._flat_dirs
        if not same_versions(key, known):
            flat = [torch.cat([t.reshape(-1) for t in d]) for d in dirs]
            self._flat_dirs = (key, flat)
        return flat

    def _reduce(self, outs: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        """Mean loss, accuracy and metrics of K points from their stacked outputs, one ``(K, n_c, ...)`` per chunk.

        Each chunk's batch-mean loss is weighted by its sample count ``n_c / n``; the K points are reduced
        together (one cross-entropy over the stack instead of K calls).
        """
        acc: dict[str, torch.Tensor] = {}
        for (s, e), out in zip(self.problem._chunks, outs):
            yb = self.problem.y[s:e]
            # the metrics first: the loss may use the stacked outputs as its work space
            vals = {k: torch.stack([m(o, yb) for o in out]).double() * (e - s) for k, m in self.problem.metrics.items()}
            loss, correct = stacked_loss(self.problem.loss_fn, out, yb, correct=self.problem.classification,
                                         overwrite=True)
            vals["loss"] = loss.double() * (e - s)
            if correct is not None:
                vals["accuracy"] = correct.double()
            for k, v in vals.items():
                acc[k] = acc[k] + v if k in acc else v
        return {k: (v / self.problem.n).cpu().numpy() for k, v in acc.items()}

    def _forward_precision(self, precision: str) -> contextlib.AbstractContextManager[object]:
        """The context of a forward pass at ``precision``: as is (``full``), bf16 autocast, or TF32 matmuls."""
        if precision == "bf16":
            return torch.autocast(self.problem.device.type, dtype=torch.bfloat16)
        if precision == "tf32":
            return _tf32()
        return contextlib.nullcontext()

    def _replica(self, model: torch.nn.Module) -> Replica:
        pb = self.problem
        return Replica(model, pb._theta0_list, pb._theta0_flat, inputs_cache=self._inputs_cache,
                       loss=self.problem.loss_fn, target=self.problem.y, bn_batches=self.problem._bn_batches)

    def _runs(self, coeffs: np.ndarray) -> Iterator[tuple[np.ndarray, list[tuple[int, torch.Tensor]]]]:
        """``(point, [(chunk index, inputs), ...])`` in the order the forward passes run."""
        if isinstance(self.problem.X, StreamedInputs):  # chunk by chunk: each is read once for the whole block
            for i, (s, e) in enumerate(self.problem._chunks):
                x = self.problem.X[s:e]
                for c in coeffs:
                    yield c, [(i, x)]
        else:  # point by point: each point is written into the parameters once
            chunks = [(i, self.problem.X[s:e]) for i, (s, e) in enumerate(self.problem._chunks)]
            for c in coeffs:
                yield c, chunks

    def evaluate_inplace(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]],
                          origin: list[torch.Tensor] | None = None, precision: str = "full",
                          replica: Replica | None = None) -> dict[str, np.ndarray]:
        """The values at the points of one block, written one at a time into a replica's parameters (the first
        replica's unless ``replica``); ``origin`` replaces ``theta0`` as the point the coefficients start from."""
        flat = self._flat_directions(dirs)
        with torch.inference_mode():
            # layers that read the inputs go by linearity (full precision, along directions from theta0), and a
            # classifier's output layer writes into the class-major stack (full precision)
            outs = (replica or self._replicas[0]).outputs(
                self._runs(coeffs), len(coeffs), len(self.problem._chunks), dirs, flat, origin,
                linear=self.linear_inputs and origin is None and precision == "full",
                direct=self.direct_output and precision == "full",
                precision=lambda: self._forward_precision(precision))
            # losses are reduced at the Problem's precision whatever the forward pass ran at
            return self._reduce(outs)

    def _evaluate_shared(self, blocks: Sequence[np.ndarray], dirs: Sequence[list[torch.Tensor]],
                         precision: str = "full") -> list[dict[str, np.ndarray]]:
        """In-place evaluation of the blocks on :attr:`workers` replicas at once, each in its own thread with one
        intra-op thread (see :mod:`landscape.problem.replica`): replica j takes blocks j, j + workers, ... A block's
        values
        do not depend on which replica or how many blocks there are, so a resumed slice gives the same bits."""
        while len(self._replicas) < self.workers:
            self._replicas.append(self._replica(copy.deepcopy(self.problem._model)))
        if self._pool is None or self._pool[1] < self.workers:
            if self._pool is not None:
                self._pool[0].shutdown()  # idle: the last evaluation waited for all its jobs
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="landscape-replica"), self.workers
        self._flat_directions(dirs)  # made once, here, not by the threads at once

        def job(j: int) -> list[dict[str, np.ndarray]]:
            torch.set_num_threads(1)  # this thread's own setting (process-wide in older torch: restored below)
            return [self.evaluate_inplace(b, dirs, precision=precision, replica=self._replicas[j])
                    for b in blocks[j::self.workers]]

        threads = torch.get_num_threads()
        try:
            futures = [self._pool[0].submit(job, j) for j in range(min(self.workers, len(blocks)))]
            wait(futures)
        finally:
            torch.set_num_threads(threads)
        done = [f.result() for f in futures]
        return [done[i % self.workers][i // self.workers] for i in range(len(blocks))]

    def _stacked_params(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]]) -> Params:
        c = torch.as_tensor(coeffs, dtype=self.problem.dtype, device=self.problem.device)
        out: Params = {}
        for i, name in enumerate(self.problem.names):
            t0 = self.problem._theta0_list[i]
            t = t0.unsqueeze(0).expand(len(coeffs), *t0.shape)
            for k, d in enumerate(dirs):
                t = t + c[:, k].view(-1, *([1] * t0.ndim)) * d[i]
            out[name] = t
        return out

    def _evaluate_vmap(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]],
                       precision: str = "full") -> dict[str, np.ndarray]:
        P = self._stacked_params(coeffs, dirs)
        with torch.no_grad(), self._forward_precision(precision):
            outs = []
            for s, e in self.problem._chunks:
                x = self.problem.X[s:e]
                outs.append(vmap(lambda p: self.problem.forward(p, x), randomness="different")(P))
            return self._reduce([o.to(self.problem.dtype) for o in outs])

    def evaluate_blocks(self, blocks: Sequence[np.ndarray], dirs: Sequence[list[torch.Tensor]], *,
                        precision: str | None = None) -> list[dict[str, np.ndarray]]:
        """The values at the points of each block (rows of coefficients along ``dirs``, usually :attr:`block` of
        them), each evaluated as one block: the values of a point depend only on its block. With ``workers > 1``
        in-place blocks are evaluated that many at a time, on concurrent replicas of the model."""
        prec = precision or self.problem.precision
        if self.strategy == "vmap":
            return [self._evaluate_vmap(b, dirs, precision=prec) for b in blocks]
        if self.workers > 1:
            return self._evaluate_shared(blocks, dirs, precision=prec)
        return [self.evaluate_inplace(b, dirs, precision=prec) for b in blocks]

    def choose_strategy_for(self, dirs: Sequence[list[torch.Tensor]] | None = None,
                            blocks: Callable[[int], Sequence[np.ndarray]] | None = None, *, repeats: int = 3
                            ) -> dict[int, dict[str, np.ndarray]]:
        """Set :attr:`strategy`, :attr:`block` and :attr:`workers` by timing them on this model and data
        (:func:`landscape.problem.strategy.choose`); the values of ``blocks(block)`` evaluated on the way."""
        return choose(self, dirs, blocks, repeats=repeats)
