"""The CUDA path: the same numbers as on the CPU, lowered precision with its error measured, the dry run's measured
peak memory. Marked ``gpu``: skipped where torch sees no CUDA device (conftest.py)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import blobs, cli, relu_mlp
from landscape import Problem
from landscape.analyses.directions import random_directions

pytestmark = pytest.mark.gpu


def problems_agree(device: str) -> None:
    """Slice points (in-place with the input-layer shortcut, and vmap), gradient and HVP on ``device`` equal the
    CPU's in float64."""
    net, (X, y) = relu_mlp((4, 16, 3)), blobs(200)
    coeffs = np.array([[0.0, 0.0], [0.4, -0.3], [-1.0, 1.0]])
    ref = Problem(net, X, y, F.cross_entropy, strategy="inplace")
    dirs = random_directions(ref.theta0, 2, seed=0)
    v = {n: torch.randn_like(t) for n, t in ref.theta0.items()}
    want = ref.evaluate_points(coeffs, dirs)
    for strategy in ("inplace", "vmap"):
        pb = Problem(net, X, y, F.cross_entropy, strategy=strategy, device=device)
        got = pb.evaluate_points(coeffs, dirs)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-10)
        np.testing.assert_array_equal(got["accuracy"], want["accuracy"])
    assert pb.X.device.type == torch.device(device).type  # the data lives on the device
    g, h = pb.gradient(), pb.hvp(v)
    for n, t in ref.gradient().items():
        torch.testing.assert_close(g[n].cpu(), t, rtol=1e-10, atol=1e-12)
    for n, t in ref.hvp(v).items():
        torch.testing.assert_close(h[n].cpu(), t, rtol=1e-10, atol=1e-12)


def test_cuda_problem_matches_cpu():
    problems_agree("cuda")


def scan_lowered(tmp_path, mlp_ckpt, device: str, precision: str) -> dict:
    out = tmp_path / "run.h5"
    res = cli("scan", str(mlp_ckpt), "--device", device, "--precision", precision, "--steps", "9", "--no-hessian",
              "--no-sharpness", "--no-coherence", "--no-report", "--json", "-o", str(out))
    assert res.returncode == 0, res.stderr
    import h5py

    with h5py.File(out) as f:
        attrs = dict(f["slices/random_2d"].attrs)
    assert attrs["precision"] == precision and 0 <= attrs["precision_max_rel_error"] < 0.2
    assert attrs["input_layers"] == ""  # lowered forward passes take no shortcut
    return json.loads(res.stdout)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_scan_with_lowered_precision_states_its_error(tmp_path, mlp_ckpt, precision):
    scan_lowered(tmp_path, mlp_ckpt, "cuda", precision)


def test_cuda_dry_run_measures_peak_memory(mlp_ckpt):
    res = cli("scan", str(mlp_ckpt), "--device", "cuda", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert est["memory_bytes"] > 0 and "peak CUDA memory" in est["memory_note"]


def test_cuda_curvature_keeps_its_vectors_on_the_gpu():
    """On CUDA the Lanczos basis and the Hutch++ block live on the GPU (recorded ``cuda``), with the CPU's
    eigenvalues and trace in float64."""
    from landscape.analyses.hessian import CurvatureSettings, analyze_curvature

    net, (X, y) = relu_mlp((4, 16, 3)), blobs(200)
    settings = CurvatureSettings(top_k=3, tol=1e-9, trace_matvecs=30)
    cpu = analyze_curvature(Problem(net, X, y, F.cross_entropy), settings)
    gpu = analyze_curvature(Problem(net, X, y, F.cross_entropy, device="cuda"), settings)
    assert cpu.vector_storage == "memory" and gpu.vector_storage == "cuda"
    np.testing.assert_allclose(gpu.top.eigenvalues, cpu.top.eigenvalues, rtol=1e-9)
    assert abs(gpu.trace.estimate - cpu.trace.estimate) <= 1e-8 * abs(cpu.trace.estimate)


def test_cuda_sharpness_and_coherence_match_the_cpu():
    """Random numbers come from the counter-based generator (the same on both devices), so average-case and
    PAC-Bayes sharpness agree with the CPU's in float64; coherence keeps its accumulators on the GPU and agrees."""
    from landscape.analyses.coherence import CoherenceSettings, analyze_coherence
    from landscape.analyses.sharpness import SharpnessSettings, sharpness

    net, (X, y) = relu_mlp((4, 16, 3)), blobs(200)
    pbs = [Problem(net, X, y, F.cross_entropy, device=d) for d in ("cpu", "cuda")]
    for measure in ("average-case", "pacbayes"):
        a, b = (sharpness(pb, SharpnessSettings(measure=measure, rho=(0.1,))) for pb in pbs)
        np.testing.assert_allclose(b.value, a.value, rtol=1e-9)
    a, b = (analyze_coherence(pb, CoherenceSettings(noise_samples=0)) for pb in pbs)
    for k in ("m_coherence", "gradient_norm", "trace_sigma"):
        assert b.metrics[k] == pytest.approx(a.metrics[k], rel=1e-9)
