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
                 shm_dir: str | None, name: str):
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
    def set_block(self, b: int, data: np.ndarray, version: int) -> None:
        """Install fp32 block contents at a version (load, recovery, replica catch-up)."""
        with self.locks[b].write():
            self._begin(b)
            np.copyto(self.master[b], data.reshape(-1))
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
            if before_modify is not None:
                before_modify(b)
            with self.locks[b].write():
                self._begin(b)
                # one pass writes the new master and (16-bit serving) the new served copy; the
                # block's version is fetchable as soon as its own update is done
                served = self.served[b].view(np.uint16) if self.served_dtype != "float32" else None
                apply_update(self.manifest.blocks[b], torch.from_numpy(self.master[b]), record, dist,
                             served, self.served_dtype)
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

    def digest(self, b: int) -> tuple[int, int]:
        with self.locks[b].read():
            return self.version(b), xxhash.xxh3_64_intdigest(memoryview(self.master[b].view(np.uint8)))

    def close(self) -> None:
        if self.segments is not None:
            self.master.clear()
            self.served.clear()
            self.versions = np.array([], dtype=np.int64)
            self.segments.close(unlink=True)
            self.segments = None
