"""Import surface files written by the original loss-landscape code (Li et al. 2018).

Those files hold ``xcoordinates`` (and ``ycoordinates`` for 2D), and surfaces such as ``train_loss``,
``train_acc``, ``test_loss``, ``test_acc``, stored as ``[y, x]`` (shape ``(ny, nx)``) with accuracies in
percent. :func:`import_loss_landscape` writes them into a run file as ``/slices/<name>`` with our
orientation, ``loss[i, j]`` at ``(x[i], y[j])``, and accuracies as fractions. ``train_loss`` becomes
``loss``, ``train_acc`` becomes ``accuracy``, the test surfaces become ``test_loss`` and ``test_accuracy``.
Points that code had not computed (filled with -1) are NaN with ``done = False``. The directions lived in a
separate file in that code, so the slice has none; ``kind`` is ``imported``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import LandscapeError
from .runfile import RunFile, encode_attr

SURFACES = {"train_loss": "loss", "train_acc": "accuracy", "test_loss": "test_loss", "test_acc": "test_accuracy"}


def import_loss_landscape(surface_file: str | Path, run_file: str | Path, *, name: str = "imported",
                          overwrite: bool = False) -> Path:
    """Convert a loss-landscape surface file into a run file (see the module docstring)."""
    src = Path(surface_file)
    try:
        f = h5py.File(src, "r")
    except OSError as err:
        raise LandscapeError(f"{src} is not a readable HDF5 file ({err})") from err
    with f:
        if "xcoordinates" not in f:
            raise LandscapeError(f"{src} has no xcoordinates", hint="is it a loss-landscape surface file?")
        x = f["xcoordinates"][()].astype(np.float64)
        y = f["ycoordinates"][()].astype(np.float64) if "ycoordinates" in f else None
        shape = (len(x),) if y is None else (len(x), len(y))
        surfaces = {}
        for key, ours in SURFACES.items():
            if key not in f:
                continue
            a = np.asarray(f[key][()], dtype=np.float64)
            if y is not None:
                if a.shape != (len(y), len(x)):
                    raise LandscapeError(f"{src}: {key} has shape {a.shape}, expected (ny, nx) = {(len(y), len(x))}")
                a = a.T
            elif a.shape != shape:
                raise LandscapeError(f"{src}: {key} has shape {a.shape}, expected {shape}")
            surfaces[ours] = a / 100.0 if key.endswith("_acc") else a
    if "loss" not in surfaces:
        raise LandscapeError(f"{src} has no train_loss surface", hint="is it a loss-landscape surface file?")
    done = surfaces["loss"] != -1.0  # that code fills points it has not computed with -1
    for a in surfaces.values():
        a[~done] = np.nan
    with RunFile(run_file, mode="overwrite" if overwrite else "create") as rf:
        with rf.transaction() as out:
            out.attrs["tool"] = "landscape"
            out.attrs["imported_from"] = str(src.resolve())
            out.attrs["source_format"] = "loss-landscape surface file ([y, x] order, accuracy in percent)"
            g = out.create_group(f"slices/{name}")
            g.create_dataset("x", data=x)
            if y is not None:
                g.create_dataset("y", data=y)
            for k, a in surfaces.items():
                g.create_dataset(k, data=a)
            g.create_dataset("done", data=done)
            for k, v in {"kind": "imported", "dims": len(shape),
                         "n_nonfinite": int((~np.isfinite(surfaces["loss"][done])).sum())}.items():
                g.attrs[k] = encode_attr(v)
    return Path(run_file)
