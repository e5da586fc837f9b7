"""`landscape coherence` and the coherence part of `landscape scan`: run-file layout, control, errors."""

import json

import h5py
import numpy as np

from conftest import EXAMPLES, cli


def test_coherence_command_layout_control_and_reuse(tmp_path):
    out = tmp_path / "run.h5"
    ck = str(EXAMPLES / "mlp_sgd_s0000.pt")
    base = ["coherence", ck, "--max-samples", "300", "-o", str(out), "--noise-samples", "8", "--batch-sizes", "4,32"]
    r = cli(*base, "--control", "shuffled-labels", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["coherence"]
    with h5py.File(out) as f:
        g = f["coherence"]
        for k in ("m", "m_coherence", "alpha", "gradient_diversity", "b_simple", "b_noise", "gsnr_mean",
                  "gsnr_median"):
            assert k in g.attrs and k in g["control"].attrs, k
        assert g.attrs["m"] == 300 and g.attrs["m_coherence"] == summary["m_coherence"]
        assert g["class_cosine"].shape == (10, 10) and g["grand"].shape == g["el2n"].shape == (300,)
        assert np.array_equal(g["sample_index"][()], f["data/subset_index"][()])
        assert g["batch_sizes"][()].tolist() == [4, 32]
        assert set(g["gsnr"]) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "net.5.weight",
                                  "net.5.bias"}
        assert g["gsnr/net.1.weight"].shape == (64, 64)
        assert g.attrs["m_coherence"] > g["control"].attrs["m_coherence"]  # real labels, at initialization
        seconds = g.attrs["seconds"]
    text = cli(*base, "--control", "shuffled-labels", "--per-class")
    assert text.returncode == 0 and "shuffled labels" in text.stdout and "stiffness" in text.stdout
    with h5py.File(out) as f:
        assert f["coherence"].attrs["seconds"] == seconds  # same settings: reused
    sk = cli(*base, "--sketch", "64", "--json")
    assert sk.returncode == 0, sk.stderr
    with h5py.File(out) as f:
        assert f["coherence"].attrs["method"] == "sketch" and "control" not in f["coherence"]
        assert f["coherence"].attrs["sketch_rel_error"] == np.sqrt(2 / 64)
    bad = cli(*base, "--control", "random")
    assert bad.returncode == 2 and "shuffled-labels" in bad.stderr and "Traceback" not in bad.stderr


def test_scan_includes_coherence(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    r = cli("scan", str(mlp_ckpt), "--max-samples", "128", "--steps", "3", "--no-hessian", "--no-sharpness", "--no-report",
            "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["coherence"]["method"] == "vmap"
    with h5py.File(out) as f:
        assert f["coherence"].attrs["noise_samples"] == 16 and "b_noise" in f["coherence"].attrs
