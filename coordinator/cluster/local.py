"""The embedded local cluster behind ``zoctl up``: real processes on loopback, supervised.

A parameter server, a coordinator and N workers run as separate processes with a fresh
bearer token. A process that dies is restarted in place: the server on the same port and
data directory (it recovers from snapshot + journal), the coordinator on the same port (it
resumes from the server's journal), a worker under the same id (it registers again; a node
group is restarted whole). The run therefore ends with the weights of an undisturbed one.

A process that dies while it is still starting (killed again during a restart) is started
again like any other, with exponential backoff; only a deterministic failure (exit code 2:
bad input, e.g. a config the service refuses) or more than ``MAX_RESTARTS`` restarts of one
process end the run (the policy: ``distzo.infra.supervise``, shared with distzo-worker-launch).

The run directory records its job (``run.json``, ``distzo.common.durable``): a different job there
is refused, and continuing a run that is there needs ``resume=True`` (``zoctl up --resume``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from tenacity import Retrying, retry_if_exception, stop_after_attempt

from coordinator.cluster.rundir import check_run_dir, wait_for_run_dir  # noqa: F401 - check_run_dir: re-exported for zoctl up
from distzo.common.cache import shared_kernel_cache_env
from distzo.common.config import JobConfig
from distzo.common.durable import record_job, write_atomic
from distzo.infra.coordclient import CoordinatorClient
from distzo.infra.logs import kv
from distzo.infra.procs import (READY, SUPERVISOR_ENV, ServiceFailed, ServiceProcess, address_flags, python_module,
                               worker_command)
from distzo.infra.rpc import Credentials
from distzo.infra.supervise import RestartPolicy, Restarts
from distzo.model.transfer import is_url
from distzo.run.runlog import CLUSTER_FILE, RUN
from distzo.train.defaults import resolve
from protos import coordinator_pb2 as cpb
from protos import coordinator_pb2_grpc as cpb_grpc

log = logging.getLogger("distzo.local")
MAX_RESTARTS = 20  # per process, over the run
STABLE_S = 30.0  # a process that ran this long before dying is restarted at once (no backoff)
# quick deaths (and failed starts) in a row wait 0.25 s, 0.5 s, 1 s, ... up to 5 s
POLICY = RestartPolicy(first_delay_s=0.25, max_delay_s=5.0, stable_s=STABLE_S, max_restarts=MAX_RESTARTS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    cfg: JobConfig
    run_dir: Path
    verbose: int = 0
    resume: bool = False
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    server_port: int = 0
    coordinator_port: int = 0
    # the step this run started at (0, or where --resume picked it up), as the first coordinator said; a
    # coordinator restarted mid-run resumes later, but the run did not start there
    started_at_step: int | None = None
    PRESTART = True  # start the coordinator and workers with the parameter server (_prestart); a class attribute

    def __post_init__(self) -> None:
        self.cfg = resolve(self.cfg)[0]  # train.lr/eps chosen by the model where null: one job, one identity
        self.run_dir = self.run_dir.resolve()
        check_run_dir(self.run_dir, self.cfg, self.resume)  # before anything is written or started
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = wait_for_run_dir(self.run_dir)  # held until shutdown, and by every service started
        record_job(self.run_dir / RUN, self.cfg)
        token_file = self.run_dir / "token"  # written whole (a restarted service reads it again), private
        write_atomic(token_file, (secrets.token_urlsafe(24) + "\n").encode(), 0o600)
        token_file.chmod(0o600)
        data_dir = self.cfg.server.data_dir or str(self.run_dir / "server")
        self.cfg = self.cfg.with_overrides({"security.token_file": str(token_file), "server.data_dir": data_dir})
        self.config_path = self.run_dir / "job.yaml"
        write_atomic(self.config_path, self.cfg.to_yaml().encode(), 0o600)  # it may hold a token
        self.config_path.chmod(0o600)
        self._started_at: dict[str, float] = {}
        self._restarts: dict[str, Restarts] = {}  # process name, or node-N for a node group's start
        self._hosts_of: dict[str, int] = {}  # process name -> host index
        self._restarters: dict[str, Callable[[], None]] = {}  # extra processes (replicas) -> how to start them
        self._early: dict[str, ServiceProcess | list[ServiceProcess]] = {}  # started with the parameter server (_prestart)
        self.creds = Credentials.from_config(self.cfg.security)
        self._client: CoordinatorClient | None = None

    # ------------------------------------------------------------------ placement (coordinator.cluster.hostcluster overrides)
    def host_ip(self, host: int) -> str:
        """The address the services of host ``host`` listen on (here every process is on loopback)."""
        return "127.0.0.1"

    def _in_host(self, host: int, argv: list[str]) -> list[str]:
        return argv

    def _node_host(self, node: int) -> int:
        return 0

    def _node_servers(self, node: int) -> list[str]:
        """--param-server overrides for a node's workers (none: the coordinator's list)."""
        return []

    def _server_args(self, host: int) -> list[str]:
        return []

    def _start_replicas(self) -> None:
        pass

    def _cluster_info(self) -> dict:
        """More of cluster.json (the hosts' run id)."""
        return {}

    # ------------------------------------------------------------------ processes
    def _v(self, host: int = 0) -> list[str]:
        # every process with its own free metrics port, on its host's address
        return ["-v"] * self.verbose + ["--metrics-port", "0", "--metrics-host", self.host_ip(host)]

    def _service(self, name: str, argv: list[str], host: int = 0) -> ServiceProcess:
        """A service process of this cluster (registered, not started), announcing itself in ready/NAME.json."""
        ready = self.run_dir / "ready" / f"{name}.json"
        ready.unlink(missing_ok=True)
        self._hosts_of[name] = host
        p = ServiceProcess(name, self._in_host(host, [*argv, "--ready-file", str(ready)]), ready,
                           self.run_dir / "logs" / f"{name}.log", pass_fds=(self.lock.fd,) if self.lock.fd else ())
        self.processes[name] = p
        return p

    def _env(self) -> dict[str, str]:
        """The services' environment: one kernel cache, and this process as their supervisor (they end
        when it does, however it ends: distzo.infra.procs.end_with_supervisor)."""
        return {**shared_kernel_cache_env(self.cfg.runtime.cache_dir), SUPERVISOR_ENV: str(os.getpid())}

    def _spawn(self, name: str, argv: list[str], host: int = 0) -> ServiceProcess:
        p = self._service(name, argv, host)
        p.start(timeout_s=300, env=self._env())
        return p

    def _launch(self, name: str, start: Callable[[], None]) -> None:
        """Start (or restart) one service; a start that dies is retried with exponential backoff.

        Raises ServiceFailed for a deterministic failure (exit code 2: it refuses its input)
        or once the process has been restarted MAX_RESTARTS times.
        """
        record = self._record(name)

        def count(state) -> None:  # noqa: ANN001 - tenacity's RetryCallState
            record.failed_start()
            log.warning("process died while starting, starting it again", extra=kv(process=name, code=state.outcome.exception().code,
                                                                                     attempt=state.attempt_number))

        for attempt in Retrying(retry=retry_if_exception(POLICY.restartable), wait=POLICY.wait,
                                stop=stop_after_attempt(record.starts_left), before_sleep=count, reraise=True):
            with attempt:
                start()
        self._started_at[name] = time.monotonic()

    def _start_server(self) -> None:
        listen = f"{self.host_ip(0)}:{self.server_port}"
        p = self._spawn("paramserver", python_module("paramserver", "--config", str(self.config_path), "--data-dir",
                                                      self.cfg.server.data_dir or "", "--listen", listen,
                                                      *self._server_args(0), *self._v()))
        self.server_port = p.info["port"]

    def _coordinator_process(self, server: str) -> ServiceProcess:
        """The coordinator's process, not started; ``server``: the parameter server's address, or
        ``ready:PATH``, its ready file (the coordinator waits for it)."""
        listen = f"{self.host_ip(0)}:{self.coordinator_port}"
        where = address_flags("--param-server", server)
        return self._service("coordinator", python_module("coordinator", "--config", str(self.config_path), *where,
                                                          "--listen", listen, "--run-dir", str(self.run_dir), *self._v()))

    def _start_coordinator(self) -> None:
        p = self._early.pop("coordinator", None)  # started with the parameter server (start())
        if p is None:
            p = self._coordinator_process(self.server_address)
            p.spawn(env=self._env())
        p.wait_ready(timeout_s=300)
        self.coordinator_port = p.info["port"]

    def _worker_device(self, index: int, rank: int) -> str:
        """cpu, or the GPU of this machine the worker uses: a node group's ranks need one GPU each (NCCL);
        workers of different groups take the GPUs in turn and may share one."""
        if self.cfg.runtime.device == "cpu":
            return "cpu"
        import torch

        count = max(1, torch.cuda.device_count())
        return f"cuda:{rank if self.cfg.layout.node_size > 1 else index % count}"

    def _worker_argv(self, index: int, node: int, rank: int, master: str, coordinator: str) -> list[str]:
        size = self.cfg.layout.node_size
        host = self._node_host(node)
        sec = self.cfg.security
        credentials = {"token_file": str(sec.token_file), "tls_ca": sec.tls_ca}
        if sec.mutual_tls:  # a client certificate for mutual TLS
            credentials.update(tls_cert=sec.tls_cert, tls_key=sec.tls_key)
        return worker_command(coordinator, self._node_servers(node), self._worker_device(index, rank),
                              f"worker-{index}", credentials, (rank, size, master, f"node-{node}") if size > 1 else None,
                              self._v(host))

    def _node_processes(self, node: int, coordinator: str) -> list[ServiceProcess]:
        """The node group's worker processes, registered, not started; ``coordinator``: its address or
        ``ready:PATH`` (see ``worker_command``)."""
        size = self.cfg.layout.node_size
        # a fresh rendezvous file per formation: no port to race for, nothing stale from a group that died
        rendezvous = self.run_dir / "rendezvous"
        rendezvous.mkdir(parents=True, exist_ok=True)
        for stale in rendezvous.glob(f"node-{node}-*"):
            stale.unlink(missing_ok=True)
        master = f"file://{rendezvous / f'node-{node}-{uuid.uuid4().hex[:8]}'}"
        return [self._service(f"worker-{node * size + rank}", self._worker_argv(node * size + rank, node, rank, master, coordinator),
                              self._node_host(node)) for rank in range(size)]

    def _start_node(self, node: int) -> None:
        procs = self._early.pop(f"node-{node}", None)  # started with the parameter server (start())
        if procs is None:
            procs = self._node_processes(node, self.coordinator_address)
            for p in procs:  # all members first: a node group forms only when every member is up
                _start_detached(p, self._env())
        deadline = time.monotonic() + 300
        for p in procs:
            while not p.ready_file.is_file():
                if p.proc is not None and p.proc.poll() is not None:
                    code = p.proc.returncode
                    for q in procs:  # the group forms whole or not at all
                        q.stop(timeout_s=5)
                    raise ServiceFailed(f"{p.name} exited with code {code} while starting:\n{p.tail()}", code)
                if time.monotonic() > deadline:
                    for q in procs:
                        q.stop(timeout_s=5)
                    raise ServiceFailed(f"{p.name} did not start:\n{p.tail()}")
                time.sleep(0.05)
            p.info = json.loads(p.ready_file.read_text())

    def metrics_endpoints(self) -> dict[str, str]:
        return {name: f"http://{self.host_ip(self._hosts_of.get(name, 0))}:{p.info['metrics_port']}/metrics"
                for name, p in self.processes.items() if p.info.get("metrics_port")}

    @property
    def server_address(self) -> str:
        return f"{self.host_ip(0)}:{self.server_port}"

    @property
    def coordinator_address(self) -> str:
        return f"{self.host_ip(0)}:{self.coordinator_port}"

    def _prestart(self) -> None:
        """Start the coordinator and the workers together with the parameter server: each waits for the
        ready file of what it connects to, so their start-up (importing torch, ~5 s each) overlaps instead
        of running one after another. A first start that fails is started again the usual way (_launch)."""
        ready = self.run_dir / "ready"
        ready.mkdir(parents=True, exist_ok=True)
        for stale in ready.glob("*.json"):  # a resumed run's: never read as this run's addresses
            stale.unlink(missing_ok=True)
        env = self._env()
        coordinator = self._coordinator_process(f"{READY}{ready / 'paramserver.json'}")
        coordinator.spawn(env=env)
        self._early["coordinator"] = coordinator
        for node in range(self.cfg.layout.workers // self.cfg.layout.node_size):
            procs = self._node_processes(node, f"{READY}{ready / 'coordinator.json'}")
            for p in procs:
                _start_detached(p, env)
            self._early[f"node-{node}"] = procs

    def start(self) -> None:
        if self.PRESTART:
            self._prestart()
        self._launch("paramserver", self._start_server)
        self._start_replicas()
        self._launch("coordinator", self._start_coordinator)
        for node in range(self.cfg.layout.workers // self.cfg.layout.node_size):
            self._launch(f"node-{node}", lambda node=node: self._start_node(node))
        sec = self.cfg.security
        info = {"coordinator": self.coordinator_address, "param_servers": [self.server_address],
                "metrics": self.metrics_endpoints(), "tls_ca": sec.tls_ca,
                "tls_cert": sec.tls_cert if sec.mutual_tls else None, "tls_key": sec.tls_key if sec.mutual_tls else None,
                "token_file": str(self.cfg.security.token_file), "run_dir": str(self.run_dir),
                "pids": {n: p.pid for n, p in self.processes.items()}, "supervisor_pid": os.getpid(), "started": time.time(),
                **self._cluster_info()}
        # announced in the run directory only (coordinator.zoctl.targets): never a machine-wide "latest" cluster
        write_atomic(self.run_dir / CLUSTER_FILE, json.dumps(info, indent=2).encode(), 0o666)

    # ------------------------------------------------------------------ supervision
    def _record(self, name: str) -> Restarts:
        return self._restarts.setdefault(name, Restarts(name, POLICY))

    @property
    def restarts(self) -> dict[str, int]:
        """Restarts so far by process name (node-N: failed starts of node group N), those restarted only."""
        return {name: r.count for name, r in self._restarts.items() if r.count}

    def supervise(self) -> list[str]:
        """Restart any process that died (with backoff if it keeps dying soon after starting);
        returns what was restarted. Raises ServiceFailed (POLICY) for one that refused its input
        (exit code 2) or that was restarted MAX_RESTARTS times already, with its log's tail."""
        restarted = []
        for name, p in list(self.processes.items()):
            if p.alive():
                continue
            code = p.proc.returncode if p.proc is not None else None
            key = name if not name.startswith("worker-") else f"node-{int(name.split('-')[1]) // self.cfg.layout.node_size}"
            delay = self._record(name).died(code, time.monotonic() - self._started_at.get(key, 0.0), p.tail)
            log.warning("process died, restarting", extra=kv(process=name, code=code, backoff_s=delay))
            time.sleep(delay)
            if name == "paramserver":
                self._launch(name, self._start_server)
            elif name == "coordinator":
                self._launch(name, self._start_coordinator)
                self._drop_client()
            elif name.startswith("worker-"):
                size = self.cfg.layout.node_size
                node = int(name.split("-")[1]) // size
                for rank in range(size):  # a node group is restarted whole
                    self.processes[f"worker-{node * size + rank}"].stop(timeout_s=5)
                self._launch(f"node-{node}", lambda node=node: self._start_node(node))
            elif name in self._restarters:
                self._launch(name, self._restarters[name])
            restarted.append(name)
        return restarted

    def client(self) -> CoordinatorClient:
        """The coordinator's client (a new channel after the coordinator was restarted)."""
        if self._client is None:
            self._client = CoordinatorClient(self.coordinator_address, self.creds)
        return self._client

    def stub(self) -> cpb_grpc.CoordinatorStub:
        return self.client().stub

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def status(self) -> cpb.JobStatus:
        st = self.client().status()
        if self.started_at_step is None and st.state not in ("idle", "starting"):
            self.started_at_step = int(st.resumed_from)
        return st

    def wait(self, on_status: Callable[[cpb.JobStatus], None] | None = None, poll_s: float = 0.25) -> cpb.JobStatus:
        while True:
            self.supervise()
            try:
                st = self.status()
            except grpc.RpcError:
                time.sleep(poll_s)  # the coordinator is (re)starting
                continue
            if on_status is not None:
                on_status(st)
            if st.state in ("done", "failed", "stopped"):
                return st
            time.sleep(poll_s)

    def export(self, out_dir: str | Path, merge: bool = False) -> cpb.ControlReply:
        """Export the weights to ``out_dir``, a directory or a URL (``merge``: a LoRA run's merged plain model)."""
        path = str(out_dir) if is_url(str(out_dir)) else os.path.abspath(out_dir)
        return self.client().call("Export", cpb.ExportJobRequest(path=path, merge=merge), timeout=600)

    def shutdown(self) -> None:
        """Ask the services to stop, then make sure every process is gone."""
        try:
            self.client().call("Shutdown", cpb.ControlRequest(), timeout=5)
        except grpc.RpcError:
            pass
        # the workers and the coordinator end on that call; the servers are told now, not after them, so that the
        # ends overlap (each takes about a second: gRPC's stop, the state's close, the interpreter's teardown)
        for name, p in self.processes.items():
            if not name.startswith("worker-") and name != "coordinator":
                p.kill(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, p in self.processes.items():
            if name.startswith("worker-"):
                try:
                    p.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001 - stop() below handles stragglers
                    pass
        for p in self.processes.values():
            p.stop(timeout_s=10)
        self._drop_client()
        (self.run_dir / CLUSTER_FILE).unlink(missing_ok=True)  # nothing is running here any more
        self.lock.release()

def _start_detached(p: ServiceProcess, env: dict[str, str]) -> None:
    """Start a process that announces itself elsewhere (a worker registers with the coordinator)."""
    p.popen(env)
