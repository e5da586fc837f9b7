"""The ``landscape`` command: a thin typer front end over the library.

Errors in the user's input are one line on stderr and exit code 2; ``--debug`` shows the
traceback. Progress bars go to stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from inspect import cleandoc
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from landscape import __version__
from landscape.errors import LandscapeError

from .options import SpecOptions, spec_options

#: Width of a console that is not a terminal (a pipe, a file, a cluster log): wide enough that no table is cut.
PIPE_WIDTH = 10_000
#: What ``report`` and ``inspect`` say of a run file a scan is still writing.
IN_PROGRESS = "note: {} is in progress (a scan is writing it): this is its last saved state"
#: Seconds between two plain progress lines of one phase when stderr is not a terminal.
PLAIN_PROGRESS_SECONDS = 10.0
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
def _errors(debug: bool) -> Iterator[None]:
    """One line and exit 2 for bad input; exit 1 for a bug; tracebacks only with --debug. Under torchrun, a command
    that succeeded on this rank leaves the job with the others (:func:`landscape.distributed.leave_job`). The
    command runs with freed memory reused (:func:`landscape.allocator.reuse_freed_memory`): the process is ours."""
    from landscape.allocator import reuse_freed_memory
    from landscape.distributed import leave_job

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

    from landscape.distributed import current

    comm = current()
    rank = comm.rank if comm.active else int(os.environ.get("RANK", "0"))  # also before the job was joined
    if rank == 0:
        err_console.print(Text(line), soft_wrap=True)
        return
    time.sleep(3)
    Console(stderr=True).print(Text(f"rank {rank}: {line}"), soft_wrap=True)


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} pts/s" if task.speed else "", style="progress.data.speed")


def _parse_range(text: str) -> tuple[float, float]:
    parts = text.replace(":", ",").split(",")
    try:
        vals = [float(p) for p in parts if p.strip()]
    except ValueError:
        raise LandscapeError(f"--range {text!r} is not a number or MIN,MAX", hint="e.g. --range 1 or --range=-0.5,1.5")
    if len(vals) == 1:
        return (-abs(vals[0]), abs(vals[0]))
    if len(vals) == 2:
        return (vals[0], vals[1])
    raise LandscapeError(f"--range {text!r} is not a number or MIN,MAX", hint="e.g. --range 1 or --range=-0.5,1.5")


def _parse_metric(text: str) -> tuple[str, str]:
    name, sep, target = text.partition("=")
    if not sep or not name or ":" not in target:
        raise LandscapeError(f"--metric {text!r} is not name=module:callable", hint="e.g. --metric nll=mypkg.metrics:nll")
    return name.strip(), target.strip()


def _parse_workers(text: str) -> int | str:
    """``auto`` or a positive number of blocks evaluated at once.

    >>> _parse_workers("auto"), _parse_workers("2")
    ('auto', 2)
    """
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise LandscapeError(f"--workers {text!r} is neither auto nor a positive number", hint="use --workers auto or 2")


def _parse_bytes(text: Optional[str]) -> Optional[float]:
    """``4GB``, ``512MiB``, ``2e9`` -> bytes.

    >>> _parse_bytes("1.5GiB"), _parse_bytes("256MB"), _parse_bytes("1000")
    (1610612736.0, 256000000.0, 1000.0)
    """
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    try:
        value = float(m.group(1)) if m else -1.0
    except ValueError:
        value = -1.0
    if m is None or value <= 0:
        raise LandscapeError(f"--memory-budget {text!r} is not a size", hint="e.g. 512MiB, 4GB or 2e9 (bytes)")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return value * (1024.0 if m.group(3) else 1000.0) ** power


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise LandscapeError(f"--steps {text!r} is not N or NXxNY", hint="e.g. --steps 51 or --steps 41x31")
    return vals


# Options of several commands, declared once (the model/data/loss options: cli/options.py).
CheckpointArg = Annotated[str, typer.Argument(help="Checkpoint file (.pt, .pth, .ckpt, .safetensors) or a "
                                                   "save_pretrained folder (config.json + weights).")]
MetricOpt = Annotated[Optional[list[str]], typer.Option("--metric", help="Extra metric name=module:callable, called "
                                                                         "as f(output, target) -> batch mean; repeatable.")]
StreamOpt = Annotated[str, typer.Option(help="Inputs read from disk a chunk at a time, for data larger than memory: "
                                             "on, off, or auto (when they would fill a quarter of memory). .h5 and "
                                             ".pt data files, map-style datasets.")]
OutputOpt = Annotated[Optional[str], typer.Option("-o", "--output", help="Run file or directory (default: "
                                                                          "reports/<checkpoint stem>/run.h5).")]
SaveVectorsOpt = Annotated[Optional[bool], typer.Option(
    "--save-vectors/--no-save-vectors", help="Store long vectors in the run file: random and interpolation "
                                             "directions, Hessian eigenvectors, per-parameter GSNR (default: only "
                                             "for models of at most 1M parameters; Hessian slices' directions are "
                                             "always stored).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _base_config(checkpoint: str, specs: SpecOptions, output: Optional[str], metric: Optional[list[str]] = None,
                 **rest: Any) -> Any:
    """The ScanConfig for the shared options (cli/options.py) and ``output``; ``rest`` sets the others."""
    from landscape.scan import ScanConfig
    from landscape.specs import Spec, parse_kv

    if specs.dtype not in (None, "float32", "float64"):
        raise LandscapeError(f"--dtype {specs.dtype!r} is unknown", hint="use float32 or float64")
    if specs.model is None and specs.model_arg:
        raise LandscapeError("--model-arg needs --model", hint="name the model factory with --model")
    if specs.data is None and specs.data_arg:
        raise LandscapeError("--data-arg needs --data", hint="name the data with --data")
    if specs.bn not in ("frozen", "recompute"):
        raise LandscapeError(f"--bn {specs.bn!r} is unknown", hint="use --bn frozen or --bn recompute")
    _join_job(specs.device)
    return ScanConfig(
        checkpoint=checkpoint,
        model=Spec(specs.model, parse_kv(specs.model_arg, "--model-arg")) if specs.model else None,
        data=Spec(specs.data, parse_kv(specs.data_arg, "--data-arg")) if specs.data else None,
        loss=specs.loss, metrics=tuple(_parse_metric(m) for m in metric or ()), state_key=specs.state_key,
        trust_pickle=specs.trust_pickle, strict=specs.strict, max_samples=specs.max_samples, seed=specs.seed,
        batch_size=specs.batch_size, device=specs.device, dtype=specs.dtype, bn=specs.bn, output=output,
        memory_budget=_parse_bytes(specs.memory_budget), hvp=specs.hvp, **rest)


def _join_job(device: str) -> None:
    """Under torchrun, join the job (gloo on CPU, NCCL on GPU); only rank 0 prints, draws and writes."""
    import os

    from landscape.distributed import init_from_env

    if not init_from_env(device).is_writer:
        err_console.quiet = out_console.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def _plain_progress() -> Any:
    """The library's ``progress(name, done, total)`` callback for a stderr that is not a terminal (nohup, CI, a
    cluster job): a plain line when a phase starts, when it ends, and in between at most every
    :data:`PLAIN_PROGRESS_SECONDS`: phase, done/total, elapsed time, ETA."""
    import time

    started: dict[str, float] = {}
    printed: dict[str, float] = {}

    def progress(name: str, done: int, total: int) -> None:
        now = time.monotonic()
        t0 = started.setdefault(name, now)
        if total == 0:
            line = f"{name} ..."
        elif name in printed and done < total and now - printed[name] < PLAIN_PROGRESS_SECONDS:
            return
        else:
            elapsed = now - t0
            eta = f", ETA {elapsed / done * (total - done):.1f} s" if 0 < done < total else ""
            line = f"{name}: {done}/{total}, {elapsed:.1f} s elapsed{eta}"
        printed[name] = now
        err_console.print(Text(line), soft_wrap=True)

    return progress


@contextmanager
def _progress_bars() -> Iterator[Any]:
    """Rich progress bars on stderr (plain lines when it is not a terminal, :func:`_plain_progress`); yields the
    library's ``progress(name, done, total)`` callback.

    A call with ``total`` 0 is a step without a count (a curvature step, a pair to connect): a spinner that is
    marked done when the next such step starts, or at the end.
    """
    if not err_console.is_terminal:
        yield _plain_progress()
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=False) as prog:
        tasks: dict[str, Any] = {}
        steps: list[Any] = []

        def progress(name: str, done: int, total: int) -> None:
            if total == 0:
                for t in steps:
                    prog.update(t, total=1, completed=1)
                steps.append(prog.add_task(name, total=None))
                return
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=total, completed=done)
            prog.update(tasks[name], completed=done)

        yield progress
        for t in steps:
            prog.update(t, total=1, completed=1)


def _run_with_progress(config: Any, st: Any) -> Any:
    from landscape.scan import run_scan

    with _progress_bars() as progress:
        return run_scan(config, progress=progress, prepared=st)


def _draw_report(run_file: str, when: Optional[bool]) -> Any:
    """Draw the report next to ``run_file``: always (True), never (False), or only over one already there (None)."""
    from pathlib import Path

    from landscape.distributed import current
    from landscape.report import render_report

    directory = Path(run_file).parent
    if not current().is_writer or not (when or (when is None and (directory / "index.html").exists())):
        return None
    with err_console.status("drawing the report", spinner="dots"):
        return render_report(run_file, directory)


def _run_and_print(config: Any, st: Any, json_out: bool, *, report: Optional[bool]) -> Any:
    """Run ``config`` with progress bars, draw the report, print the summary (or JSON).

    ``report``: True draws ``index.html`` and ``figures/*.png`` next to the run file, False does not,
    None redraws them only where a report is already there (so it never goes stale).
    """
    summary = _run_with_progress(config, st)
    drawn = _draw_report(summary.run_file, report)
    if json_out:
        out = summary.to_json()
        out["report"] = str(drawn.html) if drawn else None
        print(json.dumps(_nan_to_none(out), indent=2))
    else:
        _print_summary(summary)
        if drawn:
            out_console.print(Text(f"report: {drawn.html} ({drawn.html_bytes / 2**20:.1f} MB) and "
                                   f"{len(drawn.figures)} figures in {drawn.directory / 'figures'}"))
    return summary


@app.command(epilog="Examples:\n\n"
                    "  landscape scan data/examples/cnn_adam_s2000.pt\n\n"
                    "  landscape scan ckpt.pt --model pkg.models:Net --model-arg width=64 --data digits --max-samples 500\n\n"
                    "  landscape scan a.pt --interpolate b.pt --dims 1 --steps 101\n\n"
                    "  landscape scan ckpt.pt --data big.h5 --stream on   # inputs read from disk by chunks\n\n"
                    "  landscape scan ckpt.pt --dry-run")
@spec_options
def scan(
    checkpoint: CheckpointArg,
    specs: SpecOptions = SpecOptions(),
    metric: MetricOpt = None,
    dims: int = typer.Option(2, help="1 or 2 random directions."),
    steps: str = typer.Option("51", help="Points per axis: N, or NXxNY for a non-square grid."),
    range_: str = typer.Option("1", "--range", help="Axis range: R for [-R, R], or MIN,MAX (write --range=-0.5,1.5)."),
    y_range: Optional[str] = typer.Option(None, "--y-range", help="Range of the second axis (default: --range)."),
    norm: str = typer.Option("filter", help="Direction normalization: filter, layer or none."),
    ignore: str = typer.Option("biasbn", help="Zero directions for biases and BatchNorm (biasbn) or keep them (none)."),
    orthogonalize: bool = typer.Option(False, help="Orthogonalize the second direction against the first."),
    directions: str = typer.Option("random", help="random (Gaussian, normalized by --norm), hessian (top Hessian "
                                                  "eigenvectors, unit norm) or hessian-bottom (top and bottom)."),
    interpolate: Optional[str] = typer.Option(None, help="Second checkpoint: add a 1D slice from this one to it."),
    name: Optional[str] = typer.Option(None, help="Name of the random slice in the run file."),
    hessian: bool = typer.Option(True, help="Also compute the Hessian's top-5 eigenvalues and trace."),
    sharpness: bool = typer.Option(True, help="Also compute the default sharpness set (worst- and average-case "
                                              "adaptive L2, SAM, ASAM, magnitude-aware PAC-Bayes, basin width)."),
    coherence: bool = typer.Option(True, help="Also compute gradient coherence and noise scales (no control, "
                                              "B_noise from 16 samples)."),
    report: bool = typer.Option(True, help="Draw the report (index.html and figures/*.png) next to the run file."),
    bn_batches: int = typer.Option(10, help="Batches used to recompute BatchNorm statistics."),
    stream: StreamOpt = "auto",
    strategy: str = typer.Option("auto", help="Evaluation strategy: auto (measured), inplace or vmap."),
    workers: str = typer.Option("auto", help="In-place slice blocks evaluated at once on a CPU, on model copies with "
                                             "one thread each: auto (measured) or a number (1: one block at a time "
                                             "on all threads)."),
    precision: str = typer.Option("full", help="Forward passes of slice points: full, bf16 (autocast) or tf32 (CUDA); "
                                               "the error is measured on 64 grid points and stored with the slice."),
    output: OutputOpt = None,
    resume: bool = typer.Option(False, "--resume", help="Continue an existing run file, computing only missing points."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run file."),
    save_every: float = typer.Option(30.0, "--save-every", help="Merge finished points into the run file at least "
                                                                "this often (seconds); they are journaled at once."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print forward passes, time and memory estimates; compute nothing."),
    save_vectors: SaveVectorsOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Scan the loss landscape around a checkpoint and write a run file.

    With no options, a self-describing checkpoint (see landscape.save_checkpoint) gets a
    51x51 filter-normalized 2D slice on [-1, 1], the Hessian's top-5 eigenvalues and
    trace, the default sharpness set and gradient coherence, written to reports/<name>/run.h5,
    with a report beside it (index.html, figures/*.png; --no-report skips it).
    """
    from landscape.coherence import CoherenceSettings
    from landscape.hessian import CurvatureSettings
    from landscape.scan import estimate, setup

    with _errors(debug):
        if resume and overwrite:
            raise LandscapeError("--resume and --overwrite contradict each other", hint="pick one")
        config = _base_config(
            checkpoint, specs, output, metric, stream=stream, bn_batches=bn_batches, strategy=strategy,
            workers=_parse_workers(workers),
            precision=precision,
            dims=dims,
            steps=_parse_steps(steps), range=_parse_range(range_), y_range=_parse_range(y_range) if y_range else None,
            norm=norm, ignore=ignore, orthogonalize=orthogonalize, directions=directions, interpolate=interpolate, name=name, resume=resume,
            overwrite=overwrite, compact_every=save_every, save_vectors=save_vectors,
            curvature=CurvatureSettings(seed=specs.seed) if hessian else None,
            sharpness=_default_sharpness(specs.seed) if sharpness else (),
            coherence=CoherenceSettings(noise_samples=16, seed=specs.seed) if coherence else None)
        with err_console.status("loading checkpoint, model and data", spinner="dots"):
            st = setup(config)
        if dry_run:
            est = estimate(config, st)
            if json_out:
                print(json.dumps(est.to_json(), indent=2))
                return
            t = Table(title=f"dry run: {checkpoint}", show_header=False)
            t.add_row("parameters", f"{est.n_parameters:,}")
            t.add_row("samples", f"{est.n_samples:,}")
            t.add_row("grid points", f"{est.points:,}")
            t.add_row("forward passes", f"{est.forward_passes:,}")
            t.add_row("strategy", est.strategy + (f", {est.workers} blocks at once" if est.workers > 1 else ""))
            t.add_row("time per point", f"{est.seconds_per_point * 1e3:.2f} ms")
            ranks = f" ({est.ranks} ranks)" if est.ranks > 1 else ""
            for phase, p in est.phases.items():
                t.add_row(f"{phase}", f"{p['seconds']:.1f} s{ranks if phase == 'slices' else ''}, peak "
                                      f"{p['peak_bytes'] / 2**20:,.0f} MiB")
            t.add_row("estimated time, total", f"{est.total_seconds:.1f} s")
            t.add_row("peak memory", f"{est.memory_bytes / 2**20:,.0f} MiB ({est.memory_note}; memory budget "
                                     f"{est.memory_budget / 2**20:,.0f} MiB)")
            out_console.print(t)
            return
        _run_and_print(config, st, json_out, report=report)


@app.command(epilog="Examples:\n\n"
                    "  landscape hessian data/examples/mlp_sgd_s2000.pt --top-k 10 --bottom-k 3 --density\n\n"
                    "  landscape hessian ckpt.pt --ggn --per-layer --dtype float64\n\n"
                    "  landscape hessian ckpt.pt --validity   # how far the quadratic model holds\n\n"
                    "  landscape hessian ckpt.pt --per-class --top-k 3   # each class's spectrum and density\n\n"
                    "  landscape hessian ckpt.pt --batch-sizes 8,32,128   # mini-batch against full-batch λmax\n\n"
                    "  landscape hessian ckpt.pt --parameters 'layer4.*' --trace-method hutchinson --trace-matvecs 300\n\n"
                    "  landscape hessian ckpt.pt --engine pyhessian --dtype float64   # PyHessian's numbers beside ours")
@spec_options
def hessian(
    checkpoint: CheckpointArg,
    top_k: int = typer.Option(5, help="Largest eigenvalues (Lanczos with full reorthogonalization)."),
    bottom_k: int = typer.Option(0, help="Smallest eigenvalues (negative curvature)."),
    trace: bool = typer.Option(True, help="Estimate the trace."),
    trace_method: str = typer.Option("auto", help="auto (lanczos-deflated with --top-k, else hutch++), "
                                                  "lanczos-deflated (the top-k's Lanczos basis and a third of the "
                                                  "budget in probes outside it), hutch++, hutchinson or "
                                                  "hutchinson-deflated (by the top-k eigenvectors)."),
    trace_matvecs: int = typer.Option(99, help="Matvec budget of the trace estimate (lanczos-deflated: a third "
                                               "of it, as the top-k's products stand in for the rest)."),
    trace_stderr: Optional[float] = typer.Option(None, help="Stop the trace's random probes (Hutchinson's, or "
                                                            "Hutch++'s residual ones) once the standard error is below "
                                                            "this."),
    density: bool = typer.Option(False, help="Spectral density by stochastic Lanczos quadrature."),
    density_probes: int = typer.Option(1, help="SLQ probe vectors."),
    density_steps: int = typer.Option(100, help="Lanczos steps per SLQ probe."),
    ggn: bool = typer.Option(False, "--ggn", help="The generalized Gauss-Newton matrix instead of the Hessian."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also the top eigenvalue and trace of each parameter."),
    parameters: Optional[list[str]] = typer.Option(None, "--parameters", help="Restrict to these parameter names or "
                                                                              "globs; repeatable."),
    tol: float = typer.Option(1e-6, help="Relative Ritz residual at which eigenpairs count as converged (or at the "
                                          "products' own rounding error, measured)."),
    max_hvp: int = typer.Option(400, help="Most Hessian-vector products for each Lanczos run (PyHessian: for each "
                                          "eigenvalue's power iteration)."),
    engine: str = typer.Option("landscape", help="landscape, or pyhessian: PyHessian's power iteration and trace as "
                                                 "a reference (top-k and trace only; written to /hessian_pyhessian)."),
    validity: bool = typer.Option(False, "--validity", help="The radius up to which the quadratic model predicts "
                                  "the loss within 10% (and 50%), along each top eigenvector, the bottom one and "
                                  "random filter-normalized directions (computes the bottom eigenvalue too)."),
    validity_random: int = typer.Option(2, help="Random directions for --validity."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Comma-separated mini-batch sizes, e.g. "
                                              "8,32,128: λmax and λmin of random batches of each size (mean ± "
                                              "stderr over --batch-draws) beside the full data's, and the fit "
                                              "λ_b ≈ λ_full + c/b."),
    batch_draws: int = typer.Option(5, help="Random batches per size for --batch-sizes."),
    per_class: bool = typer.Option(False, "--per-class", help="For each class, the top-k and bottom-k eigenvalues "
                                   "(--bottom-k, else --top-k of them) and the spectral density of the loss on "
                                   "that class's samples alone, with its negative mass (at least 3 SLQ probes)."),
    specs: SpecOptions = SpecOptions(),
    stream: StreamOpt = "auto",
    output: OutputOpt = None,
    save_vectors: SaveVectorsOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Hessian (or GGN) spectrum: top/bottom eigenvalues with residuals, trace with a standard error, density.

    Results go to /hessian (or /ggn) of the run file, added to an existing one (replacing an
    earlier curvature group of the same kind).
    """
    from landscape.hessian import CurvatureSettings
    from landscape.scan import setup

    with _errors(debug):
        if engine not in ("landscape", "pyhessian"):
            raise LandscapeError(f"--engine {engine!r} is unknown", hint="use landscape or pyhessian")
        if engine == "pyhessian" and (bottom_k or density or ggn or validity or per_class):
            raise LandscapeError("--engine pyhessian computes the Hessian's top-k eigenvalues and trace only",
                                 hint="drop --bottom-k/--density/--ggn/--validity/--per-class, or run them with "
                                      "--engine landscape")
        sizes = _int_list(batch_sizes, "--batch-sizes") if batch_sizes else ()
        if engine == "pyhessian" and sizes:
            raise LandscapeError("--engine pyhessian computes the Hessian's top-k eigenvalues and trace only",
                                 hint="drop --batch-sizes, or run it with --engine landscape")
        settings = CurvatureSettings(
            kind="ggn" if ggn else "hessian", top_k=top_k, bottom_k=bottom_k, tol=tol, max_hvp=max_hvp, trace=trace,
            trace_method=trace_method, trace_matvecs=trace_matvecs, trace_stderr=trace_stderr, density=density,
            density_probes=density_probes, density_steps=density_steps, per_layer=per_layer,
            parameters=tuple(parameters or ()), seed=specs.seed, engine=engine, validity=validity,
            validity_random=validity_random, per_class=per_class, batch_sizes=sizes, batch_draws=batch_draws)
        config = _base_config(checkpoint, specs, output, slices=False, resume=True, curvature=settings, stream=stream,
                              save_vectors=save_vectors)
        with err_console.status("loading checkpoint, model and data", spinner="dots"):
            st = setup(config)
        _run_and_print(config, st, json_out, report=None)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    """``"8,32,128"`` as integers; anything else is a one-line error naming ``option``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LandscapeError(f"{option} {text!r} is not a comma-separated list of integers",
                             hint=f"e.g. {option} 8,32,128") from None
    if any(v < 1 for v in values):
        raise LandscapeError(f"{option} {text!r} must be positive", hint=f"e.g. {option} 8,32,128")
    return values


def _default_sharpness(seed: int, **common: Any) -> tuple[Any, ...]:
    """The default sharpness set (``landscape.sharpness.DEFAULT_SET``) with ``common`` settings."""
    from landscape.sharpness import DEFAULT_SET, SharpnessSettings

    return tuple(SharpnessSettings(measure=m, adaptive=a, seed=seed, **common) for m, a in DEFAULT_SET)


@app.command(epilog="Examples:\n\n"
                    "  landscape sharpness data/examples/mlp_sam_s2000.pt\n\n"
                    "  landscape sharpness ckpt.pt --measure worst-case --norm linf --rho 0.001 --rho 0.002 --m 128\n\n"
                    "  landscape sharpness ckpt.pt --measure average-case --no-adaptive --rho 0.01 --draws 50\n\n"
                    "  landscape sharpness ckpt.pt --measure keskar --measure pacbayes --parameters '*bn*'")
@spec_options
def sharpness(
    checkpoint: CheckpointArg,
    measure: Optional[list[str]] = typer.Option(None, "--measure", help="worst-case, average-case, sam, asam, "
                                                "keskar, pacbayes, first-order or basin-width; repeatable (default: "
                                                "the set landscape scan computes)."),
    adaptive: Optional[bool] = typer.Option(None, "--adaptive/--no-adaptive", help="Scale perturbations by |w| "
                                            "(default: adaptive where the measure allows it)."),
    norm: str = typer.Option("l2", help="l2 or linf (worst-case, average-case)."),
    rho: Optional[list[float]] = typer.Option(None, "--rho", help="Radius (or eps, loss rise, error change: see "
                                              "docs/schema.md); repeatable for a sweep (default: per measure)."),
    m: int = typer.Option(128, "--m", help="Batch size of m-sharpness; 0 for the whole evaluation set."),
    steps: int = typer.Option(20, help="Ascent steps (worst-case, keskar, first-order)."),
    draws: int = typer.Option(10, help="Monte Carlo draws per batch (average-case) or per sigma (pacbayes)."),
    eta: float = typer.Option(0.01, help="ASAM's eta in T = |w| + eta."),
    parameters: Optional[list[str]] = typer.Option(None, "--parameters", help="Perturb only these parameter names "
                                                                              "or globs; repeatable."),
    specs: SpecOptions = SpecOptions(),
    stream: StreamOpt = "auto",
    output: OutputOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Sharpness of the minimum: worst- and average-case (adaptive, L2/Linf, m-sharpness), SAM/ASAM, Keskar,
    PAC-Bayes flatness, first-order flatness, basin width.

    Results go to /sharpness/<measure>[_adaptive]_<norm> of the run file, added to an existing
    one; a measure already there with the same settings is not recomputed. Sharpness
    tracks hyperparameters and predicts generalization only loosely: compare like with like.
    """
    from landscape.scan import setup
    from landscape.sharpness import SharpnessSettings

    with _errors(debug):
        if measure:
            settings = tuple(SharpnessSettings(
                measure=name, adaptive=True if adaptive is None else adaptive, norm=norm, rho=tuple(rho or ()),
                m=m or None, steps=steps, draws=draws, eta=eta, parameters=tuple(parameters or ()), seed=specs.seed)
                for name in measure)
        else:
            if rho or adaptive is not None:
                raise LandscapeError("--rho and --adaptive apply to a named measure", hint="add --measure NAME")
            settings = _default_sharpness(specs.seed, m=m or None, steps=steps, draws=draws, eta=eta,
                                          parameters=tuple(parameters or ()))
        for s_ in settings:
            s_.resolved()  # validate before loading anything
        config = _base_config(checkpoint, specs, output, slices=False, resume=True, sharpness=settings, stream=stream)
        with err_console.status("loading checkpoint, model and data", spinner="dots"):
            st = setup(config)
        _run_and_print(config, st, json_out, report=None)


@app.command(epilog="Examples:\n\n"
                    "  landscape coherence data/examples/mlp_sgd_s0000.pt --control shuffled-labels --per-class\n\n"
                    "  landscape coherence ckpt.pt --max-samples 2000 --sketch 512   # models too large for exact\n\n"
                    "  landscape coherence ckpt.pt --noise-samples 0 --json | jq .coherence.m_coherence")
@spec_options
def coherence(
    checkpoint: CheckpointArg,
    per_class: bool = typer.Option(False, "--per-class", help="Also print per-class m-coherence and the class "
                                                              "cosine (stiffness) matrix; always stored."),
    control: Optional[str] = typer.Option(None, help="shuffled-labels: the same metrics with permuted labels, "
                                                     "stored under /coherence/control."),
    sketch: int = typer.Option(0, help="Random-projection sketch of K dimensions instead of exact per-sample "
                                       "gradients (relative error about sqrt(2/K); no GSNR, no B_noise)."),
    noise_samples: int = typer.Option(32, help="Samples (one Hessian-vector product each) for B_noise; 0: skip."),
    batch_sizes: str = typer.Option("1,8,32,128,512", help="Batch sizes of the minibatch-to-full-gradient cosine."),
    batch_repeats: int = typer.Option(16, help="Random disjoint batches per batch size."),
    specs: SpecOptions = SpecOptions(),
    stream: StreamOpt = "auto",
    output: OutputOpt = None,
    save_vectors: SaveVectorsOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-sample gradient coherence and noise: m-coherence, stiffness, GSNR, B_simple and B_noise, minibatch
    alignment, and GraNd/EL2N scores for every sample (to prune data with).

    Results go to /coherence of the run file, added to an existing one. The shuffled-label
    control is most telling early in training: at a checkpoint fitted to the real labels,
    shuffled labels have a large loss and large, aligned gradients.
    """
    from landscape.coherence import CoherenceSettings
    from landscape.scan import setup

    with _errors(debug):
        if control not in (None, "shuffled-labels"):
            raise LandscapeError(f"--control {control!r} is unknown", hint="use --control shuffled-labels")
        sizes = _int_list(batch_sizes, "--batch-sizes")
        settings = CoherenceSettings(sketch=sketch, noise_samples=noise_samples, batch_sizes=sizes,
                                     batch_repeats=batch_repeats, control=control is not None,
                                     seed=specs.seed).resolved()
        config = _base_config(checkpoint, specs, output, slices=False, resume=True, coherence=settings,
                              stream=stream, save_vectors=save_vectors)
        with err_console.status("loading checkpoint, model and data", spinner="dots"):
            st = setup(config)
        summary = _run_and_print(config, st, json_out, report=None)
        if per_class and not json_out:
            _print_classes(summary.run_file)


def _print_classes(run_file: str) -> None:
    import h5py

    with h5py.File(run_file, "r") as f:
        g = f["coherence"]
        count, mcoh, cos = g["class_count"][()], g["class_m_coherence"][()], g["class_cosine"][()]
    t = Table(title="per class: m-coherence (m-coh) and mean gradient cosine to each class (stiffness)",
              box=None, padding=(0, 1, 0, 0))
    for c_ in ("cls", "n", "m-coh", *map(str, range(len(count)))):
        t.add_column(c_, justify="right", no_wrap=True)
    for i in range(len(count)):
        t.add_row(str(i), str(count[i]), f"{mcoh[i]:.3g}", *(f"{v:+.2f}" for v in cos[i]))
    out_console.print(t)


def _percent(fraction: float) -> str:
    """A share as a percentage with as few decimals as keep a share below 1 from reading 100%.

    >>> _percent(0.4213), _percent(0.9986), _percent(0.99996), _percent(1.0)
    ('42%', '99.9%', '99.996%', '100%')
    """
    for digits in range(5):
        text = f"{100 * fraction:.{digits}f}"
        if fraction >= 1 or float(text) < 100:
            return text + "%"
    return f"{100 * fraction:.5f}%"


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.6g}"


def _print_summary(summary: Any) -> None:
    t = Table(title=f"run file: {summary.run_file}")
    for c in ("slice", "grid", "loss at origin", "min loss", "max loss", "non-finite", "computed now", "seconds"):
        t.add_column(c)
    for s in summary.slices:
        t.add_row(s.name, "x".join(map(str, s.shape)), _fmt(s.loss_at_origin), _fmt(s.loss_min), _fmt(s.loss_max),
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
                t.add_row(r["group"] if i == 0 else "", f"{rho_:g}", _fmt(r["value"][i]),
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
                t.add_row(k, *(_fmt(d.get(k)) + (f" ± {d['b_noise_stderr']:.2g}" if k == "b_noise" and k in d else "")
                               for d in ([c, ctrl] if ctrl else [c])))
        out_console.print(t)
    for s in summary.slices:
        if s.n_nonfinite:
            err_console.print(Text(f"warning: slice {s.name} has {s.n_nonfinite} NaN/Inf points (kept in the run file)"))


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
    from landscape.coherence import CoherenceSettings
    from landscape.compare import ORDER_NOTE, CompareConfig, prepare_compare, run_compare
    from landscape.hessian import CurvatureSettings

    with _errors(debug):
        scan_cfg = _base_config(
            "", specs, None, steps=_parse_steps(steps),
            curvature=CurvatureSettings(seed=specs.seed) if hessian else None,
            sharpness=_default_sharpness(specs.seed) if sharpness else (),
            coherence=CoherenceSettings(noise_samples=16, seed=specs.seed) if coherence else None)
        cfg = CompareConfig(inputs=tuple(inputs), scan=scan_cfg, output=output, align=align, curve=curve,
                            alpha_range=_parse_range(alpha_range), alpha_steps=alpha_steps, bezier_steps=bezier_steps)
        with err_console.status("loading checkpoints, models and data", spinner="dots"):
            prepared = prepare_compare(cfg)
        with _progress_bars() as progress:
            summary = run_compare(cfg, progress=progress, prepared=prepared)
        drawn = _draw_report(summary.path, report)
        if json_out:
            out = summary.to_json()
            out["report"] = str(drawn.html) if drawn else None
            print(json.dumps(_nan_to_none(out), indent=2))
            return
        t = Table(title=f"comparison: {summary.path} ({ORDER_NOTE})")
        t.add_column("metric")
        for m in summary.models:
            t.add_column(Text(m))
        for k, d in summary.metrics.items():
            t.add_row(f"{k} ({d['order']})", *(_fmt(v) + (f" ± {e:.2g}" if e is not None and math.isfinite(e) else "") + f" ({r})"
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
    from landscape.trajectory import TrajectoryConfig, run_trajectory

    with _errors(debug):
        scan_cfg = _base_config("", specs, None)
        cfg = TrajectoryConfig(inputs=tuple(inputs), scan=scan_cfg, output=output, plane_steps=plane_steps)
        with _progress_bars() as progress:
            path, res = run_trajectory(cfg, progress=progress)
        drawn = _draw_report(path, report)
        rows = [{"checkpoint": n, "step": int(st_), "lr": lr, "sharpness": sh, "kind": k, "threshold": th,
                 "ratio": r, "edge_of_stability": bool(e), "distance": d}
                for n, st_, lr, sh, k, th, r, e, d in zip(res.names, res.step, res.lr, res.sharpness,
                                                         res.sharpness_kind, res.threshold, res.ratio,
                                                         res.edge_of_stability, res.distance)]
        if json_out:
            print(json.dumps(_nan_to_none({"trajectory_file": path, "checkpoints": rows,
                                           "explained_variance": res.pca.explained_variance[:2].tolist(),
                                           "edge_of_stability": bool(res.edge_of_stability.any()),
                                           "report": str(drawn.html) if drawn else None}), indent=2, default=float))
            return
        t = Table(title=f"trajectory: {path} (PCA plane explains "
                        f"{_percent(float(res.pca.explained_variance[:2].sum()))} of the path's variance)")
        for c_ in ("checkpoint", "step", "lr", "sharpness", "threshold", "ratio", "EoS", "distance"):
            t.add_column(c_)
        for r in rows:
            t.add_row(Text(r["checkpoint"]), str(r["step"]), _fmt(r["lr"]),
                      _fmt(r["sharpness"]) + (" (precond.)" if r["kind"] == "preconditioned" else ""),
                      _fmt(r["threshold"]), _fmt(r["ratio"]), "yes" if r["edge_of_stability"] else "",
                      _fmt(r["distance"]))
        out_console.print(t)
        if drawn:
            out_console.print(Text(f"report: {drawn.html}"))


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
    from landscape.runfile import writer_active

    with _errors(debug):
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


@app.command(epilog="Examples:\n\n  landscape inspect reports/mlp_sgd_s2000/run.h5\n\n"
                    "  landscape inspect reports/mlp_sgd_s2000/run.h5 --json | jq .attrs.checkpoint_sha256")
def inspect(
    run_file: str = typer.Argument(..., help="A run file written by landscape."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Print every attribute and scalar result of a run file."""
    from landscape.runfile import describe

    with _errors(debug):
        info = describe(run_file)
        if info["in_progress"]:
            err_console.print(Text(IN_PROGRESS.format(run_file)))
        if json_out:
            print(json.dumps(_nan_to_none(info), indent=2, default=str))
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
    from landscape.importers import import_loss_landscape

    with _errors(debug):
        path = import_loss_landscape(surface_file, output, name=name, overwrite=overwrite)
        out_console.print(Text(f"wrote {path}"))


def _nan_to_none(obj: Any) -> Any:
    """NaN and Inf become null: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


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
