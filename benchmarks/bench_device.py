"""Benchmark: the evaluation engine on one device (meant for a GPU; runs on the CPU too).

    python benchmarks/bench_device.py --device cuda [--repeats 5] [--threads 2]

On the shipped CNN and MLP and on a wide MLP (64 -> 2048 -> 2048 -> 10, 4.3M parameters), over the digits train
split (1,438 samples), it measures:

* forward limit: plain ``model(X)`` passes of a frozen copy, per point;
* the slice engine per point with each strategy (``inplace``, ``vmap`` over blocks of 8 and 32 points) and what
  ``auto`` picks: the ratio to the forward limit and the vmap batching gain;
* precision: per point time and largest relative loss error of ``bf16`` (and ``tf32`` on CUDA) on 64 points;
* HVP throughput: products per second with the engine ``auto`` picks, and as multiples of a forward pass.

Results: a markdown table on stdout and ``benchmarks/out/bench_device_<device>.json``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from landscape.io.checkpoint import load_checkpoint
from landscape.io.data import load_data
from landscape.analyses.directions import random_directions
from landscape.problem import Problem
from landscape.analyses.scan import build_model
from landscape.io.specs import Spec

sys.path.insert(0, str(Path(__file__).parent))
from bench_scaling import mlp  # noqa: E402
from timing import arguments, best_of, parse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def synced(fn, device: torch.device):
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


def models() -> dict[str, torch.nn.Module]:
    out = {}
    for name, file in (("mlp", "mlp_sgd_s2000.pt"), ("cnn", "cnn_adam_s2000.pt")):
        out[name] = build_model(load_checkpoint(ROOT / "data/examples" / file), None)[0]
    out["mlp-2048"] = mlp(2048)
    return out


def bench(name: str, model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, device: torch.device,
          repeats: int) -> dict:
    row: dict = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    frozen = model.to(device).eval().requires_grad_(False)
    Xd = X.to(device)
    points = 64
    coeffs = np.stack(np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8)), -1).reshape(-1, 2)

    def forwards():
        with torch.inference_mode():
            for _ in range(points):
                frozen(Xd)

    row["forward_ms"] = best_of(synced(forwards, device), repeats)[0] / points * 1e3
    for strategy, block in (("inplace", 32), ("vmap", 8), ("vmap", 32)):
        pb = Problem(model, X, y, torch.nn.functional.cross_entropy, device=device, strategy=strategy)
        dirs = [pb.as_list(d) for d in random_directions(pb.theta0, 2, seed=0)]
        pb.block = block
        try:
            t = best_of(synced(lambda: pb.evaluate_points(coeffs, dirs), device), repeats)[0]
        except (RuntimeError, torch.OutOfMemoryError) as err:
            row[f"{strategy}{block}_ms"] = None
            row[f"{strategy}{block}_error"] = str(err).splitlines()[0][:80]
            continue
        row[f"{strategy}{block}_ms"] = t / points * 1e3
    pb = Problem(model, X, y, torch.nn.functional.cross_entropy, device=device)
    dirs = [pb.as_list(d) for d in random_directions(pb.theta0, 2, seed=0)]
    row["auto"] = f"{pb.choose_strategy(dirs)} ({pb.block})"
    full = pb.evaluate_points(coeffs, dirs)["loss"]
    for precision in ("bf16", "tf32") if device.type == "cuda" else ("bf16",):
        low = Problem(model, X, y, torch.nn.functional.cross_entropy, device=device, precision=precision,
                      strategy="inplace")
        low.block = 32
        t, vals = best_of(synced(lambda: low.evaluate_points(coeffs, dirs), device), repeats)
        row[f"{precision}_ms"] = t / points * 1e3
        row[f"{precision}_max_rel_error"] = float(np.max(np.abs(vals["loss"] - full) / np.abs(full)))
    v = {n: torch.randn_like(t) for n, t in pb.theta0.items()}
    pb.hvp(v)
    t_hvp = best_of(synced(lambda: pb.hvp(v), device), repeats)[0]
    row["hvp_per_s"] = 1 / t_hvp
    row["hvp_engine"] = pb.hvp_engine
    row["hvp_in_forwards"] = t_hvp * 1e3 / row["forward_ms"]
    return row


def main() -> None:
    args = parse(arguments(__doc__, device="cuda" if torch.cuda.is_available() else "cpu", repeats=5))
    device = torch.device(args.device)
    data = load_data(Spec("digits", {}))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}"
    rows = [bench(k, m, data.X, data.y, device, args.repeats) for k, m in models().items()]
    print(f"\ndevice: {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | params | forward ms | inplace ms (×fwd) | vmap8 ms | vmap32 ms | auto | bf16 ms (max rel err) "
          "| HVP/s (× fwd) |\n|---|---|---|---|---|---|---|---|---|")

    def ms(r: dict, k: str) -> str:
        return "—" if r.get(k) is None else f"{r[k]:.3f}"

    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['forward_ms']:.3f} | {ms(r, 'inplace32_ms')} "
              f"({r['inplace32_ms'] / r['forward_ms']:.2f}×) | {ms(r, 'vmap8_ms')} | {ms(r, 'vmap32_ms')} | {r['auto']} "
              f"| {r['bf16_ms']:.3f} ({r['bf16_max_rel_error']:.1e}) | {r['hvp_per_s']:.0f} ({r['hvp_in_forwards']:.1f}) |")
    out = ROOT / f"benchmarks/out/bench_device_{device.type}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
