"""HuggingFace ``transformers`` models: ``save_pretrained`` folders, their token inputs and their losses.

A folder written by ``model.save_pretrained(DIR)`` holds ``config.json`` and the weights: ``model.safetensors``,
a sharded ``model.safetensors.index.json`` with its shards, or ``pytorch_model.bin`` (read with
``torch.load(weights_only=True)``, as every checkpoint is); a ``Trainer``'s ``checkpoint-N`` folder also gives its
training step (``trainer_state.json``). :func:`load_folder` reads it into a
:class:`landscape.io.checkpoint.Checkpoint` (format ``huggingface``) whose manifest names the model builder
:func:`from_config` and the loss the architecture implies (:func:`loss_for`), so ``landscape scan DIR --data
tokens.pt`` needs no model flags.

The model is built from ``config.json`` alone: the class in its ``architectures`` list, looked up in the
``transformers`` package (never ``trust_remote_code``), initialised from the config and then given the folder's
weights, converted as transformers converts them when it loads the folder (:func:`model_names`: a ViT's modules
have new names in transformers 5, its saved keys the old ones). Tied weights (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) are stored once by ``save_pretrained``; a key missing from the file whose model tensor is
another key's is tied, not missing (:func:`landscape.io.checkpoint.apply_state_dict`).

Inputs. A token data file holds ``input_ids`` ``(n, T)`` and optionally ``attention_mask`` ``(n, T)`` and
``labels`` (``(n, T)`` tokens for a language model, ``(n,)`` classes for a sequence classifier). With a mask, the
evaluation inputs are the pair packed as one integer tensor ``(n, 2, T)`` (``[:, 0]`` the ids, ``[:, 1]`` the mask)
so that every chunked, vmapped or streamed path carries the mask with its sample; :func:`token_forward` unpacks
it. Without ``labels`` a language model's labels are the ids themselves; labels of masked-out positions become
``-100`` (ignored), so the loss honours the mask.

Losses (means over the tokens whose label is not ``-100``, the value ``model(input_ids, labels=...).loss``
returns):

* ``causal_lm``: ``CE(logits[:, :-1], labels[:, 1:])``, next-token prediction;
* ``masked_lm``: ``CE(logits, labels)`` at the positions with a label;
* sequence classification: the plain ``cross_entropy`` (``mse`` for a one-label regression head).

Like every loss in landscape, each is a batch mean; the Problem weights chunks by their number of sequences, so
the full-data loss equals the token mean of one batch when every sequence has the same number of labelled
tokens (no padding) or the evaluation set fits one ``--batch-size``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LandscapeError

CONFIG = "config.json"
#: Weight files of a ``save_pretrained`` folder, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
IGNORE_INDEX = -100


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_pretrained`` folder (a directory with ``config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise LandscapeError(f"{path / CONFIG} is not readable JSON ({err})",
                             hint="re-save the model with save_pretrained") from err
    if not isinstance(cfg, dict):
        raise LandscapeError(f"{path / CONFIG} holds no JSON object", hint="re-save the model with save_pretrained")
    return cfg


def architecture(cfg: Mapping[str, Any], path: Path | str = "config.json") -> str:
    """The model class named by a config's ``architectures`` (its first entry)."""
    arch = cfg.get("architectures")
    if not (isinstance(arch, list) and arch and isinstance(arch[0], str) and arch[0].isidentifier()):
        raise LandscapeError(f"{path} names no model class under 'architectures'",
                             hint="save with model.save_pretrained(DIR), or pass --model yourself")
    return arch[0]


def loss_for(cfg: Mapping[str, Any]) -> str | None:
    """The loss an architecture is trained with: ``causal_lm`` (``...ForCausalLM``, ``...LMHeadModel``),
    ``masked_lm`` (``...ForMaskedLM``), ``cross_entropy`` or ``mse`` (``...ForSequenceClassification`` with
    ``num_labels`` 1 or ``problem_type`` regression); None when it cannot be told (pass ``--loss``)."""
    arch = architecture(cfg)
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if arch.endswith("ForMaskedLM"):
        return "masked_lm"
    if arch.endswith(("ForSequenceClassification", "ForImageClassification", "ForTokenClassification")):
        regression = cfg.get("problem_type") == "regression" or (
            cfg.get("problem_type") is None and len(cfg.get("id2label") or {}) == 1)
        return "mse" if regression and arch.endswith("ForSequenceClassification") else "cross_entropy"
    return None


