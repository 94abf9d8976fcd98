"""One running local cluster (``zoctl up``, over mutual TLS) shared by the control and observation tests: status,
the readiness probe, pause / eval / snapshot / export / resume (and the weights are the reference's), clients
without the token, a real Prometheus, and last `zoctl stop` (what was trained is exported and reported).

The cluster is module-scoped and trains until stopped (100,000 steps). Every test asks for it through ``live``,
which starts it again when it is not running (a test that stops it, run first or alone, leaves the next a fresh
one): no test depends on another's order. The destructive test (stop) is the last in the file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from clusterhelpers import wait_until
from pshelpers import make_tls
from test_cluster import our_processes, same_weights, write_config, zoctl

pytestmark = pytest.mark.cluster

STEPS = 100_000  # never ends by itself, however slow the calls below are


@dataclass
class Live:
    proc: subprocess.Popen
    run: Path
    tmp: Path
    cfg_path: Path
    tls: dict
    result: tuple[int, str, str] | None = None  # zoctl up's exit code, stdout and stderr, once it has ended

    @property
    def info(self) -> dict:
        return json.loads((self.run / "cluster.json").read_text())

    @property
    def coordinator(self) -> str:
        return self.info["coordinator"]

    def target(self, token: bool = True) -> list[str]:
        """zoctl flags naming this cluster by address, with the TLS client material (and the token)."""
        flags = ["--coordinator", self.coordinator, "--tls-ca", str(self.tls["ca"]), "--tls-cert", str(self.tls["client"]),
                 "--tls-key", str(self.tls["client_key"])]
        return flags + (["--token-file", str(self.run / "token")] if token else [])

    def client(self):  # noqa: ANN201 - a CoordinatorClient with the token, over mutual TLS
        from distzo.infra.coordclient import CoordinatorClient
        from distzo.infra.rpc import Credentials

        return CoordinatorClient(self.coordinator, Credentials.for_client(
            str(self.run / "token"), str(self.tls["ca"]), str(self.tls["client"]), str(self.tls["client_key"])))

    def status(self):  # noqa: ANN201
        with self.client() as c:
            return c.status()

    def step(self) -> int:
        try:
            return self.status().step
        except grpc.RpcError:
            return -1

    def running(self) -> bool:
        return self.proc.poll() is None and (self.run / "cluster.json").is_file()


def start(tmp: Path, cache_dir: str) -> Live:
    tls = make_tls(tmp)
    cfg = write_config(tmp, cache_dir, train={"steps": STEPS, "eval_every": 0, "batch_size": 8}, data={"dev_examples": 16},
                       # two workers as one node group, formed through a rendezvous file (no port race)
                       layout={"name": "ddp", "workers": 2, "node_size": 2},
                       # anonymous calls may hold their slots for 10 minutes (test_clients_without_the_token_...)
                       server={"snapshot_every": 4, "fetch_timeout_s": 600.0},
                       security={"tls_cert": str(tls["server"]), "tls_key": str(tls["server_key"]), "tls_ca": str(tls["ca"]),
                                 "mutual_tls": True})
    run = tmp / "run"
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.zoctl.cli", "up", "--config", str(cfg), "--run-dir", str(run),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = Live(proc, run, tmp, cfg, tls)
    wait_until(lambda: (run / "cluster.json").is_file() or proc.poll() is not None, timeout=300, what="the cluster up")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    wait_until(lambda: live.step() >= 2, timeout=300, what="step 2")
    return live


def stop(live: Live) -> tuple[int, str, str]:
    """`zoctl stop`, and zoctl up's exit code, stdout and stderr."""
    if live.result is None:
        try:
            if live.proc.poll() is None:
                zoctl("stop", *live.target(), timeout=120)
            out, err = live.proc.communicate(timeout=300)
        finally:
            live.proc.kill()
        live.result = (live.proc.returncode, out, err)
    return live.result


@pytest.fixture(scope="module")
def cluster_holder(tmp_path_factory, cache_dir):
    holder: dict = {}
    yield holder, tmp_path_factory, cache_dir
    if "live" in holder:
        stop(holder["live"])


@pytest.fixture
def live(cluster_holder) -> Live:
    """The module's running cluster (started again if a test stopped it), running (resumed if a test paused it)."""
    holder, factory, cache_dir = cluster_holder
    current = holder.get("live")
    if current is None or not current.running():
        if current is not None:
            stop(current)
        holder["live"] = current = start(factory.mktemp("live"), cache_dir)
    if current.status().state == "paused":
        assert zoctl("resume", *current.target()).returncode == 0
    wait_until(lambda: current.status().state == "running", what="running")
    return current


