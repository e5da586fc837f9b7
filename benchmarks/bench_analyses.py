"""Benchmark: what issue 20's analyses cost beside the plain spectrum, each ``landscape hessian`` run in its own process.

    python benchmarks/bench_analyses.py [--threads 2] [--models cnn,resnet18] [--samples 256]
                                        [--variants baseline,validity,per-class,batch-sizes] [--batch-sizes 8,32,128]

For each model: ``hessian --top-k 5 --no-trace`` (the baseline), then with ``--validity``, ``--per-class`` and
``--batch-sizes 8,32,128``. Reported: wall time, Hessian-vector products (all Lanczos runs of the command), loss
evaluations of the validity radius, and the headline numbers: the relative validity radius at 10% along the top
eigenvector and the median over the random directions, each class's λmax range and negative mass, the mini-batch
λmax at each size against the full data's and the fitted ``c``. No peer tool computes these (the issue's point),
so the comparison is with the spectrum itself: products and wall time per analysis.

Models: the shipped CNN example (``data/examples/cnn_adam_s2000.pt``, its own data) and the scale ladder's
ResNet-18 (``benchmarks/scale_models.py``, random CIFAR-shaped inputs and labels, ``--samples`` of them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

VARIANTS = {"baseline": [], "validity": ["--validity"], "per-class": ["--per-class"],
            "batch-sizes": ["--batch-sizes", "8,32,128"]}


def landscape(args: list[str], threads: int) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = f"import sys, torch; torch.set_num_threads({threads}); from landscape_cli.main import main; main()"
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return wall, json.loads(out.stdout)["curvature"]


def model_args(name: str, samples: int, folder: Path) -> list[str]:
    if name == "cnn":
        return [str(REPO / "data" / "examples" / "cnn_adam_s2000.pt"), "--max-samples", str(samples)]
    import torch
    import bench_scale

    torch.manual_seed(0)
    args, _, _ = bench_scale.prepare(name, samples, folder, 0)
    return args


def headline(variant: str, c: dict) -> str:
    if variant == "validity":
        v = c["validity"]
        rel = {k: (r[0] / v["theta_norm"] if r[0] is not None else float("inf")) for k, r in v["radius"].items()}
        rand = [x for k, x in rel.items() if k.startswith("random")]
        return (f"10% radius / ‖θ‖: top-1 {rel['top-1']:.2g}, bottom-1 {rel['bottom-1']:.2g}, random (median) "
                f"{float(np.median(rand)):.2g}")
    if variant == "per-class":
        pc = c["per_class"]
        tops = [v["eigenvalues"][0] for v in pc.values()]
        neg = [v["negative_mass"] for v in pc.values()]
        return (f"{len(pc)} classes: λmax {min(tops):.3g} to {max(tops):.3g} (full {c['eigenvalues'][0]:.3g}); "
                f"negative mass {min(neg):.3f} to {max(neg):.3f}")
    if variant == "batch-sizes":
        b = c["batch_sizes"]
        parts = ", ".join(f"b={s}: {m:.3g} ± {e:.2g}" for s, m, e in zip(b["sizes"], b["top_mean"], b["top_stderr"]))
        return f"λmax {parts}; full {b['full_top']:.3g}; c = {b['top_fit']['c']:.3g} ± {b['top_fit']['c_stderr']:.2g}"
    return f"λ1..5 {', '.join(f'{x:.3g}' for x in c['eigenvalues'])}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of " + ", ".join(VARIANTS))
    ap.add_argument("--batch-sizes", default="8,32,128")
    a = ap.parse_args()
    VARIANTS["batch-sizes"] = ["--batch-sizes", a.batch_sizes]
    folder = Path(tempfile.mkdtemp(prefix="bench_analyses_"))
    print("| model | analysis | wall s | products | loss evaluations | result |")
    print("|---|---|---|---|---|---|")
    for name in a.models.split(","):
        common = model_args(name, a.samples, folder / name)
        for variant in a.variants.split(","):
            extra = VARIANTS[variant]
            out = folder / f"{name}_{variant}.h5"
            wall, c = landscape(["hessian", *common, "--top-k", "5", "--no-trace", *extra, "-o", str(out), "--json"],
                                a.threads)
            products = c["n_matvec"] + sum(v["n_matvec"] for v in c.get("per_class", {}).values())
            products += c["batch_sizes"]["n_matvec"] if "batch_sizes" in c else 0
            evals = "-"
            if variant == "validity":
                import h5py

                with h5py.File(out) as f:
                    evals = str(int(f["hessian/validity"].attrs["n_evals"]))
            print(f"| {name} | {variant} | {wall:.1f} | {products} | {evals} | {headline(variant, c)} |", flush=True)


if __name__ == "__main__":
    main()
