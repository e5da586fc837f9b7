"""Benchmark: a 51x51 filter-normalized 2D slice vs the forward limit and loss-landscapes 3.0.6.

    python benchmarks/bench_slice.py [--threads 2] [--repeats 3] [--models mlp,cnn]

For each shipped model (digits train split, 1,438 samples, one forward per point):

* forward limit: 51*51 plain ``model(X)`` passes of a frozen copy (``requires_grad_(False)``, eval mode) under
  ``torch.inference_mode()``: the fastest plain forward we found;
* forward side by side: the same passes shared out over one thread per core, each on its own model copy with one
  intra-op thread: the forward limit of what ``--workers`` does;
* forward+loss+accuracy limit: the same plus the cross-entropy and top-1 count read back per point, the least any
  tool that reports loss and accuracy must do;
* landscape ``compute_slice``: the slice alone (directions, point updates, loss and accuracy);
* landscape ``run_scan``: the whole scan minus start-up (slice + run file with journal and merges);
* ``loss_landscapes.random_plane(..., steps=51, normalization='filter')`` with its ``Loss`` metric.

Times are the best of ``--repeats`` interleaved rounds. It then checks where loss-landscapes evaluates each stored grid entry
(by recording the parameter vectors its evaluator sees) and prints the findings. Results go to stdout as a
markdown table and to ``benchmarks/out/bench_slice.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from landscape.analyses.directions import random_directions
from landscape.analyses.scan import ScanConfig, run_scan, setup
from landscape.analyses.slices import axis, compute_slice
from timing import interleaved

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"
CKPTS = {"mlp": EXAMPLES / "mlp_sgd_s2000.pt", "cnn": EXAMPLES / "cnn_adam_s2000.pt"}
STEPS = 51


def bench_model(name: str, repeats: int) -> dict:
    cfg = ScanConfig(str(CKPTS[name]), device="cpu", strategy="auto")
    st = setup(cfg)
    # the fastest plain forward: a frozen copy in eval mode under inference_mode
    model = copy.deepcopy(st.model).eval().requires_grad_(False)
    X, y = st.data.X, st.data.y
    pb = st.problem
    axes = (axis(-1, 1, STEPS), axis(-1, 1, STEPS))
    dirs = random_directions(pb.theta0, 2, seed=0)
    strategy = pb.choose_strategy([pb.as_list(d) for d in dirs])
    workers = pb.workers  # compute_slice runs with the choice of the scan before it (this one in the first round)

    def forward_limit():
        with torch.inference_mode():
            for _ in range(STEPS * STEPS):
                model(X)

    copies = [copy.deepcopy(model) for _ in range(torch.get_num_threads())]

    def forward_side_by_side():
        """The same passes shared out over one thread per core, each on its own model copy with one intra-op
        thread: the forward limit of what ``--workers`` does."""
        def run(m: torch.nn.Module, passes: int) -> None:
            torch.set_num_threads(1)
            with torch.inference_mode():
                for _ in range(passes):
                    m(X)

        total = STEPS * STEPS
        with ThreadPoolExecutor(len(copies)) as pool:
            for f in [pool.submit(run, m, total // len(copies) + (i < total % len(copies)))
                      for i, m in enumerate(copies)]:
                f.result()

    def evaluation_limit():
        with torch.inference_mode():
            for _ in range(STEPS * STEPS):
                out = model(X)
                F.cross_entropy(out, y).item()
                (out.argmax(1) == y).sum().item()

    def ours_slice():
        compute_slice(pb, dirs, axes)

    scan_workers = []  # each scan chooses its strategy and workers again, by timing

    def ours_scan():
        with tempfile.TemporaryDirectory() as tmp:
            run_scan(ScanConfig(str(CKPTS[name]), device="cpu", output=f"{tmp}/run.h5"), prepared=st)
        scan_workers.append(pb.workers)

    import loss_landscapes
    from loss_landscapes.metrics import Loss

    metric = Loss(F.cross_entropy, X, y)

    def ll_plane():
        loss_landscapes.random_plane(model, metric, distance=2, steps=STEPS, normalization="filter",
                                     deepcopy_model=True)

    fns = {"forward_limit": forward_limit, "forward_side_by_side_limit": forward_side_by_side,
           "forward_loss_accuracy_limit": evaluation_limit,
           "landscape_compute_slice": ours_slice, "landscape_run_scan": ours_scan, "loss_landscapes_random_plane": ll_plane}
    t, ratios = interleaved(fns, repeats, "forward_limit")
    return {"model": name, "n_parameters": pb.num_parameters, "n_samples": pb.n, "strategy": strategy,
            "block": pb.block, "workers_first": workers, "workers_chosen_by_each_scan": scan_workers,
            "strategy_timings_s_per_point": getattr(pb, "strategy_timings", None), "seconds": t,
            "ratios_to_forward_limit_per_round": ratios}


def loss_landscapes_geometry(steps: int = 7) -> dict:
    """Where does ``random_plane`` evaluate stored entry [i][j]? Record every point it visits.

    The metric returns its call counter, so the returned grid says which recorded parameter vector each entry
    belongs to; the points are then expressed in grid steps along the two step vectors.
    """
    import loss_landscapes
    from loss_landscapes.metrics.metric import Metric

    def run(distance: float, deepcopy: bool) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.nn.Module]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        theta0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

        class Record(Metric):
            def __init__(self) -> None:
                super().__init__()
                self.points: list[torch.Tensor] = []

            def __call__(self, wrapper) -> float:
                params = wrapper.get_module_parameters().parameters
                self.points.append(torch.cat([p.detach().reshape(-1).clone() for p in params]))
                return float(len(self.points) - 1)

        rec = Record()
        grid = loss_landscapes.random_plane(model, rec, distance=distance, steps=steps, normalization="filter",
                                            deepcopy_model=deepcopy)
        return np.asarray(grid, dtype=int), torch.stack(rec.points) - theta0, theta0, model

    grid, P, theta0, model = run(2.0, deepcopy=False)
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step_b = P[1] - P[0]  # consecutive evaluations in the first stored row move along dir_two
    step_a = P[steps] - P[steps - 1] + step_b  # row 1 starts one dir_one step over and one dir_two step back
    coords = torch.linalg.lstsq(torch.stack([step_a, step_b], 1), P.T).solution.T.numpy()
    a, b = coords[grid][..., 0], coords[grid][..., 1]
    spans = {}
    for distance in (0.5, 2.0, 8.0):
        _, Pd, th, _ = run(distance, deepcopy=True)
        spans[distance] = float(Pd.norm(dim=1).max() / th.norm())
    return {
        "steps": steps,
        "stored_row_i_first_b_coordinate_in_steps": [round(float(b[i, 0]), 6) for i in range(steps)],
        "stored_row_i_a_coordinate_in_steps": [round(float(a[i, 0]), 6) for i in range(steps)],
        "max_distance_from_theta0_over_norm_theta0_by_distance_arg": spans,
        "theta0_on_grid": bool(((np.abs(a) < 1e-6) & (np.abs(b) < 1e-6)).any()),
        "model_left_modified_with_deepcopy_false": bool(not torch.allclose(moved, theta0)),
        "direction_entries_drawn_from": "U[0, 1) (torch.rand), all positive before normalization",
    }


def _per_model(args: argparse.Namespace) -> list[str]:
    models, reps = args.models.split(","), str(args.repeats).split(",")
    return reps * len(models) if len(reps) == 1 else reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", default="3", help="rounds, one number or one per model (e.g. 7,3 for mlp,cnn)")
    ap.add_argument("--models", default="mlp,cnn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "threads": args.threads,
               "models": [bench_model(m, int(r)) for m, r in zip(args.models.split(","), _per_model(args))],
               "loss_landscapes_geometry": loss_landscapes_geometry()}
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_slice.json").write_text(json.dumps(results, indent=2))
    print(f"torch {torch.__version__}, {args.threads} threads, rounds {args.repeats}\n")
    print("Best times (s); in brackets, time / that round's forward limit: median [min-max] over rounds\n")
    print("| model | params | strategy (block, workers: first, by scan) | forward limit | forward side by side | "
          "fwd+loss+acc limit | landscape compute_slice | landscape run_scan | loss-landscapes random_plane |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["models"]:
        s, q = r["seconds"], r["ratios_to_forward_limit_per_round"]
        cells = [f"{s[k]:.2f} ({np.median(q[k]):.2f}x [{min(q[k]):.2f}-{max(q[k]):.2f}])" for k in (
            "forward_limit", "forward_side_by_side_limit", "forward_loss_accuracy_limit", "landscape_compute_slice",
            "landscape_run_scan", "loss_landscapes_random_plane")]
        setting = f"{r['strategy']} ({r['block']}, {r['workers_first']}, {r['workers_chosen_by_each_scan']})"
        print(f"| {r['model']} | {r['n_parameters']:,} | {setting} | " + " | ".join(cells) + " |")
    print("\nloss-landscapes 3.0.6 random_plane geometry:", json.dumps(results["loss_landscapes_geometry"], indent=2))


if __name__ == "__main__":
    main()
