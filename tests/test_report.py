"""Reports: every figure drawn for what the run file holds, gaps never zeros, names escaped, the HTML
self-contained and rendered by a real browser without errors or network requests."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import EXAMPLES, cli
from landscape.analyses.coherence import CoherenceSettings
from landscape.errors import LandscapeError
from landscape.analyses.hessian import CurvatureSettings
from landscape.report import render_report
from landscape.report.contents import RunContents, summary_rows
from landscape.report.figures import curve_figure, surface_figure
from landscape.analyses.scan import ScanConfig, run_scan
from landscape.analyses.sharpness import SharpnessSettings

# Every static figure a run file holding every section gets (slice names from the scan below).
FULL_FIGURES = {
    "random_2d_contour", "random_2d_filled", "random_2d_surface", "random_2d_accuracy_filled", "interpolation_1d",
    "hessian_eigenvalues", "hessian_density", "ggn_eigenvalues", "hessian_pyhessian_eigenvalues", "trace",
    "sharpness", "coherence_class_cosine", "coherence_scores", "coherence_batch_cosine",
    "hessian_per_class_density", "hessian_batch_sizes",
}
HOSTILE = {  # names a checkpoint, a spec or a user could give; each must show as text
    "slice": "<img src=x onerror=alert(1)>",
    "metric": "<b onmouseover=alert(2)>cost$^",  # also a malformed mathtext for matplotlib
    "checkpoint": "/tmp/</script><script>alert(3)</script>.pt",
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run file with every section: 2D and 1D slices, Hessian (top, bottom, density, per layer, per class, batch
    sizes, validity radius), GGN, PyHessian, a sharpness sweep with its quadratic prediction, coherence with the
    shuffled control."""
    out = tmp_path_factory.mktemp("full") / "run.h5"
    base = dict(checkpoint=str(EXAMPLES / "mlp_sgd_s2000.pt"), max_samples=200, output=str(out), resume=True)
    run_scan(ScanConfig(**base, steps=(9,), interpolate=str(EXAMPLES / "mlp_adam_s2000.pt"), interp_steps=11,
                        curvature=CurvatureSettings(top_k=3, bottom_k=2, density=True, density_steps=20,
                                                    per_layer=True, trace_matvecs=30, max_hvp=60, validity=True,
                                                    validity_random=1, per_class=True, batch_sizes=(8, 32),
                                                    batch_draws=2),
                        sharpness=(SharpnessSettings(measure="worst-case", adaptive=False, rho=(0.01, 0.02), m=None,
                                                     steps=5),
                                   SharpnessSettings(measure="average-case", draws=4, m=100)),
                        coherence=CoherenceSettings(control=True, noise_samples=4, batch_sizes=(4, 32),
                                                    batch_repeats=4)))
    run_scan(ScanConfig(**base, slices=False, curvature=CurvatureSettings(kind="ggn", top_k=2, trace_matvecs=12,
                                                                          max_hvp=40)))
    run_scan(ScanConfig(**base, slices=False, curvature=CurvatureSettings(top_k=2, engine="pyhessian",
                                                                          trace_matvecs=12, max_hvp=40)))
    return out


@pytest.fixture(scope="module")
def full_report(full_run, tmp_path_factory):
    return render_report(full_run, tmp_path_factory.mktemp("report"), formats="png,svg,html")


def test_every_figure_for_a_full_run_file(full_report):
    stems = {p.stem for p in full_report.figures}
    assert stems == FULL_FIGURES
    assert {p.suffix for p in full_report.figures} == {".png", ".svg"}
    for p in full_report.figures:
        assert p.stat().st_size > 2000, p
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" if p.suffix == ".png" else b"<?xml" in head or b"<svg" in head


