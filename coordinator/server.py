"""Coordinator process: serve worker sessions and control RPCs, run one job."""

from __future__ import annotations

import logging
import os
import signal
import threading

from coordinator.service import SERVICE, STATE_CHANGING, CoordinatorService
from distzo.common.config import JobConfig
from distzo.infra.logs import kv
from distzo.infra.metrics import start_metrics_server
from distzo.infra.rpc import Credentials, add_health_and_reflection, bind, make_server, write_ready_file
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


EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def finish_run(server: CoordinatorServer, export_to: str | None) -> int:
    """Batch mode: wait for the job to end, export (done or stopped), and say how it ended as an exit code.

    0: done (or stopped by `zoctl stop`) and exported; 1: failed, or the export failed (the weights
    stay in the parameter server's data directory, so a retry exports them); 2: the job's input is bad
    (a retry would fail the same way); 130: the coordinator itself was told to stop (SIGTERM).
    """
    job = server.service.job
    assert job is not None
    while job.state not in ("done", "failed", "stopped"):
        if server._stopping.is_set():
            return EXIT_INTERRUPTED
        job.join(timeout=1.0)
    if job.state == "failed":
        log.error("job failed", extra=kv(error=job.error, kind=job.error_kind))
        return EXIT_BAD_INPUT if job.error_kind == "bad_input" else EXIT_FAILED
    if export_to:
        try:
            with server.service._servers() as c:
                reply = c.export(export_to, model_card=server.service._model_card())
            log.info("exported", extra=kv(path=reply.path, version=reply.version))
        except Exception as exc:  # noqa: BLE001 - reported as the run's outcome
            log.error("export failed", extra=kv(path=export_to, error=str(exc)))
            return EXIT_FAILED
    return EXIT_DONE


def run(cfg: JobConfig | None, param_servers: list[str], listen: str, ready_file: str | None,
        worker_servers: list[str] | None, creds: Credentials, metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0", run_dir: str | None = None, exit_when_done: bool = False,
        export_to: str | None = None) -> int:
    """Serve until shut down, or with ``exit_when_done`` (a Kubernetes Job/JobSet: the run is a unit that
    completes) until the job ends, exporting to ``export_to``; returns the process's exit code."""
    if exit_when_done and cfg is None:
        raise ValueError("--exit-when-done needs --config (the job to run)")
    bound_metrics = start_metrics_server(metrics_port, metrics_host)  # a port in use fails before anything starts
    server = CoordinatorServer(param_servers, creds, listen=listen, worker_servers=worker_servers, run_dir=run_dir).start(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.stop, daemon=True).start())
    write_ready_file(ready_file, {"address": server.address, "port": server.port, "pid": os.getpid(),
                                  "metrics_port": bound_metrics})
    if not exit_when_done:
        server.wait()
        return 0
    code = finish_run(server, export_to)
    server.stop()
    return code
