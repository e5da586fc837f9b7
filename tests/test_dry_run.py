"""The dry run of the analysis commands (``hessian``, ``sharpness``, ``coherence --dry-run``) and its count of the
curvature's products, extras included (``--per-class``, ``--batch-sizes``, ``--validity``, ``--per-layer``, ``--ggn``,
``--parameters``), against the products the run then makes."""

import json

import pytest

from conftest import EXAMPLES, cli
from landscape.analyses.costs import VectorCosts, curvature_seconds
from landscape.analyses.hessian import CurvatureSettings
from landscape.analyses.scan import LANCZOS_NOTE, ScanConfig, estimate, run_scan

MLP = str(EXAMPLES / "mlp_sgd_s2000.pt")


def _products(curvature):
    """Products a run's curvature summary says it made, its extras' included."""
    total = curvature["n_matvec"]
    for part in ("per_layer", "per_class"):
        total += sum(r["n_matvec"] for r in (curvature.get(part) or {}).values())
    return total + (curvature["batch_sizes"]["n_matvec"] if curvature.get("batch_sizes") else 0)


# Lanczos's products depend on the spectrum (the dry run counts a fit, RESULTS.md issue 19 session 26); capping them
# with max_hvp makes every count below exact, so that each extra's structure is checked: what runs, on what, how often.
CAPPED = dict(top_k=1, tol=1e-14, max_hvp=6, trace_matvecs=9)


@pytest.mark.parametrize("extra", [
    dict(density=True, density_steps=12),
    dict(per_class=True, density_steps=10),
    dict(batch_sizes=(8, 32), batch_draws=2),
    dict(validity=True, validity_random=1),
    dict(per_layer=True, parameters=("net.3.*", "net.5.weight")),
    dict(kind="ggn", bottom_k=1, parameters=("net.5.*",)),
], ids=["density", "per-class", "batch-sizes", "validity", "per-layer", "ggn-parameters"])
def test_dry_run_counts_the_products_the_run_makes(tmp_path, extra):
    settings = CurvatureSettings(**{**CAPPED, **extra})
    config = ScanConfig(checkpoint=MLP, slices=False, curvature=settings, sharpness=(), coherence=None,
                        max_samples=128, output=str(tmp_path / "run.h5"), device="cpu")
    est = estimate(config)
    assert set(est.phases) == {"startup", "hessian"} and est.points == 0
    summary = run_scan(config)
    assert est.phases["hessian"]["products"] == _products(summary.curvature)
    assert est.phases["hessian"]["seconds"] > 0 and est.phases["hessian"]["peak_bytes"] > est.phases["startup"][
        "peak_bytes"]


def test_curvature_seconds_prices_each_counted_product():
    """With free vector work, the seconds are the products at the product's time: nothing counted twice or left out."""
    free = VectorCosts(column=0.0, pass_column=0.0, first_column=0.0, block=0.0, signs=0.0)
    for s in (CurvatureSettings(), CurvatureSettings(bottom_k=2, trace_method="hutch++", density=True),
              CurvatureSettings(top_k=0, trace_method="hutchinson")):
        seconds, held, products = curvature_seconds(s, 10**6, 1e9, 0.25, free)
        assert seconds == pytest.approx(0.25 * products, rel=1e-12) and held > 0


