"""``SessionPool``: server sessions kept between stateless requests and continued by prefix.

A chat client resends the whole conversation every turn. The pool remembers, for each
session it keeps, the tokens the server has committed to it (as far as the shim knows),
and lends each request the idle session that shares the longest prefix with its prompt;
the request then sends ``offset`` = that shared length with ``truncating``, so the server
prefills only the new tokens. A lent session is never lent twice at once.

A session also keeps the scores (logprobs) an echo request returned for its positions,
so that a later one sharing them is scored only past them (``pooled_session.Scores``).

What the pool knows about a session is always a prefix of the server's truth: after a
call that ended early (cancelled, failed) the server may hold more tokens than the shim
saw, which is harmless because every call truncates to a length the shim knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from salience_client import AsyncSalienceClient, AsyncSession, SalienceClientError
from salience_server.http.pooled_session import (
    NO_SCORES,
    PooledSession,
    Scores,
    common_prefix_length,
    image_memory_victim,
)

log = logging.getLogger(__name__)

FORK_MIN_DISCARD = 64
"""Rewinding a session by at least this many tokens forks it instead, when there is room,
so that another conversation's cached history survives a request sharing only its start."""
FORK_MIN_SHARED = 64
"""A request sharing at least this many tokens with an idle session is lent a fork of it,
the session itself staying idle: requests arriving while it runs (a fan-out over one
system prompt) share the prefix too. A parent no one else used is closed as its child
comes back, so a lone conversation holds one session."""
MAX_KEPT_SCORES = 1 << 18
"""Scored positions the pool keeps at most over all its sessions (about 110 MiB of Python
objects with one alternative each, 230 with five); past it, the least recently used
sessions' scores go first."""
SETTLE_WAIT_S = 5.0
"""How long a session whose call was cancelled may stay busy on the server before the pool
gives up on it and closes it."""


@dataclass
class Lease:
    """A session lent to one request, and how much of the request's prompt it already holds."""

    entry: PooledSession
    shared: int
    """Prompt tokens already in the session: the next call's ``offset`` (with truncating)."""

    @property
    def session(self) -> AsyncSession:
        """The lent session."""
        return self.entry.session

    @property
    def known_ids(self) -> list[int]:
        """The tokens the session is known to hold before this request's call."""
        return self.entry.token_ids


