"""Benchmark: top-5 Hessian eigenvalues and the trace against an exact dense spectrum.

    python benchmarks/bench_hessian.py [--threads 2] [--samples 256]

Model: the shipped ``mlp_sgd_s2000.pt`` (8,970 parameters) on a seeded subset of the digits train split, float64.
Truth: the dense Hessian (one HVP per basis vector) and ``numpy.linalg.eigvalsh``. Side by side, on the same model,
data and precision:

* landscape ``lanczos`` (full reorthogonalization, tol 1e-6) over our HVP;
* PyHessian 0.1 ``hessian(...).eigenvalues(top_n=5, tol=1e-6, maxIter=1000)`` (power iteration with deflation;
  its HVPs counted by wrapping the ``hessian_vector_product`` it calls);
* hessian-eigenthings 1.0.0a5 ``lanczos`` on its own ``HessianOperator`` (fixed step count: the smallest
  ``max_iter`` from a ladder that reaches 1e-6, and its default ``max_iter = 2k``);
* SciPy ``eigsh(which='LA', tol=1e-6)`` over our HVP.

Top-5 times are the best of 5 calls, set-up excluded for every tool (our gradient graph, PyHessian's
``create_graph`` backward, hessian-eigenthings' operator). Trace at about 100 matvecs: landscape Hutch++ (99), plain Hutchinson (100) and PyHessian ``trace(maxIter=100)``
(with ``tol=0`` so that it runs 100 probes, and with its default ``tol=1e-3``), mean absolute relative error over
5 seeds. Output: a markdown table on stdout, JSON in ``benchmarks/out/bench_hessian.json``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from landscape.problem.curvature import CurvatureOperator
from landscape.linalg.lanczos import lanczos
from landscape.analyses.scan import ScanConfig, setup
from landscape.linalg.trace import hutchinson, hutchpp
from timing import arguments, best_of, parse

CKPT = Path(__file__).resolve().parents[1] / "data" / "examples" / "mlp_sgd_s2000.pt"


def rel_err(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.max(np.abs(np.sort(found)[::-1] - exact) / np.abs(exact)))


def main() -> None:
    args = parse(arguments(__doc__, samples=256))
    st = setup(ScanConfig(str(CKPT), dtype="float64", max_samples=args.samples, device="cpu"))
    pb = st.problem
    op = CurvatureOperator(pb)
    n = op.n

    t = time.perf_counter()
    H = np.column_stack([op.matvec(e) for e in np.eye(n)])
    H = (H + H.T) / 2
    evals = np.linalg.eigvalsh(H)
    exact_top, exact_trace = evals[::-1][:5], float(np.trace(H))
    truth_seconds = time.perf_counter() - t
    rows = []

    sec, res = best_of(lambda: lanczos(op, n, k=5, tol=1e-6), 5)
    rows.append({"method": "landscape lanczos (tol 1e-6)", "hvps": res.n_matvec, "seconds": sec,
                 "max_rel_error": rel_err(res.eigenvalues, exact_top)})

    import sys

    import pyhessian  # noqa: F401  (its __init__ rebinds the name `pyhessian.hessian` to the class)

    ph = sys.modules["pyhessian.hessian"]

    model = st.model.double().eval()
    X, y = pb.X, pb.y
    calls = {"n": 0}
    real_hvp = ph.hessian_vector_product

    def counting(*a, **k):
        calls["n"] += 1
        return real_hvp(*a, **k)

    ph.hessian_vector_product = counting
    for tol in (1e-3, 1e-6):
        hc = ph.hessian(model, F.cross_entropy, data=(X, y), cuda=False)
        calls["n"] = 0
        sec, (vals, _) = best_of(lambda: hc.eigenvalues(top_n=5, tol=tol, maxIter=1000), 5)
        rows.append({"method": f"PyHessian eigenvalues(top_n=5, tol={tol:g})", "hvps": calls["n"] // 5, "seconds": sec,
                     "max_rel_error": rel_err(np.array(vals), exact_top)})

    import hessian_eigenthings as he

    hop = he.HessianOperator(model, [(X, y)], he.supervised_loss(F.cross_entropy))
    for steps in (10, 20, 30, 40, 60, 80, 120):
        sec, r = best_of(lambda: he.lanczos(hop, k=5, max_iter=steps, which="LA", tol=1e-6, seed=0), 5)
        err = rel_err(r.eigenvalues.detach().cpu().numpy(), exact_top)
        if steps == 10 or err <= 1e-6:
            rows.append({"method": f"hessian-eigenthings lanczos(max_iter={steps})", "hvps": steps, "seconds": sec,
                         "max_rel_error": err})
        if err <= 1e-6:
            break

    from scipy.sparse.linalg import LinearOperator, eigsh

    op.n_matvec = 0
    sec, (vals, _) = best_of(lambda: eigsh(LinearOperator((n, n), matvec=op.matvec, dtype=np.float64), k=5,
                                           which="LA", tol=1e-6, v0=np.random.default_rng(0).standard_normal(n)), 5)
    rows.append({"method": "scipy eigsh(which='LA', tol=1e-6) over our HVP", "hvps": op.n_matvec // 5, "seconds": sec,
                 "max_rel_error": rel_err(vals, exact_top)})

    trace_rows = []
    for name, fn in {
        "landscape hutch++ (99 matvecs)": lambda s: hutchpp(op, n, max_matvec=99, seed=s).estimate,
        "landscape hutchinson (100 matvecs)": lambda s: hutchinson(op, n, max_matvec=100, seed=s).estimate,
    }.items():
        errs, t0 = [], time.perf_counter()
        for s in range(5):
            errs.append(abs(fn(s) - exact_trace) / abs(exact_trace))
        trace_rows.append({"method": name, "mean_rel_error": float(np.mean(errs)),
                           "seconds_per_estimate": (time.perf_counter() - t0) / 5, "matvecs": 99 if "++" in name else 100})
    for tol in (0.0, 1e-3):
        errs, its, t0 = [], [], time.perf_counter()
        for s in range(5):
            torch.manual_seed(s)
            calls["n"] = 0
            hc = ph.hessian(model, F.cross_entropy, data=(X, y), cuda=False)
            errs.append(abs(float(np.mean(hc.trace(maxIter=100, tol=tol))) - exact_trace) / abs(exact_trace))
            its.append(calls["n"])
        trace_rows.append({"method": f"PyHessian trace(maxIter=100, tol={tol:g})", "mean_rel_error": float(np.mean(errs)),
                           "seconds_per_estimate": (time.perf_counter() - t0) / 5, "matvecs": float(np.mean(its))})
    ph.hessian_vector_product = real_hvp

    out = {"machine": platform.platform(), "torch": torch.__version__, "threads": args.threads, "n_parameters": n,
           "hvp_mode": pb.hvp_engine, "hvp_engine_timings_s": getattr(pb, "hvp_timings", None),
           "n_samples": pb.n, "exact_top5": exact_top.tolist(), "exact_trace": exact_trace,
           "truth_seconds": truth_seconds, "top5": rows, "trace": trace_rows}
    d = Path(__file__).resolve().parent / "out"
    d.mkdir(exist_ok=True)
    (d / "bench_hessian.json").write_text(json.dumps(out, indent=2))
    print(f"{n:,} parameters, {pb.n} samples, float64, {args.threads} threads; exact top-5 {np.round(exact_top, 6)}, "
          f"trace {exact_trace:.6g} (dense truth in {truth_seconds:.0f} s)\n")
    print("| top-5 method | HVPs | ms (best of 5) | max rel. error |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['hvps']} | {r['seconds'] * 1e3:.1f} | {r['max_rel_error']:.1e} |")
    print("\n| trace method | matvecs | seconds per estimate | mean rel. error (5 seeds) |\n|---|---|---|---|")
    for r in trace_rows:
        print(f"| {r['method']} | {r['matvecs']:g} | {r['seconds_per_estimate']:.2f} | {r['mean_rel_error']:.1e} |")


if __name__ == "__main__":
    main()
