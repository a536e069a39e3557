"""Unary RPCs that are no session's: a failed call becomes ``SalienceClientError``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from salience_client.types import SalienceClientError

_Response = TypeVar("_Response")


def call_unary(method: Callable[..., _Response], request: Any, timeout: float | None) -> _Response:
    """Calls a unary RPC, turning a failed call into SalienceClientError."""
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise SalienceClientError.from_rpc_error(error) from None


async def await_unary(
    method: Callable[..., Awaitable[_Response]], request: Any, timeout: float | None
) -> _Response:
    """Awaits a unary RPC, turning a failed call into SalienceClientError."""
    try:
        return await method(request, timeout=timeout)
    except grpc.RpcError as error:
        raise SalienceClientError.from_rpc_error(error) from None
