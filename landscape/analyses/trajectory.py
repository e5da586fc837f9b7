"""Training dynamics over a series of checkpoints: where the weights went, and how sharp it got.

For checkpoints theta_0 ... theta_T ordered by their recorded step:

- **PCA plane** (Li et al. 2018, §7): the rows theta_i - theta_T, mean-centred, give principal directions
  v_1, v_2 (unit vectors by SVD); the path's coordinates are ``(theta_i - theta_T) · v_k`` (the final
  checkpoint at the origin), with the explained variance ratio ``s_k^2 / sum s^2``. The loss is evaluated
  on a grid of that plane around theta_T.
- **Sharpness against the stability threshold** (Cohen et al. 2021, 2022): full-batch GD with step eta is
  stable on a quadratic while ``lambda_max < 2/eta``; with heavy-ball momentum beta the threshold is
  ``(2 + 2 beta)/eta``. For Adam the relevant quantity is the preconditioned sharpness
  ``lambda_max(P^{-1/2} H P^{-1/2})`` with ``P = (1 - beta1^t) diag(sqrt(v_t / (1 - beta2^t)) + eps)`` from the
  optimizer state, against ``(2 + 2 beta1) / ((1 - beta1) eta)``. A checkpoint whose ratio
  ``sharpness / threshold`` is at least 0.9 is flagged as at the edge of stability.
- **Distances**: ``||theta_i - theta_0||``, per-tensor weight norms, and the effective step size
  ``||theta_i - theta_{i-1}|| / (step_i - step_{i-1})``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import torch

from ..io import hf
from ..errors import LandscapeError
from ..problem.curvature import CurvatureOperator
from ..linalg.lanczos import Eigenpairs, lanczos
from ..problem.problem import Params, Problem
from ..io.runfile import encode_attr, link_name
from .slices import compute_slice

#: Ratio of sharpness to the stability threshold from which a checkpoint counts as at the edge of stability.
EOS_RATIO = 0.9


@dataclass(frozen=True)
class Snapshot:
    """One checkpoint of the series: its step, parameters, buffers and optimizer (name, hyperparameters,
    and for Adam the per-parameter second moments ``exp_avg_sq`` with the optimizer's step count), and the file it
    was loaded from."""

    name: str
    step: int
    params: Params
    buffers: Params
    optimizer: Mapping[str, Any] | None = None
    exp_avg_sq: Params | None = None
    adam_step: int | None = None
    path: str = ""


#: said once when :func:`mixed_groups` holds
MIXED_GROUPS = ("the optimizer's parameter groups differ in learning rate, momentum or betas: no single stability "
                "threshold (2/lr) applies, so threshold and ratio are recorded as NaN")
#: the hyperparameters a stability threshold depends on: parameter groups that differ in one have no common threshold
THRESHOLD_KEYS = ("lr", "momentum", "betas")


def mixed_groups(optimizer: Mapping[str, Any] | None) -> bool:
    """Whether the recorded optimizer's parameter groups differ in a hyperparameter of :data:`THRESHOLD_KEYS`
    (layer-wise learning rates, say): then no single ``2 / lr`` bounds the sharpness of the whole Hessian."""
    groups = (optimizer or {}).get("param_groups") or ()
    return len({tuple(str(g.get(k)) for k in THRESHOLD_KEYS) for g in groups}) > 1


def threshold(optimizer: Mapping[str, Any] | None) -> tuple[float, str]:
    """The stability threshold of the recorded optimizer and which sharpness it bounds (``hessian`` or
    ``preconditioned``): ``(2 + 2 beta) / lr`` for SGD with momentum ``beta`` (Cohen et al. 2021), and
    ``(2 + 2 beta1) / ((1 - beta1) lr)`` on Adam's preconditioned Hessian (Cohen et al. 2022). NaN when the learning
    rate is unknown or the parameter groups differ in it (:func:`mixed_groups`)."""
    if not optimizer:
        return math.nan, "hessian"
    hp = optimizer.get("hyperparameters", {})
    lr = hp.get("lr")
    name = str(optimizer.get("name", "")).lower()
    kind = "preconditioned" if "betas" in hp or name.startswith("adam") else "hessian"
    if not lr or mixed_groups(optimizer):
        return math.nan, kind if lr else "hessian"
    if kind == "preconditioned":
        b1 = float(hp.get("betas", (0.9, 0.999))[0])
        return (2 + 2 * b1) / ((1 - b1) * lr), kind
    beta = float(hp.get("momentum", 0.0) or 0.0)
    return (2 + 2 * beta) / lr, kind


@dataclass(frozen=True)
class PCA:
    coords: np.ndarray  # (checkpoints, 2)
    explained_variance: np.ndarray  # ratio of every component
    directions: tuple[Params, Params]


def flatten(p: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([p[n].detach().double().cpu().reshape(-1).numpy() for n in names])


def pca_path(snapshots: Sequence[Snapshot], names: Sequence[str]) -> PCA:
    """The top-2 principal directions of ``theta_i - theta_final`` (mean-centred) and the path's coordinates."""
    final = snapshots[-1]
    M = np.stack([flatten(s.params, names) - flatten(final.params, names) for s in snapshots])
    _, sv, Vt = np.linalg.svd(M - M.mean(axis=0), full_matrices=False)
    k = min(2, Vt.shape[0])
    V = Vt[:k]
    if k < 2:  # one checkpoint pair: the plane's second axis is arbitrary; take any orthogonal unit vector
        extra = np.random.default_rng(0).standard_normal(V.shape[1])
        extra -= V[0] * (V[0] @ extra)
        V = np.vstack([V, extra / np.linalg.norm(extra)])
    coords = M @ V.T
    total = float(np.sum(sv ** 2))
    ratio = sv ** 2 / total if total > 0 else np.zeros_like(sv)
    dirs = []
    for row in V:
        d, i = {}, 0
        for n in names:
            t = final.params[n]
            d[n] = torch.as_tensor(row[i:i + t.numel()], dtype=t.dtype).reshape(t.shape)
            i += t.numel()
        dirs.append(d)
    return PCA(coords=coords, explained_variance=ratio, directions=(dirs[0], dirs[1]))


def sharpness_pair(problem: Problem, params: Params | None, *, precondition: Params | None = None,
                   tol: float = 1e-4, seed: int = 0, v0: np.ndarray | None = None, max_matvec: int = 300,
                   verify: bool = True) -> Eigenpairs:
    """The top eigenpair of H at ``params`` (the Problem's own ``theta0`` when None: then its fastest HVP engine)
    (of ``P^{-1/2} H P^{-1/2}`` with the diagonal ``precondition``), by Lanczos started from ``v0`` (a previous
    step's eigenvector: a warm start) or a seeded random vector; ``verify``: see :func:`landscape.linalg.lanczos.lanczos`."""
    point = None if params is None else {n: params[n].to(problem.device, problem.dtype) for n in problem.names}
    op = CurvatureOperator(problem, point=point)
    if precondition is None:
        matvec = op.matvec
    else:
        scale = op.to_vector(precondition) ** -0.5

        def matvec(v: np.ndarray) -> np.ndarray:
            return op.matvec(v * scale) * scale

    return lanczos(matvec, op.n, k=1, tol=tol, max_matvec=max_matvec, seed=seed, v0=v0, verify=verify)


def preconditioner(exp_avg_sq: Mapping[str, torch.Tensor], step: int, hyperparameters: Mapping[str, Any]) -> Params:
    """Adam's ``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)`` per parameter from its second moments
    ``exp_avg_sq`` (``v_t``) after ``step`` (``t``) steps."""
    b1, b2 = (float(b) for b in hyperparameters.get("betas", (0.9, 0.999)))
    eps = float(hyperparameters.get("eps", 1e-8))
    return {n: (1 - b1 ** step) * ((v.double() / (1 - b2 ** step)).sqrt() + eps) for n, v in exp_avg_sq.items()}


def adam_preconditioner(s: Snapshot) -> Params | None:
    """:func:`preconditioner` from a snapshot's Adam state (None without one)."""
    if s.exp_avg_sq is None or not s.adam_step or not s.optimizer:
        return None
    return preconditioner(s.exp_avg_sq, s.adam_step, s.optimizer.get("hyperparameters", {}))


@dataclass(frozen=True)
class TrajectoryResult:
    names: tuple[str, ...]
    step: np.ndarray
    lr: np.ndarray
    sharpness: np.ndarray
    sharpness_kind: tuple[str, ...]
    threshold: np.ndarray
    distance: np.ndarray
    step_size: np.ndarray
    weight_norms: Mapping[str, np.ndarray]
    pca: PCA
    plane: Mapping[str, np.ndarray]  # x, y, loss (and accuracy) of the PCA plane

    @property
    def ratio(self) -> np.ndarray:
        return self.sharpness / self.threshold

    @property
    def edge_of_stability(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(self.ratio, nan=0.0) >= EOS_RATIO

    def write(self, f: h5py.File) -> None:
        if "trajectory" in f:
            del f["trajectory"]
        g = f.create_group("trajectory")
        g.create_dataset("checkpoint", data=np.array(self.names, dtype=h5py.string_dtype()))
        for k in ("step", "lr", "sharpness", "threshold", "distance", "step_size", "ratio", "edge_of_stability"):
            g.create_dataset(k, data=getattr(self, k))
        g.create_dataset("sharpness_kind", data=np.array(self.sharpness_kind, dtype=h5py.string_dtype()))
        for n, v in self.weight_norms.items():
            g.create_dataset(f"weight_norms/{link_name(n)}", data=v)
        p = g.create_group("pca")
        p.create_dataset("coords", data=self.pca.coords)
        p.create_dataset("explained_variance", data=self.pca.explained_variance)
        for k, d in enumerate(self.pca.directions):
            for n, t in d.items():
                p.create_dataset(f"directions/{k}/{link_name(n)}", data=t.double().cpu().numpy())
        pl = g.create_group("plane")
        for k, v in self.plane.items():
            pl.create_dataset(k, data=v)
        g.attrs["eos_ratio"] = encode_attr(EOS_RATIO)


def analyze_trajectory(problem_for: Any, snapshots: Sequence[Snapshot], *, plane_steps: int = 21,
                       margin: float = 0.25, tol: float = 1e-4, seed: int = 0, progress: Any = None) -> TrajectoryResult:
    """Everything above for ``snapshots`` (ordered by step); ``problem_for(snapshot)`` gives its Problem."""
    names = tuple(snapshots[-1].params)
    steps = np.array([s.step for s in snapshots], dtype=np.int64)
    first = flatten(snapshots[0].params, names)
    flat = [flatten(s.params, names) for s in snapshots]
    distance = np.array([np.linalg.norm(v - first) for v in flat])
    step_size = np.full(len(snapshots), np.nan)
    for i in range(1, len(snapshots)):
        dt = steps[i] - steps[i - 1]
        step_size[i] = np.linalg.norm(flat[i] - flat[i - 1]) / dt if dt > 0 else np.nan
    norms = {n: np.array([float(s.params[n].double().norm()) for s in snapshots]) for n in names}
    sharp, kinds, thr, lrs = [], [], [], []
    for k, s in enumerate(snapshots):
        if progress:
            progress("sharpness along the trajectory", k, len(snapshots))
        t, kind = threshold(s.optimizer)
        pre = adam_preconditioner(s) if kind == "preconditioned" else None
        if kind == "preconditioned" and pre is None:
            kind, t = "hessian", math.nan  # Adam without its state: the raw sharpness has no threshold
        pb = problem_for(s)
        sharp.append(float(sharpness_pair(pb, s.params, precondition=pre, tol=tol, seed=seed).eigenvalues[0]))
        kinds.append(kind)
        thr.append(t)
        lrs.append(float((s.optimizer or {}).get("hyperparameters", {}).get("lr", math.nan) or math.nan))
    if progress:
        progress("sharpness along the trajectory", len(snapshots), len(snapshots))
    if any(mixed_groups(s.optimizer) for s in snapshots):
        warnings.warn(MIXED_GROUPS)
    pca = pca_path(snapshots, names)
    lo, hi = pca.coords.min(axis=0), pca.coords.max(axis=0)
    pad = np.maximum((hi - lo) * margin, 1e-3 * max(1.0, float(np.abs(pca.coords).max())))
    xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], plane_steps)
    ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], plane_steps)
    # around the final checkpoint (the last Problem of the loop); under torchrun the points are shared out like a
    # scan's and gathered on rank 0, the one that writes
    vals = compute_slice(pb, list(pca.directions), (xs, ys))
    plane = {"x": xs, "y": ys, **vals}
    return TrajectoryResult(names=tuple(s.name for s in snapshots), step=steps, lr=np.array(lrs),
                            sharpness=np.array(sharp), sharpness_kind=tuple(kinds), threshold=np.array(thr),
                            distance=distance, step_size=step_size, weight_norms=norms, pca=pca, plane=plane)


