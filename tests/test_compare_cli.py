"""`landscape compare`: the comparison file's layout, reuse of finished analyses, the report, bad input."""

import json

import h5py
import numpy as np

from conftest import EXAMPLES, cli

COMMON = ["--max-samples", "200", "--steps", "5", "--no-sharpness", "--no-coherence", "--alpha-steps", "11"]


def test_compare_three_optimizers(tmp_path):
    cks = [str(EXAMPLES / f"mlp_{o}_s2000.pt") for o in ("sgd", "adam", "sam")]
    r = cli("compare", *cks, *COMMON, "--align", "--curve", "bezier", "--bezier-steps", "30", "-o", str(tmp_path),
            "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["models"] == ["mlp_sgd_s2000", "mlp_adam_s2000", "mlp_sam_s2000"]
    assert set(out["pairs"]) == {"0_1", "0_2", "1_2"}
    with h5py.File(tmp_path / "compare.h5") as f:
        c = f["compare"]
        assert [s.decode() for s in c["models/name"][()]] == out["models"]
        assert len(c["models/checkpoint_sha256"][()]) == 3
        for k in ("loss", "accuracy", "lambda_max", "trace"):
            assert c[f"metrics/{k}/value"].shape == c[f"metrics/{k}/stderr"].shape == c[f"metrics/{k}/rank"].shape == (3,)
        v, rank = c["metrics/trace/value"][()], c["metrics/trace/rank"][()]
        assert rank[np.argmin(v)] == 1 and rank[np.argmax(v)] == 3
        assert c["metrics/trace"].attrs["order"] == "lower first" and c["metrics/accuracy"].attrs["order"] == \
            "higher first"
        a, ra = c["metrics/accuracy/value"][()], c["metrics/accuracy/rank"][()]
        assert ra[np.argmax(a)] == 1 and ra[np.argmin(a)] == max(ra)
        g = c["interpolation/0_1"]
        alpha, loss = g["alpha"][()], g["loss"][()]
        assert alpha[0] == -0.5 and alpha[-1] == 1.5 and 0.0 in alpha and 1.0 in alpha
        inside = (alpha >= 0) & (alpha <= 1)
        line = (1 - alpha) * loss[alpha == 0] + alpha * loss[alpha == 1]
        assert g.attrs["loss_barrier"] == np.max((loss - line)[inside])  # the barrier's definition
        assert g.attrs["aligned"] and "loss_barrier_unaligned" in g.attrs and "unaligned" in g
        assert g["accuracy"].shape == alpha.shape and np.isfinite(g.attrs["error_barrier"])
        assert f["compare/bezier/0_1/loss"].shape == (51,) and f["compare/bezier/0_1"].attrs["max_loss"] > 0
        assert c["slices/1/loss"].shape == (5, 5)
    assert (tmp_path / "mlp_adam_s2000" / "run.h5").exists()  # each model's own analysis
    assert out["report"] == str(tmp_path / "index.html")
    assert {p.stem for p in (tmp_path / "figures").iterdir()} == {"compare_slices", "compare_metrics",
                                                                 "compare_interpolation"}
    page = (tmp_path / "index.html").read_text()
    assert 'id="comparison"' in page and "mlp_sam_s2000" in page
    # finished analyses and pairs are reused: a second call with the same settings recomputes nothing
    stamp = (tmp_path / "mlp_sgd_s2000" / "run.h5").stat().st_mtime_ns
    again = cli("compare", *cks, *COMMON, "--align", "--curve", "bezier", "--bezier-steps", "30", "-o",
                str(tmp_path), "--json", "--no-report")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["pairs"] == out["pairs"]
    assert (tmp_path / "mlp_sgd_s2000" / "run.h5").stat().st_mtime_ns == stamp


def test_compare_cnn_with_batchnorm_and_bad_input(tmp_path):
    cks = [str(EXAMPLES / f"cnn_{o}_s2000.pt") for o in ("sgd", "adam")]
    r = cli("compare", *cks, *COMMON, "--no-hessian", "--align", "-o", str(tmp_path), "--json", "--no-report")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "compare.h5") as f:
        assert f["compare/interpolation/0_1"].attrs["bn"] == "recompute"  # re-estimated along the path
    one = cli("compare", cks[0], "-o", str(tmp_path / "x"))
    assert one.returncode == 2 and "at least two" in one.stderr and "Traceback" not in one.stderr
    mixed = cli("compare", cks[0], str(EXAMPLES / "mlp_sgd_s2000.pt"), *COMMON, "--no-hessian", "--align",
                "-o", str(tmp_path / "y"))
    assert mixed.returncode == 2 and mixed.stderr.startswith("error: ")


def test_each_metric_knows_which_way_is_flatter():
    """A wider basin and more coherent gradients rank first when larger; PAC-Bayes (1 / sigma'^2), sharpness and
    curvature when smaller; ties share a rank and NaN ranks last."""
    from landscape.analyses.compare import _rank, higher_first

    assert [higher_first(k) for k in ("sharpness_basin_width_l2", "m_coherence", "accuracy")] == [True] * 3
    assert not any(higher_first(k) for k in ("sharpness_pacbayes_adaptive_l2", "sharpness_worst_case_adaptive_l2", "lambda_max",
                                                "loss"))
    assert _rank(np.array([2.0, 5.0, np.nan, 5.0]), True).tolist() == [3, 1, 4, 1]
    assert _rank(np.array([2.0, 5.0, np.nan, 5.0]), False).tolist() == [1, 2, 4, 2]
