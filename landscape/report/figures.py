"""Static figures (matplotlib), each drawn from a :class:`~.contents.RunContents` alone.

Every function returns a :class:`matplotlib.figure.Figure` (no pyplot, so no global state and no
display needed). Missing points (not computed, NaN or Inf) are drawn as gaps, never as zeros: grids
go to matplotlib as masked arrays and curves as NaN. Text that comes from the run file (slice, metric,
parameter and checkpoint names) is escaped so matplotlib never reads it as mathtext.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from ..io.runfile import replace_atomically
from .contents import (CoherenceData, CompareData, CurvatureData, RunContents, SharpnessData, SliceData,
                       TrajectoryData, batch_size_series, spaced_labels, trace_items)

#: Contour level spacing: ``log`` (geometric), ``linear``, or ``auto`` (log when the finite values are
#: positive and span more than two decades).
LEVELS = ("auto", "log", "linear")
#: What the value of each sharpness measure is, for its axis label.
SHARPNESS_UNITS = {"worst-case": "loss increase", "average-case": "loss increase", "sam": "loss increase",
                   "asam": "loss increase", "first-order": "loss increase (first order)",
                   "keskar": "100 (max L - L) / (1 + L)", "pacbayes": "1 / σ′²", "basin-width": "distance"}
N_LEVELS = 30


def text(s: object) -> str:
    """A run-file string as plain matplotlib text (``$`` would start mathtext)."""
    return str(s).replace("$", r"\$")


def use_log(values: np.ndarray, levels: str) -> bool:
    """Whether to space contour levels (and the colour scale) geometrically."""
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {LEVELS}, not {levels!r}")
    finite = values[np.isfinite(values)]
    if levels == "linear" or finite.size == 0 or finite.min() <= 0:
        return False
    return levels == "log" or finite.max() / finite.min() > 100.0


def _norm_levels(v: np.ndarray, log: bool) -> tuple[Normalize, np.ndarray]:
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    if log:
        return LogNorm(lo, hi), np.geomspace(lo, hi, N_LEVELS)
    return Normalize(lo, hi), np.linspace(lo, hi, N_LEVELS)


def _log_ticks(cb, lo: float, hi: float) -> None:  # noqa: ANN001 (matplotlib Colorbar)
    """Readable ticks on a log colour bar: the decades inside [lo, hi], or five geometric steps."""
    decades = [10.0 ** k for k in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    ticks = decades if len(decades) >= 2 else list(np.geomspace(lo, hi, 5))
    cb.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
    cb.minorticks_off()


def axis_labels(s: SliceData) -> tuple[str, str]:
    """Axis titles of a slice: what its coefficients multiply."""
    kind = s.kind
    if kind == "interpolation":
        return "alpha (0: this checkpoint, 1: the other)", ""
    if kind.startswith("hessian"):
        second = "bottom Hessian eigenvector" if kind == "hessian-bottom" else "2nd Hessian eigenvector"
        return "coefficient along the top Hessian eigenvector (unit)", f"coefficient along the {second} (unit)"
    norm = s.attrs.get("norm", "none")
    what = f"{norm}-normalized" if norm not in ("none", "", None) else "unnormalized"
    return f"coefficient along direction 1 ({what})", f"coefficient along direction 2 ({what})"


def _title(run: RunContents, s: SliceData, what: str) -> str:
    gaps = s.n_missing
    extra = f"\n{gaps} of {s.done.size} points are gaps (not computed, NaN or Inf)" if gaps else ""
    return text(f"{run.title}: {what}, slice {s.name}{extra}")


def _mark_checkpoint(ax, s: SliceData) -> None:  # noqa: ANN001 (matplotlib Axes)
    ax.plot([0.0], [0.0], marker="*", ms=14, color="crimson", mec="white", mew=1.0, ls="none", label="checkpoint")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.8)


def contour_figure(run: RunContents, s: SliceData, key: str = "loss", *, levels: str = "auto",
                   filled: bool = False) -> Figure:
    """2D contour lines (or filled contours) of ``key`` with a colour bar and the checkpoint marked."""
    v = s.masked(key)
    log = use_log(v, levels)
    norm, lv = _norm_levels(v, log)
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.add_subplot()
    X, Y = np.meshgrid(s.x, s.y, indexing="ij")
    z = np.ma.masked_invalid(v)
    if np.ma.count(z) >= 4 and np.ptp(z.compressed()) > 0:
        cs = (ax.contourf if filled else ax.contour)(X, Y, z, levels=lv, norm=norm, cmap="viridis",
                                                     **({} if filled else {"linewidths": 0.9}))
        cb = fig.colorbar(cs, ax=ax, label=text(key) + (" (log-spaced levels)" if log else ""))
        if log:
            _log_ticks(cb, float(lv[0]), float(lv[-1]))
    if filled and np.ma.count_masked(z):
        ax.set_facecolor("0.85")  # gaps show as grey, not as the bottom of the colour scale
    xl, yl = axis_labels(s)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_aspect("auto")
    _mark_checkpoint(ax, s)
    ax.set_title(_title(run, s, f"{key} {'filled contours' if filled else 'contours'}"), fontsize="medium")
    return fig


def surface_figure(run: RunContents, s: SliceData, key: str = "loss", *, levels: str = "auto") -> Figure:
    """3D surface of ``key`` (log10 of it when the levels are log-spaced); gaps are left open."""
    v = s.masked(key)
    log = use_log(v, levels)
    z = np.log10(v) if log else v
    fig = Figure(figsize=(7.0, 5.6), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    finite = z[np.isfinite(z)]
    if finite.size:
        surf = _surface(ax, s.x, s.y, z, Normalize(finite.min(), finite.max() if np.ptp(finite) else finite.min() + 1))
        fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.1, label=f"log10 {text(key)}" if log else text(key))
    ax.set_xlabel("direction 1", fontsize="small")
    ax.set_ylabel("direction 2", fontsize="small")
    ax.set_zlabel(f"log10 {text(key)}" if log else text(key))
    ax.set_title(_title(run, s, f"{key} surface"), fontsize="medium")
    return fig


def _surface(ax, x: np.ndarray, y: np.ndarray, z: np.ndarray, norm: Normalize):  # noqa: ANN001, ANN202
    """One coloured quad per grid cell whose four corners are finite; other cells stay open.

    (``plot_surface`` drops the whole surface when one value is NaN.)
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    X, Y = np.meshgrid(x, y, indexing="ij")
    pts = np.stack([X, Y, z], axis=-1)
    quads = np.stack([pts[:-1, :-1], pts[1:, :-1], pts[1:, 1:], pts[:-1, 1:]], axis=2).reshape(-1, 4, 3)
    keep = np.isfinite(quads[..., 2]).all(axis=1)
    quads = quads[keep]
    coll = Poly3DCollection(quads, cmap="viridis", norm=norm, linewidths=0, antialiased=False)
    coll.set_array(quads[..., 2].mean(axis=1))
    ax.add_collection3d(coll)
    ax.set_xlim(x.min(), x.max())
    ax.set_ylim(y.min(), y.max())
    ax.set_zlim(norm.vmin, norm.vmax)
    return coll