# ---------------------------------------------------------------------------------------------- from files
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")


def checkpoint_files(inputs: Sequence[str]) -> list[str]:
    """The checkpoints named by ``inputs``: files and ``save_pretrained`` folders as they are, other folders expanded
    to the checkpoint files and ``save_pretrained`` folders they hold."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and not hf.is_folder(p):
            out += sorted(str(q) for q in p.iterdir() if q.suffix in CHECKPOINT_SUFFIXES or hf.is_folder(q))
        elif p.exists():
            out.append(str(p))
        else:
            raise LandscapeError(f"{item} does not exist", hint="give checkpoint files or a folder of them")
    if len(out) < 2:
        raise LandscapeError("a trajectory needs at least two checkpoints", hint="give a folder or several files")
    return out


def _adam_state(opt: Mapping[str, Any] | None, names: Sequence[str]) -> tuple[Params | None, int | None]:
    """Adam's ``exp_avg_sq`` by parameter name and its step count, from an optimizer state dict that holds them."""
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping):
        return None, None
    order = [i for g in opt.get("param_groups", []) for i in g.get("params", [])]
    state = opt["state"]
    if len(order) != len(names) or not all(i in state and "exp_avg_sq" in state[i] for i in order):
        return None, None
    step = state[order[0]].get("step")
    return ({n: state[i]["exp_avg_sq"].double() for n, i in zip(names, order)},
            int(step.item() if isinstance(step, torch.Tensor) else step))


