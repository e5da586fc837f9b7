"""What a report shows, read from the run file alone.

The renderers (:mod:`.figures`, :mod:`.interactive`) never see the model or the data: they get a
:class:`RunContents`, read here from a run file (``docs/schema.md``), so a report can be re-drawn on
a machine that holds nothing but ``run.h5``. Large per-parameter arrays (directions, eigenvectors,
per-parameter GSNR) are not read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from ..io.runfile import decode_attr, from_link, open_run_file, read_attrs

#: Curvature groups a report knows, in the order it shows them, with their titles.
CURVATURE_GROUPS = {"hessian": "Hessian", "ggn": "Gauss-Newton", "hessian_pyhessian": "Hessian (PyHessian)"}
#: Per-point arrays of a slice that are not values.
_SLICE_AXES = ("x", "y", "done", "directions")


@dataclass(frozen=True)
class SliceData:
    """One slice: coordinates, every value array (loss, accuracy, metrics), the ``done`` mask."""

    name: str
    attrs: Mapping[str, Any]
    x: np.ndarray
    y: np.ndarray | None
    values: Mapping[str, np.ndarray]
    done: np.ndarray

    @property
    def kind(self) -> str:
        return str(self.attrs.get("kind", ""))

    @property
    def dims(self) -> int:
        return 1 if self.y is None else 2

    def masked(self, key: str) -> np.ndarray:
        """Values of ``key`` with every point not computed or not finite as NaN (drawn as a gap)."""
        v = np.array(self.values[key], dtype=np.float64)
        v[~self.done | ~np.isfinite(v)] = np.nan
        return v

    @property
    def n_missing(self) -> int:
        """Points drawn as gaps: not computed yet, or NaN/Inf."""
        return int(np.sum(~self.done | ~np.isfinite(self.values["loss"])))


@dataclass(frozen=True)
class CurvatureData:
    """A ``/hessian``, ``/ggn`` or ``/hessian_pyhessian`` group (``per_layer`` holds the same per tensor)."""

    name: str
    attrs: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    trace: Mapping[str, Any] | None
    density: Mapping[str, Any] | None
    per_layer: Mapping[str, "CurvatureData"] = field(default_factory=dict)
    validity: Mapping[str, Any] | None = None
    per_class: Mapping[str, "CurvatureData"] = field(default_factory=dict)
    batch_sizes: Mapping[str, Any] | None = None

    @property
    def title(self) -> str:
        return CURVATURE_GROUPS.get(self.name, self.name)


@dataclass(frozen=True)
class SharpnessData:
    """One ``/sharpness/<group>``: the ρ sweep with values, standard errors and settings."""

    name: str
    attrs: Mapping[str, Any]
    rho: np.ndarray
    value: np.ndarray
    stderr: np.ndarray
    quadratic: np.ndarray | None


@dataclass(frozen=True)
class CoherenceData:
    """``/coherence`` (or its ``control``): scalar attributes and per-class / per-sample arrays."""

    attrs: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray]
    control: "CoherenceData | None" = None


@dataclass(frozen=True)
class PathData:
    """A path between two models (``/compare/interpolation/<i>_<j>`` or ``/compare/bezier/<i>_<j>``)."""

    key: str
    pair: tuple[str, str]
    alpha: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    attrs: Mapping[str, Any]
    unaligned: "PathData | None" = None


@dataclass(frozen=True)
class CompareData:
    """``/compare``: model names, metrics (value, stderr, rank per model), each model's slice, paths."""

    models: tuple[str, ...]
    metrics: Mapping[str, Mapping[str, np.ndarray]]
    slices: tuple[SliceData, ...]
    interpolation: tuple[PathData, ...]
    bezier: tuple[PathData, ...]
    #: per metric, how it ranks: ``lower first`` or ``higher first`` (files before this attribute: lower first)
    orders: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrajectoryData:
    """``/trajectory``: per-checkpoint arrays, per-tensor weight norms, the PCA path and the loss in its plane (a
    training monitor's file has no plane: ``plane`` None), and a monitor's further measures among the arrays."""

    arrays: Mapping[str, np.ndarray]
    weight_norms: Mapping[str, np.ndarray]
    coords: np.ndarray | None
    explained_variance: np.ndarray | None
    plane: SliceData | None
    attrs: Mapping[str, Any]

    @property
    def measures(self) -> dict[str, np.ndarray]:
        """A monitor's series besides sharpness and distances (``loss``, ``grad_norm``, ``trace``, ...)."""
        return {k: self.arrays[k] for k in MONITOR_SERIES if k in self.arrays}


