"""``landscape scan``: the default analysis of a checkpoint (slice, Hessian, sharpness, coherence), or its dry run."""

from __future__ import annotations

from typing import Optional

import typer

from landscape.errors import LandscapeError

from ..app import app, command_errors
from ..options import (CheckpointArg, DebugOpt, DryRunOpt, JsonOpt, MetricOpt, OutputOpt, SaveVectorsOpt, SpecOptions,
                       StreamOpt, parse_range, parse_steps, parse_workers, spec_options)
from ..running import base_config, default_sharpness, load, print_estimate, run_and_print


@app.command(epilog="Examples:\n\n"
                    "  landscape scan data/examples/cnn_adam_s2000.pt\n\n"
                    "  landscape scan ckpt.pt --model pkg.models:Net --model-arg width=64 --data digits --max-samples 500\n\n"
                    "  landscape scan a.pt --interpolate b.pt --dims 1 --steps 101\n\n"
                    "  landscape scan ckpt.pt --data big.h5 --stream on   # inputs read from disk by chunks\n\n"
                    "  landscape scan ckpt.pt --dry-run\n\n"
                    "  landscape scan ckpt.pt --resume --dry-run   # what a killed scan has left, priced")
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
    dry_run: DryRunOpt = False,
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
    from landscape.analyses.coherence import CoherenceSettings
    from landscape.analyses.hessian import CurvatureSettings
    from landscape.analyses.scan import estimate

    with command_errors(debug):
        if resume and overwrite:
            raise LandscapeError("--resume and --overwrite contradict each other", hint="pick one")
        config = base_config(
            checkpoint, specs, output, metric, stream=stream, bn_batches=bn_batches, strategy=strategy,
            workers=parse_workers(workers),
            precision=precision,
            dims=dims,
            steps=parse_steps(steps), range=parse_range(range_), y_range=parse_range(y_range) if y_range else None,
            norm=norm, ignore=ignore, orthogonalize=orthogonalize, directions=directions, interpolate=interpolate, name=name, resume=resume,
            overwrite=overwrite, compact_every=save_every, save_vectors=save_vectors,
            curvature=CurvatureSettings(seed=specs.seed) if hessian else None,
            sharpness=default_sharpness(specs.seed) if sharpness else (),
            coherence=CoherenceSettings(noise_samples=16, seed=specs.seed) if coherence else None)
        st = load(config)
        if dry_run:
            print_estimate(estimate(config, st), checkpoint, json_out)
            return
        run_and_print(config, st, json_out, report=report)
