"""Sharpness measures of a Problem at its point ``w`` (theta0), each a function of the Problem and its settings.

Notation: ``L_S`` is the mean loss over a batch ``S`` of the evaluation set, ``c`` the per-coordinate scale of the
perturbation (``|w|`` adaptive, ``1`` plain; zero outside the selected parameters, which therefore never move).

* **worst-case** (Andriushchenko et al. 2023): ``E_S max_{||delta / c||_p <= rho} L_S(w + delta) - L_S(w)`` over
  disjoint batches of size ``m`` (m-sharpness), solved by :func:`landscape.linalg.ascent.apgd` (random start).
* **average-case**: ``E_S E_delta [L_S(w + delta) - L_S(w)]``, ``delta ~ N(0, rho^2 diag(c^2))`` (``l2``) or
  uniform on the box ``|delta_i| <= rho c_i`` (``linf``), Monte Carlo with ``draws`` draws per batch.
* **sam** (Foret et al. 2021): one step ``delta = rho g / (||g|| + 1e-12)`` (their guard: a round-off gradient at
  a minimum gives no step); **asam** (Kwon et al. 2021): ``T = |w| + eta``,
  ``delta = rho T^2 g / ||T g||``; both ``E_S [L_S(w + delta_S) - L_S(w)]`` with ``g = grad L_S(w)``.
* **keskar** (Keskar et al. 2017): ``phi = 100 (max_{|z_i| <= eps (|w_i| + 1)} L(w + z) - L(w)) / (1 + L(w))``
  on the whole set, by the same ascent in the box started inside it; ``rho`` is ``eps``.
* **pacbayes** (Jiang et al. 2020, "Fantastic generalization measures"): ``1 / sigma'^2`` with ``sigma'`` the
  largest standard deviation such that ``|E_u err(w + u) - err(w)| <= rho`` (``rho`` = 0.1 in the paper),
  ``u ~ N(0, sigma^2 I)``, or magnitude-aware (adaptive) ``u_i ~ N(0, sigma^2 w_i^2 + eps^2)``; bisection with
  ``draws`` seeded draws reused for every ``sigma`` (common random numbers); ``err`` is the classification
  error (the loss for regression). ``sigma`` is a standard deviation, never a variance.
* **first-order** (Zhang et al. 2023, "Gradient norm aware minimization"): the largest ``||c * grad L(w + delta)||``
  over ``||delta / c||_2 <= rho`` by ascent with Hessian-vector products; Zhang et al.'s ``R1 = rho * value``.
* **basin-width**: along each given direction ``d`` and its opposite, the smallest ``t > 0`` with
  ``L(w + t d) - L(w) >= rho`` (doubling from ``t = 1/64``, then bisection to 1e-3 relative), in units of ``d``.

Sharpness tracks hyperparameters and correlates with generalization only loosely (Andriushchenko et al. 2023);
plain (non-adaptive) measures change under rescalings that leave the function unchanged (Dinh et al. 2017).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch

from ..linalg.ascent import apgd
from ..problem.curvature import select_parameters
from ..linalg.draws import normal, uniform
from ..errors import LandscapeError
from ..problem.problem import Problem
from ..io.runfile import encode_attr, read_attrs

#: What ``landscape scan`` computes unless told otherwise.
DEFAULT_SET = (("worst-case", True), ("average-case", True), ("sam", False), ("asam", True), ("pacbayes", True),
               ("basin-width", False))
MEASURES = ("worst-case", "average-case", "sam", "asam", "keskar", "pacbayes", "first-order", "basin-width")

#: Default ``rho`` for (measure, norm, adaptive); ``None`` in the key matches either.
DEFAULT_RHO: dict[tuple[str, str | None, bool | None], tuple[float, ...]] = {
    ("worst-case", "l2", True): (0.5,), ("worst-case", "l2", False): (0.05,),
    ("worst-case", "linf", True): (0.005,), ("worst-case", "linf", False): (0.001,),
    ("average-case", "l2", True): (0.1,), ("average-case", "l2", False): (0.01,),
    ("average-case", "linf", True): (0.1,), ("average-case", "linf", False): (0.01,),
    ("sam", None, None): (0.05,), ("asam", None, None): (0.5,), ("keskar", None, None): (1e-3, 5e-4),
    ("pacbayes", None, None): (0.1,), ("first-order", "l2", True): (0.5,), ("first-order", "l2", False): (0.05,),
    ("basin-width", None, None): (0.1,),
}
#: What ``rho`` means for each measure (written as the attribute ``rho_meaning``).
RHO_MEANING = {
    "worst-case": "radius of the perturbation set", "average-case": "scale of the random perturbation",
    "sam": "step length", "asam": "step length", "keskar": "box half-width eps",
    "pacbayes": "allowed change of the error", "first-order": "radius of the perturbation set",
    "basin-width": "loss rise",
}


@dataclass(frozen=True)
class SharpnessSettings:
    """One measure and every setting it depends on; all are recorded in the run file."""

    measure: str = "worst-case"
    rho: tuple[float, ...] = ()
    norm: str = "l2"
    adaptive: bool = True
    m: int | None = 128
    steps: int = 20
    draws: int = 10
    eta: float = 0.01
    eps: float = 1e-3
    parameters: tuple[str, ...] = ()
    seed: int = 0

    def resolved(self) -> "SharpnessSettings":
        """The settings with the measure's fixed choices applied and default ``rho`` filled in."""
        if self.measure not in MEASURES:
            raise LandscapeError(f"sharpness measure {self.measure!r} is unknown", hint=f"use {', '.join(MEASURES)}")
        if self.norm not in ("l2", "linf"):
            raise LandscapeError(f"norm {self.norm!r} is unknown", hint="use l2 or linf")
        fixed: dict[str, object] = {
            "sam": {"adaptive": False, "norm": "l2"}, "asam": {"adaptive": True, "norm": "l2"},
            "keskar": {"adaptive": False, "norm": "linf", "m": None}, "pacbayes": {"norm": "l2", "m": None},
            "first-order": {"norm": "l2", "m": None}, "basin-width": {"adaptive": False, "norm": "l2", "m": None},
        }.get(self.measure, {})
        s = replace(self, **fixed)
        if not s.rho:
            rho = DEFAULT_RHO.get((s.measure, s.norm, s.adaptive)) or DEFAULT_RHO[(s.measure, None, None)]
            s = replace(s, rho=rho)
        if any(not (r > 0 and math.isfinite(r)) for r in s.rho):
            raise LandscapeError(f"rho must be positive, got {list(s.rho)}")
        if s.m is not None and s.m < 1:
            raise LandscapeError(f"--m must be at least 1, got {s.m}")
        return s

    @property
    def group(self) -> str:
        """Run-file group name under ``/sharpness``: ``<measure>[_adaptive]_<norm>``."""
        return self.measure.replace("-", "_") + ("_adaptive" if self.adaptive else "") + "_" + self.norm

    @property
    def scaling(self) -> str:
        """The perturbation scale ``c``, in words."""
        return {"keskar": "|w|+1", "asam": f"|w|+{self.eta:g}"}.get(self.measure, "|w|" if self.adaptive else "1")


