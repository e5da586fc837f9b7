"""Loading checkpoints safely, and saving self-describing ones.

Formats read by :func:`load_checkpoint`:

* a plain ``state_dict`` saved with ``torch.save`` (``.pt``, ``.pth``, ``.bin``);
* a training-checkpoint dict holding the state dict under ``state_dict``, ``model_state_dict``,
  ``model``, ``net``, ... (found automatically, or named with ``state_key``, dotted for nesting);
* a PyTorch Lightning ``.ckpt`` (the ``model.``-style attribute prefix is stripped when the
  model is built, see :func:`apply_state_dict`);
* ``.safetensors`` files;
* a checkpoint written by :func:`save_checkpoint`, whose manifest names the model, data and
  loss so that ``landscape scan ckpt.pt`` needs no flags;
* whole pickled modules and TorchScript archives, only with ``trust_pickle=True``.

Everything else is read with ``torch.load(weights_only=True)``: unpickling is restricted to
tensors and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import LandscapeError

MANIFEST_KEY = "landscape_manifest"
MANIFEST_FORMAT = "landscape-checkpoint/1"

#: Keys searched, in order, for the model's state dict inside a training checkpoint.
STATE_KEYS = (
    "state_dict", "model_state_dict", "model_state", "model", "net", "network",
    "module", "state", "weights", "params", "ema_state_dict", "ema",
)
#: Keys searched for an optimizer state dict (its ``param_groups`` give lr, momentum, ...).
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optim", "opt", "optimizer_state", "optimizer_states")
STEP_KEYS = ("step", "global_step", "iteration", "iter", "epoch")


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` found in a file."""

    path: str
    sha256: str
    format: str
    state_dict: Mapping[str, torch.Tensor]
    state_key: str | None = None
    manifest: Mapping[str, Any] | None = None
    optimizer: Mapping[str, Any] | None = None
    step: int | None = None
    module: torch.nn.Module | None = field(default=None, repr=False)
    #: the optimizer's whole state dict (moments included), kept only when ``load_checkpoint(optimizer_state=True)``
    optimizer_state: Mapping[str, Any] | None = field(default=None, repr=False)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():  # torch's unpickler warns about protocols; our error says what matters
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            first = str(err).strip().splitlines()
            detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise LandscapeError(
                f"{path} holds pickled Python objects that safe loading refuses"
                + (f" ({detail})" if detail else "")
                + "; unpickling them can run arbitrary code",
                hint="if you trust the file, re-run with --trust-pickle",
            ) from err
        raise LandscapeError(f"{path} is not a readable PyTorch checkpoint ({err})",
                             hint="the file may be corrupt or truncated; re-save or re-download it") from err
    except Exception as err:  # the unpickler fails in many ways on damaged bytes (IndexError, KeyError, ...)
        if trust_pickle and isinstance(err, (ImportError, AttributeError)):
            # a pickled module's class lives in the user's code: importing it failed, the file is fine
            raise LandscapeError(f"{path} holds a pickled object whose class cannot be imported "
                                 f"({type(err).__name__}: {err})",
                                 hint="run from the folder (or with the PYTHONPATH) the model was saved with, or "
                                      "save model.state_dict() and pass --model") from err
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LandscapeError(f"{path} is not a readable PyTorch checkpoint ({msg})",
                             hint="the file may be corrupt or truncated; re-save or re-download it") from err


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LandscapeError(f"{path} is not a readable safetensors file ({err})",
                             hint="the file may be corrupt or truncated") from err


def _get_dotted(obj: Any, key: str) -> Any:
    cur = obj
    for part in key.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return None
    return cur


