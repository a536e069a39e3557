"""Names the replica in the initial metadata of every response (SPEC 2.7).

Behind a proxy, a client learns from ``salience-replica`` which server answered it; the
tests and the logs use it to tell the replicas apart.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

REPLICA_METADATA = "salience-replica"


class ReplicaInterceptor(grpc.aio.ServerInterceptor):
    """Sends ``salience-replica: <replica_id>`` before anything else, on every call
    (health, reflection and refused calls included)."""

    def __init__(self, replica_id: str = "") -> None:
        self.replica_id = replica_id
        """Set by the server once its port is bound (the default id is host:port)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _naming(handler, ((REPLICA_METADATA, self.replica_id),))


def _naming(handler: grpc.RpcMethodHandler, metadata: tuple[tuple[str, str], ...]) -> Any:
    """A handler of the same shape that sends ``metadata`` first."""
    if handler.unary_unary:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    return make(
        _sending_first(behavior, metadata),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _sending_first(behavior: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
    """Wraps a behavior, keeping its kind: an async generator (yielding responses) stays
    one; a coroutine (returning a response, or writing through ``context.write``) too."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.send_initial_metadata(metadata)
            async for response in behavior(request, context):
                yield response

        return streaming

    async def returning(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.send_initial_metadata(metadata)
        return await behavior(request, context)

    return returning
