"""Server-sent events, and tying the gRPC work to the HTTP client's connection.

A streaming request pulls its first event before the response starts, so that errors
the server raises up front (a prompt too long, a full queue) are plain HTTP errors;
later errors become error events in the stream. When the first event takes longer than
the keep-alive interval (a queue wait, a long prefill), the stream starts anyway and
sends SSE comments (``: keep-alive``) until it comes, and whenever events pause that
long, so that proxies and SDK read timeouts do not give up on it. When the client
disconnects, Starlette cancels the stream's task and closing the event iterators
cancels the gRPC calls; for a non-streaming request ``until_disconnected`` does the same.
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
KEEPALIVE = ": keep-alive\n\n"
"""An SSE comment: clients ignore it, connections see traffic."""


def sse_data(payload: dict[str, Any] | str) -> str:
    """One ``data:`` event (a JSON object, or a literal such as ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def sse_event(name: str, payload: dict[str, Any]) -> str:
    """One named event (the Responses API names every event after its ``type``)."""
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def event_stream(events: AsyncIterator[str], keepalive_s: float = 0.0) -> StreamingResponse:
    """The HTTP response streaming ``events`` as ``text/event-stream``, with a keep-alive
    comment after every ``keepalive_s`` without an event (0: none)."""
    if keepalive_s > 0:
        events = with_keepalive(events, keepalive_s)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def with_keepalive(chunks: AsyncIterator[str], interval_s: float) -> AsyncIterator[str]:
    """``chunks``, with ``KEEPALIVE`` whenever none came for ``interval_s``. Waiting never
    cancels the pending chunk; closing this iterator closes ``chunks``."""
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(chunks))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield chunk
    finally:
        await _cancel(pending)
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


async def _next(iterator: AsyncIterator[_Item]) -> _Item:
    return await iterator.__anext__()


async def _cancel(task: asyncio.Future[Any] | None) -> None:
    """Cancels a task that may still run and waits for it to wind down."""
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


class Primed(AsyncIterator[_Item]):
    """An async iterator whose first item has been asked for ahead of iteration: fetched
    already (or the iterator was empty), or still coming in a task of its own."""

    def __init__(self, iterator: AsyncIterator[_Item]) -> None:
        self._iterator = iterator
        self._first: list[_Item] = []
        self._pending: asyncio.Future[Primed[_Item]] | None = None

    async def prime(self) -> Primed[_Item]:
        """Fetches the first item now, so that an early failure raises here."""
        with contextlib.suppress(StopAsyncIteration):
            self._first.append(await self._iterator.__anext__())
        return self

    def __aiter__(self) -> Primed[_Item]:
        return self

    async def __anext__(self) -> _Item:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending
        if self._first:
            return self._first.pop()
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Closes the underlying iterator (cancelling its gRPC call)."""
        await _cancel(self._pending)
        close = getattr(self._iterator, "aclose", None)
        if close is not None:
            await close()


async def start_stream(
    request: Request,
    events: AsyncIterator[_Item],
    param: str,
    wait_s: float = 0.0,
    constraint_param: str = "",
) -> Primed[_Item]:
    """``events`` with the first asked for now: a failure before anything streamed (a
    prompt too long, a full queue) is a plain HTTP error naming ``param`` (a refused
    output constraint, ``constraint_param``). With ``wait_s`` > 0, the
    first event is awaited that long at most; after that the stream starts and the
    first event (or error) comes in it. A client that leaves meanwhile cancels the
    call at once (its prefill ran on to the first keep-alive, ``wait_s`` later)."""
    return await until_disconnected(request, _primed(events, param, wait_s, constraint_param))


async def _primed(
    events: AsyncIterator[_Item], param: str, wait_s: float, constraint_param: str
) -> Primed[_Item]:
    primed = Primed(events)
    first = asyncio.ensure_future(primed.prime())
    try:
        done, _ = await asyncio.wait({first}, timeout=wait_s if wait_s > 0 else None)
        if first in done:
            with client_errors(param, constraint_param):
                first.result()
        else:
            primed._pending = first
    except BaseException:
        await _cancel(first)
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
