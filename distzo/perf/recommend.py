"""Choosing a layout and an update window by the step-time model (``model.py``): the best predicted
tokens/s among those that fit, with the reason a plan prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distzo.common.dtypes import STATE_VALUES
from distzo.common.errors import counted
from distzo.perf.clusters import ClusterSpec
from distzo.perf.memory import host_memory
from distzo.perf.model import Prediction, predict, valid_shards
from distzo.perf.specs import LayoutSpec, ModelSpec
from distzo.perf.targets import FULL, TargetSpec

TIE_TOLERANCE = 0.01  # layouts within 1% of the best tokens/s count as ties (then: less GPU memory wins)
WINDOWS = (1, 2, 4, 8, 16, 32)  # the update windows a plan considers


@dataclass(frozen=True)
class Recommendation:
    """The chosen layout, its prediction, why, and every layout considered."""

    layout: LayoutSpec
    prediction: Prediction
    reason: str
    candidates: tuple[Prediction, ...]

    @property
    def window(self) -> int:
        """The recommended server.update_window."""
        return self.prediction.window

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {"layout": self.layout.to_dict(), "shards": p.shards, "update_window": p.window,
                "tokens_per_s": p.tokens_per_s, "step_s": p.step_s, "bottleneck": p.bottleneck, "fits": p.fits,
                "reason": self.reason}


def min_shards(model: ModelSpec, cluster: ClusterSpec, served_dtype: str = "bfloat16",
               prefetch_blocks: int = 2, optimizer: str = "sgd", target: TargetSpec = FULL) -> int | None:
    """The fewest server shards whose host memory fits (None: not even the most shards fit)."""
    for s in valid_shards(cluster):
        mem, _ = host_memory(model, cluster, served_dtype, s, prefetch_blocks, optimizer, target)
        if mem["total"] <= cluster.host_memory_bytes:
            return s
    return None


def layouts_for(workers: int, sequences: int, q: int = 1) -> list[LayoutSpec]:
    """Every layout of exactly ``workers`` workers with q directions whose data shards divide the batch."""
    out = []
    for pertp in (1, 2):
        if workers % (pertp * q) == 0:
            ddp = workers // (pertp * q)
            if sequences % ddp == 0:
                out.append(LayoutSpec(pertp, ddp, q))
    return out


def recommend(model: ModelSpec, cluster: ClusterSpec, tokens_per_step: int, served_dtype: str = "bfloat16",
              seq_len: int = 2048, q: int = 1, shards: int | None = None, prefetch_blocks: int = 2,
              optimizer: str = "sgd", target: TargetSpec = FULL, window: int | None = None) -> Recommendation:
    """The layout and update window with the best predicted tokens/s that fit; ties (within 1%) go to the
    smaller window (1 where the update does not bound the step), then to less GPU memory. ``window``: only
    that one (a stateful optimizer: 1 only)."""
    if seq_len < 1 or tokens_per_step < seq_len or tokens_per_step % seq_len:
        raise ValueError(f"tokens per step {tokens_per_step} must be a positive multiple of the sequence length {seq_len}")
    sequences = tokens_per_step // seq_len
    layouts = layouts_for(cluster.workers, sequences, q)
    if not layouts:
        raise ValueError(f"no layout of {counted(cluster.workers, 'worker')} with q={q} divides {sequences} sequences per step "
                         f"into data shards: change --tokens-per-step, --seq-len or --q")
    s = shards if shards is not None else (min_shards(model, cluster, served_dtype, prefetch_blocks, optimizer, target)
                                           or valid_shards(cluster)[-1])
    windows = [window] if window is not None else [1] if STATE_VALUES[optimizer] else list(WINDOWS)
    preds = [predict(model, cluster, lay, tokens_per_step, served_dtype, seq_len, s, prefetch_blocks, optimizer, target, k)
             for lay in layouts for k in windows]
    fitting = [p for p in preds if p.fits]
    pool = fitting or preds
    best_tps = max(p.tokens_per_s for p in pool)
    ties = [p for p in pool if p.tokens_per_s >= best_tps * (1 - TIE_TOLERANCE)]
    best = min(ties, key=lambda p: (p.window, p.memory_per_gpu_bytes["total"], p.layout.pertp))
    return Recommendation(best.layout, best, _reason(best, pool, ties, bool(fitting)), tuple(preds))


def _reason(best: Prediction, pool: list[Prediction], ties: list[Prediction], fits: bool) -> str:
    lay = best.layout
    head = (f"{lay.name} (pertp={lay.pertp}, ddp={lay.ddp}, q={lay.q}, {best.shards} shard{'s' if best.shards > 1 else ''}, "
            f"server.update_window {best.window})")
    if not fits:
        return (f"{head}: nothing fits ({best.why_not_fits()}); more nodes (server shards), float32 serving "
                f"(no 16-bit copy on the host) or fewer tokens per step may make it fit")
    choices = counted(len({p.layout for p in pool}), 'layout') + (
        f" x {counted(len({p.window for p in pool}), 'update window')}" if len({p.window for p in pool}) > 1 else "")
    text = (f"{head}: best predicted {best.tokens_per_s:,.0f} tokens/s of {choices} that fit, "
            f"bound by {best.wording.terms[best.bottleneck]}")
    others = sorted({p.layout.name for p in ties if p.layout != best.layout})
    if others:
        text += f"; ties with {', '.join(others)} within {TIE_TOLERANCE:.0%}, chosen for less {best.wording.memory}"
    larger = sorted({p.window for p in ties if p.window > best.window})
    if larger:
        text += f"; update windows {', '.join(map(str, larger))} within {TIE_TOLERANCE:.0%} too, the smallest chosen"
    return text
