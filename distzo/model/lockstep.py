"""Turn-taking of the forward engine's job threads over (block, job) (``distzo/model/forward.py``).

Only one job thread computes at any time, in strict (block, job index) order, so several forwards sharing
each resident block give bitwise the results of running them one after another.
"""

from __future__ import annotations

import math
import threading


class Lockstep:
    """Turn-taking over (block, job): the unfinished job with the lowest (block, index) runs."""

    def __init__(self, njobs: int):
        self.pos = [-1] * njobs
        self.done = [False] * njobs
        self.turn = 0
        self.cv = threading.Condition()

    def _next(self) -> int:
        live = [(p, j) for j, p in enumerate(self.pos) if not self.done[j]]
        return min(live)[1] if live else -1

    def lowest_position(self) -> float:
        """The lowest block an unfinished job is in (inf when all are done): blocks below it are free."""
        live = [p for j, p in enumerate(self.pos) if not self.done[j]]
        return min(live) if live else math.inf

    def wait_turn(self, j: int) -> None:
        """Block until job ``j`` is the one to run."""
        with self.cv:
            self.cv.wait_for(lambda: self.turn == j)

    def move(self, j: int, block: int, on_moved) -> None:  # noqa: ANN001
        """Job ``j`` enters ``block``: run ``on_moved()`` while it still holds the turn, pass the turn on, wait for it back."""
        with self.cv:
            self.pos[j] = block
            on_moved()  # still our turn: safe to drop blocks nobody will enter again
            self.turn = self._next()
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == j)

    def finish(self, j: int) -> None:
        """Job ``j`` is done: pass the turn on for good."""
        with self.cv:
            self.done[j] = True
            self.turn = self._next()
            self.cv.notify_all()
