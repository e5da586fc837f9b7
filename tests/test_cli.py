"""The command line end to end: the shipped example, JSON output, and one-line errors with exit code 2."""

import json
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import EXAMPLES, cli, relu_mlp
from landscape import load_checkpoint
from landscape.io.data import digits
from landscape_data.models import MLP


def assert_clean_error(res, *needles):
    assert res.returncode == 2, res.stderr + res.stdout
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr


def test_scan_example_and_inspect(tmp_path, mlp_ckpt):
    res = cli("scan", str(mlp_ckpt), "--steps", "7x5", "--json", "--strategy", "inplace", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    run = tmp_path / "reports" / "mlp_sgd_s2000" / "run.h5"  # the default location
    assert summary["run_file"] == os.path.join("reports", "mlp_sgd_s2000", "run.h5")
    net = MLP()
    net.load_state_dict(load_checkpoint(mlp_ckpt).state_dict)
    X, y = digits("train")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where --device auto computed (float32 differs by device)
    direct = F.cross_entropy(net.to(dev)(X.to(dev)), y.to(dev)).item()
    with h5py.File(run) as f:
        assert f.attrs["schema"] == "landscape/1"
        loss = f["slices/random_2d/loss"][()]
        assert loss.shape == (7, 5) and f["slices/random_2d/done"][()].all()
        assert loss[3, 2] == pytest.approx(direct, rel=1e-6)  # loss at the origin = a direct evaluation
        assert set(f["slices/random_2d/directions/0"]) == {n for n, _ in net.named_parameters()}
    assert summary["slices"][0]["loss_at_origin"] == pytest.approx(direct, rel=1e-6)
    assert summary["report"] == os.path.join("reports", "mlp_sgd_s2000", "index.html")  # drawn by default
    assert (run.parent / "index.html").stat().st_size > 10**6
    assert {p.stem for p in (run.parent / "figures").glob("*.png")} >= {"random_2d_contour", "hessian_eigenvalues",
                                                                       "sharpness", "coherence_scores"}
    info = json.loads(cli("inspect", str(run), "--json").stdout)
    assert info["attrs"]["checkpoint_sha256"] == load_checkpoint(mlp_ckpt).sha256
    assert info["attrs"]["optimizer"]["hyperparameters"]["lr"] == 0.1
    assert info["groups"]["slices/random_2d"]["attrs"]["norm"] == "filter"
    again = cli("scan", str(mlp_ckpt), "--steps", "7x5", cwd=tmp_path)
    assert_clean_error(again, "already exists", "--resume")


def test_dry_run_and_interpolation(tmp_path, cnn_ckpt):
    res = cli("scan", str(cnn_ckpt), "--dry-run", "--json", "--max-samples", "200", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert est["points"] == 51 * 51 and est["forward_passes"] == 51 * 51 and est["seconds"] > 0
    phases = est["phases"]  # the default scan computes all of them; each predicted from measured products
    assert set(phases) == {"startup", "slices", "hessian", "sharpness", "coherence"}
    assert all(p["seconds"] > 0 and p["peak_bytes"] > 0 for p in phases.values())
    assert est["total_seconds"] == pytest.approx(sum(p["seconds"] for p in phases.values()), rel=1e-12)
    assert est["memory_bytes"] == int(max(p["peak_bytes"] for p in phases.values()))
    assert est["seconds"] == phases["slices"]["seconds"] and est["curvature_seconds"] == phases["hessian"]["seconds"]
    bare = json.loads(cli("scan", str(cnn_ckpt), "--dry-run", "--json", "--max-samples", "200", "--no-hessian",
                          "--no-sharpness", "--no-coherence", cwd=tmp_path).stdout)
    assert set(bare["phases"]) == {"startup", "slices"}
    assert bare["curvature_seconds"] == bare["sharpness_seconds"] == bare["coherence_seconds"] == 0
    assert not (tmp_path / "reports").exists()
    other = EXAMPLES / "cnn_sgd_s2000.pt"
    out = tmp_path / "interp.h5"
    res = cli("scan", str(cnn_ckpt), "--dims", "1", "--steps", "5", "--interpolate", str(other),
              "--max-samples", "100", "-o", str(out), "--json", "--no-sharpness", "--no-coherence", "--no-report")
    assert res.returncode == 0, res.stderr
    with h5py.File(out) as f:
        x = f["slices/interpolation/x"][()]
        loss = f["slices/interpolation/loss"][()]
        assert x[0] == -0.5 and x[-1] == 1.5 and len(x) == 51 and np.isfinite(loss).all()
        assert f["slices/random_1d/loss"].shape == (5,)


def test_help_has_examples():
    for args in (("--help",), ("scan", "--help"), ("inspect", "--help"), ("report", "--help"), ("compare", "--help"),
                 ("trajectory", "--help")):
        res = cli(*args)
        assert res.returncode == 0 and "Examples" in res.stdout and "landscape " in res.stdout


def test_help_lists_the_commands_in_their_order():
    """Each command lives in a module of its own (cli/commands/); the main job comes first, the run-file tools last."""
    res = cli("--help")
    names = ["scan", "hessian", "sharpness", "coherence", "compare", "trajectory", "report", "inspect", "import-surface"]
    lines = res.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if " Commands " in ln)
    box = lines[start + 1:next(i for i in range(start + 1, len(lines)) if lines[i].startswith("╰"))]
    assert [ln.split()[1] for ln in box if ln.split()[1] in names] == names


def test_help_reads_like_a_man_page():
    """Flags show no value type, and a command's summary is one paragraph the terminal wraps, not the docstring's
    own line breaks."""
    res = cli("--help")
    assert res.returncode == 0 and "<bool>" not in res.stdout and "--version" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if " sharpness " in ln)
    assert "SAM/ASAM, Keskar, PAC-Bayes flatness" in line  # 200 columns: one line
    res = cli("scan", "--help")
    assert "<bool>" not in res.stdout and "--dry-run" in res.stdout


