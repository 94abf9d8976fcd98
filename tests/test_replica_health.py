"""A replica whose follower thread has died must not keep reporting SERVING (gRPC health, metrics)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clusterhelpers import wait_until
from distzo.zo.record import Direction
from paramserver import metrics
from paramserver.dataplane.wire import UpdateRecord
from paramserver.service import SERVICE
from pshelpers import Servers, server_config


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def health(address: str, service: str = SERVICE) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def record(t: int) -> UpdateRecord:
    return UpdateRecord(t, (Direction(1000 + t, 0.3),), 1e-3, 0.0)


def test_a_replica_whose_follower_died_reports_not_serving(servers, cache_dir, tmp_path, monkeypatch):
    cfg = server_config(cache_dir)
    primary = servers.start(cfg, tmp_path / "p")
    replica = servers.start(cfg, tmp_path / "r", follow=primary.address, name="replica-dies")
    pc = servers.client(primary.address)
    pc.apply_update(record(0))
    wait_until(lambda: health(replica.address) == health_pb2.HealthCheckResponse.SERVING, 60, "the replica serving")
    wait_until(lambda: replica.state.store.applied_version() == 1, 60, "the replica applying step 0")
    assert metrics.REPLICA_FOLLOWING._value.get() == 1

    def broken(rec):  # noqa: ANN001 - the replica can no longer apply (e.g. its disk failed)
        raise OSError("journal disk failed")

    monkeypatch.setattr(replica.state, "submit", broken)
    pc.apply_update(record(1))
    wait_until(lambda: not replica.follower.is_alive(), 60, "the follower thread ending")
    assert isinstance(replica.follower.error, OSError)
    assert replica.follower_dead.is_set()  # paramserver.server.run() exits on it (exit code 1): the supervisor restarts it
    for service in (SERVICE, ""):
        assert health(replica.address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert metrics.REPLICA_FOLLOWING._value.get() == 0
    assert health(primary.address) == health_pb2.HealthCheckResponse.SERVING  # the primary is not affected

