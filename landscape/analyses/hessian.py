"""Curvature analysis of a Problem: top/bottom eigenpairs, trace, spectral density, per-layer results.

:func:`analyze_curvature` runs the pure algorithms (:mod:`landscape.linalg.lanczos`, :mod:`landscape.linalg.trace`,
:mod:`landscape.linalg.density`) on a :class:`~landscape.problem.curvature.CurvatureOperator` and returns a frozen
:class:`CurvatureResult`, which writes itself to the run file under ``/hessian`` (or ``/ggn``), see
``docs/schema.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import h5py
import numpy as np
import torch

from .batchsize import BatchSizeResult, analyze_batch_sizes
from ..problem.curvature import CurvatureOperator, select_parameters
from ..linalg.density import SpectralDensity, slq
from .directions import random_directions
from ..errors import LandscapeError
from ..linalg.lanczos import Eigenpairs, basis_device, lanczos
from ..problem.problem import Problem
from .reference import PYHESSIAN_TRACE_TOL, pyhessian_spectrum
from ..io.runfile import decode_attr, encode_attr, link_name, read_attrs
from ..linalg.trace import TraceEstimate, basis_deflated, hutchinson, hutchpp, sketch_dtype
from .validity import ValidityResult, analyze_validity
from ..linalg.vectors import vector_device


#: ``--trace-method`` choices; ``auto`` is ``lanczos-deflated`` when the top eigenvalues are computed, else ``hutch++``
TRACE_METHODS = ("auto", "lanczos-deflated", "hutch++", "hutchinson", "hutchinson-deflated")


#: Lanczos's relative residual ``||H v - lambda v|| <= tol |lambda|`` unless told (``--tol``): each eigenvalue is
#: then within ``tol |lambda|`` of one of the operator's, and typically within the residual's square over the gap to
#: the next (ResNet-18's top 5 at 256 samples: within 1e-7 of those at 1e-6, in 62 products instead of 82 and 72 s
#: instead of 101 s; RESULTS.md issue 19, session 28). Float32 products round at 1e-6 to 1e-5 relative, so a tighter
#: default spent products reaching their rounding error; ``--dtype float64`` with a small ``--tol`` gives tight pairs.
DEFAULT_TOL = 1e-4


@dataclass(frozen=True)
class CurvatureSettings:
    """What to compute; every field is recorded in the run file."""

    kind: str = "hessian"
    top_k: int = 5
    bottom_k: int = 0
    tol: float = DEFAULT_TOL
    max_hvp: int = 400
    trace: bool = True
    trace_method: str = "auto"
    trace_matvecs: int = 99
    trace_stderr: float | None = None
    density: bool = False
    density_probes: int = 1
    density_steps: int = 100
    per_layer: bool = False
    parameters: tuple[str, ...] = ()
    seed: int = 0
    engine: str = "landscape"
    validity: bool = False
    validity_random: int = 2
    per_class: bool = False
    batch_sizes: tuple[int, ...] = ()
    batch_draws: int = 5

    def __post_init__(self) -> None:
        """Counts that cannot be, refused with the option that set them (``--top-k -1`` used to run silently)."""
        least = {"top_k": 0, "bottom_k": 0, "max_hvp": 1, "trace_matvecs": 3 if self.trace else 0,
                 "density_probes": 1, "density_steps": 2, "validity_random": 0, "batch_draws": 2}
        for name, low in least.items():
            value = getattr(self, name)
            if value < low:
                raise LandscapeError(f"--{name.replace('_', '-')} must be at least {low}, not {value}")
        if not self.tol > 0:
            raise LandscapeError(f"--tol must be positive, not {self.tol}")
        if self.kind not in ("hessian", "ggn"):
            raise LandscapeError(f"curvature kind {self.kind!r} is unknown", hint="use hessian or ggn")
        if self.trace_method not in TRACE_METHODS:
            raise LandscapeError(f"--trace-method {self.trace_method!r} is unknown",
                                 hint=f"use {', '.join(TRACE_METHODS)}")
        if self.trace and self.trace_method.endswith("-deflated") and not self.top_k:
            raise LandscapeError(f"--trace-method {self.trace_method} deflates by the top eigenvectors",
                                 hint="give --top-k > 0, or --trace-method hutch++")

    @property
    def trace_estimator(self) -> str:
        """The trace method that runs: ``auto`` reuses the top eigenvalues' Lanczos basis when there is one
        (``lanczos-deflated``: a third of Hutch++'s products for the same budget, with about its standard error:
        ``tests/test_spectrum.py``, benchmarks/RESULTS.md issue 19) and is ``hutch++`` otherwise."""
        if self.trace_method != "auto":
            return self.trace_method
        return "lanczos-deflated" if self.top_k else "hutch++"

    @property
    def group(self) -> str:
        """Run-file group: ``hessian``/``ggn``, or ``hessian_pyhessian`` for the PyHessian reference engine."""
        return self.kind if self.engine == "landscape" else f"{self.kind}_{self.engine}"


@dataclass(frozen=True)
class CurvatureResult:
    """Results of :func:`analyze_curvature` for the whole selection, plus per-layer ones if asked."""

    settings: CurvatureSettings
    n_parameters: int
    top: Eigenpairs | None
    bottom: Eigenpairs | None
    trace: TraceEstimate | None
    density: SpectralDensity | None
    n_matvec: int
    hvp_mode: str
    dtype: str
    #: bytes the HVP engine held between products (the graph engine's gradient graph; 0 for torch.func's), which
    #: the vectors' budget left out (:meth:`Products.budget_left <landscape.problem.products.Products.budget_left>`)
    hvp_held_bytes: int = 0
    #: ``--hvp auto``'s trial, engine by engine: ``seconds`` a product and ``bytes`` it needed (empty when the engine
    #: was given, or chosen by an earlier analysis of the same run)
    hvp_trials: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    per_layer: Mapping[str, "CurvatureResult"] = field(default_factory=dict)
    validity: ValidityResult | None = None
    per_class: Mapping[str, "CurvatureResult"] = field(default_factory=dict)
    n_samples: int | None = None
    batch_sizes: BatchSizeResult | None = None

    @property
    def vector_storage(self) -> str:
        """Where the long vectors were kept: ``memory``, ``disk`` if any did not fit the memory budget, else
        ``cuda`` if any were on the GPU."""
        parts = [p.storage for p in (self.top, self.bottom, self.trace) if p is not None and hasattr(p, "storage")]
        return next((p for p in ("disk", "cuda") if p in parts), "memory")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.settings.kind, "engine": self.settings.engine,
                               "n_parameters": self.n_parameters,
                               "n_matvec": self.n_matvec}
        if self.top is not None:
            out["eigenvalues"] = self.top.eigenvalues.tolist()
            out["converged"] = self.top.converged.tolist()
        if self.bottom is not None:
            out["bottom_eigenvalues"] = self.bottom.eigenvalues.tolist()
            out["bottom_converged"] = self.bottom.converged.tolist()
        if self.trace is not None:
            out["trace"] = {"estimate": self.trace.estimate, "stderr": self.trace.stderr, "method": self.trace.method}
        if self.density is not None:
            out["negative_mass"] = self.density.negative_mass
        if self.per_layer:
            out["per_layer"] = {k: v.summary() for k, v in self.per_layer.items()}
        if self.validity is not None:
            out["validity"] = self.validity.summary()
        if self.n_samples is not None:
            out["n_samples"] = self.n_samples
        if self.density is not None and self.density.nodes.shape[0] > 1:
            out["negative_mass_stderr"] = self.density.negative_mass_stderr
        if self.per_class:
            out["per_class"] = {k: v.summary() for k, v in self.per_class.items()}
        if self.batch_sizes is not None:
            out["batch_sizes"] = self.batch_sizes.summary()
        return out

    def write(self, parent: h5py.Group, name: str | None = None,
              eigenvector_params: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None) -> h5py.Group:
        """Write under ``parent[name]`` (default :attr:`CurvatureSettings.group`), replacing what was there."""
        name = name or self.settings.group
        if name in parent:
            del parent[name]
        g = parent.create_group(name)
        s = self.settings
        for k, v in {"kind": s.kind, "n_parameters": self.n_parameters, "n_hvp": self.n_matvec, "tol": s.tol,
                     "max_hvp": s.max_hvp,
                     "trace_method": self.trace.method if self.trace is not None else s.trace_method,
                     "trace_stderr_target": s.trace_stderr if s.trace_stderr is not None else float("nan"),
                     "seed": s.seed, "parameters": list(s.parameters), "hvp_mode": self.hvp_mode, "engine": s.engine,
                     "hvp_held_bytes": self.hvp_held_bytes, "hvp_trials": dict(self.hvp_trials), "dtype": self.dtype,
                     "vector_storage": self.vector_storage,
                     "settings": asdict(s), "summary": self.summary()}.items():
            g.attrs[k] = encode_attr(v)
        if self.top is not None:
            _write_pairs(g, self.top, "", "top")
            g.attrs["lanczos_basis"] = self.top.basis
            if eigenvector_params is not None:
                for i in range(self.top.eigenvectors.shape[1]):
                    vg = g.create_group(f"eigenvectors/{i}")
                    for pname, arr in eigenvector_params(self.top.eigenvectors[:, i]).items():
                        vg.create_dataset(link_name(pname), data=arr)
        if self.bottom is not None:
            _write_pairs(g, self.bottom, "bottom_", "bottom")
        if self.trace is not None:
            t = g.create_group("trace")
            t.attrs.update({"estimate": self.trace.estimate, "stderr": self.trace.stderr,
                            "n_matvec": self.trace.n_matvec, "method": self.trace.method,
                            "vector_dtype": self.trace.vector_dtype})
            if s.engine == "pyhessian":
                t.attrs["tol"] = PYHESSIAN_TRACE_TOL
            t.create_dataset("samples", data=self.trace.samples)
        if self.density is not None:
            self.density.write(g.create_group("density"))
        for layer, res in self.per_layer.items():
            res.write(g.require_group("per_layer"), link_name(layer))
        if self.validity is not None:
            self.validity.write(g)
        if self.n_samples is not None:
            g.attrs["n_samples"] = self.n_samples
        for cls, res in self.per_class.items():
            res.write(g.require_group("per_class"), cls)
        if self.batch_sizes is not None:
            self.batch_sizes.write(g)
        return g


def _write_pairs(g: h5py.Group, pairs: Eigenpairs, prefix: str, which: str) -> None:
    """``pairs``' eigenvalues, residuals, convergence flags and residual noise (when measured) as datasets named with
    ``prefix``, and their product count as the attribute ``n_hvp_<which>``."""
    for key, data in (("eigenvalues", pairs.eigenvalues), ("residuals", pairs.residuals),
                      ("converged", pairs.converged), ("residual_noise", pairs.noise)):
        if data is not None:
            g.create_dataset(prefix + key, data=data)
    g.attrs[f"n_hvp_{which}"] = pairs.n_matvec


def stored_summary(group: h5py.Group, settings: CurvatureSettings, *, eigenvectors: bool = False
                   ) -> dict[str, Any] | None:
    """The :meth:`CurvatureResult.summary` of ``group`` when it holds a result for exactly ``settings`` (and its
    eigenvectors, if asked for), so that a resumed scan does not compute it again; else None."""
    stored = read_attrs(group)
    if stored.get("settings") != decode_attr(encode_attr(asdict(settings))) or "summary" not in stored:
        return None
    if eigenvectors and settings.top_k and "eigenvectors" not in group:
        return None
    return stored["summary"]


def with_ends(settings: CurvatureSettings) -> CurvatureSettings:
    """``settings`` as :func:`analyze_curvature` runs them: ``--validity`` also measures along the bottom
    eigenvector, and ``--batch-sizes`` compares both ends with the full data's, so they compute them."""
    if (settings.validity or settings.batch_sizes) and settings.engine == "landscape":
        return replace(settings, bottom_k=max(1, settings.bottom_k),
                       top_k=max(1 if settings.batch_sizes else 0, settings.top_k))
    return settings


