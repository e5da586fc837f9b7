"""numpy's BLAS threads, held at one while the vector algorithms interleave numpy passes with torch products.

OpenBLAS's worker threads spin after each call, waiting for the next; PyTorch's OpenMP threads then share the cores
with them. Measured on 2 cores (``benchmarks/RESULTS.md``, issue 19): Lanczos on a 1e5-parameter MLP took 1.30 s
with numpy's default threads against 0.32 s with one, each Hessian-vector product's backward pass 8.7 ms
against 0.8 ms. The passes over long vectors (``V^T w``) run in torch instead, on its own threads, those of the
products (:class:`landscape.linalg.vectors.ColumnStore`). :func:`single_blas_thread` sets OpenBLAS (the library numpy wheels ship) to one thread for the ``with``
block (or the decorated function) and restores it; with another BLAS, or none found, it does nothing
(``OPENBLAS_NUM_THREADS=1`` or threadpoolctl do the same from outside). The algorithms that interleave the two
(:func:`landscape.linalg.lanczos.lanczos`, :func:`~landscape.linalg.lanczos.krylov_tridiagonal`, :func:`landscape.linalg.trace.hutchpp`,
:func:`~landscape.linalg.trace.hutchinson`, :func:`~landscape.linalg.trace.basis_deflated`, :func:`landscape.linalg.density.slq`, :func:`landscape.analyses.coherence.analyze_coherence`)
hold it themselves, so every caller, the Python API's included, gets it; nested holds restore in order.
"""

from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

#: (setter, getter) symbol names of OpenBLAS builds, numpy's own first
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


@lru_cache(maxsize=1)
def _openblas() -> tuple[object, object] | None:
    """The (set, get) thread functions of the OpenBLAS loaded in this process (by numpy, which landscape imports),
    if any."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for setter, getter in _SYMBOLS:
            if hasattr(lib, setter) and hasattr(lib, getter):
                return getattr(lib, setter), getattr(lib, getter)
    return None


@contextmanager
def single_blas_thread() -> Iterator[None]:
    """One OpenBLAS thread inside the block (see the module docstring)."""
    fns = _openblas()
    if fns is None:
        yield
        return
    set_threads, get_threads = fns
    before = int(get_threads())  # type: ignore[operator]
    set_threads(1)  # type: ignore[operator]
    try:
        yield
    finally:
        set_threads(before)  # type: ignore[operator]
