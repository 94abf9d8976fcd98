"""Security: what a client without the token can and cannot do, secrets never echoed, bounded inputs, TLS."""

from __future__ import annotations

import concurrent.futures as cf
import json

import grpc
import numpy as np
import pytest

from distzo.common.config import JobConfig
from distzo.infra.rpc import Credentials
from distzo.zo.record import Direction, UpdateRecord
from paramserver.dataplane.client import FetchError, ParamServerClient
from paramserver.service import ANONYMOUS_SLOTS
from protos import coordinator_pb2 as cpb
from protos import coordinator_pb2_grpc as cpb_grpc
from protos import paramserver_pb2 as pb
from protos import paramserver_pb2_grpc as pb_grpc

from clusterhelpers import wait_until
from pshelpers import Servers, make_tls, server_config
from test_paramserver import records

TOKEN = "s3cret-token-value-for-tests"


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def token_server(servers, cache_dir, tmp_path, **sections):
    cfg = server_config(cache_dir, security={"token": TOKEN}, **sections)
    return servers.start(cfg, tmp_path / "d")


# ----------------------------------------------------------------------------- availability
def test_clients_without_the_token_cannot_hold_the_servers_threads(servers, cache_dir, tmp_path):
    srv = token_server(servers, cache_dir, tmp_path)
    anon = grpc.insecure_channel(srv.address)
    stub = pb_grpc.ParameterServerStub(anon)
    pool = cf.ThreadPoolExecutor(max_workers=80)
    try:
        # 70 waits for a version that never comes, and 70 journal streams, all without the token
        waits = [stub.WaitVersion.future(pb.WaitRequest(block=0, version=10_000), timeout=600) for _ in range(70)]
        follows = [pool.submit(lambda: list(stub.FollowJournal(pb.FollowRequest(from_step=0), timeout=600))) for _ in range(70)]
        for f in follows:
            with pytest.raises(grpc.RpcError) as err:
                f.result(timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refused = 0
        for w in waits:
            try:
                w.result(timeout=0.01)
            except grpc.FutureTimeoutError:
                continue  # holding a slot
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "without the token" in exc.details()
                refused += 1
        wait_until(lambda: sum(w.done() for w in waits) >= 70 - ANONYMOUS_SLOTS, what="the excess waits refused")
        assert sum(not w.done() for w in waits) == ANONYMOUS_SLOTS  # at most that many held
        # the data plane of token holders is untouched: status, fetches, updates, waits
        good = ParamServerClient(srv.address, Credentials(token=TOKEN), transport="grpc").connect()
        assert good.status(timeout_s=5)[0].journaled_steps == 0
        good.apply_update(records(1)[0])
        buf, res = good.fetch_block(1, 1, timeout_s=30)
        assert res.version == 1 and buf.size > 0
        assert good.shards[0].stub.WaitVersion(pb.WaitRequest(block=0, version=1), timeout=10,
                                               metadata=good.creds.call_metadata()).version == 1
        good.close()
        # waits honour cancellation: cancelled calls give their slots back at once
        for w in waits:
            w.cancel()

        def admitted() -> bool:
            call = stub.WaitVersion.future(pb.WaitRequest(block=0, version=10_000), timeout=600)
            try:
                call.result(timeout=0.5)
            except grpc.FutureTimeoutError:
                call.cancel()
                return True  # it was waiting, not refused
            except grpc.RpcError:
                return False
            return False

        wait_until(admitted, timeout=30, what="an anonymous wait admitted after the cancellations")
    finally:
        for w in waits:
            w.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        anon.close()


def test_following_the_journal_needs_the_token(servers, cache_dir, tmp_path):
    srv = token_server(servers, cache_dir, tmp_path)
    with grpc.insecure_channel(srv.address) as ch, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.ParameterServerStub(ch).FollowJournal(pb.FollowRequest(from_step=0), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    c = servers.client(srv.address, creds=Credentials(token=TOKEN))
    c.apply_update(records(1)[0])
    assert next(c.follow(0, timeout_s=10)).step == 0


# ----------------------------------------------------------------------------- secrets
def test_the_token_is_never_echoed(servers, cache_dir, tmp_path, capfd):
    srv = token_server(servers, cache_dir, tmp_path)
    with grpc.insecure_channel(srv.address) as ch:
        reply = pb_grpc.ParameterServerStub(ch).GetManifest(pb.ManifestRequest(), timeout=10)
        assert TOKEN not in reply.SerializeToString().decode("latin-1")
        assert JobConfig.from_dict(__import__("yaml").safe_load(reply.config_yaml)).security.token is None
        status = pb_grpc.ParameterServerStub(ch).GetStatus(pb.StatusRequest(), timeout=10)
        assert TOKEN not in status.SerializeToString().decode("latin-1")
    from prometheus_client import REGISTRY, generate_latest

    assert TOKEN.encode() not in generate_latest(REGISTRY)
    # zoctl config --show and a validation error about the token
    import subprocess
    import sys

    f = tmp_path / "job.yaml"
    f.write_text(f"security:\n  token: {TOKEN}\n")
    shown = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "config", str(f), "--show"], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and TOKEN not in shown.stdout + shown.stderr and "token: null" in shown.stdout
    assert "security.token is set" in shown.stdout
    f.write_text(f"security:\n  token: [{TOKEN}]\n")
    bad = subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", "config", str(f)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "security.token" in bad.stderr and TOKEN not in bad.stderr
    out, err = capfd.readouterr()
    assert TOKEN not in out + err


def test_a_welcome_carries_no_secret(cache_dir):
    from conftest import small_config
    from coordinator.service import CoordinatorService

    cfg = small_config(cache_dir, security={"token": TOKEN})
    svc = CoordinatorService(["127.0.0.1:1"], Credentials(), on_shutdown=lambda: None)
    msg = svc._welcome(cfg, "w")
    assert TOKEN not in msg.job_config_yaml
    assert JobConfig.from_dict(__import__("yaml").safe_load(msg.job_config_yaml)).train == cfg.train  # the rest is there


def test_no_unauthenticated_reply_carries_a_secret_or_a_path_to_one(servers, cache_dir, tmp_path):
    """Every RPC of the parameter server and the coordinator, called without the token: neither a reply nor
    an error names the token, the token file, the TLS material or the data directory (kind 8)."""
    from coordinator.server import CoordinatorServer
    from paramserver.dataplane.wire import record_to_pb
    from protos import paramserver_pb2 as pspb

    private = tmp_path / "private-place"
    private.mkdir()
    tls = make_tls(private)
    (private / "token").write_text(TOKEN + "\n")
    sec = {"token_file": str(private / "token"), "tls_cert": str(tls["server"]), "tls_key": str(tls["server_key"]),
           "tls_ca": str(tls["ca"])}
    cfg = server_config(cache_dir, security=sec, server={"data_dir": str(private / "data")})
    srv = servers.start(cfg, private / "data", listen="localhost:0")
    creds = Credentials.from_config(cfg.security)
    coord = CoordinatorServer([f"localhost:{srv.port}"], creds, listen="localhost:0").start(cfg)  # waits for workers
    seen: list[str] = []

    def call(fn, request) -> None:  # noqa: ANN001
        try:
            reply = fn(request, timeout=20)
            if not hasattr(reply, "SerializeToString"):  # a stream: its first message, or its error
                reply = next(iter(reply))
            seen.append(reply.SerializeToString().decode("latin-1"))
        except grpc.RpcError as exc:
            seen.append(f"{exc.code().name}: {exc.details()}")
        except StopIteration:
            pass

    try:
        wait_until(lambda: coord.service.job.state == "waiting_for_workers", what="the job started")
        ca = grpc.ssl_channel_credentials(root_certificates=tls["ca"].read_bytes())
        with grpc.secure_channel(f"localhost:{srv.port}", ca) as ch:
            stub = pb_grpc.ParameterServerStub(ch)
            for name, request in (("GetManifest", pspb.ManifestRequest()), ("GetStatus", pspb.StatusRequest()),
                                  ("WaitVersion", pspb.WaitRequest(block=0, version=0)),
                                  ("BlockDigest", pspb.DigestRequest(block=0)),
                                  ("ApplyUpdate", pspb.UpdateRequest(record=record_to_pb(records(1)[0]))),
                                  ("Snapshot", pspb.SnapshotRequest()), ("Export", pspb.ExportRequest(path=str(private / "x"))),
                                  ("Shutdown", pspb.ShutdownRequest())):
                call(getattr(stub, name), request)
            call(stub.FetchSlice, pspb.FetchRequest(block=0, version=0, parts=1))
            call(stub.FollowJournal, pspb.FollowRequest(from_step=0))
        with grpc.secure_channel(coord.address, ca) as ch:
            cstub = cpb_grpc.CoordinatorStub(ch)
            call(cstub.GetStatus, cpb.StatusQuery())
            for name in ("Pause", "Resume", "Snapshot", "Eval", "Stop", "Shutdown"):
                call(getattr(cstub, name), cpb.ControlRequest())
            call(cstub.Export, cpb.ExportJobRequest(path=str(private / "y")))
    finally:
        coord.stop(grace=0.2)
    assert len(seen) == 18 and any("tiny-opt" in text for text in seen)  # the replies came, with the public config
    for text in seen:
        assert TOKEN not in text and str(private) not in text, text[:3000]
    with ParamServerClient(f"localhost:{srv.port}", Credentials(ca=tls["ca"].read_bytes())).connect() as c:
        public = JobConfig.from_yaml_text(c.config_yaml)
    assert public.security == type(cfg.security)() and public.server.data_dir is None and public.train == cfg.train


# ----------------------------------------------------------------------------- absurd updates
def test_updates_with_a_non_finite_or_absurd_step_are_refused_before_journaling(servers, cache_dir, tmp_path):
    srv = token_server(servers, cache_dir, tmp_path)
    c = servers.client(srv.address, creds=Credentials(token=TOKEN))
    before = [c.digest(b).xxh3 for b in range(6)]
    for bad, needle in (
        (UpdateRecord(0, (Direction(1, 1e30),), 1e30, 0.0), "server.max_update_step"),
        (UpdateRecord(0, (Direction(1, 1e3),), 1e-2, 0.0), "would move weights by 10"),
        (UpdateRecord(0, (Direction(1, 1e300), Direction(2, 1e300)), 1e10, 0.0), "server.max_update_step"),
        (UpdateRecord(0, (Direction(1, 0.1),), 1e-3, 1e3), "lr x weight_decay is 1"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            c.apply_update(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details(), err.value.details()
    assert c.status()[0].journaled_steps == 0 and not list(srv.state.journal.read_all(repair=False))
    assert [c.digest(b).xxh3 for b in range(6)] == before
    c.apply_update(UpdateRecord(0, (Direction(1, 500.0),), 1e-3, 0.0))  # a large but real step (0.5) is fine
    assert c.status()[0].journaled_steps == 1
    srv.state.drain()
    assert all(np.isfinite(srv.state.store.master[b]).all() for b in srv.state.owned)


# ----------------------------------------------------------------------------- bounded inputs
def _oversized_requests(service, limits_module):
    """(method, request, field path) triples: each request has one string, bytes or repeated field (at any
    depth, inside repeated messages too) one over its bound."""
    from google.protobuf import message_factory
    from google.protobuf.descriptor import FieldDescriptor

    texts = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)

    def paths(desc, depth=0):  # lists of (field descriptor, is the last step) to walk
        for fd in desc.fields:
            if fd.is_repeated or fd.type in texts:
                yield [fd]
            if fd.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
                for rest in paths(fd.message_type, depth + 1):
                    yield [fd, *rest]

    def build(cls, path):
        req = cls()
        msg = req
        for fd in path[:-1]:
            msg = getattr(msg, fd.name).add() if fd.is_repeated else getattr(msg, fd.name)
        fd, limit = path[-1], limits_module._limit(path[-1])
        field = getattr(msg, fd.name) if fd.is_repeated else None
        if fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE:
            for _ in range(limit + 1):
                field.add()
        elif fd.is_repeated:
            field.extend(["x" if fd.type == FieldDescriptor.TYPE_STRING else b"x" if fd.type in texts else 1] * (limit + 1))
        else:
            setattr(msg, fd.name, "x" * (limit + 1) if fd.type == FieldDescriptor.TYPE_STRING else b"x" * (limit + 1))
        return req

    out = []
    for method in service.methods:
        cls = message_factory.GetMessageClass(method.input_type)
        for path in paths(method.input_type):
            out.append((method, build(cls, path), ".".join(fd.name for fd in path)))
    return out


def _call(channel, service_name, method, request, metadata):
    path = f"/{service_name}/{method.name}"
    ser, des = type(request).SerializeToString, lambda b: b
    if method.client_streaming and method.server_streaming:
        return list(channel.stream_stream(path, ser, des)(iter([request]), timeout=30, metadata=metadata))
    if method.server_streaming:
        return list(channel.unary_stream(path, ser, des)(request, timeout=30, metadata=metadata))
    return channel.unary_unary(path, ser, des)(request, timeout=30, metadata=metadata)


def test_every_string_and_repeated_field_of_every_rpc_is_bounded(servers, cache_dir, tmp_path):
    from coordinator.server import CoordinatorServer
    from distzo.infra import limits
    from protos import coordinator_pb2, paramserver_pb2

    srv = token_server(servers, cache_dir, tmp_path)
    coord = CoordinatorServer([srv.address], Credentials(token=TOKEN)).start()
    md = [("authorization", f"Bearer {TOKEN}")]
    checked = set()
    try:
        for server, module in ((srv, paramserver_pb2), (coord, coordinator_pb2)):
            service = next(iter(module.DESCRIPTOR.services_by_name.values()))
            with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
                for method, request, field in _oversized_requests(service, limits):
                    with pytest.raises(grpc.RpcError) as err:
                        _call(ch, service.full_name, method, request, md)
                    code, details = err.value.code(), err.value.details() or ""
                    if method.client_streaming:  # a session is ended: the message never reaches the handler
                        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.CANCELLED), (method.name, field, code)
                    else:
                        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                            method.name, field, code, details[:200])
                    assert len(details) < 400, (method.name, field, len(details))  # never grows with the input
                    checked.add((method.name, field))
        assert len(checked) >= 19 and {("FetchSlice", "dtype"), ("ApplyUpdate", "record.directions"), ("Export", "path"),
                                       ("StartJob", "config_yaml"), ("Session", "hello.worker_id"),
                                       ("Session", "result.results.scores")} <= checked
        assert coord.service.job is None and srv.state.journal.next_step == 0  # nothing started or journaled
    finally:
        coord.stop(grace=0.2)


def test_a_huge_model_source_is_refused_with_a_short_message(servers, cache_dir, tmp_path):
    from coordinator.server import CoordinatorServer

    srv = token_server(servers, cache_dir, tmp_path)
    coord = CoordinatorServer([srv.address], Credentials(token=TOKEN)).start()
    md = [("authorization", f"Bearer {TOKEN}")]
    try:
        with grpc.insecure_channel(coord.address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = cpb_grpc.CoordinatorStub(ch)
            details = []
            for n in (5000, 100_000, 5 << 20):
                cfg = JobConfig().model_dump()
                cfg["model"]["source"] = "m" * n
                with pytest.raises(grpc.RpcError) as err:
                    stub.StartJob(cpb.StartJobRequest(config_yaml=json.dumps(cfg)), timeout=30, metadata=md)
                assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
                details.append(err.value.details())
            assert "model.source" in details[0] and all(len(d) < 400 for d in details), details
            st = stub.GetStatus(cpb.StatusQuery(), timeout=10)
            assert st.state == "idle" and len(st.SerializeToString()) < 1000
    finally:
        coord.stop(grace=0.2)


# ----------------------------------------------------------------------------- TLS
def test_tls_clients_without_the_ca_or_without_a_client_certificate_are_refused(servers, cache_dir, tmp_path):
    tls = make_tls(tmp_path)
    ca = tls["ca"].read_bytes()
    sec = {"tls_cert": str(tls["server"]), "tls_key": str(tls["server_key"]), "tls_ca": str(tls["ca"])}
    one_way = servers.start(server_config(cache_dir, security=sec), tmp_path / "a", listen="localhost:0")
    mutual = servers.start(server_config(cache_dir, security={**sec, "mutual_tls": True}), tmp_path / "b", listen="localhost:0")
    client_cert = dict(cert=tls["client"].read_bytes(), key=tls["client_key"].read_bytes(), mutual=True)
    (tmp_path / "other").mkdir()
    other = make_tls(tmp_path / "other")  # a second CA, and a client certificate it signed
    for srv, good, bad in (
        (one_way, Credentials(ca=ca), [Credentials(), Credentials(ca=other["ca"].read_bytes())]),
        (mutual, Credentials(ca=ca, **client_cert), [Credentials(ca=ca), Credentials(ca=other["ca"].read_bytes(), **client_cert),
                                                    Credentials(ca=ca, cert=other["client"].read_bytes(),
                                                                key=other["client_key"].read_bytes(), mutual=True)]),
    ):
        assert servers.client(srv.address, creds=good).fetch_block(0, 0)[1].nbytes > 0
        for creds in bad:  # no TLS, a CA that did not sign the server, no or a foreign client certificate
            c = ParamServerClient(srv.address, creds=creds, connect_timeout_s=2)
            with pytest.raises(FetchError, match="unreachable"):
                c.connect()
            c.close()
    with grpc.secure_channel(one_way.address, grpc.ssl_channel_credentials()) as ch:  # the system's CAs only
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ParameterServerStub(ch).GetStatus(pb.StatusRequest(), timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_replica_with_the_token_follows_on_the_data_port_of_a_primary_with_a_control_port(servers, cache_dir, tmp_path):
    from coordinator.cluster.local import free_port

    cfg = server_config(cache_dir, security={"token": TOKEN})
    primary = servers.start(cfg, tmp_path / "p", control_listen=f"127.0.0.1:{free_port()}")
    replica = servers.start(cfg, tmp_path / "r", follow=primary.address)  # the data port: all a worker pod may reach
    c = servers.client(primary.address, creds=Credentials(token=TOKEN))
    for r in records(3):
        c.apply_update(r)
    with grpc.insecure_channel(primary.address) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.ParameterServerStub(ch).ApplyUpdate(pb.UpdateRequest(), timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # state changes: the control port only
    rc = servers.client(replica.address, creds=Credentials(token=TOKEN))
    wait_until(lambda: rc.status()[0].applied_version == 3, timeout=60, what="the replica caught up")
    assert [rc.digest(b).xxh3 for b in range(6)] == [c.digest(b).xxh3 for b in range(6)]
