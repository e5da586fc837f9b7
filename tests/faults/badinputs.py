"""Issue 22's table of bad inputs: files and options a user can get wrong, over every command.

Each case is ``(name, args, needle)``: ``args`` may name the files of :func:`make_files` as ``{key}``; the command
must exit 2 with one line that starts ``error:`` and holds ``needle``, print no traceback, and leave the earlier
run file ``{run}`` byte for byte as it was. Shared by ``tests/faults/test_bad_inputs.py`` and
``benchmarks/bench_faults.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
CK = str(REPO / "data" / "examples" / "mlp_sgd_s2000.pt")
CK2 = str(REPO / "data" / "examples" / "mlp_adam_s2000.pt")
CNN = str(REPO / "data" / "examples" / "cnn_adam_s2000.pt")

CASES: list[tuple[str, tuple[str, ...], str]] = [
    # checkpoints
    ("missing checkpoint", ("scan", "{dir}/nope.pt"), "does not exist"),
    ("empty checkpoint", ("scan", "{empty}"), "empty"),
    ("truncated checkpoint", ("scan", "{trunc}"), "corrupt or truncated"),
    ("random bytes", ("scan", "{random}"), "not a PyTorch checkpoint"),
    ("text file as checkpoint", ("hessian", "{text}"), "not a PyTorch checkpoint"),
    ("a list saved as checkpoint", ("scan", "{listck}"), "state dict"),
    ("a bare tensor as checkpoint", ("sharpness", "{tensorck}"), "state dict"),
    ("state dict without a model", ("scan", "{bare}"), "--model"),
    ("wrong model for the keys", ("scan", CK, "--model", "landscape_data.models:SmallCNN"), "does not fit the model"),
    ("shape mismatch", ("hessian", CK, "--model", "landscape_data.models:MLP", "--model-arg", "width=32"),
     "shape mismatch"),
    ("NaN weights", ("scan", "{nanck}", "--model", "{modelpy}:f", "--data", "{data4}"), "NaN or Inf"),
    ("missing state key", ("scan", CK, "--state-key", "nosuch"), "nosuch"),
    ("model file missing", ("scan", "{bare}", "--model", "{dir}/nomodel.py:f"), "does not exist"),
    ("model spec not a module", ("scan", "{bare}", "--model", "os:getcwd"), "model"),
    # data
    ("missing data file", ("scan", CK, "--data", "{dir}/nodata.npz"), "does not exist"),
    ("empty data", ("scan", "{bare}", "--model", "{modelpy}:f", "--data", "{emptydata}"), "no samples"),
    ("X and y of different lengths", ("scan", "{bare}", "--model", "{modelpy}:f", "--data", "{mismatched}"),
     "targets"),
    ("labels beyond the classes", ("scan", CK, "--data", "{badlabels}"), "labels lie outside"),
    ("inputs of the wrong width", ("scan", CK, "--data", "{widedata}"), "running the model on the data failed"),
    ("unknown built-in data", ("scan", CK, "--data", "nosuchset"), "nosuchset"),
    ("unknown loss", ("scan", CK, "--loss", "nosuchloss"), "nosuchloss"),
    ("max-samples 0", ("scan", CK, "--max-samples", "0"), "max-samples"),
    # options
    ("steps 0", ("scan", CK, "--steps", "0"), "steps"),
    ("steps not a number", ("scan", CK, "--steps", "abc"), "steps"),
    ("dims 3", ("scan", CK, "--dims", "3"), "dims"),
    ("unknown norm", ("scan", CK, "--norm", "l3"), "l3"),
    ("unknown dtype", ("hessian", CK, "--dtype", "float8"), "float8"),
    ("unknown device", ("hessian", CK, "--device", "tpu"), "tpu"),
    ("memory budget not a size", ("scan", CK, "--memory-budget", "lots"), "lots"),
    ("batch size 0", ("hessian", CK, "--batch-size", "0"), "--batch-size must be at least 1"),
    ("negative top-k", ("hessian", CK, "--top-k", "-1"), "--top-k must be at least 0"),
    ("unknown HVP engine", ("hessian", CK, "--hvp", "fast"), "HVP engine 'fast' is unknown"),
    ("trace matvecs 1", ("hessian", CK, "--trace-matvecs", "1"), "--trace-matvecs"),
    ("batch sizes not numbers", ("hessian", CK, "--batch-sizes", "8,x"), "--batch-sizes"),
    ("batch sizes beyond the data", ("hessian", CK, "--batch-sizes", "100000", "--no-trace", "--top-k", "1",
                                     "--max-samples", "64"), "not below the 64"),
    ("unknown sharpness measure", ("sharpness", CK, "--measure", "nosuch"), "nosuch"),
    ("negative rho", ("sharpness", CK, "--rho", "-1"), "rho"),
    ("coherence control unknown", ("coherence", CK, "--control", "nosuch"), "--control"),
    ("compare one model", ("compare", CK), "two"),
    ("trajectory one file", ("trajectory", CK), "at least two"),
    ("trajectory of two architectures", ("trajectory", CK, CNN), "another architecture"),
    # outputs and run files
    ("output folder is a file", ("scan", CK, "-o", "{text}"), "is a file, not a folder"),
    ("output cannot hold a folder", ("scan", CK, "-o", "/proc/forbidden/run.h5"), "cannot write the run file"),
    ("output exists (no --resume)", ("scan", CK, "-o", "{run}"), "already exists"),
    ("output is not a run file", ("scan", CK, "-o", "{foreign}", "--resume"), "not a landscape run file"),
    ("resume with other settings", ("scan", CK, "-o", "{run}", "--resume", "--steps", "5", "--no-hessian",
                                    "--no-sharpness", "--no-coherence", "--no-report"), "--overwrite"),
    ("report of a missing file", ("report", "{dir}/nothing.h5"), "does not exist"),
    ("report of random bytes", ("report", "{random}"), "not a readable HDF5 file"),
    ("inspect a foreign HDF5 file", ("inspect", "{foreign}"), "run file"),
    ("inspect a truncated run file", ("inspect", "{truncrun}"), "truncated"),
]


def make_files(tmp: Path) -> dict[str, str]:
    """The files the cases name, and an earlier run file ``run`` that no case may change."""
    from landscape.analyses.scan import ScanConfig, run_scan

    tmp.mkdir(parents=True, exist_ok=True)
    f = {"dir": str(tmp)}

    def put(key: str, name: str) -> Path:
        f[key] = str(tmp / name)
        return tmp / name

    put("empty", "empty.pt").write_bytes(b"")
    put("trunc", "trunc.pt").write_bytes(Path(CK).read_bytes()[:5000])
    put("random", "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    put("text", "notes.txt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], put("listck", "list.pt"))
    torch.save(torch.ones(3), put("tensorck", "tensor.pt"))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    torch.save(net.state_dict(), put("bare", "bare.pt"))
    sd = net.state_dict()
    sd["0.weight"][1, 2] = float("nan")
    torch.save(sd, put("nanck", "nan.pt"))
    put("modelpy", "m.py").write_text("import torch\n\ndef f():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), "
                                      "torch.nn.ReLU(), torch.nn.Linear(8, 3))\n")
    torch.save({"X": torch.randn(30, 4), "y": torch.randint(0, 3, (30,))}, put("data4", "data4.pt"))
    np.savez(put("emptydata", "empty.npz"), X=np.zeros((0, 4), np.float32), y=np.zeros((0,), np.int64))
    np.savez(put("mismatched", "mismatched.npz"), X=np.zeros((10, 4), np.float32), y=np.zeros((7,), np.int64))
    torch.save({"X": torch.randn(20, 64), "y": torch.tensor([0, 1, 99] + [2] * 17)}, put("badlabels", "labels.pt"))
    torch.save({"X": torch.randn(20, 65), "y": torch.randint(0, 10, (20,))}, put("widedata", "wide.pt"))
    import h5py

    with h5py.File(put("foreign", "foreign.h5"), "w") as h:
        h["x"] = np.arange(3)
    run = put("run", "run.h5")
    run_scan(ScanConfig(checkpoint=CK, max_samples=64, output=str(run), steps=(3,)))
    put("truncrun", "truncrun.h5").write_bytes(run.read_bytes()[:3000])
    return f


def run_case(args: tuple[str, ...], files: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [a.format(**files) for a in args]
    return subprocess.run([sys.executable, "-m", "landscape", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"}, cwd=files["dir"])


def verdict(res: subprocess.CompletedProcess, needle: str) -> str | None:
    """None when the case ended cleanly, else what was wrong."""
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    if res.returncode != 2:
        return f"exit {res.returncode}: {res.stderr.strip()[-300:]}"
    if "Traceback" in res.stderr:
        return "traceback"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"not one error line: {res.stderr.strip()[-300:]}"
    if needle.lower() not in lines[0].lower():
        return f"does not say {needle!r}: {lines[0]}"
    return None
