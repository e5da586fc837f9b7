"""Benchmark: the scale ladder of issue 19, each command in its own process as a user runs it.

    python benchmarks/bench_scale.py [--threads 2] [--models mlp,resnet18,gpt2_25m,wide_mlp] [--samples 32]
                                     [--steps 11] [--memory-budget auto] [--no-pyhessian] [--no-side-by-side] [--out /tmp/bench_scale]
                                     [--device cuda] [--precisions full,bf16] [--context 64] [--deadline SECONDS]
    python benchmarks/bench_scale.py --growth | --hutchpp [--samples 256] | --engines
    python benchmarks/bench_scale.py --lanczos-steps 5:40,5:15 [--models resnet18] [--samples 64]

Models from ``benchmarks/scale_models.py`` (built in code, no downloads): an MLP (~1e5 parameters), ResNet-18 (11.2M,
10 classes), a GPT-2-style transformer (27M, from a ``transformers`` config) and a wide MLP (90M); ``vit_tiny`` (5.4M,
a ``transformers`` ViT saved as a ``save_pretrained`` folder) on request. Inputs are
CIFAR-shaped Gaussian images with random labels, or generated tokens for GPT-2; ``--samples`` of them.

For each model, in separate processes: ``landscape scan`` (defaults, ``--steps`` x ``--steps``, no report),
``landscape scan --dry-run`` (its per-phase predictions), ``landscape hessian --top-k 5`` (with the trace), and
PyHessian's ``eigenvalues(top_n=5)`` and ``trace()`` on the same model and batch (GPT-2 through a wrapper that
returns its logits, with the next-token loss). Reported: wall time, peak RSS (``wait4``'s ``ru_maxrss``), peak CUDA
memory on a GPU, run-file size beside the checkpoint's, Hessian-vector products and time per product.

On a GPU (``--device cuda``): one scan and its dry run per entry of ``--precisions`` (``bf16`` lowers the slice's
forward passes, products stay float32: after the first, only the slice is scanned), and the side-by-side process also times a short Lanczos run with its basis
on the host against one on the GPU, and a Hessian-vector product under bf16 autocast against float32 with its
error. ``--deadline`` skips what would start after that many seconds (each result is printed as it comes).
``--hutchpp``: only Hutch++'s time against that of its plain products on ResNet-18 (``--samples``), with its block in
float64 and in float32. ``--growth``: only the time per product over an MLP family (1.6e5 to 9e7 parameters, 8 to
512 samples each) and its fits to a line in parameters x samples and to one in parameters and parameters x samples.
``--engines``: only ``--hvp auto``'s choice of engine on ResNet-18 at 64, 256 and 512 samples (:func:`engine_choice`).
``--lanczos-steps K:M,...``: only the top-``K`` Lanczos's products with an ``M``-column basis on each of ``--models``,
beside the dry run's count (:func:`lanczos_steps_by_basis`).

Output: markdown tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
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
from landscape import Problem
from landscape.runtime.budget import auto_budget
from landscape.problem.curvature import CurvatureOperator
from landscape.linalg.lanczos import lanczos
from landscape.linalg.trace import hutchpp, sketch_dtype
from landscape.linalg.vectors import native, vector_device
dev = torch.device({device!r})
sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
model, X, y, loss = scale_models.side_by_side({name!r}, {ck!r}, {data!r}, {samples}, {context})
model = model.to(dev).eval()
out = {{}}
def clock():
    sync(); return time.perf_counter()
if {pyhessian}:
    from pyhessian import hessian
    ph = sys.modules["pyhessian.hessian"]  # the module (the package's attribute of that name is the class)
    count = [0]
    def counted(*a, hv=ph.hessian_vector_product):
        count[0] += 1
        return hv(*a)
    ph.hessian_vector_product = counted  # what eigenvalues() calls on a whole batch: its products counted
    H = hessian(model, loss, data=(X.to(dev), y.to(dev)), cuda=dev.type == "cuda")
    t = clock(); vals, _ = H.eigenvalues(top_n=5); out["pyhessian_eig_s"] = clock() - t
    out["pyhessian_eigenvalues"], out["pyhessian_eig_hvp"] = vals, count[0]
    print(json.dumps(out), flush=True)
    # at our default tolerance (its rule: the eigenvalue's relative change between iterations), up to 300 a pair
    count[0] = 0
    t = clock(); vals, _ = H.eigenvalues(top_n=5, tol=1e-4, maxIter=300); out["pyhessian_eig_s_tol1e-4"] = clock() - t
    out["pyhessian_eigenvalues_tol1e-4"], out["pyhessian_eig_hvp_tol1e-4"] = vals, count[0]
    print(json.dumps(out), flush=True)
    t = clock(); tr = H.trace(); out["pyhessian_trace_s"] = clock() - t
    out["pyhessian_trace"], out["pyhessian_trace_probes"] = float(np.mean(tr)), len(tr)
    del H
    print(json.dumps(out), flush=True)
pb = Problem(model, X, y, loss, memory_budget=auto_budget(), device=dev)
op = CurvatureOperator(pb)
vdev = vector_device(dev, op.n, 41)
v = native(np.random.default_rng(0).standard_normal(op.n), vdev)
op(v); op(v)
t = clock()
for _ in range(5):
    op(v)
out["hvp_s"] = (clock() - t) / 5
for tol in (1e-3, 1e-4, 1e-6):
    t = clock(); r = lanczos(op, op.n, k=5, tol=tol, budget=pb.memory_budget, device=vdev)
    out[f"ours_eig_s_tol{{tol:g}}"], out[f"ours_eig_hvp_tol{{tol:g}}"] = clock() - t, r.n_matvec
    out[f"ours_eigenvalues_tol{{tol:g}}"] = r.eigenvalues.tolist()
    print(json.dumps(out), flush=True)
t = clock(); tr = hutchpp(op, op.n, max_matvec=99, budget=pb.memory_budget, device=vdev, dtype=sketch_dtype(pb.dtype))
out["ours_trace_s"], out["ours_trace"], out["ours_trace_stderr"] = clock() - t, tr.estimate, tr.stderr
out["ours_trace_hvp"] = tr.n_matvec
print(json.dumps(out), flush=True)
if vdev is not None:  # the same 15 products with the basis on the host, then on the GPU
    for where, d in (("host", None), ("gpu", vdev)):
        t = clock(); r = lanczos(op, op.n, k=5, tol=1e-12, max_matvec=15, verify=False, budget=pb.memory_budget,
                                 device=d)
        out[f"lanczos15_{{where}}_s"] = clock() - t
    params = dict(pb.theta0)
    vp = op.to_params(v)
    from torch.func import functional_call, grad, jvp
    def hvp():
        g = lambda p: grad(lambda q: pb.loss_fn(functional_call(model, q, (X.to(dev),)), y.to(dev)))(p)
        return jvp(g, (params,), (vp,))[1]
    try:
        ref = hvp()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = hvp(); low = hvp()
            t = clock(); [hvp() for _ in range(3)]; out["hvp_bf16_autocast_s"] = (clock() - t) / 3
        t = clock(); [hvp() for _ in range(3)]; out["hvp_func_fp32_s"] = (clock() - t) / 3
        num = sum(float(((low[k].float() - ref[k]) ** 2).sum()) for k in ref)
        out["hvp_bf16_rel_error"] = (num / sum(float((ref[k] ** 2).sum()) for k in ref)) ** 0.5
    except Exception as err:
        out["hvp_bf16_error"] = repr(err)[:300]
    out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
print(json.dumps(out), flush=True)
"""