def optimizer_info(opt_state: Any, name: str | None = None) -> dict[str, Any] | None:
    """Name and hyperparameters (lr, momentum, betas, weight decay, ...) of an optimizer state dict.

    The name is guessed from the keys of ``param_groups`` when not given: ``betas`` means an Adam
    variant (``AdamW`` when weight decay is decoupled), ``momentum`` and ``dampening`` mean SGD.
    """
    if isinstance(opt_state, (list, tuple)) and opt_state:  # Lightning: one per optimizer
        opt_state = opt_state[0]
    if isinstance(opt_state, torch.optim.Optimizer):
        name = name or type(opt_state).__name__
        opt_state = {"param_groups": opt_state.param_groups}
    groups = opt_state.get("param_groups") if isinstance(opt_state, Mapping) else None
    if not groups:
        return None
    clean = [{k: _plain(v) for k, v in g.items() if k != "params" and _plain(v) is not None} for g in groups]
    g0 = clean[0]
    if name is None:
        if "betas" in g0:
            name = "AdamW" if g0.get("decoupled_weight_decay") else "Adam"
        elif "momentum" in g0 and "dampening" in g0:
            name = "SGD"
        elif "alpha" in g0 and "centered" in g0:
            name = "RMSprop"
        else:
            name = "unknown"
    return {"name": name, "hyperparameters": g0, "param_groups": clean}


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return list(v)
    return None


def load_checkpoint(path: str | Path, *, state_key: str | None = None, trust_pickle: bool = False,
                    optimizer_state: bool = False) -> Checkpoint:
    """Read a checkpoint without running code from it (unless ``trust_pickle``); with ``optimizer_state``, keep the
    optimizer's state dict (its moments cost as much memory as the model, or twice that for Adam)."""
    path = Path(path)
    if not path.exists():
        raise LandscapeError(f"checkpoint {path} does not exist", hint="check the path")
    if path.is_dir():
        from . import hf

        if hf.is_folder(path):
            return hf.load_folder(path)
        raise LandscapeError(f"{path} is a directory, not a checkpoint file (nor a save_pretrained folder with "
                             "config.json)", hint="give the .pt/.ckpt/.safetensors file")
    if path.stat().st_size == 0:
        raise LandscapeError(f"checkpoint {path} is empty (0 bytes)", hint="re-save or re-download it")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix != ".safetensors" and not head.startswith((b"PK\x03\x04", b"\x80")):
        # torch.save writes a zip archive, or (legacy) a pickle of protocol 2 or higher; anything else is some
        # other file, and the unpickler's "unsupported operand" would read like a pickle to trust
        raise LandscapeError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts "
                             f"{head!r})", hint="give the file torch.save wrote (.pt/.pth/.ckpt), a .safetensors "
                                                "file or a save_pretrained folder")
    sha = file_sha256(path)
    common = {"path": str(path), "sha256": sha}

    if path.suffix == ".safetensors":
        return Checkpoint(format="safetensors", state_dict=_load_safetensors(path), **common)

    if _is_torchscript(path):
        if not trust_pickle:
            raise LandscapeError(f"{path} is a TorchScript archive, which holds code",
                                 hint="if you trust the file, re-run with --trust-pickle")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise LandscapeError(f"cannot load TorchScript archive {path} ({err})") from err
        return Checkpoint(format="torchscript", state_dict=dict(module.state_dict()), module=module, **common)

    obj = _torch_load(path, trust_pickle)

    if isinstance(obj, torch.nn.Module):
        return Checkpoint(format="pickled-module", state_dict=dict(obj.state_dict()), module=obj, **common)
    if _is_tensor_mapping(obj) and state_key is None:
        return Checkpoint(format="state_dict", state_dict=dict(obj), **common)
    if not isinstance(obj, Mapping):
        raise LandscapeError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict",
                             hint="save model.state_dict() or a dict that contains it")

    manifest = obj.get(MANIFEST_KEY) if isinstance(obj.get(MANIFEST_KEY), Mapping) else None
    fmt = "landscape" if manifest else ("lightning" if any("lightning" in str(k) for k in obj) else "training")

    found, key, module = _find_state_dict(obj, state_key, path)
    opt, opt_state, step = _optimizer_and_step(obj, manifest)
    return Checkpoint(format=fmt, state_dict=dict(found), state_key=key, manifest=manifest,
                      optimizer=opt, step=step, module=module,
                      optimizer_state=opt_state if optimizer_state and isinstance(opt_state, Mapping) else None,
                      **common)


