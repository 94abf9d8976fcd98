"""The parameter server's RPC handlers. Every bad input gets a status naming the problem."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import threading
import time
from typing import Callable, Iterator

import grpc

from distzo.common.durable import job_id as identity_digest
from distzo.infra.limits import MAX_DIRECTIONS
from distzo.infra.logs import kv
from distzo.infra.rpc import Admission, cancelled_event
from distzo.model.blocks import ITEMSIZE
from distzo.model.export import ExportRefused
from distzo.model.transfer import TransferError, check_export_url, is_url, push
from distzo.run.modelcard import model_card
from paramserver import metrics
from paramserver.dataplane.shm import StaleVersion
from paramserver.dataplane.wire import MASTER_DTYPE, STATE_DTYPE, checksum, encode_chunk, identity, record_from_pb, record_to_pb
from paramserver.durability.datadir import UpdateRejected, staging_dir
from paramserver.durability.journal import JournalCorrupt, JournalWriteError
from paramserver.state import ServerState
from paramserver.store import WaitCancelled
from protos import common_pb2
from protos import paramserver_pb2 as pb

log = logging.getLogger("distzo.paramserver.rpc")
SERVICE = "distzo.v1.ParameterServer"
MAX_MODEL_CARD = 64 << 10  # a card is a few KB
STATE_CHANGING = ("ApplyUpdate", "Snapshot", "Export", "Shutdown")  # served on the control port when there is one
# need the token too: FollowJournal streams every update to replicas (on the data port: replicas reach only that)
PROTECTED = (*STATE_CHANGING, "FollowJournal")
THREADS = 128  # the data port's handler threads (most workers fetch a few blocks at once)
ANONYMOUS_SLOTS = 8  # waiting/streaming calls all clients without the token may hold at once
RESERVED = 8  # threads long calls never take: short calls (status, manifest) always find one


class ParamServerService:
    def __init__(self, state: ServerState, on_shutdown: Callable[[], None], token: str | None = None,
                 threads: int = THREADS):
        self.state = state
        self.on_shutdown = on_shutdown
        self.control_port = 0
        self.ready = threading.Event()  # replicas serve fetches only once caught up
        self.admission = Admission(token, trusted=threads - ANONYMOUS_SLOTS - RESERVED, anonymous=ANONYMOUS_SLOTS)

    # ------------------------------------------------------------------ validation
    def _block(self, b: int, context: grpc.ServicerContext) -> int:
        n = len(self.state.manifest.blocks)
        if not 0 <= b < n:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown block {b}: the model has blocks 0-{n - 1}")
        if b not in self.state.owned:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"block {b} is held by another shard; this server holds blocks {self.state.first}-{self.state.end - 1}")
        return b

    def _timeout(self, context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        limit = self.state.cfg.server.fetch_timeout_s
        return limit if remaining is None else max(0.0, min(limit, remaining - 0.05))

    def _wait(self, b: int, version: int, context: grpc.ServicerContext) -> int:
        with metrics.VERSION_WAIT_SECONDS.time():
            return self._wait_inner(b, version, context)

    def _wait_inner(self, b: int, version: int, context: grpc.ServicerContext) -> int:
        if version < -1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version must be >= 0 (or -1 for the current one), got {version}")
        store = self.state.store
        try:
            return store.wait_version(b, version, self._timeout(context), cancelled_event(context, store.cond))
        except ValueError as exc:  # not a materialized version (server.update_window)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StaleVersion as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except TimeoutError as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except WaitCancelled as exc:
            context.abort(grpc.StatusCode.CANCELLED, str(exc))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ read side
    def GetManifest(self, request: pb.ManifestRequest, context: grpc.ServicerContext) -> pb.ManifestReply:
        st = self.state
        seg = st.store.segments
        reply = pb.ManifestReply(
            model_type=st.manifest.model_type,
            manifest_json=st.manifest_json,
            served_dtype=st.cfg.server.served_dtype,
            distribution=st.cfg.train.distribution,
            first_block=st.first,
            end_block=st.end,
            server_id=st.server_id,
            config_yaml=st.cfg.to_yaml(public=True),  # readable without the token: no secret, no path to one
            model_config_json=st.model.config.to_json_string(use_diff=False),
            control_port=self.control_port,
            update_window=st.store.window,
        )
        if seg is not None:
            reply.shm_versions_path = str(seg.versions_path)
            reply.shm_data_path = str(seg.data_path)
            reply.shm_nonce = seg.nonce
        for spec in st.manifest.blocks:
            reply.blocks.append(pb.BlockInfo(
                index=spec.index, name=spec.name, global_offset=spec.global_offset, numel=spec.numel,
                tensors=[pb.TensorInfo(name=t.name, shape=list(t.shape), offset=t.offset, decay=t.decay) for t in spec.tensors],
                version=st.store.version(spec.index) if spec.index in st.owned else -1,
                owned=spec.index in st.owned,
            ))
        return reply

    def FetchSlice(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.admission.slot(context, "FetchSlice"):
            yield from self._fetch_slice(request, context)

    def _fetch_slice(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        st = self.state
        b = self._block(request.block, context)
        if request.parts < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"parts (k) must be >= 1, got {request.parts}")
        if not 0 <= request.rank < request.parts:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"slice index {request.rank} is out of range for {request.parts} slices")
        served = st.cfg.server.served_dtype
        width = st.optimizer.width
        if request.dtype not in ("", served, MASTER_DTYPE) and not (width and request.dtype == STATE_DTYPE):
            shown = request.dtype if len(request.dtype) <= 32 else request.dtype[:32] + "..."
            extra = f", {STATE_DTYPE}" if width else ""
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"dtype {shown!r} is not served: this server serves {served} (and {MASTER_DTYPE}{extra} for replicas)")
        master = request.dtype == MASTER_DTYPE
        state = request.dtype == STATE_DTYPE  # the optimizer state, element-major: width fp32 values per element
        if state and b not in st.store.opt_state:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"block {b} is frozen (train.target {st.cfg.train.target}): it keeps no optimizer state")
        dtype = "float32" if master else STATE_DTYPE if state else served
        itemsize = 4 * width if state else ITEMSIZE[dtype]
        first_el, end_el = st.manifest.blocks[b].slice_range(request.rank, request.parts)
        start, end = first_el * itemsize, end_el * itemsize
        if not 0 <= request.resume_offset <= end - start:
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"resume_offset {request.resume_offset} is outside the slice's {end - start} bytes")
        started = time.perf_counter()
        whole = master or state  # the fp32 master and the optimizer state: at the newest materialized version
        if whole:
            version = st.store.version(b)
            if request.version >= 0 and request.version != version:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"block {b}'s master is at version {version}, not {request.version}; fetch again")
        else:
            version = self._wait(b, request.version, context)
        chunk = st.cfg.server.chunk_bytes
        pos = start + request.resume_offset
        while True:
            n = min(chunk, end - pos)
            with st.store.reading(b, version, master=whole):
                now = st.store.version(b) if whole else st.store.slot_version(b, version)
                if now != version:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"block {b} moved from version {version} to {now} while streaming; fetch again")
                data = memoryview((st.store.state_bytes(b) if state else st.store.bytes_of(b, master, version))[pos : pos + n])
                header = pb.ChunkHeader(block=b, version=version, dtype=dtype, slice_start=start, slice_bytes=end - start,
                                        offset=pos - start, checksum=checksum(data))
                message = encode_chunk(header, data)  # the one server-side copy, under the read lock
            st.served_bytes += n
            metrics.SERVED_BYTES.labels("grpc").inc(n)
            yield message
            pos += n
            if pos >= end or not context.is_active():
                metrics.FETCH_SECONDS.observe(time.perf_counter() - started)
                return

    def WaitVersion(self, request: pb.WaitRequest, context: grpc.ServicerContext) -> pb.WaitReply:
        b = self._block(request.block, context)
        with self.admission.slot(context, "WaitVersion"):
            version = self._wait(b, request.version, context)
        seg = self.state.store.segments
        return pb.WaitReply(version=version, shm_nonce=seg.nonce if seg is not None else 0)

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        st = self.state
        return pb.StatusReply(
            versions=[st.store.version(b) for b in st.owned],
            applied_version=st.processed_version,
            materialized_version=st.store.applied_version(),
            update_window=st.store.window,
            journaled_steps=st.journal.next_step,
            snapshot_version=st.snapshot_version,
            role=st.role,
            served_bytes=st.served_bytes,
            first_block=st.first,
            end_block=st.end,
            job_id=(st.job or {}).get("job_id") or "",
            job_identity_json=json.dumps((st.job or {}).get("identity") or {}),
        )

    def BlockDigest(self, request: pb.DigestRequest, context: grpc.ServicerContext) -> pb.DigestReply:
        b = self._block(request.block, context)
        with self.admission.slot(context, "BlockDigest"):  # hashing a block takes a while: bounded like the waits
            version, digest = self.state.store.digest(b)
        return pb.DigestReply(block=b, version=version, xxh3=digest)

    def FollowJournal(self, request: pb.FollowRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.UpdateRecord]:
        if request.from_step < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"from_step must be >= 0, got {request.from_step}")
        if request.to_step < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"to_step must be >= 0 (0: no end), got {request.to_step}")
        with self.admission.slot(context, "FollowJournal"):
            yield from self._follow(request.from_step, request.to_step, context)

    def _follow(self, step: int, to_step: int, context: grpc.ServicerContext) -> Iterator[common_pb2.UpdateRecord]:
        journal = self.state.journal
        ended = cancelled_event(context, journal.appended)
        while not ended.is_set():
            if 0 < to_step <= step:
                return
            try:
                pending = list(journal.records_from(step))
            except LookupError as exc:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
            except JournalCorrupt as exc:
                context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            for r in pending:
                if r.step == step and not 0 < to_step <= step:
                    yield record_to_pb(r)
                    step += 1
            with journal.appended:
                journal.appended.wait_for(lambda: journal.next_step > step or ended.is_set(), timeout=1.0)

    # ------------------------------------------------------------------ state-changing (token required)
    def ApplyUpdate(self, request: pb.UpdateRequest, context: grpc.ServicerContext) -> pb.UpdateReply:
        st = self.state
        if st.role != "primary":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server is a replica: updates reach it from its primary")
        if len(request.record.directions) > MAX_DIRECTIONS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{len(request.record.directions)} directions in one update; at most {MAX_DIRECTIONS}")
        if request.job_id and (len(request.job_id) > 64 or (request.job_identity_json and identity_digest(
                _loads(request.job_identity_json)) != request.job_id)):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id must be the digest of job_identity_json")
        record = record_from_pb(request.record)
        try:
            duplicate, size = st.submit(record, request.job_id, request.job_identity_json)
        except UpdateRejected as exc:
            metrics.UPDATES.labels("rejected").inc()
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ValueError as exc:
            metrics.UPDATES.labels("invalid").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad update for step {record.step}: {exc}")
        except JournalWriteError as exc:
            metrics.UPDATES.labels("unwritten").inc()
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE, exc.strerror or str(exc))
        except RuntimeError as exc:
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
        metrics.UPDATES.labels("duplicate" if duplicate else "skipped" if record.skipped else "journaled").inc()
        if duplicate:
            log.info("duplicate update acknowledged", extra=kv(step=record.step))
        return pb.UpdateReply(step=record.step, duplicate=duplicate, journal_bytes=size)

    def Snapshot(self, request: pb.SnapshotRequest, context: grpc.ServicerContext) -> pb.SnapshotReply:
        try:
            job = self.state.snapshot_now(timeout_s=self._timeout(context) or 600.0)
        except (TimeoutError, OSError) as exc:
            full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE, f"snapshot failed: {exc}")
        return pb.SnapshotReply(version=job.version, path=str(job.path), bytes=job.bytes)

    def Export(self, request: pb.ExportRequest, context: grpc.ServicerContext) -> pb.ExportReply:
        if not request.path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "export needs a directory path")
        if len(request.model_card) > MAX_MODEL_CARD:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model_card is {len(request.model_card)} characters; "
                                                            f"at most {MAX_MODEL_CARD}")
        url = request.path if is_url(request.path) else None
        if url:
            why = self._refuse_url(url)
            if why:
                context.abort(grpc.StatusCode.PERMISSION_DENIED if "export_root" in why else grpc.StatusCode.INVALID_ARGUMENT,
                              why)
        st = self.state

        def card(version: int) -> str:
            return request.model_card or model_card(st.cfg, {}, version, merged=request.merge)

        staged = staging_dir(st.data_dir) if url else None  # a URL: exported privately first, then pushed, then removed
        try:
            if staged is not None:
                path, version = st.export(staged, merge=request.merge, card=card, staged=True)
                push(path, url)
                path = url
            else:
                path, version = st.export(request.path, merge=request.merge, card=card)
        except TransferError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"export to {request.path[:200]!r}: {exc}")
        except ExportRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except PermissionError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except OSError as exc:
            code = (grpc.StatusCode.RESOURCE_EXHAUSTED if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    else grpc.StatusCode.INTERNAL)
            context.abort(code, f"export to {request.path[:200]!r} failed: {exc.strerror or exc}")
        finally:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
        return pb.ExportReply(path=path, version=version)

    def _refuse_url(self, url: str) -> str | None:
        """Why an export URL is refused, or None (``check_export_url``, with the server's export root)."""
        return check_export_url(url, self.state.cfg.server.export_root)

    def Shutdown(self, request: pb.ShutdownRequest, context: grpc.ServicerContext) -> pb.ShutdownReply:
        threading.Timer(0.1, self.on_shutdown).start()  # reply first
        return pb.ShutdownReply()

    # ------------------------------------------------------------------ registration
    def generic_handler(self) -> grpc.GenericRpcHandler:
        def uu(fn, req, resp):  # noqa: ANN001, ANN202
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "GetManifest": uu(self.GetManifest, pb.ManifestRequest, pb.ManifestReply),
            # data plane: handlers yield ready-made Chunk bytes
            "FetchSlice": grpc.unary_stream_rpc_method_handler(
                self.FetchSlice, request_deserializer=pb.FetchRequest.FromString, response_serializer=identity),
            "WaitVersion": uu(self.WaitVersion, pb.WaitRequest, pb.WaitReply),
            "ApplyUpdate": uu(self.ApplyUpdate, pb.UpdateRequest, pb.UpdateReply),
            "Snapshot": uu(self.Snapshot, pb.SnapshotRequest, pb.SnapshotReply),
            "Export": uu(self.Export, pb.ExportRequest, pb.ExportReply),
            "Shutdown": uu(self.Shutdown, pb.ShutdownRequest, pb.ShutdownReply),
            "GetStatus": uu(self.GetStatus, pb.StatusRequest, pb.StatusReply),
            "BlockDigest": uu(self.BlockDigest, pb.DigestRequest, pb.DigestReply),
            "FollowJournal": grpc.unary_stream_rpc_method_handler(
                self.FollowJournal, request_deserializer=pb.FollowRequest.FromString,
                response_serializer=common_pb2.UpdateRecord.SerializeToString),
        })


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None
