"""landscape: look inside trained PyTorch checkpoints.

The library never prints; the command line (``landscape_cli``) is a thin front end over it. Its folders are the
stages of the data path, each importing only those before it (``docs/architecture.md``):
:mod:`landscape.runtime` → :mod:`landscape.linalg` → :mod:`landscape.io` → :mod:`landscape.problem` →
:mod:`landscape.analyses` → :mod:`landscape.report`.

The flat module paths of earlier releases (``landscape.lanczos``, ``landscape.scan``, ...) still import: each is
the same module object as its new home (``landscape.linalg.lanczos``, ``landscape.analyses.scan``, ...).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

__version__ = "0.1.0"

#: the stage folder of every module that once sat directly in ``landscape/``
FOLDERS = {
    "runtime": ("allocator", "blas", "budget", "distributed"),
    "linalg": ("ascent", "density", "draws", "lanczos", "trace", "vectors"),
    "io": ("checkpoint", "data", "hf", "importers", "runfile", "specs", "stream"),
    "problem": ("curvature", "inputlayer", "losses", "outputlayer", "outputs", "persample", "replica"),
    "analyses": ("batchsize", "callbacks", "coherence", "compare", "connectivity", "costs", "directions", "hessian",
                 "matching", "monitor", "reference", "scan", "sharpness", "slices", "trajectory", "validity"),
}
MOVED = {f"{__name__}.{m}": f"{__name__}.{folder}.{m}" for folder, mods in FOLDERS.items() for m in mods}


class _FlatPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``landscape.<module>`` as the module at its folder's path (the same object, not a copy)."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> "importlib.machinery.ModuleSpec | None":
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: "importlib.machinery.ModuleSpec") -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran when imported at its own path."""


if not any(isinstance(f, _FlatPaths) for f in sys.meta_path):
    sys.meta_path.append(_FlatPaths())

from .errors import LandscapeError  # noqa: E402
from .io.checkpoint import Checkpoint, apply_state_dict, load_checkpoint, save_checkpoint  # noqa: E402
from .problem import Evaluation, Problem  # noqa: E402

__all__ = [
    "Checkpoint", "Evaluation", "LandscapeError", "Monitor", "Problem",
    "apply_state_dict", "load_checkpoint", "save_checkpoint", "__version__",
]


def __getattr__(name: str) -> object:
    """``landscape.Monitor`` (:mod:`landscape.analyses.monitor`) and the flat module paths (``landscape.scan``),
    imported when first asked for."""
    if name == "Monitor":
        from .analyses.monitor import Monitor

        return Monitor
    if f"{__name__}.{name}" in MOVED:
        return importlib.import_module(MOVED[f"{__name__}.{name}"])
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")
