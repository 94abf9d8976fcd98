"""Where a forward run's blocks come from, and how long each stays resident.

A ``BlockFeed`` hands out clean block buffers: ``MemoryFeed`` here (the reference trainer, eval, tests), the
parameter server for workers (``gpuworker/feed.py``). A ``BlockRun`` holds one ``ForwardEngine.run``'s blocks:
each block's clean buffer is fetched once for all jobs, every job's weights of it are made once (by whichever
job enters the block first), and the block is dropped, its buffer given back to the feed, when the last job
has moved past it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from distzo.model.blocks import DTYPES
from distzo.model.lockstep import Lockstep
from distzo.model.modeling import BlockModel
from distzo.zo.forwardweights import ForwardWeights
from distzo.zo.served import to_served


class BlockFeed(Protocol):
    """Where clean block buffers come from (memory for the reference, the server for workers)."""

    def get(self, block: int) -> torch.Tensor:
        """Block ``block``'s clean weights: a flat [numel] tensor (served dtype) on the engine's device."""
        ...

    def release(self, block: int) -> None:
        """Every job has moved past ``block``: its buffer may be reused."""
        ...


class MemoryFeed:
    """Blocks already in memory (the reference trainer, eval, tests).

    With a served dtype other than float32, each block is rounded the way the parameter server
    derives its served copy (``distzo/zo/served.py``), so the reference sees the very
    bytes a worker fetches; with a device, the (rounded) block is copied there.
    """

    def __init__(self, buffers: list[torch.Tensor], device: str | torch.device | None = None,
                 served_dtype: str = "float32"):
        self.buffers = buffers
        self.device = torch.device(device) if device is not None else None
        self.served_dtype = served_dtype
        self.dtype = DTYPES[served_dtype]

    def get(self, block: int) -> torch.Tensor:
        """Block ``block`` as the served dtype (flat [numel]), on the device when one was given."""
        buf = to_served(self.buffers[block], self.served_dtype)
        return buf if self.device is None else buf.to(self.device)

    def release(self, block: int) -> None:
        """Nothing to free: the buffers stay in memory."""


@dataclass
class _BlockState:
    """One resident block: its clean buffer, each job's weights of it and their views, or the error making them."""

    clean: torch.Tensor | None = None
    copies: list[ForwardWeights] = field(default_factory=list)
    views: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    error: BaseException | None = None


class BlockRun:
    """One ``ForwardEngine.run``'s resident blocks, for ``jobs`` forwards that take turns (``Lockstep``).

    ``make_copies(b, clean)``: every job's weights of block b from its clean buffer, one ``ForwardWeights`` per
    job (``ForwardEngine.make_copies``). ``copy_bytes``: bytes of the copies alive now (not the clean buffers);
    ``peak_copy_bytes``: the most at once."""

    def __init__(self, model: BlockModel, feed: BlockFeed, jobs: int,
                 make_copies: Callable[[int, torch.Tensor], list[ForwardWeights]]):
        self.model = model
        self.feed = feed
        self.make_copies = make_copies
        self.lockstep = Lockstep(jobs)
        self.blocks: dict[int, _BlockState] = {}
        self.current = [-1] * jobs  # the block each job is in
        self.copy_bytes = 0  # perturbed copies alive now, and the most at once
        self.peak_copy_bytes = 0

    def prepare(self, b: int) -> _BlockState:
        """Block ``b``'s clean buffer from the feed and one perturbed copy per job (made once, by whichever
        job enters first); an error there is raised to every job that enters ``b``."""
        state = self.blocks.get(b)
        if state is None:
            state = _BlockState()
            self.blocks[b] = state
            try:
                state.clean = self.feed.get(b)
                state.copies = self.make_copies(b, state.clean)
                self.copy_bytes += self._own_bytes(state)
                self.peak_copy_bytes = max(self.peak_copy_bytes, self.copy_bytes)
            except BaseException as exc:  # every job entering this block fails the same way
                state.error = exc
        if state.error is not None:
            raise state.error
        return state

    def views(self, j: int, b: int) -> dict[str, torch.Tensor]:
        """Job ``j``'s tensors of block ``b`` by parameter name: shaped views into its perturbed copy (no copy)."""
        state = self.prepare(b)
        v = state.views.get(j)
        if v is None:
            copy = state.copies[j]
            v = self.model.views(self.model.manifest.blocks[b], copy.main, copy.vectors)
            state.views[j] = v
        return v

    def release_passed(self) -> None:
        """Drop every block all jobs have passed (pinned blocks stay: the tied embedding until the head)."""
        lowest = self.lockstep.lowest_position()
        for b in sorted(self.blocks):
            if b < lowest and b not in self.model.pinned_blocks and self.blocks[b].clean is not None:
                self.drop(b)

    @staticmethod
    def _own_bytes(state: _BlockState) -> int:
        """Bytes of the block's copies that are not the clean buffer itself (a shared copy counted once)."""
        own = {id(c): c for c in state.copies}.values()
        return sum((c.main.numel() * c.main.element_size() if c.main is not state.clean else 0)
                   + (c.vectors.numel() * 4 if c.vectors is not None else 0) for c in own)

    def drop(self, b: int) -> None:
        """Free block ``b``'s perturbed copies and views and give its clean buffer back to the feed."""
        state = self.blocks[b]
        self.copy_bytes -= self._own_bytes(state)
        self.model.unbind_block(b)
        state.copies = []
        state.views = {}
        if state.clean is not None:
            state.clean = None
            self.feed.release(b)
