"""The ``landscape`` application object, its consoles, and the error handling every command runs under.

Errors in the user's input are one line on stderr and exit code 2; ``--debug`` shows the traceback. Progress bars
go to stderr, so ``--json`` output on stdout stays clean. The commands register themselves on :data:`app` (one
module each in ``cli/commands/``); ``cli/main.py`` assembles them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.text import Text

from landscape import __version__
from landscape.errors import LandscapeError

#: Width of a console that is not a terminal (a pipe, a file, a cluster log): wide enough that no table is cut.
PIPE_WIDTH = 10_000
#: What ``report`` and ``inspect`` say of a run file a scan is still writing.
IN_PROGRESS = "note: {} is in progress (a scan is writing it): this is its last saved state"
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)
out_console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)

app = typer.Typer(
    name="landscape",
    help="Look inside trained PyTorch checkpoints: loss slices, curvature, sharpness, gradient coherence.",
    epilog="Examples:\n\n"
           "  landscape scan data/examples/mlp_sgd_s2000.pt\n\n"
           "  landscape scan ckpt.pt --model mypkg.models:resnet20 --data mypkg.data:cifar_subset --loss cross_entropy\n\n"
           "  landscape compare data/examples/mlp_sgd_s2000.pt data/examples/mlp_adam_s2000.pt --align\n\n"
           "  landscape report reports/mlp_sgd_s2000/run.h5 --format pdf\n\n"
           "  landscape inspect reports/mlp_sgd_s2000/run.h5 --json\n\n"
           "  torchrun --nproc-per-node 2 -m landscape scan ckpt.pt   # shared out over 2 processes (docs/scaling.md)",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"landscape {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Look inside trained PyTorch checkpoints."""


@contextmanager
def command_errors(debug: bool) -> Iterator[None]:
    """One line and exit 2 for bad input; exit 1 for a bug; tracebacks only with --debug. Under torchrun, a command
    that succeeded on this rank leaves the job with the others (:func:`landscape.runtime.distributed.leave_job`). The
    command runs with freed memory reused (:func:`landscape.runtime.allocator.reuse_freed_memory`): the process is ours."""
    from landscape.runtime.allocator import reuse_freed_memory
    from landscape.runtime.distributed import leave_job

    try:
        with reuse_freed_memory():
            yield
        leave_job()
    except LandscapeError as err:
        if debug:
            raise
        _report_error(f"error: {err}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; finished points are saved, continue with --resume")
        raise typer.Exit(130) from None
    except (typer.Exit, SystemExit):
        raise
    except BrokenPipeError:  # the reader of the output left (``| head``): quiet, as Unix tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        raise typer.Exit(141) from None
    except Exception as err:
        if debug:
            raise
        if _disk_full(err):
            _report_error("error: no space left on the device: the run file keeps what was saved before; free some "
                          "space (or write elsewhere with -o) and run the command again (a scan continues with "
                          "--resume)")
            raise typer.Exit(2) from None
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _report_error(f"error: unexpected {type(err).__name__}: {msg} (this is a bug in landscape; "
                      "re-run with --debug for the traceback and report it)")
        raise typer.Exit(1) from None


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a full disk: ENOSPC or EDQUOT, or h5py's message for them."""
    import errno

    while err is not None:
        if isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _report_error(line: str) -> None:
    """Print the one error line. Under torchrun rank 0 speaks for the job; another rank prints its own (marked with
    its rank) after a pause, which torchrun cuts short when rank 0 failed the same way and exited first."""
    import os
    import time

    from landscape.runtime.distributed import current

    comm = current()
    rank = comm.rank if comm.active else int(os.environ.get("RANK", "0"))  # also before the job was joined
    if rank == 0:
        err_console.print(Text(line), soft_wrap=True)
        return
    time.sleep(3)
    Console(stderr=True).print(Text(f"rank {rank}: {line}"), soft_wrap=True)
