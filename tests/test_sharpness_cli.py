"""`landscape sharpness` and the sharpness part of `landscape scan`: run-file layout, reuse, errors."""

import json

import h5py
import numpy as np

from conftest import cli


def test_sharpness_command_writes_groups_and_reuses_finished_ones(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    base = ["sharpness", str(mlp_ckpt), "--max-samples", "256", "-o", str(out), "--json"]
    r = cli(*base, "--measure", "worst-case", "--measure", "average-case", "--rho", "0.1", "--rho", "0.3",
            "--m", "64")
    assert r.returncode == 0, r.stderr
    summary = {s["group"]: s for s in json.loads(r.stdout)["sharpness"]}
    assert set(summary) == {"worst_case_adaptive_l2", "average_case_adaptive_l2"}
    with h5py.File(out) as f:
        g = f["sharpness/worst_case_adaptive_l2"]
        assert g["rho"][()].tolist() == [0.1, 0.3]
        assert g["value"].shape == g["stderr"].shape == (2,) and g["samples"].shape == (2, 4)
        np.testing.assert_allclose(g["value"][()], summary["worst_case_adaptive_l2"]["value"])
        assert g["value"][1] > g["value"][0] > 0  # a larger ball, a larger maximum
        attrs = dict(g.attrs)
        assert (attrs["measure"], attrs["norm"], bool(attrs["adaptive"]), attrs["m"], attrs["n_samples"],
                attrs["steps"], attrs["seed"]) == ("worst-case", "l2", True, 64, 256, 20, 0)
        seconds = attrs["seconds"]
    again = cli(*base, "--measure", "worst-case", "--rho", "0.1", "--rho", "0.3", "--m", "64")
    assert again.returncode == 0
    with h5py.File(out) as f:  # same settings: kept, not recomputed
        assert f["sharpness/worst_case_adaptive_l2"].attrs["seconds"] == seconds
    other = cli(*base, "--measure", "worst-case", "--rho", "0.2", "--m", "64")
    with h5py.File(out) as f:
        assert other.returncode == 0 and f["sharpness/worst_case_adaptive_l2/rho"][()].tolist() == [0.2]
        assert "average_case_adaptive_l2" in f["sharpness"]


def test_sharpness_bad_input_is_one_line(tmp_path, mlp_ckpt):
    base = ["sharpness", str(mlp_ckpt), "--max-samples", "64", "-o", str(tmp_path / "r.h5")]
    for extra, words in ((["--measure", "flatness"], "is unknown"), (["--measure", "sam", "--rho", "-1"], "positive"),
                         (["--rho", "0.1"], "--measure"), (["--measure", "sam", "--parameters", "nope*"],
                                                            "no parameter matches")):
        r = cli(*base, *extra)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)


def test_scan_runs_the_default_sharpness_set_with_slice_directions(tmp_path, mlp_ckpt):
    out = tmp_path / "run.h5"
    r = cli("scan", str(mlp_ckpt), "--max-samples", "256", "--steps", "5", "--no-hessian", "--no-report", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with h5py.File(out) as f:
        groups = set(f["sharpness"])
        assert groups == {"worst_case_adaptive_l2", "average_case_adaptive_l2", "sam_l2", "asam_adaptive_l2",
                          "pacbayes_adaptive_l2", "basin_width_l2"}
        bw = f["sharpness/basin_width_l2"]
        assert bw["distance"].shape == (1, 2, 2)  # one rho, the slice's two directions, both signs
        assert np.all(bw["distance"][()] > 0)
