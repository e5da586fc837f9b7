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

Evaluating many points at once (strategies, replicas, precision, their timing) is :mod:`landscape.problem.points`;
the Hessian- and Gauss-Newton-vector product engines are :mod:`landscape.problem.products`. The Problem holds one of
each and is their public face: its settings (``strategy``, ``block``, ``workers``, ``hvp_mode``, ...) are theirs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import LandscapeError
from ..io.stream import StreamedInputs
from ..runtime.distributed import SINGLE, Comm, rank_device
from .losses import LossFn
from .outputs import tensor_outputs
from .points import PointEvaluator
from .products import HVP_MODES, Products, check_hvp_mode
from .replica import BN_TYPES, batchnorm_check, recompute_batches, views

Params = dict[str, torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
__all__ = ["BN_TYPES", "HVP_MODES", "Evaluation", "Metric", "Params", "Problem", "check_hvp_mode"]


class _Delegated:
    """A setting of the Problem's point evaluator or product engine, read and set through the Problem
    (``problem.block`` is ``problem.points.block``)."""

    def __init__(self, part: str, name: str | None = None) -> None:
        self.part, self.name = part, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: object, owner: type | None = None) -> object:
        return self if obj is None else getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: object, value: object) -> None:
        setattr(getattr(obj, self.part), self.name, value)


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
        direct_output: bool = True,
        workers: int | str = "auto",
    ) -> None:
        _check_settings(X, model, bn, precision, batch_size)
        self.comm = comm or SINGLE
        self.device = rank_device(torch.device(device), self.comm)
        self.dtype = dtype or next(iter(model.parameters())).dtype
        self.precision = precision
        _check_placement(X.shape[0], self.comm, precision, self.device, self.dtype)
        # a private copy whose outputs are reduced to one tensor (landscape.problem.outputs: logits of a ModelOutput)
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
        self.buffers: Params = {n: b.detach().clone() for n, b in self._model.named_buffers()}
        self.loss_fn = loss
        self.metrics: dict[str, Metric] = dict(metrics or {})
        self.X = X.to(self.device, self.dtype if X.is_floating_point() else X.dtype)
        self.y = y.to(self.device, self.dtype if y.is_floating_point() else y.dtype)
        self.n = int(X.shape[0])
        self.classification = not y.is_floating_point() and y.ndim == 1 if classification is None else classification
        self.batch_size = int(batch_size)
        self._chunks = [(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
        lo, hi = self.comm.shard(self.n)
        # derivatives are data-parallel: this rank's samples only, summed over the ranks by all-reduce
        self._grad_chunks = [(s, min(s + self.batch_size, hi)) for s in range(lo, hi, self.batch_size)]
        self.bn = bn
        self._bn_batches = recompute_batches(self._model, self.X, bn_batches, bn_batch_size, seed) \
            if bn == "recompute" else None
        self.memory_budget = memory_budget
        self.products = Products(self, hvp_mode, graph_chunks)
        self.points = PointEvaluator(self, strategy=strategy, max_block=max_block, block_seconds=block_seconds,
                                     linear_inputs=linear_inputs, direct_output=direct_output, workers=workers)

    # the point evaluator's settings (landscape.problem.points) and the product engine's (landscape.problem.products)
    strategy = _Delegated("points")
    block = _Delegated("points")
    workers = _Delegated("points")
    max_block = _Delegated("points")
    block_seconds = _Delegated("points")
    linear_inputs = _Delegated("points")
    direct_output = _Delegated("points")
    strategy_timings = _Delegated("points")
    strategy_memory = _Delegated("points")
    linear_input_layers = _Delegated("points")
    direct_output_layer = _Delegated("points")
    #: time the strategies (on a slice's own first blocks, whose values come back) and keep the fastest:
    #: :meth:`PointEvaluator.choose_strategy_for <landscape.problem.points.PointEvaluator.choose_strategy_for>`
    choose_strategy_for = _Delegated("points")
    hvp_mode = _Delegated("products", "mode")
    hvp_timings = _Delegated("products", "timings")
    graph_chunks = _Delegated("products")
    budget_left = _Delegated("products")  # the budget less the HVP engine's graph (Products.budget_left, .settle)
    settle_hvp = _Delegated("products", "settle")

    # ------------------------------------------------------------------ basics
    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "Problem":
        """The same model (at ``theta0``), loss, metrics and settings on the samples ``indices`` only: the loss
        restricted to a class or a mini-batch, for per-class and mini-batch curvature, within ``budget_left()``."""
        if isinstance(self.X, StreamedInputs):
            raise LandscapeError("per-class and mini-batch curvature need the inputs in memory",
                                 hint="use --stream off (and --max-samples to fit)")
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.X.device)
        # the HVP engine this Problem settled on is kept (each subset would otherwise time the choice again)
        mode = {"graph": "graph", "functional": self.products.functional_mode}.get(self.hvp_mode, "auto")
        return Problem(self._model, self.X[idx], self.y[idx], self.loss_fn, metrics=self.metrics,
                       classification=self.classification, device=self.device, dtype=self.dtype,
                       batch_size=self.batch_size, bn=self.bn, memory_budget=self.budget_left(), comm=self.comm,
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

    # ------------------------------------------------------------------ evaluation (landscape.problem.points)
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
        vals = {k: float(v[0]) for k, v in self.points.evaluate_inplace(
            np.zeros((1, 0)), (), origin=None if point is None else self.as_list(point)).items()}
        return Evaluation(loss=vals.pop("loss"), accuracy=vals.pop("accuracy", None), metrics=vals)

    def batchnorm_check(self, samples: int = 256) -> tuple[float, float] | None:
        """:func:`landscape.problem.replica.batchnorm_check` at ``theta0`` on the first ``samples`` samples."""
        x, y = self.X[:min(samples, self.n)], self.y[:min(samples, self.n)]
        return batchnorm_check(self._model, {**self.theta0, **self.buffers}, self.loss_fn, x, y)

    def choose_strategy(self, dirs: Sequence[list[torch.Tensor]] | None = None, repeats: int = 3) -> str:
        """Pick the evaluation strategy, the block size and the number of workers by timing them on this model and
        data (:meth:`choose_strategy_for`, on made-up points whose values are thrown away)."""
        self.choose_strategy_for(dirs, repeats=repeats)
        return self.strategy

    def evaluate_blocks(self, blocks: Sequence[np.ndarray],
                        directions: Sequence[Mapping[str, torch.Tensor] | list[torch.Tensor]], *,
                        precision: str | None = None) -> list[dict[str, np.ndarray]]:
        """:meth:`evaluate_points` of each block (rows of coefficients, usually :attr:`block` of them), each evaluated
        as one block: the values of a point depend only on its block. With ``workers > 1`` in-place blocks are
        evaluated that many at a time, on concurrent replicas of the model."""
        dirs = self._directions(blocks[0] if blocks else np.zeros((0, len(directions))), directions)
        return self.points.evaluate_blocks(blocks, dirs, precision=precision)

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
        if params is None and indices is None and self.products.grad_graph is not None:
            _, grads, value = self.products.grad_graph
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
        return self.products.engine

    def hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Hessian-vector product ``H v`` of the full-data loss at ``params`` (``theta0`` when None); the engines
        and their choice: :meth:`landscape.problem.products.Products.hvp`."""
        return self.products.hvp(v, params)

    def ggn_vp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Generalized Gauss-Newton product ``G v = (1/n) sum_i J_i^T (d^2 l / dz^2) J_i v``
        (:meth:`landscape.problem.products.Products.ggn_vp`); ``G = H`` for a model linear in its parameters."""
        return self.products.ggn_vp(v, params)


def _check_settings(X: torch.Tensor | StreamedInputs, model: torch.nn.Module, bn: str, precision: str,
                    batch_size: int) -> None:
    """Refuse settings no Problem can take, before anything is copied or moved."""
    if bn not in ("frozen", "recompute"):
        raise LandscapeError(f"BatchNorm policy {bn!r} is unknown", hint="use --bn frozen or --bn recompute")
    if X.shape[0] == 0:
        raise LandscapeError("the evaluation set is empty", hint="check the data spec and --max-samples")
    if precision not in ("full", "tf32", "bf16"):
        raise LandscapeError(f"precision {precision!r} is unknown", hint="use full, tf32 or bf16")
    if next(iter(model.parameters()), None) is None:
        raise LandscapeError("the model has no parameters")
    if int(batch_size) < 1:
        raise LandscapeError(f"--batch-size must be at least 1, not {batch_size}")


def _check_placement(n: int, comm: Comm, precision: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse ``n`` samples for more ranks than that, and a lowered ``precision`` the device or dtype cannot take."""
    if comm.world > n:
        raise LandscapeError(f"{n} samples cannot be shared by {comm.world} ranks",
                             hint="use more samples or fewer processes")
    if precision == "tf32" and device.type != "cuda":
        raise LandscapeError("--precision tf32 needs a CUDA device", hint="use --precision bf16 or full on a CPU")
    if precision != "full" and dtype != torch.float32:
        raise LandscapeError(f"--precision {precision} lowers float32 evaluation, the model is {dtype}",
                             hint="drop --dtype float64 or --precision")
