"""One module per command. Importing them registers the commands on the app, in the order ``--help`` lists them:
keep it (the main job first, then the single analyses, the multi-checkpoint commands, the run-file tools)."""

from . import scan  # isort: skip
from . import hessian  # isort: skip
from . import sharpness  # isort: skip
from . import coherence  # isort: skip
from . import compare  # isort: skip
from . import trajectory  # isort: skip
from . import report  # isort: skip
from . import inspect  # isort: skip
from . import import_surface  # isort: skip

__all__ = ["scan", "hessian", "sharpness", "coherence", "compare", "trajectory", "report", "inspect", "import_surface"]
