"""glibc's malloc kept from handing large blocks back to the kernel while an analysis repeats its products.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with
``munmap`` when it is freed, so the next allocation of that size touches new pages: one page fault per 4 KiB,
each a trap into the kernel (and, in a virtual machine, often into the hypervisor) that zeroes the page. A
Hessian-vector product of a ResNet-18 on 256 samples allocates and frees gigabytes of activations and
gradients; measured on 2 cores (``benchmarks/RESULTS.md``, issue 19): the default scan made 47 million minor
page faults (190 GB of pages touched afresh) in 315 s; with large blocks taken from the heap, where freed blocks
are reused, 1.0 million faults in 231 s.

:func:`reuse_freed_memory` sets ``M_MMAP_MAX`` to 0 for the block (or the decorated function): every allocation
comes from the heap, and ``M_TRIM_THRESHOLD`` to 2 GiB, so that a block freed at the heap's top stays for the next
one instead of being handed back at once (with glibc's 128 KiB, the chunks of per-sample gradients made twice the
faults). On leaving the outermost hold it restores glibc's defaults and calls ``malloc_trim(0)``, which hands the
heap's free pages back to the kernel. Nested holds are counted and do not trim, so that each phase of a scan reuses
the pages the one before freed (trimming after every analysis cost 31 s more on that scan, for a peak 3% lower).
Elsewhere than glibc it does nothing.

The CLI holds it around every command: the process is ours. The library's analyses do not take it themselves:
setting either parameter freezes glibc's adaptive mmap threshold for the rest of the process, which in a training
loop that calls the monitor could make the training's own mid-size allocations slower. Python callers who run
analyses in a process of their own can wrap them: ``with reuse_freed_memory(): analyze_curvature(...)``.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

#: glibc's ``mallopt`` parameters for the largest number of mmap-served blocks and for the free memory at the
#: heap's top beyond which ``free`` hands it back, with their defaults, and the most the latter can be set to
M_MMAP_MAX, MMAP_MAX_DEFAULT = -4, 65536
M_TRIM_THRESHOLD, TRIM_THRESHOLD_DEFAULT, TRIM_THRESHOLD_HELD = -1, 128 * 1024, 2**31 - 1

_depth = 0


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The symbols already loaded in this process (its C library's among them) if they include glibc's ``mallopt``
    and ``malloc_trim``, else None (another C library, or a platform without ``dlopen(NULL)``)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim(0)``; elsewhere nothing), so that
    the resident memory a block of work adds after it is the memory that work needs, not what is left once it has
    reused what earlier work freed (:class:`landscape.runtime.budget.AddedMemory`)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def holding() -> bool:
    """Whether a :func:`reuse_freed_memory` hold is in force: freed large blocks stay in the heap. Outside one, glibc
    hands a large block back to the kernel as it is freed."""
    return _depth > 0


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Large allocations from the heap inside the block, the heap trimmed after it (see the module docstring)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    if _depth == 0:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_HELD)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_DEFAULT)
            release_freed_memory()