def _find_state_dict(obj: Mapping[str, Any], state_key: str | None, path: Path
                     ) -> tuple[Mapping[str, torch.Tensor], str | None, torch.nn.Module | None]:
    """The state dict inside a training-checkpoint dict: under ``state_key`` (dotted), else under the first of
    :data:`STATE_KEYS` that holds one (or a pickled module, whose state dict it is); with its key and the module."""
    module = None
    if state_key is not None:
        found, key = _get_dotted(obj, state_key), state_key
        if found is None:
            raise LandscapeError(f"--state-key {state_key!r} is not in {path}",
                                 hint=f"top-level keys are: {_keys_preview(obj)}")
    else:
        found, key = None, None
        for k in STATE_KEYS:
            v = obj.get(k)
            if _is_tensor_mapping(v) or isinstance(v, torch.nn.Module):
                found, key = v, k
                break
    if isinstance(found, torch.nn.Module):
        module, found = found, dict(found.state_dict())
    if not _is_tensor_mapping(found):
        raise LandscapeError(
            f"cannot find a state dict in {path}"
            + (f" under {state_key!r}" if state_key else f"; looked for keys {', '.join(STATE_KEYS[:6])}, ..."),
            hint=f"pass --state-key KEY; top-level keys are: {_keys_preview(obj)}",
        )

    return found, key, module


def _optimizer_and_step(obj: Mapping[str, Any], manifest: Mapping[str, Any] | None
                        ) -> tuple[dict[str, Any] | None, Any, int | None]:
    """The optimizer's hyperparameters (:func:`optimizer_info`) and state dict, and the training step, from a
    checkpoint dict (its manifest first)."""
    opt = opt_state = None
    man_opt = manifest.get("optimizer") if manifest else None
    for k in OPTIMIZER_KEYS:
        if k in obj:
            opt = optimizer_info(obj[k], name=(man_opt or {}).get("name"))
            if opt:
                opt_state = obj[k][0] if isinstance(obj[k], (list, tuple)) else obj[k]
                break
    if opt is None and isinstance(man_opt, Mapping):
        opt = dict(man_opt)
    step = manifest.get("step") if manifest else None
    if step is None:
        for k in STEP_KEYS:
            if isinstance(obj.get(k), int):
                step = obj[k]
                break
    return opt, opt_state, step


