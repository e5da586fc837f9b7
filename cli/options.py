"""The options the commands share, defined once: the model, data and loss options of every loading command
(:class:`SpecOptions`), the checkpoint argument, ``--output``, ``--json`` and the like, and the parsers of option
values (ranges, sizes, lists), each a one-line error on bad input.

A command takes them as one parameter ``specs: SpecOptions`` and is decorated with :func:`spec_options`, which
puts the options below into the command's signature (so typer shows them in ``--help``) and hands the command
one :class:`SpecOptions`. ``scan``, ``hessian``, ``sharpness``, ``coherence``, ``compare`` and ``trajectory``
take exactly the same spellings and defaults. The analysis commands (``hessian``, ``sharpness``, ``coherence``) take
their run options the same way: ``run: RunOptions`` and :func:`run_options`.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, fields
from typing import Annotated, Any, Callable, Optional

import typer

from landscape.errors import LandscapeError


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
        help="Hessian-vector product engine: auto (the fastest of the three, timed at the first product, among "
             "those that need at most half the memory budget more than the leanest; graph only when its graph fits "
             "half the budget), graph (double backward through a kept graph), forward-over-reverse or "
             "reverse-over-reverse (torch.func). Pin one for runs that must agree to the last bit.")],
}
assert set(OPTIONS) == {f.name for f in fields(SpecOptions)}


def _expand(fn: Callable[..., Any], name: str, group: type, annotations: dict[str, Any],
            only: tuple[str, ...] | None = None, in_place: bool = True) -> Callable[..., Any]:
    """``fn`` with its parameter ``name`` (a dataclass ``group``) replaced by ``group``'s fields.

    The fields are keyword options annotated from ``annotations`` (``only``: just these), in the parameter's place
    or (``in_place=False``) after all of ``fn``'s own; ``--json`` and ``--debug`` always come last. The wrapper
    collects them back into one ``group`` and calls ``fn`` with it.
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    wanted = [f for f in fields(group) if only is None or f.name in only]
    expanded = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                  annotation=annotations[f.name]) for f in wanted]
    params: list[inspect.Parameter] = []
    for p in inspect.signature(fn).parameters.values():
        p = p.replace(annotation=hints.get(p.name, p.annotation))
        if p.name == name:
            params += expanded if in_place else []
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                          if p.default is not inspect.Parameter.empty else p)
    params += [] if in_place else expanded
    params.sort(key=lambda p: p.name in ("json_out", "debug"))  # stable: only moves those two to the end

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{name: group(**{f.name: kwargs.pop(f.name) for f in wanted})}, **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


def spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Replace ``fn``'s ``specs`` parameter by the shared options (placed before its ``--json``/``--debug``)."""
    return _expand(fn, "specs", SpecOptions, OPTIONS, in_place=False)


# The other options several commands share, declared once, and the parsers of option values.
CheckpointArg = Annotated[str, typer.Argument(help="Checkpoint file (.pt, .pth, .ckpt, .safetensors) or a "
                                                   "save_pretrained folder (config.json + weights).")]
MetricOpt = Annotated[Optional[list[str]], typer.Option("--metric", help="Extra metric name=module:callable, called "
                                                                         "as f(output, target) -> batch mean; repeatable.")]
StreamOpt = Annotated[str, typer.Option(help="Inputs read from disk a chunk at a time, for data larger than memory: "
                                             "on, off, or auto (when they would fill a quarter of memory). .h5 and "
                                             ".pt data files, map-style datasets.")]
OutputOpt = Annotated[Optional[str], typer.Option("-o", "--output", help="Run file or directory (default: "
                                                                          "reports/<checkpoint stem>/run.h5).")]
