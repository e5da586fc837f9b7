"""The dry run of the analysis commands (``hessian``, ``sharpness``, ``coherence --dry-run``) and its count of the
curvature's products, extras included (``--per-class``, ``--batch-sizes``, ``--validity``, ``--per-layer``, ``--ggn``,
``--parameters``), against the products the run then makes."""

import json

import pytest

from conftest import EXAMPLES, cli
from landscape.analyses.costs import VectorCosts, curvature_seconds
from landscape.analyses.hessian import CurvatureSettings
from landscape.analyses.scan import ScanConfig, estimate, run_scan

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
    res = cli("sharpness", MLP, "--dry-run", "--json", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)["phases"]) == {"startup", "sharpness"}
    res = cli("coherence", MLP, "--per-class", "--dry-run", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "coherence" in res.stdout and "estimated time, total" in res.stdout
    assert not out.exists()  # nothing computed, nothing written
    res = cli("hessian", MLP, "--batch-sizes", "500", "--dry-run", "--max-samples", "200", "-o", str(out))
    assert res.returncode == 2 and "--batch-sizes 500 not below the 200 evaluation samples" in res.stderr
