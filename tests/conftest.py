"""Shared fixtures: small float64 models and data, the shipped example checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("LANDSCAPE_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "examples"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device; inside the README test's own run of the
    README's test command (tests/test_readme.py) those marked ``slow`` are too: the run around it has them."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if os.environ.get("LANDSCAPE_README_NESTED") == "1":
        skips["slow"] = pytest.mark.skip(reason="slow: the run around the README test has it")
    for item in items:
        for mark, skip in skips.items():
            if mark in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium (tests/cdp.py), skipped where none is installed unless LANDSCAPE_REQUIRE_BROWSER is set."""
    from cdp import Browser, find_browser

    path = find_browser()
    if path is None:
        reason = "no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("LANDSCAPE_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    b = Browser(path)
    yield b
    b.close()


@pytest.fixture
def mlp_ckpt() -> Path:
    return EXAMPLES / "mlp_sgd_s2000.pt"


@pytest.fixture
def cnn_ckpt() -> Path:
    return EXAMPLES / "cnn_adam_s2000.pt"


def relu_mlp(sizes=(4, 8, 3), seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).double()


def blobs(n: int = 40, d: int = 4, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, c, (n,), generator=g)


def flat_loss(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, loss=torch.nn.functional.cross_entropy):
    """The loss as a function of one flat parameter vector, and that vector: for dense autograd Hessians."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(vec: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            params[n] = vec[i:i + k].reshape(s)
            i += k
        return loss(torch.func.functional_call(model, params, (X,)), y)

    return f, theta


def import_from(folder: Path, name: str):
    """Module ``name`` from ``folder`` (a user's files a test wrote), with ``sys.path`` as it was after, and neither
    it nor a neighbour it imported left in ``sys.modules``: another test's file of the same name is read afresh."""
    import importlib

    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
        for added in set(sys.modules) - before:
            if Path(getattr(sys.modules[added], "__file__", None) or "/").parent == Path(folder):
                del sys.modules[added]


def cli(*args: str, cwd: Path | None = None, timeout: float = 300):
    """Run the installed ``landscape`` command line in a subprocess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "landscape", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})
