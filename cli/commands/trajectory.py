"""``landscape trajectory``: training dynamics over checkpoints."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from ..app import app, command_errors, out_console
from ..options import DebugOpt, JsonOpt, SpecOptions, spec_options
from ..printing import fmt, nan_to_none, percent
from ..running import base_config, draw_report, progress_bars


@app.command(epilog="Examples:\n\n"
                    "  landscape trajectory data/examples/mlp_sgd_s0000.pt data/examples/mlp_sgd_s0100.pt "
                    "data/examples/mlp_sgd_s0500.pt data/examples/mlp_sgd_s2000.pt\n\n"
                    "  landscape trajectory runs/ckpts/ -o reports/run7 --plane-steps 31\n\n"
                    "  landscape trajectory ckpts/*.pt --json | jq .edge_of_stability")
@spec_options
def trajectory(
    inputs: list[str] = typer.Argument(..., help="Checkpoints of one training run, or a folder of them; ordered "
                                                 "by their recorded step."),
    plane_steps: int = typer.Option(21, help="Points per axis of the loss in the PCA plane."),
    report: bool = typer.Option(True, help="Draw the report (index.html, figures/) next to trajectory.h5."),
    specs: SpecOptions = SpecOptions(),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="trajectory.h5 or its folder (default: "
                                                                      "reports/trajectory_<final checkpoint>)."),
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Training dynamics over checkpoints: the path in its PCA plane over the loss there, sharpness against the
    stability threshold 2/lr (momentum, Adam: preconditioned) with edge-of-stability flags, distances, norms.
    """
    from landscape.analyses.trajectory import TrajectoryConfig, run_trajectory

    with command_errors(debug):
        scan_cfg = base_config("", specs, None)
        cfg = TrajectoryConfig(inputs=tuple(inputs), scan=scan_cfg, output=output, plane_steps=plane_steps)
        with progress_bars() as progress:
            path, res = run_trajectory(cfg, progress=progress)
        drawn = draw_report(path, report)
        rows = [{"checkpoint": n, "step": int(st_), "lr": lr, "sharpness": sh, "kind": k, "threshold": th,
                 "ratio": r, "edge_of_stability": bool(e), "distance": d}
                for n, st_, lr, sh, k, th, r, e, d in zip(res.names, res.step, res.lr, res.sharpness,
                                                         res.sharpness_kind, res.threshold, res.ratio,
                                                         res.edge_of_stability, res.distance)]
        if json_out:
            print(json.dumps(nan_to_none({"trajectory_file": path, "checkpoints": rows,
                                           "explained_variance": res.pca.explained_variance[:2].tolist(),
                                           "edge_of_stability": bool(res.edge_of_stability.any()),
                                           "report": str(drawn.html) if drawn else None}), indent=2, default=float))
            return
        t = Table(title=f"trajectory: {path} (PCA plane explains "
                        f"{percent(float(res.pca.explained_variance[:2].sum()))} of the path's variance)")
        for c_ in ("checkpoint", "step", "lr", "sharpness", "threshold", "ratio", "EoS", "distance"):
            t.add_column(c_)
        for r in rows:
            t.add_row(Text(r["checkpoint"]), str(r["step"]), fmt(r["lr"]),
                      fmt(r["sharpness"]) + (" (precond.)" if r["kind"] == "preconditioned" else ""),
                      fmt(r["threshold"]), fmt(r["ratio"]), "yes" if r["edge_of_stability"] else "",
                      fmt(r["distance"]))
        out_console.print(t)
        if drawn:
            out_console.print(Text(f"report: {drawn.html}"))
