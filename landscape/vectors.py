"""Blocks of long float64 vectors (Krylov bases, sketches, eigenvectors) kept within a memory budget.

A :class:`ColumnStore` holds ``k`` columns of length ``n``: in memory when ``n k`` float64 numbers fit
``budget`` bytes, otherwise in an unlinked scratch file that is read and written a row block at a time (one
block is at most :data:`BLOCK_ROWS` rows of every column, contiguous, so its buffer is ``BLOCK_ROWS x k x 8``
bytes: 21 MB for 40 columns). Every algorithm over a store (:mod:`landscape.lanczos`, :mod:`landscape.trace`)
walks it by the same row blocks in both places, so a basis on disk gives the same bits as one in memory; only the
time differs (reads from the page cache or the disk instead of RAM).

The scratch file lives in :data:`SPILL_DIR` (a scan points it at its run file's folder), else
``$LANDSCAPE_SPILL_DIR``, else the system's temporary folder; a run is refused with the number it needs when that
disk lacks the space. The file is removed from the folder as soon as it is opened, and so never outlives the
process, even when the process is killed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import numpy as np

from .budget import check_disk

#: rows of one block: the unit of every pass over a store (a multiple of 4 KiB pages of float64)
BLOCK_ROWS = 1 << 16
#: where stores too big for the budget spill (None: ``$LANDSCAPE_SPILL_DIR`` or the temporary folder)
SPILL_DIR: str | None = None


def spill_dir() -> str:
    return SPILL_DIR or os.environ.get("LANDSCAPE_SPILL_DIR") or tempfile.gettempdir()


class ColumnStore:
    """``k`` float64 columns of length ``n``, in memory or (``on_disk``) in a scratch file.

    Laid out by row blocks: block ``b`` holds rows ``b B : (b + 1) B`` of every column as one contiguous
    ``(k, B)`` array (``B`` = :data:`BLOCK_ROWS`), so that a pass reads each block once, contiguously, and a
    fused update-and-project (:meth:`subtract`) finds it still in cache.

    >>> s = ColumnStore(5, 2, budget=0)  # nothing fits: on disk
    >>> s.on_disk, s.set_column(1, np.arange(5.0)), s.column(1).tolist()
    (True, None, [0.0, 1.0, 2.0, 3.0, 4.0])
    """

    def __init__(self, n: int, k: int, *, budget: float = float("inf")) -> None:
        self.n, self.k = int(n), int(k)
        self.rows = min(BLOCK_ROWS, max(self.n, 1))
        self.n_blocks = -(-self.n // self.rows)
        self.nbytes = self.n_blocks * self.k * self.rows * 8
        self.on_disk = self.nbytes > budget
        self._fd: int | None = None
        self._array: np.ndarray | None = None
        if self.on_disk:
            check_disk(spill_dir(), self.nbytes, f"a block of {self.k} vectors of {self.n:,} numbers")
            fd, path = tempfile.mkstemp(prefix="landscape-", suffix=".f64", dir=spill_dir())
            os.unlink(path)
            os.ftruncate(fd, self.nbytes)
            self._fd = fd
        else:
            self._array = np.zeros((self.n_blocks, self.k, self.rows))

    @property
    def storage(self) -> str:
        """``memory`` or ``disk``: recorded with the results."""
        return "disk" if self.on_disk else "memory"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def blocks(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.n, self.rows):
            yield a, min(self.n, a + self.rows)

    def _offset(self, block: int, col: int) -> int:
        return ((block * self.k + col) * self.rows) * 8

    def read(self, a: int, b: int, cols: int) -> np.ndarray:
        """The ``(cols, b - a)`` block of rows ``a:b`` (``a`` a block start) of the first ``cols`` columns, rows of
        the result being columns of the store (a view in memory, a fresh array from disk)."""
        blk = a // self.rows
        if self._array is not None:
            return self._array[blk, :cols, :b - a]
        out = np.empty((cols, self.rows))
        os.preadv(self._fd, [memoryview(out)], self._offset(blk, 0))
        return out[:, :b - a]

    def write(self, a: int, block: np.ndarray, col0: int = 0) -> None:
        """Columns ``col0:col0 + len(block)`` of rows ``a:a + block.shape[1]`` (``a`` a block start)."""
        blk = a // self.rows
        if self._array is not None:
            self._array[blk, col0:col0 + len(block), :block.shape[1]] = block
            return
        if block.shape[1] < self.rows:
            full = np.zeros((len(block), self.rows))
            full[:, :block.shape[1]] = block
            block = full
        os.pwrite(self._fd, np.ascontiguousarray(block).data, self._offset(blk, col0))

    def column(self, i: int) -> np.ndarray:
        """Column ``i`` as a new contiguous array."""
        out = np.empty(self.n)
        for a, b in self.blocks():
            if self._array is not None:
                out[a:b] = self._array[a // self.rows, i, :b - a]
            else:
                os.preadv(self._fd, [memoryview(out[a:b])], self._offset(a // self.rows, i))
        return out

    def set_column(self, i: int, v: np.ndarray) -> None:
        v = np.ascontiguousarray(v, dtype=np.float64)
        for a, b in self.blocks():
            if self._array is not None:
                self._array[a // self.rows, i, :b - a] = v[a:b]
            else:
                os.pwrite(self._fd, v[a:b].data, self._offset(a // self.rows, i))

    # ------------------------------------------------------------------ passes over the first ``cols`` columns
    def project(self, w: np.ndarray, cols: int) -> np.ndarray:
        """``V^T w`` (one pass)."""
        h = np.zeros(cols)
        for a, b in self.blocks():
            h += self.read(a, b, cols) @ w[a:b]
        return h

    def subtract(self, w: np.ndarray, h: np.ndarray, cols: int, *, project_after: bool = False
                 ) -> np.ndarray | None:
        """``w -= V h`` in place (one pass); with ``project_after`` also ``V^T w`` of the result, from the same
        blocks while they are in cache (the second sweep of classical Gram-Schmidt at no extra pass)."""
        h2 = np.zeros(cols) if project_after else None
        for a, b in self.blocks():
            Vb = self.read(a, b, cols)
            w[a:b] -= h @ Vb
            if h2 is not None:
                h2 += Vb @ w[a:b]
        return h2

    def gram(self, cols: int) -> np.ndarray:
        """``V^T V`` (one pass)."""
        G = np.zeros((cols, cols))
        for a, b in self.blocks():
            Vb = self.read(a, b, cols)
            G += Vb @ Vb.T
        return G

    def transform(self, M: np.ndarray) -> None:
        """``V[:, :M.shape[1]] = V[:, :M.shape[0]] M`` in place (one pass)."""
        for a, b in self.blocks():
            self.write(a, M.T @ self.read(a, b, M.shape[0]))

    def combine(self, M: np.ndarray, budget: float = float("inf")) -> np.ndarray:
        """``V[:, :M.shape[0]] M`` as an ``(n, M.shape[1])`` Fortran-ordered array (one pass): in memory when it
        fits ``budget`` bytes, else a mapping of an unlinked scratch file (pages read when touched, reclaimable)."""
        shape = (self.n, M.shape[1])
        if self.n * M.shape[1] * 8 <= budget:
            out = np.empty(shape, order="F")
        else:
            check_disk(spill_dir(), self.n * M.shape[1] * 8, f"{M.shape[1]} vectors of {self.n:,} numbers")
            with tempfile.NamedTemporaryFile(prefix="landscape-", suffix=".f64", dir=spill_dir()) as f:
                out = np.memmap(f, dtype=np.float64, mode="w+", shape=shape, order="F")
        for a, b in self.blocks():
            out[a:b] = (M.T @ self.read(a, b, M.shape[0])).T
        return out


def orthonormalize(store: ColumnStore, cols: int, drop: float = 1e-12) -> int:
    """Orthonormalize the first ``cols`` columns in place by SVQB twice (Stathopoulos & Wu 2002): with the Gram
    matrix of the columns scaled to unit norm ``D^-1 V^T V D^-1 = U diag(s) U^T``, ``V <- V D^-1 U diag(s)^-1/2``,
    keeping only directions with ``s > drop max(s)`` (singular values below 1e-6 of the largest: what the squared
    Gram matrix can still resolve; columns in the span of the others are dropped). Four passes over the block
    instead of the ``O(cols)`` passes of column-by-column Gram-Schmidt; the second round restores orthogonality to
    rounding. Returns the
    number of columns kept, which are the first ones.

    >>> s = ColumnStore(4, 3)
    >>> s.write(0, np.array([[1.0, 0, 1, 0], [2, 0, 2, 0], [0, 1, 0, 1]]))  # columns (1,0,1,0), 2x it, (0,1,0,1)
    >>> k = orthonormalize(s, 3); k, np.allclose(s.gram(k), np.eye(k))
    (2, True)
    """
    for _ in range(2):
        G = store.gram(cols)
        d = np.sqrt(np.maximum(np.diag(G), 1e-300))
        s, U = np.linalg.eigh(G / np.outer(d, d))  # scaled: columns of very different norms lose nothing
        keep = s > drop * max(s.max(), 1e-300)
        M = (U[:, keep] / np.sqrt(s[keep])) / d[:, None]
        store.transform(M[:, ::-1])  # largest directions first
        cols = int(keep.sum())
    return cols
