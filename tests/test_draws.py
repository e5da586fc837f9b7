"""The counter-based draws: any stretch equals the same stretch of the whole, the numbers are standard normal (or
uniform) and independent across seeds and streams, and a CUDA device gives the CPU's numbers."""

import numpy as np
import pytest
import torch
from scipy import stats

import landscape.linalg.draws as draws
from landscape.linalg.draws import normal, sign_columns, signs, uniform


def test_a_stretch_equals_the_same_stretch_of_the_whole(monkeypatch):
    monkeypatch.setattr(draws, "CPU_BLOCK", 7)  # many blocks, with odd starts inside pairs and blocks
    whole = normal(101, seed=4, stream=2)
    for start, n in ((0, 101), (1, 13), (13, 1), (14, 30), (99, 2), (50, 0)):
        assert torch.equal(normal(n, seed=4, stream=2, start=start), whole[start:start + n])
    monkeypatch.setattr(draws, "CPU_BLOCK", 1 << 17)
    assert torch.equal(normal(101, seed=4, stream=2), whole)  # the block size changes nothing


def test_normal_and_uniform_distributions():
    z = normal(400_000, seed=11).numpy()
    assert abs(z.mean()) < 5 / np.sqrt(len(z))
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / len(z))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    u = uniform(400_000, seed=11, stream=3).numpy()
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_seeds_streams_and_neighbours_are_uncorrelated():
    n = 200_000
    a = normal(n, seed=0).numpy()
    bound = 5 / np.sqrt(n)
    for other in (normal(n, seed=1), normal(n, seed=0, stream=1), normal(n, seed=2**32)):
        assert abs(np.corrcoef(a, other.numpy())[0, 1]) < bound
    assert abs(np.corrcoef(a[::2], a[1::2])[0, 1]) < 2 * bound  # the two normals of one Box-Muller pair
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < bound


def test_dtype_rounds_the_float64_draw():
    assert torch.equal(normal(1000, seed=3, dtype=torch.float32), normal(1000, seed=3).float())


def test_bad_arguments():
    with pytest.raises(ValueError):
        normal(-1, seed=0)
    with pytest.raises(ValueError):
        normal(10, seed=0, start=2**33)


@pytest.mark.gpu
def test_cuda_draws_the_cpus_numbers():
    cpu = normal(300_001, seed=7, stream=5, start=3)
    gpu = normal(300_001, seed=7, stream=5, start=3, device="cuda").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-14, atol=1e-14)
    assert torch.equal(uniform(1000, seed=7, device="cuda").cpu(), uniform(1000, seed=7))
    assert torch.equal(sign_columns(5000, seed=7, streams=[1, 3], start=9, device="cuda").cpu(),
                       sign_columns(5000, seed=7, streams=[1, 3], start=9))


def test_signs(monkeypatch):
    s = signs(100_000, seed=2)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 5 / np.sqrt(len(s))
    b = (s[:-1] > 0).double().numpy()  # neighbouring bits of one hash are independent
    assert abs(np.corrcoef(b[:-1], b[1:])[0, 1]) < 5 / np.sqrt(len(b))
    monkeypatch.setattr(draws, "CPU_BLOCK", 40)
    assert torch.equal(signs(70, seed=2, start=29), s[29:99])
    # Hutch++'s row blocks: every stream's stretch at once, the same numbers
    cols = sign_columns(1000, seed=2, streams=[0, 5, 9], start=77)
    assert cols.shape == (3, 1000) and torch.equal(cols[0], s[77:1077])
    assert torch.equal(cols[2], signs(1000, seed=2, stream=9, start=77))
