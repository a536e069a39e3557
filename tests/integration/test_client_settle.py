"""What a session's call waits for before it starts, and what ends that wait: a call its
caller left still winding down on the server is waited for within the new call's
timeout (it waited up to 30 s, whatever the timeout), and ``close()`` and ``sync()``
supersede a stream left open, as every other call does (they left it running: ``sync``
then read a busy session's length)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from salience_client import (
    AsyncSalienceClient,
    Done,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from tests.client_support import PROMPT
from tests.helpers import engine_held_in_a_step

WAIT_S = 10.0
TIMEOUT_S = 0.5


def _server(server_factory: Any, tiny_llama_dir: Path) -> Any:
    return server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)


def _check_busy_after_timeout(error: SalienceClientError, elapsed_s: float) -> None:
    """The call ended once its timeout was spent waiting (the server still ran the left
    call): it was left no time of its own."""
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert "the server still runs the call its caller left" in error.message
    assert TIMEOUT_S <= elapsed_s < TIMEOUT_S + 3, elapsed_s


def test_a_call_after_a_left_one_waits_within_its_timeout(
    tiny_llama_dir: Path, server_factory: Any
) -> None:
    """The engine is held inside the step after the left call's first token, so the
    server winds that call down only once the block ends; the next call's wait ends
    with its timeout. Then the session holds what its caller received."""
    server = _server(server_factory, tiny_llama_dir)
    with SalienceClient(server.target, timeout=30) as client, client.open_session() as session:
        session.prefill(PROMPT)
        left = session.generate([1], max_tokens=50, ignore_eos=True)
        assert isinstance(next(left), TokenEvent)
        with engine_held_in_a_step(server.engine) as in_step:  # a step after the first
            assert in_step.wait(WAIT_S)
            left.close()
            start = time.monotonic()
            with pytest.raises(SalienceClientError) as caught:
                list(session.generate([2], max_tokens=1, timeout=TIMEOUT_S))
            _check_busy_after_timeout(caught.value, time.monotonic() - start)
        done = session.prefill([3])
        expected = len(PROMPT) + 1 + 1 + 1  # the prompt, 1, the token received, 3
        assert done.total_tokens == session.length == session.info().length == expected


def test_an_async_call_after_a_left_one_waits_within_its_timeout(
    tiny_llama_dir: Path, server_factory: Any
) -> None:
    server = _server(server_factory, tiny_llama_dir)

    async def scenario() -> None:
        async with AsyncSalienceClient(server.target, timeout=30) as client:
            async with await client.open_session() as session:
                await session.prefill(PROMPT)
                left = session.generate([1], max_tokens=50, ignore_eos=True)
                assert isinstance(await anext(left), TokenEvent)
                with engine_held_in_a_step(server.engine) as in_step:
                    assert await asyncio.to_thread(in_step.wait, WAIT_S)
                    await left.aclose()
                    start = time.monotonic()
                    with pytest.raises(SalienceClientError) as caught:
                        await session.prefill([2], timeout=TIMEOUT_S)
                    _check_busy_after_timeout(caught.value, time.monotonic() - start)
                done = await session.prefill([3])
                info = await session.info()
                expected = len(PROMPT) + 1 + 1 + 1
                assert done.total_tokens == session.length == info.length == expected

    asyncio.run(scenario())


@pytest.mark.parametrize("later_call", ["sync", "close"])
def test_sync_and_close_supersede_a_stream_read_in_another_thread(
    client: SalienceClient, later_call: str
) -> None:
    session = client.open_session()
    session.prefill(PROMPT)
    paused, later_done = threading.Event(), threading.Event()
    received: list[TokenEvent | Done] = []
    failures: list[SalienceClientError] = []

    def read() -> None:
        try:
            for event in session.generate([1], max_tokens=100, ignore_eos=True):
                received.append(event)
                if len(received) == 2:
                    paused.set()
                    later_done.wait(30)  # paused between events
        except SalienceClientError as error:
            failures.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    assert paused.wait(WAIT_S)
    if later_call == "sync":
        info = session.sync()
        assert not info.is_busy and info.length == session.length
        assert session.length >= len(PROMPT) + 1 + 2  # and what the server decoded past
    else:
        session.close()
    later_done.set()
    reader.join(WAIT_S)
    assert len(received) == 2 and len(failures) == 1
    error = failures[0]
    assert error.code == grpc.StatusCode.CANCELLED and error.reason == "SUPERSEDED"
    assert f"({later_call}())" in error.message
    if later_call == "sync":
        assert session.info().length == session.length  # nothing ran on after the sync
        session.close()
    with pytest.raises(SalienceClientError) as gone:
        client.session(session.session_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("later_call", ["sync", "close"])
def test_sync_and_close_supersede_a_stream_paused_in_another_task(
    client: SalienceClient, later_call: str
) -> None:
    async def scenario() -> None:
        async with AsyncSalienceClient(client.target, timeout=30) as aio:
            session = await aio.open_session()
            await session.prefill(PROMPT)
            paused, later_done = asyncio.Event(), asyncio.Event()

            async def read() -> None:
                count = 0
                async for _ in session.generate([1], max_tokens=100, ignore_eos=True):
                    count += 1
                    if count == 2:
                        paused.set()
                        await later_done.wait()  # paused between events

            reader = asyncio.create_task(read())
            await paused.wait()
            if later_call == "sync":
                info = await session.sync()
                assert not info.is_busy and info.length == session.length
            else:
                await session.close()
            later_done.set()
            with pytest.raises(SalienceClientError) as caught:
                await reader
            assert caught.value.reason == "SUPERSEDED"
            assert f"({later_call}())" in caught.value.message
            if later_call == "sync":
                assert (await session.info()).length == session.length
                await session.close()

    asyncio.run(scenario())
