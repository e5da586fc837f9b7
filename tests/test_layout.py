"""The library's folders are the stages of the data path, and each imports only the stages below it
(docs/architecture.md); the flat module paths of earlier releases still import, as the same module objects."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import landscape

ROOT = Path(landscape.__file__).parent
#: bottom to top; a module may import its own stage and those before it
STAGES = ("errors", "runtime", "linalg", "io", "problem", "analyses", "report")


def _stage(module: str) -> str:
    """``landscape.linalg.trace`` -> ``linalg``; ``landscape.errors`` -> ``errors``."""
    parts = module.split(".")
    assert parts[0] == "landscape" and len(parts) > 1, module
    return parts[1]


def _imports(source: str, package: list[str]) -> list[tuple[int, str, list[str]]]:
    """Every ``landscape`` module ``source`` (a module of ``package``) imports, relative imports resolved, with the
    names taken from it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "landscape":
                found.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "landscape"]
    return found


LIBRARY = sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT or p.stem not in ("__init__", "__main__"))


def test_every_module_sits_in_a_stage() -> None:
    for path in LIBRARY:
        stage = path.relative_to(ROOT).parts[0].removesuffix(".py")
        assert stage in STAGES, f"{path.relative_to(ROOT)} is outside the stage folders {STAGES}"


def _violations(source: str, package: list[str], stage: str) -> list[str]:
    """What a module of ``package`` in ``stage`` imports against the layering rule."""
    wrong = []
    for line, module, names in _imports(source, package):
        if module == "landscape":  # the package root: only its version, never a name that reaches back up
            if names != ["__version__"]:
                wrong.append(f"line {line} imports {names} from the package root")
        elif f"landscape.{module.split('.')[1]}" in landscape.MOVED:
            wrong.append(f"line {line} imports the flat path {module}; use its folder's path")
        elif STAGES.index(_stage(module)) > STAGES.index(stage):
            wrong.append(f"line {line} ({stage}) imports {module}, a later stage")
    return wrong


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_only_the_stages_below(path: Path) -> None:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    assert _violations(path.read_text(), list(rel.parts[:-1]), path.relative_to(ROOT).parts[0].removesuffix(".py")) \
        == []


def test_the_rule_catches_upward_and_flat_imports() -> None:
    """The check itself resolves relative imports and flags what it should (else the test above passes vacuously)."""
    pkg = ["landscape", "linalg"]
    assert _violations("from .lanczos import lanczos\nfrom ..runtime.blas import x\nfrom ..errors import E\n"
                       "from .. import __version__", pkg, "linalg") == []
    assert len(_violations("def f():\n    from ..analyses.scan import run_scan", pkg, "linalg")) == 1
    assert len(_violations("from ..problem import Problem", pkg, "linalg")) == 1
    assert len(_violations("import landscape.report", pkg, "linalg")) == 1
    assert len(_violations("from .. import Problem", pkg, "linalg")) == 1
    assert len(_violations("from ..lanczos import lanczos", pkg, "linalg")) == 1  # the flat alias


@pytest.mark.parametrize("flat, name", [
    ("landscape.lanczos", "lanczos"), ("landscape.trace", "hutchpp"), ("landscape.trace", "hutchinson"),
    ("landscape.density", "slq"), ("landscape.ascent", "apgd"), ("landscape.slices", "compute_slice"),
    ("landscape.curvature", "CurvatureOperator"), ("landscape.sharpness", "sharpness"),
    ("landscape.persample", "gradient_matrix"), ("landscape.persample", "iter_gradients"),
    ("landscape.scan", "run_scan"), ("landscape.callbacks", "lightning_callback"), ("landscape.hf", "from_config"),
    ("landscape.outputs", "tensor_outputs"), ("landscape.directions", "random_directions"),
])
def test_the_readmes_public_paths_still_import(flat: str, name: str) -> None:
    """The README's Python API names its modules by their flat paths: each is the module at its new home."""
    module = importlib.import_module(flat)
    assert module is importlib.import_module(landscape.MOVED[flat])
    assert module.__name__ == landscape.MOVED[flat]
    assert callable(getattr(module, name))
    assert getattr(landscape, flat.split(".")[1]) is module


def test_the_package_root_keeps_its_names() -> None:
    from landscape.io.checkpoint import load_checkpoint
    from landscape.problem.problem import Problem

    assert landscape.Problem is Problem and landscape.load_checkpoint is load_checkpoint
    assert landscape.Monitor.__module__ == "landscape.analyses.monitor"
    with pytest.raises(AttributeError):
        landscape.no_such_module  # noqa: B018


#: the size rule: a function's body (after its docstring) over this many lines, or a class over that many, needs a
#: reason in its docstring, a paragraph starting "Length:"
FUNCTION_LINES, CLASS_LINES = 60, 250


def _too_long(source: str) -> list[str]:
    """The functions and classes of ``source`` over the size rule without a ``Length:`` reason in their docstring."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        doc = ast.get_docstring(node) or ""
        body = node.body[1:] if doc and len(node.body) > 1 else node.body
        lines = body[-1].end_lineno - body[0].lineno + 1
        limit = CLASS_LINES if isinstance(node, ast.ClassDef) else FUNCTION_LINES
        if lines > limit and "Length:" not in doc:
            found.append(f"{node.name} (line {node.lineno}): {lines} lines")
    return found


CODE = LIBRARY + sorted((ROOT.parent / "cli").rglob("*.py"))


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_function_or_class_over_the_size_rule_without_a_reason(path: Path) -> None:
    assert _too_long(path.read_text()) == []


def test_the_size_rule_counts_bodies_and_reads_reasons() -> None:
    long_body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES + 1))
    assert _too_long(f"def f():\n    '''Short.'''\n{long_body}\n") == ["f (line 1): 61 lines"]
    assert _too_long(f"def f():\n    '''Short.\n\n    Length: one loop.'''\n{long_body}\n") == []
    fits = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES))
    assert _too_long(f"def f(\n    a,\n    b,\n):\n    '''A long docstring\n\n    over lines.'''\n{fits}\n") == []


def test_forward_mode_products_go_through_one_wrapper() -> None:
    """Forward AD gives a view's tangent the size of the view's base, and the Problem's parameters are views of one
    vector: a ``jvp`` over them held one parameter vector per tensor (2.8 GB on ResNet-18). ``products.forward_jvp``
    copies the views first; a ``jvp`` called anywhere else in the library would pay it again."""
    calls = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name != "forward_jvp":
                for node in ast.walk(fn):
                    name = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
                    if name == "jvp":
                        calls.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert calls == []
