"""Optional bearer-token authentication of the gRPC service.

With an API key configured, every call but the health and reflection services must
carry ``authorization: Bearer <key>`` metadata; others end UNAUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
    """A handler of the same shape that ends the call UNAUTHENTICATED."""

    async def refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context, _refusal())

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await abort(context, _refusal())
        yield  # an async generator, as a streaming handler must be

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse_unary, handler.request_deserializer, handler.response_serializer
    )
