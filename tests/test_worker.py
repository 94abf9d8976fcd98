"""Workers: streaming, dual and PertP forwards, node groups, bounded memory, faults."""

from __future__ import annotations

import math

import pytest
import xxhash

from distzo.model.forward import ForwardJob
from distzo.train.plan import step_plan
from distzo.train.reference import ReferenceTrainer

from clusterhelpers import Harness, ResultSink, wait_until
from conftest import small_config
from pshelpers import CuttingProxy


@pytest.fixture
def harness(cache_dir, tmp_path):
    made = []

    def make(cfg=None, **kw):
        h = Harness(cfg or small_config(cache_dir), tmp_path, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def reference_losses(cfg, step: int = 0) -> dict:
    """The reference trainer's losses of step 0 (weights as loaded)."""
    ref = ReferenceTrainer(cfg)
    plan = step_plan(cfg, step, len(ref.job.train))
    batches = ref.job.shard_batches(plan)
    out = {}
    for j, seed in enumerate(plan.seeds):
        for d, b in enumerate(batches):
            res = ref.engine.run([ForwardJob(b, seed=seed, coef=cfg.train.eps), ForwardJob(b, seed=seed, coef=-cfg.train.eps)],
                                 ref.feed())
            out[(j, d, 1)], out[(j, d, -1)] = res[0].loss, res[1].loss
    return out


@pytest.mark.parametrize("served", ["float32", "bfloat16"])
def test_dual_worker_reproduces_the_reference_losses_bitwise(harness, cache_dir, device, served):
    h = harness(small_config(cache_dir, runtime={"device": device}, server={"served_dtype": served}))
    h.add_worker("w0", device=device)
    h.wait_registered(["w0"])
    h.send("w0", h.train_assignment(0, [(0, 0, 1), (0, 0, -1)], report_digests=True))
    wid, r = h.result()
    assert not r.error, r.error
    got = {(f.spec.direction, f.spec.shard, f.spec.sign): f.loss for f in r.results}
    want = reference_losses(h.cfg)
    assert got == want  # bitwise: same floats
    itemsize = 4 if served == "float32" else 2
    # on a GPU: DMA straight from the registered shared memory (no host copy)
    assert r.timing.transport == ("shm-direct" if device == "cuda" else "shm")
    assert r.timing.bytes_received == h.server.state.manifest.numel * itemsize
    store = h.server.state.store  # the bytes the worker received: the served copy
    server = [xxhash.xxh3_64_intdigest(memoryview(store.bytes_of(b, master=False))) for b in range(len(r.block_digests))]
    assert list(r.block_digests) == server


def test_pertp_workers_each_reproduce_one_sign(harness, cache_dir, device):
    h = harness(small_config(cache_dir, runtime={"device": device}))
    h.add_worker("plus", device=device)
    h.add_worker("minus", device=device)
    h.wait_registered(["plus", "minus"])
    h.send("plus", h.train_assignment(0, [(0, 0, 1)]))
    h.send("minus", h.train_assignment(0, [(0, 0, -1)]))
    got = {}
    for _ in range(2):
        _, r = h.result()
        assert not r.error
        got.update({(f.spec.direction, f.spec.shard, f.spec.sign): f.loss for f in r.results})
    assert got == reference_losses(h.cfg)


@pytest.mark.cluster
def test_node_group_of_two_gloo_workers_gathers_the_whole_block(harness, tmp_path):
    from coordinator.cluster.local import free_port

    h = harness()
    master = f"127.0.0.1:{free_port()}"
    for rank in range(2):
        h.add_worker_process(f"n{rank}", "--node-rank", str(rank), "--node-size", "2", "--node-master", master, "--node-id", "node-a")
    h.wait_registered(["n0", "n1"])
    wait_until(lambda: [len(u) for u in h.coord.service.registry.units()] == [2], timeout=120, what="one ready node group of 2")
    # one member computes both signs, the other only gathers: the collectives stay paired
    a = h.train_assignment(0, [(0, 0, 1), (0, 0, -1)], report_digests=True)
    g = h.train_assignment(0, [], report_digests=True)
    h.send("n0", a)
    h.send("n1", g)
    results = dict(h.result() for _ in range(2))
    for wid, r in results.items():
        assert not r.error, (wid, r.error)
    server = [h.server.state.store.digest(b)[1] for b in range(len(h.server.state.manifest.blocks))]
    assert list(results["n0"].block_digests) == server == list(results["n1"].block_digests)
    man = h.server.state.manifest
    assert results["n0"].timing.bytes_received < man.numel * 4  # each fetched its slice only
    got = {(f.spec.direction, f.spec.shard, f.spec.sign): f.loss for f in results["n0"].results}
    assert got == reference_losses(h.cfg)
    assert results["n0"].timing.gather_s > 0


def test_resident_memory_is_bounded_by_a_few_blocks(harness, cache_dir):
    peaks = {}
    for layers in ("small-opt", "deep-opt"):
        h = harness(small_config(cache_dir, model={"source": layers}))
        h.add_worker(f"mem-{layers}")
        h.wait_registered([f"mem-{layers}"])
        h.send(f"mem-{layers}", h.train_assignment(0, [(0, 0, 1), (0, 0, -1)]))
        _, r = h.result()
        assert not r.error, r.error
        man = h.server.state.manifest
        biggest = max(b.numel for b in man.blocks) * 4
        peaks[layers] = (r.timing.peak_block_bytes, man.numel * 4, biggest)
        h.close()
    for name, (peak, model, biggest) in peaks.items():
        # pool (prefetch + pinned + 1) plus two perturbed copies of at most two blocks
        assert peak <= 8 * biggest, (name, peak, biggest)
    deep_peak, deep_model, _ = peaks["deep-opt"]
    assert deep_peak < deep_model / 2  # 26 blocks, a handful resident


def test_faults_are_reported_and_the_worker_stays_ready(harness, cache_dir, device):
    h = harness(small_config(cache_dir, server={"fetch_timeout_s": 1.0}, runtime={"device": device}))
    h.add_worker("w", device=device)
    h.wait_registered(["w"])
    # a version the server never reaches
    far = h.train_assignment(0, [(0, 0, 1)])
    far.step = far.version = 7
    far.deadline_s = 1.0
    h.send("w", far)
    _, r = h.result()
    assert r.error_kind == "version_timeout" and "version 7" in r.error, r.error
    # update windows: a base newer than its step, and pending records that are not the ones after the base
    ahead = h.train_assignment(0, [(0, 0, 1)])
    ahead.version = 2
    h.send("w", ahead)
    _, r = h.result()
    assert r.error_kind == "bad_input" and "base version 2" in r.error, r.error
    gap = h.train_assignment(0, [(0, 0, 1)])
    gap.step = 3
    gap.pending.add(step=0, lr=1e-3, directions=[{"seed": 1, "g": 0.5}])
    gap.pending.add(step=2, lr=1e-3, directions=[{"seed": 2, "g": 0.5}])
    h.send("w", gap)
    _, r = h.result()
    assert r.error_kind == "bad_input" and "records of steps 0..2" in r.error, r.error
    # a shard with no label tokens
    bad = h.train_assignment(0, [(0, 0, 1)])
    labels = bytearray(bad.batches[0].labels)
    import numpy as np

    arr = np.frombuffer(labels, dtype=np.int32).copy()
    arr[:] = -100
    bad.batches[0].labels = arr.tobytes()
    h.send("w", bad)
    _, r = h.result()
    assert r.error_kind == "bad_input" and "no label tokens" in r.error
    # malformed batch bytes
    broken = h.train_assignment(0, [(0, 0, 1)])
    broken.batches[0].input_ids = b"\x00\x01"
    h.send("w", broken)
    _, r = h.result()
    assert r.error_kind == "bad_input" and "input_ids" in r.error
    # a token id past the embedding: deterministic, reported as bad input with its cause
    oov = h.train_assignment(0, [(0, 0, 1)])
    ids = np.frombuffer(bytearray(oov.batches[0].input_ids), dtype=np.int32).copy()
    ids[0] = 10**6
    oov.batches[0].input_ids = ids.tobytes()
    h.send("w", oov)
    _, r = h.result()
    assert r.error_kind == "bad_input" and "index out of range" in r.error, (r.error_kind, r.error)
    # a NaN loss is a value, reported as such (the coordinator's policy decides)
    nan = h.train_assignment(0, [(0, 0, 1)])
    nan.forwards[0].coef = 1e39
    h.send("w", nan)
    _, r = h.result()
    assert not r.error and math.isnan(r.results[0].loss)
    # and the worker still works
    h.send("w", h.train_assignment(0, [(0, 0, 1), (0, 0, -1)]))
    _, r = h.result()
    assert not r.error and all(math.isfinite(f.loss) for f in r.results)


def test_a_dropped_stream_is_resumed(harness, cache_dir, tmp_path, device):
    cfg = small_config(cache_dir, model={"source": "small-opt"}, server={"chunk_bytes": 1 << 20}, runtime={"device": device})
    h = harness(cfg)
    proxy = CuttingProxy(h.server.port, cut_after=(1 << 20) + 12345)
    try:
        h.add_worker("w", param_servers=[f"127.0.0.1:{proxy.port}"], device=device)
        import gpuworker.worker  # noqa: F401

        h.wait_registered(["w"])
        w = h.workers[0][0]
        wait_until(lambda: w._client is not None, what="worker connected to the server")
        w._client.transport = "grpc"  # force the network path through the proxy
        h.send("w", h.train_assignment(0, [(0, 0, 1), (0, 0, -1)]))
        _, r = h.result()
        assert not r.error, r.error
        assert proxy.cuts == 1
        assert {(f.spec.direction, f.spec.shard, f.spec.sign): f.loss for f in r.results} == reference_losses(cfg)
    finally:
        proxy.close()


def test_worker_reconnects_and_registers_again(harness, cache_dir):
    from coordinator.server import CoordinatorServer
    from distzo.infra.rpc import Credentials

    h = harness()
    h.add_worker("w")
    h.wait_registered(["w"])
    port = h.coord.port
    h.coord.stop(grace=0.1)
    h.coord = CoordinatorServer([h.server.address], Credentials(), listen=f"127.0.0.1:{port}").start()
    h.coord.service.job = ResultSink(h.cfg, h.results)
    h.wait_registered(["w"], timeout=60)
    h.send("w", h.train_assignment(0, [(0, 0, 1), (0, 0, -1)]))
    _, r = h.result()
    assert not r.error


def test_a_worker_is_welcomed_before_it_gets_any_work(harness, cache_dir):
    """The race behind "worker has no job yet": whoever sees a new worker register (a test, a round)
    and sends it work at once must not overtake its welcome."""
    import queue as queues

    import grpc

    from protos import coordinator_pb2 as cpb
    from protos import coordinator_pb2_grpc as cpb_grpc

    h = harness()
    reg = h.coord.service.registry
    with grpc.insecure_channel(h.coord.address) as ch:
        stub = cpb_grpc.CoordinatorStub(ch)
        for i in range(10):
            wid = f"race-{i}"
            up: queues.Queue = queues.Queue()
            up.put(cpb.WorkerMessage(hello=cpb.WorkerHello(worker_id=wid, node_size=1)))
            call = stub.Session(iter(up.get, None), timeout=60)
            assert reg.wait_for(lambda: wid in reg.workers, 30)
            h.send(wid, h.train_assignment(0, [(0, 0, 1)]))  # the moment it is visible
            first, second = next(call), next(call)
            assert first.HasField("welcome") and second.HasField("assignment"), (i, first, second)
            up.put(None)
            call.cancel()


def test_lost_workers_do_not_grow_the_registry_without_bound():
    from coordinator.registry import MAX_LOST, Registry
    from protos import coordinator_pb2 as cpb

    reg = Registry()
    for i in range(MAX_LOST + 50):  # workers restarted under new ids, each lost in turn
        reg.lose(reg.register(cpb.WorkerHello(worker_id=f"w{i}", node_size=1)), "test")
    live = reg.register(cpb.WorkerHello(worker_id="live", node_size=1))
    assert len(reg.workers) <= MAX_LOST + 1 and reg.workers["live"] is live
    assert f"w{MAX_LOST + 49}" in reg.workers and "w0" not in reg.workers  # the oldest go first


def test_the_readiness_probe_reads_distzo_worker_ready():
    import socket
    import subprocess
    import sys

    from gpuworker.probe import is_ready

    assert is_ready("# TYPE distzo_worker_ready gauge\ndistzo_worker_ready 1.0\n")
    assert not is_ready("# TYPE distzo_worker_ready gauge\ndistzo_worker_ready 0.0\n")
    assert not is_ready("# TYPE other gauge\nother 1.0\n")
    with socket.socket() as s:  # a port nothing listens on: not ready, said in one line
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "gpuworker.probe", "--port", str(port)], capture_output=True, text=True)
    assert r.returncode == 1 and "unreachable" in r.stderr and r.stderr.count("\n") == 1
