"""Issue 23: the training monitor's overhead, per measure and in total (``python benchmarks/bench_monitor.py``).

Two models built in code train for ``--steps`` minibatch steps on this CPU (``--threads``), once without the monitor
and once with it for each configuration (the default measures, the same with ``max_overhead=0.05``, every measure,
each measure alone), at ``--every``. Overhead = (wall with - wall without) / wall without. Plain runs are interleaved with the
monitored ones (one before every four) and the best of ``--repeats`` is kept for each, because this VM's speed drifts over minutes; each
measure's own seconds are read from the run file as well (``seconds_<measure>``).

* ``resnet``: a CIFAR ResNet-8 (three stages of one basic block, widths 16/32/64, BatchNorm; 78K parameters) on
  random 3x32x32 images, batch 128, SGD with momentum;
* ``gpt2``: a ``transformers`` GPT-2 (2 layers, width 128, vocabulary 256, context 64; 0.44M parameters) on the
  built-in token language (:func:`landscape.io.hf.tokens`), batch 128 sequences (8,192 tokens), AdamW.

Both train with four times the monitor's probe of 32 samples (a language model's batch is usually far larger than
that in tokens: GPT-2 trained on 512 x 1024). ``--models gpt2:32`` trains a model with another batch size (the probe
stays at its 32 samples: the monitor's share of the training time goes as probe / batch, docs/monitor.md). ``--configs default,all`` runs only those configurations.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import BasicBlock  # noqa: E402
from timing import arguments, parse  # noqa: E402

from landscape.analyses.monitor import DEFAULT_MEASURES, MEASURES, Monitor  # noqa: E402


class ResNet8(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def setup(name: str):
    """Model, optimizer, inputs, targets, loss, batch size of a benchmark model (seeded: the same every call);
    ``name:B`` with batch size ``B``."""
    name, _, batch = name.partition(":")
    model, opt, X, y, loss, default = _setup(name)
    return model, opt, X, y, loss, int(batch) if batch else default


def _setup(name: str):
    torch.manual_seed(0)
    if name == "resnet":
        g = torch.Generator().manual_seed(0)
        X, y = torch.randn(2048, 3, 32, 32, generator=g), torch.randint(0, 10, (2048,), generator=g)
        model = ResNet8()
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), X, y, "cross_entropy", 128
    import transformers

    from landscape.io.hf import tokens

    transformers.logging.set_verbosity_error()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    ids, labels = tokens(n=2048, vocab=256, context=64)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), ids, labels, "causal_lm", 128


def train(name: str, steps: int, measures: tuple[str, ...] | None, every: int, folder: Path, **options) -> dict:
    """Wall time of ``steps`` training steps, with a monitor of ``measures`` (None: without one) made with
    ``options``."""
    from landscape.problem.losses import resolve_loss

    model, opt, X, y, loss_name, batch = setup(name)
    loss_fn = resolve_loss(loss_name)
    path = folder / f"{name}-{'-'.join(measures or ('none',))}-{time.monotonic_ns()}.h5"
    mon = Monitor(model, loss_name, (X, y), every=every, measures=measures, path=path, **options) if measures else None
    g = torch.Generator().manual_seed(1)
    t = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        out = model(X[idx])
        loss = loss_fn(out.logits if hasattr(out, "logits") else out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, optimizer=opt)
    wall = time.perf_counter() - t
    out = {"wall": wall}
    if mon is not None:
        mon.close()
        rows = mon.rows
        out["checks"] = len(rows)
        out["skipped"] = mon.skipped
        out["seconds"] = {k[len("seconds_"):]: sum(r[k] for r in rows) for k in rows[0] if k.startswith("seconds_")}
        out["check_seconds"] = sum(r["seconds"] for r in rows)
        out["per_check"] = [{"step": int(r["step"]), "seconds": r["seconds"],
                             **({"matvecs": int(r["sharpness_matvecs"])} if "sharpness_matvecs" in r else {})}
                            for r in rows]
        out["last"] = {k: rows[-1][k] for k in ("sharpness", "sharpness_matvecs", "trace", "grad_norm", "gsnr_mean",
                                                "b_noise", "m_coherence") if k in rows[-1]}
    return out


def main() -> None:
    ap = arguments(__doc__, models="resnet,gpt2", steps=300, every=100, repeats=2)
    ap.add_argument("--configs", default=None, help="only these configurations (comma-separated: default, all, ...)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = parse(ap)
    configs = {"default": (DEFAULT_MEASURES, {}), "default, max_overhead 5%": (DEFAULT_MEASURES, {"max_overhead": 0.05}),
               "all": (MEASURES, {}), **{m: ((m,), {}) for m in MEASURES}}
    if args.configs:
        configs = {k: configs[k] for k in args.configs.split(",")}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            plain, runs = [], {k: [] for k in configs}
            for _ in range(args.repeats):
                for i, (k, (ms, options)) in enumerate(configs.items()):
                    if i % 4 == 0:  # the plain run between every few monitored ones (the VM's speed drifts)
                        plain.append(train(name, args.steps, None, args.every, Path(tmp))["wall"])
                    runs[k].append(train(name, args.steps, ms, args.every, Path(tmp), **options))
                plain.append(train(name, args.steps, None, args.every, Path(tmp))["wall"])
            base = min(plain)
            results[name] = {"plain_wall": base, "plain_walls": plain}
            print(f"\n{name}: {args.steps} steps without the monitor: best {base:.2f} s "
                  f"(all {', '.join(f'{w:.2f}' for w in plain)})")
            print(f"{'measures':<26} {'wall s':>8} {'overhead':>9} {'checks':>6} {'skipped':>7} {'check s':>8} "
                  f"{'check share':>11}  seconds per measure")
            for k, rs in runs.items():
                best = min(rs, key=lambda r: r["wall"])
                over = best["wall"] / base - 1
                share = best["check_seconds"] / base
                results[name][k] = {**best, "overhead": over, "check_share": share}
                per = ", ".join(f"{m} {s:.2f}" for m, s in best["seconds"].items())
                print(f"{k:<26} {best['wall']:>8.2f} {100 * over:>8.1f}% {best['checks']:>6} {best['skipped']:>7} "
                      f"{best['check_seconds']:>8.2f} {100 * share:>10.1f}%  {per}")
            if "all" in results[name]:
                print("last check:", json.dumps(results[name]["all"]["last"]))
            print("default measures, each check (step: seconds, lambda_max products):",
                  ", ".join(f"{c['step']}: {c['seconds']:.2f} s, {c.get('matvecs', '-')}"
                            for c in results[name]["default"]["per_check"]) if "default" in results[name] else "-")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
