"""Coordinator process: serve worker sessions and control RPCs, run one job."""

from __future__ import annotations

import logging
import os
import signal
import threading

from distzo.config import JobConfig
from distzo.logs import kv
from distzo.metrics import start_metrics_server
from distzo.rpc import Credentials, add_health_and_reflection, bind, make_server, write_ready_file
from coordinator.service import SERVICE, STATE_CHANGING, CoordinatorService
from protos import coordinator_pb2_grpc as cpb_grpc

log = logging.getLogger("distzo.coordinator")
MAX_REQUEST_BYTES = 16 << 20


class CoordinatorServer:
    def __init__(self, param_servers: list[str], creds: Credentials, listen: str = "127.0.0.1:0",
                 worker_servers: list[str] | None = None, run_dir: str | None = None):
        if not param_servers:
            raise ValueError("the coordinator needs at least one parameter server (--param-server HOST:PORT)")
        self.creds = creds
        self._finished = threading.Event()
        self._stopping = threading.Event()
        self.service = CoordinatorService(param_servers, creds, on_shutdown=self.stop, worker_servers=worker_servers,
                                          run_dir=run_dir)
        # one thread per worker session; the largest request, an eval result, is a few MiB
        self.grpc = make_server(creds, STATE_CHANGING, max_workers=256, max_receive=MAX_REQUEST_BYTES)
        cpb_grpc.add_CoordinatorServicer_to_server(self.service, self.grpc)
        add_health_and_reflection(self.grpc, [SERVICE])
        self.port = bind(self.grpc, listen, creds)
        self.host = listen.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, cfg: JobConfig | None = None) -> "CoordinatorServer":
        self.grpc.start()
        if cfg is not None:
            self.service.start_job(cfg)
        log.info("coordinator listening", extra=kv(address=self.address))
        return self

    def stop(self, grace: float = 2.0) -> None:
        if self._stopping.is_set():
            self._finished.wait()
            return
        self._stopping.set()
        try:
            job = self.service.job
            if job is not None:
                job.stop()
                job.join(timeout=30)
            self.grpc.stop(grace).wait()
        finally:
            self._finished.set()

    def wait(self) -> None:
        self._finished.wait()


def run(cfg: JobConfig | None, param_servers: list[str], listen: str, ready_file: str | None,
        worker_servers: list[str] | None, creds: Credentials, metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0", run_dir: str | None = None) -> int:
    bound_metrics = start_metrics_server(metrics_port, metrics_host)  # a port in use fails before anything starts
    server = CoordinatorServer(param_servers, creds, listen=listen, worker_servers=worker_servers, run_dir=run_dir).start(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.stop, daemon=True).start())
    write_ready_file(ready_file, {"address": server.address, "port": server.port, "pid": os.getpid(),
                                  "metrics_port": bound_metrics})
    server.wait()
    return 0