def curve_figure(run: RunContents, s: SliceData, *, levels: str = "auto") -> Figure:
    """1D slice: loss (log axis when it spans decades), accuracy on a twin axis, extra metrics below."""
    extra = [k for k in s.values if k not in ("loss", "accuracy")]
    fig = Figure(figsize=(7.0, 4.2 + 2.2 * len(extra)), layout="constrained")
    axes = fig.subplots(1 + len(extra), 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    loss = s.masked("loss")
    ax.plot(s.x, loss, color="C0", marker=".", ms=3, label="loss")
    if use_log(loss, levels):
        ax.set_yscale("log")
    ax.set_ylabel("loss", color="C0")
    lines = ax.get_lines()[:]
    if "accuracy" in s.values:
        tw = ax.twinx()
        lines += tw.plot(s.x, s.masked("accuracy"), color="C1", marker=".", ms=3, label="accuracy")
        tw.set_ylabel("accuracy", color="C1")
        tw.set_ylim(-0.02, 1.02)
    marks = [(0.0, "this checkpoint")] + ([(1.0, "other checkpoint")] if s.kind == "interpolation" else [])
    for x0, label in marks:
        if s.x.min() <= x0 <= s.x.max():
            lines.append(ax.axvline(x0, color="crimson" if x0 == 0 else "purple", ls="--", lw=1, label=label))
    fig.legend(lines, [ln.get_label() for ln in lines], loc="outside lower center", ncols=len(lines),
               fontsize="small")
    for a, k in zip(axes[1:], extra):
        a.plot(s.x, s.masked(k), color="C2", marker=".", ms=3)
        a.set_ylabel(text(k))
    axes[-1].set_xlabel(axis_labels(s)[0])
    ax.set_title(_title(run, s, "loss and accuracy"), fontsize="medium")
    return fig


def eigenvalue_figure(run: RunContents, c: CurvatureData) -> Figure:
    """Top (and bottom) eigenvalues with their residuals ‖Hv − λv‖ as error bars (a bound on |λ − λ_true|)."""
    parts = [(p, t) for p, t in (("", "top"), ("bottom_", "bottom")) if f"{p}eigenvalues" in c.arrays]
    fig = Figure(figsize=(6.4 * len(parts), 4.4), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, (p, label) in zip(axes, parts):
        vals, res, ok = c.arrays[f"{p}eigenvalues"], c.arrays[f"{p}residuals"], c.arrays[f"{p}converged"].astype(bool)
        idx = np.arange(1, len(vals) + 1)
        ax.bar(idx, vals, color=np.where(ok, "C0", "C3"), yerr=res, capsize=4, ecolor="black")
        ax.axhline(0.0, color="0.4", lw=0.8)
        ax.set_xticks(idx)
        ax.set_xlabel(f"{label} eigenvalue index")
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"{label} eigenvalues (error bars: residuals; red: not converged)", fontsize="small")
    fig.suptitle(text(f"{run.title}: {c.title} spectrum ({c.attrs.get('n_parameters', '?')} parameters, "
                      f"{c.attrs.get('dtype', '')})"), fontsize="medium")
    return fig


def _density_axes(ax: Any, d: Mapping[str, Any], legend: bool = True) -> None:
    """An SLQ density on a log axis, the negative part shaded (labelled with its mass when ``legend``)."""
    grid, values = np.asarray(d["grid"]), np.asarray(d["values"], dtype=np.float64)
    shown = np.where(values > 0, values, np.nan)  # log axis: zeros are gaps, never clipped to a floor
    ax.plot(grid, shown, color="C0", lw=1.2)
    neg = grid < 0
    if neg.any():
        ax.fill_between(grid, shown, where=neg, color="C3", alpha=0.35,
                        label=f"negative eigenvalues (mass {float(d['negative_mass']):.3g})")
        if legend:
            ax.legend(loc="upper right", fontsize="small")
    ax.set_yscale("log")
    top = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
    ax.set_ylim(top * 1e-10, top * 3)


def density_figure(run: RunContents, c: CurvatureData) -> Figure:
    """SLQ spectral density on a log axis, the negative part shaded, with its mass."""
    d = c.density
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    _density_axes(ax, d)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(text(f"{run.title}: {c.title} spectral density (SLQ, sigma^2 = {float(d.get('sigma2', 0)):.2g}, "
                      f"{d['nodes'].shape[0]} probes)"), fontsize="medium")
    return fig


def per_class_density_figure(run: RunContents, c: CurvatureData) -> Figure:
    """One SLQ density panel per class (``--per-class``), the most frequent class first, each titled with its sample
    count and its negative mass ± standard error over the probes."""
    classes = [(k, pc) for k, pc in c.per_class.items() if pc.density is not None]
    cols = min(4, len(classes))
    rows = -(-len(classes) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows + 0.6), layout="constrained")
    for i, (cls, pc) in enumerate(classes):
        ax = fig.add_subplot(rows, cols, i + 1)
        _density_axes(ax, pc.density, legend=False)
        d = pc.density
        se = float(d.get("negative_mass_stderr", math.nan))
        ax.set_title(f"class {cls} ({pc.attrs.get('n_samples', '?')} samples)\nnegative mass "
                     f"{float(d['negative_mass']):.3f}" + (f" ± {se:.3f}" if math.isfinite(se) else ""),
                     fontsize="small")
        ax.tick_params(labelsize="x-small")
    fig.supxlabel("eigenvalue", fontsize="small")
    fig.supylabel("density (log scale)", fontsize="small")
    fig.suptitle(text(f"{run.title}: {c.title} spectral density of each class's loss (most frequent first)"),
                 fontsize="medium")
    return fig


