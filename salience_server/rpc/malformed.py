"""Requests whose bytes do not parse end INVALID_ARGUMENT (``MALFORMED_REQUEST``).

grpc's asyncio server parses a request before any handler runs, and ends a call whose
parser raised UNKNOWN ("Unexpected <class 'DecodeError'>..."): SPEC 2.5 allows no
UNKNOWN for bad input. This interceptor gives each unary-request handler a parser that
returns a ``Malformed`` marker instead of raising, and a behavior that answers the
marker with a proper status before the service sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from salience_server.engine.errors import SalienceError, invalid
from salience_server.rpc.errors import abort
from salience_server.rpc.handlers import HandlerInterceptor, with_prelude


@dataclass(frozen=True)
class Malformed:
    """What a request's parser returned for bytes it could not parse."""

    method: str
    error: str


class MalformedRequestInterceptor(HandlerInterceptor):
    def handler(
        self, handler: grpc.RpcMethodHandler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        if not (handler.unary_unary or handler.unary_stream):
            return handler  # streaming requests (reflection) keep grpc's own handling
        parse = _tolerant(handler.request_deserializer, handler_call_details)
        return with_prelude(handler, _refuse_malformed, parse)


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


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Malformed):
        await abort(context, _refusal(request))
