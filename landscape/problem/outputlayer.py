"""A classifier's output layer written class-major, straight into the stack of a block's outputs.

A slice reduces the outputs of a block of K points together, and the cross-entropy over a few classes runs
fastest on logits held class-major, a contiguous ``(K, C, n)`` stack (:func:`~landscape.problem.losses.class_major`).
When the model returns the output of an ``nn.Linear`` on a 2-D input, ``Z = H W^T + 1 b^T`` (``H``: n x h,
``W``: C x h), that layer can compute its transpose

    Z^T = W H^T + b 1^T

with one ``addmm`` into slot k of the stack and return the ``(n, C)`` transposed view of it. The model's output
is then already where the reduction wants it (no per-block copy), and for a small C the product is also cheaper
in this orientation (the shipped MLP's 1438 x 64 by 64 x 10 layer: 34 us against 64 us on 2 CPU cores). The
values differ from ``F.linear``'s only by rounding.

The layer is found on one throwaway forward pass: the one ``nn.Linear`` (exactly that type: a subclass may
override ``forward``) called once whose very output tensor, of shape ``(n, C)``, the model returned. Every pass
after that routes its first call into the slot; any other call, or an input or output of another shape or dtype,
runs the layer's own ``forward``.
Whatever the model returns ends up in the slot: when it is not the slot itself (a model that changes its
control flow from point to point) it is copied there, so the route is only ever a shortcut.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .inputlayer import swapped_forward


class OutputLayer:
    """Finds and routes the model's output layer (see the module docstring).

    Call :meth:`find` once (a throwaway forward pass), then use :meth:`patched` around a block of in-place
    evaluations and :meth:`run` for each forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self.candidates: list[tuple[str, nn.Linear]] = [
            (name, m) for name, m in model.named_modules() if type(m) is nn.Linear]  # type: ignore[misc]
        self.layer: int | None = None  # index into candidates, once found
        self.searched = False
        self._slot: torch.Tensor | None = None
        self._calls = 0

    @property
    def routed(self) -> str:
        """Name of the layer whose output goes straight into the stack ("" when none qualified or not yet
        searched)."""
        return "" if self.layer is None else self.candidates[self.layer][0]

    def find(self, model: nn.Module, x: torch.Tensor) -> None:
        """Find the output layer on one forward pass of ``model`` on ``x`` (its output is thrown away, so every
        point is computed the same way); nothing to do once searched."""
        if self.searched:
            return
        seen: list[tuple[int, torch.Tensor]] = []

        def watch(j: int, own: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
            def forward(inp: torch.Tensor) -> torch.Tensor:
                out = own(inp)
                seen.append((j, out))
                return out

            return forward

        with contextlib.ExitStack() as stack:
            for j, (_, m) in enumerate(self.candidates):
                stack.enter_context(swapped_forward(m, lambda own, j=j: watch(j, own)))
            out = model(x)
        hits = [j for j, o in seen if o is out]
        once = len(hits) == 1 and sum(j == hits[0] for j, _ in seen) == 1
        self.layer = hits[0] if once and out.ndim == 2 and out.shape[0] == x.shape[0] else None
        self.searched = True

    def out_shape(self, x: torch.Tensor) -> tuple[int, int] | None:
        """``(n, C)``: the shape of the model's output on ``x`` when it comes from the routed layer, else None."""
        return None if self.layer is None else (x.shape[0], self.candidates[self.layer][1].out_features)

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """Route the output layer (when one was found) while inside; its own ``forward`` is restored on exit, also
        after an exception."""
        if self.layer is None:
            yield
            return
        m = self.candidates[self.layer][1]
        with swapped_forward(m, lambda own: self._route(m.weight, m.bias, own)):
            yield

    def run(self, model: nn.Module, x: torch.Tensor, slot: torch.Tensor | None) -> torch.Tensor:
        """``model(x)``; with a ``(C, n)`` ``slot``, the output is in the slot on return (its transposed view is
        returned)."""
        self._slot, self._calls = slot, 0
        try:
            out = model(x)
        finally:
            self._slot = None
        if slot is None:
            return out
        view = slot.t()
        if not (out.data_ptr() == view.data_ptr() and out.shape == view.shape and out.stride() == view.stride()
                and out.dtype == view.dtype):
            # the model returned something else: copy it in (from a copy when it overlaps the slot)
            shares = out.untyped_storage().data_ptr() == slot.untyped_storage().data_ptr()
            view.copy_(out.clone() if shares else out)
        return view

    def _route(self, w: torch.Tensor, b: torch.Tensor | None, own: Callable[[torch.Tensor], torch.Tensor]
               ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The routed forward, for the layer's parameters ``w`` and ``b`` as they are while patched (the model's own
        tensors, moved in place)."""
        bias = None if b is None else b.unsqueeze(1)

        def forward(inp: torch.Tensor) -> torch.Tensor:
            slot = self._slot
            self._calls += 1
            if (slot is None or self._calls > 1 or inp.ndim != 2 or slot.shape != (w.shape[0], inp.shape[0])
                    or not inp.dtype == w.dtype == slot.dtype):
                return own(inp)
            if bias is None:
                torch.mm(w, inp.t(), out=slot)
            else:
                torch.addmm(bias, w, inp.t(), out=slot)
            return slot.t()

        return forward
