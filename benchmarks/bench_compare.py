"""Cost of the comparison and trajectory tools on the shipped checkpoints: weight matching, a 51-point
interpolation (the physical limit: 51 plain forward passes over the data), a Bezier fit, and a trajectory.

    python benchmarks/bench_compare.py --threads 2
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from timing import arguments, best_of, parse

from landscape.analyses.connectivity import bezier_path, fit_bezier, linear_path
from landscape.analyses.matching import apply_permutation, permutation_spec, weight_matching
from landscape.analyses.scan import ScanConfig, setup

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


def main() -> None:
    args = parse(arguments(__doc__, repeats=3))
    print("| model | weight matching | 51-point interpolation | 51 forward passes | ratio | Bezier fit (300 steps) |")
    print("|---|---|---|---|---|---|")
    for arch in ("mlp", "cnn"):
        a = setup(ScanConfig(checkpoint=str(EXAMPLES / f"{arch}_sgd_s2000.pt")))
        b = setup(ScanConfig(checkpoint=str(EXAMPLES / f"{arch}_adam_s2000.pt")))
        spec = permutation_spec(a.model, a.data.X[:64])
        t_match, perms = best_of(lambda: weight_matching(spec, a.model.state_dict(), b.model.state_dict()),
                                 args.repeats)
        sb = apply_permutation(spec, b.model.state_dict(), perms)
        theta_b = {n: sb[n] for n, _ in b.model.named_parameters()}
        pb = a.problem
        alpha = np.linspace(-0.5, 1.5, 51)
        linear_path(pb, theta_b, alpha)  # warm-up and strategy choice
        t_line, _ = best_of(lambda: linear_path(pb, theta_b, alpha), args.repeats)
        model = a.model.eval()

        def forwards() -> None:
            with torch.inference_mode():
                for _ in range(51):
                    model(a.data.X)

        t_fwd, _ = best_of(forwards, args.repeats)
        t0 = time.perf_counter()
        bend = fit_bezier(pb, theta_b, steps=300)
        t_bez = time.perf_counter() - t0
        bezier_path(pb, theta_b, bend, np.linspace(0, 1, 51))
        print(f"| {arch} | {t_match * 1e3:.1f} ms | {t_line * 1e3:.1f} ms | {t_fwd * 1e3:.1f} ms | "
              f"{t_line / t_fwd:.2f} | {t_bez:.2f} s |")


if __name__ == "__main__":
    main()
