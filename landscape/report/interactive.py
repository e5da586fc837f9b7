"""One self-contained interactive HTML report (plotly), drawn from a :class:`~.contents.RunContents`.

The page embeds plotly.js and every figure's data, so it opens offline and makes no network request
of any kind. It starts with a summary table of every scalar result (with its standard error) and the
run's provenance, then interactive panels for what the run file holds: 3D surfaces and contours with
hover values, 1D slices, the spectrum, sharpness and coherence. Every string taken from the run file
is escaped: in the page as HTML text, and in figures as plotly text (whose own mini-markup would
otherwise read ``<b>`` or ``<a>`` in a parameter name); figure data sits in a JSON script block with
``<``, ``>`` and ``&`` written as ``\\u`` escapes, so no name can close it.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterator, Mapping

import numpy as np

from .contents import (CoherenceData, CompareData, CurvatureData, RunContents, SharpnessData, SliceData,
                       TrajectoryData, batch_size_series, provenance, settings, spaced_labels, summary_rows,
                       trace_items)
from ..analyses.compare import ORDER_NOTE
from .figures import SHARPNESS_UNITS, axis_labels, rho_label, coherence_parts, finite_scores, log_spread, use_log

#: plotly's toolbar: shown while the pointer is over a plot, without the selection tools a report has no use for
_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2},
           "displayModeBar": "hover", "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}
#: top margin of a plot: the toolbar's row (about 28 px), then the title below it, so that neither hides the other
_TOP = 72


def esc(s: object) -> str:
    """Run-file text for HTML or plotly text: markup characters become entities."""
    return html.escape(str(s), quote=True)


def _num(v: float, digits: int = 7) -> float | None:
    """A finite value rounded to ``digits`` significant digits (smaller files); NaN/Inf become null (gaps)."""
    v = float(v)
    return float(f"{v:.{digits}g}") if math.isfinite(v) else None


def plain(obj: Any) -> Any:
    """``obj`` with numpy arrays and scalars as JSON-ready Python; non-finite numbers as ``None``."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            return [plain(r) for r in obj] if obj.ndim > 1 else [_num(v) for v in obj]
        return obj.tolist()
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def script_json(obj: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">`` (no ``</script>`` can appear)."""
    text = json.dumps(plain(obj), allow_nan=False, separators=(",", ":"))
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, rep)
    return text


class _Page:
    """Accumulates HTML sections and the figures their ``<div>`` s will hold."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures: list[dict[str, Any]] = []

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, data: list[dict[str, Any]], layout: dict[str, Any], *, caption: str, height: int = 420,
               width: str = "100%") -> str:
        """A plot and its one-line caption (what to look for in it)."""
        fid = f"fig{len(self.figures)}"
        layout = {"height": height, "margin": {"l": 60, "r": 20, "t": _TOP, "b": 50}, **layout}
        self.figures.append({"id": fid, "data": data, "layout": layout})
        return (f'<figure class="fig" style="width:{width}"><div class="plot" id="{fid}" style="height:{height}px">'
                f"</div><figcaption>{esc(caption)}</figcaption></figure>")


def _title(text: str) -> dict[str, Any]:
    """A plot title placed under the toolbar's row (:data:`_TOP`)."""
    return {"text": esc(text), "font": {"size": 14}, "yref": "container", "y": 1, "yanchor": "top", "pad": {"t": 32}}


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.6g}"


def _summary(run: RunContents) -> str:
    rows = [(r.section, r.name, _fmt(r.value), _fmt(r.stderr), r.note) for r in summary_rows(run)]
    if not rows:
        return "<p>The run file holds no results yet.</p>"
    return _table(rows, ("section", "quantity", "value", "± standard error", "note"), "summary")


def _settings(attrs: dict[str, Any] | Any) -> str:
    return f"<details><summary>settings</summary><p class=\"settings\">{esc(settings(attrs))}</p></details>"


