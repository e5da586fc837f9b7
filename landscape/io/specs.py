"""Specs: how a user names a model, a data set or a loss.

A spec is ``module.path:callable`` (an importable module) or ``path/to/file.py:callable``
(a file, imported under a private name). Arguments come as ``key=value`` strings whose
values are Python literals (``width=128``, ``dims=(3, 32)``, ``name='x'``); a value that is
not a literal is kept as a string.

Specs written by :func:`landscape.save_checkpoint` travel inside a checkpoint. Because a
checkpoint may come from anyone, a spec read from a checkpoint is resolved with
``from_checkpoint=True``: it must name an importable module (never a file) and either an
``nn.Module`` subclass or a callable from ``landscape``'s own packages. Anything else has to
be passed by the user on the command line, where it is the user's own choice to run it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import LandscapeError

#: Packages whose callables a checkpoint's manifest may name without the user confirming.
TRUSTED_PACKAGES = ("landscape", "landscape_data")


@dataclass(frozen=True)
class Spec:
    """A named callable plus keyword arguments, e.g. ``Spec("pkg.models:resnet20", {"width": 2})``."""

    target: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "args": dict(self.args)}

    @classmethod
    def from_json(cls, obj: Any) -> "Spec":
        if isinstance(obj, str):
            return cls(obj, {})
        if isinstance(obj, Mapping) and isinstance(obj.get("target"), str):
            return cls(obj["target"], dict(obj.get("args") or {}))
        raise LandscapeError(f"malformed spec {obj!r}", hint="expected 'module:callable' with optional args")


def parse_kv(items: list[str] | tuple[str, ...] | None, what: str = "--model-arg") -> dict[str, Any]:
    """Parse ``key=value`` strings; values are Python literals when they parse as one.

    >>> parse_kv(["width=128", "act=relu", "dims=(3, 4)"])
    {'width': 128, 'act': 'relu', 'dims': (3, 4)}
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise LandscapeError(f"{what} {item!r} is not of the form key=value", hint=f"e.g. {what} width=128")
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    return out


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_landscape_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LandscapeError(f"cannot import {path}", hint="give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def _is_file(mod_name: str) -> bool:
    return mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name


def _import_folder(mod_name: str, from_checkpoint: bool) -> Path | None:
    """The folder put first on ``sys.path`` for a spec: a file's own folder (it sees the modules beside it), the
    current directory for a module name (not for a spec read from a checkpoint)."""
    if _is_file(mod_name):
        return Path(mod_name).resolve().parent
    return None if from_checkpoint else Path.cwd()


def resolve(target: str, *, what: str, from_checkpoint: bool = False) -> Callable[..., Any]:
    """Return the callable that ``target`` (``module:attr`` or ``file.py:attr``) names."""
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise LandscapeError(
            f"{what} spec {target!r} is not of the form module:callable",
            hint="e.g. mypkg.models:resnet20 or path/to/models.py:resnet20",
        )
    is_file = _is_file(mod_name)
    if is_file and from_checkpoint:
        raise LandscapeError(
            f"the checkpoint names {what} {target!r}, a file path, which is not imported from a checkpoint",
            hint=f"pass --{what} {target} yourself if you trust that file",
        )
    if is_file and not Path(mod_name).is_file():
        raise LandscapeError(f"{what} file {mod_name} does not exist", hint="check the path before ':'")
    try:
        with _on_path(_import_folder(mod_name, from_checkpoint)):
            module = _import_file(Path(mod_name)) if is_file else importlib.import_module(mod_name)
    except LandscapeError:
        raise
    except ModuleNotFoundError as err:
        if not is_file and err.name and mod_name.startswith(err.name):
            raise LandscapeError(
                f"cannot import {mod_name!r} for {what} spec {target!r} ({err})",
                hint="is the package installed (or run from its folder), or should it be a path like "
                     "dir/file.py:callable?") from err
        raise user_error(err, f"importing {what} spec {target!r}") from err
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001 - whatever the user's module raises on import (sys.exit too)
        raise user_error(err, f"importing {what} spec {target!r}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LandscapeError(f"{mod_name!r} has no attribute {attr!r}", hint=f"check the {what} spec {target!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LandscapeError(f"{what} spec {target!r} names something that is not callable")
    if from_checkpoint and not _trusted_from_checkpoint(obj, mod_name):
        raise LandscapeError(
            f"the checkpoint names {what} {target!r}, which is not an nn.Module class; "
            "callables named inside a checkpoint are not run automatically",
            hint=f"pass --{what} {target} yourself if you trust it",
        )
    return obj


def _trusted_from_checkpoint(obj: Any, mod_name: str) -> bool:
    if mod_name.split(".")[0] in TRUSTED_PACKAGES:
        return True
    if inspect.isclass(obj):
        return issubclass(obj, (torch.nn.Module, torch.utils.data.Dataset))
    return False


def user_error(err: BaseException, doing: str) -> LandscapeError:
    """A one-line error for an exception raised by the user's code (or its environment) while ``doing``: the
    original type and message, blamed on the spec, not on landscape."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return LandscapeError(f"{doing} raised {type(err).__name__}" + (f": {msg}" if msg else ""),
                          hint="the error comes from that code or its environment; --debug shows the traceback")


@contextmanager
def _on_path(folder: Path | None) -> Iterator[None]:
    """``folder`` (if any) first on ``sys.path`` while the user's module is imported and called."""
    entry = str(folder)
    added = folder is not None and entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def call_spec(spec: Spec, *, what: str, from_checkpoint: bool = False) -> Any:
    """Resolve ``spec`` and call it with its arguments; any error the call raises is reported as an error in
    that spec (type and message), never as a landscape bug."""
    fn = resolve(spec.target, what=what, from_checkpoint=from_checkpoint)
    mod_name = spec.target.rpartition(":")[0]
    try:
        with _on_path(_import_folder(mod_name, from_checkpoint)):
            return fn(**dict(spec.args))
    except LandscapeError:
        raise
    except TypeError as err:
        raise LandscapeError(
            f"calling {what} {spec.target} with {dict(spec.args)} failed: {err}",
            hint=f"check --{what}-arg values",
        ) from err
    except Exception as err:  # the user's factory, not landscape
        raise user_error(err, f"calling {what} spec {spec.target!r}") from err
