"""Large blocks come from glibc's heap inside reuse_freed_memory (nested holds too), by mmap again after it, and the
heap's free pages go back to the kernel on leaving."""

import os

import numpy as np
import pytest

from landscape.runtime.allocator import _glibc, reuse_freed_memory
from landscape.runtime.budget import AddedMemory, PeakRSS

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


def test_a_freed_block_stays_for_the_next_inside_and_goes_back_on_leaving():
    before = resident()
    with reuse_freed_memory():
        with reuse_freed_memory():  # an analysis within a command: leaving it does not trim
            a = np.ones(4 * BIG // 8)  # 256 MiB touched, at the heap's top
            assert resident() - before > 3 * BIG
            del a  # glibc would hand a top block back at once (128 KiB threshold); the hold keeps it
        held = resident()
        b = np.ones(4 * BIG // 8)  # and the next block of that size reuses it
        assert in_heap(b) and resident() - held < BIG // 2
        del b
    assert held - before > 3 * BIG
    assert resident() - before < BIG  # leaving trims it


def test_added_memory_counts_a_block_that_reuses_freed_memory():
    """Inside the hold, a block that reuses memory freed before it adds no resident memory (what the dry run used
    to measure as its need); AddedMemory hands the free pages back first and counts what the block touches."""
    with reuse_freed_memory():
        a = np.ones(4 * BIG // 8)
        del a
        with PeakRSS() as seen:
            b = np.ones(4 * BIG // 8)
            del b
        with AddedMemory(None) as added:
            c = np.ones(4 * BIG // 8)
            del c
    assert seen.peak - seen.start < BIG // 2  # the trap: 256 MiB used, nothing added
    assert added.bytes > 3 * BIG