def test_bad_inputs_exit_2_with_one_line(tmp_path, mlp_ckpt):
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(mlp_ckpt.read_bytes()[:5000])
    assert_clean_error(cli("scan", str(trunc)), "corrupt or truncated")
    assert_clean_error(cli("scan", str(tmp_path / "nope.pt")), "does not exist")
    assert_clean_error(cli("scan", str(mlp_ckpt), "--model", "landscape_data.models:SmallCNN"), "does not fit the model")
    assert_clean_error(cli("scan", str(mlp_ckpt), "--model", "landscape_data.models:MLP", "--model-arg", "width=32"),
                       "shape mismatch: net.1.weight checkpoint (64, 64) vs model (32, 64)")
    bare = tmp_path / "bare.pt"
    torch.save(relu_mlp().state_dict(), bare)
    assert_clean_error(cli("scan", str(bare)), "--model")
    nan = tmp_path / "nan.pt"
    sd = relu_mlp().state_dict()
    sd["0.weight"][1, 2] = float("inf")
    torch.save(sd, nan)
    assert_clean_error(cli("scan", str(nan), "--model", str(tmp_path / "m.py") + ":f"), "does not exist")
    (tmp_path / "m.py").write_text("import torch\n"
                                   "def f():\n"
                                   "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),"
                                   " torch.nn.Linear(8, 3)).double()\n")
    assert_clean_error(cli("scan", str(nan), "--model", f"{tmp_path / 'm.py'}:f", "--data", "digits"), "NaN or Inf",
                       "0.weight")
    empty = tmp_path / "empty.npz"
    np.savez(empty, X=np.zeros((0, 4)), y=np.zeros((0,), dtype=np.int64))
    assert_clean_error(cli("scan", str(bare), "--model", f"{tmp_path / 'm.py'}:f", "--data", str(empty)), "no samples")
    assert_clean_error(cli("scan", str(bare), "--model", f"{tmp_path / 'm.py'}:f", "--data", "digits"),
                       "running the model on the data failed")
    res = cli("scan", str(trunc), "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_malicious_pickle_cli(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04\x95" + b"\x00" * 8 + f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())
    res = cli("scan", str(evil))
    assert_clean_error(res)
    assert not marker.exists()


def test_hessian_command_writes_the_run_file(tmp_path):
    from conftest import EXAMPLES

    out = tmp_path / "run.h5"
    ck = EXAMPLES / "mlp_adam_s2000.pt"
    assert cli("scan", str(ck), "--steps", "3", "--no-hessian", "-o", str(out)).returncode == 0
    res = cli("hessian", str(ck), "--dtype", "float64", "--max-samples", "200", "--top-k", "3", "--bottom-k", "2",
              "--density", "--density-steps", "20", "--per-layer", "--parameters", "net.3.*", "--json", "-o", str(out))
    assert res.returncode == 2 and "different data_sha256" in res.stderr  # a different subset than the scan's
    res = cli("hessian", str(ck), "--dtype", "float64", "--top-k", "3", "--bottom-k", "2", "--density",
              "--density-steps", "20", "--per-layer", "--parameters", "net.3.*", "--json", "-o", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)["curvature"]
    assert summary["n_parameters"] == 64 * 64 + 64 and all(summary["converged"])
    with h5py.File(out) as f:
        g = f["hessian"]
        ev = g["eigenvalues"][()]
        assert (np.diff(ev) <= 0).all() and g["converged"][()].all()
        assert g["bottom_eigenvalues"].shape == (2,) and g["trace"].attrs["stderr"] > 0
        assert set(g["per_layer"]) == {"net.3.weight", "net.3.bias"}
        assert g["density/values"].shape == g["density/grid"].shape
        assert set(g["eigenvectors/0"]) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "net.5.weight",
                                            "net.5.bias"}
        assert f["slices/random_2d/loss"].shape == (3, 3)  # the scan's slice is kept
    assert (tmp_path / "figures" / "hessian_density.png").exists()  # the scan's report was redrawn, not left stale


