"""The update journal: append-only, fsync'd before an update is acknowledged.

Records are ``MAGIC | length (u32) | crc32 (u32) | UpdateRecord protobuf``, in segment
files ``journal-<first step>.log``. A new segment starts at every step that is a multiple
of the snapshot cadence, so a completed snapshot lets whole segments behind it be deleted.

Recovery reads every record in order. A record cut short at the very end of the last
segment, or whose checksum fails there, is a write that never completed: it was never
fsync'd, hence never acknowledged, and is discarded (the file is truncated). Damage
anywhere else is reported as corruption and recovery stops: the weights could no longer be
reproduced bitwise.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distzo.logs import kv
from distzo.mezo import Direction, UpdateRecord
from protos import common_pb2

log = logging.getLogger("distzo.paramserver.journal")

MAGIC = b"DZJ1"
_HEAD = struct.Struct("<4sII")
RECENT = 4096  # records kept in memory for followers


class JournalCorrupt(RuntimeError):
    """Damage that cannot be a torn final write."""


def record_to_pb(r: UpdateRecord) -> common_pb2.UpdateRecord:
    return common_pb2.UpdateRecord(
        step=r.step,
        directions=[common_pb2.Direction(seed=d.seed, g=d.g) for d in r.directions],
        lr=r.lr,
        weight_decay=r.weight_decay,
        skipped=r.skipped,
    )


def record_from_pb(m: common_pb2.UpdateRecord) -> UpdateRecord:
    return UpdateRecord(
        step=m.step,
        directions=tuple(Direction(seed=d.seed, g=d.g) for d in m.directions),
        lr=m.lr,
        weight_decay=m.weight_decay,
        skipped=m.skipped,
    )


def encode(r: UpdateRecord) -> bytes:
    payload = record_to_pb(r).SerializeToString()
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass
class Segment:
    first_step: int
    path: Path


def fsync_dir(d: Path) -> None:
    """Make a rename or a new file in ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, directory: str | Path, rotate_every: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rotate_every = rotate_every
        self._fh = None
        self._lock = threading.Lock()
        self.recent: deque[UpdateRecord] = deque(maxlen=RECENT)
        self.appended = threading.Condition()
        self.next_step = 0  # the step the next append must carry
        self.bytes_written = 0

    # ------------------------------------------------------------------ layout
    def segments(self) -> list[Segment]:
        segs = []
        for p in self.dir.glob("journal-*.log"):
            try:
                segs.append(Segment(int(p.stem.split("-", 1)[1]), p))
            except ValueError:
                continue
        return sorted(segs, key=lambda s: s.first_step)

    def total_bytes(self) -> int:
        total = 0
        for seg in self.segments():
            try:
                total += seg.path.stat().st_size
            except FileNotFoundError:  # pruned while we looked
                pass
        return total

    # ------------------------------------------------------------------ recovery
    def read_all(self, repair: bool = True) -> Iterator[UpdateRecord]:
        """Every record in step order; a torn final record is dropped (and truncated if repair)."""
        segs = self.segments()
        for si, seg in enumerate(segs):
            last_segment = si == len(segs) - 1
            data = seg.path.read_bytes()
            pos = 0
            while pos < len(data):
                torn = None
                reaches_end = True  # does the damage run to the end of the file (a torn append)?
                end = len(data)
                if len(data) - pos < _HEAD.size:
                    torn = "header cut short"
                else:
                    magic, length, crc = _HEAD.unpack_from(data, pos)
                    end = pos + _HEAD.size + length
                    if magic != MAGIC:
                        torn = "bad record marker"
                        reaches_end = not any(data[pos:])  # a zero-filled tail left by a crash
                    elif end > len(data):
                        torn = "record cut short"
                    elif zlib.crc32(data[pos + _HEAD.size : end]) != crc:
                        torn = "checksum mismatch"
                        reaches_end = end == len(data)
                if torn is not None:
                    is_tail = last_segment and reaches_end
                    where = f"{seg.path.name} at byte {pos}"
                    if not is_tail:
                        raise JournalCorrupt(f"journal damaged in {where} ({torn}) before its end; "
                                             "the weights cannot be recovered bitwise from it")
                    log.warning("discarding a torn final journal record (never acknowledged)",
                                extra=kv(file=seg.path.name, offset=pos, reason=torn))
                    if repair:
                        with open(seg.path, "r+b") as f:
                            f.truncate(pos)
                            os.fsync(f.fileno())
                    break
                msg = common_pb2.UpdateRecord.FromString(data[pos + _HEAD.size : end])
                yield record_from_pb(msg)
                pos = end

    # ------------------------------------------------------------------ appending
    def open(self, next_step: int) -> None:
        """Start appending: the next record must be for ``next_step``."""
        self.next_step = next_step
        segs = self.segments()
        if segs and segs[-1].first_step <= next_step:
            self._fh = open(segs[-1].path, "ab")
        else:
            self._start_segment(next_step)

    def _start_segment(self, first_step: int) -> None:
        if self._fh is not None:
            self._fh.close()
        path = self.dir / f"journal-{first_step:012d}.log"
        self._fh = open(path, "ab")
        fsync_dir(self.dir)

    def append(self, record: UpdateRecord) -> int:
        """Durably append the record for ``next_step``; returns the journal's total bytes."""
        with self._lock:
            if record.step != self.next_step:
                raise ValueError(f"journal expects step {self.next_step}, got {record.step}")
            if self.rotate_every and record.step % self.rotate_every == 0 and record.step > 0:
                self._start_segment(record.step)
            blob = encode(record)
            self._fh.write(blob)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self.bytes_written += len(blob)
            self.next_step += 1
        with self.appended:
            self.recent.append(record)
            self.appended.notify_all()
        return self.bytes_written

    def drop_before(self, step: int) -> int:
        """Delete segments whose records all precede ``step``; returns how many."""
        segs = self.segments()
        dropped = 0
        for seg, nxt in zip(segs, segs[1:]):
            if nxt.first_step <= step:
                seg.path.unlink()
                dropped += 1
        if dropped:
            fsync_dir(self.dir)
        return dropped

    def records_from(self, step: int) -> Iterator[UpdateRecord]:
        """Records with step >= ``step`` already journaled (disk, then memory), in order."""
        with self.appended:
            if self.recent and self.recent[0].step <= step:
                return iter([r for r in self.recent if r.step >= step])
        segs = self.segments()
        if not segs or segs[0].first_step > step:
            first = segs[0].first_step if segs else self.next_step
            if step < first:
                raise LookupError(f"the journal no longer holds step {step} (it starts at {first}); re-sync from the blocks")
        return (r for r in self.read_all(repair=False) if r.step >= step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
