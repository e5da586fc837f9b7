"""The ``landscape`` command: the app (``cli/app.py``) with every command of ``cli/commands/`` registered, its help
reflowed, and library warnings shown as one line."""

from __future__ import annotations

import sys
from inspect import cleandoc
from typing import Any, Optional

from rich.text import Text

from . import commands  # importing them registers the commands
from .app import app, err_console

__all__ = ["app", "commands", "main"]


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    """Library warnings as one line on stderr, without the source location."""
    err_console.print(Text(f"warning: {message}"), soft_wrap=True)


def _reflow(doc: str) -> str:
    """A docstring as help text that reads like a man page: each paragraph one line, for the terminal to wrap
    (typer's rich mode keeps a docstring's line breaks, which broke summaries mid-sentence); indented blocks
    (examples) keep theirs."""
    paragraphs = cleandoc(doc).split("\n\n")
    return "\n\n".join(p if any(line.startswith(" ") for line in p.splitlines()) else " ".join(p.split("\n"))
                       for p in paragraphs)


def _man_page_help() -> None:
    """Every command's help reflowed (:func:`_reflow`), and no value type shown for flags (typer >= 0.29 lists
    ``--version <bool>``; a flag takes no value)."""
    for info in app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = _reflow(doc)
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None and not getattr(shown, "flags_untyped", False):
        def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
            return None if self.is_flag else shown(self, ctx)

        display_type_rich.flags_untyped = True  # type: ignore[attr-defined]
        TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


def main() -> None:
    import warnings

    warnings.showwarning = _show_warning
    _man_page_help()
    app(prog_name="landscape")


if __name__ == "__main__":
    sys.exit(main())
