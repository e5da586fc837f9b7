"""Issue 22, part 6: while a scan writes its run file, readers get its last saved state (consistent, marked in
progress) and a second writer is refused; the scan finishes unharmed (``tests/faults/concurrency.py``)."""

from __future__ import annotations

import json

import pytest

from faults.concurrency import read_while_writing

pytestmark = pytest.mark.slow  # ~40 s: a scan of about ten seconds read through, with three commands beside it


def test_readers_and_a_second_writer_during_a_scan(tmp_path):
    r = read_while_writing(tmp_path)
    assert r["writer_exit"] == 0, r["writer_stderr"]
    assert not r["problems"], r["problems"]
    assert r["reads"] >= 5 and r["consistent"] == r["reads"]
    assert r["in_progress"] >= 1 and r["partial"] >= 1  # some reads landed mid-slice, while the lock was held
    assert not r["final_in_progress"] and r["final_problem"] is None
    code, err = r["second_writer"]
    assert code == 2 and err.count("\n") == 0 and "being written by another process" in err, err
    code, err = r["report"]
    assert code == 0 and "in progress" in err, err
    code, out = r["inspect"]
    assert code == 0 and json.loads(out)["in_progress"] is True
