"""The coordinator and zoctl up: exactness for every layout, job control, faults, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from distzo.config import JobConfig
from distzo.runlog import read_history
from coordinator.local import LocalCluster

from clusterhelpers import wait_until


def write_config(tmp: Path, cache_dir: str, **sections) -> Path:
    raw = {"runtime": {"cache_dir": cache_dir}, "data": {"dev_examples": 32}, "train": {"batch_size": 8}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    p = tmp / "job.yaml"
    p.write_text(JobConfig.from_dict(raw).to_yaml())
    return p


def zoctl(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return sorted(x) == sorted(y) and all(np.array_equal(x[k].view(np.uint32), y[k].view(np.uint32)) for k in x)


def assert_up_equals_reference(tmp_path, flags: list[str], same=same_weights) -> None:  # noqa: ANN001
    """``zoctl up`` and ``zoctl reference`` with ``flags`` export the same bits (``same``) and report the same."""
    up = zoctl("up", *flags, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "dist"))
    assert up.returncode == 0, up.stderr[-3000:]
    ref = zoctl("reference", *flags, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert same(tmp_path / "dist", tmp_path / "ref")
    a, b = json.loads(up.stdout), json.loads(ref.stdout)
    for key in ("final_loss", "dev_loss", "dev_accuracy", "train_tokens"):
        assert a[key] == b[key], key


def our_processes(run_dir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(run_dir) in part for part in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.parametrize("layout,workers,q", [("dual", 1, 1), ("pertp", 2, 1), ("ddp", 2, 1), ("2d", 4, 1), ("dual", 2, 2)])
def test_distributed_run_equals_the_reference_bitwise(cache_dir, tmp_path, layout, workers, q):
    cfg = write_config(tmp_path, cache_dir, train={"steps": 6, "batch_size": 8, "weight_decay": 0.01})
    flags = ["--config", str(cfg), "--layout", layout, "--workers", str(workers), "--q", str(q), "--json"]
    up = zoctl("up", *flags, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "dist"))
    assert up.returncode == 0, up.stderr[-3000:]
    ref = zoctl("reference", *flags, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = json.loads(up.stdout), json.loads(ref.stdout)
    assert same_weights(tmp_path / "dist", tmp_path / "ref")
    assert set(b) - {"mode"} <= set(a)  # the same summary keys as the reference
    for key in ("final_loss", "dev_loss", "dev_accuracy", "steps", "train_tokens"):
        assert a[key] == b[key], key
    assert not our_processes(tmp_path / "run")  # nothing left running


def run_cluster(tmp_path: Path, cfg: JobConfig, during=None) -> tuple[LocalCluster, object]:  # noqa: ANN001
    cluster = LocalCluster(cfg, tmp_path / "run")
    try:
        cluster.start()
        if during is not None:
            during(cluster)
        st = cluster.wait()
        assert st.state == "done", st.error
        cluster.export(tmp_path / "dist")
        return cluster, st
    finally:
        cluster.shutdown()


def reference_export(tmp_path: Path, cfg: JobConfig) -> Path:
    """The reference's export (tmp/ref), with its run log in tmp/ref-run."""
    return reference_run(tmp_path, cfg)[0]


def reference_run(tmp_path: Path, cfg: JobConfig) -> tuple[Path, dict]:
    """The reference's export (tmp/ref) and its summary, with its run log in tmp/ref-run."""
    from distzo.reference import ReferenceTrainer

    summary = ReferenceTrainer(cfg).train(out_dir=tmp_path / "ref", progress=False, run_dir=tmp_path / "ref-run")
    return tmp_path / "ref", summary


