"""Models nobody here wrote: user specs that import their neighbours, errors blamed on the right party, outputs
that are not tensors, plain state dicts compared, --no-strict, runs outside a terminal, frozen BatchNorm checked."""

import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from conftest import EXAMPLES, cli, import_from

NET = textwrap.dedent("""
    import torch
    from helpers import WIDTH          # a module beside this file

    class Net(torch.nn.Module):
        def __init__(self, width=WIDTH):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU())
            self.head = torch.nn.Linear(width, 10)

        def forward(self, x):
            return {"features": self.body(x), "logits": self.head(self.body(x))}
""")


def user_dir(tmp_path):
    """A user's folder: net.py (importing helpers.py beside it, returning a dict), two plain state dicts, data."""
    d = tmp_path / "user"
    d.mkdir()
    (d / "helpers.py").write_text("WIDTH = 16\n")
    (d / "net.py").write_text(NET)
    net = import_from(d, "net")
    from landscape.io.data import digits

    X, y = digits("train")
    X, y = X[:300], y[:300]
    torch.save({"X": X, "y": y}, d / "d.pt")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = net.Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(X)["logits"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), d / f"m{seed}.pt")
    return d


def one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "bug in landscape" not in r.stderr and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_compare_plain_state_dicts_then_their_run_files(tmp_path):
    d = user_dir(tmp_path)
    specs = ["--model", f"{d / 'net.py'}:Net", "--data", str(d / "d.pt")]
    fast = ["--steps", "3", "--alpha-steps", "5", "--no-sharpness", "--no-coherence", "--no-report"]
    r = cli("compare", str(d / "m0.pt"), str(d / "m1.pt"), *specs, *fast, "--align", "-o", str(tmp_path / "c"),
            "--json")
    assert r.returncode == 0, r.stderr
    pair = json.loads(r.stdout)["pairs"]["0_1"]
    assert pair["loss_barrier"] <= pair["loss_barrier_unaligned"] + 1e-9
    runs = [tmp_path / "c" / f"m{i}" / "run.h5" for i in (0, 1)]
    # the run files alone: model and data specs are read back from them, their analyses reused
    r = cli("compare", *map(str, runs), *fast, "-o", str(tmp_path / "c2"), "--json")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "c" / "compare.h5") as a, h5py.File(tmp_path / "c2" / "compare.h5") as b:
        np.testing.assert_array_equal(a["compare/metrics/loss/value"][()], b["compare/metrics/loss/value"][()])


def test_a_module_spec_sees_the_current_directory(tmp_path):
    d = user_dir(tmp_path)
    r = cli("hessian", str(d / "m0.pt"), "--model", "net:Net", "--data", "d.pt", "--top-k", "1", "--no-trace",
            "--json", "-o", str(tmp_path / "h"), cwd=d)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["curvature"]["eigenvalues"][0] > 0


@pytest.mark.parametrize("case", ["import_raises", "env_runtime", "factory_raises", "missing_package"])
def test_errors_in_user_code_blame_the_spec(tmp_path, case):
    d = user_dir(tmp_path)
    (d / "broken.py").write_text(textwrap.dedent("""
        import torch
        if MODE == "import_raises":
            raise ValueError("config file models.yaml not found")
    """).replace("MODE", repr(case)) + textwrap.dedent("""
        def factory():
            raise RuntimeError("operator torchvision::nms does not exist")
        def builder():
            raise KeyError("depth")
        if MODE == "env_runtime":
            factory()
    """).replace("MODE", repr(case)))
    spec = {"import_raises": f"{d / 'broken.py'}:factory", "env_runtime": "broken:factory",
            "factory_raises": f"{d / 'broken.py'}:builder", "missing_package": "nosuchpkg_xyz.models:resnet18"}[case]
    r = cli("scan", str(d / "m0.pt"), "--model", spec, "--data", str(d / "d.pt"), "-o", str(tmp_path / "r"), cwd=d)
    expect = {"import_raises": ["ValueError", "models.yaml"], "env_runtime": ["RuntimeError", "nms"],
              "factory_raises": ["KeyError", "depth"], "missing_package": ["nosuchpkg_xyz"]}[case]
    one_error_line(r, spec, *expect)


def test_a_pickled_module_whose_class_is_gone(tmp_path):
    d = user_dir(tmp_path)
    code = (f"import sys, torch; sys.path.insert(0, {str(d)!r}); import net; "
            f"torch.save(net.Net(), {str(tmp_path / 'whole.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    r = cli("scan", str(tmp_path / "whole.pt"), "--trust-pickle", "--data", str(d / "d.pt"), "-o",
            str(tmp_path / "r"), cwd=tmp_path)  # net.py is not importable from here
    one_error_line(r, "class cannot be imported", "ModuleNotFoundError", "net")
    assert "corrupt" not in r.stderr


def test_model_outputs_are_reduced_by_one_rule():
    from landscape.problem import Problem

    class Tupled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), "aux"

    torch.manual_seed(0)
    net = Tupled()
    X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    pb = Problem(net, X, y, torch.nn.functional.cross_entropy)
    assert abs(pb.evaluate().loss - torch.nn.functional.cross_entropy(net.lin(X), y).item()) < 1e-6
    assert isinstance(net(X), tuple)  # the user's model is left as it was

    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return {"hidden": "none"}

    from landscape.errors import LandscapeError

    with pytest.raises(LandscapeError, match="holds no output tensor"):
        Problem(Opaque(), X, y, torch.nn.functional.cross_entropy).evaluate()


