"""The ``--dry-run`` cost model: each phase's seconds and peak memory from products measured on the real model,
data and batch size, and counts of what each algorithm does with them.

A phase's time is ``sum over kinds of work (count x measured seconds of one)``: forward passes, gradients,
Hessian-vector products, per-sample-gradient chunks, draws of P random numbers, elementwise operations on P-long
vectors and the basis work of Lanczos and Hutch++ (:class:`VectorCosts`). The counts come from the algorithms
(:func:`landscape.analyses.sharpness.work`, :func:`curvature_seconds`, :func:`coherence_cost`); searches whose length
depends on the answer (PAC-Bayes's sigma, basin width) are counted at a typical length.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..runtime.blas import single_blas_thread
from ..runtime.budget import measured
from .coherence import (Batches, CoherenceSettings, GradientStats, accumulator_vectors, add_bytes_per_row,
                        coordinate_ranges, random_batches, row_norms, sample_labels)
from ..linalg.draws import normal, signs
from .batchsize import check_batch_sizes
from ..problem.curvature import CurvatureOperator, select_parameters
from .hessian import CurvatureSettings, class_members, class_settings, layer_settings, with_ends
from ..linalg.lanczos import basis_device, basis_size, restart_keep
from ..problem.persample import chunk_size, gradient_sum, iter_gradients, per_sample_gradients
from ..problem.problem import Problem
from .sharpness import SharpnessSettings, keeps_draws, work
from ..io.stream import rows
from ..linalg.trace import probe_block, sketch_dtype
from .validity import LEVELS, validity_radius
from ..linalg.vectors import BLOCK_ROWS, ColumnStore, native, vector_device


@dataclass(frozen=True)
class VectorCosts:
    """Seconds of the vector work around each product, measured on a real :class:`ColumnStore` of the operator's
    length: ``column`` for storing (or reading) one vector, ``pass_column`` for one column of a Gram-Schmidt sweep
    (a projection and an update: :meth:`ColumnStore.project` plus :meth:`ColumnStore.subtract`),
    ``first_column`` for storing one into fresh memory (page faults: each new basis pays it per column),
    ``block`` per multiply-add of a pass of matrix products over a block (a Gram matrix ``V^T V`` of ``c``
    columns costs ``c^2 n`` of them: measured at up to 9 columns, within 1.5x of 33 at 11M) and ``signs`` for
    drawing ``n`` random signs (:func:`landscape.linalg.draws.signs`, where the store lives). Each but the first
    touch is the median of three (:func:`_seconds`): a Lanczos run multiplies ``pass_column`` by about ``m^2 / 2``
    (1,500 for the top 5), so that a single timing the VM's noise caught would move the whole prediction (one dry
    run put a ResNet-18's Hessian phase at 289 s where three others said 101-106 s and the run took 129 s)."""

    column: float
    pass_column: float
    first_column: float
    block: float
    signs: float

    @staticmethod
    def measure(n: int, budget: float, device: torch.device | None = None) -> "VectorCosts":
        """On a store like the run's: on the host within ``budget`` (or on disk), or on ``device``."""
        cols = 8 if device is not None else int(max(1, min(8, budget // (8 * n) - 1)))
        store = ColumnStore(n, cols + 1, budget=budget, device=device)
        w = store.native(np.ones(n))
        where = device or torch.device("cpu")
        with single_blas_thread():
            # first touch of fresh memory, as a run's first pass over a new basis (once: then it is not fresh)
            t = time.perf_counter()
            for i in range(cols + 1):
                store.set_column(i, w)
            if where.type == "cuda":
                torch.cuda.synchronize(where)
            first = (time.perf_counter() - t) / (cols + 1)
            column = _seconds(lambda: store.set_column(cols, w), where)
            sweep = _seconds(lambda: store.subtract(w, store.project(w, cols), cols, project_after=True), where)
            gram = _seconds(lambda: store.gram(cols + 1), where)
        store.close()
        draw = _seconds(lambda: signs(n, seed=0, device=device), where)
        return VectorCosts(column=column, pass_column=sweep / cols, first_column=first,
                           block=gram / ((cols + 1) ** 2 * n), signs=draw)

    def scaled(self, ratio: float) -> "VectorCosts":
        """The costs for vectors ``ratio`` times as long (a multiply-add's cost stays)."""
        return VectorCosts(column=self.column * ratio, pass_column=self.pass_column * ratio,
                           first_column=self.first_column * ratio, block=self.block, signs=self.signs * ratio)


#: The Gauss-Newton's top eigenpairs take fewer Lanczos steps than the Hessian's (its outliers stand further from
#: its bulk): the top 5 took 44 steps on the ladder's MLP (its Hessian's 77) and 18 on ResNet-18 (76), 0.57x and
#: 0.24x (RESULTS.md, issue 19, session 27); counted at their geometric mean
GGN_STEPS = 0.37


def lanczos_steps(k: int, m: int, tol: float, max_hvp: int, kind: str = "hessian") -> int:
    """Products a thick-restarted :func:`~landscape.linalg.lanczos.lanczos` run for ``k`` extreme pairs is counted
    at before its verification, at most ``max_hvp``: ``S(k) t(tol) r(m)``, times :data:`GGN_STEPS` for the
    Gauss-Newton.

    How many it takes depends on the spectrum (the gaps around the ``k``-th eigenvalue), which a dry run cannot know;
    the three factors are fitted on the ladder's models (``benchmarks/RESULTS.md``, session 26).
    ``S(k) = 40 sqrt(k)`` to a relative residual of 1e-6 with the default basis: 89 for the top 5, measured 74 on
    the 1e5-parameter MLP, 76 on ResNet-18, 101 on GPT-2 small's shape and 108 on the 27M GPT-2; 40 for ``k = 1``
    (34-42), 126 for ``k = 10`` (113 on both the MLP and ResNet-18), 179 for ``k = 20`` (145 on the MLP): within
    1.25x of each. ``t(tol) = 0.55 + 0.075 log10(1 / tol)``: each decade of tolerance is about 7 of the top 5's
    steps (at 1e-3: 0.70x on ResNet-18, 0.76x on GPT-2 small, 0.77x on the MLP; 0.775 counted).
    ``r(m) = (m_0 / m)^0.1`` for a basis of ``m`` columns below the ``m_0 = max(2k + 20, 40)`` the fit was made
    at: a thick restart keeps ``k + (m - k) / 2`` of them, so a small basis costs few extra products (measured 1.09x
    at ``2k + 5 = 15`` columns on ResNet-18, 1.12x on the MLP, 1.13x at 17 on the 27M GPT-2; counted 1.10x and
    1.09x; at the default ``2k + 10 = 20``, 1.03-1.06x, counted 1.07x). The count used before, ``m + 5 k``, fell as
    the budget shrank the basis: 42 for that GPT-2 at 17 columns, which took 122.

    >>> lanczos_steps(5, 40, 1e-6, 400), lanczos_steps(5, 15, 1e-6, 400), lanczos_steps(5, 40, 1e-3, 400)
    (89, 99, 69)
    """
    fitted = max(2 * k + 20, 40)
    accuracy = max(0.25, 0.55 + 0.075 * math.log10(1.0 / tol))
    spectrum = GGN_STEPS if kind == "ggn" else 1.0
    return min(max_hvp, round(40 * math.sqrt(k) * accuracy * max(1.0, fitted / m) ** 0.1 * spectrum))


def lanczos_sweeps(steps: int, k: int, m: int) -> tuple[int, int]:
    """(basis columns swept, multiply-adds per vector entry of the restarts' rewrites) over ``steps`` steps of
    :func:`~landscape.linalg.lanczos.lanczos` with an ``m``-column basis: a step with ``j`` columns before it
    orthogonalizes its product against ``j + 1``; at ``j = m`` a thick restart keeps ``p`` columns
    (:func:`~landscape.linalg.lanczos.restart_keep`), ``V S`` with ``S`` ``m x p`` (``m p`` multiply-adds per
    entry), and goes on from ``j = p``.

    >>> lanczos_sweeps(3, 5, 40)
    (6, 0)
    >>> lanczos_sweeps(17, 5, 15)  # 15 steps to j = 15, a restart to 10, two steps more
    (143, 150)
    """
    keep = restart_keep(k, m)
    j, swept, rewritten = 0, 0, 0
    for _ in range(steps):
        if j >= m:
            j, rewritten = keep, rewritten + m * keep
        swept += j + 1
        j += 1
    return swept, rewritten


def curvature_seconds(curv: CurvatureSettings, n: int, budget: float, product: float, vec: VectorCosts,
                      sketch_bytes: int = 8) -> tuple[float, float, int]:
    """(seconds, bytes of vectors held in memory, products) of the top/bottom eigenpairs, trace and density of
    ``curv`` over an operator of length ``n``, from the time of one product (with its conversions) and the measured
    vector costs; :func:`curvature_cost` adds the optional extras.

    Lanczos is counted at :func:`lanczos_steps` products per end of the spectrum, then ``k`` more to verify (``2 k``
    when ``max_hvp`` stops it: a pair that misses ``tol`` gets one more to measure the products' rounding), each
    storing a vector and sweeping the basis as deep as it then is, plus the restarts' rewrites of the basis
    (:func:`lanczos_sweeps`); the Lanczos-deflated trace at a third of the budget in products, its
    probes drawn and swept over the top's basis (kept from its run) a block at a time: a pass's reading shared by
    the block, its multiply-adds not; Hutch++ at its product budget, each storing
    or reading a vector, plus ``3 k`` columns of signs drawn (``S`` once, ``G`` twice) and six ``k x k`` passes of
    matrix products over its block (two Gram matrices, two transforms, ``Q^T G`` and ``G - Q C``), the block's first
    touch and bytes at ``sketch_bytes`` a number (:func:`landscape.linalg.trace.sketch_dtype`); SLQ at
    ``probes x steps`` products sweeping half its basis on average (``steps + 1`` columns, in memory when they fit
    ``budget``), a draw per probe."""
    seconds = held = 0.0
    products = 0
    top_vectors = 0  # the top eigenvectors' bytes in memory, beside which the deflated trace's probes are held
    for k in (curv.top_k, curv.bottom_k):
        if k:
            m = basis_size(k, n, budget=budget)
            steps = lanczos_steps(k, m, curv.tol, curv.max_hvp, curv.kind)
            swept, rewritten = lanczos_sweeps(steps, k, m)
            verify = k * (2 if steps == curv.max_hvp else 1)  # an unconverged pair's product is checked at 3v too
            seconds += ((steps + verify) * (product + vec.column) + swept * vec.pass_column
                        + rewritten * n * vec.block + (m + 1) * vec.first_column)
            products += steps + verify
            basis = (m + 1) * n * 8
            vectors = k * n * 8 if k * n * 8 <= budget - (basis if basis <= budget else 0) else 0
            held = max(held, _in_memory(basis, budget, m + 1) + vectors)
            top_vectors = vectors if k == curv.top_k else top_vectors
    if curv.trace:
        k = max(1, curv.trace_matvecs // 3)
        method = curv.trace_estimator
        if method == "lanczos-deflated":  # k probes drawn and swept off the top's basis (held above) in blocks of p
            m = basis_size(curv.top_k, n, budget=budget)
            basis = (m + 1) * n * 8
            p = probe_block(n, k, budget - (basis if basis <= budget else 0) - top_vectors)
            seconds += k * (product + vec.signs + m * max(vec.pass_column / p, 3 * n * vec.block))
            products += k
            held += p * n * 8
        else:
            seconds += curv.trace_matvecs * (product + 2 * vec.column) + k * vec.first_column * (
                sketch_bytes / 8 if method == "hutch++" else 1)
            products += curv.trace_matvecs
        if method == "hutch++":
            seconds += 6 * k * k * n * vec.block + 3 * k * vec.signs
            block = k * n * sketch_bytes
            held = max(held, _in_memory(block, budget, k, sketch_bytes))
        elif method != "lanczos-deflated":
            seconds += curv.trace_matvecs * vec.signs
    if curv.density:
        steps = curv.density_probes * curv.density_steps
        seconds += (steps * (product + vec.column) + steps * curv.density_steps / 2 * vec.pass_column
                    + curv.density_probes * vec.signs)
        products += steps
        held = max(held, _in_memory((curv.density_steps + 1) * n * 8, budget, curv.density_steps + 1))
    return seconds, held + 4 * n * 8, products  # + the vectors in flight (v, A v, conversions)


def _in_memory(nbytes: int, budget: float, columns: int, itemsize: int = 8) -> int:
    """Bytes of a store of ``columns`` (``itemsize`` bytes a number) held in memory: all of it when it fits
    ``budget``, else a block of rows of each column (:class:`~landscape.linalg.vectors.ColumnStore` maps the rest to
    disk)."""
    return nbytes if nbytes <= budget else BLOCK_ROWS * columns * itemsize


def validity_evaluations(levels: Sequence[float] = LEVELS, rtol: float = 1e-2) -> int:
    """Loss evaluations :func:`~landscape.analyses.validity.validity_radius` makes along one direction, counted by
    running it on a typical curve: the cubic ``s^2 / 2 + b s^3 / 6`` whose radius at the first level is
    ``r_max / 32`` (the count depends on where the loss leaves its quadratic model, which a dry run cannot know:
    each halving of that radius adds two evaluations a level).

    >>> validity_evaluations()
    45
    """
    calls = 0
    b = 3 * levels[0] * 32  # the radius at level tau is 3 tau / |b| (module docstring of validity)

    def change(s: float) -> float:
        nonlocal calls
        calls += 1
        return s * s / 2 + b * s ** 3 / 6

    validity_radius(change, 0.0, 1.0, levels, r_max=1.0, rtol=rtol)
    return calls


def product_seconds(op: CurvatureOperator, device: torch.device | None, repeats: int = 3) -> tuple[float, int, float]:
    """(mean seconds of ``repeats`` products of ``op``, bytes they added at their peak, seconds of the first call)
    on float64 vectors on ``device`` (the host when None), as a run's long vectors are placed. The first call pays
    what is paid once (the HVP engine's choice, a subset's gradient graph); a new vector each time, as in a run
    (the same one again measured 1.2-1.3x faster at 11M parameters)."""
    v = native(np.random.default_rng(0).standard_normal(op.n), device)
    fresh = itertools.cycle([v, -v, 0.5 * v, 2.0 * v])
    started = time.perf_counter()
    seconds, added = measured(op.problem.device, lambda: op.matvec(next(fresh)), repeats=repeats)
    return seconds, added, time.perf_counter() - started - repeats * seconds


def _by_samples(pb: Problem, kind: str, names: list[str], sizes: Sequence[int], device: torch.device | None
                ) -> Callable[[int], tuple[float, float, int]]:
    """(seconds of a product, seconds its Problem's first call adds, bytes added) of the curvature on ``m`` samples,
    for per-class and mini-batch curvature: measured on the first ``m`` samples (:meth:`Problem.subset`) at the
    smallest and the largest of ``sizes`` and interpolated between them (a product costs ``a + b m``: RESULTS.md,
    issue 19, session 22)."""
    at = sorted({min(sizes), max(sizes)})
    got = []
    for m in at:
        op = CurvatureOperator(pb.subset(np.arange(m)), kind=kind, parameters=names)
        seconds, added, first = product_seconds(op, device, repeats=2)
        got.append((seconds, max(0.0, first - seconds), added))
    peak = max(g[2] for g in got)
    return lambda m: (float(np.interp(m, at, [g[0] for g in got])), float(np.interp(m, at, [g[1] for g in got])), peak)


def curvature_cost(pb: Problem, curv: CurvatureSettings, budget: float, hvp: tuple[float, int],
                   gradient_seconds: float, pass_seconds: float) -> tuple[float, int, int]:
    """(seconds, bytes added at the peak, products) of :func:`~landscape.analyses.hessian.analyze_curvature` with
    ``curv`` on ``pb``, whose Hessian-vector product over all parameters takes ``hvp`` (seconds, bytes added).
    ``products`` counts the curvature operators' products, as the run's ``n_matvec`` attributes do (not
    ``--validity``'s few, which are priced).

    The operator's product is measured as the run makes it (the GGN's, or over ``--parameters``) unless it is that
    one; the vector work on a :class:`VectorCosts` of its length (:func:`curvature_seconds`). The extras, as the run
    derives them from ``curv`` (:func:`~landscape.analyses.hessian.with_ends`):

    - ``--validity``: the bottom eigenpair, a gradient, two passes, and per direction (each top eigenvector, the
      bottom one, the random ones) a Hessian-vector product and :func:`validity_evaluations` passes;
    - ``--per-layer``: :func:`~landscape.analyses.hessian.layer_settings` over each selected tensor, at the
      product's time (a product over one tensor still runs the whole model) and vector costs scaled to its size;
    - ``--per-class``: :func:`~landscape.analyses.hessian.class_settings` on each class's samples, and
      ``--batch-sizes``: the top and bottom eigenvalue of ``batch_draws`` batches of each size, both at a product's
      time on that many samples (:func:`_by_samples`), each subset paying its first call."""
    curv = with_ends(curv)
    names = select_parameters(pb.names, curv.parameters or None)
    op = CurvatureOperator(pb, kind=curv.kind, parameters=names)
    n = op.n
    device = basis_device(pb.device, max(curv.top_k, curv.bottom_k, 1), n)
    product, added = hvp if curv.kind == "hessian" and n == pb.num_parameters else product_seconds(op, device)[:2]
    vec = VectorCosts.measure(n, budget, device)
    room = budget if device is None else math.inf  # vectors on the GPU are not sized to the host's budget
    sketch = sketch_dtype(pb.dtype).itemsize
    seconds, held, products = curvature_seconds(curv, n, room, product, vec, sketch)
    kept = (curv.top_k + curv.bottom_k) * n * 8  # the eigenvectors, held while the extras run (when they fit)
    kept = kept if kept <= room else 0
    if curv.validity:
        directions = curv.top_k + 1 + curv.validity_random
        seconds += 2 * pass_seconds + gradient_seconds + directions * (hvp[0] + validity_evaluations() * pass_seconds)
    for name, size in zip(names, op.sizes) if curv.per_layer else ():
        s, h, c = curvature_seconds(layer_settings(curv, name), size, room, product, vec.scaled(size / n), sketch)
        seconds, held, products = seconds + s, max(held, h + kept), products + c
    groups: list[tuple[int, CurvatureSettings, int]] = []  # (samples, what runs on them, how many times)
    if curv.per_class:
        groups += [(len(idx), class_settings(curv), 1) for _, idx in class_members(pb)]
    if curv.batch_sizes:
        check_batch_sizes(pb.n, curv.batch_sizes)
        ends = replace(curv, top_k=1, bottom_k=1, trace=False, density=False)
        groups += [(b, ends, curv.batch_draws) for b in sorted(set(curv.batch_sizes))]
    if groups:
        at = _by_samples(pb, curv.kind, names, [m for m, _, _ in groups], device)
        for m, sub, times in groups:
            t, first, extra = at(m)
            s, h, c = curvature_seconds(sub, n, room, t, vec, sketch)
            seconds, held, products = seconds + times * (s + first), max(held, h + kept), products + times * c
            added = max(added, extra)
    return seconds, int(added + held), products


def _seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after a warm-up call (each synchronized on a GPU): the cost
    model multiplies some of these by hundreds (a Lanczos run's sweeps; the accumulation of per-sample gradients,
    timed over 1M coordinates and scaled to P and to every chunk), so one call the VM's noise caught must not set
    them."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def sharpness_seconds(pb: Problem, measures: Sequence[SharpnessSettings], hvp_seconds: float,
                      n_directions: int = 2) -> float:
    """Seconds of the sharpness measures: each one's :func:`landscape.analyses.sharpness.work` priced at a loss evaluation
    and a gradient measured at each batch size it uses, ``hvp_seconds`` per Hessian-vector product, and one draw
    of P standard numbers and one elementwise operation on P-long vectors measured on the weights' device."""
    nparam = pb.num_parameters
    dtype = next(iter(pb.theta0.values())).dtype
    kept = keeps_draws(max((s.draws for s in measures), default=0), nparam, dtype.itemsize, pb.budget_left())
    works = [work(s, pb.n, n_directions=n_directions, kept_draws=kept) for s in measures]
    sizes = sorted({k for w in works for k in (*w.losses, *w.gradients)})
    loss_s, grad_s = {}, {}
    for k in sizes:
        idx = torch.arange(k)
        loss_s[k] = measured(pb.device, lambda: pb.loss(None, idx))[0]
        if any(k in w.gradients for w in works):
            grad_s[k] = measured(pb.device, lambda: pb.loss_and_gradient(None, idx))[0]
    w0 = torch.zeros(nparam, dtype=dtype, device=pb.device)
    z = normal(nparam, seed=0, stream=0, device=pb.device).to(dtype)
    vector_s = _seconds(lambda: w0 + 0.5 * z, pb.device)
    draw_s = _seconds(lambda: normal(nparam, seed=0, stream=1, device=pb.device), pb.device)
    return sum(sum(c * loss_s[k] for k, c in w.losses.items()) + sum(c * grad_s[k] for k, c in w.gradients.items())
               + w.hvps * hvp_seconds + w.draws * draw_s + w.vector_ops * vector_s for w in works)


def _accumulation_seconds(g: torch.Tensor, labels: np.ndarray, batches: Batches, width: int,
                          where: torch.device | None, whole_batches: bool) -> tuple[float, float, float]:
    """Seconds to add the chunk ``g`` (the first positions of ``batches``) to accumulators ``width`` coordinates
    wide, to allocate them and to reduce them, as :class:`GradientStats` on ``where`` does: measured on up to 1M
    coordinates and scaled to ``width``, except the rows' norms, which are over all of a row's coordinates whatever
    the range."""
    probe = min(width, 1 << 20)
    dev = where or torch.device("cpu")
    norm_s = _seconds(lambda: row_norms(g.to(dev)), dev)
    t = time.perf_counter()
    stats = GradientStats(g.shape[1], labels, batches=batches, reference=torch.ones(probe, device=dev),
                          coords=(0, probe), device=where, whole_batches=whole_batches)
    alloc_s = (time.perf_counter() - t) * width / probe

    def add_again() -> None:  # the same chunk at the first positions again (the running sums need the order)
        stats.next = 0
        stats.add(0, g)

    add_s = _seconds(add_again, dev)
    reduce_s = _seconds(stats.reduced, dev) * width / probe
    return norm_s + max(0.0, add_s - norm_s) * width / probe, alloc_s, reduce_s


def coherence_cost(pb: Problem, co: CoherenceSettings, budget: float, hvp_seconds: float, pass_seconds: float
                   ) -> tuple[float, int]:
    """(seconds, bytes added at the peak) of the coherence analysis, as :func:`landscape.analyses.coherence.analyze_coherence`
    runs it: for each coordinate range, fresh accumulators, the gradients' sum (the random batches' reference),
    every chunk's per-sample gradients (measured on a real chunk) added to them (the rows' norms over all P
    coordinates, measured, plus the range's share, measured on up to 1M coordinates and scaled), and the range's
    reduction; then ``noise_samples`` one-sample gradients and Hessian-vector products for B_noise, EL2N and the
    model's passes (``pass_seconds`` each); twice with ``control``."""
    nparam = pb.num_parameters
    labels = sample_labels(pb, pb.y)
    n_classes = int(labels.max()) + 1
    batches = random_batches(pb.n, co.batch_sizes, co.batch_repeats, co.seed)
    vecs = accumulator_vectors(n_classes, batches, not co.sketch, pb.comm.active)
    ranges = coordinate_ranges(co.sketch or nparam, vecs, budget / 2) if not co.sketch else [(0, co.sketch)]
    width = max(hi - lo for lo, hi in ranges)
    extra = add_bytes_per_row(width)
    c = min(chunk_size(pb, budget / 2, extra), pb.n)  # as the run sizes its chunks
    sample = rows(pb.X, 0, c)
    chunk: list[torch.Tensor] = []

    def one_chunk() -> None:  # the one before is freed first, as in the run, whose later chunks reuse its memory
        chunk.clear()
        chunk.append(next(iter_gradients(pb, sample, pb.y[:c], memory_budget=budget / 2,
                                         extra_bytes_per_sample=extra))[1])

    chunk_s, chunk_extra = measured(pb.device, one_chunk)
    add_s, alloc_s, reduce_s = _accumulation_seconds(chunk.pop(), labels, batches, width,
                                                     vector_device(pb.device, width, vecs), pb.comm.active)
    # each pass first sums the gradients for the batches' reference: measured on the chunk's samples, scaled to n
    reference_s = measured(pb.device, lambda: gradient_sum(pb, sample, pb.y[:c]))[0] * pb.n / c \
        if batches.counts and not co.sketch else 0.0
    one_s = measured(pb.device, lambda: per_sample_gradients(pb, rows(pb.X, 0, 1), pb.y[:1]))[0]
    host = np.ones(nparam)
    host_op = _seconds(lambda: host - 0.5 * host, torch.device("cpu"))
    noise = min(co.noise_samples, pb.n)
    chunks = math.ceil(pb.n / c)
    seconds = (len(ranges) * (alloc_s + reduce_s + reference_s + chunks * (chunk_s + add_s))
               + noise * (one_s + hvp_seconds + 4 * host_op) + (hvp_seconds if noise else 0.0) + 2 * pass_seconds)
    return (1 + co.control) * seconds + pass_seconds, vecs * width * 8 + chunk_extra


__all__ = ["VectorCosts", "lanczos_steps", "lanczos_sweeps", "curvature_seconds", "curvature_cost", "product_seconds",
           "validity_evaluations", "sharpness_seconds", "coherence_cost"]
