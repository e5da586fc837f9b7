"""Streamed inputs (evaluation sets larger than memory): read by chunks, same bits as in memory."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import blobs, cli

from landscape import Problem
from landscape.io.data import digits, load_data
from landscape.analyses.directions import random_directions
from landscape.io.specs import Spec
from landscape.io.stream import StreamedInputs, reordered, rows


class CountingRows:
    """A numpy array that records the rows of every read (as h5py would serve them)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list[int] = []

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(len(out))
        if isinstance(key, np.ndarray):
            assert np.all(np.diff(key) > 0), "indices handed to the source must increase (h5py's rule)"
        return out


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                               torch.nn.Linear(6, 3)).double()


@pytest.mark.parametrize("bn", ["frozen", "recompute"])
def test_streamed_problem_reads_by_chunks_and_equals_in_memory(bn):
    X, y = blobs(64, 4, 3)
    rows = np.sort(np.random.default_rng(0).choice(80, size=64, replace=False))  # a subset: scattered reads
    full = np.zeros((80, 4))
    full[rows] = X.numpy()
    source = CountingRows(full)
    net = _bn_net()
    mem = Problem(net, X, y, F.cross_entropy, batch_size=16, bn=bn, strategy="inplace", max_block=8)
    st = Problem(net, StreamedInputs(source, rows), y, F.cross_entropy, batch_size=16, bn=bn, strategy="inplace",
                 max_block=8)
    mem.block = st.block = 8
    dirs = [mem.as_list(d) for d in random_directions(mem.theta0, 2, seed=0)]
    coeffs = np.random.default_rng(1).uniform(-1, 1, size=(8, 2))
    source.reads.clear()
    a, b = mem.evaluate_points(coeffs, dirs), st.evaluate_points(coeffs, dirs)
    np.testing.assert_array_equal(a["loss"], b["loss"])
    np.testing.assert_array_equal(a["accuracy"], b["accuracy"])
    assert source.reads == [16, 16, 16, 16]  # each chunk read once for the block of 8 points, never the whole set
    v = {n: torch.randn_like(t) for n, t in mem.theta0.items()}
    for name, fn in (("gradient", lambda p: p.gradient()), ("hvp", lambda p: p.hvp(v)),
                     ("ggn", lambda p: p.ggn_vp(v))):
        ga, gb = fn(mem), fn(st)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=0, msg=name)
    assert max(source.reads) <= 16
    mb = np.array([3, 60, 7, 7, 20])  # a minibatch, unsorted and with a repeat, as sharpness draws them
    assert mem.loss(indices=torch.as_tensor(mb)) == st.loss(indices=torch.as_tensor(mb))


