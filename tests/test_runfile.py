import json

import h5py
import numpy as np
import pytest

from landscape import LandscapeError
from landscape.io.runfile import RunFile, describe


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


def test_import_loss_landscape_surface_non_square(tmp_path):
    from landscape.io.importers import import_loss_landscape

    src = tmp_path / "surf.h5"
    x, y = np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 3)
    ours = np.add.outer(x ** 2, 10 * y)  # value at (x[i], y[j])
    with h5py.File(src, "w") as f:
        f["xcoordinates"], f["ycoordinates"] = x, y
        stored = ours.T.copy()  # that code stores [y, x]
        stored[2, 3] = -1  # not computed yet
        f["train_loss"] = stored
        f["train_acc"] = np.full((3, 4), 50.0)
    out = import_loss_landscape(src, tmp_path / "run.h5")
    with h5py.File(out) as f:
        loss, done = f["slices/imported/loss"][()], f["slices/imported/done"][()]
        assert f.attrs["schema"] == "landscape/1"
        assert f["slices/imported/accuracy"][0, 0] == 0.5
    assert loss.shape == (4, 3) and loss[1, 2] == ours[1, 2] and loss[3, 0] == ours[3, 0]
    assert not done[3, 2] and np.isnan(loss[3, 2]) and done.sum() == 11
    with pytest.raises(LandscapeError, match="xcoordinates"):
        import_loss_landscape(tmp_path / "run.h5", tmp_path / "again.h5")
