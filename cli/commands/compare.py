"""``landscape compare``: solutions compared post hoc."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from ..app import app, command_errors, err_console, out_console
from ..options import DebugOpt, JsonOpt, SpecOptions, parse_range, parse_steps, spec_options
from ..printing import fmt, nan_to_none
from ..running import base_config, default_sharpness, draw_report, progress_bars


@app.command(epilog="Examples:\n\n"
                    "  landscape compare data/examples/mlp_sgd_s2000.pt data/examples/mlp_adam_s2000.pt "
                    "data/examples/mlp_sam_s2000.pt\n\n"
                    "  landscape compare a.pt b.pt --align --curve bezier -o reports/a_vs_b\n\n"
                    "  landscape compare reports/a/run.h5 reports/b/run.h5 --json   # reuse finished analyses")
@spec_options
def compare(
    inputs: list[str] = typer.Argument(..., help="Two or more checkpoints (or run files of them)."),
    align: bool = typer.Option(False, "--align", help="Permute each second model onto the first by weight matching "
                                                      "before interpolating (MLPs, plain CNNs); barriers before "
                                                      "and after are reported."),
    curve: Optional[str] = typer.Option(None, help="bezier: also fit a quadratic Bezier curve between each pair."),
    alpha_range: str = typer.Option("-0.5,1.5", "--alpha-range", help="Interpolation range MIN,MAX (covers 0 and 1)."),
    alpha_steps: int = typer.Option(51, help="Interpolation points."),
    bezier_steps: int = typer.Option(300, help="Optimization steps of the Bezier bend."),
    steps: str = typer.Option("51", help="Points per axis of each model's 2D slice."),
    hessian: bool = typer.Option(True, help="Hessian top-5 and trace of each model."),
    sharpness: bool = typer.Option(True, help="The default sharpness set for each model."),
    coherence: bool = typer.Option(True, help="Gradient coherence of each model."),
    report: bool = typer.Option(True, help="Draw the comparison report (index.html, figures/) in the output folder."),
    specs: SpecOptions = SpecOptions(),
    output: str = typer.Option("reports/compare", "-o", "--output", help="Folder for compare.h5, the report and "
                                                                        "each model's run file."),
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare solutions post hoc: the same analysis on every model, a ranked metrics table, loss and error
    barriers along the straight line between each pair (optionally after weight matching), Bezier curves.
    """
    from landscape.analyses.coherence import CoherenceSettings
    from landscape.analyses.compare import ORDER_NOTE, CompareConfig, prepare_compare, run_compare
    from landscape.analyses.hessian import CurvatureSettings

    with command_errors(debug):
        scan_cfg = base_config(
            "", specs, None, steps=parse_steps(steps),
            curvature=CurvatureSettings(seed=specs.seed) if hessian else None,
            sharpness=default_sharpness(specs.seed) if sharpness else (),
            coherence=CoherenceSettings(noise_samples=16, seed=specs.seed) if coherence else None)
        cfg = CompareConfig(inputs=tuple(inputs), scan=scan_cfg, output=output, align=align, curve=curve,
                            alpha_range=parse_range(alpha_range), alpha_steps=alpha_steps, bezier_steps=bezier_steps)
        with err_console.status("loading checkpoints, models and data", spinner="dots"):
            prepared = prepare_compare(cfg)
        with progress_bars() as progress:
            summary = run_compare(cfg, progress=progress, prepared=prepared)
        drawn = draw_report(summary.path, report)
        if json_out:
            out = summary.to_json()
            out["report"] = str(drawn.html) if drawn else None
            print(json.dumps(nan_to_none(out), indent=2))
            return
        t = Table(title=f"comparison: {summary.path} ({ORDER_NOTE})")
        t.add_column("metric")
        for m in summary.models:
            t.add_column(Text(m))
        for k, d in summary.metrics.items():
            t.add_row(f"{k} ({d['order']})", *(fmt(v) + (f" ± {e:.2g}" if e is not None and math.isfinite(e) else "") + f" ({r})"
                           for v, e, r in zip(d["value"], d["stderr"], d["rank"])))
        out_console.print(t)
        t = Table(title="linear interpolation barriers" + (" (after weight matching; before in brackets)"
                                                           if align else ""))
        for c_ in ("pair", "loss barrier", "error barrier") + (("Bezier max loss",) if curve else ()):
            t.add_column(c_)
        for key, p in summary.pairs.items():
            i, j = (int(x) for x in key.split("_"))
            before = (lambda k: f" ({p[k + '_unaligned']:.4g})") if align else (lambda k: "")
            t.add_row(Text(f"{summary.models[i]} - {summary.models[j]}"), f"{p['loss_barrier']:.4g}" + before("loss_barrier"),
                      f"{p['error_barrier']:.4g}" + before("error_barrier"),
                      *((f"{p['bezier_max_loss']:.4g}",) if curve else ()))
        out_console.print(t)
        if drawn:
            out_console.print(Text(f"report: {drawn.html}"))
