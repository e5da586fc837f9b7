"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

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
