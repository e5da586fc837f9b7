"""Evaluation inputs read from disk on demand, for evaluation sets larger than memory.

A :class:`StreamedInputs` stands where the Problem would hold its input tensor ``X``. Indexing it (a slice of
rows, or an index array) reads those rows from the source, converts them as :mod:`landscape.io.data` converts
in-memory inputs (16- to 64-bit integers to ``int64``, other non-float types to ``float32``, then the evaluation dtype) and
moves them to the device; nothing else is held. Sources:

* an ``h5py.Dataset`` (``.h5``/``.hdf5`` data files: the file stays open for reading);
* a memory-mapped tensor (``.pt``/``.pth`` data files, ``torch.load(mmap=True)``);
* a map-style ``torch.utils.data.Dataset`` (its items' inputs, stacked per read);
* any array or tensor indexable by rows (useful to stream data that is in memory, e.g. in tests).

The rows evaluated are ``rows`` of the source (a sorted seeded subset, ``--max-samples``) or all of them.
Every pass over the evaluation set reads the inputs again: a slice reads them once per block of grid points
(the Problem evaluates a block chunk by chunk), each gradient or Hessian-vector product once.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch


def converted_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype inputs of ``dtype`` are evaluated in before the Problem's own dtype: integer tokens stay
    integers (``int64``), float32/float64 stay, anything else (``uint8`` images, ``bool``, half) is ``float32``."""
    if dtype in (torch.int16, torch.int32, torch.int64):
        return torch.long
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32


def source_dtype(source: Any) -> torch.dtype:
    """The torch dtype of a tensor (or :class:`DatasetRows`) or of a numpy-like array (``h5py.Dataset``)."""
    if isinstance(source.dtype, torch.dtype):
        return source.dtype
    return torch.from_numpy(np.zeros(0, dtype=source.dtype)).dtype


class DatasetRows:
    """Row access to the inputs of a map-style dataset whose items are ``(input, target)`` pairs."""

    def __init__(self, dataset: Any, split: Any) -> None:
        self.dataset = dataset
        self._split = split  # (item) -> (input, target), landscape.io.data's reading of an item
        first = torch.as_tensor(split(dataset[0])[0]) if len(dataset) else torch.zeros(0)
        self.shape = (len(dataset), *first.shape)
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> torch.Tensor:
        idx = range(*key.indices(len(self))) if isinstance(key, slice) else key.tolist()
        return torch.stack([torch.as_tensor(self._split(self.dataset[i])[0]) for i in idx])


class StreamedInputs:
    """Rows ``rows`` of ``source`` (all rows when None), read on demand in ``dtype`` on ``device``.

    Tensor-like where the Problem needs it: ``len``, ``shape``, ``is_floating_point()``, ``to(device, dtype)``
    (a new view of the same source), ``numel()``, ``element_size()``; ``X[a:b]`` and ``X[index_tensor]`` return
    tensors. :meth:`window` is a lazy sub-range.
    """

    def __init__(self, source: Any, rows: np.ndarray | None = None, *, dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.source = source
        n_source = int(source.shape[0])
        self.rows = None if rows is None or (len(rows) == n_source and np.array_equal(rows, np.arange(n_source))) \
            else np.asarray(rows, dtype=np.int64)
        self.dtype = dtype or converted_dtype(source_dtype(source))
        self.device = torch.device(device)
        self.shape = torch.Size((n_source if self.rows is None else len(self.rows), *source.shape[1:]))

    # --------------------------------------------------------------- tensor-like
    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def element_size(self) -> int:
        return self.dtype.itemsize

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StreamedInputs:
        out = StreamedInputs.__new__(StreamedInputs)
        out.__dict__.update(self.__dict__)
        out.device = torch.device(device) if device is not None else self.device
        out.dtype = dtype or self.dtype
        return out

    def window(self, start: int, stop: int) -> StreamedInputs:
        """Rows ``start:stop`` of these inputs, still unread."""
        rows = self._source_rows(slice(start, stop))
        return self._of_source_rows(rows if isinstance(rows, np.ndarray) else np.arange(rows.start, rows.stop))

    def _of_source_rows(self, rows: np.ndarray) -> StreamedInputs:
        """These inputs restricted to the source's ``rows``, in that order, still unread."""
        out = self.to()
        out.rows = np.asarray(rows, dtype=np.int64)
        out.shape = torch.Size((len(out.rows), *self.shape[1:]))
        return out

    # --------------------------------------------------------------- reading
    def _source_rows(self, key: slice) -> slice | np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise IndexError("streamed inputs are read in contiguous slices")
        if self.rows is None:
            return slice(start, stop)
        sel = self.rows[start:stop]
        if len(sel) and np.all(np.diff(sel) == 1):  # consecutive source rows: one contiguous read
            return slice(int(sel[0]), int(sel[-1]) + 1)
        return sel

    def _read(self, where: slice | np.ndarray) -> torch.Tensor:
        block = self.source[where]
        t = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(block))
        return t.to(device=self.device, dtype=self.dtype)

    def __getitem__(self, key: slice | torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(key, slice):
            src = self._source_rows(key)
            if isinstance(src, slice):
                return self._read(src)
        else:
            idx = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
            src = idx if self.rows is None else self.rows[idx]
        # sources such as h5py read increasing, distinct indices: read those once, then put them in order
        uniq, inverse = np.unique(src, return_inverse=True)
        data = self._read(uniq)
        return data[torch.as_tensor(inverse.reshape(-1), device=self.device)]

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """The inputs in consecutive reads of at most ``size`` rows."""
        for s in range(0, len(self), size):
            yield self[s:s + size]


def reordered(X: torch.Tensor | StreamedInputs, order: np.ndarray) -> StreamedInputs:
    """The rows of ``X`` in the order ``order`` (indices into ``X``), unread: a slice of it reads those rows then
    (streamed inputs stay streamed; in-memory ones are not copied whole)."""
    if not isinstance(X, StreamedInputs):
        return StreamedInputs(X, order, dtype=X.dtype, device=X.device)
    return X._of_source_rows(order if X.rows is None else X.rows[order])


def rows(X: torch.Tensor | StreamedInputs, start: int, stop: int) -> torch.Tensor | StreamedInputs:
    """Rows ``start:stop`` of in-memory inputs (a view) or of streamed ones (unread)."""
    return X.window(start, stop) if isinstance(X, StreamedInputs) else X[start:stop]
