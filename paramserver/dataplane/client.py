"""Client of one logical parameter server (one or more shards), used by workers and the coordinator.

``fetch_into`` fills a caller-owned buffer with a block slice at an exact version, through one
of the two transports of ``paramserver/dataplane/transport.py``: the server's shared memory when it is on
this host, else gRPC. The block id routes to the shard that holds it. State-changing calls
carry the bearer token and go to every shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import numpy as np

from distzo.infra.rpc import Credentials, make_channel
from distzo.model.blocks import ITEMSIZE, Manifest
from distzo.zo.record import UpdateRecord
from paramserver.dataplane.shm import SharedView
from paramserver.dataplane.transport import (BlockTransport, FetchError, GrpcTransport, ShmTransport, SliceSpec, StaleVersionError,
                                   VersionTimeout)
from paramserver.dataplane.wire import MASTER_DTYPE, STATE_DTYPE, identity, record_from_pb, record_to_pb
from protos import common_pb2
from protos import paramserver_pb2 as pb
from protos import paramserver_pb2_grpc as pb_grpc



@dataclass
class FetchResult:
    version: int
    nbytes: int
    transport: str  # "shm" | "grpc"
    seconds: float
    resumes: int = 0
    copies: int = 1  # shared memory: copies made (more than one when the server rewrote the block meanwhile)


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
        self.shm: ShmTransport  # set by ParamServerClient
        self.grpc: GrpcTransport
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
        self.shm.close()
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
        for shard in self.shards:  # the two ways to read a block slice (paramserver/dataplane/transport.py)
            shard.shm = ShmTransport(shard, self._md, connect_timeout_s)
            shard.grpc = GrpcTransport(shard, self._md, max_resumes)

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
    def _spec(self, block: int, rank: int, parts: int, dtype: str) -> SliceSpec:
        start, end = self.slice_bytes(block, rank, parts, dtype)
        return SliceSpec(block, rank, parts, dtype, start, end - start)

    def _transports(self, shard: _Shard, dtype: str) -> Iterator[BlockTransport]:
        """The transports to try, in order: shared memory when this host maps the server's (served copy only)."""
        if self.transport != "grpc" and dtype != MASTER_DTYPE and shard.shm.available():
            yield shard.shm
        if self.transport != "shm":
            yield shard.grpc

    def fetch_into(self, block: int, version: int, dest: np.ndarray, rank: int = 0, parts: int = 1,
                   dtype: str = "", timeout_s: float = 120.0) -> FetchResult:
        """Fill ``dest`` (uint8, exactly the slice's size) with slice ``rank``/``parts`` of a block at ``version``.

        Shared memory: a seqlock-checked copy split over ``hostcopy``'s threads; gRPC: chunks written
        straight into ``dest`` (a pinned buffer on GPU hosts), each checked against its xxh3."""
        shard = self._shard(block)
        spec = self._spec(block, rank, parts, dtype)
        if dest.dtype != np.uint8 or dest.shape != (spec.nbytes,):
            raise ValueError(f"destination must be uint8 of {spec.nbytes} bytes for block {block} slice {rank}/{parts}")
        t0 = time.perf_counter()
        for transport in self._transports(shard, dtype):
            got = transport.read_into(spec, version, dest, timeout_s)
            if got is not None:
                return FetchResult(got.version, dest.nbytes, transport.name, time.perf_counter() - t0, got.resumes, got.copies)
        raise FetchError(f"shared memory of {shard.address} is not reachable from this host")

    def fetch_with(self, block: int, version: int, copy: Callable[[np.ndarray], None], rank: int = 0, parts: int = 1,
                   timeout_s: float = 120.0) -> FetchResult | None:
        """Shared memory only: hand ``copy(src)`` the mapped read-only bytes of the slice at ``version``.

        ``copy`` must have completed when it returns (a device copy: synchronized); it runs again when
        the server rewrote the block meanwhile (seqlock). This is the GPU worker's path with no host
        copy: it DMAs from the registered mapping. None when this host cannot map the server's
        segments (use ``fetch_into``)."""
        shard = self._shard(block)
        if self.transport == "grpc":
            return None
        spec = self._spec(block, rank, parts, "")
        t0 = time.perf_counter()
        got = shard.shm.read_with(spec, version, copy, timeout_s)
        if got is None:
            return None
        return FetchResult(got.version, spec.nbytes, "shm", time.perf_counter() - t0, copies=got.copies)

    def shared_view(self, block: int) -> SharedView | None:
        """The read-only mapping that holds ``block`` (None when not mapped from this host)."""
        shard = self._shard(block)
        return shard.shm.view if self.transport != "grpc" and shard.shm.available() else None

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
        got = shard.grpc.read_into(SliceSpec(block, 0, 1, STATE_DTYPE, 0, dest.nbytes), version, dest, timeout_s)
        return dest.view(np.float32).reshape(numel, width), got.version

    # ------------------------------------------------------------------ control plane
    def apply_update(self, record: UpdateRecord, timeout_s: float = 60.0, job_id: str = "",
                     job_identity_json: str = "") -> list[pb.UpdateReply]:
        """Journal an update on every shard; ``job_id``: the sender's job (the server refuses another job's)."""
        request = pb.UpdateRequest(record=record_to_pb(record), job_id=job_id, job_identity_json=job_identity_json)
        return [s.control.ApplyUpdate(request, timeout=timeout_s, metadata=self.creds.call_metadata()) for s in self.shards]

    def snapshot(self, timeout_s: float = 600.0) -> list[pb.SnapshotReply]:
        return [s.control.Snapshot(pb.SnapshotRequest(), timeout=timeout_s, metadata=self.creds.call_metadata()) for s in self.shards]

    def export(self, path: str, timeout_s: float = 600.0, model_card: str = "", merge: bool = False) -> pb.ExportReply:
        """Export to ``path`` on the server's host; ``model_card``: the README.md written there (default: the server's);
        ``merge``: a LoRA run's merged plain model instead of its adapter directory."""
        if len(self.shards) > 1:
            raise FetchError("export needs the whole model on one server; export each shard's range with a tool instead")
        return self.shards[0].control.Export(pb.ExportRequest(path=path, model_card=model_card, merge=merge), timeout=timeout_s,
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

    def follow(self, from_step: int, timeout_s: float | None = None, to_step: int = 0) -> Iterator[UpdateRecord]:
        """Journal records from ``from_step`` on, live (single-shard servers); ``to_step`` > 0: up to step
        ``to_step - 1`` only (the stream then ends)."""
        request = pb.FollowRequest(from_step=from_step, to_step=to_step)
        for m in self.shards[0].stub.FollowJournal(request, timeout=timeout_s, metadata=self._md):
            yield record_from_pb(m)

    def records(self, from_step: int, to_step: int, timeout_s: float = 30.0) -> list[UpdateRecord]:
        """The journaled records of steps [from_step, to_step) (a coordinator resuming mid-window needs the
        records after the base its workers read). Raises FetchError when the journal no longer has them."""
        if to_step <= from_step:
            return []
        try:
            got = list(self.follow(from_step, timeout_s=timeout_s, to_step=to_step))
        except grpc.RpcError as exc:
            raise FetchError(f"journal records {from_step}..{to_step - 1}: {exc.details()}", exc.code()) from None
        if [r.step for r in got] != list(range(from_step, to_step)):
            raise FetchError(f"journal records {from_step}..{to_step - 1}: got steps {[r.step for r in got][:8]}")
        return got

    @property
    def update_window(self) -> int:
        """server.update_window of the servers (1 for a server that predates windows)."""
        self.manifest  # noqa: B018 - connects
        return self.shards[0].manifest.update_window or 1  # type: ignore[union-attr]

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> "ParamServerClient":
        return self.connect()  # idempotent

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ParamServerClient", "FetchError", "StaleVersionError", "VersionTimeout", "FetchResult", "common_pb2"]
