"""landscape: look inside trained PyTorch checkpoints.

The library never prints; the command line (``landscape_cli``) is a thin front end over it.
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, apply_state_dict, load_checkpoint, save_checkpoint  # noqa: E402
from .errors import LandscapeError  # noqa: E402
from .problem import Evaluation, Problem  # noqa: E402

__all__ = [
    "Checkpoint", "Evaluation", "LandscapeError", "Monitor", "Problem",
    "apply_state_dict", "load_checkpoint", "save_checkpoint", "__version__",
]


def __getattr__(name: str) -> object:
    """``landscape.Monitor`` (:mod:`landscape.monitor`), imported when first asked for."""
    if name == "Monitor":
        from .monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")
