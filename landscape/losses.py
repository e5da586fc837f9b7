"""Loss functions by name.

Every loss is a callable ``loss(output, target) -> scalar`` that returns the **mean over the
batch**, like ``torch.nn.functional`` losses with their default reduction. The Problem weights
each chunk of the evaluation set by its sample count, so the full-data loss is
``L = (1/n) sum_i l_i`` however the data is chunked.

* ``cross_entropy``: ``F.cross_entropy(output, target)`` on integer class targets.
* ``mse``: ``F.mse_loss(output, target)``, the mean over samples *and* output dimensions, so
  for a linear model ``f(x) = W x`` its Hessian is ``2 X^T X / (n d_out)`` (``torch.nn.MSELoss``).
* ``module:callable`` or ``file.py:callable``: any callable with that signature.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import LandscapeError
from .specs import resolve

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BUILTIN_LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}


def default_loss_name(y: torch.Tensor) -> str:
    """``cross_entropy`` for integer class labels, ``mse`` for real-valued targets."""
    return "mse" if y.is_floating_point() else "cross_entropy"


def resolve_loss(name: str, *, from_checkpoint: bool = False) -> LossFn:
    if name in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[name]
    if ":" not in name:
        raise LandscapeError(f"loss {name!r} is unknown",
                             hint=f"use one of {', '.join(BUILTIN_LOSSES)} or module:callable")
    return resolve(name, what="loss", from_checkpoint=from_checkpoint)


def top1_correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of samples whose arg-max class equals the integer target."""
    return (output.argmax(dim=-1) == target).sum()
