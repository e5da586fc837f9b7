"""Benchmark: peak memory of one Hessian-vector product against one gradient, per HVP engine (CPU).

    python benchmarks/bench_hvp_memory.py [--samples 20000] [--width 1024] [--threads 2]

Each measurement runs in a fresh subprocess: build a Problem (an MLP 20-W-W-10 on a Gaussian mixture, float32, the
whole set in one chunk, so that activations dominate), record the peak resident set size, run one gradient or one
HVP with the chosen engine, and report the increase of the peak RSS (``ru_maxrss``). The gradient graph of the
``graph`` engine is built inside the measurement, as it would be for the first product. Output: a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch, torch.nn.functional as F
torch.set_num_threads(int(sys.argv[4]))
from landscape import Problem
from landscape.io.data import gaussian_mixture
n, width, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
X, y = gaussian_mixture(n=n, classes=10, dim=20)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(20, width), torch.nn.ReLU(), torch.nn.Linear(width, width), torch.nn.ReLU(),
                          torch.nn.Linear(width, 10))
mode = what if what != "gradient" else "auto"
pb = Problem(net, X, y, F.cross_entropy, batch_size=n, hvp_mode=mode)
v = {k: torch.randn_like(t) for k, t in pb.theta0.items()}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if what == "gradient":
    pb.gradient()
else:
    pb.hvp(v)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"what": what, "peak_increase_mib": (after - before) / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for what in ("gradient", "graph", "forward-over-reverse", "reverse-over-reverse"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.samples), str(args.width), what, str(args.threads)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    act = args.samples * args.width * 4 / 2**20
    print(f"MLP 20-{args.width}-{args.width}-10, {args.samples} samples in one chunk, float32; one hidden activation "
          f"tensor is {act:.0f} MiB\n")
    print("| computation | peak RSS increase (MiB) | x gradient |\n|---|---|---|")
    g = rows[0]["peak_increase_mib"]
    for r in rows:
        label = "gradient" if r["what"] == "gradient" else f"HVP, {r['what']}"
        print(f"| {label} | {r['peak_increase_mib']:.0f} | {r['peak_increase_mib'] / g:.2f} |")


if __name__ == "__main__":
    main()
