"""Snapshots: the fp32 master at one version, as a safetensors file, written while training goes on.

``snapshot-<version>.safetensors`` holds one flat F32 tensor per owned block (``block.<i>``).
The file is streamed block by block (the header's offsets are known up front) into a
temporary file, fsync'd and renamed; then ``snapshot-<version>.json`` (version, manifest
digest, per-block xxh3, file size) is written the same way — its rename is the commit
point. A snapshot without its sidecar, or whose bytes do not match it, is not used.

While a snapshot is being written, the updater may need to change a block the writer has
not reached yet: it first hands the writer a copy of that block (copy-on-write), so the
snapshot is exactly the version it names and training never waits for the disk.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import xxhash

from distzo.logs import kv
from paramserver.journal import fsync_dir

log = logging.getLogger("distzo.paramserver.snapshot")
FORMAT = "distzo-snapshot/1"


class SnapshotCorrupt(RuntimeError):
    pass


@dataclass
class SnapshotInfo:
    version: int
    path: Path
    meta: dict


def _write_atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class SnapshotJob:
    """Writes one snapshot; the updater calls ``before_modify(b)`` before changing block b."""

    def __init__(self, directory: Path, version: int, blocks: list[int], numels: dict[int, int],
                 live: Callable[[int], np.ndarray], manifest_digest: str):
        self.dir = directory
        self.version = version
        self.blocks = blocks
        self.numels = numels
        self.live = live
        self.manifest_digest = manifest_digest
        self._lock = threading.Lock()
        self._copies: dict[int, np.ndarray] = {}
        self._written: set[int] = set()
        self._writing: int | None = None
        self._writing_done = threading.Condition(self._lock)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.bytes = 0
        self.path = directory / f"snapshot-{version:012d}.safetensors"

    def before_modify(self, b: int) -> None:
        with self._lock:
            while self._writing == b:
                self._writing_done.wait()
            if b in self.blocks and b not in self._written and b not in self._copies:
                self._copies[b] = self.live(b).copy()

    def _take(self, b: int) -> tuple[np.ndarray, bool]:
        with self._lock:
            data = self._copies.pop(b, None)
            if data is not None:
                return data, True
            self._writing = b  # the updater waits for this block instead of copying it
            return self.live(b), False

    def _mark(self, b: int) -> None:
        with self._lock:
            self._written.add(b)
            if self._writing == b:
                self._writing = None
            self._writing_done.notify_all()

    def run(self) -> None:
        """Write the snapshot; the caller sets ``done`` once its own follow-up (pruning) is over."""
        try:
            self._write()
        except BaseException as exc:  # reported through .error; the server keeps running
            self.error = exc
            log.error("snapshot failed: %s", exc, extra=kv(version=self.version))
        finally:
            with self._lock:  # never leave the updater waiting for this job
                self._writing = None
                self._written.update(self.blocks)
                self._copies.clear()
                self._writing_done.notify_all()

    def _write(self) -> None:
        header: dict[str, object] = {}
        offset = 0
        for b in self.blocks:
            n = self.numels[b] * 4
            header[f"block.{b}"] = {"dtype": "F32", "shape": [self.numels[b]], "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": FORMAT, "version": str(self.version)}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = self.path.with_suffix(".safetensors.tmp")
        digests = {}
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for b in self.blocks:
                data, _ = self._take(b)
                try:
                    view = memoryview(np.ascontiguousarray(data).view(np.uint8))
                    digests[str(b)] = xxhash.xxh3_64_hexdigest(view)
                    f.write(view)
                finally:
                    self._mark(b)
            f.flush()
            os.fsync(f.fileno())
            self.bytes = f.tell()
        os.replace(tmp, self.path)
        _write_atomic_json(self.path.with_suffix(".json"), {
            "format": FORMAT, "version": self.version, "manifest_sha256": self.manifest_digest,
            "blocks": digests, "file_bytes": self.bytes,
        })
        log.info("snapshot written", extra=kv(version=self.version, bytes=self.bytes))


def list_snapshots(directory: Path) -> list[SnapshotInfo]:
    out = []
    for meta_path in directory.glob("snapshot-*.json"):
        try:
            meta = json.loads(meta_path.read_text())
            out.append(SnapshotInfo(int(meta["version"]), meta_path.with_suffix(".safetensors"), meta))
        except (ValueError, KeyError, json.JSONDecodeError):
            log.warning("ignoring an unreadable snapshot sidecar", extra=kv(path=str(meta_path)))
    return sorted(out, key=lambda s: s.version)


def load_snapshot(info: SnapshotInfo, manifest_digest: str) -> dict[int, np.ndarray]:
    """The snapshot's blocks, checked against its sidecar; raises SnapshotCorrupt."""
    from safetensors import SafetensorError, safe_open

    if info.meta.get("format") != FORMAT:
        raise SnapshotCorrupt(f"{info.path.name}: unknown format {info.meta.get('format')!r}")
    if info.meta.get("manifest_sha256") != manifest_digest:
        raise SnapshotCorrupt(f"{info.path.name} was taken of a different model or block layout")
    if not info.path.is_file() or info.path.stat().st_size != info.meta.get("file_bytes"):
        raise SnapshotCorrupt(f"{info.path.name} is missing or truncated")
    blocks: dict[int, np.ndarray] = {}
    try:
        with safe_open(str(info.path), framework="numpy") as f:
            for key, digest in info.meta["blocks"].items():
                arr = f.get_tensor(f"block.{key}")
                if xxhash.xxh3_64_hexdigest(memoryview(np.ascontiguousarray(arr).view(np.uint8))) != digest:
                    raise SnapshotCorrupt(f"{info.path.name}: block {key} fails its checksum")
                blocks[int(key)] = arr
    except SafetensorError as exc:
        raise SnapshotCorrupt(f"{info.path.name} is not a readable safetensors file: {exc}") from None
    return blocks


def prune_snapshots(directory: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` complete snapshots."""
    snaps = list_snapshots(directory)
    removed = []
    for s in snaps[:-keep] if keep else []:
        s.path.unlink(missing_ok=True)
        s.path.with_suffix(".json").unlink(missing_ok=True)
        removed.append(s.version)
    return removed


def remove_temporaries(directory: Path) -> None:
    """Half-written snapshot files left by a crash (call only when no snapshot is running)."""
    for tmp in directory.glob("snapshot-*.tmp"):
        tmp.unlink(missing_ok=True)
