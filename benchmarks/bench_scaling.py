"""Benchmark: scaling. One vs two processes under torchrun, and how cost grows with grid points, parameters and
samples on this machine.

    python benchmarks/bench_scaling.py [--part processes,series,growth,stream] [--repeats 2] [--stream-samples 200000]

``processes``: the shipped MLP and CNN, ``landscape scan`` of a 51x51 slice (nothing else) and ``landscape hessian``
(top-5 eigenvalues and Hutch++ trace), each run as

* one process with 2 BLAS threads (the default on this 2-core machine),
* one process with 1 thread,
* ``torchrun --standalone --nproc-per-node 2`` (gloo), 1 thread per process,

timed as whole commands (start-up included) and, for the slice, as the slice's own time from ``--json``.

``series``: the same setups for ``landscape trajectory`` over four MLP checkpoints and ``landscape compare`` of two
CNNs (a slice each, the aligned linear path and a Bezier curve).

``growth`` (in process, 2 threads): time per slice point and per Hessian-vector product as the number of grid points,
of parameters (MLPs of growing width on the digits) and of samples grows.

``stream`` (in process, 2 threads): a 64-128-128-10 MLP on a 10-class Gaussian mixture of ``--stream-samples``
64-dimensional samples, chunks of 8,192: time per slice point (blocks of 16 points), per gradient and per
Hessian-vector product with the inputs in memory, streamed from an ``.h5`` file and from a memory-mapped ``.pt``
file. Streamed reads are timed warm (the file in the page cache) and cold (its pages dropped with
``posix_fadvise(DONTNEED)`` before every call).

Results: a markdown table on stdout and ``benchmarks/out/bench_scaling.json``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from landscape.io.data import load_data
from landscape.analyses.directions import random_directions
from landscape.problem import Problem
from landscape.analyses.slices import axis, compute_slice
from landscape.io.specs import Spec
from landscape.io.stream import StreamedInputs

sys.path.insert(0, str(Path(__file__).parent))
from timing import arguments, best_of, parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CKPTS = {"mlp": ROOT / "data/examples/mlp_sgd_s2000.pt", "cnn": ROOT / "data/examples/cnn_adam_s2000.pt"}
SLICE = ["--steps", "51", "--no-hessian", "--no-sharpness", "--no-coherence", "--no-report", "--json"]
HESSIAN = ["--json"]
SETUPS = {  # name -> (launcher, threads per process)
    "1 process, 2 threads": ([sys.executable, "-m", "landscape"], 2),
    "1 process, 1 thread": ([sys.executable, "-m", "landscape"], 1),
    "2 processes (torchrun), 1 thread each": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc-per-node=2", "-m", "landscape"], 1),
}


def run_command(launcher: list[str], threads: int, args: list[str]) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    res = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return wall, json.loads(res.stdout)


def time_jobs(jobs: list[tuple[str, str, Callable[[str], list[str]]]], repeats: int) -> list[dict]:
    """Each ``(model, job, args(tmp folder))`` under every setup of :data:`SETUPS`, best of ``repeats``."""
    rows = []
    for model, job, args in jobs:
        for setup, (launcher, threads) in SETUPS.items():
            walls, inner = [], []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    wall, out = run_command(launcher, threads, args(tmp))
                walls.append(wall)
                if out.get("slices"):
                    inner.append(out["slices"][0]["seconds"])
            rows.append({"model": model, "job": job, "setup": setup, "wall_s": min(walls),
                         "slice_s": min(inner) if inner else None})
            print(rows[-1], flush=True)
    return rows


def processes(repeats: int) -> list[dict]:
    return time_jobs([(model, job, lambda tmp, c=ckpt, e=extra, cmd=cmd: [cmd, str(c), *e, "-o", f"{tmp}/run.h5"])
                      for model, ckpt in CKPTS.items()
                      for job, cmd, extra in (("slice 51x51", "scan", SLICE), ("hessian top-5 + trace", "hessian",
                                                                                  HESSIAN))], repeats)


def series(repeats: int) -> list[dict]:
    """``trajectory`` and ``compare``: several checkpoints per command."""
    ex = ROOT / "data/examples"
    mlps = [str(ex / f"mlp_sgd_s{s:04d}.pt") for s in (0, 100, 500, 2000)]
    cnns = [str(ex / f"cnn_{o}_s2000.pt") for o in ("sgd", "adam")]
    return time_jobs([
        ("mlp", "trajectory, 4 checkpoints (sharpness of each, 21x21 PCA plane)",
         lambda tmp: ["trajectory", *mlps, "--no-report", "--json", "-o", tmp]),
        ("cnn", "compare, 2 models (51x51 slice each, aligned linear path, Bezier curve)",
         lambda tmp: ["compare", *cnns, "--no-hessian", "--no-sharpness", "--no-coherence", "--align", "--curve",
                      "bezier", "--no-report", "--json", "-o", tmp]),
    ], repeats)


def mlp(width: int, depth: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Flatten()]
    sizes = [64] + [width] * depth
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def per_point_and_hvp(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    pb = Problem(model, X, y, torch.nn.functional.cross_entropy)
    dirs = random_directions(pb.theta0, 2, seed=0)
    lists = [pb.as_list(d) for d in dirs]
    pb.choose_strategy(lists)
    coeffs = np.linspace(-1, 1, 32).reshape(16, 2)
    t_point, _ = best_of(lambda: pb.evaluate_points(coeffs, lists), repeats)
    v = {n: torch.randn_like(t) for n, t in pb.theta0.items()}
    pb.hvp(v)  # engine choice and warm-up
    t_hvp, _ = best_of(lambda: pb.hvp(v), repeats)
    return t_point / 16, t_hvp


def growth(repeats: int) -> dict:
    torch.set_num_threads(2)
    data = load_data(Spec("digits", {}))
    X, y = data.X, data.y
    out: dict = {"parameters": [], "samples": [], "grid": []}
    for width in (32, 128, 512, 2048):
        model = mlp(width)
        point, hvp = per_point_and_hvp(model, X, y, repeats)
        out["parameters"].append({"width": width, "parameters": sum(p.numel() for p in model.parameters()),
                                  "ms_per_point": point * 1e3, "ms_per_hvp": hvp * 1e3})
        print(out["parameters"][-1], flush=True)
    for n in (180, 360, 720, len(X)):
        point, hvp = per_point_and_hvp(mlp(128), X[:n], y[:n], repeats)
        out["samples"].append({"samples": n, "ms_per_point": point * 1e3, "ms_per_hvp": hvp * 1e3})
        print(out["samples"][-1], flush=True)
    pb = Problem(mlp(128), X, y, torch.nn.functional.cross_entropy)
    dirs = random_directions(pb.theta0, 2, seed=0)
    for steps in (11, 21, 41, 61):
        a = axis(-1, 1, steps)
        t, _ = best_of(lambda: compute_slice(pb, dirs, (a, a)), repeats)
        out["grid"].append({"points": steps * steps, "seconds": t, "ms_per_point": t / steps ** 2 * 1e3})
        print(out["grid"][-1], flush=True)
    return out


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def stream(n: int, repeats: int) -> list[dict]:
    import h5py

    torch.set_num_threads(2)
    data = load_data(Spec("gaussian_mixture", {"n": n, "classes": 10, "dim": 64}))
    X, y = data.X, data.y
    tmp = Path(tempfile.mkdtemp())
    with h5py.File(tmp / "data.h5", "w") as f:
        f["X"], f["y"] = X.numpy(), y.numpy()
    torch.save({"X": X, "y": y}, tmp / "data.pt")
    for name in ("data.h5", "data.pt"):  # written back to disk, so that dropping their cached pages works
        fd = os.open(tmp / name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    model = mlp(128)
    sources = {"in memory": (lambda: X, None),
               "h5 (h5py)": (lambda: load_data(str(tmp / "data.h5"), stream="on").X, tmp / "data.h5"),
               "pt (mmap)": (lambda: load_data(str(tmp / "data.pt"), stream="on").X, tmp / "data.pt")}
    rows = []
    for name, (inputs, path) in sources.items():
        for cold in ([False] if path is None else [False, True]):
            pb = Problem(model, inputs(), y, torch.nn.functional.cross_entropy, batch_size=8192, strategy="inplace")
            dirs = [pb.as_list(d) for d in random_directions(pb.theta0, 2, seed=0)]
            pb.block = 16
            coeffs = np.linspace(-1, 1, 32).reshape(16, 2)
            v = {k: torch.randn_like(t) for k, t in pb.theta0.items()}
            pb.hvp_mode = "functional"  # the graph engine would keep every chunk's activations

            def timed(fn):  # noqa: ANN001, ANN202
                def run():  # noqa: ANN202
                    if cold:
                        _drop_cache(path)
                    return fn()
                run()
                return best_of(run, repeats)[0]

            row = {"source": name, "cache": "cold" if cold else ("warm" if path else "-"), "samples": n,
                   "inputs_mb": X.numel() * 4 / 2**20, "held_mb": (X.numel() if path is None else 8192 * 64) * 4 / 2**20,
                   "ms_per_point": timed(lambda: pb.evaluate_points(coeffs, dirs)) / 16 * 1e3,
                   "ms_per_gradient": timed(pb.gradient) * 1e3, "ms_per_hvp": timed(lambda: pb.hvp(v)) * 1e3}
            assert isinstance(pb.X, StreamedInputs) == (path is not None)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    args = parse(arguments(__doc__, threads=None, part="processes,growth", repeats=2, stream_samples=200_000))
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d")}
    parts = args.part.split(",")
    for part, fn in (("processes", processes), ("series", series)):
        if part in parts:
            result[part] = fn(args.repeats)
            print("\n| model | job | setup | command wall (s) | slice alone (s) |\n|---|---|---|---|---|")
            for r in result[part]:
                inner = f"{r['slice_s']:.2f}" if r["slice_s"] is not None else "-"
                print(f"| {r['model']} | {r['job']} | {r['setup']} | {r['wall_s']:.2f} | {inner} |")
    if "growth" in parts:
        result["growth"] = growth(args.repeats)
    if "stream" in parts:
        result["stream"] = stream(args.stream_samples, args.repeats)
        print("\n| inputs | page cache | held (MB) | ms per slice point | ms per gradient | ms per HVP |\n"
              "|---|---|---|---|---|---|")
        for r in result["stream"]:
            print(f"| {r['source']} | {r['cache']} | {r['held_mb']:.1f} | {r['ms_per_point']:.1f} | "
                  f"{r['ms_per_gradient']:.0f} | {r['ms_per_hvp']:.0f} |")
    out = ROOT / "benchmarks/out/bench_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
