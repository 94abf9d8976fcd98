"""zoctl up --hosts N: simulated hosts (network namespaces), bytes on the wire, cut links, lost replicas.

The model of these runs is tiny-opt, 254,144 parameters = 1,016,576 bytes served (fp32). That is the
smallest preset for which the 1% target means something: what must cross a link per step is
control traffic of about 1-3 KB whatever the model (the host's assignment with its shard's token ids,
its result, a journal record of a few dozen bytes, heartbeats, gRPC/TCP framing), so 1% of the model,
10 KB, lies above it with margin, while a worker that fetched its weights across the link would put
at least one model, 100% of it, on the link every step: the assertion tells the two designs apart by
more than a factor of 100.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterhelpers import wait_until
from coordinator.cluster.hostcluster import replica_states
from coordinator.cluster.hosts import HostNetwork, cleanup_stale, leftovers
from distzo.common.config import JobConfig
from protos import coordinator_pb2 as cpb
from test_cluster import our_processes, same_weights, write_config, zoctl

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="simulated hosts are network namespaces: creating them needs root "
                                                 "(CI runs as root)")
pytestmark = [pytest.mark.hosts, pytest.mark.cluster]


def ip_names() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


@needs_root
def test_three_hosts_end_bitwise_equal_to_the_reference_with_only_control_bytes_on_the_links(cache_dir, tmp_path,
                                                                                             references):
    cfg = write_config(tmp_path, cache_dir, train={"steps": 30, "batch_size": 6})
    flags = ["--config", str(cfg), "--layout", "ddp", "--workers", "3"]  # dual on each host, ddp across hosts
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(1) as pool:  # the reference trains here while the hosts' processes start and stop
        reference = pool.submit(references.for_flags, flags)
        up = zoctl("up", *flags, "--hosts", "3", "--json", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "dist"))
        ref, _ = reference.result()
    assert up.returncode == 0, up.stderr[-3000:]
    assert same_weights(tmp_path / "dist", ref.out)
    summary = json.loads(up.stdout)
    net = summary["network"]
    assert net["hosts"] == 3 and net["model_bytes"] == 1_016_576
    assert net["steady_steps"] >= 10, net  # enough steps observed for a steady-state figure
    for link in net["links"]:
        assert link["bytes_per_step"] > 0, link  # the counters do count: assignments and results cross every link
        assert link["bytes_per_step"] <= 0.01 * net["model_bytes"], link
        assert link["total_received_bytes"] >= link["received_bytes_per_step"] * net["steady_steps"]
    assert [link["initial_sync_bytes"] is None for link in net["links"]] == [True, False, False]  # replicas: hosts 1, 2
    # torn down: no namespace, link or shared-memory directory of the run, no process
    assert not leftovers(net["run_id"]) and f"dz{net['run_id']}" not in ip_names()
    assert not our_processes(tmp_path / "run")


def test_hosts_need_root_and_a_layout_that_divides(cache_dir, tmp_path, monkeypatch):
    from test_cluster import zoctl_here  # zoctl's main() in this process (its logging restored after)

    cfg = write_config(tmp_path, cache_dir, train={"steps": 2, "batch_size": 6})
    run = ["--run-dir", str(tmp_path / "run")]
    r = zoctl_here("up", "--config", str(cfg), "--workers", "1", "--hosts", "2", *run)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "cluster.hosts 2 must divide the layout's 1 node group" in err
    r = zoctl_here("up", "--config", str(cfg), "--hosts", "0", *run)
    assert r.returncode == 2 and "cluster.hosts" in r.stderr
    r = zoctl_here("up", "--config", str(cfg), "--layout", "ddp", "--workers", "2", "--hosts", "2",
                   "--set", "cluster.link_rate=fast", *run)
    assert r.returncode == 2 and "cluster.link_rate" in r.stderr
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = zoctl_here("up", "--config", str(cfg), "--layout", "ddp", "--workers", "2", "--hosts", "2", *run)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "--hosts needs root" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert JobConfig.from_dict({"cluster": {"hosts": 2}, "layout": {"name": "ddp", "workers": 4}}).cluster.hosts == 2


CRASHING_RUN = """
import subprocess, sys, time
from coordinator.cluster.hosts import HostNetwork
net = HostNetwork(2).create()
p = subprocess.Popen(net.exec_argv(1, ["sleep", "600"]))
print(net.rid, p.pid, flush=True)
time.sleep(600)
"""


@needs_root
def test_a_crashed_runs_hosts_are_removed_by_the_next_start(tmp_path):
    crashed = subprocess.Popen([sys.executable, "-c", CRASHING_RUN], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    rid, pid = crashed.stdout.readline().split()
    assert leftovers(rid)
    crashed.kill()  # the supervisor dies without tearing anything down (kill -9)
    crashed.wait()
    assert leftovers(rid) and os.path.exists(f"/proc/{pid}")  # left behind, still running in its namespace
    net = HostNetwork(1).create()  # the next run cleans up first
    try:
        assert not leftovers(rid)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                   30, "the process left in the crashed run's namespace ending")
    finally:
        net.teardown()
    assert not leftovers(net.rid)
    assert rid not in cleanup_stale()


@needs_root
def test_ctrl_c_tears_the_hosts_down(cache_dir, tmp_path):
    # far more steps than can run before the interrupt: with 1000 tiny steps (a whole run takes 89 s here)
    # it once exited 0 under load, likely the run ending first (cluster.json is written after the start)
    cfg = write_config(tmp_path, cache_dir, train={"steps": 100_000, "batch_size": 6})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "coordinator.zoctl.cli", "up", "--config", str(cfg), "--layout", "ddp",
                             "--workers", "2", "--hosts", "2", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (run_dir / "cluster.json").is_file() or proc.poll() is not None, 300, "the cluster up")
        assert proc.poll() is None, proc.stderr.read()
        rid = json.loads((run_dir / "cluster.json").read_text())["hosts_run_id"]
        assert leftovers(rid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        proc.kill()
    assert not leftovers(rid) and f"dz{rid}" not in ip_names()
    assert not our_processes(run_dir)


# ---------------------------------------------------------------------------- faults (in process: the harness cuts links)
class _Paused(Exception):
    """Ends HostsCluster.wait() once the run is paused (wait() itself returns only when the run has ended)."""


def run_hosts_until_paused(cfg: JobConfig, tmp_path: Path, on_status) -> tuple[object, int]:  # noqa: ANN001
    """Run ``cfg`` on simulated hosts, calling ``on_status(cluster, status)`` at each poll, until it returns True
    while the run is paused; export there. Returns the cluster (shut down) and the step it was paused at."""
    from coordinator.cluster.hostcluster import HostsCluster

    cluster = HostsCluster(cfg, tmp_path / "run")
    paused_at: list[int] = []

    def poll(st) -> None:  # noqa: ANN001
        if on_status(cluster, st) and st.state == "paused":
            paused_at.append(st.step)
            raise _Paused
        assert st.state not in ("done", "failed", "stopped"), st.error or st.state  # it trains until paused

    try:
        cluster.start()
        with pytest.raises(_Paused):
            cluster.wait(poll)
        cluster.export(tmp_path / "dist")
        return cluster, paused_at[0]
    finally:
        cluster.shutdown()
        assert not leftovers(cluster.net.rid)


@needs_root
@pytest.mark.timeout(900)
def test_a_host_cut_off_for_10s_and_a_killed_replica_and_the_run_ends_bitwise_equal(cache_dir, tmp_path, references):
    """Two hosts. Host 1's link goes down for 10 s (its replica and worker cut off from the coordinator and the
    primary) and comes back: it rejoins. Then host 1's replica is killed (kill -9): zoctl status shows it dead, the
    supervisor restarts it from its own snapshot + journal, it catches up. The run trains until it is paused a few
    steps after the restart (so it cannot end before the kill, however fast its steps): its weights there equal
    the reference's at that step."""
    # update windows of 4, served bf16: the replica follows the journal into the same slots, and the killed one
    # recovers mid-window from its own snapshot + journal (served bf16: the base it serves decides the forwards)
    cfg = JobConfig.from_yaml(write_config(tmp_path, cache_dir, train={"steps": 100_000, "batch_size": 6},
                                           layout={"name": "ddp", "workers": 2}, cluster={"hosts": 2},
                                           coordinator={"heartbeat_timeout_s": 30.0},
                                           server={"update_window": 4, "served_dtype": "bfloat16", "snapshot_every": 3}))
    seen: dict[str, object] = {}
    threads: list[threading.Thread] = []
    killed: list[int] = []

    def outage(cluster) -> None:  # noqa: ANN001
        cluster.net.set_link(1, False)  # host 1 (its replica and worker) cut off from the coordinator and the primary
        seen["down_at"] = cluster.status().step
        time.sleep(10)  # the outage itself
        seen["up_at"] = cluster.status().step
        cluster.net.set_link(1, True)

    def on_status(cluster, st) -> bool:  # noqa: ANN001 - True once the run may be paused
        if st.step >= 3 and not threads:
            threads.append(threading.Thread(target=outage, args=(cluster,), daemon=True))
            threads[0].start()
        if "up_at" in seen and st.step >= seen["up_at"] + 2 and st.state == "running" and not killed:  # rejoined, moving
            # (killed while running: wait() restarts it before it looks at the status again)
            shown = zoctl("status", "--run-dir", str(cluster.run_dir), "--json", timeout=60)
            assert shown.returncode == 0, shown.stderr
            seen["before"] = json.loads(shown.stdout)["replicas"]
            p = cluster.processes["replica-1"]
            killed.append(p.pid)
            p.kill()  # kill -9: the supervisor restarts it from its own snapshot + journal
            p.proc.wait(30)
            seen["killed"] = replica_states(cluster.server_address, {"1": cluster.replica_address(1)}, cluster.creds)
            seen["killed_at"] = st.step
        elif killed and cluster.restarts.get("replica-1", 0) >= 1 and st.state == "running" \
                and st.step >= seen["killed_at"] + 2 and "pause" not in seen:  # restarted, and the run moving on
            cluster.client().call("Pause", cpb.ControlRequest(), timeout=30)
            seen["pause"] = True
        return "pause" in seen

    cluster, step = run_hosts_until_paused(cfg, tmp_path, on_status)
    threads[0].join(30)
    assert "up_at" in seen, seen
    # the cut was real: host 1's worker holds a data shard of every step, and it waited (heartbeat timeout 30 s)
    assert seen["up_at"] <= seen["down_at"] + 1, seen
    assert killed and cluster.restarts.get("replica-1", 0) >= 1
    before, after = seen["before"], seen["killed"]
    assert [(r["host"], r["state"]) for r in before] == [("1", "serving")] and before[0]["lag"] <= 1, before
    assert [(r["host"], r["state"], r["version"]) for r in after] == [("1", "dead", None)], after  # zoctl status shows it
    assert same_weights(tmp_path / "dist", references.get(cfg.with_overrides({"train.steps": step})).out)


