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

Evaluation strategy (``strategy``): ``inplace`` writes each point into the private model's
parameters and runs a plain forward pass; ``vmap`` evaluates a block of points in one
batched forward with ``torch.func.vmap`` over ``functional_call``; ``auto`` times both on the
actual model and data and keeps the faster (see :meth:`Problem.choose_strategy`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from .errors import LandscapeError
from .losses import LossFn, top1_correct

Params = dict[str, torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


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
        X: torch.Tensor,
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
        vmap_width: int = 8,
        seed: int = 0,
    ) -> None:
        if bn not in ("frozen", "recompute"):
            raise LandscapeError(f"BatchNorm policy {bn!r} is unknown", hint="use --bn frozen or --bn recompute")
        if strategy not in ("auto", "inplace", "vmap"):
            raise LandscapeError(f"evaluation strategy {strategy!r} is unknown", hint="use auto, inplace or vmap")
        if X.shape[0] == 0:
            raise LandscapeError("the evaluation set is empty", hint="check the data spec and --max-samples")
        self.device = torch.device(device)
        first = next(iter(model.parameters()), None)
        if first is None:
            raise LandscapeError("the model has no parameters")
        self.dtype = dtype or first.dtype
        self._model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self._model.eval()
        self._model.requires_grad_(False)
        self.names: list[str] = [n for n, _ in self._model.named_parameters()]
        self._live: list[torch.Tensor] = [p for _, p in self._model.named_parameters()]
        self.theta0: Params = {n: p.detach().clone() for n, p in self._model.named_parameters()}
        self._theta0_list = [self.theta0[n] for n in self.names]
        self.buffers: Params = {n: b.detach().clone() for n, b in self._model.named_buffers()}
        self.loss_fn = loss
        self.metrics: dict[str, Metric] = dict(metrics or {})
        self.X = X.to(self.device, self.dtype if X.is_floating_point() else X.dtype)
        self.y = y.to(self.device, self.dtype if y.is_floating_point() else y.dtype)
        self.n = int(X.shape[0])
        self.classification = (not y.is_floating_point()) if classification is None else classification
        self.batch_size = max(1, int(batch_size))
        self._chunks = [(s, min(s + self.batch_size, self.n)) for s in range(0, self.n, self.batch_size)]
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
        self.vmap_width = max(1, int(vmap_width))
        self.strategy = strategy if strategy != "auto" else ("inplace" if bn == "recompute" else "auto")

    # ------------------------------------------------------------------ basics
    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._theta0_list)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.theta0.items()}

    def as_list(self, d: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Tensors of ``d`` in parameter order, on the problem's device and dtype."""
        missing = [n for n in self.names if n not in d]
        if missing:
            raise LandscapeError(f"direction lacks parameters {', '.join(missing[:5])}",
                                 hint="directions are matched to parameters by name")
        return [d[n].to(self.device, self.dtype) for n in self.names]

    # ------------------------------------------------------------------ evaluation
    def _set_point(self, coeffs: Sequence[float], dirs: Sequence[list[torch.Tensor]],
                   origin: list[torch.Tensor] | None = None) -> None:
        """Write ``origin + sum_k coeffs[k] dirs[k]`` (origin: theta0) into the private model."""
        torch._foreach_copy_(self._live, self._theta0_list if origin is None else origin)
        for c, d in zip(coeffs, dirs):
            if c != 0.0:
                torch._foreach_add_(self._live, d, alpha=float(c))
        if self.bn == "recompute":
            for m in self._bn_modules:
                m.reset_running_stats()
            self._model.train()
            for xb in self._bn_batches:
                self._model(xb)
            self._model.eval()

    def _forward_sums(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chunk-weighted sums of the loss, correct counts and metrics (0-d tensors, float64)."""
        acc: dict[str, torch.Tensor] = {}
        for s, e in self._chunks:
            out = forward(self.X[s:e])
            yb = self.y[s:e]
            vals = {"loss": self.loss_fn(out, yb) * (e - s)}
            if self.classification:
                vals["accuracy"] = top1_correct(out, yb)
            for k, m in self.metrics.items():
                vals[k] = m(out, yb) * (e - s)
            for k, v in vals.items():
                acc[k] = acc[k] + v.double() if k in acc else v.double()
        return acc

    def _evaluate_inplace(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]]) -> dict[str, np.ndarray]:
        rows: list[dict[str, torch.Tensor]] = []
        with torch.inference_mode():
            for c in coeffs:
                self._set_point(c, dirs)
                rows.append(self._forward_sums(self._model))
        keys = rows[0].keys()
        return {k: (torch.stack([r[k] for r in rows]) / self.n).cpu().numpy() for k in keys}

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

    def _evaluate_vmap(self, coeffs: np.ndarray, dirs: Sequence[list[torch.Tensor]]) -> dict[str, np.ndarray]:
        P = self._stacked_params(coeffs, dirs)

        def sums(p: Params) -> dict[str, torch.Tensor]:
            return self._forward_sums(lambda x: functional_call(self._model, (p, self.buffers), (x,)))

        with torch.no_grad():
            res = vmap(sums, randomness="different")(P)
        return {k: (v / self.n).cpu().numpy() for k, v in res.items()}

    def evaluate_points(self, coeffs: np.ndarray,
                        directions: Sequence[Mapping[str, torch.Tensor] | list[torch.Tensor]]) -> dict[str, np.ndarray]:
        """Loss, accuracy and metrics at ``theta0 + sum_k coeffs[p, k] d_k`` for each row ``p``.

        A direction is a dict keyed by parameter name, or a list already made by :meth:`as_list`.
        Returns arrays of length ``len(coeffs)`` keyed ``loss``, ``accuracy`` (classification)
        and each metric name. Non-finite values are returned as they are.
        """
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        dirs = [d if isinstance(d, list) else self.as_list(d) for d in directions]
        if coeffs.shape[1] != len(dirs):
            raise ValueError(f"{coeffs.shape[1]} coefficients per point for {len(dirs)} directions")
        if self.strategy == "auto":
            self.choose_strategy(dirs)
        if self.strategy == "vmap":
            parts = [self._evaluate_vmap(coeffs[s:s + self.vmap_width], dirs)
                     for s in range(0, len(coeffs), self.vmap_width)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._evaluate_inplace(coeffs, dirs)

    def evaluate(self, point: Mapping[str, torch.Tensor] | None = None) -> Evaluation:
        """Loss, accuracy and metrics at ``point`` (a full parameter dict; ``theta0`` when None)."""
        with torch.no_grad():
            self._set_point((), (), origin=None if point is None else self.as_list(point))
            sums = self._forward_sums(self._model)
        vals = {k: float(v) / self.n for k, v in sums.items()}
        return Evaluation(loss=vals.pop("loss"), accuracy=vals.pop("accuracy", None), metrics=vals)

    def choose_strategy(self, dirs: Sequence[list[torch.Tensor]] | None = None, repeats: int = 2) -> str:
        """Time ``inplace`` and ``vmap`` on this model and data; keep the faster per point.

        ``vmap`` is dropped when it fails to trace the model (data-dependent control flow,
        ``.item()`` calls, ...) or runs out of memory.
        """
        if self.strategy != "auto":
            return self.strategy
        ndir = len(dirs) if dirs else 1
        if not dirs:
            dirs = [[torch.randn_like(t) * 1e-3 for t in self._theta0_list]]
        coeffs = np.linspace(-0.1, 0.1, self.vmap_width * ndir).reshape(self.vmap_width, ndir)

        def per_point(fn: Callable[[np.ndarray, Sequence[list[torch.Tensor]]], object], c: np.ndarray) -> float:
            fn(c, dirs)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                fn(c, dirs)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                best = min(best, time.perf_counter() - t)
            return best / len(c)

        t_inplace = per_point(self._evaluate_inplace, coeffs[: max(2, self.vmap_width // 4)])
        try:
            t_vmap = per_point(self._evaluate_vmap, coeffs)
        except Exception:  # vmap cannot run this model: not an error, just not a candidate
            t_vmap = float("inf")
        self.strategy = "vmap" if t_vmap < t_inplace else "inplace"
        self.strategy_timings = {"inplace": t_inplace, "vmap": t_vmap}
        return self.strategy

    # ------------------------------------------------------------------ derivatives
    def _chunk_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(functional_call(self._model, (params, self.buffers), (x,)), y)

    def _params(self, params: Mapping[str, torch.Tensor] | None) -> Params:
        return dict(self.theta0) if params is None else {n: t.to(self.device, self.dtype) for n, t in params.items()}

    def loss_and_gradient(self, params: Mapping[str, torch.Tensor] | None = None) -> tuple[float, Params]:
        """Full-data loss and gradient ``G = dL/dtheta`` at ``params`` (``theta0`` when None)."""
        p = self._params(params)
        total: Params = {n: torch.zeros_like(t) for n, t in p.items()}
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        gfn = torch.func.grad_and_value(self._chunk_loss)
        for s, e in self._chunks:
            g, v = gfn(p, self.X[s:e], self.y[s:e])
            w = (e - s) / self.n
            torch._foreach_add_(list(total.values()), [g[n] for n in total], alpha=w)
            loss += v.double() * w
        return float(loss), total

    def gradient(self, params: Mapping[str, torch.Tensor] | None = None) -> Params:
        return self.loss_and_gradient(params)[1]

    def hvp(self, v: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> Params:
        """Hessian-vector product ``H v`` of the full-data loss (forward-over-reverse, chunked)."""
        p = self._params(params)
        v = {n: v[n].to(self.device, self.dtype) for n in p}
        total: Params = {n: torch.zeros_like(t) for n, t in p.items()}
        for s, e in self._chunks:
            x, y = self.X[s:e], self.y[s:e]
            _, hv = jvp(lambda q: grad(self._chunk_loss)(q, x, y), (p,), (v,))
            torch._foreach_add_(list(total.values()), [hv[n] for n in total], alpha=(e - s) / self.n)
        return total