def _keys_preview(obj: Mapping[str, Any], n: int = 8) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _names_preview(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _best_prefix(ckpt_keys: set[str], model_keys: set[str]) -> str:
    """The prefix to strip from checkpoint keys that makes most of them match the model's."""
    best, best_hits = "", len(ckpt_keys & model_keys)
    candidates = {"module.", "_orig_mod.", "model.", "net.", "network."}
    candidates |= {k.split(".", 1)[0] + "." for k in ckpt_keys if "." in k}
    for p in sorted(candidates):
        stripped = {k[len(p):] for k in ckpt_keys if k.startswith(p)}
        hits = len(stripped & model_keys)
        if hits > best_hits:
            best, best_hits = p, hits
    return best


def tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """``key -> first key`` for the state-dict entries of ``model`` that are the same tensor as an earlier entry
    (tied weights, e.g. a language model's output matrix and its token embedding)."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out: dict[str, str] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.dtype.itemsize, tuple(t.shape))
        if t.numel() and key in first:
            out[k] = first[key]
        else:
            first.setdefault(key, k)
    return out


def apply_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True
                     ) -> str:
    """Load ``state`` into ``model``, reporting every missing, unexpected or mis-shaped key by name.

    A common key prefix (``module.`` from DataParallel, ``_orig_mod.`` from torch.compile,
    ``model.`` from Lightning, ...) is stripped when that makes the keys match. A key the file lacks whose
    tensor is tied to one it has (:func:`tied_keys`; ``save_pretrained`` stores tied weights once) is not
    missing. With ``strict=False`` missing and unexpected keys are a warning that names them (the model keeps
    its own values there); shape mismatches are always an error. Returns the stripped prefix ("" when none).
    """
    target = model.state_dict()
    model_keys = set(target)
    prefix = _best_prefix(set(state), model_keys)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    tied = tied_keys(model)
    missing = sorted(k for k in model_keys - set(state)
                     if not k.endswith("num_batches_tracked") and tied.get(k) not in state)
    unexpected = sorted(set(state) - model_keys)
    if not strict and (missing or unexpected):
        warnings.warn("loading with --no-strict: " + "; ".join(
            ([f"missing from checkpoint (model's own values kept): {_names_preview(missing)}"] if missing else [])
            + ([f"ignored, not in model: {_names_preview(unexpected)}"] if unexpected else [])))
        missing, unexpected = [], []
    shapes = [
        f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from checkpoint: {_names_preview(missing)}")
    if unexpected:
        problems.append(f"not in model: {_names_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_names_preview(shapes)}")
    if problems:
        raise LandscapeError("checkpoint does not fit the model (" + "; ".join(problems) + ")",
                             hint="check --model and --model-arg, choose the state dict with --state-key, or "
                                  "accept missing/unexpected keys with --no-strict")
    model.load_state_dict({k: v for k, v in state.items() if k in model_keys}, strict=False)
    return prefix


def check_finite(named: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise if any floating-point tensor holds NaN or Inf, naming the tensors."""
    bad = []
    for name, t in named.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()})")
    if bad:
        raise LandscapeError(f"{what} has NaN or Inf values in {_names_preview(bad)}",
                             hint="a diverged run? pick an earlier checkpoint")


def save_checkpoint(
    path: str | Path,
    module: torch.nn.Module,
    *,
    model: str,
    model_args: Mapping[str, Any] | None = None,
    data: str | None = None,
    data_args: Mapping[str, Any] | None = None,
    loss: str | None = None,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    step: int | None = None,
) -> Path:
    """Save ``module`` with a manifest so that ``landscape scan path`` needs no flags.

    ``model`` is the spec of an ``nn.Module`` class or factory (``"pkg.models:Net"``), called
    with ``model_args``; ``data`` and ``loss`` likewise (built-in names allowed). For
    safety, a checkpoint's spec is only called automatically when it names an ``nn.Module``
    (or ``Dataset``) class or lives in ``landscape``'s own packages; point it at a class.
    ``optimizer`` is a torch optimizer (its state dict is saved too, and its name and
    hyperparameters go into the manifest) or a dict ``{"name": ..., "lr": ..., ...}``.

    >>> import tempfile, os, torch
    >>> net = torch.nn.Linear(3, 2)
    >>> p = save_checkpoint(os.path.join(tempfile.mkdtemp(), "c.pt"), net, model="torch.nn:Linear",
    ...                     model_args={"in_features": 3, "out_features": 2}, step=7)
    >>> load_checkpoint(p).manifest["step"]
    7
    """
    from .. import __version__

    opt_json: dict[str, Any] | None = None
    extra: dict[str, Any] = {}
    if isinstance(optimizer, torch.optim.Optimizer):
        opt_json = optimizer_info(optimizer)
        extra["optimizer_state_dict"] = optimizer.state_dict()
    elif isinstance(optimizer, Mapping):
        hp = {k: _plain(v) for k, v in optimizer.items() if k != "name" and _plain(v) is not None}
        opt_json = {"name": str(optimizer.get("name", "unknown")), "hyperparameters": hp, "param_groups": [hp]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "landscape_version": __version__,
        "model": {"target": model, "args": dict(model_args or {})},
        "data": {"target": data, "args": dict(data_args or {})} if data else None,
        "loss": loss,
        "optimizer": opt_json,
        "step": step,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({MANIFEST_KEY: manifest, "state_dict": module.state_dict(), **extra}, path)
    return path
