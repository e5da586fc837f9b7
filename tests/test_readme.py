"""Both README commands work in a fresh virtual environment (slow: installs the package from scratch)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

NESTED = "LANDSCAPE_README_NESTED"


def readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1).strip()


@pytest.mark.slow  # and so skipped inside its own run of the README's test command (conftest.py): no recursion
def test_readme_commands_in_fresh_venv(tmp_path):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    repo = tmp_path / "repo"
    for f in files:
        if (REPO / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv), NESTED: "1"}
    env.pop("PYTHONPATH", None)
    # the README asks for a torch build to be present first; this machine's is the pinned CPU wheel
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"torch=={_torch_version()}"], env=env, check=True)
    for marker in ("main-command", "test-command"):
        cmd = readme_command(marker)
        res = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert (repo / "reports" / "mlp_sgd_s2000" / "run.h5").exists()


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]
