"""The one client of the coordinator's RPCs: zoctl's control commands, ``zoctl up``'s local cluster
and the workers' sessions all call it through ``CoordinatorClient``.

Every call carries the bearer token (state-changing methods need it) and a deadline; the
channel honours the credentials' TLS settings (``distzo.infra.rpc.make_channel``).
"""

from __future__ import annotations

from typing import Any, Iterator

from distzo.infra.rpc import Credentials, make_channel
from protos import coordinator_pb2 as cpb
from protos import coordinator_pb2_grpc as cpb_grpc


class CoordinatorClient:
    """A channel to the coordinator at ``address`` (host:port). Errors are ``grpc.RpcError``."""

    def __init__(self, address: str, creds: Credentials | None = None):
        self.address = address
        self.creds = creds or Credentials()
        self.channel = make_channel(address, self.creds)
        self.stub = cpb_grpc.CoordinatorStub(self.channel)

    def call(self, method: str, request: Any, timeout: float = 30.0) -> Any:
        """A unary RPC by name (``"Pause"``, ``"Export"``, ...), with the token and ``timeout`` seconds."""
        return getattr(self.stub, method)(request, timeout=timeout, metadata=self.creds.call_metadata())

    def status(self, timeout: float = 10.0) -> cpb.JobStatus:
        return self.call("GetStatus", cpb.StatusQuery(), timeout)

    def session(self, messages: Iterator[cpb.WorkerMessage]) -> Any:
        """A worker's bidirectional session: ``messages`` up, the coordinator's messages back (cancellable call)."""
        return self.stub.Session(messages, metadata=self.creds.call_metadata())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
