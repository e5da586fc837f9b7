"""Issue 22, part 2: every bad input of :mod:`badinputs` ends in exit 2 and one line naming the problem, with no
traceback, and leaves an earlier run file byte for byte intact. The fast suite runs every fifth case; the rest are
marked slow (CI runs them all)."""

from __future__ import annotations

import pytest

from faults.badinputs import CASES, make_files, run_case, verdict


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return make_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name,args,needle", [pytest.param(*c, marks=() if i % 5 == 0 else pytest.mark.slow, id=c[0])
                                              for i, c in enumerate(CASES)])
def test_bad_input(files, name, args, needle):
    from pathlib import Path

    before = Path(files["run"]).read_bytes()
    res = run_case(args, files)
    problem = verdict(res, needle)
    assert problem is None, problem
    assert Path(files["run"]).read_bytes() == before, "the earlier run file changed"


def test_the_table_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1][0] for c in CASES} >= {"scan", "hessian", "sharpness", "coherence", "compare", "trajectory",
                                         "report", "inspect"}
