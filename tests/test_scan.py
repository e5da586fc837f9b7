"""The scan pipeline through the library: model untouched, extra metrics, BatchNorm example, subsets."""

import h5py
import numpy as np
import pytest
import torch

from landscape import LandscapeError
from landscape.scan import ScanConfig, run_scan, setup


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def unchanged(before, model):
    sd, mode = before
    return mode == model.training and all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def top5(output, target):
    return (output.topk(5, dim=1).indices == target[:, None]).any(1).double().mean()


def boom(output, target):
    raise RuntimeError("metric failed")


def test_scan_leaves_model_unchanged_and_stores_metrics(tmp_path, cnn_ckpt):
    cfg = ScanConfig(str(cnn_ckpt), steps=(3, 4), max_samples=64, output=str(tmp_path / "run.h5"),
                     metrics=(("top5", "test_scan:top5"),), bn="recompute", bn_batches=2)
    st = setup(cfg)
    st.model.train()  # whatever mode the model was in, it stays in
    before = state(st.model)
    summary = run_scan(cfg, prepared=st)
    assert unchanged(before, st.model)
    with h5py.File(summary.run_file) as f:
        top5_vals, acc = f["slices/random_2d/top5"][()], f["slices/random_2d/accuracy"][()]
        assert f["data/subset_index"].shape == (64,) and f.attrs["n_samples"] == 64
        assert f.attrs["bn"] == "recompute"
    assert top5_vals.shape == (3, 4) and (top5_vals >= acc - 1e-12).all()


def test_failing_scan_leaves_model_unchanged_and_resumable(tmp_path, mlp_ckpt):
    out = str(tmp_path / "run.h5")
    cfg = ScanConfig(str(mlp_ckpt), steps=(3,), max_samples=32, output=out, metrics=(("bad", "test_scan:boom"),))
    with pytest.raises(LandscapeError, match="running the model on the data failed"):
        setup(cfg)
    good = ScanConfig(str(mlp_ckpt), steps=(3,), max_samples=32, output=out)
    st = setup(good)
    before = state(st.model)
    calls = {"n": 0}
    real = st.problem.evaluate_points

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("device lost")
        return real(*a, **k)

    st.problem.max_block = 1  # one point per block, so the failure comes after four journaled points
    st.problem.evaluate_points = flaky
    with pytest.raises(RuntimeError, match="device lost"):
        run_scan(good, prepared=st)
    assert unchanged(before, st.model)
    st.problem.evaluate_points = real
    summary = run_scan(ScanConfig(**{**good.__dict__, "resume": True}), prepared=st)
    assert summary.slices[0].computed == 9 - 4  # the four points done before the failure were kept
    with h5py.File(out) as f:
        assert f["slices/random_2d/done"][()].all() and np.isfinite(f["slices/random_2d/loss"][()]).all()
