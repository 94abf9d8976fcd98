"""zoctl up's local cluster under faults: one run that loses a worker, then the coordinator (killed again while
it restarts), then the parameter server (killed again while it restarts, with adam state to recover) ends
bitwise equal to the reference, with the whole run log; a service that refuses its input on restart ends the
run; rounds that wait for an unreachable server. Mutual TLS and clients without the token are checked on the
shared running cluster (tests/test_control.py); a run directory holding one job in tests/test_matrix.py."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from coordinator.local import LocalCluster
from distzo.procs import ServiceFailed

from clusterhelpers import wait_until
from test_cluster import _safe_step, base_config, same_weights


def service_pids(run_dir: Path, module: str) -> set[int]:
    """Processes of `python -m <module>` started for this run directory."""
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if module in cmd and any(str(run_dir) in part for part in cmd):
            out.add(p.pid)
    return out


def kill_twice(cluster: LocalCluster, name: str, module: str) -> None:
    """SIGKILL the process, then its replacement as soon as it exists (while it is still starting)."""
    known = service_pids(cluster.run_dir, module)  # the victim and its siblings (other workers)
    cluster.processes[name].kill(signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        fresh = service_pids(cluster.run_dir, module) - known
        if fresh:
            break
        assert time.monotonic() < deadline, f"{name} was not restarted"
        time.sleep(0.01)
    ready = cluster.run_dir / "ready" / f"{name}.json"
    assert not ready.exists()  # it has not announced itself yet: killed while starting
    for pid in fresh:
        psutil.Process(pid).kill()


@pytest.mark.cluster
@pytest.mark.timeout(900)  # a run with five kills and a reference on a busy 2-core host
def test_killed_processes_are_replaced_and_the_run_ends_bitwise_equal(cache_dir, tmp_path, references):
    """A worker killed once (step 2), the coordinator killed and killed again while it restarts (step 4), the
    parameter server likewise (step 6: recovery = the snapshot of step 4, master and adam state, + the journal),
    then at the end a data directory the restarted server refuses (exit 2): the run ends, not retried."""
    from distzo.runlog import read_history
    from paramserver.snapshot import list_snapshots, load_snapshot_state

    cfg = base_config(cache_dir, steps=12, layout={"name": "ddp", "workers": 2},
                      train={"optimizer": "adam", "lr": 1e-3, "distribution": "gaussian"})
    errors: list[BaseException] = []
    cluster = LocalCluster(cfg, tmp_path / "run")
    try:
        cluster.start()

        def attack() -> None:
            try:
                for step, name, module, twice in ((2, "worker-1", "gpuworker", False), (4, "coordinator", "coordinator", True),
                                                  (6, "paramserver", "paramserver", True)):
                    wait_until(lambda: _safe_step(cluster) >= step, timeout=300, what=f"step {step}")
                    if twice:
                        kill_twice(cluster, name, module)
                    else:
                        cluster.processes[name].kill(signal.SIGKILL)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        st = cluster.wait()
        attacker.join(60)
        assert not errors, errors
        assert st.state == "done", st.error
        cluster.export(tmp_path / "dist")
        assert cluster.restarts.get("paramserver") == 2 and cluster.restarts.get("coordinator") == 2, cluster.restarts
        assert cluster.restarts.get("worker-1", 0) + cluster.restarts.get("node-1", 0) == 1, cluster.restarts
        assert st.resumed_from >= 4  # the restarted coordinator picked up from the parameter server's journal

        # the same weights as an undisturbed run: the reference's, bit for bit
        ref = references.get(cfg)
        assert same_weights(tmp_path / "dist", ref.out)
        # the run log covers the whole run, before and after the restarts, with the reference's numbers
        dist, want = read_history(tmp_path / "run"), read_history(ref.run_dir)
        assert [r["step"] for r in dist.steps] == list(range(cfg.train.steps))
        assert [(r["loss"], r["g"], r["lr"]) for r in dist.steps] == [(r["loss"], r["g"], r["lr"]) for r in want.steps]
        assert [e["step"] for e in dist.evals] == [0, cfg.train.steps]
        assert [e["dev_accuracy"] for e in dist.evals] == [e["dev_accuracy"] for e in want.evals]
        # the server's newest snapshot (taken at the end) holds the reference's master and adam state, bitwise
        snap = list_snapshots(cluster.run_dir / "server")[-1]
        assert snap.version == cfg.train.steps
        tr = ref.trainer
        blocks, states = load_snapshot_state(snap, snap.meta["manifest_sha256"], None, 2,
                                             [b.index for b in tr.model.manifest.blocks])
        for spec, buf, state in zip(tr.model.manifest.blocks, tr.buffers, tr.opt_state):
            assert np.array_equal(blocks[spec.index].view(np.uint32), buf.numpy().view(np.uint32)), spec.name
            assert np.array_equal(states[spec.index].view(np.uint32), state.numpy().view(np.uint32)), spec.name

        # a deterministic start failure ends the run: the data directory no longer says what it holds
        (Path(cluster.cfg.server.data_dir) / "state.json").write_bytes(b"{}")
        server = cluster.processes["paramserver"]
        server.kill(signal.SIGKILL)
        server.proc.wait(60)
        with pytest.raises(ServiceFailed) as err:
            cluster.wait()
        assert err.value.code == 2 and "state.json is damaged" in str(err.value)
        assert cluster.restarts.get("paramserver") == 3  # started once more, and not retried: it would fail the same way
    finally:
        cluster.shutdown()


def _one_forward_round(server_timeout_s: float):
    import torch

    from coordinator.registry import Registry
    from coordinator.rounds import Round
    from distzo.config import CoordinatorSection
    from distzo.data import Batch
    from protos import coordinator_pb2 as cpb

    reg = Registry()
    w = reg.register(cpb.WorkerHello(worker_id="w", node_size=1))
    reg.heartbeat(w, ready=True)
    batch = Batch(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -100))
    fw = {"k": cpb.ForwardSpec(shard=0, sign=1, seed=1, coef=1e-3)}
    policy = CoordinatorSection(heartbeat_timeout_s=600, max_attempts=2, server_timeout_s=server_timeout_s)
    rnd = Round(reg, policy, step=0, version=0, kind="train", forwards=fw, batches={0: batch}, stopping=threading.Event())
    rnd.start([["k"]])
    return rnd, w


def test_forwards_wait_for_an_unreachable_server_without_using_up_their_attempts():
    from coordinator.rounds import RoundFailed
    from protos import coordinator_pb2 as cpb

    rnd, w = _one_forward_round(server_timeout_s=300)
    waiter = threading.Thread(target=rnd.wait)
    waiter.start()
    for _ in range(4):  # twice max_attempts: the server is down, not the forward
        a = w.outbox.get(timeout=30).assignment
        rnd.on_result(w, cpb.WorkResult(assignment_id=a.assignment_id, step=0, error="connection refused", error_kind="fetch"))
    a = w.outbox.get(timeout=30).assignment
    rnd.on_result(w, cpb.WorkResult(assignment_id=a.assignment_id, step=0, results=[cpb.ForwardResult(spec=a.forwards[0], loss=1.25, loss_sum=2.5, label_tokens=2)]))
    waiter.join(timeout=30)
    assert rnd.done() and rnd.loss("k") == (2.5, 2)
    # but not forever: past coordinator.server_timeout_s the round fails, saying why
    rnd, w = _one_forward_round(server_timeout_s=0.5)
    failed = []

    def wait() -> None:
        try:
            rnd.wait()
        except RoundFailed as exc:
            failed.append(str(exc))

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 60
    while not failed and time.monotonic() < deadline:
        try:
            a = w.outbox.get(timeout=0.5).assignment
        except Exception:  # noqa: BLE001 - nothing sent yet (backoff)
            continue
        rnd.on_result(w, cpb.WorkResult(assignment_id=a.assignment_id, step=0, error="connection refused", error_kind="fetch"))
    waiter.join(timeout=30)
    assert failed and "the parameter server was unreachable" in failed[0], failed
