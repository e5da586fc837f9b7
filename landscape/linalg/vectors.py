"""Blocks of long vectors (Krylov bases, sketches, eigenvectors) kept within a memory budget, worked on in float64.

A :class:`ColumnStore` holds ``k`` columns of length ``n`` (float64, or float32 for Hutch++'s sketch of float32
products): in memory when ``n k`` numbers fit ``budget`` bytes, otherwise in an unlinked scratch file that is read
and written a row block at a time (one block is at most :data:`BLOCK_ROWS` rows of every column, contiguous, so its
buffer is ``BLOCK_ROWS x k x 8`` bytes in float64: 21 MB for 40 columns). Every algorithm over a store
(:mod:`landscape.linalg.lanczos`, :mod:`landscape.linalg.trace`) walks it by the same row blocks in both places, so a
basis on disk gives the same bits as one in memory; only the time differs (reads from the page cache or the disk
instead of RAM).

With ``device`` (a torch device), the columns are float64 tensors in that device's memory instead, and the
algorithms' long vectors are tensors there too (:func:`native`): on a GPU, a pass over a basis of 40 vectors of
124M numbers reads 40 GB at the device's bandwidth instead of the host's. The caller places a store on a device
only when it fits there; such a store never spills.

The scratch file lives in :data:`SPILL_DIR` (a scan points it at its run file's folder), else
``$LANDSCAPE_SPILL_DIR``, else the system's temporary folder; a run is refused with the number it needs when that
disk lacks the space. The file is removed from the folder as soon as it is opened, and so never outlives the
process, even when the process is killed.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from ..runtime.allocator import holding, release_freed_memory
from ..runtime.budget import check_disk

#: rows of one block: the unit of every pass over a store (a multiple of 4 KiB pages of float64)
BLOCK_ROWS = 1 << 16
#: rows of one block of a store on a torch device (fewer, larger kernels; a pass's temporaries stay small)
DEVICE_BLOCK_ROWS = 1 << 22
#: where stores too big for the budget spill (None: ``$LANDSCAPE_SPILL_DIR`` or the temporary folder)
SPILL_DIR: str | None = None


def spill_dir() -> str:
    return SPILL_DIR or os.environ.get("LANDSCAPE_SPILL_DIR") or tempfile.gettempdir()


#: a long vector: a float64 numpy array on the host, or a float64 tensor on a store's device
Vector = Any


def release_pages(x: Any) -> None:
    """Unmap the pages of ``x`` if it is a mapping of a scratch file (:meth:`ColumnStore.combine`), keeping its
    contents: they stay in the page cache, which the kernel reclaims when it needs the memory, and come back when
    read. A mapped page counts in the process's resident set, so 5 eigenvectors of 90M parameters written to a
    spilled mapping added 3.6 GB to it, beyond the budget they had been sent to disk to respect."""
    mapping = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


#: under the allocator hold, a store of at least this many bytes is made after the heap's free pages were handed
#: back (:func:`zeros_store`)
TRIM_BEFORE_BYTES = 32 * 2**20


def zeros_store(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed array for a store of long vectors. Under the CLI's hold (:mod:`landscape.runtime.allocator`: glibc
    serves every allocation from the heap and keeps what is freed) one of :data:`TRIM_BEFORE_BYTES` or more is made
    after the heap's free pages were handed back (:func:`~landscape.runtime.allocator.release_freed_memory`): a
    freed basis stayed resident, and a smaller block taken from its place left the next basis of its size no room,
    so ``hessian --batch-sizes`` on ResNet-18 held two 3.6 GB Lanczos bases at once, 8.2 GB where 5.3 GB were live
    (RESULTS.md, issue 19, session 27). Outside a hold (a training loop's monitor) the user's heap is left alone:
    glibc gave the freed basis back already."""
    if holding() and int(np.prod(shape)) * np.dtype(dtype).itemsize >= TRIM_BEFORE_BYTES:
        release_freed_memory()
    return np.zeros(shape, dtype=dtype)


