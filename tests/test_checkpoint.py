import os
import pickle

import pytest
import torch

from conftest import relu_mlp
from landscape import LandscapeError, apply_state_dict, load_checkpoint, save_checkpoint
from landscape.io.checkpoint import check_finite
from landscape.io.specs import Spec, call_spec


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": relu_mlp().state_dict(), "payload": Evil(str(marker))}, path)
    with pytest.raises(LandscapeError, match="--trust-pickle"):
        load_checkpoint(path)
    assert not marker.exists()
    # a raw pickle (legacy format) is refused as well
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Evil(str(marker))))
    with pytest.raises(LandscapeError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    net = relu_mlp()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(LandscapeError, match="--trust-pickle"):
        load_checkpoint(path)
    ck = load_checkpoint(path, trust_pickle=True)
    assert ck.format == "pickled-module" and isinstance(ck.module, torch.nn.Module)


def test_torchscript_needs_trust(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(relu_mlp(), torch.randn(2, 4, dtype=torch.float64)), path)
    with pytest.raises(LandscapeError, match="TorchScript"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_pickle=True).format == "torchscript"


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_training_checkpoint_keys_and_optimizer(tmp_path, key):
    net = relu_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    path = tmp_path / "train.pt"
    torch.save({key: net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)
    ck = load_checkpoint(path)
    assert ck.state_key == key and ck.step == 3
    assert ck.optimizer["name"] == "SGD"
    assert ck.optimizer["hyperparameters"]["lr"] == 0.05
    assert ck.optimizer["hyperparameters"]["momentum"] == 0.9


def test_state_key_override_and_missing(tmp_path):
    net = relu_mlp()
    path = tmp_path / "nested.pt"
    torch.save({"ema": {"weights": net.state_dict()}, "other": 1}, path)
    with pytest.raises(LandscapeError, match="--state-key"):
        load_checkpoint(path)
    assert load_checkpoint(path, state_key="ema.weights").state_key == "ema.weights"
    with pytest.raises(LandscapeError, match="not in"):
        load_checkpoint(path, state_key="nope")


def test_lightning_prefix_stripped(tmp_path):
    net = relu_mlp()
    adam = torch.optim.Adam(net.parameters(), lr=3e-4)
    path = tmp_path / "epoch=1.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "global_step": 120,
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
                "optimizer_states": [adam.state_dict()]}, path)
    ck = load_checkpoint(path)
    assert ck.format == "lightning" and ck.step == 120
    assert ck.optimizer["name"] == "Adam" and ck.optimizer["hyperparameters"]["lr"] == 3e-4
    fresh = relu_mlp(seed=9)
    assert apply_state_dict(fresh, ck.state_dict) == "model."
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = relu_mlp()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    ck = load_checkpoint(path)
    assert ck.format == "safetensors" and set(ck.state_dict) == set(net.state_dict())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:40])
    with pytest.raises(LandscapeError, match="safetensors"):
        load_checkpoint(bad)


def test_corrupt_truncated_empty(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(relu_mlp().state_dict(), good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    empty = tmp_path / "empty.pt"
    empty.touch()
    for p in (trunc, junk, empty):
        with pytest.raises(LandscapeError, match="corrupt|truncated|empty|not a readable"):
            load_checkpoint(p)
    with pytest.raises(LandscapeError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatch_reported_by_name():
    state = relu_mlp((4, 8, 3)).state_dict()
    with pytest.raises(LandscapeError) as e:
        apply_state_dict(relu_mlp((4, 9, 3)), state)
    assert "shape mismatch: 0.weight checkpoint (8, 4) vs model (9, 4)" in str(e.value)
    with pytest.raises(LandscapeError) as e:
        apply_state_dict(relu_mlp((4, 8, 8, 3)), state)
    assert "missing from checkpoint: 4.bias, 4.weight" in str(e.value)
    renamed = {k.replace("2.", "head."): v for k, v in state.items()}
    with pytest.raises(LandscapeError) as e:
        apply_state_dict(relu_mlp(), renamed)
    assert "not in model: head.bias, head.weight" in str(e.value)


def test_nan_weights_named():
    state = relu_mlp().state_dict()
    state["2.weight"][0, 0] = float("nan")
    with pytest.raises(LandscapeError, match=r"2.weight \(1 of 24\)"):
        check_finite(state)


def test_save_checkpoint_manifest_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.8, 0.99), weight_decay=0.1)
    p = save_checkpoint(tmp_path / "c.pt", net, model="torch.nn:Linear",
                        model_args={"in_features": 3, "out_features": 2}, data="digits", loss="mse",
                        optimizer=opt, step=11)
    ck = load_checkpoint(p)
    assert ck.format == "landscape" and ck.step == 11
    assert ck.manifest["model"] == {"target": "torch.nn:Linear", "args": {"in_features": 3, "out_features": 2}}
    assert ck.optimizer["name"] == "Adam"
    assert ck.optimizer["hyperparameters"]["betas"] == [0.8, 0.99]
    assert ck.optimizer["hyperparameters"]["lr"] == 2e-3


def test_checkpoint_specs_cannot_name_arbitrary_callables(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(LandscapeError, match="not an nn.Module class"):
        call_spec(Spec("os:system", {"command": f"touch {marker}"}), what="model", from_checkpoint=True)
    with pytest.raises(LandscapeError, match="file path"):
        call_spec(Spec(f"{tmp_path}/m.py:f"), what="model", from_checkpoint=True)
    assert not marker.exists()
    # the same spec typed by the user is the user's decision
    assert call_spec(Spec("torch.nn:Linear", {"in_features": 2, "out_features": 1}), what="model",
                     from_checkpoint=True).in_features == 2
