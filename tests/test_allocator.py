"""Large blocks come from glibc's heap inside reuse_freed_memory (nested holds too), by mmap again after it, and the
heap's free pages go back to the kernel on leaving."""

import os

import numpy as np
import pytest

from landscape.allocator import _glibc, reuse_freed_memory

pytestmark = pytest.mark.skipif(_glibc() is None, reason="the C library here is not glibc")

BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)


def in_heap(a: np.ndarray) -> bool:
    """Whether the array's memory lies in the process's ``[heap]`` mapping (glibc's brk arena)."""
    addr = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= addr < hi:
                    return True
    return False


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_blocks_from_the_heap_inside_nested_holds_and_by_mmap_after():
    assert not in_heap(np.ones(BIG // 8))
    with reuse_freed_memory():
        assert in_heap(np.ones(BIG // 8))
        with reuse_freed_memory():
            assert in_heap(np.ones(BIG // 8))
        assert in_heap(np.ones(BIG // 8))  # the inner hold left the outer one's setting
    assert not in_heap(np.ones(BIG // 8))


def test_freed_heap_pages_are_handed_back_on_leaving():
    before = resident()
    with reuse_freed_memory():
        a = np.ones(4 * BIG // 8)  # 256 MiB touched
        b = np.ones(BIG // 8)  # allocated after it: the heap's top cannot shrink past b while b lives
        assert resident() - before > 3 * BIG
        del a
        held = resident()
    assert held - before > 3 * BIG  # freed inside the hold, a stays resident: the next allocation reuses it
    assert resident() - before < 2 * BIG  # and leaving trims it (malloc_trim returns free pages below b too)
    del b
