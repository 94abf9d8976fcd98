"""zoctl up under faults and attacks: second faults during restarts, a run directory that holds
another job, the whole cluster over mutual TLS, clients without the token. Weights stay bitwise
those of the reference."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from coordinator.local import LocalCluster
from distzo.config import JobConfig
from distzo.locks import alive
from distzo.procs import ServiceFailed
from distzo.runlog import read_history
from paramserver.service import ANONYMOUS_SLOTS
from protos import paramserver_pb2 as pb
from protos import paramserver_pb2_grpc as pb_grpc

from clusterhelpers import wait_until
from pshelpers import make_tls
from test_cluster import _safe_step, at_step, base_config, reference_export, run_cluster, same_weights, write_config, zoctl


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


@pytest.mark.timeout(900)  # several runs and a reference on a busy 2-core host
def test_a_process_killed_again_while_restarting_is_restarted(cache_dir, tmp_path):
    cfg = base_config(cache_dir, steps=12, layout={"name": "ddp", "workers": 2})
    errors = []

    def attack(cluster: LocalCluster) -> None:
        def run() -> None:
            try:
                for step, name, module in ((2, "paramserver", "paramserver"), (5, "coordinator", "coordinator"),
                                           (8, "worker-1", "gpuworker")):
                    wait_until(lambda: _safe_step(cluster) >= step, timeout=300, what=f"step {step}")
                    kill_twice(cluster, name, module)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)

        threading.Thread(target=run, daemon=True).start()

    cluster, st = run_cluster(tmp_path, cfg, attack)
    assert not errors, errors
    assert cluster.restarts.get("paramserver") == 2 and cluster.restarts.get("coordinator") == 2
    assert cluster.restarts.get("worker-1", 0) + cluster.restarts.get("node-1", 0) == 2, cluster.restarts
    assert same_weights(tmp_path / "dist", reference_export(tmp_path, cfg))


def test_a_deterministic_start_failure_ends_the_run(cache_dir, tmp_path):
    cfg = base_config(cache_dir, steps=1000)
    cluster = LocalCluster(cfg, tmp_path / "run")
    try:
        cluster.start()
        at_step(cluster, 1)
        state = Path(cluster.cfg.server.data_dir) / "state.json"
        state.write_bytes(b"{}")  # the data directory no longer says what it holds: the server refuses (exit 2)
        cluster.processes["paramserver"].kill(signal.SIGKILL)
        with pytest.raises(ServiceFailed) as err:
            cluster.wait()
        assert err.value.code == 2 and "state.json is damaged" in str(err.value)
        assert cluster.restarts == {"paramserver": 1}  # not retried: it would fail the same way
    finally:
        cluster.shutdown()


@pytest.mark.timeout(900)  # several runs and a reference on a busy 2-core host
def test_a_run_directory_holds_one_job_and_resuming_is_explicit(cache_dir, tmp_path):
    # update windows of 4, served bf16: the killed run's journal ends where it ends, inside a window three
    # times in four, so the resumed server recovers mid-window and the resumed coordinator reads the open
    # window's records
    cfg = write_config(tmp_path, cache_dir, train={"steps": 100_000, "batch_size": 8, "eval_every": 0},
                       server={"update_window": 4, "served_dtype": "bfloat16"})
    run = tmp_path / "run"
    # zoctl up killed outright (SIGKILL, the OOM killer): its services end by themselves
    up = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "up", "--config", str(cfg), "--run-dir", str(run)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(read_history(run).steps) >= 2 and (run / "cluster.json").is_file(), timeout=300,
                   what="2 steps logged")
        pids = list(json.loads((run / "cluster.json").read_text())["pids"].values())
        up.kill()
        up.wait()
        # a resume started at once never runs beside them: it waits for them to end, then counts the steps
        r = zoctl("up", "--config", str(cfg), "--run-dir", str(run), "--resume", "--steps", "1", timeout=300)
        assert not [p for p in pids if alive(p)], "services outlived their zoctl up"
    finally:
        up.kill()
    steps = [s["step"] for s in read_history(run).steps]
    assert steps == list(range(len(steps))), steps  # each step once: no second cluster appended to the log
    n = len(steps)
    assert r.returncode == 2 and f"is at step {n} and train.steps is 1: give --steps above {n}" in r.stderr, r.stderr
    journal = sorted((run / "server").glob("journal-*.log"))
    before = {p: p.read_bytes() for p in journal}
    for args, needle in ((["--seed", "1"], "train.seed is 0 there and 1 here"),
                         (["--model", "tiny-llama"], "model.source is 'tiny-opt' there and 'tiny-llama' here"),
                         (["--resume", "--seed", "1"], "train.seed is 0 there and 1 here"),
                         (["--resume", "--set", "data.template={text} Overall"], "data.template is '{text} It was' there"),
                         (["--resume", "--set", "train.max_consecutive_skips=3"], "train.max_consecutive_skips is 10 there"),
                         (["--resume", "--set", "server.update_window=2"], "server.update_window is 4 there and 2 here"),
                         ([], "pass --resume to continue it")):
        r = zoctl("up", "--config", str(cfg), "--run-dir", str(run), *args, timeout=300)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") <= 1, (args, r.stderr[-2000:])
    assert {p: p.read_bytes() for p in journal} == before  # the old run is untouched
    # resuming is explicit, may change what does not decide the weights (threads, timeouts), and continues the
    # same trajectory: 3 more steps equal a reference of them all
    more = zoctl("up", "--config", str(cfg), "--run-dir", str(run), "--resume", "--steps", str(n + 3), "--out",
                 str(tmp_path / "b"), "--set", "runtime.threads=2", "--set", "coordinator.heartbeat_timeout_s=20",
                 "--json")
    assert more.returncode == 0, more.stderr[-3000:]
    assert json.loads(more.stdout)["steps"] == n + 3
    assert [s["step"] for s in read_history(run).steps] == list(range(n + 3))
    total = JobConfig.from_yaml(cfg).with_overrides({"train.steps": n + 3})
    assert same_weights(tmp_path / "b", reference_export(tmp_path, total))
    # a coordinator of another job pointed at this data directory refuses to resume it
    other = total.with_overrides({"train.seed": 5, "server.data_dir": str(run / "server")})
    cluster = LocalCluster(other, tmp_path / "other-run")
    try:
        cluster.start()
        st = cluster.wait()
        assert st.state == "failed" and "holds the state of another job" in st.error and "train.seed" in st.error, st.error
    finally:
        cluster.shutdown()


@pytest.mark.timeout(900)  # several runs and a reference on a busy 2-core host
def test_the_whole_local_cluster_runs_over_mutual_tls(cache_dir, tmp_path):
    tls = make_tls(tmp_path)
    sec = {"tls_cert": str(tls["server"]), "tls_key": str(tls["server_key"]), "tls_ca": str(tls["ca"]), "mutual_tls": True}
    cfg = base_config(cache_dir, steps=4, security=sec, layout={"name": "pertp", "workers": 2})

    def check(cluster: LocalCluster) -> None:
        at_step(cluster, 1)
        st = zoctl("status", "--json", "--run-dir", str(cluster.run_dir))  # its record has the CA and client certificate
        assert st.returncode == 0 and json.loads(st.stdout)["state"] in ("running", "done"), st.stderr
        with grpc.insecure_channel(cluster.server_address) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.ParameterServerStub(ch).GetStatus(pb.StatusRequest(), timeout=3)
        ca_only = grpc.ssl_channel_credentials(root_certificates=tls["ca"].read_bytes())
        with grpc.secure_channel(cluster.server_address, ca_only) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.ParameterServerStub(ch).GetStatus(pb.StatusRequest(), timeout=3)  # no client certificate

    run_cluster(tmp_path, cfg, check)
    assert same_weights(tmp_path / "dist", reference_export(tmp_path, cfg))


@pytest.mark.timeout(900)  # several runs and a reference on a busy 2-core host
def test_clients_without_the_token_cannot_stall_a_live_run(cache_dir, tmp_path):
    # anonymous calls may hold their slots for 10 minutes: the run must finish while they still do
    cfg = base_config(cache_dir, steps=10, server={"fetch_timeout_s": 600.0})
    pool = cf.ThreadPoolExecutor(max_workers=80)
    cluster = LocalCluster(cfg, tmp_path / "run")
    ch = None
    waits: list = []
    try:
        cluster.start()
        at_step(cluster, 2)
        ch = grpc.insecure_channel(cluster.server_address)
        stub = pb_grpc.ParameterServerStub(ch)
        waits = [stub.WaitVersion.future(pb.WaitRequest(block=0, version=10**6), timeout=600) for _ in range(70)]
        follows = [pool.submit(lambda: list(stub.FollowJournal(pb.FollowRequest(from_step=0), timeout=600)))
                   for _ in range(70)]
        st = cluster.wait()
        assert st.state == "done", st.error
        assert sum(not w.done() for w in waits) == ANONYMOUS_SLOTS  # still holding theirs: the run did not wait
        for f in follows:
            with pytest.raises(grpc.RpcError) as err:
                f.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        cluster.export(tmp_path / "dist")
    finally:
        for w in waits:
            w.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        if ch is not None:
            ch.close()
        cluster.shutdown()
    assert same_weights(tmp_path / "dist", reference_export(tmp_path, cfg))


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