def test_status_finds_the_cluster_by_its_run_directory_over_mutual_tls(live):
    st = zoctl("status", "--json", "--run-dir", str(live.run))  # found by its run directory, token and TLS included
    assert st.returncode == 0, st.stderr
    assert f"zoctl: coordinator {live.coordinator} (the local cluster of {live.run})" in st.stderr
    doc = json.loads(st.stdout)
    assert doc["state"] in ("running", "paused") and doc["workers"][0]["pid"] == live.info["pids"]["worker-0"]
    assert isinstance(doc["step"], int) and isinstance(doc["total_steps"], int)  # int64 as numbers, not text
    worker_port = live.info["metrics"]["worker-0"].rsplit(":", 1)[1].split("/")[0]
    probe = subprocess.run([sys.executable, "-m", "gpuworker.probe", "--port", worker_port], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr  # the pod's readiness probe: worker 0 has its session and job
    # its two workers are one node group, formed through one rendezvous file
    assert [f.name.startswith("node-0-") for f in (live.run / "rendezvous").iterdir()] == [True]
    # every channel is mutual TLS: no plain channel, no channel without a client certificate
    from protos import paramserver_pb2 as pb
    from protos import paramserver_pb2_grpc as pb_grpc

    server = live.info["param_servers"][0]
    with grpc.insecure_channel(server) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.ParameterServerStub(ch).GetStatus(pb.StatusRequest(), timeout=3)
    ca_only = grpc.ssl_channel_credentials(root_certificates=live.tls["ca"].read_bytes())
    with grpc.secure_channel(server, ca_only) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.ParameterServerStub(ch).GetStatus(pb.StatusRequest(), timeout=3)  # no client certificate


def test_pause_eval_snapshot_export_resume_and_the_weights_are_the_references(live, references):
    from distzo.common.config import JobConfig
    from protos import coordinator_pb2 as cpb

    target = live.target()
    paused = zoctl("pause", *target)  # says the state after the command, and lists the workers (issue 25)
    assert paused.returncode == 0 and "job: paused" in paused.stdout, paused.stdout
    assert str(live.status().workers[0].pid) in paused.stdout, paused.stdout
    step = live.status().step
    time.sleep(1.0)
    assert live.status().step == step  # nothing moves while paused
    with live.client() as c:
        ev = c.call("Eval", cpb.ControlRequest(), timeout=120)
    assert ev.step == step and 0 <= ev.dev_accuracy <= 1
    snap = zoctl("snapshot", *target)
    assert snap.returncode == 0 and "snapshot at version" in snap.stdout, snap.stderr
    mid = live.tmp / f"mid-{step}"
    exp = zoctl("export", str(mid), *target)
    assert exp.returncode == 0 and (mid / "config.json").is_file(), exp.stderr
    card = (mid / "README.md").read_text()  # the model card, from the coordinator's job
    assert "Fine-tuned by distzo (distributed) with MeZO-SGD from **tiny-opt**" in card, card
    assert "| dev accuracy before training (step 0) | 0." in card and "| batch size | 8 |" in card, card
    no_token = zoctl("pause", *live.target(token=False))
    assert no_token.returncode == 2 and "bearer token" in no_token.stderr, no_token.stderr
    resumed = zoctl("resume", *target)
    assert resumed.returncode == 0 and "job: running" in resumed.stdout, resumed.stdout
    wait_until(lambda: live.step() > step + 1, timeout=300, what="steps after the resume")
    # what was exported while paused is the reference's model after that many steps (constant lr: the
    # total of 100,000 steps does not enter the weights)
    cfg = JobConfig.from_yaml(live.cfg_path).with_overrides({"train.steps": step})
    assert same_weights(mid, references.get(cfg).out)


def test_clients_without_the_token_cannot_stall_the_run(live):
    """Anonymous calls may hold their few slots for 10 minutes (server.fetch_timeout_s): the run goes on."""
    import concurrent.futures as cf

    from paramserver.service import ANONYMOUS_SLOTS
    from protos import paramserver_pb2 as pb
    from protos import paramserver_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=live.tls["ca"].read_bytes(),
                                         private_key=live.tls["client_key"].read_bytes(),
                                         certificate_chain=live.tls["client"].read_bytes())
    pool = cf.ThreadPoolExecutor(max_workers=80)
    ch = grpc.secure_channel(live.info["param_servers"][0], creds)
    waits: list = []
    try:
        stub = pb_grpc.ParameterServerStub(ch)
        waits = [stub.WaitVersion.future(pb.WaitRequest(block=0, version=10**6), timeout=600) for _ in range(70)]
        follows = [pool.submit(lambda: list(stub.FollowJournal(pb.FollowRequest(from_step=0), timeout=600)))
                   for _ in range(70)]
        for f in follows:
            with pytest.raises(grpc.RpcError) as err:
                f.result(timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wait_until(lambda: sum(w.done() for w in waits) == 70 - ANONYMOUS_SLOTS, timeout=60, what="the rest refused")
        step = live.step()
        wait_until(lambda: live.step() >= step + 3, timeout=300, what="3 more steps")  # the run did not wait for them
        assert sum(not w.done() for w in waits) == ANONYMOUS_SLOTS  # still holding theirs
    finally:
        for w in waits:
            w.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        ch.close()


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.load(r)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def scalar(base: str, expr: str) -> float | None:
    res = query(base, expr)
    return float(res[0]["value"][1]) if res else None


def test_a_real_prometheus_scrapes_the_running_cluster(live, tmp_path):
    from coordinator.cluster.local import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (scripts/install-test-tools.sh installs Debian's package)")
    targets = live.info["metrics"]
    assert set(targets) == {"paramserver", "coordinator", "worker-0", "worker-1"}
    scrape = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": name, "static_configs": [{"targets": [urllib.parse.urlparse(u).netloc]}]}
                                 for name, u in targets.items()]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    prom = None
    try:
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(ready, timeout=60, what="prometheus ready")
        wait_until(lambda: len(query(base, "up == 1")) == 4, timeout=60, what="all four targets up")
        wait_until(lambda: scalar(base, "distzo_train_step") is not None, timeout=120, what="step series")
        step1 = scalar(base, "distzo_train_step")
        loss1 = scalar(base, 'distzo_train_loss{sign="mean"}')
        wait_until(lambda: scalar(base, "distzo_train_step") > step1, timeout=120, what="the step series moving")
        wait_until(lambda: scalar(base, 'max_over_time(distzo_train_loss{sign="mean"}[1m])') != scalar(
            base, 'min_over_time(distzo_train_loss{sign="mean"}[1m])'), timeout=120, what="the loss series moving")
        assert loss1 is not None and 0 < loss1 < 20
        wait_until(lambda: (scalar(base, "rate(distzo_train_tokens_total[10s])") or 0) > 0, timeout=60, what="tokens/s")
        assert (scalar(base, "distzo_paramserver_applied_version") or 0) >= step1
        wait_until(lambda: (scalar(base, 'sum(rate(distzo_worker_phase_seconds_total{phase="compute"}[10s]))') or 0) > 0,
                   timeout=60, what="worker compute time")
        assert query(base, 'distzo_grpc_server_handled_total{method="ApplyUpdate",code="OK"}')
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)


