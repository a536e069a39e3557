"""A model-based test of the shim's session pool (hypothesis stateful testing), on a fake
client: random requests acquire sessions for prompts over a four-token alphabet (so
prefixes overlap often), with and without scores, as siblings or alone, and give them
back finished, abandoned, forked or failed. After every step: no session is lent twice,
what a lease says it shares is what its session holds (and, for a scoring request, what
its kept scores cover), kept scores match their session's tokens, the pool stays within
its bounds once it trims, and every server session it opened is either in it or closed."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from salience_client import TokenEvent
from salience_server.http.pooled_session import Scores
from salience_server.http.sessions_pool import Lease, SessionPool

MAX_SESSIONS = 3
MAX_KEPT_SCORES = 20
TOKENS = st.lists(st.integers(0, 3), min_size=0, max_size=10)


class FakeSession:
    def __init__(self, client: FakeClient, session_id: str) -> None:
        self.client, self.session_id = client, session_id

    async def fork(self) -> FakeSession:
        assert self.session_id in self.client.live, "forked a closed session"
        return self.client.new()

    async def close(self) -> None:
        self.client.live.discard(self.session_id)

    async def sync(self, wait_s: float = 0.0) -> Any:
        return SimpleNamespace(is_busy=False)


class FakeClient:
    def __init__(self) -> None:
        self.live: set[str] = set()
        self._ids = itertools.count()

    def new(self) -> FakeSession:
        session = FakeSession(self, f"s{next(self._ids)}")
        self.live.add(session.session_id)
        return session

    async def open_session(self) -> FakeSession:
        return self.new()


def _scores(token_ids: list[int], top_k: int) -> Scores:
    events = [
        TokenEvent(i, t, True, -0.1 * i, 1, [(t, -0.1)] * (top_k if i else 0))
        for i, t in enumerate(token_ids)
    ]
    return Scores(events, top_k)


class PoolMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client = FakeClient()
        self.pool = SessionPool(
            self.client,  # type: ignore[arg-type]
            MAX_SESSIONS,
            fork_min_discard=3,
            fork_min_shared=3,
            max_kept_scores=MAX_KEPT_SCORES,
        )
        self.lent: dict[int, Lease] = {}
        """Leases out, by their entry's id: one each."""

    def _run(self, coroutine: Any) -> Any:
        result = self.loop.run_until_complete(coroutine)
        for _ in range(3):  # the pool's closes and settles, spawned as tasks
            self.loop.run_until_complete(asyncio.sleep(0))
        return result

    def _lend(self, lease: Lease) -> Lease:
        assert id(lease.entry) not in self.lent, "a session lent twice"
        self.lent[id(lease.entry)] = lease
        return lease

    def _give_back(self, lease: Lease) -> None:
        del self.lent[id(lease.entry)]

    @rule(
        target=leases, prompt=TOKENS, scoring=st.sampled_from([None, 0, 1, 2]), both=st.booleans()
    )
    def acquire(self, prompt: list[int], scoring: int | None, both: bool) -> Lease:
        lease = self._run(self.pool.acquire(prompt, scoring=scoring, has_siblings=both))
        assert 0 <= lease.shared <= len(prompt)
        assert lease.entry.token_ids[: lease.shared] == prompt[: lease.shared]
        if scoring is not None and lease.shared:
            assert lease.entry.scores.serves(scoring) >= lease.shared
        lease.prompt = prompt  # type: ignore[attr-defined]
        return self._lend(lease)

    @rule(lease=consumes(leases), decoded=TOKENS, top_k=st.sampled_from([None, 0, 2]))
    def finish(self, lease: Lease, decoded: list[int], top_k: int | None) -> None:
        """The call appended the prompt past what the session shared, and decoded."""
        held = lease.known_ids[: lease.shared] + lease.prompt[lease.shared :] + decoded  # type: ignore[attr-defined]
        self._give_back(lease)
        self._run(self._release(lease, held, None if top_k is None else _scores(held, top_k)))
        idle = [entry for entry in self.pool._entries if not entry.is_leased]
        assert self.pool.num_sessions <= MAX_SESSIONS or not idle
        assert sum(len(e.scores.events) for e in self.pool._entries) <= MAX_KEPT_SCORES

    async def _release(self, lease: Lease, held: list[int], scores: Scores | None) -> None:
        self.pool.release(lease, held, scores)

    @rule(lease=consumes(leases), cut=st.integers(0, 10))
    def abandon(self, lease: Lease, cut: int) -> None:
        """The call ended early: the session holds at least what its caller saw."""
        self._give_back(lease)
        self._run(self._abandon(lease, lease.known_ids[:cut]))

    async def _abandon(self, lease: Lease, known: list[int]) -> None:
        self.pool.abandon(lease, known)

    @rule(lease=consumes(leases))
    def discard(self, lease: Lease) -> None:
        self._give_back(lease)
        self._run(self._discard(lease))

    async def _discard(self, lease: Lease) -> None:
        self.pool.discard(lease)

    @rule(target=leases, lease=leases)
    def fork(self, lease: Lease) -> Lease:
        """n > 1 choices: a child of the lent session holding what it holds."""
        if id(lease.entry) not in self.lent:  # given back since
            return self._lend(self._run(self.pool.acquire([])))
        child = self._run(self.pool.fork(lease, lease.known_ids))
        child.prompt = list(lease.known_ids)  # type: ignore[attr-defined]
        return self._lend(child)

    @invariant()
    def kept_scores_follow_their_session(self) -> None:
        for entry in self.pool._entries:
            events = entry.scores.events
            assert [e.position for e in events] == list(range(len(events)))
            assert [e.token_id for e in events] == entry.token_ids[: len(events)]

    @invariant()
    def every_session_is_in_the_pool_or_closed(self) -> None:
        entries = self.pool._entries
        assert all(lease.entry in entries for lease in self.lent.values())
        assert {entry.session.session_id for entry in entries} == self.client.live

    def teardown(self) -> None:
        self._run(self.pool.close())
        assert not self.client.live
        self.loop.close()


TestPool = PoolMachine.TestCase
TestPool.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, derandomize=True
)
