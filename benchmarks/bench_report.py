"""Report cost: time to draw the static figures and the HTML page from a run file, the page's size,
and how long headless Chromium takes to open it until every plot is drawn.

    python benchmarks/bench_report.py reports/example/run.h5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # cdp.py: the tests' browser driver

from timing import best_of  # noqa: E402  (benchmarks/timing.py, this script's folder)

from landscape.report import render_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_file")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "pdf", "svg", "html"):
            seconds, rep = best_of(lambda: render_report(args.run_file, tmp, formats=fmt), args.repeats)
            size = sum(p.stat().st_size for p in rep.figures) + rep.html_bytes
            print(f"{fmt:5s} {seconds:6.2f} s  {len(rep.figures) or 1:3d} files  {size / 2**20:6.2f} MB")
        from plotly.offline import get_plotlyjs

        print(f"html: plotly.js is {len(get_plotlyjs()) / 2**20:.2f} MB of {rep.html_bytes / 2**20:.2f} MB")
        from cdp import Browser, find_browser

        path = find_browser()
        if path is None:
            print("no Chromium: browser timing skipped")
            return
        times = []
        for _ in range(args.repeats):
            b = Browser(path)
            try:
                t0 = time.perf_counter()
                b.open(rep.html.resolve().as_uri())
                n = b.wait_for("document.body && document.body.getAttribute('data-rendered')")
                times.append(time.perf_counter() - t0)
            finally:
                b.close()
        print(f"headless Chromium (software WebGL): {n} plots drawn {min(times):.2f} s after navigation "
              f"(best of {args.repeats})")


if __name__ == "__main__":
    main()
