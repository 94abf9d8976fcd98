"""The update record: what one MeZO-SGD step sends the parameter server, and the bounds the server checks.

A record is a few bytes (step, the q directions' (seed, g), lr, weight decay, skipped): the server
journals it and applies it (``distzo/zo/mezo.py``: ``apply_update``); a worker replays it on its base
(update windows). ``make_update`` (mezo.py) makes it from a step's losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distzo.zo.generator import check_seed


@dataclass(frozen=True)
class Direction:
    """One direction of a step: the seed of its z and its projected gradient g (clipped when configured)."""

    seed: int
    g: float


@dataclass(frozen=True)
class UpdateRecord:
    """Everything the server needs to apply step ``step``: a few bytes, journaled."""

    step: int
    directions: tuple[Direction, ...]
    lr: float
    weight_decay: float
    skipped: bool = False

    def validate(self) -> None:
        """ValueError for a negative step, an lr or weight decay that is not a finite number >= 0, no direction
        on a step that is not skipped, a seed out of range or a g that is not finite."""
        if self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not self.skipped and not self.directions:
            raise ValueError("an update that is not skipped needs at least one (seed, g) direction")
        for d in self.directions:
            check_seed(d.seed)
            if not math.isfinite(d.g):
                raise ValueError(f"projected gradient g for seed {d.seed} is not finite ({d.g})")

    def step_size(self) -> float:
        """The most one weight moves per unit of z: lr * (1/q) sum_j |g_j| (apply_update's coefficients)."""
        if self.skipped or not self.directions:
            return 0.0
        return sum(abs(self.lr * d.g / len(self.directions)) for d in self.directions)

    def check_bounds(self, max_step: float) -> None:
        """Refuse an update whose applied step is non-finite or absurd (ValueError): checked before journaling.

        ``max_step`` bounds lr * (1/q) sum_j |g_j|, the move of a weight per unit of z; the decay
        factor lr * weight_decay must stay below 1 (at 1 or more it flips or zeroes the weights).
        """
        self.validate()
        step = self.step_size()
        if not math.isfinite(step) or step > max_step:
            raise ValueError(f"the update would move weights by {step:.3g} per unit of z (lr {self.lr:.3g} x |g|); "
                             f"the server refuses steps over {max_step:g} (server.max_update_step): "
                             "a diverged or broken run, not a training step")
        decay = self.lr * self.weight_decay
        if not self.skipped and not decay < 1.0:
            raise ValueError(f"lr x weight_decay is {decay:.3g}: at 1 or more the decay flips or zeroes the weights")