def _slice_panels(page: _Page, run: RunContents, s: SliceData) -> str:
    """The HTML of one slice's panels: a 1D slice's loss and accuracy curve, or a 2D slice's loss surface and
    contours (the checkpoint starred) and a panel for each other value (accuracy, metrics).

    Length: plotly figure specifications, a dict literal a panel, written out so that each reads as the figure it
    draws."""
    xl, yl = axis_labels(s)
    loss = s.masked("loss")
    acc = s.masked("accuracy") if "accuracy" in s.values else None
    gaps = s.n_missing
    note = f"<p class=\"note\">{gaps} of {s.done.size} points are gaps (not computed, NaN or Inf).</p>" if gaps else ""
    head = f"<h3>slice {esc(s.name)} <small>({esc(s.kind)}, {'×'.join(map(str, loss.shape))})</small></h3>{note}"
    if s.dims == 1:
        data = [{"type": "scatter", "x": s.x, "y": loss, "name": "loss", "mode": "lines+markers",
                 "marker": {"size": 4}, "hovertemplate": "x=%{x:.4g}<br>loss=%{y:.6g}<extra></extra>"}]
        if acc is not None:
            data.append({"type": "scatter", "x": s.x, "y": acc, "name": "accuracy", "yaxis": "y2",
                         "mode": "lines+markers", "marker": {"size": 4},
                         "hovertemplate": "x=%{x:.4g}<br>accuracy=%{y:.4f}<extra></extra>"})
        for k in s.values:
            if k not in ("loss", "accuracy"):
                data.append({"type": "scatter", "x": s.x, "y": s.masked(k), "name": esc(k), "visible": "legendonly",
                             "mode": "lines"})
        marks = [0.0] + ([1.0] if s.kind == "interpolation" else [])
        layout = {"title": _title(f"{s.name}: loss and accuracy"), "xaxis": {"title": {"text": esc(xl)}},
                  "yaxis": {"title": {"text": "loss"}, "type": "log" if use_log(loss, "auto") else "linear"},
                  "yaxis2": {"title": {"text": "accuracy"}, "overlaying": "y", "side": "right", "range": [0, 1.02],
                             "tickmode": "auto", "showgrid": False},
                  "shapes": [{"type": "line", "x0": m, "x1": m, "yref": "paper", "y0": 0, "y1": 1,
                              "line": {"dash": "dash", "color": "crimson" if m == 0 else "purple", "width": 1}}
                             for m in marks],
                  "legend": {"x": 1.08, "y": 1}}
        caption = ("Loss along the direction through the checkpoint (dashed red line"
                   + ("; purple: the second model" if s.kind == "interpolation" else "")
                   + "): a narrow dip is a sharp minimum, a flat floor a wide one; a bump between the models a barrier.")
        return head + page.figure(data, layout, caption=caption) + _settings(s.attrs)
    log = use_log(loss, "auto")
    z = np.log10(loss) if log else loss
    zlabel = "log10 loss" if log else "loss"
    custom = np.stack([loss.T, (acc if acc is not None else np.full_like(loss, np.nan)).T], axis=-1)
    hover = "x=%{x:.4g}<br>y=%{y:.4g}<br>loss=%{customdata[0]:.6g}" + \
            ("<br>accuracy=%{customdata[1]:.4f}" if acc is not None else "") + "<extra></extra>"
    origin_z = None
    if s.x.min() <= 0 <= s.x.max() and s.y.min() <= 0 <= s.y.max():
        i, j = int(np.abs(s.x).argmin()), int(np.abs(s.y).argmin())
        origin_z = z[i, j]
    surf = [{"type": "surface", "x": s.x, "y": s.y, "z": z.T, "customdata": custom, "hovertemplate": hover,
             "colorscale": "Viridis", "colorbar": {"title": {"text": zlabel}}, "name": "loss"}]
    if origin_z is not None and math.isfinite(origin_z):
        surf.append({"type": "scatter3d", "x": [0.0], "y": [0.0], "z": [origin_z], "mode": "markers",
                     "marker": {"size": 5, "color": "crimson"}, "name": "checkpoint", "showlegend": False})
    layout3 = {"title": _title(f"{s.name}: {zlabel} surface"),
               "scene": {"xaxis": {"title": {"text": "direction 1"}}, "yaxis": {"title": {"text": "direction 2"}},
                         "zaxis": {"title": {"text": zlabel}}, "camera": {"eye": {"x": 1.7, "y": -1.7, "z": 1.1}},
                         "aspectmode": "cube"}, "margin": {"l": 0, "r": 0, "t": _TOP, "b": 0}}
    cont = [{"type": "contour", "x": s.x, "y": s.y, "z": z.T, "customdata": custom, "hovertemplate": hover,
             "colorscale": "Viridis", "ncontours": 30, "colorbar": {"title": {"text": zlabel}},
             "contours": {"coloring": "heatmap"}, "connectgaps": False, "name": "loss"},
            {"type": "scatter", "x": [0.0], "y": [0.0], "mode": "markers", "name": "checkpoint",
             "marker": {"symbol": "star", "size": 14, "color": "crimson", "line": {"color": "white", "width": 1}}}]
    layout2 = {"title": _title(f"{s.name}: {zlabel} contours (checkpoint: star)"),
               "xaxis": {"title": {"text": esc(xl)}}, "yaxis": {"title": {"text": esc(yl)}}, "showlegend": False}
    body = '<div class="row">' + page.figure(
        surf, layout3, height=480, width="50%",
        caption="The loss around the checkpoint (red dot) over two directions; drag to turn it. A bowl is a minimum, "
                "a saddle or ridge means negative curvature along the directions.") + \
        page.figure(cont, layout2, height=480, width="50%",
                    caption="The same loss from above: closed rings around the star are a basin, their spacing "
                            "how steep its walls are.") + "</div>"
    for k in s.values:
        if k != "loss":
            v = s.masked(k)
            body += page.figure([{"type": "heatmap", "x": s.x, "y": s.y, "z": v.T, "colorscale": "Cividis",
                                  "colorbar": {"title": {"text": esc(k)}},
                                  "hovertemplate": "x=%{x:.4g}<br>y=%{y:.4g}<br>" + esc(k) +
                                                   "=%{z:.6g}<extra></extra>"}],
                                {"title": _title(f"{s.name}: {k}"), "xaxis": {"title": {"text": esc(xl)}},
                                 "yaxis": {"title": {"text": esc(yl)}}}, height=380, width="50%",
                                caption=f"{k} over the same plane (grey: not computed or not finite).")
    return head + body + _settings(s.attrs)


