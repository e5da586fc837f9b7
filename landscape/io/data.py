"""Evaluation data: built-in data sets, tensor files and user callables, made into tensors.

A data spec is one of

* a built-in name: ``digits`` (the 1,797 8x8 handwritten digits shipped in ``data/``, seeded
  80/20 train/test split), ``gaussian_mixture`` (C-class Gaussian mixture) or
  ``teacher_student`` (regression on a random linear or one-hidden-layer teacher) or ``tokens``
  (generated token sequences for language models, :func:`landscape.io.hf.tokens`);
* a tensor file (``.pt``, ``.npz``, ``.h5``/``.hdf5``) holding inputs under ``X`` (or ``x``,
  ``inputs``, ``images``, ``data``) and targets under ``y`` (or ``targets``, ``labels``, ``target``), or token
  data: ``input_ids`` with optional ``attention_mask`` and ``labels`` (:func:`landscape.io.hf.token_arrays`);
* ``module:callable`` or ``file.py:callable`` returning a ``Dataset``, a ``DataLoader`` or an
  ``(X, y)`` tuple of tensors.

The result is an :class:`EvalData`: the evaluation inputs and targets as tensors, the indices
of the seeded subset (``max_samples``) and a sha256 of the exact tensors evaluated.

With ``stream`` the inputs stay on disk (:class:`landscape.io.stream.StreamedInputs`) and are read a chunk at a
time: ``.h5``/``.hdf5`` files (read through h5py), ``.pt``/``.pth`` files (memory-mapped) and map-style
datasets from a callable. Targets are always loaded. ``stream="auto"`` streams when the inputs would take more
than a quarter of the machine's memory. The sha256 is the same streamed or not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from ..errors import LandscapeError
from .hf import token_arrays
from .hf import tokens as hf_tokens
from .specs import Spec, call_spec
from .stream import DatasetRows, StreamedInputs, converted_dtype, source_dtype

X_KEYS = ("X", "x", "inputs", "images", "data", "features")
Y_KEYS = ("y", "Y", "targets", "labels", "target", "label")
DATA_FILE_SUFFIXES = (".pt", ".pth", ".npz", ".h5", ".hdf5")
STREAM_MODES = ("off", "on", "auto")
#: bytes per read when streamed inputs are hashed and checked
READ_BYTES = 64 * 2**20


@dataclass(frozen=True)
class EvalData:
    """The evaluation set: ``X[i]``, ``y[i]`` is sample ``indices[i]`` of the source data (``X`` in memory, or
    streamed from disk)."""

    X: torch.Tensor | StreamedInputs
    y: torch.Tensor
    indices: np.ndarray
    n_source: int
    sha256: str
    spec: Mapping[str, Any]

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def streamed(self) -> bool:
        return isinstance(self.X, StreamedInputs)


# --------------------------------------------------------------------------- built-ins

def digits(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The UCI/sklearn 8x8 handwritten digits: images ``(n, 1, 8, 8)`` scaled to [0, 1], labels 0-9.

    ``split`` is ``train`` (1,437 samples), ``test`` (360) or ``all`` (1,797); the split is a
    fixed permutation drawn with ``seed``.
    """
    with resources.files("landscape_data").joinpath("digits.npz").open("rb") as f:
        arrays = np.load(f)
        images, target = arrays["images"], arrays["target"]
    X = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(target.astype(np.int64))
    if split == "all":
        return X, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(0.8 * len(y)))
    if split == "train":
        idx = perm[:n_train].sort().values
    elif split == "test":
        idx = perm[n_train:].sort().values
    else:
        raise LandscapeError(f"digits split {split!r} is unknown", hint="use split=train, test or all")
    return X[idx], y[idx]


