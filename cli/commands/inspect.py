"""``landscape inspect``: a run file's attributes and scalar results."""

from __future__ import annotations

import json

import typer
from rich.table import Table
from rich.text import Text

from ..app import IN_PROGRESS, app, command_errors, err_console, out_console
from ..printing import nan_to_none


@app.command(epilog="Examples:\n\n  landscape inspect reports/mlp_sgd_s2000/run.h5\n\n"
                    "  landscape inspect reports/mlp_sgd_s2000/run.h5 --json | jq .attrs.checkpoint_sha256")
def inspect(
    run_file: str = typer.Argument(..., help="A run file written by landscape."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Print every attribute and scalar result of a run file."""
    from landscape.io.runfile import describe

    with command_errors(debug):
        info = describe(run_file)
        if info["in_progress"]:
            err_console.print(Text(IN_PROGRESS.format(run_file)))
        if json_out:
            print(json.dumps(nan_to_none(info), indent=2, default=str))
            return
        t = Table(title=f"{run_file}", show_header=False)
        for k, v in info["attrs"].items():
            t.add_row(Text(k), Text(json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
        out_console.print(t)
        for gname, g in info["groups"].items():
            t = Table(title=gname, show_header=False)
            for k, v in g["attrs"].items():
                t.add_row(Text(k), Text(str(v)))
            for k, v in g["datasets"].items():
                t.add_row(Text(k), Text(str(v)))
            out_console.print(t)