def _curvature_panels(page: _Page, c: CurvatureData) -> str:
    """The HTML of one curvature group's panels: top and bottom eigenvalues with residual bars, the spectral density,
    mini-batch against full-data extreme eigenvalues, and each class's spectral density.

    Length: plotly figure specifications, a dict literal a panel, written out so that each reads as the figure it
    draws."""
    out = f"<h3>{esc(c.title)} <small>({esc(c.attrs.get('n_parameters', '?'))} parameters, " \
          f"{esc(c.attrs.get('n_hvp', '?'))} products)</small></h3><div class=\"row\">"
    for p, label in (("", "top"), ("bottom_", "bottom")):
        if f"{p}eigenvalues" not in c.arrays:
            continue
        vals, res = c.arrays[f"{p}eigenvalues"], c.arrays[f"{p}residuals"]
        ok = c.arrays[f"{p}converged"].astype(bool)
        idx = np.arange(1, len(vals) + 1)
        out += page.figure([{"type": "bar", "x": idx, "y": vals, "error_y": {"type": "data", "array": res},
                             "marker": {"color": ["#1f77b4" if o else "#d62728" for o in ok]},
                             "customdata": res, "hovertemplate": "λ%{x} = %{y:.6g}<br>residual %{customdata:.2g}"
                                                                 "<extra></extra>"}],
                           {"title": _title(f"{label} eigenvalues (error bars: residuals; red: not converged)"),
                            "xaxis": {"title": {"text": "index"}, "dtick": 1},
                            "yaxis": {"title": {"text": "eigenvalue"}}}, height=360, width="50%",
                           caption=f"The {label} eigenvalues; bars far from the rest are the few sharp (or negative) "
                                   "directions. Red bars did not converge: their error bar bounds the error.")
    if c.density is not None:
        out += page.figure(_density_traces(c.density),
                           {"title": _title("spectral density (SLQ), log scale"), "yaxis": {"type": "log",
                            "title": {"text": "density"}}, "xaxis": {"title": {"text": "eigenvalue"}},
                            "legend": {"x": 0.6, "y": 1}}, height=360, width="50%",
                           caption="Mass near zero is the flat bulk, isolated bumps far right the outliers; red "
                                   "shading is negative curvature (a saddle), its mass in the legend.")
    out += "</div>"
    if c.batch_sizes is not None:
        out += f"<h4>Mini-batches against the full data ({int(c.batch_sizes['draws'])} draws per size)</h4>" \
               "<div class=\"row\">"
        for sr in batch_size_series(c.batch_sizes):
            out += page.figure(
                [{"type": "scatter", "mode": "markers", "x": sr["sizes"], "y": sr["mean"], "name": "random batches",
                  "error_y": {"type": "data", "array": sr["stderr"]}},
                 {"type": "scatter", "mode": "lines", "x": [sr["sizes"][0], sr["sizes"][-1]], "y": [sr["full"]] * 2,
                  "name": "full data", "line": {"dash": "dash", "color": "#d62728"}},
                 {"type": "scatter", "mode": "lines", "x": sr["fit_sizes"], "y": sr["fit"], "name": "λ_full + c/b",
                  "line": {"color": "#2ca02c"}}],
                {"title": _title(f"{sr['label']} against batch size"),
                 "xaxis": {"type": "log", "title": {"text": "batch size b"}, "tickvals": sr["sizes"],
                           "ticktext": [str(int(b)) for b in sr["sizes"]]},
                 "yaxis": {"type": "log", "title": {"text": sr["label"]},
                           "tickvals": _log_ticks(np.concatenate([sr["mean"] - sr["stderr"], sr["mean"] + sr["stderr"],
                                                                  sr["fit"], [sr["full"]]])), "tickformat": ".2g"}
                 if sr["log"] else {"title": {"text": sr["label"]}}},
                height=340, width="50%",
                caption="Random batches sit beyond the full data's value (dashed) and approach it like 1/b: the gap "
                        "is the extra sharpness an optimizer meets at batch size b.")
        out += "</div>"
    classes = [(k, pc) for k, pc in c.per_class.items() if pc.density is not None]
    if classes:
        out += "<h4>Each class's loss alone (most frequent class first)</h4><div class=\"row\">"
        for cls, pc in classes:
            d = pc.density
            se = float(d.get("negative_mass_stderr", math.nan))
            mass = f"{float(d['negative_mass']):.3f}" + (f" ± {se:.3f}" if math.isfinite(se) else "")
            top = float(pc.arrays["eigenvalues"][0]) if "eigenvalues" in pc.arrays else math.nan
            low = float(pc.arrays["bottom_eigenvalues"][0]) if "bottom_eigenvalues" in pc.arrays else math.nan
            out += page.figure(_density_traces(d),
                               {"title": _title(f"class {cls} ({pc.attrs.get('n_samples', '?')} samples): "
                                                f"λ {low:.3g} … {top:.3g}, negative mass {mass}"),
                                "yaxis": {"type": "log", "title": {"text": "density"}},
                                "xaxis": {"title": {"text": "eigenvalue"}}, "showlegend": False},
                               height=300, width="50%",
                               caption="A class with more negative mass than the others sits at a saddle of its own "
                                       "loss (often a minority class).")
        out += "</div>"
    return out + _settings(c.attrs)


