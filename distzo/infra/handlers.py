"""gRPC method handlers rewrapped by the servers' interceptors (request limits, metrics): the one table of the
four handler kinds, so an interceptor says only how it wraps a unary or a streaming side."""

from __future__ import annotations

from typing import Callable

import grpc

# (request_streaming, response_streaming) -> the handler's behaviour attribute and the factory of its kind
KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def rewrap(handler: grpc.RpcMethodHandler,
           wrapper: Callable[[bool, bool], Callable[[Callable], Callable]]) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped by ``wrapper(request_streaming, response_streaming)``: the same kind,
    request deserializer and response serializer."""
    streams = (handler.request_streaming, handler.response_streaming)
    attr, make = KINDS[streams]
    return make(wrapper(*streams)(getattr(handler, attr)), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