def native(x: Any, device: torch.device | None) -> Vector:
    """``x`` as a float64 vector where a store on ``device`` keeps its columns: a numpy array (``device`` None)
    or a tensor on ``device``."""
    if device is None:
        return np.asarray(x, dtype=np.float64)
    if isinstance(x, np.ndarray) and any(st < 0 for st in x.strides):
        x = x.copy()  # torch takes no negative strides (``M[:, ::-1]``)
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def host(x: Vector) -> np.ndarray:
    """A vector (or small array) as a numpy array on the host."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def tensor_of(x: Vector) -> torch.Tensor:
    """A numpy array as a tensor over the same memory (writes go through), a tensor as itself: the passes over a
    store run in torch on its intra-op threads, those of the products, where numpy's BLAS is held at one thread
    (:mod:`landscape.runtime.blas`); two threads halve a pass over a basis of 11M numbers on 2 cores."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def norm(x: Vector) -> float:
    """Euclidean norm of a numpy or torch vector."""
    return float(torch.linalg.vector_norm(tensor_of(x)))


def residual_norm(p: Vector, lam: float, v: Vector, chunk: int = 1 << 20) -> float:
    """``||p - lam v||`` a chunk at a time, without a temporary as long as the vectors (at 90M parameters two of
    them were 1.4 GB beyond the memory budget when the eigenpairs were checked).

    >>> residual_norm(np.array([3.0, 4.0, 1.0]), 2.0, np.array([0.0, 0.0, 0.5]))
    5.0
    """
    tp, tv = tensor_of(p), tensor_of(v)
    squares = sum(float(torch.sub(tp[a:a + chunk], tv[a:a + chunk], alpha=lam).square_().sum())
                  for a in range(0, tp.shape[0], chunk))
    return squares ** 0.5


def vector_norms(x: Vector) -> np.ndarray:
    """Euclidean norm of a numpy or torch vector, or of each row of a block of them, on the host (one pass, no
    temporary: numpy's ``norm(axis=-1)`` squares into a copy first, 5x slower on a long vector)."""
    return host(torch.linalg.vector_norm(tensor_of(x), dim=-1))


def vector_device(device: torch.device, n: int, columns: int) -> torch.device | None:
    """Where an algorithm whose products run on ``device`` keeps ``columns`` long vectors of ``n`` numbers: on
    that device when it is a GPU and they fit in half its free memory (the products' activations need the rest),
    else on the host (None: numpy arrays, within the memory budget or on disk)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return device if columns * n * 8 <= free / 2 else None


def product(matvec: Any, v: Vector) -> Vector:
    """``A v`` as a float64 vector of the same kind as ``v`` and of its own (orthogonalized in place): copied only
    when the matvec's result is not (an 89 MB copy cost a quarter of a Lanczos step at 11M parameters)."""
    w = matvec(v)
    if isinstance(v, torch.Tensor):
        w = torch.as_tensor(w, dtype=torch.float64, device=v.device)
        return w.clone() if w.data_ptr() == v.data_ptr() else w
    w = np.asarray(w, dtype=np.float64)
    if not (w.flags.writeable and w.flags.owndata) or np.may_share_memory(w, v):
        w = w.copy()
    return w


