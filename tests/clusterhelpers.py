"""A harness for worker tests: real parameter server and coordinator service, hand-made assignments."""

from __future__ import annotations

import queue
import tempfile
import sys
import threading
import time
from pathlib import Path

from coordinator.rounds import Round
from coordinator.server import CoordinatorServer
from distzo.common.config import JobConfig
from distzo.data.jobdata import JobData
from distzo.infra.procs import ServiceProcess
from distzo.infra.rpc import Credentials
from distzo.train.plan import step_plan
from gpuworker.worker import Worker
from paramserver.server import ParamServer
from protos import coordinator_pb2 as cpb


class ResultSink:
    """Stands in for the coordinator's job: hands workers the config, collects their results."""

    def __init__(self, cfg: JobConfig, results: queue.Queue):
        self.cfg = cfg
        self.results = results

    def on_result(self, conn, r) -> None:  # noqa: ANN001
        self.results.put((conn.worker_id, r))

    def stop(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


class Harness:
    def __init__(self, cfg: JobConfig, tmp: Path, param_servers: list[str] | None = None):
        self.cfg = cfg
        self.tmp = Path(tempfile.mkdtemp(prefix="harness-", dir=tmp))
        self.server = ParamServer(cfg, self.tmp / "ps").start()
        self.coord = CoordinatorServer(param_servers or [self.server.address], Credentials()).start()
        self.results: queue.Queue = queue.Queue()
        self.coord.service.job = ResultSink(cfg, self.results)
        self.workers: list[tuple[Worker, threading.Thread]] = []
        self.procs: list[ServiceProcess] = []
        self.data = JobData.load(cfg)
        self._ids = iter(range(1, 10**9))

    def add_worker(self, worker_id: str, **kw) -> Worker:
        w = Worker(self.coord.address, Credentials(), worker_id=worker_id, **kw)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        self.workers.append((w, t))
        return w

    def add_worker_process(self, worker_id: str, *args: str) -> ServiceProcess:
        import subprocess

        p = ServiceProcess(worker_id, [sys.executable, "-m", "gpuworker", "--coordinator", self.coord.address,
                                       "--worker-id", worker_id, "--metrics-port", "-1", *args], self.tmp / f"{worker_id}.ready", self.tmp / f"{worker_id}.log")
        with open(p.log_path, "ab") as log:
            p.proc = subprocess.Popen(p.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def wait_registered(self, ids: list[str], timeout: float = 120.0) -> None:
        reg = self.coord.service.registry
        ok = reg.wait_for(lambda: all(i in reg.workers and reg.workers[i].live for i in ids), timeout)
        assert ok, f"workers {ids} did not register; have {list(reg.workers)}"

    def conn(self, worker_id: str):
        return self.coord.service.registry.workers[worker_id]

    def train_assignment(self, step: int, keys: list[tuple[int, int, int]], **extra) -> cpb.Assignment:
        plan = step_plan(self.cfg, step, len(self.data.train))
        batches = dict(enumerate(self.data.shard_batches(plan)))
        specs = [cpb.ForwardSpec(direction=j, shard=d, sign=s, seed=plan.seeds[j], coef=s * self.cfg.train.eps) for j, d, s in keys]
        shards = sorted({d for _, d, _ in keys})
        return cpb.Assignment(assignment_id=next(self._ids), step=step, version=step, kind="train", forwards=specs,
                              batches=[Round._wire(d, batches[d]) for d in shards], deadline_s=60, **extra)

    def send(self, worker_id: str, a: cpb.Assignment) -> None:
        self.conn(worker_id).send(cpb.CoordinatorMessage(assignment=a))

    def result(self, timeout: float = 120.0) -> tuple[str, cpb.WorkResult]:
        return self.results.get(timeout=timeout)

    def close(self) -> None:
        for w, _ in self.workers:
            w.stop()
        for w, t in self.workers:
            t.join(timeout=10)
            w.close()
        for p in self.procs:
            p.stop(timeout_s=5)
        self.coord.stop(grace=0.2)
        self.server.stop(grace=0.2)


def wait_until(pred, timeout: float = 30.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
