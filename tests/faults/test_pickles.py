"""Issue 22, part 3: a crafted pickle in any of five carriers never runs, through the CLI or the API: the marker
file never appears, and the CLI ends with one line (exit 2) that names the danger and --trust-pickle."""

from __future__ import annotations

import pytest

from conftest import cli
from faults.pickles import carriers
from landscape.io.checkpoint import load_checkpoint
from landscape.errors import LandscapeError


def test_crafted_pickles_never_run(tmp_path):
    marker = tmp_path / "pwned"
    files = carriers(tmp_path / "files", marker)
    assert len(files) == 5
    for name, path in files.items():
        with pytest.raises(LandscapeError):
            load_checkpoint(path)
        assert not marker.exists(), name
        res = cli("scan", str(path), "-o", str(tmp_path / f"{path.stem}.h5"))
        assert res.returncode == 2 and "Traceback" not in res.stderr, (name, res.stderr)
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, res.stderr)
        assert "posix.system" in lines[0] and "--trust-pickle" in lines[0], (name, lines[0])
        assert not marker.exists(), name
    # the payload is real: unpickling it as --trust-pickle would does run it
    import torch

    torch.load(files["legacy file"], weights_only=False)
    assert marker.exists()
