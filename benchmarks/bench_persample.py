"""Benchmark: per-sample gradients by vmap against the loops users write, and memory per sample.

    python benchmarks/bench_persample.py [--threads 2] [--samples 512] [--repeats 3]

Workload: the shipped ``mlp_sgd_s2000.pt`` (8,970 parameters) and ``cnn_adam_s2000.pt`` (3,866 parameters, conv +
BatchNorm in eval mode) on ``--samples`` digits, float32. Methods, each producing the same ``(n, P)`` matrix:

* *naive loop*: for each sample, ``model.zero_grad(); loss(model(x[None]), y[None]).backward()`` and a copy of
  every ``.grad`` (what most scripts do);
* *torch.func loop*: ``landscape.problem.persample.per_sample_gradients(method="loop")``, one ``grad`` call per sample;
* *landscape vmap*: ``landscape.problem.persample.gradient_matrix`` (vmap over grad, chunked to a 256 MiB budget, each
  chunk written straight into the matrix);
* *landscape sketch (K=256)*: ``sketched_gradients`` (forward-mode products; an ``(n, 256)`` matrix instead).

The naive loop and vmap run once per round for ``--repeats`` interleaved rounds (this VM's speed drifts over
minutes); their times are the best round's, the speed-up is the median and range over rounds of the naive loop's
time over vmap's in the same round, after one warm-up call of each. The torch.func loop (for reference) is the
best of 3, after those rounds. Memory: the peak resident set of a fresh process computing one chunk by vmap,
minus that process's resident set before it, divided by the chunk size (``/proc/self/status`` VmHWM; Linux).
Output: markdown on stdout, JSON in ``benchmarks/out/bench_persample.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from landscape.problem.persample import gradient_matrix, per_sample_gradients, sketched_gradients
from landscape.analyses.scan import ScanConfig, setup
from timing import best_of, interleaved

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp_sgd_s2000", "cnn_adam_s2000")


def naive_loop(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(X)):
        model.zero_grad()
        F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(rows)


def vmhwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return -1


def memory_child(name: str, chunk: int, threads: int) -> None:
    """Run in a fresh process: peak RSS growth of one vmap chunk of ``chunk`` samples, printed as JSON."""
    torch.set_num_threads(threads)
    st = setup(ScanConfig(str(ROOT / "data" / "examples" / f"{name}.pt"), device="cpu", max_samples=chunk))
    pb = st.problem
    per_sample_gradients(pb, pb.X[:1], pb.y[:1])  # warm-up: libraries and kernels loaded
    base = int(Path("/proc/self/statm").read_text().split()[1]) * 4  # resident KiB now
    g = per_sample_gradients(pb, pb.X, pb.y)
    peak = vmhwm_kib()
    print(json.dumps({"chunk": chunk, "peak_growth_kib": peak - base, "gradient_bytes": g.numel() * g.element_size()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.threads)
        return
    torch.set_num_threads(args.threads)
    out: dict = {"threads": args.threads, "samples": args.samples, "torch": torch.__version__, "models": {}}
    print("| model | naive loop | torch.func loop | landscape vmap | speed-up vs naive | sketch K=256 | "
          "memory per sample (vmap) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        st = setup(ScanConfig(str(ROOT / "data" / "examples" / f"{name}.pt"), device="cpu",
                              max_samples=args.samples))
        pb = st.problem
        model = st.model.float().eval()
        X, y = pb.X, pb.y
        fns = {"naive": lambda: naive_loop(model, X, y), "vmap": lambda: gradient_matrix(pb, X, y)}
        warm = {k: fn() for k, fn in fns.items()}  # warm-up (vmap traces on its first call); compared below
        best, ratios = interleaved(fns, args.repeats, "vmap")
        t_naive, t_vmap = best["naive"], best["vmap"]
        t_floop, _ = best_of(lambda: per_sample_gradients(pb, X, y, method="loop"), 3)
        speedup = sorted(ratios["naive"])
        g_naive, g_vmap = warm["naive"], warm["vmap"]
        t_sketch, _ = best_of(lambda: sketched_gradients(pb, X, y, 256), 1)
        diff = float((g_naive - g_vmap).abs().max())
        mem = []
        for chunk in (64, 256):
            res = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--memory-child", name,
                                  str(chunk)], capture_output=True, text=True, check=True)
            mem.append(json.loads(res.stdout.strip().splitlines()[-1]))
        # growth between the two chunk sizes per extra sample: the marginal cost of one more sample in a chunk
        per_sample = (mem[1]["peak_growth_kib"] - mem[0]["peak_growth_kib"]) * 1024 / (256 - 64)
        grad_bytes = pb.num_parameters * 4
        out["models"][name] = {"n_parameters": pb.num_parameters, "naive_s": t_naive, "func_loop_s": t_floop,
                               "vmap_s": t_vmap, "speedup_vs_naive_per_round": speedup, "sketch256_s": t_sketch,
                               "max_abs_diff": diff, "memory": mem, "bytes_per_sample": per_sample,
                               "gradient_bytes_per_sample": grad_bytes}
        print(f"| {name} ({pb.num_parameters:,} params) | {t_naive:.2f} s | {t_floop:.2f} s | {t_vmap:.3f} s | "
              f"{statistics.median(speedup):.1f}× [{speedup[0]:.1f}–{speedup[-1]:.1f}] | {t_sketch:.2f} s | "
              f"{per_sample / 1024:.0f} KiB ({per_sample / grad_bytes:.1f}× one gradient) | {diff:.1e} |")
    path = ROOT / "benchmarks" / "out" / "bench_persample.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
