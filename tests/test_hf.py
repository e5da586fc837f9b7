"""HuggingFace transformers models as users have them: save_pretrained folders scanned with no model flags, their
losses against the models' own ``labels=`` loss, a Hessian against a dense one, tied weights, token data."""

import json
import warnings

import h5py
import numpy as np
import pytest
import torch

from conftest import cli

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from landscape.io.hf import causal_lm, masked_lm, token_arrays, tokens  # noqa: E402


def tiny_gpt2(vocab=256, width=64, layers=2, heads=4, positions=32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers,
                                  n_head=heads, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(cls=transformers.BertForSequenceClassification, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, **kw)
    return cls(cfg).eval()


def token_file(path, n=24, context=16, labels=None, pad_every=4):
    ids, _ = tokens(n=n, context=context)
    mask = torch.ones_like(ids)
    mask[::pad_every, context - 4:] = 0  # every fourth sequence padded: the mask must be honoured
    data = {"input_ids": ids, "attention_mask": mask, **({"labels": labels} if labels is not None else {})}
    torch.save(data, path)
    return ids, mask


def save(model, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


def test_gpt2_folder_scanned_with_no_model_flags(tmp_path):
    model = tiny_gpt2()
    folder = save(model, tmp_path / "gpt2")
    assert not (folder / "model.safetensors").stat().st_size == 0
    ids, mask = token_file(tmp_path / "tokens.pt")
    out = tmp_path / "run"
    r = cli("scan", str(folder), "--data", str(tmp_path / "tokens.pt"), "--steps", "3", "--dtype", "float64",
            "--no-sharpness", "-o", str(out), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    with torch.no_grad():  # the model's own loss on the same tokens, padding ignored
        ref = model.double()(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.item()
    with h5py.File(out / "run.h5") as f:
        assert f.attrs["checkpoint_format"] == "huggingface" and f.attrs["loss"] == "causal_lm"
        assert json.loads(f.attrs["model_spec"])["target"] == "landscape.hf:from_config"
        np.testing.assert_allclose(f["slices/random_2d/loss"][1, 1], ref, rtol=1e-6)
        assert f["coherence/grand"].shape == (24,) and np.all(np.isfinite(f["coherence/el2n"][()]))
    assert summary["n_parameters"] == sum(p.numel() for p in model.parameters())  # lm_head tied, counted once
    assert summary["curvature"]["converged"] == [True] * 5


def test_bert_classifier_folder_and_its_loss(tmp_path):
    model = tiny_bert(num_labels=3)
    folder = save(model, tmp_path / "bert")
    ids, _ = tokens(n=24, context=16)
    labels = ids[:, 0] % 3
    _, mask = token_file(tmp_path / "cls.pt", labels=labels)
    r = cli("scan", str(folder), "--data", str(tmp_path / "cls.pt"), "--steps", "3", "--dtype", "float64",
            "--no-sharpness", "--no-coherence", "-o", str(tmp_path / "run"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        ref = model.double()(ids, attention_mask=mask, labels=labels).loss.item()
    with h5py.File(tmp_path / "run" / "run.h5") as f:
        assert f.attrs["loss"] == "cross_entropy" and f.attrs["classification"]
        np.testing.assert_allclose(f["slices/random_2d/loss"][1, 1], ref, rtol=1e-6)
        assert "accuracy" in f["slices/random_2d"]


def test_lm_losses_equal_the_models_own():
    ids, _ = tokens(n=6, context=12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    gpt = tiny_gpt2(width=32).double()
    with torch.no_grad():
        out = gpt(ids, attention_mask=mask, labels=labels)
    # transformers computes its loss from float32 logits: equal to float32 rounding
    torch.testing.assert_close(causal_lm(out.logits, labels).float(), out.loss, rtol=1e-6, atol=0)
    bert = tiny_bert(transformers.BertForMaskedLM).double()
    mlm = torch.full_like(ids, -100)
    mlm[:, ::3] = ids[:, ::3]  # a third of the positions are predicted
    with torch.no_grad():
        out = bert(ids, labels=mlm)
    torch.testing.assert_close(masked_lm(out.logits, mlm), out.loss, rtol=1e-12, atol=0)


def test_hessian_of_a_tiny_gpt2_matches_the_dense_one(tmp_path):
    from landscape.problem.curvature import CurvatureOperator
    from landscape.linalg.lanczos import lanczos
    from landscape.problem import Problem
    from landscape.analyses.scan import build_model
    from landscape.io.checkpoint import load_checkpoint

    folder = save(tiny_gpt2(vocab=12, width=8, layers=1, heads=2, positions=8), tmp_path / "g")
    model, _, _ = build_model(load_checkpoint(folder), None)
    X, y = tokens(n=6, vocab=12, context=8)
    pb = Problem(model, X, y, causal_lm, dtype=torch.float64)
    names = pb.names
    shapes = [pb.theta0[n].shape for n in names]
    theta = torch.cat([pb.theta0[n].reshape(-1) for n in names])
    assert theta.numel() < 1500

    def f(vec):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = vec[i:i + s.numel()].reshape(s)
            i += s.numel()
        return causal_lm(pb.forward(params, X), y)

    dense = torch.autograd.functional.hessian(f, theta)
    exact = np.linalg.eigvalsh(dense.numpy())[::-1][:3]
    op = CurvatureOperator(pb)
    res = lanczos(op, op.n, k=3, which="LA", seed=0)
    np.testing.assert_allclose(res.eigenvalues, exact, rtol=1e-6)


def test_tied_weights_are_not_missing_and_stay_tied(tmp_path):
    from landscape.io.checkpoint import load_checkpoint
    from landscape.analyses.scan import build_model

    model = tiny_gpt2(width=32)
    folder = save(model, tmp_path / "g")
    ck = load_checkpoint(folder)
    assert "lm_head.weight" not in ck.state_dict and ck.format == "huggingface"
    built, _, _ = build_model(ck, None)
    assert built.lm_head.weight is built.transformer.wte.weight
    torch.testing.assert_close(built.transformer.wte.weight, model.transformer.wte.weight, rtol=0, atol=0)


def test_sharded_safetensors_and_pytorch_bin_folders(tmp_path):
    from landscape.io.checkpoint import load_checkpoint

    model = tiny_gpt2(width=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    sharded = load_checkpoint(tmp_path / "sharded")
    assert set(sharded.state_dict) == set(load_checkpoint(save(model, tmp_path / "one")).state_dict)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert load_checkpoint(tmp_path / "bin").format == "huggingface"
    (tmp_path / "sharded" / sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))[0]).unlink()
    r = cli("hessian", str(tmp_path / "sharded"), "--data", "tokens")
    assert r.returncode == 2 and "shard" in r.stderr and "Traceback" not in r.stderr


def test_token_files_pack_the_mask_and_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    X, y = token_arrays({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert X.shape == (2, 2, 4) and torch.equal(X[:, 0], ids) and torch.equal(X[:, 1], mask)
    assert torch.equal(y, torch.tensor([[5, 6, 7, 8], [1, 2, 3, -100]]))
    X, y = token_arrays({"input_ids": ids, "labels": torch.tensor([0, 1])})
    assert torch.equal(X, ids) and torch.equal(y, torch.tensor([0, 1]))


def test_every_analysis_runs_on_a_gpt2_folder(tmp_path):
    """sharpness, compare (two folders) and trajectory (a folder of folders) on HF checkpoints."""
    a, b = save(tiny_gpt2(width=32), tmp_path / "ckpts" / "a"), save(tiny_gpt2(width=32, seed=1), tmp_path / "ckpts" / "b")
    for folder, step in ((a, 200), (b, 100)):  # Trainer checkpoint folders: their step orders the trajectory
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    common = ["--data", "tokens", "--data-arg", "n=16", "--data-arg", "context=12"]
    r = cli("sharpness", str(a), *common, "--measure", "sam", "-o", str(tmp_path / "s"), "--json")
    assert r.returncode == 0, r.stderr
    r = cli("compare", str(a), str(b), *common, "--steps", "3", "--alpha-steps", "5", "--no-sharpness",
            "--no-coherence", "--no-report", "-o", str(tmp_path / "cmp"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"] == ["a", "b"]
    r = cli("trajectory", str(tmp_path / "ckpts"), *common, "--plane-steps", "3", "--no-report",
            "-o", str(tmp_path / "traj"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    assert [(c["checkpoint"], c["step"]) for c in json.loads(r.stdout)["checkpoints"]] == [("b", 100), ("a", 200)]


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(**{**dict(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                                           num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                           num_labels=3), **kw})
    return transformers.ViTForImageClassification(cfg).eval()


def test_vit_image_classifier_folder_scanned_with_no_model_flags(tmp_path):
    """A vision transformer as ``save_pretrained`` writes it, with an image file: the run's loss is the model's own
    ``labels=`` loss and its top eigenvalues are the dense Hessian's (attention, LayerNorm and GELU included)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from landscape.analyses.scan import build_model
    from landscape.io.checkpoint import load_checkpoint

    model = tiny_vit()
    folder = save(model, tmp_path / "vit")
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    torch.save({"X": X, "y": y}, tmp_path / "images.pt")
    r = cli("hessian", str(folder), "--data", str(tmp_path / "images.pt"), "--dtype", "float64", "--top-k", "3",
            "--tol", "1e-8", "-o", str(tmp_path / "run.h5"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)["curvature"]
    with torch.no_grad():
        ref = model.double()(X.double(), labels=y).loss.item()
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["checkpoint_format"] == "huggingface" and f.attrs["loss"] == "cross_entropy"
        assert f.attrs["classification"]
    built, _, _ = build_model(load_checkpoint(folder), None)
    names = [n for n, _ in built.named_parameters()]
    params = dict(built.double().named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    assert theta.numel() < 1500 and summary["n_parameters"] == theta.numel()

    def loss(vec):
        p, i = {}, 0
        for n in names:
            p[n], i = vec[i:i + params[n].numel()].reshape(params[n].shape), i + params[n].numel()
        return torch.nn.functional.cross_entropy(torch.func.functional_call(built, p, (X.double(),)).logits, y)

    np.testing.assert_allclose(loss(theta).item(), ref, rtol=1e-12)
    with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no second derivative
        exact = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, theta).numpy())[::-1][:3]
    np.testing.assert_allclose(summary["eigenvalues"], exact, rtol=1e-6)


@pytest.mark.parametrize("arch", ["vit", "dinov2-swiglu"])
def test_folders_load_as_from_pretrained_loads_them(tmp_path, arch):
    """transformers 5 renames a ViT's modules and splits DINOv2's fused SwiGLU weights when it loads a folder, whose
    files keep the old layout: the checkpoint's tensors are those ``from_pretrained`` gives the model."""
    from landscape.io.checkpoint import load_checkpoint

    if arch == "vit":
        model = tiny_vit()
    else:
        cfg = transformers.Dinov2Config(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, mlp_ratio=2, use_swiglu_ffn=True, num_labels=3)
        model = transformers.Dinov2ForImageClassification(cfg).eval()
    folder = save(model, tmp_path / arch)
    loaded = load_checkpoint(folder).state_dict
    ref = type(model).from_pretrained(folder).state_dict()
    assert set(loaded) == set(ref)
    for k, v in ref.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
