"""Shared-memory segments: the served blocks, mapped read-only by clients on the same host.

Two files in a memory-backed directory: ``<id>.data`` holds every owned block's served
bytes, once per window slot (server.update_window K > 1: two slots, materialized version V in
slot ``(V // K) % 2``); ``<id>.versions`` holds a header (magic, nonce, block count, owner, slots,
window) and, per (slot, block) row ``slot * blocks + block``, a sequence counter, the version, and
the row's byte range in the data file (a frozen block's slots share one range). The server
writes a block under a seqlock (sequence odd while writing, even when stable); a reader
copies the block, then checks the sequence did not move, so it never uses torn bytes.
The nonce, also reported over gRPC, tells a client it mapped this server's live segments.
Hardware memory fences (``paramserver.dataplane.fence``) order the seqlock's stores and loads on every
CPU (x86-64 would keep them ordered without; Arm, e.g. Grace Hopper, does not); where no fence
can be built, the segments refuse to be created or mapped (FenceUnavailable).
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np

from paramserver.dataplane.fence import require_fence
from paramserver.dataplane.hostcopy import parallel_copy

MAGIC = 0x445A_5348_4D32  # "DZSHM2"
OLD_MAGICS = (0x445A_5348_4D31,)  # "DZSHM1": no slots (the reaper still removes a dead server's)
HEADER_WORDS = 6  # magic, nonce, nblocks, owner pid, slots, window
BLOCK_WORDS = 4  # seq, version, byte offset, byte count
ALIGN = 64
POLL_S = 0.0001  # version-table polling interval of a waiting reader


class StaleVersion(Exception):
    """The block moved past the wanted version."""


class SegmentGone(Exception):
    """The mapped segments belong to a server that is gone or restarted."""


def _mmap(path: Path, size: int, writable: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0), flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)


class ServedSegments:
    """Server side: creates the segments and writes blocks under the seqlock."""

    def __init__(self, directory: str | Path, name: str, block_bytes: list[int], slots: int = 1, window: int = 1,
                 shared: frozenset[int] | set[int] = frozenset()):
        """``block_bytes``: served bytes per block (0 for a block this server does not hold); ``slots`` copies
        of each (``shared`` blocks: one range for all slots); ``window``: server.update_window."""
        self.fence = require_fence()  # before anything is created: no fence, no shared memory
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"shared-memory directory {str(d)!r} does not exist")
        self.data_path = d / f"{name}.data"
        self.versions_path = d / f"{name}.versions"
        nblocks = len(block_bytes)
        offsets, total = [], 0
        for s in range(slots):
            for b, n in enumerate(block_bytes):
                if s and b in shared:
                    offsets.append(offsets[b])
                    continue
                offsets.append(total)
                total += -(-n // ALIGN) * ALIGN
        self.nonce = secrets.randbits(63)
        self.total = max(total, ALIGN)
        words = HEADER_WORDS + BLOCK_WORDS * nblocks * slots
        for p in (self.data_path, self.versions_path):
            if p.exists():
                p.unlink()  # a dead predecessor's segment; clients notice the new nonce
        for p, size in ((self.data_path, self.total), (self.versions_path, words * 8)):
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        self._data = _mmap(self.data_path, self.total, writable=True)
        self._meta = _mmap(self.versions_path, words * 8, writable=True)
        self.data = np.frombuffer(self._data, dtype=np.uint8)
        self.words = np.frombuffer(self._meta, dtype=np.int64)
        self.table = self.words[HEADER_WORDS:].reshape(nblocks * slots, BLOCK_WORDS)
        self.table[:, 0] = 0
        self.table[:, 1] = -1
        self.table[:, 2] = offsets
        self.table[:, 3] = block_bytes * slots
        self.words[5] = window
        self.words[4] = slots
        self.words[3] = os.getpid()
        self.words[2] = nblocks
        self.words[1] = self.nonce
        self.fence()
        self.words[0] = MAGIC  # last: a reader seeing the magic sees a complete header

    def block(self, row: int) -> np.ndarray:
        """The bytes of table row ``row`` (slot * blocks + block)."""
        off, n = int(self.table[row, 2]), int(self.table[row, 3])
        return self.data[off : off + n]

    def begin_write(self, row: int) -> None:
        self.table[row, 0] += 1  # odd: readers back off
        self.fence()  # the odd sequence is visible before any byte of the row changes

    def end_write(self, row: int, version: int) -> None:
        self.fence()  # every byte of the row is visible before the version and the even sequence
        self.table[row, 1] = version
        self.table[row, 0] += 1  # even again

    def close(self, unlink: bool = True) -> None:
        del self.data, self.words, self.table
        for m in (self._data, self._meta):
            try:
                m.close()
            except BufferError:  # a view is still referenced somewhere; the mapping goes with it
                pass
        if unlink:
            for p in (self.data_path, self.versions_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass


def reap_stale_segments(directory: str | Path, prefix: str = "distzo-") -> list[str]:
    """Remove segments whose owning process is gone (a server killed with SIGKILL leaves them)."""
    removed = []
    for meta in Path(directory).glob(f"{prefix}*.versions"):
        try:
            head = np.frombuffer(meta.read_bytes()[: HEADER_WORDS * 8], dtype=np.int64)
        except OSError:
            continue
        if head.shape[0] < 4 or int(head[0]) not in (MAGIC, *OLD_MAGICS):
            continue
        pid = int(head[3])
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        for p in (meta, meta.with_suffix(".data")):
            p.unlink(missing_ok=True)
        removed.append(meta.stem)
    return removed


class SharedView:
    """Client side: read-only mapping of a server's segments."""

    def __init__(self, data_path: str, versions_path: str, nonce: int):
        self.fence = require_fence()  # no fence: no mapping (the client fetches over gRPC)
        vp, dp = Path(versions_path), Path(data_path)
        self.versions_path = vp
        self.inode = vp.stat().st_ino
        self._meta = _mmap(vp, vp.stat().st_size, writable=False)
        self._data = _mmap(dp, dp.stat().st_size, writable=False)
        self.words = np.frombuffer(self._meta, dtype=np.int64)
        if int(self.words[0]) != MAGIC or int(self.words[1]) != nonce:
            self.close()
            raise SegmentGone(f"{versions_path} does not belong to the server that named it")
        self.nonce = nonce
        self.nblocks, self.slots, self.window = int(self.words[2]), int(self.words[4]), int(self.words[5])
        self.table = self.words[HEADER_WORDS:].reshape(self.nblocks * self.slots, BLOCK_WORDS)
        self.data = np.frombuffer(self._data, dtype=np.uint8)
        self.on_close: list[Callable[[], None]] = []  # run before the mapping goes (a GPU registration's unregister)

    def alive(self, nonce: int) -> bool:
        return int(self.words[1]) == nonce == self.nonce

    def current(self) -> bool:
        """Still the live segment? A restarted server unlinks it and creates a new file."""
        try:
            return self.versions_path.stat().st_ino == self.inode
        except FileNotFoundError:
            return False

    def row(self, b: int, version: int) -> int:
        """The table row of block b that holds ``version`` (-1: the row with the newest version)."""
        if version < 0:
            rows = [s * self.nblocks + b for s in range(self.slots)]
            return max(rows, key=lambda r: int(self.table[r, 1]))
        return ((version // self.window) % self.slots) * self.nblocks + b

    def view(self, b: int, version: int = -1) -> np.ndarray:
        """Read-only view of the block's served bytes at ``version`` (validate with ``stable`` after use)."""
        r = self.row(b, version)
        off, n = int(self.table[r, 2]), int(self.table[r, 3])
        return self.data[off : off + n]

    def sequence(self, b: int, version: int = -1) -> tuple[int, int]:
        r = self.row(b, version)
        return int(self.table[r, 0]), int(self.table[r, 1])

    def read_into(self, b: int, version: int, start: int, dest: np.ndarray, timeout_s: float = 5.0) -> None:
        """Copy bytes [start, start+len(dest)) of block b at exactly ``version`` into dest (threaded memcpy)."""
        self.read_with(b, version, start, dest.nbytes, lambda src: parallel_copy(dest.view(np.uint8), src), timeout_s)

    def read_with(self, b: int, version: int, start: int, nbytes: int, copy: Callable[[np.ndarray], None],
                  timeout_s: float = 5.0) -> int:
        """Seqlock-checked read of bytes [start, start+nbytes) of block b at exactly ``version``.

        ``copy(src)`` gets the mapped (read-only) bytes and must have *completed* its copy when it
        returns (a device copy: synchronized); when the server wrote the block meanwhile, the copy is
        done again. Returns the number of copies made. Raises StaleVersion when the block moved past
        ``version``, TimeoutError when it did not settle at it in time."""
        deadline = time.monotonic() + timeout_s
        src = self.view(b, version)[start : start + nbytes]
        copies = 0
        while True:
            seq, ver = self.sequence(b, version)
            if ver > version:
                raise StaleVersion(f"block {b} is at version {ver}, past the wanted {version}")
            if seq % 2 == 0 and ver == version:
                self.fence()  # the sequence is read before the bytes
                copy(src)
                copies += 1
                self.fence()  # the bytes are read before the sequence is read again
                if self.sequence(b, version) == (seq, ver):
                    return copies
            if time.monotonic() > deadline:
                raise TimeoutError(f"block {b} did not settle at version {version} (at {ver}, seq {seq})")
            time.sleep(0.0002)

    def await_version(self, b: int, version: int, timeout_s: float) -> bool:
        """Poll the mapped table (no RPC) until block b shows ``version`` or later; False on timeout.
        A worker sees a block the moment the server publishes it (the RPC wait is the fallback)."""
        deadline = time.monotonic() + timeout_s
        while self.sequence(b, version)[1] < version:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def close(self) -> None:
        hooks, self.on_close = getattr(self, "on_close", []), []
        for hook in hooks:
            hook()
        for name in ("data", "words", "table"):
            if hasattr(self, name):
                delattr(self, name)
        for name in ("_meta", "_data"):
            try:
                getattr(self, name).close()
            except (AttributeError, BufferError):
                pass
