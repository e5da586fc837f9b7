"""Issue 23: the training-time monitor. It does no harm (bitwise the same training with and without it), its
lambda_max is what `landscape hessian` says at a checkpoint of that step, its file is the trajectory schema that a
report draws, a crash leaves a readable file and a restarted run resumes it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest
import torch

from conftest import cli, import_from
from landscape.errors import LandscapeError
from landscape.analyses.monitor import MEASURES, Monitor, log_spaced
from landscape.report.contents import RunContents, summary_rows

NET = textwrap.dedent("""
    import torch

    class Net(torch.nn.Module):
        '''A small CNN with BatchNorm and dropout: both touch state or the global RNG while training.'''

        def __init__(self, classes=3):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.drop = torch.nn.Dropout(0.2)
            self.head = torch.nn.Linear(4 * 6 * 6, classes)

        def forward(self, x):
            return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))
""")


@pytest.fixture(scope="module")
def net_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "net.py").write_text(NET)
    return d, import_from(d, "net")


def data(n=96, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def train(net, opt_name, steps, monitor=None, dtype=torch.float32):
    """Minibatch training whose batches and dropout masks come from the global RNG."""
    torch.manual_seed(1)
    np.random.seed(1)
    model = net.Net().to(dtype)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2))
    X, y = data(dtype=dtype)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (16,))
        loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor(model).step(step, optimizer=opt)
    return model, opt


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_training_is_bitwise_the_same_with_the_monitor(net_module, tmp_path, opt_name):
    _, net = net_module
    plain, plain_opt = train(net, opt_name, 12)
    rng_plain = torch.get_rng_state(), np.random.get_state()[1].copy()
    made = []

    def monitor(model):
        if not made:
            made.append(Monitor(model, "cross_entropy", data(), every=4, measures=MEASURES,
                                path=tmp_path / "run.h5", probe_size=32, trace_matvecs=9, noise_samples=4))
        return made[0]

    watched, watched_opt = train(net, opt_name, 12, monitor)
    made[0].close()
    assert watched.training  # its train/eval flag untouched
    for (n, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), n  # weights and BatchNorm statistics (and its batch counter)
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p.grad, q.grad)
    for sa, sb in zip(plain_opt.state.values(), watched_opt.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the global RNGs went on exactly as without the monitor
    assert torch.equal(rng_plain[0], torch.get_rng_state()) and np.array_equal(rng_plain[1], np.random.get_state()[1])
    with h5py.File(tmp_path / "run.h5") as f:
        g = f["trajectory"]
        assert g["step"][()].tolist() == [4, 8, 12]
        assert all(np.isfinite(g[k][()]).all() for k in ("sharpness", "trace", "grad_norm", "gsnr_mean",
                                                          "b_noise", "m_coherence", "distance"))
        assert g["sharpness_kind"][()].astype(str).tolist() == ["hessian" if opt_name == "sgd" else "preconditioned"] * 3
        # the threshold of the optimizer read live: (2 + 2 beta)/eta, or Adam's (2 + 2 b1)/((1 - b1) eta)
        assert g["threshold"][0] == pytest.approx(3.8 / 0.05 if opt_name == "sgd" else 3.8 / (0.1 * 1e-2))


def test_lambda_max_equals_landscape_hessian_at_that_step(net_module, tmp_path):
    d, net = net_module
    X, y = data(dtype=torch.float64)
    torch.save({"X": X, "y": y}, d / "probe.pt")
    saved = {}

    def monitor(model):
        if "m" not in saved:
            saved["m"] = Monitor(model, "cross_entropy", (X, y), every=5, probe_size=len(X), tol=1e-10,
                                 max_matvec=200, path=tmp_path / "run.h5")
        return saved["m"]

    model, _ = train(net, "sgd", 10, monitor, dtype=torch.float64)
    saved["m"].close()
    torch.save(model.state_dict(), tmp_path / "step10.pt")
    r = cli("hessian", str(tmp_path / "step10.pt"), "--model", f"{d / 'net.py'}:Net", "--data", str(d / "probe.pt"),
            "--dtype", "float64", "--top-k", "1", "--no-trace", "--json", "-o", str(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    expected = json.loads(r.stdout)["curvature"]["eigenvalues"][0]
    with h5py.File(tmp_path / "run.h5") as f:
        assert f["trajectory/step"][-1] == 10
        assert abs(f["trajectory/sharpness"][-1] - expected) <= 1e-6 * abs(expected)
        assert f["trajectory/sharpness_converged"][-1]


def test_a_warm_start_costs_fewer_products(net_module, tmp_path):
    _, net = net_module
    model = net.Net()
    with Monitor(model, "cross_entropy", data(), every=1, path=tmp_path / "run.h5", tol=1e-4) as mon:
        first = mon.check(0)
        again = mon.check(1)  # the same weights: started from the eigenvector just found
    assert again["sharpness"] == pytest.approx(first["sharpness"], rel=1e-4)
    assert again["sharpness_matvecs"] < first["sharpness_matvecs"]


def test_max_overhead_skips_checks_it_cannot_pay_for(net_module, tmp_path):
    """Every row says what the monitor has cost so far; ``max_overhead`` skips due checks while that share is above
    it (a share no check fits in: only the first due step; one every check fits in: all of them)."""
    _, net = net_module
    mons = {}
    for share in (1e-9, 1e9):
        path = tmp_path / f"{share}.h5"
        def monitor(m):
            if share not in mons:
                mons[share] = Monitor(m, "cross_entropy", data(), every=1, path=path, measures=("grad_norm",),
                                      max_overhead=share)
            return mons[share]

        train(net, "sgd", 6, monitor=monitor)
        mons[share].close()
        with h5py.File(path) as f:
            g = f["trajectory"]
            assert (g["overhead"][()] > 0).all() and np.isfinite(g["overhead"][()]).all()
            assert g["step"][()].tolist() == ([1] if share < 1 else [1, 2, 3, 4, 5, 6])
            assert f.attrs["skipped_checks"] == (5 if share < 1 else 0) and f.attrs["max_overhead"] == share
    row = next(r for r in summary_rows(RunContents.read(tmp_path / "1e-09.h5")) if r.name == "monitor overhead")
    assert row.value > 0 and "5 due checks skipped for max_overhead 1e-09" in row.note
    with pytest.raises(LandscapeError, match="max_overhead=0"):
        Monitor(net.Net(), "cross_entropy", data(), path=tmp_path / "bad.h5", max_overhead=0)


def test_schedules():
    assert sorted(log_spaced(1000, per_decade=1)) == [0, 1, 10, 100, 1000]
    from landscape.analyses.monitor import _due

    assert [s for s in range(12) if _due(5)(s)] == [0, 5, 10]
    assert [s for s in range(12) if _due({1, 2, 7})(s)] == [1, 2, 7]
    assert [s for s in range(12) if _due(lambda s: s % 4 == 3)(s)] == [3, 7, 11]
    with pytest.raises(LandscapeError, match="every=0"):
        _due(0)


def test_bad_arguments_are_one_line_errors(net_module, tmp_path):
    _, net = net_module
    with pytest.raises(LandscapeError, match="unknown measure hessian"):
        Monitor(net.Net(), "cross_entropy", data(), measures=("hessian",), path=tmp_path / "a.h5")
    with pytest.raises(LandscapeError, match="empty"):
        Monitor(net.Net(), "cross_entropy", (torch.zeros(0, 1, 6, 6), torch.zeros(0)), path=tmp_path / "b.h5")
    with pytest.raises(LandscapeError, match="is a str"):
        Monitor(net.Net(), "cross_entropy", "digits", path=tmp_path / "c.h5")
    Monitor(net.Net(), "cross_entropy", data(), path=tmp_path / "d.h5").close()
    with pytest.raises(LandscapeError, match="already exists"):
        Monitor(net.Net(), "cross_entropy", data(), path=tmp_path / "d.h5")


def test_probe_from_a_dataset_or_loader_leaves_the_global_rng(net_module, tmp_path):
    _, net = net_module
    X, y = data()
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    model = net.Net()
    state = torch.get_rng_state()
    rows = []
    for i, source in enumerate((ds, loader, (X, y))):
        with Monitor(model, "cross_entropy", source, probe_size=40, path=tmp_path / f"{i}.h5") as mon:
            rows.append(mon.check(0))
            assert len(mon.X) == 40
    assert torch.equal(state, torch.get_rng_state())
    assert rows[0]["loss"] == rows[1]["loss"] == rows[2]["loss"]  # the same seeded probe whatever the source


def test_resume_after_a_restart_drops_the_abandoned_future(net_module, tmp_path):
    _, net = net_module
    model = net.Net()
    path = tmp_path / "run.h5"
    with Monitor(model, "cross_entropy", data(), every=10, path=path) as mon:
        for step in range(0, 31):
            mon.step(step)
    with Monitor(model, "cross_entropy", data(), every=10, path=path, resume=True) as mon:
        for step in range(20, 41):  # training restarted from a checkpoint of step 15
            mon.step(step)
    run = RunContents.read(path)
    a = run.trajectory.arrays
    assert a["step"].tolist() == [0, 10, 20, 30, 40]
    assert math.isnan(a["step_size"][2]) and a["distance"][0] == 0  # the origin kept from the first run
    assert len(run.trajectory.weight_norms["conv.weight"]) == 5


CRASH = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {d!r})
    import net
    from landscape.analyses.monitor import Monitor
    torch.manual_seed(0)
    model = net.Net()
    X, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = Monitor(model, "cross_entropy", (X, y), every=2, path={path!r})
    for step in range(1, 100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        mon.step(step, optimizer=opt)
        if step == 7:
            raise RuntimeError("the training crashed")
""")