def _log_ticks(values: np.ndarray, most: int = 7) -> list[float]:
    """Tick values for a log axis over the positive ``values``: 1-2-5 steps, or whole decades where those would
    be more than ``most`` (plotly labels every minor tick of a short log range, and the labels collide)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if not v.size:
        return []
    lo, hi = np.floor(np.log10(v.min())), np.ceil(np.log10(v.max()))
    for steps in ((1, 2, 5), (1,)):
        ticks = [m * 10.0 ** e for e in np.arange(lo, hi + 1) for m in steps if v.min() <= m * 10.0 ** e <= v.max()]
        if len(ticks) <= most:
            return ticks if len(ticks) >= 2 else [float(v.min()), float(v.max())]
    return [10.0 ** e for e in np.arange(lo, hi + 1, max(1, int((hi - lo) // most) + 1))]


def _density_traces(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An SLQ density (log axis: zeros are gaps) and its negative part, filled."""
    grid, values = np.asarray(d["grid"]), np.asarray(d["values"], dtype=np.float64)
    shown = np.where(values > 0, values, np.nan)
    neg = np.where(grid < 0, shown, np.nan)
    return [{"type": "scatter", "x": grid, "y": shown, "mode": "lines", "name": "density"},
            {"type": "scatter", "x": grid, "y": neg, "mode": "lines", "fill": "tozeroy",
             "name": f"negative (mass {float(d['negative_mass']):.3g})", "line": {"color": "#d62728"}}]


def _trace_panel(page: _Page, curvature: tuple[CurvatureData, ...]) -> str:
    items = trace_items(curvature)
    if not items:
        return ""
    est = [float(t["estimate"]) for _, t in items]
    err = [1.96 * float(t["stderr"]) if math.isfinite(float(t["stderr"])) else 0.0 for _, t in items]
    names = [esc(n) for n, _ in items]
    return "<h3>trace</h3>" + page.figure(
        [{"type": "scatter", "x": est, "y": names, "mode": "markers", "error_x": {"type": "data", "array": err},
          "marker": {"size": 9}, "hovertemplate": "%{y}: %{x:.6g} ± %{error_x.array:.2g}<extra></extra>"}],
        {"title": _title("trace estimates (error bars: 95% interval)"), "xaxis": {"title": {"text": "trace"}},
         "yaxis": {"automargin": True, "autorange": "reversed"}}, height=160 + 40 * len(items),
        caption="The sum of all eigenvalues (total curvature) with 95% intervals: compare engines and layers by "
                "whether their intervals overlap.")


