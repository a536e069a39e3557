"""Closing a client while one of its sessions recovers (SPEC 2.7): the call ends
CLIENT_CLOSED, as a call cut off mid-stream by the close does (``test_client.py``)."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from salience_client import AsyncSalienceClient, Failover, SalienceClient, SalienceClientError
from tests.fake_replica import RunningFake

FAST = Failover(retry_budget_s=5.0, first_retry_wait_s=0.05)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "asyncio"])
def test_closing_the_client_during_a_replay_ends_the_call_client_closed(
    fake: RunningFake, is_async: bool
) -> None:
    """The replica lost the session, so the call replays it; the client is closed while
    the replay's prefill runs. The sync client counted the cut replay as a failed one
    and tried again (REPLAY_FAILED, "gone from the server"); the async one let the
    channel's cancellation out as a bare ``asyncio.CancelledError`` of a task no one
    cancelled."""

    async def scenario() -> SalienceClientError:
        client = AsyncSalienceClient(fake.target, timeout=10, replay=FAST)
        session = await client.open_session()
        await session.prefill([1, 2, 3, 4])
        fake.replica.sessions.clear()
        fake.replica.faults.prefill_delay_s = 5.0

        async def close_soon() -> None:
            await asyncio.sleep(0.3)
            await client.close()

        closing = asyncio.create_task(close_soon())
        with pytest.raises(SalienceClientError) as caught:
            async for _ in session.generate([5], max_tokens=2):
                pass
        await closing
        assert session.num_replays == 0
        return caught.value

    if is_async:
        error = asyncio.run(scenario())
    else:
        client = SalienceClient(fake.target, timeout=10, replay=FAST)
        session = client.open_session()
        session.prefill([1, 2, 3, 4])
        fake.replica.sessions.clear()
        fake.replica.faults.prefill_delay_s = 5.0
        threading.Timer(0.3, client.close).start()
        with pytest.raises(SalienceClientError) as caught:
            list(session.generate([5], max_tokens=2))
        error = caught.value
        assert session.num_replays == 0
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CLIENT_CLOSED")


@pytest.mark.parametrize("call", ["fork", "open"])
def test_a_cancelled_fork_or_open_closes_what_the_server_made(fake: RunningFake, call: str) -> None:
    """The task awaiting a fork (or an open) is cancelled after the server made the
    session but before its answer came: the client closes it in the background. It
    stayed, with its KV, till its TTL passed: only the cancelled call knew its id (the
    shim's pool, whose batches cancel their other prompts when one fails, left such
    forks behind)."""

    async def scenario() -> None:
        async with AsyncSalienceClient(fake.target, timeout=10, replay=FAST) as client:
            parent = await client.open_session()
            await parent.prefill([1, 2, 3])
            if call == "fork":
                fake.replica.faults.fork_delay_s = 5.0
                pending = asyncio.create_task(parent.fork())
            else:
                fake.replica.faults.open_delay_s = 5.0
                pending = asyncio.create_task(client.open_session())
            while len(fake.replica.sessions) < 2:  # the server made it; no answer yet
                await asyncio.sleep(0.01)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            for _ in range(200):
                if set(fake.replica.sessions) == {parent.session_id}:
                    break
                await asyncio.sleep(0.01)
            assert set(fake.replica.sessions) == {parent.session_id}
            closes = [key for method, key in fake.replica.calls if method == "CloseSession"]
            # A fork routes with its family's key (to its parent's replica), an open
            # with its own id.
            assert len(closes) == 1 and (closes[0] == parent.routing_key) == (call == "fork")

    asyncio.run(scenario())


def test_closing_a_stream_mid_read_cancels_its_call_at_once(fake: RunningFake) -> None:
    """``close()`` from another thread while a read waits on the server waited for the
    next event (and cancelled nothing); from a signal handler in the reading thread it
    hung for good. Either now cuts the call: the read ends at once, the stream quietly,
    and the session holds what was delivered."""
    import signal
    import time

    with SalienceClient(fake.target, timeout=10) as client:
        session = client.open_session()
        session.prefill([100, 101])
        for closer in ("thread", "signal"):
            fake.replica.faults.prefill_delay_s = 3.0  # the next prefill is held
            stream = session.generate([102], max_tokens=0)
            start = time.monotonic()
            if closer == "thread":
                threading.Timer(0.3, stream.close).start()
            else:
                signal.signal(signal.SIGALRM, lambda *_, stream=stream: stream.close())
                signal.setitimer(signal.ITIMER_REAL, 0.3)
            try:
                assert list(stream) == []
            finally:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
            assert time.monotonic() - start < 2.0, closer
            assert session.length == 2
        *_, done = session.generate([5], max_tokens=1)  # rewinds what a cut prefill put in
        assert done.total_tokens == session.length == 4


def test_a_later_call_cuts_a_stream_read_in_another_thread_and_waits_for_it(
    fake: RunningFake,
) -> None:
    """The later call waited for the server alone, and went on while the reader still
    applied the stream's events: its late Done overwrote the later call's length (the
    next call then met OFFSET_MISMATCH). It cuts the stream's call, waits for the read
    to end, and goes on; the reader gets SUPERSEDED."""
    import time

    with SalienceClient(fake.target, timeout=10) as client:
        session = client.open_session()
        session.prefill([100, 101])
        fake.replica.faults.prefill_delay_s = 3.0
        stream = session.generate([102], max_tokens=0)
        failures: list[BaseException] = []

        def read() -> None:
            try:
                list(stream)
            except SalienceClientError as error:
                failures.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)  # the reader waits on the held prefill
        start = time.monotonic()
        *_, done = session.generate([7], max_tokens=1)
        reader.join(timeout=10)
        assert time.monotonic() - start < 2.0
        assert [getattr(f, "reason", f) for f in failures] == ["SUPERSEDED"]
        assert done.total_tokens == session.length == session.info().length == 4
