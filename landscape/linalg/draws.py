"""Counter-based random draws: the same numbers on every device, any stretch of a vector drawn on its own.

A stateful generator (``torch.Generator``, numpy's) hands out numbers in sequence on one device: a vector of
``P`` Gaussians for a 124M-parameter model is drawn on the host, in float64 (2.6 s and 1 GB each on the
development VM), and then copied to the GPU; a CUDA generator would be fast but gives other numbers than the CPU,
so a run could not be resumed or checked on another device. Here each number is a hash of its position instead
(a *counter-based* generator, Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):

    h(seed, stream, i) = mix(mix(i + k1) ^ k2),    k1, k2 = keys of (seed, stream)

with ``mix`` the 32-bit integer finalizer "lowbias32" (xor-shift, multiply, xor-shift, multiply, xor-shift; Chris
Wellons' hash-prospector). Two independent hashes ``h_a, h_b`` of pair ``p`` give two uniforms
``u = (h + 1/2) / 2^32`` in (0, 1) and, by Box–Muller, two standard normals
``sqrt(-2 ln u_a) cos(2 pi u_b)`` and ``sqrt(-2 ln u_a) sin(2 pi u_b)`` for elements ``2p`` and ``2p + 1``;
a Rademacher sign is one bit of a hash (32 signs a hash).

Everything is integer arithmetic on int64 tensors kept below ``2^63`` (so identical on the CPU and CUDA) followed by
float64 ``log``/``sqrt``/``cos`` (equal to the last bit or so across devices), done in blocks so a draw needs
only a few block-sized temporaries beside its result. ``normal(n, seed=s, stream=j)`` is one vector; ``start``
and ``n`` pick any stretch of it, equal to the same stretch of the whole.

>>> import torch
>>> a = normal(10, seed=0)
>>> bool(torch.equal(a[4:9], normal(5, seed=0, start=4)))
True
>>> bool(torch.equal(a, normal(10, seed=1))), bool(torch.equal(a, normal(10, seed=0, stream=1)))
(False, False)
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

MASK = 0xFFFFFFFF
#: numbers per block of work: small on the CPU (the temporaries stay in cache), large on a GPU
CPU_BLOCK, GPU_BLOCK = 1 << 18, 1 << 25


def _mul(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for ``0 <= x < 2^32`` without passing ``2^63``: a constant ``c >= 2^31`` is split as
    ``(c - 2^31) + 2^31``, and ``x 2^31 mod 2^32`` is the low bit of ``x`` moved to bit 31."""
    if c < 1 << 31:
        return (x * c) & MASK
    return (x * (c - (1 << 31)) + ((x & 1) << 31)) & MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on values in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    """lowbias32 on a Python integer (for the keys): :func:`_mix` on one number."""
    return int(_mix(torch.tensor(x & MASK, dtype=torch.int64)))


@functools.lru_cache(maxsize=4096)
def _keys(seed: int, stream: int) -> tuple[int, int, int, int]:
    """Four 32-bit keys of ``(seed, stream)``: two for each of the pair's hashes (kept: Hutch++ draws each of its
    columns a row block at a time, thousands of short draws that spent most of their time here)."""
    base = _mix_int(_mix_int(seed & MASK) ^ _mix_int((seed >> 32) + 0x9E3779B9) ^ _mix_int(stream * 0x632BE5AB + 1))
    return tuple(_mix_int(base + 0x9E3779B9 * (j + 1)) for j in range(4))  # type: ignore[return-value]


def _hashes(c: torch.Tensor, k1: int | torch.Tensor, k2: int | torch.Tensor) -> torch.Tensor:
    """32-bit hashes of the counters ``c`` under keys ``k1, k2`` (integers, or tensors that broadcast
    against ``c``: a key pair per row)."""
    return _mix(_mix((c + k1) & MASK) ^ k2)


