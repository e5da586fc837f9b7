"""``landscape report``: figures and the interactive page drawn from a run file."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.text import Text

from ..app import IN_PROGRESS, app, command_errors, err_console, out_console
from ..options import DebugOpt, JsonOpt


@app.command("report", epilog="Examples:\n\n  landscape report reports/mlp_sgd_s2000/run.h5\n\n"
                              "  landscape report run.h5 -o paper/figs --format pdf,svg --levels log\n\n"
                              "  landscape report run.h5 --format html --json")
def report_cmd(
    run_file: str = typer.Argument(..., help="A run file written by landscape."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Directory for index.html and figures/ "
                                                                      "(default: the run file's directory)."),
    format_: str = typer.Option("png,html", "--format", help="Comma-separated: png, pdf, svg (static figures) "
                                                             "and html (the interactive page)."),
    levels: str = typer.Option("auto", help="Contour levels: auto (log-spaced when the loss spans more than two "
                                            "decades), log or linear."),
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Draw static figures and one self-contained interactive HTML page from a run file alone.

    Needs neither the model nor the data: a report can be re-drawn anywhere the run file is.
    """
    from landscape.report import render_report
    from landscape.io.runfile import writer_active

    with command_errors(debug):
        if writer_active(run_file):
            err_console.print(Text(IN_PROGRESS.format(run_file)))
        with err_console.status("drawing the report", spinner="dots"):
            drawn = render_report(run_file, output, formats=format_, levels=levels)
        if json_out:
            print(json.dumps({"directory": str(drawn.directory), "html": str(drawn.html) if drawn.html else None,
                              "html_bytes": drawn.html_bytes, "figures": [str(p) for p in drawn.figures]}, indent=2))
            return
        if drawn.html:
            out_console.print(Text(f"wrote {drawn.html} ({drawn.html_bytes / 2**20:.1f} MB, self-contained)"))
        if drawn.figures:
            out_console.print(Text(f"wrote {len(drawn.figures)} figures in {drawn.figures[0].parent}"))
