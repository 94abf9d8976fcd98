"""Prometheus metrics shared by every service: the HTTP endpoint and gRPC request metrics.

Naming follows Prometheus conventions: a ``distzo_`` prefix, base units (``_seconds``,
``_bytes``), counters ending ``_total``, and no step or seed labels (unbounded cardinality).
Each service defines its own metrics in its package (``*/metrics.py``); all of them live in
the process's default registry, so in-process test instances share one set.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from distzo.infra.handlers import rewrap

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

GRPC_HANDLED = Counter("distzo_grpc_server_handled_total", "gRPC calls completed by the server",
                       ["service", "method", "code"])
GRPC_SECONDS = Histogram("distzo_grpc_server_handling_seconds", "Time from call start to its last response",
                         ["service", "method"], buckets=LATENCY_BUCKETS)


def start_metrics_server(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics on host:port (0: a free port); returns the bound port, None when disabled."""
    if port is None or port < 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as exc:  # in use, or a host that is not this machine's
        raise OSError(f"cannot serve metrics on port {port} of {host}: {exc.strerror or exc} "
                      "(choose another --metrics-port, 0 for a free one, -1 for none)") from None
    return int(server.server_port)


def _code_of(context: grpc.ServicerContext, exc: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "UNKNOWN" if exc is not None else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class GrpcMetrics(grpc.ServerInterceptor):
    """Counts every call by method and status code and times it (streams: until the last message)."""

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        handler = continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")

        def observe(context: grpc.ServicerContext, start: float, exc: BaseException | None) -> None:
            GRPC_HANDLED.labels(service, method, _code_of(context, exc)).inc()
            GRPC_SECONDS.labels(service, method).observe(time.perf_counter() - start)

        def wrap_unary(fn: Callable):  # noqa: ANN202
            def call(request_or_iterator, context):  # noqa: ANN001, ANN202
                start = time.perf_counter()
                try:
                    out = fn(request_or_iterator, context)
                except BaseException as exc:
                    observe(context, start, exc)
                    raise
                observe(context, start, None)
                return out

            return call

        def wrap_stream(fn: Callable):  # noqa: ANN202
            def call(request_or_iterator, context):  # noqa: ANN001, ANN202
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    yield from fn(request_or_iterator, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    observe(context, start, exc)

            return call

        return rewrap(handler, lambda _, response_streams: wrap_stream if response_streams else wrap_unary)
