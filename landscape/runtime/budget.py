"""The memory budget: how many bytes an analysis may hold beyond the model, one gradient and one batch's
activations (``--memory-budget``; ``auto`` by default).

``auto`` is a quarter of the memory the machine has available when the run starts (``MemAvailable`` of
``/proc/meminfo``; 256 MiB where that cannot be read), at least 256 MiB. Whatever it is, every phase keeps within it:
slice blocks and input-layer caches (:mod:`landscape.problem`), chunks of per-sample gradients
(:mod:`landscape.problem.persample`), and long vectors (Krylov bases, Hutch++ blocks, eigenvectors), which go to a scratch
file when they do not fit (:mod:`landscape.linalg.vectors`).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..errors import LandscapeError
from .allocator import release_freed_memory

if TYPE_CHECKING:
    import torch

#: the floor of ``auto`` and the budget where available memory cannot be read
MIN_BUDGET = 256 * 2**20


def available_memory() -> int | None:
    """``MemAvailable`` in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def auto_budget() -> float:
    """A quarter of the available memory, at least :data:`MIN_BUDGET`."""
    avail = available_memory()
    return float(max(MIN_BUDGET, (avail or 0) // 4))


def resolve_budget(budget: float | None) -> float:
    """``budget`` bytes (None: :func:`auto_budget`), refused when the machine does not have it available."""
    if budget is None:
        return auto_budget()
    avail = available_memory()
    if avail is not None and budget > avail:
        raise LandscapeError(f"--memory-budget {fmt_bytes(budget)} is more than the {fmt_bytes(avail)} this machine "
                             "has available", hint="give a smaller --memory-budget, or leave it out (auto: a quarter "
                                                   "of the available memory)")
    return float(budget)


def analysis_floor(n_parameters: int, parameter_bytes: int, host_vectors: bool) -> int:
    """Bytes every analysis adds beyond the loaded model and data and beside the budget: three copies of the
    parameters (a gradient, a tangent and its product, or a slice's two directions and its point) and, when the
    curvature's long vectors live on the host, four float64 vectors in flight (a product's argument and result and
    their conversions)."""
    return 3 * parameter_bytes + (4 * 8 * n_parameters if host_vectors else 0)


def check_fits(floor: int, budget: float, device: "torch.device | None" = None) -> None:
    """Refuse before starting when ``floor`` (:func:`analysis_floor`) plus the budget is more than the machine has
    available (on ``cuda``, the floor against the GPU's free memory and the budget against the host's): the number
    needed, instead of a kill by the OS. One product's activations come on top; the dry run measures them."""
    cuda = device is not None and device.type == "cuda"
    avail = available_memory()
    host_need = budget + (0 if cuda else floor)
    if avail is not None and host_need > avail:
        raise LandscapeError(
            f"the analyses need at least {fmt_bytes(host_need)} of memory beyond the loaded model and data "
            f"({fmt_bytes(budget)} of --memory-budget"
            + ("" if cuda else f", {fmt_bytes(floor)} for gradients, products and vectors in flight")
            + f"), and this machine has {fmt_bytes(avail)} available",
            hint="lower --memory-budget, use --dtype float32, or run on a machine with more memory "
                 "(--dry-run measures the whole need)")
    if cuda:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        if floor > free:
            raise LandscapeError(f"the analyses need at least {fmt_bytes(floor)} of GPU memory beyond the loaded "
                                 f"model and data, and the GPU has {fmt_bytes(free)} free",
                                 hint="use --dtype float32, free the GPU, or run on the CPU (--device cpu)")


def check_disk(folder: str, need: float, what: str) -> None:
    """Refuse before starting when ``folder`` lacks ``need`` free bytes for ``what``."""
    free = shutil.disk_usage(folder).free
    if need > free:
        raise LandscapeError(f"{what} needs {fmt_bytes(need)} of scratch space beyond --memory-budget, and {folder} "
                             f"has {fmt_bytes(free)} free",
                             hint="raise --memory-budget, free disk space, or set LANDSCAPE_SPILL_DIR to a larger disk")


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``.

    >>> fmt_bytes(3 * 2**30), fmt_bytes(512)
    ('3.0 GiB', '512 B')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def process_seconds() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): what imports and loading cost before the work."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def rss() -> int:
    """This process's resident memory in bytes now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakRSS:
    """Peak resident memory while the ``with`` block runs, sampled every ``interval`` seconds by a thread
    (``peak - start`` is what the block added).

    >>> with PeakRSS() as p:
    ...     _ = bytearray(64 * 2**20)
    >>> p.peak - p.start > 32 * 2**20 or p.start == 0
    True
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = 0

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


class AddedMemory:
    """The most memory a ``with`` block adds at its peak, in :attr:`bytes`: on a GPU the CUDA allocator's peak over
    what it held at the start (exact); on the host the peak resident memory (:class:`PeakRSS`) over the resident
    memory at the start, the heap's free pages handed back first
    (:func:`landscape.runtime.allocator.release_freed_memory`). Without that, work that reuses memory freed before
    it (which the CLI keeps resident: :mod:`landscape.runtime.allocator`) seems to add nothing: a ResNet-18
    Hessian-vector product on 256 samples right after a block of slice points measured 0 MiB of the 600 MiB it
    needs.

    >>> with AddedMemory(None) as m:
    ...     block = bytearray(64 * 2**20)
    >>> m.bytes > 32 * 2**20 or rss() == 0
    True
    """

    def __init__(self, device: "torch.device | None") -> None:
        self.cuda = device is not None and device.type == "cuda"
        self.device = device
        self.bytes = 0

    def __enter__(self) -> "AddedMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_freed_memory()
            self._peak = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._peak.__exit__(*exc)
            self.bytes = max(0, self._peak.peak - self._peak.start)


def measured(device: "torch.device | None", fn: "Callable[[], object]", repeats: int = 1) -> tuple[float, int]:
    """Mean seconds of ``repeats`` calls of ``fn`` after a first one (which warms up: on a Problem, it also picks
    the HVP engine as a run would) and the memory they added at their peak, the first call's included
    (:class:`AddedMemory`: on the host, counted from a heap whose free pages were handed back, so that memory an
    earlier measurement freed is not reused unseen)."""
    with AddedMemory(device) as added:
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        if added.cuda:
            import torch

            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - t) / repeats
    return seconds, added.bytes
