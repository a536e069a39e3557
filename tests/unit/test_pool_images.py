"""Which idle session the shim's pool closes for the server's image memory."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from salience_server.http.sessions_pool import SessionPool

_ids = itertools.count()


class _Session:
    def __init__(self, closed: list[str], routing_key: str = "") -> None:
        self.session_id = f"s{next(_ids)}"
        self.routing_key = routing_key or self.session_id
        """Its family's root id, as a fork's (``AsyncSession.routing_key``)."""
        self._closed = closed

    async def fork(self) -> _Session:
        return _Session(self._closed, self.routing_key)

    async def close(self) -> None:
        self._closed.append(self.session_id)


class _Client:
    def __init__(self) -> None:
        self.closed: list[str] = []

    async def open_session(self) -> _Session:
        return _Session(self.closed)


def test_a_session_holding_an_image_no_other_holds_goes_before_an_older_one_that_shares() -> None:
    """Image markers are negative ids. The least recently used idle session shares its
    image with a fork lent out (the server frees nothing when it closes); a newer idle
    session holds its own image: that one is closed."""

    async def main() -> tuple[list[str], Any, Any]:
        client = _Client()
        pool = SessionPool(client, max_sessions=8, fork_min_shared=2)  # type: ignore[arg-type]
        shared_prompt, own_prompt = [1, -5, 2], [3, -7, 4]
        older = await pool.acquire(shared_prompt)
        pool.release(older, shared_prompt)
        fork = await pool.acquire([*shared_prompt, 9])  # lent a fork: the parent stays idle
        assert fork.entry is not older.entry and older.entry in pool._entries
        newer = await pool.acquire(own_prompt)
        pool.release(newer, own_prompt)
        assert older.entry.last_used < newer.entry.last_used
        assert await pool.free_image_memory(fork.entry)
        return client.closed, older, newer

    closed, older, newer = asyncio.run(main())
    assert closed == [newer.session.session_id]


def test_the_same_image_in_another_family_is_no_sharing() -> None:
    """The server keeps an image per family of forks (the same bytes appended to two
    sessions are two embeddings). The least recently used idle session shares its image
    with a fork lent out; a newer idle session, opened on its own, holds the same bytes
    (the same marker): closing it frees its embedding, so it goes first (both looked
    shared, and the older, which frees nothing, went)."""

    async def main() -> tuple[list[str], Any, Any]:
        client = _Client()
        pool = SessionPool(client, max_sessions=8, fork_min_shared=2)  # type: ignore[arg-type]
        prompt = [1, -5, 2]
        older = await pool.acquire(prompt)
        pool.release(older, prompt)
        fork = await pool.acquire([*prompt, 9])  # lent a fork: the parent stays idle
        same_bytes = [3, -5, 4]  # shares no prefix with ``prompt``: a session of its own
        newer = await pool.acquire(same_bytes)
        pool.release(newer, same_bytes)
        assert newer.session.routing_key != older.session.routing_key
        assert await pool.free_image_memory(fork.entry)
        return client.closed, older, newer

    closed, older, newer = asyncio.run(main())
    assert closed == [newer.session.session_id]
