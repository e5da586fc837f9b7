"""The scan pipeline through the library: model untouched, extra metrics, BatchNorm example, subsets."""

import h5py
import numpy as np
import pytest
import torch

from landscape import LandscapeError
from landscape.analyses.scan import ScanConfig, run_scan, setup


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
    good = ScanConfig(str(mlp_ckpt), steps=(3,), max_samples=32, output=out, workers=1)
    st = setup(good)
    before = state(st.model)
    calls = {"n": 0}
    real = st.problem.evaluate_blocks

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("device lost")
        return real(*a, **k)

    st.problem.max_block = 1  # one point per block, so the failure comes after four journaled points
    st.problem.evaluate_blocks = flaky
    with pytest.raises(RuntimeError, match="device lost"):
        run_scan(good, prepared=st)
    assert unchanged(before, st.model)
    st.problem.evaluate_blocks = real
    summary = run_scan(ScanConfig(**{**good.__dict__, "resume": True}), prepared=st)
    assert summary.slices[0].computed == 9 - 4  # the four points done before the failure were kept
    with h5py.File(out) as f:
        assert f["slices/random_2d/done"][()].all() and np.isfinite(f["slices/random_2d/loss"][()]).all()


def test_hessian_direction_slice_curvature_is_lambda_max(tmp_path, mlp_ckpt):
    """Along the top unit eigenvector v, f(a) = L(theta + a v) has f''(0) = v^T H v = lambda_max.

    The step is tiny because a ReLU net's loss is only piecewise smooth: wider steps cross activation kinks,
    whose slope changes the Hessian at theta0 does not contain.
    """
    h = 1e-5
    cfg = ScanConfig(str(mlp_ckpt), dims=1, steps=(5,), range=(-2 * h, 2 * h), directions="hessian", dtype="float64",
                     max_samples=300, output=str(tmp_path / "run.h5"), curvature=None)
    summary = run_scan(cfg)
    with h5py.File(summary.run_file) as f:
        g = f["slices/hessian_1d"]
        loss, x = g["loss"][()], g["x"][()]
        d = {n: torch.from_numpy(g["directions/0"][n][()]) for n in g["directions/0"]}
        assert g.attrs["kind"] == "hessian"
    assert sum(float((t ** 2).sum()) for t in d.values()) == pytest.approx(1.0, rel=1e-9)
    st = setup(cfg)
    from landscape.problem.curvature import CurvatureOperator
    from landscape.linalg.lanczos import lanczos

    op = CurvatureOperator(st.problem)
    lam = lanczos(op, op.n, k=1).eigenvalues[0]
    second = (loss[3] - 2 * loss[2] + loss[1]) / (x[3] - x[2]) ** 2
    assert second == pytest.approx(lam, rel=1e-3)


def test_the_hessian_phase_eigenvectors_are_freed_before_sharpness_runs(tmp_path, mlp_ckpt, monkeypatch):
    """After the Hessian phase its eigenvectors (k parameter-length float64 vectors) are in the file if kept and
    nowhere else: the phases after it do not carry them (447 MB on ResNet-18)."""
    import gc
    import weakref

    import landscape.analyses.scan as scan
    from landscape.analyses.hessian import CurvatureSettings
    from landscape.analyses.sharpness import SharpnessSettings

    seen = {}
    analyze, sharpness = scan.analyze_curvature, scan._run_sharpness

    def spy_curvature(*args, **kw):
        res = analyze(*args, **kw)
        seen["eigenvectors"] = weakref.ref(res.top.eigenvectors)
        return res

    def spy_sharpness(*args, **kw):
        gc.collect()
        seen["alive"] = seen["eigenvectors"]() is not None
        return sharpness(*args, **kw)

    monkeypatch.setattr(scan, "analyze_curvature", spy_curvature)
    monkeypatch.setattr(scan, "_run_sharpness", spy_sharpness)
    cfg = ScanConfig(str(mlp_ckpt), steps=(3,), max_samples=64, output=str(tmp_path / "run.h5"),
                     curvature=CurvatureSettings(top_k=2, trace=False),
                     sharpness=(SharpnessSettings(measure="sam"),))
    run_scan(cfg)
    assert seen["alive"] is False
