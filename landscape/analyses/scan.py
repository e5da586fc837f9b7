"""``landscape scan``: checkpoint -> Problem -> slices -> run file, resumable.

:func:`setup` turns a :class:`ScanConfig` into a ready :class:`Setup` (checkpoint, model,
data, loss, Problem); :func:`plan_slices` lists the slices to compute; :func:`run_scan` does
the work and writes the run file, calling ``progress`` as points finish;
:func:`estimate` gives the ``--dry-run`` cost without computing a slice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import platform
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np
import torch

from .. import __version__
from ..linalg import vectors
from ..io.checkpoint import Checkpoint, apply_state_dict, check_finite, load_checkpoint
from .coherence import CoherenceSettings, analyze_coherence
from .coherence import same_settings as coherence_same_settings
from .coherence import summary_from_group as coherence_summary
from ..problem.curvature import CurvatureOperator
from ..io.data import EvalData, load_data
from ..runtime.distributed import Comm, cuda_for_job, current
from .directions import check_policy, difference_direction, random_directions
from .batchsize import check_batch_sizes
from ..runtime.allocator import release_freed_memory
from ..runtime.blas import single_blas_thread
from .costs import coherence_cost, curvature_cost, product_seconds, sharpness_seconds
from ..runtime.budget import analysis_floor, check_fits, measured, process_seconds, resolve_budget, rss
from ..errors import LandscapeError
from .hessian import CurvatureSettings, analyze_curvature, stored_summary
from ..io.hf import IGNORE_INDEX
from ..linalg.lanczos import basis_device, lanczos
from ..problem.losses import default_loss_name, resolve_loss
from ..problem.problem import Problem, check_hvp_mode
from ..io.stream import StreamedInputs
from ..io.runfile import (RESERVED, RunFile, check_output_path, check_resumable, encode_attr, exists_error, from_link,
                          link_name, make_parent, read_attrs, read_journal)
from .sharpness import SharpnessSettings, same_settings, sharpness, summary_from_group
from .slices import axis, block_points, compute_slice, grid_coefficients, missing_blocks
from ..io.specs import Spec, call_spec, resolve

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Root attributes that must agree between a run file and the scan that resumes it.
IDENTITY_ATTRS = ("checkpoint_sha256", "model_spec", "data_spec", "loss", "metrics", "data_sha256", "dtype", "bn",
                  "bn_batches")


@dataclass(frozen=True)
class SliceSettings:
    """One slice to compute: its name, kind, grid and direction recipe."""

    name: str
    kind: str  # "random" or "interpolation"
    axes: tuple[np.ndarray, ...]
    norm: str = "filter"
    ignore: str = "biasbn"
    seed: int = 0
    orthogonalize: bool = False
    other_checkpoint: str | None = None

    @property
    def dims(self) -> int:
        return len(self.axes)


@dataclass(frozen=True)
class ScanConfig:
    """Everything ``landscape scan`` is told; the defaults are the defaults of the CLI."""

    checkpoint: str
    model: Spec | None = None
    data: Spec | None = None
    loss: str | None = None
    metrics: tuple[tuple[str, str], ...] = ()
    state_key: str | None = None
    trust_pickle: bool = False
    strict: bool = True
    max_samples: int | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None
    bn: str = "frozen"
    bn_batches: int = 10
    batch_size: int = 2048
    strategy: str = "auto"
    workers: int | str = "auto"
    #: the HVP engine (:data:`landscape.problem.problem.HVP_MODES`); ``auto`` times them at the first product
    hvp: str = "auto"
    precision: str = "full"
    memory_budget: float | None = None
    stream: str = "auto"
    dims: int = 2
    steps: tuple[int, ...] = (51,)
    range: tuple[float, float] = (-1.0, 1.0)
    y_range: tuple[float, float] | None = None
    norm: str = "filter"
    ignore: str = "biasbn"
    orthogonalize: bool = False
    directions: str = "random"
    interpolate: str | None = None
    interp_range: tuple[float, float] = (-0.5, 1.5)
    interp_steps: int = 51
    name: str | None = None
    output: str | None = None
    resume: bool = False
    overwrite: bool = False
    compact_every: float = 30.0
    #: store long vectors (random and interpolation directions, eigenvectors, per-parameter GSNR): True, False,
    #: or None for "when the model has at most SMALL_MODEL parameters" (see :func:`keeps_vectors`)
    save_vectors: bool | None = None
    slices: bool = True
    curvature: CurvatureSettings | None = None
    sharpness: tuple[SharpnessSettings, ...] = ()
    coherence: CoherenceSettings | None = None

    def __post_init__(self) -> None:
        """Settings checked before anything is loaded or written (an unknown --norm used to leave an empty run
        file behind)."""
        check_policy(self.norm, self.ignore)
        check_hvp_mode(self.hvp)
        for what, name in [("slice name (--name)", self.name), *(("metric name", m) for m, _ in self.metrics)]:
            if name is not None and ("/" in name or name in ("", ".")):
                raise LandscapeError(f"the {what} {name!r} cannot name a run-file entry (it holds '/' or is empty)",
                                     hint="choose a name without '/'")

    def run_path(self) -> Path:
        if self.output:
            out = Path(self.output)
            return out if out.suffix in (".h5", ".hdf5") else out / "run.h5"
        return Path("reports") / Path(self.checkpoint).stem / "run.h5"


@dataclass(frozen=True)
class Setup:
    checkpoint: Checkpoint
    model: torch.nn.Module
    data: EvalData
    loss_name: str
    problem: Problem
    model_spec: Mapping[str, Any] | None
    state_prefix: str
    #: ``(eval-mode loss, train-mode loss)`` of :meth:`Problem.batchnorm_check` under frozen statistics, or None
    bn_check: tuple[float, float] | None = None


@dataclass(frozen=True)
class SliceResult:
    name: str
    kind: str
    shape: tuple[int, ...]
    computed: int
    loss_at_origin: float | None
    loss_min: float
    loss_max: float
    n_nonfinite: int
    seconds: float


@dataclass(frozen=True)
class ScanSummary:
    run_file: str
    checkpoint: str
    n_parameters: int
    n_samples: int
    strategy: str
    slices: tuple[SliceResult, ...] = field(default_factory=tuple)
    curvature: Mapping[str, Any] | None = None
    sharpness: tuple[Mapping[str, Any], ...] = ()
    coherence: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_file": self.run_file, "checkpoint": self.checkpoint, "n_parameters": self.n_parameters,
            "n_samples": self.n_samples, "strategy": self.strategy, "curvature": self.curvature,
            "sharpness": list(self.sharpness), "coherence": self.coherence,
            "slices": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in s.__dict__.items()} for s in self.slices],
        }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if cuda_for_job() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LandscapeError("--device cuda was asked for, but CUDA is not available", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise LandscapeError(f"unknown device {name!r}", hint="use cpu, cuda, cuda:N or auto") from err


def build_model(ck: Checkpoint, model_spec: Spec | None, *, strict: bool = True
                ) -> tuple[torch.nn.Module, Mapping[str, Any] | None, str]:
    """The model with the checkpoint's weights, its spec (as JSON) and the stripped key prefix (``strict``: see
    :func:`landscape.io.checkpoint.apply_state_dict`)."""
    if model_spec is not None:
        model = call_spec(model_spec, what="model")
        spec_json: Mapping[str, Any] | None = model_spec.to_json()
    elif ck.manifest and ck.manifest.get("model"):
        spec = Spec.from_json(ck.manifest["model"])
        model = call_spec(spec, what="model", from_checkpoint=True)
        spec_json = spec.to_json()
    elif ck.module is not None:
        check_finite(ck.state_dict)
        return ck.module, None, ""
    else:
        raise LandscapeError(f"{ck.path} does not say which model it holds",
                             hint="pass --model module:callable (and --model-arg key=value)")
    if not isinstance(model, torch.nn.Module):
        raise LandscapeError(f"the model spec returned a {type(model).__name__}, not an nn.Module")
    prefix = apply_state_dict(model, ck.state_dict, strict=strict)
    check_finite(dict(model.state_dict()))
    return model, spec_json, prefix


def setup(config: ScanConfig, comm: Comm | None = None) -> Setup:
    """Load the checkpoint, build model, data and loss, and make the Problem (for the ranks of ``comm``, by
    default the job :func:`landscape.runtime.distributed.init_from_env` joined)."""
    check_output_path(config.run_path())  # before the model loads: an output that cannot be written fails at once
    ck = load_checkpoint(config.checkpoint, state_key=config.state_key, trust_pickle=config.trust_pickle)
    model, model_spec, prefix = build_model(ck, config.model, strict=config.strict)
    manifest = ck.manifest or {}
    if config.data is not None:
        data = load_data(config.data, max_samples=config.max_samples, seed=config.seed, stream=config.stream)
    elif manifest.get("data"):
        data = load_data(Spec.from_json(manifest["data"]), max_samples=config.max_samples, seed=config.seed,
                         from_checkpoint=True, stream=config.stream)
    else:
        raise LandscapeError(f"{config.checkpoint} does not say which data to evaluate on",
                             hint="pass --data (a built-in such as digits, a .pt/.npz/.h5 file, or module:callable)")
    loss_name = config.loss or manifest.get("loss") or default_loss_name(data.y)
    loss_fn = resolve_loss(loss_name, from_checkpoint=config.loss is None and bool(manifest.get("loss")))
    dtype = DTYPES[config.dtype] if config.dtype else None
    metrics = {}
    for mname, target in config.metrics:
        if not mname.isidentifier() or mname in RESERVED + ("loss", "accuracy"):
            raise LandscapeError(f"metric name {mname!r} is not allowed",
                                 hint="use an identifier other than loss, accuracy, x, y, done, directions")
        metrics[mname] = resolve(target, what="metric")
    problem = Problem(model, data.X, data.y, loss_fn, metrics=metrics, device=resolve_device(config.device), dtype=dtype,
                      batch_size=config.batch_size, bn=config.bn, bn_batches=config.bn_batches,
                      strategy=config.strategy, workers=config.workers, seed=config.seed, comm=comm or current(),
                      hvp_mode=config.hvp, precision=config.precision, memory_budget=resolve_budget(config.memory_budget))
    if config.curvature is not None and config.curvature.batch_sizes:
        check_batch_sizes(problem.n, config.curvature.batch_sizes)
    check_fits(analysis_floor(problem.num_parameters, problem.parameter_bytes,
                              host_vectors=config.curvature is not None and problem.device.type != "cuda"),
               problem.memory_budget, problem.device)
    try:
        problem.evaluate()
    except LandscapeError:
        raise
    except Exception as err:  # the user's model, data and loss do not fit together
        labels = _label_mismatch(problem)
        if labels:
            raise LandscapeError(labels, hint="labels must be class indices 0 .. C-1 for a model with C outputs; "
                                              "check --data (or --loss for a regression target)") from err
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LandscapeError(f"running the model on the data failed ({type(err).__name__}: {msg})",
                             hint="check that --data matches the model's inputs and --loss its outputs") from err
    bn_check = problem.batchnorm_check() if config.bn == "frozen" else None
    if bn_check is not None and bn_far_apart(*bn_check):
        warnings.warn(f"with the checkpoint's frozen BatchNorm statistics the loss is {bn_check[0]:.4g}, with the "
                      f"batch's own statistics (train mode) {bn_check[1]:.4g}: every number is computed around a "
                      "point the network did not train at; --bn recompute re-estimates the statistics")
    return Setup(ck, model, data, loss_name, problem, model_spec, prefix, bn_check)


def _label_mismatch(problem: Problem) -> str | None:
    """For a classifier whose evaluation failed: a message naming the labels outside the model's outputs, if that
    is the cause (found from one sample's output)."""
    y = problem.y
    if not problem.classification or y.ndim != 1 or y.is_floating_point() or isinstance(problem.X, StreamedInputs):
        return None
    try:
        with torch.no_grad():
            out = problem.forward(problem.theta0, problem.X[:1])
    except Exception:  # noqa: BLE001 (the model fails on its own; the caller reports that)
        return None
    if out.ndim != 2:
        return None
    classes = int(out.shape[1])
    used = y[y != IGNORE_INDEX]
    bad = used[(used < 0) | (used >= classes)]
    if not len(bad):
        return None
    return (f"{len(bad)} of {len(y)} labels lie outside the model's {classes} classes (labels from "
            f"{int(used.min())} to {int(used.max())})")


def bn_far_apart(frozen: float, batch: float) -> bool:
    """Whether eval- and train-mode losses differ enough to warn: more than 2x and more than 0.1 apart (or one is
    not finite).

    >>> bn_far_apart(54.1, 0.43), bn_far_apart(0.05, 0.02), bn_far_apart(1.0, 1.3)
    (True, False, False)
    """
    if not (math.isfinite(frozen) and math.isfinite(batch)):
        return True
    lo, hi = sorted((abs(frozen), abs(batch)))
    return hi - lo > 0.1 and hi > 2 * lo


#: models up to this many parameters keep every vector in the run file unless told otherwise (4 MB per float32
#: vector); bigger ones only on ``--save-vectors``
SMALL_MODEL = 1_000_000


def keeps_vectors(config: ScanConfig, n_parameters: int) -> bool:
    """Whether the run file stores long vectors: ``--save-vectors``/``--no-save-vectors``, else only for models
    of at most :data:`SMALL_MODEL` parameters. Directions of Hessian slices are stored in any case (recomputing
    them costs a Lanczos run); random and interpolation directions are recomputed from their recipe and checked
    against the ``directions_sha256`` stored with the slice."""
    return config.save_vectors if config.save_vectors is not None else n_parameters <= SMALL_MODEL


def directions_sha256(dirs: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """Hash of the directions' values (in parameter order as given), to check recomputed ones on resume."""
    h = hashlib.sha256()
    for d in dirs:
        for name, t in d.items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def plan_slices(config: ScanConfig) -> list[SliceSettings]:
    """The slices a scan computes: one random 1D or 2D slice, plus an interpolation if asked."""
    if not config.slices:
        return []
    if config.dims not in (1, 2):
        raise LandscapeError(f"--dims must be 1 or 2, got {config.dims}")
    steps = tuple(config.steps) or (51,)
    if any(s < 1 for s in steps) or len(steps) > 2:
        raise LandscapeError(f"--steps {steps} is not one or two positive counts", hint="e.g. --steps 51 or --steps 41 31")
    nx, ny = steps[0], steps[-1]
    lo, hi = config.range
    ylo, yhi = config.y_range or config.range
    if not (lo < hi and ylo < yhi):
        raise LandscapeError(f"--range {lo} {hi} is empty", hint="give MIN MAX with MIN < MAX")
    axes = (axis(lo, hi, nx),) if config.dims == 1 else (axis(lo, hi, nx), axis(ylo, yhi, ny))
    if config.directions == "random":
        out = [SliceSettings(name=config.name or f"random_{config.dims}d", kind="random", axes=axes, norm=config.norm,
                             ignore=config.ignore, seed=config.seed, orthogonalize=config.orthogonalize)]
    elif config.directions in ("hessian", "hessian-bottom"):
        out = [SliceSettings(name=config.name or f"{config.directions.replace('-', '_')}_{config.dims}d",
                             kind=config.directions, axes=axes, norm="none", ignore="none", seed=config.seed)]
    else:
        raise LandscapeError(f"--directions {config.directions!r} is unknown", hint="use random, hessian or hessian-bottom")
    if config.interpolate:
        ilo, ihi = config.interp_range
        out.append(SliceSettings(name="interpolation", kind="interpolation",
                                 axes=(axis(ilo, ihi, config.interp_steps),), norm="none", ignore="none",
                                 other_checkpoint=config.interpolate))
    return out


def make_directions(s: SliceSettings, st: Setup, config: ScanConfig) -> list[dict[str, torch.Tensor]]:
    if s.kind == "random":
        return random_directions(st.problem.theta0, s.dims, seed=s.seed, norm=s.norm, ignore=s.ignore,
                                 orthogonalize=s.orthogonalize)
    if s.kind in ("hessian", "hessian-bottom"):
        return hessian_directions(st.problem, s.dims, bottom=s.kind == "hessian-bottom", seed=s.seed)
    other = load_checkpoint(s.other_checkpoint, state_key=config.state_key, trust_pickle=config.trust_pickle)
    model_b, _, _ = build_model(other, config.model, strict=config.strict)
    theta_b = {n: p.detach() for n, p in model_b.named_parameters()}
    return [difference_direction(st.problem.theta0, theta_b)]


def hessian_directions(pb: Problem, dims: int, *, bottom: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Unit Hessian eigenvectors as directions: the top ``dims`` ones, or (``bottom``) the top and the bottom one.

    Random slices show the mean curvature tr(H)/N and make saddles look convex; these show the extremes.
    """
    op = CurvatureOperator(pb)
    k = 1 if bottom else dims
    device = basis_device(pb.device, k, op.n)
    budget = op.budget()
    top = lanczos(op, op.n, k=k, which="LA", seed=seed, budget=budget, device=device)
    vecs = [top.eigenvectors[:, i] for i in range(top.eigenvectors.shape[1])]
    if bottom and dims == 2:
        vecs.append(lanczos(op, op.n, k=1, which="SA", seed=seed + 1, budget=budget,
                            device=device).eigenvectors[:, 0])
    return [{n: t.detach().cpu().double() for n, t in op.to_params(v).items()} for v in vecs]


def tool_provenance() -> dict[str, Any]:
    """Versions, time and command line: the root attributes every file landscape writes starts with."""
    return {
        "tool": "landscape", "tool_version": __version__, "torch_version": torch.__version__,
        "h5py_version": h5py.__version__, "numpy_version": np.__version__,
        "python_version": platform.python_version(), "platform": platform.platform(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def provenance(config: ScanConfig, st: Setup) -> dict[str, Any]:
    ck = st.checkpoint
    return {
        **tool_provenance(),
        "checkpoint_path": str(Path(config.checkpoint).resolve()), "checkpoint_sha256": ck.sha256,
        "checkpoint_format": ck.format, "state_key": ck.state_key or "", "state_prefix": st.state_prefix,
        "model_spec": st.model_spec, "data_spec": st.data.spec, "loss": st.loss_name,
        "optimizer": ck.optimizer, "step": ck.step if ck.step is not None else -1,
        "seed": config.seed, "max_samples": config.max_samples if config.max_samples else -1,
        "n_samples": len(st.data), "n_source_samples": st.data.n_source, "data_sha256": st.data.sha256,
        "data_streamed": st.data.streamed,
        "n_parameters": st.problem.num_parameters, "device": str(st.problem.device),
        "dtype": str(st.problem.dtype).replace("torch.", ""), "bn": config.bn, "bn_batches": config.bn_batches,
        "batch_size": st.problem.batch_size, "classification": st.problem.classification,
        "metrics": dict(config.metrics), "memory_budget": config.memory_budget or "auto",
        "vectors_stored": keeps_vectors(config, st.problem.num_parameters),
        "bn_check_eval_loss": st.bn_check[0] if st.bn_check else float("nan"),
        "bn_check_train_loss": st.bn_check[1] if st.bn_check else float("nan"),
    }


def _check_identity(stored: Mapping[str, Any], current: Mapping[str, Any], path: Path,
                    keys: Sequence[str] = IDENTITY_ATTRS) -> None:
    for k in keys:
        if k in stored and stored[k] != current[k]:
            raise LandscapeError(f"cannot resume {path}: it was made with a different {k} "
                                 f"({stored[k]!r}, now {current[k]!r})",
                                 hint="use --overwrite to start again, or -o to write elsewhere")


def _check_run_identity(stored: Mapping[str, Any], prov: Mapping[str, Any], path: Path,
                        plan: Sequence[SliceSettings]) -> None:
    """Refuse to resume a run file made for another checkpoint, data or setting; slices must match the file's dtype,
    a curvature-only run records its own dtype in its group."""
    _check_identity(stored, prov, path, IDENTITY_ATTRS if plan else tuple(k for k in IDENTITY_ATTRS if k != "dtype"))


def _check_slice_resumable(s: SliceSettings, attrs: Mapping[str, Any], axes: Sequence[np.ndarray],
                           config: ScanConfig, path: Path) -> None:
    """Refuse to resume the stored slice ``s`` (its attributes and axes) under other settings or another grid."""
    want = _slice_attrs(s, attrs["strategy"], attrs["block"], config)
    diff = [k for k in want if attrs.get(k, SLICE_ATTR_DEFAULTS.get(k)) != want[k]]
    if diff or not all(np.array_equal(a, b) for a, b in zip(axes, s.axes)):
        raise LandscapeError(f"cannot resume slice {s.name!r} of {path}: its settings differ "
                             f"({', '.join(diff) or 'grid'})",
                             hint="use --overwrite, another -o, or --name for a new slice")


def _slice_attrs(s: SliceSettings, strategy: str, block: int, config: ScanConfig) -> dict[str, Any]:
    return {"kind": s.kind, "dims": s.dims, "norm": s.norm, "ignore": s.ignore, "seed": s.seed,
            "orthogonalize": s.orthogonalize, "bn": config.bn, "strategy": strategy, "block": block,
            "other_checkpoint": s.other_checkpoint or "", "precision": config.precision}


#: What a slice attribute meant before it was recorded (files written by earlier versions).
SLICE_ATTR_DEFAULTS = {"precision": "full"}


def precision_error(pb: Problem, dirs: Sequence[Mapping[str, torch.Tensor]], axes: Sequence[np.ndarray],
                    points: int = 64) -> dict[str, float]:
    """The error of a lowered-precision slice, measured: ``points`` grid points spread over the grid (corners and
    centre included) evaluated at ``pb.precision`` and at full precision; the largest absolute and relative loss
    differences and the median relative one. A sample: the largest error over a whole 51x51 grid measured 1.4-3x
    the sampled one on the shipped models (docs/scaling.md)."""
    coeffs = grid_coefficients(axes)
    pick = np.unique(np.linspace(0, len(coeffs) - 1, min(points, len(coeffs))).round().astype(int))
    pick = np.unique(np.append(pick, len(coeffs) // 2))
    lists = [pb.as_list(d) for d in dirs]
    low = pb.evaluate_points(coeffs[pick], lists)["loss"]
    full = pb.evaluate_points(coeffs[pick], lists, precision="full")["loss"]
    ok = np.isfinite(low) & np.isfinite(full)
    diff = np.abs(low - full)[ok]
    rel = diff / np.maximum(np.abs(full[ok]), 1e-30)
    nan = float("nan")
    return {"precision_points": int(ok.sum()),
            "precision_max_abs_error": float(diff.max()) if ok.any() else nan,
            "precision_max_rel_error": float(rel.max()) if ok.any() else nan,
            "precision_median_rel_error": float(np.median(rel)) if ok.any() else nan}


def _create_slice(f: h5py.File, s: SliceSettings, dirs: Sequence[Mapping[str, torch.Tensor]],
                  keys: Sequence[str], attrs: Mapping[str, Any], *, store: bool = True,
                  dtype: torch.dtype = torch.float64) -> None:
    """The slice's group: grid, NaN-filled values, ``done`` mask; its directions (in ``dtype``) when ``store``,
    and their hash in any case."""
    g = f.require_group("slices").create_group(s.name)
    shape = tuple(len(a) for a in s.axes)
    for label, a in zip(("x", "y"), s.axes):
        g.create_dataset(label, data=a)
    for k in keys:
        g.create_dataset(k, data=np.full(shape, np.nan))
    g.create_dataset("done", data=np.zeros(shape, dtype=bool))
    g.attrs["directions_sha256"] = directions_sha256(dirs)
    g.attrs["directions_stored"] = store
    for k, d in enumerate(dirs if store else ()):
        dg = g.create_group(f"directions/{k}")
        for name, t in d.items():
            dg.create_dataset(link_name(name), data=t.detach().cpu().to(dtype).numpy())
    for k, v in attrs.items():
        g.attrs[k] = encode_attr(v)


def _load_directions(g: h5py.Group) -> list[dict[str, torch.Tensor]] | None:
    """The slice's stored directions, or None when only their recipe and hash were stored."""
    if "directions" not in g:
        return None
    dg = g["directions"]
    return [{from_link(n): torch.from_numpy(v[()]) for n, v in dg[str(k)].items()} for k in range(len(dg))]


def _slice_state(g: h5py.Group) -> tuple[dict[str, Any], np.ndarray, tuple[np.ndarray, ...]]:
    """A stored slice's attributes, ``done`` mask and axes (``x``, and ``y`` in 2D)."""
    return read_attrs(g), g["done"][()], tuple(g[lab][()] for lab in ("x", "y") if lab in g)


ProgressFn = Callable[[str, int, int], None]


def _read_existing(rf: RunFile, prov: Mapping[str, Any], plan: Sequence[SliceSettings], path: Path,
                   data_indices: np.ndarray) -> dict[str, tuple[dict[str, Any], list, np.ndarray, tuple]]:
    """Check that the run file belongs to this scan (or stamp a new one) and return its slices:
    name -> (attributes, directions, done mask, axes)."""
    with rf.read() as f:
        stored = read_attrs(f)
        existing = {}
        for n, g in (f["slices"].items() if "slices" in f else []):
            attrs, done, axes = _slice_state(g)
            existing[n] = (attrs, _load_directions(g), done, axes)
    if "checkpoint_sha256" in stored:
        _check_run_identity(stored, prov, path, plan)
    else:
        with rf.transaction() as f:
            for k, v in prov.items():
                f.attrs[k] = encode_attr(v)
            f.create_dataset("data/subset_index", data=data_indices)
    return existing


def run_scan(config: ScanConfig, *, progress: ProgressFn | None = None,
             prepared: Setup | None = None) -> ScanSummary:
    """Compute every planned slice into the run file; resumable (``config.resume``).

    Under ``torchrun`` every rank calls this with the same config: the grid points are shared out, gradients and
    curvature products are data-parallel, and only rank 0 opens the run file, writes and reports ``progress``
    (see :mod:`landscape.runtime.distributed`). Every rank returns the same summary.
    """
    st = prepared or setup(config)
    pb = st.problem
    comm = pb.comm
    progress = progress if comm.is_writer else None
    plan = plan_slices(config)
    path = config.run_path()
    mode = "overwrite" if config.overwrite else ("resume" if config.resume else "create")
    prov = provenance(config, st)
    if "LANDSCAPE_SPILL_DIR" not in os.environ:  # vectors beyond the budget spill beside the run file
        make_parent(path)
        vectors.SPILL_DIR = str(path.parent)
    with ExitStack() as stack:
        # the algorithms hold numpy's BLAS at one thread themselves; this covers the passes between them too
        stack.enter_context(single_blas_thread())

        def open_run() -> RunFile:
            return stack.enter_context(RunFile(path, mode=mode, compact_every=config.compact_every))

        rf = comm.from_writer(open_run, share=False)  # None on the other ranks: they never touch the file
        existing = comm.from_writer(lambda: _read_existing(rf, prov, plan, path, st.data.indices))
        keys = ["loss"] + (["accuracy"] if pb.classification else []) + sorted(pb.metrics)
        results = [_scan_slice(s, st, config, rf, existing, keys, progress) for s in plan]
        vectors_kept = keeps_vectors(config, pb.num_parameters)
        curvature, curvature_summary = None, None
        if config.curvature is not None:  # on resume, a finished result for the same settings is kept as it is
            curvature_summary = comm.from_writer(lambda: _read(rf, _kept_curvature, config.curvature, vectors_kept))
            if curvature_summary is None:
                # each phase starts from the memory in use: the free pages the CLI's hold keeps in the heap
                # (landscape.runtime.allocator) go back first, so that what one phase left there, in pieces the
                # next may not reuse, does not add to its peak (ResNet-18's coherence: 7,861 -> 6,770 MiB)
                release_freed_memory()
                curvature = analyze_curvature(pb, config.curvature,
                                              progress=(lambda msg: progress(msg, 0, 0)) if progress else None)
                curvature_summary = curvature.summary()
        comm.from_writer(lambda: _finish(rf, results, curvature, pb, vectors_kept), share=False)
        curvature = None  # its eigenvectors (k float64 vectors: 447 MB on ResNet-18) are in the file if kept
        release_freed_memory()
        sharp = _run_sharpness(rf, config, st, progress)
        release_freed_memory()
        coherence = _run_coherence(rf, config, st, progress) if config.coherence is not None else None
    return ScanSummary(str(path), config.checkpoint, pb.num_parameters, pb.n, pb.strategy, tuple(results),
                       curvature_summary, tuple(sharp), coherence)


def _scan_slice(s: SliceSettings, st: Setup, config: ScanConfig, rf: RunFile | None, existing: Mapping[str, Any],
                keys: Sequence[str], progress: ProgressFn | None) -> SliceResult:
    """Compute one planned slice into the run file: a new one (directions made, the evaluation strategy timed on
    its first blocks), or the missing points of one the file already holds, with the settings it was computed with
    (checked against ``s``) so that a resumed slice has the same bits."""
    pb, path = st.problem, config.run_path()
    comm = pb.comm
    t0 = time.perf_counter()
    if s.name in existing:
        attrs, dirs, done, axes = existing[s.name]
        _check_slice_resumable(s, attrs, axes, config, path)
        if dirs is None:  # recomputed from the recipe, and checked
            dirs = comm.broadcast(make_directions(s, st, config) if comm.is_writer else None)
            if directions_sha256(dirs) != attrs.get("directions_sha256"):
                raise LandscapeError(f"cannot resume slice {s.name!r} of {path}: its directions, recomputed "
                                     "from their seed, differ from the stored hash (another torch version?)",
                                     hint="use --overwrite, or --name for a new slice")
        pb.strategy, pb.block, pb.workers = attrs["strategy"], int(attrs["block"]), int(attrs.get("workers", 1))
        # as it was computed (older files: without these shortcuts), so the same bits
        pb.linear_inputs, pb.direct_output = "input_layers" in attrs, "output_layer" in attrs
        block, ready = pb.block, {}
    else:
        dirs = comm.broadcast(make_directions(s, st, config) if comm.is_writer or s.kind.startswith("hessian")
                              else None)
        pb.linear_inputs = pb.direct_output = True
        done = np.zeros(tuple(len(a) for a in s.axes), dtype=bool)
        # timed on the slice's own first blocks: their values are kept (ready) and journaled first
        ready = pb.choose_strategy_for([pb.as_list(d) for d in dirs], block_points(s.axes, done))
        strategy, block = pb.strategy, pb.block
        attrs = {**_slice_attrs(s, strategy, block, config), "input_layers": ",".join(pb.linear_input_layers),
                 "output_layer": pb.direct_output_layer if strategy == "inplace" else "", "workers": pb.workers}
        store = s.kind.startswith("hessian") or keeps_vectors(config, pb.num_parameters)
        comm.from_writer(lambda: _new_slice(rf, s, dirs, keys, attrs, pb, store), share=False)
    total = done.size
    n_done = int(done.sum())
    todo = sum(len(b) for b in missing_blocks(done, block))
    if progress:
        progress(s.name, total - todo, total)

    def on_block(idx: np.ndarray, vals: Mapping[str, np.ndarray], _name: str = s.name) -> None:
        nonlocal n_done
        rf.append(_name, idx, vals)
        n_done += len(idx)
        if progress:
            progress(_name, min(n_done, total), total)

    compute_slice(pb, dirs, s.axes, done=done, block=block, on_block=on_block, ready=ready)
    return comm.from_writer(lambda: _summarize(rf, s, todo, time.perf_counter() - t0))


def _kept_curvature(f: h5py.File, settings: CurvatureSettings, vectors_kept: bool) -> dict[str, Any] | None:
    """The summary of the curvature result already in the run file ``f`` for ``settings``, or None."""
    return stored_summary(f[settings.group], settings, eigenvectors=vectors_kept) if settings.group in f else None


def _kept_sharpness(f: h5py.File, s: SharpnessSettings) -> dict[str, Any] | None:
    """The summary of the sharpness measure already in ``f`` for the resolved settings ``s``, or None."""
    g = f["sharpness"][s.group] if "sharpness" in f and s.group in f["sharpness"] else None
    return summary_from_group(g) if g is not None and same_settings(g, s) else None


def _kept_coherence(f: h5py.File, settings: CoherenceSettings) -> dict[str, Any] | None:
    """The summary of the coherence result already in ``f`` for ``settings``, or None."""
    if "coherence" in f and coherence_same_settings(f["coherence"], settings):
        return coherence_summary(f["coherence"])
    return None


def _new_slice(rf: RunFile, s: SliceSettings, dirs: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str],
               attrs: dict[str, Any], pb: Problem, store: bool) -> None:
    """Create the slice's group; a lowered precision gets its error measured first (by the writer alone)."""
    if pb.precision != "full":
        attrs.update(precision_error(pb, dirs, s.axes))
    with rf.transaction() as f:
        _create_slice(f, s, dirs, keys, attrs, store=store, dtype=pb.dtype)


def _finish(rf: RunFile, results: Sequence[SliceResult], curvature: Any, pb: Problem, vectors_kept: bool) -> None:
    """Stamp completion, the curvature result (its eigenvectors, in the run's dtype, when ``vectors_kept``) and
    each slice's summary attributes."""
    with rf.transaction() as f:
        f.attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        if curvature is not None:
            op = CurvatureOperator(pb, kind=curvature.settings.kind,
                                   parameters=curvature.settings.parameters or None)
            curvature.write(f, eigenvector_params=(lambda vec: {
                n: t.detach().cpu().numpy() for n, t in op.to_params(vec).items()}) if vectors_kept else None)
        for r in results:
            g = f["slices"][r.name]
            g.attrs["loss_at_origin"] = np.nan if r.loss_at_origin is None else r.loss_at_origin
            g.attrs["loss_min"], g.attrs["loss_max"] = r.loss_min, r.loss_max
            g.attrs["n_nonfinite"] = r.n_nonfinite


def _run_coherence(rf: RunFile | None, config: ScanConfig, st: Setup, progress: ProgressFn | None
                   ) -> dict[str, Any]:
    """``/coherence``, kept as it is when the file already holds it with the same settings."""
    settings = config.coherence
    assert settings is not None
    comm = st.problem.comm

    kept = comm.from_writer(lambda: _read(rf, _kept_coherence, settings))
    if kept is not None:
        return kept
    settings = replace(settings, memory_budget=st.problem.budget_left())
    res = analyze_coherence(st.problem, settings, sample_index=st.data.indices, progress=progress)
    if not keeps_vectors(config, st.problem.num_parameters):
        res = replace(res, gsnr={})
    comm.from_writer(lambda: _write(rf, res), share=False)
    return res.summary()


def _read(rf: RunFile, kept: Callable[..., Any], *args: Any) -> Any:
    """``kept(f, *args)`` on the run file ``rf`` opened for reading."""
    with rf.read() as f:
        return kept(f, *args)


def _write(rf: RunFile, result: Any) -> None:
    with rf.transaction() as f:
        result.write(f)


def _run_sharpness(rf: RunFile | None, config: ScanConfig, st: Setup, progress: ProgressFn | None
                   ) -> list[dict[str, Any]]:
    """Each sharpness measure, written as soon as it is done; on resume, a group already in the file with the same
    settings is kept, not recomputed."""
    comm = st.problem.comm
    out = []
    for settings in config.sharpness:
        s = settings.resolved()

        def stored(s: SharpnessSettings = s) -> tuple[dict[str, Any] | None, list | None]:
            with rf.read() as f:
                kept = _kept_sharpness(f, s)
                if kept is not None:
                    return kept, None
                first = next(iter(f["slices"]), None) if "slices" in f else None
                return None, (_load_directions(f["slices"][first]) if first and s.measure == "basin-width" else None)

        kept, dirs = comm.from_writer(stored)
        if kept is not None:
            out.append(kept)
            continue
        if s.measure == "basin-width" and not dirs:
            dirs = random_directions(st.problem.theta0, 2, seed=config.seed, norm=config.norm, ignore=config.ignore)
        label = f"sharpness {s.group}"
        res = sharpness(st.problem, s, directions=dirs,
                        progress=(lambda d, t, _l=label: progress(_l, d, t)) if progress else None)
        comm.from_writer(lambda: _write(rf, res), share=False)
        out.append(res.summary())
    return out


def _summarize(rf: RunFile, s: SliceSettings, computed: int, seconds: float) -> SliceResult:
    """Merge the slice's journal into the file and summarize what it holds."""
    rf.compact()
    with rf.read() as f:
        g = f["slices"][s.name]
        loss = g["loss"][()]
    finite = np.isfinite(loss)
    origin = tuple(int(np.argmin(np.abs(a))) for a in s.axes)
    at_origin = all(abs(a[i]) < 1e-12 for a, i in zip(s.axes, origin))
    return SliceResult(
        name=s.name, kind=s.kind, shape=loss.shape, computed=computed,
        loss_at_origin=float(loss[origin]) if at_origin else None,
        loss_min=float(loss[finite].min()) if finite.any() else float("nan"),
        loss_max=float(loss[finite].max()) if finite.any() else float("nan"),
        n_nonfinite=int((~finite).sum()), seconds=seconds,
    )


@dataclass(frozen=True)
class StoredWork:
    """What a run of ``config`` finds finished in its run file and keeps (:func:`stored_work`): the points of each
    planned slice it does not compute again (done in the file's ``done`` mask or in the journal not yet merged into
    it, and not in a block with a point missing: the run computes whole blocks, :func:`missing_blocks`), and the
    analyses stored for the same settings: the curvature's, the sharpness measures' (their groups, in the config's
    order) and coherence's."""

    slice_points: Mapping[str, int] = field(default_factory=dict)
    curvature: bool = False
    sharpness: tuple[str, ...] = ()
    coherence: bool = False

    @property
    def analyses(self) -> tuple[str, ...]:
        """The stored analyses by name: ``hessian``, ``sharpness/<group>``, ``coherence``."""
        return (("hessian",) * self.curvature + tuple(f"sharpness/{g}" for g in self.sharpness)
                + ("coherence",) * self.coherence)


def stored_work(config: ScanConfig, st: Setup) -> StoredWork:
    """What the run of ``config`` would keep from its run file, read without changing it: nothing for a new file
    or ``--overwrite``. A run that would be refused is refused here too, with the run's message: a file that exists
    without ``--resume`` (an analysis command always resumes), one that is not a readable run file, one made for
    another checkpoint, data or setting, a slice stored with other settings."""
    path = config.run_path()
    if config.overwrite or not path.exists():
        return StoredWork()
    if not config.resume:
        raise exists_error(path)
    plan = plan_slices(config)
    with check_resumable(path) as f:
        stored = read_attrs(f)
        if "checkpoint_sha256" in stored:
            _check_run_identity(stored, provenance(config, st), path, plan)
        done, blocks = {}, {}
        for s in plan:
            if "slices" in f and s.name in f["slices"]:
                attrs, done[s.name], axes = _slice_state(f["slices"][s.name])
                _check_slice_resumable(s, attrs, axes, config, path)
                blocks[s.name] = int(attrs["block"])
        vectors_kept = keeps_vectors(config, st.problem.num_parameters)
        curvature = config.curvature is not None and _kept_curvature(f, config.curvature, vectors_kept) is not None
        sharp = tuple(r.group for r in (m.resolved() for m in config.sharpness) if _kept_sharpness(f, r) is not None)
        coherence = config.coherence is not None and _kept_coherence(f, config.coherence) is not None
    for rec in read_journal(path.with_name(path.name + ".journal")):
        if rec["slice"] in done:
            done[rec["slice"]].flat[np.asarray(rec["index"], dtype=np.int64)] = True
    return StoredWork({n: m.size - sum(len(b) for b in missing_blocks(m, blocks[n])) for n, m in done.items()},
                      curvature, sharp, coherence)


#: the dry run's word on ``--engine pyhessian``, whose products it cannot count
PYHESSIAN_NOTE = ("hessian priced as Lanczos would run it: PyHessian's power iteration stops on its eigenvalue's "
                  "change and its trace on its mean's, which took 13-60 products an eigenvalue and 2-43 probes on "
                  "the models measured (benchmarks/RESULTS.md)")
#: the dry run's word on Lanczos's count (:func:`landscape.analyses.costs.lanczos_steps`), which the spectrum sets
LANCZOS_NOTE = ("hessian's Lanczos products counted for typical eigenvalue gaps, which a dry run cannot see: the "
                "models measured took 0.25x (small trained models, well-separated top eigenvalues) to 2.4x (top "
                "eigenvalues within 1% of each other) the count (benchmarks/RESULTS.md)")


def estimate_notes(curv: CurvatureSettings | None) -> tuple[str, ...]:
    """What the dry run of a Hessian phase with ``curv`` (None: none) cannot count: PyHessian's stopping rules
    (:data:`PYHESSIAN_NOTE`), or how many products Lanczos takes (:data:`LANCZOS_NOTE`)."""
    if curv is None:
        return ()
    if curv.engine == "pyhessian":
        return (PYHESSIAN_NOTE,)
    return (LANCZOS_NOTE,) if curv.top_k or curv.bottom_k else ()


@dataclass(frozen=True)
class Estimate:
    """What ``--dry-run`` prints: the cost of a scan before it runs, phase by phase.

    ``phases`` maps each phase (``startup``, ``slices``, ``hessian``, ``sharpness``, ``coherence``; the report
    is not counted) to its predicted
    ``seconds`` and ``peak_bytes``: the process's resident memory at its peak (on CUDA: the device's allocated
    memory), built from products measured on the real model and batch (see :func:`estimate`). Work a resumed run
    keeps from its file is not priced: ``points`` are the grid points left to compute (``points_stored`` are done),
    and the analyses in ``stored`` (as :attr:`StoredWork.analyses`) are left out of ``phases``.
    """

    points: int
    forward_passes: int
    seconds_per_point: float
    seconds: float
    strategy: str
    memory_bytes: int
    memory_note: str
    n_parameters: int
    n_samples: int
    ranks: int = 1
    workers: int = 1
    curvature_seconds: float = 0.0
    sharpness_seconds: float = 0.0
    coherence_seconds: float = 0.0
    memory_budget: float = 0.0
    phases: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    points_stored: int = 0
    stored: tuple[str, ...] = ()
    #: what the prediction cannot count, in words (``--engine pyhessian``'s stopping rules)
    notes: tuple[str, ...] = ()

    @property
    def total_seconds(self) -> float:
        return sum(p["seconds"] for p in self.phases.values())

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "phases": {k: dict(v) for k, v in self.phases.items()}, "stored": list(self.stored),
                "notes": list(self.notes), "total_seconds": self.total_seconds}


def _slice_costs(pb: Problem, config: ScanConfig, plan: list[SliceSettings]) -> tuple[float, int]:
    """Seconds per slice point and the memory the slice phase adds at its peak. The strategy is timed as the run
    times it, on the first slice's own blocks (replicas only when it has enough of them), then a round of blocks is
    measured with the setting it chose. The strategy's trials are the phase's first work (vmap's hold several points'
    activations at once), and the directions are held in float64 and in the model's dtype (ResNet-18: 256 MiB, not
    2 x its 43 MiB of parameters)."""
    dirs = random_directions(pb.theta0, 2, seed=config.seed, norm=config.norm, ignore=config.ignore)
    lists = [pb.as_list(d) for d in dirs]
    first = block_points(plan[0].axes, np.zeros(tuple(len(a) for a in plan[0].axes), dtype=bool)) if plan else None
    pb.choose_strategy_for(lists, first)
    n = pb.block * pb.workers  # a round of blocks, as the slice evaluates them
    coeffs = np.linspace(-0.5, 0.5, 2 * n).reshape(n, 2)
    seconds, extra = measured(pb.device, lambda: pb.evaluate_points(coeffs, lists))
    tensors = {t.data_ptr(): t for t in [*(t for d in dirs for t in d.values()), *(t for a in lists for t in a)]}
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    return seconds / n, max(extra, pb.strategy_memory) + held


def _pass_costs(pb: Problem, config: ScanConfig, todo: list[SliceSettings], choose: bool
                ) -> tuple[float, float, float, int]:
    """Seconds per slice point, per pass over the data at theta0 (what a gradient's or an HVP's loss pass costs), and
    of the strategy's choice, and the memory the slice phase adds: from the slices with points ``todo``
    (:func:`_slice_costs`), or without any, a pass over the data at theta0 (with ``choose``, an analysis command's
    ``--validity``, whose first points choose a strategy; a resumed scan's is the stored slice's)."""
    if todo:
        per_point, slice_bytes = _slice_costs(pb, config, todo)
        # gradients and HVPs run one at a time on all threads: a pass there costs what one in-place point does
        return per_point, pb.strategy_timings["inplace"] if pb.workers > 1 else per_point, 0.0, slice_bytes
    strategy_s = 0.0
    if choose:
        started = time.perf_counter()
        pb.choose_strategy()
        strategy_s = time.perf_counter() - started
    return 0.0, measured(pb.device, pb.evaluate)[0], strategy_s, 0


def estimate(config: ScanConfig, prepared: Setup | None = None) -> Estimate:
    """Predict each phase's time and peak memory from products measured on the real model, data and batch size:
    a block of slice points, a gradient, Hessian-vector products (the engine picked as the run will: its first call,
    the choice, is paid once by the phase that makes the run's first product) and a chunk of
    per-sample gradients with its accumulation, each timed after a warm-up call, with the memory it added at its
    peak (:func:`landscape.runtime.budget.measured`); the curvature phase, its vector work and its optional extras
    from :func:`~landscape.analyses.costs.curvature_cost` (the phase also says the products it counted); the slice
    phase from :func:`_slice_costs`. An analysis command's run has no slice phase: its passes over the data are
    timed at theta0. What a resumed run keeps from its file (:func:`stored_work`) is left out: the points done, the
    analyses stored for the same settings."""
    st = prepared or setup(config)
    pb = st.problem
    cuda = pb.device.type == "cuda"
    base = torch.cuda.memory_allocated(pb.device) if cuda else rss()
    # the run pays the same start-up: interpreter, imports, checkpoint, model, data, the check at theta0
    phases: dict[str, dict[str, float]] = {"startup": {"seconds": process_seconds(), "peak_bytes": base}}
    kept = stored_work(config, st)
    plan = plan_slices(config)
    left = {s.name: math.prod(len(a) for a in s.axes) - kept.slice_points.get(s.name, 0) for s in plan}
    points, points_stored = sum(left.values()), sum(kept.slice_points.values())
    curv = None if kept.curvature else config.curvature
    sharp = tuple(m for m in config.sharpness if m.resolved().group not in kept.sharpness)
    coherence = None if kept.coherence else config.coherence
    todo = [s for s in plan if left[s.name]]
    per_point, per_pass, strategy_s, slice_bytes = _pass_costs(pb, config, todo,
                                                               not plan and curv is not None and curv.validity)
    if todo:
        phases["slices"] = {"seconds": per_point * points / pb.comm.world, "peak_bytes": base + slice_bytes}
    chunks = math.ceil(pb.n / pb.batch_size)
    grad_s, grad_extra = measured(pb.device, pb.gradient)
    hvp_s = hvp_extra = choice_s = 0.0
    nparam = pb.num_parameters
    # the run's products at theta0 (and the engine's choice): a Hessian's, --validity's, sharpness's, coherence's
    if (curv is not None and (curv.kind == "hessian" or curv.validity)) or sharp or coherence is not None:
        # the long vectors on the GPU that runs the products when they fit there, as the run places them
        vec_device = basis_device(pb.device, max(curv.top_k, curv.bottom_k, 1), nparam) if curv is not None else None
        hvp_s, hvp_extra, choice_s = product_seconds(CurvatureOperator(pb), vec_device)  # first: the engine's choice
    budget = pb.budget_left()  # what the run's analyses size their vectors by, beside the HVP engine's graph
    if curv is not None:
        seconds, peak, products = curvature_cost(pb, curv, budget, (hvp_s, hvp_extra), grad_s, per_pass)
        phases["hessian"] = {"seconds": seconds + strategy_s, "peak_bytes": base + peak,
                             "products": products}
    if sharp:
        phases["sharpness"] = {"seconds": sharpness_seconds(pb, sharp, hvp_s),
                               "peak_bytes": base + max(grad_extra, hvp_extra) + 6 * nparam * 8}
    if coherence is not None:
        seconds, extra = coherence_cost(pb, coherence.resolved(), budget, hvp_s, per_pass)
        phases["coherence"] = {"seconds": seconds, "peak_bytes": base + max(extra, hvp_extra) + 4 * nparam * 8}
    first = next((phases[p] for p in ("hessian", "sharpness", "coherence") if p in phases), None)
    if first is not None:  # the phase that makes the run's first product
        first["seconds"] += choice_s
    peak = max((p["peak_bytes"] for p in phases.values()), default=base)
    return Estimate(points=points, forward_passes=points * chunks, seconds_per_point=per_point,
                    seconds=phases.get("slices", {}).get("seconds", 0.0), strategy=pb.strategy, workers=pb.workers,
                    memory_bytes=int(peak),
                    memory_note=("peak CUDA memory" if cuda else "peak resident memory") + " of the costliest phase, "
                                "from products measured on the real batch",
                    n_parameters=nparam, n_samples=pb.n, ranks=pb.comm.world,
                    curvature_seconds=phases.get("hessian", {}).get("seconds", 0.0),
                    sharpness_seconds=phases.get("sharpness", {}).get("seconds", 0.0),
                    coherence_seconds=phases.get("coherence", {}).get("seconds", 0.0),
                    memory_budget=pb.memory_budget, phases=phases, points_stored=points_stored, stored=kept.analyses,
                    notes=estimate_notes(curv))


__all__ = ["ScanConfig", "ScanSummary", "SliceResult", "Setup", "Estimate", "StoredWork", "setup", "run_scan",
           "estimate", "stored_work", "plan_slices"]