def batch_size_figure(run: RunContents, c: CurvatureData) -> Figure:
    """λmax and −λmin of random mini-batches against their size (mean ± standard error over the draws) on log axes,
    beside the full data's value and the fitted λ_full + c/b."""
    series = batch_size_series(c.batch_sizes)
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    for i, sr in enumerate(series):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.errorbar(sr["sizes"], sr["mean"], yerr=sr["stderr"], fmt="o", color="C0", capsize=3,
                    label="random batches (mean ± stderr)")
        ax.axhline(sr["full"], color="C3", ls="--", lw=1, label="full data")
        ax.plot(sr["fit_sizes"], sr["fit"], color="C2", lw=1, label="fit λ_full + c/b")
        ax.set_xscale("log")
        if sr["log"]:
            ax.set_yscale("log")
        ax.set_xlabel("batch size b")
        ax.set_ylabel(text(sr["label"]))
        ax.legend(fontsize="small")
    fig.suptitle(text(f"{run.title}: {c.title} extreme eigenvalues of mini-batches "
                      f"({int(c.batch_sizes['draws'])} draws per size)"), fontsize="medium")
    return fig


def trace_figure(run: RunContents, curvature: Sequence[CurvatureData]) -> Figure:
    """Each trace estimate with its 95% interval (±1.96 standard errors), per engine and per layer."""
    items = trace_items(curvature)
    fig = Figure(figsize=(7.0, 1.6 + 0.45 * len(items)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(items))[::-1]
    est = np.array([float(t["estimate"]) for _, t in items])
    err = np.array([1.96 * float(t["stderr"]) if math.isfinite(float(t["stderr"])) else 0.0 for _, t in items])
    ax.errorbar(est, y, xerr=err, fmt="o", color="C0", capsize=4)
    ax.set_yticks(y, [text(n) for n, _ in items], fontsize="small")
    ax.axvline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("trace (error bars: 95% interval, ±1.96 standard errors)")
    ax.set_title(text(f"{run.title}: trace estimates"), fontsize="medium")
    return fig


def rho_label(rho: float) -> str:
    """The category name of a measure computed at a single ρ (a bar, not a curve through one point)."""
    return f"ρ = {rho:g}"


def sharpness_figure(run: RunContents, groups: Sequence[SharpnessData]) -> Figure:
    """Each sharpness measure against its ρ, with standard-error bars and the quadratic prediction; a measure at a
    single ρ is one bar."""
    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, g in zip(axes, groups):
        err = np.where(np.isfinite(g.stderr), g.stderr, 0.0)
        if len(g.rho) == 1:
            x = [rho_label(float(g.rho[0]))]
            ax.bar(x, g.value, yerr=err, width=0.4, capsize=6, color="C0", label="measured")
            if g.quadratic is not None:
                ax.plot(x, g.quadratic, ls="", marker="_", ms=40, mew=2, color="k", label="quadratic prediction")
            ax.set_xlim(-1, 1)
        else:
            ax.errorbar(g.rho, g.value, yerr=err, fmt="o-", capsize=4, color="C0", label="measured")
            if g.quadratic is not None:
                ax.plot(g.rho, g.quadratic, "k--", lw=1, label="quadratic prediction")
            if np.all(g.rho > 0):
                ax.set_xscale("log")
        if g.quadratic is not None:
            ax.legend(fontsize="x-small")
        ax.set_xlabel(text(f"rho ({g.attrs.get('rho_meaning', '')})"), fontsize="small")
        ax.set_ylabel(SHARPNESS_UNITS.get(str(g.attrs.get("measure")), "value"), fontsize="small")
        ax.set_title(text(f"{g.name} (m = {g.attrs.get('m')})"), fontsize="small")
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(text(f"{run.title}: sharpness (error bars: standard errors)"), fontsize="medium")
    return fig


def coherence_parts(c: CoherenceData) -> list[tuple[str, CoherenceData]]:
    """The real-label result and, when computed, the shuffled-label control, with their labels."""
    return [("real labels", c)] + ([("shuffled labels", c.control)] if c.control is not None else [])


def class_cosine_figure(run: RunContents, c: CoherenceData) -> Figure:
    """Class-by-class mean gradient cosine (stiffness), real labels and the shuffled control side by side."""
    parts = coherence_parts(c)
    fig = Figure(figsize=(5.6 * len(parts), 4.8), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, (label, d) in zip(axes, parts):
        m = np.asarray(d.arrays["class_cosine"], dtype=np.float64)
        im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu_r", vmin=-1, vmax=1, origin="upper")
        k = m.shape[0]
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    if math.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                                color="white" if abs(m[i, j]) > 0.6 else "black")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xlabel("class b")
        ax.set_ylabel("class a")
        ax.set_title(f"{label}", fontsize="small")
    fig.colorbar(im, ax=list(axes), label="mean cos(g_i, g_j), i in a, j in b")
    fig.suptitle(text(f"{run.title}: class gradient cosines (stiffness)"), fontsize="medium")
    return fig


def scores_figure(run: RunContents, c: CoherenceData) -> Figure:
    """Histograms of GraNd (‖g_i‖, log-spaced bins when it spans decades) and EL2N scores."""
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "grand", "GraNd score ||g_i||"), (axes[1], "el2n", "EL2N score")):
        values = [(name, finite_scores(d, key)) for name, d in coherence_parts(c)]
        every = np.concatenate([v for _, v in values])
        log = log_spread(every)
        bins = np.geomspace(every.min(), every.max(), 50) if log else np.linspace(every.min(), every.max(), 50) \
            if every.size else 1
        for (name, v), color in zip(values, ("C0", "C1")):
            ax.hist(v, bins=bins, color=color, alpha=0.6, label=name)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        ax.legend(fontsize="small")
    fig.suptitle(text(f"{run.title}: per-sample scores ({c.attrs.get('m')} samples)"), fontsize="medium")
    return fig


