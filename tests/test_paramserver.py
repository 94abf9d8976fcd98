"""The parameter server: transports, updates, durability, replication, sharding, bad input."""

from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import numpy as np
import pytest
import torch

from distzo.infra.rpc import Credentials
from distzo.model.modeling import BlockModel
from distzo.train.reference import ReferenceTrainer
from distzo.zo.generator import Distribution
from distzo.zo.mezo import apply_update
from distzo.zo.record import Direction, UpdateRecord
from paramserver.dataplane.client import FetchError, ParamServerClient, StaleVersionError, VersionTimeout
from protos import paramserver_pb2 as pb
from protos import paramserver_pb2_grpc as pb_grpc

from conftest import small_config
from pshelpers import CuttingProxy, Servers, all_blocks, make_tls, server_config


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def master_of(cache_dir: str, name: str = "tiny-opt") -> tuple[BlockModel, list[torch.Tensor]]:
    from distzo.data.presets import preset_dir

    bm = BlockModel.from_dir(preset_dir(name, cache_dir))
    return bm, bm.load_block_buffers()


def records(n: int, start: int = 0) -> list[UpdateRecord]:
    return [UpdateRecord(t, (Direction(1000 + t, 0.3 - 0.1 * t),), 1e-3, 0.01) for t in range(start, start + n)]


@pytest.mark.parametrize("served", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_fetch_every_block_equals_the_master(servers, cache_dir, tmp_path, served, transport):
    srv = servers.start(server_config(cache_dir, server={"served_dtype": served}), tmp_path / "d")
    client = servers.client(srv.address, transport=transport)
    _, master = master_of(cache_dir)
    for b, buf in enumerate(all_blocks(client, 0)):
        want = {"float32": master[b], "bfloat16": master[b].to(torch.bfloat16).view(torch.int16),
                "float16": master[b].to(torch.float16)}[served]
        assert np.array_equal(buf, want.numpy().view(np.uint8)), f"block {b}"
        assert buf.nbytes == master[b].numel() * (4 if served == "float32" else 2)  # 16-bit halves the bytes
    # slices of k parts reassemble the block
    for k in (2, 3):
        parts = []
        for r in range(k):
            a, e = client.slice_bytes(1, r, k)
            dest = np.empty(e - a, np.uint8)
            res = client.fetch_into(1, 0, dest, rank=r, parts=k)
            assert res.transport == transport
            parts.append(dest)
        assert np.array_equal(np.concatenate(parts), all_blocks(client, 0)[1])


def test_concurrent_clients(servers, cache_dir, tmp_path):
    srv = servers.start(server_config(cache_dir), tmp_path / "d")
    _, master = master_of(cache_dir)

    def fetch_all(i: int) -> bool:
        c = ParamServerClient(srv.address, transport="grpc" if i % 2 else "shm").connect()
        try:
            return all(np.array_equal(buf.view(np.float32), master[b].numpy()) for b, buf in enumerate(all_blocks(c, 0)))
        finally:
            c.close()

    with cf.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(fetch_all, range(12)))


def test_updates_reproduce_the_reference_trainer_bitwise(servers, cache_dir, tmp_path):
    cfg = small_config(cache_dir, train={"steps": 6, "weight_decay": 0.01, "distribution": "gaussian"}, layout={"q": 2, "workers": 2})
    ref = ReferenceTrainer(cfg)
    ref.train(progress=False)
    srv = servers.start(cfg, tmp_path / "d")
    client = servers.client(srv.address)
    for r in ref.log.records:
        assert client.apply_update(r)[0].duplicate is False
    for b, buf in enumerate(all_blocks(client, len(ref.log.records))):
        assert np.array_equal(buf.view(np.float32), ref.buffers[b].numpy()), f"block {b}"


def test_versions_duplicates_gaps_and_stale_fetches(servers, cache_dir, tmp_path):
    srv = servers.start(server_config(cache_dir), tmp_path / "d")
    client = servers.client(srv.address, transport="grpc")
    rs = records(3)
    client.apply_update(rs[0])
    assert client.apply_update(rs[0])[0].duplicate  # acknowledged, not applied twice
    with pytest.raises(grpc.RpcError) as err:
        client.apply_update(rs[2])  # gap: step 2 before step 1
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "before step 1" in err.value.details()
    conflicting = UpdateRecord(0, (Direction(5, 9.0),), 1e-3, 0.01)
    with pytest.raises(grpc.RpcError) as err:
        client.apply_update(conflicting)
    assert "different" in err.value.details()
    srv.state.drain()
    assert client.applied_version() == 1
    with pytest.raises(StaleVersionError, match="version 0 is gone"):
        client.fetch_block(0, 0)
    t0 = time.monotonic()
    with pytest.raises(VersionTimeout):
        client.fetch_block(0, 2, timeout_s=0.5)  # waits for a version that does not come
    assert time.monotonic() - t0 >= 0.4
    # a fetch for the next version waits until the update lands, then succeeds
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.fetch_block, 0, 2, "", 10.0)
        time.sleep(0.2)
        assert not pending.done()
        client.apply_update(rs[1])
        buf, res = pending.result(timeout=10)
        assert res.version == 2


