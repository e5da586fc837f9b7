"""numpy's BLAS is held at one thread inside the algorithms that interleave it with torch products, and restored."""

import numpy as np
import pytest

from landscape.runtime.blas import _openblas, single_blas_thread
from landscape.linalg.density import slq
from landscape.linalg.lanczos import lanczos
from landscape.linalg.trace import basis_deflated, hutchinson, hutchpp

fns = _openblas()
pytestmark = pytest.mark.skipif(fns is None, reason="numpy's BLAS here is not OpenBLAS")


@pytest.mark.parametrize("algorithm", [
    lambda mv: lanczos(mv, 40, k=2, seed=0),
    lambda mv: hutchpp(mv, 40, max_matvec=12),
    lambda mv: hutchinson(mv, 40, max_matvec=5),
    lambda mv: slq(mv, 40, steps=10),
    lambda mv: basis_deflated(mv, lanczos(lambda v: np.arange(1.0, 41.0) * v, 40, k=2, keep_basis=True).krylov,
                              probes=4),
], ids=["lanczos", "hutchpp", "hutchinson", "slq", "lanczos-deflated"])
def test_one_blas_thread_inside_and_restored_after(algorithm):
    set_threads, get_threads = fns
    A = np.diag(np.arange(1.0, 41.0))
    seen = []

    def matvec(v):
        seen.append(int(get_threads()))
        return A @ v

    before = int(get_threads())
    set_threads(2)
    try:
        algorithm(matvec)
        assert seen and set(seen) == {1}
        assert int(get_threads()) == 2
        with single_blas_thread():  # nested: the inner hold restores the outer one's single thread
            algorithm(matvec)
            assert int(get_threads()) == 1
        assert int(get_threads()) == 2
    finally:
        set_threads(before)