#: Checks of a trajectory listed in the summary table (a long monitored run shows every k-th and the last).
MAX_TRAJECTORY_ROWS = 24
#: The series of a training monitor's ``/trajectory`` drawn against the step (landscape.analyses.monitor.COLUMNS).
MONITOR_SERIES = ("loss", "heldout_loss", "grad_norm", "trace", "gsnr_mean", "m_coherence", "b_noise", "b_simple")


@dataclass(frozen=True)
class RunContents:
    """Everything a report draws, read from one run file (or comparison file)."""

    path: Path
    attrs: Mapping[str, Any]
    slices: tuple[SliceData, ...]
    curvature: tuple[CurvatureData, ...]
    sharpness: tuple[SharpnessData, ...]
    coherence: CoherenceData | None
    compare: CompareData | None = None
    trajectory: TrajectoryData | None = None

    @property
    def title(self) -> str:
        if self.trajectory is not None and self.attrs.get("source") == "monitor":
            return f"training of {self.attrs.get('model_class', 'a model')} ({self.path.name})"
        if self.trajectory is not None:
            return "trajectory to " + Path(str(self.attrs.get("checkpoint_path", self.path))).name
        if self.compare is not None:
            return "comparison of " + ", ".join(self.compare.models)
        ck = self.attrs.get("checkpoint_path") or self.attrs.get("imported_from") or str(self.path)
        return Path(str(ck)).name

    @classmethod
    def read(cls, path: str | Path) -> "RunContents":
        """Read a run file; a missing, unreadable or foreign file is a :class:`LandscapeError`."""
        path = Path(path)
        with open_run_file(path) as f:
            slices = tuple(_read_slice(n, g) for n, g in f["slices"].items()) if "slices" in f else ()
            curv = tuple(_read_curvature(n, f[n]) for n in CURVATURE_GROUPS if n in f)
            sharp = tuple(_read_sharpness(n, g) for n, g in f["sharpness"].items()) if "sharpness" in f else ()
            coh = _read_coherence(f["coherence"]) if "coherence" in f else None
            cmp = _read_compare(f["compare"]) if "compare" in f else None
            traj = _read_trajectory(f["trajectory"]) if "trajectory" in f else None
            return cls(path=path, attrs=read_attrs(f), slices=slices, curvature=curv, sharpness=sharp,
                       coherence=coh, compare=cmp, trajectory=traj)


def _arrays(g: h5py.Group, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    return {k: v[()] for k, v in g.items() if isinstance(v, h5py.Dataset) and k not in skip}


def _read_slice(name: str, g: h5py.Group) -> SliceData:
    return SliceData(name=name, attrs=read_attrs(g), x=g["x"][()], y=g["y"][()] if "y" in g else None,
                     values=_arrays(g, _SLICE_AXES), done=g["done"][()].astype(bool))


def _read_curvature(name: str, g: h5py.Group) -> CurvatureData:
    trace = density = None
    if "trace" in g:
        trace = {**read_attrs(g["trace"]), **_arrays(g["trace"])}
    if "density" in g:
        density = {**read_attrs(g["density"]), **_arrays(g["density"])}
    layers = {from_link(k): _read_curvature(from_link(k), v) for k, v in g["per_layer"].items()} \
        if "per_layer" in g else {}
    validity = {**read_attrs(g["validity"]), **_arrays(g["validity"])} if "validity" in g else None
    classes = sorted(g["per_class"].items(), key=lambda kv: (-int(kv[1].attrs.get("n_samples", 0)), int(kv[0]))) \
        if "per_class" in g else []  # the most frequent class first
    batches = {**read_attrs(g["batch_sizes"]), **_arrays(g["batch_sizes"])} if "batch_sizes" in g else None
    return CurvatureData(name=name, attrs=read_attrs(g), arrays=_arrays(g), trace=trace, density=density,
                         per_layer=layers, validity=validity, per_class={k: _read_curvature(k, v) for k, v in classes},
                         batch_sizes=batches)


def _read_sharpness(name: str, g: h5py.Group) -> SharpnessData:
    return SharpnessData(name=name, attrs=read_attrs(g), rho=g["rho"][()], value=g["value"][()],
                         stderr=g["stderr"][()], quadratic=g["quadratic"][()] if "quadratic" in g else None)


def _read_coherence(g: h5py.Group) -> CoherenceData:
    return CoherenceData(attrs=read_attrs(g), arrays=_arrays(g),
                         control=_read_coherence(g["control"]) if "control" in g else None)


def _strings(ds: h5py.Dataset) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in ds[()])


