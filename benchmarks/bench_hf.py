"""Benchmark: HuggingFace GPT-2-style models from a config, scanned as a user would (issue 18).

    python benchmarks/bench_hf.py [--threads 2] [--sizes tiny,10m] [--out /tmp/bench_hf]

For each size a ``GPT2LMHeadModel`` is built from a config in code (no download), saved with ``save_pretrained``,
and then run through the command line as a user would, each command in its own process:

* ``landscape scan DIR --data tokens ... --steps S`` (the full default analysis set on an SxS slice, no report);
* ``landscape hessian DIR --data tokens ...`` (top-5 eigenvalues by Lanczos and the Hutch++ trace, defaults);
* ``landscape scan DIR ... --dry-run`` (what the dry run predicts for the same scan).

Wall time and the process's peak resident memory (``wait4``'s ``ru_maxrss``) are reported beside the physical
limits measured in this process on the same model and tokens: one forward pass over the evaluation set and one
gradient. Output: a markdown table for RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from timing import arguments, parse

SIZES = {
    # name: (GPT2Config fields, token-data arguments, slice steps)
    "tiny": (dict(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4), dict(n=64, vocab=256, context=32), 11),
    "10m": (dict(vocab_size=8192, n_positions=64, n_embd=320, n_layer=6, n_head=5), dict(n=16, vocab=8192, context=32), 5),
}


def build(folder: Path, config: dict) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=0, eos_token_id=0, **config)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return model


#: a process that imports what every command below imports and does nothing: the floor of the peak RSS column
BASELINE = "import transformers, landscape.analyses.scan, landscape_cli.main"


def run(cmd: list[str], threads: int, code: str | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of one ``landscape`` command (or of ``code``) in its own process."""
    code = code or (f"import sys, torch; torch.set_num_threads({threads}); from landscape_cli.main import main; "
                    "sys.argv[0] = 'landscape'; main()")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *cmd], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()}")
        return wall, usage.ru_maxrss / 1024, out.read()


def main() -> None:
    ap = arguments(__doc__, sizes="tiny,10m")
    ap.add_argument("--out", default=None, help="folder for the models and run files (default: a temporary one)")
    args = parse(ap)
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_hf_"))
    _, base_rss, _ = run([], args.threads, code=BASELINE)
    rows = []
    for size in args.sizes.split(","):
        config, data, steps = SIZES[size]
        folder = root / size
        model = build(folder, config)
        n_params = sum(p.numel() for p in model.parameters())
        specs = ["--data", "tokens", *sum((["--data-arg", f"{k}={v}"] for k, v in data.items()), [])]
        from landscape.io.hf import causal_lm, tokens

        X, y = tokens(**data)
        with torch.no_grad():
            t = time.perf_counter()
            causal_lm(model(X).logits, y)
            forward = time.perf_counter() - t
        t = time.perf_counter()
        causal_lm(model(X).logits, y).backward()
        gradient = time.perf_counter() - t
        scan = ["scan", str(folder), *specs, "--steps", str(steps), "--no-report", "--json"]
        dry_wall, _, dry = run([*scan, "--dry-run", "-o", str(root / f"{size}_dry")], args.threads)
        dry = json.loads(dry)
        scan_wall, scan_rss, scan_out = run([*scan, "-o", str(root / f"{size}_scan")], args.threads)
        hess_wall, hess_rss, hess_out = run(["hessian", str(folder), *specs, "--json", "-o", str(root / f"{size}_h")],
                                            args.threads)
        h = json.loads(hess_out)["curvature"]
        rows.append((size, n_params, data, steps, forward, gradient, scan_wall, scan_rss, dry, hess_wall, hess_rss, h))
        print(f"{size}: done", file=sys.stderr)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, causal_lm loss, `--data tokens` "
          f"(no padding); a process that only imports torch, transformers and landscape peaks at {base_rss:.0f} MiB\n")
    print("| model | parameters | sequences x tokens | forward / gradient (s) | scan (s) | scan peak RSS (MiB) "
          "| dry run: predicted total (s), memory (MiB) | hessian (s) | hessian peak RSS (MiB) | products | "
          "lambda_1 |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for size, n, data, steps, fw, gr, sw, sr, dry, hw, hr, h in rows:
        print(f"| GPT-2 {size} | {n:,} | {data['n']} x {data['context']} | {fw:.3f} / {gr:.3f} | {sw:.1f} "
              f"({steps}x{steps} slice + defaults) | {sr:.0f} | {dry['total_seconds']:.1f}, "
              f"{dry['memory_bytes'] / 2**20:.0f} | {hw:.1f} | {hr:.0f} | {h['n_matvec']} | "
              f"{h['eigenvalues'][0]:.4g} |")


if __name__ == "__main__":
    main()
