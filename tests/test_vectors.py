"""Vector stores within a memory budget (landscape/vectors.py): a basis on disk gives the bits of one in memory."""

import os

import numpy as np
import pytest
import torch

import landscape.linalg.vectors as vectors
from landscape.linalg.density import slq
from landscape.linalg.lanczos import lanczos, orthogonalize
from landscape.linalg.trace import PROBE_BLOCK, basis_deflated, hutchpp, probe_block
from landscape.linalg.vectors import ColumnStore, orthonormalize


@pytest.fixture()
def small_blocks(monkeypatch, tmp_path):
    """Blocks of 64 rows, so that a few-hundred-dimensional operator spans several blocks; scratch files in
    tmp_path."""
    monkeypatch.setattr(vectors, "BLOCK_ROWS", 64)
    monkeypatch.setattr(vectors, "SPILL_DIR", str(tmp_path))
    return tmp_path


def _operator(n=300, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[50.0, 20.0, 19.9, 10.0, -8.0], rng.standard_normal(n - 5)])
    return (Q * lam) @ Q.T, np.sort(lam)


def test_store_round_trips_and_leaves_no_file(small_blocks):
    s = ColumnStore(200, 3, budget=100)
    assert s.on_disk and s.storage == "disk"
    x = np.random.default_rng(0).standard_normal((200, 3))
    for i in range(3):
        s.set_column(i, x[:, i])
    assert np.array_equal(s.read(64, 128, 3), x[64:128].T) and np.array_equal(s.column(2), x[:, 2])
    assert np.array_equal(np.asarray(s.combine(np.eye(3), budget=0)), x)
    assert list(small_blocks.iterdir()) == []  # unlinked at once: nothing to clean up after a kill


@pytest.mark.parametrize("where", ["memory", "disk", "device"])
def test_float32_store_keeps_float32_and_reads_float64(small_blocks, monkeypatch, where):
    """A float32 store takes half the bytes, holds each number rounded to float32 and hands back float64 (blocks,
    columns, passes), in memory, on disk and on a torch device alike; SVQB on it still finds the rank."""
    monkeypatch.setattr(vectors, "DEVICE_BLOCK_ROWS", 64)
    kw = {"budget": 0} if where == "disk" else {"device": "cpu"} if where == "device" else {}
    s = ColumnStore(200, 5, dtype=np.float32, **kw)
    assert s.storage == ("disk" if where == "disk" else "memory") and s.nbytes == ColumnStore(200, 5).nbytes // 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    for i in range(3):
        s.set_column(i, s.native(x[:, i]))
    rounded = x.astype(np.float32).astype(np.float64)
    block, column = vectors.host(s.read(64, 128, 3)), vectors.host(s.column(2))
    assert block.dtype == column.dtype == np.float64 and not np.array_equal(rounded, x)
    assert np.array_equal(block, rounded[64:128].T) and np.array_equal(column, rounded[:, 2])
    np.testing.assert_allclose(s.gram(3), rounded.T @ rounded, rtol=1e-12)
    s.write(64, s.native(np.full((2, 64), 1 / 3)), col0=3)  # a block written: rounded too
    assert vectors.host(s.read(64, 128, 5))[3:, 0].tolist() == [float(np.float32(1 / 3))] * 2
    B = rng.standard_normal((200, 4)) * [1e-3, 1.0, 1e3, 1.0]
    for i, col in enumerate(np.column_stack([B, B[:, 0] + B[:, 2]]).T):
        s.set_column(i, s.native(col))
    r = orthonormalize(s, 5)
    Q = np.asarray(s.combine(np.eye(5)[:, :r]))
    assert r == 4 and np.abs(Q.T @ Q - np.eye(4)).max() < 1e-6  # orthonormal to float32's rounding