def load_snapshots(paths: Sequence[str], *, model_spec: Any = None, state_key: str | None = None,
                   trust_pickle: bool = False, strict: bool = True) -> list[Snapshot]:
    """Every checkpoint as a :class:`Snapshot`, ordered by recorded step (file order where steps are missing);
    all must hold the same parameters as the first."""
    import warnings

    from ..io.checkpoint import load_checkpoint
    from .scan import build_model

    snaps: list[Snapshot] = []
    shapes = None
    for path in paths:
        ck = load_checkpoint(path, state_key=state_key, trust_pickle=trust_pickle, optimizer_state=True)
        model, _, _ = build_model(ck, model_spec, strict=strict)
        params = {n: t.detach().clone() for n, t in model.named_parameters()}
        if shapes is None:
            shapes = {n: tuple(t.shape) for n, t in params.items()}
        elif {n: tuple(t.shape) for n, t in params.items()} != shapes:
            raise LandscapeError(f"{path} holds another architecture than the rest of the series",
                                 hint="give the checkpoints of one training run")
        sq, astep = _adam_state(ck.optimizer_state, list(params))
        snaps.append(Snapshot(name=Path(path).stem, path=str(path), step=ck.step if ck.step is not None else -1,
                              params=params, buffers={n: b.detach().clone() for n, b in model.named_buffers()},
                              optimizer=ck.optimizer, exp_avg_sq=sq, adam_step=astep))
    if any(s.step < 0 for s in snaps):
        warnings.warn("some checkpoints record no training step: the series is ordered as the files were given")
        return snaps
    return sorted(snaps, key=lambda s: s.step)


