"""The model, data and loss options every loading command shares, defined once.

A command takes them as one parameter ``specs: SpecOptions`` and is decorated with :func:`spec_options`, which
puts the options below into the command's signature (so typer shows them in ``--help``) and hands the command
one :class:`SpecOptions`. ``scan``, ``hessian``, ``sharpness``, ``coherence``, ``compare`` and ``trajectory``
take exactly the same spellings and defaults.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, Optional

import typer


@dataclass(frozen=True)
class SpecOptions:
    """What the shared options said."""

    model: Optional[str] = None
    model_arg: Optional[list[str]] = None
    state_key: Optional[str] = None
    trust_pickle: bool = False
    strict: bool = True
    data: Optional[str] = None
    data_arg: Optional[list[str]] = None
    loss: Optional[str] = None
    max_samples: Optional[int] = None
    bn: str = "frozen"
    seed: int = 0
    batch_size: int = 2048
    device: str = "auto"
    dtype: Optional[str] = None
    memory_budget: Optional[str] = None
    hvp: str = "auto"


OPTIONS: dict[str, Any] = {
    "model": Annotated[Optional[str], typer.Option(
        help="Model factory, module:callable or file.py:callable, e.g. torchvision.models:resnet18 (default: the "
             "checkpoint's manifest, or config.json of a save_pretrained folder).")],
    "model_arg": Annotated[Optional[list[str]], typer.Option(
        "--model-arg", help="key=value (a Python literal) for the model factory; repeatable.")],
    "state_key": Annotated[Optional[str], typer.Option(
        help="Key of the state dict inside a training checkpoint (dotted).")],
    "trust_pickle": Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow pickled modules and TorchScript: runs code from the file.")],
    "strict": Annotated[bool, typer.Option(
        "--strict/--no-strict", help="Refuse a checkpoint whose keys do not match the model's (--no-strict: "
                                     "warn, keep the model's own values for missing keys).")],
    "data": Annotated[Optional[str], typer.Option(
        help="Built-in (digits, gaussian_mixture, teacher_student, tokens), a .pt/.npz/.h5 file with X and y (or "
             "input_ids, attention_mask, labels), or module:callable.")],
    "data_arg": Annotated[Optional[list[str]], typer.Option(
        "--data-arg", help="key=value for the data spec; repeatable.")],
    "loss": Annotated[Optional[str], typer.Option(
        help="cross_entropy, mse, causal_lm, masked_lm or module:callable (default: from the checkpoint or the "
             "architecture, else from the targets).")],
    "max_samples": Annotated[Optional[int], typer.Option(help="Evaluate on a seeded random subset of this size.")],
    "bn": Annotated[str, typer.Option(
        help="BatchNorm statistics: frozen (the checkpoint's; checked against train mode) or recompute at each "
             "point.")],
    "seed": Annotated[int, typer.Option(help="Seed for directions, probes and the data subset.")],
    "batch_size": Annotated[int, typer.Option(help="Samples per forward pass.")],
    "device": Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")],
    "dtype": Annotated[Optional[str], typer.Option(help="float32 or float64 (default: the checkpoint's).")],
    "memory_budget": Annotated[Optional[str], typer.Option(
        help="Memory an analysis may hold beyond the model, a gradient and a batch's activations (slice blocks, "
             "per-sample gradient chunks, Krylov bases; long vectors that do not fit go to a scratch file), e.g. "
             "512MiB, 4GB (default: a quarter of the available memory).")],
    "hvp": Annotated[str, typer.Option(
        help="Hessian-vector product engine: auto (the faster of graph and forward-over-reverse, timed at the "
             "first product), graph (double backward), forward-over-reverse or reverse-over-reverse (torch.func). "
             "Pin one for runs that must agree to the last bit.")],
}
assert set(OPTIONS) == {f.name for f in fields(SpecOptions)}


def spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Replace ``fn``'s ``specs`` parameter by the shared options (placed before its ``--json``/``--debug``)."""
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(fn).parameters.values() if p.name != "specs"]
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=OPTIONS[f.name])
              for f in fields(SpecOptions)]
    tail = [p for p in own if p.name in ("json_out", "debug")]
    head = [p for p in own if p not in tail]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.default is not inspect.Parameter.empty else p
              for p in head] + shared + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in tail]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        specs = SpecOptions(**{f.name: kwargs.pop(f.name) for f in fields(SpecOptions)})
        return fn(*args, specs=specs, **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command