SaveVectorsOpt = Annotated[Optional[bool], typer.Option(
    "--save-vectors/--no-save-vectors", help="Store long vectors in the run file: random and interpolation "
                                             "directions, Hessian eigenvectors, per-parameter GSNR (default: only "
                                             "for models of at most 1M parameters; Hessian slices' directions are "
                                             "always stored).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print each phase's predicted time and peak memory, from "
                                                             "products measured on the real model and batch; "
                                                             "compute nothing else.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


@dataclass(frozen=True)
class RunOptions:
    """How an analysis command (``hessian``, ``sharpness``, ``coherence``) runs and reports: its run options."""

    stream: str = "auto"
    output: Optional[str] = None
    save_vectors: Optional[bool] = None
    dry_run: bool = False
    json_out: bool = False
    debug: bool = False


RUN_OPTIONS: dict[str, Any] = {"stream": StreamOpt, "output": OutputOpt, "save_vectors": SaveVectorsOpt,
                               "dry_run": DryRunOpt, "json_out": JsonOpt, "debug": DebugOpt}
assert set(RUN_OPTIONS) == {f.name for f in fields(RunOptions)}


def run_options(vectors: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace a command's ``run: RunOptions`` parameter by ``--stream``, ``--output``, ``--save-vectors`` (unless
    ``vectors`` is false: the command stores no long vectors), ``--dry-run``, ``--json`` and ``--debug``."""
    only = None if vectors else tuple(f.name for f in fields(RunOptions) if f.name != "save_vectors")
    return lambda fn: _expand(fn, "run", RunOptions, RUN_OPTIONS, only=only)


def parse_range(text: str) -> tuple[float, float]:
    parts = text.replace(":", ",").split(",")
    try:
        vals = [float(p) for p in parts if p.strip()]
    except ValueError:
        raise LandscapeError(f"--range {text!r} is not a number or MIN,MAX", hint="e.g. --range 1 or --range=-0.5,1.5")
    if len(vals) == 1:
        return (-abs(vals[0]), abs(vals[0]))
    if len(vals) == 2:
        return (vals[0], vals[1])
    raise LandscapeError(f"--range {text!r} is not a number or MIN,MAX", hint="e.g. --range 1 or --range=-0.5,1.5")


def parse_metric(text: str) -> tuple[str, str]:
    name, sep, target = text.partition("=")
    if not sep or not name or ":" not in target:
        raise LandscapeError(f"--metric {text!r} is not name=module:callable", hint="e.g. --metric nll=mypkg.metrics:nll")
    return name.strip(), target.strip()


def parse_workers(text: str) -> int | str:
    """``auto`` or a positive number of blocks evaluated at once.

    >>> parse_workers("auto"), parse_workers("2")
    ('auto', 2)
    """
    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise LandscapeError(f"--workers {text!r} is neither auto nor a positive number", hint="use --workers auto or 2")


def parse_bytes(text: Optional[str]) -> Optional[float]:
    """``4GB``, ``512MiB``, ``2e9`` -> bytes.

    >>> parse_bytes("1.5GiB"), parse_bytes("256MB"), parse_bytes("1000")
    (1610612736.0, 256000000.0, 1000.0)
    """
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    try:
        value = float(m.group(1)) if m else -1.0
    except ValueError:
        value = -1.0
    if m is None or value <= 0:
        raise LandscapeError(f"--memory-budget {text!r} is not a size", hint="e.g. 512MiB, 4GB or 2e9 (bytes)")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return value * (1024.0 if m.group(3) else 1000.0) ** power


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise LandscapeError(f"--steps {text!r} is not N or NXxNY", hint="e.g. --steps 51 or --steps 41x31")
    return vals


def int_list(text: str, option: str) -> tuple[int, ...]:
    """``"8,32,128"`` as integers; anything else is a one-line error naming ``option``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise LandscapeError(f"{option} {text!r} is not a comma-separated list of integers",
                             hint=f"e.g. {option} 8,32,128") from None
    if any(v < 1 for v in values):
        raise LandscapeError(f"{option} {text!r} must be positive", hint=f"e.g. {option} 8,32,128")
    return values
