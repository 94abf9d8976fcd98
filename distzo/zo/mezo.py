"""MeZO-SGD, the one implementation of its math (reference trainer, server and workers).

(train.optimizer momentum / adam: the update with per-parameter state, ``distzo/zo/optim.py``.)

One step t with directions j = 1..q (seed s_j), DDP shards d = 1..D, step size eps:

    S±_{j,d} = summed label-token loss at theta ± eps * z(s_j) on shard d, over N_d tokens   (forward.py)
    l±_j     = sum_d S±_{j,d} / sum_d N_d                         sign_losses (token-weighted)
    g_j      = (l+_j - l-_j) / (2 eps)                            projected_gradients
    g_j      = clip(g_j, ±clip)                                  (when configured)
    theta   <- theta - lr_t * ((1/q) sum_j g_j z(s_j) + wd * theta)   apply_update
                                                  (wd = 0 for biases and norms)

The forwards' weights theta ± eps * z are made out of place from the clean block (``forwardweights.py``),
so the master copy is never perturbed and never needs restoring. A step whose losses are not all finite
is not applied (``UpdateRecord.skipped``, ``record.py``): it still advances the version.

Update windows (``server.update_window`` K, DESIGN.md section 12): step t's forwards read the
materialized version ``base_version(t, K)`` and replay the records from it to t - 1 on it
(``forwardweights.replay_block``), rebuilding the served copy of version t: with a float32 served copy
that is the master bit for bit (the same operations, in the same order); with a 16-bit one it is, by
definition, the records replayed in float32 on the rounded base and rounded again, then perturbed as any
fetched block. The server materializes K records in one pass (``apply_window``), bitwise K single passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from distzo.model.blocks import BlockSpec
from distzo.zo.generator import Distribution, update_cpu, update_torch
from distzo.zo.optim import Optimizer, update_stateful_cpu, update_stateful_torch
from distzo.zo.record import Direction, UpdateRecord
from distzo.zo.replay import pack, window_cpu
from distzo.zo.served import cast_into


def sign_losses(losses: Mapping[tuple[int, int, int], tuple[float, int]], q: int, shards: int) -> dict[tuple[int, int], float]:
    """l_{j,sign} = sum_d S_{j,d,sign} / sum_d N_{j,d,sign}: the mean loss over every label token of the batch.

    ``losses[(j, d, sign)] = (S, N)``: shard d's summed cross-entropy over its N label tokens. Adding
    sums and counts makes the loss the same function of the batch whatever the number of shards
    (up to float rounding); a mean of per-shard means would weight an example by 1/(its shard's N).
    """
    out = {}
    for j in range(q):
        for sign in (1, -1):
            total, count = 0.0, 0
            for d in range(shards):
                s, n = losses[(j, d, sign)]
                total += s
                count += n
            out[(j, sign)] = total / count if count else math.nan
    return out


def projected_gradients(losses: Mapping[tuple[int, int, int], tuple[float, int]], q: int, shards: int, eps: float) -> list[float]:
    """g_j = (l+_j - l-_j) / (2 eps), l±_j token-weighted over the shards (``sign_losses``)."""
    per = sign_losses(losses, q, shards)
    return [(per[(j, 1)] - per[(j, -1)]) / (2.0 * eps) for j in range(q)]


def clip_gradient(g: float, clip: float | None) -> float:
    if clip is None or not math.isfinite(g):
        return g
    return max(-clip, min(clip, g))


def learning_rate(step: int, base_lr: float, schedule: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """lr at ``step`` (0-based): linear warmup, then constant, linear or cosine decay to min_ratio * base."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: expected constant, linear or cosine")
    return base_lr * (min_ratio + (1.0 - min_ratio) * factor)


@dataclass
class StepOutcome:
    record: UpdateRecord
    loss: float  # mean of (l+ + l-)/2 over directions (nan when skipped)
    nonfinite: bool = False
    loss_plus: float = math.nan  # mean of the l+ losses (nan when skipped)
    loss_minus: float = math.nan  # mean of the l- losses


def make_update(
    step: int,
    seeds: Sequence[int],
    losses: Mapping[tuple[int, int, int], tuple[float, int]],
    shards: int,
    eps: float,
    lr: float,
    weight_decay: float,
    clip: float | None,
) -> StepOutcome:
    """Turn one step's (summed loss, label tokens) per forward into its update record.

    Skipped when a loss is not finite: no g, no loss, nothing averaged from non-finite values.
    """
    q = len(seeds)
    sums = [losses[(j, d, s)][0] for j in range(q) for d in range(shards) for s in (1, -1)]
    if not all(math.isfinite(v) for v in sums):
        return StepOutcome(UpdateRecord(step, (), lr, weight_decay, skipped=True), math.nan, nonfinite=True)
    gs = projected_gradients(losses, q, shards, eps)
    dirs = tuple(Direction(seed=s, g=clip_gradient(g, clip)) for s, g in zip(seeds, gs))
    per = sign_losses(losses, q, shards)
    plus, minus = [per[(j, 1)] for j in range(q)], [per[(j, -1)] for j in range(q)]
    return StepOutcome(UpdateRecord(step, dirs, lr, weight_decay), (sum(plus) + sum(minus)) / (2 * q),
                       loss_plus=sum(plus) / q, loss_minus=sum(minus) / q)


