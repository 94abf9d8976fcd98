"""The update journal: append-only, fsync'd before an update is acknowledged.

A record is ``MAGIC "DZJ2" | length (u32) | crc32 of the payload (u32) | crc32 of the 12
bytes before (u32) | UpdateRecord protobuf | END "DZJE"``, little-endian, in segment files
``journal-<first step>.log``. A new segment starts at every step that is a multiple of the
snapshot cadence, so a completed snapshot lets whole segments behind it be deleted. (Records
of the first format, ``DZJ1 | length | crc32 | payload``, are still read.)

Recovery reads every record in order and checks that steps follow each other and that a
segment starts at the step its name says. A record that fails its checks is either

- a **torn final write**: it is in the last segment, runs to the end of the file, and holds
  no END marker and no other record's MAGIC (an append that never completed, or completed
  into zero-filled pages: never fsync'd, hence never acknowledged). It is dropped and the
  file truncated back to the last complete record; or
- **corruption** of a record that was complete (acknowledged): recovery refuses, naming the
  file and byte offset, and leaves the file as it is for an operator. One flipped bit in a
  length, checksum, marker or payload anywhere, the last record included, is corruption.

An append that fails (disk full, I/O error) is undone: the file is truncated back to where
the record began, so a failed append leaves nothing behind (``JournalWriteError``).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from google.protobuf.message import DecodeError

from distzo.common.durable import fsync_dir
from distzo.infra.logs import kv
from distzo.zo.record import UpdateRecord
from paramserver.dataplane.wire import record_from_pb, record_to_pb
from protos import common_pb2

log = logging.getLogger("distzo.paramserver.journal")

MAGIC = b"DZJ2"
MAGIC_V1 = b"DZJ1"
END = b"DZJE"
_HEAD = struct.Struct("<4sIII")  # magic, payload length, payload crc32, header crc32 (of the first 12 bytes)
_HEAD_V1 = struct.Struct("<4sII")
DAMAGED_END = "end marker damaged"  # a complete record (its payload checks out) whose END is not END: corruption
MAX_PAYLOAD = 1 << 20  # a record of 4096 directions is ~80 KiB; a larger length is damage
RECENT = 4096  # records kept in memory for followers
FILE_MODE = 0o600  # the journal is the service's state: private to its user


class JournalCorrupt(RuntimeError):
    """Damage that cannot be a torn final write."""


class JournalWriteError(OSError):
    """An append failed and was undone; ``errno`` says why (ENOSPC: the disk is full)."""


def encode(r: UpdateRecord) -> bytes:
    payload = record_to_pb(r).SerializeToString()
    head = struct.pack("<4sII", MAGIC, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload + END


def parse_record(data: bytes, pos: int) -> tuple[common_pb2.UpdateRecord, int] | str:
    """The record at ``pos`` and the offset after it, or why there is no good record there."""
    left = len(data) - pos
    if data[pos : pos + 4] == MAGIC_V1 and left >= _HEAD_V1.size:  # the first format: no header crc, no END
        _, length, crc = _HEAD_V1.unpack_from(data, pos)
        begin, end = pos + _HEAD_V1.size, pos + _HEAD_V1.size + length
        after = end
    else:
        if left < _HEAD.size:
            return "header cut short"
        magic, length, crc, head_crc = _HEAD.unpack_from(data, pos)
        if magic != MAGIC:
            return "bad record marker"
        if zlib.crc32(data[pos : pos + 12]) != head_crc:
            return "header checksum mismatch"
        if length > MAX_PAYLOAD:
            return f"record length {length} over the {MAX_PAYLOAD}-byte limit"
        begin, end = pos + _HEAD.size, pos + _HEAD.size + length
        after = end + len(END)
        if after <= len(data) and data[end:after] != END:
            # END's first bytes then zeros: the append never got further (unwritten pages); anything else is
            # damage (no single flipped bit zeroes a byte of END: each has at least two bits set)
            got = data[end:after]
            torn = any(got == END[:k] + bytes(len(END) - k) for k in range(len(END)))
            return "end marker missing" if torn else DAMAGED_END
    if after > len(data):
        return "record cut short"
    if zlib.crc32(data[begin:end]) != crc:
        return "payload checksum mismatch"
    try:
        return common_pb2.UpdateRecord.FromString(data[begin:end]), after
    except DecodeError:
        return "payload does not parse"


def is_torn_tail(tail: bytes) -> bool:
    """Could these last bytes of a journal be an append that never completed?

    An append writes one record front to back and ends it with END; a complete record was
    fsync'd and may have been acknowledged. So a tail is torn only if it holds no END marker
    (none of it completed) and no second record marker (it is one record, not damage
    followed by more records). A zero-filled tail (pages allocated, never written) is torn;
    a complete record with any flipped bit holds its END (or a record after it) and is not.
    """
    if not tail.strip(b"\0"):
        return True
    if END in tail:
        return False
    return MAGIC not in tail[1:] and MAGIC_V1 not in tail[1:]


@dataclass
class Segment:
    first_step: int
    path: Path


def describe_disk(path: Path) -> str:
    """'the disk holding P (mounted at M, N bytes free)': what an operator must free."""
    p = Path(path).resolve()
    mount = p
    try:
        dev = os.stat(p).st_dev
        while mount.parent != mount and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
        free = shutil.disk_usage(p).free
    except OSError:
        return f"the disk holding {p}"
    return f"the disk holding {p} (mounted at {mount}, {free} bytes free)"


class Journal:
    def __init__(self, directory: str | Path, rotate_every: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rotate_every = rotate_every
        self._fd: int | None = None
        self._seg_first = -1  # first step of the segment being appended to
        self._size = 0  # bytes in that segment: where the next record begins
        self._broken: str | None = None  # a failed append that could not be undone
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
        """Every record in step order; a torn final record is dropped (and truncated if repair).

        Raises JournalCorrupt (naming the file and byte offset, the file left untouched) for
        damage to a complete record, records out of order, or a segment that does not start
        at the step its name says.
        """
        segs = self.segments()
        last_step = None
        for si, seg in enumerate(segs):
            last_segment = si == len(segs) - 1
            data = seg.path.read_bytes()
            pos = 0
            first = True
            while pos < len(data):
                where = f"{seg.path} at byte {pos}"
                got = parse_record(data, pos)
                if isinstance(got, str):
                    if not (last_segment and got != DAMAGED_END and is_torn_tail(data[pos:])):
                        raise JournalCorrupt(f"journal damaged in {where} ({got}), before its last complete record: "
                                             "acknowledged updates cannot be recovered from it. The file is left as it "
                                             "is; restore the data directory from a backup, or move the damaged "
                                             "segment away to start from the newest snapshot")
                    log.warning("discarding a torn final journal record (an append that never completed, never "
                                "acknowledged)", extra=kv(file=str(seg.path), offset=pos, reason=got, bytes=len(data) - pos))
                    if repair:
                        fd = os.open(seg.path, os.O_WRONLY)
                        try:
                            os.ftruncate(fd, pos)
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                    break
                msg, end = got
                if first and msg.step != seg.first_step:
                    raise JournalCorrupt(f"journal damaged in {where}: the segment is named for step {seg.first_step} "
                                         f"but its first record is step {msg.step}")
                if last_step is not None and (msg.step <= last_step or (not first and msg.step != last_step + 1)):
                    raise JournalCorrupt(f"journal damaged in {where}: record for step {msg.step} follows step "
                                         f"{last_step}")
                first = False
                last_step = msg.step
                yield record_from_pb(msg)
                pos = end

    # ------------------------------------------------------------------ appending
    def open(self, next_step: int, last_step: int | None = None) -> None:
        """Start appending: the next record must be for ``next_step``.

        The last segment is continued only when its last record (``last_step``) is the one
        before; otherwise (a snapshot ahead of the journal, a fresh start) a new segment begins.
        """
        self.next_step = next_step
        for seg in self.segments():  # state files are private to the service's user (older ones too)
            seg.path.chmod(FILE_MODE)
        segs = self.segments()
        if segs and last_step is not None and last_step + 1 == next_step and segs[-1].first_step <= next_step:
            self._open_segment(segs[-1].first_step, segs[-1].path)
        elif segs and last_step is None and segs[-1].first_step == next_step:
            self._open_segment(next_step, segs[-1].path)  # an empty segment for this very step
        else:
            self._start_segment(next_step)

    def _open_segment(self, first_step: int, path: Path) -> None:
        self._close_fd()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        self._seg_first = first_step
        self._size = os.fstat(self._fd).st_size

    def _start_segment(self, first_step: int) -> None:
        path = self.dir / f"journal-{first_step:012d}.log"
        self._open_segment(first_step, path)
        fsync_dir(self.dir)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write(self, blob: bytes) -> None:
        assert self._fd is not None
        view = memoryview(blob)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def append(self, record: UpdateRecord) -> int:
        """Durably append the record for ``next_step``; returns the journal's total bytes.

        Raises JournalWriteError when the write or fsync fails: the segment is truncated back
        to where the record began, so nothing of it is left (and the next append can succeed
        once the cause is gone). If even that fails, every later append is refused.
        """
        with self._lock:
            if self._broken is not None:
                raise JournalWriteError(errno.EIO, self._broken)
            if record.step != self.next_step:
                raise ValueError(f"journal expects step {self.next_step}, got {record.step}")
            blob = encode(record)
            try:
                if self._fd is None or (self.rotate_every and record.step % self.rotate_every == 0
                                        and record.step > 0 and self._seg_first != record.step):
                    self._start_segment(record.step)
                start = self._size
                self._write(blob)
            except OSError as exc:
                raise self._undo(record.step, exc) from None
            self._size = start + len(blob)
            self.bytes_written += len(blob)
            self.next_step += 1
        with self.appended:
            self.recent.append(record)
            self.appended.notify_all()
        return self.bytes_written

    def _undo(self, step: int, exc: OSError) -> JournalWriteError:
        code = exc.errno or errno.EIO
        why = (f"no space left on {describe_disk(self.dir)}" if code in (errno.ENOSPC, errno.EDQUOT)
               else f"writing the journal in {self.dir} failed: {os.strerror(code)}")
        if self._fd is None:  # the segment could not even be created: nothing was written
            return JournalWriteError(code, f"{why}; the update for step {step} was not journaled")
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as again:
            self._broken = (f"{why}, and undoing the partial append of step {step} failed too "
                            f"({os.strerror(again.errno or errno.EIO)}): restart the server to recover the journal")
            log.critical("journal append could not be undone", extra=kv(step=step, error=self._broken))
            return JournalWriteError(code, self._broken)
        log.error("journal append failed and was undone", extra=kv(step=step, error=why))
        return JournalWriteError(code, f"{why}; the update for step {step} was not journaled (nothing was left "
                                       "behind): free space and send it again")

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
        with self._lock:
            self._close_fd()