def _read_path(key: str, g: h5py.Group, models: tuple[str, ...]) -> PathData:
    i, j = (int(k) for k in key.split("_"))
    return PathData(key=key, pair=(models[i], models[j]), alpha=g["alpha"][()], loss=g["loss"][()],
                    accuracy=g["accuracy"][()] if "accuracy" in g else None, attrs=read_attrs(g),
                    unaligned=_read_path(key, g["unaligned"], models) if "unaligned" in g else None)


def _read_compare(g: h5py.Group) -> CompareData:
    models = _strings(g["models/name"])
    metrics = {k: _arrays(m) for k, m in g["metrics"].items()} if "metrics" in g else {}
    slices = tuple(SliceData(name=str(decode_attr(sg.attrs.get("name", k))), attrs={"kind": "random", "norm": "filter"},
                             x=sg["x"][()], y=sg["y"][()] if "y" in sg else None, values={"loss": sg["loss"][()]},
                             done=sg["done"][()].astype(bool))
                   for k, sg in (sorted(g["slices"].items(), key=lambda kv: int(kv[0])) if "slices" in g else []))
    paths = {kind: tuple(_read_path(k, pg, models) for k, pg in g[kind].items()) if kind in g else ()
             for kind in ("interpolation", "bezier")}
    orders = {k: str(decode_attr(m.attrs.get("order", "lower first"))) for k, m in g["metrics"].items()
              } if "metrics" in g else {}
    return CompareData(models=models, metrics=metrics, slices=slices, interpolation=paths["interpolation"],
                       bezier=paths["bezier"], orders=orders)


def _read_trajectory(g: h5py.Group) -> TrajectoryData:
    arrays = _arrays(g)
    for k in ("checkpoint", "sharpness_kind"):
        arrays[k] = np.array(_strings(g[k]))
    plane = None
    if "plane" in g:
        pl = g["plane"]
        plane = SliceData(name="PCA plane", attrs={"kind": "pca"}, x=pl["x"][()], y=pl["y"][()],
                          values={k: v[()] for k, v in pl.items() if k not in ("x", "y")},
                          done=np.ones(pl["loss"].shape, dtype=bool))
    pca = g.get("pca")
    return TrajectoryData(arrays=arrays, weight_norms={from_link(k): v for k, v in _arrays(g["weight_norms"]).items()},
                          coords=pca["coords"][()] if pca is not None else None,
                          explained_variance=pca["explained_variance"][()] if pca is not None else None,
                          plane=plane, attrs=read_attrs(g))


@dataclass(frozen=True)
class Row:
    """One scalar result of the summary table: ``value ± stderr`` (``stderr`` NaN: none)."""

    section: str
    name: str
    value: float
    stderr: float = math.nan
    note: str = ""


_COHERENCE_SCALARS = ("m_coherence", "alpha", "gradient_diversity", "gradient_norm", "trace_sigma", "b_simple",
                      "b_noise", "gsnr_mean", "gsnr_median")


