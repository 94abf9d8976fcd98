"""The worker process: one session with the coordinator, assignments in, losses out.

It registers (host, node group, device), receives the job config and the parameter-server
addresses, and then runs whatever it is assigned. It never writes weights back: the
server applies the seed updates itself. A lost coordinator means reconnecting with
backoff and registering again under the same worker id.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import uuid

import grpc
import torch
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from distzo.common.config import JobConfig
from distzo.infra.coordclient import CoordinatorClient
from distzo.infra.logs import kv
from distzo.infra.rpc import Credentials
from distzo.model.forward import resolve_device
from distzo.zo import generator
from gpuworker import metrics
from gpuworker.node import GatherError, NodeGroup
from gpuworker.runner import ModelRunner
from paramserver.dataplane import hostcopy
from paramserver.dataplane.client import ParamServerClient
from protos import coordinator_pb2 as cpb

log = logging.getLogger("distzo.worker")
HEARTBEAT_S = 1.0


class Reconnect(Exception):
    """The session ended; connect again."""


class Worker:
    def __init__(self, coordinator: str, creds: Credentials, device: str = "cpu", node_rank: int = 0,
                 node_size: int = 1, node_master: str | None = None, node_id: str | None = None,
                 worker_id: str | None = None, param_servers: list[str] | None = None):
        self.coordinator = coordinator
        self.creds = creds
        self.device = resolve_device(device)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.node_rank, self.node_size = node_rank, node_size
        self.node_id = node_id or (f"{socket.gethostname()}:{node_master}" if node_size > 1 else self.worker_id)
        self.node: NodeGroup | None = None
        if node_size > 1:
            if not node_master:
                raise ValueError("a node group (node_size > 1) needs --node-master HOST:PORT or file:///PATH")
            self.node = NodeGroup(node_rank, node_size, node_master, self.device)
        self.param_server_override = param_servers
        self.runner: ModelRunner | None = None
        self._job_yaml: str | None = None
        self._client: ParamServerClient | None = None
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._state = "idle"
        self._current = 0
        self.assignments_done = 0

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        try:
            for attempt in Retrying(wait=wait_exponential(multiplier=0.2, max=5.0),
                                    retry=retry_if_exception_type(Reconnect), reraise=True):
                with attempt:
                    if self._stop.is_set():
                        return 0
                    self._session()
        except GatherError:
            raise
        except Exception as exc:  # noqa: BLE001 - cannot work at all (model, servers): say why and exit
            log.critical("worker cannot run: %s", exc)
            return 1
        return 0

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()  # unblocks the session loop

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self._client is not None:
            self._client.close()
        if self.node is not None:
            self.node.close()

    # ------------------------------------------------------------------ session
    def _hello(self) -> cpb.WorkerMessage:
        return cpb.WorkerMessage(hello=cpb.WorkerHello(
            worker_id=self.worker_id, host=socket.gethostname(), node_id=self.node_id, node_rank=self.node_rank,
            node_size=self.node_size, device=str(self.device), pid=os.getpid(),
            capabilities=["dual", "pertp", "eval", "gather"] + (["cuda"] if self.device.type == "cuda" else [])))

    def _session(self) -> None:
        outbox: queue.Queue[cpb.WorkerMessage | None] = queue.Queue()
        outbox.put(self._hello())
        coordinator = CoordinatorClient(self.coordinator, self.creds)
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeats, args=(outbox, done), daemon=True)
        try:
            call = coordinator.session(iter(outbox.get, None))
            self._call = call
            beat.start()
            for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "welcome":
                    self._welcome(msg.welcome)
                    outbox.put(cpb.WorkerMessage(heartbeat=cpb.Heartbeat(state="idle", ready=True)))
                    metrics.READY.set(1)
                elif kind == "assignment":
                    outbox.put(cpb.WorkerMessage(result=self._execute(msg.assignment)))
                elif kind == "shutdown":
                    log.info("coordinator asked us to stop", extra=kv(reason=msg.shutdown.reason))
                    self._stop.set()
                    return
            if not self._stop.is_set():
                raise Reconnect("coordinator closed the session")
        except grpc.RpcError as exc:
            if self._stop.is_set():
                return
            log.warning("lost the coordinator, reconnecting", extra=kv(code=str(exc.code()), detail=exc.details()))
            raise Reconnect(str(exc)) from None
        finally:
            metrics.READY.set(0)
            self._call = None
            done.set()
            outbox.put(None)
            coordinator.close()

    def _heartbeats(self, outbox: queue.Queue, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_S):
            outbox.put(cpb.WorkerMessage(heartbeat=cpb.Heartbeat(assignment_id=self._current, state=self._state)))

    def _welcome(self, w: cpb.Welcome) -> None:
        self.worker_id = w.worker_id or self.worker_id
        servers = self.param_server_override or list(w.param_servers)
        if self.runner is not None and w.job_config_yaml == self._job_yaml:
            return  # re-registered with the same job: keep the model and the connections
        cfg = JobConfig.from_yaml_text(w.job_config_yaml, "the coordinator's job config")
        torch.set_num_threads(cfg.runtime.threads)
        generator.set_cpu_threads(cfg.runtime.kernel_threads)
        hostcopy.set_copy_threads(cfg.runtime.copy_threads)
        if self.runner is not None:
            self.runner.close()
        if self._client is not None:
            self._client.close()
        self._client = ParamServerClient(servers, self.creds).connect()
        self.runner = ModelRunner(cfg, self._client, self.device, self.node)
        self.runner.warm_up()  # before we say we are ready: compilation is not on the clock
        self._job_yaml = w.job_config_yaml
        log.info("registered", extra=kv(worker=self.worker_id, servers=",".join(servers), device=str(self.device)))

    def _execute(self, a: cpb.Assignment) -> cpb.WorkResult:
        if self.runner is None:
            return cpb.WorkResult(assignment_id=a.assignment_id, step=a.step, error="worker has no job yet", error_kind="internal")
        self._current, self._state = a.assignment_id, "computing"
        try:
            result = self.runner.run(a)
        finally:
            self._current, self._state = 0, "idle"
        self.assignments_done += 1
        if result.error_kind == "gather":
            # the node group is broken (a member died): leave, so the supervisor re-forms it
            log.error("node group collective failed; exiting so the group can be restarted")
            self._stop.set()
            raise GatherError(result.error)
        return result
