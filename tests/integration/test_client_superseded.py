"""One call at a time per session: a later call supersedes a stream still open (README,
the client). A stream another task or thread is still reading, paused between events,
is closed by the later call, and its next iteration raises SUPERSEDED (its loop just
ended, with no Done and no error, as if the call had); the session holds what it
delivered, then what the later call did. Oracle: a control session fed exactly the
tokens the client saw decodes and scores as the session does."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from salience_client import (
    END,
    AsyncSalienceClient,
    Done,
    SalienceClient,
    SalienceClientError,
    Session,
    TokenEvent,
)
from tests.client_support import PROMPT

NUM_READ = 3
"""Events the first stream's reader takes before the later call comes."""
TOLERANCE = 1e-5


def _check_superseded(error: SalienceClientError, later_call: str) -> None:
    assert error.code == grpc.StatusCode.CANCELLED and error.reason == "SUPERSEDED"
    assert f"({later_call}())" in error.message


def _check_against_control(client: SalienceClient, session: Session, held: list[int]) -> None:
    """The session holds ``held``: its length, its history, and its next turn's tokens
    and logprobs are a control's fed ``held`` (the server may hold more, decoded before
    the stream was closed: the next turn rewinds it)."""
    assert session.length == len(held)
    assert session.history.token_ids.tolist() == held
    with client.open_session() as control:
        control.prefill(held)
        turns = []
        for handle in (session, control):
            ranges = [(handle.length, END)]
            events = handle.generate([9], max_tokens=3, logprobs_ranges=ranges)
            turns.append([(e.token_id, e.logprob) for e in events if isinstance(e, TokenEvent)])
        got, want = turns
        assert session.length == session.info().length == control.length
        assert [t for t, _ in got] == [t for t, _ in want] and len(got) == 4
        assert all(abs(a - b) < TOLERANCE for (_, a), (_, b) in zip(got, want, strict=True))


@pytest.mark.parametrize("later_call", ["generate", "fork"])
def test_a_stream_read_in_another_thread_is_superseded_loudly(
    client: SalienceClient, later_call: str
) -> None:
    with client.open_session() as session:
        session.prefill(PROMPT)
        paused, later_done = threading.Event(), threading.Event()
        received: list[TokenEvent | Done] = []
        failures: list[SalienceClientError] = []

        def read() -> None:
            try:
                for event in session.generate([1], max_tokens=100, ignore_eos=True):
                    received.append(event)
                    if len(received) == NUM_READ:
                        paused.set()
                        later_done.wait(30)  # paused between events
            except SalienceClientError as error:
                failures.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        assert paused.wait(30)
        held = [*PROMPT, 1, *(e.token_id for e in received if isinstance(e, TokenEvent))]
        if later_call == "generate":
            *_, done = session.generate([2], max_tokens=5, ignore_eos=True)
            assert isinstance(done, Done) and done.total_tokens == len(held) + 6
        else:
            child = session.fork()
            assert child.length == len(held)
            child.close()
        later_done.set()
        reader.join(30)
        assert len(received) == NUM_READ and len(failures) == 1
        _check_superseded(failures[0], later_call)
        if later_call == "generate":  # its append, then what it decoded
            assert session.history.token_ids[len(held)] == 2
            held += session.history.token_ids.tolist()[len(held) :]
        _check_against_control(client, session, held)


@pytest.mark.parametrize("later_call", ["generate", "fork"])
def test_a_stream_read_in_another_task_is_superseded_loudly(
    client: SalienceClient, later_call: str
) -> None:
    async def scenario() -> list[int]:
        async with AsyncSalienceClient(client.target, timeout=30) as aio:
            session = await aio.open_session()
            await session.prefill(PROMPT)
            paused, later_done = asyncio.Event(), asyncio.Event()
            received: list[TokenEvent | Done] = []

            async def read() -> None:
                async for event in session.generate([1], max_tokens=100, ignore_eos=True):
                    received.append(event)
                    if len(received) == NUM_READ:
                        paused.set()
                        await later_done.wait()  # paused between events

            reader = asyncio.create_task(read())
            await paused.wait()
            if later_call == "generate":
                events = [e async for e in session.generate([2], max_tokens=5, ignore_eos=True)]
                assert isinstance(events[-1], Done)
            else:
                child = await session.fork()
                assert child.length == len(PROMPT) + 1 + NUM_READ
                await child.close()
            later_done.set()
            with pytest.raises(SalienceClientError) as caught:
                await reader
            _check_superseded(caught.value, later_call)
            assert len(received) == NUM_READ
            return session.history.token_ids.tolist()

    held = asyncio.run(scenario())
    decoded = held[len(PROMPT) + 1 : len(PROMPT) + 1 + NUM_READ]
    expected = [*PROMPT, 1, *decoded]
    if later_call == "generate":
        assert held[: len(expected) + 1] == [*expected, 2] and len(held) == len(expected) + 6
    else:
        assert held == expected


def test_a_stream_its_caller_left_is_closed_quietly(client: SalienceClient) -> None:
    """A stream left with a ``break`` that kept it, or read to its Done but not past
    it: the next call closes it, and closing or finishing it afterwards raises
    nothing."""
    with client.open_session() as session:
        left = session.generate([1, 2, 3], max_tokens=100, ignore_eos=True)
        next(left)
        session.prefill([4])
        left.close()  # quiet: the caller left it
        assert list(left) == []
        finished = session.generate([5], max_tokens=2)
        events = [next(finished) for _ in range(3)]
        assert isinstance(events[-1], Done)
        session.prefill([6])
        assert list(finished) == []  # it had its Done: nothing was superseded
        assert session.length == session.info().length == 3 + 1 + 1 + 1 + 2 + 1


def test_the_streams_work_as_the_generators_did(client: SalienceClient) -> None:
    """``for``, ``list()``, ``next()``, ``send(None)``, ``throw()``, ``close()``; ``async
    for``, ``anext()``, ``asend(None)``, ``athrow()``, ``aclose()``. An exception thrown
    in leaves the call, as ``close()``: the session holds what was delivered."""
    with client.open_session() as session:
        stream = session.generate([1], max_tokens=2, ignore_eos=True)
        assert iter(stream) is stream and isinstance(next(stream), TokenEvent)
        assert isinstance(stream.send(None), TokenEvent)
        assert isinstance(list(stream)[-1], Done)
        with pytest.raises(StopIteration):
            next(stream)
        thrown = session.generate([2], max_tokens=50, ignore_eos=True)
        assert isinstance(next(thrown), TokenEvent)
        with pytest.raises(KeyError):
            thrown.throw(KeyError("stop"))
        assert list(thrown) == []
        assert session.prefill([3]).total_tokens == 1 + 2 + 1 + 1 + 1 == session.length

    async def scenario() -> None:
        async with AsyncSalienceClient(client.target, timeout=30) as aio:
            async with await aio.open_session() as session:
                stream = session.generate([1], max_tokens=5, ignore_eos=True)
                assert isinstance(await anext(stream), TokenEvent)
                assert isinstance(await stream.asend(None), TokenEvent)
                await stream.aclose()
                assert [e async for e in stream] == []
                assert session.length == 3
                thrown = session.generate([2], max_tokens=50, ignore_eos=True)
                assert isinstance(await anext(thrown), TokenEvent)
                with pytest.raises(KeyError):
                    await thrown.athrow(KeyError("stop"))
                assert [e async for e in thrown] == []
                done = await session.prefill([3])
                assert done.total_tokens == 3 + 1 + 1 + 1 == session.length

    asyncio.run(scenario())
