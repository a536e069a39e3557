"""Server-sent events, and tying the gRPC work to the HTTP client's connection.

A streaming request pulls its first event before the response starts, so that errors
the server raises up front (a prompt too long, a full queue) are plain HTTP errors;
later errors become error events in the stream. When the client disconnects, Starlette
cancels the stream's task and closing the event iterators cancels the gRPC calls; for a
non-streaming request ``until_disconnected`` does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from salience_server.http.errors import ApiError, client_errors

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: dict[str, Any] | str) -> str:
    """One ``data:`` event (a JSON object, or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_event(name: str, payload: dict[str, Any]) -> str:
    """One named event (the Responses API names every event after its ``type``)."""
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The HTTP response streaming ``events`` as ``text/event-stream``."""
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


class Primed(AsyncIterator[_Item]):
    """An async iterator whose first item has already been fetched (or which was empty)."""

    def __init__(self, iterator: AsyncIterator[_Item]) -> None:
        self._iterator = iterator
        self._first: list[_Item] = []

    async def prime(self) -> Primed[_Item]:
        """Fetches the first item now, so that an early failure raises here."""
        with contextlib.suppress(StopAsyncIteration):
            self._first.append(await self._iterator.__anext__())
        return self

    def __aiter__(self) -> Primed[_Item]:
        return self

    async def __anext__(self) -> _Item:
        if self._first:
            return self._first.pop()
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Closes the underlying iterator (cancelling its gRPC call)."""
        close = getattr(self._iterator, "aclose", None)
        if close is not None:
            await close()


async def start_stream(events: AsyncIterator[_Item], param: str) -> Primed[_Item]:
    """``events`` with the first fetched now, so that a failure before anything streamed
    (a prompt too long, a full queue) is a plain HTTP error."""
    primed = Primed(events)
    try:
        with client_errors(param):
            await primed.prime()
    except BaseException:
        await primed.aclose()
        raise
    return primed


async def until_disconnected(request: Request, work: Awaitable[_Result]) -> _Result:
    """Awaits ``work``, cancelling it if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # let the work's cleanup (cancelling its gRPC calls) run
    # Nobody will read this answer; returning one keeps the server's log quiet.
    raise ApiError(499, "the client disconnected", "client_closed_request")


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has disconnected (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
