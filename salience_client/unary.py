"""Unary RPCs made outside a session's recovery: a failed call becomes
``SalienceClientError``; a session closed in the background."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.types import SalienceClientError

_Response = TypeVar("_Response")

_CLEANUPS: set[asyncio.Task[None]] = set()
"""Background closes still running (the event loop keeps only weak references to
tasks)."""
CLEANUP_TIMEOUT_S = 10.0
"""The bound of a background close where the client sets none."""


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


def close_in_background(
    stub: Any, session_id: str, metadata: Sequence[tuple[str, str]], timeout: float | None
) -> None:
    """Closes ``session_id`` through an asyncio ``stub`` in a task of its own, ignoring
    failures (it may not exist): a cancelled call may have made it, and its id is known
    nowhere else."""
    request = pb.CloseSessionRequest(session_id=session_id)

    async def close() -> None:
        with contextlib.suppress(grpc.RpcError, SalienceClientError):
            await stub.CloseSession(
                request, timeout=timeout or CLEANUP_TIMEOUT_S, metadata=metadata
            )

    task = asyncio.get_running_loop().create_task(close())
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)
