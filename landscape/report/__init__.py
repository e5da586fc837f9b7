"""Reports drawn from a run file alone: static matplotlib figures and one interactive HTML page.

``render_report(run_file)`` writes ``index.html`` and ``figures/*.png`` next to the run file (or in
``out_dir``); see :mod:`.figures` and :mod:`.interactive` for what each holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import LandscapeError
from ..io.runfile import replace_atomically
from .contents import RunContents

#: Output formats ``render_report`` knows: static figure formats, and ``html`` for the interactive page.
FORMATS = ("png", "pdf", "svg", "html")


@dataclass(frozen=True)
class Report:
    """What :func:`render_report` wrote."""

    directory: Path
    figures: tuple[Path, ...]
    html: Path | None

    @property
    def html_bytes(self) -> int:
        return self.html.stat().st_size if self.html is not None else 0


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,html"`` (or a sequence) as a checked tuple of formats."""
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise LandscapeError(f"unknown report format {', '.join(bad) or '(none)'}",
                             hint=f"use a comma-separated list of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def render_report(run_file: str | Path, out_dir: str | Path | None = None, *,
                  formats: str | Sequence[str] = ("png", "html"), levels: str = "auto") -> Report:
    """Draw the report of ``run_file`` into ``out_dir`` (default: the run file's folder).

    Writes ``figures/<name>.<fmt>`` for each static format and ``index.html`` for ``html``;
    ``levels`` spaces contour levels (``auto``, ``log`` or ``linear``). Needs nothing but the run file.
    """
    import matplotlib

    from .figures import LEVELS, all_figures, write_figures

    if levels not in LEVELS:
        raise LandscapeError(f"--levels {levels!r} is unknown", hint=f"use one of {', '.join(LEVELS)}")
    fmts = parse_formats(formats)
    run = RunContents.read(run_file)
    directory = Path(out_dir) if out_dir is not None else run.path.parent
    directory.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    static = [f for f in fmts if f != "html"]
    if static:
        with matplotlib.rc_context({"font.size": 10, "svg.hashsalt": "landscape"}):
            figs = all_figures(run, levels=levels)
            figures = write_figures(figs, directory / "figures", static)
    html_path = None
    if "html" in fmts:
        from plotly.offline import get_plotlyjs

        from .interactive import render_html

        html_path = directory / "index.html"
        page = render_html(run, get_plotlyjs())
        replace_atomically(html_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return Report(directory=directory, figures=tuple(figures), html=html_path)
