"""A session the shim's pool keeps (``PooledSession``): the tokens the server holds for
it as far as the shim knows, and the scores a scoring call returned for them."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from salience_client import AsyncSession, TokenEvent


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    limit = min(len(a), len(b))
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


@dataclass(frozen=True)
class Scores:
    """The logprobs a scoring call returned for a session's first positions, kept with
    it: a later prompt sharing them is scored from where they end (an echo request
    would otherwise recompute its whole prompt, since the server keeps no
    distributions)."""

    events: list[TokenEvent]
    """Position ``i``'s event at index ``i``, from 0."""
    top_k: int
    """How many alternatives each event holds (at most)."""

    def up_to(self, end: int, top_k: int) -> list[TokenEvent]:
        """Events of positions ``0 .. end - 1``, with at most ``top_k`` alternatives."""
        if top_k >= self.top_k:
            return self.events[:end]
        return [
            dataclasses.replace(event, top_logprobs=event.top_logprobs[:top_k])
            for event in self.events[:end]
        ]

    def serves(self, top_k: int) -> int:
        """How many positions these scores serve a call asking ``top_k`` alternatives."""
        return len(self.events) if top_k <= self.top_k else 0


NO_SCORES = Scores([], 0)


@dataclass(eq=False)
class PooledSession:
    """One server session the pool keeps."""

    session: AsyncSession
    token_ids: list[int]
    """A prefix of the server's tokens for this session: what the shim knows is committed."""
    last_used: float
    scores: Scores = NO_SCORES
    """Scored positions of ``token_ids``' start (kept in step by ``hold``)."""
    is_leased: bool = True
    history_length: int = 0
    """Tokens of the prompt of the request it was last lent to that the conversation's
    next request keeps: that prompt but the generation prompt's tail, which a template
    may write otherwise in history (``<think>``). Past it, the request decoded."""
    num_forking: int = 0
    """Forks of it under way: it may be forked again meanwhile, not lent nor rewound."""
    replaces: PooledSession | None = None
    """The session this one was forked from to keep it idle (FORK_MIN_SHARED)."""
    replaces_stamp: float = 0.0
    """The parent's ``last_used`` as forked: unchanged at release, no one else used it."""
    settled: asyncio.Event | None = None
    """Set once a session taken back after a call that ended early is idle again (or
    discarded); None when it is not settling."""

    def hold(self, token_ids: Sequence[int], scores: Scores | None = None) -> None:
        """The session now holds ``token_ids`` (scored at its start by ``scores``, or by
        what was scored before, as far as the tokens are the same)."""
        scores = self.scores if scores is None else scores
        kept = common_prefix_length([e.token_id for e in scores.events], token_ids)
        self.token_ids = list(token_ids)
        self.scores = Scores(scores.events[:kept], scores.top_k) if kept else NO_SCORES


def image_memory_victim(
    entries: Sequence[PooledSession], kept: PooledSession
) -> PooledSession | None:
    """The idle session (other than ``kept``) to close for the server's host memory its
    images' embeddings take, or None. The server holds an image while any session of its
    family of forks holds it (forks share it; the same bytes in another family are
    another embedding), so a session holding an image no other session holds goes first,
    the least recently used first."""
    holding = collections.Counter(marker for entry in entries for marker in _image_markers(entry))
    holders = [
        entry
        for entry in entries
        if not entry.is_leased
        and not entry.num_forking
        and entry is not kept
        and any(token_id < 0 for token_id in entry.token_ids)
    ]

    def frees_nothing(entry: PooledSession) -> bool:
        return all(holding[marker] > 1 for marker in _image_markers(entry))

    return min(holders, key=lambda entry: (frees_nothing(entry), entry.last_used), default=None)


def _image_markers(entry: PooledSession) -> set[tuple[str, int]]:
    """The images a session holds, by its family (its routing key, the root's id) and
    their markers (negative ids)."""
    family = entry.session.routing_key
    return {(family, token_id) for token_id in entry.token_ids if token_id < 0}