def _sharpness_panels(page: _Page, groups: tuple[SharpnessData, ...]) -> str:
    out = '<div class="grid">'
    for g in groups:
        err = {"type": "data", "array": np.where(np.isfinite(g.stderr), g.stderr, 0.0)}
        single = len(g.rho) == 1  # one bar on a category axis, not a curve through one point
        x = [rho_label(float(g.rho[0]))] if single else g.rho
        data = [{"type": "bar", "x": x, "y": g.value, "name": "measured", "error_y": err, "width": 0.4} if single
                else {"type": "scatter", "x": x, "y": g.value, "mode": "lines+markers", "name": "measured",
                      "error_y": err}]
        if g.quadratic is not None:
            data.append({"type": "scatter", "x": x, "y": g.quadratic, "name": "quadratic",
                         **({"mode": "markers", "marker": {"symbol": "line-ew-open", "size": 40, "color": "black"}}
                            if single else {"mode": "lines", "line": {"dash": "dash", "color": "black"}})})
        log = not single and bool(np.all(g.rho > 0))
        out += '<div class="cell">' + page.figure(
            data, {"title": _title(f"{g.name} (m = {g.attrs.get('m')})"), "showlegend": g.quadratic is not None,
                   "xaxis": {"title": {"text": esc(f"rho ({g.attrs.get('rho_meaning', '')})")},
                             "type": "category" if single else "log" if log else "linear"},
                   "yaxis": {"title": {"text": esc(SHARPNESS_UNITS.get(str(g.attrs.get("measure")), "value"))}}},
            height=320, caption=_sharpness_caption(g, single)) + _settings(g.attrs) + "</div>"
    return out + "</div>"


def _coherence_panels(page: _Page, c: CoherenceData) -> str:
    parts = coherence_parts(c)
    out = '<div class="row">'
    for label, d in parts:
        m = np.asarray(d.arrays["class_cosine"], dtype=np.float64)
        out += page.figure([{"type": "heatmap", "z": m, "zmin": -1, "zmax": 1, "colorscale": "RdBu",
                             "colorbar": {"title": {"text": "cos"}},
                             "hovertemplate": "class %{y} · class %{x}: %{z:.3f}<extra></extra>"}],
                           {"title": _title(f"class gradient cosines, {label}"), "xaxis": {"title": {"text": "class b"},
                            "dtick": 1}, "yaxis": {"title": {"text": "class a"}, "autorange": "reversed", "dtick": 1}},
                           height=420, width=f"{100 // len(parts)}%",
                           caption="Cosines between the classes' summed unit gradients: red blocks are classes "
                                   "learned together, blue ones pull against each other.")
    out += '</div><div class="row">'
    for key, label in (("grand", "GraNd ||g_i||"), ("el2n", "EL2N")):
        values = [(name, finite_scores(d, key)) for name, d in parts]
        log = log_spread(np.concatenate([v for _, v in values]))
        data = [{"type": "histogram", "x": np.log10(v) if log else v, "name": name, "opacity": 0.6, "nbinsx": 50}
                for name, v in values]
        out += page.figure(data, {"title": _title(f"{label} per sample"), "barmode": "overlay",
                                  "xaxis": {"title": {"text": f"log10 {label}" if log else label}},
                                  "yaxis": {"title": {"text": "samples"}}}, height=340, width="50%",
                               caption=f"{label} of each sample: the right tail holds the hard or mislabeled ones.")
    out += "</div>"
    if len(c.arrays.get("batch_sizes", ())):
        data = [{"type": "scatter", "x": d.arrays["batch_sizes"], "y": d.arrays["batch_cosine"], "name": name,
                 "mode": "lines+markers", "error_y": {"type": "data", "array": d.arrays["batch_cosine_std"]}}
                for name, d in parts]
        out += page.figure(data, {"title": _title("cosine of minibatch gradients to the full gradient"),
                                  "xaxis": {"title": {"text": "batch size"}, "type": "log"},
                                  "yaxis": {"title": {"text": "cos(g_B, G)"}}}, height=340,
                               caption="How well a minibatch gradient points along the full one: near 1 at a size "
                                       "means batches that large already carry the full signal.")
    return out + _settings(c.attrs)


def _sharpness_caption(g: SharpnessData, single: bool) -> str:
    """What to look for in one sharpness panel."""
    flatter = "higher" if str(g.attrs.get("measure")) in ("basin-width", "pacbayes") else "lower"
    if single:
        what = "One radius, so one bar" + (": the black mark is the quadratic model's prediction, a bar far above "
                                           "it means ρ is beyond the quadratic regime" if g.quadratic is not None
                                           else "")
    else:
        what = "The measure against the radius" + ("; the dashed line is the quadratic model's prediction: where "
                                                    "they part, curvature no longer explains sharpness"
                                                    if g.quadratic is not None else "")
    return f"{what}. {flatter.capitalize()} is flatter; compare models trained alike."


