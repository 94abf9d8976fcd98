"""How a client reads a block slice from a parameter server: one interface, two transports.

Both transports implement ``read_into(spec, version, dest, timeout_s)``: fill ``dest`` with the
slice ``spec`` at exactly ``version`` and say what happened (``SliceRead``), or None when the
transport cannot serve this server from here. ``ParamServerClient.fetch_into`` tries them in
order: shared memory first (the server is on this host), then gRPC.

- ``ShmTransport`` maps the server's segments read-only and copies under the seqlock. It polls
  the mapped version table first (no RPC at all), asks the server's ``WaitVersion`` only when
  the version has not come, and maps the segments again when the server has restarted.
- ``GrpcTransport`` streams ``FetchSlice`` chunks straight into ``dest``, checks each chunk's
  xxh3, and resumes from the last good byte when a stream breaks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import grpc
import numpy as np

from distzo.infra.logs import kv
from paramserver.dataplane.fence import FenceUnavailable
from paramserver.dataplane.hostcopy import parallel_copy
from paramserver.dataplane.shm import SegmentGone, SharedView, StaleVersion
from paramserver.dataplane.wire import checksum, decode_chunk
from protos import paramserver_pb2 as pb

log = logging.getLogger("distzo.paramserver.client")
POLL_BEFORE_RPC_S = 1.0  # a shared-memory read polls the mapped version table this long before it asks the server


class FetchError(RuntimeError):
    """A fetch that could not complete; ``code`` is the gRPC status when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class StaleVersionError(FetchError):
    """The block has moved past the version asked for (the caller's step is out of date)."""


class VersionTimeout(FetchError):
    """The version asked for did not arrive in time."""


def raise_for(exc: grpc.RpcError, what: str) -> None:
    """Raise the FetchError that says what the gRPC error ``exc`` means for ``what``."""
    code = exc.code()
    msg = f"{what}: {exc.details()}"
    if code == grpc.StatusCode.FAILED_PRECONDITION and "version" in (exc.details() or ""):
        raise StaleVersionError(msg, code) from None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise VersionTimeout(msg, code) from None
    raise FetchError(msg, code) from None


@dataclass(frozen=True)
class SliceSpec:
    """Slice ``rank`` of ``parts`` of ``block`` as ``dtype`` ("" = served dtype): bytes [start, start + nbytes)."""

    block: int
    rank: int
    parts: int
    dtype: str
    start: int
    nbytes: int


@dataclass(frozen=True)
class SliceRead:
    version: int  # the version the bytes are at
    resumes: int = 0  # gRPC: broken streams resumed
    copies: int = 1  # shared memory: copies made (more than one when the server rewrote the block meanwhile)


class ServerLink(Protocol):
    """What a transport reads of its client's connection to one server (``client._Shard``): the address, the
    manifest (None until read), the stub, and ``FetchSlice`` as a stream of raw ``Chunk`` bytes."""

    address: str
    manifest: pb.ManifestReply | None
    stub: Any  # paramserver_pb2_grpc.ParameterServerStub
    fetch: Callable[..., Any]


class BlockTransport(Protocol):
    name: str

    def read_into(self, spec: SliceSpec, version: int, dest: np.ndarray, timeout_s: float) -> SliceRead | None:
        """Fill ``dest`` (uint8, ``spec.nbytes``) with the slice at ``version`` (-1: the current one)."""


