"""The summaries a command prints: tables on stdout, warnings on stderr, and JSON without NaN."""

from __future__ import annotations

import math
from typing import Any, Optional

from rich.table import Table
from rich.text import Text

from .app import err_console, out_console


def percent(fraction: float) -> str:
    """A share as a percentage with as few decimals as keep a share below 1 from reading 100%.

    >>> percent(0.4213), percent(0.9986), percent(0.99996), percent(1.0)
    ('42%', '99.9%', '99.996%', '100%')
    """
    for digits in range(5):
        text = f"{100 * fraction:.{digits}f}"
        if fraction >= 1 or float(text) < 100:
            return text + "%"
    return f"{100 * fraction:.5f}%"


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.6g}"


def print_summary(summary: Any) -> None:
    t = Table(title=f"run file: {summary.run_file}")
    for c in ("slice", "grid", "loss at origin", "min loss", "max loss", "non-finite", "computed now", "seconds"):
        t.add_column(c)
    for s in summary.slices:
        t.add_row(s.name, "x".join(map(str, s.shape)), fmt(s.loss_at_origin), fmt(s.loss_min), fmt(s.loss_max),
                  str(s.n_nonfinite), str(s.computed), f"{s.seconds:.1f}")
    if summary.slices:
        out_console.print(t)
    if summary.curvature:
        c = summary.curvature
        engine = "" if c["engine"] == "landscape" else f" by {c['engine']}"
        t = Table(title=f"{c['kind']}{engine} ({c['n_parameters']:,} parameters, {c['n_matvec']} products)",
                  show_header=False)
        if "eigenvalues" in c:
            t.add_row("top eigenvalues", ", ".join(f"{v:.6g}" for v in c["eigenvalues"]))
            t.add_row("converged", ", ".join(map(str, c["converged"])))
        if "bottom_eigenvalues" in c:
            t.add_row("bottom eigenvalues", ", ".join(f"{v:.6g}" for v in c["bottom_eigenvalues"]))
        if "trace" in c:
            t.add_row("trace", f"{c['trace']['estimate']:.6g} ± {c['trace']['stderr']:.2g} ({c['trace']['method']})")
        if "negative_mass" in c:
            t.add_row("negative spectral mass", f"{c['negative_mass']:.3g}")
        out_console.print(t)
        if not all(c.get("converged", [True]) + c.get("bottom_converged", [True])) and c["engine"] == "pyhessian":
            err_console.print(Text("note: PyHessian stops each eigenvalue when two successive Rayleigh quotients agree "
                                   "to its tol, not when the pair is accurate; the residuals of its pairs, "
                                   "recomputed with landscape's HVP, exceed --tol (see the run file)"))
        elif not all(c.get("converged", [True]) + c.get("bottom_converged", [True])):
            err_console.print(Text("warning: some eigenpairs reached neither --tol nor the rounding error of the "
                                   "Hessian-vector products (residuals are in the run file): try a larger --max-hvp, "
                                   "a looser --tol or --dtype float64"))
    if summary.sharpness:
        t = Table(title="sharpness (± standard error over batches or draws)")
        for c_ in ("group", "rho", "value", "±", "m", "samples"):
            t.add_column(c_, no_wrap=c_ == "group")
        for r in summary.sharpness:
            for i, rho_ in enumerate(r["rho"]):
                err = r["stderr"][i]
                t.add_row(r["group"] if i == 0 else "", f"{rho_:g}", fmt(r["value"][i]),
                          "" if err is None or not math.isfinite(err) else f"{err:.2g}", str(r["m"]),
                          str(r["n_samples"]))
        out_console.print(t)
    if summary.coherence:
        c = summary.coherence
        ctrl = c.get("control") or {}
        t = Table(title=f"gradient coherence ({c['m']} samples, {c['method']})")
        t.add_column("metric")
        t.add_column("real labels")
        if ctrl:
            t.add_column("shuffled labels")
        for k in ("m_coherence", "alpha", "gradient_diversity", "gradient_norm", "b_simple", "b_noise",
                  "gsnr_mean", "gsnr_median"):
            if k in c:
                t.add_row(k, *(fmt(d.get(k)) + (f" ± {d['b_noise_stderr']:.2g}" if k == "b_noise" and k in d else "")
                               for d in ([c, ctrl] if ctrl else [c])))
        out_console.print(t)
    for s in summary.slices:
        if s.n_nonfinite:
            err_console.print(Text(f"warning: slice {s.name} has {s.n_nonfinite} NaN/Inf points (kept in the run file)"))


def nan_to_none(obj: Any) -> Any:
    """NaN and Inf become null: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj
