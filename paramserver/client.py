"""Client of one logical parameter server (one or more shards), used by workers and the coordinator.

``fetch_into`` fills a caller-owned buffer with a block slice at an exact version. It maps
the server's shared memory when the server is on this host (read-only; a seqlock-checked
copy), and otherwise streams chunks over gRPC, checking each chunk's xxh3 and resuming
from the last good chunk when a stream breaks. The block id routes to the shard that
holds it. State-changing calls carry the bearer token and go to every shard.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import numpy as np

from distzo.blocks import ITEMSIZE, Manifest
from distzo.logs import kv
from distzo.mezo import UpdateRecord
from distzo.rpc import Credentials, make_channel
from paramserver.hostcopy import parallel_copy
from paramserver.fence import FenceUnavailable
from paramserver.shm import SegmentGone, SharedView, StaleVersion
from paramserver.wire import MASTER_DTYPE, STATE_DTYPE, checksum, decode_chunk, identity, record_from_pb, record_to_pb
from protos import common_pb2
from protos import paramserver_pb2 as pb
from protos import paramserver_pb2_grpc as pb_grpc

log = logging.getLogger("distzo.paramserver.client")
POLL_BEFORE_RPC_S = 1.0  # a fetch polls the mapped version table this long before it asks the server


class FetchError(RuntimeError):
    """A fetch that could not complete; ``code`` is the gRPC status when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class StaleVersionError(FetchError):
    pass


class VersionTimeout(FetchError):
    pass


@dataclass
class FetchResult:
    version: int
    nbytes: int
    transport: str  # "shm" | "grpc"
    seconds: float
    resumes: int = 0
    copies: int = 1  # shared memory: copies made (more than one when the server rewrote the block meanwhile)


def _raise_for(exc: grpc.RpcError, what: str) -> None:
    code = exc.code()
    msg = f"{what}: {exc.details()}"
    if code == grpc.StatusCode.FAILED_PRECONDITION and "version" in (exc.details() or ""):
        raise StaleVersionError(msg, code) from None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise VersionTimeout(msg, code) from None
    raise FetchError(msg, code) from None


class _Shard:
    def __init__(self, address: str, creds: Credentials):
        self.address = address
        self.channel = make_channel(address, creds)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.fetch = self.channel.unary_stream(
            "/distzo.v1.ParameterServer/FetchSlice",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=identity,  # raw Chunk bytes, parsed by hand
        )
        self.manifest: pb.ManifestReply | None = None
        self.shm: SharedView | None = None
        self.shm_failed = False
        self.creds = creds
        self._control: grpc.Channel | None = None
        self._control_stub: pb_grpc.ParameterServerStub | None = None

    @property
    def control(self) -> pb_grpc.ParameterServerStub:
        """The stub for state-changing calls: the control port when the server has one."""
        port = self.manifest.control_port if self.manifest is not None else 0
        if not port:
            return self.stub
        if self._control_stub is None:
            host = self.address.rsplit(":", 1)[0]
            self._control = make_channel(f"{host}:{port}", self.creds)
            self._control_stub = pb_grpc.ParameterServerStub(self._control)
        return self._control_stub

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
        if self.shm is not None:
            try:
                self.shm.close()
            except BufferError:
                pass
        self.channel.close()


class ParamServerClient:
    def __init__(self, addresses: str | list[str], creds: Credentials | None = None, transport: str = "auto",
                 connect_timeout_s: float = 30.0, max_resumes: int = 5):
        if transport not in ("auto", "grpc", "shm"):
            raise ValueError(f"transport must be auto, grpc or shm, got {transport!r}")
        self.creds = creds or Credentials()
        self.transport = transport
        self.max_resumes = max_resumes
        self.shards = [_Shard(a, self.creds) for a in ([addresses] if isinstance(addresses, str) else addresses)]
        self._route: dict[int, _Shard] = {}
        self._connect_timeout = connect_timeout_s
        self._manifest: Manifest | None = None
        self._md = self.creds.call_metadata()  # the token on every call: token holders get the server's data-plane slots

    # ------------------------------------------------------------------ discovery
    def connect(self) -> "ParamServerClient":
        if self._manifest is not None:
            return self
        for shard in self.shards:
            try:
                shard.manifest = shard.stub.GetManifest(pb.ManifestRequest(), timeout=self._connect_timeout, wait_for_ready=True,
                                                         metadata=self._md)
            except grpc.RpcError as exc:
                raise FetchError(f"parameter server {shard.address} unreachable: {exc.details()}", exc.code()) from None
            for b in range(shard.manifest.first_block, shard.manifest.end_block):
                if b in self._route:
                    raise FetchError(f"blocks overlap: {b} is held by {self._route[b].address} and {shard.address}")
                self._route[b] = shard
        first = self.shards[0].manifest
        assert first is not None
        self._manifest = Manifest.from_json(first.manifest_json)
        missing = [b for b in range(len(self._manifest.blocks)) if b not in self._route]
        if missing:
            raise FetchError(f"no shard holds blocks {missing}")
        return self

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self.connect()
        assert self._manifest is not None
        return self._manifest

    @property
    def served_dtype(self) -> str:
        self.manifest  # noqa: B018 - connects
        return self.shards[0].manifest.served_dtype  # type: ignore[union-attr]

    @property
    def config_yaml(self) -> str:
        """The job config the server was started with (YAML, the token redacted)."""
        self.manifest  # noqa: B018
        return self.shards[0].manifest.config_yaml  # type: ignore[union-attr]

    def slice_bytes(self, block: int, rank: int = 0, parts: int = 1, dtype: str = "") -> tuple[int, int]:
        """Byte range [start, end) of a slice within the block at the given dtype."""
        itemsize = ITEMSIZE["float32" if dtype == MASTER_DTYPE else (dtype or self.served_dtype)]
        a, b = self.manifest.blocks[block].slice_range(rank, parts)
        return a * itemsize, b * itemsize

    def _shard(self, block: int) -> _Shard:
        self.manifest  # noqa: B018
        shard = self._route.get(block)
        if shard is None:
            raise FetchError(f"unknown block {block}: the model has blocks 0-{len(self.manifest.blocks) - 1}", grpc.StatusCode.NOT_FOUND)
        return shard

    # ------------------------------------------------------------------ data plane
    def fetch_into(self, block: int, version: int, dest: np.ndarray, rank: int = 0, parts: int = 1,
                   dtype: str = "", timeout_s: float = 120.0) -> FetchResult:
        """Fill ``dest`` (uint8, exactly the slice's size) with slice ``rank``/``parts`` of a block at ``version``.

        Shared memory: a seqlock-checked copy split over ``hostcopy``'s threads; gRPC: chunks written
        straight into ``dest`` (a pinned buffer on GPU hosts), each checked against its xxh3."""
        shard = self._shard(block)
        start, end = self.slice_bytes(block, rank, parts, dtype)
        if dest.dtype != np.uint8 or dest.shape != (end - start,):
            raise ValueError(f"destination must be uint8 of {end - start} bytes for block {block} slice {rank}/{parts}")
        t0 = time.perf_counter()
        if self.transport != "grpc" and dtype != MASTER_DTYPE and self._shm(shard):
            got = self._fetch_shm(shard, block, version, start, dest.nbytes, lambda src: parallel_copy(dest, src), timeout_s)
            if got is not None:
                return FetchResult(got[0], dest.nbytes, "shm", time.perf_counter() - t0, copies=got[1])
        if self.transport == "shm":
            raise FetchError(f"shared memory of {shard.address} is not reachable from this host")
        got_version, resumes = self._fetch_grpc(shard, block, version, rank, parts, dtype, dest, timeout_s)
        return FetchResult(got_version, dest.nbytes, "grpc", time.perf_counter() - t0, resumes)

    def fetch_with(self, block: int, version: int, copy: Callable[[np.ndarray], None], rank: int = 0, parts: int = 1,
                   timeout_s: float = 120.0) -> FetchResult | None:
        """Shared memory only: hand ``copy(src)`` the mapped read-only bytes of the slice at ``version``.

        ``copy`` must have completed when it returns (a device copy: synchronized); it runs again when
        the server rewrote the block meanwhile (seqlock). This is the GPU worker's path with no host
        copy: it DMAs from the registered mapping. None when this host cannot map the server's
        segments (use ``fetch_into``)."""
        shard = self._shard(block)
        start, end = self.slice_bytes(block, rank, parts)
        if self.transport == "grpc" or not self._shm(shard):
            return None
        t0 = time.perf_counter()
        got = self._fetch_shm(shard, block, version, start, end - start, copy, timeout_s)
        if got is None:
            return None
        return FetchResult(got[0], end - start, "shm", time.perf_counter() - t0, copies=got[1])

    def shared_view(self, block: int) -> SharedView | None:
        """The read-only mapping that holds ``block`` (None when not mapped from this host)."""
        shard = self._shard(block)
        return shard.shm if self.transport != "grpc" and self._shm(shard) else None

    def _shm(self, shard: _Shard) -> bool:
        if shard.shm is not None:
            return True
        m = shard.manifest
        if shard.shm_failed or m is None or not m.shm_versions_path:
            return False
        try:
            shard.shm = SharedView(m.shm_data_path, m.shm_versions_path, m.shm_nonce)
            return True
        except (OSError, SegmentGone, FenceUnavailable) as exc:
            shard.shm_failed = True
            log.info("shared memory unavailable, using gRPC", extra=kv(server=shard.address, reason=str(exc)))
            return False

    def _fetch_shm(self, shard: _Shard, block: int, version: int, start: int, nbytes: int,
                   copy: Callable[[np.ndarray], None], timeout_s: float) -> tuple[int, int] | None:
        """(version, copies made), or None when the server's segments cannot be mapped again after a restart."""
        assert shard.shm is not None
        deadline = time.monotonic() + timeout_s
        # fast path: the mapped table shows the version, now or within a short poll (no RPC at all)
        if version >= 0 and shard.shm.current() and shard.shm.await_version(block, version, min(timeout_s / 2, POLL_BEFORE_RPC_S)):
            try:
                return version, shard.shm.read_with(block, version, start, nbytes, copy, timeout_s=timeout_s)
            except StaleVersion as exc:
                raise StaleVersionError(str(exc)) from None
            except TimeoutError:
                pass  # fall back to asking the server
        try:
            reply = shard.stub.WaitVersion(pb.WaitRequest(block=block, version=version),
                                           timeout=max(0.05, deadline - time.monotonic()), metadata=self._md)
        except grpc.RpcError as exc:
            _raise_for(exc, f"block {block} version {version}")
        if not shard.shm.alive(reply.shm_nonce) or not shard.shm.current():
            # the server restarted: its segments are new files; map them again
            shard.shm.close()
            shard.shm = None
            shard.manifest = shard.stub.GetManifest(pb.ManifestRequest(), timeout=self._connect_timeout, metadata=self._md)
            if not self._shm(shard):
                return None
            assert shard.shm is not None
        try:
            return reply.version, shard.shm.read_with(block, reply.version, start, nbytes, copy, timeout_s=timeout_s)
        except StaleVersion as exc:
            raise StaleVersionError(str(exc)) from None
        except TimeoutError as exc:
            raise VersionTimeout(str(exc)) from None

    def _fetch_grpc(self, shard: _Shard, block: int, version: int, rank: int, parts: int, dtype: str,
                    dest: np.ndarray, timeout_s: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        received = 0
        resumes = 0
        got_version = version
        while True:
            request = pb.FetchRequest(block=block, version=got_version, rank=rank, parts=parts, dtype=dtype, resume_offset=received)
            try:
                for message in shard.fetch(request, timeout=max(0.01, deadline - time.monotonic()), metadata=self._md):
                    header, data = decode_chunk(message)
                    if header.offset != received or header.offset + len(data) > dest.nbytes:
                        raise FetchError(f"block {block}: chunk at byte {header.offset} does not follow byte {received}")
                    if checksum(data) != header.checksum:
                        raise FetchError(f"block {block}: chunk at byte {header.offset} fails its checksum")
                    got_version = header.version
                    dest[received : received + len(data)] = np.frombuffer(data, dtype=np.uint8)
                    received += len(data)
                if received == dest.nbytes:
                    return got_version, resumes
                raise FetchError(f"block {block}: stream ended after {received} of {dest.nbytes} bytes")
            except grpc.RpcError as exc:
                code = exc.code()
                transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                     grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)
                if not transient or resumes >= self.max_resumes or time.monotonic() >= deadline:
                    _raise_for(exc, f"fetch of block {block} version {version}")
            except FetchError:
                if resumes >= self.max_resumes:
                    raise
            resumes += 1
            log.info("fetch stream broke, resuming", extra=kv(block=block, at_byte=received, attempt=resumes))
            time.sleep(min(0.05 * 2**resumes, 1.0))

    def fetch_block(self, block: int, version: int, dtype: str = "", timeout_s: float = 120.0) -> tuple[np.ndarray, FetchResult]:
        """A whole block in a new buffer (convenience for tests, replicas, tools)."""
        start, end = self.slice_bytes(block, 0, 1, dtype)
        buf = np.empty(end - start, dtype=np.uint8)
        return buf, self.fetch_into(block, version, buf, dtype=dtype, timeout_s=timeout_s)

    def fetch_state(self, block: int, version: int, width: int, timeout_s: float = 120.0) -> tuple[np.ndarray, int]:
        """The optimizer state of a block at ``version`` (gRPC; replicas): (float32 [numel, width], version)."""
        shard = self._shard(block)
        numel = self.manifest.blocks[block].numel
        dest = np.empty(numel * width * 4, dtype=np.uint8)
        got, _ = self._fetch_grpc(shard, block, version, 0, 1, STATE_DTYPE, dest, timeout_s)
        return dest.view(np.float32).reshape(numel, width), got

    # ------------------------------------------------------------------ control plane
    def apply_update(self, record: UpdateRecord, timeout_s: float = 60.0, job_id: str = "",
                     job_identity_json: str = "") -> list[pb.UpdateReply]:
        """Journal an update on every shard; ``job_id``: the sender's job (the server refuses another job's)."""
        request = pb.UpdateRequest(record=record_to_pb(record), job_id=job_id, job_identity_json=job_identity_json)
        return [s.control.ApplyUpdate(request, timeout=timeout_s, metadata=self.creds.call_metadata()) for s in self.shards]

    def snapshot(self, timeout_s: float = 600.0) -> list[pb.SnapshotReply]:
        return [s.control.Snapshot(pb.SnapshotRequest(), timeout=timeout_s, metadata=self.creds.call_metadata()) for s in self.shards]

    def export(self, path: str, timeout_s: float = 600.0, model_card: str = "") -> pb.ExportReply:
        """Export to ``path`` on the server's host; ``model_card``: the README.md written there (default: the server's)."""
        if len(self.shards) > 1:
            raise FetchError("export needs the whole model on one server; export each shard's range with a tool instead")
        return self.shards[0].control.Export(pb.ExportRequest(path=path, model_card=model_card), timeout=timeout_s,
                                             metadata=self.creds.call_metadata())

    def shutdown(self, timeout_s: float = 10.0) -> None:
        for s in self.shards:
            s.control.Shutdown(pb.ShutdownRequest(), timeout=timeout_s, metadata=self.creds.call_metadata())

    def status(self, timeout_s: float = 10.0) -> list[pb.StatusReply]:
        return [s.stub.GetStatus(pb.StatusRequest(), timeout=timeout_s, metadata=self._md) for s in self.shards]

    def applied_version(self, timeout_s: float = 10.0) -> int:
        return min(s.applied_version for s in self.status(timeout_s))

    def journaled_steps(self, timeout_s: float = 10.0) -> int:
        return min(s.journaled_steps for s in self.status(timeout_s))

    def digest(self, block: int, timeout_s: float = 10.0) -> pb.DigestReply:
        return self._shard(block).stub.BlockDigest(pb.DigestRequest(block=block), timeout=timeout_s, metadata=self._md)

    def follow(self, from_step: int, timeout_s: float | None = None) -> Iterator[UpdateRecord]:
        """Journal records from ``from_step`` on, live (single-shard servers)."""
        for m in self.shards[0].stub.FollowJournal(pb.FollowRequest(from_step=from_step), timeout=timeout_s, metadata=self._md):
            yield record_from_pb(m)

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> "ParamServerClient":
        return self.connect()  # idempotent

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ParamServerClient", "FetchError", "StaleVersionError", "VersionTimeout", "FetchResult", "common_pb2"]
