"""How a Problem evaluates slice points, chosen by timing: the strategy (``inplace`` or ``vmap``), the block size and
the number of concurrent replicas, measured on the actual model and data.

With ``strategy="auto"``, ``inplace`` and ``vmap`` are both timed on a block of 8 points (``vmap`` on fewer when the
memory budget does not hold 8 points' activations), and ``vmap`` also on the largest block of about
``block_seconds`` of work whose activations fit ``memory_budget`` (at most ``max_block``) when it is within 1.5x of
in-place: batching gains grow with the block on a GPU. ``vmap`` is kept when it is at least 20% faster per point (it
is dropped when it cannot trace the model or runs out of memory), with the block size it was fastest at. For
``inplace`` the block is what fits the memory budget and about ``block_seconds`` of work. A block's stacked outputs
take at most :data:`OUTPUTS_SHARE` of the budget, and the input layers' cached outputs the rest
(:mod:`landscape.problem.inputlayer`), so that the two together stay within it. The most memory a trial
added is kept as ``strategy_memory`` (the dry run's slice phase counts it).

On a CPU with ``workers="auto"``, in-place blocks are then also timed ``torch.get_num_threads()`` at a time on as
many concurrent replicas of the model, one intra-op thread each (:mod:`landscape.problem.replica`), against one block
at a time on all threads, both at the real block size (8-point trial blocks are biased against the replicas by their
fixed cost per block), the replicas after a round that warms them up (:func:`settle_workers`). They are kept when at
least 5% faster per point: the copies are already within the memory budget, and a wrong pick costs about as much
either way.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..io.stream import StreamedInputs
from ..runtime.budget import AddedMemory

if TYPE_CHECKING:
    from .points import PointEvaluator

#: a slice's own blocks are timed on N replicas (2 rounds of N blocks, N threads) only when it has this many times
#: those 2N blocks: the replicas, should they lose, then run at most a tenth of the slice
WORKERS_TIMING_SHARE = 10
#: the share of the memory budget a block's stacked outputs may take; the input layers' cache gets the rest
OUTPUTS_SHARE = 0.5
#: a trial stops repeating its timed calls once they have taken this many seconds (:func:`_per_point`)
TIMING_SECONDS = 1.0
Values = dict[int, dict[str, np.ndarray]]


def choose(ev: "PointEvaluator", dirs: Sequence[list[torch.Tensor]] | None,
           blocks: Callable[[int], Sequence[np.ndarray]] | None, *, repeats: int = 3) -> Values:
    """Set ``ev``'s strategy, block, workers, ``strategy_timings`` and ``strategy_memory`` by timing them (see the
    module's docstring), and return the values of the points this evaluated as the chosen settings will.

    ``blocks(block)`` gives the blocks to time the replicas on: a slice passes its own blocks (see
    :func:`landscape.analyses.slices.block_points`), so that the timing is not wasted work, and the values of those
    evaluated with the setting that was kept come back, keyed by position in that list (a block's values depend only
    on its points and on that setting). A slice with fewer than :data:`WORKERS_TIMING_SHARE` times the 2N blocks the
    replicas take keeps one worker (when they lose, the timing would cost more than it can save); without
    ``blocks``, made-up points are timed and nothing comes back.
    """
    pb = ev.problem
    if not dirs:
        dirs = [[torch.randn_like(t) * 1e-3 for t in pb._theta0_list]]
    (s, e) = pb._chunks[0]
    with torch.inference_mode():
        first = pb._model(pb.X[s:e])
    out_bytes = first.numel() * first.element_size() * pb.n / (e - s)
    mem_block = int(max(1, min(ev.max_block, OUTPUTS_SHARE * pb.memory_budget // max(out_bytes, 1))))
    candidates = ["inplace", "vmap"] if ev.strategy == "auto" else [ev.strategy]
    timings, vmap_block, ev.strategy_memory = _time_strategies(ev, dirs, candidates, mem_block, repeats)
    # in-place is timed on a trial block smaller than the one it then runs, which favours vmap; vmap has to
    # win clearly (20%) so that timing noise does not pick the slower strategy
    ev.strategy = "vmap" if timings.get("vmap", float("inf")) < 0.8 * timings.get("inplace", float("inf")) \
        else candidates[0]
    fixed = ev.strategy == "inplace" and pb.device.type == "cpu" and ev._workers_setting != "auto"
    ev.workers = int(ev._workers_setting) if fixed else 1
    if ev.strategy == "vmap":
        ev.block = vmap_block  # vmap's cost per point depends on the block size: keep the one that was timed
    else:
        ev.block = int(max(1, min(mem_block, ev.block_seconds // max(timings["inplace"], 1e-9))))
    ready: Values = {}
    threads = torch.get_num_threads()
    if ev.strategy == "inplace" and ev._workers_setting == "auto" and may_share_out(ev, threads):
        need = 1 + 2 * threads  # blocks settle_workers evaluates, 2 * threads of them on the replicas
        if blocks is None:
            made_up = np.linspace(-0.1, 0.1, need * ev.block * len(dirs)).reshape(need, ev.block, len(dirs))
            settle_workers(ev, list(made_up), dirs, threads, timings)
        elif len(own := blocks(ev.block)) >= WORKERS_TIMING_SHARE * 2 * threads:
            ready = settle_workers(ev, own, dirs, threads, timings)
    ev.strategy_timings = timings
    # under torchrun every rank evaluates with rank 0's choice (timings differ from rank to rank)
    chosen = (ev.strategy, ev.block, ev.workers)
    ev.strategy, ev.block, ev.workers = pb.comm.broadcast(chosen)
    # a rank whose own timing chose otherwise evaluated those blocks in another way; the points are shared out
    # over the ranks anyway, so values are only handed back in a single process
    return ready if pb.comm.world == 1 and chosen == (ev.strategy, ev.block, ev.workers) else {}


def _time_strategies(ev: "PointEvaluator", dirs: Sequence[list[torch.Tensor]], candidates: Sequence[str],
                     mem_block: int, repeats: int) -> tuple[dict[str, float], int, int]:
    """Seconds per point of each candidate strategy on a trial block (of at most 8 points), the block ``vmap`` was
    fastest at, and the most memory a trial added (:class:`landscape.runtime.budget.AddedMemory`).

    ``vmap`` holds the activations of all its points at once, and a copy of the parameters for each: under ``auto``
    its trial block is at most as many points as the memory budget holds of what the in-place trial added (one
    point's activations at a time) plus the parameters' bytes, and it is not tried when that is under two. Its cost
    per point falls with the block on a GPU (4x from 8 to 32 points on an H100, RESULTS.md), so when it is within
    1.5x of in-place at the trial block it is timed again at the largest block that is about ``block_seconds`` of
    work (as an in-place block is) and fits the budget at the memory per point its trial took. (Without those two bounds it was timed at 32 points on a ResNet-18 with 256
    samples whenever the VM's noise put it within 1.5x: 5.4 GB and ~20 s of the slice phase, or neither.)"""
    budget = ev.problem.memory_budget
    trial = max(1, min(mem_block, 8))
    timings: dict[str, float] = {}
    added: dict[str, int] = {}

    def timed(name: str, k: int, beat: float = float("inf")) -> float:
        try:
            seconds, added[name] = _per_point(ev, ev._evaluate_vmap if name == "vmap" else ev.evaluate_inplace, dirs,
                                              k, repeats, beat)
        except Exception:  # vmap cannot run this model (or not this block): not an error, not a candidate
            if ev.strategy != "auto":
                raise
            return float("inf")
        return seconds

    vmap_block = trial
    for name in candidates:
        if name == "vmap" and "inplace" in added:
            vmap_block = int(min(trial, budget // (added["inplace"] + ev.problem.parameter_bytes)))
            if vmap_block < 2:
                timings[name] = float("inf")
                continue
        timings[name] = timed(name, trial if name == "inplace" else vmap_block,
                              min(timings.values(), default=float("inf")))
    peak = max(added.values(), default=0)
    if "vmap" in added and timings["vmap"] < 1.5 * timings.get("inplace", float("inf")):
        per_point = added["vmap"] / vmap_block
        big = int(min(mem_block, ev.block_seconds // max(timings["vmap"], 1e-9), budget // max(per_point, 1)))
        if big > vmap_block:
            seconds = timed("vmap", big, timings.get("inplace", float("inf")))
            peak = max(peak, added["vmap"])
            if seconds < timings["vmap"]:
                timings["vmap"], vmap_block = seconds, big
    return timings, vmap_block, peak


def _per_point(ev: "PointEvaluator", fn: Callable[..., object], dirs: Sequence[list[torch.Tensor]], k: int,
               repeats: int, beat: float) -> tuple[float, int]:
    """Best of ``repeats`` timings of ``fn`` on ``k`` points, per point, after a warm-up (of one point on a CPU,
    where nothing depends on the block's shape), and the memory the calls added at their peak. Stops early once
    the best is over 1.5x ``beat`` (a candidate that clearly loses needs no precise time) or once the timed calls
    have taken :data:`TIMING_SECONDS` (a longer call's time is not made more precise by repeats than the 20% a
    choice needs; ResNet-18's in-place trial on 256 samples took 2.3 s with three repeats of 8 points, 1.9 s with
    two, of a 16 s slice)."""
    pb = ev.problem
    coeffs = np.linspace(-0.1, 0.1, k * len(dirs)).reshape(k, len(dirs))
    cuda = pb.device.type == "cuda"
    best, spent = float("inf"), 0.0
    with AddedMemory(pb.device) as added:
        fn(coeffs if cuda else coeffs[:1], dirs, precision=pb.precision)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            fn(coeffs, dirs, precision=pb.precision)
            if cuda:
                torch.cuda.synchronize(pb.device)
            t = time.perf_counter() - t
            best, spent = min(best, t), spent + t
            if best / k > 1.5 * beat or spent >= TIMING_SECONDS:
                break
    return best / k, added.bytes


def settle_workers(ev: "PointEvaluator", blocks: Sequence[np.ndarray], dirs: Sequence[list[torch.Tensor]],
                   threads: int, timings: dict[str, float]) -> Values:
    """Evaluate ``blocks`` in order: one block on all threads, then two rounds of ``threads`` blocks on as many
    replicas; set ``ev.workers`` from the time per point of the first block and of the second round. The replicas'
    first round only warms them up: a setting's first blocks after the other's run up to 1.5x slower (rounds that
    took turns measured that switch instead of the settings), while one block at a time runs warm, right after the
    trial timing on the same threads. A warm-up round 2x slower per point than the first block already settles it
    (one worker), without the second round. Returns the values of the blocks evaluated with the setting kept, by
    position in ``blocks`` (see :func:`choose`)."""
    got: dict[int, Values] = {1: {}, threads: {}}
    per_point: dict[int, float] = {}
    at = 0
    for r, workers in enumerate((1, threads, threads)):
        part = list(range(at, at + workers))
        at += workers
        ev.workers = workers
        try:
            t = time.perf_counter()
            got[workers].update(zip(part, ev.evaluate_blocks([blocks[i] for i in part], dirs)))
            t = time.perf_counter() - t
        finally:
            ev.workers = 1
        per_point[workers] = t / sum(len(blocks[i]) for i in part)  # the second round's replaces the first's
        if r == 1 and per_point[threads] > 2 * per_point[1]:
            break  # the warm-up round already loses clearly
    one, shared = per_point[1], per_point[threads]
    timings[f"inplace x1 ({ev.block})"], timings[f"inplace x{threads} ({ev.block})"] = one, shared
    ev.workers = threads if shared < 0.95 * one else 1
    return got[ev.workers]


def may_share_out(ev: "PointEvaluator", threads: int) -> bool:
    """Whether concurrent replicas are worth timing: more than one intra-op thread on a CPU, inputs in memory, and a
    model whose copies take at most an eighth of the memory budget."""
    pb = ev.problem
    return (threads > 1 and pb.device.type == "cpu" and not isinstance(pb.X, StreamedInputs)
            and pb.parameter_bytes * (threads - 1) <= pb.memory_budget / 8)