class ColumnStore:
    """``k`` columns of length ``n``, in memory or (``on_disk``) in a scratch file, or in the memory of a torch
    ``device``, stored as ``dtype`` (float64, or float32 for a block whose precision the products bound anyway:
    half the memory and the reading); every read and pass is float64 whatever the storage.

    Laid out by row blocks: block ``b`` holds rows ``b B : (b + 1) B`` of every column as one contiguous
    ``(k, B)`` array (``B`` = :data:`BLOCK_ROWS`), so that a pass reads each block once, contiguously, and a
    fused update-and-project (:meth:`subtract`) finds it still in cache.

    >>> s = ColumnStore(5, 2, budget=0)  # nothing fits: on disk
    >>> s.on_disk, s.set_column(1, np.arange(5.0)), s.column(1).tolist()
    (True, None, [0.0, 1.0, 2.0, 3.0, 4.0])
    >>> h = ColumnStore(3, 1, dtype=np.float32); h.set_column(0, [1 / 3, 1.0, 2.0]); h.nbytes, float(h.column(0)[0])
    (12, 0.3333333432674408)
    """

    def __init__(self, n: int, k: int, *, budget: float = float("inf"),
                 device: torch.device | str | None = None, dtype: Any = np.float64) -> None:
        self.n, self.k = int(n), int(k)
        self.device = None if device is None else torch.device(device)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float64, np.float32):
            raise ValueError(f"a store holds float64 or float32, not {self.dtype}")
        self.rows, self.n_blocks = self.layout(self.n, self.device)
        self.nbytes = self.n_blocks * self.k * self.rows * self.dtype.itemsize
        self.on_disk = self.device is None and self.nbytes > budget
        self._fd: int | None = None
        self._array: Any = None
        if self.device is not None:
            self._array = torch.zeros((self.n_blocks, self.k, self.rows), device=self.device,
                                      dtype=torch.float64 if self.dtype == np.float64 else torch.float32)
        elif self.on_disk:
            check_disk(spill_dir(), self.nbytes, f"a block of {self.k} vectors of {self.n:,} numbers")
            fd, path = tempfile.mkstemp(prefix="landscape-", suffix=f".f{8 * self.dtype.itemsize}", dir=spill_dir())
            os.unlink(path)
            os.ftruncate(fd, self.nbytes)
            self._fd = fd
        else:
            self._array = zeros_store((self.n_blocks, self.k, self.rows), self.dtype)

    @staticmethod
    def layout(n: int, device: torch.device | None = None) -> tuple[int, int]:
        """(rows per block, blocks) of a store of length ``n``: ``k`` float64 columns take ``8 k rows blocks``
        bytes."""
        rows = min(BLOCK_ROWS if device is None else DEVICE_BLOCK_ROWS, max(int(n), 1))
        return rows, -(-int(n) // rows)

    @property
    def storage(self) -> str:
        """``memory``, ``disk`` or the device's type (``cuda``): recorded with the results."""
        if self.device is not None and self.device.type != "cpu":
            return self.device.type
        return "disk" if self.on_disk else "memory"

    def native(self, x: Any) -> Vector:
        """``x`` as a vector (or small coefficient array) of this store's kind: :func:`native`."""
        return native(x, self.device)

    def _coefficients(self, M: np.ndarray) -> torch.Tensor:
        """A small coefficient array as a float64 tensor where the store's passes run (contiguous: torch takes no
        negative strides, and ``M.T`` or ``M[:, ::-1]`` come here)."""
        return tensor_of(self.native(np.ascontiguousarray(M)))

    def _empty(self, *shape: int) -> Vector:
        if self.device is None:
            return np.empty(shape)
        return torch.empty(shape, dtype=torch.float64, device=self.device)

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
        return ((block * self.k + col) * self.rows) * self.dtype.itemsize

    def read(self, a: int, b: int, cols: int) -> Vector:
        """The ``(cols, b - a)`` float64 block of rows ``a:b`` (``a`` a block start) of the first ``cols`` columns,
        rows of the result being columns of the store (a view of a float64 store in memory, else a fresh array:
        a float32 block is widened on torch's threads, a row block at a time, while it is in cache)."""
        blk = a // self.rows
        if self._array is not None:
            out = self._array[blk, :cols, :b - a]
        else:
            out = np.empty((cols, self.rows), dtype=self.dtype)
            os.preadv(self._fd, [memoryview(out)], self._offset(blk, 0))
            out = out[:, :b - a]
        if self.dtype == np.float64:
            return out
        wide = tensor_of(out).double()
        return wide if self.device is not None else wide.numpy()

    def write(self, a: int, block: Vector, col0: int = 0) -> None:
        """Columns ``col0:col0 + len(block)`` of rows ``a:a + block.shape[1]`` (``a`` a block start); ``block`` a
        numpy array or a tensor."""
        blk = a // self.rows
        if self.device is None:
            block = host(block)
        if self._array is not None:
            self._array[blk, col0:col0 + len(block), :block.shape[1]] = block
            return
        if block.shape[1] < self.rows:
            full = np.zeros((len(block), self.rows), dtype=self.dtype)
            full[:, :block.shape[1]] = block
            block = full
        os.pwrite(self._fd, np.ascontiguousarray(block, dtype=self.dtype).data, self._offset(blk, col0))

    def column(self, i: int) -> Vector:
        """Column ``i`` as a new contiguous vector of this store's kind."""
        out = self._empty(self.n)
        narrow = None if self._array is not None or self.dtype == np.float64 else np.empty(self.rows, self.dtype)
        for a, b in self.blocks():
            if self._array is not None:
                out[a:b] = self._array[a // self.rows, i, :b - a]
            elif narrow is None:
                os.preadv(self._fd, [memoryview(out[a:b])], self._offset(a // self.rows, i))
            else:
                os.preadv(self._fd, [memoryview(narrow[:b - a])], self._offset(a // self.rows, i))
                out[a:b] = narrow[:b - a]
        return out

    def set_column(self, i: int, v: Vector) -> None:
        v = self.native(v) if self.device is not None else np.ascontiguousarray(v, dtype=np.float64)
        for a, b in self.blocks():
            if self._array is not None:
                self._array[a // self.rows, i, :b - a] = v[a:b]
            else:
                os.pwrite(self._fd, np.ascontiguousarray(v[a:b], dtype=self.dtype).data,
                          self._offset(a // self.rows, i))

    # ------------------------------------------------------------------ passes over the first ``cols`` columns
    # (small results come back as numpy arrays; the long vector ``w`` is of this store's kind)
    # ``w`` may also be a ``(p, n)`` block of ``p`` vectors (rows): then ``h`` is ``(p, cols)``, one GEMM per block
    def project(self, w: Vector, cols: int) -> np.ndarray:
        """``V^T w`` (one pass); for a block of rows ``W``, ``W V``."""
        h, tw = torch.zeros((*w.shape[:-1], cols), dtype=torch.float64, device=self.device), tensor_of(w)
        for a, b in self.blocks():
            h += tw[..., a:b] @ tensor_of(self.read(a, b, cols)).T
        return host(h)

    def subtract(self, w: Vector, h: np.ndarray, cols: int, *, project_after: bool = False
                 ) -> np.ndarray | None:
        """``w -= V h`` in place (one pass); with ``project_after`` also ``V^T w`` of the result, from the same
        blocks while they are in cache (the second sweep of classical Gram-Schmidt at no extra pass). For a block
        of rows ``W``: ``W -= h V^T``."""
        th, tw = self._coefficients(h), tensor_of(w)
        h2 = torch.zeros((*w.shape[:-1], cols), dtype=torch.float64, device=self.device) if project_after else None
        for a, b in self.blocks():
            Vb = tensor_of(self.read(a, b, cols))
            tw[..., a:b] -= th @ Vb
            if h2 is not None:
                h2 += tw[..., a:b] @ Vb.T
        return None if h2 is None else host(h2)

    def gram(self, cols: int) -> np.ndarray:
        """``V^T V`` (one pass)."""
        G = torch.zeros((cols, cols), dtype=torch.float64, device=self.device)
        for a, b in self.blocks():
            Vb = tensor_of(self.read(a, b, cols))
            G += Vb @ Vb.T
        return host(G)

    def transform(self, M: np.ndarray) -> None:
        """``V[:, :M.shape[1]] = V[:, :M.shape[0]] M`` in place (one pass)."""
        Mt = self._coefficients(M.T)
        for a, b in self.blocks():
            self.write(a, Mt @ tensor_of(self.read(a, b, M.shape[0])))

    def combine(self, M: np.ndarray, budget: float = float("inf")) -> np.ndarray:
        """``V[:, :M.shape[0]] M`` as an ``(n, M.shape[1])`` Fortran-ordered array (one pass): in memory when it
        fits ``budget`` bytes, else a mapping of an unlinked scratch file (pages read when touched, reclaimable,
        unmapped as each block is written: :func:`release_pages`). On the host whatever the store's device."""
        shape = (self.n, M.shape[1])
        if self.n * M.shape[1] * 8 <= budget:
            out = np.empty(shape, order="F")
        else:
            check_disk(spill_dir(), self.n * M.shape[1] * 8, f"{M.shape[1]} vectors of {self.n:,} numbers")
            with tempfile.NamedTemporaryFile(prefix="landscape-", suffix=".f64", dir=spill_dir()) as f:
                out = np.memmap(f, dtype=np.float64, mode="w+", shape=shape, order="F")
        Mt = self._coefficients(M.T)
        for a, b in self.blocks():
            out[a:b] = host(Mt @ tensor_of(self.read(a, b, M.shape[0]))).T
            release_pages(out)
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
