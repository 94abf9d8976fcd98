"""zoctl up's local cluster under faults: one run with update windows that loses a worker, then the coordinator,
then the parameter server (each killed again while it restarts; the last two inside a window) keeps the
reference's weights, run log, evaluation and snapshot bit for bit; a service that refuses its input on restart
ends the run; a run directory holds one job and resuming is explicit (zoctl up itself SIGKILLed); rounds that
wait for an unreachable server. Mutual TLS and clients without the token are checked on the
shared running cluster (tests/test_control.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from coordinator.cluster.local import LocalCluster
from distzo.common.config import JobConfig
from distzo.common.locks import alive
from distzo.infra.procs import ServiceFailed
from distzo.run.runlog import read_history

from clusterhelpers import wait_until
from test_cluster import _safe_step, base_config, same_weights, write_config, zoctl, zoctl_here


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


WINDOW = 4


@pytest.mark.cluster
@pytest.mark.timeout(900)  # a run with six kills and a reference on a busy 2-core host
def test_killed_processes_are_replaced_and_the_weights_stay_the_references(cache_dir, tmp_path, references):
    """Update windows of 4, served bf16 (the forwards depend on which base they read), snapshots every 3 steps.
    Each victim killed, then its replacement killed again while it starts: a worker mid-step (step 2; its forwards
    go to the other), the coordinator paused inside a window (its successor resumes from the journal, the open
    window's records too), the parameter server paused inside a window (it recovers mid-window from a snapshot +
    the journal). The run trains until it is told to stop, so it cannot end before the last kill: paused a few
    steps after the last restart, its weights, evaluation, run log and snapshot are the reference's at that step,
    bit for bit. Then a data directory the restarted server refuses (exit 2) ends the run, not retried."""
    from paramserver.durability.snapshot import list_snapshots, load_snapshot_state
    from protos import coordinator_pb2 as cpb

    cfg = base_config(cache_dir, steps=100_000, layout={"name": "ddp", "workers": 2},
                      train={"eval_every": 0, "weight_decay": 0.01},
                      server={"update_window": WINDOW, "served_dtype": "bfloat16", "snapshot_every": 3})
    errors: list[BaseException] = []
    done = threading.Event()
    seen: dict = {}
    cluster = LocalCluster(cfg, tmp_path / "run")
    try:
        cluster.start()

        def control(method: str) -> None:  # from this thread: its own channel (wait() may renew the cluster's)
            from distzo.infra.coordclient import CoordinatorClient

            with CoordinatorClient(cluster.coordinator_address, cluster.creds) as c:
                c.call(method, cpb.ControlRequest(), timeout=60)

        def job_state() -> str:
            try:
                return cluster.status().state
            except Exception:  # noqa: BLE001 - the coordinator restarting
                return ""

        def paused_mid_window(after: int) -> int:
            """Pause between two steps whose journal does not end on a window boundary (pending records)."""
            while True:
                wait_until(lambda: _safe_step(cluster) >= after, timeout=300, what=f"step {after}")
                control("Pause")
                wait_until(lambda: job_state() == "paused", timeout=300, what="paused")
                at = _safe_step(cluster)
                if at % WINDOW:
                    return at
                control("Resume")
                after = at + 1

        def resumed() -> bool:
            try:
                control("Resume")
                return True
            except Exception:  # noqa: BLE001 - the coordinator may be reconnecting to the restarted server
                return False

        def attack() -> None:
            try:
                wait_until(lambda: _safe_step(cluster) >= 2, timeout=300, what="step 2")
                kill_twice(cluster, "worker-1", "gpuworker")  # mid-step: its forwards go to worker-0
                seen["coordinator"] = paused_mid_window(3)
                kill_twice(cluster, "coordinator", "coordinator")  # its successor resumes, unpaused
                seen["paramserver"] = paused_mid_window(seen["coordinator"] + 2)
                kill_twice(cluster, "paramserver", "paramserver")  # recovers mid-window: snapshot + journal
                wait_until(lambda: cluster.restarts.get("paramserver") == 2 and
                           (cluster.run_dir / "ready" / "paramserver.json").is_file(), timeout=300, what="the server back")
                wait_until(resumed, timeout=120, what="resumed")
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=attack, daemon=True).start()

        def pause_after_the_kills(st) -> None:  # noqa: ANN001 - called by wait(), which restarts what died
            if errors:
                raise _Paused  # the attack failed: reported below
            if st.state == "paused" and seen.get("pause"):
                seen["step"] = st.step
                raise _Paused  # out of wait(): it returns only when the run has ended
            if done.is_set() and st.state == "running" and "pause" not in seen:
                seen.setdefault("after", st.step)
                if st.step >= seen["after"] + 2:  # every process back, and the run moving again
                    cluster.stub().Pause(cpb.ControlRequest(), timeout=30, metadata=cluster.creds.call_metadata())
                    seen["pause"] = True

        with pytest.raises(_Paused):
            cluster.wait(pause_after_the_kills)
        assert not errors, errors
        step = seen["step"]
        assert cluster.restarts.get("paramserver") == 2 and cluster.restarts.get("coordinator") == 2, cluster.restarts
        assert cluster.restarts.get("worker-1", 0) + cluster.restarts.get("node-1", 0) == 2, cluster.restarts
        assert seen["coordinator"] % WINDOW and seen["paramserver"] % WINDOW, seen  # both killed inside a window
        st = cluster.status()
        assert st.resumed_from == seen["coordinator"]  # from the journal, the open window's records too
        # the restarted coordinator counts the whole run, not only its own part (issue 25): tokens and skips are the
        # reference's, its training time covers the run log's
        ref = references.get(cfg.with_overrides({"train.steps": step}))
        assert (st.train_tokens, st.skipped_steps) == (ref.summary["train_tokens"], ref.summary["skipped_steps"])
        assert st.train_seconds >= read_history(cluster.run_dir).elapsed_s > 0
        meta = cluster.creds.call_metadata()
        ev = cluster.stub().Eval(cpb.ControlRequest(), timeout=300, metadata=meta)
        snap_reply = cluster.stub().Snapshot(cpb.ControlRequest(), timeout=300, metadata=meta)
        cluster.export(tmp_path / "dist")

        # the same weights as an undisturbed run: the reference's after that many steps, bit for bit
        assert same_weights(tmp_path / "dist", ref.out)  # the export: the master plus the open window
        assert ev.step == step and (ev.dev_loss, ev.dev_accuracy) == (ref.summary["dev_loss"], ref.summary["dev_accuracy"])
        # the run log covers the whole run, before and after the restarts, with the reference's numbers
        dist, want = read_history(tmp_path / "run"), read_history(ref.run_dir)
        assert [r["step"] for r in dist.steps] == list(range(step))
        assert [(r["loss"], r["g"], r["lr"]) for r in dist.steps] == [(r["loss"], r["g"], r["lr"]) for r in want.steps]
        assert [(e["step"], e["dev_loss"], e["dev_accuracy"]) for e in dist.evals] == \
            [(e["step"], e["dev_loss"], e["dev_accuracy"]) for e in want.evals]
        # the snapshot taken now holds the reference's weights at that step, bitwise
        assert "snapshot at version" in snap_reply.message, snap_reply
        (snap,) = [s for s in list_snapshots(cluster.run_dir / "server") if s.version == step]
        tr = ref.trainer
        blocks, _ = load_snapshot_state(snap, snap.meta["manifest_sha256"], None, None)
        for spec, buf in zip(tr.model.manifest.blocks, tr.buffers):
            assert np.array_equal(blocks[spec.index].view(np.uint32), buf.numpy().view(np.uint32)), spec.name

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


class _Paused(Exception):
    """Ends LocalCluster.wait() once the run is paused (wait() itself returns only when the run has ended)."""


@pytest.mark.cluster
@pytest.mark.timeout(900)  # several runs and a reference on a busy 2-core host
def test_a_run_directory_holds_one_job_and_resuming_is_explicit(cache_dir, tmp_path, references):
    # update windows of 4, served bf16: the killed run's journal ends where it ends, inside a window three
    # times in four, so the resumed server recovers mid-window and the resumed coordinator reads the open
    # window's records
    cfg = write_config(tmp_path, cache_dir, train={"steps": 100_000, "batch_size": 8, "eval_every": 0},
                       server={"update_window": 4, "served_dtype": "bfloat16"})
    run = tmp_path / "run"
    # zoctl up killed outright (SIGKILL, the OOM killer): its services end by themselves
    up = subprocess.Popen([sys.executable, "-m", "coordinator.zoctl.cli", "up", "--config", str(cfg), "--run-dir", str(run)],
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
                         ([], "pass --resume to continue it")):  # refusals: zoctl's main() in this process
        r = zoctl_here("up", "--config", str(cfg), "--run-dir", str(run), *args)
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
    assert same_weights(tmp_path / "b", references.get(total).out)
    # a coordinator of another job pointed at this data directory refuses to resume it
    other = total.with_overrides({"train.seed": 5, "server.data_dir": str(run / "server")})
    cluster = LocalCluster(other, tmp_path / "other-run")
    try:
        cluster.start()
        st = cluster.wait()
        assert st.state == "failed" and "holds the state of another job" in st.error and "train.seed" in st.error, st.error
    finally:
        cluster.shutdown()


def _one_forward_round(server_timeout_s: float):
    import torch

    from coordinator.registry import Registry
    from coordinator.rounds import Round
    from distzo.common.configsections import CoordinatorSection
    from distzo.data.tasks import Batch
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
    assert rnd.done() and (rnd.results["k"].loss_sum, rnd.results["k"].label_tokens) == (2.5, 2)
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