@functools.lru_cache(maxsize=None)
def _sign_table(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``table[b, t] = 1 - 2 (bit t of b)`` for every byte ``b``, and the shifts of a hash's four bytes: one gather
    turns a hash into its 32 signs (2-2.5x faster on the CPU than shifting out each bit)."""
    table = 1.0 - 2.0 * ((torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1).double()
    return table, torch.tensor([0, 8, 16, 24], device=device)


def _signs_of(h: torch.Tensor) -> torch.Tensor:
    """The 32 signs of each hash in ``h`` (a new last axis), a byte at a time through :func:`_sign_table`."""
    table, shifts = _sign_table(h.device)
    return table[(h.unsqueeze(-1) >> shifts) & 255].flatten(-2)


def _values(kind: str, c: torch.Tensor, keys: tuple[int, int, int, int]) -> torch.Tensor:
    """The numbers of counters ``c``: a pair each for ``normal`` and ``uniform``, 32 each for ``sign``."""
    if kind == "sign":
        return _signs_of(_hashes(c, keys[0], keys[1])).reshape(-1)
    scale = 2.0 ** -32
    ua = (_hashes(c, keys[0], keys[1]).double() + 0.5) * scale
    ub = (_hashes(c, keys[2], keys[3]).double() + 0.5) * scale
    if kind == "uniform":
        return torch.stack((ua, ub), dim=1).reshape(-1)
    r = torch.sqrt(-2.0 * torch.log(ua))
    ub.mul_(2 * math.pi)
    return torch.stack((r * torch.cos(ub), r * torch.sin(ub)), dim=1).reshape(-1)


def _draw(kind: str, n: int, seed: int, stream: int, start: int, device, dtype: torch.dtype) -> torch.Tensor:
    if n < 0 or start < 0:
        raise ValueError("n and start must be at least 0")
    per = 32 if kind == "sign" else 2  # numbers per counter
    if start + n > per << 32:
        raise ValueError(f"a stream holds {per} x 2^32 numbers; use another stream for more")
    device = torch.device(device if device is not None else "cpu")
    out = torch.empty(n, dtype=dtype, device=device)
    keys = _keys(int(seed), int(stream))
    block = max(1, (GPU_BLOCK if device.type == "cuda" else CPU_BLOCK) // per)  # counters per block
    first, last = start // per, (start + n + per - 1) // per  # the counters of elements start .. start + n - 1
    for lo in range(first, last, block):
        hi = min(lo + block, last)
        vals = _values(kind, torch.arange(lo, hi, device=device, dtype=torch.int64), keys)
        a, b = max(start, per * lo), min(start + n, per * hi)
        out[a - start:b - start] = vals[a - per * lo:b - per * lo]
    return out


def normal(n: int, *, seed: int, stream: int = 0, start: int = 0, device: torch.device | str | None = None,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Elements ``start .. start + n - 1`` of the standard-normal vector of ``(seed, stream)``, on ``device``
    (CPU by default) in ``dtype`` (computed in float64, then rounded)."""
    return _draw("normal", n, seed, stream, start, device, dtype)


def uniform(n: int, *, seed: int, stream: int = 0, start: int = 0, device: torch.device | str | None = None,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Elements ``start .. start + n - 1`` of the vector of ``(seed, stream)`` uniform on (0, 1)."""
    return _draw("uniform", n, seed, stream, start, device, dtype)


def signs(n: int, *, seed: int, stream: int = 0, start: int = 0, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Elements ``start .. start + n - 1`` of the Rademacher (+1 or -1, each with probability 1/2) vector of
    ``(seed, stream)``: element ``i`` is bit ``i mod 32`` of the hash of counter ``i // 32``."""
    return _draw("sign", n, seed, stream, start, device, dtype)


def sign_columns(n: int, *, seed: int, streams: Sequence[int], start: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The ``(len(streams), n)`` float64 block whose row ``j`` is :func:`signs` ``(n, seed=seed,
    stream=streams[j], start=start)``, hashed for every stream at once (Hutch++ draws its probe block a row block
    at a time: one call instead of one per column).

    >>> bool(torch.equal(sign_columns(70, seed=4, streams=[1, 3], start=5)[1], signs(70, seed=4, stream=3, start=5)))
    True
    """
    device = torch.device(device if device is not None else "cpu")
    if start < 0 or n < 0 or start + n > 32 << 32:
        raise ValueError("a stream holds 32 x 2^32 signs; start and n must be at least 0")
    keys = torch.tensor([_keys(int(seed), int(s))[:2] for s in streams], dtype=torch.int64, device=device)
    first, last = start // 32, (start + n + 31) // 32
    c = torch.arange(first, last, dtype=torch.int64, device=device).unsqueeze(0)
    vals = _signs_of(_hashes(c, keys[:, :1], keys[:, 1:])).reshape(len(streams), -1)  # a key pair per stream
    return vals[:, start - 32 * first:start - 32 * first + n]
