"""Running a configured analysis from the command line: the ScanConfig from the shared options, joining a torchrun
job, progress bars (plain lines off a terminal), the report drawn beside the run file, the summary printed."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from landscape.errors import LandscapeError

from .app import err_console, out_console
from .options import RunOptions, SpecOptions, parse_bytes, parse_metric
from .printing import nan_to_none, print_summary

#: Seconds between two plain progress lines of one phase when stderr is not a terminal.
PLAIN_PROGRESS_SECONDS = 10.0


def base_config(checkpoint: str, specs: SpecOptions, output: Optional[str], metric: Optional[list[str]] = None,
                 **rest: Any) -> Any:
    """The ScanConfig for the shared options (cli/options.py) and ``output``; ``rest`` sets the others."""
    from landscape.analyses.scan import ScanConfig
    from landscape.io.specs import Spec, parse_kv

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
        loss=specs.loss, metrics=tuple(parse_metric(m) for m in metric or ()), state_key=specs.state_key,
        trust_pickle=specs.trust_pickle, strict=specs.strict, max_samples=specs.max_samples, seed=specs.seed,
        batch_size=specs.batch_size, device=specs.device, dtype=specs.dtype, bn=specs.bn, output=output,
        memory_budget=parse_bytes(specs.memory_budget), hvp=specs.hvp, **rest)


def _join_job(device: str) -> None:
    """Under torchrun, join the job (gloo on CPU, NCCL on GPU); only rank 0 prints, draws and writes."""
    import os

    from landscape.runtime.distributed import init_from_env

    if not init_from_env(device).is_writer:
        err_console.quiet = out_console.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} pts/s" if task.speed else "", style="progress.data.speed")


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
def progress_bars() -> Iterator[Any]:
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
    from landscape.analyses.scan import run_scan

    with progress_bars() as progress:
        return run_scan(config, progress=progress, prepared=st)


def draw_report(run_file: str, when: Optional[bool]) -> Any:
    """Draw the report next to ``run_file``: always (True), never (False), or only over one already there (None)."""
    from pathlib import Path

    from landscape.runtime.distributed import current
    from landscape.report import render_report

    directory = Path(run_file).parent
    if not current().is_writer or not (when or (when is None and (directory / "index.html").exists())):
        return None
    with err_console.status("drawing the report", spinner="dots"):
        return render_report(run_file, directory)


def run_and_print(config: Any, st: Any, json_out: bool, *, report: Optional[bool]) -> Any:
    """Run ``config`` with progress bars, draw the report, print the summary (or JSON).

    ``report``: True draws ``index.html`` and ``figures/*.png`` next to the run file, False does not,
    None redraws them only where a report is already there (so it never goes stale).
    """
    summary = _run_with_progress(config, st)
    drawn = draw_report(summary.run_file, report)
    if json_out:
        out = summary.to_json()
        out["report"] = str(drawn.html) if drawn else None
        print(json.dumps(nan_to_none(out), indent=2))
    else:
        print_summary(summary)
        if drawn:
            out_console.print(Text(f"report: {drawn.html} ({drawn.html_bytes / 2**20:.1f} MB) and "
                                   f"{len(drawn.figures)} figures in {drawn.directory / 'figures'}"))
    return summary


def run_analysis(checkpoint: str, specs: SpecOptions, run: RunOptions, **analysis: Any) -> Any:
    """Load the checkpoint, run one analysis command's ``analysis`` (a ScanConfig field, e.g.
    ``curvature=settings``) into the run file without slices, and print its summary; the summary. With
    ``--dry-run``, print its predicted cost instead (None)."""
    from landscape.analyses.scan import estimate

    config = base_config(checkpoint, specs, run.output, slices=False, resume=True, stream=run.stream,
                         save_vectors=run.save_vectors, **analysis)
    st = load(config)
    if run.dry_run:
        print_estimate(estimate(config, st), checkpoint, run.json_out)
        return None
    return run_and_print(config, st, run.json_out, report=None)


def print_estimate(est: Any, checkpoint: str, json_out: bool) -> None:
    """A dry run's :class:`~landscape.analyses.scan.Estimate`: a table, or JSON on stdout."""
    if json_out:
        print(json.dumps(est.to_json(), indent=2))
        return
    t = Table(title=f"dry run: {checkpoint}", show_header=False)
    t.add_row("parameters", f"{est.n_parameters:,}")
    t.add_row("samples", f"{est.n_samples:,}")
    if est.points or est.points_stored:
        t.add_row("grid points", f"{est.points:,}" + (f" to compute, {est.points_stored:,} stored" if est.points_stored
                                                      else ""))
    if est.points:
        t.add_row("forward passes", f"{est.forward_passes:,}")
        t.add_row("strategy", est.strategy + (f", {est.workers} blocks at once" if est.workers > 1 else ""))
        t.add_row("time per point", f"{est.seconds_per_point * 1e3:.2f} ms")
    ranks = f" ({est.ranks} ranks)" if est.ranks > 1 else ""
    for phase, p in est.phases.items():
        products = f", {p['products']:,.0f} products" if p.get("products") else ""
        t.add_row(f"{phase}", f"{p['seconds']:.1f} s{ranks if phase == 'slices' else ''}, peak "
                              f"{p['peak_bytes'] / 2**20:,.0f} MiB{products}")
    if est.stored:
        t.add_row("stored", f"{', '.join(est.stored)}: kept from the run file, not computed again")
    for note in est.notes:
        t.add_row("note", note)
    t.add_row("estimated time, total", f"{est.total_seconds:.1f} s")
    t.add_row("peak memory", f"{est.memory_bytes / 2**20:,.0f} MiB ({est.memory_note}; memory budget "
                             f"{est.memory_budget / 2**20:,.0f} MiB)")
    out_console.print(t)


def load(config: Any) -> Any:
    """The checkpoint, model, data and Problem of ``config`` (``landscape.analyses.scan.setup``), under a spinner."""
    from landscape.analyses.scan import setup

    with err_console.status("loading checkpoint, model and data", spinner="dots"):
        return setup(config)


def default_sharpness(seed: int, **common: Any) -> tuple[Any, ...]:
    """The default sharpness set (``landscape.analyses.sharpness.DEFAULT_SET``) with ``common`` settings."""
    from landscape.analyses.sharpness import DEFAULT_SET, SharpnessSettings

    return tuple(SharpnessSettings(measure=m, adaptive=a, seed=seed, **common) for m, a in DEFAULT_SET)