def _compare_panels(page: _Page, c: CompareData) -> str:
    rows = []
    for k, m in c.metrics.items():
        rows.append((f"{k} ({c.orders.get(k, 'lower first')})", *(f"{_fmt(float(v))}" + (f" ± {float(e):.2g}" if math.isfinite(float(e)) else "") +
                          f" (rank {int(r)})" for v, e, r in zip(m["value"], m["stderr"], m["rank"]))))
    out = f"<p>{ORDER_NOTE[0].upper() + ORDER_NOTE[1:]}.</p>" + _table(rows, ("metric", *c.models), "summary")
    grids = [s for s in c.slices if s.dims == 2]
    if grids:
        every = np.concatenate([s.masked("loss").ravel() for s in grids])
        log = use_log(every, "auto")
        finite = every[np.isfinite(every)]
        lo, hi = (np.log10(finite.min()), np.log10(finite.max())) if log else (finite.min(), finite.max())
        width = f"{max(25, 100 // len(grids))}%"
        out += '<div class="row">'
        for s in grids:
            loss = s.masked("loss")
            out += page.figure([{"type": "contour", "x": s.x, "y": s.y, "z": (np.log10(loss) if log else loss).T,
                                 "customdata": loss.T, "zmin": lo, "zmax": hi, "zauto": False, "ncontours": 30,
                                 "colorscale": "Viridis", "contours": {"coloring": "heatmap"},
                                 "colorbar": {"title": {"text": "log10 loss" if log else "loss"}},
                                 "hovertemplate": "x=%{x:.3g}<br>y=%{y:.3g}<br>loss=%{customdata:.6g}<extra></extra>"},
                                {"type": "scatter", "x": [0.0], "y": [0.0], "mode": "markers",
                                 "marker": {"symbol": "star", "size": 12, "color": "crimson"}}],
                               {"title": _title(s.name), "showlegend": False}, height=380, width=width,
                               caption="Each model's own slice on one colour scale: compare the basins' widths "
                                       "directly.")
        out += "</div>"
    curves = {p.key: p for p in c.bezier}
    for p in c.interpolation:
        data = [{"type": "scatter", "x": p.alpha, "y": p.loss, "mode": "lines", "name": "linear" +
                 (", aligned" if p.attrs.get("aligned") else "")}]
        if p.unaligned is not None:
            data.append({"type": "scatter", "x": p.unaligned.alpha, "y": p.unaligned.loss, "mode": "lines",
                         "name": "linear, before alignment", "line": {"dash": "dash"}})
        if p.key in curves:
            data.append({"type": "scatter", "x": curves[p.key].alpha, "y": curves[p.key].loss, "mode": "lines",
                         "name": "Bezier curve (t)"})
        if p.accuracy is not None:
            data.append({"type": "scatter", "x": p.alpha, "y": 1 - p.accuracy, "mode": "lines", "name": "error",
                         "yaxis": "y2", "line": {"color": "#999"}})
        out += page.figure(data, {"title": _title(f"{p.pair[0]} - {p.pair[1]}: loss barrier "
                                                  f"{float(p.attrs['loss_barrier']):.4g}, error barrier "
                                                  f"{float(p.attrs['error_barrier']):.4g}"),
                                  "xaxis": {"title": {"text": "alpha (0: first model, 1: second)"}},
                                  "yaxis": {"title": {"text": "loss"}, "type": "log"},
                                  "yaxis2": {"title": {"text": "error"}, "overlaying": "y", "side": "right",
                                             "showgrid": False, "tickmode": "auto"},
                                  "legend": {"x": 1.08, "y": 1}}, height=360,
                               caption="Loss on the line between the two models: a bump above both ends is the "
                                       "barrier between their basins; none means they are linearly connected.")
    return out


def _plane_panel(page: _Page, t: TrajectoryData) -> str:
    a, pl, coords, ev = t.arrays, t.plane, t.coords, t.explained_variance
    assert pl is not None and coords is not None and ev is not None  # a trajectory's file (a monitor's has no plane)
    loss = pl.masked("loss")
    log = use_log(loss, "auto")
    names = [esc(n) for n in a["checkpoint"]]
    labelled = spaced_labels(coords, float(np.ptp(pl.x)), float(np.ptp(pl.y)))
    return page.figure(
        [{"type": "contour", "x": pl.x, "y": pl.y, "z": (np.log10(loss) if log else loss).T, "customdata": loss.T,
          "colorscale": "Viridis", "ncontours": 30, "contours": {"coloring": "heatmap"},
          "colorbar": {"title": {"text": "log10 loss" if log else "loss"}},
          "hovertemplate": "PC1=%{x:.3g}<br>PC2=%{y:.3g}<br>loss=%{customdata:.6g}<extra></extra>"},
         {"type": "scatter", "x": coords[:, 0], "y": coords[:, 1], "mode": "lines+markers+text",
          "text": [str(int(s_)) if show else "" for s_, show in zip(a["step"], labelled)],
          "textposition": "top right", "textfont": {"color": "white"}, "customdata": names,
          "marker": {"color": "white", "line": {"color": "black", "width": 1}}, "line": {"color": "white"},
          "hovertemplate": "%{customdata}<extra></extra>"}],
        {"title": _title("loss in the PCA plane of the path (labels: steps; hover for every one)"),
         "showlegend": False, "xaxis": {"title": {"text": f"PC 1 ({100 * ev[0]:.1f}%)"}},
         "yaxis": {"title": {"text": f"PC 2 ({100 * (ev[1] if len(ev) > 1 else 0):.1f}%)"}}}, height=480,
        caption="The loss over the plane of the path's two main directions, checkpoints joined in order: a path "
                "crossing the rings descended, one running along them circled the minimum.")


