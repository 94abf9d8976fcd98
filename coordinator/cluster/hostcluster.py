"""``zoctl up --hosts N``: the local cluster spread over N simulated hosts (coordinator.cluster.hosts).

Host 0 runs the primary parameter server and the coordinator; every other host runs a replica that
follows the primary's journal (``--follow``). The layout's node groups are spread evenly, in order,
over all hosts (``cluster.hosts`` divides them: JobConfig checks it), and a worker fetches only from
its own host's server (host 0: the primary, else the host's replica) through that host's own
shared-memory directory; so with ``--layout ddp --workers N --hosts N`` each host runs one dual worker
on its data shard, ddp across hosts. Placement never changes the weights: the coordinator's plan,
seeds and data order are those of the loopback cluster, and the run ends bitwise equal to
``zoctl reference``.

A replica is restarted in place like any other process (same port, same data directory: it recovers
from its own snapshot + journal and follows again); a worker whose replica is away fails its fetch
and its forwards are re-assigned. The namespaces, links and shared-memory directories are torn
down by ``shutdown()`` (also on Ctrl-C), and a crashed run's by the next run (``cleanup_stale``).
"""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.cluster.hosts import HostNetwork, check_can_make_hosts
from coordinator.cluster.linkstats import LinkMeter
from coordinator.cluster.local import LocalCluster
from distzo.common.dtypes import ITEMSIZE
from distzo.infra.logs import kv
from distzo.infra.procs import ServiceFailed, python_module
from distzo.infra.rpc import make_channel
from paramserver.dataplane.client import ParamServerClient
from paramserver.service import SERVICE

log = logging.getLogger("distzo.hostcluster")
SERVING_TIMEOUT_S = 300.0


def replica_states(primary: str | None, replicas: dict[str, str], creds) -> list[dict]:  # noqa: ANN001 - Credentials
    """Per replica (``{host: address}``): state ``serving`` (following, caught up), ``behind`` (serving, more than one
    step behind the primary), ``not-serving`` (catching up, or its follower died), ``dead`` (unreachable); its
    applied version and its lag behind the primary's, in steps (None when unknown)."""
    def version(address: str | None) -> int | None:
        if address is None:
            return None
        client = ParamServerClient(address, creds)
        try:
            return client.connect().applied_version(timeout_s=3)
        except Exception:  # noqa: BLE001 - unreachable or not answering: reported as unknown
            return None
        finally:
            client.close()

    head = version(primary)
    out = []
    for host, address in sorted(replicas.items(), key=lambda kv_: int(kv_[0])):
        channel = make_channel(address, creds)
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=3).status
        except grpc.RpcError:
            status = None
        finally:
            channel.close()
        v = version(address) if status is not None else None
        lag = head - v if head is not None and v is not None else None
        state = ("dead" if status is None else "not-serving" if status != health_pb2.HealthCheckResponse.SERVING
                 else "behind" if lag is not None and lag > 1 else "serving")
        out.append({"host": host, "address": address, "state": state, "version": v, "lag": lag})
    return out


class HostsCluster(LocalCluster):
    """A LocalCluster whose processes live on ``cfg.cluster.hosts`` simulated hosts; ``net``, ``meter``."""

    PRESTART = False  # a host's workers fetch from its replica, whose address is known only once it is up

    def __post_init__(self) -> None:
        check_can_make_hosts()  # before anything is written: not root is one line, exit 2
        super().__post_init__()
        self.hosts = self.cfg.cluster.hosts
        self.net = HostNetwork(self.hosts, self.cfg.cluster.link_rate)
        self.replica_ports: dict[int, int] = {}
        self.meter = LinkMeter(self.hosts, self.net.link_counters, self.cfg.train.steps)
        self.links_metrics_port = 0

    # ------------------------------------------------------------------ placement
    def host_ip(self, host: int) -> str:
        return self.net.address(host)

    def _in_host(self, host: int, argv: list[str]) -> list[str]:
        return self.net.exec_argv(host, argv)

    def _node_host(self, node: int) -> int:
        nodes = self.cfg.layout.workers // self.cfg.layout.node_size
        return node // (nodes // self.hosts)

    def _node_servers(self, node: int) -> list[str]:
        host = self._node_host(node)
        return [self.replica_address(host)] if host else []

    def _server_args(self, host: int) -> list[str]:
        return ["--set", f"server.shm_dir={self.net.shm_dir(host)}"]

    def replica_address(self, host: int) -> str:
        return f"{self.host_ip(host)}:{self.replica_ports[host]}"

    # ------------------------------------------------------------------ replicas
    def _start_replica(self, host: int) -> None:
        listen = f"{self.host_ip(host)}:{self.replica_ports.get(host, 0)}"
        data_dir = self.run_dir / "hosts" / f"host-{host}" / "server"
        p = self._spawn(f"replica-{host}", python_module(
            "paramserver", "--config", str(self.config_path), "--data-dir", str(data_dir), "--listen", listen,
            "--follow", self.server_address, *self._server_args(host), *self._v(host)), host=host)
        self.replica_ports[host] = p.info["port"]

    def _start_replicas(self) -> None:
        for host in range(1, self.hosts):
            name = f"replica-{host}"
            self._restarters[name] = lambda host=host: self._start_replica(host)
            before = self.net.link_counters(host)
            self._launch(name, self._restarters[name])
            self.wait_serving(self.replica_address(host))  # its workers start only once it has caught up
            after = self.net.link_counters(host)
            self.meter.initial_sync[host] = (after[0] - before[0], after[1] - before[1])
            log.info("replica serving", extra=kv(host=host, address=self.replica_address(host),
                                                 sync_bytes=sum(self.meter.initial_sync[host])))

    def health(self, address: str, timeout_s: float = 5.0) -> int:
        """The gRPC health status of the parameter server at ``address`` (health_pb2 enum)."""
        channel = make_channel(address, self.creds)
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                              timeout=timeout_s)
            return reply.status
        finally:
            channel.close()

    def wait_serving(self, address: str, timeout_s: float = SERVING_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health(address) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise ServiceFailed(f"the parameter server at {address} did not report SERVING in {timeout_s:.0f}s")
            time.sleep(0.1)

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self.net.create()
        self.meter.begin()
        self.links_metrics_port = self.meter.serve("127.0.0.1")
        super().start()

        client = ParamServerClient(self.server_address, self.creds).connect()
        try:
            m = client.shards[0].manifest
            itemsize = ITEMSIZE[m.served_dtype]
            self.meter.model_bytes = sum(b.numel for b in m.blocks) * itemsize
        finally:
            client.close()

    def _cluster_info(self) -> dict:
        return {"hosts": self.hosts, "hosts_run_id": self.net.rid,
                "replicas": {str(h): self.replica_address(h) for h in self.replica_ports}}

    def metrics_endpoints(self) -> dict[str, str]:
        out = super().metrics_endpoints()
        if self.links_metrics_port:
            out["links"] = f"http://127.0.0.1:{self.links_metrics_port}/metrics"
        return out

    def wait(self, on_status=None, poll_s: float = 0.25):  # noqa: ANN001, ANN201 - as LocalCluster.wait
        def observe(st) -> None:  # noqa: ANN001 - a JobStatus
            self.meter.observe(st.state, st.step, len(st.evals))
            if on_status is not None:
                on_status(st)

        return super().wait(observe, poll_s)

    def link_report(self) -> dict:
        return {"hosts": self.hosts, "run_id": self.net.rid, **self.meter.report()}

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self.meter.close()
            self.net.teardown()
