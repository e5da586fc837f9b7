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

Inputs larger than memory (``X`` a :class:`~landscape.stream.StreamedInputs`) are read from disk a chunk at a
time on every use instead of being held on the device: a block of points is evaluated chunk by chunk (each
chunk read once per block, all the block's points run on it), every gradient or HVP reads the data once. The
results are the same bits as with the inputs in memory.

Under ``torchrun`` (``comm``, see :mod:`landscape.distributed`) evaluations at points use the whole evaluation
set on every rank (the points are what is shared out), while gradients, HVPs and GGN products are data-parallel:
each rank sums over its shard of the samples and an all-reduce adds the shards.

Precision (``precision``, slice points only): ``full`` evaluates at the Problem's dtype; ``bf16`` runs the forward
passes under bfloat16 autocast and ``tf32`` with TensorFloat-32 matmuls (CUDA only); losses are reduced at full
precision either way, and gradients and HVPs are never lowered. The scan measures the error this introduces.

Evaluation strategy (``strategy``): points are evaluated in blocks. ``inplace`` writes each
point of a block into the private model's parameters and runs a forward pass, in which, at
full precision, the linear layers that read the raw inputs are evaluated by linearity from
outputs cached per direction set (:mod:`landscape.inputlayer`: a cache of at most
``memory_budget`` bytes; ``linear_inputs=False`` turns this off);
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
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .distributed import SINGLE, Comm, rank_device
from .errors import LandscapeError
from .inputlayer import InputLayers, Versions, same_versions, versions
from .losses import LossFn, class_major, stacked_loss
from .stream import StreamedInputs

Params = dict[str, torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
KEEP_STACK_BYTES = 64 * 2**20  # stacked-output buffers up to this size are reused from block to block


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
        self._model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self._model.eval()
        self._model.requires_grad_(False)
        self.names: list[str] = [n for n, _ in self._model.named_parameters()]
        self._live: list[torch.Tensor] = [p for _, p in self._model.named_parameters()]
        # the private parameters become views of one flat vector, so that writing a point is 1 + K vector operations
        # instead of (1 + K) per tensor (most of the cost of a point update on a small model)
        self._flat = torch.cat([p.detach().reshape(-1) for p in self._live])
        self._theta0_flat = self._flat.clone()
        self._theta0_list = self._views(self._theta0_flat)
        for p, view in zip(self._live, self._views(self._flat)):
            p.data = view
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
        self.batch_size = max(1, int(batch_size))
        self._chunks = [(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
        lo, hi = self.comm.shard(self.n)
        # derivatives are data-parallel: this rank's samples only, summed over the ranks by all-reduce
        self._grad_chunks = [(s, min(s + self.batch_size, hi)) for s in range(lo, hi, self.batch_size)]
        self.bn = bn
        self._bn_modules = [m for m in self._model.modules() if isinstance(m, BN_TYPES)]
        if bn == "recompute":
            if not self._bn_modules:
                raise LandscapeError("--bn recompute was asked for, but the model has no BatchNorm layer",
                                     hint="drop --bn recompute")
            for m in self._bn_modules:
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
        if hvp_mode not in ("auto", "graph", "forward-over-reverse", "reverse-over-reverse"):
            raise LandscapeError(f"HVP mode {hvp_mode!r} is unknown",
                                 hint="use auto, graph, forward-over-reverse or reverse-over-reverse")
        # "auto" until the first product at theta0 picks "graph" or "functional" (torch.func, whose flavour
        # _functional_mode may still fall back from forward-over-reverse to reverse-over-reverse)
        self.hvp_mode = "functional" if hvp_mode.endswith("reverse") else hvp_mode
        self._functional_mode = hvp_mode if hvp_mode.endswith("reverse") else "forward-over-reverse"
        self._grad_graph: tuple[list[torch.Tensor], tuple[torch.Tensor, ...]] | None = None
        self.graph_chunks = graph_chunks
        self.strategy = strategy if strategy != "auto" else ("inplace" if bn == "recompute" else "auto")
        self.linear_inputs = linear_inputs
        self._inputs = InputLayers(self._model, self._live, self._theta0_list, self.n, memory_budget)
        self._stacks: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ basics
    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._theta0_list)

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
        (:mod:`landscape.inputlayer`); empty when none qualified or :attr:`linear_inputs` is off."""
        return self._inputs.routed if self.linear_inputs and self.precision == "full" else []

    # ------------------------------------------------------------------ evaluation
    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` (one vector of all parameters) as tensors shaped like the parameters, in order."""
        out, i = [], 0
        for p in self._live:
            out.append(flat[i:i + p.numel()].view(p.shape))
            i += p.numel()
        return out

    def _flat_directions(self, dirs: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each direction as one flat vector, kept while the same tensors (unchanged) are passed again."""
        key = versions(t for d in dirs for t in d)
        known, flat = self._flat_dirs
        if not same_versions(key, known):
            flat = [torch.cat([t.reshape(-1) for t in d]) for d in dirs]
            self._flat_dirs = (key, flat)
        return flat

    def _set_point(self, coeffs: Sequence[float], dirs: Sequence[torch.Tensor],
                   origin: list[torch.Tensor] | None = None) -> None:
        """Write ``origin + sum_k coeffs[k] dirs[k]`` (origin: theta0; ``dirs`` flat, see :meth:`_flat_directions`)
        into the private model."""
        if origin is None:
            self._flat.copy_(self._theta0_flat)
        else:
            torch._foreach_copy_(self._live, origin)
        for c, d in zip(coeffs, dirs):
            if c != 0.0:
                self._flat.add_(d, alpha=float(c))
        if self.bn == "recompute":
            for m in self._bn_modules:
                m.reset_running_stats()
            self._model.train()
            for xb in self._bn_batches:
                self._model(xb)
            self._model.eval()

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

    def _stack(self, chunk: int, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The K outputs of one chunk as a ``(K, *out.shape)`` tensor at the Problem's dtype, for :meth:`_reduce`.

        Laid out class-major when the loss reduces fastest that way (:func:`~landscape.losses.class_major`), and
        written into a buffer kept from block to block when it is small: a fresh one per block costs a page fault
        per 4 KiB, a third of the reduction on a small model."""
        first = outs[0]
        cm = class_major(self.loss_fn, first, self.y[:1])
        shape = (len(outs), *(reversed(first.shape) if cm else first.shape))
        buf = self._stacks.get(chunk)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            if sum(b.numel() * b.element_size() for b in self._stacks.values()) + buf.nbytes <= KEEP_STACK_BYTES:
                self._stacks[chunk] = buf
        buf = buf[:len(outs)]
        torch.stack([o.t() for o in outs] if cm else outs, out=buf)
        return buf.transpose(1, 2) if cm else buf

    def _forward_precision(self, precision: str) -> contextlib.AbstractContextManager[object]:
        """The context of a forward pass at ``precision``: as is (``full``), bf16 autocast, or TF32 matmuls."""
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if precision == "tf32":
            return _tf32()
        return contextlib.nullcontext()

    def _evaluate_inplace(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]],
                          origin: list[torch.Tensor] | None = None, precision: str = "full") -> dict[str, np.ndarray]:
        per_chunk: list[list[torch.Tensor]] = [[] for _ in self._chunks]

        def runs() -> Iterator[tuple[np.ndarray, list[tuple[int, torch.Tensor]]]]:
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

        # layers that read the inputs go by linearity (full precision, along directions from theta0)
        linear = dirs if self.linear_inputs and origin is None and precision == "full" else None
        with torch.inference_mode(), self._inputs.patched(linear):
            flat = self._flat_directions(dirs)
            for c, parts in runs():
                self._set_point(c, flat, origin)
                with self._forward_precision(precision):
                    for i, x in parts:
                        self._inputs.at(i, x, c)
                        per_chunk[i].append(self._model(x))
            # losses are reduced at the Problem's precision whatever the forward pass ran at
            return self._reduce([self._stack(i, o) for i, o in enumerate(per_chunk)])

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
        blocks of :attr:`block` (see :meth:`choose_strategy`).
        """
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        dirs = [d if isinstance(d, list) else self.as_list(d) for d in directions]
        if coeffs.shape[1] != len(dirs):
            raise ValueError(f"{coeffs.shape[1]} coefficients per point for {len(dirs)} directions")
        if self.block is None:
            self.choose_strategy(dirs)
        fn = self._evaluate_vmap if self.strategy == "vmap" else self._evaluate_inplace
        prec = precision or self.precision
        parts = [fn(coeffs[s:s + self.block], dirs, precision=prec) for s in range(0, len(coeffs), self.block)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def evaluate(self, point: Mapping[str, torch.Tensor] | None = None) -> Evaluation:
        """Loss, accuracy and metrics at ``point`` (a full parameter dict; ``theta0`` when None)."""
        vals = {k: float(v[0]) for k, v in self._evaluate_inplace(
            np.zeros((1, 0)), (), origin=None if point is None else self.as_list(point)).items()}
        return Evaluation(loss=vals.pop("loss"), accuracy=vals.pop("accuracy", None), metrics=vals)

    def choose_strategy(self, dirs: Sequence[list[torch.Tensor]] | None = None, repeats: int = 3) -> str:
        """Pick the evaluation strategy and block size by timing them on this model and data.

        With ``strategy="auto"``, ``inplace`` and ``vmap`` are both timed on a block of 8 points, and ``vmap`` also
        on the largest block that fits ``memory_budget`` bytes of stacked outputs (at most ``max_block``) when it
        is within 1.5x of in-place: batching gains grow with the block on a GPU. ``vmap`` is kept when it is at
        least 20% faster per point (it is dropped when it cannot trace the model or runs out of memory), with the
        block size it was fastest at. For ``inplace`` the block is what fits the memory budget and about
        ``block_seconds`` of work.
        Sets :attr:`strategy`, :attr:`block` and :attr:`strategy_timings`.
        """
        if not dirs:
            dirs = [[torch.randn_like(t) * 1e-3 for t in self._theta0_list]]
        with torch.inference_mode():
            first = self._model(self.X[self._chunks[0][0]:self._chunks[0][1]])
        out_bytes = first.numel() * first.element_size() * self.n / (self._chunks[0][1] - self._chunks[0][0])
        mem_block = int(max(1, min(self.max_block, self.memory_budget // max(out_bytes, 1))))
        trial = max(1, min(mem_block, 8))

        def per_point(fn: Callable[..., object], k: int) -> float:
            coeffs = np.linspace(-0.1, 0.1, k * len(dirs)).reshape(k, len(dirs))
            fn(coeffs, dirs, precision=self.precision)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn(coeffs, dirs, precision=self.precision)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - t)
            return best / k

        def timed(name: str, k: int) -> float:
            try:
                return per_point(self._evaluate_vmap if name == "vmap" else self._evaluate_inplace, k)
            except Exception:  # vmap cannot run this model (or not this block): not an error, not a candidate
                if self.strategy != "auto":
                    raise
                return float("inf")

        candidates = ["inplace", "vmap"] if self.strategy == "auto" else [self.strategy]
        timings = {name: timed(name, trial) for name in candidates}
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
        self.strategy_timings = timings
        if self.strategy == "vmap":
            self.block = vmap_block  # vmap's cost per point depends on the block size: keep the one that was timed
        else:
            self.block = int(max(1, min(mem_block, self.block_seconds // max(timings[self.strategy], 1e-9))))
        # under torchrun every rank evaluates with rank 0's choice (timings differ from rank to rank)
        self.strategy, self.block = self.comm.broadcast((self.strategy, self.block))
        return self.strategy

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
        all ranks (each rank yields its shard, see :mod:`landscape.distributed`)."""
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
        or over the samples ``indices`` (a minibatch ``S``: ``L_S``)."""
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
            self._grad_graph = (list(leaves.values()), grads)
        leaves, grads = self._grad_graph
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
