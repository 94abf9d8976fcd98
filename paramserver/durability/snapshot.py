"""Snapshots: the fp32 master at one version, as a safetensors file, written while training goes on.

``snapshot-<version>.safetensors`` holds one flat F32 tensor per owned block (``block.<i>``),
with train.optimizer momentum/adam also the block's optimizer state (``state.<i>``, F32
[numel, width]: the state at the same version; trainable blocks only, a frozen block has
none), and the version in its header's metadata. The file is streamed block by block (the header's
offsets are known up front) into a temporary file, fsync'd and renamed; then
``snapshot-<version>.json`` is written the same way, and its rename is the commit point. The
sidecar is checked JSON (``distzo.common.durable``: it carries the sha256 of its own contents) and
holds the version, the manifest digest, the sha256 of the safetensors header, the xxh3 of
every block (and of every block's state, with the state's width) and the file size.

Loading cross-checks every copy of every fact: the sidecar's checksum; its version against
the file names and the header's metadata; the header's bytes against their sha256; the
blocks present, their dtype and shape against the model; each block's bytes against their
xxh3. A snapshot failing any check is not used (recovery tries an older one); a snapshot
without its sidecar never completed. Files are private to the service's user.

While a snapshot is being written, the updater may need to change a block the writer has
not reached yet: it first hands the writer a copy of that block (copy-on-write), so the
snapshot is exactly the version it names and training never waits for the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import xxhash

from distzo.common.durable import CorruptFile, FILE_MODE, read_checked_json, write_checked_json
from distzo.infra.logs import kv

log = logging.getLogger("distzo.paramserver.snapshot")
FORMAT = "distzo-snapshot/2"
LEGACY_FORMAT = "distzo-snapshot/1"  # a plain-JSON sidecar without its own checksum (still read)


class SnapshotCorrupt(RuntimeError):
    pass


@dataclass
class SnapshotInfo:
    version: int
    path: Path
    meta: dict
    problem: str | None = None  # why the sidecar is unusable (the snapshot then is too)


class SnapshotJob:
    """Writes one snapshot; the updater calls ``before_modify(b)`` before changing block b."""

    def __init__(self, directory: Path, version: int, blocks: list[int], numels: dict[int, int],
                 live: Callable[[int], np.ndarray], manifest_digest: str,
                 live_state: Callable[[int], np.ndarray] | None = None,
                 finish: Callable[[int, np.ndarray], np.ndarray] | None = None):
        """``live(b)``: block b's master (float32 [numel]); ``live_state(b)``: its optimizer state
        (float32 [numel, width]), None for a block without one (frozen); ``live_state`` None: no block
        has state (sgd). Both are copied before the updater changes b. ``finish(b, master)``: the block's
        values at the snapshot's version from the master's (a new array; update windows: the master plus
        the pending records), None when the master is at the snapshot's version."""
        self.dir = directory
        self.version = version
        self.blocks = blocks
        self.numels = numels
        self.live = live
        self.live_state = live_state
        self.manifest_digest = manifest_digest
        self.finish = finish
        self._lock = threading.Lock()
        self._copies: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
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
                state = self.live_state(b) if self.live_state else None
                self._copies[b] = (self.live(b).copy(), state.copy() if state is not None else None)

    def _take(self, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            data = self._copies.pop(b, None)
            if data is None:
                self._writing = b  # the updater waits for this block instead of copying it
                data = (self.live(b), self.live_state(b) if self.live_state else None)
        if self.finish is not None:
            data = (self.finish(b, data[0]), data[1])
        return data

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
        # the blocks with a state, and its width (the live arrays' shapes never change)
        stateful = {b: s.shape[1] for b in self.blocks if self.live_state and (s := self.live_state(b)) is not None}
        width = max(stateful.values(), default=0)
        for b in self.blocks:
            n = self.numels[b] * 4
            header[f"block.{b}"] = {"dtype": "F32", "shape": [self.numels[b]], "data_offsets": [offset, offset + n]}
            offset += n
            if b in stateful:
                header[f"state.{b}"] = {"dtype": "F32", "shape": [self.numels[b], width],
                                        "data_offsets": [offset, offset + n * width]}
                offset += n * width
        header["__metadata__"] = {"format": FORMAT, "version": str(self.version)}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        head = struct.pack("<Q", len(raw)) + raw
        tmp = self.path.with_suffix(".safetensors.tmp")
        digests = {}
        state_digests = {}
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as f:
                f.write(head)
                for b in self.blocks:
                    data, state = self._take(b)
                    try:
                        view = memoryview(np.ascontiguousarray(data).view(np.uint8))
                        digests[str(b)] = xxhash.xxh3_64_hexdigest(view)
                        f.write(view)
                        if b in stateful:
                            view = memoryview(np.ascontiguousarray(state).reshape(-1).view(np.uint8))
                            state_digests[str(b)] = xxhash.xxh3_64_hexdigest(view)
                            f.write(view)
                    finally:
                        self._mark(b)
                f.flush()
                os.fsync(f.fileno())
                self.bytes = f.tell()
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed snapshot (disk full) leaves nothing behind
            raise
        os.replace(tmp, self.path)
        sidecar = {"format": FORMAT, "version": self.version, "manifest_sha256": self.manifest_digest,
                   "header_sha256": hashlib.sha256(head).hexdigest(), "blocks": digests, "file_bytes": self.bytes}
        if width:
            sidecar.update(state=state_digests, state_width=width)
        try:
            write_checked_json(self.path.with_suffix(".json"), sidecar)
        except BaseException:
            self.path.unlink(missing_ok=True)  # no sidecar: never committed
            raise
        log.info("snapshot written", extra=kv(version=self.version, bytes=self.bytes))


def _version_of_name(path: Path) -> int | None:
    try:
        return int(path.name.split("-", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        return None


def list_snapshots(directory: Path) -> list[SnapshotInfo]:
    """Every committed snapshot (one with a sidecar), oldest first; a damaged sidecar is listed with its problem."""
    out = []
    for meta_path in directory.glob("snapshot-*.json"):
        named = _version_of_name(meta_path)
        if named is None:
            continue
        try:
            meta = read_checked_json(meta_path)
        except CorruptFile as exc:
            try:  # a sidecar of the first format: plain JSON, cross-checked below instead
                meta = json.loads(meta_path.read_bytes())
                if not isinstance(meta, dict) or meta.get("format") != LEGACY_FORMAT:
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                out.append(SnapshotInfo(named, meta_path.with_suffix(".safetensors"), {}, str(exc)))
                continue
        problem = None if meta.get("version") == named else (
            f"{meta_path.name} names version {meta.get('version')!r}, not the {named} of its file name")
        out.append(SnapshotInfo(named, meta_path.with_suffix(".safetensors"), meta, problem))
    return sorted(out, key=lambda s: s.version)


def _read_header(path: Path, limit: int) -> tuple[bytes, dict]:
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= limit:
            raise SnapshotCorrupt(f"{path.name}: header length {n} is not possible for a {limit}-byte file")
        raw = f.read(n)
    try:
        return head + raw, json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SnapshotCorrupt(f"{path.name}: the header is not valid JSON") from None


def load_snapshot(info: SnapshotInfo, manifest_digest: str, numels: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """The snapshot's blocks (its optimizer state, if any, is not read): see ``load_snapshot_state``."""
    return load_snapshot_state(info, manifest_digest, numels, None)[0]


def load_snapshot_state(info: SnapshotInfo, manifest_digest: str, numels: dict[int, int] | None = None,
                        state_width: int | None = 0, stateful: Collection[int] | None = None,
                        ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The snapshot's blocks and optimizer states, every field cross-checked (see the module docstring).

    ``numels``: the elements of each block the server owns (the snapshot must hold exactly those).
    ``state_width``: fp32 state values per parameter the server's optimizer keeps (0: none); the
    snapshot must hold a state of that width for every block in ``stateful`` (the trainable ones;
    None: every block of the snapshot). ``state_width`` None: the state is not read.
    Returns ({block: float32 [numel]}, {block: float32 [numel, width]}); raises SnapshotCorrupt.
    """
    from safetensors import SafetensorError, safe_open

    name = info.path.name
    if info.problem:
        raise SnapshotCorrupt(info.problem)
    meta = info.meta
    if meta.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise SnapshotCorrupt(f"{name}: unknown format {str(meta.get('format'))[:40]!r}")
    if meta.get("manifest_sha256") != manifest_digest:
        raise SnapshotCorrupt(f"{name} was taken of a different model or block layout")
    size = info.path.stat().st_size if info.path.is_file() else -1
    if size != meta.get("file_bytes"):
        raise SnapshotCorrupt(f"{name} is missing or truncated ({size} bytes, the sidecar says {meta.get('file_bytes')})")
    head, header = _read_header(info.path, size)
    if meta.get("format") == FORMAT and hashlib.sha256(head).hexdigest() != meta.get("header_sha256"):
        raise SnapshotCorrupt(f"{name}: the safetensors header fails its checksum")
    if not isinstance(header, dict) or header.get("__metadata__", {}).get("version") != str(info.version):
        raise SnapshotCorrupt(f"{name}: the header's version does not match the file name's {info.version}")
    digests = meta.get("blocks")
    if not isinstance(digests, dict):
        raise SnapshotCorrupt(f"{name}: the sidecar lists no blocks")
    if numels is not None and sorted(digests) != sorted(str(b) for b in numels):
        raise SnapshotCorrupt(f"{name} holds blocks {sorted(digests)[:8]}, not the server's {sorted(numels)[:8]}")
    blocks: dict[int, np.ndarray] = {}
    try:
        with safe_open(str(info.path), framework="numpy") as f:
            for key, digest in digests.items():
                arr = f.get_tensor(f"block.{key}")
                want = numels.get(int(key)) if numels is not None else None
                if arr.dtype != np.float32 or arr.ndim != 1 or (want is not None and arr.shape[0] != want):
                    raise SnapshotCorrupt(f"{name}: block {key} is {arr.dtype} of shape {arr.shape}, not float32 "
                                          f"[{want}]")
                if xxhash.xxh3_64_hexdigest(memoryview(np.ascontiguousarray(arr).view(np.uint8))) != digest:
                    raise SnapshotCorrupt(f"{name}: block {key} fails its checksum")
                blocks[int(key)] = arr
            states = _load_states(f, name, meta, digests if stateful is None else [str(b) for b in stateful],
                                  numels, state_width)
    except SafetensorError as exc:
        raise SnapshotCorrupt(f"{name} is not a readable safetensors file: {str(exc)[:200]}") from None
    except (ValueError, KeyError) as exc:
        raise SnapshotCorrupt(f"{name} is damaged: {str(exc)[:200]}") from None
    return blocks, states


def _load_states(f, name: str, meta: dict, blocks: Collection[str], numels: dict[int, int] | None,  # noqa: ANN001
                 width: int | None) -> dict[int, np.ndarray]:
    """The states of ``blocks`` (the stateful ones, as strings), checked against the sidecar's list."""
    if width is None:
        return {}
    have = meta.get("state_width", 0)  # absent: a snapshot of a run without optimizer state
    if not isinstance(have, int) or isinstance(have, bool) or have < 0:
        raise SnapshotCorrupt(f"{name}: the sidecar's state_width {str(have)[:20]!r} is not a count")
    if have != width:
        raise SnapshotCorrupt(f"{name} holds an optimizer state of {have} values per parameter; this server's "
                              f"train.optimizer keeps {width}: the snapshot belongs to a run with another optimizer")
    if not width:
        return {}
    digests = meta.get("state")
    if isinstance(digests, dict) and set(blocks) < set(digests) <= set(meta.get("blocks") or ()):
        # a snapshot written before frozen blocks went without state also holds theirs (zeros, never
        # updated): read only the trainable blocks' states
        digests = {k: v for k, v in digests.items() if k in set(blocks)}
    if not isinstance(digests, dict) or sorted(digests) != sorted(blocks):
        listed = sorted(digests, key=int)[:8] if isinstance(digests, dict) else "none"
        raise SnapshotCorrupt(f"{name}: the sidecar lists optimizer states for blocks {listed}, not for the "
                              f"server's trainable blocks {sorted(blocks, key=int)[:8]}")
    states = {}
    for key, digest in digests.items():
        arr = f.get_tensor(f"state.{key}")
        want = numels.get(int(key)) if numels is not None else None
        if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[1] != width or (want is not None and arr.shape[0] != want):
            raise SnapshotCorrupt(f"{name}: the state of block {key} is {arr.dtype} of shape {arr.shape}, not float32 "
                                  f"[{want}, {width}]")
        if xxhash.xxh3_64_hexdigest(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))) != digest:
            raise SnapshotCorrupt(f"{name}: the optimizer state of block {key} fails its checksum")
        states[int(key)] = arr
    return states


def prune_snapshots(directory: Path, keep: int, keep_at_or_before: int | None = None) -> list[int]:
    """Delete all but the newest ``keep`` complete snapshots, and (``keep_at_or_before``) never the newest one at
    or before that version, nor any after it: update windows recover from a snapshot at or before a base."""
    snaps = list_snapshots(directory)
    if keep and keep_at_or_before is not None:
        older = [i for i, s in enumerate(snaps) if s.version <= keep_at_or_before]
        if older:
            keep = max(keep, len(snaps) - older[-1])
    removed = []
    for s in snaps[:-keep] if keep else []:
        s.path.unlink(missing_ok=True)
        s.path.with_suffix(".json").unlink(missing_ok=True)
        removed.append(s.version)
    return removed


def remove_temporaries(directory: Path) -> None:
    """Half-written files left by a crash (call only when no snapshot is running): temporaries, and
    snapshot files whose sidecar was never written (never committed)."""
    for tmp in [*directory.glob("snapshot-*.tmp"), *directory.glob("*.json.tmp"), *directory.glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)
    for data in directory.glob("snapshot-*.safetensors"):
        if not data.with_suffix(".json").exists():
            data.unlink(missing_ok=True)