def test_a_crash_leaves_a_readable_file_the_report_draws(net_module, tmp_path):
    d, _ = net_module
    path = tmp_path / "run.h5"
    r = subprocess.run([sys.executable, "-c", CRASH.format(d=str(d), path=str(path))], capture_output=True, text=True)
    assert r.returncode != 0 and "the training crashed" in r.stderr
    run = RunContents.read(path)
    assert run.trajectory.arrays["step"].tolist() == [2, 4, 6]
    assert run.trajectory.plane is None and "monitor" in run.attrs["source"]
    r = cli("report", str(path), "-o", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    figures = {p.name for p in (tmp_path / "rep" / "figures").iterdir()}
    assert {"trajectory_sharpness.png", "trajectory_distance.png", "trajectory_measures.png"} <= figures
    assert "grad_norm while training" in (tmp_path / "rep" / "index.html").read_text()


def test_edge_of_stability_shows_live(tmp_path):
    """Cohen et al. 2021's toy: full-batch GD on a tanh network fitting a Chebyshev polynomial. The sharpness rises
    to the stability threshold 2/eta and then hovers there while the loss keeps falling (lambda eta / 2 -> 1)."""
    torch.manual_seed(0)
    X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
    y = torch.cos(4 * torch.arccos(X))  # T_4
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                              torch.nn.Linear(32, 1)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Monitor(net, "mse", (X, y), every=250, path=tmp_path / "eos.h5", tol=1e-6) as mon:
        for step in range(2501):
            mon.step(step, optimizer=opt)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(X), y).backward()
            opt.step()
    a = RunContents.read(tmp_path / "eos.h5").trajectory.arrays
    ratio = a["sharpness"] * 0.1 / 2
    np.testing.assert_allclose(a["ratio"], ratio)
    assert ratio[0] < 0.7  # starts well below the threshold
    assert a["edge_of_stability"][1] and np.all(ratio[1:] > 0.85)  # sharpening reaches it within 250 steps ...
    assert np.all(np.abs(ratio[-5:] - 1) < 0.15)  # ... and stays at it (the dynamics there are chaotic: a margin)
    assert a["loss"][-1] < 1e-2 * a["loss"][0]  # while the loss goes on falling


