"""Benchmark: the scale ladder of issue 19, each command in its own process as a user runs it.

    python benchmarks/bench_scale.py [--threads 2] [--models mlp,resnet18,gpt2_25m,wide_mlp] [--samples 32]
                                     [--steps 11] [--memory-budget auto] [--no-pyhessian] [--out /tmp/bench_scale]

Models from ``benchmarks/scale_models.py`` (built in code, no downloads): an MLP (~1e5 parameters), ResNet-18 (11.2M,
10 classes), a GPT-2-style transformer (27M, from a ``transformers`` config) and a wide MLP (90M). Inputs are
CIFAR-shaped Gaussian images with random labels, or generated tokens for GPT-2; ``--samples`` of them.

For each model, in separate processes: ``landscape scan`` (defaults, ``--steps`` x ``--steps``, no report),
``landscape scan --dry-run`` (its per-phase predictions), ``landscape hessian --top-k 5`` (with the trace), and
PyHessian's ``eigenvalues(top_n=5)`` and ``trace()`` on the same model and batch. Reported: wall time, peak RSS
(``wait4``'s ``ru_maxrss``), run-file size beside the checkpoint's, Hessian-vector products and time per product.
Output: markdown tables for RESULTS.md.
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

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import scale_models  # noqa: E402

PYHESSIAN = """
import sys, time, json, torch, numpy as np
sys.path.insert(0, {here!r}); torch.set_num_threads({threads})
import scale_models
from pyhessian import hessian
from landscape import Problem
from landscape.budget import auto_budget
from landscape.curvature import CurvatureOperator
from landscape.lanczos import lanczos
from landscape.trace import hutchpp
model = getattr(scale_models, {name!r})(); model.load_state_dict(torch.load({ck!r}, weights_only=True)); model.eval()
d = torch.load({data!r}, weights_only=True)
out = {{}}
H = hessian(model, torch.nn.functional.cross_entropy, data=(d["X"], d["y"]), cuda=False)
t = time.perf_counter(); vals, _ = H.eigenvalues(top_n=5); out["pyhessian_eig_s"] = time.perf_counter() - t
out["pyhessian_eigenvalues"] = vals
t = time.perf_counter(); tr = H.trace(); out["pyhessian_trace_s"] = time.perf_counter() - t
out["pyhessian_trace"], out["pyhessian_trace_probes"] = float(np.mean(tr)), len(tr)
del H
pb = Problem(model, d["X"], d["y"], torch.nn.functional.cross_entropy, memory_budget=auto_budget())
op = CurvatureOperator(pb)
v = {{n: torch.randn_like(p) for n, p in pb.theta0.items()}}
pb.hvp(v); pb.hvp(v)
t = time.perf_counter()
for _ in range(5):
    pb.hvp(v)
out["hvp_s"] = (time.perf_counter() - t) / 5
for tol in (1e-3, 1e-6):
    t = time.perf_counter(); r = lanczos(op, op.n, k=5, tol=tol, budget=pb.memory_budget)
    out[f"ours_eig_s_tol{{tol:g}}"], out[f"ours_eig_hvp_tol{{tol:g}}"] = time.perf_counter() - t, r.n_matvec
    out[f"ours_eigenvalues_tol{{tol:g}}"] = r.eigenvalues.tolist()
