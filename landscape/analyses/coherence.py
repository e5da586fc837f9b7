"""Coherence of per-sample gradients and gradient-noise probes at a checkpoint.

For per-sample gradients ``g_1..g_m`` (exact, or sketched ``R g_i``; see :mod:`landscape.problem.persample`) with mean
``G``:

* m-coherence (Chatterjee & Zielinski 2020, "On the generalization mystery"): ``||sum g_i||^2 / sum ||g_i||^2``,
  in ``[0, m]``: ``m`` for identical gradients, 1 for orthogonal ones of equal norm; ``alpha`` = m-coherence / m
  (the mean of ``g_i . g_j`` over all pairs ``i, j`` divided by the mean ``||g_i||^2``). Per class too.
* gradient diversity (Yin et al. 2018, "Gradient diversity"): ``sum ||g_i||^2 / ||sum g_i||^2``, the inverse.
* stiffness (Fort et al. 2019): ``class_cosine[a, b]`` = mean ``cos(g_i, g_j)`` over ``i`` in class ``a`` and ``j``
  in class ``b``, ``i != j``.
* GSNR (Liu et al. 2020): per parameter ``G_j^2 / Var_i(g_ij)`` (population variance), with its mean and median
  over parameters of non-zero variance. Exact gradients only.
* gradient noise scale (McCandlish et al. 2018, "An empirical model of large-batch training"):
  ``B_simple = tr(Sigma) / ||G||^2`` and ``B_noise = tr(H Sigma) / (G^T H G)``, ``Sigma = Cov_i(g_i)``
  (``1/(m-1)``); ``tr(H Sigma)`` is estimated from ``noise_samples`` random samples, one Hessian-vector product
  each, with a standard error.
* minibatch alignment: mean (and spread) of ``cos(g_B, G)`` over disjoint random batches of each size ``B``
  (consecutive blocks of one seeded order of the samples, :class:`Batches`).
* per-sample scores (Paul et al. 2021, "Deep learning on a data diet"): GraNd ``||g_i||`` and EL2N
  ``||softmax(f(x_i)) - onehot(y_i)||`` (for regression ``||f(x_i) - y_i||``), for every sample in data order.

All statistics are accumulated chunk by chunk (:class:`GradientStats`), so only one chunk of gradients is held.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import h5py
import numpy as np
import torch
from torch.func import functional_call

from ..runtime.blas import single_blas_thread
from ..problem.curvature import CurvatureOperator
from ..runtime.distributed import Comm
from ..errors import LandscapeError
from ..io.hf import IGNORE_INDEX
from ..problem.persample import gradient_sum, iter_gradients, per_sample_gradients, sketched_gradients
from ..io.stream import StreamedInputs, reordered, rows
from ..problem.problem import Problem
from ..io.runfile import encode_attr, link_name, read_attrs
from ..linalg.vectors import vector_device


@dataclass(frozen=True)
class CoherenceSettings:
    """What to compute; every field is recorded in the run file."""

    sketch: int = 0
    noise_samples: int = 32
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128, 512)
    batch_repeats: int = 16
    control: bool = False
    memory_budget: float = 256 * 2**20
    seed: int = 0

    def resolved(self) -> "CoherenceSettings":
        """The settings validated, with ``noise_samples`` 0 under a sketch (B_noise needs exact gradients)."""
        if self.sketch < 0 or self.noise_samples < 0:
            raise LandscapeError("--sketch and --noise-samples must be at least 0")
        return replace(self, noise_samples=0) if self.sketch else self


#: Coordinates :meth:`GradientStats.add` takes at a time: 512 KB of float64 per row, so that a chunk's block stays in
#: the processor's cache across the statistics' passes (2.5x faster than 2 MB blocks on ResNet-18's rows).
COLUMN_BLOCK = 1 << 16


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """Each row's float64 norm over all its coordinates, :data:`COLUMN_BLOCK` of them at a time (no float64 copy
    of the whole block of rows)."""
    sq = torch.zeros(len(rows), dtype=torch.float64, device=rows.device)
    for a in range(0, rows.shape[1], COLUMN_BLOCK):
        sq += torch.linalg.vector_norm(rows[:, a:a + COLUMN_BLOCK], dim=1, dtype=torch.float64) ** 2
    return sq.sqrt_()


def add_bytes_per_row(width: int) -> int:
    """Memory :meth:`GradientStats.add` takes per row over ``width`` coordinates: a block of it in float64, twice."""
    return 16 * min(COLUMN_BLOCK, width)


#: How :func:`random_batches` draws the batches, recorded with a result (a file whose batches were drawn otherwise,
#: independently per size, does not answer a request now).
BATCH_DESIGN = "nested"


@dataclass(frozen=True)
class Batches:
    """Nested disjoint random batches: the samples in a seeded random ``order``; batch ``k`` of size ``b`` is
    ``order[k * b:(k + 1) * b]`` for ``k < counts[b]``, so each batch of size 8 lies inside one of size 32.

    Visited in this order, a size has at most one batch partly seen at any time: its batches' squared norms take
    one accumulator of the gradient's size (:class:`GradientStats`), however many batches there are.
    """

    order: np.ndarray
    counts: Mapping[int, int]

    def ids(self, b: int) -> np.ndarray:
        """Sample -> its batch of size ``b`` (-1: none)."""
        ids = np.full(len(self.order), -1, dtype=np.int64)
        r = self.counts[b]
        ids[self.order[:r * b]] = np.arange(r * b) // b
        return ids


def random_batches(n: int, sizes: tuple[int, ...], repeats: int, seed: int) -> Batches:
    """For each size ``B <= n``: ``min(repeats, n // B)`` disjoint batches, consecutive blocks of one seeded
    permutation of the samples (:class:`Batches`).

    >>> random_batches(10, (2, 4, 16), 3, 0).counts
    {2: 3, 4: 2}
    """
    order = np.random.default_rng([seed, 0xBA7C4]).permutation(n)
    return Batches(order, {b: min(repeats, n // b) for b in sorted(set(sizes)) if 1 <= b <= n})


@dataclass(frozen=True)
class _Span:
    """The rows of a chunk in batches of one size: ``keep`` (rows in a batch), ``k`` (their batch, counted from
    ``k0``), how many batches they touch, whether the first continues one begun before the chunk and whether the
    last goes on after it."""

    keep: torch.Tensor
    k: torch.Tensor
    k0: int
    touched: int
    carry: bool
    last_open: bool


class GradientStats:
    """Streaming statistics of rows ``g_i`` (dimension ``dim``) arriving in chunks in the order of ``batches``
    (:class:`Batches`; the samples' own order by default), accumulated over the coordinates ``coords = (lo, hi)``
    (all by default).

    ``labels[i]`` is the class of sample ``i`` (all 0 for regression). Every statistic is a sum over coordinates of
    products of the accumulators (:meth:`reduced`), so a model too big for its :func:`accumulator_vectors` is done in
    passes over coordinate ranges whose :class:`Reduced` parts are merged (:func:`coordinate_ranges`). The random
    batches' dots with ``sum g_i`` come from each row's dot with ``reference`` (that sum, known before the rows: a
    batch's dot is the sum of its rows'), their squared norms from one running sum per size, closed when the
    batch's last row arrives; with ``whole_batches`` (ranks each holding part of a batch) every batch keeps its sum
    to the end instead.
    """

    def __init__(self, dim: int, labels: np.ndarray, *, batches: Batches | None = None,
                 reference: torch.Tensor | None = None, per_coordinate: bool = True,
                 coords: tuple[int, int] | None = None, device: torch.device | None = None,
                 whole_batches: bool = False) -> None:
        self.n = len(labels)
        self.labels = np.asarray(labels)
        self.n_classes = int(self.labels.max()) + 1 if self.n else 0
        self.lo, self.hi = coords or (0, dim)
        width = self.hi - self.lo
        self.device = device or torch.device("cpu")
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.sum = zeros(width)
        self.sumsq = zeros(width) if per_coordinate else None
        self.class_sum = zeros(self.n_classes, width)
        self.class_unit = zeros(self.n_classes, width)
        self.class_sqnorm = np.zeros(self.n_classes)
        self.norms = np.zeros(self.n)
        self.batches = batches or Batches(np.arange(self.n), {})
        if self.batches.counts and reference is None:
            raise ValueError("the random batches' statistics need the reference sum of the rows")
        self.reference = None if reference is None else \
            reference[self.lo:self.hi].to(self.device, torch.float64, copy=True)
        self.dots = zeros(self.n)
        self.batch_sq = {b: zeros(r) for b, r in self.batches.counts.items()}
        self.batch_sum = {b: zeros(r, width) for b, r in self.batches.counts.items()} if whole_batches else {}
        self.running = {} if whole_batches else {b: zeros(width) for b in self.batches.counts if b > 1}
        self.next = 0

    def _span(self, b: int, start: int, count: int) -> _Span | None:
        """How the rows at positions ``start .. start + count - 1`` fall into batches of size ``b``."""
        k = np.arange(start, start + count) // b
        keep = np.flatnonzero(k < self.batches.counts[b])
        if not len(keep):
            return None
        last = start + int(keep[-1])
        as_t = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        return _Span(as_t(keep), as_t(k[keep] - k[keep[0]]), int(k[keep[0]]), int(k[keep[-1]] - k[keep[0]]) + 1,
                     carry=start % b != 0, last_open=(last + 1) % b != 0)

    def add(self, start: int, rows: torch.Tensor) -> None:
        """Rows at positions ``start, start + 1, ...`` of the order (whole gradients: their norms are over every
        coordinate), taken :data:`COLUMN_BLOCK` coordinates at a time in float64 (:meth:`bytes_per_row`), where the
        accumulators are (on the GPU the rows are never copied to the host). Block by block, no float64 copy of a
        whole chunk is made: at 11M parameters that copy (2.8 GB for 32 rows) cost more in page faults than the
        sums. The running sums need the positions in order, chunk after chunk."""
        if self.running and start != self.next:
            raise ValueError(f"rows must arrive in order: position {self.next} expected, {start} given")
        self.next = start + len(rows)
        rows = rows.detach().to(self.device)
        idx = self.batches.order[start:start + len(rows)]
        norms = row_norms(rows)
        host_norms = norms.cpu().numpy()
        self.norms[idx] = host_norms
        np.add.at(self.class_sqnorm, self.labels[idx], host_norms ** 2)
        lab = torch.as_tensor(self.labels[idx], dtype=torch.long, device=self.device)
        at = torch.as_tensor(idx, device=self.device)
        spans = {b: sp for b in self.batches.counts if (sp := self._span(b, start, len(rows))) is not None}
        inverse = 1 / norms.clamp_min(1e-300).unsqueeze(1)
        for a in range(self.lo, self.hi, COLUMN_BLOCK):
            z = min(self.hi, a + COLUMN_BLOCK)
            g = rows[:, a:z].to(torch.float64)
            cols = slice(a - self.lo, z - self.lo)
            self.sum[cols] += g.sum(0)
            if self.sumsq is not None:
                self.sumsq[cols] += (g * g).sum(0)
            self.class_sum[:, cols].index_add_(0, lab, g)
            self.class_unit[:, cols].index_add_(0, lab, g * inverse)
            if self.reference is not None:
                self.dots.index_add_(0, at, g @ self.reference[cols])
            for b, sp in spans.items():
                self._add_batches(b, sp, g, cols)

    def _add_batches(self, b: int, sp: _Span, g: torch.Tensor, cols: slice) -> None:
        """One column block of a chunk's rows into the batches of size ``b``: kept whole, or summed per batch
        touched, a closed batch's squared norm added to ``batch_sq`` and an open one carried on."""
        if self.batch_sum:
            self.batch_sum[b][:, cols].index_add_(0, sp.k + sp.k0, g[sp.keep])
            return
        part = torch.zeros(sp.touched, g.shape[1], dtype=g.dtype, device=g.device).index_add_(0, sp.k, g[sp.keep])
        if sp.carry:
            part[0] += self.running[b][cols]
        closed = sp.touched - sp.last_open
        self.batch_sq[b][sp.k0:sp.k0 + closed] += (part[:closed] * part[:closed]).sum(1)
        if sp.last_open:
            self.running[b][cols] = part[-1]

    def bytes_per_row(self) -> int:
        """Memory :meth:`add` takes per row beyond the row itself (:func:`add_bytes_per_row`)."""
        return add_bytes_per_row(self.hi - self.lo)

    def all_reduce(self, comm: Comm) -> None:
        """Add up the statistics of the ranks' shards of the samples (every statistic here is a sum over samples;
        per-sample rows are zero outside a rank's shard)."""
        if not comm.active:
            return
        # views of the numpy arrays: reduced in place
        norms, class_sqnorm = torch.from_numpy(self.norms), torch.from_numpy(self.class_sqnorm)
        comm.all_reduce_([self.sum, self.class_sum, self.class_unit, norms, class_sqnorm, self.dots,
                          *self.batch_sum.values(), *self.batch_sq.values(),
                          *([self.sumsq] if self.sumsq is not None else [])])

    def reduced(self) -> "Reduced":
        """This coordinate range's share of every statistic."""
        gsnr = None
        if self.sumsq is not None:
            mean = self.sum / self.n
            var = (self.sumsq / self.n - mean * mean).clamp_min(0)
            scale = (self.sumsq / self.n).clamp_min(1e-300)
            gsnr = (mean * mean / var).masked_fill_(var <= 1e-12 * scale, float("nan")).cpu().numpy()
        dots = self.dots.cpu().numpy()
        batch_sq = {b: v + (self.batch_sum[b] ** 2).sum(1) if self.batch_sum else v for b, v in self.batch_sq.items()}
        return Reduced(
            n=self.n, labels=self.labels, norms=self.norms, class_sqnorm=self.class_sqnorm,
            sum=self.sum.cpu().numpy(), gsnr=gsnr, total=float(self.sum @ self.sum),
            class_total=(self.class_sum * self.class_sum).sum(1).cpu().numpy(),
            class_dots=(self.class_unit @ self.class_unit.T).cpu().numpy(),
            batch_sq={b: v.cpu().numpy() for b, v in batch_sq.items()},
            batch_dot={b: np.bincount(np.arange(r * b) // b, weights=dots[self.batches.order[:r * b]], minlength=r)
                       for b, r in self.batches.counts.items()})


@dataclass(frozen=True)
class Reduced:
    """Sums over coordinates of the products the statistics need (``total = ||sum g_i||^2``, per-class
    ``||sum_{i in a} g_i||^2``, the Gram matrix of per-class sums of unit gradients, per random batch its squared
    norm and its dot with ``sum g_i``), the ``sum`` and per-coordinate GSNR of the coordinates covered, and the
    per-sample norms. Parts over disjoint coordinate ranges :meth:`merge` into the whole."""

    n: int
    labels: np.ndarray
    norms: np.ndarray
    class_sqnorm: np.ndarray
    sum: np.ndarray
    gsnr: np.ndarray | None
    total: float
    class_total: np.ndarray
    class_dots: np.ndarray
    batch_sq: Mapping[int, np.ndarray]
    batch_dot: Mapping[int, np.ndarray]

    def merge(self, o: "Reduced") -> "Reduced":
        """This part followed by ``o``, the next coordinate range."""
        return replace(self, sum=np.concatenate([self.sum, o.sum]),
                       gsnr=None if self.gsnr is None else np.concatenate([self.gsnr, o.gsnr]),
                       total=self.total + o.total, class_total=self.class_total + o.class_total,
                       class_dots=self.class_dots + o.class_dots,
                       batch_sq={b: v + o.batch_sq[b] for b, v in self.batch_sq.items()},
                       batch_dot={b: v + o.batch_dot[b] for b, v in self.batch_dot.items()})

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    def metrics(self) -> dict[str, float]:
        sq = float(self.norms @ self.norms)
        m_coh = self.total / sq if sq > 0 else float("nan")
        gnorm2 = self.total / self.n ** 2
        trace_sigma = (sq - self.n * gnorm2) / (self.n - 1) if self.n > 1 else float("nan")
        return {"m": self.n, "m_coherence": m_coh, "alpha": m_coh / self.n, "gradient_diversity": 1.0 / m_coh,
                "gradient_norm": math.sqrt(gnorm2), "trace_sigma": trace_sigma,
                "b_simple": trace_sigma / gnorm2 if gnorm2 > 0 else float("inf")}

    def class_metrics(self) -> dict[str, np.ndarray]:
        counts = np.bincount(self.labels, minlength=len(self.class_sqnorm)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            class_m = self.class_total / self.class_sqnorm
            cos = self.class_dots / np.outer(counts, counts)
            diag = (np.diag(self.class_dots) - counts) / (counts * (counts - 1))
        np.fill_diagonal(cos, diag)
        return {"class_count": counts.astype(np.int64), "class_m_coherence": class_m, "class_cosine": cos}

    def batch_metrics(self) -> dict[str, np.ndarray]:
        """Cosine of each random batch's gradient with the mean gradient: ``s_B . S / (||s_B|| ||S||)``."""
        sizes = sorted(self.batch_sq)
        total_norm = math.sqrt(self.total)
        cos_mean, cos_std, reps = [], [], []
        for b in sizes:
            c = self.batch_dot[b] / np.maximum(np.sqrt(self.batch_sq[b]) * total_norm, 1e-300)
            cos_mean.append(float(c.mean()))
            cos_std.append(float(c.std(ddof=1)) if len(c) > 1 else float("nan"))
            reps.append(len(c))
        return {"batch_sizes": np.asarray(sizes, dtype=np.int64), "batch_cosine": np.asarray(cos_mean),
                "batch_cosine_std": np.asarray(cos_std), "batch_count": np.asarray(reps, dtype=np.int64)}


def accumulator_vectors(n_classes: int, batches: Batches, per_coordinate: bool, whole_batches: bool = False) -> int:
    """Accumulators of :class:`GradientStats`, in vectors of the gradient's size: sum, sum of squares, two per
    class, and for the random batches the reference sum and a running sum per size above 1 (one per batch with
    ``whole_batches``)."""
    counts = batches.counts
    kept = sum(counts.values()) if whole_batches else sum(b > 1 for b in counts)
    return 1 + per_coordinate + 2 * n_classes + (1 + kept if counts else 0)


def coordinate_ranges(dim: int, vectors: int, budget: float) -> list[tuple[int, int]]:
    """Consecutive coordinate ranges whose ``vectors`` float64 accumulators fit ``budget`` bytes each.

    >>> coordinate_ranges(10, 4, 4 * 8 * 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    width = max(1, min(dim, int(budget // (vectors * 8))))
    return [(lo, min(dim, lo + width)) for lo in range(0, dim, width)]


@dataclass(frozen=True)
class CoherenceResult:
    """Scalars (``metrics``), arrays (per class, per sample, per batch size), GSNR by parameter, the control."""

    settings: CoherenceSettings
    metrics: Mapping[str, float]
    arrays: Mapping[str, np.ndarray]
    gsnr: Mapping[str, np.ndarray]
    method: str
    seconds: float
    control: "CoherenceResult | None" = None

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {**self.metrics, "method": self.method}
        if self.control is not None:
            out["control"] = self.control.summary()
        return out

    def write(self, parent: h5py.Group, name: str = "coherence") -> h5py.Group:
        if name in parent:
            del parent[name]
        g = parent.create_group(name)
        s = self.settings
        attrs = {**self.metrics, "method": self.method, "sketch": s.sketch,
                 "sketch_rel_error": math.sqrt(2.0 / s.sketch) if s.sketch else 0.0,
                 "noise_samples": s.noise_samples, "batch_repeats": s.batch_repeats, "batch_design": BATCH_DESIGN,
                 "control_kind":
                 "shuffled-labels" if s.control else "", "seed": s.seed, "seconds": self.seconds}
        for k, v in attrs.items():
            g.attrs[k] = encode_attr(v)
        for k, v in self.arrays.items():
            g.create_dataset(k, data=v)
        for pname, arr in self.gsnr.items():
            g.create_dataset(f"gsnr/{link_name(pname)}", data=arr)
        if self.control is not None:
            self.control.write(g, "control")
        return g


def same_settings(group: h5py.Group, s: CoherenceSettings) -> bool:
    """Whether ``group`` (``/coherence``) holds a result for exactly ``s``: the attributes that decide the question,
    and the batch sizes."""
    s = s.resolved()
    a = read_attrs(group)
    want = {"sketch": s.sketch, "noise_samples": s.noise_samples, "batch_repeats": s.batch_repeats,
            "batch_design": BATCH_DESIGN,
            "control_kind": "shuffled-labels" if s.control else "", "seed": s.seed}
    return all(a.get(k) == v for k, v in want.items()) and \
        group["batch_sizes"][()].tolist() == [b for b in sorted(s.batch_sizes) if b <= a["m"]]


def summary_from_group(group: h5py.Group) -> dict[str, object]:
    """The :meth:`CoherenceResult.summary` of a stored ``/coherence`` group."""
    keys = ("m", "m_coherence", "alpha", "gradient_diversity", "gradient_norm", "trace_sigma", "b_simple",
            "gsnr_mean", "gsnr_median", "b_noise", "b_noise_stderr", "trace_h_sigma", "gHg", "method")
    a = read_attrs(group)
    out: dict[str, object] = {k: a[k] for k in keys if k in a}
    if "control" in group:
        out["control"] = summary_from_group(group["control"])
    return out


def sample_labels(problem: Problem, y: torch.Tensor) -> np.ndarray:
    """Each sample's class for the per-class statistics (all 0 for regression)."""
    if problem.classification:
        return y.detach().cpu().numpy().astype(np.int64)
    return np.zeros(len(y), dtype=np.int64)


def el2n(problem: Problem, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """EL2N per sample: ``||softmax(f(x)) - onehot(y)||`` (over every target of a sample, e.g. each token of a
    sequence; for a causal LM each token against the next one, tokens labelled -100 left out), or ``||f(x) - y||``
    for regression."""
    out = []
    shift = getattr(problem.loss_fn, "shift", 0)  # a causal LM scores logits[:, i] against labels[:, i + 1]
    with torch.no_grad():
        for s in range(0, len(X), problem.batch_size):
            # a plain forward pass: the fused attention kernels are fine here (Problem.forward avoids them)
            f = functional_call(problem._model, (problem.theta0, problem.buffers), (X[s:s + problem.batch_size],))
            t = y[s:s + problem.batch_size]
            if shift:
                f, t = f[:, :-shift], t[:, shift:]
            if not t.is_floating_point():  # class targets, on the last axis of the logits (a label or a token each)
                keep = t != IGNORE_INDEX  # positions without a label (padding, unmasked tokens) count 0
                err = torch.softmax(f.double(), dim=-1)
                err.scatter_add_(-1, t.clamp(min=0).unsqueeze(-1), torch.full(t.shape + (1,), -1.0, dtype=err.dtype,
                                                                              device=err.device))
                err = err * keep.unsqueeze(-1)
            else:
                err = (f.double() - t.double().reshape(f.shape))
            out.append(torch.linalg.vector_norm(err.reshape(len(t), -1), dim=1).cpu().numpy())
    return np.concatenate(out)


@single_blas_thread()
def analyze_coherence(problem: Problem, settings: CoherenceSettings = CoherenceSettings(), *,
                      sample_index: np.ndarray | None = None,
                      progress: Callable[[str, int, int], None] | None = None) -> CoherenceResult:
    """Every statistic of the module docstring on the Problem's evaluation set (and the shuffled-label control)."""
    settings = settings.resolved()
    if problem.n < 2:
        raise LandscapeError("coherence needs at least 2 samples", hint="raise --max-samples")
    result = _analyze(problem, settings, problem.y, progress, "coherence")
    arrays = dict(result.arrays)
    arrays["sample_index"] = np.arange(problem.n) if sample_index is None else np.asarray(sample_index)
    control = None
    if settings.control:
        perm = torch.randperm(problem.n, generator=torch.Generator().manual_seed(settings.seed + 1))
        control = _analyze(problem, settings, problem.y[perm.to(problem.device)], progress,
                           "coherence (shuffled labels)")
        control = replace(control, arrays={**control.arrays, "sample_index": arrays["sample_index"],
                                           "shuffled_from": perm.numpy()})
    return replace(result, arrays=arrays, control=control)


def _one_gradient(problem: Problem, y: torch.Tensor, i: int, method: str) -> np.ndarray:
    """Sample ``i``'s gradient as a float64 vector (on every rank: the probes' products are data-parallel)."""
    g = per_sample_gradients(problem, problem.X[i:i + 1], y[i:i + 1], method=method)  # streamed: read now
    return g[0].detach().to("cpu", torch.float64).numpy()


def _sketched(problem: Problem, s: CoherenceSettings, labels: np.ndarray, batches: Batches, X: StreamedInputs,
              y: torch.Tensor) -> Reduced:
    """The statistics of the sketches ``R g_i`` of the samples in the batches' order (``X``, ``y``), all at once:
    a rank's shard of them, added across ranks (their reference sum first)."""
    comm = problem.comm
    lo, hi = comm.shard(problem.n)  # under torchrun each rank takes its shard of the samples
    sketches = sketched_gradients(problem, rows(X, lo, hi), y[lo:hi], s.sketch, seed=s.seed)
    reference = sketches.sum(0, dtype=torch.float64)
    comm.all_reduce_([reference])
    stats = GradientStats(s.sketch, labels, batches=batches, reference=reference, per_coordinate=False,
                          whole_batches=comm.active)
    stats.add(lo, sketches)
    stats.all_reduce(comm)
    return stats.reduced()


def _exact(problem: Problem, s: CoherenceSettings, labels: np.ndarray, batches: Batches, X: StreamedInputs,
           y: torch.Tensor, progress: Callable[[str, int, int], None] | None, label: str
           ) -> tuple[Reduced, str, int]:
    """(statistics, ``vmap`` or ``loop``, passes) of the exact per-sample gradients of the samples in the batches'
    order (``X``, ``y``): half the budget for the accumulators, half for the chunks of gradients; accumulators that
    do not fit take several passes, each over a range of coordinates. Each pass first sums the gradients of its
    shard in one batched backward per batch (the batches' reference, :func:`gradient_sum`)."""
    comm = problem.comm
    n, dim = problem.n, problem.num_parameters
    lo, hi = comm.shard(n)  # under torchrun each rank takes its shard of the samples; the sums are all-reduced
    vectors = accumulator_vectors(int(labels.max()) + 1, batches, True, comm.active)
    ranges = coordinate_ranges(dim, vectors, s.memory_budget / 2)
    # on a GPU the accumulators stay there when they fit (the rows then never cross to the host)
    where = vector_device(problem.device, ranges[0][1] - ranges[0][0], vectors)
    red, method = None, "vmap"
    for p, coords in enumerate(ranges):
        reference = None
        if batches.counts:
            reference = gradient_sum(problem, rows(X, lo, hi), y[lo:hi])
            comm.all_reduce_([reference])
        stats = GradientStats(dim, labels, batches=batches, reference=reference, coords=coords, device=where,
                              whole_batches=comm.active)
        del reference  # the stats hold their range of it
        what = label if len(ranges) == 1 else f"{label} (pass {p + 1} of {len(ranges)})"
        for start, g, method in iter_gradients(problem, rows(X, lo, hi), y[lo:hi], memory_budget=s.memory_budget / 2,
                                               extra_bytes_per_sample=stats.bytes_per_row()):
            stats.add(lo + start, g)
            end = start + len(g)
            del g  # before the next chunk is computed, so that its memory can be reused for it
            if progress:
                progress(what, min(end * comm.world, n), n)
        stats.all_reduce(comm)
        red = stats.reduced() if red is None else red.merge(stats.reduced())
        del stats
    assert red is not None
    return red, method, len(ranges)


def _analyze(problem: Problem, s: CoherenceSettings, y: torch.Tensor,
             progress: Callable[[str, int, int], None] | None, label: str) -> CoherenceResult:
    """Every coherence statistic of ``problem`` with labels ``y`` from one pass over the per-sample gradients
    (exact, chunked to the budget, or sketched), then ``B_noise`` by Hessian-vector products on ``noise_samples``
    samples.

    Length: the single pass accumulates all statistics chunk by chunk (sums, per-class sums, squared norms, the
    kept samples' gradients), which is what makes it one pass; each statistic's formula is a helper."""
    t0 = time.perf_counter()
    n = problem.n
    labels = sample_labels(problem, y)
    rng = np.random.default_rng(s.seed)
    keep = np.sort(rng.choice(n, size=min(s.noise_samples, n), replace=False)) if s.noise_samples \
        else np.array([], dtype=np.int64)
    batches = random_batches(n, s.batch_sizes, s.batch_repeats, s.seed)
    # the samples are visited in the batches' order, so that each size has one batch open at a time
    X, yo = reordered(problem.X, batches.order), y[torch.as_tensor(batches.order, device=y.device)]
    if s.sketch:
        if progress:
            progress(f"{label}: sketch of {s.sketch} projections", 0, 0)
        red, method, passes = _sketched(problem, s, labels, batches, X, yo), "sketch", 1
    else:
        red, method, passes = _exact(problem, s, labels, batches, X, yo, progress, label)
    metrics = {**red.metrics(), "coordinate_passes": passes}
    arrays = {**red.class_metrics(), **red.batch_metrics(), "grand": red.norms,
              "el2n": el2n(problem, problem.X, y)}
    gsnr: dict[str, np.ndarray] = {}
    if not s.sketch:
        flat = red.gsnr
        ok = np.isfinite(flat)
        metrics["gsnr_mean"] = float(flat[ok].mean()) if ok.any() else float("nan")
        metrics["gsnr_median"] = float(np.median(flat[ok])) if ok.any() else float("nan")
        i = 0
        for name in problem.names:
            t = problem.theta0[name]
            gsnr[name] = flat[i:i + t.numel()].reshape(tuple(t.shape))
            i += t.numel()
    if len(keep):
        if progress:
            progress(f"{label}: B_noise ({len(keep)} Hessian-vector products)", 0, 0)
        op = CurvatureOperator(problem)
        G = red.mean
        gHg = float(G @ op.matvec(G))
        # the probes' gradients are computed again, one at a time, rather than kept from the pass (16 x P numbers)
        terms = np.array([(d := (_one_gradient(problem, y, int(i), method) - G)) @ op.matvec(d)
                          for i in keep]) * n / (n - 1)
        tr = float(terms.mean())
        se = float(terms.std(ddof=1) / np.sqrt(len(terms))) if len(terms) > 1 else float("nan")
        metrics = {**metrics, "b_noise": tr / gHg, "b_noise_stderr": se / abs(gHg), "trace_h_sigma": tr,
                   "gHg": gHg}
    return CoherenceResult(settings=s, metrics=metrics, arrays=arrays, gsnr=gsnr, method=method,
                           seconds=time.perf_counter() - t0)
