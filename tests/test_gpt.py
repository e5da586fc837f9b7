"""A GPT-style transformer language model (tests/tinygpt.py), built from a config and briefly trained here, scanned
end to end from a plain state_dict with a custom next-token loss: slices, Hessian, sharpness, coherence, report."""

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from conftest import cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tinygpt  # noqa: E402

SPECS = ["--model", f"{HERE / 'tinygpt.py'}:TinyGPT", "--data", f"{HERE / 'tinygpt.py'}:tokens",
         "--data-arg", "n=64", "--loss", f"{HERE / 'tinygpt.py'}:next_token_loss"]


def trained(tmp_path, steps=40):
    torch.manual_seed(0)
    model = tinygpt.TinyGPT()
    X, y = tinygpt.tokens(n=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = tinygpt.next_token_loss(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "gpt.pt"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        return model, path, float(tinygpt.next_token_loss(model(X), y))


def test_transformer_lm_scanned_end_to_end(tmp_path):
    model, ckpt, loss = trained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "run"
    res = cli("scan", str(ckpt), *SPECS, "--steps", "5", "--range", "0.5", "-o", str(out), "--json",
              timeout=900)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["n_parameters"] == sum(p.numel() for p in model.parameters())
    with h5py.File(out / "run.h5") as f:
        s = f["slices/random_2d"]
        assert s["done"][()].all() and np.isfinite(s["loss"][()]).all()
        assert "accuracy" not in s  # (n, T) token targets are not one label per sample
        np.testing.assert_allclose(s["loss"][2, 2], loss, rtol=1e-5)  # the origin is the checkpoint
        ev = f["hessian/eigenvalues"][()]
        assert np.all(np.isfinite(ev)) and ev[0] > 0 and np.all(np.diff(ev) <= 1e-9)
        assert np.isfinite(f["hessian/trace"].attrs["estimate"])
        assert f["coherence/grand"].shape == (64,) and np.all(f["coherence/grand"][()] > 0)
        el2n = f["coherence/el2n"][()]  # over the 12 tokens of each sequence: at most sqrt(2 * 12)
        assert el2n.shape == (64,) and np.all((el2n > 0) & (el2n <= np.sqrt(24) + 1e-9))
        assert 0 < f["coherence"].attrs["m_coherence"] <= 64
        assert len(f["sharpness"]) >= 5
    assert (out / "index.html").exists()
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k


def test_transformer_el2n_matches_a_direct_computation(tmp_path):
    from landscape.analyses.coherence import el2n
    from landscape.problem import Problem

    model, _, _ = trained(tmp_path, steps=5)
    X, y = tinygpt.tokens(n=16)
    pb = Problem(model, X, y, tinygpt.next_token_loss)
    with torch.no_grad():
        p = torch.softmax(model(X).double(), dim=-1)
    direct = (p - torch.nn.functional.one_hot(y, p.shape[-1]).double()).flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(el2n(pb, pb.X, pb.y), direct, rtol=1e-12)
