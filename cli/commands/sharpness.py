"""``landscape sharpness``: sharpness measures of the minimum."""

from __future__ import annotations

from typing import Optional

import typer

from landscape.errors import LandscapeError

from ..app import app, command_errors
from ..options import CheckpointArg, RunOptions, SpecOptions, run_options, spec_options
from ..running import default_sharpness, run_analysis


@app.command(epilog="Examples:\n\n"
                    "  landscape sharpness data/examples/mlp_sam_s2000.pt\n\n"
                    "  landscape sharpness ckpt.pt --measure worst-case --norm linf --rho 0.001 --rho 0.002 --m 128\n\n"
                    "  landscape sharpness ckpt.pt --measure average-case --no-adaptive --rho 0.01 --draws 50\n\n"
                    "  landscape sharpness ckpt.pt --measure keskar --measure pacbayes --parameters '*bn*'")
@spec_options
@run_options(vectors=False)
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
    run: RunOptions = RunOptions(),
) -> None:
    """Sharpness of the minimum: worst- and average-case (adaptive, L2/Linf, m-sharpness), SAM/ASAM, Keskar,
    PAC-Bayes flatness, first-order flatness, basin width.

    Results go to /sharpness/<measure>[_adaptive]_<norm> of the run file, added to an existing
    one; a measure already there with the same settings is not recomputed. Sharpness
    tracks hyperparameters and predicts generalization only loosely: compare like with like.
    """
    from landscape.analyses.sharpness import SharpnessSettings

    with command_errors(run.debug):
        if measure:
            settings = tuple(SharpnessSettings(
                measure=name, adaptive=True if adaptive is None else adaptive, norm=norm, rho=tuple(rho or ()),
                m=m or None, steps=steps, draws=draws, eta=eta, parameters=tuple(parameters or ()), seed=specs.seed)
                for name in measure)
        else:
            if rho or adaptive is not None:
                raise LandscapeError("--rho and --adaptive apply to a named measure", hint="add --measure NAME")
            settings = default_sharpness(specs.seed, m=m or None, steps=steps, draws=draws, eta=eta,
                                          parameters=tuple(parameters or ()))
        for s_ in settings:
            s_.resolved()  # validate before loading anything
        run_analysis(checkpoint, specs, run, sharpness=settings)