def _sharpness_panel(page: _Page, a: Mapping[str, np.ndarray], names: list[str]) -> str:
    data = [{"type": "scatter", "x": a["step"], "y": a["sharpness"], "mode": "lines+markers", "name": "sharpness",
             "customdata": names, "hovertemplate": "%{customdata}: %{y:.6g}<extra></extra>"},
            {"type": "scatter", "x": a["step"], "y": a["threshold"], "mode": "lines", "name": "stability threshold",
             "line": {"dash": "dash", "color": "#d62728"}}]
    eos = a["edge_of_stability"].astype(bool)
    if eos.any():
        data.append({"type": "scatter", "x": a["step"][eos], "y": a["sharpness"][eos], "mode": "markers",
                     "name": "edge of stability", "marker": {"size": 14, "symbol": "circle-open", "color": "#d62728"}})
    return page.figure(
        data, {"title": _title("sharpness against the stability threshold"), "xaxis": {"title": {"text": "step"}},
               "yaxis": {"title": {"text": "sharpness"}, "type": "log"}}, height=380, width="50%",
        caption="Sharpness at each checkpoint against the stability threshold 2/η (dashed): λ·η/2 near 1 is the "
                "edge of stability (circled), where gradient descent stops sharpening.")


def _distance_panel(page: _Page, a: Mapping[str, np.ndarray]) -> str:
    return page.figure(
        [{"type": "scatter", "x": a["step"], "y": a["distance"], "mode": "lines+markers", "name": "from the first"},
         {"type": "scatter", "x": a["step"], "y": a["step_size"], "mode": "lines+markers", "yaxis": "y2",
          "name": "per step"}],
        {"title": _title("distance travelled"), "xaxis": {"title": {"text": "step"}, "automargin": True},
         "yaxis": {"title": {"text": "‖θ_i − θ_0‖"}, "automargin": True},
         "yaxis2": {"title": {"text": "‖θ_i − θ_(i−1)‖ per step"}, "overlaying": "y", "side": "right",
                    "type": "log", "showgrid": False, "automargin": True, "tickformat": ".1e"},
         "margin": {"l": 60, "r": 70, "t": _TOP, "b": 50},
         "legend": {"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"}}, height=400, width="50%",
        caption="Distance from the first checkpoint (left) and movement per step (right, log): a flattening left "
                "curve with a falling right one means training has settled.")


def _measure_panels(page: _Page, t: TrajectoryData) -> str:
    """A training monitor's further measures against the step, two panels to a row."""
    a, out = t.arrays, ""
    for k, v in t.measures.items():
        err = a.get(f"{k}_stderr")
        trace = {"type": "scatter", "x": a["step"], "y": v, "mode": "lines+markers", "name": k}
        if err is not None:
            trace["error_y"] = {"type": "data", "array": err, "visible": True}
        out += page.figure([trace], {"title": _title(f"{k} while training"), "xaxis": {"title": {"text": "step"}},
                                     "yaxis": {"title": {"text": k}}}, height=320, width="50%",
                           caption=MEASURE_CAPTIONS.get(k, k) + (" Bars: one standard error." if err is not None
                                                                 else ""))
    return f'<div class="row">{out}</div>' if out else ""


#: What each monitored series says (the panels' captions).
MEASURE_CAPTIONS = {
    "loss": "Loss of the fixed probe batch at each check.",
    "heldout_loss": "Loss of the held-out probe batch: its gap to the probe's loss is the generalization gap.",
    "grad_norm": "Norm of the probe batch's full gradient.",
    "trace": "Hutch++ estimate of the Hessian's trace on the probe batch: the total curvature.",
    "gsnr_mean": "Mean gradient signal-to-noise ratio over parameters (Liu et al. 2020): it falls as examples "
                 "stop agreeing.",
    "m_coherence": "m-coherence of per-sample gradients (Chatterjee & Zielinski 2020): 1 for orthogonal "
                   "gradients, the batch size for identical ones.",
    "b_noise": "Gradient noise scale B_noise (McCandlish et al. 2018): the batch size beyond which larger "
               "batches stop paying off.",
    "b_simple": "B_simple = tr(Σ)/|G|², the cheaper form of the noise scale.",
}