def test_hutchpp_with_a_float32_block_equals_the_float64_one(small_blocks):
    """The block stored as float32 (what float32 products get: trace.sketch_dtype) moves the estimate by float32
    rounding only, the same in memory and on disk; recorded as the estimate's vector_dtype."""
    A, lam = _operator(seed=1)
    ref = hutchpp(lambda v: A @ v, 300, max_matvec=60, seed=3)
    mem, disk = (hutchpp(lambda v: A @ v, 300, max_matvec=60, seed=3, budget=b, dtype=np.float32)
                 for b in (float("inf"), 0))
    assert (ref.vector_dtype, mem.vector_dtype, disk.storage) == ("float64", "float32", "disk")
    assert mem.estimate == disk.estimate and mem.n_matvec == ref.n_matvec == 60
    scale = np.abs(lam).sum()
    assert 0 < abs(mem.estimate - ref.estimate) < 1e-6 * scale and abs(mem.stderr - ref.stderr) < 1e-6 * scale
    low = np.diag(np.r_[np.arange(1.0, 21.0), np.zeros(280)])  # rank 20 <= m/3: exact up to float32 rounding
    assert abs(hutchpp(lambda v: low @ v, 300, max_matvec=60, dtype=np.float32).estimate - 210.0) < 1e-5


def test_lanczos_on_disk_equals_in_memory_and_the_dense_answer(small_blocks):
    A, lam = _operator()
    mem = lanczos(lambda v: A @ v, 300, k=4, tol=1e-10, max_basis=12)  # restarts, several blocks
    disk = lanczos(lambda v: A @ v, 300, k=4, tol=1e-10, max_basis=12, budget=0)
    assert mem.storage == "memory" and disk.storage == "disk"
    assert np.array_equal(mem.eigenvalues, disk.eigenvalues) and mem.n_matvec == disk.n_matvec
    assert np.array_equal(np.asarray(mem.eigenvectors), np.asarray(disk.eigenvectors))
    np.testing.assert_allclose(mem.eigenvalues, lam[::-1][:4], rtol=1e-10)
    bottom = lanczos(lambda v: A @ v, 300, k=2, which="SA", tol=1e-10, budget=0)
    np.testing.assert_allclose(bottom.eigenvalues, lam[:2], rtol=1e-10)


def test_hutchpp_lanczos_deflated_trace_and_slq_on_disk_equal_in_memory(small_blocks):
    A, lam = _operator(seed=1)
    mem, disk = (hutchpp(lambda v: A @ v, 300, max_matvec=60, seed=3, budget=b) for b in (float("inf"), 0))
    assert mem.estimate == disk.estimate and mem.n_matvec == disk.n_matvec == 60
    assert abs(mem.estimate - lam.sum()) < 4 * mem.stderr + 1e-9
    runs = [lanczos(lambda v: A @ v, 300, k=3, max_basis=12, budget=b, keep_basis=True) for b in (float("inf"), 0)]
    mem, disk = (basis_deflated(lambda v: A @ v, r.krylov, probes=20, seed=4) for r in runs)
    for r in runs:
        r.krylov.close()
    assert (mem.storage, disk.storage) == ("memory", "disk")
    assert mem.estimate == disk.estimate and mem.stderr == disk.stderr
    assert abs(mem.estimate - lam.sum()) < 4 * mem.stderr + 1e-9
    d_mem, d_disk = (slq(lambda v: A @ v, 300, steps=30, seed=2, budget=b) for b in (float("inf"), 0))
    assert np.array_equal(d_mem.nodes, d_disk.nodes) and np.array_equal(d_mem.weights, d_disk.weights)


def test_deflated_trace_probes_projected_in_blocks_equal_one_at_a_time(small_blocks):
    """Blocks of 8, of 3 (the budget beside the basis; the last block short) and single probes: the same samples
    to round-off, on disk and in memory, and a block's projections are orthogonal to the basis."""
    A, lam = _operator(seed=2)
    for budget in (float("inf"), 0):
        top = lanczos(lambda v: A @ v, 300, k=3, max_basis=12, budget=budget, keep_basis=True)
        held = 0 if top.krylov.store.on_disk else top.krylov.store.nbytes
        assert probe_block(300, 20, float("inf")) == PROBE_BLOCK and probe_block(300, 20, -1.0) == 1
        assert probe_block(300, 20, 4 * 8 * 300 + 5) == 3 and probe_block(300, 2, float("inf")) == 2  # + a product
        runs = [basis_deflated(lambda v: A @ v, top.krylov, probes=20, seed=5, budget=held + room)
                for room in (float("inf"), 4 * 8 * 300, -1.0)]
        Z = top.krylov.store.native(np.sign(np.random.default_rng(0).standard_normal((5, 300))))
        Z, _ = orthogonalize(top.krylov.store, Z, top.krylov.cols)
        assert np.abs(top.krylov.store.project(Z, top.krylov.cols)).max() < 1e-12
        top.krylov.close()
        for r in runs[1:]:
            np.testing.assert_allclose(r.samples, runs[0].samples, rtol=1e-11, atol=1e-11)
            assert r.n_matvec == 20
        assert abs(runs[0].estimate - lam.sum()) < 4 * runs[0].stderr + 1e-9