def test_link_meter_counts_steady_state_apart_from_evals_and_the_last_step():
    from urllib.request import urlopen

    from coordinator.cluster.linkstats import LinkMeter

    wire = {0: [0, 0], 1: [0, 0]}
    meter = LinkMeter(2, lambda h: tuple(wire[h]), total_steps=6, model_bytes=10_000)
    meter.begin()
    meter.initial_sync[1] = (100, 5000)
    for step, evals, per_step in [(1, 1, 0), (2, 1, 10), (3, 1, 10), (4, 2, 900), (5, 2, 10), (6, 3, 900)]:
        for h in wire:  # host h sends 10(h+1) and receives 20(h+1) bytes per step, an eval 900
            wire[h][0] += per_step * (h + 1)
            wire[h][1] += 2 * per_step * (h + 1)
        meter.observe("running", step, evals)
    meter.observe("running", 6, 3)  # the same step again: one sample
    meter.observe("paused", 7, 3)  # not running: ignored
    rep = meter.report()
    assert rep["steady_steps"] == 3  # 1->2, 2->3, 4->5 (3->4 holds an eval, 5->6 reaches the last step)
    assert [round(link["bytes_per_step"]) for link in rep["links"]] == [30, 60]
    assert rep["links"][1]["fraction_of_model"] == 60 / 10_000
    assert [link["initial_sync_bytes"] for link in rep["links"]] == [None, 5100]
    port = meter.serve()
    try:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        meter.close()
    assert 'distzo_link_steady_bytes_per_step{host="1"} 60.0' in text
    assert 'distzo_link_received_bytes_total{host="0"} 3660.0' in text
    assert 'distzo_link_initial_sync_bytes{host="1"} 5100.0' in text and "distzo_link_model_bytes 10000.0" in text
