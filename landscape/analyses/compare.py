"""Compare solutions post hoc: the same protocol on every model, a metrics table, and connectivity.

Every model gets the analysis ``landscape scan`` runs (same seed, same direction recipe, each direction
filter-normalized to that model's own weights), in its own run file ``DIR/<name>/run.h5`` (reused when
complete). An input may be a finished run file: the model, data, loss, state key and subset size it recorded are
reused where the command line leaves them open, so run files of scans of plain state dicts need no flags (a run
file's specs run as if typed: compare run files you made). The comparison file ``DIR/compare.h5`` then holds, for
the report and for scripts:

- ``/compare/models``: names, checkpoints and their sha256;
- ``/compare/metrics/<metric>``: ``value``, ``stderr`` and ``rank`` per model (loss and accuracy at the
  checkpoint, λmax, the trace, each sharpness measure at its first ρ, m-coherence), and the attribute ``order``
  (``lower first``, or ``higher first`` for accuracy, basin width and m-coherence: :data:`HIGHER_FIRST`);
- ``/compare/slices/<i>``: each model's 2D slice (``x``, ``y``, ``loss``), drawn on one colour scale;
- ``/compare/interpolation/<i>_<j>``: the linear path from model i to model j with its loss and error
  barriers (:mod:`.connectivity`), after weight matching when ``align`` (:mod:`.matching`), with the
  unaligned path under ``unaligned/``; ``/compare/bezier/<i>_<j>`` with ``curve="bezier"``.

Models with BatchNorm are interpolated with re-estimated BatchNorm statistics at every point (Ainsworth
et al. 2023: statistics interpolated with the weights are wrong), recorded as the attribute ``bn``.

Under ``torchrun`` each model's analysis is a distributed scan; rank 0 alone reads and writes the files and
broadcasts what it read; the interpolation paths are evaluated on every rank (a few dozen points) with
data-parallel gradients for the Bezier fit, so every rank holds the same results.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np

from .connectivity import Path as ConnPath
from .connectivity import bezier_path, fit_bezier, linear_path, with_ends
from ..errors import LandscapeError
from .matching import apply_permutation, permutation_spec, weight_matching
from ..problem.problem import BN_TYPES, Problem
from ..io.runfile import SCHEMA, RunFile, decode_attr, encode_attr
from .scan import ScanConfig, run_scan, setup, tool_provenance
from ..io.specs import Spec

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CompareConfig:
    """What ``landscape compare`` is told. ``scan`` is the per-model protocol (its ``checkpoint`` and
    ``output`` are replaced for each model)."""

    inputs: tuple[str, ...]
    scan: ScanConfig
    output: str = "reports/compare"
    align: bool = False
    curve: str | None = None
    alpha_range: tuple[float, float] = (-0.5, 1.5)
    alpha_steps: int = 51
    bezier_steps: int = 300

    def __post_init__(self) -> None:
        if len(self.inputs) < 2:
            raise LandscapeError("compare needs at least two checkpoints or run files")
        if self.curve not in (None, "bezier"):
            raise LandscapeError(f"--curve {self.curve!r} is unknown", hint="use --curve bezier")
        lo, hi = self.alpha_range
        if not (lo <= 0 and hi >= 1) or self.alpha_steps < 3:
            raise LandscapeError("the interpolation grid must cover [0, 1] with at least 3 points")

    def alpha(self) -> np.ndarray:
        """The interpolation grid, with 0 and 1 exactly on it."""
        return with_ends(np.linspace(*self.alpha_range, self.alpha_steps))


@dataclass(frozen=True)
class Model:
    name: str
    checkpoint: str
    run_file: Path
    #: ScanConfig fields recorded in the model's run file (model, data, loss, ...), used where not given
    recorded: Mapping[str, Any] = field(default_factory=dict)

    def config(self, scan: ScanConfig) -> ScanConfig:
        """``scan`` for this model: its checkpoint and run file, and the specs its run file recorded wherever
        ``scan`` leaves them open."""
        fill = {k: v for k, v in self.recorded.items() if getattr(scan, k) in (None, ())}
        return replace(scan, checkpoint=self.checkpoint, output=str(self.run_file), **fill)


def _recorded(f: h5py.File) -> dict[str, Any]:
    """The specs a run file was made with, as ScanConfig fields: what a scan of a plain checkpoint needed."""
    attrs = {k: decode_attr(f.attrs[k]) for k in ("model_spec", "data_spec", "loss", "state_key", "max_samples")
             if k in f.attrs}
    out: dict[str, Any] = {}
    if isinstance(attrs.get("model_spec"), Mapping):
        out["model"] = Spec.from_json(attrs["model_spec"])
    if isinstance(attrs.get("data_spec"), Mapping):
        out["data"] = Spec.from_json(attrs["data_spec"])
    if attrs.get("loss"):
        out["loss"] = str(attrs["loss"])
    if attrs.get("state_key"):
        out["state_key"] = str(attrs["state_key"])
    if isinstance(attrs.get("max_samples"), (int, np.integer)) and attrs["max_samples"] > 0:
        out["max_samples"] = int(attrs["max_samples"])
    return out


@dataclass(frozen=True)
class CompareSummary:
    path: str
    models: tuple[str, ...]
    metrics: Mapping[str, Mapping[str, list[float]]]
    pairs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"compare_file": self.path, "models": list(self.models), "metrics": dict(self.metrics),
                "pairs": dict(self.pairs)}


def _models(cfg: CompareConfig) -> list[Model]:
    out, seen = [], set()
    for item in cfg.inputs:
        p = Path(item)
        if not p.exists():
            raise LandscapeError(f"{item} does not exist", hint="give checkpoints or run files written by landscape")
        if p.suffix in (".h5", ".hdf5"):
            with h5py.File(p, "r") as f:
                if decode_attr(f.attrs.get("schema")) != SCHEMA or "checkpoint_path" not in f.attrs:
                    raise LandscapeError(f"{item} is not a landscape run file of a checkpoint")
                ck = str(decode_attr(f.attrs["checkpoint_path"]))
                recorded = _recorded(f)
            name, run = p.parent.name or p.stem, p
        else:
            ck, name, recorded = str(p), p.name if p.is_dir() else p.stem, {}
            run = Path(cfg.output) / name / "run.h5"
        while name in seen:
            name += "_"
        seen.add(name)
        out.append(Model(name, ck, run, recorded))
    return out


def _complete(run: Path) -> bool:
    if not run.exists():
        return False
    with h5py.File(run, "r") as f:
        return "completed" in f.attrs and "slices" in f and ("hessian" in f or "sharpness" in f)


def _main_slice(f: h5py.File) -> h5py.Group | None:
    """The random slice a model's run file holds (2D first), the one the comparison shows and reads values from."""
    slices = f.get("slices", {})
    return next((slices[n] for n in ("random_2d", "random_1d") if n in slices), None)