def _write_digits(path, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = digits("train")
    if fmt == "h5":
        with h5py.File(path, "w") as f:
            f["X"], f["y"] = X.numpy(), y.numpy()
    else:
        torch.save({"X": X, "y": y}, path)
    return X, y


@pytest.mark.parametrize("fmt", ["h5", "pt"])
def test_streamed_files_give_the_same_data_and_hash(tmp_path, fmt):
    path = tmp_path / f"digits.{fmt}"
    X, y = _write_digits(path, fmt)
    mem = load_data(str(path), max_samples=1000, seed=3)
    st = load_data(str(path), max_samples=1000, seed=3, stream="on")
    assert st.streamed and not mem.streamed
    assert st.sha256 == mem.sha256  # a run file made in memory resumes streamed, and back
    assert len(st) == 1000 and st.X.shape == mem.X.shape and st.X.dtype == mem.X.dtype
    torch.testing.assert_close(st.X[0:1000], mem.X, rtol=0, atol=0)
    torch.testing.assert_close(st.X[torch.tensor([999, 0, 5])], mem.X[[999, 0, 5]], rtol=0, atol=0)
    torch.testing.assert_close(st.y, mem.y, rtol=0, atol=0)


def test_auto_streams_only_what_would_not_fit(tmp_path, monkeypatch):
    import landscape.io.data as data

    path = tmp_path / "digits.h5"
    _write_digits(path, "h5")
    _write_digits(tmp_path / "digits.pt", "pt")
    for p in (path, tmp_path / "digits.pt"):  # opened lazily, found small, read from what was opened
        auto, off = load_data(str(p), stream="auto"), load_data(str(p), stream="off")
        assert not auto.streamed and auto.sha256 == off.sha256 and torch.equal(auto.X, off.X)
    monkeypatch.setattr(data, "_memory_bytes", lambda: 4 * 1437 * 64 * 4 - 4)  # inputs: just over a quarter
    assert load_data(str(path), stream="auto").streamed
    assert not load_data(str(path), stream="auto", max_samples=1000).streamed  # the subset fits


def test_streamed_dataset_callable(tmp_path):
    (tmp_path / "ds.py").write_text(
        "import torch\n"
        "class Squares(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 50\n"
        "    def __getitem__(self, i):\n"
        "        return torch.full((3,), float(i)), i % 4\n"
        "def make():\n"
        "    return Squares()\n")
    spec = Spec(f"{tmp_path / 'ds.py'}:make", {})
    mem, st = load_data(spec, max_samples=20), load_data(spec, max_samples=20, stream="on")
    assert st.streamed and st.sha256 == mem.sha256
    torch.testing.assert_close(st.X[0:20], mem.X, rtol=0, atol=0)
    torch.testing.assert_close(st.X[5:9], mem.X[5:9], rtol=0, atol=0)


def test_stream_nan_inputs_are_refused_like_in_memory(tmp_path):
    X, y = digits("train")
    X[700, 0, 3, 3] = float("nan")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["X"], f["y"] = X.numpy(), y.numpy()
    with pytest.raises(Exception, match="NaN or Inf inputs"):
        load_data(str(tmp_path / "bad.h5"), stream="on")


def test_scan_streamed_equals_in_memory(tmp_path, mlp_ckpt):
    path = tmp_path / "digits.h5"
    _write_digits(path, "h5")
    common = ["--data", str(path), "--max-samples", "900", "--batch-size", "256", "--steps", "5", "--strategy",
              "inplace", "--no-sharpness", "--no-report", "--dtype", "float64", "--json"]
    outs = {}
    for mode in ("off", "on"):
        r = cli("scan", str(mlp_ckpt), *common, "--stream", mode, "-o", str(tmp_path / mode / "run.h5"))
        assert r.returncode == 0, r.stderr
        outs[mode] = json.loads(r.stdout)
    with h5py.File(tmp_path / "off" / "run.h5") as a, h5py.File(tmp_path / "on" / "run.h5") as b:
        assert a.attrs["data_sha256"] == b.attrs["data_sha256"]
        assert not a.attrs["data_streamed"] and b.attrs["data_streamed"]
        np.testing.assert_array_equal(a["slices/random_2d/loss"][()], b["slices/random_2d/loss"][()])
        np.testing.assert_allclose(a["hessian/trace"].attrs["estimate"], b["hessian/trace"].attrs["estimate"], rtol=1e-10)
        np.testing.assert_allclose(a["hessian/eigenvalues"][()], b["hessian/eigenvalues"][()], rtol=1e-10)
        np.testing.assert_allclose(a["coherence/grand"][()], b["coherence/grand"][()], rtol=1e-12)
        assert a["coherence"].attrs["m_coherence"] == pytest.approx(b["coherence"].attrs["m_coherence"], rel=1e-10)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p / "d.npz", X=np.zeros((4, 2)), y=np.zeros(4)), "cannot be streamed"),
    (lambda p: (p / "dl.py").write_text(
        "import torch\ndef make():\n    ds = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4).long())\n"
        "    return torch.utils.data.DataLoader(ds, batch_size=2)\n"), "cannot be read by rows"),
])
def test_what_cannot_stream_is_a_one_line_error(tmp_path, mlp_ckpt, make, message):
    make(tmp_path)
    data = str(tmp_path / "d.npz") if (tmp_path / "d.npz").exists() else f"{tmp_path / 'dl.py'}:make"
    r = cli("scan", str(mlp_ckpt), "--data", data, "--stream", "on", "--dry-run")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_unknown_stream_mode_is_refused(mlp_ckpt):
    r = cli("scan", str(mlp_ckpt), "--stream", "sometimes", "--dry-run")
    assert r.returncode == 2 and "stream mode 'sometimes' is unknown" in r.stderr


def test_auto_reads_a_legacy_pt_file_whole(tmp_path):
    X, y = digits("test")
    torch.save({"X": X, "y": y}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)  # cannot be mapped
    data = load_data(str(tmp_path / "old.pt"), stream="auto")
    assert not data.streamed and torch.equal(data.X, X)
    with pytest.raises(Exception, match="cannot read data file"):
        load_data(str(tmp_path / "old.pt"), stream="on")


def test_reordered_rows_are_read_in_the_order_asked_with_increasing_indices_at_the_source():
    """Coherence visits the samples in its random batches' order: a slice of the reordered inputs reads its rows
    from the source in increasing order (h5py's rule), once each, and hands them back in the order asked."""
    data = np.arange(40, dtype=np.float32).reshape(20, 2)
    order = np.random.default_rng(0).permutation(20)
    src = CountingRows(data)
    subset = StreamedInputs(src, np.arange(2, 20, 2))  # a --max-samples subset of the source's rows
    inner = np.random.default_rng(1).permutation(9)
    for X, want in ((reordered(StreamedInputs(src), order), data[order]), (reordered(subset, inner), data[2::2][inner]),
                    (reordered(torch.from_numpy(data), order), data[order])):
        assert len(X) == len(want)
        for a in (0, 4, 7):
            np.testing.assert_array_equal(X[a:a + 5].numpy(), want[a:a + 5])
        np.testing.assert_array_equal(rows(X, 3, 8)[1:3].numpy(), want[4:6])