def summary_rows(run: RunContents) -> list[Row]:
    """Every scalar result of the run, with its standard error where the file holds one.

    Length: one flat list of rows, section by section in the order the table shows them (slices, curvature,
    sharpness, coherence, comparison, trajectory); the larger sections are helpers already."""
    rows: list[Row] = []
    for s in run.slices:
        a = s.attrs
        sec = f"slice {s.name}"
        total = s.done.size
        note = f"{int(s.done.sum())}/{total} points computed" if not s.done.all() else f"{total} points"
        for k in ("loss_at_origin", "loss_min", "loss_max"):
            if k in a and math.isfinite(float(a[k])):
                rows.append(Row(sec, k, float(a[k]), note=note if k == "loss_at_origin" else ""))
        origin = _origin(s)
        if "accuracy" in s.values and origin is not None:
            acc = s.masked("accuracy")[origin]
            if math.isfinite(acc):
                rows.append(Row(sec, "accuracy_at_origin", float(acc)))
        rows.append(Row(sec, "gaps (not computed or NaN/Inf)", float(s.n_missing), note=note))
    for c in run.curvature:
        rows += _curvature_rows(c, c.title)
        for layer, lc in c.per_layer.items():
            rows += _curvature_rows(lc, f"{c.title}, {layer}")
    for sh in run.sharpness:
        meaning = sh.attrs.get("rho_meaning", "rho")
        for r, v, e in zip(sh.rho, sh.value, sh.stderr):
            rows.append(Row(f"sharpness {sh.name}", f"rho = {r:g}", float(v), float(e),
                            note=f"rho: {meaning}; m = {sh.attrs.get('m')}"))
    if run.compare is not None:
        for p in run.compare.interpolation:
            sec = f"{p.pair[0]} - {p.pair[1]}"
            for k in ("loss_barrier", "error_barrier", "loss_barrier_unaligned", "error_barrier_unaligned"):
                if k in p.attrs:
                    rows.append(Row(sec, k, float(p.attrs[k]),
                                    note="after weight matching" if p.attrs.get("aligned") and "unaligned" not in k
                                    else ""))
        for p in run.compare.bezier:
            rows.append(Row(f"{p.pair[0]} - {p.pair[1]}", "Bezier max loss", float(p.attrs["max_loss"])))
    if run.trajectory is not None:
        a = run.trajectory.arrays
        count = len(a["step"])
        stride = -(-count // MAX_TRAJECTORY_ROWS)  # a long monitored run: every stride-th check and the last
        shown = sorted({*range(0, count, stride), count - 1}) if count else []
        for i in shown if "sharpness" in a else ():
            kind = "preconditioned sharpness" if a["sharpness_kind"][i] == "preconditioned" else "lambda_max"
            name, step = str(a["checkpoint"][i]), int(a["step"][i])
            rows.append(Row(f"trajectory {name}" + ("" if name == f"step {step}" else f" (step {step})"), kind,
                            float(a["sharpness"][i]),
                            note=f"threshold {float(a['threshold'][i]):.4g}, ratio {float(a['ratio'][i]):.3g}"
                                 + (", edge of stability" if a["edge_of_stability"][i] else "")
                                 + (f"; every {stride}th of {count} checks" if stride > 1 and i == 0 else "")))
        for k, v in run.trajectory.measures.items() if count else ():
            err = a.get(f"{k}_stderr")
            rows.append(Row(f"trajectory, last check (step {int(a['step'][-1])})", k, float(v[-1]),
                            float(err[-1]) if err is not None else math.nan))
        if count and "overhead" in a:  # a monitored run: what the monitor cost the training
            skipped = int(run.attrs.get("skipped_checks", 0))
            rows.append(Row(f"trajectory, last check (step {int(a['step'][-1])})", "monitor overhead",
                            float(a["overhead"][-1]), note="of the training's wall time" + (
                                f"; {skipped} due checks skipped for max_overhead {run.attrs.get('max_overhead')}"
                                if skipped else "")))
        ev = run.trajectory.explained_variance
        if ev is not None:
            rows.append(Row("trajectory", "PCA explained variance (2 components)", float(np.sum(ev[:2]))))
    if run.coherence is not None:
        for label, c in (("coherence", run.coherence), ("coherence, shuffled labels", run.coherence.control)):
            if c is None:
                continue
            for k in _COHERENCE_SCALARS:
                if k in c.attrs:
                    err = c.attrs.get("b_noise_stderr", math.nan) if k == "b_noise" else math.nan
                    rows.append(Row(label, k, float(c.attrs[k]), float(err)))
    return rows


def trace_items(curvature: tuple[CurvatureData, ...] | list[CurvatureData]) -> list[tuple[str, Mapping[str, Any]]]:
    """Every trace estimate of the run (each engine, then each layer), with a label."""
    items: list[tuple[str, Mapping[str, Any]]] = []
    for c in curvature:
        if c.trace is not None:
            items.append((f"{c.title} ({c.trace['method']})", c.trace))
        items += [(f"{c.title}: {k}", lc.trace) for k, lc in c.per_layer.items() if lc.trace is not None]
    return items


def _curvature_rows(c: CurvatureData, sec: str) -> list[Row]:
    rows = []
    for prefix, label in (("", "eigenvalue"), ("bottom_", "bottom eigenvalue")):
        vals = c.arrays.get(f"{prefix}eigenvalues")
        if vals is None:
            continue
        res, conv = c.arrays[f"{prefix}residuals"], c.arrays[f"{prefix}converged"]
        for i, (v, r, ok) in enumerate(zip(vals, res, conv)):
            rows.append(Row(sec, f"{label} {i + 1}", float(v),
                            note=f"residual {r:.2g}" + ("" if ok else " (not converged)")))
    if c.trace is not None:
        rows.append(Row(sec, "trace", float(c.trace["estimate"]), float(c.trace["stderr"]),
                        note=f"{c.trace['method']}, {c.trace['n_matvec']} products"))
    if c.density is not None:
        rows.append(Row(sec, "negative spectral mass", float(c.density["negative_mass"])))
    for cls, pc in c.per_class.items():
        head = f"class {cls} ({pc.attrs.get('n_samples', '?')} samples)"
        for prefix, label in (("", "largest eigenvalue"), ("bottom_", "smallest eigenvalue")):
            if f"{prefix}eigenvalues" in pc.arrays:
                ok = bool(pc.arrays[f"{prefix}converged"][0])
                rows.append(Row(sec, f"{head}: {label}", float(pc.arrays[f"{prefix}eigenvalues"][0]),
                                note=f"residual {float(pc.arrays[f'{prefix}residuals'][0]):.2g}"
                                     + ("" if ok else " (not converged)")))
        if pc.density is not None:
            rows.append(Row(sec, f"{head}: negative spectral mass", float(pc.density["negative_mass"]),
                            float(pc.density.get("negative_mass_stderr", math.nan)),
                            note=f"SLQ, {pc.density['nodes'].shape[0]} probes"))
    if c.batch_sizes is not None:
        rows += _batch_size_rows(c.batch_sizes, sec)
    if c.validity is not None:
        v = c.validity
        scale = float(v["theta_norm"]) or 1.0
        unit = "‖θ‖" if float(v["theta_norm"]) else "1"
        levels = [f"{x:.0%}" for x in v["levels"]]
        for label, radius in zip(v["labels"], v["radius"]):
            label = label.decode() if isinstance(label, bytes) else str(label)
            rows.append(Row(sec, f"quadratic model within {levels[0]} up to (along {label})", float(radius[0]) / scale,
                            note=f"distance / {unit}; within {levels[-1]} up to {float(radius[-1]) / scale:.3g}"
                                 + ("; inf: beyond the largest distance tried" if not np.isfinite(radius).all() else "")))
    return rows


def spaced_labels(coords: np.ndarray, x_range: float, y_range: float, min_gap: float = 0.08) -> np.ndarray:
    """Which points of a path get a text label so that no two labels sit closer than ``min_gap`` of the plot's
    width or height: the last point (where the path ends), then the first, then the rest in order, each kept only
    when it is that far from every label kept so far."""
    n = len(coords)
    scaled = np.asarray(coords, dtype=np.float64)[:, :2] / np.array([max(x_range, 1e-300), max(y_range, 1e-300)])
    keep = np.zeros(n, dtype=bool)
    for i in ([n - 1, 0] + list(range(1, n - 1))) if n else []:
        kept = scaled[keep]
        if not len(kept) or np.abs(kept - scaled[i]).max(axis=1).min() >= min_gap:
            keep[i] = True
    return keep


def batch_size_stats(b: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over the draws of ``top`` or ``bottom`` at each batch size."""
    vals = np.asarray(b[key], dtype=np.float64)
    return vals.mean(axis=1), vals.std(axis=1, ddof=1) / math.sqrt(vals.shape[1])


def batch_size_series(b: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the batch-size plots draw, per end of the spectrum: sizes, ``|mean|`` with its standard error, the
    full data's ``|λ|`` and the fitted ``|λ_full + c/b|`` on a fine grid of sizes (``log``: all of it positive, so a
    log axis shows it)."""
    out = []
    sizes = np.asarray(b["sizes"], dtype=np.float64)
    fine = np.geomspace(sizes.min(), sizes.max(), 100) if len(sizes) > 1 else sizes
    for key, label in (("top", "λmax"), ("bottom", "−λmin")):
        sign = 1.0 if key == "top" else -1.0
        mean, se = batch_size_stats(b, key)
        full = float(b[f"full_{key}"])
        fit = sign * (full + float(b[f"fit_{key}_c"]) / fine)
        y = sign * mean
        out.append({"label": label, "sizes": sizes, "mean": y, "stderr": se, "full": sign * full, "fit_sizes": fine,
                    "fit": fit, "log": bool((y > 0).all() and sign * full > 0 and (fit > 0).all())})
    return out


def _batch_size_rows(b: Mapping[str, Any], sec: str) -> list[Row]:
    rows = []
    for key, label in (("top", "λmax"), ("bottom", "λmin")):
        mean, se = batch_size_stats(b, key)
        for size, m, e in zip(b["sizes"], mean, se):
            rows.append(Row(sec, f"{label} of batches of {int(size)}", float(m), float(e),
                            note=f"{int(b['draws'])} draws; full data {float(b[f'full_{key}']):.4g}"))
        rows.append(Row(sec, f"{label}: c in λ_b ≈ λ_full + c/b", float(b[f"fit_{key}_c"]),
                        float(b[f"fit_{key}_c_stderr"]),
                        note=f"RMS residual {float(b[f'fit_{key}_rms']):.2g} of |λ_full|; free fit's intercept "
                             f"{float(b[f'fit_{key}_intercept']):.4g}"))
    return rows


def _origin(s: SliceData) -> tuple[int, ...] | None:
    """Grid index of the checkpoint (all coefficients 0), if it is a grid point."""
    idx = []
    for ax in (s.x,) if s.y is None else (s.x, s.y):
        hits = np.flatnonzero(np.isclose(ax, 0.0, atol=1e-12))
        if hits.size == 0:
            return None
        idx.append(int(hits[0]))
    return tuple(idx)


def provenance(run: RunContents) -> list[tuple[str, str]]:
    """Where the results come from: checkpoint, data, seed, versions and settings, as text pairs."""
    a = run.attrs
    keys = ("checkpoint_path", "checkpoint_sha256", "checkpoint_format", "step", "optimizer", "model_spec",
            "data_spec", "loss", "metrics", "n_samples", "n_source_samples", "max_samples", "data_sha256", "seed",
            "n_parameters", "dtype", "device", "bn", "batch_size", "tool_version", "torch_version",
            "numpy_version", "h5py_version", "python_version", "platform", "command", "created", "completed",
            "imported_from", "source_format")
    out = [(k, _text(a[k])) for k in keys if k in a]
    out += [(k, _text(v)) for k, v in a.items() if k not in keys and k != "schema"]
    return out


def settings(attrs: Mapping[str, Any]) -> str:
    """A group's attributes as one ``key=value`` line (its settings and cost)."""
    return ", ".join(f"{k}={_text(v)}" for k, v in sorted(attrs.items()))


def _text(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
