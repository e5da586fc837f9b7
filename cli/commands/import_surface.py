"""``landscape import-surface``: a loss-landscape surface file as a run file."""

from __future__ import annotations

import typer
from rich.text import Text

from ..app import app, command_errors, out_console


@app.command("import-surface", epilog="Example:\n\n  landscape import-surface old/model.h5_[-1.0,1.0,51]x[-1.0,1.0,51].h5 "
                                       "-o reports/old/run.h5")
def import_surface(
    surface_file: str = typer.Argument(..., help="A surface file of the original loss-landscape code."),
    output: str = typer.Option(..., "-o", "--output", help="Run file to write."),
    name: str = typer.Option("imported", help="Slice name in the run file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run file."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Convert a loss-landscape surface file (\\[y, x] order) into a run file (\\[x, y] order)."""
    from landscape.io.importers import import_loss_landscape

    with command_errors(debug):
        path = import_loss_landscape(surface_file, output, name=name, overwrite=overwrite)
        out_console.print(Text(f"wrote {path}"))
