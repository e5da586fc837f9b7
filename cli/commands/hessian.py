"""``landscape hessian``: the Hessian (or GGN) spectrum."""

from __future__ import annotations

from typing import Optional

import typer

from landscape.errors import LandscapeError

from ..app import app, command_errors
from ..options import CheckpointArg, RunOptions, SpecOptions, int_list, run_options, spec_options
from ..running import run_analysis


@app.command(epilog="Examples:\n\n"
                    "  landscape hessian data/examples/mlp_sgd_s2000.pt --top-k 10 --bottom-k 3 --density\n\n"
                    "  landscape hessian ckpt.pt --ggn --per-layer --dtype float64\n\n"
                    "  landscape hessian ckpt.pt --validity   # how far the quadratic model holds\n\n"
                    "  landscape hessian ckpt.pt --per-class --top-k 3   # each class's spectrum and density\n\n"
                    "  landscape hessian ckpt.pt --batch-sizes 8,32,128   # mini-batch against full-batch λmax\n\n"
                    "  landscape hessian ckpt.pt --per-class --dry-run   # its time and peak memory first\n\n"
                    "  landscape hessian ckpt.pt --parameters 'layer4.*' --trace-method hutchinson --trace-matvecs 300\n\n"
                    "  landscape hessian ckpt.pt --engine pyhessian --dtype float64   # PyHessian's numbers beside ours")
@spec_options
@run_options()
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
    tol: float = typer.Option(1e-4, help="Relative Ritz residual at which eigenpairs count as converged (or at the "
                                          "products' own rounding error, measured): an eigenvalue is then within tol "
                                          "of the Hessian's, relatively, and typically far closer."),
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
    run: RunOptions = RunOptions(),
) -> None:
    """Hessian (or GGN) spectrum: top/bottom eigenvalues with residuals, trace with a standard error, density.

    Results go to /hessian (or /ggn) of the run file, added to an existing one (replacing an
    earlier curvature group of the same kind).
    """
    from landscape.analyses.hessian import CurvatureSettings

    with command_errors(run.debug):
        if engine not in ("landscape", "pyhessian"):
            raise LandscapeError(f"--engine {engine!r} is unknown", hint="use landscape or pyhessian")
        if engine == "pyhessian" and (bottom_k or density or ggn or validity or per_class):
            raise LandscapeError("--engine pyhessian computes the Hessian's top-k eigenvalues and trace only",
                                 hint="drop --bottom-k/--density/--ggn/--validity/--per-class, or run them with "
                                      "--engine landscape")
        sizes = int_list(batch_sizes, "--batch-sizes") if batch_sizes else ()
        if engine == "pyhessian" and sizes:
            raise LandscapeError("--engine pyhessian computes the Hessian's top-k eigenvalues and trace only",
                                 hint="drop --batch-sizes, or run it with --engine landscape")
        settings = CurvatureSettings(
            kind="ggn" if ggn else "hessian", top_k=top_k, bottom_k=bottom_k, tol=tol, max_hvp=max_hvp, trace=trace,
            trace_method=trace_method, trace_matvecs=trace_matvecs, trace_stderr=trace_stderr, density=density,
            density_probes=density_probes, density_steps=density_steps, per_layer=per_layer,
            parameters=tuple(parameters or ()), seed=specs.seed, engine=engine, validity=validity,
            validity_random=validity_random, per_class=per_class, batch_sizes=sizes, batch_draws=batch_draws)
        run_analysis(checkpoint, specs, run, curvature=settings)