def layer_settings(settings: CurvatureSettings, name: str) -> CurvatureSettings:
    """What ``--per-layer`` computes for the parameter ``name``: its top eigenvalue and (as asked) trace."""
    return replace(settings, parameters=(name,), per_layer=False, bottom_k=0, density=False, top_k=1, validity=False,
                   batch_sizes=())


def class_settings(settings: CurvatureSettings) -> CurvatureSettings:
    """What ``--per-class`` computes on each class's samples: the top-k and bottom-k (``bottom_k`` or else
    ``top_k``) eigenvalues and the SLQ density (at least 3 probes, for the negative mass's standard error)."""
    return replace(settings, per_class=False, per_layer=False, validity=False, batch_sizes=(), trace=False,
                   density=True, bottom_k=settings.bottom_k or settings.top_k,
                   density_probes=max(3, settings.density_probes))


def analyze_curvature(problem: Problem, settings: CurvatureSettings = CurvatureSettings(),
                      progress: Callable[[str], None] | None = None) -> CurvatureResult:
    """Top/bottom eigenpairs, trace and density of the Hessian (or GGN) over the selected parameters."""
    settings = with_ends(settings)
    params = list(settings.parameters) or None
    result = _analyze(problem, settings, params, progress)
    if settings.per_class:
        result = replace(result, per_class=_per_class(problem, settings, progress))
    if settings.batch_sizes:
        assert result.top is not None and result.bottom is not None
        result = replace(result, batch_sizes=analyze_batch_sizes(
            problem, settings.batch_sizes, draws=settings.batch_draws, full_top=float(result.top.eigenvalues[0]),
            full_bottom=float(result.bottom.eigenvalues[0]), tol=settings.tol, max_hvp=settings.max_hvp,
            seed=settings.seed, parameters=params, kind=settings.kind,
            progress=(lambda msg: progress(f"{settings.kind}: {msg}")) if progress else None))
    if not settings.per_layer:
        return result
    layers = {}
    for pname in select_parameters(problem.names, settings.parameters or None):
        layers[pname] = _analyze(problem, layer_settings(settings, pname), [pname], progress)
    return CurvatureResult(**{**result.__dict__, "per_layer": layers})