def test_summary_holds_every_scalar_with_its_error(full_run):
    run = RunContents.read(full_run)
    rows = {(r.section, r.name): r for r in summary_rows(run)}
    with h5py.File(full_run) as f:
        tr = f["hessian/trace"].attrs
        assert rows[("Hessian", "trace")].value == tr["estimate"]
        assert rows[("Hessian", "trace")].stderr == tr["stderr"]
        assert rows[("Hessian", "eigenvalue 1")].value == f["hessian/eigenvalues"][0]
        assert rows[("Hessian", "bottom eigenvalue 2")].value == f["hessian/bottom_eigenvalues"][1]
        assert rows[("Gauss-Newton", "trace")].value == f["ggn/trace"].attrs["estimate"]
        assert rows[("Hessian (PyHessian)", "eigenvalue 1")].value == f["hessian_pyhessian/eigenvalues"][0]
        assert rows[("Hessian, net.3.weight", "eigenvalue 1")].value == f["hessian/per_layer/net.3.weight/eigenvalues"][0]
        wc = f["sharpness/worst_case_l2"]
        assert rows[("sharpness worst_case_l2", "rho = 0.02")].value == wc["value"][1]
        assert rows[("sharpness worst_case_l2", "rho = 0.02")].stderr == wc["stderr"][1] or np.isnan(wc["stderr"][1])
        c = f["coherence"].attrs
        assert rows[("coherence", "b_noise")].stderr == c["b_noise_stderr"]
        assert rows[("coherence, shuffled labels", "m_coherence")].value == f["coherence/control"].attrs["m_coherence"]
        assert rows[("slice random_2d", "loss_at_origin")].value == f["slices/random_2d"].attrs["loss_at_origin"]