def gaussian_mixture(n: int = 2000, classes: int = 10, dim: int = 20, separation: float = 3.0,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points in ``dim`` dimensions, class ``c = i mod classes`` drawn from N(mu_c, I).

    The means are mu_c ~ N(0, separation^2 I / dim), so two means lie about ``separation * sqrt(2)`` apart.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * (separation / dim ** 0.5)
    y = torch.arange(n) % classes
    X = means[y] + torch.randn(n, dim, generator=g)
    return X, y


def teacher_student(n: int = 1000, dim: int = 20, out: int = 1, hidden: int = 0, noise: float = 0.0,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression targets from a random teacher: linear (``hidden=0``) or one tanh hidden layer."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dim, generator=g)
    if hidden:
        W1 = torch.randn(dim, hidden, generator=g) / dim ** 0.5
        W2 = torch.randn(hidden, out, generator=g) / hidden ** 0.5
        Y = torch.tanh(X @ W1) @ W2
    else:
        Y = X @ (torch.randn(dim, out, generator=g) / dim ** 0.5)
    return X, Y + noise * torch.randn(n, out, generator=g)


BUILTINS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "digits": digits,
    "gaussian_mixture": gaussian_mixture,
    "teacher_student": teacher_student,
    "tokens": hf_tokens,
}


# --------------------------------------------------------------------------- loading

def _pick(mapping: Mapping[str, Any], keys: tuple[str, ...], path: Path, what: str) -> Any:
    for k in keys:
        if k in mapping:
            return mapping[k]
    raise LandscapeError(f"{path} has no {what} array (looked for {', '.join(keys)}; found {', '.join(map(str, mapping))})",
                         hint="store inputs as 'X' and targets as 'y'")


def _load_tensor_file(path: Path, *, lazy: bool = False) -> tuple[Any, torch.Tensor]:
    """Inputs and targets of a data file. With ``lazy`` the inputs stay on disk: an ``h5py.Dataset`` of the file,
    left open, or a memory-mapped tensor (``.npz`` archives cannot be read lazily)."""
    try:
        if path.suffix == ".npz":
            if lazy:
                raise LandscapeError(f"{path} cannot be streamed (an .npz archive is read whole)",
                                     hint="save X and y to an .h5 or .pt file to stream them, or drop --stream")
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.suffix in (".h5", ".hdf5"):
            import h5py

            f = h5py.File(path, "r")
            arrays = {k: f[k] if lazy else f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
            if not lazy:
                f.close()
        else:
            arrays = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
            if isinstance(arrays, (tuple, list)) and len(arrays) == 2:
                arrays = {"X": arrays[0], "y": arrays[1]}
            if not isinstance(arrays, Mapping):
                raise LandscapeError(f"{path} holds a {type(arrays).__name__}", hint="save a dict {'X': ..., 'y': ...}")
        tokens = token_arrays(arrays)
        if tokens is not None:  # input_ids (attention_mask, labels): read whole, see landscape.io.hf
            return tokens
        X = _pick(arrays, X_KEYS, path, "input")
        y = _pick(arrays, Y_KEYS, path, "target")
        y = y.clone() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y[()]))  # targets: in memory
    except LandscapeError:
        raise
    except Exception as err:  # any reader failure means an unreadable file
        raise LandscapeError(f"cannot read data file {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                             hint="the file may be corrupt; it should hold X and y arrays") from err
    if lazy:
        return X, y
    return (X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))), y


def _read_whole(source: Any) -> torch.Tensor:
    """The inputs a lazily opened data file holds, read into memory (an h5py dataset's file is closed after)."""
    if isinstance(source, torch.Tensor):
        return source.clone()  # off the memory map
    X = torch.as_tensor(np.asarray(source[()]))
    source.file.close()
    return X


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        return _pick(item, X_KEYS, Path("<dataset item>"), "input"), _pick(item, Y_KEYS, Path("<dataset item>"), "target")
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise LandscapeError(f"a dataset item is a {type(item).__name__}, not an (input, target) pair",
                         hint="make the dataset return (x, y)")


