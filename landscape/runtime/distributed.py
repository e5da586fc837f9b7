"""Running under ``torchrun``: the ranks of a job, what each computes, and the one rank that writes.

``torchrun --nproc-per-node N -m landscape scan ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_from_env` joins them into a
``torch.distributed`` process group (gloo on CPU, NCCL on GPU) and returns a :class:`Comm`. There is no scheduler
of our own: ``torchrun`` (under SLURM, Kubernetes or by hand) starts and watches the processes.

Work is split two ways:

* **Points** (slice grid points): every rank holds the whole evaluation set and evaluates its share of the
  blocks of points; rank 0 gathers each round of blocks and writes them (:func:`landscape.analyses.slices.compute_slice`).
  Each point is computed exactly as in one process, so slices are bitwise equal to a one-process run with the
  same evaluation strategy (``--strategy auto`` chooses by timing, per run) and BLAS threads per process.
* **Data** (gradients, Hessian-vector products, per-sample statistics, every Monte Carlo probe of the curvature
  and sharpness estimators): each rank takes a contiguous shard of the samples (:meth:`Comm.shard`), computes its
  part of the sum ``sum_c (n_c / n) f_c`` and the parts are added by an all-reduce. Every rank then holds the same
  result, so the algorithms above (Lanczos, Hutchinson, APGD, ...) run unchanged and in step on every rank; only
  the order of a few float additions differs from one process (results agree to round-off).

Exactly one rank (rank 0, :attr:`Comm.is_writer`) opens the run file; decisions taken from the file or from
timings are made there and broadcast (:meth:`Comm.from_writer`), so every rank takes the same branch.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import LandscapeError

T = TypeVar("T")


@dataclass(frozen=True)
class Comm:
    """This process's place in a job of ``world`` ranks (``world == 1``: one process, every method a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes files and prints; the others compute and stay quiet."""
        return self.rank == 0

    def shard(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """``[lo, hi)``: this rank's contiguous share of ``n`` items (sizes differ by at most one).

        >>> [Comm(rank=r, world=3).shard(10) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
        """
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        lo = r * base + min(r, extra)
        return lo, lo + base + (r < extra)

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (every rank gets identical bits)."""
        if not self.active or not tensors:
            return
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].reshape(t.shape))
            i += t.numel()

    def sum(self, value: float) -> float:
        """A Python float summed over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        self.all_reduce_([t])
        return float(t)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` in rank order on rank 0; None on the others."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_writer else None
        dist.gather_object(obj, out, dst=0)
        return out

    def from_writer(self, fn: Callable[[], T], *, share: bool = True) -> T | None:
        """Run ``fn`` on rank 0 only and hand its result (``share``) or just its success to every rank.

        An exception raised by ``fn`` is raised on every rank (the others get a :class:`LandscapeError` with the
        same message), so no rank is left waiting in a collective that rank 0 never reaches.
        """
        if not self.active:
            return fn()
        result: Any = None
        failure: BaseException | None = None
        if self.is_writer:
            try:
                result = fn()
            except BaseException as err:  # noqa: BLE001 - re-raised below, on every rank
                failure = err
        status = self.broadcast((failure is None, str(failure) if failure is not None else "",
                                 result if share and failure is None else None))
        if failure is not None:
            raise failure
        if not status[0]:
            raise LandscapeError(f"rank 0 failed: {status[1]}")
        return result if self.is_writer else status[2]


SINGLE = Comm()
_current = SINGLE
_owned = False  # whether init_from_env started the process group (then leave_job ends it)


def current() -> Comm:
    """The Comm of this process: what :func:`init_from_env` set up, or :data:`SINGLE`."""
    return _current


def job_size() -> int:
    """The number of processes torchrun started for this job (``WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world() -> int:
    """The number of this job's processes on this node (``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _gpus() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_for_job() -> bool:
    """What ``--device auto`` means: CUDA when there is one device for each process of this node (one process
    outside torchrun), else the CPU."""
    return _gpus() >= local_world()  # at least 1


def job_backend(device: str) -> str:
    """``nccl`` when the job computes on CUDA devices (``device`` ``cuda...``, or ``auto`` as
    :func:`cuda_for_job` decides), else ``gloo``. Each process needs a GPU of its own: fewer GPUs than processes
    on this node is a :class:`LandscapeError` (every rank finds the same, so rank 0 reports it)."""
    cuda = device.startswith("cuda") or (device == "auto" and cuda_for_job())
    gpus = _gpus()
    if cuda and gpus < local_world():
        raise LandscapeError(f"{local_world()} processes on this node share {gpus} CUDA device(s); each process "
                             "needs one of its own",
                             hint=f"start at most {gpus} per node (--nproc-per-node) or use --device cpu"
                             if gpus else "use --device cpu")
    return "nccl" if cuda else "gloo"


def init_from_env(device: str = "auto", *, timeout_s: float = 1800) -> Comm:
    """Join the ``torchrun`` job described by the environment, or return :data:`SINGLE` outside one.

    The backend is NCCL when the job computes on CUDA devices and gloo otherwise (:func:`job_backend`).
    Idempotent: a second call returns the same Comm.
    """
    global _current, _owned
    if job_size() <= 1 or _current.active:
        return _current
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise LandscapeError("WORLD_SIZE is set but RANK or MASTER_ADDR is not",
                             hint="start distributed runs with torchrun --nproc-per-node N -m landscape ...")
    backend = job_backend(device)
    cuda = backend == "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
        atexit.register(_destroy)  # after an error, where the ranks do not meet in :func:`leave_job`
        _owned = True
    _current = from_process_group()
    return _current


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_job() -> None:
    """End the job :func:`init_from_env` joined, once this rank's work is done: a barrier, so that no rank tears its
    connections down while another still works, then ``destroy_process_group`` while the interpreter is whole
    (gloo's worker threads then hold no Python objects at shutdown), as the torch.distributed documentation asks
    of every rank. A no-op outside a job and for a process group that a user's training started."""
    global _current, _owned
    if _owned:
        dist.barrier()
        _destroy()
        _current, _owned = SINGLE, False


def from_process_group() -> Comm:
    """The Comm of the default ``torch.distributed`` process group as it is (one a user's DDP training started, or
    :func:`init_from_env`'s), or :data:`SINGLE` when there is none or it has one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    return Comm(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                backend=str(dist.get_backend()))


def rank_device(device: torch.device, comm: Comm) -> torch.device:
    """Under a job, a bare ``cuda`` means this rank's GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and comm.active:
        return torch.device("cuda", comm.local_rank)
    return device
