"""Update windows: several update records applied in one pass (server) or replayed on a base (workers).

A version of the weights is equally an older materialized base plus the update records after it
(``distzo/zo/mezo.py``: ``base_version``). Two passes use that here, both bitwise equal to applying
the records one at a time with the single-step update (same float64 operations, one float32
rounding per record, records in step order):

* ``window_cpu``: the parameter server applies K records to a block in one pass over memory and
  writes the 16-bit served copy once (``windowkernels.window_kernel``).
* ``replay_perturb_cpu`` / ``replay_perturb_device``: a worker replays the pending records on the
  base it fetched while it makes the perturbed copies: on the CPU in the numba kernel, on a GPU in
  the fused Triton kernel (``generator_cuda.replay_perturb``); the extra work per record is Philox
  words and a select, not another trip through memory.

Records are packed per decay segment (``pack``): the decay factor lr * weight_decay applies only to
the tensors that decay (``BlockSpec.decay_segments``). Skipped records change nothing and are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from distzo.zo import generator
from distzo.zo.generator import _ALIGN, Distribution, _check_offset, _key, perturb_torch, update_torch
from distzo.zo.served import served_kind, to_served
from distzo.zo.threads import run_split
from distzo.zo.windowkernels import rademacher_window_aligned, replay_perturb_kernel, window_kernel


@dataclass(frozen=True)
class PackedRecords:
    """Update records as the kernels take them: record r's directions are rows ``rec_start[r]`` ..
    ``rec_start[r + 1]`` of ``keys`` ([D, 2] uint64 Philox keys) and ``coefs`` ([D] float64, lr * g_j / q);
    ``decay[r]`` is lr * weight_decay (0 for a segment that does not decay)."""

    keys: np.ndarray
    coefs: np.ndarray
    rec_start: np.ndarray
    decay: np.ndarray

    @property
    def count(self) -> int:
        return int(self.decay.shape[0])

    def single_directions(self) -> bool:
        """Every record has exactly one direction (the Rademacher fast path)."""
        return bool(np.all(np.diff(self.rec_start) == 1))


def pack(records: Sequence, decays: bool) -> PackedRecords:
    """Pack ``records`` (``record.UpdateRecord``, in step order) for a segment that decays or not."""
    live = [r for r in records if not r.skipped]
    keys, coefs, starts, decay = [], [], [0], []
    for r in live:
        q = len(r.directions)
        for d in r.directions:
            keys.append(_key(d.seed))
            coefs.append(r.lr * d.g / q)
        starts.append(len(keys))
        decay.append(r.lr * r.weight_decay if decays else 0.0)
    return PackedRecords(np.array(keys, dtype=np.uint64).reshape(len(keys), 2), np.array(coefs, dtype=np.float64),
                         np.array(starts, dtype=np.int64), np.array(decay, dtype=np.float64))


def window_cpu(src: np.ndarray, dst: np.ndarray, offset: int, packed: PackedRecords, dist: Distribution | str,
               served: np.ndarray | None = None, served_dtype: str = "float32") -> None:
    """``dst`` = the packed records applied to ``src`` (float32, same length; ``dst`` may be ``src``), and with
    ``served`` (uint16, same length) for bfloat16/float16 the served copy of the result, in one pass.
    Raises TypeError for buffers of another dtype or length, ValueError for an offset past 2^63."""
    if src.dtype != np.float32 or dst.dtype != np.float32 or src.shape != dst.shape or src.ndim != 1:
        raise TypeError("a window pass takes two 1-D float32 buffers of one length")
    _check_offset(offset, src.shape[0])
    kind = served_kind(served_dtype) if served is not None else 0
    if kind and (served.dtype != np.uint16 or served.shape != src.shape):  # type: ignore[union-attr]
        raise TypeError(f"the served copy must be uint16 of shape {src.shape}")
    out = served if kind else np.empty(0, np.uint16)
    gaussian = Distribution(dist) is Distribution.GAUSSIAN
    p = packed
    fast = not gaussian and p.count > 0 and p.single_directions()

    def part(a: int, b: int) -> np.ndarray:
        return out[a:b] if kind else out

    def general(a: int, b: int) -> None:
        window_kernel(src[a:b], dst[a:b], offset + a, p.keys, p.coefs, p.rec_start, p.decay, gaussian, part(a, b), kind)

    def piece(a: int, b: int) -> None:
        if not fast:
            general(a, b)
            return
        lo = min(b, a + (-(offset + a)) % _ALIGN)  # the 128-aligned interior goes the fused way
        hi = max(lo, b - (offset + b) % _ALIGN)
        if lo > a:
            general(a, lo)
        if hi > lo:
            rademacher_window_aligned(src[lo:hi], dst[lo:hi], offset + lo, p.keys[:, 0].copy(), p.keys[:, 1].copy(),
                                      p.coefs, p.decay, part(lo, hi), kind)
        if b > hi:
            general(hi, b)

    run_split(piece, src.shape[0], offset)


def replay_perturb_cpu(clean: np.ndarray, offset: int, packed: PackedRecords, seed: int, dist: Distribution | str,
                       coefs: Sequence[float], out: np.ndarray, served_dtype: str = "float32") -> np.ndarray:
    """``out[r] = float32(x + coefs[r] * z(seed))`` with x = the packed records replayed on ``clean`` (float32)
    and rounded to ``served_dtype`` (``served.py``'s rounding; float32: none); with no coefficient, ``out[0]`` = x
    itself. ``out``: float32 [max(1, len(coefs)), len(clean)]."""
    if clean.dtype != np.float32 or clean.ndim != 1:
        raise TypeError("replay expects a 1-D float32 clean buffer")
    pco = np.asarray(coefs, dtype=np.float64)
    if out.dtype != np.float32 or out.shape != (max(1, pco.shape[0]), clean.shape[0]):
        raise TypeError(f"replay output must be float32 of shape {(max(1, pco.shape[0]), clean.shape[0])}")
    _check_offset(offset, clean.shape[0])
    k0, k1 = _key(seed)
    gaussian = Distribution(dist) is Distribution.GAUSSIAN
    p = packed
    kind = served_kind(served_dtype)
    run_split(lambda a, b: replay_perturb_kernel(clean[a:b], out[:, a:b], pco, offset + a, k0, k1, gaussian, p.keys,
                                                 p.coefs, p.rec_start, p.decay, kind), clean.shape[0], offset)
    return out


def replay_perturb_device(clean: torch.Tensor, offset: int, packed: PackedRecords, seed: int, dist: Distribution | str,
                          coefs: Sequence[float], out: torch.Tensor, served_dtype: str = "float32") -> None:
    """``replay_perturb_cpu`` on ``clean``'s device ([n], float32 or the served dtype) into ``out``
    ([max(1, len(coefs)), n], the forward's dtype; rows may be views): one fused Triton kernel on CUDA, else
    the torch path (a replayed float32 copy by ``update_torch``, record by record, rounded, then
    ``perturb_torch``; the same bits)."""
    _check_offset(offset, clean.shape[0])
    gaussian = Distribution(dist) is Distribution.GAUSSIAN
    if generator._use_triton(clean):  # GPU-only (and the interpreter tests)
        from distzo.zo import generator_cuda  # Triton: optional, GPU only

        generator_cuda.replay_perturb(clean, offset, packed, _key(seed), [float(c) for c in coefs], out, gaussian,
                                      served_kind(served_dtype))
        return
    x = clean.to(torch.float32, copy=True)
    for r in range(packed.count):
        rows = slice(int(packed.rec_start[r]), int(packed.rec_start[r + 1]))
        seeds = [_seed_of(k) for k in packed.keys[rows]]
        update_torch(x, offset, seeds, packed.coefs[rows].tolist(), float(packed.decay[r]), dist)
    if served_dtype != "float32":
        x = to_served(x.cpu(), served_dtype).to(x.device).to(torch.float32)
    if not coefs:
        out[0].copy_(x.to(out.dtype))
        return
    for i, c in enumerate(coefs):
        out[i].copy_(perturb_torch(x, offset, seed, dist, c, out.dtype))


def _seed_of(key: np.ndarray) -> int:
    return int(key[0]) | (int(key[1]) << 32)
