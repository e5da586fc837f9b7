"""The training-time monitor: the numbers ``landscape hessian`` and ``landscape coherence`` would give at a step,
taken while the model trains, written to a run file that ``landscape report`` draws at any moment.

Every ``every`` steps (an int, a set of steps, or a callable ``step -> bool``: :func:`log_spaced` is denser early)
:meth:`Monitor.step` builds a :class:`~landscape.problem.Problem` from the model as it is at that moment, on a fixed
probe batch drawn once with a seeded generator of its own, and measures there (each measure's seconds are kept):

* ``lambda_max``: the top Hessian eigenvalue by Lanczos (:func:`landscape.analyses.trajectory.sharpness_pair`), started
  from the previous check's eigenvector (a few products when the top direction moves little between checks), with
  its residual ``||H v - lambda v||`` (verified with a product more when ``tol`` < :data:`VERIFY_BELOW`). For
  Adam, the preconditioned sharpness ``lambda_max(P^{-1/2} H P^{-1/2})`` from the optimizer's second moments
  (Cohen et al. 2022), so that both compare with the stability threshold of
  :func:`landscape.analyses.trajectory.threshold` (``2/eta``, ``(2 + 2 beta)/eta`` with heavy-ball momentum,
  ``(2 + 2 beta1)/((1 - beta1) eta)`` for Adam; Cohen et al. 2021): ``ratio`` >= 0.9 is the edge of stability.
* ``trace``: Hutch++ (Meyer et al. 2021) with ``trace_matvecs`` products, with its standard error.
* ``grad_norm``: ``||grad L||`` of the probe batch, with the loss.
* ``gsnr``, ``coherence``, ``b_noise``: from the probe's per-sample gradients (:mod:`landscape.analyses.coherence`): the
  mean gradient signal-to-noise ratio (Liu et al. 2020), m-coherence and alpha (Chatterjee & Zielinski 2020), and
  the gradient noise scale ``B_noise = tr(H Sigma) / (G^T H G)`` (McCandlish et al. 2018) from ``noise_samples``
  products, with ``B_simple = tr(Sigma) / |G|^2`` beside it.

Besides: the learning rate read from the optimizer, the distance from the first check's weights, the movement per
step since the previous check and per-tensor weight norms: the ``/trajectory`` schema of ``landscape trajectory``
(``docs/schema.md``), without its PCA plane (which needs the path's end), with the measures as further columns.

Does no harm: the model is deep-copied into the Problem (weights, buffers, ``.grad`` and its train/eval flag are
never touched; the copy evaluates in eval mode: BatchNorm's running statistics as they are, no dropout), the
optimizer's state is only read, and every draw (the probe batch, Lanczos's start, Hutch++'s signs, the noise
samples) comes from generators seeded on their own: the global RNGs of torch and numpy are left where they were, so
training with a monitor gives bitwise the weights it gives without. Each check is one transaction of the run file
(:class:`~landscape.io.runfile.RunFile`): a crash loses at most the check in progress, and a reader sees the last one.
With ``resume=True`` a monitored run continues its file; a check at a step at or before one already recorded (the
training restarted from an earlier checkpoint) drops the rows from that step on. Under ``torch.distributed``
(DDP), every rank calls :meth:`Monitor.step` at the same steps, the products are data-parallel over the probe
batch, and rank 0 alone writes.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import h5py
import numpy as np
import torch

from .coherence import CoherenceSettings, analyze_coherence
from ..problem.curvature import CurvatureOperator
from ..runtime.distributed import from_process_group
from ..errors import LandscapeError
from ..problem.losses import LossFn, resolve_loss
from ..problem.problem import Params, Problem, check_hvp_mode
from ..io.runfile import RunFile, encode_attr, from_link, link_name
from ..linalg.trace import hutchpp, sketch_dtype
from .trajectory import (EOS_RATIO, MIXED_GROUPS, THRESHOLD_KEYS, mixed_groups, preconditioner, sharpness_pair,
                         threshold)

MEASURES = ("lambda_max", "trace", "grad_norm", "gsnr", "b_noise", "coherence")
#: What a check measures unless told: the cheap ones (see benchmarks/RESULTS.md issue 23 for each one's cost).
DEFAULT_MEASURES = ("lambda_max", "grad_norm")
#: Columns of ``/trajectory`` each measure writes (besides ``step``, ``lr``, distances and norms).
COLUMNS = {
    "lambda_max": ("sharpness", "sharpness_residual", "sharpness_matvecs", "sharpness_converged"),
    "trace": ("trace", "trace_stderr"),
    "grad_norm": ("loss", "grad_norm"),
    "gsnr": ("gsnr_mean", "gsnr_median"),
    "coherence": ("m_coherence", "alpha"),
    "b_noise": ("b_noise", "b_noise_stderr", "b_simple"),
}
#: Lanczos's residual is verified with a product more only for ``tol`` below this: above it the factorization's
#: residual ``||r|| |c^T s|`` (exact up to rounding with full reorthogonalization; float32 products round at 1e-6 to
#: 1e-5 relative, :mod:`landscape.linalg.lanczos`) is the true one to within 1% of ``tol``.
VERIFY_BELOW = 1e-3
#: The measures taken from one pass over the probe's per-sample gradients.
PER_SAMPLE = ("gsnr", "b_noise", "coherence")

Schedule = int | Iterable[int] | Callable[[int], bool]


def log_spaced(last: int, per_decade: int = 10, first: int = 1) -> frozenset[int]:
    """Steps ``0`` and about ``per_decade`` per decade from ``first`` to ``last``, rounded to integers: a
    schedule that checks densely early, where training changes fastest.

    >>> sorted(log_spaced(100, per_decade=2))
    [0, 1, 3, 10, 32, 100]
    """
    count = max(2, int(round(per_decade * math.log10(max(last, first + 1) / first))) + 1)
    return frozenset({0, *(int(round(s)) for s in np.geomspace(first, last, count))})


def _due(every: Schedule) -> Callable[[int], bool]:
    if callable(every):
        return every
    if isinstance(every, int):
        if every < 1:
            raise LandscapeError(f"every={every} is not a number of steps", hint="give every >= 1, a set of steps "
                                 "or a callable")
        return lambda step: step % every == 0
    steps = frozenset(int(s) for s in every)
    return steps.__contains__


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself under DDP (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) if isinstance(
            model, torch.nn.parallel.DistributedDataParallel) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _probe(data: Any, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``data`` (a pair ``(X, y)`` of tensors, a map-style dataset of ``(x, y)`` pairs, or a
    DataLoader, whose dataset is used: iterating the user's loader would draw from the global RNG), chosen by a
    generator of their own seeded ``seed`` (all of them when there are no more)."""
    if isinstance(data, torch.utils.data.DataLoader):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        X, y = data
        n = len(X)
        if len(y) != n:
            raise LandscapeError(f"the probe data has {n} inputs but {len(y)} targets")
        take = lambda idx: (X[idx], y[idx])  # noqa: E731
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
        n = len(data)

        def take(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            items = [data[int(i)] for i in idx]
            if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
                raise LandscapeError(f"the monitor's dataset ({type(data).__name__}) does not give (x, y) pairs",
                                     hint="give (X, y) tensors or a dataset whose items are (input, target)")
            return (torch.stack([torch.as_tensor(x) for x, _ in items]),
                    torch.stack([torch.as_tensor(t) for _, t in items]))
    else:
        raise LandscapeError(f"the monitor's data is a {type(data).__name__}",
                             hint="give (X, y) tensors, a map-style dataset of (x, y) pairs or a DataLoader over one")
    if n == 0:
        raise LandscapeError("the monitor's data is empty", hint="give at least two samples")
    idx = torch.arange(n) if n <= size else \
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return take(idx)


@dataclass(frozen=True)
class OptimizerState:
    """What a check reads from the optimizer: its class name, the first parameter group's hyperparameters, and for
    Adam-like optimizers the second moments by parameter name with the step count."""

    name: str
    hyperparameters: Mapping[str, Any]
    exp_avg_sq: Params | None = None
    step: int | None = None
    #: each parameter group's :data:`landscape.analyses.trajectory.THRESHOLD_KEYS` (groups that differ have no threshold)
    groups: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer | None, model: torch.nn.Module) -> "OptimizerState | None":
        if optimizer is None:
            return None
        for attr in ("optimizer", "_optimizer"):  # accelerate's and Lightning's wrappers hold the torch optimizer
            inner = getattr(optimizer, attr, None)
            if isinstance(inner, torch.optim.Optimizer):
                optimizer = inner
        def plain(group: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
            hp = {k: (tuple(v) if isinstance(v, (tuple, list)) else v) for k, v in group.items() if k in keys}
            return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in hp.items()}

        hp = plain(optimizer.param_groups[0], ("lr", "momentum", "betas", "eps", "weight_decay", "nesterov"))
        groups = tuple(plain(g, THRESHOLD_KEYS) for g in optimizer.param_groups)
        names = {id(p): n for n, p in model.named_parameters()}
        sq, step = {}, None
        for p in (p for g in optimizer.param_groups for p in g["params"]):
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st or id(p) not in names:
                sq = None
                break
            sq[names[id(p)]] = st["exp_avg_sq"].detach().to(torch.float64, copy=True)
            s = st.get("step")
            step = int(s.item() if isinstance(s, torch.Tensor) else s)
        return cls(type(optimizer).__name__, hp, sq if sq and len(sq) == len(names) else None, step, groups)

    @property
    def record(self) -> dict[str, Any]:
        return {"name": self.name, "hyperparameters": dict(self.hyperparameters),
                "param_groups": [dict(g) for g in self.groups]}


