"""A call its caller leaves early (a ``break``, a stream left open, a cancelled task, a
deadline): the session holds what the caller received, and its next call rewinds what
the server committed past that, after the server has ended the call. Oracle: a fresh
session holding exactly the tokens the caller saw."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from salience_client import (
    AsyncSalienceClient,
    SalienceClient,
    SalienceClientError,
    TokenEvent,
)
from tests.client_support import PROMPT
from tests.helpers import engine_held_in_a_step


def test_a_session_left_mid_stream_holds_what_its_caller_received(client: SalienceClient) -> None:
    """Leaving the stream cancels the call, and the session holds what the caller
    received: the tokens the server decoded past them meanwhile are rewound by the next
    call, on the session and on a fork of it. (The length was re-read from the server,
    so an agent that stopped reading at a token of its choosing appended its next turn
    after text it never saw.) The next call scores as on a session that held exactly
    those tokens."""
    with client.open_session() as session:
        session.prefill(PROMPT)
        seen: list[int] = []
        for event in session.generate([1, 2, 3], max_tokens=300, ignore_eos=True):
            assert isinstance(event, TokenEvent)
            seen.append(event.token_id)
            if len(seen) == 3:
                time.sleep(0.3)  # the server decodes on meanwhile
                break
        held = [*PROMPT, 1, 2, 3, *seen]
        assert session.length == len(held) == session.history.length
        with pytest.raises(ValueError, match="sync"):  # past what the caller received
            session.rewind(len(held) + 1)
        child = session.fork()
        assert session.info().length > len(held) and child.length == len(held)
        for handle in (session, child):
            (scored,) = handle.score([4], [(len(held), len(held) + 1)])
            with client.open_session() as control:
                assert (
                    abs(scored - control.score([*held, 4], [(len(held), len(held) + 1)])[0]) < 1e-5
                )
            assert handle.length == handle.info().length == len(held) + 1
        child.close()


def test_a_stream_left_open_is_closed_by_the_sessions_next_call(client: SalienceClient) -> None:
    """``break`` with the generator still referenced (sync), or from ``async for`` (an
    async generator is finalized later, by the event loop): the next call closes it and
    continues from what the caller received (it got SESSION_BUSY, or OFFSET_MISMATCH and
    then the server's length, holding tokens the caller never saw)."""
    with client.open_session() as session:
        stream = session.generate([1, 2, 3], max_tokens=300, ignore_eos=True)
        received = []
        for event in stream:
            received.append(event)
            if len(received) == 3:
                break
        assert session.prefill([4]).total_tokens == 3 + len(received) + 1 == session.length

    async def scenario(pause_s: float) -> None:
        async with AsyncSalienceClient(client.target, timeout=30) as aio:
            async with await aio.open_session() as session:
                received = []
                async for event in session.generate([1, 2, 3], max_tokens=300, ignore_eos=True):
                    received.append(event)
                    if len(received) == 3:
                        break
                await asyncio.sleep(pause_s)
                done = await session.prefill([4])
                assert done.total_tokens == 3 + 3 + 1 == session.length == session.history.length

    # The next call at once, before the event loop closed the dropped generator: it got
    # SESSION_BUSY (the server still ran the call).
    for pause_s in (0.2, 0.0):
        asyncio.run(scenario(pause_s))


def test_length_and_history_follow_what_the_caller_received_at_once(
    client: SalienceClient,
) -> None:
    """Right after a ``break``, before any other call: ``length`` and ``history`` are
    what the caller received (an ``async for`` leaves the generator to the event loop,
    which finalized it turns later: until then they were those before the call, and a
    framework reading ``length`` for its next ``truncate_to`` cut off the turn). The
    next call still rewinds what the server decoded beyond; ``sync()`` keeps it."""

    def check(session: Any, seen: list[int]) -> None:
        held = [*PROMPT, 1, 2, 3, *seen]
        assert session.length == len(held)
        assert session.history.token_ids.tolist() == held

    with client.open_session() as session:
        session.prefill(PROMPT)
        stream = session.generate([1, 2, 3], max_tokens=300, ignore_eos=True)
        seen = [next(stream).token_id for _ in range(3)]  # the stream stays open
        check(session, seen)
        assert session.prefill([4]).total_tokens == len(PROMPT) + 3 + 3 + 1 == session.length

    async def scenario(keeps: bool) -> None:
        async with AsyncSalienceClient(client.target, timeout=30) as aio:
            async with await aio.open_session() as session:
                await session.prefill(PROMPT)
                seen: list[int] = []
                async for event in session.generate([1, 2, 3], max_tokens=300, ignore_eos=True):
                    seen.append(event.token_id)  # type: ignore[union-attr]
                    if len(seen) == 3:
                        await asyncio.sleep(0.3)  # the server decodes on meanwhile
                        break
                check(session, seen)  # no await since the break
                if keeps:
                    info = await session.sync()
                    assert info.length == session.length > len(PROMPT) + 3 + 3
                    assert session.history.length == len(PROMPT) + 3 + 3  # all it knows
                    expected = info.length + 1
                else:
                    expected = len(PROMPT) + 3 + 3 + 1
                done = await session.prefill([4])
                assert done.total_tokens == expected == session.length

    for keeps in (False, True):
        asyncio.run(scenario(keeps))


def test_a_cancelled_async_call_returns_at_once_and_the_next_call_fits(
    tiny_llama_dir: Path, server_factory: Any
) -> None:
    """asyncio cancellation (wait_for's timeout) ends the call at once: the client does not
    wait for the server to wind down the step it is in (it waited up to 5 s: a long
    prefill's step, 4 s on the default model here). The engine is held inside the
    prefill's step until the cancelled call has returned, so a client that waited for
    the step would wait out its own limit (a one-second step here was the bound: a
    cancel slowed past 0.6 s on a loaded machine failed a client that had not waited)."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)

    async def scenario() -> None:
        async with AsyncSalienceClient(server.target, timeout=30) as client:
            async with await client.open_session() as session:
                with engine_held_in_a_step(server.engine) as in_step:
                    prefill = asyncio.ensure_future(session.prefill([3] * 40))
                    assert await asyncio.to_thread(in_step.wait, 10), "the prefill never ran"
                    start = time.monotonic()
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(prefill, 0.1)
                    assert time.monotonic() - start < 2.5
                done = await session.prefill([4])
                info = await session.info()
                # The cancelled append, of which no event came, went: the session holds [4].
                assert not info.is_busy and done.total_tokens == info.length == session.length == 1

    asyncio.run(scenario())


def test_a_stream_takes_a_deadline(tiny_llama_dir: Path, server_factory: Any) -> None:
    """``generate(timeout=...)`` bounds the stream (the client's timeout bounds only
    unary calls, and generate took none): DEADLINE_EXCEEDED, the session then holding
    what the caller received."""
    server = server_factory(tiny_llama_dir, block_size=4, kv_cache_bytes=8 << 20)
    execute = server.engine.runner.execute

    def slow_execute(batch: Any, uploads: Any = None) -> Any:
        time.sleep(0.05)
        return execute(batch, uploads)

    server.engine.runner.execute = slow_execute
    with SalienceClient(server.target, timeout=30) as client, client.open_session() as session:
        received = []
        start = time.monotonic()
        with pytest.raises(SalienceClientError) as caught:
            for event in session.generate([1, 2, 3], max_tokens=200, ignore_eos=True, timeout=0.5):
                received.append(event)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 2 and 0 < len(received) < 200
        server.engine.runner.execute = execute
        assert session.prefill([4]).total_tokens == 3 + len(received) + 1 == session.length

    async def scenario() -> None:
        async with AsyncSalienceClient(server.target, timeout=30) as client:
            async with await client.open_session() as session:
                events = session.generate([1], max_tokens=200, ignore_eos=True, timeout=0.5)
                with pytest.raises(SalienceClientError) as caught:
                    async for _ in events:
                        pass
                assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    server.engine.runner.execute = slow_execute
    asyncio.run(scenario())