def test_strict_and_no_strict_loading(tmp_path):
    d = user_dir(tmp_path)
    sd = torch.load(d / "m0.pt")
    del sd["head.bias"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "partial.pt")
    specs = ["--model", f"{d / 'net.py'}:Net", "--data", str(d / "d.pt"), "--top-k", "1", "--no-trace"]
    r = cli("hessian", str(tmp_path / "partial.pt"), *specs, "-o", str(tmp_path / "a"))
    one_error_line(r, "head.bias", "extra.weight", "--no-strict")
    r = cli("hessian", str(tmp_path / "partial.pt"), *specs, "--no-strict", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "head.bias" in r.stderr and "extra.weight" in r.stderr  # named in the warning


def test_outside_a_terminal_progress_comes_early_and_tables_keep_digits(tmp_path):
    ckpt = EXAMPLES / "mlp_sgd_s2000.pt"
    proc = subprocess.Popen([sys.executable, "-m", "landscape", "scan", str(ckpt), "--steps", "61", "--no-report",
                             "--name", "a_slice_name_long_enough_to_be_cut_on_an_eighty_column_terminal_xxxxxxxx",
                             "-o", str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        running = proc.poll() is None
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert first.startswith("a_slice_name") and "/3721" in first, first
    assert running  # the line came while the scan was still going
    assert "3721/3721" in err and "elapsed" in err
    assert "a_slice_name_long_enough_to_be_cut_on_an_eighty_column_terminal_xxxxxxxx" in out
    with h5py.File(tmp_path / "r" / "run.h5") as f:
        origin = f"{f['slices/a_slice_name_long_enough_to_be_cut_on_an_eighty_column_terminal_xxxxxxxx'].attrs['loss_at_origin']:.6g}"
    assert origin in out and "…" not in out


BN_NET = textwrap.dedent("""
    import torch

    def bn_net():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))
""")


def test_frozen_batchnorm_far_from_train_mode_is_flagged(tmp_path):
    from landscape.io.data import digits
    from landscape.io.specs import resolve

    (tmp_path / "m.py").write_text(BN_NET)
    torch.manual_seed(0)
    net = resolve(f"{tmp_path / 'm.py'}:bn_net", what="model")()
    X, y = digits("train")
    net[1].momentum = 0.001  # running averages that barely move in a few steps: a briefly trained net
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(net(X[:256]), y[:256])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), tmp_path / "bn.pt")
    r = cli("hessian", str(tmp_path / "bn.pt"), "--model", f"{tmp_path / 'm.py'}:bn_net", "--data", "digits",
            "--top-k", "1", "--no-trace", "-o", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "--bn recompute" in r.stderr and "frozen BatchNorm" in r.stderr
    with h5py.File(tmp_path / "r" / "run.h5") as f:
        frozen, batch = f.attrs["bn_check_eval_loss"], f.attrs["bn_check_train_loss"]
    assert frozen > 2 * batch and frozen - batch > 0.1


@pytest.mark.parametrize("name", ["mlp_sgd_s2000.pt", "cnn_adam_s2000.pt"])
def test_shipped_examples_pass_the_batchnorm_check(tmp_path, name):
    r = cli("hessian", str(EXAMPLES / name), "--top-k", "1", "--no-trace", "-o", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "BatchNorm" not in r.stderr
    with h5py.File(tmp_path / "r" / "run.h5") as f:
        assert np.isnan(f.attrs["bn_check_eval_loss"]) == name.startswith("mlp")  # no BatchNorm: not measured


def _vision(module):
    try:
        return __import__(module)
    except Exception as err:  # noqa: BLE001 - a CUDA torchvision beside a CPU torch fails at import, not with ImportError
        pytest.skip(f"{module} does not import here ({type(err).__name__}: {str(err)[:80]})")


@pytest.mark.parametrize("spec,args,module", [
    ("torchvision.models:resnet18", ["num_classes=10"], "torchvision"),
    ("timm:create_model", ["model_name='resnet10t'", "num_classes=10", "in_chans=1"], "timm"),
])
def test_vision_factories_where_they_import(tmp_path, spec, args, module):
    _vision(module)
    from landscape.io.specs import Spec, call_spec, parse_kv

    model = call_spec(Spec(spec, parse_kv(args)), what="model")
    torch.save(model.state_dict(), tmp_path / "v.pt")
    X = torch.randn(8, 3 if module == "torchvision" else 1, 32, 32)
    torch.save({"X": X, "y": torch.randint(0, 10, (8,))}, tmp_path / "d.pt")
    r = cli("hessian", str(tmp_path / "v.pt"), "--model", spec, *sum((["--model-arg", a] for a in args), []),
            "--data", str(tmp_path / "d.pt"), "--top-k", "1", "--no-trace", "-o", str(tmp_path / "r"), "--json")
    assert r.returncode == 0, r.stderr


def test_every_loading_command_takes_the_same_model_data_loss_options():
    import typer.main

    from landscape_cli.main import app
    from landscape_cli.options import OPTIONS

    group = typer.main.get_command(app)
    shared = None
    for name in ("scan", "hessian", "sharpness", "coherence", "compare", "trajectory"):
        params = {p.name: (tuple(p.opts), tuple(p.secondary_opts), p.default) for p in group.commands[name].params
                  if p.name in OPTIONS}
        assert set(params) == set(OPTIONS), name
        assert shared is None or params == shared, name
        shared = params
    assert shared["strict"][:2] == (("--strict",), ("--no-strict",)) and shared["model_arg"][0] == ("--model-arg",)
