"""zoctl up's helpers for the cluster tests, and what zoctl up refuses before it starts anything; rounds.

The bitwise runs (every layout, optimizer, target, objective, distribution, served dtype) are in
tests/test_matrix.py, job control of a running cluster in tests/test_control.py, faults in
tests/test_cluster_faults.py (tests/README.md: where each earlier test went)."""

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

from coordinator.cluster.local import LocalCluster
from distzo.common.config import JobConfig

from clusterhelpers import wait_until


def write_config(tmp: Path, cache_dir: str, **sections) -> Path:
    raw = {"runtime": {"cache_dir": cache_dir}, "data": {"dev_examples": 32}, "train": {"batch_size": 8}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    p = tmp / "job.yaml"
    p.write_text(JobConfig.from_dict(raw).to_yaml())
    return p


def zoctl(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.zoctl.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def zoctl_here(*args: str, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """zoctl's ``main`` in this process, its exit code and output as ``zoctl()`` returns them (no interpreter start,
    torch already imported: for the many refusals; every command keeps a subprocess check of its own).

    Restores what ``main`` changes in the process: the root logger's handlers, the SIGTERM handler, ``env``.
    ``timeout``: accepted for ``zoctl``'s signature (pytest-timeout bounds the test)."""
    import contextlib
    import io
    import logging
    import signal

    from coordinator.zoctl.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, sigterm = root.handlers[:], root.level, signal.getsignal(signal.SIGTERM)
    saved = {k: os.environ.get(k) for k in env or {}}
    try:
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(["zoctl", *args], code, out.getvalue(), err.getvalue())


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
    from distzo.train.reference import ReferenceTrainer

    ReferenceTrainer(cfg).train(out_dir=tmp_path / "ref", progress=False, run_dir=tmp_path / "ref-run")
    return tmp_path / "ref"


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


@pytest.mark.cluster
def test_pause_and_resume_give_the_same_weights_also_when_the_only_worker_is_lost_while_paused(cache_dir, tmp_path,
                                                                                                  references):
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
    assert same_weights(tmp_path / "dist", references.get(cfg).out)


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
    call = zoctl if args == ["--model", "/nonexistent/model"] else zoctl_here  # one through the process, the rest main()
    r = call("up", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), *args)
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
    r = zoctl_here("up", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert r.stderr.count("\n") <= 2
    assert not (tmp_path / "run").exists()


def test_zoctl_up_refuses_a_model_that_is_not_a_causal_lm(cache_dir, tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    cfg = write_config(tmp_path, cache_dir)
    r = zoctl_here("up", "--config", str(cfg), "--model", str(tmp_path / "bert"), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "not a decoder-only causal LM" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_zoctl_up_bad_data_and_bad_config_files(cache_dir, tmp_path):
    cfg = write_config(tmp_path, cache_dir)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n{"text": "broken", "label"\n')
    r = zoctl_here("up", "--config", str(cfg), "--data", str(data), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and f"{data}:2: not valid JSON" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    r = zoctl("up", "--config", str(bad), timeout=60)
    assert r.returncode == 2 and "not valid YAML" in r.stderr


@pytest.mark.parametrize("layout,workers,q", [("pertp", 2, 1), ("2d", 4, 1), ("pertp", 4, 2)])
def test_pertp_sends_each_sign_of_a_shard_to_its_own_worker(layout, workers, q):
    """The coordinator's round: with PertP, worker 2k computes l+ and worker 2k+1 l- of the same direction and
    shard, one forward each (the results would be the same if one worker did both: only this sees it)."""
    from coordinator.roundplan import round_spec
    from distzo.train.plan import StepPlan
    from distzo.train.precision import job_precision

    cfg = JobConfig.from_dict({"layout": {"name": layout, "workers": workers, "q": q}, "train": {"batch_size": 8}})
    plan = StepPlan(3, tuple(range(100, 100 + q)), tuple(range(8)), 1e-3)
    forwards, pieces = round_spec(cfg, plan)
    assert len(pieces) == workers and all(len(p) == 1 for p in pieces)
    for plus, minus in zip(pieces[0::2], pieces[1::2]):
        (j, d, s), (j2, d2, s2) = plus[0], minus[0]
        assert (j, d) == (j2, d2) and (s, s2) == (1, -1)
        assert forwards[plus[0]].coef == -forwards[minus[0]].coef == job_precision(cfg).eps  # the target's default
    assert sorted(k for p in pieces for k in p) == sorted(forwards)


def test_late_and_duplicate_reports_are_ignored_and_counted():
    from coordinator.registry import Registry
    from coordinator.rounds import Round
    from distzo.common.configsections import CoordinatorSection
    from distzo.data.tasks import Batch
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
    got = rnd.results[("k", -1)]
    assert rnd.done() and (got.loss_sum, got.label_tokens) == (5.0, 2) and rnd.reassignments == 1 and rnd.late == 3


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_a_round_with_no_live_worker_waits_for_a_replacement(kind, caplog):
    """A worker lost at any moment (paused, between steps, evaluating, mid-round) never fails the job: the
    round waits for a replacement to register, bounded by coordinator.assignment_timeout_s."""
    from coordinator.registry import Registry
    from coordinator.rounds import Round, RoundFailed
    from distzo.common.configsections import CoordinatorSection
    from distzo.data.tasks import Batch
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