def _metric_values(run: Path) -> dict[str, tuple[float, float]]:
    """``metric -> (value, standard error)`` of one model's run file (NaN: none); λmax's error is its residual."""
    out: dict[str, tuple[float, float]] = {}
    nan = float("nan")
    with h5py.File(run, "r") as f:
        sl = _main_slice(f)
        if sl is not None:
            out["loss"] = (float(sl.attrs.get("loss_at_origin", nan)), nan)
            if "accuracy" in sl:
                x = sl["x"][()]
                idx = tuple(int(np.abs(a).argmin()) for a in ([x] if "y" not in sl else [x, sl["y"][()]]))
                out["accuracy"] = (float(sl["accuracy"][idx]), nan)
        if "hessian" in f:
            h = f["hessian"]
            if "eigenvalues" in h:
                out["lambda_max"] = (float(h["eigenvalues"][0]), float(h["residuals"][0]))
            if "trace" in h:
                out["trace"] = (float(h["trace"].attrs["estimate"]), float(h["trace"].attrs["stderr"]))
        for name, g in (f["sharpness"].items() if "sharpness" in f else []):
            out[f"sharpness_{name}"] = (float(g["value"][0]), float(g["stderr"][0]))
        if "coherence" in f:
            out["m_coherence"] = (float(f["coherence"].attrs["m_coherence"]), nan)
    return out


#: metrics where more is better or flatter (accuracy, a wider basin, more coherent per-sample gradients); every
#: other metric (loss, curvature, sharpness, where PAC-Bayes is ``1 / sigma'^2``) ranks lowest first
HIGHER_FIRST = ("accuracy", "basin_width", "m_coherence")
#: how the ranks read, for tables and the report
ORDER_NOTE = ("rank 1: flattest or best, i.e. the lowest loss, curvature and sharpness, the highest accuracy, "
              "basin width and m-coherence")


def higher_first(metric: str) -> bool:
    """Whether a larger value of ``metric`` ranks first (:data:`HIGHER_FIRST`; sharpness groups are named
    ``basin_width_l2`` and the like)."""
    return any(h in metric.replace("-", "_") for h in HIGHER_FIRST)