def test_orthonormalize_keeps_the_span_and_drops_dependent_columns(small_blocks):
    rng = np.random.default_rng(0)
    B = rng.standard_normal((200, 4)) * [1e-3, 1.0, 1e3, 1.0]
    X = np.column_stack([B, B[:, 0] + B[:, 2]])  # rank 4, columns of very different norms
    s = ColumnStore(200, 5, budget=0)
    for i in range(5):
        s.set_column(i, X[:, i])
    r = orthonormalize(s, 5)
    Q = s.combine(np.eye(5)[:, :r])
    assert r == 4
    np.testing.assert_allclose(Q.T @ Q, np.eye(4), atol=1e-13)
    np.testing.assert_allclose(Q @ (Q.T @ X), X, atol=1e-10 * np.abs(X).max())


def test_torch_store_gives_the_numpy_answers(small_blocks, monkeypatch):
    """A store on a torch device (here the CPU, in several blocks) keeps tensors and hands tensors to the matvec;
    eigenpairs, trace and quadrature equal the numpy store's up to the order of summation."""
    monkeypatch.setattr(vectors, "DEVICE_BLOCK_ROWS", 128)
    A, lam = _operator(seed=2)
    At = torch.from_numpy(A)
    seen = []

    def tmatvec(v):
        seen.append(type(v))
        return At @ v

    ref = lanczos(lambda v: A @ v, 300, k=4, tol=1e-10, max_basis=12)
    got = lanczos(tmatvec, 300, k=4, tol=1e-10, max_basis=12, device="cpu")
    assert set(seen) == {torch.Tensor} and isinstance(got.eigenvectors, np.ndarray)
    np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(np.abs(got.eigenvectors.T @ ref.eigenvectors), np.eye(4), atol=1e-8)
    assert got.converged.all() and abs(got.n_matvec - ref.n_matvec) <= 2
    t_ref = hutchpp(lambda v: A @ v, 300, max_matvec=60, seed=3)
    t_got = hutchpp(tmatvec, 300, max_matvec=60, seed=3, device="cpu")
    assert t_got.n_matvec == t_ref.n_matvec and abs(t_got.estimate - t_ref.estimate) < 1e-9 * abs(lam).sum()
    d_ref = slq(lambda v: A @ v, 300, steps=20, seed=2)
    d_got = slq(tmatvec, 300, steps=20, seed=2, device="cpu")
    np.testing.assert_allclose(d_got.nodes, d_ref.nodes, rtol=1e-9, atol=1e-9)
    s = ColumnStore(300, 3, device="cpu")
    s.set_column(1, np.arange(300.0))
    assert isinstance(s.column(1), torch.Tensor) and s.column(1).tolist() == list(np.arange(300.0))
    np.testing.assert_array_equal(s.combine(np.eye(3)[:, 1:2])[:, 0], np.arange(300.0))


def test_curvature_operator_keeps_tensors_on_their_device():
    """The Hessian operator of a model takes a tensor and returns one, equal to its numpy product."""
    import torch.nn.functional as F

    from conftest import blobs, relu_mlp
    from landscape import Problem
    from landscape.problem.curvature import CurvatureOperator

    net, (X, y) = relu_mlp((4, 8, 3)), blobs(64)
    op = CurvatureOperator(Problem(net, X, y, F.cross_entropy))
    v = np.random.default_rng(0).standard_normal(op.n)
    out = op(torch.from_numpy(v))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), op(v), rtol=1e-12, atol=1e-14)


def test_a_basis_too_big_for_the_budget_keeps_what_fits_in_memory(small_blocks):
    """Between 2k + 5 and max(2k + 10, 20) vectors fit: the basis stays in memory with as many as fit, with the
    same eigenvalues; below 2k + 5 it goes to disk."""
    A, lam = _operator(seed=4)
    padded = 5 * 64  # 300 rows in blocks of 64
    r = lanczos(lambda v: A @ v, 300, k=4, tol=1e-10, budget=8 * padded * 19)  # 16 + the residual + two in flight
    assert (r.storage, r.basis) == ("memory", 16)
    np.testing.assert_allclose(r.eigenvalues, lam[::-1][:4], rtol=1e-10)
    r = lanczos(lambda v: A @ v, 300, k=4, tol=1e-10, budget=8 * padded * 12)
    assert (r.storage, r.basis) == ("disk", 13)


