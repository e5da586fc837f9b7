"""Loss functions by name.

Every loss is a callable ``loss(output, target) -> scalar`` that returns the **mean over the
batch**, like ``torch.nn.functional`` losses with their default reduction. The Problem weights
each chunk of the evaluation set by its sample count, so the full-data loss is
``L = (1/n) sum_i l_i`` however the data is chunked.

* ``cross_entropy``: ``F.cross_entropy(output, target)`` on integer class targets.
* ``mse``: ``F.mse_loss(output, target)``, the mean over samples *and* output dimensions, so
  for a linear model ``f(x) = W x`` its Hessian is ``2 X^T X / (n d_out)`` (``torch.nn.MSELoss``).
* ``causal_lm``: next-token cross-entropy of a language model, ``CE(logits[:, :-1], labels[:, 1:])`` over the
  tokens whose label is not -100; ``masked_lm``: ``CE(logits, labels)`` over the labelled positions
  (:mod:`landscape.io.hf`).
* ``module:callable`` or ``file.py:callable``: any callable with that signature.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import LandscapeError
from ..io.hf import causal_lm, masked_lm
from ..io.specs import resolve

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

BUILTIN_LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "causal_lm": causal_lm,
    "masked_lm": masked_lm,
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


#: Shifted logits are clamped here before ``exp``: exp(-80) = 1.8e-35 is far below the rounding of a sum >= 1 in
#: float32 and float64, and exp of anything lower is slow (subnormal or zero results).
UNDERFLOW = -80.0


def class_major(loss: LossFn, out: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether :func:`stacked_loss` reduces K outputs shaped like ``out`` fastest when they are stacked
    class-major: held as a contiguous ``(K, C, n)`` tensor and passed as its ``(K, n, C)`` transposed view
    (the cross-entropy on ``(n, C)`` logits with class targets)."""
    return loss is F.cross_entropy and out.ndim == 2 and target.ndim == 1 and not target.is_floating_point()


def stacked_cross_entropy(out: torch.Tensor, target: torch.Tensor, *, overwrite: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and number of correct arg-max predictions of each of K stacked outputs ``out[k]``
    (shape ``(K, n, C)``) against ``target`` (n,): two tensors of shape (K,).

    ``l_i = log sum_c exp(z_ic - m_i) - (z_{i, y_i} - m_i)`` with ``m_i = max_c z_ic``: the numerics of
    ``F.cross_entropy``'s log-softmax (the shift keeps the loss accurate near a minimum, where it is far below
    the logits' rounding error; ``logsumexp(z) - z_y`` would cancel). The class axis is moved to the middle so
    that the reductions over a few classes vectorize across samples: about 3x faster than ``log_softmax`` over
    a last axis of 10 on a CPU, and one call for K points instead of K calls.

    Sample i is correct when ``argmax_c z_ic = y_i``, read off the shifted logits: ``z_{i, y_i} - m_i = 0`` and no
    class before ``y_i`` reaches ``m_i`` (arg-max takes the first maximum). That reuses the shift instead of a
    separate arg-max over a last axis of 10 (5x the time); non-finite maxima go through ``argmax`` itself.

    Shifted logits below :data:`UNDERFLOW` are raised to it before ``exp`` (the result is the same: their terms
    are far below the rounding of the sum, which holds ``exp(0) = 1``), since a subnormal or zero ``exp`` is
    10-40x slower on a CPU, and far from a minimum most logits are that far below the largest.

    With ``overwrite`` and ``out`` stacked class-major (see :func:`class_major`), ``out`` is used as the work
    space and its values are destroyed; otherwise it is copied.
    """
    o = out.transpose(1, 2)  # (K, C, n): shifted and exponentiated in place
    o = o if overwrite and o.is_contiguous() else o.clone(memory_format=torch.contiguous_format)
    m = o.amax(dim=1, keepdim=True)
    finite = bool(torch.isfinite(m.sum()))  # every maximum finite (or a sum that overflows: argmax then, exact)
    correct = None if finite else stacked_correct(out, target)  # before the shift, which may overwrite ``out``
    o.sub_(m)
    picked = o.gather(1, target.expand(o.shape[0], -1).unsqueeze(1)).squeeze(1)  # z_y - m
    if finite:
        # max over the classes before y_i of z_ic - m_i (0 for a tie), masking the others with -inf: float
        # reductions over the middle axis are fast, boolean ones are not
        cls = torch.arange(o.shape[1], device=o.device).unsqueeze(1)  # (C, 1)
        mask = torch.zeros(cls.shape[0], target.shape[0], dtype=o.dtype, device=o.device)
        mask.masked_fill_(cls >= target, float("-inf"))  # (C, n): 0 where c < y_i
        tie_before = (o + mask).amax(dim=1) == 0
        correct = ((picked == 0) & ~tie_before).sum(dim=-1)
    # exp of a shifted logit below -87 gives a subnormal or zero, which this CPU's vectorized exp computes 10-40x
    # slower; such terms cannot change a sum that holds exp(0) = 1 (nor do -80's), so they are clamped first
    lse = o.clamp_(min=UNDERFLOW).exp_().sum(dim=1).log()
    return (lse - picked).mean(dim=-1), correct


def stacked_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.mse_loss(out[k], target)`` (mean over samples and output dimensions) for each k of ``(K, *target.shape)``."""
    return (out - target).pow(2).flatten(1).mean(dim=-1)


def stacked_loss(loss: LossFn, out: torch.Tensor, target: torch.Tensor, *, correct: bool = False,
                 overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch-mean ``loss(out[k], target)`` for each of the K stacked outputs, shape (K,), and with ``correct`` the
    number of samples whose arg-max class equals the integer target (K,) (else None).

    The built-in losses have closed forms over the stack (when the shapes are the plain ones: logits ``(n, C)``
    with class targets ``(n,)``, or outputs shaped like the targets); any other loss is called once per k.
    ``overwrite`` lets the cross-entropy use ``out`` as its work space (see :func:`stacked_cross_entropy`).
    """
    if out.ndim == 3 and class_major(loss, out[0], target):
        ce, right = stacked_cross_entropy(out, target, overwrite=overwrite)
        return ce, right if correct else None
    if loss is F.mse_loss and tuple(out.shape[1:]) == tuple(target.shape):
        vals = stacked_mse(out, target)
    else:
        vals = torch.stack([loss(o, target) for o in out])
    return vals, stacked_correct(out, target) if correct else None


def stacked_correct(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of samples whose arg-max class equals the integer target, for each of K stacked ``(n, C)`` outputs."""
    return (out.argmax(dim=-1) == target).sum(dim=-1)
