"""Requests whose bytes do not parse end INVALID_ARGUMENT (``MALFORMED_REQUEST``).

grpc's asyncio server parses a request before any handler runs, and ends a call whose
parser raised UNKNOWN ("Unexpected <class 'DecodeError'>..."): SPEC 2.5 allows no
UNKNOWN for bad input. This interceptor gives each unary-request handler a parser that
returns a ``Malformed`` marker instead of raising, and a behavior that answers the
marker with a proper status before the service sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from salience_server.engine.errors import SalienceError, invalid
from salience_server.rpc.errors import abort


@dataclass(frozen=True)
class Malformed:
    """What a request's parser returned for bytes it could not parse."""

    method: str
    error: str


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.unary_unary:
            make = grpc.unary_unary_rpc_method_handler
            behavior = handler.unary_unary
        elif handler.unary_stream:
            make = grpc.unary_stream_rpc_method_handler
            behavior = handler.unary_stream
        else:  # streaming requests (reflection) keep grpc's own handling
            return handler
        return make(
            _checking(behavior),
            request_deserializer=_tolerant(handler.request_deserializer, handler_call_details),
            response_serializer=handler.response_serializer,
        )


def _tolerant(parse: Callable[[bytes], Any], details: grpc.HandlerCallDetails) -> Any:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return Malformed(str(details.method), str(error))

    return parse_or_mark


def _refusal(request: Malformed) -> SalienceError:
    return invalid(
        "MALFORMED_REQUEST",
        f"the request to {request.method} does not parse: {request.error}",
    )


def _checking(behavior: Any) -> Any:
    """Wraps a behavior, keeping its kind (an async generator stays one), so that a
    ``Malformed`` request is refused before it runs."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await abort(context, _refusal(request))
            async for response in behavior(request, context):
                yield response

        return streaming

    async def returning(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await abort(context, _refusal(request))
        return await behavior(request, context)

    return returning