def test_analysis_commands_dry_run(tmp_path):
    out = tmp_path / "run.h5"
    res = cli("hessian", MLP, "--per-class", "--dry-run", "--json", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert set(est["phases"]) == {"startup", "hessian"} and est["phases"]["hessian"]["products"] > 0
    assert est["total_seconds"] == pytest.approx(sum(p["seconds"] for p in est["phases"].values()), rel=1e-12)
    assert est["notes"] == [LANCZOS_NOTE]  # the spectrum sets Lanczos's count: the estimate says so
    res = cli("hessian", MLP, "--top-k", "0", "--dry-run", "--json", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["notes"] == []  # the trace alone: its probes are counted
    res = cli("hessian", MLP, "--engine", "pyhessian", "--dry-run", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr  # PyHessian's stopping rules cannot be counted: the table says so
    assert "hessian priced as Lanczos would run it" in " ".join(res.stdout.split())
    res = cli("sharpness", MLP, "--dry-run", "--json", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["phases"]) == {"startup", "sharpness"}
    res = cli("coherence", MLP, "--per-class", "--dry-run", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "coherence" in res.stdout and "estimated time, total" in res.stdout
    assert not out.exists()  # nothing computed, nothing written
    res = cli("hessian", MLP, "--batch-sizes", "500", "--dry-run", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 2 and "--batch-sizes 500 not below the 200 evaluation samples" in res.stderr


def test_a_resumed_dry_run_prices_only_what_is_left(tmp_path):
    """What the run keeps from its file (points done, in the file or its journal; analyses stored for the same
    settings) is not priced, and the points the dry run says are left are the points the resumed run computes."""
    import h5py

    from landscape.analyses.coherence import CoherenceSettings
    from landscape.analyses.sharpness import SharpnessSettings
    from landscape.errors import LandscapeError

    out = tmp_path / "run.h5"
    sharp = (SharpnessSettings(measure="sam", seed=0), SharpnessSettings(measure="average-case", draws=2, seed=0))
    config = ScanConfig(checkpoint=MLP, steps=(15,), curvature=CurvatureSettings(**CAPPED), sharpness=sharp,
                        coherence=CoherenceSettings(noise_samples=2), max_samples=128, output=str(out), device="cpu",
                        resume=True)
    fresh = estimate(config)
    assert fresh.points == 225 and fresh.points_stored == 0 and fresh.stored == ()
    assert set(fresh.phases) == {"startup", "slices", "hessian", "sharpness", "coherence"}
    run_scan(config)
    est = estimate(config)
    groups = tuple(f"sharpness/{s.resolved().group}" for s in sharp)
    assert est.points == 0 and est.points_stored == 225 and set(est.phases) == {"startup"}
    assert est.stored == ("hessian", *groups, "coherence")
    with h5py.File(out, "a") as f:  # as if killed: two blocks not merged, one of them in the journal; analyses lost
        g = f["slices/random_2d"]
        block = int(g.attrs["block"])
        assert 225 >= 3 * block  # the run computes whole blocks: at least three here
        mask = g["done"][()]
        mask.flat[block:3 * block] = False
        g["done"][...] = mask
        del f[groups[1]], f["coherence"]
    journal = out.with_name(out.name + ".journal")
    index = list(range(2 * block, 3 * block))
    journal.write_text(json.dumps({"slice": "random_2d", "index": index, "values": {"loss": [0.0] * block}}) + "\n")
    est = estimate(config)
    assert (est.points, est.points_stored) == (block, 225 - block) and est.stored == ("hessian", groups[0])
    assert set(est.phases) == {"startup", "slices", "sharpness", "coherence"}
    assert run_scan(config).slices[0].computed == est.points
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an HDF5 file")
    for bad in ({"resume": False}, {"max_samples": 100}, {"range": (-2.0, 2.0)}, {"output": str(corrupt)}):
        refused = ScanConfig(**{**config.__dict__, **bad})  # the run would be refused: so is its dry run, with the
        # run's message
        with pytest.raises(LandscapeError) as by_dry_run:
            estimate(refused)
        with pytest.raises(LandscapeError) as by_run:
            run_scan(refused)
        assert str(by_dry_run.value) == str(by_run.value)


def test_an_analysis_commands_dry_run_leaves_out_its_stored_result(tmp_path):
    out = str(tmp_path / "run.h5")
    args = ("hessian", MLP, "--top-k", "1", "--no-trace", "--max-samples", "128", "-o", out)
    assert cli(*args).returncode == 0
    res = cli(*args, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert set(est["phases"]) == {"startup"} and est["stored"] == ["hessian"]
    res = cli(*args, "--dry-run")
    assert "hessian: kept from the run file" in " ".join(res.stdout.split())