@dataclass(frozen=True)
class TrajectoryConfig:
    """What ``landscape trajectory`` is told; ``scan`` gives data, loss and model specs (its checkpoint unused)."""

    inputs: tuple[str, ...]
    scan: Any
    output: str | None = None
    plane_steps: int = 21

    def run_path(self, final: str) -> Path:
        """``-o`` (a file, or a folder for ``trajectory.h5``), else ``reports/trajectory_<final checkpoint>``."""
        if self.output:
            out = Path(self.output)
            return out if out.suffix in (".h5", ".hdf5") else out / "trajectory.h5"
        return Path("reports") / f"trajectory_{Path(final).stem}" / "trajectory.h5"


def run_trajectory(cfg: TrajectoryConfig, *, progress: Any = None) -> tuple[str, TrajectoryResult]:
    """Load the series, analyse it and write ``trajectory.h5`` (replacing an earlier one).

    Under ``torchrun`` every rank loads the series; the Hessian-vector products of the sharpness are
    data-parallel and the plane's points are shared out (:mod:`landscape.runtime.distributed`). Rank 0 writes the file;
    the other ranks' results hold only their own points of the plane."""
    import copy as _copy
    from dataclasses import replace

    from ..io.runfile import RunFile
    from .scan import provenance, setup

    files = checkpoint_files(cfg.inputs)
    snaps = load_snapshots(files, model_spec=cfg.scan.model, state_key=cfg.scan.state_key,
                           trust_pickle=cfg.scan.trust_pickle, strict=cfg.scan.strict)
    base = replace(cfg.scan, checkpoint=snaps[-1].path)
    st = setup(base)
    pb0 = st.problem

    def problem_for(s: Snapshot) -> Problem:
        m = _copy.deepcopy(st.model)
        m.load_state_dict({**s.params, **s.buffers}, strict=False)
        return Problem(m, st.data.X, st.data.y, pb0.loss_fn, device=pb0.device, dtype=pb0.dtype,
                       batch_size=pb0.batch_size, bn=base.bn, bn_batches=base.bn_batches, seed=base.seed,
                       comm=pb0.comm, hvp_mode=base.hvp)

    result = analyze_trajectory(problem_for, snaps, plane_steps=cfg.plane_steps, seed=base.seed,
                                progress=progress if pb0.comm.is_writer else None)
    path = cfg.run_path(snaps[-1].path)
    prov = provenance(base, st)

    def write() -> None:
        with RunFile(path, mode="overwrite") as rf:
            with rf.transaction() as f:
                for k, v in {**prov, "kind": "trajectory"}.items():
                    f.attrs[k] = encode_attr(v)
                result.write(f)

    pb0.comm.from_writer(write, share=False)  # rank 0 writes; an error there is raised on every rank
    return str(path), result

