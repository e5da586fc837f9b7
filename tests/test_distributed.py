"""torchrun with 2 CPU processes (gloo): the same run file as one process, and resume across rank counts.

Slices must be bitwise equal; everything that goes through data-parallel gradients and Hessian-vector products
(spectrum, trace, coherence, sharpness) only to round-off, since the ranks' partial sums are added in another
order. Both runs use one BLAS thread per process, so that the only difference is the number of ranks.
"""

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from landscape.runtime.distributed import Comm
from landscape.io.runfile import RunFile
from test_resume import assert_same, contents, journal_points

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def torchrun(nproc, *args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "landscape", *args]
    if popen:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def one_process(*args):
    return subprocess.run([sys.executable, "-m", "landscape", *args], env=ENV, capture_output=True, text=True,
                          timeout=600)


def descendants(pid):
    """``pid`` and every process below it (torchrun starts each worker in a session of its own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds no file or lock
    except OSError:
        return False


def holders(path):
    """Processes with ``path`` open (any process the job left behind, forked children included)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") == str(path):
                        out.append(int(entry))
                        break
                except OSError:
                    continue
    return out


def kill_job(proc, run):
    """SIGKILL a whole job at once, as a scheduler does with a job's cgroup (the OOM killer likewise): torchrun, its
    workers (each in a session of its own) and any process still holding the run file; then wait until they are
    gone and the run file's lock is free."""
    lock = run.with_name(run.name + ".lock")
    pids = descendants(proc.pid) + holders(lock)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 60
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    fd = os.open(lock, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"lock still held by {holders(lock)} after killing {pids}"
                time.sleep(0.05)
    finally:
        os.close(fd)


def test_shards_cover_everything_once():
    for n in (1, 2, 7, 10, 1438):
        for world in (1, 2, 3, 5):
            if world > n:
                continue
            parts = [Comm(rank=r, world=world).shard(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1


def test_two_processes_equal_one(tmp_path, mlp_ckpt):
    # the strategy is pinned: "auto" picks in-place or vmap by timing, per run, and the two round differently
    args = ["scan", str(mlp_ckpt), "--steps", "7x5", "--max-samples", "400", "--dtype", "float64", "--no-report",
            "--strategy", "inplace", "--json", "--device", "cpu"]  # CPU processes (gloo), also where a GPU is
    one = one_process(*args, "-o", str(tmp_path / "one.h5"))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, "-o", str(tmp_path / "two.h5"))
    assert two.returncode == 0, two.stderr
    summary = json.loads(two.stdout)  # rank 0 alone prints: one JSON document
    assert summary["run_file"].endswith("two.h5")
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        for key in ("loss", "accuracy", "done", "x", "y"):
            assert a[f"slices/random_2d/{key}"][()].tobytes() == b[f"slices/random_2d/{key}"][()].tobytes(), key
        assert a["slices/random_2d/done"][()].all()
        np.testing.assert_allclose(b["hessian/eigenvalues"][()], a["hessian/eigenvalues"][()], rtol=1e-6)
        np.testing.assert_allclose(b["hessian/trace"].attrs["estimate"], a["hessian/trace"].attrs["estimate"],
                                   rtol=1e-6)
        for k in ("m_coherence", "b_simple", "gsnr_mean", "b_noise"):
            np.testing.assert_allclose(b["coherence"].attrs[k], a["coherence"].attrs[k], rtol=1e-8, err_msg=k)
        np.testing.assert_allclose(b["coherence/grand"][()], a["coherence/grand"][()], rtol=1e-10)
        np.testing.assert_allclose(b["coherence/class_cosine"][()], a["coherence/class_cosine"][()], rtol=1e-8)
        # the ranks keep every random batch's sum (a batch crosses their shards); one process closes them in turn
        for k in ("batch_cosine", "batch_cosine_std"):
            np.testing.assert_allclose(b[f"coherence/{k}"][()], a[f"coherence/{k}"][()], rtol=1e-8, err_msg=k)
        for g in a["sharpness"]:
            # APGD's worst case is an ascent: round-off in a gradient can move its path a little
            tol = 1e-4 if g.startswith("worst") else 1e-6
            np.testing.assert_allclose(b[f"sharpness/{g}/value"][()], a[f"sharpness/{g}/value"][()], rtol=tol,
                                       atol=1e-12, err_msg=g)


# two in-place blocks at once per process, on model copies with a thread each (landscape.problem.replica): a rank's share of
# a round is then two blocks, and the bits must not depend on how blocks fall to ranks and replicas
SLICE = ["scan", None, "--steps", "61x51", "--strategy", "inplace", "--workers", "2", "--save-every", "0.3",
         "--no-report", "--no-hessian", "--no-sharpness", "--no-coherence", "--device", "cpu"]


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_killed_run_resumes_with_another_number_of_ranks(tmp_path, mlp_ckpt, first, then):
    args = [str(mlp_ckpt) if a is None else a for a in SLICE]
    ref = tmp_path / "ref.h5"
    res = one_process(*args, "-o", str(ref))
    assert res.returncode == 0, res.stderr
    run = tmp_path / "killed.h5"
    if first == 2:
        proc = torchrun(2, *args, "-o", str(run), popen=True)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "landscape", *args, "-o", str(run)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not journal_points(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(first).uniform(0.0, 0.2))
    assert proc.poll() is None, "the scan finished before it could be killed; make the grid larger"
    kill_job(proc, run)
    RunFile(run, mode="resume").close()  # merge the journal
    with h5py.File(run) as f:
        partial = int(f["slices/random_2d/done"][()].sum())
    assert 0 < partial < 61 * 51
    resume = ["--resume", "--json", "-o", str(run)]
    res = torchrun(2, *args, *resume) if then == 2 else one_process(*args, *resume)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["slices"][0]["computed"] == 61 * 51 - partial
    assert_same(contents(ref), contents(run))


def test_compare_and_trajectory_under_torchrun_equal_one_process(tmp_path):
    from conftest import EXAMPLES

    common = ["--max-samples", "300", "--dtype", "float64", "--no-report", "--json", "--device", "cpu"]
    pair = [str(EXAMPLES / f"mlp_{opt}_s2000.pt") for opt in ("sgd", "adam")]
    cmp = ["compare", *pair, "--steps", "5", "--no-hessian", "--no-sharpness", "--no-coherence", "--align",
           "--curve", "bezier", "--bezier-steps", "20", "--alpha-steps", "11", *common]
    series = [str(EXAMPLES / f"mlp_sgd_s{s:04d}.pt") for s in (0, 100, 500, 2000)]
    traj = ["trajectory", *series, "--plane-steps", "5", *common]
    for args, out in ((cmp, "compare.h5"), (traj, "trajectory.h5")):
        one = one_process(*args, "-o", str(tmp_path / "one"))
        assert one.returncode == 0, one.stderr
        two = torchrun(2, *args, "-o", str(tmp_path / "two"))
        assert two.returncode == 0, f"{two.stderr}\nstdout (rank 0 alone prints):\n{two.stdout[-800:]}"
        a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints: one JSON document
        if args is cmp:
            for k, m in a["metrics"].items():
                np.testing.assert_allclose(b["metrics"][k]["value"], m["value"], rtol=1e-8, err_msg=k)
            for k in ("loss_barrier", "error_barrier", "loss_barrier_unaligned", "bezier_max_loss"):
                # the Bezier bend is fitted with data-parallel gradients: round-off apart, the same steps
                np.testing.assert_allclose(b["pairs"]["0_1"][k], a["pairs"]["0_1"][k], rtol=1e-6, err_msg=k)
            keys = ["compare/interpolation/0_1/loss", "compare/interpolation/0_1/unaligned/loss",
                    "compare/bezier/0_1/loss"]
        else:
            np.testing.assert_allclose([c["sharpness"] for c in b["checkpoints"]],
                                       [c["sharpness"] for c in a["checkpoints"]], rtol=1e-6)
            keys = ["trajectory/plane/loss", "trajectory/plane/accuracy", "trajectory/pca/coords"]
        with h5py.File(tmp_path / "one" / out) as fa, h5py.File(tmp_path / "two" / out) as fb:
            for k in keys:
                assert np.isfinite(fa[k][()]).all(), k  # every point gathered on the writer
                np.testing.assert_allclose(fb[k][()], fa[k][()], rtol=1e-6 if "bezier" in k else 1e-10, err_msg=k)


def test_device_auto_and_cuda_need_a_gpu_per_process(monkeypatch):
    """On a node with fewer GPUs than processes, ``--device auto`` means the CPU (gloo) and ``--device cuda`` is a
    clear error on every rank (seen on a 1-GPU machine: rank 1 failed with "invalid device ordinal")."""
    from landscape.runtime.distributed import cuda_for_job, job_backend
    from landscape.errors import LandscapeError
    from landscape.analyses.scan import resolve_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert cuda_for_job() and job_backend("auto") == "nccl" and resolve_device("auto").type == "cuda"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not cuda_for_job() and job_backend("auto") == "gloo" and resolve_device("auto").type == "cpu"
    with pytest.raises(LandscapeError, match="2 processes on this node share 1 CUDA device") as err:
        job_backend("cuda")
    assert "--nproc-per-node" in err.value.hint
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert job_backend("cpu") == "gloo"
    with pytest.raises(LandscapeError, match="share 0 CUDA device"):
        job_backend("cuda")


def test_more_ranks_than_samples_is_a_clear_error(tmp_path, mlp_ckpt):
    res = torchrun(2, "scan", str(mlp_ckpt), "--max-samples", "1", "--steps", "3", "--no-report",
                   "-o", str(tmp_path / "r.h5"))
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if "cannot be shared" in line]
    # one line, from rank 0 (torchrun adds its own report of the failed child after it)
    assert ours == ["error: 1 samples cannot be shared by 2 ranks; use more samples or fewer processes"], res.stderr
