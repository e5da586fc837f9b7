"""Benchmark: cost of each sharpness measure, against the plain PyTorch passes it needs, and convergence.

    python benchmarks/bench_sharpness.py [--threads 2] [--repeats 3]

Workload: the shipped ``mlp_sgd_s2000.pt`` and ``cnn_adam_s2000.pt`` on the digits train split (1,438 samples),
float32, each measure at its default settings (``landscape.analyses.sharpness``), plus Keskar, first-order and L-inf
worst-case. For every measure: loss(-and-gradient) evaluations, wall time (best of ``--repeats``), and the
*pass limit*: the same number of forward (+ backward where the measure differentiates) passes over the same batch
sizes, done by a plain ``model(x); loss.backward()`` loop on the same model. Convergence on the MLP: worst-case
adaptive L2 against ascent steps, average-case against Monte Carlo draws, PAC-Bayes sigma' against draws.
Output: markdown on stdout, JSON in ``benchmarks/out/bench_sharpness.json``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from landscape.analyses.directions import random_directions
from landscape.analyses.scan import ScanConfig, setup
from landscape.analyses.sharpness import SharpnessSettings, batches, sharpness
from timing import arguments, best_of, parse

ROOT = Path(__file__).resolve().parents[1]
MEASURES = [
    dict(measure="worst-case", adaptive=True), dict(measure="worst-case", adaptive=True, norm="linf"),
    dict(measure="average-case", adaptive=True), dict(measure="sam", adaptive=False), dict(measure="asam"),
    dict(measure="keskar"), dict(measure="pacbayes", adaptive=True), dict(measure="first-order", adaptive=True),
    dict(measure="basin-width", adaptive=False),
]


def pass_limit(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, plan: list[tuple[int, int]]) -> float:
    """Seconds for a plain pass over a batch of each ``(size, kind)`` in ``plan``: kind 0 forward only, 1 forward
    and backward, 2 forward and two backward passes (about a gradient and a Hessian-vector product)."""
    params = list(model.parameters())
    t = time.perf_counter()
    for m, kind in plan:
        if kind == 0:
            with torch.inference_mode():
                F.cross_entropy(model(X[:m]), y[:m])
            continue
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(X[:m]), y[:m])
        if kind == 1:
            loss.backward()
        else:
            g = torch.autograd.grad(loss, params, create_graph=True)
            torch.autograd.grad(g, params, grad_outputs=[torch.ones_like(x) for x in g])
    return time.perf_counter() - t


def passes(res, n: int) -> list[tuple[int, int]]:
    """The passes a result spent: ``(batch size, kind)`` as in :func:`pass_limit`."""
    s = res.settings
    n_batches = res.n_samples // res.m
    base = [(res.m, 0)] * n_batches  # the loss at w on every batch
    rest = res.n_evals - n_batches
    if s.measure in ("worst-case", "keskar"):
        return base + [(res.m, 1)] * rest
    if s.measure in ("sam", "asam"):
        return base + [(res.m, 1), (res.m, 0)] * (rest // 2)
    if s.measure == "first-order":
        return base + [(n, 2)] * (rest // 2)
    return base + [(res.m, 0)] * rest


def main() -> None:
    args = parse(arguments(__doc__, repeats=3))
    out = {"machine": platform.platform(), "torch": torch.__version__, "threads": args.threads, "models": {}}
    print("| model | measure (group) | rho | value ± stderr | evaluations | wall | pass limit | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("mlp_sgd_s2000", "cnn_adam_s2000"):
        st = setup(ScanConfig(str(ROOT / "data" / "examples" / f"{name}.pt"), device="cpu"))
        pb = st.problem
        model = st.model.float().eval()
        X, y = pb.X, pb.y
        dirs = random_directions(pb.theta0, 2, seed=0)
        rows = []
        for kw in MEASURES:
            best, res = best_of(lambda: sharpness(pb, SharpnessSettings(**kw), directions=dirs), args.repeats)
            plan = passes(res, pb.n)
            limit = min(pass_limit(model, X, y, plan) for _ in range(args.repeats))
            row = {"group": res.settings.group, "rho": res.rho.tolist(), "value": res.value.tolist(),
                   "stderr": res.stderr.tolist(), "n_evals": res.n_evals, "seconds": best, "limit_seconds": limit,
                   "m": res.m, "n_samples": res.n_samples}
            rows.append(row)
            err = "" if res.stderr[0] != res.stderr[0] else f" ± {res.stderr[0]:.2g}"
            print(f"| {name} | {row['group']} | {res.rho[0]:g} | {res.value[0]:.4g}{err} | {res.n_evals} | "
                  f"{best * 1e3:.0f} ms | {limit * 1e3:.0f} ms | {best / limit:.2f}× |")
        out["models"][name] = {"n_parameters": pb.num_parameters, "n_samples": pb.n, "rows": rows}
        if name != "mlp_sgd_s2000":
            continue
        conv = {"worst_case_steps": [], "average_case_draws": [], "pacbayes_draws": []}
        for steps in (5, 10, 20, 40, 80):
            r = sharpness(pb, SharpnessSettings(measure="worst-case", steps=steps))
            conv["worst_case_steps"].append([steps, r.value[0], r.stderr[0]])
        for draws in (2, 5, 10, 20, 50):
            r = sharpness(pb, SharpnessSettings(measure="average-case", draws=draws))
            conv["average_case_draws"].append([draws, r.value[0], r.stderr[0]])
        for draws in (5, 10, 20, 40):
            r = sharpness(pb, SharpnessSettings(measure="pacbayes", draws=draws))
            conv["pacbayes_draws"].append([draws, float(r.extra["sigma"][0]), r.value[0]])
        out["convergence"] = conv
        print("\nconvergence (mlp_sgd_s2000):")
        for k, v in conv.items():
            print(f"  {k}: " + "; ".join(f"{a}: {b:.4g} ({c:.2g})" for a, b, c in v))
        print(f"  batches of m=128 from {pb.n} samples: {len(batches(pb.n, 128, 0))}")
    path = ROOT / "benchmarks" / "out" / "bench_sharpness.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