def _diagonal(*top: float) -> tuple[int, np.ndarray]:
    """A diagonal operator of 4 blocks of 64 x 4096 rows: uniform [0, 1) entries and the ``top`` values at rows
    7, 70,000 and 9, in that order."""
    n = 64 * 4096
    d = np.random.default_rng(0).uniform(0.0, 1.0, n)
    d[[7, 70_000, 9][:len(top)]] = top
    return n, d


def test_lanczos_holds_its_budget_with_the_vectors_in_flight(small_blocks):
    """The basis, the step's vector and its product, and then the eigenvectors stay within the budget (numpy's
    allocations, as tracemalloc counts them): the basis leaves room for the two vectors a step holds."""
    import tracemalloc
    n, d = _diagonal(5.0, 4.0)
    vec = n * 8
    budget = 16 * vec
    tracemalloc.start()
    try:
        r = lanczos(lambda v: d * v, n, k=2, tol=1e-8, budget=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (r.storage, r.basis) == ("memory", 13)
    np.testing.assert_allclose(r.eigenvalues, [5.0, 4.0], rtol=1e-8)
    assert peak <= budget + vec / 4, f"{peak / vec:.2f} vectors held against a budget of {budget / vec:.0f}"


def test_residual_norm_equals_the_norm_of_the_difference_across_chunks():
    rng = np.random.default_rng(3)
    p, v = rng.standard_normal(1000), rng.standard_normal(1000)
    assert vectors.residual_norm(p, 0.7, v, chunk=64) == pytest.approx(np.linalg.norm(p - 0.7 * v), rel=1e-13)
    tp, tv = torch.from_numpy(p), torch.from_numpy(v)
    assert vectors.residual_norm(tp, -2.0, tv, chunk=999) == pytest.approx(np.linalg.norm(p + 2.0 * v), rel=1e-13)


def _mapped_kib(path_part: str) -> int:
    """Resident KiB of this process's mappings whose path contains ``path_part`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ")[0] and len(line.split()) >= 5:
                inside = path_part in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_spilled_eigenvectors_leave_the_resident_set(small_blocks):
    """Eigenvectors combined into a scratch-file mapping (they did not fit the budget) are unmapped as they are
    written and after each is verified: the same numbers, no resident pages of the file left in the process."""
    n, d = _diagonal(5.0, 4.0, 3.0)
    r = lanczos(lambda v: d * v, n, k=3, tol=1e-8, budget=16 * n * 8)
    assert isinstance(r.eigenvectors, np.memmap)
    assert _mapped_kib(str(small_blocks)) <= 16, "the spilled eigenvectors' pages stayed mapped"
    np.testing.assert_allclose(np.abs(r.eigenvectors[[7, 70_000, 9], [0, 1, 2]]), 1.0, rtol=1e-7)
    assert _mapped_kib(str(small_blocks)) > 0  # read again: mapped again (the check above can see them)


def test_a_freed_store_leaves_no_resident_memory_behind():
    """Under the CLI's allocator hold a store freed into the heap stayed resident, and a smaller block taken from its
    place left the next store of its size no room: two stores' memory for one (ResNet-18's ``--batch-sizes``, 8.2 GB
    where 5.3 GB were live). A large store is now made after the heap's free pages are handed back."""
    from landscape.runtime.allocator import reuse_freed_memory
    from landscape.runtime.budget import rss

    n, k = 2**20, 16  # 128 MiB
    with reuse_freed_memory():
        before = rss()
        first = ColumnStore(n, k)
        for i in range(k):
            first.set_column(i, np.full(n, float(i)))
        pinned = np.ones(2**20)  # 8 MiB after it in the heap, held: the store's place is not at the heap's top
        del first
        small = np.ones(2**20)  # 8 MiB from the heap: once inside the freed store's place
        second = ColumnStore(n, k)
        for i in range(k):
            second.set_column(i, np.full(n, float(i)))
        grown = rss() - before
        assert second.column(3)[7] == 3.0 and small.sum() == pinned.sum() == 2**20
    assert grown < 1.5 * n * k * 8, f"{grown / 2**20:.0f} MiB resident for one store of 128 MiB"