@dataclass(frozen=True)
class SharpnessResult:
    """``value[i]`` and ``stderr[i]`` for ``rho[i]``; ``samples[i]`` are the per-batch (or per-draw) terms whose
    mean is ``value[i]``; ``extra`` holds measure-specific arrays (``sigma``, ``gradient_norm``, ``distance``)."""

    settings: SharpnessSettings
    rho: np.ndarray
    value: np.ndarray
    stderr: np.ndarray
    samples: np.ndarray
    m: int
    n_samples: int
    loss: float
    n_evals: int
    seconds: float
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"measure": self.settings.measure, "group": self.settings.group, "rho": self.rho.tolist(),
                "value": self.value.tolist(), "stderr": self.stderr.tolist(), "m": self.m,
                "n_samples": self.n_samples, "n_evals": self.n_evals}

    def write(self, parent: h5py.Group) -> h5py.Group:
        """Write ``/sharpness/<group>`` under ``parent`` (the file root), replacing an earlier one."""
        root = parent.require_group("sharpness")
        s = self.settings
        if s.group in root:
            del root[s.group]
        g = root.create_group(s.group)
        for name, arr in {"rho": self.rho, "value": self.value, "stderr": self.stderr, "samples": self.samples,
                          **self.extra}.items():
            g.create_dataset(name, data=arr)
        for name, arr in _quadratic_estimates(parent, s, self.rho).items():
            g.create_dataset(name, data=arr)
        attrs = {"measure": s.measure, "norm": s.norm, "adaptive": s.adaptive, "scaling": s.scaling, "m": self.m,
                 "m_requested": -1 if s.m is None else s.m, "eta": s.eta, "eps": s.eps,
                 "n_samples": self.n_samples, "steps": s.steps, "draws": s.draws, "seed": s.seed,
                 "parameters": list(s.parameters), "rho_meaning": RHO_MEANING[s.measure], "loss": self.loss,
                 "n_evals": self.n_evals, "seconds": self.seconds}
        for k, v in attrs.items():
            g.attrs[k] = encode_attr(v)
        return g


