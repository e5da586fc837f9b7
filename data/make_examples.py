"""Train the example models on the shipped digits and write self-describing checkpoints.

    python data/make_examples.py [--out data/examples]

For each model (``MLP``, ``SmallCNN`` with BatchNorm) and optimizer (SGD with momentum, Adam,
SAM over SGD) it trains on the ``digits`` train split with mini-batches of 64 and saves a
checkpoint at each step in ``STEPS`` via :func:`landscape.save_checkpoint`: the manifest names
the model class, the data, the loss, the optimizer with its hyperparameters (lr included) and
the step, and the optimizer's state dict is saved too. Everything is seeded and runs on one
CPU thread, so the files are reproducible.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from landscape import save_checkpoint
from landscape.io.data import digits
from landscape_data.models import MLP, SmallCNN

STEPS = (0, 100, 500, 2000)
BATCH = 64
MODELS: dict[str, tuple[type[nn.Module], dict]] = {"mlp": (MLP, {}), "cnn": (SmallCNN, {})}


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021) over a base optimizer.

    Each step takes two gradients: at ``w`` to find ``e = rho g / ||g||``, then at ``w + e``,
    whose gradient the base optimizer applies at ``w``. Use :meth:`step` with a closure that
    zeroes the gradients, computes the loss and calls ``backward``.
    """

    def __init__(self, params: Iterable[nn.Parameter], base: type[torch.optim.Optimizer] = torch.optim.SGD,
                 rho: float = 0.05, **base_kwargs: float) -> None:
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base = base(self.param_groups, **base_kwargs)
        self.param_groups = self.base.param_groups
        self.state = self.base.state  # momentum buffers live in the base; share them so state_dict() has them

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        with torch.enable_grad():
            loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        gnorm = torch.norm(torch.stack([gr.norm() for gr in grads]))
        perturb: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            scale = group["rho"] / (gnorm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    e = p.grad * scale
                    p.add_(e)
                    perturb.append((p, e))
        with torch.enable_grad():
            closure()
        for p, e in perturb:
            p.sub_(e)
        self.base.step()
        return loss


def make_optimizer(name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "sam":
        return SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    raise ValueError(name)


def train(model_name: str, opt_name: str, out: Path) -> None:
    torch.manual_seed(0)
    cls, kwargs = MODELS[model_name]
    net = cls(**kwargs)
    opt = make_optimizer(opt_name, net.parameters())
    X, y = digits("train")
    g = torch.Generator().manual_seed(1)
    loss_fn = nn.functional.cross_entropy
    step, order = 0, torch.randperm(len(y), generator=g)
    pos = 0
    while True:
        if step in STEPS:
            save_checkpoint(out / f"{model_name}_{opt_name}_s{step:04d}.pt", net,
                            model=f"landscape_data.models:{cls.__name__}", model_args=kwargs,
                            data="digits", data_args={"split": "train"}, loss="cross_entropy",
                            optimizer=opt, step=step)
        if step == STEPS[-1]:
            break
        if pos + BATCH > len(order):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        net.train()

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(net(X[idx]), y[idx])
            loss.backward()
            return loss

        if isinstance(opt, SAM):
            opt.step(closure)
        else:
            closure()
            opt.step()
        step += 1
    net.eval()
    with torch.no_grad():
        acc = (net(X).argmax(1) == y).float().mean().item()
    print(f"{model_name}/{opt_name}: train accuracy {acc:.3f} after {step} steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "examples")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for m in MODELS:
        for o in ("sgd", "adam", "sam"):
            train(m, o, args.out)


if __name__ == "__main__":
    main()
