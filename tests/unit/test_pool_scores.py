"""The scores a pooled session keeps of its first positions (``Scores``): they follow
the session's tokens, serve only calls asking as many alternatives or fewer, and decide
which session a scoring request is lent."""

from __future__ import annotations

from typing import Any

from salience_client import TokenEvent
from salience_server.http.pooled_session import NO_SCORES, PooledSession, Scores
from salience_server.http.sessions_pool import SessionPool


def _events(token_ids: list[int], top_k: int) -> list[TokenEvent]:
    return [
        TokenEvent(i, t, True, -0.5 * i, 1, [(t, -0.1)] * (top_k if i else 0))
        for i, t in enumerate(token_ids)
    ]


def _entry(token_ids: list[int], top_k: int | None, last_used: float = 1.0) -> PooledSession:
    entry = PooledSession(session=object(), token_ids=[], last_used=last_used, is_leased=False)  # type: ignore[arg-type]
    scores = NO_SCORES if top_k is None else Scores(_events(token_ids, top_k), top_k)
    entry.hold(token_ids, scores)
    return entry


def test_kept_scores_follow_the_session_s_tokens() -> None:
    entry = _entry([5, 6, 7, 8], top_k=2)
    entry.hold([5, 6, 7, 8, 9, 10])  # a call appended, scoring nothing
    assert [e.token_id for e in entry.scores.events] == [5, 6, 7, 8]
    entry.hold([5, 6, 1])  # rewound, and something else appended
    assert [e.token_id for e in entry.scores.events] == [5, 6]
    assert entry.scores.top_k == 2
    entry.hold([4])  # nothing in common: nothing kept
    assert entry.scores is NO_SCORES


def test_kept_scores_serve_as_many_alternatives_or_fewer() -> None:
    scores = Scores(_events([5, 6, 7], 3), 3)
    assert scores.serves(0) == scores.serves(3) == 3 and scores.serves(4) == 0
    served = scores.up_to(2, 1)
    assert [len(e.top_logprobs) for e in served] == [0, 1]
    assert [len(e.top_logprobs) for e in scores.events] == [0, 3, 3]  # left whole


def test_a_scoring_request_is_lent_the_session_whose_scores_it_shares() -> None:
    pool = SessionPool(client=None, max_sessions=4)  # type: ignore[arg-type]
    prompt = [1, 2, 3, 4, 5, 6]
    unscored = _entry([1, 2, 3, 4, 5], top_k=None, last_used=3.0)
    scored = _entry([1, 2, 3, 9], top_k=2, last_used=1.0)
    narrow = _entry([1, 2, 3, 4], top_k=0, last_used=2.0)
    pool._entries = [unscored, scored, narrow]
    assert pool._best_match(prompt) == (unscored, 5)  # a call that scores nothing
    assert pool._best_match(prompt, scoring=1) == (scored, 3)
    assert pool._best_match(prompt, scoring=0) == (narrow, 4)
    best: Any = pool._best_match(prompt, scoring=5)
    assert best[1] == 0  # none serves it: a session is lent to be rewound


def test_the_pool_keeps_scores_up_to_its_bound_the_most_recent_first() -> None:
    pool = SessionPool(client=None, max_sessions=4, max_kept_scores=10)  # type: ignore[arg-type]
    old, new = _entry([1, 2, 3, 4, 5, 6], 1, last_used=1.0), _entry([7, 8, 9, 10], 1, 2.0)
    pool._entries = [new, old]
    pool._trim()
    assert len(old.scores.events) == 6 and len(new.scores.events) == 4  # 10: within
    newest = _entry([11, 12], 1, last_used=3.0)
    pool._entries.append(newest)
    pool._trim()
    assert old.scores is NO_SCORES and len(new.scores.events) == 4
    assert len(newest.scores.events) == 2
