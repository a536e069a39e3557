"""A session that comes back to a replica still holding an old copy of it (SPEC 2.7),
through HAProxy (the shipped config) over two fake replicas (tests/fake_replica.py).

Session s lives on fake0; fake0 stops serving, so s moves to fake1 (NOT_FOUND there: it
is replayed) and changes there (a rewind and an append); then fake0 serves again and
fake1 stops, so s comes back to fake0, whose old copy is long enough for the next call.
The client took that copy as its own: the server held other tokens than the client's
history, with no error and no replay. The copy must be rewritten, so that each call
gives what one replica that never failed gives (the oracle: the same calls on one fake
replica, no proxy), and the server holds the client's history.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from salience_client import AsyncSalienceClient, Failover, SalienceClient
from salience_server.cluster import Proxy
from tests.fake_replica import RunningFake, start_fake
from tests.integration.test_proxy import Named

FAST = Failover(retry_budget_s=5.0, first_retry_wait_s=0.05)

BEFORE_MOVE = ([1, 2, 3, 4, 5, 6], None, 0)
"""(append_tokens, truncate_to, max_tokens) of the call made on fake0 first."""
ON_FAKE1 = [([7], None, 0), ([80, 90, 100, 110], 3, 0)]
"""The calls made once the session moved to fake1 (the first one replays it there)."""
BACK = ([120], 5, 2)
"""The call that comes back to fake0, whose old copy [1..6] holds its offset."""


@dataclass
class Proxied:
    proxy: Proxy
    fakes: list[RunningFake]

    def move_away(self) -> None:
        """fake0 stops serving: the proxy sends its sessions to fake1."""
        self.fakes[0].set_serving(False)
        self.proxy.wait_states({"fake0": "DOWN"}, 10)

    def come_back(self) -> None:
        """fake0 serves again and fake1 stops: the sessions go back to fake0."""
        self.fakes[0].set_serving(True)
        self.proxy.wait_states({"fake0": "UP"}, 10)
        self.fakes[1].set_serving(False)
        self.proxy.wait_states({"fake1": "DOWN"}, 10)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Proxied]:
    fakes = [start_fake(f"fake{index}") for index in range(2)]
    named = [Named(f"fake{index}", fake.target) for index, fake in enumerate(fakes)]
    proxy = Proxy(named, tmp_path, check_interval="100ms")  # type: ignore[arg-type]
    try:
        proxy.start()
        proxy.wait_states({"fake0": "UP", "fake1": "UP"}, 10)
        yield Proxied(proxy, fakes)
    finally:
        proxy.stop()
        for fake in fakes:
            fake.stop()


def _on_fake0(client: SalienceClient) -> Any:
    """A session the proxy placed on fake0 (ids hash over both replicas)."""
    for index in range(32):
        session = client.open_session(session_id=f"stale-{index}")
        if session.replica == "fake0":
            return session
        session.close()
    raise AssertionError("no session id of 32 went to fake0")


def _scenario(session: Any, moves: Proxied | None) -> list[list[Any]]:
    """The calls, moving the session as the module says when ``moves`` is given."""
    steps: dict[int, Callable[[], None]] = {}
    if moves:
        steps = {1: moves.move_away, 1 + len(ON_FAKE1): moves.come_back}
    outputs = []
    for index, (tokens, truncate_to, max_tokens) in enumerate([BEFORE_MOVE, *ON_FAKE1, BACK]):
        if index in steps:
            steps[index]()
        events = session.generate(tokens, truncate_to=truncate_to, max_tokens=max_tokens)
        outputs.append(list(events))
    return outputs


def _through_the_moves_and_alone(
    proxied: Proxied, fake: RunningFake, calls: Callable[[Any, Proxied | None], list[Any]]
) -> tuple[Any, list[int]]:
    """``calls`` on a session opened on fake0 through the proxy, moving it away and back
    (the session, and what fake0 holds of it at the end), checked against the same calls
    on one replica alone, unmoved: the outputs, and the tokens both hold."""
    with SalienceClient(proxied.proxy.target, timeout=10, replay=FAST) as client:
        session = _on_fake0(client)
        outputs = calls(session, proxied)
        held = proxied.fakes[0].replica.sessions[session.session_id]
    with SalienceClient(fake.target, timeout=10) as alone:
        oracle = alone.open_session(session_id=session.session_id)
        assert outputs == calls(oracle, None)
    assert held == list(session.history.token_ids) == fake.replica.sessions[oracle.session_id]
    return session, held


def test_a_session_back_on_an_old_copy_is_rewritten_there(
    proxied: Proxied, fake: RunningFake, caplog: pytest.LogCaptureFixture
) -> None:
    session, held = _through_the_moves_and_alone(proxied, fake, _scenario)
    assert held == [1, 2, 3, 80, 90, 120, 121, 122]
    assert session.replica == "fake0" and session.num_replays == 2
    assert "STALE_COPY" in caplog.text


def test_a_fork_of_a_session_back_on_an_old_copy_is_made_after_its_replay(
    proxied: Proxied, fake: RunningFake
) -> None:
    """The parent, rewound on fake1, holds 5 positions, fewer than fake0's old copy: a
    fork of that copy copied its 6, and the child went on from them (or failed
    OFFSET_MISMATCH on a replica holding them)."""

    def calls(session: Any, moves: Proxied | None) -> tuple[Any, list[list[Any]]]:
        session.prefill([1, 2, 3, 4, 5, 6])
        if moves:
            moves.move_away()
        list(session.generate([80, 90], truncate_to=3, max_tokens=0))
        if moves:
            moves.come_back()
        child = session.fork("child")
        outputs = [list(child.generate([130], max_tokens=2))]
        outputs.append(list(session.generate([140], max_tokens=1)))
        return child, outputs

    with SalienceClient(proxied.proxy.target, timeout=10, replay=FAST) as client:
        session = _on_fake0(client)
        child, outputs = calls(session, proxied)
        held = proxied.fakes[0].replica.sessions
    with SalienceClient(fake.target, timeout=10) as alone:
        oracle = alone.open_session(session_id=session.session_id)
        assert outputs == calls(oracle, None)[1]
    assert held["child"] == list(child.history.token_ids) == fake.replica.sessions["child"]
    assert held["child"] == [1, 2, 3, 80, 90, 130, 131, 132]
    for one in (session, oracle):
        assert list(one.history.token_ids) == [1, 2, 3, 80, 90, 140, 141]
    assert held[session.session_id] == fake.replica.sessions[session.session_id]
    assert held[session.session_id] == [1, 2, 3, 80, 90, 140, 141]
    assert child.replica == "fake0" and session.num_replays == 2


def test_the_async_client_rewrites_an_old_copy_and_replays_under_an_image(
    proxied: Proxied, fake: RunningFake
) -> None:
    """As the first test, the first call back being an image, then ``info()``."""

    async def calls(session: Any, moves: Proxied | None) -> list[Any]:
        outputs: list[Any] = []
        for index, (tokens, truncate_to, max_tokens) in enumerate([BEFORE_MOVE, *ON_FAKE1]):
            if moves and index == 1:
                await asyncio.to_thread(moves.move_away)
            events = session.generate(tokens, truncate_to=truncate_to, max_tokens=max_tokens)
            outputs.append([event async for event in events])
        if moves:
            await asyncio.to_thread(moves.come_back)
        outputs.append(await session.append_image(b"png", "image/png", truncate_to=5))
        outputs.append((await session.info()).length)
        outputs.append([event async for event in session.generate([120], max_tokens=2)])
        return outputs

    async def scenario() -> None:
        async with AsyncSalienceClient(proxied.proxy.target, timeout=10, replay=FAST) as client:
            for index in range(32):
                session = await client.open_session(session_id=f"stale-{index}")
                if session.replica == "fake0":
                    break
                await session.close()
            outputs = await calls(session, proxied)
            history = list(session.history.token_ids)
        held = proxied.fakes[0].replica.sessions[session.session_id]
        async with AsyncSalienceClient(fake.target, timeout=10) as alone:
            oracle = await alone.open_session(session_id=session.session_id)
            assert outputs == await calls(oracle, None)
            assert history == list(oracle.history.token_ids)
        assert held == fake.replica.sessions[session.session_id]
        assert held[:5] == [1, 2, 3, 80, 90] and held[-3:] == [120, 121, 122]
        assert session.replica == "fake0" and session.num_replays == 2

    asyncio.run(scenario())


def test_an_old_copy_longer_than_the_session_is_rewritten_there(
    proxied: Proxied, fake: RunningFake
) -> None:
    """s, rewound on fake1 to 4 positions, comes back to fake0's old copy of 6: the next
    call, appending at 4, was refused OFFSET_MISMATCH naming a longer length (no replay:
    only a shorter copy was taken for an old one), and the caller got the error."""

    def calls(session: Any, moves: Proxied | None) -> list[list[Any]]:
        outputs = [list(session.generate([1, 2, 3, 4, 5, 6], max_tokens=0))]
        if moves:
            moves.move_away()
        outputs.append(list(session.generate([7], max_tokens=0)))
        outputs.append(list(session.generate([80], truncate_to=3, max_tokens=0)))
        if moves:
            moves.come_back()
        outputs.append(list(session.generate([120], max_tokens=2)))
        return outputs

    session, held = _through_the_moves_and_alone(proxied, fake, calls)
    assert held == [1, 2, 3, 80, 120, 121, 122]
    assert session.replica == "fake0" and session.num_replays == 2
