"""The Problem: the one place that runs the model.

A :class:`Problem` owns a private copy of the user's model, the evaluation data (moved to the
device once) and the loss. It evaluates the loss, the accuracy and extra metrics at any
parameter point ``theta = theta0 + sum_k a_k d_k``, and gives gradients and Hessian-vector
products of the full-data loss

    L(theta) = (1/n) sum_i l(f(x_i; theta), y_i)

computed in chunks, each chunk's mean loss weighted by its sample count ``n_c / n``.

The user's model is never touched: it is deep-copied once, so its weights, buffers and
train/eval flag come back bitwise unchanged, also when an exception is raised.

BatchNorm policy (``bn``): ``frozen`` (default) evaluates in eval mode with the checkpoint's
running statistics; ``recompute`` re-estimates the running statistics at every point on a
fixed set of ``bn_batches`` batches (cumulative average, train mode), then evaluates in eval
mode. Gradients and HVPs always use the frozen statistics.

Inputs larger than memory (``X`` a :class:`~landscape.io.stream.StreamedInputs`) are read from disk a chunk at a
time on every use instead of being held on the device: a block of points is evaluated chunk by chunk (each
chunk read once per block, all the block's points run on it), every gradient or HVP reads the data once. The
results are the same bits as with the inputs in memory.

Under ``torchrun`` (``comm``, see :mod:`landscape.runtime.distributed`) evaluations at points use the whole evaluation
set on every rank (the points are what is shared out), while gradients, HVPs and GGN products are data-parallel:
each rank sums over its shard of the samples and an all-reduce adds the shards.

Precision (``precision``, slice points only): ``full`` evaluates at the Problem's dtype; ``bf16`` runs the forward
passes under bfloat16 autocast and ``tf32`` with TensorFloat-32 matmuls (CUDA only); losses are reduced at full
precision either way, and gradients and HVPs are never lowered. The scan measures the error this introduces.

Evaluation strategy (``strategy``): points are evaluated in blocks. ``inplace`` writes each
point of a block into the private model's parameters and runs a forward pass, in which, at
full precision, the linear layers that read the raw inputs are evaluated by linearity from
outputs cached per direction set (:mod:`landscape.problem.inputlayer`: a cache of at most
``memory_budget`` bytes; ``linear_inputs=False`` turns this off), and a classifier's output
layer writes its logits transposed straight into the stack the loss is reduced over
(:mod:`landscape.problem.outputlayer`; ``direct_output=False`` turns this off); on a CPU ``workers``
blocks are evaluated at once, each on its own copy of the model with one thread
(:mod:`landscape.problem.replica`; ``"auto"``: by measurement);
``vmap`` runs the whole block in one batched forward with ``torch.func.vmap`` over
``functional_call``. Either way the block's outputs are stacked and the loss and accuracy of
all its points are reduced at once, which matters for small models where a cross-entropy
costs half a forward pass. ``auto`` times both on the actual model and data and keeps the
faster; the block size follows from a memory budget and the measured time per point (see
:meth:`Problem.choose_strategy`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..runtime.distributed import SINGLE, Comm, rank_device
from ..errors import LandscapeError
from .inputlayer import Versions, same_versions, versions
from .losses import LossFn, stacked_loss
from .outputs import tensor_outputs
from .replica import BN_TYPES, Replica, views
from ..io.stream import StreamedInputs

Params = dict[str, torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: a slice's own blocks are timed on N replicas (2 rounds of N blocks, N threads) only when it has this many times
#: those 2N blocks: the replicas, should they lose, then run at most a tenth of the slice
WORKERS_TIMING_SHARE = 10



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


@dataclass(frozen=True)
class Evaluation:
    """Loss (and accuracy, extra metrics) at one point, averaged over the evaluation set."""

    loss: float
    accuracy: float | None
    metrics: Mapping[str, float]


#: Hessian-vector product engines (``--hvp``): ``auto`` times ``graph`` against the ``torch.func`` one at the first
#: product and keeps the faster (see :meth:`Problem.hvp`).
HVP_MODES = ("auto", "graph", "forward-over-reverse", "reverse-over-reverse")


def check_hvp_mode(mode: str) -> None:
    """Refuse an HVP engine not in :data:`HVP_MODES`."""
    if mode not in HVP_MODES:
        raise LandscapeError(f"HVP engine {mode!r} is unknown", hint=f"use --hvp {', '.join(HVP_MODES)}")


class Problem:
    """Model + data + loss, evaluated at arbitrary parameter points.

    >>> import torch
    >>> X, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    >>> net = torch.nn.Linear(3, 2)
    >>> pb = Problem(net, X, y, torch.nn.functional.cross_entropy)
    >>> abs(pb.evaluate().loss - torch.nn.functional.cross_entropy(net(X), y).item()) < 1e-6
    True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        X: torch.Tensor | StreamedInputs,
        y: torch.Tensor,
        loss: LossFn,
        *,
        metrics: Mapping[str, Metric] | None = None,
        classification: bool | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 2048,
        bn: str = "frozen",
        bn_batches: int = 10,
        bn_batch_size: int = 128,
        strategy: str = "auto",
        max_block: int = 32,
        memory_budget: float = 256 * 2**20,
        block_seconds: float = 0.5,
        hvp_mode: str = "auto",
        graph_chunks: int = 4,
        seed: int = 0,
        comm: Comm | None = None,
        precision: str = "full",
        linear_inputs: bool = True,
        direct_output: bool = True,
        workers: int | str = "auto",
    ) -> None:
        if bn not in ("frozen", "recompute"):
            raise LandscapeError(f"BatchNorm policy {bn!r} is unknown", hint="use --bn frozen or --bn recompute")
        if strategy not in ("auto", "inplace", "vmap"):
            raise LandscapeError(f"evaluation strategy {strategy!r} is unknown", hint="use auto, inplace or vmap")
        if X.shape[0] == 0:
            raise LandscapeError("the evaluation set is empty", hint="check the data spec and --max-samples")
        self.comm = comm or SINGLE
        if precision not in ("full", "tf32", "bf16"):
            raise LandscapeError(f"precision {precision!r} is unknown", hint="use full, tf32 or bf16")
        self.precision = precision
        if self.comm.world > X.shape[0]:
            raise LandscapeError(f"{X.shape[0]} samples cannot be shared by {self.comm.world} ranks",
                                 hint="use more samples or fewer processes")
        self.device = rank_device(torch.device(device), self.comm)
        first = next(iter(model.parameters()), None)
        if first is None:
            raise LandscapeError("the model has no parameters")
        self.dtype = dtype or first.dtype
        if precision == "tf32" and self.device.type != "cuda":
            raise LandscapeError("--precision tf32 needs a CUDA device", hint="use --precision bf16 or full on a CPU")
        if precision != "full" and self.dtype != torch.float32:
            raise LandscapeError(f"--precision {precision} lowers float32 evaluation, the model is {self.dtype}",
                                 hint="drop --dtype float64 or --precision")
        # a private copy whose outputs are reduced to one tensor (landscape.outputs: logits of a ModelOutput, ...)
        self._model = tensor_outputs(copy.deepcopy(model)).to(device=self.device, dtype=self.dtype)
        self._model.eval()
        self._model.requires_grad_(False)
        self.names: list[str] = [n for n, _ in self._model.named_parameters()]
        live = [p.detach() for p in self._model.parameters()]
        # the private parameters become views of one flat vector (see Replica), so that writing a point is 1 + K
        # vector operations instead of (1 + K) per tensor (most of the cost of a point update on a small model)
        self._theta0_flat = torch.cat([p.reshape(-1) for p in live])
        self._theta0_list = views(self._theta0_flat, live)
        self.theta0: Params = dict(zip(self.names, self._theta0_list))
        self._flat_dirs: tuple[Versions, list[torch.Tensor]] = ([], [])
        self.buffers: Params = {n: b.detach().clone() for n, b in self._model.named_buffers()}
        self.loss_fn = loss
        self.metrics: dict[str, Metric] = dict(metrics or {})
        self.X = X.to(self.device, self.dtype if X.is_floating_point() else X.dtype)
        self.y = y.to(self.device, self.dtype if y.is_floating_point() else y.dtype)
        self.n = int(X.shape[0])
        if classification is None:
            classification = not y.is_floating_point() and y.ndim == 1
        self.classification = classification
        if int(batch_size) < 1:
            raise LandscapeError(f"--batch-size must be at least 1, not {batch_size}")
        self.batch_size = int(batch_size)
        self._chunks = [(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
        lo, hi = self.comm.shard(self.n)
        # derivatives are data-parallel: this rank's samples only, summed over the ranks by all-reduce
        self._grad_chunks = [(s, min(s + self.batch_size, hi)) for s in range(lo, hi, self.batch_size)]
        self.bn = bn
        self._bn_batches: list[torch.Tensor] | None = None
        if bn == "recompute":
            bn_modules = [m for m in self._model.modules() if isinstance(m, BN_TYPES)]
            if not bn_modules:
                raise LandscapeError("--bn recompute was asked for, but the model has no BatchNorm layer",
                                     hint="drop --bn recompute")
            for m in bn_modules:
                m.momentum = None  # cumulative moving average: exact mean over the batches
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).to(self.device)
            size = min(bn_batch_size, self.n)
            self._bn_batches = [self.X[perm[s:s + size]] for s in range(0, min(bn_batches * size, self.n), size)]
            if strategy == "vmap":
                raise LandscapeError("--bn recompute needs the in-place strategy", hint="drop --strategy vmap")
        self.max_block = max(1, int(max_block))
        self.memory_budget = memory_budget
        self.block_seconds = block_seconds
        self.block: int | None = None
        check_hvp_mode(hvp_mode)
        # "auto" until the first product at theta0 picks "graph" or "functional" (torch.func, whose flavour
        # _functional_mode may still fall back from forward-over-reverse to reverse-over-reverse)
        self.hvp_mode = "functional" if hvp_mode.endswith("reverse") else hvp_mode
        self._functional_mode = hvp_mode if hvp_mode.endswith("reverse") else "forward-over-reverse"
        # the graph engine's leaves, gradient (with its graph) and loss at theta0
        self._grad_graph: tuple[list[torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor] | None = None
        self.graph_chunks = graph_chunks
        self.strategy = strategy if strategy != "auto" else ("inplace" if bn == "recompute" else "auto")
        self.linear_inputs = linear_inputs
        self.direct_output = direct_output
        if workers != "auto" and (not isinstance(workers, int) or workers < 1):
            raise LandscapeError(f"workers {workers!r} is not a positive number", hint="use --workers auto or N >= 1")
        self._workers_setting = workers
        self.workers = 1 if workers == "auto" else workers
        self._replicas = [self._replica(self._model)]
        self._pool: tuple[ThreadPoolExecutor, int] | None = None

    # ------------------------------------------------------------------ basics
    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "Problem":
        """The same model (at ``theta0``), loss, metrics and settings on the samples ``indices`` only: the loss
        restricted to a class or a mini-batch, for per-class and mini-batch curvature."""
        if isinstance(self.X, StreamedInputs):
            raise LandscapeError("per-class and mini-batch curvature need the inputs in memory",
                                 hint="use --stream off (and --max-samples to fit)")
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.X.device)
        # the HVP engine this Problem settled on is kept (each subset would otherwise time the choice again)
        mode = {"graph": "graph", "functional": self._functional_mode}.get(self.hvp_mode, "auto")
        return Problem(self._model, self.X[idx], self.y[idx], self.loss_fn, metrics=self.metrics,
                       classification=self.classification, device=self.device, dtype=self.dtype,
                       batch_size=self.batch_size, bn=self.bn, memory_budget=self.memory_budget, comm=self.comm,
                       precision=self.precision, linear_inputs=self.linear_inputs, direct_output=self.direct_output,
                       hvp_mode=mode)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._theta0_list)

    @property
    def parameter_bytes(self) -> int:
        """Bytes of one copy of the parameters (at the Problem's dtype)."""
        return self._theta0_flat.numel() * self._theta0_flat.element_size()

    def as_list(self, d: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Tensors of ``d`` in parameter order, on the problem's device and dtype."""
        missing = [n for n in self.names if n not in d]
        if missing:
            raise LandscapeError(f"direction lacks parameters {', '.join(missing[:5])}",
                                 hint="directions are matched to parameters by name")
        return [d[n].to(self.device, self.dtype) for n in self.names]

    @property
    def linear_input_layers(self) -> list[str]:
        """Names of the layers that the last full-precision slice points took by linearity from cached outputs
        (:mod:`landscape.problem.inputlayer`); empty when none qualified or :attr:`linear_inputs` is off."""
        return self._replicas[0].inputs.routed if self.linear_inputs and self.precision == "full" else []

    @property
    def direct_output_layer(self) -> str:
        """Name of the output layer that the last full-precision in-place points wrote straight into the stack of
        their outputs (:mod:`landscape.problem.outputlayer`); empty when none qualified or :attr:`direct_output` is off."""
        return self._replicas[0].output.routed if self.direct_output and self.precision == "full" else ""

    # ------------------------------------------------------------------ evaluation
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
        for (s, e), out in zip(self._chunks, outs):
            yb = self.y[s:e]
            # the metrics first: the loss may use the stacked outputs as its work space
            vals = {k: torch.stack([m(o, yb) for o in out]).double() * (e - s) for k, m in self.metrics.items()}
            loss, correct = stacked_loss(self.loss_fn, out, yb, correct=self.classification, overwrite=True)
            vals["loss"] = loss.double() * (e - s)
            if correct is not None:
                vals["accuracy"] = correct.double()
            for k, v in vals.items():
                acc[k] = acc[k] + v if k in acc else v
        return {k: (v / self.n).cpu().numpy() for k, v in acc.items()}

    def _forward_precision(self, precision: str) -> contextlib.AbstractContextManager[object]:
        """The context of a forward pass at ``precision``: as is (``full``), bf16 autocast, or TF32 matmuls."""
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision == "tf32":
            return _tf32()
        return contextlib.nullcontext()

    def _replica(self, model: torch.nn.Module) -> Replica:
        return Replica(model, self._theta0_list, self._theta0_flat, n=self.n, memory_budget=self.memory_budget,
                       loss=self.loss_fn, target=self.y, bn_batches=self._bn_batches)

    def _runs(self, coeffs: np.ndarray) -> Iterator[tuple[np.ndarray, list[tuple[int, torch.Tensor]]]]:
        """``(point, [(chunk index, inputs), ...])`` in the order the forward passes run."""
        if isinstance(self.X, StreamedInputs):  # chunk by chunk: each is read once for the whole block
            for i, (s, e) in enumerate(self._chunks):
                x = self.X[s:e]
                for c in coeffs:
                    yield c, [(i, x)]
        else:  # point by point: each point is written into the parameters once
            chunks = [(i, self.X[s:e]) for i, (s, e) in enumerate(self._chunks)]
            for c in coeffs:
                yield c, chunks

    def _evaluate_inplace(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]],
                          origin: list[torch.Tensor] | None = None, precision: str = "full",
                          replica: Replica | None = None) -> dict[str, np.ndarray]:
        flat = self._flat_directions(dirs)
        with torch.inference_mode():
            # layers that read the inputs go by linearity (full precision, along directions from theta0), and a
            # classifier's output layer writes into the class-major stack (full precision)
            outs = (replica or self._replicas[0]).outputs(
                self._runs(coeffs), len(coeffs), len(self._chunks), dirs, flat, origin,
                linear=self.linear_inputs and origin is None and precision == "full",
                direct=self.direct_output and precision == "full",
                precision=lambda: self._forward_precision(precision))
            # losses are reduced at the Problem's precision whatever the forward pass ran at
            return self._reduce(outs)

    def _evaluate_shared(self, blocks: Sequence[np.ndarray], dirs: Sequence[list[torch.Tensor]],
                         precision: str = "full") -> list[dict[str, np.ndarray]]:
        """In-place evaluation of the blocks on :attr:`workers` replicas at once, each in its own thread with one
        intra-op thread (see :mod:`landscape.problem.replica`): replica j takes blocks j, j + workers, ... A block's values
        do not depend on which replica or how many blocks there are, so a resumed slice gives the same bits."""
        while len(self._replicas) < self.workers:
            self._replicas.append(self._replica(copy.deepcopy(self._model)))
        if self._pool is None or self._pool[1] < self.workers:
            if self._pool is not None:
                self._pool[0].shutdown()  # idle: the last evaluation waited for all its jobs
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="landscape-replica"), self.workers
        self._flat_directions(dirs)  # made once, here, not by the threads at once

        def job(j: int) -> list[dict[str, np.ndarray]]:
            torch.set_num_threads(1)  # this thread's own setting (process-wide in older torch: restored below)
            return [self._evaluate_inplace(b, dirs, precision=precision, replica=self._replicas[j])
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
        c = torch.as_tensor(coeffs, dtype=self.dtype, device=self.device)
        out: Params = {}
        for i, name in enumerate(self.names):
            t0 = self._theta0_list[i]
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
            for s, e in self._chunks:
                x = self.X[s:e]
                outs.append(vmap(lambda p: self.forward(p, x), randomness="different")(P))
            return self._reduce([o.to(self.dtype) for o in outs])

    def evaluate_points(self, coeffs: np.ndarray,
                        directions: Sequence[Mapping[str, torch.Tensor] | list[torch.Tensor]], *,
                        precision: str | None = None) -> dict[str, np.ndarray]:
        """Loss, accuracy and metrics at ``theta0 + sum_k coeffs[p, k] d_k`` for each row ``p``.

        A direction is a dict keyed by parameter name, or a list already made by :meth:`as_list`.
        Returns arrays of length ``len(coeffs)`` keyed ``loss``, ``accuracy`` (classification)
        and each metric name. Non-finite values are returned as they are. Points are evaluated in
        blocks of :attr:`block` (see :meth:`choose_strategy` and :meth:`evaluate_blocks`).
        """
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        dirs = self._directions(coeffs, directions)
        parts = self.evaluate_blocks([coeffs[s:s + self.block] for s in range(0, len(coeffs), self.block)], dirs,
                                     precision=precision)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def evaluate_blocks(self, blocks: Sequence[np.ndarray],
                        directions: Sequence[Mapping[str, torch.Tensor] | list[torch.Tensor]], *,
                        precision: str | None = None) -> list[dict[str, np.ndarray]]:
        """:meth:`evaluate_points` of each block (rows of coefficients, usually :attr:`block` of them), each evaluated
        as one block: the values of a point depend only on its block. With ``workers > 1`` in-place blocks are
        evaluated that many at a time, on concurrent replicas of the model."""
        dirs = self._directions(blocks[0] if blocks else np.zeros((0, len(directions))), directions)
        prec = precision or self.precision
        if self.strategy == "vmap":
            return [self._evaluate_vmap(b, dirs, precision=prec) for b in blocks]
        if self.workers > 1:
            return self._evaluate_shared(blocks, dirs, precision=prec)
        return [self._evaluate_inplace(b, dirs, precision=prec) for b in blocks]

    def _directions(self, coeffs: np.ndarray, directions: Sequence[Mapping[str, torch.Tensor] | list[torch.Tensor]]
                    ) -> list[list[torch.Tensor]]:
        """The directions as lists (:meth:`as_list`), checked against the coefficients; the strategy is chosen
        first if it has not been."""
        dirs = [d if isinstance(d, list) else self.as_list(d) for d in directions]
        if coeffs.shape[1] != len(dirs):
            raise ValueError(f"{coeffs.shape[1]} coefficients per point for {len(dirs)} directions")
        if self.block is None:
            self.choose_strategy(dirs)
        return dirs

    def evaluate(self, point: Mapping[str, torch.Tensor] | None = None) -> Evaluation:
        """Loss, accuracy and metrics at ``point`` (a full parameter dict; ``theta0`` when None)."""
        vals = {k: float(v[0]) for k, v in self._evaluate_inplace(
            np.zeros((1, 0)), (), origin=None if point is None else self.as_list(point)).items()}
        return Evaluation(loss=vals.pop("loss"), accuracy=vals.pop("accuracy", None), metrics=vals)

    def batchnorm_check(self, samples: int = 256) -> tuple[float, float] | None:
        """``(eval-mode loss, train-mode loss)`` at ``theta0`` on the first ``samples`` samples, or None for a
        model without BatchNorm: the checkpoint's running statistics against the batch's own (what training
        saw). Far apart, frozen statistics evaluate a point the user did not mean (a briefly trained net, running
        averages still near their initial values): ``--bn recompute`` re-estimates them. Works on a copy; other
        random layers (dropout) stay in eval mode."""
        if not any(isinstance(m, BN_TYPES) for m in self._model.modules()):
            return None
        x, y = self.X[:min(samples, self.n)], self.y[:min(samples, self.n)]
        probe = copy.deepcopy(self._model)
        with torch.no_grad():
            probe.load_state_dict({**self.theta0, **self.buffers}, strict=False)
            frozen = float(self.loss_fn(probe(x), y))
            for m in probe.modules():
                if isinstance(m, BN_TYPES):
                    m.train()
            batch = float(self.loss_fn(probe(x), y))
        return frozen, batch

    def choose_strategy(self, dirs: Sequence[list[torch.Tensor]] | None = None, repeats: int = 3) -> str:
        """Pick the evaluation strategy, the block size and the number of workers by timing them on this model and
        data (:meth:`choose_strategy_for`, on made-up points whose values are thrown away)."""
        self.choose_strategy_for(dirs, repeats=repeats)
        return self.strategy

    def choose_strategy_for(self, dirs: Sequence[list[torch.Tensor]] | None = None,
                            blocks: Callable[[int], Sequence[np.ndarray]] | None = None, *, repeats: int = 3
                            ) -> dict[int, dict[str, np.ndarray]]:
        """Pick the evaluation strategy and block size by timing them on this model and data, and return the values
        of the points this evaluated as the chosen settings will.

        With ``strategy="auto"``, ``inplace`` and ``vmap`` are both timed on a block of 8 points, and ``vmap`` also
        on the largest block that fits ``memory_budget`` bytes of stacked outputs (at most ``max_block``) when it
        is within 1.5x of in-place: batching gains grow with the block on a GPU. ``vmap`` is kept when it is at
        least 20% faster per point (it is dropped when it cannot trace the model or runs out of memory), with the
        block size it was fastest at. For ``inplace`` the block is what fits the memory budget and about
        ``block_seconds`` of work.

        On a CPU with ``workers="auto"``, in-place blocks are then also timed ``torch.get_num_threads()`` at a time
        on as many concurrent replicas of the model, one intra-op thread each (:mod:`landscape.problem.replica`), against
        one block at a time on all threads, both at the real block size (8-point trial blocks are biased against the
        replicas by their fixed cost per block), the replicas after a round that warms them up (see
        :meth:`_settle_workers`). They are kept when at least 5% faster per point: the copies are already within
        the memory budget, and a wrong pick costs about as much either way. ``blocks(block)`` gives the blocks to
        time this on: a slice passes its own blocks (see :func:`landscape.analyses.slices.block_points`), so that the timing
        is not wasted work, and the values of those evaluated with the setting that was kept come back, keyed by
        position in that list (a block's values depend only on its points and on that setting). A slice with fewer
        than :data:`WORKERS_TIMING_SHARE` times the 2N blocks the replicas take keeps one worker (when they lose,
        the timing would cost more than it can save); without ``blocks``, made-up points are timed and nothing comes
        back.

        Sets :attr:`strategy`, :attr:`block`, :attr:`workers` and :attr:`strategy_timings`.
        """
        if not dirs:
            dirs = [[torch.randn_like(t) * 1e-3 for t in self._theta0_list]]
        with torch.inference_mode():
            first = self._model(self.X[self._chunks[0][0]:self._chunks[0][1]])
        out_bytes = first.numel() * first.element_size() * self.n / (self._chunks[0][1] - self._chunks[0][0])
        mem_block = int(max(1, min(self.max_block, self.memory_budget // max(out_bytes, 1))))
        trial = max(1, min(mem_block, 8))

        def per_point(fn: Callable[..., object], k: int, beat: float = float("inf")) -> float:
            """Best of ``repeats`` timings per point after a warm-up (of one point on a CPU, where nothing depends
            on the block's shape); stops early once the best is over 1.5x ``beat`` (a candidate that clearly loses
            needs no precise time)."""
            coeffs = np.linspace(-0.1, 0.1, k * len(dirs)).reshape(k, len(dirs))
            fn(coeffs if self.device.type == "cuda" else coeffs[:1], dirs, precision=self.precision)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn(coeffs, dirs, precision=self.precision)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - t)
                if best / k > 1.5 * beat:
                    break
            return best / k

        def timed(name: str, k: int, beat: float = float("inf")) -> float:
            try:
                return per_point(self._evaluate_vmap if name == "vmap" else self._evaluate_inplace, k, beat)
            except Exception:  # vmap cannot run this model (or not this block): not an error, not a candidate
                if self.strategy != "auto":
                    raise
                return float("inf")

        candidates = ["inplace", "vmap"] if self.strategy == "auto" else [self.strategy]
        timings: dict[str, float] = {}
        for name in candidates:
            timings[name] = timed(name, trial, min(timings.values(), default=float("inf")))
        vmap_block = trial
        # vmap's cost per point falls with the block on a GPU (4x from 8 to 32 points on an H100, RESULTS.md): when it
        # is within reach at the trial block, it is timed at the largest block the memory budget allows too
        if "vmap" in timings and mem_block > trial and timings["vmap"] < 1.5 * timings.get("inplace", float("inf")):
            big = timed("vmap", mem_block)
            if big < timings["vmap"]:
                timings["vmap"], vmap_block = big, mem_block
        # in-place is timed on a trial block smaller than the one it then runs, which favours vmap; vmap has to
        # win clearly (20%) so that timing noise does not pick the slower strategy
        self.strategy = "vmap" if timings.get("vmap", float("inf")) < 0.8 * timings.get("inplace", float("inf")) \
            else candidates[0]
        fixed = self.strategy == "inplace" and self.device.type == "cpu" and self._workers_setting != "auto"
        self.workers = int(self._workers_setting) if fixed else 1
        per = timings[self.strategy]
        if self.strategy == "vmap":
            self.block = vmap_block  # vmap's cost per point depends on the block size: keep the one that was timed
        else:
            self.block = int(max(1, min(mem_block, self.block_seconds // max(per, 1e-9))))
        ready: dict[int, dict[str, np.ndarray]] = {}
        threads = torch.get_num_threads()
        if self.strategy == "inplace" and self._workers_setting == "auto" and self._may_share_out(threads):
            need = 1 + 2 * threads  # blocks _settle_workers evaluates, 2 * threads of them on the replicas
            if blocks is None:
                made_up = np.linspace(-0.1, 0.1, need * self.block * len(dirs)).reshape(need, self.block, len(dirs))
                self._settle_workers(list(made_up), dirs, threads, timings)
            elif len(first := blocks(self.block)) >= WORKERS_TIMING_SHARE * 2 * threads:
                ready = self._settle_workers(first, dirs, threads, timings)
        self.strategy_timings = timings
        # under torchrun every rank evaluates with rank 0's choice (timings differ from rank to rank)
        chosen = (self.strategy, self.block, self.workers)
        self.strategy, self.block, self.workers = self.comm.broadcast(chosen)
        # a rank whose own timing chose otherwise evaluated those blocks in another way; the points are shared out
        # over the ranks anyway, so values are only handed back in a single process
        return ready if self.comm.world == 1 and chosen == (self.strategy, self.block, self.workers) else {}

    def _settle_workers(self, blocks: Sequence[np.ndarray], dirs: Sequence[list[torch.Tensor]], threads: int,
                        timings: dict[str, float]) -> dict[int, dict[str, np.ndarray]]:
        """Evaluate ``blocks`` in order: one block on all threads, then two rounds of ``threads`` blocks on as many
        replicas; set :attr:`workers` from the time per point of the first block and of the second round. The
        replicas' first round only warms them up: a setting's first blocks after the other's run up to 1.5x slower
        (rounds that took turns measured that switch instead of the settings), while one block at a time runs
        warm, right after the trial timing on the same threads. A warm-up round 2x slower per point than the first
        block already settles it (one worker), without the second round. Returns the values of the blocks
        evaluated with the setting kept, by position in ``blocks`` (see :meth:`choose_strategy_for`)."""
        got: dict[int, dict[int, dict[str, np.ndarray]]] = {1: {}, threads: {}}
        per_point: dict[int, float] = {}
        at = 0
        for r, workers in enumerate((1, threads, threads)):
            part = list(range(at, at + workers))
            at += workers
            self.workers = workers
            try:
                t = time.perf_counter()
                got[workers].update(zip(part, self.evaluate_blocks([blocks[i] for i in part], dirs)))
                t = time.perf_counter() - t
            finally:
                self.workers = 1
            per_point[workers] = t / sum(len(blocks[i]) for i in part)  # the second round's replaces the first's
            if r == 1 and per_point[threads] > 2 * per_point[1]:
                break  # the warm-up round already loses clearly
        one, shared = per_point[1], per_point[threads]
        timings[f"inplace x1 ({self.block})"], timings[f"inplace x{threads} ({self.block})"] = one, shared
        self.workers = threads if shared < 0.95 * one else 1
        return got[self.workers]

    def _may_share_out(self, threads: int) -> bool:
        """Whether concurrent replicas are worth timing: more than one intra-op thread on a CPU, inputs in memory,
        and a model whose copies take at most an eighth of the memory budget."""
        return (threads > 1 and self.device.type == "cpu" and not isinstance(self.X, StreamedInputs)
                and self.parameter_bytes * (threads - 1) <= self.memory_budget / 8)

    # ------------------------------------------------------------------ derivatives
    def forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` at ``params``: a functional call with the Problem's buffers, the form every
        derivative (gradients, HVPs, GGN products, per-sample gradients) and vmapped evaluation goes through.

        ``scaled_dot_product_attention`` runs on its math kernel here: the fused (flash, memory-efficient) kernels
        have no second derivative, no forward-mode derivative and no vmap rule (torch 2.13 on CPU: "derivative for
        ..._flash_attention_for_cpu_backward is not implemented"). Models without attention are unaffected.
        """
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(self._model, (params, self.buffers), (x,))

    def _chunk_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward(params, x), y)

    def _params(self, params: Mapping[str, torch.Tensor] | None) -> Params:
        return dict(self.theta0) if params is None else {n: t.to(self.device, self.dtype) for n, t in params.items()}

    def _batches(self, indices: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(X_c, y_c, weight)`` chunks of the evaluation set, or of the samples ``indices``; weights sum to 1 over
        all ranks (each rank yields its shard, see :mod:`landscape.runtime.distributed`)."""
        if indices is None:
            for s, e in self._grad_chunks:
                yield self.X[s:e], self.y[s:e], (e - s) / self.n
            return
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        lo, hi = self.comm.shard(len(idx))
        for s in range(lo, hi, self.batch_size):
            j = idx[s:min(s + self.batch_size, hi)]
            yield self.X[j], self.y[j], len(j) / len(idx)

    def loss_and_gradient(self, params: Mapping[str, torch.Tensor] | None = None,
                          indices: torch.Tensor | None = None) -> tuple[float, Params]:
        """Loss and gradient ``G = dL/dtheta`` at ``params`` (``theta0`` when None) over the whole evaluation set,
        or over the samples ``indices`` (a minibatch ``S``: ``L_S``). At theta0 after a product of the ``graph``
        engine, the gradient and loss its graph holds (no pass more)."""
        if params is None and indices is None and self._grad_graph is not None:
            _, grads, value = self._grad_graph
            out = {n: g.detach().clone() for n, g in zip(self.names, grads)}
            loss = value.double().clone()
            self.comm.all_reduce_([loss, *out.values()])
            return float(loss), out
        p = self._params(params)
        total: Params = {n: torch.zeros_like(t) for n, t in p.items()}
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        gfn = torch.func.grad_and_value(self._chunk_loss)
        for x, y, w in self._batches(indices):
            g, v = gfn(p, x, y)
            torch._foreach_add_(list(total.values()), [g[n] for n in total], alpha=w)
            loss += v.double() * w
        self.comm.all_reduce_([loss, *total.values()])
        return float(loss), total

    def loss(self, params: Mapping[str, torch.Tensor] | None = None, indices: torch.Tensor | None = None) -> float:
        """The loss alone (no graph), over the evaluation set or the samples ``indices``."""
        p = self._params(params)
        with torch.no_grad():
            local = sum((float(self._chunk_loss(p, x, y).double()) * w for x, y, w in self._batches(indices)), 0.0)
        return self.comm.sum(local)

    def gradient(self, params: Mapping[str, torch.Tensor] | None = None) -> Params:
        return self.loss_and_gradient(params)[1]

    @property
    def hvp_engine(self) -> str:
        """The engine that computes HVPs now: ``graph``, ``forward-over-reverse`` or ``reverse-over-reverse``."""
        return "graph" if self.hvp_mode == "graph" else self._functional_mode

    def _chunked(self, product: Callable[[Params, Params, torch.Tensor, torch.Tensor], Params],
                 v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Params:
        """``sum_c (n_c / n) product(theta, v, X_c, y_c)`` over the evaluation chunks (of all ranks)."""
        p = self._params(params)
        v = {n: v[n].to(self.device, self.dtype) for n in p}
        total: Params = {n: torch.zeros_like(t) for n, t in p.items()}
        for s, e in self._grad_chunks:
            out = product(p, v, self.X[s:e], self.y[s:e])
            torch._foreach_add_(list(total.values()), [out[n] for n in total], alpha=(e - s) / self.n)
        self.comm.all_reduce_(list(total.values()))
        return total

    def _hessian_vector(self, f: Callable[[object], torch.Tensor], x: object, v: object) -> object:
        """``(d^2 f / dx^2) v``: forward-over-reverse (``jvp`` of ``grad``), or reverse-over-reverse (``vjp`` of
        ``grad``) for models whose ops have no forward-mode derivative of their backward (e.g. ``mse_loss`` in
        torch 2.13); the fallback, once needed, is kept."""
        if self._functional_mode == "forward-over-reverse":
            try:
                return jvp(grad(f), (x,), (v,))[1]
            except (RuntimeError, NotImplementedError):
                self._functional_mode = "reverse-over-reverse"
        return torch.func.vjp(grad(f), x)[1](v)[0]

    def _functional_hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> Params:
        def product(p: Params, v: Params, x: torch.Tensor, y: torch.Tensor) -> Params:
            return self._hessian_vector(lambda q: self._chunk_loss(q, x, y), p, v)

        return self._chunked(product, v, params)

    def _graph_hvp(self, v: Mapping[str, torch.Tensor]) -> Params:
        """Double backward through the gradient graph at theta0, built once (Pearlmutter 1994; PyHessian's way):
        each product is one backward pass instead of a forward and two backward passes."""
        if self._grad_graph is None:
            leaves = {n: t.detach().clone().requires_grad_(True) for n, t in self.theta0.items()}
            total = sum(self._chunk_loss(leaves, self.X[s:e], self.y[s:e]) * ((e - s) / self.n)
                        for s, e in self._grad_chunks)
            grads = torch.autograd.grad(total, list(leaves.values()), create_graph=True)
            self._grad_graph = (list(leaves.values()), grads, total.detach())
        leaves, grads, _ = self._grad_graph
        hv = torch.autograd.grad(grads, leaves, grad_outputs=[v[n].to(self.device, self.dtype) for n in self.names],
                                 retain_graph=True)
        out = {n: h.detach() for n, h in zip(self.names, hv)}
        self.comm.all_reduce_(list(out.values()))
        return out

    def hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Hessian-vector product ``H v`` of the full-data loss.

        Engines (:attr:`hvp_mode`): ``graph`` (double backward through a gradient graph kept at theta0, for
        evaluation sets of at most ``graph_chunks`` chunks), ``forward-over-reverse`` and ``reverse-over-reverse``
        (torch.func, chunked, any point). ``auto`` times the candidates on the first product at theta0 and keeps
        the fastest.
        """
        if params is not None or self.hvp_mode == "functional":
            return self._functional_hvp(v, params)
        if self.hvp_mode == "graph":
            return self._graph_hvp(v)
        if len(self._grad_chunks) > self.graph_chunks:
            self.hvp_mode = "functional"
            return self._functional_hvp(v, None)
        timings = {}
        out: Params = {}
        for mode, fn in (("graph", lambda: self._graph_hvp(v)), ("functional", lambda: self._functional_hvp(v, None))):
            fn()  # warm-up (and, for graph, building it)
            t = time.perf_counter()
            out = fn()
            timings[mode] = time.perf_counter() - t
        # rank 0's choice, so that every rank runs the same engine and gets the same bits
        self.hvp_mode = self.comm.broadcast("graph" if timings["graph"] <= timings["functional"] else "functional")
        if self.hvp_mode != "graph":
            self._grad_graph = None
        self.hvp_timings = timings
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
                return self.forward(q, x)

            z, jv = jvp(f, (p,), (v,))
            hjv = self._hessian_vector(lambda zz: self.loss_fn(zz, y), z, jv)
            return torch.func.vjp(f, p)[1](hjv)[0]

        return self._chunked(product, v, params)