class SessionPool:
    """A bounded set of server sessions, lent out by longest shared prefix."""

    def __init__(
        self,
        client: AsyncSalienceClient,
        max_sessions: int,
        fork_min_discard: int = FORK_MIN_DISCARD,
        fork_min_shared: int = FORK_MIN_SHARED,
        max_kept_scores: int = MAX_KEPT_SCORES,
    ) -> None:
        self._client = client
        self.max_sessions = max_sessions
        self.max_kept_scores = max_kept_scores
        self.fork_min_discard = fork_min_discard
        self.fork_min_shared = fork_min_shared
        self._entries: list[PooledSession] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def num_sessions(self) -> int:
        """Sessions the pool holds, lent or idle."""
        return len(self._entries)

    @property
    def num_leased(self) -> int:
        """Sessions lent to requests right now."""
        return sum(entry.is_leased for entry in self._entries)

    async def acquire(
        self,
        prompt_ids: Sequence[int],
        reuse: bool = True,
        scoring: int | None = None,
        has_siblings: bool = False,
        prompt_tail: int = 0,
    ) -> Lease:
        """Lends the idle session sharing the longest prefix with ``prompt_ids``, a fork of
        it, or a fresh session. ``reuse=False`` asks for a session holding nothing useful.
        ``scoring``: the call scores every position with that many alternatives, so only
        positions whose scores the session keeps count as shared. ``has_siblings``:
        requests sharing this one's prefix come at once (a batch's prompts), so a full
        pool makes room to fork it for each. ``prompt_tail``: the prompt's last tokens
        that open the reply (the chat template's generation prompt), which the next
        turn of the conversation may render otherwise."""
        if reuse and scoring is None:
            await self._await_settling(prompt_ids)
        lease = await self._lease(prompt_ids, reuse, scoring, has_siblings)
        lease.entry.history_length = len(prompt_ids) - prompt_tail
        return lease

    async def _lease(
        self, prompt_ids: Sequence[int], reuse: bool, scoring: int | None, has_siblings: bool
    ) -> Lease:
        best, shared = self._best_match(prompt_ids, scoring) if reuse else (None, 0)
        if best is not None and shared > 0:
            discard = len(best.token_ids) - shared
            if discard >= self.fork_min_discard and self._room_beside(best):
                return await self._fork_idle(best, shared)
            wants_fork = shared >= self.fork_min_shared or best.num_forking
            # A full pool closes a session for this fork only where others may share its
            # parent: a batch's prompts, a fork under way, or a request branching off
            # inside the history an earlier one sent (requests sent together over one
            # system prompt: lent the parent itself, the first took it from the others).
            # A conversation's next turn, which keeps that history, is lent its own
            # session: a fork would close the least recently used session every turn,
            # one conversation's history gone for nothing.
            branches = shared < min(best.history_length, len(best.token_ids))
            may_close = bool(best.num_forking) or has_siblings or branches
            if wants_fork and (self._has_room() or may_close and self._room_beside(best)):
                return await self._fork_idle(best, shared, keeps_parent_idle=True)
            if best.num_forking:  # no room for another fork
                return await self._open()
            best.is_leased = True
            return Lease(best, shared)
        reused = None if self._has_room() else self._lend_least_recent()
        return reused or await self._open()

    async def fork(self, lease: Lease, token_ids: Sequence[int]) -> Lease:
        """A child of a leased session that holds exactly ``token_ids``, leased too."""
        child = await lease.session.fork()
        history = lease.entry.history_length
        entry = PooledSession(child, [], time.monotonic(), history_length=history)
        entry.hold(token_ids, lease.entry.scores)
        self._entries.append(entry)
        return Lease(entry, len(token_ids))

    def release(self, lease: Lease, token_ids: Sequence[int], scores: Scores | None = None) -> None:
        """Takes a session back after a call that finished: it now holds ``token_ids``
        (with ``scores``, when the call scored it)."""
        entry = lease.entry
        entry.hold(token_ids, scores)
        entry.last_used = time.monotonic()
        entry.is_leased = False
        parent, entry.replaces = entry.replaces, None
        if (
            parent is not None
            and parent in self._entries
            and not parent.is_leased
            and not parent.num_forking
            and parent.last_used == entry.replaces_stamp
        ):  # forked for requests that did not come: this child holds its prefix
            self._entries.remove(parent)
            self._spawn(self._close(parent.session))
        self._trim()

    def abandon(self, lease: Lease, token_ids: Sequence[int]) -> None:
        """Takes a session back after a call that ended early: it holds at least
        ``token_ids``, and stays lent until the server says it is no longer busy."""
        lease.entry.hold(token_ids)
        lease.entry.settled = asyncio.Event()
        self._spawn(self._settle(lease))

    def discard(self, lease: Lease) -> None:
        """Forgets a session (it failed, or the server lost it) and closes it."""
        if lease.entry in self._entries:
            self._entries.remove(lease.entry)
        self._spawn(self._close(lease.session))

    def routes(self) -> list[tuple[str, str]]:
        """(session id, routing key) of every session held, lent or idle."""
        return [(entry.session.session_id, entry.session.routing_key) for entry in self._entries]

    async def close(self) -> None:
        """Closes every session (at shutdown); errors are ignored."""
        entries, self._entries = self._entries, []
        await asyncio.gather(*(self._close(e.session) for e in entries), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    # ----- internals -----------------------------------------------------------------

    def _best_match(
        self, prompt_ids: Sequence[int], scoring: int | None = None
    ) -> tuple[PooledSession | None, int]:
        best, best_key = None, (0, 0.0)
        for entry in self._entries:
            if entry.is_leased:
                continue
            shared = common_prefix_length(entry.token_ids, prompt_ids)
            if scoring is not None:
                shared = min(shared, entry.scores.serves(scoring))
            key = (shared, entry.last_used)
            if key > best_key:
                best, best_key = entry, key
        return best, best_key[0]

    def _has_room(self) -> bool:
        return len(self._entries) < self.max_sessions

    def _room_beside(self, kept: PooledSession) -> bool:
        """Whether there is room for one more session, closing the least recently used
        idle one other than ``kept`` if need be (a full pool forked nothing: requests
        sharing a prefix then each prefilled it in a session of their own, and one
        branching off a long history rewound it)."""
        if self._has_room():
            return True
        victim = self._least_recent_idle(kept)
        if victim is None:
            return False
        self._entries.remove(victim)
        self._spawn(self._close(victim.session))
        return True

    def _least_recent_idle(self, kept: PooledSession | None = None) -> PooledSession | None:
        idle = [e for e in self._entries if not e.is_leased and not e.num_forking and e is not kept]
        return min(idle, key=lambda entry: entry.last_used, default=None)

    async def free_image_memory(self, kept: PooledSession) -> bool:
        """Closes an idle session holding images (other than ``kept``), for the server's
        host memory their embeddings take (``image_memory_victim``); False when there is
        none."""
        victim = image_memory_victim(self._entries, kept)
        if victim is None:
            return False
        self._entries.remove(victim)
        await self._close(victim.session)
        return True

    def _lend_least_recent(self) -> Lease | None:
        """The least recently used idle session, lent to be rewound to nothing; None
        when every session is lent or being forked."""
        victim = self._least_recent_idle()
        if victim is None:
            return None
        victim.is_leased = True
        return Lease(victim, 0)

    async def _open(self) -> Lease:
        """A fresh session; where the server holds no more (``--max-sessions``), the
        least recently used idle one of the pool, to be rewound (the pool kept idle
        sessions while the server refused the shim new ones: 429s till their TTL)."""
        try:
            session = await self._client.open_session()
        except SalienceClientError as error:
            reused = self._lend_least_recent() if _is_server_full(error) else None
            if reused is None:
                raise
            return reused
        entry = PooledSession(session, [], time.monotonic())
        self._entries.append(entry)
        return Lease(entry, 0)

    async def _fork_idle(
        self, parent: PooledSession, shared: int, keeps_parent_idle: bool = False
    ) -> Lease:
        parent.num_forking += 1  # no other request may rewind it while it is being forked
        try:
            child = await parent.session.fork()
        except SalienceClientError as error:
            failure: SalienceClientError | None = error
        else:
            failure = None
        finally:
            parent.num_forking -= 1
        if failure is not None:
            return await self._instead_of_fork(parent, shared, failure)
        now = time.monotonic()
        entry = PooledSession(child, [], now)
        entry.hold(parent.token_ids, parent.scores)
        if keeps_parent_idle:
            parent.last_used = now
            entry.replaces, entry.replaces_stamp = parent, now
        self._entries.append(entry)
        return Lease(entry, shared)

    async def _instead_of_fork(
        self, parent: PooledSession, shared: int, error: SalienceClientError
    ) -> Lease:
        """A fork of ``parent`` failed with ``error``: where the parent expired on the
        server, a fresh session; where the server holds no more sessions, the parent
        itself, to be rewound to what is shared (if no other fork of it is under way),
        else the pool's least recently used idle session; else the error."""
        if error.code == grpc.StatusCode.NOT_FOUND:
            if parent in self._entries:
                self._entries.remove(parent)
            return await self._open()
        if not _is_server_full(error):
            raise error
        if parent in self._entries and not parent.is_leased and not parent.num_forking:
            parent.is_leased = True
            return Lease(parent, shared)
        reused = self._lend_least_recent()  # the parent is taken (a sibling's fork)
        if reused is None:
            raise error
        return reused

    async def _await_settling(self, prompt_ids: Sequence[int]) -> None:
        """Waits for the sessions settling after a call that ended early (a client that
        stopped a stream) which share more of ``prompt_ids`` than any idle one: the
        client's retry, sent at once, prefilled its whole conversation again in a
        fresh session."""
        _, shared = self._best_match(prompt_ids)
        settling = [
            entry.settled
            for entry in self._entries
            if entry.settled is not None
            and common_prefix_length(entry.token_ids, prompt_ids) > shared
        ]
        if settling:
            with contextlib.suppress(TimeoutError):
                waits = (event.wait() for event in settling)
                await asyncio.wait_for(asyncio.gather(*waits), SETTLE_WAIT_S + 1.0)

    async def _settle(self, lease: Lease) -> None:
        try:
            info = await lease.session.sync(wait_s=SETTLE_WAIT_S)
            if info.is_busy:
                log.warning("session %s is still busy; closing it", lease.session.session_id)
                self.discard(lease)
            else:
                self.release(lease, lease.entry.token_ids)
        except SalienceClientError:
            self.discard(lease)
        finally:  # released or discarded by now: whoever waits for it may look again
            settled, lease.entry.settled = lease.entry.settled, None
            if settled is not None:
                settled.set()

    def _trim(self) -> None:
        while len(self._entries) > self.max_sessions:
            victim = self._least_recent_idle()
            if victim is None:
                break
            self._entries.remove(victim)
            self._spawn(self._close(victim.session))
        kept = sum(len(entry.scores.events) for entry in self._entries)
        for entry in sorted(self._entries, key=lambda entry: entry.last_used):
            if kept <= self.max_kept_scores:
                return
            kept -= len(entry.scores.events)
            entry.scores = NO_SCORES  # a call scoring from them has its own copy

    async def _close(self, session: AsyncSession) -> None:
        with contextlib.suppress(SalienceClientError):
            await session.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs cleanup in its own task, outside any cancelled request's scope."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _is_server_full(error: SalienceClientError) -> bool:
    """The server holds as many sessions as it may (``--max-sessions``)."""
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "TOO_MANY_SESSIONS"
