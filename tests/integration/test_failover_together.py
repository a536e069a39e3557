"""Calls of one session that find it lost together (the shim forking one pooled parent
for several requests at once): the session is re-created once, and every call then goes
on from it, in the sync and the asyncio client. On the fake replica (tests/fake_replica.py),
whose sessions a test deletes to lose them."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from salience_client import AsyncSalienceClient, SalienceClient
from tests.fake_replica import RunningFake
from tests.integration.test_failover import FAST, _lose


def test_forks_that_find_their_parent_lost_together_replay_it_once(fake: RunningFake) -> None:
    """The shim forks one pooled parent for several requests at once; its replica lost,
    each fork's failover replayed the parent over the others' replay (the second found
    the id taken, rewrote it from position 0 while the first's retried fork read it):
    forks failed "offset past the end", SESSION_BUSY or REPLAY_FAILED. The parent is
    re-created once, and every fork then made from it, in both clients."""
    want = [70, 71, 72, 73]

    async def forks_at_once() -> None:
        async with AsyncSalienceClient(fake.target, timeout=10, replay=FAST) as client:
            parent = await client.open_session()
            await parent.prefill(want)
            _lose(fake, parent.session_id)
            children = await asyncio.gather(*(parent.fork() for _ in range(6)))
            assert parent.num_replays == 1
            for child in children:
                assert fake.replica.sessions[child.session_id] == want

    asyncio.run(forks_at_once())
    with SalienceClient(fake.target, timeout=10, replay=FAST) as client:
        parent = client.open_session()
        parent.prefill(want)
        _lose(fake, parent.session_id)
        with ThreadPoolExecutor(6) as pool:
            children = list(pool.map(lambda _: parent.fork(), range(6)))
        assert parent.num_replays == 1
        assert all(fake.replica.sessions[child.session_id] == want for child in children)
        assert fake.replica.sessions[parent.session_id] == want


def test_a_fork_arriving_while_its_parent_is_replayed_waits_for_the_replay(
    fake: RunningFake,
) -> None:
    """The server refuses a fork of a session a call runs on (SESSION_BUSY), and a
    replay's prefill is such a call: a request forking the parent 0.2 s into another's
    replay failed at once (the shim's 409). It waits for the replay, spending none of
    its own, and forks what it restored."""

    async def scenario() -> None:
        async with AsyncSalienceClient(fake.target, timeout=10, replay=FAST) as client:
            parent = await client.open_session()
            await parent.prefill([70, 71, 72, 73])
            _lose(fake, parent.session_id)
            fake.replica.faults.prefill_delay_s = 0.5  # the replay's prefill takes a while
            first = asyncio.create_task(parent.fork())
            await asyncio.sleep(0.2)
            children = await asyncio.gather(first, parent.fork())
            assert parent.num_replays == 1
            assert [fake.replica.sessions[c.session_id] for c in children] == [[70, 71, 72, 73]] * 2

    asyncio.run(scenario())