def class_members(problem: Problem) -> list[tuple[int, np.ndarray]]:
    """``(class, sample indices)`` for every class present, the most frequent first (ties: lower class first)."""
    if not problem.classification or problem.y.ndim != 1 or problem.y.is_floating_point():
        raise LandscapeError("--per-class needs one integer class label per sample",
                             hint="per-class curvature is for classifiers; drop --per-class")
    y = problem.y.cpu().numpy()
    classes, counts = np.unique(y, return_counts=True)
    order = sorted(range(len(classes)), key=lambda i: (-counts[i], classes[i]))
    return [(int(classes[i]), np.flatnonzero(y == classes[i])) for i in order]


def _per_class(problem: Problem, settings: CurvatureSettings, progress: Callable[[str], None] | None
               ) -> dict[str, CurvatureResult]:
    """For each class, the curvature of the loss restricted to its samples (:func:`class_settings`)."""
    sub = class_settings(settings)
    out = {}
    for cls, idx in class_members(problem):
        note = (lambda msg, c=cls, m=len(idx): progress(f"class {c} ({m} samples): {msg}")) if progress else None
        res = _analyze(problem.subset(idx), sub, list(settings.parameters) or None, note)
        out[str(cls)] = replace(res, n_samples=len(idx))
    return out


def _analyze(problem: Problem, s: CurvatureSettings, params: list[str] | None,
             progress: Callable[[str], None] | None) -> CurvatureResult:
    op = CurvatureOperator(problem, kind=s.kind, parameters=params)
    label = ", ".join(params) if params else "all parameters"

    def note(msg: str) -> None:
        if progress:
            progress(f"{s.kind} ({label}): {msg}")

    if s.engine == "pyhessian":
        note("PyHessian top eigenvalues and trace")
        top, trace, n_hvp = pyhessian_spectrum(problem, top_k=s.top_k, tol=s.tol, max_iter=s.max_hvp, trace=s.trace,
                                               trace_max_iter=s.trace_matvecs, parameters=params, seed=s.seed)
        return CurvatureResult(settings=s, n_parameters=op.n, top=top, bottom=None, trace=trace, density=None,
                               n_matvec=n_hvp, hvp_mode="pyhessian", dtype=str(problem.dtype).replace("torch.", ""))
    top = bottom = None
    budget = op.budget()  # the budget less the graph the HVP engine keeps, if it keeps one

    trace = None
    method = s.trace_estimator if s.trace else None
    if s.top_k:
        note(f"top-{s.top_k} eigenvalues")
        top = lanczos(op, op.n, k=s.top_k, which="LA", tol=s.tol, seed=s.seed, max_matvec=s.max_hvp, budget=budget,
                      device=basis_device(problem.device, s.top_k, op.n), keep_basis=method == "lanczos-deflated")
        if top.krylov is not None:  # the trace outside the basis now, before another basis is made
            note("trace")
            try:
                held = 0 if isinstance(top.eigenvectors, np.memmap) else top.eigenvectors.nbytes
                trace = basis_deflated(op, top.krylov, probes=max(1, s.trace_matvecs // 3), seed=s.seed,
                                       stderr_target=s.trace_stderr, budget=budget - held)  # beside the eigenvectors
            finally:
                top.krylov.close()
            top = replace(top, krylov=None)
    if s.bottom_k:
        note(f"bottom-{s.bottom_k} eigenvalues")
        bottom = lanczos(op, op.n, k=s.bottom_k, which="SA", tol=s.tol, seed=s.seed + 1, max_matvec=s.max_hvp,
                         budget=budget, device=basis_device(problem.device, s.bottom_k, op.n))
    if method == "hutch++":
        note("trace")
        trace = hutchpp(op, op.n, max_matvec=s.trace_matvecs, seed=s.seed, budget=budget, stderr_target=s.trace_stderr,
                        device=vector_device(problem.device, op.n, max(1, s.trace_matvecs // 3)),
                        dtype=sketch_dtype(problem.dtype))
    elif method in ("hutchinson", "hutchinson-deflated"):
        note("trace")
        deflate = (top.eigenvalues, top.eigenvectors) if (method == "hutchinson-deflated" and top) else None
        trace = hutchinson(op, op.n, max_matvec=s.trace_matvecs, stderr_target=s.trace_stderr, seed=s.seed,
                           deflate=deflate)
    density = None
    if s.density:
        note("spectral density")
        density = slq(op, op.n, n_probes=s.density_probes, steps=s.density_steps, seed=s.seed, budget=budget,
                      device=vector_device(problem.device, op.n, s.density_steps))
    validity = None
    if s.validity:
        note("validity radius of the quadratic model")
        validity = analyze_validity(problem, _validity_directions(problem, op, s, params, top, bottom))
    return CurvatureResult(settings=s, n_parameters=op.n, top=top, bottom=bottom, trace=trace, density=density,
                           n_matvec=op.n_matvec, hvp_mode=problem.hvp_engine,
                           hvp_held_bytes=problem.products.held_bytes, dtype=str(problem.dtype).replace("torch.", ""),
                           hvp_trials=problem.products.trials(), validity=validity)


def _validity_directions(problem: Problem, op: CurvatureOperator, s: CurvatureSettings, params: list[str] | None,
                         top: Eigenpairs | None, bottom: Eigenpairs | None) -> list[tuple[str, dict[str, Any]]]:
    """The named directions ``--validity`` probes: each top eigenvector, the bottom one, and ``validity_random``
    random filter-normalized directions over the selected parameters."""
    dirs = [(f"top-{i + 1}", op.to_params(top.eigenvectors[:, i])) for i in range(top.eigenvectors.shape[1])] \
        if top is not None else []
    if bottom is not None:
        dirs.append(("bottom-1", op.to_params(bottom.eigenvectors[:, 0])))
    rand = random_directions({n: problem.theta0[n] for n in select_parameters(problem.names, params)},
                             s.validity_random, seed=s.seed) if s.validity_random else []
    return dirs + [(f"random-{j + 1}", _full(problem, d)) for j, d in enumerate(rand)]  # eigenvectors are full


def _full(problem: Problem, d: Mapping[str, Any]) -> dict[str, Any]:
    """A direction over every parameter: zeros where ``d`` has none."""
    return {n: d[n] if n in d else torch.zeros_like(t) for n, t in problem.theta0.items()}
