"""A call's timeout bounds each of its recoveries (SPEC 2.7), the waits for another
call's replay included; a later recovery of the same call has it anew. No server: the
session's replay is recorded, not made."""

from __future__ import annotations

import asyncio
import time

import grpc

from salience_client.aio_session import AsyncSession
from salience_client.failover import Attempts, time_left_s
from salience_client.session import Session
from salience_client.types import SalienceClientError

TIMEOUT_S = 0.3
BUSY = SalienceClientError(grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY", "busy")
LOST = SalienceClientError(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", "lost")


def test_a_later_replay_has_the_calls_timeout_after_waiting_for_another() -> None:
    """A stream that waited for another call's replay (it met SESSION_BUSY meanwhile)
    and ran on past its timeout, then lost its session, replays within its timeout: its
    replay had no time left (the wait had started the replay's clock), and failed
    DEADLINE_EXCEEDED at once."""
    session = Session(None, "s1", 100, timeout=TIMEOUT_S)
    attempts = session._attempts()
    session.num_replays = 1  # another call of the session re-created it meanwhile
    session._recover(BUSY, attempts, None)
    time.sleep(2 * TIMEOUT_S)  # the stream goes on
    left: list[float | None] = []

    def replay(length: int, cause: SalienceClientError, attempts: Attempts) -> None:
        left.append(time_left_s(attempts.replay_deadline()))

    session._replay = replay  # type: ignore[method-assign]
    session._recover(LOST, attempts, 0)
    assert len(left) == 1 and left[0] is not None and left[0] > TIMEOUT_S / 2


def test_a_later_async_replay_has_the_calls_timeout_after_waiting_for_another() -> None:
    left: list[float | None] = []

    async def scenario() -> None:
        session = AsyncSession(None, "s1", 100, timeout=TIMEOUT_S)
        attempts = session._attempts()
        session.num_replays = 1
        await session._recover(BUSY, attempts, None)
        await asyncio.sleep(2 * TIMEOUT_S)

        async def replay(length: int, cause: SalienceClientError, attempts: Attempts) -> None:
            left.append(time_left_s(attempts.replay_deadline()))

        session._replay = replay  # type: ignore[method-assign]
        await session._recover(LOST, attempts, 0)

    asyncio.run(scenario())
    assert len(left) == 1 and left[0] is not None and left[0] > TIMEOUT_S / 2
