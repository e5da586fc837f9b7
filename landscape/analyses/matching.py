"""Weight matching: permute the hidden units of model B onto model A (Ainsworth et al. 2023, "Git Re-Basin").

Hidden units of a feed-forward network can be permuted without changing its function: permuting the
outputs of layer k (its weight rows, bias, the BatchNorm weight, bias and running statistics after it)
and the inputs of layer k+1 the same way. Weight matching picks, for each hidden layer k, the
permutation P_k that maximizes

    sum_l <W_l^A, P_l W_l^B P_{l-1}^T>

(biases and BatchNorm parameters included as extra columns) by coordinate descent: each P_k solved
exactly with ``scipy.optimize.linear_sum_assignment`` while the others are held, in random order, until
no permutation changes.

Supported: a chain of ``Linear`` / ``Conv1d|2d|3d`` layers (groups = 1), each optionally followed by a
BatchNorm, with any parameter-free modules between them (activations, pooling, flatten, dropout); a
convolution followed by a linear layer is matched through the flatten (channel-major, as
``flatten(1)`` of NCHW). Anything else (residual connections, attention, normalization over features,
embeddings) is refused with a clear message: :func:`permutation_spec` checks on real inputs that a
randomly permuted copy computes the same outputs before it is used.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import LandscapeError
from ..problem.outputs import tensor_outputs

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._BatchNorm,)
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Axis:
    """Tensor ``key`` is permuted along ``axis``, in blocks of ``block`` consecutive entries (a flatten)."""

    key: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Group:
    """One hidden layer's units: ``size`` of them; ``outputs`` are the tensors producing them, ``inputs``
    the next layer's weights reading them."""

    name: str
    size: int
    outputs: tuple[Axis, ...]
    inputs: tuple[Axis, ...]


@dataclass(frozen=True)
class PermutationSpec:
    groups: tuple[Group, ...]


def permutation_spec(model: nn.Module, example: torch.Tensor | None = None) -> PermutationSpec:
    """The hidden-unit permutations of ``model``; with ``example`` inputs, checked to leave outputs unchanged."""
    layers: list[tuple[str, nn.Module, str | None]] = []  # (name, layer, batchnorm after it)
    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False)]
        if isinstance(mod, _LAYERS):
            if getattr(mod, "groups", 1) != 1:
                raise _unsupported(f"grouped convolution {name}")
            layers.append((name, mod, None))
        elif isinstance(mod, _NORMS):
            prev = layers[-1] if layers else None
            if prev is None or prev[2] is not None or _out(prev[1]) != mod.num_features:
                raise _unsupported(f"BatchNorm {name} does not follow a layer with {mod.num_features} outputs")
            layers[-1] = (prev[0], prev[1], name)
        elif own:
            raise _unsupported(f"{type(mod).__name__} {name or '(root)'} has parameters weight matching cannot permute")
    if len(layers) < 2:
        raise _unsupported("fewer than two layers: nothing to permute")
    groups = []
    for (name, layer, bn), (nxt_name, nxt, _) in zip(layers[:-1], layers[1:]):
        size = _out(layer)
        n_in = nxt.in_features if isinstance(nxt, nn.Linear) else nxt.in_channels
        if n_in % size:
            raise _unsupported(f"{nxt_name} reads {n_in} inputs, not a multiple of {name}'s {size} outputs")
        block = n_in // size
        if block > 1 and not isinstance(nxt, nn.Linear):
            raise _unsupported(f"{nxt_name} reads {n_in} channels from {name}'s {size}")
        outs = [Axis(_key(name, "weight"), 0)]
        if layer.bias is not None:
            outs.append(Axis(_key(name, "bias"), 0))
        if bn is not None:
            bn_mod = model.get_submodule(bn)
            outs += [Axis(_key(bn, k), 0) for k in _BN_KEYS if getattr(bn_mod, k, None) is not None]
        groups.append(Group(name=name or "(root)", size=size, outputs=tuple(outs),
                            inputs=(Axis(_key(nxt_name, "weight"), 1, block),)))
    spec = PermutationSpec(tuple(groups))
    if example is not None:
        _check(model, spec, example)
    return spec


def _out(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _key(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _unsupported(why: str) -> LandscapeError:
    return LandscapeError(f"weight matching does not support this architecture: {why}",
                          hint="--align handles chains of Linear/Conv layers with optional BatchNorm (MLPs, plain "
                               "CNNs); compare without --align")


def _index(perm: np.ndarray, block: int) -> torch.Tensor:
    idx = (np.asarray(perm)[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return torch.as_tensor(idx, dtype=torch.long)


def apply_permutation(spec: PermutationSpec, state: Mapping[str, torch.Tensor],
                      perms: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``state`` with unit ``perm[i]`` of each group moved to position ``i`` (outputs and next inputs)."""
    out = dict(state)
    for g in spec.groups:
        p = perms[g.name]
        for ax in g.outputs + g.inputs:
            t = out[ax.key]
            out[ax.key] = t.index_select(ax.axis, _index(p, ax.block).to(t.device))
    return out


def _rows(t: torch.Tensor, ax: Axis) -> np.ndarray:
    """``t`` as a (units, features) matrix along ``ax`` (flatten blocks folded into the features)."""
    a = t.detach().to(torch.float64).cpu().numpy()
    a = np.moveaxis(a, ax.axis, 0)
    n = a.shape[0] // ax.block
    a = a.reshape(n, ax.block, *a.shape[1:])
    return a.reshape(n, -1)


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    *, max_iter: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Permutations that bring ``state_b`` closest to ``state_a`` (coordinate descent, exact per group)."""
    perms = {g.name: np.arange(g.size) for g in spec.groups}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for gi in rng.permutation(len(spec.groups)):
            g = spec.groups[gi]
            # every other group's permutation applied to B; this group's left as it is
            others = {k: (v if k != g.name else np.arange(g.size)) for k, v in perms.items()}
            b = apply_permutation(spec, state_b, others)
            sim = np.zeros((g.size, g.size))
            for ax in g.outputs + g.inputs:
                sim += _rows(state_a[ax.key], ax) @ _rows(b[ax.key], ax).T
            _, p = linear_sum_assignment(sim, maximize=True)
            if not np.array_equal(p, perms[g.name]):
                perms[g.name] = p
                changed = True
        if not changed:
            break
    return perms


def _check(model: nn.Module, spec: PermutationSpec, x: torch.Tensor) -> None:
    """Refuse ``spec`` unless a randomly permuted copy of ``model`` computes the same outputs on ``x``."""
    rng = np.random.default_rng(0)
    perms = {g.name: rng.permutation(g.size) for g in spec.groups}
    twin = tensor_outputs(copy.deepcopy(model)).eval()
    ref = tensor_outputs(copy.deepcopy(model)).eval()
    state = apply_permutation(spec, ref.state_dict(), perms)
    twin.load_state_dict(state)
    with torch.no_grad():
        a, b = ref(x), twin(x)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max().clamp(min=1))):
        raise _unsupported("a permuted copy does not compute the same outputs (residual connections or "
                           "layers used out of order?)")
