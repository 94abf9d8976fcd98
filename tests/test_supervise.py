"""The restart policy shared by zoctl up's local cluster and distzo-worker-launch (distzo/infra/supervise.py)."""

import subprocess
import sys

import pytest
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from conftest import small_config
from coordinator.cluster import local
from distzo.infra.procs import ServiceFailed, ServiceProcess
from distzo.infra.supervise import EXIT_BAD_INPUT, RestartPolicy, Restarts
from gpuworker import launch


def test_quick_deaths_back_off_exponentially_up_to_the_cap():
    r = Restarts("paramserver", local.POLICY)
    assert [r.died(-9, ran_s=1.0) for _ in range(7)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert r.count == 7 and r.quick_deaths == 7


def test_the_launchers_quick_deaths_back_off_linearly_up_to_the_cap():
    r = Restarts("the node group", launch.POLICY)
    assert [r.died([1, -15], ran_s=0.5) for _ in range(17)] == [2.0 * k for k in range(1, 16)] + [30.0, 30.0]


def test_a_stable_run_resets_the_backoff():
    r = Restarts("coordinator", local.POLICY)
    assert [r.died(1, ran_s=2.0) for _ in range(3)] == [0.25, 0.5, 1.0]
    assert r.died(1, ran_s=local.STABLE_S) == 0.0  # ran long enough: a fresh failure, restarted at once
    assert r.quick_deaths == 0
    assert r.died(1, ran_s=2.0) == 0.25  # the next crash loop starts from the first delay
    assert r.count == 5  # restarts over the run are not reset


@pytest.mark.parametrize("codes", [EXIT_BAD_INPUT, [-15, EXIT_BAD_INPUT], (0, EXIT_BAD_INPUT)])
def test_refused_input_is_final(codes):
    r = Restarts("worker-0", local.POLICY)
    with pytest.raises(ServiceFailed, match=r"worker-0 refused its input \(exit code .*2\); not restarting it:\nbad flag") as err:
        r.died(codes, ran_s=100.0, tail=lambda: "bad flag")
    assert err.value.code == EXIT_BAD_INPUT
    assert r.count == 0  # not restarted
    assert not local.POLICY.restartable(ServiceFailed("refused", EXIT_BAD_INPUT))
    assert local.POLICY.restartable(ServiceFailed("killed", -9)) and local.POLICY.restartable(ServiceFailed("timeout"))
    assert not local.POLICY.restartable(ValueError("not a process failure"))


def test_too_many_restarts_raise_with_the_processes_tail():
    policy = RestartPolicy(first_delay_s=0.1, max_delay_s=1.0, stable_s=10.0, max_restarts=3)
    r = Restarts("coordinator", policy)
    for _ in range(3):
        r.died(-9, ran_s=50.0)  # even stable runs count towards the limit
    with pytest.raises(ServiceFailed) as err:
        r.died(-9, ran_s=50.0, tail="line 1\nTraceback: boom")
    assert err.value.code == -9
    assert str(err.value) == "coordinator keeps dying (exit code -9, 3 restarts):\nline 1\nTraceback: boom"
    assert Restarts("x", RestartPolicy(1.0, 1.0, 1.0)).starts_left > 10**6  # no limit set: never gives up


def test_failed_starts_are_retried_with_the_same_backoff_and_share_the_limit():
    # zoctl up's local cluster retries a start that dies with tenacity, driven by the policy
    policy = RestartPolicy(first_delay_s=0.25, max_delay_s=5.0, stable_s=30.0, max_restarts=4)
    r = Restarts("paramserver", policy)
    r.died(-9, ran_s=100.0)  # one restart already
    waits, attempts = [], []

    def start() -> None:
        attempts.append(1)
        raise ServiceFailed("paramserver exited with code -9 while starting", -9)

    with pytest.raises(ServiceFailed):
        for attempt in Retrying(retry=retry_if_exception(policy.restartable), wait=policy.wait,
                                stop=stop_after_attempt(r.starts_left), before_sleep=lambda _: r.failed_start(),
                                sleep=waits.append, reraise=True):
            with attempt:
                start()
    assert len(attempts) == 4 and waits == [0.25, 0.5, 1.0] and r.count == 4  # 4 restarts in all, then it gives up

    refused = []
    with pytest.raises(ServiceFailed):
        for attempt in Retrying(retry=retry_if_exception(policy.restartable), wait=policy.wait, sleep=refused.append,
                                stop=stop_after_attempt(10), reraise=True):
            with attempt:
                raise ServiceFailed("refused", EXIT_BAD_INPUT)
    assert refused == []  # not retried


def test_a_policy_names_its_growth():
    with pytest.raises(ValueError, match="growth must be 'exponential' or 'linear', got 'cubic'"):
        RestartPolicy(1.0, 2.0, 3.0, growth="cubic")


def dead_process(tmp_path, name: str, code: int, log: str) -> ServiceProcess:
    p = ServiceProcess(name, [sys.executable, "-c", f"import sys; print({log!r}); sys.exit({code})"],
                       tmp_path / f"{name}.ready", tmp_path / f"{name}.log")
    p.log_path.write_text(log + "\n")
    p.proc = subprocess.Popen(p.argv, stdout=subprocess.DEVNULL)
    p.proc.wait(60)
    return p


def test_the_local_clusters_supervisor_applies_the_policy(cache_dir, tmp_path):
    # no services: the cluster's supervise() sees a dead coordinator and decides by the shared policy
    cluster = local.LocalCluster(small_config(cache_dir), tmp_path / "run")
    cluster.processes["coordinator"] = dead_process(tmp_path, "coordinator", 2, "config: train.lr must be > 0")
    with pytest.raises(ServiceFailed, match="coordinator refused its input.*\nconfig: train.lr must be > 0") as err:
        cluster.supervise()
    assert err.value.code == 2 and cluster.restarts == {}  # not restarted

    cluster.processes["coordinator"] = dead_process(tmp_path, "coordinator", 1, "Traceback: boom")
    cluster._record("coordinator").count = local.MAX_RESTARTS  # it has been restarted 20 times already
    with pytest.raises(ServiceFailed, match=f"coordinator keeps dying \\(exit code 1, {local.MAX_RESTARTS} restarts\\):\nTraceback: boom"):
        cluster.supervise()


def test_a_minimum_delay_holds_also_after_a_stable_run():
    """distzo-worker-launch waits 2 s before re-forming a node group even after a long run (ports, GPU memory)."""
    from gpuworker.launch import POLICY

    r = Restarts("node-0", POLICY)
    assert r.died([1, 0], ran_s=3600.0) == 2.0
    assert r.died([1, 0], ran_s=1.0) == 2.0  # first quick death: the linear backoff's first step
    assert r.died([1, 0], ran_s=1.0) == 4.0
