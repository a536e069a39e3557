"""Rewrapping grpc method handlers for interceptors, keeping each handler's shape."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that rewrites the handler of each method the server has
    (``handler``); a method it does not have passes through untouched."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self.handler(handler, handler_call_details)

    def handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """The handler the call runs instead of ``handler``."""
        raise NotImplementedError


Prelude = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]
"""What runs before a call's behavior, given its request (or request iterator) and its
context; it may end the call (``context.abort``)."""


def with_prelude(
    handler: grpc.RpcMethodHandler,
    prelude: Prelude,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """A handler of the same kind (unary or streaming, either way) whose behavior runs
    ``prelude`` first; ``request_deserializer`` replaces the handler's when given."""
    return rewrapped(handler, lambda behavior: _preceded(behavior, prelude), request_deserializer)


def rewrapped(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Any], Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """A handler of the same kind (unary or streaming, either way) whose behavior is
    ``wrap(behavior)``."""
    if handler.unary_unary:
        behavior, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        behavior, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        behavior, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        behavior, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    return make(
        wrap(behavior),
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _preceded(behavior: Any, prelude: Prelude) -> Any:
    """Wraps a behavior, keeping its kind: an async generator (yielding responses) stays
    one; a coroutine (returning a response, or writing through ``context.write``, as
    every stream's handler is outside UnexpectedErrorInterceptor) too."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await prelude(request, context)
            async for response in behavior(request, context):
                yield response

        return streaming

    async def returning(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await prelude(request, context)
        return await behavior(request, context)

    return returning
