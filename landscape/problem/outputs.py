"""What a model's output is: the one rule that turns whatever ``model(x)`` returns into the tensor the loss sees.

* a tensor is the output;
* a mapping (a dict, or a ``transformers`` ``ModelOutput``) gives its ``logits``, else its first tensor value
  that is not ``loss``;
* a tuple or list gives its first element (reduced by the same rule);
* an object with a ``logits`` attribute gives that.

Anything else is refused with a message that names what the model returned. The Problem applies the rule to its
private copy of the model (:func:`tensor_outputs`), so every path (slices, gradients, Hessian-vector products,
per-sample gradients) sees the same tensor; a model that returns a tensor is unaffected.

>>> import torch
>>> output_tensor({"loss": torch.zeros(()), "logits": torch.ones(2, 3)}).shape
torch.Size([2, 3])
>>> output_tensor((torch.ones(4), "extra")).shape
torch.Size([4])
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import LandscapeError


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor ``out`` stands for, by the rule of the module docstring."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out and out["logits"] is not None:
            return output_tensor(out["logits"])
        for k, v in out.items():
            if k != "loss" and isinstance(v, torch.Tensor):
                return v
    elif isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    what = type(out).__name__ + (f" with keys {', '.join(map(str, out))}" if isinstance(out, Mapping) else "")
    raise LandscapeError(f"the model returned a {what}, which holds no output tensor",
                         hint="return a tensor, a tuple whose first item is one, or a dict with 'logits'")


def _reduce_hook(module: torch.nn.Module, args: Any, out: Any) -> torch.Tensor | None:
    """A forward hook: :func:`output_tensor` of a non-tensor output (None leaves a tensor as it is)."""
    return None if isinstance(out, torch.Tensor) else output_tensor(out)


def tensor_outputs(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model(x)`` return :func:`output_tensor` of what it returned, in place (call it on a private copy),
    through a forward hook that copies of the model keep; idempotent. A ``torch.jit.ScriptModule`` is returned
    as it is (its outputs are fixed by the script)."""
    if not isinstance(model, torch.jit.ScriptModule) and _reduce_hook not in model._forward_hooks.values():
        model.register_forward_hook(_reduce_hook)
    return model