class Monitor:
    """Measure a model while it trains (see the module docstring); ``monitor.step(step, optimizer=opt)`` after
    each optimizer step, ``monitor.close()`` (or a ``with`` block) at the end.

    ``loss`` is a callable ``loss(output, target)`` (a batch mean) or a name (``cross_entropy``, ``mse``,
    ``causal_lm``, ``masked_lm``, ``module:callable``); ``data`` gives the probe batch (:func:`_probe`) of
    ``probe_size`` samples, ``heldout`` optionally a second one whose loss is recorded too (``heldout_loss``).
    ``tol`` is Lanczos's relative residual for ``lambda_max`` (1e-2: an eigenvalue lies within 1% of the value
    recorded, and the error is typically the residual's square over the gap to the next eigenvalue; the residual is
    recorded), ``max_matvec`` its budget per check. ``hvp`` is the Hessian-vector product engine
    (:data:`landscape.problem.problem.HVP_MODES`): ``graph``, double backward through the probe's gradient graph built once
    per check (whose gradient ``grad_norm`` then reuses), was the fastest for a repeated product at one point on
    every model measured (ResNet-8: 59 ms against 87 and 89 for the ``torch.func`` engines; GPT-2: 108 ms against
    203 and 165); ``auto`` times the engines at the first check (about 10 products on the GPT-2) and keeps the
    faster.

    Cost: each row records the seconds of its check and ``overhead``, the monitor's seconds so far over the
    training's (the wall time since the monitor was made, less the monitor's own). With ``max_overhead`` (e.g.
    0.05) a due check is skipped while ``overhead`` is above it, so that the schedule thins out to what that share
    of the training time pays for (the skipped steps are counted in the file's ``skipped_checks``); without it every
    due step is checked.
    """

    def __init__(self, model: torch.nn.Module, loss: LossFn | str, data: Any, *, every: Schedule = 100,
                 measures: Sequence[str] = DEFAULT_MEASURES, path: str | Path = "run.h5", probe_size: int = 32,
                 heldout: Any = None, seed: int = 0, tol: float = 1e-2, max_matvec: int = 100,
                 trace_matvecs: int = 30, noise_samples: int = 8, batch_size: int = 2048,
                 memory_budget: float = 256 * 2**20, max_overhead: float | None = None, hvp: str = "graph",
                 resume: bool = False, overwrite: bool = False) -> None:
        unknown = [m for m in measures if m not in MEASURES]
        if unknown:
            raise LandscapeError(f"unknown measure {', '.join(unknown)}", hint=f"choose from {', '.join(MEASURES)}")
        if max_overhead is not None and not 0 < max_overhead:
            raise LandscapeError(f"max_overhead={max_overhead} is not a positive share of the training time",
                                 hint="give e.g. max_overhead=0.05 (5%), or None to check at every due step")
        self.model = model
        self.loss_fn = resolve_loss(loss) if isinstance(loss, str) else loss
        self.measures = tuple(m for m in MEASURES if m in measures)
        self.due = _due(every)
        self.every = every if isinstance(every, int) else "schedule"
        self.seed, self.tol, self.max_matvec = seed, tol, max_matvec
        self.trace_matvecs, self.noise_samples = trace_matvecs, noise_samples
        self.batch_size, self.memory_budget = batch_size, memory_budget
        self.X, self.y = _probe(data, probe_size, seed)
        self.heldout = _probe(heldout, probe_size, seed + 1) if heldout is not None else None
        self.comm = from_process_group()
        self.path = Path(path)
        self.names = [n for n, _ in _unwrap(model).named_parameters()]
        self.rows: list[dict[str, float]] = []
        self.kinds: list[str] = []  # per row: the sharpness measured, ``hessian`` or ``preconditioned``
        self.norms: dict[str, list[float]] = {n: [] for n in self.names}
        self.origin: Params | None = None
        self._previous: tuple[int, Params] | None = None
        self._v0: np.ndarray | None = None
        check_hvp_mode(hvp)
        self._hvp_mode = hvp
        self._last_step: int | None = None
        self.max_overhead = max_overhead
        self.skipped = 0  # due checks skipped to keep within max_overhead
        self._spent = 0.0  # seconds in checks
        self._said_mixed = False  # the warning about parameter groups without one threshold, given once
        self._clock = time.perf_counter()  # the training's wall clock starts with the monitor
        self._file: RunFile | None = None
        if self.comm.is_writer:
            self._file = RunFile(self.path, mode="overwrite" if overwrite else ("resume" if resume else "create"))
            self._load()

    # ------------------------------------------------------------------ the file
    def _load(self) -> None:
        """A resumed file's rows, weight norms and origin."""
        assert self._file is not None
        with self._file.read() as f:
            if "trajectory" not in f:
                return
            self.skipped = int(f.attrs.get("skipped_checks", 0))
            g = f["trajectory"]
            cols = [k for k, v in g.items() if hasattr(v, "shape") and k not in ("checkpoint", "sharpness_kind")]
            self.rows = [{k: float(g[k][i]) for k in cols} for i in range(len(g["step"]))]
            self.kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in g["sharpness_kind"][()]]
            self.norms = {n: list(g["weight_norms"][link_name(n)][()]) for n in self.names}
            if "monitor/origin" in f:
                self.origin = {from_link(k): torch.from_numpy(v[()]) for k, v in f["monitor/origin"].items()}

    def _write(self) -> None:
        """Every row so far into ``/trajectory`` (one transaction: the file on disk is always complete)."""
        from .scan import tool_provenance

        if self._file is None:
            raise LandscapeError(f"the monitor of {self.path} is closed", hint="make a new Monitor with resume=True")
        rows = self.rows
        with self._file.transaction() as f:
            for k, v in {**tool_provenance(), "kind": "trajectory", "source": "monitor",
                         "model_class": type(_unwrap(self.model)).__name__, "parameters": self.n,
                         "probe_size": len(self.X), "seed": self.seed, "measures": ",".join(self.measures),
                         "every": str(self.every), "max_overhead": self.max_overhead,
                         "skipped_checks": self.skipped}.items():
                if k != "created" or k not in f.attrs:
                    f.attrs[k] = encode_attr(v)
            if "trajectory" in f:
                del f["trajectory"]
            g = f.create_group("trajectory")
            g.attrs["eos_ratio"] = encode_attr(EOS_RATIO)
            g.create_dataset("checkpoint", data=[f"step {int(r['step'])}" for r in rows], dtype=h5py.string_dtype())
            g.create_dataset("sharpness_kind", data=list(self.kinds), dtype=h5py.string_dtype())
            for k in sorted({k for r in rows for k in r}):
                arr = np.array([r.get(k, math.nan) for r in rows])
                g.create_dataset(k, data=arr.astype(np.int64) if k == "step" else
                                 arr.astype(bool) if k in ("edge_of_stability", "sharpness_converged") else arr)
            for n, v in self.norms.items():
                g.create_dataset(f"weight_norms/{link_name(n)}", data=np.asarray(v))
            if self.origin is not None and "monitor/origin" not in f:
                for n, t in self.origin.items():
                    f.create_dataset(f"monitor/origin/{link_name(n)}", data=t.cpu().numpy())

    @property
    def n(self) -> int:
        return sum(p.numel() for p in _unwrap(self.model).parameters())

    # ------------------------------------------------------------------ checks
    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float] | None:
        """Measure at ``step`` if the schedule says so (and ``step`` was not measured just before); returns the
        row written, or None."""
        if step == self._last_step or not self.due(step):
            return None
        if self.max_overhead is not None and self.comm.broadcast(self.overhead > self.max_overhead):
            self.skipped += 1  # every rank follows rank 0's clock
            return None
        return self.check(step, optimizer)

    @property
    def overhead(self) -> float:
        """The monitor's seconds so far over the training's (0 before the first check)."""
        training = time.perf_counter() - self._clock - self._spent
        return self._spent / training if self._spent else 0.0

    def check(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Measure now, whatever the schedule: one row of ``/trajectory``."""
        t0 = time.perf_counter()
        model = _unwrap(self.model)
        first = next(model.parameters())
        with torch.no_grad():
            pb = Problem(model, self.X, self.y, self.loss_fn, device=first.device, dtype=first.dtype,
                         batch_size=self.batch_size, memory_budget=self.memory_budget, seed=self.seed,
                         comm=self.comm, hvp_mode=self._hvp_mode)
        params = pb.theta0
        opt = OptimizerState.of(optimizer, model)
        thr, kind = threshold(opt.record if opt else None)
        if opt is not None and mixed_groups(opt.record) and not self._said_mixed:
            warnings.warn(MIXED_GROUPS)
            self._said_mixed = True
        pre = None
        if kind == "preconditioned":
            if opt is not None and opt.exp_avg_sq is not None and opt.step:
                pre = preconditioner(opt.exp_avg_sq, opt.step, opt.hyperparameters)
            else:  # Adam before its first step: the raw sharpness, which has no threshold
                kind, thr = "hessian", math.nan
        row: dict[str, float] = {"step": float(step), "lr": float(opt.hyperparameters.get("lr", math.nan))
                                 if opt else math.nan}
        finite = all(bool(torch.isfinite(t).all()) for t in params.values())
        if not finite:  # training diverged: the row says so (NaN), the training goes on as it would
            warnings.warn(f"step {step}: the model's weights are not finite; the monitor records NaN")
        for m in self.measures if finite else ():
            if m in PER_SAMPLE and any(x in self.measures for x in PER_SAMPLE[:PER_SAMPLE.index(m)]):
                continue  # measured with the first of them
            t = time.perf_counter()
            row.update(self._measure(m, pb, pre))
            row[f"seconds_{'per_sample' if m in PER_SAMPLE else m}"] = time.perf_counter() - t
        if self.heldout is not None:
            row["heldout_loss"] = Problem(model, *self.heldout, self.loss_fn, device=first.device,
                                          dtype=first.dtype, batch_size=self.batch_size).loss()
        self._hvp_mode = "auto" if pb.hvp_mode == "auto" else pb.hvp_engine  # timed once, then kept
        if not finite:
            row.update({c: math.nan for m in self.measures for c in COLUMNS[m]})
        row.update(self._distances(step, pb))
        row["threshold"] = thr
        if "sharpness" in row:
            row["ratio"] = row["sharpness"] / thr if thr == thr else math.nan
            row["edge_of_stability"] = float(row["ratio"] >= EOS_RATIO) if thr == thr else 0.0
        row["seconds"] = time.perf_counter() - t0
        self._spent += row["seconds"]
        row["overhead"] = self.overhead
        if self._last_step is None and self.rows:  # the first check after a resume: a restarted run drops its future
            keep = [i for i, r in enumerate(self.rows) if r["step"] < step]
            self.rows = [self.rows[i] for i in keep]
            self.norms = {n: [v[i] for i in keep] for n, v in self.norms.items()}
            self.kinds = [self.kinds[i] for i in keep]
        self.rows.append(row)
        self.kinds.append(kind)
        for n in self.names:
            self.norms[n].append(float(params[n].double().norm()))
        self._last_step = step
        self.comm.from_writer(self._write, share=False)  # rank 0 writes; a failure there is raised on every rank
        return row

    def _measure(self, m: str, pb: Problem, pre: Params | None) -> dict[str, float]:
        if m == "lambda_max":
            v0 = self._v0 if self._v0 is not None and len(self._v0) == pb.num_parameters else None
            eig = sharpness_pair(pb, None, precondition=pre, tol=self.tol, seed=self.seed, v0=v0,
                                 max_matvec=self.max_matvec, verify=self.tol < VERIFY_BELOW)
            self._v0 = eig.eigenvectors[:, 0].copy()
            return {"sharpness": float(eig.eigenvalues[0]), "sharpness_residual": float(eig.residuals[0]),
                    "sharpness_matvecs": float(eig.n_matvec), "sharpness_converged": float(eig.converged[0])}
        if m == "trace":
            op = CurvatureOperator(pb)
            est = hutchpp(op.matvec, op.n, max_matvec=self.trace_matvecs, seed=self.seed,
                          budget=self.memory_budget, dtype=sketch_dtype(pb.dtype))
            return {"trace": est.estimate, "trace_stderr": est.stderr}
        if m == "grad_norm":
            loss, g = pb.loss_and_gradient()
            return {"loss": loss, "grad_norm": math.sqrt(sum(float((t.double() ** 2).sum()) for t in g.values()))}
        # the per-sample-gradient measures share one pass (their seconds: ``seconds_per_sample``)
        wanted = [x for x in PER_SAMPLE if x in self.measures]
        s = CoherenceSettings(noise_samples=self.noise_samples if "b_noise" in wanted else 0, batch_sizes=(),
                              memory_budget=self.memory_budget, seed=self.seed)
        r = analyze_coherence(pb, s).metrics
        return {c: float(r.get(c, math.nan)) for x in wanted for c in COLUMNS[x]}

    def _distances(self, step: int, pb: Problem) -> dict[str, float]:
        """``||theta - theta_first||`` and ``||theta - theta_previous|| / steps`` (NaN at the first check after a
        resume: the previous weights were not kept), summed tensor by tensor in float64: the two reference points
        are kept on the host at the model's dtype (4 bytes a parameter each in float32), nothing is flattened."""
        now = {n: pb.theta0[n].detach().cpu().clone() for n in self.names}
        if self.origin is None:
            self.origin = now

        def dist(a: Params, b: Params) -> float:
            return math.sqrt(sum(float(((a[n].double() - b[n].double()) ** 2).sum()) for n in self.names))

        out = {"distance": dist(now, self.origin), "step_size": math.nan}
        if self._previous is not None and step > self._previous[0]:
            out["step_size"] = dist(now, self._previous[1]) / (step - self._previous[0])
        self._previous = (step, now)
        return out

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self._file is not None:
            if self.skipped and self._file.path.exists():  # checks skipped since the last row was written
                with self._file.transaction() as f:
                    f.attrs["skipped_checks"] = self.skipped
            self._file.close()
            self._file = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
