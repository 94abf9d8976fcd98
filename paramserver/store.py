"""The server's blocks: fp32 master, served copy, versions, and the locks around them.

With shared memory on, the served bytes and the version table live in the segments that
local clients map; when the served dtype is float32 the master *is* the served copy, so
the model is held once. Each block has a reader/writer lock: fetches copy chunks under the
read side, the updater writes under the write side (and the seqlock, for mapped readers).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
import xxhash

from distzo.blocks import ITEMSIZE, Manifest
from distzo.generator import Distribution
from distzo.mezo import UpdateRecord, apply_update
from distzo.optim import Optimizer
from distzo.served import cast_into
from paramserver.shm import ServedSegments, StaleVersion


class WaitCancelled(Exception):
    """A version wait whose caller cancelled."""


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def to_served(master: np.ndarray, served_dtype: str, out: np.ndarray) -> None:
    """Write the served-dtype bytes of an fp32 block into ``out`` (uint8): ``distzo/served.py``'s rounding."""
    cast_into(master, served_dtype, out)


class BlockStore:
    def __init__(self, manifest: Manifest, first: int, end: int, served_dtype: str,
                 shm_dir: str | None, name: str, optimizer: Optimizer | None = None):
        self.manifest = manifest
        self.first, self.end = first, end
        self.owned = range(first, end)
        self.served_dtype = served_dtype
        itemsize = ITEMSIZE[served_dtype]
        nblocks = len(manifest.blocks)
        block_bytes = [manifest.blocks[b].numel * itemsize if b in self.owned else 0 for b in range(nblocks)]
        self.segments: ServedSegments | None = None
        self.master: dict[int, np.ndarray] = {}
        self.served: dict[int, np.ndarray] = {}
        if shm_dir:
            self.segments = ServedSegments(shm_dir, name, block_bytes)
            self.versions = self.segments.table[:, 1]
            for b in self.owned:
                self.served[b] = self.segments.block(b)
        else:
            self.versions = np.full(nblocks, -1, dtype=np.int64)
            for b in self.owned:
                self.served[b] = np.empty(block_bytes[b], dtype=np.uint8)
        for b in self.owned:
            if served_dtype == "float32":
                self.master[b] = self.served[b].view(np.float32)  # one copy of the model
            else:
                self.master[b] = np.empty(manifest.blocks[b].numel, dtype=np.float32)
        # the optimizer's per-parameter state (momentum / adam moments), float32 [numel, width] per
        # trainable block, in this process's memory next to the master: written and read under the
        # block's lock. A frozen block (BlockSpec.trainable False: an adapter target's base weights)
        # never changes, so it has none: with LoRA the state is the adapters' size, not the model's
        self.optimizer = optimizer or Optimizer()
        self.opt_state: dict[int, np.ndarray] = {}
        if self.optimizer.width:
            for b in self.owned:
                if manifest.blocks[b].trainable:
                    self.opt_state[b] = self.optimizer.new_state(manifest.blocks[b].numel)  # type: ignore[assignment]
        self.locks = {b: RWLock() for b in self.owned}
        self.cond = threading.Condition()

    # ------------------------------------------------------------------ versions
    def version(self, b: int) -> int:
        return int(self.versions[b])

    def applied_version(self) -> int:
        return min((self.version(b) for b in self.owned), default=-1)

    def wait_version(self, b: int, version: int, timeout_s: float, cancelled: threading.Event | None = None) -> int:
        """Block until ``b`` has ``version`` (returns it); -1 means any loaded version.

        Raises StaleVersion (the block moved past it), TimeoutError, or WaitCancelled when
        ``cancelled`` is set (the caller went away: its thread is not held any longer).
        """
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                v = self.version(b)
                if version < 0 and v >= 0:
                    return v
                if v == version:
                    return v
                if v > version >= 0:
                    raise StaleVersion(f"block {b} is at version {v}; version {version} is gone (the server never serves stale data)")
                if cancelled is not None and cancelled.is_set():
                    raise WaitCancelled(f"the wait for block {b} version {version} was cancelled")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"block {b} is at version {v}; version {version} did not arrive in {timeout_s:.1f}s")
                self.cond.wait(remaining)

    def _publish(self, b: int, version: int) -> None:
        if self.segments is not None:
            self.segments.end_write(b, version)
        else:
            self.versions[b] = version
        with self.cond:
            self.cond.notify_all()

    def _begin(self, b: int) -> None:
        if self.segments is not None:
            self.segments.begin_write(b)

    # ------------------------------------------------------------------ writing
    def set_block(self, b: int, data: np.ndarray, version: int, state: np.ndarray | None = None) -> None:
        """Install fp32 block contents at a version (load, recovery, replica catch-up).

        ``state``: the optimizer's state of the block at that version (float32 [numel, width]);
        None sets it to zeros (the initial weights), and is the only value for a block without state
        (sgd, or a frozen block). Raises ValueError for a state of another shape, or for a block without one."""
        if state is not None and b not in self.opt_state:
            raise ValueError(f"block {b} keeps no optimizer state ({'frozen' if not self.manifest.blocks[b].trainable else 'sgd'}), "
                             "but a state was given for it")
        if b in self.opt_state and state is not None and state.shape != self.opt_state[b].shape:
            raise ValueError(f"optimizer state of block {b} has shape {state.shape}, expected {self.opt_state[b].shape}")
        with self.locks[b].write():
            self._begin(b)
            np.copyto(self.master[b], data.reshape(-1))
            if b in self.opt_state:
                if state is None:
                    self.opt_state[b].fill(0.0)
                else:
                    np.copyto(self.opt_state[b], state)
            if self.served_dtype != "float32":
                to_served(self.master[b], self.served_dtype, self.served[b])
            self._publish(b, version)

    def apply(self, record: UpdateRecord, dist: Distribution, before_modify: Callable[[int], None] | None = None) -> int:
        """Apply one update to every owned block still at ``record.step``, in execution order."""
        applied = 0
        for b in self.owned:
            v = self.version(b)
            if v > record.step:
                continue  # already past this step (replica catching up block by block)
            if v < record.step:
                raise RuntimeError(f"block {b} is at version {v}; cannot apply step {record.step}")
            if before_modify is not None and self.manifest.blocks[b].trainable:
                before_modify(b)  # a frozen block's bytes never change: no copy-on-write for a snapshot
            with self.locks[b].write():
                self._begin(b)
                # one pass writes the new master and (16-bit serving) the new served copy; the
                # block's version is fetchable as soon as its own update is done
                served = self.served[b].view(np.uint16) if self.served_dtype != "float32" else None
                apply_update(self.manifest.blocks[b], torch.from_numpy(self.master[b]), record, dist,
                             served, self.served_dtype, self.optimizer, self.opt_state.get(b))
                self._publish(b, record.step + 1)
            applied += 1
        return applied

    # ------------------------------------------------------------------ reading
    @contextmanager
    def reading(self, b: int) -> Iterator[None]:
        with self.locks[b].read():
            yield

    def bytes_of(self, b: int, master: bool) -> np.ndarray:
        return self.master[b].view(np.uint8) if master else self.served[b]

    def state_bytes(self, b: int) -> np.ndarray:
        """The optimizer state of block ``b`` as bytes (element-major: a slice of elements is contiguous).
        Raises KeyError for a block without state (sgd, or a frozen block)."""
        return self.opt_state[b].reshape(-1).view(np.uint8)

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this store holds: width x 4 per parameter of its trainable blocks only."""
        return sum(s.nbytes for s in self.opt_state.values())

    def digest(self, b: int) -> tuple[int, int]:
        """(version, xxh3 of the master's bytes, followed by the optimizer state's when there is one)."""
        with self.locks[b].read():
            h = xxhash.xxh3_64(memoryview(self.master[b].view(np.uint8)))
            if b in self.opt_state:
                h.update(memoryview(self.state_bytes(b)))
            return self.version(b), h.intdigest()

    def close(self) -> None:
        if self.segments is not None:
            self.master.clear()
            self.served.clear()
            self.versions = np.array([], dtype=np.int64)
            self.segments.close(unlink=True)
            self.segments = None
