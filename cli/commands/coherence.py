"""``landscape coherence``: per-sample gradient coherence and noise."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from landscape.errors import LandscapeError

from ..app import app, command_errors, out_console
from ..options import CheckpointArg, RunOptions, SpecOptions, int_list, run_options, spec_options
from ..running import run_analysis


@app.command(epilog="Examples:\n\n"
                    "  landscape coherence data/examples/mlp_sgd_s0000.pt --control shuffled-labels --per-class\n\n"
                    "  landscape coherence ckpt.pt --max-samples 2000 --sketch 512   # models too large for exact\n\n"
                    "  landscape coherence ckpt.pt --noise-samples 0 --json | jq .coherence.m_coherence")
@spec_options
@run_options()
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
    run: RunOptions = RunOptions(),
) -> None:
    """Per-sample gradient coherence and noise: m-coherence, stiffness, GSNR, B_simple and B_noise, minibatch
    alignment, and GraNd/EL2N scores for every sample (to prune data with).

    Results go to /coherence of the run file, added to an existing one. The shuffled-label
    control is most telling early in training: at a checkpoint fitted to the real labels,
    shuffled labels have a large loss and large, aligned gradients.
    """
    from landscape.analyses.coherence import CoherenceSettings

    with command_errors(run.debug):
        if control not in (None, "shuffled-labels"):
            raise LandscapeError(f"--control {control!r} is unknown", hint="use --control shuffled-labels")
        sizes = int_list(batch_sizes, "--batch-sizes")
        settings = CoherenceSettings(sketch=sketch, noise_samples=noise_samples, batch_sizes=sizes,
                                     batch_repeats=batch_repeats, control=control is not None,
                                     seed=specs.seed).resolved()
        summary = run_analysis(checkpoint, specs, run, coherence=settings)
        if per_class and summary is not None and not run.json_out:
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