def _trajectory_panels(page: _Page, t: TrajectoryData) -> str:
    a = t.arrays
    names = [esc(n) for n in a["checkpoint"]]
    out = _plane_panel(page, t) if t.plane is not None else ""
    row = (_sharpness_panel(page, a, names) if "sharpness" in a else "") + _distance_panel(page, a)
    return out + f'<div class="row">{row}</div>' + _measure_panels(page, t)


def _sections(page: _Page, run: RunContents) -> Iterator[tuple[str, str]]:
    if run.trajectory is not None:
        yield "trajectory", _trajectory_panels(page, run.trajectory)
    if run.compare is not None:
        yield "comparison", _compare_panels(page, run.compare)
    if run.slices:
        yield "slices", "".join(_slice_panels(page, run, s) for s in run.slices)
    if run.curvature:
        yield "curvature", "".join(_curvature_panels(page, c) for c in run.curvature) + \
              _trace_panel(page, run.curvature)
    if run.sharpness:
        yield "sharpness", _sharpness_panels(page, run.sharpness)
    if run.coherence is not None:
        yield "coherence", _coherence_panels(page, run.coherence)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#222;
padding:0 16px}h1{font-size:1.5em;margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}table.summary td:nth-child(3),table.summary td:nth-child(4){text-align:right;
font-variant-numeric:tabular-nums}.row{display:flex;flex-wrap:wrap}.grid{display:grid;
grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:8px}.settings{font-family:monospace;font-size:12px;
word-break:break-all}.note{color:#a33}small{color:#666;font-weight:normal}td.wrap{word-break:break-all}
nav a{margin-right:1em}figure.fig{margin:0 0 12px 0;box-sizing:border-box}figure.fig .plot{width:100%}
figcaption{font-size:12px;color:#555;margin:0 12px;line-height:1.35}
"""


def render_html(run: RunContents, plotly_js: str) -> str:
    """The whole report page; ``plotly_js`` is the plotly.js bundle to embed."""
    page = _Page()
    sections = list(_sections(page, run))
    prov = _table([(k, v) for k, v in provenance(run)], ("", ""), "provenance")
    nav = "".join(f'<a href="#{k}">{k}</a>' for k in ["summary", "provenance"] + [k for k, _ in sections])
    body = (f"<h1>{esc(run.title)}</h1><p>run file <code>{esc(run.path)}</code>; drawn by landscape "
            f"{esc(run.attrs.get('tool_version', ''))} from the run file alone</p><nav>{nav}</nav>"
            f'<h2 id="summary">summary</h2>{_summary(run)}'
            f'<h2 id="provenance">provenance</h2><details open><summary>checkpoint, data, seed, versions</summary>'
            f"{prov}</details>" + "".join(f'<h2 id="{k}">{k}</h2>{v}' for k, v in sections))
    # Figures are drawn one per task, after the first paint, so the summary shows at once and the page stays
    # responsive while the plots appear: those on screen (or scrolled to, or reached through the navigation) first,
    # the rest in page order behind them. Each plot gets data-order (its place in the drawing order); data-rendered
    # on the body counts them when all are drawn.
    loader = ("(function(){var figs=JSON.parse(document.getElementById('landscape-figures').textContent);"
              f"var config={json.dumps(_CONFIG)};var byId={{}},urgent=[],done=0,busy=false;"
              "figs.forEach(function(f){byId[f.id]=f;});"
              "function pick(){while(urgent.length){var u=urgent.shift();if(!u.drawn)return u;}"
              "for(var k=0;k<figs.length;k++){if(!figs[k].drawn)return figs[k];}return null;}"
              "function pump(){if(busy)return;var f=pick();if(!f)return;busy=true;f.drawn=true;"
              "Plotly.newPlot(f.id,f.data,f.layout,config).then(function(){"
              "document.getElementById(f.id).setAttribute('data-order',String(done++));busy=false;"
              "if(done===figs.length){document.body.setAttribute('data-rendered',String(done));}"
              "setTimeout(pump,0);});}"
              "if('IntersectionObserver' in window){var io=new IntersectionObserver(function(es){var fresh=[];"
              "es.forEach(function(e){if(e.isIntersecting){fresh.push(byId[e.target.id]);io.unobserve(e.target);}});"
              "urgent=fresh.concat(urgent);pump();},{rootMargin:'300px 0px'});"
              "figs.forEach(function(f){io.observe(document.getElementById(f.id));});}"
              "requestAnimationFrame(function(){setTimeout(pump,0);});})();")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(run.title)} · landscape"
            f"</title><style>{_STYLE}</style></head><body>{body}"
            f'<script type="application/json" id="landscape-figures">{script_json(page.figures)}</script>'
            f"<script>{plotly_js}</script><script>{loader}</script></body></html>")
