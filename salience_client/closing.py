"""A client's close: every RPC of its stub, which its sessions share, then fails with
``CLIENT_CLOSED`` (sync and asyncio), and a call the close cut off says so."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import grpc

from salience_client.pb import salience_pb2 as pb
from salience_client.types import SalienceClientError

CLIENT_CLOSED = "CLIENT_CLOSED"


def refuse_calls(stub: Any) -> None:
    """After its client closed: every RPC of ``stub``, which the client's sessions share,
    raises FAILED_PRECONDITION ``CLIENT_CLOSED`` (grpc's own error, a ValueError or an
    aio UsageError, escaped code that catches SalienceClientError)."""
    for method in pb.DESCRIPTOR.services_by_name["Salience"].methods:
        setattr(stub, method.name, _ClosedMethod())


def is_refusing(stub: Any) -> bool:
    """Whether ``stub``'s client was closed (``refuse_calls``)."""
    return isinstance(getattr(stub, "Generate", None), _ClosedMethod)


def client_closed() -> SalienceClientError:
    """The error of a call through a closed client."""
    return SalienceClientError(
        grpc.StatusCode.FAILED_PRECONDITION,
        CLIENT_CLOSED,
        "the client was closed: its sessions can no longer be used",
    )


@contextlib.contextmanager
def closed_client_calls(stub: Any) -> Iterator[None]:
    """Turns the ``asyncio.CancelledError`` of a call cut off by its client's close into
    CLIENT_CLOSED (grpc.aio cancels a closed channel's calls); the cancellation of the
    task itself passes through."""
    try:
        yield
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if is_refusing(stub) and task is not None and not task.cancelling():
            raise client_closed() from None
        raise


class _ClosedMethod:
    """An RPC of a closed client: called plainly or ``with_call``, it raises."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise client_closed()

    with_call = __call__