def test_only_a_1d_slice(tmp_path):
    out = tmp_path / "run.h5"
    r = cli("scan", str(EXAMPLES / "mlp_sgd_s2000.pt"), "--dims", "1", "--steps", "7", "--max-samples", "100",
            "--no-hessian", "--no-sharpness", "--no-coherence", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["report"] == str(tmp_path / "index.html")  # scan draws it next to the run file
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["random_1d_1d.png"] and (tmp_path / "figures" / figures[0]).stat().st_size > 2000
    page = (tmp_path / "index.html").read_text()
    assert 'id="slices"' in page and 'id="curvature"' not in page and 'id="sharpness"' not in page \
        and 'id="coherence"' not in page


def _gappy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose 2D slice has a NaN, an Inf and a point not computed."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        g = f["slices/random_2d"]
        loss, done = g["loss"][()], g["done"][()]
        loss[1, 1], loss[2, 3] = np.nan, np.inf
        done[4, 0] = False
        loss[4, 0] = np.nan
        g["loss"][...], g["done"][...] = loss, done
        g1 = f["slices/interpolation"]
        v = g1["loss"][()]
        v[3] = np.nan
        g1["loss"][...] = v
    return dst


def test_gaps_are_never_zeros(full_run, tmp_path):
    path = _gappy(full_run, tmp_path / "run.h5")
    run = RunContents.read(path)
    s2 = next(s for s in run.slices if s.name == "random_2d")
    z = s2.masked("loss")
    assert np.isnan(z[1, 1]) and np.isnan(z[2, 3]) and np.isnan(z[4, 0]) and np.isfinite(z).sum() == z.size - 3
    assert s2.n_missing == 3
    surf = surface_figure(run, s2)
    n_cells = (z.shape[0] - 1) * (z.shape[1] - 1)
    poly = surf.axes[0].collections[0]
    assert len(poly.get_array()) == n_cells - 4 - 4 - 2  # the cells touching a gap (two interior, one edge) stay open
    s1 = next(s for s in run.slices if s.name == "interpolation")
    line = curve_figure(run, s1).axes[0].lines[0]
    assert np.isnan(line.get_ydata()[3]) and np.isfinite(np.delete(line.get_ydata(), 3)).all()
    report = render_report(path, tmp_path, formats="png,html")
    figs = _figures(report.html.read_text())
    contour = next(f for f in figs if f["data"][0]["type"] == "contour")
    zt = contour["data"][0]["z"]  # plotly: z[j][i] at (x[i], y[j])
    assert zt[1][1] is None and zt[3][2] is None and zt[0][4] is None and zt[0][0] is not None
    assert sum(v is None for row in zt for v in row) == 3


def _figures(page: str) -> list[dict]:
    m = re.search(r'<script type="application/json" id="landscape-figures">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def _hostile(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose slice, metric and checkpoint names are markup."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        f.move("slices/random_2d", f"slices/{HOSTILE['slice']}")
        g = f[f"slices/{HOSTILE['slice']}"]
        g.create_dataset(HOSTILE["metric"], data=g["loss"][()] * 2)
        f.attrs["checkpoint_path"] = HOSTILE["checkpoint"]
        f.attrs["model_spec"] = json.dumps({"target": "</script><script>alert(4)</script>", "args": {}})
    return dst


def test_names_are_text_not_markup(full_run, tmp_path):
    report = render_report(_hostile(full_run, tmp_path / "run.h5"), tmp_path, formats="png,html")
    page = report.html.read_text()
    body = page[page.index("<body>"):]
    for name in HOSTILE.values():
        assert name not in body  # never verbatim: escaped in HTML, \u-escaped in the JSON block
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert body.count("<script") == 3  # figure data, plotly.js and the loader: nothing a name opened
    assert {p.stem for p in report.figures} >= {"_img_src_x_onerror_alert_1___contour",
                                                 "_img_src_x_onerror_alert_1____b_onmouseover_alert_2__cost___filled"}
    figs = _figures(page)
    assert any(HOSTILE["slice"].replace("<", "&lt;").replace(">", "&gt;") in json.dumps(f["layout"]) for f in figs)


def test_bad_input(tmp_path, full_run):
    with pytest.raises(LandscapeError, match="does not exist"):
        render_report(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(LandscapeError, match="not a readable HDF5"):
        render_report(tmp_path / "junk.h5")
    with pytest.raises(LandscapeError, match="unknown report format gif"):
        render_report(full_run, tmp_path, formats="png,gif")
    r = cli("report", str(tmp_path / "junk.h5"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_report_command(full_run, tmp_path):
    r = cli("report", str(full_run), "-o", str(tmp_path / "paper"), "--format", "pdf", "--levels", "log", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["html"] is None and {Path(p).stem for p in out["figures"]} == FULL_FIGURES
    assert all(Path(p).read_bytes()[:5] == b"%PDF-" for p in out["figures"])


def _blank(png: bytes) -> bool:
    import matplotlib.image

    img = matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]
    return float(img.std()) < 0.02 or float((img.mean(axis=-1) < 0.95).mean()) < 0.01


def test_html_in_a_browser(browser, full_report):
    page = full_report.html
    assert full_report.html_bytes < 6 * 2**20
    rendered = browser.load(page)
    assert rendered == len(_figures(page.read_text())) >= 15
    assert browser.evaluate("document.querySelectorAll('.plot .main-svg').length") >= rendered
    errors = [e for e in browser.of("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
    errors += browser.of("Runtime.exceptionThrown")
    errors += [e for e in browser.of("Log.entryAdded") if e["entry"]["level"] == "error"]
    assert not errors, errors
    urls = [e["request"]["url"] for e in browser.of("Network.requestWillBeSent")]
    assert page.resolve().as_uri() in urls
    network = [u for u in urls if u != page.resolve().as_uri() and not u.startswith(("data:", "blob:"))]
    assert not network, network
    assert not _blank(browser.screenshot())
    browser.evaluate("document.getElementById('slices').scrollIntoView()")
    assert not _blank(browser.screenshot())


def test_hostile_names_in_a_browser(browser, full_run, tmp_path):
    report = render_report(_hostile(full_run, tmp_path / "run.h5"), tmp_path, formats="html")
    browser.load(report.html)
    assert not browser.of("Page.javascriptDialogOpening")
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    text = browser.evaluate("document.body.innerText")
    assert HOSTILE["slice"] in text and HOSTILE["checkpoint"] in text
    svg_text = browser.evaluate("Array.from(document.querySelectorAll('.plot text')).map(t => t.textContent)"
                                ".join('\\n')")
    assert HOSTILE["slice"] in svg_text  # plotly shows the name as text, tags and all
    assert browser.evaluate("document.querySelectorAll('.plot b').length") == 0


#: In the page, every figure's layout problems (see test_layout_in_a_browser), as a list of strings.
LAYOUT_PROBLEMS = """(() => {
  const bad = [], hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  for (const fig of document.querySelectorAll('figure.fig')) {
    const plot = fig.querySelector('.plot'), box = plot.getBoundingClientRect();
    const cap = fig.querySelector('figcaption');
    if (!cap || cap.textContent.trim().length < 20) bad.push(plot.id + ': no caption');
    for (const t of plot.querySelectorAll('.gtitle, .xtick text, .ytick text, .y2tick text, .xtitle, .ytitle, .y2title')) {
      const r = t.getBoundingClientRect();
      if (r.width && (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1))
        bad.push(plot.id + ': "' + t.textContent + '" outside its plot');
    }
    const bar = plot.querySelector('.modebar'), title = plot.querySelector('.gtitle');
    if (bar && title && hit(bar.getBoundingClientRect(), title.getBoundingClientRect())) bad.push(plot.id + ': toolbar over the title');
    const labels = Array.from(plot.querySelectorAll('.textpoint text')).map(t => t.getBoundingClientRect()).filter(r => r.width);
    for (let i = 0; i < labels.length; i++) for (let j = i + 1; j < labels.length; j++)
      if (hit(labels[i], labels[j])) bad.push(plot.id + ': point labels overlap');
  }
  return bad;
})()"""


@pytest.fixture(scope="module")
def trajectory_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trajectory")
    files = [str(EXAMPLES / f"mlp_sgd_s{s:04d}.pt") for s in (0, 100, 500, 2000)]
    r = cli("trajectory", *files, "--max-samples", "200", "--plane-steps", "5", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out / "index.html"


def test_layout_in_a_browser(browser, full_report, trajectory_report, tmp_path):
    """Every plot has a caption; titles, tick labels and axis titles stay inside their plot (the trajectory's
    right axis was cut off); the toolbar leaves the title free; point labels do not overlap (the PCA plane's
    steps did). A screenshot of each section is kept beside the test's files for a person to look at."""
    for page in (full_report.html, trajectory_report):
        browser.load(page)
        problems = browser.evaluate(LAYOUT_PROBLEMS)
        assert problems == [], problems
        for section in browser.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.id)"):
            browser.evaluate(f"document.getElementById('{section}').scrollIntoView()")
            browser.pump(0.3)
            shot = browser.screenshot()
            (tmp_path / f"{page.parent.name}_{section}.png").write_bytes(shot)
            assert not _blank(shot), section


def test_plots_on_screen_are_drawn_first(browser, full_report):
    """Opened at the curvature section, its plots are drawn before the slices above it (they used to wait for
    every slice plot, the heavy 3D surfaces included)."""
    browser.events.clear()
    browser.open(full_report.html.resolve().as_uri() + "#curvature")
    browser.wait_for("document.body && document.body.getAttribute('data-rendered')", timeout=120)
    order = browser.evaluate("""(() => {
      const h = document.getElementById('curvature'), out = {before: [], after: []};
      for (const p of document.querySelectorAll('.plot'))
        (h.compareDocumentPosition(p) & Node.DOCUMENT_POSITION_FOLLOWING ? out.after : out.before)
          .push(Number(p.getAttribute('data-order')));
      return out;
    })()""")
    assert len(order["before"]) >= 3 and order["after"]
    assert min(order["after"]) < max(order["before"])
    assert min(order["after"]) <= 2