def _rank(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """1 for the best (lowest value, or highest where ``higher_is_better``); ties share a rank; NaN ranks last."""
    key = np.where(np.isfinite(values), -values if higher_is_better else values, np.inf)
    return np.array([1 + int(np.sum(key < k)) for k in key], dtype=np.int64)


def _provenance(cfg: CompareConfig) -> dict[str, Any]:
    return {**tool_provenance(), "kind": "compare", "seed": cfg.scan.seed, "align": cfg.align,
            "curve": cfg.curve or ""}


def _pair_attrs(cfg: CompareConfig, bn: str) -> dict[str, Any]:
    return {"aligned": cfg.align, "alpha_range": list(cfg.alpha_range), "alpha_steps": cfg.alpha_steps, "bn": bn,
            "curve": cfg.curve or "", "bezier_steps": cfg.bezier_steps if cfg.curve else 0, "seed": cfg.scan.seed}


@dataclass(frozen=True)
class Prepared:
    """The models of a comparison, loaded and checked (same data, same architecture)."""

    models: tuple[Model, ...]
    setups: tuple[Any, ...]


def prepare_compare(cfg: CompareConfig) -> Prepared:
    """Load every model and its data; refuse models evaluated on different data or of different shapes."""
    models = _models(cfg)
    setups = [setup(m.config(cfg.scan)) for m in models]
    if len({st.data.sha256 for st in setups}) > 1:
        raise LandscapeError("the models are evaluated on different data (their data_sha256 differ)",
                             hint="give every model the same --data and --max-samples")
    shapes = [{n: tuple(t.shape) for n, t in st.model.named_parameters()} for st in setups]
    for m, sh in zip(models[1:], shapes[1:]):
        if sh != shapes[0]:
            raise LandscapeError(f"{m.name} and {models[0].name} have different parameters (names or shapes): "
                                 "interpolating between them is undefined",
                                 hint="compare checkpoints of one architecture")
    return Prepared(tuple(models), tuple(setups))


def run_compare(cfg: CompareConfig, *, progress: ProgressFn | None = None,
                prepared: Prepared | None = None) -> CompareSummary:
    """Analyse every model (reusing complete run files), then compare them into ``DIR/compare.h5``."""
    prep = prepared or prepare_compare(cfg)
    models, setups = prep.models, prep.setups
    comm = setups[0].problem.comm
    progress = progress if comm.is_writer else None
    for k, (m, st) in enumerate(zip(models, setups)):
        if progress:
            progress(f"analysing {m.name}", k, len(models))
        if not comm.from_writer(lambda: _complete(m.run_file)):
            run_scan(replace(m.config(cfg.scan), resume=True),
                     progress=progress, prepared=st)
    values = comm.from_writer(lambda: [_metric_values(m.run_file) for m in models])
    names = sorted(set().union(*values), key=lambda k: (not k.startswith(("loss", "accuracy")), k))
    metrics = {}
    for k in names:
        v = np.array([vals.get(k, (np.nan, np.nan))[0] for vals in values])
        e = np.array([vals.get(k, (np.nan, np.nan))[1] for vals in values])
        metrics[k] = {"value": v.tolist(), "stderr": e.tolist(), "rank": _rank(v, higher_first(k)).tolist(),
                      "order": "higher first" if higher_first(k) else "lower first"}
    path = Path(cfg.output) / "compare.h5"
    pairs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        rf = comm.from_writer(lambda: stack.enter_context(RunFile(path, mode="resume")), share=False)
        comm.from_writer(lambda: _write_models(rf, cfg, models, setups, metrics), share=False)
        for i in range(len(models)):
            for j in range(i + 1, len(models)):
                key = f"{i}_{j}"
                if progress:
                    progress(f"connecting {models[i].name} and {models[j].name}", 0, 0)
                pairs[key] = _connect(rf, cfg, key, setups[i], setups[j])
    return CompareSummary(str(path), tuple(m.name for m in models), metrics, pairs)


def _write_models(rf: RunFile, cfg: CompareConfig, models: Sequence[Model], setups: Sequence[Any],
                  metrics: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """The comparison file's header: provenance, the models, the metrics table and each model's main slice."""
    with rf.transaction() as f:
        for k, v in _provenance(cfg).items():
            if k != "created" or k not in f.attrs:
                f.attrs[k] = encode_attr(v)
        if "compare" in f:
            for key in ("models", "metrics", "slices"):
                if key in f["compare"]:
                    del f["compare"][key]
        c = f.require_group("compare")
        mg = c.create_group("models")
        mg.create_dataset("name", data=np.array([m.name for m in models], dtype=h5py.string_dtype()))
        mg.create_dataset("checkpoint", data=np.array([str(Path(m.checkpoint).resolve()) for m in models],
                                                      dtype=h5py.string_dtype()))
        mg.create_dataset("checkpoint_sha256", data=np.array([st.checkpoint.sha256 for st in setups],
                                                             dtype=h5py.string_dtype()))
        mg.create_dataset("run_file", data=np.array([str(m.run_file) for m in models], dtype=h5py.string_dtype()))
        for k, d in metrics.items():
            g = c.create_group(f"metrics/{k}")
            g.attrs["order"] = d["order"]
            for field_ in ("value", "stderr", "rank"):
                g.create_dataset(field_, data=np.asarray(d[field_]))
        for i, m in enumerate(models):
            with h5py.File(m.run_file, "r") as src:
                sl = _main_slice(src)
                if sl is not None:
                    g = c.create_group(f"slices/{i}")
                    for key in ("x", "y", "loss", "done"):
                        if key in sl:
                            g.create_dataset(key, data=sl[key][()])
                    g.attrs["name"] = m.name


#: Results of a pair stored as attributes of ``/compare/interpolation/<i>_<j>``.
_RESULT_ATTRS = ("loss_barrier", "error_barrier", "loss_barrier_unaligned", "error_barrier_unaligned",
                 "bezier_max_loss", "bezier_loss_barrier")


def _connect(rf: RunFile, cfg: CompareConfig, key: str, a: Any, b: Any) -> dict[str, Any]:
    """Interpolate model a to model b (aligned first with ``cfg.align``) into ``/compare/interpolation/<key>``."""
    has_bn = any(isinstance(mod, BN_TYPES) for mod in a.model.modules())
    bn = "recompute" if has_bn else cfg.scan.bn
    attrs = _pair_attrs(cfg, bn)

    def stored() -> dict[str, Any] | None:
        with rf.read() as f:
            g = f.get(f"compare/interpolation/{key}")
            if g is not None and all(decode_attr(g.attrs.get(k)) == v for k, v in attrs.items()) and \
                    (not cfg.curve or f"compare/bezier/{key}" in f):
                return {k: decode_attr(v) for k, v in g.attrs.items() if k in _RESULT_ATTRS}
        return None

    pa = a.problem
    done = pa.comm.from_writer(stored)  # rank 0 reads the file; every rank takes the same branch
    if done is not None:
        return done
    pb = Problem(a.model, a.data.X, a.data.y, pa.loss_fn, device=pa.device, dtype=pa.dtype,
                 batch_size=pa.batch_size, bn=bn, bn_batches=cfg.scan.bn_batches, seed=cfg.scan.seed,
                 comm=pa.comm, hvp_mode=cfg.scan.hvp) if bn != pa.bn else pa
    theta_b = {n: t.detach().to(pa.device, pa.dtype) for n, t in b.model.named_parameters()}
    alpha = cfg.alpha()
    plain = linear_path(pb, theta_b, alpha)
    out: dict[str, Any] = {"loss_barrier": plain.loss_barrier, "error_barrier": plain.error_barrier}
    aligned = None
    if cfg.align:
        spec = permutation_spec(a.model, a.data.X[:64].to(next(a.model.parameters())))
        sa, sb = a.model.state_dict(), b.model.state_dict()
        perms = weight_matching(spec, sa, sb, seed=cfg.scan.seed)
        sb = apply_permutation(spec, sb, perms)
        theta_b = {n: sb[n].to(pa.device, pa.dtype) for n, _ in b.model.named_parameters()}
        aligned = linear_path(pb, theta_b, alpha)
        out.update(loss_barrier=aligned.loss_barrier, error_barrier=aligned.error_barrier,
                   loss_barrier_unaligned=plain.loss_barrier, error_barrier_unaligned=plain.error_barrier)
    curve = None
    if cfg.curve == "bezier":
        bend = fit_bezier(pb, theta_b, steps=cfg.bezier_steps, seed=cfg.scan.seed)
        curve = bezier_path(pb, theta_b, bend, np.linspace(0, 1, 51))
        out["bezier_max_loss"] = float(np.nanmax(curve.loss))
        out["bezier_loss_barrier"] = curve.loss_barrier

    def write() -> None:
        with rf.transaction() as f:
            for grp in (f"compare/interpolation/{key}", f"compare/bezier/{key}"):
                if grp in f:
                    del f[grp]
            g = f.create_group(f"compare/interpolation/{key}")
            main: ConnPath = aligned if aligned is not None else plain
            main.write(g, **attrs, **{k: v for k, v in out.items() if k not in ("loss_barrier", "error_barrier")})
            if aligned is not None:
                plain.write(g.create_group("unaligned"))
            if curve is not None:
                curve.write(f.create_group(f"compare/bezier/{key}"), max_loss=out["bezier_max_loss"], **attrs)

    pa.comm.from_writer(write, share=False)
    return out


def read_models(f: h5py.File) -> list[str]:
    """Model names of a comparison file."""
    return [s.decode() if isinstance(s, bytes) else str(s) for s in f["compare/models/name"][()]]