# ---------------------------------------------------------------------------- destructive: last
def test_zoctl_stop_ends_the_run_and_it_exports_and_reports_what_it_trained(live, references):
    from distzo.common.config import JobConfig

    run, coordinator = live.run, live.coordinator
    code, out, err = stop(live)
    assert code == 0, err[-3000:]
    s = json.loads(out)
    assert s["state"] == "stopped" and 2 <= s["steps"] < STEPS
    assert f"training stopped at step {s['steps']} of {STEPS}" in err
    evals = [e["step"] for e in s["eval_history"]]  # step 0, and zoctl eval's of the pause test when it ran first
    assert evals[0] == 0 and s["steps"] not in evals  # stopped: no final evaluation ...
    assert s["dev_accuracy"] is None and s["dev_loss"] is None  # ... so no dev figures, not an older eval's as final
    assert (Path(s["out_dir"]) / "model.safetensors").is_file() and Path(s["report"]).is_file()
    card = (Path(s["out_dir"]) / "README.md").read_text()  # the model card: no step-0 figures as the end result
    assert "| dev loss at the end | n/a |" in card and "| dev accuracy at the end | n/a |" in card, card
    cfg = JobConfig.from_yaml(live.cfg_path).with_overrides({"train.steps": s["steps"]})
    assert same_weights(Path(s["out_dir"]), references.get(cfg).out)  # exactly what it trained
    assert not our_processes(run)
    assert not (run / "cluster.json").exists()  # a stopped cluster is no longer announced
    gone = zoctl("status", "--run-dir", str(run))  # the hint names commands that work on a run that has ended
    assert gone.returncode == 3 and "no local cluster is running in" in gone.stderr, gone.stderr
    assert f"`zoctl report {run}`" in gone.stderr and "--resume" in gone.stderr, gone.stderr
    gone = zoctl("status", "--coordinator", coordinator)
    assert gone.returncode == 3 and "cannot reach the coordinator" in gone.stderr