def base_config(cache_dir: str, steps: int = 12, **sections) -> JobConfig:
    raw = {"runtime": {"cache_dir": cache_dir}, "data": {"dev_examples": 16},
           "train": {"batch_size": 8, "steps": steps}, "server": {"snapshot_every": 4},
           "coordinator": {"heartbeat_timeout_s": 5.0}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return JobConfig.from_dict(raw)


def at_step(cluster: LocalCluster, n: int) -> None:
    wait_until(lambda: _safe_step(cluster) >= n, timeout=180, what=f"step {n}")


def _safe_step(cluster: LocalCluster) -> int:
    try:
        return cluster.status().step
    except Exception:  # noqa: BLE001 - coordinator restarting
        return -1


def test_pause_and_resume_give_the_same_weights(cache_dir, tmp_path):
    cfg = base_config(cache_dir)

    def pause_resume(cluster: LocalCluster) -> None:
        from protos import coordinator_pb2 as cpb

        at_step(cluster, 3)
        reply = cluster.stub().Pause(cpb.ControlRequest(), timeout=60, metadata=cluster.creds.call_metadata())
        # the reply is the state after the command, with the workers (issue 25: it was the state before, no workers)
        assert reply.state == "paused" and [w.pid for w in reply.workers] == [cluster.processes["worker-0"].pid], reply
        step = cluster.status().step
        time.sleep(1.0)
        assert cluster.status().step == step  # nothing moves while paused
        ev = cluster.stub().Eval(cpb.ControlRequest(), timeout=120, metadata=cluster.creds.call_metadata())
        assert ev.step == step and 0 <= ev.dev_accuracy <= 1
        # the only worker is lost while paused, and the job is resumed before its replacement registers
        # (it is restarted only once cluster.wait() supervises): the job waits for it instead of failing
        cluster.processes["worker-0"].kill(signal.SIGKILL)
        wait_until(lambda: [w.state for w in cluster.status().workers] == ["lost"], what="worker-0 lost")
        reply = cluster.stub().Resume(cpb.ControlRequest(), timeout=60, metadata=cluster.creds.call_metadata())
        assert reply.state == "running" and [w.state for w in reply.workers] == ["lost"], reply

    cluster, _ = run_cluster(tmp_path, cfg, pause_resume)
    assert cluster.restarts == {"worker-0": 1}
    assert same_weights(tmp_path / "dist", reference_export(tmp_path, cfg))


@pytest.mark.parametrize("victim", ["worker-1", "coordinator", "paramserver"])
def test_a_killed_process_is_replaced_and_the_weights_do_not_change(cache_dir, tmp_path, victim):
    cfg = base_config(cache_dir, layout={"name": "ddp", "workers": 2})

    def kill(cluster: LocalCluster) -> None:
        at_step(cluster, 4)
        cluster.processes[victim].kill(signal.SIGKILL)

    cluster, st = run_cluster(tmp_path, cfg, kill)
    assert cluster.restarts == {victim: 1}
    if victim == "coordinator":
        assert st.resumed_from >= 4  # picked up from the parameter server's journal
    ref_dir, ref_summary = reference_run(tmp_path, cfg)
    assert same_weights(tmp_path / "dist", ref_dir)
    # every figure of the summary is the undisturbed run's: tokens, losses, evaluations, whole-run times
    # (issue 25, kind 2: a restarted coordinator counted only what it had done itself)
    from coordinator.cli import run_summary

    summary = run_summary(cluster, st, tmp_path / "run", str(tmp_path / "dist"), 0.0)
    timing = {"mode", "wall_seconds", "tokens_per_second", "out_dir", "step_log", "eval_log", "report"}
    assert {k: v for k, v in summary.items() if k in set(ref_summary) - timing} == \
        {k: v for k, v in ref_summary.items() if k not in timing}
    assert summary["resumed_from"] == 0 and summary["restarts"] == {victim: 1}
    assert st.train_seconds >= read_history(tmp_path / "run").elapsed_s > 0  # the run's training time, not the last part
    # the run log covers the whole run, before and after the restart, with the reference's numbers
    dist, ref = read_history(tmp_path / "run"), read_history(tmp_path / "ref-run")
    assert [r["step"] for r in dist.steps] == list(range(cfg.train.steps))
    assert [(r["loss"], r["g"], r["lr"]) for r in dist.steps] == [(r["loss"], r["g"], r["lr"]) for r in ref.steps]
    assert [e["step"] for e in dist.evals] == [0, cfg.train.steps]
    assert [e["dev_accuracy"] for e in dist.evals] == [e["dev_accuracy"] for e in ref.evals]


def test_zoctl_up_with_defaults_short_variant(tmp_path):
    """`zoctl up` as a new user runs it (own HOME, shipped preset and data), just fewer steps."""
    env = {"HOME": str(tmp_path / "home")}
    r = zoctl("up", "--steps", "5", "--json", "--run-dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["steps"] == 5 and s["mode"] == "distributed" and s["tokens_per_second"] > 0
    assert (Path(s["out_dir"]) / "model.safetensors").is_file()
    assert "training" in r.stderr or "step" in r.stderr  # progress was shown
    assert not our_processes(tmp_path / "run")
    # the end of a run: the starting and final loss, every evaluation, where the logs and the plot are
    assert s["state"] == "done" and np.isfinite(s["start_loss"]) and np.isfinite(s["final_loss"])
    assert [e["step"] for e in s["eval_history"]] == [0, 5]
    assert s["eval_history"][-1]["dev_accuracy"] == s["dev_accuracy"]
    assert all(Path(s[k]).is_file() for k in ("step_log", "eval_log", "report"))
    assert "1 worker)" in r.stderr, r.stderr  # counted, not "1 workers"
    assert (tmp_path / "run" / "logs" / "coordinator.log").is_file()
    logs = "".join(f.read_text() for f in (tmp_path / "run" / "logs").glob("*.log"))
    assert "worker lost" not in logs, logs  # a normal shutdown is not a lost worker (a warning, logged by default)


def test_zoctl_up_stopped_by_zoctl_stop_exports_and_reports_what_it_trained(cache_dir, tmp_path):
    run = tmp_path / "run"
    # ends only by `zoctl stop`; its two workers are one node group, formed through a rendezvous file (no port race)
    cfg = write_config(tmp_path, cache_dir, train={"steps": 100_000, "eval_every": 0},
                       layout={"name": "ddp", "workers": 2, "node_size": 2})
    up = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "up", "--config", str(cfg), "--run-dir", str(run),
                           "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (run / "steps.jsonl").is_file() and len((run / "steps.jsonl").read_text().splitlines()) >= 3,
                   timeout=300, what="3 steps logged")
        stop = zoctl("stop", "--run-dir", str(run))
        assert stop.returncode == 0, stop.stderr
        out, err = up.communicate(timeout=300)
    finally:
        up.kill()
    assert up.returncode == 0, err[-3000:]
    s = json.loads(out)
    assert s["state"] == "stopped" and 3 <= s["steps"] < 100_000
    assert f"training stopped at step {s['steps']} of 100000" in err
    assert [e["step"] for e in s["eval_history"]] == [0]  # stopped: no final evaluation ...
    assert s["dev_accuracy"] is None and s["dev_loss"] is None  # ... so no dev figures, not step 0's passed off as final
    assert (Path(s["out_dir"]) / "model.safetensors").is_file() and Path(s["report"]).is_file()
    card = (Path(s["out_dir"]) / "README.md").read_text()  # the model card: no step-0 figures as the end result
    assert "| dev loss at the end | n/a |" in card and "| dev accuracy at the end | n/a |" in card, card
    assert [f.name.startswith("node-0-") for f in (run / "rendezvous").iterdir()] == [True]
    gone = zoctl("status", "--run-dir", str(run))  # the hint names commands that work on a run that has ended
    assert gone.returncode == 3 and f"`zoctl report {run}`" in gone.stderr and "--resume" in gone.stderr, gone.stderr


def test_zoctl_status_and_control_of_a_running_cluster(cache_dir, tmp_path):
    cfg = base_config(cache_dir, steps=100_000)  # never ends by itself, however slow the zoctl calls are: stopped below
    cluster = LocalCluster(cfg, tmp_path / "run")
    try:
        cluster.start()
        at_step(cluster, 2)
        target = ["--coordinator", cluster.coordinator_address, "--token-file", str(cluster.cfg.security.token_file)]
        st = zoctl("status", "--json", "--run-dir", str(tmp_path / "run"))  # found by its run directory, token included
        assert st.returncode == 0, st.stderr
        assert f"zoctl: coordinator {cluster.coordinator_address} (the local cluster of {tmp_path / 'run'})" in st.stderr
        doc = json.loads(st.stdout)
        worker_port = cluster.metrics_endpoints()["worker-0"].rsplit(":", 1)[1].split("/")[0]
        probe = subprocess.run([sys.executable, "-m", "gpuworker.probe", "--port", worker_port], capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr  # the pod's readiness probe: worker 0 has its session and job
        assert doc["state"] in ("running", "paused") and doc["workers"][0]["pid"] == cluster.processes["worker-0"].pid
        assert isinstance(doc["step"], int) and isinstance(doc["total_steps"], int)  # int64 as numbers, not text
        paused = zoctl("pause", *target)  # says the state after the command, and lists the workers (issue 25)
        assert paused.returncode == 0 and "job: paused" in paused.stdout, paused.stdout
        assert str(cluster.processes["worker-0"].pid) in paused.stdout.splitlines()[-1], paused.stdout
        snap = zoctl("snapshot", *target)
        assert snap.returncode == 0 and "snapshot at version" in snap.stdout
        exp = zoctl("export", str(tmp_path / "mid"), *target)
        assert exp.returncode == 0 and (tmp_path / "mid" / "config.json").is_file()
        card = (tmp_path / "mid" / "README.md").read_text()  # the model card, from the coordinator's job
        assert "Fine-tuned by distzo (distributed) with MeZO-SGD from **tiny-opt**" in card, card
        assert "| dev accuracy before training (step 0) | 0." in card and "| batch size | 8 |" in card, card
        no_token = zoctl("pause", "--coordinator", cluster.coordinator_address)
        assert no_token.returncode == 2 and "bearer token" in no_token.stderr
        resumed = zoctl("resume", *target)
        assert resumed.returncode == 0 and "job: running" in resumed.stdout, resumed.stdout
        assert zoctl("stop", *target).returncode == 0
        assert cluster.status().state == "stopped"
    finally:
        cluster.shutdown()
    gone = zoctl("status", "--coordinator", cluster.coordinator_address)
    assert gone.returncode == 3 and "cannot reach the coordinator" in gone.stderr
    assert not (tmp_path / "run" / "cluster.json").exists()  # a stopped cluster is no longer announced
    gone = zoctl("status", "--run-dir", str(tmp_path / "run"))
    assert gone.returncode == 3 and "no local cluster is running in" in gone.stderr, gone.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", "smollm2"], "expected a preset or fetched model (tiny-opt, "),  # the valid names, and the close one
        (["--model", "smollm2"], "did you mean 'smollm2-135m'?"),
        (["--data", "rotten_tomatoes"], "expected a task (sst2-synth, rotten-tomatoes) or a JSONL file; did you mean 'rotten-tomatoes'?"),
        (["--layout", "dual", "--workers", "2"], "uses exactly 1 worker, got 2"),
        (["--steps", "-3"], "train.steps"),
    ],
)
def test_zoctl_up_bad_input_starts_nothing(cache_dir, tmp_path, args, needle):
    cfg = write_config(tmp_path, cache_dir)
    r = zoctl("up", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), *args, timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2  # one clear message, no traceback
    assert not (tmp_path / "run").exists()


def test_zoctl_up_on_gpus_this_machine_does_not_have_is_refused(cache_dir, tmp_path):
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:  # CPU machines (CI): any cuda run is refused
        cfg, needle = write_config(tmp_path, cache_dir, runtime={"device": "cuda"}), "no CUDA device is visible"
    else:  # a node group wants one GPU per rank
        cfg = write_config(tmp_path, cache_dir, runtime={"device": "cuda"},
                           layout={"name": "ddp", "workers": 4 * gpus, "node_size": 2 * gpus})
        needle = "needs one GPU per rank"
    r = zoctl("up", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2
    assert not (tmp_path / "run").exists()


def test_zoctl_up_refuses_a_model_that_is_not_a_causal_lm(cache_dir, tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    cfg = write_config(tmp_path, cache_dir)
    r = zoctl("up", "--config", str(cfg), "--model", str(tmp_path / "bert"), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and "not a decoder-only causal LM" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_zoctl_up_bad_data_and_bad_config_files(cache_dir, tmp_path):
    cfg = write_config(tmp_path, cache_dir)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n{"text": "broken", "label"\n')
    r = zoctl("up", "--config", str(cfg), "--data", str(data), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and f"{data}:2: not valid JSON" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    r = zoctl("up", "--config", str(bad), timeout=60)
    assert r.returncode == 2 and "not valid YAML" in r.stderr


def test_late_and_duplicate_reports_are_ignored_and_counted():
    from coordinator.registry import Registry
    from coordinator.rounds import Round
    from distzo.config import CoordinatorSection
    from distzo.data import Batch
    from protos import coordinator_pb2 as cpb
    import threading

    import torch

    reg = Registry()
    a = reg.register(cpb.WorkerHello(worker_id="a", node_size=1))
    b = reg.register(cpb.WorkerHello(worker_id="b", node_size=1))
    for w in (a, b):
        reg.heartbeat(w, ready=True)
    batch = Batch(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -100))
    fw = {("k", s): cpb.ForwardSpec(shard=0, sign=s, seed=1, coef=s * 1e-3) for s in (1, -1)}
    rnd = Round(reg, CoordinatorSection(heartbeat_timeout_s=60), step=3, version=3, kind="train", forwards=fw,
                batches={0: batch}, stopping=threading.Event())
    rnd.start([[("k", 1)], [("k", -1)]])
    sent_a = a.outbox.get_nowait().assignment
    sent_b = b.outbox.get_nowait().assignment
    ok = cpb.WorkResult(assignment_id=sent_a.assignment_id, step=3,
                        results=[cpb.ForwardResult(spec=sent_a.forwards[0], loss=1.5)])
    assert rnd.on_result(a, ok)
    assert not rnd.on_result(a, ok)  # duplicate
    assert not rnd.on_result(a, cpb.WorkResult(assignment_id=999, step=2))  # an old step
    assert rnd.late == 2
    # worker b is lost: its forward goes to a, and b's late answer is ignored
    reg.lose(b, "test")
    waiter = threading.Thread(target=rnd.wait)
    waiter.start()
    re = None
    deadline = time.monotonic() + 10
    while re is None and time.monotonic() < deadline:
        msg = a.outbox.get(timeout=10)
        re = msg.assignment if msg is not None and msg.HasField("assignment") else None
    assert re is not None and [f.sign for f in re.forwards] == [-1]
    assert not rnd.on_result(b, cpb.WorkResult(assignment_id=sent_b.assignment_id, step=3,
                                               results=[cpb.ForwardResult(spec=sent_b.forwards[0], loss=9.9)]))
    assert rnd.on_result(a, cpb.WorkResult(assignment_id=re.assignment_id, step=3,
                                           results=[cpb.ForwardResult(spec=re.forwards[0], loss=2.5, loss_sum=5.0,
                                                                      label_tokens=2)]))
    waiter.join(timeout=10)
    assert rnd.done() and rnd.loss(("k", -1)) == (5.0, 2) and rnd.reassignments == 1 and rnd.late == 3


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_round_with_no_live_worker_waits_for_a_replacement(kind, caplog):
    """A worker lost at any moment (paused, between steps, evaluating, mid-round) never fails the job: the
    round waits for a replacement to register, bounded by coordinator.assignment_timeout_s."""
    from coordinator.registry import Registry
    from coordinator.rounds import Round, RoundFailed
    from distzo.config import CoordinatorSection
    from distzo.data import Batch
    from protos import coordinator_pb2 as cpb
    import threading

    import torch

    batch = Batch(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), torch.full((1, 3), -100))
    fw = {("k", s): cpb.ForwardSpec(shard=0, sign=s, seed=1, coef=s * 1e-3) for s in ((1, -1) if kind == "train" else (0,))}

    def new_round(reg, **policy) -> Round:  # noqa: ANN001
        return Round(reg, CoordinatorSection(heartbeat_timeout_s=60, **policy), step=3, version=3, kind=kind, forwards=fw,
                     batches={0: batch}, stopping=threading.Event())

    def answer(w, rnd) -> None:  # noqa: ANN001 - the worker runs what it was sent
        msg = w.outbox.get(timeout=30)
        while not msg.HasField("assignment"):
            msg = w.outbox.get(timeout=30)
        a = msg.assignment
        rnd.on_result(w, cpb.WorkResult(assignment_id=a.assignment_id, step=3, results=[
            cpb.ForwardResult(spec=f, loss=1.0, loss_sum=2.0, label_tokens=2) for f in a.forwards]))

    reg = Registry()
    old = reg.register(cpb.WorkerHello(worker_id="w", node_size=1))
    reg.heartbeat(old, ready=True)
    reg.lose(old, "killed while the job was paused")
    rnd = new_round(reg)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rnd.start([list(fw)])
            rnd.wait()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: errors or "waiting for one to register" in caplog.text, what="the round to wait for a worker")
    assert t.is_alive() and not errors, errors  # waiting, not failed
    new = reg.register(cpb.WorkerHello(worker_id="w", node_size=1))  # the supervisor's replacement registers
    reg.heartbeat(new, ready=True)
    answer(new, rnd)
    t.join(timeout=30)
    assert not errors and rnd.done() and set(rnd.results) == set(fw), errors
    # lost mid-round with no other worker: its forwards wait for the next one too
    rnd = new_round(reg)
    t = threading.Thread(target=run)
    t.start()
    first = new.outbox.get(timeout=30).assignment
    assert first.assignment_id
    reg.lose(new, "killed mid-round")
    third = reg.register(cpb.WorkerHello(worker_id="w", node_size=1))
    reg.heartbeat(third, ready=True)
    answer(third, rnd)
    t.join(timeout=30)
    assert not errors and rnd.done(), errors
    # but not forever: no worker within the assignment timeout fails the round, saying why
    reg.lose(third, "gone for good")
    rnd = new_round(reg, assignment_timeout_s=0.5)
    with pytest.raises(RoundFailed, match=r"no live worker for 0.5s \(coordinator.assignment_timeout_s\)"):
        rnd.start([list(fw)])
