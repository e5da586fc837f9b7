import json

import h5py
import numpy as np
import pytest

from landscape import LandscapeError
from landscape.runfile import RunFile, describe


def make_slice(rf: RunFile, shape=(2, 3)):
    with rf.transaction() as f:
        g = f.create_group("slices/s")
        g.create_dataset("loss", data=np.full(shape, np.nan))
        g.create_dataset("done", data=np.zeros(shape, dtype=bool))


def test_second_writer_refused_and_lock_released(tmp_path):
    path = tmp_path / "run.h5"
    rf = RunFile(path)
    with pytest.raises(LandscapeError, match="another process"):
        RunFile(path, mode="resume")
    rf.close()
    RunFile(path, mode="resume").close()
    with pytest.raises(LandscapeError, match="already exists"):
        RunFile(path)


def test_journal_merge_ignores_torn_line(tmp_path):
    path = tmp_path / "run.h5"
    rf = RunFile(path)
    make_slice(rf)
    rf.append("s", np.array([0, 1]), {"loss": np.array([0.5, float("nan")])})
    rf.append("s", np.array([5]), {"loss": np.array([1 / 3])})
    rf.abandon()  # like a killed process: journal kept, nothing merged
    with open(path.with_name("run.h5.journal"), "a") as f:
        f.write(json.dumps({"slice": "s", "index": [2], "values": {"loss": [9.0]}})[:-5])  # torn write
    with h5py.File(path) as f:
        assert not f["slices/s/done"][()].any()
    rf = RunFile(path, mode="resume")
    rf.close()
    with h5py.File(path) as f:
        done, loss = f["slices/s/done"][()], f["slices/s/loss"][()]
    assert done.tolist() == [[True, True, False], [False, False, True]]
    assert loss[0, 0] == 0.5 and np.isnan(loss[0, 1]) and loss[1, 2] == 1 / 3  # bitwise
    assert not path.with_name("run.h5.journal").exists()


def test_failed_transaction_leaves_file_intact(tmp_path):
    path = tmp_path / "run.h5"
    rf = RunFile(path)
    make_slice(rf)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with rf.transaction() as f:
            f["slices/s/loss"][...] = 7.0
            raise RuntimeError("killed here")
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("run.h5.tmp*"))
    rf.close()


def test_not_a_run_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    with pytest.raises(LandscapeError, match="not a landscape run file"):
        RunFile(path, mode="resume")
    with pytest.raises(LandscapeError, match="not a landscape run file"):
        describe(path)
    path.write_bytes(b"garbage")
    with pytest.raises(LandscapeError, match="not a readable"):
        describe(path)
