"""Parameter server process: recover, serve, follow a primary (replicas), shut down cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from distzo.common.config import JobConfig
from distzo.infra.logs import kv
from distzo.infra.metrics import start_metrics_server
from distzo.infra.rpc import Credentials, RefuseMethods, add_health_and_reflection, bind, make_server, write_ready_file
from distzo.zo import generator
from paramserver import metrics
from paramserver.dataplane.client import ParamServerClient
from paramserver.durability.datadir import RecoveryError
from paramserver.durability.replication import Follower
from paramserver.service import PROTECTED, SERVICE, STATE_CHANGING, THREADS, ParamServerService
from paramserver.state import ServerState

log = logging.getLogger("distzo.paramserver")
MAX_REQUEST_BYTES = 1 << 20  # requests are small: the largest, an update of 4096 directions, is ~100 KiB


class ParamServer:
    """One parameter-server process (primary or replica) for a block range."""

    def __init__(self, cfg: JobConfig, data_dir: str | Path, listen: str = "127.0.0.1:0",
                 blocks: tuple[int, int] | None = None, follow: str | None = None, name: str | None = None,
                 control_listen: str | None = None):
        self.cfg = cfg
        self.creds = Credentials.from_config(cfg.security)
        self.follow_address = follow
        # bind first: a taken or invalid address fails before the model is loaded or shared memory made
        refuse = [RefuseMethods(STATE_CHANGING, control_listen)] if control_listen else []
        self.grpc = make_server(self.creds, PROTECTED, max_workers=THREADS, interceptors=refuse,
                                max_receive=MAX_REQUEST_BYTES)
        self.port = bind(self.grpc, listen, self.creds)
        self.host = listen.rsplit(":", 1)[0]
        self.control: grpc.Server | None = None
        self.control_port = 0
        if control_listen:
            self.control = make_server(self.creds, PROTECTED, max_workers=8, max_receive=MAX_REQUEST_BYTES)
            self.control_port = bind(self.control, control_listen, self.creds)
        try:
            self.state = ServerState(cfg, data_dir, blocks=blocks, name=name, role="replica" if follow else "primary")
        except BaseException:  # refused (data directory in use, another model, ...): let the ports go
            for server in (self.grpc, self.control):
                if server is not None:
                    server.stop(0)
            raise
        if self.creds.token is None:  # (after the data directory: a server refused it has nothing to warn about)
            log.warning("no bearer token configured: state-changing RPCs are not authenticated")
        self._stopped = threading.Event()  # stopping has begun (followers quit)
        self._finished = threading.Event()  # everything is closed
        self.service = ParamServerService(self.state, on_shutdown=self.stop, token=self.creds.token)
        # with a control port, the state-changing RPCs live only there (a NetworkPolicy can then
        # let only the coordinator reach them); the data port refuses them
        self.grpc.add_generic_rpc_handlers((self.service.generic_handler(),))
        self.health = add_health_and_reflection(self.grpc, [SERVICE])
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.control is not None:
            self.control.add_generic_rpc_handlers((self.service.generic_handler(),))
            add_health_and_reflection(self.control, [SERVICE])
            self.service.control_port = self.control_port
        self.follower: Follower | None = None
        self.follower_dead = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "ParamServer":
        try:
            try:
                version = self.state.recover()
            except RecoveryError as exc:
                if not self.follow_address:
                    raise
                # a replica's state is its primary's: start over and re-sync rather than stay down
                log.warning("replica data directory unusable: starting over from its primary", extra=kv(reason=str(exc)))
                self.state.discard_history()
                version = self.state.recover()
        except BaseException:
            self.grpc.stop(0)
            self.state.close()  # unlink shared memory; nothing was served
            raise
        self.state.start()
        self.grpc.start()
        if self.control is not None:
            self.control.start()
        if self.follow_address:
            primary = ParamServerClient(self.follow_address, self.creds).connect()
            self.follower = Follower(self.state, primary, self._serving, self._stopped, on_dead=self._follower_died)
            metrics.REPLICA_FOLLOWING.set(0)  # 1 once caught up
            self.follower.start()
        else:
            self._serving()
        log.info("parameter server listening", extra=kv(address=self.address, role=self.state.role, version=version,
                                                         blocks=f"{self.state.first}:{self.state.end}"))
        return self

    def _serving(self) -> None:
        self.service.ready.set()
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.follow_address:
            metrics.REPLICA_FOLLOWING.set(1)

    def _follower_died(self) -> None:
        """The replica no longer follows the primary: stop reporting SERVING (clients and probes go elsewhere)."""
        self.service.ready.clear()
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.REPLICA_FOLLOWING.set(0)
        self.follower_dead.set()

    def stop(self, grace: float = 2.0) -> None:
        if self._stopped.is_set():
            self._finished.wait()
            return
        self._stopped.set()
        try:
            self.health.enter_graceful_shutdown()
            if self.control is not None:
                self.control.stop(grace).wait()
            self.grpc.stop(grace).wait()
            self.state.close()
            log.info("parameter server stopped", extra=kv(address=self.address))
        finally:
            self._finished.set()

    def wait(self) -> None:
        self._finished.wait()


def run(cfg: JobConfig, data_dir: str, listen: str, ready_file: str | None, blocks: tuple[int, int] | None,
        follow: str | None, name: str | None, control_listen: str | None = None,
        metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> int:
    bound_metrics = start_metrics_server(metrics_port, metrics_host)  # a port in use fails before anything starts
    generator.set_cpu_threads(cfg.server.update_threads)  # the process's kernel threads (results never depend on them)
    server = ParamServer(cfg, data_dir, listen=listen, blocks=blocks, follow=follow, name=name,
                         control_listen=control_listen).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.stop, daemon=True).start())
    write_ready_file(ready_file, {"address": server.address, "port": server.port, "pid": os.getpid(),
                                  "control_port": server.control_port, "metrics_port": bound_metrics,
                                  "role": server.state.role, "server_id": server.state.server_id})
    while not server._finished.wait(0.5):
        if server.follower_dead.is_set():  # exit, so that a supervisor restarts it: it recovers and follows again
            log.error("the follower died: the replica stops", extra=kv(address=server.address))
            server.stop()
            return 1
    return 0
