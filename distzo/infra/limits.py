"""Size bounds on every string, bytes and repeated field of every request, checked before use.

``SizeLimits`` is a server interceptor: each incoming message (each message of a request
stream too) is walked field by field and refused with INVALID_ARGUMENT naming the field, its
size and the bound, before a handler sees it. The error never quotes the input, so its size
does not grow with it. Servers also cap whole messages (``max_receive_message_length``).
"""

from __future__ import annotations

from typing import Callable, Iterator

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from distzo.common.config import MAX_CONFIG_BYTES
from distzo.common.configsections import MAX_TEXT
from distzo.infra.handlers import rewrap

STRING = MAX_TEXT  # characters (bytes for bytes fields) of any field not listed below
REPEATED = 4096  # entries of any repeated field not listed below
from distzo.common.wire_sizes import MAX_DIRECTIONS  # noqa: E402 - (seed, g) pairs in one update; layout.q is bounded by it
MAX_ERROR = 8192  # a worker's error text
LIMITS: dict[str, int] = {
    "distzo.v1.StartJobRequest.config_yaml": MAX_CONFIG_BYTES,
    "distzo.v1.UpdateRecord.directions": MAX_DIRECTIONS,
    "distzo.v1.UpdateRequest.job_id": 64,
    "distzo.v1.UpdateRequest.job_identity_json": 64 << 10,
    "distzo.v1.FetchRequest.dtype": 64,
    "distzo.v1.WorkerHello.worker_id": 256,
    "distzo.v1.WorkerHello.host": 256,
    "distzo.v1.WorkerHello.node_id": 512,
    "distzo.v1.WorkerHello.device": 64,
    "distzo.v1.WorkerHello.capabilities": 64,
    "distzo.v1.Heartbeat.state": 64,
    "distzo.v1.WorkResult.error": MAX_ERROR,
    "distzo.v1.WorkResult.error_kind": 64,
    "distzo.v1.WorkResult.block_digests": 1 << 16,
    "distzo.v1.ForwardResult.scores": 1 << 20,
    "distzo.v1.Timing.transport": 64,
}


def _limit(fd: FieldDescriptor) -> int:
    return LIMITS.get(fd.full_name, REPEATED if fd.is_repeated else STRING)


def oversized(msg: Message) -> str | None:
    """The first field over its bound, described without its contents; None when all fit."""
    for fd, value in msg.ListFields():
        if fd.is_repeated:
            if len(value) > _limit(fd):
                return f"{fd.full_name} has {len(value)} entries; at most {_limit(fd)}"
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    problem = oversized(item)
                    if problem:
                        return problem
            elif fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                for item in value:
                    if len(item) > STRING:
                        return f"an entry of {fd.full_name} has {len(item)} characters; at most {STRING}"
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            problem = oversized(value)
            if problem:
                return problem
        elif fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and len(value) > _limit(fd):
            unit = "bytes" if fd.type == FieldDescriptor.TYPE_BYTES else "characters"
            return f"{fd.full_name} has {len(value)} {unit}; at most {_limit(fd)}"
    return None


class SizeLimits(grpc.ServerInterceptor):
    """Refuses any request message with a field over its bound (INVALID_ARGUMENT)."""

    def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        handler = continuation(details)
        if handler is None:
            return None

        def check(msg: object, context: grpc.ServicerContext) -> bool:
            problem = oversized(msg) if isinstance(msg, Message) else None
            if problem is None:
                return True
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(f"request too large: {problem}")
            return False

        def unary_in(fn: Callable) -> Callable:
            def call(request, context):  # noqa: ANN001, ANN202
                if not check(request, context):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request too large: {oversized(request)}")
                return fn(request, context)

            return call

        def stream_in(fn: Callable) -> Callable:
            def call(requests, context):  # noqa: ANN001, ANN202
                def checked() -> Iterator[object]:
                    for msg in requests:
                        if not check(msg, context):
                            context.cancel()  # ends the call; the handler sees the stream end
                            return
                        yield msg

                return fn(checked(), context)

            return call

        return rewrap(handler, lambda request_streams, _: stream_in if request_streams else unary_in)