def _weights(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The state dict of a folder's weight files (every shard), and the files read."""
    from .checkpoint import _load_safetensors, _torch_load

    for name in WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                index = json.loads(f.read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
                raise LandscapeError(f"{f} is not a readable shard index ({err})",
                                     hint="re-save the model with save_pretrained") from err
            files = [path / s for s in shards]
        else:
            files = [f]
        state: dict[str, torch.Tensor] = {}
        for s in files:
            if not s.is_file():
                raise LandscapeError(f"shard {s.name} named by {f.name} is missing from {path}",
                                     hint="copy every shard of the checkpoint")
            part = _load_safetensors(s) if s.suffix == ".safetensors" else _torch_load(s, trust_pickle=False)
            if not (isinstance(part, Mapping) and all(isinstance(v, torch.Tensor) for v in part.values())):
                raise LandscapeError(f"{s} holds no state dict of tensors", hint="re-save with save_pretrained")
            state.update(part)
        return state, [path / CONFIG, *files]
    raise LandscapeError(f"{path} has a config.json but no weights ({', '.join(WEIGHT_FILES)})",
                         hint="save the model with save_pretrained, or give the weight file itself with --model")


def load_folder(path: Path) -> Any:
    """A :class:`~landscape.io.checkpoint.Checkpoint` of a ``save_pretrained`` folder (format ``huggingface``); its
    sha256 covers config.json and every weight file, in order."""
    from .checkpoint import Checkpoint, file_sha256

    cfg = _config(path)
    arch = architecture(cfg, path / CONFIG)
    state, files = _weights(path)
    state = model_names(state, path)
    sha = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
    manifest = {"model": {"target": "landscape.hf:from_config", "args": {"path": str(path.resolve())}},
                "loss": loss_for(cfg), "architecture": arch}
    return Checkpoint(path=str(path), sha256=sha, format="huggingface", state_dict=state, manifest=manifest,
                      step=_trainer_step(path))


def _trainer_step(path: Path) -> int | None:
    """The ``global_step`` of a ``Trainer`` checkpoint folder's ``trainer_state.json`` (orders a trajectory)."""
    try:
        step = json.loads((path / "trainer_state.json").read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise LandscapeError(f"reading a HuggingFace folder needs the transformers package ({err})",
                             hint="pip install 'landscape[hf]'") from err
    return transformers


def _build(folder: Path) -> torch.nn.Module:
    """The model a folder's ``config.json`` describes, with fresh weights (on the current default device)."""
    transformers = _transformers()
    arch = architecture(_config(folder), folder / CONFIG)
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise LandscapeError(f"{folder / CONFIG} names {arch}, which transformers {transformers.__version__} does "
                             "not have", hint="upgrade transformers, or pass --model yourself")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no past key/values: each forward pass is the whole sequence
    return cls(config)


def from_config(path: str) -> torch.nn.Module:
    """The model a ``save_pretrained`` folder's ``config.json`` describes, with fresh weights (the checkpoint's
    are loaded next), in eval mode, its key/value cache off, taking packed token inputs (:func:`token_forward`)."""
    model = _build(Path(path))
    model.eval()
    return token_forward(model)


def model_names(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """``state``, a folder's tensors, as the model built from its ``config.json`` names and shapes them.

    transformers 5 renamed the modules of some architectures (a ViT's ``encoder.layer.0.attention.attention.key`` is
    ``layers.0.attention.k_proj``; old ``LayerNorm.gamma`` is ``LayerNorm.weight``) and changed the layout of others
    (DINOv2's fused SwiGLU ``weights_in`` is ``gate_proj`` and ``up_proj``). Its ``from_pretrained`` converts a
    folder's tensors as it loads them (the checkpoint conversion mapping), while ``save_pretrained`` still writes the
    old layout. The same conversion is applied here, with transformers' own transforms, before the strict key and
    shape checks of :func:`landscape.io.checkpoint.apply_state_dict`: the result equals ``from_pretrained``'s
    ``state_dict()`` (``tests/test_hf.py``). transformers 4 has no mapping: the keys are the modules' names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    except ImportError:
        return state
    with torch.device("meta"):  # the module names and shapes, no memory
        model = _build(folder)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, Any] = {}  # first target name -> a converter collecting its source tensors
    for key in sorted(state, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if pattern is None:
            out[name] = state[key]
        else:
            pending.setdefault(name, copy.deepcopy(by_pattern[pattern])).add_tensor(name, key, pattern, state[key])
    for name, converter in pending.items():
        out.update(converter.convert(name, model=model, config=model.config))
    return out


def _unpack_tokens(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A forward pre-hook: ``(n, 2, T)`` integer inputs become ``input_ids`` and ``attention_mask``."""
    x = args[0] if len(args) == 1 else None
    if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == 2 and not x.is_floating_point():
        return (x[:, 0],), {**kwargs, "attention_mask": x[:, 1]}
    return None


def token_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model(x)`` accept the token inputs of this module's docstring, ``(n, T)`` ids or ``(n, 2, T)`` ids
    and attention mask, through a forward pre-hook (kept by copies of the model); returns ``model``."""
    model.register_forward_pre_hook(_unpack_tokens, with_kwargs=True)
    return model


def tokens(n: int = 256, vocab: int = 256, context: int = 32, noise: float = 0.1,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A built-in token set: ``n`` sequences of ``context`` tokens from ``vocab``, each token a fixed function of
    the two before it (``(3 a + b + 1) mod vocab``) replaced by a random token with probability ``noise``; a
    language a small model learns in a few hundred steps. Returns ``(input_ids, labels)`` with labels equal to the
    ids (the causal-LM convention: the loss shifts them)."""
    if n < 1 or vocab < 2 or context < 2 or not 0 <= noise <= 1:
        raise LandscapeError(f"tokens(n={n}, vocab={vocab}, context={context}, noise={noise}) is not a token set",
                             hint="n >= 1, vocab >= 2, context >= 2, 0 <= noise <= 1")
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(n, context, dtype=torch.long)
    seq[:, :2] = torch.randint(0, vocab, (n, 2), generator=g)
    for t in range(2, context):
        rule = (3 * seq[:, t - 1] + seq[:, t - 2] + 1) % vocab
        rand = torch.randint(0, vocab, (n,), generator=g)
        seq[:, t] = torch.where(torch.rand(n, generator=g) < noise, rand, rule)
    return seq, seq.clone()


def token_arrays(arrays: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inputs and targets of a token file's arrays (``input_ids``, optional ``attention_mask`` and ``labels``), as
    the module docstring describes; None when there is no ``input_ids``."""
    if "input_ids" not in arrays:
        return None
    ids = _array(arrays["input_ids"]).long()
    if ids.ndim != 2:
        raise LandscapeError(f"input_ids has shape {tuple(ids.shape)}, not (sequences, tokens)")
    labels = _array(arrays["labels"]).long() if "labels" in arrays else ids.clone()
    if "attention_mask" not in arrays:
        return ids, labels
    mask = _array(arrays["attention_mask"]).long()
    if mask.shape != ids.shape:
        raise LandscapeError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}",
                             hint="give one mask entry per token")
    if labels.shape == ids.shape:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return torch.stack([ids, mask], dim=1), labels


def _array(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))


def causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``; the mean over the tokens whose
    label is not -100 (what ``model(ids, labels=labels).loss`` of a ``...ForCausalLM`` returns)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


causal_lm.shift = 1  # type: ignore[attr-defined]  # logits[:, t] are scored against labels[:, t + shift]


def masked_lm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-token cross-entropy: the mean over the positions whose label is not -100 (``...ForMaskedLM``)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