def same_settings(group: h5py.Group, settings: SharpnessSettings) -> bool:
    """Whether ``group`` (a ``/sharpness/<name>`` group) holds a result for exactly ``settings`` (resolved): the
    attributes that decide the question, and ``rho``."""
    stored = read_attrs(group)
    want = {"measure": settings.measure, "norm": settings.norm, "adaptive": settings.adaptive,
            "m_requested": -1 if settings.m is None else settings.m, "steps": settings.steps,
            "draws": settings.draws, "seed": settings.seed, "parameters": list(settings.parameters),
            "eta": settings.eta, "eps": settings.eps}
    return all(stored.get(k) == v for k, v in want.items()) and \
        np.array_equal(group["rho"][()], np.asarray(settings.rho, dtype=np.float64))


def summary_from_group(group: h5py.Group) -> dict[str, object]:
    """The :meth:`SharpnessResult.summary` of a stored group."""
    a = read_attrs(group)
    return {"measure": a["measure"], "group": group.name.rsplit("/", 1)[-1], "rho": group["rho"][()].tolist(),
            "value": group["value"][()].tolist(), "stderr": group["stderr"][()].tolist(), "m": a["m"],
            "n_samples": a["n_samples"], "n_evals": a["n_evals"]}


def _quadratic_estimates(root: h5py.Group, s: SharpnessSettings, rho: np.ndarray) -> dict[str, np.ndarray]:
    """Second-order predictions from the run file's full-batch Hessian results, where they exist: plain
    worst-case L2 over the whole set ``rho^2 lambda_max / 2`` (exact for a quadratic at its minimum) and plain
    Gaussian average-case ``rho^2 tr(H) / 2``."""
    h = root.get("hessian")
    if h is None or s.adaptive or s.norm != "l2" or s.parameters:
        return {}
    if s.measure == "worst-case" and s.m is None and "eigenvalues" in h:
        return {"quadratic": 0.5 * rho ** 2 * float(h["eigenvalues"][0])}
    if s.measure == "average-case" and "trace" in h:
        return {"quadratic": 0.5 * rho ** 2 * float(h["trace"].attrs["estimate"])}
    return {}