class ShmTransport:
    """Shared memory of a server on this host (see the module docstring)."""

    name = "shm"

    def __init__(self, shard: ServerLink, metadata: tuple, connect_timeout_s: float):
        self.shard = shard  # its stub and manifest, read at each use (a test may swap the stub)
        self.md = metadata
        self.connect_timeout_s = connect_timeout_s
        self.view: SharedView | None = None
        self.failed = False

    def available(self) -> bool:
        """Map the server's segments if that has not been tried; False when they cannot be mapped from here."""
        if self.view is not None:
            return True
        m = self.shard.manifest
        if self.failed or m is None or not m.shm_versions_path:
            return False
        try:
            self.view = SharedView(m.shm_data_path, m.shm_versions_path, m.shm_nonce)
            return True
        except (OSError, SegmentGone, FenceUnavailable) as exc:
            self.failed = True
            log.info("shared memory unavailable, using gRPC", extra=kv(server=self.shard.address, reason=str(exc)))
            return False

    def read_into(self, spec: SliceSpec, version: int, dest: np.ndarray, timeout_s: float) -> SliceRead | None:
        return self.read_with(spec, version, lambda src: parallel_copy(dest, src), timeout_s)

    def read_with(self, spec: SliceSpec, version: int, copy: Callable[[np.ndarray], None],
                  timeout_s: float) -> SliceRead | None:
        """Hand ``copy(src)`` the mapped bytes of the slice at ``version`` (again if the server rewrote them
        meanwhile); None when the server's segments cannot be mapped again after a restart."""
        if not self.available():
            return None
        assert self.view is not None
        block = spec.block
        deadline = time.monotonic() + timeout_s
        # fast path: the mapped table shows the version, now or within a short poll (no RPC at all)
        if version >= 0 and self.view.current() and self.view.await_version(block, version, min(timeout_s / 2, POLL_BEFORE_RPC_S)):
            try:
                return SliceRead(version, copies=self.view.read_with(block, version, spec.start, spec.nbytes, copy,
                                                                     timeout_s=timeout_s))
            except StaleVersion as exc:
                raise StaleVersionError(str(exc)) from None
            except TimeoutError:
                pass  # fall back to asking the server
        try:
            reply = self.shard.stub.WaitVersion(pb.WaitRequest(block=block, version=version),
                                                timeout=max(0.05, deadline - time.monotonic()), metadata=self.md)
        except grpc.RpcError as exc:
            raise_for(exc, f"block {block} version {version}")
        if not self.view.alive(reply.shm_nonce) or not self.view.current():
            # the server restarted: its segments are new files; map them again
            self.close()
            self.shard.manifest = self.shard.stub.GetManifest(pb.ManifestRequest(), timeout=self.connect_timeout_s,
                                                              metadata=self.md)
            if not self.available():
                return None
            assert self.view is not None
        try:
            return SliceRead(reply.version, copies=self.view.read_with(block, reply.version, spec.start, spec.nbytes, copy,
                                                                       timeout_s=timeout_s))
        except StaleVersion as exc:
            raise StaleVersionError(str(exc)) from None
        except TimeoutError as exc:
            raise VersionTimeout(str(exc)) from None

    def close(self) -> None:
        if self.view is not None:
            try:
                self.view.close()
            except BufferError:  # a caller still holds a view of the mapping; it goes with the process
                pass
            self.view = None


class GrpcTransport:
    """``FetchSlice`` chunks over gRPC (see the module docstring)."""

    name = "grpc"

    def __init__(self, shard: ServerLink, metadata: tuple, max_resumes: int):
        self.shard = shard
        self.md = metadata
        self.max_resumes = max_resumes

    def read_into(self, spec: SliceSpec, version: int, dest: np.ndarray, timeout_s: float) -> SliceRead:
        block = spec.block
        deadline = time.monotonic() + timeout_s
        received = 0
        resumes = 0
        got_version = version
        while True:
            request = pb.FetchRequest(block=block, version=got_version, rank=spec.rank, parts=spec.parts, dtype=spec.dtype,
                                      resume_offset=received)
            try:
                for message in self.shard.fetch(request, timeout=max(0.01, deadline - time.monotonic()), metadata=self.md):
                    header, data = decode_chunk(message)
                    if header.offset != received or header.offset + len(data) > dest.nbytes:
                        raise FetchError(f"block {block}: chunk at byte {header.offset} does not follow byte {received}")
                    if checksum(data) != header.checksum:
                        raise FetchError(f"block {block}: chunk at byte {header.offset} fails its checksum")
                    got_version = header.version
                    dest[received : received + len(data)] = np.frombuffer(data, dtype=np.uint8)
                    received += len(data)
                if received == dest.nbytes:
                    return SliceRead(got_version, resumes=resumes)
                raise FetchError(f"block {block}: stream ended after {received} of {dest.nbytes} bytes")
            except grpc.RpcError as exc:
                code = exc.code()
                transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                     grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if not transient or resumes >= self.max_resumes or time.monotonic() >= deadline:
                    raise_for(exc, f"fetch of block {block} version {version}")
            except FetchError:
                if resumes >= self.max_resumes:
                    raise
            resumes += 1
            log.info("fetch stream broke, resuming", extra=kv(block=block, at_byte=received, attempt=resumes))
            time.sleep(min(0.05 * 2**resumes, 1.0))