def _materialize(obj: Any, subset: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in obj):
        X, y = (torch.as_tensor(t) for t in obj)
        return X, y
    if isinstance(obj, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in obj:
            x, y = _split_item(batch)
            xs.append(torch.as_tensor(x))
            ys.append(torch.as_tensor(y))
        if not xs:
            return torch.empty(0), torch.empty(0)
        return torch.cat(xs), torch.cat(ys)
    if isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__"):
        idx = range(len(obj)) if subset is None else subset.tolist()
        pairs = [_split_item(obj[i]) for i in idx]
        if not pairs:
            return torch.empty(0), torch.empty(0)
        X = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
        return X, y
    raise LandscapeError(f"the data callable returned a {type(obj).__name__}",
                         hint="return a Dataset, a DataLoader or an (X, y) tuple of tensors")


def subset_indices(n: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size ``max_samples`` (all of ``range(n)`` if None)."""
    if max_samples is None or max_samples >= n:
        return np.arange(n)
    if max_samples <= 0:
        raise LandscapeError(f"--max-samples must be positive, got {max_samples}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
    return np.sort(perm.numpy())


def _hash_update(h: Any, shape: tuple[int, ...], dtype: torch.dtype, chunks: Iterable[torch.Tensor]) -> None:
    h.update(str((tuple(shape), str(dtype))).encode())
    for t in chunks:
        t = t.detach().cpu().contiguous()
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())


def tensors_sha256(*tensors: torch.Tensor, extra: bytes = b"") -> str:
    h = hashlib.sha256(extra)
    for t in tensors:
        _hash_update(h, tuple(t.shape), t.dtype, [t])
    return h.hexdigest()


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _stream_it(stream: str, shape: tuple[int, ...], dtype: torch.dtype, n_rows: int) -> bool:
    """Whether to stream inputs of ``shape`` (``n_rows`` of them evaluated): ``on``, or ``auto`` and more than a
    quarter of the machine's memory once converted."""
    if stream == "on":
        return True
    row = int(np.prod(shape[1:])) * converted_dtype(dtype).itemsize
    return stream == "auto" and row * n_rows > _memory_bytes() // 4


def load_data(spec: str | Spec, *, max_samples: int | None = None, seed: int = 0,
              from_checkpoint: bool = False, stream: str = "off") -> EvalData:
    """Turn a data spec into an :class:`EvalData` (a seeded subset when ``max_samples`` is set); ``stream`` is
    ``off``, ``on`` or ``auto`` (see the module docstring)."""
    if stream not in STREAM_MODES:
        raise LandscapeError(f"stream mode {stream!r} is unknown", hint=f"use {', '.join(STREAM_MODES)}")
    if isinstance(spec, str):
        spec = Spec(spec, {})
    target, args = spec.target, dict(spec.args)
    if target in BUILTINS:
        try:
            X, y = BUILTINS[target](**args)
        except TypeError as err:
            raise LandscapeError(f"built-in data {target!r} got bad arguments {args} ({err})") from err
    elif Path(target).suffix in DATA_FILE_SUFFIXES and ":" not in target:
        path = Path(target)
        if not path.is_file():
            raise LandscapeError(f"data file {path} does not exist", hint="check the --data path")
        source = None
        if stream != "off" and (path.suffix != ".npz" or stream == "on"):
            try:
                source, y = _load_tensor_file(path, lazy=True)
            except LandscapeError:
                if stream == "on":
                    raise
                # auto: a file that cannot be opened lazily (e.g. a legacy, non-zip .pt) is read whole below
        if source is not None:
            subset = subset_indices(int(source.shape[0]), max_samples, seed)
            if _stream_it(stream, tuple(source.shape), source_dtype(source), len(subset)):
                return _finish(StreamedInputs(source, subset), y[torch.from_numpy(subset)], subset,
                               int(source.shape[0]), spec)
            X = _read_whole(source)  # small enough: read what is already open, not the file again
        else:
            X, y = _load_tensor_file(path)
    elif ":" in target:
        obj = call_spec(spec, what="data", from_checkpoint=from_checkpoint)
        if isinstance(obj, torch.utils.data.Dataset) and not isinstance(obj, torch.utils.data.IterableDataset) \
                and hasattr(obj, "__len__"):
            subset = subset_indices(len(obj), max_samples, seed)
            n_source = len(obj)
            if stream != "off" and n_source:
                rows = DatasetRows(obj, _split_item)
                if _stream_it(stream, tuple(rows.shape), rows.dtype, len(subset)):
                    y = torch.stack([torch.as_tensor(_split_item(obj[i])[1]) for i in subset.tolist()])
                    return _finish(StreamedInputs(rows, subset), y, subset, n_source, spec)
            X, y = _materialize(obj, subset)
            return _finish(X, y, subset, n_source, spec, stream=stream)
        if stream == "on" and not isinstance(obj, (tuple, list)):
            raise LandscapeError(f"the data callable returned a {type(obj).__name__}, which cannot be read by rows",
                                 hint="return a map-style Dataset to stream, or drop --stream")
        X, y = _materialize(obj, None)
    else:
        raise LandscapeError(f"data spec {target!r} is not a built-in, a data file or module:callable",
                             hint=f"built-ins: {', '.join(BUILTINS)}; files: {', '.join(DATA_FILE_SUFFIXES)}")
    n_source = int(X.shape[0]) if X.ndim else 0
    subset = subset_indices(n_source, max_samples, seed)
    if len(subset) < n_source:
        X, y = X[torch.from_numpy(subset)], y[torch.from_numpy(subset)]
    return _finish(X, y, subset, n_source, spec, stream=stream)


def _finish(X: torch.Tensor | StreamedInputs, y: torch.Tensor, indices: np.ndarray, n_source: int, spec: Spec, *,
            stream: str = "off") -> EvalData:
    """Check and convert the evaluation set and hash it. In-memory inputs are streamed from memory when
    ``stream`` is ``on`` (built-in data, tuples of tensors: what cannot be left on disk)."""
    if X.ndim == 0 or X.shape[0] == 0:
        raise LandscapeError(f"data {spec.target!r} has no samples", hint="check the data spec and --max-samples")
    if y.shape[0] != X.shape[0]:
        raise LandscapeError(f"data {spec.target!r} has {X.shape[0]} inputs but {y.shape[0]} targets")
    if isinstance(X, torch.Tensor):
        X = X.to(converted_dtype(X.dtype))  # tokens stay integers; uint8 images, bool masks, half: float32
        if stream == "on":
            X = StreamedInputs(X)
    if y.is_floating_point() and y.ndim == 1:
        y = y.unsqueeze(1)
    if not y.is_floating_point():
        y = y.long()

    def checked(chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for t in chunks:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LandscapeError(f"data {spec.target!r} has NaN or Inf inputs", hint="clean the data first")
            yield t

    indices = np.asarray(indices, dtype=np.int64)
    h = hashlib.sha256(indices.tobytes())
    if isinstance(X, StreamedInputs):
        row_bytes = max(1, X.numel() // len(X) * X.element_size())
        _hash_update(h, tuple(X.shape), X.dtype, checked(X.chunks(max(1, READ_BYTES // row_bytes))))
    else:
        _hash_update(h, tuple(X.shape), X.dtype, checked([X]))
    _hash_update(h, tuple(y.shape), y.dtype, [y])
    return EvalData(X=X, y=y, indices=indices, n_source=n_source, sha256=h.hexdigest(), spec=spec.to_json())