def _columns(path) -> set[str]:
    with h5py.File(path) as f:
        return set(f["trajectory"]) | {f"attr {k}" for k in f["trajectory"].attrs}


def test_a_lightning_run_writes_the_same_schema(net_module, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from landscape.analyses.callbacks import lightning_callback

    _, net = net_module
    X, y = data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net.Net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    module = Module()
    mon = Monitor(module, "cross_entropy", (X, y), every=3, path=tmp_path / "pl.h5")
    trainer = pl.Trainer(max_steps=9, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[lightning_callback(mon)])
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16))
    assert mon._file is None  # closed at the end of training
    with Monitor(net.Net(), "cross_entropy", (X, y), every=3, path=tmp_path / "loop.h5") as plain:
        plain.check(0, optimizer=torch.optim.SGD(net.Net().parameters(), lr=0.05, momentum=0.9))
    assert _columns(tmp_path / "pl.h5") == _columns(tmp_path / "loop.h5")
    a = RunContents.read(tmp_path / "pl.h5").trajectory.arrays
    assert a["step"].tolist() == [3, 6, 9] and a["threshold"][0] == pytest.approx(3.8 / 0.05)


@pytest.mark.slow
def test_a_transformers_trainer_run_writes_the_same_schema(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from landscape.analyses.callbacks import hf_callback
    from landscape.io.hf import tokens

    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids, labels = tokens(n=48, vocab=32, context=16)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    mon = Monitor(model, "causal_lm", (ids, labels), every=2, probe_size=16, path=tmp_path / "hf.h5",
                  measures=("lambda_max", "grad_norm", "gsnr"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=1e-3, lr_scheduler_type="constant", report_to=[],
                                          save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[hf_callback(mon)]).train()
    with Monitor(model, "causal_lm", (ids, labels), path=tmp_path / "loop.h5", probe_size=16,
                 measures=("lambda_max", "grad_norm", "gsnr")) as plain:
        plain.check(0, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert _columns(tmp_path / "hf.h5") == _columns(tmp_path / "loop.h5")
    a = RunContents.read(tmp_path / "hf.h5").trajectory.arrays
    assert a["step"].tolist() == [2, 4]
    assert (a["sharpness_kind"] == "preconditioned").all()  # AdamW's state read through accelerate's wrapper
    assert np.isfinite(a["sharpness"]).all() and np.isfinite(a["gsnr_mean"]).all()


DDP = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from landscape.analyses.monitor import Monitor
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        net = torch.nn.parallel.DistributedDataParallel(model)
        shard = slice(rank * 64 // world, (rank + 1) * 64 // world)
    else:
        net, shard = model, slice(0, 64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = Monitor(net, "cross_entropy", (X, y), every=2, path=sys.argv[1], measures=("lambda_max", "grad_norm"),
                  tol=1e-10, max_matvec=200)
    for step in range(1, 5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[shard]), y[shard]).backward()
        opt.step()
        mon.step(step, optimizer=opt)
    mon.close()
    if ddp:
        dist.destroy_process_group()
        # torch 2.13's DDP on gloo (CPU) aborts in its C++ teardown now and then ("terminate called without an
        # active exception"; 2 of 8 runs of this script without any monitor): leave without it, all written
        os._exit(0)
""")


@pytest.mark.slow
def test_under_ddp_rank_0_writes_what_one_process_writes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.h5")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(tmp_path / "two.h5")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    a = RunContents.read(tmp_path / "one.h5").trajectory.arrays
    b = RunContents.read(tmp_path / "two.h5").trajectory.arrays
    assert b["step"].tolist() == [2, 4]
    for k in ("sharpness", "grad_norm", "loss", "distance"):  # data-parallel sums: equal to round-off
        np.testing.assert_allclose(b[k], a[k], rtol=1e-9, err_msg=k)


def test_parameter_groups_with_different_learning_rates_have_no_threshold(net_module, tmp_path):
    """Layer-wise learning rates: no single 2/lr bounds the whole Hessian, so the threshold (and the ratio) is NaN,
    said once; groups that agree keep the threshold of their common lr."""
    _, net = net_module
    torch.manual_seed(0)
    model = net.Net()
    head = list(model.head.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    for lrs, finite in (((0.05, 0.05), True), ((0.05, 0.01), False)):
        opt = torch.optim.SGD([{"params": rest, "lr": lrs[0]}, {"params": head, "lr": lrs[1]}], momentum=0.9)
        mon = Monitor(model, "cross_entropy", data(), every=1, path=tmp_path / f"{lrs[1]}.h5",
                      measures=("lambda_max",))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = [mon.check(s, optimizer=opt) for s in (1, 2)]
        mon.close()
        said = [w for w in caught if "parameter groups differ" in str(w.message)]
        assert len(said) == (0 if finite else 1)
        for row in rows:
            assert math.isfinite(row["sharpness"]) and row["lr"] == 0.05
            assert (row["threshold"] == pytest.approx(3.8 / 0.05)) if finite else math.isnan(row["threshold"])
            assert math.isfinite(row["ratio"]) == finite