def test_bad_inputs_get_clear_statuses_and_change_nothing(servers, cache_dir, tmp_path):
    srv = servers.start(server_config(cache_dir), tmp_path / "d")
    client = servers.client(srv.address, transport="grpc")
    stub = pb_grpc.ParameterServerStub(client.shards[0].channel)
    before = [client.digest(b).xxh3 for b in range(6)]

    def fetch(**kw):
        req = pb.FetchRequest(**{"block": 1, "version": 0, "rank": 0, "parts": 1, **kw})
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchSlice(req, timeout=5))
        return err.value

    cases = [
        (fetch(block=99), grpc.StatusCode.NOT_FOUND, "unknown block 99"),
        (fetch(rank=2, parts=2), grpc.StatusCode.OUT_OF_RANGE, "slice index 2 is out of range for 2 slices"),
        (fetch(parts=0), grpc.StatusCode.INVALID_ARGUMENT, "parts (k) must be >= 1"),
        (fetch(dtype="int8"), grpc.StatusCode.INVALID_ARGUMENT, "dtype 'int8' is not served"),
        (fetch(version=-7), grpc.StatusCode.INVALID_ARGUMENT, "version must be >= 0"),
        (fetch(resume_offset=10**9), grpc.StatusCode.OUT_OF_RANGE, "resume_offset"),
    ]
    for bad, msg in (
        (UpdateRecord(0, (Direction(1, float("nan")),), 1e-3, 0.0), "not finite"),
        (UpdateRecord(0, (Direction(-3, 0.5),), 1e-3, 0.0), "seed -3 is out of range"),
        (UpdateRecord(0, (Direction(1, 0.5),), -1.0, 0.0), "lr must be"),
        (UpdateRecord(0, (), 1e-3, 0.0), "at least one"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            client.apply_update(bad)
        cases.append((err.value, grpc.StatusCode.INVALID_ARGUMENT, msg))
    huge = pb.UpdateRequest(record=pb.UpdateRequest().record)
    huge.record.directions.extend([pb.UpdateRequest().record.directions.add(seed=1, g=0.1)] * 5000)
    with pytest.raises(grpc.RpcError) as err:
        stub.ApplyUpdate(huge, timeout=5)
    cases.append((err.value, grpc.StatusCode.INVALID_ARGUMENT, "at most 4096"))
    with pytest.raises(grpc.RpcError) as err:  # over the 64 MiB message limit
        stub.Export(pb.ExportRequest(path="x" * (65 << 20)), timeout=20)
    cases.append((err.value, grpc.StatusCode.RESOURCE_EXHAUSTED, ""))
    for exc, code, needle in cases:
        assert exc.code() == code, (exc.code(), exc.details())
        assert needle in (exc.details() or ""), exc.details()
    assert [client.digest(b).xxh3 for b in range(6)] == before  # nothing applied
    assert client.status()[0].journaled_steps == 0
    client.apply_update(records(1)[0])  # and it still works
    assert client.status()[0].journaled_steps == 1


def test_auth_and_tls(servers, cache_dir, tmp_path):
    tls = make_tls(tmp_path)
    (tmp_path / "token").write_text("s3cret\n")
    sec = {"token_file": str(tmp_path / "token"), "tls_cert": str(tls["server"]), "tls_key": str(tls["server_key"]),
           "tls_ca": str(tls["ca"])}
    srv = servers.start(server_config(cache_dir, security=sec), tmp_path / "d", listen="localhost:0")
    good = Credentials(token="s3cret", ca=tls["ca"].read_bytes())
    no_token = Credentials(ca=tls["ca"].read_bytes())
    wrong = Credentials(token="nope", ca=tls["ca"].read_bytes())
    c_good = servers.client(srv.address, creds=good)
    for creds, needle in ((no_token, "missing bearer token"), (wrong, "wrong bearer token")):
        c = servers.client(srv.address, creds=creds)
        for call in (lambda: c.apply_update(records(1)[0]), c.snapshot, lambda: c.export("x"), c.shutdown):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and needle in err.value.details()
        assert c.fetch_block(0, 0)[1].nbytes > 0  # reads need no token
    assert c_good.status()[0].journaled_steps == 0  # nothing applied
    c_good.apply_update(records(1)[0])
    assert c_good.status()[0].journaled_steps == 1
    plain = ParamServerClient(srv.address, connect_timeout_s=2)  # no TLS against a TLS server
    with pytest.raises(FetchError, match="unreachable"):
        plain.connect()
    plain.close()


def test_mutual_tls_requires_a_client_certificate(servers, cache_dir, tmp_path):
    tls = make_tls(tmp_path)
    sec = {"tls_cert": str(tls["server"]), "tls_key": str(tls["server_key"]), "tls_ca": str(tls["ca"]), "mutual_tls": True}
    srv = servers.start(server_config(cache_dir, security=sec), tmp_path / "d", listen="localhost:0")
    with_cert = Credentials(ca=tls["ca"].read_bytes(), cert=tls["client"].read_bytes(), key=tls["client_key"].read_bytes(), mutual=True)
    assert servers.client(srv.address, creds=with_cert).fetch_block(0, 0)[1].nbytes > 0
    bare = ParamServerClient(srv.address, creds=Credentials(ca=tls["ca"].read_bytes()), connect_timeout_s=2)
    with pytest.raises(FetchError):
        bare.connect()
    bare.close()


def test_stream_resumes_from_the_last_good_chunk(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, model={"source": "small-opt"}, server={"chunk_bytes": 1 << 20})
    srv = servers.start(cfg, tmp_path / "d")
    _, master = master_of(cache_dir, "small-opt")
    # On a busy host gRPC itself may re-send the call on a new connection when the cut comes before the client
    # has read a chunk (a transparent retry: a fresh stream, nothing to resume); then the block is still whole,
    # and the cut is made again, on a new proxy, until the client resumes a stream it had read part of.
    for _ in range(5):
        proxy = CuttingProxy(srv.port, cut_after=(1 << 20) + (1 << 19))  # mid-way through the second chunk
        try:
            client = servers.client(f"127.0.0.1:{proxy.port}", transport="grpc")
            buf, res = client.fetch_block(1, 0)
            assert proxy.cuts == 1 and np.array_equal(buf.view(np.float32), master[1].numpy())
        finally:
            proxy.close()
        if res.resumes:
            break
    assert res.resumes >= 1


def test_two_shards_route_by_block(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir)
    a = servers.start(cfg, tmp_path / "a", blocks=(0, 3))
    b = servers.start(cfg, tmp_path / "b", blocks=(3, 6))
    client = servers.client([a.address, b.address])
    bm, master = master_of(cache_dir)
    rs = records(3)
    for r in rs:
        client.apply_update(r)
        for spec, buf in zip(bm.manifest.blocks, master):
            apply_update(spec, buf, r, Distribution.RADEMACHER)
    for blk, buf in enumerate(all_blocks(client, 3)):
        assert np.array_equal(buf.view(np.float32), master[blk].numpy())
    partial = ParamServerClient([a.address])
    with pytest.raises(FetchError, match=r"no shard holds blocks \[3, 4, 5\]"):
        partial.connect()
    partial.close()
    with grpc.insecure_channel(a.address) as ch, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.ParameterServerStub(ch).FetchSlice(pb.FetchRequest(block=4, version=3, parts=1), timeout=5))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "another shard" in err.value.details()


def test_replicas_stay_identical_including_one_that_joins_late(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, server={"snapshot_every": 2})
    primary = servers.start(cfg, tmp_path / "p")
    early = servers.start(cfg, tmp_path / "r1", follow=primary.address, name="replica-early")
    pc = servers.client(primary.address)
    for r in records(7):
        primary.state._wait_snapshot()  # no periodic snapshot skipped: the journal gets truncated
        pc.apply_update(r)
        primary.state.drain()
    primary.state._wait_snapshot()
    late = servers.start(cfg, tmp_path / "r2", follow=primary.address, name="replica-late")
    assert not (tmp_path / "p" / "journal-000000000000.log").exists()  # the late one must re-sync from blocks
    for r in records(3, start=7):
        pc.apply_update(r)
    for rep in (early, late):
        rc = servers.client(rep.address)
        deadline = time.monotonic() + 20
        while rc.applied_version() < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        for blk in range(6):
            assert rc.digest(blk).version == 10
            assert rc.digest(blk).xxh3 == pc.digest(blk).xxh3, (rep.state.server_id, blk)
        assert np.array_equal(rc.fetch_block(2, 10)[0], pc.fetch_block(2, 10)[0])
        with pytest.raises(grpc.RpcError) as err:
            rc.apply_update(records(1, start=10)[0])
        assert "replica" in err.value.details()
        with pytest.raises(VersionTimeout):  # a version it does not have (yet)
            rc.fetch_block(0, 11, timeout_s=0.3)


def test_snapshots_recover_bitwise_and_corruption_is_detected(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir, server={"snapshot_every": 3})
    d = tmp_path / "d"
    s1 = servers.start(cfg, d)
    c = servers.client(s1.address)
    for r in records(5):
        c.apply_update(r)
    s1.state.drain()
    s1.state._wait_snapshot()
    want = [c.digest(b).xxh3 for b in range(6)]
    s1.stop()
    s2 = servers.start(cfg, d)
    c2 = servers.client(s2.address)
    assert c2.applied_version() == 5 and [c2.digest(b).xxh3 for b in range(6)] == want
    s2.stop()
    # a torn final journal record (never acknowledged) is dropped; the acknowledged ones stay
    seg = sorted(d.glob("journal-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"DZJ1\x40\x00\x00\x00garbage")
    s3 = servers.start(cfg, d)
    assert servers.client(s3.address).applied_version() == 5
    s3.stop()
    # damage before the end of the journal is refused with a clear error
    data = bytearray(seg.read_bytes())
    data[14] ^= 0xFF
    seg.write_bytes(bytes(data) + b"DZJ1" + bytes(20))
    from paramserver.durability.datadir import RecoveryError

    with pytest.raises(RecoveryError, match="damaged"):
        servers.start(cfg, d)


def test_corrupt_snapshots_fall_back_then_refuse(servers, cache_dir, tmp_path):
    from paramserver.durability.datadir import RecoveryError
    from paramserver.durability.snapshot import SnapshotCorrupt, list_snapshots, load_snapshot

    cfg = server_config(cache_dir, server={"snapshot_every": 2})
    d = tmp_path / "d"
    s = servers.start(cfg, d)
    c = servers.client(s.address)
    for r in records(4):
        s.state._wait_snapshot()  # a periodic snapshot is skipped while the previous one is still writing
        c.apply_update(r)
        s.state.drain()
    s.state._wait_snapshot()
    want = [c.digest(b).xxh3 for b in range(6)]
    s.stop()
    snaps = list_snapshots(d)
    assert [x.version for x in snaps] == [2, 4]
    newest = snaps[-1]
    raw = bytearray(newest.path.read_bytes())
    raw[-100] ^= 0x01
    newest.path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotCorrupt, match="fails its checksum"):
        load_snapshot(newest, s.state.digest)
    # the newest fails its checksum: recovery uses the older one and replays the journal behind it
    s2 = servers.start(cfg, d)
    c2 = servers.client(s2.address)
    assert c2.applied_version() == 4 and [c2.digest(b).xxh3 for b in range(6)] == want
    s2.stop()
    for info in list_snapshots(d):
        info.path.write_bytes(info.path.read_bytes()[:1000])
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        load_snapshot(list_snapshots(d)[0], s.state.digest)
    with pytest.raises(RecoveryError, match="fail their checks"):
        servers.start(cfg, d)


def test_export_loads_with_transformers(servers, cache_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    srv = servers.start(server_config(cache_dir, model={"source": "tiny-llama"}), tmp_path / "d")
    c = servers.client(srv.address)
    for r in records(2):
        c.apply_update(r)
    reply = c.export(str(tmp_path / "export"))
    assert reply.version == 2
    model = AutoModelForCausalLM.from_pretrained(reply.path, dtype=torch.float32)
    state = model.state_dict()
    for spec in srv.state.manifest.blocks:
        flat = c.fetch_block(spec.index, 2)[0].view(np.float32)
        for t in spec.tensors:
            assert np.array_equal(state[t.name].numpy().reshape(-1), flat[t.offset : t.offset + t.numel])


@pytest.mark.cluster
def test_kill_9_mid_updates_recovers_bitwise(cache_dir, tmp_path):
    """A server process killed with SIGKILL while updates stream in comes back with every acknowledged one."""
    import threading

    from distzo.infra.procs import ServiceProcess, python_module

    cfg = server_config(cache_dir, server={"snapshot_every": 5})
    (tmp_path / "job.yaml").write_text(cfg.to_yaml())
    data = tmp_path / "d"

    def spawn(tag: str) -> ServiceProcess:
        p = ServiceProcess(tag, python_module("paramserver", "--config", str(tmp_path / "job.yaml"), "--data-dir", str(data),
                                              "--listen", "127.0.0.1:0", "--metrics-port", "-1",
                                              "--ready-file", str(tmp_path / f"{tag}.json")), tmp_path / f"{tag}.json", tmp_path / f"{tag}.log")
        p.start()
        return p

    rs = records(40)
    bm, expected = master_of(cache_dir)
    for r in rs:
        for spec, buf in zip(bm.manifest.blocks, expected):
            apply_update(spec, buf, r, Distribution.RADEMACHER)
    proc = spawn("first")
    acked = []
    try:
        client = ParamServerClient(proc.info["address"]).connect()

        def send() -> None:
            for r in rs:
                try:
                    client.apply_update(r, timeout_s=5)
                except grpc.RpcError:
                    return
                acked.append(r.step)

        sender = threading.Thread(target=send)
        sender.start()
        while len(acked) < 15:
            time.sleep(0.001)
        proc.kill()  # SIGKILL, mid-stream
        sender.join()
        client.close()
    finally:
        proc.kill()
    assert 15 <= len(acked) < len(rs)
    proc2 = spawn("second")
    try:
        client = ParamServerClient(proc2.info["address"]).connect()
        resume = client.journaled_steps()
        assert len(acked) <= resume <= len(acked) + 1  # every acknowledged update survived
        for r in rs[resume:]:
            client.apply_update(r)
        for blk, buf in enumerate(all_blocks(client, len(rs))):
            assert np.array_equal(buf.view(np.float32), expected[blk].numpy()), blk
        client.close()
    finally:
        proc2.stop()
    assert proc2.proc.returncode == 0  # SIGTERM is a clean shutdown


def test_paramserver_cli_refuses_bad_input(tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad.yaml").write_text("server:\n  served_dtype: int4\n")
    r = subprocess.run([sys.executable, "-m", "paramserver", "--config", str(tmp_path / "bad.yaml"), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "server.served_dtype" in r.stderr
    r = subprocess.run([sys.executable, "-m", "paramserver", "--data-dir", str(tmp_path / "d"), "--blocks", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "FIRST:END" in r.stderr


def test_shm_client_survives_a_server_restart(servers, cache_dir, tmp_path):
    cfg = server_config(cache_dir)
    s1 = servers.start(cfg, tmp_path / "d")
    port = s1.port
    client = ParamServerClient(s1.address, transport="shm").connect()
    try:
        client.apply_update(records(1)[0])
        before = client.fetch_block(2, 1)[0].copy()
        s1.stop()
        s2 = servers.start(cfg, tmp_path / "d", listen=f"127.0.0.1:{port}")  # same place, new segments
        buf, res = client.fetch_block(2, 1)  # the old mapping is detected as gone and replaced
        assert res.transport == "shm" and np.array_equal(buf, before)
        client.apply_update(records(2)[1])
        bm, master = master_of(cache_dir)
        for r in records(2):
            for spec, m in zip(bm.manifest.blocks, master):
                apply_update(spec, m, r, Distribution.RADEMACHER)
        assert np.array_equal(client.fetch_block(2, 2)[0].view(np.float32), master[2].numpy())
        assert s2.state.store.version(2) == 2
    finally:
        client.close()


def test_without_a_start_snapshot_a_restart_replays_onto_the_initial_weights(servers, cache_dir, tmp_path):
    """server.snapshot_at_start off (benchmarks: no model-sized write on the clock): nothing is written at
    start, and a restarted server still recovers bitwise from the model directory and the journal."""
    from paramserver.durability.snapshot import list_snapshots

    cfg = server_config(cache_dir, server={"snapshot_every": 0, "snapshot_at_start": False})
    srv = servers.start(cfg, tmp_path / "d")
    c = servers.client(srv.address)
    rs = [UpdateRecord(t, (Direction(40 + t, 0.3),), 1e-3, 0.0) for t in range(3)]
    for r in rs:
        c.apply_update(r)
    before = all_blocks(c, 3)
    srv.stop(grace=0.5)
    assert list_snapshots(tmp_path / "d") == []
    again = servers.client(servers.start(cfg, tmp_path / "d").address)
    for a, b in zip(before, all_blocks(again, 3)):
        assert np.array_equal(a, b)
