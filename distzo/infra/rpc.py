"""gRPC plumbing shared by the services: channels, TLS, bearer-token auth, health, ready files."""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
import threading
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distzo.common.wire_sizes import MAX_MESSAGE_BYTES

log = logging.getLogger("distzo.rpc")

# Service ports (the k8s manifests use these too; tests/test_k8s.py checks they agree)
PORTS = {"paramserver": 7070, "paramserver_control": 7071, "coordinator": 7080,
         "paramserver_metrics": 9400, "coordinator_metrics": 9401, "worker_metrics": 9402}
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Unary control calls retry transient failures inside the channel (gRPC's own retry policy).
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


def server_options(max_receive: int = MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    """Servers accept the clients' keepalive pings (every 20 s, also between calls) without GOAWAY;
    ``max_receive`` caps a whole request message (RESOURCE_EXHAUSTED above it). A port is never shared: gRPC
    sets SO_REUSEPORT by default, which lets a second process bind a port a running service listens on and
    then splits the connections between the two (a client would reach the wrong one): off."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options() -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        *_KEEPALIVE,
    ]


@dataclass(frozen=True)
class Credentials:
    """What a process presents and checks: TLS material and the bearer token."""

    token: str | None = None
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    mutual: bool = False

    @classmethod
    def for_client(cls, token_file: str | None, ca_file: str | None, cert_file: str | None = None,
                   key_file: str | None = None) -> "Credentials":
        """A control client's credentials from files (a certificate: mutual TLS), without the config machinery (fast)."""
        from distzo.common.errors import BadInput as ConfigError  # the config module (pydantic) is not needed here

        token = None
        if token_file:
            try:
                token = Path(token_file).read_bytes().decode("utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"token file {token_file!r} cannot be read as UTF-8 text: "
                                  f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        def read(path: str | None, what: str) -> bytes | None:
            try:
                return Path(path).read_bytes() if path else None
            except OSError as exc:
                raise ConfigError(f"{what} file {path!r} cannot be read: {exc.strerror}") from None

        if (cert_file is None) != (key_file is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        cert, key = read(cert_file, "certificate"), read(key_file, "key")
        return cls(token=token, ca=read(ca_file, "CA"), cert=cert, key=key, mutual=cert is not None)

    @classmethod
    def from_config(cls, sec) -> "Credentials":  # noqa: ANN001 - a distzo.common.configsections.SecuritySection
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return cls(token=sec.resolve_token(), cert=read(sec.tls_cert), key=read(sec.tls_key), ca=read(sec.tls_ca), mutual=sec.mutual_tls)

    @property
    def tls(self) -> bool:
        return self.cert is not None or self.ca is not None

    def call_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def add_security_args(parser) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    parser.add_argument("--token-file", help="bearer token file (overrides the config's security.token_file)")
    parser.add_argument("--tls-ca", help="PEM CA that signed the peers' certificates")
    parser.add_argument("--tls-cert", help="PEM certificate of this process (TLS; mutual TLS for clients)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")


def security_from_args(args, base=None, client: bool = False):  # noqa: ANN001, ANN201
    """The config's security section (a SecuritySection) with the command-line flags applied on top."""
    from distzo.common.configsections import SecuritySection  # pydantic: not for zoctl's control commands (from_files)

    flags = {"token_file": args.token_file, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    merged = (base or SecuritySection()).model_dump() | {k: v for k, v in flags.items() if v is not None}
    if client and merged.get("tls_cert"):
        merged["mutual_tls"] = True  # a client presenting a certificate is doing mutual TLS
    return SecuritySection.model_validate(merged)


def make_channel(address: str, creds: Credentials | None = None) -> grpc.Channel:
    creds = creds or Credentials()
    if creds.tls:
        ssl = grpc.ssl_channel_credentials(
            root_certificates=creds.ca,
            private_key=creds.key if creds.mutual else None,
            certificate_chain=creds.cert if creds.mutual else None,
        )
        return grpc.secure_channel(address, ssl, options=channel_options())
    return grpc.insecure_channel(address, options=channel_options())


class BearerAuth(grpc.ServerInterceptor):
    """Rejects calls to the protected methods without the right bearer token (UNAUTHENTICATED)."""

    def __init__(self, token: str | None, protected: Iterable[str]):
        self.token = token
        self.protected = frozenset(protected)

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        if self.token is None or details.method.rsplit("/", 1)[-1] not in self.protected:
            return continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return continuation(details)
        reason = "missing bearer token" if not given else "wrong bearer token"
        method = details.method

        def deny(_request, context):  # noqa: ANN001, ANN202
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {reason}; this RPC changes state and needs 'authorization: Bearer <token>'")

        handler = continuation(details)
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(lambda it, ctx: deny(None, ctx))
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny, request_deserializer=handler.request_deserializer)
        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer if handler else None)


def has_token(context: grpc.ServicerContext, token: str | None) -> bool:
    """Does the call carry ``authorization: Bearer <token>``? (False when no token is configured.)"""
    if token is None:
        return False
    given = dict(context.invocation_metadata() or ()).get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


class Admission:
    """Bounds how many handler threads long-lived or blocking RPCs (waits, streams) may hold.

    Callers with the bearer token share ``trusted`` slots; callers without it share
    ``anonymous`` slots, so clients without the token can never hold more than that many of
    the server's threads and never starve the data plane of token holders. (With no token
    configured nobody can be told apart: everyone shares the ``trusted`` slots.) A call that
    finds no free slot is refused at once with RESOURCE_EXHAUSTED.
    """

    def __init__(self, token: str | None, trusted: int, anonymous: int):
        self.token = token
        self._slots = {True: threading.BoundedSemaphore(trusted), False: threading.BoundedSemaphore(anonymous)}
        self.limits = {True: trusted, False: anonymous}

    @contextmanager
    def slot(self, context: grpc.ServicerContext, what: str) -> Iterator[None]:
        trusted = self.token is None or has_token(context, self.token)
        sem = self._slots[trusted]
        if not sem.acquire(blocking=False):
            who = "clients with the token" if trusted and self.token else "clients without the token"
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{what}: {who} already hold {self.limits[trusted]} waiting or streaming calls; retry later")
        try:
            yield
        finally:
            sem.release()


def cancelled_event(context: grpc.ServicerContext, wake: threading.Condition | None = None) -> threading.Event:
    """An event set when the call ends (the client cancelled or went away); ``wake`` is notified then."""
    ev = threading.Event()

    def done() -> None:
        ev.set()
        if wake is not None:
            with wake:
                wake.notify_all()

    if not context.add_callback(done):
        ev.set()  # already over
    return ev


class RefuseMethods(grpc.ServerInterceptor):
    """On the data port of a server with a separate control port: refuse the state-changing RPCs."""

    def __init__(self, methods: Iterable[str], where: str):
        self.methods = frozenset(methods)
        self.where = where

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        name = details.method.rsplit("/", 1)[-1]
        handler = continuation(details)
        if name not in self.methods or handler is None:
            return handler
        where = self.where

        def deny(_request, context):  # noqa: ANN001, ANN202
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{name} is served on the control port ({where}), not this one")

        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer)


def make_server(
    creds: Credentials,
    protected: Iterable[str],
    max_workers: int = 32,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    max_receive: int = MAX_MESSAGE_BYTES,
) -> grpc.Server:
    # a server only: the limits (pydantic, the config's sizes) and Prometheus stay out of zoctl's control commands
    from distzo.infra.limits import SizeLimits
    from distzo.infra.metrics import GrpcMetrics

    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        # metrics outermost: refused calls are counted with their status too
        interceptors=[GrpcMetrics(), BearerAuth(creds.token, protected), SizeLimits(), *interceptors],
        options=server_options(max_receive),
    )


def bind(server: grpc.Server, address: str, creds: Credentials) -> int:
    """Bind (port 0 picks a free one) and return the port."""
    try:
        if creds.cert is not None:
            ssl = grpc.ssl_server_credentials(
                [(creds.key, creds.cert)], root_certificates=creds.ca, require_client_auth=creds.mutual
            )
            port = server.add_secure_port(address, ssl)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind": the address is taken, or not an address of this host
        port = 0
    if port == 0:
        shown = address if len(address) <= 100 else address[:100] + "..."
        raise OSError(f"cannot listen on {shown!r}: the port is in use, or it is not a valid HOST:PORT of this host")
    return port


def add_health_and_reflection(server: grpc.Server, service_names: Iterable[str]) -> health.HealthServicer:
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(service_names)
    for name in names:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


def write_ready_file(path: str | Path | None, info: dict[str, object]) -> None:
    """Atomically publish where a started service listens (read by zoctl up and tests)."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".")
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, p)

