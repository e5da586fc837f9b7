"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``): their command line and
their timing."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def best_of(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    """The best wall time of ``repeats`` calls of ``fn`` and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out  # type: ignore[return-value]


def interleaved(fns: dict, repeats: int, reference: str) -> tuple[dict, dict]:
    """Time every function once per round for ``repeats`` rounds.

    Returns the best time of each, and for each the list over rounds of its time divided by ``reference``'s time in
    the same round: this VM's speed drifts by tens of percent over minutes, and a within-round ratio cancels that.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    ratio = {k: [a / b for a, b in zip(v, times[reference])] for k, v in times.items()}
    return best, ratio


def arguments(doc: str | None, *, threads: int | None = 2, **options: Any) -> argparse.ArgumentParser:
    """A benchmark's argument parser: its module docstring ``doc`` as the description, ``--threads`` (torch's
    intra-op threads; :func:`parse` sets them) unless ``threads`` is None, and one ``--name`` for each of
    ``options`` with that default and its type (``repeats=3`` -> ``--repeats N``; ``_`` in names becomes ``-``).
    Options of their own (flags, help texts) a script adds to the parser it gets back.

    >>> arguments("A benchmark.", repeats=3, models="a,b").parse_args(["--repeats", "5"])
    Namespace(threads=2, repeats=5, models='a,b')
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch's intra-op threads (default %(default)s)")
    for name, default in options.items():
        ap.add_argument("--" + name.replace("_", "-"), type=str if default is None else type(default),
                        default=default)
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line's values, with torch held at ``--threads`` intra-op threads (where the parser has it)."""
    import torch

    args = ap.parse_args()
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return args
