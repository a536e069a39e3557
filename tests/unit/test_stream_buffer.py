"""A stream's buffer is bounded (SPEC 2.6): a reader that leaves too many events unread
is cancelled alone, and the engine never waits for it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from salience_server.engine.request import DoneEvent, FinishReason, TokenEvent
from salience_server.rpc.servicer import SalienceServicer


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str, metadata: Any = ()) -> None:
        raise _Aborted(code, details)


class _Request:
    is_cancelled = False
    is_delivered = False


class _Thread:
    def check_alive(self) -> None:
        """A live engine thread."""


class _Engine:
    """Sends ``num_events`` events at once from the engine's side, as one step can."""

    def __init__(self, num_events: int) -> None:
        self.num_events = num_events
        self.request = _Request()
        self.thread = _Thread()

    def submit(self, sink: Any) -> _Request:
        for position in range(self.num_events):
            sink(TokenEvent(position, 1, True))
        sink(DoneEvent(1, 0, 1, FinishReason.PREFILL, 0, 0, 0.0, 0.0, 0.0))
        return self.request

    def cancel(self, request: Any) -> None:
        request.is_cancelled = True

    def delivered(self, request: Any) -> None:
        request.is_delivered = True


async def _read_all(servicer: SalienceServicer, engine: _Engine) -> list[Any]:
    events = []
    async for event in servicer._events(_Context(), engine.submit):  # type: ignore[arg-type]
        events.append(event)
    return events


def test_a_reader_within_the_buffer_gets_every_event() -> None:
    servicer = SalienceServicer(stream_buffer_events=64)
    servicer.engine = _Engine(40)  # type: ignore[assignment]
    events = asyncio.run(_read_all(servicer, servicer.engine))  # type: ignore[arg-type]
    assert [e.position for e in events[:-1]] == list(range(40))
    assert isinstance(events[-1], DoneEvent)
    assert servicer.engine.request.is_delivered  # type: ignore[attr-defined]


def test_a_reader_past_the_buffer_is_cancelled_alone() -> None:
    servicer = SalienceServicer(stream_buffer_events=16)
    engine = _Engine(40)
    servicer.engine = engine  # type: ignore[assignment]
    received: list[Any] = []

    async def read() -> None:
        async for event in servicer._events(_Context(), engine.submit):  # type: ignore[arg-type]
            received.append(event)

    with pytest.raises(_Aborted) as caught:
        asyncio.run(read())
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "16 events unread" in caught.value.details
    assert [e.position for e in received] == list(range(16))  # nothing lost before the cut
    assert engine.request.is_cancelled  # the engine drops it at its next step
    assert engine.request.is_delivered  # its session's idle time starts
