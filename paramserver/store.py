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

from distzo.model.blocks import ITEMSIZE, Manifest
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update, apply_window
from distzo.zo.optim import Optimizer
from distzo.zo.record import UpdateRecord
from distzo.zo.served import cast_into
from paramserver.dataplane.shm import ServedSegments, StaleVersion


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


class BlockStore:
    """Every owned block's fp32 master, its served copies (one per window slot) and their versions.

    ``window`` K (server.update_window): K = 1 keeps one served copy per block, rewritten by every
    update (a version is fetchable once its block's update is done). K > 1 keeps two *slots* per
    block: materialized version V lives in slot ``(V // K) % 2``, so workers read the published base
    while the next one is written into the other slot. With a float32 served copy the two slots are
    the masters of consecutive bases (the pass reads one and writes the other: the master is the newer);
    with a 16-bit one the master is a separate fp32 array updated in place and each slot holds a
    rounded base. A frozen block never changes: its slots share one buffer (no second copy).
    """

    def __init__(self, manifest: Manifest, first: int, end: int, served_dtype: str,
                 shm_dir: str | None, name: str, optimizer: Optimizer | None = None, window: int = 1):
        self.manifest = manifest
        self.first, self.end = first, end
        self.owned = range(first, end)
        self.served_dtype = served_dtype
        self.window = window
        self.nslots = 1 if window == 1 else 2
        self.nblocks = nblocks = len(manifest.blocks)
        itemsize = ITEMSIZE[served_dtype]
        block_bytes = [manifest.blocks[b].numel * itemsize if b in self.owned else 0 for b in range(nblocks)]
        shared = {b for b in self.owned if not manifest.blocks[b].trainable}  # frozen: one buffer for both slots
        self.segments: ServedSegments | None = None
        self.master: dict[int, np.ndarray] = {}
        self.served: dict[tuple[int, int], np.ndarray] = {}  # (slot, block) -> served bytes (uint8)
        if shm_dir:
            self.segments = ServedSegments(shm_dir, name, block_bytes, self.nslots, window, shared)
            self.versions = self.segments.table[:, 1]  # row slot * nblocks + block
            for s in range(self.nslots):
                for b in self.owned:
                    self.served[(s, b)] = self.segments.block(self.row(s, b))
        else:
            self.versions = np.full(self.nslots * nblocks, -1, dtype=np.int64)
            for b in self.owned:
                self.served[(0, b)] = np.empty(block_bytes[b], dtype=np.uint8)
                for s in range(1, self.nslots):
                    self.served[(s, b)] = self.served[(0, b)] if b in shared else np.empty(block_bytes[b], dtype=np.uint8)
        for b in self.owned:
            if served_dtype == "float32":
                self.master[b] = self.served[(0, b)].view(np.float32)  # one copy of the model (per slot)
            else:
                self.master[b] = np.empty(manifest.blocks[b].numel, dtype=np.float32)
        self.master_versions = np.full(nblocks, -1, dtype=np.int64)
        # the optimizer's per-parameter state (momentum / adam moments), float32 [numel, width] per
        # trainable block, in this process's memory next to the master: written and read under the
        # block's master lock. A frozen block (BlockSpec.trainable False: an adapter target's base weights)
        # never changes, so it has none: with LoRA the state is the adapters' size, not the model's.
        # Stateful optimizers run with K = 1 only (the workers' replay has no state).
        self.optimizer = optimizer or Optimizer()
        self.opt_state: dict[int, np.ndarray] = {}
        if self.optimizer.width:
            for b in self.owned:
                if manifest.blocks[b].trainable:
                    self.opt_state[b] = self.optimizer.new_state(manifest.blocks[b].numel)  # type: ignore[assignment]
        self.locks = {(s, b): RWLock() for s in range(self.nslots) for b in self.owned}  # the served slots
        # the master's own lock; with a float32 served copy the master is a slot, and its slot's lock guards it
        self.mlocks = {b: RWLock() for b in self.owned}
        self.cond = threading.Condition()

    # ------------------------------------------------------------------ versions
    def row(self, slot: int, b: int) -> int:
        return slot * self.nblocks + b

    def slot_of(self, version: int) -> int:
        """The slot that holds materialized version ``version`` (0 with one slot)."""
        return (version // self.window) % self.nslots

    def version(self, b: int) -> int:
        """The version of block b's fp32 master (the newest materialized)."""
        return int(self.master_versions[b])

    def slot_version(self, b: int, version: int) -> int:
        """The version now in the slot that holds ``version`` for block b (-1: nothing there yet)."""
        return int(self.versions[self.row(self.slot_of(version), b)])

    def applied_version(self) -> int:
        """The version every owned block's master has reached (a window boundary when K > 1)."""
        return min((self.version(b) for b in self.owned), default=-1)

    def check_version(self, version: int) -> None:
        """ValueError unless ``version`` can ever be served: with K > 1 only window boundaries are."""
        if version >= 0 and version % self.window:
            raise ValueError(f"version {version} is not a multiple of server.update_window {self.window}: only "
                             f"materialized versions are served (distzo.zo.mezo.base_version)")

    def wait_version(self, b: int, version: int, timeout_s: float, cancelled: threading.Event | None = None) -> int:
        """Block until block ``b``'s served copy of ``version`` is published (returns it); -1 means the newest.

        Raises ValueError (not a materialized version), StaleVersion (its slot moved past it), TimeoutError,
        or WaitCancelled when ``cancelled`` is set (the caller went away: its thread is not held any longer).
        """
        self.check_version(version)
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                if version < 0:
                    v = max(int(self.versions[self.row(s, b)]) for s in range(self.nslots))
                    if v >= 0:
                        return v
                else:
                    v = self.slot_version(b, version)
                    if v == version:
                        return v
                    if v > version:
                        raise StaleVersion(f"block {b}: version {version} is gone (its slot holds version {v}; the "
                                           "server never serves stale data)")
                if cancelled is not None and cancelled.is_set():
                    raise WaitCancelled(f"the wait for block {b} version {version} was cancelled")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"block {b} is at version {self.version(b)}; version {version} did not arrive "
                                       f"in {timeout_s:.1f}s")
                self.cond.wait(remaining)

    def _publish(self, slot: int, b: int, version: int) -> None:
        if self.segments is not None:
            self.segments.end_write(self.row(slot, b), version)
        else:
            self.versions[self.row(slot, b)] = version
        with self.cond:
            self.cond.notify_all()

    def _begin(self, slot: int, b: int) -> None:
        if self.segments is not None:
            self.segments.begin_write(self.row(slot, b))

    def master_lock(self, b: int) -> RWLock:
        """The lock that guards block b's master (its slot's, when the master is a float32 slot)."""
        if self.served_dtype == "float32":
            return self.locks[(self.slot_of(max(0, self.version(b))), b)]
        return self.mlocks[b]

    # ------------------------------------------------------------------ writing
    def set_block(self, b: int, data: np.ndarray, version: int, state: np.ndarray | None = None) -> None:
        """Install fp32 block contents at a (materialized) version: load, recovery, replica catch-up.

        ``state``: the optimizer's state of the block at that version (float32 [numel, width]);
        None sets it to zeros (the initial weights), and is the only value for a block without state
        (sgd, or a frozen block). Raises ValueError for a state of another shape, for a block without one,
        or for a version that is not a window boundary."""
        self.check_version(version)
        if state is not None and b not in self.opt_state:
            raise ValueError(f"block {b} keeps no optimizer state ({'frozen' if not self.manifest.blocks[b].trainable else 'sgd'}), "
                             "but a state was given for it")
        if b in self.opt_state and state is not None and state.shape != self.opt_state[b].shape:
            raise ValueError(f"optimizer state of block {b} has shape {state.shape}, expected {self.opt_state[b].shape}")
        slot = self.slot_of(version)
        with self.mlocks[b].write(), self.locks[(slot, b)].write():
            self._begin(slot, b)
            if self.served_dtype == "float32":
                self.master[b] = self.served[(slot, b)].view(np.float32)
            np.copyto(self.master[b], data.reshape(-1))
            if b in self.opt_state:
                if state is None:
                    self.opt_state[b].fill(0.0)
                else:
                    np.copyto(self.opt_state[b], state)
            if self.served_dtype != "float32":
                cast_into(self.master[b], self.served_dtype, self.served[(slot, b)])
            self.master_versions[b] = version
            self._publish(slot, b, version)

    def set_served(self, b: int, version: int, data: np.ndarray) -> None:
        """Install the served bytes of an older materialized version (a replica's re-sync copies the base its
        primary still serves): only the slot, not the master. ValueError for a version that is not older."""
        self.check_version(version)
        if self.nslots == 1 or version >= self.version(b) or self.slot_of(version) == self.slot_of(self.version(b)):
            raise ValueError(f"block {b}: version {version} is not the base before the master's {self.version(b)}")
        slot = self.slot_of(version)
        with self.locks[(slot, b)].write():
            self._begin(slot, b)
            np.copyto(self.served[(slot, b)], data.reshape(-1).view(np.uint8))
            self._publish(slot, b, version)

    def apply(self, record: UpdateRecord, dist: Distribution, before_modify: Callable[[int], None] | None = None) -> int:
        """Apply one update to every owned block still at ``record.step``, in execution order (K = 1)."""
        return self.materialize([record], dist, before_modify)

    def materialize(self, records: list[UpdateRecord], dist: Distribution,
                    before_modify: Callable[[int], None] | None = None) -> int:
        """Apply consecutive update records to every owned block whose master is at the first one's step, in
        one pass per block (``mezo.apply_window``; one record: ``mezo.apply_update``, with the optimizer's
        state), and publish each block's new version in its slot as soon as its own pass is done. Blocks
        already past them are skipped (a replica catching up block by block); returns how many were updated.
        ``before_modify(b)``: called before a trainable block's master changes (a snapshot's copy-on-write)."""
        first, new = records[0].step, records[-1].step + 1
        applied = 0
        for b in self.owned:
            v = self.version(b)
            if v >= new:
                continue
            if v != first:
                raise RuntimeError(f"block {b} is at version {v}; cannot apply steps {first}..{new - 1}")
            spec = self.manifest.blocks[b]
            if before_modify is not None and spec.trainable:
                before_modify(b)  # a frozen block's bytes never change: no copy-on-write for a snapshot
            old, slot = self.slot_of(v), self.slot_of(new)
            shared = self.nslots > 1 and not spec.trainable  # one buffer for both slots: nothing to write
            with self.mlocks[b].write(), self.locks[(old, b)].read() if old != slot else _nothing(), \
                    self.locks[(slot, b)].write():
                self._begin(slot, b)
                if not shared:
                    self._write(b, spec, records, dist, old, slot)
                self.master_versions[b] = new
                self._publish(slot, b, new)
            applied += 1
        return applied

    def _write(self, b: int, spec, records: list[UpdateRecord], dist: Distribution, old: int, slot: int) -> None:  # noqa: ANN001
        served = self.served[(slot, b)].view(np.uint16) if self.served_dtype != "float32" else None
        src = self.master[b]
        dst = self.served[(slot, b)].view(np.float32) if self.served_dtype == "float32" and old != slot else src
        if len(records) == 1 and dst is src:  # the single step, also the stateful optimizers'
            apply_update(spec, torch.from_numpy(src), records[0], dist, served, self.served_dtype, self.optimizer,
                         self.opt_state.get(b))
        else:
            apply_window(spec, src, dst, records, dist, served, self.served_dtype)
        self.master[b] = dst

    # ------------------------------------------------------------------ reading
    @contextmanager
    def reading(self, b: int, version: int = -1, master: bool = False) -> Iterator[None]:
        """Hold block b's served slot of ``version`` (or its master) still while reading it."""
        lock = self.master_lock(b) if master or version < 0 else self.locks[(self.slot_of(version), b)]
        with lock.read():
            yield

    def bytes_of(self, b: int, master: bool, version: int = -1) -> np.ndarray:
        """The master's bytes, or the served bytes of the slot of ``version`` (-1: the master's slot)."""
        if master:
            return self.master[b].view(np.uint8)
        return self.served[(self.slot_of(self.version(b) if version < 0 else version), b)]

    def state_bytes(self, b: int) -> np.ndarray:
        """The optimizer state of block ``b`` as bytes (element-major: a slice of elements is contiguous).
        Raises KeyError for a block without state (sgd, or a frozen block)."""
        return self.opt_state[b].reshape(-1).view(np.uint8)

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this store holds: width x 4 per parameter of its trainable blocks only."""
        return sum(s.nbytes for s in self.opt_state.values())

    def served_nbytes(self) -> int:
        """Bytes of served copies this store holds (both slots with K > 1; with a float32 copy they are the masters)."""
        return sum(buf.nbytes for key, buf in self.served.items()
                   if key[0] == 0 or buf is not self.served[(0, key[1])])

    def digest(self, b: int) -> tuple[int, int]:
        """(version, xxh3 of the master's bytes, followed by the optimizer state's when there is one)."""
        with self.master_lock(b).read():
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


@contextmanager
def _nothing() -> Iterator[None]:
    yield
