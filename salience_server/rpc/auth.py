"""Optional bearer-token authentication of the gRPC service.

With an API key configured, every call but the health and reflection services must
carry ``authorization: Bearer <key>`` metadata; others end UNAUTHENTICATED.
"""

from __future__ import annotations

from typing import Any

import grpc

from salience_client.auth import is_bearer
from salience_server.engine.errors import Code, SalienceError
from salience_server.rpc.errors import abort
from salience_server.rpc.handlers import HandlerInterceptor

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(HandlerInterceptor):
    def __init__(self, api_key: str) -> None:
        self._key = api_key.encode()

    def handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if is_bearer(given, self._key):
            return handler
        return _refusing(handler)


def _refusal() -> SalienceError:
    return SalienceError(
        Code.UNAUTHENTICATED,
        "UNAUTHENTICATED",
        "a valid 'authorization: Bearer <key>' metadata entry is required",
    )


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape that ends the call UNAUTHENTICATED (a stream's, as
    every stream's handler here, a coroutine that writes: it writes nothing)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, _refusal())

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.unary_unary_rpc_method_handler
    )
    return make(refuse, handler.request_deserializer, handler.response_serializer)