# ----------------------------------------------------------------------------- server side
def apply_update(block: BlockSpec, buffer: torch.Tensor, record: UpdateRecord, dist: Distribution,
                 served: np.ndarray | torch.Tensor | None = None, served_dtype: str = "float32",
                 optimizer: Optimizer | None = None, state: np.ndarray | torch.Tensor | None = None) -> None:
    """theta <- theta - lr * ((1/q) sum_j g_j z_j + wd * theta) on one fp32 block, in place.

    ``served``: the block's 16-bit served copy (uint16 array on CPU, int16 tensor on a GPU, the block's
    length) for ``served_dtype`` bfloat16/float16, rewritten from the new values in the same pass
    (``distzo/zo/served.py``'s rounding). ``optimizer`` momentum/adam: the stateful rules of
    ``distzo/zo/optim.py`` instead, updating ``state`` (float32 [numel, width], numpy on CPU) in the same
    pass; sgd or None: the rule above, no state. A skipped record, or a frozen block (``block.trainable``
    False: train.target lora's base weights), changes nothing."""
    if record.skipped or not block.trainable:
        return
    q = len(record.directions)
    seeds = [d.seed for d in record.directions]
    decay = record.lr * record.weight_decay
    if served is not None and served_dtype == "float32":
        raise ValueError("a float32 served copy is the master itself: pass served=None")
    if optimizer is not None and optimizer.width:
        _apply_stateful(block, buffer, record, dist, served, served_dtype, optimizer, state)
        return
    coefs = [record.lr * d.g / q for d in record.directions]
    # without weight decay every tensor gets the same update: one call over the whole block (fewer,
    # longer kernel runs; the per-element arithmetic, and so the bits, are the same)
    segments = block.decay_segments() if decay else [(0, buffer.shape[0], False)]
    for start, end, decays in segments:
        seg = buffer[start:end]
        out = served[start:end] if served is not None else None
        if buffer.device.type == "cpu":
            update_cpu(seg.numpy(), block.global_offset + start, seeds, coefs, decay if decays else 0.0, dist,
                       out, served_dtype)
        else:
            update_torch(seg, block.global_offset + start, seeds, coefs, decay if decays else 0.0, dist,
                         out, served_dtype)


def _apply_stateful(block: BlockSpec, buffer: torch.Tensor, record: UpdateRecord, dist: Distribution,
                    served: np.ndarray | torch.Tensor | None, served_dtype: str, optimizer: Optimizer,
                    state: np.ndarray | torch.Tensor | None) -> None:
    """momentum/adam on one block: d's coefficients g_j / q, lr and the decay passed apart (optim.py)."""
    if state is None:
        raise ValueError(f"optimizer {optimizer.name} needs the block's state (float32 [{block.numel}, {optimizer.width}])")
    q = len(record.directions)
    seeds = [d.seed for d in record.directions]
    coefs = [d.g / q for d in record.directions]
    wd = record.weight_decay
    segments = block.decay_segments() if wd else [(0, buffer.shape[0], False)]
    for start, end, decays in segments:
        out = served[start:end] if served is not None else None
        args = (block.global_offset + start, record.step, seeds, coefs, record.lr, wd if decays else 0.0, optimizer, dist,
                out, served_dtype)
        if buffer.device.type == "cpu":
            st = state if isinstance(state, np.ndarray) else state.numpy()
            update_stateful_cpu(buffer[start:end].numpy(), st[start:end], *args)
        else:
            update_stateful_torch(buffer[start:end], state[start:end], *args)


# ----------------------------------------------------------------------------- update windows
def base_version(step: int, window: int) -> int:
    """The materialized version that step ``step``'s forwards (and an eval after ``step`` steps) read.

    ``max(0, K * floor((step + 1) / K) - K)`` for window K: the newest multiple of K that is at least
    K - 1 steps old. The server starts materializing base B when record B - 1 is journaled and the
    first step to read B is B + K - 1, so it has K - 1 steps of time and no worker waits for it; the
    forwards replay records base..step-1 (at most 2K - 2). K = 1: the step itself, nothing to replay.
    Raises ValueError for a negative step or a window below 1."""
    if step < 0 or window < 1:
        raise ValueError(f"base_version needs step >= 0 and window >= 1, got step {step}, window {window}")
    return max(0, window * ((step + 1) // window) - window)


def apply_window(block: BlockSpec, src: np.ndarray, dst: np.ndarray, records: Sequence[UpdateRecord], dist: Distribution,
                 served: np.ndarray | None = None, served_dtype: str = "float32") -> None:
    """dst <- ``records`` applied to the fp32 block ``src`` in step order, in one pass (``dst`` may be ``src``).

    Bitwise ``apply_update`` once per record (tests prove it for both distributions, weight decay and
    every served dtype); ``served`` (uint16, the block's length) for bfloat16/float16 gets the served copy
    of the result. A frozen block, or records that are all skipped, leave the values as they are (copied to
    ``dst``, cast to ``served``). SGD only: stateful optimizers keep K = 1 (config.py refuses the rest)."""
    live = [r for r in records if not r.skipped] if block.trainable else []
    if served is not None and served_dtype == "float32":
        raise ValueError("a float32 served copy is the master itself: pass served=None")
    if not live:
        if dst is not src:
            np.copyto(dst, src)
        if served is not None:
            cast_into(dst, served_dtype, served)
        return
    decays = any(r.lr * r.weight_decay for r in live)
    for start, end, seg_decays in (block.decay_segments() if decays else [(0, src.shape[0], False)]):
        window_cpu(src[start:end], dst[start:end], block.global_offset + start, pack(live, seg_decays), dist,
                   served[start:end] if served is not None else None, served_dtype)