t = time.perf_counter(); tr = hutchpp(op, op.n, max_matvec=99, budget=pb.memory_budget)
out["ours_trace_s"], out["ours_trace"], out["ours_trace_stderr"] = time.perf_counter() - t, tr.estimate, tr.stderr
out["ours_trace_hvp"] = tr.n_matvec
print(json.dumps(out))
"""


def run(args: list[str], threads: int, code: str | None = None) -> tuple[float, float, str, str]:
    """Wall seconds, peak RSS (MiB), stdout and stderr of ``landscape ARGS`` (or of ``code``) in a new process."""
    code = code or (f"import sys, torch; torch.set_num_threads({threads}); from landscape_cli.main import main; "
                    "sys.argv[0] = 'landscape'; main()")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return wall, usage.ru_maxrss / 1024, out.read(), err.read()


def prepare(name: str, n: int, folder: Path) -> tuple[list[str], Path, Path | None]:
    """Checkpoint and data for one model: the common command-line arguments, the checkpoint, the data file."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("gpt2"):
        model = scale_models.gpt2(name.split("_")[1])
        model.save_pretrained(folder / "ckpt")
        cfg = scale_models.gpt2_config(name.split("_")[1])
        args = [str(folder / "ckpt"), "--data", "tokens", "--data-arg", f"n={n}", "--data-arg",
                f"vocab={cfg['vocab_size']}", "--data-arg", "context=64"]
        return args, folder / "ckpt" / "model.safetensors", None
    model = getattr(scale_models, name)()
    torch.save(model.state_dict(), folder / "ckpt.pt")
    torch.save({"X": torch.randn(n, 3, 32, 32), "y": torch.randint(0, 10, (n,))}, folder / "data.pt")
    args = [str(folder / "ckpt.pt"), "--model", f"{HERE / 'scale_models.py'}:{name}", "--data",
            str(folder / "data.pt")]
    return args, folder / "ckpt.pt", folder / "data.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp,resnet18,gpt2_25m,wide_mlp")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--no-pyhessian", action="store_true")
    ap.add_argument("--skip-scan", action="store_true", help="only the dry run and the hessian command")
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="bench_scale_"))
    a = ap.parse_args()
    budget = ["--memory-budget", a.memory_budget] if a.memory_budget else []
    rows, phase_rows = [], []
    for name in a.models.split(","):
        folder = Path(a.out) / name
        common, ck, data = prepare(name, a.samples, folder)
        nparam = sum(p.numel() for p in (scale_models.gpt2(name.split("_")[1]) if name.startswith("gpt2")
                                         else getattr(scale_models, name)()).parameters())
        scan = [*common, "--steps", str(a.steps), "--no-report", *budget]
        _, _, dry_out, dry_err = run(["scan", *scan, "--dry-run", "--json", "-o", str(folder / "dry.h5")], a.threads)
        dry = json.loads(dry_out) if dry_out.strip() else {"phases": {}, "error": dry_err[-300:]}
        row = {"model": name, "parameters": nparam, "samples": a.samples, "checkpoint_mib": ck.stat().st_size / 2**20}
        if not a.skip_scan:
            wall, rss, out, err = run(["scan", *scan, "--json", "-o", str(folder / "scan.h5"), "--overwrite"], a.threads)
            row.update(scan_s=wall, scan_rss_mib=rss, scan_ok=bool(out.strip()),
                       run_file_mib=(folder / "scan.h5").stat().st_size / 2**20 if (folder / "scan.h5").exists() else None)
            if not out.strip():
                print(err[-2000:], file=sys.stderr)
        wall, rss, out, err = run(["hessian", *common, *budget, "--top-k", "5", "--json", "-o",
                                   str(folder / "hessian.h5")], a.threads)
        h = json.loads(out)["curvature"] if out.strip() else {}
        if not out.strip():
            print(err[-2000:], file=sys.stderr)
        row.update(hessian_s=wall, hessian_rss_mib=rss, n_hvp=h.get("n_matvec"), eigenvalues=h.get("eigenvalues"),
                   trace=(h.get("trace") or {}).get("estimate"),
                   predicted_total_s=dry.get("total_seconds"), predicted_peak_mib=(dry.get("memory_bytes") or 0) / 2**20,
                   predicted_hessian_s=dry.get("phases", {}).get("hessian", {}).get("seconds"),
                   predicted_hessian_mib=dry.get("phases", {}).get("hessian", {}).get("peak_bytes", 0) / 2**20)
        if not a.no_pyhessian and data is not None:
            code = PYHESSIAN.format(here=str(HERE), threads=a.threads, name=name, ck=str(ck), data=str(data))
            wall, rss, out, err = run([], a.threads, code=code)
            if out.strip():
                row.update(json.loads(out.strip().splitlines()[-1]), side_by_side_rss_mib=rss)
            else:
                print(err[-2000:], file=sys.stderr)
        rows.append(row)
        phase_rows.append((name, dry.get("phases", {})))
        print(json.dumps(row), flush=True)
    print("\n| model | parameters | samples | scan s | scan peak RSS MiB | run file MiB (ckpt) | hessian s | hessian peak "
          "MiB | HVPs | dry run: total s / peak MiB | dry run: hessian s / MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, p=1: "-" if v is None else f"{v:,.{p}f}"  # noqa: E731
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['samples']} | {f(r.get('scan_s'))} | "
              f"{f(r.get('scan_rss_mib'), 0)} | {f(r.get('run_file_mib'))} ({f(r['checkpoint_mib'])}) | "
              f"{f(r['hessian_s'])} | {f(r['hessian_rss_mib'], 0)} | {r['n_hvp']} | {f(r['predicted_total_s'])} / "
              f"{f(r['predicted_peak_mib'], 0)} | {f(r['predicted_hessian_s'])} / {f(r['predicted_hessian_mib'], 0)} |")
    print("\nSide by side in one process (same model and batch): seconds (HVPs)")
    print("\n| model | one HVP s | PyHessian top-5 | ours top-5, tol 1e-3 | ours top-5, tol 1e-6 | PyHessian trace | "
          "ours Hutch++ (99) | Hutch++ / its HVPs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "hvp_s" not in r:
            continue
        plain = r["hvp_s"] * r["ours_trace_hvp"]
        print(f"| {r['model']} | {r['hvp_s']:.3f} | {r['pyhessian_eig_s']:.1f} | {r['ours_eig_s_tol0.001']:.1f} "
              f"({r['ours_eig_hvp_tol0.001']}) | {r['ours_eig_s_tol1e-06']:.1f} ({r['ours_eig_hvp_tol1e-06']}) | "
              f"{r['pyhessian_trace_s']:.1f} ({r['pyhessian_trace_probes']}) | {r['ours_trace_s']:.1f} | "
              f"{r['ours_trace_s'] / plain:.2f} |")
    print("\nDry-run phases (seconds / peak MiB):")
    for name, phases in phase_rows:
        print(f"- {name}: " + ", ".join(f"{k} {v['seconds']:.1f} s / {v['peak_bytes'] / 2**20:,.0f} MiB"
                                        for k, v in phases.items()))


if __name__ == "__main__":
    main()