def finite_scores(c: CoherenceData, key: str) -> np.ndarray:
    """The finite per-sample scores ``key`` (``grand`` or ``el2n``) of ``c``."""
    v = np.asarray(c.arrays[key], dtype=np.float64)
    return v[np.isfinite(v)]


def log_spread(v: np.ndarray) -> bool:
    """Whether positive values span more than two decades (then histogram bins are log-spaced)."""
    return bool(v.size) and v.min() > 0 and v.max() / v.min() > 100


def batch_cosine_figure(run: RunContents, c: CoherenceData) -> Figure:
    """Cosine of minibatch gradients to the full gradient against the batch size (± spread over batches)."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for (name, d), color in zip(coherence_parts(c), ("C0", "C1")):
        ax.errorbar(d.arrays["batch_sizes"], d.arrays["batch_cosine"], yerr=d.arrays["batch_cosine_std"],
                    fmt="o-", capsize=4, color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("cos(g_B, G) (error bars: std over batches)")
    ax.legend(fontsize="small")
    ax.set_title(text(f"{run.title}: minibatch gradient alignment"), fontsize="medium")
    return fig


def compare_slices_figure(run: RunContents, c: CompareData, *, levels: str = "auto") -> Figure:
    """Every model's 2D loss slice side by side, on one colour scale, each checkpoint marked."""
    grids = [s for s in c.slices if s.dims == 2]
    every = np.concatenate([s.masked("loss").ravel() for s in grids])
    log = use_log(every, levels)
    norm, lv = _norm_levels(every, log)
    fig = Figure(figsize=(4.2 * len(grids) + 1.2, 4.4), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False, sharey=True)[0]
    cs = None
    for ax, s in zip(axes, grids):
        X, Y = np.meshgrid(s.x, s.y, indexing="ij")
        z = np.ma.masked_invalid(s.masked("loss"))
        if np.ma.count(z) >= 4:
            cs = ax.contourf(X, Y, z, levels=lv, norm=norm, cmap="viridis", extend="both")
        ax.set_facecolor("0.85")
        ax.plot([0.0], [0.0], marker="*", ms=12, color="crimson", mec="white", ls="none")
        ax.set_title(text(s.name), fontsize="small")
        ax.set_xlabel("direction 1 (filter-normalized)", fontsize="small")
    axes[0].set_ylabel("direction 2 (filter-normalized)", fontsize="small")
    if cs is not None:
        cb = fig.colorbar(cs, ax=list(axes), label="loss (one scale for all models)")
        if log:
            _log_ticks(cb, float(lv[0]), float(lv[-1]))
    fig.suptitle(text(f"{run.title}: loss slices (same seed and recipe, each filter-normalized to its own weights)"),
                 fontsize="medium")
    return fig