#: appended to the command of a landscape process on a GPU: its peak CUDA memory, as the last line of stderr
CUDA_PEAK = ("import atexit; atexit.register(lambda: torch.cuda.is_available() and print('CUDA_PEAK', "
             "torch.cuda.max_memory_allocated(), file=sys.stderr)); ")


def run(args: list[str], threads: int, code: str | None = None, timeout: float | None = None
        ) -> tuple[float, float, str, str]:
    """Wall seconds, peak RSS (MiB), stdout and stderr of ``landscape ARGS`` (or of ``code``) in a new process,
    killed after ``timeout`` seconds."""
    code = code or (f"import sys, torch; torch.set_num_threads({threads}); {CUDA_PEAK}"
                    "from landscape_cli.main import main; sys.argv[0] = 'landscape'; main()")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, env=env)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        if timer:
            timer.cancel()
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        return wall, usage.ru_maxrss / 1024, out.read(), err.read()


def cuda_peak_mib(err: str) -> float | None:
    lines = [ln for ln in err.splitlines() if ln.startswith("CUDA_PEAK ")]
    return int(lines[-1].split()[1]) / 2**20 if lines else None


def prepare(name: str, n: int, folder: Path, context: int) -> tuple[list[str], Path, Path | None]:
    """Checkpoint and data for one model: the common command-line arguments, the checkpoint, the data file."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if name.startswith("gpt2"):
        model = scale_models.gpt2(name.split("_")[1])
        model.save_pretrained(folder / "ckpt")
        cfg = scale_models.gpt2_config(name.split("_")[1])
        args = [str(folder / "ckpt"), "--data", "tokens", "--data-arg", f"n={n}", "--data-arg",
                f"vocab={cfg['vocab_size']}", "--data-arg", f"context={context}"]
        return args, folder / "ckpt", None
    model = scale_models.build(name)
    torch.save({"X": torch.randn(n, 3, 32, 32), "y": torch.randint(0, 10, (n,))}, folder / "data.pt")
    if name.startswith("vit"):  # a save_pretrained folder: no model flags
        model.save_pretrained(folder / "ckpt")
        return [str(folder / "ckpt"), "--data", str(folder / "data.pt")], folder / "ckpt", folder / "data.pt"
    torch.save(model.state_dict(), folder / "ckpt.pt")
    args = [str(folder / "ckpt.pt"), "--model", f"{HERE / 'scale_models.py'}:{name}", "--data",
            str(folder / "data.pt")]
    return args, folder / "ckpt.pt", folder / "data.pt"


def growth(threads: int, repeats: int = 5, widths: tuple[int, ...] = (48, 512, 1600, 3000, 5000),
           samples: tuple[int, ...] = (8, 32, 128, 512)) -> list[dict]:
    """Seconds per Hessian-vector product of the curvature operator (its float64 conversions included) over MLPs of
    the ladder's family (3x32x32 inputs, four hidden layers of each of ``widths``: 1.6e5 to 9e7 parameters) on each
    of ``samples``, the best of ``repeats`` after two warm-ups (this VM's noise only ever adds time; ``spread`` is
    the slowest over the best), inside the allocator hold every CLI command runs in
    (:func:`landscape.runtime.allocator.reuse_freed_memory`); then the fits of :func:`fit_growth`."""
    import numpy as np

    from landscape import Problem
    from landscape.problem.curvature import CurvatureOperator
    from landscape.runtime.allocator import reuse_freed_memory

    torch.set_num_threads(threads)
    out = []
    with reuse_freed_memory():
        for width in widths:
            torch.manual_seed(0)
            model = scale_models.mlp(width=width, depth=4)
            for n in samples:
                pb = Problem(model, torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)),
                             torch.nn.functional.cross_entropy)
                op = CurvatureOperator(pb)
                v = np.random.default_rng(0).standard_normal(op.n)
                for _ in range(2):  # warm-ups
                    op(v)
                times = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    op(v)
                    times.append(time.perf_counter() - t)
                out.append({"width": width, "samples": n, "parameters": op.n, "hvp_s": min(times),
                            "spread": max(times) / min(times) - 1})
                print(json.dumps(out[-1]), flush=True)
                del pb, op, v
            del model
    fit_growth(out)
    return out


def fit_growth(out: list[dict]) -> None:
    """Two fits to the products' times by least squares on relative errors, printed with each point's deviation as
    a markdown table: the issue's line ``t = a + b P N``, and ``t = a + b P + c P N`` (non-negative coefficients),
    which adds the product's passes over the parameters (weights, gradients, tangents, the float64 vectors in and
    out: a cost per parameter whatever the samples) to its arithmetic per parameter and sample."""
    import numpy as np
    from scipy.optimize import nnls

    p = np.array([r["parameters"] for r in out], dtype=float)
    pn = p * np.array([r["samples"] for r in out])
    t = np.array([r["hvp_s"] for r in out])
    line, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(t), pn]) / t[:, None], np.ones_like(t), rcond=None)
    two, _ = nnls(np.column_stack([np.ones_like(t), p, pn]) / t[:, None], np.ones_like(t))
    for r, fit1, fit2 in zip(out, line[0] + line[1] * pn, two[0] + two[1] * p + two[2] * pn):
        r["line_s"], r["two_s"] = float(fit1), float(fit2)
    dev1 = t / np.array([r["line_s"] for r in out]) - 1
    dev2 = t / np.array([r["two_s"] for r in out]) - 1
    print(f"\nt = {line[0]:.4g} s + {line[1] * 1e12:.4g} ps x P x N: largest deviation {np.abs(dev1).max():.1%}")
    print(f"t = {two[0]:.4g} s + {two[1] * 1e9:.4g} ns x P + {two[2] * 1e12:.4g} ps x P x N: largest deviation "
          f"{np.abs(dev2).max():.1%}")
    print("\n| width | parameters | samples | HVP s | spread | ns per parameter | a + b P N | deviation "
          "| a + b P + c P N | deviation |\n|---|---|---|---|---|---|---|---|---|---|")
    for r, d1, d2 in zip(out, dev1, dev2):
        print(f"| {r['width']} | {r['parameters']:,} | {r['samples']} | {r['hvp_s']:.4f} | {r['spread']:.0%} | "
              f"{r['hvp_s'] / r['parameters'] * 1e9:.1f} | {r['line_s']:.4f} | {d1:+.1%} | {r['two_s']:.4f} | "
              f"{d2:+.1%} |")


def hutchpp_overhead(threads: int, samples: int, folder: Path, rounds: int = 1) -> None:
    """Hutch++ (99 products) against the time of its own products, on the ladder's ResNet-18 in one process inside
    the CLI's allocator hold, as ``landscape hessian --trace-method hutch++`` runs it: the products are timed where
    Hutch++ calls them, so the ratio does not depend on this VM's drift between runs (2x within a session), and 33
    plain products (four float64 vectors in turn) come first for reference. Each round runs Hutch++ with its block
    in float64 and in float32 (:func:`landscape.linalg.trace.sketch_dtype`), alternating which goes first."""
    import numpy as np

    from landscape.analyses.scan import ScanConfig, setup
    from landscape.io.specs import Spec
    from landscape.linalg.trace import hutchpp
    from landscape.linalg.vectors import product
    from landscape.problem.curvature import CurvatureOperator
    from landscape.runtime.allocator import reuse_freed_memory

    torch.set_num_threads(threads)
    _, ck, data = prepare("resnet18", samples, folder, 0)
    with reuse_freed_memory():
        st = setup(ScanConfig(checkpoint=str(ck), model=Spec(f"{HERE / 'scale_models.py'}:resnet18"),
                              data=Spec(str(data))))
        pb = st.problem
        op = CurvatureOperator(pb)
        vs = [np.random.default_rng(i).standard_normal(op.n) for i in range(4)]
        for v in vs[:2]:  # warm-ups
            product(op, v)
        spent = [0.0]

        def timed(v: np.ndarray) -> np.ndarray:
            t = time.perf_counter()
            w = op(v)
            spent[0] += time.perf_counter() - t
            return w

        print("| round | plain product s | block | Hutch++ s | its products s | its own s | Hutch++ / its products "
              "| estimate ± stderr |\n|---|---|---|---|---|---|---|---|")
        for r in range(rounds):
            t = time.perf_counter()
            for i in range(33):
                product(op, vs[i % 4])
            plain = (time.perf_counter() - t) / 33
            for dtype in (np.float64, np.float32)[::1 if r % 2 == 0 else -1]:
                spent[0] = 0.0
                t = time.perf_counter()
                tr = hutchpp(timed, op.n, max_matvec=99, budget=pb.memory_budget, dtype=dtype)
                took = time.perf_counter() - t
                print(f"| {r + 1} | {plain:.3f} | {tr.vector_dtype} | {took:.1f} | {spent[0]:.1f} ({tr.n_matvec}) | "
                      f"{took - spent[0]:.1f} | {took / spent[0]:.3f} | {tr.estimate:.6f} ± {tr.stderr:.4f} |",
                      flush=True)


def engine_choice(threads: int, sample_counts: tuple[int, ...], folder: Path) -> None:
    """``--hvp auto``'s choice on the ladder's ResNet-18 at each of ``sample_counts`` samples, in one process inside
    the CLI's allocator hold, at the ``auto`` budget and at one a little under twice the graph's bytes (where the
    graph is refused): the bytes the graph engine's graph was counted to hold, the resident memory the choice left
    (heap trimmed), each candidate's seconds a product and the memory it needed, and the engines kept."""
    from landscape.analyses.scan import ScanConfig, setup
    from landscape.io.specs import Spec
    from landscape.problem.curvature import CurvatureOperator
    from landscape.runtime.allocator import release_freed_memory, reuse_freed_memory
    from landscape.runtime.budget import rss

    torch.set_num_threads(threads)
    mib = 2**20
    print("| samples | budget MiB | graph MiB counted | kept after the choice MiB | graph s / MiB "
          "| forward-over-reverse s / MiB | reverse-over-reverse s / MiB | picked | torch.func elsewhere | choice s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for n in sample_counts:
        _, ck, data = prepare("resnet18", n, folder / f"resnet18_{n}", 0)
        budget = None
        for _ in range(2):
            with reuse_freed_memory():
                st = setup(ScanConfig(checkpoint=str(ck), model=Spec(f"{HERE / 'scale_models.py'}:resnet18"),
                                      data=Spec(str(data)), memory_budget=budget, output=str(folder / "x.h5")))
                pb = st.problem
                release_freed_memory()
                before, t = rss(), time.perf_counter()
                CurvatureOperator(pb).budget()
                took = time.perf_counter() - t
                release_freed_memory()
                kept = rss() - before
                cells = [f"{pb.hvp_timings[e]:.2f} / {pb.products.footprints[e] / mib:,.0f}"
                         if e in pb.hvp_timings else "(refused)"
                         for e in ("graph", "forward-over-reverse", "reverse-over-reverse")]
                print(f"| {n} | {pb.memory_budget / mib:,.0f} | {pb.products.graph_bytes / mib:,.0f} "
                      f"| {kept / mib:,.0f} | {' | '.join(cells)} | {pb.hvp_engine} | {pb.products.functional_mode} "
                      f"| {took:.1f} |", flush=True)
                budget = 1.9 * pb.products.graph_bytes
                del st, pb


def lanczos_steps_by_basis(threads: int, name: str, samples: int, context: int, runs: list[tuple[int, int]],
                           folder: Path) -> None:
    """Products of the top-``k`` Lanczos (tolerance 1e-6, verification included) on one ladder model at each
    ``(k, basis columns)`` of ``runs``, beside the dry run's count (:func:`landscape.analyses.costs.lanczos_steps`
    plus the ``k`` verifying products): the data its fit was made from. Products are timed at the ``auto`` budget,
    the basis in memory whatever its size."""
    from landscape import Problem
    from landscape.analyses.costs import lanczos_steps
    from landscape.linalg.lanczos import lanczos
    from landscape.problem.curvature import CurvatureOperator
    from landscape.runtime.budget import auto_budget

    torch.set_num_threads(threads)
    _, ck, data = prepare(name, samples, folder / f"{name}_{samples}", context)
    model, X, y, loss = scale_models.side_by_side(name, str(ck), str(data) if data else None, samples, context)
    op = CurvatureOperator(Problem(model.eval(), X, y, loss, memory_budget=auto_budget()))
    print("| model | samples | k | basis | products | counted | seconds | eigenvalues |\n"
          "|---|---|---|---|---|---|---|---|")
    for k, m in runs:
        t = time.perf_counter()
        r = lanczos(op, op.n, k=k, tol=1e-6, max_basis=m, max_matvec=2000)
        print(f"| {name} | {samples} | {k} | {m} | {r.n_matvec} | {lanczos_steps(k, m, 1e-6, 2000) + k} "
              f"| {time.perf_counter() - t:.1f} | {', '.join(f'{e:.5g}' for e in r.eigenvalues)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp,resnet18,gpt2_25m,wide_mlp")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--context", type=int, default=64, help="tokens per GPT-2 sample")
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="full", help="slice precisions to scan at, e.g. full,bf16")
    ap.add_argument("--deadline", type=float, default=None, help="start nothing after this many seconds")
    ap.add_argument("--no-pyhessian", action="store_true", help="the side-by-side process without PyHessian")
    ap.add_argument("--no-side-by-side", action="store_true", help="no side-by-side process at all")
    ap.add_argument("--skip-scan", action="store_true", help="only the dry run and the hessian command")
    ap.add_argument("--growth", action="store_true", help="only the per-product growth over an MLP family")
    ap.add_argument("--hutchpp", action="store_true",
                    help="only Hutch++ against its plain products on ResNet-18 (float64 and float32 blocks)")
    ap.add_argument("--engines", action="store_true",
                    help="only --hvp auto's choice on ResNet-18 at 64, 256 and 512 samples (seconds and memory)")
    ap.add_argument("--lanczos-steps", default=None, metavar="K:M,...",
                    help="only the top-k Lanczos's products at each k and basis size, on each of --models")
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="bench_scale_"))
    a = ap.parse_args()
    if a.lanczos_steps:
        runs = [tuple(int(x) for x in r.split(":")) for r in a.lanczos_steps.split(",")]
        for name in a.models.split(","):
            lanczos_steps_by_basis(a.threads, name, a.samples, a.context, runs, Path(a.out))
        return
    if a.engines:
        engine_choice(a.threads, (64, 256, 512), Path(a.out))
        return
    if a.growth:
        growth(a.threads)
        return
    if a.hutchpp:
        hutchpp_overhead(a.threads, a.samples, Path(a.out) / "resnet18")
        return
    t0 = time.perf_counter()

    def left() -> float | None:
        return None if a.deadline is None else a.deadline - (time.perf_counter() - t0)

    def go() -> bool:
        return a.deadline is None or left() > 10

    budget = ["--memory-budget", a.memory_budget] if a.memory_budget else []
    device = ["--device", a.device]
    rows, phase_rows = [], []
    for name in a.models.split(","):
        folder = Path(a.out) / name
        common, ck, data = prepare(name, a.samples, folder, a.context)
        nparam = sum(p.numel() for p in scale_models.build(name).parameters())
        ck_file = ck / "model.safetensors" if ck.is_dir() else ck
        row = {"model": name, "parameters": nparam, "samples": a.samples, "device": a.device,
               "checkpoint_mib": ck_file.stat().st_size / 2**20}
        if go():
            (folder / "hessian.h5").unlink(missing_ok=True)  # else `hessian` resumes it, finding the work done
            wall, rss, out, err = run(["hessian", *common, *budget, *device, "--top-k", "5", "--json", "-o",
                                       str(folder / "hessian.h5")], a.threads, timeout=left())
            h = json.loads(out)["curvature"] if out.strip() else {}
            if not out.strip():
                print(err[-2000:], file=sys.stderr)
            row.update(hessian_s=wall, hessian_rss_mib=rss, hessian_cuda_mib=cuda_peak_mib(err),
                       n_hvp=h.get("n_matvec"), eigenvalues=h.get("eigenvalues"),
                       trace=(h.get("trace") or {}).get("estimate"))
            print(json.dumps(row), flush=True)
        for i, precision in enumerate(a.precisions.split(",")):
            # a second precision changes only the slice's forward passes: only the slice is scanned again
            only_slice = ["--no-hessian", "--no-sharpness", "--no-coherence"] if i else []
            scan = [*common, *device, "--steps", str(a.steps), "--no-report", "--precision", precision, *budget,
                    *only_slice]
            tag = "" if precision == "full" else f"_{precision}"
            if not go():
                break
            _, _, dry_out, dry_err = run(["scan", *scan, "--dry-run", "--json", "-o", str(folder / "dry.h5")],
                                         a.threads, timeout=left())
            dry = json.loads(dry_out) if dry_out.strip() else {"phases": {}, "error": dry_err[-300:]}
            row.update({f"predicted_total_s{tag}": dry.get("total_seconds"),
                        f"predicted_peak_mib{tag}": (dry.get("memory_bytes") or 0) / 2**20,
                        f"predicted_hessian_s{tag}": dry.get("phases", {}).get("hessian", {}).get("seconds"),
                        f"predicted_hessian_mib{tag}":
                            dry.get("phases", {}).get("hessian", {}).get("peak_bytes", 0) / 2**20})
            phase_rows.append((name + tag, dry.get("phases", {})))
            if a.skip_scan or not go():
                continue
            wall, rss, out, err = run(["scan", *scan, "--json", "-o", str(folder / "scan.h5"), "--overwrite"],
                                      a.threads, timeout=left())
            row.update({f"scan_s{tag}": wall, f"scan_rss_mib{tag}": rss, f"scan_cuda_mib{tag}": cuda_peak_mib(err),
                        f"scan_ok{tag}": bool(out.strip()),
                        f"run_file_mib{tag}": (folder / "scan.h5").stat().st_size / 2**20
                        if (folder / "scan.h5").exists() else None})
            if out.strip():
                row[f"scan_seconds{tag}"] = {k: v for k, v in json.loads(out).items() if "seconds" in k}
            else:
                print(err[-2000:], file=sys.stderr)
            print(json.dumps(row), flush=True)
        if not a.no_side_by_side and go():
            code = PYHESSIAN.format(here=str(HERE), threads=a.threads, name=name, ck=str(ck),
                                    data=str(data) if data else None, samples=a.samples, context=a.context,
                                    device=a.device, pyhessian=not a.no_pyhessian)
            wall, rss, out, err = run([], a.threads, code=code, timeout=left())
            if out.strip():
                row.update(json.loads(out.strip().splitlines()[-1]), side_by_side_rss_mib=rss)
            if "ours_trace_s" not in row:
                print(err[-2000:], file=sys.stderr)
            print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| model | parameters | samples | scan s | scan peak RSS MiB | run file MiB (ckpt) | hessian s | hessian peak "
          "MiB | HVPs | dry run: total s / peak MiB | dry run: hessian s / MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, p=1: "-" if v is None else f"{v:,.{p}f}"  # noqa: E731
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['samples']} | {f(r.get('scan_s'))} | "
              f"{f(r.get('scan_rss_mib'), 0)} | {f(r.get('run_file_mib'))} ({f(r['checkpoint_mib'])}) | "
              f"{f(r.get('hessian_s'))} | {f(r.get('hessian_rss_mib'), 0)} | {r.get('n_hvp')} | "
              f"{f(r.get('predicted_total_s'))} / {f(r.get('predicted_peak_mib'), 0)} | "
              f"{f(r.get('predicted_hessian_s'))} / {f(r.get('predicted_hessian_mib'), 0)} |")
    print("\nSide by side in one process (same model and batch): seconds (HVPs)")
    tols = ("0.001", "0.0001", "1e-06")
    print("\n| model | one HVP s | PyHessian top-5 | PyHessian top-5, tol 1e-4 | "
          + " | ".join(f"ours top-5, tol {float(t):g}" for t in tols)
          + " | PyHessian trace | ours Hutch++ (99) | Hutch++ / its HVPs |")
    print("|---" * (8 + len(tols)) + "|")
    for r in rows:
        if "ours_trace_s" not in r:
            continue
        plain = r["hvp_s"] * r["ours_trace_hvp"]
        ours = " | ".join(f"{r[f'ours_eig_s_tol{t}']:.1f} ({r[f'ours_eig_hvp_tol{t}']})" for t in tols)
        pyh = [f"{f(r.get(f'pyhessian_eig_s{t}'))} ({r.get(f'pyhessian_eig_hvp{t}', '-')})" for t in ("", "_tol1e-4")]
        print(f"| {r['model']} | {r['hvp_s']:.3f} | {' | '.join(pyh)} | {ours} | "
              f"{f(r.get('pyhessian_trace_s'))} ({r.get('pyhessian_trace_probes', '-')}) | {r['ours_trace_s']:.1f} | "
              f"{r['ours_trace_s'] / plain:.2f} |")
    print("\nDry-run phases (seconds / peak MiB):")
    for name, phases in phase_rows:
        print(f"- {name}: " + ", ".join(f"{k} {v['seconds']:.1f} s / {v['peak_bytes'] / 2**20:,.0f} MiB"
                                        for k, v in phases.items()))


if __name__ == "__main__":
    main()