class _Flat:
    """Flat vectors over all parameters of a Problem, in its order, dtype and device."""

    def __init__(self, problem: Problem, parameters: Sequence[str] = ()) -> None:
        self.names = problem.names
        self.shapes = [problem.theta0[n].shape for n in self.names]
        self.sizes = [problem.theta0[n].numel() for n in self.names]
        self.w = torch.cat([problem.theta0[n].reshape(-1) for n in self.names])
        chosen = set(select_parameters(self.names, parameters or None))
        self.mask = torch.cat([torch.full((problem.theta0[n].numel(),), float(n in chosen), dtype=self.w.dtype,
                                          device=self.w.device) for n in self.names])

    def params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, (t.reshape(s) for t, s in zip(flat.split(self.sizes), self.shapes))))

    def vector(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def scale(self, s: SharpnessSettings) -> torch.Tensor:
        base = {"keskar": self.w.abs() + 1, "asam": self.w.abs() + s.eta}.get(
            s.measure, self.w.abs() if s.adaptive else torch.ones_like(self.w))
        return base * self.mask


def batches(n: int, m: int | None, seed: int) -> list[torch.Tensor]:
    """Disjoint batches of size ``m`` from a seeded permutation of ``range(n)`` (the remainder is dropped); one
    batch of all samples when ``m`` is None or at least ``n``."""
    if m is None or m >= n:
        return [torch.arange(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[i * m:(i + 1) * m] for i in range(n // m)]


def _mean_stderr(x: np.ndarray) -> tuple[float, float]:
    x = x[np.isfinite(x)] if np.isfinite(x).any() else x
    return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


class _Run:
    """The state one :func:`sharpness` call shares across its ``rho``: the problem's parameters as flat vectors and
    the perturbation scale ``c``, the batches with their losses at ``w``, the count of loss and gradient
    evaluations, the noise draws (numbered across the call: draw ``k`` is stream ``k`` of the seed), the values a
    measure reports beside its rows, and progress."""

    def __init__(self, problem: Problem, s: SharpnessSettings, directions: Sequence[Mapping[str, torch.Tensor]],
                 progress: Callable[[int, int], None] | None) -> None:
        self.problem, self.s, self.progress = problem, s, progress
        self.flat = _Flat(problem, s.parameters)
        self.c = self.flat.scale(s)
        self.evals = [0]
        self.drawn = 0
        self.done = 0
        self.extra: dict[str, list] = {}
        self.directions = [self.flat.vector(d).to(self.flat.w) for d in directions]
        self.batches = batches(problem.n, s.m, s.seed)
        self.zero = torch.zeros_like(self.flat.w)
        self.base = [self.loss(b, self.zero) for b in self.batches]
        self.full_loss = float(np.mean(self.base))
        per_batch = s.measure in ("worst-case", "average-case", "sam", "asam")
        self.units = len(s.rho) * (len(self.batches) if per_batch else 1)

    def at(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.flat.params(self.flat.w + delta)

    def loss_grad(self, idx: torch.Tensor | None) -> Callable[[torch.Tensor], tuple[float, torch.Tensor]]:
        """``delta -> (L_S(w + delta), its gradient in delta)`` on the samples ``idx``, counted."""
        def f(delta: torch.Tensor) -> tuple[float, torch.Tensor]:
            self.evals[0] += 1
            val, g = self.problem.loss_and_gradient(self.at(delta), idx)
            return val, self.flat.vector(g)
        return f

    def loss(self, idx: torch.Tensor | None, delta: torch.Tensor) -> float:
        """``L_S(w + delta)`` on the samples ``idx`` (all when None), counted."""
        self.evals[0] += 1
        return self.problem.loss(self.at(delta), idx)

    def noise(self, draws: int) -> Iterator[torch.Tensor]:
        """``draws`` standard draws (Gaussian for l2, uniform on [-1, 1] for linf), one at a time on the weights'
        device (:mod:`landscape.linalg.draws`, never ``draws x P`` at once)."""
        w = self.flat.w
        for _ in range(draws):
            z = (uniform(w.numel(), seed=self.s.seed, stream=self.drawn, device=w.device) * 2 - 1
                 if self.s.norm == "linf" else normal(w.numel(), seed=self.s.seed, stream=self.drawn, device=w.device))
            self.drawn += 1
            yield z.to(w.dtype)

    def tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.units)


def _worst_case(r: _Run, rho: float) -> list[float]:
    row = []
    for b, (idx, l0) in enumerate(zip(r.batches, r.base)):
        row.append(apgd(r.loss_grad(idx), r.c, rho, norm=r.s.norm, steps=r.s.steps, seed=r.s.seed + b).value - l0)
        r.tick()
    return row


def _average_case(r: _Run, rho: float) -> list[float]:
    row: list[float] = []
    for idx, l0 in zip(r.batches, r.base):
        row.extend(r.loss(idx, rho * r.c * z) - l0 for z in r.noise(r.s.draws))
        r.tick()
    return row


def _one_step(r: _Run, rho: float) -> list[float]:
    """SAM and ASAM: ``delta = rho c^2 g / ||c g||`` (``c = 1`` for SAM, ``|w| + eta`` for ASAM)."""
    row = []
    for idx, l0 in zip(r.batches, r.base):
        g = r.loss_grad(idx)(r.zero)[1]
        delta = rho * r.c * r.c * g / (float(torch.linalg.vector_norm(r.c * g)) + 1e-12)
        row.append(r.loss(idx, delta) - l0)
        r.tick()
    return row


def _keskar(r: _Run, rho: float) -> list[float]:
    best = apgd(r.loss_grad(r.batches[0]), r.c, rho, norm="linf", steps=r.s.steps, seed=r.s.seed).value
    r.tick()
    return [100.0 * (best - r.full_loss) / (1.0 + r.full_loss)]


def _pacbayes(r: _Run, rho: float) -> list[float]:
    sigma, dev = _pacbayes_sigma(r.problem, r.flat, r.s, rho, r.evals)
    r.extra.setdefault("sigma", []).append(sigma)
    r.extra.setdefault("deviation", []).append(dev)
    r.tick()
    return [1.0 / sigma ** 2]


def _first_order(r: _Run, rho: float) -> list[float]:
    res = apgd(_gradient_norm(r.problem, r.flat, r.c, r.evals), r.c, rho, norm="l2", steps=r.s.steps, seed=r.s.seed)
    r.tick()
    return [res.value]


def _basin_width(r: _Run, rho: float) -> list[float]:
    dists = [[_first_crossing(lambda t: r.loss(None, t * sign * d), r.full_loss, rho) for sign in (1.0, -1.0)]
             for d in r.directions]
    r.extra.setdefault("distance", []).append(dists)
    r.tick()
    return list(np.ravel(dists))


#: each measure's row of values at one ``rho`` (one per batch, draw, direction, or a single value)
_ROWS: dict[str, Callable[[_Run, float], list[float]]] = {
    "worst-case": _worst_case, "average-case": _average_case, "sam": _one_step, "asam": _one_step,
    "keskar": _keskar, "pacbayes": _pacbayes, "first-order": _first_order, "basin-width": _basin_width}


def sharpness(problem: Problem, settings: SharpnessSettings, *,
              directions: Sequence[Mapping[str, torch.Tensor]] | None = None,
              progress: Callable[[int, int], None] | None = None) -> SharpnessResult:
    """Compute one measure for every ``rho`` of ``settings`` (see the module docstring).

    ``directions`` are needed by ``basin-width`` only (e.g. the stored slice directions). ``progress(done, total)``
    is called after each unit of work.
    """
    s = settings.resolved()
    if s.measure == "basin-width" and not directions:
        raise LandscapeError("basin-width needs directions", hint="run it on a run file with slices, or "
                             "let landscape draw random filter-normalized ones")
    t0 = time.perf_counter()
    run = _Run(problem, s, (directions or ()) if s.measure == "basin-width" else (), progress)
    rows = [np.asarray(_ROWS[s.measure](run, rho), dtype=np.float64) for rho in s.rho]
    stats = [_mean_stderr(r) for r in rows]
    samples = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for i, r in enumerate(rows):
        samples[i, :len(r)] = r
    m = len(run.batches[0])
    return SharpnessResult(
        settings=s, rho=np.asarray(s.rho, dtype=np.float64), value=np.array([v for v, _ in stats]),
        stderr=np.array([e for _, e in stats]), samples=samples, m=m, n_samples=m * len(run.batches),
        loss=run.full_loss, n_evals=run.evals[0], seconds=time.perf_counter() - t0,
        extra={k: np.asarray(v, dtype=np.float64) for k, v in run.extra.items()})


#: Vector operations on P numbers around each ascent step (scaling, step direction, projection, momentum, the
#: point ``w + delta`` and the gradient's concatenation), and the evaluations of a doubling-then-bisection search
#: (PAC-Bayes's sigma, basin width: about 6 doublings and 10 halvings to 1e-3; 26 when sigma is unbounded).
ASCENT_VECTOR_OPS = 12
SEARCH_STEPS = 20


@dataclass(frozen=True)
class Work:
    """What a measure does, counted from its algorithm for ``--dry-run``: loss evaluations and gradients, each
    ``{batch size: count}``, Hessian-vector products on the whole set, standard draws of P numbers and
    elementwise operations on P-long vectors. Times come from measuring one of each
    (:func:`landscape.analyses.costs.sharpness_seconds`)."""

    losses: Mapping[int, int]
    gradients: Mapping[int, int]
    hvps: int = 0
    draws: int = 0
    vector_ops: int = 0


def keeps_draws(draws: int, n_parameters: int, element_size: int, memory_budget: float) -> bool:
    """Whether PAC-Bayes keeps its ``draws`` perturbations (within half the memory budget) rather than drawing them
    again at every sigma."""
    return draws * n_parameters * element_size <= memory_budget / 2


def work(settings: SharpnessSettings, n: int, *, n_directions: int = 2, kept_draws: bool = True) -> Work:
    """The :class:`Work` of one measure on ``n`` samples (``n_directions`` for basin width; ``kept_draws`` as
    :func:`keeps_draws` says for PAC-Bayes).

    >>> w = work(SharpnessSettings("sam", m=None), 100)
    >>> dict(w.losses), dict(w.gradients)
    ({100: 2}, {100: 1})
    """
    s = settings.resolved()
    r = len(s.rho)
    m = n if s.m is None else min(s.m, n)
    b = n // m
    losses, grads = {m: b}, {}  # every batch's loss at w, once
    hvps = draws = ops = 0
    ascent = r * (s.steps + 1)  # APGD: steps + 1 evaluations, one random start per run
    if s.measure == "worst-case":
        grads[m] = b * ascent
        draws, ops = r * b, b * ascent * ASCENT_VECTOR_OPS
    elif s.measure == "average-case":
        losses[m] += r * b * s.draws
        draws, ops = r * b * s.draws, 3 * r * b * s.draws
    elif s.measure in ("sam", "asam"):
        losses[m] += r * b
        grads[m], ops = r * b, 8 * r * b
    elif s.measure in ("keskar", "first-order"):
        grads[n] = ascent
        hvps = ascent if s.measure == "first-order" else 0
        draws, ops = r, ascent * (ASCENT_VECTOR_OPS + 3 * (s.measure == "first-order"))
    elif s.measure == "pacbayes":
        losses[n] += r * (1 + SEARCH_STEPS * s.draws)
        draws = r * s.draws * (1 if kept_draws else SEARCH_STEPS)
        ops = r * SEARCH_STEPS * (4 + 2 * s.draws)
    else:  # basin-width
        losses[n] += r * n_directions * 2 * SEARCH_STEPS
        ops = 2 * r * n_directions * 2 * SEARCH_STEPS
    return Work(losses=losses, gradients=grads, hvps=hvps, draws=draws, vector_ops=ops)


def _error(problem: Problem, params: Mapping[str, torch.Tensor]) -> float:
    ev = problem.evaluate(params)
    return 1.0 - ev.accuracy if ev.accuracy is not None else ev.loss


#: PAC-Bayes's search ends at noise this many times the weights (their RMS, or each weight when magnitude-aware)
NOISE_CAP = 1e3


def _pacbayes_sigma(problem: Problem, flat: _Flat, s: SharpnessSettings, target: float, evals: list[int],
                    iters: int = 30, rtol: float = 1e-3) -> tuple[float, float]:
    """Largest ``sigma`` with ``|mean_k err(w + u_k(sigma)) - err(w)| <= target`` (doubling, then bisection).

    ``u_k(sigma) = sigma z_k`` (plain) or ``sqrt(sigma^2 w^2 + eps^2) z_k`` (magnitude-aware), the same standard
    normal ``z_k`` for every sigma. Returns ``(sigma', deviation at sigma')``; ``sigma' = inf`` (``1/sigma'^2 = 0``)
    when the doubling passes :data:`NOISE_CAP` times the weights' RMS (plain) or times each weight (magnitude-aware)
    without moving the error by ``target``: the perturbed weights are then the noise's to 0.1% of their direction, and
    a network of random weights errs alike at any larger scale (ReLU-type and normalized networks exactly, saturating
    ones nearly). An untrained ResNet-18 used to double on to sigma = 1e6: 26 rounds of draws where 16 now say the
    same.
    """
    err0 = _error(problem, flat.params(flat.w))

    def draw(k: int) -> torch.Tensor:
        return normal(flat.w.numel(), seed=s.seed, stream=k, device=flat.w.device).to(flat.w.dtype) * flat.mask

    # the draws x P numbers are kept when they fit half the memory budget, else drawn again at every sigma
    kept = ([draw(k) for k in range(s.draws)]
            if keeps_draws(s.draws, flat.w.numel(), flat.w.element_size(), problem.budget_left()) else None)

    def z(k: int) -> torch.Tensor:
        return kept[k] if kept is not None else draw(k)

    def deviation(sigma: float) -> float:
        scale = torch.sqrt(sigma ** 2 * flat.w ** 2 + s.eps ** 2) if s.adaptive else torch.full_like(flat.w, sigma)
        errs = [_error(problem, flat.params(flat.w + scale * z(k))) for k in range(s.draws)]
        evals[0] += len(errs)
        return abs(float(np.mean(errs)) - err0)

    rms = float(torch.sqrt((flat.w ** 2 * flat.mask).sum() / flat.mask.sum().clamp(min=1)))
    cap = NOISE_CAP * (1.0 if s.adaptive or rms == 0 else rms)
    lo, hi = 0.0, 1.0 / 64
    dev_lo = 0.0
    while (d := deviation(hi)) <= target:
        lo, dev_lo, hi = hi, d, hi * 2
        if hi > cap:  # no noise level moves the error that much (e.g. an untrained net): 1/sigma'^2 = 0
            return float("inf"), dev_lo
    for _ in range(iters):
        if hi - lo <= rtol * hi:
            break
        mid = 0.5 * (lo + hi)
        d = deviation(mid)
        if d <= target:
            lo, dev_lo = mid, d
        else:
            hi = mid
    if lo == 0.0:
        raise LandscapeError(f"the error changes by more than {target} even at sigma = {hi:g}",
                             hint="use a larger --rho (allowed change of the error) for pacbayes")
    return lo, dev_lo


def _gradient_norm(problem: Problem, flat: _Flat, c: torch.Tensor,
                   evals: list[int]) -> Callable[[torch.Tensor], tuple[float, torch.Tensor]]:
    """``delta -> (||c g||, d||c g|| / d delta)`` with ``g = grad L(w + delta)``; the derivative is
    ``H (c^2 g) / ||c g||`` (one gradient and one Hessian-vector product at ``w + delta``)."""
    def f(delta: torch.Tensor) -> tuple[float, torch.Tensor]:
        evals[0] += 2
        point = flat.params(flat.w + delta)
        g = flat.vector(problem.gradient(point))
        norm = float(torch.linalg.vector_norm(c * g))
        if norm == 0:
            return 0.0, torch.zeros_like(g)
        return norm, flat.vector(problem.hvp(flat.params(c * c * g / norm), point))
    return f


def _first_crossing(f: Callable[[float], float], f0: float, rise: float, t0: float = 1 / 64, t_max: float = 1024.0,
                    rtol: float = 1e-3) -> float:
    """Smallest ``t`` on a doubling grid from ``t0`` with ``f(t) - f0 >= rise``, refined by bisection; ``inf`` if
    the loss never rises that much up to ``t_max``."""
    lo, hi = 0.0, t0
    while f(hi) - f0 < rise:
        lo, hi = hi, hi * 2
        if hi > t_max:
            return float("inf")
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if f(mid) - f0 >= rise:
            hi = mid
        else:
            lo = mid
    return hi