def compare_metrics_figure(run: RunContents, c: CompareData) -> Figure:
    """One bar chart per metric: each model's value with its standard error (λmax: its residual)."""
    names = list(c.metrics)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    idx = np.arange(len(c.models))
    for ax, k in zip(axes, names):
        m = c.metrics[k]
        err = np.where(np.isfinite(m["stderr"]), m["stderr"], 0.0)
        ax.bar(idx, m["value"], yerr=err, capsize=4, color=[f"C{i}" for i in idx])
        ax.set_xticks(idx, [text(n) for n in c.models], rotation=30, ha="right", fontsize="small")
        ax.set_title(text(k), fontsize="small")
    for ax in axes[len(names):]:
        ax.set_axis_off()
    fig.suptitle(text(f"{run.title}: metrics (error bars: standard errors)"), fontsize="medium")
    return fig


def compare_paths_figure(run: RunContents, c: CompareData) -> Figure:
    """Loss along the straight line between each pair (after and before alignment) and the Bezier curve."""
    n = len(c.interpolation)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.0 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    curves = {p.key: p for p in c.bezier}
    for ax, p in zip(axes, c.interpolation):
        aligned = bool(p.attrs.get("aligned"))
        ax.plot(p.alpha, p.loss, color="C0", label="linear, aligned" if aligned else "linear")
        if p.unaligned is not None:
            ax.plot(p.unaligned.alpha, p.unaligned.loss, color="C0", ls="--", label="linear, before alignment")
        if p.key in curves:
            ax.plot(curves[p.key].alpha, curves[p.key].loss, color="C2", label="Bezier curve (t)")
        if np.all(p.loss[np.isfinite(p.loss)] > 0):
            ax.set_yscale("log")
        for x0 in (0.0, 1.0):
            ax.axvline(x0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("alpha (0: first model, 1: second)", fontsize="small")
        ax.set_ylabel("loss", fontsize="small")
        ax.set_title(text(f"{p.pair[0]} - {p.pair[1]}: barrier {float(p.attrs['loss_barrier']):.3g}"),
                     fontsize="small")
        ax.legend(fontsize="x-small")
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(text(f"{run.title}: connectivity"), fontsize="medium")
    return fig


def trajectory_plane_figure(run: RunContents, t: TrajectoryData, *, levels: str = "auto") -> Figure:
    """The loss in the plane of the path's top-2 principal directions, the path drawn on it."""
    fig = contour_figure(run, t.plane, "loss", levels=levels, filled=True)
    ax = fig.axes[0]
    ax.plot(t.coords[:, 0], t.coords[:, 1], "-o", color="white", mec="black", ms=5, lw=1.5, label="path")
    labelled = spaced_labels(t.coords, float(np.ptp(t.plane.x)), float(np.ptp(t.plane.y)))
    for (x, y), step, show in zip(t.coords, t.arrays["step"], labelled):
        if show:
            ax.annotate(str(int(step)), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small",
                        color="white")
    ev = t.explained_variance
    ax.set_xlabel(f"PC 1 ({100 * ev[0]:.1f}% of the variance)")
    ax.set_ylabel(f"PC 2 ({100 * (ev[1] if len(ev) > 1 else 0):.1f}%)")
    ax.set_title(text(f"{run.title}: loss in the PCA plane of the path (labels: steps, spaced)"), fontsize="medium")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def trajectory_sharpness_figure(run: RunContents, t: TrajectoryData) -> Figure:
    """Sharpness at each checkpoint against the stability threshold; edge-of-stability checkpoints marked."""
    a = t.arrays
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    pre = np.array([k == "preconditioned" for k in a["sharpness_kind"]])
    ax.plot(a["step"], a["sharpness"], "-o", color="C0", ms=4,
            label="preconditioned sharpness (Adam)" if pre.all() else "lambda_max")
    if np.isfinite(a["threshold"]).any():
        ax.plot(a["step"], a["threshold"], "--", color="C3", label="stability threshold")
    eos = a["edge_of_stability"].astype(bool)
    if eos.any():
        ax.plot(a["step"][eos], a["sharpness"][eos], "o", mfc="none", mec="C3", ms=10, label="edge of stability")
    finite = a["sharpness"][np.isfinite(a["sharpness"])]
    if finite.size and finite.min() > 0:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("sharpness")
    ax.legend(fontsize="small")
    ax.set_title(text(f"{run.title}: sharpness and the stability threshold"), fontsize="medium")
    return fig


def trajectory_distance_figure(run: RunContents, t: TrajectoryData) -> Figure:
    """Distance from the first checkpoint, effective step size and per-tensor weight norms against the step."""
    a = t.arrays
    fig = Figure(figsize=(12.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].plot(a["step"], a["distance"], "-o", ms=4)
    axes[0].set_ylabel("||theta_i - theta_0||")
    axes[1].plot(a["step"], a["step_size"], "-o", ms=4, color="C1")
    axes[1].set_ylabel("||theta_i - theta_(i-1)|| per step")
    if np.nanmin(np.where(a["step_size"] > 0, a["step_size"], np.nan), initial=np.inf) < np.inf:
        axes[1].set_yscale("log")
    for n, v in t.weight_norms.items():
        axes[2].plot(a["step"], v, "-", label=text(n))
    axes[2].set_ylabel("weight norm")
    if len(t.weight_norms) <= 12:
        axes[2].legend(fontsize="xx-small", ncols=2)
    for ax in axes:
        ax.set_xlabel("training step")
    fig.suptitle(text(f"{run.title}: distances and norms"), fontsize="medium")
    return fig


def trajectory_measures_figure(run: RunContents, t: TrajectoryData) -> Figure:
    """A training monitor's further measures against the step, one panel each (error bars where there are)."""
    a, series = t.arrays, t.measures
    fig = Figure(figsize=(4.0 * min(len(series), 4), 3.4 * -(-len(series) // 4)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(-(-len(series) // 4), min(len(series), 4), squeeze=False)).ravel()
    for ax, (k, v) in zip(axes, series.items()):
        err = a.get(f"{k}_stderr")
        ax.errorbar(a["step"], v, yerr=err, fmt="-o", ms=3, capsize=2)
        finite = v[np.isfinite(v)]
        if finite.size and finite.min() > 0 and finite.max() > 20 * finite.min():
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(k)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    probe = f" (probe batch of {run.attrs['probe_size']})" if "probe_size" in run.attrs else ""
    fig.suptitle(text(f"{run.title}: measured while training{probe}"), fontsize="medium")
    return fig


def all_figures(run: RunContents, *, levels: str = "auto") -> dict[str, Figure]:
    """Every figure the run file has data for, by file stem."""
    out: dict[str, Figure] = {}
    for s in run.slices:
        stem = safe_name(s.name)
        if s.dims == 2:
            for key in s.values:
                k = "" if key == "loss" else "_" + safe_name(key)
                if key == "loss":
                    out[f"{stem}_contour"] = contour_figure(run, s, key, levels=levels)
                    out[f"{stem}_surface"] = surface_figure(run, s, key, levels=levels)
                out[f"{stem}{k}_filled"] = contour_figure(run, s, key, levels="linear" if key == "accuracy" else levels,
                                                          filled=True)
        else:
            out[f"{stem}_1d"] = curve_figure(run, s, levels=levels)
    for c in run.curvature:
        if "eigenvalues" in c.arrays or "bottom_eigenvalues" in c.arrays:
            out[f"{c.name}_eigenvalues"] = eigenvalue_figure(run, c)
        if c.density is not None:
            out[f"{c.name}_density"] = density_figure(run, c)
        if c.batch_sizes is not None:
            out[f"{c.name}_batch_sizes"] = batch_size_figure(run, c)
        if any(pc.density is not None for pc in c.per_class.values()):
            out[f"{c.name}_per_class_density"] = per_class_density_figure(run, c)
    if any(c.trace is not None or c.per_layer for c in run.curvature):
        out["trace"] = trace_figure(run, run.curvature)
    if run.sharpness:
        out["sharpness"] = sharpness_figure(run, run.sharpness)
    if run.trajectory is not None:
        t = run.trajectory
        if t.plane is not None:
            out["trajectory_plane"] = trajectory_plane_figure(run, t, levels=levels)
        if "sharpness" in t.arrays:
            out["trajectory_sharpness"] = trajectory_sharpness_figure(run, t)
        out["trajectory_distance"] = trajectory_distance_figure(run, t)
        if t.measures:
            out["trajectory_measures"] = trajectory_measures_figure(run, t)
    if run.compare is not None:
        if any(sl.dims == 2 for sl in run.compare.slices):
            out["compare_slices"] = compare_slices_figure(run, run.compare, levels=levels)
        if run.compare.metrics:
            out["compare_metrics"] = compare_metrics_figure(run, run.compare)
        if run.compare.interpolation:
            out["compare_interpolation"] = compare_paths_figure(run, run.compare)
    if run.coherence is not None:
        out["coherence_class_cosine"] = class_cosine_figure(run, run.coherence)
        out["coherence_scores"] = scores_figure(run, run.coherence)
        if len(run.coherence.arrays.get("batch_sizes", ())):
            out["coherence_batch_cosine"] = batch_cosine_figure(run, run.coherence)
    return out


def safe_name(name: str) -> str:
    """A file-name-safe version of a run-file name (slice or metric)."""
    s = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip(".")
    return s or "unnamed"


def write_figures(figures: Mapping[str, Figure], directory: Path, formats: Iterable[str]) -> list[Path]:
    """Save every figure in every format under ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, fig in figures.items():
        for fmt in formats:
            p = directory / f"{stem}.{fmt}"
            replace_atomically(p, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))
            written.append(p)
    return written