def test_hvp_engine_pinned(tmp_path, mlp_ckpt):
    """``--hvp`` picks the engine instead of timing them; the run file says which ran, and the engines agree. Under
    ``auto`` the file keeps the trial the choice was made from: the chosen engine is the fastest of the trial (the
    budget holds every engine's memory here)."""
    found = {}
    for mode in ("graph", "reverse-over-reverse", "auto"):
        out = tmp_path / f"{mode}.h5"
        res = cli("hessian", str(mlp_ckpt), "--hvp", mode, "--dtype", "float64", "--top-k", "2", "--no-trace",
                  "--max-samples", "128", "-o", str(out))
        assert res.returncode == 0, res.stderr
        with h5py.File(out) as f:
            attrs = f["hessian"].attrs
            trials = json.loads(attrs["hvp_trials"])
            if mode == "auto":
                assert set(trials) == {"graph", "forward-over-reverse", "reverse-over-reverse"}
                assert all(t["seconds"] > 0 and t["bytes"] >= 0 for t in trials.values())
                assert attrs["hvp_mode"] == min(trials, key=lambda e: trials[e]["seconds"])
            else:
                assert attrs["hvp_mode"] == mode and trials == {}
            found[mode] = f["hessian/eigenvalues"][()]
    np.testing.assert_allclose(found["graph"], found["reverse-over-reverse"], rtol=1e-9)
    np.testing.assert_allclose(found["auto"], found["graph"], rtol=1e-9)


def test_outputs_counts_and_labels_that_cannot_be(tmp_path, mlp_ckpt):
    """Issue 22's four: an output that cannot be written (a folder that is a file, a place that cannot hold a
    folder), a negative count, labels beyond the model's classes. Each is one line and exit 2, and the unwritable
    outputs are refused before the model loads; an earlier file in the way is left as it was."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert_clean_error(cli("scan", str(mlp_ckpt), "-o", str(notes)), "is a file, not a folder")
    assert notes.read_text() == "mine"
    assert_clean_error(cli("scan", str(mlp_ckpt), "-o", "/proc/forbidden/run.h5"), "cannot write the run file")
    assert_clean_error(cli("hessian", str(mlp_ckpt), "--top-k", "-1", "-o", str(tmp_path / "h.h5")),
                       "--top-k must be at least 0")
    assert_clean_error(cli("hessian", str(mlp_ckpt), "--trace-matvecs", "1", "-o", str(tmp_path / "h.h5")),
                       "--trace-matvecs must be at least 3")
    assert_clean_error(cli("hessian", str(mlp_ckpt), "--top-k", "0", "--trace-method", "lanczos-deflated", "-o",
                           str(tmp_path / "h.h5")), "deflates by the top eigenvectors")
    assert not (tmp_path / "h.h5").exists()
    bad = tmp_path / "labels.pt"
    torch.save({"X": torch.randn(20, 64), "y": torch.tensor([0, 1, 99] + [2] * 17)}, bad)
    assert_clean_error(cli("scan", str(mlp_ckpt), "--data", str(bad), "-o", str(tmp_path / "l.h5")),
                       "1 of 20 labels lie outside the model's 10 classes")


def test_hessian_commands_tolerance_is_the_analysis_default():
    """``landscape hessian``'s ``--tol`` and a scan's Hessian (``CurvatureSettings()``) stop Lanczos at the same
    residual: the CLI module keeps torch out of its imports, so the default is written twice and checked here."""
    import inspect

    from landscape_cli.commands.hessian import hessian
    from landscape.analyses.hessian import DEFAULT_TOL, CurvatureSettings

    assert inspect.signature(hessian).parameters["tol"].default.default == DEFAULT_TOL == CurvatureSettings().tol
