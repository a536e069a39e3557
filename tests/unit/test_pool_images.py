"""Which idle session the shim's pool closes for the server's image memory."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from salience_server.http.sessions_pool import SessionPool

_ids = itertools.count()


class _Session:
    def __init__(self, closed: list[str]) -> None:
        self.session_id = f"s{next(_ids)}"
        self._closed = closed

    async def fork(self) -> _Session:
        return _Session(self._closed)

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
