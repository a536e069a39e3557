"""A streamed Response's generator closed at any point (its client left) leaves the
stored response ``cancelled`` and closes its gRPC events: closed at its first events,
it stayed ``in_progress`` for good and its call ran on."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from salience_server.http import responses
from salience_server.http.response_store import ResponseStore, StoredResponse


class _Plan:
    """The part of a ResponsePlan ``responses._stream`` uses."""

    def reply_stream(self) -> Any:
        return SimpleNamespace(event=lambda kind, **_: f"{kind}\n", fail=lambda: [], items=[])

    def response(self, status: str, items: list[Any], **_: Any) -> dict[str, Any]:
        return {"id": "resp_1", "status": status}

    def store_unfinished(
        self, backend: Any, status: str, items: list[Any], error: Any = None
    ) -> None:
        backend.responses.put(
            StoredResponse(self.response(status, items)), replacing=status != "in_progress"
        )


class _Events:
    """A call that never ends by itself."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(60)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize("sent", [1, 2], ids=["after response.created", "after in_progress"])
def test_a_stream_closed_at_its_first_events_is_cancelled(sent: int) -> None:
    async def main() -> tuple[str, bool]:
        backend = SimpleNamespace(responses=ResponseStore(10))
        events = _Events()
        stream = responses._stream(backend, _Plan(), None, events)  # type: ignore[arg-type]
        for _ in range(sent):
            await stream.__anext__()
        assert backend.responses.get("resp_1").response["status"] == "in_progress"
        await stream.aclose()
        return backend.responses.get("resp_1").response["status"], events.closed

    assert asyncio.run(main()) == ("cancelled", True)


def test_a_response_deleted_while_it_streams_stays_deleted() -> None:
    store = ResponseStore(10)
    store.put(StoredResponse({"id": "resp_1", "status": "in_progress"}))
    assert store.delete("resp_1")
    store.put(StoredResponse({"id": "resp_1", "status": "completed"}), replacing=True)
    assert store.get("resp_1") is None
