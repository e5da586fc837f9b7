"""Issue 22, part 5: names a user's files carry (parameter names, the folder of the checkpoint and model file, a
``--model-arg`` in the spec, the slice name) made of markup, quotes, event attributes and a ``/``: the run file
keeps each name exactly, and the HTML report shows each as text in Chromium (no dialog, no script error, no element
a name opened)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch

from conftest import cli
from landscape.report.contents import RunContents

#: PyTorch allows any parameter name without a '.': markup, quotes, and a '/' that would open an HDF5 subgroup.
PARAMETERS = ("<img src=x onerror=alert(11)>", "w\"quote'd", "a/b")
FOLDER = "<svg onload=alert(13)>"
SPEC_ARG = "<script>alert(12)</script>"
SLICE = "<b onmouseover=alert(15)>s'\""

MODEL = f'''import torch
from torch import nn

NAMES = {PARAMETERS!r}


class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in zip(NAMES, ((8, 4), (8,), (3, 8))):
            self.register_parameter(name, nn.Parameter(torch.randn(*shape, generator=g) * 0.5))

    def forward(self, x):
        w1, b1, w2 = (getattr(self, n) for n in NAMES)
        return torch.tanh(x @ w1.T + b1) @ w2.T


def build(tag: str = "") -> nn.Module:
    return Hostile()
'''


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    """A scan (every default analysis), ``hessian --per-layer`` into the same file and its report, of a model whose
    parameters, folder, spec and slice have hostile names."""
    folder = tmp_path_factory.mktemp("hostile") / FOLDER
    folder.mkdir()
    (folder / "m.py").write_text(MODEL)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 4, generator=g)
    torch.save({"X": X, "y": (X[:, 0] > 0).long() + (X[:, 1] > 0).long()}, folder / "data.pt")
    ns: dict = {}
    exec(MODEL, ns)  # noqa: S102 (the test's own model source)
    torch.save(ns["build"]().state_dict(), folder / "ck.pt")
    spec = ("ck.pt", "--model", "m.py:build", "--model-arg", f"tag={SPEC_ARG}", "--data", "data.pt")
    for args in (("scan", *spec, "--steps", "5", "--name", SLICE, "--no-report", "-o", "run.h5"),
                 ("hessian", *spec, "--per-layer", "--top-k", "2", "-o", "run.h5"), ("report", "run.h5")):
        res = cli(*args, cwd=folder)
        assert res.returncode == 0, (args[0], res.stderr[-2000:])
    return folder


def test_the_run_file_keeps_every_name_exactly(hostile_run):
    run = RunContents.read(hostile_run / "run.h5")
    (hessian,) = [c for c in run.curvature if c.name == "hessian"]
    assert set(hessian.per_layer) == set(PARAMETERS)
    assert [s.name for s in run.slices] == [SLICE]
    with h5py.File(hostile_run / "run.h5") as f:
        assert json.loads(f.attrs["model_spec"])["args"] == {"tag": SPEC_ARG}
        assert FOLDER in f.attrs["checkpoint_path"]
        assert len(f["coherence/gsnr"]) == 3  # 'a/b' one dataset, not a subgroup


def test_hostile_names_show_as_text_in_a_browser(hostile_run, browser):
    page = hostile_run / "index.html"
    body = page.read_text()
    body = body[body.index("<body>"):]
    assert body.count("<script") == 3  # figure data, plotly.js and the loader: nothing a name opened
    browser.load(page)
    assert not browser.of("Page.javascriptDialogOpening")
    errors = browser.of("Runtime.exceptionThrown")
    errors += [e for e in browser.of("Log.entryAdded") if e["entry"]["level"] == "error"]
    assert not errors, errors
    assert browser.evaluate("document.querySelectorAll('img, b').length") == 0
    handlers = "[...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on')))"
    assert browser.evaluate(handlers + ".length") == 0  # no element carries an event-handler attribute
    text = browser.evaluate("document.body.innerText")
    for name in (*PARAMETERS, FOLDER, SPEC_ARG, SLICE):
        assert name in text, name
