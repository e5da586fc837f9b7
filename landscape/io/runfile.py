"""The HDF5 run file: the single source of truth of a scan, crash-safe and resumable.

Layout (``docs/schema.md`` is the reference): root attributes describe the run; each slice
lives in ``/slices/<name>`` with ``x`` (and ``y``), ``loss``, ``accuracy``, extra metrics, a
``done`` mask and its ``directions/<k>/<parameter name>``.

Crash safety. HDF5 files are not safe against a writer killed mid-write, so ``run.h5`` is
never modified in place: every change is made to a copy which is fsynced and then renamed
over ``run.h5`` (:meth:`RunFile.transaction`), so the file on disk is always a complete,
readable run file. Finished points go first to an append-only journal ``run.h5.journal``
(one JSON line per block of points, floats written with ``repr`` precision, so values are
restored bitwise); the journal is merged into ``run.h5`` every ``compact_every`` seconds, at
the end of each slice and when a run is resumed. A torn last journal line (a kill mid-write)
is ignored: its points are simply computed again.

One writer at a time: opening a run file for writing takes an exclusive ``flock`` on
``run.h5.lock``; a second writer is refused with a clear message. The lock dies with its
process, so a killed scan can be resumed at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import h5py
import numpy as np

from ..errors import LandscapeError

SCHEMA = "landscape/1"
#: Tries, 10 ms apart, to take a run file's write lock before another writer is reported.
LOCK_TRIES = 50
RESERVED = ("x", "y", "done", "directions")


def link_name(name: str) -> str:
    """``name`` (a parameter's, which PyTorch lets hold any character but ``.``-separated paths) as one HDF5 link
    name: ``%`` and ``/`` percent-escaped (a ``/`` would open a subgroup) and a lone ``.`` (the group itself) as
    ``%2E``; every other name is unchanged, so the files of ordinary models read as before. :func:`from_link`
    inverts it.

    >>> link_name("blocks/0.weight"), from_link(link_name("50%/."))
    ('blocks%2F0.weight', '50%/.')
    """
    key = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" if key == "." else key


def from_link(key: str) -> str:
    """The name :func:`link_name` stored as ``key``."""
    return key.replace("%2E", ".").replace("%2F", "/").replace("%25", "%") if "%" in key else key


def encode_attr(value: Any) -> Any:
    """HDF5-storable attribute: scalars and strings as they are, anything else as JSON text."""
    if isinstance(value, str):
        return str(value)  # plain str: h5py cannot store str subclasses such as torch's TorchVersion
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def decode_attr(value: Any) -> Any:
    """Inverse of :func:`encode_attr` for reading: JSON text is parsed, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and (value.startswith(("{", "[")) or value in ("null", "true", "false")):
        try:
            return json.loads(value)
        except (ValueError, TypeError):
            return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def exists_error(path: Path) -> LandscapeError:
    """What a run that would start ``path`` afresh is told when the file is there already."""
    return LandscapeError(f"run file {path} already exists",
                          hint="add --resume to continue it or --overwrite to start again")


def check_resumable(path: Path) -> h5py.File:
    """The existing run file ``path`` opened read-only, once it is known to be a readable landscape run file that a
    run may continue; else the :class:`LandscapeError` a resumed run (and its dry run) is refused with."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise LandscapeError(f"{path} is not a readable HDF5 run file ({err})",
                             hint="use --overwrite to replace it") from err
    schema = f.attrs.get("schema")
    if decode_attr(schema) != SCHEMA:
        f.close()
        raise LandscapeError(f"{path} is not a landscape run file (schema {schema!r})",
                             hint="use --overwrite to replace it, or another -o")
    return f


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of the journal ``path`` (one per block of finished points; none when there is no journal), up to
    a torn last line, whose points will be computed again. Only read: a resumed run merges them into its file
    (:meth:`RunFile.compact`), a dry run counts them as done."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Make ``path`` by ``write(tmp)`` on a fresh name beside it (this process's, with the umask's permissions),
    then rename it over ``path``: a reader (a browser on a report) sees the old file or the new one, never a
    part, and two writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_path(path: str | Path) -> None:
    """Refuse, before any work, a run-file path that cannot be written: the path is a folder, a file stands where
    a folder of it should be, or its nearest existing folder is not writable (a :class:`LandscapeError`)."""
    path = Path(path)
    if path.is_dir():
        raise LandscapeError(f"cannot write the run file {path}: it is a folder", hint="give -o a .h5 file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LandscapeError(f"cannot write the run file {path}: {ancestor} is a file, not a folder",
                             hint="give -o a .h5 file name, or a folder that is not an existing file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LandscapeError(f"cannot write the run file {path}: {ancestor} is not writable",
                             hint="choose a writable place with -o")


def make_parent(path: Path) -> None:
    """Create the folder of ``path``; a place that cannot hold it is a :class:`LandscapeError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LandscapeError(f"cannot write the run file {path}: {err.strerror or err} ({err.filename or path.parent})",
                             hint="choose a writable place with -o") from None


class RunFile:
    """Exclusive, crash-safe writer of one run file.

    ``mode`` is ``create`` (refuse an existing file), ``resume`` (continue an existing file,
    or start one) or ``overwrite`` (delete an existing file first).
    """

    def __init__(self, path: str | Path, *, mode: str = "create", compact_every: float = 30.0,
                 journal_every: float = 0.2) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.journal_path = self.path.with_name(self.path.name + ".journal")
        self.compact_every = compact_every
        self.journal_every = journal_every
        make_parent(self.path)
        try:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LandscapeError(f"cannot write the run file {self.path}: {err.strerror or err}",
                                 hint="choose a writable place with -o") from None
        for attempt in range(LOCK_TRIES):  # a reader's look (writer_active) holds a shared lock for an instant
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == LOCK_TRIES - 1:
                    os.close(self._lock_fd)
                    raise LandscapeError(f"run file {self.path} is being written by another process",
                                         hint="wait for that scan to finish, or write elsewhere with -o") from None
                time.sleep(0.01)
        try:
            self._open(mode)
        except BaseException:
            self._unlock()
            raise
        self._pending: list[str] = []
        self._last_flush = self._last_compact = time.monotonic()

    def _open(self, mode: str) -> None:
        for stale in self.path.parent.glob(self.path.name + ".tmp*"):
            stale.unlink()  # a copy left by a writer killed mid-transaction; we hold the lock
        if mode == "create" and self.path.exists():
            raise exists_error(self.path)
        if mode == "overwrite":
            for p in (self.path, self.journal_path):
                if p.exists():
                    p.unlink()
        elif mode not in ("create", "resume"):
            raise ValueError(f"unknown mode {mode!r}")
        if self.path.exists():
            check_resumable(self.path).close()
            self.compact()
        else:
            with self.transaction() as f:
                f.attrs["schema"] = SCHEMA
        self._journal = open(self.journal_path, "a", encoding="utf-8")

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def transaction(self) -> Iterator[h5py.File]:
        """Edit a copy of the run file, then atomically rename it over the original."""
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        existed = self.path.exists()
        if existed:
            shutil.copyfile(self.path, tmp)
        try:
            with h5py.File(tmp, "a" if existed else "w") as f:
                yield f
            _fsync_path(tmp)
            os.replace(tmp, self.path)
            _fsync_path(self.path.parent)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise

    def read(self) -> h5py.File:
        """The run file opened read-only (close it, or use it in a ``with``)."""
        return h5py.File(self.path, "r")

    # ------------------------------------------------------------------ journal
    def append(self, slice_name: str, index: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Record finished points ``index`` (flat) of ``slice_name``; cheap, buffered a few ms."""
        rec = {"slice": slice_name, "index": [int(i) for i in index],
               "values": {k: [float(x) for x in np.asarray(v, dtype=np.float64)] for k, v in values.items()}}
        self._pending.append(json.dumps(rec, allow_nan=True))
        now = time.monotonic()
        if now - self._last_flush >= self.journal_every:
            self.flush_journal()
        if now - self._last_compact >= self.compact_every:
            self.compact()

    def flush_journal(self) -> None:
        if self._pending:
            self._journal.write("".join(line + "\n" for line in self._pending))
            self._journal.flush()
            self._pending.clear()
        self._last_flush = time.monotonic()

    def compact(self) -> None:
        """Merge the journal into the run file (one atomic transaction), then empty it."""
        if getattr(self, "_journal", None) is not None:
            self.flush_journal()
        records = read_journal(self.journal_path)
        if records:
            by_slice: dict[str, list[dict[str, Any]]] = {}
            for r in records:
                by_slice.setdefault(r["slice"], []).append(r)
            with self.transaction() as f:
                for name, recs in by_slice.items():
                    g = f["slices"][name]
                    done = g["done"][()]
                    arrays = {k: g[k][()] for k in recs[0]["values"]}
                    for r in recs:
                        idx = np.unravel_index(np.asarray(r["index"], dtype=np.int64), done.shape)
                        done[idx] = True
                        for k, v in r["values"].items():
                            arrays[k][idx] = np.asarray(v, dtype=np.float64)
                    g["done"][...] = done
                    for k, a in arrays.items():
                        g[k][...] = a
        if self.journal_path.exists():
            os.truncate(self.journal_path, 0)
        self._last_compact = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Merge the journal, delete it and release the lock."""
        if getattr(self, "_journal", None) is None:
            return
        try:
            self.compact()
            self._journal.close()
            self._journal = None
            if self.journal_path.exists():
                self.journal_path.unlink()
        finally:
            self._unlock()

    def abandon(self) -> None:
        """Flush what is journaled and release the lock, keeping the journal for a later resume."""
        if getattr(self, "_journal", None) is not None:
            self.flush_journal()
            self._journal.close()
            self._journal = None
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
            try:
                self.lock_path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunFile":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: decode_attr(v) for k, v in obj.attrs.items()}


def writer_active(path: str | Path) -> bool:
    """Whether a process holds the write lock of the run file ``path`` (a scan in progress). Reading is safe
    either way: a writer replaces the whole file by a rename, so a reader keeps the complete file it opened (the
    last saved state; points since then wait in the journal). The look takes a shared lock for an instant, which
    a writer starting then waits out (:data:`LOCK_TRIES`)."""
    path = Path(path)
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock
    return False


def open_run_file(path: str | Path) -> h5py.File:
    """A run (or comparison, trajectory) file opened read-only; missing, unreadable or foreign files are a
    :class:`LandscapeError` that says so."""
    path = Path(path)
    if not path.exists():
        if writer_active(path):
            raise LandscapeError(f"run file {path} is in progress and nothing is saved in it yet",
                                 hint="try again in a few seconds")
        raise LandscapeError(f"run file {path} does not exist", hint="give a run.h5 written by landscape")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise LandscapeError(f"{path} is not a readable HDF5 file ({err})",
                             hint="give a run.h5 written by landscape") from None
    if decode_attr(f.attrs.get("schema")) != SCHEMA:
        f.close()
        raise LandscapeError(f"{path} is not a landscape run file", hint=f"expected schema {SCHEMA}")
    return f


def describe(path: str | Path) -> dict[str, Any]:
    """Every attribute and scalar result of a run file, as plain Python (for ``inspect``); ``in_progress`` says
    whether a writer holds it (:func:`writer_active`: then this is its last saved state)."""
    path = Path(path)
    with open_run_file(path) as f:
        out: dict[str, Any] = {"path": str(path), "in_progress": writer_active(path), "attrs": read_attrs(f),
                               "groups": {}}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and name.count("/") < 2 and not name.endswith("directions"):
                entry: dict[str, Any] = {"attrs": read_attrs(obj), "datasets": {}}
                for k, ds in obj.items():
                    if isinstance(ds, h5py.Dataset):
                        entry["datasets"][k] = ds[()].item() if ds.shape == () else {"shape": list(ds.shape),
                                                                                   "dtype": str(ds.dtype)}
                out["groups"][name] = entry

        f.visititems(visit)
    return out
